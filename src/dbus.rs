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
use crate::control::{
    BusSignal, Capture, Control, CtlError, Diagnosis, Handle, ScaleTarget, Snapshot,
};
use crate::logs;

/// Object path of the manager.
pub const PATH: &str = "/org/nodeherd";
/// Interface name.
pub const INTERFACE: &str = "org.nodeherd.Manager1";

/// `org.nodeherd.<label>`, where the label is the app name escaped the way
/// systemd escapes unit names in object paths, so that the mapping is one to
/// one and can be undone ([`app_for_bus_name`]): ASCII letters, digits and
/// `-` stay; every other byte, `_` included, becomes `_` and two lowercase
/// hex digits; a leading digit is escaped too (a bus name element must not
/// start with one). `my-app`, `my_app` and `my.app` become
/// `org.nodeherd.my-app`, `org.nodeherd.my_5fapp` and `org.nodeherd.my_2eapp`.
pub fn bus_name_for(app: &str) -> String {
    let mut s = String::with_capacity(app.len() + 8);
    for (i, b) in app.bytes().enumerate() {
        let keep = b.is_ascii_alphabetic() || b == b'-' || (b.is_ascii_digit() && i > 0);
        if keep {
            s.push(b as char);
        } else {
            s.push_str(&format!("_{b:02x}"));
        }
    }
    if s.is_empty() {
        // The empty app name; no valid name escapes to a lone `_`.
        s.push('_');
    }
    format!("{BUS_PREFIX}{s}")
}

/// `org.nodeherd.`, the prefix of every manager's bus name.
pub const BUS_PREFIX: &str = "org.nodeherd.";

