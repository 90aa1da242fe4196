//! Keep-alive connections shared out evenly across the workers.
//!
//! Where a new connection lands is the kernel's choice (one shared accept
//! queue: whichever worker is idle first; a socket per slot: a hash), and
//! with keep-alive a connection then stays where it landed. A load balancer
//! or a client that holds 64 connections open can so leave one worker with
//! a third of them and another with none, for as long as the connections
//! live: shares of 0/17/30/53 % were measured with 4 workers.
//!
//! So each worker's preload reports how many keep-alive connections it holds
//! (those it is not already closing; a connection counts from its second
//! request, once it is kept alive, so without keep-alive, or with a client
//! that opens a connection per request, every count is 0), and the core
//! tells every serving worker its fair share: the total divided by the
//! serving workers, rounded up. A worker above it answers the next request
//! on as many connections as it holds too many with `Connection: close`; the
//! client opens a new connection, and the kernel places it again. Nothing is cut: the response is whole and says the
//! connection ends, so the client does not reuse it. When the shares are
//! even, nothing is sent and nothing is closed.
//!
//! Where the new connection lands decides how soon the shares are even. With
//! one shared queue, most likely at an idle worker: one with fewer
//! connections. With a socket per slot the kernel hashes, and would put it
//! on any slot, as often as not one with enough; so while some workers are
//! below their share, the driver has the kernel pick only their slots
//! ([`Core::preferred_slots`], carried out by `crate::reuseport`).
//!
//! The share is a word, not a standing limit: a worker closes the surplus it
//! had when told, once, and is told again only when a later report shows it
//! still above (its connections came back to it). A standing limit made the
//! workers shed on and on: connections in transit lower every count.
//!
//! The share is worked out from the highest total of the last second, not
//! the total of the moment: a connection closed here is reported before its
//! client's new one is reported there, and were the share to drop in
//! between, every other worker would shed one too. For the same reason it is
//! rounded up.

// Sans-IO: see clippy.toml.
#![deny(clippy::disallowed_methods)]

use std::time::Duration;

use super::core::Core;
use super::events::{Effect, WorkerId};
use super::state::WState;
use super::timers::TimerKey;

/// The most a preferred slot weighs: what it lacks beyond that is as
/// many connections steered to it as its next reports show it needs.
pub const MAX_WEIGHT: u32 = 16;

/// How long a higher total of connections counts after it was seen.
pub(super) const PEAK_HOLD: Duration = Duration::from_secs(1);

impl Core {
    /// The preload reported the connections a worker holds.
    pub(super) fn on_connections(&mut self, id: WorkerId, open: u32) {
        if let Some(w) = self.workers.get_mut(&id) {
            w.conns.open = open;
            w.conns.reported = true;
            w.conns.fresh = true;
        }
    }

    /// Tell each serving worker its fair share, when that changed.
    pub(super) fn share_out(&mut self) {
        self.share_fair = None;
        if !self.policy.rebalance {
            // Turned off by a reload: limits told before are lifted.
            for (id, w) in self.workers.iter_mut() {
                if w.conns.told.take().is_some() {
                    self.out.push(Effect::Share {
                        worker: *id,
                        max: None,
                    });
                }
            }
            return;
        }
        let serving: Vec<WorkerId> = self
            .slots
            .iter()
            .filter_map(|s| s.current)
            .filter(|id| {
                self.workers.get(id).is_some_and(|w| {
                    w.state == WState::Ready && w.ipc && w.conns.reported && !w.closed
                })
            })
            .collect();
        if serving.is_empty() {
            return;
        }
        // Saturating: the counts are what workers say, and a worker may lie.
        let total = serving.iter().fold(0u32, |sum, id| {
            sum.saturating_add(self.workers[id].conns.open)
        });
        // Forgotten when the timer fires; armed only while it is higher.
        let peak = match self.share_peak {
            Some((peak, at)) if peak > total => {
                self.timers.arm(TimerKey::Share, at + PEAK_HOLD);
                peak
            }
            _ => {
                self.share_peak = Some((total, self.now));
                self.timers.cancel(TimerKey::Share);
                total
            }
        };
        // One worker alone holds everything: no limit to tell.
        let fair = (serving.len() > 1).then(|| peak.div_ceil(serving.len() as u32));
        self.share_fair = fair;
        for id in serving {
            let w = self.workers.get_mut(&id).expect("serving worker");
            let max = fair;
            // Told again when it reports more than its share: the preload
            // closes the surplus it had then, once per word.
            let over = w.conns.fresh && max.is_some_and(|m| w.conns.open > m);
            w.conns.fresh = false;
            if w.conns.told != max || over {
                w.conns.told = max;
                self.out.push(Effect::Share { worker: id, max });
            }
        }
    }

    /// With a socket per slot, the slots new connections go to while the
    /// shares are uneven: those serving below their fair share, so that a
    /// connection a worker above it closes comes back where it is wanted
    /// (the kernel's hash would put it anywhere, as often as not on a worker
    /// with enough, and the shares would even out only over many rounds).
    /// Each with a weight, the connections it lacks (at most
    /// [`MAX_WEIGHT`]): picked evenly, the one that lacks two and the one
    /// that lacks twelve would get as many, and the first would be over its
    /// share in turn. Empty while no worker or every worker is below its
    /// share (among them: no keep-alive traffic at all, every count 0): then
    /// every serving slot is picked. A worker that does not report (no
    /// preload, no HTTP server) is picked as ever, with weight 1.
    pub fn preferred_slots(&self) -> std::collections::BTreeMap<u32, u32> {
        use std::collections::BTreeMap;
        let Some(fair) = self.share_fair else {
            return BTreeMap::new();
        };
        let (mut reporting, mut below, mut silent) = (0, BTreeMap::new(), Vec::new());
        for index in self.serving_slots() {
            let Some(w) = self.slots[index as usize]
                .current
                .and_then(|id| self.workers.get(&id))
            else {
                continue;
            };
            if !(w.ipc && w.conns.reported) {
                silent.push(index);
                continue;
            }
            reporting += 1;
            if w.conns.open < fair {
                below.insert(index, (fair - w.conns.open).min(MAX_WEIGHT));
            }
        }
        if below.is_empty() || below.len() == reporting {
            return BTreeMap::new();
        }
        below.extend(silent.into_iter().map(|index| (index, 1)));
        below
    }
}
