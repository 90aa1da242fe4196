//! Re-exec in place: the manager replaces its own program with `execve`,
//! and the new program takes over every worker, socket and counter.
//!
//! Why `execve` and not a new process beside the old one (gunicorn's USR2,
//! einhorn): under systemd the manager is the unit's main process, and its
//! pid is what systemd watches, what `$MAINPID` names for `ExecReload=`, and
//! the parent of every worker. `execve` keeps the pid, so systemd sees no
//! restart, the workers are still our children (their exits still reach us
//! by SIGCHLD, their parent-death signal still ends them with us), and
//! nothing is signalled or re-parented.
//!
//! What crosses the exec:
//! - the fds: listening sockets (passed by systemd, bound from `--listen`,
//!   each slot's `reuseport` siblings, ports shared on workers' requests),
//!   the workers' notify socket, the control socket, the metrics socket, and
//!   each worker's IPC channel and output pipes. They are made inheritable
//!   just before the exec and close-on-exec again just after;
//! - a state document (JSON in a memfd, whose number is in
//!   `NODEHERD_REEXEC_STATE_FD`) that says what each fd is, the
//!   configuration in force, and the supervisor's state (its types and
//!   rules are the supervisor's: `supervisor::takeover`; this module only
//!   moves bytes and fds).
//!
//! The new program is checked first: it is run with `__check-state` and must
//! take over the very document it will be given, running every check that
//! could refuse it (a file that is not nodeherd, one that cannot read this
//! format, or a state it could not import, is refused and the old manager
//! runs on). After the exec nothing refuses. SIGTERM, SIGINT, SIGHUP and
//! SIGUSR2 are blocked across the exec in every thread (the mask and pending
//! signals survive `execve`, handlers do not; a thread other than the one
//! that execs must never take one, its handler would die with the exec), so
//! a stop sent in that instant is delivered to the new program once it
//! listens for it.
//!
//! The bus connection does not cross: the old one closes with the exec and
//! the new program takes the name again (retrying for a few seconds, as the
//! bus may not yet have seen the old connection go). Calls in flight on it
//! get `NoReply`; the control socket keeps listening, so its clients only
//! wait.
//!
//! Limits, by design: a line a worker is writing to stdout or stderr at the
//! very instant of the exec may reach the journal split in two (the old
//! program's readers held its first half); workers started before keep the
//! preload they loaded, so the preload's protocol (`ipc.rs`) must stay
//! readable by the next version, as the state document must.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};

use crate::fds::set_cloexec;

/// Where the new program finds the state document.
pub const STATE_FD_VAR: &str = "NODEHERD_REEXEC_STATE_FD";

/// The hidden subcommand that checks a program can take a state over.
pub const CHECK_COMMAND: &str = "__check-state";

/// The first word of the check's answer.
const CHECK_OK: &str = "nodeherd-state-ok";

/// How long the new program has to answer the check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The check's answer when the program takes the state over (printed by
/// `__check-state`): the format it read, its version and the writer's.
pub fn check_ok_line(format: u32, written_by: &str) -> String {
    format!(
        "{CHECK_OK} {format} {} (written by {written_by})",
        env!("CARGO_PKG_VERSION")
    )
}

/// The monotonic clock, as `Instant` reads it, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        (t.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec() as u64)
    })
}

/// The program to exec: the file this manager was started from, as it is
/// on disk now. A package upgrade replaces that file (the running image
/// then shows as "(deleted)" in `/proc/self/exe`); its path is what to run.
/// The path it was started by (`argv[0]`, as a unit's `ExecStart=` gives
/// it) comes first, so a symlink switched to a new version is followed;
/// a bare name found on `PATH` falls back to `/proc/self/exe`.
pub fn program() -> std::io::Result<PathBuf> {
    if let Some(argv0) = std::env::args_os().next().map(PathBuf::from)
        && argv0.components().count() > 1
        && argv0.is_file()
    {
        return Ok(std::path::absolute(&argv0).unwrap_or(argv0));
    }
    let link = std::fs::read_link("/proc/self/exe")?;
    let text = link.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => PathBuf::from(path),
        None => link,
    })
}

/// Run `program __check-state` with `state` on its stdin: it must answer
/// that it reads this format, within [`CHECK_TIMEOUT`]. `Ok` says what the
/// program is, in words; `Err` why it will not do. Blocking.
pub fn check(program: &Path, state: &[u8]) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = program.display();
    let meta = std::fs::metadata(program).map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{shown} is not an executable file"));
    }
    let mut child = std::process::Command::new(program)
        .arg(CHECK_COMMAND)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env_remove("NOTIFY_SOCKET")
        .env_remove(STATE_FD_VAR)
        .spawn()
        .map_err(|e| format!("{shown} does not run: {e}"))?;
    let feed = child.stdin.take().map(|mut stdin| {
        let state = state.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&state);
        })
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if started.elapsed() > CHECK_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{shown} did not answer the state check within {} s",
                    CHECK_TIMEOUT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("waiting for {shown}: {e}")),
        }
    };
    if let Some(f) = feed {
        let _ = f.join();
    }
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let first = out.lines().next().unwrap_or("");
    let mut words = first.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(CHECK_OK), Some(_format), Some(version)) if status.success() => {
            Ok(format!("nodeherd {version} ({shown})"))
        }
        _ => {
            let said = err.lines().last().or(out.lines().next()).unwrap_or("");
            let said: String = said.chars().take(300).collect();
            Err(format!(
                "{shown} is not a nodeherd that can take over this manager ({status}{})",
                if said.is_empty() {
                    String::new()
                } else {
                    format!(": {said}")
                }
            ))
        }
    }
}

