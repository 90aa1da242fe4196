//! What goes into the supervisor's core and what comes out of it: the
//! events it reacts to and the effects it asks the driver for. Plain data,
//! no rules (those are `core.rs`), so the driver, the sources and the tests
//! speak the core's language without reaching into its state.

// Sans-IO: see clippy.toml.
#![deny(clippy::disallowed_methods)]

use std::time::Duration;

use super::policy::Policy;
use crate::control::{BusSignal, Control, CtlResult};
pub use crate::worker::WorkerId;
pub use crate::worker::process::ExitStatus;

/// Identifies a caller waiting for an answer; the driver holds the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReplyId(pub u64);

/// Everything the core reacts to, besides its own timers.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The driver started the process asked for by [`Effect::Spawn`].
    Spawned {
        worker: WorkerId,
        pid: i32,
        /// It has a Node IPC channel (for the `'shutdown'` message).
        ipc: bool,
    },
    /// The driver could not start it (fork/exec, or binding its sockets).
    SpawnFailed { worker: WorkerId, error: String },
    /// The worker's cgroup says the kernel OOM-killed in it (`memory.events`
    /// `oom_kill`), how in words; sent just before its `Exited`.
    OomKilled { worker: WorkerId, words: String },
    Exited {
        worker: WorkerId,
        status: ExitStatus,
    },
    /// What a worker's preload (or the app itself) said on its channel,
    /// as far as the core cares: binds and metrics are the driver's.
    Said { worker: WorkerId, said: Said },
    /// A datagram on the workers' notify socket from a worker (or its group).
    Notify {
        worker: WorkerId,
        ready: bool,
        status: Option<String>,
    },
    /// A datagram on the notify socket from a process that is no worker of ours.
    NotifyFromStranger { pid: i32 },
    /// A worker kept its IPC channel fuller than the manager reads it, for
    /// seconds in a row.
    Flooding { worker: WorkerId },
    /// Resident memory of the workers named by [`Effect::SampleMemory`].
    MemorySample(Vec<(WorkerId, u64)>),
    /// Memory pressure of the same workers (`some avg10`, percent), where
    /// their cgroup has it; answered after `MemorySample`.
    PressureSample(Vec<(WorkerId, f64)>),
    /// The load as [`Effect::SampleLoad`] asked: connections waiting in the
    /// accept queues the workers take from, and the unit's `MemoryMax=`
    /// where its cgroup says it.
    LoadSample {
        queued: u32,
        unit_memory_max: Option<u64>,
    },
    /// A control request (D-Bus, SIGHUP).
    Request {
        what: Control,
        reply: Option<ReplyId>,
    },
    /// A reload with a configuration read anew: workers started from the
    /// moment that reload begins follow `policy` and the driver's launcher of
    /// `generation`.
    Reconfigure {
        config: Box<NewConfig>,
        reply: Option<ReplyId>,
    },
    /// A reload was refused before anything changed (its configuration
    /// was invalid); only counted.
    ReloadRefused,
    /// The new program for a re-exec was checked: it runs and reads the
    /// state format (`Ok`: what it is, in words), or why not.
    ExecChecked(Result<String, String>),
    /// `execve` itself failed; the manager goes on as it was.
    ExecFailed(String),
    /// The accept queues of a slot that goes are empty (see `Effect::DrainSlot`).
    SlotDrained(u64),
    /// When `cron_restart` runs next (see `Effect::ScheduleCron`): the
    /// deadline, and the same moment on the wall clock (ms since the epoch);
    /// or why it never does.
    CronScheduled(Result<(std::time::Instant, u64), String>),
    /// A file under `watch` changed.
    FilesChanged,
    /// What [`Effect::Diagnose`] captured: the file, or why not.
    Diagnosed {
        worker: WorkerId,
        result: Result<String, String>,
    },
    /// SIGTERM or SIGINT.
    Stop,
}

/// What a worker said that the core acts on (the driver reads the wire,
/// `crate::ipc`, and passes these on).
#[derive(Debug, Clone, PartialEq)]
pub enum Said {
    /// `process.send('ready')`: ready, with or without `wait_ready`.
    Ready,
    /// The preload saw it listen on a handed-over socket.
    Listening,
    /// The preload could not map a listen call; the text says why.
    ListenError(String),
    /// The heartbeat, with the event loop's longest delay since the last
    /// (ms), and the worker's request outcomes so far, if it sent sound ones.
    Beat {
        delay_ms: u32,
        /// Its event-loop utilization over the interval, in thousandths.
        elu_permille: Option<u16>,
        outcomes: Option<Box<crate::outcomes::Outcomes>>,
    },
    /// The keep-alive connections it holds and is not closing.
    Connections { open: u32 },
    /// The app closed its servers on the handed-over sockets and lives on.
    Closed,
}

