//! Holding a lock while a command runs (`deploylock exec`).
//!
//! Safety rests on a local deadline, not on the network: the command must be
//! dead before its holding can expire on the API server's clock. Each
//! successful renewal moves that deadline (see [`StopDeadlines`]); if none
//! comes in time the command gets SIGTERM at `deadline - grace` and SIGKILL at
//! the deadline, whatever the network does. Renewals start at a third of the
//! duration and are retried every few seconds on failure, so a healthy
//! network never gets near the deadline.
//!
//! The command does not run as exec's child but under a small watchdog
//! (this binary re-executed in a hidden mode, in a process group of its own):
//! it is the command's parent and a child subreaper, so everything the
//! command starts stays below it. It knows the deadlines and kills the
//! command's whole tree at them on its own, and at once (SIGTERM, then SIGKILL
//! after the grace, never later than the deadline) when exec disappears: it
//! holds the read end of a pipe only exec writes to, which closes however
//! exec ends (SIGKILL of exec or of exec's process group included).
//!
//! The lock object is watched too: the moment it names another holding (a
//! force-release, a takeover) the command is stopped the same way.
//!
//! With several environments (`-e a -e b`) every holding is renewed and
//! watched on its own; the deadlines the command is stopped at are the
//! earliest over all of them ([`StopDeadlines::earliest`]), and the loss of
//! any one stops the command.
//!
//! When the command exits each holding is released, retried until it
//! succeeds or the holding expires; a holding found already taken or released then (a loss
//! the watch could not see in time, e.g. on a partitioned connection) is
//! reported as a loss, never as success.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt as _;
use std::process::ExitCode;
use std::time::Duration as StdDuration;

use chrono::Duration;
use futures::TryStreamExt;
use kube::api::WatchEvent;
use nix::sys::signal::{SigSet, Signal, kill, killpg};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::crd::{DeploymentLockSpec, HistoryAction, LockHolder};
use crate::environment::Environment;
use crate::error::Error;
use crate::rules::{Actor, Refusal, Request};
use crate::store::{LockStore, Observed};

/// Moved to [`crate::signals`]; named here too for existing callers.
pub use crate::signals::Signals;

/// Time allowed, besides the clock uncertainty, for the kill to land:
/// scheduling, signal delivery, the kernel tearing processes down.
pub const SAFETY_MARGIN: StdDuration = StdDuration::from_secs(1);

/// Clock rate uncertainty between this machine and the API server, as a
/// fraction of the time measured (1/1000: twice NTP's worst slew).
const DRIFT_DIVISOR: u32 = 1000;

/// Longest pause between renewal attempts after a failure.
const MAX_RENEWAL_BACKOFF: StdDuration = StdDuration::from_secs(4);

/// The local instants at which the command of a holding is stopped.
///
/// `expiry` is the earliest local instant at which the API server's clock
/// can read the holding's `expiresAt` ([`Observed::earliest_local`]: the
/// request's send instant, minus the `Date` header's second). The command
/// gets SIGKILL at `expiry - margin` and SIGTERM `grace` before that; the
/// margin is [`SAFETY_MARGIN`] plus the clock drift over the time measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopDeadlines {
    pub term: Instant,
    pub kill: Instant,
    pub expiry: Instant,
}

impl StopDeadlines {
    /// The deadlines of a holding expiring at `expires_at`, as known from
    /// `observed` (the read its expiry was decided on, or any later one).
    pub fn for_holding(
        observed: &Observed,
        expires_at: chrono::DateTime<chrono::Utc>,
        grace: StdDuration,
    ) -> Self {
        let expiry = observed.earliest_local(expires_at);
        let measured = expiry.saturating_duration_since(observed.sent);
        let margin = SAFETY_MARGIN + measured / DRIFT_DIVISOR;
        // Rounded toward safety: a deadline that would fall before the
        // measurement is the measurement itself (stop at once).
        let kill = expiry.checked_sub(margin).unwrap_or(observed.sent);
        let term = kill.checked_sub(grace).unwrap_or(observed.sent);
        StopDeadlines {
            term: term.max(observed.sent),
            kill: kill.max(observed.sent),
            expiry,
        }
    }

    /// The earliest of each deadline over several holdings: the command
    /// must be stopped before any one of them can expire. None for none.
    pub fn earliest(all: impl IntoIterator<Item = StopDeadlines>) -> Option<Self> {
        all.into_iter().reduce(|a, b| StopDeadlines {
            term: a.term.min(b.term),
            kill: a.kill.min(b.kill),
            expiry: a.expiry.min(b.expiry),
        })
    }
}

