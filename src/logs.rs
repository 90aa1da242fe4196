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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use libsystemd::logging::{Priority, journal_send};

pub mod files;
mod owner;
mod rotated;
mod stamp;

use files::{Files, Routed};
use owner::Owner;

/// Lines that may wait for the writer; beyond this, lines are dropped.
const QUEUE: usize = 8192;

/// How long the writer may take no line at all before the sink counts as
/// stalled. Until then a worker's line waits for room in a full queue (the
/// worker's pipe fills meanwhile and its writes wait, as they would on a
/// slow disk of its own: a sink that is slow but moving slows the workers
/// down and loses nothing). Once stalled (journald or a file that takes no
/// write at all), lines are dropped at once until the writer moves again.
const STALL: Duration = Duration::from_secs(1);

/// How often the writer wakes with nothing to write (date rotation).
const TICK: Duration = Duration::from_secs(1);

struct Sink {
    journal: bool,
    app: String,
    instance_var: String,
}

struct Writer {
    sink: Arc<Sink>,
    tx: SyncSender<Record>,
    dropped: Arc<AtomicU64>,
    pace: Arc<Pace>,
}

/// How the writer is getting on, for the lines waiting for room.
struct Pace {
    base: Instant,
    /// When the writer last took or wrote a line, in ms since `base`.
    moved_ms: AtomicU64,
    /// It took none for [`STALL`] while lines waited; cleared when it moves.
    stalled: AtomicBool,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            base: Instant::now(),
            moved_ms: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
        }
    }

    fn moved(&self) {
        let now = self.base.elapsed().as_millis() as u64;
        self.moved_ms.store(now, Ordering::Relaxed);
        self.stalled.store(false, Ordering::Relaxed);
    }

    fn still_for(&self) -> Duration {
        let moved = Duration::from_millis(self.moved_ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(moved)
    }
}

static WRITER: OnceLock<Writer> = OnceLock::new();

/// Lines dropped over the manager's life (the metric).
static DROPPED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Where the answer to a reopen goes.
type Answer = tokio::sync::oneshot::Sender<Result<String, String>>;

/// What the writer is asked besides lines, taken at its next turn (so a
/// full queue delays no reload and no reopen).
#[derive(Default)]
struct Control {
    files: Option<(crate::config::LogFiles, Owner)>,
    reopen: Vec<(String, Option<Answer>)>,
}

static CONTROL: Mutex<Control> = Mutex::new(Control {
    files: None,
    reopen: Vec::new(),
});

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
    /// Look at [`CONTROL`].
    Wake,
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
    let pace = Arc::new(Pace::new());
    let spawned = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn({
            let sink = sink.clone();
            let dropped = dropped.clone();
            let pace = pace.clone();
            move || write_loop(&sink, rx, &dropped, &pace)
        });
    if spawned.is_ok() {
        let _ = WRITER.set(Writer {
            sink,
            tx,
            dropped,
            pace,
        });
    }
}

/// Write worker lines to the files `app` names (PM2's `out_file`,
/// `error_file`, `log_file`), or to the journal again if it names none.
/// At start, after a re-exec, and when a reload's configuration is in force.
pub fn set_files(app: &crate::config::App) {
    let owner = Owner::of(app.credentials.as_ref());
    lock_control().files = Some((app.logs.clone(), owner));
    wake();
}

/// Close every log file and open its path again (SIGUSR1), without waiting.
pub fn reopen(by: &str) {
    lock_control().reopen.push((by.to_string(), None));
    wake();
}

/// Close every log file and open its path again, and say how that went
/// (`ReopenLogs` on the bus or the control socket).
pub async fn reopen_and_wait(by: &str) -> Result<String, String> {
    if WRITER.get().is_none() {
        return Err("the log writer is not running".into());
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    lock_control().reopen.push((by.to_string(), Some(tx)));
    wake();
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err("the log writer is gone".into()),
        Err(_) => Err("the log writer did not answer within 30 s (a hung filesystem?)".into()),
    }
}

fn lock_control() -> std::sync::MutexGuard<'static, Control> {
    CONTROL.lock().unwrap_or_else(|e| e.into_inner())
}

fn wake() {
    if let Some(w) = WRITER.get() {
        // A full queue wakes the writer anyway.
        let _ = w.tx.try_send(Record::Wake);
    }
}

/// Worker lines dropped since the manager started (past re-execs not counted).
pub fn dropped_total() -> u64 {
    DROPPED_TOTAL.load(Ordering::Relaxed)
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
            Err(TrySendError::Full(_)) => drop_one(w),
            // The writer thread is gone (it cannot panic short of a bug):
            // write here rather than lose the line.
            Err(TrySendError::Disconnected(r)) => write(&w.sink, &mut None, r),
        },
        None => write_unsinked(record),
    }
}

