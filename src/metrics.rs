//! The metrics endpoint: Prometheus text, the manager's own figures and the
//! app's, merged across workers.
//!
//! Off by default; `metrics: "127.0.0.1:9209"` (or `--metrics`), or a socket
//! from the socket unit named `FileDescriptorName=metrics`, turns it on. A
//! scrape reads the snapshot the supervisor publishes, `/proc` for each
//! worker's memory and CPU time, the kernel's accept queue of each listening
//! socket, and asks every worker over its IPC channel (in parallel, bounded
//! by [`APP_METRICS_TIMEOUT`]) for the registry of the `prom-client` the app
//! itself uses, returned with a `worker` label: the app's metrics from all
//! workers at one address, which PM2 sells as a service.
//!
//! The HTTP side is a few lines by hand rather than an HTTP stack: it answers
//! `GET /metrics` (and `/`) from one scraper, on loopback or a unix socket,
//! and `GET /health` for a load balancer (see `health.rs`), nothing else. Any local user can connect, so what a connection may
//! cost is bounded: [`MAX_CONNECTIONS`] at once (more are closed as they
//! come, never queued), a request head within [`HEAD_TIMEOUT`] and
//! [`MAX_REQUEST`] bytes.
//!
//! The app's figures come from its code, which is not trusted: a family it
//! names `nodeherd_*` or a sample with a `worker` label of its own would
//! pass for the manager's or a sibling's, so they are dropped and counted
//! (`nodeherd_app_metrics_dropped_total`), and each answer is taken only
//! from the worker that was asked (see the driver). The app's counters are
//! kept across its workers' lives ([`crate::tally`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::control::{AppMetricsRequest, Handle, Snapshot};
use crate::endpoint::{HEAD_TIMEOUT, MAX_REQUEST};
use crate::logs;
use crate::tally::{Answer, Tally};

/// How long a scrape waits for the workers' own metrics.
pub const APP_METRICS_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a whole scrape may take (the workers get [`APP_METRICS_TIMEOUT`]).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A listening socket the manager holds, to report its accept queue.
#[derive(Debug, Clone)]
pub struct SocketInfo {
    pub kind: String,
    pub address: String,
    /// The socket's inode, to find it in /proc/net.
    pub inode: u64,
}

