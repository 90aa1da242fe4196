//! `watch`: files under the app's paths are watched with inotify, and each
//! change that counts is said to the supervisor, which reloads the app the
//! zero-downtime way once they have been quiet for `watch_delay`.
//!
//! Every directory is watched on its own rather than through a recursive
//! watch: `node_modules`, dot-directories (`.git`) and what `ignore_watch`
//! names are never entered, so an `npm install` neither reloads the app nor
//! spends the user's inotify watches (a few thousand directories in a
//! typical `node_modules`). Symbolic links are not followed: a link to `/`
//! in the app's tree must not make the manager watch the whole machine.
//! Directories created later are watched as they appear, up to
//! [`MAX_DIRECTORIES`].
//!
//! The watching runs on a thread of its own (inotify's events come on
//! notify's thread, and adding a watch from there would wait on itself).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use globset::{Glob, GlobSet, GlobSetBuilder};
use notify::{Config, EventKind, RecursiveMode, Watcher as _};

/// Most directories one app's watch covers; past it, a warning and no more.
pub const MAX_DIRECTORIES: usize = 10_000;

/// What is not watched: `node_modules`, dot-entries, and `ignore_watch`.
#[derive(Debug, Clone)]
pub struct Ignore {
    /// Plain names (no glob character): any path component equal to one.
    names: BTreeSet<String>,
    /// Globs, matched against the path under its watched root and against
    /// the file's own name.
    globs: GlobSet,
}

impl Ignore {
    /// The rules for `ignore_watch`; an error names the pattern that is no glob.
    pub fn new(patterns: &[String]) -> Result<Ignore, String> {
        let mut names: BTreeSet<String> = ["node_modules".to_string()].into();
        let mut globs = GlobSetBuilder::new();
        for p in patterns {
            let p = p.trim_end_matches('/');
            if p.is_empty() {
                continue;
            }
            if !p.contains(['*', '?', '[', '{']) && !p.contains('/') {
                names.insert(p.to_string());
                continue;
            }
            let p = p.trim_start_matches("./");
            for g in [p.to_string(), format!("{p}/**")] {
                globs.add(Glob::new(&g).map_err(|e| format!("{p:?} is not a glob: {e}"))?);
            }
        }
        Ok(Ignore {
            names,
            globs: globs.build().map_err(|e| format!("ignore_watch: {e}"))?,
        })
    }

    /// Whether `path`, under the watched `root`, is left alone.
    pub fn ignores(&self, root: &Path, path: &Path) -> bool {
        let rel = path.strip_prefix(root).unwrap_or(path);
        let hidden_or_named = rel.components().any(|c| {
            let c = c.as_os_str().to_string_lossy();
            c.starts_with('.') || self.names.contains(c.as_ref())
        });
        hidden_or_named
            || self.globs.is_match(rel)
            || self.globs.is_match(path)
            || path.file_name().is_some_and(|n| self.globs.is_match(n))
    }
}

/// A running watch; dropping it ends the watching.
pub struct Watch {
    stop: mpsc::Sender<Msg>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.stop.send(Msg::Stop);
    }
}

enum Msg {
    Event(notify::Result<notify::Event>),
    Stop,
}

/// Watch `paths` (files or directories), leaving out what `ignore_watch`
/// names; `changed` is called on every change that counts, `warn` with
/// what goes wrong along the way.
pub fn start(
    paths: &[PathBuf],
    ignore_watch: &[String],
    changed: impl Fn() + Send + 'static,
    warn: impl Fn(String) + Send + 'static,
) -> Result<Watch, String> {
    let ignore = Ignore::new(ignore_watch)?;
    let (tx, rx) = mpsc::channel::<Msg>();
    let events = tx.clone();
    let mut watcher = notify::RecommendedWatcher::new(
        move |e| {
            let _ = events.send(Msg::Event(e));
        },
        Config::default().with_follow_symlinks(false),
    )
    .map_err(|e| format!("cannot start watching files: {e}"))?;
    let roots: Vec<PathBuf> = paths.to_vec();
    let mut watched = BTreeSet::new();
    for root in &roots {
        add_tree(&mut watcher, root, root, &ignore, &mut watched, &warn);
    }
    let thread_roots = roots;
    std::thread::Builder::new()
        .name("watch".into())
        .spawn(move || {
            // Ends when the `Watch` is dropped.
            for msg in rx {
                let Msg::Event(e) = msg else { break };
                let event = match e {
                    Ok(event) => event,
                    Err(e) => {
                        warn(format!("watch: {e}"));
                        continue;
                    }
                };
                if matches!(event.kind, EventKind::Access(_) | EventKind::Other)
                    || matches!(
                        event.kind,
                        EventKind::Modify(notify::event::ModifyKind::Metadata(_))
                    )
                {
                    continue;
                }
                let mut counts = false;
                for path in &event.paths {
                    let Some(root) = thread_roots.iter().find(|r| path.starts_with(r)) else {
                        continue;
                    };
                    if ignore.ignores(root, path) {
                        continue;
                    }
                    counts = true;
                    if matches!(event.kind, EventKind::Create(_))
                        && std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
                    {
                        add_tree(&mut watcher, root, path, &ignore, &mut watched, &warn);
                    }
                }
                if counts {
                    changed();
                }
            }
            drop(watcher);
        })
        .map_err(|e| format!("cannot start the watch thread: {e}"))?;
    Ok(Watch { stop: tx })
}

/// Watch `dir` and every directory below it that is not ignored (a file:
/// itself), without following links.
fn add_tree(
    watcher: &mut notify::RecommendedWatcher,
    root: &Path,
    dir: &Path,
    ignore: &Ignore,
    watched: &mut BTreeSet<PathBuf>,
    warn: &impl Fn(String),
) {
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        if watched.len() >= MAX_DIRECTORIES {
            warn(format!(
                "watch: more than {MAX_DIRECTORIES} directories under {}; the rest is not watched (name them in ignore_watch)",
                root.display()
            ));
            return;
        }
        if d != root && ignore.ignores(root, &d) || watched.contains(&d) {
            continue;
        }
        if let Err(e) = watcher.watch(&d, RecursiveMode::NonRecursive) {
            warn(format!("watch: {}: {e}", d.display()));
            continue;
        }
        watched.insert(d.clone());
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            // file_type() does not follow links: a link is never entered.
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_modules_dot_entries_names_and_globs_are_ignored() {
        let i = Ignore::new(&["logs".into(), "*.log".into(), "public/uploads".into()]).unwrap();
        let root = Path::new("/srv/app");
        let ignored = |p: &str| i.ignores(root, &root.join(p));
        assert!(ignored("node_modules/express/index.js"));
        assert!(ignored(".git/index"));
        assert!(ignored("src/.app.js.swp"));
        assert!(ignored("logs/today.txt"));
        assert!(ignored("server.log"));
        assert!(ignored("src/deep/server.log"));
        assert!(ignored("public/uploads/a.png"));
        assert!(!ignored("app.js"));
        assert!(!ignored("src/routes.js"));
        assert!(!ignored("public/index.html"));
        assert!(Ignore::new(&["[".into()]).is_err());
    }
}
