//! The examples' workload gate (`examples/argocd/gate.yaml`,
//! `examples/flux/gate.yaml`) as a cluster admin applies it, with the
//! controller keeping its EnvironmentBinding: while the example's lock is held
//! the way the example takes it (the Argo CD PreSync hook's command, the Flux
//! Job's acquire, run as their ServiceAccount with a real token), the
//! example's deploy identity (the RoleBinding of deploylock-deployer in
//! gate.yaml) may write the bound namespace's workloads, another pipeline is
//! refused with the holder's name and reason, and after the example's release
//! it is admitted again. Writes are server-side dry runs: admission runs for
//! them as for real ones.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use kube::api::Api;
use serde_json::{Value, json};

use deploylock::crd::DeploymentLock;
use deploylock::envbinding::EnvironmentBinding;

use crate::envbinding::is_ready;
use crate::support::{
    self, Identity, TestCluster, cluster, expect_exit, ok, repo_root, stderr_of, stdout_of,
    until_answer_changes,
};

/// Another pipeline: a CI ServiceAccount that may write the workloads, but
/// is on no allow list.
const OTHER_PIPELINE: (&str, &str) = ("ci", "deployer");

fn documents(relative: &str) -> Vec<Value> {
    crate::support::example_documents(relative)
}

fn of_kind<'a>(docs: &'a [Value], kind: &str, file: &str) -> &'a Value {
    docs.iter()
        .find(|doc| doc["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {file}"))
}

