//! The app's configuration: PM2 ecosystem files, a bare script, and CLI overrides.
//!
//! nodeherd reads the same `apps: [...]` files PM2 does, so an operator can
//! point a unit at the ecosystem file they already have. `.json` is parsed
//! directly; `.config.js`/`.cjs`/`.mjs` are evaluated by the `node` found on
//! PATH (bounded by a timeout, since the file is code) and the JSON it prints
//! is read. Validation is strict about types and values (an error names the
//! file, the app, the key and the value) and lenient about unknown keys (a
//! warning names them), because PM2 files often carry keys meant for other
//! tools.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

/// Most workers one manager runs; far above any CPU count, low enough that a
/// typo (`1e9`) cannot fork-bomb the machine.
pub const MAX_INSTANCES: u32 = 1024;

/// How long a `.config.js` may take to evaluate before we give up on it.
const CONFIG_JS_TIMEOUT: Duration = Duration::from_secs(10);

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interpreter {
    /// A Node binary: gets the preload shim and an IPC channel.
    Node(PathBuf),
    /// Any other interpreter (python3, bash, ...): socket fds and NOTIFY_SOCKET only.
    Other(PathBuf),
    /// The script is executed directly (`interpreter: "none"`).
    None,
}

/// One app, resolved and validated: everything the supervisor needs.
#[derive(Debug, Clone, PartialEq)]
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
    /// Addresses to bind when systemd hands no socket over (nodeherd's own key).
    pub listen: Vec<String>,
    /// Workers swapped at once during a reload (nodeherd's own key, default 1).
    pub reload_parallel: u32,
    /// Run workers as this user and group (PM2's `uid`/`gid`; needs root).
    pub credentials: Option<Credentials>,
    /// How connections are spread over workers (nodeherd's own key).
    pub balance: Balance,
}

/// How new connections reach workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// One socket, one accept queue shared by every worker: the manager
    /// holds it, so no connection waits on a worker that is gone. Idle
    /// workers win more connections than busy ones.
    #[default]
    Queue,
    /// One SO_REUSEPORT socket per slot (for `--listen` TCP/UDP addresses):
    /// the kernel spreads connections evenly by hash. The manager holds
    /// each slot's socket across restarts and reloads.
    ReusePort,
}

/// Who workers run as, resolved from names when the config is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups of the user (empty for a bare numeric uid).
    pub groups: Vec<u32>,
}

/// What the command line says about the app; each field overrides the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub only: Option<String>,
    pub env_name: Option<String>,
    pub name: Option<String>,
    pub instances: Option<String>,
    pub listen: Vec<String>,
    pub instance_var: Option<String>,
    pub interpreter: Option<String>,
    pub node_args: Option<String>,
    pub wait_ready: bool,
    pub listen_timeout: Option<u64>,
    pub kill_timeout: Option<u64>,
    pub shutdown_with_message: bool,
    pub reload_parallel: Option<u32>,
    pub balance: Option<String>,
    pub args: Vec<String>,
}

/// Keys PM2 knows that nodeherd accepts but does not act on.
const IGNORED_PM2_KEYS: &[&str] = &[
    "watch",
    "ignore_watch",
    "watch_options",
    "watch_delay",
    "log_date_format",
    "error_file",
    "out_file",
    "log_file",
    "combine_logs",
    "merge_logs",
    "pid_file",
    "log_type",
    "cron_restart",
    "vizion",
    "post_update",
    "force",
    "source_map_support",
    "disable_source_map_support",
    "time",
    "namespace",
    "increment_var",
    "append_env_to_name",
    "filter_env",
    "treekill",
    "automation",
    "pmx",
    "disable_logs",
    "version",
    "autostart",
    "stop_exit_codes",
];

/// Keys nodeherd reads from an app entry.
const KNOWN_KEYS: &[&str] = &[
    "name",
    "script",
    "args",
    "cwd",
    "interpreter",
    "exec_interpreter",
    "node_args",
    "interpreter_args",
    "instances",
    "exec_mode",
    "instance_var",
    "env",
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
    "listen",
    "reload_parallel",
    "uid",
    "gid",
    "balance",
];

