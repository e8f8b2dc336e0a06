//! Delivery of team notifications by the leader (see [`crate::notify`]).
//!
//! [`run`] watches NotificationSubscriptions and keeps one worker per
//! subscription. The DeploymentLocks come from the leader's one lock watch
//! ([`super::lockwatch`]): every worker reads its cache and is told which
//! lock changed, so N subscriptions cost no further watch, and a change
//! costs each worker the plan of that one lock (no API request unless a
//! message is due or a cursor moves). A worker plans what is due for each lock it covers
//! ([`plan::plan`]: history entries after its cursor, observed expiries,
//! queued waiters, reminders), sends each message with capped exponential backoff
//! and writes the cursor to the subscription's status with a conditional
//! replace (resourceVersion), at most once per [`STATUS_WRITE_INTERVAL`] (a
//! busy lock costs the API server one status write a second per
//! subscription, not one per transition). After a restart, a hand-over or
//! an API server restart a new worker reads the cursor back and resumes
//! after it: a message is repeated only when a crash or the end of a term
//! fell between its delivery and the cursor write (at most the last
//! interval's messages), and then carries the same key. A replica whose
//! term ended writes nothing more: the next leader may already be writing.
//!
//! Workers are separate tasks with bounded requests: a slow or dead
//! receiver delays only its own subscription, never a lock operation (which
//! never waits for the controller at all).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use crate::conditions;
use crate::crd::DeploymentLock;
use crate::notify::payload::Message;
use crate::notify::send::{ConfigError, Receiver, SendError};
use crate::notify::{
    Coverage, DeliveryCursor, DeliveryResult, LastDelivery, NotificationSubscription,
    NotificationSubscriptionStatus, READY_CONDITION, plan,
};

use super::lockwatch::{LockChange, LockKey, LockView};
use super::plan::EventText;
use super::{REQUEST_TIMEOUT, WATCH_TIMEOUT_SECONDS, leader};

/// How often a subscription whose Secret is missing looks again (besides
/// on every change of the subscription); also how long a receiver built
/// from the Secrets is used before they are read again (a failed delivery
/// reads them again at once), so that a busy lock costs no Secret read per
/// transition.
const CONFIG_RETRY: StdDuration = StdDuration::from_secs(10);
/// First wait after a failed attempt; it doubles up to the subscription's cap.
const FIRST_BACKOFF: StdDuration = StdDuration::from_secs(1);
/// The least time between two status writes of a subscription: the cursor
/// moves in memory with every message and reaches the API server at most
/// this late (a crash in between repeats those messages, same keys).
const STATUS_WRITE_INTERVAL: StdDuration = StdDuration::from_secs(1);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub provider: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
}

/// `deploylock_notifications_total{provider,result}` (result: delivered,
/// retry, failed, gap) and `deploylock_notification_delivery_seconds`
/// (transition on the API server's clock to the receiver's 2xx).
#[derive(Clone)]
pub struct NotifyMetrics {
    total: Family<ResultLabels, Counter>,
    latency: Family<ProviderLabels, Histogram, fn() -> Histogram>,
}

fn latency_histogram() -> Histogram {
    Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0])
}

impl NotifyMetrics {
    /// Registers the notification metrics in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = NotifyMetrics {
            total: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
        };
        registry.register(
            "notifications",
            "Notification attempts by provider and result (delivered, retry, failed, gap)",
            metrics.total.clone(),
        );
        registry.register(
            "notification_delivery_seconds",
            "From a lock transition (API server clock) to its notification's delivery",
            metrics.latency.clone(),
        );
        metrics
    }

    fn count(&self, provider: &str, result: &str) {
        self.total
            .get_or_create(&ResultLabels {
                provider: provider.to_string(),
                result: result.to_string(),
            })
            .inc();
    }
}

/// What the subscription watch knows, shared with the workers.
#[derive(Default)]
struct Known {
    subscriptions: HashMap<String, NotificationSubscription>,
    subscriptions_listed: bool,
}

/// What a delivery task needs.
#[derive(Clone)]
pub struct Notifier {
    /// The leader's client, scope, clock and identity.
    pub leader: super::LeaderContext,
    pub metrics: NotifyMetrics,
}

