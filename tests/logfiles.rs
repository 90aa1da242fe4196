//! Log files written and rotated by the manager (PM2's `out_file`,
//! `error_file`, `log_file`, `merge_logs`, `log_date_format`, `time`, and
//! nodeherd's `log_max_size`, `log_retain`, `log_compress`), with real node
//! workers: no line lost, doubled or cut at rotation under load; reopening
//! for an outside logrotate (SIGUSR1, `ReopenLogs`); paths that cannot be
//! written refused at start; a stuck file stalls no supervision.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

/// Every file in `dir` whose name starts with `prefix`, read (gzip
/// decompressed), by name.
fn read_set(dir: &Path, prefix: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if !name.starts_with(prefix) || name.ends_with(".tmp") {
            continue;
        }
        let mut bytes = Vec::new();
        // The compressor may have removed it since it was listed.
        let Ok(mut f) = std::fs::File::open(dir.join(&name)) else {
            continue;
        };
        f.read_to_end(&mut bytes).unwrap();
        let text = if name.ends_with(".gz") {
            let mut s = String::new();
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_string(&mut s)
                .unwrap_or_else(|e| panic!("{name}: not a whole gzip file: {e}"));
            s
        } else {
            String::from_utf8(bytes).unwrap()
        };
        out.insert(name, text);
    }
    out
}

/// `done wN COUNT` lines the workers wrote to stderr, by worker.
fn done_counts(dir: &Path, prefix: &str) -> BTreeMap<u32, u64> {
    let mut done = BTreeMap::new();
    for text in read_set(dir, prefix).values() {
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("done w")
                && let Some((w, n)) = rest.split_once(' ')
            {
                done.insert(w.parse().unwrap(), n.parse().unwrap());
            }
        }
    }
    done
}

/// Check that the lines of worker `w` in `files` are `w<w> 0..count`, each
/// once and whole (`pad` x's), in order within each file.
fn check_worker_lines(files: &BTreeMap<String, String>, w: u32, count: u64, pad: usize) {
    let mut seen = vec![0u8; count as usize];
    let whole_tail = "x".repeat(pad);
    for (name, text) in files {
        let mut last: Option<u64> = None;
        for line in text.lines() {
            let mut parts = line.splitn(3, ' ');
            let (who, n, tail) = (parts.next(), parts.next(), parts.next());
            assert!(
                who.is_some_and(|x| x.starts_with('w')) && tail == Some(whole_tail.as_str()),
                "{name}: a line cut or mangled: {line:?}"
            );
            if who != Some(format!("w{w}").as_str()) {
                continue;
            }
            let n: u64 = n.unwrap().parse().unwrap();
            assert!(n < count, "{name}: w{w} {n} is past the {count} it wrote");
            seen[n as usize] += 1;
            assert!(
                last.is_none_or(|l| n > l),
                "{name}: w{w} {n} after {last:?}"
            );
            last = Some(n);
        }
    }
    let missing: Vec<usize> = (0..seen.len()).filter(|&i| seen[i] == 0).collect();
    let twice: Vec<usize> = (0..seen.len()).filter(|&i| seen[i] > 1).collect();
    assert!(
        missing.is_empty() && twice.is_empty(),
        "w{w}: {} of {count} lines missing (first {:?}), {} twice (first {:?})",
        missing.len(),
        missing.first(),
        twice.len(),
        twice.first()
    );
}

