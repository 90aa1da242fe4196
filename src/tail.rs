//! `nodeherd logs [APP] [-i N] [-f] [--lines N]`: what `pm2 logs` shows,
//! the lines of an app's workers, each after `[app:N]`, and the manager's
//! own events after `nodeherd[app]:`.
//!
//! A manager under systemd writes every worker line to the journal as an
//! entry of its own, with `NODEHERD_APP=app` and `NODE_APP_INSTANCE=N`
//! (see `logs.rs`); so do its events. That is where these come from:
//! `journalctl NODEHERD_APP=app [NODE_APP_INSTANCE=N]`, read as JSON and
//! printed the way the manager prints them on a terminal. A manager run
//! by hand writes them to its stderr instead: whatever that is (a
//! terminal, a pipe, a file), it is said; a file is shown.
//!
//! Every line is an app's own output: control characters are shown, not
//! sent, so an app cannot drive the terminal of whoever reads its logs.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::cli::LogsArgs;
use crate::client::{Failure, outln, reach};
use crate::discover::{self, printable};

/// Where an app's lines are.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    /// In the journal (under systemd, or a manager whose stderr is a
    /// journal stream), or, for an app not running, where they were.
    Journal,
    /// On a manager's stderr, which is this (a terminal, a pipe, a file).
    Stderr { pid: u32, to: Stderr },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stderr {
    File(PathBuf),
    Terminal(String),
    Pipe {
        parent: Option<(u32, String)>,
    },
    Null,
    Other(String),
    /// Not ours to look at (another user's manager).
    Unknown,
}

impl Stderr {
    fn describe(&self) -> String {
        match self {
            Stderr::File(p) => format!("the file {}", p.display()),
            Stderr::Terminal(t) => format!("the terminal it was started in ({t})"),
            Stderr::Pipe {
                parent: Some((pid, comm)),
            } => format!("a pipe to the program that started it (pid {pid}, {comm})"),
            Stderr::Pipe { parent: None } => "a pipe to the program that started it".into(),
            Stderr::Null => "nowhere (/dev/null)".into(),
            Stderr::Other(what) => what.clone(),
            Stderr::Unknown => "a place only root or its own user may look at".into(),
        }
    }
}

pub fn logs(args: LogsArgs) -> ExitCode {
    let places = crate::client::block_on(places(&args)).and_then(|r| r);
    let places = match places {
        Ok(p) => p,
        Err(Failure(code, msg)) => {
            eprintln!("nodeherd: {msg}");
            return ExitCode::from(code);
        }
    };
    let mut journal_apps = Vec::new();
    let mut files = Vec::new();
    for (app, place, pid) in &places {
        // With out_file/error_file/log_file the workers' lines are in those
        // files, not where the manager's own events are.
        let logs = pid.map(log_files_of).unwrap_or_default();
        let logs = for_instance(logs, args.instance);
        if !logs.is_empty() {
            eprintln!(
                "nodeherd: {}",
                files_hint(app, &logs, args.lines, args.follow)
            );
        }
        match place {
            Place::Journal => journal_apps.push(app.clone()),
            Place::Stderr { pid, to } => {
                if !logs.is_empty() {
                    continue;
                }
                eprintln!(
                    "nodeherd: {}'s manager (pid {pid}) runs by hand, not under systemd: it writes \
                     its workers' lines to its stderr, {}, not to the journal",
                    printable(app),
                    to.describe()
                );
                if let Stderr::File(path) = to {
                    files.push((app.clone(), path.clone()));
                }
            }
        }
    }
    if !journal_apps.is_empty() {
        if !journal_here() {
            eprintln!(
                "nodeherd: there is no journal on this host (no systemd-journald): nothing to show \
                 for {}; where its journal is, {} shows these lines",
                journal_apps
                    .iter()
                    .map(|a| printable(a))
                    .collect::<Vec<_>>()
                    .join(", "),
                journalctl_hint(&journal_apps, args.instance, args.lines, args.follow)
            );
            return ExitCode::from(1);
        }
        if !files.is_empty() && args.follow {
            eprintln!("nodeherd: following the journal only; name one app to follow its file");
        }
        return journal(&journal_apps, &args);
    }
    match files.as_slice() {
        [] => ExitCode::from(1),
        [(app, path)] => file(app, path, &args),
        many => {
            for (app, path) in many {
                let one = LogsArgs {
                    follow: false,
                    app: args.app.clone(),
                    config_dir: args.config_dir.clone(),
                    bus: args.bus.clone(),
                    ..args
                };
                file(app, path, &one);
            }
            ExitCode::SUCCESS
        }
    }
}

