//! The listening sockets: inherited from systemd, or bound from `--listen`.
//!
//! The manager never accepts a connection. It only holds the sockets so that
//! each worker can inherit them at fd 3 onward, and so that the kernel keeps
//! queueing connections while workers come and go: as long as one copy of a
//! listening socket is open, a connection is never refused.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{AddressFamily, SockaddrLike, SockaddrStorage, getsockname};
use socket2::{Domain, Socket, Type};

/// Why a socket could not be had. The kind decides `run`'s exit status:
/// a bad address is a usage error (2), a refused bind a runtime one (1).
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The address given cannot be used as written.
    #[error("--listen {spec}: {reason}")]
    BadAddress { spec: String, reason: String },
    /// The kernel refused the bind or listen.
    #[error("cannot listen on {spec}: {source}")]
    Bind {
        spec: String,
        source: std::io::Error,
    },
    /// An fd systemd passed is not a usable listening socket.
    #[error("inherited fd {fd}: {reason}")]
    Inherited { fd: RawFd, reason: String },
}

impl SocketError {
    /// `nodeherd run`'s exit status for this error.
    pub fn exit_status(&self) -> u8 {
        match self {
            SocketError::BadAddress { .. } | SocketError::Inherited { .. } => 2,
            SocketError::Bind { .. } => 1,
        }
    }
}

pub type Result<T, E = SocketError> = std::result::Result<T, E>;

/// What binding a slot's sockets returns.
pub type SlotResult<T> = std::result::Result<T, SocketError>;

fn bad(spec: &str, reason: impl Into<String>) -> SocketError {
    SocketError::BadAddress {
        spec: spec.to_string(),
        reason: reason.into(),
    }
}

/// Listening sockets are moved to fds at or above this number, so that
/// placing them at 3.. in a child never overwrites one still to be placed.
const HIGH_FD: RawFd = 100;

/// Backlog for sockets we bind ourselves: deep enough to hold a burst while
/// every worker is being replaced.
pub(crate) const BACKLOG: i32 = 4096;

/// What kind of socket an fd is; the shim matches `listen()` calls on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    Tcp,
    Udp,
    Unix,
    Other,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Tcp => "tcp",
            Kind::Udp => "udp",
            Kind::Unix => "unix",
            Kind::Other => "other",
        })
    }
}

/// One socket the workers inherit.
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    /// `LISTEN_FDNAMES` entry: systemd's `FileDescriptorName=`, or the `--listen` text.
    pub name: String,
    pub kind: Kind,
    /// Printable local address: `127.0.0.1:8000`, `[::1]:8000`, `/run/app.sock`.
    pub address: String,
    pub port: Option<u16>,
}

impl Listener {
    /// The same socket on a second fd (`None` if the process is out of
    /// fds): one is served, the other kept for a re-exec to carry.
    pub fn try_clone(&self) -> Option<Listener> {
        let fd = self.fd.try_clone().ok()?;
        Some(Listener {
            fd,
            name: self.name.clone(),
            kind: self.kind,
            address: self.address.clone(),
            port: self.port,
        })
    }

    /// `kind|address|port|name`, the form the shim reads from `NODEHERD_SOCKETS`.
    pub fn shim_descriptor(&self) -> String {
        format!(
            "{}|{}|{}|{}",
            self.kind,
            self.address.replace([',', '|'], "_"),
            self.port.map(|p| p.to_string()).unwrap_or_default(),
            self.name.replace([',', '|'], "_")
        )
    }
}

/// A listening socket across a re-exec: its fd number and what it is.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CarriedSocket {
    pub fd: RawFd,
    pub name: String,
    pub kind: Kind,
    pub address: String,
    pub port: Option<u16>,
}

impl Listener {
    /// Describe it for the program a re-exec starts (the fd stays ours
    /// until the exec).
    pub fn carry(&self) -> CarriedSocket {
        CarriedSocket {
            fd: self.fd.as_raw_fd(),
            name: self.name.clone(),
            kind: self.kind,
            address: self.address.clone(),
            port: self.port,
        }
    }

    /// Own a socket a re-exec handed over.
    pub fn adopt(c: CarriedSocket) -> std::result::Result<Listener, String> {
        Ok(Listener {
            fd: crate::fds::adopt(c.fd)?,
            name: c.name,
            kind: c.kind,
            address: c.address,
            port: c.port,
        })
    }
}

