//! `nodeherd status|reload|restart|scale`: thin D-Bus clients for people.
//!
//! Exit status: 0 done, 1 the operation failed, 2 bad usage or an invalid
//! argument, 3 no manager reachable (or the name's owner is not the app's
//! manager), 4 busy, 5 access denied, 6 the running manager is a version
//! that cannot do this (`reexec` of a manager older than re-exec in place).
//!
//! On the system bus a client trusts an answer only from the manager that
//! systemd runs for the app: the owner of the bus name must be the main
//! process of `nodeherd@APP.service` when systemd has that unit (or
//! `$MAINPID`, which systemd sets for `ExecReload=`), and every call then
//! goes to that connection's unique name, so the name cannot change hands
//! between the check and the call.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use zbus::proxy;

use crate::cli::{AppArgs, BusArgs, ScaleArgs, StatusArgs};
use crate::dbus::{self, Bus, WorkerTuple};
use crate::discover;

#[proxy(interface = "org.nodeherd.Manager1", default_path = "/org/nodeherd")]
pub(crate) trait Manager1 {
    fn reload(&self) -> zbus::Result<String>;
    fn restart(&self) -> zbus::Result<()>;
    fn scale(&self, instances: i32) -> zbus::Result<i32>;
    fn scale_by(&self, delta: i32) -> zbus::Result<i32>;
    fn reexec(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn reexecs(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn status(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn instances(&self) -> zbus::Result<i32>;
    #[zbus(property)]
    fn ready_workers(&self) -> zbus::Result<i32>;
    #[zbus(property)]
    fn workers(&self) -> zbus::Result<Vec<WorkerTuple>>;
    #[zbus(property)]
    fn next_cron_reload(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn worker_status_texts(&self) -> zbus::Result<Vec<(u32, String)>>;
    #[zbus(property)]
    fn loop_delays(&self) -> zbus::Result<Vec<(u32, u32)>>;
    #[zbus(signal)]
    fn worker_state_changed(&self, instance: u32, pid: u32, state: String) -> zbus::Result<()>;
    #[zbus(signal)]
    fn reload_finished(&self, ok: bool, message: String) -> zbus::Result<()>;
}

/// `println!` for what the clients say: a reader that went away (`| head`,
/// `| grep -q`) ends the output, not the program with a panic.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}
pub(crate) use outln;

/// A client failure, with the exit status it maps to.
pub(crate) struct Failure(pub(crate) u8, pub(crate) String);

impl From<zbus::Error> for Failure {
    fn from(e: zbus::Error) -> Self {
        match &e {
            zbus::Error::MethodError(name, msg, _) => {
                let text = msg.clone().unwrap_or_else(|| name.to_string());
                let code = match name.as_str() {
                    "org.nodeherd.Error.InvalidArgument"
                    | "org.freedesktop.DBus.Error.InvalidArgs" => 2,
                    "org.nodeherd.Error.Busy" => 4,
                    "org.freedesktop.DBus.Error.ServiceUnknown"
                    | "org.freedesktop.DBus.Error.NameHasNoOwner" => 3,
                    "org.freedesktop.DBus.Error.AccessDenied" => return denied(&text),
                    _ => 1,
                };
                Failure(code, text)
            }
            zbus::Error::FDO(fdo) => match fdo.as_ref() {
                zbus::fdo::Error::ServiceUnknown(m) | zbus::fdo::Error::NameHasNoOwner(m) => {
                    Failure(3, format!("no manager is running under that name ({m})"))
                }
                zbus::fdo::Error::AccessDenied(m) => denied(m),
                other => Failure(1, other.to_string()),
            },
            _ => Failure(1, e.to_string()),
        }
    }
}

/// Exit status 5, with the refusal's own words: the manager names the
/// action (`org.nodeherd.scale: uid 1000 is not authorized ...`); the bus
/// policy's refusal says what the bus refused.
fn denied(text: &str) -> Failure {
    Failure(5, format!("access denied: {text}"))
}

impl From<zbus::fdo::Error> for Failure {
    fn from(e: zbus::fdo::Error) -> Self {
        Failure::from(zbus::Error::from(e))
    }
}

/// Run `f` to its end on a runtime of its own.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, Failure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure(1, format!("cannot start the async runtime: {e}")))?;
    Ok(rt.block_on(f))
}

pub(crate) fn run_client<F>(f: F) -> ExitCode
where
    F: std::future::Future<Output = Result<(), Failure>>,
{
    match block_on(f).and_then(|r| r) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            eprintln!("nodeherd: {msg}");
            ExitCode::from(code)
        }
    }
}

/// Why the bus did not give a manager: nobody there to ask (no bus, no
/// owner of the name), so a control socket may answer instead; or the bus
/// answered, and that answer stands (the name's owner is not the app's
/// manager, a bad name, a refusal).
pub(crate) enum Miss {
    Absent(Failure),
    Refused(Failure),
}

impl From<Miss> for Failure {
    fn from(m: Miss) -> Self {
        match m {
            Miss::Absent(f) | Miss::Refused(f) => f,
        }
    }
}

impl From<Failure> for Miss {
    fn from(f: Failure) -> Self {
        if f.0 == 3 {
            Miss::Absent(f)
        } else {
            Miss::Refused(f)
        }
    }
}

impl From<zbus::Error> for Miss {
    fn from(e: zbus::Error) -> Self {
        Miss::from(Failure::from(e))
    }
}

impl From<zbus::fdo::Error> for Miss {
    fn from(e: zbus::fdo::Error) -> Self {
        Miss::from(Failure::from(e))
    }
}

/// A manager reached, and who it is by the kernel's or the bus's word
/// (its connection's credentials), not by its own.
pub(crate) struct Reached {
    pub(crate) conn: zbus::Connection,
    pub(crate) proxy: Manager1Proxy<'static>,
    /// The manager's pid.
    pub(crate) pid: Option<u32>,
    /// The manager's uid.
    pub(crate) uid: Option<u32>,
    pub(crate) via: Via,
}

/// How a manager was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Via {
    /// Its well-known name on the bus.
    Bus(String),
    /// Its control socket.
    Socket(PathBuf),
}

