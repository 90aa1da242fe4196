//! `nodeherd install` and `uninstall`: an ecosystem file's apps put under
//! systemd the way the packaged template units expect, in one command.
//!
//! For each app: its entry, with `cwd` made absolute (the copy lives
//! elsewhere than the original), is written as `/etc/nodeherd/NAME.json`,
//! where `nodeherd@NAME.service` reads it; its listen addresses become a
//! drop-in for `nodeherd@NAME.socket`; the socket is enabled (and with
//! `--boot` the service too, so the app starts at boot rather than on the
//! first connection). The copy is marked with the file it came from, so a
//! second run updates it and `uninstall` removes only what `install` wrote.
//! Edits then go to the copy, applied by `systemctl reload nodeherd@NAME`.
//!
//! Each app also gets its own identity: a system user `nodeherd-NAME`
//! (a sysusers.d entry, applied with `systemd-sysusers`), which the
//! template runs it as (`User=nodeherd-%i`), and a system-bus policy file
//! that lets that user alone own the app's bus name, made live with the
//! bus's `ReloadConfig`. So one app cannot own another's name, signal its
//! processes or read its files.
//!
//! It runs as root on a file whoever deploys the app can write, so the file
//! gets no more than that app's user would: a `.config.js` is evaluated as
//! `nobody` (see config::js); what goes into a unit file is checked and
//! escaped here (a newline in a listen address would be a line of the
//! file's choosing in a file root's systemd runs); `uid`/`gid` may name the
//! app's own user only; the copy holding `env` is created unreadable to
//! others from its first byte.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use serde_json::{Map, Value};

use crate::cli::{InstallArgs, UninstallArgs};
use crate::config::{self, Overrides};

/// The key that marks a copy written by `install`, beside `apps`.
const MARK: &str = "installed_from";

/// Why an install or uninstall stopped; `Refused` is the caller's to fix (2).
enum Failure {
    Refused(String),
    Failed(String),
}

fn finish(r: Result<(), Failure>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(m)) => {
            eprintln!("nodeherd: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(m)) => {
            eprintln!("nodeherd: {m}");
            ExitCode::from(1)
        }
    }
}

/// What `install` will do for one app.
struct Plan {
    name: String,
    config: PathBuf,
    config_text: String,
    /// The copy as `--dry-run` shows it: every `env` value hidden.
    config_shown: String,
    dropin: (PathBuf, String),
    /// The service's drop-in for `--credential`, and its text (none: no
    /// credential, and one an earlier install wrote goes).
    credentials: (PathBuf, Option<String>),
    sysusers: (PathBuf, String),
    policy: (PathBuf, String),
}

pub fn install(args: InstallArgs) -> ExitCode {
    finish(install_inner(&args))
}

pub fn uninstall(args: UninstallArgs) -> ExitCode {
    finish(uninstall_inner(&args))
}

