//! The managers' private runtime directories, and why another local user
//! can neither hang, mislead nor squat them.
//!
//! Without `RUNTIME_DIRECTORY` or `$XDG_RUNTIME_DIR` a manager keeps its
//! directory in the temporary directory, which every local user can write.
//! So nothing found there is read before its type and owner are known
//! (opened with `O_NOFOLLOW|O_NONBLOCK`, checked with `fstat`, read up to a
//! few bytes: a FIFO, a symlink to `/dev/zero` or a huge file planted by
//! someone else cannot hang or bloat a manager), and in such a shared base
//! a directory's name ends in a random part (`nodeherd-APP-PID.RANDOM`) that
//! nobody can plant ahead. A base of one's own keeps the plain
//! `nodeherd-APP-PID`, which tools and tests look for.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};

/// The most a pid file can hold: a pid and a newline.
const PID_FILE_MAX: usize = 32;

/// `nodeherd-<app>-`: the name of a manager's private directory, before its pid.
pub fn prefix(app: &str) -> String {
    let safe: String = app
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("nodeherd-{safe}-")
}

/// The pid a directory name `nodeherd-<app>-<pid>[.<random>]` carries,
/// given its prefix (or any app's, with `None`).
pub fn pid_in(name: &str, prefix: Option<&str>) -> Option<u32> {
    let rest = match prefix {
        Some(p) => name.strip_prefix(p)?,
        None => name.strip_prefix("nodeherd-")?.rsplit('-').next()?,
    };
    let pid = rest.split_once('.').map_or(rest, |(pid, _)| pid);
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok().filter(|p| *p > 0)
}

/// Where managers keep their private directories: systemd's
/// `RuntimeDirectory=`, else `$XDG_RUNTIME_DIR`, else the temporary
/// directory. A directory that belongs to neither this user nor root is
/// passed over (`sudo` keeps the caller's `$XDG_RUNTIME_DIR`: root's
/// manager must not live where that user can rename its entries).
pub fn base() -> PathBuf {
    let me = nix::unistd::geteuid().as_raw();
    std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|v| {
            v.to_str()
                .and_then(|s| s.split(':').next().map(PathBuf::from))
        })
        .filter(|p| p.is_dir() && owned_by(p, &[me, 0]))
        .or_else(|| {
            std::env::var_os("XDG_RUNTIME_DIR")
                .map(PathBuf::from)
                .filter(|p| p.is_dir() && owned_by(p, &[me, 0]))
        })
        .unwrap_or_else(std::env::temp_dir)
}

fn owned_by(p: &Path, uids: &[u32]) -> bool {
    std::fs::metadata(p).is_ok_and(|m| uids.contains(&m.uid()))
}

/// Whether others may create entries in `base` (true for /tmp), or why a
/// manager must not keep its directory there.
fn shared(base: &Path) -> std::io::Result<bool> {
    let m = std::fs::metadata(base)?;
    let me = nix::unistd::geteuid().as_raw();
    let bad = |why: String| {
        std::io::Error::other(format!(
            "{} {why}: set RUNTIME_DIRECTORY or XDG_RUNTIME_DIR to a directory of your own",
            base.display()
        ))
    };
    if m.uid() != me && m.uid() != 0 {
        return Err(bad(format!(
            "belongs to uid {}, neither to this user nor to root",
            m.uid()
        )));
    }
    let others_write = m.mode() & 0o022 != 0;
    if others_write && m.mode() & 0o1000 == 0 {
        return Err(bad(
            "is writable by others and not sticky: they could rename a manager's directory".into(),
        ));
    }
    Ok(others_write)
}

/// Make this manager's directory in [`base`], mode 0700, holding
/// `manager.pid`; stale directories of this user's dead managers are
/// removed on the way.
pub fn create(app: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = base();
    let shared = shared(&base)?;
    remove_stale(&base);
    let pid = std::process::id();
    let plain = base.join(format!("{}{pid}", prefix(app)));
    let mut tries = 0;
    let dir = loop {
        let dir = if shared {
            base.join(format!("{}{pid}.{}", prefix(app), random_part()?))
        } else {
            plain.clone()
        };
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => break dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < 8 => {
                tries += 1;
                // A base of our own: what is there is a dead manager's of
                // ours with this pid (a pid namespace, a reboot).
                if !shared {
                    std::fs::remove_dir_all(&dir)?;
                }
            }
            Err(e) => return Err(e),
        }
    };
    std::fs::write(dir.join("manager.pid"), pid.to_string())?;
    Ok(dir)
}

