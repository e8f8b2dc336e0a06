//! GitOps gating (`deploylock-controller --gitops-gating`) against the real
//! Flux Kustomization/HelmRelease and Argo CD Application CRDs, taken from
//! their Go modules by hack/gitops-crds.sh: acquire → gated, release or
//! expiry → restored exactly, a SIGKILLed controller restores once after its
//! restart, the tool's own deployer does not gate, unbound objects are never
//! touched.

use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use deploylock::gitops::{
    DEPLOYER_ANNOTATION, ENVIRONMENT_LABEL, GitOpsKind, LOCK_NAMESPACE_ANNOTATION, SAVED_ANNOTATION,
};

use crate::support::{
    self, ControllerProcess, Identity, TestCluster, cluster, expect_exit, helm_template, repo_root,
    stdout_of,
};

const ENVIRONMENT: &str = "production";

/// The CRDs and the controller's RBAC for them, once per test run.
pub(crate) fn install_gitops_crds(cluster: &TestCluster) {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        let fetched = std::process::Command::new(repo_root().join("hack/gitops-crds.sh"))
            .output()
            .unwrap_or_else(|err| panic!("cannot run hack/gitops-crds.sh: {err}"));
        expect_exit(&fetched, 0, "hack/gitops-crds.sh");
        let dir = stdout_of(&fetched).lines().last().unwrap_or_default().to_string();
        // Server-side: the Application CRD is too big for the last-applied annotation.
        let applied = cluster.kubectl(Identity::Admin, &["apply", "--server-side", "-f", &dir]);
        expect_exit(&applied, 0, "apply the Flux and Argo CD CRDs");
        for kind in GitOpsKind::ALL {
            let crd = format!("crd/{}.{}", kind.plural(), kind.group());
            established(|args| cluster.kubectl(Identity::Admin, args), &crd);
        }
        let rbac = repo_root().join("config/rbac/gitops.yaml");
        expect_exit(
            &cluster.kubectl(Identity::Admin, &["apply", "-f", &rbac.display().to_string()]),
            0,
            "apply config/rbac/gitops.yaml",
        );
        let binding = json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "deploylock-test-controller-gitops"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "deploylock-controller-gitops"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": Identity::Controller.username()}]
        });
        expect_exit(
            &cluster.kubectl_with_input(Identity::Admin, &["apply", "-f", "-"], &binding.to_string()),
            0,
            "bind deploylock-controller-gitops",
        );
    });
}