/// Each app asked for (or every app) and where its lines are.
async fn places(args: &LogsArgs) -> Result<Vec<(String, Place, Option<u32>)>, Failure> {
    let units = discover::units().await.unwrap_or_default();
    let under_unit = |app: &str| {
        units
            .iter()
            .any(|u| u.is_up() && discover::app_of_unit(&u.name).is_some_and(|a| a.0 == app))
    };
    let installed = |app: &str| {
        discover::config_of(&args.config_dir, app).is_some()
            || units
                .iter()
                .any(|u| discover::app_of_unit(&u.name).is_some_and(|a| a.0 == app))
    };
    if let Some(app) = &args.app {
        let reached = reach(Some(app), &args.bus).await;
        let pid = reached.as_ref().ok().and_then(|r| r.pid);
        if under_unit(app) {
            return Ok(vec![(app.clone(), Place::Journal, pid)]);
        }
        return match reached {
            Ok(r) => Ok(vec![(app.clone(), place_of(r.pid), r.pid)]),
            // Not running, but it was: its lines are in the journal.
            Err(Failure(3, _)) if installed(app) => Ok(vec![(app.clone(), Place::Journal, None)]),
            Err(e) => Err(e),
        };
    }
    let mut out: Vec<(String, Place, Option<u32>)> = Vec::new();
    for r in discover::running(&args.bus).await.0 {
        let place = if under_unit(&r.app) {
            Place::Journal
        } else {
            place_of(r.reached.pid)
        };
        out.push((r.app, place, r.reached.pid));
    }
    let mut more: Vec<String> = discover::configs(&args.config_dir)
        .into_iter()
        .map(|c| c.0)
        .chain(
            units
                .iter()
                .filter_map(|u| discover::app_of_unit(&u.name).map(|a| a.0)),
        )
        .collect();
    more.sort();
    more.dedup();
    for app in more {
        if !out.iter().any(|(a, ..)| *a == app) {
            out.push((app, Place::Journal, None));
        }
    }
    if out.is_empty() {
        return Err(Failure(
            3,
            "no nodeherd app on this host (none installed, none running)".into(),
        ));
    }
    Ok(out)
}

/// Where the manager `pid` writes its workers' lines.
fn place_of(pid: Option<u32>) -> Place {
    let Some(pid) = pid else {
        return Place::Journal;
    };
    match stderr_of(pid) {
        None => Place::Journal,
        Some(to) => Place::Stderr { pid, to },
    }
}

/// The manager's stderr, or `None` when it is a journal stream (what its
/// `JOURNAL_STREAM` names, as the manager itself decides).
fn stderr_of(pid: u32) -> Option<Stderr> {
    use std::os::unix::fs::MetadataExt;
    let fd2 = format!("/proc/{pid}/fd/2");
    let Ok(link) = std::fs::read_link(&fd2) else {
        return Some(Stderr::Unknown);
    };
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let stream = environ
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"JOURNAL_STREAM="))
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.split_once(':'))
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)));
    if let (Some((dev, ino)), Ok(meta)) = (stream, std::fs::metadata(&fd2))
        && meta.dev() == dev
        && meta.ino() == ino
    {
        return None;
    }
    let text = link.display().to_string();
    Some(if text == "/dev/null" {
        Stderr::Null
    } else if text.starts_with("/dev/pts/") || text.starts_with("/dev/tty") {
        Stderr::Terminal(text)
    } else if text.starts_with("pipe:") {
        Stderr::Pipe {
            parent: parent_of(pid),
        }
    } else if link.is_absolute() && std::fs::metadata(&fd2).is_ok_and(|m| m.is_file()) {
        Stderr::File(link)
    } else {
        Stderr::Other(text)
    })
}

/// The parent of `pid` and its command name.
fn parent_of(pid: u32) -> Option<(u32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ppid: u32 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{ppid}/comm")).ok()?;
    Some((ppid, printable(comm.trim())))
}

/// Whether a journal runs or was kept on this host.
fn journal_here() -> bool {
    [
        "/run/systemd/journal/socket",
        "/run/log/journal",
        "/var/log/journal",
    ]
    .iter()
    .any(|p| Path::new(p).exists())
}

/// The `journalctl` arguments for `apps` (each app's own entries:
/// `NODEHERD_APP=` matches, repeated for an OR).
fn journalctl_args(
    apps: &[String],
    instance: Option<u32>,
    lines: u32,
    follow: bool,
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--no-pager".into(),
        "--output=json".into(),
        format!("--lines={lines}"),
    ];
    if follow {
        a.push("--follow".into());
    }
    for app in apps {
        a.push(format!("NODEHERD_APP={app}"));
    }
    if let Some(i) = instance {
        a.push(format!("NODE_APP_INSTANCE={i}"));
    }
    a
}

