//! The local cluster with nodes (`hack/cluster.sh up --nodes 3`): real
//! kubelets running pods through containerd + runc, images built here from
//! their Dockerfiles (`hack/image.sh`) and imported into the nodes. Started
//! once, on first use, by the tests that run pods (the chart, the examples);
//! if it cannot start every such test fails with the reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use crate::support::{client_from, isolate_helm, ok, repo_root};

/// The image `make image` builds from ./Dockerfile: the chart's default and
/// the examples' image.
pub const DEPLOYLOCK_IMAGE: &str = "ghcr.io/deploylock/deploylock:0.1.0";

pub struct NodeCluster {
    dir: PathBuf,
    bin_dir: PathBuf,
}
// (dir holds the kubeconfigs and the logs: DIR/logs/kubelet-node-*.log.)

static NODE_CLUSTER: OnceLock<Result<NodeCluster, String>> = OnceLock::new();

/// Serialises the tests that install the chart: its cluster-scoped objects
/// (CRD, ClusterRoles, admission policy) exist once per cluster.
pub static CHART_INSTALLED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The cluster with nodes, started (and the images loaded) on first use.
pub fn node_cluster() -> &'static NodeCluster {
    match NODE_CLUSTER.get_or_init(start_node_cluster) {
        Ok(cluster) => cluster,
        Err(reason) => panic!("the local cluster with nodes could not start: {reason}"),
    }
}

fn run(command: &mut Command, what: &str) -> Result<Output, String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("cannot run {what}: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "{what} failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(output)
}

/// Builds an image with `hack/image.sh` and imports it into every node.
fn load_image(dir: &Path, image: &str) -> Result<(), String> {
    let built = run(
        Command::new(repo_root().join("hack/image.sh")).arg(image),
        &format!("hack/image.sh {image}"),
    )?;
    let stdout = String::from_utf8_lossy(&built.stdout);
    let archive = stdout
        .lines()
        .last()
        .ok_or_else(|| format!("hack/image.sh {image} printed no archive"))?;
    run(
        Command::new(repo_root().join("hack/cluster.sh"))
            .args(["load-image", archive, "--dir"])
            .arg(dir),
        "hack/cluster.sh load-image",
    )?;
    Ok(())
}

fn start_node_cluster() -> Result<NodeCluster, String> {
    let dir = std::env::temp_dir().join(format!("deploylock-node-{}", std::process::id()));
    // Three nodes: the chart's two replicas (host network, so one per node)
    // plus room for the replacement pod of a rolling update.
    run(
        Command::new(repo_root().join("hack/cluster.sh"))
            .arg("up")
            .arg("--dir")
            .arg(&dir)
            .args(["--nodes", "3", "--watch-pid"])
            .arg(std::process::id().to_string()),
        "hack/cluster.sh up --nodes 3",
    )?;
    let bin_dir = std::fs::read_to_string(dir.join("bin-dir"))
        .map_err(|err| format!("cluster started without a bin-dir file: {err}"))?;
    load_image(&dir, "deploylock")?;
    load_image(&dir, "shell")?;
    Ok(NodeCluster {
        dir,
        bin_dir: PathBuf::from(bin_dir.trim()),
    })
}

impl NodeCluster {
    /// Builds an image with `hack/image.sh IMAGE` (cached) and imports it into
    /// every node, for the tests that need more than the two loaded at start.
    pub fn load_image(&self, image: &str) {
        if let Err(reason) = load_image(&self.dir, image) {
            panic!("{reason}");
        }
    }

