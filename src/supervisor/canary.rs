//! The canary reload: judge a release by its own traffic before it
//! replaces every worker.
//!
//! A reload with `reload_strategy: "canary"` (or `nodeherd reload
//! --canary`) first swaps two slots at the same moment: one to the new
//! configuration (the canary) and one to a fresh worker of the
//! configuration in force (the baseline). Both start cold and take the
//! same share of the same queue, so what differs between them is the
//! release, not warm caches or the hour. After `canary.soak`, and once each
//! has answered `canary.min_requests`, their figures since the soak began
//! are compared (5xx share, p99 latency, event-loop delay). Worse beyond the
//! thresholds: the canary's slot is swapped back to the configuration in
//! force, the zero-downtime way, and the reload fails naming the numbers.
//! As good: the rolling swap goes on over every other slot (the baseline's
//! too). A canary that crashes, hangs or outgrows `max_memory_restart`
//! during the soak is rolled back at once. The numbers come from the
//! workers themselves (see [`crate::outcomes`]); a worker can only lie
//! about itself, so a compromised canary can pass itself, no worse than a
//! rolling reload would have let it in.

// Sans-IO: see clippy.toml.
#![deny(clippy::disallowed_methods)]

use std::time::Duration;

use super::canary_judge::{CanaryRun, Phase, Soak, Verdict, judge};
use super::core::Core;
use super::events::{Level, WorkerId};
use super::state::{Op, Role};
use super::timers::TimerKey;
use crate::config::canary::Canary;

impl Core {
    fn canary_run(&self) -> Option<&CanaryRun> {
        match &self.op {
            Some(Op::Reload {
                canary: Some(c), ..
            }) => Some(c),
            _ => None,
        }
    }

    fn canary_run_mut(&mut self) -> Option<&mut CanaryRun> {
        match &mut self.op {
            Some(Op::Reload {
                canary: Some(c), ..
            }) => Some(c),
            _ => None,
        }
    }

    /// Start the canary and its baseline, each in place of a slot's
    /// worker; the rolling swap of `rest` waits for the verdict.
    pub(super) fn begin_canary(
        &mut self,
        slot: u32,
        baseline_slot: u32,
        rest: Vec<u32>,
        settings: Canary,
    ) {
        let old = self.generation;
        let canary = self.spawn(slot, Role::Incoming);
        let baseline = self.spawn_as(baseline_slot, Role::Incoming, old);
        self.log(
            Level::Notice,
            format!(
                "canary reload: slot {slot} starts the new configuration, slot {baseline_slot} a fresh worker of the one in force as the baseline; they are compared after a soak of {} ms",
                settings.soak.as_millis()
            ),
        );
        if let Some(Op::Reload {
            in_flight,
            canary: run,
            ..
        }) = &mut self.op
        {
            in_flight.insert(slot);
            in_flight.insert(baseline_slot);
            *run = Some(Box::new(CanaryRun {
                slot,
                baseline_slot,
                canary,
                baseline,
                rest,
                settings,
                phase: Phase::Starting,
            }));
        }
    }

    /// Whether the rolling swap must wait for the canary (it is not
    /// through, or was rolled back).
    pub(super) fn canary_holds(&self) -> bool {
        self.canary_run().is_some_and(|c| c.phase != Phase::Passed)
    }

    /// Whether the reload was rolled back, and why.
    pub(super) fn canary_rolled_back(&self) -> Option<String> {
        match &self.canary_run()?.phase {
            Phase::RolledBack(why) => Some(why.clone()),
            _ => None,
        }
    }

    /// Both serve: the soak begins.
    pub(super) fn canary_step(&mut self) {
        let now = self.now;
        let Some(Op::Reload {
            in_flight,
            canary: Some(run),
            ..
        }) = &self.op
        else {
            return;
        };
        if run.phase != Phase::Starting || !in_flight.is_empty() {
            return;
        }
        let serving = |slot: u32, id: WorkerId| {
            self.slots
                .get(slot as usize)
                .is_some_and(|s| s.current == Some(id))
        };
        if !serving(run.slot, run.canary) || !serving(run.baseline_slot, run.baseline) {
            return;
        }
        let at = |id: WorkerId| {
            self.workers
                .get(&id)
                .and_then(|w| w.outcomes)
                .unwrap_or_default()
        };
        let soak = Soak {
            since: now,
            canary_at: at(run.canary),
            baseline_at: at(run.baseline),
            canary_delay: 0,
            baseline_delay: 0,
        };
        let due = now + run.settings.soak;
        if let Some(run) = self.canary_run_mut() {
            run.phase = Phase::Soaking(Box::new(soak));
        }
        self.timers.arm(TimerKey::Canary, due);
    }

