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
        }
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
            holder.owner,
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
            next.owner,
            report::when(next.since, observed.server_time)
        );
        self.show(line);
    }

    fn finished(&mut self, observed: &Observed) {
        if let Some(bar) = self.spinner.take() {
            bar.finish_and_clear();
        }
        if self.announced {
            eprintln!(
                "deploylock: {} is {} (waited {}s)",
                self.environment,
                observed.state(),
                self.started.elapsed().as_secs()
            );
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
