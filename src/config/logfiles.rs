//! The log-file keys: PM2's (`out_file`, `error_file`, `log_file`,
//! `merge_logs`, `log_date_format`, `time`) and nodeherd's rotation keys
//! (`log_max_size`, `log_retain`, `log_compress`, `log_rotate_interval`,
//! named after pm2-logrotate's `max_size`, `retain`, `compress`,
//! `rotateInterval`).
//!
//! Kept apart from the other keys because they travel together: parsed
//! into [`RawLogs`], resolved against the app's working directory into one
//! [`LogFiles`] that the log writer reads as a whole. Which paths can
//! really be written is checked where files are opened (`logs::files`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::values as v;

/// The log keys of one entry, as written.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RawLogs {
    pub out: Option<String>,
    pub error: Option<String>,
    pub combined: Option<String>,
    pub merge: Option<bool>,
    pub date_format: Option<String>,
    pub time: Option<bool>,
    pub max_size: Option<u64>,
    pub retain: Option<u32>,
    pub compress: Option<bool>,
    pub interval: Option<Interval>,
}

/// Where worker lines go besides (instead of) the journal, and how the
/// files are rotated. Crosses a re-exec inside `App`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct LogFiles {
    /// Workers' stdout (`out_file`), absolute.
    pub out: Option<PathBuf>,
    /// Workers' stderr (`error_file`), absolute.
    pub error: Option<PathBuf>,
    /// Both (`log_file`), absolute.
    pub combined: Option<PathBuf>,
    /// One file for every worker; else each slot writes `NAME-N.log`.
    pub merge: bool,
    /// Each line prefixed with the time in this day.js format, then `: `.
    pub date_format: Option<String>,
    /// Rotate a file before a line would take it past this many bytes.
    pub max_size: Option<u64>,
    /// Rotate a file when its first line is from an earlier period.
    pub interval: Option<Interval>,
    /// Rotated files kept per file.
    pub retain: u32,
    /// Rotated files are gzipped.
    pub compress: bool,
}

/// Which stream's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Out,
    Error,
    Combined,
}

impl LogFiles {
    /// Any file at all.
    pub fn any(&self) -> bool {
        self.out.is_some() || self.error.is_some() || self.combined.is_some()
    }

    /// The file `which` of slot `index`: `out.log` becomes `out-2.log`
    /// unless the logs are merged.
    pub fn path(&self, which: Which, index: u32) -> Option<PathBuf> {
        let p = match which {
            Which::Out => self.out.as_ref(),
            Which::Error => self.error.as_ref(),
            Which::Combined => self.combined.as_ref(),
        }?;
        if self.merge || p == Path::new(DEV_NULL) {
            return Some(p.clone());
        }
        Some(per_slot(p, index))
    }

    /// Rotation of some kind is asked for.
    pub fn rotates(&self) -> bool {
        self.max_size.is_some() || self.interval.is_some()
    }
}

/// `dir/out.log` → `dir/out-N.log`; a name without an extension gets `-N`.
fn per_slot(p: &Path, index: u32) -> PathBuf {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let named = match name.rfind('.').filter(|&i| i > 0) {
        Some(i) => format!("{}-{index}{}", &name[..i], &name[i..]),
        None => format!("{name}-{index}"),
    };
    p.with_file_name(named)
}

/// How often files are rotated by date (pm2-logrotate's `rotateInterval`
/// is a cron line; these are the ones people use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Interval {
    Hourly,
    Daily,
    Weekly,
    Monthly,
}

const DEV_NULL: &str = "/dev/null";

/// The rotated files kept when `log_retain` is not set (pm2-logrotate's).
pub const DEFAULT_RETAIN: u32 = 30;

/// PM2's format for `time: true`.
const TIME_FORMAT: &str = "YYYY-MM-DDTHH:mm:ss";

fn interval(x: &Value) -> Result<Interval, String> {
    let s = v::string(x)?;
    Ok(match s.trim() {
        "hourly" | "0 * * * *" => Interval::Hourly,
        "daily" | "0 0 * * *" => Interval::Daily,
        "weekly" | "0 0 * * 0" | "0 0 * * 1" => Interval::Weekly,
        "monthly" | "0 0 1 * *" => Interval::Monthly,
        other => {
            return Err(format!(
                "expected \"hourly\", \"daily\", \"weekly\" or \"monthly\" (or the cron line of one: \
                 \"0 0 * * *\" is daily), got {other:?}"
            ));
        }
    })
}

