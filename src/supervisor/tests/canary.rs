//! The canary reload, unit-tested: a canary and a fresh baseline judged by
//! what they report after the soak, with every way the soak can end.

use super::*;
use crate::config::canary::{Canary, ReloadStrategy};
use crate::outcomes::Outcomes;

const SOAK: Duration = Duration::from_secs(2);

fn canary_policy(instances: u32) -> Policy {
    with(policy(instances), |p| {
        p.reload_strategy = ReloadStrategy::Canary;
        p.canary = Canary {
            soak: SOAK,
            max_soak: SOAK * 4,
            min_requests: 100,
            ..Canary::default()
        };
    })
}

impl World {
    fn generation_of(&self, id: WorkerId) -> u64 {
        let i = self.spawned.iter().position(|(w, _)| *w == id).unwrap();
        self.generations[i]
    }

    /// A heartbeat reporting `ok` fast 2xx and `errors` fast 5xx so far.
    fn report(&mut self, id: WorkerId, ok: u64, errors: u64) {
        let mut o = Outcomes::default();
        o.classes[1] = ok;
        o.classes[4] = errors;
        o.buckets[0] = ok + errors;
        self.send(Event::Said {
            worker: id,
            said: Said::Beat {
                delay_ms: 2,
                elu_permille: None,
                outcomes: Some(Box::new(o)),
            },
        });
    }

    /// The canary reload's first two workers: (canary, baseline), ready.
    fn canary_and_baseline(&mut self) -> (WorkerId, WorkerId) {
        let both = self.starting();
        assert_eq!(both.len(), 2, "a canary and a baseline at the same moment");
        let (c, b) = (both[0], both[1]);
        assert_eq!(
            (self.generation_of(c), self.generation_of(b)),
            (1, 0),
            "the canary runs the new configuration, the baseline the one in force"
        );
        self.listening(c);
        self.listening(b);
        assert!(
            self.starting().is_empty(),
            "the rolling swap waits for the verdict"
        );
        (c, b)
    }

    fn finished(&self) -> Vec<(bool, String)> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Bus(BusSignal::ReloadFinished { ok, message }) => {
                    Some((*ok, message.clone()))
                }
                _ => None,
            })
            .collect()
    }

    fn generations_serving(&self) -> Vec<u64> {
        self.current()
            .values()
            .map(|id| self.generation_of(*id))
            .collect()
    }
}

/// A ready world of `n` workers asked for a canary reload to generation 1.
fn canary_reload(n: u32) -> (World, ReplyId) {
    let mut w = World::obedient(canary_policy(n));
    let r = w.reconfigure(canary_policy(n), 1, "env RELEASE changed");
    (w, r)
}

#[test]
fn a_canary_as_good_as_its_baseline_lets_the_rolling_swap_go_on() {
    let (mut w, r) = canary_reload(3);
    let (c, b) = w.canary_and_baseline();
    w.report(c, 500, 1);
    w.report(b, 480, 0);
    w.advance(SOAK - MS(1));
    assert!(w.starting().is_empty(), "no verdict before the soak is up");
    w.advance(MS(1));
    assert!(
        w.logs()
            .contains("canary passed: canary 5xx 0.2 % vs baseline 0.0 %"),
        "{}",
        w.logs()
    );
    // Then the others, the baseline's slot too, one at a time.
    for _ in 0..2 {
        let next = w.starting();
        assert_eq!(next.len(), 1);
        assert_eq!(w.generation_of(next[0]), 1);
        w.listening(next[0]);
    }
    assert_eq!(w.workers_after(r), Some(3));
    assert_eq!(w.generations_serving(), vec![1, 1, 1]);
    assert_eq!(w.core.generation(), 1);
}

