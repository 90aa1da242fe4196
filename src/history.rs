//! Release history: every configuration a reload (or a start) put before
//! real traffic, numbered, with what it ran exactly, kept across restarts
//! in the app's state directory so `nodeherd rollback` can go back to it.
//!
//! "What it ran exactly" is pinned when the configuration is read: the
//! working directory and the script resolved through symlinks (so a
//! release directory `current -> releases/7` is remembered as
//! `releases/7`, and a rollback serves it even after `current` moved),
//! the interpreter found on `PATH` and resolved the same way, and what that
//! binary says to `--version`. Changing Node is then a new generation like
//! any other, and a canary judges it.
//!
//! The file is the manager's own: it is read only if it is a regular file
//! owned by the manager's user, not a symlink, and not larger than
//! [`MAX_FILE_BYTES`]; anything else is said in the journal and the
//! history starts empty (the next write replaces it). It is written whole
//! to a new file and renamed over the old one, so a crash leaves either.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use crate::config::{App, Interpreter};

/// The file's name in the state directory: one per app, as the managers
/// of a file of several apps share one (`history-APP.json`, the name's
/// characters other than letters, digits, `-`, `_` and `.` made `_`).
pub fn file_name(app: &str) -> String {
    let clean: String = app
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("history-{clean}.json")
}
/// A history file larger than this is refused (and never written).
pub const MAX_FILE_BYTES: u64 = 4 << 20;
/// `history_keep`'s default (the key is read with the configuration).
pub const DEFAULT_KEEP: u32 = crate::config::HISTORY_KEEP_DEFAULT;
/// The version of the file's format.
const FORMAT: u32 = 1;
/// Generation numbers above this are refused: no real history reaches
/// it, and a hostile one cannot make the next number overflow.
const MAX_GENERATION: u64 = 1 << 40;
/// How long `node --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// How a generation fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Its reload is under way (a manager that stopped meanwhile left it so:
    /// read back, it counts as failed).
    Trying,
    /// In force now.
    Serving,
    /// Was in force, then replaced by a later one.
    Served,
    /// Its canary was worse than the baseline (or crashed): rolled back.
    RolledBack,
    /// Its reload failed (a worker crashed or was not ready in time).
    Failed,
}

impl Outcome {
    pub fn word(self) -> &'static str {
        match self {
            Outcome::Trying => "trying",
            Outcome::Serving => "serving",
            Outcome::Served => "served",
            Outcome::RolledBack => "rolled back",
            Outcome::Failed => "failed",
        }
    }
}

/// One generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub generation: u64,
    /// When it was read (ms since the epoch).
    pub at_ms: u64,
    pub outcome: Outcome,
    /// The generation it went back to, for one a rollback made.
    #[serde(default)]
    pub rollback_of: Option<u64>,
    /// What `--version` said of its interpreter (Node only).
    #[serde(default)]
    pub node_version: Option<String>,
    /// The configuration, pinned (see [`pin`]).
    pub app: App,
}

impl Entry {
    /// The interpreter's resolved path, if it has one.
    pub fn interpreter(&self) -> Option<&Path> {
        match &self.app.interpreter {
            Interpreter::Node(p) | Interpreter::Other(p) => Some(p),
            Interpreter::None => None,
        }
    }

    /// What anyone allowed to read the manager's properties may see: no
    /// environment, no arguments (they may hold secrets).
    pub fn view(&self) -> serde_json::Value {
        serde_json::json!({
            "generation": self.generation,
            "at_unix_ms": self.at_ms,
            "outcome": self.outcome.word(),
            "rollback_of": self.rollback_of,
            "script": self.app.script,
            "cwd": self.app.cwd,
            "interpreter": self.interpreter(),
            "node_version": self.node_version,
            "instances": self.app.instances,
        })
    }

    /// Its files are still there: the script, its directory and its
    /// interpreter, as they were pinned. A rollback to one that is gone
    /// fails closed with this message.
    pub fn missing(&self) -> Option<String> {
        if !self.app.cwd.is_dir() {
            return Some(format!(
                "generation {}'s directory {} is gone",
                self.generation,
                self.app.cwd.display()
            ));
        }
        let script_ok = match self.app.interpreter {
            Interpreter::None => crate::config::find_executable(&self.app.script).is_some(),
            _ => self.app.script.is_file(),
        };
        if !script_ok {
            return Some(format!(
                "generation {}'s script {} is gone",
                self.generation,
                self.app.script.display()
            ));
        }
        if let Some(p) = self.interpreter()
            && crate::config::find_executable(p).is_none()
        {
            return Some(format!(
                "generation {}'s interpreter {} is gone or not executable",
                self.generation,
                p.display()
            ));
        }
        None
    }
}

#[derive(Serialize, Deserialize)]
struct Document {
    format: u32,
    entries: Vec<Entry>,
}

