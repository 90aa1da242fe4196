//! Sockets the manager binds on a worker's behalf, and the rules it binds by.
//!
//! A worker that listens on an address no inherited socket covers (a second
//! port, a unix path) asks the manager, which binds it once, hands the same
//! socket to every worker that asks, and keeps it across restarts and
//! reloads, as Node's cluster primary does. The manager may be root; the
//! worker's code is not trusted. So:
//!
//! - it binds with the asking worker's own rights ([`Rights`]): no
//!   privileged port without `CAP_NET_BIND_SERVICE`, no path where the
//!   worker's user may not create one, no stale socket file removed that
//!   the worker could not remove, all decided by the kernel;
//! - on a thread of its own, answered when done: a path on a filesystem
//!   that never answers holds up that request only, never supervision;
//! - never anything inside the manager's runtime directory;
//! - addresses the configuration names in `shared_listen` are bound with the
//!   manager's own rights instead, as `listen` addresses are;
//! - host names are resolved by the preload in the worker, as Node's own
//!   `listen()` does; the manager takes numeric addresses only, so no
//!   resolver ever stalls supervision;
//! - at most [`MAX_SHARED`] sockets per app;
//! - a reload closes the sockets none of its new workers asked for.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use crate::config::Allowed;
use crate::ipc::SharedAddress;
use crate::rights::{self, Rights};
use crate::sockets::{self, CarriedSocket, Listener, SocketError};
use crate::worker::WorkerId;

/// Most sockets the manager holds for one app's workers: far more than an
/// app listens on, few enough that a worker looping over `listen()` cannot
/// exhaust the manager's fds.
pub const MAX_SHARED: usize = 64;

/// One socket and who asked for it.
struct Shared {
    listener: Listener,
    /// Workers that asked for it (and were given it).
    askers: BTreeSet<WorkerId>,
    /// Bound because `shared_listen` names it, with the manager's rights.
    by_config: bool,
}

/// Most requests waiting for one address being bound (a worker that asks
/// again and again for a path on a filesystem that never answers gets
/// refusals, not a queue in the manager).
const MAX_WAITING: usize = 1024;

/// The sockets bound on workers' requests, one per address, and the
/// addresses being bound (off the supervisor's thread).
#[derive(Default)]
pub struct SharedSockets {
    bound: BTreeMap<SharedAddress, Shared>,
    /// Addresses a thread is binding, and who waits for each.
    binding: BTreeMap<SharedAddress, Vec<Waiter>>,
    /// The limit was said in the journal (once until a socket closes: a
    /// worker looping over `listen()` must not flood it).
    limit_said: bool,
}

/// Who asks, and the rules in force.
pub struct Request<'a> {
    pub pid: i32,
    /// `shared_listen` of the configuration in force.
    pub allowed: &'a [String],
    pub runtime_dir: &'a Path,
}

/// A request waiting for its answer.
#[derive(Debug, Clone, Copy)]
pub struct Waiter {
    pub worker: WorkerId,
    pub pid: i32,
    pub index: u32,
    /// The preload's number for the request.
    pub id: u64,
}

/// What a binding thread came back with.
#[derive(Debug)]
pub struct Bound {
    address: SharedAddress,
    by_config: bool,
    result: Result<Listener, Refused>,
}

/// A request the manager did not grant: the error for the app (Node's
/// `code`/`errno`), and the reason for the journal.
#[derive(Debug)]
pub struct Refused {
    pub error: io::Error,
    pub why: String,
    /// Said before: the journal needs it once.
    pub said: bool,
}

impl Refused {
    fn new(errno: i32, why: impl Into<String>) -> Refused {
        Refused {
            error: io::Error::from_raw_os_error(errno),
            why: why.into(),
            said: false,
        }
    }
}

/// The answer to a request: the socket now, or later, through [`Bound`].
pub enum Reply<'a> {
    Now(&'a Listener),
    Later,
}

