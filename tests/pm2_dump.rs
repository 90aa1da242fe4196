//! `nodeherd install` of PM2's saved list: a real `dump.pm2` written by
//! PM2 7 itself (`pm2 start` + `pm2 save` in a PM2_HOME of the test's own),
//! and hostile dumps made from it. PM2 is installed as the benchmark
//! installs it, into a cache directory; the test is skipped, saying so,
//! only when it cannot be installed at all (no npm, no registry, no cache).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const PM2_VERSION: &str = "7.0.4";
const CACHE: &str = "/var/cache/nodeherd-ci";
const T: Duration = Duration::from_secs(60);

/// The `pm2` command, installed into the cache if it is not there yet
/// (once: the tests of this file run side by side).
fn pm2() -> Option<PathBuf> {
    static PM2: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    PM2.get_or_init(install_pm2).clone()
}

fn install_pm2() -> Option<PathBuf> {
    let prefix = Path::new(CACHE).join(format!("pm2-{PM2_VERSION}"));
    let bin = prefix.join("node_modules/.bin/pm2");
    let version_ok = || {
        std::fs::read_to_string(prefix.join("node_modules/pm2/package.json"))
            .is_ok_and(|p| p.contains(&format!("\"version\": \"{PM2_VERSION}\"")))
    };
    if !(bin.exists() && version_ok()) {
        let _ = std::fs::create_dir_all(&prefix);
        let status = Command::new("timeout")
            .arg("300")
            .arg("npm")
            .args(["install", "--prefix"])
            .arg(&prefix)
            .args(["--cache", &format!("{CACHE}/npm"), "--prefer-offline"])
            .args(["--no-audit", "--no-fund", "--loglevel=error"])
            .arg(format!("pm2@{PM2_VERSION}"))
            .stdin(Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) || !version_ok() {
            eprintln!(
                "SKIPPED: pm2@{PM2_VERSION} could not be installed into {} (npm install failed): \
                 no real PM2 dump to read",
                prefix.display()
            );
            return None;
        }
    }
    Some(bin)
}

/// A PM2 daemon of the test's own, killed by its pid (its apps first)
/// whatever the outcome.
struct Pm2 {
    bin: PathBuf,
    home: PathBuf,
    dir: tempdir::Dir,
}

impl Pm2 {
    /// `pm2 ARGS` with a shell-like environment of the test's making:
    /// PATH, HOME, LANG and a token the shell exported, as PM2 captures.
    fn run(&self, args: &[&str]) {
        let out = Command::new(&self.bin)
            .args(args)
            .current_dir(&self.dir.path)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &self.dir.path)
            .env("LANG", "C.UTF-8")
            .env("PM2_HOME", &self.home)
            .env("SHELL_TOKEN", "shell-token-4c1d9e")
            .stdin(Stdio::null())
            .output()
            .expect("running pm2");
        assert!(
            out.status.success(),
            "pm2 {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Pm2 {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(self.home.join("pm2.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            for child in children(pid) {
                kill(child, libc::SIGKILL);
            }
            kill(pid, libc::SIGKILL);
        }
    }
}

/// `nodeherd install FILE EXTRA...` into directories under `root`.
fn install(file: &Path, root: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("install").arg(file).args(extra);
    for (flag, sub) in [
        ("--config-dir", "etc/nodeherd"),
        ("--unit-dir", "etc/systemd/system"),
        ("--bus-policy-dir", "etc/dbus-1/system.d"),
        ("--sysusers-dir", "etc/sysusers.d"),
    ] {
        cmd.arg(flag).arg(root.join(sub));
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A dump written by PM2 itself: `shop` in cluster mode (2 instances, a
/// secret in its env), `cron` in fork mode.
fn real_dump() -> Option<(Pm2, PathBuf)> {
    let bin = pm2()?;
    let dir = tempdir::Dir::new("pm2dump");
    let home = dir.path.join("pm2-home");
    let eco = format!(
        "module.exports = {{ apps: [
  {{ name: 'shop', script: {script:?}, exec_mode: 'cluster', instances: 2, kill_timeout: 3000,
     env: {{ PORT: '{port}', DB_PASSWORD: 'db-secret-8f2a71', NODE_ENV: 'production' }} }},
  {{ name: 'cron', script: {script:?}, exec_mode: 'fork',
     env: {{ PORT: '{port2}', NODE_ENV: 'production' }} }},
] }};
",
        script = path_str(&app("own_port.js")),
        port = free_port(),
        port2 = free_port(),
    );
    dir.write("ecosystem.config.js", &eco);
    let pm2 = Pm2 { bin, home, dir };
    pm2.run(&["start", "ecosystem.config.js"]);
    pm2.run(&["save"]);
    let dump = pm2.home.join("dump.pm2");
    assert!(
        wait_until(T, || dump.exists()),
        "pm2 save wrote no {}",
        dump.display()
    );
    Some((pm2, dump))
}

