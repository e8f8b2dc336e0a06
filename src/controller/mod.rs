//! The controller: keeps each DeploymentLock's status true to the lock rules,
//! at the instant it changes.
//!
//! For each lock it (1) writes `status` (state, conditions) computed by
//! [`rules::state_at`] on the API server's clock, (2) announces new history
//! entries and expiries as Kubernetes Events, (3) clears holdings that stayed
//! expired for the retention period, and (4) asks to be woken exactly at the
//! next instant the state changes by itself (the expiry), so nothing polls.
//!
//! Time is the API server's, never the local wall clock's: a lock is Expired
//! only once [`ServerClock::lower_bound`] has passed its `expiresAt`, and the
//! clock Lease (the admission policy's trusted time, see [`clock`]) is
//! brought to at least `expiresAt` before the Expired mark is written.
//!
//! The status is written before Events: a refused Event (a terminating
//! namespace) never holds back the Expired mark. Events have deterministic
//! names (lock UID + history sequence), so an Event is created once even when
//! two replicas or a restarted controller reconcile the same entry: the API
//! server answers 409 to the second.
//!
//! Locks are watched as untyped objects and converted one by one: a lock the
//! Rust types cannot read is reported (log, Warning Event, the
//! `deploylock_malformed_locks` metric) and skipped; the others go on.

pub mod clock;
pub mod envbinding;
pub mod gitops;
pub mod journal;
pub mod leader;
pub mod lockwatch;
pub mod metrics;
pub mod notify;
pub mod plan;
pub mod replica;
pub mod server;
pub mod windows;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::time::Instant;

use crate::crd::{DeploymentLock, DeploymentLockSpec, DeploymentLockStatus, HistoryAction};
use crate::environment::{Environment, InvalidEnvironment};
use crate::servertime::ServerClock;
use crate::store::{LockStore, MalformedLock, decode_lock};

use clock::ClockHandle;
use metrics::{LockLabels, Metrics, ObjectLabels};
use plan::{Announcement, EventText, Step, short_id};

/// Name the controller reports itself as in Events.
pub const CONTROLLER_NAME: &str = "deploylock.dev/controller";
/// Condition type that is True while a holding is in force.
pub const LOCKED_CONDITION: &str = "Locked";
/// Time limit of every request a reconcile makes.
pub const REQUEST_TIMEOUT: StdDuration = StdDuration::from_secs(10);
/// The watch's list and watch calls end after this long (and are renewed),
/// and the client gives up on a connection silent for longer than
/// [`READ_TIMEOUT`]: a watch on a dead connection is noticed within seconds.
pub const WATCH_TIMEOUT_SECONDS: u32 = 20;
/// Idle read limit of the controller's connections (see `WATCH_TIMEOUT_SECONDS`).
pub const READ_TIMEOUT: StdDuration = StdDuration::from_secs(30);

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),
    #[error("request timed out after {0:?}")]
    Timeout(StdDuration),
    #[error("cannot advance the clock Lease: {0}")]
    Clock(String),
    #[error("lock object has no namespace or name")]
    MissingObjectKey,
    #[error("lock object's name is not an environment: {0}")]
    InvalidName(#[from] InvalidEnvironment),
}

impl Error {
    /// Label for the reconcile error metric.
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(status)) if status.code == 409 => "conflict".into(),
            Error::Kube(kube::Error::Api(status)) => format!("api_{}", status.code),
            Error::Kube(_) => "transport".into(),
            Error::Timeout(_) => "timeout".into(),
            Error::Clock(_) => "clock_lease".into(),
            Error::MissingObjectKey => "missing_object_key".into(),
            Error::InvalidName(_) => "invalid_name".into(),
        }
    }

    fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(status)) if status.code == 409)
    }
}

/// Runs `request` with the reconcile's time limit.
async fn timed<T>(request: impl Future<Output = Result<T, kube::Error>>) -> Result<T, Error> {
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .map_err(|_| Error::Timeout(REQUEST_TIMEOUT))?
        .map_err(Error::Kube)
}

