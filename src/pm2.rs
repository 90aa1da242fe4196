//! PM2's verbs, for the hands of PM2's users: `start`, `stop`, `delete`
//! (`ls` and `logs` have modules of their own), and a one-line pointer for
//! PM2's commands that nodeherd has no need of (`save`, `startup`, ...).
//!
//! nodeherd has no daemon of its own that holds a process list: each app
//! has its own manager, run by systemd (the template `nodeherd@APP`, or a
//! transient `nodeherd-APP` that `start` makes) or by hand in a shell. So
//! `start` starts a unit or runs in the foreground, and `stop` stops the
//! app's units or signals its manager. A manager is signalled only when
//! the kernel says the process is the one the bus or the control socket
//! named, owned by the same user as then (a pidfd is taken first, so a pid
//! that was reused since is never signalled), and only as far as the
//! caller may signal it anyway.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use crate::cli::{BusArgs, DeleteArgs, RunArgs, StopArgs, UninstallArgs};
use crate::client::{Failure, outln, reach};
use crate::discover::{self, printable};

/// What to do instead of PM2's commands that have no nodeherd twin; `None`
/// for every other word.
pub fn hint(verb: &str) -> Option<&'static str> {
    Some(match verb {
        "save" | "dump" => {
            "nodeherd keeps no process list to save: `nodeherd install FILE` puts an app under \
             systemd, which starts it on its first connection (or at boot with --boot)"
        }
        "startup" => {
            "systemd starts installed apps at boot by itself: `nodeherd install FILE --boot`"
        }
        "unstartup" => "`nodeherd uninstall APP`, or `systemctl disable nodeherd@APP.service`",
        "resurrect" => {
            "systemd starts installed apps by itself; `nodeherd start APP` starts one now; \
             `nodeherd install ~/.pm2/dump.pm2` installs the cluster apps PM2 saved"
        }
        "kill" => {
            "there is no nodeherd daemon to kill: each app has its own manager; \
             `nodeherd stop APP` (or `nodeherd stop all`) stops them"
        }
        "jlist" | "prettylist" => "`nodeherd ls --json`",
        "flush" => {
            "the workers' lines are in the journal, which trims itself (journald.conf \
             SystemMaxUse=); `journalctl --vacuum-time=1d` drops older lines of every unit"
        }
        "reloadLogs" => "the journal needs no reopening: there is nothing to do",
        "update" => {
            "`nodeherd reexec APP` runs the nodeherd binary now on disk, every worker kept \
             (the packages do it on upgrade)"
        }
        "env" => {
            "nodeherd does not print an app's environment (it may hold secrets): \
             read its ecosystem file"
        }
        _ => return None,
    })
}

/// How long the manager has to answer whether it runs, before `start`.
const ASK: Duration = Duration::from_secs(5);

/// `nodeherd start TARGET [run's flags]`.
pub fn start(args: RunArgs) -> ExitCode {
    let target = args.target.clone();
    let plain_name = target.components().count() == 1 && !target.exists();
    if plain_name {
        return start_installed(&target.display().to_string());
    }
    let source = crate::run::source_of(&args);
    // A file of several apps starts them all, as PM2 does: a manager each.
    let apps: Vec<String> = match source.load_found() {
        Ok(crate::config::Found::One(l)) => vec![l.app.name],
        Ok(crate::config::Found::Several(all)) => all.into_iter().map(|(name, _)| name).collect(),
        Err(e) => {
            eprintln!("nodeherd: {e}");
            return ExitCode::from(2);
        }
    };
    // PM2 refuses to start what runs already; so does this. A manager
    // run with --no-bus is still found by its control socket.
    let mut ask = args.bus.clone();
    ask.no_bus = false;
    for app in &apps {
        let running = crate::client::block_on(async {
            tokio::time::timeout(ASK, reach(Some(app), &ask))
                .await
                .ok()
                .and_then(Result::ok)
                .map(|r| (r.pid, r.via))
        });
        if let Ok(Some((pid, via))) = running {
            eprintln!(
                "nodeherd: {} already runs (manager pid {}, {}): `nodeherd reload {}` loads new code \
                 with no downtime; `nodeherd stop {}` first to start it afresh",
                printable(app),
                pid.map_or("?".into(), |p| p.to_string()),
                via.describe(),
                printable(app),
                printable(app)
            );
            return ExitCode::from(1);
        }
    }
    let as_unit = nix::unistd::geteuid().is_root()
        && discover::systemd_booted()
        && !args.bus.no_bus
        && args.bus.bus.is_none()
        && !args.bus.user;
    if as_unit {
        // A unit each, `--only` picking its app of the file.
        let several = apps.len() > 1;
        for app in &apps {
            let code = start_transient(app, several);
            if code != ExitCode::SUCCESS {
                return code;
            }
        }
        return ExitCode::SUCCESS;
    }
    let app = apps
        .iter()
        .map(|a| printable(a))
        .collect::<Vec<_>>()
        .join(", ");
    let why = if discover::systemd_booted() {
        "not root"
    } else {
        "systemd does not run here"
    };
    eprintln!(
        "nodeherd: starting {app} in the foreground ({why}): Ctrl-C stops {}; \
         `nodeherd install FILE` makes {} a service that outlives this shell",
        if apps.len() > 1 { "them" } else { "it" },
        if apps.len() > 1 { "each" } else { "it" },
    );
    crate::run::main(args)
}

