//! The command line, defined once: parsing, `--help`, the man page and the
//! shell completions all come from these types.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "nodeherd",
    version,
    about = "Run a Node.js server on every CPU under systemd: socket activation, zero-downtime reloads, D-Bus control",
    long_about = "nodeherd is PM2's cluster mode as a native systemd service. `nodeherd run` is the daemon \
                  a unit's ExecStart runs: it takes the listening socket from systemd (or binds --listen), \
                  starts N Node workers that inherit it, restarts crashed workers, and swaps them slot by slot, \
                  two at a time, on reload. `status`, `reload`, `restart` and `scale` talk to a running manager over D-Bus."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the manager (the daemon a unit's ExecStart runs)
    Run(Box<RunArgs>),
    /// Start an app as `pm2 start` does: an installed app by its name
    /// (systemctl start nodeherd@APP); a file or script as a transient
    /// systemd unit (nodeherd-APP.service) when root under systemd, else
    /// in the foreground, as `run`. Takes `run`'s flags
    #[command(after_help = "Stop it with `nodeherd stop APP`; list every app with `nodeherd ls`.")]
    Start(Box<RunArgs>),
    /// Stop an app's manager and every worker, as `pm2 stop`: its units
    /// under systemd, else SIGTERM to the manager; waits until it is gone
    Stop(StopArgs),
    /// Stop an app and undo `nodeherd install` for it, as `pm2 delete`
    Delete(DeleteArgs),
    /// Every nodeherd app on this host, as `pm2 ls`: installed units and
    /// configurations, and running managers
    #[command(visible_alias = "list")]
    Ls(LsArgs),
    /// An app's workers' lines from the journal, `[app:N]` first, as `pm2 logs`
    ///
    /// Where the app writes its workers' lines to files (out_file, error_file, log_file), it names them (with
    /// -i, that slot's) and the tail command that shows them; on a host
    /// with no journal, the journalctl command that shows the lines where
    /// the journal is; for a manager run by hand, where its stderr goes (a
    /// file is shown).
    Logs(LogsArgs),
    /// Show the workers of a running manager
    #[command(alias = "show", alias = "describe")]
    Status(StatusArgs),
    /// Replace every worker with zero downtime; waits for the result
    Reload(ReloadArgs),
    /// The release history: each generation kept, what it ran (script,
    /// directory, interpreter resolved through symlinks; Node's version) and
    /// how it fared
    History(StatusArgs),
    /// Reload back to a generation of the release history (default: the
    /// one that served before), with zero downtime; waits for the result
    Rollback(RollbackArgs),
    /// Stop every worker and start a fresh set
    Restart(AppArgs),
    /// Change the number of workers: N, +N, -N or max
    Scale(ScaleArgs),
    /// Take one worker out of rotation (a replacement serves first) and
    /// capture a heap snapshot, a CPU profile or its stack; prints the file
    Diagnose(DiagnoseArgs),
    /// Replace a running manager's program with the file on disk (after an
    /// upgrade), keeping its pid and every worker; waits until it answers again
    Reexec(AppArgs),
    /// Make the health endpoint say "take me out" (503, agent `drain`) while
    /// every worker keeps serving, until `undrain`
    Drain(AppArgs),
    /// End a drain: the health endpoint answers by the ready workers again
    Undrain(AppArgs),
    /// A live view of an app's workers (q to quit)
    Monit(AppArgs),
    /// Put an ecosystem file's apps under systemd (the nodeherd@ template units)
    Install(InstallArgs),
    /// Undo `nodeherd install` for one app: disable and stop it, remove its files
    Uninstall(UninstallArgs),
    /// Print a shell completion script
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff)
    Man,
    /// Read a re-exec's state document on stdin and say whether this
    /// program can take it over (run by the manager before it re-execs)
    #[command(name = "__check-state", hide = true)]
    CheckState,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A PM2 ecosystem file (.json, .config.js) or a script to run
    #[arg(value_name = "CONFIG|SCRIPT")]
    pub target: PathBuf,

    /// What the command line says about the app; each overrides the file.
    #[command(flatten)]
    pub over: crate::config::Overrides,

    #[command(flatten)]
    pub bus: BusArgs,
}

/// Which bus and name; shared by the daemon and the clients.
#[derive(Debug, Args, Clone, Default)]
pub struct BusArgs {
    /// Use the session bus instead of the system bus
    #[arg(long, conflicts_with_all = ["bus", "no_bus"])]
    pub user: bool,

    /// Use the bus at this D-Bus address (unix:path=...)
    #[arg(long, value_name = "ADDRESS", conflicts_with = "no_bus")]
    pub bus: Option<String>,

    /// Run without a control plane
    #[arg(long)]
    pub no_bus: bool,

    /// Well-known name (default org.nodeherd.<app>)
    #[arg(long, value_name = "NAME")]
    pub bus_name: Option<String>,
}

impl BusArgs {
    pub fn bus(&self) -> crate::control::Bus {
        use crate::control::Bus;
        if self.no_bus {
            Bus::None
        } else if let Some(a) = &self.bus {
            // A guid pins one daemon instance; without it a restarted bus
            // at the same address is reachable again.
            let a: Vec<&str> = a.split(',').filter(|kv| !kv.starts_with("guid=")).collect();
            Bus::Address(a.join(","))
        } else if self.user {
            Bus::Session
        } else {
            Bus::System
        }
    }
}

#[derive(Debug, Args)]
pub struct AppArgs {
    /// The app (may be left out when one manager runs)
    pub app: Option<String>,

