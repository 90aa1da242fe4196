//! A compromised worker (a malicious npm dependency) tries what the manager
//! could do for it: bind a privileged port or a path it may not touch,
//! take the manager's own control socket, pile up sockets in the manager,
//! and change the preload the next worker loads. Each attempt must fail in
//! the worker, leave the manager as it was, and keep the app serving.
//!
//! Where an attempt matters only against workers of another user, they run
//! as `nobody` (65534) under this (root) manager, as `uid`/`gid` do;
//! without root those tests only check what they can.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

fn root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A directory `nobody` can read and enter (the apps live there).
fn open_dir(tag: &str) -> tempdir::Dir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempdir::Dir::new(tag);
    std::fs::set_permissions(&d.path, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Write an ecosystem file for `script` (already in `dir`) with `fields`.
fn eco(dir: &tempdir::Dir, name: &str, script: &Path, fields: serde_json::Value) -> PathBuf {
    let mut app = serde_json::json!({"name": name, "script": script});
    for (k, v) in fields.as_object().unwrap() {
        app[k] = v.clone();
    }
    dir.write(
        &format!("{name}.json"),
        &serde_json::json!({ "apps": [app] }).to_string(),
    )
}

/// The manager's private directory under the runtime base `rt`.
fn runtime_dir_of(m: &Manager, rt: &Path) -> PathBuf {
    let dir = std::fs::read_dir(rt)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&format!("-{}", m.pid())))
        });
    dir.unwrap_or_else(|| panic!("no runtime directory in {}:\n{}", rt.display(), m.log()))
}

// --- the preload ----------------------------------------------------------

/// What a compromised worker does to the preload: append code that leaves
/// a marker to everything it can find that a worker loads (the files its
/// command line names, every file in the manager's runtime directory, the
/// manager's memfds), then serve as usual.
const PLANTER: &str = r#"
const fs = require('fs');
const path = require('path');
const http = require('http');
const plant = `\n;require('fs').writeFileSync(${JSON.stringify(process.env.MARKER_DIR)} + '/planted.' + process.pid, '');\n`;
const tried = [];
const attempt = (what, f) => {
  try { f(); tried.push(`${what}: ok`); } catch (e) { tried.push(`${what}: ${e.code}`); }
};
if (process.env.ATTACK) {
  const argv = fs.readFileSync('/proc/self/cmdline', 'utf8').split('\0');
  argv.forEach((w, i) => {
    if (w === '--require' || w === '-r') attempt(`append ${argv[i + 1]}`, () => fs.appendFileSync(argv[i + 1], plant));
    const fd = /\/proc\/self\/fd\/(\d+)/.exec(decodeURIComponent(w));
    if (fd) attempt(`append fd ${fd[1]}`, () => fs.appendFileSync(`/proc/self/fd/${fd[1]}`, plant));
  });
  const dir = path.dirname(process.env.NOTIFY_SOCKET);
  for (const f of fs.readdirSync(dir)) {
    const p = path.join(dir, f);
    if (f !== 'manager.pid' && fs.statSync(p).isFile()) attempt(`append ${p}`, () => fs.appendFileSync(p, plant));
  }
  const mgr = `/proc/${process.ppid}/fd`;
  for (const fd of fs.readdirSync(mgr)) {
    let target = '';
    try { target = fs.readlinkSync(`${mgr}/${fd}`); } catch (_) { continue; }
    if (!target.startsWith('/memfd:')) continue;
    attempt(`append the manager's ${target}`, () => fs.appendFileSync(`${mgr}/${fd}`, plant));
    attempt(`truncate the manager's ${target}`, () => fs.truncateSync(`${mgr}/${fd}`, 0));
  }
  console.error(`attack: ${tried.join('; ')}`);
}
http.createServer((req, res) => res.end(JSON.stringify({ pid: process.pid }))).listen(8000);
"#;

