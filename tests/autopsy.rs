//! Hang autopsies with real Node workers: a worker the watchdog finds hung
//! leaves its JavaScript stack (in the log and as a file) before it is
//! killed, and an inspector that never answers delays nothing.

mod common;

use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);

/// The files under the state directory's diagnostics directory.
fn kept(state: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(state.join("nodeherd-diagnostics"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn a_hung_worker_leaves_the_stack_of_its_endless_loop() {
    let dir = tempdir::Dir::new("autopsy");
    let state = dir.path.join("state");
    std::fs::create_dir(&state).unwrap();
    let cfg = one_app(
        &dir,
        "spin",
        "spinner.js",
        r#""instances":2,"max_event_loop_delay":2500,"kill_timeout":3000"#,
    );
    let bus = DbusDaemon::start();
    let m = start_with_state(&cfg, &state, Some(&bus));
    let port = m.port();
    let before = instances_answering(port, 2, T);
    assert_eq!(before.len(), 2, "{}", m.log());
    let status = || client(&["status", "spin", "--bus", &bus.address]);
    let (code, out, err) = status();
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("last worker stack"), "{out}");
    std::thread::spawn(move || {
        let _ = get(port, "/spin");
    });
    assert!(m.wait_log("hang stack: at spinForever", T), "{}", m.log());
    let log = m.log();
    let line = log
        .lines()
        .find(|l| l.contains("hang stack: at spinForever"))
        .unwrap()
        .to_string();
    let script = app("spinner.js");
    let want = format!("at spinForever ({}:10:", script.display());
    assert!(line.contains(&want), "{want} not in: {line}");
    // Its caller too, the request handler.
    assert!(line.contains(" < at "), "{line}");
    // The file the line names (on a loaded machine another worker may be
    // slow past max_event_loop_delay and leave one too).
    let files = kept(&state);
    let file = files
        .iter()
        .find(|f| line.contains(&path_str(f)))
        .unwrap_or_else(|| panic!("{files:?} not in {line}"))
        .clone();
    let name = file.file_name().unwrap().to_str().unwrap().to_string();
    assert!(name.starts_with("hang-stack-"), "{name}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(&want), "{text}");
    // `nodeherd status` says when and where.
    let mut out = String::new();
    assert!(
        wait_until(T, || {
            out = status().1;
            out.contains("last worker stack taken: ")
        }),
        "{out}"
    );
    assert!(out.contains("hang-stack-"), "{out}");
    // Then it is replaced as before: both slots answer again.
    assert!(m.wait_log("reload finished: 1/1", T), "{}", m.log());
    let after = instances_answering(port, 2, T);
    assert_eq!(after.len(), 2, "{}", m.log());
}

#[test]
fn an_inspector_that_never_answers_delays_no_replacement() {
    let dir = tempdir::Dir::new("autopsy-deaf");
    let state = dir.path.join("state");
    std::fs::create_dir(&state).unwrap();
    let cfg = one_app(
        &dir,
        "deafspin",
        "spinner.js",
        r#""instances":2,"max_event_loop_delay":2500,"kill_timeout":2000"#,
    );
    let m = start_with_state(&cfg, &state, None);
    let port = m.port();
    let before = instances_answering(port, 2, T);
    assert_eq!(before.len(), 2, "{}", m.log());
    // Blocked in native code (a synchronous child process): V8 runs no
    // interrupt there, so Debugger.pause is never handled.
    std::thread::spawn(move || {
        let _ = get(port, "/sleep");
    });
    assert!(m.wait_log("has not answered for 2500 ms", T), "{}", m.log());
    let decided = Instant::now();
    let hung = m
        .log()
        .lines()
        .find(|l| l.contains("has not answered for"))
        .and_then(|l| l.split("(pid ").nth(1))
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse::<i32>().ok())
        .expect("the hung worker's pid");
    // The autopsy gives up within kill_timeout of the decision...
    assert!(
        m.wait_log(
            "no JavaScript stack taken: no answer within 2000 ms",
            Duration::from_millis(2000 + 1500)
        ),
        "{}",
        m.log()
    );
    // ...and the stuck worker is gone within kill_timeout of its stop
    // (the replacement's start comes first): never later for the autopsy.
    assert!(
        wait_until(T, || !pid_alive(hung)),
        "pid {hung} still alive:\n{}",
        m.log()
    );
    let took = decided.elapsed();
    assert!(
        took < Duration::from_millis(2000 + 4000),
        "replaced {took:?} after the decision:\n{}",
        m.log()
    );
    assert!(kept(&state).is_empty(), "{:?}", kept(&state));
    let after = instances_answering(port, 2, T);
    assert_eq!(after.len(), 2, "{}", m.log());
}

/// A worker's user may own the state directory: a symlink it plants where
/// the diagnostics go must not make the manager write (or prune) elsewhere.
#[test]
fn a_symlink_planted_for_the_diagnostics_directory_is_not_followed() {
    let dir = tempdir::Dir::new("autopsy-plant");
    let state = dir.path.join("state");
    let elsewhere = dir.path.join("elsewhere");
    std::fs::create_dir(&state).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    // Old files there that a prune would remove.
    for i in 0..25 {
        std::fs::write(elsewhere.join(format!("hang-stack-{i:02}.txt")), "keep me").unwrap();
    }
    std::os::unix::fs::symlink(&elsewhere, state.join("nodeherd-diagnostics")).unwrap();
    let cfg = one_app(
        &dir,
        "plant",
        "spinner.js",
        r#""instances":2,"max_event_loop_delay":2500,"kill_timeout":3000"#,
    );
    let m = start_with_state(&cfg, &state, None);
    let port = m.port();
    assert_eq!(instances_answering(port, 2, T).len(), 2, "{}", m.log());
    std::thread::spawn(move || {
        let _ = get(port, "/spin");
    });
    assert!(m.wait_log("hang stack: at spinForever", T), "{}", m.log());
    let log = m.log();
    let line = log
        .lines()
        .find(|l| l.contains("hang stack: at spinForever"))
        .unwrap();
    // Still logged, with the function, but not kept.
    assert!(line.contains("at spinForever ("), "{line}");
    assert!(line.contains("not kept: "), "{line}");
    let there: Vec<_> = std::fs::read_dir(&elsewhere).unwrap().collect();
    assert_eq!(there.len(), 25, "written or pruned through the symlink");
}

#[test]
fn with_autopsy_on_memory_a_worker_replaced_for_memory_leaves_its_stack() {
    let dir = tempdir::Dir::new("autopsy-mem");
    let state = dir.path.join("state");
    std::fs::create_dir(&state).unwrap();
    let cfg = one_app(
        &dir,
        "leakystack",
        "leaky.js",
        r#""instances":1,"max_memory_restart":"40M","autopsy_on_memory":true"#,
    );
    let m = start_with_state(&cfg, &state, None);
    assert!(m.wait_log("memory stack: ", T), "{}", m.log());
    assert!(m.wait_log("reload finished: 1/1", T), "{}", m.log());
    let files = kept(&state);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0]
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("memory-stack-"),
        "{files:?}"
    );
}

