//! A worker's rights as the kernel sees them, and doing something with
//! exactly those rights.
//!
//! The manager binds addresses on workers' requests (see [`crate::shared`])
//! and may run as root while its workers run as `nobody`. To bind no more
//! than a worker could bind itself, the bind runs on a short-lived thread
//! that first takes the worker's credentials: its uids, gids, supplementary
//! groups and effective capabilities, read from `/proc/PID/status`. Linux
//! keeps credentials per thread, so raw system calls (not libc's wrappers,
//! which change every thread of the process) change that thread alone, and
//! the kernel then applies every rule it would apply to the worker: the
//! privileged-port limit (`net.ipv4.ip_unprivileged_port_start` and
//! `CAP_NET_BIND_SERVICE`), search and write permission on every directory
//! of a unix path, the sticky bit on unlink. The thread ends with the bind,
//! and its credentials with it.
//!
//! When the worker's rights are the manager's own (the usual case: one
//! user for both), nothing changes: no privileged system call is made, so a
//! unit's `SystemCallFilter=~@privileged` costs nothing.

use std::io;

/// Credentials of one task: what the kernel checks a bind against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rights {
    /// Real, effective, saved and filesystem uid.
    pub uid: [u32; 4],
    /// Real, effective, saved and filesystem gid.
    pub gid: [u32; 4],
    /// Supplementary groups, sorted.
    pub groups: Vec<u32>,
    /// Effective capabilities (bit n: capability n).
    pub cap_eff: u64,
}

/// `CAP_NET_BIND_SERVICE`'s bit.
pub const CAP_NET_BIND_SERVICE: u64 = 1 << 10;

impl Rights {
    /// The rights of process `pid` (its main thread).
    pub fn of(pid: i32) -> io::Result<Rights> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        parse(&text).ok_or_else(|| io::Error::other(format!("/proc/{pid}/status: unreadable")))
    }

    /// The rights of the calling thread.
    pub fn own() -> io::Result<Rights> {
        let text = std::fs::read_to_string("/proc/thread-self/status")?;
        parse(&text).ok_or_else(|| io::Error::other("/proc/thread-self/status: unreadable"))
    }

    /// Whether these rights cover everything `other` may do: the same ids
    /// and at least its capabilities.
    fn covers(&self, other: &Rights) -> bool {
        self.uid == other.uid
            && self.gid == other.gid
            && self.groups == other.groups
            && self.cap_eff & other.cap_eff == other.cap_eff
    }

    /// Run `f` on a thread of its own that has these rights and no others
    /// (`None`: the manager's own), off the caller's thread: what `f` does
    /// may block (a path on a hung or hostile filesystem) without holding
    /// the caller up. `f` learns whether the rights could be taken, and
    /// runs either way, to report it.
    pub fn spawn(
        rights: Option<Rights>,
        f: impl FnOnce(io::Result<()>) + Send + 'static,
    ) -> io::Result<()> {
        std::thread::Builder::new()
            .name("bind-for-worker".into())
            .spawn(move || {
                let taken = match &rights {
                    None => Ok(()),
                    Some(r) => {
                        Rights::own().and_then(|own| if r.covers(&own) { Ok(()) } else { r.take() })
                    }
                };
                f(taken)
            })
            .map(drop)
    }

    /// Make the calling thread's credentials these (see the module doc).
    fn take(&self) -> io::Result<()> {
        let own = Rights::own()?;
        let step = |what: &'static str, rc: libc::c_long| -> io::Result<()> {
            if rc < 0 {
                let e = io::Error::last_os_error();
                Err(io::Error::new(e.kind(), format!("{what}: {e}")))
            } else {
                Ok(())
            }
        };
        // SAFETY (every block below): raw system calls on this thread's own
        // credentials, with valid pointers to live locals.
        if own.uid != self.uid && self.cap_eff != 0 {
            // Capabilities survive the uid change only with keep-caps.
            step("prctl(PR_SET_KEEPCAPS)", unsafe {
                libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) as libc::c_long
            })?;
        }
        if own.groups != self.groups {
            step("setgroups", unsafe {
                libc::syscall(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr())
            })?;
        }
        if own.gid != self.gid {
            let [r, e, s, fs] = self.gid;
            step("setresgid", unsafe {
                libc::syscall(libc::SYS_setresgid, r, e, s)
            })?;
            unsafe { libc::syscall(libc::SYS_setfsgid, fs) };
        }
        if own.uid != self.uid {
            let [r, e, s, fs] = self.uid;
            step("setresuid", unsafe {
                libc::syscall(libc::SYS_setresuid, r, e, s)
            })?;
            unsafe { libc::syscall(libc::SYS_setfsuid, fs) };
        }
        let (_, permitted) = capabilities()?;
        let keep = self.cap_eff & permitted;
        step("capset", unsafe { set_capabilities(keep) })?;
        // setfsuid/setfsgid say nothing when they refuse: look.
        let now = Rights::own()?;
        let want = Rights {
            cap_eff: keep,
            ..self.clone()
        };
        if now != want {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("could not take the worker's credentials ({want:?}; have {now:?})"),
            ));
        }
        Ok(())
    }
}

