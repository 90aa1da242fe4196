//! The thin driver: it carries out what the core decides and feeds it what
//! happens.
//!
//! It owns everything the core must not: the worker processes (pid, IPC
//! channel), the sockets, the callers waiting for answers, the clock and the
//! channels from the event sources. One loop waits for the next of: a child
//! exited (SIGCHLD), an input from a source, a control request, or the
//! core's next deadline; hands it to the core; executes the effects; and
//! publishes the snapshot. A spawn's result is fed back to the core before
//! anything else happens, so the core sees a worker's start in order.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Instant;

use libsystemd::logging::Priority;
use nix::sys::signal::Signal;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::core::Core;
use super::events::{Effect, Event, Level, LogLine, ReplyId, Said, SdNotify, StopBy, WorkerId};
use super::outbox::{self, Outbox};
use super::policy::Policy;
use super::reconfig::{Configs, Source, WorkerPaths};
use super::sources::{self, Input};

use crate::config::{App, ConfigError, Loaded};
use crate::control::{
    AppMetrics, AppMetricsRequest, BusSignal, Control, ControlRequest, CtlError, CtlResult, Handle,
    Snapshot,
};
use crate::ipc::BindRequest;
use crate::logs::{self, Stream};
use crate::shared::{Reply, Request, SharedSockets, Waiter};
use crate::socket_set::SocketSet;
use crate::worker::{self, Spawned, process};
use crate::{ipc, notify};

type Answer = oneshot::Sender<CtlResult>;

/// A worker process as the driver knows it.
struct Proc {
    pid: i32,
    /// Our end of the Node IPC channel, for what we write to it.
    ipc: Option<Outbox>,
    /// Our end of the preload's helper thread's channel (`crate::autopsy`).
    helper: Option<crate::autopsy::Helper>,
    /// Second handles on its stdout and stderr pipes, widened when it stops
    /// and handed over by a re-exec.
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

/// What a re-exec hands over besides the driver's own sockets and workers:
/// the fds the daemon's other parts serve from (second handles on them).
pub struct Carry {
    pub runtime_dir: PathBuf,
    pub notify: OwnedFd,
    pub control: Option<OwnedFd>,
    pub metrics: Option<crate::sockets::Listener>,
    /// The health listeners, by key (`health`, `health_agent`).
    pub health: Vec<(String, crate::sockets::Listener)>,
}

/// How long the driver goes on after answering a re-exec's callers before
/// it execs, so their answers leave this process first.
const EXEC_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

pub struct Driver {
    core: Core,
    configs: Configs,
    sockets: SocketSet,
    /// Sockets bound on workers' requests, shared by all of them.
    shared: SharedSockets,
    procs: HashMap<WorkerId, Proc>,
    by_pid: HashMap<i32, WorkerId>,
    /// Callers waiting for the core's answer; one reply may answer several.
    replies: HashMap<ReplyId, Vec<Answer>>,
    /// Reload requests whose configuration is being read (`None`: SIGHUP).
    loading: Option<Vec<Option<Answer>>>,
    /// Reload requests that came while it was read: they get a fresh read.
    next_load: Vec<Option<Answer>>,
    /// A reload asked with `--canary` waits for its configuration.
    canary_asked: bool,
    next_reply: u64,
    inputs_tx: mpsc::UnboundedSender<Input>,
    inputs: mpsc::UnboundedReceiver<Input>,
    /// What workers send (IPC lines, notify datagrams), bounded: when it is
    /// full, their readers stop reading.
    worker_tx: mpsc::Sender<Input>,
    worker_inputs: mpsc::Receiver<Input>,
    /// The bytes of long IPC lines that may wait in `worker_inputs`.
    ipc_bytes: std::sync::Arc<tokio::sync::Semaphore>,
    requests_tx: mpsc::UnboundedSender<ControlRequest>,
    requests: mpsc::UnboundedReceiver<ControlRequest>,
    published: watch::Sender<Snapshot>,
    /// Signals for the D-Bus side (the bus and peer-to-peer clients).
    signals: broadcast::Sender<BusSignal>,
    app_metrics_tx: mpsc::UnboundedSender<AppMetricsRequest>,
    app_metrics: mpsc::UnboundedReceiver<AppMetricsRequest>,
    /// Scrapes waiting for a worker's metrics, by request number, with the
    /// worker asked: only that worker's answer counts (a sibling could
    /// guess the number).
    metrics_waiting: HashMap<u64, (mpsc::UnboundedSender<AppMetrics>, WorkerId, u32, i32)>,
    next_metrics: u64,
    /// The app's counters kept across its workers' lives: the metrics
    /// endpoint's, held here so that a re-exec carries them.
    tally: std::sync::Arc<std::sync::Mutex<crate::tally::Tally>>,
    /// Connections handed over to workers so far (for the turn).
    handed_over: usize,
    /// Slots whose worker stalled (a socket per slot), with that worker:
    /// no new connection until it is heard from again.
    stalled: std::collections::BTreeMap<u32, WorkerId>,
    /// Watches the accept queues (a socket per slot).
    queue_watch: Option<crate::queue_watch::QueueWatch>,
    /// What a re-exec hands over; none: this manager cannot re-exec.
    carry: Option<Carry>,
    /// The program a re-exec checked, and when to exec it.
    exec_program: Option<PathBuf>,
    exec_at: Option<Instant>,
    /// It took over from a re-exec: no first start.
    resumed: bool,
    /// Sockets of slots that went, closed once these workers have exited.
    closing: HashMap<u64, Vec<WorkerId>>,
    /// The tasks watching the accept queues of slots that go: they hold
    /// second handles on those sockets, so they end before the sockets close.
    draining: HashMap<u64, tokio::task::AbortHandle>,
    /// The `watch` and `ignore_watch` in force, and their watch (none if it
    /// could not start: said once, not tried again until they change).
    watching: (Vec<PathBuf>, Vec<String>, Option<crate::watch::Watch>),
    /// The last stack taken (`nodeherd status` shows it).
    last_autopsy: Option<crate::control::Taken>,
    /// The release history: generations, how each fared, rollbacks.
    releases: super::releases::Releases,
}

impl Driver {
    /// A driver for `app`, whose configuration came from `source`; workers
    /// inherit `sockets` and are pointed at `paths`.
    pub fn new(
        app: App,
        sockets: SocketSet,
        source: Source,
        paths: WorkerPaths,
        watchdog: Option<std::time::Duration>,
    ) -> Driver {
        let (inputs_tx, inputs) = mpsc::unbounded_channel();
        let (worker_tx, worker_inputs) = mpsc::channel(sources::WORKER_QUEUE);
        let (requests_tx, requests) = mpsc::unbounded_channel();
        let (app_metrics_tx, app_metrics) = mpsc::unbounded_channel();
        let policy = Policy::new(&app, !sockets.is_empty(), sockets.per_slot(), watchdog);
        let core = Core::new(policy, Instant::now());
        let (published, _) = watch::channel(core.snapshot());
        let configs = Configs::new(app, source, paths, &sockets);
        Driver {
            core,
            configs,
            sockets,
            shared: SharedSockets::default(),
            procs: HashMap::new(),
            by_pid: HashMap::new(),
            replies: HashMap::new(),
            loading: None,
            next_load: Vec::new(),
            canary_asked: false,
            next_reply: 1,
            inputs_tx,
            inputs,
            worker_tx,
            worker_inputs,
            ipc_bytes: std::sync::Arc::new(tokio::sync::Semaphore::new(sources::QUEUE_BYTES)),
            requests_tx,
            requests,
            published,
            signals: broadcast::channel(256).0,
            app_metrics_tx,
            app_metrics,
            metrics_waiting: HashMap::new(),
            next_metrics: 1,
            tally: Default::default(),
            handed_over: 0,
            stalled: Default::default(),
            queue_watch: None,
            carry: None,
            exec_program: None,
            exec_at: None,
            resumed: false,
            closing: HashMap::new(),
            draining: HashMap::new(),
            watching: (Vec::new(), Vec::new(), None),
            last_autopsy: None,
            releases: Default::default(),
        }
    }

