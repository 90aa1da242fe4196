//! Where log lines go: journald with fields when running under it, else stderr.
//!
//! Under systemd, stderr is a journal stream: lines would arrive without any
//! per-worker field. So when `JOURNAL_STREAM` matches our stderr, each line
//! is sent as its own structured entry instead (`NODE_APP_INSTANCE`,
//! `WORKER_PID`, `SYSLOG_IDENTIFIER`, `PRIORITY`), and
//! `journalctl -u app NODE_APP_INSTANCE=2` shows exactly one worker. Without
//! a journal, lines go to stderr prefixed `[app:2]`, each written whole in
//! one call so that lines from different workers never interleave.
//!
//! **Never on the supervisor's thread.** Writing to journald or a pipe
//! blocks when the reader is slow or stopped. The supervisor's thread also
//! restarts workers and feeds systemd's watchdog, so a stalled journal must
//! not stall it. Once [`init`] has run, every line is handed to a writer
//! thread through a bounded queue; when the queue is full the line is
//! dropped and counted, and once the sink takes lines again the writer says
//! how many were lost.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libsystemd::logging::{Priority, journal_send};

/// Lines that may wait for the writer; beyond this, lines are dropped.
const QUEUE: usize = 8192;

struct Sink {
    journal: bool,
    app: String,
    instance_var: String,
}

struct Writer {
    sink: Arc<Sink>,
    tx: SyncSender<Record>,
    dropped: Arc<AtomicU64>,
}

static WRITER: OnceLock<Writer> = OnceLock::new();

enum Record {
    Worker {
        index: u32,
        pid: i32,
        stream: Stream,
        line: String,
    },
    Event {
        priority: Priority,
        msg: String,
        fields: Vec<(String, String)>,
    },
    Flush(mpsc::Sender<()>),
}