/// The app whose bus name this is: the inverse of [`bus_name_for`]. `None`
/// for a name [`bus_name_for`] does not make.
pub fn app_for_bus_name(name: &str) -> Option<String> {
    let label = name.strip_prefix(BUS_PREFIX)?.as_bytes();
    if label == b"_" {
        return Some(String::new());
    }
    let mut out = Vec::with_capacity(label.len());
    let mut i = 0;
    while i < label.len() {
        let b = label[i];
        if b == b'_' {
            let hex = std::str::from_utf8(label.get(i + 1..i + 3)?).ok()?;
            if hex.bytes().any(|h| h.is_ascii_uppercase()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    let app = String::from_utf8(out).ok()?;
    (bus_name_for(&app) == name).then_some(app)
}

/// The system user an app runs as under the template unit
/// (`User=nodeherd-%i`), made by `nodeherd install`.
pub fn user_for(app: &str) -> String {
    format!("nodeherd-{app}")
}

/// The group whose members may reload, restart and scale every app when no
/// polkit decides (and, through the shipped polkit rule, when it does).
pub const OPERATORS_GROUP: &str = "nodeherd";

/// The system-bus policy for one app (`org.nodeherd.<label>.conf`): only
/// the app's own user (and root) may own its name; anyone may send it
/// `org.nodeherd.Manager1` calls, read its properties, introspect and ping
/// it. Every rule names the one destination and an interface, so nothing is
/// granted on any other name. The manager decides on each method call
/// (polkit, else root, its own user and group `nodeherd`).
pub fn bus_policy_for(app: &str) -> String {
    let name = bus_name_for(app);
    let user = user_for(app);
    let to = |iface: &str, member: Option<&str>| {
        format!(
            "    <allow send_destination=\"{name}\"\n           send_interface=\"{iface}\"{}/>\n",
            member.map_or(String::new(), |m| format!(" send_member=\"{m}\""))
        )
    };
    let mut s = String::new();
    s.push_str(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?> <!-- -*- XML -*- -->\n\
         <!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n \
         \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n",
    );
    s.push_str(&format!(
        "<!--\n  System bus policy of the nodeherd app \"{app}\" ({name}): one file\n  \
         per app, as `nodeherd install` writes them. Only its own user\n  \
         {user} (and root) may own the name. Anyone may send it\n  \
         org.nodeherd.Manager1 calls; the manager itself\n  \
         decides on Reload, Rollback, Restart, Scale, ScaleBy, Drain, Undrain and Diagnose (polkit actions\n  \
         org.nodeherd.reload/.restart/.scale; without polkitd: root, {user}\n  \
         and members of group {OPERATORS_GROUP}). Reading properties, introspecting and\n  \
         pinging are open. Every rule names this destination: nothing here reaches\n  \
         any other name on the bus.\n-->\n"
    ));
    s.push_str("<busconfig>\n");
    for who in [user.as_str(), "root"] {
        s.push_str(&format!(
            "  <policy user=\"{who}\">\n    <allow own=\"{name}\"/>\n  </policy>\n"
        ));
    }
    s.push_str("  <policy context=\"default\">\n");
    s.push_str(&to(INTERFACE, None));
    s.push_str(&to("org.freedesktop.DBus.Properties", Some("Get")));
    s.push_str(&to("org.freedesktop.DBus.Properties", Some("GetAll")));
    s.push_str(&to("org.freedesktop.DBus.Introspectable", None));
    s.push_str(&to("org.freedesktop.DBus.Peer", None));
    s.push_str("  </policy>\n</busconfig>\n");
    s
}

/// Errors on the bus, one D-Bus name per variant: `org.nodeherd.Error.*`,
/// and `org.freedesktop.DBus.Error.AccessDenied` for a caller the manager
/// refuses, as every system service answers then.
#[derive(Debug)]
pub enum BusError {
    ZBus(zbus::Error),
    AccessDenied(String),
    InvalidArgument(String),
    ReloadFailed(String),
    Busy(String),
    Stopping(String),
    Failed(String),
}

impl BusError {
    fn text(&self) -> String {
        match self {
            BusError::ZBus(e) => e.to_string(),
            BusError::AccessDenied(m)
            | BusError::InvalidArgument(m)
            | BusError::ReloadFailed(m)
            | BusError::Busy(m)
            | BusError::Stopping(m)
            | BusError::Failed(m) => m.clone(),
        }
    }
}

impl zbus::DBusError for BusError {
    fn create_reply(&self, hdr: &zbus::message::Header<'_>) -> zbus::Result<zbus::Message> {
        if let BusError::ZBus(zbus::Error::FDO(e)) = self {
            return e.create_reply(hdr);
        }
        zbus::Message::error(hdr, self.name())?.build(&(self.text(),))
    }

    fn name(&self) -> zbus::names::ErrorName<'_> {
        zbus::names::ErrorName::from_static_str_unchecked(match self {
            BusError::ZBus(_) => "org.freedesktop.zbus.Error",
            BusError::AccessDenied(_) => "org.freedesktop.DBus.Error.AccessDenied",
            BusError::InvalidArgument(_) => "org.nodeherd.Error.InvalidArgument",
            BusError::ReloadFailed(_) => "org.nodeherd.Error.ReloadFailed",
            BusError::Busy(_) => "org.nodeherd.Error.Busy",
            BusError::Stopping(_) => "org.nodeherd.Error.Stopping",
            BusError::Failed(_) => "org.nodeherd.Error.Failed",
        })
    }

    fn description(&self) -> Option<&str> {
        match self {
            BusError::ZBus(_) => None,
            BusError::AccessDenied(m)
            | BusError::InvalidArgument(m)
            | BusError::ReloadFailed(m)
            | BusError::Busy(m)
            | BusError::Stopping(m)
            | BusError::Failed(m) => Some(m),
        }
    }
}

impl std::fmt::Display for BusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use zbus::DBusError;
        write!(f, "{}: {}", self.name(), self.text())
    }
}

impl std::error::Error for BusError {}

impl From<zbus::Error> for BusError {
    fn from(e: zbus::Error) -> Self {
        BusError::ZBus(e)
    }
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
    /// The bus this object is served on (polkit is asked on the system bus only).
    bus: Bus,
    /// Peer to peer (the control socket): the uid of the process at the
    /// other end, from `SO_PEERCRED`.
    peer: Option<u32>,
}

impl Manager {
    async fn ask(&self, what: Control) -> Result<crate::control::Done, BusError> {
        self.handle.ask(what).await.map_err(BusError::from)
    }

    fn snap(&self) -> Snapshot {
        self.handle.snapshot.borrow().clone()
    }
}

/// What a caller asks to do; each is a polkit action `org.nodeherd.<id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Reload,
    Restart,
    Scale,
}

impl Action {
    pub fn id(self) -> &'static str {
        match self {
            Action::Reload => "org.nodeherd.reload",
            Action::Restart => "org.nodeherd.restart",
            Action::Scale => "org.nodeherd.scale",
        }
    }
}