fn install_inner(args: &InstallArgs) -> Result<(), Failure> {
    let file = std::path::absolute(&args.ecosystem)
        .map_err(|e| Failure::Refused(format!("{}: {e}", args.ecosystem.display())))?;
    // Read (and a .config.js evaluated) once: what is checked below is
    // what is written.
    let entries = if crate::pm2dump::is_dump(&file) {
        // PM2's saved list: its cluster apps, and what is left out, said.
        let dump = crate::pm2dump::read(&file).map_err(Failure::Refused)?;
        for note in &dump.notes {
            println!("{}: {note}", file.display());
        }
        dump.entries
    } else {
        config::read_entries(&file).map_err(|e| Failure::Refused(e.to_string()))?
    };
    let base = file.parent().unwrap_or(Path::new("/")).to_path_buf();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    if let Some(g) = &args.socket_group {
        check_socket_group(g)?;
    }
    let mut plans = Vec::new();
    for entry in &entries {
        let name = match entry.get("name").and_then(Value::as_str) {
            Some(n) => n.to_string(),
            None => {
                return Err(Failure::Refused(format!(
                    "{}: every app needs a `name` to become nodeherd@NAME",
                    file.display()
                )));
            }
        };
        if args.only.as_ref().is_some_and(|o| *o != name) {
            continue;
        }
        check_unit_name(&name)?;
        check_user_name(&name)?;
        plans.push(plan(args, &file, &base, entry, &name, cpus)?);
    }
    if plans.is_empty() {
        return Err(Failure::Refused(match &args.only {
            Some(o) => format!("{}: no app named \"{o}\"", file.display()),
            None => format!("{}: no app to install", file.display()),
        }));
    }
    for p in &plans {
        if let Some(owner) = foreign_config(&args.dirs.config_dir, &p.name, &file) {
            return Err(Failure::Refused(format!(
                "{} exists and was not written by `nodeherd install` from {}; remove it or name the app otherwise",
                owner.display(),
                file.display()
            )));
        }
    }
    // The users first: the bus resolves the user its policy names when it
    // loads it, and the configuration copy is the app's group's to read.
    for p in &plans {
        write_file(&p.sysusers.0, &p.sysusers.1, args.dirs.dry_run, 0o644, None)?;
        run(
            "systemd-sysusers",
            &[p.sysusers.0.display().to_string()],
            args.dirs.dry_run,
        )?;
    }
    for p in &plans {
        write_file(&p.policy.0, &p.policy.1, args.dirs.dry_run, 0o644, None)?;
    }
    reload_bus(args.dirs.dry_run);
    for p in &plans {
        let group = crate::dbus::user_for(&p.name);
        if args.dirs.dry_run {
            // The copy holds `env`: what it would be, values hidden.
            write_file(&p.config, &p.config_shown, true, 0o640, None)?;
        } else {
            write_config(&p.config, &p.config_text, &group, false)?;
        }
        write_file(&p.dropin.0, &p.dropin.1, args.dirs.dry_run, 0o644, None)?;
        match &p.credentials {
            (path, Some(text)) => write_file(path, text, args.dirs.dry_run, 0o644, None)?,
            (path, None) => remove_ours(path, CREDENTIALS_HEADER, args.dirs.dry_run)?,
        }
    }
    let mut commands = vec![vec!["daemon-reload".to_string()]];
    for p in &plans {
        let unit = if args.boot {
            format!("nodeherd@{}.service", p.name)
        } else {
            format!("nodeherd@{}.socket", p.name)
        };
        commands.push(vec!["enable".into(), unit]);
        if args.now {
            commands.push(vec!["start".into(), format!("nodeherd@{}.socket", p.name)]);
            if args.boot {
                commands.push(vec!["start".into(), format!("nodeherd@{}.service", p.name)]);
            }
        }
    }
    for c in &commands {
        systemctl(c, args.dirs.dry_run)?;
    }
    for p in &plans {
        println!(
            "{}: {}; edit {} and `systemctl reload nodeherd@{}` to change it",
            p.name,
            if args.dirs.dry_run {
                "would be installed"
            } else {
                "installed"
            },
            p.config.display(),
            p.name
        );
    }
    Ok(())
}