/// The loaded app plus the warnings worth showing the operator.
#[derive(Debug)]
pub struct Loaded {
    pub app: App,
    pub warnings: Vec<String>,
}

/// Load the app named by `target` (an ecosystem file or a script), applying `over`.
pub fn load(target: &Path, over: &Overrides, cpus: u32) -> Result<Loaded, ConfigError> {
    let resolved = resolve_target(target);
    let is_config = resolved.as_deref().is_some_and(is_config_file);
    if let Some(file) = resolved.filter(|_| is_config) {
        let source = file.display().to_string();
        let doc = read_ecosystem(&file)?;
        let base = file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = absolute(&base);
        let entry = pick_app(&doc, &source, over.only.as_deref())?;
        from_entry(&entry, &source, &base, over, cpus)
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
        from_entry(&entry, "command line", &cwd, over, cpus)
    }
}

fn is_config_file(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".json")
        || name.ends_with(".config.js")
        || name.ends_with(".config.cjs")
        || name.ends_with(".config.mjs")
}

/// `/etc/nodeherd/api` finds `/etc/nodeherd/api.config.js` and friends, so a
/// template unit can name the app alone.
fn resolve_target(target: &Path) -> Option<PathBuf> {
    if target.exists() {
        return Some(target.to_path_buf());
    }
    if target.extension().is_some() {
        return None;
    }
    let stem = target.as_os_str().to_string_lossy();
    [
        ".config.js",
        ".config.cjs",
        ".config.mjs",
        ".json",
        ".config.json",
    ]
    .iter()
    .map(|ext| PathBuf::from(format!("{stem}{ext}")))
    .find(|p| p.exists())
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

fn read_ecosystem(file: &Path) -> Result<Value, ConfigError> {
    let source = file.display().to_string();
    let err = |msg: String| ConfigError {
        source: source.clone(),
        app: None,
        key: None,
        msg,
    };
    let text = if file.extension().is_some_and(|e| e == "json") {
        std::fs::read_to_string(file).map_err(|e| err(format!("cannot read: {e}")))?
    } else {
        eval_config_js(file).map_err(err)?
    };
    serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))
}

/// Evaluate a `.config.js` with node and return the JSON it prints.
fn eval_config_js(file: &Path) -> Result<String, String> {
    // The evaluator accepts `module.exports = {...}`, a function returning
    // the config, and ES modules with a default export.
    const EVAL: &str = r#"
const p = require('path').resolve(process.argv[1]);
const done = (m) => {
  let c = m && m.__esModule && m.default ? m.default : m;
  if (c && typeof c === 'object' && 'default' in c && !('apps' in c)) c = c.default;
  if (typeof c === 'function') c = c();
  Promise.resolve(c).then((v) => process.stdout.write(JSON.stringify(v === undefined ? null : v)));
};
if (p.endsWith('.mjs')) import(require('url').pathToFileURL(p)).then(done, (e) => { console.error(String(e && e.stack || e)); process.exit(1); });
else done(require(p));
"#;
    let mut child = Command::new("node")
        .arg("-e")
        .arg(EVAL)
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("NODE_OPTIONS")
        .spawn()
        .map_err(|e| format!("cannot run `node` to evaluate it (is node on PATH?): {e}"))?;
    // Read the pipes on threads so a chatty config cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout was piped above");
    let mut err = child.stderr.take().expect("stderr was piped above");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let deadline = Instant::now() + CONFIG_JS_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "evaluating it took longer than {} s (does it loop or wait on something?)",
                    CONFIG_JS_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for node failed: {e}")),
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    if !status.success() {
        let last = stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(6)
            .collect::<Vec<_>>()
            .join(" | ");
        return Err(format!("evaluating it with node failed ({status}): {last}"));
    }
    Ok(stdout)
}

