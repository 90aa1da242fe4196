//! Typed values out of JSON, with PM2's spellings: durations as
//! milliseconds or `"2s"`, sizes as `"300M"`, `instances` as a number,
//! `"max"` or a negative offset. Pure functions; an error is a sentence
//! about the value, and the caller adds which key it was.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::{Balance, FilterEnv, MAX_INSTANCES};

/// A day is far beyond any sane timeout and keeps sd_notify's u32 microsecond fields safe.
const MAX_DURATION_MS: u64 = 24 * 3600 * 1000;

pub fn string(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!("expected a string, got {other}")),
    }
}

pub fn boolean(v: &Value) -> Result<bool, String> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s == "true" => Ok(true),
        Value::String(s) if s == "false" => Ok(false),
        other => Err(format!("expected true or false, got {other}")),
    }
}

/// A string (split on whitespace) or an array of strings.
pub fn words(v: &Value) -> Result<Vec<String>, String> {
    match v {
        Value::String(s) => Ok(s.split_whitespace().map(str::to_string).collect()),
        Value::Array(a) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                other => Err(format!("expected strings in the array, got {other}")),
            })
            .collect(),
        other => Err(format!(
            "expected a string or an array of strings, got {other}"
        )),
    }
}

/// A string, or an array of strings (each one item, spaces and all).
pub fn strings(v: &Value) -> Result<Vec<String>, String> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!("expected strings in the array, got {other}")),
            })
            .collect(),
        other => Err(format!(
            "expected a string or an array of strings, got {other}"
        )),
    }
}

/// The name of an environment variable.
pub fn env_name(v: &Value) -> Result<String, String> {
    let name = string(v)?;
    if !is_env_name(&name) {
        return Err(format!("{name:?} is not a valid environment variable name"));
    }
    Ok(name)
}

/// `watch`: `true` (the app's directory: `None`), `false` (no path), a
/// path or paths.
pub fn watch(v: &Value) -> Result<Option<Vec<String>>, String> {
    match v {
        Value::Bool(true) => Ok(None),
        Value::Bool(false) => Ok(Some(Vec::new())),
        Value::String(s) if s == "true" => Ok(None),
        Value::String(s) if s == "false" => Ok(Some(Vec::new())),
        Value::String(_) | Value::Array(_) => strings(v).map(Some),
        other => Err(format!(
            "expected true, false, a path or an array of paths, got {other}"
        )),
    }
}

/// `stop_exit_codes`: an exit code (0 to 255) or an array of them.
pub fn exit_codes(v: &Value) -> Result<Vec<i32>, String> {
    let one = |x: &Value| -> Result<i32, String> {
        count(x, 255)
            .map(|n| n as i32)
            .map_err(|_| format!("expected exit codes from 0 to 255, got {x}"))
    };
    match v {
        Value::Array(a) => a.iter().map(one).collect(),
        other => Ok(vec![one(other)?]),
    }
}

/// `filter_env`: `true` (every variable of the manager's), `false`, a
/// prefix or an array of prefixes.
pub fn filter_env(v: &Value) -> Result<FilterEnv, String> {
    match v {
        Value::Bool(true) => Ok(FilterEnv::All),
        Value::Bool(false) => Ok(FilterEnv::Nothing),
        Value::String(_) | Value::Array(_) => {
            let p = strings(v)?;
            if p.iter().any(String::is_empty) {
                return Err(
                    "an empty prefix would drop every variable: write `true` for that".into(),
                );
            }
            Ok(FilterEnv::Prefixes(p))
        }
        other => Err(format!(
            "expected true, false, a prefix or an array of prefixes, got {other}"
        )),
    }
}

/// A whole number from 0 to `max`.
pub fn count(v: &Value, max: u64) -> Result<u64, String> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n <= max => Ok(n),
        Some(n) => Err(format!("{n} is too large (at most {max})")),
        None => Err(format!("expected a whole number from 0 to {max}, got {v}")),
    }
}

/// Milliseconds as a number, or a string with a unit (`500ms`, `2s`, `1m`, `1h`).
pub fn duration(v: &Value) -> Result<Duration, String> {
    let ms = match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && *f <= MAX_DURATION_MS as f64)
                .map(|f| f as u64)
        }),
        Value::String(s) => parse_duration_ms(s),
        _ => None,
    };
    match ms {
        Some(ms) if ms <= MAX_DURATION_MS => Ok(Duration::from_millis(ms)),
        Some(_) => Err(format!("{v} is longer than a day")),
        None => Err(format!(
            "expected milliseconds (a number ≥ 0) or a duration like \"2s\", got {v}"
        )),
    }
}

/// `"300M"`, `"1G"` or a number of bytes, more than 0.
pub fn size(v: &Value) -> Result<u64, String> {
    let b = match v {
        Value::Number(n) => n.as_u64().filter(|b| *b > 0),
        Value::String(s) => parse_bytes(s),
        _ => None,
    };
    b.ok_or_else(|| format!("expected a size like \"300M\" or a number of bytes, got {v}"))
}