impl SharedSockets {
    /// Describe them for a re-exec.
    pub fn carry(&self) -> Vec<(SharedAddress, CarriedSocket)> {
        self.bound
            .iter()
            .map(|(a, s)| (a.clone(), s.listener.carry()))
            .collect()
    }

    /// Own the sockets a re-exec handed over. Who asked for them is not
    /// handed over: see [`SharedSockets::held_by`].
    pub fn adopt(
        carried: Vec<(SharedAddress, CarriedSocket)>,
        allowed: &[String],
    ) -> Result<SharedSockets, String> {
        let mut bound = BTreeMap::new();
        for (address, c) in carried {
            let by_config = allows(allowed, &address);
            let shared = Shared {
                listener: Listener::adopt(c)?,
                askers: BTreeSet::new(),
                by_config,
            };
            bound.insert(address, shared);
        }
        Ok(SharedSockets {
            bound,
            ..SharedSockets::default()
        })
    }

    /// Count `workers` as holding every socket (the workers a re-exec
    /// handed over: what each asked for is not known, so nothing is closed
    /// before a reload has replaced them).
    pub fn held_by(&mut self, workers: impl IntoIterator<Item = WorkerId> + Clone) {
        for s in self.bound.values_mut() {
            s.askers.extend(workers.clone());
        }
    }

    /// Whether a thread is binding something (a re-exec answers those
    /// requests first, see [`SharedSockets::abandon`]).
    pub fn binding(&self) -> bool {
        !self.binding.is_empty()
    }

    /// Answer `waiter`'s request for `address`: the socket if it is bound,
    /// else start binding it on a thread with the asking worker's rights
    /// (`done` gets the outcome, for [`SharedSockets::finish`]), or say why
    /// not.
    pub fn request(
        &mut self,
        address: &SharedAddress,
        req: &Request<'_>,
        waiter: Waiter,
        done: impl FnOnce(Bound) + Send + 'static,
    ) -> Result<Reply<'_>, Refused> {
        if self.bound.contains_key(address) {
            let s = self.bound.get_mut(address).expect("found just now");
            if s.by_config && !allows(req.allowed, address) {
                return Err(Refused::new(
                    libc::EACCES,
                    "bound for `shared_listen`, which no longer names it",
                ));
            }
            s.askers.insert(waiter.worker);
            return Ok(Reply::Now(&s.listener));
        }
        if let Some(waiting) = self.binding.get_mut(address) {
            if waiting.len() >= MAX_WAITING {
                return Err(Refused::new(
                    libc::EMFILE,
                    format!("{MAX_WAITING} requests wait for this address already"),
                ));
            }
            waiting.push(waiter);
            return Ok(Reply::Later);
        }
        if self.bound.len() + self.binding.len() >= MAX_SHARED {
            let mut r = Refused::new(
                libc::EMFILE,
                format!(
                    "the manager holds {MAX_SHARED} sockets for this app's workers already, its limit \
                     (said once; a reload closes those its new workers do not listen on)"
                ),
            );
            r.said = std::mem::replace(&mut self.limit_said, true);
            return Err(r);
        }
        check_form(address)?;
        if let SharedAddress::Unix { path } = address
            && in_dir(Path::new(path), req.runtime_dir)
        {
            return Err(Refused::new(
                libc::EACCES,
                "the path is inside the manager's runtime directory",
            ));
        }
        let by_config = allows(req.allowed, address);
        // `shared_listen`: the manager's own rights, as for `listen`.
        let rights = if by_config {
            None
        } else {
            Some(Rights::of(req.pid).map_err(|e| {
                Refused::new(
                    libc::EACCES,
                    format!("cannot read the worker's credentials: {e}"),
                )
            })?)
        };
        let (addr, runtime_dir) = (address.clone(), req.runtime_dir.to_path_buf());
        Rights::spawn(rights.clone(), move |taken| {
            let result = match (taken, &rights) {
                (Err(e), _) => Err(Refused::new(
                    libc::EACCES,
                    format!(
                        "cannot take the worker's rights to bind with them: {e}; name the address in `shared_listen` to let the manager bind it"
                    ),
                )),
                (Ok(()), None) => bind(&addr, &runtime_dir).map_err(|error| Refused {
                    why: format!("bound with the manager's rights, for `shared_listen`: {error}"),
                    error,
                    said: false,
                }),
                (Ok(()), Some(r)) => {
                    bind(&addr, &runtime_dir).map_err(|e| refused_as_worker(e, &addr, r))
                }
            };
            done(Bound {
                address: addr,
                by_config,
                result,
            });
        })
        .map_err(|e| Refused::new(libc::EAGAIN, format!("cannot start a thread to bind: {e}")))?;
        self.binding.insert(address.clone(), vec![waiter]);
        Ok(Reply::Later)
    }

    /// Take a binding thread's outcome: who waited for it, and the socket
    /// (kept, theirs) or why there is none.
    pub fn finish(
        &mut self,
        bound: Bound,
    ) -> (SharedAddress, Vec<Waiter>, Result<&Listener, Refused>) {
        let waiters = self.binding.remove(&bound.address).unwrap_or_default();
        let address = bound.address;
        match bound.result {
            Err(r) => (address, waiters, Err(r)),
            // Given up on (a re-exec that then failed): nobody to hand it to.
            Ok(_) if waiters.is_empty() => (
                address,
                waiters,
                Err(Refused::new(libc::EAGAIN, "nobody waits for it any more")),
            ),
            Ok(listener) => {
                let shared = self.bound.entry(address.clone()).or_insert(Shared {
                    listener,
                    askers: BTreeSet::new(),
                    by_config: bound.by_config,
                });
                shared.askers.extend(waiters.iter().map(|w| w.worker));
                (address, waiters, Ok(&shared.listener))
            }
        }
    }

    /// Give up on the addresses being bound (a re-exec is due): their
    /// waiters, to be told so. A socket a thread binds after this is
    /// closed with the exec.
    pub fn abandon(&mut self) -> Vec<(SharedAddress, Vec<Waiter>)> {
        std::mem::take(&mut self.binding).into_iter().collect()
    }

    /// Close every socket no worker in `alive` asked for; returns what was
    /// closed (`kind address`), for the journal.
    pub fn close_unheld(&mut self, alive: impl Fn(WorkerId) -> bool) -> Vec<String> {
        let mut closed = Vec::new();
        self.bound.retain(|_, s| {
            s.askers.retain(|w| alive(*w));
            let keep = !s.askers.is_empty();
            if !keep {
                closed.push(format!("{} {}", s.listener.kind, s.listener.address));
            }
            keep
        });
        if !closed.is_empty() {
            self.limit_said = false;
        }
        closed
    }
}

