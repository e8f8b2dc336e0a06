//! What is due for one subscription and one lock: the history entries after
//! the subscription's cursor (in sequence order), the expiry the controller
//! observed, and the reminder for a long-held lock. Pure, so the property
//! tests can check that nothing is skipped, repeated or reordered.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};

use super::payload::{Message, Occurrence};
use super::{DeliveryCursor, NotificationSubscriptionSpec, NotifyEvent, Reminder};
use crate::crd::{DeploymentLock, HistoryAction, HistoryEntry, LockState, LockType, Waiter};

/// One thing to do, in order: send `message` (absent when the subscription
/// does not ask for this transition) and then record `cursor`.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub message: Option<Message>,
    pub cursor: DeliveryCursor,
}

/// What is due for one lock.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Runs of history entries that were dropped from the lock (it keeps
    /// 20) before they could be delivered and that no journal filled in:
    /// `(first missing, last missing)`, in order.
    pub gaps: Vec<(i64, i64)>,
    /// The next instant (API server clock) something becomes due by itself
    /// (a reminder).
    pub next_due: Option<DateTime<Utc>>,
}

/// Idempotency key of a history entry.
pub fn history_key(uid: &str, sequence: i64) -> String {
    format!("{uid}-{sequence}")
}

/// Idempotency key of a holding's expiry.
pub fn expired_key(uid: &str, lock_id: &str) -> String {
    format!("{uid}-expired-{lock_id}")
}

/// Idempotency key of the `number`th reminder for a holding.
pub fn reminder_key(uid: &str, lock_id: &str, number: i64) -> String {
    format!("{uid}-reminder-{lock_id}-{number}")
}

/// Idempotency key of a queue place.
pub fn queued_key(uid: &str, waiter_id: &str) -> String {
    format!("{uid}-queued-{waiter_id}")
}

/// The cursor of a lock first seen by a subscription: what happened before
/// the subscription was created counts as handled (no flood of old news).
pub fn initial_cursor(lock: &DeploymentLock, uid: &str, since: DateTime<Utc>) -> DeliveryCursor {
    let sequence = lock
        .spec
        .history
        .iter()
        .filter(|entry| entry.at < since)
        .map(|entry| entry.sequence)
        .max()
        .unwrap_or(0);
    let expired_lock_id = lock
        .spec
        .holder
        .as_ref()
        .filter(|holder| holder.expires_at < since)
        .map(|holder| holder.lock_id.clone());
    let queued_ids = lock
        .spec
        .queue
        .iter()
        .filter(|waiter| waiter.since < since)
        .map(|waiter| waiter.id.clone())
        .collect();
    DeliveryCursor {
        lock_uid: uid.to_string(),
        environment: lock.spec.environment.clone(),
        sequence,
        expired_lock_id,
        reminder_lock_id: None,
        reminder_count: None,
        queued_ids,
    }
}

fn state_after(action: HistoryAction, lock_type: Option<LockType>) -> LockState {
    match action {
        HistoryAction::Released | HistoryAction::ForceReleased | HistoryAction::Cleared => {
            LockState::Available
        }
        HistoryAction::ForceAcquired => LockState::ForceLocked,
        _ if lock_type == Some(LockType::Emergency) => LockState::ForceLocked,
        _ => LockState::Locked,
    }
}

/// The message for one history entry; holding details come from the
/// current holder when the entry is about it.
pub fn history_message(lock: &DeploymentLock, uid: &str, entry: &HistoryEntry) -> Message {
    let holder = lock
        .spec
        .holder
        .as_ref()
        .filter(|holder| holder.lock_id == entry.lock_id);
    let lock_type = holder.map(|h| h.lock_type);
    let releasing = matches!(
        entry.action,
        HistoryAction::Released | HistoryAction::ForceReleased | HistoryAction::Cleared
    );
    Message {
        key: history_key(uid, entry.sequence),
        occurrence: Occurrence::Transition(entry.action),
        namespace: lock.metadata.namespace.clone().unwrap_or_default(),
        environment: lock.spec.environment.clone(),
        lock_uid: uid.to_string(),
        sequence: Some(entry.sequence),
        at: entry.at,
        state: state_after(entry.action, lock_type),
        lock_id: Some(entry.lock_id.clone()),
        by: Some(entry.by.clone()),
        owner: Some(entry.owner.clone()),
        reason: Some(entry.reason.clone()),
        lock_type,
        acquired_at: holder.map(|h| h.acquired_at),
        expires_at: if releasing { None } else { entry.expires_at },
        deployment_id: holder.and_then(|h| h.deployment_id.clone()),
        overridden: holder
            .filter(|_| entry.action == HistoryAction::ForceAcquired)
            .and_then(|h| h.overrode.clone()),
        waiter_id: None,
        waiting_for: None,
    }
}

