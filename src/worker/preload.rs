//! The preload every Node worker loads, kept where no worker can change it.
//!
//! A file would not do: workers often run as the manager's own user (the
//! unit's `User=`), so any file the manager writes, a compromised worker can
//! rewrite, and the next worker (after a clean deploy and a reload) would
//! run what it planted. So the preload lives in a sealed memfd: written once,
//! then `F_SEAL_WRITE|F_SEAL_GROW|F_SEAL_SHRINK|F_SEAL_SEAL`, after which no
//! process, root included, can change its bytes or its seals. Each Node
//! worker inherits it at the fd after its IPC channel.
//!
//! Node cannot `--require` it by its `/proc/self/fd/N` path: the CommonJS
//! loader resolves a preload's real path first, and a memfd's link target
//! (`/memfd:nodeherd-preload (deleted)`) does not exist (Node 20, 22 and 24
//! alike fail with ENOENT). `--preserve-symlinks` would avoid that but
//! changes how the app's own modules resolve (pnpm layouts break). So a
//! short bootstrap rides on the command line as a `data:` URL for
//! `--import` (Node 18.18 and 20 on, what OpenTelemetry and APM agents use): it reads
//! the memfd through its path (a fresh open, so the offset every worker
//! shares is never moved), closes the inherited fd, and runs the preload as
//! a CommonJS function with `require` and `__filename`. The preload takes
//! that `--import` back out of `execArgv` and `NODE_OPTIONS`, so the app's
//! own children never load it.

use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::Arc;

use anyhow::{Context, Result};

/// The preload's source, embedded so the binary is all there is to install.
pub const SOURCE: &str = include_str!("../shim.js");

/// The memfd's name; the bootstrap checks the inherited fd carries it
/// before running anything from it.
const NAME: &str = "nodeherd-preload";

/// The sealed preload, shared by every launcher of this manager.
#[derive(Debug, Clone)]
pub struct Preload {
    fd: Arc<OwnedFd>,
}

impl Preload {
    /// Put `source` in a sealed memfd.
    pub fn new(source: &str) -> Result<Preload> {
        use nix::fcntl::{FcntlArg, SealFlag, fcntl};
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let fd = memfd_create(NAME, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
            .context("memfd_create")?;
        let mut file = std::fs::File::from(fd);
        std::io::Write::write_all(&mut file, source.as_bytes())
            .context("writing the preload into its memfd")?;
        let fd = OwnedFd::from(file);
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_WRITE
                    | SealFlag::F_SEAL_GROW
                    | SealFlag::F_SEAL_SHRINK
                    | SealFlag::F_SEAL_SEAL,
            ),
        )
        .context("sealing the preload's memfd")?;
        Ok(Preload { fd: Arc::new(fd) })
    }

    /// The memfd, to place in a worker.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The node option that loads the preload from fd `at` in the worker.
pub fn import_arg(at: RawFd) -> String {
    format!(
        "--import=data:text/javascript,{}",
        percent_encode(&bootstrap(at))
    )
}

/// The words of a command line with the preload's option shortened, for logs.
pub fn shown(arg: &str) -> &str {
    if arg.starts_with("--import=data:text/javascript,") && arg.contains(NAME) {
        "--import=<nodeherd-preload>"
    } else {
        arg
    }
}

/// An ES module that runs the preload from fd `at`, or, when that fd is not
/// the preload (a process that got `NODE_OPTIONS` but not the fd), nothing;
/// a worker (its pid is `LISTEN_PID`) says why on stderr.
fn bootstrap(at: RawFd) -> String {
    format!(
        "import{{readFileSync as r,readlinkSync as l,closeSync as c}}from'node:fs';\
         import{{createRequire as q}}from'node:module';\
         import{{compileFunction as k}}from'node:vm';\
         const f='/proc/self/fd/{at}';let s=null;\
         try{{if(l(f).startsWith('/memfd:{NAME}')){{s=r(f,'utf8');c({at})}}}}catch(e){{}}\
         if(s!==null)k(s,['require','__filename'],{{filename:f}})(q(f),f);\
         else if(process.env.LISTEN_PID===String(process.pid))\
         process.stderr.write('nodeherd: the preload is not at fd {at}: workers must inherit it from the manager\\n');"
    )
}

/// Percent-encode everything but a few characters that mean nothing in a
/// `data:` URL, in `NODE_OPTIONS` (spaces, quotes, backslashes) or to a
/// shell that shows the command line.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"(){}[];,.=:/_-'!*+<>&|".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memfd_holds_the_source_and_refuses_every_change() {
        let p = Preload::new("console.log(1)\n").unwrap();
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&p.fd()));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "console.log(1)\n");
        // Writing, appending, truncating: refused, even to root.
        let w = std::fs::OpenOptions::new().append(true).open(&path);
        if let Ok(mut f) = w {
            assert!(std::io::Write::write_all(&mut f, b"planted()").is_err());
            assert!(f.set_len(0).is_err());
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "console.log(1)\n");
    }

    #[test]
    fn the_option_has_no_space_quote_or_hash() {
        let a = import_arg(7);
        assert!(!a.contains([' ', '"', '\\', '#', '?']), "{a}");
        assert_eq!(shown(&a), "--import=<nodeherd-preload>");
        assert_eq!(shown("--inspect"), "--inspect");
    }
}
