//! Operations: the first start, reload, scale, restart and stop.
//!
//! One operation runs at a time. Requests that arrive meanwhile wait in a
//! queue, in order; a reload asked for while another is already waiting
//! joins it (one reload answers both callers), and more than
//! [`MAX_QUEUED`](super::policy::MAX_QUEUED) waiting requests are refused as
//! busy. Bad arguments are refused at once, before queueing.

// Sans-IO: see clippy.toml.
#![deny(clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::time::Duration;

use super::core::Core;
use super::events::{Effect, Level, NewConfig, ReplyId, SdNotify, WorkerId};
use super::policy::{LEAVE_BOUND, MAX_QUEUED, SAME_STOP};
use super::state::{Op, Phase, Queued, Role, Slot, StartKind, SwapReason, WState};
use super::timers::TimerKey;
use crate::config::MAX_INSTANCES;
use crate::config::canary::{Canary, ReloadStrategy};
use crate::control::{BusSignal, Control, CtlError, CtlResult, Done, ScaleTarget};
use crate::logs::Milestone;

impl Core {
    pub(super) fn submit(
        &mut self,
        what: Control,
        reply: Option<ReplyId>,
        config: Option<Box<NewConfig>>,
    ) {
        // Not an operation: it changes what the health endpoint says, at once.
        if matches!(what, Control::Drain | Control::Undrain) {
            return self.drain_request(what, reply);
        }
        if self.phase == Phase::Stopping || self.draining_for_stop() {
            self.reply_opt(reply, Err(stopping()));
            return;
        }
        // The driver turns a canary reload into a configuration marked
        // `canary`; as a bare request it is a reload.
        let what = if matches!(what, Control::ReloadCanary | Control::Rollback(_)) {
            Control::Reload
        } else {
            what
        };
        // The capture in place is a task of this program, which a re-exec
        // would leave behind with its worker out of rotation.
        if what == Control::Reexec && self.resuming.is_some() {
            let msg = "a diagnosis with --then resume runs (its worker is out of rotation); re-exec once it is done";
            self.reply_opt(reply, Err(CtlError::Busy(msg.to_string())));
            return;
        }
        if let Control::Scale(ScaleTarget::To(n)) = what
            && !(1..=i64::from(MAX_INSTANCES)).contains(&n)
        {
            let msg = format!(
                "cannot scale to {n}: the number of workers must be between 1 and {MAX_INSTANCES}"
            );
            self.reply_opt(reply, Err(CtlError::InvalidArgument(msg)));
            return;
        }
        if let Control::Diagnose(d) = &what
            && let Err(e) = self.check_diagnosis(d)
        {
            self.reply_opt(reply, Err(e));
            return;
        }
        if let Some(Op::Reexec { replies, checked }) = &mut self.op {
            if what == Control::Reexec && !*checked {
                replies.extend(reply);
                return;
            }
            let msg = "the manager is re-executing itself; ask again in a moment".to_string();
            match reply {
                Some(r) => self.reply(r, Err(CtlError::Busy(msg))),
                None => self.log(Level::Warning, format!("request dropped: {msg}")),
            }
            return;
        }
        if what == Control::Reexec
            && let Some(Queued::Reexec(replies)) = self.queue.back_mut()
        {
            replies.extend(reply);
            return;
        }
        if what == Control::Reload
            && let Some(Queued::Reload {
                replies,
                config: queued,
            }) = self.queue.back_mut()
        {
            replies.extend(reply);
            if let Some(mut c) = config {
                // Asked for with --canary by either: judged by a canary.
                c.canary |= queued.as_ref().is_some_and(|q| q.canary);
                *queued = Some(c);
            }
            self.log(
                Level::Info,
                "reload requested: joins the reload already waiting".into(),
            );
            return;
        }
        if self.queue.len() >= MAX_QUEUED {
            let msg = format!(
                "{MAX_QUEUED} requests are already waiting for the running operation; try again once they are done"
            );
            self.reply_opt(reply, Err(CtlError::Busy(msg)));
            return;
        }
        if let Some(running) = self.op_name() {
            let asked = match what {
                Control::Reload | Control::ReloadCanary | Control::Rollback(_) => "reload",
                Control::Restart => "restart",
                Control::Scale(_) => "scale",
                Control::Reexec => "re-exec",
                Control::Drain | Control::Undrain => return self.drain_request(what, reply),
                Control::Diagnose(_) => "diagnose",
            };
            self.log(
                Level::Info,
                format!("{asked} requested: waits for the running {running}"),
            );
        }
        if matches!(what, Control::Scale(_)) {
            self.autoscale_pin();
        }
        self.queue.push_back(match what {
            Control::Reload | Control::ReloadCanary | Control::Rollback(_) => Queued::Reload {
                replies: reply.into_iter().collect(),
                config,
            },
            Control::Restart => Queued::Restart(reply),
            Control::Scale(target) => Queued::Scale(target, reply),
            Control::Reexec => Queued::Reexec(reply.into_iter().collect()),
            Control::Drain | Control::Undrain => return self.drain_request(what, reply),
            Control::Diagnose(d) => Queued::Diagnose(d, reply),
        });
    }

