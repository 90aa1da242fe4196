//! The driver's side of the release history: which generation is which
//! entry, how each fared (it follows the core), what a rollback goes back
//! to, and the writes (see [`crate::history`] for the file itself).
//!
//! Generation numbers are the history's, so they go on across restarts:
//! a fresh manager takes the number after the last one kept, or the
//! number of the generation it served before if it starts the very same
//! configuration again (a restart is not a release).

use std::path::Path;
use std::sync::Arc;

use crate::config::App;
use crate::history::{self, Entry, Outcome};

pub struct Releases {
    entries: Vec<Entry>,
    keep: usize,
    /// None: nothing is written (a driver without a history, in tests).
    writer: Option<history::Writer>,
    /// The core's count of rolled-back reloads when last followed: a
    /// generation dropped while it went up was rolled back, else it failed.
    rolled_back: u64,
    /// What anyone may read of it (JSON), rebuilt on change.
    view: Arc<str>,
}

impl Default for Releases {
    fn default() -> Releases {
        Releases {
            entries: Vec::new(),
            keep: history::DEFAULT_KEEP as usize,
            writer: None,
            rolled_back: 0,
            view: Arc::from("[]"),
        }
    }
}

impl Releases {
    /// Read the history kept for this app (a refused file is said and
    /// replaced), and place `app`, in force as `resumed` after a re-exec or
    /// freshly started: returns its generation and the highest number
    /// taken, for the next reload's.
    pub fn open(runtime_dir: &Path, app: &App, resumed: Option<u64>) -> (Releases, u64, u64) {
        let (dir, kept) = history::dir(runtime_dir);
        if !kept {
            crate::logs::info(&format!(
                "release history in {} (no $STATE_DIRECTORY: set StateDirectory= to keep it across restarts)",
                dir.display()
            ));
        }
        let name = history::file_name(&app.name);
        let entries = history::read(&dir, &name).unwrap_or_else(|e| {
            crate::logs::warn(&format!(
                "release history: {e}; starting a new one (the next write replaces it)"
            ));
            Vec::new()
        });
        let mut r = Releases {
            entries,
            keep: app.history_keep.max(1) as usize,
            writer: Some(history::Writer::new(dir, name)),
            ..Releases::default()
        };
        let highest = r.entries.iter().map(|e| e.generation).max().unwrap_or(0);
        let node = history::node_version(app);
        let generation = match resumed {
            Some(g) if r.entry(g).is_some() => g,
            Some(g) => {
                r.push(g, app.clone(), node, None);
                g
            }
            None => {
                let again = r
                    .entries
                    .iter()
                    .rev()
                    .find(|e| e.outcome == Outcome::Serving)
                    .filter(|e| e.app == *app && e.node_version == node)
                    .map(|e| e.generation);
                match again {
                    Some(g) => g,
                    None => {
                        let g = highest + 1;
                        r.push(g, app.clone(), node, None);
                        g
                    }
                }
            }
        };
        r.serving(generation);
        r.save();
        (r, generation, highest.max(generation))
    }

    fn entry(&self, generation: u64) -> Option<&Entry> {
        self.entries.iter().find(|e| e.generation == generation)
    }

    fn push(&mut self, generation: u64, app: App, node: Option<String>, rollback_of: Option<u64>) {
        self.entries.push(Entry {
            generation,
            at_ms: crate::autopsy::unix_ms(),
            outcome: Outcome::Trying,
            rollback_of,
            node_version: node,
            app,
        });
    }

    /// `generation` is in force: the one before it served.
    fn serving(&mut self, generation: u64) {
        for e in &mut self.entries {
            if e.generation == generation {
                e.outcome = Outcome::Serving;
            } else if e.outcome == Outcome::Serving {
                e.outcome = Outcome::Served;
            }
        }
    }

    /// A reload (or a rollback, back to `rollback_of`) tries `app` as `generation`.
    pub fn tried(&mut self, generation: u64, app: &App, rollback_of: Option<u64>) {
        let node = history::node_version(app);
        self.push(generation, app.clone(), node, rollback_of);
        self.save();
    }

    /// Follow the core after its events: the generation `in_force`, those
    /// still `wanted`, and its count of rolled-back reloads; `keep`: the
    /// configuration in force's `history_keep`.
    pub fn follow(&mut self, in_force: u64, wanted: &[u64], rolled_back: u64, keep: u32) {
        let mut changed = false;
        if keep.max(1) as usize != self.keep {
            self.keep = keep.max(1) as usize;
            changed = true;
        }
        if self
            .entry(in_force)
            .is_some_and(|e| e.outcome != Outcome::Serving)
        {
            self.serving(in_force);
            changed = true;
        }
        let judged = rolled_back > self.rolled_back;
        self.rolled_back = rolled_back;
        for e in &mut self.entries {
            if e.outcome == Outcome::Trying && !wanted.contains(&e.generation) {
                e.outcome = if judged {
                    Outcome::RolledBack
                } else {
                    Outcome::Failed
                };
                changed = true;
            }
        }
        if changed {
            self.save();
        }
    }