fn holding_message(
    lock: &DeploymentLock,
    uid: &str,
    key: String,
    occurrence: Occurrence,
    at: DateTime<Utc>,
    state: LockState,
) -> Option<Message> {
    let holder = lock.spec.holder.as_ref()?;
    Some(Message {
        key,
        occurrence,
        namespace: lock.metadata.namespace.clone().unwrap_or_default(),
        environment: lock.spec.environment.clone(),
        lock_uid: uid.to_string(),
        sequence: None,
        at,
        state,
        lock_id: Some(holder.lock_id.clone()),
        by: Some(holder.user.clone()),
        owner: Some(holder.owner.clone()),
        reason: Some(holder.reason.clone()),
        lock_type: Some(holder.lock_type),
        acquired_at: Some(holder.acquired_at),
        expires_at: Some(holder.expires_at),
        deployment_id: holder.deployment_id.clone(),
        overridden: holder.overrode.clone(),
        waiter_id: None,
        waiting_for: None,
    })
}

/// The message for a new place in the wait queue (`place`: 1, 2, ...).
pub fn queued_message(
    lock: &DeploymentLock,
    uid: &str,
    waiter: &Waiter,
    place: usize,
    now: DateTime<Utc>,
) -> Message {
    let holder = lock.spec.holder.as_ref().filter(|h| now < h.expires_at);
    let state = match holder {
        Some(h) if h.lock_type == LockType::Emergency => LockState::ForceLocked,
        Some(_) => LockState::Locked,
        None => LockState::Available,
    };
    Message {
        key: queued_key(uid, &waiter.id),
        occurrence: Occurrence::WaiterQueued(place),
        namespace: lock.metadata.namespace.clone().unwrap_or_default(),
        environment: lock.spec.environment.clone(),
        lock_uid: uid.to_string(),
        sequence: None,
        at: waiter.since,
        state,
        lock_id: None,
        by: Some(waiter.user.clone()),
        owner: Some(waiter.owner.clone()),
        reason: Some(waiter.reason.clone()),
        lock_type: None,
        acquired_at: None,
        expires_at: None,
        deployment_id: None,
        overridden: None,
        waiter_id: Some(waiter.id.clone()),
        waiting_for: holder.map(|h| h.owner.clone()),
    }
}

/// A plan being built: each step records the cursor as it stands after it.
struct Planning<'a> {
    lock: &'a DeploymentLock,
    uid: &'a str,
    wanted: BTreeSet<NotifyEvent>,
    current: DeliveryCursor,
    plan: Plan,
}

