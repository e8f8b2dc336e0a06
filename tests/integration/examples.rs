//! Keeps `examples/` true: manifests go through a server-side dry run (where
//! this control plane serves their kinds), the shell examples run against
//! the control plane with a trivial deploy step. Also the kubectl plugin and
//! the generated man page (the completions: completion.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kube::api::Api;

use deploylock::crd::{DeploymentLock, HistoryAction};

use crate::support::{Identity, cluster, ok, repo_root};

/// Kinds this control plane serves (EnvironmentBinding and Argo CD's
/// Application once their CRDs are installed; no Argo Workflows, no
/// Prometheus operator).
const SERVED_KINDS: [&str; 7] = [
    "Job",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "EnvironmentBinding",
    "Application",
];

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_deploylock"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// PATH with deploylock, kubectl-deploylock and the pinned kubectl first.
fn path_with_tools() -> String {
    format!(
        "{}:{}:{}",
        bin_dir().display(),
        cluster().bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// A copy of `identity`'s kubeconfig whose context uses `namespace`.
fn kubeconfig_in(identity: Identity, namespace: &str, dir: &Path) -> PathBuf {
    let original = std::fs::read_to_string(cluster().kubeconfig(identity))
        .unwrap_or_else(|err| panic!("cannot read kubeconfig: {err}"));
    let rewritten = original.replace("namespace: default", &format!("namespace: {namespace}"));
    let path = dir.join(format!("{identity:?}-{namespace}.kubeconfig"));
    std::fs::write(&path, rewritten).unwrap_or_else(|err| panic!("cannot write kubeconfig: {err}"));
    path
}

fn run_script(script: &str, args: &[&str], kubeconfig: &Path, env: &[(&str, &str)]) -> Output {
    let output = Command::new("bash")
        .arg(repo_root().join("examples").join(script))
        .args(args)
        .env("PATH", path_with_tools())
        .env("KUBECONFIG", kubeconfig)
        .envs(env.iter().copied())
        .output();
    match output {
        Ok(output) => output,
        Err(err) => panic!("cannot run {script}: {err}"),
    }
}

fn yaml_documents(path: &Path) -> Vec<serde_yaml::Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    text.split("\n---")
        .filter(|doc| !doc.trim().is_empty())
        .map(|doc| {
            serde_yaml::from_str(doc)
                .unwrap_or_else(|err| panic!("{} is not YAML: {err}", path.display()))
        })
        .collect()
}

fn ensure_namespace(name: &str) {
    let output = cluster().kubectl(Identity::Admin, &["get", "namespace", name]);
    if !output.status.success() {
        let created = cluster().kubectl(Identity::Admin, &["create", "namespace", name]);
        let stderr = String::from_utf8_lossy(&created.stderr);
        assert!(
            created.status.success() || stderr.contains("AlreadyExists"),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn example_manifests_pass_a_server_side_dry_run() {
    let cluster = cluster();
    cluster.install_environment_bindings();
    crate::gitops::install_gitops_crds(cluster);
    for namespace in ["my-app", "flux-system", "argocd"] {
        ensure_namespace(namespace);
    }
    let mut checked = 0;
    for directory in ["argocd", "argo-workflows", "flux"] {
        let dir = repo_root().join("examples").join(directory);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
            // kustomize's own file (kubectl apply -k), not a manifest.
            .filter(|path| !path.ends_with("kustomization.yaml"))
            .collect();
        files.sort();
        for file in files {
            for document in yaml_documents(&file) {
                let kind = document["kind"].as_str().unwrap_or_default().to_string();
                assert!(
                    !kind.is_empty(),
                    "{}: a document without kind",
                    file.display()
                );
                if !SERVED_KINDS.contains(&kind.as_str()) {
                    // Argo's WorkflowTemplate: shape only.
                    assert_eq!(
                        kind,
                        "WorkflowTemplate",
                        "{}: unexpected kind",
                        file.display()
                    );
                    assert!(
                        document["spec"]["onExit"].as_str().is_some(),
                        "releases in onExit"
                    );
                    continue;
                }
                let manifest = serde_yaml::to_string(&document).unwrap_or_default();
                let output = cluster.kubectl_with_input(
                    Identity::Admin,
                    &["apply", "--dry-run=server", "-f", "-"],
                    &manifest,
                );
                assert!(
                    output.status.success(),
                    "{} ({kind}) failed the dry run: {}",
                    file.display(),
                    String::from_utf8_lossy(&output.stderr)
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "only {checked} manifests checked");
    for ci in ["github-actions/deploy.yml", "gitlab-ci/.gitlab-ci.yml"] {
        let documents = yaml_documents(&repo_root().join("examples").join(ci));
        let text = serde_yaml::to_string(&documents).unwrap_or_default();
        assert!(text.contains("deploylock exec"), "{ci} uses exec");
    }
}

#[tokio::test]
async fn shell_examples_run_against_the_control_plane() {
    let cluster = cluster();
    let namespace = cluster.namespace("examples").await;
    let temp = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let alice = kubeconfig_in(Identity::Alice, &namespace, temp.path());
    let bob = kubeconfig_in(Identity::Bob, &namespace, temp.path());
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let last_actions = |lock: DeploymentLock| -> Vec<HistoryAction> {
        let history = lock.spec.history;
        history[history.len().saturating_sub(2)..]
            .iter()
            .map(|e| e.action)
            .collect()
    };

    let output = run_script("ci-shell/deploy.sh", &["production"], &alice, &[]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("deploying 2.1.0"));
    let lock = api
        .get("production")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(lock.spec.holder.is_none(), "released after the deploy");
    assert_eq!(
        last_actions(lock),
        [HistoryAction::Acquired, HistoryAction::Released]
    );

    // A failed deploy still releases the lock.
    let output = run_script(
        "ci-shell/deploy.sh",
        &["production"],
        &alice,
        &[("DEPLOY_COMMAND", "false")],
    );
    assert!(!output.status.success());
    let lock = api
        .get("production")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(lock.spec.holder.is_none(), "released after a failed deploy");

    // While someone holds the lock, the script refuses to deploy.
    let held = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["acquire", "--reason", "someone else"],
    );
    assert!(held.status.success());
    let output = run_script("ci-shell/deploy.sh", &["production"], &bob, &[]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("could not lock production (exit code 3)"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&output.stdout).contains("deploying"));
    let released = cluster.deploylock(Identity::Alice, &namespace, &["release"]);
    assert!(released.status.success());

    let output = run_script("ci-shell/deploy-exec.sh", &["staging"], &bob, &[]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("deploying 2.1.0"));
    let lock = api
        .get("staging")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(lock.spec.holder.is_none());
    let output = run_script(
        "ci-shell/deploy-exec.sh",
        &["staging"],
        &bob,
        &[("DEPLOY_COMMAND", "false")],
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "exec passes on the deploy's exit code"
    );

    let output = run_script(
        "maintenance-window/window.sh",
        &["production", "MAINT-123"],
        &alice,
        &[],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("ticket=MAINT-123") && stdout.contains("Database maintenance"),
        "{stdout}"
    );
    let lock = api
        .get("production")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let window = lock
        .spec
        .history
        .iter()
        .rev()
        .find(|entry| entry.action == HistoryAction::Acquired)
        .unwrap_or_else(|| panic!("the window was recorded"));
    assert_eq!(window.reason, "Database maintenance");
    assert!(lock.spec.holder.is_none(), "the window was ended");

    for script in ["flux/locked-rollout.sh", "flux/maintenance-window.sh"] {
        let check = Command::new("bash")
            .arg("-n")
            .arg(repo_root().join("examples").join(script))
            .status();
        assert!(
            matches!(check, Ok(status) if status.success()),
            "{script} has a syntax error"
        );
    }
}

#[tokio::test]
async fn kubectl_plugin_and_generated_docs() {
    let cluster = cluster();
    let namespace = cluster.namespace("plugin").await;
    let plugin = Path::new(env!("CARGO_BIN_EXE_kubectl-deploylock"));
    assert!(plugin.exists());
    let kubectl = |args: &[&str]| -> Output {
        Command::new(cluster.bin_dir().join("kubectl"))
            .args(args)
            .env("PATH", path_with_tools())
            .env("KUBECONFIG", cluster.kubeconfig(Identity::Alice))
            .output()
            .unwrap_or_else(|err| panic!("kubectl: {err}"))
    };
    let list = kubectl(&["plugin", "list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("kubectl-deploylock"));
    let acquired = kubectl(&[
        "deploylock",
        "-n",
        &namespace,
        "acquire",
        "--reason",
        "via kubectl",
    ]);
    assert!(
        acquired.status.success(),
        "{}",
        String::from_utf8_lossy(&acquired.stderr)
    );
    let status = kubectl(&["deploylock", "-n", &namespace, "status", "-o", "json"]);
    let view: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap_or_default();
    assert_eq!(view["holder"]["reason"], "via kubectl");
    assert_eq!(view["holder"]["user"], "alice");
    let held = kubectl(&[
        "deploylock",
        "-n",
        &namespace,
        "acquire",
        "--reason",
        "again",
    ]);
    assert_eq!(
        held.status.code(),
        Some(3),
        "the plugin keeps the exit codes"
    );

    // The completion scripts and what they complete: completion.rs.
    let man = cluster.deploylock(Identity::Alice, &namespace, &["man"]);
    let text = String::from_utf8_lossy(&man.stdout);
    assert!(
        text.contains(".TH deploylock 1") && text.contains("acquire"),
        "{text}"
    );
}

/// GitHub Actions: `examples/github-actions/deploy.yml` run by nektos/act
/// (built from its pinned Go module, hack/example-tools.sh) in host mode
/// (`-P ubuntu-latest=-self-hosted`): its steps run on this machine, in the
/// runner's order, with the workflow's own commands; act serves
/// actions/checkout from the local repository (a copy in the job's workspace). The install step downloads the
/// release tarball that `make dist` writes (hack/dist.sh) from a loopback
/// HTTP server (the DEPLOYLOCK_DOWNLOAD_URL variable), checks its sha256 and
/// puts it on GITHUB_PATH; the KUBECONFIG secret is alice's kubeconfig,
/// flattened as one would store it. The repository is a temporary git
/// repository holding the workflow and a scripts/deploy.sh.
#[tokio::test]
async fn github_actions_workflow_runs_under_act() {
    use crate::example_tools::{ServedFiles, example_tool};

    let cluster = cluster();
    let namespace = cluster.namespace("github-actions").await;
    let temp = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let run = |command: &mut Command, what: &str| -> String {
        let output = command
            .output()
            .unwrap_or_else(|err| panic!("cannot run {what}: {err}"));
        ok(&output, what)
    };

    // The release, as `make dist` packs it, served where the variable points.
    let dist = temp.path().join("dist");
    let packed = run(
        Command::new(repo_root().join("hack/dist.sh")).arg(&dist),
        "hack/dist.sh",
    );
    let tarball = PathBuf::from(packed.lines().last().unwrap_or_default());
    let name = tarball
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or_default()
        .to_string();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        name,
        format!("deploylock-{version}-x86_64-unknown-linux-musl.tar.gz")
    );
    let read = |path: &Path| std::fs::read(path).unwrap_or_else(|err| panic!("{err}"));
    let sha_name = format!("{name}.sha256");
    let server = ServedFiles::start(std::collections::HashMap::from([
        (format!("/releases/v{version}/{name}"), read(&tarball)),
        (
            format!("/releases/v{version}/{sha_name}"),
            read(&dist.join(&sha_name)),
        ),
    ]));
    let workflow_text =
        std::fs::read_to_string(repo_root().join("examples/github-actions/deploy.yml"))
            .unwrap_or_else(|err| panic!("{err}"));
    assert!(
        workflow_text.contains(&format!("DEPLOYLOCK_VERSION: {version}")),
        "the workflow installs this version"
    );

    // The repository the workflow belongs to.
    let repo = temp.path().join("repo");
    std::fs::create_dir_all(repo.join(".github/workflows")).unwrap_or_else(|err| panic!("{err}"));
    std::fs::create_dir_all(repo.join("scripts")).unwrap_or_else(|err| panic!("{err}"));
    std::fs::write(repo.join(".github/workflows/deploy.yml"), &workflow_text)
        .unwrap_or_else(|err| panic!("{err}"));
    let deploy = repo.join("scripts/deploy.sh");
    // What the deploy sees of its holding, written outside the job's
    // workspace (act copies the repository into one and removes it after).
    let seen = temp.path().join("seen");
    std::fs::create_dir(&seen).unwrap_or_else(|err| panic!("{err}"));
    std::fs::write(
        &deploy,
        format!(
            "#!/bin/sh\nset -e\necho \"deploying $1 with $(command -v deploylock)\"\n\
             echo \"$DEPLOYLOCK_LOCK_ID\" > {seen}/lock-id\n\
             deploylock status -e \"$DEPLOYLOCK_ENVIRONMENT\" -o json > {seen}/holding.json\n",
            seen = seen.display()
        ),
    )
    .unwrap_or_else(|err| panic!("{err}"));
    run(
        Command::new("chmod").arg("+x").arg(&deploy),
        "chmod +x scripts/deploy.sh",
    );
    let git = |args: &[&str]| {
        run(
            Command::new("git")
                .current_dir(&repo)
                .args(["-c", "user.name=ci", "-c", "user.email=ci@example.com"])
                .args(args),
            &format!("git {}", args.join(" ")),
        )
    };
    git(&["init", "--quiet", "--initial-branch", "main"]);
    git(&["add", "."]);
    git(&["commit", "--quiet", "-m", "deploy workflow"]);
    git(&[
        "remote",
        "add",
        "origin",
        "https://github.com/example/app.git",
    ]);
    let sha = git(&["rev-parse", "HEAD"]).trim().to_string();

    let kubeconfig = kubeconfig_in(Identity::Alice, &namespace, temp.path());
    let secret = run(
        Command::new(cluster.bin_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["config", "view", "--flatten", "--minify"]),
        "kubectl config view --flatten",
    );
    let run_id = "987654321";
    let act = Command::new(example_tool("act"))
        .current_dir(&repo)
        .args([
            "push",
            "-W",
            ".github/workflows/deploy.yml",
            "-P",
            "ubuntu-latest=-self-hosted",
            "--env",
            &format!("GITHUB_RUN_ID={run_id}"),
            "--var",
            &format!("DEPLOYLOCK_DOWNLOAD_URL={}", server.url("/releases")),
            "--secret",
            &format!("KUBECONFIG={secret}"),
            "--action-cache-path",
        ])
        .arg(temp.path().join("act-cache"))
        // What a runner has: no deploylock on PATH until the install step.
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", temp.path())
        .env_remove("KUBECONFIG")
        .output()
        .unwrap_or_else(|err| panic!("cannot run act: {err}"));
    let stdout = String::from_utf8_lossy(&act.stdout);
    let stderr = String::from_utf8_lossy(&act.stderr);
    assert!(act.status.success(), "act failed:\n{stdout}\n{stderr}");
    let installed = format!("deploylock-{version}-x86_64-unknown-linux-musl/deploylock");
    assert!(
        stdout.contains(&format!("deploying {sha} with ")) && stdout.contains(&installed),
        "the deploy ran with the installed deploylock:\n{stdout}"
    );
    // The steps in the runner's order, install first.
    let position = |text: &str| {
        stdout
            .find(text)
            .unwrap_or_else(|| panic!("no {text:?} in act's output:\n{stdout}"))
    };
    assert!(position("Install deploylock") < position("Configure cluster access"));
    assert!(position("Configure cluster access") < position("Deploy under the production lock"));

    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let lock = api
        .get("production")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(lock.spec.holder.is_none(), "exec released the lock");
    let actions: Vec<(HistoryAction, &str)> = lock
        .spec
        .history
        .iter()
        .map(|entry| (entry.action, entry.by.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            (HistoryAction::Acquired, "alice"),
            (HistoryAction::Released, "alice")
        ]
    );
    assert_eq!(
        lock.spec.history[0].reason,
        format!("Deploying {sha} (run {run_id})")
    );
    assert_eq!(lock.spec.history[0].lock_id, lock.spec.history[1].lock_id);
    // During the deploy, the holding was this run's: deployment ID = run id.
    let lock_id = std::fs::read_to_string(seen.join("lock-id")).unwrap_or_default();
    assert_eq!(lock_id.trim(), lock.spec.history[0].lock_id);
    let holding = std::fs::read_to_string(seen.join("holding.json")).unwrap_or_default();
    let holding: serde_json::Value = serde_json::from_str(&holding)
        .unwrap_or_else(|err| panic!("deploylock status -o json: {err}: {holding}"));
    assert_eq!(
        value_of_key(&holding, "deploymentId"),
        Some(run_id),
        "{holding}"
    );
}

/// The first string under `key`, anywhere in `value`.
fn value_of_key<'a>(value: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    match value {
        serde_json::Value::Object(map) => map
            .get(key)
            .and_then(serde_json::Value::as_str)
            .or_else(|| map.values().find_map(|v| value_of_key(v, key))),
        serde_json::Value::Array(items) => items.iter().find_map(|v| value_of_key(v, key)),
        _ => None,
    }
}

/// examples/cross-environment-migration: the migration runs holding both
/// environments' locks in one lock group, they are released after it (and
/// after a failed step), and a held environment refuses the whole migration.
#[tokio::test]
async fn cross_environment_migration_example_runs_against_the_control_plane() {
    let cluster = cluster();
    let namespace = cluster.namespace("example-migration").await;
    let temp = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let alice = kubeconfig_in(Identity::Alice, &namespace, temp.path());
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let script = "cross-environment-migration/migrate.sh";

    // The step records the group it ran under, read back while it holds.
    let record = temp.path().join("groups");
    let step = temp.path().join("step.sh");
    std::fs::write(
        &step,
        format!(
            "#!/bin/sh\necho \"$DEPLOYLOCK_GROUP_ID $1 $2\" >> '{}'\necho migrating \"$1\" \"$2\"\n",
            record.display()
        ),
    )
    .unwrap_or_else(|err| panic!("{err}"));
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&step, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|err| panic!("{err}"));
    }
    let step = step.display().to_string();
    let output = run_script(script, &["MIG-42"], &alice, &[("MIGRATE_COMMAND", &step)]);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("holding production staging (lock group "),
        "{stdout}"
    );
    let recorded = std::fs::read_to_string(&record).unwrap_or_else(|err| panic!("{err}"));
    let lines: Vec<Vec<&str>> = recorded.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 2, "{recorded}");
    assert_eq!(
        (lines[0][1], lines[1][1]),
        ("production", "staging"),
        "{recorded}"
    );
    assert_eq!(lines[0][0], lines[1][0], "one lock group: {recorded}");
    for environment in ["production", "staging"] {
        let lock = api
            .get(environment)
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        assert!(lock.spec.holder.is_none(), "{environment} released");
        let history = &lock.spec.history;
        let last: Vec<HistoryAction> = history[history.len().saturating_sub(2)..]
            .iter()
            .map(|e| e.action)
            .collect();
        assert_eq!(last, [HistoryAction::Acquired, HistoryAction::Released]);
        assert_eq!(
            history.last().map(|e| e.reason.as_str()),
            Some("Migration MIG-42")
        );
    }

    // A failed step: exec passes its code on, both locks are released.
    let output = run_script(script, &["MIG-43"], &alice, &[("MIGRATE_COMMAND", "false")]);
    assert_eq!(output.status.code(), Some(1));
    for environment in ["production", "staging"] {
        let lock = api
            .get(environment)
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        assert!(
            lock.spec.holder.is_none(),
            "{environment} released after a failure"
        );
    }

    // staging held by bob: nothing runs, production is released again.
    let held = cluster.deploylock(
        Identity::Bob,
        &namespace,
        &["-e", "staging", "acquire", "--reason", "hotfix"],
    );
    assert!(held.status.success());
    let output = run_script(
        script,
        &["MIG-44"],
        &alice,
        &[("WAIT_TIMEOUT", "1"), ("MIGRATE_COMMAND", "false")],
    );
    assert_eq!(output.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("could not acquire staging"), "{stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("holding"));
    let production = api
        .get("production")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(
        production.spec.holder.is_none(),
        "production released again"
    );
}
