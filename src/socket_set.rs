//! Which sockets each slot's workers inherit, as the balancing mode lays
//! them out ([`Layout`]): one set every slot shares, the same set steered
//! (each slot also has `SO_REUSEPORT` siblings the manager holds, for the
//! connections steered to its worker), or each slot its own siblings
//! ([`crate::reuseport`]). Above both `sockets` (taking and binding one
//! socket) and `reuseport` (steering among a group's sockets).

use std::os::fd::{OwnedFd, RawFd};

use crate::reuseport::{PerSlot, PerSlotState};
use crate::sockets::{CarriedSocket, Kind, Listener, Result};

/// A [`SocketSet`] across a re-exec.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SetState {
    pub shared: Vec<CarriedSocket>,
    /// `balance: reuseport`: each slot's sockets (empty: not bound yet) and
    /// what to bind a new slot's from.
    pub per_slot: Option<PerSlotState>,
}

impl SetState {
    /// Whether workers inherit any socket, as [`SocketSet::is_empty`] will
    /// say of the set this becomes.
    pub fn inherits_any(&self) -> bool {
        match &self.per_slot {
            Some(p) if p.shared_ids.is_empty() => !p.templates.is_empty(),
            _ => !self.shared.is_empty(),
        }
    }

    /// Whether each slot's workers accept from sockets of their own, as
    /// [`SocketSet::per_slot`] will say of the set this becomes.
    pub fn per_slot_sockets(&self) -> bool {
        self.per_slot
            .as_ref()
            .is_some_and(|p| p.shared_ids.is_empty())
    }

    /// Refuse a layout the new program could not run with.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.per_slot
            .as_ref()
            .map_or(Ok(()), PerSlotState::validate)
    }

    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.shared.iter().map(|s| s.fd).collect();
        if let Some(p) = &self.per_slot {
            fds.extend(p.sockets.iter().flatten().map(|s| s.fd));
        }
        fds
    }
}

/// How the sockets are laid out over the slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One set every worker accepts from (`balance: queue`, a unix socket,
    /// sockets systemd passed without room for siblings).
    Shared,
    /// One set every worker accepts from, and each slot `SO_REUSEPORT`
    /// siblings the manager holds: while some workers hold fewer keep-alive
    /// connections than their share, new connections are steered to those
    /// siblings and handed to their workers (`balance: auto` for TCP).
    /// A busy or hung worker takes nothing from the shared queue, so
    /// nothing waits behind it.
    Steered,
    /// Each slot its own siblings, which its worker accepts from
    /// (`balance: reuseport`; `auto` for UDP, so a flow stays with one
    /// worker).
    PerSlot,
}

/// The sockets workers inherit, as the [`Layout`] says: bound when a slot
/// first needs them (its own siblings) and held across its restarts and
/// reloads, so connections hashed to a slot wait for its next worker
/// instead of being refused.
pub struct SocketSet {
    shared: Vec<Listener>,
    per_slot: Option<PerSlot>,
}

impl SocketSet {
    /// `listeners` are shared (also steered), or become slot 0's.
    pub fn new(listeners: Vec<Listener>, layout: Layout) -> SocketSet {
        match layout {
            Layout::PerSlot => SocketSet {
                shared: Vec::new(),
                per_slot: Some(PerSlot::new(listeners)),
            },
            Layout::Steered => match PerSlot::steered(&listeners) {
                Ok(p) => SocketSet {
                    shared: listeners,
                    per_slot: Some(p),
                },
                Err(e) => {
                    crate::logs::warn(&format!(
                        "cannot steer connections ({e}): one shared accept queue, not steered"
                    ));
                    SocketSet::new(listeners, Layout::Shared)
                }
            },
            Layout::Shared => SocketSet {
                shared: listeners,
                per_slot: None,
            },
        }
    }

    /// Whether workers inherit any socket at all.
    pub fn is_empty(&self) -> bool {
        match &self.per_slot {
            Some(p) if !p.held() => p.templates.is_empty(),
            _ => self.shared.is_empty(),
        }
    }

    /// Whether each slot's workers accept from sockets of their own
    /// (`Layout::PerSlot`).
    pub fn per_slot(&self) -> bool {
        self.per_slot.as_ref().is_some_and(|p| !p.held())
    }

    /// Whether new connections are steered among the slots at all
    /// (`Layout::Steered` or `Layout::PerSlot`).
    pub fn steers(&self) -> bool {
        self.per_slot.is_some()
    }

    /// The sockets slot `index`'s workers inherit; a slot binds its own
    /// siblings the first time (steered: the manager's, not the workers').
    pub fn for_slot(&mut self, index: u32) -> Result<&[Listener]> {
        match &mut self.per_slot {
            None => Ok(&self.shared),
            Some(p) if p.held() => {
                if let Err(e) = p.for_slot(index) {
                    // Its worker still serves from the shared queue; it
                    // only cannot be steered to.
                    crate::logs::warn(&format!(
                        "slot {index}: cannot bind the socket connections are steered to: {e}"
                    ));
                }
                Ok(&self.shared)
            }
            Some(p) => p.for_slot(index),
        }
    }

