//! A worker count that follows the load, as the configuration says it:
//! `instances: {min, max}` turns it on (each bound in any form `instances`
//! takes), and the `autoscale` block sets the signals' thresholds and the
//! pace. Opt-in, because every worker added costs memory and a fork, and an
//! app that keeps state per worker may not want its count to move.

use std::time::Duration;

use serde_json::{Map, Value};

use super::values::{self as v, Instances};

/// `instances: {min, max}` as written, before the CPU count is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub min: Instances,
    pub max: Instances,
}

/// The `autoscale` block as written; what it leaves out takes the defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RawPace {
    pub busy_queue: Option<u32>,
    pub busy_elu: Option<f64>,
    pub quiet_elu: Option<f64>,
    pub up_after: Option<Duration>,
    pub down_after: Option<Duration>,
    pub settle: Option<Duration>,
    pub step: Option<u32>,
}

/// Autoscaling as the manager runs it: the bounds resolved, the pace
/// checked; see the README's "A worker count that follows the load".
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Autoscale {
    pub min: u32,
    pub max: u32,
    /// Connections waiting in the accept queues at which the app is busy.
    pub busy_queue: u32,
    /// Mean event-loop utilization (0..1) at which the workers are busy.
    pub busy_elu: f64,
    /// Every worker below this, and no connection waiting: quiet.
    pub quiet_elu: f64,
    /// Busy this long in a row: workers are added.
    pub up_after: Duration,
    /// Quiet this long in a row: a worker is taken away.
    pub down_after: Duration,
    /// No decision this long after a change, so the new count is measured first.
    pub settle: Duration,
    /// Workers added at one decision (taken away: always one).
    pub step: u32,
}

/// The keys the `autoscale` block takes, for its error messages.
const PACE_KEYS: &str = "busy_queue, busy_elu, quiet_elu, up_after, down_after, settle, step";

/// `instances` as an object: `{min, max}`, both required.
pub fn range(o: &Map<String, Value>) -> Result<Range, String> {
    let shape = "as an object, `instances` takes {\"min\": 2, \"max\": \"max\"} (each a count, \"max\" or -n)";
    for k in o.keys() {
        if k != "min" && k != "max" {
            return Err(format!("unknown key {k:?}: {shape}"));
        }
    }
    let bound = |k: &str| -> Result<Instances, String> {
        let x = o.get(k).ok_or_else(|| format!("{k} is missing: {shape}"))?;
        v::instances(x).map_err(|m| format!("{k}: {m}"))
    };
    Ok(Range {
        min: bound("min")?,
        max: bound("max")?,
    })
}

/// The `autoscale` block.
pub fn pace(x: &Value) -> Result<RawPace, String> {
    let o = x.as_object().ok_or_else(|| {
        format!("must be an object, e.g. {{\"busy_elu\": 0.8, \"down_after\": \"60s\"}}; keys: {PACE_KEYS}")
    })?;
    let mut p = RawPace::default();
    for (k, x) in o {
        let at = |m: String| format!("{k}: {m}");
        match k.as_str() {
            "busy_queue" => {
                p.busy_queue = Some(
                    v::count(x, 1_000_000)
                        .map_err(at)
                        .and_then(|n| positive(n, k))? as u32,
                )
            }
            "busy_elu" => p.busy_elu = Some(fraction(x).map_err(at)?),
            "quiet_elu" => p.quiet_elu = Some(fraction(x).map_err(at)?),
            "up_after" => p.up_after = Some(v::duration(x).map_err(at)?),
            "down_after" => p.down_after = Some(v::duration(x).map_err(at)?),
            "settle" => p.settle = Some(v::duration(x).map_err(at)?),
            "step" => {
                p.step = Some(
                    v::count(x, u64::from(super::MAX_INSTANCES))
                        .map_err(at)
                        .and_then(|n| positive(n, k))? as u32,
                )
            }
            other => {
                return Err(format!(
                    "unknown key {other:?}: the block takes {PACE_KEYS}"
                ));
            }
        }
    }
    Ok(p)
}

fn positive(n: u64, k: &str) -> Result<u64, String> {
    if n == 0 {
        return Err(format!("{k}: must be at least 1"));
    }
    Ok(n)
}

fn fraction(x: &Value) -> Result<f64, String> {
    let f = x
        .as_f64()
        .ok_or_else(|| format!("expected a number between 0 and 1, got {x}"))?;
    if !(0.0..=1.0).contains(&f) || f == 0.0 {
        return Err(format!("{f} is not above 0 and at most 1"));
    }
    Ok(f)
}