/// A path value: a string; PM2's `"NULL"` is `/dev/null`.
fn path(x: &Value) -> Result<String, String> {
    let s = v::string(x)?;
    if s.is_empty() || s.contains('\0') {
        return Err(format!("{s:?} is not a path"));
    }
    Ok(if s == "NULL" { DEV_NULL.into() } else { s })
}

/// A log key: its name, and how its value is read into [`RawLogs`].
pub struct LogKey {
    pub name: &'static str,
    pub(super) set: fn(&mut RawLogs, &Value) -> Result<(), String>,
}

/// The log keys, read by `keys::parse` beside its own table.
pub const KEYS: &[LogKey] = &[
    LogKey {
        name: "out_file",
        set: |r, x| {
            r.out = Some(path(x)?);
            Ok(())
        },
    },
    LogKey {
        name: "error_file",
        set: |r, x| {
            r.error = Some(path(x)?);
            Ok(())
        },
    },
    LogKey {
        name: "log_file",
        set: |r, x| {
            r.combined = match x {
                Value::Bool(false) => None,
                Value::Bool(true) => {
                    return Err(
                        "`true` means PM2's ~/.pm2/logs/<app>.log: give the path of the file"
                            .into(),
                    );
                }
                other => Some(path(other)?),
            };
            Ok(())
        },
    },
    LogKey {
        name: "merge_logs",
        set: |r, x| {
            r.merge = Some(v::boolean(x)?);
            Ok(())
        },
    },
    LogKey {
        name: "combine_logs",
        set: |r, x| {
            r.merge = Some(v::boolean(x)?);
            Ok(())
        },
    },
    LogKey {
        name: "log_date_format",
        set: |r, x| {
            let f = v::string(x)?;
            if f.chars().any(char::is_control) || f.len() > 100 {
                return Err(format!(
                    "{f:?}: at most 100 characters, none of them control characters"
                ));
            }
            r.date_format = Some(f);
            Ok(())
        },
    },
    LogKey {
        name: "time",
        set: |r, x| {
            r.time = Some(v::boolean(x)?);
            Ok(())
        },
    },
    LogKey {
        name: "log_max_size",
        set: |r, x| {
            let n = v::size(x)?;
            if n < 1024 {
                return Err(format!("{n} bytes is too small: at least 1K"));
            }
            r.max_size = Some(n);
            Ok(())
        },
    },
    LogKey {
        name: "log_retain",
        set: |r, x| {
            let n = v::count(x, 100_000)?;
            if n == 0 {
                return Err("must be at least 1".into());
            }
            r.retain = Some(n as u32);
            Ok(())
        },
    },
    LogKey {
        name: "log_compress",
        set: |r, x| {
            r.compress = Some(v::boolean(x)?);
            Ok(())
        },
    },
    LogKey {
        name: "log_rotate_interval",
        set: |r, x| {
            r.interval = Some(interval(x)?);
            Ok(())
        },
    },
];

