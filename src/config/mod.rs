//! The app's configuration: PM2 ecosystem files, a bare script, and CLI overrides.
//!
//! nodeherd reads the same `apps: [...]` files PM2 does, so an operator can
//! point a unit at the ecosystem file they already have. `.json` is parsed
//! directly; `.config.js`/`.cjs`/`.mjs` are evaluated by the `node` found on
//! PATH (bounded by a timeout, and as user `nobody` when we are root, since
//! the file is code) and the JSON it prints is read. Validation is strict
//! about types and values (an error names the file, the app, the key and the
//! value) and lenient about unknown keys (a warning names them), because PM2
//! files often carry keys meant for other tools.
//!
//! Two steps, as ripgrep splits low-level from high-level arguments:
//! `keys` parses an entry into a [`RawApp`] (pure: types and values
//! checked, one table of keys), and `resolve` applies the command line and
//! looks at the system (paths, `PATH`, users, CPUs) to make an [`App`].
//! `file` finds and reads the ecosystem file.

pub mod autoscale;
pub mod canary;
mod diff;
mod env_file;
mod file;
mod js;
mod keys;
mod logfiles;
mod resolve;
mod values;
mod wrapper;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

pub use diff::{Diff, diff};
pub use keys::{IGNORED_PM2_KEYS, KEYS, RawApp};
pub use logfiles::{Interval, LogFiles, Which};
pub use resolve::{System, find_executable, normalize};
pub use values::{Allowed, Instances, parse_bytes, parse_duration_ms, resolve_instances};

/// Most workers one manager runs; far above any CPU count, low enough that a
/// typo (`1e9`) cannot fork-bomb the machine.
pub const MAX_INSTANCES: u32 = 1024;

/// A configuration problem: what, where, and (in `msg`) what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or `command line`) the value came from.
    pub source: String,
    /// The app it concerns, when known.
    pub app: Option<String>,
    /// The key, when the problem is one key's value.
    pub key: Option<String>,
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(app) = &self.app {
            write!(f, ": app \"{app}\"")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.msg)
    }
}

impl std::error::Error for ConfigError {}

/// How the script is started.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Interpreter {
    /// A Node binary: gets the preload shim and an IPC channel.
    Node(PathBuf),
    /// Any other interpreter (python3, bash, ...): socket fds and NOTIFY_SOCKET only.
    Other(PathBuf),
    /// The script is executed directly (`interpreter: "none"`).
    None,
}

/// `history_keep`: generations kept in the release history, by default
/// and at most.
pub const HISTORY_KEEP_DEFAULT: u32 = 10;
pub const HISTORY_KEEP_MAX: u64 = 100;

fn default_history_keep() -> u32 {
    HISTORY_KEEP_DEFAULT
}

