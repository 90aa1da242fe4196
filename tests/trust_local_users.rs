//! Another local user against a manager (issue 23): what a user who is not
//! root, not the app's user and not in group `nodeherd` can plant in a
//! shared temporary directory, reach over a control socket, or do to the
//! metrics endpoint, tried as that user would (uid 65534, `nobody`).
//!
//! Whatever is planted goes into a base directory this test owns (made like
//! /tmp: world-writable and sticky) and that the managers and clients under
//! test are pointed at with `TMPDIR`, so no other suite running at the same
//! time ever sees it; the base is removed when the test ends.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(20);
const NOBODY: u32 = 65534;

/// A directory like /tmp (root's, mode 1777), private to this test.
fn shared_base(tag: &str) -> tempdir::Dir {
    let d = tempdir::Dir::new(tag);
    std::fs::set_permissions(&d.path, std::fs::Permissions::from_mode(0o1777)).unwrap();
    d
}

/// `nodeherd ARGS` whose temporary directory is `base` and that has no
/// other runtime directory to go to.
fn in_base(args: &[&str], base: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("MAINPID")
        .env("TMPDIR", base);
    cmd
}

fn as_nobody(cmd: &mut Command) -> &mut Command {
    // std drops the supplementary groups too when root sets a uid.
    cmd.uid(NOBODY).gid(NOBODY)
}

/// Run a client to its end: (exit code, stdout, stderr).
fn output(mut cmd: Command) -> (i32, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
}

fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
}

/// A pid no process has (the highest the kernel would give).
fn dead_pid() -> u32 {
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (1..max)
        .rev()
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .unwrap()
}

