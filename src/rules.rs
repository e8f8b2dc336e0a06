//! The lock rules, free of I/O: given the lock as stored, the time on the API
//! server's clock and a request, what is the next lock, or why not.
//!
//! Every transition of a DeploymentLock is decided here; the CLI and the
//! controller only read, call [`decide`] or [`state_at`], and write the result
//! under the `resourceVersion` they read.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};

use crate::crd::{
    DeploymentLockSpec, FENCING_BASE_LEAD_SECONDS, FENCING_TOKENS_PER_SECOND, HistoryAction,
    HistoryEntry, LockHolder, LockState, LockType, MAX_DURATION_SECONDS, MAX_HISTORY_ENTRIES,
    MAX_QUEUE_ENTRIES, MAX_QUEUE_PLACES_PER_USER, MAX_SAFE_INTEGER, MIN_DURATION_SECONDS,
    OverriddenHolding, Waiter,
};

/// A waiter whose heartbeat is older than this has dropped out of the queue:
/// a crashed waiter never blocks the others for longer.
pub const WAITER_TIMEOUT_SECONDS: i64 = 15;

/// A dropped-out waiter's place is removed from the queue only this much
/// later: the admission policy judges staleness on the controller's clock,
/// which may trail the API server's by a second or two.
pub const WAITER_PRUNE_GRACE_SECONDS: i64 = 5;

/// Who is asking: the identity the API server authenticated, and the label
/// shown to people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// Username the API server sees for the caller.
    pub user: String,
    /// Display label (`--owner`); the username when not given.
    pub owner: String,
}

impl Actor {
    pub fn new(user: impl Into<String>, owner: Option<String>) -> Self {
        let user = user.into();
        let owner = owner.unwrap_or_else(|| user.clone());
        Actor { user, owner }
    }
}

/// A request to take the lock.
#[derive(Clone, Debug, PartialEq)]
pub struct AcquireRequest {
    pub actor: Actor,
    /// ID for the new holding, chosen by the caller so that this module stays
    /// deterministic.
    pub lock_id: String,
    /// Manual (a person or a pipeline step) or automatic (`deploylock exec`).
    /// A forced request always makes an emergency holding.
    pub lock_type: LockType,
    /// Emergency takeover: overrides a normal holding.
    pub force: bool,
    pub reason: String,
    pub duration: Duration,
    pub deployment_id: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// The caller's place in the wait queue, if it joined it. When others
    /// wait, a free lock goes only to the waiter whose turn it is.
    pub waiter_id: Option<String>,
    /// The holding ends at this instant at the latest (its duration is cut
    /// to the whole seconds left): a freeze window's end.
    pub not_after: Option<DateTime<Utc>>,
    /// The lock group ID of a multi-environment acquire (the same on each
    /// of its holdings).
    pub group_id: Option<String>,
}

/// Everything a client may ask of a lock.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    Acquire(AcquireRequest),
    /// Give the lock back. With `lock_id`, only that holding is released.
    Release {
        actor: Actor,
        lock_id: Option<String>,
    },
    /// Release a lock one does not hold (an admin's emergency action).
    ForceRelease {
        actor: Actor,
        reason: String,
    },
    /// Move the expiry to at least `now + duration` (but not past
    /// `not_after`).
    Extend {
        actor: Actor,
        duration: Duration,
        lock_id: Option<String>,
        not_after: Option<DateTime<Utc>>,
    },
    /// `acquire --extend`: extend one's holding like `Extend`, or, when it
    /// expired and is still the lock's holding (nobody took it over, the
    /// controller did not clear it) and nobody waits for the lock, renew it:
    /// same lock ID and fencing token, `expiresAt = now + duration`, an
    /// `Extended` history entry.
    Renew {
        actor: Actor,
        duration: Duration,
    },
    /// Join the wait queue, or renew one's heartbeat in it.
    JoinQueue {
        actor: Actor,
        waiter_id: String,
        reason: String,
        newest_first: bool,
    },
    /// Leave the wait queue (gave up, timed out, interrupted).
    LeaveQueue {
        waiter_id: String,
    },
    /// The controller's housekeeping: clear a holding that has been expired
    /// for at least `retention`.
    Clear {
        actor: Actor,
        lock_id: String,
        retention: Duration,
    },
}