/// Addresses the manager takes: numeric hosts only, absolute paths.
fn check_form(address: &SharedAddress) -> Result<(), Refused> {
    match address {
        SharedAddress::Tcp { host: Some(h), .. } if h.parse::<IpAddr>().is_err() => {
            Err(Refused::new(
                libc::EINVAL,
                format!(
                    "{h:?} is not a numeric address: the preload resolves host names in the worker, the manager binds numeric addresses only"
                ),
            ))
        }
        SharedAddress::Unix { path } if !path.starts_with('/') => Err(Refused::new(
            libc::EINVAL,
            "the path is not absolute: the preload makes it so in the worker",
        )),
        _ => Ok(()),
    }
}

/// The error a bind with the worker's rights ended in, with a hint when it
/// is the privileged-port limit.
fn refused_as_worker(e: io::Error, address: &SharedAddress, rights: &Rights) -> Refused {
    let hint = match address {
        SharedAddress::Tcp { port, .. }
            if *port > 0
                && u32::from(*port) < unprivileged_port_start()
                && rights.cap_eff & rights::CAP_NET_BIND_SERVICE == 0 =>
        {
            "; a port this low needs CAP_NET_BIND_SERVICE, which the workers lack: name the address in `shared_listen` to let the manager bind it"
        }
        _ => "",
    };
    Refused {
        why: format!(
            "bound with the worker's rights (uid {}, gid {}): {e}{hint}",
            rights.uid[1], rights.gid[1]
        ),
        error: e,
        said: false,
    }
}

