//! `balance: reuseport`: each slot its own SO_REUSEPORT socket, and steering
//! new connections away from a slot before it goes.
//!
//! The kernel keeps the sockets of one address in a group, an array it
//! picks a socket from for each new connection. A connection picked for a
//! socket waits in that socket's own accept queue; when the socket is closed
//! with connections still queued, they are reset (unless the operator set
//! `net.ipv4.tcp_migrate_req=1`). Scaling down used to do exactly that: the
//! slot's worker stopped accepting while the kernel kept queueing to it.
//!
//! So a slot that goes is first taken out of the picking: a classic BPF
//! program attached to the group (`SO_ATTACH_REUSEPORT_CBPF`) returns, for
//! each connection, the array index of one of the sockets that stay (by the
//! connection's hash, or a random number when the hash is 0). A UDP
//! datagram is picked on its own, so for UDP the program hashes the
//! datagram's addresses and ports itself: every datagram of a flow reaches
//! the same worker (QUIC, DNS sessions, game servers), whatever hash the
//! kernel has or lacks. The leaving
//! slot's worker then empties its queue, and only once it is empty is the
//! worker asked to stop (see the supervisor's scale-down).
//!
//! The same program evens out keep-alive connections: while some workers
//! hold fewer than their share and others as many or more (the supervisor's
//! `share`), new TCP connections are picked among the slots below it, so a
//! client a worker above its share sends away reconnects where it is
//! wanted. While the shares are even, or there is no keep-alive traffic,
//! every serving slot is picked.
//!
//! The program names sockets by their index in the kernel's array, so this
//! module keeps a model of that array: a socket is appended when it starts
//! listening, and when one leaves (its last copy closed) the last socket is
//! moved into its place, as `reuseport_detach_sock` does. The manager holds
//! a copy of every slot's socket, so a socket leaves the group exactly when
//! the manager closes it, after the slot's workers have exited: the model
//! follows the kernel. Were it ever off for a moment, an index would name
//! another live socket of the group (or none, and the kernel falls back to
//! its hash): a connection is never sent to a socket that is gone.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, RawFd};

use crate::sockets::{Kind, Listener, Template};

/// `SO_ATTACH_REUSEPORT_CBPF` (Linux 4.5), not in the libc crate for every target.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// The slots' sockets and the kernel's view of each group.
pub struct PerSlot {
    /// By slot, one socket per template (empty: not bound yet, or released).
    pub sockets: Vec<Vec<Listener>>,
    /// The id of each socket in `sockets`, in the same shape.
    ids: Vec<Vec<u64>>,
    pub templates: Vec<Template>,
    /// Per template: socket ids in the order of the kernel's array.
    groups: Vec<Vec<u64>>,
    /// Sockets of slots on their way out, by leave: steered away, still open.
    leaving: BTreeMap<u64, Vec<(u64, Listener)>>,
    next_id: u64,
    /// Slots whose worker is ready: the program picks only their sockets.
    serving: BTreeSet<u32>,
    /// Of those, the ones below their share of keep-alive connections, each
    /// with a weight, how many it lacks (empty: no preference): TCP sockets
    /// are picked among these, a slot as much more often as it weighs more,
    /// so that the connections a worker above its share closes come back
    /// where they are wanted in one go rather than over many rounds.
    preferred: BTreeMap<u32, u32>,
    /// Slots whose TCP accept queue was not empty at the last look: their
    /// worker is busy (a long handler) or hung, so a new connection would
    /// wait behind it. New TCP connections go to the others while any other
    /// serves ([`PerSlot::look_for_busy`]).
    busy: BTreeSet<u32>,
    /// Bumped whenever a slot's sockets change (see [`PerSlot::layout`]).
    layout: u64,
    /// Slots whose worker stalled (`crate::queue_watch`): none of the new
    /// connections while another slot serves, busy or not.
    stalled: BTreeSet<u32>,
    /// With one shared accept queue (the steered layout): per template,
    /// the shared socket's id in its group and a second handle on it. Every
    /// new connection goes to it, but while some workers hold fewer
    /// keep-alive connections than their share, to those workers' own
    /// sockets here, which only the manager accepts from (and hands the
    /// connections to their worker). Empty: each slot's worker accepts
    /// from its own sockets.
    shared: Vec<(u64, std::os::fd::OwnedFd)>,
    /// A program is attached to the groups: a socket that joins must be added.
    steering: bool,
    /// Steering failed once (an old kernel, a seccomp filter): said once.
    steering_failed: bool,
}