/// The signals a stop, a reload, a re-exec and a log reopen arrive by.
pub fn control_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR2,
        Signal::SIGUSR1,
    ] {
        set.add(s);
    }
    set
}

/// Block the control signals for good, before any thread starts (every
/// thread inherits the mask): the daemon reads them from a signalfd
/// (`supervisor::sources::signals`) and no handler ever runs. A handler's
/// note would die with an exec (and with it a stop sent at that instant);
/// a blocked signal instead stays pending, and the mask and pending
/// signals survive `execve`, so the new program reads it. Processes the
/// manager starts get an empty mask (the worker's fork does it, as
/// `std::process::Command` does).
pub fn block_control_signals() {
    let _ = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&control_signals()), None);
}

/// Replace this program with `program`, handing `state` over. Returns only
/// if that failed, with everything as it was before.
///
/// Must be called on the thread that forked the workers (the main thread):
/// an exec from another thread would end that one, and with it the
/// workers' parent-death signal would fire.
///
/// `doc` is the state document, `fds` every fd it names: each is checked
/// open (made inheritable) before anything is committed.
pub fn exec(program: &Path, doc: &[u8], fds: &[RawFd]) -> std::io::Error {
    match try_exec(program, doc, fds) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn try_exec(
    program: &Path,
    doc: &[u8],
    fds: &[RawFd],
) -> std::io::Result<std::convert::Infallible> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    crate::fds::check_handover(fds).map_err(std::io::Error::other)?;
    let memfd =
        nix::sys::memfd::memfd_create(c"nodeherd-state", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    let mut file = std::fs::File::from(memfd);
    file.write_all(doc)?;
    let fds: Vec<RawFd> = fds.iter().copied().chain([file.as_raw_fd()]).collect();
    let c = |b: &[u8]| CString::new(b).map_err(std::io::Error::other);
    let path = c(program.as_os_str().as_bytes())?;
    let argv: Vec<CString> = std::env::args_os()
        .map(|a| c(a.as_bytes()))
        .collect::<Result<_, _>>()?;
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != STATE_FD_VAR)
        .map(|(k, v)| c(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<Result<_, _>>()?;
    env.push(c(format!("{STATE_FD_VAR}={}", file.as_raw_fd()).as_bytes())?);

    // Blocked since the start (`block_control_signals`): nothing to do
    // for a stop sent now, it waits for the new program.
    let mut opened = Vec::new();
    let mut result = Ok(());
    for fd in &fds {
        match set_cloexec(*fd, false) {
            Ok(()) => opened.push(*fd),
            Err(e) => {
                result = Err(std::io::Error::other(format!(
                    "fd {fd} cannot be handed over: {e}"
                )));
                break;
            }
        }
    }
    if result.is_ok() {
        // Only returns on failure.
        let e = nix::unistd::execve(&path, &argv, &env).unwrap_err();
        result = Err(std::io::Error::other(format!(
            "execve {}: {e}",
            program.display()
        )));
    }
    for fd in opened {
        let _ = set_cloexec(fd, true);
    }
    result.map(|()| unreachable!("execve returned without an error"))
}

/// In a program started by [`exec`]: take the state document's bytes, if
/// there is one, and clear its variable.
///
/// # Safety
/// Changes the environment: call it before any thread starts.
pub unsafe fn take() -> Result<Option<Vec<u8>>, String> {
    let Some(var) = std::env::var_os(STATE_FD_VAR) else {
        return Ok(None);
    };
    // SAFETY: the caller guarantees no other thread runs yet.
    unsafe { std::env::remove_var(STATE_FD_VAR) };
    let fd: RawFd = var
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|fd| *fd > 2)
        .ok_or_else(|| format!("{STATE_FD_VAR}={var:?} is not an fd"))?;
    set_cloexec(fd, true).map_err(|e| format!("{STATE_FD_VAR}: fd {fd}: {e}"))?;
    // SAFETY: the old program left this fd open for us and nothing else owns it.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut bytes = Vec::new();
    std::io::Seek::rewind(&mut file).map_err(|e| format!("reading the state: {e}"))?;
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("reading the state: {e}"))?;
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_program_is_found() {
        let p = program().unwrap();
        assert!(p.is_file(), "{}", p.display());
    }

    #[test]
    fn a_program_that_is_not_nodeherd_is_refused() {
        let e = check(Path::new("/bin/true"), b"{}").unwrap_err();
        assert!(e.contains("not a nodeherd"), "{e}");
        let text =
            std::env::temp_dir().join(format!("nodeherd-not-a-program-{}", std::process::id()));
        std::fs::write(&text, "hello\n").unwrap();
        let e = check(&text, b"{}").unwrap_err();
        let _ = std::fs::remove_file(&text);
        assert!(e.contains("not an executable"), "{e}");
    }
}