#[test]
fn four_workers_logging_fast_lose_no_line_across_many_rotations() {
    let dir = tempdir::Dir::new("logrot");
    let logs = dir.path.join("logs");
    let cfg = one_app(
        &dir,
        "loud",
        "numbered.js",
        &format!(
            r#""instances":4,"out_file":"{0}/out.log","error_file":"{0}/err.log",
               "log_max_size":"256K","log_compress":true,"log_retain":100000,
               "env":{{"LOG_FOR_MS":"3000","LOG_PAD":"60"}}"#,
            logs.display()
        ),
    );
    let m = start_config(&cfg, None);
    assert!(
        wait_until(Duration::from_secs(60), || logs.exists()
            && done_counts(&logs, "err-").len() == 4),
        "the workers did not all finish: {:?}\n{}",
        logs.exists().then(|| done_counts(&logs, "err-")),
        m.log()
    );
    let counts = done_counts(&logs, "err-");
    // The compressor has caught up: no rotated file is left uncompressed.
    let settled = || {
        std::fs::read_dir(&logs).unwrap().all(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            !n.contains("__") || n.ends_with(".gz")
        })
    };
    assert!(wait_until(T, settled), "rotated files left uncompressed");
    let files = read_set(&logs, "out-");
    for (w, &count) in &counts {
        let mine: BTreeMap<String, String> = files
            .iter()
            .filter(|(n, _)| n.starts_with(&format!("out-{w}")))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        let rotated = mine.keys().filter(|n| n.ends_with(".log.gz")).count();
        // A file is rotated at every 256 KiB: as many rotations as that,
        // less the one still being written (how many lines a worker writes
        // in its 3 s depends on the machine's load), and at least two.
        let bytes: usize = mine.values().map(String::len).sum();
        let due = (bytes / (256 * 1024)).saturating_sub(1).max(2);
        assert!(
            rotated >= due,
            "w{w}: only {rotated} rotation(s) of {count} lines ({bytes} bytes, {due} due): {:?}",
            mine.keys()
        );
        assert!(
            mine.contains_key(&format!("out-{w}.log")),
            "{:?}",
            mine.keys()
        );
        check_worker_lines(&mine, *w, count, 60);
        // Every file but the current one is within the size.
        for (n, t) in &mine {
            assert!(t.len() <= 256 * 1024, "{n}: {} bytes", t.len());
        }
        eprintln!("w{w}: {count} lines, {rotated} rotations, none lost");
    }
    assert!(
        !m.log().contains("dropped"),
        "the manager dropped lines:\n{}",
        m.log()
    );
    // The journal (here: stderr) got none of them.
    assert!(!m.log().contains("[loud:"), "{}", m.log());
}

#[test]
fn merged_files_with_timestamps_relative_to_the_apps_cwd() {
    let dir = tempdir::Dir::new("logmerge");
    std::fs::create_dir_all(dir.path.join("srv")).unwrap();
    let cfg = one_app(
        &dir,
        "stamped",
        "numbered.js",
        r#""instances":2,"cwd":"srv","merge_logs":true,"time":true,
           "out_file":"logs/out.log","log_file":"logs/all.log",
           "env":{"LOG_FOR_MS":"200","LOG_PAD":"3"}"#,
    );
    let m = start_config(&cfg, None);
    let logs = dir.path.join("srv/logs");
    let done = || {
        std::fs::read_to_string(logs.join("all.log"))
            .unwrap_or_default()
            .matches(": done w")
            .count()
            == 2
    };
    assert!(wait_until(T, done), "{}", m.log());
    let lines_of = |text: &str, w: u32| {
        text.lines()
            .filter(|l| {
                l.get(21..)
                    .is_some_and(|r| r.starts_with(&format!("w{w} ")))
            })
            .count()
    };
    let read = |n: &str| std::fs::read_to_string(logs.join(n)).unwrap_or_default();
    // The two files are flushed one after the other: wait for the second.
    assert!(
        wait_until(T, || {
            let (out, all) = (read("out.log"), read("all.log"));
            [0, 1]
                .iter()
                .all(|&w| lines_of(&out, w) == lines_of(&all, w))
        }),
        "out.log and all.log never held the same stdout lines"
    );
    let (all, out) = (read("all.log"), read("out.log"));
    // PM2's `time`: YYYY-MM-DDTHH:mm:ss, then ": ".
    for l in all.lines().chain(out.lines()) {
        let (stamp, rest) = l.split_at_checked(21).unwrap_or_else(|| panic!("{l:?}"));
        assert!(
            stamp.len() == 21
                && stamp.as_bytes()[10] == b'T'
                && stamp.ends_with(": ")
                && stamp[..4].bytes().all(|b| b.is_ascii_digit()),
            "{l:?}"
        );
        assert!(rest.starts_with('w') || rest.starts_with("done w"), "{l:?}");
    }
    for w in [0, 1] {
        assert!(
            lines_of(&out, w) > 0,
            "w{w} not in the merged out.log: {}",
            &out[..out.len().min(400)]
        );
    }
    // stderr's `done` lines go to log_file, not out_file; nothing per slot.
    assert_eq!(out.matches("done w").count(), 0);
    let names: Vec<String> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // stderr is not a file of its own here: the journal has no stdout line,
    // and no `done` line either (it is in log_file).
    assert!(!m.log().contains("[stamped:"), "{}", m.log());
}

