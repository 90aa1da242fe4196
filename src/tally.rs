//! The app's counters, kept across its workers' lives.
//!
//! Each worker keeps its prom-client counters in its own memory, so they
//! die with it: summed over the live workers only, the app's
//! `app_requests_total` fell by a dead worker's count after a `kill -9`,
//! and Prometheus read that as a reset (a spike in `rate()`). So the
//! manager keeps what it last read from each worker, and when a worker is
//! gone (crashed, killed, replaced by a reload, scaled away) folds its last
//! counter values (a histogram's buckets, `_sum` and `_count`, a summary's
//! `_sum` and `_count`) into what its slot has retained. Every slot's series
//! (`worker="N"`) is then the retained values plus those of the slot's live
//! workers: it never goes down because a worker went, the next worker in the
//! slot counts on from there, and a slot scaled away keeps its last values
//! as series that no longer move. `rate()` and `sum()` stay right: no series
//! resets, and none jumps by a count already seen elsewhere (which a
//! separate `worker="retired"` series would do, since the dead worker's
//! counts were already in its own slot's series before it went).
//!
//! Gauges (and a summary's quantiles, and untyped samples) describe a live
//! worker and stay per live worker, from the answers of the scrape at hand.
//!
//! What is lost: the increments a worker made after the last read that
//! reached it. A scrape asks ready, draining and stopping workers alike,
//! the endpoint reads them all as soon as one begins to stop and every
//! 250 ms until it is gone, and the preload sends its counters as its drain
//! ends ([`Tally::last_words`]); a `kill -9` loses what the worker counted
//! since the last scrape.
//!
//! A re-exec carries all of it ([`Tally::carry`], in the takeover state).
//!
//! A worker is not trusted: a compromised one can name a new series in
//! every answer and then die, again and again. What is retained is bounded
//! ([`RETAINED_BYTES`], one whole answer's worth, [`crate::ipc::MAX_LINE`]);
//! a departed worker's series that would take it past that are not kept and
//! are counted (`reason="retained_full"`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;

/// What the retained series of departed workers may take, in bytes of
/// their names and labels: no more than one worker's whole answer.
pub const RETAINED_BYTES: usize = crate::ipc::MAX_LINE;

/// Departed workers remembered, so that a late answer of one (a scrape that
/// overlapped the one that saw it go) is not folded in twice.
const GONE_KEPT: usize = 4096;

/// The prefix of the manager's own families, which the app may not use.
const RESERVED: &str = "nodeherd_";

/// A worker: its slot and pid.
pub type WorkerKey = (u32, i32);

/// One worker's answer to a scrape.
#[derive(Debug, Clone)]
pub struct Answer {
    pub instance: u32,
    pub pid: i32,
    /// Serving (its gauges are shown), rather than starting or leaving.
    pub ready: bool,
    pub text: String,
}

/// The app's metrics from every worker, merged.
#[derive(Debug, Default)]
pub struct Merged {
    pub text: String,
    /// Samples left out, by worker slot and reason.
    pub dropped: BTreeMap<(u32, &'static str), u64>,
}

/// Counts by family, then series, as lists.
pub type CarriedCounts = Vec<(String, Vec<(String, f64)>)>;

/// What crosses a re-exec ([`Tally::carry`]), as lists: JSON keys are text.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Carried {
    /// Slot, then family, then series and value.
    pub retained: Vec<(u32, CarriedCounts)>,
    /// Slot, pid, then family, then series and value.
    pub last: Vec<(u32, i32, CarriedCounts)>,
    /// Family, HELP, TYPE.
    pub meta: Vec<(String, Option<String>, Option<String>)>,
}

/// A family's HELP and TYPE, as the first worker that named it gave them.
#[derive(Debug, Clone, Default)]
struct Meta {
    help: Option<String>,
    kind: Option<String>,
}

/// A series within a family: its sample name and its labels (sorted, the
/// `worker` label not yet added), as text.
type Series = String;

