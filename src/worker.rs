//! Starting one worker process: fds, environment, IPC channel, process group.
//!
//! nodeherd forks and execs workers itself rather than through
//! `std::process::Command`, for one reason: `LISTEN_PID` must be the child's
//! own pid (that is how `sd_listen_fds()` in any language knows the sockets
//! are meant for it), and the child's pid is only known after the fork.
//! Everything the child needs is prepared before the fork; between fork and
//! exec the child only calls async-signal-safe functions (`dup2`, `setpgid`,
//! `prctl`, `chdir`, `execve`) and writes its pid's digits into an
//! environment buffer that was allocated beforehand.
//!
//! Layout in the child: fd 0 is /dev/null, 1 and 2 are pipes read by the
//! manager's log readers, the listening sockets sit at 3.., and a Node
//! worker's IPC channel right after them (`NODE_CHANNEL_FD`). Every other fd
//! of the manager is close-on-exec and does not reach the child.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::config::{App, Interpreter};
use crate::sockets::Listener;

/// Variables of the manager's own environment that must not reach workers:
/// they describe the manager's relation to systemd, not the worker's.
const SCRUBBED_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "NODE_CHANNEL_FD",
    "NODE_CHANNEL_SERIALIZATION_MODE",
    "NODE_UNIQUE_ID",
    "MANAGERPID",
];

/// Everything needed to start workers of one app, computed once.
pub struct Launcher {
    program: PathBuf,
    /// argv[1..]: interpreter args, the shim, the script, the script's args.
    args: Vec<String>,
    /// The environment common to all workers (without per-worker variables).
    base_env: Vec<(String, String)>,
    cwd: PathBuf,
    instance_var: String,
    node: bool,
    credentials: Option<crate::config::Credentials>,
}