/// `net.ipv4.ip_unprivileged_port_start` (1024 when unreadable).
fn unprivileged_port_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// Whether `path`, as written, is inside `dir` (once resolved, the binding
/// thread looks again).
fn in_dir(path: &Path, dir: &Path) -> bool {
    crate::config::normalize(path).starts_with(dir)
}

/// Bind `address` with the calling thread's rights. A unix path whose
/// directory, resolved, is in `runtime_dir` is refused (the directory is
/// opened once, and a stale socket is removed through that handle, so a
/// symbolic link swapped in meanwhile cannot point the removal elsewhere).
fn bind(address: &SharedAddress, runtime_dir: &Path) -> io::Result<Listener> {
    let io = |e: SocketError| match e {
        SocketError::Bind { source, .. } => source,
        other => io::Error::new(io::ErrorKind::InvalidInput, other.to_string()),
    };
    match address {
        SharedAddress::Unix { path } => bind_unix(Path::new(path), runtime_dir),
        // Node's default: every address, IPv6 and IPv4 alike.
        SharedAddress::Tcp { host: None, port } => {
            sockets::bind_with(&format!("[::]:{port}"), false)
                .or_else(|_| sockets::bind_with(&format!("0.0.0.0:{port}"), false))
                .map_err(io)
        }
        SharedAddress::Tcp {
            host: Some(h),
            port,
        } if h.contains(':') => sockets::bind_with(&format!("[{h}]:{port}"), false).map_err(io),
        SharedAddress::Tcp {
            host: Some(h),
            port,
        } => sockets::bind_with(&format!("{h}:{port}"), false).map_err(io),
    }
}

/// A listening unix socket at `path`, a stale socket file there removed
/// first (as `listen` addresses are) when these rights may remove it.
fn bind_unix(path: &Path, runtime_dir: &Path) -> io::Result<Listener> {
    use nix::fcntl::{AtFlags, OFlag, open};
    use nix::sys::stat::{Mode, SFlag, fstatat};
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    let dir: OwnedFd = open(
        parent,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))?;
    let real_runtime = std::fs::canonicalize(runtime_dir).unwrap_or_else(|_| runtime_dir.into());
    if real.starts_with(&real_runtime) {
        return Err(io::Error::from_raw_os_error(libc::EACCES));
    }
    match fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK => {
            nix::unistd::unlinkat(&dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir)?;
        }
        Ok(_) => return Err(io::Error::from_raw_os_error(libc::EADDRINUSE)),
        Err(_) => {}
    }
    let spec = format!("unix:{}", path.display());
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.bind(&socket2::SockAddr::unix(path)?)?;
    socket.listen(sockets::BACKLOG)?;
    socket.set_nonblocking(true)?;
    sockets::describe(socket.into(), spec).map_err(io::Error::other)
}

/// Whether `shared_listen` names `address`.
pub fn allows(allowed: &[String], address: &SharedAddress) -> bool {
    allowed
        .iter()
        .filter_map(|a| Allowed::parse(a).ok())
        .any(|a| names(&a, address))
}

