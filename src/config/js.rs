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
if (p.endsWith('.mjs')) import(require('url').pathToFileURL(p)).then(done, (e) => { throw e; });
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
            "{msg}\n(nodeherd runs as root, so it evaluated the file as user nobody with a clean \
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
        let msg = format!(
            "evaluating it with node failed ({status}):\n{}",
            excerpt(&stderr)
        );
        // An error in the file's own text is the file's: running as
        // nobody has nothing to do with it.
        return Err(if stderr.contains("SyntaxError") {
            msg
        } else {
            hint(msg)
        });
    }
    Ok(stdout)
}

/// Lines of node's report kept, and characters of each.
const EXCERPT_LINES: usize = 24;
const EXCERPT_WIDTH: usize = 160;

/// What node printed of an uncaught error, as node prints it: the file
/// and line, the offending line with a caret under it, the error, and the
/// stack frames in the file (node's own frames and its version line left
/// out); indented, at most [`EXCERPT_LINES`] lines of [`EXCERPT_WIDTH`]
/// characters (a long line is cut around its caret). The file's text is
/// shown to whoever runs nodeherd, maybe root in a terminal: every control
/// character (an escape sequence) and bidirectional override becomes `?`.
pub(super) fn excerpt(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            let internal_frame = t.starts_with("at ")
                && (t.contains("node:") || t.contains("[eval]") || !t.contains('/'));
            !internal_frame && !t.starts_with("Node.js v")
        })
        .collect();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < lines.len() && out.len() < EXCERPT_LINES {
        let line = lines[i];
        if line.trim().is_empty() {
            // One blank line between parts, none at the ends.
            if out.last().is_some_and(|l| !l.is_empty()) {
                out.push(String::new());
            }
            i += 1;
            continue;
        }
        let caret = lines.get(i + 1).and_then(|next| caret_at(next));
        match caret {
            Some(col) if line.chars().count() > EXCERPT_WIDTH => {
                let start = col.saturating_sub(EXCERPT_WIDTH / 2);
                out.push(format!("…{}…", shown(line, start, EXCERPT_WIDTH)));
                out.push(format!(" {}", shown(lines[i + 1], start, EXCERPT_WIDTH)));
                i += 2;
            }
            _ => {
                let cut = line.chars().count() > EXCERPT_WIDTH;
                out.push(format!(
                    "{}{}",
                    shown(line, 0, EXCERPT_WIDTH),
                    if cut { "…" } else { "" }
                ));
                i += 1;
            }
        }
    }
    while out.last().is_some_and(String::is_empty) {
        out.pop();
    }
    if out.is_empty() {
        return "    (node printed nothing)".into();
    }
    out.iter()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("    {l}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The column of the first `^` of a caret line (spaces, tabs and `^` only).
fn caret_at(line: &str) -> Option<usize> {
    let col = line.find('^')?;
    line.chars()
        .all(|c| matches!(c, ' ' | '\t' | '^'))
        .then(|| line[..col].chars().count())
}

/// `width` characters of `line` from `start`, fit for a terminal.
fn shown(line: &str, start: usize, width: usize) -> String {
    line.chars()
        .skip(start)
        .take(width)
        .map(|c| {
            let unsafe_char = (c.is_control() && c != '\t')
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if unsafe_char { '?' } else { c }
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::excerpt;

    /// Node 20's report of a syntax error in a required file.
    const SYNTAX: &str = "/srv/app/ecosystem.config.js:4
    script: 'app.js',
    ^^^^^^

SyntaxError: Unexpected identifier 'script'
    at wrapSafe (node:internal/modules/cjs/loader:1464:18)
    at Module._compile (node:internal/modules/cjs/loader:1495:20)
    at [eval]:1:1

Node.js v20.20.2
";

    #[test]
    fn a_syntax_error_is_shown_as_node_shows_it_without_node_s_own_frames() {
        assert_eq!(
            excerpt(SYNTAX),
            "    /srv/app/ecosystem.config.js:4
        script: 'app.js',
        ^^^^^^

    SyntaxError: Unexpected identifier 'script'"
        );
    }

    #[test]
    fn frames_in_the_file_stay_and_long_lines_are_cut_around_the_caret() {
        let long = format!("{}oops here{}", "a".repeat(500), "b".repeat(500));
        let caret = format!("{}^^^^", " ".repeat(500));
        let report = format!(
            "/srv/x.config.js:1\n{long}\n{caret}\n\nReferenceError: oops is not defined\n    at Object.<anonymous> (/srv/x.config.js:1:501)\n    at Module._compile (node:internal/modules/cjs/loader:1495:20)\n"
        );
        let e = excerpt(&report);
        let lines: Vec<&str> = e.lines().collect();
        assert!(
            lines[1].contains("oops here") && lines[1].starts_with("    …"),
            "{e}"
        );
        assert!(
            lines.iter().all(|l| l.chars().count() <= 4 + 2 + 160),
            "{e}"
        );
        let (src, car) = (
            lines[1].chars().collect::<Vec<_>>(),
            lines[2].chars().collect::<Vec<_>>(),
        );
        let at = car.iter().position(|c| *c == '^').unwrap();
        assert_eq!(src[at..at + 4].iter().collect::<String>(), "oops", "{e}");
        assert!(
            e.contains("at Object.<anonymous> (/srv/x.config.js:1:501)"),
            "{e}"
        );
        assert!(!e.contains("node:internal"), "{e}");
    }

    #[test]
    fn the_file_s_text_cannot_drive_the_terminal_and_is_bounded() {
        let report = format!(
            "/srv/x.config.js:2\n\u{1b}]0;owned\u{7}\u{1b}[2J x \u{202e}y\n^\n\nSyntaxError: Unexpected\n{}",
            "    at f (/srv/x.config.js:1:1)\n".repeat(1000)
        );
        let e = excerpt(&report);
        assert!(
            !e.chars().any(|c| c.is_control() && c != '\n' && c != '\t'),
            "{e:?}"
        );
        assert!(!e.contains('\u{202e}'), "{e:?}");
        assert!(e.lines().count() <= 24, "{e}");
    }
}
