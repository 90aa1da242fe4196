//! A worker's JavaScript stack, taken when it is replaced (hung, or over
//! `max_memory_restart` with `autopsy_on_memory`), so that every hang
//! leaves evidence of where the event loop was stuck.
//!
//! A stuck event loop reads no IPC channel, so the ask goes elsewhere: each
//! Node worker gets a second socketpair at fd `NODEHERD_HELPER_FD`, read by
//! a `worker_threads` thread the preload starts at once. That thread holds an
//! inspector session on the main thread; asked, it pauses it
//! (`Debugger.pause` runs as a V8 interrupt, even inside `while (true)`),
//! writes the call frames back as one JSON line, and resumes it.
//!
//! What comes back is the word of an untrusted process: read up to
//! [`MAX_ANSWER`] bytes, [`MAX_FRAMES`] frames, every text cleaned of
//! control characters and cut, attributed only to the worker whose channel
//! it came on, and written only through a directory fd opened without
//! following symlinks (the state directory may belong to the app's user).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::control::Taken;

/// The most of an answer the manager reads.
pub const MAX_ANSWER: usize = 64 * 1024;
/// The most frames kept.
pub const MAX_FRAMES: usize = 64;
/// The most characters of a function name or a url.
const MAX_TEXT: usize = 256;
/// Stack files kept in the directory; older ones are removed.
pub const KEEP: usize = 20;
/// The directory under the state directory where diagnostics go.
pub const DIR: &str = "nodeherd-diagnostics";

/// One of the helper's channels, shared by the asks made on it (one at a
/// time: the mutex), and its fd (a re-exec hands it over).
#[derive(Clone)]
pub struct Helper {
    fd: std::os::fd::RawFd,
    chan: std::sync::Arc<tokio::sync::Mutex<Channel>>,
}

impl Helper {
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.fd
    }
}

/// Our end of a worker's helper channel, with the next ask's number.
pub struct Channel {
    reader: tokio::io::BufReader<tokio::net::UnixStream>,
    next: u64,
}

/// Take our end of a worker's helper channel (inside the runtime).
pub fn helper(ours: std::os::unix::net::UnixStream) -> Option<Helper> {
    use std::os::fd::AsRawFd;
    ours.set_nonblocking(true).ok()?;
    let fd = ours.as_raw_fd();
    let stream = tokio::net::UnixStream::from_std(ours).ok()?;
    Some(Helper {
        fd,
        chan: std::sync::Arc::new(tokio::sync::Mutex::new(Channel {
            reader: tokio::io::BufReader::new(stream),
            next: 1,
        })),
    })
}

/// One line of a stack: a frame, or where an async stack begins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Frame {
        function: String,
        url: String,
        line: u64,
        column: u64,
    },
    /// An async boundary (`await`, `setTimeout`...), as V8 describes it.
    Async(String),
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Part::Frame {
                function,
                url,
                line,
                column,
            } => write!(f, "at {function} ({url}:{line}:{column})"),
            Part::Async(what) => write!(f, "-- async {what} --"),
        }
    }
}

/// Ask the helper on `helper` for the stack and wait for the answer to
/// this ask (a late answer to an earlier one that timed out is skipped).
/// No deadline here: the caller bounds it.
pub async fn ask_stack(helper: &Helper) -> Result<Vec<Part>> {
    let mut ch = helper.chan.lock().await;
    let id = ch.next;
    ch.next += 1;
    let ask = format!("{{\"ask\":\"stack\",\"id\":{id}}}\n");
    ch.reader
        .get_mut()
        .write_all(ask.as_bytes())
        .await
        .context("writing to the helper's channel")?;
    let mut line = Vec::new();
    loop {
        next_line(&mut ch.reader, MAX_ANSWER, "the helper's answer", &mut line).await?;
        let (got, parts) = parse(&line)?;
        if got == id {
            return Ok(parts);
        }
    }
}

/// An answer line: `{"id":N,"frames":[{"f","u","l","c"} | {"async"}]}`.
pub fn parse(line: &[u8]) -> Result<(u64, Vec<Part>)> {
    let v: serde_json::Value =
        serde_json::from_slice(line).context("the helper's answer is not JSON")?;
    let id = v["id"].as_u64().context("the helper's answer has no id")?;
    if let Some(e) = v["error"].as_str() {
        bail!("the helper could not take the stack: {}", clean(e));
    }
    let frames = v["frames"]
        .as_array()
        .context("the helper's answer has no frames")?;
    let parts = frames
        .iter()
        .take(MAX_FRAMES)
        .filter_map(|f| {
            if let Some(what) = f["async"].as_str() {
                return Some(Part::Async(clean(what)));
            }
            Some(Part::Frame {
                function: match f["f"].as_str() {
                    Some("") | None => "(anonymous)".into(),
                    Some(name) => clean(name),
                },
                // A module's url is `file:///path`: shown as the path, as
                // Node's own stack traces show CommonJS files.
                url: clean(
                    f["u"]
                        .as_str()
                        .map_or("?", |u| u.strip_prefix("file://").unwrap_or(u)),
                ),
                line: f["l"].as_u64()?,
                column: f["c"].as_u64()?,
            })
        })
        .collect();
    Ok((id, parts))
}