/// [`PerSlot`] across a re-exec (a re-exec waits until no slot is leaving).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PerSlotState {
    pub sockets: Vec<Vec<crate::sockets::CarriedSocket>>,
    pub templates: Vec<Template>,
    #[serde(default)]
    pub ids: Vec<Vec<u64>>,
    #[serde(default)]
    pub groups: Vec<Vec<u64>>,
    #[serde(default)]
    pub next_id: u64,
    /// The shared sockets' ids, one per template (the steered layout).
    #[serde(default)]
    pub shared_ids: Vec<u64>,
}

impl PerSlotState {
    /// Refuse a layout the model could not follow: every slot's sockets
    /// named once, one per template, each in its template's group exactly
    /// once. A re-exec checks this before it commits (an older state
    /// without the groups would index out of bounds at the next scale-up).
    pub fn validate(&self) -> Result<(), String> {
        let bad = |why: String| Err(format!("the reuseport sockets' layout: {why}"));
        let n = self.templates.len();
        if self.ids.len() != self.sockets.len() {
            return bad(format!(
                "{} slots of sockets but {} of ids",
                self.sockets.len(),
                self.ids.len()
            ));
        }
        if self.groups.len() != n {
            return bad(format!(
                "{n} addresses but {} groups (a state from a nodeherd that did not model them; restart the service instead)",
                self.groups.len()
            ));
        }
        let mut seen = BTreeSet::new();
        if !self.shared_ids.is_empty() && self.shared_ids.len() != n {
            return bad(format!(
                "{n} addresses but {} shared sockets",
                self.shared_ids.len()
            ));
        }
        for (t, id) in self.shared_ids.iter().enumerate() {
            if !seen.insert(*id) || *id > self.next_id {
                return bad(format!("socket id {id} is repeated or beyond the next one"));
            }
            if self.groups[t].iter().filter(|g| *g == id).count() != 1 {
                return bad(format!("shared socket id {id} is not once in its group"));
            }
        }
        for (slot, (socks, ids)) in self.sockets.iter().zip(&self.ids).enumerate() {
            if socks.len() != ids.len() || !(socks.is_empty() || socks.len() == n) {
                return bad(format!(
                    "slot {slot} has {} sockets and {} ids for {n} addresses",
                    socks.len(),
                    ids.len()
                ));
            }
            for (t, id) in ids.iter().enumerate() {
                if !seen.insert(*id) || *id > self.next_id {
                    return bad(format!("socket id {id} is repeated or beyond the next one"));
                }
                if self.groups[t].iter().filter(|g| *g == id).count() != 1 {
                    return bad(format!("socket id {id} is not once in its group"));
                }
            }
        }
        let grouped: usize = self.groups.iter().map(Vec::len).sum();
        if grouped != seen.len() {
            return bad(format!(
                "the groups hold {grouped} sockets, the slots {}",
                seen.len()
            ));
        }
        Ok(())
    }
}

impl PerSlot {
    /// Slot 0 gets `listeners`, already bound and listening.
    pub fn new(listeners: Vec<Listener>) -> PerSlot {
        let templates: Vec<Template> = listeners.iter().map(Template::from).collect();
        let ids: Vec<u64> = (1..=listeners.len() as u64).collect();
        PerSlot {
            groups: ids.iter().map(|id| vec![*id]).collect(),
            next_id: ids.len() as u64 + 1,
            ids: vec![ids],
            sockets: vec![listeners],
            templates,
            leaving: BTreeMap::new(),
            serving: Default::default(),
            preferred: Default::default(),
            busy: Default::default(),
            layout: 0,
            stalled: Default::default(),
            shared: Vec::new(),
            steering: false,
            steering_failed: false,
        }
    }

