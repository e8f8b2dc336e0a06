//! The chart installed the way a platform team installs it: `helm install`
//! on a cluster with nodes, the controller image built by `make image`
//! (hack/image.sh) from the Dockerfile, two replicas Running and Ready through
//! their real probes, one leader, locks expiring through the in-pod
//! controller, a leader pod deleted, helm upgrade and uninstall.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::wait::await_condition;
use serde_json::Value;

use deploylock::crd::{DeploymentLock, LockState};

use crate::node::{CHART_INSTALLED, ChartRelease, DEPLOYLOCK_IMAGE, NodeCluster, node_cluster};
use crate::support::{chart_dir, ok};

const NAMESPACE: &str = "deploylock-system";
const RELEASE: &str = "deploylock";
const WAIT: Duration = Duration::from_secs(180);

/// The controller pods, as JSON objects.
fn controller_pods(node: &NodeCluster) -> Vec<Value> {
    let text = node.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        NAMESPACE,
        "-l",
        "app.kubernetes.io/instance=deploylock",
        "-o",
        "json",
    ]);
    let list: Value = serde_json::from_str(&text).unwrap_or_default();
    list["items"].as_array().cloned().unwrap_or_default()
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Waits until the Deployment reports `count` updated, ready replicas (kubectl
/// wait on the rollout: a watch).
fn await_rollout(node: &NodeCluster) {
    ok(
        &node.kubectl(&[
            "rollout",
            "status",
            "deployment/deploylock",
            "-n",
            NAMESPACE,
            "--timeout=180s",
        ]),
        "the controller Deployment did not roll out",
    );
}

/// Waits (on a watch) until the Lease is held by one of `candidates` (the
/// Lease outlives a release: it may still name a pod of an earlier install),
/// or, with no candidates, by anyone but `not`.
async fn await_leader_among(leases: &Api<Lease>, candidates: &[String], not: &str) -> String {
    let wanted = candidates.to_vec();
    let not = not.to_string();
    let condition = move |lease: Option<&Lease>| {
        lease
            .and_then(|lease| lease.spec.as_ref())
            .and_then(|spec| spec.holder_identity.as_ref())
            .is_some_and(|holder| {
                if wanted.is_empty() {
                    !holder.is_empty() && *holder != not
                } else {
                    wanted.contains(holder)
                }
            })
    };
    match tokio::time::timeout(WAIT, await_condition(leases.clone(), RELEASE, condition)).await {
        Ok(Ok(Some(lease))) => lease
            .spec
            .and_then(|spec| spec.holder_identity)
            .unwrap_or_default(),
        other => panic!("no leader among {candidates:?}: {other:?}"),
    }
}

/// Takes a one-minute lock with the CLI; returns its expiry instant.
fn acquire_for_a_minute(node: &NodeCluster, namespace: &str, environment: &str) -> DateTime<Utc> {
    let output = node.deploylock(
        namespace,
        &[
            "acquire",
            "-e",
            environment,
            "--reason",
            "chart test",
            "--duration",
            "1",
            "-o",
            "json",
        ],
    );
    let text = ok(&output, "deploylock acquire");
    let view: Value = serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("acquire printed no JSON ({err}): {text}"));
    let expires = view["holder"]["expiresAt"]
        .as_str()
        .or_else(|| view["expiresAt"].as_str())
        .unwrap_or_else(|| panic!("no expiresAt in {view}"));
    expires
        .parse()
        .unwrap_or_else(|err| panic!("bad expiresAt {expires}: {err}"))
}

async fn await_expired(api: &Api<DeploymentLock>, environment: &str) -> DateTime<Utc> {
    let condition = |lock: Option<&DeploymentLock>| {
        lock.and_then(|lock| lock.status.as_ref())
            .and_then(|status| status.state)
            == Some(LockState::Expired)
    };
    match tokio::time::timeout(WAIT, await_condition(api.clone(), environment, condition)).await {
        Ok(Ok(Some(_))) => Utc::now(),
        other => panic!("{environment} did not turn Expired: {other:?}"),
    }
}

/// A plain HTTP/1.1 GET (the controller's metrics server), the whole answer.
fn http_get(address: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address)
        .unwrap_or_else(|err| panic!("cannot connect to {address}: {err}"));
    let timeout = Some(Duration::from_secs(10));
    let _ = stream.set_read_timeout(timeout);
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap_or_else(|err| panic!("cannot write to {address}: {err}"));
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .unwrap_or_else(|err| panic!("cannot read from {address}: {err}"));
    answer
}

