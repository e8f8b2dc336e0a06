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
//! The environments live in a namespace where the admission policy is
//! enforced (its clock kept by the harness's controller). Besides the honest
//! clients:
//! - a hostile client (torture_hostile.rs) sends random writes that are
//!   forbidden in the state it read; none may be accepted;
//! - the `exec` processes reach the API server through a fault proxy per
//!   client that is frozen, reset or black-holed at random moments, and some
//!   execs are killed with SIGKILL of their process group mid-command;
//! - every exec's command appends the time (this machine's clock, which the
//!   local API server shares) and its lock ID to a file about ten times a
//!   second while it runs; none of those times may be at or after its
//!   holding's expiresAt, and a killed exec's command must be gone by then;
//! - a recorder watches the objects: every expiresAt a holding ever had
//!   (exec's renewals included), and any version written by the hostile
//!   field manager.
//!
//! The short run is part of `make test`; `make torture` runs the same engine
//! for minutes on a control plane of its own, with more faults injected
//! (benches/torture.rs).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use futures::StreamExt;
use kube::Api;
use kube::api::{ApiResource, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::time::Instant;

use deploylock::crd::{DeploymentLock, HistoryAction};
use deploylock::error::Error;
use deploylock::notify::plan::history_key;
use deploylock::rules::{AcquireRequest, Actor, Request};
use deploylock::store::{self, LockStore, Outcome};

use crate::torture_hostile::{
    Attempt, HOSTILE_CREATE_PREFIX, HOSTILE_MANAGER, HostileIdentity, HostilePlan, hostile_client,
};
use crate::{Fault, FaultProxy, Identity, TestCluster};

/// Where the engine runs: a namespace and one kubeconfig per identity.
pub struct Target {
    pub namespace: String,
    /// (username, kubeconfig, may force)
    pub identities: Vec<(String, PathBuf, bool)>,
    pub admin_kubeconfig: PathBuf,
    /// The identities the hostile client writes as (the controller's
    /// credential included).
    pub hostile: Vec<HostileIdentity>,
    /// The pinned kubectl (the hostile client's second tool).
    pub kubectl: PathBuf,
    /// The `deploylock` binary the process clients run.
    pub deploylock: PathBuf,
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
    /// Hostile clients sending forbidden writes (0: none).
    pub hostile: usize,
    /// Pause of a hostile client between two writes.
    pub hostile_pause: StdDuration,
    /// Each hostile client carries on past the run's end (30 s at most)
    /// until the server has judged this many of its writes.
    pub hostile_at_least: usize,
    /// Each `deploylock` client's execs go through a fault proxy of their
    /// own; a fault is injected after a random gap in `partition_gap` and
    /// lasts a random time in `partition_length` (a quarter of the faults of
    /// the long run last 40 to 75 s, long enough to make exec stop its
    /// command before the holding expires).
    pub partitions: Option<Partitions>,
    /// Each `deploylock` client kills one exec (SIGKILL of its process group,
    /// mid-command) at least this often, the first as soon as it can.
    pub kill_every: Option<StdDuration>,
    /// The longest an exec's command runs (a quarter of them run long).
    pub longest_command: StdDuration,
    /// A killed exec's holding is left to expire (else its client releases
    /// it once the command is gone, as a cleanup step of a CI job would):
    /// every other one, or none.
    pub killed_left_to_expire: bool,
}

/// Fault injection on the execs' connections.
#[derive(Clone, Copy, Debug)]
pub struct Partitions {
    pub gap: (StdDuration, StdDuration),
    pub length: (StdDuration, StdDuration),
    /// Also, one fault in four lasts 40 to 75 s.
    pub long_ones: bool,
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
            hostile: [
                (Identity::Alice, false, false),
                (Identity::Bob, false, false),
                (Identity::Carol, true, false),
                (Identity::Controller, false, true),
            ]
            .into_iter()
            .map(|(identity, can_force, controller)| HostileIdentity {
                user: identity.username().to_string(),
                kubeconfig: cluster.kubeconfig(identity),
                can_force,
                controller,
            })
            .collect(),
            kubectl: cluster.bin_dir().join("kubectl"),
            deploylock: PathBuf::from(cluster.binaries().deploylock),
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
    /// An exec killed with SIGKILL of its process group while its command
    /// ran: the holding it took (nothing releases it).
    ExecKilled,
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
pub struct Rng(pub u64);

impl Rng {
    // An endless generator, not an iterator: it never yields `None`.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A duration in [low, high].
    pub fn between(&mut self, low: StdDuration, high: StdDuration) -> StdDuration {
        let span = high.saturating_sub(low).as_millis();
        let span = u64::try_from(span).unwrap_or(u64::MAX);
        low + StdDuration::from_millis(self.below(span.saturating_add(1)))
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

/// One exec's command as it ran: the times it wrote while running.
#[derive(Clone, Debug)]
pub struct CommandRun {
    pub worker: usize,
    pub owner: String,
    pub environment: String,
    pub kind: OpKind,
    pub lock_id: String,
    /// The holding's expiresAt when the command started (exec renews it).
    pub expires_at_start: Option<DateTime<Utc>>,
    /// How many times the command wrote, and the last time it did (this
    /// machine's clock, which the local API server shares).
    pub ticks: usize,
    pub last_tick: Option<DateTime<Utc>>,
    /// Local instants between which the command ran (to match fault windows).
    pub started: Instant,
    pub ended: Instant,
    /// exec said it stopped the command because no renewal succeeded.
    pub stopped_unrenewed: bool,
    /// For a killed exec: when its process group got SIGKILL, and when the
    /// command's tree was seen gone (its stdout closed), if that happened
    /// before the holding's expiry (plus 2 s to be sure of it).
    pub killed: Option<(DateTime<Utc>, Option<DateTime<Utc>>)>,
}

/// A fault injected on a client's proxy.
#[derive(Clone, Debug)]
pub struct FaultWindow {
    pub worker: usize,
    pub fault: Fault,
    pub from: Instant,
    pub to: Instant,
}

/// What the recorder saw of the stored objects during the run.
#[derive(Clone, Debug, Default)]
pub struct Recorded {
    /// Object versions seen.
    pub versions: usize,
    /// The latest expiresAt each holding (lock ID) ever had, from holders
    /// and history entries.
    pub expiry: HashMap<String, DateTime<Utc>>,
    /// Versions written by the hostile field manager, and hostile creates.
    pub hostile: Vec<String>,
    /// Every history entry seen, by its idempotency key (`<lock UID>-<sequence>`):
    /// (environment, action).
    pub history: BTreeMap<String, (String, HistoryAction)>,
}

/// Everything a run produced.
pub struct RunLog {
    pub ops: Vec<Op>,
    pub attempts: Vec<Attempt>,
    pub commands: Vec<CommandRun>,
    pub faults: Vec<FaultWindow>,
    pub recorded: Recorded,
}

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
    commands: Arc<Mutex<Vec<CommandRun>>>,
    kill_every: Option<StdDuration>,
    longest_command: StdDuration,
    killed_left_to_expire: bool,
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

/// `name` as an environment (a test's own names are valid).
fn environment(name: &str) -> deploylock::environment::Environment {
    name.parse()
        .unwrap_or_else(|err| panic!("invalid test environment {name:?}: {err}"))
}

/// The local API server must share this machine's clock: commands time
/// themselves with it. Its `Date` (whole seconds) must lie between the local
/// times before and after a read.
async fn assert_same_clock(kubeconfig: &PathBuf, namespace: &str) {
    let store = store_for(kubeconfig, namespace).await;
    let before = Utc::now();
    let observed = store
        .read(&environment("t0"))
        .await
        .unwrap_or_else(|err| panic!("cannot read the API server's clock: {err}"));
    let after = Utc::now();
    let floor = before - Duration::nanoseconds(i64::from(before.timestamp_subsec_nanos()));
    assert!(
        observed.server_time >= floor && observed.server_time <= after,
        "the API server's clock ({}) is not this machine's ({before} to {after}): commands cannot time themselves",
        observed.server_time
    );
}

/// Runs the plan's clients for its duration and returns what they did.
pub async fn run(target: &Target, plan: &Plan) -> RunLog {
    assert_same_clock(&target.admin_kubeconfig, &target.namespace).await;
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let commands = Arc::new(Mutex::new(Vec::new()));
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let faults = Arc::new(Mutex::new(Vec::new()));
    let scratch = tempfile::tempdir().unwrap_or_else(|err| panic!("no temporary directory: {err}"));
    let (stop_recorder, recorder_stopped) = tokio::sync::oneshot::channel();
    let recorder = tokio::spawn(record(
        target.admin_kubeconfig.clone(),
        target.namespace.clone(),
        recorder_stopped,
    ));
    let deadline = Instant::now() + plan.duration;
    let mut tasks = Vec::new();
    let mut proxies = Vec::new();
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
                commands: commands.clone(),
                kill_every: plan.kill_every,
                longest_command: plan.longest_command,
                killed_left_to_expire: plan.killed_left_to_expire,
            };
            let rng = Rng((plan.seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
            if process {
                let dir = scratch.path().join(format!("worker-{id}"));
                std::fs::create_dir_all(&dir)
                    .unwrap_or_else(|err| panic!("cannot create {}: {err}", dir.display()));
                let exec_kubeconfig = match plan.partitions {
                    Some(partitions) => {
                        let proxy = Arc::new(FaultProxy::start(kubeconfig, &dir).await);
                        let rng = Rng(rng.0.rotate_left(17) | 1);
                        tasks.push(tokio::spawn(partition(
                            proxy.clone(),
                            id,
                            partitions,
                            deadline,
                            rng,
                            faults.clone(),
                        )));
                        let path = proxy.kubeconfig().to_path_buf();
                        proxies.push(proxy);
                        path
                    }
                    None => kubeconfig.clone(),
                };
                let cli = Cli {
                    deploylock: target.deploylock.clone(),
                    kubeconfig: kubeconfig.clone(),
                    exec_kubeconfig,
                    namespace: target.namespace.clone(),
                    dir,
                };
                tasks.push(tokio::spawn(process_worker(worker, cli, rng)));
            } else {
                let store = store_for(kubeconfig, &target.namespace).await;
                tasks.push(tokio::spawn(in_process_worker(worker, store, rng)));
            }
            id += 1;
        }
    }
    for n in 0..plan.hostile {
        let hostile = HostilePlan {
            namespace: target.namespace.clone(),
            identities: target.hostile.clone(),
            environments: plan.environments,
            kubectl: target.kubectl.clone(),
            deadline,
            pause: plan.hostile_pause,
            at_least: plan.hostile_at_least,
        };
        let rng = Rng((plan.seed ^ (n as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03)) | 1);
        tasks.push(tokio::spawn(hostile_client(hostile, rng, attempts.clone())));
    }
    for task in tasks {
        let _ = task.await;
    }
    drop(proxies);
    let _ = stop_recorder.send(());
    let recorded = recorder.await.unwrap_or_default();
    RunLog {
        ops: take(&log),
        attempts: take(&attempts),
        commands: take(&commands),
        faults: take(&faults),
        recorded,
    }
}

fn take<T: Clone>(log: &Mutex<Vec<T>>) -> Vec<T> {
    log.lock().map(|log| log.clone()).unwrap_or_default()
}

/// Injects faults on one client's proxy until the deadline, and heals it.
async fn partition(
    proxy: Arc<FaultProxy>,
    worker: usize,
    plan: Partitions,
    deadline: Instant,
    mut rng: Rng,
    log: Arc<Mutex<Vec<FaultWindow>>>,
) {
    let faults = [Fault::Freeze, Fault::ResetThenStall, Fault::BlackHole];
    loop {
        tokio::time::sleep(rng.between(plan.gap.0, plan.gap.1)).await;
        if Instant::now() >= deadline {
            break;
        }
        let fault = faults[rng.below(faults.len() as u64) as usize];
        let length = if plan.long_ones && rng.below(4) == 0 {
            rng.between(StdDuration::from_secs(40), StdDuration::from_secs(75))
        } else {
            rng.between(plan.length.0, plan.length.1)
        };
        let from = Instant::now();
        proxy.set(fault);
        // The fault itself is the point: a timed window, not a wait for a state.
        tokio::time::sleep(length).await;
        proxy.set(Fault::None);
        if let Ok(mut log) = log.lock() {
            log.push(FaultWindow {
                worker,
                fault,
                from,
                to: Instant::now(),
            });
        }
    }
    proxy.set(Fault::None);
}

/// Watches the namespace's locks (as the admin) until told to stop.
async fn record(
    kubeconfig: PathBuf,
    namespace: String,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Recorded {
    let mut recorded = Recorded::default();
    let client = match crate::client_from(&kubeconfig).await {
        Ok(client) => client,
        Err(err) => panic!("recorder: {err}"),
    };
    let resource = ApiResource::erase::<DeploymentLock>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client, &namespace, &resource);
    let mut events = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    loop {
        let event = tokio::select! {
            _ = &mut stop => break,
            event = events.next() => event,
        };
        match event {
            Some(Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object))) => {
                note_version(&mut recorded, &object);
            }
            Some(_) => {}
            None => break,
        }
    }
    // The watch can lag at the end (reconnecting after a fault late in the
    // run): a last list records what the locks hold when the run ends, so
    // their newest history entries are not taken for unfounded deliveries.
    let deadline = Instant::now() + StdDuration::from_secs(60);
    loop {
        match api.list(&Default::default()).await {
            Ok(locks) => {
                for object in &locks {
                    note_version(&mut recorded, object);
                }
                break;
            }
            Err(err) if Instant::now() < deadline => {
                eprintln!("[torture] recorder: final list failed, retrying: {err}");
                tokio::time::sleep(StdDuration::from_millis(500)).await;
            }
            Err(err) => panic!("recorder: cannot list the locks at the end: {err}"),
        }
    }
    recorded
}

fn note_version(recorded: &mut Recorded, object: &DynamicObject) {
    recorded.versions += 1;
    let name = object.metadata.name.clone().unwrap_or_default();
    let version = object.metadata.resource_version.clone().unwrap_or_default();
    if name.starts_with(HOSTILE_CREATE_PREFIX) {
        recorded.hostile.push(format!(
            "a hostile create was stored: {name} (resourceVersion {version})"
        ));
    }
    let hostile_manager = object
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|entry| entry.manager.as_deref() == Some(HOSTILE_MANAGER));
    if hostile_manager {
        recorded.hostile.push(format!(
            "{name} at resourceVersion {version} has fields written by {HOSTILE_MANAGER}"
        ));
    }
    let spec = &object.data["spec"];
    let uid = object.metadata.uid.as_deref().unwrap_or_default();
    for entry in spec["history"].as_array().into_iter().flatten() {
        let (Some(sequence), Ok(action)) = (
            entry["sequence"].as_i64(),
            serde_json::from_value::<HistoryAction>(entry["action"].clone()),
        ) else {
            continue;
        };
        recorded
            .history
            .entry(history_key(uid, sequence))
            .or_insert_with(|| (name.clone(), action));
    }
    let holder = std::iter::once(&spec["holder"]);
    let entries = spec["history"].as_array().into_iter().flatten();
    for item in holder.chain(entries) {
        let (Some(lock_id), Some(expiry)) = (
            item["lockId"].as_str(),
            item["expiresAt"]
                .as_str()
                .and_then(|text| text.parse::<DateTime<Utc>>().ok()),
        ) else {
            continue;
        };
        let entry = recorded.expiry.entry(lock_id.to_string()).or_insert(expiry);
        *entry = (*entry).max(expiry);
    }
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
                not_after: None,
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
                    not_after: None,
                    group_id: None,
                })
            }
        };
        if kind == OpKind::ExtendAfterPause {
            // Past the 60 s holding: another client may take it.
            tokio::time::sleep(StdDuration::from_secs(62)).await;
        }
        let invoked = Instant::now();
        let result = classify(
            store
                .apply(&self::environment(&environment), &request)
                .await,
        );
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
    deploylock: PathBuf,
    kubeconfig: PathBuf,
    /// What `exec` connects with: through the client's fault proxy, if any.
    exec_kubeconfig: PathBuf,
    namespace: String,
    /// Where the client's commands write their times.
    dir: PathBuf,
}

