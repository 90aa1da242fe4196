//! What the integration tests share: starting the real binary, talking HTTP
//! to it, reading a real notify socket, and a private real dbus-daemon.
//! Every process started here is ended by its pid when its guard drops,
//! whatever the test's outcome.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_nodeherd");

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn app(name: &str) -> PathBuf {
    repo().join("tests/apps").join(name)
}

/// Poll `f` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port that was free a moment ago on 127.0.0.1. Racy (another process
/// may take it before it is used): only for tests where something other
/// than nodeherd binds it (systemd-socket-activate). Otherwise pass
/// `--listen 127.0.0.1:0` and read [`Manager::port`].
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.0 GET on a new connection: (status, body).
pub fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {buf:?}")))?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// GET / and parse the JSON body.
pub fn get_json(port: u16) -> std::io::Result<serde_json::Value> {
    let (status, body) = get(port, "/")?;
    if status != 200 {
        return Err(std::io::Error::other(format!("status {status}: {body}")));
    }
    serde_json::from_str(&body).map_err(std::io::Error::other)
}

/// Ask until every instance in `want` has answered; returns instance → pid.
pub fn instances_answering(
    port: u16,
    want: usize,
    timeout: Duration,
) -> std::collections::BTreeMap<String, u64> {
    let mut seen = std::collections::BTreeMap::new();
    wait_until(timeout, || {
        if let Ok(v) = get_json(port) {
            let inst = v["instance"].as_str().unwrap_or("?").to_string();
            seen.insert(inst, v["pid"].as_u64().unwrap_or(0));
        }
        seen.len() >= want
    });
    seen
}

