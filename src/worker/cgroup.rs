//! A cgroup per worker, where systemd delegates a subtree to the manager.
//!
//! Why: under one unit every worker shares one cgroup, so the unit's
//! `MemoryMax=` is a budget for the whole app, a worker's CPU and memory
//! from `/proc` miss the children it forks, and stopping a worker by its
//! process group misses a child that left the group (`setsid`). A cgroup of
//! its own per worker fixes all three: `cgroup.kill` reaches everything the
//! worker started, `cpu.stat` and `memory.current` count it, and
//! `memory.max`/`memory.high` bound each worker alone.
//!
//! Layout, under the cgroup systemd delegated (`Delegate=yes`):
//!
//! ```text
//! <unit cgroup>/            delegated (systemd's `trusted.delegate` xattr)
//!   supervisor/             the manager (DelegateSubgroup=supervisor, or
//!                           moved there by the manager itself at start)
//!   worker-<slot>-<manager pid>-<id>/
//!                           one per worker process, made before its exec
//!                           (the manager's pid: a file of several apps
//!                           runs a manager per app in one unit)
//!   .control/               systemd's ExecReload= and friends: not ours
//! ```
//!
//! A worker is joined to its cgroup between fork and exec by writing `0` to
//! an fd of its `cgroup.procs` opened beforehand (one async-signal-safe
//! `write`). After a re-exec the new program finds its workers' cgroups from
//! `/proc/PID/cgroup`: nothing is carried, nothing moved.
//!
//! Which worker a cgroup belongs to is kept here by pid, because status,
//! metrics and the notify socket (other tasks than the driver) ask by pid.
//! Without delegation (outside systemd, or `Delegate=` unset) everything
//! here is off and says why; workers run as before.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};

/// Name of the manager's own leaf (as systemd's `DelegateSubgroup=` names it).
pub const SUPERVISOR: &str = "supervisor";
/// Prefix of worker cgroups.
pub const WORKER_PREFIX: &str = "worker-";

/// Per-worker limits, from the app's keys (or the unit's budget shared out).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// `memory.max` in bytes; `memory.high` is set 10% below it.
    pub memory_max: Option<u64>,
    /// `cpu.weight` (1..=10000).
    pub cpu_weight: Option<u32>,
    /// `pids.max`.
    pub pids_max: Option<u64>,
}

/// What this manager can do with cgroups, found once at start.
#[derive(Debug, Clone)]
pub enum Mode {
    On(Tree),
    Off(String),
}

/// The delegated subtree.
#[derive(Debug, Clone)]
pub struct Tree {
    /// Where the cgroup2 hierarchy is mounted.
    pub mount: PathBuf,
    /// The delegated cgroup (the unit's), as a path in this mount namespace.
    pub root: PathBuf,
    /// Controllers enabled for the workers' cgroups.
    pub controllers: Vec<String>,
    /// The unit's own `memory.max`, when it has one (shared out among workers).
    pub unit_memory_max: Option<u64>,
}

static MODE: OnceLock<Mode> = OnceLock::new();
static LEAVES: OnceLock<Mutex<HashMap<i32, PathBuf>>> = OnceLock::new();

fn leaves() -> std::sync::MutexGuard<'static, HashMap<i32, PathBuf>> {
    LEAVES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Find (and on the first start, set up) the delegated subtree. Once per
/// process; later calls return the first answer.
pub fn init() -> &'static Mode {
    MODE.get_or_init(|| match detect() {
        Ok(t) => Mode::On(t),
        Err(why) => Mode::Off(why),
    })
}

/// The mode, if [`init`] ran (never sets anything up).
pub fn mode() -> Option<&'static Mode> {
    MODE.get()
}

fn tree() -> Option<&'static Tree> {
    match MODE.get()? {
        Mode::On(t) => Some(t),
        Mode::Off(_) => None,
    }
}

/// One line for `status` and the journal: on and where, or off and why.
pub fn summary() -> String {
    match MODE.get() {
        None => "per-worker cgroups off: not set up".into(),
        Some(Mode::Off(why)) => format!("per-worker cgroups off: {why}"),
        Some(Mode::On(t)) => {
            let mut s = format!("per-worker cgroups on under {}", t.root.display());
            for (c, what) in [
                ("memory", "memory budget"),
                ("cpu", "cpu weight"),
                ("pids", "pids limit"),
            ] {
                if !t.controllers.iter().any(|x| x == c) {
                    s.push_str(&format!(
                        "; {what} off: the {c} controller is not available in this cgroup (cgroup v1/hybrid host, or not delegated)"
                    ));
                }
            }
            s
        }
    }
}