fn plan(
    args: &InstallArgs,
    file: &Path,
    base: &Path,
    entry: &Map<String, Value>,
    name: &str,
    cpus: u32,
) -> Result<Plan, Failure> {
    let source = file.display().to_string();
    let mut entry = entry.clone();
    // The copy lives in /etc/nodeherd: paths relative to the original
    // file's directory must not change meaning.
    let cwd = match entry.get("cwd").and_then(Value::as_str) {
        Some(c) => base.join(c),
        None => base.to_path_buf(),
    };
    entry.insert("cwd".into(), Value::String(cwd.display().to_string()));
    // The whole configuration must be valid before anything is written. The
    // app's own user may not exist yet: `install` makes it below.
    let mut checked = entry.clone();
    for key in ["uid", "gid"] {
        if own_principal(&entry, key, name, &source)? {
            checked.remove(key);
        }
    }
    let over = Overrides {
        only: Some(name.to_string()),
        ..Overrides::default()
    };
    config::load_entry(&checked, &source, base, &over, cpus)
        .map_err(|e| Failure::Refused(e.to_string()))?;
    let listen: Vec<(String, String)> = if args.listen.is_empty() {
        let at = format!("{source}: app \"{name}\": key `listen`");
        let words = match entry.get("listen") {
            Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    other => Err(Failure::Refused(format!(
                        "{at}: expected strings in the array, got {other}"
                    ))),
                })
                .collect::<Result<_, _>>()?,
            None | Some(Value::Null) => Vec::new(),
            Some(other) => {
                return Err(Failure::Refused(format!(
                    "{at}: expected a string or an array of strings, got {other}"
                )));
            }
        };
        words.into_iter().map(|w| (at.clone(), w)).collect()
    } else {
        args.listen
            .iter()
            .map(|a| ("--listen".to_string(), a.clone()))
            .collect()
    };
    let doc = serde_json::json!({
        MARK: file.display().to_string(),
        "apps": [Value::Object(entry)],
    });
    let config_text = serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n";
    let config_shown =
        serde_json::to_string_pretty(&hide_env_values(&doc)).unwrap_or_default() + "\n";
    let credentials = (
        args.dirs
            .unit_dir
            .join(format!("nodeherd@{name}.service.d"))
            .join("credentials.conf"),
        credentials_dropin(&args.credential)?,
    );
    let group = args
        .socket_group
        .clone()
        .unwrap_or_else(|| crate::dbus::user_for(name));
    let mut text = String::from(
        "# Written by `nodeherd install`: where the app listens, and who may connect.\n[Socket]\n",
    );
    if !listen.is_empty() {
        text.push_str("ListenStream=\n");
    }
    for (at, a) in &listen {
        let line = socket_line(a).map_err(|why| Failure::Refused(format!("{at}: {a:?}: {why}")))?;
        text.push_str(&line);
        text.push('\n');
    }
    // A Unix socket is not for every local user: they would reach the app
    // past the proxy in front of it.
    text.push_str(&format!(
        "SocketMode=0660\nSocketGroup={}\n",
        unit_value(&group)
            .map_err(|why| Failure::Refused(format!("--socket-group {group:?}: {why}")))?
    ));
    let dropin = (
        args.dirs
            .unit_dir
            .join(format!("nodeherd@{name}.socket.d"))
            .join("listen.conf"),
        text,
    );
    let user = crate::dbus::user_for(name);
    let sysusers = (
        args.dirs.sysusers_dir.join(format!("{user}.conf")),
        format!(
            "# Written by `nodeherd install`: the user and group the nodeherd app\n\
             # \"{name}\" runs as (nodeherd@{name}.service, User=nodeherd-%i).\n\
             u {user} - \"nodeherd app {name}\" /nonexistent /usr/sbin/nologin\n"
        ),
    );
    let policy = (
        args.dirs
            .bus_policy_dir
            .join(format!("{}.conf", crate::dbus::bus_name_for(name))),
        crate::dbus::bus_policy_for(name),
    );
    Ok(Plan {
        name: name.to_string(),
        config: args.dirs.config_dir.join(format!("{name}.json")),
        config_text,
        config_shown,
        dropin,
        credentials,
        sysusers,
        policy,
    })
}

/// The first line of the credentials drop-in: what marks it as `install`'s.
const CREDENTIALS_HEADER: &str =
    "# Written by `nodeherd install --credential`: systemd credentials for the workers.";

