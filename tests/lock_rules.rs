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

// ---------------------------------------------------------------------------
// Use cases
// ---------------------------------------------------------------------------

#[test]
fn coordinated_deployment_bob_waits_for_alice() {
    let alice = person("alice");
    let bob = person("bob");
    let now = t0();

    let (locked, action) = change(None, now, &acquire(&alice, "lock-a", Duration::minutes(30)));
    assert_eq!(action, HistoryAction::Acquired);
    assert_eq!(locked.environment, ENV);
    let held = holder(&locked);
    assert_eq!(held.lock_id, "lock-a");
    assert_eq!(held.user, "alice");
    assert_eq!(held.owner, "alice");
    assert_eq!(held.lock_type, LockType::Manual);
    assert_eq!(held.reason, DEPLOY_REASON);
    assert_eq!(held.acquired_at, now);
    assert_eq!(held.expires_at, now + Duration::minutes(30));
    assert_eq!(held.duration_seconds, 30 * 60);
    assert_eq!(held.overrode, None);
    assert_eq!(state_at(&locked, now), LockState::Locked);

    let later = now + Duration::minutes(5);
    let refused = refusal(
        Some(&locked),
        later,
        &acquire(&bob, "lock-b", Duration::minutes(30)),
    );
    assert_eq!(refused, Refusal::HeldByOther(Box::new(held.clone())));
    assert_eq!(refused.to_string(), "the lock is held by alice");

    let done = later + Duration::minutes(5);
    let (released, action) = change(Some(&locked), done, &release(&alice, Some("lock-a")));
    assert_eq!(action, HistoryAction::Released);
    assert_eq!(released.holder, None);
    assert_eq!(state_at(&released, done), LockState::Available);
    let entry = last_entry(&released);
    assert_eq!(
        (
            entry.action,
            entry.lock_id.as_str(),
            entry.by.as_str(),
            entry.at
        ),
        (HistoryAction::Released, "lock-a", "alice", done)
    );

    let (bobs, action) = change(
        Some(&released),
        done,
        &acquire(&bob, "lock-b", Duration::minutes(30)),
    );
    assert_eq!(action, HistoryAction::Acquired);
    assert_eq!(holder(&bobs).user, "bob");
    assert_eq!(holder(&bobs).lock_id, "lock-b");
    assert_eq!(
        bobs.history.iter().map(|e| e.action).collect::<Vec<_>>(),
        [
            HistoryAction::Acquired,
            HistoryAction::Released,
            HistoryAction::Acquired
        ]
    );
}

#[test]
fn release_by_someone_else_is_refused_not_holder() {
    let alice = person("alice");
    let (locked, _) = change(None, t0(), &acquire(&alice, "lock-a", Duration::hours(1)));

    let mallory = person("mallory");
    let later = t0() + Duration::minutes(1);
    for lock_id in [None, Some("lock-a")] {
        assert_eq!(
            refusal(Some(&locked), later, &release(&mallory, lock_id)),
            Refusal::NotHolder(Box::new(holder(&locked).clone()))
        );
    }
}

/// A long manual lock for a maintenance window, with a reason and context.
fn maintenance_window(ops: &Actor) -> DeploymentLockSpec {
    let mut request = acquire_request(
        ops,
        "maint-1",
        "Database maintenance window",
        Duration::hours(8),
    );
    request.deployment_id = Some("CHG-1234".to_string());
    request
        .metadata
        .insert("ticket".to_string(), "CHG-1234".to_string());
    let (spec, action) = change(None, t0(), &Request::Acquire(request));
    assert_eq!(action, HistoryAction::Acquired);
    spec
}

fn platform_team() -> Actor {
    Actor::new("ops-bot", Some("Platform team".to_string()))
}

#[test]
fn maintenance_window_is_a_long_manual_lock_with_a_reason() {
    let ops = platform_team();
    let spec = maintenance_window(&ops);
    let held = holder(&spec);
    assert_eq!(held.user, "ops-bot");
    assert_eq!(held.owner, "Platform team");
    assert_eq!(held.reason, "Database maintenance window");
    assert_eq!(held.lock_type, LockType::Manual);
    assert_eq!(held.expires_at, t0() + Duration::hours(8));
    assert_eq!(held.deployment_id.as_deref(), Some("CHG-1234"));
    assert_eq!(
        held.metadata.get("ticket").map(String::as_str),
        Some("CHG-1234")
    );
    let entry = last_entry(&spec);
    assert_eq!(entry.owner, "Platform team");
    assert_eq!(entry.by, "ops-bot");
    assert_eq!(entry.reason, "Database maintenance window");
    assert_eq!(entry.expires_at, Some(t0() + Duration::hours(8)));
    assert_eq!(
        state_at(&spec, t0() + Duration::hours(7)),
        LockState::Locked
    );
}

#[test]
fn maintenance_window_is_extended_by_its_holder() {
    let ops = platform_team();
    let spec = maintenance_window(&ops);
    let at = t0() + Duration::hours(6);

    let (extended, action) = change(
        Some(&spec),
        at,
        &extend(&ops, Duration::hours(4), Some("maint-1")),
    );
    assert_eq!(action, HistoryAction::Extended);
    let held = holder(&extended);
    assert_eq!(held.expires_at, at + Duration::hours(4));
    assert_eq!(held.lock_id, "maint-1");
    assert_eq!(held.acquired_at, t0());
    assert_eq!(extended.fencing_token, spec.fencing_token);
    let entry = last_entry(&extended);
    assert_eq!(entry.action, HistoryAction::Extended);
    assert_eq!(entry.at, at);
    assert_eq!(entry.expires_at, Some(at + Duration::hours(4)));

    // Without naming the holding, too.
    let (again, action) = change(Some(&extended), at, &extend(&ops, Duration::hours(5), None));
    assert_eq!(action, HistoryAction::Extended);
    assert_eq!(holder(&again).expires_at, at + Duration::hours(5));
}

#[test]
fn maintenance_window_cannot_be_extended_by_someone_else() {
    let ops = platform_team();
    let spec = maintenance_window(&ops);
    let bob = person("bob");
    let at = t0() + Duration::hours(1);

    for lock_id in [None, Some("maint-1")] {
        let refused = refusal(Some(&spec), at, &extend(&bob, Duration::hours(2), lock_id));
        assert_eq!(refused, Refusal::NotHolder(Box::new(holder(&spec).clone())));
        assert_eq!(
            refused.to_string(),
            "the lock is held by Platform team, not by you"
        );
    }
}

#[test]
fn maintenance_window_cannot_be_extended_after_it_expired() {
    let ops = platform_team();
    let spec = maintenance_window(&ops);
    let expiry = holder(&spec).expires_at;

    for at in [expiry, expiry + nanos(1), expiry + Duration::hours(3)] {
        assert_eq!(
            refusal(
                Some(&spec),
                at,
                &extend(&ops, Duration::hours(2), Some("maint-1"))
            ),
            Refusal::ExpiredCannotExtend(Box::new(holder(&spec).clone()))
        );
    }

    // One nanosecond earlier it is still in force and can be extended.
    let (extended, action) = change(
        Some(&spec),
        expiry - nanos(1),
        &extend(&ops, Duration::hours(2), Some("maint-1")),
    );
    assert_eq!(action, HistoryAction::Extended);
    assert_eq!(
        holder(&extended).expires_at,
        expiry - nanos(1) + Duration::hours(2)
    );
}

fn renew(actor: &Actor, duration: Duration) -> Request {
    Request::Renew {
        actor: actor.clone(),
        duration,
    }
}

/// The seed's recovery for "lock expired during operation": `acquire
/// --extend` renews one's own expired holding while it is still the lock's.
#[test]
fn an_expired_holding_nobody_took_over_is_renewed_by_its_holder() {
    let ops = platform_team();
    let spec = maintenance_window(&ops);
    let expiry = holder(&spec).expires_at;
    let later = expiry + Duration::minutes(10);

    let (renewed, action) = change(Some(&spec), later, &renew(&ops, Duration::hours(1)));
    assert_eq!(action, HistoryAction::Extended);
    assert_eq!(holder(&renewed).lock_id, holder(&spec).lock_id);
    assert_eq!(renewed.fencing_token, spec.fencing_token);
    assert_eq!(holder(&renewed).expires_at, later + Duration::hours(1));
    assert_eq!(
        last_entry(&renewed).expires_at,
        Some(later + Duration::hours(1))
    );
    assert_eq!(last_entry(&renewed).action, HistoryAction::Extended);

    // Someone else cannot renew it, and plain extend still refuses.
    let bob = person("bob");
    assert!(matches!(
        refusal(Some(&spec), later, &renew(&bob, Duration::hours(1))),
        Refusal::NotHolder(_)
    ));
    assert_eq!(
        refusal(Some(&spec), later, &extend(&ops, Duration::hours(1), None)),
        Refusal::ExpiredCannotExtend(Box::new(holder(&spec).clone()))
    );
    // While in force, renew is extend.
    let (extended, _) = change(
        Some(&spec),
        expiry - nanos(1),
        &renew(&ops, Duration::hours(2)),
    );
    assert_eq!(
        holder(&extended).expires_at,
        expiry - nanos(1) + Duration::hours(2)
    );
}

