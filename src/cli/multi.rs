//! Several environments at once: `acquire`, `release`, `extend`, `wait` and
//! `exec` with `-e` repeated or `--all-environments`, and `release
//! --group-id`. One environment takes the single-environment paths as
//! before (same requests, same output).
//!
//! Acquisition takes the locks in lock order ([`crate::multienv::lock_order`]:
//! by name, so two acquirers never wait for each other in a cycle), all or
//! nothing: when one fails (refused, timed out, interrupted) the ones taken
//! so far are released again, and the error is the failed one's. The
//! holdings share one lock group ID (`spec.holder.groupId`). With
//! --wait-timeout every lock is waited for in turn within one deadline, and
//! the locks already taken are renewed meanwhile, so a long wait does not
//! let them expire.

use std::time::Duration as StdDuration;

use chrono::Utc;
use tokio::time::Instant;

use crate::crd::{LockType, STOP_THE_LINE};
use crate::environment::Environment;
use crate::error::Error;
use crate::multienv;
use crate::queue::{self, interruptible};
use crate::rules::{Actor, Refusal, Request};
use crate::signals::Signals;
use crate::store::{Applied, LockStore, Observed};

use super::args::{AcquireArgs, Action, Cli, GlobalArgs, deadline_after};
use super::progress::WaitProgress;
use super::render::{self, LockView, OutputFormat};
use super::report::{self, ErrorReport, Exit};
use super::{show, writes};

/// How long the locks taken before a failure are retried to be released
/// (at most: never past their expiry).
const RELEASE_RETRY_LIMIT: StdDuration = StdDuration::from_secs(30);

/// What an action acts on, once the cluster is reached.
#[derive(Debug)]
pub enum Targets {
    /// One environment: the single-environment path, as before.
    One(Environment),
    /// Several, in lock order.
    Several(Vec<Environment>),
    /// `release --group-id`: the caller's holdings of that lock group.
    Group(String),
}

/// The actions that take several environments.
fn takes_several(action: &Action) -> bool {
    matches!(
        action,
        Action::Acquire(AcquireArgs { extend: false, .. })
            | Action::Release(_)
            | Action::Extend(_)
            | Action::Wait(_)
            | Action::Exec(_)
    )
}

/// Before anything is sent: several environments only where they are
/// taken, and not with a flag that names one holding.
pub fn check(cli: &Cli) -> Result<(), Error> {
    let global = &cli.global;
    let distinct = multienv::lock_order(&global.environments).len();
    let flag = if global.all_environments {
        Some("--all-environments".to_string())
    } else if distinct > 1 {
        Some(format!("-e/--environment given {distinct} environments"))
    } else {
        None
    };
    if let Action::Release(args) = &cli.action
        && args.group_id.is_some()
        && (global.all_environments || !global.environments.is_empty())
    {
        return Err(Error::InvalidInput(
            "release --group-id finds the environments of the group itself: give no -e/--environment or --all-environments with it".into(),
        ));
    }
    let Some(flag) = flag else {
        return Ok(());
    };
    if let Action::List(_) | Action::Windows(_) = &cli.action {
        return Err(Error::InvalidInput(format!(
            "list and windows show every environment of the namespace, but {flag}: give no -e/--environment"
        )));
    }
    if !takes_several(&cli.action) {
        let what = match &cli.action {
            Action::Acquire(_) => "acquire --extend",
            Action::Status => "status",
            Action::ForceRelease(_) => "force-release",
            Action::History => "history",
            Action::Notify(_) => "notify",
            _ => "this action",
        };
        return Err(Error::InvalidInput(format!(
            "{what} acts on one environment, but {flag}: give one -e/--environment (several are taken by acquire, release, extend, wait and exec)"
        )));
    }
    // Taken in a set it would freeze the set's later locks (or wait on
    // itself): the line is stopped alone.
    if global
        .environments
        .iter()
        .any(|environment| environment.as_str() == STOP_THE_LINE)
    {
        return Err(Error::InvalidInput(format!(
            "{} freezes every other environment of the namespace, but {flag}: stop the line on its own (-e {0})",
            STOP_THE_LINE
        )));
    }
    // An override cannot be undone: with all-or-none, a later lock's failure
    // would have overridden the earlier ones' holders for nothing.
    let force = match &cli.action {
        Action::Acquire(args) => args.force,
        Action::Exec(args) => args.lock.force,
        _ => false,
    };
    if force {
        return Err(Error::InvalidInput(format!(
            "--force overrides one environment at a time, but {flag}: give one -e/--environment per emergency acquire (to stop every deployment of the namespace, hold {})",
            STOP_THE_LINE
        )));
    }
    let lock_id = match &cli.action {
        Action::Release(args) => args.holding.lock_id.is_some(),
        Action::Extend(args) => args.holding.lock_id.is_some(),
        _ => false,
    };
    if lock_id {
        return Err(Error::InvalidInput(format!(
            "--lock-id names one holding, but {flag}: give one -e/--environment with it (or use --group-id)"
        )));
    }
    Ok(())
}