/// One app, resolved and validated: everything the supervisor needs.
///
/// It crosses a re-exec in the state document (`supervisor::takeover::State`), read by the
/// next version of nodeherd: a field added later needs `#[serde(default)]`
/// (or a new state format), or that version refuses the state and the
/// package falls back to a restart.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct App {
    pub name: String,
    /// Absolute path of the script (or binary, with `Interpreter::None`).
    pub script: PathBuf,
    pub args: Vec<String>,
    /// Working directory of the workers.
    pub cwd: PathBuf,
    pub interpreter: Interpreter,
    /// Arguments for the interpreter, before the script (`node_args`).
    pub interpreter_args: Vec<String>,
    /// Desired number of workers, already resolved against the CPU count.
    pub instances: u32,
    /// Name of the variable that carries the slot index (PM2's `instance_var`).
    pub instance_var: String,
    /// `env`, then `env_<name>` on top; applied over the manager's environment.
    pub env: BTreeMap<String, String>,
    /// Ready means `process.send('ready')` / `READY=1`, not just listening.
    pub wait_ready: bool,
    /// How long a new worker has to become ready. PM2 default: 3000 ms.
    pub listen_timeout: Duration,
    /// How long a stopping worker has before SIGKILL. PM2 default: 1600 ms.
    pub kill_timeout: Duration,
    /// Ask workers to stop with the `'shutdown'` message instead of SIGINT.
    pub shutdown_with_message: bool,
    /// A worker that dies younger than this counts as an unstable restart. PM2 default: 1000 ms.
    pub min_uptime: Duration,
    /// Unstable restarts in a row after which the slot is `errored`. PM2 default: 16.
    pub max_restarts: u32,
    /// Fixed delay before restarting a crashed worker. PM2 default: 0.
    pub restart_delay: Duration,
    /// First delay of an exponential backoff (x1.5 per restart, capped at 15 s); zero means off.
    pub exp_backoff_restart_delay: Duration,
    /// Restart crashed workers at all (PM2's `autorestart`, default true).
    pub autorestart: bool,
    /// Replace a worker whose RSS exceeds this many bytes (through a zero-downtime swap).
    pub max_memory_restart: Option<u64>,
    /// Each worker's memory budget (its cgroup's `memory.max`, and the V8
    /// heap derived from it); nodeherd's own key.
    pub max_memory: Option<u64>,
    /// Each worker's cgroup `cpu.weight`; nodeherd's own key.
    pub cpu_weight: Option<u32>,
    /// Each worker's cgroup `pids.max`; nodeherd's own key.
    pub pids_max: Option<u64>,
    /// Replace a worker whose event loop has not answered the preload's
    /// heartbeat for this long (nodeherd's own key; off by default).
    pub max_event_loop_delay: Option<Duration>,
    /// Take the JavaScript stack of a worker replaced for
    /// `max_memory_restart` too, as of a hung one (nodeherd's own key; off
    /// by default: the pause is short, but it is a pause).
    pub autopsy_on_memory: bool,
    /// Start the preload's helper thread (hang stacks, `nodeherd
    /// diagnose`); about 12 MiB per worker (nodeherd's own key; on by
    /// default). Off: no thread, no helper channel, hangs killed blind.
    pub autopsy: bool,
    /// Where to serve Prometheus metrics: `HOST:PORT` or `unix:/path`
    /// (nodeherd's own key; off by default).
    pub metrics: Option<String>,
    /// Where to answer `GET /health` besides the metrics endpoint:
    /// `HOST:PORT` or `unix:/path` (nodeherd's own key; off by default).
    #[serde(default)]
    pub health: Option<String>,
    /// Where to answer HAProxy's `agent-check` (nodeherd's own key; off by default).
    #[serde(default)]
    pub health_agent: Option<String>,
    /// Ready workers the health endpoint needs to say "up" (default: every
    /// slot, less those a reload is swapping; nodeherd's own key).
    #[serde(default)]
    pub health_min_ready: Option<u32>,
    /// On stop, say "drain" on the health endpoint and keep serving this
    /// long before the workers are asked to stop (nodeherd's own key; 0: off).
    #[serde(default)]
    pub drain_before_stop: Duration,
    /// Addresses to bind when systemd hands no socket over (nodeherd's own key).
    pub listen: Vec<String>,
    /// Addresses the manager binds for workers with its own rights, beyond
    /// what the workers' user could bind (nodeherd's own key; see `shared`).
    #[serde(default)]
    pub shared_listen: Vec<String>,
    /// Workers swapped at once during a reload (nodeherd's own key, default 2).
    pub reload_parallel: u32,
    /// How a reload swaps and judges (nodeherd's own key; default rolling).
    #[serde(default)]
    pub reload_strategy: canary::ReloadStrategy,
    /// The canary's soak and thresholds (nodeherd's own key).
    #[serde(default)]
    pub canary: canary::Canary,
    /// Generations kept in the release history (nodeherd's own key, default 10).
    #[serde(default = "default_history_keep")]
    pub history_keep: u32,
    /// A worker count that follows the load (`instances: {min, max}`);
    /// `instances` is then where it starts, `min`.
    #[serde(default)]
    pub autoscale: Option<autoscale::Autoscale>,
    /// Run workers as this user and group (PM2's `uid`/`gid`; needs root).
    pub credentials: Option<Credentials>,
    /// How connections are spread over workers (nodeherd's own key).
    pub balance: Balance,
    /// Even out keep-alive connections: a worker holding more than its fair
    /// share closes the surplus at their next response (nodeherd's own key,
    /// default true).
    #[serde(default = "yes")]
    pub rebalance: bool,
    /// PM2's `cron_restart`: every worker reloaded, the zero-downtime way,
    /// on this schedule (a checked pattern, see `crate::cron`).
    #[serde(default)]
    pub cron_restart: Option<String>,
    /// PM2's `watch`: reload when a file under these paths changes (empty: off).
    #[serde(default)]
    pub watch: Vec<PathBuf>,
    /// PM2's `ignore_watch`: globs (or plain names) of paths not watched,
    /// besides `node_modules` and dot-directories.
    #[serde(default)]
    pub ignore_watch: Vec<String>,
    /// PM2's `watch_delay`: a reload waits until files have been quiet this long.
    #[serde(default = "default_watch_delay")]
    pub watch_delay: Duration,
    /// PM2's `increment_var`: this variable is its base value plus the slot index.
    #[serde(default)]
    pub increment_var: Option<String>,
    /// PM2's `stop_exit_codes`: a worker that exits with one of these is not restarted.
    #[serde(default)]
    pub stop_exit_codes: Vec<i32>,
    /// PM2's `autostart`: false starts no worker until a restart or scale asks.
    #[serde(default = "yes")]
    pub autostart: bool,
    /// PM2's `filter_env`: which of the manager's variables workers do not inherit.
    #[serde(default)]
    pub filter_env: FilterEnv,
    /// `env_file`: the files `env` was read from, in order (their values
    /// are in `env` already; kept to say what a reload reads again).
    #[serde(default)]
    pub env_file: Vec<PathBuf>,
    /// Files for the workers' output, and their rotation (PM2's log keys).
    #[serde(default)]
    pub logs: LogFiles,
}

