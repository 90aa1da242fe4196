//! A compromised worker (a malicious npm dependency) tries what the manager
//! could do for it: bind a privileged port or a path it may not touch,
//! take the manager's own control socket, pile up sockets in the manager,
//! and change the preload the next worker loads. Each attempt must fail in
//! the worker, leave the manager as it was, and keep the app serving.
//!
//! Where an attempt matters only against workers of another user, they run
//! as `nobody` (65534) under this (root) manager, as `uid`/`gid` do;
//! without root those tests only check what they can.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

fn root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A directory `nobody` can read and enter (the apps live there).
fn open_dir(tag: &str) -> tempdir::Dir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempdir::Dir::new(tag);
    std::fs::set_permissions(&d.path, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Write an ecosystem file for `script` (already in `dir`) with `fields`.
fn eco(dir: &tempdir::Dir, name: &str, script: &Path, fields: serde_json::Value) -> PathBuf {
    let mut app = serde_json::json!({"name": name, "script": script});
    for (k, v) in fields.as_object().unwrap() {
        app[k] = v.clone();
    }
    dir.write(
        &format!("{name}.json"),
        &serde_json::json!({ "apps": [app] }).to_string(),
    )
}

/// The manager's private directory under the runtime base `rt`.
fn runtime_dir_of(m: &Manager, rt: &Path) -> PathBuf {
    let dir = std::fs::read_dir(rt)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&format!("-{}", m.pid())))
        });
    dir.unwrap_or_else(|| panic!("no runtime directory in {}:\n{}", rt.display(), m.log()))
}

// --- the preload ----------------------------------------------------------

/// What a compromised worker does to the preload: append code that leaves
/// a marker to everything it can find that a worker loads (the files its
/// command line names, every file in the manager's runtime directory, the
/// manager's memfds), then serve as usual.
const PLANTER: &str = r#"
const fs = require('fs');
const path = require('path');
const http = require('http');
const plant = `\n;require('fs').writeFileSync(${JSON.stringify(process.env.MARKER_DIR)} + '/planted.' + process.pid, '');\n`;
const tried = [];
const attempt = (what, f) => {
  try { f(); tried.push(`${what}: ok`); } catch (e) { tried.push(`${what}: ${e.code}`); }
};
if (process.env.ATTACK) {
  const argv = fs.readFileSync('/proc/self/cmdline', 'utf8').split('\0');
  argv.forEach((w, i) => {
    if (w === '--require' || w === '-r') attempt(`append ${argv[i + 1]}`, () => fs.appendFileSync(argv[i + 1], plant));
    const fd = /\/proc\/self\/fd\/(\d+)/.exec(decodeURIComponent(w));
    if (fd) attempt(`append fd ${fd[1]}`, () => fs.appendFileSync(`/proc/self/fd/${fd[1]}`, plant));
  });
  const dir = path.dirname(process.env.NOTIFY_SOCKET);
  for (const f of fs.readdirSync(dir)) {
    const p = path.join(dir, f);
    if (f !== 'manager.pid' && fs.statSync(p).isFile()) attempt(`append ${p}`, () => fs.appendFileSync(p, plant));
  }
  const mgr = `/proc/${process.ppid}/fd`;
  for (const fd of fs.readdirSync(mgr)) {
    let target = '';
    try { target = fs.readlinkSync(`${mgr}/${fd}`); } catch (_) { continue; }
    if (!target.startsWith('/memfd:')) continue;
    attempt(`append the manager's ${target}`, () => fs.appendFileSync(`${mgr}/${fd}`, plant));
    attempt(`truncate the manager's ${target}`, () => fs.truncateSync(`${mgr}/${fd}`, 0));
  }
  console.error(`attack: ${tried.join('; ')}`);
}
http.createServer((req, res) => res.end(JSON.stringify({ pid: process.pid }))).listen(8000);
"#;

#[test]
fn a_worker_cannot_change_the_preload_the_next_worker_loads() {
    let dir = open_dir("preload");
    let markers = dir.path.join("markers");
    std::fs::create_dir(&markers).unwrap();
    let script = dir.write("planter.js", PLANTER);
    let marker_dir = path_str(&markers);
    let write_config = |attack: bool| {
        let mut env = serde_json::json!({ "MARKER_DIR": marker_dir });
        if attack {
            env["ATTACK"] = "1".into();
        }
        eco(
            &dir,
            "planter",
            &script,
            serde_json::json!({"instances": 2, "env": env}),
        )
    };
    // Workers run as the manager's own user: the case where a file the
    // manager writes is a file the worker can rewrite.
    let cfg = write_config(true);
    let m = start_config(&cfg, None);
    let port = m.port();
    assert_eq!(instances_answering_pid(port, 2), 2, "{}", m.log());
    assert!(
        wait_until(T, || m.log().matches("attack: ").count() >= 2),
        "{}",
        m.log()
    );
    // A clean deploy, then a reload: every new worker must run clean.
    write_config(false);
    let old = m.workers();
    m.signal(libc::SIGHUP);
    assert!(m.wait_log("reload finished: 2/2", T), "{}", m.log());
    assert!(
        wait_until(T, || m.workers().iter().all(|p| !old.contains(p))),
        "{}",
        m.log()
    );
    assert_eq!(instances_answering_pid(port, 2), 2, "{}", m.log());
    let planted: Vec<String> = std::fs::read_dir(&markers)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        planted.is_empty(),
        "planted code ran in {planted:?}:\n{}",
        m.log()
    );
    // The memfd refused the writes it was offered.
    assert!(
        m.log()
            .contains("append the manager's /memfd:nodeherd-preload (deleted): EPERM"),
        "{}",
        m.log()
    );
}

/// Distinct worker pids answering on `port` (up to `want`).
fn instances_answering_pid(port: u16, want: usize) -> usize {
    let mut seen = std::collections::BTreeSet::new();
    wait_until(T, || {
        if let Ok(v) = get_json(port) {
            seen.insert(v["pid"].as_u64().unwrap_or(0));
        }
        seen.len() >= want
    });
    seen.len()
}
