//! Prometheus metrics of the controller, served on `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::crd::LockState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LockLabels {
    pub namespace: String,
    pub environment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub namespace: String,
    pub environment: String,
    pub state: String,
}

/// One lock object by name (for objects that could not be read).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

const STATES: [LockState; 4] = [
    LockState::Available,
    LockState::Locked,
    LockState::Expired,
    LockState::ForceLocked,
];

pub struct Metrics {
    registry: Registry,
    lock_state: Family<StateLabels, Gauge>,
    held_seconds: Family<LockLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    expirations: Family<LockLabels, Counter>,
    force_acquisitions: Family<LockLabels, Counter>,
    force_releases: Family<LockLabels, Counter>,
    reconcile_duration: Histogram,
    reconcile_errors: Family<ErrorLabels, Counter>,
    malformed_locks: Family<ObjectLabels, Gauge>,
    /// Team notifications (see `controller::notify`).
    pub notify: super::notify::NotifyMetrics,
}

/// Registers `metric` (a handle: clones share the values) and returns it.
fn registered<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    registry.register(name, help, metric.clone());
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("deploylock");
        let notify = super::notify::NotifyMetrics::register(&mut registry);
        let r = &mut registry;
        Metrics {
            lock_state: registered(
                r,
                "lock_state",
                "1 for the state each lock is in, 0 for the others",
                Family::default(),
            ),
            held_seconds: registered(
                r,
                "lock_held_seconds",
                "Seconds the current holding has lasted (0 when not held), as of the last reconcile",
                Family::default(),
            ),
            expirations: registered(r, "expirations", "Holdings that expired", Family::default()),
            force_acquisitions: registered(
                r,
                "force_acquisitions",
                "Emergency locks taken with --force",
                Family::default(),
            ),
            force_releases: registered(
                r,
                "force_releases",
                "Locks released by someone other than their holder",
                Family::default(),
            ),
            reconcile_duration: registered(
                r,
                "reconcile_duration_seconds",
                "Time taken by one reconcile",
                Histogram::new([
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
            ),
            reconcile_errors: registered(
                r,
                "reconcile_errors",
                "Reconciles that failed, by error",
                Family::default(),
            ),
            malformed_locks: registered(
                r,
                "malformed_locks",
                "1 for each DeploymentLock that cannot be read and is skipped",
                Family::default(),
            ),
            registry,
            notify,
        }
    }
}

impl Metrics {
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn set_state(&self, lock: &LockLabels, state: LockState, held_seconds: f64) {
        for candidate in STATES {
            let labels = StateLabels {
                namespace: lock.namespace.clone(),
                environment: lock.environment.clone(),
                state: candidate.to_string(),
            };
            self.lock_state
                .get_or_create(&labels)
                .set(i64::from(candidate == state));
        }
        self.held_seconds.get_or_create(lock).set(held_seconds);
    }

    /// Forgets a deleted lock's series.
    pub fn remove(&self, lock: &LockLabels) {
        for candidate in STATES {
            self.lock_state.remove(&StateLabels {
                namespace: lock.namespace.clone(),
                environment: lock.environment.clone(),
                state: candidate.to_string(),
            });
        }
        self.held_seconds.remove(lock);
    }

    pub fn expired(&self, lock: &LockLabels) {
        self.expirations.get_or_create(lock).inc();
    }

    pub fn force_acquired(&self, lock: &LockLabels) {
        self.force_acquisitions.get_or_create(lock).inc();
    }

    pub fn force_released(&self, lock: &LockLabels) {
        self.force_releases.get_or_create(lock).inc();
    }

    pub fn observe_reconcile(&self, seconds: f64) {
        self.reconcile_duration.observe(seconds);
    }

    pub fn reconcile_failed(&self, error: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                error: error.to_string(),
            })
            .inc();
    }

    /// Marks a lock malformed (skipped) or forgets it.
    pub fn set_malformed(&self, object: &ObjectLabels, malformed: bool) {
        if malformed {
            self.malformed_locks.get_or_create(object).set(1);
        } else {
            self.malformed_locks.remove(object);
        }
    }
}
