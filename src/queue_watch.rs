//! Busy workers, seen from their accept queues (a socket per slot); and the
//! connections steered to a worker (the steered layout).
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
//! `tcpi_unacked` is a listener's accept queue). A slot with connections
//! waiting at two looks in a row is **busy**: the driver steers new TCP connections to the other
//! slots (`PerSlot::set_busy`) until its worker has taken them. What reached
//! a busy slot before the steering, its worker serves when it can (a hung
//! one never: `max_event_loop_delay` replaces it). A slot busy for
//! [`STALLED_AFTER`] is **stalled**: it gets no new connection until its
//! worker is heard from again (its heartbeat comes as soon as its event
//! loop runs), even once clients that waited for it gave up and its queue
//! looks empty. That is `balance:
//! reuseport`; the default steered layout has no such wait at all.
//!
//! In the steered layout (one shared queue, `balance: auto`) the slots'
//! own sockets are the manager's: only connections steered to a worker
//! below its share of keep-alive connections reach them, and the thread
//! waits in `poll()` for those and takes them at once, for the driver to
//! hand each to its slot's worker over the IPC channel (the preload serves
//! it through the server's own accept path).
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
/// A slot busy this long has a worker that is hung or blocked long.
pub const STALLED_AFTER: Duration = Duration::from_millis(50);
/// How long after a busy slot was last seen the looks stay frequent.
const HOT_FOR: Duration = Duration::from_secs(5);
/// Connections taken from the steered sockets at one look, at most.
const STUCK_PER_LOOK: usize = 64;

/// A connection taken from a slot's socket (the steered layout).
#[derive(Debug)]
pub struct Stuck {
    /// The slot it was steered to.
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
    /// The slots busy for [`STALLED_AFTER`] and more: their worker is hung
    /// or blocked long (told when it changes). The driver keeps new
    /// connections away from them until their worker is heard from again
    /// (its queue may empty meanwhile: clients that waited give up).
    Stalled(BTreeSet<u32>),
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

    /// The slots that serve.
    pub fn set_serving(&self, serving: BTreeSet<u32>) {
        self.lock().serving = serving;
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
    let mut last_busy: Option<Instant> = None;
    let mut waiting_before: BTreeSet<u32> = BTreeSet::new();
    let mut busy_since: BTreeMap<u32, Instant> = BTreeMap::new();
    let mut stalled: BTreeSet<u32> = BTreeSet::new();
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
        let seen_busy = {
            let w = watched.lock().unwrap_or_else(|e| e.into_inner());
            if w.stop {
                return;
            }
            let waiting: BTreeSet<u32> = w
                .serving
                .iter()
                .copied()
                .filter(|slot| {
                    w.slots
                        .get(slot)
                        .is_some_and(|s| s.iter().any(|(_, fd)| queue_of(fd.as_raw_fd()) > 0))
                })
                .collect();
            if !waiting.is_empty() {
                last_busy = Some(now);
            }
            // Busy: connections waited at two looks in a row. A worker that
            // is about to accept one is not busy, and taking it out would
            // leave the choice to a worker that is (all busy: all picked).
            let seen: BTreeSet<u32> = waiting.intersection(&waiting_before).copied().collect();
            waiting_before = waiting;
            busy_since.retain(|slot, _| seen.contains(slot));
            for slot in &seen {
                busy_since.entry(*slot).or_insert(now);
            }
            seen
        };
        if seen_busy != busy {
            busy = seen_busy;
            if !tell(Seen::Busy(busy.clone())) {
                return;
            }
        }
        let now_stalled: BTreeSet<u32> = busy_since
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= STALLED_AFTER)
            .map(|(slot, _)| *slot)
            .collect();
        if now_stalled != stalled {
            stalled = now_stalled;
            if !stalled.is_empty() && !tell(Seen::Stalled(stalled.clone())) {
                return;
            }
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
