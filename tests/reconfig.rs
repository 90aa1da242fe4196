//! A reload reads the configuration again (issue 12): what it can change
//! changes, a broken file fails it closed, a release switched by symlink
//! and a node newly on PATH are picked up. Real node workers, a private
//! real dbus-daemon, the real CLI client.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

/// Ask until every one of `n` instances has answered with `field` == `want`;
/// returns instance → pid of those answers.
fn all_answer(port: u16, n: usize, field: &str, want: &str) -> BTreeMap<String, u64> {
    let mut seen = BTreeMap::new();
    wait_until(T, || {
        if let Ok(v) = get_json(port)
            && v[field] == want
        {
            let inst = v["instance"].as_str().unwrap_or("?").to_string();
            seen.insert(inst, v["pid"].as_u64().unwrap_or(0));
        }
        seen.len() >= n
    });
    seen
}

/// `nodeherd reload APP`: (exit code, what it said: its answer on stdout,
/// or its error on stderr).
fn reload(bus: &DbusDaemon, app: &str) -> (i32, String) {
    let (code, out, err) = client(&["reload", app, "--bus", &bus.address]);
    (code, out + &err)
}

#[test]
fn a_reload_applies_the_edited_file_and_says_what_changed() {
    let dir = tempdir::Dir::new("reconf");
    let bus = DbusDaemon::start();
    let cfg = one_app(
        &dir,
        "api",
        "env.js",
        r#""instances":2,"env":{"MARKER":"one"}"#,
    );
    let m = start_config(&cfg, Some(&bus));
    let port = m.port();
    assert!(bus.wait_name("org.nodeherd.api", T), "{}", m.log());
    let before = all_answer(port, 2, "marker", "one");
    assert_eq!(before.len(), 2, "{}", m.log());

    one_app(
        &dir,
        "api",
        "env.js",
        r#""instances":3,"env":{"MARKER":"two","EXTRA":"x"}"#,
    );
    let (code, err) = reload(&bus, "api");
    assert_eq!(code, 0, "{err}\n{}", m.log());
    assert!(err.contains("env: EXTRA added, MARKER changed"), "{err}");
    assert!(err.contains("instances 2 → 3"), "{err}");
    assert!(
        m.log()
            .contains("configuration reloaded: env: EXTRA added, MARKER changed; instances 2 → 3"),
        "{}",
        m.log()
    );
    let after = all_answer(port, 3, "marker", "two");
    assert_eq!(after.len(), 3, "{after:?}\n{}", m.log());
    assert!(after.values().all(|p| !before.values().any(|b| b == p)));

    // SIGHUP takes the same path.
    one_app(
        &dir,
        "api",
        "env.js",
        r#""instances":3,"env":{"MARKER":"three"}"#,
    );
    m.signal(libc::SIGHUP);
    assert_eq!(all_answer(port, 3, "marker", "three").len(), 3);
}

