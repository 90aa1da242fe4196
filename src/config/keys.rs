//! The keys of an app entry: one table that drives both parsing and the
//! unknown-key warning.
//!
//! Parsing is pure: it turns the JSON of one entry into a [`RawApp`] of
//! typed, checked values, and touches nothing on the system (no paths, no
//! users, no CPU count). A new option is one line in [`KEYS`], one field in
//! [`RawApp`], and its resolution in `resolve.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

use super::values::{self as v, Instances};
use super::{Balance, ConfigError, FilterEnv, MAX_INSTANCES};

/// One app entry, parsed: every key the entry set, typed and checked.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RawApp {
    pub name: Option<String>,
    pub script: Option<String>,
    pub args: Option<Vec<String>>,
    pub cwd: Option<String>,
    pub interpreter: Option<String>,
    pub exec_interpreter: Option<String>,
    pub node_args: Option<Vec<String>>,
    pub interpreter_args: Option<Vec<String>>,
    pub instances: Option<Instances>,
    /// `instances` as an object: autoscaling between these bounds.
    pub instances_range: Option<super::autoscale::Range>,
    /// The `autoscale` block: the signals' thresholds and the pace.
    pub autoscale: Option<super::autoscale::RawPace>,
    pub fork_mode: Option<bool>,
    pub instance_var: Option<String>,
    pub env: Option<BTreeMap<String, String>>,
    /// `env_<name>` blocks, by name.
    pub env_named: BTreeMap<String, BTreeMap<String, String>>,
    pub wait_ready: Option<bool>,
    pub listen_timeout: Option<Duration>,
    pub kill_timeout: Option<Duration>,
    pub shutdown_with_message: Option<bool>,
    pub min_uptime: Option<Duration>,
    pub max_restarts: Option<u32>,
    pub restart_delay: Option<Duration>,
    pub exp_backoff_restart_delay: Option<Duration>,
    pub autorestart: Option<bool>,
    pub max_memory_restart: Option<u64>,
    pub max_memory: Option<u64>,
    pub cpu_weight: Option<u32>,
    pub pids_max: Option<u64>,
    pub max_event_loop_delay: Option<Duration>,
    pub autopsy_on_memory: Option<bool>,
    pub autopsy: Option<bool>,
    pub metrics: Option<String>,
    pub health: Option<String>,
    pub health_agent: Option<String>,
    pub health_min_ready: Option<u32>,
    pub drain_before_stop: Option<Duration>,
    pub listen: Option<Vec<String>>,
    pub shared_listen: Option<Vec<String>>,
    pub reload_parallel: Option<u32>,
    pub reload_strategy: Option<super::canary::ReloadStrategy>,
    pub canary: Option<super::canary::Canary>,
    pub history_keep: Option<u32>,
    pub uid: Option<String>,
    pub gid: Option<String>,
    pub balance: Option<Balance>,
    pub rebalance: Option<bool>,
    pub cron_restart: Option<String>,
    /// `watch`: `None` inside means `true` (the app's directory).
    pub watch: Option<Option<Vec<String>>>,
    pub ignore_watch: Option<Vec<String>>,
    pub watch_delay: Option<Duration>,
    pub increment_var: Option<String>,
    pub stop_exit_codes: Option<Vec<i32>>,
    pub autostart: Option<bool>,
    pub filter_env: Option<FilterEnv>,
    pub env_file: Option<Vec<String>>,
    pub logs: super::logfiles::RawLogs,
}

type Setter = fn(&mut RawApp, &Value) -> Result<(), String>;

/// A key nodeherd reads, and how.
pub struct Key {
    pub name: &'static str,
    pub(super) set: Setter,
}

/// A key whose value is parsed by `$parse` into `RawApp::$field`.
macro_rules! key {
    ($name:literal, $field:ident, $parse:expr) => {
        Key {
            name: $name,
            set: |r, x| {
                r.$field = Some(($parse)(x)?);
                Ok(())
            },
        }
    };
}