/// An object of environment variables; `null` values are left out.
pub fn env(v: &Value) -> Result<BTreeMap<String, String>, String> {
    let Value::Object(o) = v else {
        return Err(format!("expected an object of variables, got {v}"));
    };
    let mut env = BTreeMap::new();
    for (k, v) in o {
        if !is_env_name(k) {
            return Err(format!("{k:?} is not a valid environment variable name"));
        }
        let v = match v {
            Value::String(s) => s.clone(),
            Value::Null => continue,
            other => other.to_string(),
        };
        if v.contains('\0') {
            return Err(format!("the value of {k} contains a NUL byte"));
        }
        env.insert(k.clone(), v);
    }
    Ok(env)
}

/// A user or group: a name or a number.
pub fn principal(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) if n.as_u64().is_some() => Ok(n.to_string()),
        other => Err(format!(
            "expected a user or group name or number, got {other}"
        )),
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

/// `instances` as written: a count, or relative to the CPU count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instances {
    /// This many workers.
    Count(u32),
    /// All CPUs (`"max"`, `0`), or all but `n` (`-n`), never fewer than one.
    AllCpusBut(u32),
    /// PM2's alias for all CPUs.
    Max,
}

impl Instances {
    pub fn resolve(self, cpus: u32) -> Result<u32, String> {
        let cpus = cpus.max(1);
        let n = match self {
            Instances::Count(n) => n,
            Instances::Max => cpus,
            Instances::AllCpusBut(n) => cpus.saturating_sub(n).max(1),
        };
        if n > MAX_INSTANCES {
            return Err(format!(
                "{n} is more than the {MAX_INSTANCES} workers one manager runs"
            ));
        }
        Ok(n)
    }
}

/// `instances`: a number, `"max"`, `0` (all CPUs) or `-n` (CPUs minus n).
pub fn instances(v: &Value) -> Result<Instances, String> {
    let bad = || format!("expected a whole number, \"max\" or a negative number, got {v}");
    let n: i64 = match v {
        Value::Number(n) => n.as_i64().ok_or_else(bad)?,
        Value::String(s) if s.trim().eq_ignore_ascii_case("max") => return Ok(Instances::Max),
        Value::String(s) => s.trim().parse::<i64>().map_err(|_| bad())?,
        _ => return Err(bad()),
    };
    match n {
        0 => Ok(Instances::Max),
        n if n < 0 => Ok(Instances::AllCpusBut(
            u32::try_from(n.unsigned_abs()).unwrap_or(u32::MAX),
        )),
        n if n > i64::from(MAX_INSTANCES) => Err(format!(
            "{v} is more than the {MAX_INSTANCES} workers one manager runs"
        )),
        n => Ok(Instances::Count(n as u32)),
    }
}

/// `instances` resolved against the CPU count.
pub fn resolve_instances(v: &Value, cpus: u32) -> Result<u32, String> {
    instances(v)?.resolve(cpus)
}

/// `balance`: `auto`, `queue` or `reuseport`.
pub fn balance(s: &str) -> Result<Balance, String> {
    match s {
        "auto" => Ok(Balance::Auto),
        "queue" => Ok(Balance::Queue),
        "reuseport" => Ok(Balance::ReusePort),
        other => Err(format!(
            "expected \"auto\", \"queue\" or \"reuseport\", got \"{other}\""
        )),
    }
}

pub fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// One `shared_listen` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// `PORT`: that port on any address.
    Port(u16),
    /// `HOST:PORT`, `[V6]:PORT`: that port on that address.
    Inet(IpAddr, u16),
    /// `unix:/path`.
    Unix(PathBuf),
}

impl Allowed {
    /// Parse an entry; the error says what is expected.
    pub fn parse(s: &str) -> Result<Allowed, String> {
        let expected =
            "expected PORT, HOST:PORT or [IPv6]:PORT with a numeric host, or unix:/absolute/path";
        if let Some(p) = s.strip_prefix("unix:") {
            if !p.starts_with('/') || p.len() > 107 || p.contains('\0') {
                return Err(format!("{s:?}: {expected}"));
            }
            return Ok(Allowed::Unix(super::normalize(Path::new(p))));
        }
        let rest = s.strip_prefix("tcp:").unwrap_or(s);
        let port_ok = |p: u16| {
            if p == 0 {
                Err(format!("{s:?}: give a port from 1 to 65535"))
            } else {
                Ok(p)
            }
        };
        if let Ok(p) = rest.parse::<u16>() {
            return Ok(Allowed::Port(port_ok(p)?));
        }
        match rest.parse::<std::net::SocketAddr>() {
            Ok(a) => Ok(Allowed::Inet(a.ip(), port_ok(a.port())?)),
            Err(_) => Err(format!("{s:?}: {expected}")),
        }
    }
}
