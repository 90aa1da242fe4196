//! The ecosystem file's author attacks `nodeherd install` (and `nodeherd
//! run`) run as root: code in a `.config.js`, lines smuggled into a unit
//! file through any value install writes there, workers run as a user the
//! file names. Each attempt must fail, and a refused install must have
//! written nothing. The copy holding `env` never being readable by others
//! is a unit test of its writer (src/install.rs), since only the moment
//! before its first byte tells.
//!
//! Real installs here run with a PATH holding `node` alone: one that got
//! past the checks by mistake writes into the test's directories and then
//! fails to find `systemd-sysusers`, so it never touches this machine's
//! users or units.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// The test runs as root, as `sudo nodeherd install` does.
fn assert_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these attacks are on a root install: run the tests as root"
    );
}

/// Files written by an attempt, removed whatever the outcome.
struct Planted(Vec<PathBuf>);

impl Drop for Planted {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Where a real install writes in a test, and a PATH with `node` alone.
struct Target {
    out: PathBuf,
    bin: PathBuf,
}

impl Target {
    fn new(dir: &tempdir::Dir) -> Target {
        let bin = dir.path.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink("/usr/bin/node", bin.join("node")).unwrap();
        Target {
            out: dir.path.join("out"),
            bin,
        }
    }

    fn dir_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        for (flag, sub) in [
            ("--config-dir", "etc/nodeherd"),
            ("--unit-dir", "etc/systemd/system"),
            ("--bus-policy-dir", "etc/dbus-1/system.d"),
            ("--sysusers-dir", "etc/sysusers.d"),
        ] {
            a.push(flag.to_string());
            a.push(path_str(&self.out.join(sub)));
        }
        a
    }

    /// `nodeherd install FILE EXTRA...` for real: (exit code, stdout, stderr).
    fn install(&self, file: &Path, extra: &[&str]) -> (i32, String, String) {
        let out = Command::new(BIN)
            .arg("install")
            .arg(file)
            .args(extra)
            .args(self.dir_args())
            .env_clear()
            .env("PATH", &self.bin)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// Every file under the install's directories.
    fn written(&self) -> Vec<PathBuf> {
        fn walk(p: &Path, into: &mut Vec<PathBuf>) {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        walk(&p, into);
                    } else {
                        into.push(p);
                    }
                }
            }
        }
        let mut v = Vec::new();
        walk(&self.out, &mut v);
        v
    }
}

/// The `.config.js` of the attack: it tries to write where only root may,
/// to become root again, and to use a descriptor of the process that
/// evaluates it, and reports what it was and what it saw in the app's env.
fn hostile_config_js(targets: &[&Path], fd: i32) -> String {
    let targets: Vec<String> = targets
        .iter()
        .map(|p| format!("{:?}", path_str(p)))
        .collect();
    format!(
        r#"
const fs = require('fs');
const wrote = [];
for (const p of [{targets}]) {{
  try {{ fs.writeFileSync(p, 'pwned by the ecosystem file\n'); wrote.push(p); }} catch (e) {{ wrote.push(e.code); }}
}}
let setuid;
try {{ process.setuid(0); setuid = 'root again'; }} catch (e) {{ setuid = e.code; }}
let fd;
try {{ fd = fs.readlinkSync('/proc/self/fd/{fd}'); }} catch (e) {{ fd = e.code; }}
const nnp = /NoNewPrivs:\s*(\d)/.exec(fs.readFileSync('/proc/self/status', 'utf8'))[1];
const seen = ['uid=' + process.getuid(), 'groups=' + process.getgroups().join('+'),
  'secret=' + (process.env.NODEHERD_TEST_SECRET || 'none'), 'wrote=' + wrote.join('+'),
  'setuid=' + setuid, 'fd=' + fd, 'nnp=' + nnp].join(' ');
module.exports = {{ apps: [{{ name: 'evil', script: {script:?}, instances: 1, args: seen, env: {{ MARKER: seen }} }}] }};
"#,
        targets = targets.join(", "),
        script = path_str(&app("env.js")),
    )
}