fn drop_one(w: &Writer) {
    w.dropped.fetch_add(1, Ordering::Relaxed);
    DROPPED_TOTAL.fetch_add(1, Ordering::Relaxed);
}

/// One line of a worker's output. When the queue is full it waits for
/// room, up to [`STALL`] (the worker's pipe fills meanwhile, so a fast
/// writer is slowed down rather than losing lines), then drops it.
pub async fn worker_line(index: u32, pid: i32, stream: Stream, line: String) {
    let mut record = Record::Worker {
        index,
        pid,
        stream,
        line,
    };
    let Some(w) = WRITER.get() else {
        return write_unsinked(record);
    };
    let mut deadline = None;
    loop {
        match w.tx.try_send(record) {
            Ok(()) => return,
            Err(TrySendError::Disconnected(r)) => return write(&w.sink, &mut None, r),
            Err(TrySendError::Full(r)) => {
                let now = Instant::now();
                let until = *deadline.get_or_insert(now + STALL);
                // Dropped only when this line has waited STALL and the
                // writer took nothing in that time either: a writer that is
                // behind but moving makes the line wait, however long.
                let stalled = w.pace.stalled.load(Ordering::Relaxed)
                    || (now >= until && w.pace.still_for() >= STALL);
                if stalled {
                    w.pace.stalled.store(true, Ordering::Relaxed);
                    return drop_one(w);
                }
                record = r;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
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
    ReloadRolledBack,
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
    HangStack,
    MemoryStack,
    StackMissed,
}

impl Milestone {
    pub fn as_str(self) -> &'static str {
        match self {
            Milestone::ConfigReloaded => "config-reloaded",
            Milestone::ReloadBegun => "reload-begun",
            Milestone::ReloadFinished => "reload-finished",
            Milestone::ReloadFailed => "reload-failed",
            Milestone::ReloadRolledBack => "reload-rolled-back",
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
            Milestone::HangStack => "hang-stack",
            Milestone::MemoryStack => "memory-stack",
            Milestone::StackMissed => "stack-missed",
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

/// Records taken in one turn before the files are flushed.
const BATCH: usize = 4096;

fn write_loop(sink: &Sink, rx: Receiver<Record>, dropped: &AtomicU64, pace: &Pace) {
    let mut files: Option<Files> = None;
    loop {
        let mut next = match rx.recv_timeout(TICK) {
            Ok(r) => Some(r),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        control(sink, &mut files);
        let mut n = 0;
        while let Some(record) = next {
            write(sink, &mut files, record);
            n += 1;
            if n % 256 == 1 {
                pace.moved();
            }
            if n == BATCH {
                break;
            }
            next = rx.try_recv().ok();
        }
        if let Some(f) = files.as_mut() {
            f.flush();
            f.tick();
        }
        if n > 0 {
            pace.moved();
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            write(
                sink,
                &mut files,
                Record::Event {
                    priority: Priority::Warning,
                    msg: format!(
                        "{lost} log line(s) dropped: the log sink (journald, stderr or the log files) did not keep up"
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
        Record::Wake => {}
    }
}

/// What [`CONTROL`] asks: files for a new configuration, reopening them.
fn control(sink: &Sink, files: &mut Option<Files>) {
    let (config, reopens) = {
        let mut c = lock_control();
        (c.files.take(), std::mem::take(&mut c.reopen))
    };
    if let Some((config, owner)) = config
        && !files.as_ref().is_some_and(|f| f.same(&config, &owner))
    {
        if let Some(f) = files.as_mut() {
            f.flush();
        }
        *files = config.any().then(|| Files::new(config, owner));
    }
    for (by, reply) in reopens {
        let result = match files.as_mut() {
            None => Ok("no log files to reopen: worker lines go to the journal".to_string()),
            Some(f) => f.reopen().map(|n| format!("{n} log file(s) reopened")),
        };
        let (priority, msg) = match &result {
            Ok(m) => (Priority::Info, format!("{by}: {m}")),
            Err(e) => (
                Priority::Warning,
                format!("{by}: reopening the log files: {e}"),
            ),
        };
        write(
            sink,
            files,
            Record::Event {
                priority,
                msg,
                fields: vec![],
            },
        );
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }
}

fn write(sink: &Sink, files: &mut Option<Files>, record: Record) {
    match record {
        Record::Worker {
            index,
            pid,
            stream,
            line,
        } => {
            if let Some(f) = files.as_mut()
                && f.line(index, stream, &line) == Routed::Written
            {
                return;
            }
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
            if let Some(f) = files.as_mut() {
                f.flush();
            }
            let _ = done.send(());
        }
        Record::Wake => {}
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
