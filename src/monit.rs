//! `nodeherd monit [APP]`: a live view of one app, like `pm2 monit`.
//!
//! Each worker's state, pid, CPU %, memory, restarts, uptime, event-loop
//! delay and share of 5xx responses; the app's reload and scale progress as it happens; and the recent
//! log lines of the worker picked with the arrow keys, from the journal
//! where there is one. It reaches the manager as the other clients do (the
//! bus, else its control socket) and redraws when the manager signals a
//! change, plus once a second for the figures that move by themselves (CPU,
//! uptime). It fits 80×24, works over SSH, and leaves on `q`, Esc or Ctrl-C
//! with the terminal as it found it.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crossterm::event::{Event, EventStream, KeyCode, KeyEvent, KeyModifiers};
use crossterm::{cursor, execute, queue, style, terminal};
use futures_util::StreamExt;

use crate::cli::AppArgs;
use crate::client::{Failure, Manager1Proxy, reach, run_client};
use crate::dbus::WorkerTuple;

/// Events kept for the view.
const EVENTS: usize = 6;

pub fn monit(args: AppArgs) -> ExitCode {
    run_client(async move {
        let reached = reach(args.app.as_deref(), &args.bus).await?;
        let p = reached.proxy;
        let _screen =
            Screen::enter().map_err(|e| Failure(1, format!("cannot use the terminal: {e}")))?;
        view(&p).await
    })
}

/// The terminal in raw mode on the alternate screen, restored on drop
/// (however the view ends).
struct Screen;

impl Screen {
    fn enter() -> std::io::Result<Screen> {
        terminal::enable_raw_mode()?;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )?;
        Ok(Screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}

/// What the view shows.
#[derive(Default)]
struct Model {
    name: String,
    state: String,
    status: String,
    workers: Vec<WorkerTuple>,
    delays: BTreeMap<u32, u32>,
    /// Each worker's share of 5xx responses so far, by pid.
    errors: BTreeMap<u32, f64>,
    /// pid → (CPU seconds, when), for CPU % between two draws.
    cpu: BTreeMap<u32, (f64, Instant)>,
    cpu_pct: BTreeMap<u32, f64>,
    events: VecDeque<String>,
    picked: usize,
    journal: Vec<String>,
}

async fn view(p: &Manager1Proxy<'static>) -> Result<(), Failure> {
    let mut m = Model::default();
    let mut states = p.receive_worker_state_changed().await?;
    let mut reloads = p.receive_reload_finished().await?;
    let mut changes = p.receive_workers_changed().await;
    let mut statuses = p.receive_status_changed().await;
    let mut keys = EventStream::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    refresh(p, &mut m).await?;
    loop {
        draw(&m).map_err(|e| Failure(1, format!("cannot draw: {e}")))?;
        tokio::select! {
            _ = tick.tick() => refresh(p, &mut m).await?,
            Some(s) = states.next() => {
                if let Ok(a) = s.args() {
                    event(&mut m, format!("worker {} {} (pid {})", a.instance, a.state, a.pid));
                }
                refresh(p, &mut m).await?;
            }
            Some(s) = reloads.next() => {
                if let Ok(a) = s.args() {
                    event(&mut m, a.message.clone());
                }
                refresh(p, &mut m).await?;
            }
            Some(_) = changes.next() => refresh(p, &mut m).await?,
            Some(_) = statuses.next() => refresh(p, &mut m).await?,
            k = keys.next() => match k {
                Some(Ok(Event::Key(KeyEvent { code, modifiers, .. }))) => match code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
                    KeyCode::Up => {
                        m.picked = m.picked.saturating_sub(1);
                        journal(&mut m);
                    }
                    KeyCode::Down => {
                        m.picked = (m.picked + 1).min(m.workers.len().saturating_sub(1));
                        journal(&mut m);
                    }
                    _ => {}
                },
                Some(Ok(_)) => {}
                // The terminal went away (a closed SSH session): leave.
                Some(Err(_)) | None => return Ok(()),
            },
        }
    }
}

fn event(m: &mut Model, text: String) {
    let at = chrono_like_now();
    m.events.push_front(format!("{at} {text}"));
    m.events.truncate(EVENTS);
}

