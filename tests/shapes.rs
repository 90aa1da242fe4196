//! Apps of every shape, unmodified (issue 11): more ports than the one
//! handed over, a forked helper with a port of its own, a UDP client, an
//! app that runs `cluster` itself, `npm start`, a shell script that execs
//! node. Real node workers; the full framework matrix (Express, Fastify,
//! Next.js, socket.io, ... on Node 20/22/24) is tests/compat/.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

/// GET / over a unix socket: the JSON body.
fn get_unix(path: &Path) -> std::io::Result<serde_json::Value> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).map_err(std::io::Error::other)
}

/// The sockets `pid` holds without O_NONBLOCK, as "fd -> socket:[inode]".
fn blocking_sockets(pid: i32) -> Vec<String> {
    let mut blocking = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let target = target.display().to_string();
        if !target.starts_with("socket:") {
            continue;
        }
        let fd = e.file_name().to_string_lossy().to_string();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        if flags & libc::O_NONBLOCK as u32 == 0 {
            blocking.push(format!("{fd} -> {target}"));
        }
    }
    blocking
}

#[test]
fn more_ports_are_shared_across_workers_and_reloads() {
    let dir = tempdir::Dir::new("ports");
    let metrics = path_str(&dir.path);
    let m = run_app(&app("ports.js"), &["-i", "2"], &[("METRICS_DIR", &metrics)]);
    let port = m.port();
    let before = instances_answering(port, 2, T);
    assert_eq!(before.len(), 2, "{}", m.log());
    // The admin port (listen(0)): one port, bound once by the manager,
    // answered by both workers.
    let admin = get_json(port).unwrap()["admin_port"].as_u64().unwrap() as u16;
    assert_ne!(admin, port);
    let on_admin = instances_answering(admin, 2, T);
    assert_eq!(on_admin, before, "both workers serve the shared admin port");
    // Each instance's own metrics socket.
    for i in ["0", "1"] {
        let sock = dir.path.join(format!("metrics.{i}"));
        assert!(wait_until(T, || sock.exists()), "{}", m.log());
        let v = get_unix(&sock).unwrap();
        assert_eq!(
            (v["instance"].as_str(), v["via"].as_str()),
            (Some(i), Some("metrics"))
        );
    }
    // A blocking listening socket stops a worker's event loop in accept()
    // once another worker took the connection: every socket is non-blocking
    // (read once every socket is served: one handed over a moment ago is
    // not yet the worker's).
    for pid in m.workers() {
        assert_eq!(blocking_sockets(pid), Vec::<String>::new(), "worker {pid}");
    }
    assert!(
        m.log().contains("shared socket: tcp [::]:")
            || m.log().contains("shared socket: tcp 0.0.0.0:"),
        "{}",
        m.log()
    );
    // A reload: new workers on the same shared sockets, nothing lost.
    let old_workers = m.workers();
    m.signal(libc::SIGHUP);
    assert!(m.wait_log("reload finished: 2/2", T), "{}", m.log());
    assert!(wait_until(T, || m
        .workers()
        .iter()
        .all(|p| !old_workers.contains(p))));
    let after = instances_answering(admin, 2, T);
    assert_eq!(after.len(), 2);
    assert!(after.values().all(|p| !before.values().any(|b| b == p)));
    assert_eq!(
        get_json(port).unwrap()["admin_port"].as_u64(),
        Some(admin as u64)
    );
    for i in ["0", "1"] {
        let v = get_unix(&dir.path.join(format!("metrics.{i}"))).unwrap();
        assert_eq!(v["pid"].as_u64(), after.get(i).copied(), "metrics.{i}");
    }
}

#[test]
fn a_bind_the_manager_cannot_make_reaches_the_app_as_nodes_own_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port().to_string();
    let m = run_app(
        &app("ports.js"),
        &["-i", "2"],
        &[("TAKEN_PORT", &taken_port)],
    );
    let port = m.port();
    let want = format!(
        "taken port: EADDRINUSE listen listen EADDRINUSE: address already in use 127.0.0.1:{taken_port}"
    );
    assert!(m.wait_log(&want, T), "{}", m.log());
    // The app handled it; its main port serves on, the manager is unharmed.
    assert_eq!(instances_answering(port, 2, T).len(), 2, "{}", m.log());
}

