//! The controller's plan (`controller::plan`), through the crate's public
//! API only: given a stored lock, its status, the server time and the
//! settings, what a reconcile writes, which Events it records and when it
//! looks again.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use deploylock::controller::plan::{Announcement, Plan, Step, plan};
use deploylock::controller::{LOCKED_CONDITION, Settings};
use deploylock::crd::{
    DeploymentLock, DeploymentLockSpec, DeploymentLockStatus, HistoryAction, LockState, LockType,
};
use deploylock::rules::{AcquireRequest, Actor, Decision, Request, decide};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

const ENV: &str = "production";
const CONTROLLER_USER: &str = "system:serviceaccount:deploylock:controller";

/// A fixed instant on the API server's clock.
fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_750_000_000, 0).expect("a valid timestamp")
}

fn settings() -> Settings {
    Settings {
        retention: Duration::hours(1),
        instance: "controller-0".into(),
    }
}

/// `spec` after `request` at `now`, as the CLI would write it.
fn after(
    spec: Option<&DeploymentLockSpec>,
    now: DateTime<Utc>,
    request: &Request,
) -> DeploymentLockSpec {
    match decide(ENV, spec, now, request) {
        Ok(Decision::Change { next, .. }) => next,
        other => panic!("{request:?} at {now}: {other:?}"),
    }
}

fn acquire(user: &str, lock_id: &str, duration: Duration) -> Request {
    Request::Acquire(AcquireRequest {
        actor: Actor::new(user, None),
        lock_id: lock_id.into(),
        lock_type: LockType::Manual,
        force: false,
        reason: "Deploying version 2.1.0".into(),
        duration,
        deployment_id: None,
        metadata: BTreeMap::new(),
        waiter_id: None,
        not_after: None,
        group_id: None,
    })
}

/// A lock alice took at t0 for 30 minutes, stored with `status`.
fn held_lock(status: Option<DeploymentLockStatus>) -> DeploymentLock {
    let spec = after(
        None,
        t0(),
        &acquire("alice", "lock-1", Duration::minutes(30)),
    );
    let mut lock = DeploymentLock::new(ENV, spec);
    lock.status = status;
    lock
}

/// When the holding of `lock` expires.
#[track_caller]
fn expiry_of(lock: &DeploymentLock) -> DateTime<Utc> {
    lock.spec
        .holder
        .as_ref()
        .map(|h| h.expires_at)
        .expect("held")
}

fn planned(lock: &DeploymentLock, now: DateTime<Utc>) -> Plan<'_> {
    plan(lock, ENV, now, &settings(), CONTROLLER_USER)
}

fn keep<'a>(
    plan: &'a Plan<'a>,
) -> (
    &'a Option<DeploymentLockStatus>,
    &'a [Announcement<'a>],
    i64,
    Option<DateTime<Utc>>,
) {
    match &plan.step {
        Step::Keep {
            status,
            events,
            announced,
            wake_at,
        } => (status, events, *announced, *wake_at),
        Step::Clear { spec } => panic!("cleared: {spec:?}"),
    }
}

/// The `Locked` condition's transition time in the status `plan` writes.
#[track_caller]
fn written_transition(plan: &Plan<'_>) -> Time {
    let (status, _, _, _) = keep(plan);
    let status = status.as_ref().expect("a status to write");
    status.conditions[0].last_transition_time.clone()
}

