//! The Node IPC channel between the manager and a Node worker.
//!
//! Node speaks newline-delimited JSON on `NODE_CHANNEL_FD` when
//! `NODE_CHANNEL_SERIALIZATION_MODE=json`: `process.send(v)` arrives as
//! `JSON.stringify(v) + "\n"`, and a line the manager writes arrives at
//! `process.on('message')`. The manager writes `"shutdown"` (PM2's stop
//! message) and the preload's own internal messages (`{cmd: "NODE_..."}`,
//! which Node hands to `internalMessage`, never to the app), and only reads
//! what it understands: `'ready'` and the preload's reports. Anything
//! else an app sends is ignored, and so is garbage: a worker cannot upset the
//! manager through its channel.

use serde_json::Value;

/// Longest line kept; longer ones are skipped whole (they are not ours).
/// Large enough for an app's whole metrics registry.
pub const MAX_LINE: usize = 4 << 20;

/// Longest listen error kept (it ends up in the journal).
pub const MAX_ERROR_CHARS: usize = 500;

/// What a worker told the manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `process.send('ready')` (PM2's `wait_ready` protocol).
    Ready,
    /// The shim saw a server start listening on an inherited socket.
    Listening,
    /// The shim could not map a listen call; the text says why (one line,
    /// no control character, at most [`MAX_ERROR_CHARS`]).
    ListenError(String),
    /// The preload's heartbeat, with the event loop's longest delay (ms)
    /// since the last one, and its request outcomes so far (untrusted:
    /// see [`crate::outcomes`]), if it counts them and the report is sound.
    Beat {
        delay_ms: u32,
        /// Its event-loop utilization over that interval, in thousandths
        /// (0..=1000), if it sent a sound one: untrusted, a worker may say
        /// anything here (autoscaling caps what it can cause).
        elu_permille: Option<u16>,
        outcomes: Option<crate::outcomes::Outcomes>,
    },
    /// The app's own metrics (prom-client's registry), answering a scrape;
    /// `None` when the app keeps none.
    Metrics { id: u64, text: Option<String> },
    /// The app closed its servers on the handed-over sockets (and did not
    /// exit): it accepts no more connections there.
    Closed,
    /// The keep-alive connections the worker holds and is not closing
    /// (sent when that changes, at most every 100 ms, and again with each
    /// heartbeat while above its share).
    Connections { open: u32 },
    /// The app listens on an address no inherited socket covers: the
    /// manager is to bind it (once, for every worker) and pass it back.
    Bind(BindRequest),
    /// After a capture in place (`diagnose --then resume`) the worker
    /// listens again on the handed-over socket it had at `fd`, which it
    /// closed to stop accepting: the manager passes that socket back.
    Again { id: u64, fd: i32 },
}

/// What the preload asks the manager to bind for the workers to share.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BindRequest {
    /// The preload's number for the request, echoed in the answer.
    pub id: u64,
    pub address: SharedAddress,
}

/// An address workers share through the manager.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum SharedAddress {
    /// `host` as the app wrote it (`None`: Node's default, every address);
    /// port 0 is one ephemeral port for all workers, as Node's cluster does.
    Tcp {
        host: Option<String>,
        port: u16,
    },
    Unix {
        path: String,
    },
}

impl std::fmt::Display for SharedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SharedAddress::Tcp { host: None, port } => write!(f, "tcp port {port}"),
            SharedAddress::Tcp {
                host: Some(h),
                port,
            } if h.contains(':') => write!(f, "tcp [{h}]:{port}"),
            SharedAddress::Tcp {
                host: Some(h),
                port,
            } => write!(f, "tcp {h}:{port}"),
            SharedAddress::Unix { path } => write!(f, "unix {path}"),
        }
    }
}

