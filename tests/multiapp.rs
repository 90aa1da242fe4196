//! `nodeherd run` of an ecosystem file with several apps (issue 30): a
//! manager for each, against the real binary, real node workers and a
//! private dbus-daemon. Every client runs with an `XDG_RUNTIME_DIR` and a
//! `TMPDIR` of the test's own, so other suites' managers are never reached.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

/// A host of the test's own: runtime and temporary directories.
struct Host {
    rt: tempdir::Dir,
    tmp: tempdir::Dir,
    dir: tempdir::Dir,
}

impl Host {
    fn new(tag: &str) -> Host {
        let (rt, tmp) = runtime_and_tmp(tag);
        Host {
            rt,
            tmp,
            dir: tempdir::Dir::new(tag),
        }
    }

    /// `nodeherd ARGS` on this host, in a process group of its own (so a
    /// test can send it a terminal's Ctrl-C: SIGINT to the whole group).
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .stdin(Stdio::null())
            .env("XDG_RUNTIME_DIR", &self.rt.path)
            .env("TMPDIR", &self.tmp.path)
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("JOURNAL_STREAM")
            .process_group(0);
        c
    }

    fn client(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.cmd(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// Two apps in one file, two workers each: `api` listens on its own
    /// port (`PORT`, as a PM2 app does), `web` on the `listen` address.
    fn two_apps(&self, api_port: u16) -> String {
        let eco = serde_json::json!({"apps": [
            {"name": "api", "script": app("own_port.js"), "instances": 2,
             "env": {"PORT": api_port.to_string()}},
            {"name": "web", "script": app("env.js"), "instances": 2,
             "listen": "127.0.0.1:0", "env": {"LINGER_MS": "300"}},
        ]});
        path_str(&self.dir.write("ecosystem.json", &eco.to_string()))
    }
}

/// The port app `name` logged it bound.
fn port_of(m: &Manager, name: &str) -> u16 {
    let needle = format!("nodeherd[{name}]: socket: ");
    let mut port = None;
    wait_until(T, || {
        port = m
            .log()
            .lines()
            .filter_map(|l| l.split_once(&needle).map(|(_, r)| r.to_string()))
            .filter_map(|r| {
                r.split_whitespace()
                    .nth(1)?
                    .rsplit_once(':')?
                    .1
                    .parse()
                    .ok()
            })
            .next();
        port.is_some()
    });
    port.unwrap_or_else(|| panic!("{name} logged no socket:\n{}", m.log()))
}

/// Processes this test started that its `Manager` would not end: each
/// killed by its pid when dropped.
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            if pid_alive(*p) {
                kill(*p, libc::SIGKILL);
            }
        }
    }
}

/// Every worker of every manager the herd process `pid` started.
fn all_workers(pid: i32) -> Vec<i32> {
    children(pid).into_iter().flat_map(children).collect()
}

/// Both apps up and answering on every worker; returns (managers, workers).
fn both_serving(host: &Host, m: &Manager, bus: &DbusDaemon, api_port: u16) -> (Vec<i32>, Vec<i32>) {
    for name in ["api", "web"] {
        assert!(
            m.wait_log(&format!("nodeherd[{name}]: 2/2 workers ready"), T),
            "{}",
            m.log()
        );
    }
    assert_eq!(instances_answering(api_port, 2, T).len(), 2, "{}", m.log());
    assert_eq!(
        instances_answering(port_of(m, "web"), 2, T).len(),
        2,
        "{}",
        m.log()
    );
    let managers = children(m.pid());
    assert_eq!(managers.len(), 2, "a manager per app: {managers:?}");
    // Each answers for itself, under its own name, from its own process.
    for name in ["api", "web"] {
        assert!(
            bus.wait_name(&format!("org.nodeherd.{name}"), T),
            "{}",
            m.log()
        );
        let (code, out, err) = host.client(&["status", name, "--bus", &bus.address, "--json"]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["name"], name, "{v}");
        let pid = v["manager_pid"].as_i64().unwrap() as i32;
        assert!(
            managers.contains(&pid),
            "{name}: pid {pid} not one of {managers:?}"
        );
        assert_eq!(children(pid).len(), 2, "{name}'s workers");
    }
    let workers = all_workers(m.pid());
    assert_eq!(workers.len(), 4, "{workers:?}");
    (managers, workers)
}

