//! One replica of the controller: it learns who it is and the API server's
//! clock, says it is ready, joins the leader election, and while it leads
//! writes the clock Lease and reconciles; on a stop it drains and releases
//! its Lease. The binary only wires this to its flags, signals and probes.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio::sync::watch;

use super::clock::ClockWriter;
use super::journal::Journal;
use super::leader::{self, Elector, Leadership, Timing};
use super::metrics::Metrics;
use super::{Context, LeaderContext, Settings};
use crate::servertime::ServerClock;
use crate::store::LockStore;

/// How long in-flight reconciles may go on after a stop.
pub const DRAIN: Duration = Duration::from_secs(3);
/// How long the Lease release may take after a stop.
pub const RELEASE_BOUND: Duration = Duration::from_secs(5);
/// How often the API server's clock is measured again.
pub const RECALIBRATE_EVERY: Duration = Duration::from_secs(30);

/// A replica's settings.
pub struct Replica {
    pub client: Client,
    /// This replica's identity in the Leases and in Events.
    pub identity: String,
    /// Watch only this namespace (all when `None`).
    pub namespace: Option<String>,
    pub metrics: Arc<Metrics>,
    /// True while the replica can serve: it knows who it is and the API
    /// server's clock, and the clock Lease is current (see
    /// [`super::clock::READY_WITHIN`]).
    pub ready: Arc<AtomicBool>,
    /// The Lease of the leader election.
    pub election_lease: LeaseRef,
    pub timing: Timing,
    /// The Lease the leader keeps the deploylock clock in.
    pub clock_lease: LeaseRef,
    /// How long an expired holding is shown before it is cleared.
    pub retention: chrono::Duration,
    /// GitOps gating (`--gitops-gating`, see [`super::gitops`]), by the leader.
    pub gitops_gating: bool,
    /// Freeze windows (see [`super::windows`]): a client acting as the
    /// window identity, or `None` with `--freeze-windows=false`.
    pub window_client: Option<Client>,
    /// EnvironmentBindings to policy bindings (`--environment-bindings`,
    /// see [`super::envbinding`]), by the leader.
    pub environment_bindings: bool,
}

/// A Lease the replica reads and writes, by namespace and name.
#[derive(Clone, Debug)]
pub struct LeaseRef {
    pub namespace: String,
    pub name: String,
}

impl LeaseRef {
    fn api(&self, client: &Client) -> Api<Lease> {
        Api::namespaced(client.clone(), &self.namespace)
    }
}