/// Waits until a CRD is Established. `kubectl wait` fails at once while the
/// new CRD has no conditions yet: retried.
pub(crate) fn established(kubectl: impl Fn(&[&str]) -> std::process::Output, crd: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let waited = kubectl(&["wait", "--for=condition=Established", crd, "--timeout=30s"]);
        if waited.status.success() {
            return;
        }
        if Instant::now() > deadline {
            expect_exit(&waited, 0, &format!("{crd} Established"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn resource(kind: GitOpsKind) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(kind.group(), kind.version(), kind.kind()),
        kind.plural(),
    )
}

pub(crate) fn api(client: &Client, kind: GitOpsKind, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &resource(kind))
}

/// A GitOps object of `kind` named `name`, bound to production (lock in
/// `lock_namespace`) unless `bound` is false, with `spec_extra` merged in.
fn manifest(
    kind: GitOpsKind,
    name: &str,
    namespace: &str,
    lock_namespace: &str,
    bound: bool,
    spec_extra: Value,
) -> Value {
    let mut spec = match kind {
        GitOpsKind::Kustomization => json!({
            "interval": "5m", "path": "./deploy", "prune": true,
            "sourceRef": {"kind": "GitRepository", "name": "shop"}}),
        GitOpsKind::HelmRelease => json!({
            "interval": "5m", "chartRef": {"kind": "OCIRepository", "name": "shop"}}),
        GitOpsKind::Application => json!({
            "project": "default",
            "source": {"repoURL": "https://example.invalid/shop.git", "path": "deploy", "targetRevision": "main"},
            "destination": {"server": "https://kubernetes.default.svc", "namespace": "shop"}}),
    };
    deploylock::gitops::apply_merge_patch(&mut spec, &spec_extra);
    let mut labels = json!({"team": "shop"});
    if bound {
        labels[ENVIRONMENT_LABEL] = json!(ENVIRONMENT);
    }
    let mut annotations = json!({"team.example/owner": "shop"});
    if namespace != lock_namespace {
        annotations[LOCK_NAMESPACE_ANNOTATION] = json!(lock_namespace);
    }
    json!({
        "apiVersion": format!("{}/{}", kind.group(), kind.version()), "kind": kind.kind(),
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": spec,
    })
}

async fn create(client: &Client, kind: GitOpsKind, manifest: &Value) -> DynamicObject {
    let namespace = manifest["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default();
    let object: DynamicObject = serde_json::from_value(manifest.clone())
        .unwrap_or_else(|err| panic!("bad manifest: {err}"));
    api(client, kind, namespace)
        .create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|err| panic!("cannot create {kind} {}: {err}", object.name_any()))
}

fn spec_of(object: &DynamicObject) -> Value {
    object.data.get("spec").cloned().unwrap_or(Value::Null)
}

fn is_gated(kind: GitOpsKind, object: &DynamicObject) -> bool {
    let value = serde_json::to_value(object).unwrap_or_default();
    let mut field = &value;
    for key in kind.field() {
        field = match field.get(*key) {
            Some(next) => next,
            None => {
                return kind.is_gated(None) && object.annotations().contains_key(SAVED_ANNOTATION);
            }
        };
    }
    kind.is_gated(Some(field)) && object.annotations().contains_key(SAVED_ANNOTATION)
}

/// Waits, on a watch, until `ready` holds for the object; returns it.
async fn await_object(
    client: &Client,
    kind: GitOpsKind,
    namespace: &str,
    name: &str,
    what: &str,
    ready: impl Fn(&DynamicObject) -> bool,
) -> DynamicObject {
    let what = format!("{kind} {namespace}/{name}: {what}");
    let limit = Duration::from_secs(30);
    support::await_object(&api(client, kind, namespace), name, &what, limit, ready).await
}

/// Events (events.k8s.io) in `namespace` about `name`, with `reason`.
async fn events(client: &Client, namespace: &str, name: &str, reason: &str) -> Vec<Event> {
    let list = Api::<Event>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|err| panic!("cannot list Events: {err}"));
    list.items
        .into_iter()
        .filter(|event| event.reason.as_deref() == Some(reason))
        .filter(|event| {
            event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                || event
                    .note
                    .as_deref()
                    .is_some_and(|note| note.contains(&format!("/{name}:")))
        })
        .collect()
}

/// Waits (polling the Event list, which has no condition to watch for) until
/// an Event exists.
async fn await_event(client: &Client, namespace: &str, name: &str, reason: &str) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = events(client, namespace, name, reason).await;
        if !found.is_empty() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no {reason} Event about {name} in {namespace} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn acquire(cluster: &TestCluster, identity: Identity, lock_namespace: &str) {
    let output = cluster.deploylock(
        identity,
        lock_namespace,
        &[
            "acquire",
            "-e",
            ENVIRONMENT,
            "--reason",
            "Database migration",
        ],
    );
    expect_exit(&output, 0, "acquire");
}

fn release(cluster: &TestCluster, identity: Identity, lock_namespace: &str) {
    let output = cluster.deploylock(identity, lock_namespace, &["release", "-e", ENVIRONMENT]);
    expect_exit(&output, 0, "release");
}

fn spawn(cluster: &TestCluster, lock_namespace: &str) -> ControllerProcess {
    // Short Lease timings: a restarted controller leads again within seconds.
    cluster.spawn_controller(
        lock_namespace,
        "gitops",
        &[
            "--gitops-gating",
            "--lease-duration",
            "4",
            "--lease-grace",
            "1",
            "--lease-renew-period",
            "1",
        ],
    )
}

struct Case {
    kind: GitOpsKind,
    name: &'static str,
    namespace: String,
    original: Value,
}

