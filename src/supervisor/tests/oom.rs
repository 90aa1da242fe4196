//! A worker the kernel OOM-killed, as the core accounts it: the driver
//! read `oom_kill` in its cgroup's `memory.events` before it reaped it,
//! and the slot says so (journal, restarts by reason, last exit).

use super::*;

const WORDS: &str = "OOM-killed at 128 MiB (memory.events: oom_kill 1, max 9, high 40)";

#[test]
fn an_oom_kill_is_named_counted_and_shown_as_the_slots_last_exit() {
    let mut w = World::ready(policy(2));
    let cur = w.current();
    let victim = cur[&1];
    w.send(Event::OomKilled {
        worker: victim,
        words: WORDS.into(),
    });
    w.exit(victim, ExitStatus::Signal(9));
    let logs = w.logs();
    assert!(
        logs.contains(&format!("worker 1 (pid {}) {WORDS}", pid(victim))),
        "{logs}"
    );
    assert!(logs.contains("exited unexpectedly"), "{logs}");
    let snap = w.core.snapshot();
    let slot = |i: u32| snap.workers.iter().find(|x| x.instance == i).unwrap();
    assert_eq!(slot(1).replaced_oom, 1);
    assert_eq!(slot(1).restarts, 1, "restarted, as a crash is");
    assert_eq!(slot(1).last_exit, Some("oom-killed"));
    assert_eq!(slot(0).replaced_oom, 0, "the other worker is not touched");
    assert_eq!(slot(0).last_exit, None);
    // A plain crash afterwards is a crash, not an OOM kill.
    w.crash(cur[&0]);
    let snap = w.core.snapshot();
    let s0 = snap.workers.iter().find(|x| x.instance == 0).unwrap();
    assert_eq!((s0.replaced_oom, s0.last_exit), (0, Some("crashed")));
}

#[test]
fn the_oom_count_and_last_exit_survive_a_re_exec() {
    let mut w = World::ready(policy(2));
    let victim = w.current()[&0];
    w.send(Event::OomKilled {
        worker: victim,
        words: WORDS.into(),
    });
    w.exit(victim, ExitStatus::Signal(9));
    let state = w.core.export(w.now);
    let policy = w.core.policy().clone();
    let core = Core::import(state, policy, w.now, Duration::ZERO).unwrap();
    let snap = core.snapshot();
    let s0 = snap.workers.iter().find(|x| x.instance == 0).unwrap();
    assert_eq!((s0.replaced_oom, s0.last_exit), (1, Some("oom-killed")));
}
