//! Holding a lock while a command runs (`deploylock exec`).
//!
//! While the child runs, the holding is renewed at a third of its duration,
//! and the lock object is watched: the moment it names another holding (a
//! force-release, a takeover after an outage longer than the lock's validity)
//! the child gets SIGTERM, then SIGKILL after the grace period. If renewals
//! keep failing until the holding's expiry, that is a loss too. When the child
//! exits the holding is released. If this process is killed outright, nothing
//! renews the holding and it simply expires.

use std::collections::BTreeMap;
use std::time::Duration as StdDuration;

use chrono::Duration;
use futures::TryStreamExt;
use kube::api::WatchEvent;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::crd::LockHolder;
use crate::error::Error;
use crate::rules::{Actor, Refusal, Request};
use crate::store::LockStore;

/// What `exec` needs besides the store.
#[derive(Clone, Debug)]
pub struct ExecPlan {
    pub environment: String,
    pub actor: Actor,
    /// The holding taken for the command.
    pub holding: LockHolder,
    pub fencing_token: i64,
    /// The local instant at which the holding expires unless renewed
    /// (`Observed::local_deadline` of its expiry).
    pub expires_locally: Instant,
    /// Time between SIGTERM and SIGKILL once the lock is lost.
    pub grace: StdDuration,
    pub command: Vec<String>,
}

/// How the command ended.
#[derive(Debug)]
pub enum ExecOutcome {
    /// The child exited on its own; `code` is its exit code (128 + signal
    /// number when a signal ended it).
    Exited { code: i32 },
    /// The command could not be started (the lock was released).
    CouldNotStart { error: String },
    /// The lock was lost while the child ran; the child was stopped.
    /// `renewal_error` says why renewing failed, when that was the cause.
    LockLost {
        now_held_by: Option<Box<LockHolder>>,
        renewal_error: Option<String>,
        child_code: i32,
    },
}

#[derive(Debug)]
enum Loss {
    TakenBy(Option<Box<LockHolder>>),
    RenewalFailed(String),
}

/// Runs the command while holding the lock, then releases it. `signals`
/// were taken over before the lock was acquired, so that no SIGTERM can end
/// this process between acquiring and releasing.
pub async fn run_while_holding(
    store: &LockStore,
    plan: ExecPlan,
    signals: &mut Signals,
) -> Result<ExecOutcome, Error> {
    let Some((program, args)) = plan.command.split_first() else {
        return Err(Error::InvalidInput(
            "exec needs a command after `--`, e.g. deploylock exec --reason \"deploy\" -- ./deploy.sh".into(),
        ));
    };
    let env: BTreeMap<&str, String> = BTreeMap::from([
        ("DEPLOYLOCK_ENVIRONMENT", plan.environment.clone()),
        ("DEPLOYLOCK_NAMESPACE", store.namespace().to_string()),
        ("DEPLOYLOCK_LOCK_ID", plan.holding.lock_id.clone()),
        ("DEPLOYLOCK_HOLDER", plan.holding.user.clone()),
        ("DEPLOYLOCK_FENCING_TOKEN", plan.fencing_token.to_string()),
    ]);
    // Its own process group: a terminal's Ctrl-C reaches only us, and we pass
    // it on once; a loss stops the whole group.
    let spawned = tokio::process::Command::new(program)
        .args(args)
        .envs(env)
        .process_group(0)
        .kill_on_drop(false)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            release(store, &plan).await;
            return Ok(ExecOutcome::CouldNotStart {
                error: format!("{program:?}: {err}"),
            });
        }
    };
    let group = child.id().map(|id| Pid::from_raw(id as i32));

    let (loss_sender, mut losses) = mpsc::channel::<Loss>(4);
    let keeper = tokio::spawn(keep_alive(store.clone(), plan.clone(), loss_sender.clone()));
    let watcher = tokio::spawn(watch_for_loss(store.clone(), plan.clone(), loss_sender));

    let outcome = loop {
        tokio::select! {
            status = child.wait() => {
                break ExecOutcome::Exited { code: exit_code(status) };
            }
            Some(loss) = losses.recv() => {
                let (now_held_by, renewal_error) = match loss {
                    Loss::TakenBy(holder) => (holder, None),
                    Loss::RenewalFailed(why) => (None, Some(why)),
                };
                signal_group(group, Signal::SIGTERM);
                let child_code = match tokio::time::timeout(plan.grace, child.wait()).await {
                    Ok(status) => exit_code(status),
                    Err(_) => {
                        signal_group(group, Signal::SIGKILL);
                        exit_code(child.wait().await)
                    }
                };
                break ExecOutcome::LockLost { now_held_by, renewal_error, child_code };
            }
            Some(received) = signals.next() => {
                signal_group(group, received);
            }
        }
    };
    keeper.abort();
    watcher.abort();
    if matches!(outcome, ExecOutcome::Exited { .. }) {
        release(store, &plan).await;
    }
    Ok(outcome)
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

