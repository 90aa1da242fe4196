//! Per-worker cgroups (issue 28), against the real cgroup2 hierarchy of
//! this host: the test makes a cgroup, marks it delegated as systemd does
//! for `Delegate=yes` (the `trusted.delegate` xattr), and starts the
//! manager in it. The same under a booted systemd is tests/systemd/cgroups.sh.
//!
//! Needs root and a cgroup2 mount; skipped (with a line saying so) without.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

/// A cgroup of the test's own, delegated; everything in it is killed and
/// the directories removed on drop.
struct Delegated {
    dir: PathBuf,
}

impl Delegated {
    fn new(tag: &str) -> Option<Delegated> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: per-worker cgroup tests need root");
            return None;
        }
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = info.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.starts_with("cgroup2 ") && left.split_whitespace().nth(3) == Some("/"))
                .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
        });
        let Some(mount) = mount else {
            eprintln!("skipped: no cgroup2 hierarchy mounted");
            return None;
        };
        let dir = mount.join(format!("nodeherd-test-{tag}-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let path = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let rc = unsafe {
            libc::setxattr(
                path.as_ptr(),
                c"trusted.delegate".as_ptr(),
                b"1".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(rc, 0, "setting trusted.delegate on {}", dir.display());
        Some(Delegated { dir })
    }

    /// `nodeherd ARGS` started inside the delegated cgroup.
    fn start(&self, args: &[&str], envs: &[(&str, &str)]) -> Manager {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("echo $$ >\"$0/cgroup.procs\" && exec \"$@\"")
            .arg(&self.dir)
            .arg(BIN)
            .args(args);
        for k in [
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "RUNTIME_DIRECTORY",
        ] {
            cmd.env_remove(k);
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        spawn_collecting(cmd)
    }

    fn worker_cgroups(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("worker-")
            })
            .collect();
        v.sort();
        v
    }
}

impl Drop for Delegated {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(self.dir.join("cgroup.events"))
                .is_ok_and(|s| s.contains("populated 0"))
        });
        remove_tree(&self.dir);
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The cgroup2 directory `pid` is in, relative to the mount.
fn cgroup_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .unwrap_or_default()
}

fn rel(dir: &Path) -> String {
    // The test's cgroup sits right under the mount; its name is unique.
    let s = dir.display().to_string();
    let at = s.find("nodeherd-test-").unwrap();
    s[at..].to_string()
}

fn run_args<'a>(script: &'a str, instances: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "run",
        script,
        "-i",
        instances,
        "--listen",
        "127.0.0.1:0",
        "--no-bus",
    ];
    v.extend_from_slice(extra);
    v
}

fn metrics_port(m: &Manager) -> u16 {
    let mut port = None;
    wait_until(T, || {
        port = m
            .log()
            .lines()
            .filter_map(|l| l.split_once("metrics: http://127.0.0.1:"))
            .filter_map(|(_, r)| r.split('/').next()?.parse::<u16>().ok())
            .next();
        port.is_some()
    });
    port.unwrap_or_else(|| panic!("no metrics line in:\n{}", m.log()))
}

