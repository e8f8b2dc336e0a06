//! Randomized torture of mutual exclusion: concurrent clients perform random
//! acquire / extend / release / force / force-release operations on a few
//! environments, every invocation and completion is logged, and a checker
//! verifies the history afterwards. Some clients are in-process (the library's
//! `LockStore`), others run the real `deploylock` binary: acquire (also with
//! --wait-timeout, through the queue), extend, release, force-release, wait
//! and exec, and in the long run an exec process stopped with SIGSTOP past its
//! lock's expiry and resumed. Holdings last 60 to 90 s (in-process) or 1 or
//! 2 minutes (the CLI takes minutes; a lock lasts at least one).
//!
//! The short run is part of `make test`; `make torture` runs the same engine
//! for minutes on a control plane of its own, with faults injected
//! (benches/torture.rs).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use kube::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::Instant;

use deploylock::crd::{DeploymentLock, HistoryAction};
use deploylock::error::Error;
use deploylock::rules::{AcquireRequest, Actor, Request};
use deploylock::store::{self, LockStore, Outcome};

use crate::support::{Identity, TestCluster};

/// Where the engine runs: a namespace and one kubeconfig per identity.
pub struct Target {
    pub namespace: String,
    /// (username, kubeconfig, may force)
    pub identities: Vec<(String, PathBuf, bool)>,
    pub admin_kubeconfig: PathBuf,
}

/// What a run does.
pub struct Plan {
    pub environments: usize,
    /// In-process clients per identity.
    pub in_process: usize,
    /// Clients per identity that run the `deploylock` binary.
    pub processes: usize,
    pub duration: StdDuration,
    pub seed: u64,
    /// Holders pause past their expiry: in-process ones sleep, an exec
    /// process is stopped with SIGSTOP (minutes: a lock lasts at least 1).
    pub pauses: bool,
}