/// Take the sockets systemd passed (`LISTEN_FDS`), and clear the variables.
///
/// # Safety
/// Changes the process environment: call it before any thread starts.
pub unsafe fn take_inherited() -> Result<Vec<Listener>> {
    let listen_fds = std::env::var("LISTEN_FDS").ok();
    let listen_pid = std::env::var("LISTEN_PID").ok();
    let mut out = Vec::new();
    if listen_fds.is_some() {
        let ours = listen_pid.as_deref() == Some(std::process::id().to_string().as_str());
        if !ours {
            crate::logs::warn(&format!(
                "LISTEN_FDS is set but LISTEN_PID ({}) is not this process ({}): the sockets are not for us, ignoring them",
                listen_pid.as_deref().unwrap_or("unset"),
                std::process::id()
            ));
        }
        // SAFETY: the caller guarantees no other thread runs yet.
        let fds = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }.map_err(|e| {
            SocketError::Inherited {
                fd: 3,
                reason: format!("reading LISTEN_FDS/LISTEN_FDNAMES: {e}"),
            }
        })?;
        for (fd, name) in fds {
            // SAFETY: systemd passed us this fd and nothing else owns it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let l =
                describe(owned, name).map_err(|reason| SocketError::Inherited { fd, reason })?;
            out.push(l);
        }
    } else {
        // SAFETY: as above.
        unsafe {
            std::env::remove_var("LISTEN_PID");
            std::env::remove_var("LISTEN_FDNAMES");
        }
    }
    Ok(out)
}

/// Bind each `--listen` address.
pub fn bind_all(addrs: &[String]) -> Result<Vec<Listener>> {
    distinct(addrs)?;
    addrs.iter().map(|a| bind(a)).collect()
}

/// The same address given twice (`--listen 8000 --listen 0.0.0.0:8000`)
/// is a mistake in the command line or the file, said as such, not the
/// second bind's `Address already in use`. Port 0 is a new port each time.
fn distinct(addrs: &[String]) -> Result<()> {
    let key = |spec: &str| -> Option<String> {
        if let Some(path) = spec.strip_prefix("unix:") {
            return Some(format!("unix:{path}"));
        }
        let (kind, rest) = match spec.strip_prefix("udp:") {
            Some(r) => ("udp", r),
            None => ("tcp", spec.strip_prefix("tcp:").unwrap_or(spec)),
        };
        let addr = parse_inet(rest).ok().filter(|a| a.port() != 0)?;
        Some(format!("{kind}:{addr}"))
    };
    let mut seen: Vec<(String, &str)> = Vec::new();
    for a in addrs {
        let Some(k) = key(a) else { continue };
        if let Some((_, first)) = seen.iter().find(|(s, _)| *s == k) {
            let how = if *first == a.as_str() {
                "given twice".to_string()
            } else {
                format!("the same address as --listen {first}")
            };
            return Err(bad(a, format!("{how}: give each address once")));
        }
        seen.push((k, a));
    }
    Ok(())
}

/// Bind one address: `HOST:PORT`, `[::1]:PORT`, `PORT`, `unix:/path`, `udp:HOST:PORT`.
pub fn bind(spec: &str) -> Result<Listener> {
    bind_with(spec, false)
}

/// A sibling of `l` in one SO_REUSEPORT group: same address, its own queue.
/// `balance: reuseport` gives each slot one, and the kernel spreads new
/// connections over them by hash.
pub fn bind_sibling(l: &Template) -> Result<Listener> {
    let spec = match l.kind {
        Kind::Tcp => l.address.clone(),
        Kind::Udp => format!("udp:{}", l.address),
        _ => {
            return Err(bad(
                &l.address,
                format!(
                    "only TCP and UDP sockets can be balanced with SO_REUSEPORT, not {}",
                    l.kind
                ),
            ));
        }
    };
    let mut sibling = bind_with(&spec, true)?;
    sibling.name = l.name.clone();
    Ok(sibling)
}

/// What it takes to bind a socket like a given one again.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Template {
    pub kind: Kind,
    pub address: String,
    pub name: String,
}

impl From<&Listener> for Template {
    fn from(l: &Listener) -> Template {
        Template {
            kind: l.kind,
            address: l.address.clone(),
            name: l.name.clone(),
        }
    }
}