/// Make `dir` again after a re-exec if it went, or check that what is
/// there is still this user's directory.
pub fn adopt(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() && m.uid() == nix::unistd::geteuid().as_raw() => Ok(()),
        Ok(_) => Err(std::io::Error::other(format!(
            "{} is no longer this manager's directory",
            dir.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().mode(0o700).create(dir)
        }
        Err(e) => Err(e),
    }
}

/// Twelve random letters and digits, from the kernel's generator.
fn random_part() -> std::io::Result<String> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 12];
    let mut got = 0;
    while got < bytes.len() {
        // SAFETY: the pointer and length describe the rest of `bytes`.
        let n = unsafe { libc::getrandom(bytes[got..].as_mut_ptr().cast(), bytes.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        got += n as usize;
    }
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect())
}

/// Remove the private directories of this user's managers that died
/// without cleaning up (`kill -9`): `nodeherd-<app>-<pid>[.<random>]`
/// whose pid no longer runs, that this user owns and that hold a
/// `manager.pid` naming that pid. Nothing of anyone else's is opened.
fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let me = nix::unistd::geteuid().as_raw();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = pid_in(&name, None) else {
            continue;
        };
        // lstat: a symlink is nobody's directory.
        let ours = e.metadata().is_ok_and(|m| m.is_dir() && m.uid() == me);
        if !ours || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let marked = read_pid_file(&e.path(), me).is_ok_and(|p| p.trim() == pid.to_string());
        if marked {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// `dir/manager.pid`, read only if `dir` is a real directory of `owner`'s
/// and the file a regular file of theirs, and never more than a pid's worth.
fn read_pid_file(dir: &Path, owner: u32) -> std::io::Result<String> {
    let dirfd = nix::fcntl::open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    check_owned(&dirfd, SFlag::S_IFDIR, owner, dir)?;
    let fd = nix::fcntl::openat(
        &dirfd,
        "manager.pid",
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    check_owned(&fd, SFlag::S_IFREG, owner, dir)?;
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(PID_FILE_MAX as u64)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// The open file is of `kind` and belongs to `owner`.
fn check_owned(fd: &OwnedFd, kind: SFlag, owner: u32, what: &Path) -> std::io::Result<()> {
    let st = nix::sys::stat::fstat(fd)?;
    let is = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
    if is != kind || st.st_uid != owner {
        return Err(std::io::Error::other(format!(
            "{}: not a {} of uid {owner}'s",
            what.display(),
            if kind == SFlag::S_IFDIR {
                "directory"
            } else {
                "file"
            }
        )));
    }
    Ok(())
}

/// The first of systemd's `$STATE_DIRECTORY` (`StateDirectory=`: kept
/// across restarts and reboots), if the unit has one.
pub fn state_dir() -> Option<PathBuf> {
    let v = std::env::var_os("STATE_DIRECTORY").filter(|v| !v.is_empty())?;
    Some(
        v.to_str()
            .and_then(|s| s.split(':').next())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(v)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_are_read_from_both_kinds_of_name() {
        assert_eq!(pid_in("nodeherd-shop-12", Some("nodeherd-shop-")), Some(12));
        assert_eq!(
            pid_in("nodeherd-shop-12.k3j4h5g6f7d8", Some("nodeherd-shop-")),
            Some(12)
        );
        assert_eq!(pid_in("nodeherd-my-app-7.x", None), Some(7));
        assert_eq!(pid_in("nodeherd-shop-1-12", Some("nodeherd-shop-")), None);
        assert_eq!(pid_in("nodeherd-shop-+1", Some("nodeherd-shop-")), None);
        assert_eq!(pid_in("nodeherd-shop-0", Some("nodeherd-shop-")), None);
        assert_eq!(pid_in("nodeherd-shop-", None), None);
        assert_eq!(pid_in("other-1", None), None);
    }

    #[test]
    fn a_base_others_may_write_must_be_sticky() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("rundir-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mode = |m: u32| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m));
        mode(0o755).unwrap();
        assert!(!shared(&dir).unwrap());
        mode(0o1777).unwrap();
        assert!(shared(&dir).unwrap());
        mode(0o777).unwrap();
        let e = shared(&dir).unwrap_err().to_string();
        assert!(
            e.contains("not sticky") && e.contains("XDG_RUNTIME_DIR"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn random_parts_differ() {
        let (a, b) = (random_part().unwrap(), random_part().unwrap());
        assert_eq!(a.len(), 12);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()), "{a}");
        assert_ne!(a, b);
    }
}
