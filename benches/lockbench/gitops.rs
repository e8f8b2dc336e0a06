//! GitOps gating: from a lock's acquisition (the API server's answer) to a
//! bound Flux Kustomization seen suspended on a watch, and from the release
//! to it seen resumed (controller with `--gitops-gating`, the real Flux CRD
//! from hack/gitops-crds.sh).

use std::time::{Duration as StdDuration, Instant};

use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::runtime::wait::await_condition;
use serde_json::json;

use deploylock::gitops::{ENVIRONMENT_LABEL, SAVED_ANNOTATION};

use super::support::{Identity, cluster, repo_root};
use super::{Row, SAMPLES, lock_json};

pub async fn gitops_gating(rows: &mut Vec<Row>) {
    let cluster = cluster();
    let fetched = std::process::Command::new(repo_root().join("hack/gitops-crds.sh"))
        .output()
        .unwrap_or_else(|err| panic!("cannot run hack/gitops-crds.sh: {err}"));
    assert!(fetched.status.success(), "hack/gitops-crds.sh failed");
    let dir = String::from_utf8_lossy(&fetched.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let crd = repo_root()
        .join(&dir)
        .join("kustomize.toolkit.fluxcd.io_kustomizations.yaml");
    let rbac = repo_root().join("config/rbac/gitops.yaml");
    for args in [
        vec![
            "apply",
            "--server-side",
            "-f",
            crd.to_str().unwrap_or_default(),
        ],
        vec![
            "wait",
            "--for=condition=Established",
            "crd/kustomizations.kustomize.toolkit.fluxcd.io",
        ],
        vec!["apply", "-f", rbac.to_str().unwrap_or_default()],
        vec![
            "create",
            "clusterrolebinding",
            "deploylock-bench-gitops",
            "--clusterrole",
            "deploylock-controller-gitops",
            "--user",
            "deploylock-controller",
        ],
    ] {
        let output = cluster.kubectl(Identity::Admin, &args);
        assert!(
            output.status.success()
                || String::from_utf8_lossy(&output.stderr).contains("AlreadyExists"),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let namespace = cluster.namespace("bench-gitops").await;
    let _controller = cluster.spawn_controller(&namespace, "bench-gitops", &["--gitops-gating"]);
    let client = cluster.client(Identity::Admin).await;
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kustomize.toolkit.fluxcd.io", "v1", "Kustomization"),
        "kustomizations",
    );
    let kustomizations: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &namespace, &resource);
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
        "metadata": {"name": "shop", "labels": {ENVIRONMENT_LABEL: "production"}},
        "spec": {"interval": "5m", "path": "./deploy", "prune": true,
                 "sourceRef": {"kind": "GitRepository", "name": "shop"}}
    }))
    .unwrap_or_else(|err| panic!("{err}"));
    kustomizations
        .create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let locks: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &namespace,
        &ApiResource::erase::<deploylock::crd::DeploymentLock>(&()),
    );
    let suspended = |object: Option<&DynamicObject>| {
        object.is_some_and(|object| object.data["spec"]["suspend"] == json!(true))
    };
    let resumed = |object: Option<&DynamicObject>| {
        object.is_some_and(|object| {
            !object
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(SAVED_ANNOTATION))
        })
    };
    let (mut gate, mut lift) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        let started = Instant::now();
        locks
            .patch(
                "production",
                &PatchParams::apply("bench").force(),
                &Patch::Apply(&lock_json("production", "bob")),
            )
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        let waited = tokio::time::timeout(
            StdDuration::from_secs(30),
            await_condition(kustomizations.clone(), "shop", suspended),
        )
        .await;
        assert!(matches!(waited, Ok(Ok(_))), "not suspended within 30 s");
        gate.push(started.elapsed().as_secs_f64() * 1000.0);
        let released = json!({"spec": {"holder": null}});
        let started = Instant::now();
        locks
            .patch(
                "production",
                &PatchParams::default(),
                &Patch::Merge(&released),
            )
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        let waited = tokio::time::timeout(
            StdDuration::from_secs(30),
            await_condition(kustomizations.clone(), "shop", resumed),
        )
        .await;
        assert!(matches!(waited, Ok(Ok(_))), "not resumed within 30 s");
        lift.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    for (name, samples) in [
        (
            "GitOps gating: lock held → bound Kustomization suspended, seen on a watch (ms)",
            gate,
        ),
        (
            "GitOps gating: lock released → Kustomization resumed, seen on a watch (ms)",
            lift,
        ),
    ] {
        rows.push(Row {
            name: name.into(),
            samples,
            unit: "ms",
            baseline: None,
            target: "p99 ≤ 1000".into(),
            note: "controller --gitops-gating, real Flux CRD".into(),
        });
    }
}