    /// Read the release history and number the configuration in force in
    /// it (before the first worker starts, or right after a re-exec).
    pub fn open_history(&mut self) {
        let resumed = self.resumed.then(|| self.core.generation());
        let (releases, generation, highest) = super::releases::Releases::open(
            &self.configs.paths().runtime_dir,
            self.configs.app(),
            resumed,
        );
        if !self.resumed {
            self.core.generation = generation;
            self.configs = Configs::resume(
                self.configs.app().clone(),
                self.configs.source.clone(),
                self.configs.paths().clone(),
                &self.sockets,
                generation,
            );
        }
        self.configs.number_from(highest);
        self.releases = releases;
        self.publish();
    }

    /// `Rollback(n)`: a reload to generation `n` of the history (0: the
    /// one that served before this one), as it was pinned, judged by a
    /// canary if the configuration in force says so. One whose files are
    /// gone is refused and nothing changes.
    fn rollback(&mut self, n: u64, answer: Option<Answer>) {
        let target = self
            .releases
            .target(n, self.core.generation())
            .map(|e| (e.generation, e.app.clone()));
        let (back_to, app) = match target {
            Ok(t) => t,
            Err(msg) => {
                logs::event(
                    Priority::Error,
                    &format!("rollback: {msg}"),
                    &[crate::logs::Milestone::ReloadRefused.field()],
                );
                let _ = self.signals.send(BusSignal::ReloadFinished {
                    ok: false,
                    message: msg.clone(),
                });
                if let Some(a) = answer {
                    let _ = a.send(Err(CtlError::ReloadFailed(msg)));
                }
                return;
            }
        };
        let canary =
            self.configs.app().reload_strategy == crate::config::canary::ReloadStrategy::Canary;
        let loaded = Loaded {
            app,
            warnings: Vec::new(),
        };
        let mut accepted = self
            .configs
            .accept(loaded, &self.sockets, self.core.policy());
        accepted.config.canary |= canary;
        let generation = accepted.config.generation;
        if let Some(app) = self.configs.pending(generation) {
            self.releases.tried(generation, app, Some(back_to));
        }
        for w in &accepted.warnings {
            logs::warn(w);
        }
        logs::info(&format!(
            "rollback: to generation {back_to}, as generation {generation}"
        ));
        let reply = self.reply_id(answer.into_iter().collect());
        self.event(Event::Reconfigure {
            config: Box::new(accepted.config),
            reply,
        });
    }

    /// A driver that goes on where a re-exec left off: `core` and the
    /// workers' fds come from the old program.
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        app: App,
        sockets: SocketSet,
        shared: SharedSockets,
        source: Source,
        paths: WorkerPaths,
        core: Core,
        workers: Vec<super::takeover::AdoptedWorker>,
    ) -> Driver {
        let generation = core.generation();
        let mut d = Driver::new(app.clone(), sockets, source, paths, None);
        d.configs = Configs::resume(
            app,
            d.configs.source.clone(),
            d.configs.paths().clone(),
            &d.sockets,
            generation,
        );
        d.shared = shared;
        d.shared
            .held_by(workers.iter().map(|w| w.id).collect::<Vec<_>>());
        d.core = core;
        d.resumed = true;
        let slots: HashMap<WorkerId, u32> = d
            .core
            .handed_over()
            .map(|(id, index, _)| (id, index))
            .collect();
        for w in workers {
            // The check before the exec matched these against the core's
            // workers; one it does not know would be filed under no slot.
            let Some(&index) = slots.get(&w.id) else {
                logs::error(&format!(
                    "re-exec: pid {} was handed over but the supervisor does not know it: killing it",
                    w.pid
                ));
                process::kill_group(w.pid);
                process::signal(w.pid, Signal::SIGKILL);
                continue;
            };
            crate::worker::cgroup::adopt(w.pid);
            let dup = |fd: &Option<OwnedFd>| fd.as_ref().and_then(|f| f.try_clone().ok());
            if let Some(fd) = dup(&w.stdout) {
                sources::output(fd, index, w.pid, Stream::Stdout);
            }
            if let Some(fd) = dup(&w.stderr) {
                sources::output(fd, index, w.pid, Stream::Stderr);
            }
            let ipc = w
                .ipc
                .map(std::os::unix::net::UnixStream::from)
                .and_then(|ours| d.open_channel(ours, w.id, index, w.pid));
            d.procs.insert(
                w.id,
                Proc {
                    pid: w.pid,
                    ipc,
                    helper: w
                        .helper
                        .map(std::os::unix::net::UnixStream::from)
                        .and_then(crate::autopsy::helper),
                    stdout: w.stdout,
                    stderr: w.stderr,
                },
            );
            d.by_pid.insert(w.pid, w.id);
        }
        let (published, _) = watch::channel(d.core.snapshot());
        d.published = published;
        d
    }

    /// Let this driver re-exec the manager, handing `carry` over with its own state.
    pub fn carry(&mut self, carry: Carry) {
        self.carry = Some(carry);
    }

