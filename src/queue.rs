//! Waiting for the lock: taking it at one's turn in its queue, and waiting
//! until it is free. The protocol beside [`LockStore::wait_until_free`]:
//! driven by a request, a deadline, the process's [`Signals`] and a
//! [`Progress`] that is told who holds the lock or who is ahead.
//!
//! A waiter joins the queue (a [`Request::JoinQueue`] heartbeat every
//! [`QUEUE_HEARTBEAT`]), then tries to acquire whenever the lock changes,
//! the holder's expiry passes or the waiter ahead's heartbeat lapses. Faults
//! of the API server are retried until the deadline ([`Retry`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration as StdDuration;

use tokio::time::Instant;

use crate::crd::{HistoryAction, LockHolder, LockType, STOP_THE_LINE, Waiter};
use crate::environment::Environment;
use crate::error::Error;
use crate::rules::{self, AcquireRequest, Actor, Refusal, Request};
use crate::signals::Signals;
use crate::store::{Applied, LockStore, Observed, Outcome, Refused};

/// How often a waiting client renews its place in the queue.
pub const QUEUE_HEARTBEAT: StdDuration = StdDuration::from_secs(5);

/// How long a waiting client retries 403s from authorization: right after an
/// API server starts, RBAC refuses everyone until its caches are filled.
pub const RBAC_SETTLE: StdDuration = StdDuration::from_secs(30);

/// Longest pause between retries of a waiting client.
pub const MAX_RETRY_BACKOFF: StdDuration = StdDuration::from_secs(2);

/// How waiters are served (GitLab's resource_group process modes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueOrder {
    /// First come, first served.
    #[default]
    OldestFirst,
    /// The latest waiter goes first (only the newest deploy matters).
    NewestFirst,
}

/// What a waiting client is told while it waits.
pub trait Progress {
    /// `holder` holds the lock (seen in `observed`).
    fn held(&mut self, holder: &LockHolder, observed: &Observed);
    /// The lock is free but `waiting` clients are queued; `next` goes first.
    fn queued(&mut self, next: &Waiter, waiting: usize, observed: &Observed);
    /// The namespace is frozen: `holder` holds its `stop-the-line` lock
    /// (seen in `observed`).
    fn frozen(&mut self, holder: &LockHolder, observed: &Observed);
    /// The wait is over: the lock is ours, or free.
    fn finished(&mut self, observed: &Observed);
}

/// No one to tell.
impl Progress for () {
    fn held(&mut self, _: &LockHolder, _: &Observed) {}
    fn queued(&mut self, _: &Waiter, _: usize, _: &Observed) {}
    fn frozen(&mut self, _: &LockHolder, _: &Observed) {}
    fn finished(&mut self, _: &Observed) {}
}

/// An acquire, before the caller's identity is known.
#[derive(Clone, Debug, Default)]
pub struct TakeRequest {
    /// Display label of the holder (default: the identity).
    pub owner: Option<String>,
    pub lock_type: LockType,
    pub force: bool,
    pub reason: String,
    pub duration: chrono::Duration,
    pub deployment_id: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// With a deadline: the order waiters are served in.
    pub order: QueueOrder,
    /// The holding ends at this instant at the latest (a freeze window's end).
    pub not_after: Option<chrono::DateTime<chrono::Utc>>,
    /// The lock group ID shared by a multi-environment acquire's holdings.
    pub group_id: Option<String>,
}

impl TakeRequest {
    /// The acquire of `user`, with a fresh lock ID.
    pub fn acquire(&self, user: String, waiter_id: Option<String>) -> AcquireRequest {
        AcquireRequest {
            actor: Actor::new(user, self.owner.clone()),
            lock_id: uuid::Uuid::new_v4().to_string(),
            lock_type: self.lock_type,
            force: self.force,
            reason: self.reason.clone(),
            duration: self.duration,
            deployment_id: self.deployment_id.clone(),
            metadata: self.metadata.clone(),
            waiter_id,
            not_after: self.not_after,
            group_id: self.group_id.clone(),
        }
    }
}

/// `future`, unless a signal comes first ([`Error::Interrupted`]).
pub async fn interruptible<T>(
    signals: &mut Signals,
    future: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::select! {
        result = future => result,
        _ = signals.next() => Err(Error::Interrupted),
    }
}