/// Why a request was refused. Each carries what a person needs to decide what
/// to do next.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("the lock is held by {}", .0.owner)]
    HeldByOther(Box<LockHolder>),
    #[error("you already hold this lock")]
    AlreadyHeldByYou(Box<LockHolder>),
    #[error("an emergency lock held by {} is in force", .0.owner)]
    EmergencyLockInForce(Box<LockHolder>),
    #[error("the lock is held by {}, not by you", .0.owner)]
    NotHolder(Box<LockHolder>),
    #[error("the holding {expected_lock_id} is over")]
    LockLost {
        expected_lock_id: String,
        current: Option<Box<LockHolder>>,
    },
    #[error("the lock is not held")]
    NotHeld,
    #[error("the lock expired at {}", .0.expires_at)]
    ExpiredCannotExtend(Box<LockHolder>),
    #[error("a reason is required")]
    ReasonRequired,
    #[error("duration must be between {MIN_DURATION_SECONDS}s and {MAX_DURATION_SECONDS}s")]
    DurationOutOfRange,
    #[error("{waiting} client(s) are waiting for the lock; {} is next", .next.owner)]
    QueuedBehind { next: Box<Waiter>, waiting: usize },
    #[error("the wait queue is full")]
    QueueFull,
    #[error(
        "you already wait in {MAX_QUEUE_PLACES_PER_USER} places of this lock's queue, the most one user may hold"
    )]
    TooManyPlaces,
    #[error("the lock's fencing token or history sequence reached its maximum")]
    CounterExhausted,
}

/// Why a request that was allowed changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoChange {
    /// Release or force-release of a lock nobody holds: the goal is met.
    AlreadyAvailable,
    /// Leaving a queue one is not in.
    NotQueued,
}

/// The result of an allowed request.
// Short-lived: boxing the spec would only add an allocation per decision.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Write `next`; `action` is the history entry it appended.
    Change {
        next: DeploymentLockSpec,
        action: HistoryAction,
    },
    /// Write `next`: only the wait queue changed, which is not a transition
    /// of the lock and leaves no history entry.
    Queue { next: DeploymentLockSpec },
    /// Write nothing.
    Unchanged(NoChange),
}

/// The state shown to people for this lock at `now`.
pub fn state_at(spec: &DeploymentLockSpec, now: DateTime<Utc>) -> LockState {
    match &spec.holder {
        None => LockState::Available,
        Some(holder) if is_expired(holder, now) => LockState::Expired,
        Some(holder) if holder.lock_type == LockType::Emergency => LockState::ForceLocked,
        Some(_) => LockState::Locked,
    }
}

/// The live holding at `now`, if any: expired holdings do not count.
pub fn live_holder(spec: &DeploymentLockSpec, now: DateTime<Utc>) -> Option<&LockHolder> {
    spec.holder
        .as_ref()
        .filter(|holder| !is_expired(holder, now))
}

/// A holding is over at its expiry instant, not a moment later.
pub fn is_expired(holder: &LockHolder, now: DateTime<Utc>) -> bool {
    now >= holder.expires_at
}

/// `duration` from `now`, cut to the whole seconds left before `not_after`.
fn capped(duration: Duration, now: DateTime<Utc>, not_after: Option<DateTime<Utc>>) -> Duration {
    match not_after {
        Some(limit) => duration.min(Duration::seconds(
            limit.signed_duration_since(now).num_seconds(),
        )),
        None => duration,
    }
}

/// Whether `duration` is within the bounds the API server enforces.
pub fn duration_in_range(duration: Duration) -> bool {
    (MIN_DURATION_SECONDS..=MAX_DURATION_SECONDS).contains(&duration.num_seconds())
        && duration.subsec_nanos() == 0
}

