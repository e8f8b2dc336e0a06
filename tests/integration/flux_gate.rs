//! GitOps gating against the real Flux kustomize-controller (v1.9.6, built
//! from its Go module by hack/example-tools.sh, run as a host process on the
//! shared control plane and watching only the test's namespace): while bob
//! holds production, the Kustomization the deploylock controller suspended
//! is really not applied, though kustomize-controller handles a reconcile
//! request after a new revision was published; after the release it is
//! resumed exactly as it was and the new revision rolls out. A Kustomization
//! a person had suspended before the lock stays suspended and unapplied. An
//! unbound Kustomization of the same source is the control: it applies the
//! new revision while the lock is held, so the controller had it in hand.
//!
//! The Flux example's script (`examples/flux/locked-rollout.sh`, run as the
//! Job's ServiceAccount) waits for another holder, then rolls out and leaves
//! the Kustomization as a person left it.
//!
//! The source is an ExternalArtifact the test publishes, as a producer does:
//! a tarball of manifests served from a loopback HTTP server.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};

use deploylock::gitops::{DEPLOYER_ANNOTATION, ENVIRONMENT_LABEL, GitOpsKind, SAVED_ANNOTATION};

use crate::example_tools::{
    FluxArtifact, HostProcess, ServedFiles, gitops_crds_dir, spawn_kustomize_controller,
};
use crate::gitops::{established, install_gitops_crds};
use crate::support::{self, Identity, TestCluster, cluster, expect_exit, repo_root};

const ENVIRONMENT: &str = "production";
/// kustomize-controller downloads, builds and applies: generous on 2 busy cores.
const WAIT: Duration = Duration::from_secs(120);
const REQUESTED_AT: &str = "reconcile.fluxcd.io/requestedAt";

/// Flux's source kinds (kustomize-controller watches them all), once per run.
fn install_flux_sources(cluster: &TestCluster) {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        let dir = gitops_crds_dir().join("flux-source");
        expect_exit(
            &cluster.kubectl(
                Identity::Admin,
                &[
                    "apply",
                    "--server-side",
                    "--force-conflicts",
                    "-f",
                    &dir.display().to_string(),
                ],
            ),
            0,
            "apply the Flux source CRDs",
        );
        for crd in [
            "externalartifacts",
            "gitrepositories",
            "ocirepositories",
            "buckets",
        ] {
            established(
                |args| cluster.kubectl(Identity::Admin, args),
                &format!("crd/{crd}.source.toolkit.fluxcd.io"),
            );
        }
    });
}

/// One artifact revision: a ConfigMap per Kustomization path, whose
/// `version` says which revision applied it.
fn artifact(namespace: &str, version: &str) -> FluxArtifact {
    let config_map = |name: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {namespace}\ndata:\n  version: {version}\n"
        )
    };
    FluxArtifact::of_manifests(&[
        ("web/configmap.yaml", config_map("web")),
        ("paused/configmap.yaml", config_map("paused")),
        ("unbound/configmap.yaml", config_map("unbound")),
        ("apps/configmap.yaml", config_map("apps")),
    ])
}

/// Publishes `artifact` as revision `version` of the ExternalArtifact `apps`.
fn publish(
    cluster: &TestCluster,
    namespace: &str,
    artifact: &FluxArtifact,
    version: &str,
    server: &ServedFiles,
) {
    let status = artifact.external_artifact_status(version, namespace, "apps", server);
    expect_exit(
        &cluster.kubectl(
            Identity::Admin,
            &[
                "patch",
                "externalartifacts.source.toolkit.fluxcd.io/apps",
                "-n",
                namespace,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status.to_string(),
            ],
        ),
        0,
        &format!("publish revision {version}"),
    );
}

