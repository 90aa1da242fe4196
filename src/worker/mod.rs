//! Starting worker processes: command line, environment, fds, IPC channel.
//!
//! nodeherd forks and execs workers itself rather than through
//! `std::process::Command`, for one reason: `LISTEN_PID` must be the child's
//! own pid (that is how `sd_listen_fds()` in any language knows the sockets
//! are meant for it), and the child's pid is only known after the fork. The
//! fork itself, and every `unsafe` it needs, is in [`fork`].
//!
//! Layout in the child: fd 0 is /dev/null, 1 and 2 are pipes read by the
//! manager's log readers, the listening sockets sit at 3.., a Node
//! worker's IPC channel right after them (`NODE_CHANNEL_FD`), and the
//! sealed preload right after that (see [`preload`]), which the worker
//! closes once it has read it, then the channel of the preload's helper
//! thread (`NODEHERD_HELPER_FD`, see [`crate::autopsy`]). Every other fd of the manager is
//! close-on-exec and does not reach the child.

pub mod cgroup;
pub mod fork;
pub mod preload;
pub mod process;

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::fcntl::OFlag;

use crate::config::{App, Interpreter};
use crate::sockets::Listener;
use preload::Preload;

/// Identifies one worker process for its whole life; never reused, so an
/// event about a worker that is gone is recognised and dropped.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct WorkerId(pub u64);

/// How much a stopping worker may have written to stdout or stderr before
/// the manager has read it.
///
/// Linux gives a pipe 64 KiB. A busy app that logs every request (Fastify's
/// pino, for one) writes asynchronously and keeps what the pipe refuses in
/// its own memory; at exit it flushes that synchronously, sleeping 100 ms
/// each time the pipe is full. With 64 KiB that is 640 KB/s, so on a busy
/// machine a worker's last few hundred kilobytes of log outlasted
/// kill_timeout and it was killed mid-flush, its last lines lost. 1 MiB is
/// what an unprivileged process may ask for by default
/// (`/proc/sys/fs/pipe-max-size`).
const STOPPING_PIPE_BYTES: i32 = 1 << 20;

/// Widen a stopping worker's output pipe to [`STOPPING_PIPE_BYTES`], best
/// effort. Only while it stops: the kernel counts a pipe's capacity against
/// its user's pipe budget (`/proc/sys/fs/pipe-user-pages-soft`, 64 MiB), and
/// past it every new pipe of that user gets 8 KiB, so 1 MiB for each
/// running worker would starve new ones from about 32 workers on. Refused
/// (over the budget), the pipe keeps its 64 KiB.
pub fn widen_for_exit(pipe: &OwnedFd) {
    let _ = nix::fcntl::fcntl(
        pipe,
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(STOPPING_PIPE_BYTES),
    );
}

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
    /// PM2's `increment_var`: this variable is its base value plus the slot index.
    increment: Option<(String, i64)>,
    /// Give the worker a Node IPC channel (Node workers, and `interpreter:
    /// none` scripts, which may exec node).
    node: bool,
    /// Give a Node worker the helper thread's channel (`autopsy`).
    helper: bool,
    credentials: Option<crate::config::Credentials>,
    /// The preload, placed right after the IPC channel (Node workers).
    preload: Preload,
    /// How many sockets the launcher's command line counts on: the
    /// preload's fd number follows from it.
    sockets: usize,
    /// Each worker's cgroup limits (written where cgroups are on).
    limits: crate::worker::cgroup::Limits,
}