#[test]
fn a_worker_cannot_change_the_preload_the_next_worker_loads() {
    let dir = open_dir("preload");
    let markers = dir.path.join("markers");
    std::fs::create_dir(&markers).unwrap();
    let script = dir.write("planter.js", PLANTER);
    let marker_dir = path_str(&markers);
    let write_config = |attack: bool| {
        let mut env = serde_json::json!({ "MARKER_DIR": marker_dir });
        if attack {
            env["ATTACK"] = "1".into();
        }
        eco(
            &dir,
            "planter",
            &script,
            serde_json::json!({"instances": 2, "env": env}),
        )
    };
    // Workers run as the manager's own user: the case where a file the
    // manager writes is a file the worker can rewrite.
    let cfg = write_config(true);
    let m = start_config(&cfg, None);
    let port = m.port();
    assert_eq!(instances_answering_pid(port, 2), 2, "{}", m.log());
    assert!(
        wait_until(T, || m.log().matches("attack: ").count() >= 2),
        "{}",
        m.log()
    );
    // A clean deploy, then a reload: every new worker must run clean.
    write_config(false);
    let old = m.workers();
    m.signal(libc::SIGHUP);
    assert!(m.wait_log("reload finished: 2/2", T), "{}", m.log());
    assert!(
        wait_until(T, || m.workers().iter().all(|p| !old.contains(p))),
        "{}",
        m.log()
    );
    assert_eq!(instances_answering_pid(port, 2), 2, "{}", m.log());
    let planted: Vec<String> = std::fs::read_dir(&markers)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        planted.is_empty(),
        "planted code ran in {planted:?}:\n{}",
        m.log()
    );
    // The memfd refused the writes it was offered.
    assert!(
        m.log()
            .contains("append the manager's /memfd:nodeherd-preload (deleted): EPERM"),
        "{}",
        m.log()
    );
}

/// Distinct worker pids answering on `port` (up to `want`).
fn instances_answering_pid(port: u16, want: usize) -> usize {
    let mut seen = std::collections::BTreeSet::new();
    wait_until(T, || {
        if let Ok(v) = get_json(port) {
            seen.insert(v["pid"].as_u64().unwrap_or(0));
        }
        seen.len() >= want
    });
    seen.len()
}

// --- binds on a worker's behalf -------------------------------------------

/// A worker that serves on the handed-over socket, then tries the listens
/// `TRIES` lists (JSON: `{port, host}`, `{path}`, or `{rt: NAME}` for a
/// name in the manager's runtime directory), or `FLOOD` listens on ports
/// from `FLOOD_BASE` on 127.0.0.1, and reports each outcome on stderr and
/// over HTTP.
const BINDER: &str = r#"
const http = require('http');
const net = require('net');
const path = require('path');
const results = {};
const ports = {};
http.createServer((req, res) => res.end(JSON.stringify({ pid: process.pid, uid: process.getuid(), results, ports }))).listen(8000);
const tries = JSON.parse(process.env.TRIES || '[]');
for (const t of tries) {
  const where = t.rt ? path.join(path.dirname(process.env.NOTIFY_SOCKET), t.rt) : t.path;
  const key = t.key || where || `${t.host || ''}:${t.port}`;
  const s = net.createServer((c) => c.end(`extra ${process.pid}\n`));
  s.on('error', (e) => {
    results[key] = `${e.code} ${e.syscall} ${e.message}`;
    console.error(`try ${key}: ${results[key]}`);
  });
  s.on('listening', () => {
    results[key] = 'ok';
    ports[key] = s.address() && s.address().port;
    console.error(`try ${key}: ok`);
  });
  if (where) s.listen(where);
  else if (t.host) s.listen(t.port, t.host);
  else s.listen(t.port);
}
const flood = Number(process.env.FLOOD || 0);
if (flood) {
  const counts = {};
  let left = flood;
  const done = (what) => {
    counts[what] = (counts[what] || 0) + 1;
    if (--left === 0) console.error(`flood: ${JSON.stringify(counts)}`);
  };
  for (let i = 0; i < flood; i++) {
    const s = net.createServer();
    s.on('error', (e) => done(e.code));
    s.on('listening', () => done('ok'));
    s.listen(Number(process.env.FLOOD_BASE) + i, '127.0.0.1');
  }
}
"#;

