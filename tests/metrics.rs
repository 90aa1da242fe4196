//! The metrics endpoint (issue 16): the manager's figures and the app's own
//! (prom-client), merged across workers, read by a real Prometheus text
//! parser (the Python `prometheus_client` package).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

/// The metrics endpoint's port, from the manager's log.
/// `nodeherd run` of the test app `script` with `instances` workers, its
/// metrics endpoint on a free loopback port, no bus.
fn start_with_metrics(script: &str, instances: &str) -> Manager {
    start(
        &[
            "run",
            &path_str(&app(script)),
            "-i",
            instances,
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[],
    )
}

fn metrics_port(m: &Manager) -> u16 {
    let mut port = None;
    wait_until(T, || {
        port = m
            .log()
            .lines()
            .filter_map(|l| l.split_once("metrics: http://127.0.0.1:"))
            .filter_map(|(_, r)| r.split('/').next()?.parse::<u16>().ok())
            .next();
        port.is_some()
    });
    port.unwrap_or_else(|| panic!("no metrics line in:\n{}", m.log()))
}

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    assert!(buf.starts_with("HTTP/1.1 200"), "{buf}");
    buf.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// Parse with prometheus_client: every sample as "name{labels sorted} value".
fn parse(text: &str) -> Vec<String> {
    const PY: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f'{k}={v}' for k, v in sorted(s.labels.items()))
        print(f"{fam.type} {s.name}{{{labels}}} {float(s.value)}")
"#;
    let mut child = Command::new("python3")
        .args(["-c", PY])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the exposition (pip install prometheus_client?): {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_endpoint_serves_the_managers_figures_and_the_apps_merged() {
    ensure_npm_deps();
    let m = start_with_metrics("prom_app.js", "2");
    let (port, metrics) = (m.port(), metrics_port(&m));
    assert_eq!(instances_answering(port, 2, T).len(), 2, "{}", m.log());
    for _ in 0..20 {
        get(port, "/hello").unwrap();
    }
    let samples = parse(&scrape(metrics));
    let has = |want: &str| samples.iter().any(|s| s == want);
    assert!(
        has("gauge nodeherd_workers{app=prom_app} 2.0"),
        "{samples:#?}"
    );
    assert!(
        has("gauge nodeherd_workers_ready{app=prom_app} 2.0"),
        "{samples:#?}"
    );
    for w in ["0", "1"] {
        assert!(
            has(&format!(
                "gauge nodeherd_worker_ready{{app=prom_app,state=ready,worker={w}}} 1.0"
            )),
            "{samples:#?}"
        );
        assert!(
            has(&format!(
                "counter nodeherd_worker_restarts_total{{app=prom_app,reason=crash,worker={w}}} 0.0"
            )),
            "{samples:#?}"
        );
        // The app's own metrics, from each worker, labelled with it.
        assert!(
            samples.iter().any(
                |s| s.starts_with("counter process_cpu_seconds_total{worker=")
                    && s.contains(&format!("worker={w}}}"))
            ),
            "worker {w}'s default metrics: {samples:#?}"
        );
    }
    let served: f64 = samples
        .iter()
        .filter(|s| s.starts_with("counter app_requests_total{route=/hello,worker="))
        .map(|s| s.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(
        served, 20.0,
        "the app's counter summed over workers: {samples:#?}"
    );
    assert!(
        samples
            .iter()
            .any(|s| s.starts_with("gauge nodeherd_socket_queue{address=127.0.0.1:")),
        "{samples:#?}"
    );
    // A reload shows up in the counters.
    m.signal(libc::SIGHUP);
    assert!(m.wait_log("reload finished: 2/2", T), "{}", m.log());
    let samples = parse(&scrape(metrics));
    assert!(
        samples
            .iter()
            .any(|s| s == "counter nodeherd_reloads_total{app=prom_app,outcome=ok} 1.0"),
        "{samples:#?}"
    );
}

#[test]
fn an_app_without_prom_client_still_gets_the_managers_figures() {
    let m = start_with_metrics("env.js", "1");
    let metrics = metrics_port(&m);
    assert!(m.wait_log("1/1 workers ready", T), "{}", m.log());
    let samples = parse(&scrape(metrics));
    assert!(
        samples
            .iter()
            .any(|s| s == "gauge nodeherd_workers{app=env} 1.0"),
        "{samples:#?}"
    );
    assert!(
        !samples.iter().any(|s| s.contains("process_cpu")),
        "{samples:#?}"
    );
}

/// `metrics_forger.js` with 2 workers, worker 0 forging as `forge` says.
fn start_forger(forge: &str) -> (Manager, u16) {
    ensure_npm_deps();
    let m = start(
        &[
            "run",
            &path_str(&app("metrics_forger.js")),
            "-i",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &[("FORGE", forge)],
    );
    let metrics = metrics_port(&m);
    assert!(m.wait_log("2/2 workers ready", T), "{}", m.log());
    (m, metrics)
}

/// A compromised worker (issue 23) puts out families the manager owns and
/// a sibling's `worker` label: both are dropped, and counted.
#[test]
fn a_worker_cannot_forge_the_managers_families_or_a_siblings_label() {
    let (_m, metrics) = start_forger("names");
    let text = scrape(metrics);
    let samples = parse(&text);
    let sample = |prefix: &str| -> Vec<&String> {
        samples.iter().filter(|s| s.starts_with(prefix)).collect()
    };
    assert_eq!(
        sample("gauge nodeherd_workers{"),
        ["gauge nodeherd_workers{app=metrics_forger} 2.0"],
        "{text}"
    );
    assert!(sample("counter app_forged_total").is_empty(), "{text}");
    // The honest samples of the same worker stay.
    assert_eq!(
        sample("counter app_hits_total{route=/,worker=0} 1.0").len(),
        1,
        "{text}"
    );
    for reason in ["reserved_name", "worker_label"] {
        let want = format!(
            "counter nodeherd_app_metrics_dropped_total{{app=metrics_forger,reason={reason},worker=0}} "
        );
        let n: f64 = sample(&want)
            .first()
            .unwrap_or_else(|| panic!("no {want} in:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(n >= 1.0, "{want}{n}");
    }
    assert!(
        sample("counter nodeherd_app_metrics_dropped_total{app=metrics_forger,reason=reserved_name,worker=1}")
            .is_empty(),
        "worker 1 dropped nothing: {text}"
    );
}

/// A compromised worker answers the metrics requests meant for its
/// siblings: answers are matched by request and worker, so a sibling's
/// figures are its own in every scrape.
#[test]
fn a_worker_cannot_answer_for_a_sibling() {
    let (_m, metrics) = start_forger("siblings");
    for _ in 0..5 {
        let text = scrape(metrics);
        let samples = parse(&text);
        let hits: Vec<&String> = samples
            .iter()
            .filter(|s| s.starts_with("counter app_hits_total{"))
            .collect();
        assert_eq!(
            hits,
            [
                "counter app_hits_total{route=/,worker=0} 1.0",
                "counter app_hits_total{route=/,worker=1} 2.0"
            ],
            "{text}"
        );
    }
}

/// Issue 27: the counters a worker sends as it leaves count only when it
/// leaves: a serving worker cannot overwrite its slot's with them.
#[test]
fn a_serving_worker_cannot_say_last_words() {
    let (m, metrics) = start_forger("last-words");
    // Each scrape (and its parse) takes long enough for a few to arrive.
    for _ in 0..5 {
        let text = scrape(metrics);
        let hits: Vec<String> = parse(&text)
            .into_iter()
            .filter(|s| s.starts_with("counter app_hits_total{"))
            .collect();
        assert_eq!(
            hits,
            [
                "counter app_hits_total{route=/,worker=0} 1.0",
                "counter app_hits_total{route=/,worker=1} 2.0"
            ],
            "{}",
            m.log()
        );
    }
}

/// The app's counter summed over every `worker` series, for `route`.
fn app_total(metrics: u16, route: &str) -> f64 {
    parse(&scrape(metrics))
        .iter()
        .filter(|s| {
            s.starts_with(&format!(
                "counter app_requests_total{{route={route},worker="
            ))
        })
        .map(|s| s.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// Issue 27: a worker's counts outlive it. Killed with SIGKILL after a
/// scrape read them, or replaced by a reload (what it counted since is read
/// as it leaves): its slot's series counts on from what it had (before: the app's total fell by the dead worker's
/// count, which Prometheus reads as a reset).
#[test]
fn the_apps_counters_outlive_a_killed_and_a_replaced_worker() {
    ensure_npm_deps();
    let m = start_with_metrics("prom_app.js", "2");
    let (port, metrics) = (m.port(), metrics_port(&m));
    assert_eq!(instances_answering(port, 2, T).len(), 2, "{}", m.log());
    for _ in 0..30 {
        get(port, "/c").unwrap();
    }
    assert_eq!(app_total(metrics, "/c"), 30.0);
    let per_worker = parse(&scrape(metrics));
    let victim = m.workers()[0];
    kill(victim, libc::SIGKILL);
    assert!(
        m.wait_log(&format!("(pid {victim}, killed by SIGKILL"), T),
        "{}",
        m.log()
    );
    assert!(wait_until(T, || m.workers().len() == 2
        && !m.workers().contains(&victim)));
    assert_eq!(
        app_total(metrics, "/c"),
        30.0,
        "after the kill; before it: {per_worker:#?}"
    );
    for _ in 0..10 {
        get(port, "/c").unwrap();
    }
    // A reload replaces both, before a scrape read those 10: each says its
    // counts as it leaves.
    m.signal(libc::SIGHUP);
    assert!(m.wait_log("reload finished: 2/2", T), "{}", m.log());
    assert!(wait_until(T, || m.workers().len() == 2));
    assert_eq!(app_total(metrics, "/c"), 40.0, "after the reload");
    for _ in 0..5 {
        get(port, "/c").unwrap();
    }
    assert_eq!(app_total(metrics, "/c"), 45.0);
}

/// Issue 27: what the manager keeps of departed workers crosses a re-exec
/// (before: the new program started from nothing, and the slot whose
/// worker had been killed fell back, a reset to Prometheus).
#[test]
fn the_apps_counters_cross_a_reexec() {
    ensure_npm_deps();
    let m = start_with_metrics("prom_app.js", "2");
    let (port, metrics) = (m.port(), metrics_port(&m));
    assert_eq!(instances_answering(port, 2, T).len(), 2, "{}", m.log());
    for _ in 0..30 {
        get(port, "/r").unwrap();
    }
    assert_eq!(app_total(metrics, "/r"), 30.0);
    for victim in m.workers() {
        kill(victim, libc::SIGKILL);
        assert!(
            m.wait_log(&format!("(pid {victim}, killed by SIGKILL"), T),
            "{}",
            m.log()
        );
    }
    assert!(wait_until(T, || m.log().matches(" ready (pid").count() >= 4));
    assert_eq!(app_total(metrics, "/r"), 30.0, "after the kills");
    m.signal(libc::SIGUSR2);
    assert!(m.wait_log("re-executed in", T), "{}", m.log());
    assert_eq!(app_total(metrics, "/r"), 30.0, "after the re-exec");
    get(port, "/r").unwrap();
    assert_eq!(app_total(metrics, "/r"), 31.0);
}
