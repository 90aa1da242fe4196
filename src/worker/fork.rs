//! Fork and exec one worker. Every `unsafe` that starting a process needs
//! lives in this file.
//!
//! Between `fork` and `exec` the child may only call async-signal-safe
//! functions: the manager has other threads (the log writer, tokio's
//! blocking pool), and a lock one of them held at the fork stays locked in
//! the child forever. So everything the child touches — argv, envp, the
//! working directory, the fd numbers — is prepared here before the fork, and
//! the child only makes raw system calls (`write` to its cgroup, `setgroups`, `setgid`, `setuid`,
//! `prctl`, `setpgid`, `sigprocmask`, `dup2`, `chdir`, `execve`, `write`,
//! `_exit`) on that memory.
//!
//! **Parent-death signal and threads.** `PR_SET_PDEATHSIG` fires when the
//! *thread* that forked the child exits, not the process. Workers are forked
//! from the async runtime's only thread, the main thread (the runtime is
//! `current_thread`), which lives as long as the manager; so the signal
//! means "the manager died". Forking from a short-lived thread (a blocking
//! pool thread, a multi-thread runtime's worker) would kill the worker when
//! that thread exits: keep spawns on the main thread.
//!
//! **`LISTEN_PID`.** It must be the child's own pid, known only after the
//! fork. The parent reserves an environment entry `LISTEN_PID=000…0` in a
//! buffer it owns mutably, and the child writes its pid's digits into its
//! own copy of that buffer before `execve`.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, bail};
use nix::fcntl::OFlag;
use nix::unistd::ForkResult;

use crate::config::Credentials;

/// Prefix of the environment entry the child fills with its pid.
pub const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
/// Digits reserved for the pid (a u32 has at most 10).
const PID_DIGITS: usize = 20;

/// The reserved `LISTEN_PID=` entry, NUL-terminated.
pub fn listen_pid_placeholder() -> Vec<u8> {
    let mut v = LISTEN_PID_PREFIX.to_vec();
    v.extend(std::iter::repeat_n(b'0', PID_DIGITS));
    v.push(0);
    v
}

/// Everything the child needs, prepared by the parent.
pub struct Plan<'a> {
    pub program: &'a CStr,
    pub argv: &'a [CString],
    /// NUL-terminated `KEY=VALUE` entries; the last must be
    /// [`listen_pid_placeholder`], rewritten in the child.
    pub env: &'a mut [Vec<u8>],
    pub cwd: &'a CStr,
    /// Sources for fds 0, 1, 2 of the child.
    pub stdio: [RawFd; 3],
    /// Sources for fds 3.. of the child (the listening sockets).
    pub sockets: &'a [RawFd],
    /// Source for the fd right after the sockets (the Node IPC channel).
    pub ipc: Option<RawFd>,
    /// Source for the fd right after that (the sealed preload).
    pub preload: Option<RawFd>,
    /// Source for the fd after the preload (the preload's helper thread's
    /// own channel, see `crate::autopsy`).
    pub helper: Option<RawFd>,
    pub credentials: Option<&'a Credentials>,
    /// An fd of the worker's own `cgroup.procs`: the child joins that
    /// cgroup first thing (see `super::cgroup`).
    pub cgroup: Option<RawFd>,
}

/// Which step failed in the child, reported with errno over the exec pipe.
#[repr(u8)]
#[derive(Clone, Copy)]
enum Step {
    Credentials = 1,
    DeathSignal = 2,
    Fds = 3,
    Chdir = 4,
    Exec = 5,
    Cgroup = 6,
}

