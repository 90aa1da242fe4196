//! Resolving a parsed entry against the command line and the system:
//! overrides applied, paths made absolute and checked, the interpreter found
//! on `PATH`, users and groups looked up, `instances` counted against the
//! CPUs. The result is an [`App`] the supervisor can run as it is.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::file::absolute;
use super::keys::RawApp;
use super::values::{self, Instances};
use super::wrapper;
use super::{App, ConfigError, Credentials, Interpreter, Loaded, Overrides};

/// Replacements started at once during a reload, unless configured.
///
/// Two, as PM2 (its `PM2_CONCURRENT_ACTIONS`): one at a time cannot be as
/// fast as PM2 for an app that takes a while to listen, since each swap
/// waits for node's boot plus the app's own start (4 workers of an app that
/// listens after 400 ms: 2.0 s one at a time, 1.0 s two at a time, PM2
/// 1.6 s, in BENCHMARKS.md). The price is one more replacement booting at
/// a time (old workers that still drain come on top, each for at most
/// kill_timeout); `reload_parallel: 1` boots one at a time.
const DEFAULT_RELOAD_PARALLEL: u32 = 2;

/// What the system offers that a configuration is resolved against.
#[derive(Debug, Clone, Copy)]
pub struct System {
    pub cpus: u32,
}

/// Where a value came from, for errors that name the file, the app and the key.
struct At<'a> {
    source: &'a str,
    app: &'a str,
}

impl At<'_> {
    fn err(&self, key: &str, msg: String) -> ConfigError {
        ConfigError {
            source: self.source.to_string(),
            app: Some(self.app.to_string()),
            key: Some(key.to_string()),
            msg,
        }
    }
}

/// What to start: the script (or the node command a package script stands
/// for), its directory and arguments, the interpreter and its arguments,
/// and the environment a package script sets.
struct Program {
    cwd: PathBuf,
    script: PathBuf,
    args: Vec<String>,
    interpreter: Interpreter,
    interpreter_args: Vec<String>,
    env: Vec<(String, String)>,
}

