//! The `exec` action: take the lock, run the command while holding it
//! ([`crate::exec`]), and say how it ended.

use std::time::Duration as StdDuration;

use crate::crd::{LockHolder, LockType};
use crate::environment::Environment;
use crate::error::Error;
use crate::exec::{ExecOutcome, ExecPlan, HeldLock, StopDeadlines, run_while_holding};
use crate::multienv::space_separated;
use crate::rules::Actor;
use crate::signals::Signals;
use crate::store::{LockStore, Observed};

use super::report::{self, Exit};
use super::{ExecArgs, GlobalArgs, render};

/// Refuses a --grace the renewals could not honour, before anything is sent.
pub fn check(args: &ExecArgs) -> Result<(), Error> {
    // The command gets SIGTERM --grace before its deadline: with more
    // than half the duration, a healthy renewal could not prevent it.
    let grace = i64::try_from(args.grace).unwrap_or(i64::MAX);
    if grace.saturating_mul(2) >= args.lock.duration.num_seconds() {
        return Err(Error::InvalidInput(format!(
            "--grace {} is too long for --duration {}m: it must be less than half of the duration",
            args.grace,
            args.lock.duration.num_minutes()
        )));
    }
    Ok(())
}

pub async fn run(
    store: &LockStore,
    global: &GlobalArgs,
    args: &ExecArgs,
    signals: &mut Signals,
) -> Result<Exit, Error> {
    // Signals are ours from the start: a SIGTERM while waiting leaves the
    // queue, one while the command runs is passed on to it.
    let applied =
        super::writes::take_lock(store, global, &args.lock, LockType::Automatic, signals).await?;
    let grace = StdDuration::from_secs(args.grace);
    let held = held_lock(&global.environment, &applied.observed, grace)?;
    eprintln!(
        "deploylock: {} acquired (lock ID {}, fencing token {}); running {:?}",
        global.environment,
        held.holding.lock_id,
        held.fencing_token,
        args.command.join(" ")
    );
    let plan = ExecPlan {
        actor: Actor::new(held.holding.user.clone(), Some(held.holding.owner.clone())),
        held: vec![held],
        group_id: None,
        grace,
        command: args.command.clone(),
    };
    let outcome = run_while_holding(store, plan, signals).await?;
    Ok(report_outcome(outcome))
}

/// `exec` with several environments: takes all their locks (in lock order,
/// all or none, one lock group), then runs the command holding all of them.
pub async fn run_several(
    store: &LockStore,
    global: &GlobalArgs,
    args: &ExecArgs,
    environments: &[Environment],
    signals: &mut Signals,
) -> Result<Exit, Error> {
    let taken = super::multi::take_all(
        store,
        &args.lock,
        LockType::Automatic,
        environments,
        signals,
    )
    .await;
    let (group_id, taken) = match taken {
        Ok(taken) => taken,
        Err(failed) => return Ok(failed.report(store, global)),
    };
    let grace = StdDuration::from_secs(args.grace);
    let mut held = Vec::with_capacity(taken.len());
    for entry in &taken {
        held.push(held_lock(
            &entry.environment,
            &entry.applied.observed,
            grace,
        )?);
    }
    let Some(first) = held.first() else {
        return Err(Error::Api("no lock was taken".into()));
    };
    let actor = Actor::new(
        first.holding.user.clone(),
        Some(first.holding.owner.clone()),
    );
    eprintln!(
        "deploylock: {} acquired (lock group ID {group_id}, lock IDs {}, fencing tokens {}); running {:?}",
        space_separated(held.iter().map(|h| &h.environment)),
        space_separated(held.iter().map(|h| &h.holding.lock_id)),
        space_separated(held.iter().map(|h| h.fencing_token)),
        args.command.join(" ")
    );
    let plan = ExecPlan {
        actor,
        held,
        group_id: Some(group_id),
        grace,
        command: args.command.clone(),
    };
    let outcome = run_while_holding(store, plan, signals).await?;
    Ok(report_outcome(outcome))
}

/// A holding as exec keeps it: its stop deadlines from the read that gave it.
fn held_lock(
    environment: &Environment,
    observed: &Observed,
    grace: StdDuration,
) -> Result<HeldLock, Error> {
    let Some(holding) = observed.holder().cloned() else {
        return Err(Error::Api("the lock was written without a holder".into()));
    };
    Ok(HeldLock {
        environment: environment.clone(),
        fencing_token: observed.spec().map(|s| s.fencing_token).unwrap_or_default(),
        deadlines: StopDeadlines::for_holding(observed, holding.expires_at, grace),
        taken_at: observed.sent,
        holding,
    })
}

/// Says how the command ended; the exit code is the command's own unless
/// the lock failed it.
fn report_outcome(outcome: ExecOutcome) -> Exit {
    match outcome {
        ExecOutcome::Exited {
            code,
            release_errors,
        } if release_errors.is_empty() => Exit::Child(code),
        ExecOutcome::Exited {
            code,
            release_errors,
        } => {
            for (environment, why) in &release_errors {
                eprintln!(
                    "deploylock: warning: the command exited with {code} but the lock on {environment} could not be released ({}); it stays held until it expires (see `deploylock status`)",
                    render::Safe(why)
                );
            }
            Exit::NotReleased
        }
        ExecOutcome::CouldNotStart { error } => {
            eprintln!("deploylock: cannot run {error}; the lock was released");
            Exit::Child(127)
        }
        ExecOutcome::LockLost {
            environment,
            now_held_by,
            release_errors,
            renewal_error,
            child_code,
        } => {
            report_loss(
                &environment,
                now_held_by.as_deref(),
                renewal_error,
                child_code,
            );
            for (other, why) in &release_errors {
                eprintln!(
                    "deploylock: warning: the lock on {other} could not be released after the loss of {environment} ({}); it stays held until it expires (see `deploylock status`)",
                    render::Safe(why)
                );
            }
            Exit::LockLost
        }
    }
}

fn report_loss(
    environment: &Environment,
    now_held_by: Option<&LockHolder>,
    renewal_error: Option<String>,
    child_code: i32,
) {
    if let Some(why) = renewal_error {
        eprintln!(
            "deploylock: could not renew the lock before it could expire ({}): the command was stopped in time",
            render::Safe(&why)
        );
    }
    let now_held = match now_held_by {
        Some(holder) => report::safe_line(&format!(
            "now held by {} ({}), reason: \"{}\"",
            report::holder_name(holder),
            holder.lock_type,
            holder.reason
        )),
        None => "someone else released it, or it expired (see `deploylock history`)".to_string(),
    };
    eprintln!(
        "deploylock: lost the lock on {environment} while the command ran: {now_held}; the command was stopped (its exit code: {child_code})"
    );
}
