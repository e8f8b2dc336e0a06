//! A real local control plane shared by every test in a test binary.
//!
//! The first test that asks for it starts etcd and kube-apiserver through
//! `hack/cluster.sh up --watch-pid <this process>`, so the servers stop when the
//! test process exits, however it exits (a panic, Ctrl-C, SIGKILL). The CRD is
//! installed once; every test gets a namespace of its own. If the control plane
//! cannot start, every test fails with the reason: nothing is skipped.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config, CustomResourceExt};

use deploylock::crd::{DeploymentLock, HistoryEntry, LockHolder};
use serde_json::Value;

/// The identities the local control plane authenticates (see hack/cluster.sh).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    Admin,
    Alice,
    Bob,
    Viewer,
    /// A deploylock admin (group deploylock:admins), not a cluster admin.
    Carol,
    Controller,
}

impl Identity {
    fn file_stem(self) -> &'static str {
        match self {
            Identity::Admin => "admin",
            Identity::Alice => "alice",
            Identity::Bob => "bob",
            Identity::Viewer => "viewer",
            Identity::Carol => "carol",
            Identity::Controller => "controller",
        }
    }

    /// The username the API server sees for this identity.
    pub fn username(self) -> &'static str {
        match self {
            Identity::Admin => "deploylock-admin",
            Identity::Alice => "alice",
            Identity::Bob => "bob",
            Identity::Viewer => "viewer",
            Identity::Carol => "carol",
            Identity::Controller => "deploylock-controller",
        }
    }
}

/// The paths of the package's binaries. Cargo gives them
/// (`CARGO_BIN_EXE_<name>`) only to the package's own tests and benches, so
/// they pass them in: see [`binaries!`](crate::binaries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binaries {
    pub deploylock: &'static str,
    pub controller: &'static str,
}

/// The [`Binaries`] of the package whose test or bench expands it.
#[macro_export]
macro_rules! binaries {
    () => {
        $crate::Binaries {
            deploylock: env!("CARGO_BIN_EXE_deploylock"),
            controller: env!("CARGO_BIN_EXE_deploylock-controller"),
        }
    };
}

pub struct TestCluster {
    dir: PathBuf,
    bin_dir: PathBuf,
    binaries: Binaries,
}

static CLUSTER: OnceLock<Result<TestCluster, String>> = OnceLock::new();
static NAMESPACE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The repository's root (this crate lives in its `testkit/`).
pub fn repo_root() -> &'static Path {
    let testkit = Path::new(env!("CARGO_MANIFEST_DIR"));
    testkit.parent().unwrap_or(testkit)
}

/// The shared control plane, started on first use with `binaries` (the
/// first caller's: a test binary has one set).
pub fn cluster(binaries: Binaries) -> &'static TestCluster {
    match CLUSTER.get_or_init(|| start_cluster(binaries)) {
        Ok(cluster) => cluster,
        Err(reason) => panic!("the local control plane could not start: {reason}"),
    }
}

/// `hack/cluster.sh up` in `dir`, tied to this process: the control plane
/// goes when the tests do, even if they are killed.
/// Starts a control plane in `dir`; a failed start is cleaned up and tried
/// once more (under heavy load a start has failed now and then; both
/// failures are reported if the second fails too).
fn control_plane_up(dir: &Path) -> Result<(), String> {
    control_plane_up_once(dir).or_else(|first| {
        eprintln!(
            "[testkit] {first}\n[testkit] starting the control plane in {} again",
            dir.display()
        );
        let _ = Command::new(repo_root().join("hack/cluster.sh"))
            .arg("down")
            .arg("--dir")
            .arg(dir)
            .output();
        control_plane_up_once(dir).map_err(|second| format!("{first}\nand again: {second}"))
    })
}

