//! Busy and hung workers, seen from their accept queues (a socket per slot).
//!
//! With a socket per slot the kernel picks the slot of each new connection
//! whatever its worker is doing: a worker in a 40 ms handler (a report, a
//! template, a sync crypto call) gets its share of new connections, and they
//! wait behind it; a hung worker keeps getting them until a watchdog, if any,
//! decides. One shared accept queue has neither problem (only a free worker
//! calls `accept()`), but spreads keep-alive connections and CPU unevenly.
//!
//! So a thread of its own looks at every serving slot's accept queue every
//! [`LOOK_EVERY`] while a busy slot was seen in the last seconds, every
//! [`LOOK_EVERY_QUIET`] otherwise (one `getsockopt(TCP_INFO)` per socket:
//! `tcpi_unacked` is a listener's accept queue). A slot with connections waiting is **busy**:
//! the driver steers new TCP connections to the other slots
//! (`PerSlot::set_busy`). Connections that waited in a busy slot's queue for
//! [`STUCK_AFTER`] are **stuck**: the thread accepts them from the manager's
//! own copy of the socket and the driver hands each to a free worker over its
//! IPC channel, whose preload serves it through the server's own accept
//! path. The worker they were taken from is then stalled until it answers a
//! ping (the driver's part: a long handler ends, a hung worker never
//! answers). Only connections a worker had itself accepted before it got
//! stuck are its own to lose.
//!
//! A thread, not a task on the supervisor's runtime: hundreds of looks a
//! second cost an idle manager next to nothing this way, and nothing of the
//! supervisor runs for a look that changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::reuseport::queue_of;

/// How often the queues are looked at while a busy slot was seen lately:
/// often enough that a worker in a long handler gets at most a connection
/// or two more.
pub const LOOK_EVERY: Duration = Duration::from_millis(2);
/// How often otherwise: a look costs a wakeup, and an idle manager should
/// cost next to nothing (measured here, idle: 2 ms took 1.5 % of a core, 10 ms 0.7 %, 25 ms 0.3 %).
pub const LOOK_EVERY_QUIET: Duration = Duration::from_millis(25);
/// How long after a busy slot was last seen the looks stay frequent.
const HOT_FOR: Duration = Duration::from_secs(5);
/// How long connections may wait behind a busy worker before they are taken
/// from its queue and handed to a free one.
pub const STUCK_AFTER: Duration = Duration::from_millis(2);
/// Connections taken from busy queues at one look, at most.
const STUCK_PER_LOOK: usize = 64;

/// A connection taken from a busy slot's queue.
#[derive(Debug)]
pub struct Stuck {
    /// The slot it waited in.
    pub slot: u32,
    /// Its socket's place among the slot's sockets: a worker has it at fd
    /// 3 + this.
    pub place: usize,
    pub fd: OwnedFd,
}

/// What the thread tells the driver.
#[derive(Debug)]
pub enum Seen {
    /// The slots whose queue holds connections now (told when it changes).
    Busy(BTreeSet<u32>),
    /// Connections taken from busy slots, for free workers to serve.
    Stuck(Vec<Stuck>),
    /// Connections steered to a slot (the steered layout, whose slot
    /// sockets only the manager accepts from), for that slot's worker.
    Steered(Vec<Stuck>),
}

/// Each slot's TCP sockets (second handles), with their places.
type Slots = Arc<BTreeMap<u32, Vec<(usize, OwnedFd)>>>;

/// What the thread looks at, as the driver last set it.
#[derive(Default)]
struct Watched {
    slots: Slots,
    /// The slots' sockets are the manager's (the steered layout): whatever
    /// reaches them is accepted at once, for their workers.
    held: bool,
    layout: Option<u64>,
    serving: BTreeSet<u32>,
    /// Slots whose worker stalled: no free slot, not handed anything.
    stalled: BTreeSet<u32>,
    stop: bool,
}

/// The thread that looks at the queues; it ends when this is dropped.
pub struct QueueWatch {
    watched: Arc<Mutex<Watched>>,
}

impl QueueWatch {
    /// Start looking; `tell` passes what is seen on (false: nobody listens
    /// any more, the thread ends).
    pub fn start(tell: impl Fn(Seen) -> bool + Send + 'static) -> std::io::Result<QueueWatch> {
        let watched = Arc::new(Mutex::new(Watched::default()));
        let w = watched.clone();
        std::thread::Builder::new()
            .name("queue-watch".into())
            .spawn(move || run(&w, &tell))?;
        Ok(QueueWatch { watched })
    }

    /// Whether the sockets it looks at are those of `layout`.
    pub fn has_layout(&self, layout: Option<u64>) -> bool {
        self.lock().layout == layout
    }

    /// Look at these slots' sockets from now on; `held`: they are the
    /// manager's to accept from (the steered layout).
    pub fn set_sockets(
        &self,
        layout: Option<u64>,
        slots: BTreeMap<u32, Vec<(usize, OwnedFd)>>,
        held: bool,
    ) {
        let mut w = self.lock();
        w.layout = layout;
        w.slots = Arc::new(slots);
        w.held = held;
    }

