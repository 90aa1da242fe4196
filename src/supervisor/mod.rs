//! The supervisor: the one owner of every worker, slot and operation.
//!
//! It is split the way a state machine and its I/O split:
//! - [`core`] decides: [`events`] in, state transition, effects out — no
//!   process, fd, task or clock of its own (`state` is what it remembers,
//!   `ops` holds its operations, `report` what it publishes, `share` the
//!   even share of keep-alive connections, `flood` what it does with a
//!   worker that floods its channel, [`policy`] the crash rule, [`timers`]
//!   its deadlines, [`handover`] its state across a re-exec);
//! - [`driver`] does: forks, signals, sleeps, talks to systemd and the log,
//!   answers callers, and feeds results back as events;
//! - [`sources`] turn signals, the notify socket, IPC channels and worker
//!   output into the driver's inputs, each worker within its [`budget`].
//!
//! Vocabulary, used the same way in code, D-Bus, docs and logs:
//! - a **slot** is a position `0..instances`; its index is the worker's
//!   `NODE_APP_INSTANCE` and survives restarts and reloads;
//! - a slot's **current** worker serves; during a reload its **incoming**
//!   replacement starts beside it and takes over once **ready**;
//! - a worker that was asked to stop is **stopping** (draining) and belongs
//!   to no slot any more;
//! - an **operation** (start, reload, scale, restart) runs one at a time;
//!   requests that arrive meanwhile wait in a queue, in order, and
//!   back-to-back reloads coalesce into one.

pub mod autoscale;
pub mod budget;
mod canary;
mod canary_judge;
pub mod core;
mod diagnose;
mod drain;
pub mod driver;
pub mod events;
mod flood;
pub mod handover;
mod measure;
mod ops;
mod outbox;
pub mod policy;
pub mod reconfig;
mod releases;
mod report;
mod scaling;
mod share;
pub mod sources;
mod state;
pub mod takeover;
pub mod timers;

#[cfg(test)]
mod tests;

pub use self::core::Core;
pub use driver::Driver;
pub use events::{Effect, Event, ExitStatus, WorkerId};
pub use policy::Policy;