/// Fork, set the child up as the plan says, and exec. Returns the child's
/// pid once the exec succeeded, or why it failed.
pub fn fork_exec(plan: Plan<'_>) -> Result<i32> {
    let last = plan.env.len().checked_sub(1).context("no environment")?;
    if !plan.env[last].starts_with(LISTEN_PID_PREFIX) {
        bail!("the last environment entry must be the LISTEN_PID placeholder");
    }
    for e in plan.env.iter() {
        if e.last() != Some(&0) || e[..e.len() - 1].contains(&0) {
            bail!("an environment entry is not a C string");
        }
    }
    // Every source fd is moved above the highest target (3 + sockets, the
    // IPC channel, the preload and the helper's channel), so that placing
    // one never overwrites another.
    let top: RawFd = 3 + plan.sockets.len() as RawFd;
    let highest = top + 2;
    let mut keep: Vec<OwnedFd> = Vec::new();
    let mut lift = |fd: RawFd| -> Result<RawFd> {
        if fd > highest {
            return Ok(fd);
        }
        let high = crate::fds::dup_cloexec_above(fd, highest + 1).context("duplicating an fd")?;
        let raw = high.as_raw_fd();
        keep.push(high);
        Ok(raw)
    };
    let stdio = [
        lift(plan.stdio[0])?,
        lift(plan.stdio[1])?,
        lift(plan.stdio[2])?,
    ];
    let sockets: Vec<RawFd> = plan
        .sockets
        .iter()
        .map(|&fd| lift(fd))
        .collect::<Result<_>>()?;
    let ipc = plan.ipc.map(&mut lift).transpose()?;
    let preload = plan.preload.map(&mut lift).transpose()?;
    let helper = plan.helper.map(&mut lift).transpose()?;

    // Pointers for execve. `as_mut_ptr` on each entry: the LISTEN_PID one is
    // written through by the child, and Vec's raw pointers stay valid when
    // mixed (they never materialise a reference to the contents).
    let mut env_ptrs: Vec<*const libc::c_char> = Vec::with_capacity(plan.env.len() + 1);
    let mut pid_value: *mut u8 = std::ptr::null_mut();
    for (i, e) in plan.env.iter_mut().enumerate() {
        let p = e.as_mut_ptr();
        if i == last {
            // SAFETY: the entry is longer than the prefix (checked above).
            pid_value = unsafe { p.add(LISTEN_PID_PREFIX.len()) };
        }
        env_ptrs.push(p.cast_const().cast());
    }
    env_ptrs.push(std::ptr::null());
    let argv_ptrs: Vec<*const libc::c_char> = plan
        .argv
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let (exec_r, exec_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("creating a pipe")?;
    // Above the targets too, or placing an fd could close it in the child.
    let exec_w = if exec_w.as_raw_fd() > highest {
        exec_w
    } else {
        crate::fds::dup_cloexec_above(exec_w.as_raw_fd(), highest + 1)
            .context("duplicating an fd")?
    };
    let child = ChildPlan {
        program: plan.program.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: env_ptrs.as_ptr(),
        pid_value,
        cwd: plan.cwd.as_ptr(),
        stdio,
        sockets: &sockets,
        ipc: ipc.map(|src| (src, top)),
        preload: preload.map(|src| (src, top + 1)),
        helper: helper.map(|src| (src, top + 2)),
        exec_w: exec_w.as_raw_fd(),
        parent: nix::unistd::getpid().as_raw(),
        credentials: plan.credentials,
        cgroup: plan.cgroup,
    };

    // SAFETY: the child runs only `child_after_fork`, which makes only
    // async-signal-safe calls on memory prepared above, and never returns.
    match unsafe { nix::unistd::fork() }.context("fork")? {
        ForkResult::Child => {
            // SAFETY: we are the freshly forked child; see above.
            unsafe { child_after_fork(&child) }
        }
        ForkResult::Parent { child: pid } => {
            // Also set from our side, so the group exists before we might signal it.
            let _ = nix::unistd::setpgid(pid, pid);
            drop(exec_w);
            drop(keep);
            // The exec pipe closes on a successful exec (CLOEXEC), or carries
            // the failed step and errno.
            let mut buf = [0u8; 5];
            let n = read_full(&exec_r, &mut buf);
            if n == buf.len() {
                let _ = nix::sys::wait::waitpid(pid, None);
                let errno = std::io::Error::from_raw_os_error(i32::from_ne_bytes([
                    buf[1], buf[2], buf[3], buf[4],
                ]));
                let program = plan.program.to_string_lossy();
                let cwd = plan.cwd.to_string_lossy();
                return Err(match buf[0] {
                    x if x == Step::Credentials as u8 => match plan.credentials {
                        Some(c) => {
                            anyhow::anyhow!("cannot switch to uid {} gid {}: {errno}", c.uid, c.gid)
                        }
                        None => anyhow::anyhow!("cannot switch credentials: {errno}"),
                    },
                    x if x == Step::DeathSignal as u8 => {
                        anyhow::anyhow!("cannot set the parent-death signal: {errno}")
                    }
                    x if x == Step::Fds as u8 => {
                        anyhow::anyhow!("cannot place the sockets at fd 3..: {errno}")
                    }
                    x if x == Step::Cgroup as u8 => {
                        anyhow::anyhow!("cannot join the worker's cgroup: {errno}")
                    }
                    x if x == Step::Chdir as u8 => {
                        anyhow::anyhow!("cannot change to the directory {cwd}: {errno}")
                    }
                    _ => anyhow::anyhow!("cannot start {program}: {errno}"),
                });
            }
            Ok(pid.as_raw())
        }
    }
}

/// What `child_after_fork` reads: raw pointers and numbers only.
struct ChildPlan<'a> {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    pid_value: *mut u8,
    cwd: *const libc::c_char,
    stdio: [RawFd; 3],
    sockets: &'a [RawFd],
    /// (source, target) of the IPC channel.
    ipc: Option<(RawFd, RawFd)>,
    /// (source, target) of the preload.
    preload: Option<(RawFd, RawFd)>,
    /// (source, target) of the helper's channel.
    helper: Option<(RawFd, RawFd)>,
    exec_w: RawFd,
    parent: libc::pid_t,
    credentials: Option<&'a Credentials>,
    /// Write "0" here to join the worker's cgroup.
    cgroup: Option<RawFd>,
}