/// Objects covering the initial states: Flux suspend absent, false, true (a
/// person suspended it); Argo CD automated with options, syncOptions and
/// retry, or no automated sync at all.
async fn bound_objects(client: &Client, lock_namespace: &str, flux_namespace: &str) -> Vec<Case> {
    let specs = [
        (GitOpsKind::Kustomization, "shop", flux_namespace, json!({})),
        (
            GitOpsKind::Kustomization,
            "shop-explicit",
            flux_namespace,
            json!({"suspend": false}),
        ),
        (
            GitOpsKind::Kustomization,
            "shop-paused",
            flux_namespace,
            json!({"suspend": true}),
        ),
        (
            GitOpsKind::HelmRelease,
            "payments",
            lock_namespace,
            json!({}),
        ),
        (
            GitOpsKind::Application,
            "web",
            lock_namespace,
            json!({"syncPolicy": {
            "automated": {"prune": true, "selfHeal": true, "allowEmpty": false},
            "syncOptions": ["CreateNamespace=true", "ServerSideApply=true"],
            "retry": {"limit": 5, "backoff": {"duration": "5s", "factor": 2, "maxDuration": "3m"}}}}),
        ),
        (
            GitOpsKind::Application,
            "web-manual",
            lock_namespace,
            json!({"syncPolicy": {"syncOptions": ["Validate=false"]}}),
        ),
    ];
    let mut cases = Vec::new();
    for (kind, name, namespace, extra) in specs {
        let created = create(
            client,
            kind,
            &manifest(kind, name, namespace, lock_namespace, true, extra),
        )
        .await;
        cases.push(Case {
            kind,
            name,
            namespace: namespace.to_string(),
            original: spec_of(&created),
        });
    }
    cases
}

async fn await_all_gated(client: &Client, cases: &[Case]) {
    for case in cases {
        let kind = case.kind;
        let object = await_object(
            client,
            kind,
            &case.namespace,
            case.name,
            "gating",
            move |object| is_gated(kind, object),
        )
        .await;
        // Only the gated field differs.
        let mut expected = case.original.clone();
        deploylock::gitops::apply_merge_patch(&mut expected, &nested_patch(kind));
        assert_eq!(
            spec_of(&object),
            expected,
            "{kind} {}: only the gated field may change",
            case.name
        );
    }
}

fn nested_patch(kind: GitOpsKind) -> Value {
    match kind {
        GitOpsKind::Application => json!({"syncPolicy": {"automated": null}}),
        _ => json!({"suspend": true}),
    }
}

async fn await_all_restored(client: &Client, cases: &[Case]) {
    for case in cases {
        let object = await_object(
            client,
            case.kind,
            &case.namespace,
            case.name,
            "restoration",
            |object| !object.annotations().contains_key(SAVED_ANNOTATION),
        )
        .await;
        assert_eq!(
            spec_of(&object),
            case.original,
            "{} {}: not restored exactly",
            case.kind,
            case.name
        );
        assert_eq!(
            object
                .annotations()
                .get("team.example/owner")
                .map(String::as_str),
            Some("shop")
        );
    }
}