/// One lock held for the command.
#[derive(Clone, Debug)]
pub struct HeldLock {
    pub environment: Environment,
    /// The holding taken for the command.
    pub holding: LockHolder,
    pub fencing_token: i64,
    /// When the command must be stopped unless the holding is renewed.
    pub deadlines: StopDeadlines,
    /// The local instant of the request whose answer gave the holding (or
    /// its last renewal).
    pub taken_at: Instant,
}

/// What `exec` needs besides the store.
#[derive(Clone, Debug)]
pub struct ExecPlan {
    pub actor: Actor,
    /// The locks held for the command, in lock order: at least one.
    pub held: Vec<HeldLock>,
    /// The lock group ID of the holdings, when there are several.
    pub group_id: Option<String>,
    /// Time between SIGTERM and SIGKILL once the lock is lost.
    pub grace: StdDuration,
    pub command: Vec<String>,
}

impl ExecPlan {
    /// The variables the command runs with. With one environment:
    /// DEPLOYLOCK_ENVIRONMENT, DEPLOYLOCK_LOCK_ID and DEPLOYLOCK_FENCING_TOKEN
    /// of its holding; with several, space-separated lists of them in lock
    /// order (the n-th lock ID and token are the n-th environment's), and
    /// DEPLOYLOCK_GROUP_ID.
    pub fn command_environment(&self, namespace: &str) -> BTreeMap<&'static str, String> {
        use crate::multienv::space_separated;
        let held = &self.held;
        let mut env = BTreeMap::from([
            (
                "DEPLOYLOCK_ENVIRONMENT",
                space_separated(held.iter().map(|h| &h.environment)),
            ),
            ("DEPLOYLOCK_NAMESPACE", namespace.to_string()),
            (
                "DEPLOYLOCK_LOCK_ID",
                space_separated(held.iter().map(|h| &h.holding.lock_id)),
            ),
            (
                "DEPLOYLOCK_HOLDER",
                held.first()
                    .map(|h| h.holding.user.clone())
                    .unwrap_or_else(|| self.actor.user.clone()),
            ),
            (
                "DEPLOYLOCK_FENCING_TOKEN",
                space_separated(held.iter().map(|h| h.fencing_token)),
            ),
        ]);
        if let Some(group_id) = &self.group_id {
            env.insert("DEPLOYLOCK_GROUP_ID", group_id.clone());
        }
        env
    }
}

/// How the command ended.
#[derive(Debug)]
pub enum ExecOutcome {
    /// The child exited on its own; `code` is its exit code (128 + signal
    /// number when a signal ended it). `release_error` says why the holding
    /// could not be released, if it could not (it expires on its own).
    Exited {
        code: i32,
        release_errors: Vec<(Environment, String)>,
    },
    /// The command could not be started (the lock was released).
    CouldNotStart { error: String },
    /// The lock of `environment` was lost while the child ran; the child
    /// was stopped. `renewal_error` says why renewing failed, when that was
    /// the cause; `release_errors` name the other holdings that could not
    /// be released afterwards.
    LockLost {
        environment: Environment,
        now_held_by: Option<Box<LockHolder>>,
        release_errors: Vec<(Environment, String)>,
        renewal_error: Option<String>,
        child_code: i32,
    },
}

#[derive(Debug)]
enum Loss {
    TakenBy(Option<Box<LockHolder>>),
    RenewalFailed(String),
}

/// What the renewal and watch tasks tell the main loop, each about the
/// holding at an index of [`ExecPlan::held`].
#[derive(Debug)]
enum Event {
    Renewed(usize, StopDeadlines),
    RenewalFailed(usize, String),
    Lost(usize, Loss),
}

