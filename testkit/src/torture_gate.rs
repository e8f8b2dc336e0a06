//! The workload gate in the torture run: every tortured environment is bound
//! (an EnvironmentBinding, kept by the run's controller) to a workload
//! namespace of its own, and gate writers, as the lock's holders (alice,
//! bob), an admin who may force (carol) and an identity that never holds a
//! lock (viewer), keep patching a Deployment and creating and deleting Jobs
//! there while the lock changes hands under the run's faults.
//!
//! The checker reads what the API server itself recorded: its audit log
//! (hack/audit-policy.yaml) holds every accepted write to the locks with the
//! object as stored, and every write to a workload with who sent it and its
//! answer. For each accepted workload write by an identity that may not
//! override the gate, some version of the environment's lock that the
//! gate could have read while admitting it must allow it: no holder, held by
//! that identity, or past its expiry.
//!
//! "Could have read": the policy reads the lock from the API server's
//! informer, which trails the stored lock. A version counts if it was stored
//! (its write answered) before the workload write was answered and not
//! replaced more than [`STALENESS`] before that write was received. Writes
//! admitted only thanks to that window are counted and the longest lag they
//! needed is reported. The gate's own refusals narrow the window: each
//! names the holder and expiry it read, so by its answer the informer (one
//! per API server, moving only forward) had reached that version, and no
//! write received later can have been admitted by an older one; a write admitted while another identity had held the
//! lock for longer than that is a violation naming the write and the holding.
//! Writes the client saw accepted but that the audit log lacks (a request in
//! flight when the API server was killed) are judged by the client's own
//! times instead.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use serde_json::{Value, json};
use tokio::time::Instant;

use deploylock::envbinding::policy_binding_name;

use crate::torture::Rng;
use crate::torture_hostile::client_for;
use crate::{Identity, TestCluster};

/// How long after a lock version was replaced the gate may still admit by
/// it: the API server's informer hands a stored lock to the admission
/// policy within milliseconds on an idle machine, but short runs on a loaded
/// two-core machine (make test's other tests running) had admitted writes
/// that needed up to 225 ms. One second leaves four times that. Holdings in
/// the run change hands every few hundred milliseconds, so a wider window
/// lets most writes pass (the control, [`BoundGate::control`], measures the
/// check's power); the long holdings of the `deploylock` processes (minutes)
/// are judged in full. The run reports the longest lag any admitted write
/// needed.
pub const STALENESS: StdDuration = StdDuration::from_secs(1);

/// The annotation the gate writers change on the bound Deployment.
const WRITE_ANNOTATION: &str = "torture.deploylock.dev/write";
const DEPLOYMENT: &str = "web";

/// A gate writer's identity.
#[derive(Clone, Debug)]
pub struct GateWriter {
    pub user: String,
    pub kubeconfig: PathBuf,
    /// May override the gate (the `force` verb): its writes are always
    /// admitted and checked for nothing.
    pub exempt: bool,
}

/// The bound namespaces of a torture run.
pub struct BoundGate {
    pub lock_namespace: String,
    /// (environment, its workload namespace)
    pub bound: Vec<(String, String)>,
    pub writers: Vec<GateWriter>,
    audit_dir: PathBuf,
    admin: Client,
}

/// What kind of workload write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WriteKind {
    /// A merge patch of an annotation of the Deployment.
    PatchDeployment,
    CreateJob,
    DeleteJob,
}

impl WriteKind {
    /// (audit verb, audit resource)
    fn audit(self) -> (&'static str, &'static str) {
        match self {
            WriteKind::PatchDeployment => ("patch", "deployments"),
            WriteKind::CreateJob => ("create", "jobs"),
            WriteKind::DeleteJob => ("delete", "jobs"),
        }
    }
}

/// The API server's answer to a gate writer.
#[derive(Clone, Debug, PartialEq)]
pub enum GateAnswer {
    Admitted,
    /// Refused by the workload gate (its message).
    Gated(String),
    /// Any other refusal (RBAC, not found, conflict): a set-up problem if
    /// frequent.
    Refused(u16, String),
    /// No answer (a fault): the write may or may not have been stored.
    Unknown(String),
}