/// A freshly started worker, as its parent sees it.
pub struct Spawned {
    pub pid: i32,
    /// Our end of the Node IPC channel (Node workers only).
    pub ipc: Option<std::os::unix::net::UnixStream>,
    /// Our end of the preload's helper thread's channel (Node workers only).
    pub helper: Option<std::os::unix::net::UnixStream>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

impl Launcher {
    /// Prepare to start workers of `app`, with the preload `preload` and the
    /// manager's worker-facing notify socket at `notify_socket`.
    pub fn new(
        app: &App,
        listeners: &[Listener],
        preload: &Preload,
        notify_socket: &Path,
    ) -> Launcher {
        // After the sockets at 3.. and the IPC channel.
        let preload_at = 4 + listeners.len() as RawFd;
        let import = preload::import_arg(preload_at);
        let (program, mut args, node) = match &app.interpreter {
            // First, so it runs before the app's own `--import`s, as the
            // preload always did.
            Interpreter::Node(p) => (p.clone(), vec![import.clone()], true),
            Interpreter::Other(p) => (p.clone(), Vec::new(), false),
            Interpreter::None => (app.script.clone(), Vec::new(), false),
        };
        if !matches!(app.interpreter, Interpreter::None) {
            args.extend(app.interpreter_args.iter().cloned());
        }
        let limits = crate::worker::cgroup::Limits {
            memory_max: crate::worker::cgroup::worker_memory(
                app.max_memory,
                crate::worker::cgroup::unit_memory_max(),
                app.instances,
            ),
            cpu_weight: app.cpu_weight,
            pids_max: app.pids_max,
        };
        // Node sizes its heap from the host's memory, not the worker's
        // budget: derive it, unless the app chose its own.
        let own_heap = |s: &str| s.contains("--max-old-space-size");
        if let (Interpreter::Node(_), Some(budget)) = (&app.interpreter, limits.memory_max)
            && !app.interpreter_args.iter().any(|a| own_heap(a))
            && !app.env.get("NODE_OPTIONS").is_some_and(|o| own_heap(o))
            && !std::env::var("NODE_OPTIONS").is_ok_and(|o| own_heap(&o))
        {
            args.push(format!(
                "--max-old-space-size={}",
                crate::worker::cgroup::heap_mib(budget)
            ));
        }
        if !matches!(app.interpreter, Interpreter::None) {
            args.push(app.script.display().to_string());
        }
        args.extend(app.args.iter().cloned());

        let mut env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| !SCRUBBED_ENV.contains(&k.as_str()))
            // `filter_env` (PM2's), but systemd's pointer to the unit's
            // credentials is the workers' way to them, not the manager's
            // environment leaking.
            .filter(|(k, _)| k == "CREDENTIALS_DIRECTORY" || !app.filter_env.drops(k))
            .collect();
        for (k, v) in &app.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        // The preload's drain uses the same bound the manager kills at.
        if !app.env.contains_key("NODEHERD_KILL_TIMEOUT_MS") {
            env.retain(|(ek, _)| ek != "NODEHERD_KILL_TIMEOUT_MS");
            env.push((
                "NODEHERD_KILL_TIMEOUT_MS".into(),
                app.kill_timeout.as_millis().to_string(),
            ));
        }
        let node_options = env
            .iter()
            .find(|(k, _)| k == "NODE_OPTIONS")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
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
        // The preload's heartbeat: often enough to tell a stuck event loop
        // within max_event_loop_delay, and once a second otherwise.
        let beat = app
            .max_event_loop_delay
            .map_or(1000, |d| (d.as_millis() / 4).clamp(50, 1000));
        set("NODEHERD_HEARTBEAT_MS", beat.to_string());
        set("NOTIFY_SOCKET", notify_socket.display().to_string());
        // A script run directly (`interpreter: none`) may be a shell script
        // that ends in `exec node app.js`: that node loads the preload through
        // NODE_OPTIONS, and claims the sockets because its pid is LISTEN_PID.
        let wrapper = matches!(app.interpreter, Interpreter::None);
        if wrapper {
            set(
                "NODE_OPTIONS",
                format!("{node_options} {import}").trim().to_string(),
            );
        }
        if node || wrapper {
            set("NODE_CHANNEL_SERIALIZATION_MODE", "json".into());
        }
        // As PM2: the variable's value (0 without one) plus the instance.
        let increment = app.increment_var.as_ref().map(|var| {
            let base = env
                .iter()
                .find(|(k, _)| k == var)
                .and_then(|(_, v)| v.trim().parse::<i64>().ok())
                .unwrap_or(0);
            env.retain(|(k, _)| k != var);
            (var.clone(), base)
        });
        Launcher {
            program,
            args,
            base_env: env,
            increment,
            cwd: app.cwd.clone(),
            instance_var: app.instance_var.clone(),
            node: node || matches!(app.interpreter, Interpreter::None),
            helper: app.autopsy,
            credentials: app.credentials.clone(),
            preload: preload.clone(),
            sockets: listeners.len(),
            limits,
        }
    }

