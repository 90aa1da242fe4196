//! A worker count that follows the load (`instances: {min, max}`), with
//! real workers: a load that keeps their event loops busy raises the count
//! to max, and once it stops the count falls back to min; a worker that
//! lies about its load raises it no further than max; bad shapes of the
//! keys are refused with what to write, in JSON and in `.config.js` files.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

/// `threads` clients requesting `/burn` back to back until dropped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _ = get(port, "/burn");
                    }
                })
            })
            .collect();
        Load { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Ready workers as the log says the count moved: the last "-> N workers".
fn last_count(log: &str) -> Option<u32> {
    log.lines()
        .filter_map(|l| l.split_once("autoscale: ")?.1.split_once(" -> "))
        .filter_map(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .next_back()
}

#[test]
fn busy_workers_raise_the_count_to_max_and_it_falls_back_to_min_when_the_load_stops() {
    let dir = tempdir::Dir::new("autoscale-ramp");
    let metrics = free_port();
    let cfg = one_app(
        &dir,
        "ramp",
        "burner.js",
        &(format!(r#""metrics": "127.0.0.1:{metrics}","#)
            + r#""instances": {"min": 1, "max": 3},
           "autoscale": {"up_after": "2s", "settle": "1s", "down_after": "3s",
                         "busy_queue": 100000}"#),
    );
    let m = start_config(&cfg, None);
    let port = m.port();
    assert!(
        wait_until(T, || get(port, "/").is_ok() && m.workers().len() == 1),
        "{}",
        m.log()
    );
    let load = Load::start(port, 4);
    assert!(
        wait_until(T, || last_count(&m.log()) == Some(3)),
        "the count never reached max:\n{}",
        m.log()
    );
    assert!(wait_until(T, || m.workers().len() == 3), "{}", m.log());
    let log = m.log();
    // The accept queue is out of it (busy_queue): the workers' own
    // heartbeats said their event loops were busy.
    assert!(
        log.contains("autoscale: 1 -> 2 workers: event-loop utilization ")
            && log.contains(" >= 0.80 for 2 s"),
        "{log}"
    );
    assert!(log.contains("autoscale: 2 -> 3 workers: "), "{log}");
    assert!(!log.contains("-> 4 workers"), "never above max:\n{log}");
    drop(load);
    assert!(
        wait_until(T, || last_count(&m.log()) == Some(1)),
        "the count never fell back to min:\n{}",
        m.log()
    );
    assert!(
        m.log().contains("autoscale: 2 -> 1 workers: quiet for 3 s"),
        "{}",
        m.log()
    );
    assert!(wait_until(T, || m.workers().len() == 1), "{}", m.log());
    assert!(get(port, "/").is_ok(), "the last worker serves");
    // Every decision counted, by direction and signal.
    let (_, text) = get(metrics, "/metrics").unwrap();
    for line in [
        r#"nodeherd_autoscale_decisions_total{app="ramp",direction="up",reason="event_loop"} 2"#,
        r#"nodeherd_autoscale_decisions_total{app="ramp",direction="down",reason="quiet"} 2"#,
        r#"nodeherd_autoscale_target_workers{app="ramp"} 1"#,
        r#"nodeherd_autoscale_ceiling_workers{app="ramp"} 3"#,
        r#"nodeherd_autoscale_pinned{app="ramp"} 0"#,
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
}

/// Workers that send no heartbeat (not Node): connections waiting in the
/// shared accept queue alone raise the count.
#[test]
fn connections_waiting_in_the_accept_queue_raise_the_count() {
    let dir = tempdir::Dir::new("autoscale-queue");
    let cfg = dir.write(
        "queue.json",
        &serde_json::json!({"apps": [{
            "name": "queue",
            "script": app("slow_accept.py"),
            "interpreter": "python3",
            "instances": {"min": 1, "max": 2},
            "autoscale": {"up_after": "2s", "settle": "1s"},
        }]})
        .to_string(),
    );
    let m = start_config(&cfg, None);
    let port = m.port();
    let load = Load::start(port, 6);
    assert!(
        wait_until(T, || last_count(&m.log()) == Some(2)),
        "the count never rose:\n{}",
        m.log()
    );
    drop(load);
    assert!(
        m.log()
            .contains("autoscale: 1 -> 2 workers: accept queue non-empty for 2 s"),
        "{}",
        m.log()
    );
}

/// A compromised app cannot make the manager fork without bound by
/// claiming, in heartbeats of its own making, that its event loop is
/// always busy: the count rises to max and no further.
#[test]
fn a_worker_faking_a_busy_event_loop_raises_the_count_no_further_than_max() {
    let dir = tempdir::Dir::new("autoscale-liar");
    let cfg = one_app(
        &dir,
        "liar",
        "burner.js",
        r#""instances": {"min": 1, "max": 2},
           "env": {"LIE_ELU": "1"},
           "autoscale": {"up_after": "1s", "settle": "1s"}"#,
    );
    let m = start_config(&cfg, None);
    let _ = m.port();
    assert!(
        wait_until(T, || last_count(&m.log()) == Some(2)),
        "the lie is believed up to max:\n{}",
        m.log()
    );
    // Five more settle periods of lies: no third worker, ever.
    assert!(
        !wait_until(Duration::from_secs(5), || m.workers().len() > 2
            || m.log().contains("-> 3 workers")),
        "a lying worker pushed the count past max:\n{}",
        m.log()
    );
}

#[test]
fn bad_bounds_and_pace_are_refused_with_what_to_write() {
    let dir = tempdir::Dir::new("autoscale-bad");
    let script = path_str(&app("burner.js"));
    for (name, text, says) in [
        (
            "a.json",
            format!(
                r#"{{"apps":[{{"name":"a","script":"{script}","instances":{{"min":4,"max":2}}}}]}}"#
            ),
            "key `instances`: min (4) is more than max (2)",
        ),
        (
            "b.json",
            format!(r#"{{"apps":[{{"name":"b","script":"{script}","instances":{{"min":1}}}}]}}"#),
            "max is missing",
        ),
        (
            "c.config.js",
            format!(
                "module.exports = {{ apps: [{{ name: 'c', script: '{script}', instances: {{ min: 1, max: 'lots' }} }}] }};"
            ),
            "max: expected a whole number, \"max\" or a negative number",
        ),
        (
            "d.config.js",
            format!(
                "module.exports = {{ apps: [{{ name: 'd', script: '{script}', instances: {{ min: 1, max: 2 }}, autoscale: {{ busy_elu: 2 }} }}] }};"
            ),
            "busy_elu: 2 is not above 0 and at most 1",
        ),
        (
            "e.json",
            format!(
                r#"{{"apps":[{{"name":"e","script":"{script}","instances":2,"autoscale":{{}}}}]}}"#
            ),
            "only `instances: {\"min\": N, \"max\": M}` turns on",
        ),
    ] {
        let file = path_str(&dir.write(name, &text));
        let (code, log) = run_to_end(&["run", &file, "--listen", "127.0.0.1:0", "--no-bus"], T);
        assert_eq!(code, Some(2), "{name}: {log}");
        assert!(log.contains(says), "{name}: want {says:?} in\n{log}");
    }
}

fn autoscale_status(bus: &DbusDaemon) -> serde_json::Value {
    let (_, out, _) = client(&["status", "pin", "--json", "--bus", &bus.address]);
    serde_json::from_str::<serde_json::Value>(&out).unwrap_or_default()["autoscale"].clone()
}

/// A manual scale holds the count (autoscaling paused, status says so)
/// until the next reload hands it back.
#[test]
fn a_manual_scale_pauses_autoscaling_until_the_next_reload() {
    let bus = DbusDaemon::start();
    let dir = tempdir::Dir::new("autoscale-pin");
    let cfg = one_app(
        &dir,
        "pin",
        "burner.js",
        r#""instances": {"min": 1, "max": 3}, "autoscale": {"up_after": "1s", "down_after": "1s", "settle": "1s"}"#,
    );
    let m = start_config(&cfg, Some(&bus));
    let _ = m.port();
    assert!(m.wait_log("1/1 workers ready", T), "{}", m.log());
    assert_eq!(
        autoscale_status(&bus),
        serde_json::json!({"min": 1, "max": 3, "ceiling": 3, "pinned": false})
    );
    let (code, _, err) = client(&["scale", "pin", "3", "--bus", &bus.address]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(autoscale_status(&bus)["pinned"], true);
    let (_, out, _) = client(&["status", "pin", "--bus", &bus.address]);
    assert!(
        out.contains("autoscale: 1 to 3 workers, paused by a manual scale until the next reload"),
        "{out}"
    );
    // Idle well past down_after: the count holds.
    assert!(
        !wait_until(Duration::from_secs(4), || m
            .log()
            .contains("autoscale: 3 -> 2")),
        "{}",
        m.log()
    );
    assert_eq!(m.workers().len(), 3);
    // An upgrade in place keeps it paused, and the workers.
    let (code, _, err) = client(&["reexec", "pin", "--bus", &bus.address]);
    assert_eq!(code, 0, "{err}");
    assert!(
        wait_until(T, || autoscale_status(&bus)["pinned"] == true),
        "{}",
        m.log()
    );
    assert!(
        !wait_until(Duration::from_secs(3), || m
            .log()
            .contains("autoscale: 3 -> 2")),
        "{}",
        m.log()
    );
    let (code, _, err) = client(&["reload", "pin", "--bus", &bus.address]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(autoscale_status(&bus)["pinned"], false);
    assert!(
        wait_until(T, || m
            .log()
            .contains("autoscale: 3 -> 2 workers: quiet for 1 s")),
        "{}",
        m.log()
    );
}