fn detect() -> std::result::Result<Tree, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let mount = cgroup2_mount(&mountinfo).ok_or("no cgroup2 hierarchy is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let rel = unified_path(&own).ok_or("this process is in no cgroup2 cgroup")?;
    let dir = join(&mount, &rel);
    // The leaf first: the manager made it, so it is its user's, and would
    // pass for a delegated cgroup of its own after a re-exec.
    let root = if dir.file_name().is_some_and(|n| n == SUPERVISOR)
        && dir.parent().is_some_and(is_delegated)
    {
        // DelegateSubgroup=supervisor, or our own move before a re-exec.
        dir.parent().map(Path::to_path_buf).unwrap_or_default()
    } else if is_delegated(&dir) {
        dir.clone()
    } else {
        return Err(format!(
            "the cgroup {} is not delegated to this manager (run it from a unit with Delegate=yes)",
            dir.display()
        ));
    };
    let leaf = root.join(SUPERVISOR);
    if dir != leaf {
        // The no-internal-process rule: with controllers on for the
        // workers, the delegated cgroup itself may hold no process.
        match std::fs::create_dir(&leaf) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(format!(
                    "cannot create {}: {e} (ProtectControlGroups=yes makes the cgroup tree read-only)",
                    leaf.display()
                ));
            }
        }
        std::fs::write(leaf.join("cgroup.procs"), "0").map_err(|e| {
            format!(
                "cannot move the manager into {}: {e}",
                leaf.join("cgroup.procs").display()
            )
        })?;
    }
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let mut controllers = Vec::new();
    for c in ["memory", "cpu", "pids"] {
        if available.split_whitespace().any(|a| a == c)
            && std::fs::write(root.join("cgroup.subtree_control"), format!("+{c}")).is_ok()
        {
            controllers.push(c.to_string());
        }
    }
    let unit_memory_max = std::fs::read_to_string(root.join("memory.max"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    Ok(Tree {
        mount,
        root,
        controllers,
        unit_memory_max,
    })
}

fn join(mount: &Path, rel: &str) -> PathBuf {
    mount.join(rel.trim_start_matches('/'))
}

/// The mount point of the cgroup2 hierarchy, from `/proc/self/mountinfo`.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let f: Vec<&str> = left.split_whitespace().collect();
        // Only a mount of the hierarchy's root (ours, in a cgroup namespace)
        // maps /proc/self/cgroup paths onto files.
        if f.get(3) != Some(&"/") {
            return None;
        }
        Some(PathBuf::from(unescape(f.get(4)?)))
    })
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\134", "\\")
}

/// The cgroup2 path (`0::/...`) of a `/proc/PID/cgroup` text.
pub fn unified_path(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end_matches(" (deleted)").to_string())
}