fn yes() -> bool {
    true
}

/// PM2's default `watch_delay`.
pub const DEFAULT_WATCH_DELAY: Duration = Duration::from_millis(1000);

fn default_watch_delay() -> Duration {
    DEFAULT_WATCH_DELAY
}

/// Which variables of the manager's own environment workers do not inherit
/// (PM2's `filter_env`); the app's `env` applies after it either way.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FilterEnv {
    /// Every variable is inherited.
    #[default]
    Nothing,
    /// None is (`filter_env: true`).
    All,
    /// Those whose names start with one of these.
    Prefixes(Vec<String>),
}

impl FilterEnv {
    /// Whether the manager's variable `name` stays out of the workers' environment.
    pub fn drops(&self, name: &str) -> bool {
        match self {
            FilterEnv::Nothing => false,
            FilterEnv::All => true,
            FilterEnv::Prefixes(p) => p.iter().any(|p| name.starts_with(p.as_str())),
        }
    }
}

/// How new connections reach workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Balance {
    /// `ReusePort` where every listening socket allows it (TCP, and bound
    /// by the manager or passed by systemd with room for siblings), else
    /// `Queue`; decided when the manager starts.
    #[default]
    Auto,
    /// One socket, one accept queue shared by every worker: the manager
    /// holds it, so no connection waits on a worker that is gone. Idle
    /// workers win more connections than busy ones.
    Queue,
    /// One SO_REUSEPORT socket per slot (for `--listen` TCP/UDP addresses):
    /// the kernel spreads connections evenly by hash. The manager holds
    /// each slot's socket across restarts and reloads.
    ReusePort,
}

/// Who workers run as, resolved from names when the config is loaded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups of the user (empty for a bare numeric uid).
    pub groups: Vec<u32>,
}