/// The environments the action acts on: for --all-environments, every
/// DeploymentLock of the namespace as the API server lists them (refused
/// when there is none).
pub async fn targets(store: &LockStore, cli: &Cli) -> Result<Targets, Error> {
    let global = &cli.global;
    if let Action::Release(args) = &cli.action
        && let Some(group_id) = &args.group_id
    {
        return Ok(Targets::Group(group_id.clone()));
    }
    if !takes_several(&cli.action) {
        return Ok(Targets::One(global.environment.clone()));
    }
    let mut environments = if global.all_environments {
        let listing = store.list(false).await?;
        let names = listing
            .locks
            .iter()
            .map(|lock| lock.spec.environment.as_str())
            // A malformed lock is still an environment: acting on it fails
            // with a message naming it, rather than being left out silently.
            .chain(listing.malformed.iter().map(|lock| lock.name.as_str()));
        let environments = multienv::all_environments(names);
        if environments.is_empty() {
            return Err(Error::InvalidInput(format!(
                "--all-environments: there is no DeploymentLock in namespace {:?} (besides stop-the-line) to act on; name the environments with -e",
                store.namespace()
            )));
        }
        environments
    } else {
        multienv::lock_order(&global.environments)
    };
    Ok(match environments.len() {
        0 => Targets::One(global.environment.clone()),
        1 => Targets::One(environments.remove(0)),
        _ => Targets::Several(environments),
    })
}

/// `--group-id`'s value: what the schema allows for a lock group ID.
pub fn group_id(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && text.len() <= crate::crd::MAX_ID_LEN
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!(
            "invalid lock group ID {:?}: 1 to {} letters, digits and '-' (as acquire printed it)",
            report::safe_line(text),
            crate::crd::MAX_ID_LEN
        ))
    }
}

/// Runs a multi-environment action.
pub async fn run(
    store: &LockStore,
    cli: &Cli,
    targets: Targets,
    signals: &mut Signals,
) -> Result<Exit, Error> {
    let global = &cli.global;
    let environments = match targets {
        Targets::One(_) => return Err(Error::Api("not a multi-environment action".into())),
        Targets::Group(group_id) => {
            return interruptible(signals, release_group(store, global, &group_id)).await;
        }
        Targets::Several(environments) => environments,
    };
    match &cli.action {
        Action::Acquire(args) => {
            match take_all(store, args, LockType::Manual, &environments, signals).await {
                Ok((group_id, taken)) => Ok(show_taken(global, &group_id, &taken)),
                Err(failed) => Ok(failed.report(store, global)),
            }
        }
        Action::Exec(args) => {
            super::exec::run_several(store, global, args, &environments, signals).await
        }
        Action::Wait(args) => {
            wait_all(store, global, args.wait_timeout, &environments, signals).await
        }
        Action::Release(args) => {
            let each = environments.iter().map(|env| (env.clone(), None)).collect();
            let released = release_each(store, global, args.deployment_id.as_deref(), each);
            interruptible(signals, released).await
        }
        Action::Extend(args) => {
            interruptible(
                signals,
                extend_each(store, global, args.duration, &environments),
            )
            .await
        }
        _ => Err(Error::Api("not a multi-environment action".into())),
    }
}

