//! What a PM2 user types in the first hour (issue 30), against the real
//! binary: real managers on a private dbus-daemon or on no bus at all
//! (the clients then find them by their control sockets), real node
//! workers, and a real systemd-journald in a mount namespace of its own
//! for `nodeherd logs`.
//!
//! Every client here runs with `XDG_RUNTIME_DIR` and `TMPDIR` of the test's
//! own, so the managers other suites start at the same time are never
//! listed, reached or stopped.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);
const NOBODY: u32 = 65534;

/// A host as the clients see it: a runtime directory of root's own and a
/// temporary directory like /tmp (1777), both private to the test.
struct Host {
    rt: tempdir::Dir,
    tmp: tempdir::Dir,
}

impl Host {
    fn new(tag: &str) -> Host {
        let (rt, tmp) = runtime_and_tmp(tag);
        Host { rt, tmp }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("XDG_RUNTIME_DIR", path_str(&self.rt.path)),
            ("TMPDIR", path_str(&self.tmp.path)),
        ]
    }

    /// `nodeherd ARGS` on this host.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .stdin(Stdio::null())
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("MAINPID")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM");
        for (k, v) in self.env() {
            c.env(k, v);
        }
        c
    }

    /// Run a client to its end: (exit code, stdout, stderr).
    fn client(&self, args: &[&str]) -> (i32, String, String) {
        output(self.cmd(args))
    }

    /// `nodeherd run SCRIPT --name NAME -i N --listen 127.0.0.1:0 EXTRA...`
    /// on this host.
    fn run(&self, script: &Path, name: &str, n: u32, extra: &[&str]) -> Manager {
        let (script, n) = (path_str(script), n.to_string());
        let mut args = vec![
            "run",
            &script,
            "--name",
            name,
            "-i",
            &n,
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        start(&args, &env)
    }

    /// A manager of `name` on no bus at all: the clients find it by its
    /// control socket.
    fn run_without_bus(&self, name: &str, n: u32) -> Manager {
        let m = self.run(&app("env.js"), name, n, &["--no-bus"]);
        assert!(
            m.wait_log(&format!("{n}/{n} workers ready"), T),
            "{}",
            m.log()
        );
        m
    }
}