    /// How the control plane reaches this supervisor.
    pub fn handle(&self) -> Handle {
        Handle {
            requests: self.requests_tx.clone(),
            snapshot: self.published.subscribe(),
            signals: self.signals.clone(),
            app_metrics: self.app_metrics_tx.clone(),
            tally: self.tally.clone(),
        }
    }

    /// Take over the app's counters a re-exec handed over.
    pub fn adopt_tally(&mut self, carried: crate::tally::Carried) {
        *self.tally.lock().unwrap_or_else(|e| e.into_inner()) = crate::tally::Tally::adopt(carried);
    }

    /// Where the sources send their inputs.
    pub fn inputs(&self) -> mpsc::UnboundedSender<Input> {
        self.inputs_tx.clone()
    }

    /// Where the notify socket sends what workers send: a bounded queue.
    pub fn notify_inputs(&self) -> sources::NotifyTo {
        sources::NotifyTo {
            tx: self.worker_tx.clone(),
            workers: self.published.subscribe(),
        }
    }

    /// Run until every worker is gone after a stop; returns the exit status.
    pub async fn run(mut self) -> std::io::Result<i32> {
        use tokio::signal::unix::{SignalKind, signal};
        // Before the first fork, so no exit can be missed.
        let mut sigchld = signal(SignalKind::child())?;
        self.rewatch();
        if self.resumed {
            // Exits during the exec were not seen: look now.
            self.reap();
        } else {
            logs::info(&format!(
                "starting {} worker(s): {}",
                self.core.policy().instances,
                self.configs.launcher(0).command_line()
            ));
            let fx = self.core.start(Instant::now());
            self.apply(fx);
        }
        // With a socket per slot, a thread watches the accept queues for a
        // busy or hung worker.
        if self.sockets.layout().is_some() {
            let tx = self.inputs_tx.clone();
            match crate::queue_watch::QueueWatch::start(move |seen| {
                tx.send(Input::Queues(seen)).is_ok()
            }) {
                Ok(w) => self.queue_watch = Some(w),
                Err(e) => logs::warn(&format!(
                    "cannot watch the accept queues ({e}): a busy worker keeps getting its share of new connections"
                )),
            }
            self.sync_queue_watch();
        }
        loop {
            self.publish();
            if let Some(code) = self.core.finished() {
                return Ok(code);
            }
            let deadline = self.core.next_deadline();
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let exec_at = self.exec_at;
            let exec = async {
                match exec_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = exec => self.exec_now(),
                _ = sigchld.recv() => self.reap(),
                Some(input) = self.inputs.recv() => self.input(input),
                Some(input) = self.worker_inputs.recv() => self.input(input),
                Some(req) = self.requests.recv() => self.request(req),
                Some(req) = self.app_metrics.recv() => self.ask_for_metrics(req),
                _ = sleep => {
                    let fx = self.core.handle_timeout(Instant::now());
                    self.apply(fx);
                }
            }
        }
    }

    /// Connections steered to slots (the steered layout): each to its
    /// slot's worker, or, if that one does not serve now, to one that does.
    fn deliver(&mut self, conns: Vec<crate::queue_watch::Stuck>) {
        let serving: Vec<WorkerId> = self
            .core
            .serving_slots()
            .into_iter()
            .filter_map(|slot| self.core.ready_worker_in(slot))
            .collect();
        for conn in conns {
            let worker = self.core.ready_worker_in(conn.slot).or_else(|| {
                let any = serving
                    .get(self.handed_over % serving.len().max(1))
                    .copied();
                self.handed_over = self.handed_over.wrapping_add(1);
                any
            });
            let Some(channel) = worker
                .and_then(|w| self.procs.get(&w))
                .and_then(|p| p.ipc.as_ref())
            else {
                continue;
            };
            // The worker has the shared sockets at fd 3 on, in this order.
            let socket = 3 + conn.place as i32;
            let _ = channel.send(ipc::connection(socket), Some(conn.fd), outbox::Kind::Answer);
        }
    }

    /// Tell the queue watch (a socket per slot) what to look at: the
    /// slots' sockets when they changed, and the slots that serve.
    fn sync_queue_watch(&mut self) {
        let Some(watch) = &self.queue_watch else {
            return;
        };
        let layout = self.sockets.layout();
        if !watch.has_layout(layout)
            && let Some((layout, sockets)) = self.sockets.tcp_sockets()
        {
            watch.set_sockets(Some(layout), sockets, self.sockets.held());
        }
        watch.set_serving(self.core.serving_slots());
        // A slot whose worker was replaced is not stalled any more.
        let core = &self.core;
        let before = self.stalled.len();
        self.stalled
            .retain(|slot, worker| core.ready_worker_in(*slot) == Some(*worker));
        if self.stalled.len() != before {
            self.sockets
                .set_stalled(self.stalled.keys().copied().collect());
        }
    }

    fn event(&mut self, ev: Event) {
        let fx = self.core.handle(Instant::now(), ev);
        self.apply(fx);
    }

    fn reap(&mut self) {
        for (pid, status) in process::reap(&self.by_pid) {
            let Some(worker) = self.by_pid.remove(&pid) else {
                continue;
            };
            // Anything the worker left in its process group goes with it.
            process::kill_group(pid);
            if let Some(words) = crate::worker::cgroup::oom_killed(pid) {
                self.event(Event::OomKilled { worker, words });
            }
            crate::worker::cgroup::reaped(pid);
            self.procs.remove(&worker);
            self.close_left_sockets();
            self.event(Event::Exited { worker, status });
        }
    }

