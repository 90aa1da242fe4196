//! Where log lines go: journald with fields when running under it, else stderr.
//!
//! Under systemd, stderr is a journal stream: lines would arrive without any
//! per-worker field. So when `JOURNAL_STREAM` matches our stderr, each line
//! is sent as its own structured entry instead (`NODE_APP_INSTANCE`,
//! `WORKER_PID`, `SYSLOG_IDENTIFIER`, `PRIORITY`), and
//! `journalctl -u app NODE_APP_INSTANCE=2` shows exactly one worker. Without
//! a journal, lines go to stderr prefixed `[app:2]`, each written whole in
//! one call so that lines from different workers never interleave.

use std::io::Write;
use std::sync::OnceLock;

use libsystemd::logging::{Priority, journal_send};

struct Sink {
    journal: bool,
    app: String,
    instance_var: String,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Decide the sink once; before this, lines go to stderr as `nodeherd: ...`.
pub fn init(app: &str, instance_var: &str) {
    let journal = libsystemd::logging::connected_to_journal();
    let _ = SINK.set(Sink {
        journal,
        app: app.to_string(),
        // Journal field names are upper case; a lower-case instance_var
        // would be dropped silently.
        instance_var: instance_var.to_ascii_uppercase(),
    });
}

/// Which stream of a worker a line came from.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

fn stderr_line(line: &str) {
    let mut s = String::with_capacity(line.len() + 1);
    s.push_str(line);
    s.push('\n');
    let _ = std::io::stderr().lock().write_all(s.as_bytes());
}

/// One line of a worker's output.
pub fn worker_line(index: u32, pid: i32, stream: Stream, line: &str) {
    match SINK.get() {
        Some(sink) if sink.journal => {
            let priority = match stream {
                Stream::Stdout => Priority::Info,
                Stream::Stderr => Priority::Warning,
            };
            let pid_s = pid.to_string();
            let idx = index.to_string();
            let fields = [
                (sink.instance_var.as_str(), idx.as_str()),
                ("WORKER_PID", pid_s.as_str()),
                ("OBJECT_PID", pid_s.as_str()),
                ("SYSLOG_IDENTIFIER", sink.app.as_str()),
                ("NODEHERD_APP", sink.app.as_str()),
            ];
            if journal_send(priority, line, fields.into_iter()).is_err() {
                stderr_line(&format!("[{}:{index}] {line}", sink.app));
            }
        }
        Some(sink) => stderr_line(&format!("[{}:{index}] {line}", sink.app)),
        None => stderr_line(&format!("[worker {index}] {line}")),
    }
}

/// A manager event, with optional structured fields (journal only).
pub fn event(priority: Priority, msg: &str, fields: &[(&str, String)]) {
    match SINK.get() {
        Some(sink) if sink.journal => {
            let mut all: Vec<(&str, &str)> = vec![
                ("SYSLOG_IDENTIFIER", "nodeherd"),
                ("NODEHERD_APP", sink.app.as_str()),
            ];
            all.extend(fields.iter().map(|(k, v)| (*k, v.as_str())));
            if journal_send(priority, msg, all.into_iter()).is_err() {
                stderr_line(&format!("nodeherd[{}]: {msg}", sink.app));
            }
        }
        Some(sink) => stderr_line(&format!("nodeherd[{}]: {msg}", sink.app)),
        None => stderr_line(&format!("nodeherd: {msg}")),
    }
}

/// A manager event about one worker, tagged with the same fields as that
/// worker's own lines, so `journalctl NODE_APP_INSTANCE=2` shows both.
pub fn worker_event(priority: Priority, index: u32, pid: i32, msg: &str) {
    let var = SINK
        .get()
        .map_or("NODE_APP_INSTANCE", |s| s.instance_var.as_str());
    event(
        priority,
        msg,
        &[(var, index.to_string()), ("WORKER_PID", pid.to_string())],
    );
}

pub fn info(msg: &str) {
    event(Priority::Info, msg, &[]);
}

pub fn warn(msg: &str) {
    event(Priority::Warning, msg, &[]);
}

pub fn error(msg: &str) {
    event(Priority::Error, msg, &[]);
}