    /// Restarts kube-apiserver (the supervisor starts it again) and returns
    /// once the new one is ready. After a `helm uninstall` this is the
    /// remedy README gives for Kubernetes' frozen admission-policy params
    /// (kubernetes/kubernetes#130887): once no binding names the Lease
    /// paramKind, an API server keeps the clock Lease as it was, and a
    /// re-installed policy would date new locks from that stale clock.
    pub fn restart_apiserver(&self) -> Result<(), String> {
        let pid_file = self.dir.join("apiserver.pid");
        let before = std::fs::read_to_string(&pid_file).unwrap_or_default();
        run(
            Command::new(repo_root().join("hack/cluster.sh"))
                .arg("restart-apiserver")
                .arg("--dir")
                .arg(&self.dir),
            "hack/cluster.sh restart-apiserver",
        )?;
        // Nothing to watch while the server is down: poll its /readyz.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let now = std::fs::read_to_string(&pid_file).unwrap_or_default();
            let ready = self.kubectl(&["get", "--raw=/readyz"]);
            if now != before && ready.status.success() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(format!(
                    "kube-apiserver not ready 120 s after its restart: {}",
                    String::from_utf8_lossy(&ready.stderr)
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }

    /// Returns once the admission policy dates new locks from a clock written
    /// after `since`, and fails if it does not within a minute: after an
    /// earlier uninstall an API server can keep the clock Lease as it was
    /// then (kubernetes/kubernetes#130887, see README), and Jobs would be
    /// refused. The clock admission reads is the floor it states when it
    /// refuses a new lock's fencing token of 0 (a server-side dry run).
    pub fn admission_reads_a_clock_from(&self, since: chrono::DateTime<chrono::Utc>) {
        let probe = serde_json::json!({
            "apiVersion": "deploylock.dev/v1",
            "kind": "DeploymentLock",
            "metadata": {"name": "clock-probe", "namespace": "deploylock-system"},
            "spec": {"environment": "clock-probe", "fencingToken": 0}
        })
        .to_string();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let refused =
                self.kubectl_with_input(&["create", "--dry-run=server", "-f", "-"], Some(&probe));
            assert!(
                !refused.status.success(),
                "a fencing token of 0 was admitted"
            );
            let message = String::from_utf8_lossy(&refused.stderr).into_owned();
            // Another answer (no params yet, a connection refused) is retried.
            let clock = message
                .split("between ")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .and_then(|floor| floor.parse::<i64>().ok())
                .and_then(|floor| {
                    chrono::DateTime::from_timestamp(
                        floor / deploylock::crd::FENCING_TOKENS_PER_SECOND,
                        0,
                    )
                });
            // The floor is in whole seconds.
            if clock.is_some_and(|clock| clock >= since - chrono::Duration::seconds(1)) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "a minute after the install, admission does not date new locks from a clock written after it ({since}); its params are stale? Last answer: {message}"
            );
            // The controller writes the clock every second; nothing inside
            // the admission plugin can be watched.
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfigs/admin.kubeconfig")
    }

    pub async fn client(&self) -> kube::Client {
        match client_from(&self.admin_kubeconfig()).await {
            Ok(client) => client,
            Err(reason) => panic!("client for the node cluster: {reason}"),
        }
    }

    /// kubectl as the cluster admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with_input(args, None)
    }

    pub fn kubectl_with_input(&self, args: &[&str], input: Option<&str>) -> Output {
        let mut command = Command::new(self.bin_dir.join("kubectl"));
        command
            .arg("--kubeconfig")
            .arg(self.admin_kubeconfig())
            .args(args);
        output_with_input(command, input, "kubectl")
    }

    /// kubectl that must succeed; returns its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        self.kubectl_ok_with_input(args, None)
    }

    pub fn kubectl_ok_with_input(&self, args: &[&str], input: Option<&str>) -> String {
        let output = self.kubectl_with_input(args, input);
        assert!(
            output.status.success(),
            "kubectl {} failed:\n{}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The pinned helm against this cluster, with its caches in a temp dir.
    pub fn helm(&self, args: &[&str]) -> Output {
        let mut command = Command::new(self.bin_dir.join("helm"));
        isolate_helm(&mut command)
            .arg("--kubeconfig")
            .arg(self.admin_kubeconfig())
            .args(args);
        output_with_input(command, None, "helm")
    }

    /// `deploylock` (the host's build) as the cluster admin.
    pub fn deploylock(&self, namespace: &str, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_deploylock"));
        command
            .arg("--kubeconfig")
            .arg(self.admin_kubeconfig())
            .args(["-n", namespace])
            .env_remove("KUBECONFIG")
            .args(args);
        output_with_input(command, None, "deploylock")
    }

    /// Creates a namespace (idempotent).
    pub fn ensure_namespace(&self, name: &str) {
        let manifest = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n");
        self.kubectl_ok_with_input(&["apply", "-f", "-"], Some(&manifest));
    }
}

fn output_with_input(mut command: Command, input: Option<&str>, what: &str) -> Output {
    use std::io::Write as _;
    command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {what}: {err}"));
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(input.as_bytes())
            .unwrap_or_else(|err| panic!("cannot write to {what}: {err}"));
    }
    child
        .wait_with_output()
        .unwrap_or_else(|err| panic!("{what}: {err}"))
}

