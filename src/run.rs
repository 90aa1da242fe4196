//! `nodeherd run`: assemble the daemon from its parts and run it.
//!
//! Order matters here. The sockets systemd passed are taken first, while
//! the process has one thread, because reading them changes the
//! environment. Then the config is loaded (a `.config.js` runs node, which
//! must not inherit the sockets: they are close-on-exec by then), sockets
//! are bound if none were passed, the private runtime directory is made, and
//! only then does the async runtime start.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::RunArgs;
use crate::config::{self, ConfigError};
use crate::control::Handle;
use crate::socket_set::{Layout, SocketSet};
use crate::sockets::{self, SocketError};
use crate::supervisor::driver::Carry;
use crate::supervisor::reconfig::{Source, WorkerPaths};
use crate::supervisor::{Driver, sources, takeover};
use crate::{dbus, health, herd, logs, metrics, notify, notify_socket, reexec};

/// Why `nodeherd run` could not run; the kind decides the exit status.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration or a flag is wrong (exit 2).
    #[error("error: {0}")]
    Config(#[from] ConfigError),
    /// Flags that cannot go together (exit 2).
    #[error("error: {0}")]
    Usage(String),
    /// A socket could not be had (exit 2 for a bad address, 1 for a refused bind).
    #[error("{0}")]
    Socket(#[from] SocketError),
    /// An error already logged; only its exit status is left.
    #[error("{0}")]
    Reported(Box<RunError>),
    /// The bus name is not ours to take (exit 4): another process owns it,
    /// or the bus policy does not let this user own it.
    #[error("error: {0}")]
    BusName(String),
    /// Something the system refused at runtime (exit 1).
    #[error("{what}: {source}")]
    System {
        what: String,
        source: std::io::Error,
    },
}

impl RunError {
    pub fn exit_status(&self) -> u8 {
        match self {
            RunError::Config(_) | RunError::Usage(_) => 2,
            RunError::Socket(e) => e.exit_status(),
            RunError::Reported(e) => e.exit_status(),
            RunError::BusName(_) => 4,
            RunError::System { .. } => 1,
        }
    }

    fn system(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
        let what = what.into();
        move |source| RunError::System { what, source }
    }
}

pub fn main(args: RunArgs) -> ExitCode {
    let code = match run(args) {
        Ok(code) => code,
        Err(RunError::Reported(e)) => e.exit_status(),
        Err(e) => {
            logs::error(&e.to_string());
            e.exit_status()
        }
    };
    logs::flush(Duration::from_secs(2));
    ExitCode::from(code)
}

fn run(args: RunArgs) -> Result<u8, RunError> {
    // First, while this is the only thread: every thread started from now
    // on inherits the mask (see reexec::block_control_signals).
    reexec::block_control_signals();
    // SAFETY: no thread has been started yet (clap does not start any).
    let handed_over = unsafe { reexec::take() }.map_err(RunError::Usage)?;
    if let Some(doc) = handed_over {
        return resume(args, &doc);
    }
    // SAFETY: as above.
    let inherited = unsafe { sockets::take_inherited() }?;
    let source = source_of(&args);
    let loaded = match source.load_found() {
        Ok(config::Found::One(l)) => *l,
        Ok(config::Found::Several(apps)) => return run_several(&args, &source, apps, &inherited),
        Err(e) if !inherited.is_empty() => return Err(config_error_when_activated(e)),
        Err(e) => return Err(e.into()),
    };
    let app = loaded.app;
    logs::init(&app.name, &app.instance_var);
    logs::set_files(&app);
    for w in &loaded.warnings {
        logs::warn(w);
    }

    if app.balance == config::Balance::ReusePort && inherited.is_empty() && app.listen.is_empty() {
        return Err(RunError::Usage(
            "balance reuseport needs listening sockets: --listen addresses, or sockets systemd \
             passes with ReusePort=yes"
                .into(),
        ));
    }
    let listeners_from_systemd = !inherited.is_empty();
    // A socket systemd passes under the name `metrics` is the metrics
    // endpoint's, not the workers'.
    let mut inherited = inherited;
    let metrics_socket = inherited
        .iter()
        .position(|l| l.name == "metrics")
        .map(|i| inherited.remove(i));
    let layout = match app.balance {
        config::Balance::Queue => Layout::Shared,
        config::Balance::ReusePort => {
            if !inherited.is_empty() {
                sockets::can_balance_inherited(&inherited).map_err(RunError::Usage)?;
            }
            Layout::PerSlot
        }
        config::Balance::Auto => balance_auto(&inherited, &app.listen),
    };
    let listeners = if !inherited.is_empty() {
        if !app.listen.is_empty() {
            logs::info("systemd passed sockets: --listen / `listen` ignored");
        }
        inherited
    } else if layout != Layout::Shared {
        sockets::bind_all_reuseport(&app.listen)?
    } else {
        sockets::bind_all(&app.listen)?
    };
    if listeners.is_empty() {
        logs::warn(
            "no listening socket (no LISTEN_FDS from systemd, no --listen): workers' own listen() calls bind as they like",
        );
    }
    for l in &listeners {
        logs::info(&format!(
            "socket: {} {} (name {:?})",
            l.kind, l.address, l.name
        ));
    }

    let dir =
        runtime_dir(&app.name).map_err(RunError::system("cannot create the runtime directory"))?;
    let metrics = match metrics_socket {
        Some(l) => Some(MetricsAt::Inherited(l)),
        None => app.metrics.clone().map(MetricsAt::Address),
    };
    let activated = listeners_from_systemd;
    let result = run_daemon(
        app,
        Start::Fresh { listeners, layout },
        metrics,
        source,
        &dir,
        &args,
        activated,
    );
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A file of several apps without `--only`: a manager for each ([`herd`]).
fn run_several(
    args: &RunArgs,
    source: &Source,
    apps: Vec<(String, config::Loaded)>,
    inherited: &[sockets::Listener],
) -> Result<u8, RunError> {
    let names: Vec<String> = apps.into_iter().map(|(name, _)| name).collect();
    if let Some(why) = herd::refuse(&names, &args.over, &args.bus, !inherited.is_empty()) {
        let err = ConfigError {
            source: source.target.display().to_string(),
            app: None,
            key: None,
            msg: why,
        };
        if !inherited.is_empty() {
            return Err(config_error_when_activated(err));
        }
        return Err(RunError::Usage(err.to_string()));
    }
    herd::run(&source.target, &names).map_err(RunError::system("cannot run the file's apps"))
}

/// What a re-exec handed over, owned again, for [`run_daemon`].
struct Resumed {
    sockets: SocketSet,
    shared: crate::shared::SharedSockets,
    notify: std::os::fd::OwnedFd,
    control: Option<std::os::fd::OwnedFd>,
    core: crate::supervisor::Core,
    workers: Vec<takeover::AdoptedWorker>,
    took: Duration,
    written_by: String,
    /// The health listeners the old program served, by key.
    health: Vec<(String, sockets::Listener)>,
    tally: crate::tally::Carried,
}

/// `balance: auto`: where every listening socket allows `SO_REUSEPORT`
/// siblings, TCP gets one shared queue steered for keep-alive (nothing
/// waits behind a busy or hung worker, and keep-alive connections even
/// out), and UDP a socket per slot (each flow stays with one worker);
/// else one shared queue. Said either way.
fn balance_auto(inherited: &[sockets::Listener], listen: &[String]) -> Layout {
    let why_not = if !inherited.is_empty() {
        sockets::can_balance_inherited(inherited).err()
    } else if listen.is_empty() {
        Some("no listening socket".to_string())
    } else {
        listen
            .iter()
            .find(|a| a.starts_with("unix:"))
            .map(|a| format!("{a} is a unix socket"))
    };
    let udp = if inherited.is_empty() {
        listen.iter().any(|a| a.starts_with("udp:"))
    } else {
        inherited.iter().any(|l| l.kind == sockets::Kind::Udp)
    };
    match why_not {
        None if udp => {
            logs::info(
                "balance auto: a socket per slot (reuseport), each UDP flow stays with one worker",
            );
            Layout::PerSlot
        }
        None => {
            logs::info(
                "balance auto: one accept queue shared by all workers, steered to even out keep-alive connections",
            );
            Layout::Steered
        }
        Some(why) => {
            logs::info(&format!(
                "balance auto: one accept queue shared by all workers ({})",
                why.trim_start_matches("balance reuseport: ")
            ));
            Layout::Shared
        }
    }
}

/// How the daemon starts: afresh with these sockets (a socket per slot or
/// shared), or from a re-exec.
enum Start {
    Fresh {
        listeners: Vec<sockets::Listener>,
        layout: Layout,
    },
    Resumed(Box<Resumed>),
}

/// Go on where the program before this one left off (a re-exec): same pid,
/// same workers, same sockets; the configuration in force comes with the
/// state, not from the file (only a reload reads that). The program that
/// wrote the state ran the same checks on it before it exec'd
/// (`__check-state`), so what is refused here is what only the fds
/// themselves can refuse, which that program checked open.
fn resume(args: RunArgs, doc: &[u8]) -> Result<u8, RunError> {
    let bad = |what: &str| {
        let what = what.to_string();
        move |e: String| RunError::System {
            what: format!("re-exec: cannot take over {what}"),
            source: std::io::Error::other(e),
        }
    };
    let state = takeover::take_over(doc).map_err(bad("the state"))?;
    let app = state.app.clone();
    let written_at = state.monotonic_ns;
    logs::init(&app.name, &app.instance_var);
    logs::set_files(&app);
    let watchdog = notify::watchdog_interval();
    // Read together, so the exec's duration is measured to the microsecond
    // and uptimes do not drift over many re-execs.
    let (now, took) = (
        std::time::Instant::now(),
        Duration::from_nanos(reexec::monotonic_ns().saturating_sub(written_at)),
    );
    let core = state
        .import_core(now, took, watchdog)
        .map_err(bad("the supervisor's state"))?;
    let sockets = SocketSet::adopt(state.sockets).map_err(bad("the listening sockets"))?;
    let shared = crate::shared::SharedSockets::adopt(state.shared, &app.shared_listen)
        .map_err(bad("the shared sockets"))?;
    let notify = crate::fds::adopt(state.notify_fd).map_err(bad("the notify socket"))?;
    let control = state
        .control_fd
        .map(crate::fds::adopt)
        .transpose()
        .map_err(bad("the control socket"))?;
    let metrics = state
        .metrics
        .map(sockets::Listener::adopt)
        .transpose()
        .map_err(bad("the metrics socket"))?
        .map(MetricsAt::Inherited);
    let health = state
        .health
        .into_iter()
        .map(|(key, s)| sockets::Listener::adopt(s).map(|l| (key, l)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad("a health socket"))?;
    let workers = state
        .workers
        .into_iter()
        .map(takeover::CarriedWorker::adopt)
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad("a worker's channel"))?;
    let dir = state.runtime_dir;
    crate::rundir::adopt(&dir).map_err(RunError::system("cannot create the runtime directory"))?;
    let _ = std::fs::write(dir.join("manager.pid"), std::process::id().to_string());
    let resumed = Resumed {
        sockets,
        shared,
        notify,
        control,
        core,
        workers,
        took,
        written_by: state.written_by,
        health,
        tally: state.tally,
    };
    let source = source_of(&args);
    let result = run_daemon(
        app,
        Start::Resumed(Box::new(resumed)),
        metrics,
        source,
        &dir,
        &args,
        false,
    );
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Where the configuration comes from, from the command line (a reload
/// reads the same file again).
pub fn source_of(args: &RunArgs) -> Source {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let over = args.over.clone();
    // A reload reads the same file again: the one found now.
    Source {
        target: config::config_path(&args.target),
        overrides: over,
        cpus,
    }
}

/// How long a socket-activated manager with a bad configuration waits
/// before it exits. Each connection that arrives starts the service again;
/// failing at once, five starts would come within systemd's default start
/// limit (5 in 10 s) and the *socket* would then fail and stop listening.
/// Slower than one start per 2 s, it never does: the socket keeps listening,
/// connections wait in its queue, and the first start after the file is
/// fixed serves them.
const CONFIG_ERROR_HOLD: Duration = Duration::from_secs(3);

/// A bad configuration under socket activation: say so to systemd and the
/// journal, then wait [`CONFIG_ERROR_HOLD`] before exiting with status 2.
fn config_error_when_activated(e: ConfigError) -> RunError {
    let err = RunError::Config(e);
    logs::error(&format!(
        "{err}; fix the file: the next connection starts the app again"
    ));
    notify::status(&format!("configuration error: {err}"));
    logs::flush(Duration::from_secs(1));
    std::thread::sleep(CONFIG_ERROR_HOLD);
    // Said already; the exit status carries it.
    RunError::Reported(Box::new(err))
}

/// Where the metrics endpoint listens.
enum MetricsAt {
    Inherited(sockets::Listener),
    Address(String),
}

impl MetricsAt {
    /// The endpoint to serve, and a second handle on its socket for a re-exec.
    fn bind(self) -> Result<(metrics::Endpoint, Option<sockets::Listener>), RunError> {
        let (l, what) = match self {
            MetricsAt::Inherited(l) => (l, "the metrics socket handed over".to_string()),
            MetricsAt::Address(a) => (sockets::bind(&a)?, format!("metrics {a}")),
        };
        let std_listener = |fd: std::os::fd::OwnedFd| -> Result<metrics::Endpoint, RunError> {
            let sys = |e| RunError::System {
                what: format!("cannot serve {what}"),
                source: e,
            };
            match l.kind {
                sockets::Kind::Unix => {
                    let s = std::os::unix::net::UnixListener::from(fd);
                    s.set_nonblocking(true).map_err(sys)?;
                    Ok(metrics::Endpoint::Unix(
                        tokio::net::UnixListener::from_std(s).map_err(sys)?,
                    ))
                }
                _ => {
                    let s = std::net::TcpListener::from(fd);
                    s.set_nonblocking(true).map_err(sys)?;
                    Ok(metrics::Endpoint::Tcp(
                        tokio::net::TcpListener::from_std(s).map_err(sys)?,
                    ))
                }
            }
        };
        logs::info(&format!("metrics: http://{}/metrics", l.address));
        let second = l.try_clone();
        Ok((std_listener(l.fd)?, second))
    }
}

/// Started by systemd as a service (it sets `INVOCATION_ID` for every
/// service process since v232).
fn under_systemd() -> bool {
    std::env::var_os("INVOCATION_ID").is_some_and(|v| !v.is_empty())
}

fn run_daemon(
    app: config::App,
    start: Start,
    metrics_at: Option<MetricsAt>,
    source: Source,
    dir: &Path,
    args: &RunArgs,
    activated: bool,
) -> Result<u8, RunError> {
    let preload = prepare_process(dir, &app)?;
    // One thread runs the supervisor: workers are forked from it, and their
    // parent-death signal is tied to the thread that forked them (see
    // worker::fork). Do not make this a multi-thread runtime. A re-exec
    // happens on this thread too (see reexec::exec).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::system("cannot start the async runtime"))?;
    let bus = args.bus.bus();
    let bus_name = args
        .bus
        .bus_name
        .clone()
        .unwrap_or_else(|| dbus::bus_name_for(&app.name));
    rt.block_on(async move {
        let (notify_std, notify_carry, notify_path) = notify_socket_for(&start, dir, &app)?;
        let app_name = app.name.clone();
        let paths = WorkerPaths {
            preload,
            notify_socket: notify_path,
            runtime_dir: dir.to_path_buf(),
        };
        let health_at = [
            (app.health.clone(), "health", health::Serve::Http),
            (
                app.health_agent.clone(),
                "health_agent",
                health::Serve::Agent,
            ),
        ];
        // A re-exec hands the old program's over: no connection refused.
        let mut start = start;
        let mut carried_health = match &mut start {
            Start::Resumed(r) => std::mem::take(&mut r.health),
            _ => Vec::new(),
        };
        let (mut driver, listener_info, control_fd, resumed_from) =
            driver_for(start, app, source, paths);
        let handle = driver.handle();
        // A stop sent during a re-exec waits in the kernel: read now.
        sources::signals(driver.inputs())
            .map_err(RunError::system("cannot read signals (signalfd)"))?;
        sources::notify_socket(notify_std, driver.notify_inputs());
        let mut metrics_carry = None;
        if let Some(at) = metrics_at {
            let (endpoint, second) = at.bind()?;
            metrics_carry = second;
            tokio::spawn(metrics::serve(
                endpoint,
                app_name.clone(),
                handle.clone(),
                listener_info,
            ));
        }
        let mut health_carry = Vec::new();
        for (spec, key, what) in health_at {
            let Some(spec) = spec else { continue };
            let carried = carried_health
                .iter()
                .position(|(k, _)| k == key)
                .map(|i| carried_health.remove(i).1);
            let opened = match carried {
                Some(l) => health::Listener::serve_from(l, key),
                None => sockets::bind(&spec)
                    .map_err(|e| format!("{key}: cannot listen on {spec}: {e}"))
                    .and_then(|l| health::Listener::serve_from(l, key)),
            };
            // After a re-exec the workers serve on: a socket lost is said, not fatal.
            let (listener, second) = match opened {
                Ok(l) => l,
                Err(e) if resumed_from.is_some() => {
                    logs::warn(&e);
                    continue;
                }
                Err(e) => return Err(RunError::Usage(e)),
            };
            health_carry.extend(second.map(|s| (key.to_string(), s)));
            if resumed_from.is_none() {
                logs::info(&format!("{key}: {}", listener.address()));
            }
            tokio::spawn(health::serve(listener, what, handle.clone()));
        }
        if let Some((took, from)) = &resumed_from {
            say_reexecuted(*took, from, &handle);
        }
        // The bus name first, before any worker starts.
        let first =
            take_bus_name(&bus, &bus_name, &handle, resumed_from.is_some(), activated).await?;
        tokio::spawn(dbus::serve(bus, bus_name, handle.clone(), first));
        let control_carry = serve_control_socket(control_fd, dir, &handle);
        driver.carry(Carry {
            runtime_dir: dir.to_path_buf(),
            notify: notify_carry,
            control: control_carry,
            metrics: metrics_carry,
            health: health_carry,
        });
        if resumed_from.is_some() {
            let status = handle.snapshot.borrow().status.clone();
            notify::ready(&status);
        }
        let code = driver.run().await.map_err(RunError::system(
            "cannot watch for exiting workers (SIGCHLD)",
        ))?;
        Ok(code.clamp(0, 255) as u8)
    })
}

/// Before the runtime starts: the preload sealed in memory, the runtime
/// directory opened to workers of another user, and orphans made ours.
fn prepare_process(
    dir: &Path,
    app: &config::App,
) -> Result<crate::worker::preload::Preload, RunError> {
    // Made again after a re-exec: workers started from now on get this
    // program's preload. Sealed in memory, never a file a worker could
    // rewrite (one an older version wrote here goes).
    let preload =
        crate::worker::preload::Preload::new(crate::worker::preload::SOURCE).map_err(|e| {
            RunError::System {
                what: "cannot seal the preload in memory".into(),
                source: std::io::Error::other(format!("{e:#}")),
            }
        })?;
    let _ = std::fs::remove_file(dir.join("shim.js"));
    if app.credentials.is_some() {
        // Workers running as another user must reach the notify socket by
        // name; the directory stays unlistable.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711));
    }
    // Orphans of workers come to us, so they can be reaped and never outlive us.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        logs::warn(&format!(
            "cannot become the workers' children's subreaper ({e}): their orphans go to PID 1"
        ));
    }
    Ok(preload)
}

/// The workers' notify socket: bound afresh, or the one a re-exec handed
/// over; with a second handle for the next re-exec, and its path.
fn notify_socket_for(
    start: &Start,
    dir: &Path,
    app: &config::App,
) -> Result<(tokio::net::UnixDatagram, std::os::fd::OwnedFd, PathBuf), RunError> {
    let path = dir.join("notify.sock");
    let sock = match start {
        Start::Fresh { .. } => notify_socket::bind(&path).map_err(RunError::system(format!(
            "cannot bind the worker notify socket {}",
            path.display()
        )))?,
        Start::Resumed(r) => {
            let fd = r
                .notify
                .try_clone()
                .map_err(RunError::system("the notify socket"))?;
            let s = std::os::unix::net::UnixDatagram::from(fd);
            s.set_nonblocking(true)
                .map_err(RunError::system("the notify socket"))?;
            tokio::net::UnixDatagram::from_std(s).map_err(RunError::system("the notify socket"))?
        }
    };
    if app.credentials.is_some() {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666));
    }
    let carry = {
        use std::os::fd::AsFd;
        sock.as_fd()
            .try_clone_to_owned()
            .map_err(RunError::system("the notify socket"))?
    };
    Ok((sock, carry, path))
}

