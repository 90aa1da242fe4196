//! The release history and rollbacks with real node workers (issue 26):
//! a release directory `current -> releases/N` resolved per generation, so
//! a rollback under load serves the old release's files with no failed
//! request although `current` moved; the history kept across a restart and
//! a re-exec; a hostile history file refused without harm; a caller who may
//! not reload may not roll back; a reload from Node 22 to Node 24 judged by
//! a canary. A private dbus-daemon, the real CLI.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

/// A release: its server says which release it is, the file it runs, its
/// directory and its Node version.
fn release(dir: &tempdir::Dir, n: u32) -> PathBuf {
    let at = dir.path.join("releases").join(n.to_string());
    std::fs::create_dir_all(&at).unwrap();
    std::fs::write(
        at.join("server.js"),
        format!(
            "require('http').createServer((q, s) => s.end(JSON.stringify({{release: '{n}', \
             file: __filename, cwd: process.cwd(), node: process.version, pid: process.pid, \
             instance: process.env.NODE_APP_INSTANCE}}))).listen(8000);\n"
        ),
    )
    .unwrap();
    at
}

/// Point `current` at release `n`, atomically, as a deploy tool does.
fn point_current(dir: &tempdir::Dir, n: u32) {
    let tmp = dir.path.join("current.new");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("releases/{n}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.path.join("current")).unwrap();
}

/// An app run from `current`, with `fields` more.
fn config(dir: &tempdir::Dir, name: &str, fields: &str) -> PathBuf {
    let cwd = path_str(&dir.path.join("current"));
    dir.write(
        "ecosystem.config.json",
        &format!(
            r#"{{"apps":[{{"name":"{name}","script":"server.js","cwd":"{cwd}","instances":2{fields}}}]}}"#
        ),
    )
}

fn state_dir(dir: &tempdir::Dir) -> PathBuf {
    let state = dir.path.join("state");
    if !state.exists() {
        std::fs::create_dir(&state).unwrap();
    }
    state
}

fn cli(bus: &DbusDaemon, args: &[&str]) -> (i32, String, String) {
    client(&[args, &["--bus", &bus.address]].concat())
}

fn json(bus: &DbusDaemon, args: &[&str]) -> serde_json::Value {
    let (code, out, err) = cli(bus, args);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Every worker answering (by instance), once each of `n` answers.
fn answers(port: u16, n: usize) -> Vec<serde_json::Value> {
    let mut seen = std::collections::BTreeMap::new();
    wait_until(T, || {
        if let Ok(v) = get_json(port) {
            seen.insert(v["pid"].as_u64().unwrap_or(0), v);
        }
        seen.len() >= n
    });
    seen.into_values().collect()
}

/// Every ready worker of `status --json` is of `generation`.
fn all_of(bus: &DbusDaemon, app: &str, generation: u64) -> bool {
    let s = json(bus, &["status", app, "--json"]);
    let ws = s["workers"].as_array().unwrap();
    ws.len() == 2 && ws.iter().all(|w| w["generation"] == generation)
}

#[test]
fn a_rollback_under_load_serves_the_old_releases_files_although_current_moved() {
    let dir = tempdir::Dir::new("rollback");
    let (r1, r2) = (release(&dir, 1), release(&dir, 2));
    point_current(&dir, 1);
    let cfg = config(&dir, "hist", "");
    let state = state_dir(&dir);
    let bus = DbusDaemon::start();
    let m = start_with_state(&cfg, &state, Some(&bus));
    let port = m.port();
    assert!(bus.wait_name("org.nodeherd.hist", T), "{}", m.log());
    for a in answers(port, 2) {
        assert_eq!(a["release"], "1", "{a}");
        // The worker runs the resolved release, not `current`.
        assert_eq!(a["cwd"], path_str(&r1), "{a}");
        assert_eq!(a["file"], path_str(&r1.join("server.js")), "{a}");
    }
    // Deploy release 2.
    point_current(&dir, 2);
    let (code, _, err) = cli(&bus, &["reload", "hist"]);
    assert_eq!(code, 0, "{err}\n{}", m.log());
    for a in answers(port, 2) {
        assert_eq!(a["release"], "2", "{a}");
    }
    let first = json(&bus, &["history", "hist", "--json"]);
    let gens: Vec<u64> = first
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(gens.len(), 2, "{first}");
    let (g1, g2) = (gens[0], gens[1]);
    assert!(wait_until(T, || all_of(&bus, "hist", g2)), "{}", m.log());
    // Roll back to the one before under load, `current` still on 2.
    let load = GetLoad::start(port, 4);
    assert!(wait_until(T, || load.answered() > 50));
    let t0 = std::time::Instant::now();
    let (code, out, err) = cli(&bus, &["rollback", "hist"]);
    let took = t0.elapsed();
    assert_eq!(code, 0, "{out}{err}\n{}", m.log());
    std::thread::sleep(Duration::from_millis(300));
    let (answered, errors) = load.finish();
    eprintln!(
        "rollback under load: {} ms, {} requests answered, {} failed",
        took.as_millis(),
        answered.len(),
        errors.len()
    );
    assert!(errors.is_empty(), "failed requests: {errors:?}");
    assert!(answered.len() > 100, "{}", answered.len());
    assert!(answered.iter().all(|(c, _)| *c == 200));
    for a in answers(port, 2) {
        assert_eq!(a["release"], "1", "{a}");
        assert_eq!(a["cwd"], path_str(&r1), "{a}");
        assert_eq!(a["file"], path_str(&r1.join("server.js")), "{a}");
    }
    assert_eq!(
        std::fs::read_link(dir.path.join("current")).unwrap(),
        Path::new("releases/2")
    );
    // The history says so: 1 and 2 served, the rollback serves as a new
    // generation that went back to 1; every worker is of it.
    let h = json(&bus, &["history", "hist", "--json"]);
    let h = h.as_array().unwrap();
    assert_eq!(h.len(), 3, "{h:?}");
    assert_eq!(h[0]["outcome"], "served");
    assert_eq!(h[1]["outcome"], "served");
    assert_eq!(h[1]["script"], path_str(&r2.join("server.js")));
    assert_eq!(h[2]["outcome"], "serving");
    assert_eq!(h[2]["rollback_of"], g1);
    assert_eq!(h[2]["script"], path_str(&r1.join("server.js")));
    assert!(h[2]["node_version"].as_str().unwrap().starts_with('v'));
    let g3 = h[2]["generation"].as_u64().unwrap();
    assert!(wait_until(T, || all_of(&bus, "hist", g3)), "{}", m.log());
    let (_, text, _) = cli(&bus, &["history", "hist"]);
    assert!(text.contains(&format!("(rollback to {g1})")), "{text}");
    // A generation whose files are gone: refused, nothing changes.
    let pids: Vec<u64> = answers(port, 2)
        .iter()
        .map(|a| a["pid"].as_u64().unwrap())
        .collect();
    std::fs::remove_dir_all(&r2).unwrap();
    let (code, out, err) = cli(&bus, &["rollback", "hist", &g2.to_string()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!("generation {g2}'s directory")) && err.contains("is gone"),
        "{err}"
    );
    let after: Vec<u64> = answers(port, 2)
        .iter()
        .map(|a| a["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(after, pids, "a worker was touched");
    // Nor one never kept.
    let (code, _, err) = cli(&bus, &["rollback", "hist", "999"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not in the release history"), "{err}");
}

#[test]
fn the_history_survives_a_reexec_and_a_restart_and_a_restart_is_not_a_release() {
    let dir = tempdir::Dir::new("history-keep");
    release(&dir, 1);
    release(&dir, 2);
    point_current(&dir, 1);
    let cfg = config(&dir, "keep", "");
    let state = state_dir(&dir);
    let bus = DbusDaemon::start();
    let mut m = start_with_state(&cfg, &state, Some(&bus));
    assert!(bus.wait_name("org.nodeherd.keep", T), "{}", m.log());
    point_current(&dir, 2);
    let (code, _, err) = cli(&bus, &["reload", "keep"]);
    assert_eq!(code, 0, "{err}");
    let before = json(&bus, &["history", "keep", "--json"]);
    assert_eq!(before.as_array().unwrap().len(), 2, "{before}");
    let serving = before[1]["generation"].as_u64().unwrap();
    // A re-exec: the same history, the same generation serving.
    let (code, _, err) = cli(&bus, &["reexec", "keep"]);
    assert_eq!(code, 0, "{err}\n{}", m.log());
    assert!(wait_until(T, || {
        serde_json::from_str::<serde_json::Value>(&cli(&bus, &["history", "keep", "--json"]).1)
            .is_ok_and(|h| h == before)
    }));
    assert!(all_of(&bus, "keep", serving));
    // A restart of the same configuration: the same generation again.
    m.signal(libc::SIGTERM);
    assert!(m.wait_exit(T).is_some(), "{}", m.log());
    let m = start_with_state(&cfg, &state, Some(&bus));
    let port = m.port();
    assert!(
        wait_until(T, || all_of(&bus, "keep", serving)),
        "{}",
        m.log()
    );
    assert_eq!(json(&bus, &["history", "keep", "--json"]), before);
    // And a rollback after it goes back to what served before the restart.
    let (code, _, err) = cli(&bus, &["rollback", "keep"]);
    assert_eq!(code, 0, "{err}\n{}", m.log());
    for a in answers(port, 2) {
        assert_eq!(a["release"], "1", "{a}");
    }
}

/// A history file someone else put there: refused with a journal line,
/// the app starts and serves, and the next write replaces the entry itself
/// (never what a symlink points at).
#[test]
fn a_hostile_history_file_is_refused_without_harm() {
    let dir = tempdir::Dir::new("history-hostile");
    release(&dir, 1);
    point_current(&dir, 1);
    let cfg = config(&dir, "hostile", "");
    let state = state_dir(&dir);
    let file = state.join("history-hostile.json");
    let elsewhere = dir.path.join("elsewhere.json");
    let kept_text = r#"{"format":1,"entries":[]}"#;
    let huge = vec![b' '; 5 << 20];
    type Plant<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, Plant)> = vec![
        (
            "more than a history ever is",
            Box::new(|| {
                let _ = std::fs::remove_file(&file);
                std::fs::write(&file, &huge).unwrap()
            }),
        ),
        (
            "is not a nodeherd history",
            Box::new(|| {
                let _ = std::fs::remove_file(&file);
                std::fs::write(&file, b"\x00\xffnot json{{{").unwrap()
            }),
        ),
        (
            "is a symlink: refused",
            Box::new(|| {
                let _ = std::fs::remove_file(&file);
                std::fs::write(&elsewhere, kept_text).unwrap();
                std::os::unix::fs::symlink(&elsewhere, &file).unwrap();
            }),
        ),
        (
            // The valid file the run before wrote, its number pushed to
            // where the next one would overflow.
            "out of range or twice",
            Box::new(|| {
                let mut doc: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
                doc["entries"][0]["generation"] = u64::MAX.into();
                std::fs::write(&file, doc.to_string()).unwrap();
            }),
        ),
        (
            "is owned by uid 65534",
            Box::new(|| {
                let _ = std::fs::remove_file(&file);
                std::fs::write(&file, kept_text).unwrap();
                std::os::unix::fs::chown(&file, Some(65534), Some(65534)).unwrap();
            }),
        ),
    ];
    let bus = DbusDaemon::start();
    for (says, plant) in cases {
        plant();
        let mut m = start_with_state(&cfg, &state, Some(&bus));
        let port = m.port();
        assert!(
            m.wait_log("release history: ", T) && m.wait_log(says, T),
            "{says}: {}",
            m.log()
        );
        assert_eq!(answers(port, 2).len(), 2, "{says}: {}", m.log());
        let h = json(&bus, &["history", "hostile", "--json"]);
        assert_eq!(h.as_array().unwrap().len(), 1, "{says}: {h}");
        // Replaced by the manager's own small regular file.
        assert!(
            wait_until(T, || {
                std::fs::symlink_metadata(&file).is_ok_and(|md| {
                    use std::os::unix::fs::MetadataExt;
                    md.is_file() && md.len() < 1 << 20 && md.uid() == 0
                })
            }),
            "{says}"
        );
        m.signal(libc::SIGTERM);
        assert!(m.wait_exit(T).is_some(), "{}", m.log());
    }
    assert_eq!(
        std::fs::read_to_string(&elsewhere).unwrap(),
        kept_text,
        "written through the symlink"
    );
}

/// Rollback is a reload: a caller who may not reload is refused before
/// anything is read or started.
#[test]
fn a_caller_who_may_not_reload_may_not_roll_back() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempdir::Dir::new("rollback-deny");
    release(&dir, 1);
    release(&dir, 2);
    point_current(&dir, 1);
    let cfg = config(&dir, "deny", "");
    let state = state_dir(&dir);
    let bus = DbusDaemon::start();
    let sock = bus.address.trim_start_matches("unix:path=").to_string();
    let sock_dir = Path::new(&sock).parent().unwrap();
    std::fs::set_permissions(sock_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let m = start_with_state(&cfg, &state, Some(&bus));
    let port = m.port();
    assert!(bus.wait_name("org.nodeherd.deny", T), "{}", m.log());
    point_current(&dir, 2);
    let (code, _, err) = cli(&bus, &["reload", "deny"]);
    assert_eq!(code, 0, "{err}");
    let pids: Vec<u64> = answers(port, 2)
        .iter()
        .map(|a| a["pid"].as_u64().unwrap())
        .collect();
    for args in [&["rollback", "deny"][..], &["rollback", "deny", "1"]] {
        let out = std::process::Command::new(BIN)
            .args([args, &["--bus", &bus.address]].concat())
            .uid(65534)
            .gid(65534)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {err}");
        assert!(err.contains("org.nodeherd.reload"), "{err}");
    }
    assert!(!m.log().contains("rollback:"), "{}", m.log());
    let after: Vec<u64> = answers(port, 2)
        .iter()
        .map(|a| a["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(after, pids, "a worker was touched");
    // Reading the history is open, and it carries no environment.
    let out = std::process::Command::new(BIN)
        .args(["history", "deny", "--json", "--bus", &bus.address])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("\"env\""));
}

/// The compat suite's Node 22 and 24 (tests/compat/run.sh fetches them).
fn compat_nodes() -> Option<(PathBuf, PathBuf)> {
    let cache = std::env::var("NODEHERD_CI_CACHE").unwrap_or("/var/cache/nodeherd-ci".into());
    let mut found: Vec<PathBuf> = std::fs::read_dir(Path::new(&cache).join("compat-node"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.join("node_modules/node22/bin/node").is_file()
                && p.join("node_modules/node24/bin/node").is_file()
        })
        .collect();
    found.sort();
    let at = found.pop()?;
    Some((
        at.join("node_modules/node22/bin/node"),
        at.join("node_modules/node24/bin/node"),
    ))
}

/// Changing `interpreter` is a new generation like any other: the canary
/// runs Node 24 beside a Node 22 baseline, `status` shows both during the
/// soak, then every worker on 24.
#[test]
fn a_reload_from_node_22_to_24_is_judged_by_the_canary_and_status_shows_both() {
    let Some((node22, node24)) = compat_nodes() else {
        eprintln!(
            "skipped: no Node 22 and 24 under /var/cache/nodeherd-ci/compat-node (tests/compat/run.sh fetches them)"
        );
        return;
    };
    let dir = tempdir::Dir::new("node24");
    release(&dir, 1);
    point_current(&dir, 1);
    // Through a symlink, as a version manager's `current` would be.
    let bin = dir.path.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let node = bin.join("node");
    std::os::unix::fs::symlink(&node22, &node).unwrap();
    let canary = r#","reload_strategy":"canary","listen_timeout":10000,"canary":{"soak":"4s","min_requests":20,"max_soak":"30s"}"#;
    let cfg = config(
        &dir,
        "n24",
        &format!(r#","interpreter":"{}"{canary}"#, path_str(&node)),
    );
    let state = state_dir(&dir);
    let bus = DbusDaemon::start();
    let m = start_with_state(&cfg, &state, Some(&bus));
    let port = m.port();
    assert!(bus.wait_name("org.nodeherd.n24", T), "{}", m.log());
    for a in answers(port, 2) {
        assert!(a["node"].as_str().unwrap().starts_with("v22."), "{a}");
    }
    let nodes = |s: &serde_json::Value| -> Vec<String> {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|w| w["node"].as_str().map(str::to_string))
            .collect()
    };
    let s = json(&bus, &["status", "n24", "--json"]);
    assert!(nodes(&s).iter().all(|v| v.starts_with("v22.")), "{s}");
    // Move the symlink to 24 and reload, under load so the soak has requests.
    let tmp = bin.join("node.new");
    std::os::unix::fs::symlink(&node24, &tmp).unwrap();
    std::fs::rename(&tmp, &node).unwrap();
    let load = GetLoad::start(port, 4);
    let reload = {
        let address = bus.address.clone();
        std::thread::spawn(move || client(&["reload", "n24", "--bus", &address]))
    };
    let mut both = serde_json::Value::Null;
    let saw_both = wait_until(T, || {
        both = json(&bus, &["status", "n24", "--json"]);
        let n = nodes(&both);
        n.iter().any(|v| v.starts_with("v22.")) && n.iter().any(|v| v.starts_with("v24."))
    });
    assert!(saw_both, "{both}\n{}", m.log());
    let (code, out, err) = reload.join().unwrap();
    let (answered, errors) = load.finish();
    eprintln!(
        "Node 22 to 24 through the canary: {} requests answered, {} failed",
        answered.len(),
        errors.len()
    );
    assert_eq!(code, 0, "{out}{err}\n{}", m.log());
    assert!(errors.is_empty(), "failed requests: {errors:?}");
    assert!(answered.iter().all(|(c, _)| *c == 200));
    let mut last = serde_json::Value::Null;
    let all24 = wait_until(T, || {
        last = json(&bus, &["status", "n24", "--json"]);
        let n = nodes(&last);
        n.len() == 2 && n.iter().all(|v| v.starts_with("v24."))
    });
    assert!(all24, "{last}");
    for a in answers(port, 2) {
        assert!(a["node"].as_str().unwrap().starts_with("v24."), "{a}");
    }
    // The history names the resolved binaries, not the symlink.
    let h = json(&bus, &["history", "n24", "--json"]);
    let h = h.as_array().unwrap();
    assert_eq!(h.len(), 2, "{h:?}");
    assert_eq!(
        h[0]["interpreter"],
        path_str(&std::fs::canonicalize(&node22).unwrap())
    );
    assert_eq!(
        h[1]["interpreter"],
        path_str(&std::fs::canonicalize(&node24).unwrap())
    );
    assert!(h[1]["node_version"].as_str().unwrap().starts_with("v24."));
}

/// The workers' user may be able to replace the Node binary they run (a
/// version manager in their home): the manager asks it `--version` as that
/// user, never with its own (root's) rights.
#[test]
fn node_is_asked_its_version_as_the_workers_user_not_as_root() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir::Dir::new("version-user");
    let open = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    open(&dir.path, 0o755);
    release(&dir, 1);
    point_current(&dir, 1);
    let spy = dir.path.join("spy");
    std::fs::create_dir(&spy).unwrap();
    open(&spy, 0o777);
    let bin = dir.path.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let node = bin.join("node-spy");
    std::fs::write(
        &node,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --version ]; then id -u > {}/uid; echo v20.99.0; exit 0; fi\nexec /usr/bin/node \"$@\"\n",
            path_str(&spy)
        ),
    )
    .unwrap();
    open(&node, 0o755);
    let cfg = config(
        &dir,
        "asuser",
        &format!(r#","interpreter":"{}","uid":"nobody""#, path_str(&node)),
    );
    let state = state_dir(&dir);
    let bus = DbusDaemon::start();
    let m = start_with_state(&cfg, &state, Some(&bus));
    assert!(bus.wait_name("org.nodeherd.asuser", T), "{}", m.log());
    assert_eq!(answers(m.port(), 2).len(), 2, "{}", m.log());
    assert_eq!(
        std::fs::read_to_string(spy.join("uid")).unwrap().trim(),
        "65534",
        "--version ran with the manager's rights"
    );
    let h = json(&bus, &["history", "asuser", "--json"]);
    assert_eq!(h[0]["node_version"], "v20.99.0", "{h}");
}

/// The managers of a file of several apps share one state directory: each
/// app keeps a history of its own, across a restart of them all.
#[test]
fn the_apps_of_one_file_keep_a_history_each() {
    let dir = tempdir::Dir::new("history-herd");
    let r1 = release(&dir, 1);
    let r2 = release(&dir, 2);
    let eco = serde_json::json!({"apps": [
        {"name": "one", "script": r1.join("server.js"), "instances": 1, "listen": "127.0.0.1:0"},
        {"name": "two", "script": r2.join("server.js"), "instances": 1, "listen": "127.0.0.1:0"},
    ]});
    let file = path_str(&dir.write("ecosystem.json", &eco.to_string()));
    let state = state_dir(&dir);
    let bus = DbusDaemon::start();
    let history_of = |app: &str| -> Vec<serde_json::Value> {
        let (code, out, _) = cli(&bus, &["history", app, "--json"]);
        if code != 0 {
            return Vec::new();
        }
        serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    };
    for round in 0..2 {
        let mut m = start(
            &["run", &file, "--bus", &bus.address],
            &[("STATE_DIRECTORY", &path_str(&state))],
        );
        for (app, release) in [("one", &r1), ("two", &r2)] {
            let mut h = Vec::new();
            let one = wait_until(T, || {
                h = history_of(app);
                !h.is_empty()
            });
            assert!(one, "round {round}: {app}: {}", m.log());
            assert_eq!(h.len(), 1, "round {round}: {app}: {h:?}");
            assert_eq!(h[0]["script"], path_str(&release.join("server.js")));
            assert_eq!(h[0]["generation"], 1, "round {round}: {app}: {h:?}");
        }
        m.signal(libc::SIGTERM);
        assert!(m.wait_exit(T).is_some(), "{}", m.log());
    }
    assert!(state.join("history-one.json").is_file());
    assert!(state.join("history-two.json").is_file());
}