/// The outcome the worker reported for `key` (waits for it).
fn outcome(m: &Manager, key: &str) -> String {
    let prefix = format!("try {key}: ");
    let mut found = None;
    wait_until(T, || {
        found = m
            .log()
            .lines()
            .find_map(|l| l.split_once(&prefix).map(|(_, r)| r.to_string()));
        found.is_some()
    });
    found.unwrap_or_else(|| panic!("no outcome for {key}:\n{}", m.log()))
}

/// Start `binder.js` with `fields` (its `env` gets `TRIES`), its runtime
/// directory under `rt`.
fn start_binder(
    dir: &tempdir::Dir,
    rt: &Path,
    fields: serde_json::Value,
    tries: serde_json::Value,
) -> Manager {
    let script = dir.write("binder.js", BINDER);
    let mut fields = fields;
    let env = fields
        .as_object_mut()
        .unwrap()
        .entry("env")
        .or_insert(serde_json::json!({}));
    env["TRIES"] = tries.to_string().into();
    let cfg = eco(dir, "binder", &script, fields);
    let rt = path_str(rt);
    start(
        &[
            "run",
            &path_str(&cfg),
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[("XDG_RUNTIME_DIR", &rt)],
    )
}

/// A privileged port nothing listens on now (bound and let go by root).
fn free_privileged_port() -> u16 {
    (812..900)
        .find(|p| std::net::TcpListener::bind(("0.0.0.0", *p)).is_ok())
        .expect("a free port below 1024")
}

fn accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .is_ok()
}

#[test]
fn a_worker_of_another_user_gets_no_privileged_port_from_the_manager() {
    if !root() {
        eprintln!("skipped: needs root to run workers as nobody");
        return;
    }
    let dir = open_dir("privport");
    let rt = open_dir("privport-rt");
    let low = free_privileged_port();
    let m = start_binder(
        &dir,
        &rt.path,
        serde_json::json!({"instances": 2, "uid": "nobody"}),
        serde_json::json!([
            {"port": low, "key": "any"},
            {"port": low, "host": "127.0.0.1", "key": "loopback"},
            {"port": 0, "host": "127.0.0.1", "key": "unprivileged"},
        ]),
    );
    let port = m.port();
    assert_eq!(instances_answering_pid(port, 2), 2, "{}", m.log());
    assert_eq!(
        outcome(&m, "any"),
        format!("EACCES listen listen EACCES: permission denied :::{low}")
    );
    assert_eq!(
        outcome(&m, "loopback"),
        format!("EACCES listen listen EACCES: permission denied 127.0.0.1:{low}")
    );
    assert!(!accepts(low), "the manager holds port {low}:\n{}", m.log());
    assert!(m.log().contains("CAP_NET_BIND_SERVICE"), "{}", m.log());
    // What the workers may bind, they still get, and share.
    assert_eq!(outcome(&m, "unprivileged"), "ok");
    drop(m);

    // Named in `shared_listen`, the manager binds it with its own rights.
    let m = start_binder(
        &dir,
        &rt.path,
        serde_json::json!({"instances": 2, "uid": "nobody", "shared_listen": [format!("127.0.0.1:{low}")]}),
        serde_json::json!([{"port": low, "host": "127.0.0.1", "key": "allowed"}]),
    );
    assert_eq!(instances_answering_pid(m.port(), 2), 2, "{}", m.log());
    assert_eq!(outcome(&m, "allowed"), "ok");
    let mut seen = String::new();
    assert!(
        wait_until(T, || {
            let mut s = String::new();
            std::net::TcpStream::connect(("127.0.0.1", low))
                .and_then(|mut c| std::io::Read::read_to_string(&mut c, &mut s))
                .is_ok_and(|_| {
                    seen = s.clone();
                    s.starts_with("extra ")
                })
        }),
        "{seen:?}\n{}",
        m.log()
    );
}

/// The inode of `path` (as `lstat` sees it).
fn inode(path: &Path) -> u64 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .ino()
}