#[tokio::test]
async fn bound_gitops_objects_are_gated_while_held_and_restored_exactly_on_release() {
    let cluster = cluster();
    install_gitops_crds(cluster);
    let client = cluster.client(Identity::Admin).await;
    let lock_namespace = cluster.namespace("gitops-release").await;
    let flux_namespace = cluster.namespace("gitops-release-flux").await;
    let cases = bound_objects(&client, &lock_namespace, &flux_namespace).await;
    let unbound = create(
        &client,
        GitOpsKind::Kustomization,
        &manifest(
            GitOpsKind::Kustomization,
            "unbound",
            &lock_namespace,
            &lock_namespace,
            false,
            json!({}),
        ),
    )
    .await;
    let _controller = spawn(cluster, &lock_namespace);

    let started = Instant::now();
    acquire(cluster, Identity::Bob, &lock_namespace);
    await_all_gated(&client, &cases).await;
    eprintln!(
        "acquire → every bound object gated: {} ms (not asserted; see make bench)",
        started.elapsed().as_millis()
    );

    // The saved state names the holding; Events on the object and the lock.
    let shop = api(&client, GitOpsKind::Kustomization, &flux_namespace)
        .get("shop")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let saved: Value = serde_json::from_str(&shop.annotations()[SAVED_ANNOTATION])
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(saved["holder"], json!("bob"));
    assert_eq!(saved["lockNamespace"], json!(lock_namespace));
    let on_object = await_event(&client, &flux_namespace, "shop", "Suspended").await;
    let note = on_object[0].note.clone().unwrap_or_default();
    assert!(
        note.contains("locked by bob") && note.contains("Database migration"),
        "{note}"
    );
    await_event(&client, &lock_namespace, "shop", "Suspended").await;
    await_event(&client, &lock_namespace, "web", "AutoSyncDisabled").await;

    // `deploylock status -v` names what the lock gates now.
    let status = cluster.deploylock(
        Identity::Admin,
        &lock_namespace,
        &["-e", ENVIRONMENT, "-v", "status"],
    );
    expect_exit(&status, 0, "status -v");
    let said = stdout_of(&status);
    let gates = said
        .lines()
        .find(|line| line.starts_with("Gates:"))
        .unwrap_or_else(|| panic!("no Gates line:\n{said}"));
    for expected in [
        format!("Kustomization {flux_namespace}/shop (suspended)"),
        format!("HelmRelease {lock_namespace}/payments (suspended)"),
        format!("Application {lock_namespace}/web (auto-sync disabled)"),
    ] {
        assert!(gates.contains(&expected), "{expected} missing from {gates}");
    }
    assert!(!gates.contains("unbound"), "{gates}");

    release(cluster, Identity::Bob, &lock_namespace);
    await_all_restored(&client, &cases).await;
    await_event(&client, &flux_namespace, "shop", "Resumed").await;
    await_event(&client, &lock_namespace, "web", "AutoSyncRestored").await;

    let unbound_now = api(&client, GitOpsKind::Kustomization, &lock_namespace)
        .get("unbound")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(
        unbound_now.resource_version(),
        unbound.resource_version(),
        "an unbound Kustomization was written"
    );
    assert!(
        events(&client, &lock_namespace, "unbound", "Suspended")
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn an_expired_lock_restores_the_gitops_objects() {
    let cluster = cluster();
    install_gitops_crds(cluster);
    let client = cluster.client(Identity::Admin).await;
    let lock_namespace = cluster.namespace("gitops-expiry").await;
    let cases = bound_objects(&client, &lock_namespace, &lock_namespace).await;
    let _controller = spawn(cluster, &lock_namespace);
    acquire(cluster, Identity::Bob, &lock_namespace);
    await_all_gated(&client, &cases).await;

    // Shorten bob's holding to expire in 2 s (an admin, through the API).
    let locks: Api<deploylock::crd::DeploymentLock> =
        Api::namespaced(client.clone(), &lock_namespace);
    let expires_at = chrono::Utc::now() + chrono::Duration::seconds(2);
    let patch = json!({"spec": {"holder": {"expiresAt": expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)}}});
    locks
        .patch(ENVIRONMENT, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|err| panic!("cannot shorten the lock: {err}"));
    await_all_restored(&client, &cases).await;
    let lock = locks
        .get(ENVIRONMENT)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(
        lock.spec.holder.is_some(),
        "the holding was expired, not released"
    );
    assert_eq!(
        lock.status
            .and_then(|status| status.state)
            .map(|s| s.to_string())
            .as_deref(),
        Some("Expired")
    );
}

#[tokio::test]
async fn a_controller_killed_while_gated_restores_exactly_once_after_restart() {
    let cluster = cluster();
    install_gitops_crds(cluster);
    let client = cluster.client(Identity::Admin).await;
    let lock_namespace = cluster.namespace("gitops-kill").await;
    let cases = bound_objects(&client, &lock_namespace, &lock_namespace).await;
    let controller = spawn(cluster, &lock_namespace);
    acquire(cluster, Identity::Bob, &lock_namespace);
    await_all_gated(&client, &cases).await;

    controller.signal("KILL");
    drop(controller);
    release(cluster, Identity::Bob, &lock_namespace);
    // Nobody restores while no controller runs.
    for case in &cases {
        let object = api(&client, case.kind, &case.namespace)
            .get(case.name)
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        assert!(
            is_gated(case.kind, &object),
            "{} {} restored without a controller",
            case.kind,
            case.name
        );
    }
    let versions_before: Vec<String> = {
        let mut versions = Vec::new();
        for case in &cases {
            let object = api(&client, case.kind, &case.namespace)
                .get(case.name)
                .await
                .unwrap_or_else(|err| panic!("{err}"));
            versions.push(object.resource_version().unwrap_or_default());
        }
        versions
    };
    let _restarted = spawn(cluster, &lock_namespace);
    await_all_restored(&client, &cases).await;
    // Exactly one write per object since the kill (the restore): replayed
    // from the API server's watch history.
    for (case, version) in cases.iter().zip(&versions_before) {
        let writes = writes_since(&client, case, version).await;
        assert_eq!(
            writes, 1,
            "{} {}: {writes} writes after the restart instead of one restore",
            case.kind, case.name
        );
    }
    for case in &cases {
        let reason = match case.kind {
            GitOpsKind::Application => "AutoSyncRestored",
            _ => "Resumed",
        };
        let recorded = await_event(&client, &case.namespace, case.name, reason).await;
        let on_object: Vec<_> = recorded
            .iter()
            .filter(|event| {
                event.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some(case.kind.kind())
            })
            .collect();
        assert_eq!(
            on_object.len(),
            1,
            "{} {}: restored {} times",
            case.kind,
            case.name,
            on_object.len()
        );
    }
}

#[tokio::test]
async fn the_deployers_own_holding_does_not_gate_and_objects_without_the_label_are_untouched() {
    let cluster = cluster();
    install_gitops_crds(cluster);
    let client = cluster.client(Identity::Admin).await;
    let lock_namespace = cluster.namespace("gitops-deployer").await;
    // alice stands for the GitOps tool's hook: her holdings do not gate `hooked`.
    let mut hooked = manifest(
        GitOpsKind::Application,
        "hooked",
        &lock_namespace,
        &lock_namespace,
        true,
        json!({"syncPolicy": {"automated": {"prune": true}}}),
    );
    hooked["metadata"]["annotations"][DEPLOYER_ANNOTATION] = json!(Identity::Alice.username());
    let hooked = create(&client, GitOpsKind::Application, &hooked).await;
    let other = create(
        &client,
        GitOpsKind::Application,
        &manifest(
            GitOpsKind::Application,
            "other",
            &lock_namespace,
            &lock_namespace,
            true,
            json!({"syncPolicy": {"automated": {}}}),
        ),
    )
    .await;
    let unbound = create(
        &client,
        GitOpsKind::HelmRelease,
        &manifest(
            GitOpsKind::HelmRelease,
            "unbound",
            &lock_namespace,
            &lock_namespace,
            false,
            json!({}),
        ),
    )
    .await;
    let _controller = spawn(cluster, &lock_namespace);

    acquire(cluster, Identity::Alice, &lock_namespace);
    await_object(
        &client,
        GitOpsKind::Application,
        &lock_namespace,
        "other",
        "gating",
        |object| is_gated(GitOpsKind::Application, object),
    )
    .await;
    release(cluster, Identity::Alice, &lock_namespace);
    let restored = await_object(
        &client,
        GitOpsKind::Application,
        &lock_namespace,
        "other",
        "restoration",
        |object| !object.annotations().contains_key(SAVED_ANNOTATION),
    )
    .await;
    assert_eq!(spec_of(&restored), spec_of(&other));

    // bob's holding gates it: the deployer exemption is per identity.
    acquire(cluster, Identity::Bob, &lock_namespace);
    await_object(
        &client,
        GitOpsKind::Application,
        &lock_namespace,
        "hooked",
        "gating by bob",
        |object| is_gated(GitOpsKind::Application, object),
    )
    .await;
    release(cluster, Identity::Bob, &lock_namespace);
    let hooked_now = await_object(
        &client,
        GitOpsKind::Application,
        &lock_namespace,
        "hooked",
        "restoration",
        |object| !object.annotations().contains_key(SAVED_ANNOTATION),
    )
    .await;
    assert_eq!(spec_of(&hooked_now), spec_of(&hooked));
    // While alice held it, `hooked` was never gated: one gating only (bob's).
    assert_eq!(
        events(&client, &lock_namespace, "hooked", "AutoSyncDisabled")
            .await
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Application"))
            .count(),
        1
    );

    let unbound_now = api(&client, GitOpsKind::HelmRelease, &lock_namespace)
        .get("unbound")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(
        unbound_now.resource_version(),
        unbound.resource_version(),
        "an unbound HelmRelease was written"
    );
}

/// How many times the object was modified after `version`, up to the
/// write that removed the saved annotation (the restore), on a watch.
async fn writes_since(client: &Client, case: &Case, version: &str) -> usize {
    use futures::{StreamExt, TryStreamExt};
    use kube::api::{WatchEvent, WatchParams};
    let params = WatchParams::default()
        .fields(&format!("metadata.name={}", case.name))
        .timeout(10);
    let stream = api(client, case.kind, &case.namespace)
        .watch(&params, version)
        .await
        .unwrap_or_else(|err| panic!("cannot watch {}: {err}", case.name));
    let mut stream = stream.boxed();
    let mut writes = 0;
    while let Some(event) = stream
        .try_next()
        .await
        .unwrap_or_else(|err| panic!("watch of {}: {err}", case.name))
    {
        match event {
            WatchEvent::Modified(object) => {
                writes += 1;
                if !object.annotations().contains_key(SAVED_ANNOTATION) {
                    return writes;
                }
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected watch event for {}: {other:?}", case.name),
        }
    }
    panic!("{}: the restore was not seen on the watch", case.name)
}

/// A person who turns auto-sync back on (or resumes a Kustomization) while
/// the lock is held is not overwritten: the edit is kept for after the lock,
/// and the object gated again.
#[tokio::test]
async fn a_persons_edit_while_gated_is_kept_for_after_the_lock() {
    let cluster = cluster();
    install_gitops_crds(cluster);
    let client = cluster.client(Identity::Admin).await;
    let lock_namespace = cluster.namespace("gitops-edit").await;
    create(
        &client,
        GitOpsKind::Application,
        &manifest(GitOpsKind::Application, "web", &lock_namespace, &lock_namespace, true, json!({"syncPolicy": {"automated": {"prune": true}, "syncOptions": ["Validate=false"]}})),
    )
    .await;
    create(
        &client,
        GitOpsKind::Kustomization,
        &manifest(
            GitOpsKind::Kustomization,
            "shop",
            &lock_namespace,
            &lock_namespace,
            true,
            json!({}),
        ),
    )
    .await;
    let _controller = spawn(cluster, &lock_namespace);
    acquire(cluster, Identity::Bob, &lock_namespace);
    for kind in [GitOpsKind::Application, GitOpsKind::Kustomization] {
        let name = if kind == GitOpsKind::Application {
            "web"
        } else {
            "shop"
        };
        await_object(
            &client,
            kind,
            &lock_namespace,
            name,
            "gating",
            move |object| is_gated(kind, object),
        )
        .await;
    }

    let edited_policy = json!({"prune": false, "selfHeal": true});
    let person = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..PatchParams::default()
    };
    api(&client, GitOpsKind::Application, &lock_namespace)
        .patch(
            "web",
            &person,
            &Patch::Merge(&json!({"spec": {"syncPolicy": {"automated": edited_policy}}})),
        )
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    api(&client, GitOpsKind::Kustomization, &lock_namespace)
        .patch(
            "shop",
            &person,
            &Patch::Merge(&json!({"spec": {"suspend": false}})),
        )
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let saved_value = |object: &DynamicObject| -> Option<Value> {
        let text = object.annotations().get(SAVED_ANNOTATION)?;
        serde_json::from_str::<Value>(text)
            .ok()?
            .get("value")
            .cloned()
    };
    let expected = edited_policy.clone();
    await_object(
        &client,
        GitOpsKind::Application,
        &lock_namespace,
        "web",
        "gating again",
        move |object| {
            is_gated(GitOpsKind::Application, object)
                && saved_value(object) == Some(expected.clone())
        },
    )
    .await;
    await_object(
        &client,
        GitOpsKind::Kustomization,
        &lock_namespace,
        "shop",
        "suspending again",
        move |object| {
            is_gated(GitOpsKind::Kustomization, object) && saved_value(object) == Some(json!(false))
        },
    )
    .await;
    await_event(&client, &lock_namespace, "web", "AutoSyncDisabledAgain").await;

    release(cluster, Identity::Bob, &lock_namespace);
    let web = await_object(
        &client,
        GitOpsKind::Application,
        &lock_namespace,
        "web",
        "restoration",
        |object| !object.annotations().contains_key(SAVED_ANNOTATION),
    )
    .await;
    assert_eq!(
        spec_of(&web)["syncPolicy"],
        json!({"automated": edited_policy, "syncOptions": ["Validate=false"]})
    );
    let shop = await_object(
        &client,
        GitOpsKind::Kustomization,
        &lock_namespace,
        "shop",
        "restoration",
        |object| !object.annotations().contains_key(SAVED_ANNOTATION),
    )
    .await;
    assert_eq!(spec_of(&shop)["suspend"], json!(false));
}

#[test]
fn the_charts_copy_of_the_gitops_role_is_the_shipped_one() {
    let read = |path: &str| {
        std::fs::read_to_string(repo_root().join(path))
            .unwrap_or_else(|err| panic!("{path}: {err}"))
    };
    assert_eq!(
        read("charts/deploylock/files/gitops-clusterrole.yaml"),
        read("config/rbac/gitops.yaml")
    );
}

/// Kinds whose CRDs are not installed are skipped, and the others gated: a
/// control plane of its own with only Flux's Kustomization CRD.
#[tokio::test]
async fn kinds_without_their_crd_are_skipped_and_the_others_gated() {
    let main = cluster();
    // The CRD files, fetched once.
    let fetched = std::process::Command::new(repo_root().join("hack/gitops-crds.sh"))
        .output()
        .unwrap_or_else(|err| panic!("cannot run hack/gitops-crds.sh: {err}"));
    expect_exit(&fetched, 0, "hack/gitops-crds.sh");
    let dir = stdout_of(&fetched)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let extra = crate::support::ExtraCluster::start("gitops-partial");
    let kubeconfig = extra.admin_kubeconfig();
    let client = crate::support::client_from(&kubeconfig)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    crate::support::install_crd(&client)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let kubectl = |args: &[&str]| {
        std::process::Command::new(main.bin_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .output()
            .unwrap_or_else(|err| panic!("cannot run kubectl: {err}"))
    };
    let crd = format!("{dir}/kustomize.toolkit.fluxcd.io_kustomizations.yaml");
    expect_exit(
        &kubectl(&["apply", "--server-side", "-f", &crd]),
        0,
        "apply the Kustomization CRD only",
    );
    established(kubectl, "crd/kustomizations.kustomize.toolkit.fluxcd.io");
    expect_exit(
        &kubectl(&["create", "namespace", "team"]),
        0,
        "create namespace team",
    );
    let lock = json!({
        "apiVersion": "deploylock.dev/v1", "kind": "DeploymentLock",
        "metadata": {"name": ENVIRONMENT, "namespace": "team"},
        "spec": {"environment": ENVIRONMENT, "fencingToken": 1, "holder": {
            "lockId": "b-1", "user": "bob", "owner": "bob", "type": "manual", "reason": "Database migration",
            "acquiredAt": "2026-11-27T10:00:00Z", "expiresAt": "2126-11-27T10:00:00Z", "durationSeconds": 3600}}
    });
    // The CRDs may not be served for a moment after Established.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = std::process::Command::new(main.bin_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["apply", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(lock.to_string().as_bytes())?;
                }
                child.wait_with_output()
            })
            .unwrap_or_else(|err| panic!("cannot run kubectl: {err}"));
        if output.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cannot write the lock: {}",
            crate::support::stderr_of(&output)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let created = create(
        &client,
        GitOpsKind::Kustomization,
        &manifest(
            GitOpsKind::Kustomization,
            "shop",
            "team",
            "team",
            true,
            json!({}),
        ),
    )
    .await;

    let log = std::env::temp_dir().join(format!(
        "deploylock-gitops-partial-{}.log",
        std::process::id()
    ));
    let log_file = std::fs::File::create(&log).unwrap_or_else(|err| panic!("{err}"));
    let child = std::process::Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--"])
        .arg(env!("CARGO_BIN_EXE_deploylock-controller"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "--namespace",
            "team",
            "--lease-namespace",
            "team",
            "--clock-lease-namespace",
            "team",
        ])
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--gitops-gating",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start the controller: {err}"));
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _controller = Killed(child);

    let gated = await_object(
        &client,
        GitOpsKind::Kustomization,
        "team",
        "shop",
        "gating",
        |object| is_gated(GitOpsKind::Kustomization, object),
    )
    .await;
    let mut expected = spec_of(&created);
    expected["suspend"] = json!(true);
    assert_eq!(spec_of(&gated), expected);
    // The log says which kinds are skipped (polled: the file has no watch).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        let skipped = |kind: &str| {
            said.lines()
                .any(|line| line.contains("CRD not installed") && line.contains(kind))
        };
        if skipped("HelmRelease") && skipped("Application") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the controller did not say it skips HelmRelease and Application:\n{said}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_file(&log);
}

