//! Freeze windows, the controller's part (the leader only): at each opening
//! of a `FreezeWindow`, take its environments' locks as the window identity
//! ([`WINDOW_HOLDER`], impersonated), holding type `scheduled`, until the
//! opening's end, by the pure decisions of [`crate::windows::plan`].
//!
//! The holdings expire at the opening's end by themselves, so a window never
//! lasts past its end, even when no controller runs then. The status records
//! which opening was handled, so a restarted controller or a new leader
//! neither takes an opening's locks twice nor undoes an admin's override.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::conditions;
use crate::crd::{LockType, STOP_THE_LINE};
use crate::environment::Environment;
use crate::error::Error as LockError;
use crate::queue::{self, QueueOrder, TakeRequest};
use crate::rules::{Actor, Refusal, Request};
use crate::signals::Signals;
use crate::store::LockStore;
use crate::windows::plan::{self, Step};
use crate::windows::schedule::{Interval, Recurrence};
use crate::windows::{
    EnvironmentOutcome, FreezeWindow, FreezeWindowStatus, Opening, READY_CONDITION, WINDOW_HOLDER,
    WhenHeld, deployment_id,
};

use super::lockwatch::LockView;
use super::plan::EventText;
use super::{Error, LeaderContext, REQUEST_TIMEOUT, post_event, timed};

/// The field manager of the status writes.
const FIELD_MANAGER: &str = "deploylock-controller";
/// A holding shorter than its opening (openings longer than the longest
/// holding) is extended when this little of it is left.
const RENEW_BEFORE: chrono::Duration = chrono::Duration::hours(24);
/// The lock of the namespace-wide freeze (config/admission/stop-the-line.yaml).
/// How often a missing FreezeWindow CRD is looked for again.
const CRD_RECHECK: Duration = Duration::from_secs(30);
/// Looked at again at least this often (a missed watch event).
const RESYNC: Duration = Duration::from_secs(300);

/// What the windows' task needs.
pub struct FreezeWindows {
    /// Its client (the controller's own identity) reads and writes the
    /// windows, their status and Events, in its namespace (all when `None`).
    pub leader: LeaderContext,
    /// The window identity ([`WINDOW_HOLDER`], impersonated): the locks.
    pub holder_client: Client,
    /// The leader's shared watch of the locks (an all-environments window
    /// takes the locks it holds).
    pub locks: LockView,
}

/// One window being reconciled, and where.
struct Target<'a> {
    shared: &'a Arc<Shared>,
    window: &'a FreezeWindow,
    namespace: &'a str,
    uid: &'a str,
}

impl<'a> Target<'a> {
    fn parts(&self) -> (&'a Arc<Shared>, &'a FreezeWindow, &'a str, &'a str) {
        (self.shared, self.window, self.namespace, self.uid)
    }
}

struct Shared {
    windows: FreezeWindows,
    /// Queued waits for the lock, by window UID and environment.
    waits: Mutex<HashMap<(String, String), JoinHandle<()>>>,
    /// True once this term as the leader ends: queued waits stop with it.
    term: watch::Receiver<bool>,
}

impl FreezeWindows {
    /// Runs until `term` turns true.
    pub async fn run(self, term: watch::Receiver<bool>) {
        let api: Api<FreezeWindow> =
            super::scoped_api(self.leader.client.clone(), self.leader.namespace.as_deref());
        // Without the FreezeWindow CRD (or the right to read it), look again
        // now and then: windows are optional.
        let mut stop = term.clone();
        loop {
            match timed(api.list(&ListParams::default().limit(1))).await {
                Ok(_) => break,
                Err(err) => {
                    tracing::debug!(error = %err, "freeze windows not readable; looking again in {CRD_RECHECK:?}")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(CRD_RECHECK) => {}
                _ = stop.wait_for(|ended| *ended) => return,
            }
        }
        let shared = Arc::new(Shared {
            windows: self,
            waits: Mutex::new(HashMap::new()),
            term: term.clone(),
        });
        let mut ended = term.clone();
        Controller::new(api, watcher::Config::default().timeout(20))
            .graceful_shutdown_on(async move {
                let _ = ended.wait_for(|ended| *ended).await;
            })
            .run(reconcile, error_policy, shared.clone())
            .for_each(|result| async move {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "freeze window reconcile");
                }
            })
            .await;
        if let Ok(mut waits) = shared.waits.lock() {
            for (_, wait) in waits.drain() {
                wait.abort();
            }
        }
    }
}