/// One write a gate writer sent, as it saw it.
#[derive(Clone, Debug)]
pub struct GateWrite {
    pub user: String,
    pub environment: String,
    pub namespace: String,
    pub kind: WriteKind,
    pub name: String,
    pub invoked: DateTime<Utc>,
    pub completed: DateTime<Utc>,
    pub answer: GateAnswer,
}

/// A version of a lock as the API server stored it (from the audit log).
#[derive(Clone, Debug, PartialEq)]
pub struct LockVersion {
    pub resource_version: u64,
    /// When the write that stored it was received, and answered.
    pub received: DateTime<Utc>,
    pub stored: DateTime<Utc>,
    /// (user, lock ID, expiresAt) of the holder; None: nobody holds it (or
    /// the lock was deleted).
    pub holder: Option<(String, String, DateTime<Utc>)>,
    /// Highest history sequence in this version (a jump of more than one
    /// between two versions means a transition the audit log lacks).
    pub last_sequence: i64,
}

/// An accepted workload write to judge.
#[derive(Clone, Debug, PartialEq)]
pub struct AcceptedWrite {
    pub user: String,
    pub environment: String,
    /// What it was, for the message: "patch deployments/web in ns (audit ID)".
    pub what: String,
    pub received: DateTime<Utc>,
    pub completed: DateTime<Utc>,
}

/// What the gate check found.
#[derive(Debug, Default)]
pub struct GateCheck {
    /// Writes sent, by answer: admitted, gated, otherwise refused, unknown.
    pub sent: [usize; 4],
    /// Accepted workload writes in the bound namespaces the audit log holds.
    pub audited: usize,
    /// Accepted writes judged (by identities that may not override).
    pub judged: usize,
    /// Accepted writes by an identity that may override the gate.
    pub exempt: usize,
    /// Admitted only by a lock version replaced at most STALENESS earlier:
    /// by its former holder, and while the lock was free or expired.
    pub stale_former_holder: usize,
    pub stale_free: usize,
    /// The longest lag any admitted write needed.
    pub longest_lag: StdDuration,
    /// Writes admitted while the lock's timeline had a hole (a transition
    /// the audit log lacks: a write in flight when the API server was killed).
    pub in_audit_gap: usize,
    /// Writes the client saw accepted that the audit log lacks (judged by
    /// the client's times).
    pub unaudited: usize,
    /// Lock versions in the timeline.
    pub lock_versions: usize,
    /// Refusals naming the version the gate read (informer witnesses), and
    /// how often one ruled out an older version as what a write's gate read.
    pub witnesses: usize,
    pub below_floor: usize,
    pub violations: Vec<String>,
}

impl GateCheck {
    pub fn summary(&self) -> String {
        format!(
            "gate: {} writes sent ({} admitted, {} refused by the gate, {} otherwise refused, {} unknown); {} accepted writes in the audit log against {} lock versions: {} judged, {} by an admin who may override; {} admitted by a lock version replaced at most {:?} before (informer lag: {} by the former holder, {} while free or expired; longest {:?}); {} in an audit gap; {} accepted by answer but not audited; {} refusals naming the lock version the gate read (ruling out older versions {} times); {} violations",
            self.sent.iter().sum::<usize>(),
            self.sent[0],
            self.sent[1],
            self.sent[2],
            self.sent[3],
            self.audited,
            self.lock_versions,
            self.judged,
            self.exempt,
            self.stale_former_holder + self.stale_free,
            STALENESS,
            self.stale_former_holder,
            self.stale_free,
            self.longest_lag,
            self.in_audit_gap,
            self.unaudited,
            self.witnesses,
            self.below_floor,
            self.violations.len()
        )
    }
}

