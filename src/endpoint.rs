//! The limits every HTTP endpoint of the manager holds to (`/metrics`,
//! `/health`, HAProxy's agent-check): any local user can connect, so a
//! client may cost a slot, a bounded head and a bounded wait, nothing more.

use std::time::Duration;

/// A request head longer than this is not a scrape.
pub const MAX_REQUEST: usize = 16 * 1024;
/// Connections served at once; one more is closed as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// The door of one endpoint: at most [`MAX_CONNECTIONS`] served at once;
/// one more is closed as soon as it is accepted (a flood of connections
/// costs the manager no fd), and said in the log at the 1st, 2nd, 4th, 8th…
pub struct Gate {
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    turned_away: u64,
    what: &'static str,
}

impl Gate {
    /// The gate of the endpoint `what` names in the log ("metrics endpoint").
    pub fn new(what: &'static str) -> Gate {
        Gate {
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
            turned_away: 0,
            what,
        }
    }

    /// A slot for a connection just accepted, held while it is served; or
    /// `None`: every slot is taken, close it unanswered.
    pub fn admit(&mut self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slot = self.slots.clone().try_acquire_owned().ok();
        if slot.is_none() {
            self.turned_away += 1;
            if self.turned_away.is_power_of_two() {
                crate::logs::warn(&format!(
                    "{}: {MAX_CONNECTIONS} connections open, {} more closed unanswered so far",
                    self.what, self.turned_away
                ));
            }
        }
        slot
    }
}
