//! `Diagnose`: a heap snapshot, a CPU profile or a stack of one worker,
//! taken out of rotation so that no request waits on it.
//!
//! A heap snapshot stops a worker's event loop for seconds and can double
//! its heap; on a worker that serves, every request it holds waits that
//! long. So the capture rides the zero-downtime swap: a replacement starts
//! in the slot and becomes ready first, then, where a plain swap would stop
//! the old worker, it is told to stop accepting and finish what it holds
//! (the driver asks its preload), is captured, and only then stopped. The
//! caller's answer (the file, or why not) comes once it is gone, as a
//! reload's does.
//!
//! `--then resume` keeps the worker (its pid, its warm caches): no
//! replacement starts, the other workers carry its share while it is out
//! of rotation (with one worker, connections wait in the socket's queue
//! for the capture's length), and once captured it listens again on the
//! same sockets, which the manager hands back to it. Its heartbeat is not
//! watched meanwhile: a capture stops its loop on purpose.

// Sans-IO: see clippy.toml.
#![deny(clippy::disallowed_methods)]

use std::time::Duration;

use super::core::Core;
use super::events::{Effect, Level, ReplyId, StopBy, WorkerId};
use super::state::{Op, SwapReason, WState};
use super::timers::TimerKey;
use crate::control::Done;
use crate::control::{Capture, CtlError, Diagnosis};

/// How long a capture may take once the worker is quiet, beyond what it
/// asks for (a CPU profile's seconds): writing a snapshot of a large heap
/// takes a while.
pub(super) fn capture_bound(capture: Capture) -> Duration {
    match capture {
        Capture::Stack => Duration::from_secs(10),
        Capture::CpuProfile(s) => Duration::from_secs(u64::from(s) + 30),
        Capture::HeapSnapshot => Duration::from_secs(600),
    }
}

/// The longest CPU profile asked for.
pub const MAX_PROFILE_SECONDS: u32 = 600;

impl Core {
    /// Checked when asked: a slot that exists, a profile of sane length.
    pub(super) fn check_diagnosis(&self, d: &Diagnosis) -> Result<(), CtlError> {
        if !self.policy.app.autopsy {
            return Err(CtlError::Failed(
                "diagnose is not available for this app: `autopsy: false` in its config (its workers have no helper thread); set it to true and reload".to_string(),
            ));
        }
        if d.instance as usize >= self.slots.len() {
            return Err(CtlError::InvalidArgument(format!(
                "no worker {}: the app has {} (0 to {})",
                d.instance,
                self.slots.len(),
                self.slots.len().saturating_sub(1)
            )));
        }
        if let Capture::CpuProfile(s) = d.capture
            && !(1..=MAX_PROFILE_SECONDS).contains(&s)
        {
            return Err(CtlError::InvalidArgument(format!(
                "a CPU profile of {s} s: between 1 and {MAX_PROFILE_SECONDS} seconds"
            )));
        }
        Ok(())
    }

    pub(super) fn begin_diagnose(&mut self, d: Diagnosis, reply: Option<ReplyId>) {
        if let Err(e) = self.check_diagnosis(&d) {
            if let Some(r) = reply {
                self.reply(r, Err(e));
            }
            return;
        }
        if d.resume {
            return self.begin_resume(d, reply);
        }
        self.diagnosis = Some((d.capture, None));
        self.log(
            Level::Notice,
            format!(
                "diagnose worker {}: {}, out of rotation (a replacement first)",
                d.instance,
                d.capture.word()
            ),
        );
        self.begin_reload(
            vec![d.instance],
            reply.into_iter().collect(),
            None,
            SwapReason::Diagnose,
            None,
        );
    }

    /// The replacement serves: take the old worker out of rotation and
    /// capture it (the driver does both); it is stopped once captured, or
    /// killed if that takes longer than its bound.
    pub(super) fn diagnose_worker(&mut self, id: WorkerId) {
        let Some((capture, _)) = self.diagnosis else {
            return self.stop_worker(id, "replaced");
        };
        let kill_timeout = self.policy_of(id).kill_timeout;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.state == WState::Stopping {
            return;
        }
        w.state = WState::Stopping;
        let (index, pid) = (w.index, w.pid);
        self.timers.cancel(TimerKey::Ready(id));
        self.timers.cancel(TimerKey::Hang(id));
        // Its drain takes up to kill_timeout, then the capture.
        let within = kill_timeout + capture_bound(capture);
        self.out.push(Effect::Diagnose {
            worker: id,
            index,
            pid,
            capture,
            within,
        });
        self.log(
            Level::Info,
            format!(
                "worker {index} (pid {pid}) out of rotation: finishing what it holds, then {}",
                capture.word()
            ),
        );
        self.worker_signal(index, pid, "stopping");
        self.timers
            .arm(TimerKey::Kill(id), self.now + within + kill_timeout);
    }

