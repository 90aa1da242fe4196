//! Figures as people read them, the same in every command that shows them
//! (`status`, `ls`, `monit`): one definition, so they never drift apart.

/// Resident memory: `47.8 MiB`, or `-` when unknown.
pub fn bytes(b: u64) -> String {
    if b == 0 {
        return "-".into();
    }
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// An uptime: `42s`, `3m07s`, `5h12m`, `2d03h`.
pub fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_as_people_write_them() {
        assert_eq!(bytes(0), "-");
        assert_eq!(bytes(50_123_456), "47.8 MiB");
        assert_eq!(duration(42_000), "42s");
        assert_eq!(duration(187_000), "3m07s");
        assert_eq!(duration(5 * 3_600_000 + 12 * 60_000), "5h12m");
        assert_eq!(duration(2 * 86_400_000 + 3 * 3_600_000), "2d03h");
    }
}