/// Whether `balance: reuseport` can work on sockets systemd passed: each
/// must be a TCP or UDP socket with `SO_REUSEPORT` (the socket unit's
/// `ReusePort=yes`), and this process must be able to add siblings to its
/// group, which the kernel allows only to the user that created the first
/// socket (systemd: root) and, below port 1024, with
/// `CAP_NET_BIND_SERVICE`. A sibling is bound (never listening, so the
/// kernel sends it no connection) and closed to find out; the answer says
/// what the units must change when it cannot.
pub fn can_balance_inherited(listeners: &[Listener]) -> std::result::Result<(), String> {
    use nix::sys::socket::{getsockopt, sockopt};
    for l in listeners {
        let what = format!(
            "the socket {:?} systemd passed ({} {})",
            l.name, l.kind, l.address
        );
        if !matches!(l.kind, Kind::Tcp | Kind::Udp) {
            return Err(format!(
                "balance reuseport: {what} is not TCP or UDP; only those can be balanced by the kernel. Use balance queue"
            ));
        }
        if !getsockopt(&l.fd, sockopt::ReusePort).unwrap_or(false) {
            return Err(format!(
                "balance reuseport: {what} has no SO_REUSEPORT: set ReusePort=yes in the .socket unit, or use balance queue"
            ));
        }
        let spec = match l.kind {
            Kind::Udp => format!("udp:{}", l.address),
            _ => l.address.clone(),
        };
        match probe_bind(&spec, true) {
            Ok(()) => {}
            Err(source) if source.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(format!(
                    "balance reuseport: cannot add sockets beside {what}: the kernel lets only the user \
                     that created a socket (systemd: root) add SO_REUSEPORT siblings to it, and this \
                     manager runs as uid {}. Run the manager as root and the workers as the app's user \
                     (the drop-in root-manager.conf in nodeherd's examples, and `uid`/`gid` naming the \
                     app's user in its config), or let nodeherd bind \
                     the address itself (--listen, no .socket unit), or use balance queue",
                    nix::unistd::geteuid()
                ));
            }
            Err(source) if source.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(format!(
                    "balance reuseport: cannot add sockets beside {what}: a port below 1024 needs \
                     CAP_NET_BIND_SERVICE (AmbientCapabilities=CAP_NET_BIND_SERVICE in the service)"
                ));
            }
            Err(e) => {
                return Err(format!(
                    "balance reuseport: cannot add sockets beside {what}: {e}"
                ));
            }
        }
    }
    Ok(())
}

/// Bind every address with SO_REUSEPORT, so that siblings can join later.
///
/// SO_REUSEPORT would also let another process of this user (a second
/// manager started for the same port by mistake) join the group without a
/// word, so each address is first bound once without it: in use already,
/// that fails as a plain bind would.
pub fn bind_all_reuseport(addrs: &[String]) -> Result<Vec<Listener>> {
    distinct(addrs)?;
    addrs
        .iter()
        .map(|a| {
            if a.starts_with("unix:") {
                return Err(bad(
                    a,
                    "balance reuseport works with TCP and UDP addresses, not unix sockets",
                ));
            }
            probe_bind(a, false).map_err(|source| SocketError::Bind {
                spec: a.clone(),
                source,
            })?;
            bind_with(a, true)
        })
        .collect()
}

/// Bind a TCP or UDP socket to `spec` (never listening) and close it: can
/// this process bind there now? Port 0 always can.
fn probe_bind(spec: &str, reuse_port: bool) -> std::io::Result<()> {
    let (udp, rest) = match spec.strip_prefix("udp:") {
        Some(r) => (true, r),
        None => (false, spec.strip_prefix("tcp:").unwrap_or(spec)),
    };
    // A bad address is for the real bind to report, with its own words.
    let Ok(addr) = parse_inet(rest) else {
        return Ok(());
    };
    if addr.port() == 0 {
        return Ok(());
    }
    let s = Socket::new(
        Domain::for_address(addr),
        if udp { Type::DGRAM } else { Type::STREAM },
        None,
    )?;
    if !udp {
        s.set_reuse_address(true)?;
    }
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        s.set_only_v6(false).ok();
    }
    s.bind(&addr.into())
}

pub(crate) fn bind_with(spec: &str, reuse_port: bool) -> Result<Listener> {
    let fail = |source: std::io::Error| SocketError::Bind {
        spec: spec.to_string(),
        source,
    };
    let socket = if let Some(path) = spec.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad(spec, "give a path after unix:"));
        }
        // A stale socket file from a previous run would make bind fail.
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            } else {
                return Err(bad(spec, format!("{path} exists and is not a socket")));
            }
        }
        let s = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(fail)?;
        s.bind(&socket2::SockAddr::unix(path).map_err(fail)?)
            .map_err(fail)?;
        s.listen(BACKLOG).map_err(fail)?;
        s
    } else {
        let (udp, rest) = match spec.strip_prefix("udp:") {
            Some(r) => (true, r),
            None => (false, spec.strip_prefix("tcp:").unwrap_or(spec)),
        };
        let addr = parse_inet(rest).map_err(|e| {
            bad(
                spec,
                format!("expected HOST:PORT, [IPv6]:PORT, PORT, unix:/path or udp:HOST:PORT ({e})"),
            )
        })?;
        let domain = Domain::for_address(addr);
        let s = Socket::new(domain, if udp { Type::DGRAM } else { Type::STREAM }, None)
            .map_err(fail)?;
        if !udp {
            s.set_reuse_address(true).map_err(fail)?;
        }
        if reuse_port {
            s.set_reuse_port(true).map_err(fail)?;
        }
        if addr.is_ipv6() {
            s.set_only_v6(false).ok();
        }
        s.bind(&addr.into()).map_err(fail)?;
        if !udp {
            s.listen(BACKLOG).map_err(fail)?;
        }
        s
    };
    // Non-blocking, as Node's cluster primary hands its sockets over. The
    // flag belongs to the socket, shared by every process holding it, and
    // a handle Node receives over IPC keeps it as it came: libuv then drains
    // the accept queue until EAGAIN, so on a blocking socket a worker would
    // sit in accept() with its event loop stopped as soon as another worker
    // took the connection.
    socket.set_nonblocking(true).map_err(fail)?;
    let fd: OwnedFd = socket.into();
    describe(fd, spec.to_string()).map_err(|reason| bad(spec, reason))
}