/// The service drop-in for `--credential NAME=PATH`s: one
/// `LoadCredential=NAME:PATH` each, systemd reads PATH as root when the
/// service starts and the workers find it at $CREDENTIALS_DIRECTORY/NAME.
/// NAME becomes a file name and PATH a unit value: both are checked.
fn credentials_dropin(creds: &[String]) -> Result<Option<String>, Failure> {
    if creds.is_empty() {
        return Ok(None);
    }
    let mut text = format!(
        "{CREDENTIALS_HEADER}\n# Each is at $CREDENTIALS_DIRECTORY/NAME, readable by the service's user.\n[Service]\n"
    );
    for c in creds {
        let refuse = |why: &str| Failure::Refused(format!("--credential {c:?}: {why}"));
        let Some((name, path)) = c.split_once('=') else {
            return Err(refuse("expected NAME=PATH"));
        };
        let good_name = !name.is_empty()
            && name.len() <= 64
            && name != "."
            && name != ".."
            && name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-' | '.'));
        if !good_name {
            return Err(refuse(
                "NAME is the credential's file name: letters, digits, `_`, `-` and `.`, at most 64",
            ));
        }
        if !path.starts_with('/') {
            return Err(refuse(
                "PATH must be absolute: systemd reads it, not this shell",
            ));
        }
        let path = unit_value(path).map_err(|why| refuse(&format!("PATH {why}")))?;
        text.push_str(&format!("LoadCredential={name}:{path}\n"));
    }
    Ok(Some(text))
}

/// Remove `path` if `install` wrote it (it starts with `header`).
fn remove_ours(path: &Path, header: &str, dry_run: bool) -> Result<(), Failure> {
    let ours = std::fs::read_to_string(path).is_ok_and(|t| t.starts_with(header));
    if !ours {
        return Ok(());
    }
    if dry_run {
        println!("--- would remove {}", path.display());
        return Ok(());
    }
    std::fs::remove_file(path)
        .map_err(|e| Failure::Failed(format!("cannot remove {}: {e}", path.display())))?;
    println!("removed {}", path.display());
    Ok(())
}

/// `doc` with the value of every variable of `env` and `env_<name>` hidden,
/// for what is printed: they may be secrets.
fn hide_env_values(doc: &Value) -> Value {
    let mut doc = doc.clone();
    for app in doc
        .get_mut("apps")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        let Some(app) = app.as_object_mut() else {
            continue;
        };
        for (key, vars) in app.iter_mut() {
            if key != "env" && !key.starts_with("env_") {
                continue;
            }
            if let Some(vars) = vars.as_object_mut() {
                for v in vars.values_mut() {
                    *v = Value::String("(hidden)".into());
                }
            }
        }
    }
    doc
}

/// Is `key` (`uid` or `gid`) the app's own user or group, which `install`
/// makes? Absent is fine too (false). Anything else is refused: under the
/// root-manager drop-in (units/README.md) these decide who the workers run
/// as, and the file's author gets no user but the app's.
fn own_principal(
    entry: &Map<String, Value>,
    key: &str,
    name: &str,
    source: &str,
) -> Result<bool, Failure> {
    let own = crate::dbus::user_for(name);
    let Some(v) = entry.get(key) else {
        return Ok(false);
    };
    let existing = match key {
        "uid" => nix::unistd::User::from_name(&own)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw()),
        _ => nix::unistd::Group::from_name(&own)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw()),
    };
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    };
    if text == own {
        return Ok(existing.is_none());
    }
    if existing.is_some_and(|id| text.parse::<u32>() == Ok(id)) {
        return Ok(false);
    }
    Err(Failure::Refused(format!(
        "{source}: app \"{name}\": key `{key}`: {v}: an installed app runs as its own user {own} \
         and no other (a root manager would run its workers as whoever the file names); \
         remove the key, or write \"{own}\""
    )))
}

/// A value as systemd will read it back, or why it cannot be one. A
/// control character (a newline above all) would end the line and start
/// one of the value's choosing in a file root's systemd runs; a backslash
/// is an escape, or at the end of a line joins the next one; `%` starts a
/// specifier, so it is doubled.
fn unit_value(v: &str) -> Result<String, String> {
    if let Some(c) = v.chars().find(|c| c.is_control()) {
        return Err(format!(
            "holds the control character {:?}, which cannot go into a unit file",
            c
        ));
    }
    if v.contains('\\') {
        return Err("holds a backslash, which systemd would read as an escape".into());
    }
    if v.is_empty() || v.contains(char::is_whitespace) {
        return Err("must be one word, without spaces".into());
    }
    Ok(v.replace('%', "%%"))
}

