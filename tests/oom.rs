//! How a slot's last worker died, over D-Bus and in `status --json`
//! (`last_exit`), and the restarts by reason in the metrics. An OOM kill
//! needs the memory controller, which this host's cgroup2 tree lacks (the
//! booted-systemd suite has it): here a `kill -9` shows the plumbing with
//! `crashed`, and the core's unit tests show `oom-killed`.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

fn last_exit(bus: &DbusDaemon) -> Vec<serde_json::Value> {
    let (_, out, _) = client(&["status", "lastexit", "--json", "--bus", &bus.address]);
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v["workers"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|w| w["last_exit"].clone())
        .collect()
}

#[test]
fn a_crashed_workers_slot_says_so_over_dbus_and_in_the_metrics() {
    let bus = DbusDaemon::start();
    let dir = tempdir::Dir::new("lastexit");
    let metrics = free_port();
    let cfg = one_app(
        &dir,
        "lastexit",
        "env.js",
        &format!(r#""instances": 2, "metrics": "127.0.0.1:{metrics}""#),
    );
    let m = start_config(&cfg, Some(&bus));
    let _ = m.port();
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    assert_eq!(last_exit(&bus), vec![serde_json::Value::Null; 2]);
    let victim = m.workers()[0];
    kill(victim, libc::SIGKILL);
    assert!(
        wait_until(T, || last_exit(&bus).contains(&"crashed".into())),
        "{:?}\n{}",
        last_exit(&bus),
        m.log()
    );
    let (_, text) = get(metrics, "/metrics").unwrap();
    assert!(
        text.contains("reason=\"crash\"} 1") && text.contains("reason=\"oom\"} 0"),
        "{text}"
    );
    let (code, out, err) = client(&["status", "lastexit", "--bus", &bus.address]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("last died: crashed"), "{out}");
}