/// Parse one line of the channel.
pub fn parse(line: &[u8]) -> Option<Message> {
    if line.len() > MAX_LINE {
        return None;
    }
    let v: Value = serde_json::from_slice(line).ok()?;
    match &v {
        Value::String(s) if s == "ready" => Some(Message::Ready),
        Value::Object(o) => match o.get("nodeherd").and_then(Value::as_str) {
            Some("listening") => Some(Message::Listening),
            Some("bind") => parse_bind(o).map(Message::Bind),
            Some("metrics") => Some(Message::Metrics {
                id: o.get("id")?.as_u64()?,
                text: o.get("text").and_then(Value::as_str).map(str::to_string),
            }),
            Some("beat") => Some(Message::Beat {
                delay_ms: o
                    .get("delay_ms")
                    .and_then(Value::as_f64)
                    .filter(|d| d.is_finite() && *d >= 0.0)
                    .map_or(0, |d| d.min(f64::from(u32::MAX)).round() as u32),
                elu_permille: o
                    .get("elu")
                    .and_then(Value::as_f64)
                    .filter(|e| e.is_finite() && *e >= 0.0)
                    .map(|e| (e.min(1.0) * 1000.0).round() as u16),
                outcomes: o.get("out").and_then(crate::outcomes::parse),
            }),
            Some("closed") => Some(Message::Closed),
            Some("again") => Some(Message::Again {
                id: o.get("id")?.as_u64()?,
                fd: i32::try_from(o.get("fd")?.as_u64()?).ok()?,
            }),
            Some("conns") => Some(Message::Connections {
                open: u32::try_from(o.get("open")?.as_u64()?).ok()?,
            }),
            Some("error") => Some(Message::ListenError(crate::logs::clean(
                o.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("listen failed"),
                MAX_ERROR_CHARS,
            ))),
            _ => None,
        },
        _ => None,
    }
}

fn parse_bind(o: &serde_json::Map<String, Value>) -> Option<BindRequest> {
    let id = o.get("id")?.as_u64()?;
    let address = match o.get("kind")?.as_str()? {
        "tcp" => SharedAddress::Tcp {
            host: o
                .get("host")
                .and_then(Value::as_str)
                .filter(|h| !h.is_empty() && h.len() <= 255)
                .map(str::to_string),
            port: u16::try_from(o.get("port").and_then(Value::as_u64).unwrap_or(0)).ok()?,
        },
        "unix" => {
            let path = o.get("path")?.as_str()?;
            if path.is_empty() || path.len() > 107 || path.contains('\0') {
                return None;
            }
            SharedAddress::Unix {
                path: path.to_string(),
            }
        }
        _ => return None,
    };
    Some(BindRequest { id, address })
}

/// The answer to a [`Message::Bind`]: the socket goes with it (SCM_RIGHTS),
/// wrapped as Node's own handle-passing message, so the preload receives a
/// listening handle exactly as a cluster worker would.
pub fn bound(id: u64) -> Vec<u8> {
    let mut line = serde_json::json!({
        "cmd": "NODE_HANDLE",
        "type": "net.Native",
        "msg": { "cmd": "NODE_NODEHERD_BOUND", "id": id },
    })
    .to_string();
    line.push('\n');
    line.into_bytes()
}

/// A connection handed to a worker (its fd goes with the message), taken
/// from the queue of a busy worker's socket; `socket` is the fd number the
/// worker has that socket at, so the server listening there serves it.
pub fn connection(socket: i32) -> Vec<u8> {
    let mut line = serde_json::json!({
        "cmd": "NODE_HANDLE",
        "type": "net.Native",
        "msg": { "cmd": "NODE_NODEHERD_CONN", "fd": socket },
    })
    .to_string();
    line.push('\n');
    line.into_bytes()
}

/// The answer to a [`Message::Again`] the manager could not give.
pub fn again_failed(id: u64, why: &str) -> Vec<u8> {
    let mut line = serde_json::json!({
        "cmd": "NODE_NODEHERD_BOUND",
        "id": id,
        "error": { "code": "EBADF", "syscall": "listen", "message": why },
    })
    .to_string();
    line.push('\n');
    line.into_bytes()
}