/// Find the app entry: `--only NAME`, or the single app of the file.
fn pick_app(
    doc: &Value,
    source: &str,
    only: Option<&str>,
) -> Result<Map<String, Value>, ConfigError> {
    let err = |msg: String| ConfigError {
        source: source.to_string(),
        app: None,
        key: None,
        msg,
    };
    let apps: Vec<Map<String, Value>> = match doc {
        Value::Object(o) => match o.get("apps") {
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Object(m) => Ok(m.clone()),
                    other => Err(err(format!("apps[{i}] must be an object, got {other}"))),
                })
                .collect::<Result<_, _>>()?,
            Some(Value::Object(m)) => vec![m.clone()],
            Some(other) => return Err(err(format!("`apps` must be an array, got {other}"))),
            // A file that is a single app entry.
            None if o.contains_key("script") => vec![o.clone()],
            None => return Err(err("no `apps` array in the file".into())),
        },
        Value::Array(a) => a.iter().filter_map(|v| v.as_object().cloned()).collect(),
        other => return Err(err(format!("expected an object with `apps`, got {other}"))),
    };
    if apps.is_empty() {
        return Err(err("the file lists no apps".into()));
    }
    let name_of =
        |m: &Map<String, Value>| m.get("name").and_then(Value::as_str).map(str::to_string);
    match only {
        Some(want) => apps
            .iter()
            .find(|m| name_of(m).as_deref() == Some(want))
            .cloned()
            .ok_or_else(|| {
                let names: Vec<String> = apps.iter().filter_map(name_of).collect();
                err(format!(
                    "--only {want}: no app of that name (the file has: {})",
                    names.join(", ")
                ))
            }),
        None if apps.len() == 1 => Ok(apps[0].clone()),
        None => {
            let names: Vec<String> = apps.iter().filter_map(name_of).collect();
            Err(err(format!(
                "the file has {} apps ({}): choose one with --only NAME",
                apps.len(),
                names.join(", ")
            )))
        }
    }
}

/// Reads typed values out of one app entry, with errors that name the key.
struct Entry<'a> {
    map: &'a Map<String, Value>,
    source: &'a str,
    app: Option<String>,
}

impl Entry<'_> {
    fn err(&self, key: &str, msg: String) -> ConfigError {
        ConfigError {
            source: self.source.to_string(),
            app: self.app.clone(),
            key: Some(key.to_string()),
            msg,
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.err(key, format!("expected a string, got {other}"))),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s == "true" => Ok(Some(true)),
            Some(Value::String(s)) if s == "false" => Ok(Some(false)),
            Some(other) => Err(self.err(key, format!("expected true or false, got {other}"))),
        }
    }

    /// A string (split on whitespace) or an array of strings.
    fn words(&self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.split_whitespace().map(str::to_string).collect())),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    other => {
                        Err(self.err(key, format!("expected strings in the array, got {other}")))
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(other) => Err(self.err(
                key,
                format!("expected a string or an array of strings, got {other}"),
            )),
        }
    }

    fn count(&self, key: &str, max: u64) -> Result<Option<u64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                let n = match v {
                    Value::Number(n) => n.as_u64(),
                    Value::String(s) => s.trim().parse::<u64>().ok(),
                    _ => None,
                };
                match n {
                    Some(n) if n <= max => Ok(Some(n)),
                    Some(n) => Err(self.err(key, format!("{n} is too large (at most {max})"))),
                    None => Err(self.err(
                        key,
                        format!("expected a whole number from 0 to {max}, got {v}"),
                    )),
                }
            }
        }
    }

    /// Milliseconds as a number, or a string with a unit (`500ms`, `2s`, `1m`, `1h`).
    fn duration(&self, key: &str) -> Result<Option<Duration>, ConfigError> {
        // A day is far beyond any sane timeout and keeps sd_notify's u32 microsecond fields safe.
        const MAX_MS: u64 = 24 * 3600 * 1000;
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let ms = match v {
            Value::Number(n) => n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0 && *f <= MAX_MS as f64)
                    .map(|f| f as u64)
            }),
            Value::String(s) => parse_duration_ms(s),
            _ => None,
        };
        match ms {
            Some(ms) if ms <= MAX_MS => Ok(Some(Duration::from_millis(ms))),
            Some(_) => Err(self.err(key, format!("{v} is longer than a day"))),
            None => Err(self.err(
                key,
                format!("expected milliseconds (a number ≥ 0) or a duration like \"2s\", got {v}"),
            )),
        }
    }
}

/// `"1500"`, `"1500ms"`, `"2s"`, `"1m"`, `"1h"` → milliseconds.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let factor = match unit.trim() {
        "" | "ms" => 1.0,
        "s" => 1000.0,
        "m" | "min" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    let ms = num * factor;
    (0.0..1e15).contains(&ms).then_some(ms as u64)
}

