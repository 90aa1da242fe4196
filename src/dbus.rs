//! The D-Bus control plane: `org.nodeherd.Manager1` at `/org/nodeherd`.
//!
//! The interface object holds no state of its own. Methods turn into
//! requests for the supervisor and await its answer through a oneshot
//! channel, so a long `Reload()` never holds zbus's object lock: property
//! reads and other calls go on meanwhile. Properties read the snapshot the
//! supervisor publishes after every event; a small task turns snapshot
//! changes into `PropertiesChanged` and supervisor reports into signals.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;
use zbus::object_server::SignalEmitter;
use zbus::{connection, interface};

pub use crate::control::Bus;
use crate::control::{BusSignal, Control, CtlError, Handle, ScaleTarget, Snapshot};
use crate::logs;

/// Object path of the manager.
pub const PATH: &str = "/org/nodeherd";
/// Interface name.
pub const INTERFACE: &str = "org.nodeherd.Manager1";

/// `org.nodeherd.<app>`, with characters outside `[A-Za-z0-9_]` turned into `_`.
pub fn bus_name_for(app: &str) -> String {
    let mut s: String = app
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    // A bus name element must not start with a digit.
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    format!("org.nodeherd.{s}")
}

/// Errors on the bus, one D-Bus name per variant.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.nodeherd.Error")]
pub enum BusError {
    #[zbus(error)]
    ZBus(zbus::Error),
    InvalidArgument(String),
    ReloadFailed(String),
    Busy(String),
    Stopping(String),
    Failed(String),
}

impl From<CtlError> for BusError {
    fn from(e: CtlError) -> Self {
        match e {
            CtlError::InvalidArgument(m) => BusError::InvalidArgument(m),
            CtlError::ReloadFailed(m) => BusError::ReloadFailed(m),
            CtlError::Busy(m) => BusError::Busy(m),
            CtlError::Stopping(m) => BusError::Stopping(m),
            CtlError::Failed(m) => BusError::Failed(m),
        }
    }
}

/// One entry of the `Workers` property:
/// (instance, pid, state, restarts, uptime_ms, memory_bytes, started_at_unix_ms).
pub type WorkerTuple = (u32, u32, String, u32, u64, u64, u64);

struct Manager {
    handle: Handle,
}

impl Manager {
    async fn ask(&self, what: Control) -> Result<crate::control::Done, BusError> {
        self.handle.ask(what).await.map_err(BusError::from)
    }

    fn snap(&self) -> Snapshot {
        self.handle.snapshot.borrow().clone()
    }
}

#[interface(name = "org.nodeherd.Manager1")]
impl Manager {
    /// Replace every worker, one at a time (or `reload_parallel` at a time),
    /// each old worker stopping only once its replacement is ready. Returns
    /// when the swap is complete; fails with ReloadFailed, old workers still
    /// serving, when a replacement does not become ready.
    async fn reload(&self) -> Result<String, BusError> {
        self.ask(Control::Reload).await.map(|d| d.message)
    }

    /// Stop every worker and start a fresh set; clears errored slots.
    async fn restart(&self) -> Result<(), BusError> {
        self.ask(Control::Restart).await.map(|_| ())
    }

    /// Set the number of workers (1 to 1024); returns the new count once the
    /// added workers are ready.
    async fn scale(&self, instances: i32) -> Result<i32, BusError> {
        self.ask(Control::Scale(ScaleTarget::To(i64::from(instances))))
            .await
            .map(|d| d.workers)
    }

    /// Add (or with a negative delta, remove) workers; returns the new count.
    async fn scale_by(&self, delta: i32) -> Result<i32, BusError> {
        self.ask(Control::Scale(ScaleTarget::By(i64::from(delta))))
            .await
            .map(|d| d.workers)
    }

    /// The app's name.
    #[zbus(property)]
    async fn name(&self) -> String {
        self.snap().name
    }

    /// starting, ready, reloading, degraded or stopping.
    #[zbus(property)]
    async fn state(&self) -> String {
        self.snap().state.to_string()
    }

    /// One line, as in systemd's STATUS=.
    #[zbus(property)]
    async fn status(&self) -> String {
        self.snap().status
    }

    /// The desired number of workers.
    #[zbus(property)]
    async fn instances(&self) -> i32 {
        self.snap().instances as i32
    }

    /// Slots whose worker is ready.
    #[zbus(property)]
    async fn ready_workers(&self) -> i32 {
        self.snap().ready_workers as i32
    }