/// Whether the `shared_listen` entry `allowed` names `address`.
fn names(allowed: &Allowed, address: &SharedAddress) -> bool {
    match (allowed, address) {
        (Allowed::Port(p), SharedAddress::Tcp { port, .. }) => p == port,
        (Allowed::Inet(ip, p), SharedAddress::Tcp { host, port }) => {
            p == port
                && match host {
                    None => ip.is_unspecified(),
                    Some(h) => h.parse::<IpAddr>().is_ok_and(|h| h == *ip),
                }
        }
        (Allowed::Unix(allowed), SharedAddress::Unix { path }) => {
            *allowed == crate::config::normalize(Path::new(path))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: Option<&str>, port: u16) -> SharedAddress {
        SharedAddress::Tcp {
            host: host.map(str::to_string),
            port,
        }
    }

    #[test]
    fn shared_listen_names_ports_addresses_and_paths() {
        let allowed: Vec<String> = ["812", "127.0.0.1:813", "[::]:814", "unix:/run/x/../a.sock"]
            .map(String::from)
            .into();
        assert!(allows(&allowed, &tcp(None, 812)));
        assert!(allows(&allowed, &tcp(Some("::1"), 812)));
        assert!(allows(&allowed, &tcp(Some("127.0.0.1"), 813)));
        assert!(!allows(&allowed, &tcp(None, 813)));
        assert!(!allows(&allowed, &tcp(Some("127.0.0.2"), 813)));
        assert!(allows(&allowed, &tcp(None, 814)));
        assert!(allows(
            &allowed,
            &SharedAddress::Unix {
                path: "/run/a.sock".into()
            }
        ));
        assert!(!allows(
            &allowed,
            &SharedAddress::Unix {
                path: "/run/b.sock".into()
            }
        ));
        for bad in [
            "localhost:80",
            "0",
            "unix:rel.sock",
            "udp:1.2.3.4:5",
            "80000",
        ] {
            assert!(Allowed::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bind_is_answered_when_its_thread_is_done_and_closed_once_unheld() {
        let mut shared = SharedSockets::default();
        let rt = std::env::temp_dir();
        let req = Request {
            pid: std::process::id() as i32,
            allowed: &[],
            runtime_dir: &rt,
        };
        let waiter = |w: u64| Waiter {
            worker: WorkerId(w),
            pid: 1,
            index: 0,
            id: w,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let addr = tcp(Some("127.0.0.1"), 0);
        for w in [1, 2] {
            let tx = tx.clone();
            let r = shared.request(&addr, &req, waiter(w), move |b| tx.send(b).unwrap());
            assert!(matches!(r, Ok(Reply::Later)));
        }
        // One thread for both.
        let bound = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert!(rx.try_recv().is_err());
        let (_, waiters, result) = shared.finish(bound);
        assert_eq!(waiters.len(), 2);
        assert!(result.unwrap().address.starts_with("127.0.0.1:"));
        // The next request has it at once.
        let r = shared.request(&addr, &req, waiter(3), |_| unreachable!());
        assert!(matches!(r, Ok(Reply::Now(_))));
        assert_eq!(
            shared.close_unheld(|w| w == WorkerId(3)),
            Vec::<String>::new()
        );
        assert_eq!(shared.close_unheld(|_| false).len(), 1);
        assert!(shared.bound.is_empty());
    }

    #[test]
    fn host_names_and_relative_paths_are_refused_unresolved() {
        let e = check_form(&tcp(Some("localhost"), 8000)).unwrap_err();
        assert_eq!(e.error.raw_os_error(), Some(libc::EINVAL));
        assert!(e.why.contains("numeric addresses only"), "{}", e.why);
        assert!(
            check_form(&SharedAddress::Unix {
                path: "a.sock".into()
            })
            .is_err()
        );
        assert!(check_form(&tcp(Some("::1"), 8000)).is_ok());
    }

    #[test]
    fn paths_in_the_runtime_directory_are_found_through_dots_and_links() {
        let rt = Path::new("/run/nodeherd-x-1");
        assert!(in_dir(Path::new("/run/nodeherd-x-1/control.sock"), rt));
        assert!(in_dir(Path::new("/run/y/../nodeherd-x-1/control.sock"), rt));
        assert!(!in_dir(Path::new("/run/nodeherd-x-10/a.sock"), rt));
        // Through a symbolic link: refused once resolved.
        let base = std::env::temp_dir().join(format!("nodeherd-shared-{}", std::process::id()));
        let rt = base.join("rt");
        std::fs::create_dir_all(&rt).unwrap();
        let link = base.join("link");
        let _ = std::os::unix::fs::symlink(&rt, &link);
        let e = bind_unix(&link.join("control.sock"), &rt).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        assert!(!rt.join("control.sock").exists());
        let _ = std::fs::remove_dir_all(&base);
    }
}
