//! What the manager writes to a worker's IPC channel: whole messages, in
//! order, however slowly the worker reads, and never more than a bound.
//!
//! The channel is non-blocking: the supervisor's thread must never wait on
//! a worker. A write the kernel refuses (the worker's socket buffer is
//! full: its event loop is blocked, or it reads nothing on purpose) was
//! dropped: a listen request's answer lost (the app's `listen()` waited for
//! ever), a fair share lost (measured: a worker that did not read for 6 s
//! missed 1,221 of 1,500 shares, the last among them). And a write the
//! kernel takes in part leaves half a JSON line, to which the next message
//! is glued: Node's channel parser throws in the worker.
//!
//! So each worker has an outbox. A message goes out at once when the
//! channel takes it; else it waits, in order, and a task writes what waits
//! as soon as the channel is writable. A message the kernel took in part is
//! finished before anything else is written (the kernel takes a unix
//! stream write of this size, under 16 KiB, whole or not at all; the rest
//! is never left for another message to follow). A worker that never
//! reads cannot grow the manager's memory: at most [`MAX_QUEUED`] messages
//! wait ([`MAX_FDS`] of them with a socket), a newer fair share replaces
//! the one still waiting, a metrics request is dropped (oldest first) to
//! make room, and past that a message is refused, with a journal line.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libsystemd::logging::Priority;
use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

use crate::logs;

/// Messages that may wait for one worker.
pub const MAX_QUEUED: usize = 64;
/// Of them, those carrying a socket (each holds an fd of the manager's).
pub const MAX_FDS: usize = 8;
/// Longest message written (each the manager writes is under 1 KiB).
pub const MAX_MESSAGE: usize = 16 * 1024;

/// What a message is, for what may be done with it while it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A fair share: only the latest counts, it replaces one still waiting.
    Share,
    /// A scrape's metrics request: dropped first when the outbox is full
    /// (that scrape goes without this worker's answer).
    Request,
    /// An answer the worker waits for (a listen request's socket).
    Answer,
    /// `'shutdown'`: once is enough.
    Shutdown,
}

struct Msg {
    bytes: Vec<u8>,
    fd: Option<OwnedFd>,
    kind: Kind,
}

/// The messages waiting for one worker.
#[derive(Default)]
struct Queue {
    msgs: VecDeque<Msg>,
    /// Bytes of the first message already written.
    sent: usize,
    fds: usize,
    /// The channel failed (the worker is gone).
    broken: bool,
    /// The driver let go of the worker: the task ends.
    closed: bool,
    /// Messages refused or dropped since the journal last said so.
    dropped: u64,
    said_at: Option<Instant>,
}

/// A message the outbox did not take.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// Full of what it may not drop.
    Full,
    /// The channel is gone.
    Broken,
}

impl Queue {
    /// Whether the message at `i` may be replaced or dropped: not the one
    /// the kernel has part of.
    fn movable(&self, i: usize) -> bool {
        i > 0 || self.sent == 0
    }

    fn push(&mut self, m: Msg) -> Result<(), Refused> {
        if self.broken {
            return Err(Refused::Broken);
        }
        match m.kind {
            Kind::Share => {
                if let Some(i) = self.msgs.iter().position(|q| q.kind == Kind::Share)
                    && self.movable(i)
                {
                    self.msgs[i] = m;
                    return Ok(());
                }
            }
            Kind::Shutdown if self.msgs.iter().any(|q| q.kind == Kind::Shutdown) => {
                return Ok(());
            }
            _ => {}
        }
        if m.fd.is_some() && self.fds >= MAX_FDS {
            self.dropped += 1;
            return Err(Refused::Full);
        }
        if self.msgs.len() >= MAX_QUEUED {
            let oldest_request = (0..self.msgs.len())
                .find(|&i| self.movable(i) && self.msgs[i].kind == Kind::Request);
            match oldest_request {
                Some(i) => {
                    self.msgs.remove(i);
                    self.dropped += 1;
                }
                None => {
                    self.dropped += 1;
                    return Err(Refused::Full);
                }
            }
        }
        if m.fd.is_some() {
            self.fds += 1;
        }
        self.msgs.push_back(m);
        Ok(())
    }

