//! The lock rules, through the crate's public API only: use cases first, then
//! properties over random sequences of requests checked against an
//! independent model of holdings.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use deploylock::crd::{
    DeploymentLockSpec, HistoryAction, HistoryEntry, LockHolder, LockState, LockType,
    MAX_DURATION_SECONDS, MAX_HISTORY_ENTRIES, MIN_DURATION_SECONDS, OverriddenHolding, Waiter,
};
use deploylock::rules::{
    AcquireRequest, Actor, Decision, NoChange, Refusal, Request, WAITER_PRUNE_GRACE_SECONDS,
    WAITER_TIMEOUT_SECONDS, decide, duration_in_range, is_expired, live_holder, next_waiter,
    state_at,
};
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestCaseError};

const ENV: &str = "production";
const DEPLOY_REASON: &str = "Deploying version 2.1.0";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A fixed instant on the API server's clock.
fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_750_000_000, 0).expect("a valid timestamp")
}

/// The token a lock object created at `now` starts from (before its first
/// holding adds one).
fn first_token_at(now: DateTime<Utc>) -> i64 {
    (now.timestamp() + deploylock::crd::FENCING_BASE_LEAD_SECONDS)
        * deploylock::crd::FENCING_TOKENS_PER_SECOND
}

fn nanos(n: i64) -> Duration {
    Duration::nanoseconds(n)
}

fn person(user: &str) -> Actor {
    Actor::new(user, None)
}

fn acquire_request(
    actor: &Actor,
    lock_id: &str,
    reason: &str,
    duration: Duration,
) -> AcquireRequest {
    AcquireRequest {
        actor: actor.clone(),
        lock_id: lock_id.to_string(),
        lock_type: LockType::Manual,
        force: false,
        reason: reason.to_string(),
        duration,
        deployment_id: None,
        metadata: BTreeMap::new(),
        waiter_id: None,
        not_after: None,
        group_id: None,
    }
}

fn acquire(actor: &Actor, lock_id: &str, duration: Duration) -> Request {
    Request::Acquire(acquire_request(actor, lock_id, DEPLOY_REASON, duration))
}

fn force_acquire(actor: &Actor, lock_id: &str, reason: &str, duration: Duration) -> Request {
    Request::Acquire(AcquireRequest {
        force: true,
        ..acquire_request(actor, lock_id, reason, duration)
    })
}

fn release(actor: &Actor, lock_id: Option<&str>) -> Request {
    Request::Release {
        actor: actor.clone(),
        lock_id: lock_id.map(str::to_string),
    }
}

fn force_release(actor: &Actor, reason: &str) -> Request {
    Request::ForceRelease {
        actor: actor.clone(),
        reason: reason.to_string(),
    }
}

fn extend(actor: &Actor, duration: Duration, lock_id: Option<&str>) -> Request {
    Request::Extend {
        actor: actor.clone(),
        duration,
        lock_id: lock_id.map(str::to_string),
        not_after: None,
    }
}

fn clear(lock_id: &str, retention: Duration) -> Request {
    Request::Clear {
        actor: controller(),
        lock_id: lock_id.to_string(),
        retention,
    }
}

fn controller() -> Actor {
    Actor::new(
        "system:serviceaccount:deploylock:controller",
        Some("deploylock-controller".to_string()),
    )
}

/// Decides a request that must change the lock.
#[track_caller]
fn change(
    current: Option<&DeploymentLockSpec>,
    now: DateTime<Utc>,
    request: &Request,
) -> (DeploymentLockSpec, HistoryAction) {
    match decide(ENV, current, now, request) {
        Ok(Decision::Change { next, action }) => (next, action),
        other => panic!("expected a change for {request:?}, got {other:?}"),
    }
}

/// Decides a request that must be refused.
#[track_caller]
fn refusal(current: Option<&DeploymentLockSpec>, now: DateTime<Utc>, request: &Request) -> Refusal {
    match decide(ENV, current, now, request) {
        Err(refusal) => refusal,
        Ok(decision) => panic!("expected {request:?} to be refused, got {decision:?}"),
    }
}

#[track_caller]
fn holder(spec: &DeploymentLockSpec) -> &LockHolder {
    spec.holder.as_ref().expect("the lock is held")
}

#[track_caller]
fn last_entry(spec: &DeploymentLockSpec) -> &HistoryEntry {
    spec.history.last().expect("the history is not empty")
}

fn empty_spec() -> DeploymentLockSpec {
    DeploymentLockSpec {
        environment: ENV.to_string(),
        ..DeploymentLockSpec::default()
    }
}

mod hostile;
mod properties;
mod queue;
mod use_cases;