    /// Close a reuseport slot's sockets now (the slot errored), so the
    /// kernel stops picking a queue nobody accepts from.
    pub fn release(&mut self, index: u32) {
        if let Some(p) = &mut self.per_slot {
            p.release(index);
        }
    }

    /// A reuseport slot goes: steer new connections away from its sockets,
    /// which stay open under `leave` until [`SocketSet::close_leaving`].
    pub fn leave(&mut self, index: u32, leave: u64) {
        if let Some(p) = &mut self.per_slot {
            p.leave(index, leave);
        }
    }

    /// Second handles on a leave's sockets, to watch their accept queues.
    pub fn leaving_fds(&self, leave: u64) -> Vec<(Kind, OwnedFd)> {
        self.per_slot
            .as_ref()
            .map_or_else(Vec::new, |p| p.leaving_fds(leave))
    }

    /// The slots whose worker is ready: new connections go to them only,
    /// and to the `preferred` among them (by weight) while that is not empty.
    pub fn set_serving(
        &mut self,
        serving: std::collections::BTreeSet<u32>,
        preferred: std::collections::BTreeMap<u32, u32>,
    ) {
        if let Some(p) = &mut self.per_slot {
            p.set_serving(serving, preferred);
        }
    }

    /// Slots whose accept queue holds connections; see [`PerSlot::set_busy`].
    pub fn set_busy(&mut self, busy: std::collections::BTreeSet<u32>) {
        if let Some(p) = &mut self.per_slot {
            p.set_busy(busy);
        }
    }

    /// Second handles on every slot's TCP sockets (a socket per slot), and
    /// the layout they are of; `None` with one shared queue or no TCP.
    #[allow(clippy::type_complexity)]
    pub fn tcp_sockets(
        &self,
    ) -> Option<(
        u64,
        std::collections::BTreeMap<u32, Vec<(usize, std::os::fd::OwnedFd)>>,
    )> {
        let p = self.per_slot.as_ref().filter(|p| p.has_tcp())?;
        Some((p.layout(), p.tcp_sockets()))
    }

    /// Connections waiting in the TCP accept queues workers take from (the
    /// shared sockets, and each slot's own with `balance: reuseport`; the
    /// steered layout's slot sockets are the manager's, emptied at once).
    pub fn queued(&self) -> u32 {
        use std::os::fd::AsRawFd;
        let queue = |l: &Listener| {
            if l.kind == crate::sockets::Kind::Tcp {
                crate::reuseport::queue_of(l.fd.as_raw_fd())
            } else {
                0
            }
        };
        let own: u32 = match &self.per_slot {
            Some(p) if !p.held() => p.sockets.iter().flatten().map(queue).sum(),
            _ => 0,
        };
        self.shared.iter().map(queue).sum::<u32>() + own
    }

    /// Whether the slots' own sockets are the manager's to accept from
    /// (`Layout::Steered`).
    pub fn held(&self) -> bool {
        self.per_slot.as_ref().is_some_and(PerSlot::held)
    }

    /// The layout of the slots' sockets now (see [`PerSlot::layout`]).
    pub fn layout(&self) -> Option<u64> {
        self.per_slot
            .as_ref()
            .filter(|p| p.has_tcp())
            .map(PerSlot::layout)
    }

    /// Slots whose worker stalled; see [`PerSlot::set_stalled`].
    pub fn set_stalled(&mut self, stalled: std::collections::BTreeSet<u32>) {
        if let Some(p) = &mut self.per_slot {
            p.set_stalled(stalled);
        }
    }

    /// Whether a slot's sockets are on their way out.
    pub fn any_leaving(&self) -> bool {
        self.per_slot.as_ref().is_some_and(PerSlot::any_leaving)
    }

    pub fn close_leaving(&mut self, leave: u64) {
        if let Some(p) = &mut self.per_slot {
            p.close_leaving(leave);
        }
    }

    /// Describe every socket for a re-exec.
    pub fn carry(&self) -> SetState {
        SetState {
            shared: self.shared.iter().map(Listener::carry).collect(),
            per_slot: self.per_slot.as_ref().map(PerSlot::carry),
        }
    }

    /// Own the sockets a re-exec handed over, laid out as before.
    pub fn adopt(state: SetState) -> std::result::Result<SocketSet, String> {
        let shared: Vec<Listener> = state
            .shared
            .into_iter()
            .map(Listener::adopt)
            .collect::<std::result::Result<_, _>>()?;
        let per_slot = state
            .per_slot
            .map(|p| PerSlot::adopt(p, &shared))
            .transpose()?;
        Ok(SocketSet { shared, per_slot })
    }

    /// One slot's worth of sockets, to describe them to workers (every slot
    /// has the same addresses and names).
    pub fn describe(&self) -> &[Listener] {
        match &self.per_slot {
            None => &self.shared,
            Some(p) if p.held() => &self.shared,
            Some(p) => p
                .sockets
                .iter()
                .find(|s| !s.is_empty())
                .map_or(&[], Vec::as_slice),
        }
    }
}