/// Decide the sink once and start the writer thread; before this, lines
/// go straight to stderr as `nodeherd: ...`.
pub fn init(app: &str, instance_var: &str) {
    let sink = Arc::new(Sink {
        journal: libsystemd::logging::connected_to_journal(),
        app: app.to_string(),
        // Journal field names are upper case; a lower-case instance_var
        // would be dropped silently.
        instance_var: instance_var.to_ascii_uppercase(),
    });
    let (tx, rx) = mpsc::sync_channel(QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let spawned = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn({
            let sink = sink.clone();
            let dropped = dropped.clone();
            move || write_loop(&sink, rx, &dropped)
        });
    if spawned.is_ok() {
        let _ = WRITER.set(Writer { sink, tx, dropped });
    }
}

/// Wait (up to `timeout`) until every line handed over so far is written.
pub fn flush(timeout: Duration) {
    let Some(w) = WRITER.get() else {
        return;
    };
    let (tx, rx) = mpsc::channel();
    let deadline = std::time::Instant::now() + timeout;
    let mut record = Record::Flush(tx);
    loop {
        match w.tx.try_send(record) {
            Ok(()) => break,
            Err(TrySendError::Full(r)) if std::time::Instant::now() < deadline => {
                record = r;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
}

/// Which stream of a worker a line came from.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

fn submit(record: Record) {
    match WRITER.get() {
        Some(w) => match w.tx.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                w.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The writer thread is gone (it cannot panic short of a bug):
            // write here rather than lose the line.
            Err(TrySendError::Disconnected(r)) => write(&w.sink, r),
        },
        None => write_unsinked(record),
    }
}

/// One line of a worker's output.
pub fn worker_line(index: u32, pid: i32, stream: Stream, line: &str) {
    submit(Record::Worker {
        index,
        pid,
        stream,
        line: line.to_string(),
    });
}

/// The events worth filtering the journal on, as `NODEHERD_EVENT=` names
/// them (`journalctl -u nodeherd@APP NODEHERD_EVENT=reload-failed`): one
/// name each, spelled in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Milestone {
    ConfigReloaded,
    ReloadBegun,
    ReloadFinished,
    ReloadFailed,
    ReloadRefused,
    Scale,
    ReexecRequested,
    Reexec,
    ReexecRefused,
    ReexecFailed,
    Reexecuted,
    NotifyDropped,
    IpcOutboxFull,
    LogLinesDropped,
}

impl Milestone {
    pub fn as_str(self) -> &'static str {
        match self {
            Milestone::ConfigReloaded => "config-reloaded",
            Milestone::ReloadBegun => "reload-begun",
            Milestone::ReloadFinished => "reload-finished",
            Milestone::ReloadFailed => "reload-failed",
            Milestone::ReloadRefused => "reload-refused",
            Milestone::Scale => "scale",
            Milestone::ReexecRequested => "reexec-requested",
            Milestone::Reexec => "reexec",
            Milestone::ReexecRefused => "reexec-refused",
            Milestone::ReexecFailed => "reexec-failed",
            Milestone::Reexecuted => "reexecuted",
            Milestone::NotifyDropped => "notify-dropped",
            Milestone::IpcOutboxFull => "ipc-outbox-full",
            Milestone::LogLinesDropped => "log-lines-dropped",
        }
    }

    /// The journal field that carries it.
    pub fn field(self) -> (&'static str, String) {
        ("NODEHERD_EVENT", self.as_str().to_string())
    }
}

/// A manager event, with optional structured fields (journal only).
pub fn event(priority: Priority, msg: &str, fields: &[(&str, String)]) {
    submit(Record::Event {
        priority,
        msg: msg.to_string(),
        fields: fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    });
}

/// A manager event about one worker, tagged with the same fields as that
/// worker's own lines, so `journalctl NODE_APP_INSTANCE=2` shows both.
pub fn worker_event(priority: Priority, index: u32, pid: i32, msg: &str, extra: &[(&str, String)]) {
    let var = WRITER
        .get()
        .map_or("NODE_APP_INSTANCE", |w| w.sink.instance_var.as_str());
    let mut fields = vec![(var, index.to_string()), ("WORKER_PID", pid.to_string())];
    fields.extend(extra.iter().cloned());
    event(priority, msg, &fields);
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

/// A text a worker sent (its `STATUS=`, a listen error), made fit for a
/// journal line or a D-Bus property: every control character (newlines
/// among them, so it cannot forge lines of its own), the Unicode line
/// separators and the bidirectional overrides become a space, and it is cut
/// at `max_chars` characters, `…` saying so.
pub fn clean(text: &str, max_chars: usize) -> String {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    let mut out = String::with_capacity(text.len().min(max_chars * 4));
    for (n, c) in text.chars().enumerate() {
        if n == max_chars {
            out.push('…');
            break;
        }
        out.push(if unsafe_char(c) { ' ' } else { c });
    }
    out
}

fn write_loop(sink: &Sink, rx: Receiver<Record>, dropped: &AtomicU64) {
    for record in rx {
        write(sink, record);
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            write(
                sink,
                Record::Event {
                    priority: Priority::Warning,
                    msg: format!(
                        "{lost} log line(s) dropped: the log sink (journald or stderr) did not keep up"
                    ),
                    fields: vec![(
                        "NODEHERD_EVENT".into(),
                        Milestone::LogLinesDropped.as_str().into(),
                    )],
                },
            );
        }
    }
}

fn stderr_line(line: &str) {
    let mut s = String::with_capacity(line.len() + 1);
    s.push_str(line);
    s.push('\n');
    let _ = std::io::stderr().lock().write_all(s.as_bytes());
}

/// Before `init`: plain stderr.
fn write_unsinked(record: Record) {
    match record {
        Record::Worker { index, line, .. } => stderr_line(&format!("[worker {index}] {line}")),
        Record::Event { msg, .. } => stderr_line(&format!("nodeherd: {msg}")),
        Record::Flush(done) => {
            let _ = done.send(());
        }
    }
}

fn write(sink: &Sink, record: Record) {
    match record {
        Record::Worker {
            index,
            pid,
            stream,
            line,
        } => {
            if sink.journal {
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
                if journal_send(priority, &line, fields.into_iter()).is_ok() {
                    return;
                }
            }
            stderr_line(&format!("[{}:{index}] {line}", sink.app));
        }
        Record::Event {
            priority,
            msg,
            fields,
        } => {
            if sink.journal {
                let mut all: Vec<(&str, &str)> = vec![
                    ("SYSLOG_IDENTIFIER", "nodeherd"),
                    ("NODEHERD_APP", sink.app.as_str()),
                ];
                all.extend(fields.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                if journal_send(priority, &msg, all.into_iter()).is_ok() {
                    return;
                }
            }
            stderr_line(&format!("nodeherd[{}]: {msg}", sink.app));
        }
        Record::Flush(done) => {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_texts_lose_control_characters_and_length() {
        assert_eq!(
            clean("ok\nnodeherd: forged\r\u{1b}[2J\u{202e}x\u{2028}", 100),
            "ok nodeherd: forged  [2J x "
        );
        assert_eq!(clean("abcdef", 3), "abc…");
        assert_eq!(clean("abc", 3), "abc");
        assert_eq!(clean("éé\u{7f}\u{85}", 10), "éé  ");
    }
}
