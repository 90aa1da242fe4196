//! Processes after they started: reaping, signalling, reading `/proc`.

use std::collections::HashMap;

use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// How a worker process ended, as `waitpid` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ExitStatus::Code(c) => write!(f, "exited with code {c}"),
            ExitStatus::Signal(s) => match nix::sys::signal::Signal::try_from(s) {
                Ok(sig) => write!(f, "killed by {}", sig.as_str()),
                Err(_) => write!(f, "killed by signal {s}"),
            },
        }
    }
}

/// Send `sig` to `pid`; never to our own group or to everything (0, -1).
pub fn signal(pid: i32, sig: Signal) {
    if pid > 1 {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// SIGKILL the process group led by `pid` (a worker and whatever it forked).
pub fn kill_group(pid: i32) {
    if pid > 1 {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// How many parents up a notify sender may be from its worker.
const MAX_DEPTH: usize = 32;

/// The worker `pid` descends from: the ancestor (or `pid` itself) whose
/// parent is `manager`, found by walking the parent chain in `/proc`
/// (bounded). `None` for a process outside every worker's tree: an orphan
/// of a worker (the manager is its subreaper, but it no longer descends
/// from that worker), or a stranger.
///
/// This, and not the process group, is what ties a notify message to a
/// worker: any process of the same session may join any process group
/// (`setpgid`), so a worker's child could speak for a sibling worker by
/// joining that sibling's group; nobody can choose their parent.
pub fn worker_ancestor(pid: i32, manager: i32) -> Option<i32> {
    let mut at = pid;
    for _ in 0..MAX_DEPTH {
        if at <= 1 || at == manager {
            return None;
        }
        let parent: i32 = stat_field(at, 4)?.parse().ok()?;
        if parent == manager {
            return Some(at);
        }
        at = parent;
    }
    None
}

/// Reap every child that has exited and is ours to reap: a worker in
/// `workers`, or an orphan handed to us as the children's subreaper.
///
/// `waitpid(-1)` would also take the exit of a child some other part of
/// this process waits for itself (a `.config.js` being evaluated by node on
/// a reload, say), which would then fail with ECHILD. So children are
/// reaped by pid: workers by theirs, and other children only when they are
/// not in our own process group — orphans come from workers' groups (or
/// made their own session), while a helper this process starts stays in
/// our group and is left to whoever started it.
pub fn reap<T>(workers: &HashMap<i32, T>) -> Vec<(i32, ExitStatus)> {
    let mut out = Vec::new();
    for &pid in workers.keys() {
        if let Some(status) = try_reap(pid) {
            out.push((pid, status));
        }
    }
    let own_group = nix::unistd::getpgrp().as_raw();
    for pid in children() {
        if workers.contains_key(&pid) {
            continue;
        }
        if stat_field(pid, 5).and_then(|g| g.parse::<i32>().ok()) == Some(own_group) {
            continue;
        }
        // An orphan: reaped, nothing else to do.
        let _ = try_reap(pid);
    }
    out
}

fn try_reap(pid: i32) -> Option<ExitStatus> {
    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => Some(ExitStatus::Code(code)),
        Ok(WaitStatus::Signaled(_, sig, _)) => Some(ExitStatus::Signal(sig as i32)),
        _ => None,
    }
}

/// This process's children, from `/proc/self/task/*/children`.
pub fn children() -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out
}

/// Field `n` (1-based, as in proc(5)) of `/proc/PID/stat`.
fn stat_field(pid: i32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: skip past its last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace()
        .nth(n.checked_sub(3)?)
        .map(str::to_string)
}

/// Resident memory of a process in bytes, from /proc (0 when it is gone).
pub fn rss_bytes(pid: i32) -> u64 {
    let Ok(statm) = std::fs::read_to_string(format!("/proc/{pid}/statm")) else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * page_size()
}

/// CPU time (user and system) a process has used, in seconds (0 when gone).
pub fn cpu_seconds(pid: i32) -> f64 {
    let ticks: u64 = [14, 15]
        .iter()
        .filter_map(|&n| stat_field(pid, n)?.parse::<u64>().ok())
        .sum();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .unwrap_or(100);
    ticks as f64 / per_second as f64
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p.max(4096) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_stat_and_memory() {
        let me = std::process::id() as i32;
        assert_eq!(
            stat_field(me, 5).and_then(|g| g.parse::<i32>().ok()),
            Some(nix::unistd::getpgrp().as_raw())
        );
        assert!(rss_bytes(me) > 0);
        assert_eq!(rss_bytes(-5), 0);
    }

    #[test]
    fn a_sender_is_tied_to_the_worker_it_descends_from() {
        let me = std::process::id() as i32;
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Our child, seen from our parent: we are the "worker".
        let parent = nix::unistd::getppid().as_raw();
        assert_eq!(worker_ancestor(pid, parent), Some(me));
        assert_eq!(worker_ancestor(me, parent), Some(me));
        assert_eq!(worker_ancestor(pid, me), Some(pid));
        // Not below `manager` at all.
        assert_eq!(worker_ancestor(me, pid), None);
        assert_eq!(worker_ancestor(-3, me), None);
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn a_child_in_our_own_group_is_left_to_its_owner() {
        // A helper started with std::process::Command stays in our group:
        // the reaper must leave it, or its owner's wait() fails with ECHILD.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let gone = (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(2));
            stat_field(pid, 3).as_deref() == Some("Z")
        });
        assert!(gone, "the child became a zombie");
        let none: HashMap<i32, ()> = HashMap::new();
        assert!(reap(&none).is_empty());
        assert!(child.wait().unwrap().success(), "its owner still reaps it");
    }
}
