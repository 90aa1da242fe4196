//! How a reload is judged: `reload_strategy` and the `canary` block.
//!
//! A canary reload first swaps two slots at once, one to the new
//! configuration (the canary) and one to a fresh worker of the old (the
//! baseline), so both are equally cold and share the same traffic; after
//! the soak it compares them and rolls the canary back if it is worse.
//! The defaults are chosen so noise does not decide: a minimum sample per
//! side, and thresholds well above what two equal workers differ by.

use std::time::Duration;

use serde_json::Value;

use super::values as v;

/// How a reload swaps the workers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReloadStrategy {
    /// Every slot, `reload_parallel` at a time (the default, as PM2).
    #[default]
    Rolling,
    /// A canary beside a fresh baseline first, then the rolling swap if it
    /// was as good.
    Canary,
}

pub fn strategy(x: &Value) -> Result<ReloadStrategy, String> {
    match v::string(x)?.as_str() {
        "rolling" => Ok(ReloadStrategy::Rolling),
        "canary" => Ok(ReloadStrategy::Canary),
        other => Err(format!(
            "{other:?} is not a strategy: use \"rolling\" or \"canary\""
        )),
    }
}

/// The `canary` block; see the README's "Canary reloads".
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Canary {
    /// How long both serve before they are compared (default 30 s).
    pub soak: Duration,
    /// How long the soak may go on while either side has fewer than
    /// `min_requests` (default 4 × soak); then only crashes and hangs
    /// judge, and the reload goes on.
    pub max_soak: Duration,
    /// Responses each side must have finished for the figures to count (default 200).
    pub min_requests: u64,
    /// The canary's 5xx share may exceed the baseline's by this much
    /// (a fraction: default 0.02, two percentage points).
    pub max_5xx_delta: f64,
    /// The canary's p99 latency may be this many times the baseline's
    /// (default 2); below 25 ms p99 latency never fails a canary.
    pub max_p99_ratio: f64,
    /// Its longest event-loop delay may be this many times the baseline's
    /// (default 3); below 100 ms it never fails a canary.
    pub max_loop_delay_ratio: f64,
}

impl Default for Canary {
    fn default() -> Canary {
        Canary {
            soak: Duration::from_secs(30),
            max_soak: Duration::from_secs(120),
            min_requests: 200,
            max_5xx_delta: 0.02,
            max_p99_ratio: 2.0,
            max_loop_delay_ratio: 3.0,
        }
    }
}

/// A p99 latency at or below this never fails a canary (bucket resolution).
pub const P99_FLOOR_MS: u64 = 25;
/// An event-loop delay at or below this never fails a canary.
pub const LOOP_DELAY_FLOOR_MS: u32 = 100;

pub fn canary(x: &Value) -> Result<Canary, String> {
    let o = x
        .as_object()
        .ok_or("must be an object, e.g. {\"soak\": \"30s\", \"min_requests\": 200}")?;
    let mut c = Canary::default();
    let mut max_soak = None;
    for (k, x) in o {
        let at = |m: String| format!("{k}: {m}");
        match k.as_str() {
            "soak" => c.soak = v::duration(x).map_err(at)?,
            "max_soak" => max_soak = Some(v::duration(x).map_err(at)?),
            "min_requests" => c.min_requests = v::count(x, 1 << 40).map_err(at)?,
            "max_5xx_delta" => c.max_5xx_delta = fraction(x, 0.0, 1.0).map_err(at)?,
            "max_p99_ratio" => c.max_p99_ratio = fraction(x, 1.0, 1000.0).map_err(at)?,
            "max_loop_delay_ratio" => {
                c.max_loop_delay_ratio = fraction(x, 1.0, 1000.0).map_err(at)?
            }
            other => {
                return Err(format!(
                    "unknown key {other:?}: the canary block takes soak, max_soak, min_requests, max_5xx_delta, max_p99_ratio, max_loop_delay_ratio"
                ));
            }
        }
    }
    if c.soak < Duration::from_millis(100) {
        return Err("soak: must be at least 100 ms".into());
    }
    c.max_soak = max_soak.unwrap_or(c.soak * 4);
    if c.max_soak < c.soak {
        return Err("max_soak: must be at least soak".into());
    }
    Ok(c)
}

fn fraction(x: &Value, lo: f64, hi: f64) -> Result<f64, String> {
    let f = x.as_f64().ok_or("must be a number")?;
    if !(lo..=hi).contains(&f) {
        return Err(format!("must be between {lo} and {hi}"));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_block_is_read_with_defaults_for_what_it_leaves_out() {
        let c = canary(&json!({"soak": "2s", "min_requests": 50})).unwrap();
        assert_eq!(c.soak, Duration::from_secs(2));
        assert_eq!(c.max_soak, Duration::from_secs(8));
        assert_eq!(c.min_requests, 50);
        assert_eq!(c.max_5xx_delta, 0.02);
        for (bad, says) in [
            (json!({"soak": "10ms"}), "soak"),
            (json!({"soak": "2s", "max_soak": "1s"}), "max_soak"),
            (json!({"max_5xx_delta": 2}), "max_5xx_delta"),
            (json!({"max_p99_ratio": 0.5}), "max_p99_ratio"),
            (json!({"sok": "1s"}), "unknown key \"sok\""),
            (json!("30s"), "object"),
        ] {
            let e = canary(&bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert_eq!(strategy(&json!("canary")), Ok(ReloadStrategy::Canary));
        assert!(
            strategy(&json!("blue-green"))
                .unwrap_err()
                .contains("rolling")
        );
    }
}
