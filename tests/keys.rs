//! PM2's keys with real workers (issue 30): increment_var, filter_env,
//! stop_exit_codes, autostart, cron_restart under load and watch.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(20);

/// GET `path` and parse the JSON body.
fn ask(port: u16, path: &str) -> Option<serde_json::Value> {
    let (status, body) = get(port, path).ok()?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

/// Ask `path` until `want` instances have answered: instance → answer.
fn every_instance(port: u16, path: &str, want: usize) -> BTreeMap<String, serde_json::Value> {
    let mut seen = BTreeMap::new();
    wait_until(T, || {
        if let Some(v) = ask(port, path) {
            seen.insert(v["instance"].as_str().unwrap_or("?").to_string(), v);
        }
        seen.len() >= want
    });
    assert_eq!(seen.len(), want, "instances that answered: {seen:?}");
    seen
}

#[test]
fn increment_var_gives_each_worker_its_base_plus_its_instance() {
    let dir = tempdir::Dir::new("incr");
    let config = one_app(
        &dir,
        "incr",
        "keys.js",
        r#""instances": 2, "increment_var": "PORT", "env": {"PORT": 3000}"#,
    );
    let m = start_config(&config, None);
    let seen = every_instance(m.port(), "/?vars=PORT", 2);
    assert_eq!(seen["0"]["vars"]["PORT"], "3000");
    assert_eq!(seen["1"]["vars"]["PORT"], "3001");
}

#[test]
fn a_base_that_is_no_number_is_refused_without_showing_it() {
    let dir = tempdir::Dir::new("incr-bad");
    let config = one_app(
        &dir,
        "incr",
        "keys.js",
        r#""increment_var": "PORT", "env": {"PORT": "s3cr3t-not-a-port"}"#,
    );
    let (code, log) = run_to_end(&["run", &path_str(&config), "--no-bus"], T);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("key `increment_var`"), "{log}");
    assert!(!log.contains("s3cr3t"), "the value is never shown: {log}");
}