fn control_plane_up_once(dir: &Path) -> Result<(), String> {
    let output = Command::new(repo_root().join("hack/cluster.sh"))
        .arg("up")
        .arg("--dir")
        .arg(dir)
        .arg("--watch-pid")
        .arg(std::process::id().to_string())
        .output()
        .map_err(|err| format!("cannot run hack/cluster.sh: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "hack/cluster.sh up failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

fn start_cluster(binaries: Binaries) -> Result<TestCluster, String> {
    let dir = std::env::temp_dir().join(format!("deploylock-test-{}", std::process::id()));
    control_plane_up(&dir)?;
    let bin_dir = std::fs::read_to_string(dir.join("bin-dir"))
        .map_err(|err| format!("cluster started without a bin-dir file: {err}"))?;
    let cluster = TestCluster {
        dir,
        bin_dir: PathBuf::from(bin_dir.trim()),
        binaries,
    };
    cluster.apply_crd_blocking(DeploymentLock::crd())?;
    let rbac = cluster.kubectl(
        Identity::Admin,
        &[
            "apply",
            "-f",
            &repo_root()
                .join("config/rbac/clusterroles.yaml")
                .display()
                .to_string(),
            "-f",
            &repo_root()
                .join("config/admission/policy.yaml")
                .display()
                .to_string(),
            "-f",
            &repo_root()
                .join("config/admission/stop-the-line.yaml")
                .display()
                .to_string(),
            "-f",
            &repo_root()
                .join("tests/integration/admission-binding.yaml")
                .display()
                .to_string(),
            "-f",
            &repo_root()
                .join("config/dev/bindings.yaml")
                .display()
                .to_string(),
        ],
    );
    if !rbac.status.success() {
        return Err(format!(
            "cannot apply RBAC: {}",
            String::from_utf8_lossy(&rbac.stderr)
        ));
    }
    start_clock_controller(&cluster)?;
    await_admission_enforced(&cluster)?;
    Ok(cluster)
}

/// A new admission policy takes a moment to load in the API server; writes
/// before that are not checked. Waits (hack/await-admission.sh: a forbidden
/// server-side dry run, until it is refused) in an enforced namespace.
fn await_admission_enforced(cluster: &TestCluster) -> Result<(), String> {
    let namespace = "admission-probe";
    for args in [
        vec!["create", "namespace", namespace],
        vec![
            "label",
            "namespace",
            namespace,
            "deploylock.dev/enforce=true",
        ],
    ] {
        let output = cluster.kubectl(Identity::Admin, &args);
        if !output.status.success() {
            return Err(format!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    let output = Command::new(repo_root().join("hack/await-admission.sh"))
        .arg(cluster.bin_dir.join("kubectl"))
        .arg(cluster.kubeconfig(Identity::Admin))
        .arg(namespace)
        .output()
        .map_err(|err| format!("cannot run hack/await-admission.sh: {err}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(())
}

/// Waits, on a watch of the clock Lease, until the policy's clock has passed
/// the second a fencing token was issued in (see FENCING_TOKENS_PER_SECOND):
/// from then on, deleting the lock cannot let a re-created one repeat it.
pub async fn await_clock_past_token(client: &Client, token: i64) {
    use k8s_openapi::api::coordination::v1::Lease;
    let per_second = deploylock::crd::FENCING_TOKENS_PER_SECOND;
    let needed = token.div_euclid(per_second) + i64::from(token.rem_euclid(per_second) != 0);
    let leases: Api<Lease> = Api::namespaced(client.clone(), CLOCK_NAMESPACE);
    let passed = move |lease: Option<&Lease>| {
        lease
            .and_then(|lease| lease.spec.as_ref())
            .and_then(|spec| spec.renew_time.as_ref())
            .is_some_and(|time| time.0.as_second() >= needed)
    };
    let waited = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        await_condition(leases, "deploylock-clock", passed),
    )
    .await;
    assert!(
        matches!(waited, Ok(Ok(_))),
        "the clock did not pass the token {token}: {waited:?}"
    );
}

/// How many holdings a lock object has had: a new object's token starts at a
/// multiple of FENCING_TOKENS_PER_SECOND (the server's clock) and each
/// holding adds one.
pub fn holdings_since_creation(token: i64) -> i64 {
    token.rem_euclid(deploylock::crd::FENCING_TOKENS_PER_SECOND)
}

/// Namespace of the admission policy's clock Lease in the test cluster.
pub const CLOCK_NAMESPACE: &str = "deploylock-system";

/// Starts the controller that keeps the admission policy's clock Lease
/// (`deploylock-clock` in deploylock-system) for the whole test run, and
/// waits until the Lease exists: without it the policy refuses every write
/// in enforced namespaces. It is started from a thread that never ends, so
/// that its parent-death signal fires only when the test process exits.
fn start_clock_controller(cluster: &TestCluster) -> Result<(), String> {
    let created = cluster.kubectl(Identity::Admin, &["create", "namespace", CLOCK_NAMESPACE]);
    if !created.status.success() {
        return Err(format!(
            "cannot create {CLOCK_NAMESPACE}: {}",
            String::from_utf8_lossy(&created.stderr)
        ));
    }
    let kubeconfig = cluster.kubeconfig(Identity::Controller);
    let controller = cluster.binaries.controller;
    let log_path = cluster.dir().join("clock-controller.log");
    let (started, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let spawned = std::fs::File::create(&log_path).and_then(|log| {
            Command::new("setpriv")
                .args(["--pdeathsig", "KILL", "--"])
                .arg(controller)
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["--namespace", CLOCK_NAMESPACE])
                .args(["--lease-namespace", CLOCK_NAMESPACE])
                .args(["--clock-lease-namespace", CLOCK_NAMESPACE])
                .args(["--metrics-addr", "127.0.0.1:0"])
                .args(["--log-format", "json"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
        });
        let _ = started.send(spawned.as_ref().map(|_| ()).map_err(|err| err.to_string()));
        if let Ok(mut child) = spawned {
            let _ = child.wait();
        }
    });
    result
        .recv()
        .map_err(|_| "the clock controller's thread ended".to_string())?
        .map_err(|err| format!("cannot start the clock controller: {err}"))?;
    let waited = cluster.kubectl(
        Identity::Admin,
        &[
            "wait",
            "--for=create",
            "lease/deploylock-clock",
            "-n",
            CLOCK_NAMESPACE,
            "--timeout=60s",
        ],
    );
    if !waited.status.success() {
        return Err(format!(
            "the clock Lease did not appear: {}",
            String::from_utf8_lossy(&waited.stderr)
        ));
    }
    Ok(())
}

pub async fn client_from(kubeconfig: &Path) -> Result<Client, String> {
    let file = Kubeconfig::read_from(kubeconfig)
        .map_err(|err| format!("cannot read {}: {err}", kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .map_err(|err| format!("bad kubeconfig {}: {err}", kubeconfig.display()))?;
    Client::try_from(config).map_err(|err| format!("cannot build a client: {err}"))
}

/// Applies the DeploymentLock CRD generated from the Rust types and waits,
/// on a watch, until the API server reports it Established.
pub async fn install_crd(client: &Client) -> Result<CustomResourceDefinition, kube::Error> {
    apply_crd(client, DeploymentLock::crd()).await
}

/// Applies a CRD generated from the Rust types (server-side) and waits, on a
/// watch, until the API server reports it Established.
pub async fn apply_crd(
    client: &Client,
    crd: CustomResourceDefinition,
) -> Result<CustomResourceDefinition, kube::Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.patch(
        &name,
        &PatchParams::apply("deploylock-tests").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    let established = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        await_condition(crds.clone(), &name, conditions::is_crd_established()),
    )
    .await;
    match established {
        Ok(Ok(Some(crd))) => Ok(crd),
        _ => crds.get(&name).await,
    }
}

impl TestCluster {
    /// [`apply_crd`] as the admin, from a runtime of its own: each
    /// #[tokio::test] has its own runtime, and a kube Client must not outlive
    /// the runtime it was built on.
    pub fn apply_crd_blocking(&self, crd: CustomResourceDefinition) -> Result<(), String> {
        let kubeconfig = self.kubeconfig(Identity::Admin);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|err| err.to_string())?;
            runtime.block_on(async {
                let client = client_from(&kubeconfig).await?;
                apply_crd(&client, crd)
                    .await
                    .map_err(|err| err.to_string())?;
                Ok(())
            })
        })
        .join()
        .map_err(|_| "the CRD installer panicked".to_string())?
    }

    /// The workload gate's policy (cluster-scoped, shared by the tests),
    /// applied once per process (the cluster is one per process).
    pub fn install_workload_gate_policy(&self) {
        static INSTALLED: OnceLock<()> = OnceLock::new();
        INSTALLED.get_or_init(|| {
            let applied = self.apply_server_side(&["config/admission/workload-gate.yaml"], None);
            expect_exit(&applied, 0, "apply the workload gate's policy");
        });
    }

    /// What EnvironmentBindings need, installed once per process (the
    /// cluster is one per process): their CRD, the workload gate's policy
    /// (the API server refuses a binding to a policy it does not know) and
    /// the controller's role for them.
    pub fn install_environment_bindings(&self) {
        static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
        self.install_workload_gate_policy();
        let installed = INSTALLED.get_or_init(|| {
            self.apply_crd_blocking(deploylock::envbinding::EnvironmentBinding::crd())?;
            let role_binding = serde_json::json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": "deploylock-test-controller-environment-bindings"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                            "name": "deploylock-controller-environment-bindings"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                              "name": Identity::Controller.username()}]
            });
            let applied = self.apply_server_side(
                &["config/rbac/environment-bindings.yaml"],
                Some(&role_binding),
            );
            if !applied.status.success() {
                return Err(stderr_of(&applied));
            }
            Ok(())
        });
        if let Err(reason) = installed {
            panic!("cannot install EnvironmentBindings: {reason}");
        }
    }

    /// The cluster's directory (kubeconfigs, logs, server PIDs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn kubeconfig(&self, identity: Identity) -> PathBuf {
        self.dir()
            .join("kubeconfigs")
            .join(format!("{}.kubeconfig", identity.file_stem()))
    }

    pub async fn client(&self, identity: Identity) -> Client {
        match client_from(&self.kubeconfig(identity)).await {
            Ok(client) => client,
            Err(reason) => panic!("client for {identity:?}: {reason}"),
        }
    }

    /// Creates a namespace for one test. Namespaces are not deleted: this
    /// control plane runs no namespace controller, and the whole cluster is
    /// discarded when the test process exits.
    pub async fn namespace(&self, test_name: &str) -> String {
        let n = NAMESPACE_COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{}-{}", test_name.replace('_', "-"), n);
        let namespaces: Api<Namespace> = Api::all(self.client(Identity::Admin).await);
        let mut namespace = Namespace::default();
        namespace.metadata.name = Some(name.clone());
        if let Err(err) = namespaces.create(&PostParams::default(), &namespace).await {
            panic!("cannot create namespace {name}: {err}");
        }
        name
    }

    /// The package's binaries this cluster runs.
    pub fn binaries(&self) -> Binaries {
        self.binaries
    }

    /// The directory of the pinned kubectl, etcd, kube-apiserver and helm.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// A `deploylock` command as `identity`, in `namespace`, not yet run.
    pub fn deploylock_command(&self, identity: Identity, namespace: &str) -> Command {
        let mut command = Command::new(self.binaries.deploylock);
        command
            .arg("--kubeconfig")
            .arg(self.kubeconfig(identity))
            .arg("-n")
            .arg(namespace)
            .env_remove("KUBECONFIG");
        command
    }

    /// Creates a namespace in which the admission policy is enforced.
    pub async fn enforced_namespace(&self, test_name: &str) -> String {
        let name = self.namespace(test_name).await;
        let label = self.kubectl(
            Identity::Admin,
            &["label", "namespace", &name, "deploylock.dev/enforce=true"],
        );
        assert!(
            label.status.success(),
            "cannot label {name}: {}",
            String::from_utf8_lossy(&label.stderr)
        );
        name
    }

    /// Runs `deploylock` as `identity` in `namespace` and waits for it.
    pub fn deploylock(&self, identity: Identity, namespace: &str, args: &[&str]) -> Output {
        match self
            .deploylock_command(identity, namespace)
            .args(args)
            .output()
        {
            Ok(output) => output,
            Err(err) => panic!("cannot run deploylock: {err}"),
        }
    }

    /// Starts `deploylock-controller` as the controller identity (minimal
    /// RBAC), watching only `namespace`, with its Lease in that namespace.
    /// The process is killed when the returned handle is dropped, and by the
    /// kernel if the test thread dies first.
    pub fn spawn_controller(
        &self,
        namespace: &str,
        lease_name: &str,
        extra: &[&str],
    ) -> ControllerProcess {
        let port = free_port();
        let log_path = std::env::temp_dir().join(format!(
            "deploylock-controller-{}-{namespace}-{lease_name}-{port}.log",
            std::process::id()
        ));
        let log = match std::fs::File::create(&log_path) {
            Ok(file) => file,
            Err(err) => panic!("cannot create {}: {err}", log_path.display()),
        };
        let mut command = Command::new("setpriv");
        command
            .args(["--pdeathsig", "KILL", "--"])
            .arg(self.binaries.controller)
            .arg("--kubeconfig")
            .arg(self.kubeconfig(Identity::Controller))
            .args(["--namespace", namespace])
            .args(["--lease-namespace", namespace])
            .args(["--lease-name", lease_name])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--log-format", "json"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            // To a file: a pipe nobody reads would fill and stall the controller.
            .stderr(log);
        let child = match command.spawn() {
            Ok(child) => child,
            Err(err) => panic!("cannot start deploylock-controller: {err}"),
        };
        ControllerProcess {
            child,
            port,
            log_path,
        }
    }

    /// Runs the kubectl built from the pinned Kubernetes version as `identity`.
    pub fn kubectl(&self, identity: Identity, args: &[&str]) -> Output {
        let result = Command::new(self.bin_dir.join("kubectl"))
            .arg("--kubeconfig")
            .arg(self.kubeconfig(identity))
            .args(args)
            .output();
        match result {
            Ok(output) => output,
            Err(err) => panic!("cannot run kubectl: {err}"),
        }
    }

    /// Applies `manifest` as the admin, server-side and forcing conflicts
    /// (tests apply the same cluster-wide objects); panics naming `what` if
    /// kubectl fails.
    pub fn apply(&self, manifest: &serde_json::Value, what: &str) {
        expect_exit(&self.apply_server_side(&[], Some(manifest)), 0, what);
    }

    /// `kubectl apply --server-side --force-conflicts` as the admin of the
    /// repository's `files` and of `manifest` (on stdin), in one run.
    fn apply_server_side(&self, files: &[&str], manifest: Option<&serde_json::Value>) -> Output {
        let paths: Vec<String> = files
            .iter()
            .map(|file| repo_root().join(file).display().to_string())
            .collect();
        let mut args = vec!["apply", "--server-side", "--force-conflicts"];
        for path in &paths {
            args.extend(["-f", path.as_str()]);
        }
        match manifest {
            Some(manifest) => {
                args.extend(["-f", "-"]);
                self.kubectl_with_input(Identity::Admin, &args, &manifest.to_string())
            }
            None => self.kubectl(Identity::Admin, &args),
        }
    }

    /// Grants `subjects` (RBAC subject objects) the `rules` in `namespace`:
    /// a Role and a RoleBinding, both named `name`.
    pub fn grant(
        &self,
        namespace: &str,
        name: &str,
        rules: serde_json::Value,
        subjects: serde_json::Value,
    ) {
        let metadata = serde_json::json!({"name": name, "namespace": namespace});
        self.apply(
            &serde_json::json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": metadata, "rules": rules
            }),
            &format!("Role {namespace}/{name}"),
        );
        self.apply(
            &serde_json::json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": metadata,
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": subjects
            }),
            &format!("RoleBinding {namespace}/{name}"),
        );
    }

    /// kubectl as `identity`, with `input` on its stdin (`-f -`).
    pub fn kubectl_with_input(&self, identity: Identity, args: &[&str], input: &str) -> Output {
        let mut child = match Command::new(self.bin_dir.join("kubectl"))
            .arg("--kubeconfig")
            .arg(self.kubeconfig(identity))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(err) => panic!("cannot run kubectl: {err}"),
        };
        if let Some(mut stdin) = child.stdin.take()
            && let Err(err) = stdin.write_all(input.as_bytes())
        {
            panic!("cannot write kubectl's stdin: {err}");
        }
        match child.wait_with_output() {
            Ok(output) => output,
            Err(err) => panic!("cannot wait for kubectl: {err}"),
        }
    }
}