/// May the sender of this call do `action`?
///
/// - Peer to peer (the control socket) there is no sender: the peer's
///   credentials (`SO_PEERCRED`) name the caller, and the same rule
///   applies without polkit: root, the manager's own user, group
///   `nodeherd`. (The socket's mode, 0600 in a 0700 directory, lets only
///   the first two in to begin with; this holds if it is ever opened up.)
/// - root and the manager's own user (its `ExecReload=`, and its own
///   workers, which can signal it anyway) may.
/// - On the system bus, when polkitd is there and lets this manager's user
///   ask about others (root, or a user the actions name as owner), polkit
///   decides (action `org.nodeherd.reload`, `.restart`, `.scale`; the
///   caller is named by its unique bus name, so polkit checks that
///   connection's own credentials).
/// - Otherwise (no polkitd, another bus, or polkit will not answer this
///   user): members of group `nodeherd`, from the group database, as
///   polkit's own `isInGroup` does.
///
/// Anyone else gets `org.freedesktop.DBus.Error.AccessDenied` naming the action.
async fn authorize(
    conn: &zbus::Connection,
    hdr: &zbus::message::Header<'_>,
    action: Action,
    bus: &Bus,
    peer: Option<u32>,
) -> Result<(), BusError> {
    let denied = |why: String| BusError::AccessDenied(format!("{}: {why}", action.id()));
    if !conn.is_bus() {
        let Some(uid) = peer else {
            return Err(denied("the caller's credentials are unknown".into()));
        };
        if peer_may_control(uid).await {
            return Ok(());
        }
        return Err(denied(format!(
            "uid {uid} is neither root, the app's own user nor a member of group {OPERATORS_GROUP}"
        )));
    }
    let Some(sender) = hdr.sender() else {
        return Err(denied("the call has no sender".into()));
    };
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    let uid = dbus
        .get_connection_unix_user(zbus::names::BusName::Unique(sender.clone()))
        .await
        .map_err(|e| denied(format!("cannot tell who {sender} is: {e}")))?;
    let me = nix::unistd::geteuid().as_raw();
    if uid == 0 || uid == me {
        return Ok(());
    }
    if *bus == Bus::System {
        match polkit_check(conn, sender.as_str(), action, hdr).await {
            Polkit::Yes => return Ok(()),
            Polkit::Challenge => {
                return Err(denied(format!(
                    "uid {uid} needs to authenticate (polkit); run it as root, or ask for group {OPERATORS_GROUP}"
                )));
            }
            Polkit::No => {
                return Err(denied(format!(
                    "uid {uid} is not authorized (polkit); root and members of group {OPERATORS_GROUP} are"
                )));
            }
            Polkit::Error(e) => return Err(denied(format!("polkit could not decide: {e}"))),
            Polkit::NotPermitted => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    logs::warn(&format!(
                        "polkit does not let uid {me} ask about other callers (polkit answers only \
                         root and the users named by the org.freedesktop.policykit.owner annotation \
                         of the org.nodeherd.* actions): deciding by group {OPERATORS_GROUP} instead"
                    ))
                });
            }
            Polkit::Absent => {}
        }
    }
    if in_group(uid, OPERATORS_GROUP) {
        return Ok(());
    }
    Err(denied(format!(
        "uid {uid} is neither root, the app's own user nor a member of group {OPERATORS_GROUP}"
    )))
}

enum Polkit {
    Yes,
    Challenge,
    No,
    /// No polkitd on this bus: fall back to the group check.
    Absent,
    /// polkitd is there but answers only root and the actions' owners
    /// (`org.freedesktop.policykit.owner`) about other callers: the group check.
    NotPermitted,
    Error(String),
}