#[test]
fn a_worker_cannot_take_the_managers_control_socket() {
    // As the manager's own user (its rights would allow it) and as nobody.
    for user in [None, Some("nobody")] {
        if user.is_some() && !root() {
            continue;
        }
        let dir = open_dir("control");
        let rt = open_dir("control-rt");
        let mut fields = serde_json::json!({"instances": 1});
        if let Some(u) = user {
            fields["uid"] = u.into();
        }
        let m = start_binder(
            &dir,
            &rt.path,
            fields,
            serde_json::json!([{"rt": "control.sock", "key": "control"}]),
        );
        assert_eq!(instances_answering_pid(m.port(), 1), 1, "{}", m.log());
        let control = runtime_dir_of(&m, &rt.path).join("control.sock");
        assert!(wait_until(T, || control.exists()), "{}", m.log());
        let before = inode(&control);
        let got = outcome(&m, "control");
        assert!(
            got.starts_with("EACCES listen listen EACCES: permission denied"),
            "{user:?}: {got}\n{}",
            m.log()
        );
        assert_eq!(inode(&control), before, "{user:?}: control.sock replaced");
        assert!(
            std::os::unix::net::UnixStream::connect(&control).is_ok(),
            "{user:?}: the manager no longer answers on its control socket"
        );
        assert!(
            m.log().contains("inside the manager's runtime directory"),
            "{}",
            m.log()
        );
    }
}