fn account(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// What the example's gate.yaml binds and allows.
struct ExampleGate {
    binding_name: String,
    environment: String,
    lock_namespace: String,
    namespaces: Vec<String>,
    /// The deploylock-deployer RoleBinding's ServiceAccounts, as usernames.
    deployers: Vec<String>,
}

fn example_gate(example: &str) -> ExampleGate {
    let file = format!("{example}/gate.yaml");
    let docs = documents(&file);
    let binding = of_kind(&docs, "EnvironmentBinding", &file);
    let role_binding = of_kind(&docs, "RoleBinding", &file);
    assert_eq!(role_binding["roleRef"]["name"], "deploylock-deployer");
    let lock_namespace = binding["spec"]["lockNamespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        role_binding["metadata"]["namespace"].as_str(),
        Some(lock_namespace.as_str()),
        "{file}: deploylock-deployer is bound in the lock's namespace"
    );
    let deployers: Vec<String> = role_binding["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|subject| {
            assert_eq!(subject["kind"], "ServiceAccount", "{file}");
            account(
                subject["namespace"].as_str().unwrap_or_default(),
                subject["name"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert!(!deployers.is_empty(), "{file}: no deployer");
    ExampleGate {
        binding_name: binding["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        environment: binding["spec"]["environment"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        lock_namespace,
        namespaces: binding["spec"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_str().map(str::to_string))
            .collect(),
        deployers,
    }
}

fn ensure_namespace(cluster: &TestCluster, name: &str) {
    let manifest = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    cluster.apply(&manifest, &format!("namespace {name}"));
}

fn apply_file(cluster: &TestCluster, relative: &str) {
    let path = repo_root().join("examples").join(relative);
    ok(
        &cluster.kubectl(
            Identity::Admin,
            &["apply", "-f", &path.display().to_string()],
        ),
        &format!("kubectl apply -f examples/{relative}"),
    );
}

/// A kubeconfig authenticating as the ServiceAccount with a token the API
/// server issued (TokenRequest), its context in the account's namespace, as
/// a Job's pod sees it.
pub(crate) fn service_account_kubeconfig(
    cluster: &TestCluster,
    namespace: &str,
    name: &str,
    dir: &Path,
) -> PathBuf {
    let token = ok(
        &cluster.kubectl(
            Identity::Admin,
            &["create", "token", name, "-n", namespace, "--duration", "1h"],
        ),
        &format!("a token for {namespace}/{name}"),
    );
    let admin = std::fs::read_to_string(cluster.kubeconfig(Identity::Admin))
        .unwrap_or_else(|err| panic!("cannot read the admin kubeconfig: {err}"));
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&admin).unwrap_or_else(|err| panic!("kubeconfig: {err}"));
    for entry in config["users"].as_sequence_mut().into_iter().flatten() {
        let mut user = serde_yaml::Mapping::new();
        user.insert("token".into(), token.trim().into());
        entry["user"] = serde_yaml::Value::Mapping(user);
    }
    for entry in config["contexts"].as_sequence_mut().into_iter().flatten() {
        entry["context"]["namespace"] = namespace.into();
    }
    let path = dir.join(format!("{namespace}-{name}.kubeconfig"));
    let text = serde_yaml::to_string(&config).unwrap_or_else(|err| panic!("{err}"));
    std::fs::write(&path, text).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    path
}

/// Runs `deploylock` with `kubeconfig` (no -n: the context's namespace, as
/// in a pod).
fn deploylock_with(cluster: &TestCluster, kubeconfig: &Path, args: &[&str]) -> Output {
    std::process::Command::new(cluster.binaries().deploylock)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap_or_else(|err| panic!("cannot run deploylock: {err}"))
}

/// A Deployment of the application, as a sync or a pipeline applies it.
fn deployment(namespace: &str, version: &str) -> Value {
    let mut deployment = crate::gate::deployment("web", namespace, 1);
    deployment["spec"]["template"]["spec"]["containers"][0]["image"] =
        json!(format!("example.invalid/web:{version}"));
    deployment
}

/// `writer` (impersonated by the admin) writes `manifest` (server-side dry run).
fn write_as(cluster: &TestCluster, writer: &str, manifest: &Value) -> Output {
    cluster.kubectl_with_input(
        Identity::Admin,
        &[
            "--as",
            writer,
            "apply",
            "--server-side",
            "--field-manager",
            "examples-gate",
            "--dry-run=server",
            "-f",
            "-",
        ],
        &manifest.to_string(),
    )
}

/// The whole story for one example. `holder`: the ServiceAccount that takes
/// the lock in the example; `acquire` and `release`: its deploylock
/// commands; `deploy_writes`: what the example's deploy identity writes.
async fn gate_story(
    example: &str,
    holder: (&str, &str),
    acquire: &[&str],
    release: &[&str],
    reason: &str,
    deploy_writes: &[Value],
) {
    cluster().install_environment_bindings();
    let cluster = cluster();
    let gate = example_gate(example);
    let holder_user = account(holder.0, holder.1);
    let other = account(OTHER_PIPELINE.0, OTHER_PIPELINE.1);
    for namespace in [&gate.lock_namespace, holder.0, OTHER_PIPELINE.0]
        .into_iter()
        .chain(gate.namespaces.iter().map(String::as_str))
    {
        ensure_namespace(cluster, namespace);
    }
    apply_file(cluster, &format!("{example}/rbac.yaml"));
    apply_file(cluster, &format!("{example}/gate.yaml"));
    // What the tools' installs grant (here narrowed to the bound namespaces):
    // the deploy identities and the other pipeline may write workloads.
    let writers: Vec<Value> = gate
        .deployers
        .iter()
        .chain([&other])
        .map(|user| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}))
        .collect();
    for namespace in &gate.namespaces {
        // (No aggregated `edit` here: no controller-manager fills it in.)
        cluster.grant(
            namespace,
            "examples-gate-writers",
            json!([
                {"apiGroups": ["apps"], "verbs": ["*"], "resources": ["deployments"]},
                {"apiGroups": ["batch"], "verbs": ["*"], "resources": ["jobs"]}
            ]),
            json!(writers),
        );
    }

    let _controller = cluster.spawn_controller(
        &gate.lock_namespace,
        &format!("examples-gate-{example}"),
        &["--environment-bindings"],
    );
    let bindings: Api<EnvironmentBinding> = Api::all(cluster.client(Identity::Admin).await);
    let what = format!("EnvironmentBinding {} Ready", gate.binding_name);
    support::await_object(
        &bindings,
        &gate.binding_name,
        &what,
        Duration::from_secs(60),
        is_ready,
    )
    .await;

    let app_namespace = gate.namespaces[0].as_str();
    let others_write = || write_as(cluster, &other, &deployment(app_namespace, "other"));
    expect_exit(
        &others_write(),
        0,
        "another pipeline's write before the lock",
    );

    // The example takes the lock, as its ServiceAccount.
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let kubeconfig = service_account_kubeconfig(cluster, holder.0, holder.1, dir.path());
    ok(
        &deploylock_with(cluster, &kubeconfig, acquire),
        &format!("{example}: the example's acquire"),
    );
    let locks: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &gate.lock_namespace);
    let lock = support::stored(&locks, &gate.environment).await;
    assert_eq!(
        lock.spec.holder.as_ref().map(|h| h.user.as_str()),
        Some(holder_user.as_str())
    );

    // Another pipeline is refused, naming the holder and the reason.
    let refused = until_answer_changes(
        others_write,
        true,
        &format!("{example}: another pipeline's write while the example holds the lock"),
    );
    let said = stderr_of(&refused);
    let expected = format!("{} is locked by {holder_user}", gate.environment);
    assert!(
        said.contains(&expected) && said.contains(reason),
        "{example}: the refusal must name the holder and the reason: {said}"
    );
    // The example's deploy identities are admitted.
    for deployer in &gate.deployers {
        for manifest in deploy_writes {
            let written = write_as(cluster, deployer, manifest);
            assert!(
                written.status.success(),
                "{example}: {deployer}'s write was refused while the example holds the lock: {}",
                stderr_of(&written)
            );
        }
    }
    // The status names what the lock gates (to whoever may list the bindings).
    let status = cluster.deploylock(
        Identity::Admin,
        &gate.lock_namespace,
        &["-e", &gate.environment, "status", "-v"],
    );
    let expected_line = format!(
        "Workload gate: namespaces {} (EnvironmentBinding {}, in force)",
        gate.namespaces.join(", "),
        gate.binding_name
    );
    assert!(
        stdout_of(&status).contains(&expected_line),
        "{example}: status -v lacks {expected_line:?}:\n{}",
        stdout_of(&status)
    );

    // The example releases: the other pipeline is admitted again.
    ok(
        &deploylock_with(cluster, &kubeconfig, release),
        &format!("{example}: the example's release"),
    );
    until_answer_changes(
        others_write,
        false,
        &format!("{example}: another pipeline's write after the release"),
    );
}

#[tokio::test]
async fn argocd_example_gate_admits_the_sync_and_refuses_another_pipeline() {
    let hooks = documents("argocd/hooks.yaml");
    let hook = |phase: &str| -> Value {
        hooks
            .iter()
            .find(|doc| doc["metadata"]["annotations"]["argocd.argoproj.io/hook"] == phase)
            .cloned()
            .unwrap_or_else(|| panic!("no {phase} hook"))
    };
    let command = |job: &Value| -> Vec<String> {
        let words: Vec<String> = job["spec"]["template"]["spec"]["containers"][0]["command"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w.as_str().map(str::to_string))
            .collect();
        assert_eq!(words.first().map(String::as_str), Some("deploylock"));
        words[1..].to_vec()
    };
    let (presync, postsync) = (hook("PreSync"), hook("PostSync"));
    let account = presync["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let namespace = presync["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let acquire = command(&presync);
    let release = command(&postsync);
    let reason_at = acquire.iter().position(|w| w == "--reason");
    let reason = reason_at
        .and_then(|at| acquire.get(at + 1))
        .cloned()
        .unwrap_or_else(|| panic!("the PreSync hook gives no reason: {acquire:?}"));
    // What Argo CD's sync writes while its hook holds the lock: the
    // application's Deployment, and the PostSync hook's Job.
    let writes = [deployment(&namespace, "2"), postsync.clone()];
    let acquire: Vec<&str> = acquire.iter().map(String::as_str).collect();
    let release: Vec<&str> = release.iter().map(String::as_str).collect();
    gate_story(
        "argocd",
        (&namespace, &account),
        &acquire,
        &release,
        &reason,
        &writes,
    )
    .await;
}

#[tokio::test]
async fn flux_example_gate_admits_flux_and_refuses_another_pipeline() {
    let job = &documents("flux/job.yaml")[0];
    let account = job["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let namespace = job["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // locked-rollout.sh's acquire and release, with the Job's deployment ID.
    let script = std::fs::read_to_string(repo_root().join("examples/flux/locked-rollout.sh"))
        .unwrap_or_else(|err| panic!("locked-rollout.sh: {err}"));
    assert!(
        script.contains(r#"--reason "Flux rollout of $kustomization""#),
        "the script's acquire changed: update this test"
    );
    let acquire = [
        "acquire",
        "-e",
        "production",
        "--reason",
        "Flux rollout of apps",
        "--duration",
        "30",
        "--wait-timeout",
        "600",
        "--deployment-id",
        "examples-gate",
    ];
    let release = [
        "release",
        "-e",
        "production",
        "--deployment-id",
        "examples-gate",
    ];
    let gate = example_gate("flux");
    let writes = [deployment(&gate.namespaces[0], "2")];
    gate_story(
        "flux",
        (&namespace, &account),
        &acquire,
        &release,
        "Flux rollout of apps",
        &writes,
    )
    .await;
}
