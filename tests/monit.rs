//! `nodeherd monit` in a real pseudo-terminal (tmux, 80×24): the workers,
//! a reload's progress as it happens, and a clean exit on `q`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

/// A private tmux server, ended by its pid whatever the outcome.
struct Tmux {
    socket: String,
    pid: Option<i32>,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux must be installed (apt-get install tmux)");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "monit"])
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            kill(pid, libc::SIGKILL);
        }
    }
}

#[test]
fn monit_shows_the_workers_and_a_reload_as_it_happens_and_quits_on_q() {
    let runtime = tempdir::Dir::new("monit");
    let rt = path_str(&runtime.path);
    let (m, no_bus) = start_without_bus("watched", &rt);
    let port = m.port();
    let before = instances_answering(port, 2, T);
    assert_eq!(before.len(), 2, "{}", m.log());
    let exit_file = runtime.path.join("monit.exit");
    let mut tmux = Tmux {
        socket: format!("nodeherd-test-{}", std::process::id()),
        pid: None,
    };
    let command = format!(
        "XDG_RUNTIME_DIR={rt} {BIN} monit watched --bus {no_bus}; echo $? > {}; sleep 30",
        exit_file.display()
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "monit",
        "-x",
        "80",
        "-y",
        "24",
        &command,
    ]);
    tmux.pid = tmux
        .run(&["display-message", "-p", "-t", "monit", "#{pid}"])
        .trim()
        .parse()
        .ok();
    assert!(tmux.pid.is_some(), "tmux did not start");
    // Both workers, by pid, in the table.
    assert!(
        wait_until(T, || {
            let s = tmux.screen();
            s.contains("nodeherd monit: watched ready")
                && before.values().all(|pid| s.contains(&pid.to_string()))
        }),
        "{}",
        tmux.screen()
    );
    assert!(tmux.screen().lines().all(|l| l.chars().count() <= 80));
    // Each worker's share of 5xx answers, last column, once it reported
    // the requests instances_answering made.
    assert!(
        wait_until(T, || {
            let s = tmux.screen();
            s.contains("5xx%")
                && before.values().all(|pid| {
                    s.lines()
                        .any(|l| l.contains(&pid.to_string()) && l.trim_end().ends_with(" 0.0"))
                })
        }),
        "{}",
        tmux.screen()
    );
    // A reload shows up as it happens, from the manager's signals.
    m.signal(libc::SIGHUP);
    assert!(
        wait_until(T, || tmux.screen().contains("reload finished: 2/2")),
        "{}",
        tmux.screen()
    );
    let after = instances_answering(port, 2, T);
    assert!(
        wait_until(T, || {
            let s = tmux.screen();
            after.values().all(|pid| s.contains(&pid.to_string()))
        }),
        "{}",
        tmux.screen()
    );
    // q leaves, with status 0.
    tmux.run(&["send-keys", "-t", "monit", "q"]);
    assert!(
        wait_until(T, || std::fs::read_to_string(&exit_file)
            .is_ok_and(|s| s.trim() == "0")),
        "{}",
        tmux.screen()
    );
}
