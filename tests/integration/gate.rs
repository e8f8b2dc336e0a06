//! The workload gate (config/admission/workload-gate.yaml, rendered by the
//! chart's workloadGate values): while an environment's lock is held, its
//! namespaces' workloads change only by the holder, deployers, admins and
//! Kubernetes' own controllers. Matrix of identity x workload write x lock
//! state, then the whole story with the CLI and the controller.

use std::process::Output;

use serde_json::{Value, json};

use crate::support::{
    Identity, TestCluster, cluster, helm_template, ok, stderr_of, until_answer_changes,
};

const ENVIRONMENT: &str = "production";
const KUBE_SYSTEM_CONTROLLER: &str = "system:serviceaccount:kube-system:deployment-controller";

/// Who writes: a test identity, or a ServiceAccount the admin impersonates.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Writer {
    User(Identity),
    As(&'static str),
}

pub(crate) struct Gate {
    pub(crate) lock_namespace: String,
    pub(crate) workloads: String,
    pub(crate) unbound: String,
    deployer: String,
}

/// kubectl as `writer` (`input` on stdin when given); the admin
/// impersonates ServiceAccounts ("deployer" names the gate's deployer).
fn kubectl_as(
    cluster: &TestCluster,
    writer: Writer,
    deployer: &str,
    args: &[&str],
    input: Option<&str>,
) -> Output {
    let (identity, mut full) = match writer {
        Writer::User(identity) => (identity, Vec::new()),
        Writer::As(name) => {
            let name = if name == "deployer" { deployer } else { name };
            (Identity::Admin, vec!["--as", name])
        }
    };
    full.extend_from_slice(args);
    match input {
        Some(input) => cluster.kubectl_with_input(identity, &full, input),
        None => cluster.kubectl(identity, &full),
    }
}

/// The gate's policy, and the chart's binding of `production` (lock in
/// `lock_namespace`) to the namespace `workloads`; RBAC so that every writer
/// may change workloads there and in `unbound`.
pub(crate) async fn set_up(test: &str) -> Gate {
    let gate = set_up_unbound(test).await;
    bind_with_chart(cluster(), &gate);
    gate
}

/// The chart's binding (workloadGate.environments) of `production` to the
/// namespace `workloads`.
fn bind_with_chart(cluster: &TestCluster, gate: &Gate) {
    let (lock_namespace, workloads) = (&gate.lock_namespace, &gate.workloads);
    let name = format!("workloadGate.environments[0].name={ENVIRONMENT}");
    let lock_namespace_value =
        format!("workloadGate.environments[0].lockNamespace={lock_namespace}");
    let namespaces = format!("workloadGate.environments[0].namespaces={{{workloads}}}");
    let rendered = helm_template(&[
        "--show-only",
        "templates/workload-gate.yaml",
        "--set",
        "workloadGate.enabled=true",
        "--set",
        &name,
        "--set",
        &lock_namespace_value,
        "--set",
        &namespaces,
    ]);
    let bindings: String = rendered
        .split("\n---")
        .filter(|doc| doc.contains("kind: ValidatingAdmissionPolicyBinding"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    assert!(
        bindings.contains(workloads.as_str()),
        "the chart bound no namespace: {bindings}"
    );
    ok(
        &cluster.kubectl_with_input(Identity::Admin, &["apply", "-f", "-"], &bindings),
        "apply the chart's binding",
    );
}

/// The gate's policy and RBAC so that every writer may change workloads in
/// `workloads` and `unbound`, with a Deployment and a CronJob in each; no
/// namespace is bound yet.
pub(crate) async fn set_up_unbound(test: &str) -> Gate {
    let cluster = cluster();
    let lock_namespace = cluster.namespace(&format!("{test}-locks")).await;
    let workloads = cluster.namespace(&format!("{test}-shop")).await;
    let unbound = cluster.namespace(&format!("{test}-other")).await;
    let deployer = format!("system:serviceaccount:{lock_namespace}:deployer");
    cluster.install_workload_gate_policy();
    for namespace in [&workloads, &unbound] {
        cluster.grant(
            namespace,
            "workloads",
            json!([
                {"apiGroups": ["apps"], "verbs": ["*"],
                 "resources": ["deployments", "deployments/scale", "statefulsets", "daemonsets"]},
                {"apiGroups": ["batch"], "verbs": ["*"], "resources": ["jobs", "cronjobs"]}
            ]),
            json!([
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "deploylock:users"},
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "deploylock:admins"},
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": deployer},
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": KUBE_SYSTEM_CONTROLLER}
            ]),
        );
    }
    // The deployer may deploy while someone else holds the lock.
    cluster.apply(&json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "deployer", "namespace": lock_namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "deploylock-deployer"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": deployer}]
        }),
        "deployer RoleBinding",
    );
    // Workloads to update, scale and delete (by the cluster admin, before any lock).
    for namespace in [&workloads, &unbound] {
        for manifest in [
            deployment("web", namespace, 1),
            cron_job("nightly", namespace),
        ] {
            cluster.apply(&manifest, "workload");
        }
    }
    Gate {
        lock_namespace,
        workloads,
        unbound,
        deployer,
    }
}

