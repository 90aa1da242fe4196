//! Who log files are opened, created, renamed and removed as.
//!
//! The manager writes the files, but a path comes from the ecosystem file,
//! whose author is trusted as far as the app's user and never as root. A
//! root manager whose workers run as another user (`uid`/`gid`) would
//! otherwise append what its workers print to any file root may write
//! (`out_file: "/etc/cron.d/x"`). So every path operation on a log file
//! runs on a thread that holds the workers' credentials
//! ([`crate::rights`]): the kernel allows exactly what the app's
//! user could do, and files are created as that user. Writing to a file
//! once opened needs no rights. When the workers run as the manager's own
//! user, nothing changes and nothing is spawned.

use std::io;

use crate::config::Credentials;
use crate::rights::Rights;

/// The rights log files are handled with: the manager's own (`None`) or
/// the workers'.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner(Option<Rights>);

impl Owner {
    /// The workers' user when they run as another one than the manager.
    pub fn of(credentials: Option<&Credentials>) -> Owner {
        let Some(c) = credentials else {
            return Owner(None);
        };
        let mut groups = c.groups.clone();
        groups.sort_unstable();
        groups.dedup();
        let rights = Rights {
            uid: [c.uid; 4],
            gid: [c.gid; 4],
            groups,
            cap_eff: 0,
        };
        let same = Rights::own().is_ok_and(|own| own.uid == rights.uid && own.gid == rights.gid);
        Owner((!same).then_some(rights))
    }

    /// Who, in words.
    pub fn describe(&self) -> String {
        match &self.0 {
            None => format!("uid {}", nix::unistd::geteuid()),
            Some(r) => format!("uid {}, the workers' user", r.uid[1]),
        }
    }

    /// Run `f` with these rights and wait for it.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let Some(rights) = &self.0 else {
            return f();
        };
        let (tx, rx) = std::sync::mpsc::channel();
        Rights::spawn(Some(rights.clone()), move |taken| {
            let _ = tx.send(taken.and_then(|()| f()));
        })?;
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::other("the thread with the workers' rights died")))
    }

    /// Run `f` on a thread of its own with these rights; never with the
    /// manager's instead, if they cannot be taken.
    pub fn spawn_thread(&self, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
        match &self.0 {
            None => std::thread::Builder::new()
                .name("log-rotation".into())
                .spawn(f)
                .map(drop),
            Some(rights) => Rights::spawn(Some(rights.clone()), move |taken| match taken {
                Ok(()) => f(),
                Err(e) => super::warn(&format!(
                    "log rotation: cannot take the workers' rights ({e}): rotated files are \
                     neither compressed nor removed"
                )),
            }),
        }
    }
}