    /// The soak is up (or a later look is due).
    pub(super) fn on_canary_timer(&mut self) {
        let now = self.now;
        let Some(run) = self.canary_run() else {
            return;
        };
        let Phase::Soaking(soak) = &run.phase else {
            return;
        };
        let of = |id: WorkerId| {
            self.workers
                .get(&id)
                .and_then(|w| w.outcomes)
                .unwrap_or_default()
        };
        let canary = of(run.canary).since(&soak.canary_at);
        let baseline = of(run.baseline).since(&soak.baseline_at);
        let soaked = now.saturating_duration_since(soak.since);
        let verdict = judge(
            &run.settings,
            &canary,
            &baseline,
            (soak.canary_delay, soak.baseline_delay),
            soaked,
        );
        let next_look = (now + Duration::from_secs(1)).min(soak.since + run.settings.max_soak);
        match verdict {
            Verdict::Wait => self.timers.arm(TimerKey::Canary, next_look),
            Verdict::Worse(why) => self.roll_back(why),
            Verdict::Good(how) => self.canary_passed(format!("canary passed: {how}")),
            Verdict::Unjudged(how) => {
                self.canary_passed(format!("canary not compared: {how}"));
            }
        }
    }

    fn canary_passed(&mut self, text: String) {
        let Some(Op::Reload {
            pending,
            canary: Some(run),
            ..
        }) = &mut self.op
        else {
            return;
        };
        run.phase = Phase::Passed;
        pending.extend(run.rest.iter().copied());
        let level = if text.starts_with("canary passed") {
            Level::Notice
        } else {
            Level::Warning
        };
        self.log(level, format!("{text}; the rolling swap goes on"));
    }

    /// Swap the canary's slot back to the configuration in force; the
    /// reload fails with `why` once that is done.
    pub(super) fn roll_back(&mut self, why: String) {
        let Some(run) = self.canary_run_mut() else {
            return;
        };
        if matches!(run.phase, Phase::RolledBack(_) | Phase::Passed) {
            return;
        }
        run.phase = Phase::RolledBack(why.clone());
        let (slot, canary) = (run.slot, run.canary);
        self.timers.cancel(TimerKey::Canary);
        self.log(
            Level::Error,
            format!(
                "canary rolled back: {why}; slot {slot} goes back to the configuration in force"
            ),
        );
        let serving = self
            .slots
            .get(slot as usize)
            .is_some_and(|s| s.current == Some(canary) && s.incoming.is_none());
        if serving {
            let old = self.generation;
            self.spawn_as(slot, Role::Incoming, old);
            if let Some(Op::Reload { in_flight, .. }) = &mut self.op {
                in_flight.insert(slot);
            }
        }
    }

    /// The slot of a canary that serves and was not judged as good, if any:
    /// a reload that fails now must not leave it serving.
    pub(super) fn canary_left_serving(&self) -> Option<u32> {
        let run = self.canary_run()?;
        let serving = self
            .slots
            .get(run.slot as usize)
            .is_some_and(|s| s.current == Some(run.canary));
        (serving && run.phase != Phase::Passed).then_some(run.slot)
    }

    /// A worker reported a heartbeat: keep the soak's longest delays.
    pub(super) fn canary_beat(&mut self, id: WorkerId, delay_ms: u32) {
        let Some(run) = self.canary_run_mut() else {
            return;
        };
        let (canary, baseline) = (run.canary, run.baseline);
        if let Phase::Soaking(s) = &mut run.phase {
            if id == canary {
                s.canary_delay = s.canary_delay.max(delay_ms);
            } else if id == baseline {
                s.baseline_delay = s.baseline_delay.max(delay_ms);
            }
        }
    }

    /// A worker that serves died. The canary: rolled back (its slot
    /// restarts under the configuration in force, by the crash rules). The
    /// baseline: nothing is left to compare with, so the canary goes too.
    pub(super) fn canary_exited(&mut self, id: WorkerId, index: u32, cause: &str) {
        let Some(run) = self.canary_run() else {
            return;
        };
        // A canary that dies before it serves fails the reload the usual
        // way (a replacement that died before it was ready).
        let serving = self
            .slots
            .get(index as usize)
            .is_some_and(|s| s.current == Some(id));
        if !serving || !matches!(run.phase, Phase::Starting | Phase::Soaking(_)) {
            return;
        }
        let why = if id == run.canary {
            format!(
                "the canary (slot {}) died during the soak: {cause}",
                run.slot
            )
        } else if id == run.baseline {
            format!(
                "the baseline (slot {}) died during the soak ({cause}): nothing to compare the canary with; reload again",
                run.baseline_slot
            )
        } else {
            return;
        };
        self.roll_back(why);
    }

