//! The supervisor: the one owner of every worker, slot and operation.
//!
//! Everything that happens arrives here as an [`Event`] on one channel —
//! a child exited (SIGCHLD), a worker reported on its IPC channel or notify
//! socket, a timer fired, a signal came in, a D-Bus call was made — and is
//! handled to completion before the next one. There is no shared mutable
//! state elsewhere: the D-Bus side reads a published [`Snapshot`].
//!
//! Vocabulary, used the same way in code, D-Bus, docs and logs:
//! - a **slot** is a position `0..instances`; its index is the worker's
//!   `NODE_APP_INSTANCE` and survives restarts and reloads;
//! - a slot's **current** worker serves; during a reload its **incoming**
//!   replacement starts beside it and takes over once **ready**;
//! - a worker that was asked to stop is **stopping** (draining) and belongs
//!   to no slot any more;
//! - an **operation** (start, reload, scale, restart) runs one at a time;
//!   requests that arrive meanwhile wait in a queue, in order, and
//!   back-to-back reloads coalesce into one.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{App, MAX_INSTANCES};
use crate::ipc;
use crate::logs::{self, Stream};
use crate::notify;
use crate::notify_socket::{self, Notification};
use crate::sockets::{self, Listener, Template};
use crate::worker::{Launcher, Spawned};
use libsystemd::logging::Priority;

/// Longest backoff between restarts of a crashing worker (as PM2).
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// A worker up this long resets the exponential backoff (as PM2).
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);
/// How often worker memory is compared with `max_memory_restart`.
const MEMORY_CHECK_EVERY: Duration = Duration::from_secs(5);

/// Identifies one worker process for its whole life; never reused, so a
/// timer or message about a worker that is gone is recognised and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(u64);

/// Errors a control request can end with; each maps to a D-Bus error name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CtlError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    ReloadFailed(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Stopping(String),
    #[error("{0}")]
    Failed(String),
}

/// Where a control request's answer goes.
pub type Reply = oneshot::Sender<Result<i32, CtlError>>;

/// What `Scale` asks for.
#[derive(Debug, Clone, Copy)]
pub enum ScaleTarget {
    To(i64),
    By(i64),
}

/// A control request (D-Bus, SIGHUP, or the supervisor itself).
#[derive(Debug)]
pub enum Request {
    Reload(Option<Reply>),
    Restart(Option<Reply>),
    Scale(ScaleTarget, Option<Reply>),
    /// Replace these slots through the reload path (memory limit).
    ReloadSlots(Vec<u32>),
}

/// Everything the supervisor reacts to.
#[derive(Debug)]
pub enum Event {
    Exited {
        pid: i32,
        how: String,
    },
    Ipc {
        id: WorkerId,
        msg: ipc::Message,
    },
    Notify(Notification),
    Timer(Timer),
    /// SIGTERM or SIGINT.
    Stop,
    Request(Request),
}

#[derive(Debug)]
pub enum Timer {
    ReadyDeadline(WorkerId),
    KillDeadline(WorkerId),
    Restart { index: u32, generation: u64 },
    Watchdog(Duration),
    MemoryCheck,
}

/// Signals for the D-Bus side.
#[derive(Debug, Clone)]
pub enum BusSignal {
    WorkerStateChanged {
        instance: u32,
        pid: u32,
        state: &'static str,
    },
    ReloadFinished {
        ok: bool,
        message: String,
    },
}

/// What the outside world may read, published after every event.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub name: String,
    pub state: &'static str,
    pub instances: u32,
    pub ready_workers: u32,
    pub status: String,
    pub workers: Vec<WorkerInfo>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    pub instance: u32,
    /// 0 when the slot has no process (waiting to restart, or errored).
    pub pid: i32,
    pub state: &'static str,
    pub restarts: u32,
    pub started: Option<Instant>,
    pub started_wall: Option<SystemTime>,
}

/// What a new worker is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The slot's serving worker (first start, restart after a crash, scale up).
    Current,
    /// A reload's replacement, started beside the current worker.
    Incoming,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WState {
    Starting,
    Ready,
    Stopping,
}

impl WState {
    fn name(self) -> &'static str {
        match self {
            WState::Starting => "starting",
            WState::Ready => "ready",
            WState::Stopping => "stopping",
        }
    }
}

struct Worker {
    index: u32,
    pid: i32,
    state: WState,
    started: Instant,
    started_wall: SystemTime,
    /// Our end of the Node IPC channel, for the `'shutdown'` message.
    ipc: Option<std::os::unix::net::UnixStream>,
    /// Why it was killed before being ready, for the exit message.
    killed_because: Option<String>,
    /// What the shim said when a listen could not be mapped.
    listen_error: Option<String>,
}

#[derive(Default)]
struct Slot {
    current: Option<WorkerId>,
    incoming: Option<WorkerId>,
    restarts: u32,
    unstable: u32,
    backoff: Duration,
    /// Bumped to cancel a pending restart timer.
    generation: u64,
    waiting: bool,
    errored: Option<String>,
}