/// Settings of a controller run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long an expired holding is shown as Expired before it is cleared.
    pub retention: Duration,
    /// Identity reported in Events (the Pod name in a cluster).
    pub instance: String,
}

/// What the leader's tasks beside the reconciles (GitOps gating, freeze
/// windows, environment bindings) share.
#[derive(Clone)]
pub struct LeaderContext {
    /// The controller's own identity.
    pub client: Client,
    /// Only this namespace (all when `None`): the controller's `--namespace`.
    pub namespace: Option<String>,
    /// The API server's clock: decisions and Event times are taken on it.
    pub clock: ServerClock,
    /// This replica's identity, in Events.
    pub instance: String,
}

impl LeaderContext {
    /// Who records the tasks' Events.
    fn reporter(&self) -> Reporter<'_> {
        (&self.client, &self.clock, self.instance.as_str())
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// The API server's clock: decisions are taken on it, never on ours.
    pub clock: ServerClock,
    /// The clock Lease, advanced before an Expired mark.
    pub clock_lease: ClockHandle,
    /// The username this controller authenticates as (recorded when it clears).
    pub user: String,
    /// The replica's journal: history entries a lock dropped before they
    /// were announced, when this replica saw them.
    journal: journal::Journal,
    /// Consecutive failed reconciles per lock, for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Per lock UID, the holding whose Expired Event was published.
    expiries: Mutex<HashMap<String, String>>,
    /// Malformed locks reported, with the resourceVersion reported.
    malformed: Mutex<HashMap<(String, String), String>>,
    /// Locks seen by the list under way (to forget malformed ones deleted
    /// while the watch was down).
    listed: Mutex<std::collections::HashSet<(String, String)>>,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        settings: Settings,
        clock: ServerClock,
        clock_lease: ClockHandle,
        user: String,
        journal: journal::Journal,
    ) -> Self {
        Context {
            client,
            metrics,
            settings,
            clock,
            clock_lease,
            user,
            journal,
            failures: Mutex::default(),
            expiries: Mutex::default(),
            malformed: Mutex::default(),
            listed: Mutex::default(),
        }
    }
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        // Plain bookkeeping: still valid after a panic elsewhere.
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Watch retries: quick (the watch must resume within seconds after an API
/// server restart), with jitter, never faster than every 250 ms.
struct WatchBackoff {
    next: StdDuration,
}

impl WatchBackoff {
    const FIRST: StdDuration = StdDuration::from_millis(250);
    const MAX: StdDuration = StdDuration::from_secs(2);
}

impl Iterator for WatchBackoff {
    type Item = StdDuration;

    fn next(&mut self) -> Option<StdDuration> {
        let current = self.next;
        self.next = (current * 2).min(Self::MAX);
        Some(leader::jitter(current))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// The API of `K` in the namespace watched (every namespace when `None`).
pub(crate) fn scoped_api<K>(client: Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client, namespace),
        None => Api::all(client),
    }
}

/// The DeploymentLocks in the namespace watched, as untyped objects: a
/// watch of them skips a malformed lock instead of failing on it.
pub(crate) fn lock_objects_api(client: Client, namespace: Option<&str>) -> Api<DynamicObject> {
    let resource = ApiResource::erase::<DeploymentLock>(&());
    match namespace {
        Some(namespace) => Api::namespaced_with(client, namespace, &resource),
        None => Api::all_with(client, &resource),
    }
}

/// Runs the controller over the locks of `namespace` (all when `None`)
/// until `stop` turns true; in-flight reconciles may finish (the caller
/// bounds how long it waits). If the first list has not completed by then,
/// it returns at once: there is nothing to finish. The watch fills `locks`'
/// cache and tells its readers (notification delivery) of each change.
pub async fn run(
    namespace: Option<String>,
    context: Arc<Context>,
    stop: tokio::sync::watch::Receiver<bool>,
    locks: lockwatch::LockWatch,
) {
    let api = lock_objects_api(context.client.clone(), namespace.as_deref());
    // The cache holds every lock; managedFields are most of an object's
    // size and nothing here reads them. A replace without them keeps the
    // stored ones (the API server treats an empty list as unset).
    let (writer, feed) = locks.into_parts();
    let reader = writer.as_reader();
    let converter = context.clone();
    let locks = watcher(
        api,
        watcher::Config::default()
            .any_semantic()
            .timeout(WATCH_TIMEOUT_SECONDS),
    )
    .backoff(WatchBackoff {
        next: WatchBackoff::FIRST,
    })
    .filter_map(move |event| {
        let converted = match event {
            Ok(event) => convert(event, &converter).map(Ok),
            // Retried by the watcher's own short backoff above; passing the
            // error on would add the controller's (up to 30 s) on top.
            Err(err) => {
                tracing::warn!(error = %err, "watching DeploymentLocks failed; retrying");
                None
            }
        };
        futures::future::ready(converted)
    })
    .modify(|lock| lock.managed_fields_mut().clear())
    .reflect(writer)
    .inspect(move |event| {
        if let Ok(event) = event {
            feed.publish(event);
        }
    })
    .applied_objects();
    let stopped = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    // The controller's runner waits for the first list before anything
    // else, its graceful shutdown included.
    let unready = reader.clone();
    let stopped_unready = {
        let stop = stop.clone();
        async move {
            stopped(stop).await;
            if unready.wait_until_ready().now_or_never().is_some() {
                std::future::pending::<()>().await;
            }
        }
    };
    let controller = Controller::for_stream(locks, reader)
        .with_config(kube::runtime::controller::Config::default().concurrency(32))
        .graceful_shutdown_on(stopped(stop))
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::trace!(lock = %object, "reconciled"),
                Err(err) => tracing::debug!(error = %err, "reconcile failed"),
            }
        });
    tokio::select! {
        _ = controller => {}
        _ = stopped_unready => tracing::debug!("stopped before the first list completed"),
    }
}