    /// `--then resume`: capture the slot's serving worker in place; it
    /// stops accepting and finishes what it holds first (the driver asks
    /// its preload), and the answer comes once it listens again.
    fn begin_resume(&mut self, d: Diagnosis, reply: Option<ReplyId>) {
        let serving = self
            .slots
            .get(d.instance as usize)
            .and_then(|s| s.current)
            .filter(|id| {
                self.workers
                    .get(id)
                    .is_some_and(|w| w.state == WState::Ready && !w.hung)
            });
        let refused = if self.resuming.is_some() {
            Some(CtlError::Busy(
                "a diagnosis with --then resume is already running; ask again once it is done"
                    .to_string(),
            ))
        } else if serving.is_none() {
            Some(CtlError::Failed(format!(
                "worker {} is not serving (starting, stopping or hung): nothing to capture in place; use --then replace",
                d.instance
            )))
        } else {
            None
        };
        let (Some(id), None) = (serving, &refused) else {
            if let (Some(r), Some(e)) = (reply, refused) {
                self.reply(r, Err(e));
            }
            return;
        };
        let kill_timeout = self.policy_of(id).kill_timeout;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        // Not serving meanwhile: no connection is steered or handed to it,
        // and it has no share of keep-alive connections.
        w.closed = true;
        let (index, pid) = (w.index, w.pid);
        self.resuming = Some((id, reply));
        self.timers.cancel(TimerKey::Hang(id));
        let alone = self.slots.len() == 1;
        self.log(
            Level::Notice,
            format!(
                "diagnose worker {index} (pid {pid}): {}, out of rotation and back once captured{}",
                d.capture.word(),
                if alone {
                    " (the only worker: connections wait in the queue meanwhile)"
                } else {
                    " (the other workers carry its share)"
                }
            ),
        );
        self.out.push(Effect::Diagnose {
            worker: id,
            index,
            pid,
            capture: d.capture,
            within: kill_timeout + capture_bound(d.capture),
        });
    }

    /// The capture is done (or failed): keep the answer, stop the worker.
    pub(super) fn on_diagnosed(&mut self, id: WorkerId, result: Result<String, String>) {
        if let Some((r, reply)) = self.resuming
            && r == id
        {
            self.resuming = None;
            return self.resume(id, reply, result);
        }
        let kill_timeout = self.policy_of(id).kill_timeout;
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let (index, pid) = (w.index, w.pid);
        match &result {
            Ok(path) => self.log(
                Level::Notice,
                format!("worker {index} (pid {pid}) diagnosed: {path}; stopping it"),
            ),
            Err(why) => self.log(
                Level::Warning,
                format!("worker {index} (pid {pid}) could not be diagnosed: {why}; stopping it"),
            ),
        }
        if let Some((_, slot)) = &mut self.diagnosis {
            *slot = Some(result);
        }
        self.out.push(Effect::Stop {
            worker: id,
            by: StopBy::Signal,
        });
        self.timers.arm(TimerKey::Kill(id), self.now + kill_timeout);
    }

    /// Captured in place (or not): back into rotation, and the answer.
    fn resume(&mut self, id: WorkerId, reply: Option<ReplyId>, result: Result<String, String>) {
        let max_delay = self.policy_of(id).max_event_loop_delay;
        let live = self
            .workers
            .get_mut(&id)
            .filter(|w| w.state == WState::Ready)
            .map(|w| {
                w.closed = false;
                (w.index, w.pid, w.beating)
            });
        let result = match live {
            Some((index, pid, beating)) => {
                self.out.push(Effect::Resume { worker: id });
                if let Some(max) = max_delay
                    && beating
                {
                    self.timers.arm(TimerKey::Hang(id), self.now + max);
                }
                match &result {
                    Ok(path) => self.log(
                        Level::Notice,
                        format!("worker {index} (pid {pid}) diagnosed: {path}; back into rotation"),
                    ),
                    Err(why) => self.log(
                        Level::Warning,
                        format!(
                            "worker {index} (pid {pid}) could not be diagnosed: {why}; back into rotation"
                        ),
                    ),
                }
                result
            }
            None => result.and(Err(
                "the worker was stopped while it was captured".to_string()
            )),
        };
        if let Some(r) = reply {
            let done = result
                .map(|path| Done {
                    workers: self.slots.len() as i32,
                    message: path,
                })
                .map_err(CtlError::Failed);
            self.reply(r, done);
        }
    }

    /// What a finished `Diagnose` answers, if the finished reload was one.
    pub(super) fn diagnosis_answer(
        &mut self,
        reason: SwapReason,
    ) -> Option<Result<String, String>> {
        if reason != SwapReason::Diagnose {
            return None;
        }
        let (_, result) = self.diagnosis.take()?;
        Some(
            result.unwrap_or_else(|| {
                Err("the worker was gone before it could be captured".to_string())
            }),
        )
    }

    /// Whether a `Diagnose` runs.
    pub(super) fn diagnosing(&self) -> bool {
        matches!(
            self.op,
            Some(Op::Reload {
                reason: SwapReason::Diagnose,
                ..
            })
        )
    }
}
