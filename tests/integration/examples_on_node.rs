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

use crate::example_tools::HostProcess;
use crate::node::{CHART_INSTALLED, ChartRelease, NodeCluster, node_cluster};
use crate::support::{ok, repo_root};

const WAIT: Duration = Duration::from_secs(180);
const HOOKS_ACCOUNT: &str = "system:serviceaccount:my-app:deploylock-hooks";

fn yaml_documents(relative: &str) -> Vec<serde_yaml::Value> {
    crate::support::example_documents(relative)
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
    // The cluster runs on this machine: its clock is ours.
    let installing = chrono::Utc::now();
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
    let release = ChartRelease::installed(node, "deploylock", "deploylock-system");
    node.admission_reads_a_clock_from(installing);
    release
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

/// A Workflow as stored by the API server, with the WorkflowTemplate it
/// references (`workflowTemplateRef`) as stored too.
struct StoredWorkflow {
    name: String,
    uid: String,
    template: serde_json::Value,
    /// The template's parameters, overridden by the Workflow's arguments.
    parameters: Vec<(String, String)>,
}

fn parameters_of(arguments: &serde_json::Value) -> Vec<(String, String)> {
    arguments["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                p["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Creates a Workflow from the stored WorkflowTemplate, as `argo submit
/// --from workflowtemplate/NAME` does (generateName, workflowTemplateRef),
/// and reads back what the API server stored.
fn submit_workflow(node: &NodeCluster, template_name: &str) -> StoredWorkflow {
    let workflow = serde_json::json!({
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"generateName": format!("{template_name}-"), "namespace": "my-app"},
        "spec": {"workflowTemplateRef": {"name": template_name}}
    });
    let created = node.kubectl_ok_with_input(
        &["create", "-f", "-", "-o", "json"],
        Some(&workflow.to_string()),
    );
    let created: serde_json::Value = serde_json::from_str(&created)
        .unwrap_or_else(|err| panic!("kubectl create -o json: {err}: {created}"));
    let name = created["metadata"]["name"].as_str().unwrap_or_default();
    let stored = node.kubectl_ok(&["get", "workflow", name, "-n", "my-app", "-o", "json"]);
    let stored: serde_json::Value = serde_json::from_str(&stored)
        .unwrap_or_else(|err| panic!("kubectl get workflow -o json: {err}: {stored}"));
    let referenced = stored["spec"]["workflowTemplateRef"]["name"]
        .as_str()
        .unwrap_or_else(|| panic!("the stored Workflow has no workflowTemplateRef: {stored}"));
    let template = node.kubectl_ok(&[
        "get",
        "workflowtemplate",
        referenced,
        "-n",
        "my-app",
        "-o",
        "json",
    ]);
    let template: serde_json::Value = serde_json::from_str(&template)
        .unwrap_or_else(|err| panic!("kubectl get workflowtemplate -o json: {err}: {template}"));
    let mut parameters = parameters_of(&template["spec"]["arguments"]);
    for (name, value) in parameters_of(&stored["spec"]["arguments"]) {
        match parameters.iter_mut().find(|(known, _)| *known == name) {
            Some(parameter) => parameter.1 = value,
            None => parameters.push((name, value)),
        }
    }
    StoredWorkflow {
        name: name.to_string(),
        uid: stored["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        template,
        parameters,
    }
}

impl StoredWorkflow {
    fn spec(&self) -> &serde_json::Value {
        &self.template["spec"]
    }

    fn template_named(&self, name: &str) -> serde_json::Value {
        self.spec()["templates"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["name"].as_str() == Some(name))
            .cloned()
            .unwrap_or_else(|| panic!("no template {name} in the stored WorkflowTemplate"))
    }

    /// The entrypoint's steps, in order.
    fn steps(&self) -> Vec<String> {
        let entry = self.template_named(self.spec()["entrypoint"].as_str().unwrap_or_default());
        entry["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group.as_array().cloned().unwrap_or_default())
            .filter_map(|step| step["template"].as_str().map(str::to_string))
            .collect()
    }

    fn on_exit(&self) -> String {
        self.spec()["onExit"]
            .as_str()
            .unwrap_or_else(|| panic!("the stored WorkflowTemplate has no onExit"))
            .to_string()
    }

    /// Runs one template's container as a pod, as Argo's workflow controller
    /// does for a step (image, command, args, the workflow's ServiceAccount,
    /// owned by the Workflow), and waits until it succeeds.
    fn run_step(&self, node: &NodeCluster, step: &str) {
        let template = self.template_named(step);
        let account = self.spec()["serviceAccountName"]
            .as_str()
            .unwrap_or_default();
        let rendered = argo_substitute(
            &template["container"].to_string(),
            &self.name,
            &self.parameters,
        );
        let mut container: serde_json::Value = serde_json::from_str(&rendered)
            .unwrap_or_else(|err| panic!("the {step} container after substitution: {err}"));
        container["name"] = "main".into();
        let pod_name = format!("{}-{step}", self.name);
        let pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": "my-app",
                         "labels": {"workflows.argoproj.io/workflow": self.name},
                         "ownerReferences": [{"apiVersion": "argoproj.io/v1alpha1",
                                              "kind": "Workflow", "name": self.name,
                                              "uid": self.uid, "controller": true}]},
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
            &format!("the {step} step of {} did not succeed", self.name),
        );
    }
}

/// Argo Workflows: the real Workflow and WorkflowTemplate CRDs (from the
/// argo-workflows Go module, hack/gitops-crds.sh) are applied, the example's
/// WorkflowTemplate is applied as is, and Workflows referencing it are
/// created. The workflow-controller is not run (only the CRD manifests are
/// taken from that module): the test runs the steps (acquire, deploy) and the
/// onExit handler (release) of the template as stored by the API server as
/// pods of their images under the template's ServiceAccount, in the order
/// the controller runs them. Two workflows share that ServiceAccount: the
/// second one's exit handler leaves the first one's lock alone.
#[tokio::test]
async fn argo_workflow_steps_run_as_pods() {
    let node = node_cluster();
    let _installed = CHART_INSTALLED.lock().await;
    let release = install_chart(node);
    node.ensure_namespace("my-app");
    let crds = crate::example_tools::gitops_crds_dir().join("workflows");
    ok(
        &node.kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            &crds.display().to_string(),
        ]),
        "apply the Argo Workflows CRDs",
    );
    ok(
        &node.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/workflows.argoproj.io",
            "crd/workflowtemplates.argoproj.io",
            "--timeout=60s",
        ]),
        "the Argo Workflows CRDs are not established",
    );
    let examples = repo_root().join("examples/argo-workflows");
    for file in ["rbac.yaml", "workflowtemplate.yaml"] {
        ok(
            &node.kubectl(&["apply", "-f", &examples.join(file).display().to_string()]),
            &format!("kubectl apply -f examples/argo-workflows/{file}"),
        );
    }
    let template_name =
        yaml_documents("argo-workflows/workflowtemplate.yaml")[0]["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();

    // Workflow A: acquire, deploy (its lock stays held until its exit handler).
    let a = submit_workflow(node, &template_name);
    let steps = a.steps();
    assert_eq!(steps, ["acquire", "deploy"]);
    for step in &steps {
        a.run_step(node, step);
    }
    let logs = node.kubectl_ok(&["logs", "-n", "my-app", &format!("pod/{}-deploy", a.name)]);
    assert!(logs.contains("deploying 2.1.0"), "{logs}");
    let api: Api<DeploymentLock> = Api::namespaced(node.client().await, "my-app");
    let held = lock(&api).await.spec.holder;
    let holder = "system:serviceaccount:my-app:deploylock-workflows";
    assert_eq!(held.as_ref().map(|h| h.user.as_str()), Some(holder));
    assert_eq!(
        held.as_ref().and_then(|h| h.deployment_id.as_deref()),
        Some(a.name.as_str())
    );

    // Workflow B (same ServiceAccount) ends: its exit handler releases
    // nothing of A's.
    let b = submit_workflow(node, &template_name);
    assert_ne!(a.name, b.name);
    b.run_step(node, &b.on_exit());
    let still = lock(&api).await.spec.holder;
    assert_eq!(
        still.map(|h| h.lock_id),
        held.map(|h| h.lock_id),
        "B's exit handler released A's lock"
    );

    // A's exit handler releases A's lock.
    a.run_step(node, &a.on_exit());
    let released = lock(&api).await;
    assert!(released.spec.holder.is_none());
    let last = released.spec.history.last();
    assert_eq!(last.map(|e| e.action), Some(HistoryAction::Released));
    assert_eq!(last.map(|e| e.by.as_str()), Some(holder));
    // The Workflows own their pods: deleting them removes the pods too.
    for workflow in [&a, &b] {
        ok(
            &node.kubectl(&["delete", "workflow", &workflow.name, "-n", "my-app"]),
            "kubectl delete workflow",
        );
    }
    ok(&release.uninstall(), "helm uninstall");
}

