//! The workload gate's cost: a Deployment update (one PATCH, in-process
//! client) by the lock's holder in a namespace bound to the environment
//! (the gate's policy evaluated in full, and admitting it) vs the same
//! update in an unbound namespace, interleaved.

use std::time::Instant;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::support::{Identity, cluster};
use super::{Row, p50};

const UPDATES: usize = 100;

pub async fn gate_cost(rows: &mut Vec<Row>) {
    let cluster = cluster();
    let lock_namespace = cluster.namespace("bench-gate-locks").await;
    let bound = cluster.namespace("bench-gate-shop").await;
    let unbound = cluster.namespace("bench-gate-other").await;
    cluster.install_workload_gate_policy();
    // The binding the chart renders for `production` (see
    // config/admission/workload-gate-binding.example.yaml).
    cluster.apply(&json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": format!("deploylock.dev-workload-gate.{lock_namespace}.production")},
        "spec": {
            "policyName": "deploylock.dev-workload-gate",
            "validationActions": ["Deny"],
            "paramRef": {"name": "production", "namespace": lock_namespace,
                         "parameterNotFoundAction": "Allow"},
            "matchResources": {"namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [bound]}
            ]}}
        }
    }), "the chart's binding of production");
    for namespace in [&bound, &unbound] {
        // Not the aggregated `edit`: no controller-manager fills it here.
        cluster.grant(
            namespace,
            "bench-workloads",
            json!([{"apiGroups": ["apps"], "verbs": ["*"], "resources": ["deployments"]}]),
            json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"}]),
        );
        cluster.apply(&json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": namespace},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                             "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}}
            }
        }), "the Deployment web");
    }
    // alice holds production: her updates in the bound namespace go through
    // the whole policy, and are admitted.
    let acquired = cluster.deploylock(
        Identity::Alice,
        &lock_namespace,
        &["acquire", "--duration", "30", "--reason", "bench gate"],
    );
    assert!(
        acquired.status.success(),
        "alice's acquire: {}",
        String::from_utf8_lossy(&acquired.stderr)
    );
    let client = cluster.client(Identity::Alice).await;
    let gated: Api<Deployment> = Api::namespaced(client.clone(), &bound);
    let open: Api<Deployment> = Api::namespaced(client, &unbound);
    let update = |api: Api<Deployment>, round: usize| async move {
        let patch = json!({"metadata": {"annotations": {"bench/round": round.to_string()}}});
        let started = Instant::now();
        if let Err(err) = api
            .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            panic!("update {round} refused: {err}");
        }
        started.elapsed().as_secs_f64() * 1000.0
    };
    // Warm-up (connections, the policy's compiled CEL), once the new
    // RoleBindings are in the API server's RBAC cache.
    for api in [&gated, &open] {
        let patch = json!({"metadata": {"annotations": {"bench/round": "0"}}});
        let mut attempts = 0;
        while let Err(err) = api
            .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            attempts += 1;
            assert!(attempts < 50, "alice cannot update the Deployment: {err}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 1..=UPDATES {
        on.push(update(gated.clone(), round).await);
        off.push(update(open.clone(), round).await);
    }
    let ratio = p50(&on) / p50(&off);
    rows.push(Row {
        name: "workload gate: Deployment update in a bound namespace, by the holder (ms)".into(),
        samples: on,
        unit: "ms",
        baseline: Some(("gate off".into(), ratio)),
        target: "≤ 1.2× at p50".into(),
        note: "one merge PATCH with an in-process client, the lock held (the policy evaluated in full, admitted); interleaved with the same update in an unbound namespace".into(),
    });
    rows.push(Row {
        name: "baseline: the same update in an unbound namespace (gate off) (ms)".into(),
        samples: off,
        unit: "ms",
        baseline: None,
        target: String::new(),
        note: String::new(),
    });
}
