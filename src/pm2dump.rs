//! PM2's saved process list (`~/.pm2/dump.pm2`, what `pm2 save` writes)
//! read as ecosystem entries, for `nodeherd install`.
//!
//! The dump is PM2's bookkeeping, not a configuration: one entry per
//! *process* (a cluster app of 4 instances is 4 entries), PM2's own keys
//! (`pm_id`, `status`, `axm_*`, log and pid paths under `PM2_HOME`) beside
//! the app's, and under `env` the app's variables merged into the whole
//! environment of the shell that ran `pm2 start` (PATH, HOME, SSH_*, any
//! token exported there). So only cluster apps are taken (fork mode is one
//! process, not nodeherd's business), only the keys listed in `COPIED`,
//! and of `env` only what the app itself was given, as far as the dump can
//! tell: a shell's usual variables, PM2's, and (with more than one app)
//! those every app has with the same value are the shell's. What is left
//! out is said, by name only.
//!
//! It is JSON another program wrote, read by root: bounded in size,
//! depth (serde_json's own limit) and entries, and an app name, a path or
//! a variable name with a control character in it is refused, as no
//! dump PM2 writes has one.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

/// Larger than any dump PM2 writes for a host's apps (each process
/// carries a copy of its environment: a few KiB).
const MAX_BYTES: u64 = 32 << 20;
/// Processes in one dump.
const MAX_ENTRIES: usize = 4096;

/// The keys of an entry that mean for nodeherd what they meant for PM2,
/// copied as they are (the configuration check then reads them).
const COPIED: &[&str] = &[
    "args",
    "node_args",
    "instance_var",
    "wait_ready",
    "listen_timeout",
    "kill_timeout",
    "shutdown_with_message",
    "min_uptime",
    "max_restarts",
    "restart_delay",
    "exp_backoff_restart_delay",
    "autorestart",
    "max_memory_restart",
    "cron_restart",
    "stop_exit_codes",
    "increment_var",
];

/// Variables of a login shell or session, never an app's own.
const SHELL_VARS: &[&str] = &[
    "PATH",
    "HOME",
    "SHELL",
    "TERM",
    "PWD",
    "OLDPWD",
    "SHLVL",
    "_",
    "USER",
    "LOGNAME",
    "MAIL",
    "HOSTNAME",
    "LANG",
    "LANGUAGE",
    "LS_COLORS",
    "COLORTERM",
    "EDITOR",
    "VISUAL",
    "PAGER",
    "LESSOPEN",
    "LESSCLOSE",
    "DISPLAY",
    "MOTD_SHOWN",
    "DBUS_SESSION_BUS_ADDRESS",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
    "NOTIFY_SOCKET",
    "MANPATH",
    "INFOPATH",
    "HISTFILE",
    "HISTSIZE",
    "HISTFILESIZE",
    "HISTCONTROL",
    "TMUX",
    "TMUX_PANE",
    "STY",
    "WINDOW",
    "OLDPWD",
];
const SHELL_PREFIXES: &[&str] = &[
    "LC_", "SSH_", "XDG_", "SUDO_", "NVM_", "TERM_", "GPG_", "npm_", "VSCODE_", "LISTEN_",
];
/// PM2's own variables in `env`.
const PM2_VARS: &[&str] = &["unique_id", "NODE_APP_INSTANCE", "pm_id"];
const PM2_PREFIXES: &[&str] = &["PM2_", "pm_", "axm_"];
/// Kept even when every app has it: it changes how most apps run.
const ALWAYS_KEPT: &[&str] = &["NODE_ENV"];

/// The cluster apps of a dump, as ecosystem entries, and what was left
/// out, a line each.
#[derive(Debug)]
pub struct Converted {
    pub entries: Vec<Map<String, Value>>,
    pub notes: Vec<String>,
}

/// `dump.pm2`, or any `*.pm2`: what `pm2 save` writes.
pub fn is_dump(file: &Path) -> bool {
    file.extension().is_some_and(|e| e == "pm2")
}