/// What the command line says about the app; each field overrides the
/// file. The flags of `nodeherd run` are these fields (clap reads them
/// here), so what the command line takes and what a reload reads again are
/// one definition.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Arguments passed to the script (after --)
    #[arg(last = true, value_name = "SCRIPT_ARGS")]
    pub args: Vec<String>,

    /// Run only the app of this name from a file that has several
    #[arg(long, value_name = "NAME")]
    pub only: Option<String>,

    /// Apply the app's env_NAME on top of env
    #[arg(long = "env", value_name = "NAME")]
    pub env_name: Option<String>,

    /// Number of workers: N, max (or 0) for all CPUs, -N for all CPUs but N
    #[arg(short = 'i', long, value_name = "N", allow_hyphen_values = true)]
    pub instances: Option<String>,

    /// The app's name (default: from the file, else the script's name)
    #[arg(long)]
    pub name: Option<String>,

    /// Bind this address when systemd passes no socket: HOST:PORT, [::1]:PORT, PORT, unix:/path, udp:HOST:PORT (repeatable)
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<String>,

    /// Name of the variable carrying the worker's index (default NODE_APP_INSTANCE)
    #[arg(long, value_name = "NAME")]
    pub instance_var: Option<String>,

    /// Interpreter for the script (default node; `none` runs it directly)
    #[arg(long, value_name = "PATH")]
    pub interpreter: Option<String>,

    /// Arguments for the interpreter, before the script
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub node_args: Option<String>,

    /// A worker is ready when it sends 'ready' (or READY=1), not when it listens
    #[arg(long)]
    pub wait_ready: bool,

    /// Milliseconds a new worker has to become ready (default 3000)
    #[arg(long, value_name = "MS")]
    pub listen_timeout: Option<u64>,

    /// Milliseconds a stopping worker has before SIGKILL (default 1600)
    #[arg(long, value_name = "MS")]
    pub kill_timeout: Option<u64>,

    /// Stop workers with the 'shutdown' message instead of SIGINT
    #[arg(long)]
    pub shutdown_with_message: bool,

    /// How connections reach workers: auto (the default: for TCP one accept
    /// queue shared by all, steered to even out keep-alive connections; for
    /// UDP a socket per slot, so a flow stays with one worker), queue (one
    /// accept queue shared by all, not steered), or reuseport (one
    /// SO_REUSEPORT socket per worker slot, spread evenly by the kernel)
    #[arg(long, value_name = "MODE", value_parser = ["auto", "queue", "reuseport"])]
    pub balance: Option<String>,

    /// Leave keep-alive connections where they land (by default a worker
    /// holding more than its fair share closes the surplus at their next
    /// response, and the clients reconnect to the others)
    #[arg(long)]
    pub no_rebalance: bool,

    /// Serve Prometheus metrics here: HOST:PORT or unix:/path (default: off,
    /// or the socket systemd passes with FileDescriptorName=metrics)
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,

    /// Workers swapped at once during a reload (default 2, as PM2)
    #[arg(long, value_name = "N")]
    pub reload_parallel: Option<u32>,
}

/// The loaded app plus the warnings worth showing the operator.
#[derive(Debug)]
pub struct Loaded {
    pub app: App,
    pub warnings: Vec<String>,
}

/// The app entries of an ecosystem file, as written.
pub fn read_entries(file: &Path) -> Result<Vec<Map<String, Value>>, ConfigError> {
    let doc = self::file::read_ecosystem(file)?;
    self::file::all_apps(&doc, &file.display().to_string())
}

/// The ecosystem file `target` names (`/etc/nodeherd/api` finds
/// `api.config.js`), or `target` itself.
pub fn config_path(target: &Path) -> PathBuf {
    file::resolve_target(target)
        .filter(|p| file::is_config_file(p))
        .unwrap_or_else(|| target.to_path_buf())
}

/// Load the app named by `target` (an ecosystem file or a script), applying `over`.
pub fn load(target: &Path, over: &Overrides, cpus: u32) -> Result<Loaded, ConfigError> {
    let sys = System { cpus };
    if file::is_config_file(target) && !target.exists() {
        return Err(ConfigError {
            source: target.display().to_string(),
            app: None,
            key: None,
            msg: "cannot read: the file does not exist".into(),
        });
    }
    if let Some((source, doc, base)) = ecosystem(target)? {
        let entry = file::pick_app(&doc, &source, over.only.as_deref())?;
        from_entry(&entry, &source, &base, over, sys)
    } else {
        // A bare script: everything comes from the command line.
        let mut entry = Map::new();
        entry.insert("script".into(), Value::String(target.display().to_string()));
        let cwd = std::env::current_dir().map_err(|e| ConfigError {
            source: "command line".into(),
            app: None,
            key: None,
            msg: format!("cannot read the current directory: {e}"),
        })?;
        from_entry(&entry, "command line", &cwd, over, sys)
    }
}

/// What a target names: one app, or each app of a file that has several
/// (when no `--only` picks one), by the name `--only` picks it with,
/// loaded as its own `--only NAME` would be.
#[derive(Debug)]
pub enum Found {
    One(Box<Loaded>),
    Several(Vec<(String, Loaded)>),
}

/// Load the app `target` names, or, from a file of several apps without
/// `--only`, every one of them (each checked before any is run). The file
/// is read once.
pub fn load_found(target: &Path, over: &Overrides, cpus: u32) -> Result<Found, ConfigError> {
    if over.only.is_none()
        && let Some((source, doc, base)) = ecosystem(target)?
    {
        let apps = file::all_apps(&doc, &source)?;
        if apps.len() == 1 {
            return from_entry(&apps[0], &source, &base, over, System { cpus })
                .map(|l| Found::One(Box::new(l)));
        }
        let mut loaded = Vec::with_capacity(apps.len());
        for (name, entry) in file::named_apps(apps, &source)? {
            let over = Overrides {
                only: Some(name.clone()),
                ..over.clone()
            };
            loaded.push((
                name,
                from_entry(&entry, &source, &base, &over, System { cpus })?,
            ));
        }
        return Ok(Found::Several(loaded));
    }
    load(target, over, cpus).map(|l| Found::One(Box::new(l)))
}