/// A field of /proc/PID/status, in kB.
fn status_kb(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The runtime directories in `base` owned by `uid` whose name starts with `prefix`.
fn dirs_of(base: &Path, prefix: &str, uid: u32) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(base)
        .unwrap()
        .flatten()
        .filter(|e| e.metadata().is_ok_and(|m| m.is_dir() && m.uid() == uid))
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

// --- runtime directories in a shared base -------------------------------

#[test]
fn entries_planted_in_a_shared_base_neither_hang_nor_mislead_a_root_manager() {
    let base = shared_base("plant");
    let dead = dead_pid();
    // nobody's: a FIFO where a manager keeps its pid file (every manager
    // that read it hung at start), and a pid file that is a symlink to a
    // file without end.
    let fifo = base.path.join("nodeherd-x-1");
    std::fs::create_dir(&fifo).unwrap();
    mkfifo(&fifo.join("manager.pid"));
    chown(&fifo.join("manager.pid"), NOBODY);
    chown(&fifo, NOBODY);
    let zero = base.path.join("nodeherd-x-2");
    std::fs::create_dir(&zero).unwrap();
    std::os::unix::fs::symlink("/dev/zero", zero.join("manager.pid")).unwrap();
    chown(&zero.join("manager.pid"), NOBODY);
    chown(&zero, NOBODY);
    // nobody's, looking like a dead manager's: not root's to remove.
    let theirs = base.path.join(format!("nodeherd-w-{dead}"));
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("manager.pid"), dead.to_string()).unwrap();
    chown(&theirs.join("manager.pid"), NOBODY);
    chown(&theirs, NOBODY);
    // A symlink to a directory of root's that looks like a dead manager's.
    let victim = tempdir::Dir::new("victim");
    victim.write("manager.pid", &dead.to_string());
    victim.write("keep", "keep");
    let link = base.path.join(format!("nodeherd-v-{dead}"));
    std::os::unix::fs::symlink(&victim.path, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(NOBODY), Some(NOBODY)).unwrap();
    // Root's own (the manager's user), as a bug or a crash might leave
    // them: a FIFO and a 256 MiB pid file.
    let own_fifo = base.path.join(format!("nodeherd-y-{dead}"));
    std::fs::create_dir(&own_fifo).unwrap();
    mkfifo(&own_fifo.join("manager.pid"));
    let huge = base.path.join(format!("nodeherd-z-{dead}"));
    std::fs::create_dir(&huge).unwrap();
    std::fs::File::create(huge.join("manager.pid"))
        .unwrap()
        .set_len(256 << 20)
        .unwrap();

    let script = path_str(&app("env.js"));
    let cmd = in_base(
        &[
            "run",
            &script,
            "-i",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &base.path,
    );
    let m = spawn_collecting(cmd);
    assert!(
        m.wait_log("1/1 workers ready", T),
        "a root manager did not start beside the planted entries:\n{}",
        m.log()
    );
    let hwm = status_kb(m.pid(), "VmHWM:");
    assert!(
        hwm < 64 * 1024,
        "the manager's peak RSS was {hwm} kB: it read a planted file whole"
    );
    for kept in [&fifo, &zero, &theirs, &own_fifo, &huge] {
        assert!(kept.exists(), "{} was removed", kept.display());
    }
    assert!(victim.path.join("keep").exists(), "followed the symlink");
    assert!(
        std::fs::symlink_metadata(&link).is_ok(),
        "nobody's symlink is not root's to remove"
    );
}

/// nobody runs its manager as pid 1 of a pid namespace of its own, so the
/// name a predictable scheme would give its runtime directory
/// (`nodeherd-shop-1`) is known in advance; root plants that name first.
#[test]
fn a_name_planted_ahead_does_not_keep_another_users_manager_from_starting() {
    let base = shared_base("ahead");
    let planted = base.path.join("nodeherd-shop-1");
    std::fs::create_dir(&planted).unwrap();
    std::fs::write(planted.join("keep"), "keep").unwrap();
    let script = path_str(&app("env.js"));
    let nobody = NOBODY.to_string();
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child", "--"])
        .args([
            "setpriv",
            "--reuid",
            &nobody,
            "--regid",
            &nobody,
            "--clear-groups",
        ])
        .arg(BIN)
        .args(["run", &script, "--name", "shop", "-i", "1"])
        .args(["--listen", "127.0.0.1:0", "--no-bus"])
        .stdin(Stdio::null())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("XDG_RUNTIME_DIR")
        .env("TMPDIR", &base.path);
    // The namespace's processes die with its first one; the guard kills
    // unshare, whose --kill-child takes that one.
    let m = spawn_collecting(cmd);
    assert!(
        m.wait_log("1/1 workers ready", T),
        "nobody's manager did not start:\n{}",
        m.log()
    );
    assert!(
        planted.join("keep").exists(),
        "root's directory was touched"
    );
    let mine = dirs_of(&base.path, "nodeherd-shop-1", NOBODY);
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_ne!(
        mine[0], "nodeherd-shop-1",
        "a predictable name in a shared base"
    );
}

// --- clients talk only to the right manager ------------------------------

/// The attempt from the issue: nobody runs `nodeherd run app.js --name
/// shop` with no bus; root's clients must not take it for shop's manager.
#[test]
fn root_clients_do_not_take_another_users_manager_for_the_apps() {
    let base = shared_base("shop");
    let script = path_str(&app("env.js"));
    let mut cmd = in_base(
        &[
            "run",
            &script,
            "--name",
            "shop",
            "-i",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &base.path,
    );
    as_nobody(&mut cmd);
    let m = spawn_collecting(cmd);
    assert!(m.wait_log("1/1 workers ready", T), "{}", m.log());
    let no_bus = format!("unix:path={}/no-bus-here", base.path.display());
    let client = |args: &[&str], nobody: bool| {
        let mut cmd = in_base(args, &base.path);
        cmd.args(["--bus", &no_bus]);
        if nobody {
            as_nobody(&mut cmd);
        }
        output(cmd)
    };
    // Its own user reaches it.
    let (code, out, err) = client(&["status", "shop"], true);
    assert_eq!(code, 0, "nobody's own manager: {err}");
    assert!(out.contains("shop: ready"), "{out}");
    // Root does not.
    let (code, out, err) = client(&["status", "shop"], false);
    assert_eq!(code, 3, "root was shown nobody's manager:\n{out}{err}");
    assert!(!out.contains("shop:"), "{out}");
    assert!(err.contains("uid 65534"), "say what was passed over: {err}");
    let (code, _, err) = client(&["status"], false);
    assert_eq!(code, 3, "without APP either: {err}");
    let (code, _, err) = client(&["reexec", "shop"], false);
    assert_ne!(
        code, 0,
        "root's reexec reported success from nobody's manager: {err}"
    );
    let (code, _, err) = client(&["reload", "shop"], false);
    assert_ne!(code, 0, "{err}");
    assert!(!m.log().contains("re-exec"), "{}", m.log());
    // (Not "reload": the command line names the preload.)
    assert!(!m.log().contains("reload requested"), "{}", m.log());
    assert!(!m.log().contains("reload begun"), "{}", m.log());
    // nobody's socket, moved into a directory of root's and given to root
    // (as an entry swapped after the client looked): the peer still says
    // who listens.
    let theirs = base
        .path
        .join(&dirs_of(&base.path, "nodeherd-shop-", NOBODY)[0]);
    let decoy = base.path.join(format!("nodeherd-shop-{}", m.pid()));
    std::fs::create_dir(&decoy).unwrap();
    std::fs::set_permissions(&decoy, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::rename(theirs.join("control.sock"), decoy.join("control.sock")).unwrap();
    chown(&decoy.join("control.sock"), 0);
    let (code, out, err) = client(&["status", "shop"], false);
    assert_eq!(code, 3, "root talked to nobody's socket:\n{out}{err}");
    assert!(err.contains("uid 65534 listens on it"), "{err}");
}

/// When the bus answers and says the name's owner is not the unit's main
/// process, the client stops there: no control socket found on disk
/// answers in its place.
#[test]
fn a_client_does_not_fall_back_when_the_bus_names_another_owner() {
    let bus = DbusDaemon::start();
    let runtime = tempdir::Dir::new("owner");
    let rt = path_str(&runtime.path);
    let script = path_str(&app("env.js"));
    let m = start(
        &[
            "run",
            &script,
            "--name",
            "shop",
            "-i",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--bus",
            &bus.address,
        ],
        &[("XDG_RUNTIME_DIR", &rt)],
    );
    assert!(m.wait_log("1/1 workers ready", T), "{}", m.log());
    assert!(bus.wait_name("org.nodeherd.shop", T));
    let status = |main_pid: u32| {
        let mut cmd = Command::new(BIN);
        cmd.args(["status", "shop"])
            .stdin(Stdio::null())
            .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
            .env("XDG_RUNTIME_DIR", &rt)
            .env("MAINPID", main_pid.to_string());
        output(cmd)
    };
    let (code, out, err) = status(m.pid() as u32);
    assert_eq!(code, 0, "the unit's own manager: {err}");
    assert!(out.contains("shop: ready"), "{out}");
    // The unit's main process is another one: the owner is an impostor.
    let (code, out, err) = status(std::process::id());
    assert_eq!(code, 3, "fell back past the bus's answer:\n{out}{err}");
    assert!(err.contains("not talking to it"), "{err}");
}

/// The control socket is 0600 in a 0700 directory; an operator (or a bug)
/// that opens it up still lets nobody else drive or read the manager: it
/// checks each peer's credentials as the bus checks a caller's.
#[test]
fn another_user_cannot_drive_a_manager_through_its_control_socket() {
    let runtime = tempdir::Dir::new("p2p-peer");
    let rt = path_str(&runtime.path);
    let (m, no_bus) = start_without_bus("solo", &rt);
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    let dir = runtime.path.join(format!("nodeherd-solo-{}", m.pid()));
    let client = |args: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .args(["--bus", &no_bus])
            .env("XDG_RUNTIME_DIR", &rt)
            .stdin(Stdio::null());
        as_nobody(&mut cmd);
        output(cmd)
    };
    let (code, out, _) = client(&["status", "solo"]);
    assert_ne!(code, 0, "{out}");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        dir.join("control.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let before = m.workers();
    let (code, out, err) = client(&["status", "solo"]);
    assert_ne!(code, 0, "nobody read the manager's status:\n{out}");
    assert!(!out.contains("solo:"), "{out}{err}");
    for args in [
        &["reload", "solo"][..],
        &["restart", "solo"],
        &["scale", "solo", "3"],
    ] {
        let (code, _, err) = client(args);
        assert_ne!(code, 0, "nobody's {args:?} was done: {err}");
    }
    assert!(
        !m.log().contains("reload: configuration read") && !m.log().contains("reload begun"),
        "{}",
        m.log()
    );
    assert!(m.log().contains("refused uid 65534"), "{}", m.log());
    // A restart or a scale would have started workers by the time the
    // client got its answer.
    let mut after = m.workers();
    let mut before = before;
    before.sort();
    after.sort();
    assert_eq!(before, after, "the workers were touched");
    // Root still gets through.
    let (code, out, err) = output({
        let mut c = Command::new(BIN);
        c.args(["status", "solo", "--bus", &no_bus])
            .env("XDG_RUNTIME_DIR", &rt)
            .stdin(Stdio::null());
        c
    });
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("solo: ready"), "{out}");
}

// --- the metrics endpoint ------------------------------------------------

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

fn scrape(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    if !buf.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(buf));
    }
    Ok(buf)
}