/// A configuration read anew for a reload.
#[derive(Debug, Clone, PartialEq)]
pub struct NewConfig {
    pub policy: Policy,
    /// The configured `instances` changed: scale to it. If not, the count
    /// the app was scaled to live stays.
    pub resize: bool,
    /// Which of the driver's launchers starts workers under it.
    pub generation: u64,
    /// What changed, in words.
    pub summary: String,
    /// Asked for with `--canary`: judged by a canary whatever
    /// `reload_strategy` says.
    pub canary: bool,
}

/// How serious a log line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Notice,
    Warning,
    Error,
}

/// A line for the journal (or stderr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: Level,
    pub text: String,
    /// The worker it is about (slot index, pid), to tag it with that worker's fields.
    pub worker: Option<(u32, i32)>,
    /// `NODEHERD_EVENT=` for lines that mark an event worth filtering on.
    pub event: Option<crate::logs::Milestone>,
}

/// Why a worker's stack is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutopsyWhy {
    /// The watchdog found it hung (`max_event_loop_delay`).
    Hang,
    /// It is replaced for `max_memory_restart` (`autopsy_on_memory`).
    Memory,
}

/// What to tell systemd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdNotify {
    Ready(String),
    Reloading(String),
    Status(String),
    Stopping(String),
    Watchdog,
    ExtendTimeout(Duration),
}

/// How to ask a worker to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopBy {
    /// SIGINT, as PM2 does.
    Signal,
    /// The `'shutdown'` message on the IPC channel (`shutdown_with_message`).
    Message,
}

/// What the driver is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Start a worker for slot `index` with the launcher of configuration
    /// `generation`; answer with `Spawned` or `SpawnFailed`.
    Spawn {
        worker: WorkerId,
        index: u32,
        generation: u64,
    },
    /// Ask a worker to stop gracefully.
    Stop {
        worker: WorkerId,
        by: StopBy,
    },
    /// SIGKILL a worker and its process group.
    Kill {
        worker: WorkerId,
    },
    /// Close a slot's own sockets (`balance: reuseport`): it errored.
    ReleaseSlotSockets(u32),
    /// Slot `index` goes (`balance: reuseport`): steer new connections away
    /// from its sockets, keep them open, and answer with `SlotDrained(leave)`
    /// once their accept queues are empty.
    DrainSlot {
        leave: u64,
        index: u32,
    },
    /// Close the sockets of `leave` once these workers have exited.
    CloseLeaving {
        leave: u64,
        workers: Vec<WorkerId>,
    },
    /// Tell a worker how many keep-alive connections are its fair share
    /// (`None`: no limit); see [`super::share`].
    Share {
        worker: WorkerId,
        max: Option<u32>,
    },
    /// Ask the worker's preload for its JavaScript stack, log it and keep
    /// it (see `crate::autopsy`), giving up after `within`. Nothing waits
    /// for it: the replacement goes on, and the kill comes no earlier than
    /// `kill_timeout` after the stop, so `within` = `kill_timeout` bounds it.
    Autopsy {
        worker: WorkerId,
        index: u32,
        pid: i32,
        why: AutopsyWhy,
        within: Duration,
    },
    /// Take a worker out of rotation (it stops accepting and finishes what
    /// it holds), capture it, and answer with `Diagnosed` within `within`.
    Diagnose {
        worker: WorkerId,
        index: u32,
        pid: i32,
        capture: crate::control::Capture,
        within: Duration,
    },
    /// A worker captured in place (`--then resume`): it listens again on
    /// its sockets, which go back to it over its IPC channel.
    Resume {
        worker: WorkerId,
    },
    /// Measure the accept queues (autoscaling); answer with `LoadSample`.
    SampleLoad,
    /// Measure these workers' memory; answer with `MemorySample`.
    SampleMemory(Vec<WorkerId>),
    /// Work out when the `cron_restart` pattern runs next on the wall
    /// clock, after `not_before` (ms since the epoch: the run just made);
    /// answer with `CronScheduled`.
    ScheduleCron {
        pattern: String,
        not_before: Option<u64>,
    },
    /// Check the program a re-exec would run; answer with `ExecChecked`.
    CheckExec,
    /// Hand the state over and `execve` the checked program (answer with
    /// `ExecFailed` if that fails); the core has answered the callers.
    Exec,
    Notify(SdNotify),
    Log(LogLine),
    Bus(BusSignal),
    Reply {
        reply: ReplyId,
        result: CtlResult,
    },
}
