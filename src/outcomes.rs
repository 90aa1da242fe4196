//! Per-worker request outcomes, as the worker's preload counts them: HTTP
//! responses by status class, their latency in fixed buckets, and uncaught
//! exceptions and unhandled rejections.
//!
//! The counts are measured inside the worker (src/shim.js) because only
//! the worker sees its responses: the manager is off the data path. So they
//! are untrusted: a compromised worker may send anything. [`parse`] keeps
//! only well-formed, bounded, self-consistent reports, and [`Outcomes::grew_from`]
//! only reports that never go down, so a worker can lie about itself at
//! most, never lower another worker's figures or the manager's.

use serde_json::Value;

/// Upper bounds of the latency buckets, in milliseconds; one more bucket
/// (`+Inf`) takes the rest. The preload has the same list (`BUCKETS_MS` in
/// src/shim.js; a test checks they agree).
pub const BUCKETS_MS: [u64; 11] = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

/// Buckets on the wire: the bounds above plus `+Inf`.
pub const BUCKETS: usize = BUCKETS_MS.len() + 1;

/// No count above this is believed: JavaScript counts exactly up to 2^53.
pub const MAX_COUNT: u64 = (1 << 53) - 1;

/// What one worker reported last: cumulative since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Responses by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub classes: [u64; 5],
    /// Responses by latency bucket (not cumulative: each in exactly one).
    pub buckets: [u64; BUCKETS],
    /// Sum of all latencies, in microseconds.
    pub sum_us: u64,
    /// `uncaughtException`s seen (an app with a handler lives on after one).
    pub exceptions: u64,
    /// `unhandledRejection`s seen.
    pub rejections: u64,
}

/// Status classes, as labels.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl Outcomes {
    /// Every response counted.
    pub fn requests(&self) -> u64 {
        self.classes.iter().sum()
    }

    /// Responses with a 5xx status.
    pub fn errors(&self) -> u64 {
        self.classes[4]
    }

    /// Whether `self` can follow `before` from the same worker: no count
    /// went down. A report that breaks this is ignored (a lie, or a new
    /// process in the worker's place, which never happens: each worker has
    /// its own record).
    pub fn grew_from(&self, before: &Outcomes) -> bool {
        self.flat()
            .iter()
            .zip(before.flat().iter())
            .all(|(now, then)| now >= then)
    }

    /// What happened between `before` and `self` (counts that went down
    /// count as none).
    pub fn since(&self, before: &Outcomes) -> Outcomes {
        let (a, b) = (self.flat(), before.flat());
        let diff: Vec<u64> = a
            .iter()
            .zip(b.iter())
            .map(|(x, y)| x.saturating_sub(*y))
            .collect();
        Outcomes::from_flat(&diff).unwrap_or_default()
    }

    /// The share of 5xx responses, 0 with none.
    pub fn error_ratio(&self) -> f64 {
        let n = self.requests();
        if n == 0 {
            0.0
        } else {
            self.errors() as f64 / n as f64
        }
    }

    /// The `q` quantile of latency (0 < q ≤ 1) as the upper bound of the
    /// bucket it falls in, in ms (`None` with no response; the last bucket
    /// counts as twice the highest bound).
    pub fn quantile_ms(&self, q: f64) -> Option<u64> {
        let n = self.requests();
        if n == 0 {
            return None;
        }
        let rank = ((n as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(BUCKETS_MS.get(i).copied().unwrap_or(BUCKETS_MS[10] * 2));
            }
        }
        Some(BUCKETS_MS[10] * 2)
    }

    /// The wire and D-Bus layout: classes, buckets, sum_us, exceptions, rejections.
    pub fn flat(&self) -> Vec<u64> {
        let mut v = Vec::with_capacity(5 + BUCKETS + 3);
        v.extend_from_slice(&self.classes);
        v.extend_from_slice(&self.buckets);
        v.extend([self.sum_us, self.exceptions, self.rejections]);
        v
    }

    /// The reverse of [`Outcomes::flat`]; `None` if the length is wrong.
    pub fn from_flat(v: &[u64]) -> Option<Outcomes> {
        if v.len() != 5 + BUCKETS + 3 {
            return None;
        }
        let mut o = Outcomes::default();
        o.classes.copy_from_slice(&v[..5]);
        o.buckets.copy_from_slice(&v[5..5 + BUCKETS]);
        o.sum_us = v[5 + BUCKETS];
        o.exceptions = v[6 + BUCKETS];
        o.rejections = v[7 + BUCKETS];
        Some(o)
    }

    /// For `status --json`.
    pub fn to_json(&self) -> Value {
        let classes: serde_json::Map<String, Value> = CLASSES
            .iter()
            .zip(self.classes)
            .map(|(k, n)| (k.to_string(), Value::from(n)))
            .collect();
        let buckets: Vec<Value> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let le = BUCKETS_MS
                    .get(i)
                    .map_or(Value::from("+Inf"), |b| Value::from(*b));
                serde_json::json!({ "le_ms": le, "count": n })
            })
            .collect();
        serde_json::json!({
            "requests": classes,
            "duration_buckets": buckets,
            "duration_sum_ms": self.sum_us as f64 / 1000.0,
            "uncaught_exceptions": self.exceptions,
            "unhandled_rejections": self.rejections,
        })
    }
}

