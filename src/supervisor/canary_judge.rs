//! A canary reload's figures, and the comparison that judges it: data and
//! pure functions only, so the state (`state.rs`) can hold a run without
//! knowing the lifecycle that moves it (`canary.rs`).

// Sans-IO: see clippy.toml.
#![deny(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use super::events::WorkerId;
use crate::config::canary::{Canary, LOOP_DELAY_FLOOR_MS, P99_FLOOR_MS};
use crate::outcomes::Outcomes;

/// A canary reload in progress (part of its [`Op::Reload`]).
#[derive(Debug)]
pub(super) struct CanaryRun {
    pub(super) slot: u32,
    pub(super) baseline_slot: u32,
    pub(super) canary: WorkerId,
    pub(super) baseline: WorkerId,
    /// The slots the rolling swap takes once the canary passed.
    pub(super) rest: Vec<u32>,
    pub(super) settings: Canary,
    pub(super) phase: Phase,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Phase {
    /// Both are starting; the soak begins once both serve.
    Starting,
    Soaking(Box<Soak>),
    /// As good as the baseline: the rolling swap goes on.
    Passed,
    /// Worse, or crashed, hung or too big: the canary's slot goes back to
    /// the configuration in force, and the reload fails with this.
    RolledBack(String),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Soak {
    pub(super) since: Instant,
    pub(super) canary_at: Outcomes,
    pub(super) baseline_at: Outcomes,
    /// Longest event-loop delay each reported during the soak (ms).
    pub(super) canary_delay: u32,
    pub(super) baseline_delay: u32,
}

/// What the comparison found.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Verdict {
    Good(String),
    /// Too few requests by `max_soak`: only crashes and hangs judged it.
    Unjudged(String),
    Worse(String),
    /// Too few requests yet: soak on.
    Wait,
}

/// Compare the canary's figures with the baseline's, both since the soak
/// began. Pure, so each threshold is a unit test away.
pub(super) fn judge(
    s: &Canary,
    canary: &Outcomes,
    baseline: &Outcomes,
    delays: (u32, u32),
    soaked: Duration,
) -> Verdict {
    let (nc, nb) = (canary.requests(), baseline.requests());
    let over = format!("over {} / {} requests", thousands(nc), thousands(nb));
    let (dc, db) = delays;
    if dc > LOOP_DELAY_FLOOR_MS && f64::from(dc) > s.max_loop_delay_ratio * f64::from(db.max(1)) {
        return Verdict::Worse(format!(
            "canary event-loop delay {dc} ms vs baseline {db} ms (max_loop_delay_ratio {})",
            s.max_loop_delay_ratio
        ));
    }
    if nc < s.min_requests || nb < s.min_requests {
        if soaked < s.max_soak {
            return Verdict::Wait;
        }
        return Verdict::Unjudged(format!(
            "too few requests to compare by max_soak ({} ms): {over}, min_requests {}; judged by crashes and hangs only",
            s.max_soak.as_millis(),
            s.min_requests
        ));
    }
    let (rc, rb) = (canary.error_ratio(), baseline.error_ratio());
    if rc - rb > s.max_5xx_delta {
        return Verdict::Worse(format!(
            "canary 5xx {} vs baseline {} {over} (max_5xx_delta {})",
            percent(rc),
            percent(rb),
            percent(s.max_5xx_delta)
        ));
    }
    let (pc, pb) = (
        canary.quantile_ms(0.99).unwrap_or(0),
        baseline.quantile_ms(0.99).unwrap_or(0),
    );
    if pc > P99_FLOOR_MS && pc as f64 > s.max_p99_ratio * pb.max(1) as f64 {
        return Verdict::Worse(format!(
            "canary p99 ≤ {pc} ms vs baseline ≤ {pb} ms {over} (max_p99_ratio {})",
            s.max_p99_ratio
        ));
    }
    Verdict::Good(format!(
        "canary 5xx {} vs baseline {}, p99 ≤ {pc} ms vs ≤ {pb} ms, event-loop delay {dc} ms vs {db} ms, {over}",
        percent(rc),
        percent(rb)
    ))
}

fn percent(r: f64) -> String {
    format!("{:.1} %", r * 100.0)
}

/// 1204 as "1,204".
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
