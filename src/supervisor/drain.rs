//! Draining: the health endpoint says "take me out" while every worker
//! keeps serving, so a load balancer moves traffic away before anything
//! stops.
//!
//! Two ways in. `Drain()` (`nodeherd drain`) asks for it until `Undrain()`,
//! for maintenance. A stop (SIGTERM, `systemctl stop`) with
//! `drain_before_stop` drains first for that long, telling systemd to wait
//! (`EXTEND_TIMEOUT_USEC=`), and only then asks the workers to stop as any
//! stop does. A second stop during that wait (after the same-stop window)
//! stops at once; a third kills, as without the drain. Nothing a worker
//! says reaches this state: only the control plane and the manager's own
//! signals do.

// Sans-IO: see clippy.toml.
#![deny(clippy::disallowed_methods)]

use std::time::Duration;

use super::core::Core;
use super::events::{Level, ReplyId, SdNotify};
use super::policy::SAME_STOP;
use super::state::{Drain, Op, Phase};
use super::timers::TimerKey;
use crate::control::{Control, CtlError, Done};

impl Core {
    /// Draining before a stop: no operation is taken any more.
    pub(super) fn draining_for_stop(&self) -> bool {
        matches!(self.drain, Some((Drain::BeforeStop, _)))
    }

    /// Whether `Drain()` asked for a drain that is still on (it crosses a re-exec).
    pub fn drain_asked(&self) -> bool {
        matches!(self.drain, Some((Drain::Asked, _)))
    }

    /// `Drain()` or `Undrain()`: answered at once, never queued.
    pub(super) fn drain_request(&mut self, what: Control, reply: Option<ReplyId>) {
        let workers = self.slots.len() as i32;
        let done = |message: String| Ok(Done { workers, message });
        let result = if self.phase == Phase::Stopping || self.draining_for_stop() {
            Err(CtlError::Stopping(
                "the manager is stopping: it drains until its workers are gone".into(),
            ))
        } else if what == Control::Drain {
            if self.drain.is_some() {
                done("already draining".into())
            } else {
                self.drain = Some((Drain::Asked, self.now));
                self.log(
                    Level::Notice,
                    "draining: the health endpoint answers 503 (agent: drain); workers keep \
                     serving until `nodeherd undrain`"
                        .into(),
                );
                done("draining: the health endpoint answers 503; workers keep serving".into())
            }
        } else if self.drain.take().is_some() {
            self.log(
                Level::Notice,
                "undrained: the health endpoint answers by the ready workers again".into(),
            );
            done("undrained: the health endpoint answers by the ready workers again".into())
        } else {
            done("was not draining".into())
        };
        self.reply_opt(reply, result);
    }

    /// SIGTERM or SIGINT: drain first if `drain_before_stop` says so.
    pub(super) fn on_stop(&mut self) {
        let wait = self.policy.drain_before_stop;
        if self.draining_for_stop() {
            let since = self.drain.map_or(self.now, |(_, t)| t);
            if self.now.saturating_duration_since(since) < SAME_STOP {
                self.log(
                    Level::Info,
                    "stop requested again while draining: the same stop (again later to stop the \
                     workers at once)"
                        .into(),
                );
                return;
            }
            self.log(
                Level::Warning,
                "stop requested again while draining: asking every worker to stop now".into(),
            );
            self.timers.cancel(TimerKey::DrainStop);
            return self.begin_stop(0);
        }
        // Nothing to drain: a manager that never said it is up, one
        // already stopping, or no drain configured.
        if self.phase == Phase::Stopping || wait.is_zero() || !self.ready_sent {
            return self.begin_stop(0);
        }
        // A drain asked for earlier counts: the balancer may know already.
        let drained_for = match self.drain {
            Some((Drain::Asked, since)) => self.now.saturating_duration_since(since),
            _ => Duration::ZERO,
        };
        let left = wait.saturating_sub(drained_for);
        if left.is_zero() {
            self.log(
                Level::Info,
                format!(
                    "stopping: drained for {} ms already (drain_before_stop: {} ms)",
                    drained_for.as_millis(),
                    wait.as_millis()
                ),
            );
            return self.begin_stop(0);
        }
        self.drain = Some((Drain::BeforeStop, self.now));
        self.log(
            Level::Notice,
            format!(
                "stop requested: draining for {} ms first (drain_before_stop), the health \
                 endpoint answers 503 and workers keep serving; stop again to stop at once",
                left.as_millis()
            ),
        );
        self.notify(SdNotify::Stopping("draining before stop".into()));
        // What the stop itself may take comes after the drain.
        self.notify(SdNotify::ExtendTimeout(
            left + self.policy.kill_timeout + Duration::from_secs(5),
        ));
        self.timers.arm(TimerKey::DrainStop, self.now + left);
    }

    /// `drain_before_stop` is over.
    pub(super) fn drained_for_stop(&mut self) {
        if self.draining_for_stop() && self.phase == Phase::Running {
            self.begin_stop(0);
        }
    }

    /// Ready workers the health endpoint needs to answer "up":
    /// `health_min_ready`, or every slot meant to run less those a running
    /// reload swaps at once; at least one.
    pub(super) fn health_min_ready(&self) -> u32 {
        let want = match self.policy.health_min_ready {
            Some(n) => n,
            None => {
                let swapping = match &self.op {
                    Some(Op::Reload { .. }) => self.policy.reload_parallel,
                    _ => 0,
                };
                self.running_slots().saturating_sub(swapping)
            }
        };
        want.max(1)
    }
}