#[test]
fn an_expired_holding_is_not_renewed_past_waiters_or_after_a_takeover() {
    let ops = platform_team();
    let spec = maintenance_window(&ops);
    let expiry = holder(&spec).expires_at;
    let bob = person("bob");
    let queued = queue_change(
        &spec,
        expiry - Duration::seconds(1),
        &join(&bob, "bob-waits", false),
    );
    assert!(matches!(
        refusal(
            Some(&queued),
            expiry + Duration::seconds(1),
            &renew(&ops, Duration::hours(1))
        ),
        Refusal::QueuedBehind { waiting: 1, .. }
    ));

    // Taken over: the holding is no longer the caller's.
    let (taken, _) = change(
        Some(&spec),
        expiry + Duration::minutes(1),
        &acquire(&bob, "lock-b", Duration::minutes(30)),
    );
    assert!(matches!(
        refusal(
            Some(&taken),
            expiry + Duration::minutes(2),
            &renew(&ops, Duration::hours(1))
        ),
        Refusal::NotHolder(_)
    ));
    // Cleared by the controller: nothing to renew.
    let (cleared, _) = change(
        Some(&spec),
        expiry + Duration::hours(2),
        &clear(&holder(&spec).lock_id.clone(), Duration::hours(1)),
    );
    assert_eq!(
        refusal(
            Some(&cleared),
            expiry + Duration::hours(2),
            &renew(&ops, Duration::hours(1))
        ),
        Refusal::NotHeld
    );
}

#[test]
fn extend_never_shortens_the_expiry() {
    let ops = platform_team();
    let spec = maintenance_window(&ops);
    let expiry = holder(&spec).expires_at;

    let (extended, action) = change(
        Some(&spec),
        t0() + Duration::hours(1),
        &extend(&ops, Duration::minutes(1), Some("maint-1")),
    );
    assert_eq!(action, HistoryAction::Extended);
    assert_eq!(holder(&extended).expires_at, expiry);
    assert_eq!(last_entry(&extended).expires_at, Some(expiry));
}

#[test]
fn extend_of_a_lock_nobody_holds_is_refused() {
    let alice = person("alice");
    let five_minutes = Duration::minutes(5);
    assert_eq!(
        refusal(None, t0(), &extend(&alice, five_minutes, None)),
        Refusal::NotHeld
    );
    assert_eq!(
        refusal(None, t0(), &extend(&alice, five_minutes, Some("lock-a"))),
        Refusal::LockLost {
            expected_lock_id: "lock-a".to_string(),
            current: None,
        }
    );
}

/// Alice deploys normally; Carol takes the lock over for a hotfix.
fn hotfix_in_progress() -> (DeploymentLockSpec, DeploymentLockSpec) {
    let alice = person("alice");
    let carol = person("carol");
    let (normal, _) = change(None, t0(), &acquire(&alice, "lock-a", Duration::hours(1)));
    let (forced, action) = change(
        Some(&normal),
        t0() + Duration::minutes(10),
        &force_acquire(
            &carol,
            "hotfix-1",
            "Hotfix for outage",
            Duration::minutes(30),
        ),
    );
    assert_eq!(action, HistoryAction::ForceAcquired);
    (normal, forced)
}

#[test]
fn emergency_hotfix_force_overrides_a_normal_lock() {
    let (normal, forced) = hotfix_in_progress();
    let at = t0() + Duration::minutes(10);
    let held = holder(&forced);
    assert_eq!(held.user, "carol");
    assert_eq!(held.lock_id, "hotfix-1");
    assert_eq!(held.lock_type, LockType::Emergency);
    assert_eq!(held.reason, "Hotfix for outage");
    assert_eq!(held.acquired_at, at);
    assert_eq!(held.expires_at, at + Duration::minutes(30));
    assert_eq!(
        held.overrode,
        Some(OverriddenHolding {
            lock_id: "lock-a".to_string(),
            user: "alice".to_string(),
            owner: "alice".to_string(),
            reason: DEPLOY_REASON.to_string(),
        })
    );
    assert_eq!(state_at(&forced, at), LockState::ForceLocked);
    assert_eq!(forced.fencing_token, normal.fencing_token + 1);
    let entry = last_entry(&forced);
    assert_eq!(
        (entry.action, entry.by.as_str(), entry.lock_id.as_str()),
        (HistoryAction::ForceAcquired, "carol", "hotfix-1")
    );

    // Alice's cleanup finds her holding gone.
    assert_eq!(
        refusal(
            Some(&forced),
            at + Duration::minutes(1),
            &release(&person("alice"), Some("lock-a"))
        ),
        Refusal::LockLost {
            expected_lock_id: "lock-a".to_string(),
            current: Some(Box::new(held.clone())),
        }
    );
}

#[test]
fn emergency_hotfix_a_second_force_by_someone_else_is_refused() {
    let (_, forced) = hotfix_in_progress();
    let refused = refusal(
        Some(&forced),
        t0() + Duration::minutes(11),
        &force_acquire(
            &person("dave"),
            "hotfix-2",
            "Another hotfix",
            Duration::minutes(30),
        ),
    );
    assert_eq!(
        refused,
        Refusal::EmergencyLockInForce(Box::new(holder(&forced).clone()))
    );
    assert_eq!(
        refused.to_string(),
        "an emergency lock held by carol is in force"
    );
}

#[test]
fn emergency_hotfix_a_normal_acquire_is_refused_held_by_other() {
    let (_, forced) = hotfix_in_progress();
    for user in ["alice", "bob"] {
        assert_eq!(
            refusal(
                Some(&forced),
                t0() + Duration::minutes(11),
                &acquire(&person(user), "lock-x", Duration::minutes(30))
            ),
            Refusal::HeldByOther(Box::new(holder(&forced).clone()))
        );
    }
}

#[test]
fn emergency_hotfix_holder_releases_and_the_lock_is_available() {
    let (_, forced) = hotfix_in_progress();
    let at = t0() + Duration::minutes(20);
    let (released, action) = change(
        Some(&forced),
        at,
        &release(&person("carol"), Some("hotfix-1")),
    );
    assert_eq!(action, HistoryAction::Released);
    assert_eq!(state_at(&released, at), LockState::Available);
    assert_eq!(released.fencing_token, forced.fencing_token);
}

#[test]
fn force_on_an_available_lock_makes_an_emergency_holding_overriding_nobody() {
    let mut request = acquire_request(
        &person("carol"),
        "hotfix-1",
        "Hotfix for outage",
        Duration::minutes(30),
    );
    request.force = true;
    request.lock_type = LockType::Automatic;
    let (forced, action) = change(None, t0(), &Request::Acquire(request));
    assert_eq!(action, HistoryAction::ForceAcquired);
    assert_eq!(holder(&forced).lock_type, LockType::Emergency);
    assert_eq!(holder(&forced).overrode, None);
    assert_eq!(state_at(&forced, t0()), LockState::ForceLocked);
    assert_eq!(forced.fencing_token, first_token_at(t0()) + 1);
}

#[test]
fn stuck_lock_expires_exactly_at_expires_at_and_anyone_can_take_it_over() {
    let runner = Actor::new(
        "system:serviceaccount:ci:runner",
        Some("ci-runner".to_string()),
    );
    let mut request = acquire_request(&runner, "run-41", DEPLOY_REASON, Duration::minutes(10));
    request.lock_type = LockType::Automatic;
    let (stuck, _) = change(None, t0(), &Request::Acquire(request));
    // The runner crashes and never releases.
    let held = holder(&stuck);
    let expiry = held.expires_at;
    let just_before = expiry - nanos(1);

    assert_eq!(state_at(&stuck, just_before), LockState::Locked);
    assert_eq!(state_at(&stuck, expiry), LockState::Expired);
    assert!(!is_expired(held, just_before));
    assert!(is_expired(held, expiry));
    assert_eq!(live_holder(&stuck, just_before), Some(held));
    assert_eq!(live_holder(&stuck, expiry), None);

    let bob = person("bob");
    assert_eq!(
        refusal(
            Some(&stuck),
            just_before,
            &acquire(&bob, "lock-b", Duration::minutes(30))
        ),
        Refusal::HeldByOther(Box::new(held.clone()))
    );

    let (taken, action) = change(
        Some(&stuck),
        expiry,
        &acquire(&bob, "lock-b", Duration::minutes(30)),
    );
    assert_eq!(action, HistoryAction::TookOverExpired);
    let new = holder(&taken);
    assert_eq!(new.user, "bob");
    assert_eq!(new.lock_id, "lock-b");
    assert_ne!(new.lock_id, held.lock_id);
    assert_eq!(new.acquired_at, expiry);
    assert_eq!(new.overrode, None);
    assert_eq!(taken.fencing_token, stuck.fencing_token + 1);
    assert_eq!(state_at(&taken, expiry), LockState::Locked);
    let entry = last_entry(&taken);
    assert_eq!(
        (entry.action, entry.lock_id.as_str(), entry.by.as_str()),
        (HistoryAction::TookOverExpired, "lock-b", "bob")
    );

    // The crashed runner's late cleanup does not free bob's holding.
    assert!(matches!(
        refusal(Some(&taken), expiry + Duration::minutes(1), &release(&runner, Some("run-41"))),
        Refusal::LockLost { ref expected_lock_id, current: Some(ref current) }
            if expected_lock_id == "run-41" && current.lock_id == "lock-b"
    ));
}

