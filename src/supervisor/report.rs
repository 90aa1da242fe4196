//! What the outside may read: the state in a word, the status in a line
//! (systemd's `STATUS=`), and the [`Snapshot`] the D-Bus side publishes.

// Sans-IO: see clippy.toml.
#![deny(clippy::disallowed_methods)]

use super::core::Core;
use super::events::SdNotify;
use super::state::{Op, Phase, StartKind, WState};
use crate::control::{Snapshot, WorkerInfo};

impl Core {
    /// The slot a worker belongs to, while it exists.
    pub fn slot_of(&self, worker: super::events::WorkerId) -> Option<u32> {
        self.workers.get(&worker).map(|w| w.index)
    }

    /// The current workers of the slots that are ready.
    pub(super) fn ready_current(&self) -> impl Iterator<Item = super::events::WorkerId> + '_ {
        self.slots.iter().filter_map(|s| s.current).filter(|id| {
            self.workers
                .get(id)
                .is_some_and(|w| w.state == WState::Ready)
        })
    }

    /// The current worker of `slot`, if it is ready and still listens.
    pub fn ready_worker_in(&self, slot: u32) -> Option<super::events::WorkerId> {
        let id = self.slots.get(slot as usize)?.current?;
        let w = self.workers.get(&id)?;
        (w.state == WState::Ready && !w.closed).then_some(id)
    }

    /// The slots whose current worker is ready and still listens.
    pub fn serving_slots(&self) -> std::collections::BTreeSet<u32> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.current
                    .and_then(|id| self.workers.get(&id))
                    .is_some_and(|w| w.state == WState::Ready && !w.closed)
            })
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Slots meant to run a worker: all but those stopped on purpose.
    pub(super) fn running_slots(&self) -> u32 {
        self.slots.iter().filter(|s| s.stopped.is_none()).count() as u32
    }

    /// Slots whose current worker is ready.
    pub(super) fn ready_count(&self) -> u32 {
        self.ready_current().count() as u32
    }

    fn first_start_running(&self) -> bool {
        !self.ready_sent
            && matches!(
                self.op,
                Some(Op::Start {
                    kind: StartKind::Start,
                    ..
                })
            )
    }

    /// starting, ready, reloading, reexecuting, degraded or stopping.
    pub fn state_name(&self) -> &'static str {
        if self.phase == Phase::Stopping {
            return "stopping";
        }
        if self.first_start_running() {
            return "starting";
        }
        if self.drain.is_some() {
            return "draining";
        }
        match &self.op {
            Some(Op::Reload { .. }) => "reloading",
            Some(Op::Reexec { .. }) => "reexecuting",
            _ if self.ready_count() < self.running_slots() => "degraded",
            _ => "ready",
        }
    }

    /// One line, as systemd shows it.
    pub fn status_line(&self) -> String {
        let n = self.slots.len();
        let ready = self.ready_count();
        let errored: Vec<String> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.errored.is_some())
            .map(|(i, _)| i.to_string())
            .collect();
        let mut s = match (self.phase, &self.op) {
            (Phase::Stopping, _) => format!("stopping ({} worker(s) left)", self.workers.len()),
            (_, Some(Op::Reload { total, done, .. })) => format!("reloading {done}/{total}"),
            (_, Some(Op::Reexec { .. })) => {
                format!("re-executing the manager; {ready}/{n} workers ready")
            }
            _ if self.first_start_running() => format!("starting: {ready}/{n} workers ready"),
            _ if self.drain.is_some() => format!("draining: {ready}/{n} workers ready"),
            _ => format!("{ready}/{n} workers ready"),
        };
        if !errored.is_empty() {
            s.push_str(&format!("; errored: slot {}", errored.join(", ")));
        }
        let stopped: Vec<String> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.stopped.is_some() && s.current.is_none() && s.incoming.is_none())
            .map(|(i, _)| i.to_string())
            .collect();
        if !stopped.is_empty() {
            s.push_str(&format!("; stopped: slot {}", stopped.join(", ")));
        }
        s
    }

    /// Send `STATUS=` when the line changed.
    pub(super) fn update_status(&mut self) {
        let status = self.status_line();
        if status != self.last_status {
            self.last_status = status.clone();
            self.notify(SdNotify::Status(status));
        }
    }

    /// Every slot and every worker process (replacements and draining ones too).
    pub fn snapshot(&self) -> Snapshot {
        let mut workers = Vec::new();
        for (index, slot) in self.slots.iter().enumerate() {
            let index = index as u32;
            match slot.current.and_then(|id| self.workers.get(&id)) {
                Some(w) => workers.push(WorkerInfo {
                    instance: index,
                    pid: w.pid,
                    state: w.state.name(),
                    restarts: slot.restarts,
                    started: Some(w.started),
                    status_text: w.status_text.clone(),
                    loop_delay_ms: w.loop_delay_ms,
                    replaced_memory: slot.replaced.memory,
                    replaced_memory_pressure: slot.replaced.memory_pressure,
                    replaced_hang: slot.replaced.hang,
                    replaced_reload: slot.replaced.reload,
                    replaced_oom: slot.replaced.oom,
                    last_exit: slot.last_exit,
                    outcomes: w.outcomes,
                    generation: Some(w.generation),
                    node: None,
                }),
                None => workers.push(WorkerInfo {
                    instance: index,
                    pid: 0,
                    state: if slot.errored.is_some() {
                        "errored"
                    } else if slot.stopped.is_some() {
                        "stopped"
                    } else {
                        "waiting"
                    },
                    restarts: slot.restarts,
                    started: None,
                    status_text: None,
                    loop_delay_ms: None,
                    replaced_memory: slot.replaced.memory,
                    replaced_memory_pressure: slot.replaced.memory_pressure,
                    replaced_hang: slot.replaced.hang,
                    replaced_reload: slot.replaced.reload,
                    replaced_oom: slot.replaced.oom,
                    last_exit: slot.last_exit,
                    outcomes: None,
                    generation: None,
                    node: None,
                }),
            }
        }
        for (id, w) in &self.workers {
            let is_current = self
                .slots
                .get(w.index as usize)
                .is_some_and(|s| s.current == Some(*id));
            if !is_current {
                let slot = self.slots.get(w.index as usize);
                let replaced = slot.map(|s| s.replaced).unwrap_or_default();
                // A slot scaled away first empties its accept queue, its
                // worker still running: it serves no new connection.
                let leaving = self.leaving.values().any(|ids| ids.contains(id));
                workers.push(WorkerInfo {
                    instance: w.index,
                    pid: w.pid,
                    state: if leaving { "draining" } else { w.state.name() },
                    restarts: slot.map_or(0, |s| s.restarts),
                    started: Some(w.started),
                    status_text: w.status_text.clone(),
                    loop_delay_ms: w.loop_delay_ms,
                    replaced_memory: replaced.memory,
                    replaced_memory_pressure: replaced.memory_pressure,
                    replaced_hang: replaced.hang,
                    replaced_reload: replaced.reload,
                    replaced_oom: replaced.oom,
                    last_exit: slot.and_then(|s| s.last_exit),
                    outcomes: w.outcomes,
                    generation: Some(w.generation),
                    node: None,
                });
            }
        }
        workers.sort_by_key(|w| (w.instance, w.pid));
        Snapshot {
            name: self.policy.name.clone(),
            state: self.state_name(),
            instances: self.slots.len() as u32,
            ready_workers: self.ready_count(),
            status: self.status_line(),
            workers,
            counters: self.counters,
            next_cron_reload_ms: self.cron_next,
            generation: self.generation,
            health_min_ready: self.health_min_ready(),
            autoscale: self.autoscale_view().map(|v| crate::control::Autoscale {
                min: v.min,
                max: v.max,
                ceiling: v.ceiling,
                pinned: v.pinned,
            }),
            last_autopsy: None,
            history: std::sync::Arc::from("[]"),
        }
    }
}