    /// Every worker process and empty slot:
    /// (instance, pid, state, restarts, uptime_ms, memory_bytes, started_at_unix_ms).
    #[zbus(property)]
    async fn workers(&self) -> Vec<WorkerTuple> {
        self.snap()
            .workers
            .into_iter()
            .map(|w| {
                let uptime = w.started.map_or(Duration::ZERO, |s| s.elapsed());
                let mem = if w.pid > 0 {
                    crate::worker::process::rss_bytes(w.pid)
                } else {
                    0
                };
                // Wall-clock start, from the monotonic uptime.
                let at = w
                    .started
                    .and_then(|_| SystemTime::now().checked_sub(uptime))
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as u64);
                (
                    w.instance,
                    w.pid.max(0) as u32,
                    w.state.to_string(),
                    w.restarts,
                    uptime.as_millis() as u64,
                    mem,
                    at,
                )
            })
            .collect()
    }

    /// What workers last said with `STATUS=` on their notify socket: (pid, text).
    #[zbus(property)]
    async fn worker_status_texts(&self) -> Vec<(u32, String)> {
        self.snap()
            .workers
            .into_iter()
            .filter_map(|w| Some((w.pid.max(0) as u32, w.status_text?)))
            .collect()
    }

    /// Each worker's longest event-loop delay over its last heartbeat: (pid, ms).
    /// It changes every second: read it, no PropertiesChanged is sent.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn loop_delays(&self) -> Vec<(u32, u32)> {
        self.snap()
            .workers
            .into_iter()
            .filter_map(|w| Some((w.pid.max(0) as u32, w.loop_delay_ms?)))
            .collect()
    }

    /// A worker changed state (starting, ready, stopping, exited, errored).
    #[zbus(signal)]
    async fn worker_state_changed(
        emitter: &SignalEmitter<'_>,
        instance: u32,
        pid: u32,
        state: &str,
    ) -> zbus::Result<()>;

    /// A reload ended, successfully or not, with a sentence saying how.
    #[zbus(signal)]
    async fn reload_finished(
        emitter: &SignalEmitter<'_>,
        ok: bool,
        message: &str,
    ) -> zbus::Result<()>;
}

