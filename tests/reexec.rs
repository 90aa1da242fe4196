//! Re-exec in place with real processes: the manager is started from a copy
//! of the binary, that file is replaced (a new inode, as a package upgrade
//! does), and `nodeherd reexec` moves the running manager onto it. The pid,
//! the workers and every socket stay; the new program supervises them.
//! (Under load, and ten in a row: tests/load/reexec-under-load.sh.)

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

/// Put a file at `path` the way a package manager does: write a new file
/// beside it, then rename it over (the running image keeps the old inode).
fn replace(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn the_binary() -> Vec<u8> {
    std::fs::read(BIN).unwrap()
}

/// `nodeherd run ARGS` started from `bin` (a copy of the binary under test).
fn start_from(bin: &Path, args: &[&str], envs: &[(&str, &str)]) -> Manager {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("RUNTIME_DIRECTORY")
        .stdin(std::process::Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    spawn_collecting(cmd)
}

fn exe_of(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn sorted(mut v: Vec<i32>) -> Vec<i32> {
    v.sort();
    v
}

/// `nodeherd status --json`, by slot: (pid, state, restarts, uptime_ms, started_at_unix_ms).
fn status(args: &[&str]) -> BTreeMap<u64, (u64, String, u64, u64, u64)> {
    let mut all = vec!["status", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = client(&all);
    assert_eq!(code, 0, "status failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let n = |k: &str| w[k].as_u64().unwrap_or(0);
            (
                n("instance"),
                (
                    n("pid"),
                    w["state"].as_str().unwrap_or("").to_string(),
                    n("restarts"),
                    n("uptime_ms"),
                    n("started_at_unix_ms"),
                ),
            )
        })
        .collect()
}

fn copy_of_the_binary(dir: &tempdir::Dir) -> PathBuf {
    let bin = dir.path.join("bin/nodeherd");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    replace(&bin, &the_binary());
    bin
}

#[test]
fn a_reexec_keeps_the_pid_the_workers_and_every_socket_and_the_new_program_supervises() {
    let bus = DbusDaemon::start();
    let dir = tempdir::Dir::new("reexec");
    let bin = copy_of_the_binary(&dir);
    let script = path_str(&app("ports.js"));
    let m = start_from(
        &bin,
        &[
            "run",
            &script,
            "--name",
            "rx",
            "-i",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--bus",
            &bus.address,
        ],
        &[],
    );
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    assert!(bus.wait_name("org.nodeherd.rx", T));
    let port = m.port();
    let admin = get_json(port).unwrap()["admin_port"].as_u64().unwrap() as u16;
    let metrics_port = |m: &Manager| -> u16 {
        m.log()
            .lines()
            .filter_map(|l| l.split_once("metrics: http://127.0.0.1:"))
            .filter_map(|(_, r)| r.split('/').next()?.parse().ok())
            .next()
            .expect("a metrics line")
    };
    let metrics = metrics_port(&m);

    // A crash before, so there is a restart count to carry.
    let first = sorted(m.workers());
    kill(first[0], libc::SIGKILL);
    let mut before = BTreeMap::new();
    assert!(wait_until(T, || {
        before = status(&["rx", "--bus", &bus.address]);
        before.values().all(|w| w.1 == "ready") && before.values().any(|w| w.2 == 1)
    }));
    let workers = sorted(m.workers());
    std::thread::sleep(Duration::from_millis(300));

    replace(&bin, &the_binary());
    let new_inode = std::fs::metadata(&bin).unwrap().ino();
    let (code, out, err) = client(&["reexec", "rx", "--bus", &bus.address]);
    assert_eq!(code, 0, "reexec failed: {err}\n{}", m.log());
    assert!(out.contains("the new manager answered"), "{out}");

    // The same process, now running the new file.
    assert!(pid_alive(m.pid()));
    assert_eq!(exe_of(m.pid()), path_str(&bin), "not the new file");
    let image = std::fs::metadata(format!("/proc/{}/exe", m.pid())).unwrap();
    assert_eq!(image.ino(), new_inode);
    assert!(m.log().contains("re-executed in"), "{}", m.log());
    assert_eq!(
        sorted(m.workers()),
        workers,
        "the same workers, none restarted"
    );

    // What it knew came along: restart counts, start times, uptimes.
    let after = status(&on_bus_with(&bus, "rx"));
    for (slot, b) in &before {
        let a = &after[slot];
        assert_eq!((a.0, &a.1, a.2), (b.0, &b.1, b.2), "slot {slot}");
        assert!(
            a.3 >= b.3 + 300,
            "slot {slot}: uptime {} after {}",
            a.3,
            b.3
        );
        assert!(a.4.abs_diff(b.4) <= 2, "slot {slot}: start time moved");
    }
    let (_, count, _) = bus.busctl(&[
        "get-property",
        "org.nodeherd.rx",
        "/org/nodeherd",
        "org.nodeherd.Manager1",
        "Reexecs",
    ]);
    assert_eq!(count.trim(), "u 1");

    // Every socket still serves: the handed-over one, the port the workers
    // asked for, the metrics endpoint.
    assert_eq!(instances_answering(port, 2, T).len(), 2);
    assert_eq!(get(admin, "/").unwrap().0, 200);
    assert_eq!(get(metrics, "/metrics").unwrap().0, 200);
    assert_eq!(metrics_port(&m), metrics, "the same metrics socket");

    // The new program supervises: a crash right after is restarted as usual.
    let slot0 = after[&0].0 as i32;
    kill(slot0, libc::SIGKILL);
    assert!(wait_until(T, || {
        let s = status(&on_bus_with(&bus, "rx"));
        s[&0].0 as i32 != slot0 && s[&0].1 == "ready" && s[&0].2 == after[&0].2 + 1
    }));
    // A reload starts new workers on the same sockets.
    let (code, _, err) = client(&["reload", "rx", "--bus", &bus.address]);
    assert_eq!(code, 0, "{err}");
    let reloaded = sorted(m.workers());
    assert!(reloaded.iter().all(|p| !workers.contains(p)));
    assert_eq!(get(admin, "/").unwrap().0, 200);
    assert_eq!(instances_answering(port, 2, T).len(), 2);

    // And the workers still end with the manager.
    m.signal(libc::SIGKILL);
    assert!(wait_until(T, || reloaded.iter().all(|p| !pid_alive(*p))));
}

fn on_bus_with<'a>(bus: &'a DbusDaemon, app: &'a str) -> [&'a str; 3] {
    [app, "--bus", bus.address.as_str()]
}

#[test]
fn a_program_that_is_not_nodeherd_is_refused_and_the_manager_serves_on() {
    let dir = tempdir::Dir::new("reexec-bad");
    let rt = dir.path.join("rt");
    std::fs::create_dir_all(&rt).unwrap();
    let rt = path_str(&rt);
    let bin = copy_of_the_binary(&dir);
    let script = path_str(&app("env.js"));
    let no_bus = format!("unix:path={rt}/no-bus-here");
    let m = start_from(
        &bin,
        &[
            "run",
            &script,
            "--name",
            "bad",
            "-i",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--bus",
            &no_bus,
        ],
        &[("XDG_RUNTIME_DIR", &rt)],
    );
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    let port = m.port();
    let workers = sorted(m.workers());
    let ask = || client_in(&rt, &["reexec", "bad", "--bus", &no_bus]);

    // A program that exits at once, and a file that is no program at all.
    for (contents, says) in [
        (&b"#!/bin/sh\nexit 0\n"[..], "not a nodeherd"),
        (b"just some text\n", "does not run"),
    ] {
        replace(&bin, contents);
        let (code, err) = ask();
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(says), "{err}");
        assert!(pid_alive(m.pid()));
        assert_eq!(sorted(m.workers()), workers);
        assert_eq!(instances_answering(port, 2, T).len(), 2);
    }
    assert!(m.log().contains("re-exec refused"), "{}", m.log());

    // Fixed, it goes through: here by SIGUSR2, with no client at all.
    replace(&bin, &the_binary());
    m.signal(libc::SIGUSR2);
    assert!(m.wait_log("re-executed in", T), "{}", m.log());
    assert_eq!(sorted(m.workers()), workers);
    assert_eq!(instances_answering(port, 2, T).len(), 2);
    // The control socket came along: the clients still reach it.
    let (code, err) = ask();
    assert_eq!(code, 0, "{err}");
}

#[test]
fn reuseport_slots_keep_their_own_sockets_across_a_reexec() {
    let dir = tempdir::Dir::new("reexec-rp");
    let bin = copy_of_the_binary(&dir);
    let script = path_str(&app("env.js"));
    let rt = dir.path.join("rt");
    std::fs::create_dir_all(&rt).unwrap();
    let rt = path_str(&rt);
    let no_bus = format!("unix:path={rt}/no-bus-here");
    let m = start_from(
        &bin,
        &[
            "run",
            &script,
            "--name",
            "rp",
            "-i",
            "2",
            "--balance",
            "reuseport",
            "--listen",
            "127.0.0.1:0",
            "--bus",
            &no_bus,
        ],
        &[("XDG_RUNTIME_DIR", &rt)],
    );
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    let port = m.port();
    let listening = |pid: i32| -> Vec<u64> {
        // The socket inodes this process holds.
        let mut v: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let l = std::fs::read_link(e.path()).ok()?;
                        let s = l.to_str()?.strip_prefix("socket:[")?;
                        s.strip_suffix(']')?.parse().ok()
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let workers = sorted(m.workers());
    let held: Vec<Vec<u64>> = workers.iter().map(|w| listening(*w)).collect();
    replace(&bin, &the_binary());
    let (code, err) = client_in(&rt, &["reexec", "rp", "--bus", &no_bus]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(sorted(m.workers()), workers);
    assert_eq!(
        workers.iter().map(|w| listening(*w)).collect::<Vec<_>>(),
        held
    );
    assert_eq!(instances_answering(port, 2, T).len(), 2);
    // A new slot gets a sibling of its own; the old slots keep theirs.
    let (code, err) = client_in(&rt, &["scale", "rp", "3", "--bus", &no_bus]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(instances_answering(port, 3, T).len(), 3);
}

#[test]
fn a_manager_started_through_a_symlink_follows_it_to_the_new_version() {
    let dir = tempdir::Dir::new("reexec-link");
    let rt = dir.path.join("rt");
    std::fs::create_dir_all(&rt).unwrap();
    let rt = path_str(&rt);
    for v in ["v1", "v2"] {
        std::fs::create_dir_all(dir.path.join(v)).unwrap();
        replace(&dir.path.join(v).join("nodeherd"), &the_binary());
    }
    let link = dir.path.join("nodeherd");
    std::os::unix::fs::symlink(dir.path.join("v1/nodeherd"), &link).unwrap();
    let script = path_str(&app("env.js"));
    let no_bus = format!("unix:path={rt}/no-bus-here");
    let m = start_from(
        &link,
        &[
            "run",
            &script,
            "--name",
            "ln",
            "-i",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--bus",
            &no_bus,
        ],
        &[("XDG_RUNTIME_DIR", &rt)],
    );
    assert!(m.wait_log("1/1 workers ready", T), "{}", m.log());
    assert_eq!(exe_of(m.pid()), path_str(&dir.path.join("v1/nodeherd")));
    // The "upgrade": the link now names v2.
    let tmp = dir.path.join("nodeherd.tmp");
    std::os::unix::fs::symlink(dir.path.join("v2/nodeherd"), &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    let (code, err) = client_in(&rt, &["reexec", "ln", "--bus", &no_bus]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(exe_of(m.pid()), path_str(&dir.path.join("v2/nodeherd")));
}

#[test]
fn the_new_program_talks_to_the_old_workers_over_their_channels() {
    // A scrape asks every worker for the app's own metrics over its IPC
    // channel: after a re-exec, through the channel the old program opened.
    ensure_npm_deps();
    let dir = tempdir::Dir::new("reexec-ipc");
    let bin = copy_of_the_binary(&dir);
    let script = path_str(&app("prom_app.js"));
    let m = start_from(
        &bin,
        &[
            "run",
            &script,
            "-i",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[("XDG_RUNTIME_DIR", &path_str(&dir.path))],
    );
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    let port = m.port();
    let workers = sorted(m.workers());
    m.signal(libc::SIGUSR2);
    assert!(m.wait_log("re-executed in", T), "{}", m.log());
    assert_eq!(sorted(m.workers()), workers);
    for _ in 0..20 {
        get(port, "/hello").unwrap();
    }
    let metrics: u16 = m
        .log()
        .lines()
        .rev()
        .filter_map(|l| l.split_once("metrics: http://127.0.0.1:"))
        .find_map(|(_, r)| r.split('/').next()?.parse().ok())
        .expect("a metrics line");
    let (status, text) = get(metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    for w in ["0", "1"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("app_requests_total{")
                    && l.contains(&format!("worker=\"{w}\""))),
            "worker {w}'s own metrics after the re-exec:\n{text}"
        );
    }
}

#[test]
fn a_storm_of_reexec_signals_and_a_stop_in_the_middle_end_cleanly() {
    let dir = tempdir::Dir::new("reexec-storm");
    let bin = copy_of_the_binary(&dir);
    let script = path_str(&app("env.js"));
    let rt = path_str(&dir.path);
    let no_bus = format!("unix:path={rt}/no-bus-here");
    let args = [
        "run",
        &script,
        "--name",
        "storm",
        "-i",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--bus",
        &no_bus,
    ];
    let m = start_from(&bin, &args, &[("XDG_RUNTIME_DIR", &rt)]);
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    let port = m.port();
    let workers = sorted(m.workers());
    // SIGUSR2 every 5 ms for 1.5 s, so some land in the very instant of an
    // exec: they join the re-exec under way, or start one more after it;
    // never a second exec at once, never a lost worker, never a manager
    // ended by a signal whose handler the exec reset.
    for _ in 0..300 {
        m.signal(libc::SIGUSR2);
        std::thread::sleep(Duration::from_millis(5));
    }
    let execs = || m.log().matches("re-executed in").count();
    assert!(wait_until(T, || execs() >= 1), "{}", m.log());
    // Settled: ready, and no re-exec since the last look.
    let state = || {
        let out = Command::new(BIN)
            .args(["status", "storm", "--json", "--bus", &no_bus])
            .env("XDG_RUNTIME_DIR", &rt)
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .map(|v| v["state"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    let mut last = usize::MAX;
    assert!(
        wait_until(T, || {
            std::thread::sleep(Duration::from_millis(300));
            let now = execs();
            let settled = now == last && state() == "ready";
            last = now;
            settled
        }),
        "{}",
        m.log()
    );
    assert!(pid_alive(m.pid()));
    assert_eq!(sorted(m.workers()), workers, "{}", m.log());
    assert_eq!(instances_answering(port, 2, T).len(), 2);

    // A stop sent right behind a re-exec request: whichever comes first, the
    // manager ends gracefully and leaves no worker behind.
    let mut m = m;
    m.signal(libc::SIGUSR2);
    m.signal(libc::SIGTERM);
    let status = m.wait_exit(T).expect("it stops");
    assert_eq!(status.code(), Some(0), "{}", m.log());
    assert!(wait_until(T, || workers.iter().all(|p| !pid_alive(*p))));
}

/// The signals a stop or a reload arrives by, as bits of /proc's `SigBlk`.
const CONTROL_SIGNALS: [i32; 4] = [libc::SIGHUP, libc::SIGINT, libc::SIGUSR2, libc::SIGTERM];

/// Which of the control signals thread `tid` of `pid` blocks.
fn blocked(pid: i32, tid: i32) -> Vec<i32> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .unwrap_or(0);
    CONTROL_SIGNALS
        .into_iter()
        .filter(|s| mask & (1u64 << (s - 1)) != 0)
        .collect()
}

/// No thread of the manager ever runs a handler for a control signal:
/// every thread (the main one, the log writer, the runtime's blocking
/// threads, which a reload starts to read the configuration) blocks them
/// and the manager reads them from a signalfd, so a stop sent at the
/// instant of a re-exec waits in the kernel for the new program instead of
/// dying with a handler's note.
#[test]
fn every_thread_blocks_the_control_signals_the_manager_reads_them_from_a_signalfd() {
    let dir = tempdir::Dir::new("sigmask");
    let rt = path_str(&dir.path);
    let script = path_str(&app("env.js"));
    let m = start(
        &[
            "run",
            &script,
            "--name",
            "masks",
            "-i",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[("XDG_RUNTIME_DIR", &rt)],
    );
    assert!(m.wait_log("1/1 workers ready", T), "{}", m.log());
    m.signal(libc::SIGHUP);
    assert!(m.wait_log("reload finished", T), "{}", m.log());
    let pid = m.pid();
    let tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    assert!(
        tids.len() >= 3,
        "main, log writer, a blocking thread: {tids:?}"
    );
    for tid in tids {
        assert_eq!(
            blocked(pid, tid),
            CONTROL_SIGNALS,
            "thread {tid} blocks them"
        );
    }
    let signalfds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().contains("signalfd"))
        })
        .count();
    assert_eq!(signalfds, 1, "one signalfd reads them");
    // Workers start with an empty mask: a stop reaches the app.
    for w in m.workers() {
        assert_eq!(blocked(w, w), Vec::<i32>::new(), "worker {w}");
    }
}

/// A SIGTERM at any instant around a re-exec (before it, during the exec
/// itself, as the new program starts) stops the manager gracefully: exit 0,
/// every worker asked to stop and gone. Never lost, never a hang.
#[test]
fn a_stop_at_any_instant_of_a_reexec_is_graceful() {
    let dir = tempdir::Dir::new("reexec-stop");
    let rt = path_str(&dir.path);
    let script = path_str(&app("env.js"));
    for round in 0..12u64 {
        let mut m = start(
            &[
                "run",
                &script,
                "--name",
                "stopper",
                "-i",
                "2",
                "--listen",
                "127.0.0.1:0",
                "--no-bus",
            ],
            &[("XDG_RUNTIME_DIR", &rt)],
        );
        assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
        let workers = m.workers();
        m.signal(libc::SIGUSR2);
        assert!(m.wait_log("re-executing into", T), "{}", m.log());
        // The exec follows about 100 ms after this line: spread the stops
        // over 0-150 ms, so some land before, in and after it.
        std::thread::sleep(Duration::from_millis(round * 13 % 151));
        m.signal(libc::SIGTERM);
        let status = m.wait_exit(T);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "round {round}: a graceful stop\n{}",
            m.log()
        );
        assert!(m.log().contains("stopping 2 worker(s)"), "{}", m.log());
        assert!(
            wait_until(T, || workers.iter().all(|p| !pid_alive(*p))),
            "round {round}: no worker left"
        );
    }
}
