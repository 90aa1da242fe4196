//! The Node IPC channel between the manager and a Node worker.
//!
//! Node speaks newline-delimited JSON on `NODE_CHANNEL_FD` when
//! `NODE_CHANNEL_SERIALIZATION_MODE=json`: `process.send(v)` arrives as
//! `JSON.stringify(v) + "\n"`, and a line the manager writes arrives at
//! `process.on('message')`. The manager only ever writes `"shutdown"`, and
//! only reads what it understands: `'ready'` and the shim's reports. Anything
//! else an app sends is ignored, and so is garbage: a worker cannot upset the
//! manager through its channel.

use serde_json::Value;

/// Longest line kept; longer ones are skipped whole (they are not ours).
pub const MAX_LINE: usize = 64 * 1024;

/// What a worker told the manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `process.send('ready')` (PM2's `wait_ready` protocol).
    Ready,
    /// The shim saw a server start listening on an inherited socket.
    Listening,
    /// The shim could not map a listen call; the text says why.
    ListenError(String),
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
            Some("error") => Some(Message::ListenError(
                o.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("listen failed")
                    .chars()
                    .take(500)
                    .collect(),
            )),
            _ => None,
        },
        _ => None,
    }
}

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
