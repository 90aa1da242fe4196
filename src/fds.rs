//! File descriptors that cross an `execve`: made inheritable just before
//! it, owned again (and close-on-exec) just after.
//!
//! Every fd of the manager is close-on-exec, so workers and the programs
//! the manager runs inherit nothing by accident. A re-exec is the one
//! moment some must stay open; these helpers are shared by everything that
//! carries a socket or a channel across it, so the rules are in one place:
//! an fd handed over is named once, is above stdio, and is open.

use std::collections::BTreeSet;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

/// Set or clear `FD_CLOEXEC` on an fd this process holds.
pub fn set_cloexec(fd: RawFd, on: bool) -> nix::Result<()> {
    // SAFETY: only the flags of an fd this process holds are changed; a
    // closed one fails with EBADF.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let flags = FdFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFD)?);
    let flags = if on {
        flags | FdFlag::FD_CLOEXEC
    } else {
        flags - FdFlag::FD_CLOEXEC
    };
    fcntl(fd, FcntlArg::F_SETFD(flags)).map(|_| ())
}

/// The fds a handover names must each be named once and lie above stdio:
/// an fd named twice would be owned twice (and closed under the other
/// owner), and 0-2 are not ours to hand over.
pub fn check_handover(fds: &[RawFd]) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for &fd in fds {
        if fd <= 2 {
            return Err(format!("fd {fd} is stdio, not a handed-over fd"));
        }
        if !seen.insert(fd) {
            return Err(format!("fd {fd} is named twice"));
        }
    }
    Ok(())
}

/// A close-on-exec duplicate of `fd` numbered `min` or above (to move fds
/// out of the way of the numbers a child must get).
pub fn dup_cloexec_above(fd: RawFd, min: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads `fd`; an invalid one fails with EBADF.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let raw = fcntl(borrowed, FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: fcntl just returned this new fd, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Own a handed-over fd again (close-on-exec, as every fd of the manager).
/// The handover named it once ([`check_handover`]), so nothing else owns it.
pub fn adopt(fd: RawFd) -> Result<OwnedFd, String> {
    if fd <= 2 {
        return Err(format!("handed-over fd {fd} is stdio"));
    }
    set_cloexec(fd, true).map_err(|e| format!("handed-over fd {fd}: {e}"))?;
    // SAFETY: the old program handed this fd over and the document names it once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_and_stdio_fds_are_refused() {
        assert!(check_handover(&[3, 4, 9]).is_ok());
        assert!(check_handover(&[3, 4, 3]).unwrap_err().contains("twice"));
        assert!(check_handover(&[2, 5]).unwrap_err().contains("stdio"));
        assert!(adopt(1).is_err());
        assert!(adopt(1_000_000).is_err(), "a closed fd");
    }
}