pub(crate) fn deployment(name: &str, namespace: &str, replicas: i64) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}}
        }
    })
}

fn cron_job(name: &str, namespace: &str) -> Value {
    json!({
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "job", "image": "example.invalid/job:1"}]}}}}}
    })
}

/// A write to a workload, as server-side dry runs (admission runs, nothing
/// is stored) so the matrix leaves the objects as they were.
#[derive(Clone, Copy, Debug)]
enum Write {
    CreateDeployment,
    UpdateDeployment,
    ScaleDeployment,
    DeleteDeployment,
    CreateJob,
    UpdateCronJob,
    CreateStatefulSet,
}

const WRITES: [Write; 7] = [
    Write::CreateDeployment,
    Write::UpdateDeployment,
    Write::ScaleDeployment,
    Write::DeleteDeployment,
    Write::CreateJob,
    Write::UpdateCronJob,
    Write::CreateStatefulSet,
];

/// kubectl arguments of a server-side dry-run update of the Deployment `web`
/// in `namespace` (a label change: admitted or refused like any update).
pub(crate) fn update_web(namespace: &str) -> [&str; 8] {
    [
        "label",
        "deployment",
        "web",
        "-n",
        namespace,
        "release=2",
        "--overwrite",
        "--dry-run=server",
    ]
}

fn attempt(
    cluster: &TestCluster,
    gate: &Gate,
    writer: Writer,
    write: Write,
    namespace: &str,
) -> Output {
    let run = |args: &[&str]| kubectl_as(cluster, writer, &gate.deployer, args, None);
    let create = |manifest: Value| {
        let text = manifest.to_string();
        kubectl_as(
            cluster,
            writer,
            &gate.deployer,
            &["create", "--dry-run=server", "-f", "-"],
            Some(&text),
        )
    };
    match write {
        Write::CreateDeployment => create(deployment("new-web", namespace, 1)),
        Write::UpdateDeployment => run(&update_web(namespace)),
        Write::ScaleDeployment => run(&[
            "scale",
            "deployment",
            "web",
            "-n",
            namespace,
            "--replicas",
            "0",
            "--dry-run=server",
        ]),
        Write::DeleteDeployment => run(&[
            "delete",
            "deployment",
            "web",
            "-n",
            namespace,
            "--dry-run=server",
        ]),
        Write::CreateJob => create(json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "migrate", "namespace": namespace},
            "spec": {"template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "job", "image": "example.invalid/job:1"}]}}}
        })),
        Write::UpdateCronJob => run(&[
            "annotate",
            "cronjob",
            "nightly",
            "-n",
            namespace,
            "release=2",
            "--overwrite",
            "--dry-run=server",
        ]),
        Write::CreateStatefulSet => create(json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db", "namespace": namespace},
            "spec": {"serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                     "template": {"metadata": {"labels": {"app": "db"}},
                                  "spec": {"containers": [{"name": "db", "image": "example.invalid/db:1"}]}}}
        })),
    }
}

/// The lock's state, written directly by the cluster admin (the lock's
/// namespace is not under the lock policy): what the gate reads.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum LockState {
    NoLock,
    Available,
    LockedByAlice,
    ExpiredAlice,
    ForceLockedByCarol,
    /// alice's holding, with a status the controller computed for an
    /// earlier one: counts as held.
    StaleStatusAlice,
}

