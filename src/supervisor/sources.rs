//! Where the driver's inputs come from: signals, the workers' notify
//! socket, their IPC channels and their output. Each is a small task that
//! turns what it reads into an [`Input`] on the driver's channel (output
//! lines go straight to the log writer).
//!
//! What workers send goes through a bounded queue of its own
//! ([`WORKER_QUEUE`] inputs, [`QUEUE_BYTES`] of long lines), within a
//! budget per worker ([`super::budget`]), cleaned of what the manager does
//! not pass on: the core sees clean, bounded events, however much a
//! compromised worker sends.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::budget::{self, Bucket, FloodWatch};
use super::events::WorkerId;
use crate::ipc;
use crate::logs::{self, Stream};
use crate::notify_socket::{self, Notification};

/// Inputs from workers (IPC lines, notify datagrams) that may wait for the
/// supervisor; past this, the readers stop reading.
pub const WORKER_QUEUE: usize = 1024;

/// Bytes of IPC lines longer than [`SMALL_LINE`] that may wait for the
/// supervisor (a metrics answer may be megabytes).
pub const QUEUE_BYTES: usize = 16 << 20;

/// IPC lines up to this long wait without counting against [`QUEUE_BYTES`].
const SMALL_LINE: usize = 4096;

/// A hold on part of [`QUEUE_BYTES`], given back when the input is dropped.
pub struct Held(Option<OwnedSemaphorePermit>);

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Held({})",
            self.0.as_ref().map_or(0, |p| p.num_permits())
        )
    }
}

/// What the sources tell the driver.
#[derive(Debug)]
pub enum Input {
    /// What the accept queues show (a socket per slot): busy slots, and
    /// connections taken from them.
    Queues(crate::queue_watch::Seen),
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGHUP.
    Reload,
    Ipc {
        worker: WorkerId,
        msg: ipc::Message,
        held: Held,
    },
    /// A notify datagram; `worker_pid` is the worker its sender descends
    /// from (`None`: from no worker's tree).
    Notify {
        note: Notification,
        worker_pid: Option<i32>,
    },
    /// A worker has been over its IPC budget for [`budget::FLOOD_SECONDS`]
    /// in a row (its channel was read no faster meanwhile).
    Flooding(WorkerId),
    /// What the notify socket took from a worker's tree and did not pass
    /// on, lately.
    NotifyDropped {
        worker_pid: i32,
        statuses: u64,
        datagrams: u64,
    },
    /// The configuration, read anew for a reload.
    ConfigLoaded(Box<Result<crate::config::Loaded, crate::config::ConfigError>>),
    /// SIGUSR2: re-exec the manager in place.
    Reexec,
    /// The program a re-exec would run was checked.
    ExecChecked(Result<String, String>),
    /// The accept queues of a slot that goes are empty.
    SlotDrained(u64),
    /// A thread bound (or could not bind) an address workers asked for.
    Bound(Box<crate::shared::Bound>),
    /// A file under `watch` changed.
    FilesChanged,
    /// A worker's stack was taken and kept (see `crate::autopsy`).
    Autopsied(crate::control::Taken),
    /// A `Diagnose` capture is done: the file, or why not.
    Diagnosed {
        worker: WorkerId,
        result: Result<String, String>,
    },
}