/// Where the endpoint listens.
pub enum Endpoint {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Samples of the app's dropped so far, by worker slot and reason; a
/// counter over the manager's life.
pub type Dropped = Arc<Mutex<BTreeMap<(u32, &'static str), u64>>>;

/// Serve scrapes until the manager ends.
pub async fn serve(endpoint: Endpoint, app: String, handle: Handle, sockets: Vec<SocketInfo>) {
    let mut gate = crate::endpoint::Gate::new("metrics endpoint");
    let dropped = Dropped::default();
    let tally = handle.tally.clone();
    tokio::spawn(read_leaving(handle.clone(), tally.clone()));
    loop {
        let accepted = match &endpoint {
            Endpoint::Tcp(l) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
            Endpoint::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
        };
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                logs::warn(&format!("metrics endpoint: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = gate.admit() else {
            drop(conn);
            continue;
        };
        let (app, handle, sockets, dropped, tally) = (
            app.clone(),
            handle.clone(),
            sockets.clone(),
            dropped.clone(),
            tally.clone(),
        );
        tokio::spawn(async move {
            let kept = Kept {
                dropped: &dropped,
                tally: &tally,
            };
            let _ =
                tokio::time::timeout(ANSWER_TIMEOUT, answer(conn, &app, &handle, &sockets, kept))
                    .await;
            drop(slot);
        });
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Read a request head: `None` when the client closed, sent more than
/// [`MAX_REQUEST`] bytes or took longer than [`HEAD_TIMEOUT`].
async fn read_head(conn: &mut Conn) -> Option<Vec<u8>> {
    let read = async {
        let mut head = Vec::new();
        let mut buf = [0u8; 2048];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let room = (MAX_REQUEST - head.len()).min(buf.len());
            if room == 0 {
                return None;
            }
            let n = match conn {
                Conn::Tcp(s) => s.read(&mut buf[..room]).await.ok()?,
                Conn::Unix(s) => s.read(&mut buf[..room]).await.ok()?,
            };
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(head)
    };
    tokio::time::timeout(HEAD_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

async fn answer(
    mut conn: Conn,
    app: &str,
    handle: &Handle,
    sockets: &[SocketInfo],
    kept: Kept<'_>,
) -> std::io::Result<()> {
    let Some(head) = read_head(&mut conn).await else {
        return Ok(());
    };
    // What a load balancer polls, answered from memory (see health.rs).
    if let Some(head_only) = crate::health::route(&head) {
        let response = crate::health::http_response(&handle.snapshot.borrow(), head_only);
        return match &mut conn {
            Conn::Tcp(s) => s.write_all(response.as_bytes()).await,
            Conn::Unix(s) => s.write_all(response.as_bytes()).await,
        };
    }
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, body) = if method != "GET" {
        ("405 Method Not Allowed", "only GET\n".to_string())
    } else if path == "/metrics" || path == "/" {
        ("200 OK", render(app, handle, sockets, kept).await)
    } else {
        ("404 Not Found", "try /metrics\n".to_string())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    match &mut conn {
        Conn::Tcp(s) => s.write_all(response.as_bytes()).await,
        Conn::Unix(s) => s.write_all(response.as_bytes()).await,
    }
}

/// What the endpoint keeps from one scrape to the next.
#[derive(Clone, Copy)]
pub struct Kept<'a> {
    pub dropped: &'a Dropped,
    /// The app's counters, kept across its workers' lives.
    pub tally: &'a Mutex<Tally>,
}

/// One scrape: the manager's figures, then the app's own.
pub async fn render(app: &str, handle: &Handle, sockets: &[SocketInfo], kept: Kept<'_>) -> String {
    let scrape = kept.tally.lock().unwrap_or_else(|e| e.into_inner()).begin();
    let answers = collect_app_metrics(handle).await;
    let snap = handle.snapshot.borrow().clone();
    let alive = alive(handle);
    let merged = kept
        .tally
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .merge(scrape, &answers, &alive);
    let total = {
        let mut total = kept.dropped.lock().unwrap_or_else(|e| e.into_inner());
        for (key, n) in merged.dropped {
            *total.entry(key).or_default() += n;
        }
        total.clone()
    };
    let mut out = manager_metrics(app, &snap, sockets);
    out.push_str(&dropped_metrics(app, &total));
    out.push_str(&merged.text);
    out
}

/// How often a worker that is stopping is read, until it is gone.
const LEAVING_READS: Duration = Duration::from_millis(250);

/// Read the workers as soon as one begins to stop (replaced, scaled away,
/// restarted), and then every [`LEAVING_READS`] until it is gone: what it
/// counted since the last scrape is kept, not lost with it.
async fn read_leaving(handle: Handle, tally: Arc<Mutex<Tally>>) {
    let mut snapshots = handle.snapshot.clone();
    loop {
        let leaving = snapshots
            .borrow_and_update()
            .workers
            .iter()
            .any(|w| w.pid > 0 && matches!(w.state, "draining" | "stopping"));
        if leaving {
            let scrape = tally.lock().unwrap_or_else(|e| e.into_inner()).begin();
            let answers = collect_app_metrics(&handle).await;
            let alive = alive(&handle);
            // Only what it keeps matters here; the next scrape shows it.
            let _ = tally
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .merge(scrape, &answers, &alive);
            tokio::time::sleep(LEAVING_READS).await;
            continue;
        }
        if snapshots.changed().await.is_err() {
            return;
        }
    }
}

/// Every worker process the supervisor has now.
fn alive(handle: &Handle) -> std::collections::BTreeSet<crate::tally::WorkerKey> {
    handle
        .snapshot
        .borrow()
        .workers
        .iter()
        .filter(|w| w.pid > 0)
        .map(|w| (w.instance, w.pid))
        .collect()
}

/// `nodeherd_app_metrics_dropped_total`: the app's samples left out, by
/// worker slot and why.
fn dropped_metrics(app: &str, dropped: &BTreeMap<(u32, &'static str), u64>) -> String {
    let app = esc(app);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP nodeherd_app_metrics_dropped_total Samples of the app's own left out: a name \
         of the manager's (nodeherd_*), a worker label of its own, not a sample, or a departed \
         worker's series past what is kept (retained_full).\n\
         # TYPE nodeherd_app_metrics_dropped_total counter"
    );
    for ((worker, reason), n) in dropped {
        let _ = writeln!(
            o,
            "nodeherd_app_metrics_dropped_total{{app=\"{app}\",worker=\"{worker}\",reason=\"{reason}\"}} {n}"
        );
    }
    o
}

/// Ask every worker that serves or drains, wait for the answers up to the
/// timeout (for a ready worker's; a leaving one's count if they come by then).
async fn collect_app_metrics(handle: &Handle) -> Vec<Answer> {
    let (asked_tx, asked_rx) = oneshot::channel();
    let (tx, mut rx) = mpsc::unbounded_channel();
    if handle
        .app_metrics
        .send(AppMetricsRequest {
            asked: asked_tx,
            answers: tx,
        })
        .is_err()
    {
        return Vec::new();
    }
    let Ok(asked) = asked_rx.await else {
        return Vec::new();
    };
    // A worker that is leaving may be past answering (a hung one, or one
    // whose app exits at once): the scrape does not wait for it.
    let mut ready: std::collections::BTreeSet<i32> = handle
        .snapshot
        .borrow()
        .workers
        .iter()
        .filter(|w| w.state == "ready")
        .map(|w| w.pid)
        .collect();
    let mut got = Vec::new();
    let mut heard = 0;
    let deadline = tokio::time::Instant::now() + APP_METRICS_TIMEOUT;
    while heard < asked && !ready.is_empty() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(a)) => {
                heard += 1;
                let is_ready = ready.remove(&a.pid);
                if let Some(text) = a.text {
                    got.push(Answer {
                        instance: a.instance,
                        pid: a.pid,
                        ready: is_ready,
                        text,
                    });
                }
            }
            _ => break,
        }
    }
    // Answers that came meanwhile from leaving workers.
    while let Ok(a) = rx.try_recv() {
        if let Some(text) = a.text {
            got.push(Answer {
                instance: a.instance,
                pid: a.pid,
                ready: false,
                text,
            });
        }
    }
    got.sort_by_key(|a| (a.instance, a.pid));
    got
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The text format, written a family at a time, each sample labelled with
/// the app first.
struct Exposition {
    out: String,
    app: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample of `name` with `app` and these labels (values escaped here).
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{name}{{app=\"{}\"", self.app);
        for (k, v) in labels {
            let _ = write!(self.out, ",{k}=\"{}\"", esc(v));
        }
        let _ = writeln!(self.out, "}} {value}");
    }
}

/// The manager's own families, `nodeherd_*`.
pub fn manager_metrics(app: &str, snap: &Snapshot, sockets: &[SocketInfo]) -> String {
    let mut e = Exposition {
        out: String::new(),
        app: esc(app),
    };
    app_state(&mut e, snap);
    per_worker(&mut e, snap);
    outcomes(&mut e, snap);
    operations(&mut e, &snap.counters);
    autoscaling(&mut e, snap);
    socket_figures(&mut e, sockets);
    e.family(
        "nodeherd_log_lines_dropped_total",
        "counter",
        "Worker output lines dropped because the log writer (journal, stderr or log files) did not keep up.",
    );
    e.sample(
        "nodeherd_log_lines_dropped_total",
        &[],
        logs::dropped_total(),
    );
    e.out
}

/// How many workers, how many ready, and the manager's state.
fn app_state(e: &mut Exposition, snap: &Snapshot) {
    e.family("nodeherd_workers", "gauge", "Workers the app is to have.");
    e.sample("nodeherd_workers", &[], snap.instances);
    e.family(
        "nodeherd_workers_ready",
        "gauge",
        "Slots whose worker is ready.",
    );
    e.sample("nodeherd_workers_ready", &[], snap.ready_workers);
    e.family(
        "nodeherd_state",
        "gauge",
        "The manager's state (1 for the current one).",
    );
    for s in [
        "starting",
        "ready",
        "reloading",
        "reexecuting",
        "degraded",
        "draining",
        "stopping",
    ] {
        e.sample("nodeherd_state", &[("state", s)], u8::from(snap.state == s));
    }
}

/// Per slot: its current worker process (or the empty slot).
fn per_worker(e: &mut Exposition, snap: &Snapshot) {
    let current: BTreeMap<u32, &crate::control::WorkerInfo> = snap
        .workers
        .iter()
        .filter(|w| w.state != "stopping")
        .fold(BTreeMap::new(), |mut m, w| {
            m.entry(w.instance).or_insert(w);
            m
        });
    let slots: Vec<(String, &crate::control::WorkerInfo)> = current
        .into_iter()
        .map(|(i, w)| (i.to_string(), w))
        .collect();
    e.family(
        "nodeherd_worker_ready",
        "gauge",
        "1 when the slot's worker is ready.",
    );
    for (i, w) in &slots {
        let labels = [("worker", i.as_str()), ("state", w.state)];
        e.sample(
            "nodeherd_worker_ready",
            &labels,
            u8::from(w.state == "ready"),
        );
    }
    e.family(
        "nodeherd_worker_restarts_total",
        "counter",
        "Workers replaced in the slot, by cause.",
    );
    for (i, w) in &slots {
        for (reason, n) in [
            // An OOM kill is a crash PM2 counts in its restarts; here it
            // has a reason of its own, so the reasons add up.
            ("crash", w.restarts.saturating_sub(w.replaced_oom)),
            ("oom", w.replaced_oom),
            ("memory", w.replaced_memory),
            ("memory_pressure", w.replaced_memory_pressure),
            ("hang", w.replaced_hang),
            ("reload", w.replaced_reload),
        ] {
            let labels = [("worker", i.as_str()), ("reason", reason)];
            e.sample("nodeherd_worker_restarts_total", &labels, n);
        }
    }
    e.family(
        "nodeherd_worker_uptime_seconds",
        "gauge",
        "Seconds since the slot's worker started.",
    );
    for (i, w) in &slots {
        let up = w.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        e.sample(
            "nodeherd_worker_uptime_seconds",
            &[("worker", i)],
            format!("{up:.3}"),
        );
    }
    e.family(
        "nodeherd_worker_resident_memory_bytes",
        "gauge",
        "Resident memory of the slot's worker.",
    );
    for (i, w) in &slots {
        let rss = if w.pid > 0 {
            crate::worker::cgroup::worker_memory_bytes(w.pid)
        } else {
            0
        };
        e.sample(
            "nodeherd_worker_resident_memory_bytes",
            &[("worker", i)],
            rss,
        );
    }
    // Only where the worker's cgroup has the memory controller.
    let stats: Vec<_> = slots
        .iter()
        .filter(|(_, w)| w.pid > 0)
        .filter_map(|(i, w)| Some((i, crate::worker::cgroup::memory_stat(w.pid)?)))
        .collect();
    if !stats.is_empty() {
        e.family(
            "nodeherd_worker_memory_anon_bytes",
            "gauge",
            "Anonymous memory (heap, stacks) of the slot's worker's cgroup (memory.stat anon).",
        );
        for (i, s) in &stats {
            e.sample(
                "nodeherd_worker_memory_anon_bytes",
                &[("worker", i)],
                s.anon,
            );
        }
        e.family(
            "nodeherd_worker_memory_file_bytes",
            "gauge",
            "Page cache of the slot's worker's cgroup (memory.stat file), reclaimed first.",
        );
        for (i, s) in &stats {
            e.sample(
                "nodeherd_worker_memory_file_bytes",
                &[("worker", i)],
                s.file,
            );
        }
    }
    e.family(
        "nodeherd_worker_cpu_seconds_total",
        "counter",
        "CPU time of the slot's current worker process.",
    );
    for (i, w) in &slots {
        let cpu = if w.pid > 0 {
            crate::worker::cgroup::worker_cpu_seconds(w.pid)
        } else {
            0.0
        };
        e.sample(
            "nodeherd_worker_cpu_seconds_total",
            &[("worker", i)],
            format!("{cpu:.3}"),
        );
    }
    e.family(
        "nodeherd_worker_event_loop_delay_seconds",
        "gauge",
        "Longest event-loop delay of the worker over its last heartbeat.",
    );
    for (i, w) in &slots {
        if let Some(ms) = w.loop_delay_ms {
            let secs = format!("{:.3}", f64::from(ms) / 1000.0);
            e.sample(
                "nodeherd_worker_event_loop_delay_seconds",
                &[("worker", i)],
                secs,
            );
        }
    }
}

/// Per slot: the requests its current worker answered, as the worker
/// reported them (counters that start again with each new worker).
fn outcomes(e: &mut Exposition, snap: &Snapshot) {
    use crate::outcomes::{BUCKETS_MS, CLASSES};
    let mut slots: BTreeMap<u32, crate::outcomes::Outcomes> = BTreeMap::new();
    for w in snap.workers.iter().filter(|w| w.state != "stopping") {
        if let Some(o) = w.outcomes {
            slots.entry(w.instance).or_insert(o);
        }
    }
    let slots: Vec<(String, crate::outcomes::Outcomes)> =
        slots.into_iter().map(|(i, o)| (i.to_string(), o)).collect();
    e.family(
        "nodeherd_worker_requests_total",
        "counter",
        "HTTP responses the slot's worker finished, by status class (counted in the worker).",
    );
    for (i, o) in &slots {
        for (class, n) in CLASSES.iter().zip(o.classes) {
            let labels = [("worker", i.as_str()), ("code_class", *class)];
            e.sample("nodeherd_worker_requests_total", &labels, n);
        }
    }
    e.family(
        "nodeherd_worker_request_duration_seconds",
        "histogram",
        "Time from request to the response's end in the slot's worker.",
    );
    for (i, o) in &slots {
        let mut seen = 0;
        for (b, n) in o.buckets.iter().enumerate() {
            seen += n;
            let le = BUCKETS_MS
                .get(b)
                .map_or("+Inf".to_string(), |ms| format!("{}", *ms as f64 / 1000.0));
            let labels = [("worker", i.as_str()), ("le", le.as_str())];
            e.sample(
                "nodeherd_worker_request_duration_seconds_bucket",
                &labels,
                seen,
            );
        }
        let sum = format!("{:.6}", o.sum_us as f64 / 1e6);
        e.sample(
            "nodeherd_worker_request_duration_seconds_sum",
            &[("worker", i)],
            sum,
        );
        e.sample(
            "nodeherd_worker_request_duration_seconds_count",
            &[("worker", i)],
            seen,
        );
    }
    e.family(
        "nodeherd_worker_uncaught_exceptions_total",
        "counter",
        "Uncaught exceptions in the slot's worker (an app with a handler lives on).",
    );
    for (i, o) in &slots {
        e.sample(
            "nodeherd_worker_uncaught_exceptions_total",
            &[("worker", i)],
            o.exceptions,
        );
    }
    e.family(
        "nodeherd_worker_unhandled_rejections_total",
        "counter",
        "Unhandled promise rejections in the slot's worker.",
    );
    for (i, o) in &slots {
        e.sample(
            "nodeherd_worker_unhandled_rejections_total",
            &[("worker", i)],
            o.rejections,
        );
    }
}

/// Reloads and scaling.
fn operations(e: &mut Exposition, c: &crate::control::Counters) {
    e.family("nodeherd_reloads_total", "counter", "Reloads, by outcome.");
    for (outcome, n) in [
        ("ok", c.reloads_ok),
        ("failed", c.reloads_failed),
        ("refused", c.reloads_refused),
        ("rolled_back", c.reloads_rolled_back),
    ] {
        e.sample("nodeherd_reloads_total", &[("outcome", outcome)], n);
    }
    e.family(
        "nodeherd_last_reload_duration_seconds",
        "gauge",
        "How long the last reload took.",
    );
    let took = format!("{:.3}", c.last_reload_ms as f64 / 1000.0);
    e.sample("nodeherd_last_reload_duration_seconds", &[], took);
    e.family(
        "nodeherd_scale_events_total",
        "counter",
        "Scale operations begun.",
    );
    e.sample("nodeherd_scale_events_total", &[], c.scale_events);
}

/// A worker count that follows the load: what it decided, and where it
/// stands (only when `instances` is `{min, max}`).
fn autoscaling(e: &mut Exposition, snap: &Snapshot) {
    let Some(a) = snap.autoscale else {
        return;
    };
    let c = &snap.counters;
    e.family(
        "nodeherd_autoscale_decisions_total",
        "counter",
        "Changes of the worker count autoscaling made, by direction and signal.",
    );
    for (direction, reason, n) in [
        ("up", "accept_queue", c.autoscale_up_accept_queue),
        ("up", "event_loop", c.autoscale_up_event_loop),
        ("down", "quiet", c.autoscale_down_quiet),
    ] {
        e.sample(
            "nodeherd_autoscale_decisions_total",
            &[("direction", direction), ("reason", reason)],
            n,
        );
    }
    e.family(
        "nodeherd_autoscale_target_workers",
        "gauge",
        "The worker count autoscaling holds now.",
    );
    e.sample("nodeherd_autoscale_target_workers", &[], snap.instances);
    e.family(
        "nodeherd_autoscale_ceiling_workers",
        "gauge",
        "The most workers autoscaling would run now: max, or fewer under the memory budget.",
    );
    e.sample("nodeherd_autoscale_ceiling_workers", &[], a.ceiling);
    e.family(
        "nodeherd_autoscale_pinned",
        "gauge",
        "1 while a manual scale holds the count (until the next reload).",
    );
    e.sample("nodeherd_autoscale_pinned", &[], u8::from(a.pinned));
}

/// What the kernel says of the listening sockets, and of the host.
fn socket_figures(e: &mut Exposition, sockets: &[SocketInfo]) {
    let queues = socket_queues(sockets);
    e.family(
        "nodeherd_socket_queue",
        "gauge",
        "Connections waiting in a listening socket's accept queue (TCP), or bytes waiting (UDP).",
    );
    for (s, q) in &queues {
        let labels = [("kind", s.kind.as_str()), ("address", s.address.as_str())];
        e.sample("nodeherd_socket_queue", &labels, q.queued);
    }
    e.family(
        "nodeherd_socket_drops_total",
        "counter",
        "Datagrams dropped by a UDP socket.",
    );
    for (s, q) in &queues {
        if let Some(d) = q.drops {
            let labels = [("kind", s.kind.as_str()), ("address", s.address.as_str())];
            e.sample("nodeherd_socket_drops_total", &labels, d);
        }
    }
    e.family(
        "nodeherd_host_listen_overflows_total",
        "counter",
        "Connections dropped because an accept queue was full, on the whole host (the kernel counts no more finely).",
    );
    // Host-wide: no app label.
    let _ = writeln!(
        e.out,
        "nodeherd_host_listen_overflows_total {}",
        listen_overflows()
    );
}

/// What the kernel says of one listening socket.
#[derive(Debug, Default, Clone, Copy)]
struct Queue {
    queued: u64,
    drops: Option<u64>,
}

/// Each socket's queue, from /proc/net/{tcp,tcp6,udp,udp6} by inode.
fn socket_queues(sockets: &[SocketInfo]) -> Vec<(SocketInfo, Queue)> {
    let mut by_inode: BTreeMap<u64, Queue> = BTreeMap::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let Ok(inode) = f[9].parse::<u64>() else {
                continue;
            };
            // tx_queue:rx_queue; for a listening socket rx_queue is the accept queue.
            let rx = f[4]
                .split_once(':')
                .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
                .unwrap_or(0);
            let drops = table
                .starts_with("udp")
                .then(|| f.last().and_then(|d| d.parse().ok()))
                .flatten();
            by_inode.insert(inode, Queue { queued: rx, drops });
        }
    }
    sockets
        .iter()
        .filter_map(|s| Some((s.clone(), *by_inode.get(&s.inode)?)))
        .collect()
}

/// TcpExtListenOverflows from /proc/net/netstat.
fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        if let [names, values] = pair
            && names.starts_with("TcpExt:")
        {
            let i = names
                .split_whitespace()
                .position(|n| n == "ListenOverflows");
            if let Some(v) = i.and_then(|i| values.split_whitespace().nth(i)) {
                return v.parse().unwrap_or(0);
            }
        }
    }
    0
}