/// The command `start` runs an app with as root under systemd: a transient
/// service `nodeherd-APP.service` running `nodeherd run` with the same
/// arguments, in this directory, with this shell's `PATH` (so the same
/// `node` is found) and no other variable of the shell: a unit's
/// environment can be read by every local user (`systemctl show`), and a
/// shell's may hold secrets. Its control socket is in
/// `/run/nodeherd/APP/`; it takes no bus name (the system bus lets only an
/// installed app's user own one).
pub fn transient_command(app: &str, exe: &Path, cwd: &Path, run_args: &[String]) -> Vec<String> {
    let unit = discover::transient_unit(app);
    let exe = exe.display().to_string();
    let mut argv: Vec<String> = vec![
        "systemd-run".into(),
        format!("--unit={unit}"),
        format!("--description=nodeherd app {app} (nodeherd start)"),
        "--collect".into(),
        "--quiet".into(),
        "--property=Type=notify".into(),
        "--property=NotifyAccess=main".into(),
        "--property=KillMode=mixed".into(),
        "--property=TimeoutStopSec=30s".into(),
        "--property=Restart=on-failure".into(),
        "--property=RestartPreventExitStatus=2 4".into(),
        format!("--property=RuntimeDirectory=nodeherd/{app}"),
        "--property=RuntimeDirectoryMode=0700".into(),
        format!(
            "--property=ExecReload={} reload {}",
            crate::worker::shell_quote(&exe),
            crate::worker::shell_quote(app)
        ),
        format!("--working-directory={}", cwd.display()),
    ];
    if let Ok(path) = std::env::var("PATH") {
        argv.push(format!("--setenv=PATH={path}"));
    }
    argv.push("--".into());
    argv.push(exe);
    argv.push("run".into());
    argv.extend(run_args.iter().cloned());
    argv.push("--no-bus".into());
    argv
}

fn start_transient(app: &str, only: bool) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("nodeherd: cannot tell where this program is: {e}");
            return ExitCode::from(1);
        }
    };
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    // `nodeherd start ARGS...` is `nodeherd run ARGS...`.
    let mut run_args: Vec<String> = std::env::args().skip(2).collect();
    if only {
        run_args.splice(0..0, ["--only".to_string(), app.to_string()]);
    }
    let argv = transient_command(app, &exe, &cwd, &run_args);
    // systemd-run waits for READY=1 (Type=notify): the workers are ready.
    match Command::new(&argv[0]).args(&argv[1..]).status() {
        Ok(s) if s.success() => {
            outln!(
                "nodeherd: started {} as {} (`nodeherd status {}`, `nodeherd logs {}`, `nodeherd stop {}`)",
                printable(app),
                discover::transient_unit(app),
                printable(app),
                printable(app),
                printable(app)
            );
            ExitCode::SUCCESS
        }
        Ok(_) => {
            eprintln!(
                "nodeherd: {} did not start: see `journalctl -u {}`",
                printable(app),
                discover::transient_unit(app)
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("nodeherd: cannot run systemd-run: {e}");
            ExitCode::from(1)
        }
    }
}