/// What the hostile config saw, as a root that drops it would have it.
fn assert_confined(seen: &str, targets: &[&Path]) {
    for p in targets {
        assert!(!p.exists(), "{} was written: {seen}", p.display());
    }
    for want in [
        "uid=65534",
        "groups=65534 ",
        "secret=none",
        "wrote=EACCES+EACCES",
        "setuid=EPERM",
        "fd=ENOENT",
        "nnp=1",
    ] {
        assert!(seen.contains(want), "expected {want}: {seen}");
    }
}

/// `cmd` inherits `file` at descriptor 77, without close-on-exec, as a
/// manager holds its listening sockets, and root's supplementary groups
/// include `shadow` (42), as a login's may.
fn hold_at_77(cmd: &mut Command, file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    let raw = file.as_raw_fd();
    // SAFETY: dup2 and setgroups are async-signal-safe, and `file`
    // outlives the spawn.
    unsafe {
        cmd.pre_exec(move || {
            let groups: [libc::gid_t; 2] = [0, 42];
            if libc::dup2(raw, 77) < 0 || libc::setgroups(2, groups.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A root-owned directory only root may write to, as /etc is.
fn root_only_dir(dir: &tempdir::Dir) -> PathBuf {
    let d = dir.path.join("root-only");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

#[test]
fn a_root_install_evaluates_a_config_js_as_nobody_with_nothing_of_roots() {
    assert_root();
    let dir = tempdir::Dir::new("trust-eval");
    let etc_target = PathBuf::from(format!("/etc/nodeherd-pwned-{}", std::process::id()));
    let local_target = root_only_dir(&dir).join("pwned");
    let _planted = Planted(vec![etc_target.clone(), local_target.clone()]);
    let targets = [etc_target.as_path(), local_target.as_path()];
    let eco = dir.write("ecosystem.config.js", &hostile_config_js(&targets, 77));
    // A secret in root's environment, and a descriptor of the caller's.
    let held = std::fs::File::open(&eco).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("install")
        .arg(&eco)
        .args(["--dry-run", "--config-dir"])
        .arg(dir.path.join("etc"))
        .env("NODEHERD_TEST_SECRET", "root's token")
        .stdin(Stdio::null());
    hold_at_77(&mut cmd, &held);
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // What it saw, in `args` (a dry run hides `env` values).
    let seen = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"args\": "))
        .unwrap_or_else(|| panic!("no args in the copy: {stdout}"));
    assert_confined(seen, &targets);
}

#[test]
fn a_root_manager_evaluates_a_config_js_as_nobody_too() {
    assert_root();
    let dir = tempdir::Dir::new("trust-run");
    let target = root_only_dir(&dir).join("pwned");
    let _planted = Planted(vec![target.clone()]);
    let eco = dir.write(
        "ecosystem.config.js",
        &hostile_config_js(&[&target, &target], 77),
    );
    let held = std::fs::File::open(&eco).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "run",
        &path_str(&eco),
        "--listen",
        "127.0.0.1:0",
        "--no-bus",
    ])
    .env("NODEHERD_TEST_SECRET", "root's token")
    .env_remove("NOTIFY_SOCKET")
    .env_remove("LISTEN_FDS")
    .env_remove("LISTEN_PID")
    .env_remove("RUNTIME_DIRECTORY")
    .stdin(Stdio::null());
    hold_at_77(&mut cmd, &held);
    let m = spawn_collecting(cmd);
    let port = m.port();
    let v = get_json(port).unwrap_or_else(|e| panic!("{e}\n{}", m.log()));
    let seen = v["marker"].as_str().unwrap_or_default();
    assert_confined(seen, &[&target]);
}

#[test]
fn a_config_js_nobody_cannot_read_is_refused_saying_how() {
    assert_root();
    let dir = tempdir::Dir::new("trust-unreadable");
    let private = dir.path.join("private");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let eco = private.join("ecosystem.config.js");
    std::fs::write(
        &eco,
        format!(
            "module.exports = {{ apps: [{{ name: 'shop', script: {:?} }}] }};",
            path_str(&app("env.js"))
        ),
    )
    .unwrap();
    let t = Target::new(&dir);
    let (code, _, err) = t.install(&eco, &[]);
    assert_eq!(code, 2, "{err}");
    for want in ["evaluated the file as user nobody", "convert it to JSON"] {
        assert!(err.contains(want), "expected {want:?}: {err}");
    }
    assert_eq!(t.written(), Vec::<PathBuf>::new());
}

/// Each value install writes into a unit file, from the file or the
/// command line, tried with a line of the attacker's own after it.
#[test]
fn values_that_would_add_a_line_to_a_unit_file_are_refused_and_nothing_is_written() {
    assert_root();
    let dir = tempdir::Dir::new("trust-inject");
    let script = path_str(&app("env.js"));
    let t = Target::new(&dir);
    let evil = "ExecStartPre=/bin/touch /tmp/nodeherd-injected";
    let file = |n: usize, app: serde_json::Value| {
        dir.write(
            &format!("inject-{n}.json"),
            &serde_json::json!({ "apps": [app] }).to_string(),
        )
    };
    let app_with = |k: &str, v: serde_json::Value| {
        let mut a = serde_json::json!({"name": "shop", "script": script});
        a[k] = v;
        a
    };
    // (ecosystem entry, command-line flags, what the error must name)
    let cases: Vec<(serde_json::Value, Vec<String>, &str)> = vec![
        (
            app_with(
                "listen",
                serde_json::json!([format!("unix:/run/a.sock\n{evil}")]),
            ),
            vec![],
            "key `listen`",
        ),
        (
            app_with(
                "listen",
                serde_json::json!(format!("unix:/run/a.sock\r{evil}")),
            ),
            vec![],
            "key `listen`",
        ),
        (
            app_with("listen", serde_json::json!(["unix:/run/a.sock\\"])),
            vec![],
            "key `listen`",
        ),
        (
            app_with(
                "listen",
                serde_json::json!(["127.0.0.1:8000", "unix:/run/a\u{0b}b.sock"]),
            ),
            vec![],
            "key `listen`",
        ),
        (
            app_with("listen", serde_json::json!(["localhost:8000"])),
            vec![],
            "key `listen`",
        ),
        (
            app_with("listen", serde_json::json!([{"port": 1}])),
            vec![],
            "key `listen`",
        ),
        (
            app_with("name", serde_json::json!("shop")),
            vec!["--listen".into(), format!("unix:/run/a.sock\n{evil}")],
            "--listen",
        ),
        (
            app_with("name", serde_json::json!("shop")),
            vec!["--socket-group".into(), format!("www-data\n{evil}")],
            "--socket-group",
        ),
        (
            app_with("name", serde_json::json!("shop")),
            vec!["--socket-group".into(), "no-such-group-here".into()],
            "--socket-group",
        ),
        (
            app_with("name", serde_json::json!(format!("shop\n{evil}"))),
            vec![],
            "app name",
        ),
        (
            app_with(
                "name",
                serde_json::json!("shop\"/><allow own=\"org.freedesktop.DBus\"/>"),
            ),
            vec![],
            "app name",
        ),
        (
            app_with("uid", serde_json::json!("root")),
            vec![],
            "key `uid`",
        ),
        (app_with("uid", serde_json::json!(0)), vec![], "key `uid`"),
        (
            app_with("gid", serde_json::json!("root")),
            vec![],
            "key `gid`",
        ),
        (app_with("gid", serde_json::json!("0")), vec![], "key `gid`"),
        (
            app_with("uid", serde_json::json!("nobody")),
            vec![],
            "key `uid`",
        ),
    ];
    let mut held = Vec::new();
    for (n, (entry, flags, names)) in cases.into_iter().enumerate() {
        let eco = file(n, entry.clone());
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let (code, _, err) = t.install(&eco, &flags);
        let written = t.written();
        if code != 2 || !err.contains(names) || !written.is_empty() {
            held.push(format!(
                "{entry} {flags:?}: exit {code}, wrote {written:?}: {}",
                err.trim()
            ));
        }
        let _ = std::fs::remove_dir_all(&t.out);
    }
    assert!(held.is_empty(), "not refused:\n{}", held.join("\n"));
}

/// What goes only into the JSON copy may hold anything: JSON escapes it,
/// and no unit file gets it.
#[test]
fn values_that_stay_in_the_json_copy_reach_no_unit_file() {
    let dir = tempdir::Dir::new("trust-json");
    let evil = "\nExecStartPre=/bin/touch /tmp/nodeherd-injected\n";
    let eco = dir.write(
        "eco.json",
        &serde_json::json!({"apps": [{
            "name": "shop",
            "script": path_str(&app("env.js")),
            "env": {"A": evil},
            "args": [evil],
            "node_args": [format!("--title={evil}")],
            "listen": ["127.0.0.1:8000", "unix:/run/shop%i.sock"],
        }]})
        .to_string(),
    );
    let (code, out, err) = client(&[
        "install",
        &path_str(&eco),
        "--dry-run",
        "--config-dir",
        &path_str(&dir.path.join("etc")),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.lines().any(|l| l.starts_with("ExecStartPre")),
        "a line was added: {out}"
    );
    // `%i` would be the instance name to systemd: kept literal.
    assert!(
        out.contains(
            "[Socket]\nListenStream=\nListenStream=127.0.0.1:8000\nListenStream=/run/shop%%i.sock\nSocketMode=0660\nSocketGroup=nodeherd-shop\n"
        ),
        "{out}"
    );
}

/// The app's Unix socket is not every local user's: 0660, for the app's
/// own group unless `--socket-group` names the proxy's.
#[test]
fn the_socket_is_for_a_group_not_for_everyone() {
    let dir = tempdir::Dir::new("trust-socket");
    let eco = one_app(&dir, "shop", "env.js", "");
    let etc = path_str(&dir.path.join("etc"));
    let run = |extra: &[&str]| {
        let mut a = vec![
            "install",
            eco.to_str().unwrap(),
            "--dry-run",
            "--config-dir",
            &etc,
        ];
        a.extend_from_slice(extra);
        client(&a)
    };
    let (code, out, err) = run(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("[Socket]\nSocketMode=0660\nSocketGroup=nodeherd-shop\n"),
        "{out}"
    );
    let (code, out, err) = run(&[
        "--socket-group",
        "www-data",
        "--listen",
        "unix:/run/shop.sock",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ListenStream=/run/shop.sock\nSocketMode=0660\nSocketGroup=www-data\n"),
        "{out}"
    );
    // A numeric group is fine too, once it exists.
    let (code, out, err) = run(&["--socket-group", "33"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("SocketGroup=33\n"), "{out}");
}

/// `uid`/`gid` naming the app's own user are what the root-manager recipe
/// needs, and are kept, though install has not made that user yet.
#[test]
fn uid_and_gid_may_name_the_apps_own_user() {
    let dir = tempdir::Dir::new("trust-own");
    let eco = one_app(
        &dir,
        "shop",
        "env.js",
        r#""uid":"nodeherd-shop","gid":"nodeherd-shop""#,
    );
    let (code, out, err) = client(&[
        "install",
        &path_str(&eco),
        "--dry-run",
        "--config-dir",
        &path_str(&dir.path.join("etc")),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"uid\": \"nodeherd-shop\""), "{out}");
}

/// A `.config.js` that answers one way when it is checked and another when
/// it is written: install evaluates it once and writes what it checked.
#[test]
fn a_config_js_gets_one_evaluation_so_what_is_checked_is_what_is_written() {
    assert_root();
    let dir = tempdir::Dir::new("trust-twice");
    // Somewhere nobody may count its evaluations.
    let count = dir.path.join("count");
    std::fs::create_dir_all(&count).unwrap();
    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&count, std::fs::Permissions::from_mode(0o777)).unwrap();
    let eco = dir.write(
        "ecosystem.config.js",
        &format!(
            r#"
const fs = require('fs');
const f = {count:?} + '/n';
let n = 0;
try {{ n = Number(fs.readFileSync(f, 'utf8')); }} catch (_) {{}}
fs.writeFileSync(f, String(n + 1));
// The first answer would run the workers as root; any later one is clean.
const app = {{ name: 'twice', script: {script:?} }};
if (n === 0) app.uid = 'root';
module.exports = {{ apps: [app] }};
"#,
            count = path_str(&count),
            script = path_str(&app("env.js")),
        ),
    );
    let t = Target::new(&dir);
    let (code, out, err) = t.install(&eco, &[]);
    let evaluations = std::fs::read_to_string(count.join("n")).unwrap_or_default();
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("key `uid`"), "{err}");
    assert_eq!(evaluations, "1", "evaluated {evaluations} times");
    assert_eq!(t.written(), Vec::<PathBuf>::new());
}