pub fn pid_alive(pid: i32) -> bool {
    // A zombie still "exists" for kill(0); look at /proc state instead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub fn kill(pid: i32, sig: i32) {
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Direct children of `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// A running `nodeherd run`, killed (with its workers) when dropped.
pub struct Manager {
    pub child: Child,
    pub log: Arc<Mutex<String>>,
    pub stdout: Arc<Mutex<String>>,
    /// Set when the stderr collector has read to the end.
    pub log_done: Arc<std::sync::atomic::AtomicBool>,
}

impl Manager {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    /// Wait for the exit status, up to `timeout`, and then for the log to
    /// be read to its end (the manager writes it from a thread of its own).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        if status.is_some() {
            wait_until(Duration::from_secs(10), || {
                self.log_done.load(std::sync::atomic::Ordering::SeqCst)
            });
        }
        status
    }

    pub fn signal(&self, sig: i32) {
        kill(self.pid(), sig);
    }

    /// The ports of the sockets the manager bound (`--listen 127.0.0.1:0`
    /// lets the kernel choose; the manager logs what it got). Waits for the
    /// log line, so a test never races another process for a free port.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports = Vec::new();
        wait_until(Duration::from_secs(20), || {
            ports = self
                .log()
                .lines()
                .filter_map(|l| l.split_once("socket: ").map(|(_, rest)| rest))
                .filter_map(|rest| {
                    let addr = rest.split_whitespace().nth(1)?;
                    addr.rsplit_once(':')?.1.parse::<u16>().ok()
                })
                .collect();
            !ports.is_empty()
        });
        assert!(
            !ports.is_empty(),
            "the manager logged no socket:\n{}",
            self.log()
        );
        ports
    }

    /// The port of the one socket the manager bound.
    pub fn port(&self) -> u16 {
        self.ports()[0]
    }

    /// Worker pids: the manager's children.
    pub fn workers(&self) -> Vec<i32> {
        children(self.pid())
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let workers = self.workers();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Workers die with the manager (parent-death signal); make sure anyway.
        for w in workers {
            kill(-w, libc::SIGKILL);
            kill(w, libc::SIGKILL);
        }
    }
}

/// `nodeherd run CONFIG` on a free loopback port (see [`Manager::port`]),
/// served on `bus` or on no bus at all.
pub fn start_config(config: &Path, bus: Option<&DbusDaemon>) -> Manager {
    let config = path_str(config);
    let mut args = vec!["run", &config, "--listen", "127.0.0.1:0"];
    match bus {
        Some(b) => args.extend(["--bus", &b.address]),
        None => args.push("--no-bus"),
    }
    start(&args, &[])
}

/// `nodeherd run` on the test app `script` with `instances` workers, on a
/// free loopback port and no bus.
pub fn start_app(script: &str, instances: u32) -> Manager {
    let instances = instances.to_string();
    let script = path_str(&app(script));
    start(
        &[
            "run",
            &script,
            "-i",
            &instances,
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[],
    )
}

/// `nodeherd run` of env.js named `name`, 2 workers, with its runtime
/// directory in `rt` and a bus address where no bus listens: the clients
/// reach it through its control socket. Returns the manager and that
/// address, for the clients' `--bus`.
pub fn start_without_bus(name: &str, rt: &str) -> (Manager, String) {
    let no_bus = format!("unix:path={rt}/no-bus-here");
    let script = path_str(&app("env.js"));
    let m = start(
        &[
            "run",
            &script,
            "--name",
            name,
            "-i",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--bus",
            &no_bus,
        ],
        &[("XDG_RUNTIME_DIR", rt)],
    );
    (m, no_bus)
}

/// Start `nodeherd` with `args`; stdout and stderr are collected.
pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Manager {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("RUNTIME_DIRECTORY");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    spawn_collecting(cmd)
}

pub fn spawn_collecting(mut cmd: Command) -> Manager {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("starting nodeherd");
    let log = Arc::new(Mutex::new(String::new()));
    let stdout = Arc::new(Mutex::new(String::new()));
    let log_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    collect(
        child.stderr.take().unwrap(),
        log.clone(),
        true,
        Some(log_done.clone()),
    );
    collect(child.stdout.take().unwrap(), stdout.clone(), false, None);
    Manager {
        child,
        log,
        stdout,
        log_done,
    }
}

fn collect(
    r: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
    echo: bool,
    done: Option<Arc<std::sync::atomic::AtomicBool>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if echo {
                eprintln!("  | {line}");
            }
            let mut s = into.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
        if let Some(d) = done {
            d.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
}

/// `nodeherd run TARGET --listen 127.0.0.1:0 --no-bus EXTRA...`: an app on
/// a port the kernel picks (read it with [`Manager::port`]), with no bus.
pub fn run_app(target: &Path, extra: &[&str], env: &[(&str, &str)]) -> Manager {
    let target = path_str(target);
    let mut args = vec![
        "run",
        target.as_str(),
        "--listen",
        "127.0.0.1:0",
        "--no-bus",
    ];
    args.extend_from_slice(extra);
    start(&args, env)
}

/// Run `nodeherd` to completion (for bad-input tests): (exit code, stderr).
pub fn run_to_end(args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    let mut m = start(args, &[]);
    let status = m.wait_exit(timeout);
    (status.and_then(|s| s.code()), m.log())
}

/// A notify socket like systemd's, recording every datagram.
pub struct NotifySocket {
    pub path: PathBuf,
    pub messages: Arc<Mutex<Vec<String>>>,
    _dir: tempdir::Dir,
}

impl NotifySocket {
    pub fn new() -> NotifySocket {
        let dir = tempdir::Dir::new("notify");
        let path = dir.path.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let m = messages.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                m.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).to_string());
            }
        });
        NotifySocket {
            path,
            messages,
            _dir: dir,
        }
    }

    pub fn all(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    /// Wait until some message contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.all().iter().any(|m| m.contains(needle)))
    }

    pub fn env(&self) -> (&'static str, String) {
        ("NOTIFY_SOCKET", self.path.display().to_string())
    }
}

/// A private real dbus-daemon, killed by pid when dropped.
pub struct DbusDaemon {
    pub address: String,
    pub pid: i32,
    _dir: tempdir::Dir,
}

impl DbusDaemon {
    pub fn start() -> DbusDaemon {
        Self::start_in(tempdir::Dir::new("dbus"))
    }

    /// Stop this daemon and start a new one on the same socket path.
    pub fn restart(self) -> DbusDaemon {
        let pid = self.pid;
        kill(pid, libc::SIGTERM);
        assert!(
            wait_until(Duration::from_secs(10), || !pid_alive(pid)),
            "dbus-daemon {pid} did not stop"
        );
        let dir = tempdir::Dir {
            path: self._dir.path.clone(),
        };
        std::mem::forget(self);
        let _ = std::fs::remove_file(dir.path.join("bus.sock"));
        Self::start_in(dir)
    }

    fn start_in(dir: tempdir::Dir) -> DbusDaemon {
        let sock = dir.path.join("bus.sock");
        let conf = dir.path.join("bus.conf");
        std::fs::write(
            &conf,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                sock.display()
            ),
        )
        .unwrap();
        let out = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .args(["--fork", "--print-address=1", "--print-pid=1"])
            .stdin(Stdio::null())
            .output()
            .expect("dbus-daemon must be installed (apt-get install dbus)");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut lines = text.lines();
        let address = lines
            .next()
            .expect("dbus-daemon printed its address")
            .trim()
            .to_string();
        let pid: i32 = lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("dbus-daemon printed its pid");
        DbusDaemon {
            address,
            pid,
            _dir: dir,
        }
    }

    /// Run busctl against this bus: (exit code, stdout, stderr).
    pub fn busctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new("busctl")
            .arg(format!("--address={}", self.address))
            .args(args)
            .output()
            .expect("busctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// Wait until `name` is owned on this bus.
    pub fn wait_name(&self, name: &str, timeout: Duration) -> bool {
        wait_until(timeout, || {
            let (_, out, _) = self.busctl(&["list", "--no-pager", "--no-legend"]);
            out.lines()
                .any(|l| l.split_whitespace().next() == Some(name))
        })
    }
}

impl Drop for DbusDaemon {
    fn drop(&mut self) {
        kill(self.pid, libc::SIGTERM);
    }
}

/// Run the nodeherd CLI client to completion: (exit code, stdout, stderr).
pub fn client(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Run the client with `XDG_RUNTIME_DIR=rt`, where a manager started with
/// the same keeps its control socket: (exit code, stderr).
pub fn client_in(rt: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("XDG_RUNTIME_DIR", rt)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A private runtime directory (0700, as systemd makes one) and a
/// temporary directory like /tmp (1777), for tests that run the clients as
/// they run on a host.
pub fn runtime_and_tmp(tag: &str) -> (tempdir::Dir, tempdir::Dir) {
    use std::os::unix::fs::PermissionsExt;
    let rt = tempdir::Dir::new(&format!("{tag}-rt"));
    std::fs::set_permissions(&rt.path, std::fs::Permissions::from_mode(0o700)).unwrap();
    let tmp = tempdir::Dir::new(&format!("{tag}-tmp"));
    std::fs::set_permissions(&tmp.path, std::fs::Permissions::from_mode(0o1777)).unwrap();
    (rt, tmp)
}

pub mod tempdir {
    use std::path::PathBuf;

    /// A directory removed when dropped.
    pub struct Dir {
        pub path: PathBuf,
    }

    impl Dir {
        pub fn new(tag: &str) -> Dir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("nodeherd-test-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Dir { path }
        }

        pub fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.path.join(name);
            std::fs::write(&p, text).unwrap();
            p
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Write a one-app ecosystem file `<name>.json` in `dir` running tests/apps/`script`;
/// `fields` are the app's other keys as JSON (`"instances":2`), or empty.
pub fn one_app(dir: &tempdir::Dir, name: &str, script: &str, fields: &str) -> PathBuf {
    let mut app_json = serde_json::json!({"name": name, "script": app(script)});
    if !fields.is_empty() {
        let extra: serde_json::Value =
            serde_json::from_str(&format!("{{{fields}}}")).expect("valid JSON fields");
        for (k, v) in extra.as_object().unwrap() {
            app_json[k] = v.clone();
        }
    }
    dir.write(
        &format!("{name}.json"),
        &serde_json::json!({ "apps": [app_json] }).to_string(),
    )
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Make sure the npm packages the tests use are installed (express).
pub fn ensure_npm_deps() {
    let dir = repo().join("tests/apps");
    let installed = || {
        ["express", "prom-client"]
            .iter()
            .all(|p| dir.join(format!("node_modules/{p}/package.json")).exists())
    };
    if installed() {
        return;
    }
    static ONCE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = ONCE.lock().unwrap();
    if installed() {
        return;
    }
    let st = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir)
        .status()
        .expect("npm");
    assert!(st.success(), "npm install in tests/apps failed");
}

/// Clients asking GET / on new connections until stopped (or dropped):
/// every answer (status, body) and every failure, for the tests that count
/// failed requests across a reload.
pub struct GetLoad {
    stop: Arc<std::sync::atomic::AtomicBool>,
    answers: Arc<Mutex<Vec<(u16, String)>>>,
    errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl GetLoad {
    pub fn start(port: u16, clients: usize) -> GetLoad {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, answers, errors) = (stop.clone(), answers.clone(), errors.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match get(port, "/") {
                            Ok(a) => answers.lock().unwrap().push(a),
                            Err(e) => errors.lock().unwrap().push(e.to_string()),
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        GetLoad {
            stop,
            answers,
            errors,
            threads,
        }
    }

    /// How many answers so far.
    pub fn answered(&self) -> usize {
        self.answers.lock().unwrap().len()
    }

    /// Stop the clients: (answers, failures).
    pub fn finish(mut self) -> (Vec<(u16, String)>, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let answers = std::mem::take(&mut *self.answers.lock().unwrap());
        let errors = std::mem::take(&mut *self.errors.lock().unwrap());
        (answers, errors)
    }
}

impl Drop for GetLoad {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `nodeherd run CONFIG` with systemd's `STATE_DIRECTORY` at `state`, on
/// a private bus or with none.
pub fn start_with_state(cfg: &Path, state: &Path, bus: Option<&DbusDaemon>) -> Manager {
    let cfg = path_str(cfg);
    let state = path_str(state);
    let mut args = vec!["run", &cfg, "--listen", "127.0.0.1:0"];
    match bus {
        Some(b) => args.extend(["--bus", &b.address]),
        None => args.push("--no-bus"),
    }
    start(&args, &[("STATE_DIRECTORY", &state)])
}