/// Read the `out` field of a heartbeat: `{c: [5], b: [12], s, x, r}`, all
/// whole numbers from 0 to [`MAX_COUNT`], as many responses in the classes
/// as in the buckets. Anything else is no report.
pub fn parse(v: &Value) -> Option<Outcomes> {
    let o = v.as_object()?;
    let nums = |key: &str, n: usize| -> Option<Vec<u64>> {
        let a = o.get(key)?.as_array()?;
        if a.len() != n {
            return None;
        }
        a.iter().map(count).collect()
    };
    let mut out = Outcomes::default();
    out.classes.copy_from_slice(&nums("c", 5)?);
    out.buckets.copy_from_slice(&nums("b", BUCKETS)?);
    out.sum_us = count(o.get("s")?)?;
    out.exceptions = count(o.get("x")?)?;
    out.rejections = count(o.get("r")?)?;
    let in_buckets: u64 = out.buckets.iter().sum();
    (in_buckets == out.requests()).then_some(out)
}

/// A whole number from 0 to [`MAX_COUNT`] (JSON from JavaScript may write
/// one as `3.0`; a fraction, a negative or a huge number is refused).
fn count(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return (n <= MAX_COUNT).then_some(n);
    }
    let f = v.as_f64()?;
    (f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f <= MAX_COUNT as f64).then_some(f as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(c: [u64; 5], b: [u64; BUCKETS]) -> Value {
        json!({ "c": c, "b": b, "s": 1500, "x": 1, "r": 2 })
    }

    #[test]
    fn a_consistent_report_is_read() {
        let mut b = [0; BUCKETS];
        b[0] = 7;
        b[3] = 3;
        let o = parse(&report([0, 8, 0, 0, 2], b)).unwrap();
        assert_eq!(o.requests(), 10);
        assert_eq!(o.errors(), 2);
        assert_eq!((o.sum_us, o.exceptions, o.rejections), (1500, 1, 2));
        assert_eq!(o.quantile_ms(0.5), Some(5));
        assert_eq!(o.quantile_ms(0.99), Some(50));
        assert!((o.error_ratio() - 0.2).abs() < 1e-9);
    }

    #[test]
    fn a_lying_report_is_refused() {
        let mut b = [0; BUCKETS];
        b[0] = 1;
        // More responses in the classes than in the buckets.
        assert_eq!(parse(&report([0, 5, 0, 0, 0], b)), None);
        // A negative, a fraction, beyond 2^53, a wrong length, a string.
        for bad in [json!(-1), json!(1.5), json!(1e300), json!("1")] {
            let v = json!({ "c": [0, bad, 0, 0, 0], "b": b, "s": 0, "x": 0, "r": 0 });
            assert_eq!(parse(&v), None, "{v}");
        }
        assert_eq!(
            parse(&json!({ "c": [0, 1, 0, 0], "b": b, "s": 0, "x": 0, "r": 0 })),
            None
        );
        assert_eq!(
            parse(&json!({ "c": [0, 1, 0, 0, 0], "b": b, "s": 0, "x": 0 })),
            None
        );
        assert_eq!(parse(&json!([1, 2])), None);
    }

    #[test]
    fn counts_only_grow() {
        let mut b = [0; BUCKETS];
        b[2] = 4;
        let first = parse(&report([0, 4, 0, 0, 0], b)).unwrap();
        let mut b2 = b;
        b2[2] = 3;
        let lower = parse(&report([0, 3, 0, 0, 0], b2)).unwrap();
        assert!(!lower.grew_from(&first));
        assert!(first.grew_from(&lower));
        assert_eq!(first.since(&lower).requests(), 1);
        assert_eq!(lower.since(&first).requests(), 0);
    }

    #[test]
    fn the_preload_has_the_same_buckets() {
        let shim = include_str!("shim.js");
        let list = BUCKETS_MS
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        assert!(
            shim.contains(&format!("const BUCKETS_MS = [{list}];")),
            "src/shim.js's BUCKETS_MS differs from src/outcomes.rs's"
        );
    }
}
