//! The examples run the way their tools run them, on the cluster with nodes,
//! with the image built by `make image` and the chart installed.
//!
//! Argo CD: the test does what Argo CD's sync does with `examples/argocd`:
//! the PreSync hooks in wave order (the ServiceAccount and RoleBinding in
//! wave -1, then the PreSync Job), the sync, then the PostSync Job, or the
//! SyncFail Job when the sync failed; each hook Job runs to completion
//! before the next phase, as Argo CD waits for it.

use std::time::Duration;

use kube::api::Api;
use kube::runtime::wait::await_condition;

use deploylock::crd::{DeploymentLock, HistoryAction};

use crate::node::{CHART_INSTALLED, ChartRelease, NodeCluster, node_cluster, ok};
use crate::support::repo_root;

const WAIT: Duration = Duration::from_secs(180);
const HOOKS_ACCOUNT: &str = "system:serviceaccount:my-app:deploylock-hooks";

fn yaml_documents(relative: &str) -> Vec<serde_yaml::Value> {
    let path = repo_root().join("examples").join(relative);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    text.split("\n---")
        .filter(|doc| {
            doc.lines()
                .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
        })
        .map(|doc| {
            serde_yaml::from_str(doc)
                .unwrap_or_else(|err| panic!("{} is not YAML: {err}", path.display()))
        })
        .collect()
}

fn hook_of(doc: &serde_yaml::Value) -> &str {
    doc["metadata"]["annotations"]["argocd.argoproj.io/hook"]
        .as_str()
        .unwrap_or_default()
}

fn wave_of(doc: &serde_yaml::Value) -> i64 {
    doc["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]
        .as_str()
        .and_then(|wave| wave.parse().ok())
        .unwrap_or(0)
}

/// Installs the chart (CRD, roles, admission policy, one controller).
fn install_chart(node: &NodeCluster) -> ChartRelease<'_> {
    let chart = repo_root().join("charts/deploylock").display().to_string();
    ok(
        &node.helm(&[
            "install",
            "deploylock",
            &chart,
            "--namespace",
            "deploylock-system",
            "--create-namespace",
            "--set",
            "replicaCount=1",
            "--set",
            "controller.metricsBindAddress=$(POD_IP)",
            "--wait",
            "--timeout",
            "180s",
        ]),
        "helm install",
    );
    ChartRelease::installed(node, "deploylock", "deploylock-system")
}

/// Runs one hook as Argo CD does: BeforeHookCreation deletes the previous
/// object of that name, then it is created; a Job is waited for until it
/// completes or fails. Returns whether the Job succeeded.
fn run_hook(node: &NodeCluster, doc: &serde_yaml::Value) -> bool {
    let kind = doc["kind"].as_str().unwrap_or_default().to_lowercase();
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    let namespace = doc["metadata"]["namespace"].as_str().unwrap_or("my-app");
    let policy = doc["metadata"]["annotations"]["argocd.argoproj.io/hook-delete-policy"]
        .as_str()
        .unwrap_or_default();
    if policy.contains("BeforeHookCreation") {
        ok(
            &node.kubectl(&[
                "delete",
                &format!("{kind}/{name}"),
                "-n",
                namespace,
                "--ignore-not-found",
                "--wait=true",
            ]),
            "delete the previous hook",
        );
    }
    let manifest = serde_yaml::to_string(doc).unwrap_or_default();
    node.kubectl_ok_with_input(&["create", "-f", "-"], Some(&manifest));
    if kind != "job" {
        return true;
    }
    // Complete or Failed, whichever comes first: the Job's first condition
    // (SuccessCriteriaMet or FailureTarget, then Complete or Failed).
    let job = format!("job/{name}");
    ok(
        &node.kubectl(&[
            "wait",
            &job,
            "-n",
            namespace,
            "--for=jsonpath={.status.conditions[0].status}=True",
            "--timeout=300s",
        ]),
        &format!("{job} did not finish"),
    );
    let first = node.kubectl_ok(&[
        "get",
        &job,
        "-n",
        namespace,
        "-o",
        "jsonpath={.status.conditions[0].type}",
    ]);
    let succeeded = matches!(first.as_str(), "SuccessCriteriaMet" | "Complete");
    let condition = if succeeded { "Complete" } else { "Failed" };
    ok(
        &node.kubectl(&[
            "wait",
            &job,
            "-n",
            namespace,
            &format!("--for=condition={condition}"),
            "--timeout=60s",
        ]),
        &format!("{job} did not reach {condition}"),
    );
    succeeded
}