/// A Kustomization of the artifact's `./name`, bound to production (whose
/// lock lives in the same namespace) unless `name` is "unbound"; `extra`
/// merged into it.
fn kustomization(name: &str, namespace: &str, extra: &Value) -> Value {
    let labels = if name == "unbound" {
        json!({})
    } else {
        json!({ENVIRONMENT_LABEL: ENVIRONMENT})
    };
    let mut manifest = json!({
        "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"interval": "1h", "path": format!("./{name}"), "prune": true, "timeout": "2m",
                 "sourceRef": {"kind": "ExternalArtifact", "name": "apps"}}
    });
    deploylock::gitops::apply_merge_patch(&mut manifest, extra);
    manifest
}

fn field<'a>(object: &'a DynamicObject, pointer: &str) -> Option<&'a Value> {
    object.data.pointer(pointer)
}

fn text<'a>(object: &'a DynamicObject, pointer: &str) -> &'a str {
    field(object, pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn spec_of(object: &DynamicObject) -> Value {
    field(object, "/spec").cloned().unwrap_or(Value::Null)
}

/// Ready for its current generation, with `revision` applied.
fn applied(object: &DynamicObject, revision: &str) -> bool {
    let ready = field(object, "/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    let observed = field(object, "/status/observedGeneration").and_then(Value::as_i64);
    ready
        && observed == object.metadata.generation
        && text(object, "/status/lastAppliedRevision") == revision
}

fn is_suspended(object: &DynamicObject) -> bool {
    field(object, "/spec/suspend") == Some(&json!(true))
}

fn is_gated(object: &DynamicObject) -> bool {
    is_suspended(object) && object.annotations().contains_key(SAVED_ANNOTATION)
}

async fn await_kustomization(
    api: &Api<DynamicObject>,
    name: &str,
    what: &str,
    condition: impl Fn(&DynamicObject) -> bool,
) -> DynamicObject {
    support::await_object(
        api,
        name,
        &format!("Kustomization {name} {what}"),
        WAIT,
        condition,
    )
    .await
}

/// Requests a reconcile (what `flux reconcile` does) and waits until
/// kustomize-controller has handled it: it has run a reconcile of the object
/// since, whatever that reconcile did.
async fn reconcile(api: &Api<DynamicObject>, name: &str, request: &str) -> DynamicObject {
    let patch = json!({"metadata": {"annotations": {REQUESTED_AT: request}}});
    if let Err(err) = api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        panic!("cannot request a reconcile of {name}: {err}");
    }
    let handled =
        |object: &DynamicObject| text(object, "/status/lastHandledReconcileAt") == request;
    await_kustomization(api, name, &format!("handling {request}"), handled).await
}

async fn config_map_version(api: &Api<ConfigMap>, name: &str) -> String {
    let config_map = api
        .get(name)
        .await
        .unwrap_or_else(|err| panic!("ConfigMap {name}: {err}"));
    config_map
        .data
        .and_then(|data| data.get("version").cloned())
        .unwrap_or_default()
}

/// bob takes the environment's lock for a database migration.
fn bob_acquires(cluster: &TestCluster, namespace: &str) {
    let args = [
        "acquire",
        "-e",
        ENVIRONMENT,
        "--reason",
        "Database migration",
    ];
    lock_command(cluster, namespace, &args, "bob acquires");
}

fn lock_command(cluster: &TestCluster, namespace: &str, args: &[&str], what: &str) {
    expect_exit(&cluster.deploylock(Identity::Bob, namespace, args), 0, what);
}

/// A namespace with the source (revisions v1 and v2 served from loopback, v1
/// published as the ExternalArtifact `apps`), kustomize-controller watching
/// it, and Kustomizations of the source, Ready at v1.
struct FluxNamespace {
    namespace: String,
    kustomizations: Api<DynamicObject>,
    config_maps: Api<ConfigMap>,
    v1: FluxArtifact,
    v2: FluxArtifact,
    server: ServedFiles,
    flux: HostProcess,
    _logs: tempfile::TempDir,
}

impl FluxNamespace {
    /// `kustomizations`: given the namespace, (name, what to merge into its
    /// manifest) of each.
    async fn set_up(
        test: &str,
        kustomizations: impl Fn(&str) -> Vec<(&'static str, Value)>,
    ) -> FluxNamespace {
        let cluster = cluster();
        install_gitops_crds(cluster);
        install_flux_sources(cluster);
        let namespace = cluster.namespace(test).await;
        let client = cluster.client(Identity::Admin).await;
        let (v1, v2) = (artifact(&namespace, "v1"), artifact(&namespace, "v2"));
        let server = ServedFiles::start(HashMap::from([
            (v1.served_path(&namespace, "apps"), v1.bytes.clone()),
            (v2.served_path(&namespace, "apps"), v2.bytes.clone()),
        ]));
        let external = json!({
            "apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "ExternalArtifact",
            "metadata": {"name": "apps", "namespace": namespace}, "spec": {}
        });
        expect_exit(
            &cluster.kubectl_with_input(
                Identity::Admin,
                &["apply", "-f", "-"],
                &external.to_string(),
            ),
            0,
            "create the ExternalArtifact",
        );
        publish(cluster, &namespace, &v1, "v1", &server);
        let logs = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
        let flux = spawn_kustomize_controller(
            &cluster.kubeconfig(Identity::Admin),
            &namespace,
            true,
            &logs.path().join("kustomize-controller.log"),
        );
        let set_up = FluxNamespace {
            kustomizations: crate::gitops::api(&client, GitOpsKind::Kustomization, &namespace),
            config_maps: Api::namespaced(client, &namespace),
            namespace,
            v1,
            v2,
            server,
            flux,
            _logs: logs,
        };
        let kustomizations = kustomizations(&set_up.namespace);
        for (name, extra) in &kustomizations {
            let manifest = kustomization(name, &set_up.namespace, extra).to_string();
            expect_exit(
                &cluster.kubectl_with_input(Identity::Admin, &["apply", "-f", "-"], &manifest),
                0,
                &format!("create the Kustomization {name}"),
            );
        }
        let revision_1 = set_up.v1.revision("v1");
        for (name, _) in &kustomizations {
            await_kustomization(&set_up.kustomizations, name, "Ready at v1", |k| {
                applied(k, &revision_1)
            })
            .await;
            assert_eq!(set_up.version_of(name).await, "v1");
        }
        set_up
    }

    /// The version of the ConfigMap the Kustomization `name` applies.
    async fn version_of(&self, name: &str) -> String {
        config_map_version(&self.config_maps, name).await
    }

    async fn spec(&self, name: &str) -> Value {
        let object = self
            .kustomizations
            .get(name)
            .await
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        spec_of(&object)
    }

    fn publish_v2(&self) {
        publish(cluster(), &self.namespace, &self.v2, "v2", &self.server);
    }
}

#[tokio::test]
async fn a_suspended_kustomization_is_not_applied_by_kustomize_controller_until_the_release() {
    let cluster = cluster();
    let set_up = FluxNamespace::set_up("flux-gate", |_| {
        vec![
            ("web", json!({})),
            ("paused", json!({})),
            ("unbound", json!({})),
        ]
    })
    .await;
    let FluxNamespace {
        namespace,
        kustomizations,
        config_maps,
        v1,
        v2,
        flux,
        ..
    } = &set_up;
    let namespace = namespace.as_str();
    let revision_1 = v1.revision("v1");

    // A person suspends `paused` (flux suspend) before anyone takes the lock.
    let suspend = json!({"spec": {"suspend": true}});
    if let Err(err) = kustomizations
        .patch("paused", &PatchParams::default(), &Patch::Merge(&suspend))
        .await
    {
        panic!("cannot suspend paused: {err}");
    }
    let mut before = HashMap::new();
    for name in ["web", "paused"] {
        before.insert(name, set_up.spec(name).await);
    }
    assert_eq!(before["web"].get("suspend"), None);

    let _controller = cluster.spawn_controller(namespace, "flux-gate", &["--gitops-gating"]);
    bob_acquires(cluster, namespace);
    for name in ["web", "paused"] {
        await_kustomization(kustomizations, name, "gated", is_gated).await;
    }

    // v2 is published. The control: the unbound Kustomization applies it, so
    // kustomize-controller has v2 in hand from now on.
    set_up.publish_v2();
    let revision_2 = v2.revision("v2");
    reconcile(kustomizations, "unbound", "while-held").await;
    await_kustomization(kustomizations, "unbound", "Ready at v2", |k| {
        applied(k, &revision_2)
    })
    .await;
    assert_eq!(config_map_version(config_maps, "unbound").await, "v2");
    // A reconcile requested of each gated one: kustomize-controller handles
    // the request (it ran a reconcile since) and applies nothing.
    for name in ["web", "paused"] {
        let handled = reconcile(kustomizations, name, "while-held").await;
        assert!(is_gated(&handled), "{name}: no longer gated: {handled:?}");
        assert_eq!(
            text(&handled, "/status/lastAppliedRevision"),
            revision_1,
            "{name}: applied while suspended"
        );
        assert_eq!(
            config_map_version(config_maps, name).await,
            "v1",
            "{name}: its ConfigMap changed while the lock was held\nkustomize-controller:\n{}",
            flux.log_tail()
        );
    }

    // bob releases: web comes back exactly as it was and rolls out v2.
    lock_command(
        cluster,
        namespace,
        &["release", "-e", ENVIRONMENT],
        "bob releases",
    );
    let web = await_kustomization(kustomizations, "web", "resumed", |k| {
        !k.annotations().contains_key(SAVED_ANNOTATION)
    })
    .await;
    assert_eq!(spec_of(&web), before["web"], "web: not restored exactly");
    let rolled_out = |config_map: &ConfigMap| {
        config_map
            .data
            .as_ref()
            .and_then(|data| data.get("version"))
            .is_some_and(|version| version == "v2")
    };
    let what = "web's ConfigMap at v2 after the release";
    support::await_object(config_maps, "web", what, WAIT, rolled_out).await;
    await_kustomization(kustomizations, "web", "Ready at v2", |k| {
        applied(k, &revision_2)
    })
    .await;

    // paused: its saved state is gone, it is still suspended as the person
    // left it, and a reconcile after the release still applies nothing.
    let paused = await_kustomization(kustomizations, "paused", "released", |k| {
        !k.annotations().contains_key(SAVED_ANNOTATION)
    })
    .await;
    assert_eq!(
        spec_of(&paused),
        before["paused"],
        "paused: not left as it was"
    );
    let handled = reconcile(kustomizations, "paused", "after-release").await;
    assert!(is_suspended(&handled));
    assert_eq!(text(&handled, "/status/lastAppliedRevision"), revision_1);
    assert_eq!(
        config_map_version(config_maps, "paused").await,
        "v1",
        "the Kustomization a person suspended was applied after the release"
    );
}

/// The Flux example with GitOps gating: `examples/flux/locked-rollout.sh`
/// (the Job's script, run on the host as the Job's ServiceAccount with a
/// token the API server issued and `examples/flux/rbac.yaml`'s rights) finds
/// the Kustomization suspended for bob and waits in the queue; after bob's
/// release it rolls the new revision out through kustomize-controller and
/// leaves the Kustomization as the person left it (not suspended): the
/// gate's suspend is not taken for the person's.
#[tokio::test]
async fn the_flux_examples_job_waits_for_the_holder_then_rolls_out_and_leaves_it_as_it_was() {
    use crate::examples_gate::service_account_kubeconfig;

    let cluster = cluster();
    let set_up = FluxNamespace::set_up("flux-job", |namespace| {
        let job = format!("system:serviceaccount:{namespace}:deploylock-flux");
        vec![(
            "apps",
            json!({
                "metadata": {"annotations": {DEPLOYER_ANNOTATION: job}},
                "spec": {"suspend": false}
            }),
        )]
    })
    .await;
    let FluxNamespace {
        namespace,
        kustomizations,
        config_maps,
        v2,
        flux,
        ..
    } = &set_up;
    let namespace = namespace.as_str();
    let job_account = format!("system:serviceaccount:{namespace}:deploylock-flux");
    let before = set_up.spec("apps").await;

    // The example's ServiceAccount and rights, in this namespace.
    let rbac = std::fs::read_to_string(repo_root().join("examples/flux/rbac.yaml"))
        .unwrap_or_else(|err| panic!("examples/flux/rbac.yaml: {err}"));
    assert!(rbac.contains("namespace: flux-system"));
    let rbac = rbac.replace("namespace: flux-system", &format!("namespace: {namespace}"));
    expect_exit(
        &cluster.kubectl_with_input(Identity::Admin, &["apply", "-f", "-"], &rbac),
        0,
        "apply examples/flux/rbac.yaml",
    );

    let _controller = cluster.spawn_controller(namespace, "flux-job", &["--gitops-gating"]);
    bob_acquires(cluster, namespace);
    await_kustomization(kustomizations, "apps", "gated", is_gated).await;
    set_up.publish_v2();

    // The Job's script, as the Job runs it: it waits in the queue.
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let kubeconfig = service_account_kubeconfig(cluster, namespace, "deploylock-flux", dir.path());
    let deploylock_dir = std::path::Path::new(cluster.binaries().deploylock)
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let path = format!(
        "{}:{}:{}",
        deploylock_dir.display(),
        cluster.bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = std::process::Command::new("sh")
        .arg(repo_root().join("examples/flux/locked-rollout.sh"))
        .args([ENVIRONMENT, "apps"])
        .env("PATH", path)
        .env("KUBECONFIG", &kubeconfig)
        .env("FLUX_NAMESPACE", namespace)
        .env("ROLLOUT_TIMEOUT", "2m")
        .env("DEPLOYMENT_ID", "flux-job-test")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run locked-rollout.sh: {err}"));
    let locks: Api<deploylock::crd::DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, namespace);
    let queued = |lock: &deploylock::crd::DeploymentLock| {
        lock.spec
            .queue
            .iter()
            .any(|waiter| waiter.user == job_account)
    };
    support::await_object(&locks, ENVIRONMENT, "the Job queueing", WAIT, queued).await;
    assert_eq!(
        set_up.version_of("apps").await,
        "v1",
        "rolled out while bob holds the lock"
    );

    // bob releases: the Job takes the lock, the controller restores the
    // Kustomization (the Job is its deployer), the Job rolls v2 out and
    // releases.
    lock_command(
        cluster,
        namespace,
        &["release", "-e", ENVIRONMENT],
        "bob releases",
    );
    let output = script
        .wait_with_output()
        .unwrap_or_else(|err| panic!("locked-rollout.sh: {err}"));
    assert!(
        output.status.success(),
        "locked-rollout.sh failed:\n{}\n{}\nkustomize-controller:\n{}",
        support::stdout_of(&output),
        support::stderr_of(&output),
        flux.log_tail()
    );
    assert!(support::stdout_of(&output).contains("is Ready"));
    assert_eq!(config_map_version(config_maps, "apps").await, "v2");
    let apps = kustomizations
        .get("apps")
        .await
        .unwrap_or_else(|err| panic!("apps: {err}"));
    assert!(
        applied(&apps, &v2.revision("v2")),
        "apps is not Ready at v2: {apps:?}"
    );
    assert!(!apps.annotations().contains_key(SAVED_ANNOTATION));
    assert_eq!(
        spec_of(&apps),
        before,
        "the Job left the Kustomization otherwise than the person had (suspended?)"
    );
    let lock = support::stored(&locks, ENVIRONMENT).await;
    assert!(lock.spec.holder.is_none(), "the Job released the lock");
    let last: Vec<(deploylock::crd::HistoryAction, &str)> = lock.spec.history
        [lock.spec.history.len().saturating_sub(2)..]
        .iter()
        .map(|entry| (entry.action, entry.by.as_str()))
        .collect();
    assert_eq!(
        last,
        [
            (
                deploylock::crd::HistoryAction::Acquired,
                job_account.as_str()
            ),
            (
                deploylock::crd::HistoryAction::Released,
                job_account.as_str()
            )
        ]
    );
}
