//! Reading an ecosystem file: finding it, evaluating a `.config.js`, and
//! picking the app entry. Nothing here knows what the keys mean.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::ConfigError;

/// How long a `.config.js` may take to evaluate before we give up on it.
const CONFIG_JS_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn is_config_file(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".json")
        || name.ends_with(".config.js")
        || name.ends_with(".config.cjs")
        || name.ends_with(".config.mjs")
}

/// `/etc/nodeherd/api` finds `/etc/nodeherd/api.config.js` and friends, so a
/// template unit can name the app alone.
pub(super) fn resolve_target(target: &Path) -> Option<PathBuf> {
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

pub(super) fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

pub(super) fn read_ecosystem(file: &Path) -> Result<Value, ConfigError> {
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
/// Every app entry of an ecosystem document.
pub(super) fn all_apps(doc: &Value, source: &str) -> Result<Vec<Map<String, Value>>, ConfigError> {
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
    Ok(apps)
}

pub(super) fn pick_app(
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
    let apps = all_apps(doc, source)?;
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