    /// The canary's event loop is stuck: rolled back at once (true), not
    /// queued as a hang replacement behind the reload.
    pub(super) fn canary_hung(&mut self, id: WorkerId, max: Duration) -> bool {
        let is_canary = self.canary_run().is_some_and(|r| {
            r.canary == id && matches!(r.phase, Phase::Starting | Phase::Soaking(_))
        });
        if is_canary {
            self.roll_back(format!(
                "the canary's event loop did not answer for {} ms (max_event_loop_delay)",
                max.as_millis()
            ));
        }
        is_canary
    }

    /// The worker whose memory the soak watches, if one is soaking.
    pub(super) fn canary_to_sample(&self) -> Option<WorkerId> {
        let run = self.canary_run()?;
        matches!(run.phase, Phase::Soaking(_)).then_some(run.canary)
    }

    /// A memory sample during the soak: a canary above its
    /// `max_memory_restart` is rolled back at once.
    pub(super) fn canary_memory(&mut self, samples: &[(WorkerId, u64)]) {
        let Some(canary) = self.canary_to_sample() else {
            return;
        };
        let Some(limit) = self.policy_of(canary).max_memory_restart else {
            return;
        };
        if let Some((_, rss)) = samples
            .iter()
            .find(|(id, rss)| *id == canary && *rss > limit)
        {
            self.roll_back(format!(
                "the canary uses {} MiB, more than max_memory_restart ({} MiB)",
                rss >> 20,
                limit >> 20
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcomes::Outcomes;

    fn outcomes(ok: u64, errors: u64, slow_bucket: usize, slow: u64) -> Outcomes {
        let mut o = Outcomes::default();
        o.classes[1] = ok;
        o.classes[4] = errors;
        o.buckets[0] = ok + errors - slow;
        o.buckets[slow_bucket] += slow;
        o
    }

    fn settings() -> Canary {
        Canary {
            min_requests: 100,
            ..Canary::default()
        }
    }

    const SOAKED: Duration = Duration::from_secs(30);

    #[test]
    fn a_canary_with_more_5xx_than_the_threshold_is_worse_and_named_in_numbers() {
        let v = judge(
            &settings(),
            &outcomes(966, 238, 0, 0),
            &outcomes(1187, 0, 0, 0),
            (0, 0),
            SOAKED,
        );
        assert_eq!(
            v,
            Verdict::Worse(
                "canary 5xx 19.8 % vs baseline 0.0 % over 1,204 / 1,187 requests (max_5xx_delta 2.0 %)"
                    .into()
            )
        );
        // Within the delta: as good.
        let v = judge(
            &settings(),
            &outcomes(990, 10, 0, 0),
            &outcomes(1000, 0, 0, 0),
            (0, 0),
            SOAKED,
        );
        assert!(matches!(v, Verdict::Good(_)), "{v:?}");
    }

    #[test]
    fn a_canary_slower_at_p99_beyond_the_ratio_is_worse_and_small_latencies_never_are() {
        // 2 % of the canary's responses in the 250 ms bucket: its p99.
        let v = judge(
            &settings(),
            &outcomes(1000, 0, 5, 20),
            &outcomes(1000, 0, 0, 0),
            (0, 0),
            SOAKED,
        );
        assert!(
            matches!(&v, Verdict::Worse(w) if w.contains("p99 ≤ 250 ms vs baseline ≤ 5 ms")),
            "{v:?}"
        );
        // 25 ms against 5: five times slower, but under the floor.
        let v = judge(
            &settings(),
            &outcomes(1000, 0, 2, 20),
            &outcomes(1000, 0, 0, 0),
            (0, 0),
            SOAKED,
        );
        assert!(matches!(v, Verdict::Good(_)), "{v:?}");
    }

    #[test]
    fn a_stalling_event_loop_is_worse() {
        let v = judge(
            &settings(),
            &outcomes(1000, 0, 0, 0),
            &outcomes(1000, 0, 0, 0),
            (400, 20),
            SOAKED,
        );
        assert!(
            matches!(&v, Verdict::Worse(w) if w.contains("event-loop delay 400 ms")),
            "{v:?}"
        );
        let v = judge(
            &settings(),
            &outcomes(1000, 0, 0, 0),
            &outcomes(1000, 0, 0, 0),
            (90, 5),
            SOAKED,
        );
        assert!(matches!(v, Verdict::Good(_)), "{v:?}");
    }

    #[test]
    fn too_few_requests_wait_until_max_soak_then_do_not_decide() {
        let s = settings();
        let few = outcomes(40, 40, 0, 0);
        let v = judge(&s, &few, &outcomes(1000, 0, 0, 0), (0, 0), SOAKED);
        assert_eq!(v, Verdict::Wait);
        let v = judge(&s, &few, &outcomes(1000, 0, 0, 0), (0, 0), s.max_soak);
        assert!(
            matches!(&v, Verdict::Unjudged(w) if w.contains("80 / 1,000")),
            "{v:?}"
        );
    }
}