    /// The running operation, in a word.
    fn op_name(&self) -> Option<&'static str> {
        match &self.op {
            Some(Op::Start { kind, .. }) => Some(kind.name()),
            Some(Op::Reload { .. }) => Some("reload"),
            Some(Op::Reexec { .. }) => Some("re-exec"),
            None => None,
        }
    }

    pub(super) fn reply_opt(&mut self, reply: Option<ReplyId>, result: CtlResult) {
        if let Some(r) = reply {
            self.reply(r, result);
        }
    }

    /// Move operations forward: finish the current one if it is done, then
    /// start queued requests until one needs to wait.
    pub(super) fn progress(&mut self) {
        loop {
            self.pump_reload();
            self.finish_if_done();
            if self.op.is_some() || self.phase != Phase::Running {
                return;
            }
            // A re-exec waits for slots that go: their sockets are still
            // the driver's to close.
            if matches!(self.queue.front(), Some(Queued::Reexec(_))) && !self.leaving.is_empty() {
                return;
            }
            let Some(next) = self.queue.pop_front() else {
                return;
            };
            self.begin(next);
        }
    }

    fn begin(&mut self, q: Queued) {
        match q {
            Queued::Reload { replies, config } => {
                self.autoscale_unpin();
                let next = config.map(|c| self.read_config(*c));
                // Slots a smaller `instances` drops are not swapped: they
                // go once the swap succeeded (see `commit_config`).
                let stay = next
                    .as_ref()
                    .map_or(self.slots.len() as u32, |n| n.policy.instances)
                    .min(self.slots.len() as u32);
                // The reload is judged by the rules it brings.
                let policy = next.as_ref().map_or(&self.policy, |n| &n.policy);
                let canary = (next.as_ref().is_some_and(|n| n.canary)
                    || policy.reload_strategy == ReloadStrategy::Canary)
                    .then_some(policy.canary);
                self.begin_reload(
                    (0..stay).collect(),
                    replies,
                    next,
                    SwapReason::Reload,
                    canary,
                );
            }
            Queued::ReloadSlots(slots, reason) => {
                let slots: Vec<u32> = slots
                    .into_iter()
                    .filter(|i| (*i as usize) < self.slots.len())
                    .collect();
                if !slots.is_empty() {
                    self.begin_reload(slots, Vec::new(), None, reason, None);
                }
            }
            Queued::Restart(reply) => self.begin_restart(reply),
            Queued::Diagnose(d, reply) => self.begin_diagnose(d, reply),
            Queued::Scale(target, reply) => self.begin_scale(target, reply),
            Queued::Reexec(replies) => {
                self.log_event(
                    Level::Notice,
                    "re-exec requested: checking the new program first".into(),
                    Milestone::ReexecRequested,
                );
                self.op = Some(Op::Reexec {
                    replies,
                    checked: false,
                });
                self.out.push(Effect::CheckExec);
            }
        }
    }

    /// The new program was checked. Refused: say why, and go on as before.
    /// Accepted: answer the callers now (this process cannot answer once it
    /// has exec'd), tell systemd, refuse what still waits, and exec.
    pub(super) fn on_exec_checked(&mut self, result: Result<String, String>) {
        let Some(Op::Reexec { replies, checked }) = &mut self.op else {
            return;
        };
        if *checked {
            return;
        }
        match result {
            Err(why) => {
                let replies = std::mem::take(replies);
                self.op = None;
                let msg = format!("re-exec refused: {why}; the manager runs on unchanged");
                self.log_event(Level::Error, msg.clone(), Milestone::ReexecRefused);
                for r in replies {
                    self.reply(r, Err(CtlError::Failed(msg.clone())));
                }
            }
            Ok(what) => {
                *checked = true;
                let replies = std::mem::take(replies);
                let msg = format!("re-executing into {what}; the workers keep running");
                self.log_event(Level::Notice, msg.clone(), Milestone::Reexec);
                let done = Done {
                    workers: self.slots.len() as i32,
                    message: msg,
                };
                for r in replies {
                    self.reply(r, Ok(done.clone()));
                }
                // Callers waiting behind it would never hear back: the
                // process that holds their calls is about to be replaced.
                let busy = || {
                    CtlError::Busy(
                        "the manager re-executed itself before this request ran; ask again".into(),
                    )
                };
                let mut kept = std::collections::VecDeque::new();
                for q in std::mem::take(&mut self.queue) {
                    let waiting: Vec<ReplyId> = match q {
                        Queued::ReloadSlots(..) => {
                            kept.push_back(q);
                            continue;
                        }
                        Queued::Reload { replies, .. } | Queued::Reexec(replies) => replies,
                        Queued::Restart(r) | Queued::Scale(_, r) | Queued::Diagnose(_, r) => {
                            r.into_iter().collect()
                        }
                    };
                    for r in waiting {
                        self.reply(r, Err(busy()));
                    }
                }
                self.queue = kept;
                self.notify(SdNotify::Reloading("re-executing the manager".into()));
                self.out.push(Effect::Exec);
            }
        }
    }

    /// `execve` failed after the callers were told it would happen.
    pub(super) fn on_exec_failed(&mut self, why: String) {
        if !matches!(self.op, Some(Op::Reexec { .. })) {
            return;
        }
        self.op = None;
        self.log_event(
            Level::Error,
            format!("re-exec failed: {why}; the manager runs on unchanged"),
            Milestone::ReexecFailed,
        );
        self.notify_ready();
    }

    /// Whether the driver should exec now: a checked re-exec is still wanted
    /// (a stop since then cancels it).
    pub fn exec_due(&self) -> bool {
        self.phase == Phase::Running && matches!(self.op, Some(Op::Reexec { checked: true, .. }))
    }

    /// A configuration read anew for a reload that begins now. It is not
    /// in force yet: the reload's replacements run it, everything else
    /// (restarts for any cause, scaling) the configuration in force, until
    /// the swap succeeded ([`Core::commit_config`]).
    fn read_config(&mut self, mut config: NewConfig) -> Box<NewConfig> {
        if let Some(a) = config.policy.autoscale {
            // The count autoscaling reached stays, within the new bounds.
            config.policy.instances = (self.slots.len() as u32).clamp(a.min, a.max);
        } else if !config.resize {
            config.policy.instances = self.slots.len() as u32;
        }
        // systemd's watchdog is the manager's, not the app's.
        config.policy.watchdog = self.policy.watchdog;
        self.log(
            Level::Info,
            format!(
                "configuration read: {}; it takes effect once every worker is swapped",
                config.summary
            ),
        );
        Box::new(config)
    }

    /// Every replacement of a reload that brought a configuration is
    /// ready: that configuration is in force from now on. Fewer instances:
    /// the highest slots go now (they were not swapped); more: they are
    /// added next, under it.
    fn commit_config(&mut self) {
        let Some(Op::Reload { next, .. }) = &mut self.op else {
            return;
        };
        let Some(config) = next.take() else {
            return;
        };
        let NewConfig {
            policy,
            generation,
            summary,
            ..
        } = *config;
        self.log_event(
            Level::Notice,
            format!("configuration reloaded: {summary}"),
            Milestone::ConfigReloaded,
        );
        if (policy.max_memory_restart.is_some() || policy.max_memory.is_some())
            && !self.timers.is_armed(TimerKey::MemoryCheck)
        {
            self.timers.arm(
                TimerKey::MemoryCheck,
                self.now + super::policy::MEMORY_CHECK_EVERY,
            );
        }
        let cron_changed = policy.cron_restart != self.policy.cron_restart;
        let autoscale_changed = policy.autoscale != self.policy.autoscale;
        self.policy = policy;
        if autoscale_changed {
            self.autoscale_follow_policy();
        }
        self.generation = generation;
        if cron_changed {
            self.schedule_cron(None);
        }
        let dropped = self.shrink_to(
            self.policy.instances,
            "scaled down by the new configuration",
        );
        // The workers of slots the new configuration dropped are old code
        // too: the reload answers once they are gone.
        if let Some(Op::Reload { draining, .. }) = &mut self.op {
            draining.extend(dropped);
        }
    }

    /// Drop the highest slots until `n` remain; their workers drain.
    /// Returns the workers asked to stop.
    ///
    /// With sockets of its own (`balance: reuseport`), a slot's socket is
    /// first taken out of the kernel's picking and its workers stop only
    /// once its accept queue is empty (or after [`LEAVE_BOUND`]): stopped
    /// at once, the connections queued for it would be reset.
    fn shrink_to(&mut self, n: u32, why: &str) -> Vec<WorkerId> {
        let mut stopped = Vec::new();
        while self.slots.len() as u32 > n {
            let index = self.slots.len() as u32 - 1;
            let Some(slot) = self.slots.pop() else { break };
            self.timers.cancel(TimerKey::Restart(index));
            let ids: Vec<WorkerId> = [slot.current, slot.incoming]
                .into_iter()
                .flatten()
                .collect();
            stopped.extend(ids.iter().copied());
            if self.policy.per_slot_sockets {
                let leave = self.next_leave;
                self.next_leave += 1;
                self.out.push(Effect::DrainSlot { leave, index });
                self.timers
                    .arm(TimerKey::Leave(leave), self.now + LEAVE_BOUND);
                self.leaving.insert(leave, ids);
                continue;
            }
            self.out.push(Effect::ReleaseSlotSockets(index));
            for id in ids {
                self.stop_worker(id, why);
            }
        }
        stopped
    }

    /// A slot that goes has an empty accept queue (`drained`), or ran out of
    /// time: its workers stop now, and its sockets close once they are gone.
    pub(super) fn finish_leave(&mut self, leave: u64, drained: bool) {
        let Some(ids) = self.leaving.remove(&leave) else {
            return;
        };
        self.timers.cancel(TimerKey::Leave(leave));
        if !drained {
            self.log(
                Level::Warning,
                format!(
                    "a slot that goes still had connections queued after {} ms: stopping its worker anyway",
                    LEAVE_BOUND.as_millis()
                ),
            );
        }
        for id in &ids {
            self.stop_worker(*id, "scaled down");
        }
        self.out.push(Effect::CloseLeaving {
            leave,
            workers: ids,
        });
    }

    pub(super) fn begin_reload(
        &mut self,
        slots: Vec<u32>,
        replies: Vec<ReplyId>,
        next: Option<Box<NewConfig>>,
        reason: SwapReason,
        canary: Option<Canary>,
    ) {
        let slots: Vec<u32> = slots
            .into_iter()
            .filter(|i| (*i as usize) < self.slots.len())
            .collect();
        let total = slots.len();
        let parallel = next
            .as_ref()
            .map_or(&self.policy, |n| &n.policy)
            .reload_parallel;
        self.log_event(
            Level::Notice,
            format!("reload begun: {total} worker(s), {parallel} at a time"),
            Milestone::ReloadBegun,
        );
        let status = format!("reloading 0/{total}");
        self.last_status = status.clone();
        self.notify(SdNotify::Reloading(status));
        let grow_to = match &next {
            Some(n) => n.policy.instances,
            None => self.slots.len() as u32,
        };
        let summary = next.as_ref().map(|n| n.summary.clone());
        // A canary needs a baseline beside it: two slots at least.
        let canary = match canary {
            Some(_) if slots.len() < 2 => {
                self.log(
                    Level::Notice,
                    "canary reload: a canary needs a baseline beside it, so at least 2 workers; swapping the only one as a rolling reload does".into(),
                );
                None
            }
            c => c,
        };
        let (pending, judged) = match canary {
            Some(settings) => (Vec::new(), Some((slots, settings))),
            None => (slots, None),
        };
        self.op = Some(Op::Reload {
            pending: pending.into_iter().collect(),
            in_flight: BTreeSet::new(),
            total,
            done: 0,
            replies,
            started: self.now,
            grow_to,
            growing: BTreeSet::new(),
            draining: BTreeSet::new(),
            failed: Vec::new(),
            next,
            summary,
            reason,
            canary: None,
        });
        if let Some((slots, settings)) = judged {
            self.begin_canary(slots[0], slots[1], slots[1..].to_vec(), settings);
        }
    }

    /// Start replacements while fewer than `reload_parallel` are in flight.
    fn pump_reload(&mut self) {
        self.canary_step();
        if self.canary_holds() {
            return;
        }
        loop {
            let Some(Op::Reload {
                pending,
                in_flight,
                next,
                ..
            }) = &mut self.op
            else {
                return;
            };
            // The swap runs by the rules of the configuration it brings.
            let policy = next.as_ref().map_or(&self.policy, |n| &n.policy);
            let parallel = policy.reload_parallel as usize;
            // Each swap may take listen_timeout plus kill_timeout: tell systemd.
            let extend = policy.listen_timeout + policy.kill_timeout + Duration::from_secs(5);
            if in_flight.len() >= parallel {
                return;
            }
            let Some(index) = pending.pop_front() else {
                if in_flight.is_empty() {
                    self.commit_config();
                }
                self.grow_after_swap();
                return;
            };
            if index as usize >= self.slots.len() {
                continue;
            }
            in_flight.insert(index);
            self.notify(SdNotify::ExtendTimeout(extend));
            self.spawn(index, Role::Incoming);
        }
    }

    /// Once every slot is swapped, add the slots a new configuration asks for.
    fn grow_after_swap(&mut self) {
        let Some(Op::Reload {
            in_flight, grow_to, ..
        }) = &self.op
        else {
            return;
        };
        if !in_flight.is_empty() || *grow_to as usize <= self.slots.len() {
            return;
        }
        let (have, want) = (self.slots.len() as u32, *grow_to);
        self.log_event(
            Level::Notice,
            format!("scale: {have} → {want} workers (new configuration)"),
            Milestone::Scale,
        );
        for index in have..want {
            self.slots.push(Slot::default());
            self.start_current(index);
            if let Some(Op::Reload { growing, .. }) = &mut self.op {
                growing.insert(index);
            }
        }
    }

    /// A replacement failed: stop the reload there; the old workers keep serving.
    pub(super) fn fail_reload(&mut self, reason: String) {
        if !matches!(self.op, Some(Op::Reload { .. })) {
            return;
        }
        let canary_left = self.canary_left_serving();
        let Some(Op::Reload {
            in_flight,
            replies,
            started,
            ..
        }) = self.op.take()
        else {
            return;
        };
        self.counters.reloads_failed += 1;
        self.counters.last_reload_ms =
            self.now.saturating_duration_since(started).as_millis() as u64;
        // Every other replacement still starting goes too.
        for &index in &in_flight {
            let Some(id) = self
                .slots
                .get_mut(index as usize)
                .and_then(|s| s.incoming.take())
            else {
                continue;
            };
            self.kill_worker(id, "reload failed elsewhere");
            if let Some(w) = self.workers.get_mut(&id) {
                w.state = WState::Stopping;
            }
            self.timers.cancel(TimerKey::Ready(id));
        }
        for index in in_flight {
            self.incoming_gone(index);
        }
        if let Some(slot) = canary_left {
            // Its rollback failed (or it never got judged): its slot is
            // swapped to the configuration in force next, the same way.
            self.queue
                .push_front(Queued::ReloadSlots(vec![slot], SwapReason::Reload));
        }
        let msg = format!("reload failed: {reason}; the previous workers keep serving");
        self.log_event(Level::Error, msg.clone(), Milestone::ReloadFailed);
        self.bus(BusSignal::ReloadFinished {
            ok: false,
            message: msg.clone(),
        });
        self.notify_ready();
        for r in replies {
            self.reply(r, Err(CtlError::ReloadFailed(msg.clone())));
        }
    }

    fn begin_restart(&mut self, reply: Option<ReplyId>) {
        self.log(
            Level::Info,
            "restart: stopping every worker and starting a fresh set".into(),
        );
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
            slot.history = Default::default();
            slot.errored = None;
            slot.stopped = None;
            self.start_current(index);
        }
        self.op = Some(Op::Start {
            kind: StartKind::Restart,
            waiting: (0..n).collect(),
            failed: Vec::new(),
            replies: reply.into_iter().collect(),
        });
    }

    fn begin_scale(&mut self, target: ScaleTarget, reply: Option<ReplyId>) {
        let done = |workers: u32, message: String| -> CtlResult {
            Ok(Done {
                workers: workers as i32,
                message,
            })
        };
        let have = self.slots.len() as i64;
        let want = match target {
            ScaleTarget::To(n) => n,
            ScaleTarget::By(d) => have.saturating_add(d),
        };
        if !(1..=i64::from(MAX_INSTANCES)).contains(&want) {
            let msg = format!(
                "cannot scale from {have} to {want}: the number of workers must be between 1 and {MAX_INSTANCES}"
            );
            self.reply_opt(reply, Err(CtlError::InvalidArgument(msg)));
            return;
        }
        let (have, want) = (have as u32, want as u32);
        self.counters.scale_events += 1;
        self.log_event(
            Level::Notice,
            format!("scale: {have} → {want} workers"),
            Milestone::Scale,
        );
        // Slots stopped on purpose (autostart off, stop_exit_codes) that the
        // new count covers are wanted again.
        let revived: Vec<u32> = (0..want.min(have))
            .filter(|&i| {
                let s = &self.slots[i as usize];
                s.stopped.is_some() && s.current.is_none() && s.incoming.is_none()
            })
            .collect();
        for &index in &revived {
            self.slots[index as usize].stopped = None;
            self.start_current(index);
        }
        if want <= have && revived.is_empty() {
            // Highest slots go first; their workers drain, requests in flight finish.
            let _ = self.shrink_to(want, "scaled down");
            self.reply_opt(
                reply,
                done(want, format!("scaled from {have} to {want} workers")),
            );
            return;
        }
        let _ = self.shrink_to(want, "scaled down");
        for index in have..want {
            self.slots.push(Slot::default());
            self.start_current(index);
        }
        self.op = Some(Op::Start {
            kind: StartKind::Scale,
            waiting: revived.into_iter().chain(have..want).collect(),
            failed: Vec::new(),
            replies: reply.into_iter().collect(),
        });
    }

    fn finish_if_done(&mut self) {
        // A worker leaves the table only by an exit or a failed spawn; either
        // way it drains no more.
        if let Some(Op::Reload { draining, .. }) = &mut self.op {
            draining.retain(|id| self.workers.contains_key(id));
        }
        let rolled_back = self.canary_rolled_back();
        let held = self.canary_holds();
        let done = match &self.op {
            None | Some(Op::Reexec { .. }) => return,
            Some(Op::Start { waiting, .. }) => self.settled(waiting),
            Some(Op::Reload {
                pending,
                in_flight,
                grow_to,
                growing,
                draining,
                ..
            }) => {
                pending.is_empty()
                    && in_flight.is_empty()
                    && draining.is_empty()
                    && (rolled_back.is_some()
                        || (!held && self.slots.len() as u32 >= *grow_to && self.settled(growing)))
            }
        };
        if !done {
            return;
        }
        match self.op.take() {
            Some(Op::Start {
                kind,
                failed,
                replies,
                ..
            }) => {
                if kind == StartKind::Start && !self.ready_sent {
                    self.ready_sent = true;
                    self.notify_ready();
                    let text = format!(
                        "{} — {} worker(s) up",
                        self.status_line(),
                        self.ready_count()
                    );
                    self.log(Level::Info, text);
                }
                let n = self.slots.len() as u32;
                let result = if failed.is_empty() {
                    Ok(Done {
                        workers: n as i32,
                        message: format!("{}: {n} worker(s) ready", kind.name()),
                    })
                } else {
                    Err(CtlError::Failed(format!(
                        "{}: {}",
                        kind.name(),
                        failed.join("; ")
                    )))
                };
                for r in replies {
                    self.reply(r, result.clone());
                }
            }
            Some(Op::Reload {
                replies, started, ..
            }) if rolled_back.is_some() => {
                let took = self.now.saturating_duration_since(started).as_millis();
                self.counters.last_reload_ms = took as u64;
                self.counters.reloads_rolled_back += 1;
                let msg = format!(
                    "reload rolled back: {}; every worker runs the configuration in force",
                    rolled_back.unwrap_or_default()
                );
                self.log_event(Level::Error, msg.clone(), Milestone::ReloadRolledBack);
                self.bus(BusSignal::ReloadFinished {
                    ok: false,
                    message: msg.clone(),
                });
                self.notify_ready();
                for r in replies {
                    self.reply(r, Err(CtlError::ReloadFailed(msg.clone())));
                }
            }
            Some(Op::Reload {
                total,
                done,
                replies,
                started,
                failed,
                summary,
                reason,
                ..
            }) => {
                if let Some(answer) = self.diagnosis_answer(reason) {
                    let result = answer
                        .map(|path| Done {
                            workers: self.slots.len() as i32,
                            message: path,
                        })
                        .map_err(CtlError::Failed);
                    self.notify_ready();
                    for r in replies {
                        self.reply(r, result.clone());
                    }
                    return;
                }
                let took = self.now.saturating_duration_since(started).as_millis();
                self.counters.last_reload_ms = took as u64;
                let mut msg =
                    format!("reload finished: {done}/{total} worker(s) replaced in {took} ms");
                if let Some(s) = &summary {
                    msg.push_str(&format!("; {s}"));
                }
                let result = if failed.is_empty() {
                    self.counters.reloads_ok += 1;
                    Ok(Done {
                        workers: self.slots.len() as i32,
                        message: msg.clone(),
                    })
                } else {
                    self.counters.reloads_failed += 1;
                    msg.push_str(&format!("; adding workers failed: {}", failed.join("; ")));
                    Err(CtlError::Failed(msg.clone()))
                };
                self.log_event(Level::Notice, msg.clone(), Milestone::ReloadFinished);
                self.bus(BusSignal::ReloadFinished {
                    ok: result.is_ok(),
                    message: msg,
                });
                self.notify_ready();
                for r in replies {
                    self.reply(r, result.clone());
                }
            }
            None | Some(Op::Reexec { .. }) => {}
        }
    }

    /// Every slot in `slots` has a ready worker, has errored, or is gone.
    fn settled(&self, slots: &BTreeSet<u32>) -> bool {
        slots.iter().all(|&i| {
            self.slots.get(i as usize).is_none_or(|s| {
                s.errored.is_some()
                    || (s.stopped.is_some() && s.current.is_none())
                    || s.current
                        .and_then(|id| self.workers.get(&id))
                        .is_some_and(|w| w.state == WState::Ready)
            })
        })
    }

    /// `READY=1` with the current status (after the first start or a reload).
    fn notify_ready(&mut self) {
        let status = self.status_line();
        self.last_status = status.clone();
        self.notify(SdNotify::Ready(status));
    }

    /// Stop every worker and, once they are gone, exit with `code`.
    pub(super) fn begin_stop(&mut self, code: i32) {
        if self.phase == Phase::Stopping {
            // One stop often arrives twice: `timeout` and a terminal's
            // Ctrl-C reach the manager and a wrapper that forwards it.
            // Within the window it is the same stop, still graceful.
            if self
                .stop_began
                .is_some_and(|t| self.now.saturating_duration_since(t) < SAME_STOP)
            {
                self.log(
                    Level::Info,
                    format!(
                        "stop requested again within {} ms: the same stop, still graceful (again after that to kill every worker now)",
                        SAME_STOP.as_millis()
                    ),
                );
                return;
            }
            // A second stop request: no more waiting.
            self.log(
                Level::Warning,
                "stop requested again: killing every worker now".into(),
            );
            let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
            for id in ids {
                self.kill_worker(id, "second stop request");
            }
            return;
        }
        self.phase = Phase::Stopping;
        self.stop_began = Some(self.now);
        self.exit_code = code;
        self.log(
            Level::Info,
            format!("stopping {} worker(s)", self.workers.len()),
        );
        self.notify(SdNotify::Stopping("stopping".into()));
        self.notify(SdNotify::ExtendTimeout(
            self.policy.kill_timeout + Duration::from_secs(5),
        ));
        let replies: Vec<ReplyId> = match self.op.take() {
            Some(Op::Start { replies, .. })
            | Some(Op::Reload { replies, .. })
            | Some(Op::Reexec { replies, .. }) => replies,
            None => Vec::new(),
        };
        for r in replies {
            self.reply(r, Err(stopping()));
        }
        for q in std::mem::take(&mut self.queue) {
            let waiting: Vec<ReplyId> = match q {
                Queued::Reload { replies, .. } | Queued::Reexec(replies) => replies,
                Queued::Restart(r) | Queued::Scale(_, r) | Queued::Diagnose(_, r) => {
                    r.into_iter().collect()
                }
                Queued::ReloadSlots(..) => Vec::new(),
            };
            for r in waiting {
                self.reply(r, Err(stopping()));
            }
        }
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.stop_worker(id, "manager stopping");
        }
        for index in 0..self.slots.len() as u32 {
            self.timers.cancel(TimerKey::Restart(index));
            let slot = &mut self.slots[index as usize];
            slot.current = None;
            slot.incoming = None;
            slot.waiting = false;
        }
        self.timers.cancel(TimerKey::MemoryCheck);
        self.timers.cancel(TimerKey::Cron);
        self.timers.cancel(TimerKey::Watch);
        self.cron_next = None;
        for leave in std::mem::take(&mut self.leaving).into_keys() {
            self.timers.cancel(TimerKey::Leave(leave));
        }
    }
}

fn stopping() -> CtlError {
    CtlError::Stopping("the manager is stopping".into())
}