#[test]
fn stuck_lock_can_be_taken_over_by_its_own_identity_with_a_new_lock_id() {
    let alice = person("alice");
    let (stuck, _) = change(None, t0(), &acquire(&alice, "run-1", Duration::minutes(10)));
    let expiry = holder(&stuck).expires_at;
    let (taken, action) = change(
        Some(&stuck),
        expiry,
        &acquire(&alice, "run-2", Duration::minutes(10)),
    );
    assert_eq!(action, HistoryAction::TookOverExpired);
    assert_eq!(holder(&taken).lock_id, "run-2");
}

#[test]
fn same_owner_second_run_is_refused_already_held_by_you() {
    let pipeline = Actor::new(
        "system:serviceaccount:ci:deployer",
        Some("pipeline".to_string()),
    );
    let (first, _) = change(
        None,
        t0(),
        &acquire(&pipeline, "run-1", Duration::minutes(30)),
    );
    let at = t0() + Duration::minutes(1);

    let refused = refusal(
        Some(&first),
        at,
        &acquire(&pipeline, "run-2", Duration::minutes(30)),
    );
    assert_eq!(
        refused,
        Refusal::AlreadyHeldByYou(Box::new(holder(&first).clone()))
    );
    assert_eq!(refused.to_string(), "you already hold this lock");

    // The identity counts, not the display label.
    let relabelled = Actor::new(
        "system:serviceaccount:ci:deployer",
        Some("another pipeline".to_string()),
    );
    assert!(matches!(
        refusal(
            Some(&first),
            at,
            &acquire(&relabelled, "run-3", Duration::minutes(30))
        ),
        Refusal::AlreadyHeldByYou(_)
    ));

    // Once the first run releases, the second may go.
    let (released, _) = change(Some(&first), at, &release(&pipeline, Some("run-1")));
    let (second, action) = change(
        Some(&released),
        at,
        &acquire(&pipeline, "run-2", Duration::minutes(30)),
    );
    assert_eq!(action, HistoryAction::Acquired);
    assert_eq!(holder(&second).lock_id, "run-2");
}

#[test]
fn release_of_an_available_lock_is_unchanged() {
    let alice = person("alice");
    assert_eq!(
        decide(ENV, None, t0(), &release(&alice, None)),
        Ok(Decision::Unchanged(NoChange::AlreadyAvailable))
    );
    assert_eq!(
        decide(ENV, None, t0(), &force_release(&alice, "cleanup")),
        Ok(Decision::Unchanged(NoChange::AlreadyAvailable))
    );

    let (locked, _) = change(None, t0(), &acquire(&alice, "lock-a", Duration::minutes(5)));
    let (released, _) = change(Some(&locked), t0(), &release(&alice, None));
    assert_eq!(
        decide(ENV, Some(&released), t0(), &release(&alice, None)),
        Ok(Decision::Unchanged(NoChange::AlreadyAvailable))
    );
}

#[test]
fn release_with_a_stale_lock_id_is_lock_lost() {
    let alice = person("alice");
    let (locked, _) = change(None, t0(), &acquire(&alice, "lock-2", Duration::minutes(5)));
    assert_eq!(
        refusal(Some(&locked), t0(), &release(&alice, Some("lock-1"))),
        Refusal::LockLost {
            expected_lock_id: "lock-1".to_string(),
            current: Some(Box::new(holder(&locked).clone())),
        }
    );

    let (released, _) = change(Some(&locked), t0(), &release(&alice, Some("lock-2")));
    let refused = refusal(Some(&released), t0(), &release(&alice, Some("lock-2")));
    assert_eq!(
        refused,
        Refusal::LockLost {
            expected_lock_id: "lock-2".to_string(),
            current: None,
        }
    );
    assert_eq!(refused.to_string(), "the holding lock-2 is over");
}

#[test]
fn force_release_requires_a_reason() {
    let alice = person("alice");
    let admin = person("admin");
    let (locked, _) = change(None, t0(), &acquire(&alice, "lock-a", Duration::minutes(5)));
    for reason in ["", "   ", "\t\n"] {
        assert_eq!(
            refusal(Some(&locked), t0(), &force_release(&admin, reason)),
            Refusal::ReasonRequired
        );
        assert_eq!(
            refusal(None, t0(), &force_release(&admin, reason)),
            Refusal::ReasonRequired
        );
    }
}

#[test]
fn force_release_records_who_and_why() {
    let alice = person("alice");
    let admin = person("admin");
    let (locked, _) = change(None, t0(), &acquire(&alice, "lock-a", Duration::minutes(5)));
    let at = t0() + Duration::minutes(2);
    let (released, action) = change(
        Some(&locked),
        at,
        &force_release(&admin, "Holder's pipeline crashed"),
    );
    assert_eq!(action, HistoryAction::ForceReleased);
    assert_eq!(released.holder, None);
    assert_eq!(state_at(&released, at), LockState::Available);
    assert_eq!(released.fencing_token, locked.fencing_token);
    assert_eq!(
        last_entry(&released),
        &HistoryEntry {
            sequence: last_entry(&locked).sequence + 1,
            action: HistoryAction::ForceReleased,
            at,
            lock_id: "lock-a".to_string(),
            by: "admin".to_string(),
            owner: "alice".to_string(),
            reason: "Holder's pipeline crashed".to_string(),
            expires_at: None,
        }
    );
}

#[test]
fn acquire_with_a_blank_reason_is_refused() {
    let alice = person("alice");
    for reason in ["", " ", "\t \n"] {
        for force in [false, true] {
            let request = Request::Acquire(AcquireRequest {
                force,
                ..acquire_request(&alice, "lock-a", reason, Duration::minutes(5))
            });
            assert_eq!(refusal(None, t0(), &request), Refusal::ReasonRequired);
        }
    }
}

#[test]
fn durations_outside_one_minute_to_seven_days_or_with_fractions_are_refused() {
    let alice = person("alice");
    let min = Duration::seconds(MIN_DURATION_SECONDS);
    let max = Duration::seconds(MAX_DURATION_SECONDS);
    assert_eq!(min, Duration::seconds(60));
    assert_eq!(max, Duration::days(7));

    let (locked, _) = change(None, t0(), &acquire(&alice, "lock-a", min));
    for bad in [
        Duration::zero(),
        Duration::seconds(59),
        min - nanos(1),
        -min,
        -max,
        max + Duration::seconds(1),
        max + nanos(1),
        min + Duration::milliseconds(500),
        Duration::minutes(5) + nanos(1),
    ] {
        assert!(!duration_in_range(bad), "{bad} accepted");
        for force in [false, true] {
            let request = Request::Acquire(AcquireRequest {
                force,
                ..acquire_request(&alice, "lock-b", DEPLOY_REASON, bad)
            });
            assert_eq!(
                refusal(None, t0(), &request),
                Refusal::DurationOutOfRange,
                "{bad}"
            );
        }
        assert_eq!(
            refusal(Some(&locked), t0(), &extend(&alice, bad, Some("lock-a"))),
            Refusal::DurationOutOfRange,
            "{bad}"
        );
    }

    for good in [min, Duration::minutes(5), Duration::hours(8), max] {
        assert!(duration_in_range(good), "{good} refused");
        let (spec, _) = change(None, t0(), &acquire(&alice, "lock-b", good));
        assert_eq!(holder(&spec).expires_at, t0() + good);
        assert_eq!(holder(&spec).duration_seconds, good.num_seconds());
    }
}

