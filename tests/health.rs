//! What a load balancer reads from a host (issue 29): `GET /health` on the
//! metrics endpoint and on `health:`, HAProxy's agent-check on
//! `health_agent:`, `nodeherd drain`/`undrain`, and a stop that drains
//! first (`drain_before_stop`), with real node workers, a real
//! dbus-daemon and real sockets; and what a hostile client, another user
//! or a worker can do to that answer.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(20);
const NOBODY: u32 = 65534;

/// The port a `KEY: 127.0.0.1:PORT` (or `KEY: http://127.0.0.1:PORT/`) log line names.
fn port_in_log(m: &Manager, key: &str) -> u16 {
    let mut port = None;
    wait_until(T, || {
        port = m
            .log()
            .lines()
            .filter_map(|l| l.split_once(&format!("{key}: ")))
            .filter_map(|(_, r)| {
                let r = r.trim_start_matches("http://");
                let (_, p) = r.split_once("127.0.0.1:")?;
                p.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
            })
            .next();
        port.is_some()
    });
    port.unwrap_or_else(|| panic!("no {key} line in:\n{}", m.log()))
}

/// `GET /health`: the status and the JSON body.
fn health(port: u16) -> (u16, serde_json::Value) {
    let (status, body) = get(port, "/health").unwrap_or_else(|e| panic!("/health: {e}"));
    let v = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    (status, v)
}

/// The agent-check line.
fn agent(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut line = String::new();
    s.read_to_string(&mut line).unwrap();
    line
}

struct Host {
    bus: DbusDaemon,
    m: Manager,
    _dir: tempdir::Dir,
    app_port: u16,
    health: u16,
    agent: u16,
    metrics: u16,
}

/// App `hello` (env.js, or `script`), 2 workers, with every health
/// listener on a free loopback port, on a private bus; `fields` adds keys.
fn host(script: &str, fields: &str) -> Host {
    let bus = DbusDaemon::start();
    let dir = tempdir::Dir::new("health");
    let mut keys = r#""instances":2,"health":"127.0.0.1:0","health_agent":"127.0.0.1:0","metrics":"127.0.0.1:0""#.to_string();
    if !fields.is_empty() {
        keys = format!("{keys},{fields}");
    }
    let cfg = one_app(&dir, "hello", script, &keys);
    let m = start_config(&cfg, Some(&bus));
    let app_port = m.port();
    let (health, agent, metrics) = (
        port_in_log(&m, "health"),
        port_in_log(&m, "health_agent"),
        port_in_log(&m, "metrics"),
    );
    assert!(bus.wait_name("org.nodeherd.hello", T), "{}", m.log());
    Host {
        bus,
        m,
        _dir: dir,
        app_port,
        health,
        agent,
        metrics,
    }
}

impl Host {
    fn wait_health(&self, want: u16) -> serde_json::Value {
        let mut last = None;
        let ok = wait_until(T, || {
            last = Some(health(self.health));
            last.as_ref().is_some_and(|(s, _)| *s == want)
        });
        assert!(ok, "health never {want}: {last:?}\n{}", self.m.log());
        last.unwrap().1
    }

    fn nodeherd(&self, verb: &str) -> (i32, String, String) {
        client(&[verb, "hello", "--bus", &self.bus.address])
    }
}