#[test]
fn install_takes_the_cluster_apps_of_a_real_pm2_dump_with_their_env_and_no_secret_printed() {
    let Some((pm2, dump)) = real_dump() else {
        return;
    };
    let text = std::fs::read_to_string(&dump).unwrap();
    let procs: serde_json::Value = serde_json::from_str(&text).unwrap();
    // What PM2 7 writes: a process each, the shell's environment in `env`.
    assert!(
        procs[0]["_pm2_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("7.")),
        "{}",
        procs[0]["_pm2_version"]
    );
    assert_eq!(procs.as_array().unwrap().len(), 3, "shop x2, cron");
    assert_eq!(procs[0]["env"]["SHELL_TOKEN"], "shell-token-4c1d9e");

    let root = pm2.dir.path.join("root");
    let (code, out, err) = install(&dump, &root, &["--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    let d = path_str(&dump);
    for want in [
        format!("{d}: shop: 2 instance(s), env DB_PASSWORD, NODE_ENV, PORT (values not shown)"),
        format!("{d}: cron: skipped: fork_mode (one process)"),
        "PM2's own keys (pm_id".to_string(),
        "\"instances\": 2".into(),
        "\"exec_mode\": \"cluster\"".into(),
        format!("\"script\": \"{}\"", path_str(&app("own_port.js"))),
        format!("\"cwd\": \"{}\"", path_str(&pm2.dir.path)),
        "\"kill_timeout\": 3000".into(),
        "\"DB_PASSWORD\": \"(hidden)\"".into(),
        "--- would run: systemctl enable nodeherd@shop.socket".into(),
    ] {
        assert!(out.contains(&want), "want {want:?} in\n{out}");
    }
    // The shell's variables are named as left out, never installed.
    let left_out = out
        .lines()
        .find(|l| l.contains("shop: ") && l.contains("left out as the environment of the shell"))
        .unwrap_or_else(|| panic!("{out}"));
    for name in ["SHELL_TOKEN", "PATH", "HOME", "LANG"] {
        assert!(left_out.contains(name), "{name}: {left_out}");
    }
    let copy = out
        .split("--- would write ")
        .find(|s| s.contains("etc/nodeherd/shop.json"))
        .unwrap_or_else(|| panic!("{out}"));
    for name in [
        "SHELL_TOKEN",
        "\"PATH\"",
        "\"HOME\"",
        "PM2_HOME",
        "unique_id",
        "pm_id",
    ] {
        assert!(!copy.contains(name), "{name} in the copy:\n{copy}");
    }
    assert!(!out.contains("nodeherd@cron"), "{out}");
    // No value of the app's env nor of the shell's is printed.
    for secret in ["db-secret-8f2a71", "shell-token-4c1d9e"] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "{secret}:\n{out}{err}"
        );
    }
    assert!(!root.exists(), "a dry run writes nothing");
}

/// A dump is JSON another program wrote, read by root: each hostile one
/// is refused (exit 2) with a clear message, before anything is written.
#[test]
fn hostile_dumps_are_refused_and_nothing_is_written() {
    let Some((pm2, dump)) = real_dump() else {
        return;
    };
    let real: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dump).unwrap()).unwrap();
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = real.clone();
        f(&mut v);
        v.to_string()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "a name with a newline and a unit line",
            with(&|v| v[0]["name"] = "shop\nExecStartPre=/bin/sh -c id".into()),
            "`name` has a control character",
        ),
        (
            "a script path with a newline",
            with(&|v| v[0]["pm_exec_path"] = "/srv/app.js\nExecStartPre=/bin/id".into()),
            "`pm_exec_path` has a control character",
        ),
        (
            "a variable name with a newline",
            with(&|v| v[0]["env"]["A\nExecStartPre"] = "1".into()),
            "a variable name in `env` that no environment has",
        ),
        (
            "a name that would close the bus policy's XML",
            with(&|v| {
                for p in v.as_array_mut().unwrap() {
                    if p["name"] == "shop" {
                        p["name"] = "shop\"/><allow own=\"x".into();
                    }
                }
            }),
            "cannot be a systemd instance name",
        ),
        (
            "node_args that would add a line",
            with(&|v| v[0]["node_args"] = serde_json::json!(["--a\n[Service]"])),
            "`node_args` has a control character",
        ),
        (
            "deep nesting",
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
            "not a PM2 dump",
        ),
        (
            "not an array",
            "{\"apps\": []}".into(),
            "expected the JSON array",
        ),
    ];
    for (what, text, want) in cases {
        let file = pm2.dir.write("hostile.pm2", &text);
        let root = pm2.dir.path.join("root");
        let (code, out, err) = install(&file, &root, &[]);
        assert_eq!(code, 2, "{what}: {out}{err}");
        assert!(err.contains(want), "{what}: want {want:?}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: one line: {err}");
        assert!(!root.exists(), "{what}: something was written");
    }
    // Huge: refused by its size, unread.
    let huge = pm2.dir.path.join("huge.pm2");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let (code, _, err) = install(&huge, &pm2.dir.path.join("root"), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("more than the 32 MiB a PM2 dump takes"),
        "{err}"
    );
}