    /// The Node version of `generation`'s workers, if known.
    pub fn node_of(&self, generation: u64) -> Option<String> {
        self.entry(generation)?.node_version.clone()
    }

    /// What `Rollback(n)` goes back to: generation `n`, or with 0 the
    /// newest one that served before `in_force`. Its files must still be
    /// there (fail closed, nothing changes).
    pub fn target(&self, n: u64, in_force: u64) -> Result<&Entry, String> {
        let kept = || {
            let ns: Vec<String> = self
                .entries
                .iter()
                .map(|e| format!("{} ({})", e.generation, e.outcome.word()))
                .collect();
            if ns.is_empty() {
                "none".to_string()
            } else {
                ns.join(", ")
            }
        };
        let e = if n == 0 {
            self.entries
                .iter()
                .rev()
                .find(|e| e.outcome == Outcome::Served && e.generation != in_force)
                .ok_or_else(|| {
                    format!(
                        "no earlier generation served (kept: {}); nothing changed",
                        kept()
                    )
                })?
        } else {
            self.entry(n).ok_or_else(|| {
                format!(
                    "generation {n} is not in the release history (kept: {}); nothing changed",
                    kept()
                )
            })?
        };
        if e.generation == in_force {
            return Err(format!(
                "generation {} is the one serving; nothing changed",
                e.generation
            ));
        }
        if let Some(gone) = e.missing() {
            return Err(format!(
                "rollback refused: {gone}; nothing changed, the workers keep serving"
            ));
        }
        Ok(e)
    }

    /// The history as anyone may read it (JSON: no environment).
    pub fn view(&self) -> Arc<str> {
        self.view.clone()
    }

    /// Keep the newest `keep` (never the one serving, nor one being
    /// tried), rebuild the view, and write it.
    fn save(&mut self) {
        while self.entries.len() > self.keep {
            let Some(i) = self
                .entries
                .iter()
                .position(|e| !matches!(e.outcome, Outcome::Serving | Outcome::Trying))
            else {
                break;
            };
            self.entries.remove(i);
        }
        let view: Vec<serde_json::Value> = self.entries.iter().map(Entry::view).collect();
        self.view = Arc::from(serde_json::Value::Array(view).to_string());
        if let Some(w) = &self.writer {
            w.send(history::render(&self.entries));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn releases(n: u64) -> Releases {
        let mut r = Releases::default();
        for g in 1..=n {
            r.push(g, app(), None, None);
        }
        r
    }

    /// An app whose files are there.
    fn app() -> App {
        let mut a = crate::config::test_app();
        a.cwd = "/".into();
        a.script = std::env::current_exe().unwrap();
        a
    }

    #[test]
    fn a_dropped_generation_is_rolled_back_only_if_the_core_counted_a_rollback() {
        let mut r = releases(1);
        r.serving(1);
        r.tried(2, &app(), None);
        r.follow(1, &[1, 2], 0, 10);
        r.follow(1, &[1], 0, 10);
        assert_eq!(r.entry(2).unwrap().outcome, Outcome::Failed);
        r.tried(3, &app(), None);
        r.follow(1, &[1, 3], 0, 10);
        r.follow(1, &[1], 1, 10);
        assert_eq!(r.entry(3).unwrap().outcome, Outcome::RolledBack);
        assert_eq!(r.entry(1).unwrap().outcome, Outcome::Serving);
    }

    #[test]
    fn rollback_zero_is_the_newest_that_served_before_the_one_in_force() {
        let mut r = releases(1);
        r.serving(1);
        r.tried(2, &app(), None);
        r.follow(2, &[2], 0, 10);
        r.tried(3, &app(), None);
        r.follow(2, &[2, 3], 0, 10);
        r.follow(2, &[2], 1, 10); // 3 rolled back
        r.tried(4, &app(), Some(1));
        r.follow(4, &[4], 1, 10);
        assert_eq!(r.target(0, 4).unwrap().generation, 2);
        assert_eq!(r.target(3, 4).unwrap().generation, 3);
        assert!(r.target(4, 4).unwrap_err().contains("the one serving"));
        assert!(
            r.target(9, 4)
                .unwrap_err()
                .contains("not in the release history")
        );
        r.entries[1].app.cwd = "/nonexistent/releases/2".into();
        let gone = r.target(0, 4).unwrap_err();
        assert!(
            gone.contains("directory /nonexistent/releases/2 is gone"),
            "{gone}"
        );
    }

    #[test]
    fn trimming_keeps_the_generation_serving_and_one_being_tried() {
        let mut r = releases(5);
        r.serving(1);
        r.follow(1, &[1, 5], 0, 10); // 2, 3 and 4 failed; 5 is tried
        r.keep = 2;
        r.save();
        let kept: Vec<u64> = r.entries.iter().map(|e| e.generation).collect();
        assert_eq!(kept, vec![1, 5]);
        assert!(r.view().contains("\"generation\":5"), "{}", r.view());
    }
}