fn is_delegated(dir: &Path) -> bool {
    // systemd hands a delegated cgroup to the unit's User= (its xattr
    // below is trusted.*, which only root may read). A user session's scope
    // is the user's too, but no service of its own (no INVOCATION_ID).
    use std::os::unix::fs::MetadataExt;
    let euid = nix::unistd::geteuid().as_raw();
    if euid != 0
        && std::env::var_os("INVOCATION_ID").is_some()
        && std::fs::metadata(dir).is_ok_and(|m| m.uid() == euid)
    {
        return true;
    }
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    ["trusted.delegate", "user.delegate"].iter().any(|name| {
        let name = CString::new(*name).unwrap_or_default();
        let mut buf = [0u8; 8];
        // SAFETY: valid C strings and a buffer of the length given.
        let n = unsafe {
            libc::getxattr(
                c.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        n > 0 && buf[0] == b'1'
    })
}

/// A worker's cgroup, made before its fork; the child joins it through
/// `procs` (an fd of its `cgroup.procs`).
pub struct Leaf {
    pub path: PathBuf,
    procs: OwnedFd,
}

impl Leaf {
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }
}

/// Make the cgroup of a worker about to start in slot `index` as worker
/// `id`, with `limits` written where their controller is on. `None` when
/// cgroups are off.
pub fn prepare(index: u32, id: u64, limits: &Limits) -> Result<Option<Leaf>> {
    let Some(t) = tree() else {
        return Ok(None);
    };
    let path = t.root.join(format!(
        "{WORKER_PREFIX}{index}-{}-{id}",
        std::process::id()
    ));
    // Never one that is there: a worker shares its cgroup with no other.
    std::fs::create_dir(&path)
        .with_context(|| format!("creating the cgroup {}", path.display()))?;
    write_limits(&path, limits, &t.controllers)?;
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(path.join("cgroup.procs"))
        .with_context(|| format!("opening {}/cgroup.procs", path.display()))?;
    Ok(Some(Leaf {
        path,
        procs: procs.into(),
    }))
}

/// Write `limits` into the cgroup `dir`, each only where its controller is
/// among `controllers` (elsewhere the file does not exist).
pub fn write_limits(dir: &Path, limits: &Limits, controllers: &[String]) -> Result<()> {
    let on = |c: &str| controllers.iter().any(|x| x == c);
    let put = |file: &str, value: String| {
        std::fs::write(dir.join(file), &value)
            .with_context(|| format!("writing {value} to {}/{file}", dir.display()))
    };
    if let Some(max) = limits.memory_max
        && on("memory")
    {
        put("memory.high", memory_high(max).to_string())?;
        put("memory.max", max.to_string())?;
    }
    if let Some(w) = limits.cpu_weight
        && on("cpu")
    {
        put("cpu.weight", w.to_string())?;
    }
    if let Some(p) = limits.pids_max
        && on("pids")
    {
        put("pids.max", p.to_string())?;
    }
    Ok(())
}

/// `memory.high` for a `memory.max`: 10% below, so the kernel reclaims and
/// throttles (and PSI shows pressure) before it OOM-kills.
pub fn memory_high(max: u64) -> u64 {
    max - max / 10
}

/// Each worker's memory budget: the app's `max_memory`, else the unit's
/// `MemoryMax=` shared out among `instances`.
pub fn worker_memory(
    max_memory: Option<u64>,
    unit_max: Option<u64>,
    instances: u32,
) -> Option<u64> {
    max_memory.or_else(|| unit_max.map(|m| m / u64::from(instances.max(1))))
}

/// The V8 heap (`--max-old-space-size`, MiB) for a memory budget: three
/// quarters of it, leaving room for buffers, code and the stack.
pub fn heap_mib(memory: u64) -> u64 {
    (memory / 4 * 3 / (1 << 20)).max(16)
}

/// The unit's own `memory.max`, when cgroups are on and it has one.
pub fn unit_memory_max() -> Option<u64> {
    tree()?.unit_memory_max
}

/// Which controllers the workers' cgroups have (empty when off).
pub fn controllers() -> Vec<String> {
    tree().map(|t| t.controllers.clone()).unwrap_or_default()
}

/// A spawn in `leaf` ended with `result`: remember the worker's cgroup by
/// its pid, or remove the cgroup no process joined.
pub fn started<T>(result: Result<(i32, T)>, leaf: Option<Leaf>) -> Result<(i32, T)> {
    if let Some(leaf) = leaf {
        match &result {
            Ok((pid, _)) => {
                leaves().insert(*pid, leaf.path);
            }
            Err(_) => {
                let _ = std::fs::remove_dir(&leaf.path);
            }
        }
    }
    result
}

/// A worker handed over by a re-exec: find its cgroup from `/proc`.
pub fn adopt(pid: i32) {
    let Some(t) = tree() else { return };
    if let Some(dir) = cgroup_of(pid)
        && dir.parent() == Some(t.root.as_path())
        && dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(WORKER_PREFIX))
    {
        leaves().insert(pid, dir);
    }
}

/// The cgroup directory `pid` is in (cgroup2), when cgroups are on.
pub fn cgroup_of(pid: i32) -> Option<PathBuf> {
    let t = tree()?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    Some(join(&t.mount, &unified_path(&text)?))
}

/// The cgroup of worker `pid`, if it has one. In the manager, the one it
/// made; in a client (`status`, `monit`), found from `/proc`.
pub fn leaf_of(pid: i32) -> Option<PathBuf> {
    if MODE.get().is_some() {
        return leaves().get(&pid).cloned();
    }
    let mount = cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let dir = join(&mount, &unified_path(&text)?);
    let worker = dir
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(WORKER_PREFIX));
    // Beside the manager's own leaf: a figure to show, not a right to grant,
    // and trusted.delegate is for root's eyes only.
    let beside = dir.parent().is_some_and(|p| p.join(SUPERVISOR).is_dir());
    (worker && beside).then_some(dir)
}

