//! The test kit (testkit/), given this package's binaries: every test file
//! uses `crate::support` as before; and the helpers several test files of
//! this binary share (waits on a watch, queue waiters, lock writes).

use std::fmt::Debug;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use serde::de::DeserializeOwned;
use serde_json::json;

use deploylock::crd::{DeploymentLock, DeploymentLockSpec};

pub use testkit::*;

/// The shared control plane, started on first use.
pub fn cluster() -> &'static TestCluster {
    testkit::cluster(testkit::binaries!())
}

/// Waits, on a watch, until the object `name` satisfies `condition`, at
/// most `limit`, and returns it; fails saying `what` was awaited and how
/// the object stands then.
pub async fn await_object<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    limit: Duration,
    condition: impl Fn(&K) -> bool,
) -> K
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let matches = move |object: Option<&K>| object.is_some_and(&condition);
    match tokio::time::timeout(limit, await_condition(api.clone(), name, matches)).await {
        Ok(Ok(Some(object))) => object,
        Ok(Ok(None)) => panic!("{name}: deleted while waiting until {what}"),
        Ok(Err(err)) => panic!("{name}: the watch failed waiting until {what}: {err}"),
        Err(_) => panic!(
            "{name}: not {what} after {limit:?}; now: {:?}",
            api.get_opt(name).await
        ),
    }
}

/// Whether the controller's status describes the stored spec: this
/// generation and this holding.
pub fn status_is_current(lock: &DeploymentLock) -> bool {
    let holding = lock.spec.holder.as_ref().map(|holder| &holder.lock_id);
    lock.status.as_ref().is_some_and(|status| {
        status.observed_generation == lock.metadata.generation && status.lock_id.as_ref() == holding
    })
}

/// Waits (on a watch of the Lease) until one of `candidates` leads, and
/// returns its identity.
pub async fn await_leader(
    namespace: &str,
    lease: &str,
    candidates: &[&ControllerProcess],
    limit: Duration,
) -> String {
    let leases: Api<Lease> = Api::namespaced(cluster().client(Identity::Admin).await, namespace);
    let identities: Vec<String> = candidates.iter().map(|c| c.identity()).collect();
    let leads = move |lease: &Lease| {
        lease
            .spec
            .as_ref()
            .and_then(|spec| spec.holder_identity.as_ref())
            .is_some_and(|holder| identities.contains(holder))
    };
    let what = "led by one of the candidates";
    let lease = await_object(&leases, lease, what, limit, leads).await;
    lease
        .spec
        .and_then(|spec| spec.holder_identity)
        .unwrap_or_default()
}

/// Starts `deploylock acquire` (with `extra` arguments) waiting in the
/// queue of `production` as `identity`, and returns once the lock shows its
/// place (on a watch), so that waiters arrive in a known order.
pub async fn start_waiter(
    api: &Api<DeploymentLock>,
    identity: Identity,
    owner: &str,
    reason: &str,
    extra: &[&str],
) -> Child {
    let namespace = api_namespace(api);
    let mut command = cluster().deploylock_command(identity, &namespace);
    command
        .args([
            "acquire",
            "--wait-timeout",
            "120",
            "--owner",
            owner,
            "--reason",
            reason,
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = match command.spawn() {
        Ok(child) => child,
        Err(err) => panic!("cannot start the waiter {owner}: {err}"),
    };
    await_queued(api, owner).await;
    child
}

/// Waits (on a watch) until the queue of `production` holds a place of
/// `owner`.
pub async fn await_queued(api: &Api<DeploymentLock>, owner: &str) -> DeploymentLock {
    let wanted = owner.to_string();
    let queued =
        move |lock: &DeploymentLock| lock.spec.queue.iter().any(|waiter| waiter.owner == wanted);
    let what = format!("queueing {owner}");
    await_object(api, "production", &what, Duration::from_secs(90), queued).await
}

/// The namespace an Api was made for (every lock Api of these tests is
/// namespaced).
fn api_namespace(api: &Api<DeploymentLock>) -> String {
    match api.namespace() {
        Some(namespace) => namespace.to_string(),
        None => panic!("a lock Api without a namespace"),
    }
}

/// Waits for a waiter process to finish and asserts it got the lock.
pub fn expect_acquired(child: Child, who: &str) {
    let output = match child.wait_with_output() {
        Ok(output) => output,
        Err(err) => panic!("{who}: {err}"),
    };
    assert!(
        output.status.success(),
        "{who} did not acquire: {:?} {}",
        output.status,
        stderr_of(&output)
    );
}

/// Writes `spec` as the lock `environment` (server-side apply, forced, as
/// the tests' field manager): a state the CLI would not write by itself.
pub async fn apply_lock_spec(
    api: &Api<DeploymentLock>,
    environment: &str,
    spec: &DeploymentLockSpec,
) {
    let patch = json!({
        "apiVersion": "deploylock.dev/v1",
        "kind": "DeploymentLock",
        "metadata": { "name": environment },
        "spec": spec,
    });
    if let Err(err) = api
        .patch(
            environment,
            &PatchParams::apply("deploylock-tests").force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        panic!("cannot write {environment}: {err}");
    }
}

/// Asserts that a process succeeded, showing what it said otherwise; its
/// stdout.
#[track_caller]
pub fn ok(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed:\n{}\n{}",
        stdout_of(output),
        stderr_of(output)
    );
    stdout_of(output)
}

/// The chart's directory.
pub fn chart_dir() -> String {
    repo_root().join("charts/deploylock").display().to_string()
}

/// Keeps helm's caches out of the user's home directory: in a temp dir of
/// this test process.
pub fn isolate_helm(command: &mut Command) -> &mut Command {
    let home = std::env::temp_dir().join(format!("deploylock-helm-{}", std::process::id()));
    command
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
}

/// The pinned helm (against `kubeconfig`, if any).
pub fn helm(kubeconfig: Option<&std::path::Path>, args: &[&str]) -> Output {
    let mut command = Command::new(cluster().bin_dir().join("helm"));
    if let Some(kubeconfig) = kubeconfig {
        command.arg("--kubeconfig").arg(kubeconfig);
    }
    match isolate_helm(&mut command).args(args).output() {
        Ok(output) => output,
        Err(err) => panic!("cannot run helm: {err}"),
    }
}

/// The chart rendered as in deploylock-system for Kubernetes 1.35, with
/// `extra` arguments (`--set`, `--show-only`).
pub fn helm_template(extra: &[&str]) -> String {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        "deploylock",
        chart.as_str(),
        "--namespace",
        "deploylock-system",
        "--kube-version",
        "1.35.0",
    ];
    args.extend_from_slice(extra);
    ok(&helm(None, &args), "helm template")
}

/// The YAML documents of `examples/RELATIVE` (comment-only documents left
/// out), each read as `T`.
pub fn example_documents<T: serde::de::DeserializeOwned>(relative: &str) -> Vec<T> {
    let path = repo_root().join("examples").join(relative);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    text.split("\n---")
        .filter(|doc| {
            doc.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|doc| {
            serde_yaml::from_str(doc)
                .unwrap_or_else(|err| panic!("{} is not YAML: {err}", path.display()))
        })
        .collect()
}