fn output(mut cmd: Command) -> (i32, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// `nodeherd status APP --json` on `host`, parsed.
fn status_json(host: &Host, extra: &[&str]) -> serde_json::Value {
    let (code, out, err) = host.client(&[&["status", "--json"][..], extra].concat());
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

// --- a wrong name -----------------------------------------------------------

#[test]
fn a_wrong_app_name_lists_the_apps_that_run_on_the_bus() {
    let host = Host::new("wrong-bus");
    let bus = DbusDaemon::start();
    let m = host.run(&app("env.js"), "web", 2, &["--bus", &bus.address]);
    assert!(bus.wait_name("org.nodeherd.web", T), "{}", m.log());
    for verb in [
        &["status", "nosuchapp"][..],
        &["reload", "nosuchapp"],
        &["restart", "nosuchapp"],
        &["scale", "nosuchapp", "3"],
    ] {
        let (code, _, err) = host.client(&[verb, &["--bus", &bus.address]].concat());
        assert_eq!(code, 3, "{verb:?}: {err}");
        assert_eq!(
            err.trim(),
            "nodeherd: no app nosuchapp; running: web",
            "{verb:?}"
        );
    }
    // The system bus is not there at all: the same answer, from the
    // control sockets, not "cannot connect to the system bus".
    let (code, _, err) = host.client(&["status", "nosuchapp"]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(err.trim(), "nodeherd: no app nosuchapp; running: web");
}

#[test]
fn without_a_bus_a_wrong_app_name_lists_the_apps_that_run() {
    let host = Host::new("wrong-nobus");
    let mut web = host.run_without_bus("web", 1);
    let _api = host.run_without_bus("api", 1);
    for verb in [
        &["status", "nosuchapp"][..],
        &["reload", "nosuchapp"],
        &["restart", "nosuchapp"],
        &["scale", "nosuchapp", "+1"],
    ] {
        let (code, _, err) = host.client(verb);
        assert_eq!(code, 3, "{verb:?}: {err}");
        assert_eq!(
            err.trim(),
            "nodeherd: no app nosuchapp; running: api, web",
            "{verb:?}"
        );
        assert!(!err.contains("bus"), "{err}");
    }
    drop(_api);
    web.signal(libc::SIGTERM);
    assert!(web.wait_exit(T).is_some());
    let (code, _, err) = host.client(&["status", "web"]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(err.trim(), "nodeherd: no app web; none is running");
}

/// Another local user's manager in the shared temporary directory is not
/// one of root's apps: not named in the list, not listed by `ls`, not
/// stopped by `stop`.
#[test]
fn another_users_manager_is_neither_listed_nor_stopped() {
    let host = Host::new("others");
    let _web = host.run_without_bus("web", 1);
    let script = path_str(&app("env.js"));
    let mut cmd = host.cmd(&[
        "run",
        &script,
        "--name",
        "shop",
        "-i",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--no-bus",
    ]);
    cmd.env_remove("XDG_RUNTIME_DIR").uid(NOBODY).gid(NOBODY);
    let shop = spawn_collecting(cmd);
    assert!(shop.wait_log("1/1 workers ready", T), "{}", shop.log());

    let (code, _, err) = host.client(&["status", "nosuchapp"]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(err.trim(), "nodeherd: no app nosuchapp; running: web");
    let (code, out, err) = host.client(&["ls"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("shop"), "{out}");
    assert!(err.contains("uid 65534"), "says what it passed over: {err}");
    let (code, _, err) = host.client(&["stop", "shop"]);
    assert_eq!(code, 3, "{err}");
    assert!(pid_alive(shop.pid()), "root stopped nobody's manager");
    let (code, _, err) = host.client(&["stop", "all"]);
    assert_eq!(code, 0, "{err}");
    assert!(pid_alive(shop.pid()), "`stop all` stopped nobody's manager");
}

// --- status -----------------------------------------------------------------

#[test]
fn status_shows_the_managers_pid() {
    let host = Host::new("pid");
    let bus = DbusDaemon::start();
    let m = host.run(&app("env.js"), "web", 2, &["--bus", &bus.address]);
    assert!(bus.wait_name("org.nodeherd.web", T), "{}", m.log());
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    let (code, out, err) = host.client(&["status", "web", "--bus", &bus.address]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "manager pid {} (bus name org.nodeherd.web)",
            m.pid()
        )),
        "{out}"
    );
    let v = status_json(&host, &["web", "--bus", &bus.address]);
    assert_eq!(v["manager_pid"], m.pid(), "{v}");
    assert_eq!(v["via"]["bus_name"], "org.nodeherd.web", "{v}");
    // A reader that goes away early (`| head -1`, `| grep -q`) is no error.
    let mut early = host.cmd(&["status", "web", "--bus", &bus.address]);
    let mut child = early
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    // Through the control socket: the kernel's word for it.
    let solo = host.run_without_bus("solo", 1);
    let v = status_json(&host, &["solo"]);
    assert_eq!(v["manager_pid"], solo.pid(), "{v}");
    assert!(
        v["via"]["control_socket"]
            .as_str()
            .is_some_and(|p| p.ends_with("control.sock")),
        "{v}"
    );
}

#[test]
fn clients_say_success_on_stdout_and_errors_on_stderr() {
    let host = Host::new("stdout");
    let _m = host.run_without_bus("web", 1);
    for (args, says) in [
        (&["scale", "web", "2"][..], "web now runs 2 worker(s)"),
        (&["reload", "web"], "reload finished"),
        (&["restart", "web"], "restarted"),
    ] {
        let (code, out, err) = host.client(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.contains(says), "{args:?}: stdout {out:?}");
        assert!(err.is_empty(), "{args:?}: stderr {err:?}");
    }
    let (code, out, err) = host.client(&["scale", "web", "0"]);
    assert_eq!(code, 2);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("between 1 and 1024"), "{err}");
}

/// A worker's `STATUS=` text reaches the reader's terminal shown, not
/// sent: no escape sequence of an app's gets through. (An app's name
/// cannot hold one: the configuration refuses it.)
#[test]
fn a_workers_status_text_cannot_drive_the_terminal() {
    let host = Host::new("esc");
    let dir = tempdir::Dir::new("esc-app");
    let script = dir.write(
        "status.js",
        r#"
const { execFileSync } = require('child_process');
const send = `import os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"STATUS=ok \x1b]0;owned\x07\x1b[2J", os.environ["NOTIFY_SOCKET"])`;
execFileSync('python3', ['-c', send]);
require('http').createServer((q, r) => r.end('x')).listen(8000);
"#,
    );
    let m = host.run(&script, "esc", 1, &["--no-bus"]);
    assert!(m.wait_log("1/1 workers ready", T), "{}", m.log());
    let mut out = String::new();
    assert!(
        wait_until(T, || {
            out = host.client(&["status"]).1;
            out.contains("says")
        }),
        "{out}"
    );
    assert!(!out.contains('\x1b'), "an escape got through: {out:?}");
    assert!(!out.contains('\x07'), "a bell got through: {out:?}");
    // The manager already turns a worker's control characters into spaces
    // (`logs::clean`); the client escapes whatever would still come.
    assert!(out.contains("]0;owned"), "{out}");
}

// --- run: the smaller things ------------------------------------------------

#[test]
fn a_repeated_listen_is_a_usage_error_naming_it() {
    let script = path_str(&app("env.js"));
    let port = free_port().to_string();
    let twice = format!("127.0.0.1:{port}");
    let all = format!("0.0.0.0:{port}");
    for (a, b, says) in [
        (&twice, &twice, format!("--listen {twice}: given twice")),
        (
            &port,
            &all,
            format!("--listen {all}: the same address as --listen {port}"),
        ),
    ] {
        let (code, err) = run_to_end(
            &["run", &script, "--listen", a, "--listen", b, "--no-bus"],
            T,
        );
        assert_eq!(code, Some(2), "{err}");
        assert!(!err.contains("already in use"), "{err}");
        assert!(err.contains(&says), "{says} missing: {err}");
    }
}

#[test]
fn the_logged_start_command_quotes_paths_with_spaces() {
    let dir = tempdir::Dir::new("my app");
    let sub = dir.path.join("my app");
    std::fs::create_dir_all(&sub).unwrap();
    let script = sub.join("server.js");
    std::fs::copy(app("env.js"), &script).unwrap();
    let m = run_app(&script, &[], &[]);
    assert!(m.wait_log("1/1 workers ready", T), "{}", m.log());
    let line = m
        .log()
        .lines()
        .find(|l| l.contains("starting 1 worker(s)"))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.ends_with(&format!("'{}'", script.display())),
        "a shell would split it: {line}"
    );
}

/// After `scale -1` the slot that goes shows `draining`, not `ready`,
/// while its accept queue empties: its worker is stuck here, so connections
/// wait in that queue and the drain takes its whole bound (1 s).
#[test]
fn a_slot_scaled_away_shows_draining_not_ready() {
    let host = Host::new("drain");
    let dir = tempdir::Dir::new("drain-app");
    let script = dir.write(
        "stuck.js",
        r#"
const http = require('http');
http.createServer((q, r) => r.end(String(process.env.NODE_APP_INSTANCE))).listen(8000, () => {
  if (process.env.NODE_APP_INSTANCE === '1') setTimeout(() => { for (;;) {} }, 300);
});
"#,
    );
    let m = host.run(
        &script,
        "drain",
        2,
        &["--no-bus", "--balance", "reuseport", "--no-rebalance"],
    );
    let port = m.port();
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    std::thread::sleep(Duration::from_millis(500));
    // Connections that land on slot 1 wait in its queue: nobody accepts them.
    let held: Vec<std::net::TcpStream> = (0..40)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert!(held.len() > 10);
    let (code, _, err) = host.client(&["scale", "drain", "1"]);
    assert_eq!(code, 0, "{err}");
    let v = status_json(&host, &["drain"]);
    let states: Vec<(u64, String)> = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["instance"].as_u64().unwrap(),
                w["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        states.contains(&(1, "draining".to_string())),
        "slot 1 goes: {states:?}"
    );
    assert!(!states.contains(&(1, "ready".to_string())), "{states:?}");
    drop(held);
}

// --- ls ---------------------------------------------------------------------

#[test]
fn ls_lists_installed_and_running_apps() {
    let host = Host::new("ls");
    let etc = tempdir::Dir::new("ls-etc");
    etc.write("api.json", r#"{"apps":[{"name":"api","script":"api.js"}]}"#);
    etc.write("web.config.js", "module.exports = {apps: []}");
    let bus = DbusDaemon::start();
    let web = host.run(&app("env.js"), "web", 2, &["--bus", &bus.address]);
    assert!(bus.wait_name("org.nodeherd.web", T), "{}", web.log());
    assert!(web.wait_log("2/2 workers ready", T), "{}", web.log());
    let solo = host.run_without_bus("solo", 1);
    let etc_dir = path_str(&etc.path);
    let ls = |json: bool| {
        let mut a = vec!["ls", "--config-dir", &etc_dir, "--bus", &bus.address];
        if json {
            a.push("--json");
        }
        host.client(&a)
    };
    let (code, out, err) = ls(false);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0][..6],
        ["app", "state", "workers", "restarts", "memory", "pid"]
    );
    let row = |app: &str| {
        rows.iter()
            .find(|r| r[0] == app)
            .unwrap_or_else(|| panic!("{app} missing:\n{out}"))
            .clone()
    };
    assert_eq!(row("api")[1..3], ["stopped", "-"], "{out}");
    let web_row = row("web");
    assert_eq!(web_row[1..4], ["ready", "2/2", "0"], "{out}");
    assert!(web_row.contains(&web.pid().to_string().as_str()), "{out}");
    assert!(out.contains("bus name org.nodeherd.web"), "{out}");
    let solo_row = row("solo");
    assert_eq!(solo_row[1..3], ["ready", "1/1"], "{out}");
    assert!(solo_row.contains(&solo.pid().to_string().as_str()), "{out}");
    assert_eq!(rows.len(), 4, "api, solo, web once each:\n{out}");

    let (code, out, err) = ls(true);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let apps = v["apps"].as_array().unwrap();
    let of = |name: &str| apps.iter().find(|a| a["name"] == name).unwrap().clone();
    assert_eq!(of("web")["manager_pid"], web.pid());
    assert_eq!(of("web")["ready_workers"], 2);
    assert_eq!(
        of("web")["config"],
        path_str(&etc.path.join("web.config.js"))
    );
    assert!(of("web")["memory_bytes"].as_u64().unwrap() > 1 << 20);
    assert_eq!(of("api")["state"], "stopped");
    assert_eq!(of("api")["manager_pid"], serde_json::Value::Null);
    assert_eq!(of("solo")["manager_pid"], solo.pid());
    assert_eq!(v["systemd"], false);
    // `list` is the same command.
    let (code, out2, _) = host.client(&["list", "--config-dir", &etc_dir, "--bus", &bus.address]);
    assert_eq!(code, 0);
    assert!(out2.contains("solo"), "{out2}");
}

// --- start, stop, delete ----------------------------------------------------

#[test]
fn stop_ends_a_manager_run_by_hand_and_every_worker() {
    let host = Host::new("stop");
    // Its workers take 600 ms to leave: `stop` must wait for them.
    let script = path_str(&app("env.js"));
    let mut env = host.env();
    env.push(("LINGER_MS", "600".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut m = start(
        &[
            "run",
            &script,
            "--name",
            "web",
            "-i",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &env,
    );
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    let workers = m.workers();
    assert_eq!(workers.len(), 2);
    let (code, out, err) = host.client(&["stop", "web"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("nodeherd: stopped web (manager pid {}", m.pid())),
        "{out}"
    );
    // It returned once the manager was gone, and the manager once every
    // worker was: a graceful stop, exit status 0.
    let st = m
        .wait_exit(Duration::from_millis(100))
        .expect("gone when stop returns");
    assert_eq!(st.code(), Some(0), "{}", m.log());
    for w in workers {
        assert!(!pid_alive(w), "worker {w} outlived its manager");
    }
    assert!(!m.log().contains("killing every worker"), "{}", m.log());
    let (code, _, err) = host.client(&["stop", "web"]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(err.trim(), "nodeherd: no app web; none is running");

    // On the bus: the bus's word for its pid.
    let bus = DbusDaemon::start();
    let mut m = host.run(&app("env.js"), "api", 1, &["--bus", &bus.address]);
    assert!(bus.wait_name("org.nodeherd.api", T), "{}", m.log());
    let (code, out, err) = host.client(&["stop", "api", "--bus", &bus.address]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("found by its bus name org.nodeherd.api"),
        "{out}"
    );
    assert!(m.wait_exit(Duration::from_secs(1)).is_some());
}

#[test]
fn start_runs_in_the_foreground_without_systemd_and_refuses_a_second_one() {
    let host = Host::new("start");
    let script = path_str(&app("env.js"));
    let args = [
        "start",
        &script,
        "--name",
        "web",
        "-i",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--no-bus",
    ];
    let env = host.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let m = start(&args, &env);
    assert!(
        m.wait_log(
            "starting web in the foreground (systemd does not run here)",
            T
        ),
        "{}",
        m.log()
    );
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    assert_eq!(instances_answering(m.port(), 2, T).len(), 2);
    // A second start of the same app: refused, pointing at reload (and
    // ended here if it was not).
    let mut second = spawn_collecting(host.cmd(&args));
    let code = second.wait_exit(T).and_then(|s| s.code()).unwrap_or(-1);
    let err = second.log();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("web already runs (manager pid {}", m.pid()))
            && err.contains("nodeherd reload web"),
        "{err}"
    );
    // A name that is neither a file nor an installed app.
    let (code, _, err) = host.client(&["start", "nosuchthing"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no app nosuchthing is installed"), "{err}");
}

#[test]
fn delete_stops_the_app_and_undoes_install() {
    let host = Host::new("delete");
    let etc = tempdir::Dir::new("delete-etc");
    let units = tempdir::Dir::new("delete-units");
    let etc_dir = path_str(&etc.path);
    let unit_dir = path_str(&units.path);
    // What `nodeherd install` writes for an app.
    etc.write(
        "web.json",
        r#"{"installed_from":"/srv/web/ecosystem.config.js","apps":[{"name":"web","script":"app.js"}]}"#,
    );
    let m = host.run_without_bus("web", 1);
    let dirs = [
        "--config-dir",
        etc_dir.as_str(),
        "--unit-dir",
        unit_dir.as_str(),
    ];
    let (code, out, err) = host.client(&[&["delete", "web", "--dry-run"][..], &dirs].concat());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("--- would stop web (manager pid {})", m.pid())),
        "{out}"
    );
    assert!(
        out.contains("would run: systemctl disable --now nodeherd@web.service nodeherd@web.socket"),
        "{out}"
    );
    assert!(
        out.contains(&format!("would remove {etc_dir}/web.json")),
        "{out}"
    );
    assert!(pid_alive(m.pid()), "a dry run stopped it");
    assert!(etc.path.join("web.json").exists());

    // Run by hand and not installed: delete is stop.
    let mut solo = host.run_without_bus("solo", 1);
    let (code, out, err) = host.client(&[&["delete", "solo"][..], &dirs].concat());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("stopped solo"), "{out}");
    assert!(out.contains("deleted solo: it was not installed"), "{out}");
    assert!(solo.wait_exit(Duration::from_secs(1)).is_some());
    let (code, _, err) = host.client(&[&["delete", "solo"][..], &dirs].concat());
    assert_eq!(code, 3, "{err}");
}

#[test]
fn pm2_commands_work_or_point_at_the_right_one() {
    let host = Host::new("verbs");
    for (verb, says) in [
        ("save", "nodeherd install FILE"),
        ("startup", "nodeherd install FILE --boot"),
        ("resurrect", "nodeherd start APP"),
        ("kill", "nodeherd stop APP"),
        ("jlist", "nodeherd ls --json"),
        ("update", "nodeherd reexec APP"),
    ] {
        let (code, out, err) = host.client(&[verb]);
        assert_eq!(code, 2, "{verb}: {err}");
        assert!(out.is_empty());
        assert!(
            err.starts_with(&format!("nodeherd: `{verb}` is PM2's; ")),
            "{err}"
        );
        assert!(err.contains(says), "{verb}: {err}");
        assert!(!err.contains("tip:"), "{verb}: {err}");
    }
    // PM2's own words for what nodeherd has: no look-alike suggested.
    for verb in [
        "start", "stop", "delete", "list", "ls", "logs", "show", "describe",
    ] {
        let (_, _, err) = host.client(&[verb, "--help"]);
        assert!(!err.contains("unrecognized subcommand"), "{verb}: {err}");
    }
    let (code, out, _) = host.client(&["list"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("no nodeherd app") || out.starts_with("app "),
        "{out}"
    );
    let _m = host.run_without_bus("web", 1);
    let (code, out, err) = host.client(&["show", "web"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("web: ready"), "{out}");
}

// --- logs -------------------------------------------------------------------

/// A real systemd-journald in a mount namespace of its own: its sockets
/// and its files are on tmpfs mounts nobody else sees. Its pid is the
/// namespace's: `nsenter -t PID -m` runs a program that sees this journal.
struct Journald {
    pid: i32,
    child: std::process::Child,
}

impl Journald {
    fn start() -> Journald {
        let script = "set -e
            mount -t tmpfs tmpfs /run/systemd
            mkdir -p /run/systemd/journal /run/log
            mount -t tmpfs tmpfs /run/log
            if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
            exec /lib/systemd/systemd-journald";
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare");
        let j = Journald {
            pid: child.id() as i32,
            child,
        };
        assert!(
            wait_until(T, || j.path("/run/systemd/journal/stdout").exists()),
            "journald did not start"
        );
        j
    }

    /// `p` as the namespace sees it.
    fn path(&self, p: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{p}", self.pid))
    }

    /// `cmd`, run in the namespace.
    fn enter(&self, cmd: &Command) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid.to_string(), "-m", "--"])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }

    /// A stream to the journal, as systemd gives a service for stdout and
    /// stderr, and the `JOURNAL_STREAM` that names it.
    fn stream(&self, ident: &str) -> (OwnedFd, String) {
        let mut s =
            std::os::unix::net::UnixStream::connect(self.path("/run/systemd/journal/stdout"))
                .unwrap();
        write!(s, "{ident}\n\n6\n0\n0\n0\n0\n").unwrap();
        let st = std::fs::metadata(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            s.as_raw_fd()
        }))
        .unwrap();
        (OwnedFd::from(s), format!("{}:{}", st.dev(), st.ino()))
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        kill(self.pid, libc::SIGTERM);
        if !wait_until(T, || self.child.try_wait().ok().flatten().is_some()) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A manager whose stdout and stderr are journal streams, as under systemd.
struct JournaledManager {
    child: std::process::Child,
}

impl Drop for JournaledManager {
    fn drop(&mut self) {
        let workers = children(self.child.id() as i32);
        let _ = self.child.kill();
        let _ = self.child.wait();
        for w in workers {
            kill(w, libc::SIGKILL);
        }
    }
}

const TALKER: &str = r#"
const i = process.env.NODE_APP_INSTANCE;
console.log(`hello from ${i}`);
console.error(`an error line from ${i}`);
console.log(`bell \x1b]0;owned\x07 from ${i}`);
require('http').createServer((q, r) => { console.log(`request ${q.url} on ${i}`); r.end(i); }).listen(8000);
"#;

#[test]
fn logs_show_each_workers_lines_from_the_journal() {
    let host = Host::new("logs");
    let j = Journald::start();
    let dir = tempdir::Dir::new("logs-app");
    let script = path_str(&dir.write("talker.js", TALKER));
    let (out_fd, stream) = j.stream("web");
    let err_fd = out_fd.try_clone().unwrap();
    let mut run = host.cmd(&[
        "run",
        &script,
        "--name",
        "web",
        "-i",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--no-bus",
    ]);
    run.env("JOURNAL_STREAM", &stream);
    let m = JournaledManager {
        child: j
            .enter(&run)
            .stdout(Stdio::from(out_fd))
            .stderr(Stdio::from(err_fd))
            .spawn()
            .unwrap(),
    };
    let logs = |args: &[&str]| output(j.enter(&host.cmd(&[&["logs"][..], args].concat())));
    let mut out = String::new();
    assert!(
        wait_until(T, || {
            out = logs(&["web", "--lines", "100"]).1;
            out.contains("[web:0] hello from 0")
                && out.contains("[web:1] hello from 1")
                && out.contains("nodeherd[web]: worker 1 ready")
        }),
        "manager {}: {out}",
        m.child.id()
    );
    assert!(out.contains("[web:1] an error line from 1"), "{out}");
    assert!(!out.contains('\x1b'), "an escape got through: {out:?}");
    assert!(
        out.contains("[web:0] bell \\x1b]0;owned\\x07 from 0"),
        "{out}"
    );
    // One worker's lines only.
    let (code, out, err) = logs(&["web", "-i", "1", "--lines", "100"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[web:1] hello from 1"), "{out}");
    assert!(!out.contains("[web:0]"), "{out}");
    // --lines: the last N.
    let (_, out, _) = logs(&["web", "--lines", "2"]);
    assert_eq!(out.lines().count(), 2, "{out}");
    // Without APP: every app's.
    let (_, out, _) = logs(&["--lines", "100"]);
    assert!(out.contains("[web:0] hello from 0"), "{out}");

    // -f: new lines as they come.
    let mut follow = j
        .enter(&host.cmd(&["logs", "web", "-f", "--lines", "0"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    {
        let seen = seen.clone();
        let stdout = follow.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                seen.lock().unwrap().push_str(&(l + "\n"));
            }
        });
    }
    let port = ports_of(m.child.id() as i32);
    let ok = wait_until(T, || {
        let _ = get(port, "/followed");
        seen.lock().unwrap().contains("request /followed on")
    });
    let follower = follow.id() as i32;
    for c in children(follower) {
        kill(c, libc::SIGTERM);
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(ok, "-f saw: {}", seen.lock().unwrap());
    assert!(!seen.lock().unwrap().contains("hello from"), "--lines 0");
}

/// The port a manager's workers listen on, from the workers' sockets.
fn ports_of(manager: i32) -> u16 {
    let mut port = 0;
    assert!(wait_until(T, || {
        let workers = children(manager);
        let Some(w) = workers.first() else {
            return false;
        };
        let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{w}/fd"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .map(|l| l.display().to_string())
                    .filter_map(|l| {
                        l.strip_prefix("socket:[")?
                            .strip_suffix(']')
                            .map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        port = tcp
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]))
            .find_map(|f| u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok())
            .unwrap_or(0);
        port != 0
    }));
    port
}

#[test]
fn logs_of_a_manager_run_by_hand_say_where_its_lines_go() {
    let host = Host::new("logs-hand");
    // Its stderr is a pipe (to this test): said so, with who reads it.
    let m = host.run_without_bus("web", 1);
    let (code, _, err) = host.client(&["logs", "web"]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!(
            "web's manager (pid {}) runs by hand, not under systemd: it writes its workers' \
             lines to its stderr, a pipe to the program that started it (pid {}",
            m.pid(),
            std::process::id()
        )),
        "{err}"
    );
    drop(m);
    // Its stderr is a file: shown, as `pm2 logs` shows PM2's files.
    let dir = tempdir::Dir::new("logs-file");
    let script = path_str(&dir.write("talker.js", TALKER));
    let file = dir.path.join("web.log");
    let log = std::fs::File::create(&file).unwrap();
    let mut run = host.cmd(&[
        "run",
        &script,
        "--name",
        "web",
        "-i",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--no-bus",
    ]);
    let mut child = run
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let manager = child.id() as i32;
    let mut out = String::new();
    let ok = wait_until(T, || {
        out = host.client(&["logs", "web", "-i", "1", "--lines", "50"]).1;
        out.contains("[web:1] hello from 1")
    });
    let workers = children(manager);
    let _ = child.kill();
    let _ = child.wait();
    for w in workers {
        kill(w, libc::SIGKILL);
    }
    assert!(ok, "{out}");
    assert!(!out.contains("[web:0]"), "{out}");
    assert!(!out.contains('\x1b'), "{out:?}");
}

/// Issue 27: with `out_file`/`error_file` the workers' lines are in files,
/// not where the manager's events are: `logs` names them (`-i 1`: only
/// worker 1's) and how to read them.
#[test]
fn logs_of_an_app_with_log_files_name_the_files() {
    let host = Host::new("logs-files");
    let dir = tempdir::Dir::new("logs-files");
    let script = path_str(&dir.write("talker.js", TALKER));
    let d = path_str(&dir.path);
    let cfg = dir.write(
        "web.json",
        &format!(
            r#"{{"apps":[{{"name":"web","script":"{script}","instances":2,
                "out_file":"{d}/out.log","error_file":"{d}/err.log"}}]}}"#
        ),
    );
    let env = host.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let cfg = path_str(&cfg);
    let m = start(&["run", &cfg, "--listen", "127.0.0.1:0", "--no-bus"], &env);
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    let (_, _, err) = host.client(&["logs", "web", "-i", "1", "--lines", "5"]);
    assert!(
        err.contains(&format!(
            "web's workers write their lines to files (out_file, error_file, log_file), not to \
             the journal: {d}/err-1.log, {d}/out-1.log; `tail -n 5 {d}/err-1.log {d}/out-1.log` \
             shows them"
        )),
        "{err}"
    );
    assert!(!err.contains("out-0.log"), "{err}");
    assert!(
        !err.contains("writes its workers' lines to its stderr"),
        "{err}"
    );
}
