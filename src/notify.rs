//! Telling systemd where the manager is: sd_notify.
//!
//! All of it is a no-op when `NOTIFY_SOCKET` is unset (not under systemd,
//! or `Type=simple`). The manager keeps `NOTIFY_SOCKET` in its environment
//! for its own use; workers get the manager's worker-facing socket instead.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        crate::logs::warn(&format!("sd_notify to systemd failed: {e}"));
    }
}

/// A `STATUS=` text on one line: the protocol is a line per assignment,
/// and a text may quote a file (a `.config.js`'s excerpt) whose line
/// `READY=1` must not reach systemd as one.
fn one_line(status: &str) -> String {
    crate::logs::clean(status, 1024)
}

/// All workers are up (first start, or the end of a reload).
pub fn ready(status: &str) {
    let status = &one_line(status);
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload began: systemd ≥ 253 needs MONOTONIC_USEC with it.
pub fn reloading(status: &str) {
    let status = &one_line(status);
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status(status)]),
        Err(_) => send(&[NotifyState::Reloading, NotifyState::Status(status)]),
    }
}

/// Give a long reload or stop more time than systemd's timeout.
pub fn extend_timeout(by: Duration) {
    let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
    send(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

pub fn status(status: &str) {
    let status = &one_line(status);
    send(&[NotifyState::Status(status)]);
}

pub fn stopping(status: &str) {
    let status = &one_line(status);
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// systemd's watchdog interval for this process, if `WatchdogSec=` is set.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}