struct Shared {
    notifier: Notifier,
    /// The leader's lock cache and its changes.
    locks: LockView,
    known: Mutex<Known>,
    /// Bumped on a subscription's (spec) change.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn bump(&self) {
        self.changed.send_modify(|generation| *generation += 1);
    }

    fn with<T>(&self, read: impl FnOnce(&mut Known) -> T) -> T {
        read(&mut super::locked(&self.known))
    }
}

/// Delivers notifications until `term` ends (the end of this leadership
/// term or a stop). Never returns early: API errors are retried.
pub async fn run(notifier: Notifier, locks: LockView, term: watch::Receiver<bool>) {
    let (changed, _) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        notifier,
        locks,
        known: Mutex::new(Known::default()),
        changed,
    });
    let subscriptions = tokio::spawn(watch_subscriptions(shared.clone()));
    let mut stop = term.clone();
    // Workers start once the lock cache holds the first list: a cursor is
    // never judged against a partial one.
    tokio::select! {
        _ = shared.locks.listed() => {}
        _ = stop.wait_for(|ended| *ended) => {
            subscriptions.abort();
            return;
        }
    }
    tracing::debug!("notifications: lock cache listed; serving subscriptions");
    let mut workers: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut changes = shared.changed.subscribe();
    loop {
        let wanted: BTreeMap<String, (String, String)> = shared.with(|known| {
            if !known.subscriptions_listed {
                return BTreeMap::new();
            }
            known
                .subscriptions
                .iter()
                .map(|(uid, sub)| {
                    (
                        uid.clone(),
                        (sub.namespace().unwrap_or_default(), sub.name_any()),
                    )
                })
                .collect()
        });
        workers.retain(|uid, worker| {
            let keep = wanted.contains_key(uid) && !worker.is_finished();
            if !keep {
                worker.abort();
            }
            keep
        });
        for (uid, (namespace, name)) in wanted {
            workers.entry(uid.clone()).or_insert_with(|| {
                tokio::spawn(worker(shared.clone(), uid, namespace, name, term.clone()))
            });
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            _ = stop.wait_for(|ended| *ended) => break,
        }
    }
    for worker in workers.values() {
        worker.abort();
    }
    subscriptions.abort();
}

fn watch_config() -> watcher::Config {
    watcher::Config::default()
        .any_semantic()
        .timeout(WATCH_TIMEOUT_SECONDS)
}

async fn watch_subscriptions(shared: Arc<Shared>) {
    let client = shared.notifier.leader.client.clone();
    let api: Api<NotificationSubscription> =
        super::scoped_api(client, shared.notifier.leader.namespace.as_deref());
    let mut events = watcher(api, watch_config()).boxed();
    let mut fresh = HashMap::new();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => fresh.clear(),
            Ok(watcher::Event::InitApply(sub)) => {
                if let Some(uid) = sub.uid() {
                    fresh.insert(uid, sub);
                }
            }
            Ok(watcher::Event::InitDone) => {
                let subscriptions = std::mem::take(&mut fresh);
                shared.with(|known| {
                    known.subscriptions = subscriptions;
                    known.subscriptions_listed = true;
                });
                shared.bump();
            }
            Ok(watcher::Event::Apply(sub)) => {
                if let Some(uid) = sub.uid() {
                    // Workers keep their own status: a status write (one
                    // per message) wakes nobody, a spec change wakes all.
                    let generation = sub.metadata.generation;
                    let previous = shared.with(|known| known.subscriptions.insert(uid, sub));
                    if previous.is_none_or(|old| old.metadata.generation != generation) {
                        shared.bump();
                    }
                }
            }
            Ok(watcher::Event::Delete(sub)) => {
                if let Some(uid) = sub.uid() {
                    shared.with(|known| known.subscriptions.remove(&uid));
                    shared.bump();
                }
            }
            Err(err) => {
                // Also when the CRD is not installed: notifications are
                // optional, locks work without them.
                tracing::warn!(error = %err, "notifications: watching NotificationSubscriptions failed; retrying");
                tokio::time::sleep(leader::jitter(StdDuration::from_secs(5))).await;
            }
        }
    }
}

/// Runs `request` with the controller's request time limit.
async fn timed<T>(request: impl Future<Output = Result<T, kube::Error>>) -> Result<T, kube::Error> {
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .unwrap_or_else(|_| {
            Err(kube::Error::Service(
                format!("request timed out after {REQUEST_TIMEOUT:?}").into(),
            ))
        })
}