/// What `hack/cluster.sh down` must leave: no process started from the
/// cluster's directory, no mount under it, no iptables chain of a kubelet.
#[tokio::test]
async fn node_cluster_down_leaves_nothing_behind() {
    let dir = std::env::temp_dir().join(format!("deploylock-node-down-{}", std::process::id()));
    let up = Command::new(repo_root().join("hack/cluster.sh"))
        .arg("up")
        .arg("--dir")
        .arg(&dir)
        .args(["--node", "--watch-pid"])
        .arg(std::process::id().to_string())
        .output()
        .unwrap_or_else(|err| panic!("cannot run hack/cluster.sh: {err}"));
    ok(&up, "hack/cluster.sh up --node");
    let bin_dir = std::fs::read_to_string(dir.join("bin-dir")).unwrap_or_default();
    let kubectl = |args: &[&str]| -> Output {
        Command::new(Path::new(bin_dir.trim()).join("kubectl"))
            .arg("--kubeconfig")
            .arg(dir.join("kubeconfigs/admin.kubeconfig"))
            .args(args)
            .output()
            .unwrap_or_else(|err| panic!("kubectl: {err}"))
    };
    // A pod running (its sandbox and container, a shim, an overlay mount).
    ok(
        &kubectl(&[
            "run",
            "sleeper",
            "--image",
            "registry.k8s.io/pause:3.10.1",
            "--image-pull-policy=Never",
        ]),
        "kubectl run",
    );
    ok(
        &kubectl(&[
            "wait",
            "--for=condition=Ready",
            "pod/sleeper",
            "--timeout=120s",
        ]),
        "the pod did not become Ready",
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = format!("{}/", dir.display());
    assert!(
        mounts.contains(&prefix),
        "a running pod mounts under the cluster dir"
    );

    let down = Command::new(repo_root().join("hack/cluster.sh"))
        .arg("down")
        .arg("--dir")
        .arg(&dir)
        .output()
        .unwrap_or_else(|err| panic!("cannot run hack/cluster.sh down: {err}"));
    ok(&down, "hack/cluster.sh down");
    assert!(!dir.exists(), "the cluster directory survived");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(
        !mounts.contains(&prefix),
        "mounts left under {prefix}:\n{mounts}"
    );
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&prefix) {
            left.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
        }
    }
    assert!(left.is_empty(), "processes left: {left:?}");
    for tool in ["iptables-save", "ip6tables-save"] {
        if let Ok(rules) = Command::new(tool).output() {
            let text = String::from_utf8_lossy(&rules.stdout);
            assert!(
                !text.contains("KUBE-"),
                "{tool} shows a kubelet chain:\n{text}"
            );
        }
    }
}

/// A helm release of the chart, uninstalled when dropped: a test that fails
/// half-way leaves no release behind for the next one.
pub struct ChartRelease<'a> {
    node: &'a NodeCluster,
    name: &'static str,
    namespace: &'static str,
    uninstalled: bool,
}

impl<'a> ChartRelease<'a> {
    pub fn installed(node: &'a NodeCluster, name: &'static str, namespace: &'static str) -> Self {
        ChartRelease {
            node,
            name,
            namespace,
            uninstalled: false,
        }
    }

    /// `helm uninstall --wait`, now, then the API server restarted (see
    /// [`NodeCluster::restart_apiserver`]); helm's output.
    pub fn uninstall(mut self) -> Output {
        self.uninstalled = true;
        let (output, restarted) = self.uninstall_and_restart();
        if let Err(reason) = restarted {
            panic!(
                "{reason} (after helm uninstall: {}, {})",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        output
    }

    fn uninstall_and_restart(&self) -> (Output, Result<(), String>) {
        let output = self.node.helm(&[
            "uninstall",
            self.name,
            "--namespace",
            self.namespace,
            "--wait",
        ]);
        (output, self.node.restart_apiserver())
    }
}

impl Drop for ChartRelease<'_> {
    fn drop(&mut self) {
        if !self.uninstalled {
            let _ = self.uninstall_and_restart();
        }
    }
}
