//! What a waiting client shows while it waits: who holds the lock or who
//! is ahead.

use std::io::IsTerminal;
use std::time::Duration as StdDuration;

use tokio::time::Instant;

use crate::crd::{LockHolder, Waiter};
use crate::environment::Environment;
use crate::queue::Progress;
use crate::store::Observed;

use super::report;

/// Tells a person at a terminal who holds the lock or who is ahead (a
/// spinner line); in CI (no terminal) one line when waiting starts and one
/// when it ends.
pub struct WaitProgress {
    environment: Environment,
    spinner: Option<indicatif::ProgressBar>,
    started: Instant,
    announced: bool,
    last: String,
    /// Waiting to take the lock (not only for it to be free).
    acquiring: bool,
}

impl WaitProgress {
    pub fn new(environment: &Environment) -> Self {
        let spinner = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(StdDuration::from_millis(120));
            bar
        });
        WaitProgress {
            environment: environment.clone(),
            spinner,
            started: Instant::now(),
            announced: false,
            last: String::new(),
            acquiring: false,
        }
    }

    /// For a waiter that takes the lock at its turn: its last line says
    /// who acquired it.
    pub fn acquiring(environment: &Environment) -> Self {
        let mut progress = WaitProgress::new(environment);
        progress.acquiring = true;
        progress
    }

    fn show(&mut self, line: String) {
        let line = report::safe_line(&line);
        if line == self.last {
            return;
        }
        match &self.spinner {
            Some(bar) => bar.set_message(line.clone()),
            None if !self.announced => eprintln!("deploylock: {line}"),
            None => {}
        }
        self.announced = true;
        self.last = line;
    }
}

impl Progress for WaitProgress {
    fn held(&mut self, holder: &LockHolder, observed: &Observed) {
        let line = format!(
            "waiting for {}: held by {} since {} until {}, reason: \"{}\"",
            self.environment,
            report::holder_name(holder),
            holder.acquired_at.format("%H:%M:%SZ"),
            report::when(holder.expires_at, observed.server_time),
            holder.reason
        );
        self.show(line);
    }

    fn queued(&mut self, next: &Waiter, waiting: usize, observed: &Observed) {
        let line = format!(
            "waiting for {}: {waiting} in the queue, next is {} (since {})",
            self.environment,
            report::shown_name(&next.user, &next.owner),
            report::when(next.since, observed.server_time)
        );
        self.show(line);
    }

    fn frozen(&mut self, holder: &LockHolder, observed: &Observed) {
        let line = format!(
            "waiting for {}: the namespace is frozen, stop-the-line held by {} until {}, reason: \"{}\"",
            self.environment,
            report::holder_name(holder),
            report::when(holder.expires_at, observed.server_time),
            holder.reason
        );
        self.show(line);
    }

    fn finished(&mut self, observed: &Observed) {
        if let Some(bar) = self.spinner.take() {
            bar.finish_and_clear();
        }
        if !self.announced {
            return;
        }
        let waited = self.started.elapsed().as_secs();
        match observed.holder() {
            Some(holder) if self.acquiring => eprintln!(
                "deploylock: {}",
                report::safe_line(&format!(
                    "{} acquired by {} (waited {waited}s)",
                    self.environment,
                    report::holder_name(holder)
                ))
            ),
            _ => eprintln!(
                "deploylock: {} is {} (waited {waited}s)",
                self.environment,
                observed.state()
            ),
        }
    }
}

impl Drop for WaitProgress {
    fn drop(&mut self) {
        if let Some(bar) = self.spinner.take() {
            bar.finish_and_clear();
        }
    }
}