/// Runs the command while holding the lock, then releases it. `signals`
/// were taken over before the lock was acquired, so that no SIGTERM can end
/// this process between acquiring and releasing.
pub async fn run_while_holding(
    store: &LockStore,
    plan: ExecPlan,
    signals: &mut Signals,
) -> Result<ExecOutcome, Error> {
    if plan.command.is_empty() {
        return Err(Error::InvalidInput(
            "exec needs a command after `--`, e.g. deploylock exec --reason \"deploy\" -- ./deploy.sh".into(),
        ));
    }
    let env = plan.command_environment(store.namespace());
    let mut per_holding: Vec<StopDeadlines> = plan.held.iter().map(|h| h.deadlines).collect();
    let Some(mut deadlines) = StopDeadlines::earliest(per_holding.iter().copied()) else {
        return Err(Error::InvalidInput("exec holds no lock".into()));
    };
    let mut watchdog = match Watchdog::start(&plan, deadlines, &env).await {
        Ok(watchdog) => watchdog,
        Err(error) => {
            for (held, until) in plan.held.iter().zip(&per_holding) {
                let released = release(store, &plan.actor, held, until.expiry, signals).await;
                if let Err(err) = released {
                    tracing::warn!(environment = %held.environment, error = %err, "could not release the lock; it will expire on its own");
                }
            }
            return Ok(ExecOutcome::CouldNotStart { error });
        }
    };

    let (event_sender, mut events) = mpsc::channel::<Event>(8);
    let mut tasks = Vec::with_capacity(plan.held.len() * 2);
    for (index, held) in plan.held.iter().enumerate() {
        tasks.push(tokio::spawn(keep_alive(
            store.clone(),
            plan.actor.clone(),
            held.clone(),
            index,
            plan.grace,
            event_sender.clone(),
        )));
        tasks.push(tokio::spawn(watch_for_loss(
            store.clone(),
            held.clone(),
            index,
            event_sender.clone(),
        )));
    }
    drop(event_sender);

    let mut last_renewal_errors: Vec<Option<String>> = vec![None; plan.held.len()];
    let mut stopping: Option<(usize, Loss)> = None;
    let code = loop {
        tokio::select! {
            status = watchdog.child.wait() => break exit_code(status),
            Some(event) = events.recv(), if stopping.is_none() => match event {
                Event::Renewed(index, renewed) => {
                    if let Some(slot) = per_holding.get_mut(index) {
                        *slot = renewed;
                    }
                    if let Some(slot) = last_renewal_errors.get_mut(index) {
                        *slot = None;
                    }
                    // The earliest over all holdings: one renewed holding
                    // must not move the deadline of another.
                    if let Some(earliest) = StopDeadlines::earliest(per_holding.iter().copied()) {
                        deadlines = earliest;
                    }
                    watchdog.send_deadlines(deadlines).await;
                }
                Event::RenewalFailed(index, why) => {
                    if let Some(slot) = last_renewal_errors.get_mut(index) {
                        *slot = Some(why);
                    }
                }
                Event::Lost(index, loss) => {
                    watchdog.send("stop").await;
                    stopping = Some((index, loss));
                }
            },
            // The watchdog stops the command at the same instant on its own;
            // this is for the report (and in case the watchdog is wedged).
            _ = tokio::time::sleep_until(deadlines.term), if stopping.is_none() => {
                watchdog.send("stop").await;
                // The holding whose deadline came first.
                let index = per_holding
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, d)| d.term)
                    .map_or(0, |(index, _)| index);
                let why = last_renewal_errors
                    .get_mut(index)
                    .and_then(Option::take)
                    .unwrap_or_else(|| "no renewal succeeded in time".to_string());
                stopping = Some((index, Loss::RenewalFailed(why)));
            }
            _ = tokio::time::sleep_until(deadlines.kill), if stopping.is_some() => {
                // Belt and braces: the watchdog kills the whole tree now.
                signal_group(watchdog.command, Signal::SIGKILL);
                // Once only: the watchdog ends when the tree is gone.
                deadlines.kill = Instant::now() + StdDuration::from_secs(3600);
            }
            Some(received) = signals.next() => {
                watchdog.send(&format!("signal {}", received as i32)).await;
            }
        }
    };
    for task in &tasks {
        task.abort();
    }
    drop(watchdog);
    Ok(conclude(store, &plan, &per_holding, stopping, code, signals).await)
}

/// After the command ended: release the holdings (but one lost to someone
/// else) and say how it went.
async fn conclude(
    store: &LockStore,
    plan: &ExecPlan,
    per_holding: &[StopDeadlines],
    stopping: Option<(usize, Loss)>,
    code: i32,
    signals: &mut Signals,
) -> ExecOutcome {
    let mut release_errors = Vec::new();
    let Some((lost_index, loss)) = stopping else {
        let mut gone = None;
        for (held, deadlines) in plan.held.iter().zip(per_holding) {
            match release(store, &plan.actor, held, deadlines.expiry, signals).await {
                Ok(Released::Now) => {}
                // Taken over (or force-released) while the command ran, and
                // neither the watch nor a renewal saw it before the command
                // ended: the command ran without the lock, which must not
                // read as success.
                Ok(Released::AlreadyGone(now_held_by)) => {
                    if gone.is_none() {
                        gone = Some((held.environment.clone(), now_held_by));
                    }
                }
                Err(why) => release_errors.push((held.environment.clone(), why)),
            }
        }
        return match gone {
            Some((environment, now_held_by)) => ExecOutcome::LockLost {
                environment,
                now_held_by,
                release_errors,
                renewal_error: None,
                child_code: code,
            },
            None => ExecOutcome::Exited {
                code,
                release_errors,
            },
        };
    };
    let (now_held_by, renewal_error) = match loss {
        Loss::TakenBy(holder) => (holder, None),
        Loss::RenewalFailed(why) => (None, Some(why)),
    };
    for (index, (held, deadlines)) in plan.held.iter().zip(per_holding).enumerate() {
        if index == lost_index {
            if renewal_error.is_some() {
                // The holding may still be valid for a moment: free it
                // for the next one if the server can be reached.
                let _ = release(store, &plan.actor, held, deadlines.expiry, signals).await;
            }
            continue;
        }
        match release(store, &plan.actor, held, deadlines.expiry, signals).await {
            Ok(_) => {}
            Err(why) => release_errors.push((held.environment.clone(), why)),
        }
    }
    ExecOutcome::LockLost {
        environment: plan
            .held
            .get(lost_index)
            .map(|held| held.environment.clone())
            .unwrap_or_else(Environment::production),
        now_held_by,
        release_errors,
        renewal_error,
        child_code: code,
    }
}

fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => status
            .code()
            .or_else(|| status.signal().map(|signal| 128 + signal))
            .unwrap_or(1),
        Err(_) => 1,
    }
}

fn signal_group(group: Option<Pid>, signal: Signal) {
    if let Some(group) = group {
        // The group may already be gone; nothing to do then.
        let _ = killpg(group, signal);
    }
}

/// How exec's release of its holding went.
enum Released {
    /// The holding was ours and is released.
    Now,
    /// The holding had already ended: taken over or released by someone
    /// else (the current holder, if any).
    AlreadyGone(Option<Box<LockHolder>>),
}

/// Whether the lock's history records the release of holding `lock_id` by
/// `user` (its holder).
fn released_by(spec: &DeploymentLockSpec, user: &str, lock_id: &str) -> bool {
    spec.history.iter().rev().any(|entry| {
        entry.action == HistoryAction::Released && entry.lock_id == lock_id && entry.by == user
    })
}

/// Releases the holding, retrying transient failures until `until` (the
/// holding's earliest expiry: after it there is nothing left to release).
/// A signal ends the retries.
async fn release(
    store: &LockStore,
    actor: &Actor,
    held: &HeldLock,
    until: Instant,
    signals: &mut Signals,
) -> Result<Released, String> {
    let request = Request::Release {
        actor: actor.clone(),
        lock_id: Some(held.holding.lock_id.clone()),
    };
    let mut backoff = StdDuration::from_millis(250);
    // Whether an earlier attempt may have been written without its answer
    // reaching us (a timeout, a dropped connection).
    let mut unanswered = false;
    loop {
        let attempt = tokio::time::timeout_at(until, store.try_apply(&held.environment, &request));
        let err = match attempt.await {
            Ok(Ok(Ok(_))) => return Ok(Released::Now),
            // Not ours any more: nothing to release, and the command ran
            // without the lock, unless the holding ended by our own
            // earlier attempt.
            Ok(Ok(Err(refused))) => {
                let ours = refused
                    .observed
                    .spec()
                    .is_some_and(|spec| released_by(spec, &actor.user, &held.holding.lock_id));
                if unanswered && ours {
                    return Ok(Released::Now);
                }
                match refused.refusal {
                    Refusal::LockLost { current, .. } => {
                        return Ok(Released::AlreadyGone(current));
                    }
                    Refusal::NotHolder(holder) => return Ok(Released::AlreadyGone(Some(holder))),
                    refusal => Error::Refused(refusal),
                }
            }
            Ok(Err(err)) => err,
            Err(_) => return Err("the holding expired before the API server answered".into()),
        };
        unanswered |= err.is_transient();
        if !(err.is_transient() || err.is_authorization_refusal())
            || Instant::now() + backoff >= until
        {
            return Err(err.to_string());
        }
        tracing::warn!(error = %err, "release failed; retrying until the lock would expire");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = signals.next() => return Err(format!("{err} (retries interrupted by a signal)")),
        }
        backoff = (backoff * 2).min(MAX_RENEWAL_BACKOFF);
    }
}