#[test]
fn a_canary_worse_in_5xx_is_rolled_back_and_the_reload_fails_with_the_numbers() {
    let (mut w, r) = canary_reload(3);
    let (c, b) = w.canary_and_baseline();
    w.report(c, 966, 238);
    w.report(b, 1187, 0);
    w.advance(SOAK);
    // The canary's slot goes back to the configuration in force, the new
    // worker first: no moment without a worker.
    let back = w.starting();
    assert_eq!(back.len(), 1);
    assert_eq!(w.generation_of(back[0]), 0);
    assert!(
        !w.stopped().iter().any(|(id, _)| *id == c),
        "the canary serves until its replacement is ready"
    );
    assert_eq!(w.answer(r), None);
    w.listening(back[0]);
    let want =
        "reload rolled back: canary 5xx 19.8 % vs baseline 0.0 % over 1,204 / 1,187 requests";
    match w.answer(r) {
        Some(Err(CtlError::ReloadFailed(m))) => assert!(m.starts_with(want), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(&w.finished()[..], [(false, m)] if m.starts_with(want)));
    assert_eq!(w.generations_serving(), vec![0, 0, 0]);
    assert_eq!(
        w.core.generation(),
        0,
        "the new configuration never came into force"
    );
    assert_eq!(w.core.snapshot().counters.reloads_rolled_back, 1);
    assert_eq!(w.core.snapshot().counters.reloads_ok, 0);
    // The next crash restarts under the configuration in force.
    let serving = w.current()[&0];
    w.crash(serving);
    let again = w.current()[&0];
    assert_eq!(w.generation_of(again), 0);
}

#[test]
fn too_few_requests_soak_on_until_min_requests_or_max_soak() {
    let (mut w, r) = canary_reload(2);
    let (c, b) = w.canary_and_baseline();
    w.report(c, 50, 0);
    w.report(b, 50, 0);
    w.advance(SOAK);
    assert!(
        w.starting().is_empty(),
        "50 requests a side is below min_requests"
    );
    // Once both have enough, the next look decides: a bad canary is caught.
    w.report(c, 100, 30);
    w.report(b, 130, 0);
    w.advance(MS(1000));
    assert_eq!(w.generation_of(w.starting()[0]), 0, "rolled back");
    w.listening(w.starting()[0]);
    assert!(matches!(w.answer(r), Some(Err(CtlError::ReloadFailed(_)))));

    // Never enough by max_soak: judged by crashes and hangs only, and it
    // goes on (a quiet app can still deploy with a canary).
    let (mut w, r) = canary_reload(2);
    let (c, b) = w.canary_and_baseline();
    w.report(c, 3, 3);
    w.report(b, 5, 0);
    w.advance(SOAK * 4 - MS(1));
    assert!(w.starting().is_empty());
    w.advance(MS(1));
    assert!(
        w.logs().contains("canary not compared: too few requests"),
        "{}",
        w.logs()
    );
    w.listening(w.starting()[0]);
    assert_eq!(w.workers_after(r), Some(2));
    assert_eq!(w.generations_serving(), vec![1, 1]);
}

#[test]
fn a_canary_that_crashes_during_the_soak_is_rolled_back_at_once() {
    let (mut w, r) = canary_reload(3);
    let (c, _) = w.canary_and_baseline();
    w.advance(MS(300));
    w.crash(c);
    let back = w.starting();
    assert_eq!(back.len(), 1, "{:?}", w.logs());
    assert_eq!(w.generation_of(back[0]), 0);
    w.listening(back[0]);
    match w.answer(r) {
        Some(Err(CtlError::ReloadFailed(m))) => {
            assert!(
                m.contains("the canary (slot 0) died during the soak"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(w.generations_serving(), vec![0, 0, 0]);
    // The soak's timer has nothing left to judge.
    w.advance(SOAK * 5);
    assert!(w.starting().is_empty());
}

#[test]
fn a_baseline_that_dies_leaves_nothing_to_compare_with_so_the_canary_goes_too() {
    let (mut w, r) = canary_reload(2);
    let (_, b) = w.canary_and_baseline();
    w.crash(b);
    for id in w.starting() {
        w.listening(id);
    }
    assert!(matches!(w.answer(r), Some(Err(CtlError::ReloadFailed(m))) if m.contains("baseline")));
    assert_eq!(w.generations_serving(), vec![0, 0]);
}

#[test]
fn a_canary_whose_event_loop_hangs_is_rolled_back_at_once() {
    let hangs = |p: Policy| with(p, |p| p.max_event_loop_delay = Some(MS(500)));
    let mut w = World::obedient(hangs(canary_policy(2)));
    let r = w.reconfigure(hangs(canary_policy(2)), 1, "release");
    let (c, b) = w.canary_and_baseline();
    w.report(c, 1, 0);
    for _ in 0..3 {
        w.advance(MS(200));
        w.report(b, 1, 0);
    }
    assert!(
        w.logs()
            .contains("canary rolled back: the canary's event loop did not answer")
    );
    let back = w.starting();
    assert_eq!(w.generation_of(back[0]), 0);
    w.listening(back[0]);
    assert!(matches!(w.answer(r), Some(Err(CtlError::ReloadFailed(_)))));
}

#[test]
fn a_canary_over_max_memory_restart_is_rolled_back_at_once() {
    let capped = |p: Policy| with(p, |p| p.max_memory_restart = Some(100 << 20));
    let mut w = World::obedient(capped(canary_policy(2)));
    let r = w.reconfigure(capped(canary_policy(2)), 1, "release");
    let (c, _) = w.canary_and_baseline();
    w.rss.insert(0, 300 << 20);
    w.advance(super::super::policy::MEMORY_CHECK_EVERY);
    assert!(w.logs().contains("the canary uses 300 MiB"), "{}", w.logs());
    let back = w.starting();
    assert_eq!(w.generation_of(back[0]), 0);
    w.listening(back[0]);
    assert!(w.stopped().iter().any(|(id, _)| *id == c));
    assert!(matches!(w.answer(r), Some(Err(CtlError::ReloadFailed(_)))));
}

#[test]
fn a_stop_during_the_soak_answers_the_reload_and_the_soak_ends_with_it() {
    let (mut w, r) = canary_reload(2);
    w.canary_and_baseline();
    w.send(Event::Stop);
    assert!(matches!(w.answer(r), Some(Err(CtlError::Stopping(_)))));
    w.advance(SOAK * 5);
    assert!(w.starting().is_empty());
    assert_eq!(w.core.finished(), Some(0));
}

#[test]
fn a_scale_during_the_soak_waits_for_the_verdict() {
    let (mut w, r) = canary_reload(2);
    let (c, b) = w.canary_and_baseline();
    let s = w.request(Control::Scale(ScaleTarget::To(3)));
    assert!(w.starting().is_empty(), "the scale waits");
    w.report(c, 200, 100);
    w.report(b, 300, 0);
    w.advance(SOAK);
    w.listening(w.starting()[0]);
    assert!(matches!(w.answer(r), Some(Err(CtlError::ReloadFailed(_)))));
    // Then the scale, under the configuration in force.
    let added = w.starting();
    assert_eq!(added.len(), 1);
    assert_eq!(w.generation_of(added[0]), 0);
    w.listening(added[0]);
    assert_eq!(w.workers_after(s), Some(3));
}

#[test]
fn a_second_reload_during_the_soak_runs_after_the_verdict_as_a_canary_again() {
    let (mut w, r1) = canary_reload(2);
    let (c, b) = w.canary_and_baseline();
    let r2 = w.reconfigure(canary_policy(2), 2, "the fixed release");
    assert!(w.starting().is_empty());
    w.report(c, 200, 100);
    w.report(b, 300, 0);
    w.advance(SOAK);
    w.listening(w.starting()[0]);
    assert!(matches!(w.answer(r1), Some(Err(CtlError::ReloadFailed(_)))));
    assert_eq!(w.answer(r2), None);
    // The second reload judges generation 2 against the one in force (0).
    let both = w.starting();
    assert_eq!(both.len(), 2);
    let (c, b) = (both[0], both[1]);
    assert_eq!((w.generation_of(c), w.generation_of(b)), (2, 0));
    w.listening(c);
    w.listening(b);
    w.report(c, 300, 0);
    w.report(b, 300, 0);
    w.advance(SOAK);
    w.listening(w.starting()[0]);
    assert_eq!(w.workers_after(r2), Some(2));
    assert_eq!(w.generations_serving(), vec![2, 2]);
}

#[test]
fn a_canary_that_dies_before_it_serves_fails_the_reload_and_the_baseline_goes_too() {
    let (mut w, r) = canary_reload(3);
    let both = w.starting();
    w.crash(both[0]);
    assert!(matches!(w.answer(r), Some(Err(CtlError::ReloadFailed(_)))));
    assert!(w.killed().contains(&both[1]));
    assert_eq!(w.generations_serving(), vec![0, 0, 0]);
}

#[test]
fn rolling_stays_the_default_and_one_worker_cannot_have_a_canary() {
    let mut w = World::obedient(policy(2));
    w.reconfigure(policy(2), 1, "x");
    assert_eq!(
        w.starting().len(),
        1,
        "rolling: one at a time (reload_parallel 1)"
    );
    let mut w = World::obedient(canary_policy(1));
    let r = w.reconfigure(canary_policy(1), 1, "x");
    assert!(w.logs().contains("a canary needs a baseline beside it"));
    w.listening(w.starting()[0]);
    assert_eq!(w.workers_after(r), Some(1));
}

#[test]
fn a_reload_asked_with_canary_is_judged_even_under_the_rolling_strategy() {
    let mut w = World::obedient(policy(2));
    let r = ReplyId(900);
    w.send(Event::Reconfigure {
        config: Box::new(NewConfig {
            canary: true,
            resize: false,
            policy: with(policy(2), |p| p.canary.soak = SOAK),
            generation: 1,
            summary: "x".into(),
        }),
        reply: Some(r),
    });
    let (c, b) = w.canary_and_baseline();
    w.report(c, 1000, 0);
    w.report(b, 1000, 0);
    w.advance(SOAK);
    w.listening(w.starting()[0]);
    assert_eq!(w.workers_after(r), Some(2));
    // The next plain reload is rolling again: the flag was this reload's.
    w.reconfigure(policy(2), 2, "y");
    assert_eq!(w.starting().len(), 1);
}

#[test]
fn a_worker_reporting_fewer_requests_than_before_is_not_believed() {
    let mut w = World::ready(policy(2));
    let id = w.current()[&0];
    w.report(id, 100, 5);
    w.report(id, 10, 0);
    w.report(id, 50, 0);
    let o = w.core.snapshot().workers[0].outcomes.unwrap();
    assert_eq!((o.requests(), o.errors()), (105, 5));
    assert_eq!(
        w.logs().matches("lower than before").count(),
        1,
        "said once"
    );
}

#[test]
fn a_rollback_whose_replacement_fails_still_takes_the_canary_out_next() {
    let (mut w, r) = canary_reload(3);
    let (c, b) = w.canary_and_baseline();
    w.report(c, 200, 100);
    w.report(b, 300, 0);
    w.advance(SOAK);
    let back = w.starting()[0];
    w.crash(back);
    assert!(matches!(w.answer(r), Some(Err(CtlError::ReloadFailed(_)))));
    // The canary still serves for now; the swap back comes next.
    let again = w.starting();
    assert_eq!(again.len(), 1, "{}", w.logs());
    assert_eq!(w.generation_of(again[0]), 0);
    w.listening(again[0]);
    assert!(w.stopped().iter().any(|(id, _)| *id == c));
    assert_eq!(w.generations_serving(), vec![0, 0, 0]);
}
