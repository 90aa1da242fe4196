//! What changed between two configurations of one app, in words, for the
//! journal and the answer to a reload; and what cannot change without a
//! restart of the service.

use std::collections::BTreeSet;

use super::App;

/// The difference between the configuration in force and a new one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// What a reload applies ("instances 2 → 4", "env: GREETING changed").
    pub changes: Vec<String>,
    /// What only a restart applies; the reload keeps the old value.
    pub needs_restart: Vec<String>,
    /// The configured `instances` changed (a reload then scales to it).
    pub resized: bool,
}

impl Diff {
    /// One line: what changed, or that nothing did.
    pub fn summary(&self) -> String {
        if self.changes.is_empty() {
            "configuration unchanged".into()
        } else {
            self.changes.join("; ")
        }
    }
}

/// Compare `old` and `new`. Environment values are never printed, only the
/// names of the variables (they may hold secrets).
pub fn diff(old: &App, new: &App) -> Diff {
    let mut d = Diff::default();
    let mut changed = |what: &str, differs: bool| {
        if differs {
            d.changes.push(format!("{what} changed"));
        }
    };
    changed("script", old.script != new.script);
    changed("args", old.args != new.args);
    changed("cwd", old.cwd != new.cwd);
    changed("interpreter", old.interpreter != new.interpreter);
    changed("node_args", old.interpreter_args != new.interpreter_args);
    changed("instance_var", old.instance_var != new.instance_var);
    changed("wait_ready", old.wait_ready != new.wait_ready);
    changed("listen_timeout", old.listen_timeout != new.listen_timeout);
    changed("kill_timeout", old.kill_timeout != new.kill_timeout);
    changed(
        "shutdown_with_message",
        old.shutdown_with_message != new.shutdown_with_message,
    );
    changed(
        "restart policy",
        old.min_uptime != new.min_uptime
            || old.max_restarts != new.max_restarts
            || old.restart_delay != new.restart_delay
            || old.exp_backoff_restart_delay != new.exp_backoff_restart_delay
            || old.autorestart != new.autorestart,
    );
    changed(
        "max_memory_restart",
        old.max_memory_restart != new.max_memory_restart,
    );
    changed(
        "worker cgroup limits",
        old.max_memory != new.max_memory
            || old.cpu_weight != new.cpu_weight
            || old.pids_max != new.pids_max,
    );
    changed(
        "reload_parallel",
        old.reload_parallel != new.reload_parallel,
    );
    changed(
        "reload_strategy",
        old.reload_strategy != new.reload_strategy,
    );
    changed("canary", old.canary != new.canary);
    changed("autoscale", old.autoscale != new.autoscale);
    changed("rebalance", old.rebalance != new.rebalance);
    changed("shared_listen", old.shared_listen != new.shared_listen);
    changed("log files", old.logs != new.logs);
    changed(
        "max_event_loop_delay",
        old.max_event_loop_delay != new.max_event_loop_delay,
    );
    changed(
        "autopsy_on_memory",
        old.autopsy_on_memory != new.autopsy_on_memory,
    );
    changed("autopsy", old.autopsy != new.autopsy);
    changed("cron_restart", old.cron_restart != new.cron_restart);
    changed(
        "watch",
        old.watch != new.watch
            || old.ignore_watch != new.ignore_watch
            || old.watch_delay != new.watch_delay,
    );
    changed("increment_var", old.increment_var != new.increment_var);
    changed(
        "stop_exit_codes",
        old.stop_exit_codes != new.stop_exit_codes,
    );
    changed("autostart", old.autostart != new.autostart);
    changed("filter_env", old.filter_env != new.filter_env);
    changed("env_file", old.env_file != new.env_file);
    changed(
        "health_min_ready",
        old.health_min_ready != new.health_min_ready,
    );
    changed(
        "drain_before_stop",
        old.drain_before_stop != new.drain_before_stop,
    );
    if old.env != new.env {
        let keys: BTreeSet<&String> = old.env.keys().chain(new.env.keys()).collect();
        let mut words = Vec::new();
        for k in keys {
            match (old.env.get(k), new.env.get(k)) {
                (Some(a), Some(b)) if a != b => words.push(format!("{k} changed")),
                (None, Some(_)) => words.push(format!("{k} added")),
                (Some(_), None) => words.push(format!("{k} removed")),
                _ => {}
            }
        }
        d.changes.push(format!("env: {}", words.join(", ")));
    }
    if old.instances != new.instances {
        d.resized = true;
        d.changes
            .push(format!("instances {} → {}", old.instances, new.instances));
    }
    let mut restart = |what: &str, differs: bool| {
        if differs {
            d.needs_restart.push(what.to_string());
        }
    };
    restart("name", old.name != new.name);
    restart("listen", old.listen != new.listen);
    restart("balance", old.balance != new.balance);
    restart("metrics", old.metrics != new.metrics);
    restart(
        "health/health_agent",
        old.health != new.health || old.health_agent != new.health_agent,
    );
    restart("uid/gid", old.credentials != new.credentials);
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Balance;

    fn app() -> App {
        crate::config::test_app()
    }

    #[test]
    fn says_what_changed_without_values() {
        let old = app();
        let mut new = app();
        new.env.insert("GREETING".into(), "secret-hello".into());
        new.env.insert("NEW".into(), "1".into());
        new.instances = 4;
        new.interpreter_args = vec!["--max-old-space-size=512".into()];
        let d = diff(&old, &new);
        assert_eq!(
            d.summary(),
            "node_args changed; env: GREETING changed, NEW added; instances 2 → 4"
        );
        assert!(!d.summary().contains("secret"));
        assert!(d.needs_restart.is_empty());
    }

    #[test]
    fn names_what_needs_a_restart() {
        let old = app();
        let mut new = app();
        new.listen = vec!["127.0.0.1:9000".into()];
        new.balance = Balance::ReusePort;
        let d = diff(&old, &new);
        assert_eq!(d.summary(), "configuration unchanged");
        assert_eq!(d.needs_restart, vec!["listen", "balance"]);
    }
}