    /// The steered layout: `shared` are the sockets every worker accepts
    /// from; each slot gets sockets of its own (bound on its first
    /// [`PerSlot::for_slot`]) that only the manager accepts from, for the
    /// connections steered to that slot's worker.
    pub fn steered(shared: &[Listener]) -> std::io::Result<PerSlot> {
        let templates: Vec<Template> = shared.iter().map(Template::from).collect();
        let ids: Vec<u64> = (1..=shared.len() as u64).collect();
        let handles = shared
            .iter()
            .zip(&ids)
            .map(|(l, id)| Ok((*id, l.fd.try_clone()?)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut p = PerSlot::new(Vec::new());
        p.groups = ids.iter().map(|id| vec![*id]).collect();
        p.next_id = ids.len() as u64 + 1;
        p.ids = Vec::new();
        p.sockets = Vec::new();
        p.templates = templates;
        p.shared = handles;
        // From the first sibling on, the shared queue is picked unless told
        // otherwise, whatever the workers are doing.
        p.steer();
        Ok(p)
    }

    /// The slots' sockets are the manager's to accept from (the steered
    /// layout), not their workers'.
    pub fn held(&self) -> bool {
        !self.shared.is_empty()
    }

    /// The slots whose worker is ready now. New connections go to their
    /// sockets only: a slot whose worker crashed, or is still starting, gets
    /// none until it serves again (what its queue already holds waits for it).
    /// While `preferred` (a part of them) is not empty, new TCP connections
    /// go to its slots only: the workers below their share of keep-alive
    /// connections (see the supervisor's `share`).
    pub fn set_serving(&mut self, serving: BTreeSet<u32>, mut preferred: BTreeMap<u32, u32>) {
        preferred.retain(|slot, weight| serving.contains(slot) && *weight > 0);
        if serving != self.serving || preferred != self.preferred {
            self.serving = serving;
            self.preferred = preferred;
            self.steer();
        }
    }

    /// The slots whose TCP accept queue holds connections (their worker
    /// is in a long handler, or hung): new TCP connections go to the others
    /// while any other serves. Seen by `crate::queue_watch`.
    pub fn set_busy(&mut self, busy: BTreeSet<u32>) {
        if busy != self.busy {
            self.busy = busy;
            self.steer();
        }
    }

    /// The slots whose worker stalled; see `stalled`.
    pub fn set_stalled(&mut self, stalled: BTreeSet<u32>) {
        if stalled != self.stalled {
            self.stalled = stalled;
            self.steer();
        }
    }

    /// Second handles on every slot's TCP sockets, each with its place
    /// among the slot's sockets, for `crate::queue_watch` to look at.
    pub fn tcp_sockets(&self) -> BTreeMap<u32, Vec<(usize, std::os::fd::OwnedFd)>> {
        self.sockets
            .iter()
            .enumerate()
            .map(|(slot, socks)| {
                let fds = socks
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.kind == Kind::Tcp)
                    .filter_map(|(place, l)| Some((place, l.fd.try_clone().ok()?)))
                    .collect();
                (slot as u32, fds)
            })
            .collect()
    }

    /// Changes whenever a slot's sockets do (bound, released, gone).
    pub fn layout(&self) -> u64 {
        self.layout
    }

    /// Whether any slot has TCP sockets to look at.
    pub fn has_tcp(&self) -> bool {
        self.templates.iter().any(|t| t.kind == Kind::Tcp)
    }

    /// The sockets of slot `index`, bound (and so appended to each group)
    /// the first time.
    pub fn for_slot(&mut self, index: u32) -> crate::sockets::SlotResult<&[Listener]> {
        let i = index as usize;
        if self.sockets.len() <= i {
            self.sockets.resize_with(i + 1, Vec::new);
            self.ids.resize_with(i + 1, Vec::new);
        }
        if self.sockets[i].is_empty() && !self.templates.is_empty() {
            let bound = self
                .templates
                .iter()
                .map(crate::sockets::bind_sibling)
                .collect::<Result<Vec<_>, _>>()?;
            let ids: Vec<u64> = (0..bound.len())
                .map(|_| {
                    self.next_id += 1;
                    self.next_id
                })
                .collect();
            for (t, id) in ids.iter().enumerate() {
                self.groups[t].push(*id);
            }
            self.sockets[i] = bound;
            self.layout += 1;
            self.ids[i] = ids;
            if self.steering || self.held() {
                self.steer();
            }
        }
        Ok(&self.sockets[i])
    }

    /// Close a slot's sockets now (it errored: no worker accepts from them).
    pub fn release(&mut self, index: u32) {
        let taken = self.take(index);
        self.close(taken);
    }

    /// Slot `index` goes: steer new connections away from its sockets and
    /// keep them open (its worker still accepts what they hold) under `leave`.
    pub fn leave(&mut self, index: u32, leave: u64) {
        let taken = self.take(index);
        if taken.is_empty() {
            return;
        }
        self.leaving.insert(leave, taken);
        self.steer();
    }

    /// Connections waiting in the accept queues of a leave's sockets.
    pub fn queued(&self, leave: u64) -> u32 {
        self.leaving
            .get(&leave)
            .map_or(0, |s| s.iter().map(|(_, l)| accept_queue(l)).sum())
    }

    /// Second handles on a leave's sockets, to watch their queues from a task.
    pub fn leaving_fds(&self, leave: u64) -> Vec<(Kind, std::os::fd::OwnedFd)> {
        self.leaving.get(&leave).map_or_else(Vec::new, |s| {
            s.iter()
                .filter_map(|(_, l)| Some((l.kind, l.fd.try_clone().ok()?)))
                .collect()
        })
    }

    /// Close a leave's sockets (its workers have exited).
    pub fn close_leaving(&mut self, leave: u64) {
        if let Some(taken) = self.leaving.remove(&leave) {
            self.close(taken);
        }
    }

    /// Whether any slot is on its way out.
    pub fn any_leaving(&self) -> bool {
        !self.leaving.is_empty()
    }

    fn take(&mut self, index: u32) -> Vec<(u64, Listener)> {
        self.layout += 1;
        let i = index as usize;
        let (Some(s), Some(ids)) = (self.sockets.get_mut(i), self.ids.get_mut(i)) else {
            return Vec::new();
        };
        std::mem::take(ids)
            .into_iter()
            .zip(std::mem::take(s))
            .collect()
    }

    /// Close sockets and follow the kernel: the last of each group moves
    /// into the place of the one that left.
    fn close(&mut self, taken: Vec<(u64, Listener)>) {
        if taken.is_empty() {
            return;
        }
        for (id, listener) in taken {
            drop(listener);
            for g in &mut self.groups {
                if let Some(pos) = g.iter().position(|x| *x == id) {
                    g.swap_remove(pos);
                }
            }
        }
        self.steer();
    }

    /// Attach to each group a program that picks among the sockets of the
    /// slots that serve (for TCP, of the preferred ones while there are some).
    fn steer(&mut self) {
        let ids_of = |slots: &BTreeSet<u32>| -> BTreeSet<u64> {
            self.ids
                .iter()
                .enumerate()
                .filter(|(slot, _)| slots.contains(&(*slot as u32)))
                .flat_map(|(_, ids)| ids.iter().copied())
                .collect()
        };
        if self.held() {
            // One shared queue, but steered connections go to the sockets
            // of the workers below their share.
            let live: BTreeSet<u64> = if self.preferred.is_empty() {
                self.shared.iter().map(|(id, _)| *id).collect()
            } else {
                ids_of(&self.preferred.keys().copied().collect())
            };
            for (t, group) in self.groups.iter().enumerate() {
                let indexes = weighted(
                    group
                        .iter()
                        .enumerate()
                        .filter(|(_, id)| live.contains(id))
                        .map(|(i, id)| (i as u32, self.weight(*id))),
                );
                let Some((_, member)) = self.shared.get(t) else {
                    continue;
                };
                if indexes.is_empty() {
                    continue;
                }
                let member = member.as_raw_fd();
                Self::attach_or_say(
                    (&mut self.steering, &mut self.steering_failed),
                    member,
                    &indexes,
                    Spread::PerConnection,
                    "keep-alive connections even out more slowly",
                );
            }
            return;
        }
        let serving = ids_of(&self.serving);
        // A new TCP connection goes where it need not wait: among the slots
        // whose queue is empty, while there are some.
        let free = |slots: &BTreeSet<u32>| -> BTreeSet<u32> {
            let live: BTreeSet<u32> = slots.difference(&self.stalled).copied().collect();
            let free: BTreeSet<u32> = live.difference(&self.busy).copied().collect();
            // All busy: any that is not stalled; all stalled: any at all.
            if !free.is_empty() {
                free
            } else if !live.is_empty() {
                live
            } else {
                slots.clone()
            }
        };
        let tcp_live = if self.preferred.is_empty() {
            ids_of(&free(&self.serving))
        } else {
            ids_of(&free(&self.preferred.keys().copied().collect()))
        };
        for (t, group) in self.groups.iter().enumerate() {
            let tcp = self.templates.get(t).is_some_and(|x| x.kind == Kind::Tcp);
            let spread = if tcp {
                Spread::PerConnection
            } else {
                Spread::PerFlow
            };
            let live = if tcp { &tcp_live } else { &serving };
            // A flow stays where it is: weights are for new connections.
            let indexes = weighted(
                group
                    .iter()
                    .enumerate()
                    .filter(|(_, id)| live.contains(id))
                    .map(|(i, id)| (i as u32, if tcp { self.weight(*id) } else { 1 })),
            );
            // Any socket of the group sets the group's program.
            let Some(member) = self
                .sockets
                .iter()
                .find_map(|s| s.get(t))
                .map(|l| l.fd.as_raw_fd())
            else {
                continue;
            };
            if indexes.is_empty() {
                continue;
            }
            Self::attach_or_say(
                (&mut self.steering, &mut self.steering_failed),
                member,
                &indexes,
                spread,
                "connections queued for a slot that goes may be reset unless net.ipv4.tcp_migrate_req=1",
            );
        }
    }

    /// How often the socket `id` is to be picked among the preferred: its
    /// slot's weight (1 while nothing is preferred).
    fn weight(&self, id: u64) -> u32 {
        self.ids
            .iter()
            .position(|ids| ids.contains(&id))
            .and_then(|slot| self.preferred.get(&(slot as u32)))
            .map_or(1, |w| *w)
    }

    /// Attach the program to `member`'s group; if the kernel refuses it
    /// (an old kernel, a seccomp filter), say so once, and what it costs.
    fn attach_or_say(
        (steering, failed): (&mut bool, &mut bool),
        member: RawFd,
        indexes: &[u32],
        spread: Spread,
        cost: &str,
    ) {
        match attach(member, indexes, spread) {
            Ok(()) => *steering = true,
            Err(e) if !*failed => {
                *failed = true;
                crate::logs::warn(&format!(
                    "cannot steer new connections (SO_ATTACH_REUSEPORT_CBPF: {e}): {cost}"
                ));
            }
            Err(_) => {}
        }
    }

    pub fn carry(&self) -> PerSlotState {
        PerSlotState {
            sockets: self
                .sockets
                .iter()
                .map(|s| s.iter().map(Listener::carry).collect())
                .collect(),
            templates: self.templates.clone(),
            ids: self.ids.clone(),
            groups: self.groups.clone(),
            next_id: self.next_id,
            shared_ids: self.shared.iter().map(|(id, _)| *id).collect(),
        }
    }

    /// Own a layout a re-exec handed over; `shared` are the sockets every
    /// worker accepts from (the steered layout's, else none).
    pub fn adopt(state: PerSlotState, shared: &[Listener]) -> Result<PerSlot, String> {
        state.validate()?;
        if state.shared_ids.len() != shared.len() && !state.shared_ids.is_empty() {
            return Err("the steered layout's shared sockets are not all handed over".into());
        }
        let handles = state
            .shared_ids
            .iter()
            .zip(shared)
            .map(|(id, l)| Ok((*id, l.fd.try_clone().map_err(|e| e.to_string())?)))
            .collect::<Result<Vec<_>, String>>()?;
        let sockets: Vec<Vec<Listener>> = state
            .sockets
            .into_iter()
            .map(|v| v.into_iter().map(Listener::adopt).collect())
            .collect::<Result<_, _>>()?;
        Ok(PerSlot {
            sockets,
            ids: state.ids,
            templates: state.templates,
            groups: state.groups,
            leaving: BTreeMap::new(),
            serving: Default::default(),
            preferred: Default::default(),
            busy: Default::default(),
            layout: 0,
            stalled: Default::default(),
            shared: handles,
            next_id: state.next_id,
            // A program the old manager attached stays with the groups.
            steering: true,
            steering_failed: false,
        })
    }
}

/// Connections waiting to be accepted on a listening TCP socket (0 for others).
pub fn accept_queue(l: &Listener) -> u32 {
    if l.kind != Kind::Tcp {
        return 0;
    }
    queue_of(l.fd.as_raw_fd())
}

/// The accept queue of a listening TCP socket: `tcpi_unacked` of
/// `TCP_INFO` holds it for a socket in the LISTEN state.
pub fn queue_of(fd: RawFd) -> u32 {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes
    // into it and says how many.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let r = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        if r != 0 { 0 } else { info.tcpi_unacked }
    }
}