/// Renews at a third of the duration from the last renewal; on failure
/// retries quickly (the main loop stops the command at the deadline).
async fn keep_alive(
    store: LockStore,
    actor: Actor,
    held: HeldLock,
    index: usize,
    grace: StdDuration,
    events: mpsc::Sender<Event>,
) {
    let duration = Duration::seconds(held.holding.duration_seconds);
    let seconds = u64::try_from(held.holding.duration_seconds).unwrap_or(60);
    let interval =
        StdDuration::from_millis(seconds.saturating_mul(1000) / 3).max(StdDuration::from_secs(1));
    let mut next_renewal = held.taken_at + interval;
    let mut backoff = StdDuration::from_millis(500);
    loop {
        tokio::time::sleep_until(next_renewal).await;
        let request = Request::Extend {
            actor: actor.clone(),
            duration,
            lock_id: Some(held.holding.lock_id.clone()),
            not_after: None,
        };
        let event = match store.apply(&held.environment, &request).await {
            Ok(applied) => {
                let observed = &applied.observed;
                backoff = StdDuration::from_millis(500);
                next_renewal = observed.sent + interval;
                match observed.holder() {
                    Some(holder) if holder.lock_id == held.holding.lock_id => {
                        tracing::debug!(environment = %held.environment, expires_at = %holder.expires_at, "lock renewed");
                        Event::Renewed(
                            index,
                            StopDeadlines::for_holding(observed, holder.expires_at, grace),
                        )
                    }
                    other => Event::Lost(index, Loss::TakenBy(other.cloned().map(Box::new))),
                }
            }
            Err(Error::Refused(Refusal::LockLost { current, .. })) => {
                Event::Lost(index, Loss::TakenBy(current))
            }
            Err(Error::Refused(Refusal::NotHolder(holder))) => {
                Event::Lost(index, Loss::TakenBy(Some(holder)))
            }
            Err(Error::Refused(refusal)) => {
                Event::Lost(index, Loss::RenewalFailed(refusal.to_string()))
            }
            Err(err) => {
                tracing::warn!(error = %err, "renewal failed; retrying until the lock would expire");
                next_renewal = Instant::now() + backoff;
                backoff = (backoff * 2).min(MAX_RENEWAL_BACKOFF);
                Event::RenewalFailed(index, err.to_string())
            }
        };
        let lost = matches!(event, Event::Lost(..));
        if events.send(event).await.is_err() || lost {
            return;
        }
    }
}