/// The ecosystem file `target` names, read (a `.config.js` evaluated), with
/// its name for errors and the directory its relative paths start from;
/// `None` for a script.
fn ecosystem(target: &Path) -> Result<Option<(String, Value, PathBuf)>, ConfigError> {
    let resolved = file::resolve_target(target);
    let is_config = resolved.as_deref().is_some_and(file::is_config_file);
    let Some(path) = resolved.filter(|_| is_config) else {
        return Ok(None);
    };
    let source = path.display().to_string();
    let doc = file::read_ecosystem(&path)?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok(Some((source, doc, file::absolute(&base))))
}

/// Check and resolve one app entry as if it were read from `source`, its
/// relative paths taken from `base`. `install` checks the very entry it
/// writes this way: a `.config.js` evaluated twice may answer differently.
pub fn load_entry(
    entry: &Map<String, Value>,
    source: &str,
    base: &Path,
    over: &Overrides,
    cpus: u32,
) -> Result<Loaded, ConfigError> {
    from_entry(entry, source, base, over, System { cpus })
}

/// Parse one entry, then resolve it.
fn from_entry(
    map: &Map<String, Value>,
    source: &str,
    base: &Path,
    over: &Overrides,
    sys: System,
) -> Result<Loaded, ConfigError> {
    let label = app_label(map, over);
    let (raw, warnings) = keys::parse(map, source, &label)?;
    resolve::resolve(raw, warnings, source, &label, base, over, sys)
}

/// The app's name as errors show it: `--name`, else `name`, else the
/// script's file name without extension.
fn app_label(map: &Map<String, Value>, over: &Overrides) -> String {
    if let Some(n) = &over.name {
        return n.clone();
    }
    if let Some(n) = map.get("name").and_then(Value::as_str) {
        return n.to_string();
    }
    map.get("script")
        .and_then(Value::as_str)
        .and_then(|s| Path::new(s).file_stem()?.to_str().map(str::to_string))
        .unwrap_or_else(|| "app".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn instances_follow_pm2() {
        assert_eq!(resolve_instances(&json!(4), 2), Ok(4));
        assert_eq!(resolve_instances(&json!("max"), 8), Ok(8));
        assert_eq!(resolve_instances(&json!(0), 8), Ok(8));
        assert_eq!(resolve_instances(&json!(-1), 8), Ok(7));
        assert_eq!(resolve_instances(&json!(-1), 1), Ok(1), "never below one");
        assert_eq!(resolve_instances(&json!(-1000), 2), Ok(1));
        assert_eq!(resolve_instances(&json!("3"), 2), Ok(3));
        assert!(resolve_instances(&json!(1e9), 2).is_err());
        assert!(resolve_instances(&json!(1.5), 2).is_err());
        assert!(resolve_instances(&json!("lots"), 2).is_err());
        assert!(resolve_instances(&json!(true), 2).is_err());
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration_ms("1500"), Some(1500));
        assert_eq!(parse_duration_ms("2s"), Some(2000));
        assert_eq!(parse_duration_ms("1m"), Some(60_000));
        assert_eq!(parse_duration_ms("-5"), None);
        assert_eq!(parse_duration_ms("soon"), None);
        assert_eq!(parse_bytes("150M"), Some(150 << 20));
        assert_eq!(parse_bytes("1G"), Some(1 << 30));
        assert_eq!(parse_bytes("0"), None);
        assert_eq!(parse_bytes("lots"), None);
    }

    #[test]
    fn apps_run_together_each_need_a_name_of_their_own() {
        let apps = |doc: Value| file::all_apps(&doc, "f.json").unwrap();
        let named = file::named_apps(
            apps(
                json!({"apps": [{"name": "a", "script": "a.js"}, {"name": "b", "script": "b.js"}]}),
            ),
            "f.json",
        )
        .unwrap();
        assert_eq!(
            named.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let e = file::named_apps(
            apps(json!({"apps": [{"name": "a", "script": "a.js"}, {"script": "b.js"}]})),
            "f.json",
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("apps[1].name"), "{e}");
        assert!(e.msg.contains("--only"), "{e}");
        let e = file::named_apps(
            apps(
                json!({"apps": [{"name": "a", "script": "a.js"}, {"name": "a", "script": "b.js"}]}),
            ),
            "f.json",
        )
        .unwrap_err();
        assert!(e.msg.contains("two apps are named \"a\""), "{e}");
    }

    #[test]
    fn pick_app_needs_only_with_several() {
        let doc =
            json!({"apps": [{"name": "a", "script": "a.js"}, {"name": "b", "script": "b.js"}]});
        let e = file::pick_app(&doc, "f.json", None).unwrap_err();
        assert!(e.msg.contains("--only"), "{e}");
        assert_eq!(
            file::pick_app(&doc, "f.json", Some("b")).unwrap()["name"],
            "b"
        );
        assert!(
            file::pick_app(&doc, "f.json", Some("c"))
                .unwrap_err()
                .msg
                .contains("a, b")
        );
    }
}

#[cfg(test)]
mod fuzz {
    //! Property tests: no configuration, however malformed, panics the loader.
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,12}".prop_map(Value::String),
            Just(Value::String("max".into())),
            Just(Value::String("2s".into())),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-zA-Z_]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_value_for_any_key_is_an_error_or_an_app(
            key in prop::sample::select(KEYS.iter().map(|k| k.name).chain(logfiles::KEYS.iter().map(|k| k.name)).collect::<Vec<_>>()),
            value in json_value(),
        ) {
            let mut entry = Map::new();
            entry.insert("script".into(), Value::String("/bin/sh".into()));
            entry.insert("interpreter".into(), Value::String("none".into()));
            entry.insert(key.to_string(), value);
            let _ = from_entry(&entry, "fuzz.json", Path::new("/"), &Overrides::default(), System { cpus: 4 });
        }

        #[test]
        fn any_document_picks_an_app_or_says_why(doc in json_value(), only in proptest::option::of("[a-z]{1,3}")) {
            let _ = file::pick_app(&doc, "fuzz.json", only.as_deref());
        }

        #[test]
        fn instances_never_exceed_the_cap(v in json_value(), cpus in 0u32..512) {
            if let Ok(n) = resolve_instances(&v, cpus) {
                prop_assert!((1..=MAX_INSTANCES).contains(&n));
            }
        }
    }
}

