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
//! - a [`State`] document (JSON in a memfd, whose number is in
//!   `NODEHERD_REEXEC_STATE_FD`) that says what each fd is, the
//!   configuration in force, and the supervisor's state
//!   ([`CoreState`]: slots, workers, counters, deadlines).
//!
//! The new program is checked first: it is run with `__check-state` and must
//! read the very document it will be given (a file that is not nodeherd, or
//! one that cannot read this format, is refused and the old manager runs on).
//! SIGTERM, SIGINT, SIGHUP and SIGUSR2 are blocked across the exec (the mask
//! and pending signals survive `execve`, handlers do not), so a stop sent in
//! that instant is delivered to the new program once it listens for it.
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

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use serde::{Deserialize, Serialize};

use crate::config::App;
use crate::sockets::{CarriedSocket, SetState};
use crate::supervisor::WorkerId;
use crate::supervisor::handover::CoreState;

/// The version of the [`State`] document. A program reads its own format
/// and every older one it knows; the check refuses anything else.
pub const STATE_FORMAT: u32 = 1;

/// Where the new program finds the state document.
pub const STATE_FD_VAR: &str = "NODEHERD_REEXEC_STATE_FD";

/// The hidden subcommand that checks a program can read a state document.
pub const CHECK_COMMAND: &str = "__check-state";

/// The first word of the check's answer.
const CHECK_OK: &str = "nodeherd-state-ok";

/// How long the new program has to answer the check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the new program needs besides the fds themselves.
#[derive(Debug, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// The version of nodeherd that wrote it.
    pub written_by: String,
    /// `CLOCK_MONOTONIC` when it was written (ns), to know how long the exec took.
    pub monotonic_ns: u64,
    /// The configuration in force (the last one a reload accepted).
    pub app: App,
    /// The manager's private directory (the same pid keeps the same one).
    pub runtime_dir: PathBuf,
    pub sockets: SetState,
    /// Sockets bound on workers' requests, by address.
    pub shared: Vec<(crate::ipc::SharedAddress, CarriedSocket)>,
    pub notify_fd: RawFd,
    pub control_fd: Option<RawFd>,
    pub metrics: Option<CarriedSocket>,
    pub core: CoreState,
    pub workers: Vec<CarriedWorker>,
}

/// A worker's fds on the manager's side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedWorker {
    pub id: WorkerId,
    pub pid: i32,
    /// Our end of its Node IPC channel.
    pub ipc: Option<RawFd>,
    pub stdout: Option<RawFd>,
    pub stderr: Option<RawFd>,
}

/// A worker's fds, owned again by the new program.
pub struct AdoptedWorker {
    pub id: WorkerId,
    pub pid: i32,
    pub ipc: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

impl State {
    /// Every fd the document names.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds = self.sockets.fds();
        fds.extend(self.shared.iter().map(|(_, s)| s.fd));
        fds.push(self.notify_fd);
        fds.extend(self.control_fd);
        fds.extend(self.metrics.as_ref().map(|m| m.fd));
        for w in &self.workers {
            fds.extend(w.ipc);
            fds.extend(w.stdout);
            fds.extend(w.stderr);
        }
        fds
    }
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

/// `nodeherd __check-state`: read a state document on stdin and say
/// whether this program can take it over.
pub fn check_main() -> std::process::ExitCode {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("nodeherd: reading the state: {e}");
        return std::process::ExitCode::from(1);
    }
    match parse(&input) {
        Ok(state) => {
            println!(
                "{CHECK_OK} {} {} (written by {})",
                state.format,
                env!("CARGO_PKG_VERSION"),
                state.written_by
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nodeherd: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

fn parse(bytes: &[u8]) -> Result<State, String> {
    #[derive(Deserialize)]
    struct Head {
        format: u32,
    }
    let head: Head = serde_json::from_slice(bytes)
        .map_err(|e| format!("the state document is not one nodeherd wrote: {e}"))?;
    if head.format == 0 || head.format > STATE_FORMAT {
        return Err(format!(
            "state format {} is newer than this nodeherd reads ({STATE_FORMAT})",
            head.format
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("reading state format {}: {e}", head.format))
}

/// The signals whose handlers an exec resets: blocked across it.
fn control_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set
}

/// Let the control signals in again (after the new program's handlers are
/// installed); one that came during the exec is delivered now.
pub fn unblock_signals() {
    let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&control_signals()), None);
}

fn set_cloexec(fd: RawFd, on: bool) -> nix::Result<()> {
    // SAFETY: only the flags of an fd this process holds are changed.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD)?);
    let flags = if on {
        flags | FdFlag::FD_CLOEXEC
    } else {
        flags - FdFlag::FD_CLOEXEC
    };
    fcntl(fd, FcntlArg::F_SETFD(flags)).map(|_| ())
}

/// Replace this program with `program`, handing `state` over. Returns only
/// if that failed, with everything as it was before.
///
/// Must be called on the thread that forked the workers (the main thread):
/// an exec from another thread would end that one, and with it the
/// workers' parent-death signal would fire.
pub fn exec(program: &Path, state: &State) -> std::io::Error {
    match try_exec(program, state) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn try_exec(program: &Path, state: &State) -> std::io::Result<std::convert::Infallible> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let doc = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    let memfd =
        nix::sys::memfd::memfd_create(c"nodeherd-state", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    let mut file = std::fs::File::from(memfd);
    file.write_all(&doc)?;
    let fds: Vec<RawFd> = state.fds().into_iter().chain([file.as_raw_fd()]).collect();
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

    let mut old_mask = SigSet::empty();
    sigprocmask(
        SigmaskHow::SIG_BLOCK,
        Some(&control_signals()),
        Some(&mut old_mask),
    )?;
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
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None);
    result.map(|()| unreachable!("execve returned without an error"))
}

/// In a program started by [`exec`]: take the state document, if there is
/// one, and clear its variable.
///
/// # Safety
/// Changes the environment: call it before any thread starts.
pub unsafe fn take() -> Result<Option<State>, String> {
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
    open_fd(fd).map_err(|e| format!("{STATE_FD_VAR}: fd {fd}: {e}"))?;
    // SAFETY: the old program left this fd open for us and nothing else owns it.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut bytes = Vec::new();
    std::io::Seek::rewind(&mut file).map_err(|e| format!("reading the state: {e}"))?;
    file.read_to_end(&mut bytes)
        .map_err(|e| format!("reading the state: {e}"))?;
    parse(&bytes).map(Some)
}

/// Check `fd` is open and make it close-on-exec again.
fn open_fd(fd: RawFd) -> Result<(), String> {
    set_cloexec(fd, true).map_err(|e| e.to_string())
}

/// Own a handed-over fd again (close-on-exec, as every fd of the manager).
pub fn adopt(fd: RawFd) -> Result<OwnedFd, String> {
    open_fd(fd).map_err(|e| format!("handed-over fd {fd}: {e}"))?;
    // SAFETY: the old program handed this fd over; the state names it once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl CarriedWorker {
    pub fn adopt(self) -> Result<AdoptedWorker, String> {
        let opt = |fd: Option<RawFd>| fd.map(adopt).transpose();
        Ok(AdoptedWorker {
            id: self.id,
            pid: self.pid,
            ipc: opt(self.ipc)?,
            stdout: opt(self.stdout)?,
            stderr: opt(self.stderr)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_or_foreign_documents_are_refused() {
        assert!(parse(b"{}").is_err());
        assert!(parse(b"not json").is_err());
        let e = parse(br#"{"format": 99}"#).unwrap_err();
        assert!(e.contains("newer"), "{e}");
    }

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