fn kubectl_ok(cluster: &TestCluster, args: &[&str], input: Option<&str>, what: &str) {
    let output = match input {
        Some(input) => cluster.kubectl_with_input(Identity::Admin, args, input),
        None => cluster.kubectl(Identity::Admin, args),
    };
    assert!(
        output.status.success(),
        "torture gate: cannot {what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl BoundGate {
    /// Installs the gate (the EnvironmentBinding CRD, the policy, the
    /// controller's role for bindings), creates one workload namespace per
    /// environment `t0`.. of `lock_namespace` with a Deployment and RBAC for
    /// the writers, and binds each with an EnvironmentBinding. The run's
    /// controller must run with `--environment-bindings`; then
    /// [`BoundGate::await_in_force`].
    pub async fn bind(cluster: &TestCluster, lock_namespace: &str, environments: usize) -> Self {
        cluster.install_environment_bindings();
        let ssa = [
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager",
            "torture-gate",
            "-f",
            "-",
        ];
        let writers: Vec<GateWriter> = [
            (Identity::Alice, false),
            (Identity::Bob, false),
            (Identity::Carol, true),
            (Identity::Viewer, false),
        ]
        .into_iter()
        .map(|(identity, exempt)| GateWriter {
            user: identity.username().to_string(),
            kubeconfig: cluster.kubeconfig(identity),
            exempt,
        })
        .collect();
        let subjects: Vec<Value> = writers
            .iter()
            .map(|writer| {
                json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": writer.user})
            })
            .collect();
        let mut bound = Vec::new();
        let mut items = Vec::new();
        for n in 0..environments {
            let environment = format!("t{n}");
            let namespace = cluster
                .namespace(&format!("{lock_namespace}-gate-{environment}"))
                .await;
            items.extend([
                json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                    "metadata": {"name": "torture-workloads", "namespace": namespace},
                    "rules": [
                        {"apiGroups": ["apps"], "verbs": ["*"], "resources": ["deployments"]},
                        {"apiGroups": ["batch"], "verbs": ["*"], "resources": ["jobs"]}
                    ]
                }),
                json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                    "metadata": {"name": "torture-workloads", "namespace": namespace},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "torture-workloads"},
                    "subjects": subjects
                }),
                json!({
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": DEPLOYMENT, "namespace": namespace},
                    "spec": {
                        "replicas": 1,
                        "selector": {"matchLabels": {"app": DEPLOYMENT}},
                        "template": {"metadata": {"labels": {"app": DEPLOYMENT}},
                                     "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}}
                    }
                }),
                json!({
                    "apiVersion": "deploylock.dev/v1", "kind": "EnvironmentBinding",
                    "metadata": {"name": format!("{lock_namespace}-{environment}")},
                    "spec": {"environment": environment, "lockNamespace": lock_namespace,
                             "namespaces": [namespace]}
                }),
            ]);
            bound.push((environment, namespace));
        }
        // One kubectl for all of them: each run of it costs a process start.
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        kubectl_ok(
            cluster,
            &ssa,
            Some(&list.to_string()),
            "create the bound namespaces' objects and EnvironmentBindings",
        );
        BoundGate {
            lock_namespace: lock_namespace.to_string(),
            bound,
            writers,
            audit_dir: cluster.dir().join("logs"),
            admin: cluster.client(Identity::Admin).await,
        }
    }

    /// Waits until the controller has made every EnvironmentBinding's policy
    /// binding (on a watch, up to `within`).
    pub async fn await_in_force(&self, within: StdDuration) {
        let api: Api<ValidatingAdmissionPolicyBinding> = Api::all(self.admin.clone());
        for (environment, namespace) in &self.bound {
            let name = policy_binding_name(&self.lock_namespace, environment);
            let waited = tokio::time::timeout(
                within,
                await_condition(api.clone(), &name, |binding: Option<&_>| binding.is_some()),
            )
            .await;
            assert!(
                matches!(waited, Ok(Ok(Some(_)))),
                "the controller made no policy binding {name} for {environment} ({namespace}) within {within:?}: {waited:?}"
            );
        }
    }

    /// Runs one gate writer per identity until `deadline`, each pausing
    /// `pause` between writes; returns every write sent.
    pub async fn write(&self, deadline: Instant, pause: StdDuration, seed: u64) -> Vec<GateWrite> {
        let mut tasks = Vec::new();
        for (n, writer) in self.writers.iter().enumerate() {
            let client = client_for(&writer.kubeconfig).await;
            let rng = Rng((seed ^ (n as u64 + 1).wrapping_mul(0xa076_1d64_78bd_642f)) | 1);
            tasks.push(tokio::spawn(gate_writer(
                client,
                writer.user.clone(),
                self.bound.clone(),
                deadline,
                pause,
                rng,
            )));
        }
        let mut writes = Vec::new();
        for task in tasks {
            match task.await {
                Ok(mut sent) => writes.append(&mut sent),
                Err(err) => panic!("a gate writer failed: {err}"),
            }
        }
        writes
    }

    /// The API server's audit log of the run, by bound namespace.
    fn audit(&self) -> Audit {
        let environments: HashMap<&str, &str> = self
            .bound
            .iter()
            .map(|(environment, namespace)| (namespace.as_str(), environment.as_str()))
            .collect();
        read_audit(&self.audit_dir, &self.lock_namespace, &environments)
    }

    /// Checks the writes against the API server's audit log, and runs the
    /// control (below) on the same reading of it.
    pub fn check(&self, writes: &[GateWrite]) -> (GateCheck, GateCheck) {
        let mut audit = self.audit();
        let check = self.check_writes(&mut audit, writes);
        (check, self.control(audit))
    }

    /// Judges the writes by `audit`.
    fn check_writes(&self, audit: &mut Audit, writes: &[GateWrite]) -> GateCheck {
        let exempt: HashSet<String> = self
            .writers
            .iter()
            .filter(|writer| writer.exempt)
            .map(|writer| writer.user.clone())
            .collect();
        let mut check = GateCheck::default();
        for write in writes {
            let slot = match write.answer {
                GateAnswer::Admitted => 0,
                GateAnswer::Gated(_) => 1,
                GateAnswer::Refused(..) => 2,
                GateAnswer::Unknown(_) => 3,
            };
            check.sent[slot] += 1;
        }
        check.audited = audit.writes.len();
        check.lock_versions = audit.timeline.values().map(Vec::len).sum();
        // Writes the client saw accepted: each must be in the audit log, else
        // it is judged by the client's own times.
        let mut by_key: HashMap<(&str, &str, &str, &str), Vec<usize>> = HashMap::new();
        for (i, event) in audit.writes.iter().enumerate() {
            by_key
                .entry((&event.user, &event.namespace, &event.verb, &event.resource))
                .or_default()
                .push(i);
        }
        let mut used = vec![false; audit.writes.len()];
        let mut unaudited = Vec::new();
        for write in writes
            .iter()
            .filter(|write| write.answer == GateAnswer::Admitted)
        {
            let (verb, resource) = write.kind.audit();
            let key = (
                write.user.as_str(),
                write.namespace.as_str(),
                verb,
                resource,
            );
            let found = by_key.get(&key).into_iter().flatten().copied().find(|&i| {
                let event = &audit.writes[i];
                !used[i]
                    && (event.name.is_empty() || event.name == write.name)
                    && event.write.received >= write.invoked
                    && event.write.completed <= write.completed
            });
            match found {
                Some(i) => used[i] = true,
                None => unaudited.push(AcceptedWrite {
                    user: write.user.clone(),
                    environment: write.environment.clone(),
                    what: format!(
                        "{verb} {resource}/{} in {} (accepted by its answer; not in the audit log)",
                        write.name, write.namespace
                    ),
                    received: write.invoked,
                    completed: write.completed,
                }),
            }
        }
        check.unaudited = unaudited.len();
        let witnesses = audit.witnesses();
        check.witnesses = witnesses.len();
        let accepted: Vec<AcceptedWrite> = std::mem::take(&mut audit.writes)
            .into_iter()
            .map(|event| event.write)
            .chain(unaudited)
            .collect();
        judge(
            &audit.timeline,
            &accepted,
            &witnesses,
            &exempt,
            STALENESS,
            &mut check,
        );
        check
    }

    /// The checker's control on the same evidence: the writes the gate
    /// refused (their audit events), judged as if they had been admitted.
    /// Most were sent while another identity held the lock, so the checker
    /// must call them violations: proof, on this run's own audit log, that
    /// the check fails when a write goes through against the lock (and a
    /// measure of its power under the run's churn of holdings). Those it
    /// would let pass were refused within the informer's lag of a version
    /// that allowed them.
    fn control(&self, audit: Audit) -> GateCheck {
        let witnesses = audit.witnesses();
        let refused: Vec<AcceptedWrite> =
            audit.refused.into_iter().map(|event| event.write).collect();
        let mut check = GateCheck {
            audited: refused.len(),
            lock_versions: audit.timeline.values().map(Vec::len).sum(),
            ..GateCheck::default()
        };
        check.witnesses = witnesses.len();
        judge(
            &audit.timeline,
            &refused,
            &witnesses,
            &HashSet::new(),
            STALENESS,
            &mut check,
        );
        check
    }
}

