//! How much the manager takes from each worker, and when it says a worker
//! floods.
//!
//! A worker is untrusted code (any npm dependency of the app), and what it
//! sends the manager (IPC lines, notify datagrams) costs the manager's one
//! supervisor thread time and memory. So each worker has a budget: a token
//! bucket that refills at a steady rate and holds a burst. What a worker
//! sends past it waits (its IPC channel is not read: the kernel's socket
//! buffer fills and its `process.send` queues in its own memory) or is
//! dropped (notify datagrams, which are read to know who sent them). A
//! worker that stays over its budget for [`FLOOD_SECONDS`] in a row floods:
//! it is replaced. The budgets are far above what a worker needs (a
//! heartbeat a second, a connection count at most ten times a second, a
//! metrics answer per scrape, a listen request per server).

use std::time::{Duration, Instant};

/// IPC lines a worker may send each second, sustained.
pub const IPC_PER_SECOND: u32 = 1000;
/// IPC lines a worker may send at once.
pub const IPC_BURST: u32 = 2000;
/// Bytes an IPC line may carry for the price of one line: longer lines cost
/// more (a 4 MiB metrics answer costs about a thousand).
pub const IPC_BYTES_PER_LINE: usize = 4096;
/// Seconds in a row a worker is over its IPC budget before it is replaced.
pub const FLOOD_SECONDS: u32 = 5;

/// Notify datagrams taken from one worker (and its descendants) each second.
pub const NOTIFY_PER_SECOND: u32 = 100;
pub const NOTIFY_BURST: u32 = 200;
/// `STATUS=` texts logged for one worker: a burst, then one a second.
pub const STATUS_PER_SECOND: u32 = 1;
pub const STATUS_BURST: u32 = 10;

/// A token bucket.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    burst: f64,
    per_second: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(burst: u32, per_second: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            burst: f64::from(burst),
            per_second: f64::from(per_second.max(1)),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.at = now;
    }

    /// Take `cost` tokens (at most a whole burst) if there are enough, or
    /// say how long until there will be.
    pub fn take(&mut self, cost: u32, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        let cost = f64::from(cost).min(self.burst);
        if self.tokens >= cost {
            self.tokens -= cost;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (cost - self.tokens) / self.per_second,
            ))
        }
    }
}

/// What an IPC line costs against [`IPC_PER_SECOND`].
pub fn ipc_cost(bytes: usize) -> u32 {
    u32::try_from(1 + bytes / IPC_BYTES_PER_LINE).unwrap_or(u32::MAX)
}

/// Tells a flood from a burst: a worker over its budget in each of
/// [`FLOOD_SECONDS`] whole seconds in a row.
#[derive(Debug, Clone)]
pub struct FloodWatch {
    second: Instant,
    over_this_second: bool,
    seconds_over: u32,
}

impl FloodWatch {
    pub fn new(now: Instant) -> FloodWatch {
        FloodWatch {
            second: now,
            over_this_second: false,
            seconds_over: 0,
        }
    }

    /// Note something the worker sent at `now` (`over`: it was over its
    /// budget); true once it floods.
    pub fn note(&mut self, now: Instant, over: bool) -> bool {
        let passed = now.saturating_duration_since(self.second).as_secs();
        if passed >= 1 {
            // A second without anything over its budget ends a flood.
            self.seconds_over = if passed == 1 && self.over_this_second {
                self.seconds_over + 1
            } else {
                0
            };
            self.second += Duration::from_secs(passed);
            self.over_this_second = false;
        }
        self.over_this_second |= over;
        self.seconds_over >= FLOOD_SECONDS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_a_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 100, t0);
        for _ in 0..10 {
            assert!(b.take(1, t0).is_ok());
        }
        let wait = b.take(1, t0).unwrap_err();
        assert!(wait > Duration::from_millis(9) && wait <= Duration::from_millis(11));
        assert!(b.take(1, t0 + Duration::from_millis(10)).is_ok());
        assert!(b.take(1, t0 + Duration::from_millis(10)).is_err());
        // Never more than the burst, however long it rested.
        let later = t0 + Duration::from_secs(60);
        assert!(b.take(10, later).is_ok());
        assert!(b.take(1, later).is_err());
        // A cost above the burst costs the burst.
        assert!(b.take(u32::MAX, later + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn long_lines_cost_more() {
        assert_eq!(ipc_cost(0), 1);
        assert_eq!(ipc_cost(100), 1);
        assert_eq!(ipc_cost(4 << 20), 1025);
    }

    #[test]
    fn a_flood_is_over_budget_for_whole_seconds_in_a_row() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut w = FloodWatch::new(t0);
        // Over in seconds 0..5: the verdict comes as second 5 begins.
        let mut verdict = None;
        for ms in (0..7000).step_by(10) {
            if w.note(at(ms), true) && verdict.is_none() {
                verdict = Some(ms);
            }
        }
        assert_eq!(verdict, Some(5000));

        // A burst each second but one quiet second among them: no flood.
        let mut w = FloodWatch::new(t0);
        for s in 0..10u64 {
            if s == 4 {
                continue;
            }
            assert!(!w.note(at(s * 1000 + 5), true), "second {s}");
            assert!(!w.note(at(s * 1000 + 500), false));
        }

        // Over now and then, never a whole run of seconds: no flood.
        let mut w = FloodWatch::new(t0);
        for ms in (0..20_000).step_by(10) {
            assert!(!w.note(at(ms), ms % 3000 < 1000));
        }
    }
}