/// Watches the lock object and reports the first version naming another
/// holding (or none). A watch that stays silent for a renewal interval is
/// started again (a dead connection sends nothing, not even an error).
async fn watch_for_loss(
    store: LockStore,
    held: HeldLock,
    index: usize,
    events: mpsc::Sender<Event>,
) {
    let seconds = u64::try_from(held.holding.duration_seconds).unwrap_or(60);
    let quiet_limit = StdDuration::from_secs((seconds / 3).clamp(5, 60));
    let mut resource_version = "0".to_string();
    loop {
        let mut stream = match store.watch(&held.environment, &resource_version).await {
            Ok(stream) => stream,
            Err(err) => {
                tracing::debug!(error = %err, "watch failed; retrying");
                tokio::time::sleep(StdDuration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            let next = match tokio::time::timeout(quiet_limit, stream.try_next()).await {
                Ok(next) => next,
                Err(_) => break,
            };
            match next {
                Ok(Some(WatchEvent::Added(lock) | WatchEvent::Modified(lock))) => {
                    resource_version = lock
                        .metadata
                        .resource_version
                        .clone()
                        .unwrap_or(resource_version);
                    let current = lock.spec.holder.clone();
                    if current.as_ref().map(|h| h.lock_id.as_str())
                        != Some(held.holding.lock_id.as_str())
                    {
                        let _ = events
                            .send(Event::Lost(index, Loss::TakenBy(current.map(Box::new))))
                            .await;
                        return;
                    }
                }
                Ok(Some(WatchEvent::Deleted(_))) => {
                    let _ = events.send(Event::Lost(index, Loss::TakenBy(None))).await;
                    return;
                }
                Ok(Some(WatchEvent::Bookmark(bookmark))) => {
                    resource_version = bookmark.metadata.resource_version;
                }
                Ok(Some(WatchEvent::Error(_))) => {
                    // Usually "too old resource version": start again from now.
                    resource_version = "0".to_string();
                    break;
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The watchdog
// ---------------------------------------------------------------------------

/// The hidden first argument that makes this binary a watchdog.
const WATCHDOG_ARG: &str = "__deploylock-watchdog";

/// CLOCK_BOOTTIME in nanoseconds: a clock every process shares, which keeps
/// counting while the machine is suspended (the API server's clock does too).
fn boottime_nanos() -> i64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|time| {
            time.tv_sec()
                .saturating_mul(1_000_000_000)
                .saturating_add(time.tv_nsec())
        })
        .unwrap_or(0)
}

/// A local instant as CLOCK_BOOTTIME nanoseconds, for the watchdog.
fn instant_as_boottime(at: Instant) -> i64 {
    let (now, boot) = (Instant::now(), boottime_nanos());
    let delta = |d: StdDuration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    if at >= now {
        boot.saturating_add(delta(at - now))
    } else {
        boot.saturating_sub(delta(now - at))
    }
}

/// exec's side of the watchdog: its process, and the connection it reads.
struct Watchdog {
    child: tokio::process::Child,
    control: tokio::net::UnixStream,
    /// The command's process group (it leads it).
    command: Option<Pid>,
}

impl Watchdog {
    /// Starts the watchdog, which starts the command. Err: why the command
    /// could not be started.
    ///
    /// They talk over a Unix socket with an abstract (random) name that only
    /// the watchdog, checked by its PID, may connect to: no descriptor has
    /// to cross the exec boundary, and the command inherits none.
    async fn start(
        plan: &ExecPlan,
        deadlines: StopDeadlines,
        env: &BTreeMap<&str, String>,
    ) -> Result<Watchdog, String> {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("deploylock-watchdog-{}", uuid::Uuid::new_v4());
        let listener = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|address| std::os::unix::net::UnixListener::bind_addr(&address))
            .and_then(|listener| {
                listener.set_nonblocking(true)?;
                tokio::net::UnixListener::from_std(listener)
            })
            .map_err(|err| format!("cannot listen for the watchdog: {err}"))?;
        let mut command = tokio::process::Command::new("/proc/self/exe");
        command
            .arg(WATCHDOG_ARG)
            .arg(&name)
            .arg(plan.grace.as_millis().to_string())
            .arg(instant_as_boottime(deadlines.term).to_string())
            .arg(instant_as_boottime(deadlines.kill).to_string())
            .arg("--")
            .args(&plan.command)
            .envs(env)
            // Out of exec's process group: a kill of that group (a CI job
            // cancelled) must not reach the one that cleans up after it.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = command
            .spawn()
            .map_err(|err| format!("cannot start the watchdog: {err}"))?;
        let watchdog_pid = child.id().and_then(|id| i32::try_from(id).ok());
        // The watchdog's first line: "started PID" or "failed WHY".
        let handshake = async {
            loop {
                let (stream, _) = listener.accept().await?;
                let peer = stream.peer_cred()?.pid();
                if peer.is_some() && peer == watchdog_pid {
                    let mut reader = tokio::io::BufReader::new(stream);
                    let mut line = String::new();
                    tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut line).await?;
                    return Ok::<_, std::io::Error>((reader.into_inner(), line));
                }
                tracing::warn!(?peer, "a stranger connected to the watchdog's socket");
            }
        };
        // Handshake first: a command that exits at once takes the watchdog
        // down right after its "started" line, and then both are ready; the
        // line (already sent) is what counts.
        let outcome = tokio::select! {
            biased;
            result = handshake => result.map_err(|err| format!("cannot talk to the watchdog: {err}")),
            status = child.wait() => Err(format!("the watchdog ended before starting it ({status:?})")),
        };
        let (control, line) = match outcome {
            Ok(connected) => connected,
            Err(why) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(why);
            }
        };
        match line.trim().split_once(' ') {
            Some(("started", pid)) if pid.parse::<i32>().is_ok() => Ok(Watchdog {
                child,
                control,
                command: pid.parse().ok().map(Pid::from_raw),
            }),
            other => {
                let why = match other {
                    Some(("failed", why)) => why.to_string(),
                    _ => format!("the watchdog said {line:?}"),
                };
                let _ = child.wait().await;
                Err(why)
            }
        }
    }

    /// One line to the watchdog; if it is gone, its exit is seen anyway.
    async fn send(&mut self, line: &str) {
        let line = format!("{line}\n");
        let _ = tokio::io::AsyncWriteExt::write_all(&mut self.control, line.as_bytes()).await;
    }

    async fn send_deadlines(&mut self, deadlines: StopDeadlines) {
        let line = format!(
            "deadline {} {}",
            instant_as_boottime(deadlines.term),
            instant_as_boottime(deadlines.kill)
        );
        self.send(&line).await;
    }
}

/// Runs the watchdog if this process was started as one (the hidden first
/// argument); returns its exit code. Called first thing by the CLI's `main`.
pub fn watchdog_main_if_requested() -> Option<ExitCode> {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).and_then(|arg| arg.to_str()) != Some(WATCHDOG_ARG) {
        return None;
    }
    let code = match WatchdogArgs::parse(&args[2..]) {
        Some(parsed) => watchdog(parsed),
        None => {
            eprintln!("deploylock: bad watchdog arguments");
            127
        }
    };
    Some(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

struct WatchdogArgs {
    socket: OsString,
    grace_nanos: i64,
    term: i64,
    kill: i64,
    command: Vec<OsString>,
}

impl WatchdogArgs {
    fn parse(args: &[OsString]) -> Option<Self> {
        let number = |i: usize| -> Option<i64> { args.get(i)?.to_str()?.parse().ok() };
        if args.get(4).and_then(|arg| arg.to_str()) != Some("--") {
            return None;
        }
        let command = args.get(5..)?.to_vec();
        if command.is_empty() {
            return None;
        }
        Some(WatchdogArgs {
            socket: args.first()?.clone(),
            grace_nanos: number(1)?.saturating_mul(1_000_000),
            term: number(2)?,
            kill: number(3)?,
            command,
        })
    }
}

/// The watchdog: starts the command (its own process group, SIGKILL if the
/// watchdog dies), forwards exec's signals to it, and stops the command's
/// whole tree at the deadlines, on exec's "stop", or when exec disappears.
/// Exits with the command's exit code (128 + N for signal N).
///
/// Longer than most functions on purpose: one poll loop over the control
/// socket, the signalfd and the deadlines, whose every branch must keep the
/// same kill-the-tree guarantees; split up, those would be hard to check.
fn watchdog(args: WatchdogArgs) -> i32 {
    use std::os::linux::net::SocketAddrExt as _;
    let connected =
        std::os::unix::net::SocketAddr::from_abstract_name(args.socket.as_encoded_bytes())
            .and_then(|address| std::os::unix::net::UnixStream::connect_addr(&address));
    let mut control = match connected {
        Ok(stream) => stream,
        Err(err) => {
            eprintln!("deploylock: the watchdog cannot reach exec: {err}");
            return 127;
        }
    };
    // Orphans of the command's tree become our children, so that a kill of
    // the tree finds them even if they left its process group.
    if let Err(err) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::debug!(error = %err, "cannot become a child subreaper");
    }
    // Child exits arrive on a descriptor, polled with exec's pipe.
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    let _ = chld.thread_block();
    let signal_fd = SignalFd::with_flags(&chld, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK);

    let me = nix::unistd::getpid();
    // Its own process group, as before the watchdog existed: a terminal's
    // Ctrl-C reaches exec only, which passes it on once.
    let spawned = std::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .process_group(0)
        .spawn();
    let child = match spawned {
        Ok(child) => child,
        Err(err) => {
            let _ = writeln!(control, "failed {:?}: {err}", args.command[0]);
            return 127;
        }
    };
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
    // The child is reaped below with waitpid(-1), with the adopted orphans.
    drop(child);
    let _ = writeln!(control, "started {pid}");

    let mut state = WatchdogState {
        command: pid,
        me,
        term: args.term,
        kill: args.kill,
        grace_nanos: args.grace_nanos,
        stopping: false,
        kill_at: i64::MAX,
        killed: false,
        code: None,
    };
    let mut pending = Vec::new();
    let mut exec_gone = false;
    loop {
        state.reap();
        let now = boottime_nanos();
        if !state.stopping && (exec_gone || now >= state.term) {
            state.stop(now);
        }
        if state.stopping && !state.killed && now >= state.kill_at {
            state.killed = true;
        }
        if state.stopping {
            let remaining = descendants(state.me);
            if state.killed {
                kill_tree(state.command, &remaining, Signal::SIGKILL);
            }
            if let Some(code) = state.code
                && remaining.is_empty()
            {
                return code;
            }
        } else if let Some(code) = state.code {
            return code;
        }
        // Short slices while stopping (to sweep the tree); never longer than
        // a second otherwise, so that a suspend and resume is noticed.
        let next = if state.stopping {
            state.kill_at
        } else {
            state.term
        };
        let slice_ms: i64 = if state.stopping { 50 } else { 1000 };
        let wait_ms = (next.saturating_sub(now) / 1_000_000).clamp(0, slice_ms);
        let timeout = nix::poll::PollTimeout::from(u16::try_from(wait_ms).unwrap_or(1000));
        let mut fds = Vec::with_capacity(2);
        if !exec_gone {
            fds.push(nix::poll::PollFd::new(
                control.as_fd(),
                nix::poll::PollFlags::POLLIN,
            ));
        }
        if let Ok(signal_fd) = &signal_fd {
            fds.push(nix::poll::PollFd::new(
                signal_fd.as_fd(),
                nix::poll::PollFlags::POLLIN,
            ));
        }
        let ready = nix::poll::poll(&mut fds, timeout);
        let control_ready = !exec_gone
            && ready.is_ok()
            && fds
                .first()
                .and_then(|fd| fd.revents())
                .is_some_and(|events| {
                    events.intersects(
                        nix::poll::PollFlags::POLLIN
                            | nix::poll::PollFlags::POLLHUP
                            | nix::poll::PollFlags::POLLERR,
                    )
                });
        drop(fds);
        if let Ok(signal_fd) = &signal_fd {
            while let Ok(Some(_)) = signal_fd.read_signal() {}
        }
        if control_ready {
            let mut buffer = [0u8; 512];
            match control.read(&mut buffer) {
                Ok(0) | Err(_) => exec_gone = true,
                Ok(read) => {
                    pending.extend_from_slice(&buffer[..read]);
                    while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=end).collect();
                        state.order(String::from_utf8_lossy(&line).trim());
                    }
                }
            }
        }
    }
}