/// Parse `/proc/PID/status`.
fn parse(text: &str) -> Option<Rights> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let ids = |name: &str| -> Option<[u32; 4]> {
        let v: Vec<u32> = field(name)?
            .split_whitespace()
            .map(|w| w.parse().ok())
            .collect::<Option<_>>()?;
        v.try_into().ok()
    };
    let mut groups: Vec<u32> = field("Groups:")?
        .split_whitespace()
        .map(|w| w.parse().ok())
        .collect::<Option<_>>()?;
    groups.sort_unstable();
    groups.dedup();
    Some(Rights {
        uid: ids("Uid:")?,
        gid: ids("Gid:")?,
        groups,
        cap_eff: u64::from_str_radix(field("CapEff:")?, 16).ok()?,
    })
}

const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's (effective, permitted) capabilities.
fn capabilities() -> io::Result<(u64, u64)> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData for version 3, as given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
    ))
}

/// Make `caps` the calling thread's effective and permitted set, nothing
/// inheritable. Returns the raw system call's result.
///
/// # Safety
/// Changes this thread's credentials: only on a thread that ends after.
unsafe fn set_capabilities(caps: u64) -> libc::c_long {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let split = |i: usize| CapData {
        effective: (caps >> (32 * i)) as u32,
        permitted: (caps >> (32 * i)) as u32,
        inheritable: 0,
    };
    let data = [split(0), split(1)];
    // SAFETY: capset reads two CapData for version 3, as given.
    unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_status_file() {
        let r = parse(
            "Name:\tnode\nUid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\n\
             Groups:\t65534 4 \nCapEff:\t0000000000000400\n",
        )
        .unwrap();
        assert_eq!(r.uid, [65534; 4]);
        assert_eq!(r.groups, vec![4, 65534]);
        assert_eq!(r.cap_eff, CAP_NET_BIND_SERVICE);
        assert!(parse("Uid:\t1\n").is_none());
        assert!(Rights::own().is_ok());
    }

    /// The rights a thread started with `rights` has.
    fn seen_with(rights: Option<Rights>) -> Rights {
        let (tx, rx) = std::sync::mpsc::channel();
        Rights::spawn(rights, move |taken| {
            let _ = tx.send(taken.and_then(|()| Rights::own()));
        })
        .unwrap();
        rx.recv().unwrap().unwrap()
    }

    #[test]
    fn a_thread_has_the_rights_it_was_given_and_the_caller_keeps_its_own() {
        let own = Rights::own().unwrap();
        assert_eq!(seen_with(None), own);
        assert_eq!(seen_with(Some(own.clone())), own);
        // Fewer capabilities: a thread without them.
        let fewer = Rights {
            cap_eff: 0,
            ..own.clone()
        };
        assert_eq!(seen_with(Some(fewer)).cap_eff, 0);
        if own.uid[1] == 0 {
            let nobody = Rights {
                uid: [65534; 4],
                gid: [65534; 4],
                groups: vec![65534],
                cap_eff: 0,
            };
            assert_eq!(seen_with(Some(nobody.clone())), nobody);
        }
        assert_eq!(Rights::own().unwrap(), own, "the caller is untouched");
    }
}
