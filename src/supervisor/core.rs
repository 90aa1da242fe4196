//! The supervisor's core: the whole lifecycle as a state machine that
//! decides and never does.
//!
//! Events go in ([`Core::handle`], [`Core::handle_timeout`]), the state moves,
//! and a list of [`Effect`]s comes out for the driver to carry out: start a
//! worker, signal one, tell systemd, log, answer a caller. The core owns no
//! process, fd, task or clock; time is the `now` it is given, and its timers
//! are deadlines it hands back ([`Core::next_deadline`]). So every rule here
//! — crash policy, backoff, the rolling swap, queued and coalesced requests,
//! scaling — is unit-tested with a fake launcher and a virtual clock
//! (`supervisor/tests.rs`), and the integration tests keep to what needs real
//! processes.
//!
//! Operations (start, reload, scale, restart) are in `ops.rs`, what the
//! outside may read in `report.rs`; both are more `impl Core`.

// Sans-IO: see clippy.toml.
#![deny(clippy::disallowed_methods)]

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::events::{
    AutopsyWhy, Effect, Event, ExitStatus, Level, LogLine, ReplyId, Said, SdNotify, StopBy,
    WorkerId,
};
use super::policy::{self, Decision, Policy};
use super::state::{Op, Phase, Queued, Role, Slot, StartKind, SwapReason, WState, Worker};
use super::timers::{TimerKey, Timers};
use crate::control::{BusSignal, Control, CtlResult};
use crate::logs::Milestone;

/// The supervisor's state; see the module documentation.
pub struct Core {
    pub(super) policy: Policy,
    /// The configuration generation new workers are started with.
    pub(super) generation: u64,
    pub(super) slots: Vec<Slot>,
    pub(super) workers: BTreeMap<WorkerId, Worker>,
    pub(super) next_worker: u64,
    pub(super) phase: Phase,
    pub(super) op: Option<Op>,
    pub(super) queue: VecDeque<Queued>,
    pub(super) timers: Timers,
    pub(super) ready_sent: bool,
    pub(super) counters: crate::control::Counters,
    pub(super) last_status: String,
    pub(super) exit_code: i32,
    /// When stopping began: a second stop soon after is the same one.
    pub(super) stop_began: Option<Instant>,
    pub(super) last_stranger_warning: Option<Instant>,
    /// Workers of slots that go, waiting for their queues to empty, by leave.
    pub(super) leaving: BTreeMap<u64, Vec<WorkerId>>,
    pub(super) next_leave: u64,
    /// The highest total of keep-alive connections lately, and when.
    pub(super) share_peak: Option<(u32, Instant)>,
    /// The fair share last worked out (None: one worker, or rebalance off).
    pub(super) share_fair: Option<u32>,
    /// When `cron_restart` runs next, on the wall clock (ms since the
    /// epoch), as the driver worked it out; its deadline is `TimerKey::Cron`.
    pub(super) cron_next: Option<u64>,
    /// The health endpoint says "drain", and since when (see `drain.rs`).
    pub(super) drain: Option<(super::state::Drain, Instant)>,
    /// The running `Diagnose`: what it captures, and once captured, the
    /// file or why not.
    pub(super) diagnosis: Option<(crate::control::Capture, Option<Result<String, String>>)>,
    /// Memory checks in a row each worker was under memory pressure.
    pub(super) pressed: BTreeMap<WorkerId, u32>,
    /// The worker a `Diagnose --then resume` captures in place, and who
    /// waits for the answer.
    pub(super) resuming: Option<(WorkerId, Option<ReplyId>)>,
    /// A worker count that follows the load (`instances: {min, max}`);
    /// see `scaling.rs`.
    pub(super) autoscaler: Option<super::autoscale::Autoscaler>,
    pub(super) out: Vec<Effect>,
    pub(super) now: Instant,
}

impl Core {
    pub fn new(policy: Policy, now: Instant) -> Core {
        Core {
            policy,
            generation: 0,
            slots: Vec::new(),
            workers: BTreeMap::new(),
            next_worker: 1,
            phase: Phase::Running,
            op: None,
            queue: VecDeque::new(),
            timers: Timers::default(),
            ready_sent: false,
            counters: Default::default(),
            last_status: String::new(),
            exit_code: 0,
            stop_began: None,
            last_stranger_warning: None,
            leaving: BTreeMap::new(),
            next_leave: 1,
            share_peak: None,
            share_fair: None,
            cron_next: None,
            drain: None,
            diagnosis: None,
            pressed: BTreeMap::new(),
            resuming: None,
            autoscaler: None,
            out: Vec::new(),
            now,
        }
    }