#[test]
fn a_file_of_two_apps_runs_both_and_one_ctrl_c_stops_both_gracefully() {
    let host = Host::new("herd-ctrlc");
    let bus = DbusDaemon::start();
    let api_port = free_port();
    let file = host.two_apps(api_port);
    let mut m = spawn_collecting(host.cmd(&["run", &file, "--bus", &bus.address]));
    let (managers, workers) = both_serving(&host, &m, &bus, api_port);

    // One app's manager re-executed in place stays this process's child.
    let (code, _, err) = host.client(&["reexec", "api", "--bus", &bus.address]);
    assert_eq!(code, 0, "{err}");
    assert!(
        m.wait_log("nodeherd[api]: re-executed in", T),
        "{}",
        m.log()
    );
    assert_eq!(children(m.pid()), managers, "the same managers");
    assert_eq!(all_workers(m.pid()), workers, "the same workers");

    // A terminal's Ctrl-C reaches the whole group: the herd process, each
    // manager and each worker. One stop, graceful: every worker drains.
    kill(-m.pid(), libc::SIGINT);
    let st = m.wait_exit(T).expect("every app stopped");
    let log = m.log();
    assert_eq!(st.code(), Some(0), "{log}");
    assert!(!log.contains("killing every worker"), "{log}");
    assert!(!log.contains("SIGKILL"), "{log}");
    for p in managers.iter().chain(&workers) {
        assert!(!pid_alive(*p), "{p} outlived the stop");
    }
    assert!(
        log.contains("api: its manager exited with status 0"),
        "{log}"
    );
    assert!(
        log.contains("web: its manager exited with status 0"),
        "{log}"
    );
}

#[test]
fn signals_to_the_file_s_process_reach_every_app_and_stop_ends_one_alone() {
    let host = Host::new("herd-term");
    let bus = DbusDaemon::start();
    let api_port = free_port();
    let file = host.two_apps(api_port);
    let mut m = spawn_collecting(host.cmd(&["run", &file, "--bus", &bus.address]));
    let (_, old_workers) = both_serving(&host, &m, &bus, api_port);

    // SIGHUP (as `systemctl reload` sends) reloads every app.
    m.signal(libc::SIGHUP);
    for name in ["api", "web"] {
        assert!(
            m.wait_log(&format!("nodeherd[{name}]: reload finished: 2/2"), T),
            "{}",
            m.log()
        );
    }
    let workers = all_workers(m.pid());
    assert!(
        workers.iter().all(|w| !old_workers.contains(w)),
        "{workers:?} {old_workers:?}"
    );

    // `nodeherd stop api` ends api alone: web keeps serving.
    let (code, _, err) = host.client(&["stop", "api", "--bus", &bus.address]);
    assert_eq!(code, 0, "{err}");
    assert!(
        m.wait_log(
            "api: its manager exited with status 0; still running: web",
            T
        ),
        "{}",
        m.log()
    );
    let web = port_of(&m, "web");
    assert_eq!(instances_answering(web, 2, T).len(), 2, "{}", m.log());

    // SIGTERM to this process alone (systemd's or kill's): forwarded.
    m.signal(libc::SIGTERM);
    let st = m.wait_exit(T).expect("web stopped");
    let log = m.log();
    assert_eq!(st.code(), Some(0), "{log}");
    assert!(log.contains("nodeherd[web]: stopping 2 worker(s)"), "{log}");
    assert!(!log.contains("SIGKILL"), "{log}");
    for w in workers {
        assert!(!pid_alive(w), "worker {w} outlived the stop");
    }
}

#[test]
fn one_app_that_fails_stops_the_others_and_the_exit_status_says_so() {
    let host = Host::new("herd-fail");
    // web's address is taken: its manager cannot bind it (exit 1).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let eco = serde_json::json!({"apps": [
        {"name": "api", "script": app("env.js"), "instances": 1, "listen": "127.0.0.1:0"},
        {"name": "web", "script": app("env.js"), "instances": 1,
         "listen": format!("127.0.0.1:{taken_port}")},
    ]});
    let file = path_str(&host.dir.write("ecosystem.json", &eco.to_string()));
    let mut m = spawn_collecting(host.cmd(&["run", &file, "--no-bus"]));
    let st = m.wait_exit(T).expect("the herd gave up");
    let log = m.log();
    assert_eq!(st.code(), Some(1), "{log}");
    assert!(
        log.contains("web: its manager failed (exit status 1)"),
        "{log}"
    );
    assert!(
        log.contains("web: its manager failed (exit status 1): stopping the others (api)")
            && log.contains("api: its manager exited with status 0"),
        "{log}"
    );
    assert!(children(m.pid()).is_empty());
    drop(taken);
}