struct WatchdogState {
    command: Pid,
    me: Pid,
    /// CLOCK_BOOTTIME nanoseconds.
    term: i64,
    kill: i64,
    grace_nanos: i64,
    stopping: bool,
    kill_at: i64,
    killed: bool,
    code: Option<i32>,
}

impl WatchdogState {
    /// Reaps every exited child (the command and adopted orphans).
    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    if pid == self.command {
                        self.code = Some(code);
                    }
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) => {
                    if pid == self.command {
                        self.code = Some(128 + signal as i32);
                    }
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }

    /// SIGTERM to the whole tree now, SIGKILL after the grace, never later
    /// than the kill deadline.
    fn stop(&mut self, now: i64) {
        self.stopping = true;
        self.kill_at = now.saturating_add(self.grace_nanos).min(self.kill);
        kill_tree(self.command, &descendants(self.me), Signal::SIGTERM);
    }

    fn order(&mut self, line: &str) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("deadline") if !self.stopping => {
                let mut next = || words.next().and_then(|word| word.parse::<i64>().ok());
                if let (Some(term), Some(kill)) = (next(), next()) {
                    self.term = term;
                    self.kill = kill;
                }
            }
            Some("stop") if !self.stopping => self.stop(boottime_nanos()),
            Some("signal") => {
                let signal = words
                    .next()
                    .and_then(|word| word.parse::<i32>().ok())
                    .and_then(|number| Signal::try_from(number).ok());
                if let Some(signal) = signal {
                    let _ = killpg(self.command, signal);
                }
            }
            _ => {}
        }
    }
}