/// Is `sender` inside worker `worker_pid`'s cgroup? `true` when that worker
/// has none (cgroups off): then the process tree alone decides.
pub fn speaks_for(sender: i32, worker_pid: i32) -> bool {
    let Some(leaf) = leaf_of(worker_pid) else {
        return true;
    };
    cgroup_of(sender).is_some_and(|c| c.starts_with(&leaf))
}

/// SIGKILL everything in worker `pid`'s cgroup (grandchildren that left its
/// process group included). `false` when it has none.
pub fn kill(pid: i32) -> bool {
    let Some(leaf) = leaf_of(pid) else {
        return false;
    };
    kill_dir(&leaf);
    true
}

fn kill_dir(dir: &Path) {
    if std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    // Before Linux 5.14: each process by pid.
    if let Ok(s) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for p in s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            crate::worker::process::signal(p, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Worker `pid` was reaped: kill what it left in its cgroup and remove the
/// cgroup once empty (the kill is asynchronous; polled, bounded).
pub fn reaped(pid: i32) {
    let Some(leaf) = leaves().remove(&pid) else {
        return;
    };
    kill_dir(&leaf);
    if std::fs::remove_dir(&leaf).is_ok() {
        return;
    }
    std::thread::spawn(move || {
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(50));
            if std::fs::remove_dir(&leaf).is_ok() || !leaf.exists() {
                return;
            }
            kill_dir(&leaf);
        }
        crate::logs::warn(&format!(
            "could not remove the cgroup {} of a reaped worker: still populated after 5 s",
            leaf.display()
        ));
    });
}

/// CPU time of worker `pid`'s cgroup (its children included), in seconds.
pub fn cpu_seconds(pid: i32) -> Option<f64> {
    let leaf = leaf_of(pid)?;
    let s = std::fs::read_to_string(leaf.join("cpu.stat")).ok()?;
    Some(CpuStat::parse(&s).usage_usec as f64 / 1e6)
}

/// Memory of worker `pid`'s cgroup: `memory.current` with the memory
/// controller, else the resident memory of every process in it.
pub fn memory_bytes(pid: i32) -> Option<u64> {
    let leaf = leaf_of(pid)?;
    if let Ok(s) = std::fs::read_to_string(leaf.join("memory.current"))
        && let Ok(v) = s.trim().parse()
    {
        return Some(v);
    }
    let procs = std::fs::read_to_string(leaf.join("cgroup.procs")).ok()?;
    Some(
        procs
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .map(crate::worker::process::rss_bytes)
            .sum(),
    )
}

/// What worker `pid`'s memory is (`memory.stat` anon and file), when its
/// cgroup has the memory controller.
pub fn memory_stat(pid: i32) -> Option<MemoryStat> {
    let leaf = leaf_of(pid)?;
    let s = std::fs::read_to_string(leaf.join("memory.stat")).ok()?;
    MemoryStat::parse(&s)
}

/// Worker `pid`'s memory events (`memory.events`), if it has them.
pub fn memory_events(pid: i32) -> Option<MemoryEvents> {
    let leaf = leaf_of(pid)?;
    let s = std::fs::read_to_string(leaf.join("memory.events")).ok()?;
    Some(MemoryEvents::parse(&s))
}

/// Worker `pid`'s cgroup says the kernel OOM-killed in it: how, in words
/// ("OOM-killed at 128 MiB"), for the journal. Ask before [`reaped`].
pub fn oom_killed(pid: i32) -> Option<String> {
    let events = memory_events(pid)?;
    let leaf = leaf_of(pid)?;
    (events.oom_kill > 0).then(|| {
        oom_words(
            &events,
            std::fs::read_to_string(leaf.join("memory.max")).ok(),
        )
    })
}

/// The journal's words for an OOM kill, `memory.max` as the file says it.
pub fn oom_words(events: &MemoryEvents, memory_max: Option<String>) -> String {
    let at = memory_max
        .and_then(|m| m.trim().parse::<u64>().ok())
        .map_or(String::new(), |m| format!(" at {} MiB", m >> 20));
    format!(
        "OOM-killed{at} (memory.events: oom_kill {}, max {}, high {})",
        events.oom_kill, events.max, events.high
    )
}

/// Worker `pid`'s memory pressure (`memory.pressure`), if it has it.
pub fn memory_pressure(pid: i32) -> Option<Pressure> {
    let leaf = leaf_of(pid)?;
    let s = std::fs::read_to_string(leaf.join("memory.pressure")).ok()?;
    Pressure::parse(&s)
}

