//! Where the driver's inputs come from: signals, the workers' notify
//! socket, their IPC channels and their output. Each is a small task that
//! turns what it reads into an [`Input`] on the driver's channel (output
//! lines go straight to the log writer).

use std::os::fd::OwnedFd;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

use super::core::WorkerId;
use crate::ipc;
use crate::logs::{self, Stream};
use crate::notify_socket::{self, Notification};

/// What the sources tell the driver.
#[derive(Debug)]
pub enum Input {
    /// SIGTERM or SIGINT.
    Stop,
    /// SIGHUP.
    Reload,
    Ipc {
        worker: WorkerId,
        msg: ipc::Message,
    },
    Notify(Notification),
    /// The configuration, read anew for a reload.
    ConfigLoaded(Box<Result<crate::config::Loaded, crate::config::ConfigError>>),
    /// SIGUSR2: re-exec the manager in place.
    Reexec,
    /// The program a re-exec would run was checked.
    ExecChecked(Result<String, String>),
    /// The accept queues of a slot that goes are empty.
    SlotDrained(u64),
    /// A thread bound (or could not bind) an address workers asked for.
    Bound(Box<crate::shared::Bound>),
}

/// Turn SIGTERM/SIGINT into `Stop`, SIGHUP into `Reload` and SIGUSR2 into `Reexec`.
pub fn signals(tx: mpsc::UnboundedSender<Input>) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    tokio::spawn(async move {
        loop {
            let input = tokio::select! {
                _ = term.recv() => Input::Stop,
                _ = int.recv() => Input::Stop,
                _ = hup.recv() => {
                    logs::info("SIGHUP: reload requested");
                    Input::Reload
                }
                _ = usr2.recv() => {
                    logs::info("SIGUSR2: re-exec requested");
                    Input::Reexec
                }
            };
            if tx.send(input).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// Forward the workers' notify socket's datagrams.
pub fn notify_socket(sock: tokio::net::UnixDatagram, tx: mpsc::UnboundedSender<Input>) {
    tokio::spawn(async move {
        loop {
            match notify_socket::recv(&sock).await {
                Ok(Some(n)) => {
                    if tx.send(Input::Notify(n)).is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    logs::warn(&format!("worker notify socket: {e}; ignoring"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}

/// Forward a worker's output, line by line, to the log writer.
pub fn output(fd: OwnedFd, index: u32, pid: i32, stream: Stream) {
    let Ok(rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    tokio::spawn(async move {
        for_each_line(rx, |line| {
            logs::worker_line(index, pid, stream, &String::from_utf8_lossy(line))
        })
        .await;
    });
}

/// Read what a worker says on its IPC channel.
pub fn ipc_channel(
    stream: std::os::unix::net::UnixStream,
    worker: WorkerId,
    tx: mpsc::UnboundedSender<Input>,
) {
    let Ok(stream) = tokio::net::UnixStream::from_std(stream) else {
        return;
    };
    tokio::spawn(async move {
        let mut skipping = false;
        for_each_line_raw(stream, |line, complete| {
            // A line longer than the cap is not ours: drop all of it.
            if skipping || !complete {
                skipping = !complete;
                return;
            }
            if let Some(msg) = ipc::parse(line) {
                let _ = tx.send(Input::Ipc { worker, msg });
            }
        })
        .await;
    });
}

/// Read lines (split when longer than the cap) until EOF.
async fn for_each_line<R: AsyncRead + Unpin>(r: R, mut f: impl FnMut(&[u8])) {
    const CAP: usize = 16 * 1024;
    let mut r = BufReader::with_capacity(CAP, r);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let buf = match r.fill_buf().await {
            Ok([]) => break,
            Ok(b) => b,
            Err(_) => break,
        };
        // Never let a line grow past CAP: take at most what still fits.
        let room = CAP - line.len();
        let window = &buf[..buf.len().min(room)];
        let (used, complete) = match window.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (window.len(), false),
        };
        line.extend_from_slice(&window[..if complete { used - 1 } else { used }]);
        r.consume(used);
        if complete || line.len() >= CAP {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            f(&line);
            line.clear();
        }
    }
    if !line.is_empty() {
        f(&line);
    }
}

/// Like `for_each_line`, but says whether each piece ended with a newline.
async fn for_each_line_raw<R: AsyncRead + Unpin>(r: R, mut f: impl FnMut(&[u8], bool)) {
    // The buffer stays small; a line may grow to MAX_LINE in `line`.
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let buf = match r.fill_buf().await {
            Ok([]) => break,
            Ok(b) => b,
            Err(_) => break,
        };
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&buf[..i]);
                r.consume(i + 1);
                f(&line, true);
                line.clear();
            }
            None => {
                let n = buf.len();
                line.extend_from_slice(buf);
                r.consume(n);
                if line.len() > ipc::MAX_LINE {
                    f(&line, false);
                    line.clear();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_split_and_capped() {
        let data: Vec<u8> = [&b"one\ntwo\r\n"[..], &vec![b'x'; 40_000], b"\ntail"].concat();
        let mut got: Vec<usize> = Vec::new();
        let mut first = Vec::new();
        for_each_line(&data[..], |l| {
            if first.len() < 2 {
                first.push(String::from_utf8_lossy(l).to_string());
            }
            got.push(l.len())
        })
        .await;
        assert_eq!(first, vec!["one", "two"]);
        assert!(got.iter().all(|&n| n <= 16 * 1024), "{got:?}");
        assert_eq!(got.iter().sum::<usize>(), 3 + 3 + 40_000 + 4);
    }

    #[tokio::test]
    async fn ipc_lines_longer_than_the_cap_are_flagged_incomplete() {
        let data: Vec<u8> = [
            &b"\"ready\"\n"[..],
            &vec![b'x'; 3 * ipc::MAX_LINE],
            b"\n\"ready\"\n",
        ]
        .concat();
        let mut seen: Vec<(usize, bool)> = Vec::new();
        for_each_line_raw(&data[..], |l, complete| seen.push((l.len(), complete))).await;
        assert_eq!(seen.first(), Some(&(7, true)));
        assert_eq!(seen.last(), Some(&(7, true)));
        assert!(
            seen.iter().any(|(_, c)| !c),
            "the long line is cut: {seen:?}"
        );
    }
}
