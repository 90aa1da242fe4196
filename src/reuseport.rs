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
//! connection's hash, or a random number when the hash is 0). The leaving
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
    /// Of those, the ones below their share of keep-alive connections
    /// (empty: no preference): TCP sockets are picked among these.
    preferred: BTreeSet<u32>,
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
            steering: false,
            steering_failed: false,
        }
    }

    /// The slots whose worker is ready now. New connections go to their
    /// sockets only: a slot whose worker crashed, or is still starting, gets
    /// none until it serves again (what its queue already holds waits for it).
    /// While `preferred` (a part of them) is not empty, new TCP connections
    /// go to its slots only: the workers below their share of keep-alive
    /// connections (see the supervisor's `share`).
    pub fn set_serving(&mut self, serving: BTreeSet<u32>, preferred: BTreeSet<u32>) {
        let preferred: BTreeSet<u32> = preferred.intersection(&serving).copied().collect();
        if serving != self.serving || preferred != self.preferred {
            self.serving = serving;
            self.preferred = preferred;
            self.steer();
        }
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
            self.ids[i] = ids;
            if self.steering {
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
        let serving = ids_of(&self.serving);
        let preferred = ids_of(&self.preferred);
        for (t, group) in self.groups.iter().enumerate() {
            let tcp = self.templates.get(t).is_some_and(|x| x.kind == Kind::Tcp);
            let live = if tcp && !preferred.is_empty() {
                &preferred
            } else {
                &serving
            };
            let indexes: Vec<u32> = group
                .iter()
                .enumerate()
                .filter(|(_, id)| live.contains(id))
                .map(|(i, _)| i as u32)
                .collect();
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
            match attach(member, &indexes) {
                Ok(()) => self.steering = true,
                Err(e) if !self.steering_failed => {
                    self.steering_failed = true;
                    crate::logs::warn(&format!(
                        "cannot steer connections away from a slot that goes (SO_ATTACH_REUSEPORT_CBPF: {e}); \
                     connections queued for it when it closes may be reset unless net.ipv4.tcp_migrate_req=1"
                    ));
                }
                Err(_) => {}
            }
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
        }
    }

    pub fn adopt(state: PerSlotState) -> Result<PerSlot, String> {
        state.validate()?;
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

/// The program: A = the connection's hash (or a random number when it has
/// none), A %= n, then return `indexes[A]`.
fn program(indexes: &[u32]) -> Vec<libc::sock_filter> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let ad = |off: libc::c_int| (libc::SKF_AD_OFF + off) as u32;
    let ld_abs = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let mut p = vec![
        op(ld_abs, 0, 0, ad(libc::SKF_AD_RXHASH)),
        op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, 0),
        op(ld_abs, 0, 0, ad(libc::SKF_AD_RANDOM)),
        op(
            libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K,
            0,
            0,
            indexes.len() as u32,
        ),
    ];
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

fn attach(fd: RawFd, indexes: &[u32]) -> std::io::Result<()> {
    let mut filter = program(indexes);
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
        p.set_serving((0..4).collect(), [1, 3].into());
        let held = connect(100);
        let got: Vec<u32> = (0..4).map(|i| accept_all(&p.sockets[i][0])).collect();
        assert_eq!((got[0], got[2]), (0, 0), "{got:?}");
        assert_eq!(got[1] + got[3], 100, "{got:?}");
        assert!(got[1] > 0 && got[3] > 0, "both preferred slots: {got:?}");
        // A preferred slot that does not serve is not picked.
        p.set_serving([0, 1, 2].into(), [3].into());
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

    #[test]
    fn the_program_picks_only_the_given_indexes() {
        let p = program(&[0, 2]);
        assert_eq!(p.len(), 4 + 2 + 1);
        assert_eq!(p[3].k, 2, "modulo the number of sockets that stay");
        assert_eq!(p.last().unwrap().k, 2);
    }
}