#[test]
fn health_follows_drain_and_undrain_on_every_listener() {
    let h = host("env.js", "");
    let v = h.wait_health(200);
    assert_eq!(v["health"], "up", "{v}");
    assert_eq!(v["state"], "ready", "{v}");
    assert_eq!(
        (v["ready"].as_u64(), v["instances"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(
        health(h.metrics).0,
        200,
        "the metrics listener answers /health too"
    );
    assert_eq!(agent(h.agent), "up ready 100%\n");
    // A HEAD, as some checks send: the status, no body.
    let mut s = TcpStream::connect(("127.0.0.1", h.health)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "HEAD /health HTTP/1.0\r\n\r\n").unwrap();
    let mut head = String::new();
    s.read_to_string(&mut head).unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"),
        "{head:?}"
    );

    let (code, out, err) = h.nodeherd("drain");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("draining"), "{out}");
    let (status, v) = health(h.health);
    assert_eq!((status, v["health"].as_str()), (503, Some("drain")), "{v}");
    assert_eq!(health(h.metrics).0, 503);
    assert_eq!(agent(h.agent), "drain\n");
    // Draining is not stopping: the app serves on.
    assert!(
        get_json(h.app_port).is_ok(),
        "the app answers while drained"
    );
    assert_eq!(h.m.workers().len(), 2);

    let (code, out, err) = h.nodeherd("undrain");
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(health(h.health).0, 200);
    assert_eq!(agent(h.agent), "up ready 100%\n");
}

#[test]
fn a_stop_with_drain_before_stop_answers_503_and_serves_until_the_drain_is_over() {
    let mut h = host("env.js", r#""drain_before_stop":"3s""#);
    h.wait_health(200);
    let t0 = Instant::now();
    h.m.signal(libc::SIGTERM);
    let v = h.wait_health(503);
    assert_eq!(v["health"], "drain", "{v}");
    assert_eq!(agent(h.agent), "drain\n");
    // Serving all along: every request until 2.5 s is answered.
    let mut answered = 0;
    while t0.elapsed() < Duration::from_millis(2500) {
        get_json(h.app_port).unwrap_or_else(|e| panic!("a request failed while draining: {e}"));
        answered += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(answered > 10, "{answered}");
    let status = h.m.wait_exit(T).expect("the manager ends after the drain");
    assert!(status.success(), "{status:?}\n{}", h.m.log());
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(2900),
        "ended after {took:?}, before the drain was over"
    );
    assert!(
        h.m.log().contains("draining for 3000 ms first"),
        "{}",
        h.m.log()
    );
}

#[test]
fn a_second_stop_while_draining_stops_at_once() {
    let mut h = host("env.js", r#""drain_before_stop":"60s""#);
    h.wait_health(200);
    let t0 = Instant::now();
    h.m.signal(libc::SIGTERM);
    assert!(
        h.m.wait_log("draining for 60000 ms first", T),
        "{}",
        h.m.log()
    );
    std::thread::sleep(Duration::from_millis(1200));
    h.m.signal(libc::SIGTERM);
    let status = h.m.wait_exit(T).expect("a second SIGTERM ends the drain");
    assert!(status.success(), "{status:?}");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
}

#[test]
fn floods_slow_and_huge_requests_to_health_cost_the_manager_nothing_lasting() {
    let h = host("env.js", "");
    h.wait_health(200);
    // Many connections that say nothing: past the limit they are closed
    // at once, and the app and the metrics endpoint answer meanwhile.
    let held: Vec<TcpStream> = (0..150)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", h.health)).ok())
        .collect();
    assert!(held.len() > 64, "{}", held.len());
    // One more is closed as it comes, never kept waiting for its head.
    let mut late = TcpStream::connect(("127.0.0.1", h.health)).unwrap();
    late.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 16];
    match late.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("a connection past the limit was kept: {other:?}"),
    }
    assert!(get_json(h.app_port).is_ok());
    assert_eq!(
        health(h.metrics).0,
        200,
        "the metrics listener has its own limit"
    );
    drop(held);
    assert!(wait_until(T, || get(h.health, "/health").is_ok_and(|(s, _)| s == 200)));
    // A head past 16 KiB is not read to its end: closed unanswered.
    let mut s = TcpStream::connect(("127.0.0.1", h.health)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = write!(
        s,
        "GET /health HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    // Anything but GET or HEAD of /health is not answered as health.
    let (status, _) = get(h.health, "/metrics").unwrap();
    assert_eq!(status, 404);
    // The manager is still itself.
    assert_eq!(h.m.workers().len(), 2);
    assert_eq!(health(h.health).0, 200);
}

#[test]
fn an_unprivileged_bus_client_may_not_drain_or_undrain() {
    let h = host("env.js", "");
    h.wait_health(200);
    for method in ["Drain", "Undrain"] {
        let out = Command::new("dbus-send")
            .arg(format!("--bus={}", h.bus.address))
            .args([
                "--print-reply",
                "--dest=org.nodeherd.hello",
                "/org/nodeherd",
                &format!("org.nodeherd.Manager1.{method}"),
            ])
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{method} as nobody succeeded");
        assert!(err.contains("org.nodeherd.restart"), "{method}: {err}");
    }
    let (status, v) = health(h.health);
    assert_eq!(status, 200, "still up: {v}");
}

#[test]
fn a_worker_cannot_flip_health() {
    let bus = DbusDaemon::start();
    let dir = tempdir::Dir::new("health-flip");
    let fields = format!(
        r#""instances":2,"uid":"nobody","health":"127.0.0.1:0","env":{{"FLIP_BUS":"{}","FLIP_NAME":"org.nodeherd.flip"}}"#,
        bus.address
    );
    let cfg = one_app(&dir, "flip", "health_flipper.js", &fields);
    let m = start_config(&cfg, Some(&bus));
    let port = m.port();
    let health_port = port_in_log(&m, "health");
    // Both workers have made every attempt.
    let mut last = serde_json::Value::Null;
    let mut done = std::collections::BTreeSet::new();
    assert!(
        wait_until(T, || {
            if let Ok(v) = get_json(port) {
                if v["done"] == true {
                    done.insert(v["pid"].to_string());
                }
                last = v;
            }
            done.len() >= 2 && last["done"] == true
        }),
        "{last}\n{}",
        m.log()
    );
    assert_eq!(last["uid"], NOBODY, "{last}");
    let dbus = last["tried"]["dbus"].as_str().unwrap_or("");
    assert!(
        dbus.starts_with("failed") && dbus.contains("org.nodeherd.restart"),
        "{last}"
    );
    // Whatever it tried, the host is up and says so.
    let (status, v) = health(health_port);
    assert_eq!(
        (status, v["health"].as_str()),
        (200, Some("up")),
        "{v}\n{last}"
    );
    assert_eq!(v["state"], "ready", "{v}");
}

#[test]
fn a_drain_and_the_health_listeners_outlive_a_reexec() {
    let h = host("env.js", "");
    h.wait_health(200);
    assert_eq!(h.nodeherd("drain").0, 0);
    let pid = h.m.pid();
    let (code, out, err) = h.nodeherd("reexec");
    assert_eq!(code, 0, "{out}{err}\n{}", h.m.log());
    assert_eq!(h.m.pid(), pid);
    // The new program binds the health listeners again and keeps the drain.
    let mut last = None;
    assert!(
        wait_until(T, || {
            last = get(h.health, "/health").ok();
            last.as_ref()
                .is_some_and(|(s, b)| *s == 503 && b.contains("\"drain\""))
        }),
        "{last:?}\n{}",
        h.m.log()
    );
    assert_eq!(agent(h.agent), "drain\n");
    assert_eq!(h.nodeherd("undrain").0, 0);
    assert_eq!(health(h.health).0, 200);
}