/// A lock taken by a multi-environment acquire.
#[derive(Debug)]
pub struct Taken {
    pub environment: Environment,
    /// Its acquisition (the lock as last renewed while later locks were
    /// waited for).
    pub applied: Applied,
}

/// Why a multi-environment acquire failed: the lock that failed and its
/// error, and what became of the locks taken before it.
#[derive(Debug)]
pub struct Failed {
    pub environment: Environment,
    pub error: Error,
    pub released: Vec<Environment>,
    /// Locks that could not be released (environment, lock ID, why): they
    /// stay held until they expire.
    pub left_held: Vec<(Environment, String, String)>,
}

impl Failed {
    /// Says what failed and what was released (loudly what could not be),
    /// and returns the failed lock's exit code.
    pub fn report(&self, store: &LockStore, global: &GlobalArgs) -> Exit {
        let now = store.server_clock().now().unwrap_or_else(Utc::now);
        let scope = report::global_scope_flags(global);
        let (message, exit) = report::describe_for(&self.error, &self.environment, &scope, now);
        eprintln!(
            "deploylock: could not acquire {}",
            named(&self.environment, &message)
        );
        if !self.released.is_empty() {
            eprintln!(
                "deploylock: released again the locks taken before it: {}",
                multienv::space_separated(&self.released)
            );
        }
        for (environment, lock_id, why) in &self.left_held {
            eprintln!(
                "deploylock: WARNING: could not release {environment} (lock ID {}), taken before {} failed: {}; it stays held by you until it expires: release it with `deploylock{scope} -e {environment} release --lock-id {}`",
                render::Safe(lock_id),
                self.environment,
                report::safe_line(why),
                render::Safe(lock_id),
            );
        }
        if global.output != OutputFormat::Table && report::is_refusal(&self.error) {
            let report = ErrorReport::new(&self.error, &self.environment, &scope, now);
            out!("{}", render::structured(&report, global.output));
        }
        if self.left_held.is_empty() {
            exit
        } else {
            // Some lock stays held although the acquire failed: the failed
            // lock's code would hide it.
            Exit::Failure
        }
    }
}

/// Takes the locks of `environments` (in lock order) in one lock group, all
/// or none.
pub async fn take_all(
    store: &LockStore,
    args: &AcquireArgs,
    lock_type: LockType,
    environments: &[Environment],
    signals: &mut Signals,
) -> Result<(String, Vec<Taken>), Box<Failed>> {
    let group_id = multienv::new_group_id();
    // One deadline for all the waits.
    let deadline = deadline_after(args.wait_timeout);
    let mut taken: Vec<Taken> = Vec::with_capacity(environments.len());
    for environment in environments {
        let take = writes::take_one(
            store,
            environment,
            args,
            lock_type,
            Some(group_id.clone()),
            deadline,
            signals,
        );
        let result = if deadline.is_some() && !taken.is_empty() {
            tokio::select! {
                result = take => result.map_err(|error| (environment.clone(), error)),
                lost = keep_taken_alive(store, &mut taken, args.duration) => Err(lost),
            }
        } else {
            take.await.map_err(|error| (environment.clone(), error))
        };
        match result {
            Ok(applied) => taken.push(Taken {
                environment: environment.clone(),
                applied,
            }),
            Err((failed, error)) => {
                let mut holdings: Vec<(Environment, Observed)> = taken
                    .into_iter()
                    .map(|entry| (entry.environment, entry.applied.observed))
                    .collect();
                if let Some(stray) = stray_holding(store, environment, &group_id).await {
                    holdings.push((environment.clone(), stray));
                }
                let (released, left_held) = release_taken(store, &holdings, signals).await;
                return Err(Box::new(Failed {
                    environment: failed,
                    error,
                    released,
                    left_held,
                }));
            }
        }
    }
    Ok((group_id, taken))
}