impl Via {
    pub(crate) fn describe(&self) -> String {
        match self {
            Via::Bus(name) => format!("bus name {name}"),
            Via::Socket(path) => format!("control socket {}", path.display()),
        }
    }

    pub(crate) fn to_json(&self) -> serde_json::Value {
        match self {
            Via::Bus(name) => serde_json::json!({ "bus_name": name }),
            Via::Socket(path) => serde_json::json!({ "control_socket": path }),
        }
    }
}

/// The manager of `app`: over the bus, or, when no bus answers for it, over
/// its own control socket (a container or a shell with no bus). Never the
/// control socket when the bus named another owner: that is the answer.
/// When no manager of `app` runs, the error names the apps that do.
pub(crate) async fn reach(app: Option<&str>, bus: &BusArgs) -> Result<Reached, Failure> {
    let over_bus = async {
        let conn = connect(bus).await.map_err(Miss::from)?;
        proxy(&conn, app, bus).await
    };
    match over_bus.await {
        Ok(found) => Ok(found),
        Err(Miss::Refused(e)) => Err(e),
        Err(Miss::Absent(e)) => {
            let found = discover::scan_control_sockets(app, true);
            match found.sockets.as_slice() {
                [] if found.passed_over.is_empty() && bus.bus_name.is_none() => {
                    Err(not_running(app, bus, &e).await)
                }
                [] if found.passed_over.is_empty() => Err(e),
                [] => Err(Failure(
                    3,
                    format!("{}; passed over: {}", e.1, found.passed_over.join("; ")),
                )),
                [one] => discover::control_socket(one).await,
                many => Err(Failure(
                    2,
                    format!(
                        "several managers have control sockets ({}): name the app; `nodeherd ls` lists them all",
                        many.iter()
                            .map(|c| c.path.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
            }
        }
    }
}

/// No manager of `app` (or none at all) answers: say which apps run
/// instead, and how to start `app` when it is installed but stopped.
/// Exit status 3, as for any manager not reachable.
async fn not_running(app: Option<&str>, bus: &BusArgs, bus_said: &Failure) -> Failure {
    let names = discover::running_names(bus).await;
    let running = if names.is_empty() {
        "none is running".to_string()
    } else {
        format!("running: {}", names.join(", "))
    };
    let Some(app) = app else {
        // Nothing to name, and nothing found: the bus's own words may say why.
        return Failure(
            3,
            format!(
                "no nodeherd app is running (no manager on the bus, no control socket of yours, \
                 root's or an app's user's; the bus said: {})",
                bus_said.1
            ),
        );
    };
    let mut msg = format!("no app {}; {running}", discover::printable(app));
    if let Some(config) = discover::config_of(Path::new(discover::CONFIG_DIR), app) {
        msg.push_str(&format!(
            " ({} is installed from {} but its manager is not running: `nodeherd start {}`)",
            discover::printable(app),
            config.display(),
            discover::printable(app)
        ));
    }
    Failure(3, msg)
}

pub(crate) async fn connect(bus: &BusArgs) -> Result<zbus::Connection, Failure> {
    let which = bus.bus();
    if which == Bus::None {
        return Err(Failure(2, "--no-bus makes no sense for a client".into()));
    }
    // A reload of many slow workers can take minutes; the manager bounds it.
    dbus::builder(&which)
        .map_err(|e| Failure(3, format!("cannot reach the bus: {e}")))?
        .method_timeout(Duration::from_secs(24 * 3600))
        .build()
        .await
        .map_err(|e| {
            Failure(
                3,
                format!(
                    "cannot connect to the {} bus: {e} (is a manager running? try --user or --bus ADDRESS)",
                    match which {
                        Bus::Session => "session",
                        Bus::Address(_) => "given",
                        _ => "system",
                    }
                ),
            )
        })
}

/// The bus name for APP; without APP, the only manager on the bus.
async fn resolve_name(
    conn: &zbus::Connection,
    app: Option<&str>,
    bus: &BusArgs,
) -> Result<String, Failure> {
    if let Some(n) = &bus.bus_name {
        return Ok(n.clone());
    }
    if let Some(app) = app {
        return Ok(dbus::bus_name_for(app));
    }
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    let names: Vec<String> = dbus
        .list_names()
        .await?
        .into_iter()
        .map(|n| n.to_string())
        .filter(|n| n.starts_with("org.nodeherd."))
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Failure(
            3,
            "no nodeherd manager is running on this bus".into(),
        )),
        many => Err(Failure(
            2,
            format!(
                "several managers are running ({}): name the app; `nodeherd ls` lists them all",
                many.join(", ")
            ),
        )),
    }
}

pub(crate) async fn proxy(
    conn: &zbus::Connection,
    app: Option<&str>,
    bus: &BusArgs,
) -> Result<Reached, Miss> {
    let name = resolve_name(conn, app, bus).await?;
    let bus_name = zbus::names::BusName::try_from(name.clone())
        .map_err(|e| Miss::Refused(Failure(2, format!("{name} is not a valid bus name: {e}"))))?;
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    // Fail early and clearly when nobody owns the name.
    let owner = match dbus.get_name_owner(bus_name).await {
        Ok(o) => o,
        Err(zbus::fdo::Error::NameHasNoOwner(_)) => {
            return Err(Failure(3, format!("no manager is running as {name}")).into());
        }
        Err(e) => return Err(e.into()),
    };
    let owner = owner.into_inner();
    let of_owner = zbus::names::BusName::Unique(owner.clone());
    let pid = dbus
        .get_connection_unix_process_id(of_owner.clone())
        .await
        .ok();
    let uid = dbus.get_connection_unix_user(of_owner).await.ok();
    if bus.bus() == Bus::System {
        let app = app
            .map(str::to_string)
            .or_else(|| dbus::app_for_bus_name(&name));
        verify_owner(conn, &dbus, &name, &owner, app.as_deref())
            .await
            .map_err(Miss::Refused)?;
    }
    let p = Manager1Proxy::builder(conn)
        .destination(owner)?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    Ok(Reached {
        conn: conn.clone(),
        proxy: p,
        pid,
        uid,
        via: Via::Bus(name),
    })
}

/// The owner of `name` must be the main process of the app's unit: the
/// `$MAINPID` systemd gives `ExecReload=`, else the `MainPID` of
/// `nodeherd@APP.service` when systemd has that unit loaded. A manager run
/// by hand (no such unit) is trusted as before.
async fn verify_owner(
    conn: &zbus::Connection,
    dbus: &zbus::fdo::DBusProxy<'_>,
    name: &str,
    owner: &zbus::names::UniqueName<'_>,
    app: Option<&str>,
) -> Result<(), Failure> {
    let pid = dbus
        .get_connection_unix_process_id(zbus::names::BusName::Unique(owner.clone()))
        .await?;
    let from_env = std::env::var("MAINPID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .filter(|p| *p > 0);
    if let Some(main) = from_env {
        if pid == main {
            return Ok(());
        }
        return Err(Failure(
            3,
            format!(
                "{name} is owned by pid {pid} ({owner}), not by this unit's main process \
                 ($MAINPID {main}): not talking to it"
            ),
        ));
    }
    let Some(app) = app else {
        return Ok(());
    };
    let unit = format!("nodeherd@{app}.service");
    let Some(main) = unit_main_pid(conn, &unit).await else {
        return Ok(());
    };
    if pid == main {
        return Ok(());
    }
    let main = if main == 0 {
        "which is not running".to_string()
    } else {
        format!("pid {main}")
    };
    Err(Failure(
        3,
        format!(
            "{name} is owned by pid {pid} ({owner}), not by the main process of {unit}, {main}: \
             not talking to it (see `journalctl -u {unit}`)"
        ),
    ))
}

/// `MainPID` of a unit systemd has loaded (0 when it is not running); `None`
/// when there is no such unit or no systemd on this bus.
async fn unit_main_pid(conn: &zbus::Connection, unit: &str) -> Option<u32> {
    let reply = conn
        .call_method(
            Some("org.freedesktop.systemd1"),
            "/org/freedesktop/systemd1",
            Some("org.freedesktop.systemd1.Manager"),
            "GetUnit",
            &(unit,),
        )
        .await
        .ok()?;
    let path: zbus::zvariant::OwnedObjectPath = reply.body().deserialize().ok()?;
    let props = zbus::fdo::PropertiesProxy::builder(conn)
        .destination("org.freedesktop.systemd1")
        .ok()?
        .path(path)
        .ok()?
        .build()
        .await
        .ok()?;
    let iface =
        zbus::names::InterfaceName::from_static_str_unchecked("org.freedesktop.systemd1.Service");
    let v = props.get(iface, "MainPID").await.ok()?;
    u32::try_from(v).ok()
}

pub fn status(args: StatusArgs) -> ExitCode {
    run_client(async move {
        let reached = reach(args.app.app.as_deref(), &args.app.bus).await?;
        let p = &reached.proxy;
        let manager_pid = reached.pid;
        let name = p.name().await?;
        let state = p.state().await?;
        let status = p.status().await?;
        let instances = p.instances().await?;
        let ready = p.ready_workers().await?;
        let workers = p.workers().await?;
        // Older managers have no such property: no texts then.
        let texts: std::collections::BTreeMap<u32, String> = p
            .worker_status_texts()
            .await
            .unwrap_or_default()
            .into_iter()
            .collect();
        // Older managers have no such property either.
        let next_cron = p.next_cron_reload().await.unwrap_or(0);
        if args.json {
            let ws: Vec<serde_json::Value> = workers
                .iter()
                .map(|(i, pid, st, restarts, up, mem, at)| {
                    serde_json::json!({
                        "instance": i, "pid": pid, "state": st, "restarts": restarts,
                        "uptime_ms": up, "memory_bytes": mem, "started_at_unix_ms": at,
                        "status_text": texts.get(pid),
                    })
                })
                .collect();
            let doc = serde_json::json!({
                "name": name, "state": state, "status": status,
                "instances": instances, "ready_workers": ready, "workers": ws,
                "manager_pid": manager_pid, "via": reached.via.to_json(),
                "next_cron_reload_unix_ms": (next_cron > 0).then_some(next_cron),
            });
            outln!("{doc}");
        } else {
            let (name, status) = (discover::printable(&name), discover::printable(&status));
            outln!("{name}: {state} — {status}");
            outln!(
                "manager pid {} ({})",
                manager_pid.map_or("unknown".to_string(), |p| p.to_string()),
                reached.via.describe()
            );
            outln!(
                "{:>8}  {:>8}  {:<9}  {:>8}  {:>9}  {:>10}  {:>5}",
                "instance",
                "pid",
                "state",
                "restarts",
                "uptime",
                "memory",
                "cpu%"
            );
            let cpu = cpu_percent(workers.iter().map(|w| w.1)).await;
            for (i, pid, st, restarts, up, mem, _) in &workers {
                let cpu = cpu.get(pid).map_or("-".to_string(), |c| format!("{c:.1}"));
                let pid = if *pid == 0 {
                    "-".to_string()
                } else {
                    pid.to_string()
                };
                outln!(
                    "{i:>8}  {pid:>8}  {st:<9}  {restarts:>8}  {:>9}  {:>10}  {cpu:>5}",
                    crate::human::duration(*up),
                    crate::human::bytes(*mem)
                );
            }
            for (pid, text) in &texts {
                outln!("worker pid {pid} says: {}", discover::printable(text));
            }
            if next_cron > 0 {
                let at = std::time::UNIX_EPOCH + Duration::from_millis(next_cron);
                let at: chrono::DateTime<chrono::Local> = at.into();
                println!(
                    "next cron_restart reload: {}",
                    at.format("%Y-%m-%d %H:%M:%S %Z")
                );
            }
        }
        Ok(())
    })
}

pub fn reload(args: AppArgs) -> ExitCode {
    run_client(async move {
        let r = reach(args.app.as_deref(), &args.bus).await?;
        let what = r.proxy.reload().await?;
        outln!("nodeherd: {what}");
        Ok(())
    })
}

pub fn restart(args: AppArgs) -> ExitCode {
    run_client(async move {
        let r = reach(args.app.as_deref(), &args.bus).await?;
        r.proxy.restart().await?;
        outln!("nodeherd: restarted");
        Ok(())
    })
}

/// How long `nodeherd reexec` waits for the new program to answer.
const REEXEC_WAIT: Duration = Duration::from_secs(30);

/// `nodeherd reexec`: ask the manager to re-exec, then wait until the new
/// program answers (its `Reexecs` count is one higher). The old program's
/// own answer may not get out before its exec ends its connections; the
/// count is what tells.
pub fn reexec(args: AppArgs) -> ExitCode {
    run_client(async move {
        let app = args.app.as_deref();
        let Reached { conn, proxy: p, .. } = reach(app, &args.bus).await?;
        let before = p.reexecs().await.ok();
        let t0 = std::time::Instant::now();
        let said = match p.reexec().await {
            Ok(m) => Some(m),
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.DBus.Error.UnknownMethod" =>
            {
                return Err(too_old());
            }
            Err(e @ (zbus::Error::MethodError(..) | zbus::Error::FDO(_))) if !is_no_reply(&e) => {
                if let zbus::Error::FDO(f) = &e
                    && matches!(**f, zbus::fdo::Error::UnknownMethod(_))
                {
                    return Err(too_old());
                }
                return Err(e.into());
            }
            // The connection went with the exec before the answer left.
            Err(_) => None,
        };
        drop(p);
        drop(conn);
        let Some(before) = before else {
            return Err(too_old());
        };
        let deadline = t0 + REEXEC_WAIT;
        loop {
            if let Ok(Reached { proxy: p, .. }) = reach(app, &args.bus).await
                && let Ok(n) = p.reexecs().await
            {
                if n > before {
                    outln!(
                        "nodeherd: {}; the new manager answered {} ms after the request",
                        said.as_deref().unwrap_or("re-executed"),
                        t0.elapsed().as_millis()
                    );
                    return Ok(());
                }
                // A manager that went between the two calls (the old
                // program's exec) tells nothing: ask again.
                if let Ok(state) = p.state().await
                    && state != "reexecuting"
                    && t0.elapsed() > Duration::from_millis(500)
                {
                    return Err(Failure(
                        1,
                        format!(
                            "the manager did not re-exec and runs on as it was (state {state}); \
                             see its journal (NODEHERD_EVENT=reexec-failed)"
                        ),
                    ));
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(Failure(
                    1,
                    format!(
                        "no manager answered within {} s of the re-exec; see its journal",
                        REEXEC_WAIT.as_secs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

fn too_old() -> Failure {
    Failure(
        6,
        "this manager is a version that cannot re-exec in place (no Reexec method); \
         restart it instead (systemctl restart nodeherd@APP)"
            .into(),
    )
}

/// The bus's answer for a call whose callee went away without answering.
fn is_no_reply(e: &zbus::Error) -> bool {
    match e {
        zbus::Error::MethodError(name, _, _) => {
            name.as_str() == "org.freedesktop.DBus.Error.NoReply"
        }
        zbus::Error::FDO(f) => matches!(**f, zbus::fdo::Error::NoReply(_)),
        _ => false,
    }
}

/// `N`, `+N`, `-N` or `max`.
#[derive(Debug, PartialEq, Eq)]
pub enum Count {
    To(i32),
    By(i32),
}

pub fn parse_count(s: &str, cpus: u32) -> Result<Count, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("max") {
        return Ok(Count::To(cpus.max(1) as i32));
    }
    let bad = || format!("{s:?} is not a count: give N, +N, -N or max");
    if let Some(rest) = s.strip_prefix('+') {
        return rest.parse::<i32>().map(Count::By).map_err(|_| bad());
    }
    if s.starts_with('-') {
        return s.parse::<i32>().map(Count::By).map_err(|_| bad());
    }
    s.parse::<i32>().map(Count::To).map_err(|_| bad())
}

pub fn scale(args: ScaleArgs) -> ExitCode {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let count = match parse_count(&args.count, cpus) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nodeherd: {e}");
            return ExitCode::from(2);
        }
    };
    run_client(async move {
        let r = reach(Some(&args.app), &args.bus).await?;
        let p = &r.proxy;
        let n = match count {
            Count::To(n) => p.scale(n).await?,
            Count::By(d) => p.scale_by(d).await?,
        };
        outln!(
            "nodeherd: {} now runs {n} worker(s)",
            discover::printable(&args.app)
        );
        Ok(())
    })
}

/// CPU % of each process over a quarter of a second (this host's /proc).
async fn cpu_percent(pids: impl Iterator<Item = u32>) -> std::collections::BTreeMap<u32, f64> {
    let pids: Vec<u32> = pids.filter(|p| *p > 0).collect();
    let first: Vec<f64> = pids
        .iter()
        .map(|p| crate::worker::process::cpu_seconds(*p as i32))
        .collect();
    let t0 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let wall = t0.elapsed().as_secs_f64();
    pids.iter()
        .zip(first)
        .map(|(p, before)| {
            let now = crate::worker::process::cpu_seconds(*p as i32);
            (*p, 100.0 * (now - before).max(0.0) / wall)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        assert_eq!(parse_count("4", 2), Ok(Count::To(4)));
        assert_eq!(parse_count("+2", 2), Ok(Count::By(2)));
        assert_eq!(parse_count("-1", 2), Ok(Count::By(-1)));
        assert_eq!(parse_count("max", 8), Ok(Count::To(8)));
        assert!(parse_count("many", 2).is_err());
        assert!(parse_count("", 2).is_err());
    }
}