/// `"150M"`, `"1G"`, `"512K"`, or a number of bytes.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: u64 = num.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" => 1 << 10,
        "M" | "MB" => 1 << 20,
        "G" | "GB" => 1 << 30,
        _ => return None,
    };
    num.checked_mul(factor).filter(|b| *b > 0)
}

/// `instances`: a number, `"max"`, `0` (all CPUs) or `-n` (CPUs minus n, at least 1).
pub fn resolve_instances(v: &Value, cpus: u32) -> Result<u32, String> {
    let n: i64 = match v {
        Value::Number(n) => match n.as_i64() {
            Some(i) => i,
            None => {
                return Err(format!(
                    "expected a whole number, \"max\" or a negative number, got {v}"
                ));
            }
        },
        Value::String(s) if s.trim().eq_ignore_ascii_case("max") => 0,
        Value::String(s) => s.trim().parse::<i64>().map_err(|_| {
            format!("expected a whole number, \"max\" or a negative number, got {v}")
        })?,
        other => {
            return Err(format!(
                "expected a whole number, \"max\" or a negative number, got {other}"
            ));
        }
    };
    let cpus = i64::from(cpus.max(1));
    let resolved = match n {
        0 => cpus,
        n if n < 0 => (cpus + n).max(1),
        n => n,
    };
    if resolved > i64::from(MAX_INSTANCES) {
        return Err(format!(
            "{v} is more than the {MAX_INSTANCES} workers one manager runs"
        ));
    }
    Ok(resolved as u32)
}