/// `nodeherd start NAME` for an installed app: its socket and service.
fn start_installed(name: &str) -> ExitCode {
    let dir = Path::new(discover::CONFIG_DIR);
    let Some(config) = discover::config_of(dir, name) else {
        eprintln!(
            "nodeherd: no file {} here, and no app {} is installed ({}/{}.json): give a script or an ecosystem file",
            printable(name),
            printable(name),
            dir.display(),
            printable(name)
        );
        return ExitCode::from(2);
    };
    if !discover::systemd_booted() {
        eprintln!(
            "nodeherd: {} is installed for systemd ({}), but systemd does not run here: `nodeherd run {}`",
            printable(name),
            config.display(),
            config.display()
        );
        return ExitCode::from(2);
    }
    let units = [
        format!("nodeherd@{name}.socket"),
        format!("nodeherd@{name}.service"),
    ];
    match systemctl(&["start"], &units) {
        Ok(()) => {
            outln!(
                "nodeherd: started {} ({})",
                printable(name),
                units.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(Failure(code, msg)) => {
            eprintln!("nodeherd: {msg}");
            ExitCode::from(code)
        }
    }
}

/// `systemctl VERB... UNITS...`, its error said with its own words.
fn systemctl(verb: &[&str], units: &[String]) -> Result<(), Failure> {
    let out = Command::new("systemctl")
        .args(verb)
        .args(units)
        .output()
        .map_err(|e| Failure(1, format!("cannot run systemctl: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let code = if err.contains("Access denied") || err.contains("Interactive authentication") {
        5
    } else {
        1
    };
    Err(Failure(
        code,
        format!(
            "systemctl {} {} failed: {err}",
            verb.join(" "),
            units.join(" ")
        ),
    ))
}

/// `nodeherd stop APP|all`.
pub fn stop(args: StopArgs) -> ExitCode {
    let timeout = Duration::from_secs(args.timeout);
    crate::client::run_client(async move {
        if args.app != "all" {
            return stop_one(&args.app, &args.bus, timeout).await.map(|_| ());
        }
        let mut apps: Vec<String> = discover::running(&args.bus)
            .await
            .0
            .into_iter()
            .map(|r| r.app)
            .collect();
        if let Some(units) = discover::units().await {
            apps.extend(
                units
                    .iter()
                    .filter(|u| u.is_up())
                    .filter_map(|u| discover::app_of_unit(&u.name).map(|a| a.0)),
            );
        }
        apps.sort();
        apps.dedup();
        if apps.is_empty() {
            outln!("nodeherd: no app is running");
        }
        let mut failed = None;
        for app in apps {
            if let Err(f) = stop_one(&app, &args.bus, timeout).await {
                eprintln!("nodeherd: {}", f.1);
                failed = Some(f.0);
            }
        }
        match failed {
            Some(code) => Err(Failure(code, "not every app stopped".into())),
            None => Ok(()),
        }
    })
}

/// How an app was stopped.
enum Stopped {
    Units,
    Manager,
}

/// Stop `app`: its units when systemd runs any, else its manager.
async fn stop_one(app: &str, bus: &BusArgs, timeout: Duration) -> Result<Stopped, Failure> {
    if let Some(units) = discover::units().await {
        let up: Vec<String> = units
            .iter()
            .filter(|u| u.is_up() && discover::app_of_unit(&u.name).is_some_and(|a| a.0 == app))
            .map(|u| u.name.clone())
            .collect();
        if !up.is_empty() {
            systemctl(&["stop"], &up)?;
            outln!(
                "nodeherd: stopped {} ({}); `nodeherd start {}` starts it again",
                printable(app),
                up.join(", "),
                printable(app)
            );
            return Ok(Stopped::Units);
        }
    }
    let reached = reach(Some(app), bus).await?;
    let Some(pid) = reached.pid else {
        return Err(Failure(
            1,
            format!(
                "cannot tell the pid of {}'s manager ({}): stop it where it runs",
                printable(app),
                reached.via.describe()
            ),
        ));
    };
    let uid = reached.uid;
    let via = reached.via.describe();
    drop(reached);
    let t0 = Instant::now();
    let pidfd = signal_manager(pid, uid, app)?;
    let gone = tokio::task::spawn_blocking(move || wait_exit(&pidfd, timeout))
        .await
        .unwrap_or(false);
    if !gone {
        return Err(Failure(
            1,
            format!(
                "{}'s manager (pid {pid}) was asked to stop and still runs after {} s",
                printable(app),
                timeout.as_secs()
            ),
        ));
    }
    outln!(
        "nodeherd: stopped {} (manager pid {pid}, found by its {via}; every worker gone in {} ms)",
        printable(app),
        t0.elapsed().as_millis()
    );
    Ok(Stopped::Manager)
}

/// SIGTERM to the manager `pid`, which the bus or its control socket said
/// runs as `uid`. The pidfd is taken first and the uid checked after: a
/// pid reused by another process since is not signalled.
fn signal_manager(pid: u32, uid: Option<u32>, app: &str) -> Result<OwnedFd, Failure> {
    let gone = || {
        Failure(
            3,
            format!("{}'s manager (pid {pid}) is gone already", printable(app)),
        )
    };
    let raw_pid = libc::pid_t::try_from(pid).map_err(|_| gone())?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
    if fd < 0 {
        return Err(gone());
    }
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let now = process_uid(pid);
    if uid.is_none() || now != uid {
        return Err(Failure(
            1,
            format!(
                "pid {pid} runs as uid {} now, not as {}'s manager did (uid {}): not signalling it",
                now.map_or("?".into(), |u| u.to_string()),
                printable(app),
                uid.map_or("?".into(), |u| u.to_string())
            ),
        ));
    }
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGTERM,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EPERM) => Failure(
                5,
                format!(
                    "access denied: {}'s manager (pid {pid}) runs as uid {}, which you may not signal: \
                     stop it as root or as that user",
                    printable(app),
                    uid.unwrap_or(0)
                ),
            ),
            Some(libc::ESRCH) => gone(),
            _ => Failure(1, format!("cannot signal pid {pid}: {e}")),
        });
    }
    Ok(pidfd)
}

