//! When a worker count that follows the load (`instances: {min, max}`)
//! should change, and why: the decision alone, on signals the driver
//! samples (the listening sockets' accept queues, each worker's event-loop
//! utilization) and a virtual clock, so it is unit-tested like the rest of
//! the core. The core samples and acts on it in `scaling.rs`.
//!
//! Up when the load is sustained (an accept queue that stays non-empty, or
//! workers busy most of the time), one worker at a time, never above `max`
//! or the memory budget; down after a quiet period, never below `min`; a
//! pause after each change so the new count is measured before the next.
//! A manual `Scale` pins the count until the next reload.

use std::time::{Duration, Instant};

/// How far the count may move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
}

/// The pace and the thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    /// Busy this long in a row before a worker is added.
    pub up_after: Duration,
    /// Quiet this long in a row before a worker is taken away.
    pub down_after: Duration,
    /// No decision this long after a change.
    pub settle: Duration,
    /// Mean event-loop utilization (0..1) that counts as busy.
    pub busy_elu: f64,
    /// Highest event-loop utilization under which the app is quiet.
    pub quiet_elu: f64,
    /// Connections waiting in the accept queues that count as busy.
    pub busy_queue: u32,
    /// Workers added at one decision.
    pub step: u32,
}

impl Pace {
    /// The pace the configuration's `autoscale` block sets.
    pub fn of(a: &crate::config::autoscale::Autoscale) -> Pace {
        Pace {
            up_after: a.up_after,
            down_after: a.down_after,
            settle: a.settle,
            busy_elu: a.busy_elu,
            quiet_elu: a.quiet_elu,
            busy_queue: a.busy_queue.max(1),
            step: a.step.max(1),
        }
    }
}

impl Default for Pace {
    fn default() -> Pace {
        Pace {
            up_after: Duration::from_secs(10),
            down_after: Duration::from_secs(60),
            settle: Duration::from_secs(10),
            busy_elu: 0.8,
            quiet_elu: 0.3,
            busy_queue: 1,
            step: 1,
        }
    }
}

/// One sample of the load.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Load {
    /// Connections waiting in the accept queues (all sockets).
    pub queued: u32,
    /// Each ready worker's event-loop utilization over its last heartbeat.
    pub elu: Vec<f64>,
}

/// A change of the worker count, with its reason in words.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub from: u32,
    pub to: u32,
    pub why: Why,
    pub reason: String,
}

/// Which signal decided, for the metrics' `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Connections waited in the accept queues.
    AcceptQueue,
    /// The workers' event loops were busy.
    EventLoop,
    /// Neither, for the quiet period.
    Quiet,
}

impl Why {
    pub fn label(self) -> &'static str {
        match self {
            Why::AcceptQueue => "accept_queue",
            Why::EventLoop => "event_loop",
            Why::Quiet => "quiet",
        }
    }
}

/// Most workers a memory budget allows: the unit's `MemoryMax=` over each
/// worker's `max_memory`, when both are known (without `max_memory` each
/// worker's budget is `MemoryMax=` shared out, which never overspends).
pub fn memory_cap(unit_memory_max: Option<u64>, max_memory: Option<u64>) -> Option<u32> {
    let (unit, each) = (unit_memory_max?, max_memory?);
    Some(u32::try_from(unit / each.max(1)).unwrap_or(u32::MAX).max(1))
}

/// The decision's memory between samples.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    bounds: Bounds,
    pace: Pace,
    /// Most workers the memory budget allows (the unit's `MemoryMax=` over
    /// each worker's `max_memory`).
    memory_cap: Option<u32>,
    busy_since: Option<Instant>,
    quiet_since: Option<Instant>,
    last_change: Option<Instant>,
    pinned: bool,
}

impl Autoscaler {
    pub fn new(bounds: Bounds, pace: Pace, memory_cap: Option<u32>) -> Autoscaler {
        Autoscaler {
            bounds,
            pace,
            memory_cap,
            busy_since: None,
            quiet_since: None,
            last_change: None,
            pinned: false,
        }
    }

    /// A manual `Scale`: the count stays as asked until [`Autoscaler::unpin`].
    pub fn pin(&mut self) {
        self.pinned = true;
    }

    /// A reload: the configuration decides again.
    pub fn unpin(&mut self) {
        self.pinned = false;
        self.busy_since = None;
        self.quiet_since = None;
    }

    pub fn pinned(&self) -> bool {
        self.pinned
    }

    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    /// The memory budget as last measured (the unit's `MemoryMax=` may
    /// change at a `systemctl set-property`).
    pub fn set_memory_cap(&mut self, cap: Option<u32>) {
        self.memory_cap = cap;
    }

    /// The most workers it would run now: `max`, or fewer under the
    /// memory budget (never below `min`).
    pub fn ceiling(&self) -> u32 {
        self.memory_cap
            .map_or(self.bounds.max, |c| c.min(self.bounds.max))
            .max(self.bounds.min)
    }

