//! What the successful actions print on stdout.

use crate::crd::HistoryAction;
use crate::error::Error;
use crate::rules::NoChange;
use crate::store::{Applied, Listing, LockStore, Observed, Outcome};

use super::GlobalArgs;
use super::render::{self, LockView, OutputFormat};
use super::report::{self, Exit};

/// The lock as `status` shows it (`as_status`), or as JSON/YAML after
/// another action (a table is printed only by `status`).
pub fn view(global: &GlobalArgs, observed: &Observed, as_status: bool) {
    let view = LockView::new(
        &observed.namespace,
        observed.environment.as_str(),
        observed.lock.as_ref(),
        observed.server_time,
    );
    match global.output {
        OutputFormat::Table if as_status => {
            out!("{}", render::status_table(&view, global.verbose))
        }
        OutputFormat::Table => {}
        format => out!("{}", render::structured(&view, format)),
    }
}

/// The lock ID of the holding taken with `deployment_id`, if it is the
/// lock's current holding.
pub fn holding_of_deployment(observed: &Observed, deployment_id: &str) -> Option<String> {
    observed
        .holder()
        .filter(|holder| holder.deployment_id.as_deref() == Some(deployment_id))
        .map(|holder| holder.lock_id.clone())
}

/// `release --deployment-id` when that deployment does not hold the lock:
/// nothing to do (another run's holding is left alone).
pub fn not_held_by(global: &GlobalArgs, observed: &Observed, deployment_id: &str) -> Exit {
    if global.output == OutputFormat::Table {
        outln!(
            "{} is not held by deployment {}: nothing to release",
            observed.environment,
            render::Safe(deployment_id)
        );
    } else {
        view(global, observed, false);
    }
    Exit::Success
}

/// The history of a lock.
pub fn history(global: &GlobalArgs, observed: &Observed) {
    let history = observed.spec().map_or(&[][..], |spec| &spec.history[..]);
    match global.output {
        OutputFormat::Table => {
            out!("{}", render::history_table(history, observed.server_time))
        }
        format => out!("{}", render::structured(&history, format)),
    }
}

/// Like `kubectl get`: every lock that can be read, a warning naming each
/// one that cannot, and exit 1 if there was one.
pub fn list(global: &GlobalArgs, store: &LockStore, listing: &Listing, all: bool) -> Exit {
    let (locks, now) = (&listing.locks, listing.server_time);
    match global.output {
        OutputFormat::Table => out!("{}", render::list_table(locks, now, all)),
        format => {
            let views: Vec<LockView> = locks
                .iter()
                .map(|lock| {
                    LockView::new(store.namespace(), &lock.spec.environment, Some(lock), now)
                })
                .collect();
            out!("{}", render::structured(&views, format));
        }
    }
    for malformed in &listing.malformed {
        eprintln!("deploylock: {}", report::skipped_malformed(malformed));
    }
    if listing.malformed.is_empty() {
        Exit::Success
    } else {
        Exit::Failure
    }
}

/// What a write did, in one or two lines (`verb`: "acquired", "released"...).
pub fn applied(global: &GlobalArgs, applied: &Applied, verb: &str) -> Result<Exit, Error> {
    let observed = &applied.observed;
    let env = &observed.environment;
    if global.output != OutputFormat::Table {
        view(global, observed, false);
        return Ok(Exit::Success);
    }
    match (applied.outcome, observed.holder()) {
        (Outcome::Unchanged(NoChange::AlreadyAvailable), _) => {
            outln!("{env} was not locked: nothing to do")
        }
        (Outcome::Unchanged(NoChange::NotQueued) | Outcome::QueueUpdated, _) => {}
        (Outcome::Transition(HistoryAction::Released | HistoryAction::ForceReleased), _) => {
            outln!("{env} {verb}")
        }
        (Outcome::Transition(action), Some(holder)) => {
            let takeover = match action {
                HistoryAction::TookOverExpired => " (took over an expired lock)",
                HistoryAction::ForceAcquired if holder.overrode.is_some() => {
                    " (emergency: overrode the previous holder)"
                }
                HistoryAction::ForceAcquired => " (emergency)",
                _ => "",
            };
            outln!(
                "{env} {verb} by {} until {}{takeover}",
                render::Safe(&holder.owner),
                report::when(holder.expires_at, observed.server_time)
            );
            outln!(
                "lock ID {}, fencing token {}",
                render::Safe(&holder.lock_id),
                observed.spec().map(|s| s.fencing_token).unwrap_or_default()
            );
        }
        (Outcome::Transition(_), None) => outln!("{env} {verb}"),
    }
    Ok(Exit::Success)
}
