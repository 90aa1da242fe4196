//! Rotated log files: their names, and what happens to them after the
//! rotation (gzip, then keep the newest `log_retain`).
//!
//! A file `out-0.log` rotates to `out-0__2024-03-07_14-05-09.log`, as
//! pm2-logrotate names them (a second rotation in the same second gets
//! `_1`, `_2`, …), then `….log.gz` once compressed. A rotation is one
//! rename: the lines written so far stay in the file that was renamed,
//! whole, and no other file is renamed after it (no `.1` → `.2` cascade
//! to race with). Compressing and removing old files take time, so a
//! thread of their own does them, one file at a time, never the writer.

use std::io;
use std::path::{Path, PathBuf};

use super::owner::Owner;

/// The parts of a log file's name rotated names are made of:
/// `dir/out-0.log` → (`dir`, `out-0`, `.log`).
pub fn parts(path: &Path) -> (PathBuf, String, String) {
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (stem, ext) = match name.rfind('.').filter(|&i| i > 0) {
        Some(i) => (name[..i].to_string(), name[i..].to_string()),
        None => (name, String::new()),
    };
    (dir, stem, ext)
}

/// The name `path` rotates to at `date` (`YYYY-MM-DD_HH-mm-ss`), the
/// `n`th of that second.
pub fn name(path: &Path, date: &str, n: u32) -> PathBuf {
    let (dir, stem, ext) = parts(path);
    let n = if n == 0 {
        String::new()
    } else {
        format!("_{n}")
    };
    dir.join(format!("{stem}__{date}{n}{ext}"))
}

/// A free name for `path`'s rotation at `date`: neither it nor its
/// compressed form is there.
pub fn free_name(path: &Path, date: &str) -> PathBuf {
    let mut n = 0;
    loop {
        let p = name(path, date, n);
        let gz = gz_of(&p);
        if std::fs::symlink_metadata(&p).is_err() && std::fs::symlink_metadata(&gz).is_err() {
            return p;
        }
        n += 1;
    }
}

fn gz_of(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".gz");
    PathBuf::from(s)
}

/// Where a rotated file stands among its siblings: its date, then its
/// number in that second.
type Rank = (String, u32);

/// If `file_name` is a rotation of (`stem`, `ext`): its rank, and whether
/// it is compressed.
fn rank(file_name: &str, stem: &str, ext: &str) -> Option<(Rank, bool)> {
    let rest = file_name.strip_prefix(stem)?.strip_prefix("__")?;
    let (rest, gz) = match rest.strip_suffix(".gz") {
        Some(r) => (r, true),
        None => (rest, false),
    };
    let rest = rest.strip_suffix(ext)?;
    let (date, n) = rest.split_at_checked(19)?;
    let shape = date.bytes().enumerate().all(|(i, b)| match i {
        4 | 7 => b == b'-',
        10 => b == b'_',
        13 | 16 => b == b'-',
        _ => b.is_ascii_digit(),
    });
    if !shape {
        return None;
    }
    let n = match n {
        "" => 0,
        n => n.strip_prefix('_')?.parse().ok()?,
    };
    Some(((date.to_string(), n), gz))
}

/// Every rotation of `path` in its directory, oldest first: (rank, path, compressed).
fn siblings(path: &Path) -> io::Result<Vec<(Rank, PathBuf, bool)>> {
    let (dir, stem, ext) = parts(path);
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((r, gz)) = rank(name, &stem, &ext)
            && entry.file_type().is_ok_and(|t| t.is_file())
        {
            found.push((r, dir.join(name), gz));
        }
    }
    found.sort();
    Ok(found)
}

/// What to do after a rotation of `path`.
#[derive(Debug, Clone)]
pub struct Job {
    pub path: PathBuf,
    pub compress: bool,
    pub retain: u32,
}