/// Takes the lock: at once without a deadline (a refusal is returned), or
/// waiting its turn in the lock's queue until `deadline`. A signal gives up,
/// leaving the queue.
pub async fn take(
    store: &LockStore,
    environment: &Environment,
    request: &TakeRequest,
    deadline: Option<Instant>,
    signals: &mut Signals,
    progress: &mut (dyn Progress + Send),
) -> Result<Applied, Error> {
    let Some(deadline) = deadline else {
        let user = interruptible(signals, store.whoami()).await?;
        let acquire = Request::Acquire(request.acquire(user, None));
        return interruptible(signals, store.apply(environment, &acquire)).await;
    };
    let mut retry = Retry::new(Some(deadline));
    let user = interruptible(signals, retrying(&mut retry, || store.whoami())).await?;
    let waiter_id = uuid::Uuid::new_v4().to_string();
    let acquire = request.acquire(user, Some(waiter_id.clone()));
    let turn = Turn {
        join: Request::JoinQueue {
            actor: acquire.actor.clone(),
            waiter_id: waiter_id.clone(),
            reason: acquire.reason.clone(),
            newest_first: request.order == QueueOrder::NewestFirst,
        },
        lock_id: acquire.lock_id.clone(),
        acquire: Request::Acquire(acquire),
        deadline,
    };
    let queued = wait_in_queue(store, environment, &turn, &mut retry, progress);
    let result = interruptible(signals, queued).await;
    if result.is_err() {
        // Give up our place (a second signal gives up on that); if this
        // fails, the place lapses with the heartbeat.
        let leave = Request::LeaveQueue { waiter_id };
        if let Err(err) = interruptible(signals, store.apply(environment, &leave)).await {
            tracing::debug!(error = %err, "could not leave the queue");
        }
    }
    result
}

/// One waiter's requests and deadline.
struct Turn {
    acquire: Request,
    lock_id: String,
    join: Request,
    deadline: Instant,
}

/// Joins the queue, then takes the lock when it is free and it is our turn.
/// Woken by changes of the lock (a watch), the holder's expiry, the expiry of
/// the waiter ahead's heartbeat, and our own heartbeat. Faults of the API
/// server are retried (see [`Retry`]); the heartbeat resumes after them.
async fn wait_in_queue(
    store: &LockStore,
    environment: &Environment,
    turn: &Turn,
    retry: &mut Retry,
    progress: &mut (dyn Progress + Send),
) -> Result<Applied, Error> {
    let mut next_heartbeat = Instant::now();
    loop {
        match queue_step(store, environment, turn, &mut next_heartbeat, progress).await {
            Ok(Some(applied)) => {
                progress.finished(&applied.observed);
                return Ok(applied);
            }
            Ok(None) => retry.succeeded(),
            Err(err) => {
                if !retry.again(&err).await {
                    return Err(err);
                }
            }
        }
    }
}

/// One round of waiting in the queue: Some once the lock is ours.
async fn queue_step(
    store: &LockStore,
    environment: &Environment,
    turn: &Turn,
    next_heartbeat: &mut Instant,
    progress: &mut (dyn Progress + Send),
) -> Result<Option<Applied>, Error> {
    if Instant::now() >= *next_heartbeat {
        store.apply(environment, &turn.join).await?;
        *next_heartbeat = Instant::now() + QUEUE_HEARTBEAT;
    }
    // One read decides: on a hand-off the lock is usually ours to take;
    // otherwise the refusal says until when to sleep.
    let attempt = match store.try_apply(environment, &turn.acquire).await {
        // The namespace is frozen: our place is kept (heartbeats are not
        // acquisitions), and the freeze is waited out like a holder.
        Err(err) if err.is_stop_the_line_refusal() => {
            return wait_out_freeze(store, turn, *next_heartbeat, progress)
                .await
                .map(|()| None);
        }
        attempt => attempt?,
    };
    let Refused { refusal, observed } = match attempt {
        Ok(applied) => return Ok(Some(applied)),
        Err(refused) => refused,
    };
    let wake = match refusal {
        // Our own acquire, written by an attempt whose answer was lost.
        Refusal::AlreadyHeldByYou(holder) if holder.lock_id == turn.lock_id => {
            return Ok(Some(Applied {
                observed,
                outcome: Outcome::Transition(HistoryAction::Acquired),
            }));
        }
        // Waiting for one's own earlier holding is what a second CI run
        // under the same identity does: it queues like anyone else.
        Refusal::HeldByOther(holder)
        | Refusal::EmergencyLockInForce(holder)
        | Refusal::AlreadyHeldByYou(holder) => {
            progress.held(&holder, &observed);
            observed.local_deadline(holder.expires_at)
        }
        Refusal::QueuedBehind { next, waiting } => {
            progress.queued(&next, waiting, &observed);
            observed.local_deadline(rules::waiter_deadline(&next))
        }
        refusal => return Err(refusal.into()),
    };
    if Instant::now() >= turn.deadline {
        return Err(Error::WaitTimedOut(
            observed.holder().cloned().map(Box::new),
        ));
    }
    let until = wake.min(*next_heartbeat).min(turn.deadline);
    store.wait_for_change(&observed, until).await?;
    Ok(None)
}