/// Lines `w0 N` in the files named, as numbers.
fn numbers(dir: &Path, names: &[&str]) -> Vec<u64> {
    let mut all = Vec::new();
    for n in names {
        let text = std::fs::read_to_string(dir.join(n)).unwrap_or_default();
        all.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("w0 "))
                .map(|r| r.split(' ').next().unwrap().parse::<u64>().unwrap()),
        );
    }
    all
}

#[test]
fn sigusr1_and_reopen_logs_reopen_the_files_for_an_outside_logrotate() {
    let dir = tempdir::Dir::new("logreopen");
    let bus = DbusDaemon::start();
    let cfg = one_app(
        &dir,
        "reopen",
        "numbered.js",
        r#""instances":1,"merge_logs":true,"out_file":"out.log","env":{"LOG_EVERY_MS":"20","LOG_PAD":"1"}"#,
    );
    let m = start_config(&cfg, Some(&bus));
    let p = |n: &str| dir.path.join(n);
    let grows = |name: &str| {
        let f = p(name);
        move || std::fs::metadata(&f).is_ok_and(|m| m.len() > 100)
    };
    assert!(wait_until(T, grows("out.log")), "{}", m.log());

    // logrotate without copytruncate: rename, then tell the manager.
    std::fs::rename(p("out.log"), p("out.log.1")).unwrap();
    m.signal(libc::SIGUSR1);
    assert!(
        wait_until(T, grows("out.log")),
        "no new out.log after SIGUSR1:\n{}",
        m.log()
    );
    assert!(
        m.wait_log("SIGUSR1: 1 log file(s) reopened", T),
        "{}",
        m.log()
    );

    std::fs::rename(p("out.log"), p("out.log.2")).unwrap();
    assert!(bus.wait_name("org.nodeherd.reopen", T));
    let (code, out, err) = bus.busctl(&[
        "call",
        "org.nodeherd.reopen",
        "/org/nodeherd",
        "org.nodeherd.Manager1",
        "ReopenLogs",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 log file(s) reopened"), "{out}");
    assert!(wait_until(T, grows("out.log")), "{}", m.log());
    std::thread::sleep(Duration::from_millis(300));

    // The manager lived through it all, and no line fell between the files.
    assert!(pid_alive(m.pid()));
    let one = numbers(&dir.path, &["out.log.1"]);
    let two = numbers(&dir.path, &["out.log.2"]);
    let now = numbers(&dir.path, &["out.log"]);
    assert!(!one.is_empty() && !two.is_empty() && !now.is_empty());
    let all: Vec<u64> = one.iter().chain(&two).chain(&now).copied().collect();
    let want: Vec<u64> = (0..all.len() as u64).collect();
    assert_eq!(all, want, "lines lost or doubled across the reopens");
}

#[test]
fn a_path_that_cannot_be_written_is_refused_at_start_naming_the_key() {
    let dir = tempdir::Dir::new("logbad");
    let cfg = one_app(
        &dir,
        "nowhere",
        "numbered.js",
        r#""error_file":"/proc/self/nope/err.log""#,
    );
    let (code, log) = run_to_end(&["run", &path_str(&cfg), "--no-bus"], T);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("key `error_file`") && log.contains("/proc/self/nope/err-0.log"),
        "{log}"
    );
    for (entry, key) in [
        (r#""log_max_size":"lots""#, "log_max_size"),
        (
            r#""log_rotate_interval":"*/5 * * * *""#,
            "log_rotate_interval",
        ),
        (r#""log_file":true"#, "log_file"),
        (r#""log_retain":0"#, "log_retain"),
    ] {
        let cfg = one_app(&dir, "bad", "numbered.js", entry);
        let (code, log) = run_to_end(&["run", &path_str(&cfg), "--no-bus"], T);
        assert_eq!(code, Some(2), "{entry}: {log}");
        assert!(log.contains(&format!("key `{key}`")), "{entry}: {log}");
    }
}

/// An ecosystem file's author is trusted as far as the app's user, never
/// as root: under a root manager with `uid` workers, a log path is opened
/// with the workers' rights, so it cannot make the manager append what the
/// workers print to a file only root may write.
#[test]
fn a_root_manager_opens_log_files_only_where_the_workers_user_may() {
    if nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempdir::Dir::new("logroot");
    // A directory only root may write, as /etc/cron.d is.
    let root_only = dir.path.join("root-only");
    std::fs::create_dir(&root_only).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let target = root_only.join("evil");
    let cfg = one_app(
        &dir,
        "hostile",
        "numbered.js",
        &format!(r#""uid":"nobody","out_file":"{}""#, target.display()),
    );
    let (code, log) = run_to_end(&["run", &path_str(&cfg), "--no-bus"], T);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("key `out_file`") && log.contains("uid 65534"),
        "{log}"
    );
    assert!(!target.exists(), "the file was made");

    // Where nobody may write, the file is made, and it is nobody's.
    let open = dir.path.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let ok = open.join("out.log");
    let cfg = one_app(
        &dir,
        "modest",
        "numbered.js",
        &format!(
            r#""uid":"nobody","out_file":"{}","merge_logs":true,"env":{{"LOG_EVERY_MS":"50"}}"#,
            ok.display()
        ),
    );
    let m = start_config(&cfg, None);
    assert!(
        wait_until(T, || std::fs::metadata(&ok).is_ok_and(|m| m.len() > 0)),
        "{}",
        m.log()
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&ok).unwrap();
    assert_eq!(meta.uid(), 65534);
    assert_eq!(meta.mode() & 0o777, 0o640);
}

/// A log file that stops taking lines (here a FIFO nobody reads: the
/// writer blocks in write(2), as on a hung disk) stalls neither the
/// supervisor nor the watchdog: a killed worker is replaced, `status`
/// answers, and what could not be written is counted and said.
#[test]
fn a_stuck_log_file_stalls_no_supervision_and_drops_are_counted() {
    let dir = tempdir::Dir::new("logstuck");
    let fifo = dir.path.join("out.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // A reader that never reads, so the manager can open it.
    let reader = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap()
    };
    let metrics_port = free_port();
    let cfg = one_app(
        &dir,
        "stuck",
        "numbered.js",
        &format!(
            r#""instances":2,"out_file":"{}","merge_logs":true,"metrics":"127.0.0.1:{metrics_port}",
               "env":{{"LOG_EVERY_MS":"5","LOG_BATCH":"100","LOG_PAD":"200"}}"#,
            fifo.display()
        ),
    );
    let m = start_config(&cfg, None);
    let port = m.port();
    let scrape = || {
        get(metrics_port, "/metrics")
            .ok()
            .and_then(|(_, body)| {
                body.lines()
                    .find(|l| l.starts_with("nodeherd_log_lines_dropped_total"))
                    .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    assert!(
        wait_until(T, || scrape() > 0),
        "no line counted as dropped:\n{}",
        m.log()
    );
    // Supervision goes on: a killed worker is replaced, the app serves.
    let workers = m.workers();
    assert_eq!(workers.len(), 2, "{workers:?}");
    kill(workers[0], libc::SIGKILL);
    assert!(
        wait_until(T, || {
            let now = m.workers();
            now.len() == 2 && !now.contains(&workers[0])
        }),
        "the killed worker was not replaced while the log file was stuck:\n{}",
        m.log()
    );
    assert!(wait_until(T, || get(port, "/").is_ok()), "{}", m.log());
    // Once the file takes lines again, the journal says what was dropped.
    let drain = std::thread::spawn(move || {
        let mut r = reader;
        let mut buf = vec![0u8; 1 << 16];
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < end {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    assert!(m.wait_log("log line(s) dropped", T), "{}", m.log());
    drop(m);
    let _ = drain.join();
}

/// A reload reads the log keys again: new paths take over once the reload
/// succeeded; a path that cannot be written refuses the reload, and the
/// files in force are kept.
#[test]
fn a_reload_moves_the_files_and_refuses_a_path_it_cannot_write() {
    let dir = tempdir::Dir::new("logreload");
    let write = |out: &str| {
        one_app(
            &dir,
            "moving",
            "numbered.js",
            &format!(
                r#""merge_logs":true,"out_file":"{out}","env":{{"LOG_EVERY_MS":"20","LOG_PAD":"1"}}"#
            ),
        )
    };
    let cfg = write("a.log");
    let m = start_config(&cfg, None);
    let size = |n: &str| std::fs::metadata(dir.path.join(n)).map_or(0, |m| m.len());
    assert!(wait_until(T, || size("a.log") > 0), "{}", m.log());

    write("b.log");
    m.signal(libc::SIGHUP);
    assert!(m.wait_log("reload finished", T), "{}", m.log());
    assert!(wait_until(T, || size("b.log") > 0), "{}", m.log());
    let a = size("a.log");

    write("/proc/self/nope/c.log");
    m.signal(libc::SIGHUP);
    assert!(m.wait_log("reload refused", T), "{}", m.log());
    assert!(
        m.log().contains("key `out_file`") && m.log().contains("/proc/self/nope/c.log"),
        "{}",
        m.log()
    );
    let b = size("b.log");
    assert!(
        wait_until(T, || size("b.log") > b),
        "b.log stopped: {}",
        m.log()
    );
    assert_eq!(size("a.log"), a, "a.log is written again");
}

/// The log keys cross a re-exec with the rest of the configuration: the
/// new program writes on to the same files.
#[test]
fn a_reexec_writes_on_to_the_same_files() {
    let dir = tempdir::Dir::new("logreexec");
    let cfg = one_app(
        &dir,
        "carried",
        "numbered.js",
        r#""merge_logs":true,"out_file":"out.log","time":true,"env":{"LOG_EVERY_MS":"20","LOG_PAD":"1"}"#,
    );
    let m = start_config(&cfg, None);
    let size = || std::fs::metadata(dir.path.join("out.log")).map_or(0, |m| m.len());
    assert!(wait_until(T, || size() > 0), "{}", m.log());
    let workers = m.workers();
    m.signal(libc::SIGUSR2);
    assert!(m.wait_log("re-executed", T), "{}", m.log());
    let after = size();
    assert!(
        wait_until(T, || size() > after + 200),
        "out.log not written after the re-exec:\n{}",
        m.log()
    );
    assert_eq!(m.workers(), workers, "a worker was replaced");
    let text = std::fs::read_to_string(dir.path.join("out.log")).unwrap();
    let last = text.lines().last().unwrap();
    assert!(
        last.get(21..).is_some_and(|l| l.starts_with("w0 ")),
        "{last:?}"
    );
}
