//! Which nodeherd apps this host has: the managers that run (their bus
//! names, their control sockets on disk) and the apps installed for
//! systemd (`/etc/nodeherd/NAME.*`, the `nodeherd@NAME` units systemd
//! knows, the `nodeherd-NAME` units `nodeherd start` made).
//!
//! The clients need this twice over: to find the one manager a command is
//! for, and to say which apps there are when it is not there (`nodeherd
//! status nosuchapp` names those that run) or when asked (`nodeherd ls`).
//! Both go by the same rules: a control socket counts only in a directory
//! of a trusted user's that nobody else may write, held by a listener of
//! that same user (`scan_control_sockets`), because in a shared `/tmp`
//! any local user can make one named like an app's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::BusArgs;
use crate::dbus;
use crate::link::{Failure, Manager1Proxy, Reached, Via};

/// A control socket found on disk, in a directory of `owner`'s.
pub(crate) struct ControlSocket {
    pub(crate) path: PathBuf,
    pub(crate) owner: u32,
    /// The users whose listener this socket may have (see [`trusted_users`]).
    pub(crate) allowed: Vec<u32>,
}

/// What a search for control sockets found.
pub(crate) struct Found {
    pub(crate) sockets: Vec<ControlSocket>,
    /// Managers' directories of users the caller does not trust, said so
    /// in the error when nothing else is found.
    pub(crate) passed_over: Vec<String>,
}

/// The users whose manager of `app` a caller may talk to: itself, root
/// and the app's own user (`nodeherd-APP`, when the system has it).
pub(crate) fn trusted_users(app: Option<&str>) -> Vec<u32> {
    let mut allowed = vec![nix::unistd::geteuid().as_raw(), 0];
    if let Some(app) = app
        && let Ok(Some(u)) = nix::unistd::User::from_name(&dbus::user_for(app))
    {
        allowed.push(u.uid.as_raw());
    }
    allowed
}

/// The places managers keep their private directories: `$XDG_RUNTIME_DIR`
/// (or `$RUNTIME_DIRECTORY`), the temporary directory, and
/// `/run/nodeherd/*/` (the template unit's `RuntimeDirectory=`), each with
/// the app it is for when it is one app's own.
fn bases() -> Vec<(PathBuf, Option<String>)> {
    let mut bases: Vec<(PathBuf, Option<String>)> =
        vec![(crate::rundir::base(), None), (std::env::temp_dir(), None)];
    if let Ok(units) = std::fs::read_dir("/run/nodeherd") {
        bases.extend(units.flatten().filter_map(|e| {
            let p = e.path();
            let app = e.file_name().to_str()?.to_string();
            p.is_dir().then_some((p, Some(app)))
        }));
    }
    bases.dedup_by(|a, b| a.0 == b.0);
    bases
}

/// The control sockets of `app`'s managers (or of every app's, without
/// `app`), found in [`bases`]. Only a directory of a trusted user's
/// ([`trusted_users`]; under `/run/nodeherd/X/` also `nodeherd-X`) that
/// nobody else may write, holding a socket of that same user's, counts.
/// With `first_base_only`, the first place that has any is the answer: a
/// user's own `$XDG_RUNTIME_DIR` before the shared temporary directory.
pub(crate) fn scan_control_sockets(app: Option<&str>, first_base_only: bool) -> Found {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut found = Found {
        sockets: Vec::new(),
        passed_over: Vec::new(),
    };
    for (base, base_app) in bases() {
        if first_base_only && !found.sockets.is_empty() {
            break;
        }
        // Under /run/nodeherd/X/ only X's manager lives.
        let app = match (app, base_app.as_deref()) {
            (Some(a), _) => Some(a),
            (None, b) => b,
        };
        let prefix = app.map(crate::rundir::prefix);
        let allowed = trusted_users(app);
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(pid) = crate::rundir::pid_in(&name, prefix.as_deref()) else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            // lstat: a symlink is not a manager's directory.
            let Ok(dir) = e.metadata() else {
                continue;
            };
            if !dir.is_dir() {
                continue;
            }
            if !allowed.contains(&dir.uid()) {
                found.passed_over.push(format!(
                    "{} belongs to uid {}, not to you, root or the app's user",
                    e.path().display(),
                    dir.uid()
                ));
                continue;
            }
            if dir.mode() & 0o022 != 0 {
                found
                    .passed_over
                    .push(format!("{} is writable by others", e.path().display()));
                continue;
            }
            let sock = e.path().join("control.sock");
            let is_theirs = std::fs::symlink_metadata(&sock)
                .is_ok_and(|m| m.file_type().is_socket() && m.uid() == dir.uid());
            if is_theirs && !found.sockets.iter().any(|c| c.path == sock) {
                found.sockets.push(ControlSocket {
                    path: sock,
                    owner: dir.uid(),
                    allowed: allowed.clone(),
                });
            }
        }
    }
    found
}

