//! deploylock-controller: expires DeploymentLocks at their expiry instant,
//! records Events for every transition and serves Prometheus metrics. Runs
//! with leader election: only the holder of a coordination.k8s.io Lease
//! reconciles.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, ValueEnum};
use kube::Api;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use deploylock::controller::{self, Context, Settings, metrics::Metrics, server};
use deploylock::crd::DeploymentLock;
use deploylock::store::{ConnectOptions, LockStore, connect, server_clock_offset};

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
    /// Seconds a leader's Lease lasts without renewal.
    #[arg(long, env = "DEPLOYLOCK_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// Seconds before the Lease's expiry at which the leader renews it (less than --lease-duration).
    #[arg(long, env = "DEPLOYLOCK_LEASE_GRACE", default_value_t = 5)]
    lease_grace: u64,
    /// How long an expired lock is shown as Expired before it is cleared to Available (e.g. 1h, 30m).
    #[arg(long, env = "DEPLOYLOCK_RETENTION", default_value = "1h", value_parser = parse_retention)]
    retention: chrono::Duration,
    /// This replica's identity in the Lease and in Events (default: $POD_NAME or the host name).
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
    /// Path to a kubeconfig (default: in-cluster, $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context.
    #[arg(long)]
    context: Option<String>,
}

fn parse_retention(text: &str) -> Result<chrono::Duration, String> {
    humantime::parse_duration(text)
        .ok()
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .ok_or_else(|| format!("invalid retention {text:?}: use a duration such as 1h or 30m"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_lease_manager=warn"));
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
    if args.lease_grace == 0 || args.lease_grace >= args.lease_duration {
        tracing::error!("--lease-grace must be at least 1 and less than --lease-duration");
        return ExitCode::from(2);
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn termination() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn run(args: Args) -> Result<(), String> {
    let (client, _) = connect(&ConnectOptions {
        kubeconfig: args.kubeconfig.clone(),
        context: args.context.clone(),
        namespace: None,
    })
    .await
    .map_err(|err| err.to_string())?;

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

    let user = LockStore::new(client.clone(), "default")
        .whoami()
        .await
        .map_err(|err| err.to_string())?;
    let clock_offset = server_clock_offset(&client)
        .await
        .map_err(|err| err.to_string())?;
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    ready.store(true, Ordering::Relaxed);

    // Stop requests: SIGTERM/SIGINT, or loss of leadership.
    let (stop_sender, mut stop) = watch::channel(false);
    let terminated = Arc::new(AtomicBool::new(false));
    {
        let stop_sender = stop_sender.clone();
        let terminated = terminated.clone();
        tokio::spawn(async move {
            termination().await;
            terminated.store(true, Ordering::Relaxed);
            let _ = stop_sender.send(true);
        });
    }

    let lease = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&args.lease_namespace)
        .with_identity(&identity)
        .with_duration(args.lease_duration)
        .with_grace(args.lease_grace)
        .build()
        .await
        .map_err(|err| format!("cannot set up leader election: {err}"))?;
    let (mut leader, lease_task) = lease.watch().await;
    tracing::info!(identity, lease = %args.lease_name, "waiting for leadership");
    loop {
        if *leader.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = leader.changed() => {
                if changed.is_err() {
                    return Err("leader election stopped".into());
                }
            }
            _ = stop.wait_for(|stopped| *stopped) => {
                drop(leader);
                let _ = lease_task.await;
                tracing::info!("stopped before becoming leader");
                return Ok(());
            }
        }
    }
    tracing::info!(identity, "became leader; reconciling");

    {
        // Ends on stop too, so that its receiver is dropped and the lease
        // manager sees the channel close.
        let mut leader = leader.clone();
        let mut stop = stop.clone();
        let stop_sender = stop_sender.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = leader.changed() => {
                        if changed.is_err() || !*leader.borrow_and_update() {
                            tracing::error!("lost leadership");
                            let _ = stop_sender.send(true);
                            return;
                        }
                    }
                    _ = stop.wait_for(|stopped| *stopped) => return,
                }
            }
        });
    }

    let api: Api<DeploymentLock> = match &args.namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    let context = Arc::new(Context {
        client,
        metrics,
        settings: Settings {
            retention: args.retention,
            instance: identity,
        },
        clock_offset,
        user,
    });
    let mut stop_for_controller = stop.clone();
    controller::run(api, context, async move {
        let _ = stop_for_controller.wait_for(|stopped| *stopped).await;
    })
    .await;

    // Closing the channel makes the lease manager release the Lease, so a
    // standby takes over at once instead of waiting for it to expire.
    drop(leader);
    let _ = lease_task.await;
    if terminated.load(Ordering::Relaxed) {
        tracing::info!("stopped and released leadership");
        Ok(())
    } else {
        Err("lost leadership; exiting so that a fresh start rejoins the election".into())
    }
}