/// How the program spreads what arrives over the sockets it may pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spread {
    /// A TCP connection is picked once, at its SYN, and stays with the
    /// socket that accepts it: the kernel's hash, or a random number when
    /// it has none (loopback often has none), spreads them.
    PerConnection,
    /// A UDP datagram is picked on its own, every time: datagrams of one
    /// flow (the same 4-tuple) must reach the same worker, or QUIC, DNS
    /// sessions and game servers break. The kernel's hash is often 0 here,
    /// so the program hashes the addresses and ports itself.
    PerFlow,
}

/// The program: A = the pick's hash, A %= n, then return `indexes[A]`.
/// The most entries a program picks among: two instructions each, and
/// the kernel takes at most 4096 (`BPF_MAXINSNS`).
const MAX_ENTRIES: usize = 1024;

/// Each socket index as many times as it weighs, for [`program`] to pick
/// among (`hash % n`); past [`MAX_ENTRIES`], each once.
fn weighted(entries: impl Iterator<Item = (u32, u32)>) -> Vec<u32> {
    let entries: Vec<(u32, u32)> = entries.collect();
    let total: usize = entries.iter().map(|(_, w)| (*w).max(1) as usize).sum();
    if total > MAX_ENTRIES {
        return entries.into_iter().map(|(i, _)| i).collect();
    }
    entries
        .into_iter()
        .flat_map(|(i, w)| std::iter::repeat_n(i, w.max(1) as usize))
        .collect()
}