/// Resolve what `app` runs through symlinks, so that this generation runs
/// the same files whatever `current` (or `PATH`) says later. A path that
/// cannot be resolved is left as it is (the check that it runs comes after).
pub fn pin(app: &mut App) {
    if let Ok(p) = std::fs::canonicalize(&app.cwd) {
        app.cwd = p;
    }
    let resolve_exe =
        |p: &Path| crate::config::find_executable(p).and_then(|f| std::fs::canonicalize(f).ok());
    match &mut app.interpreter {
        Interpreter::Node(p) | Interpreter::Other(p) => {
            if let Some(r) = resolve_exe(p) {
                *p = r;
            }
            if let Ok(s) = std::fs::canonicalize(&app.script) {
                app.script = s;
            }
        }
        Interpreter::None => {
            if let Some(r) = resolve_exe(&app.script) {
                app.script = r;
            }
        }
    }
}

/// A binary as it is on disk: path, inode, mtime (s, ns).
type FileKey = (PathBuf, u64, i64, i64);

/// What the Node binary `app` runs says to `--version` (`None` for other
/// interpreters, or if it says nothing sensible in time). Remembered per
/// file (path, inode, mtime), so asking again is free. Blocking on a miss.
pub fn node_version(app: &App) -> Option<String> {
    let Interpreter::Node(path) = &app.interpreter else {
        return None;
    };
    let meta = std::fs::metadata(path).ok()?;
    let key = (path.clone(), meta.ino(), meta.mtime(), meta.mtime_nsec());
    static SEEN: Mutex<Option<HashMap<FileKey, String>>> = Mutex::new(None);
    if let Some(v) = SEEN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .get(&key)
    {
        return Some(v.clone());
    }
    let as_user = app.credentials.as_ref().map(|c| (c.uid, c.gid));
    let v = ask_version(path, as_user)?;
    SEEN.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(key, v.clone());
    Some(v)
}

/// Run `node --version`, bounded in time and output; no `NODE_OPTIONS`
/// (the app's preloads are not ours to run here), and as the workers'
/// user when they have one of their own: the binary may be theirs to
/// replace, and it must not run with the manager's rights.
fn ask_version(node: &Path, as_user: Option<(u32, u32)>) -> Option<String> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(node);
    if let Some((uid, gid)) = as_user
        && nix::unistd::geteuid().is_root()
    {
        // std drops the supplementary groups too when root sets a uid.
        cmd.uid(uid).gid(gid);
    }
    let mut child = cmd
        .arg("--version")
        .env_remove("NODE_OPTIONS")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let end = Instant::now() + VERSION_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut out = String::new();
    child
        .stdout
        .take()?
        .take(64)
        .read_to_string(&mut out)
        .ok()?;
    let v = out.trim();
    let sane = v.starts_with('v')
        && v.len() > 1
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-+".contains(c));
    sane.then(|| v.to_string())
}

/// Where the history is kept: the first of systemd's `$STATE_DIRECTORY`,
/// else the manager's private runtime directory (lost when it stops; the
/// journal says so once).
pub fn dir(runtime_dir: &Path) -> (PathBuf, bool) {
    match crate::rundir::state_dir() {
        Some(d) => (d, true),
        None => (runtime_dir.to_path_buf(), false),
    }
}

fn open_dir(dir: &Path) -> Result<OwnedFd, String> {
    nix::fcntl::open(
        dir,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )
    .map_err(|e| {
        format!(
            "cannot open {} ({e}; a symlink there is refused)",
            dir.display()
        )
    })
}

/// Read the history in `dir`: none yet is an empty one; a file that is not
/// the manager's own regular file, too large, or not a history at all is
/// refused with the reason (the caller says it and starts empty).
pub fn read(dir: &Path, name: &str) -> Result<Vec<Entry>, String> {
    let path = dir.join(name);
    let dirfd = open_dir(dir)?;
    let fd = match nix::fcntl::openat(
        dirfd.as_fd(),
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(Vec::new()),
        Err(nix::errno::Errno::ELOOP) => {
            return Err(format!("{} is a symlink: refused", path.display()));
        }
        Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
    };
    let mut file = std::fs::File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file: refused", path.display()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "{} is owned by uid {}, not by the manager's uid {me}: refused",
            path.display(),
            meta.uid()
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{} is {} bytes, more than a history ever is ({MAX_FILE_BYTES}): refused",
            path.display(),
            meta.len()
        ));
    }
    let mut text = Vec::new();
    (&mut file)
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&text).map_err(|e| {
        format!(
            "{} is not a nodeherd history ({e}): refused",
            path.display()
        )
    })
}

