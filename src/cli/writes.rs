//! The actions that write the lock: acquire (through its queue with
//! --wait-timeout), extend, renew (`acquire --extend`), release and
//! force-release.

use crate::crd::LockType;
use crate::environment::Environment;
use crate::error::Error;
use crate::queue::{self, TakeRequest};
use crate::rules::{Actor, Request};
use crate::signals::Signals;
use crate::store::{Applied, LockStore};

use super::args::{AcquireArgs, GlobalArgs, ReleaseArgs, deadline_after};
use super::progress::WaitProgress;
use super::report::{self, Exit};
use super::show;

/// Acquires for `acquire` and `exec`; with --wait-timeout, waits its turn in
/// the lock's queue, showing who holds it or who is ahead.
pub async fn take_lock(
    store: &LockStore,
    global: &GlobalArgs,
    args: &AcquireArgs,
    lock_type: LockType,
    signals: &mut Signals,
) -> Result<Applied, Error> {
    let deadline = deadline_after(args.wait_timeout);
    let env = &global.environment;
    take_one(store, env, args, lock_type, None, deadline, signals).await
}

/// Takes the lock of `env` as `args` say, in lock group `group_id` (a
/// multi-environment acquire), waiting in its queue until `deadline`.
pub async fn take_one(
    store: &LockStore,
    env: &Environment,
    args: &AcquireArgs,
    lock_type: LockType,
    group_id: Option<String>,
    deadline: Option<tokio::time::Instant>,
    signals: &mut Signals,
) -> Result<Applied, Error> {
    let request = TakeRequest {
        owner: args.owner.clone(),
        lock_type,
        force: args.force,
        reason: args.reason.clone().unwrap_or_default(),
        duration: args.duration,
        deployment_id: args.deployment_id.clone(),
        metadata: args.metadata.clone().unwrap_or_default(),
        order: args.queue,
        not_after: None,
        group_id,
    };
    match deadline {
        Some(_) => {
            let mut progress = WaitProgress::acquiring(env);
            queue::take(store, env, &request, deadline, signals, &mut progress).await
        }
        None => queue::take(store, env, &request, None, signals, &mut ()).await,
    }
}

/// Applies the request `make` builds for the caller (who the API server
/// says we are) to the lock, and shows the outcome as `done`.
async fn apply_as_caller(
    store: &LockStore,
    global: &GlobalArgs,
    done: &str,
    make: impl FnOnce(Actor) -> Request,
) -> Result<Exit, Error> {
    let actor = Actor::new(store.whoami().await?, None);
    let applied = store.apply(&global.environment, &make(actor)).await?;
    show::applied(global, &applied, done)
}

pub async fn extend(
    store: &LockStore,
    global: &GlobalArgs,
    duration: chrono::Duration,
    lock_id: Option<String>,
) -> Result<Exit, Error> {
    apply_as_caller(store, global, "extended", |actor| Request::Extend {
        actor,
        duration,
        lock_id,
        not_after: None,
    })
    .await
}

/// `acquire --extend`: extends one's holding, or renews it if it expired and
/// is still the lock's holding (the rules refuse it otherwise: exit 5 if
/// someone else holds it or it was cleared, 3 if someone waits for it).
pub async fn renew(
    store: &LockStore,
    global: &GlobalArgs,
    duration: chrono::Duration,
) -> Result<Exit, Error> {
    let actor = Actor::new(store.whoami().await?, None);
    let request = Request::Renew { actor, duration };
    let applied = store.apply(&global.environment, &request).await?;
    if let Some(spec) = applied.observed.spec()
        && let Some(gap) = show::renewal_gap(spec)
    {
        eprintln!("deploylock: warning: {}", report::safe_line(&gap));
    }
    show::applied(global, &applied, "extended")
}

pub async fn release(
    store: &LockStore,
    global: &GlobalArgs,
    args: &ReleaseArgs,
) -> Result<Exit, Error> {
    let lock_id = match &args.deployment_id {
        None => args.holding.lock_id.clone(),
        // That holding's lock ID, so the release is refused if the
        // holding ends before the write lands.
        Some(deployment_id) => {
            let observed = store.read(&global.environment).await?;
            match show::holding_of_deployment(&observed, deployment_id) {
                Some(lock_id) => Some(lock_id),
                None => return Ok(show::not_held_by(global, &observed, deployment_id)),
            }
        }
    };
    apply_as_caller(store, global, "released", |actor| Request::Release {
        actor,
        lock_id,
    })
    .await
}

pub async fn force_release(
    store: &LockStore,
    global: &GlobalArgs,
    reason: String,
) -> Result<Exit, Error> {
    apply_as_caller(store, global, "force-released", |actor| {
        Request::ForceRelease { actor, reason }
    })
    .await
}