/// The PreSync phase: hooks in wave order.
fn presync(node: &NodeCluster, hooks: &[serde_yaml::Value]) -> bool {
    let mut presync: Vec<&serde_yaml::Value> = hooks
        .iter()
        .filter(|doc| hook_of(doc) == "PreSync")
        .collect();
    presync.sort_by_key(|doc| wave_of(doc));
    presync.into_iter().all(|doc| run_hook(node, doc))
}

fn hook(hooks: &[serde_yaml::Value], phase: &str) -> serde_yaml::Value {
    hooks
        .iter()
        .find(|doc| hook_of(doc) == phase)
        .cloned()
        .unwrap_or_else(|| panic!("no {phase} hook in examples/argocd"))
}

async fn lock(api: &Api<DeploymentLock>) -> DeploymentLock {
    api.get("production")
        .await
        .unwrap_or_else(|err| panic!("production: {err}"))
}

#[tokio::test]
async fn argocd_hooks_run_as_jobs_on_the_node() {
    let node = node_cluster();
    let _installed = CHART_INSTALLED.lock().await;
    let release = install_chart(node);
    node.ensure_namespace("my-app");
    let client = node.client().await;
    let api: Api<DeploymentLock> = Api::namespaced(client, "my-app");
    let mut hooks = yaml_documents("argocd/rbac.yaml");
    hooks.extend(yaml_documents("argocd/hooks.yaml"));
    for doc in &hooks {
        assert!(
            !hook_of(doc).is_empty(),
            "{}: every object is a hook, so it exists on the first sync",
            doc["metadata"]["name"].as_str().unwrap_or_default()
        );
    }

    // Someone holds production: the PreSync Job waits in the queue, then takes it.
    ok(
        &node.deploylock(
            "my-app",
            &["acquire", "-e", "production", "--reason", "before the sync"],
        ),
        "acquire",
    );
    let sync = {
        let node_hooks = hooks.clone();
        std::thread::spawn(move || presync(node_cluster(), &node_hooks))
    };
    let queued = |lock: Option<&DeploymentLock>| {
        lock.is_some_and(|lock| lock.spec.queue.iter().any(|w| w.user == HOOKS_ACCOUNT))
    };
    let waited =
        tokio::time::timeout(WAIT, await_condition(api.clone(), "production", queued)).await;
    assert!(
        matches!(waited, Ok(Ok(_))),
        "the PreSync Job did not queue: {waited:?}"
    );
    ok(
        &node.deploylock("my-app", &["release", "-e", "production"]),
        "release",
    );
    let presync_ok = sync.join().unwrap_or_else(|_| panic!("the sync panicked"));
    assert!(presync_ok, "the PreSync Job failed");
    let held = lock(&api).await;
    let holder = held.spec.holder.as_ref();
    assert_eq!(holder.map(|h| h.user.as_str()), Some(HOOKS_ACCOUNT));
    assert_eq!(
        holder.and_then(|h| h.deployment_id.as_deref()),
        Some("my-app")
    );

    // The sync succeeded: PostSync releases.
    assert!(run_hook(node, &hook(&hooks, "PostSync")), "PostSync failed");
    let released = lock(&api).await;
    assert!(released.spec.holder.is_none(), "PostSync released the lock");
    let last = released.spec.history.last();
    assert_eq!(last.map(|e| e.action), Some(HistoryAction::Released));
    assert_eq!(last.map(|e| e.by.as_str()), Some(HOOKS_ACCOUNT));

    // A second sync that fails: SyncFail releases.
    assert!(presync(node, &hooks), "the second PreSync failed");
    assert!(lock(&api).await.spec.holder.is_some());
    assert!(run_hook(node, &hook(&hooks, "SyncFail")), "SyncFail failed");
    assert!(lock(&api).await.spec.holder.is_none(), "SyncFail released");

    // Shared identity: sync A (my-app) holds the lock; another Application's
    // hooks (same ServiceAccount, its own --deployment-id) fail and clean up.
    // Its SyncFail Job succeeds and leaves A's lock alone.
    assert!(presync(node, &hooks), "sync A's PreSync failed");
    let a_holding = lock(&api).await.spec.holder.map(|h| h.lock_id);
    assert!(a_holding.is_some());
    let mut other = hook(&hooks, "SyncFail");
    other["metadata"]["name"] = "other-app-release-on-failure".into();
    let command =
        serde_yaml::to_string(&other["spec"]["template"]["spec"]["containers"][0]["command"])
            .unwrap_or_default();
    assert!(command.contains("my-app"), "{command}");
    if let Some(args) =
        other["spec"]["template"]["spec"]["containers"][0]["command"].as_sequence_mut()
    {
        for arg in args.iter_mut() {
            if arg.as_str() == Some("my-app") {
                *arg = "other-app".into();
            }
        }
    }
    assert!(run_hook(node, &other), "B's SyncFail Job failed");
    let after = lock(&api).await;
    assert_eq!(
        after.spec.holder.map(|h| h.lock_id),
        a_holding,
        "B's cleanup released A's lock"
    );
    assert!(
        run_hook(node, &hook(&hooks, "PostSync")),
        "A's PostSync failed"
    );
    assert!(lock(&api).await.spec.holder.is_none());

    ok(&release.uninstall(), "helm uninstall");
}

