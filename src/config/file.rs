//! Reading an ecosystem file: finding it, reading it (a `.config.js` is
//! evaluated by `js`), and picking the app entry. Nothing here knows what
//! the keys mean.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::ConfigError;

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
        super::js::evaluate(file).map_err(err)?
    };
    serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))
}

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

/// An app entry and its `name`.
pub(super) type Named = (String, Map<String, Value>);

/// Every app of a file that has several, by name, to run them together:
/// each gets a manager of its own, picked with `--only NAME`, so each
/// needs a `name` key (`--only` matches nothing else) and no two the same
/// (a bus name and a runtime directory are the app's).
pub(super) fn named_apps(
    apps: Vec<Map<String, Value>>,
    source: &str,
) -> Result<Vec<Named>, ConfigError> {
    let mut named: Vec<Named> = Vec::with_capacity(apps.len());
    for (i, m) in apps.into_iter().enumerate() {
        let err = |msg: String| ConfigError {
            source: source.to_string(),
            app: None,
            key: Some(format!("apps[{i}].name")),
            msg,
        };
        let name = match m.get("name") {
            Some(Value::String(n)) if !n.is_empty() => n.clone(),
            _ => {
                return Err(err(
                    "every app of a file run together needs a name of its own (its manager \
                     is started with --only NAME); give it one, or run one app with --only"
                        .into(),
                ));
            }
        };
        if named.iter().any(|(n, _)| *n == name) {
            return Err(err(format!(
                "two apps are named {name:?}: each app's manager needs a name of its own"
            )));
        }
        named.push((name, m));
    }
    Ok(named)
}

/// Find the app entry: `--only NAME`, or the single app of the file.
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
