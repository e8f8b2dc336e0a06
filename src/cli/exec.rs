//! The `exec` action: take the lock, run the command while holding it
//! ([`crate::exec`]), and say how it ended.

use std::time::Duration as StdDuration;

use crate::crd::{LockHolder, LockType};
use crate::environment::Environment;
use crate::error::Error;
use crate::exec::{ExecOutcome, ExecPlan, StopDeadlines, run_while_holding};
use crate::rules::Actor;
use crate::signals::Signals;
use crate::store::LockStore;

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
    let observed = &applied.observed;
    let Some(holding) = observed.holder().cloned() else {
        return Err(Error::Api("the lock was written without a holder".into()));
    };
    let fencing_token = observed.spec().map(|s| s.fencing_token).unwrap_or_default();
    eprintln!(
        "deploylock: {} acquired (lock ID {}, fencing token {fencing_token}); running {:?}",
        global.environment,
        holding.lock_id,
        args.command.join(" ")
    );
    let grace = StdDuration::from_secs(args.grace);
    let plan = ExecPlan {
        environment: global.environment.clone(),
        actor: Actor::new(holding.user.clone(), Some(holding.owner.clone())),
        fencing_token,
        deadlines: StopDeadlines::for_holding(observed, holding.expires_at, grace),
        taken_at: observed.sent,
        grace,
        command: args.command.clone(),
        holding,
    };
    let outcome = run_while_holding(store, plan, signals).await?;
    Ok(report_outcome(&global.environment, outcome))
}

/// Says how the command ended; the exit code is the command's own unless
/// the lock failed it.
fn report_outcome(environment: &Environment, outcome: ExecOutcome) -> Exit {
    match outcome {
        ExecOutcome::Exited {
            code,
            release_error: None,
        } => Exit::Child(code),
        ExecOutcome::Exited {
            code,
            release_error: Some(why),
        } => {
            eprintln!(
                "deploylock: warning: the command exited with {code} but the lock on {environment} could not be released ({}); it stays held until it expires (see `deploylock status`)",
                render::Safe(&why)
            );
            Exit::NotReleased
        }
        ExecOutcome::CouldNotStart { error } => {
            eprintln!("deploylock: cannot run {error}; the lock was released");
            Exit::Child(127)
        }
        ExecOutcome::LockLost {
            now_held_by,
            renewal_error,
            child_code,
        } => {
            report_loss(
                environment,
                now_held_by.as_deref(),
                renewal_error,
                child_code,
            );
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
