//! Reload, scale and the D-Bus control plane, against a private real
//! dbus-daemon, busctl and real node workers (issue 3).

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

struct Fixture {
    bus: DbusDaemon,
    m: Manager,
    port: u16,
    name: String,
}

fn fixture(script: &str, extra: &[&str], env: &[(&str, &str)]) -> Fixture {
    let bus = DbusDaemon::start();
    let name = "org.nodeherd.hello".to_string();
    let mut args = vec![
        "run".to_string(),
        path_str(&app(script)),
        "--name".into(),
        "hello".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--bus".into(),
        bus.address.clone(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let m = start(&argv, env);
    let port = m.port();
    assert!(bus.wait_name(&name, T), "name not taken; log:\n{}", m.log());
    Fixture { bus, m, port, name }
}

impl Fixture {
    fn call(&self, method: &str, sig_args: &[&str]) -> (i32, String, String) {
        let mut a = vec![
            "call",
            "--",
            &self.name,
            "/org/nodeherd",
            "org.nodeherd.Manager1",
            method,
        ];
        a.extend_from_slice(sig_args);
        self.bus.busctl(&a)
    }

    fn prop(&self, p: &str) -> String {
        self.bus
            .busctl(&[
                "get-property",
                &self.name,
                "/org/nodeherd",
                "org.nodeherd.Manager1",
                p,
            ])
            .1
    }

    /// instance → (pid, state), from the Workers property as JSON.
    fn workers(&self) -> BTreeMap<u64, Vec<(u64, String)>> {
        let (_, out, _) = self.bus.busctl(&[
            "--json=short",
            "get-property",
            &self.name,
            "/org/nodeherd",
            "org.nodeherd.Manager1",
            "Workers",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let mut m: BTreeMap<u64, Vec<(u64, String)>> = BTreeMap::new();
        for w in v["data"].as_array().cloned().unwrap_or_default() {
            m.entry(w[0].as_u64().unwrap())
                .or_default()
                .push((w[1].as_u64().unwrap(), w[2].as_str().unwrap().to_string()));
        }
        m
    }

    fn ready_pids(&self) -> BTreeMap<u64, u64> {
        self.workers()
            .into_iter()
            .filter_map(|(i, ws)| {
                ws.into_iter()
                    .find(|(_, s)| s == "ready")
                    .map(|(p, _)| (i, p))
            })
            .collect()
    }

    fn wait_ready(&self, n: usize) -> BTreeMap<u64, u64> {
        let mut pids = BTreeMap::new();
        let ok = wait_until(T, || {
            pids = self.ready_pids();
            pids.len() == n && self.prop("State").contains("ready")
        });
        assert!(
            ok,
            "not {n} ready workers: {:?}\nlog:\n{}",
            self.workers(),
            self.m.log()
        );
        pids
    }
}

#[test]
fn introspection_is_complete_and_typed() {
    let f = fixture("env.js", &["-i", "2"], &[]);
    f.wait_ready(2);
    let (code, out, err) = f.bus.busctl(&[
        "introspect",
        "--no-pager",
        &f.name,
        "/org/nodeherd",
        "org.nodeherd.Manager1",
    ]);
    assert_eq!(code, 0, "{err}");
    for (member, sig) in [
        (".Reload", "method"),
        (".Restart", "method"),
        (".Scale", "method"),
        (".ScaleBy", "method"),
        (".Drain", "method"),
        (".Undrain", "method"),
        (".Name", "property"),
        (".State", "property"),
        (".Instances", "property"),
        (".ReadyWorkers", "property"),
        (".Workers", "property"),
        (".WorkerStatusTexts", "property"),
        (".WorkerStateChanged", "signal"),
        (".ReloadFinished", "signal"),
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(member) && l.contains(sig)),
            "{member} {sig} missing:\n{out}"
        );
    }
    assert!(out.contains("a(uusuttt)"), "Workers is typed:\n{out}");
    assert_eq!(f.prop("Name").trim(), "s \"hello\"");
    assert_eq!(f.prop("Instances").trim(), "i 2");
    assert_eq!(f.prop("ReadyWorkers").trim(), "i 2");
}

#[test]
fn reload_replaces_every_worker_keeping_indexes() {
    // Old workers take 300 ms to leave: Reload must wait for them.
    let f = fixture("env.js", &["-i", "4"], &[("LINGER_MS", "300")]);
    let before = f.wait_ready(4);
    let (code, _, err) = f.call("Reload", &[]);
    assert_eq!(code, 0, "Reload failed: {err}\nlog:\n{}", f.m.log());
    // Reload returns only when the swap is complete and the old workers are gone.
    let after = f.ready_pids();
    assert_eq!(after.keys().collect::<Vec<_>>(), vec![&0, &1, &2, &3]);
    for (i, pid) in &after {
        assert_ne!(before[i], *pid, "slot {i} kept its old worker");
    }
    for pid in before.values() {
        assert!(!pid_alive(*pid as i32), "old worker {pid} still runs");
    }
    // Each old worker stopped only after its replacement was ready; two
    // swaps at a time unless configured (as PM2).
    let log = f.m.log();
    assert!(
        log.contains("reload begun: 4 worker(s), 2 at a time"),
        "{log}"
    );
    for i in 0..4 {
        let ready = log
            .find(&format!("worker {i} ready (pid {}", after[&i]))
            .unwrap();
        let stopping = log
            .find(&format!("worker {i} stopping (pid {}", before[&i]))
            .unwrap();
        assert!(
            ready < stopping,
            "slot {i}: old stopped before new was ready\n{log}"
        );
    }
    let seen = instances_answering(f.port, 4, T);
    assert_eq!(seen.len(), 4);
}

#[test]
fn a_replacement_that_never_becomes_ready_fails_closed() {
    let dir = tempdir::Dir::new("gate");
    let gate = dir.path.join("gate");
    for mode in ["hang", "crash"] {
        let f = fixture(
            "gated.js",
            &["-i", "3", "--listen-timeout", "4000"],
            &[("GATE_FILE", gate.to_str().unwrap()), ("GATE_MODE", mode)],
        );
        let before = f.wait_ready(3);
        std::fs::write(&gate, "closed").unwrap();
        let (code, _, err) = f.call("Reload", &[]);
        assert_ne!(code, 0, "{mode}: the reload must fail");
        // Slots 0 and 1 are replaced together (two at a time): a crash of
        // either may be the first the manager sees.
        let named = err.contains("slot 0") || (mode == "crash" && err.contains("slot 1"));
        assert!(named, "{mode}: names the slot: {err}");
        let cause = if mode == "hang" {
            "listen_timeout"
        } else {
            "exited with code 4"
        };
        assert!(err.contains(cause), "{mode}: names the cause: {err}");
        assert!(f.m.wait_log("reload failed", T), "{}", f.m.log());
        // The old workers all keep serving, untouched.
        assert_eq!(f.ready_pids(), before, "{mode}");
        let seen = instances_answering(f.port, 3, T);
        assert_eq!(seen.len(), 3, "{mode}: {seen:?}");
        for (i, pid) in &seen {
            assert_eq!(before[&i.parse::<u64>().unwrap()], *pid);
        }
        assert_eq!(f.prop("State").trim(), "s \"ready\"");
        std::fs::remove_file(&gate).unwrap();
        // And once fixed, a reload goes through.
        let (code, _, err) = f.call("Reload", &[]);
        assert_eq!(code, 0, "{mode}: {err}");
    }
}

#[test]
fn scale_up_and_down_and_reject_bad_counts() {
    let f = fixture("env.js", &["-i", "2"], &[]);
    let two = f.wait_ready(2);
    let (code, out, err) = f.call("Scale", &["i", "4"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "i 4");
    let four = f.wait_ready(4);
    assert_eq!(four[&0], two[&0]);
    assert_eq!(four[&1], two[&1]);
    assert_eq!(instances_answering(f.port, 4, T).len(), 4);

    for bad in ["0", "-3", "5000"] {
        let (code, _, err) = f.call("Scale", &["i", bad]);
        assert_ne!(code, 0);
        assert!(err.contains("between 1 and 1024"), "{bad}: {err}");
    }
    let (code, _, err) = f.call("ScaleBy", &["i", "-10"]);
    assert_ne!(code, 0, "{err}");
    // Wrong argument type: refused by the bus layer, workers untouched.
    let (code, _, _) = f.call("Scale", &["s", "four"]);
    assert_ne!(code, 0);
    assert_eq!(f.ready_pids(), four, "bad calls changed nothing");

    let (code, out, err) = f.call("ScaleBy", &["i", "-3"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "i 1");
    let one = f.wait_ready(1);
    assert_eq!(one[&0], two[&0], "the lowest slot stays");
    for i in 1..4 {
        let pid = four[&i] as i32;
        assert!(
            wait_until(T, || !pid_alive(pid)),
            "slot {i} worker still running"
        );
    }
    assert_eq!(f.prop("Instances").trim(), "i 1");
}

#[test]
fn cli_clients_speak_the_same_api() {
    let f = fixture("env.js", &["-i", "2"], &[]);
    f.wait_ready(2);
    let bus = ["--bus", f.bus.address.as_str()];
    let (code, out, err) = client(&[&["status", "hello"][..], &bus, &["--json"]].concat());
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ready_workers"], 2);
    assert_eq!(v["workers"].as_array().unwrap().len(), 2);
    // Without APP: the only manager on the bus.
    let (code, out, _) = client(&[&["status"][..], &bus].concat());
    assert_eq!(code, 0);
    assert!(out.contains("hello: ready"), "{out}");
    assert!(out.contains("instance"), "a table: {out}");

    let (code, out, err) = client(&[&["scale", "hello", "+1"][..], &bus].concat());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("3 worker(s)"),
        "success is said on stdout: {out}"
    );
    assert!(err.is_empty(), "nothing on stderr: {err}");
    f.wait_ready(3);
    let (code, _, err) = client(&[&["reload", "hello"][..], &bus].concat());
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = client(&[&["scale", "hello", "0"][..], &bus].concat());
    assert_eq!(code, 2, "invalid argument: {err}");
    let (code, _, err) = client(&[&["scale", "hello", "lots"][..], &bus].concat());
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = client(&[&["status", "nosuchapp"][..], &bus].concat());
    assert_eq!(code, 3, "not running: {err}");
    assert!(err.contains("no app nosuchapp; running: "), "{err}");
    assert!(err.contains("hello"), "{err}");
    // No bus and no control socket of that name: no manager. (The fallback
    // to the control socket is without_a_bus_the_clients_use_the_control_socket.)
    let (code, _, err) = client(&["status", "nosuchapp", "--bus", "unix:path=/nonexistent/bus"]);
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = client(&[&["restart", "hello"][..], &bus].concat());
    assert_eq!(code, 0, "{err}");
    f.wait_ready(3);
}

/// How many reload requests had their configuration read, from the log's
/// "reload: configuration read for N request(s)" lines.
fn requests_read(log: &str) -> usize {
    log.lines()
        .filter_map(|l| l.split_once("reload: configuration read for "))
        .filter_map(|(_, rest)| rest.split_whitespace().next()?.parse::<usize>().ok())
        .sum()
}

#[test]
fn sighup_reloads_and_concurrent_reloads_coalesce() {
    let dir = tempdir::Dir::new("coalesce");
    let gate = dir.path.join("gate");
    let f = fixture(
        "gated.js",
        &["-i", "2", "--listen-timeout", "20000"],
        &[("GATE_FILE", gate.to_str().unwrap()), ("GATE_MODE", "wait")],
    );
    let before = f.wait_ready(2);
    // Hold the reload open: its first replacement waits at the gate.
    std::fs::write(&gate, "closed").unwrap();
    f.m.signal(libc::SIGHUP);
    assert!(wait_until(T, || f.prop("State").contains("reloading")));
    // Three callers while it runs: they queue one more reload between them.
    let calls: Vec<_> = (0..3)
        .map(|_| {
            Command::new("busctl")
                .arg(format!("--address={}", f.bus.address))
                .args([
                    "call",
                    &f.name,
                    "/org/nodeherd",
                    "org.nodeherd.Manager1",
                    "Reload",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Wait until all four requests (the SIGHUP and the three calls) have
    // had their configuration read and reached the supervisor.
    assert!(
        wait_until(T, || requests_read(&f.m.log()) == 4),
        "log:\n{}",
        f.m.log()
    );
    std::fs::remove_file(&gate).unwrap();
    for c in calls {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        f.m.log().matches("reload begun").count(),
        2,
        "one SIGHUP reload, then one for the three callers"
    );
    let after = f.wait_ready(2);
    assert!(after.values().all(|p| !before.values().any(|b| b == p)));
}

#[test]
fn signals_and_property_changes_reach_the_bus() {
    let f = fixture("env.js", &["-i", "2"], &[]);
    f.wait_ready(2);
    let mut monitor = Command::new("busctl")
        .arg(format!("--address={}", f.bus.address))
        .args(["monitor", &f.name])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    {
        let out = out.clone();
        let mut stdout = monitor.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
                if n == 0 {
                    break;
                }
                out.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    // busctl monitor needs a moment to install its match; poll until it sees a property read.
    assert!(wait_until(T, || {
        f.prop("State");
        out.lock().unwrap().contains("Get")
    }));
    let (code, _, err) = f.call("Reload", &[]);
    assert_eq!(code, 0, "{err}");
    let ok = wait_until(T, || {
        let o = out.lock().unwrap();
        o.contains("ReloadFinished")
            && o.contains("WorkerStateChanged")
            && o.contains("PropertiesChanged")
    });
    let _ = monitor.kill();
    let _ = monitor.wait();
    assert!(ok, "monitor saw:\n{}", out.lock().unwrap());
}

#[test]
fn properties_answer_while_a_reload_runs() {
    let f = fixture("slow.js", &["-i", "2"], &[("BOOT_MS", "800")]);
    f.wait_ready(2);
    let mut reload = Command::new("busctl")
        .arg(format!("--address={}", f.bus.address))
        .args([
            "call",
            &f.name,
            "/org/nodeherd",
            "org.nodeherd.Manager1",
            "Reload",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(T, || f.prop("State").contains("reloading")));
    // A property read is answered within busctl's 1 s timeout mid-reload.
    let (code, out, err) = f.bus.busctl(&[
        "--timeout=1",
        "get-property",
        &f.name,
        "/org/nodeherd",
        "org.nodeherd.Manager1",
        "Workers",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("starting") || out.contains("ready"), "{out}");
    let st = reload.wait().unwrap();
    assert!(st.success());
}

#[test]
fn without_a_bus_the_manager_runs_and_says_so_once() {
    let m = start(
        &[
            "run",
            &path_str(&app("env.js")),
            "--listen",
            "127.0.0.1:0",
            "--bus",
            "unix:path=/nonexistent/bus",
        ],
        &[],
    );
    let port = m.port();
    assert!(m.wait_log("1/1 workers ready", T), "{}", m.log());
    assert!(m.wait_log("control plane off", T));
    assert_eq!(m.log().matches("control plane off").count(), 1);
    assert!(get_json(port).is_ok());
}

#[test]
fn balance_reuseport_gives_each_slot_its_own_queue() {
    let f = fixture("env.js", &["-i", "4", "--balance", "reuseport"], &[]);
    f.wait_ready(4);
    let count = |n: usize| {
        let mut per: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..n {
            let v = get_json(f.port).expect("every request answered");
            *per.entry(v["instance"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        per
    };
    // The kernel hashes each new connection to one slot's socket: every slot
    // gets a share near a quarter (expected 200 of 800; a share under 100
    // would take a 8-sigma draw).
    let per = count(800);
    assert_eq!(per.len(), 4, "{per:?}");
    assert!(per.values().all(|&n| n >= 100), "{per:?}");
    // A reload swaps workers on the same slot sockets; scaling binds and closes them.
    let (code, _, err) = f.call("Reload", &[]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = f.call("Scale", &["i", "6"]);
    assert_eq!(code, 0, "{err}");
    f.wait_ready(6);
    assert_eq!(count(600).len(), 6);
    let (code, _, err) = f.call("Scale", &["i", "2"]);
    assert_eq!(code, 0, "{err}");
    f.wait_ready(2);
    // Closed slots take no more connections: all 200 are answered by the two left.
    let per = count(200);
    assert_eq!(
        per.keys().cloned().collect::<Vec<_>>(),
        vec!["0", "1"],
        "{per:?}"
    );
}

#[test]
fn without_a_bus_the_clients_use_the_control_socket() {
    let runtime = tempdir::Dir::new("p2p");
    let rt = path_str(&runtime.path);
    let (m, no_bus) = start_without_bus("solo", &rt);
    let port = m.port();
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    let sock = runtime
        .path
        .join(format!("nodeherd-solo-{}", m.pid()))
        .join("control.sock");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only the manager's user may use it");
    let client_in = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .args(["--bus", &no_bus])
            .env("XDG_RUNTIME_DIR", &rt)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = client_in(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("solo: ready"), "{out}");
    let before = instances_answering(port, 2, T);
    let (code, out, err) = client_in(&["reload", "solo"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("reload finished: 2/2"), "{out}");
    let after = instances_answering(port, 2, T);
    assert!(after.values().all(|p| !before.values().any(|b| b == p)));
    let (code, _, err) = client_in(&["scale", "solo", "3"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(instances_answering(port, 3, T).len(), 3);
    // Another app's name finds nothing: no manager.
    let (code, _, err) = client_in(&["status", "other"]);
    assert_eq!(code, 3, "{err}");
}