    /// The command line, for logs, quoted as a shell reads it back (a
    /// path with a space is one word, not two).
    pub fn command_line(&self) -> String {
        std::iter::once(shell_quote(&self.program.display().to_string()))
            .chain(self.args.iter().map(|a| match preload::shown(a) {
                // The preload's bootstrap, named rather than quoted.
                shown if shown != a => shown.to_string(),
                _ => shell_quote(a),
            }))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Fork and exec one worker for slot `index`, inheriting `listeners` at fd 3...
    pub fn spawn(&self, index: u32, listeners: &[Listener]) -> Result<Spawned> {
        self.spawn_in(index, listeners, None)
    }

    /// Each worker's cgroup limits.
    pub fn limits(&self) -> &crate::worker::cgroup::Limits {
        &self.limits
    }

    /// [`Launcher::spawn`], the child joining the cgroup `cgroup` before exec.
    pub fn spawn_in(
        &self,
        index: u32,
        listeners: &[Listener],
        cgroup: Option<&crate::worker::cgroup::Leaf>,
    ) -> Result<Spawned> {
        if listeners.len() != self.sockets {
            anyhow::bail!(
                "{} listening sockets where the command line counts on {}",
                listeners.len(),
                self.sockets
            );
        }
        let ipc_fd: RawFd = 3 + listeners.len() as RawFd;
        let c = |s: &OsStr| CString::new(s.as_bytes()).context("a NUL byte in the command line");
        // Looked up on PATH at every start, so a node installed since (a
        // newer one earlier on PATH) is picked up by the next reload.
        let resolved = crate::config::find_executable(&self.program);
        let program = c(resolved.as_deref().unwrap_or(&self.program).as_os_str())?;
        let mut argv: Vec<CString> = vec![program.clone()];
        for a in &self.args {
            argv.push(c(OsStr::new(a))?);
        }
        let entry = |k: &str, v: &str| -> Vec<u8> {
            let mut e = Vec::with_capacity(k.len() + v.len() + 2);
            e.extend_from_slice(k.as_bytes());
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            e.push(0);
            e
        };
        let mut env: Vec<Vec<u8>> = self
            .base_env
            .iter()
            .filter(|(k, v)| !k.contains('\0') && !v.contains('\0'))
            .map(|(k, v)| entry(k, v))
            .collect();
        env.push(entry(&self.instance_var, &index.to_string()));
        if let Some((var, base)) = &self.increment {
            env.push(entry(
                var,
                &base.saturating_add(i64::from(index)).to_string(),
            ));
        }
        if self.node {
            env.push(entry("NODE_CHANNEL_FD", &ipc_fd.to_string()));
        }
        // Without it the preload starts no helper thread.
        if self.node && self.helper {
            env.push(entry("NODEHERD_HELPER_FD", &(ipc_fd + 2).to_string()));
        }
        env.push(fork::listen_pid_placeholder());
        let cwd = c(self.cwd.as_os_str())?;

        let devnull = std::fs::File::open("/dev/null").context("opening /dev/null")?;
        let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("a stdout pipe")?;
        let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("a stderr pipe")?;
        let (ipc_parent, ipc_child) = if self.node {
            let (a, b) =
                std::os::unix::net::UnixStream::pair().context("creating the IPC channel")?;
            (Some(a), Some(OwnedFd::from(b)))
        } else {
            (None, None)
        };
        let (helper_parent, helper_child) = if self.node && self.helper {
            let (a, b) = std::os::unix::net::UnixStream::pair()
                .context("creating the helper thread's channel")?;
            (Some(a), Some(OwnedFd::from(b)))
        } else {
            (None, None)
        };
        let sockets: Vec<RawFd> = listeners.iter().map(|l| l.fd.as_raw_fd()).collect();
        let pid = fork::fork_exec(fork::Plan {
            program: &program,
            argv: &argv,
            env: &mut env,
            cwd: &cwd,
            stdio: [devnull.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
            sockets: &sockets,
            ipc: ipc_child.as_ref().map(|f| f.as_raw_fd()),
            preload: self.node.then(|| self.preload.fd().as_raw_fd()),
            helper: helper_child.as_ref().map(|f| f.as_raw_fd()),
            credentials: self.credentials.as_ref(),
            cgroup: cgroup.map(crate::worker::cgroup::Leaf::procs_fd),
        })?;
        Ok(Spawned {
            pid,
            ipc: ipc_parent,
            helper: helper_parent,
            stdout: out_r,
            stderr: err_r,
        })
    }
}

/// `word` as one shell word: as it is when only safe characters make it,
/// else in single quotes.
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_@%+=:,./-".contains(&b));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_quote_what_a_shell_would_split() {
        assert_eq!(shell_quote("/srv/app/server.js"), "/srv/app/server.js");
        assert_eq!(
            shell_quote("/srv/my app/server.js"),
            "'/srv/my app/server.js'"
        );
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
