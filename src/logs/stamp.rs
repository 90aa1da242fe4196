//! Local time for log files: the `log_date_format` prefix (day.js tokens,
//! as PM2 formats it), the date in a rotated file's name, and which hour,
//! day, week or month a moment falls in for `log_rotate_interval`.
//!
//! Local as PM2 and logrotate mean it: the zone of `TZ`, else
//! `/etc/localtime`, read by the C library's `localtime_r`.

use crate::config::Interval;

/// A moment, broken down in local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Local {
    pub year: i64,
    /// 1 to 12.
    pub month: u32,
    /// 1 to 31.
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    pub millis: u32,
    /// 0 is Sunday.
    pub weekday: u32,
    /// East of UTC, in seconds.
    pub offset: i64,
    /// Seconds since the epoch.
    pub epoch: i64,
}

impl Local {
    /// Now.
    pub fn now() -> Local {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Local::at(t.as_secs() as i64, t.subsec_millis())
    }

    /// `epoch` seconds (and `millis`) since the epoch.
    pub fn at(epoch: i64, millis: u32) -> Local {
        // SAFETY: localtime_r writes the tm it is given and nothing else.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        let t: libc::time_t = epoch as libc::time_t;
        let ok = !unsafe { libc::localtime_r(&t, &mut tm) }.is_null();
        if !ok {
            tm = unsafe { std::mem::zeroed() };
            tm.tm_year = 70;
            tm.tm_mday = 1;
        }
        Local {
            year: i64::from(tm.tm_year) + 1900,
            month: (tm.tm_mon + 1) as u32,
            day: tm.tm_mday as u32,
            hour: tm.tm_hour as u32,
            minute: tm.tm_min as u32,
            second: tm.tm_sec.min(59) as u32,
            millis,
            weekday: tm.tm_wday as u32,
            offset: tm.tm_gmtoff,
            epoch,
        }
    }