fn kill_tree(group: Pid, members: &[Pid], signal: Signal) {
    let _ = killpg(group, signal);
    for &pid in members {
        let _ = kill(pid, signal);
    }
}

/// The live (not zombie) descendants of `root`, from /proc.
fn descendants(root: Pid) -> Vec<Pid> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let parent = fields.next().and_then(|field| field.parse::<i32>().ok());
        if let (Some(state), Some(parent)) = (state, parent)
            && state != "Z"
            && state != "X"
        {
            children.entry(parent).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut next = vec![root.as_raw()];
    while let Some(parent) = next.pop() {
        for &child in children.get(&parent).map(Vec::as_slice).unwrap_or_default() {
            found.push(Pid::from_raw(child));
            next.push(child);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deadlines(base: Instant, term: u64, kill: u64, expiry: u64) -> StopDeadlines {
        let at = |seconds| base + StdDuration::from_secs(seconds);
        StopDeadlines {
            term: at(term),
            kill: at(kill),
            expiry: at(expiry),
        }
    }

    /// Several holdings: each deadline is the earliest of any holding, even
    /// when they come from different holdings.
    #[test]
    fn the_earliest_deadlines_are_taken_over_all_holdings() {
        let base = Instant::now();
        let first = deadlines(base, 100, 110, 111);
        let second = deadlines(base, 90, 115, 116);
        let third = deadlines(base, 95, 105, 120);
        assert_eq!(
            StopDeadlines::earliest([first, second, third]),
            Some(deadlines(base, 90, 105, 111))
        );
        assert_eq!(StopDeadlines::earliest([first]), Some(first));
        assert_eq!(StopDeadlines::earliest([]), None);
    }

    /// A retried release recognises its own earlier, unanswered release,
    /// and nothing else: another holding's release, a force-release or a
    /// takeover of this holding, or a release by someone else.
    #[test]
    fn only_the_holders_release_of_this_holding_counts_as_done() {
        let entry = |action, lock_id: &str, by: &str| crate::crd::HistoryEntry {
            sequence: 0,
            action,
            at: chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
            lock_id: lock_id.to_string(),
            by: by.to_string(),
            owner: by.to_string(),
            reason: "r".to_string(),
            expires_at: None,
        };
        let spec = |history| DeploymentLockSpec {
            history,
            ..Default::default()
        };
        let released = spec(vec![
            entry(HistoryAction::Acquired, "mine", "alice"),
            entry(HistoryAction::Released, "mine", "alice"),
            entry(HistoryAction::Acquired, "later", "bob"),
        ]);
        assert!(released_by(&released, "alice", "mine"));
        assert!(!released_by(&released, "alice", "other"));
        assert!(!released_by(&released, "bob", "mine"));
        for action in [
            HistoryAction::ForceReleased,
            HistoryAction::ForceAcquired,
            HistoryAction::TookOverExpired,
        ] {
            let ended = spec(vec![
                entry(HistoryAction::Acquired, "mine", "alice"),
                entry(action, "mine", "carol"),
            ]);
            assert!(!released_by(&ended, "alice", "mine"), "{action:?}");
        }
        assert!(!released_by(&spec(Vec::new()), "alice", "mine"));
    }
}
