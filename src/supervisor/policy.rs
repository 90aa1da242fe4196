//! What the supervisor needs to know of the app, and the crash policy.
//!
//! [`Policy`] is the part of the configuration the lifecycle depends on;
//! [`after_crash`] is PM2's restart rule as a pure function of a slot's
//! history, so every branch of it is a unit test away.

// Sans-IO: see clippy.toml.
#![deny(clippy::disallowed_methods)]

use std::time::Duration;

use crate::config::App;

/// Longest backoff between restarts of a crashing worker (as PM2).
pub const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// A worker up this long resets the exponential backoff (as PM2).
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);
/// How often worker memory is compared with `max_memory_restart`.
pub const MEMORY_CHECK_EVERY: Duration = Duration::from_secs(5);
/// Memory pressure (`memory.pressure`, `some avg10`, percent of time some
/// task of the worker waited on memory) at which a worker with a memory
/// budget counts as pressed: the kernel is reclaiming it at `memory.high`.
pub const PRESSURE_LIMIT: f64 = 20.0;
/// Memory checks in a row a worker must be pressed before it is replaced:
/// a GC burst is not sustained pressure.
pub const PRESSURE_CHECKS: u32 = 3;
/// How long a slot that goes (`balance: reuseport`) may take to empty its
/// accept queue before its worker is asked to stop anyway.
pub const LEAVE_BOUND: Duration = Duration::from_secs(1);
/// A stop request this soon after the first is the same stop (a signal
/// that reached the manager twice); later, it kills every worker at once.
pub const SAME_STOP: Duration = Duration::from_secs(1);
/// Requests that may wait behind a running operation; more are refused as busy.
pub const MAX_QUEUED: usize = 64;

/// The app's configuration as the lifecycle reads it, and what the manager
/// decided of it at start. The settings themselves are the app's own
/// (`listen_timeout`, `max_restarts`, …, read through `Deref`): one source
/// of truth, no copy to keep in step.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub app: App,
    /// Slots in force (the configured count until a live scale changes it).
    pub instances: u32,
    /// Whether workers can say they are ready at all (a Node worker, or
    /// `wait_ready`); if not, started means ready.
    pub reports_readiness: bool,
    /// A Node worker with no socket handed over and no `wait_ready`: ready
    /// at its first listen (a port it shares with the other workers), or,
    /// an app that never listens (a queue consumer), when `listen_timeout`
    /// has passed, as PM2's cluster mode does; never killed for not
    /// listening.
    pub listen_optional: bool,
    /// systemd's watchdog interval (`WATCHDOG_USEC`), if any.
    pub watchdog: Option<Duration>,
    /// Each slot has sockets of its own (`balance: reuseport`): a slot that
    /// goes is steered away from and its queue emptied before its worker stops.
    pub per_slot_sockets: bool,
}

impl std::ops::Deref for Policy {
    type Target = App;
    fn deref(&self) -> &App {
        &self.app
    }
}

impl std::ops::DerefMut for Policy {
    fn deref_mut(&mut self) -> &mut App {
        &mut self.app
    }
}

impl Policy {
    /// The policy for `app`, whose workers inherit listening sockets or
    /// not (`has_sockets`), each slot its own (`per_slot`) or shared.
    pub fn new(app: &App, has_sockets: bool, per_slot: bool, watchdog: Option<Duration>) -> Policy {
        let node = matches!(app.interpreter, crate::config::Interpreter::Node(_));
        let mut app = app.clone();
        app.reload_parallel = app.reload_parallel.max(1);
        Policy {
            instances: app.instances,
            reports_readiness: app.wait_ready || node,
            listen_optional: node && !has_sockets && !app.wait_ready,
            watchdog,
            per_slot_sockets: has_sockets && per_slot,
            app,
        }
    }
}

/// A slot's crash history, as the restart rule sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct History {
    /// Deaths in a row of workers younger than `min_uptime`.
    pub unstable: u32,
    /// The last exponential backoff delay (zero: none yet).
    pub backoff: Duration,
}

/// What to do with a slot whose worker died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start a new worker after this delay (zero: at once).
    Restart(Duration),
    /// Give up on the slot; the text says why.
    Errored(String),
}

