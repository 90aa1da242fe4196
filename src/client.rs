//! `nodeherd status|reload|restart|scale`: thin D-Bus clients for people.
//!
//! Exit status: 0 done, 1 the operation failed, 2 bad usage or an invalid
//! argument, 3 no manager reachable (or the name's owner is not the app's
//! manager), 4 busy, 5 access denied, 6 the running manager is a version
//! that cannot do this (`reexec` of a manager older than re-exec in place).
//! How a manager is reached and trusted: `crate::link`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::{AppArgs, BusArgs, ScaleArgs, StatusArgs};
use crate::discover;
pub(crate) use crate::link::{
    Failure, Manager1Proxy, Miss, Reached, Via, block_on, connect, outln, proxy, run_client,
};
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
        let autopsy = p.last_autopsy().await.unwrap_or_default();
        // Nor this one (request outcomes, by pid).
        let outcomes: std::collections::BTreeMap<u32, crate::outcomes::Outcomes> = p
            .request_outcomes()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(pid, flat)| Some((pid, crate::outcomes::Outcomes::from_flat(&flat)?)))
            .collect();
        // Older managers have no such property: no line then.
        let cgroups = p.cgroups().await.ok();
        // Nor this one (generation and Node version, by pid).
        let releases: std::collections::BTreeMap<u32, (u64, String)> = p
            .worker_releases()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|(pid, g, node)| (pid, (g, node)))
            .collect();
        // Nor this one.
        let last_exits: std::collections::BTreeMap<u32, String> = p
            .last_exits()
            .await
            .unwrap_or_default()
            .into_iter()
            .collect();
        // Nor this one; max 0: autoscaling is off.
        let autoscale = p.autoscale().await.ok().filter(|a| a.1 > 0);
        if args.json {
            let ws: Vec<serde_json::Value> = workers
                .iter()
                .map(|(i, pid, st, restarts, up, mem, at)| {
                    // Read here, as the CPU is: only where the worker's
                    // cgroup has the memory controller.
                    let stat = (*pid > 0)
                        .then(|| crate::worker::cgroup::memory_stat(*pid as i32))
                        .flatten();
                    serde_json::json!({
                        "instance": i, "pid": pid, "state": st, "restarts": restarts,
                        "uptime_ms": up, "memory_bytes": mem, "started_at_unix_ms": at,
                        "status_text": texts.get(pid),
                        "outcomes": outcomes.get(pid).map(|o| o.to_json()),
                        "generation": releases.get(pid).map(|r| r.0),
                        "node": releases.get(pid).map(|r| &r.1).filter(|v| !v.is_empty()),
                        "last_exit": last_exits.get(i),
                        "memory_anon_bytes": stat.map(|s| s.anon),
                        "memory_file_bytes": stat.map(|s| s.file),
                    })
                })
                .collect();
            let doc = serde_json::json!({
                "name": name, "state": state, "status": status,
                "instances": instances, "ready_workers": ready, "workers": ws,
                "manager_pid": manager_pid, "via": reached.via.to_json(),
                "next_cron_reload_unix_ms": (next_cron > 0).then_some(next_cron),
                "last_autopsy": (autopsy.0 > 0).then(|| serde_json::json!({
                    "unix_ms": autopsy.0, "path": autopsy.1,
                })),
                "cgroups": cgroups,
                "autoscale": autoscale.map(|(min, max, ceiling, pinned)| serde_json::json!({
                    "min": min, "max": max, "ceiling": ceiling, "pinned": pinned,
                })),
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
                "{:>8}  {:>8}  {:<9}  {:>8}  {:>9}  {:>10}  {:>5}  {:>4}  node",
                "instance",
                "pid",
                "state",
                "restarts",
                "uptime",
                "memory",
                "cpu%",
                "gen"
            );
            let cpu = cpu_percent(workers.iter().map(|w| w.1)).await;
            for (i, pid, st, restarts, up, mem, _) in &workers {
                let cpu = cpu.get(pid).map_or("-".to_string(), |c| format!("{c:.1}"));
                let (generation, node) = match releases.get(pid) {
                    Some((g, v)) if !v.is_empty() => (g.to_string(), discover::printable(v)),
                    Some((g, _)) => (g.to_string(), "-".to_string()),
                    None => ("-".to_string(), "-".to_string()),
                };
                let pid = if *pid == 0 {
                    "-".to_string()
                } else {
                    pid.to_string()
                };
                outln!(
                    "{i:>8}  {pid:>8}  {st:<9}  {restarts:>8}  {:>9}  {:>10}  {cpu:>5}  {generation:>4}  {node}",
                    crate::human::duration(*up),
                    crate::human::bytes(*mem)
                );
            }
            for (pid, text) in &texts {
                outln!("worker pid {pid} says: {}", discover::printable(text));
            }
            if let Some((min, max, ceiling, pinned)) = autoscale {
                let under = if ceiling < max {
                    format!(", at most {ceiling} under the memory budget")
                } else {
                    String::new()
                };
                let paused = if pinned {
                    ", paused by a manual scale until the next reload"
                } else {
                    ""
                };
                outln!("autoscale: {min} to {max} workers{under}{paused}");
            }
            for (i, why) in &last_exits {
                outln!("worker {i} last died: {}", discover::printable(why));
            }
            if let Some(c) = &cgroups {
                outln!("{}", discover::printable(c));
            }
            if next_cron > 0 {
                let at = std::time::UNIX_EPOCH + Duration::from_millis(next_cron);
                let at: chrono::DateTime<chrono::Local> = at.into();
                println!(
                    "next cron_restart reload: {}",
                    at.format("%Y-%m-%d %H:%M:%S %Z")
                );
            }
            if autopsy.0 > 0 {
                let at = std::time::UNIX_EPOCH + Duration::from_millis(autopsy.0);
                let at: chrono::DateTime<chrono::Local> = at.into();
                outln!(
                    "last worker stack taken: {} in {}",
                    at.format("%Y-%m-%d %H:%M:%S %Z"),
                    discover::printable(&autopsy.1)
                );
            }
        }
        Ok(())
    })
}