impl Planning<'_> {
    fn push(&mut self, message: Option<Message>) {
        self.plan.steps.push(Step {
            message,
            cursor: self.current.clone(),
        });
    }

    /// The history entries after the cursor, in sequence order; a gap
    /// wherever an entry is not the next one (before the first, or inside a
    /// history that a journal filled in).
    fn history(&mut self, after: i64) {
        let (lock, uid) = (self.lock, self.uid);
        let mut entries: Vec<&HistoryEntry> = lock
            .spec
            .history
            .iter()
            .filter(|entry| entry.sequence > after)
            .collect();
        entries.sort_by_key(|entry| entry.sequence);
        let mut next = after.saturating_add(1);
        for entry in entries {
            if entry.sequence > next {
                self.plan.gaps.push((next, entry.sequence - 1));
            }
            next = entry.sequence.saturating_add(1);
            self.current.sequence = entry.sequence;
            let message = self
                .wanted
                .contains(&NotifyEvent::from(entry.action))
                .then(|| history_message(lock, uid, entry));
            self.push(message);
        }
    }

    /// The expiry of the current holding, once the controller observed it.
    fn expiry(&mut self) {
        let (lock, uid) = (self.lock, self.uid);
        let status = lock.status.as_ref();
        let Some(holder) = &lock.spec.holder else {
            return;
        };
        if status.and_then(|s| s.state) != Some(LockState::Expired)
            || status.and_then(|s| s.lock_id.as_deref()) != Some(holder.lock_id.as_str())
            || self.current.expired_lock_id.as_deref() == Some(holder.lock_id.as_str())
        {
            return;
        }
        self.current.expired_lock_id = Some(holder.lock_id.clone());
        let message = if self.wanted.contains(&NotifyEvent::Expired) {
            holding_message(
                lock,
                uid,
                expired_key(uid, &holder.lock_id),
                Occurrence::Expired,
                holder.expires_at,
                LockState::Expired,
            )
        } else {
            None
        };
        self.push(message);
    }

    /// Each new place in the wait queue.
    fn queue(&mut self, now: DateTime<Utc>) {
        let (lock, uid) = (self.lock, self.uid);
        // Queue order: newest-first waiters are served first, so "place" is
        // each waiter's position as the lock shows the queue.
        for (index, waiter) in lock.spec.queue.iter().enumerate() {
            if self.current.queued_ids.contains(&waiter.id) {
                continue;
            }
            self.current.queued_ids.push(waiter.id.clone());
            let message = queued_message(lock, uid, waiter, index.saturating_add(1), now);
            self.push(Some(message));
        }
    }

    /// The reminder due for a long-held lock, if any not yet sent, and when
    /// the next one falls due.
    fn reminder(&mut self, reminder: &Reminder, now: DateTime<Utc>) {
        let (lock, uid) = (self.lock, self.uid);
        let Some(holder) = lock.spec.holder.as_ref().filter(|h| now < h.expires_at) else {
            return;
        };
        let first = holder.acquired_at + Duration::seconds(reminder.after_seconds);
        if now < first {
            self.plan.next_due = Some(first);
            return;
        }
        let held_past = (now - first).num_seconds();
        let number = match reminder.repeat_seconds {
            Some(every) if every > 0 => 1 + held_past / every,
            _ => 1,
        };
        let sent = if self.current.reminder_lock_id.as_deref() == Some(holder.lock_id.as_str()) {
            self.current.reminder_count.unwrap_or(0)
        } else {
            0
        };
        if number > sent {
            self.current.reminder_lock_id = Some(holder.lock_id.clone());
            self.current.reminder_count = Some(number);
            let state = if holder.lock_type == LockType::Emergency {
                LockState::ForceLocked
            } else {
                LockState::Locked
            };
            let message = holding_message(
                lock,
                uid,
                reminder_key(uid, &holder.lock_id, number),
                Occurrence::Reminder(number),
                now,
                state,
            );
            self.push(message);
        }
        if let Some(every) = reminder.repeat_seconds.filter(|every| *every > 0) {
            let next = first + Duration::seconds(every.saturating_mul(number));
            if next < holder.expires_at {
                self.plan.next_due = Some(next);
            }
        }
    }
}

