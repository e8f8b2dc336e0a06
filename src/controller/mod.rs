//! The controller: keeps each DeploymentLock's status true to the lock rules,
//! at the instant it changes.
//!
//! For each lock it (1) announces new history entries as Kubernetes Events,
//! (2) writes `status` (state, conditions) computed by [`rules::state_at`],
//! (3) clears holdings that stayed expired for the retention period, and
//! (4) asks to be woken exactly at the next instant the state changes by
//! itself (the expiry), so nothing polls.
//!
//! Events have deterministic names (lock UID + history sequence), so an
//! Event is created once even when two replicas or a restarted controller
//! reconcile the same entry: the API server answers 409 to the second.

pub mod metrics;
pub mod server;

use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};

use crate::crd::{
    DeploymentLock, DeploymentLockStatus, HistoryAction, HistoryEntry, LockHolder, LockState,
};
use crate::rules::{self, Actor, Decision, Request};

use metrics::{LockLabels, Metrics};

/// Name the controller reports itself as in Events.
pub const CONTROLLER_NAME: &str = "deploylock.dev/controller";
/// Condition type that is True while a holding is in force.
pub const LOCKED_CONDITION: &str = "Locked";

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),
    #[error("lock object has no namespace or name")]
    MissingObjectKey,
}

impl Error {
    /// Label for the reconcile error metric.
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(status)) if status.code == 409 => "conflict".into(),
            Error::Kube(kube::Error::Api(status)) => format!("api_{}", status.code),
            Error::Kube(_) => "transport".into(),
            Error::MissingObjectKey => "missing_object_key".into(),
        }
    }
}

/// Settings of a controller run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long an expired holding is shown as Expired before it is cleared.
    pub retention: Duration,
    /// Identity reported in Events (the Pod name in a cluster).
    pub instance: String,
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// Server time minus local time, measured at start: decisions are taken
    /// on the API server's clock, like the CLI's.
    pub clock_offset: Duration,
    /// The username this controller authenticates as (recorded when it clears).
    pub user: String,
}

impl Context {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.clock_offset
    }
}

/// Runs the controller over `api` until `shutdown` resolves.
pub async fn run(
    api: Api<DeploymentLock>,
    context: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    // The cache holds every lock; managedFields are most of an object's
    // size and nothing here reads them. A replace without them keeps the
    // stored ones (the API server treats an empty list as unset).
    let (reader, writer) = reflector::store();
    let locks = watcher(api, watcher::Config::default().any_semantic())
        .modify(|lock| lock.managed_fields_mut().clear())
        .reflect(writer)
        .applied_objects();
    Controller::for_stream(locks, reader)
        .with_config(kube::runtime::controller::Config::default().concurrency(32))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::trace!(lock = %object, "reconciled"),
                Err(err) => tracing::debug!(error = %err, "reconcile failed"),
            }
        })
        .await;
}

fn error_policy(lock: Arc<DeploymentLock>, err: &Error, context: Arc<Context>) -> Action {
    context.metrics.reconcile_failed(&err.metric_label());
    tracing::warn!(lock = %lock.name_any(), error = %err, "reconcile failed, retrying");
    // A conflict means the object moved on: retry at once with the new version.
    match err {
        Error::Kube(kube::Error::Api(status)) if status.code == 409 => {
            Action::requeue(StdDuration::from_millis(50))
        }
        _ => Action::requeue(StdDuration::from_secs(2)),
    }
}

