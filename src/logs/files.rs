//! Log files written by the manager, for apps that set PM2's `out_file`,
//! `error_file` or `log_file`: the writer thread's other sink beside the
//! journal.
//!
//! Every worker line already passes through one writer thread, so the
//! files have one writer too: lines from different workers never
//! interleave, and rotation is done between two lines. Before a line would
//! take a file past `log_max_size`, or when its first line is from an
//! earlier hour/day/week/month than now (`log_rotate_interval`), the file
//! is renamed ([`rotated`](super::rotated)) and a new one opened in its
//! place: every line is in exactly one file, whole. Nothing is copied and
//! truncated (pm2-logrotate's way, which loses what is written meanwhile),
//! and no worker holds a file (PM2's cluster mode, where only instance 0
//! rotated). For an outside logrotate, `reopen` (SIGUSR1, `ReopenLogs`)
//! closes every file and opens its path again.
//!
//! A file that cannot be opened or written sends its lines to the journal
//! instead (said once, and again once it is written again): never lost.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Stream;
use super::owner::Owner;
use super::rotated::{self, Job};
use super::stamp::{self, Local};
use crate::config::{App, Interval, LogFiles, Which};

/// How long a file that could not be opened waits before another try.
const RETRY: Duration = Duration::from_secs(1);

/// What became of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// No file is configured for its stream: the journal's.
    NotMine,
    /// In every file it goes to.
    Written,
    /// A file could not take it: the journal gets it too.
    Failed,
}

/// One open log file.
struct Open {
    out: Option<BufWriter<File>>,
    /// Bytes in it (as far as this writer knows).
    size: u64,
    /// A regular file (`/dev/null`, a FIFO or a terminal is never rotated).
    regular: bool,
    /// The period its first line is from (`log_rotate_interval`).
    period: Option<i64>,
    /// When to try again after a failure, and whether that was said.
    broken: Option<Instant>,
    said: bool,
}

/// The files of one configuration, by path.
pub struct Files {
    config: LogFiles,
    owner: Owner,
    open: HashMap<PathBuf, Open>,
    tidy: Option<rotated::Tidier>,
}

impl Files {
    pub fn new(config: LogFiles, owner: Owner) -> Files {
        let tidy = if config.rotates() {
            rotated::start(owner.clone())
        } else {
            None
        };
        Files {
            config,
            owner,
            open: HashMap::new(),
            tidy,
        }
    }

    /// The same configuration and owner: nothing to do on a reload.
    pub fn same(&self, config: &LogFiles, owner: &Owner) -> bool {
        self.config == *config && self.owner == *owner
    }

    /// Write one line of slot `index` to the files of its stream.
    pub fn line(&mut self, index: u32, stream: Stream, line: &str) -> Routed {
        let own = match stream {
            Stream::Stdout => Which::Out,
            Stream::Stderr => Which::Error,
        };
        let a = self.config.path(own, index);
        let b = self
            .config
            .path(Which::Combined, index)
            .filter(|p| Some(p) != a.as_ref());
        if a.is_none() && b.is_none() {
            return Routed::NotMine;
        }
        let mut text = String::with_capacity(line.len() + 32);
        if let Some(f) = &self.config.date_format {
            text.push_str(&stamp::format(f, &Local::now()));
            text.push_str(": ");
        }
        text.push_str(line);
        text.push('\n');
        let mut routed = Routed::Written;
        for path in [a, b].into_iter().flatten() {
            if self.write(&path, text.as_bytes()).is_err() {
                routed = Routed::Failed;
            }
        }
        routed
    }

    fn write(&mut self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let now = Instant::now();
        if !self.open.contains_key(path) {
            let opened = self.open_file(path);
            self.open.insert(path.to_path_buf(), opened);
        }
        let Files {
            open,
            config,
            owner,
            tidy,
        } = self;
        let f = open.get_mut(path).expect("inserted above");
        if f.out.is_none() {
            if f.broken.is_some_and(|at| now < at) {
                return Err(io::ErrorKind::NotConnected.into());
            }
            *f = reopened(owner, path, f.said, config.interval);
            if f.out.is_none() {
                return Err(io::ErrorKind::NotConnected.into());
            }
        }
        if f.regular && f.size > 0 && due(config, f, bytes.len() as u64) {
            rotate(owner, config, tidy.as_ref(), path, f);
        }
        let Some(out) = f.out.as_mut() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        match out.write_all(bytes) {
            Ok(()) => {
                if f.size == 0
                    && let Some(every) = config.interval
                {
                    f.period = Some(Local::now().period(every));
                }
                f.size += bytes.len() as u64;
                if f.said {
                    f.said = false;
                    super::info(&format!("log file {}: written again", path.display()));
                }
                Ok(())
            }
            Err(e) => {
                fail(f, path, &e);
                Err(e)
            }
        }
    }