enum Op {
    /// Waiting for these slots' first worker to be ready (first start, scale up, restart).
    Start {
        /// Slots whose first worker has neither become ready nor failed yet.
        waiting: BTreeSet<u32>,
        /// Slots whose first worker failed (they restart as usual).
        failed: Vec<String>,
        replies: Vec<Reply>,
        what: &'static str,
    },
    /// The rolling swap.
    Reload {
        pending: VecDeque<u32>,
        in_flight: BTreeSet<u32>,
        total: usize,
        done: usize,
        replies: Vec<Reply>,
        started: Instant,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Stopping,
}

/// Handles for the outside: how to send events, how to read the state.
#[derive(Clone)]
pub struct Handle {
    pub events: mpsc::UnboundedSender<Event>,
    pub snapshot: watch::Receiver<Snapshot>,
}

/// `balance: reuseport`: each slot's own sockets, and what to bind for a new slot.
struct PerSlot {
    sockets: Vec<Vec<Listener>>,
    templates: Vec<Template>,
}

pub struct Supervisor {
    app: App,
    launcher: Launcher,
    /// The shared sockets (`balance: queue`); empty with `balance: reuseport`.
    listeners: Vec<Listener>,
    per_slot: Option<PerSlot>,
    slots: Vec<Slot>,
    workers: BTreeMap<WorkerId, Worker>,
    by_pid: HashMap<i32, WorkerId>,
    next_id: u64,
    phase: Phase,
    op: Option<Op>,
    queue: VecDeque<Request>,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    published: watch::Sender<Snapshot>,
    bus: Option<mpsc::UnboundedSender<BusSignal>>,
    ready_sent: bool,
    last_status: String,
    exit_code: i32,
    last_stranger_warning: Option<Instant>,
}

impl Supervisor {
    pub fn new(app: App, launcher: Launcher, listeners: Vec<Listener>) -> Supervisor {
        let (tx, rx) = mpsc::unbounded_channel();
        let initial = Snapshot {
            name: app.name.clone(),
            state: "starting",
            instances: app.instances,
            ready_workers: 0,
            status: "starting".into(),
            workers: Vec::new(),
        };
        let (published, _) = watch::channel(initial);
        let (listeners, per_slot) = if app.balance == crate::config::Balance::ReusePort {
            // The sockets bound at start become slot 0's.
            let templates = listeners.iter().map(Template::from).collect();
            (
                Vec::new(),
                Some(PerSlot {
                    sockets: vec![listeners],
                    templates,
                }),
            )
        } else {
            (listeners, None)
        };
        Supervisor {
            app,
            launcher,
            listeners,
            per_slot,
            slots: Vec::new(),
            workers: BTreeMap::new(),
            by_pid: HashMap::new(),
            next_id: 1,
            phase: Phase::Running,
            op: None,
            queue: VecDeque::new(),
            tx,
            rx,
            published,
            bus: None,
            ready_sent: false,
            last_status: String::new(),
            exit_code: 0,
            last_stranger_warning: None,
        }
    }

    pub fn handle(&self) -> Handle {
        Handle {
            events: self.tx.clone(),
            snapshot: self.published.subscribe(),
        }
    }

    /// Where to send D-Bus signals, once the bus is up.
    pub fn set_bus(&mut self, bus: mpsc::UnboundedSender<BusSignal>) {
        self.bus = Some(bus);
    }

    /// Run until every worker is gone after a stop; returns the exit status.
    pub async fn run(mut self) -> i32 {
        if let Some(interval) = notify::watchdog_interval() {
            self.after(interval / 2, Timer::Watchdog(interval / 2));
        }
        if self.app.max_memory_restart.is_some() {
            self.after(MEMORY_CHECK_EVERY, Timer::MemoryCheck);
        }
        logs::info(&format!(
            "starting {} worker(s): {}",
            self.app.instances,
            self.launcher.command_line()
        ));
        let n = self.app.instances;
        self.slots = (0..n).map(|_| Slot::default()).collect();
        for index in 0..n {
            self.start_current(index);
        }
        self.op = Some(Op::Start {
            failed: Vec::new(),
            waiting: (0..n).collect(),
            replies: Vec::new(),
            what: "start",
        });
        self.progress();
        self.publish();
        while let Some(ev) = self.rx.recv().await {
            self.on_event(ev);
            self.progress();
            self.publish();
            if self.phase == Phase::Stopping && self.workers.is_empty() {
                break;
            }
        }
        self.exit_code
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Exited { pid, how } => self.on_exit(pid, how),
            Event::Ipc { id, msg } => match msg {
                ipc::Message::Ready => self.mark_ready(id, "sent 'ready'"),
                ipc::Message::Listening if !self.app.wait_ready => self.mark_ready(id, "listening"),
                ipc::Message::Listening => {}
                ipc::Message::ListenError(e) => {
                    if let Some(w) = self.workers.get_mut(&id) {
                        w.listen_error = Some(e);
                    }
                }
            },
            Event::Notify(n) => self.on_notify(n),
            Event::Timer(t) => self.on_timer(t),
            Event::Stop => self.begin_stop(0),
            Event::Request(r) => self.submit(r),
        }
    }

    // ---- workers ------------------------------------------------------------

