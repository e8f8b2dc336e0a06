//! deploylock-controller: expires DeploymentLocks at their expiry instant on
//! the API server's clock, keeps the clock Lease the admission policy trusts,
//! records Events for every transition and serves Prometheus metrics. Runs
//! with leader election: only the holder of a coordination.k8s.io Lease
//! reconciles and writes the clock.
//!
//! SIGTERM or SIGINT stop it within [`SHUTDOWN_BOUND`] in every state
//! (typically well under a second): reconciles get
//! [`deploylock::controller::replica::DRAIN`] to finish, the
//! Lease is released meanwhile (so a standby takes over at once), and a
//! watchdog thread ends the process at the bound whatever the rest does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use kube::Client;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use deploylock::controller::leader::Timing;
use deploylock::controller::replica::{LeaseRef, Replica};
use deploylock::controller::{self, metrics::Metrics, server};
use deploylock::error::ConfigError;
use deploylock::store::{client_from, load_config};

/// From SIGTERM/SIGINT to the end of the process, at the latest.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(10);
#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Controller for DeploymentLocks (deploylock.dev/v1).
#[derive(Parser, Debug)]
#[command(name = "deploylock-controller", version, about)]
struct Args {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "DEPLOYLOCK_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "DEPLOYLOCK_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "DEPLOYLOCK_LEASE_NAME",
        default_value = "deploylock-controller"
    )]
    lease_name: String,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Seconds a standby waits, after it last saw the Lease change, before taking it over.
    #[arg(long, env = "DEPLOYLOCK_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// The leader stops reconciling this many seconds before a standby could take over
    /// (counted from the sending of its last successful renewal).
    #[arg(long, env = "DEPLOYLOCK_LEASE_GRACE", default_value_t = 2)]
    lease_grace: u64,
    /// Seconds between renewals by the leader (and looks at the Lease by a standby).
    #[arg(long, env = "DEPLOYLOCK_LEASE_RENEW_PERIOD", default_value_t = 2)]
    lease_renew_period: u64,
    /// Name of the clock Lease (the admission policy's trusted time), written by the leader.
    #[arg(
        long,
        env = "DEPLOYLOCK_CLOCK_LEASE_NAME",
        default_value = "deploylock-clock"
    )]
    clock_lease_name: String,
    /// Namespace of the clock Lease (default: the leader-election Lease's namespace).
    #[arg(long, env = "DEPLOYLOCK_CLOCK_LEASE_NAMESPACE")]
    clock_lease_namespace: Option<String>,
    /// How long an expired lock is shown as Expired before it is cleared to Available (e.g. 1h, 30m).
    #[arg(long, env = "DEPLOYLOCK_RETENTION", default_value = "1h", value_parser = parse_retention)]
    retention: chrono::Duration,
    /// This replica's identity in the Leases and in Events (default: $POD_NAME or the host name and PID).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log format.
    #[arg(
        long,
        env = "DEPLOYLOCK_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Suspend Flux Kustomizations/HelmReleases and stop Argo CD auto-sync of the objects
    /// bound to an environment (label deploylock.dev/environment) while its lock is held.
    #[arg(long, env = "DEPLOYLOCK_GITOPS_GATING")]
    gitops_gating: bool,
    /// Open FreezeWindows: take their locks as the user deploylock:freeze-windows, which the
    /// controller impersonates (RBAC: impersonate that user; the chart grants it).
    #[arg(long, env = "DEPLOYLOCK_FREEZE_WINDOWS", default_value_t = true, action = clap::ArgAction::Set)]
    freeze_windows: bool,
    /// Keep the workload gate's ValidatingAdmissionPolicyBinding of each EnvironmentBinding
    /// (RBAC: config/rbac/environment-bindings.yaml; the chart's workloadGate.environmentBindings).
    #[arg(long, env = "DEPLOYLOCK_ENVIRONMENT_BINDINGS")]
    environment_bindings: bool,
    /// Path to a kubeconfig (default: in-cluster, $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context.
    #[arg(long)]
    context: Option<String>,
}