/// The `journalctl` command a person would type for these lines.
fn journalctl_hint(apps: &[String], instance: Option<u32>, lines: u32, follow: bool) -> String {
    let mut a = vec!["journalctl".to_string()];
    a.extend(
        apps.iter()
            .map(|app| format!("NODEHERD_APP={}", printable(app))),
    );
    a.extend(instance.map(|i| format!("NODE_APP_INSTANCE={i}")));
    a.push(format!("-n {lines}"));
    if follow {
        a.push("-f".into());
    }
    format!("`{}`", a.join(" "))
}

/// The regular files the manager `pid` holds open for appending, past its
/// stdio: the `out_file`, `error_file` and `log_file` it writes its
/// workers' lines to (it opens nothing else that way).
fn log_files_of(pid: u32) -> Vec<PathBuf> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for fd in fds.flatten() {
        let Some(n) = fd.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if n <= 2 {
            continue;
        }
        let Ok(path) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}")).unwrap_or_default();
        let appends = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| i64::from_str_radix(f.trim(), 8).ok())
            .is_some_and(|f| f & i64::from(libc::O_APPEND) != 0);
        if appends && path.is_absolute() && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            out.push(path);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The files of slot `instance` (`out-2.log`), and those every slot shares.
fn for_instance(files: Vec<PathBuf>, instance: Option<u32>) -> Vec<PathBuf> {
    let Some(i) = instance else {
        return files;
    };
    let slot_of = |p: &PathBuf| {
        let stem = p.file_stem()?.to_str()?;
        stem.rsplit_once('-')?.1.parse::<u32>().ok()
    };
    files
        .into_iter()
        .filter(|p| slot_of(p).is_none_or(|s| s == i))
        .collect()
}

/// Where an app's workers' lines are when they go to files.
fn files_hint(app: &str, files: &[PathBuf], lines: u32, follow: bool) -> String {
    let names: Vec<String> = files
        .iter()
        .map(|p| printable(&p.display().to_string()))
        .collect();
    format!(
        "{}'s workers write their lines to files (out_file, error_file, log_file), not to the \
         journal: {}; `tail -n {lines}{} {}` shows them",
        printable(app),
        names.join(", "),
        if follow { " -F" } else { "" },
        names.join(" ")
    )
}

fn journal(apps: &[String], args: &LogsArgs) -> ExitCode {
    let argv = journalctl_args(apps, args.instance, args.lines, args.follow);
    let mut cmd = Command::new("journalctl");
    cmd.args(&argv).stdin(Stdio::null()).stdout(Stdio::piped());
    // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
    // A `logs -f` that is killed takes its journalctl with it.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nodeherd: cannot run journalctl: {e}");
            return ExitCode::from(1);
        }
    };
    let Some(stdout) = child.stdout.take() else {
        return ExitCode::from(1);
    };
    let out = std::io::stdout();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let Ok(entry) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let Some(text) = format_entry(&entry) else {
            continue;
        };
        let mut out = out.lock();
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            // The reader went (a pager quit, `| head`): so do we.
            let _ = child.kill();
            break;
        }
    }
    match child.wait() {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(_) => {
            eprintln!("nodeherd: journalctl {} failed", argv.join(" "));
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("nodeherd: journalctl: {e}");
            ExitCode::from(1)
        }
    }
}

/// A journal field as text: a string, the first of repeated ones, or the
/// bytes journald keeps as an array of numbers when they are not UTF-8.
fn field(entry: &Value, name: &str) -> Option<String> {
    match entry.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) if a.iter().all(Value::is_u64) => {
            let bytes: Vec<u8> = a
                .iter()
                .filter_map(|b| b.as_u64())
                .map(|b| b as u8)
                .collect();
            Some(String::from_utf8_lossy(&bytes).into_owned())
        }
        Value::Array(a) => a.first().and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// One journal entry as the manager prints it on a terminal: a worker's
/// line after `[app:N]`, a manager's event after `nodeherd[app]:`.
fn format_entry(entry: &Value) -> Option<String> {
    let app = printable(&field(entry, "NODEHERD_APP")?);
    let msg = printable(&field(entry, "MESSAGE").unwrap_or_default());
    let worker = entry.get("WORKER_PID").is_some()
        && field(entry, "SYSLOG_IDENTIFIER").as_deref() != Some("nodeherd");
    if worker {
        let slot = field(entry, "NODE_APP_INSTANCE")
            .map(|i| printable(&i))
            .unwrap_or_else(|| format!("pid {}", field(entry, "WORKER_PID").unwrap_or_default()));
        Some(format!("[{app}:{slot}] {msg}"))
    } else {
        Some(format!("nodeherd[{app}]: {msg}"))
    }
}

/// Does this line of a manager's stderr belong in the view?
fn wanted(line: &str, app: &str, instance: Option<u32>) -> bool {
    match instance {
        Some(i) => line.starts_with(&format!("[{app}:{i}] ")),
        None => {
            line.starts_with(&format!("[{app}:")) || line.starts_with(&format!("nodeherd[{app}]"))
        }
    }
}