/// A running deploylock-controller.
pub struct ControllerProcess {
    pub child: std::process::Child,
    pub port: u16,
    /// Its log, kept when a test fails (to read why), removed otherwise.
    log_path: PathBuf,
}

impl ControllerProcess {
    /// The controller's identity in its Lease (host name and PID).
    pub fn identity(&self) -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), self.child.id())
    }

    /// Sends a signal (e.g. "TERM", "KILL") with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "kill -{signal} failed"
        );
    }

    /// Scrapes /metrics.
    pub fn metrics(&self) -> String {
        let output = Command::new("curl")
            .args(["-sf", &format!("http://127.0.0.1:{}/metrics", self.port)])
            .output();
        match output {
            Ok(output) if output.status.success() => {
                String::from_utf8_lossy(&output.stdout).into_owned()
            }
            other => panic!("cannot scrape metrics: {other:?}"),
        }
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("controller log kept: {}", self.log_path.display());
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

fn free_port() -> u16 {
    match std::net::TcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()) {
        Ok(address) => address.port(),
        Err(err) => panic!("no free port: {err}"),
    }
}

/// A second, empty control plane (no CRD, no RBAC from deploylock), for
/// tests that install things from scratch. Stopped when dropped.
pub struct ExtraCluster {
    pub dir: PathBuf,
    stopped: bool,
}

