//! Autoscaling wired into the core, unit-tested: the load as the driver
//! would sample it each second, and the count that follows it (up under
//! load, down after the quiet period, pinned by a manual scale until the
//! next reload, never past its bounds or the memory budget).

use super::*;
use crate::config::autoscale::Autoscale;

const S: fn(u64) -> Duration = Duration::from_secs;

fn autoscaled(min: u32, max: u32) -> Policy {
    with(policy(min), |p| {
        p.autoscale = Some(Autoscale {
            min,
            max,
            busy_queue: 1,
            busy_elu: 0.8,
            quiet_elu: 0.3,
            up_after: S(5),
            down_after: S(30),
            settle: S(5),
            step: 1,
        });
    })
}

/// What the fake driver measures each second.
#[derive(Clone, Copy)]
struct Sample {
    queued: u32,
    elu: Option<u16>,
    unit_memory_max: Option<u64>,
}

const BUSY_LOOPS: Sample = Sample {
    queued: 0,
    elu: Some(950),
    unit_memory_max: None,
};
const QUEUE: Sample = Sample {
    queued: 3,
    elu: Some(100),
    unit_memory_max: None,
};
const QUIET: Sample = Sample {
    queued: 0,
    elu: Some(20),
    unit_memory_max: None,
};

impl World {
    /// `secs` seconds under `load`: every ready worker beats with its
    /// utilization (none: they keep what they last said), the driver answers each load sample, and new workers
    /// come up at once.
    fn under(&mut self, load: Sample, secs: u64) {
        for _ in 0..secs {
            for id in self.current().into_values().filter(|_| load.elu.is_some()) {
                self.send(Event::Said {
                    worker: id,
                    said: Said::Beat {
                        delay_ms: 1,
                        elu_permille: load.elu,
                        outcomes: None,
                    },
                });
            }
            let mark = self.effects.len();
            self.advance(S(1));
            if self.effects[mark..].contains(&Effect::SampleLoad) {
                self.send(Event::LoadSample {
                    queued: load.queued,
                    unit_memory_max: load.unit_memory_max,
                });
            }
            for id in self.starting() {
                self.listening(id);
            }
        }
    }

    fn slots(&self) -> u32 {
        self.core.snapshot().instances
    }
}

#[test]
fn busy_event_loops_ramp_the_count_up_to_max_one_step_per_settle() {
    let mut w = World::obedient(autoscaled(2, 4));
    w.under(BUSY_LOOPS, 4);
    assert_eq!(w.slots(), 2, "not sustained yet");
    w.under(BUSY_LOOPS, 2);
    assert_eq!(w.slots(), 3);
    assert!(
        w.logs()
            .contains("autoscale: 2 -> 3 workers: event-loop utilization 0.95 >= 0.80 for 5 s"),
        "{}",
        w.logs()
    );
    w.under(BUSY_LOOPS, 60);
    assert_eq!(w.slots(), 4, "never above max");
    assert_eq!(w.core.snapshot().ready_workers, 4);
    let c = w.core.snapshot().counters;
    assert_eq!(
        (c.autoscale_up_event_loop, c.autoscale_up_accept_queue),
        (2, 0)
    );
}

#[test]
fn a_waiting_accept_queue_alone_counts_as_load() {
    let mut w = World::obedient(autoscaled(1, 3));
    w.under(QUEUE, 6);
    assert_eq!(w.slots(), 2);
    assert!(
        w.logs()
            .contains("autoscale: 1 -> 2 workers: accept queue non-empty for 5 s (3 waiting)"),
        "{}",
        w.logs()
    );
    assert_eq!(w.core.snapshot().counters.autoscale_up_accept_queue, 1);
}

#[test]
fn quiet_takes_workers_away_down_to_min() {
    let mut w = World::obedient(autoscaled(2, 5));
    w.under(BUSY_LOOPS, 40);
    assert_eq!(w.slots(), 5);
    w.under(QUIET, 29);
    assert_eq!(w.slots(), 5, "not quiet long enough");
    w.under(QUIET, 2);
    assert_eq!(w.slots(), 4);
    assert!(
        w.logs()
            .contains("autoscale: 5 -> 4 workers: quiet for 30 s")
    );
    w.under(QUIET, 600);
    assert_eq!(w.slots(), 2, "never below min");
    assert!(
        w.alive.len() == 2,
        "the workers of the slots that went are gone"
    );
    assert_eq!(w.core.snapshot().counters.autoscale_down_quiet, 3);
}