fn clean(s: &str) -> String {
    crate::logs::clean(s, MAX_TEXT)
}

/// The stack as one line for a journal message: the first frames.
pub fn summary(parts: &[Part]) -> String {
    let mut s: Vec<String> = parts.iter().take(8).map(Part::to_string).collect();
    if parts.len() > 8 {
        s.push(format!("… {} more", parts.len() - 8));
    }
    if s.is_empty() {
        return "(no JavaScript frame)".into();
    }
    s.join(" < ")
}

/// Where diagnostics of this manager go: `DIR` under the first of
/// systemd's `$STATE_DIRECTORY`, else under the manager's private runtime
/// directory (lost at reboot; set `StateDirectory=` to keep them).
pub fn base_dir(runtime_dir: &Path) -> PathBuf {
    crate::rundir::state_dir()
        .unwrap_or_else(|| runtime_dir.to_path_buf())
        .join(DIR)
}

/// Milliseconds since the epoch, now.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// Open (creating it) `dir`, never through a symlink, owned by `owner`
/// when it is created.
fn open_dir(dir: &Path, owner: Option<(u32, u32)>) -> Result<OwnedFd> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    match nix::fcntl::open(dir, flags, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(nix::errno::Errno::ENOENT) => {
            nix::unistd::mkdir(dir, Mode::from_bits_truncate(0o750))
                .with_context(|| format!("creating {}", dir.display()))?;
            let fd = nix::fcntl::open(dir, flags, Mode::empty())
                .with_context(|| format!("opening {}", dir.display()))?;
            if let Some((uid, gid)) = owner {
                nix::unistd::fchown(&fd, Some(uid.into()), Some(gid.into()))
                    .with_context(|| format!("giving {} to uid {uid}", dir.display()))?;
            }
            Ok(fd)
        }
        Err(e) => Err(e).with_context(|| {
            format!(
                "opening {} (a symlink there is refused: diagnostics are written only into a real directory)",
                dir.display()
            )
        }),
    }
}

/// Write `text` as a new file `name` in `dir` (owned by `owner`, 0640),
/// then remove the oldest files starting with `prefix` beyond [`KEEP`].
/// Blocking: call it off the supervisor's thread.
pub fn keep(
    dir: &Path,
    name: &str,
    prefix: &str,
    text: &[u8],
    owner: Option<(u32, u32)>,
) -> Result<PathBuf> {
    let (dirfd, mut file, path) = create(dir, name, owner)?;
    std::io::Write::write_all(&mut file, text)
        .with_context(|| format!("writing {}", path.display()))?;
    prune(&dirfd, prefix, KEEP);
    Ok(path)
}

/// A new file `name` in `dir` (owned by `owner`, 0640), with the
/// directory's fd for [`prune`].
fn create(
    dir: &Path,
    name: &str,
    owner: Option<(u32, u32)>,
) -> Result<(OwnedFd, std::fs::File, PathBuf)> {
    let dirfd = open_dir(dir, owner)?;
    let path = dir.join(name);
    let fd = nix::fcntl::openat(
        dirfd.as_fd(),
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o640),
    )
    .with_context(|| format!("creating {}", path.display()))?;
    if let Some((uid, gid)) = owner {
        nix::unistd::fchown(&fd, Some(uid.into()), Some(gid.into()))
            .with_context(|| format!("giving {} to uid {uid}", path.display()))?;
    }
    Ok((dirfd, std::fs::File::from(fd), path))
}