/// PM2's rule: restart unless `autorestart` is off or the slot died more
/// than `max_restarts` times in a row, each time younger than `min_uptime`;
/// wait `restart_delay`, or an exponential backoff (x1.5 per restart, capped
/// at 15 s, reset by a worker that stayed up 30 s).
pub fn after_crash(p: &Policy, h: &mut History, uptime: Duration, cause: &str) -> Decision {
    if !p.autorestart {
        return Decision::Errored(format!("{cause}; autorestart is off"));
    }
    if uptime >= p.min_uptime {
        h.unstable = 0;
    } else {
        h.unstable += 1;
    }
    if h.unstable > p.max_restarts {
        return Decision::Errored(format!(
            "{cause}; it died {} times in a row within min_uptime ({} ms), more than max_restarts ({})",
            h.unstable,
            p.min_uptime.as_millis(),
            p.max_restarts
        ));
    }
    if p.exp_backoff_restart_delay.is_zero() {
        return Decision::Restart(p.restart_delay);
    }
    h.backoff = if uptime >= BACKOFF_RESET_AFTER || h.backoff.is_zero() {
        p.exp_backoff_restart_delay
    } else {
        h.backoff.mul_f64(1.5).min(MAX_BACKOFF)
    };
    Decision::Restart(h.backoff)
}

/// A policy with PM2's defaults, for tests: app `app`, two workers on a
/// shared socket.
#[cfg(test)]
pub fn test_policy() -> Policy {
    let mut app = crate::config::test_app();
    app.name = "app".into();
    Policy::new(&app, true, false, None)
}

/// `base` changed by `f`, for tests: `with(policy(2), |p| p.wait_ready = true)`.
#[cfg(test)]
pub fn with(mut base: Policy, f: impl FnOnce(&mut Policy)) -> Policy {
    f(&mut base);
    base
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        test_policy()
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn restarts_at_once_by_default_and_after_restart_delay() {
        let mut p = policy();
        let mut h = History::default();
        assert_eq!(
            after_crash(&p, &mut h, MS(10), "x"),
            Decision::Restart(Duration::ZERO)
        );
        p.restart_delay = MS(250);
        assert_eq!(
            after_crash(&p, &mut h, MS(10), "x"),
            Decision::Restart(MS(250))
        );
    }

    #[test]
    fn errored_after_more_than_max_restarts_unstable_deaths() {
        let mut p = policy();
        p.max_restarts = 2;
        let mut h = History::default();
        for _ in 0..2 {
            assert!(matches!(
                after_crash(&p, &mut h, MS(10), "boom"),
                Decision::Restart(_)
            ));
        }
        match after_crash(&p, &mut h, MS(10), "boom") {
            Decision::Errored(why) => {
                assert_eq!(
                    why,
                    "boom; it died 3 times in a row within min_uptime (1000 ms), more than max_restarts (2)"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_stable_worker_resets_the_unstable_count() {
        let mut p = policy();
        p.max_restarts = 1;
        let mut h = History::default();
        assert!(matches!(
            after_crash(&p, &mut h, MS(10), "x"),
            Decision::Restart(_)
        ));
        // Up longer than min_uptime: the count starts again.
        assert!(matches!(
            after_crash(&p, &mut h, MS(1000), "x"),
            Decision::Restart(_)
        ));
        assert_eq!(h.unstable, 0);
        assert!(matches!(
            after_crash(&p, &mut h, MS(10), "x"),
            Decision::Restart(_)
        ));
        assert!(matches!(
            after_crash(&p, &mut h, MS(10), "x"),
            Decision::Errored(_)
        ));
    }

    #[test]
    fn autorestart_off_errors_at_once() {
        let mut p = policy();
        p.autorestart = false;
        assert_eq!(
            after_crash(&p, &mut History::default(), MS(5000), "exited with code 0"),
            Decision::Errored("exited with code 0; autorestart is off".into())
        );
    }

    #[test]
    fn exponential_backoff_grows_caps_and_resets() {
        let mut p = policy();
        p.exp_backoff_restart_delay = MS(100);
        p.max_restarts = 1000;
        let mut h = History::default();
        let mut delays = Vec::new();
        for _ in 0..5 {
            match after_crash(&p, &mut h, MS(10), "x") {
                Decision::Restart(d) => delays.push(d.as_millis()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(delays, vec![100, 150, 225, 337, 506]);
        for _ in 0..20 {
            after_crash(&p, &mut h, MS(10), "x");
        }
        assert_eq!(h.backoff, MAX_BACKOFF, "capped at 15 s");
        // A worker that stayed up 30 s starts the backoff over.
        assert_eq!(
            after_crash(&p, &mut h, BACKOFF_RESET_AFTER, "x"),
            Decision::Restart(MS(100))
        );
    }
}