    fn input(&mut self, input: Input) {
        let ev = match input {
            Input::Stop => Event::Stop,
            Input::Reload => return self.reload_requested(None),
            Input::Reexec => Event::Request {
                what: Control::Reexec,
                reply: None,
            },
            Input::ExecChecked(result) => Event::ExecChecked(result),
            Input::SlotDrained(leave) => Event::SlotDrained(leave),
            Input::FilesChanged => Event::FilesChanged,
            Input::Diagnosed { worker, result } => Event::Diagnosed { worker, result },
            Input::Autopsied(taken) => {
                self.last_autopsy = Some(taken);
                return;
            }
            Input::ConfigLoaded(result) => return self.config_loaded(*result),
            Input::Ipc {
                worker,
                msg: ipc::Message::Bind(req),
                ..
            } => return self.bind_for(worker, req),
            Input::Ipc {
                worker,
                msg: ipc::Message::Again { id, fd },
                ..
            } => return self.hand_back(worker, id, fd),
            Input::Bound(b) => return self.bound(*b),
            Input::Ipc {
                worker,
                msg: ipc::Message::Metrics { id: 0, text },
                ..
            } => return self.last_words(worker, text),
            Input::Ipc {
                worker,
                msg: ipc::Message::Metrics { id, text },
                ..
            } => {
                let asked = self.metrics_waiting.get(&id).map(|w| w.1);
                if asked == Some(worker)
                    && let Some((tx, _, instance, pid)) = self.metrics_waiting.remove(&id)
                {
                    let _ = tx.send(AppMetrics {
                        instance,
                        pid,
                        text,
                    });
                }
                return;
            }
            Input::Queues(crate::queue_watch::Seen::Stalled(slots)) => {
                // Until each of these workers is heard from again.
                for slot in slots {
                    if let Some(worker) = self.core.ready_worker_in(slot) {
                        self.stalled.insert(slot, worker);
                    }
                }
                self.sockets
                    .set_stalled(self.stalled.keys().copied().collect());
                return;
            }
            Input::Queues(crate::queue_watch::Seen::Busy(busy)) => {
                self.sockets.set_busy(busy);
                return;
            }
            Input::Queues(crate::queue_watch::Seen::Steered(conns)) => return self.deliver(conns),
            Input::Ipc { worker, msg, .. } => {
                // A stalled worker's event loop runs again (its heartbeat
                // comes as soon as it does): it takes connections again.
                let before = self.stalled.len();
                self.stalled.retain(|_, w| *w != worker);
                if self.stalled.len() != before {
                    self.sockets
                        .set_stalled(self.stalled.keys().copied().collect());
                }
                let said = match msg {
                    ipc::Message::Ready => Said::Ready,
                    ipc::Message::Listening => Said::Listening,
                    ipc::Message::ListenError(text) => Said::ListenError(text),
                    ipc::Message::Beat {
                        delay_ms,
                        elu_permille,
                        outcomes,
                    } => Said::Beat {
                        delay_ms,
                        elu_permille,
                        outcomes: outcomes.map(Box::new),
                    },
                    ipc::Message::Connections { open } => Said::Connections { open },
                    ipc::Message::Closed => Said::Closed,
                    // Answered above.
                    ipc::Message::Bind(_)
                    | ipc::Message::Again { .. }
                    | ipc::Message::Metrics { .. } => return,
                };
                Event::Said { worker, said }
            }
            Input::Flooding(worker) => Event::Flooding { worker },
            Input::Notify { note, worker_pid } => {
                // The sender must be a worker or one of its descendants.
                match worker_pid.and_then(|p| self.by_pid.get(&p).copied()) {
                    Some(worker) => Event::Notify {
                        worker,
                        ready: note.ready,
                        status: note.status,
                    },
                    None => Event::NotifyFromStranger { pid: note.pid },
                }
            }
            Input::NotifyDropped {
                worker_pid,
                statuses,
                datagrams,
            } => return self.notify_dropped(worker_pid, statuses, datagrams),
        };
        self.event(ev);
    }

    /// Say what the notify socket did not pass on from a worker's tree.
    fn notify_dropped(&self, worker_pid: i32, statuses: u64, datagrams: u64) {
        let worker = self.by_pid.get(&worker_pid).copied();
        let index = worker.and_then(|w| self.core.slot_of(w));
        let who = match index {
            Some(i) => format!("worker {i} (pid {worker_pid})"),
            None if worker_pid == 0 => "processes that are no worker of ours".to_string(),
            None => format!("pid {worker_pid}, no worker of ours,"),
        };
        let msg = format!(
            "{who} sent more than the notify socket takes: {statuses} STATUS= message(s) not logged (at most {} at once, then one a second; the latest is kept), {datagrams} datagram(s) ignored (over {} a second)",
            super::budget::STATUS_BURST,
            super::budget::NOTIFY_PER_SECOND,
        );
        let extra = [crate::logs::Milestone::NotifyDropped.field()];
        match index {
            Some(i) => logs::worker_event(Priority::Warning, i, worker_pid, &msg, &extra),
            None => logs::event(Priority::Warning, &msg, &extra),
        }
    }

    fn request(&mut self, req: ControlRequest) {
        if let Control::Rollback(n) = req.what {
            return self.rollback(n, req.reply);
        }
        if req.what == Control::ReloadCanary {
            self.canary_asked = true;
        }
        if matches!(req.what, Control::Reload | Control::ReloadCanary) {
            return self.reload_requested(req.reply);
        }
        let reply = self.reply_id(req.reply.into_iter().collect());
        self.event(Event::Request {
            what: req.what,
            reply,
        });
    }

    /// One reply for the core that answers every one of `answers`.
    fn reply_id(&mut self, answers: Vec<Answer>) -> Option<ReplyId> {
        if answers.is_empty() {
            return None;
        }
        let id = ReplyId(self.next_reply);
        self.next_reply += 1;
        self.replies.insert(id, answers);
        Some(id)
    }

    /// A reload reads the configuration first, on a blocking thread (a
    /// `.config.js` runs node), while supervision goes on. Requests that
    /// come while it is read wait for one more read after it, so each
    /// reload uses a configuration read after it was asked for.
    fn reload_requested(&mut self, answer: Option<Answer>) {
        match &mut self.loading {
            Some(_) => self.next_load.push(answer),
            None => {
                self.loading = Some(vec![answer]);
                self.start_load();
            }
        }
    }

    fn start_load(&self) {
        let source = self.configs.source.clone();
        let tx = self.inputs_tx.clone();
        tokio::task::spawn_blocking(move || {
            let _ = tx.send(Input::ConfigLoaded(Box::new(source.load())));
        });
    }

    fn config_loaded(&mut self, result: Result<Loaded, ConfigError>) {
        let batch = self.loading.take().unwrap_or_default();
        let n = batch.len();
        let answers: Vec<Answer> = batch.into_iter().flatten().collect();
        match result {
            Err(e) => {
                let msg = format!("reload refused: {e}; nothing changed, the workers keep serving");
                logs::event(
                    Priority::Error,
                    &msg,
                    &[crate::logs::Milestone::ReloadRefused.field()],
                );
                let _ = self.signals.send(BusSignal::ReloadFinished {
                    ok: false,
                    message: msg.clone(),
                });
                for a in answers {
                    let _ = a.send(Err(CtlError::InvalidArgument(msg.clone())));
                }
                self.event(Event::ReloadRefused);
            }
            Ok(loaded) => {
                let mut accepted = self
                    .configs
                    .accept(loaded, &self.sockets, self.core.policy());
                accepted.config.canary = std::mem::take(&mut self.canary_asked);
                let generation = accepted.config.generation;
                if let Some(app) = self.configs.pending(generation) {
                    self.releases.tried(generation, app, None);
                }
                for w in &accepted.warnings {
                    logs::warn(w);
                }
                logs::info(&format!("reload: configuration read for {n} request(s)"));
                let reply = self.reply_id(answers);
                self.event(Event::Reconfigure {
                    config: Box::new(accepted.config),
                    reply,
                });
            }
        }
        if !self.next_load.is_empty() {
            self.loading = Some(std::mem::take(&mut self.next_load));
            self.start_load();
        }
    }