    /// Write what waits until the channel takes no more (`WouldBlock`) or
    /// nothing waits; a failed channel drops everything.
    fn flush(&mut self, fd: RawFd) -> std::io::Result<()> {
        while let Some(m) = self.msgs.front() {
            let rest = &m.bytes[self.sent..];
            // The socket goes with the first byte of its message.
            let fds: Vec<RawFd> =
                m.fd.as_ref()
                    .filter(|_| self.sent == 0)
                    .map(AsRawFd::as_raw_fd)
                    .into_iter()
                    .collect();
            let rights = [ControlMessage::ScmRights(&fds)];
            let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
            match sendmsg::<()>(
                fd,
                &[IoSlice::new(rest)],
                cmsgs,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            ) {
                Ok(0) => return Err(std::io::ErrorKind::WouldBlock.into()),
                Ok(n) => {
                    self.sent += n;
                    if self.sent >= m.bytes.len() {
                        self.sent = 0;
                        if let Some(done) = self.msgs.pop_front()
                            && done.fd.is_some()
                        {
                            self.fds -= 1;
                        }
                    }
                }
                Err(Errno::EAGAIN) => return Err(std::io::ErrorKind::WouldBlock.into()),
                Err(Errno::EINTR) => {}
                Err(e) => {
                    self.broken = true;
                    self.msgs.clear();
                    self.sent = 0;
                    self.fds = 0;
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }
}

struct Shared {
    queue: Mutex<Queue>,
    wake: tokio::sync::Notify,
    /// The manager's end of the channel (what a re-exec hands over).
    channel: UnixStream,
    index: u32,
    pid: i32,
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Only this thread takes it; a panic while held is a bug anyway.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The manager's end of one worker's IPC channel, for writing.
pub struct Outbox {
    shared: Arc<Shared>,
}

impl Outbox {
    /// An outbox for worker `index` (pid `pid`) writing to `channel`
    /// (non-blocking), and its task. Must run inside the runtime.
    pub fn new(channel: UnixStream, index: u32, pid: i32) -> std::io::Result<Outbox> {
        let watched = channel.try_clone()?;
        watched.set_nonblocking(true)?;
        let watched = tokio::net::UnixStream::from_std(watched)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: tokio::sync::Notify::new(),
            channel,
            index,
            pid,
        });
        tokio::spawn(write_when_writable(shared.clone(), watched));
        Ok(Outbox { shared })
    }

    /// Send `bytes` (one whole message, newline included) with `fd`
    /// attached, now or as soon as the worker reads. False when it will
    /// not be sent: the outbox is full or the channel is gone.
    pub fn send(&self, bytes: Vec<u8>, fd: Option<OwnedFd>, kind: Kind) -> bool {
        if bytes.len() > MAX_MESSAGE {
            logs::warn(&format!(
                "a message of {} bytes for worker {} was not sent: longer than the channel takes whole",
                bytes.len(),
                self.shared.index
            ));
            return false;
        }
        let mut q = self.shared.queue();
        let pushed = q.push(Msg { bytes, fd, kind });
        match pushed {
            Ok(()) => {
                match q.flush(self.shared.channel.as_raw_fd()) {
                    Ok(()) => say_read_again(&mut q, &self.shared),
                    // The rest goes when the channel is writable.
                    Err(_) if !q.broken => self.shared.wake.notify_one(),
                    Err(_) => {}
                }
                true
            }
            Err(Refused::Broken) => false,
            Err(Refused::Full) => {
                say_dropped(&mut q, &self.shared);
                false
            }
        }
    }

    /// Messages waiting for the worker to read.
    pub fn waiting(&self) -> usize {
        self.shared.queue().msgs.len()
    }
}

impl AsRawFd for Outbox {
    fn as_raw_fd(&self) -> RawFd {
        self.shared.channel.as_raw_fd()
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.shared.queue().closed = true;
        self.shared.wake.notify_one();
    }
}

/// How often, at most, the journal says a worker's outbox drops messages.
const SAY_EVERY: Duration = Duration::from_secs(10);

/// The worker read everything that waited: say what was dropped since the
/// journal last said so.
fn say_read_again(q: &mut Queue, shared: &Shared) {
    if q.dropped == 0 {
        return;
    }
    let n = std::mem::take(&mut q.dropped);
    q.said_at = None;
    let (index, pid) = (shared.index, shared.pid);
    logs::worker_event(
        Priority::Warning,
        index,
        pid,
        &format!(
            "worker {index} (pid {pid}) reads its IPC channel again; {n} more message(s) to it were dropped meanwhile"
        ),
        &[crate::logs::Milestone::IpcOutboxFull.field()],
    );
}

fn say_dropped(q: &mut Queue, shared: &Shared) {
    let now = Instant::now();
    if q.said_at
        .is_some_and(|at| now.saturating_duration_since(at) < SAY_EVERY)
    {
        return;
    }
    q.said_at = Some(now);
    let n = std::mem::take(&mut q.dropped);
    let (index, pid) = (shared.index, shared.pid);
    logs::worker_event(
        Priority::Warning,
        index,
        pid,
        &format!(
            "worker {index} (pid {pid}) does not read its IPC channel: {n} message(s) to it dropped ({} wait, at most {MAX_QUEUED})",
            q.msgs.len()
        ),
        &[crate::logs::Milestone::IpcOutboxFull.field()],
    );
}

/// Write what waits whenever the channel is writable, until the driver
/// lets go of the worker or the channel fails.
async fn write_when_writable(shared: Arc<Shared>, watched: tokio::net::UnixStream) {
    loop {
        let waiting = {
            let q = shared.queue();
            if q.closed || q.broken {
                return;
            }
            !q.msgs.is_empty()
        };
        if !waiting {
            shared.wake.notified().await;
            continue;
        }
        tokio::select! {
            ready = watched.writable() => if ready.is_err() {
                return;
            },
            // Closed, or something new: look again.
            _ = shared.wake.notified() => continue,
        }
        let written = watched.try_io(tokio::io::Interest::WRITABLE, || {
            let mut q = shared.queue();
            q.flush(watched.as_raw_fd())?;
            say_read_again(&mut q, &shared);
            Ok(())
        });
        if let Err(e) = written
            && e.kind() != std::io::ErrorKind::WouldBlock
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: Kind, text: &str) -> Msg {
        Msg {
            bytes: format!("{text}\n").into_bytes(),
            fd: None,
            kind,
        }
    }

    fn texts(q: &Queue) -> Vec<String> {
        q.msgs
            .iter()
            .map(|m| String::from_utf8_lossy(&m.bytes).trim().to_string())
            .collect()
    }

    #[test]
    fn a_newer_share_replaces_the_waiting_one_and_shutdown_waits_once() {
        let mut q = Queue::default();
        q.push(msg(Kind::Share, "s1")).unwrap();
        q.push(msg(Kind::Request, "m1")).unwrap();
        q.push(msg(Kind::Share, "s2")).unwrap();
        q.push(msg(Kind::Shutdown, "bye")).unwrap();
        q.push(msg(Kind::Shutdown, "bye")).unwrap();
        assert_eq!(texts(&q), ["s2", "m1", "bye"]);
        // The kernel has part of the first: it is not replaced.
        q.sent = 1;
        q.push(msg(Kind::Share, "s3")).unwrap();
        assert_eq!(texts(&q), ["s2", "m1", "bye", "s3"]);
    }

    #[test]
    fn a_full_outbox_drops_requests_first_then_refuses() {
        let mut q = Queue::default();
        for i in 0..MAX_QUEUED {
            let kind = if i % 2 == 0 {
                Kind::Request
            } else {
                Kind::Answer
            };
            q.push(msg(kind, &format!("{i}"))).unwrap();
        }
        q.push(msg(Kind::Answer, "late")).unwrap();
        assert_eq!(q.msgs.len(), MAX_QUEUED);
        assert_eq!(texts(&q)[0], "1", "the oldest request went");
        assert_eq!(q.dropped, 1);
        for i in 0..MAX_QUEUED / 2 - 1 {
            q.push(msg(Kind::Answer, &format!("more {i}"))).unwrap();
        }
        assert!(q.msgs.iter().all(|m| m.kind == Kind::Answer));
        assert_eq!(q.push(msg(Kind::Answer, "refused")), Err(Refused::Full));
        assert_eq!(q.push(msg(Kind::Request, "refused")), Err(Refused::Full));
        assert_eq!(q.msgs.len(), MAX_QUEUED);
    }

    #[test]
    fn sockets_waiting_are_bounded_too() {
        let mut q = Queue::default();
        let (a, _b) = UnixStream::pair().unwrap();
        for _ in 0..MAX_FDS {
            let fd = OwnedFd::from(a.try_clone().unwrap());
            q.push(Msg {
                bytes: b"x\n".to_vec(),
                fd: Some(fd),
                kind: Kind::Answer,
            })
            .unwrap();
        }
        let fd = OwnedFd::from(a.try_clone().unwrap());
        let refused = q.push(Msg {
            bytes: b"x\n".to_vec(),
            fd: Some(fd),
            kind: Kind::Answer,
        });
        assert_eq!(refused, Err(Refused::Full));
    }

    #[test]
    fn what_waits_goes_out_whole_and_in_order_once_the_worker_reads() {
        use std::io::Read;
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut q = Queue::default();
        // Fill the channel: the worker reads nothing.
        let mut n = 0u32;
        loop {
            q.push(msg(Kind::Answer, &format!("{{\"n\":{n}}}")))
                .unwrap();
            n += 1;
            if q.flush(ours.as_raw_fd()).is_err() {
                break;
            }
        }
        assert_eq!(q.msgs.len(), 1, "one waits, none lost");
        for _ in 0..10 {
            q.push(msg(Kind::Answer, &format!("{{\"n\":{n}}}")))
                .unwrap();
            n += 1;
        }
        // The worker reads again: everything arrives, each line whole.
        theirs.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        for _ in 0..10_000 {
            let _ = q.flush(ours.as_raw_fd());
            match theirs.read(&mut buf) {
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(_) if q.msgs.is_empty() => break,
                Err(_) => {}
            }
        }
        let lines: Vec<serde_json::Value> = got
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("a whole JSON line"))
            .collect();
        assert_eq!(lines.len() as u32, n);
        assert!(lines.iter().enumerate().all(|(i, v)| v["n"] == i));
    }
}