#[test]
fn fencing_token_increments_by_one_on_every_new_holding_only() {
    let alice = person("alice");
    let bob = person("bob");
    let carol = person("carol");
    let admin = person("admin");
    let ten = Duration::minutes(10);
    let mut now = t0();
    let mut spec: Option<DeploymentLockSpec> = None;
    // A new object starts from the clock (first step at t0).
    let mut token = first_token_at(t0());

    let steps: Vec<(Duration, Request, HistoryAction, i64)> = vec![
        (
            Duration::zero(),
            acquire(&alice, "l1", ten),
            HistoryAction::Acquired,
            1,
        ),
        (
            Duration::minutes(1),
            extend(&alice, ten, Some("l1")),
            HistoryAction::Extended,
            0,
        ),
        (
            Duration::minutes(1),
            release(&alice, Some("l1")),
            HistoryAction::Released,
            0,
        ),
        (
            Duration::zero(),
            acquire(&bob, "l2", ten),
            HistoryAction::Acquired,
            1,
        ),
        (
            Duration::minutes(10),
            acquire(&carol, "l3", ten),
            HistoryAction::TookOverExpired,
            1,
        ),
        (
            Duration::minutes(1),
            force_acquire(&alice, "l4", "hotfix", ten),
            HistoryAction::ForceAcquired,
            1,
        ),
        (
            Duration::minutes(1),
            extend(&alice, Duration::hours(1), None),
            HistoryAction::Extended,
            0,
        ),
        (
            Duration::minutes(1),
            force_release(&admin, "stuck"),
            HistoryAction::ForceReleased,
            0,
        ),
        (
            Duration::zero(),
            force_acquire(&bob, "l5", "hotfix", ten),
            HistoryAction::ForceAcquired,
            1,
        ),
        (
            Duration::zero(),
            release(&bob, None),
            HistoryAction::Released,
            0,
        ),
    ];
    for (advance, request, expected_action, increment) in steps {
        now += advance;
        let (next, action) = change(spec.as_ref(), now, &request);
        assert_eq!(action, expected_action);
        token += increment;
        assert_eq!(next.fencing_token, token, "after {action:?}");
        spec = Some(next);
    }
    assert_eq!(token, first_token_at(t0()) + 5);
}

#[test]
fn history_is_bounded_and_drops_the_oldest_first() {
    let alice = person("alice");
    let mut spec: Option<DeploymentLockSpec> = None;
    let mut expected: Vec<(HistoryAction, String)> = Vec::new();
    let mut now = t0();

    for run in 0..25 {
        let lock_id = format!("run-{run}");
        let (acquired, _) = change(
            spec.as_ref(),
            now,
            &acquire(&alice, &lock_id, Duration::minutes(5)),
        );
        expected.push((HistoryAction::Acquired, lock_id.clone()));
        assert_eq!(
            acquired.history.len(),
            expected.len().min(MAX_HISTORY_ENTRIES)
        );
        now += Duration::minutes(1);
        let (released, _) = change(Some(&acquired), now, &release(&alice, Some(&lock_id)));
        expected.push((HistoryAction::Released, lock_id));
        assert_eq!(
            released.history.len(),
            expected.len().min(MAX_HISTORY_ENTRIES)
        );
        spec = Some(released);
    }

    let history = spec.expect("the lock was written").history;
    assert_eq!(history.len(), MAX_HISTORY_ENTRIES);
    let kept: Vec<(HistoryAction, String)> = history
        .iter()
        .map(|entry| (entry.action, entry.lock_id.clone()))
        .collect();
    assert_eq!(kept, expected[expected.len() - MAX_HISTORY_ENTRIES..]);
    assert_eq!(kept[0], (HistoryAction::Acquired, "run-15".to_string()));
    // Entries keep their position in the whole history.
    let dropped = (expected.len() - MAX_HISTORY_ENTRIES) as i64;
    assert_eq!(
        history
            .iter()
            .map(|entry| entry.sequence)
            .collect::<Vec<_>>(),
        (dropped + 1..=expected.len() as i64).collect::<Vec<_>>()
    );
    assert!(history.windows(2).all(|pair| pair[0].at <= pair[1].at));
}

#[test]
fn decide_without_an_object_behaves_like_an_empty_spec() {
    let alice = person("alice");
    let five = Duration::minutes(5);
    let requests = [
        acquire(&alice, "lock-a", five),
        force_acquire(&alice, "lock-a", "hotfix", five),
        acquire(&alice, "lock-a", Duration::seconds(1)),
        Request::Acquire(acquire_request(&alice, "lock-a", " ", five)),
        release(&alice, None),
        release(&alice, Some("lock-a")),
        force_release(&alice, "cleanup"),
        force_release(&alice, ""),
        extend(&alice, five, None),
        extend(&alice, five, Some("lock-a")),
        extend(&alice, Duration::zero(), None),
        clear("lock-a", Duration::zero()),
    ];
    // A missing object decides like an empty one whose token starts from
    // the clock.
    let empty = DeploymentLockSpec {
        fencing_token: first_token_at(t0()),
        ..empty_spec()
    };
    for request in &requests {
        let without = decide(ENV, None, t0(), request);
        assert_eq!(
            without,
            decide(ENV, Some(&empty), t0(), request),
            "{request:?}"
        );
        if let Ok(Decision::Change { next, .. }) = &without {
            assert_eq!(next.environment, ENV);
            assert_eq!(next.history.len(), 1);
            assert_eq!(next.history[0].sequence, 1);
            assert_eq!(next.fencing_token, first_token_at(t0()) + 1);
        }
    }
    let (created, _) = change(None, t0(), &requests[0]);
    assert_eq!(created.environment, ENV);
    assert!(created.queue.is_empty());
}

#[test]
fn controller_clears_a_stuck_lock_once_it_stayed_expired_for_the_retention() {
    let runner = person("ci-runner");
    let (stuck, _) = change(
        None,
        t0(),
        &acquire(&runner, "run-7", Duration::minutes(10)),
    );
    let expiry = holder(&stuck).expires_at;
    let retention = Duration::minutes(15);

    for at in [t0(), expiry, expiry + retention - nanos(1)] {
        assert_eq!(
            refusal(Some(&stuck), at, &clear("run-7", retention)),
            Refusal::HeldByOther(Box::new(holder(&stuck).clone())),
            "cleared at {at}"
        );
    }

    let at = expiry + retention;
    let (cleared, action) = change(Some(&stuck), at, &clear("run-7", retention));
    assert_eq!(action, HistoryAction::Cleared);
    assert_eq!(cleared.holder, None);
    assert_eq!(state_at(&cleared, at), LockState::Available);
    assert_eq!(cleared.fencing_token, stuck.fencing_token);
    let entry = last_entry(&cleared);
    assert_eq!(entry.action, HistoryAction::Cleared);
    assert_eq!(entry.at, at);
    assert_eq!(entry.lock_id, "run-7");
    assert_eq!(entry.by, controller().user);
    assert_eq!(entry.owner, "ci-runner");
    assert_eq!(entry.expires_at, Some(expiry));
    assert_eq!(entry.sequence, last_entry(&stuck).sequence + 1);

    // With no retention, the expiry instant itself is enough.
    let (now_cleared, action) = change(Some(&stuck), expiry, &clear("run-7", Duration::zero()));
    assert_eq!(action, HistoryAction::Cleared);
    assert_eq!(now_cleared.holder, None);
}

#[test]
fn controller_clearing_a_holding_that_was_replaced_is_lock_lost() {
    let runner = person("ci-runner");
    let bob = person("bob");
    let (stuck, _) = change(
        None,
        t0(),
        &acquire(&runner, "run-7", Duration::minutes(10)),
    );
    let expiry = holder(&stuck).expires_at;
    // Bob takes the expired lock over between the controller's read and write.
    let (taken, _) = change(
        Some(&stuck),
        expiry,
        &acquire(&bob, "lock-b", Duration::hours(1)),
    );
    assert_eq!(
        refusal(
            Some(&taken),
            expiry + Duration::hours(2),
            &clear("run-7", Duration::zero())
        ),
        Refusal::LockLost {
            expected_lock_id: "run-7".to_string(),
            current: Some(Box::new(holder(&taken).clone())),
        }
    );

    let (released, _) = change(Some(&taken), expiry, &release(&bob, Some("lock-b")));
    assert_eq!(
        decide(
            ENV,
            Some(&released),
            expiry,
            &clear("lock-b", Duration::zero())
        ),
        Ok(Decision::Unchanged(NoChange::AlreadyAvailable))
    );
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

/// The bounds of a lock duration, stated independently of the crate's check.
fn acceptable_duration(duration: Duration) -> bool {
    duration >= Duration::seconds(MIN_DURATION_SECONDS)
        && duration <= Duration::seconds(MAX_DURATION_SECONDS)
        && duration
            .num_nanoseconds()
            .is_some_and(|n| n % 1_000_000_000 == 0)
}

#[derive(Clone, Debug)]
enum Advance {
    By(Duration),
    /// Exactly to the current holding's expiry (if it is ahead).
    ToExpiry,
    /// One nanosecond before the current holding's expiry (if it is ahead).
    JustBeforeExpiry,
}

#[derive(Clone, Debug)]
enum Op {
    Acquire {
        who: usize,
        force: bool,
        lock_type: LockType,
        duration: Duration,
        blank_reason: bool,
    },
    Release {
        who: usize,
        with_lock_id: bool,
    },
    ForceRelease {
        who: usize,
        blank_reason: bool,
    },
    Extend {
        who: usize,
        duration: Duration,
        with_lock_id: bool,
    },
    /// The controller's housekeeping, naming the current holding or (as
    /// after a stale read) the one before it.
    Clear {
        stale: bool,
        retention: Duration,
    },
}

#[derive(Clone, Debug)]
struct Step {
    advance: Advance,
    op: Op,
}

fn actors() -> [Actor; 3] {
    [
        Actor::new("alice", None),
        Actor::new("bob", Some("Bob (release manager)".to_string())),
        Actor::new("system:serviceaccount:ci:deployer", Some("ci".to_string())),
    ]
}

fn advance_strategy() -> impl Strategy<Value = Advance> {
    prop_oneof![
        2 => Just(Advance::By(Duration::zero())),
        5 => (0i64..=7200).prop_map(|s| Advance::By(Duration::seconds(s))),
        1 => (0i64..=7200, 0i64..1_000_000_000)
            .prop_map(|(s, n)| Advance::By(Duration::seconds(s) + nanos(n))),
        2 => Just(Advance::ToExpiry),
        1 => Just(Advance::JustBeforeExpiry),
    ]
}

fn valid_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        6 => (MIN_DURATION_SECONDS..=7200).prop_map(Duration::seconds),
        1 => Just(Duration::seconds(MIN_DURATION_SECONDS)),
        1 => (7200..=MAX_DURATION_SECONDS).prop_map(Duration::seconds),
        1 => Just(Duration::seconds(MAX_DURATION_SECONDS)),
    ]
}

