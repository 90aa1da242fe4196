//! The lifecycle, unit-tested: the core driven by a fake launcher and a
//! virtual clock. No process is started and no time passes; each test reads
//! like the story it checks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::core::Core;
use super::events::{
    AutopsyWhy, Effect, Event, ExitStatus, NewConfig, ReplyId, Said, SdNotify, StopBy, WorkerId,
};
use super::policy::{MAX_QUEUED, Policy, test_policy, with};
use crate::control::{BusSignal, Capture, Control, CtlError, CtlResult, Diagnosis, ScaleTarget};

const MS: fn(u64) -> Duration = Duration::from_millis;

/// The fake world around the core: it "starts" processes (pid = 1000 + the
/// worker id), records every effect, and moves time only when told.
struct World {
    core: Core,
    now: Instant,
    /// Processes that run: worker → slot index.
    alive: BTreeMap<WorkerId, u32>,
    /// Every worker ever spawned, in order, with its slot.
    spawned: Vec<(WorkerId, u32)>,
    /// The configuration generation of each, in the same order.
    generations: Vec<u64>,
    /// Slots whose next spawn fails (the count says how many times).
    fail_spawns: BTreeMap<u32, u32>,
    /// Memory each slot's workers report.
    rss: BTreeMap<u32, u64>,
    /// Memory pressure (`some avg10`, %) each slot's workers' cgroups report.
    pressure: BTreeMap<u32, f64>,
    effects: Vec<Effect>,
    replies: BTreeMap<ReplyId, CtlResult>,
    next_reply: u64,
    /// Workers asked to stop exit at once, as an idle, well-behaved one
    /// does (otherwise a test makes them exit, or not, itself).
    obedient: bool,
}

fn pid(w: WorkerId) -> i32 {
    1000 + w.0 as i32
}

impl World {
    fn new(policy: Policy) -> World {
        let now = Instant::now();
        World {
            core: Core::new(policy, now),
            now,
            alive: BTreeMap::new(),
            spawned: Vec::new(),
            generations: Vec::new(),
            fail_spawns: BTreeMap::new(),
            rss: BTreeMap::new(),
            pressure: BTreeMap::new(),
            effects: Vec::new(),
            replies: BTreeMap::new(),
            next_reply: 1,
            obedient: false,
        }
    }

    /// A started world whose first workers are all ready, and stop at once when asked.
    fn obedient(policy: Policy) -> World {
        let mut w = World::ready(policy);
        w.obedient = true;
        w
    }

    /// A started world whose first workers are all ready.
    fn ready(policy: Policy) -> World {
        let mut w = World::new(policy);
        w.start();
        for id in w.starting() {
            w.listening(id);
        }
        assert_eq!(w.core.state_name(), "ready");
        w.effects.clear();
        w
    }

    fn start(&mut self) {
        let fx = self.core.start(self.now);
        self.run(fx);
    }

    fn send(&mut self, ev: Event) {
        let fx = self.core.handle(self.now, ev);
        self.run(fx);
    }

    fn run(&mut self, fx: Vec<Effect>) {
        let mut follow: VecDeque<Event> = VecDeque::new();
        let mut pending: VecDeque<Effect> = fx.into();
        loop {
            while let Some(e) = pending.pop_front() {
                match &e {
                    Effect::Spawn {
                        worker,
                        index,
                        generation,
                    } => {
                        let fail = self.fail_spawns.get_mut(index).filter(|n| **n > 0);
                        if let Some(n) = fail {
                            *n -= 1;
                            follow.push_back(Event::SpawnFailed {
                                worker: *worker,
                                error: "cannot start node: No such file or directory".into(),
                            });
                        } else {
                            self.alive.insert(*worker, *index);
                            self.spawned.push((*worker, *index));
                            self.generations.push(*generation);
                            follow.push_back(Event::Spawned {
                                worker: *worker,
                                pid: pid(*worker),
                                ipc: true,
                            });
                        }
                    }
                    Effect::SampleMemory(ids) => {
                        let sample = ids
                            .iter()
                            .map(|id| {
                                let slot = self.alive.get(id).copied().unwrap_or(u32::MAX);
                                (*id, self.rss.get(&slot).copied().unwrap_or(50 << 20))
                            })
                            .collect();
                        follow.push_back(Event::MemorySample(sample));
                        let pressure = ids
                            .iter()
                            .filter_map(|id| {
                                let slot = self.alive.get(id)?;
                                Some((*id, *self.pressure.get(slot)?))
                            })
                            .collect();
                        follow.push_back(Event::PressureSample(pressure));
                    }
                    Effect::Stop { worker, .. }
                        if self.obedient && self.alive.remove(worker).is_some() =>
                    {
                        follow.push_back(Event::Exited {
                            worker: *worker,
                            status: ExitStatus::Code(0),
                        });
                    }
                    Effect::Reply { reply, result } => {
                        assert!(
                            self.replies.insert(*reply, result.clone()).is_none(),
                            "{reply:?} answered twice"
                        );
                    }
                    _ => {}
                }
                self.effects.push(e);
            }
            let Some(ev) = follow.pop_front() else {
                return;
            };
            pending.extend(self.core.handle(self.now, ev));
        }
    }