/// Both put together against the CPU count; the error is the message
/// alone, with the key it is about.
pub fn resolve(
    range: Option<Range>,
    pace: Option<RawPace>,
    cpus: u32,
) -> Result<Option<Autoscale>, (&'static str, String)> {
    let Some(range) = range else {
        if pace.is_some() {
            return Err((
                "autoscale",
                "the block sets the pace of autoscaling, which only `instances: {\"min\": N, \"max\": M}` turns on".into(),
            ));
        }
        return Ok(None);
    };
    let min = range
        .min
        .resolve(cpus)
        .map_err(|m| ("instances", format!("min: {m}")))?;
    let max = range
        .max
        .resolve(cpus)
        .map_err(|m| ("instances", format!("max: {m}")))?;
    if min > max {
        return Err((
            "instances",
            format!("min ({min}) is more than max ({max}) on this host of {cpus} CPUs"),
        ));
    }
    let p = pace.unwrap_or_default();
    let a = Autoscale {
        min,
        max,
        busy_queue: p.busy_queue.unwrap_or(1),
        busy_elu: p.busy_elu.unwrap_or(0.8),
        quiet_elu: p.quiet_elu.unwrap_or(0.3),
        up_after: p.up_after.unwrap_or(Duration::from_secs(10)),
        down_after: p.down_after.unwrap_or(Duration::from_secs(60)),
        settle: p.settle.unwrap_or(Duration::from_secs(10)),
        step: p.step.unwrap_or(1),
    };
    if a.quiet_elu >= a.busy_elu {
        return Err((
            "autoscale",
            format!(
                "quiet_elu ({}) must be below busy_elu ({}), or the count would swing",
                a.quiet_elu, a.busy_elu
            ),
        ));
    }
    if a.up_after < Duration::from_secs(1) || a.down_after < Duration::from_secs(1) {
        return Err((
            "autoscale",
            "up_after and down_after must be at least 1 s: the signals are sampled once a second"
                .into(),
        ));
    }
    Ok(Some(a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(x: Value) -> Result<Range, String> {
        range(x.as_object().unwrap())
    }

    #[test]
    fn bounds_take_every_form_of_instances() {
        let r = parse(json!({"min": 2, "max": "max"})).unwrap();
        let a = resolve(Some(r), None, 8).unwrap().unwrap();
        assert_eq!((a.min, a.max, a.step), (2, 8, 1));
        let r = parse(json!({"min": "1", "max": -1})).unwrap();
        let a = resolve(Some(r), None, 4).unwrap().unwrap();
        assert_eq!((a.min, a.max), (1, 3));
        assert_eq!(resolve(None, None, 4), Ok(None));
    }

    #[test]
    fn bad_shapes_say_what_to_write() {
        for (bad, says) in [
            (json!({"min": 2}), "max is missing"),
            (json!({"max": 2}), "min is missing"),
            (
                json!({"min": 2, "max": 4, "step": 1}),
                "unknown key \"step\"",
            ),
            (
                json!({"min": "lots", "max": 4}),
                "min: expected a whole number",
            ),
            (json!({"min": 1, "max": 100000}), "max: "),
        ] {
            let e = parse(bad.clone()).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let r = parse(json!({"min": 6, "max": 3})).unwrap();
        let (key, e) = resolve(Some(r), None, 8).unwrap_err();
        assert_eq!(key, "instances");
        assert!(e.contains("min (6) is more than max (3)"), "{e}");
        // "max" on a small host can fall below min: said with the CPU count.
        let r = parse(json!({"min": 4, "max": "max"})).unwrap();
        let (_, e) = resolve(Some(r), None, 2).unwrap_err();
        assert!(e.contains("host of 2 CPUs"), "{e}");
    }

    #[test]
    fn the_pace_block_is_checked() {
        let p = pace(&json!({"busy_elu": 0.9, "up_after": "3s", "step": 2})).unwrap();
        let r = parse(json!({"min": 1, "max": 4})).unwrap();
        let a = resolve(Some(r), Some(p), 8).unwrap().unwrap();
        assert_eq!(a.busy_elu, 0.9);
        assert_eq!(a.up_after, Duration::from_secs(3));
        assert_eq!(a.down_after, Duration::from_secs(60));
        assert_eq!(a.step, 2);
        for (bad, says) in [
            (json!({"busy_elu": 1.5}), "busy_elu: 1.5 is not above 0"),
            (json!({"busy_elu": "high"}), "busy_elu: expected a number"),
            (json!({"step": 0}), "step: must be at least 1"),
            (json!({"busy_queue": 0}), "busy_queue: must be at least 1"),
            (json!({"down_after": "soon"}), "down_after: expected"),
            (json!({"cooldown": "1s"}), "unknown key \"cooldown\""),
            (json!(true), "must be an object"),
        ] {
            let e = pace(&bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let p = pace(&json!({"busy_elu": 0.2})).unwrap();
        let (_, e) = resolve(Some(r), Some(p), 8).unwrap_err();
        assert!(
            e.contains("quiet_elu (0.3) must be below busy_elu (0.2)"),
            "{e}"
        );
        let p = pace(&json!({"up_after": 200})).unwrap();
        assert!(resolve(Some(r), Some(p), 8).is_err());
        let (key, e) = resolve(None, Some(RawPace::default()), 8).unwrap_err();
        assert_eq!(key, "autoscale");
        assert!(e.contains("instances"), "{e}");
    }
}