pub fn resolve(
    raw: RawApp,
    mut warnings: Vec<String>,
    source: &str,
    label: &str,
    base: &Path,
    over: &Overrides,
    sys: System,
) -> Result<Loaded, ConfigError> {
    let at = At { source, app: label };
    let name = label.to_string();
    if name.is_empty() || name.len() > 200 || name.chars().any(|c| c.is_control() || c == '/') {
        return Err(at.err("name", format!("{name:?} is not a usable app name")));
    }
    let program = program(&raw, over, base, &at)?;
    let (instances, autoscale) = instances(&raw, over, sys, &at, &mut warnings)?;
    let instance_var = over
        .instance_var
        .clone()
        .or(raw.instance_var.clone())
        .unwrap_or_else(|| "NODE_APP_INSTANCE".into());
    if !values::is_env_name(&instance_var) {
        return Err(at.err(
            "instance_var",
            format!("{instance_var:?} is not a valid environment variable name"),
        ));
    }
    let credentials = resolve_credentials(raw.uid.as_deref(), raw.gid.as_deref())
        .map_err(|(key, msg)| at.err(key, msg))?;
    let env_file: Vec<PathBuf> = raw
        .env_file
        .iter()
        .flatten()
        .map(|f| normalize(&absolute(&program.cwd.join(f))))
        .collect();
    let from_files = read_env_files(&env_file, credentials.as_ref(), &at)?;
    let env = environment(&raw, over, program.env, from_files, &at)?;
    let filter_env = raw.filter_env.clone().unwrap_or_default();
    if let Some(var) = &raw.increment_var {
        check_increment_base(var, &env, &filter_env, &at)?;
    }
    let watch: Vec<PathBuf> = match &raw.watch {
        None => Vec::new(),
        Some(None) => vec![absolute(&program.cwd)],
        Some(Some(paths)) => paths
            .iter()
            .map(|p| normalize(&absolute(&program.cwd.join(p))))
            .collect(),
    };
    let ignore_watch = raw.ignore_watch.clone().unwrap_or_default();
    crate::watch::Ignore::new(&ignore_watch).map_err(|m| at.err("ignore_watch", m))?;
    if let Some(missing) = watch.iter().find(|p| !p.exists()) {
        return Err(at.err(
            "watch",
            format!(
                "{} does not exist: name paths under the app's directory, or `true` for all of it",
                missing.display()
            ),
        ));
    }
    let ms = Duration::from_millis;
    let listen_timeout = over
        .listen_timeout
        .map(ms)
        .or(raw.listen_timeout)
        .unwrap_or(ms(3000));
    if listen_timeout.is_zero() {
        return Err(at.err("listen_timeout", "must be more than 0".into()));
    }
    let reload_parallel = over
        .reload_parallel
        .or(raw.reload_parallel)
        .unwrap_or(DEFAULT_RELOAD_PARALLEL);
    if reload_parallel == 0 {
        return Err(at.err("reload_parallel", "must be at least 1".into()));
    }
    let balance = match &over.balance {
        Some(b) => values::balance(b).map_err(|m| at.err("balance", m))?,
        None => raw.balance.unwrap_or_default(),
    };
    let logs = super::logfiles::resolve(
        &raw.logs,
        &program.cwd,
        raw.fork_mode.unwrap_or(false),
        &mut warnings,
    )
    .map_err(|(key, msg)| at.err(key, msg))?;
    let shared_listen = raw.shared_listen.clone().unwrap_or_default();
    for a in &shared_listen {
        super::Allowed::parse(a).map_err(|m| at.err("shared_listen", m))?;
    }

    Ok(Loaded {
        app: App {
            name,
            script: absolute(&program.script),
            args: program.args,
            cwd: absolute(&program.cwd),
            interpreter: program.interpreter,
            interpreter_args: program.interpreter_args,
            instances,
            instance_var,
            env,
            wait_ready: over.wait_ready || raw.wait_ready.unwrap_or(false),
            listen_timeout,
            kill_timeout: over
                .kill_timeout
                .map(ms)
                .or(raw.kill_timeout)
                .unwrap_or(ms(1600)),
            shutdown_with_message: over.shutdown_with_message
                || raw.shutdown_with_message.unwrap_or(false),
            min_uptime: raw.min_uptime.unwrap_or(ms(1000)),
            max_restarts: raw.max_restarts.unwrap_or(16),
            restart_delay: raw.restart_delay.unwrap_or_default(),
            exp_backoff_restart_delay: raw.exp_backoff_restart_delay.unwrap_or_default(),
            autorestart: raw.autorestart.unwrap_or(true),
            max_memory_restart: raw.max_memory_restart,
            max_memory: raw.max_memory,
            cpu_weight: raw.cpu_weight,
            pids_max: raw.pids_max,
            max_event_loop_delay: raw.max_event_loop_delay,
            autopsy_on_memory: raw.autopsy_on_memory.unwrap_or(false),
            autopsy: raw.autopsy.unwrap_or(true),
            metrics: over.metrics.clone().or(raw.metrics.clone()),
            health: raw.health.clone(),
            health_agent: raw.health_agent.clone(),
            health_min_ready: raw.health_min_ready,
            drain_before_stop: raw.drain_before_stop.unwrap_or_default(),
            listen: if over.listen.is_empty() {
                raw.listen.clone().unwrap_or_default()
            } else {
                over.listen.clone()
            },
            shared_listen,
            reload_parallel,
            reload_strategy: raw.reload_strategy.unwrap_or_default(),
            canary: raw.canary.unwrap_or_default(),
            history_keep: raw.history_keep.unwrap_or(super::HISTORY_KEEP_DEFAULT),
            autoscale,
            credentials,
            balance,
            rebalance: !over.no_rebalance && raw.rebalance.unwrap_or(true),
            cron_restart: raw.cron_restart.clone(),
            watch,
            ignore_watch,
            watch_delay: raw.watch_delay.unwrap_or(super::DEFAULT_WATCH_DELAY),
            increment_var: raw.increment_var.clone(),
            stop_exit_codes: raw.stop_exit_codes.clone().unwrap_or_default(),
            autostart: raw.autostart.unwrap_or(true),
            filter_env,
            env_file,
            logs,
        },
        warnings,
    })
}