#[test]
fn a_manual_scale_pins_the_count_until_the_next_reload() {
    let mut w = World::obedient(autoscaled(1, 6));
    let r = w.request(Control::Scale(ScaleTarget::To(5)));
    w.under(QUIET, 1);
    assert_eq!(w.workers_after(r), Some(5));
    assert!(w.logs().contains("autoscale: paused by a manual scale"));
    assert!(w.core.snapshot().autoscale.unwrap().pinned);
    w.under(QUIET, 300);
    assert_eq!(w.slots(), 5, "pinned: quiet takes nothing away");
    w.under(BUSY_LOOPS, 300);
    assert_eq!(w.slots(), 5, "pinned: load adds nothing");
    let r = w.request(Control::Reload);
    for _ in 0..20 {
        w.under(BUSY_LOOPS, 1);
    }
    assert!(w.answer(r).is_some_and(|a| a.is_ok()));
    assert!(w.logs().contains("autoscale: resumed by a reload"));
    assert!(!w.core.snapshot().autoscale.unwrap().pinned);
    w.under(BUSY_LOOPS, 30);
    assert_eq!(w.slots(), 6, "the reload handed the count back");
}

#[test]
fn the_memory_budget_caps_the_count_below_max() {
    // MemoryMax= 1 GiB over max_memory 300 MiB: three workers fit.
    let mut w = World::obedient(with(autoscaled(1, 8), |p| {
        p.max_memory = Some(300 << 20);
    }));
    let load = Sample {
        unit_memory_max: Some(1 << 30),
        ..BUSY_LOOPS
    };
    w.under(load, 300);
    assert_eq!(w.slots(), 3);
    assert_eq!(w.core.snapshot().autoscale.unwrap().ceiling, 3);
}

#[test]
fn a_worker_that_claims_to_be_busy_cannot_make_the_manager_fork_without_bound() {
    // One worker out of two lies with the highest utilization it can say
    // (the parser caps it at 1000 thousandths), the other is idle: the mean
    // is enough to scale, but the count stops at max, one step per settle.
    let mut w = World::obedient(autoscaled(2, 4));
    for _ in 0..600 {
        let liar = w.current()[&0];
        w.send(Event::Said {
            worker: liar,
            said: Said::Beat {
                delay_ms: 1,
                elu_permille: Some(u16::MAX),
                outcomes: None,
            },
        });
        w.under(Sample { elu: None, ..QUIET }, 1);
    }
    assert_eq!(w.slots(), 4);
    assert!(w.spawned.len() <= 4, "{:?}", w.spawned);
}

#[test]
fn without_min_and_max_nothing_is_sampled() {
    let mut w = World::obedient(policy(2));
    w.advance(S(60));
    assert!(!w.effects.contains(&Effect::SampleLoad));
    assert!(w.core.snapshot().autoscale.is_none());
}

#[test]
fn a_re_exec_carries_the_pin_and_goes_on_sampling() {
    let mut w = World::obedient(autoscaled(1, 6));
    let r = w.request(Control::Scale(ScaleTarget::To(3)));
    w.under(QUIET, 1);
    assert_eq!(w.workers_after(r), Some(3));
    let state = w.core.export(w.now);
    let policy = w.core.policy().clone();
    w.core = Core::import(state, policy, w.now, Duration::ZERO).unwrap();
    assert!(w.core.snapshot().autoscale.unwrap().pinned);
    w.effects.clear();
    w.under(QUIET, 3);
    assert!(w.effects.contains(&Effect::SampleLoad));
}

#[test]
fn a_reload_keeps_the_count_reached_within_the_new_bounds() {
    let mut w = World::obedient(autoscaled(1, 6));
    w.under(BUSY_LOOPS, 40);
    assert_eq!(w.slots(), 6);
    // A new min of 2 changes `instances` (min): the count reached stays.
    let r = w.reconfigure(autoscaled(2, 6), 1, "instances 1 → 2");
    for _ in 0..20 {
        w.under(QUEUE, 1);
    }
    assert!(w.answer(r).is_some_and(|a| a.is_ok()), "{}", w.logs());
    assert_eq!(w.slots(), 6);
    // A max below it brings it down to max.
    let r = w.reconfigure(autoscaled(2, 4), 2, "autoscale changed");
    for _ in 0..20 {
        w.under(QUEUE, 1);
    }
    assert!(w.answer(r).is_some_and(|a| a.is_ok()), "{}", w.logs());
    assert_eq!(w.slots(), 4);
    assert_eq!(w.core.snapshot().autoscale.unwrap().max, 4);
}

#[test]
fn no_worker_is_added_while_the_app_drains_for_a_stop() {
    let mut w = World::obedient(with(autoscaled(1, 4), |p| {
        p.drain_before_stop = S(30);
    }));
    w.send(Event::Stop);
    assert_eq!(w.core.state_name(), "draining");
    w.under(QUEUE, 20);
    assert_eq!(w.slots(), 1, "{}", w.logs());
}