fn holder(user: &str, lock_id: &str, lock_type: &str) -> Value {
    json!({
        "lockId": lock_id, "user": user, "owner": format!("{user}'s team"), "type": lock_type,
        "reason": "Migrating the orders table", "acquiredAt": "2026-11-27T10:00:00Z",
        "expiresAt": "2026-11-27T10:30:00Z", "durationSeconds": 1800
    })
}

pub(crate) fn set_state(cluster: &TestCluster, gate: &Gate, state: LockState) {
    let ns = gate.lock_namespace.as_str();
    let _ = cluster.kubectl(
        Identity::Admin,
        &[
            "delete",
            "deploymentlock",
            ENVIRONMENT,
            "-n",
            ns,
            "--ignore-not-found",
            "--wait",
        ],
    );
    let (spec_holder, status) = match state {
        LockState::NoLock => return,
        LockState::Available => (Value::Null, json!({"state": "Available"})),
        LockState::LockedByAlice => (
            holder("alice", "a-1", "manual"),
            json!({"state": "Locked", "lockId": "a-1"}),
        ),
        LockState::ExpiredAlice => (
            holder("alice", "a-1", "manual"),
            json!({"state": "Expired", "lockId": "a-1"}),
        ),
        LockState::ForceLockedByCarol => (
            holder("carol", "c-1", "emergency"),
            json!({"state": "ForceLocked", "lockId": "c-1"}),
        ),
        LockState::StaleStatusAlice => (
            holder("alice", "a-2", "manual"),
            json!({"state": "Expired", "lockId": "a-1"}),
        ),
    };
    let mut spec = json!({"environment": ENVIRONMENT, "fencingToken": 1});
    if !spec_holder.is_null() {
        spec["holder"] = spec_holder;
    }
    cluster.apply(
        &json!({"apiVersion": "deploylock.dev/v1", "kind": "DeploymentLock",
                "metadata": {"name": ENVIRONMENT, "namespace": ns}, "spec": spec}),
        "the lock",
    );
    let generation = cluster.kubectl(
        Identity::Admin,
        &[
            "get",
            "deploymentlock",
            ENVIRONMENT,
            "-n",
            ns,
            "-o",
            "jsonpath={.metadata.generation}",
        ],
    );
    ok(&generation, "the lock's generation");
    let generation: i64 = match String::from_utf8_lossy(&generation.stdout).trim().parse() {
        Ok(generation) => generation,
        Err(err) => panic!("generation: {err}"),
    };
    let mut status = status;
    status["observedGeneration"] = json!(generation);
    ok(
        &cluster.kubectl(
            Identity::Admin,
            &[
                "patch",
                "deploymentlock",
                ENVIRONMENT,
                "-n",
                ns,
                "--subresource=status",
                "--type=merge",
                "-p",
                &json!({"status": status}).to_string(),
            ],
        ),
        "the lock's status",
    );
}

fn gated(state: LockState) -> bool {
    matches!(
        state,
        LockState::LockedByAlice | LockState::ForceLockedByCarol | LockState::StaleStatusAlice
    )
}

fn may_write_while_held(state: LockState, writer: Writer) -> bool {
    let holder = match state {
        LockState::ForceLockedByCarol => Identity::Carol,
        _ => Identity::Alice,
    };
    match writer {
        Writer::User(identity) => identity == holder || identity == Identity::Carol,
        Writer::As(_) => true,
    }
}

/// Waits until the API server's view of the lock (the policy's parameter,
/// served from an informer) matches `state`, probing with bob's create.
fn await_gate(cluster: &TestCluster, gate: &Gate, state: LockState) {
    let probe = || {
        attempt(
            cluster,
            gate,
            Writer::User(Identity::Bob),
            Write::CreateDeployment,
            &gate.workloads,
        )
    };
    until_answer_changes(
        probe,
        gated(state),
        &format!("the gate following the lock to {state:?}"),
    );
}