/// The script, where it runs, and with what: `script: 'npm', args:
/// 'start'` and `script: 'next'` become the node command they stand for
/// (see wrapper.rs); the interpreter is found on `PATH` and the script
/// checked.
fn program(raw: &RawApp, over: &Overrides, base: &Path, at: &At) -> Result<Program, ConfigError> {
    let mut script = raw
        .script
        .clone()
        .ok_or_else(|| at.err("script", "is missing: say which file to run".into()))?;
    let cwd = match &raw.cwd {
        Some(c) => base.join(c),
        None => base.to_path_buf(),
    };
    if !cwd.is_dir() {
        return Err(at.err("cwd", format!("{} is not a directory", cwd.display())));
    }
    let mut args = if over.args.is_empty() {
        raw.args.clone().unwrap_or_default()
    } else {
        over.args.clone()
    };
    // Interpreter: node unless told otherwise; `none` runs the script itself.
    let interp_name = over
        .interpreter
        .clone()
        .or(raw.interpreter.clone())
        .or(raw.exec_interpreter.clone());
    let mut wrapper_node_args = Vec::new();
    let mut env = Vec::new();
    let node_interpreter = match interp_name.as_deref() {
        None | Some("") => true,
        Some("none") => false,
        Some(i) => Path::new(i)
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("node")),
    };
    if node_interpreter && !cwd.join(&script).exists() {
        if wrapper::is_package_manager(&script) {
            let cmd =
                wrapper::package_script(&cwd, &script, &args).map_err(|m| at.err("script", m))?;
            script = cmd.script;
            args = cmd.args;
            wrapper_node_args = cmd.node_args;
            env = cmd.env;
        } else if let Some(bin) = wrapper::bin_command(&cwd, &script) {
            script = bin.display().to_string();
        }
    }
    let script = normalize(&cwd.join(&script));
    let interpreter = match interp_name.as_deref() {
        None | Some("node") | Some("") => Interpreter::Node(PathBuf::from("node")),
        Some("none") => Interpreter::None,
        Some(other) => {
            let base_name = Path::new(other)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("");
            if base_name.starts_with("node") {
                Interpreter::Node(PathBuf::from(other))
            } else {
                Interpreter::Other(PathBuf::from(other))
            }
        }
    };
    check_runnable(&interpreter, &script, at)?;
    let mut interpreter_args: Vec<String> = match &over.node_args {
        Some(a) => a.split_whitespace().map(str::to_string).collect(),
        None => raw
            .node_args
            .clone()
            .or(raw.interpreter_args.clone())
            .unwrap_or_default(),
    };
    interpreter_args.extend(wrapper_node_args);
    interpreter_args.retain(|a| !a.is_empty());
    Ok(Program {
        cwd,
        script,
        args,
        interpreter,
        interpreter_args,
        env,
    })
}

/// The interpreter is on `PATH` and executable, and the script is a file
/// (or, run directly, an executable one).
fn check_runnable(interpreter: &Interpreter, script: &Path, at: &At) -> Result<(), ConfigError> {
    match interpreter {
        Interpreter::Node(p) | Interpreter::Other(p) => {
            if find_executable(p).is_none() {
                return Err(at.err(
                    "interpreter",
                    format!("{} was not found or is not executable", p.display()),
                ));
            }
            if !script.is_file() {
                return Err(at.err(
                    "script",
                    format!("{} does not exist or is not a file", script.display()),
                ));
            }
        }
        Interpreter::None => {
            if find_executable(script).is_none() {
                return Err(at.err(
                    "script",
                    format!("{} was not found or is not executable", script.display()),
                ));
            }
        }
    }
    Ok(())
}