    fn after(&self, d: Duration, t: Timer) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            let _ = tx.send(Event::Timer(t));
        });
    }

    /// Start a worker for slot `index`, as its current worker or (during a
    /// reload) its incoming replacement; `None` if the fork/exec failed.
    fn spawn(&mut self, index: u32, role: Role) -> Option<WorkerId> {
        if let Err(e) = self.ensure_slot_sockets(index) {
            logs::error(&format!("worker {index}: {e:#}"));
            return None;
        }
        let spawned = match self.launcher.spawn(index, self.listeners_for(index)) {
            Ok(s) => s,
            Err(e) => {
                logs::error(&format!("worker {index}: {e:#}"));
                return None;
            }
        };
        let Spawned {
            pid,
            ipc,
            stdout,
            stderr,
        } = spawned;
        let id = WorkerId(self.next_id);
        self.next_id += 1;
        read_lines(stdout, index, pid, Stream::Stdout);
        read_lines(stderr, index, pid, Stream::Stderr);
        let ipc = ipc.and_then(|s| {
            let reader = s.try_clone().ok()?;
            reader.set_nonblocking(true).ok()?;
            s.set_nonblocking(true).ok()?;
            read_ipc(reader, id, self.tx.clone());
            Some(s)
        });
        self.workers.insert(
            id,
            Worker {
                index,
                pid,
                state: WState::Starting,
                started: Instant::now(),
                started_wall: SystemTime::now(),
                ipc,
                killed_because: None,
                listen_error: None,
            },
        );
        self.by_pid.insert(pid, id);
        logs::worker_event(
            Priority::Info,
            index,
            pid,
            &format!("worker {index} started (pid {pid})"),
        );
        self.signal_worker(index, pid, "starting");
        let slot = &mut self.slots[index as usize];
        match role {
            Role::Current => slot.current = Some(id),
            Role::Incoming => slot.incoming = Some(id),
        }
        // A worker with no way to report readiness is ready once started.
        let can_report = !self.listeners_for(index).is_empty() || self.app.wait_ready;
        let node = matches!(self.app.interpreter, crate::config::Interpreter::Node(_));
        if !can_report || (!node && !self.app.wait_ready) {
            self.mark_ready(id, "started");
        } else {
            self.after(self.app.listen_timeout, Timer::ReadyDeadline(id));
        }
        Some(id)
    }

    /// The sockets a worker of slot `index` inherits.
    fn listeners_for(&self, index: u32) -> &[Listener] {
        match &self.per_slot {
            None => &self.listeners,
            Some(p) => p.sockets.get(index as usize).map_or(&[], Vec::as_slice),
        }
    }

    /// With `balance: reuseport`, bind the slot's own sockets if it has none.
    fn ensure_slot_sockets(&mut self, index: u32) -> anyhow::Result<()> {
        let Some(p) = &mut self.per_slot else {
            return Ok(());
        };
        let i = index as usize;
        if p.sockets.len() <= i {
            p.sockets.resize_with(i + 1, Vec::new);
        }
        if p.sockets[i].is_empty() {
            p.sockets[i] = p
                .templates
                .iter()
                .map(sockets::bind_sibling)
                .collect::<anyhow::Result<_>>()?;
        }
        Ok(())
    }

    /// With `balance: reuseport`, close a slot's sockets (errored or removed),
    /// so the kernel stops sending connections where no worker accepts.
    fn release_slot_sockets(&mut self, index: u32) {
        if let Some(p) = &mut self.per_slot
            && let Some(s) = p.sockets.get_mut(index as usize)
        {
            s.clear();
        }
    }

    /// Start the serving worker of a slot (first start, crash restart, scale up).
    fn start_current(&mut self, index: u32) {
        let slot = &mut self.slots[index as usize];
        slot.waiting = false;
        slot.generation += 1;
        if let Some(old) = self.slots[index as usize].current.take() {
            // Callers only start an empty slot; should one not be, its worker goes.
            self.stop_worker(old, "slot restarted");
        }
        if self.spawn(index, Role::Current).is_none() {
            self.after_crash(index, Duration::ZERO, "could not be started".into());
        }
    }

    fn mark_ready(&mut self, id: WorkerId, why: &str) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.state != WState::Starting {
            return;
        }
        w.state = WState::Ready;
        let (index, pid) = (w.index, w.pid);
        let took = w.started.elapsed();
        logs::worker_event(
            Priority::Info,
            index,
            pid,
            &format!(
                "worker {index} ready (pid {pid}, {why}, {} ms)",
                took.as_millis()
            ),
        );
        self.signal_worker(index, pid, "ready");
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        if slot.incoming == Some(id) {
            // The swap: the replacement serves, then the old one drains.
            slot.incoming = None;
            let old = slot.current.replace(id);
            slot.errored = None;
            slot.waiting = false;
            slot.generation += 1;
            if let Some(old) = old {
                self.stop_worker(old, "replaced");
            }
            if let Some(Op::Reload {
                in_flight, done, ..
            }) = &mut self.op
            {
                in_flight.remove(&index);
                *done += 1;
            }
        } else if slot.current == Some(id) {
            slot.errored = None;
        }
    }

    fn on_notify(&mut self, n: Notification) {
        // The sender must be a worker or live in a worker's process group.
        let id = self.by_pid.get(&n.pid).copied().or_else(|| {
            let group = notify_socket::process_group(n.pid)?;
            self.by_pid.get(&group).copied()
        });
        let Some(id) = id else {
            // Said at most once a second, so a flood cannot flood the journal too.
            let now = Instant::now();
            if self
                .last_stranger_warning
                .is_none_or(|t| now - t >= Duration::from_secs(1))
            {
                self.last_stranger_warning = Some(now);
                logs::warn(&format!(
                    "ignored a notify message from pid {}, which is not one of our workers",
                    n.pid
                ));
            }
            return;
        };
        if n.ready {
            self.mark_ready(id, "READY=1");
        }
    }

    /// Ask a worker to stop: SIGINT or the `'shutdown'` message, then SIGKILL after `kill_timeout`.
    fn stop_worker(&mut self, id: WorkerId, why: &str) {
        let kill_timeout = self.app.kill_timeout;
        let by_message = self.app.shutdown_with_message;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.state == WState::Stopping {
            return;
        }
        w.state = WState::Stopping;
        let (index, pid) = (w.index, w.pid);
        let mut sent = false;
        if by_message && let Some(ch) = &mut w.ipc {
            sent = std::io::Write::write_all(ch, ipc::SHUTDOWN).is_ok();
        }
        if !sent {
            signal(pid, libc::SIGINT);
        }
        logs::info(&format!(
            "worker {index} stopping (pid {pid}, {why}; {})",
            if sent {
                "sent 'shutdown'"
            } else {
                "sent SIGINT"
            }
        ));
        self.signal_worker(index, pid, "stopping");
        self.after(kill_timeout, Timer::KillDeadline(id));
    }

    /// Kill a worker and its process group now.
    fn kill_worker(&mut self, id: WorkerId, because: &str) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.killed_because.get_or_insert_with(|| because.to_string());
            signal(-w.pid, libc::SIGKILL);
            signal(w.pid, libc::SIGKILL);
        }
    }

    fn on_exit(&mut self, pid: i32, how: String) {
        let Some(id) = self.by_pid.remove(&pid) else {
            // A grandchild reparented to us (we are a subreaper): reaped, nothing else.
            return;
        };
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        // Anything the worker left in its process group goes with it.
        signal(-pid, libc::SIGKILL);
        let index = w.index;
        let uptime = w.started.elapsed();
        let cause = match (&w.killed_because, &w.listen_error) {
            (Some(k), _) => format!("{k}; {how}"),
            (None, Some(e)) => format!("{how}: {e}"),
            (None, None) => how.clone(),
        };
        self.signal_worker(index, pid as u32 as i32, "exited");
        if w.state == WState::Stopping {
            logs::worker_event(
                Priority::Info,
                index,
                pid,
                &format!("worker {index} stopped (pid {pid}, {how})"),
            );
            return;
        }
        logs::worker_event(
            Priority::Warning,
            index,
            pid,
            &format!(
                "worker {index} exited unexpectedly (pid {pid}, {cause}, up {} ms)",
                uptime.as_millis()
            ),
        );
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        if slot.incoming == Some(id) {
            slot.incoming = None;
            let reason =
                format!("slot {index}: the new worker (pid {pid}) {cause} before it was ready");
            self.fail_reload(reason);
            return;
        }
        if slot.current != Some(id) {
            return;
        }
        slot.current = None;
        if self.phase == Phase::Stopping {
            return;
        }
        if slot.incoming.is_some() {
            // A reload is already bringing this slot's replacement up.
            return;
        }
        self.after_crash(index, uptime, cause);
    }

    /// Decide what happens to a slot whose worker died: restart (now or later) or errored.
    fn after_crash(&mut self, index: u32, uptime: Duration, cause: String) {
        // A first start, scale or restart stops waiting for this slot: it
        // settles as failed, so the operation (and READY=1) never hangs on a
        // slot that crash-loops below max_restarts.
        if let Some(Op::Start {
            waiting, failed, ..
        }) = &mut self.op
            && waiting.remove(&index)
        {
            failed.push(format!("slot {index}: {cause}"));
        }
        let app = &self.app;
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        if self.phase == Phase::Stopping {
            return;
        }
        if !app.autorestart {
            slot.errored = Some(format!("{cause}; autorestart is off"));
            self.report_errored(index);
            return;
        }
        if uptime >= app.min_uptime {
            slot.unstable = 0;
        } else {
            slot.unstable += 1;
        }
        if slot.unstable > app.max_restarts {
            slot.errored = Some(format!(
                "{cause}; it died {} times in a row within min_uptime ({} ms), more than max_restarts ({})",
                slot.unstable,
                app.min_uptime.as_millis(),
                app.max_restarts
            ));
            self.report_errored(index);
            return;
        }
        let delay = if app.exp_backoff_restart_delay.is_zero() {
            app.restart_delay
        } else {
            slot.backoff = if uptime >= BACKOFF_RESET_AFTER || slot.backoff.is_zero() {
                app.exp_backoff_restart_delay
            } else {
                slot.backoff.mul_f64(1.5).min(MAX_BACKOFF)
            };
            slot.backoff
        };
        slot.restarts += 1;
        if delay.is_zero() {
            self.start_current(index);
        } else {
            slot.waiting = true;
            slot.generation += 1;
            let generation = slot.generation;
            logs::info(&format!(
                "worker {index} restarts in {} ms",
                delay.as_millis()
            ));
            self.after(delay, Timer::Restart { index, generation });
        }
    }

    fn report_errored(&mut self, index: u32) {
        let reason = self.slots[index as usize]
            .errored
            .clone()
            .unwrap_or_default();
        logs::error(&format!(
            "slot {index} errored, not restarting it: {reason}"
        ));
        self.release_slot_sockets(index);
        self.signal_worker(index, 0, "errored");
        if self.slots.iter().all(|s| s.errored.is_some()) && self.phase == Phase::Running {
            logs::error("every slot errored: nothing is serving; stopping");
            self.begin_stop(1);
        }
    }

    fn on_timer(&mut self, t: Timer) {
        match t {
            Timer::ReadyDeadline(id) => {
                let Some(w) = self.workers.get(&id) else {
                    return;
                };
                if w.state != WState::Starting {
                    return;
                }
                let index = w.index;
                let why = format!(
                    "not ready within listen_timeout ({} ms{})",
                    self.app.listen_timeout.as_millis(),
                    if self.app.wait_ready {
                        ", waiting for 'ready' or READY=1"
                    } else {
                        ", waiting for it to listen"
                    }
                );
                let is_incoming = self
                    .slots
                    .get(index as usize)
                    .is_some_and(|s| s.incoming == Some(id));
                self.kill_worker(id, &why);
                if is_incoming {
                    // Fail closed at once; the exit itself is then just reaped.
                    if let Some(w) = self.workers.get_mut(&id) {
                        w.state = WState::Stopping;
                    }
                    self.slots[index as usize].incoming = None;
                    self.fail_reload(format!("slot {index}: the new worker was {why}"));
                }
            }
            Timer::KillDeadline(id) => {
                if self
                    .workers
                    .get(&id)
                    .is_some_and(|w| w.state == WState::Stopping)
                {
                    let kt = self.app.kill_timeout.as_millis();
                    if let Some(w) = self.workers.get(&id) {
                        logs::warn(&format!(
                            "worker {} (pid {}) did not stop within kill_timeout ({kt} ms): SIGKILL",
                            w.index, w.pid
                        ));
                    }
                    self.kill_worker(id, "killed after kill_timeout");
                }
            }
            Timer::Restart { index, generation } => {
                let due = self.slots.get(index as usize).is_some_and(|s| {
                    s.generation == generation && s.waiting && s.current.is_none()
                });
                if due && self.phase == Phase::Running {
                    self.start_current(index);
                }
            }
            Timer::Watchdog(every) => {
                notify::watchdog();
                self.after(every, Timer::Watchdog(every));
            }
            Timer::MemoryCheck => {
                self.check_memory();
                self.after(MEMORY_CHECK_EVERY, Timer::MemoryCheck);
            }
        }
    }

    fn check_memory(&mut self) {
        let Some(limit) = self.app.max_memory_restart else {
            return;
        };
        if self.phase != Phase::Running || self.op.is_some() {
            return;
        }
        let over: Vec<u32> = self
            .slots
            .iter()
            .filter_map(|s| s.current)
            .filter_map(|id| self.workers.get(&id))
            .filter(|w| w.state == WState::Ready && crate::worker::rss_bytes(w.pid) > limit)
            .map(|w| w.index)
            .collect();
        if !over.is_empty() {
            logs::warn(&format!(
                "worker(s) {over:?} use more than max_memory_restart ({} MiB): replacing them without downtime",
                limit >> 20
            ));
            self.queue.push_back(Request::ReloadSlots(over));
        }
    }

    // ---- operations ---------------------------------------------------------

    fn submit(&mut self, req: Request) {
        if self.phase == Phase::Stopping {
            reply_to(
                req,
                Err(CtlError::Stopping("the manager is stopping".into())),
            );
            return;
        }
        // Reject bad arguments at once, before queueing.
        if let Request::Scale(ScaleTarget::To(n), _) = &req
            && !(1..=i64::from(MAX_INSTANCES)).contains(n)
        {
            let msg = format!(
                "cannot scale to {n}: the number of workers must be between 1 and {MAX_INSTANCES}"
            );
            reply_to(req, Err(CtlError::InvalidArgument(msg)));
            return;
        }
        // Back-to-back reloads coalesce: the queued one serves every caller.
        if let Request::Reload(new_reply) = req {
            if let Some(Request::Reload(queued)) = self.queue.back_mut() {
                if let Some(r) = new_reply {
                    merge_reply(queued, r);
                }
                return;
            }
            self.queue.push_back(Request::Reload(new_reply));
            return;
        }
        self.queue.push_back(req);
    }

    /// Move operations forward: finish the current one if it is done, then
    /// start queued requests until one needs to wait.
    fn progress(&mut self) {
        loop {
            self.pump_reload();
            self.finish_if_done();
            if self.op.is_some() || self.phase != Phase::Running {
                return;
            }
            let Some(req) = self.queue.pop_front() else {
                return;
            };
            self.begin(req);
        }
    }

    fn begin(&mut self, req: Request) {
        match req {
            Request::Reload(reply) => {
                let all: Vec<u32> = (0..self.slots.len() as u32).collect();
                self.begin_reload(all, reply.into_iter().collect());
            }
            Request::ReloadSlots(slots) => {
                let slots: Vec<u32> = slots
                    .into_iter()
                    .filter(|i| (*i as usize) < self.slots.len())
                    .collect();
                if !slots.is_empty() {
                    self.begin_reload(slots, Vec::new());
                }
            }
            Request::Restart(reply) => self.begin_restart(reply),
            Request::Scale(target, reply) => self.begin_scale(target, reply),
        }
    }

    fn begin_reload(&mut self, slots: Vec<u32>, replies: Vec<Reply>) {
        let total = slots.len();
        logs::event(
            Priority::Notice,
            &format!(
                "reload begun: {total} worker(s), {} at a time",
                self.app.reload_parallel
            ),
            &[("NODEHERD_EVENT", "reload-begun".into())],
        );
        notify::reloading(&format!("reloading 0/{total}"));
        self.op = Some(Op::Reload {
            pending: slots.into_iter().collect(),
            in_flight: BTreeSet::new(),
            total,
            done: 0,
            replies,
            started: Instant::now(),
        });
    }

    /// Start replacements while fewer than `reload_parallel` are in flight.
    fn pump_reload(&mut self) {
        loop {
            let parallel = self.app.reload_parallel as usize;
            let Some(Op::Reload {
                pending, in_flight, ..
            }) = &mut self.op
            else {
                return;
            };
            if in_flight.len() >= parallel {
                return;
            }
            let Some(index) = pending.pop_front() else {
                return;
            };
            if index as usize >= self.slots.len() {
                continue;
            }
            in_flight.insert(index);
            // Each swap may take listen_timeout plus kill_timeout: tell systemd.
            notify::extend_timeout(
                self.app.listen_timeout + self.app.kill_timeout + Duration::from_secs(5),
            );
            if self.spawn(index, Role::Incoming).is_none() {
                self.fail_reload(format!("slot {index}: the new worker could not be started"));
                return;
            }
        }
    }

    fn fail_reload(&mut self, reason: String) {
        let Some(Op::Reload {
            in_flight, replies, ..
        }) = self.op.take()
        else {
            // A replacement outside a reload cannot exist; nothing to fail.
            return;
        };
        // Every other replacement still starting goes too; old workers stay.
        for index in in_flight {
            if let Some(slot) = self.slots.get_mut(index as usize)
                && let Some(id) = slot.incoming.take()
            {
                self.kill_worker(id, "reload failed elsewhere");
                if let Some(w) = self.workers.get_mut(&id) {
                    w.state = WState::Stopping;
                }
            }
        }
        let msg = format!("reload failed: {reason}; the previous workers keep serving");
        logs::event(
            Priority::Error,
            &msg,
            &[("NODEHERD_EVENT", "reload-failed".into())],
        );
        self.bus_signal(BusSignal::ReloadFinished {
            ok: false,
            message: msg.clone(),
        });
        self.last_status.clear();
        notify::ready(&self.status_line());
        for r in replies {
            let _ = r.send(Err(CtlError::ReloadFailed(msg.clone())));
        }
    }

    fn begin_restart(&mut self, reply: Option<Reply>) {
        logs::info("restart: stopping every worker and starting a fresh set");
        let ids: Vec<WorkerId> = self
            .slots
            .iter_mut()
            .flat_map(|s| [s.current.take(), s.incoming.take()])
            .flatten()
            .collect();
        for id in ids {
            self.stop_worker(id, "restart");
        }
        let n = self.slots.len() as u32;
        for index in 0..n {
            let slot = &mut self.slots[index as usize];
            slot.unstable = 0;
            slot.backoff = Duration::ZERO;
            slot.errored = None;
            self.start_current(index);
        }
        self.op = Some(Op::Start {
            failed: Vec::new(),
            waiting: (0..n).collect(),
            replies: reply.into_iter().collect(),
            what: "restart",
        });
    }

    fn begin_scale(&mut self, target: ScaleTarget, reply: Option<Reply>) {
        let have = self.slots.len() as i64;
        let want = match target {
            ScaleTarget::To(n) => n,
            ScaleTarget::By(d) => have.saturating_add(d),
        };
        if !(1..=i64::from(MAX_INSTANCES)).contains(&want) {
            let msg = format!(
                "cannot scale from {have} to {want}: the number of workers must be between 1 and {MAX_INSTANCES}"
            );
            if let Some(r) = reply {
                let _ = r.send(Err(CtlError::InvalidArgument(msg)));
            }
            return;
        }
        let want = want as u32;
        let have = have as u32;
        logs::event(
            Priority::Notice,
            &format!("scale: {have} → {want} workers"),
            &[("NODEHERD_EVENT", "scale".into())],
        );
        if want <= have {
            // Highest slots go first; their workers drain, requests in flight finish.
            while self.slots.len() as u32 > want {
                let slot = self.slots.pop().expect("len > want >= 1");
                self.release_slot_sockets(self.slots.len() as u32);
                for id in [slot.current, slot.incoming].into_iter().flatten() {
                    self.stop_worker(id, "scaled down");
                }
            }
            if let Some(r) = reply {
                let _ = r.send(Ok(want as i32));
            }
            return;
        }
        for index in have..want {
            self.slots.push(Slot::default());
            self.start_current(index);
        }
        self.op = Some(Op::Start {
            failed: Vec::new(),
            waiting: (have..want).collect(),
            replies: reply.into_iter().collect(),
            what: "scale",
        });
    }

    fn finish_if_done(&mut self) {
        let done = match &self.op {
            None => return,
            Some(Op::Start { waiting, .. }) => waiting.iter().all(|&i| {
                self.slots.get(i as usize).is_none_or(|s| {
                    s.errored.is_some()
                        || s.current
                            .and_then(|id| self.workers.get(&id))
                            .is_some_and(|w| w.state == WState::Ready)
                })
            }),
            Some(Op::Reload {
                pending, in_flight, ..
            }) => pending.is_empty() && in_flight.is_empty(),
        };
        if !done {
            return;
        }
        match self.op.take() {
            Some(Op::Start {
                failed: errored,
                replies,
                what,
                ..
            }) => {
                let n = self.slots.len() as i32;
                if what == "start" && !self.ready_sent {
                    self.ready_sent = true;
                    self.last_status.clear();
                    notify::ready(&self.status_line());
                    logs::info(&format!(
                        "{} — {} worker(s) up",
                        self.status_line(),
                        self.ready_count()
                    ));
                }
                let result = if errored.is_empty() {
                    Ok(n)
                } else {
                    Err(CtlError::Failed(format!("{what}: {}", errored.join("; "))))
                };
                for r in replies {
                    let _ = r.send(result.clone());
                }
            }
            Some(Op::Reload {
                total,
                done,
                replies,
                started,
                ..
            }) => {
                let msg = format!(
                    "reload finished: {done}/{total} worker(s) replaced in {} ms",
                    started.elapsed().as_millis()
                );
                logs::event(
                    Priority::Notice,
                    &msg,
                    &[("NODEHERD_EVENT", "reload-finished".into())],
                );
                self.bus_signal(BusSignal::ReloadFinished {
                    ok: true,
                    message: msg,
                });
                self.last_status.clear();
                notify::ready(&self.status_line());
                for r in replies {
                    let _ = r.send(Ok(self.slots.len() as i32));
                }
            }
            None => {}
        }
    }

    fn begin_stop(&mut self, code: i32) {
        if self.phase == Phase::Stopping {
            // A second stop request: no more waiting.
            logs::warn("stop requested again: killing every worker now");
            let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
            for id in ids {
                self.kill_worker(id, "second stop request");
            }
            return;
        }
        self.phase = Phase::Stopping;
        self.exit_code = code;
        logs::info(&format!("stopping {} worker(s)", self.workers.len()));
        notify::stopping("stopping");
        notify::extend_timeout(self.app.kill_timeout + Duration::from_secs(5));
        let stopping = CtlError::Stopping("the manager is stopping".into());
        match self.op.take() {
            Some(Op::Start { replies, .. }) | Some(Op::Reload { replies, .. }) => {
                for r in replies {
                    let _ = r.send(Err(stopping.clone()));
                }
            }
            None => {}
        }
        for req in std::mem::take(&mut self.queue) {
            reply_to(req, Err(stopping.clone()));
        }
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.stop_worker(id, "manager stopping");
        }
        for slot in &mut self.slots {
            slot.current = None;
            slot.incoming = None;
            slot.waiting = false;
        }
    }

    // ---- reporting ----------------------------------------------------------

    fn ready_count(&self) -> u32 {
        self.slots
            .iter()
            .filter_map(|s| s.current)
            .filter(|id| {
                self.workers
                    .get(id)
                    .is_some_and(|w| w.state == WState::Ready)
            })
            .count() as u32
    }

    fn state_name(&self) -> &'static str {
        if self.phase == Phase::Stopping {
            return "stopping";
        }
        match &self.op {
            Some(Op::Start { what: "start", .. }) if !self.ready_sent => "starting",
            Some(Op::Reload { .. }) => "reloading",
            _ if self.ready_count() < self.slots.len() as u32 => "degraded",
            _ => "ready",
        }
    }

    fn status_line(&self) -> String {
        let n = self.slots.len();
        let ready = self.ready_count();
        let errored: Vec<String> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.errored.is_some())
            .map(|(i, _)| i.to_string())
            .collect();
        let mut s = match (self.phase, &self.op) {
            (Phase::Stopping, _) => format!("stopping ({} worker(s) left)", self.workers.len()),
            (_, Some(Op::Reload { total, done, .. })) => format!("reloading {done}/{total}"),
            (_, Some(Op::Start { what: "start", .. })) if !self.ready_sent => {
                format!("starting: {ready}/{n} workers ready")
            }
            _ => format!("{ready}/{n} workers ready"),
        };
        if !errored.is_empty() {
            s.push_str(&format!("; errored: slot {}", errored.join(", ")));
        }
        s
    }

    fn publish(&mut self) {
        let status = self.status_line();
        if status != self.last_status {
            notify::status(&status);
            self.last_status = status.clone();
        }
        let mut workers = Vec::new();
        for (index, slot) in self.slots.iter().enumerate() {
            let index = index as u32;
            match slot.current.and_then(|id| self.workers.get(&id)) {
                Some(w) => workers.push(WorkerInfo {
                    instance: index,
                    pid: w.pid,
                    state: w.state.name(),
                    restarts: slot.restarts,
                    started: Some(w.started),
                    started_wall: Some(w.started_wall),
                }),
                None => workers.push(WorkerInfo {
                    instance: index,
                    pid: 0,
                    state: if slot.errored.is_some() {
                        "errored"
                    } else {
                        "waiting"
                    },
                    restarts: slot.restarts,
                    started: None,
                    started_wall: None,
                }),
            }
        }
        // Replacements and draining workers are processes too.
        for (id, w) in &self.workers {
            let is_current = self
                .slots
                .get(w.index as usize)
                .is_some_and(|s| s.current == Some(*id));
            if !is_current {
                workers.push(WorkerInfo {
                    instance: w.index,
                    pid: w.pid,
                    state: w.state.name(),
                    restarts: self.slots.get(w.index as usize).map_or(0, |s| s.restarts),
                    started: Some(w.started),
                    started_wall: Some(w.started_wall),
                });
            }
        }
        workers.sort_by_key(|w| (w.instance, w.pid));
        let snap = Snapshot {
            name: self.app.name.clone(),
            state: self.state_name(),
            instances: self.slots.len() as u32,
            ready_workers: self.ready_count(),
            status,
            workers,
        };
        self.published.send_if_modified(|old| {
            if *old == snap {
                false
            } else {
                *old = snap;
                true
            }
        });
    }

    fn signal_worker(&self, instance: u32, pid: i32, state: &'static str) {
        self.bus_signal(BusSignal::WorkerStateChanged {
            instance,
            pid: pid.max(0) as u32,
            state,
        });
    }

    fn bus_signal(&self, s: BusSignal) {
        if let Some(bus) = &self.bus {
            let _ = bus.send(s);
        }
    }
}

