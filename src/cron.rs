//! `cron_restart` schedules, read as PM2 reads them.
//!
//! PM2 hands the pattern to the `croner` package; the Rust crate of the same
//! name and author reads the same syntax: five fields (minute granularity)
//! or six with seconds first, names (`MON`, `JAN`), ranges, steps, `L`, `W`,
//! `#` and the `@daily` aliases, in the machine's local time. Parsing is
//! pure and done when the configuration is read; the next run is asked of
//! the wall clock by the driver, since the supervisor's core has no clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Local};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// A checked `cron_restart` pattern.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
}

impl Schedule {
    /// Read `pattern`; the error says what is expected, never more.
    pub fn parse(pattern: &str) -> Result<Schedule, String> {
        let fields = pattern.split_whitespace().count();
        let alias = pattern.trim_start().starts_with('@');
        if !alias && !(5..=6).contains(&fields) {
            return Err(format!(
                "{pattern:?} has {fields} field(s): a cron pattern has 5 (minute hour day month weekday) or 6 (seconds first)"
            ));
        }
        CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(pattern)
            .map(|cron| Schedule { cron })
            .map_err(|e| format!("{pattern:?} is not a cron pattern: {e}"))
    }

    /// The first run strictly after `after`, in the local time zone.
    pub fn next_after(&self, after: SystemTime) -> Option<SystemTime> {
        let at: DateTime<Local> = after.into();
        let next = self.cron.find_next_occurrence(&at, false).ok()?;
        Some(SystemTime::from(next))
    }
}

/// The next run of `pattern` strictly after both `now` and `not_before`
/// (the run just made, so a timer that fires a little early against the
/// wall clock never runs the same occurrence twice): how long from `now`,
/// and when, in milliseconds since the epoch.
pub fn next_run(
    pattern: &str,
    now: SystemTime,
    not_before: Option<u64>,
) -> Result<(Duration, u64), String> {
    let schedule = Schedule::parse(pattern)?;
    let floor = not_before
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        .filter(|t| *t > now)
        .unwrap_or(now);
    let next = schedule
        .next_after(floor)
        .ok_or_else(|| format!("{pattern:?} never runs again"))?;
    let wait = next.duration_since(now).unwrap_or_default();
    let unix_ms = next
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Ok((wait, unix_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_and_six_fields_and_aliases_are_read_as_pm2_does() {
        for ok in [
            "0 3 * * *",
            "*/15 * * * *",
            "*/2 * * * * *",
            "0 0 * * MON-FRI",
            "@daily",
        ] {
            Schedule::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "* * * *", "0 0 0 * * * 2030", "61 * * * *", "nightly"] {
            assert!(Schedule::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_next_run_is_strictly_later_and_never_the_same_twice() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let (wait, at) = next_run("* * * * * *", now, None).unwrap();
        assert!(
            wait <= Duration::from_secs(1) && !wait.is_zero(),
            "{wait:?}"
        );
        // The run at `at` was just made: the next is a second later, even
        // if the clock still reads a little before it.
        let early = UNIX_EPOCH + Duration::from_millis(at) - Duration::from_millis(5);
        let (_, again) = next_run("* * * * * *", early, Some(at)).unwrap();
        assert_eq!(again, at + 1000);
        let (wait, _) = next_run("0 * * * *", now, None).unwrap();
        assert!(wait <= Duration::from_secs(3600), "{wait:?}");
    }
}