#[tokio::test]
async fn gate_matrix_identity_by_write_by_lock_state() {
    let cluster = cluster();
    let gate = set_up("gate-matrix").await;
    let writers = [
        Writer::User(Identity::Alice),
        Writer::User(Identity::Bob),
        Writer::User(Identity::Carol),
        Writer::As("deployer"),
        Writer::As(KUBE_SYSTEM_CONTROLLER),
    ];
    let mut wrong = Vec::new();
    for state in [
        LockState::NoLock,
        LockState::Available,
        LockState::LockedByAlice,
        LockState::ExpiredAlice,
        LockState::ForceLockedByCarol,
        LockState::StaleStatusAlice,
    ] {
        set_state(cluster, &gate, state);
        await_gate(cluster, &gate, state);
        for writer in writers {
            for write in WRITES {
                let expected = !gated(state) || may_write_while_held(state, writer);
                let output = attempt(cluster, &gate, writer, write, &gate.workloads);
                if output.status.success() != expected {
                    wrong.push(format!(
                        "{state:?} {writer:?} {write:?}: expected {}, got {}",
                        if expected { "admitted" } else { "refused" },
                        stderr_of(&output).trim()
                    ));
                }
                if !expected && !output.status.success() {
                    let said = stderr_of(&output);
                    let holder = if state == LockState::ForceLockedByCarol {
                        "carol"
                    } else {
                        "alice"
                    };
                    for part in [
                        format!("{ENVIRONMENT} is locked by {holder} ({holder}'s team)"),
                        "until 2026-11-27T10:30:00Z".to_string(),
                        "Migrating the orders table".to_string(),
                        format!(
                            "deploylock wait -e {ENVIRONMENT} -n {}",
                            gate.lock_namespace
                        ),
                    ] {
                        if !said.contains(&part) {
                            wrong.push(format!(
                                "{state:?} {writer:?} {write:?}: refusal lacks {part:?}: {said}"
                            ));
                        }
                    }
                }
            }
            // A namespace not bound to the environment is never gated.
            let elsewhere = attempt(
                cluster,
                &gate,
                writer,
                Write::UpdateDeployment,
                &gate.unbound,
            );
            if !elsewhere.status.success() {
                wrong.push(format!(
                    "{state:?} {writer:?}: unbound namespace gated: {}",
                    stderr_of(&elsewhere)
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong answers:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// The acceptance story: bob holds production through the CLI, alice's real
/// apply is refused with bob's name, reason and expiry; after bob's release
/// it goes through.
#[tokio::test]
async fn a_held_lock_refuses_other_deploys_until_released() {
    let cluster = cluster();
    let gate = set_up("gate-story").await;
    let _controller = cluster.spawn_controller(&gate.lock_namespace, "gate-story", &[]);
    let acquired = cluster.deploylock(
        Identity::Bob,
        &gate.lock_namespace,
        &[
            "acquire",
            "-e",
            ENVIRONMENT,
            "--reason",
            "Database migration",
        ],
    );
    ok(&acquired, "bob acquires");
    let change = deployment("web", &gate.workloads, 3).to_string();
    let refused = until_answer_changes(
        || {
            let output =
                cluster.kubectl_with_input(Identity::Alice, &["apply", "-f", "-"], &change);
            if output.status.success() {
                // Admitted before the API server saw the lock: undo and retry.
                ok(
                    &cluster.kubectl_with_input(
                        Identity::Admin,
                        &["apply", "-f", "-"],
                        &deployment("web", &gate.workloads, 1).to_string(),
                    ),
                    "undo",
                );
            }
            output
        },
        true,
        "alice's apply while bob holds the lock",
    );
    assert!(
        !refused.status.success(),
        "alice's apply went through while bob held the lock"
    );
    let said = stderr_of(&refused);
    assert!(
        said.contains("production is locked by bob")
            && said.contains("Database migration")
            && said.contains(" until "),
        "the refusal must name the holder, the reason and the expiry: {said}"
    );
    let job_delete = cluster.kubectl(
        Identity::Alice,
        &["delete", "cronjob", "nightly", "-n", &gate.workloads],
    );
    assert!(
        !job_delete.status.success(),
        "alice deleted a CronJob while bob held the lock"
    );

    ok(
        &cluster.deploylock(
            Identity::Bob,
            &gate.lock_namespace,
            &["release", "-e", ENVIRONMENT],
        ),
        "bob releases",
    );
    until_answer_changes(
        || cluster.kubectl_with_input(Identity::Alice, &["apply", "-f", "-"], &change),
        false,
        "alice's apply after the release",
    );
    let replicas = cluster.kubectl(
        Identity::Admin,
        &[
            "get",
            "deployment",
            "web",
            "-n",
            &gate.workloads,
            "-o",
            "jsonpath={.spec.replicas}",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&replicas.stdout), "3");
}
