//! What the examples run under besides the cluster: the real CRDs of the
//! tools (hack/gitops-crds.sh), tools built from their pinned Go modules
//! (hack/example-tools.sh: Flux's kustomize-controller, nektos/act), a
//! loopback HTTP server serving files (a Flux artifact, a release tarball),
//! Flux artifacts as their producer publishes them, and host processes
//! stopped when dropped.

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use crate::support::{ok, repo_root};

fn last_line_of(script: &str, args: &[&str]) -> PathBuf {
    let output = Command::new(repo_root().join(script))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {script}: {err}"));
    assert!(
        output.status.success(),
        "{script} {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout.lines().last() {
        Some(line) if !line.is_empty() => PathBuf::from(line),
        _ => panic!("{script} {} printed no path", args.join(" ")),
    }
}

/// The directory of the real CRDs (top level: the GitOps gate's kinds;
/// `flux-source/`, `workflows/`: the examples' kinds).
pub fn gitops_crds_dir() -> PathBuf {
    last_line_of("hack/gitops-crds.sh", &[])
}

/// A tool built from its pinned Go module (built once, then cached).
pub fn example_tool(name: &str) -> PathBuf {
    last_line_of("hack/example-tools.sh", &[name])
}

/// An HTTP server on loopback serving fixed files by path, on its own thread
/// (the tests block on kubectl while it serves). Stops when dropped.
pub struct ServedFiles {
    address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServedFiles {
    pub fn start(files: HashMap<String, Vec<u8>>) -> ServedFiles {
        use axum::http::{StatusCode, Uri};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|err| panic!("cannot listen on loopback: {err}"));
        let address = listener
            .local_addr()
            .unwrap_or_else(|err| panic!("no local address: {err}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|err| panic!("set_nonblocking: {err}"));
        let files = Arc::new(files);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|err| panic!("runtime for the file server: {err}"));
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .unwrap_or_else(|err| panic!("tokio listener: {err}"));
                let router = axum::Router::new().fallback(move |uri: Uri| {
                    let files = Arc::clone(&files);
                    async move {
                        match files.get(uri.path()) {
                            Some(body) => (StatusCode::OK, body.clone()),
                            None => (StatusCode::NOT_FOUND, Vec::new()),
                        }
                    }
                });
                let served = axum::serve(listener, router)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
                if let Err(err) = served {
                    eprintln!("file server: {err}");
                }
            });
        });
        ServedFiles {
            address,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT` + path.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }
}

impl Drop for ServedFiles {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A process on the host (a controller), its output in a log file; killed
/// when dropped, the log kept and named if the test failed.
pub struct HostProcess {
    child: Child,
    log_path: PathBuf,
}

impl HostProcess {
    pub fn spawn(command: &mut Command, log_path: &Path) -> HostProcess {
        let log = File::create(log_path)
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", log_path.display()));
        let err_log = log
            .try_clone()
            .unwrap_or_else(|err| panic!("cannot clone the log file: {err}"));
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
        HostProcess {
            child,
            log_path: log_path.to_path_buf(),
        }
    }

    /// The last lines of its log, for assertion messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("log kept: {}", self.log_path.display());
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

/// A Flux source artifact as its producer publishes it: a tar.gz of
/// manifests (names may have directories: `web/configmap.yaml`) and the
/// ExternalArtifact status fields that describe it.
pub struct FluxArtifact {
    pub bytes: Vec<u8>,
    pub digest: String,
}

impl FluxArtifact {
    pub fn of_manifests(manifests: &[(&str, String)]) -> FluxArtifact {
        use sha2::Digest as _;
        let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
        let content = dir.path().join("content");
        for (name, text) in manifests {
            let file = content.join(name);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).unwrap_or_else(|err| panic!("{err}"));
            }
            std::fs::write(file, text).unwrap_or_else(|err| panic!("{err}"));
        }
        let archive = dir.path().join("artifact.tar.gz");
        let tar = Command::new("tar")
            .arg("czf")
            .arg(&archive)
            .arg("-C")
            .arg(&content)
            .arg(".")
            .output()
            .unwrap_or_else(|err| panic!("cannot run tar: {err}"));
        ok(&tar, "tar czf");
        let bytes = std::fs::read(&archive).unwrap_or_else(|err| panic!("{err}"));
        let digest = format!("sha256:{:x}", sha2::Sha256::digest(&bytes));
        FluxArtifact { bytes, digest }
    }

    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }

    pub fn revision(&self, version: &str) -> String {
        format!("{version}@{}", self.digest)
    }

    /// The path the file server serves it under for the ExternalArtifact
    /// `namespace/name` (as source-controller lays out its storage).
    pub fn served_path(&self, namespace: &str, name: &str) -> String {
        format!("/externalartifact/{namespace}/{name}/{}.tar.gz", self.hex())
    }

    /// The ExternalArtifact status that publishes it as revision `version`,
    /// served by `server`: what a producer writes (`--subresource=status`).
    pub fn external_artifact_status(
        &self,
        version: &str,
        namespace: &str,
        name: &str,
        server: &ServedFiles,
    ) -> serde_json::Value {
        let path = self.served_path(namespace, name);
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        serde_json::json!({"status": {
            "artifact": {
                "digest": self.digest,
                "lastUpdateTime": now,
                "path": path.trim_start_matches('/'),
                "revision": self.revision(version),
                "size": self.bytes.len(),
                "url": server.url(&path),
            },
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "Succeeded",
                "message": format!("stored artifact for revision {version}"),
                "observedGeneration": 1, "lastTransitionTime": now,
            }]
        }})
    }
}

/// Flux's kustomize-controller (hack/example-tools.sh) as a host process
/// with `kubeconfig`, ExternalArtifact sources enabled. With `namespace` it
/// watches only that namespace (its RUNTIME_NAMESPACE): on a control plane
/// shared with other tests it must not touch their Kustomizations.
pub fn spawn_kustomize_controller(
    kubeconfig: &Path,
    runtime_namespace: &str,
    only_its_namespace: bool,
    log_path: &Path,
) -> HostProcess {
    let watch_all = format!("--watch-all-namespaces={}", !only_its_namespace);
    HostProcess::spawn(
        Command::new(example_tool("kustomize-controller"))
            .env("KUBECONFIG", kubeconfig)
            .env("RUNTIME_NAMESPACE", runtime_namespace)
            .args([
                "--feature-gates=ExternalArtifact=true",
                "--enable-leader-election=false",
                "--metrics-addr=127.0.0.1:0",
                "--health-addr=127.0.0.1:0",
                "--log-level=info",
                watch_all.as_str(),
            ]),
        log_path,
    )
}