/// CPU worker `pid`'s or the process's own, whichever is known.
pub fn worker_cpu_seconds(pid: i32) -> f64 {
    cpu_seconds(pid).unwrap_or_else(|| crate::worker::process::cpu_seconds(pid))
}

/// Memory of worker `pid`'s cgroup, or its resident memory without one.
pub fn worker_memory_bytes(pid: i32) -> u64 {
    memory_bytes(pid).unwrap_or_else(|| crate::worker::process::rss_bytes(pid))
}

/// `cpu.stat`, the fields every cgroup2 cgroup has (from the core).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CpuStat {
    pub usage_usec: u64,
    pub user_usec: u64,
    pub system_usec: u64,
}

fn keyed(text: &str) -> impl Iterator<Item = (&str, u64)> {
    text.lines().filter_map(|l| {
        let (k, v) = l.split_once(' ')?;
        Some((k, v.trim().parse().ok()?))
    })
}

impl CpuStat {
    pub fn parse(text: &str) -> CpuStat {
        let mut s = CpuStat::default();
        for (k, v) in keyed(text) {
            match k {
                "usage_usec" => s.usage_usec = v,
                "user_usec" => s.user_usec = v,
                "system_usec" => s.system_usec = v,
                _ => {}
            }
        }
        s
    }
}

/// `memory.events`: how often the cgroup hit `memory.high`, `memory.max`,
/// and how many of its processes the OOM killer took.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEvents {
    pub high: u64,
    pub max: u64,
    pub oom: u64,
    pub oom_kill: u64,
}

impl MemoryEvents {
    pub fn parse(text: &str) -> MemoryEvents {
        let mut e = MemoryEvents::default();
        for (k, v) in keyed(text) {
            match k {
                "high" => e.high = v,
                "max" => e.max = v,
                "oom" => e.oom = v,
                "oom_kill" => e.oom_kill = v,
                _ => {}
            }
        }
        e
    }
}

/// Of `memory.stat`, what tells a leak from a cache: `anon` (heap, stacks:
/// what the worker holds) and `file` (page cache it reads and writes
/// through, which the kernel reclaims first).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStat {
    pub anon: u64,
    pub file: u64,
}

impl MemoryStat {
    /// `None` when either line is missing: a file that is not `memory.stat`.
    pub fn parse(text: &str) -> Option<MemoryStat> {
        let (mut anon, mut file) = (None, None);
        for (k, v) in keyed(text) {
            match k {
                "anon" => anon = Some(v),
                "file" => file = Some(v),
                _ => {}
            }
        }
        Some(MemoryStat {
            anon: anon?,
            file: file?,
        })
    }
}

/// A PSI file's `some` and `full` lines (`avg10` in percent, `total` in µs).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Pressure {
    pub some_avg10: f64,
    pub some_total_usec: u64,
    pub full_avg10: f64,
    pub full_total_usec: u64,
}

impl Pressure {
    pub fn parse(text: &str) -> Option<Pressure> {
        let mut p = Pressure::default();
        let mut seen = false;
        for l in text.lines() {
            let mut words = l.split_whitespace();
            let kind = words.next()?;
            let (mut avg10, mut total) = (None, None);
            for w in words {
                match w.split_once('=') {
                    Some(("avg10", v)) => avg10 = v.parse::<f64>().ok(),
                    Some(("total", v)) => total = v.parse::<u64>().ok(),
                    _ => {}
                }
            }
            let (Some(a), Some(t)) = (avg10, total) else {
                return None;
            };
            match kind {
                "some" => (p.some_avg10, p.some_total_usec, seen) = (a, t, true),
                "full" => (p.full_avg10, p.full_total_usec) = (a, t),
                _ => {}
            }
        }
        seen.then_some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_on_hybrid_and_unified_hosts() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                      42 31 0:39 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "29 23 0:25 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        // A bind of a subtree cannot map /proc paths.
        let sub = "29 23 0:25 /system.slice /mnt rw - cgroup2 cgroup2 rw";
        assert_eq!(cgroup2_mount(sub), None);
        assert_eq!(cgroup2_mount(""), None);
    }

    #[test]
    fn the_unified_line_of_proc_cgroup() {
        let hybrid = "9:name=systemd:/x\n8:pids:/\n0::/system.slice/app.service/supervisor\n";
        assert_eq!(
            unified_path(hybrid).as_deref(),
            Some("/system.slice/app.service/supervisor")
        );
        assert_eq!(unified_path("1:name=systemd:/\n"), None);
    }