/// What is due for `lock` under `spec`, after `cursor`, at `now` (API
/// server clock): history entries, the observed expiry, new queue places,
/// then a reminder.
pub fn plan(
    spec: &NotificationSubscriptionSpec,
    lock: &DeploymentLock,
    uid: &str,
    cursor: &DeliveryCursor,
    now: DateTime<Utc>,
) -> Plan {
    let wanted = spec.wanted();
    let mut current = cursor.clone();
    current.environment = lock.spec.environment.clone();
    // Places that left the queue are forgotten (the list stays bounded by
    // the queue's); the change rides on the next step's cursor.
    let wants_queue = wanted.contains(&NotifyEvent::WaiterQueued);
    current
        .queued_ids
        .retain(|id| wants_queue && lock.spec.queue.iter().any(|waiter| &waiter.id == id));
    let forgot = current.queued_ids != cursor.queued_ids;
    let mut planning = Planning {
        lock,
        uid,
        wanted,
        current,
        plan: Plan::default(),
    };
    planning.history(cursor.sequence);
    planning.expiry();
    if wants_queue {
        planning.queue(now);
    }
    if let Some(reminder) = &spec.reminder {
        planning.reminder(reminder, now);
    }
    if forgot && planning.plan.steps.is_empty() {
        planning.push(None);
    }
    planning.plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DeploymentLockSpec, LockHolder};
    use crate::notify::{Provider, Reminder};
    use proptest::prelude::*;

    fn t(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn entry(sequence: i64, action: HistoryAction) -> HistoryEntry {
        HistoryEntry {
            sequence,
            action,
            at: t(sequence * 10),
            lock_id: format!("l{sequence}"),
            by: "alice".into(),
            owner: "alice".into(),
            reason: "deploy".into(),
            expires_at: Some(t(sequence * 10 + 600)),
        }
    }

    fn lock(history: Vec<HistoryEntry>, holder: Option<LockHolder>) -> DeploymentLock {
        let mut lock = DeploymentLock::new(
            "production",
            DeploymentLockSpec {
                environment: "production".into(),
                holder,
                fencing_token: 1,
                queue: vec![],
                history,
            },
        );
        lock.metadata.namespace = Some("team".into());
        lock
    }

    fn holder(acquired: i64, expires: i64) -> LockHolder {
        LockHolder {
            lock_id: "h1".into(),
            user: "alice".into(),
            owner: "alice".into(),
            lock_type: LockType::Manual,
            reason: "deploy".into(),
            acquired_at: t(acquired),
            expires_at: t(expires),
            duration_seconds: 600,
            deployment_id: Some("run-1".into()),
            metadata: Default::default(),
            overrode: None,
            group_id: None,
        }
    }

    fn spec() -> NotificationSubscriptionSpec {
        NotificationSubscriptionSpec {
            provider: Provider::default(),
            ..Default::default()
        }
    }

    fn keys(plan: &Plan) -> Vec<String> {
        plan.steps
            .iter()
            .filter_map(|s| s.message.as_ref().map(|m| m.key.clone()))
            .collect()
    }

    #[test]
    fn new_subscription_skips_older_history() {
        let lock = lock(
            vec![
                entry(1, HistoryAction::Acquired),
                entry(2, HistoryAction::Released),
            ],
            None,
        );
        let cursor = initial_cursor(&lock, "u", t(15));
        assert_eq!(cursor.sequence, 1);
        let plan = plan(&spec(), &lock, "u", &cursor, t(100));
        assert_eq!(keys(&plan), vec!["u-2"]);
    }

    #[test]
    fn filtered_transitions_advance_the_cursor_without_a_message() {
        let mut spec = spec();
        spec.events = vec![NotifyEvent::Transition(HistoryAction::Released)];
        let lock = lock(
            vec![
                entry(1, HistoryAction::Acquired),
                entry(2, HistoryAction::Released),
            ],
            None,
        );
        let plan = plan(&spec, &lock, "u", &DeliveryCursor::default(), t(100));
        assert_eq!(keys(&plan), vec!["u-2"]);
        assert_eq!(plan.steps.last().unwrap().cursor.sequence, 2);
    }

    #[test]
    fn gap_is_reported() {
        let lock = lock(vec![entry(5, HistoryAction::Acquired)], None);
        let cursor = DeliveryCursor {
            sequence: 2,
            ..Default::default()
        };
        assert_eq!(
            plan(&spec(), &lock, "u", &cursor, t(100)).gaps,
            vec![(3, 4)]
        );
    }

    #[test]
    fn a_hole_inside_a_filled_in_history_is_reported_and_the_rest_delivered() {
        // A journal saw 3..=4 and the lock holds 8..=9: 5..=7 no one saw.
        let lock = lock(
            [3, 4, 8, 9]
                .map(|sequence| entry(sequence, HistoryAction::Extended))
                .to_vec(),
            None,
        );
        let cursor = DeliveryCursor {
            sequence: 2,
            ..Default::default()
        };
        let plan = plan(&spec(), &lock, "u", &cursor, t(100));
        assert_eq!(plan.gaps, vec![(5, 7)]);
        let sequences: Vec<i64> = plan.steps.iter().map(|step| step.cursor.sequence).collect();
        assert_eq!(sequences, vec![3, 4, 8, 9]);
    }

    #[test]
    fn expiry_is_announced_once_per_holding() {
        let mut lock = lock(vec![entry(1, HistoryAction::Acquired)], Some(holder(0, 60)));
        lock.status = Some(crate::crd::DeploymentLockStatus {
            state: Some(LockState::Expired),
            lock_id: Some("h1".into()),
            ..Default::default()
        });
        let first = plan(&spec(), &lock, "u", &DeliveryCursor::default(), t(100));
        assert_eq!(keys(&first), vec!["u-1", "u-expired-h1"]);
        let after = first.steps.last().unwrap().cursor.clone();
        assert!(plan(&spec(), &lock, "u", &after, t(200)).steps.is_empty());
    }

    #[test]
    fn reminders_repeat_while_held_and_stop_after_release() {
        let mut spec = spec();
        spec.reminder = Some(Reminder {
            after_seconds: 100,
            repeat_seconds: Some(50),
        });
        let held = lock(vec![], Some(holder(0, 1000)));
        let early = plan(&spec, &held, "u", &DeliveryCursor::default(), t(99));
        assert!(early.steps.is_empty());
        assert_eq!(early.next_due, Some(t(100)));
        let first = plan(&spec, &held, "u", &DeliveryCursor::default(), t(120));
        assert_eq!(keys(&first), vec!["u-reminder-h1-1"]);
        assert_eq!(first.next_due, Some(t(150)));
        let cursor = first.steps[0].cursor.clone();
        assert!(plan(&spec, &held, "u", &cursor, t(140)).steps.is_empty());
        assert_eq!(
            keys(&plan(&spec, &held, "u", &cursor, t(151))),
            vec!["u-reminder-h1-2"]
        );
        let released = lock(vec![], None);
        let after = plan(&spec, &released, "u", &cursor, t(400));
        assert!(after.steps.is_empty() && after.next_due.is_none());
    }

    fn waiter(id: &str, since: i64) -> Waiter {
        Waiter {
            id: id.into(),
            user: "bob".into(),
            owner: "bob-ci".into(),
            reason: "release 2.2".into(),
            since: t(since),
            heartbeat_at: t(since),
            newest_first: false,
        }
    }

    #[test]
    fn each_queue_place_is_announced_once_and_forgotten_when_it_leaves() {
        let mut held = lock(vec![], Some(holder(0, 1000)));
        held.spec.queue = vec![waiter("w1", 10)];
        let first = plan(&spec(), &held, "u", &DeliveryCursor::default(), t(20));
        assert_eq!(keys(&first), vec!["u-queued-w1"]);
        let message = first.steps[0].message.as_ref().unwrap();
        assert_eq!(message.occurrence, Occurrence::WaiterQueued(1));
        assert_eq!(message.by.as_deref(), Some("bob"));
        assert_eq!(message.reason.as_deref(), Some("release 2.2"));
        assert_eq!(message.waiting_for.as_deref(), Some("alice"));
        let cursor = first.steps[0].cursor.clone();
        // A heartbeat changes nothing; a second waiter is announced alone.
        held.spec.queue[0].heartbeat_at = t(25);
        assert!(plan(&spec(), &held, "u", &cursor, t(25)).steps.is_empty());
        held.spec.queue.push(waiter("w2", 30));
        let second = plan(&spec(), &held, "u", &cursor, t(30));
        assert_eq!(keys(&second), vec!["u-queued-w2"]);
        let cursor = second.steps[0].cursor.clone();
        // w1 leaves: its ID is forgotten without a message.
        held.spec.queue.remove(0);
        let left = plan(&spec(), &held, "u", &cursor, t(40));
        assert_eq!(keys(&left), Vec::<String>::new());
        assert_eq!(left.steps.len(), 1);
        assert_eq!(left.steps[0].cursor.queued_ids, vec!["w2".to_string()]);
    }

    #[test]
    fn queue_places_are_neither_announced_nor_tracked_unless_asked_for() {
        let mut spec = spec();
        spec.events = vec![NotifyEvent::Transition(HistoryAction::Acquired)];
        let mut held = lock(vec![], Some(holder(0, 1000)));
        held.spec.queue = vec![waiter("w1", 10)];
        let plan = plan(&spec, &held, "u", &DeliveryCursor::default(), t(20));
        assert!(plan.steps.is_empty());
    }

    #[test]
    fn places_taken_before_the_subscription_count_as_announced() {
        let mut held = lock(vec![], Some(holder(0, 1000)));
        held.spec.queue = vec![waiter("old", 10), waiter("new", 30)];
        let cursor = initial_cursor(&held, "u", t(20));
        assert_eq!(cursor.queued_ids, vec!["old".to_string()]);
        let plan = plan(&spec(), &held, "u", &cursor, t(40));
        assert_eq!(keys(&plan), vec!["u-queued-new"]);
        assert_eq!(
            plan.steps[0].message.as_ref().unwrap().occurrence,
            Occurrence::WaiterQueued(2)
        );
    }

    proptest! {
        /// Delivering plans step by step, with the history growing and old
        /// entries dropped, announces every entry still present exactly
        /// once, in sequence order.
        #[test]
        fn every_entry_once_in_order(batches in proptest::collection::vec(1usize..8, 1..12)) {
            let mut history = Vec::new();
            let mut cursor = DeliveryCursor::default();
            let mut delivered = Vec::new();
            let mut next = 1;
            for batch in batches {
                for _ in 0..batch {
                    history.push(entry(next, HistoryAction::Extended));
                    next += 1;
                }
                while history.len() > 20 {
                    history.remove(0);
                }
                let lock = lock(history.clone(), None);
                let plan = plan(&spec(), &lock, "u", &cursor, t(0));
                prop_assert!(plan.gaps.is_empty());
                for step in plan.steps {
                    if let Some(message) = step.message {
                        delivered.push(message.sequence.unwrap());
                    }
                    cursor = step.cursor;
                }
            }
            let expected: Vec<i64> = (1..next).collect();
            prop_assert_eq!(delivered, expected);
        }
    }
}