/// The driver, fresh or going on from a re-exec; with what the metrics
/// endpoint reports of the sockets, the control socket a re-exec handed
/// over, and (after a re-exec) how long it took and from which version.
#[allow(clippy::type_complexity)]
fn driver_for(
    start: Start,
    app: config::App,
    source: Source,
    paths: WorkerPaths,
) -> (
    Driver,
    Vec<metrics::SocketInfo>,
    Option<std::os::fd::OwnedFd>,
    Option<(Duration, String)>,
) {
    // Before the first launcher: it derives the workers' budgets from it.
    crate::worker::cgroup::init();
    logs::info(&crate::worker::cgroup::summary());
    match start {
        Start::Fresh { listeners, layout } => {
            let info = socket_infos(&listeners);
            let sockets = SocketSet::new(listeners, layout);
            let watchdog = notify::watchdog_interval();
            let mut d = Driver::new(app, sockets, source, paths, watchdog);
            d.open_history();
            (d, info, None, None)
        }
        Start::Resumed(r) => {
            let r = *r;
            let info = socket_infos(r.sockets.describe());
            let mut d = Driver::resume(app, r.sockets, r.shared, source, paths, r.core, r.workers);
            d.adopt_tally(r.tally);
            d.open_history();
            (d, info, r.control, Some((r.took, r.written_by)))
        }
    }
}