/// Every key nodeherd reads from an app entry (besides `env_<name>`).
pub const KEYS: &[Key] = &[
    key!("name", name, v::string),
    key!("script", script, v::string),
    key!("args", args, v::words),
    key!("cwd", cwd, v::string),
    key!("interpreter", interpreter, v::string),
    key!("exec_interpreter", exec_interpreter, v::string),
    key!("node_args", node_args, v::words),
    key!("interpreter_args", interpreter_args, v::words),
    Key {
        name: "instances",
        set: |r, x| {
            match x {
                Value::Object(o) => r.instances_range = Some(super::autoscale::range(o)?),
                x => r.instances = Some(v::instances(x)?),
            }
            Ok(())
        },
    },
    key!("autoscale", autoscale, super::autoscale::pace),
    Key {
        name: "exec_mode",
        set: |r, x| {
            r.fork_mode = Some(match v::string(x)?.as_str() {
                "cluster" | "cluster_mode" => false,
                "fork" | "fork_mode" => true,
                other => return Err(format!("expected \"cluster\" or \"fork\", got \"{other}\"")),
            });
            Ok(())
        },
    },
    key!("instance_var", instance_var, v::env_name),
    key!("env", env, v::env),
    key!("wait_ready", wait_ready, v::boolean),
    Key {
        name: "listen_timeout",
        set: |r, x| {
            let d = v::duration(x)?;
            if d.is_zero() {
                return Err("must be more than 0".into());
            }
            r.listen_timeout = Some(d);
            Ok(())
        },
    },
    key!("kill_timeout", kill_timeout, v::duration),
    key!("shutdown_with_message", shutdown_with_message, v::boolean),
    key!("min_uptime", min_uptime, v::duration),
    key!("max_restarts", max_restarts, |x| v::count(x, 1_000_000)
        .map(|n| n as u32)),
    key!("restart_delay", restart_delay, v::duration),
    key!(
        "exp_backoff_restart_delay",
        exp_backoff_restart_delay,
        v::duration
    ),
    key!("autorestart", autorestart, v::boolean),
    key!("max_memory_restart", max_memory_restart, v::size),
    Key {
        name: "max_memory",
        set: |r, x| {
            let b = v::size(x)?;
            if b < 16 << 20 {
                return Err("must be at least 16M (a Node worker needs more)".into());
            }
            r.max_memory = Some(b);
            Ok(())
        },
    },
    Key {
        name: "cpu_weight",
        set: |r, x| {
            let n = v::count(x, 10_000)?;
            if n == 0 {
                return Err("must be between 1 and 10000 (cgroup cpu.weight)".into());
            }
            r.cpu_weight = Some(n as u32);
            Ok(())
        },
    },
    key!("pids_max", pids_max, |x| v::count(x, 4_194_304)),
    key!("metrics", metrics, v::string),
    key!("health", health, v::string),
    key!("health_agent", health_agent, v::string),
    key!("health_min_ready", health_min_ready, |x| v::count(
        x,
        u64::from(MAX_INSTANCES)
    )
    .map(|n| n as u32)),
    key!("drain_before_stop", drain_before_stop, v::duration),
    Key {
        name: "max_event_loop_delay",
        set: |r, x| {
            let d = v::duration(x)?;
            if d < Duration::from_millis(100) {
                return Err("must be at least 100 ms".into());
            }
            r.max_event_loop_delay = Some(d);
            Ok(())
        },
    },
    key!("autopsy_on_memory", autopsy_on_memory, v::boolean),
    key!("autopsy", autopsy, v::boolean),
    key!("listen", listen, v::words),
    key!("shared_listen", shared_listen, v::words),
    Key {
        name: "reload_parallel",
        set: |r, x| {
            let n = v::count(x, u64::from(MAX_INSTANCES))?;
            if n == 0 {
                return Err("must be at least 1".into());
            }
            r.reload_parallel = Some(n as u32);
            Ok(())
        },
    },
    key!("reload_strategy", reload_strategy, super::canary::strategy),
    key!("canary", canary, super::canary::canary),
    Key {
        name: "history_keep",
        set: |r, x| {
            let n = v::count(x, super::HISTORY_KEEP_MAX)?;
            if n == 0 {
                return Err("must be at least 1".into());
            }
            r.history_keep = Some(n as u32);
            Ok(())
        },
    },
    key!("uid", uid, v::principal),
    key!("gid", gid, v::principal),
    key!("balance", balance, |x| v::balance(&v::string(x)?)),
    key!("rebalance", rebalance, v::boolean),
    key!("cron_restart", cron_restart, |x| {
        let pattern = v::string(x)?;
        crate::cron::Schedule::parse(&pattern)?;
        Ok::<_, String>(pattern)
    }),
    key!("watch", watch, v::watch),
    key!("ignore_watch", ignore_watch, v::strings),
    key!("watch_delay", watch_delay, v::duration),
    key!("increment_var", increment_var, v::env_name),
    key!("stop_exit_codes", stop_exit_codes, v::exit_codes),
    key!("autostart", autostart, v::boolean),
    key!("filter_env", filter_env, v::filter_env),
    key!("env_file", env_file, v::strings),
];

