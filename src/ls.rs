//! `nodeherd ls`: every nodeherd app on this host, as `pm2 ls` lists PM2's.
//!
//! An app shows once, whatever found it: its configuration in
//! `/etc/nodeherd`, its units systemd knows (`nodeherd@APP.service` and
//! `.socket`, `nodeherd-APP.service` from `nodeherd start`), and its
//! running manager (on the bus, or by its control socket). What a running
//! manager says (state, workers, restarts, memory) comes from it; its pid
//! from the bus's or the kernel's credentials. Without systemd, installed
//! apps show as `stopped` and running managers as they are.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::LsArgs;
use crate::client::{Failure, Via, outln, run_client};
use crate::discover::{self, Unit, printable};

/// One app, from whatever found it.
#[derive(Default)]
struct Row {
    config: Option<PathBuf>,
    service: Option<Unit>,
    socket: Option<Unit>,
    transient: Option<Unit>,
    manager: Option<Manager>,
    /// A manager that was found and did not answer in time.
    silent: bool,
}

/// What a running manager said, and who it is.
struct Manager {
    pid: Option<u32>,
    via: Via,
    state: String,
    instances: i32,
    ready: i32,
    restarts: u32,
    memory: u64,
}

impl Row {
    /// The app's state in a word: the manager's own when it runs, else
    /// what systemd says of its units (`listening`: the socket waits for
    /// the first connection to start it), else `stopped`.
    fn state(&self) -> String {
        if let Some(m) = &self.manager {
            return m.state.clone();
        }
        if self.silent {
            return "not answering".into();
        }
        let units = [&self.service, &self.transient];
        if let Some(u) = units.iter().filter_map(|u| u.as_ref()).find(|u| u.is_up()) {
            return u.active.clone();
        }
        if units
            .iter()
            .filter_map(|u| u.as_ref())
            .any(|u| u.active == "failed")
        {
            return "failed".into();
        }
        if self.socket.as_ref().is_some_and(Unit::is_up) {
            return "listening".into();
        }
        "stopped".into()
    }

    /// Where it runs, or is installed.
    fn place(&self) -> String {
        if let Some(u) = self.service.as_ref().filter(|u| u.is_up()) {
            return u.name.clone();
        }
        if let Some(u) = &self.transient {
            return format!("{} (nodeherd start)", u.name);
        }
        if let Some(m) = &self.manager {
            return match &m.via {
                Via::Bus(name) => format!("by hand, bus name {name}"),
                Via::Socket(_) => "by hand, control socket".into(),
            };
        }
        if let Some(u) = self.socket.as_ref().or(self.service.as_ref()) {
            return u.name.clone();
        }
        self.config
            .as_ref()
            .map_or_else(String::new, |c| c.display().to_string())
    }
}

pub fn ls(args: LsArgs) -> ExitCode {
    run_client(async move {
        let mut rows: BTreeMap<String, Row> = BTreeMap::new();
        for (app, config) in discover::configs(&args.config_dir) {
            rows.entry(app).or_default().config = Some(config);
        }
        let units = discover::units().await;
        for u in units.iter().flatten() {
            let Some((app, transient)) = discover::app_of_unit(&u.name) else {
                continue;
            };
            let row = rows.entry(app).or_default();
            if transient {
                row.transient = Some(u.clone());
            } else if u.name.ends_with(".socket") {
                row.socket = Some(u.clone());
            } else {
                row.service = Some(u.clone());
            }
        }
        let (running, notes) = discover::running(&args.bus).await;
        for r in running {
            let said = tokio::time::timeout(discover::ANSWER, describe(&r.reached)).await;
            let row = rows.entry(r.app.clone()).or_default();
            match said {
                Ok(Ok(m)) => row.manager = Some(m),
                _ => row.silent = true,
            }
        }
        if args.json {
            print_json(&rows, units.is_some());
        } else {
            print_table(&rows);
            if units.is_none() && discover::systemd_booted() {
                eprintln!("nodeherd: systemd did not answer: units are not listed");
            }
        }
        for n in notes {
            eprintln!("nodeherd: passed over: {}", printable(&n));
        }
        Ok::<(), Failure>(())
    })
}

/// Ask a running manager what the listing shows.
async fn describe(r: &crate::client::Reached) -> Result<Manager, Failure> {
    let p = &r.proxy;
    let workers = p.workers().await?;
    Ok(Manager {
        pid: r.pid,
        via: r.via.clone(),
        state: p.state().await?,
        instances: p.instances().await?,
        ready: p.ready_workers().await?,
        restarts: workers.iter().map(|w| w.3).sum(),
        memory: workers.iter().map(|w| w.5).sum(),
    })
}

fn print_table(rows: &BTreeMap<String, Row>) {
    if rows.is_empty() {
        outln!("no nodeherd app on this host (none installed in /etc/nodeherd, none running)");
        return;
    }
    let width = rows
        .keys()
        .map(|a| printable(a).chars().count())
        .max()
        .unwrap_or(3)
        .max(3);
    outln!(
        "{:<width$}  {:<13}  {:>7}  {:>8}  {:>10}  {:>8}  where",
        "app",
        "state",
        "workers",
        "restarts",
        "memory",
        "pid"
    );
    for (app, row) in rows {
        let (workers, restarts, memory, pid) = match &row.manager {
            Some(m) => (
                format!("{}/{}", m.ready, m.instances),
                m.restarts.to_string(),
                crate::human::bytes(m.memory),
                m.pid.map_or("?".into(), |p| p.to_string()),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        outln!(
            "{:<width$}  {:<13}  {workers:>7}  {restarts:>8}  {memory:>10}  {pid:>8}  {}",
            printable(app),
            row.state(),
            row.place()
        );
    }
}

fn print_json(rows: &BTreeMap<String, Row>, systemd: bool) {
    let unit = |u: &Option<Unit>| {
        u.as_ref()
            .map(|u| serde_json::json!({ "name": u.name, "active": u.active, "sub": u.sub }))
    };
    let apps: Vec<serde_json::Value> = rows
        .iter()
        .map(|(app, row)| {
            let m = row.manager.as_ref();
            serde_json::json!({
                "name": app,
                "state": row.state(),
                "instances": m.map(|m| m.instances),
                "ready_workers": m.map(|m| m.ready),
                "restarts": m.map(|m| m.restarts),
                "memory_bytes": m.map(|m| m.memory),
                "manager_pid": m.and_then(|m| m.pid),
                "via": m.map(|m| m.via.to_json()),
                "config": row.config,
                "service": unit(&row.service),
                "socket": unit(&row.socket),
                "transient_unit": unit(&row.transient),
            })
        })
        .collect();
    outln!(
        "{}",
        serde_json::json!({ "apps": apps, "systemd": systemd })
    );
}