/// Waits until a Job completes or fails; whether it succeeded.
fn job_succeeded(node: &NodeCluster, namespace: &str, name: &str) -> bool {
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
    matches!(first.as_str(), "SuccessCriteriaMet" | "Complete")
}

fn kustomization_field(node: &NodeCluster, jsonpath: &str) -> String {
    node.kubectl_ok(&[
        "get",
        "kustomizations.kustomize.toolkit.fluxcd.io/apps",
        "-n",
        "flux-system",
        "-o",
        &format!("jsonpath={jsonpath}"),
    ])
}

/// Runs examples/flux as a user would (`kubectl apply -k examples/flux`: the
/// RBAC, the script as a ConfigMap, the Job) and waits for the Job; its uid
/// (the run's deployment ID). Panics with the Job's and the controller's
/// logs if it failed.
fn run_flux_job(node: &NodeCluster, controller: &HostProcess) -> String {
    ok(
        &node.kubectl(&[
            "delete",
            "job/locked-rollout",
            "-n",
            "flux-system",
            "--ignore-not-found",
            "--wait=true",
        ]),
        "delete the previous Job",
    );
    let examples = repo_root().join("examples/flux").display().to_string();
    ok(
        &node.kubectl(&["apply", "-k", &examples]),
        "kubectl apply -k examples/flux",
    );
    let succeeded = job_succeeded(node, "flux-system", "locked-rollout");
    let logs = node
        .kubectl(&["logs", "-n", "flux-system", "job/locked-rollout"])
        .stdout;
    let logs = String::from_utf8_lossy(&logs);
    assert!(
        succeeded,
        "the Flux Job failed:\n{logs}\nkustomize-controller:\n{}",
        controller.log_tail()
    );
    assert!(logs.contains("is Ready"), "{logs}");
    node.kubectl_ok(&[
        "get",
        "job/locked-rollout",
        "-n",
        "flux-system",
        "-o",
        "jsonpath={.metadata.uid}",
    ])
}