/// The document's entries, checked: its format, numbers in range, each once.
fn parse(text: &[u8]) -> Result<Vec<Entry>, String> {
    let doc: Document = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    if doc.format != FORMAT {
        return Err(format!(
            "format {}, this nodeherd reads {FORMAT}",
            doc.format
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut entries = doc.entries;
    for e in &mut entries {
        if e.generation == 0 || e.generation > MAX_GENERATION || !seen.insert(e.generation) {
            return Err(format!("generation {} out of range or twice", e.generation));
        }
        // Its manager stopped while it was tried: it never served.
        if e.outcome == Outcome::Trying {
            e.outcome = Outcome::Failed;
        }
    }
    entries.sort_by_key(|e| e.generation);
    Ok(entries)
}

/// The file's bytes for `entries`: the newest `keep`, fewer if they would
/// not fit in [`MAX_FILE_BYTES`].
pub fn render(entries: &[Entry]) -> Vec<u8> {
    let mut from = 0;
    loop {
        let doc = Document {
            format: FORMAT,
            entries: entries[from..].to_vec(),
        };
        let text = serde_json::to_vec(&doc).unwrap_or_default();
        if (text.len() as u64) <= MAX_FILE_BYTES || from + 1 >= entries.len() {
            return text;
        }
        from += 1;
    }
}

/// Write `text` as the history in `dir`: a new file (0600, never through
/// a symlink), synced, renamed over the old one. Blocking.
pub fn write(dir: &Path, name: &str, text: &[u8]) -> Result<(), String> {
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "the history is {} bytes, more than {MAX_FILE_BYTES}: not written",
            text.len()
        ));
    }
    let dirfd = open_dir(dir)?;
    let tmp = format!(".{name}.new");
    // One left by a crash (or put there) goes first: never written through.
    let _ = nix::unistd::unlinkat(
        dirfd.as_fd(),
        tmp.as_str(),
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    );
    let fd = nix::fcntl::openat(
        dirfd.as_fd(),
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| format!("cannot create {}: {e}", dir.join(&tmp).display()))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(text)
        .and_then(|_| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", dir.join(&tmp).display()))?;
    nix::fcntl::renameat(dirfd.as_fd(), tmp.as_str(), dirfd.as_fd(), name)
        .map_err(|e| format!("cannot rename it to {}: {e}", dir.join(name).display()))?;
    Ok(())
}

/// Writes off the supervisor's thread, in order, the latest first: one
/// thread that writes whatever was sent last.
pub struct Writer {
    tx: std::sync::mpsc::Sender<Vec<u8>>,
}

impl Writer {
    pub fn new(dir: PathBuf, name: String) -> Writer {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let _ = std::thread::Builder::new()
            .name("history".into())
            .spawn(move || {
                while let Ok(mut text) = rx.recv() {
                    while let Ok(newer) = rx.try_recv() {
                        text = newer;
                    }
                    if let Err(e) = write(&dir, &name, &text) {
                        crate::logs::warn(&format!("release history: {e}"));
                    }
                }
            });
        Writer { tx }
    }

    pub fn send(&self, text: Vec<u8>) {
        let _ = self.tx.send(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(generation: u64, outcome: Outcome) -> Entry {
        Entry {
            generation,
            at_ms: 1,
            outcome,
            rollback_of: None,
            node_version: Some("v20.0.0".into()),
            app: crate::config::test_app(),
        }
    }

    #[test]
    fn a_history_reads_back_as_written_and_one_left_trying_counts_as_failed() {
        let text = render(&[entry(1, Outcome::Served), entry(2, Outcome::Trying)]);
        let back = parse(&text).unwrap();
        assert_eq!(back[0], entry(1, Outcome::Served));
        assert_eq!(back[1].outcome, Outcome::Failed);
    }

    #[test]
    fn numbers_out_of_range_or_twice_and_other_formats_are_refused() {
        for bad in [
            render(&[entry(0, Outcome::Served)]),
            render(&[entry(MAX_GENERATION + 1, Outcome::Served)]),
            render(&[entry(3, Outcome::Served), entry(3, Outcome::Failed)]),
            br#"{"format":2,"entries":[]}"#.to_vec(),
            b"\x00garbage".to_vec(),
        ] {
            assert!(parse(&bad).is_err(), "{}", String::from_utf8_lossy(&bad));
        }
    }

    #[test]
    fn each_app_has_a_file_of_its_own_and_its_name_cannot_leave_the_directory() {
        assert_eq!(file_name("api"), "history-api.json");
        assert_eq!(file_name("../../etc/x y"), "history-.._.._etc_x_y.json");
        assert!(!file_name(&"a/".repeat(100)).contains('/'));
    }

    #[test]
    fn what_anyone_may_read_holds_no_environment_nor_arguments() {
        let mut e = entry(4, Outcome::Serving);
        e.app.env.insert("DB_PASSWORD".into(), "hunter2".into());
        e.app.args = vec!["--token=s3cret".into()];
        let v = e.view().to_string();
        assert!(!v.contains("hunter2") && !v.contains("s3cret"), "{v}");
        assert!(v.contains("v20.0.0"), "{v}");
    }
}