    #[test]
    fn cpu_stat_memory_events_and_pressure_parse() {
        let cpu = "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 0\n";
        assert_eq!(
            CpuStat::parse(cpu),
            CpuStat {
                usage_usec: 2_500_000,
                user_usec: 2_000_000,
                system_usec: 500_000
            }
        );
        let ev = "low 0\nhigh 17\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(
            MemoryEvents::parse(ev),
            MemoryEvents {
                high: 17,
                max: 3,
                oom: 1,
                oom_kill: 1
            }
        );
        let psi = "some avg10=12.50 avg60=3.00 avg300=0.50 total=123456\n\
                   full avg10=4.25 avg60=1.00 avg300=0.10 total=6543\n";
        let p = Pressure::parse(psi).unwrap();
        assert_eq!(p.some_avg10, 12.5);
        assert_eq!(p.some_total_usec, 123_456);
        assert_eq!(p.full_avg10, 4.25);
        assert_eq!(p.full_total_usec, 6543);
        assert!(Pressure::parse("some avg10=x total=1\n").is_none());
        assert!(Pressure::parse("").is_none());
    }

    #[test]
    fn memory_stat_keeps_anon_and_file() {
        // The head of a real memory.stat (Linux 6.1), a Node worker's.
        let stat = "anon 48291840\nfile 2539520\nkernel 1646592\nkernel_stack 229376\n\
                    pagetables 557056\nsec_pagetables 0\npercpu 0\nsock 0\nvmalloc 0\n\
                    shmem 0\nzswap 0\nzswapped 0\nfile_mapped 0\nfile_dirty 0\n\
                    file_writeback 0\nswapcached 0\nanon_thp 0\nfile_thp 0\n\
                    shmem_thp 0\ninactive_anon 48254976\nactive_anon 20480\n\
                    inactive_file 2531328\nactive_file 8192\nunevictable 0\n";
        assert_eq!(
            MemoryStat::parse(stat),
            Some(MemoryStat {
                anon: 48_291_840,
                file: 2_539_520
            })
        );
        // `anon_thp` and `inactive_anon` are not `anon`.
        assert_eq!(
            MemoryStat::parse("anon_thp 5\ninactive_anon 7\nfile 1\n"),
            None
        );
        assert_eq!(MemoryStat::parse("anon x\nfile 1\n"), None);
        assert_eq!(MemoryStat::parse(""), None);
    }

    #[test]
    fn budgets_derive_from_the_key_or_the_unit() {
        let m = 1 << 20;
        assert_eq!(
            worker_memory(Some(128 * m), Some(4096 * m), 4),
            Some(128 * m)
        );
        assert_eq!(worker_memory(None, Some(1024 * m), 4), Some(256 * m));
        assert_eq!(worker_memory(None, Some(1024 * m), 0), Some(1024 * m));
        assert_eq!(worker_memory(None, None, 4), None);
        assert_eq!(memory_high(100 * m), 90 * m);
        assert_eq!(heap_mib(128 * m), 96);
        assert_eq!(heap_mib(m), 16);
    }

    #[test]
    fn an_oom_kill_is_said_with_the_budget() {
        let e = MemoryEvents::parse("low 0\nhigh 40\nmax 9\noom 1\noom_kill 1\n");
        assert_eq!(
            oom_words(&e, Some("134217728\n".into())),
            "OOM-killed at 128 MiB (memory.events: oom_kill 1, max 9, high 40)"
        );
        assert_eq!(
            oom_words(&e, Some("max\n".into())),
            "OOM-killed (memory.events: oom_kill 1, max 9, high 40)"
        );
    }

    #[test]
    fn limits_go_only_where_their_controller_is() {
        let dir = std::env::temp_dir().join(format!("nodeherd-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let limits = Limits {
            memory_max: Some(100 << 20),
            cpu_weight: Some(50),
            pids_max: Some(64),
        };
        write_limits(&dir, &limits, &[]).unwrap();
        assert!(!dir.join("memory.max").exists());
        write_limits(&dir, &limits, &["memory".into(), "pids".into()]).unwrap();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(read("memory.max"), (100u64 << 20).to_string());
        assert_eq!(read("memory.high"), (90u64 << 20).to_string());
        assert_eq!(read("pids.max"), "64");
        assert!(!dir.join("cpu.weight").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