/// Compress what is not yet, then remove all but the newest `retain`.
/// Returns what went wrong, if anything, for the journal.
pub fn tidy(job: &Job) -> Result<(), String> {
    let shown = job.path.display();
    let list = siblings(&job.path).map_err(|e| format!("listing the rotations of {shown}: {e}"))?;
    let mut errors = Vec::new();
    if job.compress {
        for (_, p, gz) in &list {
            if !gz && let Err(e) = compress(p) {
                errors.push(format!("compressing {}: {e}", p.display()));
            }
        }
    }
    let list = siblings(&job.path).map_err(|e| format!("listing the rotations of {shown}: {e}"))?;
    // A file and its compressed form (for a moment both are there) count once.
    let mut ranks: Vec<&Rank> = list.iter().map(|(r, _, _)| r).collect();
    ranks.dedup();
    let keep_from = ranks.len().saturating_sub(job.retain as usize);
    let oldest_kept = ranks.get(keep_from).map(|r| (*r).clone());
    for (r, p, _) in &list {
        if oldest_kept.as_ref().is_none_or(|k| r < k)
            && let Err(e) = std::fs::remove_file(p)
            && e.kind() != io::ErrorKind::NotFound
        {
            errors.push(format!("removing {}: {e}", p.display()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// `p` → `p.gz`: written beside it under a temporary name, synced, renamed
/// into place, and only then is `p` removed, so a crash at any point
/// leaves every line in one of the two.
fn compress(p: &Path) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let gz = gz_of(p);
    let mut tmp = gz.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut from = std::fs::File::open(p)?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    let done = (|| {
        let mut enc = flate2::write::GzEncoder::new(
            std::io::BufWriter::new(to),
            flate2::Compression::default(),
        );
        std::io::copy(&mut from, &mut enc)?;
        let mut out = enc.finish()?;
        out.flush()?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &gz)
    })();
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::remove_file(p)
}

/// What waits to be tidied: at most one job per log file (a newer one
/// for the same file replaces it, since a tidy looks at all of that
/// file's rotations), so nothing is ever dropped and the queue is bounded
/// by the number of files, however fast they rotate.
#[derive(Default)]
struct Pending {
    jobs: std::collections::BTreeMap<PathBuf, Job>,
    closed: bool,
}

impl Pending {
    fn ask(&mut self, job: Job) {
        self.jobs.insert(job.path.clone(), job);
    }

    fn take(&mut self) -> Vec<Job> {
        std::mem::take(&mut self.jobs).into_values().collect()
    }
}

type Shared = std::sync::Arc<(std::sync::Mutex<Pending>, std::sync::Condvar)>;

/// The handle the writer asks the tidying thread through; dropping it
/// ends the thread once what is pending is done.
pub struct Tidier(Shared);

impl Tidier {
    /// Tidy after a rotation of `job.path`; never blocks on the tidying.
    pub fn ask(&self, job: Job) {
        let (lock, wake) = &*self.0;
        if let Ok(mut p) = lock.lock() {
            p.ask(job);
            wake.notify_one();
        }
    }
}

impl Drop for Tidier {
    fn drop(&mut self) {
        let (lock, wake) = &*self.0;
        if let Ok(mut p) = lock.lock() {
            p.closed = true;
            wake.notify_one();
        }
    }
}

/// The thread that tidies after rotations, with the rights of whoever
/// owns the files.
pub fn start(owner: Owner) -> Option<Tidier> {
    let shared: Shared = Default::default();
    let theirs = shared.clone();
    owner
        .spawn_thread(move || {
            let (lock, wake) = &*theirs;
            loop {
                let jobs = {
                    let Ok(mut p) = lock.lock() else { return };
                    while p.jobs.is_empty() && !p.closed {
                        p = match wake.wait(p) {
                            Ok(p) => p,
                            Err(_) => return,
                        };
                    }
                    if p.jobs.is_empty() {
                        return;
                    }
                    p.take()
                };
                for job in jobs {
                    if let Err(e) = tidy(&job) {
                        super::warn(&format!("log rotation: {e}"));
                    }
                }
            }
        })
        .ok()?;
    Some(Tidier(shared))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names_are_pm2_logrotates_and_rank_in_order() {
        let p = Path::new("/var/log/api/out-0.log");
        assert_eq!(
            name(p, "2024-03-07_14-05-09", 0),
            PathBuf::from("/var/log/api/out-0__2024-03-07_14-05-09.log")
        );
        assert_eq!(
            name(Path::new("/l/err"), "2024-03-07_14-05-09", 2),
            PathBuf::from("/l/err__2024-03-07_14-05-09_2")
        );
        let r = |n: &str| rank(n, "out-0", ".log");
        assert_eq!(
            r("out-0__2024-03-07_14-05-09_12.log.gz"),
            Some((("2024-03-07_14-05-09".into(), 12), true))
        );
        assert!(
            r("out-0__2024-03-07_14-05-09_2.log").unwrap().0
                < r("out-0__2024-03-07_14-05-09_10.log").unwrap().0
        );
        for other in [
            "out-0.log",
            "out-1__2024-03-07_14-05-09.log",
            "out-0__2024-03-07_14-05.log",
            "out-0__2024-03-07_14-05-09x.log",
            "out-0__2024-03-07_14-05-09.log.gz.tmp",
        ] {
            assert_eq!(r(other), None, "{other}");
        }
    }

    #[test]
    fn tidying_compresses_and_keeps_the_newest() {
        use std::io::Read;
        let dir = std::env::temp_dir().join(format!("nodeherd-rotated-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.log");
        for s in 0..5 {
            let date = format!("2024-03-07_14-05-0{s}");
            std::fs::write(name(&path, &date, 0), format!("line {s}\n")).unwrap();
        }
        std::fs::write(dir.join("out-1__2024-03-07_14-05-00.log"), "other\n").unwrap();
        tidy(&Job {
            path: path.clone(),
            compress: true,
            retain: 3,
        })
        .unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "out-1__2024-03-07_14-05-00.log",
                "out__2024-03-07_14-05-02.log.gz",
                "out__2024-03-07_14-05-03.log.gz",
                "out__2024-03-07_14-05-04.log.gz"
            ]
        );
        let mut text = String::new();
        flate2::read::GzDecoder::new(
            std::fs::File::open(dir.join("out__2024-03-07_14-05-04.log.gz")).unwrap(),
        )
        .read_to_string(&mut text)
        .unwrap();
        assert_eq!(text, "line 4\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_file_waiting_to_be_tidied_is_forgotten_however_many_rotate_at_once() {
        let job = |n: usize| Job {
            path: PathBuf::from(format!("/l/out-{n}.log")),
            compress: true,
            retain: 3,
        };
        let mut p = Pending::default();
        // Eight workers' out and err files rotating faster than the
        // thread tidies: each file is tidied, once.
        for round in 0..5 {
            for n in 0..16 {
                p.ask(Job {
                    retain: round,
                    ..job(n)
                });
            }
        }
        let jobs = p.take();
        assert_eq!(jobs.len(), 16);
        assert!(jobs.iter().all(|j| j.retain == 4), "the newest job wins");
        assert!(p.take().is_empty());
    }
}