/// The child between fork and exec. Never returns.
///
/// # Safety
/// Call only in a freshly forked child. Only async-signal-safe functions are
/// called, on memory the parent prepared: the child has its own copy of it,
/// so every pointer in `plan` is valid and nothing else writes it.
unsafe fn child_after_fork(plan: &ChildPlan<'_>) -> ! {
    // SAFETY (for the whole block): raw system calls on valid pointers and
    // fd numbers, as the function's contract says.
    unsafe {
        let fail = |step: Step| -> ! {
            let errno = *libc::__errno_location();
            let mut msg = [0u8; 5];
            msg[0] = step as u8;
            msg[1..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(plan.exec_w, msg.as_ptr().cast(), msg.len());
            libc::_exit(127);
        };
        // Its own cgroup before anything else, while it still has the
        // manager's rights to write there; "0" is the writer itself.
        if let Some(fd) = plan.cgroup
            && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
        {
            fail(Step::Cgroup);
        }
        // Drop privileges first: changing credentials clears the parent-death signal.
        if let Some(c) = plan.credentials
            && (libc::setgroups(c.groups.len(), c.groups.as_ptr()) != 0
                || libc::setgid(c.gid) != 0
                || libc::setuid(c.uid) != 0)
        {
            fail(Step::Credentials);
        }
        // Die with the manager, even on kill -9 of the manager (see the module doc).
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(Step::DeathSignal);
        }
        // The manager may have died before the signal was armed.
        if libc::getppid() != plan.parent {
            libc::_exit(1);
        }
        // Its own process group, so stopping a worker reaches the children it forks.
        libc::setpgid(0, 0);
        // Undo what the Rust runtime and tokio changed: SIGPIPE ignored, signals masked.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

        for (target, &src) in plan.stdio.iter().enumerate() {
            if libc::dup2(src, target as RawFd) < 0 {
                fail(Step::Fds);
            }
        }
        for (i, &src) in plan.sockets.iter().enumerate() {
            if libc::dup2(src, 3 + i as RawFd) < 0 {
                fail(Step::Fds);
            }
        }
        for (src, target) in [plan.ipc, plan.preload, plan.helper].into_iter().flatten() {
            if libc::dup2(src, target) < 0 {
                fail(Step::Fds);
            }
        }
        write_pid(plan.pid_value, libc::getpid() as u32);
        if libc::chdir(plan.cwd) != 0 {
            fail(Step::Chdir);
        }
        libc::execve(plan.program, plan.argv, plan.envp);
        fail(Step::Exec);
    }
}

/// Write `pid`'s decimal digits and a NUL at `at` (which has room for 20 digits).
///
/// # Safety
/// `at` points to at least `PID_DIGITS + 1` writable bytes.
unsafe fn write_pid(at: *mut u8, mut pid: u32) {
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
    // SAFETY: n <= 10 < PID_DIGITS, within the caller's buffer.
    unsafe {
        for i in 0..n {
            *at.add(i) = digits[n - 1 - i];
        }
        *at.add(n) = 0;
    }
}

fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_is_written_in_place() {
        let mut e = listen_pid_placeholder();
        let at = unsafe { e.as_mut_ptr().add(LISTEN_PID_PREFIX.len()) };
        unsafe { write_pid(at, 4_294_967_295) };
        let s = CStr::from_bytes_until_nul(&e).unwrap();
        assert_eq!(s.to_str().unwrap(), "LISTEN_PID=4294967295");
        unsafe { write_pid(at, 7) };
        let s = CStr::from_bytes_until_nul(&e).unwrap();
        assert_eq!(s.to_str().unwrap(), "LISTEN_PID=7");
    }
}
