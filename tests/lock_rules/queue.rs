//! The wait queue: fair order, newest-first, crashed waiters drop out.

use super::*;

pub(crate) fn join(actor: &Actor, waiter_id: &str, newest_first: bool) -> Request {
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
pub(crate) fn queue_change(
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

#[test]
fn a_freeze_windows_place_is_served_before_every_other() {
    let window = person(deploylock::windows::WINDOW_HOLDER);
    let (mut spec, _) = change(
        None,
        t0(),
        &acquire(&person("alice"), "lock-a", Duration::minutes(30)),
    );
    // bob first in line, the window next, carol newest-first after it.
    spec = queue_change(
        &spec,
        t0() + Duration::seconds(1),
        &join(&person("bob"), "bob", false),
    );
    spec = queue_change(
        &spec,
        t0() + Duration::seconds(2),
        &join(&window, "window", false),
    );
    spec = queue_change(
        &spec,
        t0() + Duration::seconds(3),
        &join(&person("carol"), "carol", true),
    );
    let now = t0() + Duration::seconds(5);
    let (spec, _) = change(Some(&spec), now, &release(&person("alice"), None));
    assert_eq!(
        next_waiter(&spec, now).map(|w| w.id.as_str()),
        Some("window")
    );
    for (who, place) in [("bob", "bob"), ("carol", "carol")] {
        match refusal(
            Some(&spec),
            now,
            &queued_acquire(&person(who), "lock-x", place),
        ) {
            Refusal::QueuedBehind { next, .. } => assert_eq!(next.id, "window"),
            other => panic!("{who} was not kept behind the window: {other:?}"),
        }
    }
    let (taken, _) = change(
        Some(&spec),
        now,
        &queued_acquire(&window, "lock-w", "window"),
    );
    assert_eq!(taken.holder.map(|h| h.user), Some(window.user));
}

/// One user holds at most MAX_QUEUE_PLACES_PER_USER places of a queue (one
/// identity cannot fill it and lock everyone else out); others still join,
/// and a lapsed place of that user no longer counts.
#[test]
fn one_user_cannot_fill_the_queue() {
    use deploylock::crd::MAX_QUEUE_PLACES_PER_USER;
    let (mut spec, _) = change(
        None,
        t0(),
        &acquire(&person("alice"), "lock-a", Duration::minutes(30)),
    );
    let bob = person("bob");
    for i in 0..MAX_QUEUE_PLACES_PER_USER {
        spec = queue_change(&spec, t0(), &join(&bob, &format!("bob-{i}"), false));
    }
    assert_eq!(
        refusal(Some(&spec), t0(), &join(&bob, "bob-more", false)),
        Refusal::TooManyPlaces
    );
    let with_carol = queue_change(&spec, t0(), &join(&person("carol"), "carol", false));
    assert_eq!(with_carol.queue.len(), MAX_QUEUE_PLACES_PER_USER + 1);
    // A minute later bob's places have lapsed: his new one is taken.
    let later = t0() + Duration::minutes(1);
    let rejoined = queue_change(&spec, later, &join(&bob, "bob-again", false));
    assert_eq!(rejoined.queue.len(), 1);
}