/// `instances` (or `-i`) against the CPUs; PM2 starts one when it is
/// unset, and `exec_mode: fork` always one. As `{min, max}` it also turns
/// autoscaling on, starting at `min`; `-i` on the command line fixes the
/// count and turns it off.
fn instances(
    raw: &RawApp,
    over: &Overrides,
    sys: System,
    at: &At,
    warnings: &mut Vec<String>,
) -> Result<(u32, Option<super::autoscale::Autoscale>), ConfigError> {
    if let Some(s) = &over.instances {
        let n = values::instances(&serde_json::Value::String(s.clone()))
            .and_then(|i| i.resolve(sys.cpus))
            .map_err(|msg| ConfigError {
                source: "command line".into(),
                app: Some(at.app.to_string()),
                key: Some("--instances".into()),
                msg,
            })?;
        if raw.instances_range.is_some() {
            warnings.push(format!(
                "{}: app \"{}\": --instances {n} fixes the count; autoscaling is off",
                at.source, at.app
            ));
        }
        return Ok((n, None));
    }
    let autoscale = super::autoscale::resolve(raw.instances_range, raw.autoscale, sys.cpus)
        .map_err(|(key, m)| at.err(key, m))?;
    if raw.fork_mode.unwrap_or(false) && autoscale.is_some() {
        return Err(at.err(
            "instances",
            "exec_mode fork runs one worker: autoscaling needs exec_mode cluster".into(),
        ));
    }
    let n = match &autoscale {
        Some(a) => a.min,
        None => raw
            .instances
            .unwrap_or(Instances::Count(1))
            .resolve(sys.cpus)
            .map_err(|m| at.err("instances", m))?,
    };
    if raw.fork_mode.unwrap_or(false) && n > 1 {
        warnings.push(format!(
            "{}: app \"{}\": exec_mode fork runs one worker; `instances` ignored",
            at.source, at.app
        ));
        return Ok((1, None));
    }
    Ok((n, autoscale))
}