fn invalid_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::zero()),
        Just(Duration::seconds(MIN_DURATION_SECONDS - 1)),
        Just(Duration::seconds(-MIN_DURATION_SECONDS)),
        Just(Duration::seconds(MAX_DURATION_SECONDS + 1)),
        (
            MIN_DURATION_SECONDS..MAX_DURATION_SECONDS,
            1i64..1_000_000_000
        )
            .prop_map(|(s, n)| Duration::seconds(s) + nanos(n)),
    ]
}

fn duration_strategy() -> impl Strategy<Value = Duration> {
    prop_oneof![9 => valid_duration(), 1 => invalid_duration()]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let who = 0usize..3;
    prop_oneof![
        5 => (
            who.clone(),
            prop::bool::weighted(0.25),
            prop_oneof![Just(LockType::Manual), Just(LockType::Automatic)],
            duration_strategy(),
            prop::bool::weighted(0.05),
        )
            .prop_map(|(who, force, lock_type, duration, blank_reason)| Op::Acquire {
                who,
                force,
                lock_type,
                duration,
                blank_reason,
            }),
        3 => (who.clone(), prop::bool::weighted(0.7))
            .prop_map(|(who, with_lock_id)| Op::Release { who, with_lock_id }),
        1 => (who.clone(), prop::bool::weighted(0.1))
            .prop_map(|(who, blank_reason)| Op::ForceRelease { who, blank_reason }),
        1 => (
            prop::bool::weighted(0.2),
            prop_oneof![
                Just(Duration::zero()),
                (0i64..=7200).prop_map(Duration::seconds),
            ],
        )
            .prop_map(|(stale, retention)| Op::Clear { stale, retention }),
        3 => (who, duration_strategy(), prop::bool::weighted(0.7)).prop_map(
            |(who, duration, with_lock_id)| Op::Extend {
                who,
                duration,
                with_lock_id,
            }
        ),
    ]
}

fn steps_strategy() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (advance_strategy(), op_strategy()).prop_map(|(advance, op)| Step { advance, op }),
        1..=60,
    )
}

/// One holding as the model sees it, built only from the decisions.
#[derive(Clone, Debug)]
struct Holding {
    lock_id: String,
    user: String,
    emergency: bool,
    start: DateTime<Utc>,
    /// The expiry as last extended.
    expires_at: DateTime<Utc>,
    /// When it was released, force-released or overridden.
    ended_at: Option<DateTime<Utc>>,
}

impl Holding {
    fn end(&self) -> DateTime<Utc> {
        self.ended_at
            .map_or(self.expires_at, |at| at.min(self.expires_at))
    }

    fn live_at(&self, now: DateTime<Utc>) -> bool {
        self.start <= now && now < self.end()
    }
}

#[derive(Debug, Default)]
struct Model {
    holdings: Vec<Holding>,
    /// The holding last acquired and neither released nor overridden: what
    /// the spec must show as its holder, live or expired.
    current: Option<usize>,
}

impl Model {
    fn current(&self) -> Option<&Holding> {
        self.current.map(|index| &self.holdings[index])
    }

    fn live(&self, now: DateTime<Utc>) -> Option<&Holding> {
        self.current().filter(|holding| now < holding.expires_at)
    }