fn error_policy(window: Arc<FreezeWindow>, err: &Error, _: Arc<Shared>) -> Action {
    tracing::warn!(window = %window.name_any(), error = %err, "freeze window: retrying");
    Action::requeue(Duration::from_secs(2))
}

fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

async fn reconcile(window: Arc<FreezeWindow>, shared: Arc<Shared>) -> Result<Action, Error> {
    let context = &shared.windows;
    let (Some(namespace), Some(uid)) = (window.namespace(), window.uid()) else {
        return Err(Error::MissingObjectKey);
    };
    let name = window.name_any();
    let now = context.leader.clock.lower_bound(Instant::now());
    let old_status = window.status.clone().unwrap_or_default();
    let mut status = old_status.clone();
    status.observed_generation = window.metadata.generation;
    let recurrence = match window.spec.recurrence() {
        Ok(recurrence) => recurrence,
        Err(err) => {
            status.next_start = None;
            status.next_end = None;
            let message = err.to_string();
            set_ready(
                &mut status,
                false,
                "InvalidSchedule",
                &message,
                now,
                &window,
            );
            write_status(context, &namespace, &name, &old_status, &status).await?;
            return Ok(Action::await_change());
        }
    };
    set_ready(
        &mut status,
        true,
        "Scheduled",
        "the schedule is valid",
        now,
        &window,
    );
    let target = Target {
        shared: &shared,
        window: &window,
        namespace: &namespace,
        uid: &uid,
    };
    match plan::next_step(&recurrence, window.spec.suspend, status.last_opened, now) {
        Step::Open(interval) => {
            // Back to back: the previous opening ends as this one starts.
            if let Some(previous) = status.open.take() {
                close(&shared, &window, &uid, &previous).await;
            }
            open(&target, interval, &mut status).await?;
        }
        Step::Wait { .. } => {
            if let Some(opening) = status.open.clone() {
                if opening.end > now {
                    status.open = Some(keep_open(&target, &opening, now).await);
                } else {
                    status.open = None;
                    close(&shared, &window, &uid, &opening).await;
                }
            }
        }
    }
    let next = recurrence.current_or_next(now);
    status.next_start = next.map(|interval| interval.start);
    status.next_end = next.map(|interval| interval.end);
    write_status(context, &namespace, &name, &old_status, &status).await?;
    Ok(requeue(context, &recurrence, &window, &status, now))
}

/// Takes an opening's locks, records it in `status` and an Event.
async fn open(
    target: &Target<'_>,
    interval: Interval,
    status: &mut FreezeWindowStatus,
) -> Result<(), Error> {
    let (shared, window, namespace, _) = target.parts();
    let context = &shared.windows;
    let environments = environments_of(context, window, namespace).await?;
    let mut outcomes = Vec::new();
    for environment in environments {
        outcomes.push(take(target, &environment, interval).await);
    }
    let summary = summarize(&outcomes);
    status.last_opened = Some(interval.start);
    status.open = Some(Opening {
        start: interval.start,
        end: interval.end,
        environments: outcomes,
    });
    let name = window.name_any();
    let note = format!(
        "Freeze window opened until {}: {summary}",
        format_time(interval.end)
    );
    let event_name = format!("{name}.opened.{}", interval.start.timestamp());
    event(context, window, &event_name, "WindowOpened", note).await;
    Ok(())
}