    /// Execute effects; events they cause (a spawn's result, a memory
    /// sample) go back to the core before anything else.
    fn apply(&mut self, fx: Vec<Effect>) {
        let mut follow: VecDeque<Event> = VecDeque::new();
        self.execute(fx, &mut follow);
        while let Some(ev) = follow.pop_front() {
            let fx = self.core.handle(Instant::now(), ev);
            self.execute(fx, &mut follow);
        }
        self.configs
            .settle(self.core.generation(), &self.core.generations_wanted());
        self.releases.follow(
            self.core.generation(),
            &self.core.generations_wanted(),
            self.core.counters.reloads_rolled_back,
            self.configs.app().history_keep,
        );
        self.rewatch();
        if self.sockets.steers() {
            // With a socket per slot, the kernel picks only slots that
            // serve, and of them those below their share while some are.
            self.sockets
                .set_serving(self.core.serving_slots(), self.core.preferred_slots());
            self.sync_queue_watch();
        }
    }

    fn execute(&mut self, fx: Vec<Effect>, follow: &mut VecDeque<Event>) {
        for effect in fx {
            match effect {
                Effect::Spawn {
                    worker,
                    index,
                    generation,
                } => follow.push_back(self.spawn(worker, index, generation)),
                Effect::Stop { worker, by } => self.stop(worker, by),
                Effect::Kill { worker } => {
                    if let Some(p) = self.procs.get(&worker) {
                        crate::worker::cgroup::kill(p.pid);
                        process::kill_group(p.pid);
                        process::signal(p.pid, Signal::SIGKILL);
                    }
                }
                Effect::ReleaseSlotSockets(index) => self.sockets.release(index),
                Effect::Autopsy {
                    worker,
                    index,
                    pid,
                    why,
                    within,
                } => self.autopsy(worker, index, pid, why, within),
                Effect::Diagnose {
                    worker,
                    index,
                    pid,
                    capture,
                    within,
                } => self.diagnose(worker, index, pid, capture, within),
                Effect::Resume { worker } => {
                    if let Some(channel) = self.procs.get(&worker).and_then(|p| p.ipc.as_ref()) {
                        channel.send(ipc::RESUME.to_vec(), None, outbox::Kind::Answer);
                    }
                }
                Effect::CheckExec => self.check_exec(),
                Effect::ScheduleCron {
                    pattern,
                    not_before,
                } => {
                    // The wall clock decides when; the core gets a deadline.
                    let (now, wall) = (Instant::now(), std::time::SystemTime::now());
                    let next = crate::cron::next_run(&pattern, wall, not_before)
                        .map(|(wait, unix_ms)| (now + wait, unix_ms));
                    follow.push_back(Event::CronScheduled(next));
                }
                Effect::DrainSlot { leave, index } => self.drain_slot(leave, index),
                Effect::Share { worker, max } => {
                    if let Some(channel) = self.procs.get(&worker).and_then(|p| p.ipc.as_ref()) {
                        channel.send(crate::ipc::share(max), None, outbox::Kind::Share);
                    }
                }
                Effect::CloseLeaving { leave, workers } => {
                    if let Some(watch) = self.draining.remove(&leave) {
                        watch.abort();
                    }
                    self.closing.insert(leave, workers);
                    self.close_left_sockets();
                }
                Effect::Exec => self.exec_at = Some(Instant::now() + EXEC_GRACE),
                Effect::SampleLoad => follow.push_back(Event::LoadSample {
                    queued: self.sockets.queued(),
                    unit_memory_max: crate::worker::cgroup::unit_memory_max(),
                }),
                Effect::SampleMemory(ids) => {
                    let sample_ids = ids.clone();
                    let sample = ids
                        .into_iter()
                        .filter_map(|id| {
                            let p = self.procs.get(&id)?;
                            Some((id, crate::worker::cgroup::worker_memory_bytes(p.pid)))
                        })
                        .collect();
                    follow.push_back(Event::MemorySample(sample));
                    let pressure: Vec<(WorkerId, f64)> = sample_ids
                        .iter()
                        .filter_map(|id| {
                            let p = self.procs.get(id)?;
                            Some((
                                *id,
                                crate::worker::cgroup::memory_pressure(p.pid)?.some_avg10,
                            ))
                        })
                        .collect();
                    follow.push_back(Event::PressureSample(pressure));
                }
                Effect::Notify(n) => match n {
                    SdNotify::Ready(s) => notify::ready(&s),
                    SdNotify::Reloading(s) => notify::reloading(&s),
                    SdNotify::Status(s) => notify::status(&s),
                    SdNotify::Stopping(s) => notify::stopping(&s),
                    SdNotify::Watchdog => notify::watchdog(),
                    SdNotify::ExtendTimeout(d) => notify::extend_timeout(d),
                },
                Effect::Log(line) => log(line),
                Effect::Bus(s) => {
                    if matches!(s, BusSignal::ReloadFinished { ok: true, .. }) {
                        self.close_unheld_shared();
                    }
                    // No receiver (no bus, no client) is fine.
                    let _ = self.signals.send(s);
                }
                Effect::Reply { reply, result } => {
                    for tx in self.replies.remove(&reply).unwrap_or_default() {
                        let _ = tx.send(result.clone());
                    }
                }
            }
        }
    }

    fn spawn(&mut self, worker: WorkerId, index: u32, generation: u64) -> Event {
        let launcher = self.configs.launcher(generation);
        let leaf = match crate::worker::cgroup::prepare(index, worker.0, launcher.limits()) {
            Ok(leaf) => leaf,
            Err(e) => {
                return Event::SpawnFailed {
                    worker,
                    error: format!("{e:#}"),
                };
            }
        };
        let result = self
            .sockets
            .for_slot(index)
            .map_err(anyhow::Error::from)
            .and_then(|listeners| launcher.spawn_in(index, listeners, leaf.as_ref()));
        let result =
            crate::worker::cgroup::started(result.map(|s| (s.pid, s)), leaf).map(|(_, s)| s);
        let Spawned {
            pid,
            ipc,
            helper,
            stdout,
            stderr,
        } = match result {
            Ok(s) => s,
            Err(e) => {
                return Event::SpawnFailed {
                    worker,
                    error: format!("{e:#}"),
                };
            }
        };
        let (out2, err2) = (stdout.try_clone().ok(), stderr.try_clone().ok());
        sources::output(stdout, index, pid, Stream::Stdout);
        sources::output(stderr, index, pid, Stream::Stderr);
        let ipc = ipc.and_then(|ours| self.open_channel(ours, worker, index, pid));
        let has_ipc = ipc.is_some();
        self.procs.insert(
            worker,
            Proc {
                pid,
                ipc,
                helper: helper.and_then(crate::autopsy::helper),
                stdout: out2,
                stderr: err2,
            },
        );
        self.by_pid.insert(pid, worker);
        Event::Spawned {
            worker,
            pid,
            ipc: has_ipc,
        }
    }