/// A stand-in carrying only the metadata, to remove a lock from the cache.
fn placeholder(object: &DynamicObject) -> DeploymentLock {
    DeploymentLock {
        metadata: object.metadata.clone(),
        spec: Default::default(),
        status: None,
    }
}

/// The lock an object holds, decoded by the store's one decoder, which names
/// the part that does not decode (e.g. `spec.history[0].at`).
fn typed(object: &DynamicObject) -> Result<DeploymentLock, Box<MalformedLock>> {
    let value = serde_json::to_value(object).map_err(|source| {
        Box::new(MalformedLock {
            namespace: object.namespace().unwrap_or_default(),
            name: object.name_any(),
            location: "object".into(),
            source,
        })
    })?;
    decode_lock(value)
}

/// One watch event as typed locks. A malformed lock is reported once per
/// version and dropped from the cache (and from the reconciles).
fn convert(
    event: watcher::Event<DynamicObject>,
    context: &Arc<Context>,
) -> Option<watcher::Event<DeploymentLock>> {
    match event {
        watcher::Event::Init => {
            locked(&context.listed).clear();
            Some(watcher::Event::Init)
        }
        watcher::Event::InitDone => {
            let listed = std::mem::take(&mut *locked(&context.listed));
            let gone: Vec<(String, String)> = locked(&context.malformed)
                .keys()
                .filter(|key| !listed.contains(*key))
                .cloned()
                .collect();
            for key in gone {
                locked(&context.malformed).remove(&key);
                context.metrics.set_malformed(
                    &ObjectLabels {
                        namespace: key.0,
                        name: key.1,
                    },
                    false,
                );
            }
            Some(watcher::Event::InitDone)
        }
        watcher::Event::InitApply(object) => {
            locked(&context.listed).insert(object_key(&object));
            match typed(&object) {
                Ok(lock) => {
                    well_formed(&object, context);
                    Some(watcher::Event::InitApply(lock))
                }
                Err(err) => {
                    report_malformed(&object, &err, context);
                    None
                }
            }
        }
        watcher::Event::Apply(object) => match typed(&object) {
            Ok(lock) => {
                well_formed(&object, context);
                Some(watcher::Event::Apply(lock))
            }
            Err(err) => {
                report_malformed(&object, &err, context);
                Some(watcher::Event::Delete(placeholder(&object)))
            }
        },
        watcher::Event::Delete(object) => {
            well_formed(&object, context);
            Some(watcher::Event::Delete(placeholder(&object)))
        }
    }
}

