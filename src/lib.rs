//! nodeherd: PM2's cluster mode as a native systemd service.
//!
//! # The lifecycle, in one page
//!
//! **Socket in.** systemd's `.socket` unit owns the listening socket and
//! hands it over at fd 3 (`LISTEN_FDS`, `LISTEN_FDNAMES`); outside systemd,
//! `--listen ADDR` binds one ([`sockets`]). The manager never accepts on it.
//!
//! **Workers out.** The manager forks N workers ([`worker`]). Each inherits
//! the sockets at fd 3.., gets `NODE_APP_INSTANCE` = its slot index, an IPC
//! channel (`NODE_CHANNEL_FD`) and a private `NOTIFY_SOCKET`. Node workers
//! load a preload (`src/shim.js`, embedded) that maps an unmodified app's
//! `server.listen(8000)` onto the inherited socket, so every worker accepts
//! from the same kernel queue and the manager stays off the data path.
//!
//! **Ready.** A worker is ready when the shim reports it listening, or, with
//! `wait_ready`, when it sends `'ready'` on the IPC channel or `READY=1` on
//! the notify socket, within `listen_timeout`. With no socket handed over,
//! its first listen on a port of its own counts, and an app that never
//! listens is ready once `listen_timeout` has passed. When all N are ready, the
//! manager sends `READY=1` to systemd ([`notify`]) and keeps `STATUS=` current.
//!
//! **Crash.** A worker that exits unexpectedly is restarted in the same slot
//! (same index), with PM2's `restart_delay`/`exp_backoff_restart_delay`, and
//! its slot becomes `errored` after more than `max_restarts` deaths younger
//! than `min_uptime`. Workers die with the manager (parent-death signal).
//!
//! **Reload.** `Reload()` over D-Bus ([`dbus`]), `systemctl reload` or SIGHUP
//! swaps slot by slot, `reload_parallel` (2) at a time: start the
//! replacement beside the old worker, wait until it is ready, only then ask
//! the old one to stop (SIGINT or the `'shutdown'` message, SIGKILL after
//! `kill_timeout`); its drain overlaps the next swaps, and the reload answers
//! once every old worker is gone. Both accept from the
//! same queue meanwhile, so no connection is refused. If a replacement dies
//! or is not ready in time, the reload stops there, fails loudly, and every
//! old worker keeps serving. `Scale(n)` adds slots (lowest free indexes) or
//! drains the highest ones.
//!
//! **Rollback.** Each configuration a start or reload puts before traffic
//! is a numbered generation, its script, directory and interpreter resolved
//! through symlinks when it is read ([`history`]), kept in the state
//! directory. `Rollback(n)` reloads to one of them the same zero-downtime
//! way (a canary judges it if the configuration in force says so); one
//! whose files are gone is refused and nothing changes.
//!
//! **Re-exec.** `Reexec()`, `nodeherd reexec` or SIGUSR2: the manager checks
//! that the file it was started from (a package upgrade replaced it) can read
//! its state, then `execve`s it with that state and every socket and worker
//! channel ([`reexec`]). Same pid, same workers, none signalled; systemd sees
//! `RELOADING=1`, then `READY=1` from the new program.
//!
//! **Stop.** SIGTERM/SIGINT: `STOPPING=1`, every worker asked to stop, SIGKILL
//! after `kill_timeout`, exit 0 with no child left. With `drain_before_stop`,
//! the [`health`] endpoint first says "drain" for that long while every
//! worker serves on, so a load balancer has moved traffic away.
//!
//! One supervisor ([`supervisor`]) owns all of this state. Its core decides
//! and does nothing else: child exits, signals, timers and D-Bus calls go in
//! as events, and what to do comes out as effects (spawn, signal, notify,
//! log, reply) that a thin driver carries out. So the whole lifecycle above
//! is unit-tested with a virtual clock, and the integration tests keep to
//! what needs real processes.
//!
//! # Where things are
//!
//! From the ground up (each room imports only rooms below it; no circle):
//! [`config`] reads ecosystem files, [`fds`] holds the rules for fds that
//! cross an exec, [`sockets`] takes or binds one listening socket,
//! [`reuseport`] steers the kernel among each slot's own, [`socket_set`]
//! lays them out per slot, [`shared`] binds more on workers' requests,
//! with their rights; [`worker`] starts workers, [`supervisor`] runs them
//! (its core decides, its driver does: the core's modules may not touch a
//! clock, a process or a socket, see `clippy.toml`); [`control`] names what
//! may be asked of it, [`dbus`] serves that on the bus and [`client`] asks
//! it ([`discover`] finds the apps a host has, for [`ls`], [`tail`]
//! (`logs`) and PM2's verbs in [`pm2`]; [`pm2dump`] reads PM2's saved
//! list for [`install`]), [`metrics`] serves Prometheus (and [`health`], what a load balancer reads);
//! [`notify`] talks to systemd,
//! [`notify_socket`] listens to workers, [`ipc`] reads their channel,
//! [`autopsy`] asks their preload's helper thread for stacks and captures,
//! [`logs`] writes the journal, [`reexec`] moves the daemon onto a new
//! program in place (the document it carries is
//! [`supervisor::takeover`]), [`run`] puts the daemon together (or takes
//! it over) in a private directory ([`rundir`]), or, for a file of several
//! apps, starts a manager for each and waits for them ([`herd`]).

pub mod autopsy;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod cron;
pub mod dbus;
pub mod discover;
pub mod endpoint;
pub mod fds;
pub mod health;
pub mod herd;
pub mod history;
pub mod human;
pub mod install;
pub mod ipc;
pub mod link;
pub mod logs;
pub mod ls;
pub mod manpage;
pub mod metrics;
pub mod monit;
pub mod notify;
pub mod notify_socket;
pub mod outcomes;
pub mod pm2;
pub mod pm2dump;
pub mod promtext;
pub mod queue_watch;
pub mod reexec;
pub mod reuseport;
pub mod rights;
pub mod run;
pub mod rundir;
pub mod shared;
pub mod socket_set;
pub mod sockets;
pub mod supervisor;
pub mod tail;
pub mod tally;
pub mod watch;
pub mod worker;
