//! The signals that end a waiting client and that `exec` passes on to its
//! command, taken over by the process from its start.

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// SIGINT, SIGTERM and SIGHUP received by this process: while waiting they
/// mean "give up", while a command runs they are passed on to it. Once this
/// exists, those signals no longer end the process by themselves.
///
/// A SIGHUP that is ignored when this starts (`nohup`) stays ignored, and
/// the command inherits that.
pub struct Signals {
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
    /// A stop asked for from within the process (the controller's waits):
    /// read as a SIGTERM once it turns true.
    cancel: Option<watch::Receiver<bool>>,
}

/// Whether `signal` is ignored (SIG_IGN) in this process, from the SigIgn
/// mask in /proc/self/status.
fn is_ignored(signal: Signal) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal as i32 - 1)) != 0)
}

impl Signals {
    pub fn new() -> Self {
        let hup_ignored = is_ignored(Signal::SIGHUP);
        let kinds = [
            (Signal::SIGINT, SignalKind::interrupt()),
            (Signal::SIGTERM, SignalKind::terminate()),
            (Signal::SIGHUP, SignalKind::hangup()),
        ];
        let streams = kinds
            .into_iter()
            .filter(|(signal_, _)| !(*signal_ == Signal::SIGHUP && hup_ignored))
            .filter_map(|(signal_, kind)| signal(kind).ok().map(|stream| (signal_, stream)))
            .collect();
        Signals {
            streams,
            cancel: None,
        }
    }

    /// Listens to no signal: for waits that only a deadline or an abort ends
    /// (the controller's).
    pub fn none() -> Self {
        Signals {
            streams: Vec::new(),
            cancel: None,
        }
    }

    /// Listens to no signal, but reads `cancel` turning true as a SIGTERM:
    /// a wait of the controller's that is given up as a client's is (leaving
    /// its queue place at once).
    pub fn cancelled_by(cancel: watch::Receiver<bool>) -> Self {
        Signals {
            streams: Vec::new(),
            cancel: Some(cancel),
        }
    }

    /// The next signal received.
    pub async fn next(&mut self) -> Option<Signal> {
        if let Some(cancel) = &mut self.cancel {
            // Read once, as one signal is (a dropped sender cancels nothing).
            if cancel.wait_for(|cancelled| *cancelled).await.is_ok() {
                self.cancel = None;
                return Some(Signal::SIGTERM);
            }
            return std::future::pending().await;
        }
        if self.streams.is_empty() {
            return std::future::pending().await;
        }
        let futures = self.streams.iter_mut().map(|(signal_, stream)| {
            Box::pin(async move { stream.recv().await.map(|_| *signal_) })
        });
        let (received, _, _) = futures::future::select_all(futures).await;
        received
    }
}

impl Default for Signals {
    fn default() -> Self {
        Self::new()
    }
}
