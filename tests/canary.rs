//! Request outcomes counted in real node workers, and canary reloads under
//! real load (issue 26): a release that answers 500 on one request in five
//! is rolled back with no failed request but the canary's own 500s; a good
//! release rolls out with none. A private dbus-daemon, the real CLI.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

fn status(bus: &DbusDaemon, app: &str) -> serde_json::Value {
    let (code, out, err) = client(&["status", app, "--json", "--bus", &bus.address]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Totals over every worker of `status --json`: (2xx, 5xx, exceptions, rejections, in buckets).
fn totals(doc: &serde_json::Value) -> (u64, u64, u64, u64, u64) {
    let mut t = (0, 0, 0, 0, 0);
    for w in doc["workers"].as_array().unwrap() {
        let o = &w["outcomes"];
        if o.is_null() {
            continue;
        }
        t.0 += o["requests"]["2xx"].as_u64().unwrap();
        t.1 += o["requests"]["5xx"].as_u64().unwrap();
        t.2 += o["uncaught_exceptions"].as_u64().unwrap();
        t.3 += o["unhandled_rejections"].as_u64().unwrap();
        t.4 += o["duration_buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum::<u64>();
    }
    t
}

/// The sum of a metric's samples whose line contains every one of `with`.
fn metric_sum(text: &str, name: &str, with: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn scrape(port: u16) -> String {
    let (code, body) = get(port, "/metrics").unwrap_or((0, String::new()));
    assert_eq!(code, 200, "{body}");
    body
}

#[test]
fn workers_count_every_response_by_class_and_their_exceptions_and_rejections() {
    let dir = tempdir::Dir::new("outcomes");
    let bus = DbusDaemon::start();
    let metrics = free_port();
    let cfg = one_app(
        &dir,
        "api",
        "release.js",
        &format!(r#""instances":2,"metrics":"127.0.0.1:{metrics}""#),
    );
    let m = start_config(&cfg, Some(&bus));
    let port = m.port();
    assert!(bus.wait_name("org.nodeherd.api", T), "{}", m.log());
    // Ready, asked nothing yet: every response counted is one of ours.
    assert!(
        wait_until(T, || status(&bus, "api")["ready_workers"] == 2),
        "{}",
        m.log()
    );
    for (path, status_code, n) in [
        ("/", 200, 100),
        ("/fail", 500, 25),
        ("/throw", 202, 3),
        ("/reject", 202, 2),
    ] {
        for _ in 0..n {
            assert_eq!(get(port, path).unwrap().0, status_code, "{path}");
        }
    }
    let mut last = (0, 0, 0, 0, 0);
    let settled = wait_until(T, || {
        last = totals(&status(&bus, "api"));
        last.0 + last.1 == 130 && last.2 == 3 && last.3 == 2
    });
    assert!(settled, "{last:?}\n{}", m.log());
    assert_eq!((last.0, last.1), (105, 25), "by class: 100 + 5 2xx, 25 5xx");
    let (ok, failed, _, _, in_buckets) = last;
    assert_eq!(
        in_buckets,
        ok + failed,
        "every response in one latency bucket"
    );
    // The same on the metrics endpoint, per worker and class.
    let text = scrape(metrics);
    assert_eq!(
        metric_sum(
            &text,
            "nodeherd_worker_requests_total",
            &["code_class=\"5xx\""]
        ),
        25.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(
            &text,
            "nodeherd_worker_requests_total",
            &["code_class=\"2xx\""]
        ),
        ok as f64
    );
    assert_eq!(
        metric_sum(&text, "nodeherd_worker_request_duration_seconds_count", &[]),
        (ok + failed) as f64
    );
    assert_eq!(
        metric_sum(
            &text,
            "nodeherd_worker_request_duration_seconds_bucket",
            &["le=\"+Inf\""]
        ),
        (ok + failed) as f64
    );
    assert_eq!(
        metric_sum(&text, "nodeherd_worker_uncaught_exceptions_total", &[]),
        3.0
    );
    assert_eq!(
        metric_sum(&text, "nodeherd_worker_unhandled_rejections_total", &[]),
        2.0
    );
    // Both workers served some: the counts are per worker.
    let per_worker: Vec<f64> = (0..2)
        .map(|i| {
            metric_sum(
                &text,
                "nodeherd_worker_request_duration_seconds_count",
                &[&format!("worker=\"{i}\"")],
            )
        })
        .collect();
    assert!(per_worker.iter().all(|n| *n > 0.0), "{per_worker:?}");
}

fn release_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body).map_or("?".into(), |v| {
        v["release"].as_str().unwrap_or("?").to_string()
    })
}

const CANARY: &str = r#""listen_timeout":10000,"reload_strategy":"canary","canary":{"soak":"2s","min_requests":50,"max_soak":"20s"}"#;

fn canary_app(dir: &tempdir::Dir, release: &str) -> std::path::PathBuf {
    canary_app_with(dir, release, "")
}

/// [`canary_app`] with more keys (`,"metrics":...`).
fn canary_app_with(dir: &tempdir::Dir, release: &str, more: &str) -> std::path::PathBuf {
    one_app(
        dir,
        "api",
        "release.js",
        &format!(r#""instances":3,"env":{{"RELEASE":"{release}"}},{CANARY}{more}"#),
    )
}

/// Every worker answers with `release` (asked until each instance has been seen).
fn every_worker_runs(port: u16, release: &str) -> BTreeMap<String, String> {
    let mut seen = BTreeMap::new();
    wait_until(T, || {
        if let Ok((_, body)) = get(port, "/") {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            seen.insert(
                v["instance"].as_str().unwrap_or("?").to_string(),
                release_of(&body),
            );
        }
        seen.len() >= 3
    });
    // A few more, so a worker of another release would show.
    for _ in 0..30 {
        if let Ok((_, body)) = get(port, "/") {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let r = release_of(&body);
            if r != release {
                seen.insert(v["instance"].as_str().unwrap_or("?").to_string(), r);
            }
        }
    }
    seen
}

#[test]
fn a_release_answering_500_on_a_fifth_is_rolled_back_and_only_the_canary_failed_requests() {
    let dir = tempdir::Dir::new("canary-bad");
    let bus = DbusDaemon::start();
    let metrics = free_port();
    let more = format!(r#","metrics":"127.0.0.1:{metrics}""#);
    let cfg = canary_app_with(&dir, "good", &more);
    let m = start_config(&cfg, Some(&bus));
    let port = m.port();
    assert!(bus.wait_name("org.nodeherd.api", T), "{}", m.log());
    assert_eq!(instances_answering(port, 3, T).len(), 3, "{}", m.log());

    let load = GetLoad::start(port, 4);
    canary_app_with(&dir, "bad", &more);
    let (code, out, err) = client(&["reload", "api", "--bus", &bus.address]);
    let (answers, errors) = load.finish();
    let said = out + &err;
    assert_ne!(code, 0, "the reload must fail: {said}\n{}", m.log());
    assert!(said.contains("rolled back: canary 5xx"), "{said}");
    assert!(said.contains("vs baseline 0.0 %"), "{said}");
    assert!(errors.is_empty(), "failed requests: {errors:?}");
    let bad: Vec<&(u16, String)> = answers.iter().filter(|(s, _)| *s != 200).collect();
    assert!(!bad.is_empty(), "the canary's 500s were seen");
    assert!(
        bad.iter().all(|(s, b)| *s == 500 && release_of(b) == "bad"),
        "only the canary failed requests: {bad:?}"
    );
    let bad_share = bad.len() as f64 / answers.len() as f64;
    assert!(
        bad_share < 0.15,
        "only the canary's share saw it: {bad_share}"
    );
    let after = every_worker_runs(port, "good");
    assert!(after.values().all(|r| r == "good"), "{after:?}");
    let log = m.log();
    assert!(log.contains("reload rolled back"), "{log}");
    // The next restart of any slot runs the configuration in force, which
    // is still the good one.
    assert!(log.contains("canary rolled back"), "{log}");
    let text = scrape(metrics);
    assert_eq!(
        metric_sum(
            &text,
            "nodeherd_reloads_total",
            &["outcome=\"rolled_back\""]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "nodeherd_reloads_total", &["outcome=\"ok\""]),
        0.0
    );
}

#[test]
fn a_good_release_passes_its_canary_and_rolls_out_with_no_failed_request() {
    let dir = tempdir::Dir::new("canary-good");
    let bus = DbusDaemon::start();
    let cfg = canary_app(&dir, "good");
    let m = start_config(&cfg, Some(&bus));
    let port = m.port();
    assert!(bus.wait_name("org.nodeherd.api", T), "{}", m.log());
    assert_eq!(instances_answering(port, 3, T).len(), 3, "{}", m.log());

    let load = GetLoad::start(port, 4);
    canary_app(&dir, "better");
    let (code, out, err) = client(&["reload", "api", "--bus", &bus.address]);
    let (answers, errors) = load.finish();
    assert_eq!(code, 0, "{out}{err}\n{}", m.log());
    assert!(errors.is_empty(), "failed requests: {errors:?}");
    assert!(answers.iter().all(|(s, _)| *s == 200), "no failed request");
    assert!(m.log().contains("canary passed"), "{}", m.log());
    let after = every_worker_runs(port, "better");
    assert!(after.values().all(|r| r == "better"), "{after:?}");
}

#[test]
fn reload_canary_judges_a_reload_of_an_app_that_rolls_by_default() {
    let dir = tempdir::Dir::new("canary-flag");
    let bus = DbusDaemon::start();
    let fields = |r: &str| {
        format!(
            r#""instances":2,"env":{{"RELEASE":"{r}"}},"canary":{{"soak":"1s","min_requests":30,"max_soak":"20s"}}"#
        )
    };
    let cfg = one_app(&dir, "api", "release.js", &fields("good"));
    let m = start_config(&cfg, Some(&bus));
    let port = m.port();
    assert!(bus.wait_name("org.nodeherd.api", T), "{}", m.log());
    assert_eq!(instances_answering(port, 2, T).len(), 2, "{}", m.log());
    let load = GetLoad::start(port, 3);
    one_app(&dir, "api", "release.js", &fields("bad"));
    let (code, out, err) = client(&["reload", "api", "--canary", "--bus", &bus.address]);
    let (_, errors) = load.finish();
    assert_ne!(code, 0, "{out}{err}\n{}", m.log());
    assert!(err.contains("rolled back"), "{err}");
    assert!(errors.is_empty(), "{errors:?}");
    let text = m.log();
    assert!(text.contains("canary reload: slot 0"), "{text}");
}

#[test]
fn counting_leaves_nodes_own_handling_of_an_unhandled_rejection_alone() {
    // No handler of the app's: Node ends the process on an unhandled
    // rejection, preload or not (a listener of the preload's own would
    // swallow it and keep a broken worker serving).
    let dir = tempdir::Dir::new("outcomes-reject");
    let bus = DbusDaemon::start();
    let cfg = one_app(
        &dir,
        "api",
        "release.js",
        r#""instances":1,"env":{"NO_HANDLER":"1"}"#,
    );
    let m = start_config(&cfg, Some(&bus));
    let port = m.port();
    assert!(bus.wait_name("org.nodeherd.api", T), "{}", m.log());
    assert_eq!(instances_answering(port, 1, T).len(), 1, "{}", m.log());
    let _ = get(port, "/reject");
    assert!(
        m.wait_log("exited unexpectedly", T),
        "the worker must die of its unhandled rejection: {}",
        m.log()
    );
    let _ = get(port, "/throw");
    assert!(
        wait_until(T, || m.log().matches("exited unexpectedly").count() >= 2),
        "and of an uncaught exception: {}",
        m.log()
    );
}

#[test]
fn a_worker_can_misreport_only_itself_and_never_lower_or_absurdly() {
    let dir = tempdir::Dir::new("outcomes-forger");
    let bus = DbusDaemon::start();
    let cfg = one_app(&dir, "api", "outcome_forger.js", r#""instances":2"#);
    let m = start_config(&cfg, Some(&bus));
    let _port = m.port();
    assert!(bus.wait_name("org.nodeherd.api", T), "{}", m.log());
    let mut doc = serde_json::Value::Null;
    let both = wait_until(T, || {
        doc = status(&bus, "api");
        doc["workers"]
            .as_array()
            .is_some_and(|ws| ws.len() == 2 && ws.iter().all(|w| !w["outcomes"].is_null()))
    });
    assert!(both, "{doc}\n{}", m.log());
    // Let the honest heartbeats of both come by too.
    assert!(
        m.wait_log("reported request counts lower than before", T),
        "{}",
        m.log()
    );
    let doc = status(&bus, "api");
    let five = |i: usize| doc["workers"][i]["outcomes"]["requests"]["5xx"].as_u64();
    assert_eq!(
        five(0),
        Some(1000),
        "its first report stands, lower and absurd ones do not: {doc}"
    );
    assert_eq!(
        five(1),
        Some(0),
        "the other worker's counts are its own: {doc}"
    );
    assert_eq!(
        m.log()
            .matches("reported request counts lower than before")
            .count(),
        1,
        "said once: {}",
        m.log()
    );
}

#[test]
fn a_release_slower_at_p99_is_rolled_back() {
    let dir = tempdir::Dir::new("canary-slow");
    let bus = DbusDaemon::start();
    let cfg = canary_app(&dir, "good");
    let m = start_config(&cfg, Some(&bus));
    let port = m.port();
    assert!(bus.wait_name("org.nodeherd.api", T), "{}", m.log());
    assert_eq!(instances_answering(port, 3, T).len(), 3, "{}", m.log());
    let load = GetLoad::start(port, 4);
    canary_app(&dir, "slow");
    let (code, out, err) = client(&["reload", "api", "--bus", &bus.address]);
    let (answers, errors) = load.finish();
    assert_ne!(code, 0, "{out}{err}\n{}", m.log());
    assert!(err.contains("rolled back: canary p99 ≤ 500 ms"), "{err}");
    assert!(errors.is_empty(), "{errors:?}");
    assert!(answers.iter().all(|(s, _)| *s == 200));
    let after = every_worker_runs(port, "good");
    assert!(after.values().all(|r| r == "good"), "{after:?}");
}

#[test]
fn a_release_that_crashes_on_its_first_request_is_rolled_back_at_once() {
    let dir = tempdir::Dir::new("canary-crash");
    let bus = DbusDaemon::start();
    // A long soak: the crash must not wait for it.
    let fields = |r: &str| {
        format!(
            r#""instances":3,"listen_timeout":10000,"env":{{"RELEASE":"{r}"}},"reload_strategy":"canary","canary":{{"soak":"60s"}}"#
        )
    };
    let cfg = one_app(&dir, "api", "release.js", &fields("good"));
    let m = start_config(&cfg, Some(&bus));
    let port = m.port();
    assert!(bus.wait_name("org.nodeherd.api", T), "{}", m.log());
    assert_eq!(instances_answering(port, 3, T).len(), 3, "{}", m.log());
    let load = GetLoad::start(port, 4);
    one_app(&dir, "api", "release.js", &fields("crash"));
    let began = std::time::Instant::now();
    let (code, out, err) = client(&["reload", "api", "--bus", &bus.address]);
    let took = began.elapsed();
    let (_, errors) = load.finish();
    assert_ne!(code, 0, "{out}{err}\n{}", m.log());
    assert!(
        err.contains("the canary (slot 0) died during the soak"),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(30),
        "at once, not after the soak: {took:?}"
    );
    // Only what the canary held when it died could fail: the request it
    // died on and the other connections it had accepted (at most the
    // load's 4).
    assert!(errors.len() <= 4, "{errors:?}");
    let after = every_worker_runs(port, "good");
    assert!(after.values().all(|r| r == "good"), "{after:?}");
}

#[test]
fn http2_responses_through_the_compatibility_api_are_counted_too() {
    let dir = tempdir::Dir::new("outcomes-h2");
    let bus = DbusDaemon::start();
    let cfg = one_app(&dir, "api", "h2.js", r#""instances":1"#);
    let m = start_config(&cfg, Some(&bus));
    let port = m.port();
    assert!(bus.wait_name("org.nodeherd.api", T), "{}", m.log());
    assert!(
        wait_until(T, || status(&bus, "api")["ready_workers"] == 1),
        "{}",
        m.log()
    );
    let mut client = std::process::Command::new("node")
        .arg(app("h2_client.js"))
        .args([port.to_string(), "40".into(), "10".into()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut done = None;
    let ended = wait_until(T, || {
        done = client.try_wait().unwrap();
        done.is_some()
    });
    if !ended {
        let _ = client.kill();
        let _ = client.wait();
    }
    assert!(ended && done.unwrap().success(), "the HTTP/2 client failed");
    let mut out = String::new();
    std::io::Read::read_to_string(client.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert_eq!(out.trim(), r#"{"200":40,"500":10}"#);
    let mut last = (0, 0, 0, 0, 0);
    let counted = wait_until(T, || {
        last = totals(&status(&bus, "api"));
        (last.0, last.1) == (40, 10)
    });
    assert!(counted, "{last:?}\n{}", m.log());
}
