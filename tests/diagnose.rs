//! `nodeherd diagnose` with real Node workers under load: the worker is
//! taken out of rotation (a replacement serves first), captured, and
//! stopped, and no request fails meanwhile.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);
const OHA: &str = "/var/cache/nodeherd-ci/oha/bin/oha";

/// oha against `port` for `seconds`, keep-alive on, in the background.
struct Load {
    child: std::process::Child,
}

impl Load {
    fn start(port: u16, path: &str, seconds: u32) -> Load {
        let child = Command::new(OHA)
            .args([
                "-z",
                &format!("{seconds}s"),
                "-c",
                "8",
                "--no-tui",
                "--output-format",
                "json",
                &format!("http://127.0.0.1:{port}{path}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("oha");
        Load { child }
    }

    /// Stop it (SIGINT: oha ends and prints its result) and read it:
    /// (answered 2xx, failed, errors, slowest in s); failed is every error
    /// but the deadline's (what was open when it stopped), every non-2xx.
    fn finish(mut self) -> (u64, u64, String, f64) {
        kill(self.child.id() as i32, libc::SIGINT);
        let mut out = String::new();
        std::io::Read::read_to_string(self.child.stdout.as_mut().unwrap(), &mut out).unwrap();
        let _ = self.child.wait();
        let d: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let mut ok = 0;
        let mut failed = 0;
        for (k, v) in d["statusCodeDistribution"]
            .as_object()
            .into_iter()
            .flatten()
        {
            if k.starts_with('2') {
                ok += v.as_u64().unwrap_or(0);
            } else {
                failed += v.as_u64().unwrap_or(0);
            }
        }
        for (k, v) in d["errorDistribution"].as_object().into_iter().flatten() {
            if !k.contains("aborted due to deadline") {
                failed += v.as_u64().unwrap_or(0);
            }
        }
        (
            ok,
            failed,
            d["errorDistribution"].to_string(),
            d["summary"]["slowest"].as_f64().unwrap_or(f64::MAX),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_heap_snapshot_under_load_fails_no_request_and_loads_as_json() {
    let dir = tempdir::Dir::new("diag-heap");
    let state = dir.path.join("state");
    std::fs::create_dir(&state).unwrap();
    let cfg = one_app(
        &dir,
        "heavy",
        "heavy.js",
        r#""instances":2,"kill_timeout":3000,"listen_timeout":20000"#,
    );
    let bus = DbusDaemon::start();
    let m = start_with_state(&cfg, &state, Some(&bus));
    let port = m.port();
    let before = instances_answering(port, 2, T);
    assert_eq!(before.len(), 2, "{}", m.log());
    let began = std::time::Instant::now();
    let load = Load::start(port, "/", 300);
    std::thread::sleep(Duration::from_secs(2));
    let (code, out, err) = client(&[
        "diagnose",
        "heavy",
        "1",
        "--heap-snapshot",
        "--bus",
        &bus.address,
    ]);
    assert_eq!(code, 0, "{err}\n{}", m.log());
    let took = began.elapsed();
    let path = std::path::PathBuf::from(out.trim());
    assert!(
        path.starts_with(state.join("nodeherd-diagnostics")),
        "{out}"
    );
    assert!(
        path.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("heap-snapshot-"),
        "{out}"
    );
    // The old worker is gone, its slot served by the replacement.
    assert!(!pid_alive(before["1"] as i32), "{}", m.log());
    let (ok, failed, errors, slowest) = load.finish();
    assert!(ok > 0, "no request answered");
    assert_eq!(
        failed,
        0,
        "{failed} failed ({errors}) of {ok}:\n{}",
        m.log()
    );
    // No request waited for the snapshot (seconds long): none reached
    // the worker once it was out of rotation.
    assert!(slowest < 2.0, "a request took {slowest} s");
    let text = std::fs::read(&path).unwrap();
    let snap: serde_json::Value = serde_json::from_slice(&text).expect("the snapshot is JSON");
    assert!(snap["snapshot"]["meta"].is_object(), "no snapshot.meta");
    eprintln!(
        "heap snapshot: {} MiB, {ok} requests answered in {took:?}, 0 failed, slowest {slowest} s",
        text.len() >> 20
    );
}

#[test]
fn a_cpu_profile_and_a_stack_under_load_fail_no_request() {
    let dir = tempdir::Dir::new("diag-prof");
    let state = dir.path.join("state");
    std::fs::create_dir(&state).unwrap();
    let cfg = one_app(
        &dir,
        "prof",
        "heavy.js",
        r#""instances":2,"kill_timeout":3000,"listen_timeout":20000,"env":{"HEAVY_MIB":"8"}"#,
    );
    let bus = DbusDaemon::start();
    let m = start_with_state(&cfg, &state, Some(&bus));
    let port = m.port();
    let before = instances_answering(port, 2, T);
    assert_eq!(before.len(), 2, "{}", m.log());
    let began = std::time::Instant::now();
    let load = Load::start(port, "/", 300);
    std::thread::sleep(Duration::from_secs(1));
    let run = |args: &[&str]| {
        let (code, out, err) = client(&[args, &["--bus", &bus.address]].concat());
        assert_eq!(code, 0, "{args:?}: {err}\n{}", m.log());
        std::path::PathBuf::from(out.trim())
    };
    let profile = run(&["diagnose", "prof", "0", "--cpu-profile", "5"]);
    let stack = run(&["diagnose", "prof", "1", "--stack"]);
    let took = began.elapsed();
    let (ok, failed, errors, _) = load.finish();
    assert!(ok > 0, "no request answered");
    assert_eq!(
        failed,
        0,
        "{failed} failed ({errors}) of {ok}:\n{}",
        m.log()
    );
    let p: serde_json::Value = serde_json::from_slice(&std::fs::read(&profile).unwrap()).unwrap();
    assert!(
        p["nodes"].as_array().is_some_and(|n| !n.is_empty()),
        "no nodes in {}",
        profile.display()
    );
    assert!(p["samples"].is_array(), "no samples");
    let span = p["endTime"].as_f64().unwrap() - p["startTime"].as_f64().unwrap();
    assert!(span >= 4.5e6, "a profile of {span} µs, not 5 s");
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&stack).unwrap()).unwrap();
    assert!(s["frames"].is_array(), "{s}");
    // Both files are in the state directory, both workers replaced.
    for f in [&profile, &stack] {
        assert!(
            f.starts_with(state.join("nodeherd-diagnostics")),
            "{}",
            f.display()
        );
    }
    let after = instances_answering(port, 2, T);
    assert_eq!(after.len(), 2, "{}", m.log());
    assert!(
        after.values().all(|p| !before.values().any(|b| b == p)),
        "{before:?} -> {after:?}"
    );
    eprintln!("cpu profile and stack: {ok} requests answered in {took:?}, 0 failed");
}

/// `--then resume`: no replacement; the other worker carries the load
/// while this one is captured, then the same process serves again.
#[test]
fn a_heap_snapshot_then_resume_keeps_the_worker_and_fails_no_request() {
    let dir = tempdir::Dir::new("diag-resume");
    let state = dir.path.join("state");
    std::fs::create_dir(&state).unwrap();
    let cfg = one_app(
        &dir,
        "back",
        "heavy.js",
        r#""instances":2,"kill_timeout":3000,"listen_timeout":20000,"max_event_loop_delay":500,"env":{"HEAVY_MIB":"64"}"#,
    );
    let bus = DbusDaemon::start();
    let m = start_with_state(&cfg, &state, Some(&bus));
    let port = m.port();
    let before = instances_answering(port, 2, T);
    assert_eq!(before.len(), 2, "{}", m.log());
    let load = Load::start(port, "/", 300);
    std::thread::sleep(Duration::from_secs(1));
    let (code, out, err) = client(&[
        "diagnose",
        "back",
        "1",
        "--heap-snapshot",
        "--then",
        "resume",
        "--bus",
        &bus.address,
    ]);
    assert_eq!(code, 0, "{err}\n{}", m.log());
    let path = std::path::PathBuf::from(out.trim());
    let snap: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).expect("the snapshot is JSON");
    assert!(snap["snapshot"]["meta"].is_object(), "no snapshot.meta");
    // The same two processes serve again, worker 1 among them.
    let after = instances_answering(port, 2, T);
    assert_eq!(after, before, "{}", m.log());
    std::thread::sleep(Duration::from_secs(1));
    let (ok, failed, errors, slowest) = load.finish();
    assert!(ok > 0, "no request answered");
    assert_eq!(
        failed,
        0,
        "{failed} failed ({errors}) of {ok}:\n{}",
        m.log()
    );
    assert!(!m.log().contains("hung"), "{}", m.log());
    // No connection was steered or handed to it while it was captured.
    assert!(slowest < 2.0, "a request took {slowest} s");
    eprintln!("heap snapshot, then resume: {ok} requests answered, 0 failed, slowest {slowest} s");
}

/// Another local user reaches the bus, but may not take a worker out of
/// rotation nor read its heap.
#[test]
fn an_unprivileged_caller_is_refused_and_nothing_happens() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempdir::Dir::new("diag-deny");
    let state = dir.path.join("state");
    std::fs::create_dir(&state).unwrap();
    let cfg = one_app(
        &dir,
        "deny",
        "heavy.js",
        r#""instances":2,"env":{"HEAVY_MIB":"4"}"#,
    );
    let bus = DbusDaemon::start();
    // The bus is open to every local user, as the system bus is.
    let sock = bus.address.trim_start_matches("unix:path=").to_string();
    let sock_dir = std::path::Path::new(&sock).parent().unwrap();
    std::fs::set_permissions(sock_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let m = start_with_state(&cfg, &state, Some(&bus));
    let port = m.port();
    let before = instances_answering(port, 2, T);
    assert_eq!(before.len(), 2, "{}", m.log());
    for what in [
        &["--heap-snapshot"][..],
        &["--stack"],
        &["--cpu-profile", "1"],
    ] {
        let out = Command::new(BIN)
            .args(
                [
                    &["diagnose", "deny", "0"][..],
                    what,
                    &["--bus", &bus.address],
                ]
                .concat(),
            )
            .uid(65534)
            .gid(65534)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{what:?}: {err}");
        assert!(err.contains("org.nodeherd.restart"), "{err}");
    }
    assert!(!m.log().contains("diagnose worker"), "{}", m.log());
    assert_eq!(
        instances_answering(port, 2, T),
        before,
        "a worker was touched"
    );
    // Root's mistakes are refused as bad usage, before anything is done.
    for (args, says) in [
        (&["diagnose", "deny", "9", "--stack"][..], "no worker 9"),
        (
            &["diagnose", "deny", "0", "--cpu-profile", "0"],
            "between 1 and 600",
        ),
        (
            &["diagnose", "deny", "0", "--stack", "--then", "later"],
            "`replace` (the worker is stopped once captured) or `resume`",
        ),
    ] {
        let (code, _, err) = client(&[args, &["--bus", &bus.address]].concat());
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert!(!m.log().contains("diagnose worker"), "{}", m.log());
    // Nothing but the release history (kept there too) was written.
    let written: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("history-"))
        .collect();
    assert!(written.is_empty(), "written: {written:?}");
}