    /// The policy in force (a reload's new one is not, until its swap succeeded).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The configuration generation in force: every worker but a running
    /// reload's replacements is started with it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The generations the driver must still be able to start workers
    /// with: the one in force, a running reload's, and a waiting reload's.
    pub fn generations_wanted(&self) -> Vec<u64> {
        let mut wanted = vec![self.generation];
        if let Some(Op::Reload { next: Some(n), .. }) = &self.op {
            wanted.push(n.generation);
        }
        for q in &self.queue {
            if let Queued::Reload {
                config: Some(c), ..
            } = q
            {
                wanted.push(c.generation);
            }
        }
        wanted
    }

    /// The policy worker `id` lives by: a running reload's replacements
    /// (started with its generation) by the new one, every other worker by
    /// the policy in force.
    pub(super) fn policy_of(&self, id: WorkerId) -> &Policy {
        if let Some(Op::Reload { next: Some(n), .. }) = &self.op
            && self
                .workers
                .get(&id)
                .is_some_and(|w| w.generation == n.generation)
        {
            return &n.policy;
        }
        &self.policy
    }

    /// The first start: `instances` workers, then `READY=1` once all are ready.
    pub fn start(&mut self, now: Instant) -> Vec<Effect> {
        self.now = now;
        if let Some(interval) = self.policy.watchdog {
            self.timers.arm(TimerKey::Watchdog, now + interval / 2);
        }
        if self.policy.max_memory_restart.is_some() || self.policy.max_memory.is_some() {
            self.timers
                .arm(TimerKey::MemoryCheck, now + policy::MEMORY_CHECK_EVERY);
        }
        self.schedule_cron(None);
        self.autoscale_follow_policy();
        let n = self.policy.instances;
        self.slots = (0..n).map(|_| Slot::default()).collect();
        let autostart = self.policy.autostart;
        if autostart {
            for index in 0..n {
                self.start_current(index);
            }
        } else {
            for slot in &mut self.slots {
                slot.stopped = Some("autostart is off".into());
            }
            self.log(
                Level::Notice,
                format!(
                    "autostart is off: no worker started; `nodeherd restart` starts all {n}, `nodeherd scale N` the first N"
                ),
            );
        }
        self.op = Some(Op::Start {
            kind: StartKind::Start,
            waiting: if autostart {
                (0..n).collect()
            } else {
                Default::default()
            },
            failed: Vec::new(),
            replies: Vec::new(),
        });
        self.settle()
    }