/// The last lines of a manager's stderr file, then (with `-f`) the new ones.
fn file(app: &str, path: &Path, args: &LogsArgs) -> ExitCode {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("nodeherd: cannot read {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let mut text = String::new();
    // Only the tail is wanted; a long-lived file can be large.
    const TAIL: u64 = 4 << 20;
    let len = f.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(TAIL);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return ExitCode::from(1);
    }
    let mut raw = Vec::new();
    let _ = (&mut f).take(TAIL).read_to_end(&mut raw);
    text.push_str(&String::from_utf8_lossy(&raw));
    let mut pos = start + raw.len() as u64;
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| wanted(l, app, args.instance))
        .collect();
    for l in &lines[lines.len().saturating_sub(args.lines as usize)..] {
        outln!("{}", printable(l));
    }
    if !args.follow {
        return ExitCode::SUCCESS;
    }
    let mut partial = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let len = std::fs::metadata(path).map_or(0, |m| m.len());
        if len < pos {
            // Truncated, or replaced: from its start again.
            pos = 0;
            partial.clear();
        }
        if len == pos {
            continue;
        }
        if f.seek(SeekFrom::Start(pos)).is_err() {
            return ExitCode::from(1);
        }
        let mut raw = Vec::new();
        let _ = (&mut f).take(len - pos).read_to_end(&mut raw);
        pos += raw.len() as u64;
        partial.push_str(&String::from_utf8_lossy(&raw));
        while let Some(i) = partial.find('\n') {
            let line: String = partial.drain(..=i).collect();
            let line = line.trim_end_matches('\n');
            if wanted(line, app, args.instance) {
                outln!("{}", printable(line));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_is_asked_for_the_apps_entries() {
        let a = journalctl_args(&["web".into()], Some(1), 20, true);
        assert_eq!(
            a,
            [
                "--no-pager",
                "--output=json",
                "--lines=20",
                "--follow",
                "NODEHERD_APP=web",
                "NODE_APP_INSTANCE=1"
            ]
        );
        let a = journalctl_args(&["web".into(), "api".into()], None, 15, false);
        assert!(a.contains(&"NODEHERD_APP=api".to_string()));
        assert!(!a.iter().any(|x| x.starts_with("NODE_APP_INSTANCE")));
    }

    #[test]
    fn without_a_journal_or_with_files_it_says_where_to_look() {
        assert_eq!(
            journalctl_hint(&["web".into()], Some(1), 15, true),
            "`journalctl NODEHERD_APP=web NODE_APP_INSTANCE=1 -n 15 -f`"
        );
        assert_eq!(
            journalctl_hint(&["web".into(), "api".into()], None, 20, false),
            "`journalctl NODEHERD_APP=web NODEHERD_APP=api -n 20`"
        );
        let files: Vec<PathBuf> = [
            "/l/out-0.log",
            "/l/out-1.log",
            "/l/all.log",
            "/l/err-12.log",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(
            for_instance(files.clone(), Some(1)),
            [PathBuf::from("/l/out-1.log"), PathBuf::from("/l/all.log")]
        );
        assert_eq!(for_instance(files.clone(), None), files);
        assert_eq!(
            files_hint("web", &files[..2], 15, true),
            "web's workers write their lines to files (out_file, error_file, log_file), not to the \
             journal: /l/out-0.log, /l/out-1.log; `tail -n 15 -F /l/out-0.log /l/out-1.log` shows them"
        );
    }

    #[test]
    fn entries_read_as_the_manager_prints_them() {
        let worker = serde_json::json!({
            "MESSAGE": "listening", "NODEHERD_APP": "web", "SYSLOG_IDENTIFIER": "web",
            "NODE_APP_INSTANCE": "1", "WORKER_PID": "42",
        });
        assert_eq!(format_entry(&worker).unwrap(), "[web:1] listening");
        let event = serde_json::json!({
            "MESSAGE": "reload begun", "NODEHERD_APP": "web", "SYSLOG_IDENTIFIER": "nodeherd",
        });
        assert_eq!(format_entry(&event).unwrap(), "nodeherd[web]: reload begun");
        let binary = serde_json::json!({
            "MESSAGE": [104, 105, 27, 91, 50, 74], "NODEHERD_APP": "web",
            "SYSLOG_IDENTIFIER": "web", "NODE_APP_INSTANCE": "0", "WORKER_PID": "42",
        });
        assert_eq!(format_entry(&binary).unwrap(), "[web:0] hi\\x1b[2J");
        assert_eq!(format_entry(&serde_json::json!({"MESSAGE": "x"})), None);
    }
}
