//! Rollbacks, unit-tested: the driver reads the generation back from the
//! release history and hands the core a reload to it (a new generation,
//! judged by a canary when the configuration in force says so); here, how
//! the core carries that through, with numbers that go on from a history.

use super::*;
use crate::config::canary::{Canary, ReloadStrategy};

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

/// A ready world whose core took its first number from a history (7).
fn numbered_from_history(policy: Policy) -> World {
    let mut w = World::new(policy);
    w.core.generation = 7;
    w.start();
    for id in w.starting() {
        w.listening(id);
    }
    w.obedient = true;
    w.effects.clear();
    w
}

fn generation_of(w: &World, id: WorkerId) -> u64 {
    let i = w.spawned.iter().position(|(x, _)| *x == id).unwrap();
    w.generations[i]
}

fn serving(w: &World) -> Vec<u64> {
    w.current()
        .values()
        .map(|id| generation_of(w, *id))
        .collect()
}

#[test]
fn the_first_workers_and_a_crash_restart_run_the_generation_the_history_numbered() {
    let mut w = numbered_from_history(policy(2));
    assert_eq!(serving(&w), vec![7, 7]);
    assert_eq!(w.core.snapshot().generation, 7);
    let s = w.core.snapshot();
    assert!(s.workers.iter().all(|x| x.generation == Some(7)), "{s:?}");
    let one = w.current()[&0];
    w.crash(one);
    assert_eq!(generation_of(&w, w.current()[&0]), 7);
}

#[test]
fn a_rollback_asked_during_a_canary_soak_waits_for_the_verdict_then_is_judged_itself() {
    let mut w = numbered_from_history(canary_policy(2));
    // Generation 8, judged by a canary.
    let r8 = w.reconfigure(canary_policy(2), 8, "release 8");
    let both = w.starting();
    let (c, b) = (both[0], both[1]);
    assert_eq!((generation_of(&w, c), generation_of(&w, b)), (8, 7));
    w.listening(c);
    w.listening(b);
    // Rolled back meanwhile (back to 7's files, as generation 9): it waits.
    let r9 = w.reconfigure(canary_policy(2), 9, "rollback to 7");
    assert!(w.starting().is_empty(), "nothing starts before the verdict");
    assert_eq!(w.core.generations_wanted(), vec![7, 8, 9]);
    w.advance(SOAK * 4);
    w.listening(w.starting()[0]);
    assert!(w.answer(r8).is_some());
    // Then the rollback runs as a canary of its own against 7 or 8,
    // whichever is in force.
    let both = w.starting();
    assert_eq!(both.len(), 2, "the rollback is judged too");
    assert_eq!(generation_of(&w, both[0]), 9);
    let in_force = w.core.generation();
    assert_eq!(generation_of(&w, both[1]), in_force);
    for id in both {
        w.listening(id);
    }
    w.advance(SOAK * 4);
    for id in w.starting() {
        w.listening(id);
    }
    assert_eq!(w.workers_after(r9), Some(2));
    assert_eq!(serving(&w), vec![9, 9]);
    assert_eq!(w.core.generation(), 9);
    assert_eq!(w.core.generations_wanted(), vec![9]);
}

#[test]
fn a_bare_rollback_request_reaching_the_core_is_a_reload_and_joins_one_waiting() {
    let mut w = numbered_from_history(policy(2));
    let restart = w.request(Control::Restart);
    let reload = w.request(Control::Reload);
    let back = w.request(Control::Rollback(0));
    assert!(
        w.logs()
            .contains("reload requested: joins the reload already waiting"),
        "{}",
        w.logs()
    );
    for _ in 0..4 {
        for id in w.starting() {
            w.listening(id);
        }
    }
    assert_eq!(w.workers_after(restart), Some(2));
    assert_eq!(w.workers_after(reload), Some(2));
    assert_eq!(w.workers_after(back), Some(2));
    assert_eq!(
        serving(&w),
        vec![7, 7],
        "no configuration: the one in force"
    );
}
