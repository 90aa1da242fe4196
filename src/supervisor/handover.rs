//! The core's state as it crosses a re-exec: written by the old program,
//! read by the new one.
//!
//! This is a contract between two versions of nodeherd, so it is its own set
//! of plain types rather than serde on the core's internals: changing a
//! field of `Worker` must not silently change what an older manager writes
//! or a newer one reads. A field added later needs `#[serde(default)]`, and a
//! change an older reader could not follow needs a new
//! [`STATE_FORMAT`](super::takeover::STATE_FORMAT).
//!
//! Times are carried as offsets from the moment of writing; the reader adds
//! the time the exec took (both sides read the same monotonic clock), so a
//! worker's uptime and every deadline (kill_timeout, listen_timeout, a
//! restart's backoff, the watchdog) go on as if nothing happened.

// Sans-IO: see clippy.toml.
#![deny(clippy::disallowed_methods)]

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::core::Core;
use super::events::WorkerId;
use super::policy::{History, Policy};
use super::state::{Phase, Queued, Replacements, Slot, SwapReason, WState, Worker};
use super::timers::{TimerKey, Timers};
use crate::control::Counters;

/// Everything the core knows, with times as offsets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoreState {
    /// The slot count in force (a live scale changes it).
    pub instances: u32,
    pub generation: u64,
    pub next_worker: u64,
    pub ready_sent: bool,
    pub slots: Vec<SlotState>,
    pub workers: Vec<WorkerState>,
    /// Deadlines, in nanoseconds after the moment of writing (negative: overdue).
    pub timers: Vec<(TimerKey, i128)>,
    /// Replacements found due (memory, hang) and not yet begun.
    #[serde(default)]
    pub queued_swaps: Vec<(Vec<u32>, SwapReason)>,
    #[serde(default)]
    pub counters: Counters,
    #[serde(default)]
    pub last_status: String,
    /// When `cron_restart` runs next on the wall clock (ms since the
    /// epoch); its deadline is among `timers`.
    #[serde(default)]
    pub cron_next: Option<u64>,
    /// `Drain()` was asked for and not undone.
    #[serde(default)]
    pub drain_asked: bool,
    /// A manual scale holds autoscaling's count until the next reload.
    #[serde(default)]
    pub autoscale_pinned: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotState {
    pub current: Option<WorkerId>,
    pub incoming: Option<WorkerId>,
    pub restarts: u32,
    #[serde(default)]
    pub replaced: Replacements,
    /// Unstable deaths in a row and the last backoff (ms): the crash rule's memory.
    pub unstable: u32,
    pub backoff_ms: u64,
    pub waiting: bool,
    pub errored: Option<String>,
    /// Stopped on purpose (`stop_exit_codes`, `autostart`), and why.
    #[serde(default)]
    pub stopped: Option<String>,
    /// How its last worker that died unexpectedly went (`crashed`, `oom-killed`).
    #[serde(default)]
    pub last_exit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerState {
    pub id: WorkerId,
    pub index: u32,
    pub pid: i32,
    /// starting, ready or stopping.
    pub state: WState,
    /// How long it had been running when the state was written (ns).
    pub age_ns: u128,
    pub ipc: bool,
    #[serde(default)]
    pub killed_because: Option<String>,
    #[serde(default)]
    pub listen_error: Option<String>,
    #[serde(default)]
    pub status_text: Option<String>,
    #[serde(default)]
    pub loop_delay_ms: Option<u32>,
    #[serde(default)]
    pub beating: bool,
    #[serde(default)]
    pub hung: bool,
    #[serde(default)]
    pub closed: bool,
    /// Its keep-alive connections as last reported, and the share it was told.
    #[serde(default)]
    pub conns_open: u32,
    #[serde(default)]
    pub conns_reported: bool,
    #[serde(default)]
    pub conns_told: Option<u32>,
    /// The configuration generation it was started with (an older state
    /// has none: the one in force).
    #[serde(default)]
    pub generation: Option<u64>,
}

fn signed_offset(at: Instant, base: Instant) -> i128 {
    if at >= base {
        at.duration_since(base).as_nanos() as i128
    } else {
        -(base.duration_since(at).as_nanos() as i128)
    }
}

fn at_offset(base: Instant, ns: i128) -> Instant {
    let d = Duration::from_nanos(ns.unsigned_abs().min(u64::MAX as u128) as u64);
    if ns >= 0 {
        base + d
    } else {
        base.checked_sub(d).unwrap_or(base)
    }
}

impl Core {
    /// The state to hand over, as of `now`. Only a running manager with no
    /// operation but the re-exec itself is handed over; requests that were
    /// waiting have been answered ([`Core::exec_due`] says when).
    pub fn export(&self, now: Instant) -> CoreState {
        let slots = self
            .slots
            .iter()
            .map(|s| SlotState {
                current: s.current,
                incoming: s.incoming,
                restarts: s.restarts,
                replaced: s.replaced,
                unstable: s.history.unstable,
                backoff_ms: s.history.backoff.as_millis() as u64,
                waiting: s.waiting,
                errored: s.errored.clone(),
                stopped: s.stopped.clone(),
                last_exit: s.last_exit.map(str::to_string),
            })
            .collect();
        let workers = self
            .workers
            .iter()
            .map(|(id, w)| WorkerState {
                id: *id,
                index: w.index,
                pid: w.pid,
                state: w.state,
                age_ns: now.saturating_duration_since(w.started).as_nanos(),
                ipc: w.ipc,
                killed_because: w.killed_because.clone(),
                listen_error: w.listen_error.clone(),
                status_text: w.status_text.clone(),
                loop_delay_ms: w.loop_delay_ms,
                beating: w.beating,
                hung: w.hung,
                closed: w.closed,
                conns_open: w.conns.open,
                conns_reported: w.conns.reported,
                conns_told: w.conns.told,
                generation: Some(w.generation),
            })
            .collect();
        let queued_swaps = self
            .queue
            .iter()
            .filter_map(|q| match q {
                Queued::ReloadSlots(slots, reason) => Some((slots.clone(), *reason)),
                _ => None,
            })
            .collect();
        CoreState {
            instances: self.policy.instances,
            generation: self.generation,
            next_worker: self.next_worker,
            ready_sent: self.ready_sent,
            slots,
            workers,
            timers: self
                .timers
                .armed()
                .map(|(k, at)| (k, signed_offset(at, now)))
                .collect(),
            queued_swaps,
            counters: self.counters,
            last_status: self.last_status.clone(),
            cron_next: self.cron_next,
            drain_asked: self.drain_asked(),
            autoscale_pinned: self.autoscale_pinned(),
        }
    }

    /// A core that goes on from `state`, written `elapsed` before `now`
    /// (the time the exec took), under `policy` (the configuration in force,
    /// its instance count taken from the state).
    pub fn import(
        state: CoreState,
        mut policy: Policy,
        now: Instant,
        elapsed: Duration,
    ) -> Result<Core, String> {
        let base = now.checked_sub(elapsed).unwrap_or(now);
        policy.instances = state.instances;
        let mut core = Core::new(policy, now);
        core.generation = state.generation;
        core.next_worker = state.next_worker;
        core.ready_sent = state.ready_sent;
        core.counters = state.counters;
        core.counters.reexecs += 1;
        core.last_status = state.last_status;
        core.cron_next = state.cron_next;
        if state.drain_asked {
            core.drain = Some((super::state::Drain::Asked, now));
        }
        core.phase = Phase::Running;
        core.slots = state
            .slots
            .into_iter()
            .map(|s| Slot {
                current: s.current,
                incoming: s.incoming,
                restarts: s.restarts,
                replaced: s.replaced,
                history: History {
                    unstable: s.unstable,
                    backoff: Duration::from_millis(s.backoff_ms),
                },
                waiting: s.waiting,
                errored: s.errored,
                stopped: s.stopped,
                // Only words this program knows come back.
                last_exit: match s.last_exit.as_deref() {
                    Some("oom-killed") => Some("oom-killed"),
                    Some("crashed") => Some("crashed"),
                    _ => None,
                },
            })
            .collect();
        let mut workers = BTreeMap::new();
        for w in state.workers {
            let st = w.state;
            if w.index as usize >= core.slots.len() && st != WState::Stopping {
                return Err(format!(
                    "worker {} belongs to slot {}, but there are {} slots",
                    w.id.0,
                    w.index,
                    core.slots.len()
                ));
            }
            if w.id.0 >= state.next_worker {
                return Err(format!(
                    "worker {} is not below the next worker id {}",
                    w.id.0, state.next_worker
                ));
            }
            let age = Duration::from_nanos(w.age_ns.min(u64::MAX as u128) as u64);
            let id = w.id;
            let previous = workers.insert(
                w.id,
                Worker {
                    index: w.index,
                    generation: w.generation.unwrap_or(state.generation),
                    pid: w.pid,
                    state: st,
                    started: base.checked_sub(age).unwrap_or(base),
                    ipc: w.ipc,
                    killed_because: w.killed_because,
                    listen_error: w.listen_error,
                    status_text: w.status_text,
                    loop_delay_ms: w.loop_delay_ms,
                    elu_permille: None,
                    beating: w.beating,
                    hung: w.hung,
                    closed: w.closed,
                    conns: super::state::Conns {
                        open: w.conns_open,
                        reported: w.conns_reported,
                        told: w.conns_told,
                        fresh: false,
                    },
                    // Its next heartbeat reports them again, cumulative.
                    outcomes: None,
                    outcomes_refused: false,
                    oom: None,
                },
            );
            if previous.is_some() {
                return Err(format!("worker {} is named twice", id.0));
            }
        }
        for (index, slot) in core.slots.iter().enumerate() {
            for id in [slot.current, slot.incoming].into_iter().flatten() {
                let Some(w) = workers.get(&id) else {
                    return Err(format!(
                        "slot {index} names worker {}, which is not there",
                        id.0
                    ));
                };
                if w.index as usize != index || w.state == WState::Stopping {
                    return Err(format!(
                        "slot {index} names worker {}, which is {} in slot {}",
                        id.0,
                        w.state.name(),
                        w.index
                    ));
                }
            }
        }
        core.workers = workers;
        let mut timers = Timers::default();
        for (key, ns) in state.timers {
            timers.arm(key, at_offset(base, ns));
        }
        core.timers = timers;
        core.autoscale_resume(state.autoscale_pinned);
        core.queue = state
            .queued_swaps
            .into_iter()
            .map(|(slots, reason)| Queued::ReloadSlots(slots, reason))
            .collect::<VecDeque<_>>();
        Ok(core)
    }

    /// The workers the driver must take over: id, slot, pid.
    pub fn handed_over(&self) -> impl Iterator<Item = (WorkerId, u32, i32)> + '_ {
        self.workers.iter().map(|(id, w)| (*id, w.index, w.pid))
    }
}

#[cfg(test)]
// A test takes its starting instant from the clock.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn offsets_round_trip_both_ways() {
        let base = Instant::now() + Duration::from_secs(10);
        for ns in [-5_000_000_000i128, -1, 0, 1, 7_000_000_000] {
            assert_eq!(signed_offset(at_offset(base, ns), base), ns);
        }
    }
}