#[test]
fn a_forked_helper_is_left_alone() {
    let mut m = run_app(&app("fork_helper.js"), &["-i", "2"], &[]);
    let port = m.port();
    let mut helpers: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    wait_until(T, || {
        if let Ok(v) = get_json(port)
            && !v["helper"].is_null()
        {
            helpers.insert(
                v["instance"].as_str().unwrap().to_string(),
                v["helper"].clone(),
            );
        }
        helpers.len() == 2
    });
    assert_eq!(helpers.len(), 2, "{}", m.log());
    let mut helper_pids = Vec::new();
    for (i, h) in &helpers {
        assert_eq!(
            h["execArgv"],
            serde_json::json!([]),
            "{i}: no preload in the helper"
        );
        assert_eq!(
            h["nodeherd_vars"],
            serde_json::json!([]),
            "{i}: no nodeherd variable"
        );
        assert_ne!(
            h["listen_pid"].as_str(),
            Some(h["pid"].to_string().as_str()),
            "{i}: LISTEN_PID is not the helper's"
        );
        // Its own port, served by itself.
        let hp = h["port"].as_u64().unwrap() as u16;
        assert_eq!(get_json(hp).unwrap()["helper"], h["pid"]);
        helper_pids.push(h["pid"].as_i64().unwrap() as i32);
    }
    // Stopping ends the helpers with their workers.
    m.signal(libc::SIGTERM);
    assert_eq!(
        m.wait_exit(T).and_then(|s| s.code()),
        Some(0),
        "{}",
        m.log()
    );
    for p in helper_pids {
        assert!(
            wait_until(T, || !pid_alive(p)),
            "helper {p} outlived the manager"
        );
    }
}

#[test]
fn a_udp_client_keeps_its_own_socket() {
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port().to_string();
    echo.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let echo_thread = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        }
    });
    let m = run_app(
        &app("udp_client.js"),
        &["-i", "2"],
        &[("ECHO_PORT", &echo_port)],
    );
    let port = m.port();
    let seen = instances_answering(port, 2, T);
    assert_eq!(seen.len(), 2, "{}", m.log());
    let v = get_json(port).unwrap();
    assert_eq!(v["echo"], format!("ping {}", v["pid"]), "{}", m.log());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    echo_thread.join().unwrap();
}

#[test]
fn an_app_that_runs_cluster_itself_serves_and_reloads() {
    // A generous kill_timeout: the old primaries must leave by themselves.
    let m = run_app(
        &app("cluster_app.js"),
        &["-i", "2", "--kill-timeout", "15000"],
        &[],
    );
    let port = m.port();
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    let before = instances_answering(port, 2, T);
    assert_eq!(before.len(), 2, "{}", m.log());
    let managers_children = m.workers();
    // The answers come from the app's own cluster workers, children of ours.
    let primaries: Vec<i64> = (0..20)
        .filter_map(|_| get_json(port).ok())
        .map(|v| v["primary"].as_i64().unwrap())
        .collect();
    assert!(
        primaries
            .iter()
            .all(|p| managers_children.contains(&(*p as i32))),
        "{primaries:?} vs {managers_children:?}"
    );
    m.signal(libc::SIGHUP);
    assert!(m.wait_log("reload finished: 2/2", T), "{}", m.log());
    // The old primaries drain and exit by themselves (no SIGKILL needed).
    assert!(
        wait_until(T, || m
            .workers()
            .iter()
            .all(|p| !managers_children.contains(p))),
        "{}",
        m.log()
    );
    assert!(
        !m.log().contains("did not stop within kill_timeout"),
        "{}",
        m.log()
    );
    assert_eq!(instances_answering(port, 2, T).len(), 2);
}

#[test]
fn npm_start_runs_the_node_command_of_the_package_script() {
    let dir = tempdir::Dir::new("npm");
    std::fs::copy(app("env.js"), dir.path.join("server.js")).unwrap();
    dir.write(
        "package.json",
        r#"{"name":"x","scripts":{"start":"MARKER=from-package node --no-deprecation server.js","bad":"npm run build && node server.js"}}"#,
    );
    let eco = dir.write(
        "eco.json",
        r#"{"apps":[{"name":"npmapp","script":"npm","args":"start","instances":2}]}"#,
    );
    let m = start_config(&eco, None);
    let port = m.port();
    assert_eq!(instances_answering(port, 2, T).len(), 2, "{}", m.log());
    let v = get_json(port).unwrap();
    assert_eq!(v["marker"], "from-package");
    assert!(
        m.log()
            .contains("node --import=<nodeherd-preload> --no-deprecation ")
            && m.log().contains("server.js"),
        "node itself runs the app, no npm between: {}",
        m.log()
    );
    drop(m);
    let bad = dir.write(
        "bad.json",
        r#"{"apps":[{"name":"npmapp","script":"npm","args":"run bad"}]}"#,
    );
    let (code, err) = run_to_end(&["run", &path_str(&bad), "--no-bus"], T);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("write script: 'FILE'"), "{err}");
}

#[test]
fn a_shell_script_that_execs_node_gets_the_sockets() {
    let dir = tempdir::Dir::new("shell");
    let script = dir.write(
        "run.sh",
        &format!("#!/bin/sh\nexec node {}\n", app("env.js").display()),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let m = run_app(&script, &["-i", "2", "--interpreter", "none"], &[]);
    let port = m.port();
    let seen = instances_answering(port, 2, T);
    assert_eq!(seen.len(), 2, "{}", m.log());
    let v = get_json(port).unwrap();
    assert_eq!(
        v["listen_pid"].as_str(),
        Some(v["pid"].to_string().as_str())
    );
    // The preload took itself out of NODE_OPTIONS: the app's children won't load it.
    assert_eq!(v["node_options"], "");
}