fn program(indexes: &[u32], spread: Spread) -> Vec<libc::sock_filter> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let ad = |off: libc::c_int| (libc::SKF_AD_OFF + off) as u32;
    let ld_abs = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let mut p = match spread {
        Spread::PerConnection => vec![
            op(ld_abs, 0, 0, ad(libc::SKF_AD_RXHASH)),
            op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, 0),
            op(ld_abs, 0, 0, ad(libc::SKF_AD_RANDOM)),
        ],
        Spread::PerFlow => flow_hash(),
    };
    p.push(op(
        libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K,
        0,
        0,
        indexes.len() as u32,
    ));
    let (last, rest) = indexes.split_last().expect("at least one socket");
    for (i, index) in rest.iter().enumerate() {
        p.push(op(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            0,
            1,
            i as u32,
        ));
        p.push(op(libc::BPF_RET | libc::BPF_K, 0, 0, *index));
    }
    p.push(op(libc::BPF_RET | libc::BPF_K, 0, 0, *last));
    p
}

/// A = a hash of the datagram's source and destination addresses and
/// ports, read from its IP header (`SKF_NET_OFF`: the program's own data
/// starts after the UDP header), then mixed so that `% n` uses every bit.
/// IPv6 ports are read right after the fixed header (a datagram with
/// extension headers still hashes the same way for its whole flow).
fn flow_hash() -> Vec<libc::sock_filter> {
    use libc::{
        BPF_ABS, BPF_ALU, BPF_B, BPF_IND, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_LDX, BPF_MEM,
        BPF_MISC, BPF_MSH, BPF_MUL, BPF_RSH, BPF_ST, BPF_TAX, BPF_W, BPF_X, BPF_XOR,
    };
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let net = |off: i32| (libc::SKF_NET_OFF + off) as u32;
    let ld = |off: i32| op(BPF_LD | BPF_W | BPF_ABS, 0, 0, net(off));
    // A ^= M[0]; M[0] = A
    let fold = || {
        [
            op(BPF_LDX | BPF_W | BPF_MEM, 0, 0, 0),
            op(BPF_ALU | BPF_XOR | BPF_X, 0, 0, 0),
            op(BPF_ST, 0, 0, 0),
        ]
    };
    let mut v4 = vec![ld(12), op(BPF_ST, 0, 0, 0), ld(16)];
    v4.extend(fold());
    // X = the IPv4 header's length; A = the word after it: both ports.
    v4.push(op(BPF_LDX | BPF_B | BPF_MSH, 0, 0, net(0)));
    v4.push(op(BPF_LD | BPF_W | BPF_IND, 0, 0, net(0)));
    v4.extend(fold());
    let mut v6 = vec![ld(8), op(BPF_ST, 0, 0, 0)];
    for off in (12..40).step_by(4).chain([40]) {
        v6.push(ld(off));
        v6.extend(fold());
    }
    let mut p = vec![
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, net(0)),
        op(BPF_ALU | BPF_RSH | BPF_K, 0, 0, 4),
        // IPv4: fall through to v4, which then jumps over v6.
        op(BPF_JMP | BPF_JEQ | BPF_K, 0, (v4.len() + 1) as u8, 4),
    ];
    p.extend(v4);
    p.push(op(BPF_JMP, 0, 0, v6.len() as u32));
    p.extend(v6);
    // Mix (a 32-bit finalizer): A ^= A >> 16; A *= K; A ^= A >> 15.
    for (shift, mul) in [(16, Some(0x85eb_ca6b_u32)), (15, None)] {
        p.push(op(BPF_MISC | BPF_TAX, 0, 0, 0));
        p.push(op(BPF_ALU | BPF_RSH | BPF_K, 0, 0, shift));
        p.push(op(BPF_ALU | BPF_XOR | BPF_X, 0, 0, 0));
        if let Some(k) = mul {
            p.push(op(BPF_ALU | BPF_MUL | BPF_K, 0, 0, k));
        }
    }
    p
}