#[test]
fn filter_env_keeps_the_managers_variables_with_those_prefixes_from_workers() {
    let dir = tempdir::Dir::new("filter");
    let env = [
        ("SECRET_TOKEN", "from-the-manager"),
        ("npm_config_cache", "/tmp/x"),
        ("KEEP_ME", "kept"),
    ];
    let vars = "/?vars=SECRET_TOKEN,npm_config_cache,KEEP_ME,OWN,CREDENTIALS_DIRECTORY";
    let prefixes = one_app(
        &dir,
        "prefixes",
        "keys.js",
        r#""filter_env": ["SECRET_", "npm_"], "env": {"OWN": "app"}"#,
    );
    let m = start(
        &[
            "run",
            &path_str(&prefixes),
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &env,
    );
    let v = &every_instance(m.port(), vars, 1)["0"]["vars"];
    assert_eq!(v["SECRET_TOKEN"], serde_json::Value::Null);
    assert_eq!(v["npm_config_cache"], serde_json::Value::Null);
    assert_eq!(v["KEEP_ME"], "kept");
    assert_eq!(v["OWN"], "app", "the app's env applies after the filter");
    drop(m);

    let all = one_app(
        &dir,
        "all",
        "keys.js",
        r#""filter_env": true, "env": {"OWN": "app"}"#,
    );
    let creds = tempdir::Dir::new("filter-creds");
    let creds_dir = path_str(&creds.path);
    let mut env = env.to_vec();
    env.push(("CREDENTIALS_DIRECTORY", &creds_dir));
    let m = start(
        &[
            "run",
            &path_str(&all),
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        &env,
    );
    let v = &every_instance(m.port(), vars, 1)["0"]["vars"];
    assert_eq!(
        v["KEEP_ME"],
        serde_json::Value::Null,
        "true: nothing inherited"
    );
    assert_eq!(v["OWN"], "app");
    assert_eq!(
        v["CREDENTIALS_DIRECTORY"], creds_dir,
        "systemd's credentials stay the workers'"
    );
}

#[test]
fn a_worker_exiting_with_a_stop_exit_code_stays_stopped_and_says_so() {
    let dir = tempdir::Dir::new("stopcodes");
    let config = one_app(
        &dir,
        "stopcodes",
        "keys.js",
        r#""instances": 2, "stop_exit_codes": [3]"#,
    );
    let bus = DbusDaemon::start();
    let m = start_config(&config, Some(&bus));
    let port = m.port();
    let seen = every_instance(port, "/", 2);
    let status = || {
        let (code, out, err) = client(&["status", "stopcodes", "--json", "--bus", &bus.address]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    // Exit code 3 from whichever worker answers: its slot stays stopped.
    let _ = get(port, "/exit?code=3");
    assert!(
        m.wait_log("one of stop_exit_codes", T),
        "the journal says why: {}",
        m.log()
    );
    let stopped = wait_until(T, || {
        status()["workers"]
            .as_array()
            .is_some_and(|w| w.iter().filter(|w| w["state"] == "stopped").count() == 1)
    });
    assert!(stopped, "{}", status());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(m.workers().len(), 1, "not restarted: {}", m.log());
    assert!(
        status()["status"]
            .as_str()
            .unwrap()
            .contains("stopped: slot"),
        "{}",
        status()
    );
    // Any other code is a crash: restarted.
    let survivor = ask(port, "/").unwrap();
    let _ = get(port, "/exit?code=1");
    assert!(
        wait_until(T, || ask(port, "/")
            .is_some_and(|v| v["pid"] != survivor["pid"])),
        "{}",
        m.log()
    );
    let _ = seen;
}

#[test]
fn autostart_off_serves_nothing_until_scaled() {
    let dir = tempdir::Dir::new("autostart");
    let config = one_app(
        &dir,
        "idle",
        "keys.js",
        r#""instances": 2, "autostart": false"#,
    );
    let bus = DbusDaemon::start();
    let m = start_config(&config, Some(&bus));
    assert!(m.wait_log("autostart is off", T), "{}", m.log());
    assert!(m.wait_log("0/2 workers ready", T), "{}", m.log());
    std::thread::sleep(Duration::from_millis(500));
    assert!(m.workers().is_empty(), "no worker: {:?}", m.workers());
    let (code, _, err) = client(&["scale", "idle", "2", "--bus", &bus.address]);
    assert_eq!(code, 0, "{err}");
    every_instance(m.port(), "/", 2);
}

/// `threads` loops sending requests, each on a new connection, until
/// `stop`: (answered, failed).
fn load(port: u16, threads: usize, stop: Instant) -> (u64, u64) {
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < stop {
                    match get(port, "/") {
                        Ok((200, _)) => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
}

#[test]
fn cron_restart_reloads_under_load_with_no_failed_request() {
    let dir = tempdir::Dir::new("cron");
    // Every three seconds (six fields: seconds first, as PM2 reads them).
    let config = one_app(
        &dir,
        "cron",
        "keys.js",
        r#""instances": 2, "cron_restart": "*/3 * * * * *""#,
    );
    let bus = DbusDaemon::start();
    let m = start_config(&config, Some(&bus));
    let port = m.port();
    let before = every_instance(port, "/", 2);
    // The next run, in status and --json.
    let (code, out, err) = client(&["status", "cron", "--json", "--bus", &bus.address]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let next = v["next_cron_reload_unix_ms"]
        .as_u64()
        .expect("the next run");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        next > now_ms.saturating_sub(1000) && next <= now_ms + 3500,
        "{next} vs {now_ms}"
    );
    let (_, out, _) = client(&["status", "cron", "--bus", &bus.address]);
    assert!(out.contains("next cron_restart reload: "), "{out}");

    let (ok, failed) = load(port, 4, Instant::now() + Duration::from_secs(10));
    let reloads = m.log().matches("reload finished: 2/2").count();
    eprintln!("cron_restart under load: {ok} answered, {failed} failed, {reloads} reload(s)");
    assert_eq!(failed, 0, "{}", m.log());
    assert!(ok > 100, "{ok}");
    assert!(reloads >= 2, "a reload every 3 s: {}", m.log());
    assert!(m.log().contains("cron_restart (*/3 * * * * *) is due"));
    let after = every_instance(port, "/", 2);
    for i in ["0", "1"] {
        assert_ne!(before[i]["pid"], after[i]["pid"], "slot {i} was replaced");
    }
}

#[test]
fn a_burst_of_ten_saves_is_one_zero_downtime_reload_and_ignored_files_none() {
    let dir = tempdir::Dir::new("watch");
    let src = std::fs::read_to_string(app("keys.js")).unwrap();
    let script = dir.write("server.js", &src);
    std::fs::create_dir_all(dir.path.join("node_modules/dep")).unwrap();
    std::fs::create_dir_all(dir.path.join("logs")).unwrap();
    // A link to the root of the machine in the app's tree: never followed.
    std::os::unix::fs::symlink("/", dir.path.join("everything")).unwrap();
    let config = dir.write(
        "watch.json",
        &serde_json::json!({"apps": [{
            "name": "watch", "script": script, "instances": 2,
            "watch": true, "ignore_watch": ["logs", "*.tmp"], "watch_delay": 800,
        }]})
        .to_string(),
    );
    let m = start_config(&config, None);
    let port = m.port();
    every_instance(port, "/", 2);
    assert!(m.wait_log("watch: ", T), "{}", m.log());
    assert!(
        !m.log().contains("directories under"),
        "the link was followed: {}",
        m.log()
    );
    let reloads = || m.log().matches("reload finished").count();
    // What is ignored reloads nothing: node_modules, dot-files, ignore_watch.
    dir.write("node_modules/dep/index.js", "module.exports = 1;\n");
    dir.write(".env.swp", "x");
    dir.write("logs/today.txt", "a line\n");
    dir.write("scratch.tmp", "x");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(reloads(), 0, "{}", m.log());
    // Ten saves of the script in a burst: one reload, under load, nothing failed.
    let stop = Instant::now() + Duration::from_secs(6);
    let loader = std::thread::spawn(move || load(port, 2, stop));
    for i in 0..10 {
        std::fs::write(&script, format!("{src}// save {i}\n")).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(wait_until(T, || reloads() >= 1), "{}", m.log());
    let (ok, failed) = loader.join().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(reloads(), 1, "exactly one reload: {}", m.log());
    assert!(m.log().contains("reload finished: 2/2"), "{}", m.log());
    assert_eq!(failed, 0, "{ok} answered");
    every_instance(port, "/", 2);
}

#[test]
fn the_cron_schedule_crosses_a_reexec_and_runs_on_in_the_new_program() {
    let dir = tempdir::Dir::new("cron-reexec");
    let config = one_app(
        &dir,
        "cronrx",
        "keys.js",
        r#""instances": 1, "cron_restart": "*/4 * * * * *""#,
    );
    let bus = DbusDaemon::start();
    let m = start_config(&config, Some(&bus));
    every_instance(m.port(), "/", 1);
    let next = || {
        let (code, out, err) = client(&["status", "cronrx", "--json", "--bus", &bus.address]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["next_cron_reload_unix_ms"]
            .as_u64()
    };
    assert!(next().is_some());
    let (code, _, err) = client(&["reexec", "cronrx", "--bus", &bus.address]);
    assert_eq!(code, 0, "{err}\n{}", m.log());
    let after_exec = |log: &str| {
        log.find("re-executing into")
            .map(|at| log[at..].matches("reload finished: 1/1").count())
            .unwrap_or(0)
    };
    // The deadline came over in the state: the new program reloads on
    // schedule (it never asks for a schedule of its own).
    assert!(next().is_some(), "status of the new program");
    assert!(
        wait_until(T, || after_exec(&m.log()) >= 1),
        "no cron reload after the re-exec: {}",
        m.log()
    );
}