/// Connect to a manager's control socket, peer to peer, once the peer is
/// known to be the process of the user who owns its directory.
pub(crate) async fn control_socket(found: &ControlSocket) -> Result<Reached, Failure> {
    let path = &found.path;
    let fail = |e: String| {
        Failure(
            3,
            format!("cannot use the control socket {}: {e}", path.display()),
        )
    };
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let peer = stream
        .peer_cred()
        .map_err(|e| fail(format!("cannot tell who listens on it: {e}")))?;
    if peer.uid() != found.owner || !found.allowed.contains(&peer.uid()) {
        return Err(fail(format!(
            "uid {} listens on it, not uid {} whose directory it is in: not talking to it",
            peer.uid(),
            found.owner
        )));
    }
    let conn = zbus::connection::Builder::unix_stream(stream)
        .p2p()
        .method_timeout(Duration::from_secs(24 * 3600))
        .build()
        .await
        .map_err(|e| {
            fail(format!(
                "{e} (a manager answers only root, its own user and group {})",
                dbus::OPERATORS_GROUP
            ))
        })?;
    let p = Manager1Proxy::builder(&conn)
        // Peer to peer there is no bus to route by name; the manager ignores it.
        .destination("org.nodeherd.Manager")
        .map_err(|e| fail(e.to_string()))?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok(Reached {
        conn,
        proxy: p,
        pid: peer.pid().and_then(|p| u32::try_from(p).ok()),
        uid: Some(peer.uid()),
        via: Via::Socket(path.clone()),
    })
}

/// How long one manager may take to answer while every one is asked: a
/// stopped (SIGSTOP) or wedged one must not hang `nodeherd ls`.
pub(crate) const ANSWER: Duration = Duration::from_secs(3);

/// A running manager, reached, and the app it says it runs.
pub(crate) struct Running {
    pub(crate) app: String,
    pub(crate) reached: Reached,
}

/// Every manager this caller can reach: the `org.nodeherd.*` names on the
/// bus `bus` names (each checked as `reach` checks one), then the control
/// sockets of managers not already found there. Also what was passed
/// over or could not be asked, for the caller to say.
pub(crate) async fn running(bus: &BusArgs) -> (Vec<Running>, Vec<String>) {
    let mut out: Vec<Running> = Vec::new();
    let mut notes = Vec::new();
    match crate::link::connect(bus).await {
        Ok(conn) => match bus_apps(&conn).await {
            Ok(apps) => {
                for app in apps {
                    let one = async {
                        let r = crate::link::proxy(&conn, Some(&app), bus).await;
                        r.map_err(Failure::from)
                    };
                    match tokio::time::timeout(ANSWER, one).await {
                        Ok(Ok(reached)) => out.push(Running { app, reached }),
                        Ok(Err(Failure(_, why))) => notes.push(why),
                        Err(_) => notes.push(format!("{app}: no answer on the bus")),
                    }
                }
            }
            Err(e) => notes.push(e.1),
        },
        // No bus here (a container, a shell): said only when one was named.
        Err(e) if bus.bus.is_some() || bus.user => notes.push(e.1),
        Err(_) => {}
    }
    let found = scan_control_sockets(None, false);
    notes.extend(found.passed_over);
    for sock in &found.sockets {
        let one = async {
            let reached = control_socket(sock).await?;
            let app = reached.proxy.name().await?;
            Ok::<_, Failure>(Running { app, reached })
        };
        match tokio::time::timeout(ANSWER, one).await {
            Ok(Ok(r)) => {
                // A manager on the bus has its control socket too.
                let known = out
                    .iter()
                    .any(|o| o.reached.pid.is_some() && o.reached.pid == r.reached.pid);
                if !known {
                    out.push(r);
                }
            }
            Ok(Err(Failure(_, why))) => notes.push(why),
            Err(_) => notes.push(format!("{}: no answer", sock.path.display())),
        }
    }
    out.sort_by(|a, b| a.app.cmp(&b.app));
    (out, notes)
}