pub fn read(file: &Path) -> Result<Converted, String> {
    let at = |msg: String| format!("{}: {msg}", file.display());
    let meta = std::fs::metadata(file).map_err(|e| at(format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(at("not a regular file".into()));
    }
    if meta.len() > MAX_BYTES {
        return Err(at(format!(
            "{} bytes, more than the {} MiB a PM2 dump takes: not read",
            meta.len(),
            MAX_BYTES >> 20
        )));
    }
    let text = std::fs::read_to_string(file).map_err(|e| at(format!("cannot read: {e}")))?;
    convert(&text).map_err(at)
}

/// The dump's text to entries (pure, for the tests).
pub fn convert(text: &str) -> Result<Converted, String> {
    let doc: Value = serde_json::from_str(text)
        .map_err(|e| format!("not a PM2 dump (the JSON array `pm2 save` writes): {e}"))?;
    let Value::Array(procs) = doc else {
        return Err("not a PM2 dump: expected the JSON array `pm2 save` writes".into());
    };
    if procs.len() > MAX_ENTRIES {
        return Err(format!(
            "{} processes, more than {MAX_ENTRIES}: not read",
            procs.len()
        ));
    }
    let procs: Vec<&Map<String, Value>> = procs
        .iter()
        .enumerate()
        .map(|(i, p)| p.as_object().ok_or(format!("entry {i} is not an object")))
        .collect::<Result<_, _>>()?;
    // The apps, in the order of their first process.
    let mut order: Vec<String> = Vec::new();
    let mut by_name: BTreeMap<String, Vec<&Map<String, Value>>> = BTreeMap::new();
    for (i, p) in procs.iter().enumerate() {
        let name = p
            .get("name")
            .and_then(Value::as_str)
            .ok_or(format!("entry {i} has no `name`"))?;
        no_control(name, &format!("entry {i}: `name`"))?;
        if !by_name.contains_key(name) {
            order.push(name.to_string());
        }
        by_name.entry(name.to_string()).or_default().push(p);
    }
    let envs: Vec<Map<String, Value>> =
        procs.iter().map(|p| env_of(p)).collect::<Result<_, _>>()?;
    let shared = shared_vars(&envs, by_name.len());
    let mut entries = Vec::new();
    let mut notes = Vec::new();
    for name in &order {
        let ps = &by_name[name];
        let first = ps[0];
        let mode = first
            .get("exec_mode")
            .and_then(Value::as_str)
            .unwrap_or("fork_mode");
        if mode != "cluster_mode" {
            notes.push(format!(
                "{name}: skipped: {mode} (one process); nodeherd installs cluster apps. \
                 Run it as a plain systemd service"
            ));
            continue;
        }
        let (entry, note) = entry_of(name, first, ps.len(), &shared)?;
        entries.push(entry);
        notes.extend(note);
    }
    notes.push(
        "PM2's own keys (pm_id, status, restart counts, axm_*, namespace, the log and pid \
         paths under PM2_HOME) are not carried over: the workers' lines go to the journal"
            .into(),
    );
    Ok(Converted { entries, notes })
}

/// One cluster app's entry from its first process, `n` processes in all.
fn entry_of(
    name: &str,
    p: &Map<String, Value>,
    n: usize,
    shared: &BTreeMap<String, Value>,
) -> Result<(Map<String, Value>, Vec<String>), String> {
    let at = |key: &str| format!("app \"{name}\": `{key}`");
    let mut e = Map::new();
    e.insert("name".into(), Value::String(name.into()));
    let script = p
        .get("pm_exec_path")
        .and_then(Value::as_str)
        .ok_or(format!("app \"{name}\" has no `pm_exec_path` (its script)"))?;
    no_control(script, &at("pm_exec_path"))?;
    e.insert("script".into(), Value::String(script.into()));
    if let Some(cwd) = p.get("pm_cwd").and_then(Value::as_str) {
        no_control(cwd, &at("pm_cwd"))?;
        e.insert("cwd".into(), Value::String(cwd.into()));
    }
    if let Some(i) = p.get("exec_interpreter").and_then(Value::as_str)
        && i != "node"
    {
        no_control(i, &at("exec_interpreter"))?;
        e.insert("interpreter".into(), Value::String(i.into()));
    }
    e.insert("exec_mode".into(), Value::String("cluster".into()));
    e.insert("instances".into(), Value::from(n));
    for key in COPIED {
        if let Some(v) = p.get(*key).filter(|v| !v.is_null()) {
            for s in strings_in(v) {
                no_control(s, &at(key))?;
            }
            e.insert((*key).into(), v.clone());
        }
    }
    let env = env_of(p)?;
    let mut kept = Map::new();
    let (mut pm2, mut shell) = (Vec::new(), Vec::new());
    for (k, v) in env {
        if k == name
            || PM2_VARS.contains(&k.as_str())
            || PM2_PREFIXES.iter().any(|x| k.starts_with(x))
        {
            pm2.push(k);
        } else if !ALWAYS_KEPT.contains(&k.as_str())
            && (SHELL_VARS.contains(&k.as_str())
                || !identifier(&k)
                || SHELL_PREFIXES.iter().any(|x| k.starts_with(x))
                || shared.get(&k) == Some(&v))
        {
            shell.push(k);
        } else {
            kept.insert(k, v);
        }
    }
    let mut notes = vec![format!(
        "{name}: {n} instance(s), env {} (values not shown)",
        if kept.is_empty() {
            "empty".to_string()
        } else {
            kept.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    )];
    if !shell.is_empty() {
        notes.push(format!(
            "{name}: {} variable(s) left out as the environment of the shell that ran `pm2 start`: {}",
            shell.len(),
            shell.join(", ")
        ));
    }
    if !pm2.is_empty() {
        notes.push(format!(
            "{name}: PM2's variables left out: {}",
            pm2.join(", ")
        ));
    }
    if !kept.is_empty() {
        e.insert("env".into(), Value::Object(kept));
    }
    Ok((e, notes))
}

/// A process's `env`, every name a variable name could be.
fn env_of(p: &Map<String, Value>) -> Result<Map<String, Value>, String> {
    let env = match p.get("env") {
        None | Some(Value::Null) => return Ok(Map::new()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err("an `env` that is not an object".into()),
    };
    for k in env.keys() {
        if k.is_empty() || k.contains('=') || k.chars().any(char::is_control) {
            return Err(format!(
                "a variable name in `env` that no environment has: {}",
                crate::discover::printable(&format!("{k:?}"))
            ));
        }
    }
    Ok(env.clone())
}

/// With more than one app, the variables every process has with the same
/// value: the shell's that started them, not an app's.
fn shared_vars(envs: &[Map<String, Value>], apps: usize) -> BTreeMap<String, Value> {
    let mut shared = BTreeMap::new();
    if apps < 2 {
        return shared;
    }
    if let Some((first, rest)) = envs.split_first() {
        for (k, v) in first {
            if rest.iter().all(|e| e.get(k) == Some(v)) {
                shared.insert(k.clone(), v.clone());
            }
        }
    }
    shared
}

/// A name an ecosystem file's `env` may hold; a shell exports others
/// (bash's `BASH_FUNC_name%%` for exported functions), never for an app.
fn identifier(k: &str) -> bool {
    let mut c = k.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn strings_in(v: &Value) -> Vec<&str> {
    match v {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

fn no_control(s: &str, what: &str) -> Result<(), String> {
    if s.chars().any(char::is_control) {
        return Err(format!(
            "{what} has a control character ({}): no dump PM2 writes has one; refused",
            crate::discover::printable(&format!("{s:?}"))
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::convert;
    use serde_json::json;

    fn proc(name: &str, mode: &str, env: serde_json::Value) -> serde_json::Value {
        json!({"name": name, "exec_mode": mode, "pm_exec_path": "/srv/a.js", "pm_cwd": "/srv",
               "pm_id": 0, "status": "online", "env": env})
    }

    #[test]
    fn processes_become_instances_and_only_the_apps_own_env_is_kept() {
        let shell = json!({"PATH": "/bin", "TOKEN": "t", "NODE_ENV": "production",
                           "BASH_FUNC_module%%": "() {  eval x\n}"});
        let with = |extra: serde_json::Value| {
            let mut e = shell.clone();
            for (k, v) in extra.as_object().unwrap() {
                e[k] = v.clone();
            }
            e
        };
        let dump = json!([
            proc(
                "api",
                "cluster_mode",
                with(json!({"PORT": "1", "api": "{}", "unique_id": "u"}))
            ),
            proc(
                "api",
                "cluster_mode",
                with(json!({"PORT": "1", "api": "{}", "unique_id": "v"}))
            ),
            proc("jobs", "fork_mode", with(json!({"PORT": "2"}))),
        ]);
        let c = convert(&dump.to_string()).unwrap();
        assert_eq!(c.entries.len(), 1);
        let e = &c.entries[0];
        assert_eq!(e["instances"], 2);
        assert_eq!(e["script"], "/srv/a.js");
        assert!(e.get("pm_id").is_none() && e.get("status").is_none());
        // TOKEN is the same in every process of two apps: the shell's.
        // NODE_ENV too, but kept; PORT differs: the app's.
        assert_eq!(e["env"], json!({"NODE_ENV": "production", "PORT": "1"}));
        let notes = c.notes.join("\n");
        assert!(notes.contains("jobs: skipped: fork_mode"), "{notes}");
        assert!(
            notes.contains(
                "left out as the environment of the shell that ran `pm2 start`: BASH_FUNC_module%%, PATH, TOKEN"
            ),
            "{notes}"
        );
        assert!(
            notes.contains("PM2's variables left out: api, unique_id"),
            "{notes}"
        );
        assert!(!notes.contains("\"t\""), "{notes}");

        // One app: no other to compare with. A name no app's env can
        // hold is still the shell's; another exported variable is kept
        // (and named by --dry-run).
        let one = json!([proc("api", "cluster_mode", shell.clone())]);
        let c = convert(&one.to_string()).unwrap();
        assert_eq!(
            c.entries[0]["env"],
            json!({"NODE_ENV": "production", "TOKEN": "t"})
        );
    }
}