/// A re-exec hands each worker's helper channel over: a worker started by
/// the old program still leaves its stack when the new one finds it hung.
#[test]
fn a_worker_started_before_a_reexec_still_leaves_its_stack() {
    let dir = tempdir::Dir::new("autopsy-rx");
    let state = dir.path.join("state");
    let rt = dir.path.join("rt");
    let bin = dir.path.join("bin/nodeherd");
    for d in [&state, &rt, &bin.parent().unwrap().to_path_buf()] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::copy(BIN, &bin).unwrap();
    let cfg = one_app(
        &dir,
        "spinrx",
        "spinner.js",
        r#""instances":2,"max_event_loop_delay":2500,"kill_timeout":3000"#,
    );
    let (rt, state_s) = (path_str(&rt), path_str(&state));
    let no_bus = format!("unix:path={rt}/no-bus-here");
    let mut cmd = std::process::Command::new(&bin);
    cmd.args([
        "run",
        &path_str(&cfg),
        "--listen",
        "127.0.0.1:0",
        "--bus",
        &no_bus,
    ])
    .env_remove("NOTIFY_SOCKET")
    .env_remove("LISTEN_FDS")
    .env_remove("LISTEN_PID")
    .env_remove("RUNTIME_DIRECTORY")
    .env("XDG_RUNTIME_DIR", &rt)
    .env("STATE_DIRECTORY", &state_s)
    .stdin(std::process::Stdio::null());
    let m = spawn_collecting(cmd);
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    let port = m.port();
    let before = instances_answering(port, 2, T);
    assert_eq!(before.len(), 2, "{}", m.log());
    let (code, err) = client_in(&rt, &["reexec", "spinrx", "--bus", &no_bus]);
    assert_eq!(code, 0, "{err}\n{}", m.log());
    // The same workers, now the new program's.
    assert_eq!(instances_answering(port, 2, T), before, "{}", m.log());
    std::thread::spawn(move || {
        let _ = get(port, "/spin");
    });
    assert!(m.wait_log("hang stack: at spinForever", T), "{}", m.log());
    let log = m.log();
    let line = log
        .lines()
        .find(|l| l.contains("hang stack: at spinForever"))
        .unwrap();
    assert!(line.contains("at spinForever ("), "{line}");
}