impl Target {
    /// alice and bob (ordinary users) and carol (a deploylock admin, who may
    /// force) in `namespace` of the shared control plane.
    pub fn on(cluster: &TestCluster, namespace: &str) -> Target {
        Target {
            namespace: namespace.to_string(),
            identities: vec![
                ("alice".into(), cluster.kubeconfig(Identity::Alice), false),
                ("bob".into(), cluster.kubeconfig(Identity::Bob), false),
                ("carol".into(), cluster.kubeconfig(Identity::Carol), true),
            ],
            admin_kubeconfig: cluster.kubeconfig(Identity::Admin),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    Acquire,
    ForceAcquire,
    /// `acquire --wait-timeout`: through the queue.
    AcquireWait,
    Extend,
    Release,
    ForceRelease,
    /// A holder that slept past its expiry and then tries to extend.
    ExtendAfterPause,
    /// `deploylock wait`.
    Wait,
    /// `deploylock exec`: the holding its command saw (the release at its
    /// end is logged as a Release).
    Exec,
    /// An exec process stopped with SIGSTOP past its lock's expiry: the
    /// holding it took.
    ExecPaused,
    /// The same exec once resumed: it must end with "lock lost" (exit 7),
    /// never carry on as holder.
    ExecResumed,
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
    /// A `deploylock` process rather than an in-process client.
    pub process: bool,
    pub user: String,
    /// The owner label the worker acquires with (explains stored history
    /// entries of acquisitions whose outcome the client never learnt).
    pub owner: String,
    pub environment: String,
    pub kind: OpKind,
    /// The holding the op concerns (extend/release), if any.
    pub target_lock: Option<String>,
    /// The lock ID an in-process acquire asked for (known even if the
    /// outcome is not).
    pub attempted_lock: Option<String>,
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
    let client = store::client_from(config).unwrap_or_else(|err| panic!("{err}"));
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

/// Shared log of every operation.
type Log = Arc<Mutex<Vec<Op>>>;

/// What every operation of one worker logs alongside its result.
#[derive(Clone)]
struct Worker {
    id: usize,
    process: bool,
    user: String,
    owner: String,
    can_force: bool,
    environments: usize,
    pauses: bool,
    deadline: Instant,
    log: Log,
}

impl Worker {
    fn record(
        &self,
        environment: &str,
        kind: OpKind,
        target_lock: Option<String>,
        attempted_lock: Option<String>,
        invoked: Instant,
        result: OpResult,
    ) {
        if let Ok(mut log) = self.log.lock() {
            log.push(Op {
                worker: self.id,
                process: self.process,
                user: self.user.clone(),
                owner: self.owner.clone(),
                environment: environment.to_string(),
                kind,
                target_lock,
                attempted_lock,
                invoked,
                completed: Instant::now(),
                result,
            });
        }
    }
}

/// Runs the plan's clients for its duration and returns every operation.
pub async fn run(target: &Target, plan: &Plan) -> Vec<Op> {
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + plan.duration;
    let mut tasks = Vec::new();
    let mut id = 0;
    for (user, kubeconfig, can_force) in &target.identities {
        for n in 0..plan.in_process + plan.processes {
            let process = n >= plan.in_process;
            let worker = Worker {
                id,
                process,
                user: user.clone(),
                owner: format!("{user}-{id}"),
                can_force: *can_force,
                environments: plan.environments,
                pauses: plan.pauses,
                deadline,
                log: log.clone(),
            };
            let rng = Rng((plan.seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
            if process {
                let cli = Cli {
                    kubeconfig: kubeconfig.clone(),
                    namespace: target.namespace.clone(),
                };
                tasks.push(tokio::spawn(process_worker(worker, cli, rng)));
            } else {
                let store = store_for(kubeconfig, &target.namespace).await;
                tasks.push(tokio::spawn(in_process_worker(worker, store, rng)));
            }
            id += 1;
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    log.lock().map(|log| log.clone()).unwrap_or_default()
}

async fn in_process_worker(worker: Worker, store: LockStore, mut rng: Rng) {
    let actor = Actor::new(worker.user.clone(), Some(worker.owner.clone()));
    // Holdings this worker believes it has, per environment.
    let mut mine: HashMap<String, String> = HashMap::new();
    let (can_force, pauses) = (worker.can_force, worker.pauses);
    while Instant::now() < worker.deadline {
        let environment = format!("t{}", rng.below(worker.environments as u64));
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
        let mut attempted = None;
        // 60 to 90 s: a pause of 62 s outlasts some holdings, not others.
        let duration = Duration::seconds(60 + rng.below(31) as i64);
        let request = match kind {
            OpKind::Extend | OpKind::ExtendAfterPause => Request::Extend {
                actor: actor.clone(),
                duration,
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
            _ => {
                let lock_id = uuid::Uuid::new_v4().to_string();
                attempted = Some(lock_id.clone());
                Request::Acquire(AcquireRequest {
                    actor: actor.clone(),
                    lock_id,
                    lock_type: deploylock::crd::LockType::Manual,
                    force: kind == OpKind::ForceAcquire,
                    reason: format!("torture {kind:?}"),
                    duration,
                    deployment_id: None,
                    metadata: BTreeMap::new(),
                    waiter_id: None,
                })
            }
        };
        if kind == OpKind::ExtendAfterPause {
            // Past the 60 s holding: another client may take it.
            tokio::time::sleep(StdDuration::from_secs(62)).await;
        }
        let invoked = Instant::now();
        let result = classify(store.apply(&environment, &request).await);
        track(&mut mine, &environment, kind, &result);
        worker.record(&environment, kind, held, attempted, invoked, result);
    }
}

/// Keeps a worker's view of its own holdings up to date after an operation.
fn track(mine: &mut HashMap<String, String>, environment: &str, kind: OpKind, result: &OpResult) {
    match (kind, result) {
        (
            OpKind::Acquire | OpKind::ForceAcquire | OpKind::AcquireWait,
            OpResult::Done {
                lock_id: Some(id), ..
            },
        ) => {
            mine.insert(environment.to_string(), id.clone());
        }
        (OpKind::Release, _)
        | (OpKind::Extend | OpKind::ExtendAfterPause, OpResult::Refused(_)) => {
            mine.remove(environment);
        }
        _ => {}
    }
}

/// The `deploylock` binary, run as one identity.
struct Cli {
    kubeconfig: PathBuf,
    namespace: String,
}

impl Cli {
    fn command(&self, environment: &str) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_deploylock"));
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["-n", &self.namespace, "-e", environment, "-o", "json"])
            .stdin(Stdio::null());
        command
    }

    /// Runs to completion: exit code (None if a signal ended it), stdout, stderr.
    async fn run(&self, environment: &str, args: &[&str]) -> (Option<i32>, String, String) {
        let mut command = tokio::process::Command::from(self.command(environment));
        match command.args(args).kill_on_drop(true).output().await {
            Ok(output) => (
                output.status.code(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).trim().to_string(),
            ),
            Err(err) => (None, String::new(), format!("cannot run deploylock: {err}")),
        }
    }
}

/// How an exit code of the CLI reads for the checker: 3 (held), 4 (wait
/// timed out), 5 (not the holder) and 7 (lock lost) are refusals that changed
/// nothing; anything but 0 otherwise (unreachable, interrupted) is unknown.
fn refused_or_unknown(code: Option<i32>, stderr: &str) -> OpResult {
    match code {
        Some(7) => OpResult::Refused(format!("LockLost (exit 7): {stderr}")),
        Some(code @ 3..=5) => OpResult::Refused(format!("exit {code}: {stderr}")),
        code => OpResult::Ambiguous(format!("exit {code:?}: {stderr}")),
    }
}

/// The holding named `lock_id` (or the current holder) in a `-o json` view.
/// The action that granted it is `known`, or found in the view's history.
fn holding_in_view(
    view: &serde_json::Value,
    lock_id: Option<&str>,
    known: Option<HistoryAction>,
) -> Option<OpResult> {
    let holder = &view["holder"];
    let lock_id = lock_id.or_else(|| holder["lockId"].as_str())?;
    let granted = || {
        view["history"]
            .as_array()?
            .iter()
            .filter(|entry| entry["lockId"].as_str() == Some(lock_id))
            .filter_map(|entry| {
                serde_json::from_value::<HistoryAction>(entry["action"].clone()).ok()
            })
            .find(|action| {
                matches!(
                    action,
                    HistoryAction::Acquired
                        | HistoryAction::TookOverExpired
                        | HistoryAction::ForceAcquired
                )
            })
    };
    let action = known.or_else(granted)?;
    let is_holder = holder["lockId"].as_str() == Some(lock_id);
    let time = |field: &str| {
        is_holder
            .then(|| holder[field].as_str())
            .flatten()
            .and_then(|text| text.parse::<DateTime<Utc>>().ok())
    };
    Some(OpResult::Done {
        outcome: Outcome::Transition(action),
        lock_id: Some(lock_id.to_string()),
        fencing_token: view["fencingToken"].as_i64().unwrap_or_default(),
        acquired_at: time("acquiredAt"),
        expires_at: time("expiresAt"),
    })
}

fn done(action: HistoryAction) -> OpResult {
    OpResult::Done {
        outcome: Outcome::Transition(action),
        lock_id: None,
        fencing_token: 0,
        acquired_at: None,
        expires_at: None,
    }
}

async fn process_worker(worker: Worker, cli: Cli, mut rng: Rng) {
    let mut mine: HashMap<String, String> = HashMap::new();
    // A stopped exec blocks its worker for over a minute: one per two minutes.
    let mut next_pause = Instant::now() + StdDuration::from_secs(20);
    let (can_force, pauses) = (worker.can_force, worker.pauses);
    while Instant::now() < worker.deadline {
        let environment = format!("t{}", rng.below(worker.environments as u64));
        let held = mine.get(&environment).cloned();
        let roll = rng.below(100);
        let kind = match (held.is_some(), roll) {
            (true, r) if r < 40 => OpKind::Extend,
            (true, _) => OpKind::Release,
            (false, r) if can_force && r < 6 => OpKind::ForceAcquire,
            (false, r) if can_force && r < 10 => OpKind::ForceRelease,
            (false, r) if pauses && r < 12 && Instant::now() >= next_pause => {
                next_pause = Instant::now() + StdDuration::from_secs(120);
                OpKind::ExecPaused
            }
            (false, r) if r < 35 => OpKind::Exec,
            (false, r) if r < 45 => OpKind::AcquireWait,
            (false, r) if r < 55 => OpKind::Wait,
            (false, _) => OpKind::Acquire,
        };
        let owner = worker.owner.as_str();
        // The CLI takes whole minutes.
        let minutes = if rng.below(2) == 0 { "1" } else { "2" };
        let invoked = Instant::now();
        let result = match kind {
            OpKind::Exec | OpKind::ExecPaused => {
                exec(&worker, &cli, &environment, kind).await;
                continue;
            }
            OpKind::Acquire | OpKind::ForceAcquire | OpKind::AcquireWait => {
                let mut args = vec![
                    "acquire",
                    "--duration",
                    minutes,
                    "--owner",
                    owner,
                    "--reason",
                    "torture",
                ];
                match kind {
                    OpKind::ForceAcquire => args.push("--force"),
                    OpKind::AcquireWait => args.extend(["--wait-timeout", "3"]),
                    _ => {}
                }
                let (code, stdout, stderr) = cli.run(&environment, &args).await;
                match code {
                    Some(0) => serde_json::from_str(&stdout)
                        .ok()
                        .and_then(|view| holding_in_view(&view, None, None))
                        .unwrap_or_else(|| {
                            OpResult::Ambiguous(format!("unreadable output: {stdout}"))
                        }),
                    code => refused_or_unknown(code, &stderr),
                }
            }
            OpKind::Extend | OpKind::Release => {
                let lock_id = held.clone().unwrap_or_default();
                let action = if kind == OpKind::Extend {
                    "extend"
                } else {
                    "release"
                };
                let mut args = vec![action, "--lock-id", &lock_id];
                if kind == OpKind::Extend {
                    args.extend(["--duration", minutes]);
                }
                let (code, stdout, stderr) = cli.run(&environment, &args).await;
                match code {
                    Some(0) if kind == OpKind::Release => done(HistoryAction::Released),
                    Some(0) => serde_json::from_str(&stdout)
                        .ok()
                        .and_then(|view| {
                            holding_in_view(&view, Some(&lock_id), Some(HistoryAction::Extended))
                        })
                        .unwrap_or_else(|| {
                            OpResult::Ambiguous(format!("unreadable output: {stdout}"))
                        }),
                    code => refused_or_unknown(code, &stderr),
                }
            }
            OpKind::ForceRelease => {
                let (code, _, stderr) = cli
                    .run(&environment, &["force-release", "--reason", "torture"])
                    .await;
                match code {
                    Some(0) => done(HistoryAction::ForceReleased),
                    code => refused_or_unknown(code, &stderr),
                }
            }
            _ => {
                let (code, _, stderr) = cli
                    .run(&environment, &["wait", "--wait-timeout", "2"])
                    .await;
                match code {
                    Some(0) => OpResult::Done {
                        outcome: Outcome::Unchanged(deploylock::rules::NoChange::AlreadyAvailable),
                        lock_id: None,
                        fencing_token: 0,
                        acquired_at: None,
                        expires_at: None,
                    },
                    code => refused_or_unknown(code, &stderr),
                }
            }
        };
        track(&mut mine, &environment, kind, &result);
        worker.record(&environment, kind, held, None, invoked, result);
    }
}

/// One `deploylock exec`. Its command prints the holding it runs under (lock
/// ID and token from the environment exec sets, then `status -o json`) and
/// sleeps; a paused exec is stopped (SIGSTOP) for longer than its 1-minute
/// lock lasts, then resumed, and must report the lock lost.
async fn exec(worker: &Worker, cli: &Cli, environment: &str, kind: OpKind) {
    let command = cli.command(environment);
    let (worker, kubeconfig, environment) = (
        worker.clone(),
        cli.kubeconfig.clone(),
        environment.to_string(),
    );
    // Reading its output line by line and stopping it are simplest blocking.
    let _ = tokio::task::spawn_blocking(move || {
        exec_blocking(&worker, command, &kubeconfig, &environment, kind)
    })
    .await;
}

fn exec_blocking(
    worker: &Worker,
    mut command: std::process::Command,
    kubeconfig: &PathBuf,
    environment: &str,
    kind: OpKind,
) {
    let paused = kind == OpKind::ExecPaused;
    let script = format!(
        "echo \"$DEPLOYLOCK_LOCK_ID $DEPLOYLOCK_FENCING_TOKEN\"; \"$0\" --kubeconfig \"$1\" -n \"$DEPLOYLOCK_NAMESPACE\" -e \"$DEPLOYLOCK_ENVIRONMENT\" -o json status | tr -d '\\n'; echo; sleep {}",
        if paused { "120" } else { "0.2" }
    );
    let invoked = Instant::now();
    command.args([
        "exec",
        "--duration",
        "1",
        "--grace",
        "1",
        "--owner",
        &worker.owner,
        "--reason",
        "torture exec",
    ]);
    if paused {
        // Queue for the lock rather than give up: the pause needs a holding.
        command.args(["--wait-timeout", "20"]);
    }
    command
        .arg("--")
        .args(["sh", "-c", &script, env!("CARGO_BIN_EXE_deploylock")])
        .arg(kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            worker.record(
                environment,
                kind,
                None,
                None,
                invoked,
                OpResult::Ambiguous(format!("cannot run deploylock: {err}")),
            );
            return;
        }
    };
    let mut lines = child
        .stdout
        .take()
        .map(|stdout| BufReader::new(stdout).lines());
    let mut next_line = || {
        lines
            .as_mut()
            .and_then(|lines| lines.next())
            .and_then(Result::ok)
    };
    let ids = next_line();
    let view = next_line();
    let holding = ids.as_deref().and_then(|ids| {
        let (lock_id, token) = ids.split_once(' ')?;
        let token: i64 = token.trim().parse().ok()?;
        let view: serde_json::Value = view
            .as_deref()
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default();
        Some(match holding_in_view(&view, Some(lock_id), None) {
            Some(OpResult::Done {
                outcome,
                acquired_at,
                expires_at,
                ..
            }) => OpResult::Done {
                outcome,
                lock_id: Some(lock_id.to_string()),
                fencing_token: token,
                acquired_at,
                expires_at,
            },
            // Held (the command runs) but how it was granted is unknown.
            _ => OpResult::Ambiguous(format!(
                "exec holding {lock_id} (token {token}) without a readable status"
            )),
        })
    });
    let lock_id = match &holding {
        Some(OpResult::Done { lock_id, .. }) => lock_id.clone(),
        _ => None,
    };
    if let Some(holding) = holding.clone() {
        worker.record(environment, kind, None, lock_id.clone(), invoked, holding);
    }
    let resumed_at = if paused && holding.is_some() {
        let pid = i32::try_from(child.id()).ok().map(Pid::from_raw);
        if let Some(pid) = pid {
            let _ = kill(pid, Signal::SIGSTOP);
            // The pause is the fault itself, not a wait for something.
            std::thread::sleep(StdDuration::from_secs(65));
            let _ = kill(pid, Signal::SIGCONT);
        }
        Some(Instant::now())
    } else {
        None
    };
    while next_line().is_some() {}
    let output = child.wait_with_output();
    let (code, stderr) = match output {
        Ok(output) => (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ),
        Err(err) => (None, err.to_string()),
    };
    match (holding, resumed_at) {
        // Never held: the refusal (3) or the failure is the result.
        (None, _) => worker.record(
            environment,
            kind,
            None,
            None,
            invoked,
            refused_or_unknown(code, &stderr),
        ),
        (Some(_), Some(resumed)) => {
            let result = match code {
                Some(7) => OpResult::Refused(format!("LockLost (exit 7): {stderr}")),
                Some(_) => OpResult::Done {
                    outcome: Outcome::Unchanged(deploylock::rules::NoChange::AlreadyAvailable),
                    lock_id: lock_id.clone(),
                    fencing_token: 0,
                    acquired_at: None,
                    expires_at: None,
                },
                None => OpResult::Ambiguous(format!("exec ended by a signal: {stderr}")),
            };
            worker.record(
                environment,
                OpKind::ExecResumed,
                lock_id,
                None,
                resumed,
                result,
            );
        }
        // The command ran to its end: exec released the holding.
        (Some(_), None) => {
            let result = match code {
                // exec warns, and keeps the command's code, when its final
                // release fails: whether the holding ended then is unknown.
                Some(0) if stderr.contains("could not release") => {
                    OpResult::Ambiguous(format!("exec's release: {stderr}"))
                }
                Some(0) => done(HistoryAction::Released),
                code => refused_or_unknown(code, &stderr),
            };
            worker.record(
                environment,
                OpKind::Release,
                lock_id,
                None,
                Instant::now(),
                result,
            );
        }
    }
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
    // Lock IDs clients saw or asked for, and the owners whose CLI
    // acquisitions ended without a known outcome (the CLI picks its lock ID).
    let mut seen: HashSet<&str> = HashSet::new();
    let mut unknown_owners: HashSet<&str> = HashSet::new();
    for op in ops {
        match &op.result {
            OpResult::Done {
                lock_id: Some(id), ..
            } => {
                seen.insert(id);
            }
            OpResult::Ambiguous(_) if op.process => {
                unknown_owners.insert(&op.owner);
            }
            _ => {}
        }
        seen.extend(op.target_lock.as_deref());
        seen.extend(op.attempted_lock.as_deref());
    }
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
            let explained = entry.action == HistoryAction::Cleared
                || seen.contains(entry.lock_id.as_str())
                || unknown_owners.contains(entry.owner.as_str());
            if !explained {
                violations.push(format!(
                    "{environment}: stored {:?} of {} (owner {}) was never seen by a client",
                    entry.action, entry.lock_id, entry.owner
                ));
            }
        }
    }
    // A client stopped past its lock's expiry must not carry on as holder.
    for op in ops {
        if op.kind == OpKind::ExecResumed && matches!(op.result, OpResult::Done { .. }) {
            violations.push(format!(
                "{}: exec of {} (owner {}) was stopped past its expiry and carried on instead of reporting the lock lost",
                op.environment,
                op.target_lock.as_deref().unwrap_or("?"),
                op.owner
            ));
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

/// Operations per kind, from in-process clients and from `deploylock`
/// processes (for the report).
pub fn counts(ops: &[Op]) -> String {
    let mut by_kind: BTreeMap<(OpKind, bool), usize> = BTreeMap::new();
    for op in ops {
        *by_kind.entry((op.kind, op.process)).or_default() += 1;
    }
    by_kind
        .iter()
        .map(|((kind, process), n)| {
            format!(
                "{kind:?} ({}): {n}",
                if *process {
                    "deploylock process"
                } else {
                    "in-process"
                }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Counts refusals that prove overridden holders were told (for the report).
pub fn lost_refusals(ops: &[Op]) -> usize {
    ops.iter()
        .filter(|op| matches!(&op.result, OpResult::Refused(text) if text.contains("LockLost") || text.contains("NotHolder") || text.contains("Expired")))
        .count()
}