/// While later locks are waited for: renews each lock taken so far at a
/// third of its duration. Ends only when one cannot be kept (its
/// environment and why).
async fn keep_taken_alive(
    store: &LockStore,
    taken: &mut [Taken],
    duration: chrono::Duration,
) -> (Environment, Error) {
    let seconds = u64::try_from(duration.num_seconds()).unwrap_or(60);
    let interval =
        StdDuration::from_millis(seconds.saturating_mul(1000) / 3).max(StdDuration::from_secs(1));
    loop {
        // The holding renewed longest ago goes first.
        let Some((index, at)) = taken
            .iter()
            .enumerate()
            .map(|(index, t)| (index, t.applied.observed.sent + interval))
            .min_by_key(|(_, at)| *at)
        else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(at).await;
        let Some(entry) = taken.get_mut(index) else {
            continue;
        };
        let Some(holder) = entry.applied.observed.holder().cloned() else {
            return (
                entry.environment.clone(),
                Error::Api("the lock was written without a holder".into()),
            );
        };
        let request = Request::Extend {
            actor: Actor::new(holder.user.clone(), Some(holder.owner.clone())),
            duration,
            lock_id: Some(holder.lock_id.clone()),
            not_after: None,
        };
        match store.apply(&entry.environment, &request).await {
            // The lock as renewed; the outcome stays the acquisition's (a
            // takeover of an expired lock is still reported as one).
            Ok(renewed) => entry.applied.observed = renewed.observed,
            Err(err) if err.is_transient() => {
                let expiry = entry.applied.observed.earliest_local(holder.expires_at);
                if Instant::now() + StdDuration::from_secs(1) >= expiry {
                    return (entry.environment.clone(), err);
                }
                tracing::warn!(environment = %entry.environment, error = %err, "renewal while waiting failed; retrying");
                tokio::time::sleep(StdDuration::from_secs(1)).await;
            }
            Err(err) => return (entry.environment.clone(), err),
        }
    }
}

/// The holding of lock group `group_id` on `environment`, if the take that
/// failed there was written after all (a signal, a timeout or a lost
/// renewal cut it short after the server had accepted it). Only this
/// process knows the new group ID, so a holding carrying it is ours.
async fn stray_holding(
    store: &LockStore,
    environment: &Environment,
    group_id: &str,
) -> Option<Observed> {
    let observed = match store.read(environment).await {
        Ok(observed) => observed,
        Err(err) => {
            tracing::warn!(%environment, error = %err, "cannot check for a holding written without its answer");
            return None;
        }
    };
    let ours = observed
        .holder()
        .is_some_and(|holder| holder.group_id.as_deref() == Some(group_id));
    ours.then_some(observed)
}

/// Releases the locks taken before a failure (as last seen), each retried
/// for a while (a signal ends the retries). Returns the released ones and
/// those left held.
#[allow(clippy::type_complexity)]
async fn release_taken(
    store: &LockStore,
    holdings: &[(Environment, Observed)],
    signals: &mut Signals,
) -> (Vec<Environment>, Vec<(Environment, String, String)>) {
    let mut released = Vec::new();
    let mut left_held = Vec::new();
    for (environment, observed) in holdings.iter().rev() {
        let Some(holder) = observed.holder() else {
            continue;
        };
        let until = observed
            .earliest_local(holder.expires_at)
            .min(Instant::now() + RELEASE_RETRY_LIMIT);
        let request = Request::Release {
            actor: Actor::new(holder.user.clone(), Some(holder.owner.clone())),
            lock_id: Some(holder.lock_id.clone()),
        };
        match release_retrying(store, environment, &request, until, signals).await {
            Ok(true) => released.push(environment.clone()),
            // Already not ours (taken over, force-released): nothing left.
            Ok(false) => {}
            Err(why) => left_held.push((environment.clone(), holder.lock_id.clone(), why)),
        }
    }
    released.reverse();
    (released, left_held)
}