/// Retries `attempt` (with a short backoff) until it succeeds or a stop is
/// requested (`None`).
pub async fn until_stopped<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    what: &str,
    stop: &mut watch::Receiver<bool>,
    mut attempt: impl FnMut() -> F,
) -> Option<T> {
    let mut delay = Duration::from_millis(250);
    loop {
        tokio::select! {
            result = tokio::time::timeout(Duration::from_secs(10), attempt()) => match result {
                Ok(Ok(value)) => return Some(value),
                Ok(Err(err)) => tracing::warn!(error = %err, "{what} failed; retrying"),
                Err(_) => tracing::warn!("{what} timed out; retrying"),
            },
            _ = stop.wait_for(|stopped| *stopped) => return None,
        }
        tokio::select! {
            _ = tokio::time::sleep(leader::jitter(delay)) => {}
            _ = stop.wait_for(|stopped| *stopped) => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

impl Replica {
    /// Runs until `stop` turns true: joins the election, and reconciles
    /// during each term it leads.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let Some((user, clock)) = self.start(&mut stop).await else {
            tracing::info!("stopped before starting");
            return;
        };
        let calibration = tokio::spawn(clock.clone().keep_calibrated(RECALIBRATE_EVERY));
        // Ready while the clock Lease is kept (by this replica or another).
        let readiness = tokio::spawn(super::clock::keep_readiness(
            self.clock_lease.api(&self.client),
            self.clock_lease.name.clone(),
            clock.clone(),
            self.ready.clone(),
            stop.clone(),
        ));
        // Leader or not, the replica keeps the history it sees, for the
        // notifications of a term it may lead later.
        let journal = Journal::default();
        let journal_watch = tokio::spawn(journal.clone().watch(
            self.client.clone(),
            self.namespace.clone(),
            stop.clone(),
        ));

        let (leadership_sender, mut leadership) = watch::channel(Leadership::Follower);
        let elector = Elector {
            api: self.election_lease.api(&self.client),
            name: self.election_lease.name.clone(),
            identity: self.identity.clone(),
            timing: self.timing,
            clock: clock.clone(),
        };
        let mut election = tokio::spawn(elector.run(leadership_sender, stop.clone()));
        loop {
            tokio::select! {
                gained = leader::gained(&mut leadership) => if !gained { break },
                _ = stop.wait_for(|stopped| *stopped) => break,
            }
            self.lead(&user, &clock, &journal, &leadership, &stop).await;
            if *stop.borrow() {
                break;
            }
            tracing::warn!("lost leadership: stopped reconciling; rejoining the election");
        }

        // The elector releases the Lease on the stop (in parallel with the drain).
        match tokio::time::timeout(RELEASE_BOUND, &mut election).await {
            Ok(_) => tracing::info!("stopped"),
            Err(_) => {
                election.abort();
                tracing::warn!("stopped without confirming the Lease release");
            }
        }
        calibration.abort();
        journal_watch.abort();
        readiness.abort();
    }

    /// Who this replica is and the API server's clock, retried until they
    /// are known or a stop comes (`None`).
    async fn start(&self, stop: &mut watch::Receiver<bool>) -> Option<(String, ServerClock)> {
        let store = LockStore::new(self.client.clone(), "default");
        let user = until_stopped("asking the API server who I am", stop, || store.whoami()).await?;
        let clock = until_stopped("reading the API server's clock", stop, || {
            ServerClock::new(self.client.clone())
        })
        .await?;
        Some((user, clock))
    }

    /// One term as the leader: the clock Lease and the reconciles, until a
    /// stop or the loss of leadership; then reconciles get [`DRAIN`].
    async fn lead(
        &self,
        user: &str,
        clock: &ServerClock,
        journal: &Journal,
        leadership: &watch::Receiver<Leadership>,
        stop: &watch::Receiver<bool>,
    ) {
        let identity = self.identity.as_str();
        tracing::info!(identity, "leading; reconciling");
        let (term_sender, term) = term_until_stopped_or_lost(stop, leadership);
        let clock_lease = ClockWriter {
            api: self.clock_lease.api(&self.client),
            name: self.clock_lease.name.clone(),
            identity: identity.to_string(),
            clock: clock.clone(),
        }
        .spawn(term.clone());
        // One watch of the locks this term, shared by the reconciles and
        // the notification workers.
        let (lock_watch, lock_view) = super::lockwatch::lock_watch(journal.clone());
        let side_tasks = self.spawn_side_tasks(clock, &term, lock_view);
        let context = Arc::new(Context::new(
            self.client.clone(),
            self.metrics.clone(),
            Settings {
                retention: self.retention,
                instance: identity.to_string(),
            },
            clock.clone(),
            clock_lease,
            user.to_string(),
            journal.clone(),
        ));
        let drained = {
            let mut term = term.clone();
            async move {
                let _ = term.wait_for(|ended| *ended).await;
                tokio::time::sleep(DRAIN).await;
            }
        };
        tokio::select! {
            _ = super::run(self.namespace.clone(), context, term.clone(), lock_watch) => {}
            _ = drained => tracing::warn!("reconciles still running after {DRAIN:?}; abandoned"),
        }
        let _ = term_sender.send(true);
        for task in side_tasks {
            task.abort();
        }
    }

    /// The leader's tasks beside the reconciles, each ending with the term:
    /// GitOps gating (if on), freeze windows (if on), environment bindings
    /// (if on) and team notifications
    /// (never in the lock path).
    fn spawn_side_tasks(
        &self,
        clock: &ServerClock,
        term: &watch::Receiver<bool>,
        lock_view: super::lockwatch::LockView,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let leader = LeaderContext {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
            clock: clock.clone(),
            instance: self.identity.clone(),
        };
        let mut tasks = Vec::new();
        if self.gitops_gating {
            let gating = super::gitops::GitOpsGating {
                leader: leader.clone(),
            };
            tasks.push(tokio::spawn(gating.run(term.clone())));
        }
        if let Some(holder_client) = self.window_client.clone() {
            let windows = super::windows::FreezeWindows {
                leader: leader.clone(),
                holder_client,
                locks: lock_view.clone(),
            };
            tasks.push(tokio::spawn(windows.run(term.clone())));
        }
        if self.environment_bindings {
            let bindings = super::envbinding::EnvironmentBindings {
                leader: leader.clone(),
            };
            tasks.push(tokio::spawn(bindings.run(term.clone())));
        }
        let notifier = super::notify::Notifier {
            leader,
            metrics: self.metrics.notify.clone(),
        };
        tasks.push(tokio::spawn(super::notify::run(
            notifier,
            lock_view,
            term.clone(),
        )));
        tasks
    }
}

/// A term's end: true on a stop or when leadership is lost (or when the
/// returned sender is dropped).
fn term_until_stopped_or_lost(
    stop: &watch::Receiver<bool>,
    leadership: &watch::Receiver<Leadership>,
) -> (watch::Sender<bool>, watch::Receiver<bool>) {
    let (term_sender, term) = watch::channel(false);
    let mut stop = stop.clone();
    let leadership = leadership.clone();
    let sender = term_sender.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => {}
            _ = leader::lost(leadership) => {}
            _ = sender.closed() => {}
        }
        let _ = sender.send(true);
    });
    (term_sender, term)
}
