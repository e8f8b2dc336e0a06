//! Use cases: each request on each kind of lock, as a person would meet it.

use super::queue::{join, queue_change};
use super::*;

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
