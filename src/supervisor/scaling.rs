//! The worker count that follows the load, wired into the core: once a
//! second the core asks the driver for the accept queues, puts them beside
//! the event-loop utilization each ready worker sent with its heartbeat,
//! and hands both to the decision (`autoscale.rs`). A change becomes a
//! scale like one asked for, queued behind the running operation, so it
//! adds and drains workers the same zero-downtime way.
//!
//! What a worker says of itself is untrusted: a worker that claims to be
//! busy can make the count rise, but never above `max` nor the memory
//! budget, one step per `settle`.

// Sans-IO: see clippy.toml.
#![deny(clippy::disallowed_methods)]

use std::time::Duration;

use super::autoscale::{Autoscaler, Bounds, Load, Pace, Why, memory_cap};
use super::core::Core;
use super::events::{Effect, Level};
use super::state::{Phase, Queued, WState};
use super::timers::TimerKey;
use crate::control::ScaleTarget;
use crate::logs::Milestone;

/// How often the load is sampled: the heartbeat's pace, so each sample
/// has a fresh utilization from every worker.
pub const AUTOSCALE_EVERY: Duration = Duration::from_secs(1);

/// What status and the metrics show of autoscaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoscaleView {
    pub min: u32,
    pub max: u32,
    /// The most workers it would run now (`max`, or fewer under the memory budget).
    pub ceiling: u32,
    /// A manual scale holds the count until the next reload.
    pub pinned: bool,
}

impl Core {
    /// Autoscaling as the policy in force says: on (a fresh decision,
    /// unpinned) or off.
    pub(super) fn autoscale_follow_policy(&mut self) {
        match self.policy.autoscale {
            Some(a) => {
                self.autoscaler = Some(Autoscaler::new(
                    Bounds {
                        min: a.min,
                        max: a.max,
                    },
                    Pace::of(&a),
                    None,
                ));
                if !self.timers.is_armed(TimerKey::Autoscale) {
                    self.timers
                        .arm(TimerKey::Autoscale, self.now + AUTOSCALE_EVERY);
                }
            }
            None => {
                self.autoscaler = None;
                self.timers.cancel(TimerKey::Autoscale);
            }
        }
    }

    /// After a re-exec: the decision starts afresh, pinned if it was.
    pub(super) fn autoscale_resume(&mut self, pinned: bool) {
        self.autoscale_follow_policy();
        if pinned && let Some(a) = &mut self.autoscaler {
            a.pin();
        }
    }

    pub(super) fn autoscale_pinned(&self) -> bool {
        self.autoscaler.as_ref().is_some_and(Autoscaler::pinned)
    }

    /// A manual scale: the count it asks for holds until the next reload.
    pub(super) fn autoscale_pin(&mut self) {
        let Some(a) = &mut self.autoscaler else {
            return;
        };
        if !a.pinned() {
            a.pin();
            self.log(
                Level::Notice,
                "autoscale: paused by a manual scale until the next reload".into(),
            );
        }
    }

    /// A reload: the configuration decides the count again.
    pub(super) fn autoscale_unpin(&mut self) {
        let Some(a) = &mut self.autoscaler else {
            return;
        };
        if a.pinned() {
            a.unpin();
            self.log(Level::Notice, "autoscale: resumed by a reload".into());
        }
    }

    pub(super) fn on_autoscale_timer(&mut self) {
        if self.autoscaler.is_none() || self.phase != Phase::Running {
            return;
        }
        self.timers
            .arm(TimerKey::Autoscale, self.now + AUTOSCALE_EVERY);
        self.out.push(Effect::SampleLoad);
    }

    pub(super) fn on_load_sample(&mut self, queued: u32, unit_memory_max: Option<u64>) {
        let cap = memory_cap(unit_memory_max, self.policy.max_memory);
        // While the count moves (or anything else runs), what is measured
        // is not the count's doing: decide once it has settled. Nor while
        // the app drains for a stop: its load is leaving on purpose.
        let settled = self.phase == Phase::Running
            && self.op.is_none()
            && self.queue.is_empty()
            && !self.draining_for_stop();
        let Some(a) = &mut self.autoscaler else {
            return;
        };
        a.set_memory_cap(cap);
        if !settled {
            return;
        }
        let elu = self
            .slots
            .iter()
            .filter_map(|s| self.workers.get(&s.current?))
            .filter(|w| w.state == WState::Ready)
            .filter_map(|w| w.elu_permille)
            .map(|e| f64::from(e.min(1000)) / 1000.0)
            .collect();
        let current = self.slots.len() as u32;
        let Some(d) = a.sample(self.now, current, &Load { queued, elu }) else {
            return;
        };
        if d.to == d.from {
            return;
        }
        match d.why {
            Why::AcceptQueue => self.counters.autoscale_up_accept_queue += 1,
            Why::EventLoop => self.counters.autoscale_up_event_loop += 1,
            Why::Quiet => self.counters.autoscale_down_quiet += 1,
        }
        self.log_event(
            Level::Notice,
            format!("autoscale: {} -> {} workers: {}", d.from, d.to, d.reason),
            Milestone::Scale,
        );
        self.queue
            .push_back(Queued::Scale(ScaleTarget::To(i64::from(d.to)), None));
    }

    /// What status and the metrics show of autoscaling (None: off).
    pub fn autoscale_view(&self) -> Option<AutoscaleView> {
        let a = self.autoscaler.as_ref()?;
        Some(AutoscaleView {
            min: a.bounds().min,
            max: a.bounds().max,
            ceiling: a.ceiling(),
            pinned: a.pinned(),
        })
    }
}