/// The apps whose names are owned on this bus.
async fn bus_apps(conn: &zbus::Connection) -> Result<Vec<String>, Failure> {
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    let mut apps: Vec<String> = dbus
        .list_names()
        .await?
        .into_iter()
        .filter_map(|n| dbus::app_for_bus_name(n.as_str()))
        .collect();
    apps.sort();
    Ok(apps)
}

/// The names of the apps that run, for an error message: "web, api", or
/// what kept any from being found.
pub(crate) async fn running_names(bus: &BusArgs) -> Vec<String> {
    let (running, _) = running(bus).await;
    let mut names: Vec<String> = running.into_iter().map(|r| printable(&r.app)).collect();
    names.dedup();
    names
}

/// Where `nodeherd install` and the template unit keep app configurations.
pub const CONFIG_DIR: &str = "/etc/nodeherd";

/// The file endings the template unit finds for `/etc/nodeherd/NAME`.
const CONFIG_ENDINGS: [&str; 5] = [
    ".config.js",
    ".config.cjs",
    ".config.mjs",
    ".config.json",
    ".json",
];

/// The app configurations in `dir`: (app, file), by name.
pub(crate) fn configs(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_str()?.to_string();
            let app = CONFIG_ENDINGS
                .iter()
                .find_map(|end| file.strip_suffix(end))?;
            (!app.is_empty() && !app.starts_with('.')).then(|| (app.to_string(), e.path()))
        })
        .collect();
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    out
}

/// The configuration of `app` in `dir`, if it has one.
pub(crate) fn config_of(dir: &Path, app: &str) -> Option<PathBuf> {
    CONFIG_ENDINGS
        .iter()
        .map(|end| dir.join(format!("{app}{end}")))
        .find(|p| p.is_file())
}

/// A unit systemd has loaded: its name and state.
#[derive(Debug, Clone)]
pub(crate) struct Unit {
    pub(crate) name: String,
    /// `active`, `inactive`, `failed`, `activating`, ...
    pub(crate) active: String,
    /// `running`, `listening`, `dead`, ...
    pub(crate) sub: String,
}

impl Unit {
    pub(crate) fn is_up(&self) -> bool {
        matches!(
            self.active.as_str(),
            "active" | "activating" | "reloading" | "deactivating"
        )
    }
}