/// An opening is over: its holdings expired at its end; queued waits stop.
async fn close(shared: &Arc<Shared>, window: &FreezeWindow, uid: &str, opening: &Opening) {
    cancel_waits(shared, uid);
    let event_name = format!("{}.closed.{}", window.name_any(), opening.start.timestamp());
    let note = format!(
        "Freeze window closed; its holdings expired at {}",
        format_time(opening.end)
    );
    event(&shared.windows, window, &event_name, "WindowClosed", note).await;
}

/// Looks again at the next instant that matters: a start, an end, and
/// hourly while open (renewals).
fn requeue(
    context: &FreezeWindows,
    recurrence: &Recurrence,
    window: &FreezeWindow,
    status: &FreezeWindowStatus,
    now: DateTime<Utc>,
) -> Action {
    let mut wake = match plan::next_step(recurrence, window.spec.suspend, status.last_opened, now) {
        Step::Open(_) => Some(now),
        Step::Wait { until } => until,
    };
    let open_until = status.open.as_ref().map(|opening| opening.end);
    if let Some(end) = open_until {
        let renew = now
            .checked_add_signed(chrono::Duration::hours(1))
            .unwrap_or(end);
        let soonest = end.min(renew);
        wake = Some(wake.map_or(soonest, |wake| wake.min(soonest)));
    }
    match wake {
        Some(at) => {
            let local = context.leader.clock.reached_at(at);
            Action::requeue(local.saturating_duration_since(Instant::now()).min(RESYNC))
        }
        None => Action::requeue(RESYNC),
    }
}

fn set_ready(
    status: &mut FreezeWindowStatus,
    ready: bool,
    reason: &str,
    message: &str,
    now: DateTime<Utc>,
    window: &FreezeWindow,
) {
    let observation = conditions::Observation {
        type_: READY_CONDITION,
        status: ready,
        reason,
        message,
    };
    observation.record_if_changed(&mut status.conditions, window.metadata.generation, now);
}

async fn write_status(
    context: &FreezeWindows,
    namespace: &str,
    name: &str,
    old: &FreezeWindowStatus,
    new: &FreezeWindowStatus,
) -> Result<(), Error> {
    if old == new {
        return Ok(());
    }
    let api: Api<FreezeWindow> = Api::namespaced(context.leader.client.clone(), namespace);
    // A merge patch keeps what it does not name: fields now absent are
    // written as null, which removes them.
    let mut written = serde_json::to_value(new).unwrap_or_default();
    if let Some(fields) = written.as_object_mut() {
        for key in ["open", "nextStart", "nextEnd", "lastOpened"] {
            fields.entry(key).or_insert(serde_json::Value::Null);
        }
    }
    let patch = serde_json::json!({ "status": written });
    timed(api.patch_status(
        name,
        &PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        },
        &Patch::Merge(&patch),
    ))
    .await
    .map(|_| ())
}

/// The environments a window freezes now: those it names, or every lock of
/// its namespace.
async fn environments_of(
    context: &FreezeWindows,
    window: &FreezeWindow,
    namespace: &str,
) -> Result<Vec<Environment>, Error> {
    let mut names: Vec<String> = if window.spec.all_environments {
        // The cache, once it holds a complete list (no request of its own).
        if tokio::time::timeout(REQUEST_TIMEOUT, context.locks.listed())
            .await
            .is_err()
        {
            return Err(Error::Timeout(REQUEST_TIMEOUT));
        }
        context
            .locks
            .store
            .state()
            .iter()
            .filter(|lock| lock.namespace().as_deref() == Some(namespace))
            .map(|lock| lock.name_any())
            .collect()
    } else {
        window.spec.environments.clone()
    };
    // The namespace-wide freeze is not an environment (it needs force).
    names.retain(|name| name != STOP_THE_LINE);
    // One total order, as every multi-lock taker uses; at most as many as a
    // window may name (anyone may create locks: the status stays bounded).
    names.sort();
    names.dedup();
    if names.len() > crate::environment::MAX_NAMED_ENVIRONMENTS {
        tracing::warn!(window = %window.name_any(), locks = names.len(), "freeze window: more locks than a window takes; the first {} by name", crate::environment::MAX_NAMED_ENVIRONMENTS);
        names.truncate(crate::environment::MAX_NAMED_ENVIRONMENTS);
    }
    Ok(names.iter().filter_map(|name| name.parse().ok()).collect())
}