impl Cli {
    fn command(&self, environment: &str) -> std::process::Command {
        self.command_with(&self.kubeconfig, environment)
    }

    fn command_with(&self, kubeconfig: &Path, environment: &str) -> std::process::Command {
        let mut command = std::process::Command::new(&self.deploylock);
        command
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["-n", &self.namespace, "-e", environment, "-o", "json"])
            .env_remove("KUBECONFIG")
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
    // The first kill as soon as possible, then one per `kill_every`.
    let mut next_kill = worker.kill_every.map(|_| Instant::now());
    let mut killed_once = false;
    let mut execs = 0u64;
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
            // Until the first kill has happened, every exec is one.
            (false, r)
                if next_kill.is_some_and(|next| Instant::now() >= next)
                    && (r < 25 || !killed_once) =>
            {
                OpKind::ExecKilled
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
            OpKind::Exec | OpKind::ExecPaused | OpKind::ExecKilled => {
                execs += 1;
                let length = match kind {
                    // Past the lock's expiry: only exec can stop them in time.
                    OpKind::ExecPaused | OpKind::ExecKilled => StdDuration::from_secs(150),
                    _ if rng.below(4) == 0 => {
                        rng.between(StdDuration::from_millis(200), worker.longest_command)
                    }
                    _ => rng.between(StdDuration::from_millis(200), StdDuration::from_secs(1)),
                };
                let kill_after = rng.between(
                    StdDuration::from_millis(100),
                    StdDuration::from_millis(1500),
                );
                let run = ExecRun {
                    kind,
                    length,
                    kill_after,
                    record: cli.dir.join(format!("exec-{execs}.times")),
                };
                let end = exec(&worker, &cli, &environment, run).await;
                if kind == OpKind::ExecKilled && end.held {
                    next_kill = worker.kill_every.map(|every| Instant::now() + every);
                    killed_once = true;
                }
                let leave = worker.killed_left_to_expire && rng.below(2) == 0;
                if let Some(lock_id) = end.killed_and_gone.filter(|_| !leave) {
                    // The cancelled job's cleanup: release the holding.
                    let invoked = Instant::now();
                    let (code, _, stderr) = cli
                        .run(&environment, &["release", "--lock-id", &lock_id])
                        .await;
                    let result = match code {
                        Some(0) => done(HistoryAction::Released),
                        code => refused_or_unknown(code, &stderr),
                    };
                    worker.record(
                        &environment,
                        OpKind::Release,
                        Some(lock_id),
                        None,
                        invoked,
                        result,
                    );
                }
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

/// How one exec runs.
struct ExecRun {
    kind: OpKind,
    /// How long its command runs if nothing stops it.
    length: StdDuration,
    /// For ExecKilled: how long after the command started.
    kill_after: StdDuration,
    /// The file its command writes its times to.
    record: PathBuf,
}

/// How an exec ended.
#[derive(Default)]
struct ExecEnd {
    /// It held the lock.
    held: bool,
    /// It was killed while holding, and its command's tree was gone before
    /// the holding's expiry: the holding's lock ID.
    killed_and_gone: Option<String>,
}

/// One `deploylock exec` (through the client's fault proxy, if any, unless
/// it is to be killed). Its
/// command writes its lock ID and the time to a file about ten times a
/// second, prints the holding it runs under (lock ID and token from the
/// environment exec sets, then `status -o json`) and carries on for its
/// length. A paused exec is stopped (SIGSTOP) for longer than its 1-minute
/// lock lasts, then resumed, and must report the lock lost; a killed exec
/// gets SIGKILL of its process group.
async fn exec(worker: &Worker, cli: &Cli, environment: &str, run: ExecRun) -> ExecEnd {
    // A killed exec connects directly: its fault is the kill.
    let kubeconfig = if run.kind == OpKind::ExecKilled {
        &cli.kubeconfig
    } else {
        &cli.exec_kubeconfig
    };
    let command = cli.command_with(kubeconfig, environment);
    let (worker, kubeconfig, environment) = (
        worker.clone(),
        cli.kubeconfig.clone(),
        environment.to_string(),
    );
    // Reading its output line by line and stopping it are simplest blocking.
    tokio::task::spawn_blocking(move || {
        exec_blocking(&worker, command, &kubeconfig, &environment, run)
    })
    .await
    .unwrap_or_default()
}

/// The times a command wrote: (lock ID, time) per line.
fn read_times(path: &Path) -> Vec<(String, DateTime<Utc>)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (lock_id, micros) = line.split_once(' ')?;
            let micros: i64 = micros.trim().parse().ok()?;
            Some((
                lock_id.to_string(),
                DateTime::from_timestamp_micros(micros)?,
            ))
        })
        .collect()
}

