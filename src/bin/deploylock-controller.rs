//! deploylock-controller: expires DeploymentLocks at their expiry instant on
//! the API server's clock, keeps the clock Lease the admission policy trusts,
//! records Events for every transition and serves Prometheus metrics. Runs
//! with leader election: only the holder of a coordination.k8s.io Lease
//! reconciles and writes the clock.
//!
//! SIGTERM or SIGINT stop it within [`SHUTDOWN_BOUND`] in every state
//! (typically well under a second): reconciles get [`DRAIN`] to finish, the
//! Lease is released meanwhile (so a standby takes over at once), and a
//! watchdog thread ends the process at the bound whatever the rest does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use deploylock::controller::clock::ClockWriter;
use deploylock::controller::leader::{self, Elector, Leadership, Timing};
use deploylock::controller::{self, Context, Settings, metrics::Metrics, server};
use deploylock::servertime::ServerClock;
use deploylock::store::{LockStore, client_from};

/// From SIGTERM/SIGINT to the end of the process, at the latest.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(10);
/// How long in-flight reconciles may go on after a stop.
const DRAIN: Duration = Duration::from_secs(3);
/// How long the Lease release may take after a stop.
const RELEASE_BOUND: Duration = Duration::from_secs(5);
/// How often the API server's clock is measured again.
const RECALIBRATE_EVERY: Duration = Duration::from_secs(30);

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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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
    if let Err(message) = args.timing().validate() {
        tracing::error!("{message}");
        return ExitCode::from(2);
    }
    let (stop_sender, stop) = watch::channel(false);
    tokio::spawn(on_signals(stop_sender));
    match run(args, stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            ExitCode::FAILURE
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

/// The client, with every connection's silence bounded (kube's default has
/// no read timeout: a dead connection would hang a watch for ever).
async fn build_client(args: &Args) -> Result<Client, String> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let mut config = match &args.kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
            Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|err| err.to_string())?
        }
        None if args.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|err| err.to_string())?,
        None => Config::infer().await.map_err(|err| err.to_string())?,
    };
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(controller::READ_TIMEOUT);
    config.write_timeout = Some(Duration::from_secs(10));
    client_from(config).map_err(|err| err.to_string())
}

/// Retries `attempt` (with a short backoff) until it succeeds or a stop is
/// requested (`None`).
async fn until_stopped<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    what: &str,
    stop: &mut watch::Receiver<bool>,
    mut attempt: impl FnMut() -> F,
) -> Option<T> {
    let mut delay = Duration::from_millis(250);
    loop {
        tokio::select! {
            result = tokio::time::timeout(Duration::from_secs(10), attempt()) => match result {
                Ok(Ok(value)) => return Some(value),
                Ok(Err(err)) => tracing::warn!(error = %err, "{what} failed; retrying"),
                Err(_) => tracing::warn!("{what} timed out; retrying"),
            },
            _ = stop.wait_for(|stopped| *stopped) => return None,
        }
        tokio::select! {
            _ = tokio::time::sleep(leader::jitter(delay)) => {}
            _ = stop.wait_for(|stopped| *stopped) => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn run(args: Args, mut stop: watch::Receiver<bool>) -> Result<(), String> {
    let client = build_client(&args).await?;
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
    .map_err(|err| format!("cannot listen on {}: {err}", args.metrics_addr))?;
    tracing::info!(address = %bound, "serving /metrics, /healthz, /readyz");

    let store = LockStore::new(client.clone(), "default");
    let Some(user) = until_stopped("asking the API server who I am", &mut stop, || {
        store.whoami()
    })
    .await
    else {
        tracing::info!("stopped before starting");
        return Ok(());
    };
    let Some(clock) = until_stopped("reading the API server's clock", &mut stop, || {
        ServerClock::new(client.clone())
    })
    .await
    else {
        tracing::info!("stopped before starting");
        return Ok(());
    };
    let calibration = tokio::spawn(clock.clone().keep_calibrated(RECALIBRATE_EVERY));
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    ready.store(true, Ordering::Relaxed);

    let (leadership_sender, mut leadership) = watch::channel(Leadership::Follower);
    let elector = Elector {
        api: Api::namespaced(client.clone(), &args.lease_namespace),
        name: args.lease_name.clone(),
        identity: identity.clone(),
        timing: args.timing(),
        clock: clock.clone(),
    };
    let mut election = tokio::spawn(elector.run(leadership_sender, stop.clone()));
    let clock_namespace = args
        .clock_lease_namespace
        .clone()
        .unwrap_or_else(|| args.lease_namespace.clone());

    loop {
        tokio::select! {
            gained = leader::gained(&mut leadership) => if !gained { break },
            _ = stop.wait_for(|stopped| *stopped) => break,
        }
        tracing::info!(identity, "leading; reconciling");
        // This term ends on a stop or when leadership is lost.
        let (term_sender, term) = watch::channel(false);
        {
            let mut stop = stop.clone();
            let leadership = leadership.clone();
            let term_sender = term_sender.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.wait_for(|stopped| *stopped) => {}
                    _ = leader::lost(leadership) => {}
                    _ = term_sender.closed() => {}
                }
                let _ = term_sender.send(true);
            });
        }
        let clock_lease = ClockWriter {
            api: Api::namespaced(client.clone(), &clock_namespace),
            name: args.clock_lease_name.clone(),
            identity: identity.clone(),
            clock: clock.clone(),
        }
        .spawn(term.clone());
        if args.gitops_gating {
            let gating = controller::gitops::GitOpsGating {
                client: client.clone(),
                namespace: args.namespace.clone(),
                instance: identity.clone(),
                clock: clock.clone(),
            };
            tokio::spawn(gating.run(term.clone()));
        }
        let context = Arc::new(Context::new(
            client.clone(),
            metrics.clone(),
            Settings {
                retention: args.retention,
                instance: identity.clone(),
            },
            clock.clone(),
            clock_lease,
            user.clone(),
        ));
        let drained = {
            let mut term = term.clone();
            async move {
                let _ = term.wait_for(|ended| *ended).await;
                tokio::time::sleep(DRAIN).await;
            }
        };
        tokio::select! {
            _ = controller::run(args.namespace.clone(), context, term.clone()) => {}
            _ = drained => tracing::warn!("reconciles still running after {DRAIN:?}; abandoned"),
        }
        let _ = term_sender.send(true);
        if *stop.borrow() {
            break;
        }
        tracing::warn!("lost leadership: stopped reconciling; rejoining the election");
    }

    // The elector releases the Lease on the stop (in parallel with the drain).
    match tokio::time::timeout(RELEASE_BOUND, &mut election).await {
        Ok(_) => tracing::info!("stopped"),
        Err(_) => {
            election.abort();
            tracing::warn!("stopped without confirming the Lease release");
        }
    }
    calibration.abort();
    Ok(())
}