/// Resolve the paths against the app's working directory (as PM2 does,
/// `~/` against `$HOME`). `fork` apps merge by default, as PM2's. Returns
/// the files, or the key and what is wrong with it; `warnings` gets what
/// is set but does nothing.
pub fn resolve(
    raw: &RawLogs,
    cwd: &Path,
    fork: bool,
    warnings: &mut Vec<String>,
) -> Result<LogFiles, (&'static str, String)> {
    let place = |key: &'static str, p: &Option<String>| -> Result<Option<PathBuf>, _> {
        let Some(p) = p else { return Ok(None) };
        let p = match p.strip_prefix("~/") {
            Some(rest) => match std::env::var_os("HOME") {
                Some(home) if !home.is_empty() => Path::new(&home).join(rest),
                _ => return Err((key, format!("{p:?}: $HOME is not set to resolve `~`"))),
            },
            None => cwd.join(p),
        };
        let p = super::normalize(&p);
        if p.file_name().is_none() || p == Path::new("/") {
            return Err((key, format!("{} is not a file name", p.display())));
        }
        Ok(Some(p))
    };
    let files = LogFiles {
        out: place("out_file", &raw.out)?,
        error: place("error_file", &raw.error)?,
        combined: place("log_file", &raw.combined)?,
        merge: raw.merge.unwrap_or(fork),
        date_format: if raw.time == Some(true) {
            Some(TIME_FORMAT.into())
        } else {
            raw.date_format.clone()
        },
        max_size: raw.max_size,
        interval: raw.interval,
        retain: raw.retain.unwrap_or(DEFAULT_RETAIN),
        compress: raw.compress.unwrap_or(false),
    };
    let rotation_keys = raw.max_size.is_some()
        || raw.interval.is_some()
        || raw.retain.is_some()
        || raw.compress.is_some();
    if !files.any() && (rotation_keys || files.date_format.is_some()) {
        warnings.push(
            "log rotation and timestamp keys apply to out_file, error_file and log_file, and none \
             is set: worker lines go to the journal, which journald rotates"
                .into(),
        );
    } else if !files.rotates() && (raw.retain.is_some() || raw.compress.is_some()) {
        warnings.push(
            "`log_retain`/`log_compress` apply to the manager's own rotation, and neither \
             `log_max_size` nor `log_rotate_interval` is set"
                .into(),
        );
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(f: impl FnOnce(&mut RawLogs)) -> RawLogs {
        let mut r = RawLogs::default();
        f(&mut r);
        r
    }

    #[test]
    fn slots_get_their_own_file_unless_merged_or_forked() {
        let r = raw(|r| {
            r.out = Some("logs/out.log".into());
            r.error = Some("/var/log/api/err".into());
            r.combined = Some(path(&"NULL".into()).unwrap());
        });
        let f = resolve(&r, Path::new("/srv/api"), false, &mut vec![]).unwrap();
        assert_eq!(
            f.path(Which::Out, 2),
            Some(PathBuf::from("/srv/api/logs/out-2.log"))
        );
        assert_eq!(
            f.path(Which::Error, 0),
            Some(PathBuf::from("/var/log/api/err-0"))
        );
        assert_eq!(f.path(Which::Combined, 1), Some(PathBuf::from("/dev/null")));
        let forked = resolve(&r, Path::new("/srv/api"), true, &mut vec![]).unwrap();
        assert_eq!(
            forked.path(Which::Out, 0),
            Some(PathBuf::from("/srv/api/logs/out.log"))
        );
        let merged = resolve(
            &RawLogs {
                merge: Some(true),
                ..r
            },
            Path::new("/srv/api"),
            false,
            &mut vec![],
        )
        .unwrap();
        assert_eq!(
            merged.path(Which::Out, 3),
            Some(PathBuf::from("/srv/api/logs/out.log"))
        );
    }

    #[test]
    fn time_is_pm2s_iso_format_and_wins() {
        let r = raw(|r| {
            r.out = Some("o.log".into());
            r.time = Some(true);
            r.date_format = Some("HH:mm".into());
        });
        let f = resolve(&r, Path::new("/"), false, &mut vec![]).unwrap();
        assert_eq!(f.date_format.as_deref(), Some("YYYY-MM-DDTHH:mm:ss"));
        assert_eq!(f.retain, DEFAULT_RETAIN);
    }

    #[test]
    fn rotation_without_files_is_warned_about() {
        let mut w = vec![];
        let r = raw(|r| r.max_size = Some(1 << 20));
        assert!(!resolve(&r, Path::new("/"), false, &mut w).unwrap().any());
        assert_eq!(w.len(), 1, "{w:?}");
    }

    #[test]
    fn intervals_take_words_and_their_cron_lines() {
        assert_eq!(interval(&"daily".into()), Ok(Interval::Daily));
        assert_eq!(interval(&"0 0 * * *".into()), Ok(Interval::Daily));
        assert_eq!(interval(&"0 * * * *".into()), Ok(Interval::Hourly));
        assert!(
            interval(&"*/5 * * * *".into())
                .unwrap_err()
                .contains("daily")
        );
    }
}