    #[command(flatten)]
    pub bus: BusArgs,
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub app: AppArgs,

    /// Judge this reload by a canary beside a fresh baseline first, whatever
    /// `reload_strategy` says (see "Canary reloads" in the README)
    #[arg(long)]
    pub canary: bool,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The app (may be left out when one manager runs)
    pub app: Option<String>,

    /// The generation to go back to (`nodeherd history`); default: the one
    /// that served before the one in force
    pub generation: Option<u32>,

    #[command(flatten)]
    pub bus: BusArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub app: AppArgs,

    /// Print JSON for scripts
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// The app, or `all` for every app this caller may stop
    pub app: String,

    /// Seconds to wait for the manager to be gone
    #[arg(long, value_name = "S", default_value_t = 60)]
    pub timeout: u64,

    #[command(flatten)]
    pub bus: BusArgs,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The app
    pub app: String,

    #[command(flatten)]
    pub bus: BusArgs,

    #[command(flatten)]
    pub dirs: InstallDirs,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print JSON for scripts
    #[arg(long)]
    pub json: bool,

    /// Where installed apps' configurations are
    #[arg(long, value_name = "DIR", default_value = "/etc/nodeherd")]
    pub config_dir: PathBuf,

    #[command(flatten)]
    pub bus: BusArgs,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The app (default: every app)
    pub app: Option<String>,

    /// Only this worker slot's lines (its NODE_APP_INSTANCE)
    #[arg(short = 'i', long = "instance", value_name = "N")]
    pub instance: Option<u32>,

    /// Keep printing new lines as they come
    #[arg(short = 'f', long)]
    pub follow: bool,

    /// How many of the last lines to show first
    #[arg(long, short = 'n', value_name = "N", default_value_t = 15)]
    pub lines: u32,

    /// Where installed apps' configurations are
    #[arg(long, value_name = "DIR", default_value = "/etc/nodeherd")]
    pub config_dir: PathBuf,

    #[command(flatten)]
    pub bus: BusArgs,
}

#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// The app
    pub app: String,

    /// N, +N, -N or max
    #[arg(allow_hyphen_values = true)]
    pub count: String,

    #[command(flatten)]
    pub bus: BusArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("capture").required(true).args(["heap_snapshot", "cpu_profile", "stack"])))]
pub struct DiagnoseArgs {
    /// The app
    pub app: String,

    /// The worker (its NODE_APP_INSTANCE)
    pub instance: u32,

    /// A V8 heap snapshot (.heapsnapshot, for Chrome DevTools' Memory tab)
    #[arg(long)]
    pub heap_snapshot: bool,

    /// A CPU profile of this many seconds (.cpuprofile)
    #[arg(long, value_name = "SECONDS")]
    pub cpu_profile: Option<u32>,

    /// Its JavaScript stack (.json)
    #[arg(long)]
    pub stack: bool,

    /// What becomes of the worker once captured: `replace` (stopped; its
    /// replacement already serves) or `resume` (no replacement: the other
    /// workers carry its share, and it goes back into rotation, same pid)
    #[arg(long, value_name = "WHAT", default_value = "replace")]
    pub then: String,

    #[command(flatten)]
    pub bus: BusArgs,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// A PM2 ecosystem file (.json, .config.js), or PM2's saved list
    /// (~/.pm2/dump.pm2, what `pm2 save` writes): its cluster apps
    pub ecosystem: PathBuf,

    /// Install only the app of this name
    #[arg(long, value_name = "NAME")]
    pub only: Option<String>,

    /// Where the app listens (the socket drop-in): HOST:PORT, [::1]:PORT,
    /// PORT, unix:/path, udp:HOST:PORT; repeatable. Default: the app's
    /// `listen`, else the template's /run/nodeherd/NAME.sock
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<String>,

    /// The group that may connect to the app's Unix socket (SocketMode=0660),
    /// e.g. www-data for a reverse proxy. Default: the app's own group
    /// nodeherd-NAME (root and the app only)
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// A systemd credential for the workers, at $CREDENTIALS_DIRECTORY/NAME:
    /// `LoadCredential=NAME:PATH` in the service's drop-in (PATH absolute,
    /// read by systemd as root); repeatable
    #[arg(long, value_name = "NAME=PATH")]
    pub credential: Vec<String>,

    /// Start the socket (and with --boot the service) now
    #[arg(long)]
    pub now: bool,

    /// Enable the service too, so the app starts at boot rather than on the
    /// first connection
    #[arg(long)]
    pub boot: bool,

    #[command(flatten)]
    pub dirs: InstallDirs,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// The app
    pub name: String,

    #[command(flatten)]
    pub dirs: InstallDirs,
}

/// Where `install` writes, and whether it only says what it would.
#[derive(Debug, Args)]
pub struct InstallDirs {
    /// Print the files and commands, change nothing
    #[arg(long)]
    pub dry_run: bool,

    /// Where the template units read app configurations
    #[arg(long, value_name = "DIR", default_value = "/etc/nodeherd")]
    pub config_dir: PathBuf,

    /// Where unit drop-ins go
    #[arg(long, value_name = "DIR", default_value = "/etc/systemd/system")]
    pub unit_dir: PathBuf,

    /// Where the app's system-bus policy goes (NAME's bus name .conf)
    #[arg(long, value_name = "DIR", default_value = "/etc/dbus-1/system.d")]
    pub bus_policy_dir: PathBuf,

    /// Where the sysusers.d entry of the app's user goes
    #[arg(long, value_name = "DIR", default_value = "/etc/sysusers.d")]
    pub sysusers_dir: PathBuf,
}