    fn open_file(&self, path: &Path) -> Open {
        reopened(&self.owner, path, false, self.config.interval)
    }

    /// Push what is buffered to the files.
    pub fn flush(&mut self) {
        for (path, f) in self.open.iter_mut() {
            if let Some(out) = f.out.as_mut()
                && let Err(e) = out.flush()
            {
                fail(f, path, &e);
            }
        }
    }

    /// Rotate the files whose period is over, lines or not.
    pub fn tick(&mut self) {
        if self.config.interval.is_none() {
            return;
        }
        let Files {
            open,
            config,
            owner,
            tidy,
        } = self;
        for (path, f) in open.iter_mut() {
            if f.out.is_some() && f.regular && f.size > 0 && due(config, f, 0) {
                rotate(owner, config, tidy.as_ref(), path, f);
            }
        }
    }

    /// Close every file and open its path again (after an outside
    /// logrotate renamed them). Returns how many are open.
    pub fn reopen(&mut self) -> Result<usize, String> {
        self.flush();
        let paths: Vec<PathBuf> = self.open.keys().cloned().collect();
        let mut failed = Vec::new();
        for path in paths {
            let said = self.open.get(&path).is_some_and(|f| f.said);
            self.open.remove(&path);
            let f = reopened(&self.owner, &path, said, self.config.interval);
            if f.out.is_none() {
                failed.push(path.display().to_string());
            }
            self.open.insert(path, f);
        }
        if failed.is_empty() {
            Ok(self.open.len())
        } else {
            Err(format!(
                "cannot open {} (their lines go to the journal meanwhile)",
                failed.join(", ")
            ))
        }
    }
}

/// Is it time to rotate `f` before `more` bytes?
fn due(config: &LogFiles, f: &Open, more: u64) -> bool {
    let full = config.max_size.is_some_and(|max| f.size + more > max);
    let old = match (config.interval, f.period) {
        (Some(every), Some(p)) => Local::now().period(every) != p,
        _ => false,
    };
    full || old
}

/// Rename `path` out of the way and open a new file in its place; the
/// lines written so far stay in the renamed one. If the rename fails, the
/// file goes on growing and the journal says why.
fn rotate(
    owner: &Owner,
    config: &LogFiles,
    tidy: Option<&rotated::Tidier>,
    path: &Path,
    f: &mut Open,
) {
    if let Some(out) = f.out.as_mut()
        && let Err(e) = out.flush()
    {
        fail(f, path, &e);
        return;
    }
    let date = Local::now().file_date();
    let from = path.to_path_buf();
    let renamed = owner.run(move || {
        let to = rotated::free_name(&from, &date);
        std::fs::rename(&from, &to)?;
        Ok(to)
    });
    match renamed {
        Ok(_) => {
            *f = reopened(owner, path, f.said, config.interval);
            if let Some(t) = tidy {
                t.ask(Job {
                    path: path.to_path_buf(),
                    compress: config.compress,
                    retain: config.retain,
                });
            }
        }
        Err(e) => {
            // Try again after a while rather than at every line.
            f.period = config.interval.map(|every| Local::now().period(every));
            f.size = 0;
            super::warn(&format!(
                "log file {}: cannot rotate it ({e}); it goes on growing",
                path.display()
            ));
        }
    }
}

fn fail(f: &mut Open, path: &Path, e: &io::Error) {
    f.out = None;
    f.broken = Some(Instant::now() + RETRY);
    if !f.said {
        f.said = true;
        super::warn(&format!(
            "log file {}: {e}; its lines go to the journal until it can be written",
            path.display()
        ));
    }
}