/// Counter values by family, then series.
type Counts = BTreeMap<String, BTreeMap<Series, f64>>;

/// What the manager keeps between scrapes.
#[derive(Debug, Default)]
pub struct Tally {
    /// The counter values last read from each live worker, by family, and
    /// the scrape they were read by.
    last: BTreeMap<WorkerKey, (u64, Counts)>,
    /// What each slot kept of its departed workers, by family.
    retained: BTreeMap<u32, Counts>,
    /// HELP and TYPE of the families retained.
    meta: BTreeMap<String, Meta>,
    retained_bytes: usize,
    gone: VecDeque<WorkerKey>,
    gone_set: BTreeSet<WorkerKey>,
    scrapes: u64,
}

/// Is this sample of a family of `kind` a counter's (it only grows over a
/// worker's life)?
fn counts(kind: Option<&str>, family: &str, sample: &str) -> bool {
    match kind {
        Some("counter") | Some("histogram") => true,
        Some("summary") => sample == format!("{family}_sum") || sample == format!("{family}_count"),
        _ => false,
    }
}

/// A value as the text format writes it.
fn value_text(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

/// `name{labels}` with `worker="slot"` first.
fn with_worker(series: &str, slot: u32) -> String {
    match series.split_once('{') {
        Some((name, rest)) => format!("{name}{{worker=\"{slot}\",{rest}"),
        None => format!("{series}{{worker=\"{slot}\"}}"),
    }
}

/// One worker's answer, read: its families in order, each with its samples
/// (series and value), and what was left out.
struct Read {
    order: Vec<String>,
    meta: BTreeMap<String, Meta>,
    samples: BTreeMap<String, Vec<(Series, f64)>>,
}

fn read(text: &str, slot: u32, dropped: &mut BTreeMap<(u32, &'static str), u64>) -> Read {
    let mut r = Read {
        order: Vec::new(),
        meta: BTreeMap::new(),
        samples: BTreeMap::new(),
    };
    let mut current: Option<String> = None;
    let see = |r: &mut Read, name: &str| {
        if !r.meta.contains_key(name) {
            r.order.push(name.to_string());
            r.meta.insert(name.to_string(), Meta::default());
        }
    };
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (what, name, text) = (parts.next(), parts.next(), parts.next().unwrap_or(""));
            let (Some(what), Some(name)) = (what, name) else {
                continue;
            };
            if what != "HELP" && what != "TYPE" {
                continue;
            }
            if name.starts_with(RESERVED)
                || crate::promtext::parse_sample(&format!("{name} 0")).is_none()
            {
                current = None;
                continue;
            }
            see(&mut r, name);
            let m = r.meta.get_mut(name).expect("seen above");
            match what {
                "HELP" => m.help.get_or_insert_with(|| text.to_string()),
                _ => m.kind.get_or_insert_with(|| text.to_string()),
            };
            current = Some(name.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let sample = match crate::promtext::parse_sample(line) {
            None => Err("malformed"),
            Some(s) if s.name.starts_with(RESERVED) => Err("reserved_name"),
            Some(s) if s.labels.iter().any(|(k, _)| *k == "worker") => Err("worker_label"),
            Some(s) => Ok(s),
        };
        let s = match sample {
            Ok(s) => s,
            Err(reason) => {
                *dropped.entry((slot, reason)).or_default() += 1;
                continue;
            }
        };
        let family = match &current {
            Some(f) if s.name.starts_with(f.as_str()) => f.clone(),
            _ => s.name.to_string(),
        };
        see(&mut r, &family);
        let mut labels = s.labels.clone();
        labels.sort();
        let mut series = s.name.to_string();
        if !labels.is_empty() {
            series.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                let _ = write!(series, "{}{k}=\"{v}\"", if i > 0 { "," } else { "" });
            }
            series.push('}');
        }
        r.samples.entry(family).or_default().push((series, s.value));
    }
    r
}

impl Tally {
    /// A number for the scrape about to ask the workers: a worker's answer
    /// to an older scrape never replaces one to a newer.
    pub fn begin(&mut self) -> u64 {
        self.scrapes += 1;
        self.scrapes
    }

    /// Merge this scrape's `answers`; `alive` is every worker process the
    /// supervisor has now (the others are gone: their counters are folded
    /// into their slots').
    pub fn merge(
        &mut self,
        scrape: u64,
        answers: &[Answer],
        alive: &BTreeSet<WorkerKey>,
    ) -> Merged {
        let mut dropped = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut meta: BTreeMap<String, Meta> = BTreeMap::new();
        // Gauges: family -> lines, from one ready worker per slot.
        let mut gauges: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut gauge_slots = BTreeSet::new();
        for a in answers {
            let key = (a.instance, a.pid);
            let r = read(&a.text, a.instance, &mut dropped);
            for name in &r.order {
                if !meta.contains_key(name) {
                    order.push(name.clone());
                    meta.insert(name.clone(), r.meta[name].clone());
                }
            }
            let mut counters: Counts = BTreeMap::new();
            let show_gauges = a.ready && gauge_slots.insert(a.instance);
            for (family, samples) in &r.samples {
                let kind = meta.get(family).and_then(|m| m.kind.as_deref());
                for (series, v) in samples {
                    let sample = series.split('{').next().unwrap_or("");
                    if counts(kind, family, sample) {
                        *counters
                            .entry(family.clone())
                            .or_default()
                            .entry(series.clone())
                            .or_default() += v;
                    } else if show_gauges {
                        gauges.entry(family.clone()).or_default().push(format!(
                            "{} {}",
                            with_worker(series, a.instance),
                            value_text(*v)
                        ));
                    }
                }
            }
            if self.gone_set.contains(&key) {
                continue;
            }
            match self.last.get(&key) {
                Some((seen, _)) if *seen > scrape => {}
                _ => {
                    self.last.insert(key, (scrape, counters));
                }
            }
        }
        self.fold_departed(alive, &mut dropped);

        // Families only departed workers had still have their series.
        for name in self.meta.keys() {
            if !meta.contains_key(name) {
                order.push(name.clone());
                meta.insert(name.clone(), self.meta[name].clone());
            }
        }
        let mut sums: BTreeMap<&str, BTreeMap<u32, BTreeMap<&str, f64>>> = BTreeMap::new();
        for (slot, families) in &self.retained {
            for (family, series) in families {
                let s = sums.entry(family).or_default().entry(*slot).or_default();
                for (name, v) in series {
                    *s.entry(name).or_default() += v;
                }
            }
        }
        for ((slot, _), (_, families)) in &self.last {
            for (family, series) in families {
                let s = sums.entry(family).or_default().entry(*slot).or_default();
                for (name, v) in series {
                    *s.entry(name).or_default() += v;
                }
            }
        }
        let mut out = String::new();
        for name in &order {
            let m = &meta[name];
            let (c, g) = (sums.get(name.as_str()), gauges.get(name));
            if c.is_none() && g.is_none() {
                continue;
            }
            if let Some(h) = &m.help {
                let _ = writeln!(out, "# HELP {name} {h}");
            }
            if let Some(k) = &m.kind {
                let _ = writeln!(out, "# TYPE {name} {k}");
            }
            for (slot, series) in c.into_iter().flatten() {
                for (s, v) in series {
                    let _ = writeln!(out, "{} {}", with_worker(s, *slot), value_text(*v));
                }
            }
            for line in g.into_iter().flatten() {
                let _ = writeln!(out, "{line}");
            }
        }
        // What a later scrape needs of the families whose series are
        // kept: their HELP and TYPE (and nothing for the others).
        let kept = |name: &str, t: &Tally| {
            t.last.values().any(|(_, f)| f.contains_key(name))
                || t.retained.values().any(|f| f.contains_key(name))
        };
        for (name, m) in meta {
            if !self.meta.contains_key(&name) && kept(&name, self) {
                self.meta.insert(name, m);
            }
        }
        let names: Vec<String> = self.meta.keys().cloned().collect();
        for name in names {
            if !kept(&name, self) {
                self.meta.remove(&name);
            }
        }
        Merged { text: out, dropped }
    }

    /// Fold the last counters of every worker no longer `alive` into its
    /// slot's, as far as [`RETAINED_BYTES`] allows.
    fn fold_departed(
        &mut self,
        alive: &BTreeSet<WorkerKey>,
        dropped: &mut BTreeMap<(u32, &'static str), u64>,
    ) {
        let departed: Vec<WorkerKey> = self
            .last
            .keys()
            .filter(|k| !alive.contains(k))
            .copied()
            .collect();
        for key in departed {
            let Some((_, families)) = self.last.remove(&key) else {
                continue;
            };
            let slot = self.retained.entry(key.0).or_default();
            for (family, series) in families {
                for (name, v) in series {
                    let kept = slot.get_mut(&family).and_then(|f| f.get_mut(&name));
                    if let Some(total) = kept {
                        *total += v;
                        continue;
                    }
                    let cost = family.len() + name.len() + 16;
                    if self.retained_bytes + cost > RETAINED_BYTES {
                        *dropped.entry((key.0, "retained_full")).or_default() += 1;
                        continue;
                    }
                    self.retained_bytes += cost;
                    slot.entry(family.clone()).or_default().insert(name, v);
                }
            }
            self.gone.push_back(key);
            self.gone_set.insert(key);
            while self.gone.len() > GONE_KEPT {
                if let Some(old) = self.gone.pop_front() {
                    self.gone_set.remove(&old);
                }
            }
        }
    }

    /// A worker's counters as it leaves, sent by the preload once its drain
    /// is done: newer than any scrape's answer, taken once.
    pub fn last_words(&mut self, instance: u32, pid: i32, text: &str) {
        let key = (instance, pid);
        let spoke = self
            .last
            .get(&key)
            .is_some_and(|(seen, _)| *seen == u64::MAX);
        if spoke || self.gone_set.contains(&key) {
            return;
        }
        // What is left out is counted when the scrapes read it.
        let r = read(text, instance, &mut BTreeMap::new());
        let mut counters: Counts = BTreeMap::new();
        for (family, samples) in &r.samples {
            let kind = r.meta.get(family).and_then(|m| m.kind.as_deref());
            for (series, v) in samples {
                let sample = series.split('{').next().unwrap_or("");
                if counts(kind, family, sample) {
                    let f = counters.entry(family.clone()).or_default();
                    *f.entry(series.clone()).or_default() += v;
                }
            }
        }
        for family in counters.keys() {
            if !self.meta.contains_key(family) {
                let m = r.meta.get(family).cloned().unwrap_or_default();
                self.meta.insert(family.clone(), m);
            }
        }
        self.last.insert(key, (u64::MAX, counters));
    }

    /// What a re-exec hands over: the retained series and the last reads
    /// (the workers go on counting in the new program). Values JSON cannot
    /// hold (NaN, infinities) are left out.
    pub fn carry(&self) -> Carried {
        let flat = |c: &Counts| -> CarriedCounts {
            c.iter()
                .map(|(f, s)| {
                    let s = s.iter().filter(|(_, v)| v.is_finite());
                    (f.clone(), s.map(|(k, v)| (k.clone(), *v)).collect())
                })
                .collect()
        };
        Carried {
            retained: self.retained.iter().map(|(s, c)| (*s, flat(c))).collect(),
            last: self
                .last
                .iter()
                .map(|((i, p), (_, c))| (*i, *p, flat(c)))
                .collect(),
            meta: self
                .meta
                .iter()
                .map(|(n, m)| (n.clone(), m.help.clone(), m.kind.clone()))
                .collect(),
        }
    }

    /// Take over what [`Tally::carry`] handed over, within the same bound.
    pub fn adopt(c: Carried) -> Tally {
        let mut t = Tally::default();
        for (slot, families) in c.retained {
            for (family, series) in families {
                for (name, v) in series {
                    let cost = family.len() + name.len() + 16;
                    if t.retained_bytes + cost > RETAINED_BYTES {
                        continue;
                    }
                    t.retained_bytes += cost;
                    let f = t.retained.entry(slot).or_default().entry(family.clone());
                    f.or_default().insert(name, v);
                }
            }
        }
        for (instance, pid, families) in c.last {
            let counts: Counts = families
                .into_iter()
                .map(|(f, s)| (f, s.into_iter().collect()))
                .collect();
            t.last.insert((instance, pid), (0, counts));
        }
        t.meta = c
            .meta
            .into_iter()
            .map(|(n, help, kind)| (n, Meta { help, kind }))
            .collect();
        t
    }

    /// Bytes held by retained series (for tests and for the bound).
    pub fn retained_bytes(&self) -> usize {
        self.retained_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(instance: u32, pid: i32, text: &str) -> Answer {
        Answer {
            instance,
            pid,
            ready: true,
            text: text.into(),
        }
    }

    fn alive(keys: &[WorkerKey]) -> BTreeSet<WorkerKey> {
        keys.iter().copied().collect()
    }

    const REQ: &str = "# HELP req_total Requests.\n# TYPE req_total counter\n";

    #[test]
    fn a_slots_counter_counts_on_across_its_workers() {
        let mut t = Tally::default();
        let s = t.begin();
        let m = t.merge(
            s,
            &[
                answer(0, 10, &format!("{REQ}req_total{{route=\"/\"}} 5\n")),
                answer(1, 11, &format!("{REQ}req_total{{route=\"/\"}} 7\n")),
            ],
            &alive(&[(0, 10), (1, 11)]),
        );
        assert!(
            m.text.contains("req_total{worker=\"0\",route=\"/\"} 5\n"),
            "{}",
            m.text
        );
        // Worker 10 is killed; 20 takes slot 0 and counts 2.
        let s = t.begin();
        let m = t.merge(
            s,
            &[
                answer(0, 20, &format!("{REQ}req_total{{route=\"/\"}} 2\n")),
                answer(1, 11, &format!("{REQ}req_total{{route=\"/\"}} 9\n")),
            ],
            &alive(&[(0, 20), (1, 11)]),
        );
        assert!(
            m.text.contains("req_total{worker=\"0\",route=\"/\"} 7\n"),
            "{}",
            m.text
        );
        assert!(
            m.text.contains("req_total{worker=\"1\",route=\"/\"} 9\n"),
            "{}",
            m.text
        );
        assert_eq!(m.text.matches("# TYPE req_total counter").count(), 1);
        // Slot 1 scaled away: its series stays, at its last value.
        let s = t.begin();
        let m = t.merge(
            s,
            &[answer(0, 20, &format!("{REQ}req_total{{route=\"/\"}} 3\n"))],
            &alive(&[(0, 20)]),
        );
        assert!(
            m.text.contains("req_total{worker=\"0\",route=\"/\"} 8\n"),
            "{}",
            m.text
        );
        assert!(
            m.text.contains("req_total{worker=\"1\",route=\"/\"} 9\n"),
            "{}",
            m.text
        );
    }

    #[test]
    fn during_a_reload_both_workers_of_a_slot_count_once_each() {
        let mut t = Tally::default();
        let s = t.begin();
        t.merge(
            s,
            &[answer(0, 10, &format!("{REQ}req_total 5\n"))],
            &alive(&[(0, 10)]),
        );
        let s = t.begin();
        let m = t.merge(
            s,
            &[
                answer(0, 10, &format!("{REQ}req_total 6\n")),
                answer(0, 20, &format!("{REQ}req_total 1\n")),
            ],
            &alive(&[(0, 10), (0, 20)]),
        );
        assert!(m.text.contains("req_total{worker=\"0\"} 7\n"), "{}", m.text);
        // The old one went without being read again: its last read counts.
        let s = t.begin();
        let m = t.merge(
            s,
            &[answer(0, 20, &format!("{REQ}req_total 3\n"))],
            &alive(&[(0, 20)]),
        );
        assert!(m.text.contains("req_total{worker=\"0\"} 9\n"), "{}", m.text);
        // A late answer of the departed one changes nothing.
        let m = t.merge(
            s,
            &[
                answer(0, 10, &format!("{REQ}req_total 100\n")),
                answer(0, 20, &format!("{REQ}req_total 3\n")),
            ],
            &alive(&[(0, 20)]),
        );
        assert!(m.text.contains("req_total{worker=\"0\"} 9\n"), "{}", m.text);
    }

    #[test]
    fn histograms_count_on_and_gauges_stay_per_live_worker() {
        let mut t = Tally::default();
        let text = |n: u32| {
            format!(
                "# HELP lat Latency.\n# TYPE lat histogram\nlat_bucket{{le=\"0.1\"}} {n}\nlat_bucket{{le=\"+Inf\"}} {n}\nlat_sum 0.5\nlat_count {n}\n\
                 # HELP mem Memory.\n# TYPE mem gauge\nmem {n}00\n\
                 # HELP q Quantiles.\n# TYPE q summary\nq{{quantile=\"0.5\"}} 0.2\nq_sum 1\nq_count {n}\n"
            )
        };
        let s = t.begin();
        t.merge(s, &[answer(0, 10, &text(4))], &alive(&[(0, 10)]));
        let s = t.begin();
        let m = t.merge(s, &[answer(0, 20, &text(1))], &alive(&[(0, 20)]));
        for want in [
            "lat_bucket{worker=\"0\",le=\"+Inf\"} 5\n",
            "lat_bucket{worker=\"0\",le=\"0.1\"} 5\n",
            "lat_sum{worker=\"0\"} 1\n",
            "lat_count{worker=\"0\"} 5\n",
            "mem{worker=\"0\"} 100\n",
            "q{worker=\"0\",quantile=\"0.5\"} 0.2\n",
            "q_sum{worker=\"0\"} 2\n",
            "q_count{worker=\"0\"} 5\n",
        ] {
            assert!(m.text.contains(want), "{want} in {}", m.text);
        }
        // A worker not ready (draining) is counted but shows no gauge.
        let s = t.begin();
        let mut a = answer(0, 20, &text(2));
        a.ready = false;
        let m = t.merge(s, &[a], &alive(&[(0, 20)]));
        assert!(m.text.contains("lat_count{worker=\"0\"} 6\n"), "{}", m.text);
        assert!(!m.text.contains("mem{"), "{}", m.text);
    }

    #[test]
    fn what_is_kept_crosses_a_reexec() {
        let mut t = Tally::default();
        let s = t.begin();
        t.merge(
            s,
            &[
                answer(0, 10, &format!("{REQ}req_total 5\n")),
                answer(1, 11, &format!("{REQ}req_total 7\n")),
            ],
            &alive(&[(0, 10), (1, 11)]),
        );
        let s = t.begin();
        t.merge(
            s,
            &[answer(1, 11, &format!("{REQ}req_total 8\n"))],
            &alive(&[(1, 11)]),
        );
        let json = serde_json::to_string(&t.carry()).unwrap();
        let mut t = Tally::adopt(serde_json::from_str(&json).unwrap());
        let s = t.begin();
        let m = t.merge(
            s,
            &[
                answer(0, 20, &format!("{REQ}req_total 1\n")),
                answer(1, 11, &format!("{REQ}req_total 9\n")),
            ],
            &alive(&[(0, 20), (1, 11)]),
        );
        assert!(m.text.contains("# TYPE req_total counter"), "{}", m.text);
        assert!(m.text.contains("req_total{worker=\"0\"} 6\n"), "{}", m.text);
        assert!(m.text.contains("req_total{worker=\"1\"} 9\n"), "{}", m.text);
    }

    #[test]
    fn a_leaving_workers_last_words_count_once() {
        let mut t = Tally::default();
        let s = t.begin();
        t.merge(
            s,
            &[answer(0, 10, &format!("{REQ}req_total 5\n"))],
            &alive(&[(0, 10)]),
        );
        t.last_words(0, 10, &format!("{REQ}req_total 8\n"));
        // Said once: a second time, or an older scrape's answer, changes nothing.
        t.last_words(0, 10, &format!("{REQ}req_total 800\n"));
        let m = t.merge(
            s,
            &[answer(0, 10, &format!("{REQ}req_total 6\n"))],
            &alive(&[(0, 10)]),
        );
        assert!(m.text.contains("req_total{worker=\"0\"} 8\n"), "{}", m.text);
        let s = t.begin();
        let m = t.merge(
            s,
            &[answer(0, 20, &format!("{REQ}req_total 1\n"))],
            &alive(&[(0, 20)]),
        );
        assert!(m.text.contains("req_total{worker=\"0\"} 9\n"), "{}", m.text);
        t.last_words(0, 10, &format!("{REQ}req_total 800\n"));
        let m = t.merge(s, &[], &alive(&[(0, 20)]));
        assert!(m.text.contains("req_total{worker=\"0\"} 9\n"), "{}", m.text);
    }

    #[test]
    fn label_order_does_not_split_a_series() {
        let mut t = Tally::default();
        let s = t.begin();
        t.merge(
            s,
            &[answer(
                0,
                10,
                &format!("{REQ}req_total{{a=\"1\",b=\"2\"}} 5\n"),
            )],
            &alive(&[(0, 10)]),
        );
        let s = t.begin();
        let m = t.merge(
            s,
            &[answer(
                0,
                20,
                &format!("{REQ}req_total{{b=\"2\",a=\"1\"}} 1\n"),
            )],
            &alive(&[(0, 20)]),
        );
        assert!(
            m.text
                .contains("req_total{worker=\"0\",a=\"1\",b=\"2\"} 6\n"),
            "{}",
            m.text
        );
        assert_eq!(m.text.matches("req_total{").count(), 1, "{}", m.text);
    }

    /// A compromised worker names new series, dies, and its replacement
    /// does it again: what the manager keeps stops growing at the bound.
    #[test]
    fn a_worker_cannot_grow_what_is_retained_without_bound() {
        let mut t = Tally::default();
        let mut full = 0;
        let series = 20_000;
        for (pid, round) in (100..).zip(0..5) {
            let mut text = String::from(REQ);
            for i in 0..series {
                let _ = writeln!(
                    text,
                    "req_total{{id=\"r{round}-{i}-{}\"}} 1",
                    "x".repeat(100)
                );
            }
            let s = t.begin();
            t.merge(s, &[answer(0, pid, &text)], &alive(&[(0, pid)]));
            let s = t.begin();
            let m = t.merge(s, &[], &alive(&[]));
            full += m.dropped.get(&(0, "retained_full")).copied().unwrap_or(0);
            assert!(t.retained_bytes() <= RETAINED_BYTES);
        }
        assert!(full > 0, "nothing was refused");
        assert!(t.retained_bytes() > RETAINED_BYTES / 2);
        let kept: usize = t
            .retained
            .values()
            .flat_map(|f| f.values())
            .map(BTreeMap::len)
            .sum();
        assert!(kept < 5 * series, "{kept}");
    }
}