    /// Read a worker's IPC channel (`ours`) and give it an outbox.
    fn open_channel(
        &self,
        ours: std::os::unix::net::UnixStream,
        worker: WorkerId,
        index: u32,
        pid: i32,
    ) -> Option<Outbox> {
        let reader = ours.try_clone().ok()?;
        reader.set_nonblocking(true).ok()?;
        ours.set_nonblocking(true).ok()?;
        sources::ipc_channel(
            reader,
            worker,
            self.worker_tx.clone(),
            self.ipc_bytes.clone(),
        );
        Outbox::new(ours, index, pid).ok()
    }

    /// Take a worker's stack on a task of its own (see [`crate::autopsy`]):
    /// the supervisor goes on meanwhile.
    fn autopsy(
        &self,
        worker: WorkerId,
        index: u32,
        pid: i32,
        why: super::events::AutopsyWhy,
        within: std::time::Duration,
    ) {
        let app = self.configs.app();
        if !app.autopsy {
            use crate::logs::{Milestone, worker_event};
            worker_event(
                libsystemd::logging::Priority::Warning,
                index,
                pid,
                &format!(
                    "worker {index} (pid {pid}): no JavaScript stack taken: autopsy off (`autopsy: false`)"
                ),
                &[Milestone::StackMissed.field()],
            );
            return;
        }
        let ask = crate::autopsy::Ask {
            app: app.name.clone(),
            index,
            pid,
            hang: why == super::events::AutopsyWhy::Hang,
            within,
            dir: crate::autopsy::base_dir(&self.configs.paths().runtime_dir),
            owner: app.credentials.as_ref().map(|c| (c.uid, c.gid)),
        };
        let helper = self.procs.get(&worker).and_then(|p| p.helper.clone());
        let tx = self.inputs_tx.clone();
        tokio::spawn(async move {
            if let Some(taken) = crate::autopsy::take(helper, ask).await {
                let _ = tx.send(Input::Autopsied(taken));
            }
        });
    }

    /// Capture a worker out of rotation on a task of its own, then tell
    /// the core (see `supervisor::diagnose`).
    fn diagnose(
        &self,
        worker: WorkerId,
        index: u32,
        pid: i32,
        capture: crate::control::Capture,
        within: std::time::Duration,
    ) {
        let app = self.configs.app();
        let target = crate::autopsy::Target {
            dir: crate::autopsy::base_dir(&self.configs.paths().runtime_dir),
            owner: app.credentials.as_ref().map(|c| (c.uid, c.gid)),
            index,
            pid,
        };
        let helper = self.procs.get(&worker).and_then(|p| p.helper.clone());
        let tx = self.inputs_tx.clone();
        tokio::spawn(async move {
            let result = crate::autopsy::capture(helper, capture, target, within).await;
            let _ = tx.send(Input::Diagnosed { worker, result });
        });
    }

    fn stop(&mut self, worker: WorkerId, by: StopBy) {
        let Some(p) = self.procs.get_mut(&worker) else {
            return;
        };
        // Room for what it flushes on its way out.
        for pipe in [&p.stdout, &p.stderr].into_iter().flatten() {
            worker::widen_for_exit(pipe);
        }
        if by == StopBy::Message
            && let Some(ch) = &p.ipc
            && ch.send(ipc::SHUTDOWN.to_vec(), None, outbox::Kind::Shutdown)
        {
            return;
        }
        if by == StopBy::Message {
            logs::warn(&format!(
                "could not send 'shutdown' to pid {}: sent SIGINT instead",
                p.pid
            ));
        }
        process::signal(p.pid, Signal::SIGINT);
    }

    /// A worker listens on an address no inherited socket covers: bind it
    /// (once for every worker, on a thread with the worker's rights) and
    /// pass it over the worker's IPC channel, or tell the worker why not,
    /// as Node would have.
    fn bind_for(&mut self, worker: WorkerId, req: BindRequest) {
        let Some(pid) = self.procs.get(&worker).map(|p| p.pid) else {
            return;
        };
        let waiter = Waiter {
            worker,
            pid,
            index: self.core.slot_of(worker).unwrap_or(0),
            id: req.id,
        };
        let request = Request {
            pid,
            allowed: &self.configs.app().shared_listen,
            runtime_dir: &self.configs.paths().runtime_dir,
        };
        let tx = self.inputs_tx.clone();
        let done = move |b| {
            let _ = tx.send(Input::Bound(Box::new(b)));
        };
        match self.shared.request(&req.address, &request, waiter, done) {
            Ok(Reply::Later) => {}
            Ok(Reply::Now(listener)) => {
                answer_bind(&self.procs, &req.address, waiter, Ok(listener), false)
            }
            Err(refused) => answer_bind(&self.procs, &req.address, waiter, Err(&refused), true),
        }
    }

    /// A worker captured in place listens again on the socket it was
    /// handed at `fd` (see `supervisor::diagnose`): only its own slot's,
    /// which it held before, so a worker gains nothing by asking.
    fn hand_back(&mut self, worker: WorkerId, id: u64, fd: i32) {
        let Some(index) = self.core.slot_of(worker) else {
            return;
        };
        let Some(channel) = self.procs.get(&worker).and_then(|p| p.ipc.as_ref()) else {
            return;
        };
        let nth = usize::try_from(fd - 3).ok();
        let listener = self
            .sockets
            .for_slot(index)
            .ok()
            .and_then(|l| l.get(nth?))
            .map(|l| l.fd.try_clone());
        let (msg, handed) = match listener {
            Some(Ok(sock)) => (ipc::bound(id), Some(sock)),
            Some(Err(e)) => (ipc::again_failed(id, &e.to_string()), None),
            None => (
                ipc::again_failed(id, &format!("no socket was handed over at fd {fd}")),
                None,
            ),
        };
        channel.send(msg, handed, outbox::Kind::Answer);
    }

