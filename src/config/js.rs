//! Evaluating a `.config.js`: the file is code, written by whoever can write
//! the app's tree, so it runs with nothing of ours. Not as root: a root
//! `nodeherd install` or `nodeherd run` evaluates it as user `nobody`, with
//! a clean environment and no way back (no supplementary groups,
//! `PR_SET_NO_NEW_PRIVS`, so no setuid program lifts it). Never with our
//! descriptors: a manager holds its listening sockets and the workers'
//! channels, and an evaluation at reload must not inherit them.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a `.config.js` may take to evaluate before we give up on it.
const CONFIG_JS_TIMEOUT: Duration = Duration::from_secs(10);

/// The variables a root evaluation keeps: where node is, and the ones a
/// config commonly branches on. Nothing of root's own (tokens, sudo's).
const KEPT_ENV: &[&str] = &["PATH", "NODE_ENV", "LANG", "LC_ALL", "TZ"];

/// The user and group a `.config.js` runs as when we are root.
fn nobody() -> (u32, u32) {
    match nix::unistd::User::from_name("nobody").ok().flatten() {
        Some(u) if !u.uid.is_root() && u.gid.as_raw() != 0 => (u.uid.as_raw(), u.gid.as_raw()),
        _ => (65534, 65534),
    }
}

/// Evaluate a `.config.js` with node and return the JSON it prints.
pub(super) fn evaluate(file: &Path) -> Result<String, String> {
    // The evaluator accepts `module.exports = {...}`, a function returning
    // the config, and ES modules with a default export.
    const EVAL: &str = r#"
const p = require('path').resolve(process.argv[1]);
const done = (m) => {
  let c = m && m.__esModule && m.default ? m.default : m;
  if (c && typeof c === 'object' && 'default' in c && !('apps' in c)) c = c.default;
  if (typeof c === 'function') c = c();
  Promise.resolve(c).then((v) => process.stdout.write(JSON.stringify(v === undefined ? null : v)));
};
if (p.endsWith('.mjs')) import(require('url').pathToFileURL(p)).then(done, (e) => { console.error(String(e && e.stack || e)); process.exit(1); });
else done(require(p));
"#;
    let as_user = nix::unistd::geteuid().is_root().then(nobody);
    let mut cmd = Command::new("node");
    cmd.arg("-e")
        .arg(EVAL)
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("NODE_OPTIONS");
    if as_user.is_some() {
        cmd.env_clear();
        for k in KEPT_ENV {
            if let Some(v) = std::env::var_os(k) {
                cmd.env(k, v);
            }
        }
    }
    // SAFETY: `confine` makes only async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || confine(as_user));
    }
    let hint = |msg: String| match as_user {
        Some(_) => format!(
            "{msg} (nodeherd runs as root, so it evaluated the file as user nobody with a clean \
             environment: a .config.js is code, and whoever can write it must not get root. Make \
             what it reads readable by nobody, or convert it to JSON as its owner: node -p \
             \"JSON.stringify(require('{}'), null, 2)\" > ecosystem.json)",
            file.display()
        ),
        None => msg,
    };
    let mut child = cmd.spawn().map_err(|e| {
        hint(format!(
            "cannot run `node` to evaluate it (is node on PATH?): {e}"
        ))
    })?;
    // Read the pipes on threads so a chatty config cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout was piped above");
    let mut err = child.stderr.take().expect("stderr was piped above");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let deadline = Instant::now() + CONFIG_JS_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "evaluating it took longer than {} s (does it loop or wait on something?)",
                    CONFIG_JS_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for node failed: {e}")),
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    if !status.success() {
        let last = stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(6)
            .collect::<Vec<_>>()
            .join(" | ");
        return Err(hint(format!(
            "evaluating it with node failed ({status}): {last}"
        )));
    }
    Ok(stdout)
}

/// In the child, before exec: no descriptor of ours past stdio, and, for
/// root, user `as_user` for good.
fn confine(as_user: Option<(u32, u32)>) -> std::io::Result<()> {
    let os_err = std::io::Error::last_os_error;
    // SAFETY: plain system calls on integers and null pointers.
    unsafe {
        // Close-on-exec rather than closed: std's own exec-error pipe must
        // stay open until the exec.
        if libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            // Before Linux 5.11: each possible descriptor in turn.
            let mut lim: libc::rlimit = std::mem::zeroed();
            let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur.min(1 << 20) as libc::c_int
            } else {
                1 << 16
            };
            for fd in 3..max {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        if let Some((uid, gid)) = as_user {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(os_err());
            }
            // Every id changed, so this must fail; if it does not, stop.
            if libc::setuid(0) == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::EPERM));
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(os_err());
        }
    }
    Ok(())
}
