//! How a client reaches one manager: the bus connection, the manager's
//! proxy, who owns its name, and the failures with their exit statuses.
//! Below `discover` (which lists managers) and `client` (the commands).
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

use crate::cli::BusArgs;
use crate::dbus::{self, Bus, WorkerTuple};
#[proxy(interface = "org.nodeherd.Manager1", default_path = "/org/nodeherd")]
pub(crate) trait Manager1 {
    fn reload(&self) -> zbus::Result<String>;
    fn reload_canary(&self) -> zbus::Result<String>;
    fn rollback(&self, generation: u32) -> zbus::Result<String>;
    fn restart(&self) -> zbus::Result<()>;
    fn scale(&self, instances: i32) -> zbus::Result<i32>;
    fn scale_by(&self, delta: i32) -> zbus::Result<i32>;
    fn reexec(&self) -> zbus::Result<String>;
    fn drain(&self) -> zbus::Result<String>;
    fn undrain(&self) -> zbus::Result<String>;
    fn diagnose(&self, instance: u32, what: &str, seconds: u32, then: &str)
    -> zbus::Result<String>;
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
    fn last_autopsy(&self) -> zbus::Result<(u64, String)>;
    #[zbus(property)]
    fn worker_status_texts(&self) -> zbus::Result<Vec<(u32, String)>>;
    #[zbus(property)]
    fn cgroups(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn last_exits(&self) -> zbus::Result<Vec<(u32, String)>>;
    #[zbus(property)]
    fn autoscale(&self) -> zbus::Result<(u32, u32, u32, bool)>;
    #[zbus(property)]
    fn loop_delays(&self) -> zbus::Result<Vec<(u32, u32)>>;
    #[zbus(property)]
    fn request_outcomes(&self) -> zbus::Result<Vec<(u32, Vec<u64>)>>;
    #[zbus(property)]
    fn worker_releases(&self) -> zbus::Result<Vec<(u32, u64, String)>>;
    #[zbus(property)]
    fn history(&self) -> zbus::Result<String>;
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