/// Decides a request against the lock as stored. `current` is `None` when no
/// object exists yet for `environment`.
pub fn decide(
    environment: &str,
    current: Option<&DeploymentLockSpec>,
    now: DateTime<Utc>,
    request: &Request,
) -> Result<Decision, Refusal> {
    let empty;
    let spec = match current {
        Some(spec) => spec,
        None => {
            empty = DeploymentLockSpec {
                environment: environment.to_string(),
                fencing_token: first_fencing_token(now)?,
                ..DeploymentLockSpec::default()
            };
            &empty
        }
    };
    match request {
        Request::Acquire(acquire) => decide_acquire(spec, now, acquire),
        Request::Release { actor, lock_id } => decide_release(spec, now, actor, lock_id.as_deref()),
        Request::ForceRelease { actor, reason } => decide_force_release(spec, now, actor, reason),
        Request::Extend {
            actor,
            duration,
            lock_id,
            not_after,
        } => decide_extend(
            spec,
            now,
            actor,
            capped(*duration, now, *not_after),
            lock_id.as_deref(),
        ),
        Request::Renew { actor, duration } => decide_renew(spec, now, actor, *duration),
        Request::Clear {
            actor,
            lock_id,
            retention,
        } => decide_clear(spec, now, actor, lock_id, *retention),
        Request::JoinQueue {
            actor,
            waiter_id,
            reason,
            newest_first,
        } => decide_join(spec, now, actor, waiter_id, reason, *newest_first),
        Request::LeaveQueue { waiter_id } => {
            let mut next = spec.clone();
            let before = next.queue.len();
            next.queue
                .retain(|waiter| &waiter.id != waiter_id && !is_prunable(waiter, now));
            if next.queue.len() == before {
                Ok(Decision::Unchanged(NoChange::NotQueued))
            } else {
                Ok(Decision::Queue { next })
            }
        }
    }
}

/// The fencing token of a lock object about to be created: the server's
/// clock in seconds (plus [`FENCING_BASE_LEAD_SECONDS`]) times
/// [`FENCING_TOKENS_PER_SECOND`]; its first holding
/// gets one more. Every holding's token then exceeds every token of a lock
/// of the same name deleted before (the admission policy refuses a delete
/// while its token is ahead of that clock).
pub fn first_fencing_token(now: DateTime<Utc>) -> Result<i64, Refusal> {
    now.timestamp()
        .checked_add(FENCING_BASE_LEAD_SECONDS)
        .and_then(|seconds| seconds.checked_mul(FENCING_TOKENS_PER_SECOND))
        .filter(|token| (0..MAX_SAFE_INTEGER).contains(token))
        .ok_or(Refusal::CounterExhausted)
}

/// The next value of a fencing token or history sequence, within JSON's
/// safe integer range.
fn next_counter(value: i64) -> Result<i64, Refusal> {
    value
        .checked_add(1)
        .filter(|next| *next <= MAX_SAFE_INTEGER)
        .ok_or(Refusal::CounterExhausted)
}

fn is_live(waiter: &Waiter, now: DateTime<Utc>) -> bool {
    waiter_deadline(waiter) > now
}

/// Whether a waiter's place may be removed by someone else: it stopped
/// renewing it a while ago (see [`WAITER_PRUNE_GRACE_SECONDS`]).
fn is_prunable(waiter: &Waiter, now: DateTime<Utc>) -> bool {
    waiter_deadline(waiter)
        .checked_add_signed(Duration::seconds(WAITER_PRUNE_GRACE_SECONDS))
        .is_some_and(|deadline| deadline <= now)
}

/// Waiters still alive at `now`, in arrival order (the queue's order: a
/// waiter joins at the end, and the admission policy keeps the order).
pub fn live_waiters(spec: &DeploymentLockSpec, now: DateTime<Utc>) -> Vec<&Waiter> {
    spec.queue
        .iter()
        .filter(|waiter| is_live(waiter, now))
        .collect()
}

/// Whose turn it is when the lock is free: the newest waiter that asked for
/// newest-first, otherwise the oldest waiter (first come, first served).
pub fn next_waiter(spec: &DeploymentLockSpec, now: DateTime<Utc>) -> Option<&Waiter> {
    choose_next(&live_waiters(spec, now))
}