/// `org.freedesktop.PolicyKit1.Authority.CheckAuthorization` for the
/// connection `sender`, allowing interaction when the caller asked for it
/// (`ALLOW_INTERACTIVE_AUTHORIZATION` in the call's flags).
async fn polkit_check(
    conn: &zbus::Connection,
    sender: &str,
    action: Action,
    hdr: &zbus::message::Header<'_>,
) -> Polkit {
    use std::collections::HashMap;
    use zbus::zvariant::Value;
    let interactive = hdr
        .primary()
        .flags()
        .contains(zbus::message::Flags::AllowInteractiveAuth);
    let mut subject: HashMap<&str, Value<'_>> = HashMap::new();
    subject.insert("name", Value::from(sender));
    let details: HashMap<&str, &str> = HashMap::new();
    let args = (
        ("system-bus-name", subject),
        action.id(),
        details,
        u32::from(interactive),
        "",
    );
    let call = conn.call_method(
        Some("org.freedesktop.PolicyKit1"),
        "/org/freedesktop/PolicyKit1/Authority",
        Some("org.freedesktop.PolicyKit1.Authority"),
        "CheckAuthorization",
        &args,
    );
    // An interactive check waits for the person; otherwise polkit answers at once.
    let limit = Duration::from_secs(if interactive { 300 } else { 25 });
    let reply = match tokio::time::timeout(limit, call).await {
        Err(_) => return Polkit::Error("no answer from polkitd".into()),
        Ok(r) => r,
    };
    match reply {
        Ok(m) => match m
            .body()
            .deserialize::<(bool, bool, HashMap<String, String>)>()
        {
            Ok((true, _, _)) => Polkit::Yes,
            Ok((false, true, _)) => Polkit::Challenge,
            Ok((false, false, _)) => Polkit::No,
            Err(e) => Polkit::Error(e.to_string()),
        },
        Err(zbus::Error::MethodError(name, msg, _)) => match name.as_str() {
            "org.freedesktop.DBus.Error.ServiceUnknown"
            | "org.freedesktop.DBus.Error.NameHasNoOwner" => Polkit::Absent,
            n if n.starts_with("org.freedesktop.DBus.Error.Spawn") => Polkit::Absent,
            "org.freedesktop.PolicyKit1.Error.NotAuthorized" => Polkit::NotPermitted,
            _ => Polkit::Error(format!("{name}: {}", msg.unwrap_or_default())),
        },
        Err(zbus::Error::FDO(e))
            if matches!(
                *e,
                zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_)
            ) =>
        {
            Polkit::Absent
        }
        Err(e) => Polkit::Error(e.to_string()),
    }
}

/// May a peer-to-peer caller (the control socket) read and control this
/// manager: root, its own user, or a member of group `nodeherd`. The group
/// database may be slow (LDAP): it is read off the supervisor's thread.
async fn peer_may_control(uid: u32) -> bool {
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        return true;
    }
    tokio::task::spawn_blocking(move || in_group(uid, OPERATORS_GROUP))
        .await
        .unwrap_or(false)
}

/// Is `uid` in `group` by the group database (primary group or member list)?
pub fn in_group(uid: u32, group: &str) -> bool {
    use nix::unistd::{Group, Uid, User};
    let Ok(Some(g)) = Group::from_name(group) else {
        return false;
    };
    let Ok(Some(u)) = User::from_uid(Uid::from_raw(uid)) else {
        return false;
    };
    u.gid == g.gid || g.mem.contains(&u.name)
}