    /// A binding thread is done: answer every worker that waited for it.
    fn bound(&mut self, b: crate::shared::Bound) {
        let (address, waiters, result) = self.shared.finish(b);
        for (i, w) in waiters.into_iter().enumerate() {
            let answer = match &result {
                Ok(l) => Ok(*l),
                Err(r) => Err(r),
            };
            answer_bind(&self.procs, &address, w, answer, i == 0);
        }
    }

    /// After a reload, close the shared sockets no current worker asked for.
    fn close_unheld_shared(&mut self) {
        let procs = &self.procs;
        for closed in self.shared.close_unheld(|w| procs.contains_key(&w)) {
            logs::info(&format!(
                "shared socket: {closed} closed: no worker of this reload listens there"
            ));
        }
    }

    /// Ask every worker that serves or drains for the app's own metrics
    /// (a leaving one's last counts are kept, see `tally`); the answers go
    /// straight to the scrape that asked.
    fn ask_for_metrics(&mut self, req: AppMetricsRequest) {
        self.metrics_waiting.retain(|_, (tx, ..)| !tx.is_closed());
        let snap = self.core.snapshot();
        let mut asked = 0;
        for w in snap
            .workers
            .iter()
            .filter(|w| matches!(w.state, "ready" | "draining" | "stopping") && w.pid > 0)
        {
            let Some(worker) = self.by_pid.get(&w.pid).copied() else {
                continue;
            };
            let Some(channel) = self.procs.get(&worker).and_then(|p| p.ipc.as_ref()) else {
                continue;
            };
            let id = self.next_metrics;
            self.next_metrics += 1;
            if channel.send(ipc::metrics_request(id), None, outbox::Kind::Request) {
                self.metrics_waiting
                    .insert(id, (req.answers.clone(), worker, w.instance, w.pid));
                asked += 1;
            }
        }
        let _ = req.asked.send(asked);
    }

    /// A worker's counters as it leaves (the preload sends them, id 0, once
    /// its drain is done): kept for its slot. Taken only from a worker that
    /// is leaving, and once; read off the supervisor's thread.
    fn last_words(&mut self, worker: WorkerId, text: Option<String>) {
        let (Some(text), Some(pid)) = (text, self.procs.get(&worker).map(|p| p.pid)) else {
            return;
        };
        let snap = self.core.snapshot();
        let Some(w) = snap
            .workers
            .iter()
            .find(|w| w.pid == pid && matches!(w.state, "stopping" | "draining"))
        else {
            return;
        };
        let (tally, instance) = (self.tally.clone(), w.instance);
        tokio::spawn(async move {
            let mut tally = tally.lock().unwrap_or_else(|e| e.into_inner());
            tally.last_words(instance, pid, &text);
        });
    }

    /// The state a re-exec hands over, as of now; `None` when this driver
    /// has nothing to hand over with it ([`Driver::carry`] was not called).
    fn state(&self) -> Option<super::takeover::State> {
        let carry = self.carry.as_ref()?;
        // Read together: the new program measures the exec against this clock.
        let (now, monotonic_ns) = (Instant::now(), crate::reexec::monotonic_ns());
        Some(super::takeover::State {
            format: super::takeover::STATE_FORMAT,
            written_by: env!("CARGO_PKG_VERSION").to_string(),
            monotonic_ns,
            app: self.configs.app().clone(),
            runtime_dir: carry.runtime_dir.clone(),
            sockets: self.sockets.carry(),
            shared: self.shared.carry(),
            notify_fd: carry.notify.as_raw_fd(),
            control_fd: carry.control.as_ref().map(AsRawFd::as_raw_fd),
            metrics: carry.metrics.as_ref().map(crate::sockets::Listener::carry),
            health: carry
                .health
                .iter()
                .map(|(k, l)| (k.clone(), l.carry()))
                .collect(),
            core: self.core.export(now),
            tally: self.tally.lock().unwrap_or_else(|e| e.into_inner()).carry(),
            workers: self
                .procs
                .iter()
                .map(|(id, p)| super::takeover::CarriedWorker {
                    id: *id,
                    pid: p.pid,
                    ipc: p.ipc.as_ref().map(AsRawFd::as_raw_fd),
                    stdout: p.stdout.as_ref().map(AsRawFd::as_raw_fd),
                    stderr: p.stderr.as_ref().map(AsRawFd::as_raw_fd),
                    helper: p.helper.as_ref().map(crate::autopsy::Helper::raw_fd),
                })
                .collect(),
        })
    }