/// Whether systemd runs this host (as `sd_booted()` decides).
pub(crate) fn systemd_booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The nodeherd units systemd has loaded (`nodeherd@*.service`,
/// `nodeherd@*.socket`, `nodeherd-*.service`), or `None` without systemd.
pub(crate) async fn units() -> Option<Vec<Unit>> {
    if !systemd_booted() {
        return None;
    }
    let conn = tokio::time::timeout(ANSWER, zbus::connection::Builder::system().ok()?.build())
        .await
        .ok()?
        .ok()?;
    let args = (
        Vec::<&str>::new(),
        vec![
            "nodeherd@*.service",
            "nodeherd@*.socket",
            "nodeherd-*.service",
        ],
    );
    let call = conn.call_method(
        Some("org.freedesktop.systemd1"),
        "/org/freedesktop/systemd1",
        Some("org.freedesktop.systemd1.Manager"),
        "ListUnitsByPatterns",
        &args,
    );
    let reply = tokio::time::timeout(ANSWER, call).await.ok()?.ok()?;
    type Row = (
        String,
        String,
        String,
        String,
        String,
        String,
        zbus::zvariant::OwnedObjectPath,
        u32,
        String,
        zbus::zvariant::OwnedObjectPath,
    );
    let rows: Vec<Row> = reply.body().deserialize().ok()?;
    Some(
        rows.into_iter()
            .filter(|r| r.2 != "not-found")
            .map(|r| Unit {
                name: r.0,
                active: r.3,
                sub: r.4,
            })
            .collect(),
    )
}

/// The app a nodeherd unit is for, and whether it is `nodeherd start`'s
/// (`nodeherd-APP.service`) rather than the template's.
pub(crate) fn app_of_unit(unit: &str) -> Option<(String, bool)> {
    if let Some(rest) = unit.strip_prefix("nodeherd@") {
        let app = rest
            .strip_suffix(".service")
            .or_else(|| rest.strip_suffix(".socket"))?;
        return Some((unescape_unit(app), false));
    }
    let app = unit.strip_prefix("nodeherd-")?.strip_suffix(".service")?;
    Some((unescape_unit(app), true))
}

/// systemd's `\xNN` escapes in a unit name, undone.
fn unescape_unit(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && b.get(i + 1) == Some(&b'x')
            && let Some(v) = s
                .get(i + 2..i + 4)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The transient unit `nodeherd start` runs APP in, as root under systemd.
pub(crate) fn transient_unit(app: &str) -> String {
    format!("nodeherd-{}.service", escape_unit(app))
}

/// `app` as part of a unit name: the names `nodeherd install` takes
/// (ASCII letters, digits, `:_.-`, as the template's `%i` reads them) stay
/// as they are; any other byte becomes `\xNN`, as `systemd-escape` writes it.
pub(crate) fn escape_unit(app: &str) -> String {
    let mut s = String::new();
    for (i, b) in app.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric() || b":_-".contains(&b) || (b == b'.' && i > 0);
        if keep {
            s.push(b as char);
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

/// Text from a manager, a worker or a bus name, safe to print on a
/// terminal: control characters (ESC, CR, BEL, C1...) become `\xNN`, so
/// no app can move the cursor, retitle the window or write the clipboard
/// of whoever reads its status or its logs.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\t' || !(c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')) {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{:02x}", c as u32));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_sent() {
        assert_eq!(printable("web"), "web");
        assert_eq!(printable("a\tb"), "a\tb");
        assert_eq!(printable("x\x1b]52;c;aGk=\x07y"), "x\\x1b]52;c;aGk=\\x07y");
        assert_eq!(printable("\r\n\u{9b}2J"), "\\x0d\\x0a\\x9b2J");
    }

    #[test]
    fn unit_names_round_trip() {
        assert_eq!(transient_unit("web"), "nodeherd-web.service");
        assert_eq!(escape_unit("my app"), "my\\x20app");
        for app in ["web", "my-app", "my app", "a.b", "ünï"] {
            let unit = format!("nodeherd@{}.service", escape_unit(app));
            assert_eq!(app_of_unit(&unit), Some((app.to_string(), false)), "{unit}");
            assert_eq!(
                app_of_unit(&transient_unit(app)),
                Some((app.to_string(), true))
            );
        }
        assert_eq!(app_of_unit("other.service"), None);
    }

    #[test]
    fn configs_are_named_by_their_app() {
        let dir = std::env::temp_dir().join(format!("discover-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "web.json",
            "api.config.js",
            "x.tmp-nodeherd",
            ".json",
            "notes.txt",
        ] {
            std::fs::write(dir.join(f), "{}").unwrap();
        }
        let names: Vec<String> = configs(&dir).into_iter().map(|c| c.0).collect();
        assert_eq!(names, ["api", "web"]);
        assert_eq!(config_of(&dir, "web"), Some(dir.join("web.json")));
        assert_eq!(config_of(&dir, "nope"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