/// Keys PM2 knows that nodeherd accepts but does not act on.
pub const IGNORED_PM2_KEYS: &[&str] = &[
    "watch_options",
    "pid_file",
    "log_type",
    "vizion",
    "post_update",
    "force",
    "source_map_support",
    "disable_source_map_support",
    "namespace",
    "append_env_to_name",
    "treekill",
    "automation",
    "pmx",
    "disable_logs",
    "version",
];

/// Parse one app entry. `label` names the app in errors and warnings;
/// `source` names the file. Unknown keys become warnings, not errors:
/// ecosystem files often carry keys meant for other tools.
pub fn parse(
    map: &Map<String, Value>,
    source: &str,
    label: &str,
) -> Result<(RawApp, Vec<String>), ConfigError> {
    let err = |key: &str, msg: String| ConfigError {
        source: source.to_string(),
        app: Some(label.to_string()),
        key: Some(key.to_string()),
        msg,
    };
    let mut raw = RawApp::default();
    let mut warnings = Vec::new();
    for (key, value) in map {
        // `null` means "not set", as PM2 reads it.
        if value.is_null() {
            continue;
        }
        if let Some(k) = KEYS.iter().find(|k| k.name == key) {
            (k.set)(&mut raw, value).map_err(|m| err(key, m))?;
        } else if let Some(k) = super::logfiles::KEYS.iter().find(|k| k.name == key) {
            (k.set)(&mut raw.logs, value).map_err(|m| err(key, m))?;
        } else if let Some(name) = key.strip_prefix("env_") {
            raw.env_named
                .insert(name.to_string(), v::env(value).map_err(|m| err(key, m))?);
        } else if IGNORED_PM2_KEYS.contains(&key.as_str()) {
            warnings.push(format!(
                "{source}: app \"{label}\": key `{key}` is a PM2 option nodeherd does not use; ignored"
            ));
        } else {
            warnings.push(format!(
                "{source}: app \"{label}\": unknown key `{key}`; ignored"
            ));
        }
    }
    Ok((raw, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(entry: Value) -> Result<(RawApp, Vec<String>), ConfigError> {
        parse(entry.as_object().unwrap(), "f.json", "app")
    }

    #[test]
    fn every_key_of_the_table_parses_its_value() {
        let (raw, warnings) = one(json!({
            "name": "api", "script": "app.js", "args": "a b", "cwd": "srv",
            "interpreter": "node", "node_args": ["--max-old-space-size=512"],
            "instances": "max", "exec_mode": "fork", "instance_var": "INSTANCE_ID",
            "env": {"A": "1", "B": 2, "C": null}, "env_production": {"A": "prod"},
            "wait_ready": true, "listen_timeout": "2s", "kill_timeout": 500,
            "shutdown_with_message": "true", "min_uptime": "1m", "max_restarts": 3,
            "restart_delay": 100, "exp_backoff_restart_delay": 150, "autorestart": false,
            "max_memory_restart": "300M", "listen": ["127.0.0.1:8000"], "reload_parallel": 2,
            "uid": 1000, "gid": "www-data", "balance": "reuseport", "rebalance": false,
        }))
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(raw.args, Some(vec!["a".into(), "b".into()]));
        assert_eq!(raw.instances, Some(Instances::Max));
        assert_eq!(raw.fork_mode, Some(true));
        assert_eq!(
            raw.env,
            Some(BTreeMap::from([
                ("A".into(), "1".into()),
                ("B".into(), "2".into())
            ]))
        );
        assert_eq!(raw.env_named["production"]["A"], "prod");
        assert_eq!(raw.listen_timeout, Some(Duration::from_secs(2)));
        assert_eq!(raw.min_uptime, Some(Duration::from_secs(60)));
        assert_eq!(raw.max_memory_restart, Some(300 << 20));
        assert_eq!(raw.uid.as_deref(), Some("1000"));
        assert_eq!(raw.balance, Some(Balance::ReusePort));
        assert_eq!(raw.rebalance, Some(false));
    }

    #[test]
    fn pm2_keys_nodeherd_acts_on_parse_as_pm2_writes_them() {
        let (raw, warnings) = one(json!({
            "cron_restart": "0 3 * * *", "watch": ["src", "lib"], "ignore_watch": "*.log",
            "watch_delay": 500, "increment_var": "PORT", "stop_exit_codes": 0,
            "autostart": false, "filter_env": ["npm_", "SECRET_"], "env_file": ".env",
        }))
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(raw.cron_restart.as_deref(), Some("0 3 * * *"));
        assert_eq!(raw.watch, Some(Some(vec!["src".into(), "lib".into()])));
        assert_eq!(raw.ignore_watch, Some(vec!["*.log".into()]));
        assert_eq!(raw.watch_delay, Some(Duration::from_millis(500)));
        assert_eq!(raw.stop_exit_codes, Some(vec![0]));
        assert_eq!(raw.autostart, Some(false));
        assert_eq!(
            raw.filter_env,
            Some(FilterEnv::Prefixes(vec!["npm_".into(), "SECRET_".into()]))
        );
        assert_eq!(raw.env_file, Some(vec![".env".into()]));
        let (raw, _) = one(json!({"watch": true, "filter_env": true})).unwrap();
        assert_eq!(raw.watch, Some(None));
        assert_eq!(raw.filter_env, Some(FilterEnv::All));
        let (raw, _) = one(json!({"watch": false, "filter_env": false})).unwrap();
        assert_eq!(raw.watch, Some(Some(vec![])));
        assert_eq!(raw.filter_env, Some(FilterEnv::Nothing));
    }

    #[test]
    fn the_health_keys_parse() {
        let (raw, warnings) = one(json!({
            "health": "127.0.0.1:9210", "health_agent": "127.0.0.1:9211",
            "health_min_ready": 3, "drain_before_stop": "5s",
        }))
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(raw.health.as_deref(), Some("127.0.0.1:9210"));
        assert_eq!(raw.health_agent.as_deref(), Some("127.0.0.1:9211"));
        assert_eq!(raw.health_min_ready, Some(3));
        assert_eq!(raw.drain_before_stop, Some(Duration::from_secs(5)));
    }

    #[test]
    fn a_bad_value_names_the_key() {
        for (entry, key) in [
            (json!({"instances": "lots"}), "instances"),
            (json!({"listen_timeout": 0}), "listen_timeout"),
            (json!({"reload_parallel": 0}), "reload_parallel"),
            (json!({"exec_mode": "cloud"}), "exec_mode"),
            (json!({"instance_var": "1X"}), "instance_var"),
            (json!({"env": {"BAD NAME": "x"}}), "env"),
            (json!({"env_prod": []}), "env_prod"),
            (json!({"balance": "random"}), "balance"),
            (json!({"rebalance": "yes"}), "rebalance"),
            (json!({"kill_timeout": "forever"}), "kill_timeout"),
            (json!({"cron_restart": "every night"}), "cron_restart"),
            (json!({"cron_restart": "* * * *"}), "cron_restart"),
            (json!({"watch": 3}), "watch"),
            (json!({"ignore_watch": [1]}), "ignore_watch"),
            (json!({"increment_var": "PORT NUMBER"}), "increment_var"),
            (json!({"stop_exit_codes": [256]}), "stop_exit_codes"),
            (json!({"stop_exit_codes": "zero"}), "stop_exit_codes"),
            (json!({"filter_env": 5}), "filter_env"),
            (json!({"env_file": {}}), "env_file"),
            (json!({"drain_before_stop": "a while"}), "drain_before_stop"),
            (json!({"health_min_ready": 5000}), "health_min_ready"),
            (json!({"health": 9210}), "health"),
        ] {
            let e = one(entry).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert!(
                e.to_string().starts_with("f.json: app \"app\": key `"),
                "{e}"
            );
        }
    }

    #[test]
    fn unknown_and_pm2_only_keys_are_warned_about_by_name() {
        let (_, warnings) =
            one(json!({"colour": "blue", "watch_options": {}, "name": null})).unwrap();
        assert_eq!(
            warnings,
            vec![
                "f.json: app \"app\": unknown key `colour`; ignored",
                "f.json: app \"app\": key `watch_options` is a PM2 option nodeherd does not use; ignored"
            ]
        );
    }
}