/// The answer to a [`Message::Bind`] the manager could not make: the error
/// as Node would have raised it (`code`, `errno`, `syscall`, `address`, `port`).
pub fn bind_failed(id: u64, address: &SharedAddress, err: &std::io::Error) -> Vec<u8> {
    let errno = err.raw_os_error().unwrap_or(0);
    let code = nix::errno::Errno::from_raw(errno);
    let code = if errno == 0 {
        "EINVAL".to_string()
    } else {
        format!("{code:?}")
    };
    let (shown, addr, port) = match address {
        SharedAddress::Tcp { host, port } => {
            let h = host.clone().unwrap_or_else(|| "::".into());
            (format!("{h}:{port}"), Value::String(h), Value::from(*port))
        }
        SharedAddress::Unix { path } => (path.clone(), Value::String(path.clone()), Value::Null),
    };
    let message = format!("listen {code}: {} {shown}", describe_errno(err));
    let mut line = serde_json::json!({
        "cmd": "NODE_NODEHERD_BOUND",
        "id": id,
        "error": {
            "code": code, "errno": -errno, "syscall": "listen",
            "address": addr, "port": port, "message": message,
        },
    })
    .to_string();
    line.push('\n');
    line.into_bytes()
}

/// Node's (libuv's) wording for the errors a bind meets; others as the
/// system words them.
fn describe_errno(err: &std::io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::EADDRINUSE) => "address already in use".into(),
        Some(libc::EACCES) => "permission denied".into(),
        Some(libc::EPERM) => "operation not permitted".into(),
        Some(libc::EADDRNOTAVAIL) => "address not available".into(),
        Some(libc::EMFILE) => "too many open files".into(),
        Some(libc::EINVAL) => "invalid argument".into(),
        Some(libc::ENOENT) => "no such file or directory".into(),
        Some(libc::EAGAIN) => "resource temporarily unavailable".into(),
        Some(libc::ENOTCONN) => "socket is not connected".into(),
        _ => match err.kind() {
            std::io::ErrorKind::AddrInUse => "address already in use".into(),
            std::io::ErrorKind::PermissionDenied => "permission denied".into(),
            std::io::ErrorKind::AddrNotAvailable => "address not available".into(),
            _ => err.to_string(),
        },
    }
}

/// A scrape asks a worker for the app's own metrics.
pub fn metrics_request(id: u64) -> Vec<u8> {
    format!("{{\"cmd\":\"NODE_NODEHERD_METRICS\",\"id\":{id}}}\n").into_bytes()
}

/// A worker's fair share of keep-alive connections (`None`: no limit).
pub fn share(max: Option<u32>) -> Vec<u8> {
    match max {
        Some(n) => format!("{{\"cmd\":\"NODE_NODEHERD_SHARE\",\"max\":{n}}}\n").into_bytes(),
        None => b"{\"cmd\":\"NODE_NODEHERD_SHARE\",\"max\":null}\n".to_vec(),
    }
}

/// A worker captured in place listens again (see [`Message::Again`]).
pub const RESUME: &[u8] = b"{\"cmd\":\"NODE_NODEHERD_RESUME\"}\n";