/// The effective uid of `pid` now, from `/proc`.
fn process_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Wait until the process of `pidfd` has exited, at most `timeout`.
fn wait_exit(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n > 0 {
            return true;
        }
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if left.is_zero() {
            return false;
        }
    }
}

/// `nodeherd delete APP`: stop it, then undo `nodeherd install` where it
/// installed the app.
pub fn delete(args: DeleteArgs) -> ExitCode {
    let app = args.app.clone();
    let config = discover::config_of(&args.dirs.config_dir, &app);
    let dry_run = args.dirs.dry_run;
    let stopped = crate::client::block_on(async {
        if dry_run {
            return match reach(Some(&app), &args.bus).await {
                Ok(r) => {
                    outln!(
                        "--- would stop {} (manager pid {})",
                        printable(&app),
                        r.pid.map_or("?".into(), |p| p.to_string())
                    );
                    Ok(true)
                }
                Err(Failure(3, _)) if config.is_some() => Ok(false),
                Err(f) => Err(f),
            };
        }
        match stop_one(&app, &args.bus, Duration::from_secs(60)).await {
            Ok(_) => Ok(true),
            // Installed and not running: there is still something to delete.
            Err(Failure(3, _)) if config.is_some() => Ok(false),
            Err(f) => Err(f),
        }
    });
    let stopped = match stopped.and_then(|r| r) {
        Ok(s) => s,
        Err(Failure(code, msg)) => {
            eprintln!("nodeherd: {msg}");
            return ExitCode::from(code);
        }
    };
    match config {
        Some(c) if c.extension().is_some_and(|e| e == "json") && !c.ends_with(".config.json") => {
            crate::install::uninstall(UninstallArgs {
                name: app,
                dirs: args.dirs,
            })
        }
        Some(c) => {
            eprintln!(
                "nodeherd: {} was not written by `nodeherd install`: left in place; remove it \
                 (and `systemctl disable nodeherd@{}.socket`) yourself",
                c.display(),
                printable(&app)
            );
            ExitCode::from(2)
        }
        None => {
            if stopped {
                outln!(
                    "nodeherd: deleted {}: it was not installed, so there is nothing more to remove",
                    printable(&app)
                );
            }
            ExitCode::SUCCESS
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pm2_only_commands_point_somewhere_real() {
        for verb in ["save", "startup", "resurrect", "kill", "jlist", "flush"] {
            let h = hint(verb).unwrap();
            assert!(
                h.contains("nodeherd") || h.contains("journal"),
                "{verb}: {h}"
            );
        }
        // Commands nodeherd has are not shadowed by a hint.
        for verb in [
            "start", "stop", "delete", "ls", "list", "logs", "status", "reload", "restart",
            "scale", "monit", "install",
        ] {
            assert_eq!(hint(verb), None, "{verb}");
        }
    }

    #[test]
    fn the_transient_unit_runs_the_same_arguments_with_no_secret() {
        let argv = transient_command(
            "web",
            Path::new("/usr/bin/nodeherd"),
            Path::new("/srv/my app"),
            &["app.js".into(), "-i".into(), "2".into()],
        );
        let joined = argv.join("\n");
        assert_eq!(argv[0], "systemd-run");
        assert!(joined.contains("--unit=nodeherd-web.service"), "{joined}");
        assert!(joined.contains("--property=Type=notify"), "{joined}");
        assert!(
            joined.contains("--working-directory=/srv/my app"),
            "{joined}"
        );
        assert!(
            joined.contains("--property=ExecReload=/usr/bin/nodeherd reload web"),
            "{joined}"
        );
        let tail: Vec<&str> = argv[argv.iter().position(|a| a == "--").unwrap() + 1..]
            .iter()
            .map(String::as_str)
            .collect();
        assert_eq!(
            tail,
            ["/usr/bin/nodeherd", "run", "app.js", "-i", "2", "--no-bus"]
        );
        // Of the shell's environment only PATH goes along.
        let setenv: Vec<&String> = argv.iter().filter(|a| a.starts_with("--setenv")).collect();
        assert!(
            setenv.iter().all(|a| a.starts_with("--setenv=PATH=")),
            "{setenv:?}"
        );
    }
}