/// Has the server closed this connection (EOF or reset)? Peeks without
/// changing the socket's flags.
fn closed_by_server(s: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 1];
    // SAFETY: a valid fd and a one-byte buffer.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0 || (n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock)
}

/// A manager on env.js with 2 workers, its metrics on loopback, its fd
/// limit at 1024, reached by the clients through its control socket.
fn start_with_metrics(rt: &str) -> (Manager, String) {
    let no_bus = format!("unix:path={rt}/no-bus-here");
    let script = path_str(&app("env.js"));
    let mut cmd = Command::new(BIN);
    cmd.args(["run", &script, "--name", "counted", "-i", "2"])
        .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .args(["--bus", &no_bus])
        .env("XDG_RUNTIME_DIR", rt)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("RUNTIME_DIRECTORY")
        .stdin(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    (spawn_collecting(cmd), no_bus)
}

/// The attempt from the issue: 1,100 idle connections to the metrics
/// endpoint of a manager whose fd limit is 1024, then a worker dies.
#[test]
fn a_flood_of_idle_metrics_connections_leaves_the_manager_serving() {
    let runtime = tempdir::Dir::new("flood");
    let rt = path_str(&runtime.path);
    let (mut m, no_bus) = start_with_metrics(&rt);
    let metrics = metrics_port(&m);
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    let baseline = fd_count(m.pid());
    let flood: Vec<TcpStream> = (0..1100)
        .filter_map(|_| {
            TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], metrics)),
                Duration::from_millis(500),
            )
            .ok()
        })
        .collect();
    assert!(flood.len() > 1000, "only {} connected", flood.len());
    // Let the manager take in what it will.
    std::thread::sleep(Duration::from_millis(500));
    let mut most = 0;
    wait_until(Duration::from_secs(1), || {
        most = most.max(fd_count(m.pid()));
        false
    });
    assert!(
        most < baseline + 200,
        "the manager holds {most} fds under the flood (baseline {baseline})"
    );
    let rss = status_kb(m.pid(), "VmRSS:");
    assert!(rss < 64 * 1024, "RSS {rss} kB under the flood");
    // Connections past the cap are closed at once, not queued.
    let late = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
    assert!(
        wait_until(Duration::from_secs(1), || closed_by_server(&late)),
        "a connection past the cap was kept"
    );
    // `nodeherd status` answers within a second (best of three, the
    // machine is shared).
    let fastest = (0..3)
        .map(|_| {
            let t0 = Instant::now();
            let (code, out, err) = output({
                let mut c = Command::new(BIN);
                c.args(["status", "counted", "--json", "--bus", &no_bus])
                    .env("XDG_RUNTIME_DIR", &rt)
                    .stdin(Stdio::null());
                c
            });
            assert_eq!(code, 0, "{out}{err}");
            t0.elapsed()
        })
        .min()
        .unwrap();
    assert!(fastest < Duration::from_secs(1), "status took {fastest:?}");
    eprintln!(
        "under the flood of {}: {most} fds (baseline {baseline}), RSS {rss} kB, status in {fastest:?}",
        flood.len()
    );
    // A worker that dies is still replaced.
    let before = m.workers();
    kill(before[0], libc::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(5), || {
            let now = m.workers();
            now.len() == 2 && now.iter().any(|p| !before.contains(p))
        }),
        "the dead worker was not replaced under the flood:\n{}",
        m.log()
    );
    let new = *m.workers().iter().find(|p| !before.contains(p)).unwrap();
    assert!(m.wait_log(&format!("ready (pid {new},"), T), "{}", m.log());
    // Idle heads are closed after a few seconds, whatever the client does.
    assert!(
        wait_until(Duration::from_secs(8), || flood
            .iter()
            .all(closed_by_server)),
        "idle connections were still open {} s in",
        8
    );
    // And a scrape answers.
    assert!(
        wait_until(Duration::from_secs(5), || scrape(metrics).is_ok()),
        "no scrape after the flood"
    );
    drop(flood);
    assert!(m.child.try_wait().unwrap().is_none(), "{}", m.log());
}

/// A request head that never ends is cut off, not buffered.
#[test]
fn an_endless_request_head_is_cut_off() {
    let runtime = tempdir::Dir::new("head");
    let rt = path_str(&runtime.path);
    let (m, _) = start_with_metrics(&rt);
    let metrics = metrics_port(&m);
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    let s = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
    let mut writer = s.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // 16 MiB of head, more than the kernel's buffers hold: the manager
    // must stop reading and hang up well before the end.
    let sending = std::thread::spawn(move || {
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..256 {
            if writer.write_all(&chunk).is_err() {
                return false;
            }
        }
        true
    });
    assert!(
        wait_until(Duration::from_secs(3), || closed_by_server(&s)),
        "the manager kept reading an endless head"
    );
    assert!(!sending.join().unwrap(), "the manager took 16 MiB of head");
    let rss = status_kb(m.pid(), "VmRSS:");
    assert!(rss < 64 * 1024, "RSS {rss} kB");
    assert!(
        wait_until(Duration::from_secs(5), || scrape(metrics).is_ok()),
        "{}",
        m.log()
    );
}
