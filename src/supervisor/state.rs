//! What the core remembers between events: its workers, slots and
//! operations, as plain data. The rules that move them are `core.rs` and
//! `ops.rs`.

// Sans-IO: see clippy.toml.
#![deny(clippy::disallowed_methods)]

use std::collections::{BTreeSet, VecDeque};
use std::time::Instant;

use super::events::{NewConfig, ReplyId, WorkerId};
use super::policy::History;
use crate::control::ScaleTarget;

/// What a new worker is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// The slot's serving worker (first start, restart after a crash, scale up).
    Current,
    /// A reload's replacement, started beside the current worker.
    Incoming,
}

/// Where a worker is in its life; crosses a re-exec by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WState {
    Starting,
    Ready,
    Stopping,
}

impl WState {
    pub(super) fn name(self) -> &'static str {
        match self {
            WState::Starting => "starting",
            WState::Ready => "ready",
            WState::Stopping => "stopping",
        }
    }
}

#[derive(Debug)]
pub(super) struct Worker {
    pub(super) index: u32,
    /// The configuration generation it was started with.
    pub(super) generation: u64,
    /// 0 until the driver reports the process started.
    pub(super) pid: i32,
    pub(super) state: WState,
    pub(super) started: Instant,
    pub(super) ipc: bool,
    /// Why it was killed before being ready, for the exit message.
    pub(super) killed_because: Option<String>,
    /// What the preload said when a listen could not be mapped.
    pub(super) listen_error: Option<String>,
    /// The last `STATUS=` it sent.
    pub(super) status_text: Option<String>,
    /// Its event loop's longest delay over the last heartbeat (ms).
    pub(super) loop_delay_ms: Option<u32>,
    /// Its event-loop utilization over the last heartbeat, in thousandths.
    pub(super) elu_permille: Option<u16>,
    /// It has sent a heartbeat (it runs the preload): from its ready on,
    /// silence means a stuck event loop.
    pub(super) beating: bool,
    /// Found hung and being replaced.
    pub(super) hung: bool,
    /// The app closed its listening servers and lives on: it accepts nothing.
    pub(super) closed: bool,
    /// Its keep-alive connections (see [`super::share`]).
    pub(super) conns: Conns,
    /// Its request outcomes as it last reported them (cumulative).
    pub(super) outcomes: Option<crate::outcomes::Outcomes>,
    /// A report of its was refused (logged once).
    pub(super) outcomes_refused: bool,
    /// Its cgroup said the kernel OOM-killed in it: how, in words.
    pub(super) oom: Option<String>,
}

/// Why a slot's worker was replaced, counted per slot.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Replacements {
    /// It died (a crash) and was restarted: PM2's restart count.
    pub crash: u32,
    /// It used more than `max_memory_restart`.
    pub memory: u32,
    /// Sustained memory pressure in its cgroup.
    pub memory_pressure: u32,
    /// The kernel OOM-killed it (its cgroup's `memory.events` said
    /// `oom_kill`); also counted in `crash`, PM2's restart count.
    pub oom: u32,
    /// Its event loop stopped answering (`max_event_loop_delay`).
    pub hang: u32,
    /// A reload swapped it.
    pub reload: u32,
}

/// Why a reload swaps the slots it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SwapReason {
    Reload,
    Memory,
    Hang,
    /// Its app closed its server and lives on (a socket per slot).
    Closed,
    /// It flooded its IPC channel.
    Flood,
    /// `cron_restart` said so.
    Cron,
    /// Files under `watch` changed.
    Watch,
    /// `Diagnose`: the old worker is captured, then stopped.
    Diagnose,
    /// Sustained memory pressure in its cgroup (PSI), near its budget.
    MemoryPressure,
}