    /// The slots that serve, and those whose worker stalled.
    pub fn set_slots(&self, serving: BTreeSet<u32>, stalled: BTreeSet<u32>) {
        let mut w = self.lock();
        w.serving = serving;
        w.stalled = stalled;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watched> {
        // A panic while holding it is a bug anyway; go on with the state.
        self.watched.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for QueueWatch {
    fn drop(&mut self) {
        self.lock().stop = true;
    }
}

fn run(watched: &Mutex<Watched>, tell: &dyn Fn(Seen) -> bool) {
    let mut busy = BTreeSet::new();
    let mut busy_since: BTreeMap<u32, Instant> = BTreeMap::new();
    let mut last_busy: Option<Instant> = None;
    loop {
        let (held, slots) = {
            let w = watched.lock().unwrap_or_else(|e| e.into_inner());
            if w.stop {
                return;
            }
            (w.held, w.slots.clone())
        };
        if held {
            let steered = wait_and_accept(&slots);
            if !steered.is_empty() && !tell(Seen::Steered(steered)) {
                return;
            }
            continue;
        }
        let hot = last_busy.is_some_and(|t| t.elapsed() < HOT_FOR);
        std::thread::sleep(if hot { LOOK_EVERY } else { LOOK_EVERY_QUIET });
        let now = Instant::now();
        let (seen_busy, stuck) = {
            let w = watched.lock().unwrap_or_else(|e| e.into_inner());
            if w.stop {
                return;
            }
            let seen: BTreeSet<u32> = w
                .serving
                .iter()
                .copied()
                .filter(|slot| {
                    w.slots
                        .get(slot)
                        .is_some_and(|s| s.iter().any(|(_, fd)| queue_of(fd.as_raw_fd()) > 0))
                })
                .collect();
            if !seen.is_empty() {
                last_busy = Some(now);
            }
            busy_since.retain(|slot, _| seen.contains(slot));
            for slot in &seen {
                busy_since.entry(*slot).or_insert(now);
            }
            let free = w
                .serving
                .iter()
                .any(|s| !seen.contains(s) && !w.stalled.contains(s));
            let mut stuck = Vec::new();
            if free {
                for (&slot, since) in &busy_since {
                    if now.saturating_duration_since(*since) < STUCK_AFTER {
                        continue;
                    }
                    for (place, fd) in w.slots.get(&slot).into_iter().flatten() {
                        while stuck.len() < STUCK_PER_LOOK {
                            match accept_now(fd) {
                                Some(conn) => stuck.push(Stuck {
                                    slot,
                                    place: *place,
                                    fd: conn,
                                }),
                                None => break,
                            }
                        }
                    }
                }
            }
            (seen, stuck)
        };
        if seen_busy != busy {
            busy = seen_busy;
            if !tell(Seen::Busy(busy.clone())) {
                return;
            }
        }
        if !stuck.is_empty() && !tell(Seen::Stuck(stuck)) {
            return;
        }
    }
}

/// The steered layout: wait (up to 100 ms, to see changes) until a slot's
/// socket has connections, and take them all, each for its slot's worker.
/// Only connections steered to a worker below its share come here: the
/// thread sleeps otherwise.
fn wait_and_accept(slots: &Slots) -> Vec<Stuck> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let all: Vec<(u32, usize, &OwnedFd)> = slots
        .iter()
        .flat_map(|(slot, fds)| fds.iter().map(move |(place, fd)| (*slot, *place, fd)))
        .collect();
    if all.is_empty() {
        std::thread::sleep(Duration::from_millis(100));
        return Vec::new();
    }
    let mut polls: Vec<PollFd> = all
        .iter()
        .map(|(_, _, fd)| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
        .collect();
    if poll(&mut polls, PollTimeout::from(100u16)).unwrap_or(0) <= 0 {
        return Vec::new();
    }
    let ready: Vec<bool> = polls
        .iter()
        .map(|p| p.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
        .collect();
    let mut out = Vec::new();
    for ((slot, place, fd), ready) in all.into_iter().zip(ready) {
        if !ready {
            continue;
        }
        while out.len() < STUCK_PER_LOOK {
            match accept_now(fd) {
                Some(conn) => out.push(Stuck {
                    slot,
                    place,
                    fd: conn,
                }),
                None => break,
            }
        }
    }
    out
}

/// Accept one connection waiting on a listening socket, never blocking: its
/// open file is shared with the workers, which make it non-blocking for
/// their event loops; it is made so here too before the manager accepts.
fn accept_now(listener: &OwnedFd) -> Option<OwnedFd> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(listener, FcntlArg::F_GETFL).ok()?);
    if !flags.contains(OFlag::O_NONBLOCK) {
        fcntl(listener, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).ok()?;
    }
    let fd = nix::sys::socket::accept4(
        listener.as_raw_fd(),
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .ok()?;
    // SAFETY: accept4 returned a new fd that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}