#[interface(name = "org.nodeherd.Manager1")]
impl Manager {
    /// Replace every worker, `reload_parallel` (2) at a time, each old
    /// worker stopping only once its replacement is ready. Returns when the
    /// swap is complete and every old worker has exited; fails with
    /// ReloadFailed, old workers still serving, when a replacement does not
    /// become ready.
    async fn reload(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<String, BusError> {
        authorize(conn, &hdr, Action::Reload, &self.bus, self.peer).await?;
        self.ask(Control::Reload).await.map(|d| d.message)
    }

    /// Reload judged by a canary beside a fresh baseline first, whatever
    /// `reload_strategy` says; fails with ReloadFailed, naming the figures,
    /// when the canary was rolled back. Authorized as Reload.
    async fn reload_canary(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<String, BusError> {
        authorize(conn, &hdr, Action::Reload, &self.bus, self.peer).await?;
        self.ask(Control::ReloadCanary).await.map(|d| d.message)
    }

    /// Reload back to generation `generation` of the release history (0:
    /// the one that served before the one in force), its files as they
    /// were pinned, the same zero-downtime way (with the canary if the
    /// configuration in force judges reloads so). Fails with ReloadFailed,
    /// nothing changed, when that generation is not kept or its files are
    /// gone. Authorized as Reload.
    async fn rollback(
        &self,
        generation: u32,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<String, BusError> {
        authorize(conn, &hdr, Action::Reload, &self.bus, self.peer).await?;
        self.ask(Control::Rollback(u64::from(generation)))
            .await
            .map(|d| d.message)
    }

    /// Stop every worker and start a fresh set; clears errored slots.
    async fn restart(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), BusError> {
        authorize(conn, &hdr, Action::Restart, &self.bus, self.peer).await?;
        self.ask(Control::Restart).await.map(|_| ())
    }

    /// Set the number of workers (1 to 1024); returns the new count once the
    /// added workers are ready.
    async fn scale(
        &self,
        instances: i32,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<i32, BusError> {
        authorize(conn, &hdr, Action::Scale, &self.bus, self.peer).await?;
        self.ask(Control::Scale(ScaleTarget::To(i64::from(instances))))
            .await
            .map(|d| d.workers)
    }

    /// Replace the manager's program with the file it was started from, as
    /// that file is now (a package upgrade put a new one there), keeping
    /// its pid, its sockets and every worker. The new program is run first
    /// to check it reads this manager's state; if not, fails with Failed
    /// and nothing changes. Waits for a running operation; while it runs,
    /// other requests are refused as Busy. Returns just before the exec;
    /// the new program answers moments later, its `Reexecs` one higher.
    async fn reexec(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<String, BusError> {
        authorize(conn, &hdr, Action::Restart, &self.bus, self.peer).await?;
        self.ask(Control::Reexec).await.map(|d| d.message)
    }

    /// Say "drain" on the health endpoint (503, agent-check `drain`) so a
    /// load balancer takes this host out; every worker keeps serving.
    /// Answered at once; lasts until Undrain (or the manager stops, and
    /// across a re-exec). Authorized as Restart.
    async fn drain(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<String, BusError> {
        authorize(conn, &hdr, Action::Restart, &self.bus, self.peer).await?;
        self.ask(Control::Drain).await.map(|d| d.message)
    }

    /// End a drain Drain asked for: the health endpoint answers by the
    /// ready workers again. Fails with Stopping while the manager drains
    /// before a stop (`drain_before_stop`). Authorized as Restart.
    async fn undrain(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<String, BusError> {
        authorize(conn, &hdr, Action::Restart, &self.bus, self.peer).await?;
        self.ask(Control::Undrain).await.map(|d| d.message)
    }

    /// Take worker `instance` out of rotation the zero-downtime way (a
    /// replacement starts in its slot and serves first; it stops accepting
    /// and finishes what it holds), capture `what` (`heap-snapshot`,
    /// `cpu-profile` for `seconds`, `stack`) into a file under the state
    /// directory owned by the app's user, then stop it (`then`:
    /// `replace`; returns the file's path once the worker is gone), or,
    /// with `then` = `resume`, capture it in place without a replacement
    /// and put it back into rotation (returns once it listens again).
    /// Authorized as Restart.
    async fn diagnose(
        &self,
        instance: u32,
        what: &str,
        seconds: u32,
        then: &str,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<String, BusError> {
        authorize(conn, &hdr, Action::Restart, &self.bus, self.peer).await?;
        let capture = match what {
            "heap-snapshot" => Capture::HeapSnapshot,
            "cpu-profile" => Capture::CpuProfile(seconds),
            "stack" => Capture::Stack,
            other => {
                return Err(BusError::InvalidArgument(format!(
                    "cannot capture {:?}: heap-snapshot, cpu-profile or stack",
                    crate::logs::clean(other, 40)
                )));
            }
        };
        let resume = match then {
            "replace" => false,
            "resume" => true,
            other => {
                return Err(BusError::InvalidArgument(format!(
                    "--then {:?}: `replace` (the worker is stopped once captured) or `resume` (it goes back into rotation)",
                    crate::logs::clean(other, 40)
                )));
            }
        };
        self.ask(Control::Diagnose(Diagnosis {
            instance,
            capture,
            resume,
        }))
        .await
        .map(|d| d.message)
    }

    /// Close every log file the manager writes (`out_file`, `error_file`,
    /// `log_file`) and open its path again, for an outside logrotate that
    /// renamed them (as SIGUSR1 does). Returns how many are open; fails
    /// with Failed naming the files that cannot be opened (their lines go
    /// to the journal meanwhile). Authorized as Reload.
    async fn reopen_logs(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<String, BusError> {
        authorize(conn, &hdr, Action::Reload, &self.bus, self.peer).await?;
        logs::reopen_and_wait("ReopenLogs")
            .await
            .map_err(BusError::Failed)
    }

    /// How many times this manager replaced its program in place.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn reexecs(&self) -> u32 {
        u32::try_from(self.snap().counters.reexecs).unwrap_or(u32::MAX)
    }

    /// The version of the program the manager runs.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// Add (or with a negative delta, remove) workers; returns the new count.
    async fn scale_by(
        &self,
        delta: i32,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<i32, BusError> {
        authorize(conn, &hdr, Action::Scale, &self.bus, self.peer).await?;
        self.ask(Control::Scale(ScaleTarget::By(i64::from(delta))))
            .await
            .map(|d| d.workers)
    }

    /// The app's name.
    #[zbus(property)]
    async fn name(&self) -> String {
        self.snap().name
    }

    /// starting, ready, reloading, reexecuting, degraded or stopping.
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
                    crate::worker::cgroup::worker_memory_bytes(w.pid)
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

    /// When `cron_restart` next reloads the app, in milliseconds since the
    /// epoch; 0 when it has no schedule.
    #[zbus(property)]
    async fn next_cron_reload(&self) -> u64 {
        self.snap().next_cron_reload_ms.unwrap_or(0)
    }

    /// When the last worker stack was taken (ms since the epoch) and the
    /// file it is kept in; (0, "") when none was.
    #[zbus(property)]
    async fn last_autopsy(&self) -> (u64, String) {
        self.snap().last_autopsy.map_or((0, String::new()), |t| {
            (t.at_ms, t.path.display().to_string())
        })
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

    /// Each worker's request outcomes as its preload last reported them:
    /// (pid, counts), the counts being responses by status class (1xx to
    /// 5xx), by latency bucket (≤ 5, 10, 25, 50, 100, 250, 500, 1000, 2500,
    /// 5000, 10000 ms, more), the sum of latencies in µs, uncaught
    /// exceptions, unhandled rejections. Read it; no PropertiesChanged.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn request_outcomes(&self) -> Vec<(u32, Vec<u64>)> {
        self.snap()
            .workers
            .into_iter()
            .filter_map(|w| Some((w.pid.max(0) as u32, w.outcomes?.flat())))
            .collect()
    }

    /// Each worker's configuration generation and what its Node binary
    /// said to `--version` ("" if not Node or unknown): (pid, generation, version).
    #[zbus(property)]
    async fn worker_releases(&self) -> Vec<(u32, u64, String)> {
        self.snap()
            .workers
            .into_iter()
            .filter(|w| w.pid > 0)
            .map(|w| {
                (
                    w.pid as u32,
                    w.generation.unwrap_or(0),
                    w.node.unwrap_or_default(),
                )
            })
            .collect()
    }

    /// The release history, JSON: one object per generation kept (number,
    /// when, outcome, the resolved script, directory and interpreter, Node
    /// version; never the environment or arguments).
    #[zbus(property)]
    async fn history(&self) -> String {
        self.snap().history.to_string()
    }

    /// Autoscaling (`instances: {min, max}`): (min, max, the most workers
    /// it would run now, pinned by a manual scale); (0, 0, 0, false) when off.
    #[zbus(property)]
    async fn autoscale(&self) -> (u32, u32, u32, bool) {
        self.snap()
            .autoscale
            .map_or((0, 0, 0, false), |a| (a.min, a.max, a.ceiling, a.pinned))
    }

    /// How each slot's last worker that died unexpectedly went:
    /// (instance, `crashed` or `oom-killed`), for the slots that had one.
    #[zbus(property)]
    async fn last_exits(&self) -> Vec<(u32, String)> {
        let mut seen = std::collections::BTreeMap::new();
        for w in self.snap().workers {
            if let Some(why) = w.last_exit {
                seen.insert(w.instance, why.to_string());
            }
        }
        seen.into_iter().collect()
    }

    /// Whether each worker runs in a cgroup of its own, and which limits
    /// apply; or why not ("per-worker cgroups off: ...").
    #[zbus(property(emits_changed_signal = "const"))]
    async fn cgroups(&self) -> String {
        crate::worker::cgroup::summary()
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

/// What became of the first attempt to take the bus name, made before any
/// worker starts.
pub enum Claim {
    /// The name is ours and the interface served.
    Owned(zbus::Connection),
    /// No bus (yet), or no bus wanted: the background loop keeps trying.
    Later,
    /// The bus answered, and the name is not ours to take: someone else owns
    /// it, or the policy does not let this user own it. The text says who
    /// and what to do.
    Refused(String),
}

/// Try once to take `name` and serve the interface.
pub async fn claim(bus: &Bus, name: &str, handle: Handle) -> Claim {
    if *bus == Bus::None {
        return Claim::Later;
    }
    match connect(bus, name, handle).await {
        Ok(conn) => Claim::Owned(conn),
        Err(e) => match refusal(bus, name, &e).await {
            Some(why) => Claim::Refused(why),
            None => Claim::Later,
        },
    }
}

/// When `e` (from taking `name`) means the bus is there but the name is
/// not ours: why, naming the owner or the policy.
async fn refusal(bus: &Bus, name: &str, e: &zbus::Error) -> Option<String> {
    let denied = match e {
        zbus::Error::NameTaken => false,
        zbus::Error::MethodError(n, _, _)
            if n.as_str() == "org.freedesktop.DBus.Error.AccessDenied" =>
        {
            true
        }
        zbus::Error::FDO(f) if matches!(**f, zbus::fdo::Error::AccessDenied(_)) => true,
        _ => return None,
    };
    let me = nix::unistd::geteuid().as_raw();
    let me_name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(me))
        .ok()
        .flatten()
        .map_or_else(
            || format!("uid {me}"),
            |u| format!("user {} (uid {me})", u.name),
        );
    if denied {
        return Some(format!(
            "the {} bus does not let {me_name} own {name} ({e}); its policy must allow it: \
             `nodeherd install` writes /etc/dbus-1/system.d/{name}.conf for the app's user",
            describe(bus)
        ));
    }
    Some(format!(
        "{name} is already owned on the {} bus by {}; refusing to run beside it, as `systemctl reload` and \
         nodeherd's clients would be talking to that process",
        describe(bus),
        describe_owner(bus, name).await
    ))
}

/// "connection :1.N (pid P, uid U)", as far as the bus tells.
pub async fn describe_owner(bus: &Bus, name: &str) -> String {
    let found = async {
        let conn = builder(bus)?.build().await?;
        let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
        let bn = zbus::names::BusName::try_from(name.to_string())?;
        let owner = dbus.get_name_owner(bn).await?;
        let on = zbus::names::BusName::Unique(owner.clone().into_inner());
        let pid = dbus.get_connection_unix_process_id(on.clone()).await.ok();
        let uid = dbus.get_connection_unix_user(on).await.ok();
        Ok::<_, zbus::Error>(format!(
            "connection {owner} (pid {}, uid {})",
            pid.map_or("?".into(), |p| p.to_string()),
            uid.map_or("?".into(), |u| u.to_string())
        ))
    };
    match tokio::time::timeout(Duration::from_secs(5), found).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => format!("another connection ({e})"),
        Err(_) => "another connection".into(),
    }
}

/// Serve the interface under `name` and forward signals, starting from the
/// connection [`claim`] made, if it made one.
///
/// Losing the bus is not fatal: the manager runs on without a control plane,
/// says so once, and keeps trying in the background (the bus may start
/// after us, or restart under us), reconnecting with a backoff of up to 30 s.
pub async fn serve(bus: Bus, name: String, handle: Handle, first: Option<zbus::Connection>) {
    let mut signals = handle.signals.subscribe();
    if bus == Bus::None {
        logs::info("control plane off (--no-bus)");
        return;
    }
    let mut said_off = false;
    let mut backoff = Duration::from_millis(250);
    let mut first = first;
    loop {
        let attempt = match first.take() {
            Some(conn) => Ok(conn),
            None => connect(&bus, &name, handle.clone()).await,
        };
        match attempt {
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
                let why = match refusal(&bus, &name, &e).await {
                    Some(why) => why,
                    None => format!("cannot serve {name} on the {} bus: {e}", describe(&bus)),
                };
                logs::warn(&format!(
                    "control plane off: {why}. Workers run on; nodeherd status/reload/scale/restart reach the manager through its control socket, and SIGHUP reloads. Retrying in the background"
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
    let conn = builder(bus)?
        .serve_at(
            PATH,
            Manager {
                handle,
                bus: bus.clone(),
                peer: None,
            },
        )?
        .build()
        .await?;
    // Never queue behind another owner (zbus's builder would, silently): a
    // name held by someone else is an error here, `NameTaken`.
    conn.request_name_with_flags(name, zbus::fdo::RequestNameFlags::DoNotQueue.into())
        .await?;
    Ok(conn)
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
                    let releases = |s: &Snapshot| -> Vec<(i32, Option<u64>, Option<String>)> {
                        s.workers
                            .iter()
                            .map(|w| (w.pid, w.generation, w.node.clone()))
                            .collect()
                    };
                    if releases(&now) != releases(&last) {
                        let _ = m.worker_releases_changed(emitter).await;
                    }
                }
                if now.history != last.history {
                    let _ = m.history_changed(emitter).await;
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
/// at least as narrow as the bus policy. Each peer's credentials are
/// checked as well ([`serve_control_socket`]).
pub fn bind_control_socket(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serve `org.nodeherd.Manager1` to each client of the control socket
/// that may read and control this manager ([`peer_may_control`]); anyone
/// else is hung up on before a word is read, and said so once.
pub async fn serve_control_socket(listener: tokio::net::UnixListener, handle: Handle) {
    let mut refused_said = std::collections::BTreeSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                logs::warn(&format!("control socket: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let uid = match stream.peer_cred() {
            Ok(c) => c.uid(),
            Err(e) => {
                logs::warn(&format!("control socket: cannot tell who connected: {e}"));
                continue;
            }
        };
        let handle = handle.clone();
        if !peer_may_control(uid).await {
            if refused_said.len() < 64 && refused_said.insert(uid) {
                logs::warn(&format!(
                    "control socket: refused uid {uid}, neither root, this manager's user nor a \
                     member of group {OPERATORS_GROUP}"
                ));
            }
            continue;
        }
        tokio::spawn(async move {
            let built = async {
                connection::Builder::unix_stream(stream)
                    .server(zbus::Guid::generate())?
                    .p2p()
                    .serve_at(
                        PATH,
                        Manager {
                            handle: handle.clone(),
                            bus: Bus::None,
                            peer: Some(uid),
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
    fn bus_names_are_valid_and_one_to_one() {
        let cases = [
            ("api", "org.nodeherd.api"),
            ("my-app", "org.nodeherd.my-app"),
            ("my_app", "org.nodeherd.my_5fapp"),
            ("my.app", "org.nodeherd.my_2eapp"),
            ("my-app.v2", "org.nodeherd.my-app_2ev2"),
            ("2fast", "org.nodeherd._32fast"),
            ("ünï", "org.nodeherd._c3_bcn_c3_af"),
            ("", "org.nodeherd._"),
        ];
        for (app, name) in cases {
            assert_eq!(bus_name_for(app), name);
            assert!(zbus::names::WellKnownName::try_from(name).is_ok(), "{name}");
            assert_eq!(app_for_bus_name(name).as_deref(), Some(app), "{name}");
        }
        for foreign in [
            "org.nodeherd.my_app",
            "org.nodeherd.A_5F",
            "org.nodeherd.x_2",
            "org.nodeherd.1a",
            "org.nodeherd.a.b",
            "org.other.api",
        ] {
            assert_eq!(app_for_bus_name(foreign), None, "{foreign}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_two_app_names_get_two_valid_bus_names(a in ".{0,24}", b in ".{0,24}") {
            let (na, nb) = (bus_name_for(&a), bus_name_for(&b));
            proptest::prop_assert!(zbus::names::WellKnownName::try_from(na.as_str()).is_ok(), "{}", na);
            proptest::prop_assert_eq!(app_for_bus_name(&na), Some(a.clone()));
            proptest::prop_assert_eq!(a == b, na == nb);
        }
    }

    #[test]
    fn the_shipped_policy_is_the_example_apps() {
        assert_eq!(
            include_str!("../packaging/dbus/org.nodeherd.conf"),
            bus_policy_for("hello")
        );
    }

    #[test]
    fn the_policy_names_one_destination_and_no_prefix() {
        let p = bus_policy_for("my_app");
        assert!(!p.contains("prefix"), "{p}");
        for line in p.lines().filter(|l| l.contains("<allow send_")) {
            assert!(
                line.contains("send_destination=\"org.nodeherd.my_5fapp\""),
                "{line}"
            );
        }
        assert_eq!(p.matches("send_interface=").count(), 5, "{p}");
        assert_eq!(
            p.matches("<allow own=\"org.nodeherd.my_5fapp\"/>").count(),
            2,
            "{p}"
        );
        assert!(p.contains("<policy user=\"nodeherd-my_app\">"), "{p}");
    }
}