/// Exactly one pod says it leads (its log), and it is the Lease's holder.
fn leaders_in_logs(node: &NodeCluster, pods: &[Value]) -> Vec<String> {
    pods.iter()
        .filter_map(|pod| pod["metadata"]["name"].as_str())
        .filter(|name| {
            let logs = node.kubectl_ok(&["logs", "-n", NAMESPACE, name]);
            logs.contains("became leader")
        })
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn chart_runs_the_controller_on_the_node() {
    let node = node_cluster();
    let _installed = CHART_INSTALLED.lock().await;
    let installing = Utc::now();
    let install = node.helm(&[
        "install",
        RELEASE,
        &chart_dir(),
        "--namespace",
        NAMESPACE,
        "--create-namespace",
        // The node runs pods in the host's network namespace: each replica
        // binds its own address (127.0.0.i), not every address.
        "--set",
        "controller.metricsBindAddress=$(POD_IP)",
        "--wait",
        "--timeout",
        "180s",
    ]);
    let notes = ok(&install, "helm install");
    let release = ChartRelease::installed(node, RELEASE, NAMESPACE);
    node.admission_reads_a_clock_from(installing);
    assert!(
        notes.contains("kubectl get pods -n deploylock-system"),
        "NOTES.txt says what to run next: {notes}"
    );

    // Two replicas, Running and Ready through their probes, from the image
    // built here, on two nodes.
    let pods = controller_pods(node);
    assert_eq!(pods.len(), 2, "{pods:?}");
    let mut nodes = Vec::new();
    for pod in &pods {
        assert_eq!(pod["status"]["phase"], "Running", "{pod}");
        assert!(is_ready(pod), "not Ready: {}", pod["status"]);
        assert_eq!(pod["spec"]["containers"][0]["image"], DEPLOYLOCK_IMAGE);
        nodes.push(pod["spec"]["nodeName"].as_str().unwrap_or_default());
    }
    nodes.sort_unstable();
    nodes.dedup();
    assert_eq!(nodes.len(), 2, "one replica per node");

    // Exactly one leader.
    let client = node.client().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let names: Vec<String> = pods
        .iter()
        .filter_map(|pod| pod["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    let leader = await_leader_among(&leases, &names, "").await;
    assert_eq!(leaders_in_logs(node, &pods), std::slice::from_ref(&leader));

    // /metrics of both replicas, at the pod's address (the API server's pod
    // proxy refuses loopback addresses).
    for pod in &pods {
        let ip = pod["status"]["podIP"].as_str().unwrap_or_default();
        let metrics = http_get(&format!("{ip}:8080"), "/metrics");
        assert!(
            metrics.starts_with("HTTP/1.1 200") && metrics.contains("deploylock_"),
            "{ip}: {metrics}"
        );
    }

    // A lock expires at its instant through the in-pod leader (the chart's
    // admission policy checks every write against the leader's clock Lease).
    node.ensure_namespace("chart-locks");
    let locks: Api<DeploymentLock> = Api::namespaced(client.clone(), "chart-locks");
    let first_expiry = acquire_for_a_minute(node, "chart-locks", "first");
    let observed = await_expired(&locks, "first").await;
    assert!(observed >= first_expiry, "Expired before its instant");

    // A pending expiry survives the leader's pod being deleted.
    let second_expiry = acquire_for_a_minute(node, "chart-locks", "second");
    ok(
        &node.kubectl(&["delete", "pod", "-n", NAMESPACE, &leader, "--wait=false"]),
        "kubectl delete pod",
    );
    // The standby, or the pod that replaces the deleted one, whichever
    // sees the released Lease first.
    let new_leader = await_leader_among(&leases, &[], &leader).await;
    assert!(
        new_leader.starts_with("deploylock-"),
        "a replica took over: {new_leader}"
    );
    let observed = await_expired(&locks, "second").await;
    assert!(observed >= second_expiry, "Expired before its instant");
    await_rollout(node);
    assert_eq!(
        controller_pods(node).iter().filter(|p| is_ready(p)).count(),
        2,
        "the Deployment replaced the deleted pod"
    );

    // helm upgrade rolls the pods; both come back Ready.
    let upgrade = node.helm(&[
        "upgrade",
        RELEASE,
        &chart_dir(),
        "--namespace",
        NAMESPACE,
        "--reuse-values",
        "--set",
        "controller.retention=2h",
        "--wait",
        "--timeout",
        "180s",
    ]);
    ok(&upgrade, "helm upgrade");
    await_rollout(node);
    let pods = controller_pods(node);
    let upgraded = pods
        .iter()
        .filter(|pod| {
            is_ready(pod)
                && pod["spec"]["containers"][0]["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|arg| arg == "--retention=2h")
        })
        .count();
    assert_eq!(upgraded, 2, "{pods:?}");

    // helm uninstall removes everything it installed, pods included; the
    // CRD (and so every lock) stays.
    ok(&release.uninstall(), "helm uninstall");
    ok(
        &node.kubectl(&[
            "wait",
            "--for=delete",
            "pods",
            "-n",
            NAMESPACE,
            "-l",
            "app.kubernetes.io/instance=deploylock",
            "--timeout=120s",
        ]),
        "the controller pods did not go",
    );
    for object in [
        "clusterrole/deploylock-admin",
        "clusterrole/deploylock-controller",
        "validatingadmissionpolicy/deploylock.dev",
    ] {
        assert!(
            !node.kubectl(&["get", object]).status.success(),
            "{object} survived uninstall"
        );
    }
    for object in ["deployment/deploylock", "role/deploylock-leases"] {
        assert!(
            !node
                .kubectl(&["get", "-n", NAMESPACE, object])
                .status
                .success(),
            "{object} survived uninstall"
        );
    }
    ok(
        &node.kubectl(&["get", "crd/deploymentlocks.deploylock.dev"]),
        "CRD kept",
    );
}