/// The command run under exec: `$0` is deploylock, `$1` a kubeconfig that
/// bypasses the proxy, `$2` the length in microseconds, `$3` the file to
/// write times to. `EPOCHREALTIME` is this machine's clock, without a fork.
const EXEC_SCRIPT: &str = r#"times=$3
tick() { printf '%s %s\n' "$DEPLOYLOCK_LOCK_ID" "${EPOCHREALTIME/./}" >> "$times"; }
tick
end=$(( ${EPOCHREALTIME/./} + $2 ))
echo "$DEPLOYLOCK_LOCK_ID $DEPLOYLOCK_FENCING_TOKEN"
"$0" --kubeconfig "$1" -n "$DEPLOYLOCK_NAMESPACE" -e "$DEPLOYLOCK_ENVIRONMENT" -o json status | tr -d '\n'; echo
while tick; [ "${EPOCHREALTIME/./}" -lt "$end" ]; do sleep 0.1; done"#;

fn exec_blocking(
    worker: &Worker,
    mut command: std::process::Command,
    kubeconfig: &PathBuf,
    environment: &str,
    run: ExecRun,
) -> ExecEnd {
    let kind = run.kind;
    let paused = kind == OpKind::ExecPaused;
    let killed = kind == OpKind::ExecKilled;
    // The script runs deploylock as `$0`: the program exec runs it under.
    let deploylock = command.get_program().to_owned();
    let invoked = Instant::now();
    // To place the command's times (this machine's clock) on the log's.
    let base = (Instant::now(), Utc::now());
    let instant_of = |time: DateTime<Utc>| {
        let ahead = time - base.1;
        match ahead.to_std() {
            Ok(ahead) => base.0 + ahead,
            Err(_) => base
                .0
                .checked_sub((-ahead).to_std().unwrap_or_default())
                .unwrap_or(base.0),
        }
    };
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
    if killed {
        command.args(["--wait-timeout", "5"]);
        // A group of its own, as a CI runner gives a job.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
    }
    command
        .arg("--")
        .args(["bash", "-c", EXEC_SCRIPT])
        .arg(deploylock)
        .arg(kubeconfig)
        .arg(run.length.as_micros().to_string())
        .arg(&run.record)
        .env("LC_ALL", "C")
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
            return ExecEnd::default();
        }
    };
    // stdout is read on a thread of its own: lines, then its end (every
    // process of the command's tree holds it).
    let (lines_tx, lines) = std::sync::mpsc::channel::<Option<String>>();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(Some(line)).is_err() {
                    return;
                }
            }
            let _ = lines_tx.send(None);
        });
    }
    let next_line = || lines.recv().ok().flatten();
    let ids = next_line();
    let command_started = Instant::now();
    let view = ids.as_ref().and_then(|_| next_line());
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
    let (lock_id, expires_at_start) = match &holding {
        Some(OpResult::Done {
            lock_id,
            expires_at,
            ..
        }) => (lock_id.clone(), *expires_at),
        _ => (None, None),
    };
    if let Some(holding) = holding.clone() {
        worker.record(environment, kind, None, lock_id.clone(), invoked, holding);
    }
    let pid = i32::try_from(child.id()).ok().map(Pid::from_raw);
    let mut killed_at = None;
    let resumed_at = if paused && holding.is_some() {
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
    let mut gone_at = None;
    if killed && holding.is_some() {
        // The fault itself: the command is killed at a random moment.
        std::thread::sleep(run.kill_after);
        if let Some(pid) = pid {
            let _ = killpg(pid, Signal::SIGKILL);
        }
        killed_at = Some(Utc::now());
        // The command's tree must be gone (stdout closed) before the
        // holding expires; look until 2 s past that, then let the checker
        // read what the command wrote.
        let until = expires_at_start.unwrap_or_else(|| Utc::now() + Duration::seconds(70))
            + Duration::seconds(2);
        loop {
            let left = (until - Utc::now()).to_std().unwrap_or_default();
            match lines.recv_timeout(left) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    gone_at = Some(Utc::now());
                    break;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
            }
        }
    } else {
        while lines.recv().is_ok_and(|line| line.is_some()) {}
    }
    let output = child.wait_with_output();
    let command_ended = Instant::now();
    let (code, stderr) = match output {
        Ok(output) => (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ),
        Err(err) => (None, err.to_string()),
    };
    let times = read_times(&run.record);
    // exec releases after its command ended, so after the command's last
    // time: the release's invocation, for the log's real-time order (exec's
    // own exit is seen later, possibly after another client took the lock).
    let release_invoked = times
        .iter()
        .map(|(_, time)| *time)
        .max()
        .map(instant_of)
        .unwrap_or(command_started)
        .min(command_ended);
    if let Some(lock_id) = times.first().map(|(id, _)| id.clone()) {
        let run = CommandRun {
            worker: worker.id,
            owner: worker.owner.clone(),
            environment: environment.to_string(),
            kind,
            lock_id,
            expires_at_start,
            ticks: times.len(),
            last_tick: times.iter().map(|(_, time)| *time).max(),
            started: command_started,
            ended: command_ended,
            stopped_unrenewed: stderr.contains("could not renew"),
            killed: killed_at.map(|at| (at, gone_at)),
        };
        if let Ok(mut commands) = worker.commands.lock() {
            commands.push(run);
        }
    }
    if killed && holding.is_some() {
        // Nothing released the holding: it expires, or the client releases it.
        return ExecEnd {
            held: true,
            killed_and_gone: gone_at.and(lock_id),
        };
    }
    let held = holding.is_some();
    match (holding, resumed_at) {
        // Never held: the refusal (3) or the failure is the result.
        (None, _) => {
            worker.record(
                environment,
                kind,
                None,
                None,
                invoked,
                refused_or_unknown(code, &stderr),
            );
        }
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
                // exec warns, and exits 8, when its final release fails:
                // whether the holding ended then is unknown.
                Some(8) => OpResult::Ambiguous(format!("exec's release: {stderr}")),
                Some(0) => done(HistoryAction::Released),
                code => refused_or_unknown(code, &stderr),
            };
            worker.record(
                environment,
                OpKind::Release,
                lock_id,
                None,
                release_invoked,
                result,
            );
        }
    }
    ExecEnd {
        held,
        killed_and_gone: None,
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
pub async fn check(target: &Target, run: &RunLog) -> (usize, Vec<String>) {
    let ops = &run.ops;
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
    // The stored objects know every renewal (exec renews without logging).
    for (id, expiry) in &run.recorded.expiry {
        let entry = expiry_of.entry(id.as_str()).or_insert(*expiry);
        *entry = (*entry).max(*expiry);
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
                    "{environment}: holdings {} (token {}, {:?} by {} worker {}) and {} (token {}, {:?} {b_action:?} by {} worker {}, completed {:?} after the first was granted) overlap; ops on the first: {:?}",
                    a.lock_id, a.token, a.op.kind, a.op.user, a.op.worker, b.lock_id, b.token, b.op.kind, b.op.user, b.op.worker,
                    b.op.completed.saturating_duration_since(a.op.completed),
                    on_lock.get(a.lock_id.as_str()).map(|ops| ops.iter().map(|op| (op.kind, op.invoked.saturating_duration_since(a.op.completed), &op.result)).collect::<Vec<_>>())
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
                    "{environment}: {:?} of overridden holding {} (worker {}) succeeded, invoked {:?} after a later holding was granted: {:?}",
                    op.kind, holding.lock_id, op.worker, op.invoked.saturating_duration_since(later), op.result
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
    violations.extend(check_commands(run, &expiry_of));
    // No hostile write was accepted, by its answer or by the stored objects.
    violations.extend(crate::torture_hostile::violations(&run.attempts));
    violations.extend(run.recorded.hostile.iter().cloned());
    match api.list(&Default::default()).await {
        Ok(list) => violations.extend(
            list.items
                .iter()
                .filter_map(|lock| lock.metadata.name.as_deref())
                .filter(|name| name.starts_with(HOSTILE_CREATE_PREFIX))
                .map(|name| format!("a hostile create was stored: {name}")),
        ),
        Err(err) => violations.push(format!("cannot list the locks: {err}")),
    }
    (
        ops.len() + run.attempts.len() + run.commands.len(),
        violations,
    )
}

/// No command of a holding ran at or after that holding's expiresAt on the
/// server's clock (the latest expiresAt it ever had), and a killed exec's
/// command was gone by then.
fn check_commands(run: &RunLog, expiry_of: &HashMap<&str, DateTime<Utc>>) -> Vec<String> {
    let mut violations = Vec::new();
    for command in &run.commands {
        let expiry = expiry_of
            .get(command.lock_id.as_str())
            .copied()
            .into_iter()
            .chain(command.expires_at_start)
            .max();
        let Some(expiry) = expiry else {
            violations.push(format!(
                "{}: the command of {} (owner {}) ran under a holding whose expiry nobody saw",
                command.environment, command.lock_id, command.owner
            ));
            continue;
        };
        if let Some(last) = command.last_tick
            && last >= expiry
        {
            violations.push(format!(
                "{}: the command of {} ({:?}, owner {}) still ran at {last}, at or after the holding's expiresAt {expiry}",
                command.environment, command.lock_id, command.kind, command.owner
            ));
        }
        if let Some((killed_at, None)) = command.killed {
            violations.push(format!(
                "{}: exec of {} (owner {}) was killed at {killed_at} and its command's tree was still there 2 s after the expiresAt {expiry}",
                command.environment, command.lock_id, command.owner
            ));
        }
    }
    violations
}

/// What the fault injection and the commands' timing showed (for the report).
pub fn command_report(run: &RunLog) -> String {
    let mut expiry_of = run.recorded.expiry.clone();
    for op in &run.ops {
        if let OpResult::Done {
            lock_id: Some(id),
            expires_at: Some(expiry),
            ..
        } = &op.result
        {
            let entry = expiry_of.entry(id.clone()).or_insert(*expiry);
            *entry = (*entry).max(*expiry);
        }
    }
    // Killed execs connect directly.
    let in_fault = |command: &CommandRun| {
        command.kind != OpKind::ExecKilled
            && run.faults.iter().any(|fault| {
                fault.worker == command.worker
                    && fault.from < command.ended
                    && fault.to > command.started
            })
    };
    let partitioned = run.commands.iter().filter(|c| in_fault(c)).count();
    let stopped = run.commands.iter().filter(|c| c.stopped_unrenewed).count();
    let killed = run.commands.iter().filter(|c| c.killed.is_some()).count();
    let of = |kind: Fault| run.faults.iter().filter(|f| f.fault == kind).count();
    let (freezes, resets, holes) = (
        of(Fault::Freeze),
        of(Fault::ResetThenStall),
        of(Fault::BlackHole),
    );
    let ticks: usize = run.commands.iter().map(|c| c.ticks).sum();
    // The smallest margin between a command's last time and its expiry.
    let margin = run
        .commands
        .iter()
        .filter_map(|c| {
            let expiry = expiry_of
                .get(&c.lock_id)
                .copied()
                .into_iter()
                .chain(c.expires_at_start)
                .max()?;
            Some(expiry - c.last_tick?)
        })
        .min();
    let stopped_margin = run
        .commands
        .iter()
        .filter(|c| c.stopped_unrenewed || c.kind == OpKind::ExecPaused)
        .filter_map(|c| {
            let expiry = expiry_of.get(&c.lock_id).copied()?;
            Some(expiry - c.last_tick?)
        })
        .min();
    format!(
        "{} exec commands timed ({ticks} times written); {} faults injected on the execs' connections ({freezes} freezes, {resets} resets with hung reconnects, {holes} black holes), {partitioned} commands ran during one, {stopped} stopped by exec for want of a renewal; {killed} execs killed with SIGKILL of their process group mid-command; least margin between a command's last time and its holding's expiresAt: {} (of commands stopped before expiry: {})",
        run.commands.len(),
        run.faults.len(),
        margin.map_or("-".to_string(), |m| format!(
            "{:.3} s",
            m.num_milliseconds() as f64 / 1000.0
        )),
        stopped_margin.map_or("-".to_string(), |m| format!(
            "{:.3} s",
            m.num_milliseconds() as f64 / 1000.0
        )),
    )
}

/// How the operations of one kind ended, with the first reason of each kind
/// of failure (for the report).
pub fn outcomes(ops: &[Op], kind: OpKind) -> String {
    let of_kind: Vec<&Op> = ops.iter().filter(|op| op.kind == kind).collect();
    let done = of_kind
        .iter()
        .filter(|op| matches!(op.result, OpResult::Done { .. }))
        .count();
    let first = |refused: bool| {
        of_kind.iter().find_map(|op| match &op.result {
            OpResult::Refused(why) if refused => Some(why.clone()),
            OpResult::Ambiguous(why) if !refused => Some(why.clone()),
            _ => None,
        })
    };
    let refused = of_kind
        .iter()
        .filter(|op| matches!(op.result, OpResult::Refused(_)))
        .count();
    format!(
        "{kind:?}: {} ({done} done, {refused} refused (first: {:?}), {} unknown (first: {:?}))",
        of_kind.len(),
        first(true),
        of_kind.len() - done - refused,
        first(false)
    )
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