/// `next_waiter` among live waiters in arrival order: a freeze window's
/// place first, then the newest newest-first waiter, else the first.
fn choose_next<'a>(live: &[&'a Waiter]) -> Option<&'a Waiter> {
    live.iter()
        .find(|waiter| waiter.user == crate::windows::WINDOW_HOLDER)
        .or_else(|| live.iter().rev().find(|waiter| waiter.newest_first))
        .or_else(|| live.first())
        .copied()
}

/// When the next waiter would drop out for lack of heartbeat.
pub fn waiter_deadline(waiter: &Waiter) -> DateTime<Utc> {
    waiter
        .heartbeat_at
        .checked_add_signed(Duration::seconds(WAITER_TIMEOUT_SECONDS))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn decide_join(
    spec: &DeploymentLockSpec,
    now: DateTime<Utc>,
    actor: &Actor,
    waiter_id: &str,
    reason: &str,
    newest_first: bool,
) -> Result<Decision, Refusal> {
    let mut next = spec.clone();
    next.queue
        .retain(|waiter| waiter.id == waiter_id || !is_prunable(waiter, now));
    let waiting = next.queue.len();
    let mine = next
        .queue
        .iter()
        .filter(|waiter| waiter.user == actor.user)
        .count();
    match next.queue.iter_mut().find(|waiter| waiter.id == waiter_id) {
        Some(waiter) => waiter.heartbeat_at = waiter.heartbeat_at.max(now),
        None if waiting >= MAX_QUEUE_ENTRIES => return Err(Refusal::QueueFull),
        None if mine >= MAX_QUEUE_PLACES_PER_USER => return Err(Refusal::TooManyPlaces),
        None => next.queue.push(Waiter {
            id: waiter_id.to_string(),
            user: actor.user.clone(),
            owner: actor.owner.clone(),
            reason: reason.to_string(),
            since: now,
            heartbeat_at: now,
            newest_first,
        }),
    }
    Ok(Decision::Queue { next })
}

fn decide_clear(
    spec: &DeploymentLockSpec,
    now: DateTime<Utc>,
    actor: &Actor,
    lock_id: &str,
    retention: Duration,
) -> Result<Decision, Refusal> {
    let Some(holder) = &spec.holder else {
        return Ok(Decision::Unchanged(NoChange::AlreadyAvailable));
    };
    if holder.lock_id != lock_id {
        return Err(Refusal::LockLost {
            expected_lock_id: lock_id.to_string(),
            current: Some(Box::new(holder.clone())),
        });
    }
    let cleared_from = holder
        .expires_at
        .checked_add_signed(retention.max(Duration::zero()));
    if !is_expired(holder, now) || cleared_from.is_none_or(|from| now < from) {
        return Err(Refusal::HeldByOther(Box::new(holder.clone())));
    }
    end_holding(
        spec,
        holder,
        now,
        HistoryAction::Cleared,
        actor,
        &holder.reason,
        Some(holder.expires_at),
    )
}

/// Every case of an acquire, in the order the admission policy checks
/// them: one table on purpose (longer than most functions), so that it can
/// be read against the policy line by line.
fn decide_acquire(
    spec: &DeploymentLockSpec,
    now: DateTime<Utc>,
    request: &AcquireRequest,
) -> Result<Decision, Refusal> {
    if request.reason.trim().is_empty() {
        return Err(Refusal::ReasonRequired);
    }
    let duration = capped(request.duration, now, request.not_after);
    if !duration_in_range(duration) {
        return Err(Refusal::DurationOutOfRange);
    }
    let live = live_holder(spec, now);
    let (action, overrode) = match live {
        Some(holder)
            if holder.user == request.actor.user
                && !(request.force && holder.lock_type != LockType::Emergency) =>
        {
            // A second run by the same identity must not share the first
            // run's holding: the first run's cleanup would free it.
            return Err(Refusal::AlreadyHeldByYou(Box::new(holder.clone())));
        }
        Some(holder) if holder.lock_type == LockType::Emergency => {
            return Err(if request.force {
                Refusal::EmergencyLockInForce(Box::new(holder.clone()))
            } else {
                Refusal::HeldByOther(Box::new(holder.clone()))
            });
        }
        Some(holder) if !request.force => {
            return Err(Refusal::HeldByOther(Box::new(holder.clone())));
        }
        Some(holder) => (
            HistoryAction::ForceAcquired,
            Some(OverriddenHolding {
                lock_id: holder.lock_id.clone(),
                user: holder.user.clone(),
                owner: holder.owner.clone(),
                reason: holder.reason.clone(),
            }),
        ),
        None if request.force => (HistoryAction::ForceAcquired, None),
        None => {
            let waiting = live_waiters(spec, now);
            if let Some(next) = choose_next(&waiting)
                && request.waiter_id.as_deref() != Some(next.id.as_str())
            {
                return Err(Refusal::QueuedBehind {
                    next: Box::new(next.clone()),
                    waiting: waiting.len(),
                });
            }
            if spec.holder.is_some() {
                (HistoryAction::TookOverExpired, None)
            } else {
                (HistoryAction::Acquired, None)
            }
        }
    };
    let holder = LockHolder {
        lock_id: request.lock_id.clone(),
        user: request.actor.user.clone(),
        owner: request.actor.owner.clone(),
        // Only --force makes an emergency holding (a freeze window that
        // overrides a holder keeps its own type).
        lock_type: match (request.force, request.lock_type) {
            (true, LockType::Scheduled) => LockType::Scheduled,
            (true, _) => LockType::Emergency,
            (false, LockType::Emergency) => LockType::Manual,
            (false, other) => other,
        },
        reason: request.reason.clone(),
        acquired_at: now,
        expires_at: now
            .checked_add_signed(duration)
            .ok_or(Refusal::DurationOutOfRange)?,
        duration_seconds: duration.num_seconds(),
        deployment_id: request.deployment_id.clone(),
        metadata: request.metadata.clone(),
        overrode,
        group_id: request.group_id.clone(),
    };
    let mut next = spec.clone();
    next.fencing_token = next_counter(spec.fencing_token)?;
    // The new holder leaves the queue; waiters that stopped beating drop out.
    next.queue.retain(|waiter| {
        Some(waiter.id.as_str()) != request.waiter_id.as_deref() && !is_prunable(waiter, now)
    });
    record(
        &mut next,
        now,
        action,
        &request.actor,
        &holder,
        &holder.reason,
        Some(holder.expires_at),
    )?;
    next.holder = Some(holder);
    Ok(Decision::Change { next, action })
}

fn decide_release(
    spec: &DeploymentLockSpec,
    now: DateTime<Utc>,
    actor: &Actor,
    lock_id: Option<&str>,
) -> Result<Decision, Refusal> {
    let Some(holder) = &spec.holder else {
        return match lock_id {
            Some(expected) => Err(Refusal::LockLost {
                expected_lock_id: expected.to_string(),
                current: None,
            }),
            None => Ok(Decision::Unchanged(NoChange::AlreadyAvailable)),
        };
    };
    check_holding(holder, actor, lock_id)?;
    end_holding(
        spec,
        holder,
        now,
        HistoryAction::Released,
        actor,
        &holder.reason,
        None,
    )
}

fn decide_force_release(
    spec: &DeploymentLockSpec,
    now: DateTime<Utc>,
    actor: &Actor,
    reason: &str,
) -> Result<Decision, Refusal> {
    if reason.trim().is_empty() {
        return Err(Refusal::ReasonRequired);
    }
    let Some(holder) = &spec.holder else {
        return Ok(Decision::Unchanged(NoChange::AlreadyAvailable));
    };
    end_holding(
        spec,
        holder,
        now,
        HistoryAction::ForceReleased,
        actor,
        reason,
        None,
    )
}

fn decide_extend(
    spec: &DeploymentLockSpec,
    now: DateTime<Utc>,
    actor: &Actor,
    duration: Duration,
    lock_id: Option<&str>,
) -> Result<Decision, Refusal> {
    if !duration_in_range(duration) {
        return Err(Refusal::DurationOutOfRange);
    }
    let Some(holder) = &spec.holder else {
        return Err(match lock_id {
            Some(expected) => Refusal::LockLost {
                expected_lock_id: expected.to_string(),
                current: None,
            },
            None => Refusal::NotHeld,
        });
    };
    check_holding(holder, actor, lock_id)?;
    if is_expired(holder, now) {
        return Err(Refusal::ExpiredCannotExtend(Box::new(holder.clone())));
    }
    // Never shortens a holding; never reaches further than the longest
    // duration from now.
    let expires_at = holder.expires_at.max(
        now.checked_add_signed(duration)
            .ok_or(Refusal::DurationOutOfRange)?,
    );
    extended_to(spec, now, actor, holder, expires_at)
}

/// The holding moved to `expires_at`, with its Extended entry.
fn extended_to(
    spec: &DeploymentLockSpec,
    now: DateTime<Utc>,
    actor: &Actor,
    holder: &LockHolder,
    expires_at: DateTime<Utc>,
) -> Result<Decision, Refusal> {
    let mut next = spec.clone();
    record(
        &mut next,
        now,
        HistoryAction::Extended,
        actor,
        holder,
        &holder.reason,
        Some(expires_at),
    )?;
    if let Some(next_holder) = next.holder.as_mut() {
        next_holder.expires_at = expires_at;
    }
    Ok(Decision::Change {
        next,
        action: HistoryAction::Extended,
    })
}

fn decide_renew(
    spec: &DeploymentLockSpec,
    now: DateTime<Utc>,
    actor: &Actor,
    duration: Duration,
) -> Result<Decision, Refusal> {
    let expired_holding = spec
        .holder
        .as_ref()
        .filter(|holder| is_expired(holder, now));
    let Some(holder) = expired_holding else {
        return decide_extend(spec, now, actor, duration, None);
    };
    if !duration_in_range(duration) {
        return Err(Refusal::DurationOutOfRange);
    }
    check_holding(holder, actor, None)?;
    // Waiters were promised the lock once it is free: they go first.
    let waiting = live_waiters(spec, now);
    if let Some(next) = choose_next(&waiting) {
        return Err(Refusal::QueuedBehind {
            next: Box::new(next.clone()),
            waiting: waiting.len(),
        });
    }
    let expires_at = now
        .checked_add_signed(duration)
        .ok_or(Refusal::DurationOutOfRange)?;
    extended_to(spec, now, actor, holder, expires_at)
}

/// The caller must be the holder, and, when it names a holding, that holding
/// must still be the current one.
fn check_holding(holder: &LockHolder, actor: &Actor, lock_id: Option<&str>) -> Result<(), Refusal> {
    if let Some(expected) = lock_id
        && expected != holder.lock_id
    {
        return Err(Refusal::LockLost {
            expected_lock_id: expected.to_string(),
            current: Some(Box::new(holder.clone())),
        });
    }
    if holder.user != actor.user {
        return Err(Refusal::NotHolder(Box::new(holder.clone())));
    }
    Ok(())
}

/// Ends `holder`'s holding: the history records `action` and the lock is free.
fn end_holding(
    spec: &DeploymentLockSpec,
    holder: &LockHolder,
    now: DateTime<Utc>,
    action: HistoryAction,
    by: &Actor,
    reason: &str,
    expires_at: Option<DateTime<Utc>>,
) -> Result<Decision, Refusal> {
    let mut next = spec.clone();
    record(&mut next, now, action, by, holder, reason, expires_at)?;
    next.holder = None;
    Ok(Decision::Change { next, action })
}

/// Appends the history entry of `action` on `holding`, numbered after the
/// last one, dropping the oldest beyond the bound.
fn record(
    spec: &mut DeploymentLockSpec,
    now: DateTime<Utc>,
    action: HistoryAction,
    by: &Actor,
    holding: &LockHolder,
    reason: &str,
    expires_at: Option<DateTime<Utc>>,
) -> Result<(), Refusal> {
    let sequence = next_counter(spec.history.last().map_or(0, |last| last.sequence))?;
    spec.history.push(HistoryEntry {
        sequence,
        action,
        at: now,
        lock_id: holding.lock_id.clone(),
        by: by.user.clone(),
        owner: holding.owner.clone(),
        reason: reason.to_string(),
        expires_at,
    });
    let excess = spec.history.len().saturating_sub(MAX_HISTORY_ENTRIES);
    spec.history.drain(..excess);
    Ok(())
}
