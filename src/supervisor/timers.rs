//! The supervisor's timers: owned, keyed, cancellable, and clock-free.
//!
//! The core never sleeps. It arms a deadline under a key, the driver asks
//! for the earliest deadline and calls back when it has passed; tests move
//! a virtual clock instead. Arming a key again moves its deadline, and a
//! worker's timers are cancelled with the worker, so a stale timer never
//! fires on something that is gone.

// Sans-IO: see clippy.toml.
#![deny(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::time::Instant;

use super::events::WorkerId;

/// What a timer is for; at most one timer per key.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum TimerKey {
    /// A starting worker must be ready by then.
    Ready(WorkerId),
    /// A stopping worker is killed then.
    Kill(WorkerId),
    /// A ready worker whose heartbeat has not come by then is hung.
    Hang(WorkerId),
    /// A crashed slot's worker is started again then.
    Restart(u32),
    /// A slot that goes (see `Effect::DrainSlot`) stops its workers then at the latest.
    Leave(u64),
    /// `WATCHDOG=1` to systemd.
    Watchdog,
    /// Compare worker memory with `max_memory_restart`.
    MemoryCheck,
    /// The highest recent total of keep-alive connections is forgotten then.
    Share,
    /// `cron_restart`'s next run.
    Cron,
    /// Files under `watch` have been quiet for `watch_delay`.
    Watch,
    /// `drain_before_stop` is over: the workers are asked to stop.
    DrainStop,
    /// A canary reload's soak is up, or its next look is due.
    Canary,
    /// Autoscaling samples the load.
    Autoscale,
}

#[derive(Debug, Default)]
pub struct Timers {
    due: BTreeMap<TimerKey, Instant>,
}

impl Timers {
    pub fn arm(&mut self, key: TimerKey, at: Instant) {
        self.due.insert(key, at);
    }

    pub fn cancel(&mut self, key: TimerKey) {
        self.due.remove(&key);
    }

    pub fn is_armed(&self, key: TimerKey) -> bool {
        self.due.contains_key(&key)
    }

    /// Every armed timer and its deadline.
    pub fn armed(&self) -> impl Iterator<Item = (TimerKey, Instant)> + '_ {
        self.due.iter().map(|(k, at)| (*k, *at))
    }

    /// The earliest deadline, if any timer is armed.
    pub fn next(&self) -> Option<Instant> {
        self.due.values().min().copied()
    }

    /// Remove and return the timers due at `now`, earliest first.
    pub fn expired(&mut self, now: Instant) -> Vec<TimerKey> {
        let mut due: Vec<(Instant, TimerKey)> = self
            .due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, at)| (*at, *k))
            .collect();
        due.sort();
        for (_, k) in &due {
            self.due.remove(k);
        }
        due.into_iter().map(|(_, k)| k).collect()
    }
}

#[cfg(test)]
// A test takes its starting instant from the clock.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fire_in_deadline_order_and_rearm_moves() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        t.arm(TimerKey::Watchdog, t0 + Duration::from_millis(30));
        t.arm(TimerKey::Restart(1), t0 + Duration::from_millis(10));
        t.arm(TimerKey::MemoryCheck, t0 + Duration::from_millis(20));
        t.arm(TimerKey::Restart(1), t0 + Duration::from_millis(25));
        assert_eq!(t.next(), Some(t0 + Duration::from_millis(20)));
        assert_eq!(t.expired(t0 + Duration::from_millis(5)), vec![]);
        assert_eq!(
            t.expired(t0 + Duration::from_millis(30)),
            vec![
                TimerKey::MemoryCheck,
                TimerKey::Restart(1),
                TimerKey::Watchdog
            ]
        );
        assert_eq!(t.next(), None);
    }

    #[test]
    fn cancelled_timers_never_fire() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        t.arm(TimerKey::Restart(0), t0);
        t.cancel(TimerKey::Restart(0));
        assert!(!t.is_armed(TimerKey::Restart(0)));
        assert!(t.expired(t0 + Duration::from_secs(1)).is_empty());
    }
}
