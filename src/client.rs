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

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use zbus::proxy;

use crate::cli::{AppArgs, BusArgs, ScaleArgs, StatusArgs};
use crate::dbus::{self, Bus, WorkerTuple};

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

pub(crate) fn run_client<F>(f: F) -> ExitCode
where
    F: std::future::Future<Output = Result<(), Failure>>,
{
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodeherd: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(f) {
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
enum Miss {
    Absent(Failure),
    Refused(Failure),
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

/// The manager of `app`: over the bus, or, when no bus answers for it, over
/// its own control socket (a container or a shell with no bus). Never the
/// control socket when the bus named another owner: that is the answer.
pub(crate) async fn reach(
    app: Option<&str>,
    bus: &BusArgs,
) -> Result<(zbus::Connection, Manager1Proxy<'static>), Failure> {
    let over_bus = async {
        let conn = connect(bus).await?;
        let p = proxy(&conn, app, bus).await?;
        Ok::<_, Miss>((conn.clone(), p))
    };
    match over_bus.await {
        Ok(found) => Ok(found),
        Err(Miss::Refused(e)) => Err(e),
        Err(Miss::Absent(e)) => {
            let found = find_control_socket(app)?;
            match found.sockets.as_slice() {
                [] if found.passed_over.is_empty() => Err(e),
                [] => Err(Failure(
                    3,
                    format!("{}; passed over: {}", e.1, found.passed_over.join("; ")),
                )),
                [one] => control_socket(one, &found.allowed).await,
                many => Err(Failure(
                    2,
                    format!(
                        "several managers have control sockets ({}): name the app",
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

/// Connect to a manager's control socket, peer to peer, once the peer is
/// known to be the process of the user who owns its directory.
async fn control_socket(
    found: &ControlSocket,
    allowed: &[u32],
) -> Result<(zbus::Connection, Manager1Proxy<'static>), Failure> {
    let path = &found.path;
    let fail = |e: String| {
        Failure(
            3,
            format!("cannot use the control socket {}: {e}", path.display()),
        )
    };
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let peer = stream
        .peer_cred()
        .map_err(|e| fail(format!("cannot tell who listens on it: {e}")))?;
    if peer.uid() != found.owner || !allowed.contains(&peer.uid()) {
        return Err(fail(format!(
            "uid {} listens on it, not uid {} whose directory it is in: not talking to it",
            peer.uid(),
            found.owner
        )));
    }
    let conn = zbus::connection::Builder::unix_stream(stream)
        .p2p()
        .method_timeout(Duration::from_secs(24 * 3600))
        .build()
        .await
        .map_err(|e| {
            fail(format!(
                "{e} (a manager answers only root, its own user and group {})",
                dbus::OPERATORS_GROUP
            ))
        })?;
    let p = Manager1Proxy::builder(&conn)
        // Peer to peer there is no bus to route by name; the manager ignores it.
        .destination("org.nodeherd.Manager")
        .map_err(|e| fail(e.to_string()))?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok((conn, p))
}

/// A control socket found on disk, in a directory of `owner`'s.
struct ControlSocket {
    path: PathBuf,
    owner: u32,
}

/// What a search for control sockets found.
struct Found {
    sockets: Vec<ControlSocket>,
    /// Managers' directories of users the caller does not trust, said so
    /// in the error when nothing else is found.
    passed_over: Vec<String>,
    /// The users whose managers the caller talks to.
    allowed: Vec<u32>,
}

/// The users whose manager of `app` a caller may talk to: itself, root
/// and the app's own user (`nodeherd-APP`, when the system has it).
fn trusted_users(app: Option<&str>) -> Vec<u32> {
    let mut allowed = vec![nix::unistd::geteuid().as_raw(), 0];
    if let Some(app) = app
        && let Ok(Some(u)) = nix::unistd::User::from_name(&dbus::user_for(app))
    {
        allowed.push(u.uid.as_raw());
    }
    allowed
}

/// The control socket of `app`'s manager (or of the only manager running,
/// without `app`), found in the places managers keep their private
/// directories: `$XDG_RUNTIME_DIR`, the temporary directory, and
/// `/run/nodeherd/*/` (the template unit's `RuntimeDirectory=`). Only a
/// directory of a trusted user ([`trusted_users`]) that nobody else may
/// write, holding a socket of that same user's, counts: in a shared
/// temporary directory any local user can make one named like the app's.
fn find_control_socket(app: Option<&str>) -> Result<Found, Failure> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut bases: Vec<PathBuf> = vec![crate::run::runtime_base(), std::env::temp_dir()];
    if let Ok(units) = std::fs::read_dir("/run/nodeherd") {
        bases.extend(units.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    bases.dedup();
    let prefix = app.map(crate::run::runtime_dir_prefix);
    let allowed = trusted_users(app);
    let mut found = Found {
        sockets: Vec::new(),
        passed_over: Vec::new(),
        allowed,
    };
    // The first place that has any is the answer: a user's own
    // $XDG_RUNTIME_DIR before the shared temporary directory.
    for base in bases {
        if !found.sockets.is_empty() {
            break;
        }
        let Ok(entries) = std::fs::read_dir(&base) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(pid) = crate::rundir::pid_in(&name, prefix.as_deref()) else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            // lstat: a symlink is not a manager's directory.
            let Ok(dir) = e.metadata() else {
                continue;
            };
            if !dir.is_dir() {
                continue;
            }
            if !found.allowed.contains(&dir.uid()) {
                found.passed_over.push(format!(
                    "{} belongs to uid {}, not to you, root or the app's user",
                    e.path().display(),
                    dir.uid()
                ));
                continue;
            }
            if dir.mode() & 0o022 != 0 {
                found
                    .passed_over
                    .push(format!("{} is writable by others", e.path().display()));
                continue;
            }
            let sock = e.path().join("control.sock");
            let is_theirs = std::fs::symlink_metadata(&sock)
                .is_ok_and(|m| m.file_type().is_socket() && m.uid() == dir.uid());
            if is_theirs && !found.sockets.iter().any(|c| c.path == sock) {
                found.sockets.push(ControlSocket {
                    path: sock,
                    owner: dir.uid(),
                });
            }
        }
    }
    Ok(found)
}

async fn connect(bus: &BusArgs) -> Result<zbus::Connection, Failure> {
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
                "several managers are running ({}): name the app",
                many.join(", ")
            ),
        )),
    }
}

async fn proxy(
    conn: &zbus::Connection,
    app: Option<&str>,
    bus: &BusArgs,
) -> Result<Manager1Proxy<'static>, Miss> {
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
    Ok(p)
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
        let (_conn, p) = reach(args.app.app.as_deref(), &args.app.bus).await?;
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
                "next_cron_reload_unix_ms": (next_cron > 0).then_some(next_cron),
            });
            println!("{doc}");
        } else {
            println!("{name}: {state} — {status}");
            println!(
                "{:>8}  {:>8}  {:<9}  {:>8}  {:>9}  {:>10}  {:>5}",
                "instance", "pid", "state", "restarts", "uptime", "memory", "cpu%"
            );
            let cpu = cpu_percent(workers.iter().map(|w| w.1)).await;
            for (i, pid, st, restarts, up, mem, _) in &workers {
                let cpu = cpu.get(pid).map_or("-".to_string(), |c| format!("{c:.1}"));
                let pid = if *pid == 0 {
                    "-".to_string()
                } else {
                    pid.to_string()
                };
                println!(
                    "{i:>8}  {pid:>8}  {st:<9}  {restarts:>8}  {:>9}  {:>10}  {cpu:>5}",
                    human_duration(*up),
                    human_bytes(*mem)
                );
            }
            for (pid, text) in &texts {
                println!("worker pid {pid} says: {text}");
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
        let (_conn, p) = reach(args.app.as_deref(), &args.bus).await?;
        let what = p.reload().await?;
        eprintln!("nodeherd: {what}");
        Ok(())
    })
}

pub fn restart(args: AppArgs) -> ExitCode {
    run_client(async move {
        let (_conn, p) = reach(args.app.as_deref(), &args.bus).await?;
        p.restart().await?;
        eprintln!("nodeherd: restarted");
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
        let (conn, p) = reach(app, &args.bus).await?;
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
            if let Ok((_c, p)) = reach(app, &args.bus).await
                && let Ok(n) = p.reexecs().await
            {
                if n > before {
                    eprintln!(
                        "nodeherd: {}; the new manager answered {} ms after the request",
                        said.as_deref().unwrap_or("re-executed"),
                        t0.elapsed().as_millis()
                    );
                    return Ok(());
                }
                let state = p.state().await.unwrap_or_default();
                if state != "reexecuting" && t0.elapsed() > Duration::from_millis(500) {
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
        let (_conn, p) = reach(Some(&args.app), &args.bus).await?;
        let n = match count {
            Count::To(n) => p.scale(n).await?,
            Count::By(d) => p.scale_by(d).await?,
        };
        eprintln!("nodeherd: {} now runs {n} worker(s)", args.app);
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

fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

fn human_bytes(b: u64) -> String {
    if b == 0 {
        return "-".into();
    }
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
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