/// Connect, take the name, serve the interface, and forward signals.
///
/// Failure is not fatal: the manager runs on without a control plane, says
/// so once, and keeps trying in the background (the bus may start after us,
/// or restart under us), reconnecting with a backoff of up to 30 s.
pub async fn serve(bus: Bus, name: String, handle: Handle) {
    let mut signals = handle.signals.subscribe();
    if bus == Bus::None {
        logs::info("control plane off (--no-bus)");
        return;
    }
    let mut said_off = false;
    let mut backoff = Duration::from_millis(250);
    loop {
        match connect(&bus, &name, handle.clone()).await {
            Ok(conn) => {
                logs::info(&format!(
                    "control plane on: {name} on the {} bus",
                    describe(&bus)
                ));
                said_off = false;
                backoff = Duration::from_millis(250);
                if !forward(conn, &handle, &mut signals).await {
                    return;
                }
                logs::warn(&format!(
                    "control plane: lost the connection to the {} bus; reconnecting (workers are not affected)",
                    describe(&bus)
                ));
            }
            Err(e) if !said_off => {
                said_off = true;
                logs::warn(&format!(
                    "control plane off: cannot serve {name} on the {} bus: {e}. Workers run on; nodeherd status/reload/scale/restart reach the manager through its control socket, and SIGHUP reloads. Retrying in the background",
                    describe(&bus)
                ));
            }
            Err(_) => {}
        }
        // Signals meant for a bus that is not there are dropped, not hoarded.
        let wake = tokio::time::sleep(backoff);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                _ = &mut wake => break,
                s = signals.recv() => if matches!(s, Err(broadcast::error::RecvError::Closed)) { return },
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

fn describe(bus: &Bus) -> String {
    match bus {
        Bus::System => "system".into(),
        Bus::Session => "session".into(),
        Bus::Address(a) => a.clone(),
        Bus::None => "no".into(),
    }
}

pub(crate) fn builder(bus: &Bus) -> zbus::Result<connection::Builder<'static>> {
    match bus {
        Bus::System => connection::Builder::system(),
        Bus::Session => connection::Builder::session(),
        Bus::Address(a) => connection::Builder::address(a.as_str()),
        Bus::None => Err(zbus::Error::Failure("no bus".into())),
    }
}

async fn connect(bus: &Bus, name: &str, handle: Handle) -> zbus::Result<zbus::Connection> {
    builder(bus)?
        .name(name.to_string())?
        .serve_at(PATH, Manager { handle })?
        .build()
        .await
}

/// Serve until the bus connection is lost (`true`) or the manager is done (`false`).
async fn forward(
    conn: zbus::Connection,
    handle: &Handle,
    signals: &mut broadcast::Receiver<BusSignal>,
) -> bool {
    use futures_util::StreamExt;
    let iface = match conn.object_server().interface::<_, Manager>(PATH).await {
        Ok(i) => i,
        Err(e) => {
            logs::warn(&format!("control plane: {e}"));
            return true;
        }
    };
    // Every message passes through this stream too; it ends (after an
    // error) when the connection to the bus is gone.
    let mut incoming = zbus::MessageStream::from(&conn);
    let mut snaps = handle.snapshot.clone();
    let mut last = snaps.borrow().clone();
    loop {
        tokio::select! {
            m = incoming.next() => {
                if !matches!(m, Some(Ok(_))) {
                    return true;
                }
            }
            s = signals.recv() => {
                let s = match s {
                    Ok(s) => s,
                    // A slow connection missed some signals: go on with the next.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return false,
                };
                let emitter = iface.signal_emitter();
                let r = match s {
                    BusSignal::WorkerStateChanged { instance, pid, state } => {
                        Manager::worker_state_changed(emitter, instance, pid, state).await
                    }
                    BusSignal::ReloadFinished { ok, message } => {
                        Manager::reload_finished(emitter, ok, &message).await
                    }
                };
                if let Err(e) = r {
                    logs::warn(&format!("control plane: emitting a signal failed: {e}"));
                }
            }
            changed = snaps.changed() => {
                if changed.is_err() {
                    return false;
                }
                let now = snaps.borrow_and_update().clone();
                let m = iface.get().await;
                let emitter = iface.signal_emitter();
                if now.state != last.state {
                    let _ = m.state_changed(emitter).await;
                }
                if now.status != last.status {
                    let _ = m.status_changed(emitter).await;
                }
                if now.instances != last.instances {
                    let _ = m.instances_changed(emitter).await;
                }
                if now.ready_workers != last.ready_workers {
                    let _ = m.ready_workers_changed(emitter).await;
                }
                // Heartbeats change only the loop delays: no signal for them.
                let key = |s: &Snapshot| -> Vec<(u32, i32, &'static str, u32, Option<String>)> {
                    s.workers
                        .iter()
                        .map(|w| (w.instance, w.pid, w.state, w.restarts, w.status_text.clone()))
                        .collect()
                };
                if key(&now) != key(&last) {
                    let _ = m.workers_changed(emitter).await;
                    let texts = |s: &Snapshot| -> Vec<Option<String>> {
                        s.workers.iter().map(|w| w.status_text.clone()).collect()
                    };
                    if texts(&now) != texts(&last) {
                        let _ = m.worker_status_texts_changed(emitter).await;
                    }
                }
                last = now;
            }
        }
    }
}

/// The manager's own control socket: the same interface, peer to peer, for
/// a container or a shell with no bus. It lives in the manager's private
/// runtime directory (mode 0700, or 0711 when workers run as another user)
/// and is itself 0600: only the manager's user and root reach it, which is
/// at least as narrow as the bus policy.
pub fn bind_control_socket(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serve `org.nodeherd.Manager1` to each client of the control socket.
pub async fn serve_control_socket(listener: tokio::net::UnixListener, handle: Handle) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                logs::warn(&format!("control socket: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let built = async {
                connection::Builder::unix_stream(stream)
                    .server(zbus::Guid::generate())?
                    .p2p()
                    .serve_at(
                        PATH,
                        Manager {
                            handle: handle.clone(),
                        },
                    )?
                    .build()
                    .await
            };
            match built.await {
                Ok(conn) => {
                    let mut signals = handle.signals.subscribe();
                    forward(conn, &handle, &mut signals).await;
                }
                Err(e) => logs::warn(&format!("control socket: a client failed to connect: {e}")),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_names_are_valid() {
        assert_eq!(bus_name_for("api"), "org.nodeherd.api");
        assert_eq!(bus_name_for("my-app.v2"), "org.nodeherd.my_app_v2");
        assert_eq!(bus_name_for("2fast"), "org.nodeherd._2fast");
        assert_eq!(bus_name_for("ünï"), "org.nodeherd._n_");
    }
}