#[test]
fn a_new_holding_is_marked_locked_announced_and_woken_at_its_expiry() {
    let lock = held_lock(None);
    let now = t0() + Duration::minutes(5);
    let plan = planned(&lock, now);
    assert_eq!(plan.state, LockState::Locked);
    assert_eq!(plan.advance_clock_to, None);
    assert_eq!(plan.held_seconds, 300.0);
    let (status, events, announced, wake_at) = keep(&plan);
    let status = status.as_ref().expect("a status to write");
    assert_eq!(status.state, Some(LockState::Locked));
    assert_eq!(status.lock_id.as_deref(), Some("lock-1"));
    assert_eq!(status.last_event_sequence, Some(0));
    let condition = &status.conditions[0];
    assert_eq!(condition.type_, LOCKED_CONDITION);
    assert_eq!(condition.status, "True");
    assert!(
        condition.message.contains("held by alice"),
        "{}",
        condition.message
    );
    assert_eq!(announced, 0);
    assert_eq!(events.len(), 1, "{events:?}");
    match events[0] {
        Announcement::Entry(entry) => {
            assert_eq!((entry.sequence, entry.action), (1, HistoryAction::Acquired));
            let text = events[0].text();
            assert_eq!((text.reason, text.event_type), ("Acquired", "Normal"));
            assert_eq!(text.suffix, "1");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(wake_at, lock.spec.holder.as_ref().map(|h| h.expires_at));
}

#[test]
fn an_up_to_date_status_is_not_written_and_announced_entries_are_not_announced_again() {
    let first = held_lock(None);
    let now = t0() + Duration::minutes(5);
    let written = match &planned(&first, now).step {
        Step::Keep { status, .. } => status.clone().expect("a status"),
        Step::Clear { .. } => panic!("cleared"),
    };
    let mut recorded = written;
    recorded.last_event_sequence = Some(1);
    let lock = held_lock(Some(recorded.clone()));
    // Later, same state: the condition's transition time is kept.
    let plan = planned(&lock, now + Duration::minutes(1));
    let (status, events, announced, _) = keep(&plan);
    assert_eq!(status, &None, "an unchanged status is written again");
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(announced, 1);
}

#[test]
fn an_expired_holding_moves_the_clock_then_is_marked_and_announced() {
    let lock = held_lock(None);
    let expires_at = expiry_of(&lock);
    let now = expires_at + Duration::seconds(1);
    let plan = planned(&lock, now);
    assert_eq!(plan.state, LockState::Expired);
    assert_eq!(plan.held_seconds, 0.0);
    assert_eq!(plan.advance_clock_to, Some(expires_at));
    let (status, events, _, wake_at) = keep(&plan);
    let status = status.as_ref().expect("a status to write");
    assert_eq!(status.state, Some(LockState::Expired));
    assert_eq!(status.conditions[0].status, "False");
    // The history entry first, then the expiry.
    assert!(
        matches!(events, [Announcement::Entry(_), Announcement::Expiry(_)]),
        "{events:?}"
    );
    let text = events[1].text();
    assert_eq!((text.reason, text.event_type), ("Expired", "Normal"));
    assert_eq!(text.suffix, "expired-lock1");
    assert_eq!(wake_at, Some(expires_at + settings().retention));
}

#[test]
fn not_expired_until_the_instant_passes() {
    let lock = held_lock(None);
    let expires_at = expiry_of(&lock);
    let plan = planned(&lock, expires_at - Duration::nanoseconds(1));
    assert_eq!(plan.state, LockState::Locked);
    assert_eq!(plan.advance_clock_to, None);
}

#[test]
fn a_holding_expired_for_the_retention_is_cleared_by_the_controller() {
    let lock = held_lock(None);
    let expires_at = expiry_of(&lock);
    let now = expires_at + settings().retention + Duration::seconds(1);
    let plan = planned(&lock, now);
    assert_eq!(plan.advance_clock_to, Some(expires_at));
    let Step::Clear { spec } = &plan.step else {
        panic!("not cleared: {plan:?}");
    };
    assert_eq!(spec.holder, None);
    assert_eq!(spec.fencing_token, lock.spec.fencing_token);
    let entry = spec.history.last().expect("a history entry");
    assert_eq!(entry.action, HistoryAction::Cleared);
    assert_eq!(entry.by, CONTROLLER_USER);
    assert_eq!(entry.owner, "alice");
    assert_eq!(
        spec.history[..spec.history.len() - 1],
        lock.spec.history[..]
    );
    // Just before the retention ends: kept, and woken at its end.
    let before = planned(
        &lock,
        expires_at + settings().retention - Duration::seconds(1),
    );
    let (_, _, _, wake_at) = keep(&before);
    assert_eq!(wake_at, Some(expires_at + settings().retention));
}

#[test]
fn an_available_lock_is_not_woken_by_time() {
    let held = held_lock(None);
    let released = after(
        Some(&held.spec),
        t0() + Duration::minutes(1),
        &Request::Release {
            actor: Actor::new("alice", None),
            lock_id: None,
        },
    );
    let lock = DeploymentLock::new(ENV, released);
    let plan = planned(&lock, t0() + Duration::minutes(2));
    assert_eq!(plan.state, LockState::Available);
    assert_eq!(plan.advance_clock_to, None);
    let (status, events, _, wake_at) = keep(&plan);
    let status = status.as_ref().expect("a status");
    assert_eq!(status.lock_id, None);
    assert_eq!(status.conditions[0].message, "available");
    assert_eq!(wake_at, None);
    let actions: Vec<HistoryAction> = events
        .iter()
        .map(|event| match event {
            Announcement::Entry(entry) => entry.action,
            Announcement::Expiry(_) => panic!("an expiry announced for an available lock"),
        })
        .collect();
    assert_eq!(actions, [HistoryAction::Acquired, HistoryAction::Released]);
}

#[test]
fn the_condition_keeps_its_transition_time_while_its_value_holds() {
    let first = held_lock(None);
    let start = t0() + Duration::minutes(5);
    let Step::Keep {
        status: Some(written),
        ..
    } = planned(&first, start).step
    else {
        panic!("no status written");
    };
    let lock = held_lock(Some(written.clone()));
    let expires_at = expiry_of(&lock);
    // Expired: the value turns False, so the transition time moves.
    let later = planned(&lock, expires_at + Duration::seconds(1));
    let before = &written.conditions[0].last_transition_time;
    assert_ne!(&written_transition(&later), before);
    // Still locked, another message would keep the time: same value.
    let mut extended = lock.clone();
    if let Some(holder) = extended.spec.holder.as_mut() {
        holder.expires_at += Duration::minutes(10);
    }
    let plan = planned(&extended, start + Duration::minutes(1));
    assert_eq!(&written_transition(&plan), before);
}

#[test]
fn clearing_needs_the_holding_it_was_decided_on() {
    // A holding taken over after the expiry is a new one: not cleared.
    let lock = held_lock(None);
    let expires_at = expiry_of(&lock);
    let taken = after(
        Some(&lock.spec),
        expires_at + Duration::minutes(1),
        &acquire("bob", "lock-2", Duration::hours(2)),
    );
    let lock = DeploymentLock::new(ENV, taken);
    let plan = planned(
        &lock,
        expires_at + settings().retention + Duration::seconds(1),
    );
    assert_eq!(plan.state, LockState::Locked);
    assert!(matches!(plan.step, Step::Keep { .. }), "{plan:?}");
}