impl Args {
    fn timing(&self) -> Timing {
        Timing {
            lease_duration: Duration::from_secs(self.lease_duration),
            grace: Duration::from_secs(self.lease_grace),
            renew_period: Duration::from_secs(self.lease_renew_period),
        }
    }
}

fn parse_retention(text: &str) -> Result<chrono::Duration, String> {
    humantime::parse_duration(text)
        .ok()
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .ok_or_else(|| format!("invalid retention {text:?}: use a duration such as 1h or 30m"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: never escape codes in a file
    // or a log collector.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "deploylock-controller".into());
    format!("{host}-{}", std::process::id())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    let (stop_sender, stop) = watch::channel(false);
    tokio::spawn(on_signals(stop_sender));
    match run(args, stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            err.exit_code()
        }
    }
}

/// The first SIGTERM/SIGINT asks everything to stop and starts a watchdog
/// that ends the process at [`SHUTDOWN_BOUND`]; a second one ends it at once.
async fn on_signals(stop: watch::Sender<bool>) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!(bound_s = SHUTDOWN_BOUND.as_secs(), "stopping");
    let _ = stop.send(true);
    // A thread, not a task: it fires even if the runtime is wedged.
    std::thread::spawn(|| {
        std::thread::sleep(SHUTDOWN_BOUND);
        tracing::error!("shutdown took longer than {SHUTDOWN_BOUND:?}; exiting now");
        std::process::exit(1);
    });
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting now");
    std::process::exit(1);
}

/// Why the controller could not run.
#[derive(Debug, thiserror::Error)]
enum ControllerError {
    #[error("invalid leader-election timing: {0}")]
    Timing(String),
    #[error("cannot load the Kubernetes configuration: {0}")]
    Config(#[source] ConfigError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl ControllerError {
    /// 2 for a bad setting (like a usage error), 1 for the rest.
    fn exit_code(&self) -> ExitCode {
        match self {
            ControllerError::Timing(_) => ExitCode::from(2),
            ControllerError::Config(_) | ControllerError::Listen { .. } => ExitCode::FAILURE,
        }
    }
}

/// The client, with every connection's silence bounded (kube's default has
/// no read timeout: a dead connection would hang a watch for ever).
/// With freeze windows, a second client acting as their identity.
async fn build_client(args: &Args) -> Result<(Client, Option<Client>), ConfigError> {
    let mut config = load_config(args.kubeconfig.as_deref(), args.context.clone()).await?;
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(controller::READ_TIMEOUT);
    config.write_timeout = Some(Duration::from_secs(10));
    let window_client = if args.freeze_windows {
        let mut window_config = config.clone();
        window_config.auth_info.impersonate = Some(deploylock::windows::WINDOW_HOLDER.to_string());
        Some(client_from(window_config)?)
    } else {
        None
    };
    Ok((client_from(config)?, window_client))
}

async fn run(args: Args, stop: watch::Receiver<bool>) -> Result<(), ControllerError> {
    args.timing().validate().map_err(ControllerError::Timing)?;
    let (client, window_client) = build_client(&args).await.map_err(ControllerError::Config)?;
    let metrics = Metrics::shared();
    let ready = Arc::new(AtomicBool::new(false));
    let bound = server::serve(
        args.metrics_addr,
        server::Probe {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
    )
    .await
    .map_err(|source| ControllerError::Listen {
        address: args.metrics_addr,
        source,
    })?;
    tracing::info!(address = %bound, "serving /metrics, /healthz, /readyz");

    let replica = Replica {
        client,
        metrics,
        ready,
        identity: args.identity.clone().unwrap_or_else(default_identity),
        namespace: args.namespace.clone(),
        election_lease: LeaseRef {
            namespace: args.lease_namespace.clone(),
            name: args.lease_name.clone(),
        },
        timing: args.timing(),
        clock_lease: LeaseRef {
            namespace: args
                .clock_lease_namespace
                .clone()
                .unwrap_or_else(|| args.lease_namespace.clone()),
            name: args.clock_lease_name.clone(),
        },
        retention: args.retention,
        gitops_gating: args.gitops_gating,
        window_client,
        environment_bindings: args.environment_bindings,
    };
    replica.run(stop).await;
    Ok(())
}
