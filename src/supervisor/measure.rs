//! What workers report of their own requests (see [`crate::outcomes`]):
//! kept per worker for status, metrics and the canary's judgement. The
//! reports are untrusted; only one that never goes down is kept, so a
//! worker can misreport itself and nothing else.

// Sans-IO: see clippy.toml.
#![deny(clippy::disallowed_methods)]

use super::core::Core;
use super::events::{Level, WorkerId};
use crate::outcomes::Outcomes;

impl Core {
    pub(super) fn on_outcomes(&mut self, id: WorkerId, reported: Outcomes) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let before = w.outcomes.unwrap_or_default();
        if reported.grew_from(&before) {
            w.outcomes = Some(reported);
            return;
        }
        if w.outcomes_refused {
            return;
        }
        w.outcomes_refused = true;
        let (index, pid) = (w.index, w.pid);
        self.log_worker(
            Level::Warning,
            index,
            pid,
            format!(
                "worker {index} (pid {pid}) reported request counts lower than before ({} requests after {}): ignored, as every such report of it will be",
                reported.requests(),
                before.requests()
            ),
        );
    }
}