fn actor(window: &FreezeWindow) -> Actor {
    Actor::new(WINDOW_HOLDER, Some(window.name_any()))
}

/// The window's request for an environment: a holding that ends at the
/// opening's end at the latest (the rules cut it there, on the server's
/// clock), with the longest duration a holding may have.
fn take_request(window: &FreezeWindow, uid: &str, interval: Interval) -> TakeRequest {
    TakeRequest {
        owner: Some(window.name_any()),
        lock_type: LockType::Scheduled,
        force: false,
        reason: window.spec.reason.clone(),
        duration: chrono::Duration::seconds(crate::crd::MAX_DURATION_SECONDS),
        deployment_id: Some(deployment_id(uid, interval.start)),
        metadata: BTreeMap::from([("freezeWindow".to_string(), window.name_any())]),
        // The rules serve a window's place before every other.
        order: QueueOrder::OldestFirst,
        not_after: Some(interval.end),
        group_id: None,
    }
}

/// Moves a window's holding towards the opening's end.
fn extend_request(window: &FreezeWindow, lock_id: &str, end: DateTime<Utc>) -> Request {
    Request::Extend {
        actor: actor(window),
        duration: chrono::Duration::seconds(crate::crd::MAX_DURATION_SECONDS),
        lock_id: Some(lock_id.to_string()),
        not_after: Some(end),
    }
}

fn outcome(environment: &Environment, outcome: &str, message: String) -> EnvironmentOutcome {
    if outcome == "Failed" {
        tracing::warn!(%environment, error = %message, "freeze window: cannot take the lock");
    }
    EnvironmentOutcome {
        name: environment.to_string(),
        outcome: outcome.to_string(),
        message,
    }
}

/// Takes one environment's lock for an opening: at once, or by overriding
/// its holder (TakeOver), or by waiting at the head of its queue (Queue).
async fn take(
    target: &Target<'_>,
    environment: &Environment,
    interval: Interval,
) -> EnvironmentOutcome {
    let (shared, window, namespace, uid) = target.parts();
    let context = &shared.windows;
    let store = LockStore::new(context.holder_client.clone(), namespace);
    let now = context.leader.clock.lower_bound(Instant::now());
    if plan::holding_duration(interval.end, now).is_none() {
        let left = "less than a minute of the opening was left".to_string();
        return outcome(environment, "Skipped", left);
    }
    let request = |force| {
        let mut request = take_request(window, uid, interval);
        request.force = force;
        Request::Acquire(request.acquire(WINDOW_HOLDER.to_string(), None))
    };
    let held = match store.apply(environment, &request(false)).await {
        Ok(_) => return outcome(environment, "Held", String::new()),
        Err(LockError::Refused(Refusal::AlreadyHeldByYou(holder))) => {
            // The previous opening's holding, overlapping this one.
            let extend = extend_request(window, &holder.lock_id, interval.end);
            return match store.apply(environment, &extend).await {
                Ok(_) => outcome(
                    environment,
                    "Held",
                    "extended the previous opening's holding".into(),
                ),
                Err(err) => outcome(environment, "Failed", err.to_string()),
            };
        }
        Err(LockError::Refused(Refusal::HeldByOther(holder)))
        | Err(LockError::Refused(Refusal::EmergencyLockInForce(holder))) => Some(holder),
        Err(LockError::Refused(Refusal::QueuedBehind { .. })) => None,
        Err(err) => return outcome(environment, "Failed", err.to_string()),
    };
    let overridable = held
        .as_ref()
        .is_some_and(|holder| holder.lock_type != LockType::Emergency);
    if window.spec.when_held == WhenHeld::TakeOver && overridable {
        match store.apply(environment, &request(true)).await {
            Ok(_) => {
                let whom = held
                    .map(|holder| format!("overrode {} ({:?})", holder.user, holder.reason))
                    .unwrap_or_default();
                return outcome(environment, "TookOver", whom);
            }
            Err(LockError::Refused(_)) => {}
            Err(err) => return outcome(environment, "Failed", err.to_string()),
        }
    }
    queue_for(target, environment, interval);
    let behind = held
        .map(|holder| format!("waiting at the head of the queue behind {}", holder.user))
        .unwrap_or_else(|| "waiting at the head of the queue".to_string());
    outcome(environment, "Queued", behind)
}

