//! The driver's side of configuration: where it came from, the one in
//! force, and a launcher per configuration generation.
//!
//! A reload reads the configuration anew before it swaps anything (as
//! `systemctl reload` means for every other service). What a reload can
//! change becomes a new generation: a launcher for it here, a [`Policy`] for
//! the core, which starts every worker from the moment that reload begins
//! with the new generation. What only a restart can change (the sockets, the
//! app's name and so its bus name, the balancing mode, the workers' user) is
//! kept as it was, with a warning that names it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::core::NewConfig;
use super::policy::Policy;
use crate::config::{self, App, ConfigError, Loaded, Overrides};
use crate::sockets::SocketSet;
use crate::worker::Launcher;

/// Where the configuration comes from, to read it again.
#[derive(Debug, Clone)]
pub struct Source {
    pub target: PathBuf,
    pub overrides: Overrides,
    pub cpus: u32,
}

impl Source {
    /// Read and check it (blocking: a `.config.js` runs node).
    pub fn load(&self) -> Result<Loaded, ConfigError> {
        config::load(&self.target, &self.overrides, self.cpus)
    }
}

/// What every worker is pointed at.
#[derive(Debug, Clone)]
pub struct WorkerPaths {
    /// The sealed preload Node workers load.
    pub preload: crate::worker::preload::Preload,
    pub notify_socket: PathBuf,
    /// The manager's private directory: never a place it binds for a worker.
    pub runtime_dir: PathBuf,
}

/// The configuration in force and the launchers of each generation.
pub struct Configs {
    pub source: Source,
    paths: WorkerPaths,
    app: App,
    generation: u64,
    launchers: BTreeMap<u64, Launcher>,
}

/// A configuration accepted for a reload.
pub struct Accepted {
    pub config: NewConfig,
    /// Warnings to log: unknown keys, and what needs a restart.
    pub warnings: Vec<String>,
}

impl Configs {
    pub fn new(app: App, source: Source, paths: WorkerPaths, sockets: &SocketSet) -> Configs {
        let launcher = Launcher::new(
            &app,
            sockets.describe(),
            &paths.preload,
            &paths.notify_socket,
        );
        Configs {
            source,
            paths,
            app,
            generation: 0,
            launchers: BTreeMap::from([(0, launcher)]),
        }
    }

    /// The configuration a re-exec handed over, in force as `generation`.
    pub fn resume(
        app: App,
        source: Source,
        paths: WorkerPaths,
        sockets: &SocketSet,
        generation: u64,
    ) -> Configs {
        let launcher = Launcher::new(
            &app,
            sockets.describe(),
            &paths.preload,
            &paths.notify_socket,
        );
        Configs {
            source,
            paths,
            app,
            generation,
            launchers: BTreeMap::from([(generation, launcher)]),
        }
    }

    pub fn paths(&self) -> &WorkerPaths {
        &self.paths
    }

    pub fn app(&self) -> &App {
        &self.app
    }

    /// The launcher of `generation` (the newest if that one is gone).
    pub fn launcher(&self, generation: u64) -> &Launcher {
        self.launchers
            .get(&generation)
            .or_else(|| self.launchers.values().next_back())
            .expect("there is always at least one launcher")
    }

    /// Make `loaded` the configuration in force and a new generation.
    pub fn accept(&mut self, loaded: Loaded, sockets: &SocketSet, policy: &Policy) -> Accepted {
        let Loaded {
            app: mut new,
            mut warnings,
        } = loaded;
        // `auto` asks for what the manager chose at start, and naming the
        // mode in use changes nothing either: neither is a change to warn of.
        let in_use = if sockets.per_slot() {
            config::Balance::ReusePort
        } else {
            config::Balance::Queue
        };
        if matches!(new.balance, config::Balance::Auto) || new.balance == in_use {
            new.balance = self.app.balance;
        }
        let d = config::diff(&self.app, &new);
        for what in &d.needs_restart {
            warnings.push(format!(
                "{what} changed in the configuration: only a restart of the service applies it; kept as it was"
            ));
        }
        // What cannot change without a restart stays as it was.
        new.name = self.app.name.clone();
        new.listen = self.app.listen.clone();
        new.balance = self.app.balance;
        new.metrics = self.app.metrics.clone();
        new.credentials = self.app.credentials.clone();
        self.generation += 1;
        let launcher = Launcher::new(
            &new,
            sockets.describe(),
            &self.paths.preload,
            &self.paths.notify_socket,
        );
        self.launchers.insert(self.generation, launcher);
        let policy = Policy::new(&new, sockets, policy.watchdog);
        self.app = new;
        Accepted {
            config: NewConfig {
                policy,
                resize: d.changes.iter().any(|c| c.starts_with("instances ")),
                generation: self.generation,
                summary: d.summary(),
            },
            warnings,
        }
    }

    /// Forget launchers no worker will be started with again.
    pub fn prune(&mut self, in_force: u64) {
        self.launchers.retain(|g, _| *g >= in_force);
    }
}