fn from_entry(
    map: &Map<String, Value>,
    source: &str,
    base: &Path,
    over: &Overrides,
    cpus: u32,
) -> Result<Loaded, ConfigError> {
    let mut e = Entry {
        map,
        source,
        app: None,
    };
    let mut warnings = Vec::new();

    let script = e
        .string("script")?
        .ok_or_else(|| e.err("script", "is missing: say which file to run".into()))?;
    let file_name = e.string("name")?;
    let name = over.name.clone().or(file_name).unwrap_or_else(|| {
        Path::new(&script)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("app")
            .to_string()
    });
    if name.is_empty() || name.len() > 200 || name.chars().any(|c| c.is_control() || c == '/') {
        return Err(e.err("name", format!("{name:?} is not a usable app name")));
    }
    e.app = Some(name.clone());

    for key in map.keys() {
        if KNOWN_KEYS.contains(&key.as_str()) || key.starts_with("env_") {
            continue;
        }
        if IGNORED_PM2_KEYS.contains(&key.as_str()) {
            warnings.push(format!(
                "{source}: app \"{name}\": key `{key}` is a PM2 option nodeherd does not use; ignored"
            ));
        } else {
            warnings.push(format!(
                "{source}: app \"{name}\": unknown key `{key}`; ignored"
            ));
        }
    }

    let cwd = match e.string("cwd")? {
        Some(c) => base.join(c),
        None => base.to_path_buf(),
    };
    if !cwd.is_dir() {
        return Err(e.err("cwd", format!("{} is not a directory", cwd.display())));
    }
    let script_path = normalize(&cwd.join(&script));

    // Interpreter: node unless told otherwise; `none` runs the script itself.
    let interp_name = match &over.interpreter {
        Some(i) => Some(i.clone()),
        None => match e.string("interpreter")? {
            Some(i) => Some(i),
            None => e.string("exec_interpreter")?,
        },
    };
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
                return Err(e.err(
                    "interpreter",
                    format!("{} was not found or is not executable", p.display()),
                ));
            }
            if !script_path.is_file() {
                return Err(e.err(
                    "script",
                    format!("{} does not exist or is not a file", script_path.display()),
                ));
            }
        }
        Interpreter::None => {
            if find_executable(&script_path).is_none() {
                return Err(e.err(
                    "script",
                    format!(
                        "{} was not found or is not executable",
                        script_path.display()
                    ),
                ));
            }
        }
    }

    let mut interpreter_args = match &over.node_args {
        Some(a) => a.split_whitespace().map(str::to_string).collect(),
        None => match e.words("node_args")? {
            Some(a) => a,
            None => e.words("interpreter_args")?.unwrap_or_default(),
        },
    };
    interpreter_args.retain(|a| !a.is_empty());
    let args = if over.args.is_empty() {
        e.words("args")?.unwrap_or_default()
    } else {
        over.args.clone()
    };

    let fork_mode = match e.string("exec_mode")?.as_deref() {
        None | Some("cluster") | Some("cluster_mode") => false,
        Some("fork") | Some("fork_mode") => true,
        Some(other) => {
            return Err(e.err(
                "exec_mode",
                format!("expected \"cluster\" or \"fork\", got \"{other}\""),
            ));
        }
    };
    let instances = match &over.instances {
        Some(s) => {
            resolve_instances(&Value::String(s.clone()), cpus).map_err(|msg| ConfigError {
                source: "command line".into(),
                app: Some(name.clone()),
                key: Some("--instances".into()),
                msg,
            })?
        }
        None => match e.get("instances") {
            Some(v) => resolve_instances(v, cpus).map_err(|m| e.err("instances", m))?,
            None if fork_mode => 1,
            // PM2 starts one instance when `instances` is unset.
            None => 1,
        },
    };
    let instances = if fork_mode && over.instances.is_none() && instances > 1 {
        warnings.push(format!(
            "{source}: app \"{name}\": exec_mode fork runs one worker; `instances` ignored"
        ));
        1
    } else {
        instances
    };

    let instance_var = match &over.instance_var {
        Some(v) => v.clone(),
        None => e
            .string("instance_var")?
            .unwrap_or_else(|| "NODE_APP_INSTANCE".into()),
    };
    if !is_env_name(&instance_var) {
        return Err(e.err(
            "instance_var",
            format!("{instance_var:?} is not a valid environment variable name"),
        ));
    }

    let mut env = BTreeMap::new();
    let mut apply_env = |key: &str| -> Result<bool, ConfigError> {
        match e.get(key) {
            None => Ok(false),
            Some(Value::Object(o)) => {
                for (k, v) in o {
                    if !is_env_name(k) {
                        return Err(e.err(
                            key,
                            format!("{k:?} is not a valid environment variable name"),
                        ));
                    }
                    let v = match v {
                        Value::String(s) => s.clone(),
                        Value::Null => continue,
                        other => other.to_string(),
                    };
                    if v.contains('\0') {
                        return Err(e.err(key, format!("the value of {k} contains a NUL byte")));
                    }
                    env.insert(k.clone(), v);
                }
                Ok(true)
            }
            Some(other) => Err(e.err(key, format!("expected an object of variables, got {other}"))),
        }
    };
    apply_env("env")?;
    if let Some(env_name) = &over.env_name {
        let key = format!("env_{env_name}");
        if !apply_env(&key)? {
            return Err(ConfigError {
                source: source.to_string(),
                app: Some(name.clone()),
                key: Some(key),
                msg: format!("--env {env_name} was given but the app has no `env_{env_name}`"),
            });
        }
    }

    let wait_ready = over.wait_ready || e.bool("wait_ready")?.unwrap_or(false);
    let listen_timeout = match over.listen_timeout {
        Some(ms) => Duration::from_millis(ms),
        None => e
            .duration("listen_timeout")?
            .unwrap_or(Duration::from_millis(3000)),
    };
    let kill_timeout = match over.kill_timeout {
        Some(ms) => Duration::from_millis(ms),
        None => e
            .duration("kill_timeout")?
            .unwrap_or(Duration::from_millis(1600)),
    };
    if listen_timeout.is_zero() {
        return Err(e.err("listen_timeout", "must be more than 0".into()));
    }
    let shutdown_with_message =
        over.shutdown_with_message || e.bool("shutdown_with_message")?.unwrap_or(false);
    let min_uptime = e
        .duration("min_uptime")?
        .unwrap_or(Duration::from_millis(1000));
    let max_restarts = e.count("max_restarts", 1_000_000)?.unwrap_or(16) as u32;
    let restart_delay = e.duration("restart_delay")?.unwrap_or_default();
    let exp_backoff_restart_delay = e.duration("exp_backoff_restart_delay")?.unwrap_or_default();
    let autorestart = e.bool("autorestart")?.unwrap_or(true);
    let max_memory_restart = match e.get("max_memory_restart") {
        None => None,
        Some(v) => {
            let b = match v {
                Value::Number(n) => n.as_u64().filter(|b| *b > 0),
                Value::String(s) => parse_bytes(s),
                _ => None,
            };
            Some(b.ok_or_else(|| {
                e.err(
                    "max_memory_restart",
                    format!("expected a size like \"300M\" or a number of bytes, got {v}"),
                )
            })?)
        }
    };
    let listen = if over.listen.is_empty() {
        e.words("listen")?.unwrap_or_default()
    } else {
        over.listen.clone()
    };
    let reload_parallel = match over.reload_parallel {
        Some(n) => u64::from(n),
        None => e
            .count("reload_parallel", u64::from(MAX_INSTANCES))?
            .unwrap_or(1),
    };
    if reload_parallel == 0 {
        return Err(e.err("reload_parallel", "must be at least 1".into()));
    }

    let credentials = resolve_credentials(&e)?;
    let balance_text = match &over.balance {
        Some(b) => Some(b.clone()),
        None => e.string("balance")?,
    };
    let balance = match balance_text.as_deref() {
        None | Some("queue") => Balance::Queue,
        Some("reuseport") => Balance::ReusePort,
        Some(other) => {
            return Err(e.err(
                "balance",
                format!("expected \"queue\" or \"reuseport\", got \"{other}\""),
            ));
        }
    };

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
            wait_ready,
            listen_timeout,
            kill_timeout,
            shutdown_with_message,
            min_uptime,
            max_restarts,
            restart_delay,
            exp_backoff_restart_delay,
            autorestart,
            max_memory_restart,
            listen,
            reload_parallel: reload_parallel as u32,
            credentials,
            balance,
        },
        warnings,
    })
}