/// Waits (a task of its own) at the head of the environment's queue until
/// the lock is free, then holds it to the opening's end. The wait gives up
/// a minute before the end (a holding lasts at least a minute).
fn queue_for(target: &Target<'_>, environment: &Environment, interval: Interval) {
    let (shared, window, namespace, uid) = target.parts();
    let key = (uid.to_string(), environment.to_string());
    let Ok(mut waits) = shared.waits.lock() else {
        return;
    };
    // One wait per environment and opening in a term: once it took the
    // lock (or gave up), a later loss (an admin's override) stands.
    if waits.contains_key(&key) {
        return;
    }
    let minimum = chrono::Duration::seconds(crate::crd::MIN_DURATION_SECONDS);
    let Some(last_chance) = interval.end.checked_sub_signed(minimum) else {
        return;
    };
    let context = &shared.windows;
    let store = LockStore::new(context.holder_client.clone(), namespace);
    let deadline = context.leader.clock.reached_at(last_chance);
    let request = take_request(window, uid, interval);
    let environment = environment.clone();
    let name = window.name_any();
    let windows: Api<FreezeWindow> = Api::namespaced(context.leader.client.clone(), namespace);
    let uid = uid.to_string();
    let mut term = shared.term.clone();
    let wait = tokio::spawn(async move {
        // A replica that stops leading, or a window deleted meanwhile (the
        // Controller does not reconcile deletions), gives up its place at
        // once: the window's place comes first in the queue.
        let (cancel, cancelled) = watch::channel(false);
        let mut signals = Signals::cancelled_by(cancelled);
        let mut progress = ();
        let taking = queue::take(
            &store,
            &environment,
            &request,
            Some(deadline),
            &mut signals,
            &mut progress,
        );
        let stopping = async {
            tokio::select! {
                _ = term.wait_for(|ended| *ended) => {}
                () = until_deleted(windows, &name, &uid) => {}
            }
            let _ = cancel.send(true);
            std::future::pending::<()>().await
        };
        let taken = tokio::select! {
            taken = taking => taken,
            () = stopping => return,
        };
        match taken {
            Ok(_) => {
                tracing::info!(window = %name, %environment, "freeze window: took the lock from the queue")
            }
            Err(LockError::Interrupted) => {
                tracing::info!(window = %name, %environment, "freeze window: the window was deleted or this replica stopped leading; left the queue")
            }
            Err(err) => {
                tracing::info!(window = %name, %environment, error = %err, "freeze window: the lock did not come to it before the end")
            }
        }
    });
    waits.insert(key, wait);
}

