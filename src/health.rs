//! The health answer a load balancer reads: `GET /health` (on the metrics
//! endpoint, and on `health:` if set) and HAProxy's `agent-check` (on
//! `health_agent:`).
//!
//! A balancer needs one thing from a host: "send me traffic" or "take me
//! out", said *before* the host stops serving. So the answer is a pure
//! function of the snapshot the supervisor publishes ([`verdict`]): up
//! while the app serves with at least `health_min_ready` ready workers
//! (by default every slot, less those a reload swaps at once); drain while
//! draining (`nodeherd drain`, or a stop with `drain_before_stop`); down
//! while starting or short of ready workers; maint while stopping. Only the
//! supervisor moves that state, from the control plane and the manager's
//! own signals: nothing a worker says reaches it.
//!
//! Any local user can connect, so each listener costs what the metrics
//! endpoint's does: [`endpoint::MAX_CONNECTIONS`] at once (more are closed as
//! they come), a request head within [`endpoint::HEAD_TIMEOUT`] and
//! [`endpoint::MAX_REQUEST`] bytes, and the answer is read from memory, never
//! from a worker.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::control::{Handle, Snapshot};
use crate::{endpoint, logs, sockets};

/// How long one answer may take to write (a client that reads nothing).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the host says to a balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Serving with enough ready workers: send traffic.
    Up,
    /// Draining: still serving, take me out.
    Drain,
    /// Starting, or short of ready workers.
    Down,
    /// Stopping: the workers are going.
    Maint,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Up => "up",
            Verdict::Drain => "drain",
            Verdict::Down => "down",
            Verdict::Maint => "maint",
        }
    }
}

/// The verdict for a snapshot of the supervisor.
pub fn verdict(snap: &Snapshot) -> Verdict {
    match snap.state {
        "stopping" => Verdict::Maint,
        "draining" => Verdict::Drain,
        "starting" => Verdict::Down,
        _ if snap.ready_workers >= snap.health_min_ready.max(1) => Verdict::Up,
        _ => Verdict::Down,
    }
}

/// The JSON body of `/health`.
pub fn body(snap: &Snapshot) -> String {
    serde_json::json!({
        "app": snap.name,
        "health": verdict(snap).word(),
        "state": snap.state,
        "ready": snap.ready_workers,
        "instances": snap.instances,
        "min_ready": snap.health_min_ready,
        "generation": snap.generation,
    })
    .to_string()
        + "\n"
}

/// The whole HTTP answer to `GET /health` (`head`: to `HEAD`, no body).
pub fn http_response(snap: &Snapshot, head: bool) -> String {
    let status = match verdict(snap) {
        Verdict::Up => "200 OK",
        _ => "503 Service Unavailable",
    };
    let body = body(snap);
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\n\r\n{}",
        body.len(),
        if head { "" } else { body.as_str() }
    )
}

/// HAProxy's agent-check answer, one line: `up ready 75%` (the weight
/// follows the ready workers; `ready` ends a drain or maint the agent set
/// before), `drain`, `down` or `maint`.
pub fn agent_line(snap: &Snapshot) -> String {
    match verdict(snap) {
        Verdict::Up => {
            let pct = (u64::from(snap.ready_workers) * 100)
                .checked_div(u64::from(snap.instances))
                .unwrap_or(0)
                .clamp(1, 100);
            format!("up ready {pct}%\n")
        }
        v => format!("{}\n", v.word()),
    }
}

/// Where `health:` or `health_agent:` listens.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// Serve from a bound socket (`key` names it in errors), and a second
    /// handle on it for a re-exec to carry.
    pub fn serve_from(
        l: sockets::Listener,
        key: &str,
    ) -> Result<(Listener, Option<sockets::Listener>), String> {
        let spec = l.address.clone();
        let fail = |e: std::io::Error| format!("{key}: cannot serve {spec}: {e}");
        let second = l.try_clone();
        let listener = match l.kind {
            sockets::Kind::Unix => {
                let s = std::os::unix::net::UnixListener::from(l.fd);
                s.set_nonblocking(true).map_err(fail)?;
                Listener::Unix(tokio::net::UnixListener::from_std(s).map_err(fail)?)
            }
            sockets::Kind::Tcp => {
                let s = std::net::TcpListener::from(l.fd);
                s.set_nonblocking(true).map_err(fail)?;
                Listener::Tcp(tokio::net::TcpListener::from_std(s).map_err(fail)?)
            }
            other => {
                return Err(format!(
                    "{key}: {spec} is a {other} socket, not a stream one"
                ));
            }
        };
        Ok((listener, second))
    }

    /// Where it listens, as a client would name it.
    pub fn address(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|e| format!("? ({e})")),
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix:?".into()),
        }
    }

    async fn accept(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(match self {
            Listener::Tcp(l) => Box::new(l.accept().await?.0),
            Listener::Unix(l) => Box::new(l.accept().await?.0),
        })
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// What a listener answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// `GET /health` over HTTP.
    Http,
    /// HAProxy's agent-check: one line at once, then close.
    Agent,
}