/// One release, retrying transient faults until `until`: Ok(true) once
/// released, Ok(false) if the holding was already over (taken over,
/// force-released: nothing of ours is left).
async fn release_retrying(
    store: &LockStore,
    environment: &Environment,
    request: &Request,
    until: Instant,
    signals: &mut Signals,
) -> Result<bool, String> {
    let mut backoff = StdDuration::from_millis(250);
    loop {
        let attempt = tokio::time::timeout_at(until, store.apply(environment, request));
        let err = match attempt.await {
            Ok(Ok(_)) => return Ok(true),
            Ok(Err(Error::Refused(
                Refusal::LockLost { .. } | Refusal::NotHolder(_) | Refusal::NotHeld,
            ))) => {
                return Ok(false);
            }
            Ok(Err(err)) => err,
            Err(_) => return Err("no answer from the API server in time".into()),
        };
        if !(err.is_transient() || err.is_authorization_refusal())
            || Instant::now() + backoff >= until
        {
            return Err(err.to_string());
        }
        tracing::warn!(%environment, error = %err, "release failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = signals.next() => return Err(format!("{err} (retries interrupted by a signal)")),
        }
        backoff = (backoff * 2).min(StdDuration::from_secs(4));
    }
}

/// After a multi-environment acquire: each lock as a single acquire shows
/// it, then the lock group ID; with -o json|yaml one list of the locks.
fn show_taken(global: &GlobalArgs, group_id: &str, taken: &[Taken]) -> Exit {
    if global.output == OutputFormat::Table {
        for entry in taken {
            let _ = show::applied(global, &entry.applied, "acquired");
        }
        outln!(
            "lock group ID {group_id} ({} environments: {})",
            taken.len(),
            multienv::space_separated(taken.iter().map(|t| &t.environment))
        );
    } else {
        let views: Vec<LockView> = taken.iter().map(|t| view_of(&t.applied.observed)).collect();
        out!("{}", render::structured(&views, global.output));
    }
    Exit::Success
}

fn view_of(observed: &Observed) -> LockView {
    LockView::new(
        &observed.namespace,
        observed.environment.as_str(),
        observed.lock.as_ref(),
        observed.server_time,
    )
}

/// The outcome of one environment of a release or extend of several.
enum Each {
    Done(Applied),
    /// `release --deployment-id`: held by another deployment, left alone.
    NotHeldBy(Observed),
    Failed(Environment, Error),
}

/// Reports each environment's outcome (a table line, or one list with -o
/// json|yaml holding the locks and `{"error": …}` objects) and returns the
/// exit code: 0 if all succeeded, else the first failed environment's code
/// (in lock order).
fn report_each(
    store: &LockStore,
    global: &GlobalArgs,
    verb: &str,
    deployment_id: Option<&str>,
    each: Vec<Each>,
) -> Exit {
    // Times in the messages are the API server's, like a single lock's.
    let now = store.server_clock().now().unwrap_or_else(Utc::now);
    let scope = report::global_scope_flags(global);
    let mut exit = Exit::Success;
    let mut documents = Vec::new();
    for outcome in each {
        match outcome {
            Each::Done(applied) => {
                if global.output == OutputFormat::Table {
                    let _ = show::applied(global, &applied, verb);
                } else {
                    documents.push(serde_json::to_value(view_of(&applied.observed)));
                }
            }
            Each::NotHeldBy(observed) => {
                if global.output == OutputFormat::Table {
                    show::not_held_by(global, &observed, deployment_id.unwrap_or_default());
                } else {
                    documents.push(serde_json::to_value(view_of(&observed)));
                }
            }
            Each::Failed(environment, error) => {
                let (message, code) = report::describe_for(&error, &environment, &scope, now);
                eprintln!("deploylock: {}", named(&environment, &message));
                if exit == Exit::Success {
                    exit = code;
                }
                if global.output != OutputFormat::Table {
                    let report = ErrorReport::new(&error, &environment, &scope, now);
                    documents.push(serde_json::to_value(report));
                }
            }
        }
    }
    if global.output != OutputFormat::Table {
        let documents: Vec<serde_json::Value> =
            documents.into_iter().filter_map(Result::ok).collect();
        out!("{}", render::structured(&documents, global.output));
    }
    exit
}