/// Reads a subscription's Secrets and builds its receiver.
pub async fn load_receiver(
    client: &Client,
    sub: &NotificationSubscription,
) -> Result<Receiver, ConfigError> {
    let namespace = sub.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let read = |name: String| {
        let secrets = secrets.clone();
        async move {
            match timed(secrets.get_opt(&name)).await {
                Ok(Some(secret)) => Ok(secret),
                Ok(None) => Err(ConfigError::SecretNotFound(name)),
                Err(source) => Err(ConfigError::SecretUnreadable { name, source }),
            }
        }
    };
    let provider = &sub.spec.provider;
    let secret = read(provider.secret_ref.name.clone()).await?;
    let ca = match &provider.ca_secret_ref {
        Some(reference) => Some(read(reference.name.clone()).await?),
        None => None,
    };
    Receiver::from_secrets(provider, &secret, ca.as_ref())
}

enum Delivery {
    Delivered,
    GaveUp,
    Stopped,
}

/// Adds `first` and every lock change of `namespace` already waiting to
/// `due`, so that a burst is planned once; false when the feed closed.
fn take_lock_changes(
    namespace: &str,
    first: Result<LockChange, broadcast::error::RecvError>,
    lock_changes: &mut broadcast::Receiver<LockChange>,
    due: &mut Due,
) -> bool {
    let mut change = first;
    loop {
        match change {
            Ok(LockChange::Changed(key)) => {
                if key.namespace == namespace {
                    due.add(key);
                }
            }
            Ok(LockChange::Listed) | Err(broadcast::error::RecvError::Lagged(_)) => {
                *due = Due::All;
            }
            Err(broadcast::error::RecvError::Closed) => return false,
        }
        change = match lock_changes.try_recv() {
            Ok(next) => Ok(next),
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                Err(broadcast::error::RecvError::Lagged(n))
            }
            Err(_) => return true,
        };
    }
}

/// Which locks a worker looks at next.
#[derive(Debug, Default)]
enum Due {
    /// Every lock it covers: at the start, after a relist, a missed change,
    /// a subscription change or a timer (a reminder).
    #[default]
    All,
    /// Only these locks changed.
    Changed(HashSet<LockKey>),
}

impl Due {
    fn add(&mut self, key: LockKey) {
        match self {
            Due::All => {}
            Due::Changed(keys) => {
                keys.insert(key);
            }
        }
    }
}

/// A receiver built from the Secrets, and for which generation and when.
struct CachedReceiver {
    receiver: Receiver,
    generation: Option<i64>,
    loaded: Instant,
}

/// One subscription's delivery loop.
struct Worker {
    shared: Arc<Shared>,
    api: Api<NotificationSubscription>,
    uid: String,
    name: String,
    namespace: String,
    /// The object as last written or read (its resourceVersion makes the
    /// next status write conditional).
    object: NotificationSubscription,
    status: NotificationSubscriptionStatus,
    term: watch::Receiver<bool>,
    receiver: Option<CachedReceiver>,
    /// Per lock (name) of this namespace, when something becomes due by
    /// itself (a reminder), on the API server's clock.
    timers: HashMap<String, DateTime<Utc>>,
    /// The status in memory is ahead of the one written.
    unwritten: bool,
    /// When the status was last written (None: not yet by this worker).
    written_at: Option<Instant>,
}

async fn worker(
    shared: Arc<Shared>,
    uid: String,
    namespace: String,
    name: String,
    term: watch::Receiver<bool>,
) {
    let api: Api<NotificationSubscription> =
        Api::namespaced(shared.notifier.leader.client.clone(), &namespace);
    // The cursors from the API server, not from a cache that may lag.
    let object = loop {
        match timed(api.get_opt(&name)).await {
            Ok(Some(object)) if object.uid().as_deref() == Some(uid.as_str()) => break object,
            Ok(_) => return,
            Err(err) => {
                tracing::warn!(subscription = %name, %namespace, error = %err, "cannot read subscription; retrying");
                let mut term = term.clone();
                tokio::select! {
                    _ = tokio::time::sleep(leader::jitter(StdDuration::from_secs(2))) => {}
                    _ = term.wait_for(|ended| *ended) => return,
                }
            }
        }
    };
    let status = object.status.clone().unwrap_or_default();
    tracing::debug!(subscription = %name, %namespace, "notifications: delivering for a subscription");
    let mut worker = Worker {
        shared,
        api,
        uid,
        name,
        namespace,
        object,
        status,
        term,
        receiver: None,
        timers: HashMap::new(),
        unwritten: false,
        written_at: None,
    };
    worker.run().await;
}