    /// Let virtual time pass, firing every timer due on the way.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(at) = self.core.next_deadline().filter(|at| *at <= end) {
            self.now = self.now.max(at);
            let fx = self.core.handle_timeout(self.now);
            self.run(fx);
        }
        self.now = end;
    }

    fn listening(&mut self, w: WorkerId) {
        self.send(Event::Said {
            worker: w,
            said: Said::Listening,
        });
    }

    fn exit(&mut self, w: WorkerId, status: ExitStatus) {
        assert!(self.alive.remove(&w).is_some(), "{w:?} is not running");
        self.send(Event::Exited { worker: w, status });
    }

    fn crash(&mut self, w: WorkerId) {
        self.exit(w, ExitStatus::Code(1));
    }

    fn request(&mut self, what: Control) -> ReplyId {
        let r = ReplyId(self.next_reply);
        self.next_reply += 1;
        self.send(Event::Request {
            what,
            reply: Some(r),
        });
        r
    }

    /// A reload with a configuration read anew.
    fn reconfigure(&mut self, policy: Policy, generation: u64, summary: &str) -> ReplyId {
        let r = ReplyId(self.next_reply);
        self.next_reply += 1;
        self.send(Event::Reconfigure {
            config: Box::new(NewConfig {
                canary: false,
                resize: policy.instances != self.core.snapshot().instances,
                policy,
                generation,
                summary: summary.into(),
            }),
            reply: Some(r),
        });
        r
    }

    fn answer(&self, r: ReplyId) -> Option<&CtlResult> {
        self.replies.get(&r)
    }

    /// The worker count a successful answer gave.
    fn workers_after(&self, r: ReplyId) -> Option<i32> {
        match self.answer(r)? {
            Ok(done) => Some(done.workers),
            Err(e) => panic!("{r:?} failed: {e}"),
        }
    }

    /// Workers spawned and not yet ready or gone, oldest first.
    fn starting(&self) -> Vec<WorkerId> {
        let snap = self.core.snapshot();
        let mut ids: Vec<WorkerId> = snap
            .workers
            .iter()
            .filter(|w| w.state == "starting" && w.pid > 0)
            .map(|w| WorkerId((w.pid - 1000) as u64))
            .collect();
        ids.sort();
        ids
    }

    /// The serving worker of each slot (slots with none are left out).
    fn current(&self) -> BTreeMap<u32, WorkerId> {
        let snap = self.core.snapshot();
        let mut by_slot = BTreeMap::new();
        for w in &snap.workers {
            if w.pid > 0 && w.state != "stopping" && !by_slot.contains_key(&w.instance) {
                by_slot.insert(w.instance, WorkerId((w.pid - 1000) as u64));
            }
        }
        // The snapshot lists the current worker first for each slot (sorted by pid,
        // and a replacement always has a higher pid), so the first non-stopping one wins.
        by_slot
    }

    /// Workers asked to stop so far (gracefully), in order.
    fn stopped(&self) -> Vec<(WorkerId, StopBy)> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Stop { worker, by } => Some((*worker, *by)),
                _ => None,
            })
            .collect()
    }

    fn killed(&self) -> Vec<WorkerId> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Kill { worker } => Some(*worker),
                _ => None,
            })
            .collect()
    }

    /// Every worker asked to stop or killed exits now, as a well-behaved one would.
    fn obey(&mut self) {
        let told: BTreeSet<WorkerId> = self
            .stopped()
            .into_iter()
            .map(|(w, _)| w)
            .chain(self.killed())
            .collect();
        for w in told {
            if self.alive.contains_key(&w) {
                self.exit(w, ExitStatus::Code(0));
            }
        }
    }

    fn notes(&self) -> Vec<SdNotify> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Notify(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    fn logs(&self) -> String {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Log(l) => Some(l.text.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn spawns_since(&self, mark: usize) -> Vec<u32> {
        self.spawned[mark..].iter().map(|(_, i)| *i).collect()
    }
}

fn policy(instances: u32) -> Policy {
    Policy {
        instances,
        ..test_policy()
    }
}

// ---- first start --------------------------------------------------------------

#[test]
fn first_start_is_ready_once_every_worker_listens() {
    let mut w = World::new(policy(3));
    w.start();
    assert_eq!(w.spawns_since(0), vec![0, 1, 2]);
    assert_eq!(w.core.state_name(), "starting");
    assert_eq!(w.core.status_line(), "starting: 0/3 workers ready");
    let ids = w.starting();
    w.listening(ids[0]);
    w.listening(ids[1]);
    assert!(
        !w.notes().iter().any(|n| matches!(n, SdNotify::Ready(_))),
        "not ready with 2/3"
    );
    w.listening(ids[2]);
    let readies: Vec<SdNotify> = w
        .notes()
        .into_iter()
        .filter(|n| matches!(n, SdNotify::Ready(_)))
        .collect();
    assert_eq!(readies, vec![SdNotify::Ready("3/3 workers ready".into())]);
    assert_eq!(w.core.state_name(), "ready");
}

#[test]
fn with_wait_ready_listening_is_not_enough() {
    let mut w = World::new(with(policy(1), |p| p.wait_ready = true));
    w.start();
    let id = w.starting()[0];
    w.listening(id);
    assert_eq!(w.core.state_name(), "starting");
    w.send(Event::Said {
        worker: id,
        said: Said::Ready,
    });
    assert_eq!(w.core.state_name(), "ready");
    assert!(w.logs().contains("sent 'ready'"), "{}", w.logs());
}

#[test]
fn ready_on_the_notify_socket_and_its_status_text_is_kept() {
    let mut w = World::new(with(policy(1), |p| p.wait_ready = true));
    w.start();
    let id = w.starting()[0];
    w.send(Event::Notify {
        worker: id,
        ready: false,
        status: Some("warming caches".into()),
    });
    assert_eq!(
        w.core.snapshot().workers[0].status_text.as_deref(),
        Some("warming caches")
    );
    w.send(Event::Notify {
        worker: id,
        ready: true,
        status: None,
    });
    assert_eq!(w.core.state_name(), "ready");
    assert!(w.logs().contains("worker 0 status: warming caches"));
}

#[test]
fn a_worker_that_cannot_report_readiness_is_ready_once_started() {
    let mut w = World::new(with(policy(2), |p| p.reports_readiness = false));
    w.start();
    assert_eq!(w.core.state_name(), "ready");
}

#[test]
fn a_first_worker_not_ready_within_listen_timeout_is_killed_and_restarted() {
    let mut w = World::new(policy(1));
    w.start();
    let first = w.starting()[0];
    w.advance(MS(2999));
    assert!(w.killed().is_empty());
    w.advance(MS(1));
    assert_eq!(w.killed(), vec![first]);
    w.exit(first, ExitStatus::Signal(9));
    assert!(
        w.logs().contains(
            "not ready within listen_timeout (3000 ms, waiting for it to listen); killed by SIGKILL"
        ),
        "{}",
        w.logs()
    );
    assert_eq!(w.spawns_since(0), vec![0, 0], "restarted in the same slot");
}

#[test]
fn with_wait_ready_a_first_worker_silent_past_listen_timeout_is_taken_as_ready() {
    // As PM2 at start: `wait_ready` and no 'ready' within listen_timeout
    // means ready, with a warning; never a kill every listen_timeout.
    let mut w = World::new(with(policy(2), |p| p.wait_ready = true));
    w.start();
    let first = w.starting();
    for id in &first {
        w.listening(*id);
    }
    assert_eq!(w.core.state_name(), "starting", "listening is not ready");
    w.advance(MS(2999));
    assert_eq!(w.core.state_name(), "starting");
    w.advance(MS(1));
    assert!(w.killed().is_empty(), "{:?}", w.killed());
    assert_eq!(w.core.state_name(), "ready");
    assert!(
        w.notes().iter().any(|n| matches!(n, SdNotify::Ready(_))),
        "READY=1 sent: {:?}",
        w.notes()
    );
    assert!(
        w.logs().contains(
            "sent no 'ready' (nor READY=1) within listen_timeout (3000 ms): taken as ready"
        ),
        "{}",
        w.logs()
    );
    // A crash restart is a start too.
    w.crash(first[0]);
    let again = w.starting();
    assert_eq!(again.len(), 1);
    w.advance(MS(3000));
    assert!(w.killed().is_empty());
    assert_eq!(w.current()[&0], again[0]);

    // A reload's replacement must still say it: the reload fails closed.
    let old = w.current();
    let r = w.request(Control::Reload);
    let new = w.starting()[0];
    w.listening(new);
    w.advance(MS(3000));
    assert_eq!(w.killed(), vec![new]);
    match w.answer(r) {
        Some(Err(CtlError::ReloadFailed(m))) => assert!(m.contains("listen_timeout"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(w.current(), old);
}

#[test]
fn without_a_socket_a_worker_is_ready_at_its_first_listen_or_at_listen_timeout() {
    // No socket handed over (`run app.js -i 2` without --listen): ready
    // once its own port answers, so `start` returns when it does; an app
    // that never listens is ready at listen_timeout, never killed for it,
    // at start and in a reload alike.
    let mut w = World::new(with(policy(2), |p| p.listen_optional = true));
    w.start();
    let first = w.starting();
    assert_eq!(w.core.state_name(), "starting", "started is not ready");
    w.listening(first[0]);
    w.advance(MS(2999));
    assert_eq!(w.core.state_name(), "starting", "one worker still boots");
    w.advance(MS(1));
    assert!(w.killed().is_empty(), "{:?}", w.killed());
    assert_eq!(w.core.state_name(), "ready");
    assert!(
        w.logs()
            .contains("did not listen within listen_timeout (3000 ms): taken as ready"),
        "{}",
        w.logs()
    );
    let r = w.request(Control::Reload);
    let new = w.starting()[0];
    w.advance(MS(3000));
    assert!(w.killed().is_empty(), "{:?}", w.killed());
    assert_eq!(w.current()[&0], new, "the swap went on");
    let _ = r;
}

// ---- crashes ------------------------------------------------------------------

#[test]
fn a_crashed_worker_comes_back_in_its_slot_at_once() {
    let mut w = World::ready(policy(2));
    let before = w.current();
    let mark = w.spawned.len();
    w.crash(before[&1]);
    assert_eq!(w.spawns_since(mark), vec![1]);
    assert_eq!(w.core.snapshot().workers[1].restarts, 1);
    assert!(w.logs().contains("worker 1 exited unexpectedly"));
    assert_eq!(w.core.state_name(), "degraded");
    let new = w.starting()[0];
    w.listening(new);
    assert_eq!(w.core.state_name(), "ready");
}

#[test]
fn restart_delay_holds_the_restart_back_on_the_clock() {
    let mut w = World::ready(with(policy(1), |p| p.restart_delay = MS(500)));
    let mark = w.spawned.len();
    let id = w.current()[&0];
    w.crash(id);
    assert!(w.spawns_since(mark).is_empty());
    assert_eq!(w.core.snapshot().workers[0].state, "waiting");
    w.advance(MS(499));
    assert!(w.spawns_since(mark).is_empty());
    w.advance(MS(1));
    assert_eq!(w.spawns_since(mark), vec![0]);
}

#[test]
fn exponential_backoff_delays_grow_between_restarts() {
    let mut w = World::ready(with(policy(1), |p| p.exp_backoff_restart_delay = MS(100)));
    let mut delays = Vec::new();
    for _ in 0..4 {
        let id = w.current()[&0];
        w.crash(id);
        let crashed = w.now;
        let mark = w.spawned.len();
        while w.spawns_since(mark).is_empty() {
            w.advance(MS(1));
        }
        delays.push((w.now - crashed).as_millis());
        let new = w.starting()[0];
        w.listening(new);
    }
    assert_eq!(delays, vec![100, 150, 225, 338]);
}

#[test]
fn a_crash_looping_slot_ends_errored_while_the_others_serve() {
    let mut w = World::ready(with(policy(2), |p| p.max_restarts = 3));
    for _ in 0..4 {
        let id = w.current()[&1];
        w.crash(id);
    }
    let snap = w.core.snapshot();
    assert_eq!(snap.workers[1].state, "errored");
    assert_eq!(snap.workers[0].state, "ready");
    assert_eq!(w.core.status_line(), "1/2 workers ready; errored: slot 1");
    assert!(w.effects.contains(&Effect::ReleaseSlotSockets(1)));
    assert!(w.core.finished().is_none(), "the manager keeps running");
}

#[test]
fn when_every_slot_errors_the_manager_stops_with_status_1() {
    let mut w = World::ready(with(policy(2), |p| p.max_restarts = 0));
    let cur = w.current();
    w.crash(cur[&0]);
    w.crash(cur[&1]);
    assert!(w.logs().contains("every slot errored"));
    assert_eq!(w.core.finished(), Some(1));
}

#[test]
fn autorestart_off_leaves_the_slot_errored() {
    let mut w = World::ready(with(policy(2), |p| p.autorestart = false));
    let id = w.current()[&0];
    let mark = w.spawned.len();
    w.exit(id, ExitStatus::Code(0));
    assert!(w.spawns_since(mark).is_empty());
    assert_eq!(w.core.snapshot().workers[0].state, "errored");
}

#[test]
fn a_spawn_that_keeps_failing_ends_errored_without_a_hang() {
    let mut w = World::new(with(policy(2), |p| p.max_restarts = 2));
    w.fail_spawns.insert(1, 100);
    w.start();
    let id = w.starting()[0];
    w.listening(id);
    assert_eq!(w.core.snapshot().workers[1].state, "errored");
    // READY=1 still went out: the first start settled with one slot failed.
    assert!(
        w.notes().contains(&SdNotify::Ready(
            "1/2 workers ready; errored: slot 1".into()
        )),
        "{:?}",
        w.notes()
    );
}

// ---- reload -------------------------------------------------------------------

#[test]
fn reload_swaps_one_slot_at_a_time_and_answers_when_done() {
    let mut w = World::ready(policy(2));
    let old = w.current();
    let r = w.request(Control::Reload);
    assert!(
        w.notes()
            .iter()
            .any(|n| matches!(n, SdNotify::Reloading(_)))
    );
    assert_eq!(w.core.state_name(), "reloading");
    let new0 = w.starting();
    assert_eq!(new0.len(), 1, "one replacement at a time");
    assert!(
        w.stopped().is_empty(),
        "nothing stops before a replacement is ready"
    );
    w.listening(new0[0]);
    assert_eq!(w.stopped(), vec![(old[&0], StopBy::Signal)]);
    assert_eq!(w.core.status_line(), "reloading 1/2");
    let new1 = w.starting();
    w.listening(new1[0]);
    assert_eq!(
        w.stopped(),
        vec![(old[&0], StopBy::Signal), (old[&1], StopBy::Signal)]
    );
    assert_eq!(
        w.current(),
        BTreeMap::from([(0, new0[0]), (1, new1[0])]),
        "same indexes, new workers"
    );
    // The old workers drain: no answer, no READY=1 until they are gone.
    assert_eq!(w.answer(r), None);
    assert_eq!(w.core.state_name(), "reloading");
    w.advance(MS(40));
    w.exit(old[&0], ExitStatus::Code(0));
    assert_eq!(w.answer(r), None, "one old worker still drains");
    w.advance(MS(60));
    w.exit(old[&1], ExitStatus::Code(0));
    assert_eq!(w.workers_after(r), Some(2));
    assert!(
        w.notes()
            .contains(&SdNotify::Ready("2/2 workers ready".into()))
    );
    assert!(w.effects.contains(&Effect::Bus(BusSignal::ReloadFinished {
        ok: true,
        message: "reload finished: 2/2 worker(s) replaced in 100 ms".into()
    })));
    assert!(w.core.snapshot().workers.iter().all(|x| x.state == "ready"));
}

#[test]
fn a_drain_overlaps_the_next_swap_and_a_stuck_one_ends_at_kill_timeout() {
    let mut w = World::ready(policy(2));
    let old = w.current();
    let r = w.request(Control::Reload);
    w.listening(w.starting()[0]);
    // Slot 0's old worker drains while slot 1's replacement boots.
    assert_eq!(w.stopped(), vec![(old[&0], StopBy::Signal)]);
    assert_eq!(w.starting().len(), 1, "the next swap has begun");
    w.listening(w.starting()[0]);
    w.exit(old[&1], ExitStatus::Code(0));
    // Slot 0's old worker ignores SIGINT: killed at kill_timeout (1600 ms),
    // and only then does the reload answer.
    w.advance(MS(1599));
    assert_eq!(w.answer(r), None);
    w.advance(MS(1));
    assert_eq!(w.killed(), vec![old[&0]]);
    assert_eq!(w.answer(r), None);
    w.exit(old[&0], ExitStatus::Signal(9));
    assert_eq!(w.workers_after(r), Some(2));
}

#[test]
fn reload_parallel_swaps_that_many_at_once() {
    let mut w = World::obedient(with(policy(3), |p| p.reload_parallel = 2));
    let r = w.request(Control::Reload);
    assert_eq!(w.starting().len(), 2);
    let first = w.starting();
    w.listening(first[0]);
    assert_eq!(
        w.starting().len(),
        2,
        "the third starts as soon as one is done"
    );
    for id in w.starting() {
        w.listening(id);
    }
    assert_eq!(w.workers_after(r), Some(3));
}

#[test]
fn a_replacement_that_crashes_fails_the_reload_and_the_old_workers_serve_on() {
    let mut w = World::ready(policy(2));
    let old = w.current();
    let r = w.request(Control::Reload);
    let new = w.starting()[0];
    w.crash(new);
    match w.answer(r) {
        Some(Err(CtlError::ReloadFailed(m))) => {
            assert!(m.contains("slot 0"), "{m}");
            assert!(m.contains("the previous workers keep serving"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    assert!(w.stopped().is_empty(), "no old worker was asked to stop");
    assert_eq!(w.current(), old);
    assert_eq!(w.core.state_name(), "ready");
    assert!(w.starting().is_empty(), "no further replacement");
}

#[test]
fn a_replacement_not_ready_within_listen_timeout_fails_the_reload() {
    let mut w = World::ready(policy(2));
    let old = w.current();
    let r = w.request(Control::Reload);
    let new = w.starting()[0];
    w.advance(MS(3000));
    assert_eq!(w.killed(), vec![new]);
    match w.answer(r) {
        Some(Err(CtlError::ReloadFailed(m))) => assert!(m.contains("listen_timeout"), "{m}"),
        other => panic!("{other:?}"),
    }
    w.exit(new, ExitStatus::Signal(9));
    assert_eq!(w.current(), old);
    assert!(!w.logs().contains("exited unexpectedly"), "{}", w.logs());
}

#[test]
fn a_replacement_that_cannot_be_started_fails_the_reload() {
    let mut w = World::ready(policy(2));
    w.fail_spawns.insert(0, 1);
    let r = w.request(Control::Reload);
    match w.answer(r) {
        Some(Err(CtlError::ReloadFailed(m))) => {
            assert!(m.contains("could not be started"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert!(w.logs().contains("cannot start node"), "{}", w.logs());
}

#[test]
fn a_failed_reload_with_two_in_flight_kills_the_other_replacement() {
    let mut w = World::ready(with(policy(2), |p| p.reload_parallel = 2));
    let r = w.request(Control::Reload);
    let news = w.starting();
    w.crash(news[0]);
    assert_eq!(w.killed(), vec![news[1]]);
    assert!(matches!(w.answer(r), Some(Err(CtlError::ReloadFailed(_)))));
    w.exit(news[1], ExitStatus::Signal(9));
    assert_eq!(w.core.state_name(), "ready");
}

#[test]
fn a_slot_whose_worker_died_during_a_failed_reload_still_gets_one() {
    let mut w = World::ready(policy(1));
    let old = w.current()[&0];
    w.request(Control::Reload);
    let new = w.starting()[0];
    // The serving worker dies while its replacement starts...
    w.crash(old);
    // ...and then the replacement dies too.
    let mark = w.spawned.len();
    w.crash(new);
    assert_eq!(w.spawns_since(mark), vec![0], "the slot is not left empty");
}

#[test]
fn back_to_back_reloads_coalesce_into_one() {
    let mut w = World::obedient(policy(1));
    let first = w.request(Control::Reload);
    let queued: Vec<ReplyId> = (0..5).map(|_| w.request(Control::Reload)).collect();
    w.send(Event::Request {
        what: Control::Reload,
        reply: None,
    });
    let id = w.starting()[0];
    w.listening(id);
    assert_eq!(w.workers_after(first), Some(1));
    assert!(w.answer(queued[0]).is_none(), "the queued reload runs next");
    let id = w.starting()[0];
    w.listening(id);
    for r in &queued {
        assert_eq!(w.workers_after(*r), Some(1));
    }
    assert!(w.starting().is_empty(), "two reloads in all, not seven");
    assert_eq!(
        w.spawned.len(),
        3,
        "one first start, two replacements: {:?}",
        w.spawned
    );
}

#[test]
fn restart_and_scale_wait_behind_a_reload_in_order() {
    let mut w = World::obedient(policy(2));
    let reload = w.request(Control::Reload);
    let scale = w.request(Control::Scale(ScaleTarget::To(3)));
    let restart = w.request(Control::Restart);
    for _ in 0..2 {
        let id = w.starting()[0];
        w.listening(id);
    }
    assert_eq!(w.workers_after(reload), Some(2));
    assert!(w.answer(scale).is_none());
    let added = w.starting();
    assert_eq!(added.len(), 1);
    w.listening(added[0]);
    assert_eq!(w.workers_after(scale), Some(3));
    assert!(w.answer(restart).is_none(), "restart runs after the scale");
    let fresh = w.starting();
    assert_eq!(fresh.len(), 3);
    for id in fresh {
        w.listening(id);
    }
    assert_eq!(w.workers_after(restart), Some(3));
}

#[test]
fn scaling_down_during_a_reload_applies_after_it() {
    let mut w = World::obedient(policy(4));
    let reload = w.request(Control::Reload);
    let scale = w.request(Control::Scale(ScaleTarget::By(-2)));
    for _ in 0..4 {
        assert!(w.answer(scale).is_none());
        let id = w.starting()[0];
        w.listening(id);
    }
    assert_eq!(w.workers_after(reload), Some(4));
    assert_eq!(w.workers_after(scale), Some(2));
    assert_eq!(w.core.snapshot().instances, 2);
    assert!(w.effects.contains(&Effect::ReleaseSlotSockets(3)));
    assert!(w.effects.contains(&Effect::ReleaseSlotSockets(2)));
}

#[test]
fn scale_up_waits_for_the_new_workers_and_down_drains_the_highest() {
    let mut w = World::ready(policy(2));
    let up = w.request(Control::Scale(ScaleTarget::To(4)));
    assert!(w.answer(up).is_none());
    assert_eq!(w.spawns_since(2), vec![2, 3], "lowest free indexes");
    for id in w.starting() {
        w.listening(id);
    }
    assert_eq!(w.workers_after(up), Some(4));
    let cur = w.current();
    let down = w.request(Control::Scale(ScaleTarget::To(1)));
    assert_eq!(w.workers_after(down), Some(1));
    let stopped: Vec<WorkerId> = w.stopped().into_iter().map(|(id, _)| id).collect();
    assert_eq!(stopped, vec![cur[&3], cur[&2], cur[&1]]);
}

#[test]
fn bad_scale_counts_are_refused_at_once() {
    let mut w = World::ready(policy(2));
    for target in [
        ScaleTarget::To(0),
        ScaleTarget::To(1025),
        ScaleTarget::By(-2),
    ] {
        let r = w.request(Control::Scale(target));
        match w.answer(r) {
            Some(Err(CtlError::InvalidArgument(m))) => assert!(m.contains("between 1 and 1024")),
            other => panic!("{target:?}: {other:?}"),
        }
    }
    assert_eq!(w.core.snapshot().instances, 2);
}

#[test]
fn too_many_waiting_requests_are_refused_as_busy() {
    let mut w = World::ready(policy(1));
    w.request(Control::Reload);
    let mut busy = 0;
    for _ in 0..MAX_QUEUED + 3 {
        let r = w.request(Control::Scale(ScaleTarget::To(1)));
        if matches!(w.answer(r), Some(Err(CtlError::Busy(_)))) {
            busy += 1;
        }
    }
    assert_eq!(busy, 3);
}

#[test]
fn restart_replaces_every_worker_and_clears_errored_slots() {
    let mut w = World::ready(with(policy(2), |p| p.max_restarts = 0));
    let id = w.current()[&1];
    w.crash(id);
    assert_eq!(w.core.snapshot().workers[1].state, "errored");
    let r = w.request(Control::Restart);
    let fresh = w.starting();
    assert_eq!(fresh.len(), 2);
    for id in fresh {
        w.listening(id);
    }
    assert_eq!(w.workers_after(r), Some(2));
    assert_eq!(w.core.state_name(), "ready");
}

// ---- memory, watchdog, strangers ------------------------------------------------

#[test]
fn a_worker_over_max_memory_restart_is_swapped_through_the_reload_path() {
    let mut w = World::obedient(with(policy(2), |p| p.max_memory_restart = Some(100 << 20)));
    w.rss.insert(1, 200 << 20);
    let old = w.current();
    let mark = w.spawned.len();
    w.advance(MS(5000));
    assert_eq!(w.spawns_since(mark), vec![1], "only the fat slot");
    assert!(w.logs().contains("max_memory_restart"));
    assert!(
        w.stopped().is_empty(),
        "the old worker serves until the new is ready"
    );
    let new = w.starting()[0];
    w.listening(new);
    assert_eq!(w.stopped(), vec![(old[&1], StopBy::Signal)]);
    assert!(w.logs().contains("reload finished: 1/1"));
}

#[test]
fn sustained_memory_pressure_replaces_the_worker_before_the_kernel_kills_it() {
    let mut w = World::obedient(with(policy(2), |p| p.max_memory = Some(128 << 20)));
    w.pressure.insert(1, 35.0);
    w.pressure.insert(0, 5.0);
    let old = w.current();
    let mark = w.spawned.len();
    // Two checks under pressure: not yet (a GC burst is not sustained).
    w.advance(MS(10_000));
    assert_eq!(w.spawns_since(mark), Vec::<u32>::new());
    w.advance(MS(5000));
    assert_eq!(w.spawns_since(mark), vec![1], "only the pressed slot");
    assert!(
        w.logs().contains("sustained memory pressure"),
        "{}",
        w.logs()
    );
    assert!(
        w.stopped().is_empty(),
        "the old worker serves until the new is ready"
    );
    let new = w.starting()[0];
    w.listening(new);
    assert_eq!(w.stopped(), vec![(old[&1], StopBy::Signal)]);
    let snap = w.core.snapshot();
    let slot1 = snap.workers.iter().find(|x| x.instance == 1).unwrap();
    assert_eq!(slot1.replaced_memory_pressure, 1);
    assert_eq!(slot1.replaced_memory, 0);
}

#[test]
fn pressure_that_lets_up_starts_the_count_over() {
    let mut w = World::obedient(with(policy(1), |p| p.max_memory = Some(128 << 20)));
    let mark = w.spawned.len();
    for _ in 0..4 {
        w.pressure.insert(0, 50.0);
        w.advance(MS(10_000));
        w.pressure.insert(0, 1.0);
        w.advance(MS(5000));
    }
    assert_eq!(w.spawns_since(mark), Vec::<u32>::new(), "{}", w.logs());
    // Without a memory budget, pressure alone replaces nothing.
    let mut w = World::obedient(policy(1));
    w.pressure.insert(0, 90.0);
    let mark = w.spawned.len();
    w.advance(MS(60_000));
    assert_eq!(w.spawns_since(mark), Vec::<u32>::new());
}

#[test]
fn the_watchdog_is_fed_every_half_interval() {
    let mut w = World::ready(with(policy(1), |p| p.watchdog = Some(MS(1000))));
    w.advance(MS(2600));
    let pings = w
        .notes()
        .iter()
        .filter(|n| **n == SdNotify::Watchdog)
        .count();
    assert_eq!(pings, 5);
}

#[test]
fn notify_messages_from_strangers_are_warned_about_once_a_second() {
    let mut w = World::ready(policy(1));
    for _ in 0..100 {
        w.send(Event::NotifyFromStranger { pid: 4242 });
    }
    w.advance(MS(1000));
    w.send(Event::NotifyFromStranger { pid: 4242 });
    assert_eq!(w.logs().matches("not one of our workers").count(), 2);
}

// ---- stop -----------------------------------------------------------------------

#[test]
fn stop_asks_every_worker_then_kills_after_kill_timeout() {
    let mut w = World::ready(with(policy(2), |p| p.shutdown_with_message = true));
    let cur = w.current();
    w.send(Event::Stop);
    assert!(w.notes().contains(&SdNotify::Stopping("stopping".into())));
    assert_eq!(
        w.stopped(),
        vec![(cur[&0], StopBy::Message), (cur[&1], StopBy::Message)]
    );
    w.exit(cur[&0], ExitStatus::Code(0));
    assert_eq!(w.core.finished(), None);
    w.advance(MS(1600));
    assert_eq!(w.killed(), vec![cur[&1]]);
    assert!(
        w.logs()
            .contains("did not stop within kill_timeout (1600 ms): SIGKILL")
    );
    w.exit(cur[&1], ExitStatus::Signal(9));
    assert_eq!(w.core.finished(), Some(0));
}

#[test]
fn stop_during_a_reload_answers_every_caller_and_ends() {
    let mut w = World::ready(policy(2));
    let reload = w.request(Control::Reload);
    let scale = w.request(Control::Scale(ScaleTarget::To(3)));
    w.send(Event::Stop);
    for r in [reload, scale] {
        assert!(matches!(w.answer(r), Some(Err(CtlError::Stopping(_)))));
    }
    let late = w.request(Control::Reload);
    assert!(matches!(w.answer(late), Some(Err(CtlError::Stopping(_)))));
    let mark = w.spawned.len();
    w.obey();
    assert!(
        w.spawns_since(mark).is_empty(),
        "nothing restarts while stopping"
    );
    assert_eq!(w.core.finished(), Some(0));
}

#[test]
fn a_second_stop_within_a_second_is_the_same_stop_and_later_kills_at_once() {
    let mut w = World::ready(policy(2));
    w.send(Event::Stop);
    assert!(w.killed().is_empty());
    // `timeout`, or Ctrl-C reaching a wrapper too: the same stop.
    w.advance(MS(300));
    w.send(Event::Stop);
    assert!(w.killed().is_empty(), "still graceful");
    assert!(w.logs().contains("the same stop"), "{}", w.logs());
    w.advance(MS(700));
    w.send(Event::Stop);
    assert_eq!(w.killed().len(), 2, "a second stop a second later kills");
}

#[test]
fn a_pending_restart_is_cancelled_by_a_stop() {
    let mut w = World::ready(with(policy(1), |p| p.restart_delay = MS(500)));
    let id = w.current()[&0];
    w.crash(id);
    w.send(Event::Stop);
    let mark = w.spawned.len();
    w.advance(MS(1000));
    assert!(w.spawns_since(mark).is_empty());
    assert_eq!(w.core.finished(), Some(0));
}

// ---- reload with a configuration read anew ------------------------------------------

#[test]
fn a_reload_with_a_new_configuration_starts_every_new_worker_under_it() {
    let mut w = World::obedient(policy(2));
    let mark = w.spawned.len();
    let r = w.reconfigure(
        with(policy(2), |p| p.wait_ready = true),
        1,
        "wait_ready changed",
    );
    let new = w.starting()[0];
    w.listening(new);
    assert_eq!(
        w.core.state_name(),
        "reloading",
        "listening no longer suffices"
    );
    w.send(Event::Said {
        worker: new,
        said: Said::Ready,
    });
    let new = w.starting()[0];
    w.send(Event::Said {
        worker: new,
        said: Said::Ready,
    });
    match w.answer(r) {
        Some(Ok(done)) => {
            assert_eq!(done.workers, 2);
            assert!(
                done.message.ends_with("; wait_ready changed"),
                "{}",
                done.message
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(w.generations[mark..], [1, 1]);
    assert!(
        w.logs()
            .contains("configuration reloaded: wait_ready changed")
    );
    // A crash restart afterwards uses it too.
    let id = w.current()[&0];
    w.crash(id);
    assert_eq!(w.generations.last(), Some(&1));
}

#[test]
fn more_instances_in_a_new_configuration_swap_first_then_add() {
    let mut w = World::obedient(policy(2));
    let mark = w.spawned.len();
    let r = w.reconfigure(policy(3), 1, "instances 2 → 3");
    for _ in 0..2 {
        let id = w.starting()[0];
        w.listening(id);
    }
    assert_eq!(
        w.spawns_since(mark),
        vec![0, 1, 2],
        "the added slot comes after the swap"
    );
    assert!(
        w.answer(r).is_none(),
        "answered once the added worker is ready"
    );
    let added = w.starting()[0];
    w.listening(added);
    assert_eq!(w.workers_after(r), Some(3));
    assert_eq!(w.core.snapshot().instances, 3);
}

#[test]
fn fewer_instances_in_a_new_configuration_drop_the_highest_once_the_swap_succeeded() {
    let mut w = World::ready(policy(3));
    let old = w.current();
    let r = w.reconfigure(policy(1), 1, "instances 3 → 1");
    assert!(
        w.stopped().is_empty(),
        "nothing goes before the swap succeeded"
    );
    let new = w.starting();
    assert_eq!(new.len(), 1, "only the slot that stays is swapped");
    w.listening(new[0]);
    let stopped: Vec<WorkerId> = w.stopped().into_iter().map(|(id, _)| id).collect();
    assert_eq!(
        stopped,
        vec![old[&0], old[&2], old[&1]],
        "the swapped one, then the highest first"
    );
    w.exit(old[&0], ExitStatus::Code(0));
    w.exit(old[&2], ExitStatus::Code(0));
    // The dropped slots' workers are old code too: the answer waits for them.
    assert_eq!(w.answer(r), None, "slot 1's old worker still drains");
    w.exit(old[&1], ExitStatus::Code(0));
    assert_eq!(w.workers_after(r), Some(1));
}

#[test]
fn fewer_instances_in_a_failed_reload_drop_nothing() {
    let mut w = World::ready(policy(3));
    let old = w.current();
    let r = w.reconfigure(policy(1), 1, "instances 3 → 1");
    let new = w.starting()[0];
    w.crash(new);
    assert!(matches!(w.answer(r), Some(Err(CtlError::ReloadFailed(_)))));
    assert!(w.stopped().is_empty(), "{:?}", w.stopped());
    assert_eq!(w.current(), old, "all three slots serve on");
    assert_eq!(w.core.snapshot().instances, 3);
}

#[test]
fn coalesced_reloads_take_the_newest_configuration() {
    let mut w = World::obedient(policy(1));
    let running = w.request(Control::Reload);
    let a = w.reconfigure(policy(1), 1, "env: A changed");
    let b = w.reconfigure(
        with(policy(1), |p| p.kill_timeout = MS(500)),
        2,
        "kill_timeout changed",
    );
    let id = w.starting()[0];
    w.listening(id);
    assert_eq!(w.workers_after(running), Some(1));
    let mark = w.spawned.len();
    let id = w.starting()[0];
    w.listening(id);
    assert_eq!(
        w.generations[mark - 1..],
        [2],
        "the queued reload used generation 2"
    );
    for r in [a, b] {
        match w.answer(r) {
            Some(Ok(done)) => assert!(done.message.ends_with("kill_timeout changed")),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_new_configuration_can_turn_the_memory_check_on() {
    let mut w = World::obedient(policy(1));
    w.rss.insert(0, 500 << 20);
    let r = w.reconfigure(
        with(policy(1), |p| p.max_memory_restart = Some(100 << 20)),
        1,
        "max_memory_restart changed",
    );
    let id = w.starting()[0];
    w.listening(id);
    assert_eq!(w.workers_after(r), Some(1));
    let mark = w.spawned.len();
    w.advance(MS(5000));
    assert_eq!(w.spawns_since(mark), vec![0], "the fat worker is swapped");
}

// ---- hang watchdog -----------------------------------------------------------------

fn beat(w: &mut World, id: WorkerId) {
    w.send(Event::Said {
        worker: id,
        said: Said::Beat {
            delay_ms: 3,
            elu_permille: None,
            outcomes: None,
        },
    });
}

#[test]
fn a_worker_whose_heartbeat_stops_is_replaced_new_one_first() {
    let mut w = World::ready(with(policy(2), |p| p.max_event_loop_delay = Some(MS(1000))));
    let cur = w.current();
    beat(&mut w, cur[&0]);
    beat(&mut w, cur[&1]);
    let mark = w.spawned.len();
    for _ in 0..5 {
        w.advance(MS(900));
        beat(&mut w, cur[&0]);
        beat(&mut w, cur[&1]);
    }
    assert!(
        w.spawns_since(mark).is_empty(),
        "beating workers are left alone"
    );
    // Worker 1's loop gets stuck: no more beats from it.
    for _ in 0..2 {
        w.advance(MS(600));
        beat(&mut w, cur[&0]);
    }
    assert_eq!(w.spawns_since(mark), vec![1], "its replacement starts");
    assert!(w.logs().contains("worker 1 (pid"), "{}", w.logs());
    assert!(
        w.logs().contains("has not answered for 1000 ms"),
        "{}",
        w.logs()
    );
    assert!(
        w.stopped().is_empty(),
        "the stuck one serves until the new is ready"
    );
    let new = w.starting()[0];
    w.listening(new);
    assert_eq!(w.stopped(), vec![(cur[&1], StopBy::Signal)]);
    let snap = w.core.snapshot();
    assert_eq!(snap.workers[1].replaced_hang, 1);
    assert_eq!(snap.workers[0].replaced_hang, 0);
    // The stuck one ignores SIGINT: killed after kill_timeout.
    w.advance(MS(1600));
    assert_eq!(w.killed(), vec![cur[&1]]);
}

impl World {
    fn autopsies(&self) -> Vec<(WorkerId, AutopsyWhy, Duration)> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Autopsy {
                    worker,
                    why,
                    within,
                    ..
                } => Some((*worker, *why, *within)),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn a_hung_worker_is_autopsied_at_the_decision_and_its_kill_waits_for_nothing() {
    let mut w = World::ready(with(policy(2), |p| {
        p.max_event_loop_delay = Some(MS(1000));
        p.kill_timeout = MS(1600);
    }));
    let cur = w.current();
    beat(&mut w, cur[&0]);
    beat(&mut w, cur[&1]);
    assert!(w.autopsies().is_empty());
    for _ in 0..2 {
        w.advance(MS(600));
        beat(&mut w, cur[&0]);
    }
    // The stack is asked for once, for the hung one only, bounded by its
    // kill_timeout, as its replacement starts.
    assert_eq!(w.autopsies(), vec![(cur[&1], AutopsyWhy::Hang, MS(1600))]);
    let new = w.starting()[0];
    w.listening(new);
    assert_eq!(w.stopped(), vec![(cur[&1], StopBy::Signal)]);
    // No answer ever comes: the kill is on time all the same.
    w.advance(MS(800));
    beat(&mut w, cur[&0]);
    w.advance(MS(800));
    assert_eq!(w.killed(), vec![cur[&1]]);
    assert_eq!(w.autopsies().len(), 1, "asked once");
}

#[test]
fn a_worker_replaced_for_memory_is_autopsied_only_with_autopsy_on_memory() {
    for on in [false, true] {
        let mut w = World::obedient(with(policy(2), |p| {
            p.max_memory_restart = Some(100 << 20);
            p.autopsy_on_memory = on;
        }));
        w.rss.insert(1, 200 << 20);
        let old = w.current();
        w.advance(MS(5000));
        let want = if on {
            vec![(old[&1], AutopsyWhy::Memory, MS(1600))]
        } else {
            vec![]
        };
        assert_eq!(w.autopsies(), want, "autopsy_on_memory: {on}");
    }
}

#[test]
fn a_worker_stuck_right_after_ready_is_caught_by_its_beats_before() {
    let mut w = World::new(with(policy(1), |p| p.max_event_loop_delay = Some(MS(1000))));
    w.start();
    let id = w.starting()[0];
    beat(&mut w, id);
    w.listening(id);
    let mark = w.spawned.len();
    // Ready, then stuck before its next beat.
    w.advance(MS(1000));
    assert_eq!(w.spawns_since(mark), vec![0]);
}

#[test]
fn a_worker_that_never_beats_is_not_taken_for_hung() {
    let mut w = World::ready(with(policy(1), |p| p.max_event_loop_delay = Some(MS(500))));
    let mark = w.spawned.len();
    w.advance(MS(60_000));
    assert!(
        w.spawns_since(mark).is_empty(),
        "no beat ever: not a Node worker with the preload"
    );
}

// ---- re-exec ------------------------------------------------------------------

impl World {
    fn count(&self, wanted: &Effect) -> usize {
        self.effects.iter().filter(|e| *e == wanted).count()
    }
}

#[test]
fn a_reexec_waits_for_the_running_reload_then_checks_and_refuses_others_meanwhile() {
    let mut w = World::obedient(policy(2));
    let reload = w.request(Control::Reload);
    let reexec = w.request(Control::Reexec);
    let joined = w.request(Control::Reexec);
    assert_eq!(w.count(&Effect::CheckExec), 0, "not while a reload runs");
    for _ in 0..2 {
        let id = w.starting()[0];
        w.listening(id);
    }
    assert!(w.answer(reload).is_some_and(|r| r.is_ok()));
    assert_eq!(w.count(&Effect::CheckExec), 1, "one check for both callers");
    assert_eq!(w.core.state_name(), "reexecuting");
    let scale = w.request(Control::Scale(ScaleTarget::To(3)));
    assert!(matches!(w.answer(scale), Some(Err(CtlError::Busy(_)))));
    w.send(Event::ExecChecked(Ok(
        "nodeherd 9.9.9 (/usr/bin/nodeherd)".into()
    )));
    for r in [reexec, joined] {
        match w.answer(r) {
            Some(Ok(done)) => assert!(done.message.contains("9.9.9"), "{}", done.message),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(w.count(&Effect::Exec), 1);
    assert!(
        w.notes()
            .iter()
            .any(|n| matches!(n, SdNotify::Reloading(_))),
        "systemd hears RELOADING=1"
    );
    assert!(w.core.exec_due());
    let late = w.request(Control::Reload);
    assert!(matches!(w.answer(late), Some(Err(CtlError::Busy(_)))));
}

#[test]
fn requests_waiting_behind_a_reexec_are_told_to_ask_again() {
    let mut w = World::obedient(policy(1));
    let reload = w.request(Control::Reload);
    let reexec = w.request(Control::Reexec);
    let restart = w.request(Control::Restart);
    let id = w.starting()[0];
    w.listening(id);
    assert!(w.answer(reload).is_some_and(|r| r.is_ok()));
    w.send(Event::ExecChecked(Ok("nodeherd".into())));
    assert!(w.answer(reexec).is_some_and(|r| r.is_ok()));
    assert!(matches!(w.answer(restart), Some(Err(CtlError::Busy(_)))));
}

#[test]
fn a_refused_program_leaves_the_manager_as_it_was() {
    let mut w = World::obedient(policy(2));
    let before = w.core.snapshot();
    let r = w.request(Control::Reexec);
    w.send(Event::ExecChecked(Err(
        "/usr/bin/nodeherd is not a nodeherd".into(),
    )));
    match w.answer(r) {
        Some(Err(CtlError::Failed(m))) => assert!(m.contains("not a nodeherd"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(w.count(&Effect::Exec), 0);
    assert!(!w.core.exec_due());
    assert_eq!(
        w.core.snapshot().workers,
        before.workers,
        "no worker touched"
    );
    assert_eq!(w.core.state_name(), "ready");
    let scale = w.request(Control::Scale(ScaleTarget::To(3)));
    let id = w.starting()[0];
    w.listening(id);
    assert_eq!(w.workers_after(scale), Some(3), "requests run again");
}

#[test]
fn a_failed_execve_goes_back_to_ready_and_a_stop_cancels_the_exec() {
    let mut w = World::obedient(policy(1));
    w.request(Control::Reexec);
    w.send(Event::ExecChecked(Ok("nodeherd".into())));
    w.send(Event::ExecFailed("execve: ENOMEM".into()));
    assert!(!w.core.exec_due());
    assert_eq!(w.core.state_name(), "ready");
    assert!(matches!(w.notes().last(), Some(SdNotify::Ready(_))));

    w.request(Control::Reexec);
    w.send(Event::ExecChecked(Ok("nodeherd".into())));
    assert!(w.core.exec_due());
    w.send(Event::Stop);
    assert!(!w.core.exec_due(), "a stop wins over a pending exec");
}

#[test]
fn the_state_handed_over_goes_on_in_the_new_core_as_it_was() {
    let mut w = World::obedient(with(policy(3), |p| p.restart_delay = MS(2000)));
    w.advance(MS(5000));
    // Slot 1 crashed and waits 2 s to restart; slot 2 was scaled live.
    let one = w.current()[&1];
    w.crash(one);
    w.advance(MS(500));
    let scale = w.request(Control::Scale(ScaleTarget::To(4)));
    let id = w.starting()[0];
    w.listening(id);
    assert_eq!(w.workers_after(scale), Some(4));
    // Keep-alive connections as reported, 30/10/10 (slot 1 is down).
    let serving: Vec<WorkerId> = w.current().values().copied().collect();
    for (id, open) in serving.iter().zip([30, 10, 10]) {
        w.connections(*id, open);
    }
    let before = w.core.snapshot();
    let deadline = w.core.next_deadline();

    let state = w.core.export(w.now);
    let json = serde_json::to_string(&state).unwrap();
    let took = MS(40);
    let later = w.now + took;
    let back: super::handover::CoreState = serde_json::from_str(&json).unwrap();
    let core = Core::import(back, policy(3), later, took).unwrap();
    let after = core.snapshot();
    assert_eq!(
        after.workers, before.workers,
        "pids, states, restarts, start times"
    );
    assert_eq!(after.instances, 4, "the live scale is kept");
    assert_eq!(core.next_deadline(), deadline, "the restart's deadline too");
    assert_eq!(after.counters.reexecs, before.counters.reexecs + 1);

    // The new core restarts slot 1 on time and handles a crash as before.
    w.core = core;
    w.now = later;
    w.effects.clear();
    // The counts came along: reports that change nothing tell nobody
    // anything, where a core that forgot them would tell a share of 10.
    w.connections(serving[1], 10);
    w.connections(serving[2], 10);
    assert_eq!(w.shares_since(0), BTreeMap::new());
    w.advance(MS(1500));
    assert_eq!(w.spawns_since(w.spawned.len() - 1), [1], "slot 1 restarted");
    let id = w.starting()[0];
    w.listening(id);
    let zero = w.current()[&0];
    w.crash(zero);
    assert_eq!(w.core.snapshot().workers[0].restarts, 1);
    assert!(w.logs().contains("worker 0 exited unexpectedly"));
}

// ---- scaling down with sockets of its own (balance: reuseport) ---------------

#[test]
fn a_slot_with_its_own_socket_is_steered_away_from_and_stops_once_its_queue_is_empty() {
    let mut w = World::obedient(with(policy(3), |p| p.per_slot_sockets = true));
    let two = w.current()[&2];
    let r = w.request(Control::Scale(ScaleTarget::To(2)));
    assert_eq!(w.workers_after(r), Some(2));
    assert!(
        w.effects
            .contains(&Effect::DrainSlot { leave: 1, index: 2 })
    );
    assert!(
        w.stopped().is_empty(),
        "its worker still accepts what is queued"
    );
    assert!(!w.effects.contains(&Effect::ReleaseSlotSockets(2)));
    let state_of_slot_2 = |w: &World| -> Vec<&'static str> {
        let snap = w.core.snapshot();
        snap.workers
            .iter()
            .filter(|i| i.instance == 2)
            .map(|i| i.state)
            .collect()
    };
    assert_eq!(state_of_slot_2(&w), ["draining"], "not ready: it goes");
    w.send(Event::SlotDrained(1));
    assert_eq!(
        w.stopped().iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [two]
    );
    assert!(!state_of_slot_2(&w).contains(&"ready"));
    assert!(w.effects.contains(&Effect::CloseLeaving {
        leave: 1,
        workers: vec![two]
    }));
}

#[test]
fn a_slot_whose_queue_does_not_empty_stops_after_the_bound() {
    let mut w = World::obedient(with(policy(2), |p| p.per_slot_sockets = true));
    let one = w.current()[&1];
    w.request(Control::Scale(ScaleTarget::To(1)));
    w.advance(super::policy::LEAVE_BOUND - MS(1));
    assert!(w.stopped().is_empty());
    w.advance(MS(2));
    assert_eq!(
        w.stopped().iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [one]
    );
    assert!(w.logs().contains("still had connections queued"));
    // A late "drained" changes nothing.
    w.send(Event::SlotDrained(1));
    assert_eq!(w.stopped().len(), 1);
}

#[test]
fn a_reexec_waits_for_slots_that_go() {
    let mut w = World::obedient(with(policy(2), |p| p.per_slot_sockets = true));
    w.request(Control::Scale(ScaleTarget::To(1)));
    w.request(Control::Reexec);
    assert_eq!(w.count(&Effect::CheckExec), 0);
    w.send(Event::SlotDrained(1));
    assert_eq!(w.count(&Effect::CheckExec), 1);
}

// ---- keep-alive connections shared out evenly ----------------------------------

impl World {
    fn connections(&mut self, w: WorkerId, open: u32) {
        self.send(Event::Said {
            worker: w,
            said: Said::Connections { open },
        });
    }

    /// The shares told since effect `mark`, by worker.
    fn shares_since(&self, mark: usize) -> BTreeMap<WorkerId, Option<u32>> {
        self.effects[mark..]
            .iter()
            .filter_map(|e| match e {
                Effect::Share { worker, max } => Some((*worker, *max)),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn every_serving_worker_is_told_its_fair_share_of_keep_alive_connections() {
    let mut w = World::obedient(policy(4));
    let ids: Vec<WorkerId> = w.current().values().copied().collect();
    let mark = w.effects.len();
    // 64 connections fell 30/20/14/0, as one shared queue places them.
    for (id, open) in ids.iter().zip([30, 20, 14, 0]) {
        w.connections(*id, open);
    }
    let told = w.shares_since(mark);
    assert!(ids.iter().all(|id| told[id] == Some(16)), "{told:?}");
    // The shares even out: nothing more to tell.
    let mark = w.effects.len();
    for (id, open) in ids.iter().zip([16, 16, 16, 16]) {
        w.connections(*id, open);
    }
    assert_eq!(w.shares_since(mark), BTreeMap::new());
    // One connection moves from one worker to another: the share rounds up,
    // so nobody is asked to shed one more.
    w.connections(ids[0], 15);
    assert_eq!(w.shares_since(mark), BTreeMap::new());
    // The load doubles: the share follows.
    for (id, open) in ids.iter().zip([32, 32, 32, 32]) {
        w.connections(*id, open);
    }
    let told = w.shares_since(mark);
    assert!(ids.iter().all(|id| told[id] == Some(32)), "{told:?}");
    // Half the clients go: for a second the share holds (they may be
    // reconnecting elsewhere), then it follows them down.
    let mark = w.effects.len();
    for (id, open) in ids.iter().zip([32, 16, 16, 16]) {
        w.connections(*id, open);
    }
    assert_eq!(w.shares_since(mark), BTreeMap::new());
    w.advance(MS(999));
    assert_eq!(w.shares_since(mark), BTreeMap::new());
    w.advance(MS(1));
    let told = w.shares_since(mark);
    assert!(ids.iter().all(|id| told[id] == Some(20)), "{told:?}");
    // Nothing more is due: no timer keeps an idle manager awake.
    assert_eq!(w.core.next_deadline(), None);
}

#[test]
fn new_connections_are_steered_to_the_workers_below_their_share() {
    let mut w = World::obedient(policy(4));
    let ids: Vec<WorkerId> = w.current().values().copied().collect();
    // Before any report, and with no keep-alive traffic (every count 0):
    // no preference, every serving slot is picked.
    assert!(w.core.preferred_slots().is_empty());
    for id in &ids {
        w.connections(*id, 0);
    }
    assert!(w.core.preferred_slots().is_empty());
    // 64 connections fell 22/18/14/10 by the kernel's hash: the fair share
    // is 16, and the clients the first two send away must land on 2 and 3,
    // three times as many on 3 (it lacks 6) as on 2 (it lacks 2).
    for (id, open) in ids.iter().zip([22, 18, 14, 10]) {
        w.connections(*id, open);
    }
    assert_eq!(w.core.preferred_slots(), [(2, 2), (3, 6)].into());
    // Slot 2 fills up to its share: only 3 is still wanted.
    w.connections(ids[0], 16);
    w.connections(ids[1], 16);
    w.connections(ids[2], 16);
    assert_eq!(w.core.preferred_slots(), [(3, 6)].into());
    // However far below, a slot weighs at most MAX_WEIGHT.
    w.connections(ids[3], 0);
    assert_eq!(
        w.core.preferred_slots(),
        [(3, super::share::MAX_WEIGHT)].into()
    );
    w.connections(ids[3], 10);
    // Even again: no preference.
    w.connections(ids[3], 16);
    assert!(w.core.preferred_slots().is_empty());
    // A worker that crashed is not serving, and not preferred.
    w.connections(ids[3], 10);
    w.crash(ids[3]);
    assert!(!w.core.preferred_slots().contains_key(&3));

    // Rebalance off: no preference whatever the counts.
    let mut w = World::obedient(with(policy(2), |p| p.rebalance = false));
    let ids: Vec<WorkerId> = w.current().values().copied().collect();
    w.connections(ids[0], 40);
    w.connections(ids[1], 0);
    assert!(w.core.preferred_slots().is_empty());
}

#[test]
fn a_worker_that_crashes_leaves_its_connections_to_the_others_share() {
    let mut w = World::obedient(policy(3));
    let ids: Vec<WorkerId> = w.current().values().copied().collect();
    for (id, open) in ids.iter().zip([10, 10, 10]) {
        w.connections(*id, open);
    }
    let mark = w.effects.len();
    w.crash(ids[2]);
    // Its clients reconnect to the two left; the share is theirs to split.
    w.connections(ids[0], 15);
    w.connections(ids[1], 15);
    let told = w.shares_since(mark);
    assert_eq!(told.get(&ids[0]), Some(&Some(15)), "{told:?}");
    assert_eq!(told.get(&ids[1]), Some(&Some(15)), "{told:?}");
    assert_eq!(told.get(&ids[2]), None);
    // The replacement counts from its first report on, and is told too.
    let fresh = w.current()[&2];
    w.listening(fresh);
    let mark = w.effects.len();
    w.connections(fresh, 0);
    let told = w.shares_since(mark);
    assert!(told.values().all(|m| *m == Some(10)), "{told:?}");
    assert_eq!(told.len(), 3, "{told:?}");
}

#[test]
fn one_worker_alone_or_rebalance_off_is_told_no_limit() {
    let mut w = World::obedient(policy(1));
    let only = w.current()[&0];
    let mark = w.effects.len();
    w.connections(only, 40);
    w.connections(only, 41);
    assert_eq!(w.shares_since(mark), BTreeMap::new());

    let mut w = World::obedient(with(policy(2), |p| p.rebalance = false));
    let ids: Vec<WorkerId> = w.current().values().copied().collect();
    let mark = w.effects.len();
    w.connections(ids[0], 40);
    w.connections(ids[1], 0);
    assert_eq!(w.shares_since(mark), BTreeMap::new());
}

#[test]
fn turning_rebalance_off_lifts_the_limits_told() {
    let mut w = World::obedient(policy(2));
    w.reconfigure(
        with(policy(2), |p| p.rebalance = false),
        1,
        "rebalance changed",
    );
    // Slot 0 is swapped first; its new worker is told a share while the
    // configuration in force (rebalance on) still holds.
    let first = w.starting()[0];
    w.listening(first);
    w.connections(first, 40);
    let other = w.current()[&1];
    w.connections(other, 0);
    let mark = w.effects.len();
    w.connections(first, 41);
    assert!(
        w.shares_since(mark)
            .get(&first)
            .is_some_and(|m| m.is_some()),
        "told a limit while the old configuration is in force"
    );
    // The swap succeeds: the new configuration is in force, limits go.
    let mark = w.effects.len();
    let second = w.starting()[0];
    w.listening(second);
    let told = w.shares_since(mark);
    assert_eq!(told.get(&first), Some(&None), "{told:?}");
}

#[test]
fn a_worker_that_closed_its_listening_socket_serves_no_slot_and_no_share() {
    let mut w = World::obedient(policy(3));
    let ids: Vec<WorkerId> = w.current().values().copied().collect();
    for id in &ids {
        w.connections(*id, 10);
    }
    assert_eq!(w.core.serving_slots(), [0, 1, 2].into());
    let mark = w.effects.len();
    w.send(Event::Said {
        worker: ids[1],
        said: Said::Closed,
    });
    assert_eq!(w.core.serving_slots(), [0, 2].into());
    assert!(w.logs().contains("worker 1 (pid"), "{}", w.logs());
    assert!(w.logs().contains("closed its listening socket and runs on"));
    // Its clients go to the other two: their share is 15 from now on.
    let told = w.shares_since(mark);
    assert_eq!(told.get(&ids[0]), Some(&Some(15)), "{told:?}");
    assert_eq!(told.get(&ids[1]), None, "{told:?}");
    // Its replacement (after a crash, say) serves again.
    w.crash(ids[1]);
    let fresh = w.current()[&1];
    w.listening(fresh);
    assert_eq!(w.core.serving_slots(), [0, 1, 2].into());
}

#[test]
fn with_a_socket_per_slot_a_worker_that_closed_its_socket_is_replaced_new_one_first() {
    let mut w = World::obedient(with(policy(2), |p| p.per_slot_sockets = true));
    let one = w.current()[&1];
    let mark = w.spawned.len();
    w.send(Event::Said {
        worker: one,
        said: Said::Closed,
    });
    assert!(
        w.logs().contains("is replaced without downtime"),
        "{}",
        w.logs()
    );
    assert_eq!(w.core.serving_slots(), [0].into());
    assert_eq!(w.spawns_since(mark), vec![1]);
    // The old one is still there until the new one is ready.
    assert!(w.alive.contains_key(&one));
    let fresh = w.spawned[mark].0;
    w.listening(fresh);
    assert!(!w.alive.contains_key(&one), "the closed worker is stopped");
    assert_eq!(w.core.serving_slots(), [0, 1].into());
    assert_eq!(
        w.core
            .snapshot()
            .workers
            .iter()
            .filter(|x| x.pid > 0)
            .count(),
        2
    );
}

#[test]
fn a_worker_that_is_no_longer_alone_is_told_its_share() {
    let mut w = World::obedient(policy(1));
    let only = w.current()[&0];
    w.connections(only, 40);
    let r = w.request(Control::Scale(ScaleTarget::To(2)));
    let two = w.current()[&1];
    w.listening(two);
    assert_eq!(w.workers_after(r), Some(2));
    let mark = w.effects.len();
    w.connections(two, 0);
    let told = w.shares_since(mark);
    assert_eq!(told.get(&only), Some(&Some(20)), "{told:?}");
    assert_eq!(told.get(&two), Some(&Some(20)), "{told:?}");
}

// ---- a failed reload stays closed -------------------------------------------------

/// The policy in force in these tests, and the one a failed deploy brings:
/// told apart by `restart_delay` (the new one waits 5 s before a restart).
fn in_force() -> Policy {
    with(policy(2), |p| {
        p.max_memory_restart = Some(100 << 20);
        p.max_event_loop_delay = Some(MS(1000));
    })
}

/// Reload to generation 1, whose first replacement crashes at start: the
/// reload fails and the old workers serve on.
fn fail_a_reload(w: &mut World) {
    let r = w.reconfigure(
        with(in_force(), |p| p.restart_delay = MS(5000)),
        1,
        "restart_delay changed",
    );
    let new = w.starting()[0];
    assert_eq!(w.generations.last(), Some(&1), "the replacement runs it");
    w.crash(new);
    w.obey();
    assert!(matches!(w.answer(r), Some(Err(CtlError::ReloadFailed(_)))));
    assert_eq!(w.core.generation(), 0);
    assert_eq!(w.core.policy(), &in_force(), "the policy in force is kept");
    assert!(!w.logs().contains("configuration reloaded"), "{}", w.logs());
}

#[test]
fn after_a_failed_reload_a_crashed_worker_comes_back_under_the_previous_configuration() {
    let mut w = World::obedient(in_force());
    fail_a_reload(&mut w);
    let mark = w.spawned.len();
    w.crash(w.current()[&1]);
    // At once (the failed configuration would wait 5 s), with generation 0.
    assert_eq!(w.spawns_since(mark), vec![1]);
    assert_eq!(w.generations[mark..], [0]);
}

#[test]
fn after_a_failed_reload_a_worker_over_its_memory_is_replaced_under_the_previous_configuration() {
    let mut w = World::obedient(in_force());
    fail_a_reload(&mut w);
    w.rss.insert(0, 500 << 20);
    let mark = w.spawned.len();
    w.advance(MS(5000));
    assert_eq!(w.spawns_since(mark), vec![0], "the fat worker is swapped");
    assert_eq!(w.generations[mark..], [0]);
}

#[test]
fn after_a_failed_reload_a_hung_worker_is_replaced_under_the_previous_configuration() {
    let mut w = World::obedient(in_force());
    fail_a_reload(&mut w);
    let hung = w.current()[&1];
    beat(&mut w, hung);
    let mark = w.spawned.len();
    w.advance(MS(1000));
    assert_eq!(w.spawns_since(mark), vec![1], "the stuck worker is swapped");
    assert_eq!(w.generations[mark..], [0]);
}

#[test]
fn after_a_failed_reload_scaling_up_starts_the_previous_configuration() {
    let mut w = World::obedient(in_force());
    fail_a_reload(&mut w);
    let mark = w.spawned.len();
    let r = w.request(Control::Scale(ScaleTarget::To(3)));
    assert_eq!(w.spawns_since(mark), vec![2]);
    assert_eq!(w.generations[mark..], [0]);
    let added = w.starting()[0];
    w.listening(added);
    assert_eq!(w.workers_after(r), Some(3));
}

#[test]
fn during_a_reload_an_old_worker_that_crashes_comes_back_under_the_configuration_in_force() {
    let mut w = World::obedient(in_force());
    let r = w.reconfigure(
        with(in_force(), |p| p.restart_delay = MS(5000)),
        1,
        "restart_delay changed",
    );
    let replacement = w.starting()[0];
    let mark = w.spawned.len();
    w.crash(w.current()[&1]);
    assert_eq!(w.spawns_since(mark), vec![1], "at once, not after 5 s");
    assert_eq!(w.generations[mark..], [0]);
    // The swap then goes on, and the reload succeeds under generation 1.
    w.listening(replacement);
    let restarted = w.starting();
    for id in restarted {
        w.listening(id);
    }
    while let Some(id) = w.starting().first().copied() {
        w.listening(id);
    }
    assert_eq!(w.workers_after(r), Some(2));
    assert_eq!(w.core.generation(), 1);
    assert_eq!(w.core.policy().restart_delay, MS(5000));
}

// ---- PM2's keys: cron_restart, watch, stop_exit_codes, autostart ----------------

impl World {
    /// The `not_before` of every `ScheduleCron` the core asked for, in order.
    fn cron_asks(&self) -> Vec<Option<u64>> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::ScheduleCron { not_before, .. } => Some(*not_before),
                _ => None,
            })
            .collect()
    }

    /// Answer the core's ask: the next run is `after` from now, at `unix_ms`.
    fn cron_next_in(&mut self, after: Duration, unix_ms: u64) {
        self.send(Event::CronScheduled(Ok((self.now + after, unix_ms))));
    }

    /// Every worker replaced by a reload so far, as counted per slot.
    fn reloaded(&self) -> u32 {
        self.core
            .snapshot()
            .workers
            .iter()
            .filter(|w| w.state != "stopping")
            .map(|w| w.replaced_reload)
            .sum()
    }
}

fn cron_policy(instances: u32) -> Policy {
    with(policy(instances), |p| {
        p.cron_restart = Some("* * * * *".into())
    })
}

#[test]
fn cron_restart_reloads_every_worker_without_downtime_then_asks_for_the_next_run() {
    let mut w = World::new(cron_policy(2));
    w.obedient = true;
    w.start();
    for id in w.starting() {
        w.listening(id);
    }
    assert_eq!(w.cron_asks(), vec![None], "asked once, at start");
    w.cron_next_in(Duration::from_secs(60), 1_700_000_040_000);
    assert_eq!(
        w.core.snapshot().next_cron_reload_ms,
        Some(1_700_000_040_000)
    );
    let before = w.current();
    w.advance(Duration::from_secs(59));
    assert!(w.starting().is_empty(), "nothing before the minute");
    w.advance(Duration::from_secs(1));
    // The zero-downtime path: a replacement starts beside each old worker,
    // and the old one is asked to stop only once it is ready.
    assert_eq!(w.core.state_name(), "reloading");
    assert!(w.stopped().is_empty(), "no old worker stops first");
    while let Some(id) = w.starting().first().copied() {
        w.listening(id);
    }
    assert_eq!(w.core.state_name(), "ready");
    assert_eq!(w.reloaded(), 2);
    let after = w.current();
    assert!(
        before
            .values()
            .all(|old| !after.values().any(|new| new == old))
    );
    assert!(
        w.logs().contains("cron_restart (* * * * *) is due"),
        "{}",
        w.logs()
    );
    // The next run is asked for after the one just made, so it is never the same.
    assert_eq!(w.cron_asks(), vec![None, Some(1_700_000_040_000)]);
}

#[test]
fn the_next_cron_run_crosses_a_reexec_and_a_stop_cancels_it() {
    let mut w = World::ready(cron_policy(2));
    w.cron_next_in(Duration::from_secs(30), 1_700_000_030_000);
    let deadline = w.core.next_deadline();
    let state = w.core.export(w.now);
    let json = serde_json::to_string(&state).unwrap();
    let back: super::handover::CoreState = serde_json::from_str(&json).unwrap();
    let core = Core::import(back, cron_policy(2), w.now + MS(40), MS(40)).unwrap();
    assert_eq!(
        core.next_deadline(),
        deadline,
        "the cron deadline came along"
    );
    assert_eq!(core.snapshot().next_cron_reload_ms, Some(1_700_000_030_000));
    w.core = core;
    w.now += MS(40);
    w.effects.clear();
    w.advance(Duration::from_secs(30));
    assert_eq!(
        w.core.state_name(),
        "reloading",
        "it ran on time in the new program"
    );
    w.send(Event::Stop);
    assert_eq!(w.core.snapshot().next_cron_reload_ms, None);
    w.send(Event::CronScheduled(Ok((w.now + MS(10), 1))));
    assert_eq!(
        w.core.snapshot().next_cron_reload_ms,
        None,
        "not while stopping"
    );
}

#[test]
fn a_reload_that_changes_cron_restart_schedules_anew_once_in_force() {
    let mut w = World::obedient(policy(1));
    assert!(w.cron_asks().is_empty(), "no pattern, no ask");
    let r = w.reconfigure(cron_policy(1), 1, "cron_restart changed");
    assert!(w.cron_asks().is_empty(), "not before the swap succeeded");
    let id = w.starting()[0];
    w.listening(id);
    assert!(w.answer(r).is_some_and(Result::is_ok));
    assert_eq!(w.cron_asks(), vec![None]);
}

#[test]
fn a_burst_of_file_changes_is_one_reload_after_watch_delay() {
    let mut w = World::obedient(with(policy(2), |p| {
        p.watch = vec!["/srv".into()];
        p.watch_delay = MS(500);
    }));
    for _ in 0..10 {
        w.send(Event::FilesChanged);
        w.advance(MS(100));
    }
    assert!(w.starting().is_empty(), "still saving: no reload yet");
    w.advance(MS(400));
    assert_eq!(w.core.state_name(), "reloading");
    while let Some(id) = w.starting().first().copied() {
        w.listening(id);
    }
    w.advance(Duration::from_secs(5));
    assert_eq!(w.reloaded(), 2, "one reload of both workers");
    assert_eq!(w.spawned.len(), 4);
    // Without `watch`, a change does nothing.
    let mut w = World::obedient(policy(2));
    w.send(Event::FilesChanged);
    w.advance(Duration::from_secs(5));
    assert_eq!(w.spawned.len(), 2);
}

#[test]
fn a_worker_exiting_with_a_stop_exit_code_is_not_restarted() {
    let mut w = World::ready(with(policy(2), |p| p.stop_exit_codes = vec![0, 3]));
    let id = w.current()[&1];
    w.exit(id, ExitStatus::Code(3));
    w.advance(Duration::from_secs(10));
    assert_eq!(w.spawned.len(), 2, "slot 1 stays stopped");
    let snap = w.core.snapshot();
    assert_eq!(snap.workers[1].state, "stopped");
    assert_eq!(w.core.state_name(), "ready", "what should run, runs");
    assert_eq!(w.core.status_line(), "1/2 workers ready; stopped: slot 1");
    assert!(w.logs().contains("one of stop_exit_codes"), "{}", w.logs());
    // Another code is a crash, restarted as usual.
    let id = w.current()[&0];
    w.exit(id, ExitStatus::Code(1));
    assert_eq!(w.spawns_since(2), vec![0]);
    // Every slot stopped on purpose: the manager stays up, and a restart
    // starts them again.
    let id = w.starting()[0];
    w.listening(id);
    let id = w.current()[&0];
    w.exit(id, ExitStatus::Code(0));
    assert!(w.core.finished().is_none(), "the manager stays up");
    let r = w.request(Control::Restart);
    for id in w.starting() {
        w.listening(id);
    }
    assert_eq!(w.workers_after(r), Some(2));
    assert_eq!(w.core.status_line(), "2/2 workers ready");
}

#[test]
fn autostart_off_starts_nothing_until_a_restart_or_a_scale() {
    let mut w = World::new(with(policy(2), |p| p.autostart = false));
    w.start();
    assert!(w.spawned.is_empty(), "no worker");
    assert!(
        w.notes().iter().any(|n| matches!(n, SdNotify::Ready(_))),
        "the service is up: READY=1"
    );
    assert_eq!(
        w.core.status_line(),
        "0/2 workers ready; stopped: slot 0, 1"
    );
    assert!(w.logs().contains("autostart is off"), "{}", w.logs());
    // A cron or watch reload has nothing to swap.
    let r = w.request(Control::Scale(ScaleTarget::To(1)));
    assert_eq!(w.spawns_since(0), vec![0], "scale 1 starts slot 0");
    let id = w.starting()[0];
    w.listening(id);
    assert_eq!(w.workers_after(r), Some(1));
    let r = w.request(Control::Restart);
    assert_eq!(
        w.spawns_since(1),
        vec![0],
        "restart starts every slot there is"
    );
    let id = w.starting()[0];
    w.listening(id);
    assert_eq!(w.workers_after(r), Some(1));
    let r = w.request(Control::Scale(ScaleTarget::To(3)));
    for id in w.starting() {
        w.listening(id);
    }
    assert_eq!(w.workers_after(r), Some(3));
    assert_eq!(w.core.status_line(), "3/3 workers ready");
}

// ---- drain ----------------------------------------------------------------------

#[test]
fn a_stop_with_drain_before_stop_drains_first_and_keeps_every_worker() {
    let mut w = World::obedient(with(policy(2), |p| {
        p.drain_before_stop = MS(5000);
        p.kill_timeout = MS(1600);
    }));
    w.send(Event::Stop);
    assert_eq!(w.core.state_name(), "draining");
    assert!(
        w.stopped().is_empty(),
        "nobody asked to stop while draining"
    );
    assert!(
        w.notes()
            .contains(&SdNotify::ExtendTimeout(MS(5000 + 1600 + 5000))),
        "{:?}",
        w.notes()
    );
    // Requests are refused: the manager is on its way out.
    let reload = w.request(Control::Reload);
    assert!(matches!(w.answer(reload), Some(Err(CtlError::Stopping(_)))));
    let undrain = w.request(Control::Undrain);
    assert!(matches!(
        w.answer(undrain),
        Some(Err(CtlError::Stopping(_)))
    ));
    // A crash while draining is restarted as ever: it still serves.
    let cur = w.current();
    let mark = w.spawned.len();
    w.crash(cur[&0]);
    assert_eq!(w.spawns_since(mark), vec![0]);
    w.listening(w.starting()[0]);
    w.advance(MS(4999));
    assert!(w.stopped().is_empty(), "still draining at 4999 ms");
    assert_eq!(w.core.snapshot().ready_workers, 2);
    w.advance(MS(1));
    assert_eq!(w.stopped().len(), 2, "every worker asked to stop at 5 s");
    assert_eq!(w.core.finished(), Some(0));
}

#[test]
fn a_second_stop_while_draining_stops_at_once_after_the_same_stop_window() {
    let mut w = World::ready(with(policy(2), |p| p.drain_before_stop = MS(30_000)));
    w.send(Event::Stop);
    w.advance(MS(300));
    w.send(Event::Stop);
    assert!(w.stopped().is_empty(), "the same stop: still draining");
    assert!(w.logs().contains("the same stop"), "{}", w.logs());
    w.advance(MS(2000));
    w.send(Event::Stop);
    assert_eq!(w.stopped().len(), 2, "a later stop stops the workers now");
    assert!(w.killed().is_empty(), "gracefully");
    w.advance(MS(1000));
    w.send(Event::Stop);
    assert_eq!(
        w.killed().len(),
        2,
        "and one more kills, as without a drain"
    );
}

#[test]
fn without_drain_before_stop_a_stop_is_at_once() {
    let mut w = World::ready(policy(2));
    w.send(Event::Stop);
    assert_eq!(w.stopped().len(), 2);
    assert_eq!(w.core.state_name(), "stopping");
}

#[test]
fn a_manager_that_never_was_ready_does_not_drain() {
    let mut w = World::new(with(policy(2), |p| p.drain_before_stop = MS(5000)));
    w.start();
    w.send(Event::Stop);
    assert_eq!(w.stopped().len(), 2, "nothing to take out of a balancer");
}

#[test]
fn drain_and_undrain_change_the_state_and_nothing_else() {
    let mut w = World::ready(policy(2));
    let before = w.core.snapshot();
    assert_eq!(before.health_min_ready, 2);
    let d = w.request(Control::Drain);
    assert!(matches!(w.answer(d), Some(Ok(_))));
    assert_eq!(w.core.state_name(), "draining");
    assert_eq!(w.core.status_line(), "draining: 2/2 workers ready");
    assert!(w.stopped().is_empty());
    // A reload while drained works and leaves the drain on.
    let r = w.request(Control::Reload);
    for _ in 0..2 {
        w.listening(w.starting()[0]);
        w.obey();
    }
    assert!(matches!(w.answer(r), Some(Ok(_))), "{:?}", w.answer(r));
    assert_eq!(w.core.state_name(), "draining");
    let u = w.request(Control::Undrain);
    assert!(matches!(w.answer(u), Some(Ok(_))));
    assert_eq!(w.core.state_name(), "ready");
    let again = w.request(Control::Undrain);
    match w.answer(again) {
        Some(Ok(done)) => assert_eq!(done.message, "was not draining"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_drain_asked_long_enough_before_a_stop_counts() {
    let mut w = World::ready(with(policy(2), |p| p.drain_before_stop = MS(5000)));
    w.request(Control::Drain);
    w.advance(MS(3000));
    w.send(Event::Stop);
    assert!(w.stopped().is_empty());
    w.advance(MS(1999));
    assert!(w.stopped().is_empty(), "2 s left of the 5");
    w.advance(MS(1));
    assert_eq!(w.stopped().len(), 2);
    // Drained for longer than asked: at once.
    let mut w = World::ready(with(policy(2), |p| p.drain_before_stop = MS(5000)));
    w.request(Control::Drain);
    w.advance(MS(6000));
    w.send(Event::Stop);
    assert_eq!(w.stopped().len(), 2);
}

#[test]
fn a_drain_crosses_a_reexec() {
    let mut w = World::ready(policy(2));
    w.request(Control::Drain);
    let state = w.core.export(w.now);
    let back = Core::import(state, w.core.policy().clone(), w.now, Duration::ZERO).unwrap();
    assert_eq!(back.state_name(), "draining");
}

#[test]
fn health_wants_every_slot_but_those_a_reload_swaps_or_what_is_configured() {
    let mut w = World::ready(with(policy(4), |p| p.reload_parallel = 2));
    assert_eq!(w.core.snapshot().health_min_ready, 4);
    w.request(Control::Reload);
    assert_eq!(w.core.snapshot().health_min_ready, 2);
    let w = World::ready(with(policy(4), |p| p.health_min_ready = Some(3)));
    assert_eq!(w.core.snapshot().health_min_ready, 3);
    let w = World::ready(with(policy(2), |p| p.health_min_ready = Some(0)));
    assert_eq!(w.core.snapshot().health_min_ready, 1);
}

// ---- diagnose ---------------------------------------------------------------------

impl World {
    fn diagnosed(&self) -> Vec<(WorkerId, Capture, Duration)> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Diagnose {
                    worker,
                    capture,
                    within,
                    ..
                } => Some((*worker, *capture, *within)),
                _ => None,
            })
            .collect()
    }
}

fn diagnose(instance: u32, capture: Capture) -> Control {
    Control::Diagnose(Diagnosis {
        instance,
        capture,
        resume: false,
    })
}

#[test]
fn a_diagnosed_worker_is_captured_only_once_its_replacement_serves_then_stopped() {
    let mut w = World::ready(policy(2));
    let old = w.current();
    let mark = w.spawned.len();
    let r = w.request(diagnose(1, Capture::HeapSnapshot));
    assert_eq!(w.spawns_since(mark), vec![1], "a replacement first");
    assert!(w.diagnosed().is_empty(), "nothing out of rotation yet");
    assert!(w.stopped().is_empty());
    let new = w.starting()[0];
    w.listening(new);
    // Out of rotation and captured, not stopped.
    assert_eq!(w.diagnosed().len(), 1);
    assert_eq!(w.diagnosed()[0].0, old[&1]);
    assert!(w.stopped().is_empty(), "{:?}", w.stopped());
    assert_eq!(w.current()[&1], new);
    assert!(w.answer(r).is_none(), "answered before the capture");
    // A long capture is not cut at kill_timeout.
    w.advance(MS(30_000));
    assert!(w.killed().is_empty());
    w.send(Event::Diagnosed {
        worker: old[&1],
        result: Ok("/var/lib/app/nodeherd-diagnostics/heap.heapsnapshot".into()),
    });
    assert_eq!(w.stopped(), vec![(old[&1], StopBy::Signal)]);
    assert!(w.answer(r).is_none(), "answered before it is gone");
    w.exit(old[&1], ExitStatus::Code(0));
    match w.answer(r) {
        Some(Ok(d)) => assert_eq!(
            d.message,
            "/var/lib/app/nodeherd-diagnostics/heap.heapsnapshot"
        ),
        other => panic!("{other:?}"),
    }
    // The slot is not counted as restarted, nor the worker as crashed.
    assert_eq!(w.core.snapshot().workers[1].restarts, 0);
}

impl World {
    fn resumed(&self) -> Vec<WorkerId> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Resume { worker } => Some(*worker),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn a_diagnosis_then_resume_captures_in_place_unwatched_and_puts_the_same_worker_back() {
    let mut w = World::ready(with(policy(2), |p| p.max_event_loop_delay = Some(MS(1000))));
    let cur = w.current();
    beat(&mut w, cur[&0]);
    beat(&mut w, cur[&1]);
    let mark = w.spawned.len();
    let r = w.request(Control::Diagnose(Diagnosis {
        instance: 1,
        capture: Capture::HeapSnapshot,
        resume: true,
    }));
    // No replacement: worker 1 itself goes out of rotation at once.
    assert!(w.spawns_since(mark).is_empty(), "no replacement");
    assert_eq!(w.diagnosed().len(), 1);
    assert_eq!(w.diagnosed()[0].0, cur[&1]);
    // Out of rotation: nothing is steered or handed to it.
    assert_eq!(w.core.ready_worker_in(1), None);
    assert_eq!(w.core.serving_slots(), [0].into());
    // A second one meanwhile is refused.
    let r2 = w.request(Control::Diagnose(Diagnosis {
        instance: 0,
        capture: Capture::Stack,
        resume: true,
    }));
    assert!(matches!(w.answer(r2), Some(Err(CtlError::Busy(_)))));
    // A re-exec would leave the capture behind: refused until it is done.
    let r3 = w.request(Control::Reexec);
    assert!(
        matches!(w.answer(r3), Some(Err(CtlError::Busy(_)))),
        "{:?}",
        w.answer(r3)
    );
    // It still beats while it finishes what it holds, then the snapshot
    // stops its loop for long: no beats, yet not hung.
    beat(&mut w, cur[&1]);
    for _ in 0..10 {
        w.advance(MS(900));
        beat(&mut w, cur[&0]);
    }
    assert!(w.spawns_since(mark).is_empty(), "{}", w.logs());
    assert!(w.stopped().is_empty() && w.killed().is_empty());
    assert!(w.resumed().is_empty());
    assert!(w.answer(r).is_none(), "answered before the capture");
    w.send(Event::Diagnosed {
        worker: cur[&1],
        result: Ok("/s/heap.heapsnapshot".into()),
    });
    assert_eq!(w.resumed(), vec![cur[&1]]);
    match w.answer(r) {
        Some(Ok(d)) => assert_eq!(d.message, "/s/heap.heapsnapshot"),
        other => panic!("{other:?}"),
    }
    assert_eq!(w.current(), cur, "the same workers serve");
    assert_eq!(w.core.serving_slots(), [0, 1].into());
    // Watched again: a stuck loop now is a hang.
    beat(&mut w, cur[&1]);
    for _ in 0..2 {
        w.advance(MS(600));
        beat(&mut w, cur[&0]);
    }
    assert_eq!(w.spawns_since(mark), vec![1], "{}", w.logs());
}

#[test]
fn a_capture_that_never_ends_is_killed_at_its_bound_and_the_caller_told() {
    let mut w = World::ready(policy(2));
    let old = w.current();
    let r = w.request(diagnose(0, Capture::CpuProfile(5)));
    let new = w.starting()[0];
    w.listening(new);
    let within = w.diagnosed()[0].2;
    assert_eq!(
        within,
        MS(1600) + Duration::from_secs(35),
        "kill_timeout + 5 s + 30 s"
    );
    w.advance(within);
    assert!(w.killed().is_empty(), "the driver answers by `within`");
    w.advance(MS(1600));
    assert_eq!(w.killed(), vec![old[&0]]);
    w.exit(old[&0], ExitStatus::Signal(9));
    assert!(matches!(w.answer(r), Some(Err(CtlError::Failed(_)))));
}

#[test]
fn a_diagnosis_of_no_such_worker_or_a_silly_profile_is_refused_at_once() {
    let mut w = World::ready(policy(2));
    let mark = w.spawned.len();
    let r = w.request(diagnose(7, Capture::Stack));
    assert!(matches!(
        w.answer(r),
        Some(Err(CtlError::InvalidArgument(_)))
    ));
    let r = w.request(diagnose(0, Capture::CpuProfile(0)));
    assert!(matches!(
        w.answer(r),
        Some(Err(CtlError::InvalidArgument(_)))
    ));
    let r = w.request(diagnose(0, Capture::CpuProfile(100_000)));
    assert!(matches!(
        w.answer(r),
        Some(Err(CtlError::InvalidArgument(_)))
    ));
    assert!(w.spawns_since(mark).is_empty());
}
mod canary;
mod rollback;

mod autoscale;
mod oom;