fn say_reexecuted(took: Duration, from: &str, handle: &Handle) {
    logs::event(
        libsystemd::logging::Priority::Notice,
        &format!(
            "re-executed in {} ms (from nodeherd {from} to {}): {} worker(s) taken over, none restarted",
            took.as_millis(),
            env!("CARGO_PKG_VERSION"),
            handle
                .snapshot
                .borrow()
                .workers
                .iter()
                .filter(|w| w.pid > 0)
                .count()
        ),
        &[crate::logs::Milestone::Reexecuted.field()],
    );
}

/// Take the bus name, before any worker starts. Under systemd a name that
/// is not ours is fatal: someone else answering for this app would get
/// `systemctl reload` and every client's calls.
async fn take_bus_name(
    bus: &dbus::Bus,
    name: &str,
    handle: &Handle,
    resumed: bool,
    activated: bool,
) -> Result<Option<zbus::Connection>, RunError> {
    match claim_name(bus, name, handle, resumed).await {
        dbus::Claim::Owned(conn) => Ok(Some(conn)),
        dbus::Claim::Later => Ok(None),
        dbus::Claim::Refused(why) if under_systemd() => {
            let err = RunError::BusName(why);
            logs::error(&err.to_string());
            notify::status(&format!("stopped: {err}"));
            if activated {
                // As for a bad configuration: connections that keep
                // starting the service must not fail its socket.
                logs::flush(Duration::from_secs(1));
                tokio::time::sleep(CONFIG_ERROR_HOLD).await;
            }
            Err(RunError::Reported(Box::new(err)))
        }
        dbus::Claim::Refused(_) => Ok(None),
    }
}