/// `release` of several environments (`lock_id` per environment for a
/// group's holdings): each on its own, every one attempted.
async fn release_each(
    store: &LockStore,
    global: &GlobalArgs,
    deployment_id: Option<&str>,
    targets: Vec<(Environment, Option<String>)>,
) -> Result<Exit, Error> {
    let actor = Actor::new(store.whoami().await?, None);
    let mut each = Vec::with_capacity(targets.len());
    for (environment, lock_id) in targets {
        let lock_id = match (deployment_id, lock_id) {
            (_, Some(lock_id)) => Some(lock_id),
            (None, None) => None,
            (Some(deployment_id), None) => match store.read(&environment).await {
                Ok(observed) => match show::holding_of_deployment(&observed, deployment_id) {
                    Some(lock_id) => Some(lock_id),
                    None => {
                        each.push(Each::NotHeldBy(observed));
                        continue;
                    }
                },
                Err(error) => {
                    each.push(Each::Failed(environment, error));
                    continue;
                }
            },
        };
        let request = Request::Release {
            actor: actor.clone(),
            lock_id,
        };
        each.push(match store.apply(&environment, &request).await {
            Ok(applied) => Each::Done(applied),
            Err(error) => Each::Failed(environment, error),
        });
    }
    Ok(report_each(store, global, "released", deployment_id, each))
}

/// `release --group-id`: the caller's holdings of that lock group in the
/// namespace, each by its lock ID (a group ID is chosen by clients: another
/// user's holding may carry the same one, and is left alone).
async fn release_group(
    store: &LockStore,
    global: &GlobalArgs,
    group_id: &str,
) -> Result<Exit, Error> {
    let user = store.whoami().await?;
    let listing = store.list(false).await?;
    let mut targets: Vec<(Environment, Option<String>)> = listing
        .locks
        .iter()
        .filter_map(|lock| {
            let holder = lock.spec.holder.as_ref()?;
            if holder.group_id.as_deref() != Some(group_id) || holder.user != user {
                return None;
            }
            let environment = lock.spec.environment.parse().ok()?;
            Some((environment, Some(holder.lock_id.clone())))
        })
        .collect();
    targets.sort();
    if targets.is_empty() {
        if global.output == OutputFormat::Table {
            outln!(
                "no lock of namespace {} is held in lock group {}: nothing to release",
                store.namespace(),
                render::Safe(group_id)
            );
        } else {
            out!(
                "{}",
                render::structured(&Vec::<LockView>::new(), global.output)
            );
        }
        return Ok(Exit::Success);
    }
    release_each(store, global, None, targets).await
}

/// `extend` of several environments: each on its own, every one attempted.
async fn extend_each(
    store: &LockStore,
    global: &GlobalArgs,
    duration: chrono::Duration,
    environments: &[Environment],
) -> Result<Exit, Error> {
    let actor = Actor::new(store.whoami().await?, None);
    let mut each = Vec::with_capacity(environments.len());
    for environment in environments {
        let request = Request::Extend {
            actor: actor.clone(),
            duration,
            lock_id: None,
            not_after: None,
        };
        each.push(match store.apply(environment, &request).await {
            Ok(applied) => Each::Done(applied),
            Err(error) => Each::Failed(environment.clone(), error),
        });
    }
    Ok(report_each(store, global, "extended", None, each))
}