#[test]
fn a_broken_or_missing_file_fails_the_reload_closed() {
    let dir = tempdir::Dir::new("broken");
    let bus = DbusDaemon::start();
    let cfg = one_app(&dir, "api", "env.js", r#""instances":2"#);
    let m = start_config(&cfg, Some(&bus));
    let port = m.port();
    assert!(bus.wait_name("org.nodeherd.api", T), "{}", m.log());
    let before = instances_answering(port, 2, T);
    assert_eq!(before.len(), 2);

    // A bad value: the error names the file, the app, the key and the value.
    one_app(&dir, "api", "env.js", r#""instances":"lots""#);
    let (code, err) = reload(&bus, "api");
    assert_eq!(code, 2, "{err}");
    for part in [
        path_str(&cfg),
        "app \"api\"".into(),
        "key `instances`".into(),
        "\"lots\"".into(),
    ] {
        assert!(err.contains(&part), "{part} missing from: {err}");
    }
    assert!(err.contains("nothing changed"), "{err}");
    let (code, _, err) = bus.busctl(&[
        "call",
        "org.nodeherd.api",
        "/org/nodeherd",
        "org.nodeherd.Manager1",
        "Reload",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("key `instances`"), "{err}");
    assert!(m.log().contains("reload refused"), "{}", m.log());

    // Not JSON at all, then no file.
    std::fs::write(&cfg, "{ not json").unwrap();
    let (code, err) = reload(&bus, "api");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not valid JSON"), "{err}");
    std::fs::remove_file(&cfg).unwrap();
    let (code, err) = reload(&bus, "api");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("does not exist"), "{err}");

    // Nothing was touched meanwhile: the same workers serve.
    assert_eq!(instances_answering(port, 2, T), before);
    assert!(!m.log().contains("reload begun"), "{}", m.log());

    // Mended, it goes through.
    one_app(&dir, "api", "env.js", r#""instances":2"#);
    let (code, err) = reload(&bus, "api");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("configuration unchanged"), "{err}");
}

#[test]
fn what_needs_a_restart_is_kept_and_named() {
    let dir = tempdir::Dir::new("restartonly");
    let cfg = one_app(
        &dir,
        "api",
        "env.js",
        r#""balance":"queue","listen":"127.0.0.1:0""#,
    );
    let m = start(&["run", &path_str(&cfg), "--no-bus"], &[]);
    let port = m.port();
    assert!(m.wait_log("1/1 workers ready", T), "{}", m.log());
    one_app(
        &dir,
        "api",
        "env.js",
        r#""balance":"reuseport","listen":"127.0.0.1:1""#,
    );
    m.signal(libc::SIGHUP);
    assert!(m.wait_log("reload finished", T), "{}", m.log());
    let log = m.log();
    assert!(
        log.contains(
            "listen changed in the configuration: only a restart of the service applies it"
        ),
        "{log}"
    );
    assert!(
        log.contains("balance changed in the configuration"),
        "{log}"
    );
    assert_eq!(get_json(port).unwrap()["instance"], "0");
}

#[test]
fn a_release_switched_by_symlink_is_served_after_a_reload() {
    let dir = tempdir::Dir::new("releases");
    for v in ["1", "2"] {
        let rel = dir.path.join("releases").join(v);
        std::fs::create_dir_all(&rel).unwrap();
        std::fs::write(
            rel.join("app.js"),
            format!(
                "require('http').createServer((q, s) => s.end(JSON.stringify({{version: '{v}', \
                 instance: process.env.NODE_APP_INSTANCE, pid: process.pid}}))).listen(8000);\n"
            ),
        )
        .unwrap();
    }
    let current = dir.path.join("current");
    std::os::unix::fs::symlink("releases/1", &current).unwrap();
    let cfg = dir.write(
        "site.json",
        r#"{"apps":[{"name":"site","script":"app.js","cwd":"current","instances":2}]}"#,
    );
    let m = start_config(&cfg, None);
    let port = m.port();
    let one = all_answer(port, 2, "version", "1");
    assert_eq!(one.len(), 2, "{}", m.log());
    // Switch atomically, as deploy tools do: a new link renamed over the old.
    let next = dir.path.join("current.next");
    std::os::unix::fs::symlink("releases/2", &next).unwrap();
    std::fs::rename(&next, &current).unwrap();
    m.signal(libc::SIGHUP);
    let two = all_answer(port, 2, "version", "2");
    assert_eq!(two.len(), 2, "{}", m.log());
    assert!(two.values().all(|p| !one.values().any(|b| b == p)));
}

#[test]
fn a_node_newly_on_path_is_used_by_the_next_reload() {
    let dir = tempdir::Dir::new("newnode");
    let bin = dir.path.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let m = start(
        &[
            "run",
            &path_str(&app("env.js")),
            "-i",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[("PATH", &path)],
    );
    let port = m.port();
    assert_eq!(instances_answering(port, 2, T).len(), 2, "{}", m.log());
    assert_eq!(get_json(port).unwrap()["marker"], serde_json::Value::Null);
    // A "newer node" appears earlier on PATH.
    let real = find_on_path("node");
    let wrapper = bin.join("node");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nMARKER=newer-node exec {} \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    m.signal(libc::SIGHUP);
    assert_eq!(
        all_answer(port, 2, "marker", "newer-node").len(),
        2,
        "{}",
        m.log()
    );
}

fn find_on_path(name: &str) -> std::path::PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join(name))
        .find(|p| Path::new(p).is_file())
        .expect("node on PATH")
}

/// A failed deploy stays closed: a reload to a release that crashes at
/// start fails, and a worker of the old release that dies afterwards comes
/// back on the old release, not the one that just failed (issue 24).
#[test]
fn after_a_failed_reload_a_killed_worker_comes_back_on_the_old_release() {
    let dir = tempdir::Dir::new("failclosed");
    for (v, code) in [("1", ""), ("2", "process.exit(3);\n")] {
        let rel = dir.path.join("releases").join(v);
        std::fs::create_dir_all(&rel).unwrap();
        std::fs::write(
            rel.join("app.js"),
            format!(
                "{code}require('http').createServer((q, s) => s.end(JSON.stringify({{version: '{v}', \
                 instance: process.env.NODE_APP_INSTANCE, pid: process.pid}}))).listen(8000);\n"
            ),
        )
        .unwrap();
    }
    let config = |cwd: &str, instances: u32| {
        dir.write(
            "shop.json",
            &format!(
                r#"{{"apps":[{{"name":"shop","script":"app.js","cwd":"releases/{cwd}","instances":{instances}}}]}}"#
            ),
        )
    };
    let cfg = config("1", 2);
    let bus = DbusDaemon::start();
    let m = start_config(&cfg, Some(&bus));
    let port = m.port();
    assert!(bus.wait_name("org.nodeherd.shop", T), "{}", m.log());
    let one = all_answer(port, 2, "version", "1");
    assert_eq!(one.len(), 2, "{}", m.log());

    // The deploy: release 2, and one worker fewer. It crashes at start.
    config("2", 1);
    let (code, err) = reload(&bus, "shop");
    assert_ne!(code, 0, "the reload fails: {err}");
    assert!(err.contains("reload failed"), "{err}");
    assert!(
        wait_until(T, || m.workers().len() == 2),
        "both old workers serve on: {:?}\n{}",
        m.workers(),
        m.log()
    );

    // Hours later, an old worker dies: it comes back on release 1.
    let victim = *one.get("1").expect("worker 1 answered");
    kill(victim as i32, libc::SIGKILL);
    let again = all_answer(port, 2, "version", "1");
    assert_eq!(again.len(), 2, "{}", m.log());
    assert_ne!(again["1"], victim, "slot 1 has a new worker");
    // And it stays up: nothing crash-loops, no slot errors.
    let pids = m.workers();
    let end = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < end {
        assert_eq!(get_json(port).unwrap()["version"], "1");
    }
    assert_eq!(m.workers(), pids, "{}", m.log());
    assert!(!m.log().contains("errored"), "{}", m.log());
}