fn object_key(object: &DynamicObject) -> (String, String) {
    (object.namespace().unwrap_or_default(), object.name_any())
}

/// Forgets a lock that was reported malformed (fixed or deleted).
fn well_formed(object: &DynamicObject, context: &Context) {
    let key = object_key(object);
    if locked(&context.malformed).remove(&key).is_some() {
        tracing::info!(namespace = %key.0, name = %key.1, "lock is no longer malformed");
        context.metrics.set_malformed(
            &ObjectLabels {
                namespace: key.0,
                name: key.1,
            },
            false,
        );
    }
}

/// Reports a lock the types cannot read: once per version, with its name.
fn report_malformed(object: &DynamicObject, err: &MalformedLock, context: &Arc<Context>) {
    let key = object_key(object);
    let version = object.resource_version().unwrap_or_default();
    {
        let mut reported = locked(&context.malformed);
        if reported.get(&key) == Some(&version) {
            return;
        }
        reported.insert(key.clone(), version.clone());
    }
    tracing::warn!(
        namespace = %key.0,
        name = %key.1,
        resource_version = %version,
        error = %err,
        "malformed DeploymentLock skipped; the other locks are reconciled"
    );
    context.metrics.set_malformed(
        &ObjectLabels {
            namespace: key.0.clone(),
            name: key.1.clone(),
        },
        true,
    );
    let reference = ObjectReference {
        api_version: Some(DeploymentLock::api_version(&()).into_owned()),
        kind: Some(DeploymentLock::kind(&()).into_owned()),
        namespace: Some(key.0.clone()),
        name: Some(key.1.clone()),
        uid: object.metadata.uid.clone(),
        resource_version: Some(version.clone()),
        ..Default::default()
    };
    let uid = object.metadata.uid.clone().unwrap_or_default();
    let name = format!(
        "{}.{}.malformed-{}",
        key.1,
        short_id(&uid),
        short_id(&version)
    );
    let text = EventText {
        suffix: String::new(),
        reason: "Malformed",
        event_type: "Warning",
        note: format!(
            "DeploymentLock {} cannot be read at {} and is not reconciled: {}",
            key.1, err.location, err.source
        ),
    };
    let context = context.clone();
    tokio::spawn(async move {
        let result = create_event(&context, &key.0, name, reference, &text).await;
        if let Err(err) = result {
            tracing::warn!(namespace = %key.0, name = %key.1, error = %err, "cannot record the Malformed Event");
        }
    });
}

fn error_policy(lock: Arc<DeploymentLock>, err: &Error, context: Arc<Context>) -> Action {
    context.metrics.reconcile_failed(&err.metric_label());
    let key = format!(
        "{}/{}",
        lock.namespace().unwrap_or_default(),
        lock.name_any()
    );
    let failures = {
        let mut failures = locked(&context.failures);
        let count = failures.entry(key).or_insert(0);
        *count = count.saturating_add(1);
        *count
    };
    // Exponential with jitter, never a hot loop: a conflict that survived a
    // fresh read means the object keeps moving; anything else is the
    // server being away.
    let (first, max) = if err.is_conflict() {
        (StdDuration::from_millis(200), StdDuration::from_secs(5))
    } else {
        (StdDuration::from_millis(500), StdDuration::from_secs(10))
    };
    let delay = first
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(max);
    let delay = leader::jitter(delay);
    if failures <= 3 {
        tracing::warn!(lock = %lock.name_any(), error = %err, retry_in_ms = delay.as_millis(), "reconcile failed, retrying");
    } else {
        tracing::debug!(lock = %lock.name_any(), error = %err, failures, retry_in_ms = delay.as_millis(), "reconcile failed again");
    }
    Action::requeue(delay)
}