/// An app as a test needs one: `api`, two workers, PM2's defaults.
#[cfg(test)]
pub(crate) fn test_app() -> App {
    App {
        name: "api".into(),
        script: std::path::PathBuf::from("/srv/app.js"),
        args: vec![],
        cwd: std::path::PathBuf::from("/srv"),
        interpreter: Interpreter::Node(std::path::PathBuf::from("node")),
        interpreter_args: vec![],
        instances: 2,
        instance_var: "NODE_APP_INSTANCE".into(),
        env: [("GREETING".to_string(), "hi".to_string())].into(),
        wait_ready: false,
        listen_timeout: std::time::Duration::from_millis(3000),
        kill_timeout: std::time::Duration::from_millis(1600),
        shutdown_with_message: false,
        min_uptime: std::time::Duration::from_millis(1000),
        max_restarts: 16,
        restart_delay: std::time::Duration::ZERO,
        exp_backoff_restart_delay: std::time::Duration::ZERO,
        autorestart: true,
        max_memory_restart: None,
        max_memory: None,
        cpu_weight: None,
        pids_max: None,
        max_event_loop_delay: None,
        autopsy_on_memory: false,
        autopsy: true,
        metrics: None,
        health: None,
        health_agent: None,
        health_min_ready: None,
        drain_before_stop: std::time::Duration::ZERO,
        listen: vec!["127.0.0.1:8000".into()],
        shared_listen: vec![],
        reload_parallel: 1,
        reload_strategy: Default::default(),
        canary: Default::default(),
        history_keep: HISTORY_KEEP_DEFAULT,
        autoscale: None,
        credentials: None,
        balance: Balance::Queue,
        rebalance: true,
        cron_restart: None,
        watch: vec![],
        ignore_watch: vec![],
        watch_delay: DEFAULT_WATCH_DELAY,
        increment_var: None,
        stop_exit_codes: vec![],
        autostart: true,
        filter_env: FilterEnv::Nothing,
        env_file: vec![],
        logs: LogFiles::default(),
    }
}