fn metric(port: u16, line_start: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    // `name{...labels...} value`, labels in any order.
    let (name, label) = line_start.split_once('{').unwrap();
    let label = label.trim_end_matches(['}', ' ']);
    buf.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

fn proc_cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|r| r.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

#[test]
fn every_worker_runs_in_a_cgroup_of_its_own_and_the_manager_in_a_leaf() {
    let Some(cg) = Delegated::new("own") else {
        return;
    };
    let script = path_str(&app("cgroup_worker.js"));
    let m = cg.start(&run_args(&script, "2", &[]), &[]);
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    assert!(
        m.log().contains("per-worker cgroups on under"),
        "{}",
        m.log()
    );
    let root = rel(&cg.dir);
    assert_eq!(cgroup_of(m.pid()), format!("/{root}/supervisor"));
    let mut seen: Vec<String> = m.workers().iter().map(|&w| cgroup_of(w)).collect();
    seen.sort();
    let dirs: Vec<String> = cg
        .worker_cgroups()
        .iter()
        .map(|d| format!("/{}", rel(d)))
        .collect();
    assert_eq!(seen, dirs, "workers and their cgroups");
    assert_eq!(dirs.len(), 2);
    let me = m.pid();
    assert!(
        dirs[0].contains(&format!("/worker-0-{me}-"))
            && dirs[1].contains(&format!("/worker-1-{me}-")),
        "{dirs:?}"
    );
    // Without the memory controller (a hybrid host), the budget says it is off.
    let controllers = std::fs::read_to_string(cg.dir.join("cgroup.controllers")).unwrap();
    assert_eq!(
        m.log().contains("memory budget off"),
        !controllers.contains("memory"),
        "{}",
        m.log()
    );
}

#[test]
fn outside_a_delegated_cgroup_per_worker_cgroups_are_off_and_say_why() {
    let script = path_str(&app("cgroup_worker.js"));
    let m = start(&run_args(&script, "1", &[]), &[]);
    assert!(m.wait_log("1/1 workers ready", T), "{}", m.log());
    assert!(
        m.log().contains("per-worker cgroups off: ")
            && m.log().contains("is not delegated to this manager"),
        "{}",
        m.log()
    );
}

#[test]
fn a_workers_child_counts_in_its_cpu_and_goes_with_it() {
    let Some(cg) = Delegated::new("cpu") else {
        return;
    };
    let script = path_str(&app("cgroup_worker.js"));
    let mut m = cg.start(&run_args(&script, "1", &["--metrics", "127.0.0.1:0"]), &[]);
    assert!(m.wait_log("1/1 workers ready", T), "{}", m.log());
    let port = m.port();
    let mport = metrics_port(&m);
    let worker = m.workers()[0];
    let (_, body) = get(port, "/burn").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let child = v["child"].as_i64().unwrap() as i32;
    assert_eq!(
        cgroup_of(child),
        cgroup_of(worker),
        "the child is in its worker's cgroup"
    );
    // The child's CPU shows in the worker's figure; the worker's own is tiny.
    let sample = r#"nodeherd_worker_cpu_seconds_total{worker="0"} "#;
    assert!(
        wait_until(T, || metric(mport, sample).unwrap_or(0.0) >= 1.0),
        "the worker's CPU does not count its child: {:?} (worker itself {:.2} s)",
        metric(mport, sample),
        proc_cpu_seconds(worker)
    );
    assert!(proc_cpu_seconds(worker) < 1.0);
    // The worker exits: the child, in a session of its own, goes with its
    // cgroup, and the cgroup is removed.
    let first = cg.worker_cgroups();
    let _ = get(port, "/exit");
    assert!(
        wait_until(T, || !pid_alive(child)),
        "the child {child} outlived its worker"
    );
    assert!(
        wait_until(T, || {
            let now = cg.worker_cgroups();
            now.len() == 1 && now != first
        }),
        "the dead worker's cgroup stayed: {:?}",
        cg.worker_cgroups()
    );
    // And at stop: a new child, the manager stopped, nothing left.
    assert!(m.wait_log("1/1 workers ready", T) && wait_until(T, || m.workers().len() == 1));
    let (_, body) = get(port, "/burn").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let child = v["child"].as_i64().unwrap() as i32;
    m.signal(libc::SIGTERM);
    assert!(m.wait_exit(T).is_some(), "{}", m.log());
    let left = std::fs::read_to_string(cg.dir.join("cgroup.events")).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(5), || !pid_alive(child)),
        "the child {child} outlived the manager; {left}"
    );
}

#[test]
fn a_process_outside_the_workers_cgroup_cannot_make_it_ready() {
    let Some(cg) = Delegated::new("ready") else {
        return;
    };
    let escape = cg.dir.join("escape");
    std::fs::create_dir(&escape).unwrap();
    let script = path_str(&app("cgroup_worker.js"));
    let m = cg.start(
        &run_args(&script, "1", &["--wait-ready", "--listen-timeout", "60000"]),
        &[("CG_ESCAPE", &path_str(&escape))],
    );
    assert!(m.wait_log("sent READY=1", T), "{}", m.log());
    std::thread::sleep(Duration::from_millis(1000));
    let log = m.log();
    assert!(
        !log.contains("worker 0 ready") && !log.contains("from outside the cgroup"),
        "a process outside the worker's cgroup spoke for it:\n{log}"
    );
}

