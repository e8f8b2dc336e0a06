//! Randomized torture of mutual exclusion: concurrent clients perform random
//! acquire / extend / release / force / force-release operations on a few
//! environments, every invocation and completion is logged, and a checker
//! verifies the history afterwards. The short run is part of `make test`;
//! `make torture` runs the same engine for minutes on a control plane of its
//! own, with faults injected (benches/torture.rs).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use kube::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::time::Instant;

use deploylock::crd::{DeploymentLock, HistoryAction};
use deploylock::error::Error;
use deploylock::rules::{AcquireRequest, Actor, Request};
use deploylock::store::{LockStore, Outcome};

/// Where the engine runs: a namespace and one kubeconfig per identity.
pub struct Target {
    pub namespace: String,
    /// (username, kubeconfig, may force)
    pub identities: Vec<(String, PathBuf, bool)>,
    pub admin_kubeconfig: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Acquire,
    ForceAcquire,
    Extend,
    Release,
    ForceRelease,
    /// A holder that slept past its expiry and then tries to extend.
    ExtendAfterPause,
}

#[derive(Clone, Debug)]
pub enum OpResult {
    Done {
        outcome: Outcome,
        lock_id: Option<String>,
        fencing_token: i64,
        acquired_at: Option<DateTime<Utc>>,
        expires_at: Option<DateTime<Utc>>,
    },
    Refused(String),
    /// The outcome is unknown (transport error during a fault).
    Ambiguous(String),
}

#[derive(Clone, Debug)]
pub struct Op {
    pub worker: usize,
    pub user: String,
    pub environment: String,
    pub kind: OpKind,
    /// The holding the op concerns (extend/release), if any.
    pub target_lock: Option<String>,
    pub invoked: Instant,
    pub completed: Instant,
    pub result: OpResult,
}

/// Small deterministic PRNG (xorshift64*), seeded per worker.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

async fn store_for(kubeconfig: &PathBuf, namespace: &str) -> LockStore {
    let file = Kubeconfig::read_from(kubeconfig).unwrap_or_else(|err| panic!("{err}"));
    let mut config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    config.connect_timeout = Some(StdDuration::from_secs(2));
    config.read_timeout = Some(StdDuration::from_secs(10));
    let client = kube::Client::try_from(config).unwrap_or_else(|err| panic!("{err}"));
    LockStore::new(client, namespace)
}

fn classify(result: Result<deploylock::store::Applied, Error>) -> OpResult {
    match result {
        Ok(applied) => {
            let spec = applied.observed.spec();
            let holder = applied.observed.holder();
            OpResult::Done {
                outcome: applied.outcome,
                lock_id: holder.map(|h| h.lock_id.clone()),
                fencing_token: spec.map(|s| s.fencing_token).unwrap_or_default(),
                acquired_at: holder.map(|h| h.acquired_at),
                expires_at: holder.map(|h| h.expires_at),
            }
        }
        Err(Error::Refused(refusal)) => OpResult::Refused(format!("{refusal:?}")),
        Err(err @ (Error::Forbidden(_) | Error::Rejected(_))) => OpResult::Refused(err.to_string()),
        Err(err) => OpResult::Ambiguous(err.to_string()),
    }
}