/// A group systemd can give the socket to: one that exists, by a name
/// useradd would accept or by number.
fn check_socket_group(g: &str) -> Result<(), Failure> {
    let well_formed = g.len() <= 31
        && (g.chars().all(|c| c.is_ascii_digit())
            || (g.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && g.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')));
    if !well_formed {
        return Err(Failure::Refused(format!(
            "--socket-group {g:?}: not a group name (letters, digits, _ and -, at most 31) or number"
        )));
    }
    let exists = match g.parse::<u32>() {
        Ok(n) => nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(n)),
        Err(_) => nix::unistd::Group::from_name(g),
    }
    .ok()
    .flatten()
    .is_some();
    if exists {
        Ok(())
    } else {
        Err(Failure::Refused(format!(
            "--socket-group {g:?}: no such group on this system (systemd could not give the socket to it)"
        )))
    }
}

/// A listen address as a `[Socket]` line, or why it cannot be one.
/// systemd's `ListenStream=` takes a port, an IP address and port, or a
/// path; no host names.
fn socket_line(addr: &str) -> Result<String, String> {
    let value = unit_value(addr)?;
    let bad = || {
        "expected PORT, IPv4:PORT, [IPv6]:PORT, unix:/path or udp:IP:PORT (systemd takes no host names)"
            .to_string()
    };
    if let Some(path) = addr.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(bad());
        }
        if path.len() > 107 {
            return Err("a Unix socket path may have at most 107 bytes".into());
        }
        return Ok(format!("ListenStream={}", &value["unix:".len()..]));
    }
    let (key, rest, value) = match addr.strip_prefix("udp:") {
        Some(rest) => ("ListenDatagram", rest, &value["udp:".len()..]),
        None => match addr.strip_prefix("tcp:") {
            Some(rest) => ("ListenStream", rest, &value["tcp:".len()..]),
            None => ("ListenStream", addr, &value[..]),
        },
    };
    if !ip_and_port(rest) {
        return Err(bad());
    }
    Ok(format!("{key}={value}"))
}

/// `PORT`, `IPv4:PORT` or `[IPv6]:PORT` (with a `%scope`), port not 0.
fn ip_and_port(s: &str) -> bool {
    let port_ok = |p: &str| p.parse::<u16>().is_ok_and(|p| p > 0);
    if port_ok(s) {
        return true;
    }
    if let Some(v6) = s.strip_prefix('[') {
        let Some((host, port)) = v6.split_once("]:") else {
            return false;
        };
        let (ip, scope) = host.split_once('%').unwrap_or((host, ""));
        let scope_ok = host == ip
            || (!scope.is_empty()
                && scope
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)));
        return ip.parse::<std::net::Ipv6Addr>().is_ok() && scope_ok && port_ok(port);
    }
    s.rsplit_once(':')
        .is_some_and(|(ip, port)| ip.parse::<std::net::Ipv4Addr>().is_ok() && port_ok(port))
}

/// A systemd instance name may hold only ASCII letters, digits and `:_.-`.
fn check_unit_name(name: &str) -> Result<(), Failure> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ":_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Failure::Refused(format!(
            "app name \"{name}\" cannot be a systemd instance name (nodeherd@NAME): use letters, digits and : _ . - only"
        )))
    }
}

/// The template runs an app as `nodeherd-NAME`: a name systemd-sysusers
/// and useradd accept, at most 31 characters.
fn check_user_name(name: &str) -> Result<(), Failure> {
    let user = crate::dbus::user_for(name);
    let ok = user.len() <= 31
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Failure::Refused(format!(
            "app name \"{name}\" cannot be part of a user name ({user}, which the app runs as): \
             use letters, digits, _ and - only, at most 22 characters"
        )))
    }
}

/// A configuration for `name` in `dir` that `install` did not write from
/// `source` (which the template would read instead of ours, or beside it).
fn foreign_config(dir: &Path, name: &str, source: &Path) -> Option<PathBuf> {
    for ext in [
        ".config.js",
        ".config.cjs",
        ".config.mjs",
        ".json",
        ".config.json",
    ] {
        let p = dir.join(format!("{name}{ext}"));
        if !p.exists() {
            continue;
        }
        let ours = ext == ".json"
            && std::fs::read_to_string(&p)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v.get(MARK).and_then(Value::as_str).map(PathBuf::from))
                .is_some_and(|from| from == source);
        if !ours {
            return Some(p);
        }
    }
    None
}