fn reply_to(req: Request, result: Result<i32, CtlError>) {
    match req {
        Request::Reload(Some(r)) | Request::Restart(Some(r)) | Request::Scale(_, Some(r)) => {
            let _ = r.send(result);
        }
        _ => {}
    }
}

/// Make one queued reload answer a second caller too.
fn merge_reply(queued: &mut Option<Reply>, new: Reply) {
    match queued.take() {
        None => *queued = Some(new),
        Some(first) => {
            // Fan the one answer out to both callers.
            let (tx, rx) = oneshot::channel::<Result<i32, CtlError>>();
            tokio::spawn(async move {
                let result = rx.await.unwrap_or_else(|_| {
                    Err(CtlError::Failed("the manager dropped the request".into()))
                });
                let _ = first.send(result.clone());
                let _ = new.send(result);
            });
            *queued = Some(tx);
        }
    }
}

fn signal(pid: i32, sig: libc::c_int) {
    if pid == 0 || pid == -1 {
        return; // never signal our own group or everything
    }
    // SAFETY: kill has no memory preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Forward a worker's output, line by line, to the log sink.
fn read_lines(fd: OwnedFd, index: u32, pid: i32, stream: Stream) {
    let Ok(rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    tokio::spawn(async move {
        for_each_line(rx, |line| {
            logs::worker_line(index, pid, stream, &String::from_utf8_lossy(line))
        })
        .await;
    });
}

/// Read lines (split when longer than the cap) until EOF.
async fn for_each_line<R: AsyncRead + Unpin>(r: R, mut f: impl FnMut(&[u8])) {
    const CAP: usize = 16 * 1024;
    let mut r = BufReader::with_capacity(CAP, r);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let buf = match r.fill_buf().await {
            Ok([]) => break,
            Ok(b) => b,
            Err(_) => break,
        };
        // Never let a line grow past CAP: take at most what still fits.
        let room = CAP - line.len();
        let window = &buf[..buf.len().min(room)];
        let (used, complete) = match window.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (window.len(), false),
        };
        line.extend_from_slice(&window[..if complete { used - 1 } else { used }]);
        r.consume(used);
        if complete || line.len() >= CAP {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            f(&line);
            line.clear();
        }
    }
    if !line.is_empty() {
        f(&line);
    }
}