#[test]
fn flags_for_one_app_are_refused_and_only_and_start_keep_working() {
    let host = Host::new("herd-flags");
    let api_port = free_port();
    let file = host.two_apps(api_port);
    let run = |args: &[&str]| {
        let mut m = spawn_collecting(host.cmd(args));
        let code = m.wait_exit(T).and_then(|s| s.code());
        (code, m.log())
    };
    for (flag, value) in [
        ("--name", "x"),
        ("--listen", "127.0.0.1:0"),
        ("--metrics", "127.0.0.1:0"),
        ("--bus-name", "org.nodeherd.x"),
    ] {
        let (code, log) = run(&["run", &file, flag, value, "--no-bus"]);
        assert_eq!(code, Some(2), "{flag}: {log}");
        assert!(
            log.contains(&format!(
                "{flag} is for one app, and the file has 2 apps (api, web)"
            )) && log.contains("--only NAME"),
            "{flag}: {log}"
        );
        assert!(!log.contains("workers ready"), "{log}");
    }
    // A Type=notify unit waits for one READY=1: refused, saying why.
    let mut c = host.cmd(&["run", &file, "--no-bus"]);
    c.env("NOTIFY_SOCKET", host.dir.path.join("no-notify"));
    let mut m = spawn_collecting(c);
    let code = m.wait_exit(T).and_then(|s| s.code());
    assert_eq!(code, Some(2), "{}", m.log());
    assert!(m.log().contains("nodeherd install FILE"), "{}", m.log());
    // An app of the file without a name cannot be picked by --only.
    let eco = serde_json::json!({"apps": [
        {"name": "api", "script": app("env.js")},
        {"script": app("env.js")},
    ]});
    let nameless = path_str(&host.dir.write("nameless.json", &eco.to_string()));
    let (code, log) = run(&["run", &nameless, "--no-bus"]);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("apps[1].name"), "{log}");

    // --only still runs one app, in this very process.
    let m = spawn_collecting(host.cmd(&["run", &file, "--only", "web", "--no-bus"]));
    assert!(
        m.wait_log("nodeherd[web]: 2/2 workers ready", T),
        "{}",
        m.log()
    );
    assert!(!m.log().contains("nodeherd[api]"), "{}", m.log());
    assert_eq!(children(m.pid()).len(), 2, "web's own workers");
    let (code, out, err) = host.client(&["status", "web", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["manager_pid"], m.pid(), "{v}");
    drop(m);

    // `start FILE` (no systemd here: in the foreground) starts them all.
    let mut m = spawn_collecting(host.cmd(&["start", &file, "--no-bus"]));
    for name in ["api", "web"] {
        assert!(
            m.wait_log(&format!("nodeherd[{name}]: 2/2 workers ready"), T),
            "{}",
            m.log()
        );
    }
    assert!(
        m.log()
            .contains("starting api, web in the foreground (systemd does not run here)"),
        "{}",
        m.log()
    );
    assert_eq!(instances_answering(api_port, 2, T).len(), 2);
    m.signal(libc::SIGTERM);
    assert_eq!(
        m.wait_exit(T).and_then(|s| s.code()),
        Some(0),
        "{}",
        m.log()
    );
}

#[test]
fn the_managers_stop_when_the_file_s_process_is_killed() {
    let host = Host::new("herd-kill");
    let bus = DbusDaemon::start();
    let api_port = free_port();
    let file = host.two_apps(api_port);
    let mut m = spawn_collecting(host.cmd(&["run", &file, "--bus", &bus.address]));
    let (managers, workers) = both_serving(&host, &m, &bus, api_port);
    // Killed whatever the outcome, should they outlive the test.
    let _guard = KillOnDrop(managers.iter().chain(&workers).copied().collect());
    // SIGKILL leaves it no time to forward anything: each manager gets
    // SIGTERM from the kernel (its parent-death signal) and stops.
    m.signal(libc::SIGKILL);
    let _ = m.wait_exit(T);
    assert!(
        wait_until(T, || managers
            .iter()
            .chain(&workers)
            .all(|p| !pid_alive(*p))),
        "{}",
        m.log()
    );
    assert!(
        m.log().contains("nodeherd[web]: stopping 2 worker(s)"),
        "{}",
        m.log()
    );
}
