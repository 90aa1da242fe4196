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

pub fn resolve(
    raw: RawApp,
    mut warnings: Vec<String>,
    source: &str,
    label: &str,
    base: &Path,
    over: &Overrides,
    sys: System,
) -> Result<Loaded, ConfigError> {
    let err = |key: &str, msg: String| ConfigError {
        source: source.to_string(),
        app: Some(label.to_string()),
        key: Some(key.to_string()),
        msg,
    };
    let script = raw
        .script
        .clone()
        .ok_or_else(|| err("script", "is missing: say which file to run".into()))?;
    let name = label.to_string();
    if name.is_empty() || name.len() > 200 || name.chars().any(|c| c.is_control() || c == '/') {
        return Err(err("name", format!("{name:?} is not a usable app name")));
    }

    let cwd = match &raw.cwd {
        Some(c) => base.join(c),
        None => base.to_path_buf(),
    };
    if !cwd.is_dir() {
        return Err(err("cwd", format!("{} is not a directory", cwd.display())));
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

    // `script: 'npm', args: 'start'` and `script: 'next'`: the node command
    // they stand for (see wrapper.rs).
    let mut script = script;
    let mut wrapper_node_args = Vec::new();
    let mut wrapper_env = Vec::new();
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
                wrapper::package_script(&cwd, &script, &args).map_err(|m| err("script", m))?;
            script = cmd.script;
            args = cmd.args;
            wrapper_node_args = cmd.node_args;
            wrapper_env = cmd.env;
        } else if let Some(bin) = wrapper::bin_command(&cwd, &script) {
            script = bin.display().to_string();
        }
    }
    let script_path = normalize(&cwd.join(&script));
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
    match &interpreter {
        Interpreter::Node(p) | Interpreter::Other(p) => {
            if find_executable(p).is_none() {
                return Err(err(
                    "interpreter",
                    format!("{} was not found or is not executable", p.display()),
                ));
            }
            if !script_path.is_file() {
                return Err(err(
                    "script",
                    format!("{} does not exist or is not a file", script_path.display()),
                ));
            }
        }
        Interpreter::None => {
            if find_executable(&script_path).is_none() {
                return Err(err(
                    "script",
                    format!(
                        "{} was not found or is not executable",
                        script_path.display()
                    ),
                ));
            }
        }
    }

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

    let fork_mode = raw.fork_mode.unwrap_or(false);
    let instances = match &over.instances {
        Some(s) => values::instances(&serde_json::Value::String(s.clone()))
            .and_then(|i| i.resolve(sys.cpus))
            .map_err(|msg| ConfigError {
                source: "command line".into(),
                app: Some(name.clone()),
                key: Some("--instances".into()),
                msg,
            })?,
        // PM2 starts one instance when `instances` is unset.
        None => raw
            .instances
            .unwrap_or(Instances::Count(1))
            .resolve(sys.cpus)
            .map_err(|m| err("instances", m))?,
    };
    let instances = if fork_mode && over.instances.is_none() && instances > 1 {
        warnings.push(format!(
            "{source}: app \"{name}\": exec_mode fork runs one worker; `instances` ignored"
        ));
        1
    } else {
        instances
    };

    let instance_var = over
        .instance_var
        .clone()
        .or(raw.instance_var.clone())
        .unwrap_or_else(|| "NODE_APP_INSTANCE".into());
    if !values::is_env_name(&instance_var) {
        return Err(err(
            "instance_var",
            format!("{instance_var:?} is not a valid environment variable name"),
        ));
    }

    // The package script's own assignments, then the app's env over them.
    let mut env: std::collections::BTreeMap<String, String> = wrapper_env.into_iter().collect();
    env.extend(raw.env.clone().unwrap_or_default());
    if let Some(env_name) = &over.env_name {
        let Some(extra) = raw.env_named.get(env_name) else {
            return Err(err(
                &format!("env_{env_name}"),
                format!("--env {env_name} was given but the app has no `env_{env_name}`"),
            ));
        };
        env.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    let ms = Duration::from_millis;
    let listen_timeout = over
        .listen_timeout
        .map(ms)
        .or(raw.listen_timeout)
        .unwrap_or(ms(3000));
    if listen_timeout.is_zero() {
        return Err(err("listen_timeout", "must be more than 0".into()));
    }
    let reload_parallel = over
        .reload_parallel
        .or(raw.reload_parallel)
        .unwrap_or(DEFAULT_RELOAD_PARALLEL);
    if reload_parallel == 0 {
        return Err(err("reload_parallel", "must be at least 1".into()));
    }
    let balance = match &over.balance {
        Some(b) => values::balance(b).map_err(|m| err("balance", m))?,
        None => raw.balance.unwrap_or_default(),
    };
    let credentials = resolve_credentials(raw.uid.as_deref(), raw.gid.as_deref())
        .map_err(|(key, msg)| err(key, msg))?;
    let shared_listen = raw.shared_listen.clone().unwrap_or_default();
    for a in &shared_listen {
        crate::shared::Allowed::parse(a).map_err(|m| err("shared_listen", m))?;
    }

    Ok(Loaded {
        app: App {
            name,
            script: absolute(&script_path),
            args,
            cwd: absolute(&cwd),
            interpreter,
            interpreter_args,
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
            max_event_loop_delay: raw.max_event_loop_delay,
            metrics: over.metrics.clone().or(raw.metrics.clone()),
            listen: if over.listen.is_empty() {
                raw.listen.clone().unwrap_or_default()
            } else {
                over.listen.clone()
            },
            shared_listen,
            reload_parallel,
            credentials,
            balance,
            rebalance: !over.no_rebalance && raw.rebalance.unwrap_or(true),
        },
        warnings,
    })
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