/// A freshly started worker, as its parent sees it.
pub struct Spawned {
    pub pid: i32,
    /// Our end of the Node IPC channel (Node workers only).
    pub ipc: Option<std::os::unix::net::UnixStream>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

impl Launcher {
    /// Prepare to start workers of `app`, with the shim at `shim` and the
    /// manager's worker-facing notify socket at `notify_socket`.
    pub fn new(app: &App, listeners: &[Listener], shim: &Path, notify_socket: &Path) -> Launcher {
        let (program, mut args, node) = match &app.interpreter {
            Interpreter::Node(p) => (p.clone(), app.interpreter_args.clone(), true),
            Interpreter::Other(p) => (p.clone(), app.interpreter_args.clone(), false),
            Interpreter::None => (app.script.clone(), Vec::new(), false),
        };
        if node {
            args.push("--require".into());
            args.push(shim.display().to_string());
        }
        if !matches!(app.interpreter, Interpreter::None) {
            args.push(app.script.display().to_string());
        }
        args.extend(app.args.iter().cloned());
        let program = crate::config::find_executable(&program).unwrap_or(program);

        let mut env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| !SCRUBBED_ENV.contains(&k.as_str()))
            .collect();
        for (k, v) in &app.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
        let shim_desc: Vec<String> = listeners.iter().map(Listener::shim_descriptor).collect();
        let mut set = |k: &str, v: String| {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v));
        };
        set("LISTEN_FDS", listeners.len().to_string());
        set("LISTEN_FDNAMES", names.join(":"));
        set("NODEHERD_SOCKETS", shim_desc.join(","));
        set("NODEHERD_APP", app.name.clone());
        set("NOTIFY_SOCKET", notify_socket.display().to_string());
        if node {
            set("NODE_CHANNEL_SERIALIZATION_MODE", "json".into());
        }
        Launcher {
            program,
            args,
            base_env: env,
            cwd: app.cwd.clone(),
            instance_var: app.instance_var.clone(),
            node,
            credentials: app.credentials.clone(),
        }
    }

    /// The command line, for logs.
    pub fn command_line(&self) -> String {
        std::iter::once(self.program.display().to_string())
            .chain(self.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Fork and exec one worker for slot `index`.
    pub fn spawn(&self, index: u32, listeners: &[Listener]) -> Result<Spawned> {
        let nsock = listeners.len() as RawFd;
        let ipc_fd: RawFd = 3 + nsock;

        // Everything the child touches is allocated here, before the fork.
        let c = |s: &OsStr| CString::new(s.as_bytes()).context("a NUL byte in the command line");
        let program = c(self.program.as_os_str())?;
        let mut argv: Vec<CString> = vec![program.clone()];
        for a in &self.args {
            argv.push(c(OsStr::new(a))?);
        }
        let mut envp: Vec<CString> = Vec::with_capacity(self.base_env.len() + 4);
        for (k, v) in &self.base_env {
            if let Ok(s) = CString::new(format!("{k}={v}")) {
                envp.push(s);
            }
        }
        envp.push(
            CString::new(format!("{}={index}", self.instance_var))
                .expect("validated name and a number"),
        );
        if self.node {
            envp.push(
                CString::new(format!("NODE_CHANNEL_FD={ipc_fd}")).expect("no NUL in a number"),
            );
        }
        // Placeholder the child overwrites with its own pid.
        envp.push(CString::new(format!("LISTEN_PID={}", "0".repeat(20))).expect("no NUL"));
        let pid_slot = envp.last().expect("just pushed").as_ptr() as *mut u8;
        let argv_ptrs: Vec<*const libc::c_char> = argv
            .iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp_ptrs: Vec<*const libc::c_char> = envp
            .iter()
            .map(|s| s.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let cwd = c(self.cwd.as_os_str())?;

        let devnull = std::fs::File::open("/dev/null").context("opening /dev/null")?;
        let (out_r, out_w) = pipe().context("creating the stdout pipe")?;
        let (err_r, err_w) = pipe().context("creating the stderr pipe")?;
        let (exec_r, exec_w) = pipe().context("creating the exec-status pipe")?;
        let (ipc_parent, ipc_child) = if self.node {
            let (a, b) =
                std::os::unix::net::UnixStream::pair().context("creating the IPC channel")?;
            (Some(a), Some(OwnedFd::from(b)))
        } else {
            (None, None)
        };

        // Source fds for the child's 3.. slots. They are all >= HIGH_FD (listeners)
        // or freshly allocated; any that happens to fall inside 3..=ipc_fd is first
        // moved above it so that dup2 into place never clobbers a later source.
        let mut sources: Vec<RawFd> = listeners.iter().map(|l| l.fd.as_raw_fd()).collect();
        let mut keep_alive: Vec<OwnedFd> = Vec::new();
        let mut ipc_src = ipc_child.as_ref().map(|f| f.as_raw_fd());
        if let Some(fd) = ipc_src
            && fd <= ipc_fd
        {
            let high = dup_above(fd, ipc_fd + 1)?;
            ipc_src = Some(high.as_raw_fd());
            keep_alive.push(high);
        }
        for s in sources.iter_mut() {
            if *s <= ipc_fd {
                let high = dup_above(*s, ipc_fd + 1)?;
                *s = high.as_raw_fd();
                keep_alive.push(high);
            }
        }
        let stdio = [devnull.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
        let stdio: Vec<RawFd> = stdio
            .iter()
            .map(|&fd| {
                if fd <= ipc_fd {
                    dup_above(fd, ipc_fd + 1).map(|h| {
                        let r = h.as_raw_fd();
                        keep_alive.push(h);
                        r
                    })
                } else {
                    Ok(fd)
                }
            })
            .collect::<Result<_>>()?;
        let exec_w_raw = exec_w.as_raw_fd();
        let parent_pid = std::process::id() as libc::pid_t;

        // SAFETY: fork in a process that may have other threads; the child
        // only calls async-signal-safe functions below, on memory prepared above.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("fork");
        }
        if pid == 0 {
            // Child.
            unsafe {
                child_after_fork(ChildPlan {
                    stdio: &stdio,
                    sources: &sources,
                    ipc_src,
                    ipc_fd,
                    exec_w: exec_w_raw,
                    parent_pid,
                    pid_slot,
                    cwd: cwd.as_ptr(),
                    program: program.as_ptr(),
                    argv: argv_ptrs.as_ptr(),
                    envp: envp_ptrs.as_ptr(),
                    credentials: self.credentials.as_ref(),
                })
            }
        }

        // Parent. Avoid the race where we signal the group before the child joined it.
        unsafe {
            libc::setpgid(pid, pid);
        }
        drop(exec_w);
        drop(out_w);
        drop(err_w);
        drop(ipc_child);
        drop(keep_alive);
        // The exec-status pipe closes on a successful exec (CLOEXEC) or carries errno.
        let mut buf = [0u8; 4];
        let n = read_full(&exec_r, &mut buf);
        if n == 4 {
            let errno = i32::from_ne_bytes(buf);
            let mut status = 0;
            unsafe { libc::waitpid(pid, &mut status, 0) };
            bail!(
                "cannot start {}: {}",
                self.program.display(),
                std::io::Error::from_raw_os_error(errno)
            );
        }
        Ok(Spawned {
            pid,
            ipc: ipc_parent,
            stdout: out_r,
            stderr: err_r,
        })
    }
}

struct ChildPlan<'a> {
    stdio: &'a [RawFd],
    sources: &'a [RawFd],
    ipc_src: Option<RawFd>,
    ipc_fd: RawFd,
    exec_w: RawFd,
    parent_pid: libc::pid_t,
    pid_slot: *mut u8,
    cwd: *const libc::c_char,
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    credentials: Option<&'a crate::config::Credentials>,
}

/// The child between fork and exec. Never returns.
///
/// # Safety
/// Only async-signal-safe calls; every pointer in `plan` stays valid because
/// the child has its own copy of the parent's memory.
unsafe fn child_after_fork(plan: ChildPlan<'_>) -> ! {
    unsafe {
        let fail = |step: i32| -> ! {
            let errno = *libc::__errno_location();
            let code = if errno != 0 { errno } else { step };
            let bytes = code.to_ne_bytes();
            libc::write(plan.exec_w, bytes.as_ptr().cast(), 4);
            libc::_exit(127);
        };
        // Drop privileges first: changing credentials clears the parent-death signal.
        if let Some(c) = plan.credentials {
            if libc::setgroups(c.groups.len(), c.groups.as_ptr()) != 0
                || libc::setgid(c.gid) != 0
                || libc::setuid(c.uid) != 0
            {
                fail(libc::EPERM);
            }
        }
        // Die with the manager, even on kill -9 of the manager.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(libc::EINVAL);
        }
        if libc::getppid() != plan.parent_pid {
            libc::_exit(1);
        }
        // Own process group, so stopping a worker can reach the children it forks.
        libc::setpgid(0, 0);
        // Undo what the Rust runtime and tokio changed: SIGPIPE ignored, signals masked.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

        for (target, &src) in plan.stdio.iter().enumerate() {
            if libc::dup2(src, target as RawFd) < 0 {
                fail(libc::EBADF);
            }
        }
        for (i, &src) in plan.sources.iter().enumerate() {
            if libc::dup2(src, 3 + i as RawFd) < 0 {
                fail(libc::EBADF);
            }
        }
        if let Some(src) = plan.ipc_src
            && libc::dup2(src, plan.ipc_fd) < 0
        {
            fail(libc::EBADF);
        }
        // LISTEN_PID=<our pid>, written into the buffer prepared by the parent.
        let mut pid = libc::getpid() as u32;
        let mut digits = [0u8; 10];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (pid % 10) as u8;
            n += 1;
            pid /= 10;
            if pid == 0 {
                break;
            }
        }
        let value = plan.pid_slot.add("LISTEN_PID=".len());
        for i in 0..n {
            *value.add(i) = digits[n - 1 - i];
        }
        *value.add(n) = 0;

        if libc::chdir(plan.cwd) != 0 {
            fail(libc::ENOENT);
        }
        libc::execve(plan.program, plan.argv, plan.envp);
        fail(libc::ENOEXEC);
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: pipe2 returned two fresh fds that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn dup_above(fd: RawFd, min: RawFd) -> Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new fd or -1.
    let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("duplicating an fd");
    }
    // SAFETY: fresh fd from fcntl.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: the slice bounds are respected.
        let r = unsafe {
            libc::read(
                fd.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
            )
        };
        if r > 0 {
            got += r as usize;
        } else if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {
            continue;
        } else {
            break;
        }
    }
    got
}

/// Resident memory of a process in bytes, from /proc (0 when it is gone).
pub fn rss_bytes(pid: i32) -> u64 {
    let Ok(statm) = std::fs::read_to_string(format!("/proc/{pid}/statm")) else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(4096) as u64
}