impl ExtraCluster {
    pub fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("deploylock-{name}-{}", std::process::id()));
        if let Err(err) = control_plane_up(&dir) {
            panic!("second control plane failed to start: {err}");
        }
        ExtraCluster {
            dir,
            stopped: false,
        }
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfigs/admin.kubeconfig")
    }

    /// Stops it now and returns what `hack/cluster.sh down` said.
    pub fn stop(&mut self) -> Output {
        self.stopped = true;
        match Command::new(repo_root().join("hack/cluster.sh"))
            .arg("down")
            .arg("--dir")
            .arg(&self.dir)
            .output()
        {
            Ok(output) => output,
            Err(err) => panic!("cannot run hack/cluster.sh down: {err}"),
        }
    }
}

impl Drop for ExtraCluster {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.stop();
        }
    }
}

/// The column names of a table's first line (kubectl, `deploylock list`).
pub fn header_of(text: &str) -> Vec<&str> {
    text.lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect()
}

pub fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts the exit code, showing everything the process said when it differs.
#[track_caller]
pub fn expect_exit(output: &Output, expected: i32, what: &str) {
    assert_eq!(
        output.status.code(),
        Some(expected),
        "{what}: expected exit code {expected}, got {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        output.status,
        stdout_of(output),
        stderr_of(output)
    );
}

