//! A worker that floods its IPC channel is replaced.
//!
//! Its channel is already read no faster than its budget allows (see
//! [`super::budget`]), so a flood costs the manager little; but a worker
//! that sends thousands of messages a second for seconds on end is not
//! doing what an app does, and a compromised one could go on for ever. So,
//! as for a worker whose event loop is stuck: a new one first, then the
//! flooder is stopped, and the journal says why.

// Sans-IO: see clippy.toml.
#![deny(clippy::disallowed_methods)]

use super::budget::{FLOOD_SECONDS, IPC_PER_SECOND};
use super::core::Core;
use super::events::{Level, WorkerId};
use super::state::{Phase, Queued, SwapReason, WState};

impl Core {
    pub(super) fn on_flooding(&mut self, id: WorkerId) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let (index, pid, state) = (w.index, w.pid, w.state);
        if state == WState::Stopping || self.phase != Phase::Running {
            return;
        }
        let current = self
            .slots
            .get(index as usize)
            .is_some_and(|s| s.current == Some(id));
        let what = format!(
            "worker {index} (pid {pid}) floods its IPC channel: more than {IPC_PER_SECOND} messages a second for {FLOOD_SECONDS} s (it was read no faster)"
        );
        if state == WState::Ready && current {
            self.log_worker(
                Level::Warning,
                index,
                pid,
                format!("{what}; replacing it without downtime"),
            );
            self.queue
                .push_back(Queued::ReloadSlots(vec![index], SwapReason::Flood));
        } else {
            // Not serving yet (or a reload's replacement): no one to wait for.
            self.log_worker(Level::Warning, index, pid, format!("{what}; killing it"));
            self.kill_worker(id, "it flooded its IPC channel");
        }
    }
}