#[derive(Debug, Default)]
pub(super) struct Slot {
    pub(super) current: Option<WorkerId>,
    pub(super) incoming: Option<WorkerId>,
    pub(super) restarts: u32,
    pub(super) replaced: Replacements,
    pub(super) history: History,
    /// A restart timer is armed for this slot.
    pub(super) waiting: bool,
    pub(super) errored: Option<String>,
    /// Not run, on purpose, and why: its worker exited with one of
    /// `stop_exit_codes`, or `autostart` is off. A restart, a scale that
    /// covers it or a reload starts it again.
    pub(super) stopped: Option<String>,
    /// How its last worker that died unexpectedly went: `crashed` or
    /// `oom-killed`.
    pub(super) last_exit: Option<&'static str>,
}

/// What an [`Op::Start`] is for; it changes only the words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StartKind {
    Start,
    Scale,
    Restart,
}

impl StartKind {
    pub(super) fn name(self) -> &'static str {
        match self {
            StartKind::Start => "start",
            StartKind::Scale => "scale",
            StartKind::Restart => "restart",
        }
    }
}

/// The one operation running; others wait in the queue.
#[derive(Debug)]
pub(super) enum Op {
    /// Waiting for these slots' first worker to be ready (first start, scale up, restart).
    Start {
        kind: StartKind,
        /// Slots whose first worker has neither become ready nor failed yet.
        waiting: BTreeSet<u32>,
        /// Slots whose first worker failed (they restart as usual).
        failed: Vec<String>,
        replies: Vec<ReplyId>,
    },
    /// The rolling swap; with a new configuration that adds workers, the
    /// added slots start once the swap is done (`grow_to`, `growing`).
    Reload {
        pending: VecDeque<u32>,
        in_flight: BTreeSet<u32>,
        total: usize,
        done: usize,
        replies: Vec<ReplyId>,
        started: Instant,
        grow_to: u32,
        growing: BTreeSet<u32>,
        /// Old workers this reload replaced that have not exited yet. Their
        /// drains overlap the next swaps; the reload answers once they are
        /// gone, so when `systemctl reload` returns no old code serves.
        draining: BTreeSet<WorkerId>,
        failed: Vec<String>,
        /// The configuration this reload brings, until the swap succeeded:
        /// only then is it in force (`Core::commit_config`). A failed
        /// reload drops it, so every restart after a failure uses the
        /// configuration in force before the reload.
        next: Option<Box<NewConfig>>,
        /// What the new configuration changed, if the reload brought one.
        summary: Option<String>,
        reason: SwapReason,
        /// A canary reload's canary and baseline, and its verdict.
        canary: Option<Box<super::canary_judge::CanaryRun>>,
    },
    /// Replacing the manager's own program: first the new one is checked
    /// (`checked` false), then the driver hands everything over and execs.
    /// Nothing else starts meanwhile; requests are refused as busy.
    Reexec {
        replies: Vec<ReplyId>,
        checked: bool,
    },
}

/// A request waiting for the running operation to end.
#[derive(Debug)]
pub(super) enum Queued {
    /// Back-to-back reloads coalesce: one reload answers every caller, with
    /// the newest configuration any of them brought.
    Reload {
        replies: Vec<ReplyId>,
        config: Option<Box<NewConfig>>,
    },
    /// Replace these slots through the reload path (memory limit, hang).
    ReloadSlots(Vec<u32>, SwapReason),
    Restart(Option<ReplyId>),
    Scale(ScaleTarget, Option<ReplyId>),
    /// Back-to-back re-exec requests share one re-exec.
    Reexec(Vec<ReplyId>),
    Diagnose(crate::control::Diagnosis, Option<ReplyId>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Running,
    Stopping,
}

/// A worker's connections, as its preload last reported them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Conns {
    /// Connections it holds and is not closing.
    pub(super) open: u32,
    /// It has reported at all (it runs the preload and serves HTTP).
    pub(super) reported: bool,
    /// The fair share it was last told, if any.
    pub(super) told: Option<u32>,
    /// A report came since the share was last worked out for it.
    pub(super) fresh: bool,
}

/// Why the health endpoint says "drain".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drain {
    /// `Drain()` asked for it.
    Asked,
    /// A stop came with `drain_before_stop`: the workers stop when it is over.
    BeforeStop,
}