/// `autopsy: false`: no helper thread (no channel, no variable naming it),
/// a hang still replaces the worker, blind, and `diagnose` is refused.
#[test]
fn with_autopsy_off_there_is_no_helper_and_a_hang_is_still_replaced() {
    let dir = tempdir::Dir::new("autopsy-off");
    let state = dir.path.join("state");
    std::fs::create_dir(&state).unwrap();
    let cfg = one_app(
        &dir,
        "blind",
        "spinner.js",
        r#""instances":2,"max_event_loop_delay":2500,"kill_timeout":2000,"autopsy":false"#,
    );
    let bus = DbusDaemon::start();
    let m = start_with_state(&cfg, &state, Some(&bus));
    let port = m.port();
    let before = instances_answering(port, 2, T);
    assert_eq!(before.len(), 2, "{}", m.log());
    for pid in before.values() {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        assert!(environ.contains("NODE_CHANNEL_FD="), "not a worker: {pid}");
        assert!(
            !environ.contains("NODEHERD_HELPER_FD="),
            "worker {pid} was given a helper channel"
        );
    }
    let (code, _, err) = client(&["diagnose", "blind", "0", "--stack", "--bus", &bus.address]);
    assert_ne!(code, 0);
    assert!(err.contains("not available for this app"), "{err}");
    std::thread::spawn(move || {
        let _ = get(port, "/spin");
    });
    assert!(m.wait_log("autopsy off", T), "{}", m.log());
    assert!(m.wait_log("reload finished: 1/1", T), "{}", m.log());
    assert!(!m.log().contains("hang stack: "), "{}", m.log());
    assert!(kept(&state).is_empty(), "{:?}", kept(&state));
    let after = instances_answering(port, 2, T);
    assert_eq!(after.len(), 2, "{}", m.log());
    assert_ne!(after, before, "the hung worker was not replaced");
}

/// The helper channel is the worker's alone: a program the app runs does
/// not inherit it (a child that did could ask for stacks and heap
/// snapshots of its parent, or forge answers).
#[test]
fn a_program_the_app_runs_does_not_hold_the_helper_channel() {
    let dir = tempdir::Dir::new("autopsy-child");
    let cfg = one_app(&dir, "kids", "child_fds.js", r#""instances":1"#);
    let m = start(
        &[
            "run",
            &path_str(&cfg),
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[],
    );
    let port = m.port();
    let mut body = String::new();
    assert!(
        wait_until(T, || {
            body = get(port, "/").map(|r| r.1).unwrap_or_default();
            body.contains("\"held\"")
        }),
        "{}",
        m.log()
    );
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pid = answer["pid"].as_u64().unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    let fd = environ
        .split('\0')
        .find_map(|v| v.strip_prefix("NODEHERD_HELPER_FD="))
        .expect("the worker has a helper channel");
    let helper = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
    let helper = helper.to_str().unwrap();
    assert!(helper.starts_with("socket:["), "{helper}");
    let held: Vec<&str> = answer["held"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(!held.is_empty(), "{body}");
    assert!(
        !held.contains(&helper),
        "the app's child holds the helper channel {helper}: {held:?}"
    );
}

/// A worker may ask for a socket back by fd number (as its preload does
/// after `diagnose --then resume`): it gets only the one it was handed at
/// that fd, never another of the manager's descriptors.
#[test]
fn a_worker_asking_for_sockets_by_fd_gets_only_its_own() {
    let dir = tempdir::Dir::new("autopsy-again");
    let cfg = one_app(&dir, "prober", "again_prober.js", r#""instances":1"#);
    let m = start(
        &[
            "run",
            &path_str(&cfg),
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[],
    );
    let port = m.port();
    assert!(
        wait_until(T, || get(port, "/").is_ok_and(|r| r.0 == 200)),
        "{}",
        m.log()
    );
    let (code, body) = get(port, "/probe").unwrap();
    assert_eq!(code, 200, "{body}");
    let got: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(got["3"], "socket", "its own socket comes back: {body}");
    for fd in ["0", "2", "4", "5", "9", "1000", "2147483647"] {
        assert_eq!(got[fd], "error", "fd {fd}: {body}\n{}", m.log());
    }
    // It still serves.
    assert!(get(port, "/").is_ok_and(|r| r.0 == 200), "{}", m.log());
}
