//! `nodeherd run FILE` of a file with several apps: a manager for each.
//!
//! Each app keeps a manager of its own, exactly as if it had been run with
//! `--only NAME` (its own bus name, runtime directory, control socket,
//! reloads and crash budget), so one app can never act on another and
//! `nodeherd status NAME` answers for each. This process only starts them
//! and waits: it forwards the control signals (SIGINT, SIGTERM: stop;
//! SIGHUP: reload; SIGUSR1: reopen logs; SIGUSR2: re-exec) to every
//! manager, and exits once all have, with the first failure's status. A
//! manager that stops cleanly (`nodeherd stop api`) leaves the others
//! running; one that fails (a port taken, a bad key) stops the others, so
//! a half-started file is never taken for a running one. Each manager gets
//! SIGTERM if this process dies, whatever kills it.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command};

use nix::sys::signal::{SigmaskHow, Signal, kill, sigprocmask};
use nix::unistd::Pid;

use crate::logs;

/// Why the apps of a file cannot be run together here; `None` if they can.
/// Every reason is a flag or a setting meant for one app (exit 2).
pub fn refuse(
    names: &[String],
    over: &crate::config::Overrides,
    bus: &crate::cli::BusArgs,
    sockets_from_systemd: bool,
) -> Option<String> {
    let apps = format!("the file has {} apps ({})", names.len(), names.join(", "));
    let one = "run one with --only NAME";
    if sockets_from_systemd {
        return Some(format!(
            "systemd passed listening sockets, and {apps}: which app would get them? \
             Give each app a unit of its own (`nodeherd install FILE` does), or {one}"
        ));
    }
    if std::env::var_os("NOTIFY_SOCKET").is_some_and(|v| !v.is_empty()) {
        return Some(format!(
            "systemd waits for one manager's READY=1 here, and {apps}: give each app a unit of \
             its own (`nodeherd install FILE` does), or {one}"
        ));
    }
    let flag = if over.name.is_some() {
        "--name"
    } else if !over.listen.is_empty() {
        "--listen"
    } else if over.metrics.is_some() {
        "--metrics"
    } else if bus.bus_name.is_some() {
        "--bus-name"
    } else {
        return None;
    };
    Some(format!(
        "{flag} is for one app, and {apps}: put it in each app's entry of the file \
         (`name`, `listen`, `metrics`), or {one}"
    ))
}

/// One app's manager.
struct Member {
    name: String,
    child: Child,
    /// Its exit status, once reaped.
    exited: Option<u8>,
}

/// Start a manager for each app of `target`, named `names`, with this
/// command line's flags, and wait for them all. Returns the exit status.
pub fn run(target: &std::path::Path, names: &[String]) -> std::io::Result<u8> {
    let exe = std::env::current_exe()?;
    // The control signals are blocked already (read below with sigwait);
    // SIGCHLD too, so an exit is never missed between two waits.
    let mut wanted = crate::reexec::control_signals();
    wanted.add(Signal::SIGCHLD);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&wanted), None).map_err(std::io::Error::from)?;
    // `nodeherd run|start ARGS...`: each manager is `nodeherd run --only
    // NAME ARGS...`; `start` has done its checks for every app already.
    let rest: Vec<OsString> = std::env::args_os().skip(2).collect();
    let mut members: Vec<Member> = Vec::with_capacity(names.len());
    for name in names {
        match spawn(&exe, name, &rest) {
            Ok(child) => members.push(Member {
                name: name.clone(),
                child,
                exited: None,
            }),
            Err(e) => {
                logs::error(&format!(
                    "cannot start the manager of {name}: {e}; stopping the others"
                ));
                signal_all(&members, Signal::SIGTERM);
                wait_all(&mut members);
                return Ok(1);
            }
        }
    }
    logs::info(&format!(
        "{} apps of {}, a manager each: {}; Ctrl-C stops them all",
        members.len(),
        target.display(),
        members
            .iter()
            .map(|m| format!("{} (pid {})", m.name, m.child.id()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut stopping = false;
    let mut failed: Option<u8> = None;
    while members.iter().any(|m| m.exited.is_none()) {
        let sig = wanted.wait().map_err(std::io::Error::from)?;
        if sig != Signal::SIGCHLD {
            if matches!(sig, Signal::SIGINT | Signal::SIGTERM) {
                stopping = true;
            }
            signal_all(&members, sig);
            continue;
        }
        for i in reap(&mut members) {
            let code = members[i].exited.unwrap_or(1);
            let running: Vec<&str> = members
                .iter()
                .filter(|m| m.exited.is_none())
                .map(|m| m.name.as_str())
                .collect();
            let name = &members[i].name;
            if code == 0 || stopping {
                logs::info(&format!(
                    "{name}: its manager exited with status {code}{}",
                    if running.is_empty() {
                        String::new()
                    } else {
                        format!("; still running: {}", running.join(", "))
                    }
                ));
            } else {
                logs::error(&format!(
                    "{name}: its manager failed (exit status {code}){}",
                    if running.is_empty() {
                        String::new()
                    } else {
                        format!(": stopping the others ({})", running.join(", "))
                    }
                ));
                stopping = true;
                signal_all(&members, Signal::SIGTERM);
            }
            if code != 0 && failed.is_none() {
                failed = Some(code);
            }
        }
    }
    Ok(failed.unwrap_or(0))
}

/// `nodeherd run --only NAME ARGS...`, given SIGTERM when this process dies.
fn spawn(exe: &std::path::Path, name: &str, rest: &[OsString]) -> std::io::Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.arg("run").arg("--only").arg(name).args(rest);
    let parent = std::process::id();
    // SAFETY: prctl, getppid and the signal mask calls are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // This process died before the line above: nobody would stop it.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("its parent is gone"));
            }
            // The mask crosses the exec. The control signals may stay
            // blocked (a manager blocks them first thing, and so no stop
            // is lost before it reads them); SIGCHLD must not, or it
            // would never see a worker exit.
            let mut chld: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut chld);
            libc::sigaddset(&mut chld, libc::SIGCHLD);
            if libc::pthread_sigmask(libc::SIG_UNBLOCK, &chld, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

fn signal_all(members: &[Member], sig: Signal) {
    for m in members.iter().filter(|m| m.exited.is_none()) {
        let _ = kill(Pid::from_raw(m.child.id() as i32), sig);
    }
}

/// Reap every manager that has exited; their indexes.
fn reap(members: &mut [Member]) -> Vec<usize> {
    let mut done = Vec::new();
    for (i, m) in members.iter_mut().enumerate() {
        if m.exited.is_some() {
            continue;
        }
        if let Ok(Some(status)) = m.child.try_wait() {
            m.exited = Some(status_code(status));
            done.push(i);
        }
    }
    done
}

fn wait_all(members: &mut [Member]) {
    for m in members.iter_mut().filter(|m| m.exited.is_none()) {
        if let Ok(status) = m.child.wait() {
            m.exited = Some(status_code(status));
        }
    }
}

/// An exit status as a shell reports it: the code, or 128 + the signal.
fn status_code(status: std::process::ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c.clamp(0, 255) as u8,
        (None, Some(s)) => (128 + s).clamp(0, 255) as u8,
        _ => 1,
    }
}
