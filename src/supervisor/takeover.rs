//! The document a re-exec hands over, and the one place that decides
//! whether a program can take it over.
//!
//! The old program writes a [`State`]; the new one reads it. The new one
//! is first run as `nodeherd __check-state` on the very document
//! ([`check_main`]), and that check runs everything that could refuse it
//! after the exec: the format, every fd named once and above stdio, the
//! sockets' layout, the workers the driver hands over against those the
//! core knows, and the core's own import. Only if all of that passes does
//! the old program commit and exec, so after the exec nothing refuses (the
//! workers would die with the old image's parent-death signal, after every
//! caller was told the re-exec succeeded).
//!
//! The exec itself, bytes and fds only, is `crate::reexec`.

use std::collections::BTreeSet;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::handover::CoreState;
use super::{Core, Policy, WorkerId};
use crate::config::App;
use crate::socket_set::SetState;
use crate::sockets::CarriedSocket;

/// The version of the [`State`] document. A program reads its own format
/// and every older one it knows; the check refuses anything else.
pub const STATE_FORMAT: u32 = 1;

/// Everything the new program needs besides the fds themselves.
#[derive(Debug, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// The version of nodeherd that wrote it.
    pub written_by: String,
    /// `CLOCK_MONOTONIC` when it was written (ns), to know how long the exec took.
    pub monotonic_ns: u64,
    /// The configuration in force (the last one a reload put in force).
    pub app: App,
    /// The manager's private directory (the same pid keeps the same one).
    pub runtime_dir: PathBuf,
    pub sockets: SetState,
    /// Sockets bound on workers' requests, by address.
    pub shared: Vec<(crate::ipc::SharedAddress, CarriedSocket)>,
    pub notify_fd: RawFd,
    pub control_fd: Option<RawFd>,
    pub metrics: Option<CarriedSocket>,
    /// The health listeners (`health`, `health_agent`), by key.
    #[serde(default)]
    pub health: Vec<(String, CarriedSocket)>,
    pub core: CoreState,
    pub workers: Vec<CarriedWorker>,
    /// The app's counters kept across its workers' lives (none from an
    /// older program).
    #[serde(default)]
    pub tally: crate::tally::Carried,
}

/// A worker's fds on the manager's side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedWorker {
    pub id: WorkerId,
    pub pid: i32,
    /// Our end of its Node IPC channel.
    pub ipc: Option<RawFd>,
    pub stdout: Option<RawFd>,
    pub stderr: Option<RawFd>,
    /// Our end of its preload's helper channel (absent from documents
    /// written before hang autopsies).
    #[serde(default)]
    pub helper: Option<RawFd>,
}

/// A worker's fds, owned again by the new program.
pub struct AdoptedWorker {
    pub id: WorkerId,
    pub pid: i32,
    pub ipc: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub helper: Option<OwnedFd>,
}

impl State {
    /// Every fd the document names.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds = self.sockets.fds();
        fds.extend(self.shared.iter().map(|(_, s)| s.fd));
        fds.push(self.notify_fd);
        fds.extend(self.control_fd);
        fds.extend(self.metrics.as_ref().map(|m| m.fd));
        fds.extend(self.health.iter().map(|(_, h)| h.fd));
        for w in &self.workers {
            fds.extend(w.ipc);
            fds.extend(w.stdout);
            fds.extend(w.stderr);
            fds.extend(w.helper);
        }
        fds
    }

    /// Everything that could refuse this state after the exec, checked
    /// now. Fds are checked open by the old program before it commits
    /// (`reexec::exec`); everything else is checked here, by the new one.
    pub fn validate(&self) -> Result<(), String> {
        crate::fds::check_handover(&self.fds())?;
        self.sockets.validate()?;
        let mut carried = BTreeSet::new();
        for w in &self.workers {
            if !carried.insert(w.id) {
                return Err(format!("worker {} is handed over twice", w.id.0));
            }
        }
        let known: BTreeSet<WorkerId> = self.core.workers.iter().map(|w| w.id).collect();
        if let Some(id) = carried.difference(&known).next() {
            return Err(format!(
                "worker {} is handed over but not in the supervisor's state",
                id.0
            ));
        }
        if let Some(id) = known.difference(&carried).next() {
            return Err(format!(
                "worker {} is in the supervisor's state but not handed over",
                id.0
            ));
        }
        self.import_core(Instant::now(), Duration::ZERO, None)
            .map(|_| ())
    }

    /// The supervisor's core as the new program goes on with it: the
    /// state written `took` before `now` (the exec's duration).
    pub fn import_core(
        &self,
        now: Instant,
        took: Duration,
        watchdog: Option<Duration>,
    ) -> Result<Core, String> {
        let policy = Policy::new(
            &self.app,
            self.sockets.inherits_any(),
            self.sockets.per_slot_sockets(),
            watchdog,
        );
        Core::import(self.core.clone(), policy, now, took)
    }
}