/// GitLab CI: the job's script, run as GitLab's Kubernetes executor runs it:
/// in a pod of the job's image, line after line in its shell, stopping at the
/// first failure, with the CI variables set and the project checked out (its
/// `scripts/deploy.sh` comes from a ConfigMap).
#[tokio::test]
async fn gitlab_ci_job_runs_in_a_pod_of_its_image() {
    let node = node_cluster();
    let _installed = CHART_INSTALLED.lock().await;
    let release = install_chart(node);
    let namespace = "gitlab-ci";
    node.ensure_namespace(namespace);
    let job = &yaml_documents("gitlab-ci/.gitlab-ci.yml")[0]["deploy"];
    let image = job["image"]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("the job names its image: {job:?}"));
    let script: Vec<&str> = job["script"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(serde_yaml::Value::as_str)
        .collect();
    assert!(script.iter().any(|line| line.contains("deploylock exec")));
    let account = "gitlab-deployer";
    let setup = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": account, "namespace": namespace}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": account, "namespace": namespace},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "deploylock-user"},
             "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]},
            {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "project-scripts", "namespace": namespace},
             "data": {"deploy.sh": "#!/bin/sh\nset -e\necho \"deploying $1\"\n"}},
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "deploy-job", "namespace": namespace},
             "spec": {
                 "serviceAccountName": account,
                 "restartPolicy": "Never",
                 "securityContext": {"runAsNonRoot": true},
                 "containers": [{
                     "name": "build",
                     "image": image,
                     "imagePullPolicy": "IfNotPresent",
                     "workingDir": "/builds/group/project",
                     "command": ["sh", "-ec", script.join("\n")],
                     "env": [
                         {"name": "CI_COMMIT_SHA", "value": "0123456789abcdef0123456789abcdef01234567"},
                         {"name": "CI_COMMIT_SHORT_SHA", "value": "01234567"},
                         {"name": "CI_PIPELINE_ID", "value": "4242"},
                         {"name": "CI_PROJECT_PATH", "value": "group/project"},
                         {"name": "GITLAB_USER_LOGIN", "value": "alice"}
                     ],
                     "volumeMounts": [{"name": "scripts", "mountPath": "/builds/group/project/scripts"}]
                 }],
                 "volumes": [{"name": "scripts", "configMap": {"name": "project-scripts", "defaultMode": 365}}]
             }}
        ]
    });
    node.kubectl_ok_with_input(&["apply", "-f", "-"], Some(&setup.to_string()));
    ok(
        &node.kubectl(&[
            "wait",
            "pod/deploy-job",
            "-n",
            namespace,
            "--for=jsonpath={.status.phase}=Succeeded",
            "--timeout=180s",
        ]),
        "the GitLab job's pod did not succeed",
    );
    let logs = node.kubectl_ok(&["logs", "-n", namespace, "pod/deploy-job"]);
    assert!(
        logs.contains("deploying 0123456789abcdef0123456789abcdef01234567"),
        "{logs}"
    );
    let api: Api<DeploymentLock> = Api::namespaced(node.client().await, namespace);
    let locked = lock(&api).await;
    assert!(locked.spec.holder.is_none(), "exec released the lock");
    let holder = format!("system:serviceaccount:{namespace}:{account}");
    let actions: Vec<(HistoryAction, &str)> = locked
        .spec
        .history
        .iter()
        .map(|entry| (entry.action, entry.by.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            (HistoryAction::Acquired, holder.as_str()),
            (HistoryAction::Released, holder.as_str())
        ]
    );
    let reason = &locked.spec.history[0].reason;
    assert_eq!(reason, "Deploying 01234567 (pipeline 4242)");
    ok(&release.uninstall(), "helm uninstall");
}

/// Replaces Argo's `{{workflow.name}}` and `{{workflow.parameters.NAME}}`.
fn argo_substitute(text: &str, workflow: &str, parameters: &[(String, String)]) -> String {
    let mut out = text.replace("{{workflow.name}}", workflow);
    for (name, value) in parameters {
        out = out.replace(&format!("{{{{workflow.parameters.{name}}}}}"), value);
    }
    out
}