async fn release(store: &LockStore, plan: &ExecPlan) {
    let request = Request::Release {
        actor: plan.actor.clone(),
        lock_id: Some(plan.holding.lock_id.clone()),
    };
    if let Err(err) = store.apply(&plan.environment, &request).await {
        tracing::warn!(error = %err, "could not release the lock after the command ended; it will expire on its own");
    }
}

/// Renews at a third of the duration; tolerates failures until the holding
/// would expire.
async fn keep_alive(store: LockStore, plan: ExecPlan, losses: mpsc::Sender<Loss>) {
    let duration = Duration::seconds(plan.holding.duration_seconds);
    let interval =
        StdDuration::from_millis((plan.holding.duration_seconds as u64 * 1000 / 3).max(1000));
    let mut expires_locally = plan.expires_locally;
    let mut next_renewal = Instant::now() + interval;
    loop {
        tokio::time::sleep_until(next_renewal).await;
        let request = Request::Extend {
            actor: plan.actor.clone(),
            duration,
            lock_id: Some(plan.holding.lock_id.clone()),
        };
        match store.apply(&plan.environment, &request).await {
            Ok(applied) => {
                if let Some(holder) = applied.observed.holder() {
                    expires_locally = applied.observed.local_deadline(holder.expires_at);
                }
                tracing::debug!("lock renewed");
                next_renewal = Instant::now() + interval;
            }
            Err(Error::Refused(Refusal::LockLost { current, .. })) => {
                let _ = losses.send(Loss::TakenBy(current)).await;
                return;
            }
            Err(Error::Refused(Refusal::NotHolder(holder))) => {
                let _ = losses.send(Loss::TakenBy(Some(holder))).await;
                return;
            }
            Err(Error::Refused(refusal)) => {
                let _ = losses.send(Loss::RenewalFailed(refusal.to_string())).await;
                return;
            }
            Err(err) => {
                if Instant::now() >= expires_locally {
                    let _ = losses.send(Loss::RenewalFailed(err.to_string())).await;
                    return;
                }
                tracing::warn!(error = %err, "renewal failed; retrying until the lock would expire");
                next_renewal = (Instant::now() + StdDuration::from_secs(1)).min(expires_locally);
            }
        }
    }
}

/// Watches the lock object and reports the first version naming another
/// holding (or none).
async fn watch_for_loss(store: LockStore, plan: ExecPlan, losses: mpsc::Sender<Loss>) {
    let mut resource_version = "0".to_string();
    loop {
        let mut stream = match store.watch(&plan.environment, &resource_version).await {
            Ok(stream) => stream,
            Err(err) => {
                tracing::debug!(error = %err, "watch failed; retrying");
                tokio::time::sleep(StdDuration::from_millis(500)).await;
                continue;
            }
        };
        loop {
            match stream.try_next().await {
                Ok(Some(WatchEvent::Added(lock) | WatchEvent::Modified(lock))) => {
                    resource_version = lock
                        .metadata
                        .resource_version
                        .clone()
                        .unwrap_or(resource_version);
                    let current = lock.spec.holder.clone();
                    if current.as_ref().map(|h| h.lock_id.as_str())
                        != Some(plan.holding.lock_id.as_str())
                    {
                        let _ = losses.send(Loss::TakenBy(current.map(Box::new))).await;
                        return;
                    }
                }
                Ok(Some(WatchEvent::Deleted(_))) => {
                    let _ = losses.send(Loss::TakenBy(None)).await;
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

/// SIGINT, SIGTERM and SIGHUP received by this process: while waiting they
/// mean "give up", while a command runs they are passed on to it. Once this
/// exists, those signals no longer end the process by themselves.
pub struct Signals {
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    pub fn new() -> Self {
        let kinds = [
            (Signal::SIGINT, SignalKind::interrupt()),
            (Signal::SIGTERM, SignalKind::terminate()),
            (Signal::SIGHUP, SignalKind::hangup()),
        ];
        let streams = kinds
            .into_iter()
            .filter_map(|(signal_, kind)| signal(kind).ok().map(|stream| (signal_, stream)))
            .collect();
        Signals { streams }
    }

    /// The next signal received.
    pub async fn next(&mut self) -> Option<Signal> {
        if self.streams.is_empty() {
            return std::future::pending().await;
        }
        let futures = self.streams.iter_mut().map(|(signal_, stream)| {
            Box::pin(async move { stream.recv().await.map(|_| *signal_) })
        });
        let (received, _, _) = futures::future::select_all(futures).await;
        received
    }
}

impl Default for Signals {
    fn default() -> Self {
        Self::new()
    }
}