/// One reconcile of one lock. On a conflict the lock is read afresh (the
/// cache may be behind) and reconciled once more before backing off.
pub async fn reconcile(lock: Arc<DeploymentLock>, context: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let mut result = reconcile_inner(&lock, &context).await;
    if result.as_ref().is_err_and(Error::is_conflict)
        && let (Some(namespace), Some(name)) = (lock.namespace(), lock.meta().name.clone())
    {
        let api: Api<DeploymentLock> = Api::namespaced(context.client.clone(), &namespace);
        result = match timed(api.get_opt(&name)).await {
            Ok(Some(fresh)) => reconcile_inner(&fresh, &context).await,
            Ok(None) => Ok(Action::await_change()),
            Err(err) => Err(err),
        };
    }
    if result.is_ok() {
        let key = format!(
            "{}/{}",
            lock.namespace().unwrap_or_default(),
            lock.name_any()
        );
        locked(&context.failures).remove(&key);
    }
    context
        .metrics
        .observe_reconcile(started.elapsed().as_secs_f64());
    result
}

/// How an Event create ended.
enum Published {
    /// Created now (true) or already there (false).
    Done(bool),
    /// Refused for good (e.g. the namespace is terminating): skipped.
    Refused,
}

async fn reconcile_inner(lock: &DeploymentLock, context: &Context) -> Result<Action, Error> {
    let namespace = lock.namespace().ok_or(Error::MissingObjectKey)?;
    let name = lock.meta().name.clone().ok_or(Error::MissingObjectKey)?;
    let labels = LockLabels {
        namespace: namespace.clone(),
        environment: lock.spec.environment.clone(),
    };
    if lock.meta().deletion_timestamp.is_some() {
        context.metrics.remove(&labels);
        return Ok(Action::await_change());
    }
    // The server's clock, rounded down: Expired only once it has certainly
    // passed expiresAt, whatever the local clock says.
    let now = context.clock.lower_bound(Instant::now());
    let plan = plan::plan(lock, &name, now, &context.settings, &context.user);
    if let Some(expiry) = plan.advance_clock_to {
        // Takeover is allowed by the policy once the clock Lease reaches
        // expiresAt: it does so before (or with) the Expired mark.
        context
            .clock_lease
            .advance_to(expiry)
            .await
            .map_err(Error::Clock)?;
    }
    match plan.step {
        Step::Clear { spec } => clear(lock, &name, *spec, context, &labels).await,
        Step::Keep {
            status,
            mut events,
            announced,
            wake_at,
        } => {
            // Entries the lock dropped before they were announced (no
            // replica led meanwhile), when this replica saw them: first,
            // they are older than any the lock holds.
            let missed = context.journal.missed(lock, announced);
            events.splice(0..0, missed.iter().map(Announcement::Entry));
            context
                .metrics
                .set_state(&labels, plan.state, plan.held_seconds);
            let api: Api<DeploymentLock> = Api::namespaced(context.client.clone(), &namespace);
            let current = match status {
                Some(status) => write_status(lock, &api, status).await?,
                None => lock.clone(),
            };
            let announcing = Announcing {
                lock,
                current: &current,
                api: &api,
                context,
                labels: &labels,
            };
            announcing.run(&events, announced).await?;
            Ok(wake_at.map_or_else(Action::await_change, |at| wake_action(context, at)))
        }
    }
}

/// Clears a holding that stayed expired for the whole retention, through
/// the store's conditional write under the read resourceVersion.
async fn clear(
    lock: &DeploymentLock,
    name: &str,
    spec: DeploymentLockSpec,
    context: &Context,
    labels: &LockLabels,
) -> Result<Action, Error> {
    let namespace = labels.namespace.as_str();
    // The Expired Event should exist before the holding disappears.
    if let Some(holder) = &lock.spec.holder
        && let Err(err) = announce(lock, &Announcement::Expiry(holder), context, labels).await
    {
        tracing::warn!(namespace, environment = %lock.spec.environment, error = %err, "cannot record the Expired Event before clearing");
    }
    let environment: Environment = name.parse()?;
    let store = LockStore::new(context.client.clone(), namespace);
    store
        .write(&environment, Some(lock), spec)
        .await
        .map_err(Error::Kube)?;
    let owner = lock.spec.holder.as_ref().map_or("-", |h| h.owner.as_str());
    tracing::info!(namespace, environment = %lock.spec.environment, owner, "cleared expired lock");
    // The write triggers the next reconcile.
    Ok(Action::await_change())
}