/// The copy may hold secrets (`env`): root's, readable by the app's own
/// group only (not by other apps, nor by operators in group nodeherd).
fn write_config(path: &Path, text: &str, group: &str, dry_run: bool) -> Result<(), Failure> {
    if dry_run {
        return write_file(path, text, true, 0o640, None);
    }
    match nix::unistd::Group::from_name(group).ok().flatten() {
        Some(g) => write_file(path, text, false, 0o640, Some(g.gid.as_raw())),
        None => Err(Failure::Failed(format!(
            "group {group} does not exist after systemd-sysusers; {} not written",
            path.display()
        ))),
    }
}

fn write_file(
    path: &Path,
    text: &str,
    dry_run: bool,
    mode: u32,
    gid: Option<u32>,
) -> Result<(), Failure> {
    use std::os::unix::fs::MetadataExt;
    if dry_run {
        println!("--- would write {}\n{text}", path.display());
        return Ok(());
    }
    // Unchanged means the owner and mode too: a copy an older nodeherd
    // left readable to all is written again.
    let same = std::fs::symlink_metadata(path).is_ok_and(|m| {
        m.is_file()
            && m.mode() & 0o7777 == mode
            && m.uid() == nix::unistd::geteuid().as_raw()
            && gid.is_none_or(|g| m.gid() == g)
    }) && std::fs::read_to_string(path).is_ok_and(|old| old == text);
    if same {
        println!("unchanged {}", path.display());
        return Ok(());
    }
    let denied = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            Failure::Refused(format!(
                "cannot write {}: {e}; run it as root (sudo nodeherd install ...)",
                path.display()
            ))
        } else {
            Failure::Failed(format!("cannot write {}: {e}", path.display()))
        }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(denied)?;
    }
    write_private(path, text, mode, gid, &mut |_, _| Ok(())).map_err(denied)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Write `text` to `path` so that no one but root reads it before it has
