//! The core daemon against real node workers, real sockets and a real
//! notify socket (issue 2).

mod common;

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(15);

fn listen_arg(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// The inodes of the listening TCP sockets process `pid` holds.
fn listening_sockets(pid: i32) -> Vec<String> {
    let mut listening = std::collections::BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // st 0A is LISTEN; field 9 is the inode.
            if f.len() > 9 && f[3] == "0A" {
                listening.insert(f[9].to_string());
            }
        }
    }
    let mut held: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|t| {
                    let t = t.display().to_string();
                    Some(
                        t.strip_prefix("socket:[")?
                            .trim_end_matches(']')
                            .to_string(),
                    )
                })
                .filter(|ino| listening.contains(ino))
                .collect()
        })
        .unwrap_or_default();
    held.sort();
    held.dedup();
    held
}

#[test]
fn serves_from_every_worker_and_reports_to_systemd() {
    let notify = NotifySocket::new();
    let (k, v) = notify.env();
    let hello = repo().join("examples/hello/app.js");
    let mut m = start(
        &[
            "run",
            &path_str(&hello),
            "-i",
            "3",
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[(k, &v)],
    );
    let port = m.port();
    assert!(
        notify.wait_for("READY=1", T),
        "no READY=1; log:\n{}",
        m.log()
    );
    assert!(
        notify
            .all()
            .iter()
            .any(|s| s.contains("STATUS=3/3 workers ready")),
        "{:?}",
        notify.all()
    );
    let mut seen = std::collections::BTreeSet::new();
    assert!(wait_until(T, || {
        if let Ok((200, body)) = get(port, "/") {
            let w = body.split_whitespace().nth(3).unwrap_or("").to_string();
            seen.insert(w);
        }
        seen.len() == 3
    }));
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec!["0", "1", "2"]);
    let workers = m.workers();
    assert_eq!(workers.len(), 3, "{workers:?}");

    m.signal(libc::SIGTERM);
    let status = m.wait_exit(T).expect("manager exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "log:\n{}", m.log());
    assert!(notify.all().iter().any(|s| s.contains("STOPPING=1")));
    for w in workers {
        assert!(
            wait_until(T, || !pid_alive(w)),
            "worker {w} outlived the manager"
        );
    }
}

#[test]
fn socket_activation_hands_fds_over_like_systemd() {
    // systemd-socket-activate is systemd's own tool for this: it listens,
    // then execs the command with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES.
    let port = free_port();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args(["-l", &listen_arg(port), "--fdname=web"])
        // It passes only PATH, HOME, TERM and the variables named with -E.
        .args(["-E", "NODE_OPTIONS=--no-deprecation", BIN, "run"])
        .arg(app("env.js"))
        .args(["-i", "2", "--no-bus"])
        .env_remove("LISTEN_FDS")
        .env_remove("NOTIFY_SOCKET");
    let m = spawn_collecting(cmd);
    assert!(
        wait_until(T, || m.log().contains("Listening on")),
        "log:\n{}",
        m.log()
    );
    // The very first connection is what starts the manager, and it is answered.
    let first = get_json(port).expect("first request answered");
    assert_eq!(first["listen_fds"], "1");
    assert_eq!(first["listen_fdnames"], "web");
    assert_eq!(
        first["listen_pid"].as_str().unwrap(),
        first["pid"].to_string(),
        "LISTEN_PID is the worker's own pid"
    );
    assert!(
        m.log().contains("socket: tcp 127.0.0.1:"),
        "log:\n{}",
        m.log()
    );
    assert!(m.log().contains("(name \"web\")"));
    // The operator's NODE_OPTIONS reach the app as they were: the preload
    // rides on the command line, never in NODE_OPTIONS (where the app's own
    // children would inherit it).
    assert_eq!(first["node_options"], "--no-deprecation");
    let seen = instances_answering(port, 2, T);
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[test]
fn workers_get_only_the_sockets_and_their_channel() {
    let notify = NotifySocket::new();
    let (k, v) = notify.env();
    let dbus = DbusDaemon::start();
    let m = start(
        &[
            "run",
            &path_str(&app("env.js")),
            "-i",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--bus",
            &dbus.address,
        ],
        &[(k, &v)],
    );
    let port = m.port();
    assert!(m.wait_log("control plane on", T), "log:\n{}", m.log());
    assert!(notify.wait_for("READY=1", T));
    let body = get_json(port).unwrap();
    let socket_inodes = |pid: i32| -> std::collections::BTreeMap<String, String> {
        let mut out = std::collections::BTreeMap::new();
        for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
        {
            if let Ok(t) = std::fs::read_link(e.path()) {
                let t = t.display().to_string();
                if t.starts_with("socket:") {
                    out.insert(t, e.file_name().to_string_lossy().to_string());
                }
            }
        }
        out
    };
    let manager = socket_inodes(m.pid());
    let worker_pid = body["pid"].as_i64().unwrap() as i32;
    let worker = socket_inodes(worker_pid);
    let shared: Vec<(&String, &String)> = worker
        .iter()
        .filter(|(ino, _)| manager.contains_key(*ino))
        .collect();
    // Exactly one socket is shared with the manager: the listening socket at fd 3.
    assert_eq!(
        shared.len(),
        1,
        "worker shares {shared:?} with the manager ({manager:?})"
    );
    assert_eq!(shared[0].1, "3");
    // And the worker's fd 4 is its IPC channel (a socket the manager does not hold at fd level as the same inode).
    assert!(worker.values().any(|fd| fd == "4"), "{worker:?}");
}

#[test]
fn unmodified_apps_serve_on_the_inherited_socket() {
    ensure_npm_deps();
    for (script, via) in [
        ("express.js", "express"),
        ("listen0.js", "listen0"),
        ("listen_opts.js", "options"),
        ("esm.mjs", "esm"),
    ] {
        let m = start(
            &[
                "run",
                &path_str(&app(script)),
                "-i",
                "2",
                "--listen",
                "127.0.0.1:0",
                "--no-bus",
            ],
            &[],
        );
        let port = m.port();
        let seen = instances_answering(port, 2, T);
        assert_eq!(seen.len(), 2, "{script}: {seen:?}\nlog:\n{}", m.log());
        let v = get_json(port).unwrap();
        assert_eq!(v["via"], via);
        // Whatever port the app named, the worker listens on nothing but
        // the socket it inherited from the manager.
        let worker = v["pid"].as_i64().unwrap() as i32;
        let listening = listening_sockets(worker);
        assert_eq!(listening.len(), 1, "{script}: {listening:?}");
        assert!(
            listening_sockets(m.pid()).contains(&listening[0]),
            "{script}: the worker's listening socket is the manager's"
        );
        drop(m);
    }
}

#[test]
fn udp_apps_bind_the_inherited_datagram_socket() {
    let m = start(
        &[
            "run",
            &path_str(&app("udp.js")),
            "-i",
            "2",
            "--listen",
            "udp:127.0.0.1:0",
            "--no-bus",
        ],
        &[],
    );
    let port = m.port();
    assert!(m.wait_log("2/2 workers ready", T), "log:\n{}", m.log());
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut got = None;
    wait_until(T, || {
        let _ = c.send_to(b"ping", ("127.0.0.1", port));
        let mut buf = [0u8; 64];
        if let Ok(n) = c.recv(&mut buf) {
            got = Some(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        got.is_some()
    });
    let got = got.expect("an echo");
    assert!(got.ends_with(":ping"), "{got}");
}

/// The first thing a PM2 user types: `nodeherd run app.js -i 2` for an app
/// that listens on its own port, with no `--listen` and no socket from
/// systemd. The manager binds the port on the first worker's request and
/// every worker shares it; each answers and none exits (they did, with code
/// 0, while their listen waited for the manager's answer).
#[test]
fn an_app_on_its_own_port_serves_from_every_worker_without_listen() {
    let port = free_port().to_string();
    let script = path_str(&app("own_port.js"));
    let m = start(
        &["run", &script, "-i", "2", "--no-bus"],
        &[("PORT", port.as_str())],
    );
    let port: u16 = port.parse().unwrap();
    let seen = instances_answering(port, 2, T);
    assert_eq!(seen.len(), 2, "both workers answer: {seen:?}\n{}", m.log());
    // Served on for a while, by the same two workers.
    let first = m.workers();
    let mut answered = 0;
    let end = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < end {
        let v = get_json(port).expect("every request is answered");
        assert!(first.contains(&(v["pid"].as_u64().unwrap() as i32)));
        answered += 1;
    }
    assert!(answered > 10, "answered {answered}");
    assert_eq!(m.workers(), first, "no worker was replaced");
    assert!(!m.log().contains("exited unexpectedly"), "{}", m.log());
}

/// Without a socket handed over, a worker is ready once its own port
/// answers (so `start` returns when the app serves, not before), and an app
/// that never listens is ready at listen_timeout, its workers never killed
/// for it.
#[test]
fn without_listen_ready_means_the_port_answers_and_no_port_is_no_failure() {
    let port = free_port().to_string();
    let m = start(
        &[
            "run",
            &path_str(&app("own_port.js")),
            "-i",
            "2",
            "--listen-timeout",
            "20000",
            "--no-bus",
        ],
        &[("PORT", port.as_str()), ("LISTEN_AFTER_MS", "1500")],
    );
    let port: u16 = port.parse().unwrap();
    assert!(m.wait_log("2/2 workers ready", T), "log:\n{}", m.log());
    assert!(
        get_json(port).is_ok(),
        "ready before the port answers\n{}",
        m.log()
    );
    assert!(!m.log().contains("taken as ready"), "{}", m.log());
    drop(m);

    let m = start(
        &[
            "run",
            &path_str(&app("no_port.js")),
            "-i",
            "2",
            "--listen-timeout",
            "1000",
            "--no-bus",
        ],
        &[],
    );
    assert!(m.wait_log("2/2 workers ready", T), "log:\n{}", m.log());
    assert!(
        m.log()
            .contains("did not listen within listen_timeout (1000 ms): taken as ready"),
        "{}",
        m.log()
    );
    let first = m.workers();
    assert_eq!(first.len(), 2);
    // Past another listen_timeout: the same workers, none killed.
    assert!(
        !m.wait_log("killed", Duration::from_millis(1500)),
        "{}",
        m.log()
    );
    assert_eq!(m.workers(), first, "{}", m.log());
}

#[test]
fn a_killed_worker_comes_back_in_the_same_slot() {
    let m = start_app("env.js", 2);
    let port = m.port();
    let before = instances_answering(port, 2, T);
    assert_eq!(before.len(), 2);
    let victim = before["1"] as i32;
    kill(victim, libc::SIGKILL);
    assert!(
        m.wait_log("worker 1 exited unexpectedly", T),
        "log:\n{}",
        m.log()
    );
    let mut after = std::collections::BTreeMap::new();
    assert!(
        wait_until(T, || {
            after = instances_answering(port, 2, Duration::from_secs(2));
            after.get("1").is_some_and(|p| *p as i32 != victim)
        }),
        "slot 1 was not refilled: {after:?}\nlog:\n{}",
        m.log()
    );
    assert_eq!(after["0"], before["0"], "the other worker was untouched");
}

#[test]
fn workers_die_with_the_manager_even_on_kill_9() {
    let mut m = start_app("env.js", 2);
    let port = m.port();
    assert_eq!(instances_answering(port, 2, T).len(), 2);
    let workers = m.workers();
    assert_eq!(workers.len(), 2);
    m.signal(libc::SIGKILL);
    let _ = m.wait_exit(T);
    for w in workers {
        assert!(wait_until(T, || !pid_alive(w)), "worker {w} is an orphan");
    }
}

#[test]
fn a_crash_looping_slot_ends_errored_while_the_others_serve() {
    let dir = tempdir::Dir::new("crash");
    let cfg = one_app(
        &dir,
        "crashy",
        "crash_one.js",
        r#""instances":3,"max_restarts":3,"min_uptime":10000"#,
    );
    let notify = NotifySocket::new();
    let (k, v) = notify.env();
    let m = start(
        &[
            "run",
            &path_str(&cfg),
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[(k, &v)],
    );
    let port = m.port();
    assert!(m.wait_log("slot 1 errored", T), "log:\n{}", m.log());
    assert!(notify.wait_for("errored: slot 1", T), "{:?}", notify.all());
    assert!(
        notify.wait_for("READY=1", T),
        "systemd hears READY=1 even with a slot errored"
    );
    let seen = instances_answering(port, 2, T);
    assert_eq!(seen.keys().cloned().collect::<Vec<_>>(), vec!["0", "2"]);
    assert_eq!(
        m.log().matches("worker 1 started").count(),
        4,
        "1 start + max_restarts (3) restarts\n{}",
        m.log()
    );
}

#[test]
fn instance_var_and_env_name_follow_the_ecosystem_file() {
    let dir = tempdir::Dir::new("envs");
    let cfg = dir.write(
        "eco.config.js",
        &format!(
            "module.exports = {{ apps: [{{ name: 'other', script: 'x.js' }}, {{ name: 'api', script: '{}', instances: 2, instance_var: 'WORKER_ID', env: {{ MARKER: 'base', EXPECT_INSTANCE_VAR: 'WORKER_ID' }}, env_production: {{ MARKER: 'prod' }} }}] }};",
            app("env.js").display()
        ),
    );
    let m = start(
        &[
            "run",
            &path_str(&cfg),
            "--only",
            "api",
            "--env",
            "production",
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[],
    );
    let port = m.port();
    let seen = instances_answering(port, 2, T);
    assert_eq!(seen.len(), 2, "log:\n{}", m.log());
    let v = get_json(port).unwrap();
    assert_eq!(v["marker"], "prod");
    assert_eq!(
        v["node_app_instance"],
        serde_json::Value::Null,
        "renamed: only WORKER_ID is set"
    );
}

#[test]
fn wait_ready_waits_for_the_ready_message() {
    let notify = NotifySocket::new();
    let (k, v) = notify.env();
    let m = start(
        &[
            "run",
            &path_str(&app("wait_ready.js")),
            "-i",
            "2",
            "--wait-ready",
            // Past the default 3 s: node's start on a loaded machine is
            // not what this checks.
            "--listen-timeout",
            "30000",
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[(k, &v), ("WARMUP_MS", "500")],
    );
    let port = m.port();
    assert!(notify.wait_for("READY=1", T), "log:\n{}", m.log());
    assert!(m.wait_log("sent 'ready'", T), "log:\n{}", m.log());
    // By the time systemd hears READY=1, every worker is warm.
    for _ in 0..6 {
        assert_eq!(get_json(port).unwrap()["warm"], true);
    }
}

/// As PM2: `wait_ready` and no 'ready' by listen_timeout at start means
/// ready (with a warning), not a SIGKILL every listen_timeout; a reload
/// still waits for 'ready' and fails closed without it.
#[test]
fn wait_ready_without_ready_serves_after_listen_timeout_and_a_reload_fails_closed() {
    let notify = NotifySocket::new();
    let (k, v) = notify.env();
    let rt = tempdir::Dir::new("waitready");
    let rt_path = path_str(&rt.path);
    let no_bus = format!("unix:path={rt_path}/no-bus-here");
    let m = start(
        &[
            "run",
            &path_str(&app("wait_ready.js")),
            "-i",
            "2",
            "--wait-ready",
            "--listen-timeout",
            "400",
            "--listen",
            "127.0.0.1:0",
            "--bus",
            &no_bus,
        ],
        &[
            (k, &v),
            ("WARMUP_MS", "never"),
            ("XDG_RUNTIME_DIR", &rt_path),
        ],
    );
    let port = m.port();
    assert!(notify.wait_for("READY=1", T), "log:\n{}", m.log());
    // The manager's stderr is read by another thread than its
    // notifications: the line may come in a moment after READY=1.
    assert!(m.wait_log("taken as ready, as PM2 does", T), "{}", m.log());
    let pids = m.workers();
    assert_eq!(pids.len(), 2);
    // They serve on, past several listen_timeouts, and nobody kills them.
    let end = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < end {
        get_json(port).expect("served");
    }
    assert_eq!(m.workers(), pids, "{}", m.log());
    assert!(!m.log().contains("SIGKILL"), "{}", m.log());
    // A reload: the replacement never says 'ready', so the reload fails
    // and the same workers serve.
    let (code, err) = client_in(&rt_path, &["reload", "wait_ready", "--bus", &no_bus]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("listen_timeout"), "{err}");
    // The replacements are killed and reaped; the old two remain.
    assert!(wait_until(T, || m.workers() == pids), "{}", m.log());
    get_json(port).expect("the old workers serve");
}

#[test]
fn a_non_node_worker_reports_ready_on_the_notify_socket() {
    let m = start(
        &[
            "run",
            &path_str(&app("py_worker.py")),
            "--interpreter",
            "python3",
            "-i",
            "2",
            "--wait-ready",
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[],
    );
    let port = m.port();
    assert!(m.wait_log("2/2 workers ready", T), "log:\n{}", m.log());
    assert!(
        m.log().contains("READY=1"),
        "readiness came from the notify socket:\n{}",
        m.log()
    );
    // What it says with STATUS= is kept, not dropped.
    assert!(
        m.log().contains("worker 0 status: warming up"),
        "{}",
        m.log()
    );
    assert!(m.log().contains("worker 1 status: serving"), "{}", m.log());
    let v = get_json(port).unwrap();
    assert_eq!(v["via"], "python");
    assert_eq!(v["listen_pid"].as_str().unwrap(), v["pid"].to_string());
}

#[test]
fn worker_output_is_prefixed_whole_lines() {
    let m = start(
        &[
            "run",
            &path_str(&repo().join("examples/hello/app.js")),
            "-i",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[],
    );
    assert!(
        m.wait_log("[app:0] worker 0 listening", T),
        "log:\n{}",
        m.log()
    );
    assert!(m.wait_log("[app:1] worker 1 listening", T));
}

#[test]
fn a_worker_flushing_its_log_backlog_at_exit_is_not_killed_for_it() {
    // 3 MiB written at SIGINT, sleeping 100 ms whenever the pipe is full,
    // as pino does: through a 64 KiB pipe that takes about 5 s, beyond
    // kill_timeout (1.6 s); the manager widens a stopping worker's pipes.
    let m = start_app("flush_at_exit.js", 1);
    assert!(m.wait_log("1/1 workers ready", T), "{}", m.log());
    let pid = m.workers()[0];
    m.signal(libc::SIGHUP);
    assert!(m.wait_log("reload finished: 1/1", T), "{}", m.log());
    // The log without the backlog's lines.
    let log: Vec<String> = m
        .log()
        .lines()
        .filter(|l| !l.contains("xxxxxxxxxx"))
        .map(String::from)
        .collect();
    let log = log.join("\n");
    assert!(log.contains("] flushed 3145600 bytes"), "{log}");
    assert!(
        log.contains(&format!("worker 0 stopped (pid {pid}, exited with code 0)")),
        "{log}"
    );
}

#[test]
fn bad_configs_and_flags_fail_clearly_with_status_2() {
    let dir = tempdir::Dir::new("bad");
    let script = app("env.js").display().to_string();
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        (
            format!(r#"{{"apps":[{{"name":"a","script":"{script}","instances":"lots"}}]}}"#),
            vec![],
            "key `instances`",
        ),
        (
            format!(r#"{{"apps":[{{"name":"a","script":"{script}","instances":1e9}}]}}"#),
            vec![],
            "key `instances`",
        ),
        (
            format!(r#"{{"apps":[{{"name":"a","script":"{script}","kill_timeout":-5}}]}}"#),
            vec![],
            "key `kill_timeout`",
        ),
        (
            format!(r#"{{"apps":[{{"name":"a","script":"{script}","wait_ready":"maybe"}}]}}"#),
            vec![],
            "key `wait_ready`",
        ),
        (
            format!(r#"{{"apps":[{{"name":"a","script":"{script}","env":["A=1"]}}]}}"#),
            vec![],
            "key `env`",
        ),
        (
            r#"{"apps":[{"name":"a","script":"/nonexistent/app.js"}]}"#.to_string(),
            vec![],
            "does not exist",
        ),
        (
            format!(
                r#"{{"apps":[{{"name":"a","script":"{script}","interpreter":"/nonexistent/node"}}]}}"#
            ),
            vec![],
            "key `interpreter`",
        ),
        // Several apps run together (a manager each): each needs a name.
        (
            format!(r#"{{"apps":[{{"name":"a","script":"{script}"}},{{"script":"{script}"}}]}}"#),
            vec![],
            "apps[1].name",
        ),
        ("{ not json".to_string(), vec![], "not valid JSON"),
        (
            format!(r#"{{"apps":[{{"name":"a","script":"{script}"}}]}}"#),
            vec!["--env", "staging"],
            "env_staging",
        ),
    ];
    for (i, (text, extra, want)) in cases.iter().enumerate() {
        let cfg = dir.write(&format!("bad{i}.json"), text);
        let mut args = vec!["run", cfg.to_str().unwrap(), "--no-bus"];
        args.extend(extra);
        let (code, err) = run_to_end(&args, T);
        assert_eq!(code, Some(2), "case {i} ({want}): {err}");
        assert!(err.contains(want), "case {i}: wanted {want:?} in {err}");
        assert!(
            err.contains(cfg.to_str().unwrap()),
            "case {i}: the error names the file: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let (code, err) = run_to_end(&["run", &script, "-i", "lots", "--no-bus"], T);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--instances"), "{err}");
    let (code, err) = run_to_end(&["run", &script, "--listen", "nonsense", "--no-bus"], T);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("nonsense"), "{err}");
    let (code, err) = run_to_end(&["run", &script, "--kill-timeout", "soon"], T);
    assert_eq!(code, Some(2), "{err}");
    let (code, err) = run_to_end(&["run", &script, "--balance", "reuseport", "--no-bus"], T);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("balance reuseport needs listening sockets"),
        "{err}"
    );
    // Addresses that cannot be used as written are usage errors too.
    for bad in [
        vec!["--listen", "unix:"],
        vec![
            "--balance",
            "reuseport",
            "--listen",
            "unix:/tmp/nodeherd-never.sock",
        ],
    ] {
        let mut args = vec!["run", script.as_str(), "--no-bus"];
        args.extend(bad.iter().copied());
        let (code, err) = run_to_end(&args, T);
        assert_eq!(code, Some(2), "{bad:?}: {err}");
        assert!(err.contains("--listen unix:"), "{bad:?}: {err}");
    }
    // A bind the kernel refuses is a runtime failure: status 1.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, err) = run_to_end(&["run", &script, "--listen", &addr, "--no-bus"], T);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot listen on"), "{err}");
    // A config that loops forever is cut off, not waited on.
    let looping = dir.write("loop.config.js", "while (true) {}");
    let (code, err) = run_to_end(
        &["run", looping.to_str().unwrap(), "--no-bus"],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("longer than"), "{err}");
    let throwing = dir.write("throw.config.js", "throw new Error('boom in config')");
    let (code, err) = run_to_end(&["run", throwing.to_str().unwrap(), "--no-bus"], T);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("boom in config"), "{err}");
}

#[test]
fn unknown_keys_warn_by_name() {
    let dir = tempdir::Dir::new("unknown");
    let cfg = one_app(&dir, "u", "env.js", r#""colour":"blue","pid_file":"u.pid""#);
    let m = start_config(&cfg, None);
    assert!(m.wait_log("1/1 workers ready", T), "log:\n{}", m.log());
    assert!(m.log().contains("unknown key `colour`"), "{}", m.log());
    assert!(
        m.log().contains("key `pid_file` is a PM2 option"),
        "{}",
        m.log()
    );
}

#[test]
fn unix_stream_sockets_and_fd_aware_apps_work() {
    use std::io::{Read, Write};
    let dir = tempdir::Dir::new("unix");
    let path = dir.path.join("app.sock");
    let m = start(
        &[
            "run",
            &path_str(&app("unix.js")),
            "-i",
            "2",
            "--listen",
            &format!("unix:{}", path.display()),
            "--no-bus",
        ],
        &[],
    );
    assert!(m.wait_log("2/2 workers ready", T), "log:\n{}", m.log());
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.contains("\"via\":\"unix\""), "{out}");
    assert!(!std::path::Path::new("/tmp/this-app-never-binds-here.sock").exists());
    drop(m);

    // An app that listens on a port, with only a unix socket handed over
    // (the template's default, for a proxy): it serves there.
    let port_app = dir.path.join("port.sock");
    let m = start(
        &[
            "run",
            &path_str(&app("own_port.js")),
            "-i",
            "2",
            "--listen",
            &format!("unix:{}", port_app.display()),
            "--no-bus",
        ],
        &[("PORT", "1")],
    );
    assert!(m.wait_log("2/2 workers ready", T), "log:\n{}", m.log());
    let mut s = std::os::unix::net::UnixStream::connect(&port_app).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.contains("\"instance\""), "{out}");
    assert!(!m.log().contains("shared socket"), "{}", m.log());
    drop(m);

    // An app that takes fd 3 itself: ready when it listens (not killed at
    // listen_timeout), and served whatever the balancing.
    let m = start_app("listen_fd.js", 2);
    let port = m.port();
    assert!(m.wait_log("2/2 workers ready", T), "log:\n{}", m.log());
    assert!(m.log().contains("listening"), "{}", m.log());
    assert_eq!(
        instances_answering(port, 2, T).len(),
        2,
        "log:\n{}",
        m.log()
    );
    for _ in 0..50 {
        assert_eq!(get_json(port).unwrap()["via"], "fd3");
    }
    assert!(!m.log().contains("exited unexpectedly"), "{}", m.log());
}

#[test]
fn exponential_backoff_grows_between_restarts() {
    let dir = tempdir::Dir::new("backoff");
    let cfg = one_app(
        &dir,
        "b",
        "always_crash.js",
        // min_uptime well above node's start on a loaded machine, so no
        // slow start counts as a stable run and resets the count.
        r#""max_restarts":4,"exp_backoff_restart_delay":100,"min_uptime":20000"#,
    );
    let mut m = start_config(&cfg, None);
    let _ = m.wait_exit(T);
    let delays: Vec<u64> = m
        .log()
        .lines()
        .filter_map(|l| l.split("restarts in ").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(delays, vec![100, 150, 225, 337], "log:\n{}", m.log());
}