/// Turn SIGTERM/SIGINT into `Stop`, SIGHUP into `Reload` and SIGUSR2 into
/// `Reexec`; SIGUSR1 reopens the log files.
pub fn signals(tx: mpsc::UnboundedSender<Input>) -> std::io::Result<()> {
    use nix::sys::signal::Signal;
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    // The control signals are blocked in every thread (see
    // `reexec::block_control_signals`): they wait in the kernel until read
    // here, and one that is not read yet when the manager re-execs waits
    // for the new program. No handler runs, so none can be lost with an exec.
    let fd = SignalFd::with_flags(
        &crate::reexec::control_signals(),
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )?;
    // SAFETY: the SignalFd owns its fd and hands the same one out for its
    // whole life; the AsyncFd owns the SignalFd.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)?;
    tokio::spawn(async move {
        loop {
            let Ok(mut ready) = fd.readable().await else {
                return;
            };
            // Nothing left to read is WouldBlock, which clears the readiness.
            let read = ready.try_io(|fd| match fd.get_ref().read_signal() {
                Ok(Some(info)) => Ok(info),
                Ok(None) => Err(std::io::ErrorKind::WouldBlock.into()),
                Err(e) => Err(e.into()),
            });
            let info = match read {
                Ok(Ok(info)) => info,
                Err(_would_block) => continue,
                Ok(Err(e)) => {
                    logs::warn(&format!("reading signals: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let input = match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGTERM | Signal::SIGINT) => Input::Stop,
                Ok(Signal::SIGHUP) => {
                    logs::info("SIGHUP: reload requested");
                    Input::Reload
                }
                Ok(Signal::SIGUSR2) => {
                    logs::info("SIGUSR2: re-exec requested");
                    Input::Reexec
                }
                // The log writer's business, not the supervisor's.
                Ok(Signal::SIGUSR1) => {
                    logs::reopen("SIGUSR1");
                    continue;
                }
                _ => continue,
            };
            if tx.send(input).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// Where the notify socket's datagrams go, and who the workers are.
pub struct NotifyTo {
    pub tx: mpsc::Sender<Input>,
    /// The supervisor's published state: its workers' pids.
    pub workers: tokio::sync::watch::Receiver<crate::control::Snapshot>,
}

/// Forward the workers' notify socket's datagrams, each tied to the
/// worker its sender descends from, within each worker's budget. Senders
/// that descend from no worker (an orphan the manager adopted, a stranger)
/// share one budget.
pub fn notify_socket(sock: tokio::net::UnixDatagram, to: NotifyTo) {
    let NotifyTo { tx, workers } = to;
    tokio::spawn(async move {
        let manager = std::process::id() as i32;
        let mut limits = NotifyLimits::default();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut this_turn = 0u32;
        loop {
            let got = tokio::select! {
                got = notify_socket::recv(&sock) => got,
                _ = tick.tick() => {
                    for input in limits.tick(Instant::now()) {
                        if tx.send(input).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
            };
            match got {
                Ok(Some(note)) => {
                    let worker_pid = crate::worker::process::worker_ancestor(note.pid, manager)
                        .filter(|p| workers.borrow().workers.iter().any(|w| w.pid == *p))
                        // With cgroups, only from inside the worker's own.
                        .filter(|p| crate::worker::cgroup::speaks_for(note.pid, *p));
                    if let Some(input) = limits.admit(note, worker_pid, Instant::now())
                        && tx.send(input).await.is_err()
                    {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    logs::warn(&format!("worker notify socket: {e}; ignoring"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            // A flood of datagrams is read in turns with everything else.
            this_turn += 1;
            if this_turn >= 64 {
                this_turn = 0;
                tokio::task::yield_now().await;
            }
        }
    });
}

/// The notify budget of each worker's tree (strangers share one).
#[derive(Default)]
struct NotifyLimits {
    by_worker: HashMap<i32, NotifyBudget>,
}

struct NotifyBudget {
    datagrams: Bucket,
    statuses: Bucket,
    /// Dropped since the last word about it.
    dropped_datagrams: u64,
    dropped_statuses: u64,
    /// The latest `STATUS=` not passed on, with its sender.
    latest: Option<(i32, String)>,
    last_word: Instant,
    last_seen: Instant,
}

/// How often the notify socket says what it dropped, at most.
const DROPPED_EVERY: Duration = Duration::from_secs(5);

/// Budgets kept for senders not heard from for this long are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);

impl NotifyLimits {
    /// What to pass on of `note`, if anything.
    fn admit(
        &mut self,
        mut note: Notification,
        worker_pid: Option<i32>,
        now: Instant,
    ) -> Option<Input> {
        if self.by_worker.len() > 4096 {
            // Many orphans, each its own tree: keep the busy ones.
            self.by_worker
                .retain(|_, b| now.saturating_duration_since(b.last_seen) < Duration::from_secs(1));
        }
        let b = self
            .by_worker
            .entry(worker_pid.unwrap_or(0))
            .or_insert_with(|| NotifyBudget {
                datagrams: Bucket::new(budget::NOTIFY_BURST, budget::NOTIFY_PER_SECOND, now),
                statuses: Bucket::new(budget::STATUS_BURST, budget::STATUS_PER_SECOND, now),
                dropped_datagrams: 0,
                dropped_statuses: 0,
                latest: None,
                last_word: now,
                last_seen: now,
            });
        b.last_seen = now;
        if b.datagrams.take(1, now).is_err() {
            b.dropped_datagrams += 1;
            return None;
        }
        if let Some(text) = note.status.take() {
            if b.statuses.take(1, now).is_ok() {
                note.status = Some(text);
                b.latest = None;
            } else {
                b.dropped_statuses += 1;
                b.latest = Some((note.pid, text));
            }
        }
        (note.ready || note.status.is_some()).then_some(Input::Notify { note, worker_pid })
    }

    /// Once a second: pass on the latest status held back (so that it is
    /// the one shown), and say what was dropped.
    fn tick(&mut self, now: Instant) -> Vec<Input> {
        let mut out = Vec::new();
        self.by_worker.retain(|_, b| {
            b.latest.is_some()
                || b.dropped_statuses + b.dropped_datagrams > 0
                || now.saturating_duration_since(b.last_seen) < FORGET_AFTER
        });
        for (&worker_pid, b) in self.by_worker.iter_mut() {
            if b.latest.is_some()
                && b.statuses.take(1, now).is_ok()
                && let Some((pid, status)) = b.latest.take()
            {
                out.push(Input::Notify {
                    note: Notification {
                        pid,
                        ready: false,
                        status: Some(status),
                    },
                    worker_pid: (worker_pid != 0).then_some(worker_pid),
                });
            }
            let dropped = b.dropped_statuses + b.dropped_datagrams > 0;
            if dropped && now.saturating_duration_since(b.last_word) >= DROPPED_EVERY {
                b.last_word = now;
                out.push(Input::NotifyDropped {
                    worker_pid,
                    statuses: std::mem::take(&mut b.dropped_statuses),
                    datagrams: std::mem::take(&mut b.dropped_datagrams),
                });
            }
        }
        out
    }
}

/// Forward a worker's output, line by line, to the log writer.
pub fn output(fd: OwnedFd, index: u32, pid: i32, stream: Stream) {
    let Ok(rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    tokio::spawn(async move {
        let mut lines = Lines::new(rx, OUTPUT_LINE, Overlong::Split);
        while let Some(piece) = lines.next().await {
            if let Piece::Line(line) = piece {
                let line = String::from_utf8_lossy(line).into_owned();
                logs::worker_line(index, pid, stream, line).await;
            }
        }
    });
}

/// Read what a worker says on its IPC channel, within its budget: past
/// it, the channel is not read (the worker's `process.send` waits), and a
/// worker over it for [`budget::FLOOD_SECONDS`] in a row is reported as
/// flooding. What it says waits for the supervisor in `tx`, bounded; a
/// long line also holds its length of `bytes` ([`QUEUE_BYTES`]) until the
/// supervisor has taken it.
pub fn ipc_channel(
    stream: std::os::unix::net::UnixStream,
    worker: WorkerId,
    tx: mpsc::Sender<Input>,
    bytes: Arc<Semaphore>,
) {
    let Ok(stream) = tokio::net::UnixStream::from_std(stream) else {
        return;
    };
    tokio::spawn(async move {
        let mut lines = Lines::new(stream, ipc::MAX_LINE, Overlong::Drop);
        let now = Instant::now();
        let mut bucket = Bucket::new(budget::IPC_BURST, budget::IPC_PER_SECOND, now);
        let mut watch = FloodWatch::new(now);
        let mut told = false;
        loop {
            let (msg, len) = match lines.next().await {
                None => return,
                Some(Piece::Skipped(n)) => (None, n),
                Some(Piece::Line(line)) => (ipc::parse(line), line.len()),
            };
            let cost = budget::ipc_cost(len);
            let over = match bucket.take(cost, Instant::now()) {
                Ok(()) => false,
                Err(wait) => {
                    // Not read meanwhile: the worker's sends wait in the
                    // kernel's socket buffer, then in its own memory.
                    tokio::time::sleep(wait).await;
                    let _ = bucket.take(cost, Instant::now());
                    true
                }
            };
            if watch.note(Instant::now(), over) && !told {
                told = true;
                if tx.send(Input::Flooding(worker)).await.is_err() {
                    return;
                }
            }
            let Some(msg) = msg else {
                continue;
            };
            let held = if len > SMALL_LINE {
                let n = u32::try_from(len.min(QUEUE_BYTES)).unwrap_or(u32::MAX);
                match bytes.clone().acquire_many_owned(n).await {
                    Ok(permit) => Held(Some(permit)),
                    Err(_) => return,
                }
            } else {
                Held(None)
            };
            if tx.send(Input::Ipc { worker, msg, held }).await.is_err() {
                return;
            }
        }
    });
}

/// What [`Lines::next`] read.
enum Piece<'a> {
    /// A whole line, without its newline.
    Line(&'a [u8]),
    /// This many bytes of a line longer than the cap, read and dropped.
    Skipped(usize),
}

/// What [`Lines`] does with a line longer than its cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overlong {
    /// Read it in pieces and drop it whole (a message too long to trust).
    Drop,
    /// Pass it on in pieces of the cap (a worker's output: every byte counts).
    Split,
}

/// The one reader of newline-ended lines, up to a cap, for the IPC
/// channels and the workers' output alike.
struct Lines<R> {
    r: BufReader<R>,
    line: Vec<u8>,
    max: usize,
    overlong: Overlong,
    skipping: bool,
}

impl<R: AsyncRead + Unpin> Lines<R> {
    fn new(r: R, max: usize, overlong: Overlong) -> Lines<R> {
        Lines {
            // The buffer stays small; a line may grow to `max` in `line`.
            r: BufReader::with_capacity(64 * 1024, r),
            line: Vec::new(),
            max,
            overlong,
            skipping: false,
        }
    }

    /// The next piece; `None` at the end of the stream. With
    /// [`Overlong::Split`] a last line without its newline still counts,
    /// and a `\r` before the newline is dropped.
    async fn next(&mut self) -> Option<Piece<'_>> {
        // The room a long line took is given back, not kept for good.
        if self.line.capacity() > 64 * 1024 {
            self.line = Vec::new();
        }
        self.line.clear();
        loop {
            let buf = match self.r.fill_buf().await {
                Ok([]) | Err(_) if self.overlong == Overlong::Split && !self.line.is_empty() => {
                    return Some(Piece::Line(&self.line));
                }
                Ok([]) | Err(_) => return None,
                Ok(b) => b,
            };
            if self.overlong == Overlong::Split {
                // Never let a line grow past the cap: take what still fits.
                let room = self.max - self.line.len();
                let window = &buf[..buf.len().min(room)];
                match window.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        self.line.extend_from_slice(&window[..i]);
                        self.r.consume(i + 1);
                        if self.line.last() == Some(&b'\r') {
                            self.line.pop();
                        }
                        return Some(Piece::Line(&self.line));
                    }
                    None => {
                        let n = window.len();
                        self.line.extend_from_slice(window);
                        self.r.consume(n);
                        if self.line.len() >= self.max {
                            return Some(Piece::Line(&self.line));
                        }
                        continue;
                    }
                }
            }
            let newline = buf.iter().position(|&b| b == b'\n');
            match newline {
                Some(i) if self.skipping => {
                    self.r.consume(i + 1);
                    self.skipping = false;
                    return Some(Piece::Skipped(i + 1));
                }
                Some(i) => {
                    self.line.extend_from_slice(&buf[..i]);
                    self.r.consume(i + 1);
                    return Some(Piece::Line(&self.line));
                }
                None if self.skipping => {
                    let n = buf.len();
                    self.r.consume(n);
                    return Some(Piece::Skipped(n));
                }
                None => {
                    let n = buf.len();
                    self.line.extend_from_slice(buf);
                    self.r.consume(n);
                    if self.line.len() > self.max {
                        self.skipping = true;
                        let n = self.line.len();
                        self.line = Vec::new();
                        return Some(Piece::Skipped(n));
                    }
                }
            }
        }
    }
}

/// A worker's output line longer than this is passed on in pieces.
const OUTPUT_LINE: usize = 16 * 1024;

/// Read a worker's output lines (split when longer than 16 KiB) until EOF.
#[cfg(test)]
async fn for_each_line<R: AsyncRead + Unpin>(r: R, mut f: impl FnMut(&[u8])) {
    let mut lines = Lines::new(r, OUTPUT_LINE, Overlong::Split);
    while let Some(piece) = lines.next().await {
        if let Piece::Line(line) = piece {
            f(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_split_and_capped() {
        let data: Vec<u8> = [&b"one\ntwo\r\n"[..], &vec![b'x'; 40_000], b"\ntail"].concat();
        let mut got: Vec<usize> = Vec::new();
        let mut first = Vec::new();
        for_each_line(&data[..], |l| {
            if first.len() < 2 {
                first.push(String::from_utf8_lossy(l).to_string());
            }
            got.push(l.len())
        })
        .await;
        assert_eq!(first, vec!["one", "two"]);
        assert!(got.iter().all(|&n| n <= 16 * 1024), "{got:?}");
        assert_eq!(got.iter().sum::<usize>(), 3 + 3 + 40_000 + 4);
    }

    #[tokio::test]
    async fn ipc_lines_longer_than_the_cap_are_dropped_whole() {
        let data: Vec<u8> = [
            &b"\"ready\"\n"[..],
            &vec![b'x'; 3 * ipc::MAX_LINE],
            b"\n\"ready\"\n",
        ]
        .concat();
        let mut lines = Lines::new(&data[..], ipc::MAX_LINE, Overlong::Drop);
        let mut whole = Vec::new();
        let mut skipped = 0;
        while let Some(p) = lines.next().await {
            match p {
                Piece::Line(l) => whole.push(l.to_vec()),
                Piece::Skipped(n) => skipped += n,
            }
        }
        assert_eq!(whole, vec![b"\"ready\"".to_vec(), b"\"ready\"".to_vec()]);
        assert_eq!(
            skipped,
            3 * ipc::MAX_LINE + 1,
            "every byte of it is paid for"
        );
    }

    #[tokio::test]
    async fn long_lines_waiting_for_the_supervisor_are_bounded_in_bytes() {
        use std::io::Write;
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let (tx, mut rx) = mpsc::channel(WORKER_QUEUE);
        // Room for two lines of this length, not three.
        let text = "x".repeat(3 * SMALL_LINE);
        let line = format!("{{\"nodeherd\":\"metrics\",\"id\":1,\"text\":\"{text}\"}}\n");
        let bytes = Arc::new(Semaphore::new(2 * line.len() + 10));
        ipc_channel(ours, WorkerId(1), tx, bytes.clone());
        let writer = std::thread::spawn(move || {
            for _ in 0..10 {
                theirs.write_all(line.as_bytes()).unwrap();
            }
            theirs
        });
        let queued = |rx: &mpsc::Receiver<Input>| rx.len();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(queued(&rx), 2, "two wait, the third waits for room");
        let mut got = 0;
        while got < 10 {
            let input = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("the rest follows as the supervisor takes them")
                .unwrap();
            assert!(matches!(
                input,
                Input::Ipc {
                    msg: ipc::Message::Metrics { .. },
                    ..
                }
            ));
            got += 1;
            assert!(queued(&rx) <= 2);
        }
        drop(writer.join());
    }

    fn note(pid: i32, ready: bool, status: Option<&str>) -> Notification {
        Notification {
            pid,
            ready,
            status: status.map(str::to_string),
        }
    }

    #[test]
    fn a_status_flood_yields_a_few_lines_and_a_count() {
        let t0 = Instant::now();
        let mut limits = NotifyLimits::default();
        let (mut statuses, mut readies) = (0, 0);
        let mut dropped = (0, 0);
        let mut last_status = None;
        for ms in 0..10_000u64 {
            let now = t0 + Duration::from_millis(ms);
            // A thousand datagrams a second, READY=1 in every tenth.
            let n = note(42, ms % 10 == 0, Some(&format!("flood {ms}")));
            if let Some(Input::Notify { note, worker_pid }) = limits.admit(n, Some(40), now) {
                assert_eq!(worker_pid, Some(40));
                statuses += usize::from(note.status.is_some());
                readies += usize::from(note.ready);
                last_status = note.status.or(last_status);
            }
            if ms % 1000 == 999 {
                for input in limits.tick(now) {
                    match input {
                        Input::Notify { note, .. } => {
                            statuses += 1;
                            last_status = note.status;
                        }
                        Input::NotifyDropped {
                            worker_pid,
                            statuses,
                            datagrams,
                        } => {
                            assert_eq!(worker_pid, 40);
                            dropped.0 += statuses;
                            dropped.1 += datagrams;
                        }
                        other => panic!("{other:?}"),
                    }
                }
            }
        }
        assert!(statuses <= 30, "{statuses} statuses passed on");
        assert!(dropped.0 > 0 && dropped.1 > 0, "{dropped:?}");
        assert!(readies > 0);
        // Once it is over, the latest is passed on, and the rest counted.
        for input in limits.tick(t0 + Duration::from_secs(16)) {
            match input {
                Input::Notify { note, .. } => last_status = note.status,
                Input::NotifyDropped {
                    statuses,
                    datagrams,
                    ..
                } => {
                    dropped.0 += statuses;
                    dropped.1 += datagrams;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(last_status.is_some_and(|s| s.starts_with("flood 99")));
        assert_eq!(
            statuses as u64 + dropped.0 + dropped.1,
            10_000,
            "each passed on or counted"
        );
        // Another worker's READY=1 gets through the same moment.
        let now = t0 + Duration::from_millis(9_999);
        assert!(matches!(
            limits.admit(note(77, true, None), Some(77), now),
            Some(Input::Notify { note, .. }) if note.ready
        ));
    }
}
