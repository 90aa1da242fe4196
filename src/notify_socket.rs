//! The manager's own notify socket, where workers in any language report.
//!
//! Each worker gets `NOTIFY_SOCKET` pointing here, so `sd_notify(READY=1)`
//! (or `systemd-notify --ready`) works for a Python, Go or shell worker just
//! as it would under systemd. Senders are identified by the kernel-checked
//! peer credentials (`SO_PASSCRED`), never by what they claim: a message
//! counts only if it comes from a worker or one of its descendants (see
//! `worker::process::worker_ancestor`), and only within that worker's budget
//! (`supervisor::budget`).

use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixAddr, recvmsg, setsockopt, sockopt};
use tokio::net::UnixDatagram;

/// Largest datagram read; longer ones are truncated and then ignored.
const MAX_DATAGRAM: usize = 4096;

/// Longest `STATUS=` text kept (it ends up in the journal and on D-Bus).
pub const MAX_STATUS_CHARS: usize = 200;

/// One parsed notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The sender's pid, from the kernel.
    pub pid: i32,
    pub ready: bool,
    pub status: Option<String>,
}

/// Bind the socket at `path` (its directory is private to this manager).
pub fn bind(path: &Path) -> std::io::Result<UnixDatagram> {
    let _ = std::fs::remove_file(path);
    let sock = UnixDatagram::bind(path)?;
    setsockopt(&sock, sockopt::PassCred, &true)?;
    Ok(sock)
}

/// Wait for the next datagram and return it with its sender's pid.
pub async fn recv(sock: &UnixDatagram) -> std::io::Result<Option<Notification>> {
    loop {
        sock.readable().await?;
        let res = sock.try_io(tokio::io::Interest::READABLE, || {
            let mut buf = [0u8; MAX_DATAGRAM];
            let mut cmsg = nix::cmsg_space!(libc::ucred);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<UnixAddr>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_TRUNC,
            )
            .map_err(std::io::Error::from)?;
            let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
            let mut pid = None;
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmCredentials(cred) = c {
                    pid = Some(cred.pid());
                }
            }
            let len = msg.bytes.min(MAX_DATAGRAM);
            Ok((pid, truncated, buf[..len].to_vec()))
        });
        match res {
            Ok((Some(pid), false, bytes)) => return Ok(parse(pid, &bytes)),
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Parse `KEY=VALUE` lines; `None` when nothing in it concerns us.
pub fn parse(pid: i32, bytes: &[u8]) -> Option<Notification> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut n = Notification {
        pid,
        ready: false,
        status: None,
    };
    for line in text.lines() {
        match line.split_once('=') {
            Some(("READY", "1")) => n.ready = true,
            Some(("STATUS", s)) => n.status = Some(crate::logs::clean(s, MAX_STATUS_CHARS)),
            _ => {}
        }
    }
    (n.ready || n.status.is_some()).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ready_and_status() {
        let n = parse(7, b"READY=1\nSTATUS=warming up\n").unwrap();
        assert!(n.ready);
        assert_eq!(n.status.as_deref(), Some("warming up"));
        assert_eq!(parse(7, b"WATCHDOG=1"), None);
        assert_eq!(parse(7, b"\xff\x00READY=1"), None);
        assert_eq!(parse(7, b"READY=0"), None);
        let dirty = parse(7, b"STATUS=a\rb\x1b[2J\x00").unwrap();
        assert_eq!(dirty.status.as_deref(), Some("a b [2J "));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_datagram_parses_or_is_ignored(bytes in prop::collection::vec(any::<u8>(), 0..4096), pid in any::<i32>()) {
            if let Some(n) = parse(pid, &bytes) {
                prop_assert_eq!(n.pid, pid);
                prop_assert!(n.status.as_ref().is_none_or(|s| s.chars().count() <= MAX_STATUS_CHARS + 1 && !s.chars().any(char::is_control)));
            }
        }
    }
}