/// `wait` for several: until all of them are free at once (each waited for
/// in turn, then all read again; one taken meanwhile is waited for anew).
async fn wait_all(
    store: &LockStore,
    global: &GlobalArgs,
    wait_timeout: Option<u64>,
    environments: &[Environment],
    signals: &mut Signals,
) -> Result<Exit, Error> {
    let deadline = deadline_after(wait_timeout);
    loop {
        for environment in environments {
            let mut progress = WaitProgress::new(environment);
            let waited = queue::wait_until_free(store, environment, deadline, &mut progress);
            if let Err(error) = interruptible(signals, waited).await {
                return Ok(fail_on(global, store, environment, &error));
            }
        }
        let mut observed = Vec::with_capacity(environments.len());
        for environment in environments {
            match interruptible(signals, store.read(environment)).await {
                Ok(read) => observed.push(read),
                Err(error) => return Ok(fail_on(global, store, environment, &error)),
            }
        }
        let all_free = observed.iter().all(|o| {
            o.holder()
                .is_none_or(|_| o.state() == crate::crd::LockState::Expired)
        });
        if all_free {
            if global.output != OutputFormat::Table {
                let views: Vec<LockView> = observed.iter().map(view_of).collect();
                out!("{}", render::structured(&views, global.output));
            }
            return Ok(Exit::Success);
        }
    }
}

/// Says on stderr why one of several environments failed (naming it) and
/// returns its exit code; with -o json|yaml a refusal is also a report on
/// stdout, as for one environment.
fn fail_on(
    global: &GlobalArgs,
    store: &LockStore,
    environment: &Environment,
    error: &Error,
) -> Exit {
    let now = store.server_clock().now().unwrap_or_else(Utc::now);
    let scope = report::global_scope_flags(global);
    let (message, exit) = report::describe_for(error, environment, &scope, now);
    eprintln!("deploylock: {}", named(environment, &message));
    if global.output != OutputFormat::Table && report::is_refusal(error) {
        let report = ErrorReport::new(error, environment, &scope, now);
        out!("{}", render::structured(&report, global.output));
    }
    exit
}

/// `message` about one of several environments, starting with its name
/// ("b: …"); most messages already do.
fn named(environment: &Environment, message: &str) -> String {
    if message.starts_with(&format!("{environment}:")) {
        message.to_string()
    } else {
        format!("{environment}: {message}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `check` of a command line (words split at spaces).
    fn check_of(line: &str) -> Result<(), Error> {
        use clap::Parser as _;
        let args: Vec<&str> = line.split_whitespace().collect();
        let cli = Cli::try_parse_from(args).unwrap_or_else(|err| panic!("{err}"));
        check(&cli)
    }

    fn assert_refused(line: &str, words: &str) {
        let refused = check_of(line);
        assert!(
            matches!(&refused, Err(Error::InvalidInput(message)) if message.contains(words)),
            "{line}: {refused:?}"
        );
    }

    #[test]
    fn messages_of_one_of_several_name_it_once() {
        let b: Environment = "b".parse().unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(
            named(&b, "b: the lock is held by bob"),
            "b: the lock is held by bob"
        );
        assert_eq!(
            named(&b, "timed out waiting for b"),
            "b: timed out waiting for b"
        );
        assert_eq!(named(&b, "bob holds it"), "b: bob holds it");
    }

    #[test]
    fn stop_the_line_is_stopped_alone() {
        assert_refused(
            "deploylock -e stop-the-line -e zz acquire --reason x",
            "stop the line on its own",
        );
        assert!(check_of("deploylock -e stop-the-line acquire --reason x").is_ok());
    }

    #[test]
    fn force_takes_one_environment_at_a_time() {
        for line in [
            "deploylock -e a -e b acquire --reason x --force",
            "deploylock --all-environments acquire --reason x --force",
            "deploylock -e a -e b exec --reason x --force -- true",
        ] {
            assert_refused(line, "--force overrides one environment at a time");
        }
        assert!(check_of("deploylock -e a acquire --reason x --force").is_ok());
        assert!(check_of("deploylock -e a -e b acquire --reason x").is_ok());
    }

    #[test]
    fn group_ids_are_checked_like_the_schema() {
        assert!(group_id("5f0c0f6e-1b2a-4c3d-9e8f-0a1b2c3d4e5f").is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(65), "\u{1b}[31m"] {
            assert!(group_id(bad).is_err(), "{bad:?}");
        }
    }
}
