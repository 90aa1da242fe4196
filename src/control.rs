//! The control plane's vocabulary, shared by the supervisor, the D-Bus
//! server and the command-line clients.
//!
//! Nothing here does anything: these are the requests the outside world may
//! make of a manager, the errors they can end with, what a manager publishes
//! about itself ([`Snapshot`]) and the signals it emits. Keeping them apart
//! from both the supervisor and the bus code lets either change without the
//! other reaching inside it.

use std::time::Instant;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// Errors a control request can end with; each has a D-Bus error name
/// (`org.nodeherd.Error.<Variant>`) and a client exit status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CtlError {
    /// A bad argument (a count out of range, an invalid configuration).
    #[error("{0}")]
    InvalidArgument(String),
    /// A reload stopped: a replacement crashed or was not ready in time.
    #[error("{0}")]
    ReloadFailed(String),
    /// Too many requests are already waiting; try again later.
    #[error("{0}")]
    Busy(String),
    /// The manager is stopping and takes no more requests.
    #[error("{0}")]
    Stopping(String),
    /// Anything else that failed (a scale or restart whose workers failed).
    #[error("{0}")]
    Failed(String),
}

impl CtlError {
    /// The client's exit status for this error (see the man page).
    pub fn exit_status(&self) -> u8 {
        match self {
            CtlError::InvalidArgument(_) => 2,
            CtlError::Busy(_) => 4,
            CtlError::ReloadFailed(_) | CtlError::Stopping(_) | CtlError::Failed(_) => 1,
        }
    }
}

/// A control request that succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// How many workers the app has now.
    pub workers: i32,
    /// One sentence saying what was done (and, for a reload, what changed).
    pub message: String,
}

/// The answer to a control request.
pub type CtlResult = Result<Done, CtlError>;

/// What `Scale` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleTarget {
    To(i64),
    By(i64),
}

/// A request from the outside (D-Bus, SIGHUP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Reload,
    Restart,
    Scale(ScaleTarget),
    /// Replace the manager's own program in place (`execve`), workers kept.
    Reexec,
    /// A reload judged by a canary whatever `reload_strategy` says (the
    /// driver reads the configuration and marks it, see `NewConfig::canary`).
    ReloadCanary,
    /// A reload back to a generation of the release history (0: the one
    /// that served before the one in force); the driver reads it there.
    Rollback(u64),
    /// Say "drain" on the health endpoint; workers keep serving.
    Drain,
    /// Stop saying "drain" (not while draining before a stop).
    Undrain,
    /// Take a worker out of rotation and capture a diagnosis of it.
    Diagnose(Diagnosis),
}

/// What `Diagnose` asks for: which worker, and what to capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Diagnosis {
    pub instance: u32,
    pub capture: Capture,
    /// Once captured, the worker goes back into rotation (`--then
    /// resume`) rather than being replaced.
    pub resume: bool,
}

/// What is captured of a worker out of rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// `HeapProfiler.takeHeapSnapshot` (a `.heapsnapshot` file).
    HeapSnapshot,
    /// The CPU profiler for this many seconds (a `.cpuprofile` file).
    CpuProfile(u32),
    /// Its JavaScript stack (a `.json` file).
    Stack,
}

impl Capture {
    /// The word for it on the bus and in file names.
    pub fn word(self) -> &'static str {
        match self {
            Capture::HeapSnapshot => "heap-snapshot",
            Capture::CpuProfile(_) => "cpu-profile",
            Capture::Stack => "stack",
        }
    }
}

/// A request and where its answer goes (`None`: nobody waits, as for SIGHUP).
#[derive(Debug)]
pub struct ControlRequest {
    pub what: Control,
    pub reply: Option<oneshot::Sender<CtlResult>>,
}

/// Signals for the D-Bus side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusSignal {
    WorkerStateChanged {
        instance: u32,
        pid: u32,
        state: &'static str,
    },
    ReloadFinished {
        ok: bool,
        message: String,
    },
}

/// What the outside world may read about a manager, published after every event.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub name: String,
    pub state: &'static str,
    pub instances: u32,
    pub ready_workers: u32,
    pub status: String,
    pub workers: Vec<WorkerInfo>,
    pub counters: Counters,
    /// When `cron_restart` next reloads the app (ms since the epoch), if it does.
    pub next_cron_reload_ms: Option<u64>,
    /// The configuration generation in force (one up per reload that read it anew).
    pub generation: u64,
    /// Ready workers the health endpoint needs to say "up" now.
    pub health_min_ready: u32,
    /// Autoscaling, when `instances` is `{min, max}`.
    pub autoscale: Option<Autoscale>,
    /// The last worker stack taken and kept (the driver's, not the core's).
    pub last_autopsy: Option<Taken>,
    /// The release history as anyone may read it, JSON (the driver's).
    pub history: std::sync::Arc<str>,
}