/// The one message the manager sends: PM2's graceful-stop request.
pub const SHUTDOWN: &[u8] = b"\"shutdown\"\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn understands_ready_and_shim_reports() {
        assert_eq!(parse(b"\"ready\""), Some(Message::Ready));
        assert_eq!(
            parse(br#"{"nodeherd":"listening","fd":3}"#),
            Some(Message::Listening)
        );
        assert!(
            matches!(parse(br#"{"nodeherd":"error","message":"x"}"#), Some(Message::ListenError(m)) if m == "x")
        );
        let forged = format!(
            r#"{{"nodeherd":"error","message":"boom\nnodeherd: forged\u001b[2J{}"}}"#,
            "z".repeat(2000)
        );
        match parse(forged.as_bytes()) {
            Some(Message::ListenError(m)) => {
                assert!(m.starts_with("boom nodeherd: forged [2J"), "{m}");
                assert_eq!(m.chars().count(), MAX_ERROR_CHARS + 1, "cut, with …");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(br#"{"nodeherd":"bind","id":7,"kind":"tcp","host":null,"port":9100}"#),
            Some(Message::Bind(BindRequest {
                id: 7,
                address: SharedAddress::Tcp {
                    host: None,
                    port: 9100
                }
            }))
        );
        assert_eq!(
            parse(br#"{"nodeherd":"bind","id":8,"kind":"unix","path":"/run/a.sock"}"#),
            Some(Message::Bind(BindRequest {
                id: 8,
                address: SharedAddress::Unix {
                    path: "/run/a.sock".into()
                }
            }))
        );
        assert_eq!(parse(br#"{"nodeherd":"closed"}"#), Some(Message::Closed));
        assert_eq!(
            parse(br#"{"nodeherd":"conns","open":17}"#),
            Some(Message::Connections { open: 17 })
        );
        for bad in [
            &br#"{"nodeherd":"conns","open":-1}"#[..],
            br#"{"nodeherd":"conns","open":4294967296}"#,
            br#"{"nodeherd":"bind","kind":"tcp","port":1}"#,
            br#"{"nodeherd":"bind","id":1,"kind":"tcp","port":70000}"#,
            br#"{"nodeherd":"bind","id":1,"kind":"unix","path":""}"#,
            br#"{"nodeherd":"bind","id":1,"kind":"sctp","port":1}"#,
        ] {
            assert_eq!(parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_beats_event_loop_utilization_is_kept_in_bounds() {
        let elu = |line: &str| match parse(line.as_bytes()) {
            Some(Message::Beat { elu_permille, .. }) => elu_permille,
            other => panic!("{line}: {other:?}"),
        };
        assert_eq!(
            elu(r#"{"nodeherd":"beat","delay_ms":1,"elu":0.4567}"#),
            Some(457)
        );
        assert_eq!(elu(r#"{"nodeherd":"beat","delay_ms":1}"#), None);
        // A worker that lies cannot say more than all of its time.
        assert_eq!(elu(r#"{"nodeherd":"beat","elu":1e308}"#), Some(1000));
        assert_eq!(elu(r#"{"nodeherd":"beat","elu":-3}"#), None);
        assert_eq!(elu(r#"{"nodeherd":"beat","elu":"busy"}"#), None);
    }

    #[test]
    fn a_refused_bind_reads_like_nodes_own_error() {
        let addr = SharedAddress::Tcp {
            host: Some("127.0.0.1".into()),
            port: 9100,
        };
        let line = bind_failed(
            3,
            &addr,
            &std::io::Error::from_raw_os_error(libc::EADDRINUSE),
        );
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["cmd"], "NODE_NODEHERD_BOUND");
        assert_eq!(v["error"]["code"], "EADDRINUSE");
        assert_eq!(v["error"]["errno"], -libc::EADDRINUSE);
        assert_eq!(
            v["error"]["message"],
            "listen EADDRINUSE: address already in use 127.0.0.1:9100"
        );
    }

    #[test]
    fn ignores_everything_else() {
        for junk in [
            &b"{"[..],
            b"\xff\xfe",
            b"42",
            b"\"readyy\"",
            br#"{"type":"process:msg"}"#,
            b"",
        ] {
            assert_eq!(parse(junk), None);
        }
        let huge = vec![b' '; MAX_LINE + 1];
        assert_eq!(parse(&huge), None);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_bytes_parse_or_are_ignored(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn json_shaped_input_never_panics(s in r#"\{"nodeherd":"[a-z]{0,10}"(,"message":.{0,20})?\}"#) {
            let _ = parse(s.as_bytes());
        }
    }
}