/// `path`, opened (and made) anew for appending. A file already holding
/// lines is from the period it was last written in.
fn reopened(owner: &Owner, path: &Path, said: bool, every: Option<Interval>) -> Open {
    let p = path.to_path_buf();
    match owner.run(move || open(&p)) {
        Ok((file, regular, size, modified)) => Open {
            out: Some(BufWriter::with_capacity(64 * 1024, file)),
            size,
            regular,
            period: every
                .zip(modified)
                .filter(|_| size > 0)
                .map(|(every, secs)| Local::at(secs, 0).period(every)),
            broken: None,
            said,
        },
        Err(e) => {
            let mut f = Open {
                out: None,
                size: 0,
                regular: false,
                period: None,
                broken: None,
                said,
            };
            fail(&mut f, path, &e);
            f
        }
    }
}

/// Open `path` for appending, making it (mode 0640) and its directory
/// (0750) if they are not there, as PM2 makes a missing log directory.
/// A FIFO without a reader is an error rather than a wait. Returns the
/// file, whether it is a regular file, its size, and when it was last
/// modified (seconds since the epoch).
fn open(path: &Path) -> io::Result<(File, bool, u64, Option<i64>)> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = OFlag::from_bits_truncate(fcntl(&file, FcntlArg::F_GETFL)?);
        fcntl(&file, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
    }
    let meta = file.metadata()?;
    let regular = meta.file_type().is_file();
    Ok((
        file,
        regular,
        if regular { meta.len() } else { 0 },
        Some(meta.mtime()),
    ))
}

/// Check that every file `app` would write can be opened now (made if
/// missing), with the rights they will be written with: the key and why
/// not, for a start or a reload to refuse.
pub fn check(app: &App) -> Result<(), (&'static str, String)> {
    let owner = Owner::of(app.credentials.as_ref());
    let keys = [
        (Which::Out, "out_file"),
        (Which::Error, "error_file"),
        (Which::Combined, "log_file"),
    ];
    for (which, key) in keys {
        let slots = if app.logs.merge {
            1
        } else {
            app.instances.max(1)
        };
        for index in 0..slots {
            let Some(path) = app.logs.path(which, index) else {
                continue;
            };
            let p = path.clone();
            owner.run(move || open(&p).map(drop)).map_err(|e| {
                (
                    key,
                    format!(
                        "cannot open {} for writing as {}: {e}",
                        path.display(),
                        owner.describe()
                    ),
                )
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nodeherd-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn names(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_file_last_written_in_an_earlier_period_is_rotated_before_the_next_line() {
        let d = dir("interval");
        let path = d.join("out.log");
        std::fs::write(&path, "yesterday\n").unwrap();
        let two_days_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 86_400);
        File::options()
            .append(true)
            .open(&path)
            .unwrap()
            .set_modified(two_days_ago)
            .unwrap();
        let config = LogFiles {
            out: Some(path.clone()),
            merge: true,
            interval: Some(Interval::Daily),
            retain: 5,
            ..LogFiles::default()
        };
        let mut files = Files::new(config, Owner::default());
        assert_eq!(files.line(0, Stream::Stdout, "today"), Routed::Written);
        assert_eq!(
            files.line(0, Stream::Stdout, "still today"),
            Routed::Written
        );
        assert_eq!(files.line(0, Stream::Stderr, "not mine"), Routed::NotMine);
        files.flush();
        let list = names(&d);
        assert_eq!(list.len(), 2, "{list:?}");
        assert!(
            list[1].starts_with("out__") && list[1].ends_with(".log"),
            "{list:?}"
        );
        assert_eq!(
            std::fs::read_to_string(d.join(&list[1])).unwrap(),
            "yesterday\n"
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "today\nstill today\n"
        );
        drop(files);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_is_rotated_before_a_line_would_take_it_past_the_size() {
        let d = dir("size");
        let path = d.join("app.log");
        let config = LogFiles {
            combined: Some(path.clone()),
            merge: true,
            max_size: Some(1024),
            retain: 100,
            ..LogFiles::default()
        };
        let mut files = Files::new(config, Owner::default());
        let line = "y".repeat(99); // 100 bytes with its newline
        for _ in 0..25 {
            assert_eq!(files.line(3, Stream::Stderr, &line), Routed::Written);
        }
        files.flush();
        let mut total = 0;
        for n in names(&d) {
            let text = std::fs::read_to_string(d.join(&n)).unwrap();
            assert!(text.len() <= 1024, "{n}: {}", text.len());
            assert!(text.lines().all(|l| l == line), "{n}: a cut line");
            total += text.lines().count();
        }
        assert_eq!(total, 25);
        assert_eq!(names(&d).len(), 3, "10 + 10 + 5 lines");
        drop(files);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