/// Autoscaling as status and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autoscale {
    pub min: u32,
    pub max: u32,
    /// The most workers it would run now: `max`, or fewer under the memory budget.
    pub ceiling: u32,
    /// A manual scale holds the count until the next reload.
    pub pinned: bool,
}

/// What happened over the manager's life, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Counters {
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// Refused before anything changed: the configuration was invalid.
    pub reloads_refused: u64,
    /// A canary was worse than its baseline, crashed or hung: rolled back.
    pub reloads_rolled_back: u64,
    /// How long the last reload that ended took.
    pub last_reload_ms: u64,
    pub scale_events: u64,
    /// Autoscaling's decisions, by direction and signal.
    pub autoscale_up_accept_queue: u64,
    pub autoscale_up_event_loop: u64,
    pub autoscale_down_quiet: u64,
    /// Times this manager replaced its own program in place (carried
    /// across each re-exec, so a client sees the new one answer).
    pub reexecs: u64,
}

/// One worker process, or one empty slot.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    pub instance: u32,
    /// 0 when the slot has no process (waiting to restart, or errored).
    pub pid: i32,
    pub state: &'static str,
    pub restarts: u32,
    pub started: Option<Instant>,
    /// The last `STATUS=` the worker sent on its notify socket.
    pub status_text: Option<String>,
    /// Its event loop's longest delay over the last heartbeat, in ms.
    pub loop_delay_ms: Option<u32>,
    /// The slot's replacements by cause: memory, hang, reload (crashes are `restarts`).
    pub replaced_memory: u32,
    /// ... and by sustained memory pressure in its cgroup.
    pub replaced_memory_pressure: u32,
    pub replaced_hang: u32,
    pub replaced_reload: u32,
    /// ... and OOM-killed by the kernel (also counted in `restarts`).
    pub replaced_oom: u32,
    /// How the slot's last worker that died unexpectedly went: `crashed`
    /// or `oom-killed`.
    pub last_exit: Option<&'static str>,
    /// Its request outcomes as it last reported them (None: not yet, or no
    /// preload); see [`crate::outcomes`].
    pub outcomes: Option<crate::outcomes::Outcomes>,
    /// The configuration generation it was started with (none: no process).
    pub generation: Option<u64>,
    /// What its Node binary said to `--version` (the driver's, from the
    /// release history).
    pub node: Option<String>,
}

/// A scrape's request for the app's own metrics, from every worker.
#[derive(Debug)]
pub struct AppMetricsRequest {
    /// How many workers were asked.
    pub asked: oneshot::Sender<usize>,
    /// Their answers, as they come.
    pub answers: mpsc::UnboundedSender<AppMetrics>,
}

/// One worker's answer to an [`AppMetricsRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppMetrics {
    pub instance: u32,
    pub pid: i32,
    /// Prometheus text, or `None` when the app keeps no metrics.
    pub text: Option<String>,
}

/// How the outside reaches a running supervisor: send requests, read the
/// state, hear the signals (the bus and every peer-to-peer client alike).
#[derive(Clone)]
pub struct Handle {
    pub requests: mpsc::UnboundedSender<ControlRequest>,
    pub snapshot: watch::Receiver<Snapshot>,
    pub signals: broadcast::Sender<BusSignal>,
    pub app_metrics: mpsc::UnboundedSender<AppMetricsRequest>,
    /// The app's counters kept across its workers' lives (and a re-exec).
    pub tally: std::sync::Arc<std::sync::Mutex<crate::tally::Tally>>,
}

impl Handle {
    /// Ask for `what` and wait for the answer.
    pub async fn ask(&self, what: Control) -> CtlResult {
        let stopping = || CtlError::Stopping("the manager is stopping".into());
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(ControlRequest {
                what,
                reply: Some(tx),
            })
            .map_err(|_| stopping())?;
        rx.await.unwrap_or_else(|_| Err(stopping()))
    }
}

/// Which bus a manager serves on, or a client talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bus {
    System,
    Session,
    Address(String),
    None,
}

/// An autopsy taken: when (ms since the epoch) and where it is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub at_ms: u64,
    pub path: std::path::PathBuf,
}