fn read_ipc(
    stream: std::os::unix::net::UnixStream,
    id: WorkerId,
    tx: mpsc::UnboundedSender<Event>,
) {
    let Ok(stream) = tokio::net::UnixStream::from_std(stream) else {
        return;
    };
    tokio::spawn(async move {
        let mut skipping = false;
        for_each_line_raw(stream, |line, complete| {
            // A line longer than the cap is not ours: drop all of it.
            if skipping || !complete {
                skipping = !complete;
                return;
            }
            if let Some(msg) = ipc::parse(line) {
                let _ = tx.send(Event::Ipc { id, msg });
            }
        })
        .await;
    });
}

/// Like `for_each_line`, but says whether each piece ended with a newline.
async fn for_each_line_raw<R: AsyncRead + Unpin>(r: R, mut f: impl FnMut(&[u8], bool)) {
    let mut r = BufReader::with_capacity(ipc::MAX_LINE, r);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let buf = match r.fill_buf().await {
            Ok([]) => break,
            Ok(b) => b,
            Err(_) => break,
        };
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&buf[..i]);
                r.consume(i + 1);
                f(&line, true);
                line.clear();
            }
            None => {
                let n = buf.len();
                line.extend_from_slice(buf);
                r.consume(n);
                if line.len() > ipc::MAX_LINE {
                    f(&line, false);
                    line.clear();
                }
            }
        }
    }
}