/// One reconcile of one lock.
pub async fn reconcile(lock: Arc<DeploymentLock>, context: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile_inner(&lock, &context).await;
    context
        .metrics
        .observe_reconcile(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_inner(lock: &DeploymentLock, context: &Context) -> Result<Action, Error> {
    let namespace = lock.namespace().ok_or(Error::MissingObjectKey)?;
    let name = lock.meta().name.clone().ok_or(Error::MissingObjectKey)?;
    let api: Api<DeploymentLock> = Api::namespaced(context.client.clone(), &namespace);
    let labels = LockLabels {
        namespace: namespace.clone(),
        environment: lock.spec.environment.clone(),
    };
    if lock.meta().deletion_timestamp.is_some() {
        context.metrics.remove(&labels);
        return Ok(Action::await_change());
    }
    let now = context.now();
    let state = rules::state_at(&lock.spec, now);
    let status = lock.status.clone().unwrap_or_default();

    // Housekeeping: a holding expired for the whole retention is cleared
    // through the same rules the CLI uses, under the read resourceVersion.
    if let (LockState::Expired, Some(holder)) = (state, &lock.spec.holder) {
        let clear = Request::Clear {
            actor: Actor::new(context.user.clone(), Some("deploylock-controller".into())),
            lock_id: holder.lock_id.clone(),
            retention: context.settings.retention,
        };
        if let Ok(Decision::Change { next, .. }) =
            rules::decide(&name, Some(&lock.spec), now, &clear)
        {
            // The Expired event must exist before the holding disappears.
            if !expiry_recorded(&status, holder) {
                announce_expiry(lock, context, &labels).await?;
            }
            let mut cleared = lock.clone();
            cleared.spec = next;
            api.replace(&name, &PostParams::default(), &cleared)
                .await
                .map_err(Error::Kube)?;
            tracing::info!(namespace, environment = %lock.spec.environment, owner = %holder.owner, "cleared expired lock");
            // The write triggers the next reconcile.
            return Ok(Action::await_change());
        }
    }

    // 1. Events for history entries not yet announced.
    let announced = status.last_event_sequence.unwrap_or(0);
    let mut last_sequence = announced;
    for entry in lock
        .spec
        .history
        .iter()
        .filter(|entry| entry.sequence > announced)
    {
        announce_entry(lock, entry, context, &labels).await?;
        last_sequence = last_sequence.max(entry.sequence);
    }
    if state == LockState::Expired
        && let Some(holder) = &lock.spec.holder
        && !expiry_recorded(&status, holder)
    {
        announce_expiry(lock, context, &labels).await?;
    }

    // 2. Status.
    let held_seconds = match (&lock.spec.holder, state) {
        (Some(holder), LockState::Locked | LockState::ForceLocked) => {
            (now - holder.acquired_at).num_milliseconds().max(0) as f64 / 1000.0
        }
        _ => 0.0,
    };
    context.metrics.set_state(&labels, state, held_seconds);
    let desired = desired_status(lock, &status, state, last_sequence, now);
    if desired != status {
        if status.state != desired.state {
            tracing::info!(
                namespace,
                environment = %lock.spec.environment,
                state = %state,
                owner = lock.spec.holder.as_ref().map(|h| h.owner.as_str()).unwrap_or("-"),
                reason = lock.spec.holder.as_ref().map(|h| h.reason.as_str()).unwrap_or("-"),
                "lock state changed"
            );
        }
        let mut updated = lock.clone();
        updated.status = Some(desired);
        // Carries the read resourceVersion: refused if the lock moved on.
        api.replace_status(&name, &PostParams::default(), &updated)
            .await
            .map_err(Error::Kube)?;
    }

    // 3. Wake up exactly when the state will change by itself.
    Ok(match (&lock.spec.holder, state) {
        (Some(holder), LockState::Locked | LockState::ForceLocked) => {
            Action::requeue(until(holder.expires_at, now))
        }
        (Some(holder), LockState::Expired) => {
            Action::requeue(until(holder.expires_at + context.settings.retention, now))
        }
        _ => Action::await_change(),
    })
}

/// Time from `now` to `at`, plus a millisecond so the wake-up lands at or
/// after the instant, never just before it.
fn until(at: DateTime<Utc>, now: DateTime<Utc>) -> StdDuration {
    (at - now).to_std().unwrap_or_default() + StdDuration::from_millis(1)
}

fn desired_status(
    lock: &DeploymentLock,
    current: &DeploymentLockStatus,
    state: LockState,
    last_event_sequence: i64,
    now: DateTime<Utc>,
) -> DeploymentLockStatus {
    let holder = lock.spec.holder.as_ref();
    let locked = matches!(state, LockState::Locked | LockState::ForceLocked);
    let message = match holder {
        Some(holder) if locked => format!(
            "held by {} until {}: {}",
            holder.owner,
            holder.expires_at.format("%Y-%m-%dT%H:%M:%SZ"),
            holder.reason
        ),
        Some(holder) => format!(
            "expired at {} (was held by {})",
            holder.expires_at.format("%Y-%m-%dT%H:%M:%SZ"),
            holder.owner
        ),
        None => "available".to_string(),
    };
    let previous = current
        .conditions
        .iter()
        .find(|condition| condition.type_ == LOCKED_CONDITION);
    let status_value = if locked { "True" } else { "False" };
    let generation = lock.meta().generation;
    let transition_time = match previous {
        Some(previous) if previous.status == status_value => previous.last_transition_time.clone(),
        _ => Time(to_timestamp(now)),
    };
    DeploymentLockStatus {
        state: Some(state),
        lock_id: holder.map(|holder| holder.lock_id.clone()),
        conditions: vec![Condition {
            type_: LOCKED_CONDITION.to_string(),
            status: status_value.to_string(),
            reason: state.to_string(),
            message,
            observed_generation: generation,
            last_transition_time: transition_time,
        }],
        observed_generation: generation,
        last_event_sequence: Some(last_event_sequence),
    }
}

fn to_timestamp(time: DateTime<Utc>) -> Timestamp {
    Timestamp::from_second(time.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn reference(lock: &DeploymentLock) -> ObjectReference {
    lock.object_ref(&())
}

/// Publishes one history entry as an Event, once.
async fn announce_entry(
    lock: &DeploymentLock,
    entry: &HistoryEntry,
    context: &Context,
    labels: &LockLabels,
) -> Result<(), Error> {
    let (reason, event_type) = match entry.action {
        HistoryAction::Acquired | HistoryAction::TookOverExpired => ("Acquired", "Normal"),
        HistoryAction::Extended => ("Extended", "Normal"),
        HistoryAction::Released => ("Released", "Normal"),
        HistoryAction::ForceAcquired => ("ForceAcquired", "Warning"),
        HistoryAction::ForceReleased => ("ForceReleased", "Warning"),
        HistoryAction::Cleared => ("Cleared", "Normal"),
    };
    let expiry = entry
        .expires_at
        .map(|at| format!(" until {}", at.format("%Y-%m-%dT%H:%M:%SZ")))
        .unwrap_or_default();
    let takeover = if entry.action == HistoryAction::TookOverExpired {
        " (took over an expired lock)"
    } else {
        ""
    };
    let note = format!(
        "{} by {} (owner {}){expiry}{takeover}: {}",
        reason, entry.by, entry.owner, entry.reason
    );
    let created = publish(
        lock,
        context,
        &format!("{}", entry.sequence),
        reason,
        event_type,
        note,
    )
    .await?;
    if created {
        match entry.action {
            HistoryAction::ForceAcquired => context.metrics.force_acquired(labels),
            HistoryAction::ForceReleased => context.metrics.force_released(labels),
            _ => {}
        }
        tracing::info!(
            namespace = %labels.namespace,
            environment = %labels.environment,
            action = reason,
            owner = %entry.owner,
            by = %entry.by,
            reason = %entry.reason,
            "lock transition"
        );
    }
    Ok(())
}

/// Whether the status already shows this holding Expired: its Event was
/// published before that status was written, so there is nothing to send.
fn expiry_recorded(status: &DeploymentLockStatus, holder: &LockHolder) -> bool {
    status.state == Some(LockState::Expired)
        && status.lock_id.as_deref() == Some(holder.lock_id.as_str())
}

/// Publishes the Expired event of the current holding, once.
async fn announce_expiry(
    lock: &DeploymentLock,
    context: &Context,
    labels: &LockLabels,
) -> Result<(), Error> {
    let Some(holder) = &lock.spec.holder else {
        return Ok(());
    };
    let note = format!(
        "Expired at {}: held by {} (owner {}): {}",
        holder.expires_at.format("%Y-%m-%dT%H:%M:%SZ"),
        holder.user,
        holder.owner,
        holder.reason
    );
    let suffix = format!("expired-{}", short_id(&holder.lock_id));
    let created = publish(lock, context, &suffix, "Expired", "Normal", note).await?;
    if created {
        context.metrics.expired(labels);
        tracing::info!(
            namespace = %labels.namespace,
            environment = %labels.environment,
            action = "Expired",
            owner = %holder.owner,
            reason = %holder.reason,
            expires_at = %holder.expires_at,
            "lock transition"
        );
    }
    Ok(())
}

fn short_id(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect::<String>()
        .to_lowercase()
}

/// Creates an Event with a name derived from the lock's UID and `suffix`.
/// Returns false if it already existed (another replica or an earlier run
/// created it).
async fn publish(
    lock: &DeploymentLock,
    context: &Context,
    suffix: &str,
    reason: &str,
    event_type: &str,
    note: String,
) -> Result<bool, Error> {
    let namespace = lock.namespace().ok_or(Error::MissingObjectKey)?;
    let uid = lock.meta().uid.clone().unwrap_or_default();
    let name = format!("{}.{}.{}", lock.name_any(), short_id(&uid), suffix);
    let event = Event {
        metadata: kube::core::ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.clone()),
            ..Default::default()
        },
        event_time: Some(MicroTime(Timestamp::now())),
        action: Some(reason.to_string()),
        reason: Some(reason.to_string()),
        type_: Some(event_type.to_string()),
        note: Some(truncate(&note, 1024)),
        regarding: Some(reference(lock)),
        reporting_controller: Some(CONTROLLER_NAME.to_string()),
        reporting_instance: Some(truncate(&context.settings.instance, 128)),
        ..Default::default()
    };
    let events: Api<Event> = Api::namespaced(context.client.clone(), &namespace);
    match events.create(&PostParams::default(), &event).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(err) => Err(Error::Kube(err)),
    }
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}