impl Worker {
    fn provider(&self) -> &'static str {
        self.object.spec.provider.provider_type.as_str()
    }

    fn now(&self) -> DateTime<Utc> {
        self.shared
            .notifier
            .leader
            .clock
            .lower_bound(Instant::now())
    }

    async fn run(&mut self) {
        let mut changes = self.shared.changed.subscribe();
        // Subscribed before the first read of the cache: no change is missed.
        let mut lock_changes = self.shared.locks.subscribe();
        let mut due = Due::All;
        loop {
            let Some(sub) = self
                .shared
                .with(|known| known.subscriptions.get(&self.uid).cloned())
            else {
                return;
            };
            self.object.spec = sub.spec.clone();
            self.object.metadata.generation = sub.metadata.generation;
            changes.borrow_and_update();
            let wake = match self.configure(&sub).await {
                Err(err) => {
                    tracing::warn!(subscription = %self.name, namespace = %self.namespace, error = %err, "notifications: subscription not ready");
                    self.set_ready(false, err.reason(), &err.to_string()).await;
                    due = Due::All;
                    Some(Instant::now() + CONFIG_RETRY)
                }
                Ok((receiver, coverage)) => {
                    if !self.is_ready() {
                        self.set_ready(true, "Configured", "the receiver's Secrets are valid")
                            .await;
                    }
                    match self
                        .deliver_due(
                            &receiver,
                            &coverage,
                            std::mem::replace(&mut due, Due::Changed(HashSet::new())),
                        )
                        .await
                    {
                        Some(wake) => wake,
                        None => return,
                    }
                }
            };
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() { return }
                    due = Due::All;
                }
                change = lock_changes.recv() => {
                    if !take_lock_changes(&self.namespace, change, &mut lock_changes, &mut due) {
                        return;
                    }
                }
                _ = sleep => due = Due::All,
                _ = self.term.wait_for(|ended| *ended) => break,
            }
        }
    }

    /// The locks covered, and the receiver, built from the Secrets when
    /// there is none yet, the subscription changed, or it is older than
    /// [`CONFIG_RETRY`].
    async fn configure(
        &mut self,
        sub: &NotificationSubscription,
    ) -> Result<(Receiver, Coverage), ConfigError> {
        let coverage = sub.spec.coverage()?;
        if let Some(cached) = &self.receiver
            && cached.generation == sub.metadata.generation
            && cached.loaded.elapsed() < CONFIG_RETRY
        {
            return Ok((cached.receiver.clone(), coverage));
        }
        self.receiver = None;
        let receiver = load_receiver(&self.shared.notifier.leader.client, sub).await?;
        self.receiver = Some(CachedReceiver {
            receiver: receiver.clone(),
            generation: sub.metadata.generation,
            loaded: Instant::now(),
        });
        Ok((receiver, coverage))
    }

    fn is_ready(&self) -> bool {
        conditions::is_true(&self.status.conditions, READY_CONDITION)
            && self.status.observed_generation == self.object.metadata.generation
    }

    /// Delivers everything due for the locks in `due`; `Some(next wake)`
    /// (None inside: only on a change), or `None` when the term ended.
    async fn deliver_due(
        &mut self,
        receiver: &Receiver,
        coverage: &Coverage,
        due: Due,
    ) -> Option<Option<Instant>> {
        let since = self.created_at();
        let (locks, mut dirty) = self.locks_due(coverage, &due);
        self.reset_timers(&due);
        for lock in locks {
            dirty = self
                .deliver_lock(receiver, lock.as_ref(), since, dirty)
                .await?;
        }
        self.unwritten |= dirty;
        if self.unwritten && self.status_write_due().is_none() {
            self.write_status().await;
        }
        Some(self.next_wake())
    }

    /// When the unwritten status may be written, if not now.
    fn status_write_due(&self) -> Option<Instant> {
        let at = self.written_at? + STATUS_WRITE_INTERVAL;
        (at > Instant::now()).then_some(at)
    }

    /// When the subscription was created (a lock's first cursor starts
    /// there); the earliest time when it is unknown.
    fn created_at(&self) -> DateTime<Utc> {
        self.object
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(|time| DateTime::<Utc>::from_timestamp_micros(time.0.as_microsecond()))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// The covered locks of the namespace that `due` names, by environment,
    /// after dropping the cursors of deleted (or replaced) locks; and
    /// whether a cursor was dropped (the status is then to be written).
    fn locks_due(&mut self, coverage: &Coverage, due: &Due) -> (Vec<Arc<DeploymentLock>>, bool) {
        let store = &self.shared.locks.store;
        let in_namespace =
            |lock: &DeploymentLock| lock.namespace().as_deref() == Some(self.namespace.as_str());
        let mut dirty = false;
        let mut locks: Vec<Arc<DeploymentLock>> = match due {
            Due::All => {
                // Cursors of deleted locks go: a lock created again is a
                // new UID.
                let live: HashSet<String> = store
                    .state_filter(|lock| in_namespace(lock))
                    .iter()
                    .filter_map(|lock| lock.uid())
                    .collect();
                let before = self.status.cursors.len();
                self.status
                    .cursors
                    .retain(|cursor| live.contains(&cursor.lock_uid));
                dirty |= before != self.status.cursors.len();
                store.state_filter(|lock| in_namespace(lock) && coverage.covers(lock))
            }
            Due::Changed(keys) => {
                let mut locks = Vec::with_capacity(keys.len());
                for key in keys {
                    let current = store.get(&key.object_ref());
                    // Deleted (or replaced by a lock of the same name): its
                    // cursor goes.
                    let current_uid = current.as_ref().and_then(|lock| lock.uid());
                    let before = self.status.cursors.len();
                    self.status.cursors.retain(|cursor| {
                        cursor.environment != key.name
                            || Some(&cursor.lock_uid) == current_uid.as_ref()
                    });
                    dirty |= before != self.status.cursors.len();
                    if let Some(lock) = current
                        && in_namespace(&lock)
                        && coverage.covers(&lock)
                    {
                        locks.push(lock);
                    }
                }
                locks
            }
        };
        locks.sort_by(|a, b| a.spec.environment.cmp(&b.spec.environment));
        (locks, dirty)
    }

    /// The locks planned now get their next timer afresh.
    fn reset_timers(&mut self, due: &Due) {
        match due {
            Due::All => self.timers.clear(),
            Due::Changed(keys) => {
                for key in keys {
                    self.timers.remove(&key.name);
                }
            }
        }
    }

    /// Plans one lock and sends its messages, writing the cursor after each
    /// one. Takes and returns whether a cursor moved without being written;
    /// `None` when the worker was stopped.
    async fn deliver_lock(
        &mut self,
        receiver: &Receiver,
        lock: &DeploymentLock,
        since: DateTime<Utc>,
        mut dirty: bool,
    ) -> Option<bool> {
        let Some(uid) = lock.uid() else {
            return Some(dirty);
        };
        let known = self
            .status
            .cursors
            .iter()
            .find(|cursor| cursor.lock_uid == uid)
            .cloned();
        let cursor = match known {
            Some(cursor) => cursor,
            None => {
                let cursor = plan::initial_cursor(lock, &uid, since);
                self.set_cursor(cursor.clone());
                dirty = true;
                cursor
            }
        };
        // Entries after the cursor that the lock dropped but this replica
        // saw (see [`super::journal`]).
        let filled = self.shared.locks.journal().fill_in(lock, cursor.sequence);
        let lock = filled.as_ref().unwrap_or(lock);
        let plan = plan::plan(&self.object.spec, lock, &uid, &cursor, self.now());
        for &(first, last) in &plan.gaps {
            self.report_gap(lock, &uid, first, last).await;
        }
        for step in plan.steps {
            if let Some(message) = &step.message {
                match self.deliver(receiver, message).await {
                    Delivery::Stopped => return None,
                    Delivery::Delivered | Delivery::GaveUp => {}
                }
                self.set_cursor(step.cursor);
                dirty = true;
                if self.status_write_due().is_none() {
                    // Still unwritten if the write fails: retried an
                    // interval later.
                    self.unwritten = true;
                    self.write_status().await;
                    dirty = self.unwritten;
                }
            } else {
                self.set_cursor(step.cursor);
                dirty = true;
            }
        }
        if let Some(due) = plan.next_due {
            self.timers.insert(lock.name_any(), due);
        }
        Some(dirty)
    }

    /// History entries `first` to `last` left the lock before they were
    /// delivered: counted, logged and recorded as an Event.
    async fn report_gap(&mut self, lock: &DeploymentLock, uid: &str, first: i64, last: i64) {
        self.shared.notifier.metrics.count(self.provider(), "gap");
        let note = format!(
            "history entries {first} to {last} of {} were dropped from the lock (it keeps {}) before they could be delivered, and no running controller replica saw them (every replica was down, or its watch had to list again)",
            lock.spec.environment,
            crate::crd::MAX_HISTORY_ENTRIES
        );
        tracing::warn!(subscription = %self.name, "{note}");
        self.event("NotificationsLost", &format!("{uid}-gap-{first}"), note)
            .await;
    }

    /// The earliest reminder timer, as a wake-up instant.
    fn next_wake(&self) -> Option<Instant> {
        let timer = self.timers.values().min().map(|due| {
            self.shared.notifier.leader.clock.wake_for(
                *due,
                Instant::now(),
                StdDuration::from_millis(250),
            )
        });
        let write = self.status_write_due().filter(|_| self.unwritten);
        timer.into_iter().chain(write).min()
    }

    fn set_cursor(&mut self, cursor: DeliveryCursor) {
        match self
            .status
            .cursors
            .iter_mut()
            .find(|existing| existing.lock_uid == cursor.lock_uid)
        {
            Some(existing) => *existing = cursor,
            None => self.status.cursors.push(cursor),
        }
    }

    /// Sends one message, retrying with capped exponential backoff for the
    /// subscription's retry period (reading the Secrets again each time, so
    /// a fixed Secret takes effect at once).
    async fn deliver(&mut self, first_receiver: &Receiver, message: &Message) -> Delivery {
        let started = Instant::now();
        let retry_for = StdDuration::from_secs(
            u64::try_from(self.object.spec.retry_for_seconds()).unwrap_or(3600),
        );
        let cap = StdDuration::from_secs(
            u64::try_from(self.object.spec.max_backoff_seconds()).unwrap_or(60),
        );
        let mut backoff = FIRST_BACKOFF.min(cap);
        let mut receiver = first_receiver.clone();
        let mut reported_retrying = false;
        loop {
            let result = tokio::select! {
                result = receiver.send(message) => result,
                _ = self.term.wait_for(|ended| *ended) => return Delivery::Stopped,
            };
            let provider = self.provider();
            match result {
                Ok(_) => {
                    let metrics = &self.shared.notifier.metrics;
                    metrics.count(provider, "delivered");
                    if !matches!(
                        message.occurrence,
                        crate::notify::payload::Occurrence::Reminder(_)
                    ) {
                        let seconds = (self.now() - message.at).num_milliseconds() as f64 / 1000.0;
                        metrics
                            .latency
                            .get_or_create(&ProviderLabels {
                                provider: provider.to_string(),
                            })
                            .observe(seconds.max(0.0));
                    }
                    tracing::info!(subscription = %self.name, key = %message.key, "notification delivered");
                    self.status.last_delivery = Some(LastDelivery {
                        at: Utc::now(),
                        key: message.key.clone(),
                        result: DeliveryResult::Delivered,
                        error: None,
                    });
                    return Delivery::Delivered;
                }
                Err(err) if err.is_permanent() || started.elapsed() >= retry_for => {
                    self.give_up(message, &err).await;
                    return Delivery::GaveUp;
                }
                Err(err) => {
                    self.shared.notifier.metrics.count(provider, "retry");
                    tracing::warn!(subscription = %self.name, key = %message.key, error = %err, retry_in = ?backoff, "notification not delivered; retrying");
                    if !reported_retrying {
                        reported_retrying = true;
                        self.status.last_delivery = Some(LastDelivery {
                            at: Utc::now(),
                            key: message.key.clone(),
                            result: DeliveryResult::Retrying,
                            error: Some(err.to_string()),
                        });
                        self.write_status().await;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(leader::jitter(backoff)) => {}
                _ = self.term.wait_for(|ended| *ended) => return Delivery::Stopped,
            }
            backoff = (backoff * 2).min(cap);
            if let Some(sub) = self
                .shared
                .with(|known| known.subscriptions.get(&self.uid).cloned())
                && let Ok(fresh) = load_receiver(&self.shared.notifier.leader.client, &sub).await
            {
                receiver = fresh;
            }
        }
    }

    async fn give_up(&mut self, message: &Message, err: &SendError) {
        self.shared
            .notifier
            .metrics
            .count(self.provider(), "failed");
        let note = format!(
            "notification {} ({} of {}) not delivered, given up: {err}",
            message.key,
            message.occurrence.name(),
            message.environment
        );
        tracing::error!(subscription = %self.name, "{note}");
        self.status.last_delivery = Some(LastDelivery {
            at: Utc::now(),
            key: message.key.clone(),
            result: DeliveryResult::Failed,
            error: Some(err.to_string()),
        });
        let key = message.key.clone();
        self.event("NotificationFailed", &key, note).await;
    }

    async fn set_ready(&mut self, ready: bool, reason: &str, message: &str) {
        let message: String = message.chars().take(1024).collect();
        let observation = conditions::Observation {
            type_: READY_CONDITION,
            status: ready,
            reason,
            message: &message,
        };
        let generation = self.object.metadata.generation;
        if observation.is_recorded_in(&self.status.conditions, generation)
            && self.status.observed_generation == generation
        {
            return;
        }
        let now = self.now();
        observation.record(&mut self.status.conditions, generation, now);
        self.status.observed_generation = self.object.metadata.generation;
        self.write_status().await;
    }

    /// Writes the status conditionally on the resourceVersion last seen; on
    /// a conflict, reads the object again and writes once more, keeping the
    /// highest delivered sequence of each cursor (a cursor never goes back).
    async fn write_status(&mut self) {
        // Also on failure: the next attempt comes an interval later.
        self.written_at = Some(Instant::now());
        for _ in 0..5 {
            let mut object = self.object.clone();
            object.status = Some(self.status.clone());
            object.metadata.managed_fields = None;
            match timed(
                self.api
                    .replace_status(&self.name, &PostParams::default(), &object),
            )
            .await
            {
                Ok(written) => {
                    self.object.metadata = written.metadata;
                    self.unwritten = false;
                    return;
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    match timed(self.api.get_opt(&self.name)).await {
                        Ok(Some(fresh)) if fresh.uid().as_deref() == Some(self.uid.as_str()) => {
                            for theirs in fresh.status.iter().flat_map(|s| s.cursors.iter()) {
                                if let Some(ours) = self
                                    .status
                                    .cursors
                                    .iter_mut()
                                    .find(|c| c.lock_uid == theirs.lock_uid)
                                    && theirs.sequence > ours.sequence
                                {
                                    ours.sequence = theirs.sequence;
                                }
                            }
                            self.object.metadata = fresh.metadata;
                            self.object.spec = fresh.spec;
                        }
                        Ok(_) => return,
                        Err(err) => {
                            tracing::warn!(error = %err, "cannot re-read subscription");
                            return;
                        }
                    }
                }
                Err(err) => {
                    // The cursor stays in memory and is written with the
                    // next delivery; a crash meanwhile repeats messages
                    // (same keys), never loses them.
                    tracing::warn!(subscription = %self.name, error = %err, "cannot write subscription status");
                    return;
                }
            }
        }
    }

    async fn event(&self, reason: &'static str, key: &str, note: String) {
        let regarding = ObjectReference {
            api_version: Some(NotificationSubscription::api_version(&()).into_owned()),
            kind: Some(NotificationSubscription::kind(&()).into_owned()),
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            uid: Some(self.uid.clone()),
            ..Default::default()
        };
        // Deterministic names: a repeated give-up after a restart is one Event.
        let mut name: String = format!("{}.{}", self.name, key.to_ascii_lowercase())
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .take(253)
            .collect();
        while name.ends_with(['-', '.']) {
            name.pop();
        }
        let text = EventText {
            suffix: String::new(),
            reason,
            event_type: "Warning",
            note,
        };
        let reporter = self.shared.notifier.leader.reporter();
        if let Err(err) = super::post_event(reporter, &self.namespace, name, regarding, &text).await
        {
            tracing::warn!(error = %err, "cannot record a notification Event");
        }
    }
}