/// Flux: `examples/flux` (the Job, its script from a ConfigMap, in the image
/// `hack/image.sh flux` builds) runs against the real Flux CRDs and a real
/// kustomize-controller, built from its Go module (hack/example-tools.sh) and
/// run on the host with the admin kubeconfig. The test is the source: it
/// publishes a tarball of manifests on a loopback HTTP server through an
/// ExternalArtifact (Flux's API for third-party artifact producers, behind
/// kustomize-controller's ExternalArtifact feature gate), as a producer
/// does, status included. Everything about the Kustomization's status is the
/// controller's: the Job sees it Ready, the ConfigMap of the artifact is
/// applied, and the Kustomization is suspended again after a run that found
/// it suspended (and not after one that did not).
#[tokio::test]
async fn flux_job_rolls_out_through_a_real_kustomize_controller() {
    use crate::example_tools::{
        FluxArtifact, ServedFiles, gitops_crds_dir, spawn_kustomize_controller,
    };

    let node = node_cluster();
    let _installed = CHART_INSTALLED.lock().await;
    let release = install_chart(node);
    node.load_image("flux");
    node.ensure_namespace("flux-system");
    node.ensure_namespace("flux-apps");
    let crds = gitops_crds_dir();
    for path in [
        crds.join("kustomize.toolkit.fluxcd.io_kustomizations.yaml"),
        crds.join("flux-source"),
    ] {
        ok(
            &node.kubectl(&[
                "apply",
                "--server-side",
                "--force-conflicts",
                "-f",
                &path.display().to_string(),
            ]),
            "apply the Flux CRDs",
        );
    }
    ok(
        &node.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/kustomizations.kustomize.toolkit.fluxcd.io",
            "crd/externalartifacts.source.toolkit.fluxcd.io",
            "crd/gitrepositories.source.toolkit.fluxcd.io",
            "crd/ocirepositories.source.toolkit.fluxcd.io",
            "crd/buckets.source.toolkit.fluxcd.io",
            "--timeout=60s",
        ]),
        "the Flux CRDs are not established",
    );

    // The source: one ConfigMap, served on loopback, published as an ExternalArtifact.
    let artifact = FluxArtifact::of_manifests(&[(
        "configmap.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: rolled-out\n  namespace: flux-apps\ndata:\n  version: \"1\"\n".to_string(),
    )]);
    let server = ServedFiles::start(std::collections::HashMap::from([(
        artifact.served_path("flux-system", "apps"),
        artifact.bytes.clone(),
    )]));
    let external = serde_json::json!({
        "apiVersion": "source.toolkit.fluxcd.io/v1",
        "kind": "ExternalArtifact",
        "metadata": {"name": "apps", "namespace": "flux-system"},
        "spec": {}
    });
    node.kubectl_ok_with_input(&["apply", "-f", "-"], Some(&external.to_string()));
    let revision = artifact.revision("v1");
    let status = artifact.external_artifact_status("v1", "flux-system", "apps", &server);
    node.kubectl_ok(&[
        "patch",
        "externalartifacts.source.toolkit.fluxcd.io/apps",
        "-n",
        "flux-system",
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);

    // The Kustomization, suspended: nothing rolls out until the Job resumes it.
    let kustomization = serde_json::json!({
        "apiVersion": "kustomize.toolkit.fluxcd.io/v1",
        "kind": "Kustomization",
        "metadata": {"name": "apps", "namespace": "flux-system"},
        "spec": {"interval": "1h", "path": "./", "prune": true, "suspend": true,
                 "timeout": "2m",
                 "sourceRef": {"kind": "ExternalArtifact", "name": "apps"}}
    });
    node.kubectl_ok_with_input(&["apply", "-f", "-"], Some(&kustomization.to_string()));

    let log_dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let controller = spawn_kustomize_controller(
        &node.admin_kubeconfig(),
        "flux-system",
        false,
        &log_dir.path().join("kustomize-controller.log"),
    );

    // Run 1: the Kustomization was suspended.
    let first = run_flux_job(node, &controller);
    let applied = node.kubectl_ok(&[
        "get",
        "configmap/rolled-out",
        "-n",
        "flux-apps",
        "-o",
        "jsonpath={.data.version}",
    ]);
    assert_eq!(applied, "1", "the Kustomization applied the artifact");
    assert_eq!(kustomization_field(node, "{.spec.suspend}"), "true");
    assert_eq!(
        kustomization_field(node, "{.status.lastHandledReconcileAt}"),
        first,
        "the controller handled the Job's reconcile request"
    );
    assert_eq!(
        kustomization_field(node, "{.status.lastAppliedRevision}"),
        revision
    );
    let account = "system:serviceaccount:flux-system:deploylock-flux";
    let api: Api<DeploymentLock> = Api::namespaced(node.client().await, "flux-system");
    let locked = lock(&api).await;
    assert!(locked.spec.holder.is_none(), "the Job released the lock");
    let pair = |history: &[deploylock::crd::HistoryEntry]| {
        let [acquired, released] = &history[history.len().saturating_sub(2)..] else {
            panic!("fewer than two history entries: {history:?}");
        };
        assert_eq!(
            (acquired.action, acquired.by.as_str()),
            (HistoryAction::Acquired, account)
        );
        assert_eq!(acquired.reason, "Flux rollout of apps");
        assert_eq!(
            (released.action, released.by.as_str()),
            (HistoryAction::Released, account)
        );
        assert_eq!(acquired.lock_id, released.lock_id);
    };
    pair(&locked.spec.history);
    let entries = locked.spec.history.len();

    // Run 2: the Kustomization was not suspended, so it stays resumed.
    ok(
        &node.kubectl(&[
            "patch",
            "kustomizations.kustomize.toolkit.fluxcd.io/apps",
            "-n",
            "flux-system",
            "--type=merge",
            "-p",
            r#"{"spec":{"suspend":false}}"#,
        ]),
        "resume the Kustomization",
    );
    let second = run_flux_job(node, &controller);
    assert_ne!(first, second);
    assert_eq!(kustomization_field(node, "{.spec.suspend}"), "false");
    assert_eq!(
        kustomization_field(node, "{.status.lastHandledReconcileAt}"),
        second
    );
    let locked = lock(&api).await;
    assert_eq!(locked.spec.history.len(), entries + 2);
    pair(&locked.spec.history);

    // The controller is the one that applied: deleting the Kustomization
    // prunes what it applied.
    ok(
        &node.kubectl(&[
            "delete",
            "kustomizations.kustomize.toolkit.fluxcd.io/apps",
            "-n",
            "flux-system",
            "--wait=true",
            "--timeout=120s",
        ]),
        "delete the Kustomization",
    );
    ok(
        &node.kubectl(&[
            "wait",
            "--for=delete",
            "configmap/rolled-out",
            "-n",
            "flux-apps",
            "--timeout=60s",
        ]),
        "the Kustomization's ConfigMap was not pruned",
    );
    drop(controller);
    drop(server);
    ok(&release.uninstall(), "helm uninstall");
}