/// Serve the control socket (bound now, or the one a re-exec handed over);
/// returns a second handle for the next re-exec.
fn serve_control_socket(
    handed_over: Option<std::os::fd::OwnedFd>,
    dir: &Path,
    handle: &Handle,
) -> Option<std::os::fd::OwnedFd> {
    let path = dir.join("control.sock");
    let control = match handed_over {
        Some(fd) => {
            let s = std::os::unix::net::UnixListener::from(fd);
            s.set_nonblocking(true)
                .and_then(|()| tokio::net::UnixListener::from_std(s))
        }
        None => dbus::bind_control_socket(&path),
    };
    match control {
        Ok(listener) => {
            use std::os::fd::AsFd;
            let carry = listener.as_fd().try_clone_to_owned().ok();
            tokio::spawn(dbus::serve_control_socket(listener, handle.clone()));
            carry
        }
        Err(e) => {
            logs::warn(&format!(
                "no control socket at {}: {e}; control is through the bus only",
                path.display()
            ));
            None
        }
    }
}

/// Take the bus name. After a re-exec the bus may not yet have seen the old
/// program's connection close (it closed with the exec): a name still
/// owned is asked for again for a few seconds before it counts as taken.
async fn claim_name(bus: &dbus::Bus, name: &str, handle: &Handle, resumed: bool) -> dbus::Claim {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match dbus::claim(bus, name, handle.clone()).await {
            dbus::Claim::Refused(_) if resumed && std::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// The listening sockets, as the metrics endpoint reports them.
fn socket_infos(listeners: &[sockets::Listener]) -> Vec<metrics::SocketInfo> {
    listeners
        .iter()
        .filter_map(|l| {
            let st = nix::sys::stat::fstat(&l.fd).ok()?;
            Some(metrics::SocketInfo {
                kind: l.kind.to_string(),
                address: l.address.clone(),
                inode: st.st_ino,
            })
        })
        .collect()
}

/// A directory private to this manager for its notify and control sockets.
fn runtime_dir(app: &str) -> std::io::Result<PathBuf> {
    crate::rundir::create(app)
}

/// `nodeherd-<app>-`: the name of a manager's private directory, before its pid.
pub fn runtime_dir_prefix(app: &str) -> String {
    crate::rundir::prefix(app)
}

/// Where managers keep their private directories (see [`crate::rundir::base`]).
pub fn runtime_base() -> PathBuf {
    crate::rundir::base()
}