#[test]
fn a_worker_of_another_user_cannot_replace_a_socket_in_a_directory_it_may_not_write() {
    if !root() {
        eprintln!("skipped: needs root to run workers as nobody");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = open_dir("rootdir");
    let rt = open_dir("rootdir-rt");
    // root's directory (0755) holding a socket of root's.
    let guarded = dir.path.join("guarded");
    std::fs::create_dir(&guarded).unwrap();
    std::fs::set_permissions(&guarded, std::fs::Permissions::from_mode(0o755)).unwrap();
    let theirs = guarded.join("x.sock");
    drop(std::os::unix::net::UnixListener::bind(&theirs).unwrap());
    let before = inode(&theirs);
    // And a directory anyone may write.
    let open = dir.path.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let m = start_binder(
        &dir,
        &rt.path,
        serde_json::json!({"instances": 2, "uid": "nobody"}),
        serde_json::json!([
            {"path": theirs, "key": "guarded"},
            {"path": guarded.join("new.sock"), "key": "guarded-new"},
            {"path": open.join("y.sock"), "key": "open"},
        ]),
    );
    assert_eq!(instances_answering_pid(m.port(), 2), 2, "{}", m.log());
    let got = outcome(&m, "guarded");
    assert!(got.starts_with("EACCES listen "), "{got}\n{}", m.log());
    assert_eq!(inode(&theirs), before, "root's socket file was replaced");
    assert!(
        outcome(&m, "guarded-new").starts_with("EACCES listen "),
        "{}",
        m.log()
    );
    assert!(!guarded.join("new.sock").exists());
    // Where nobody may create a socket, it gets one, of its own.
    assert_eq!(outcome(&m, "open"), "ok");
    let made = std::fs::symlink_metadata(open.join("y.sock")).unwrap();
    assert_eq!(made.uid(), 65534, "the socket file is the worker's user's");
}

/// Open fds of process `pid`.
fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn three_thousand_listens_end_at_the_cap_and_the_managers_fds_stay_bounded() {
    let dir = open_dir("flood");
    let rt = open_dir("flood-rt");
    let script = dir.write("binder.js", BINDER);
    let cfg = eco(
        &dir,
        "flood",
        &script,
        serde_json::json!({"instances": 1, "env": {"FLOOD_BASE": "20000"}}),
    );
    // First without the flood, for the manager's own count of fds.
    let rt_s = path_str(&rt.path);
    let m = start(
        &[
            "run",
            &path_str(&cfg),
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[("XDG_RUNTIME_DIR", &rt_s)],
    );
    assert_eq!(instances_answering_pid(m.port(), 1), 1, "{}", m.log());
    let baseline = fd_count(m.pid());
    // Then a worker that calls listen() 3,000 times.
    eco(
        &dir,
        "flood",
        &script,
        serde_json::json!({"instances": 1, "env": {"FLOOD_BASE": "20000", "FLOOD": "3000"}}),
    );
    m.signal(libc::SIGHUP);
    assert!(m.wait_log("flood: ", T), "{}", m.log());
    let line = m
        .log()
        .lines()
        .find_map(|l| l.split_once("flood: ").map(|(_, r)| r.to_string()))
        .unwrap();
    let counts: serde_json::Value = serde_json::from_str(&line).unwrap();
    let ok = counts["ok"].as_u64().unwrap_or(0);
    let emfile = counts["EMFILE"].as_u64().unwrap_or(0);
    assert!(ok <= 64, "{counts}");
    assert!(emfile >= 3000 - 64 - 100, "{counts}");
    assert!(m.wait_log("reload finished", T), "{}", m.log());
    let after = fd_count(m.pid());
    eprintln!("manager fds: {baseline} before the flood, {after} after ({counts})");
    assert!(
        after <= baseline + 70,
        "the manager went from {baseline} to {after} fds"
    );
    // Said once, not 2,936 times.
    assert_eq!(
        m.log().matches("its limit").count(),
        1,
        "{}",
        m.log()
            .lines()
            .filter(|l| l.contains("its limit"))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The app serves on.
    assert!(get_json(m.port()).is_ok());
}

#[test]
fn a_reload_closes_the_shared_sockets_its_workers_no_longer_listen_on() {
    let dir = open_dir("unheld");
    let rt = open_dir("unheld-rt");
    let m = start_binder(
        &dir,
        &rt.path,
        serde_json::json!({"instances": 2}),
        serde_json::json!([
            {"port": 0, "host": "127.0.0.1", "key": "extra"},
            {"port": 0, "host": "::1", "key": "kept"},
        ]),
    );
    let port = m.port();
    assert_eq!(instances_answering_pid(port, 2), 2, "{}", m.log());
    assert_eq!(outcome(&m, "extra"), "ok");
    let mut extra = 0u16;
    assert!(wait_until(T, || {
        extra = get_json(port)
            .ok()
            .and_then(|v| v["ports"]["extra"].as_u64())
            .unwrap_or(0) as u16;
        extra != 0
    }));
    assert!(accepts(extra));
    // The new workers listen on "kept" only.
    let script = dir.path.join("binder.js");
    eco(
        &dir,
        "binder",
        &script,
        serde_json::json!({"instances": 2, "env": {"TRIES": serde_json::json!([{"port": 0, "host": "::1", "key": "kept"}]).to_string()}}),
    );
    m.signal(libc::SIGHUP);
    assert!(m.wait_log("reload finished: 2/2", T), "{}", m.log());
    assert!(
        m.log().contains(&format!(
            "shared socket: tcp 127.0.0.1:{extra} closed: no worker of this reload listens there"
        )),
        "{}",
        m.log()
    );
    assert!(!accepts(extra), "port {extra} still accepts");
    assert!(
        !m.log()
            .lines()
            .any(|l| l.contains("shared socket: tcp [::1]") && l.contains("closed")),
        "the socket still listened on was closed:\n{}",
        m.log()
    );
}

/// A worker that resolves `localhost` (as Node does) and one that asks the
/// manager directly with a host name.
const NAMER: &str = r#"
const http = require('http');
const net = require('net');
http.createServer((req, res) => res.end(JSON.stringify({ pid: process.pid }))).listen(8000);
const s = net.createServer();
s.on('listening', () => console.error(`by name: ok ${s.address().address}`));
s.on('error', (e) => console.error(`by name: ${e.code}`));
s.listen(0, 'localhost');
process.on('internalMessage', (msg) => {
  if (msg && msg.cmd === 'NODE_NODEHERD_BOUND' && msg.id === 424242) console.error(`forged: ${msg.error ? msg.error.code : 'bound'}`);
});
process.send({ nodeherd: 'bind', id: 424242, kind: 'tcp', host: 'localhost', port: 0 });
"#;

#[test]
fn host_names_are_looked_up_in_the_worker_never_by_the_manager() {
    let dir = open_dir("names");
    let script = dir.write("namer.js", NAMER);
    let cfg = eco(&dir, "namer", &script, serde_json::json!({}));
    let m = start_config(&cfg, None);
    assert_eq!(instances_answering_pid(m.port(), 1), 1, "{}", m.log());
    assert!(m.wait_log("by name: ok ", T), "{}", m.log());
    assert!(m.wait_log("forged: EINVAL", T), "{}", m.log());
    assert!(m.log().contains("numeric addresses only"), "{}", m.log());
}

/// A FUSE filesystem that never answers: every lookup in it waits (as on a
/// hung network mount, or one a worker's user mounted to stall whoever
/// looks). Dropping it aborts the connection (waiters get ENOTCONN) and
/// unmounts it.
struct HungFs {
    fuse: Option<std::fs::File>,
    at: PathBuf,
}

impl HungFs {
    fn mount(at: &Path) -> Option<HungFs> {
        use std::ffi::CString;
        use std::os::fd::AsRawFd;
        let fuse = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .ok()?;
        std::fs::create_dir_all(at).ok()?;
        let target = CString::new(path_str(at)).unwrap();
        let opts = CString::new(format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
            fuse.as_raw_fd()
        ))
        .unwrap();
        let rc = unsafe {
            libc::mount(
                c"nodeherd-hung".as_ptr(),
                target.as_ptr(),
                c"fuse".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr().cast(),
            )
        };
        (rc == 0).then(|| HungFs {
            fuse: Some(fuse),
            at: at.to_path_buf(),
        })
    }
}

impl Drop for HungFs {
    fn drop(&mut self) {
        drop(self.fuse.take());
        let target = std::ffi::CString::new(path_str(&self.at)).unwrap();
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn a_path_on_a_filesystem_that_never_answers_stalls_nothing() {
    let dir = open_dir("hung");
    let rt = open_dir("hung-rt");
    let Some(hung) = HungFs::mount(&dir.path.join("mnt")) else {
        eprintln!("skipped: cannot mount a FUSE filesystem here");
        return;
    };
    let m = start_binder(
        &dir,
        &rt.path,
        serde_json::json!({"instances": 2}),
        serde_json::json!([
            {"path": hung.at.join("d/a.sock"), "key": "hung"},
            {"port": 0, "host": "127.0.0.1", "key": "after"},
        ]),
    );
    let port = m.port();
    // The manager answers the next request, serves, and replaces a worker
    // while one bind waits on the filesystem.
    assert_eq!(outcome(&m, "after"), "ok", "{}", m.log());
    assert_eq!(instances_answering_pid(port, 2), 2, "{}", m.log());
    let victim = m.workers()[0];
    kill(victim, libc::SIGKILL);
    assert!(
        wait_until(T, || m.workers().len() == 2
            && !m.workers().contains(&victim)),
        "{}",
        m.log()
    );
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    assert!(!m.log().contains("try hung: "), "{}", m.log());
    // Once the filesystem gives up, the waiting worker hears Node's error.
    drop(hung);
    let got = outcome(&m, "hung");
    assert!(
        got.starts_with("ENOTCONN listen listen ENOTCONN: socket is not connected "),
        "{got}\n{}",
        m.log()
    );
}

#[test]
fn shared_listen_takes_numeric_addresses_and_absolute_paths_only() {
    let dir = open_dir("badshared");
    let script = dir.write("binder.js", BINDER);
    for bad in ["localhost:812", "unix:relative.sock", "0"] {
        let cfg = eco(
            &dir,
            "bad",
            &script,
            serde_json::json!({ "shared_listen": [bad] }),
        );
        let (code, err) = run_to_end(&["run", &path_str(&cfg), "--no-bus"], T);
        assert_eq!(code, Some(2), "{bad}: {err}");
        assert!(
            err.contains("key `shared_listen`") && err.contains(bad),
            "{bad}: {err}"
        );
    }
}