/// Returns once the window `name` with `uid` is gone (a watch of it; a
/// failing watch is started again).
async fn until_deleted(windows: Api<FreezeWindow>, name: &str, uid: &str) {
    loop {
        let gone = kube::runtime::wait::await_condition(
            windows.clone(),
            name,
            kube::runtime::wait::conditions::is_deleted(uid),
        )
        .await;
        match gone {
            Ok(_) => return,
            Err(err) => {
                tracing::debug!(window = %name, error = %err, "freeze window: watching for its deletion again");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

fn cancel_waits(shared: &Arc<Shared>, uid: &str) {
    if let Ok(mut waits) = shared.waits.lock() {
        waits.retain(|(window, _), wait| {
            if window == uid {
                wait.abort();
                false
            } else {
                true
            }
        });
    }
}

/// While an opening lasts: queued environments keep waiting (also after a
/// restart or a new leader, unless the window took the lock in this opening
/// already), failed ones are tried again, and holdings shorter than the
/// opening are extended before they run out. Returns the opening with what
/// became of each environment.
async fn keep_open(target: &Target<'_>, opening: &Opening, now: DateTime<Utc>) -> Opening {
    let (shared, window, namespace, uid) = target.parts();
    let mut updated = opening.clone();
    let (start, end) = (opening.start, opening.end);
    let interval = Interval { start, end };
    let ours = deployment_id(uid, start);
    let store = LockStore::new(shared.windows.holder_client.clone(), namespace);
    // The leader's lock cache, not a read per environment: only a renewal
    // (which reads the lock itself) or a take makes requests.
    let locks = &shared.windows.locks;
    if tokio::time::timeout(REQUEST_TIMEOUT, locks.listed())
        .await
        .is_err()
    {
        return updated;
    }
    for entry in &mut updated.environments {
        let Ok(environment) = entry.name.parse::<Environment>() else {
            continue;
        };
        let Some(lock) = locks
            .store
            .get(&ObjectRef::new(environment.as_str()).within(namespace))
        else {
            continue;
        };
        let taken = taken_since(&lock.spec, start);
        match &lock.spec.holder {
            Some(holder) if holder.deployment_id.as_deref() == Some(ours.as_str()) => {
                entry.outcome = "Held".to_string();
                let short = holder.expires_at < end && holder.expires_at - now < RENEW_BEFORE;
                if short {
                    let extend = extend_request(window, &holder.lock_id, end);
                    if let Err(err) = store.apply(&environment, &extend).await {
                        tracing::warn!(window = %window.name_any(), %environment, error = %err, "freeze window: cannot extend its holding");
                    }
                }
            }
            // Taken by a window in this opening and not this window's now
            // (an admin's override, which stands, or another window's
            // holding): recorded, so that it still stands once the lock's
            // 20-entry history no longer shows it.
            _ if taken && entry.outcome != "Held" => {
                entry.outcome = "Held".to_string();
                entry.message =
                    "taken by a freeze window in this opening; not this window's holding now"
                        .to_string();
            }
            _ if taken => {}
            _ if entry.outcome == "Queued" => queue_for(target, &environment, interval),
            _ if entry.outcome == "Failed" => *entry = take(target, &environment, interval).await,
            _ => {}
        }
    }
    updated
}

/// Whether the window took the lock since `start` (and lost it since: an
/// admin's override, which stands until the next opening).
fn taken_since(spec: &crate::crd::DeploymentLockSpec, start: DateTime<Utc>) -> bool {
    spec.history
        .iter()
        .any(|entry| entry.by == WINDOW_HOLDER && entry.at >= start)
}

fn summarize(outcomes: &[EnvironmentOutcome]) -> String {
    if outcomes.is_empty() {
        return "no environment to freeze".to_string();
    }
    outcomes
        .iter()
        .map(|entry| {
            if entry.message.is_empty() {
                format!("{} {}", entry.name, entry.outcome.to_lowercase())
            } else {
                format!(
                    "{} {} ({})",
                    entry.name,
                    entry.outcome.to_lowercase(),
                    entry.message
                )
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Records an Event on the window; a name already taken (recorded by an
/// earlier leader) is fine.
async fn event(
    context: &FreezeWindows,
    window: &FreezeWindow,
    name: &str,
    reason: &'static str,
    note: String,
) {
    let Some(namespace) = window.namespace() else {
        return;
    };
    let text = EventText {
        suffix: String::new(),
        reason,
        event_type: "Normal",
        note,
    };
    let reporter = context.leader.reporter();
    let name: String = name.chars().take(253).collect();
    let posted = post_event(reporter, &namespace, name, window.object_ref(&()), &text).await;
    if let Err(err) = posted {
        tracing::warn!(error = %err, "cannot record the freeze window's Event");
    }
}
