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
    dropin: Option<(PathBuf, String)>,
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
    let entries = config::read_entries(&file).map_err(|e| Failure::Refused(e.to_string()))?;
    let base = file.parent().unwrap_or(Path::new("/")).to_path_buf();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
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
        // The whole configuration must be valid before anything is written.
        let over = Overrides {
            only: Some(name.clone()),
            ..Overrides::default()
        };
        config::load(&file, &over, cpus).map_err(|e| Failure::Refused(e.to_string()))?;
        plans.push(plan(args, &file, &base, entry, &name)?);
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
        write_file(&p.sysusers.0, &p.sysusers.1, args.dirs.dry_run, None)?;
        run(
            "systemd-sysusers",
            &[p.sysusers.0.display().to_string()],
            args.dirs.dry_run,
        )?;
    }
    for p in &plans {
        write_file(&p.policy.0, &p.policy.1, args.dirs.dry_run, Some(0o644))?;
    }
    reload_bus(args.dirs.dry_run);
    for p in &plans {
        let group = crate::dbus::user_for(&p.name);
        write_config(&p.config, &p.config_text, &group, args.dirs.dry_run)?;
        if let Some((path, text)) = &p.dropin {
            write_file(path, text, args.dirs.dry_run, Some(0o644))?;
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
) -> Result<Plan, Failure> {
    let mut entry = entry.clone();
    // The copy lives in /etc/nodeherd: paths relative to the original
    // file's directory must not change meaning.
    let cwd = match entry.get("cwd").and_then(Value::as_str) {
        Some(c) => base.join(c),
        None => base.to_path_buf(),
    };
    entry.insert("cwd".into(), Value::String(cwd.display().to_string()));
    let listen: Vec<String> = if args.listen.is_empty() {
        match entry.get("listen") {
            Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    } else {
        args.listen.clone()
    };
    let doc = serde_json::json!({
        MARK: file.display().to_string(),
        "apps": [Value::Object(entry)],
    });
    let config_text = serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n";
    let dropin = if listen.is_empty() {
        None
    } else {
        let mut text = String::from(
            "# Written by `nodeherd install`: where the app listens.\n[Socket]\nListenStream=\n",
        );
        for a in &listen {
            text.push_str(&socket_line(a)?);
            text.push('\n');
        }
        Some((
            args.dirs
                .unit_dir
                .join(format!("nodeherd@{name}.socket.d"))
                .join("listen.conf"),
            text,
        ))
    };
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
        dropin,
        sysusers,
        policy,
    })
}

/// A `--listen` address as a `[Socket]` line.
fn socket_line(addr: &str) -> Result<String, Failure> {
    let bad = || {
        Failure::Refused(format!(
            "--listen {addr}: expected HOST:PORT, [IPv6]:PORT, PORT, unix:/path or udp:HOST:PORT"
        ))
    };
    if let Some(path) = addr.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(bad());
        }
        return Ok(format!("ListenStream={path}"));
    }
    if let Some(rest) = addr.strip_prefix("udp:") {
        if rest.is_empty() {
            return Err(bad());
        }
        return Ok(format!("ListenDatagram={rest}"));
    }
    let rest = addr.strip_prefix("tcp:").unwrap_or(addr);
    let port_ok = rest
        .rsplit(':')
        .next()
        .is_some_and(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if rest.is_empty() || !port_ok || rest.contains(char::is_whitespace) {
        return Err(bad());
    }
    Ok(format!("ListenStream={rest}"))
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
    write_file(path, text, dry_run, Some(0o640))?;
    if dry_run {
        return Ok(());
    }
    match nix::unistd::Group::from_name(group).ok().flatten() {
        Some(g) => nix::unistd::chown(path, None, Some(g.gid)).map_err(|e| {
            Failure::Failed(format!(
                "cannot give {} to group {group}: {e}",
                path.display()
            ))
        }),
        None => Err(Failure::Failed(format!(
            "group {group} does not exist after systemd-sysusers; {} stays root's only",
            path.display()
        ))),
    }
}

fn write_file(path: &Path, text: &str, dry_run: bool, mode: Option<u32>) -> Result<(), Failure> {
    if dry_run {
        println!("--- would write {}\n{text}", path.display());
        return Ok(());
    }
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
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
    let tmp = path.with_extension("tmp-nodeherd");
    std::fs::write(&tmp, text).map_err(denied)?;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = mode.unwrap_or(0o644);
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(denied)?;
    }
    std::fs::rename(&tmp, path).map_err(denied)?;
    println!("wrote {}", path.display());
    Ok(())
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
        for bad in [
            "",
            "unix:rel.sock",
            "host:",
            "127.0.0.1:0",
            "1.2.3.4:99999",
            "a b:80",
        ] {
            assert!(socket_line(bad).is_err(), "{bad:?} accepted");
        }
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