pub async fn locks_api(cluster: &TestCluster, namespace: &str) -> Api<DeploymentLock> {
    Api::namespaced(cluster.client(Identity::Admin).await, namespace)
}

/// The stored lock, read by the admin.
pub async fn stored(api: &Api<DeploymentLock>, environment: &str) -> DeploymentLock {
    match api.get(environment).await {
        Ok(lock) => lock,
        Err(err) => panic!("cannot read the DeploymentLock {environment}: {err}"),
    }
}

pub fn holder_of(lock: &DeploymentLock) -> &LockHolder {
    match lock.spec.holder.as_ref() {
        Some(holder) => holder,
        None => panic!("the lock has no holder: {:?}", lock.spec),
    }
}

pub fn last_history(lock: &DeploymentLock) -> &HistoryEntry {
    match lock.spec.history.last() {
        Some(entry) => entry,
        None => panic!("the lock has no history: {:?}", lock.spec),
    }
}

/// `deploylock status -o json` as `identity`, parsed.
pub fn status_json(
    cluster: &TestCluster,
    identity: Identity,
    namespace: &str,
    environment: &str,
) -> Value {
    let output = cluster.deploylock(
        identity,
        namespace,
        &["-e", environment, "status", "-o", "json"],
    );
    expect_exit(&output, 0, "status -o json");
    match serde_json::from_slice(&output.stdout) {
        Ok(value) => value,
        Err(err) => panic!(
            "status -o json is not JSON ({err}):\n{}",
            stdout_of(&output)
        ),
    }
}

/// Runs `attempt` until its success flips away from `while_success`, within
/// 30 s, and returns that answer: an admission policy reads its parameter
/// from an informer, which follows a write by a few milliseconds.
pub fn until_answer_changes(
    mut attempt: impl FnMut() -> Output,
    while_success: bool,
    what: &str,
) -> Output {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let output = attempt();
        if output.status.success() != while_success {
            return output;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: unchanged after 30 s: {}",
            stderr_of(&output)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