/// Remove the oldest `prefix*` files beyond `keep` (names sort by time).
fn prune(dirfd: &OwnedFd, prefix: &str, keep: usize) {
    use std::os::fd::AsRawFd;
    // The directory the fd holds, whatever its path has become since.
    let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", dirfd.as_raw_fd())) else {
        return;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    let extra = names.len().saturating_sub(keep);
    for n in &names[..extra] {
        let _ = nix::unistd::unlinkat(
            dirfd.as_fd(),
            n.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
}

/// The longest line of a capture the manager reads (a chunk, JSON-quoted).
const MAX_CHUNK_LINE: usize = 16 << 20;
/// The most a capture may write.
pub const MAX_CAPTURE: u64 = 16 << 30;
/// Heap snapshots kept (they are large); other captures keep [`KEEP`].
const KEEP_SNAPSHOTS: usize = 3;

/// Where a capture goes.
pub struct Target {
    pub dir: PathBuf,
    pub owner: Option<(u32, u32)>,
    pub index: u32,
    pub pid: i32,
}

/// Take `capture` of the worker on `helper` (its preload first takes it
/// out of rotation and lets it finish what it holds), streamed into a new
/// file under `target.dir`; the file's path, or why not (the file removed),
/// within `within`.
pub async fn capture(
    helper: Option<Helper>,
    capture: crate::control::Capture,
    target: Target,
    within: Duration,
) -> std::result::Result<String, String> {
    use crate::control::Capture;
    let helper = helper.ok_or(
        "the worker has no helper channel (not a Node worker, or started by a version without one)",
    )?;
    let (ext, seconds) = match capture {
        Capture::HeapSnapshot => ("heapsnapshot", 0),
        Capture::CpuProfile(s) => ("cpuprofile", s),
        Capture::Stack => ("json", 0),
    };
    let word = capture.word();
    let name = format!("{word}-{}-{}-{}.{ext}", unix_ms(), target.index, target.pid);
    let (dir, owner) = (target.dir.clone(), target.owner);
    let made = tokio::task::spawn_blocking(move || create(&dir, &name, owner))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{e:#}"))?;
    let (dirfd, file, path) = made;
    let mut file = tokio::fs::File::from_std(file);
    let streamed =
        match tokio::time::timeout(within, stream(&helper, word, seconds, &mut file)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("not done within {} s", within.as_secs())),
        };
    let flushed = file.flush().await.and(file.sync_all().await);
    drop(file);
    let result = match (streamed, flushed) {
        (Ok(()), Ok(())) => Ok(path.display().to_string()),
        (Err(e), _) => Err(format!("{e:#}")),
        (_, Err(e)) => Err(format!("writing {}: {e}", path.display())),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    let keep = if capture == Capture::HeapSnapshot {
        KEEP_SNAPSHOTS
    } else {
        KEEP
    };
    prune(&dirfd, &format!("{word}-"), keep);
    result
}

/// Ask for the capture and copy its chunks into `file` until its end.
async fn stream(
    helper: &Helper,
    word: &str,
    seconds: u32,
    file: &mut tokio::fs::File,
) -> Result<()> {
    let mut ch = helper.chan.lock().await;
    let id = ch.next;
    ch.next += 1;
    let ask =
        format!("{{\"ask\":\"diagnose\",\"id\":{id},\"what\":\"{word}\",\"seconds\":{seconds}}}\n");
    ch.reader
        .get_mut()
        .write_all(ask.as_bytes())
        .await
        .context("writing to the helper's channel")?;
    let mut written: u64 = 0;
    let mut line = Vec::new();
    loop {
        next_line(
            &mut ch.reader,
            MAX_CHUNK_LINE,
            "a line of the capture",
            &mut line,
        )
        .await?;
        let v: serde_json::Value =
            serde_json::from_slice(&line).context("a line of the capture is not JSON")?;
        if v["id"].as_u64() != Some(id) {
            continue;
        }
        if let Some(e) = v["error"].as_str() {
            bail!("the worker could not be captured: {}", clean(e));
        }
        if v["end"].as_bool() == Some(true) {
            return Ok(());
        }
        let chunk = v["chunk"]
            .as_str()
            .context("a line of the capture has no chunk")?;
        written += chunk.len() as u64;
        if written > MAX_CAPTURE {
            bail!("the capture is larger than {} GiB", MAX_CAPTURE >> 30);
        }
        file.write_all(chunk.as_bytes())
            .await
            .context("writing the capture")?;
    }
}

/// What the driver asks for.
pub struct Ask {
    pub app: String,
    pub index: u32,
    pub pid: i32,
    /// Hung (else: over `max_memory_restart`).
    pub hang: bool,
    /// Give up after this long (the worker's `kill_timeout`).
    pub within: Duration,
    pub dir: PathBuf,
    /// The app's user and group, who own the file.
    pub owner: Option<(u32, u32)>,
}

/// The next line of the helper's channel into `line`, newline included:
/// at most `limit` bytes (`what` names it in the error), since a worker's
/// answer is untrusted and is never read whole into memory past that.
async fn next_line(
    reader: &mut tokio::io::BufReader<tokio::net::UnixStream>,
    limit: usize,
    what: &str,
    line: &mut Vec<u8>,
) -> Result<()> {
    line.clear();
    let n = reader
        .take(limit as u64)
        .read_until(b'\n', line)
        .await
        .context("reading the helper's channel")?;
    if n == 0 {
        bail!("the helper's channel closed (the worker disabled it, or is gone)");
    }
    if line.last() != Some(&b'\n') {
        bail!("{what} is longer than {limit} bytes: dropped");
    }
    Ok(())
}

/// Take the stack of the worker on `helper`, log it as one journal entry
/// (`NODEHERD_EVENT=hang-stack` or `memory-stack`) and keep it as a file;
/// or say why not. Never longer than `ask.within`, the file included.
pub async fn take(helper: Option<Helper>, ask: Ask) -> Option<Taken> {
    use crate::logs::{Milestone, worker_event};
    use libsystemd::logging::Priority;
    let Ask {
        index, pid, hang, ..
    } = ask;
    let began = tokio::time::Instant::now();
    let answer = match helper {
        None => Err(anyhow::anyhow!(
            "it has no helper channel (not a Node worker, or started by a version without one)"
        )),
        Some(h) => match tokio::time::timeout(ask.within, ask_stack(&h)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!(
                "no answer within {} ms (kill_timeout): its inspector is stuck in native code or disabled",
                ask.within.as_millis()
            )),
        },
    };
    let parts = match answer {
        Ok(p) => p,
        Err(e) => {
            worker_event(
                Priority::Warning,
                index,
                pid,
                &format!("worker {index} (pid {pid}): no JavaScript stack taken: {e:#}"),
                &[Milestone::StackMissed.field()],
            );
            return None;
        }
    };
    let at_ms = unix_ms();
    let (kind, event) = if hang {
        ("hang", Milestone::HangStack)
    } else {
        ("memory", Milestone::MemoryStack)
    };
    let lines: Vec<String> = parts.iter().map(Part::to_string).collect();
    let mut text = format!(
        "# nodeherd {kind} stack: app {} worker {index} pid {pid}, at {at_ms} ms since the epoch\n",
        crate::logs::clean(&ask.app, MAX_TEXT)
    );
    for l in &lines {
        text.push_str(l);
        text.push('\n');
    }
    let name = format!("{kind}-stack-{at_ms}-{index}-{pid}.txt");
    let (dir, owner) = (ask.dir.clone(), ask.owner);
    let left = ask.within.saturating_sub(began.elapsed());
    let write = tokio::task::spawn_blocking(move || {
        keep(
            &dir,
            &name,
            &format!("{kind}-stack-"),
            text.as_bytes(),
            owner,
        )
    });
    let kept = match tokio::time::timeout(left, write).await {
        Ok(Ok(Ok(path))) => Ok(path),
        Ok(Ok(Err(e))) => Err(format!("{e:#}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the file system did not answer in time".into()),
    };
    let place = match &kept {
        Ok(p) => format!("kept in {}", p.display()),
        Err(e) => format!("not kept: {e}"),
    };
    let mut fields = vec![event.field(), ("NODEHERD_STACK", lines.join("\n"))];
    if let Ok(p) = &kept {
        fields.push(("NODEHERD_STACK_FILE", p.display().to_string()));
    }
    worker_event(
        Priority::Warning,
        index,
        pid,
        &format!(
            "worker {index} (pid {pid}) {kind} stack: {}; {place}",
            summary(&parts)
        ),
        &fields,
    );
    kept.ok().map(|path| Taken { at_ms, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_bounded_and_cleaned() {
        let line = br#"{"id":3,"frames":[{"f":"spin\nNODEHERD_EVENT=forged","u":"/srv/app.js","l":4,"c":11},{"async":"await"},{"f":"","u":"/srv/a.js","l":1,"c":1},{"f":"x"}]}"#;
        let (id, parts) = parse(line).unwrap();
        assert_eq!(id, 3);
        assert_eq!(
            parts,
            vec![
                Part::Frame {
                    function: "spin NODEHERD_EVENT=forged".into(),
                    url: "/srv/app.js".into(),
                    line: 4,
                    column: 11
                },
                Part::Async("await".into()),
                Part::Frame {
                    function: "(anonymous)".into(),
                    url: "/srv/a.js".into(),
                    line: 1,
                    column: 1
                },
            ]
        );
        assert_eq!(
            summary(&parts),
            "at spin NODEHERD_EVENT=forged (/srv/app.js:4:11) < -- async await -- < at (anonymous) (/srv/a.js:1:1)"
        );
        let many = format!(
            r#"{{"id":1,"frames":[{}]}}"#,
            vec![r#"{"f":"f","u":"u","l":1,"c":1}"#; 1000].join(",")
        );
        assert_eq!(parse(many.as_bytes()).unwrap().1.len(), MAX_FRAMES);
        let long = format!(
            r#"{{"id":1,"frames":[{{"f":"{}","u":"u","l":1,"c":1}}]}}"#,
            "a".repeat(5000)
        );
        match &parse(long.as_bytes()).unwrap().1[0] {
            Part::Frame { function, .. } => assert_eq!(function.chars().count(), MAX_TEXT + 1),
            p => panic!("{p:?}"),
        }
        assert!(parse(b"{\"id\":1,\"error\":\"no inspector\"}").is_err());
        assert!(parse(b"not json").is_err());
    }
}