/// `mode` and group `gid`: a new file (`O_EXCL|O_NOFOLLOW`, never one
/// planted there or a link) created `0600`, given its group and mode on
/// the descriptor, and only then filled, synced and renamed over `path`.
/// `observe` sees the file when created (`"created"`) and just before the
/// first byte (`"writing"`); the tests look at its mode there.
fn write_private(
    path: &Path,
    text: &str,
    mode: u32,
    gid: Option<u32>,
    observe: &mut dyn FnMut(&'static str, &std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut created = None;
    for attempt in 0..16u32 {
        let tmp = dir.join(format!(
            ".{base}.{}-{nanos:x}-{attempt}.tmp",
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => {
                created = Some((tmp, f));
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    let Some((tmp, mut f)) = created else {
        return Err(std::io::Error::other(format!(
            "no unused temporary name beside {}",
            path.display()
        )));
    };
    let result = (|| {
        observe("created", &f)?;
        if let Some(g) = gid {
            nix::unistd::fchown(&f, None, Some(nix::unistd::Gid::from_raw(g)))?;
        }
        // After the chown, which may clear mode bits.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        observe("writing", &f)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself, across a crash.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn systemctl(args: &[String], dry_run: bool) -> Result<(), Failure> {
    run("systemctl", args, dry_run)
}

fn run(cmd: &str, args: &[String], dry_run: bool) -> Result<(), Failure> {
    if dry_run {
        println!("--- would run: {cmd} {}", args.join(" "));
        return Ok(());
    }
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| Failure::Failed(format!("cannot run {cmd}: {e}")))?;
    if !out.status.success() {
        return Err(Failure::Failed(format!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    println!("ran {cmd} {}", args.join(" "));
    Ok(())
}

/// Make the system bus load its policy files again. dbus-daemon also
/// notices them by itself, dbus-broker does not. Without a running bus there
/// is nothing to reload: it reads them when it starts.
fn reload_bus(dry_run: bool) {
    let args: Vec<String> = [
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "ReloadConfig",
    ]
    .map(String::from)
    .to_vec();
    if let Err(Failure::Failed(m) | Failure::Refused(m)) = run("busctl", &args, dry_run) {
        eprintln!("nodeherd: warning: {m}; the bus reads the new policy when it starts");
    }
}

fn uninstall_inner(args: &UninstallArgs) -> Result<(), Failure> {
    check_unit_name(&args.name)?;
    let config = args.dirs.config_dir.join(format!("{}.json", args.name));
    let ours = std::fs::read_to_string(&config)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| v.get(MARK).is_some());
    if !ours {
        return Err(Failure::Refused(format!(
            "{} was not written by `nodeherd install`; nothing removed",
            config.display()
        )));
    }
    systemctl(
        &[
            "disable".into(),
            "--now".into(),
            format!("nodeherd@{}.service", args.name),
            format!("nodeherd@{}.socket", args.name),
        ],
        args.dirs.dry_run,
    )?;
    let dropin_dir = args
        .dirs
        .unit_dir
        .join(format!("nodeherd@{}.socket.d", args.name));
    let policy = args
        .dirs
        .bus_policy_dir
        .join(format!("{}.conf", crate::dbus::bus_name_for(&args.name)));
    // Only the policy `install` writes: a hand-made one is the admin's.
    let had_policy = std::fs::read_to_string(&policy)
        .is_ok_and(|t| t == crate::dbus::bus_policy_for(&args.name));
    let mut remove = vec![config, dropin_dir.join("listen.conf")];
    if had_policy {
        remove.push(policy);
    }
    let service_dropin = args
        .dirs
        .unit_dir
        .join(format!("nodeherd@{}.service.d", args.name));
    remove_ours(
        &service_dropin.join("credentials.conf"),
        CREDENTIALS_HEADER,
        args.dirs.dry_run,
    )?;
    if !args.dirs.dry_run {
        let _ = std::fs::remove_dir(&service_dropin);
    }
    for path in remove {
        if !path.exists() {
            continue;
        }
        if args.dirs.dry_run {
            println!("--- would remove {}", path.display());
        } else {
            std::fs::remove_file(&path)
                .map_err(|e| Failure::Failed(format!("cannot remove {}: {e}", path.display())))?;
            println!("removed {}", path.display());
        }
    }
    if !args.dirs.dry_run {
        let _ = std::fs::remove_dir(&dropin_dir);
    }
    if had_policy {
        reload_bus(args.dirs.dry_run);
    }
    systemctl(&["daemon-reload".into()], args.dirs.dry_run)?;
    // The user stays, as system users do: files the app wrote keep an owner.
    println!(
        "{}: uninstalled (user {} stays)",
        args.name,
        crate::dbus::user_for(&args.name)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_become_load_credential_lines_and_nothing_else() {
        let text = credentials_dropin(&["db=/etc/secrets/db".into(), "api.key=/srv/k%1".into()])
            .ok()
            .flatten()
            .unwrap();
        assert!(text.starts_with(CREDENTIALS_HEADER), "{text}");
        assert!(
            text.ends_with(
                "[Service]\nLoadCredential=db:/etc/secrets/db\nLoadCredential=api.key:/srv/k%%1\n"
            ),
            "{text}"
        );
        assert!(credentials_dropin(&[]).ok().flatten().is_none());
        for bad in [
            "db",
            "=/etc/x",
            "../x=/etc/x",
            "a/b=/etc/x",
            "a:b=/etc/x",
            "db=relative/path",
            "db=/etc/x\nExecStartPre=/bin/sh -c evil",
            "db=/etc/with space",
            "db=/etc/back\\slash",
        ] {
            assert!(
                credentials_dropin(&[bad.into()]).is_err(),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn the_copy_a_dry_run_shows_hides_every_env_value() {
        let doc = serde_json::json!({"apps": [{"name": "a", "env": {"K": "v1"},
            "env_production": {"K": "v2"}, "env_file": ".env"}]});
        let shown = hide_env_values(&doc).to_string();
        assert!(!shown.contains("v1") && !shown.contains("v2"), "{shown}");
        assert!(shown.contains("\"K\":\"(hidden)\""), "{shown}");
        assert!(shown.contains("\".env\""), "paths stay: {shown}");
    }

    #[test]
    fn listen_addresses_become_socket_lines() {
        let ok = |a: &str| match socket_line(a) {
            Ok(l) => l,
            Err(_) => panic!("{a} refused"),
        };
        assert_eq!(ok("127.0.0.1:8000"), "ListenStream=127.0.0.1:8000");
        assert_eq!(ok("[::1]:8000"), "ListenStream=[::1]:8000");
        assert_eq!(ok("8000"), "ListenStream=8000");
        assert_eq!(ok("unix:/run/app.sock"), "ListenStream=/run/app.sock");
        assert_eq!(ok("udp:127.0.0.1:5353"), "ListenDatagram=127.0.0.1:5353");
        assert_eq!(ok("tcp:127.0.0.1:80"), "ListenStream=127.0.0.1:80");
        // A specifier character is kept literal (a link-local scope).
        assert_eq!(ok("[fe80::1%eth0]:80"), "ListenStream=[fe80::1%%eth0]:80");
        assert_eq!(ok("unix:/run/50%.sock"), "ListenStream=/run/50%%.sock");
        for bad in [
            "",
            "unix:rel.sock",
            "host:",
            "localhost:8000",
            "127.0.0.1:0",
            "1.2.3.4:99999",
            "a b:80",
            "[::1]8000",
            "udp:",
            "unix:/run/a.sock\nExecStartPre=/bin/touch /tmp/x",
            "unix:/run/a.sock\rExecStartPre=/bin/true",
            "unix:/run/a.sock\\",
            "unix:/run/a\tb.sock",
            "127.0.0.1:80\u{85}x",
            "unix:/run/a.sock\0",
        ] {
            assert!(socket_line(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("unix:/{}", "a".repeat(107));
        assert!(socket_line(&long).is_err());
    }

    #[test]
    fn unit_values_are_one_safe_word() {
        assert_eq!(unit_value("www-data").unwrap(), "www-data");
        assert_eq!(unit_value("a%b").unwrap(), "a%%b");
        for bad in ["", "a b", "a\nb", "a\\", "x\u{7f}"] {
            assert!(unit_value(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// The copy holding `env` is never readable by others, not even
    /// before its first byte: created owner-only, then given its group
    /// and mode on the descriptor, and only then written.
    #[test]
    fn private_files_have_their_mode_before_the_first_byte() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("nodeherd-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shop.json");
        // An old copy, readable by all, is replaced, not reused.
        std::fs::write(&path, "old").unwrap();
        let gid = 65534;
        let mut seen = Vec::new();
        let r = write_private(
            &path,
            "{\"env\":{\"TOKEN\":\"s3cret\"}}",
            0o640,
            Some(gid),
            &mut |stage, f| {
                let m = f.metadata()?;
                seen.push((stage, m.mode() & 0o7777, m.gid(), m.len()));
                Ok(())
            },
        );
        let meta = std::fs::metadata(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        r.unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        let (stage, mode, _, len) = seen[0];
        assert_eq!((stage, len), ("created", 0));
        assert_eq!(mode & 0o077, 0, "created readable by others: {mode:o}");
        assert_eq!(seen[1], ("writing", 0o640, gid, 0), "{seen:?}");
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_eq!(meta.gid(), gid);
        assert!(text.contains("s3cret"));
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("shop.json")],
            "a temporary file was left"
        );
    }

    #[test]
    fn user_names_are_checked() {
        assert!(check_user_name("shop-v2_eu1").is_ok());
        assert!(check_user_name("a234567890123456789012").is_ok());
        for bad in ["a2345678901234567890123", "my.app", "a:b", "ünï"] {
            assert!(check_user_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn unit_names_are_checked() {
        assert!(check_unit_name("shop-v2.eu_1").is_ok());
        for bad in ["", "my app", "a/b", "ünï", "x@y"] {
            assert!(check_unit_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
