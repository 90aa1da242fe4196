//! The driver's side of configuration: where it came from, the one in
//! force, and a launcher per configuration generation.
//!
//! A reload reads the configuration anew before it swaps anything (as
//! `systemctl reload` means for every other service). What a reload can
//! change becomes a new generation: a launcher for it here, a [`Policy`] for
//! the core, whose reload starts its replacements with it. It is in force
//! only once the swap succeeded; until then, and for good if the reload
//! fails, every other worker (a restart after a crash, for memory or a hang,
//! a scale) starts with the configuration in force before it, so a failed
//! deploy stays closed. What only a restart can change (the sockets, the
//! app's name and so its bus name, the balancing mode, the workers' user) is
//! kept as it was, with a warning that names it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::events::NewConfig;
use super::policy::Policy;
use crate::config::{self, App, ConfigError, Loaded, Overrides};
use crate::socket_set::SocketSet;
use crate::worker::Launcher;

/// Where the configuration comes from, to read it again.
#[derive(Debug, Clone)]
pub struct Source {
    pub target: PathBuf,
    pub overrides: Overrides,
    pub cpus: u32,
}

impl Source {
    /// Read and check it (blocking: a `.config.js` runs node, and the
    /// log files it names are opened to see that they can be).
    pub fn load(&self) -> Result<Loaded, ConfigError> {
        self.checked(config::load(&self.target, &self.overrides, self.cpus)?)
    }

    /// As [`Source::load`], or every app of a file of several (`--only`
    /// not given): `nodeherd run` then runs a manager for each, which
    /// checks its own.
    pub fn load_found(&self) -> Result<config::Found, ConfigError> {
        match config::load_found(&self.target, &self.overrides, self.cpus)? {
            config::Found::One(l) => self.checked(*l).map(|l| config::Found::One(Box::new(l))),
            several => Ok(several),
        }
    }

    /// The log files it names can be opened. What it runs is pinned
    /// (resolved through symlinks, and Node's version asked, here off the
    /// supervisor's thread) for the release history.
    fn checked(&self, mut loaded: Loaded) -> Result<Loaded, ConfigError> {
        crate::logs::files::check(&loaded.app).map_err(|(key, msg)| ConfigError {
            source: self.target.display().to_string(),
            app: Some(loaded.app.name.clone()),
            key: Some(key.into()),
            msg,
        })?;
        crate::history::pin(&mut loaded.app);
        let _ = crate::history::node_version(&loaded.app);
        Ok(loaded)
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

/// The configuration in force, those read for reloads that have not
/// succeeded yet, and the launchers of each generation.
pub struct Configs {
    pub source: Source,
    paths: WorkerPaths,
    /// The configuration in force and its generation.
    app: App,
    generation: u64,
    /// Read for a reload, by generation: in force once its swap succeeded
    /// (the core says so, see [`Configs::settle`]), dropped if it failed.
    pending: BTreeMap<u64, App>,
    /// The last generation handed out.
    newest: u64,
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
            pending: BTreeMap::new(),
            newest: 0,
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
            pending: BTreeMap::new(),
            newest: generation,
            launchers: BTreeMap::from([(generation, launcher)]),
        }
    }

    pub fn paths(&self) -> &WorkerPaths {
        &self.paths
    }

    pub fn app(&self) -> &App {
        &self.app
    }

    /// The configuration read for `generation`'s reload, not yet in force.
    pub fn pending(&self, generation: u64) -> Option<&App> {
        self.pending.get(&generation)
    }

    /// Number the next generation after `at_least` (the release history's
    /// numbers go on across restarts).
    pub fn number_from(&mut self, at_least: u64) {
        self.newest = self.newest.max(at_least);
    }

    /// The launcher of `generation` (the newest if that one is gone).
    pub fn launcher(&self, generation: u64) -> &Launcher {
        self.launchers
            .get(&generation)
            .or_else(|| self.launchers.values().next_back())
            .expect("there is always at least one launcher")
    }

    /// Make `loaded` a new generation, for a reload to swap the workers
    /// into; what changed is told against the configuration in force.
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
        self.newest += 1;
        let generation = self.newest;
        let launcher = Launcher::new(
            &new,
            sockets.describe(),
            &self.paths.preload,
            &self.paths.notify_socket,
        );
        self.launchers.insert(generation, launcher);
        let policy = Policy::new(
            &new,
            !sockets.is_empty(),
            sockets.per_slot(),
            policy.watchdog,
        );
        self.pending.insert(generation, new);
        Accepted {
            config: NewConfig {
                canary: false,
                policy,
                resize: d.resized,
                generation,
                summary: d.summary(),
            },
            warnings,
        }
    }

    /// Follow the core: `in_force` is the generation in force (a reload's
    /// configuration becomes it once its swap succeeded), `wanted` every
    /// generation a worker may still be started with. The rest is
    /// forgotten: a failed reload's configuration is never used again.
    pub fn settle(&mut self, in_force: u64, wanted: &[u64]) {
        if in_force != self.generation
            && let Some(app) = self.pending.remove(&in_force)
        {
            self.app = app;
            self.generation = in_force;
            crate::logs::set_files(&self.app);
        }
        self.pending.retain(|g, _| wanted.contains(g));
        self.launchers
            .retain(|g, _| *g == self.generation || wanted.contains(g));
    }
}