/// The package script's own assignments, then the `env_file`s in order,
/// then the app's `env`, then `env_<name>` for `--env <name>`.
fn environment(
    raw: &RawApp,
    over: &Overrides,
    script_env: Vec<(String, String)>,
    from_files: Vec<(String, String)>,
    at: &At,
) -> Result<std::collections::BTreeMap<String, String>, ConfigError> {
    let mut env: std::collections::BTreeMap<String, String> = script_env.into_iter().collect();
    env.extend(from_files);
    env.extend(raw.env.clone().unwrap_or_default());
    if let Some(env_name) = &over.env_name {
        let Some(extra) = raw.env_named.get(env_name) else {
            return Err(at.err(
                &format!("env_{env_name}"),
                format!("--env {env_name} was given but the app has no `env_{env_name}`"),
            ));
        };
        env.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    Ok(env)
}

/// Largest `env_file` read: far beyond any real one.
const MAX_ENV_FILE: u64 = 1 << 20;

/// The variables of `files`, in order. With `uid`/`gid`, each is read with
/// the workers' rights and no more: a manager that runs as root must not
/// hand a file only root may read to workers the file's author controls.
/// Errors name the file and the line, never a value.
fn read_env_files(
    files: &[PathBuf],
    credentials: Option<&Credentials>,
    at: &At,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for file in files {
        let text = read_with(file, credentials)
            .map_err(|e| at.err("env_file", format!("{}: cannot read: {e}", file.display())))?;
        let parsed = super::env_file::parse(&text)
            .map_err(|e| at.err("env_file", format!("{}: {e}", file.display())))?;
        vars.extend(parsed);
    }
    Ok(vars)
}

/// Read `file` (at most [`MAX_ENV_FILE`] bytes), as the user `credentials`
/// name when given, on a thread that takes those rights alone.
fn read_with(file: &Path, credentials: Option<&Credentials>) -> std::io::Result<String> {
    use std::io::Read;
    let path = file.to_path_buf();
    let read = move || -> std::io::Result<String> {
        use std::os::unix::fs::OpenOptionsExt;
        // Non-blocking: a FIFO named here must not hold the load up.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        let mut text = String::new();
        file.take(MAX_ENV_FILE + 1).read_to_string(&mut text)?;
        if text.len() as u64 > MAX_ENV_FILE {
            return Err(std::io::Error::other(format!(
                "larger than {} KiB",
                MAX_ENV_FILE >> 10
            )));
        }
        Ok(text)
    };
    let Some(c) = credentials else {
        return read();
    };
    let mut groups = c.groups.clone();
    groups.sort_unstable();
    groups.dedup();
    let rights = crate::rights::Rights {
        uid: [c.uid; 4],
        gid: [c.gid; 4],
        groups,
        cap_eff: 0,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    crate::rights::Rights::spawn(Some(rights), move |taken| {
        let _ = tx.send(taken.and_then(|()| read()));
    })?;
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .unwrap_or_else(|_| Err(std::io::Error::other("timed out")))
}

/// `increment_var` adds the slot index to the variable's value, which must
/// then be a whole number (or absent: 0, as PM2). The value is never shown.
fn check_increment_base(
    var: &str,
    env: &std::collections::BTreeMap<String, String>,
    filter: &super::FilterEnv,
    at: &At,
) -> Result<(), ConfigError> {
    let inherited = || {
        (!filter.drops(var))
            .then(|| std::env::var(var).ok())
            .flatten()
    };
    let Some(base) = env.get(var).cloned().or_else(inherited) else {
        return Ok(());
    };
    if base.trim().parse::<i64>().is_err() {
        return Err(at.err(
            "increment_var",
            format!(
                "the value of {var} (from env, env_file or the manager's environment) is not a whole number, so the instance cannot be added to it"
            ),
        ));
    }
    Ok(())
}

/// `uid`/`gid`: a name or a number each; a user alone brings its primary group.
/// An error names the key.
fn resolve_credentials(
    uid: Option<&str>,
    gid: Option<&str>,
) -> Result<Option<Credentials>, (&'static str, String)> {
    use nix::unistd::{Gid, Group, Uid, User};
    if uid.is_none() && gid.is_none() {
        return Ok(None);
    }
    let user = match uid {
        None => None,
        Some(u) => {
            let found = match u.parse::<u32>() {
                Ok(n) => User::from_uid(Uid::from_raw(n))
                    .ok()
                    .flatten()
                    .or(Some(User {
                        name: n.to_string(),
                        passwd: Default::default(),
                        uid: Uid::from_raw(n),
                        gid: Gid::from_raw(n),
                        gecos: Default::default(),
                        dir: Default::default(),
                        shell: Default::default(),
                    })),
                Err(_) => User::from_name(u).ok().flatten(),
            };
            Some(found.ok_or_else(|| ("uid", format!("no user named {u:?} on this system")))?)
        }
    };
    let gid = match gid {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| ("gid", format!("no group named {g:?} on this system")))?
                .gid
                .as_raw(),
        },
        None => user.as_ref().map_or(0, |u| u.gid.as_raw()),
    };
    let uid = user
        .as_ref()
        .map_or_else(|| nix::unistd::getuid().as_raw(), |u| u.uid.as_raw());
    let mut groups = vec![gid];
    if let Some(u) = &user
        && let Ok(name) = std::ffi::CString::new(u.name.clone())
        && let Ok(list) = nix::unistd::getgrouplist(&name, Gid::from_raw(gid))
    {
        groups = list.into_iter().map(Gid::as_raw).collect();
    }
    Ok(Some(Credentials { uid, gid, groups }))
}

/// Drop `.` components and fold `..` lexically, so logs show clean paths.
pub fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// Where `program` resolves to, if it is an executable file (PATH lookup for bare names).
pub fn find_executable(program: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let ok = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.components().count() > 1 || program.is_absolute() {
        return ok(program).then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| ok(p))
}