impl CarriedWorker {
    pub fn adopt(self) -> Result<AdoptedWorker, String> {
        let opt = |fd: Option<RawFd>| fd.map(crate::fds::adopt).transpose();
        Ok(AdoptedWorker {
            id: self.id,
            pid: self.pid,
            ipc: opt(self.ipc)?,
            stdout: opt(self.stdout)?,
            stderr: opt(self.stderr)?,
            helper: opt(self.helper)?,
        })
    }
}

/// Read a state document: one this program's format covers, whole.
pub fn parse(bytes: &[u8]) -> Result<State, String> {
    #[derive(Deserialize)]
    struct Head {
        format: u32,
    }
    let head: Head = serde_json::from_slice(bytes)
        .map_err(|e| format!("the state document is not one nodeherd wrote: {e}"))?;
    if head.format == 0 || head.format > STATE_FORMAT {
        return Err(format!(
            "state format {} is newer than this nodeherd reads ({STATE_FORMAT})",
            head.format
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("reading state format {}: {e}", head.format))
}

/// Read and check a document: what the new program will do after the exec,
/// short of owning the fds.
pub fn take_over(bytes: &[u8]) -> Result<State, String> {
    let state = parse(bytes)?;
    state.validate()?;
    Ok(state)
}

/// `nodeherd __check-state`: read a state document on stdin and say
/// whether this program can take it over.
pub fn check_main() -> std::process::ExitCode {
    use std::io::Read;
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        eprintln!("nodeherd: reading the state: {e}");
        return std::process::ExitCode::from(1);
    }
    match take_over(&input) {
        Ok(state) => {
            println!(
                "{}",
                crate::reexec::check_ok_line(state.format, &state.written_by)
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nodeherd: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reuseport::PerSlotState;
    use crate::sockets::{Kind, Template};
    use crate::supervisor::{Effect, Event};

    fn socket(fd: RawFd) -> CarriedSocket {
        CarriedSocket {
            fd,
            name: "web".into(),
            kind: Kind::Tcp,
            address: "127.0.0.1:8000".into(),
            port: Some(8000),
        }
    }

    /// The state of a manager with two ready workers on one shared socket.
    fn a_state() -> State {
        let now = Instant::now();
        let mut core = Core::new(super::super::policy::test_policy(), now);
        let mut fx = core.start(now);
        while let Some(e) = fx.pop() {
            if let Effect::Spawn { worker, .. } = e {
                let pid = 1000 + worker.0 as i32;
                fx.extend(core.handle(
                    now,
                    Event::Spawned {
                        worker,
                        pid,
                        ipc: true,
                    },
                ));
                fx.extend(core.handle(
                    now,
                    Event::Said {
                        worker,
                        said: crate::supervisor::events::Said::Listening,
                    },
                ));
            }
        }
        let core = core.export(now);
        let workers = core
            .workers
            .iter()
            .zip(0..)
            .map(|(w, i)| CarriedWorker {
                id: w.id,
                pid: w.pid,
                ipc: Some(10 + 3 * i),
                stdout: Some(11 + 3 * i),
                stderr: Some(12 + 3 * i),
                helper: None,
            })
            .collect();
        State {
            format: STATE_FORMAT,
            written_by: "test".into(),
            monotonic_ns: 0,
            app: crate::config::test_app(),
            runtime_dir: "/run/nodeherd-test".into(),
            sockets: SetState {
                shared: vec![socket(3)],
                per_slot: None,
            },
            shared: vec![],
            notify_fd: 4,
            control_fd: Some(5),
            metrics: None,
            health: vec![],
            core,
            workers,
            tally: Default::default(),
        }
    }

    fn refused(state: State, why: &str) {
        let e = state.validate().unwrap_err();
        assert!(e.contains(why), "{e}");
        let doc = serde_json::to_vec(&state).unwrap();
        assert!(take_over(&doc).is_err(), "the check refuses it too");
    }

    #[test]
    fn a_consistent_state_is_taken_over() {
        let state = a_state();
        assert_eq!(state.workers.len(), 2);
        state.validate().unwrap();
        let doc = serde_json::to_vec(&state).unwrap();
        take_over(&doc).unwrap();
    }

    #[test]
    fn repeated_and_stdio_fds_are_refused_before_the_exec() {
        let mut s = a_state();
        s.workers[1].stderr = Some(3);
        refused(s, "fd 3 is named twice");
        let mut s = a_state();
        s.notify_fd = 2;
        refused(s, "stdio");
    }

    #[test]
    fn workers_the_core_does_not_know_or_that_are_not_handed_over_are_refused() {
        let mut s = a_state();
        s.workers[0].id = WorkerId(99);
        refused(
            s,
            "worker 99 is handed over but not in the supervisor's state",
        );
        let mut s = a_state();
        s.workers.pop();
        refused(s, "in the supervisor's state but not handed over");
        let mut s = a_state();
        let w = s.workers[0].clone();
        s.workers.push(CarriedWorker {
            ipc: None,
            stdout: None,
            stderr: None,
            helper: None,
            ..w
        });
        refused(s, "handed over twice");
    }

    #[test]
    fn a_core_state_that_cannot_be_imported_is_refused() {
        let mut s = a_state();
        s.core.slots[1].current = Some(WorkerId(42));
        refused(s, "slot 1 names worker 42, which is not there");
        let mut s = a_state();
        s.core.next_worker = 1;
        refused(s, "not below the next worker id");
        // A state this program does not know: refused as the document is read.
        let mut doc = serde_json::to_value(a_state()).unwrap();
        doc["core"]["workers"][0]["state"] = "dancing".into();
        let e = take_over(&serde_json::to_vec(&doc).unwrap()).unwrap_err();
        assert!(e.contains("dancing"), "{e}");
    }

    #[test]
    fn a_reuseport_layout_without_its_groups_is_refused() {
        let mut s = a_state();
        s.sockets = SetState {
            shared: vec![],
            per_slot: Some(PerSlotState {
                sockets: vec![vec![socket(3)], vec![socket(6)]],
                templates: vec![Template {
                    kind: Kind::Tcp,
                    address: "127.0.0.1:8000".into(),
                    name: "web".into(),
                }],
                ids: vec![vec![1], vec![2]],
                groups: vec![vec![1, 2]],
                next_id: 2,
                shared_ids: vec![],
            }),
        };
        s.validate().unwrap();
        // As an older nodeherd wrote it: no groups.
        let mut doc: serde_json::Value = serde_json::to_value(&s).unwrap();
        doc["sockets"]["per_slot"]
            .as_object_mut()
            .unwrap()
            .remove("groups");
        let e = take_over(&serde_json::to_vec(&doc).unwrap()).unwrap_err();
        assert!(e.contains("groups"), "{e}");
        // A socket missing from its group, or in it twice.
        if let Some(p) = &mut s.sockets.per_slot {
            p.groups = vec![vec![1, 1]];
        }
        refused(s, "not once in its group");
    }

    #[test]
    fn newer_or_foreign_documents_are_refused() {
        assert!(parse(b"{}").is_err());
        assert!(parse(b"not json").is_err());
        let e = parse(br#"{"format": 99}"#).unwrap_err();
        assert!(e.contains("newer"), "{e}");
    }
}