#[test]
fn re_exec_keeps_every_worker_in_its_cgroup() {
    let Some(cg) = Delegated::new("reexec") else {
        return;
    };
    let script = path_str(&app("cgroup_worker.js"));
    let m = cg.start(&run_args(&script, "2", &["--metrics", "127.0.0.1:0"]), &[]);
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    let before: Vec<(i32, String)> = m.workers().iter().map(|&w| (w, cgroup_of(w))).collect();
    m.signal(libc::SIGUSR2);
    assert!(m.wait_log("re-executed in", T), "{}", m.log());
    let after: Vec<(i32, String)> = m.workers().iter().map(|&w| (w, cgroup_of(w))).collect();
    assert_eq!(before, after);
    assert_eq!(cgroup_of(m.pid()), format!("/{}/supervisor", rel(&cg.dir)));
    // The new program knows them: a worker's exit removes its cgroup.
    let port = m.port();
    let first = cg.worker_cgroups();
    let _ = get(port, "/exit");
    assert!(
        wait_until(T, || {
            let now = cg.worker_cgroups();
            now.len() == 2 && now != first
        }),
        "after re-exec, the dead worker's cgroup stayed: {:?}\n{}",
        cg.worker_cgroups(),
        m.log()
    );
}

#[test]
fn a_memory_budget_sizes_the_heap_and_says_when_its_controller_is_missing() {
    let Some(cg) = Delegated::new("budget") else {
        return;
    };
    let dir = tempdir::Dir::new("cg-budget");
    let config = one_app(
        &dir,
        "budget",
        "cgroup_worker.js",
        r#""instances": 1, "max_memory": "128M", "pids_max": 64, "cpu_weight": 50"#,
    );
    let m = cg.start(
        &[
            "run",
            &path_str(&config),
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[],
    );
    assert!(m.wait_log("1/1 workers ready", T), "{}", m.log());
    let (_, body) = get(m.port(), "/").unwrap();
    assert!(body.contains("--max-old-space-size=96"), "{body}");
    let leaf = &cg.worker_cgroups()[0];
    let controllers = std::fs::read_to_string(cg.dir.join("cgroup.controllers")).unwrap();
    if controllers.contains("memory") {
        assert_eq!(
            std::fs::read_to_string(leaf.join("memory.max"))
                .unwrap()
                .trim(),
            (128u64 << 20).to_string()
        );
    } else {
        assert!(
            m.log().contains(
                "memory budget off: the memory controller is not available in this cgroup"
            ),
            "{}",
            m.log()
        );
        assert!(!leaf.join("memory.max").exists());
    }
    if !controllers.contains("pids") {
        assert!(m.log().contains("pids limit off"), "{}", m.log());
    }
}

#[test]
fn an_app_that_sizes_its_own_heap_keeps_it() {
    let Some(cg) = Delegated::new("heap") else {
        return;
    };
    let dir = tempdir::Dir::new("cg-heap");
    let config = one_app(
        &dir,
        "heap",
        "cgroup_worker.js",
        r#""instances": 1, "max_memory": "128M", "node_args": "--max-old-space-size=200""#,
    );
    let m = cg.start(
        &[
            "run",
            &path_str(&config),
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[],
    );
    assert!(m.wait_log("1/1 workers ready", T), "{}", m.log());
    let (_, body) = get(m.port(), "/").unwrap();
    assert!(
        body.contains("--max-old-space-size=200") && !body.contains("=96"),
        "{body}"
    );
}

#[test]
fn two_apps_in_one_cgroup_never_share_a_workers_cgroup() {
    let Some(cg) = Delegated::new("herd") else {
        return;
    };
    let dir = tempdir::Dir::new("cg-herd");
    let eco = serde_json::json!({"apps": [
        {"name": "one", "script": app("cgroup_worker.js"), "instances": 1, "listen": "127.0.0.1:0"},
        {"name": "two", "script": app("cgroup_worker.js"), "instances": 1, "listen": "127.0.0.1:0"},
    ]});
    let file = path_str(&dir.write("ecosystem.json", &eco.to_string()));
    let m = cg.start(&["run", &file, "--no-bus"], &[]);
    assert!(
        wait_until(T, || m.log().matches("1/1 workers ready").count() == 2),
        "{}",
        m.log()
    );
    // A manager per app, each with its worker in a cgroup of its own.
    let managers = m.workers();
    let workers: Vec<i32> = managers.iter().flat_map(|&p| children(p)).collect();
    assert_eq!(workers.len(), 2, "{}", m.log());
    let (a, b) = (cgroup_of(workers[0]), cgroup_of(workers[1]));
    assert!(
        a.contains("/worker-0-") && b.contains("/worker-0-") && a != b,
        "{a} {b}"
    );
    assert_eq!(cg.worker_cgroups().len(), 2);
}