/// One gate writer: random writes to the bound namespaces until `deadline`.
async fn gate_writer(
    client: Client,
    user: String,
    bound: Vec<(String, String)>,
    deadline: Instant,
    pause: StdDuration,
    mut rng: Rng,
) -> Vec<GateWrite> {
    let mut writes = Vec::new();
    // Jobs this writer created, per namespace, to delete later.
    let mut jobs: HashMap<String, Vec<String>> = HashMap::new();
    let mut n = 0u64;
    while Instant::now() < deadline {
        n += 1;
        let (environment, namespace) = &bound[rng.below(bound.len() as u64) as usize];
        let mine = jobs.entry(namespace.clone()).or_default();
        let roll = rng.below(100);
        let kind = match roll {
            r if r < 20 && !mine.is_empty() => WriteKind::DeleteJob,
            r if r < 45 => WriteKind::CreateJob,
            _ => WriteKind::PatchDeployment,
        };
        let name = match kind {
            WriteKind::PatchDeployment => DEPLOYMENT.to_string(),
            WriteKind::CreateJob => format!("gate-{user}-{n}"),
            WriteKind::DeleteJob => mine.swap_remove(rng.below(mine.len() as u64) as usize),
        };
        let invoked = Utc::now();
        let result = match kind {
            WriteKind::PatchDeployment => {
                let patch =
                    json!({"metadata": {"annotations": {WRITE_ANNOTATION: format!("{user}-{n}")}}});
                Api::<Deployment>::namespaced(client.clone(), namespace)
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
            }
            WriteKind::CreateJob => {
                let job: Job = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {"torture.deploylock.dev/writer": user}},
                    "spec": {
                        "suspend": true,
                        "template": {"spec": {"restartPolicy": "Never",
                            "containers": [{"name": "step", "image": "example.invalid/step:1"}]}}
                    }
                }))
                .unwrap_or_else(|err| panic!("a Job: {err}"));
                Api::<Job>::namespaced(client.clone(), namespace)
                    .create(&PostParams::default(), &job)
                    .await
                    .map(|_| ())
            }
            WriteKind::DeleteJob => Api::<Job>::namespaced(client.clone(), namespace)
                .delete(&name, &DeleteParams::background())
                .await
                .map(|_| ()),
        };
        let completed = Utc::now();
        let answer = match result {
            Ok(()) => GateAnswer::Admitted,
            Err(kube::Error::Api(status))
                if status.code == 403 && status.message.contains("ValidatingAdmissionPolicy") =>
            {
                GateAnswer::Gated(status.message.clone())
            }
            Err(kube::Error::Api(status)) => {
                GateAnswer::Refused(status.code, status.message.clone())
            }
            Err(err) => GateAnswer::Unknown(err.to_string()),
        };
        match (&answer, kind) {
            (GateAnswer::Admitted, WriteKind::CreateJob) => mine.push(name.clone()),
            // Refused or unknown: try again later (a 404 means it is gone).
            (GateAnswer::Gated(_) | GateAnswer::Unknown(_), WriteKind::DeleteJob) => {
                mine.push(name.clone())
            }
            _ => {}
        }
        writes.push(GateWrite {
            user: user.clone(),
            environment: environment.clone(),
            namespace: namespace.clone(),
            kind,
            name,
            invoked,
            completed,
            answer,
        });
        // The pace of the writers, not a wait for a state.
        tokio::time::sleep(pause).await;
    }
    writes
}

