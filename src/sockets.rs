//! The listening sockets: inherited from systemd, or bound from `--listen`.
//!
//! The manager never accepts a connection. It only holds the sockets so that
//! each worker can inherit them at fd 3 onward, and so that the kernel keeps
//! queueing connections while workers come and go: as long as one copy of a
//! listening socket is open, a connection is never refused.

use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, bail};
use nix::sys::socket::{AddressFamily, SockaddrLike, SockaddrStorage, getsockname};
use socket2::{Domain, Socket, Type};

/// Listening sockets are moved to fds at or above this number, so that
/// placing them at 3.. in a child never overwrites one still to be placed.
const HIGH_FD: RawFd = 100;

/// Backlog for sockets we bind ourselves: deep enough to hold a burst while
/// every worker is being replaced.
const BACKLOG: i32 = 4096;

/// What kind of socket an fd is; the shim matches `listen()` calls on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        let fds = unsafe { sd_notify::listen_fds_with_names_and_unset_env() }
            .context("reading LISTEN_FDS/LISTEN_FDNAMES")?;
        for (fd, name) in fds {
            // SAFETY: systemd passed us this fd and nothing else owns it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let l = describe(owned, name).with_context(|| format!("inherited fd {fd}"))?;
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
    addrs.iter().map(|a| bind(a)).collect()
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
        _ => bail!(
            "{} {}: only TCP and UDP sockets can be balanced with SO_REUSEPORT",
            l.kind,
            l.address
        ),
    };
    let mut sibling = bind_with(&spec, true)?;
    sibling.name = l.name.clone();
    Ok(sibling)
}

/// What it takes to bind a socket like a given one again.
#[derive(Debug, Clone)]
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

/// Bind every address with SO_REUSEPORT, so that siblings can join later.
pub fn bind_all_reuseport(addrs: &[String]) -> Result<Vec<Listener>> {
    addrs
        .iter()
        .map(|a| {
            if a.starts_with("unix:") {
                bail!("--listen {a}: balance reuseport works with TCP and UDP addresses, not unix sockets");
            }
            bind_with(a, true)
        })
        .collect()
}

fn bind_with(spec: &str, reuse_port: bool) -> Result<Listener> {
    let fail = |e: std::io::Error| anyhow::anyhow!("cannot listen on {spec}: {e}");
    let socket = if let Some(path) = spec.strip_prefix("unix:") {
        if path.is_empty() {
            bail!("--listen {spec}: give a path after unix:");
        }
        // A stale socket file from a previous run would make bind fail.
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            } else {
                bail!("--listen {spec}: {path} exists and is not a socket");
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
        let addr = parse_inet(rest).with_context(|| {
            format!("--listen {spec}: expected HOST:PORT, [IPv6]:PORT, PORT, unix:/path or udp:HOST:PORT")
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
    let fd: OwnedFd = socket.into();
    describe(fd, spec.to_string())
}

fn parse_inet(s: &str) -> Result<SocketAddr> {
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
        .ok_or_else(|| anyhow::anyhow!("{s:?} is not an address"))
}

/// Learn what an fd is, and move it out of the way of fd 3.. (close-on-exec).
fn describe(fd: OwnedFd, name: String) -> Result<Listener> {
    let raw = fd.as_raw_fd();
    let sock_type = getsockopt_int(raw, libc::SO_TYPE).context("not a socket")?;
    let addr: SockaddrStorage = getsockname(raw).context("getsockname")?;
    let (kind, address, port) = match addr.family() {
        Some(AddressFamily::Inet) | Some(AddressFamily::Inet6) => {
            let sa: SocketAddr = if let Some(v4) = addr.as_sockaddr_in() {
                SocketAddr::from((v4.ip(), v4.port()))
            } else {
                let v6 = addr.as_sockaddr_in6().context("IPv6 address")?;
                SocketAddr::from((v6.ip(), v6.port()))
            };
            let kind = match sock_type {
                libc::SOCK_STREAM => Kind::Tcp,
                libc::SOCK_DGRAM => Kind::Udp,
                _ => Kind::Other,
            };
            (kind, sa.to_string(), Some(sa.port()))
        }
        Some(AddressFamily::Unix) => {
            let path = addr
                .as_unix_addr()
                .and_then(|u| u.path().map(|p| p.display().to_string()))
                .unwrap_or_else(|| "(unnamed)".into());
            let kind = if sock_type == libc::SOCK_STREAM {
                Kind::Unix
            } else {
                Kind::Other
            };
            (kind, path, None)
        }
        _ => (Kind::Other, "(unknown)".into(), None),
    };
    if sock_type == libc::SOCK_STREAM && getsockopt_int(raw, libc::SO_ACCEPTCONN).unwrap_or(0) == 0
    {
        bail!(
            "{address} is a connected socket, not a listening one (a .socket unit with Accept=yes?); nodeherd needs Accept=no"
        );
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new fd we own or -1.
    let high = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, HIGH_FD) };
    if high < 0 {
        return Err(std::io::Error::last_os_error()).context("moving the socket to a high fd");
    }
    drop(fd);
    // SAFETY: `high` was just returned by fcntl and is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(high) };
    Ok(Listener {
        fd,
        name,
        kind,
        address,
        port,
    })
}

fn getsockopt_int(fd: RawFd, opt: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for the duration of the call.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(v)
    }
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