pub fn reload(args: crate::cli::ReloadArgs) -> ExitCode {
    run_client(async move {
        let r = reach(args.app.app.as_deref(), &args.app.bus).await?;
        let what = if args.canary {
            r.proxy.reload_canary().await?
        } else {
            r.proxy.reload().await?
        };
        outln!("nodeherd: {what}");
        Ok(())
    })
}

/// `nodeherd history APP`: the generations kept, newest last.
pub fn history(args: crate::cli::StatusArgs) -> ExitCode {
    run_client(async move {
        let r = reach(args.app.app.as_deref(), &args.app.bus).await?;
        let text = r.proxy.history().await?;
        if args.json {
            outln!("{text}");
            return Ok(());
        }
        let entries: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
        outln!(
            "{:>4}  {:<19}  {:<11}  {:<9}  script",
            "gen",
            "when",
            "outcome",
            "node"
        );
        for e in &entries {
            let at = e["at_unix_ms"].as_u64().unwrap_or(0);
            let at: chrono::DateTime<chrono::Local> =
                (std::time::UNIX_EPOCH + Duration::from_millis(at)).into();
            let text = |k: &str| discover::printable(e[k].as_str().unwrap_or("-"));
            let back = e["rollback_of"]
                .as_u64()
                .map_or(String::new(), |g| format!(" (rollback to {g})"));
            outln!(
                "{:>4}  {:<19}  {:<11}  {:<9}  {}{back}",
                e["generation"].as_u64().unwrap_or(0),
                at.format("%Y-%m-%d %H:%M:%S"),
                text("outcome"),
                text("node_version"),
                text("script"),
            );
        }
        Ok(())
    })
}

/// `nodeherd rollback APP [GENERATION]`: reload back to a kept generation.
pub fn rollback(args: crate::cli::RollbackArgs) -> ExitCode {
    run_client(async move {
        let r = reach(args.app.as_deref(), &args.bus).await?;
        let what = r.proxy.rollback(args.generation.unwrap_or(0)).await?;
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

/// `nodeherd drain APP`: the health endpoint says "take me out"; workers serve on.
pub fn drain(args: AppArgs) -> ExitCode {
    run_client(async move {
        let r = reach(args.app.as_deref(), &args.bus).await?;
        let what = r.proxy.drain().await?;
        outln!("nodeherd: {what}");
        Ok(())
    })
}

/// `nodeherd undrain APP`: the health endpoint answers by the ready workers again.
pub fn undrain(args: AppArgs) -> ExitCode {
    run_client(async move {
        let r = reach(args.app.as_deref(), &args.bus).await?;
        let what = r.proxy.undrain().await?;
        outln!("nodeherd: {what}");
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

/// `nodeherd diagnose APP INSTANCE --heap-snapshot | --cpu-profile S | --stack`.
pub fn diagnose(args: crate::cli::DiagnoseArgs) -> ExitCode {
    let (what, seconds) = if args.heap_snapshot {
        ("heap-snapshot", 0)
    } else if let Some(s) = args.cpu_profile {
        ("cpu-profile", s)
    } else {
        ("stack", 0)
    };
    run_client(async move {
        let r = reach(Some(&args.app), &args.bus).await?;
        let path = r
            .proxy
            .diagnose(args.instance, what, seconds, &args.then)
            .await?;
        outln!("{}", discover::printable(&path));
        Ok(())
    })
}

/// CPU % of each process over a quarter of a second (this host's /proc).
async fn cpu_percent(pids: impl Iterator<Item = u32>) -> std::collections::BTreeMap<u32, f64> {
    let pids: Vec<u32> = pids.filter(|p| *p > 0).collect();
    let first: Vec<f64> = pids
        .iter()
        .map(|p| crate::worker::cgroup::worker_cpu_seconds(*p as i32))
        .collect();
    let t0 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let wall = t0.elapsed().as_secs_f64();
    pids.iter()
        .zip(first)
        .map(|(p, before)| {
            let now = crate::worker::cgroup::worker_cpu_seconds(*p as i32);
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