/// Writes the status (state and condition) before any Event: the state must
/// not wait for Events. Returns the lock as written.
async fn write_status(
    lock: &DeploymentLock,
    api: &Api<DeploymentLock>,
    desired: DeploymentLockStatus,
) -> Result<DeploymentLock, Error> {
    let stored_state = lock.status.as_ref().and_then(|status| status.state);
    if stored_state != desired.state {
        let holder = lock.spec.holder.as_ref();
        tracing::info!(
            namespace = lock.namespace().unwrap_or_default(),
            environment = %lock.spec.environment,
            state = %desired.state.unwrap_or_default(),
            owner = holder.map(|h| h.owner.as_str()).unwrap_or("-"),
            reason = holder.map(|h| h.reason.as_str()).unwrap_or("-"),
            "lock state changed"
        );
    }
    let mut updated = lock.clone();
    updated.status = Some(desired);
    // Carries the read resourceVersion: refused if the lock moved on.
    let name = lock.name_any();
    timed(api.replace_status(&name, &PostParams::default(), &updated)).await
}

/// What recording a plan's Events needs.
struct Announcing<'a> {
    lock: &'a DeploymentLock,
    /// The lock as last written (its status records the sequence announced).
    current: &'a DeploymentLock,
    api: &'a Api<DeploymentLock>,
    context: &'a Context,
    labels: &'a LockLabels,
}

impl Announcing<'_> {
    /// Records the Events in order, then the last history sequence
    /// announced. A transient failure stops the Events there (after
    /// recording what was announced) and is retried; a refusal is skipped.
    async fn run(&self, events: &[Announcement<'_>], announced: i64) -> Result<(), Error> {
        let (lock, context, labels) = (self.lock, self.context, self.labels);
        let mut last_sequence = announced;
        let mut failure = None;
        for event in events {
            match (announce(lock, event, context, labels).await, event) {
                (Ok(()), Announcement::Entry(entry)) => {
                    last_sequence = last_sequence.max(entry.sequence)
                }
                (Ok(()), Announcement::Expiry(_)) => {}
                (Err(err), _) => {
                    failure = Some(err);
                    break;
                }
            }
        }
        if last_sequence > announced {
            let mut recorded = self.current.clone();
            let mut status = recorded.status.clone().unwrap_or_default();
            status.last_event_sequence = Some(last_sequence);
            recorded.status = Some(status);
            let name = lock.name_any();
            timed(
                self.api
                    .replace_status(&name, &PostParams::default(), &recorded),
            )
            .await?;
        }
        failure.map_or(Ok(()), Err)
    }
}

/// Wakes at the first instant the server's clock has certainly passed `at`
/// (looking again meanwhile if the measurement of its clock is still coarse).
fn wake_action(context: &Context, at: DateTime<Utc>) -> Action {
    let now = Instant::now();
    Action::requeue(
        context
            .clock
            .wake_for(at, now, StdDuration::from_millis(100))
            .saturating_duration_since(now)
            + StdDuration::from_millis(1),
    )
}

fn reference(lock: &DeploymentLock) -> ObjectReference {
    lock.object_ref(&())
}