    /// React to one event.
    pub fn handle(&mut self, now: Instant, ev: Event) -> Vec<Effect> {
        self.now = now;
        match ev {
            Event::Spawned { worker, pid, ipc } => self.on_spawned(worker, pid, ipc),
            Event::SpawnFailed { worker, error } => self.on_spawn_failed(worker, error),
            Event::OomKilled { worker, words } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.oom = Some(words);
                }
            }
            Event::Exited { worker, status } => self.on_exit(worker, status),
            Event::Said { worker, said } => match said {
                Said::Ready => self.mark_ready(worker, "sent 'ready'"),
                Said::Listening if !self.policy_of(worker).wait_ready => {
                    self.mark_ready(worker, "listening")
                }
                Said::Listening => {}
                Said::ListenError(e) => {
                    if let Some(w) = self.workers.get_mut(&worker) {
                        w.listen_error = Some(e);
                    }
                }
                Said::Beat {
                    delay_ms,
                    elu_permille,
                    outcomes,
                } => {
                    self.on_beat(worker, delay_ms);
                    if let Some(w) = self.workers.get_mut(&worker) {
                        w.elu_permille = elu_permille;
                    }
                    self.canary_beat(worker, delay_ms);
                    if let Some(o) = outcomes {
                        self.on_outcomes(worker, *o);
                    }
                }
                Said::Connections { open } => self.on_connections(worker, open),
                Said::Closed => self.on_closed(worker),
            },
            Event::Notify {
                worker,
                ready,
                status,
            } => self.on_notify(worker, ready, status),
            Event::NotifyFromStranger { pid } => self.on_stranger(pid),
            Event::Flooding { worker } => self.on_flooding(worker),
            Event::MemorySample(samples) => self.on_memory_sample(samples),
            Event::PressureSample(samples) => self.on_pressure_sample(samples),
            Event::LoadSample {
                queued,
                unit_memory_max,
            } => self.on_load_sample(queued, unit_memory_max),
            Event::Request { what, reply } => self.submit(what, reply, None),
            Event::Reconfigure { config, reply } => {
                self.submit(Control::Reload, reply, Some(config))
            }
            Event::ReloadRefused => self.counters.reloads_refused += 1,
            Event::ExecChecked(result) => self.on_exec_checked(result),
            Event::ExecFailed(why) => self.on_exec_failed(why),
            Event::SlotDrained(leave) => self.finish_leave(leave, true),
            Event::CronScheduled(next) => self.on_cron_scheduled(next),
            Event::FilesChanged => self.on_files_changed(),
            Event::Diagnosed { worker, result } => self.on_diagnosed(worker, result),
            Event::Stop => self.on_stop(),
        }
        self.settle()
    }

    /// Fire every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Effect> {
        self.now = now;
        for key in self.timers.expired(now) {
            self.on_timer(key);
        }
        self.settle()
    }

    /// When [`Core::handle_timeout`] is next due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// The exit status, once stopping has ended with every worker gone.
    pub fn finished(&self) -> Option<i32> {
        (self.phase == Phase::Stopping && self.workers.is_empty()).then_some(self.exit_code)
    }

    /// Move operations on and report the status; hand the effects over.
    fn settle(&mut self) -> Vec<Effect> {
        self.progress();
        self.update_status();
        self.share_out();
        std::mem::take(&mut self.out)
    }

    // ---- effects ------------------------------------------------------------

    pub(super) fn log(&mut self, level: Level, text: String) {
        self.out.push(Effect::Log(LogLine {
            level,
            text,
            worker: None,
            event: None,
        }));
    }

    pub(super) fn log_event(&mut self, level: Level, text: String, event: Milestone) {
        self.out.push(Effect::Log(LogLine {
            level,
            text,
            worker: None,
            event: Some(event),
        }));
    }

    pub(super) fn log_worker(&mut self, level: Level, index: u32, pid: i32, text: String) {
        self.out.push(Effect::Log(LogLine {
            level,
            text,
            worker: Some((index, pid)),
            event: None,
        }));
    }

    pub(super) fn notify(&mut self, n: SdNotify) {
        self.out.push(Effect::Notify(n));
    }

    pub(super) fn reply(&mut self, reply: ReplyId, result: CtlResult) {
        self.out.push(Effect::Reply { reply, result });
    }

    pub(super) fn bus(&mut self, s: BusSignal) {
        self.out.push(Effect::Bus(s));
    }

    pub(super) fn worker_signal(&mut self, instance: u32, pid: i32, state: &'static str) {
        self.bus(BusSignal::WorkerStateChanged {
            instance,
            pid: pid.max(0) as u32,
            state,
        });
    }

    // ---- workers ------------------------------------------------------------

    /// Ask the driver for a worker in slot `index`, as its current worker or
    /// (during a reload) its incoming replacement.
    pub(super) fn spawn(&mut self, index: u32, role: Role) -> WorkerId {
        // A reload's replacement runs the configuration the reload brings;
        // every other worker the one in force.
        let generation = match (&self.op, role) {
            (Some(Op::Reload { next: Some(n), .. }), Role::Incoming) => n.generation,
            _ => self.generation,
        };
        self.spawn_as(index, role, generation)
    }

    /// [`Core::spawn`] with the configuration `generation` (a canary's
    /// baseline, or its rollback, runs the one in force during a reload).
    pub(super) fn spawn_as(&mut self, index: u32, role: Role, generation: u64) -> WorkerId {
        let id = WorkerId(self.next_worker);
        self.next_worker += 1;
        self.workers.insert(
            id,
            Worker {
                index,
                generation,
                pid: 0,
                state: WState::Starting,
                started: self.now,
                ipc: false,
                killed_because: None,
                listen_error: None,
                status_text: None,
                loop_delay_ms: None,
                elu_permille: None,
                beating: false,
                hung: false,
                closed: false,
                conns: Default::default(),
                outcomes: None,
                outcomes_refused: false,
                oom: None,
            },
        );
        let slot = &mut self.slots[index as usize];
        match role {
            Role::Current => slot.current = Some(id),
            Role::Incoming => slot.incoming = Some(id),
        }
        self.out.push(Effect::Spawn {
            worker: id,
            index,
            generation,
        });
        id
    }

    fn on_spawned(&mut self, id: WorkerId, pid: i32, ipc: bool) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.pid = pid;
        w.ipc = ipc;
        let index = w.index;
        let stopping = w.state == WState::Stopping;
        self.log_worker(
            Level::Info,
            index,
            pid,
            format!("worker {index} started (pid {pid})"),
        );
        self.worker_signal(index, pid, "starting");
        if stopping {
            // Given up on before it was even started (a reload failed meanwhile).
            return;
        }
        let policy = self.policy_of(id);
        if policy.reports_readiness {
            let deadline = self.now + policy.listen_timeout;
            self.timers.arm(TimerKey::Ready(id), deadline);
        } else {
            // A worker with no way to report readiness is ready once started.
            self.mark_ready(id, "started");
        }
    }

    fn on_spawn_failed(&mut self, id: WorkerId, error: String) {
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        let index = w.index;
        self.log(Level::Error, format!("worker {index}: {error}"));
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        if slot.incoming == Some(id) {
            slot.incoming = None;
            self.fail_reload(format!("slot {index}: the new worker could not be started"));
        } else if slot.current == Some(id) {
            slot.current = None;
            self.after_crash(index, Duration::ZERO, "could not be started".into());
        }
    }

    /// Start the serving worker of a slot (first start, crash restart, scale up).
    pub(super) fn start_current(&mut self, index: u32) {
        self.timers.cancel(TimerKey::Restart(index));
        let slot = &mut self.slots[index as usize];
        slot.waiting = false;
        if let Some(old) = slot.current.take() {
            // Callers only start an empty slot; should one not be, its worker goes.
            self.stop_worker(old, "slot restarted");
        }
        self.spawn(index, Role::Current);
    }

    pub(super) fn mark_ready(&mut self, id: WorkerId, why: &str) {
        let now = self.now;
        let max_delay = self.policy_of(id).max_event_loop_delay;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.state != WState::Starting {
            return;
        }
        w.state = WState::Ready;
        let (index, pid) = (w.index, w.pid);
        let took = now.saturating_duration_since(w.started);
        self.timers.cancel(TimerKey::Ready(id));
        if let Some(max) = max_delay
            && w.beating
        {
            self.timers.arm(TimerKey::Hang(id), now + max);
        }
        self.log_worker(
            Level::Info,
            index,
            pid,
            format!(
                "worker {index} ready (pid {pid}, {why}, {} ms)",
                took.as_millis()
            ),
        );
        self.worker_signal(index, pid, "ready");
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        if slot.incoming == Some(id) {
            // The swap: the replacement serves, then the old one drains.
            slot.incoming = None;
            let old = slot.current.replace(id);
            let old = old.filter(|o| self.workers.contains_key(o));
            let slot = &mut self.slots[index as usize];
            slot.errored = None;
            slot.stopped = None;
            slot.waiting = false;
            self.timers.cancel(TimerKey::Restart(index));
            let diagnosing = self.diagnosing();
            if let Some(old) = old {
                if diagnosing {
                    self.diagnose_worker(old);
                } else {
                    self.stop_worker(old, "replaced");
                }
            }
            if let Some(Op::Reload {
                in_flight,
                done,
                reason,
                draining,
                ..
            }) = &mut self.op
            {
                in_flight.remove(&index);
                *done += 1;
                draining.extend(old);
                let r = &mut self.slots[index as usize].replaced;
                match reason {
                    SwapReason::Reload | SwapReason::Cron | SwapReason::Watch => r.reload += 1,
                    SwapReason::Memory => r.memory += 1,
                    SwapReason::MemoryPressure => r.memory_pressure += 1,
                    SwapReason::Hang => r.hang += 1,
                    SwapReason::Closed | SwapReason::Flood | SwapReason::Diagnose => {}
                }
            }
        } else if slot.current == Some(id) {
            slot.errored = None;
        }
    }

    fn on_notify(&mut self, id: WorkerId, ready: bool, status: Option<String>) {
        if let Some(text) = status
            && let Some(w) = self.workers.get_mut(&id)
        {
            let (index, pid) = (w.index, w.pid);
            w.status_text = Some(text.clone());
            self.log_worker(
                Level::Info,
                index,
                pid,
                format!("worker {index} status: {text}"),
            );
        }
        if ready {
            self.mark_ready(id, "READY=1");
        }
    }

    fn on_stranger(&mut self, pid: i32) {
        // Said at most once a second, so a flood cannot flood the journal too.
        let now = self.now;
        if self
            .last_stranger_warning
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.last_stranger_warning = Some(now);
            self.log(
                Level::Warning,
                format!("ignored a notify message from pid {pid}, which is not one of our workers"),
            );
        }
    }

    /// Ask a worker to stop: SIGINT or the `'shutdown'` message, then SIGKILL after `kill_timeout`.
    pub(super) fn stop_worker(&mut self, id: WorkerId, why: &str) {
        let policy = self.policy_of(id);
        let (by_message, kill_timeout) = (policy.shutdown_with_message, policy.kill_timeout);
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.state == WState::Stopping {
            return;
        }
        w.state = WState::Stopping;
        let (index, pid) = (w.index, w.pid);
        let by = if by_message && w.ipc {
            StopBy::Message
        } else {
            StopBy::Signal
        };
        self.timers.cancel(TimerKey::Ready(id));
        self.timers.cancel(TimerKey::Hang(id));
        self.out.push(Effect::Stop { worker: id, by });
        self.log(
            Level::Info,
            format!(
                "worker {index} stopping (pid {pid}, {why}; {})",
                match by {
                    StopBy::Message => "sent 'shutdown'",
                    StopBy::Signal => "sent SIGINT",
                }
            ),
        );
        self.worker_signal(index, pid, "stopping");
        self.timers.arm(TimerKey::Kill(id), self.now + kill_timeout);
    }

    /// Kill a worker and its process group now.
    pub(super) fn kill_worker(&mut self, id: WorkerId, because: &str) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.killed_because.get_or_insert_with(|| because.to_string());
            self.out.push(Effect::Kill { worker: id });
        }
    }

    fn on_exit(&mut self, id: WorkerId, status: ExitStatus) {
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        self.timers.cancel(TimerKey::Ready(id));
        self.timers.cancel(TimerKey::Kill(id));
        self.timers.cancel(TimerKey::Hang(id));
        let (index, pid) = (w.index, w.pid);
        let uptime = self.now.saturating_duration_since(w.started);
        let cause = match (&w.oom, &w.killed_because, &w.listen_error) {
            (Some(o), _, _) => format!("{o}; {status}"),
            (None, Some(k), _) => format!("{k}; {status}"),
            (None, None, Some(e)) => format!("{status}: {e}"),
            (None, None, None) => status.to_string(),
        };
        if let Some(words) = &w.oom {
            self.log_worker(
                Level::Warning,
                index,
                pid,
                format!("worker {index} (pid {pid}) {words}"),
            );
        }
        self.worker_signal(index, pid, "exited");
        if let Some(Op::Reload { draining, .. }) = &mut self.op {
            draining.remove(&id);
        }
        if w.state == WState::Stopping {
            self.log_worker(
                Level::Info,
                index,
                pid,
                format!("worker {index} stopped (pid {pid}, {status})"),
            );
            return;
        }
        self.log_worker(
            Level::Warning,
            index,
            pid,
            format!(
                "worker {index} exited unexpectedly (pid {pid}, {cause}, up {} ms)",
                uptime.as_millis()
            ),
        );
        self.canary_exited(id, index, &cause);
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        if slot.incoming == Some(id) {
            slot.incoming = None;
            self.fail_reload(format!(
                "slot {index}: the new worker (pid {pid}) {cause} before it was ready"
            ));
            return;
        }
        if slot.current != Some(id) {
            return;
        }
        slot.current = None;
        slot.last_exit = Some(if w.oom.is_some() {
            "oom-killed"
        } else {
            "crashed"
        });
        if w.oom.is_some() {
            slot.replaced.oom += 1;
        }
        if self.phase == Phase::Stopping || slot.incoming.is_some() {
            // Stopping anyway, or a reload is already bringing this slot's replacement up.
            return;
        }
        if let ExitStatus::Code(code) = status
            && self.policy.stop_exit_codes.contains(&code)
        {
            self.stop_on_purpose(index, pid, code);
            return;
        }
        self.after_crash(index, uptime, cause);
    }

    /// Decide what happens to a slot whose worker died: restart (now or later) or errored.
    pub(super) fn after_crash(&mut self, index: u32, uptime: Duration, cause: String) {
        // A first start, scale or restart stops waiting for this slot: it
        // settles as failed, so the operation (and READY=1) never hangs on a
        // slot that crash-loops below max_restarts.
        if let Some(
            Op::Start {
                waiting, failed, ..
            }
            | Op::Reload {
                growing: waiting,
                failed,
                ..
            },
        ) = &mut self.op
            && waiting.remove(&index)
        {
            failed.push(format!("slot {index}: {cause}"));
        }
        if self.phase == Phase::Stopping {
            return;
        }
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        match policy::after_crash(&self.policy, &mut slot.history, uptime, &cause) {
            Decision::Errored(why) => {
                slot.errored = Some(why);
                self.report_errored(index);
            }
            Decision::Restart(delay) => {
                slot.restarts += 1;
                if delay.is_zero() {
                    self.start_current(index);
                } else {
                    slot.waiting = true;
                    self.timers.arm(TimerKey::Restart(index), self.now + delay);
                    self.log(
                        Level::Info,
                        format!("worker {index} restarts in {} ms", delay.as_millis()),
                    );
                }
            }
        }
    }

    /// A slot lost its replacement (a failed reload): make sure it still has
    /// a worker, since its current one may have died meanwhile.
    pub(super) fn incoming_gone(&mut self, index: u32) {
        let Some(slot) = self.slots.get(index as usize) else {
            return;
        };
        let empty = slot.current.is_none()
            && slot.incoming.is_none()
            && !slot.waiting
            && slot.errored.is_none()
            && slot.stopped.is_none();
        if empty && self.phase == Phase::Running {
            self.log(
                Level::Warning,
                format!("slot {index} has no worker left: starting one"),
            );
            self.start_current(index);
        }
    }

    fn report_errored(&mut self, index: u32) {
        let reason = self.slots[index as usize]
            .errored
            .clone()
            .unwrap_or_default();
        self.log(
            Level::Error,
            format!("slot {index} errored, not restarting it: {reason}"),
        );
        self.out.push(Effect::ReleaseSlotSockets(index));
        self.worker_signal(index, 0, "errored");
        if self.slots.iter().all(|s| s.errored.is_some()) && self.phase == Phase::Running {
            self.log(
                Level::Error,
                "every slot errored: nothing is serving; stopping".into(),
            );
            self.begin_stop(1);
        }
    }

    fn on_timer(&mut self, key: TimerKey) {
        match key {
            TimerKey::Ready(id) => self.on_ready_deadline(id),
            TimerKey::Hang(id) => self.on_hang(id),
            TimerKey::Kill(id) => {
                let Some(w) = self.workers.get(&id) else {
                    return;
                };
                if w.state != WState::Stopping {
                    return;
                }
                let text = format!(
                    "worker {} (pid {}) did not stop within kill_timeout ({} ms): SIGKILL",
                    w.index,
                    w.pid,
                    self.policy_of(id).kill_timeout.as_millis()
                );
                self.log(Level::Warning, text);
                self.kill_worker(id, "killed after kill_timeout");
            }
            TimerKey::Leave(leave) => self.finish_leave(leave, false),
            TimerKey::Canary => self.on_canary_timer(),
            TimerKey::Autoscale => self.on_autoscale_timer(),
            TimerKey::Cron => self.on_cron(),
            TimerKey::Watch => self.reload_running_slots(
                SwapReason::Watch,
                format!(
                    "files changed under watch and have been quiet for watch_delay ({} ms)",
                    self.policy.watch_delay.as_millis()
                ),
            ),
            // The shares are worked out again as every event settles.
            TimerKey::Share => self.share_peak = None,
            TimerKey::DrainStop => self.drained_for_stop(),
            TimerKey::Restart(index) => {
                let due = self
                    .slots
                    .get(index as usize)
                    .is_some_and(|s| s.waiting && s.current.is_none());
                if due && self.phase == Phase::Running {
                    self.start_current(index);
                }
            }
            TimerKey::Watchdog => {
                self.notify(SdNotify::Watchdog);
                if let Some(interval) = self.policy.watchdog {
                    self.timers.arm(TimerKey::Watchdog, self.now + interval / 2);
                }
            }
            TimerKey::MemoryCheck => {
                self.timers
                    .arm(TimerKey::MemoryCheck, self.now + policy::MEMORY_CHECK_EVERY);
                if self.phase != Phase::Running
                    || (self.policy.max_memory_restart.is_none()
                        && self.policy.max_memory.is_none())
                {
                    return;
                }
                if self.op.is_some() {
                    // During a canary's soak, the canary is watched.
                    if self.policy.max_memory_restart.is_some()
                        && let Some(id) = self.canary_to_sample()
                    {
                        self.out.push(Effect::SampleMemory(vec![id]));
                    }
                    return;
                }
                let ids: Vec<WorkerId> = self.ready_current().collect();
                if !ids.is_empty() {
                    self.out.push(Effect::SampleMemory(ids));
                }
            }
        }
    }

    /// A heartbeat: the worker's event loop runs. With
    /// `max_event_loop_delay`, the next one must come within it.
    /// The app closed its listening servers but runs on. The shared queue
    /// needs nothing (the others take it). With a socket per slot, new
    /// connections are steered to the other slots at once (see
    /// `serving_slots`), and the worker is replaced the zero-downtime way:
    /// what reached the slot's own queue before the steering changed waits
    /// for a worker that accepts, and only a new one will.
    fn on_closed(&mut self, id: WorkerId) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.closed || w.state == WState::Stopping {
            return;
        }
        w.closed = true;
        let (index, pid) = (w.index, w.pid);
        let replace = self.policy.per_slot_sockets
            && self.phase == Phase::Running
            && self
                .slots
                .get(index as usize)
                .is_some_and(|s| s.current == Some(id));
        self.log_worker(
            Level::Warning,
            index,
            pid,
            if replace {
                format!(
                    "worker {index} (pid {pid}) closed its listening socket and runs on: it gets no new connection, and is replaced without downtime for what its socket holds"
                )
            } else {
                format!(
                    "worker {index} (pid {pid}) closed its listening socket and runs on: the other workers take its connections"
                )
            },
        );
        if replace {
            self.queue
                .push_back(Queued::ReloadSlots(vec![index], SwapReason::Closed));
        }
    }

    fn on_beat(&mut self, id: WorkerId, delay_ms: u32) {
        let max_delay = self.policy_of(id).max_event_loop_delay;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.loop_delay_ms = Some(delay_ms);
        w.beating = true;
        if let Some(max) = max_delay
            && w.state == WState::Ready
            && !w.hung
            && self.resuming.is_none_or(|(r, _)| r != id)
        {
            self.timers.arm(TimerKey::Hang(id), self.now + max);
        }
    }

    /// No heartbeat for `max_event_loop_delay`: the event loop is stuck (an
    /// endless loop, a synchronous call that never returns). The worker
    /// keeps its socket but answers nothing; replace it the zero-downtime
    /// way, the new one first (the stuck one ignores SIGINT and is killed
    /// after kill_timeout).
    fn on_hang(&mut self, id: WorkerId) {
        let Some(max) = self.policy_of(id).max_event_loop_delay else {
            return;
        };
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let current = self
            .slots
            .get(w.index as usize)
            .is_some_and(|s| s.current == Some(id));
        if w.state != WState::Ready || w.hung || !current || self.phase != Phase::Running {
            return;
        }
        // Captured in place: its loop stops for the capture, on purpose.
        if self.resuming.is_some_and(|(r, _)| r == id) {
            return;
        }
        w.hung = true;
        let (index, pid) = (w.index, w.pid);
        if self.canary_hung(id, max) {
            return;
        }
        self.log_worker(
            Level::Warning,
            index,
            pid,
            format!(
                "worker {index} (pid {pid}) has not answered for {} ms (max_event_loop_delay): its event loop is stuck; replacing it without downtime",
                max.as_millis()
            ),
        );
        self.out.push(Effect::Autopsy {
            worker: id,
            index,
            pid,
            why: AutopsyWhy::Hang,
            within: self.policy_of(id).app.kill_timeout,
        });
        self.queue
            .push_back(Queued::ReloadSlots(vec![index], SwapReason::Hang));
    }

    fn on_ready_deadline(&mut self, id: WorkerId) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        if w.state != WState::Starting {
            return;
        }
        let (index, pid) = (w.index, w.pid);
        let is_incoming = self
            .slots
            .get(index as usize)
            .is_some_and(|s| s.incoming == Some(id));
        let policy = self.policy_of(id);
        let (wait_ready, listen_timeout) = (policy.wait_ready, policy.listen_timeout);
        if policy.listen_optional {
            // No socket was handed over, so not listening is no failure: an
            // app that has no port is ready once it has had its chance.
            self.log_worker(
                Level::Info,
                index,
                pid,
                format!(
                    "worker {index} (pid {pid}) did not listen within listen_timeout ({} ms): taken as ready (an app without a port needs none)",
                    listen_timeout.as_millis()
                ),
            );
            self.mark_ready(id, "listen_timeout passed");
            return;
        }
        if wait_ready && !is_incoming {
            // As PM2: outside a reload, a worker that has not said 'ready'
            // by listen_timeout is taken as ready (apps copy `wait_ready`
            // from PM2's docs and never send it, or boot slowly). A reload's
            // replacement still has to say it, or the reload fails closed.
            self.log_worker(
                Level::Warning,
                index,
                pid,
                format!(
                    "worker {index} (pid {pid}) sent no 'ready' (nor READY=1) within listen_timeout ({} ms): taken as ready, as PM2 does; a reload still waits for it",
                    listen_timeout.as_millis()
                ),
            );
            self.mark_ready(id, "listen_timeout passed");
            return;
        }
        let why = format!(
            "not ready within listen_timeout ({} ms{})",
            listen_timeout.as_millis(),
            if wait_ready {
                ", waiting for 'ready' or READY=1"
            } else {
                ", waiting for it to listen"
            }
        );
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

    fn on_memory_sample(&mut self, samples: Vec<(WorkerId, u64)>) {
        let Some(limit) = self.policy.max_memory_restart else {
            return;
        };
        if self.phase != Phase::Running {
            return;
        }
        if self.op.is_some() {
            self.canary_memory(&samples);
            return;
        }
        let over: Vec<(WorkerId, u32, i32)> = samples
            .into_iter()
            .filter(|(_, rss)| *rss > limit)
            .filter_map(|(id, _)| {
                let w = self.workers.get(&id)?;
                let current = self.slots.get(w.index as usize)?.current == Some(id);
                (current && w.state == WState::Ready).then_some((id, w.index, w.pid))
            })
            .collect();
        if self.policy.app.autopsy_on_memory {
            for &(worker, index, pid) in &over {
                self.out.push(Effect::Autopsy {
                    worker,
                    index,
                    pid,
                    why: AutopsyWhy::Memory,
                    within: self.policy.app.kill_timeout,
                });
            }
        }
        let over: Vec<u32> = over.into_iter().map(|(_, index, _)| index).collect();
        if !over.is_empty() {
            self.log(
                Level::Warning,
                format!(
                    "worker(s) {over:?} use more than max_memory_restart ({} MiB): replacing them without downtime",
                    limit >> 20
                ),
            );
            self.queue
                .push_back(Queued::ReloadSlots(over, SwapReason::Memory));
        }
    }

    /// A worker whose cgroup stays under memory pressure for
    /// `PRESSURE_CHECKS` checks in a row is close to its `max_memory`: it is
    /// replaced the zero-downtime way before the kernel OOM-kills it.
    fn on_pressure_sample(&mut self, samples: Vec<(WorkerId, f64)>) {
        if self.policy.max_memory.is_none() || self.phase != Phase::Running {
            return;
        }
        // Only workers sampled now keep a count: one gone or relieved starts over.
        let before = std::mem::take(&mut self.pressed);
        let mut due = Vec::new();
        for (id, some_avg10) in samples {
            if some_avg10 < policy::PRESSURE_LIMIT {
                continue;
            }
            let n = before.get(&id).copied().unwrap_or(0) + 1;
            let Some(w) = self.workers.get(&id) else {
                continue;
            };
            let current = self
                .slots
                .get(w.index as usize)
                .is_some_and(|s| s.current == Some(id));
            if !current || w.state != WState::Ready {
                continue;
            }
            if n >= policy::PRESSURE_CHECKS {
                due.push((w.index, some_avg10));
            } else {
                self.pressed.insert(id, n);
            }
        }
        if due.is_empty() || self.op.is_some() {
            return;
        }
        let slots: Vec<u32> = due.iter().map(|(i, _)| *i).collect();
        let worst = due.iter().map(|(_, p)| *p).fold(0.0, f64::max);
        self.log(
            Level::Warning,
            format!(
                "worker(s) {slots:?} in sustained memory pressure (up to {worst:.0}% of the last 10 s waiting on memory, {} checks in a row) near max_memory: replacing them without downtime (memory_pressure)",
                policy::PRESSURE_CHECKS
            ),
        );
        self.queue
            .push_back(Queued::ReloadSlots(slots, SwapReason::MemoryPressure));
    }

    /// A worker exited with one of `stop_exit_codes`: as PM2, its slot is
    /// not restarted. The app said it is done; the manager stays up (a
    /// restart, a reload or a scale that covers the slot starts it again).
    fn stop_on_purpose(&mut self, index: u32, pid: i32, code: i32) {
        if let Some(
            Op::Start { waiting, .. }
            | Op::Reload {
                growing: waiting, ..
            },
        ) = &mut self.op
        {
            waiting.remove(&index);
        }
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return;
        };
        slot.stopped = Some(format!("exited with code {code}, one of stop_exit_codes"));
        self.timers.cancel(TimerKey::Restart(index));
        self.log_worker(
            Level::Notice,
            index,
            pid,
            format!(
                "worker {index} exited with code {code}, one of stop_exit_codes: slot {index} stays stopped (`nodeherd restart` starts it again)"
            ),
        );
        self.out.push(Effect::ReleaseSlotSockets(index));
        self.worker_signal(index, 0, "stopped");
    }

    /// Ask the driver when `cron_restart` runs next (after the run made at
    /// `not_before`), if the configuration in force has one.
    pub(super) fn schedule_cron(&mut self, not_before: Option<u64>) {
        self.timers.cancel(TimerKey::Cron);
        self.cron_next = None;
        if self.phase != Phase::Running {
            return;
        }
        if let Some(pattern) = self.policy.cron_restart.clone() {
            self.out.push(Effect::ScheduleCron {
                pattern,
                not_before,
            });
        }
    }

    fn on_cron_scheduled(&mut self, next: Result<(Instant, u64), String>) {
        if self.phase != Phase::Running || self.policy.cron_restart.is_none() {
            return;
        }
        match next {
            Ok((at, unix_ms)) => {
                self.timers.arm(TimerKey::Cron, at);
                self.cron_next = Some(unix_ms);
            }
            Err(why) => {
                self.cron_next = None;
                self.log(
                    Level::Error,
                    format!("cron_restart: {why}; no scheduled reload"),
                );
            }
        }
    }

    /// `cron_restart` is due: reload every running worker the zero-downtime
    /// way (PM2 restarts them; its users ask for this), then ask for the next run.
    fn on_cron(&mut self) {
        let pattern = self.policy.cron_restart.clone().unwrap_or_default();
        let ran = self.cron_next;
        self.reload_running_slots(SwapReason::Cron, format!("cron_restart ({pattern}) is due"));
        self.schedule_cron(ran);
    }

    /// A file under `watch` changed: the reload waits until files have been
    /// quiet for `watch_delay`, so a burst of saves is one reload.
    fn on_files_changed(&mut self) {
        if self.phase != Phase::Running || self.policy.watch.is_empty() {
            return;
        }
        self.timers
            .arm(TimerKey::Watch, self.now + self.policy.watch_delay);
    }

    /// Swap every slot that runs (not those stopped on purpose) through the
    /// reload path, with the configuration in force; one such reload waits
    /// at a time.
    fn reload_running_slots(&mut self, reason: SwapReason, why: String) {
        if self.phase != Phase::Running {
            return;
        }
        let slots: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|i| self.slots[*i as usize].stopped.is_none())
            .collect();
        if slots.is_empty() {
            self.log(
                Level::Info,
                format!("{why}: no worker runs, nothing to reload"),
            );
            return;
        }
        if self
            .queue
            .iter()
            .any(|q| matches!(q, Queued::ReloadSlots(_, r) if *r == reason))
        {
            return;
        }
        self.log(
            Level::Notice,
            format!(
                "{why}: reloading {} worker(s) without downtime",
                slots.len()
            ),
        );
        self.queue.push_back(Queued::ReloadSlots(slots, reason));
    }
}