/// Reap children on SIGCHLD and report each exit to the supervisor.
pub fn spawn_reaper(tx: mpsc::UnboundedSender<Event>) -> std::io::Result<()> {
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
    tokio::spawn(async move {
        loop {
            loop {
                let mut status = 0;
                // SAFETY: status is a valid out pointer.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                let how = if libc::WIFEXITED(status) {
                    format!("exited with code {}", libc::WEXITSTATUS(status))
                } else if libc::WIFSIGNALED(status) {
                    let sig = libc::WTERMSIG(status);
                    let name = nix::sys::signal::Signal::try_from(sig)
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_else(|_| format!("signal {sig}"));
                    format!("killed by {name}")
                } else {
                    continue;
                };
                let _ = tx.send(Event::Exited { pid, how });
            }
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    });
    Ok(())
}

/// Turn SIGTERM/SIGINT into `Stop` and SIGHUP into a reload.
pub fn spawn_signals(tx: mpsc::UnboundedSender<Event>) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = term.recv() => Event::Stop,
                _ = int.recv() => Event::Stop,
                _ = hup.recv() => {
                    logs::info("SIGHUP: reload requested");
                    Event::Request(Request::Reload(None))
                }
            };
            if tx.send(ev).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// Forward the worker notify socket's messages to the supervisor.
pub fn spawn_notify_listener(sock: tokio::net::UnixDatagram, tx: mpsc::UnboundedSender<Event>) {
    tokio::spawn(async move {
        loop {
            match notify_socket::recv(&sock).await {
                Ok(Some(n)) => {
                    if tx.send(Event::Notify(n)).is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    logs::warn(&format!("worker notify socket: {e}; ignoring"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
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
}