/// While the namespace's `stop-the-line` lock is held: waits for it to
/// change, its holding to expire, our next heartbeat or the deadline (then
/// [`Error::WaitTimedOutFrozen`]).
async fn wait_out_freeze(
    store: &LockStore,
    turn: &Turn,
    next_heartbeat: Instant,
    progress: &mut (dyn Progress + Send),
) -> Result<(), Error> {
    let line: Environment = STOP_THE_LINE
        .parse()
        .map_err(|_| Error::InvalidInput(format!("{STOP_THE_LINE} is not an environment name")))?;
    let observed = store.read(&line).await?;
    // Released, and the API server's policy has not seen it yet: try again
    // after a short wait for another change.
    let Some(holder) = observed.holder().cloned() else {
        if Instant::now() >= turn.deadline {
            return Err(Error::WaitTimedOut(None));
        }
        let soon = (Instant::now() + StdDuration::from_millis(500)).min(turn.deadline);
        return store.wait_for_change(&observed, soon).await;
    };
    progress.frozen(&holder, &observed);
    if Instant::now() >= turn.deadline {
        return Err(Error::WaitTimedOutFrozen(Box::new(holder)));
    }
    // Past its expiry the freeze lasts until the controller marks it
    // Expired: a change, seen on the watch (no spinning meanwhile).
    let expiry = observed
        .local_deadline(holder.expires_at)
        .max(Instant::now() + StdDuration::from_secs(1));
    let until = expiry.min(next_heartbeat).min(turn.deadline);
    store.wait_for_change(&observed, until).await
}

/// Waits until the lock is free, without a place in the queue (`deploylock
/// wait`). Faults of the API server are retried until the deadline (forever
/// without one).
pub async fn wait_until_free(
    store: &LockStore,
    environment: &Environment,
    deadline: Option<Instant>,
    progress: &mut (dyn Progress + Send),
) -> Result<Observed, Error> {
    let mut retry = Retry::new(deadline);
    loop {
        let waited = store
            .wait_until_free(environment, deadline, |observed| {
                if let Some(holder) = observed.holder() {
                    progress.held(holder, observed);
                }
            })
            .await;
        match waited {
            Ok(observed) => {
                progress.finished(&observed);
                return Ok(observed);
            }
            Err(err) => {
                if !retry.again(&err).await {
                    return Err(err);
                }
            }
        }
    }
}

/// Retries of a waiting client: transient faults (no connection, no answer
/// in time, 5xx, 429) until its deadline, 403s from authorization for
/// [`RBAC_SETTLE`]; anything else ends the wait.
pub struct Retry {
    deadline: Option<Instant>,
    backoff: StdDuration,
    forbidden_since: Option<Instant>,
    warned: bool,
}

impl Retry {
    pub fn new(deadline: Option<Instant>) -> Self {
        Retry {
            deadline,
            backoff: StdDuration::from_millis(250),
            forbidden_since: None,
            warned: false,
        }
    }

    /// After a failure: whether to try again (having paused), or give up.
    pub async fn again(&mut self, err: &Error) -> bool {
        let now = Instant::now();
        let worth_it = if err.is_authorization_refusal() {
            now.duration_since(*self.forbidden_since.get_or_insert(now)) < RBAC_SETTLE
        } else {
            err.is_transient()
        };
        let wake = now + self.backoff;
        if !worth_it || self.deadline.is_some_and(|deadline| wake >= deadline) {
            return false;
        }
        if !self.warned {
            tracing::warn!(error = %err, "the API server failed; retrying while waiting");
            self.warned = true;
        } else {
            tracing::debug!(error = %err, "retrying");
        }
        tokio::time::sleep_until(wake).await;
        self.backoff = (self.backoff * 2).min(MAX_RETRY_BACKOFF);
        true
    }

    /// After a success: the next failure starts afresh.
    pub fn succeeded(&mut self) {
        if self.warned {
            tracing::warn!("the API server answers again");
        }
        self.backoff = StdDuration::from_millis(250);
        self.forbidden_since = None;
        self.warned = false;
    }
}

/// `attempt` again and again while `retry` says so.
pub async fn retrying<T, F, Fut>(retry: &mut Retry, mut attempt: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    loop {
        match attempt().await {
            Ok(value) => {
                retry.succeeded();
                return Ok(value);
            }
            Err(err) => {
                if !retry.again(&err).await {
                    return Err(err);
                }
            }
        }
    }
}