/// Runs `workers_per_identity` clients per identity for `duration`. With
/// `pauses`, some holders sleep past their expiry and then try to extend.
pub async fn run(
    target: &Target,
    environments: usize,
    workers_per_identity: usize,
    duration: StdDuration,
    seed: u64,
    pauses: bool,
) -> Vec<Op> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    let mut worker = 0;
    for (user, kubeconfig, can_force) in &target.identities {
        for _ in 0..workers_per_identity {
            let store = store_for(kubeconfig, &target.namespace).await;
            let user = user.clone();
            let can_force = *can_force;
            let log = log.clone();
            let mut rng = Rng((seed ^ (worker as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
            let this_worker = worker;
            tasks.push(tokio::spawn(async move {
                let actor = Actor::new(user.clone(), Some(format!("{user}-{this_worker}")));
                // Holdings this worker believes it has, per environment.
                let mut mine: HashMap<String, String> = HashMap::new();
                while Instant::now() < deadline {
                    let environment = format!("t{}", rng.below(environments as u64));
                    let held = mine.get(&environment).cloned();
                    let roll = rng.below(100);
                    let kind = match (held.is_some(), roll) {
                        (true, r) if pauses && r < 2 => OpKind::ExtendAfterPause,
                        (true, r) if r < 45 => OpKind::Extend,
                        (true, _) => OpKind::Release,
                        (false, r) if can_force && r < 8 => OpKind::ForceAcquire,
                        (false, r) if can_force && r < 14 => OpKind::ForceRelease,
                        (false, _) => OpKind::Acquire,
                    };
                    let request = match kind {
                        OpKind::Acquire | OpKind::ForceAcquire => {
                            Request::Acquire(AcquireRequest {
                                actor: actor.clone(),
                                lock_id: uuid::Uuid::new_v4().to_string(),
                                lock_type: deploylock::crd::LockType::Manual,
                                force: kind == OpKind::ForceAcquire,
                                reason: format!("torture {kind:?}"),
                                duration: Duration::seconds(60),
                                deployment_id: None,
                                metadata: BTreeMap::new(),
                                waiter_id: None,
                            })
                        }
                        OpKind::Extend | OpKind::ExtendAfterPause => Request::Extend {
                            actor: actor.clone(),
                            duration: Duration::seconds(60),
                            lock_id: held.clone(),
                        },
                        OpKind::Release => Request::Release {
                            actor: actor.clone(),
                            lock_id: held.clone(),
                        },
                        OpKind::ForceRelease => Request::ForceRelease {
                            actor: actor.clone(),
                            reason: "torture force-release".into(),
                        },
                    };
                    if kind == OpKind::ExtendAfterPause {
                        // Past the 60 s holding: another client may take it.
                        tokio::time::sleep(StdDuration::from_secs(62)).await;
                    }
                    let invoked = Instant::now();
                    let result = classify(store.apply(&environment, &request).await);
                    let completed = Instant::now();
                    match (&kind, &result) {
                        (
                            OpKind::Acquire | OpKind::ForceAcquire,
                            OpResult::Done {
                                lock_id: Some(id), ..
                            },
                        ) => {
                            mine.insert(environment.clone(), id.clone());
                        }
                        (OpKind::Release, _)
                        | (OpKind::Extend | OpKind::ExtendAfterPause, OpResult::Refused(_)) => {
                            mine.remove(&environment);
                        }
                        _ => {}
                    }
                    if let Ok(mut log) = log.lock() {
                        log.push(Op {
                            worker: this_worker,
                            user: user.clone(),
                            environment,
                            kind,
                            target_lock: held,
                            invoked,
                            completed,
                            result,
                        });
                    }
                }
            }));
            worker += 1;
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    log.lock().map(|log| log.clone()).unwrap_or_default()
}

/// A successful acquisition, as the client saw it.
#[derive(Debug)]
struct Holding<'a> {
    op: &'a Op,
    lock_id: String,
    token: i64,
    acquired_at: DateTime<Utc>,
}

/// Checks the logged history. Returns (operations checked, violations).
pub async fn check(target: &Target, ops: &[Op]) -> (usize, Vec<String>) {
    let mut violations = Vec::new();
    let mut by_env: BTreeMap<&str, Vec<Holding<'_>>> = BTreeMap::new();
    for op in ops {
        if let OpResult::Done {
            outcome: Outcome::Transition(action),
            lock_id: Some(lock_id),
            fencing_token,
            acquired_at: Some(acquired_at),
            ..
        } = &op.result
            && matches!(
                action,
                HistoryAction::Acquired
                    | HistoryAction::TookOverExpired
                    | HistoryAction::ForceAcquired
            )
        {
            by_env
                .entry(op.environment.as_str())
                .or_default()
                .push(Holding {
                    op,
                    lock_id: lock_id.clone(),
                    token: *fencing_token,
                    acquired_at: *acquired_at,
                });
        }
    }
    // Indexes, so that checking stays linear-ish in the number of operations.
    let mut on_lock: HashMap<&str, Vec<&Op>> = HashMap::new();
    let mut force_releases: HashMap<&str, Vec<&Op>> = HashMap::new();
    let mut expiry_of: HashMap<&str, DateTime<Utc>> = HashMap::new();
    for op in ops {
        if let Some(lock) = op.target_lock.as_deref() {
            on_lock.entry(lock).or_default().push(op);
        }
        if op.kind == OpKind::ForceRelease && !matches!(op.result, OpResult::Refused(_)) {
            force_releases
                .entry(op.environment.as_str())
                .or_default()
                .push(op);
        }
        if let OpResult::Done {
            lock_id: Some(id),
            expires_at: Some(expiry),
            ..
        } = &op.result
        {
            let entry = expiry_of.entry(id.as_str()).or_insert(*expiry);
            *entry = (*entry).max(*expiry);
        }
    }
    for list in force_releases.values_mut() {
        list.sort_by_key(|op| op.invoked);
    }
    for (environment, holdings) in by_env.iter_mut() {
        holdings.sort_by_key(|h| h.token);
        let forced_releases = force_releases
            .get(environment)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        // Fencing tokens: unique, and in real-time order.
        for pair in holdings.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if a.token == b.token {
                violations.push(format!("{environment}: token {} issued twice", a.token));
            }
            if b.op.completed < a.op.invoked {
                violations.push(format!(
                    "{environment}: token {} was granted before token {} was asked for",
                    b.token, a.token
                ));
            }
            // b may start only if a ended: released / force-released before
            // b completed, overridden by b's force, or expired before b.
            let b_action = match &b.op.result {
                OpResult::Done {
                    outcome: Outcome::Transition(action),
                    ..
                } => *action,
                _ => HistoryAction::Acquired,
            };
            let released = on_lock.get(a.lock_id.as_str()).is_some_and(|targeting| {
                targeting.iter().any(|op| {
                    op.kind == OpKind::Release
                        && op.invoked <= b.op.completed
                        && !matches!(op.result, OpResult::Refused(_))
                })
            });
            let first = forced_releases
                .partition_point(|op| op.invoked < a.op.invoked - StdDuration::from_secs(120));
            let force_released = forced_releases[first..]
                .iter()
                .take_while(|op| op.invoked <= b.op.completed)
                .any(|op| op.completed >= a.op.invoked);
            let expired_before = b_action == HistoryAction::TookOverExpired
                && expiry_of
                    .get(a.lock_id.as_str())
                    .is_none_or(|expiry| *expiry <= b.acquired_at);
            let forced = b_action == HistoryAction::ForceAcquired;
            if !(released || force_released || expired_before || forced) {
                violations.push(format!(
                    "{environment}: holdings {} (token {}, {} worker {}) and {} (token {}, {} worker {}) overlap",
                    a.lock_id, a.token, a.op.user, a.op.worker, b.lock_id, b.token, b.op.user, b.op.worker
                ));
            }
        }
        // After a later holding was granted, an older holding can no longer
        // be extended or released as its own. `granted_after[i]` is the
        // earliest completion of any holding with a larger token.
        let mut granted_after = vec![None; holdings.len()];
        let mut earliest: Option<Instant> = None;
        for i in (0..holdings.len()).rev() {
            granted_after[i] = earliest;
            earliest = Some(earliest.map_or(holdings[i].op.completed, |e| {
                e.min(holdings[i].op.completed)
            }));
        }
        for (holding, later) in holdings.iter().zip(granted_after) {
            let Some(later) = later else { continue };
            let stale = on_lock.get(holding.lock_id.as_str()).and_then(|targeting| {
                targeting.iter().find(|op| {
                    matches!(
                        op.kind,
                        OpKind::Extend | OpKind::ExtendAfterPause | OpKind::Release
                    ) && op.invoked > later
                        && matches!(
                            op.result,
                            OpResult::Done {
                                outcome: Outcome::Transition(_),
                                ..
                            }
                        )
                })
            });
            if let Some(op) = stale {
                violations.push(format!(
                    "{environment}: {:?} of overridden holding {} succeeded after a later holding was granted",
                    op.kind, holding.lock_id
                ));
            }
        }
    }
    // The stored history matches what clients saw.
    let file =
        Kubeconfig::read_from(&target.admin_kubeconfig).unwrap_or_else(|err| panic!("{err}"));
    let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let client = kube::Client::try_from(config).unwrap_or_else(|err| panic!("{err}"));
    let api: Api<DeploymentLock> = Api::namespaced(client, &target.namespace);
    let seen: std::collections::HashSet<&str> = ops
        .iter()
        .filter_map(|op| match &op.result {
            OpResult::Done {
                lock_id: Some(id), ..
            } => Some(id.as_str()),
            _ => op.target_lock.as_deref(),
        })
        .collect();
    let ambiguous = ops
        .iter()
        .any(|op| matches!(op.result, OpResult::Ambiguous(_)));
    for environment in by_env.keys() {
        let Ok(lock) = api.get(environment).await else {
            violations.push(format!("{environment}: cannot read the final object"));
            continue;
        };
        let mut previous = 0;
        for entry in &lock.spec.history {
            if entry.sequence <= previous {
                violations.push(format!("{environment}: history sequence not increasing"));
            }
            previous = entry.sequence;
            if entry.action != HistoryAction::Cleared
                && !seen.contains(entry.lock_id.as_str())
                && !ambiguous
            {
                violations.push(format!(
                    "{environment}: stored {:?} of {} was never seen by a client",
                    entry.action, entry.lock_id
                ));
            }
        }
    }
    (ops.len(), violations)
}

/// Operations whose outcome is unknown, with the first reason (for the report).
pub fn ambiguous(ops: &[Op]) -> (usize, Option<String>) {
    let mut reasons = ops.iter().filter_map(|op| match &op.result {
        OpResult::Ambiguous(reason) => Some(reason.clone()),
        _ => None,
    });
    let first = reasons.next();
    (reasons.count() + usize::from(first.is_some()), first)
}

/// Counts refusals that prove overridden holders were told (for the report).
pub fn lost_refusals(ops: &[Op]) -> usize {
    ops.iter()
        .filter(|op| matches!(&op.result, OpResult::Refused(text) if text.contains("LockLost") || text.contains("NotHolder") || text.contains("Expired")))
        .count()
}