/// Runs one template's container as a pod, as Argo's workflow controller does
/// for a step (image, command, args, the workflow's ServiceAccount), and
/// waits until it succeeds.
fn run_argo_step(
    node: &NodeCluster,
    template: &serde_yaml::Value,
    account: &str,
    workflow: &str,
    parameters: &[(String, String)],
) {
    let step = template["name"].as_str().unwrap_or_default();
    let container = serde_json::to_value(&template["container"]).unwrap_or_default();
    let rendered = argo_substitute(&container.to_string(), workflow, parameters);
    let mut container: serde_json::Value = serde_json::from_str(&rendered).unwrap_or_default();
    container["name"] = "main".into();
    let pod_name = format!("{workflow}-{step}");
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": "my-app",
                     "labels": {"workflows.argoproj.io/workflow": workflow}},
        "spec": {"serviceAccountName": account, "restartPolicy": "Never",
                 "securityContext": {"runAsNonRoot": true},
                 "containers": [container]}
    });
    node.kubectl_ok_with_input(&["create", "-f", "-"], Some(&pod.to_string()));
    ok(
        &node.kubectl(&[
            "wait",
            &format!("pod/{pod_name}"),
            "-n",
            "my-app",
            "--for=jsonpath={.status.phase}=Succeeded",
            "--timeout=180s",
        ]),
        &format!("the {step} step of {workflow} did not succeed"),
    );
}

/// Argo Workflows: the WorkflowTemplate's steps (acquire, deploy) and its
/// onExit handler (release) run as pods of their images under the template's
/// ServiceAccount, in the order the workflow controller runs them. Two
/// workflows share that ServiceAccount: the second one's exit handler leaves
/// the first one's lock alone.
#[tokio::test]
async fn argo_workflow_steps_run_as_pods() {
    let node = node_cluster();
    let _installed = CHART_INSTALLED.lock().await;
    let release = install_chart(node);
    node.ensure_namespace("my-app");
    for doc in yaml_documents("argo-workflows/rbac.yaml") {
        let manifest = serde_yaml::to_string(&doc).unwrap_or_default();
        node.kubectl_ok_with_input(&["apply", "-f", "-"], Some(&manifest));
    }
    let template = &yaml_documents("argo-workflows/workflowtemplate.yaml")[0];
    let spec = &template["spec"];
    let account = spec["serviceAccountName"].as_str().unwrap_or_default();
    let parameters: Vec<(String, String)> = spec["arguments"]["parameters"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                p["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let templates = spec["templates"].as_sequence().cloned().unwrap_or_default();
    let template_named = |name: &str| -> serde_yaml::Value {
        templates
            .iter()
            .find(|t| t["name"].as_str() == Some(name))
            .cloned()
            .unwrap_or_else(|| panic!("no template {name}"))
    };
    let entry = template_named(spec["entrypoint"].as_str().unwrap_or_default());
    let steps: Vec<String> = entry["steps"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|group| group.as_sequence().cloned().unwrap_or_default())
        .filter_map(|step| step["template"].as_str().map(str::to_string))
        .collect();
    assert_eq!(steps, ["acquire", "deploy"]);
    let on_exit = template_named(spec["onExit"].as_str().unwrap_or_default());

    // Workflow A: acquire, deploy (its lock stays held until its exit handler).
    let a = "locked-deploy-a1b2c";
    for step in &steps {
        run_argo_step(node, &template_named(step), account, a, &parameters);
    }
    let logs = node.kubectl_ok(&["logs", "-n", "my-app", &format!("pod/{a}-deploy")]);
    assert!(logs.contains("deploying 2.1.0"), "{logs}");
    let api: Api<DeploymentLock> = Api::namespaced(node.client().await, "my-app");
    let held = lock(&api).await.spec.holder;
    let holder = "system:serviceaccount:my-app:deploylock-workflows";
    assert_eq!(held.as_ref().map(|h| h.user.as_str()), Some(holder));
    assert_eq!(
        held.as_ref().and_then(|h| h.deployment_id.as_deref()),
        Some(a)
    );

    // Workflow B (same ServiceAccount) ends: its exit handler releases
    // nothing of A's.
    let b = "locked-deploy-d3e4f";
    run_argo_step(node, &on_exit, account, b, &parameters);
    let still = lock(&api).await.spec.holder;
    assert_eq!(
        still.map(|h| h.lock_id),
        held.map(|h| h.lock_id),
        "B's exit handler released A's lock"
    );

    // A's exit handler releases A's lock.
    run_argo_step(node, &on_exit, account, a, &parameters);
    let released = lock(&api).await;
    assert!(released.spec.holder.is_none());
    let last = released.spec.history.last();
    assert_eq!(last.map(|e| e.action), Some(HistoryAction::Released));
    assert_eq!(last.map(|e| e.by.as_str()), Some(holder));
    ok(&release.uninstall(), "helm uninstall");
}
