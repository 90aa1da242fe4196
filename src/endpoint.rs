//! The limits every HTTP endpoint of the manager holds to (`/metrics`,
//! `/health`, HAProxy's agent-check): any local user can connect, so a
//! client may cost a slot, a bounded head and a bounded wait, nothing more.

use std::time::Duration;

/// A request head longer than this is not a scrape.
pub const MAX_REQUEST: usize = 16 * 1024;
/// Connections served at once; one more is closed as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