    fn state_at(&self, now: DateTime<Utc>) -> LockState {
        match self.current() {
            None => LockState::Available,
            Some(holding) if now >= holding.expires_at => LockState::Expired,
            Some(holding) if holding.emergency => LockState::ForceLocked,
            Some(_) => LockState::Locked,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    Change(HistoryAction),
    Unchanged(NoChange),
}

type Expected = Result<Outcome, Refusal>;

fn requester(request: &Request) -> &Actor {
    match request {
        Request::Acquire(acquire) => &acquire.actor,
        Request::Release { actor, .. }
        | Request::ForceRelease { actor, .. }
        | Request::Extend { actor, .. }
        | Request::Renew { actor, .. }
        | Request::Clear { actor, .. }
        | Request::JoinQueue { actor, .. } => actor,
        Request::LeaveQueue { .. } => panic!("no queue requests are generated here"),
    }
}

/// A decision without the next spec.
fn outcome(decision: Result<Decision, Refusal>) -> Expected {
    match decision {
        Ok(Decision::Change { action, .. }) => Ok(Outcome::Change(action)),
        Ok(Decision::Unchanged(reason)) => Ok(Outcome::Unchanged(reason)),
        Ok(Decision::Queue { .. }) => panic!("no queue requests are generated here"),
        Err(refusal) => Err(refusal),
    }
}

/// What the model allows as the answer to `request` at `now`. The refusals
/// carry the holder as stored, which must agree with the model (checked
/// after every step).
fn expected_outcomes(
    model: &Model,
    stored: Option<&LockHolder>,
    now: DateTime<Utc>,
    request: &Request,
) -> Vec<Expected> {
    let held = || Box::new(stored.expect("the model says the lock is held").clone());
    let lock_lost = |expected: &str, current: Option<Box<LockHolder>>| {
        Err(Refusal::LockLost {
            expected_lock_id: expected.to_string(),
            current,
        })
    };
    match request {
        Request::Acquire(acquire) => {
            if acquire.reason.trim().is_empty() {
                return vec![Err(Refusal::ReasonRequired)];
            }
            if !acceptable_duration(acquire.duration) {
                return vec![Err(Refusal::DurationOutOfRange)];
            }
            match model.live(now) {
                Some(live) if live.user == acquire.actor.user => {
                    if acquire.force && !live.emergency {
                        // Turning one's own normal holding into an emergency
                        // one: either answer keeps one holder at a time.
                        vec![
                            Ok(Outcome::Change(HistoryAction::ForceAcquired)),
                            Err(Refusal::AlreadyHeldByYou(held())),
                        ]
                    } else {
                        vec![Err(Refusal::AlreadyHeldByYou(held()))]
                    }
                }
                Some(live) if live.emergency => vec![Err(if acquire.force {
                    Refusal::EmergencyLockInForce(held())
                } else {
                    Refusal::HeldByOther(held())
                })],
                Some(_) if acquire.force => vec![Ok(Outcome::Change(HistoryAction::ForceAcquired))],
                Some(_) => vec![Err(Refusal::HeldByOther(held()))],
                None if acquire.force => vec![Ok(Outcome::Change(HistoryAction::ForceAcquired))],
                None if model.current().is_some() => {
                    vec![Ok(Outcome::Change(HistoryAction::TookOverExpired))]
                }
                None => vec![Ok(Outcome::Change(HistoryAction::Acquired))],
            }
        }
        Request::Release { actor, lock_id } => vec![match (model.current(), lock_id) {
            (None, Some(expected)) => lock_lost(expected, None),
            (None, None) => Ok(Outcome::Unchanged(NoChange::AlreadyAvailable)),
            (Some(current), Some(expected)) if *expected != current.lock_id => {
                lock_lost(expected, Some(held()))
            }
            (Some(current), _) if current.user != actor.user => Err(Refusal::NotHolder(held())),
            (Some(_), _) => Ok(Outcome::Change(HistoryAction::Released)),
        }],
        Request::ForceRelease { reason, .. } => vec![if reason.trim().is_empty() {
            Err(Refusal::ReasonRequired)
        } else if model.current().is_none() {
            Ok(Outcome::Unchanged(NoChange::AlreadyAvailable))
        } else {
            Ok(Outcome::Change(HistoryAction::ForceReleased))
        }],
        Request::Extend {
            actor,
            duration,
            lock_id,
        } => vec![if !acceptable_duration(*duration) {
            Err(Refusal::DurationOutOfRange)
        } else {
            match (model.current(), lock_id) {
                (None, Some(expected)) => lock_lost(expected, None),
                (None, None) => Err(Refusal::NotHeld),
                (Some(current), Some(expected)) if *expected != current.lock_id => {
                    lock_lost(expected, Some(held()))
                }
                (Some(current), _) if current.user != actor.user => Err(Refusal::NotHolder(held())),
                (Some(current), _) if now >= current.expires_at => {
                    Err(Refusal::ExpiredCannotExtend(held()))
                }
                (Some(_), _) => Ok(Outcome::Change(HistoryAction::Extended)),
            }
        }],
        Request::Clear {
            lock_id, retention, ..
        } => vec![match model.current() {
            None => Ok(Outcome::Unchanged(NoChange::AlreadyAvailable)),
            Some(current) if *lock_id != current.lock_id => lock_lost(lock_id, Some(held())),
            Some(current) if now < current.expires_at + *retention => {
                Err(Refusal::HeldByOther(held()))
            }
            Some(_) => Ok(Outcome::Change(HistoryAction::Cleared)),
        }],
        Request::JoinQueue { .. } | Request::LeaveQueue { .. } | Request::Renew { .. } => {
            panic!("no queue or renew requests are generated here")
        }
    }
}

/// Property 3: exactly one entry appended, the oldest dropped beyond the bound.
fn check_history(
    previous: &[HistoryEntry],
    next: &[HistoryEntry],
    action: HistoryAction,
    now: DateTime<Utc>,
) -> Result<(), TestCaseError> {
    prop_assert!(next.len() <= MAX_HISTORY_ENTRIES);
    let kept = if previous.len() < MAX_HISTORY_ENTRIES {
        previous
    } else {
        &previous[previous.len() + 1 - MAX_HISTORY_ENTRIES..]
    };
    prop_assert_eq!(next.len(), kept.len() + 1);
    prop_assert_eq!(&next[..kept.len()], kept);
    let last = next.last().expect("an entry was appended");
    prop_assert_eq!(last.action, action);
    prop_assert_eq!(last.at, now);
    // Numbered after the last entry, whatever was dropped.
    prop_assert_eq!(
        last.sequence,
        previous.last().map_or(0, |entry| entry.sequence) + 1
    );
    Ok(())
}

/// Properties 2 and 6: the stored lock and the model agree.
fn check_agreement(
    spec: Option<&DeploymentLockSpec>,
    model: &Model,
    now: DateTime<Utc>,
) -> Result<(), TestCaseError> {
    let empty = empty_spec();
    let spec = spec.unwrap_or(&empty);
    prop_assert_eq!(state_at(spec, now), model.state_at(now));
    prop_assert_eq!(
        live_holder(spec, now).map(|h| h.lock_id.as_str()),
        model.live(now).map(|h| h.lock_id.as_str())
    );
    match (spec.holder.as_ref(), model.current()) {
        (None, None) => {}
        (Some(stored), Some(holding)) => {
            prop_assert_eq!(&stored.lock_id, &holding.lock_id);
            prop_assert_eq!(&stored.user, &holding.user);
            prop_assert_eq!(stored.acquired_at, holding.start);
            prop_assert_eq!(stored.expires_at, holding.expires_at);
            prop_assert_eq!(stored.lock_type == LockType::Emergency, holding.emergency);
            // The state flips exactly at the expiry.
            let just_before = holding.expires_at - nanos(1);
            prop_assert_eq!(state_at(spec, just_before), model.state_at(just_before));
            prop_assert_ne!(state_at(spec, just_before), LockState::Expired);
            prop_assert_eq!(state_at(spec, holding.expires_at), LockState::Expired);
        }
        (stored, holding) => prop_assert!(
            false,
            "stored holder {:?} but the model's is {:?}",
            stored,
            holding
        ),
    }
    Ok(())
}

fn run_scenario(start_nanos: i64, steps: &[Step]) -> Result<(), TestCaseError> {
    let actors = actors();
    let mut last_lock_id: [Option<String>; 3] = Default::default();
    let mut spec: Option<DeploymentLockSpec> = None;
    let mut model = Model::default();
    let mut now = t0() + nanos(start_nanos);
    let mut next_id = 0;

    for (index, step) in steps.iter().enumerate() {
        let target = match step.advance {
            Advance::By(by) => now + by,
            Advance::ToExpiry => model.current().map_or(now, |h| h.expires_at),
            Advance::JustBeforeExpiry => model.current().map_or(now, |h| h.expires_at - nanos(1)),
        };
        // Time never goes backwards.
        now = now.max(target);
        check_agreement(spec.as_ref(), &model, now)?;

        let (who, request) = match &step.op {
            Op::Acquire {
                who,
                force,
                lock_type,
                duration,
                blank_reason,
            } => {
                next_id += 1;
                let reason = if *blank_reason { " " } else { DEPLOY_REASON };
                let mut request =
                    acquire_request(&actors[*who], &format!("lock-{next_id}"), reason, *duration);
                request.force = *force;
                request.lock_type = *lock_type;
                (Some(*who), Request::Acquire(request))
            }
            Op::Release { who, with_lock_id } => {
                let lock_id = last_lock_id[*who].as_deref().filter(|_| *with_lock_id);
                (Some(*who), release(&actors[*who], lock_id))
            }
            Op::ForceRelease { who, blank_reason } => {
                let reason = if *blank_reason { "" } else { "stuck pipeline" };
                (Some(*who), force_release(&actors[*who], reason))
            }
            Op::Extend {
                who,
                duration,
                with_lock_id,
            } => {
                let lock_id = last_lock_id[*who].as_deref().filter(|_| *with_lock_id);
                (Some(*who), extend(&actors[*who], *duration, lock_id))
            }
            Op::Clear { stale, retention } => {
                let named = if *stale {
                    let current = model.current();
                    model
                        .holdings
                        .iter()
                        .rev()
                        .find(|h| current.is_none_or(|c| c.lock_id != h.lock_id))
                } else {
                    model.current()
                };
                let lock_id = named.map_or("lock-0", |h| h.lock_id.as_str());
                (None, clear(lock_id, *retention))
            }
        };

        let stored = spec.as_ref().and_then(|s| s.holder.as_ref());
        let expected = expected_outcomes(&model, stored, now, &request);
        let decision = decide(ENV, spec.as_ref(), now, &request);
        let actual: Expected = match &decision {
            Ok(Decision::Change { action, .. }) => Ok(Outcome::Change(*action)),
            Ok(Decision::Unchanged(reason)) => Ok(Outcome::Unchanged(*reason)),
            Ok(Decision::Queue { .. }) => panic!("no queue requests are generated here"),
            Err(refusal) => Err(refusal.clone()),
        };
        prop_assert!(
            expected.contains(&actual),
            "step {}: {:?} at {}: expected one of {:?}, got {:?}",
            index,
            request,
            now,
            expected,
            actual
        );

        if let Ok(Decision::Change { next, action }) = decision {
            let previous_history = spec.as_ref().map_or(&[][..], |s| s.history.as_slice());
            check_history(previous_history, &next.history, action, now)?;
            let previous_token = spec
                .as_ref()
                .map_or(first_token_at(now), |s| s.fencing_token);
            prop_assert!(next.fencing_token >= previous_token);
            prop_assert_eq!(next.environment.as_str(), ENV);
            let entry = next.history.last().expect("checked above");
            prop_assert_eq!(&entry.by, &requester(&request).user);

            match (&request, action) {
                (
                    Request::Acquire(acquire),
                    HistoryAction::Acquired
                    | HistoryAction::TookOverExpired
                    | HistoryAction::ForceAcquired,
                ) => {
                    // Property 2: expiry is honoured.
                    if !acquire.force {
                        prop_assert!(
                            model
                                .holdings
                                .iter()
                                .all(|h| h.user == acquire.actor.user || !h.live_at(now)),
                            "step {}: {} acquired while another identity held the lock",
                            index,
                            acquire.actor.user
                        );
                    }
                    let overridden = model.live(now).map(|h| (h.lock_id.clone(), h.user.clone()));
                    // A forced takeover ends the previous holding now.
                    if let Some(current) = model.current {
                        let previous = &mut model.holdings[current];
                        if now < previous.expires_at {
                            previous.ended_at = Some(now);
                        }
                    }
                    // Property 1: every earlier holding is over.
                    for earlier in &model.holdings {
                        prop_assert!(
                            earlier.end() <= now,
                            "step {}: {:?} still runs at {}",
                            index,
                            earlier,
                            now
                        );
                    }
                    // Property 4.
                    prop_assert_eq!(next.fencing_token, previous_token + 1);

                    let new = next.holder.as_ref().expect("a new holding is stored");
                    prop_assert_eq!(
                        new.overrode
                            .as_ref()
                            .map(|o| (o.lock_id.clone(), o.user.clone())),
                        overridden
                    );
                    prop_assert_eq!(&new.lock_id, &acquire.lock_id);
                    prop_assert_eq!(&new.user, &acquire.actor.user);
                    prop_assert_eq!(&new.owner, &acquire.actor.owner);
                    prop_assert_eq!(
                        new.lock_type,
                        if acquire.force {
                            LockType::Emergency
                        } else {
                            acquire.lock_type
                        }
                    );
                    prop_assert_eq!(new.acquired_at, now);
                    prop_assert_eq!(new.expires_at, now + acquire.duration);
                    prop_assert_eq!(&entry.lock_id, &acquire.lock_id);
                    prop_assert_eq!(entry.expires_at, Some(new.expires_at));
                    prop_assert!(
                        model.holdings.iter().all(|h| h.lock_id != acquire.lock_id),
                        "lock ids are never reused"
                    );

                    model.holdings.push(Holding {
                        lock_id: acquire.lock_id.clone(),
                        user: acquire.actor.user.clone(),
                        emergency: acquire.force,
                        start: now,
                        expires_at: now + acquire.duration,
                        ended_at: None,
                    });
                    model.current = Some(model.holdings.len() - 1);
                    if let Some(who) = who {
                        last_lock_id[who] = Some(acquire.lock_id.clone());
                    }
                }
                (Request::Release { .. }, HistoryAction::Released)
                | (Request::ForceRelease { .. }, HistoryAction::ForceReleased) => {
                    let current = model.current.take().expect("the oracle saw a holder");
                    let ended = &mut model.holdings[current];
                    prop_assert_eq!(&entry.lock_id, &ended.lock_id);
                    prop_assert_eq!(entry.expires_at, None);
                    if let Request::ForceRelease { reason, .. } = &request {
                        prop_assert_eq!(&entry.reason, reason);
                    }
                    ended.ended_at = Some(now);
                    prop_assert_eq!(next.holder.as_ref(), None);
                    prop_assert_eq!(next.fencing_token, previous_token);
                }
                (Request::Extend { duration, .. }, HistoryAction::Extended) => {
                    let current = model.current.expect("the oracle saw a holder");
                    let extended = &mut model.holdings[current];
                    // Property 5: only a holding still in force is extended,
                    // and never to an earlier expiry.
                    prop_assert!(now < extended.expires_at);
                    let stored = next.holder.as_ref().expect("still held");
                    prop_assert!(stored.expires_at >= extended.expires_at);
                    prop_assert!(stored.expires_at >= now + *duration);
                    prop_assert_eq!(stored.expires_at, extended.expires_at.max(now + *duration));
                    prop_assert_eq!(&stored.lock_id, &extended.lock_id);
                    prop_assert_eq!(entry.expires_at, Some(stored.expires_at));
                    prop_assert_eq!(next.fencing_token, previous_token);
                    extended.expires_at = stored.expires_at;
                }
                (Request::Clear { retention, .. }, HistoryAction::Cleared) => {
                    let current = model.current.take().expect("the oracle saw a holder");
                    let cleared = &mut model.holdings[current];
                    // Only a holding that stayed expired for the retention.
                    prop_assert!(now >= cleared.expires_at + *retention);
                    prop_assert_eq!(&entry.lock_id, &cleared.lock_id);
                    prop_assert_eq!(entry.expires_at, Some(cleared.expires_at));
                    cleared.ended_at = Some(now);
                    prop_assert_eq!(next.holder.as_ref(), None);
                    prop_assert_eq!(next.fencing_token, previous_token);
                }
                (request, action) => {
                    prop_assert!(false, "{:?} answered with {:?}", request, action)
                }
            }
            spec = Some(next);
        }
        check_agreement(spec.as_ref(), &model, now)?;
    }

    // Property 1 over the whole run: no two holdings overlap.
    for (index, a) in model.holdings.iter().enumerate() {
        for b in &model.holdings[index + 1..] {
            prop_assert!(
                a.end() <= b.start || b.end() <= a.start,
                "{:?} overlaps {:?}",
                a,
                b
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Integration tests have no lib.rs beside them: keep failures next to
        // this file (tests/lock_rules.proptest-regressions).
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_request_sequences_keep_one_holder_at_a_time(
        start_nanos in 0i64..1_000_000_000,
        steps in steps_strategy(),
    ) {
        run_scenario(start_nanos, &steps)?;
    }

    #[test]
    fn duration_in_range_accepts_exactly_whole_seconds_from_one_minute_to_seven_days(
        seconds in prop_oneof![
            -2 * MAX_DURATION_SECONDS..=2 * MAX_DURATION_SECONDS,
            MIN_DURATION_SECONDS - 2..=MIN_DURATION_SECONDS + 2,
            MAX_DURATION_SECONDS - 2..=MAX_DURATION_SECONDS + 2,
        ],
        subsec in prop_oneof![Just(0i64), -999_999_999i64..=999_999_999],
    ) {
        let duration = Duration::seconds(seconds) + nanos(subsec);
        prop_assert_eq!(duration_in_range(duration), acceptable_duration(duration));
    }

    #[test]
    fn a_holding_is_over_exactly_at_its_expiry(
        start_nanos in 0i64..86_400_000_000_000,
        duration in valid_duration(),
        force in any::<bool>(),
    ) {
        let now = t0() + nanos(start_nanos);
        let alice = person("alice");
        let request = Request::Acquire(AcquireRequest {
            force,
            ..acquire_request(&alice, "lock-a", DEPLOY_REASON, duration)
        });
        let (spec, _) = change(None, now, &request);
        let expiry = now + duration;
        let in_force = if force { LockState::ForceLocked } else { LockState::Locked };
        prop_assert_eq!(state_at(&spec, now), in_force);
        prop_assert_eq!(state_at(&spec, expiry - nanos(1)), in_force);
        prop_assert_eq!(state_at(&spec, expiry), LockState::Expired);

        let bob = person("bob");
        let takeover = acquire(&bob, "lock-b", duration);
        let renew = extend(&alice, duration, Some("lock-a"));
        let held = Box::new(holder(&spec).clone());
        prop_assert_eq!(
            outcome(decide(ENV, Some(&spec), expiry - nanos(1), &takeover)),
            Err(Refusal::HeldByOther(held.clone()))
        );
        prop_assert_eq!(
            outcome(decide(ENV, Some(&spec), expiry, &takeover)),
            Ok(Outcome::Change(HistoryAction::TookOverExpired))
        );
        prop_assert_eq!(
            outcome(decide(ENV, Some(&spec), expiry - nanos(1), &renew)),
            Ok(Outcome::Change(HistoryAction::Extended))
        );
        prop_assert_eq!(
            outcome(decide(ENV, Some(&spec), expiry, &renew)),
            Err(Refusal::ExpiredCannotExtend(held))
        );
    }
}

// ---------------------------------------------------------------------------
// The wait queue: fair order, newest-first, crashed waiters drop out
// ---------------------------------------------------------------------------

fn join(actor: &Actor, waiter_id: &str, newest_first: bool) -> Request {
    Request::JoinQueue {
        actor: actor.clone(),
        waiter_id: waiter_id.to_string(),
        reason: format!("{} wants to deploy", actor.user),
        newest_first,
    }
}

fn queued_acquire(actor: &Actor, lock_id: &str, waiter_id: &str) -> Request {
    Request::Acquire(AcquireRequest {
        waiter_id: Some(waiter_id.to_string()),
        ..acquire_request(actor, lock_id, DEPLOY_REASON, Duration::minutes(30))
    })
}

#[track_caller]
fn queue_change(
    current: &DeploymentLockSpec,
    now: DateTime<Utc>,
    request: &Request,
) -> DeploymentLockSpec {
    match decide(ENV, Some(current), now, request) {
        Ok(Decision::Queue { next }) => next,
        other => panic!("expected a queue change for {request:?}, got {other:?}"),
    }
}

/// alice holds; bob, then carol, then dave join the queue a second apart.
fn busy_environment(newest_first: bool) -> (DeploymentLockSpec, DateTime<Utc>) {
    let (mut spec, _) = change(
        None,
        t0(),
        &acquire(&person("alice"), "lock-a", Duration::minutes(30)),
    );
    for (i, who) in ["bob", "carol", "dave"].into_iter().enumerate() {
        let at = t0() + Duration::seconds(i as i64 + 1);
        spec = queue_change(&spec, at, &join(&person(who), who, newest_first));
    }
    let (released, _) = change(
        Some(&spec),
        t0() + Duration::seconds(5),
        &release(&person("alice"), None),
    );
    (released, t0() + Duration::seconds(5))
}

#[test]
fn queue_serves_waiters_first_come_first_served() {
    let (spec, now) = busy_environment(false);
    assert_eq!(spec.queue.len(), 3, "releasing keeps the queue");
    assert_eq!(next_waiter(&spec, now).map(|w| w.id.as_str()), Some("bob"));
    match refusal(
        Some(&spec),
        now,
        &queued_acquire(&person("carol"), "lock-c", "carol"),
    ) {
        Refusal::QueuedBehind { next, waiting } => {
            assert_eq!(next.owner, "bob");
            assert_eq!(waiting, 3);
        }
        other => panic!("carol should wait behind bob, got {other:?}"),
    }
    let (spec, action) = change(
        Some(&spec),
        now,
        &queued_acquire(&person("bob"), "lock-b", "bob"),
    );
    assert_eq!(action, HistoryAction::Acquired);
    assert_eq!(holder(&spec).user, "bob");
    let left: Vec<&str> = spec.queue.iter().map(|w| w.id.as_str()).collect();
    assert_eq!(left, ["carol", "dave"], "the new holder leaves the queue");
}

#[test]
fn a_client_that_did_not_queue_cannot_jump_the_queue() {
    let (spec, now) = busy_environment(false);
    assert!(matches!(
        refusal(
            Some(&spec),
            now,
            &acquire(&person("eve"), "lock-e", Duration::minutes(30))
        ),
        Refusal::QueuedBehind { .. }
    ));
    // An emergency ignores the queue, and keeps it.
    let (forced, action) = change(
        Some(&spec),
        now,
        &force_acquire(&person("eve"), "lock-e", "hotfix", Duration::minutes(30)),
    );
    assert_eq!(action, HistoryAction::ForceAcquired);
    assert_eq!(forced.queue.len(), 3);
}

#[test]
fn newest_first_serves_the_latest_waiter() {
    let (spec, now) = busy_environment(true);
    assert_eq!(next_waiter(&spec, now).map(|w| w.id.as_str()), Some("dave"));
    assert!(matches!(
        refusal(
            Some(&spec),
            now,
            &queued_acquire(&person("bob"), "lock-b", "bob")
        ),
        Refusal::QueuedBehind { .. }
    ));
    let (spec, _) = change(
        Some(&spec),
        now,
        &queued_acquire(&person("dave"), "lock-d", "dave"),
    );
    assert_eq!(holder(&spec).user, "dave");
}

#[test]
fn a_crashed_waiter_drops_out_after_its_heartbeat_times_out() {
    let (spec, now) = busy_environment(false);
    // bob stops beating; carol keeps beating.
    let bob_gone = t0() + Duration::seconds(1 + WAITER_TIMEOUT_SECONDS);
    let spec = queue_change(
        &spec,
        bob_gone - Duration::seconds(2),
        &join(&person("carol"), "carol", false),
    );
    assert!(now < bob_gone - Duration::seconds(2));
    assert!(matches!(
        refusal(
            Some(&spec),
            bob_gone - nanos(1),
            &queued_acquire(&person("carol"), "lock-c", "carol")
        ),
        Refusal::QueuedBehind { .. }
    ));
    let (spec, _) = change(
        Some(&spec),
        bob_gone,
        &queued_acquire(&person("carol"), "lock-c", "carol"),
    );
    assert_eq!(holder(&spec).user, "carol");
    // Its place is removed a little later: the admission policy judges
    // staleness on a clock that may trail the server's.
    assert!(
        spec.queue.iter().any(|w| w.id == "bob"),
        "the stale waiter's place is kept for the prune grace"
    );
    let later = bob_gone + Duration::seconds(WAITER_PRUNE_GRACE_SECONDS);
    let spec = queue_change(&spec, later, &join(&person("dave"), "dave", false));
    assert!(
        spec.queue.iter().all(|w| w.id != "bob"),
        "the stale waiter is dropped after the prune grace"
    );
}

#[test]
fn leaving_the_queue_gives_up_the_place() {
    let (spec, now) = busy_environment(false);
    let spec = queue_change(
        &spec,
        now,
        &Request::LeaveQueue {
            waiter_id: "bob".into(),
        },
    );
    assert_eq!(
        next_waiter(&spec, now).map(|w| w.id.as_str()),
        Some("carol")
    );
    assert_eq!(
        decide(
            ENV,
            Some(&spec),
            now,
            &Request::LeaveQueue {
                waiter_id: "bob".into()
            }
        ),
        Ok(Decision::Unchanged(NoChange::NotQueued))
    );
    assert_eq!(
        spec.history.len(),
        2,
        "queue changes leave no history entry"
    );
}

// ---------------------------------------------------------------------------
// Hostile data: any object the schema admits, any request: no panic
// ---------------------------------------------------------------------------

/// Instants anywhere in the range the schema's date-time pattern admits
/// (years 0001-9999), including the edges.
fn any_instant() -> impl Strategy<Value = DateTime<Utc>> {
    let first = -62_135_596_800_i64; // 0001-01-01T00:00:00Z
    let last = 253_402_300_799_i64; // 9999-12-31T23:59:59Z
    prop_oneof![
        Just(first),
        Just(last),
        first..=last,
        1_700_000_000_i64..1_900_000_000,
    ]
    .prop_map(|seconds| DateTime::from_timestamp(seconds, 0).unwrap_or(DateTime::<Utc>::MIN_UTC))
}

/// Counters anywhere in the schema's range, edges included.
fn any_counter() -> impl Strategy<Value = i64> {
    let max = deploylock::crd::MAX_SAFE_INTEGER;
    prop_oneof![Just(0), Just(max), Just(max - 1), 0..=max]
}

fn any_hostile_spec() -> impl Strategy<Value = DeploymentLockSpec> {
    (
        any_instant(),
        any_instant(),
        60_i64..=604_800,
        any_counter(),
        any_counter(),
        prop::collection::vec((any_instant(), any_instant(), any::<bool>()), 0..6),
        any::<bool>(),
        prop_oneof![
            Just(LockType::Manual),
            Just(LockType::Automatic),
            Just(LockType::Emergency)
        ],
    )
        .prop_map(
            |(acquired_at, expires_at, duration, token, sequence, waiters, held, lock_type)| {
                let holder = held.then(|| LockHolder {
                    lock_id: "lock-x".into(),
                    user: "mallory".into(),
                    owner: "mallory".into(),
                    lock_type,
                    reason: "hostile".into(),
                    acquired_at,
                    expires_at,
                    duration_seconds: duration,
                    deployment_id: None,
                    metadata: BTreeMap::new(),
                    overrode: None,
                });
                DeploymentLockSpec {
                    environment: ENV.into(),
                    holder,
                    fencing_token: token,
                    queue: waiters
                        .into_iter()
                        .enumerate()
                        .map(|(i, (since, heartbeat_at, newest_first))| Waiter {
                            id: format!("w{i}"),
                            user: format!("user{i}"),
                            owner: format!("user{i}"),
                            reason: "wait".into(),
                            since,
                            heartbeat_at,
                            newest_first,
                        })
                        .collect(),
                    history: vec![HistoryEntry {
                        sequence,
                        action: HistoryAction::Acquired,
                        at: acquired_at,
                        lock_id: "lock-x".into(),
                        by: "mallory".into(),
                        owner: "mallory".into(),
                        reason: "hostile".into(),
                        expires_at: Some(expires_at),
                    }],
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..ProptestConfig::default()
    })]

    /// Whatever the schema lets a hostile writer store, the rules decide
    /// every request without panicking, and never write a counter beyond
    /// JSON's safe integer range.
    #[test]
    fn hostile_objects_never_make_the_rules_panic(
        spec in any_hostile_spec(),
        now in any_instant(),
        duration in 60_i64..=604_800,
    ) {
        let mallory = person("mallory");
        let alice = person("alice");
        let duration = Duration::seconds(duration);
        let mut forced = acquire_request(&alice, "lock-f", "hotfix", duration);
        forced.force = true;
        let requests = vec![
            Request::Acquire(acquire_request(&alice, "lock-a", "deploy", duration)),
            Request::Acquire(forced),
            release(&mallory, None),
            force_release(&alice, "incident"),
            extend(&mallory, duration, None),
            clear("lock-x", Duration::hours(1)),
            Request::JoinQueue {
                actor: alice.clone(),
                waiter_id: "w-alice".into(),
                reason: "wait".into(),
                newest_first: false,
            },
            Request::LeaveQueue { waiter_id: "w0".into() },
        ];
        let _ = state_at(&spec, now);
        let _ = next_waiter(&spec, now);
        for request in &requests {
            for current in [Some(&spec), None] {
                if let Ok(Decision::Change { next, .. } | Decision::Queue { next }) =
                    decide(ENV, current, now, request)
                {
                    prop_assert!(next.fencing_token <= deploylock::crd::MAX_SAFE_INTEGER);
                    prop_assert!(next
                        .history
                        .iter()
                        .all(|entry| entry.sequence <= deploylock::crd::MAX_SAFE_INTEGER));
                }
            }
        }
    }

    /// The strict date-time parser accepts exactly what it writes and never
    /// panics on anything else.
    #[test]
    fn the_stored_date_time_form_round_trips(instant in any_instant(), junk in ".{0,40}") {
        let written = instant.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        prop_assert_eq!(deploylock::crd::parse_time(&written), Some(instant));
        let _ = deploylock::crd::parse_time(&junk);
        prop_assert_eq!(deploylock::crd::parse_time(&format!("{written}T")), None);
        prop_assert_eq!(deploylock::crd::parse_time("0000-01-01T00:00:00Z"), None);
    }
}