/// Publishes one Event, once: a history entry's (its name is unique per
/// entry), or the expiry of the current holding (per process not even tried
/// twice; across processes its name makes it unique). A refused Event is
/// logged and skipped; only a transient failure is an error (retried).
async fn announce(
    lock: &DeploymentLock,
    event: &Announcement<'_>,
    context: &Context,
    labels: &LockLabels,
) -> Result<(), Error> {
    let uid = lock.meta().uid.clone().unwrap_or_default();
    let expired = match event {
        Announcement::Expiry(holder) => Some(holder.lock_id.as_str()),
        Announcement::Entry(_) => None,
    };
    if expired.is_some() && locked(&context.expiries).get(&uid).map(String::as_str) == expired {
        return Ok(());
    }
    let text = event.text();
    let published = publish(lock, context, &text).await?;
    if let Some(lock_id) = expired {
        locked(&context.expiries).insert(uid, lock_id.to_string());
    }
    let Published::Done(true) = published else {
        return Ok(());
    };
    let (owner, reason, by, expires_at) = match event {
        Announcement::Entry(entry) => {
            match entry.action {
                HistoryAction::ForceAcquired => context.metrics.force_acquired(labels),
                HistoryAction::ForceReleased => context.metrics.force_released(labels),
                _ => {}
            }
            (&entry.owner, &entry.reason, Some(entry.by.as_str()), None)
        }
        Announcement::Expiry(holder) => {
            context.metrics.expired(labels);
            (&holder.owner, &holder.reason, None, Some(holder.expires_at))
        }
    };
    tracing::info!(
        namespace = %labels.namespace,
        environment = %labels.environment,
        action = text.reason,
        %owner,
        by,
        %reason,
        expires_at = expires_at.map(tracing::field::display),
        "lock transition"
    );
    Ok(())
}

/// Creates an Event about `lock` with a name derived from its UID and `suffix`.
async fn publish(
    lock: &DeploymentLock,
    context: &Context,
    text: &EventText,
) -> Result<Published, Error> {
    let namespace = lock.namespace().ok_or(Error::MissingObjectKey)?;
    let uid = lock.meta().uid.clone().unwrap_or_default();
    let name = format!("{}.{}.{}", lock.name_any(), short_id(&uid), text.suffix);
    match create_event(context, &namespace, name, reference(lock), text).await {
        Ok(created) => Ok(Published::Done(created)),
        Err(Error::Kube(kube::Error::Api(status)))
            if (400..500).contains(&status.code) && status.code != 429 =>
        {
            tracing::warn!(
                namespace,
                lock = %lock.name_any(),
                reason = text.reason,
                code = status.code,
                message = %status.message,
                "Event refused; skipped"
            );
            Ok(Published::Refused)
        }
        Err(err) => Err(err),
    }
}

/// Creates one Event; false if it already existed (another replica or an
/// earlier run created it).
async fn create_event(
    context: &Context,
    namespace: &str,
    name: String,
    regarding: ObjectReference,
    text: &EventText,
) -> Result<bool, Error> {
    let reporter = (
        &context.client,
        &context.clock,
        context.settings.instance.as_str(),
    );
    post_event(reporter, namespace, name, regarding, text).await
}

/// The client, clock and instance name an Event is reported with.
type Reporter<'a> = (&'a Client, &'a ServerClock, &'a str);

/// Creates one Event as the controller; false if it already existed. The
/// one place an Event object is built (locks, freeze windows, notifications).
async fn post_event(
    (client, clock, instance): Reporter<'_>,
    namespace: &str,
    name: String,
    regarding: ObjectReference,
    text: &EventText,
) -> Result<bool, Error> {
    let event = Event {
        metadata: kube::core::ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        event_time: Some(MicroTime(to_timestamp_micros(
            clock.lower_bound(Instant::now()),
        ))),
        action: Some(text.reason.to_string()),
        reason: Some(text.reason.to_string()),
        type_: Some(text.event_type.to_string()),
        note: Some(truncate(&text.note, 1024)),
        regarding: Some(regarding),
        reporting_controller: Some(CONTROLLER_NAME.to_string()),
        reporting_instance: Some(truncate(instance, 128)),
        ..Default::default()
    };
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    match timed(events.create(&PostParams::default(), &event)).await {
        Ok(_) => Ok(true),
        Err(Error::Kube(kube::Error::Api(status))) if status.code == 409 => Ok(false),
        Err(err) => Err(err),
    }
}

fn to_timestamp_micros(time: DateTime<Utc>) -> Timestamp {
    clock::micro_time(time).0
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}