fn attach(fd: RawFd, indexes: &[u32], spread: Spread) -> std::io::Result<()> {
    let mut filter = program(indexes, spread);
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: the kernel copies the program during the call; `filter`
    // outlives it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    fn accept_all(l: &Listener) -> u32 {
        let mut n = 0;
        while nix::sys::socket::accept(l.fd.as_raw_fd()).is_ok_and(|fd| {
            // SAFETY: accept returned a new fd nobody else owns.
            drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            true
        }) {
            n += 1;
        }
        n
    }

    /// Four slots with their sockets bound on a loopback port, and its address.
    fn four_slots() -> (PerSlot, String) {
        let first = crate::sockets::bind_all_reuseport(&["127.0.0.1:0".into()]).unwrap();
        let addr = first[0].address.clone();
        let mut p = PerSlot::new(first);
        for i in 1..4 {
            p.for_slot(i).unwrap();
        }
        (p, addr)
    }

    fn connect(addr: &str, n: usize) -> Vec<TcpStream> {
        (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect()
    }

    #[test]
    fn a_leaving_slot_gets_no_new_connection_and_the_model_follows_closes() {
        let (mut p, addr) = four_slots();
        p.set_serving((0..4).collect(), Default::default());
        let connect = |n: usize| connect(&addr, n);
        // Slot 1 leaves: nothing more is queued for it.
        p.leave(1, 7);
        let held = connect(200);
        let leaving = &p.leaving[&7][0].1;
        assert_eq!(
            accept_queue(leaving),
            0,
            "connections went to a leaving slot"
        );
        let staying: u32 = [0, 2, 3]
            .iter()
            .map(|i| accept_all(&p.sockets[*i][0]))
            .sum();
        assert_eq!(staying, 200);
        // Slot 0 (the first in the kernel's array) closes while slot 1 still
        // leaves: the last socket moves into its place, and the program must
        // follow, or it would pick slot 1's again.
        p.release(0);
        assert_eq!(p.groups[0].len(), 3);
        let held2 = connect(100);
        assert_eq!(accept_queue(&p.leaving[&7][0].1), 0, "after the move too");
        let got: u32 = [2, 3].iter().map(|i| accept_all(&p.sockets[*i][0])).sum();
        assert_eq!(got, 100, "every connection reached a socket that stays");
        // A new slot joins at the end and is picked.
        p.close_leaving(7);
        p.for_slot(4).unwrap();
        p.set_serving([2, 3, 4].into(), Default::default());
        let held3 = connect(100);
        assert!(
            accept_all(&p.sockets[4][0]) > 0,
            "the new slot gets its share"
        );
        drop((held, held2, held3));
    }

    #[test]
    fn new_tcp_connections_go_to_the_preferred_slots_while_there_are_some() {
        let (mut p, addr) = four_slots();
        let connect = |n: usize| connect(&addr, n);
        // Slots 1 and 3 are below their share: every new connection is theirs.
        p.set_serving((0..4).collect(), [(1, 1), (3, 1)].into());
        let held = connect(100);
        let got: Vec<u32> = (0..4).map(|i| accept_all(&p.sockets[i][0])).collect();
        assert_eq!((got[0], got[2]), (0, 0), "{got:?}");
        assert_eq!(got[1] + got[3], 100, "{got:?}");
        assert!(got[1] > 0 && got[3] > 0, "both preferred slots: {got:?}");
        // A preferred slot that does not serve is not picked.
        p.set_serving([0, 1, 2].into(), [(3, 1)].into());
        let held2 = connect(100);
        let got: Vec<u32> = (0..4).map(|i| accept_all(&p.sockets[i][0])).collect();
        assert_eq!(got[3], 0, "{got:?}");
        assert!(got[..3].iter().all(|n| *n > 0), "{got:?}");
        // No preference: every serving slot again.
        p.set_serving((0..4).collect(), Default::default());
        let held3 = connect(200);
        let got: Vec<u32> = (0..4).map(|i| accept_all(&p.sockets[i][0])).collect();
        assert!(got.iter().all(|n| *n > 0), "{got:?}");
        drop((held, held2, held3));
    }

    /// The steered layout: every new connection goes to the shared socket
    /// while no worker is below its share; then only to the held sockets of
    /// the slots that are.
    #[test]
    fn the_steered_layout_sends_new_connections_to_the_shared_queue_or_the_preferred_slots() {
        let shared = crate::sockets::bind_all_reuseport(&["127.0.0.1:0".into()]).unwrap();
        let addr = shared[0].address.clone();
        let mut p = PerSlot::steered(&shared).unwrap();
        assert!(p.held());
        for i in 0..4 {
            p.for_slot(i).unwrap();
        }
        p.set_serving((0..4).collect(), Default::default());
        let held = connect(&addr, 100);
        assert_eq!(accept_all(&shared[0]), 100, "all to the shared queue");
        let got: Vec<u32> = (0..4).map(|i| accept_all(&p.sockets[i][0])).collect();
        assert_eq!(got, vec![0, 0, 0, 0]);
        p.set_serving((0..4).collect(), [(1, 1), (3, 1)].into());
        let held2 = connect(&addr, 100);
        assert_eq!(accept_all(&shared[0]), 0, "none to the shared queue");
        let got: Vec<u32> = (0..4).map(|i| accept_all(&p.sockets[i][0])).collect();
        assert_eq!(got[0] + got[2], 0, "{got:?}");
        assert!(got[1] > 0 && got[3] > 0, "{got:?}");
        assert_eq!(got[1] + got[3], 100);
        // Weighted: the slot that lacks six connections gets about six
        // times as many new ones as the slot that lacks one.
        p.set_serving((0..4).collect(), [(1, 1), (3, 6)].into());
        let held3 = connect(&addr, 350);
        let got: Vec<u32> = (0..4).map(|i| accept_all(&p.sockets[i][0])).collect();
        assert_eq!(got[0] + got[2], 0, "{got:?}");
        assert!(got[3] > 3 * got[1] && got[1] > 0, "{got:?}");
        // Across a re-exec: the layout's state names the shared socket.
        let state = p.carry();
        assert_eq!(state.shared_ids.len(), 1);
        state.validate().unwrap();
        drop((held, held2, held3));
    }

    /// Datagrams waiting on a UDP socket, by sender: read them all.
    fn senders(l: &Listener) -> Vec<std::net::SocketAddr> {
        let sock = std::net::UdpSocket::from(l.fd.try_clone().unwrap());
        sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        let mut from = Vec::new();
        while let Ok((_, addr)) = sock.recv_from(&mut buf) {
            from.push(addr);
        }
        from
    }

    /// With a socket per slot, every datagram of one flow (one client
    /// socket) reaches the same slot, also on loopback where the kernel
    /// gives no receive hash; different flows still spread.
    #[test]
    fn each_udp_flow_stays_with_one_slot_and_flows_spread() {
        udp_flows_stay_put("udp:127.0.0.1:0", "127.0.0.1:0");
    }

    #[test]
    fn each_udp_flow_over_ipv6_stays_with_one_slot_too() {
        if std::net::UdpSocket::bind("[::1]:0").is_err() {
            eprintln!("no IPv6 loopback here: skipped");
            return;
        }
        udp_flows_stay_put("udp:[::1]:0", "[::1]:0");
    }

    fn udp_flows_stay_put(listen: &str, client: &str) {
        let first = crate::sockets::bind_all_reuseport(&[listen.into()]).unwrap();
        let addr = first[0].address.clone();
        let mut p = PerSlot::new(first);
        for i in 1..4 {
            p.for_slot(i).unwrap();
        }
        p.set_serving((0..4).collect(), Default::default());
        let clients: Vec<std::net::UdpSocket> = (0..16)
            .map(|_| std::net::UdpSocket::bind(client).unwrap())
            .collect();
        let mut slot_of: BTreeMap<std::net::SocketAddr, BTreeSet<usize>> = BTreeMap::new();
        let mut counted = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for round in 0..100u8 {
            for c in &clients {
                c.send_to(&[round], &addr).unwrap();
            }
            // Read each round before the next, so no receive buffer fills.
            while counted < 16 * (round as usize + 1) && std::time::Instant::now() < deadline {
                for (slot, socks) in p.sockets.iter().enumerate() {
                    for from in senders(&socks[0]) {
                        slot_of.entry(from).or_default().insert(slot);
                        counted += 1;
                    }
                }
            }
        }
        assert_eq!(counted, 1600, "every datagram arrived");
        assert_eq!(slot_of.len(), 16);
        for (from, slots) in &slot_of {
            assert_eq!(
                slots.len(),
                1,
                "the flow from {from} went to slots {slots:?}"
            );
        }
        let used: BTreeSet<usize> = slot_of.values().flatten().copied().collect();
        assert!(used.len() >= 3, "16 flows spread over slots {used:?}");
    }

    #[test]
    fn the_program_picks_only_the_given_indexes() {
        let p = program(&[0, 2], Spread::PerConnection);
        assert_eq!(p.len(), 4 + 2 + 1);
        assert_eq!(p[3].k, 2, "modulo the number of sockets that stay");
        assert_eq!(p.last().unwrap().k, 2);
    }
}