pub use crate::tally::Merged;

/// The app's metrics from these workers' answers as one exposition, with
/// nothing kept of earlier scrapes (see [`crate::tally`] for what is): each
/// family once (its HELP and TYPE, then its samples from all workers),
/// every sample with a `worker` label naming the slot. A sample named
/// `nodeherd_*`, one with a `worker` label of its own, or a line that is not
/// a sample is left out and counted: the first two would pass for the
/// manager's or a sibling's figures, the last would make the whole scrape
/// unreadable.
pub fn merge_app_metrics(answers: &[(u32, String)]) -> Merged {
    let answers: Vec<crate::tally::Answer> = answers
        .iter()
        .enumerate()
        .map(|(n, (instance, text))| crate::tally::Answer {
            instance: *instance,
            pid: n as i32 + 1,
            ready: true,
            text: text.clone(),
        })
        .collect();
    let alive = answers.iter().map(|a| (a.instance, a.pid)).collect();
    let mut tally = crate::tally::Tally::default();
    let scrape = tally.begin();
    tally.merge(scrape, &answers, &alive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_managers_names_and_worker_labels_are_dropped_and_counted() {
        let forged = "# HELP nodeherd_workers Forged.\n# TYPE nodeherd_workers gauge\n\
                      nodeherd_workers{app=\"a\"} 99\n\
                      # TYPE hits counter\nhits{worker=\"1\"} 1000\nhits{route=\"/\"} 3\n\
                      nodeherd_x 1\ngarbage here\n";
        let merged = merge_app_metrics(&[(0, forged.into()), (1, "hits 2\n".into())]);
        assert!(!merged.text.contains("nodeherd_"), "{}", merged.text);
        assert!(!merged.text.contains("1000"), "{}", merged.text);
        assert!(
            merged.text.contains("hits{worker=\"0\",route=\"/\"} 3"),
            "{}",
            merged.text
        );
        assert!(
            merged.text.contains("hits{worker=\"1\"} 2"),
            "{}",
            merged.text
        );
        let want: BTreeMap<(u32, &str), u64> = [
            ((0, "malformed"), 1),
            ((0, "reserved_name"), 2),
            ((0, "worker_label"), 1),
        ]
        .into();
        assert_eq!(merged.dropped, want);
    }

    #[test]
    fn families_are_merged_once_with_every_workers_samples() {
        let w = |n: u32| {
            (
                n,
                format!(
                    "# HELP req_total Requests.\n# TYPE req_total counter\nreq_total{{route=\"/\"}} {n}\n\
                     # HELP lat Latency.\n# TYPE lat histogram\nlat_bucket{{le=\"0.1\"}} 1\nlat_bucket{{le=\"+Inf\"}} 2\nlat_sum 0.3\nlat_count 2\n"
                ),
            )
        };
        let merged = merge_app_metrics(&[w(0), w(1)]).text;
        assert_eq!(merged.matches("# TYPE req_total counter").count(), 1);
        assert_eq!(merged.matches("# TYPE lat histogram").count(), 1);
        let lat_start = merged.find("# HELP lat").unwrap();
        let req_block = &merged[..lat_start];
        assert!(
            req_block.contains("req_total{worker=\"0\",route=\"/\"} 0"),
            "{merged}"
        );
        assert!(
            req_block.contains("req_total{worker=\"1\",route=\"/\"} 1"),
            "{merged}"
        );
        assert_eq!(merged[lat_start..].matches("lat_count{worker=").count(), 2);
    }
}