/// Answer on `listener` until the manager ends.
pub async fn serve(listener: Listener, what: Serve, handle: Handle) {
    let mut gate = endpoint::Gate::new("health endpoint");
    loop {
        let conn = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                logs::warn(&format!("health endpoint: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = gate.admit() else {
            drop(conn);
            continue;
        };
        let snapshot = handle.snapshot.clone();
        tokio::spawn(async move {
            let _ = match what {
                Serve::Agent => {
                    let line = agent_line(&snapshot.borrow());
                    write(conn, line).await
                }
                Serve::Http => answer_http(conn, &snapshot).await,
            };
            drop(slot);
        });
    }
}

async fn write(mut conn: Box<dyn Stream>, text: String) -> std::io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, async {
        conn.write_all(text.as_bytes()).await?;
        conn.shutdown().await
    })
    .await
    .unwrap_or(Ok(()))
}

async fn answer_http(
    mut conn: Box<dyn Stream>,
    snapshot: &tokio::sync::watch::Receiver<Snapshot>,
) -> std::io::Result<()> {
    let Some(head) = read_head(&mut conn).await else {
        return Ok(());
    };
    let response = match route(&head) {
        Some(head_only) => http_response(&snapshot.borrow(), head_only),
        None => "HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\ncontent-length: 12\r\n\
                 connection: close\r\n\r\ntry /health\n"
            .to_string(),
    };
    write(conn, response).await
}

/// Is this request head `GET /health` (`Some(false)`) or `HEAD /health`
/// (`Some(true)`)? A query string is ignored.
pub fn route(head: &[u8]) -> Option<bool> {
    let line = String::from_utf8_lossy(head);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next()?, words.next()?);
    if path.split('?').next() != Some("/health") {
        return None;
    }
    match method {
        "GET" => Some(false),
        "HEAD" => Some(true),
        _ => None,
    }
}

/// A request head within the metrics endpoint's limits, or `None`.
async fn read_head(conn: &mut Box<dyn Stream>) -> Option<Vec<u8>> {
    let read = async {
        let mut head = Vec::new();
        let mut buf = [0u8; 2048];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let room = (endpoint::MAX_REQUEST - head.len()).min(buf.len());
            if room == 0 {
                return None;
            }
            let n = conn.read(&mut buf[..room]).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(head)
    };
    tokio::time::timeout(endpoint::HEAD_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(state: &'static str, ready: u32, instances: u32, min: u32) -> Snapshot {
        Snapshot {
            name: "api".into(),
            state,
            instances,
            ready_workers: ready,
            status: String::new(),
            workers: vec![],
            counters: Default::default(),
            next_cron_reload_ms: None,
            generation: 3,
            health_min_ready: min,
            autoscale: None,
            last_autopsy: None,
            history: std::sync::Arc::from("[]"),
        }
    }

    #[test]
    fn up_only_while_serving_with_enough_ready_workers() {
        assert_eq!(verdict(&snap("ready", 4, 4, 4)), Verdict::Up);
        assert_eq!(verdict(&snap("reloading", 3, 4, 2)), Verdict::Up);
        assert_eq!(verdict(&snap("degraded", 3, 4, 4)), Verdict::Down);
        assert_eq!(verdict(&snap("degraded", 3, 4, 3)), Verdict::Up);
        assert_eq!(verdict(&snap("starting", 4, 4, 1)), Verdict::Down);
        assert_eq!(verdict(&snap("draining", 4, 4, 4)), Verdict::Drain);
        assert_eq!(verdict(&snap("stopping", 4, 4, 4)), Verdict::Maint);
        assert_eq!(verdict(&snap("ready", 0, 4, 0)), Verdict::Down);
    }

    #[test]
    fn the_agent_weight_follows_ready_workers() {
        assert_eq!(agent_line(&snap("ready", 4, 4, 4)), "up ready 100%\n");
        assert_eq!(agent_line(&snap("degraded", 3, 4, 2)), "up ready 75%\n");
        assert_eq!(agent_line(&snap("draining", 4, 4, 4)), "drain\n");
        assert_eq!(agent_line(&snap("stopping", 4, 4, 4)), "maint\n");
        assert_eq!(agent_line(&snap("degraded", 1, 4, 4)), "down\n");
    }

    #[test]
    fn the_http_answer_says_it_in_status_and_body() {
        let r = http_response(&snap("draining", 2, 2, 2), false);
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        let body = r.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["health"], "drain");
        assert_eq!(v["ready"], 2);
        assert_eq!(v["generation"], 3);
        let r = http_response(&snap("ready", 2, 2, 2), true);
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.ends_with("\r\n\r\n"), "HEAD has no body: {r}");
    }

    #[test]
    fn only_get_and_head_of_health_are_health() {
        assert_eq!(route(b"GET /health HTTP/1.1\r\n\r\n"), Some(false));
        assert_eq!(route(b"GET /health?x=1 HTTP/1.0\r\n\r\n"), Some(false));
        assert_eq!(route(b"HEAD /health HTTP/1.1\r\n\r\n"), Some(true));
        assert_eq!(route(b"POST /health HTTP/1.1\r\n\r\n"), None);
        assert_eq!(route(b"GET /healthz HTTP/1.1\r\n\r\n"), None);
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n\r\n"), None);
    }
}