/// `uid`/`gid`: a name or a number each; a user alone brings its primary group.
fn resolve_credentials(e: &Entry<'_>) -> Result<Option<Credentials>, ConfigError> {
    use nix::unistd::{Gid, Group, Uid, User};
    let text = |key: &str| -> Result<Option<String>, ConfigError> {
        match e.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(Some(n.to_string())),
            Some(other) => Err(e.err(
                key,
                format!("expected a user or group name or number, got {other}"),
            )),
        }
    };
    let (uid, gid) = (text("uid")?, text("gid")?);
    if uid.is_none() && gid.is_none() {
        return Ok(None);
    }
    let user = match &uid {
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
            Some(found.ok_or_else(|| e.err("uid", format!("no user named {u:?} on this system")))?)
        }
    };
    let gid = match &gid {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| e.err("gid", format!("no group named {g:?} on this system")))?
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
fn normalize(p: &Path) -> PathBuf {
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

fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
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
    fn pick_app_needs_only_with_several() {
        let doc =
            json!({"apps": [{"name": "a", "script": "a.js"}, {"name": "b", "script": "b.js"}]});
        let e = pick_app(&doc, "f.json", None).unwrap_err();
        assert!(e.msg.contains("--only"), "{e}");
        assert_eq!(pick_app(&doc, "f.json", Some("b")).unwrap()["name"], "b");
        assert!(
            pick_app(&doc, "f.json", Some("c"))
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
            key in prop::sample::select(KNOWN_KEYS.to_vec()),
            value in json_value(),
        ) {
            let mut entry = Map::new();
            entry.insert("script".into(), Value::String("/bin/sh".into()));
            entry.insert("interpreter".into(), Value::String("none".into()));
            entry.insert(key.to_string(), value);
            let _ = from_entry(&entry, "fuzz.json", Path::new("/"), &Overrides::default(), 4);
        }

        #[test]
        fn any_document_picks_an_app_or_says_why(doc in json_value(), only in proptest::option::of("[a-z]{1,3}")) {
            let _ = pick_app(&doc, "fuzz.json", only.as_deref());
        }

        #[test]
        fn instances_never_exceed_the_cap(v in json_value(), cpus in 0u32..512) {
            if let Ok(n) = resolve_instances(&v, cpus) {
                prop_assert!((1..=MAX_INSTANCES).contains(&n));
            }
        }
    }
}