fn parse_inet(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Some(port) = s.strip_prefix(':').and_then(|p| p.parse::<u16>().ok()) {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    // A host name such as localhost:8000.
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| format!("{s:?} is not an address"))
}

/// Learn what an fd is, and move it out of the way of fd 3.. (close-on-exec).
pub(crate) fn describe(fd: OwnedFd, name: String) -> Result<Listener, String> {
    use nix::sys::socket::{SockType, getsockopt, sockopt};
    let raw = fd.as_raw_fd();
    let sock_type = getsockopt(&fd, sockopt::SockType).map_err(|e| format!("not a socket: {e}"))?;
    let addr: SockaddrStorage = getsockname(raw).map_err(|e| format!("getsockname: {e}"))?;
    let (kind, address, port) = match addr.family() {
        Some(AddressFamily::Inet) | Some(AddressFamily::Inet6) => {
            let sa: SocketAddr = if let Some(v4) = addr.as_sockaddr_in() {
                SocketAddr::from((v4.ip(), v4.port()))
            } else {
                let v6 = addr
                    .as_sockaddr_in6()
                    .ok_or("neither an IPv4 nor an IPv6 address")?;
                SocketAddr::from((v6.ip(), v6.port()))
            };
            let kind = match sock_type {
                SockType::Stream => Kind::Tcp,
                SockType::Datagram => Kind::Udp,
                _ => Kind::Other,
            };
            (kind, sa.to_string(), Some(sa.port()))
        }
        Some(AddressFamily::Unix) => {
            let path = addr
                .as_unix_addr()
                .and_then(|u| u.path().map(|p| p.display().to_string()))
                .unwrap_or_else(|| "(unnamed)".into());
            let kind = if sock_type == SockType::Stream {
                Kind::Unix
            } else {
                Kind::Other
            };
            (kind, path, None)
        }
        _ => (Kind::Other, "(unknown)".into(), None),
    };
    if sock_type == SockType::Stream && !getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false) {
        return Err(format!(
            "{address} is a connected socket, not a listening one (a .socket unit with Accept=yes?); nodeherd needs Accept=no"
        ));
    }
    let fd = crate::fds::dup_cloexec_above(raw, HIGH_FD)
        .map_err(|e| format!("moving the socket to a high fd: {e:#}"))?;
    Ok(Listener {
        fd,
        name,
        kind,
        address,
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_tcp_and_describes_it() {
        let l = bind("127.0.0.1:0").unwrap();
        assert_eq!(l.kind, Kind::Tcp);
        assert!(l.fd.as_raw_fd() >= HIGH_FD);
        assert!(l.address.starts_with("127.0.0.1:"));
        assert_ne!(l.port, Some(0));
        let u = bind("udp:127.0.0.1:0").unwrap();
        assert_eq!(u.kind, Kind::Udp);
    }

    #[test]
    fn reuseport_siblings_share_the_address() {
        let first = bind_all_reuseport(&["127.0.0.1:0".into()])
            .unwrap()
            .remove(0);
        let sibling = bind_sibling(&Template::from(&first)).unwrap();
        assert_eq!(first.address, sibling.address);
        // A plain bind on the same address is refused: the group is closed to strangers.
        assert!(bind(&first.address).is_err());
        assert!(bind_all_reuseport(&["unix:/tmp/x.sock".into()]).is_err());
    }

    #[test]
    fn rejects_nonsense() {
        let e = bind("not an address").unwrap_err().to_string();
        assert!(e.contains("expected HOST:PORT"), "{e}");
        assert!(bind("unix:").is_err());
    }
}