    /// Days from 1970-01-01 to this local date.
    fn days(&self) -> i64 {
        // Howard Hinnant's days_from_civil.
        let y = if self.month <= 2 {
            self.year - 1
        } else {
            self.year
        };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let m = i64::from(self.month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// The period this moment falls in: equal for two moments of the same
    /// local hour, day, week (from Monday) or month.
    pub fn period(&self, every: Interval) -> i64 {
        match every {
            Interval::Hourly => self.days() * 24 + i64::from(self.hour),
            Interval::Daily => self.days(),
            // 1970-01-01 was a Thursday: +3 puts the boundaries on Mondays.
            Interval::Weekly => (self.days() + 3).div_euclid(7),
            Interval::Monthly => self.year * 12 + i64::from(self.month),
        }
    }

    /// `YYYY-MM-DD_HH-mm-ss`, pm2-logrotate's default, for file names.
    pub fn file_date(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}_{:02}-{:02}-{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// The day.js tokens PM2's `log_date_format` uses, longest first; text
/// in `[brackets]` is literal, every other character stands for itself.
const TOKENS: [&str; 26] = [
    "YYYY", "MMMM", "dddd", "SSS", "MMM", "ddd", "YY", "MM", "DD", "dd", "HH", "hh", "mm", "ss",
    "ZZ", "M", "D", "d", "H", "h", "m", "s", "Z", "A", "a", "X",
];

/// `t` in day.js format `fmt`.
pub fn format(fmt: &str, t: &Local) -> String {
    let mut out = String::with_capacity(fmt.len() + 8);
    let mut rest = fmt;
    while let Some(c) = rest.chars().next() {
        if c == '['
            && let Some(end) = rest.find(']')
        {
            out.push_str(&rest[1..end]);
            rest = &rest[end + 1..];
            continue;
        }
        if let Some(tok) = TOKENS.iter().find(|t| rest.starts_with(**t)) {
            token(&mut out, tok, t);
            rest = &rest[tok.len()..];
            continue;
        }
        if rest.starts_with('x') {
            out.push_str(&(t.epoch * 1000 + i64::from(t.millis)).to_string());
            rest = &rest[1..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

fn token(out: &mut String, tok: &str, t: &Local) {
    use std::fmt::Write;
    let h12 = match t.hour % 12 {
        0 => 12,
        h => h,
    };
    let zone = |sep: &str| {
        let sign = if t.offset < 0 { '-' } else { '+' };
        let m = t.offset.abs() / 60;
        format!("{sign}{:02}{sep}{:02}", m / 60, m % 60)
    };
    let _ = match tok {
        "YYYY" => write!(out, "{:04}", t.year),
        "YY" => write!(out, "{:02}", t.year.rem_euclid(100)),
        "MMMM" => write!(out, "{}", MONTHS[(t.month - 1) as usize % 12]),
        "MMM" => write!(out, "{}", &MONTHS[(t.month - 1) as usize % 12][..3]),
        "MM" => write!(out, "{:02}", t.month),
        "M" => write!(out, "{}", t.month),
        "DD" => write!(out, "{:02}", t.day),
        "D" => write!(out, "{}", t.day),
        "dddd" => write!(out, "{}", DAYS[t.weekday as usize % 7]),
        "ddd" => write!(out, "{}", &DAYS[t.weekday as usize % 7][..3]),
        "dd" => write!(out, "{}", &DAYS[t.weekday as usize % 7][..2]),
        "d" => write!(out, "{}", t.weekday),
        "HH" => write!(out, "{:02}", t.hour),
        "H" => write!(out, "{}", t.hour),
        "hh" => write!(out, "{h12:02}"),
        "h" => write!(out, "{h12}"),
        "mm" => write!(out, "{:02}", t.minute),
        "m" => write!(out, "{}", t.minute),
        "ss" => write!(out, "{:02}", t.second),
        "s" => write!(out, "{}", t.second),
        "SSS" => write!(out, "{:03}", t.millis),
        "Z" => write!(out, "{}", zone(":")),
        "ZZ" => write!(out, "{}", zone("")),
        "A" => write!(out, "{}", if t.hour < 12 { "AM" } else { "PM" }),
        "a" => write!(out, "{}", if t.hour < 12 { "am" } else { "pm" }),
        "X" => write!(out, "{}", t.epoch),
        _ => Ok(()),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(year: i64, month: u32, day: u32, hour: u32, weekday: u32) -> Local {
        Local {
            year,
            month,
            day,
            hour,
            minute: 5,
            second: 9,
            millis: 42,
            weekday,
            offset: 3600 + 1800,
            epoch: 1_700_000_000,
        }
    }

    #[test]
    fn pm2s_formats_come_out_as_dayjs_writes_them() {
        let t = at(2024, 3, 7, 14, 4);
        assert_eq!(format("YYYY-MM-DDTHH:mm:ss", &t), "2024-03-07T14:05:09");
        assert_eq!(format("YYYY-MM-DD HH:mm Z", &t), "2024-03-07 14:05 +01:30");
        assert_eq!(
            format("ddd D MMM YY h:mm:ss.SSS a ZZ", &t),
            "Thu 7 Mar 24 2:05:09.042 pm +0130"
        );
        assert_eq!(
            format("[at] HH [o'clock] X", &t),
            "at 14 o'clock 1700000000"
        );
        assert_eq!(format("é|x", &t), "é|1700000000042");
    }

    #[test]
    fn periods_change_at_local_boundaries() {
        let day = |d, h, wd| at(2024, 1, d, h, wd);
        assert_eq!(day(1, 0, 1).days(), 19_723, "2024-01-01");
        assert_eq!(at(1970, 1, 1, 0, 4).days(), 0);
        assert_eq!(
            day(1, 23, 1).period(Interval::Daily) + 1,
            day(2, 0, 2).period(Interval::Daily)
        );
        assert_ne!(
            day(1, 22, 1).period(Interval::Hourly),
            day(1, 23, 1).period(Interval::Hourly)
        );
        // 2024-01-07 is a Sunday, 2024-01-08 a Monday.
        assert_eq!(
            day(1, 0, 1).period(Interval::Weekly),
            day(7, 23, 0).period(Interval::Weekly)
        );
        assert_eq!(
            day(7, 23, 0).period(Interval::Weekly) + 1,
            day(8, 0, 1).period(Interval::Weekly)
        );
        assert_eq!(
            day(31, 0, 3).period(Interval::Monthly) + 1,
            at(2024, 2, 1, 0, 4).period(Interval::Monthly)
        );
        assert_eq!(day(2, 3, 2).file_date(), "2024-01-02_03-05-09");
    }
}