/// The chart adds the flag and the RBAC on the GitOps kinds only when
/// gitopsGating.enabled is set.
#[test]
fn the_chart_grants_gitops_rights_only_when_enabled() {
    let cluster = cluster();
    let render = helm_template;
    let off = render(&[]);
    assert!(
        !off.contains("--gitops-gating")
            && !off.contains("fluxcd.io")
            && !off.contains("argoproj.io"),
        "{off}"
    );
    let on = render(&["--set", "gitopsGating.enabled=true"]);
    assert!(on.contains("- --gitops-gating"), "no --gitops-gating flag");
    assert!(
        on.contains("name: deploylock-deploylock-controller-gitops")
            || on.contains("-controller-gitops\n"),
        "no ClusterRoleBinding"
    );
    for resource in ["kustomizations", "helmreleases", "applications"] {
        assert!(
            on.contains(&format!("resources: [\"{resource}\"]")),
            "no rights on {resource}"
        );
    }
    // Validated by the chart's schema.
    let output = std::process::Command::new(cluster.bin_dir().join("helm"))
        .args(["template", "deploylock"])
        .arg(repo_root().join("charts/deploylock"))
        .args(["--set", "gitopsGating.enable=true"])
        .output()
        .unwrap_or_else(|err| panic!("cannot run helm: {err}"));
    assert!(
        !output.status.success(),
        "a misspelt gitopsGating value was accepted"
    );
}

