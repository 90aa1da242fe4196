//! A `.config.js` that node cannot evaluate: the error is shown as node
//! shows it (the file and line, the offending line, a caret under it), on
//! several lines, exit 2; and what the file's text says reaches systemd's
//! notify socket as text, never as an assignment of its own.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

/// An ecosystem file with a comma missing at the end of line 3.
const MISSING_COMMA: &str = "module.exports = {
  apps: [{
    name: 'api'
    script: 'app.js',
  }],
};
";

fn run_to_end_code(file: &str) -> (Option<i32>, String) {
    run_to_end(&["run", file, "--no-bus"], T)
}

#[test]
fn a_syntax_error_shows_the_file_line_and_a_caret_as_node_does() {
    let dir = tempdir::Dir::new("syntax");
    for (name, text, shown_as) in [
        ("bad.config.js", MISSING_COMMA.to_string(), String::new()),
        (
            "bad.config.mjs",
            MISSING_COMMA.replace("module.exports =", "export default"),
            "file://".to_string(),
        ),
    ] {
        let file = path_str(&dir.write(name, &text));
        let (code, err) = run_to_end_code(&file);
        assert_eq!(code, Some(2), "{err}");
        let want = format!(
            "nodeherd: error: {file}: evaluating it with node failed (exit status: 1):
    {shown_as}{file}:4
        script: 'app.js',
        ^^^^^^

    SyntaxError: Unexpected identifier 'script'
"
        );
        assert!(err.contains(&want), "{name}: want\n{want}\ngot\n{err}");
        // Neither node's internals nor the hint for files nobody cannot
        // read: the error is in the file's text.
        assert!(!err.contains("node:internal"), "{err}");
        assert!(!err.contains("as user nobody"), "{err}");
        assert!(!err.contains(" | "), "{err}");
    }
    // `install` reads it the same way.
    let file = path_str(&dir.path.join("bad.config.js"));
    let etc = tempdir::Dir::new("syntax-etc");
    let out = Command::new(BIN)
        .args(["install", &file, "--dry-run", "--config-dir"])
        .arg(&etc.path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("\n        script: 'app.js',\n        ^^^^^^\n"),
        "{err}"
    );
}

/// Under socket activation a configuration error goes to systemd as
/// `STATUS=`. The excerpt quotes the file: its line `READY=1` must arrive
/// inside that one status text, not as a line systemd reads as READY=1.
#[test]
fn the_excerpt_reaches_systemd_as_one_status_line() {
    let dir = tempdir::Dir::new("syntax-notify");
    let file = path_str(&dir.write(
        "inj.config.js",
        "const READY = 0;\nREADY=1\nmodule.exports = { apps: [] };\n",
    ));
    let notify = NotifySocket::new();
    let (k, v) = notify.env();
    let port = free_port();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args(["-l", &format!("127.0.0.1:{port}")])
        .args(["-E", &format!("{k}={v}"), BIN, "run", &file, "--no-bus"])
        .env_remove("LISTEN_FDS")
        .env_remove("NOTIFY_SOCKET");
    let m = spawn_collecting(cmd);
    assert!(
        wait_until(T, || m.log().contains("Listening on")),
        "{}",
        m.log()
    );
    // The first connection starts the manager.
    let _conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(
        notify.wait_for("configuration error", T),
        "{:?}\n{}",
        notify.all(),
        m.log()
    );
    let status = notify
        .all()
        .into_iter()
        .find(|d| d.contains("configuration error"))
        .unwrap();
    for line in status.lines() {
        let key = line.split_once('=').map(|(k, _)| k);
        assert!(
            key.is_some_and(
                |k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
            ),
            "a line of the datagram is no assignment: {line:?} in {status:?}"
        );
    }
    assert!(
        status.contains("READY=1"),
        "the excerpt is there: {status:?}"
    );
    assert!(
        !notify
            .all()
            .iter()
            .any(|d| d.lines().any(|l| l == "READY=1")),
        "{:?}",
        notify.all()
    );
    // And the journal (here stderr) has it on several lines.
    assert!(m.log().contains("\n    READY=1\n"), "{}", m.log());
}