    /// A sample at `now` with `current` workers: a change, or none.
    pub fn sample(&mut self, now: Instant, current: u32, load: &Load) -> Option<Decision> {
        let mean = if load.elu.is_empty() {
            0.0
        } else {
            load.elu.iter().sum::<f64>() / load.elu.len() as f64
        };
        let top = load.elu.iter().copied().fold(0.0, f64::max);
        let busy = load.queued >= self.pace.busy_queue || mean >= self.pace.busy_elu;
        let quiet = load.queued == 0 && top < self.pace.quiet_elu;
        self.busy_since = if busy {
            self.busy_since.or(Some(now))
        } else {
            None
        };
        self.quiet_since = if quiet {
            self.quiet_since.or(Some(now))
        } else {
            None
        };
        if self.pinned
            || self
                .last_change
                .is_some_and(|t| now.duration_since(t) < self.pace.settle)
        {
            return None;
        }
        let held = |since: Option<Instant>| since.map_or(Duration::ZERO, |s| now.duration_since(s));
        let decision = if held(self.busy_since) >= self.pace.up_after && current < self.ceiling() {
            let (why, reason) = if load.queued >= self.pace.busy_queue {
                (
                    Why::AcceptQueue,
                    format!(
                        "accept queue non-empty for {} s ({} waiting)",
                        self.pace.up_after.as_secs(),
                        load.queued
                    ),
                )
            } else {
                (
                    Why::EventLoop,
                    format!(
                        "event-loop utilization {mean:.2} >= {:.2} for {} s",
                        self.pace.busy_elu,
                        self.pace.up_after.as_secs()
                    ),
                )
            };
            Decision {
                from: current,
                to: current.saturating_add(self.pace.step).min(self.ceiling()),
                why,
                reason,
            }
        } else if held(self.quiet_since) >= self.pace.down_after && current > self.bounds.min {
            Decision {
                from: current,
                to: current - 1,
                why: Why::Quiet,
                reason: format!(
                    "quiet for {} s (accept queue empty, event-loop utilization below {:.2})",
                    self.pace.down_after.as_secs(),
                    self.pace.quiet_elu
                ),
            }
        } else {
            return None;
        };
        self.last_change = Some(now);
        self.busy_since = None;
        self.quiet_since = None;
        Some(decision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn run(
        a: &mut Autoscaler,
        t0: Instant,
        secs: std::ops::Range<u64>,
        n: &mut u32,
        load: &Load,
    ) -> Vec<Decision> {
        let mut out = Vec::new();
        for s in secs {
            if let Some(d) = a.sample(t0 + S(s), *n, load) {
                *n = d.to;
                out.push(d);
            }
        }
        out
    }

    fn busy() -> Load {
        Load {
            queued: 5,
            elu: vec![0.95, 0.9],
        }
    }

    fn idle() -> Load {
        Load {
            queued: 0,
            elu: vec![0.05, 0.02],
        }
    }

    #[test]
    fn sustained_load_adds_a_worker_at_a_time_up_to_max() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(Bounds { min: 2, max: 4 }, Pace::default(), None);
        let mut n = 2;
        // 9 s of load: not yet sustained.
        assert!(run(&mut a, t0, 0..10, &mut n, &busy()).is_empty());
        let d = run(&mut a, t0, 10..11, &mut n, &busy());
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].from, d[0].to), (2, 3));
        assert!(
            d[0].reason.contains("accept queue non-empty"),
            "{}",
            d[0].reason
        );
        assert_eq!(d[0].why, Why::AcceptQueue);
        // The settle pause, then sustained again: 4, and never above.
        let d = run(&mut a, t0, 11..120, &mut n, &busy());
        assert_eq!(d.iter().map(|d| d.to).collect::<Vec<_>>(), vec![4]);
        assert_eq!(n, 4);
    }

    #[test]
    fn busy_event_loops_alone_count_as_load() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(Bounds { min: 1, max: 3 }, Pace::default(), None);
        let mut n = 1;
        let hot = Load {
            queued: 0,
            elu: vec![0.85],
        };
        let d = run(&mut a, t0, 0..11, &mut n, &hot);
        assert_eq!(d.len(), 1);
        assert!(
            d[0].reason.contains("event-loop utilization 0.85"),
            "{}",
            d[0].reason
        );
    }

    #[test]
    fn quiet_takes_workers_away_down_to_min_and_a_blip_starts_over() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(Bounds { min: 2, max: 6 }, Pace::default(), None);
        let mut n = 4;
        assert!(run(&mut a, t0, 0..59, &mut n, &idle()).is_empty());
        // One busy second: the quiet period starts over.
        assert!(
            run(
                &mut a,
                t0,
                59..60,
                &mut n,
                &Load {
                    queued: 1,
                    elu: vec![0.1]
                }
            )
            .is_empty()
        );
        assert!(run(&mut a, t0, 60..119, &mut n, &idle()).is_empty());
        let d = run(&mut a, t0, 119..121, &mut n, &idle());
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].from, d[0].to), (4, 3));
        assert!(d[0].reason.starts_with("quiet for 60 s"), "{}", d[0].reason);
        run(&mut a, t0, 121..1000, &mut n, &idle());
        assert_eq!(n, 2, "never below min");
    }

    #[test]
    fn the_memory_budget_caps_the_count() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(Bounds { min: 1, max: 8 }, Pace::default(), Some(3));
        let mut n = 1;
        run(&mut a, t0, 0..600, &mut n, &busy());
        assert_eq!(n, 3);
    }

    #[test]
    fn a_manual_scale_pins_until_the_next_reload() {
        let t0 = Instant::now();
        let mut a = Autoscaler::new(Bounds { min: 1, max: 8 }, Pace::default(), None);
        let mut n = 5;
        a.pin();
        assert!(run(&mut a, t0, 0..600, &mut n, &idle()).is_empty());
        assert!(run(&mut a, t0, 600..1200, &mut n, &busy()).is_empty());
        a.unpin();
        assert_eq!(run(&mut a, t0, 1200..1211, &mut n, &busy()).len(), 1);
        assert_eq!(n, 6);
    }
}
