//! Environment and secrets (issue 30): `env_file` read at start and again
//! by a reload, systemd credentials reaching workers through
//! $CREDENTIALS_DIRECTORY, and no value of `env`, `env_file` or a
//! credential in anything nodeherd prints: `status`, `--json`, D-Bus
//! properties, the journal (the reload's summary too), metrics, and
//! `install --dry-run`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

const IN_ENV: &str = "env-s3cret-1a2b";
const IN_ENV_ROTATED: &str = "env-s3cret-rotated-9i0j";
const IN_FILE: &str = "file-s3cret-3c4d";
const IN_FILE_ROTATED: &str = "file-s3cret-rotated-7g8h";
const IN_CREDENTIAL: &str = "cred-s3cret-5e6f";

/// GET `path` and parse the JSON body.
fn ask(port: u16, path: &str) -> Option<serde_json::Value> {
    let (status, body) = get(port, path).ok()?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn config(dir: &tempdir::Dir, secret: &str) -> std::path::PathBuf {
    dir.write(
        "secrets.json",
        &serde_json::json!({"apps": [{
            "name": "secrets", "script": app("keys.js"), "instances": 2,
            "env": {"SECRET_A": secret},
            "env_file": [".env.defaults", ".env"],
            "metrics": "127.0.0.1:0",
        }]})
        .to_string(),
    )
}

#[test]
fn no_secret_is_ever_printed_and_env_file_changes_reach_workers_by_a_reload() {
    let dir = tempdir::Dir::new("secrets");
    // Later files win; `env` wins over both.
    dir.write(
        ".env.defaults",
        "SECRET_B=overridden\nPLAIN=from-defaults\n",
    );
    dir.write(
        ".env",
        &format!("# the app's secrets\nSECRET_B=\"{IN_FILE}\"\n"),
    );
    let creds = tempdir::Dir::new("secrets-creds");
    creds.write("db", IN_CREDENTIAL);
    let cfg = config(&dir, IN_ENV);
    let bus = DbusDaemon::start();
    let creds_dir = path_str(&creds.path);
    let mut m = start(
        &[
            "run",
            &path_str(&cfg),
            "--listen",
            "127.0.0.1:0",
            "--bus",
            &bus.address,
        ],
        // As systemd sets it for LoadCredential=.
        &[("CREDENTIALS_DIRECTORY", &creds_dir)],
    );
    let port = m.port();
    let path = "/?vars=SECRET_A,SECRET_B,PLAIN&cred=db";
    let mut seen = None;
    assert!(
        wait_until(T, || {
            seen = ask(port, path);
            seen.is_some()
        }),
        "{}",
        m.log()
    );
    let v = seen.unwrap();
    assert_eq!(v["vars"]["SECRET_A"], IN_ENV);
    assert_eq!(v["vars"]["SECRET_B"], IN_FILE, "the later env_file wins");
    assert_eq!(v["vars"]["PLAIN"], "from-defaults");
    assert_eq!(v["credentials_directory"], creds_dir.as_str());
    assert_eq!(v["credential"], IN_CREDENTIAL);

    // A changed env_file and env, applied by `nodeherd reload`.
    dir.write(".env", &format!("SECRET_B={IN_FILE_ROTATED}\n"));
    config(&dir, IN_ENV_ROTATED);
    let (code, reload_out, reload_err) = client(&["reload", "secrets", "--bus", &bus.address]);
    assert_eq!(code, 0, "{reload_err}");
    assert!(
        reload_out.contains("env: SECRET_A changed, SECRET_B changed"),
        "the summary names what changed (on stdout): {reload_out}{reload_err}"
    );
    for _ in 0..20 {
        let v = ask(port, path).unwrap();
        assert_eq!(v["vars"]["SECRET_A"], IN_ENV_ROTATED);
        assert_eq!(v["vars"]["SECRET_B"], IN_FILE_ROTATED);
    }

    // Everything a person or a program can read from nodeherd.
    let mut outputs: Vec<(String, String)> = vec![(
        "reload's answer".into(),
        format!("{reload_out}{reload_err}"),
    )];
    for args in [
        &["status", "secrets"][..],
        &["status", "secrets", "--json"][..],
    ] {
        let (code, out, err) = client(&[args, &["--bus", &bus.address]].concat());
        assert_eq!(code, 0, "{err}");
        outputs.push((args.join(" "), format!("{out}{err}")));
    }
    let name = "org.nodeherd.secrets";
    let (_, props, _) = bus.busctl(&["introspect", name, "/org/nodeherd", "--no-pager"]);
    assert!(props.contains(".Workers"), "{props}");
    outputs.push(("D-Bus properties".into(), props));
    let metrics_port: u16 = m
        .log()
        .lines()
        .find_map(|l| l.split_once("metrics: http://127.0.0.1:"))
        .and_then(|(_, rest)| rest.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no metrics line: {}", m.log()));
    outputs.push(("metrics".into(), scrape(metrics_port)));
    let units = tempdir::Dir::new("secrets-units");
    let (code, out, err) = client(&[
        "install",
        &path_str(&cfg),
        "--config-dir",
        &path_str(&units.path.join("etc")),
        "--unit-dir",
        &path_str(&units.path.join("units")),
        "--credential",
        &format!("db={}", creds.path.join("db").display()),
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!(
            "LoadCredential=db:{}",
            creds.path.join("db").display()
        )),
        "{out}"
    );
    assert!(
        out.contains("\"SECRET_A\": \"(hidden)\""),
        "names only: {out}"
    );
    outputs.push(("install --dry-run".into(), format!("{out}{err}")));
    // The whole journal, to the manager's last line.
    m.signal(libc::SIGTERM);
    assert!(m.wait_exit(T).is_some(), "{}", m.log());
    outputs.push(("the journal".into(), m.log()));

    for (what, text) in &outputs {
        for secret in [
            IN_ENV,
            IN_ENV_ROTATED,
            IN_FILE,
            IN_FILE_ROTATED,
            IN_CREDENTIAL,
        ] {
            assert!(
                !text.contains(secret),
                "{what} shows a secret value ({secret}):\n{text}"
            );
        }
    }
}

/// A hostile ecosystem file under a root manager whose workers run as
/// `nobody` names a file only root may read as its `env_file`: the
/// manager reads it with the workers' rights, so it is refused, and the
/// refusal shows none of it.
#[test]
fn an_env_file_the_workers_user_cannot_read_is_refused_without_a_word_of_it() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run workers as nobody");
        return;
    }
    let dir = tempdir::Dir::new("envfile-rights");
    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = dir.write("root-only.env", "STOLEN=root-only-v4lue\n");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = dir.write(
        "hostile.json",
        &serde_json::json!({"apps": [{
            "name": "hostile", "script": app("keys.js"), "uid": "nobody",
            "env_file": path_str(&secret),
        }]})
        .to_string(),
    );
    let (code, log) = run_to_end(
        &[
            "run",
            &path_str(&cfg),
            "--listen",
            "127.0.0.1:0",
            "--no-bus",
        ],
        T,
    );
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("key `env_file`"), "{log}");
    assert!(log.contains("Permission denied"), "{log}");
    assert!(!log.contains("root-only-v4lue"), "{log}");
}

/// An `env_file` that is a FIFO (or a device) would hold the configuration
/// load, and with it the start or every reload, forever: refused.
#[test]
fn an_env_file_that_is_no_regular_file_is_refused_at_once() {
    let dir = tempdir::Dir::new("envfile-fifo");
    let fifo = dir.path.join("fifo.env");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    for env_file in [path_str(&fifo), "/dev/zero".to_string()] {
        let cfg = dir.write(
            "fifo.json",
            &serde_json::json!({"apps": [{
                "name": "fifo", "script": app("keys.js"), "env_file": env_file,
            }]})
            .to_string(),
        );
        let (code, log) = run_to_end(&["run", &path_str(&cfg), "--no-bus"], T);
        assert_eq!(code, Some(2), "{log}");
        assert!(log.contains("not a regular file"), "{log}");
    }
}