/// An accepted workload write as the audit log has it.
struct AuditedWrite {
    /// For a refusal: the holder and expiry its message names (the lock
    /// version the gate read).
    seen: Option<(String, DateTime<Utc>)>,
    namespace: String,
    verb: String,
    resource: String,
    name: String,
    user: String,
    write: AcceptedWrite,
}

/// What the audit log holds for a run.
struct Audit {
    /// Per environment, the lock's versions in the order they were stored.
    timeline: BTreeMap<String, Vec<LockVersion>>,
    /// Accepted workload writes in the bound namespaces.
    writes: Vec<AuditedWrite>,
    /// Workload writes in the bound namespaces the gate refused.
    refused: Vec<AuditedWrite>,
}

impl Audit {
    fn witnesses(&self) -> Vec<Witness> {
        self.refused
            .iter()
            .filter_map(|event| {
                Some(Witness {
                    environment: event.write.environment.clone(),
                    answered: event.write.completed,
                    holding: event.seen.clone()?,
                })
            })
            .collect()
    }
}

/// Reads the audit log files (`audit*.log`, rotated ones included).
fn read_audit(dir: &Path, lock_namespace: &str, environments: &HashMap<&str, &str>) -> Audit {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", dir.display()))
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("audit") && name.ends_with(".log"))
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no audit log in {}: is the API server started with hack/audit-policy.yaml?",
        dir.display()
    );
    let mut audit = Audit {
        timeline: BTreeMap::new(),
        writes: Vec::new(),
        refused: Vec::new(),
    };
    let wanted: HashSet<&str> = environments.values().copied().collect();
    for file in files {
        let reader = match std::fs::File::open(&file) {
            Ok(file) => BufReader::new(file),
            Err(err) => panic!("cannot open {}: {err}", file.display()),
        };
        for line in reader.lines().map_while(Result::ok) {
            // Most lines are other tests' writes: skip them unparsed.
            if !line.contains(lock_namespace) {
                continue;
            }
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                // The last line of a killed API server may be cut short.
                continue;
            };
            note_event(&event, lock_namespace, environments, &wanted, &mut audit);
        }
    }
    for versions in audit.timeline.values_mut() {
        versions.sort_by_key(|version| version.resource_version);
    }
    audit
}