    /// Check, on a blocking thread, that the program on disk can take this
    /// manager over: it runs, and it reads the state it would be given.
    fn check_exec(&mut self) {
        let tx = self.inputs_tx.clone();
        let Some(state) = self.state() else {
            let _ = tx.send(Input::ExecChecked(Err(
                "this manager was started in a way that cannot be handed over".into(),
            )));
            return;
        };
        let program = match crate::reexec::program() {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Input::ExecChecked(Err(format!(
                    "cannot tell which program this is (/proc/self/exe): {e}"
                ))));
                return;
            }
        };
        self.exec_program = Some(program.clone());
        let doc = serde_json::to_vec(&state).unwrap_or_default();
        tokio::task::spawn_blocking(move || {
            let _ = tx.send(Input::ExecChecked(crate::reexec::check(&program, &doc)));
        });
    }

    /// Hand everything over and exec the checked program. Returns only if
    /// that was not done: cancelled (a stop came), or `execve` failed.
    fn exec_now(&mut self) {
        self.exec_at = None;
        if !self.core.exec_due() {
            return;
        }
        if self.loading.is_some() || self.sockets.any_leaving() {
            // A configuration being read for a reload would be lost, and
            // the sockets of a slot that went are closed when its worker
            // has exited: after those.
            self.exec_at = Some(Instant::now() + EXEC_GRACE);
            return;
        }
        // Whatever the sources already read goes to the core first: this
        // process runs nothing else between here and the exec.
        while let Ok(input) = self.inputs.try_recv() {
            self.input(input);
        }
        while let Ok(input) = self.worker_inputs.try_recv() {
            self.input(input);
        }
        // Binds still under way end with the exec: their workers hear so.
        for (address, waiters) in self.shared.abandon() {
            let busy = crate::shared::Refused {
                error: std::io::Error::from_raw_os_error(libc::EAGAIN),
                why: "the manager re-executes; listen again".into(),
                said: false,
            };
            for w in waiters {
                answer_bind(&self.procs, &address, w, Err(&busy), true);
            }
        }
        self.reap();
        if !self.core.exec_due() {
            return;
        }
        let (Some(program), Some(state)) = (self.exec_program.clone(), self.state()) else {
            return;
        };
        // The state as of now (workers may have come and gone since the
        // check): the same checks again, with this program's rules, so
        // nothing that was checked has changed shape.
        if let Err(e) = state.validate() {
            self.event(Event::ExecFailed(format!("the state to hand over: {e}")));
            return;
        }
        let doc = match serde_json::to_vec(&state) {
            Ok(doc) => doc,
            Err(e) => {
                self.event(Event::ExecFailed(format!("writing the state: {e}")));
                return;
            }
        };
        logs::info(&format!(
            "re-exec: handing {} worker(s) over to {}",
            state.workers.len(),
            program.display()
        ));
        let unsent: usize = self
            .procs
            .values()
            .filter_map(|p| p.ipc.as_ref())
            .map(Outbox::waiting)
            .sum();
        if unsent > 0 {
            logs::warn(&format!(
                "re-exec: {unsent} message(s) to workers that have not read their IPC channel are dropped"
            ));
        }
        logs::flush(std::time::Duration::from_secs(1));
        let e = crate::reexec::exec(&program, &doc, &state.fds());
        self.event(Event::ExecFailed(e.to_string()));
    }

    /// Steer new connections away from a slot that goes, then watch its
    /// accept queues until they are empty (its worker still accepts).
    fn drain_slot(&mut self, leave: u64, index: u32) {
        self.sockets.leave(index, leave);
        let fds = self.sockets.leaving_fds(leave);
        let tx = self.inputs_tx.clone();
        let watch = tokio::spawn(async move {
            use std::os::fd::AsRawFd;
            // Handshakes the kernel began before the steering end in the
            // old queue: give them a moment to arrive.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let until = Instant::now() + 2 * super::policy::LEAVE_BOUND;
            loop {
                let queued: u32 = fds
                    .iter()
                    .filter(|(kind, _)| *kind == crate::sockets::Kind::Tcp)
                    .map(|(_, fd)| crate::reuseport::queue_of(fd.as_raw_fd()))
                    .sum();
                if queued == 0 {
                    let _ = tx.send(Input::SlotDrained(leave));
                    return;
                }
                // Aborted when the core stops waiting (CloseLeaving); the
                // deadline is a backstop.
                if tx.is_closed() || Instant::now() > until {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
        self.draining.insert(leave, watch.abort_handle());
    }

    /// Close the sockets of slots that went whose workers have all exited.
    fn close_left_sockets(&mut self) {
        let procs = &self.procs;
        let done: Vec<u64> = self
            .closing
            .iter_mut()
            .filter_map(|(leave, workers)| {
                workers.retain(|w| procs.contains_key(w));
                workers.is_empty().then_some(*leave)
            })
            .collect();
        for leave in done {
            self.closing.remove(&leave);
            self.sockets.close_leaving(leave);
        }
    }

    /// Watch what `watch` names in the configuration in force (a reload
    /// may have changed it); nothing without it.
    fn rewatch(&mut self) {
        let app = self.configs.app();
        if self.watching.0 == app.watch && self.watching.1 == app.ignore_watch {
            return;
        }
        self.watching = (app.watch.clone(), app.ignore_watch.clone(), None);
        if app.watch.is_empty() {
            logs::info("watch: off");
            return;
        }
        let tx = self.inputs_tx.clone();
        match crate::watch::start(
            &app.watch,
            &app.ignore_watch,
            move || {
                let _ = tx.send(Input::FilesChanged);
            },
            |w| logs::warn(&w),
        ) {
            Ok(w) => {
                let paths: Vec<String> =
                    app.watch.iter().map(|p| p.display().to_string()).collect();
                logs::info(&format!(
                    "watch: {} (a change reloads the app {} ms after the last one)",
                    paths.join(", "),
                    app.watch_delay.as_millis()
                ));
                self.watching.2 = Some(w);
            }
            Err(e) => logs::warn(&format!("watch: {e}; files are not watched")),
        }
    }

    fn publish(&mut self) {
        let mut snap = self.core.snapshot();
        snap.last_autopsy = self.last_autopsy.clone();
        snap.history = self.releases.view();
        for w in &mut snap.workers {
            w.node = w.generation.and_then(|g| self.releases.node_of(g));
        }
        self.published.send_if_modified(|old| {
            if *old == snap {
                false
            } else {
                *old = snap;
                true
            }
        });
    }
}

/// Answer `w`'s request for `address` on its channel, with the socket or
/// Node's error; `say`: the journal hears of it (the first of the requests
/// one bind answers).
fn answer_bind(
    procs: &HashMap<WorkerId, Proc>,
    address: &crate::ipc::SharedAddress,
    w: Waiter,
    answer: Result<&crate::sockets::Listener, &crate::shared::Refused>,
    say: bool,
) {
    let Waiter { pid, index, id, .. } = w;
    let Some(channel) = procs.get(&w.worker).and_then(|p| p.ipc.as_ref()) else {
        return;
    };
    let sent = match answer {
        Ok(listener) => {
            if say {
                logs::info(&format!(
                    "shared socket: {} {} bound on worker {index}'s request (pid {pid}); every worker listening there shares it",
                    listener.kind,
                    // The worker chose it: it may hold a newline.
                    logs::clean(&listener.address, 200)
                ));
            }
            match listener.fd.try_clone() {
                Ok(fd) => channel.send(ipc::bound(id), Some(fd), outbox::Kind::Answer),
                Err(e) => channel.send(
                    ipc::bind_failed(id, address, &e),
                    None,
                    outbox::Kind::Answer,
                ),
            }
        }
        Err(refused) => {
            if say && !refused.said {
                logs::warn(&format!(
                    "worker {index} (pid {pid}) asked to listen on {address}: refused: {}",
                    refused.why
                ));
            }
            channel.send(
                ipc::bind_failed(id, address, &refused.error),
                None,
                outbox::Kind::Answer,
            )
        }
    };
    if !sent {
        logs::warn(&format!(
            "could not answer worker {index} (pid {pid}) on its IPC channel: it is gone, or it reads nothing"
        ));
    }
}

fn log(line: LogLine) {
    let priority = match line.level {
        Level::Info => Priority::Info,
        Level::Notice => Priority::Notice,
        Level::Warning => Priority::Warning,
        Level::Error => Priority::Error,
    };
    let extra: Vec<(&str, String)> = line.event.map(logs::Milestone::field).into_iter().collect();
    match line.worker {
        Some((index, pid)) => logs::worker_event(priority, index, pid, &line.text, &extra),
        None => logs::event(priority, &line.text, &extra),
    }
}