/// HH:MM:SS (UTC), without a date crate.
fn chrono_like_now() -> String {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

async fn refresh(p: &Manager1Proxy<'static>, m: &mut Model) -> Result<(), Failure> {
    m.name = p.name().await?;
    m.state = p.state().await?;
    m.status = p.status().await?;
    m.workers = p.workers().await?;
    m.delays = p
        .loop_delays()
        .await
        .unwrap_or_default()
        .into_iter()
        .collect();
    // Older managers have no such property: no figures then.
    m.errors = p
        .request_outcomes()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(pid, flat)| {
            let o = crate::outcomes::Outcomes::from_flat(&flat)?;
            (o.requests() > 0).then(|| (pid, 100.0 * o.error_ratio()))
        })
        .collect();
    let now = Instant::now();
    for w in &m.workers {
        let pid = w.1;
        if pid == 0 {
            continue;
        }
        let secs = crate::worker::cgroup::worker_cpu_seconds(pid as i32);
        if let Some((before, at)) = m.cpu.get(&pid) {
            let wall = now.duration_since(*at).as_secs_f64();
            if wall > 0.0 {
                m.cpu_pct
                    .insert(pid, 100.0 * (secs - before).max(0.0) / wall);
            }
        }
        m.cpu.insert(pid, (secs, now));
    }
    let live: Vec<u32> = m.workers.iter().map(|w| w.1).collect();
    m.cpu.retain(|pid, _| live.contains(pid));
    m.cpu_pct.retain(|pid, _| live.contains(pid));
    m.picked = m.picked.min(m.workers.len().saturating_sub(1));
    journal(m);
    Ok(())
}

/// The picked worker's last lines, from the journal when there is one.
fn journal(m: &mut Model) {
    let Some(w) = m.workers.get(m.picked) else {
        m.journal.clear();
        return;
    };
    let out = std::process::Command::new("journalctl")
        .args(["--no-pager", "-o", "cat", "-n", "5"])
        .arg(format!("NODEHERD_APP={}", m.name))
        .arg(format!("WORKER_PID={}", w.1))
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    m.journal = match out {
        Ok(o) if o.status.success() && !o.stdout.is_empty() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        _ => vec!["(no journal here: the worker's lines go to the manager's stderr)".into()],
    };
}

fn draw(m: &Model) -> std::io::Result<()> {
    let (cols, rows) = terminal::size().unwrap_or((80, 24));
    let width = cols as usize;
    let mut lines: Vec<String> = Vec::new();
    lines.push(format!(
        "nodeherd monit: {} {} ({})",
        m.name, m.state, m.status
    ));
    lines.push("q quit, up/down pick a worker".into());
    lines.push(format!(
        "  {:>6} {:>8} {:<9} {:>6} {:>10} {:>8} {:>7} {:>7} {:>5}",
        "worker", "pid", "state", "cpu%", "memory", "restarts", "uptime", "loop ms", "5xx%"
    ));
    for (i, (inst, pid, state, restarts, up, mem, _)) in m.workers.iter().enumerate() {
        let mark = if i == m.picked { '>' } else { ' ' };
        let cpu = m
            .cpu_pct
            .get(pid)
            .map_or("-".to_string(), |c| format!("{c:.1}"));
        let delay = m.delays.get(pid).map_or("-".to_string(), |d| d.to_string());
        let errors = m
            .errors
            .get(pid)
            .map_or("-".to_string(), |e| format!("{e:.1}"));
        let pid_s = if *pid == 0 {
            "-".to_string()
        } else {
            pid.to_string()
        };
        let mem = if *pid == 0 { 0 } else { *mem };
        lines.push(format!(
            "{mark} {inst:>6} {pid_s:>8} {state:<9} {cpu:>6} {:>10} {restarts:>8} {:>7} {delay:>7} {errors:>5}",
            crate::human::bytes(mem),
            crate::human::duration(*up)
        ));
    }
    lines.push(String::new());
    lines.push("events:".into());
    lines.extend(m.events.iter().map(|e| format!("  {e}")));
    lines.push(String::new());
    if let Some(w) = m.workers.get(m.picked) {
        // anon vs file: a leak grows the first, a cache the second.
        let stat = (w.1 > 0)
            .then(|| crate::worker::cgroup::memory_stat(w.1 as i32))
            .flatten()
            .map_or(String::new(), |s| {
                format!(
                    ", anon {} file {}",
                    crate::human::bytes(s.anon),
                    crate::human::bytes(s.file)
                )
            });
        lines.push(format!("worker {} (pid {}){stat}, last lines:", w.0, w.1));
        lines.extend(m.journal.iter().map(|l| format!("  {l}")));
    }
    let mut out = std::io::stdout().lock();
    queue!(
        out,
        cursor::MoveTo(0, 0),
        terminal::Clear(terminal::ClearType::All)
    )?;
    for (row, line) in lines.iter().take(rows as usize).enumerate() {
        // Worker lines and status texts are the app's: shown, never sent.
        let shown: String = crate::discover::printable(line)
            .chars()
            .take(width)
            .collect();
        queue!(out, cursor::MoveTo(0, row as u16), style::Print(shown))?;
    }
    out.flush()
}