fn note_event(
    event: &Value,
    lock_namespace: &str,
    environments: &HashMap<&str, &str>,
    wanted: &HashSet<&str>,
    audit: &mut Audit,
) {
    let code = event["responseStatus"]["code"].as_u64().unwrap_or_default();
    let gated = code == 403
        && event["responseStatus"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("ValidatingAdmissionPolicy"));
    if event["stage"] != "ResponseComplete" || !((200..300).contains(&code) || gated) {
        return;
    }
    let time = |field: &str| {
        event[field]
            .as_str()
            .and_then(|text| text.parse::<DateTime<Utc>>().ok())
    };
    let (Some(received), Some(completed)) =
        (time("requestReceivedTimestamp"), time("stageTimestamp"))
    else {
        return;
    };
    let object = &event["objectRef"];
    let text = |value: &Value| value.as_str().unwrap_or_default().to_string();
    let (namespace, resource, name) = (
        text(&object["namespace"]),
        text(&object["resource"]),
        text(&object["name"]),
    );
    let verb = text(&event["verb"]);
    if namespace == lock_namespace && resource == "deploymentlocks" && !gated {
        let stored = &event["responseObject"];
        // A create's request names no object: the stored one does.
        let name = match stored["metadata"]["name"].as_str() {
            Some(stored_name) if name.is_empty() => stored_name.to_string(),
            _ => name,
        };
        if !wanted.contains(name.as_str()) {
            return;
        }
        let Some(resource_version) = stored["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|text| text.parse::<u64>().ok())
        else {
            return;
        };
        // A delete answers with the object as it was, or a Status: nobody
        // holds a deleted lock.
        let holder = &stored["spec"]["holder"];
        let holder = match (
            verb.as_str(),
            holder["user"].as_str(),
            holder["lockId"].as_str(),
            holder["expiresAt"]
                .as_str()
                .and_then(|text| text.parse::<DateTime<Utc>>().ok()),
        ) {
            ("delete", ..) => None,
            (_, Some(user), Some(lock_id), Some(expiry)) => {
                Some((user.to_string(), lock_id.to_string(), expiry))
            }
            _ => None,
        };
        let last_sequence = stored["spec"]["history"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|entry| entry["sequence"].as_i64())
            .max()
            .unwrap_or_default();
        audit.timeline.entry(name).or_default().push(LockVersion {
            resource_version,
            received,
            stored: completed,
            holder,
            last_sequence,
        });
        return;
    }
    let Some(environment) = environments.get(namespace.as_str()) else {
        return;
    };
    let subresource = object["subresource"].as_str();
    let shown = match subresource {
        Some(sub) => format!("{resource}/{name}/{sub}"),
        None => format!("{resource}/{name}"),
    };
    let user = text(&event["user"]["username"]);
    let list = if gated {
        &mut audit.refused
    } else {
        &mut audit.writes
    };
    let seen = gated
        .then(|| event["responseStatus"]["message"].as_str())
        .flatten()
        .and_then(holding_named);
    list.push(AuditedWrite {
        seen,
        write: AcceptedWrite {
            user: user.clone(),
            environment: environment.to_string(),
            what: format!(
                "{verb} {shown} in {namespace} (audit ID {})",
                text(&event["auditID"])
            ),
            received,
            completed,
        },
        namespace,
        verb,
        resource,
        name,
        user,
    });
}

/// (holder, expiresAt) a refusal of the gate names: "... is locked by bob
/// (bob-3) until 2026-11-28T05:15:25Z, reason: ...".
fn holding_named(message: &str) -> Option<(String, DateTime<Utc>)> {
    let (_, rest) = message.split_once(" is locked by ")?;
    let user = rest.split_whitespace().next()?;
    let (_, rest) = rest.split_once(" until ")?;
    let (expiry, _) = rest.split_once(", reason: ")?;
    Some((user.to_string(), expiry.parse().ok()?))
}

/// A refusal of the gate, answered at `answered`, named the lock version
/// it read: the API server's informer had reached that version by then,
/// and an informer only moves forward, so no later admission read an older
/// one.
#[derive(Clone, Debug, PartialEq)]
pub struct Witness {
    pub environment: String,
    pub answered: DateTime<Utc>,
    /// (holder, expiresAt) the refusal named.
    pub holding: (String, DateTime<Utc>),
}

/// Per environment, (answered, the least resource version the informer had
/// reached by then), sorted, the versions a running maximum.
fn informer_floors(
    timeline: &BTreeMap<String, Vec<LockVersion>>,
    witnesses: &[Witness],
) -> BTreeMap<String, Vec<(DateTime<Utc>, u64)>> {
    let mut floors: BTreeMap<String, Vec<(DateTime<Utc>, u64)>> = BTreeMap::new();
    for witness in witnesses {
        let Some(versions) = timeline.get(&witness.environment) else {
            continue;
        };
        // The earliest version with that holding (an extend makes a new one).
        let named = versions.iter().find(|version| {
            version.holder.as_ref().is_some_and(|(user, _, expiry)| {
                *user == witness.holding.0 && *expiry == witness.holding.1
            })
        });
        if let Some(version) = named {
            floors
                .entry(witness.environment.clone())
                .or_default()
                .push((witness.answered, version.resource_version));
        }
    }
    for list in floors.values_mut() {
        list.sort();
        let mut highest = 0;
        for entry in list.iter_mut() {
            highest = highest.max(entry.1);
            entry.1 = highest;
        }
    }
    floors
}

/// Longer than any request takes between being stored and answered.
const MARGIN: Duration = Duration::seconds(30);

/// Whether the gate, reading `version`, lets `user` write at `at`.
fn allows(version: Option<&LockVersion>, user: &str, at: DateTime<Utc>) -> bool {
    match version.and_then(|version| version.holder.as_ref()) {
        None => true,
        Some((holder, _, expiry)) => holder == user || *expiry <= at,
    }
}

/// Judges accepted workload writes against the locks' timelines (see the
/// module's comment); adds what it finds to `check`.
pub fn judge(
    timeline: &BTreeMap<String, Vec<LockVersion>>,
    writes: &[AcceptedWrite],
    witnesses: &[Witness],
    exempt: &HashSet<String>,
    staleness: StdDuration,
    check: &mut GateCheck,
) {
    let staleness = Duration::from_std(staleness).unwrap_or_else(|_| Duration::seconds(2));
    let empty = Vec::new();
    let floors = informer_floors(timeline, witnesses);
    let no_floors = Vec::new();
    for write in writes {
        if exempt.contains(&write.user) {
            check.exempt += 1;
            continue;
        }
        check.judged += 1;
        let versions = timeline.get(&write.environment).unwrap_or(&empty);
        // The version the informer had surely reached when this write came.
        let env_floors = floors.get(&write.environment).unwrap_or(&no_floors);
        let floor = env_floors
            .partition_point(|(answered, _)| *answered < write.received)
            .checked_sub(1)
            .and_then(|i| env_floors.get(i))
            .map(|(_, version)| *version);
        let earliest = write.received - staleness;
        // Candidates: index k stands for versions[k - 1] (0: before the
        // first version, no lock object). A version counts if it was
        // received before the write was answered and its successor was not
        // stored before `earliest`.
        // The latest allowing candidate: (when it was replaced, whether by
        // a holding of the writer's own).
        let mut allowed_by: Option<(Option<DateTime<Utc>>, bool)> = None;
        let mut in_gap = false;
        let mut forbidding: Option<&LockVersion> = None;
        // Versions are in the order they were stored (resource versions);
        // their answer times follow that order but for requests answered
        // late: MARGIN bounds that, and the search.
        let first = versions.partition_point(|version| version.stored < earliest - MARGIN);
        for k in first..=versions.len() {
            let version = k.checked_sub(1).and_then(|i| versions.get(i));
            let next = versions.get(k);
            if version.is_some_and(|version| version.received > write.completed + MARGIN) {
                break;
            }
            if version.is_some_and(|version| version.received > write.completed) {
                continue;
            }
            let replaced = next.map(|next| next.stored);
            if replaced.is_some_and(|replaced| replaced < earliest) {
                continue;
            }
            if let Some(floor) = floor
                && version.is_none_or(|version| version.resource_version < floor)
            {
                // Older than what a refusal shows the informer had read.
                check.below_floor += 1;
                continue;
            }
            if let (Some(version), Some(next)) = (version, next)
                && next.last_sequence > version.last_sequence.saturating_add(1)
            {
                // Transitions the audit log lacks between these two.
                in_gap = true;
            }
            if allows(version, &write.user, write.completed) {
                let own = version
                    .and_then(|version| version.holder.as_ref())
                    .is_some_and(|(holder, ..)| *holder == write.user);
                allowed_by = Some((replaced, own));
            } else if version.is_some() {
                // The latest version that forbids it, for the message.
                forbidding = version;
            }
        }
        match allowed_by {
            Some((replaced, own)) => {
                // Lag: how long before the write was received the allowing
                // version had been replaced (none if it was still in force).
                if let Some(replaced) = replaced
                    && replaced < write.received
                {
                    let lag = (write.received - replaced).to_std().unwrap_or_default();
                    check.longest_lag = check.longest_lag.max(lag);
                    if own {
                        check.stale_former_holder += 1;
                    } else {
                        check.stale_free += 1;
                    }
                }
            }
            None if in_gap => check.in_audit_gap += 1,
            None => {
                let holding = match forbidding
                    .and_then(|version| version.holder.as_ref().map(|holder| (version, holder)))
                {
                    Some((version, (holder, lock_id, expiry))) => format!(
                        "{holder} held {} (lock ID {lock_id}, until {expiry}; lock version {} stored at {})",
                        write.environment, version.resource_version, version.stored
                    ),
                    None => format!("{} was held by another", write.environment),
                };
                check.violations.push(format!(
                    "gate: {}'s {} was admitted (received {}, answered {}) while {holding}, and no lock version the gate could have read (replaced at most {staleness} before) allowed it",
                    write.user, write.what, write.received, write.completed
                ));
            }
        }
    }
}

/// A compact per-kind count of the writes, for the run's report.
pub fn by_kind(writes: &[GateWrite]) -> String {
    let mut counts: BTreeMap<(WriteKind, &str, &'static str), usize> = BTreeMap::new();
    for write in writes {
        let answer = match write.answer {
            GateAnswer::Admitted => "admitted",
            GateAnswer::Gated(_) => "gated",
            GateAnswer::Refused(..) => "refused",
            GateAnswer::Unknown(_) => "unknown",
        };
        *counts
            .entry((write.kind, write.user.as_str(), answer))
            .or_default() += 1;
    }
    counts
        .iter()
        .map(|((kind, user, answer), count)| format!("{kind:?} by {user} {answer}: {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}
