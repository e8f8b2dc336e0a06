//! What the successful actions print on stdout.

use crate::crd::{DeploymentLockSpec, HistoryAction};
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

/// `status`: the lock; with -v as a table, also whether the caller holds
/// it and the notifications and gates that cover it.
pub async fn status(store: &LockStore, global: &GlobalArgs, observed: &Observed) {
    view(global, observed, true);
    if global.verbose && global.output == OutputFormat::Table {
        caller_holding(store, observed).await;
        let env = &global.environment;
        let lock = observed.lock.as_ref();
        let covering =
            crate::notify::cli::covering(store.client(), store.namespace(), env, lock).await;
        outln!("Notifications: {covering}");
        let gates =
            crate::gitops::cli::gates(store.client(), store.namespace(), env.as_str()).await;
        outln!("Gates: {gates}");
        let bound = crate::envbinding::cli::gated_namespaces(
            store.client(),
            store.namespace(),
            env.as_str(),
        )
        .await;
        if let Some(bound) = bound {
            outln!("Workload gate: {}", render::Safe(&bound));
        }
    }
}

/// `status -v`: whether the caller holds the lock, in words. Without an
/// answer to "who am I" the line says so instead of guessing.
pub async fn caller_holding(store: &LockStore, observed: &Observed) {
    let view = LockView::new(
        &observed.namespace,
        observed.environment.as_str(),
        observed.lock.as_ref(),
        observed.server_time,
    );
    match store.whoami().await {
        Ok(me) => outln!("{}", render::caller_holding(&view, &me)),
        Err(err) => outln!(
            "Whether you hold this lock: unknown ({})",
            render::Safe(&err.to_string())
        ),
    }
}

/// After `acquire --extend`: if the `Extended` entry just written renewed a
/// holding that had expired, how long the lock was unprotected, from the
/// history (the entry before it for the same holding has the old expiry).
pub fn renewal_gap(spec: &DeploymentLockSpec) -> Option<String> {
    let holder = spec.holder.as_ref()?;
    let (renewal, earlier) = spec.history.split_last()?;
    if renewal.action != HistoryAction::Extended || renewal.lock_id != holder.lock_id {
        return None;
    }
    let expired_at = earlier
        .iter()
        .rev()
        .find(|entry| entry.lock_id == holder.lock_id)?
        .expires_at?;
    // Expired means now >= expiresAt (rules::is_expired): a renewal in the
    // very second of the expiry was unprotected for under a second.
    let unprotected = (renewal.at - expired_at).to_std().ok()?;
    let span = if unprotected.is_zero() {
        "under a second".to_string()
    } else {
        humantime::format_duration(unprotected).to_string()
    };
    Some(format!(
        "your holding of {} had expired at {}; renewed after {span} unprotected; nobody took it over (same lock ID {}, fencing token {})",
        spec.environment,
        expired_at.format("%Y-%m-%dT%H:%M:%SZ"),
        holder.lock_id,
        spec.fencing_token
    ))
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
            out!(
                "{}",
                render::history_table(history, observed.holder(), observed.server_time)
            )
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
                render::Safe(&report::holder_name(holder)),
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

/// `windows`: a table, or the objects with `-o json|yaml`.
pub fn windows(
    global: &GlobalArgs,
    windows: &[crate::windows::FreezeWindow],
    now: Option<chrono::DateTime<chrono::Utc>>,
    all_namespaces: bool,
) {
    let now = now.unwrap_or_else(chrono::Utc::now);
    match global.output {
        OutputFormat::Table if windows.is_empty() => {
            eprintln!("No freeze windows found.");
        }
        OutputFormat::Table => out!("{}", render::windows_table(windows, now, all_namespaces)),
        format => out!("{}", render::structured(&windows, format)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata;

    fn spec(history: serde_json::Value) -> DeploymentLockSpec {
        let object = serde_json::json!({
            "environment": "production",
            "fencingToken": 3,
            "holder": testdata::holder(""),
            "history": history
        });
        serde_json::from_value(object).unwrap_or_else(|err| panic!("{err}"))
    }

    fn extended(at: &str, expires_at: &str) -> serde_json::Value {
        serde_json::json!({
            "sequence": 2,
            "action": "Extended",
            "at": at,
            "lockId": "id",
            "by": "user",
            "owner": "owner",
            "reason": "reason",
            "expiresAt": expires_at
        })
    }

    /// The renewal of an expired holding says how long it was unprotected;
    /// an extension of a live one says nothing.
    #[test]
    fn renewal_gap_is_the_time_between_expiry_and_renewal() {
        let renewed = spec(serde_json::json!([
            testdata::acquired_entry(""),
            extended("2030-01-01T00:34:12Z", "2030-01-01T01:04:12Z")
        ]));
        let gap = renewal_gap(&renewed).unwrap_or_else(|| panic!("no gap"));
        assert!(
            gap.contains("had expired at 2030-01-01T00:30:00Z; renewed after 4m 12s unprotected; nobody took it over")
                && gap.contains("lock ID id, fencing token 3"),
            "{gap}"
        );
        let extended_live = spec(serde_json::json!([
            testdata::acquired_entry(""),
            extended("2030-01-01T00:20:00Z", "2030-01-01T00:50:00Z")
        ]));
        assert_eq!(renewal_gap(&extended_live), None);
        let at_expiry = spec(serde_json::json!([
            testdata::acquired_entry(""),
            extended("2030-01-01T00:30:00Z", "2030-01-01T01:00:00Z")
        ]));
        let gap = renewal_gap(&at_expiry).unwrap_or_else(|| panic!("no gap at the expiry"));
        assert!(
            gap.contains("renewed after under a second unprotected"),
            "{gap}"
        );
        let only_acquired = spec(serde_json::json!([testdata::acquired_entry("")]));
        assert_eq!(renewal_gap(&only_acquired), None);
    }
}