/// The workload gate may also gate Flux kinds (extraResourceRules): the
/// controller's suspend must still pass while the lock is held (its
/// ClusterRole has `deploy`), while a person's write is refused.
#[tokio::test]
async fn the_workload_gate_over_flux_kinds_does_not_stop_the_suspend() {
    let cluster = cluster();
    install_gitops_crds(cluster);
    let client = cluster.client(Identity::Admin).await;
    let lock_namespace = cluster.namespace("gitops-gate-locks").await;
    let flux_namespace = cluster.namespace("gitops-gate-flux").await;
    // The shipped policy, under a name of this test's own, over Kustomizations
    // (what the chart's workloadGate.extraResourceRules renders).
    let shipped = std::fs::read_to_string(repo_root().join("config/admission/workload-gate.yaml"))
        .unwrap_or_else(|err| panic!("{err}"));
    let policy_text = shipped.split("\n---\n").next().unwrap_or_default();
    let mut policy: Value = serde_yaml::from_str(policy_text).unwrap_or_else(|err| panic!("{err}"));
    let policy_name = format!("deploylock.dev-workload-gate-{flux_namespace}");
    policy["metadata"]["name"] = json!(policy_name);
    policy["spec"]["matchConstraints"]["resourceRules"] = json!([{
        "apiGroups": ["kustomize.toolkit.fluxcd.io"], "apiVersions": ["*"],
        "resources": ["kustomizations"], "operations": ["CREATE", "UPDATE", "DELETE"]}]);
    let binding = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": policy_name},
        "spec": {"policyName": policy_name, "validationActions": ["Deny"],
                 "paramRef": {"name": ENVIRONMENT, "namespace": lock_namespace, "parameterNotFoundAction": "Allow"},
                 "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": flux_namespace}}}}
    });
    for manifest in [&policy, &binding] {
        cluster.apply(manifest, "apply the gate over Kustomizations");
    }
    cluster.grant(
        &flux_namespace,
        "flux-editors",
        json!([{"apiGroups": ["kustomize.toolkit.fluxcd.io"], "resources": ["kustomizations"], "verbs": ["get", "patch"]}]),
        json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": Identity::Alice.username()}]),
    );
    let created = create(
        &client,
        GitOpsKind::Kustomization,
        &manifest(
            GitOpsKind::Kustomization,
            "shop",
            &flux_namespace,
            &lock_namespace,
            true,
            json!({}),
        ),
    )
    .await;

    // bob holds production; no controller yet. Wait until the gate refuses
    // alice's write, so that it is surely in force before the controller's.
    acquire(cluster, Identity::Bob, &lock_namespace);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = cluster.kubectl(
            Identity::Alice,
            &[
                "annotate",
                "kustomization",
                "shop",
                "-n",
                &flux_namespace,
                "--overwrite",
                "example/touched=yes",
            ],
        );
        if !output.status.success() {
            let said = crate::support::stderr_of(&output);
            assert!(said.contains("production is locked by bob"), "{said}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gate over Kustomizations is not in force after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let _controller = spawn(cluster, &lock_namespace);
    let gated = await_object(
        &client,
        GitOpsKind::Kustomization,
        &flux_namespace,
        "shop",
        "gating through the workload gate",
        |object| is_gated(GitOpsKind::Kustomization, object),
    )
    .await;
    assert_eq!(gated.data["spec"]["suspend"], json!(true));
    release(cluster, Identity::Bob, &lock_namespace);
    let restored = await_object(
        &client,
        GitOpsKind::Kustomization,
        &flux_namespace,
        "shop",
        "restoration",
        |object| !object.annotations().contains_key(SAVED_ANNOTATION),
    )
    .await;
    assert_eq!(spec_of(&restored), spec_of(&created));
}
