//! The controller as a real process against the real control plane: expiry at
//! the instant, Events for every transition (once), conditions for
//! `kubectl wait`, leader election and metrics.

use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use serde_json::json;

use deploylock::crd::{
    DeploymentLock, DeploymentLockSpec, HistoryAction, HistoryEntry, LockHolder, LockState,
    LockType,
};

use crate::support::{Identity, apply_lock_spec, await_leader, await_object, cluster};

const WAIT: StdDuration = StdDuration::from_secs(60);

/// Writes a lock held by alice that expires `expires_in` from now, straight
/// through the API (the CLI's shortest duration is a minute).
async fn put_short_lock(
    api: &Api<DeploymentLock>,
    environment: &str,
    expires_in: Duration,
) -> DateTime<Utc> {
    // A one-minute holding that ends `expires_in` from now.
    let expires_at = Utc::now() + expires_in;
    let now = expires_at - Duration::minutes(1);
    let lock_id = uuid::Uuid::new_v4().to_string();
    let mut spec = match api.get_opt(environment).await {
        Ok(Some(lock)) => lock.spec,
        Ok(None) => DeploymentLockSpec {
            environment: environment.to_string(),
            ..Default::default()
        },
        Err(err) => panic!("cannot read {environment}: {err}"),
    };
    let sequence = spec.history.last().map_or(0, |last| last.sequence) + 1;
    spec.fencing_token += 1;
    spec.history.push(HistoryEntry {
        sequence,
        action: HistoryAction::Acquired,
        at: now,
        lock_id: lock_id.clone(),
        by: "alice".into(),
        owner: "alice".into(),
        reason: "short lock".into(),
        expires_at: Some(expires_at),
    });
    spec.holder = Some(LockHolder {
        lock_id,
        user: "alice".into(),
        owner: "alice".into(),
        lock_type: LockType::Manual,
        reason: "short lock".into(),
        acquired_at: now,
        expires_at,
        duration_seconds: 60,
        deployment_id: None,
        metadata: Default::default(),
        overrode: None,
        group_id: None,
    });
    apply_lock_spec(api, environment, &spec).await;
    expires_at
}

async fn await_state(
    api: &Api<DeploymentLock>,
    environment: &str,
    state: LockState,
) -> DeploymentLock {
    let condition = move |lock: &DeploymentLock| {
        lock.status.as_ref().and_then(|status| status.state) == Some(state)
    };
    await_object(api, environment, &format!("{state}"), WAIT, condition).await
}

/// Waits until the controller has announced every history entry.
async fn await_events_announced(api: &Api<DeploymentLock>, environment: &str) -> DeploymentLock {
    await_object(api, environment, "announced", WAIT, events_announced).await
}

/// Whether the controller has announced every history entry of the lock.
fn events_announced(lock: &DeploymentLock) -> bool {
    let last = lock.spec.history.last().map_or(0, |entry| entry.sequence);
    lock.status
        .as_ref()
        .and_then(|status| status.last_event_sequence)
        == Some(last)
}

async fn event_reasons(namespace: &str, environment: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(cluster().client(Identity::Admin).await, namespace);
    let mut list = match events.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(err) => panic!("cannot list events: {err}"),
    };
    list.retain(|event| {
        event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(environment)
    });
    list.sort_by_key(|event| event.event_time.as_ref().map(|time| time.0));
    list.into_iter().filter_map(|event| event.reason).collect()
}

fn run_ok(namespace: &str, identity: Identity, args: &[&str]) {
    let output = cluster().deploylock(identity, namespace, args);
    assert!(
        output.status.success(),
        "deploylock {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn lease_holder(namespace: &str, lease: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(cluster().client(Identity::Admin).await, namespace);
    leases
        .get_opt(lease)
        .await
        .ok()
        .flatten()
        .and_then(|lease| lease.spec)
        .and_then(|spec| spec.holder_identity)
        .filter(|holder| !holder.is_empty())
}

#[tokio::test]
async fn lock_expires_at_its_expiry_instant() {
    let cluster = cluster();
    let namespace = cluster.namespace("expiry").await;
    let _controller = cluster.spawn_controller(&namespace, "expiry", &[]);
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let expires_at = put_short_lock(&api, "production", Duration::seconds(3)).await;
    await_state(&api, "production", LockState::Locked).await;
    let expired = await_state(&api, "production", LockState::Expired).await;
    let observed = Utc::now();
    let transition = expired
        .status
        .as_ref()
        .and_then(|status| status.conditions.first())
        .map(|condition| condition.last_transition_time.0);
    eprintln!(
        "expiresAt {expires_at}, Expired observed by the test at {observed} ({} ms later), condition transition {transition:?}",
        (observed - expires_at).num_milliseconds()
    );
    assert!(observed >= expires_at, "Expired before the expiry instant");
    let clock = clock_lease_time(&namespace).await;
    assert!(
        clock.is_some_and(|clock| clock >= expires_at),
        "the clock Lease ({clock:?}) did not reach the expiry ({expires_at}) with the Expired mark"
    );
    let condition = expired.status.as_ref().and_then(|s| s.conditions.first());
    assert_eq!(condition.map(|c| c.status.as_str()), Some("False"));
    assert_eq!(condition.map(|c| c.reason.as_str()), Some("Expired"));
}

#[tokio::test]
async fn full_cycle_is_recorded_as_events_once_each() {
    let cluster = cluster();
    let namespace = cluster.namespace("events").await;
    let controller = cluster.spawn_controller(&namespace, "events", &[]);
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);

    run_ok(
        &namespace,
        Identity::Alice,
        &["acquire", "--reason", "Deploying 2.1.0"],
    );
    run_ok(&namespace, Identity::Alice, &["extend", "--duration", "45"]);
    run_ok(&namespace, Identity::Alice, &["release"]);
    run_ok(
        &namespace,
        Identity::Bob,
        &["acquire", "--reason", "Deploying 2.2.0"],
    );
    await_events_announced(&api, "production").await;
    // Expire bob's holding by shortening it through the API.
    let holder = api
        .get("production")
        .await
        .ok()
        .and_then(|lock| lock.spec.holder)
        .unwrap_or_else(|| panic!("bob should hold production"));
    let expires_at = Utc::now() + Duration::seconds(2);
    let patch =
        json!({ "spec": { "holder": { "expiresAt": expires_at, "lockId": holder.lock_id } } });
    if let Err(err) = api
        .patch("production", &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        panic!("cannot shorten the lock: {err}");
    }
    await_state(&api, "production", LockState::Expired).await;
    run_ok(
        &namespace,
        Identity::Alice,
        &["acquire", "--force", "--reason", "hotfix"],
    );
    await_state(&api, "production", LockState::ForceLocked).await;
    run_ok(
        &namespace,
        Identity::Bob,
        &["force-release", "--reason", "hotfix deployed"],
    );
    await_state(&api, "production", LockState::Available).await;
    await_events_announced(&api, "production").await;

    let reasons = event_reasons(&namespace, "production").await;
    assert_eq!(
        reasons,
        [
            "Acquired",
            "Extended",
            "Released",
            "Acquired",
            "Expired",
            "ForceAcquired",
            "ForceReleased"
        ],
        "events in order, each once"
    );
    let describe = cluster.kubectl(
        Identity::Admin,
        &["describe", "deploymentlock", "production", "-n", &namespace],
    );
    let text = String::from_utf8_lossy(&describe.stdout);
    for expected in [
        "ForceAcquired",
        "ForceReleased",
        "hotfix deployed",
        "Expired at",
        "Extended by alice",
    ] {
        assert!(
            text.contains(expected),
            "describe lacks {expected:?}:\n{text}"
        );
    }

    let metrics = controller.metrics();
    for series in [
        format!(
            "deploylock_force_acquisitions_total{{namespace=\"{namespace}\",environment=\"production\"}} 1"
        ),
        format!(
            "deploylock_force_releases_total{{namespace=\"{namespace}\",environment=\"production\"}} 1"
        ),
        format!(
            "deploylock_expirations_total{{namespace=\"{namespace}\",environment=\"production\"}} 1"
        ),
        format!(
            "deploylock_lock_state{{namespace=\"{namespace}\",environment=\"production\",state=\"Available\"}} 1"
        ),
        format!(
            "deploylock_lock_state{{namespace=\"{namespace}\",environment=\"production\",state=\"Locked\"}} 0"
        ),
    ] {
        assert!(
            metrics.contains(&series),
            "metrics lack {series}:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("deploylock_reconcile_duration_seconds_count"),
        "{metrics}"
    );
}

#[tokio::test]
async fn kubectl_wait_for_locked_condition_returns_on_acquire() {
    let cluster = cluster();
    let namespace = cluster.namespace("kubectl-wait").await;
    let _controller = cluster.spawn_controller(&namespace, "kubectl-wait", &[]);
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    run_ok(
        &namespace,
        Identity::Alice,
        &["acquire", "--reason", "first"],
    );
    run_ok(&namespace, Identity::Alice, &["release"]);
    await_state(&api, "production", LockState::Available).await;

    let kubeconfig = cluster.kubeconfig(Identity::Admin);
    let mut wait = std::process::Command::new(cluster.bin_dir().join("kubectl"));
    wait.arg("--kubeconfig").arg(&kubeconfig).args([
        "wait",
        "--for=condition=Locked",
        "deploymentlock/production",
        "-n",
        &namespace,
        "--timeout=60s",
    ]);
    let waiter = match wait.stdout(std::process::Stdio::piped()).spawn() {
        Ok(child) => child,
        Err(err) => panic!("cannot start kubectl wait: {err}"),
    };
    run_ok(
        &namespace,
        Identity::Bob,
        &["acquire", "--reason", "second"],
    );
    let output = match waiter.wait_with_output() {
        Ok(output) => output,
        Err(err) => panic!("kubectl wait: {err}"),
    };
    assert!(output.status.success(), "kubectl wait failed");
    assert!(String::from_utf8_lossy(&output.stdout).contains("condition met"));

    // `kubectl get` tells a person at a glance: Locked, by whom, why, until when.
    let get = cluster.kubectl(
        Identity::Viewer,
        &["get", "deploymentlocks", "-n", &namespace],
    );
    let text = String::from_utf8_lossy(&get.stdout);
    let row: Vec<&str> = text
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    // NAME STATE HOLDER OWNER ...: the authenticated holder, then the label.
    assert_eq!(
        row.get(0..4),
        Some(&["production", "Locked", "bob", "bob"][..]),
        "{text}"
    );
    assert!(text.contains("second"), "{text}");
    run_ok(&namespace, Identity::Bob, &["release"]);
    await_state(&api, "production", LockState::Available).await;
    let get = cluster.kubectl(
        Identity::Viewer,
        &["get", "deploymentlocks", "-n", &namespace],
    );
    let text = String::from_utf8_lossy(&get.stdout);
    assert!(
        text.lines()
            .nth(1)
            .is_some_and(|row| row.contains("Available")),
        "{text}"
    );
}

#[tokio::test]
async fn locks_taken_while_no_controller_runs_are_reconciled_at_start() {
    let cluster = cluster();
    let namespace = cluster.namespace("catch-up").await;
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    run_ok(
        &namespace,
        Identity::Alice,
        &["-e", "staging", "acquire", "--reason", "while down"],
    );
    put_short_lock(&api, "production", Duration::seconds(-5)).await;
    let _controller = cluster.spawn_controller(&namespace, "catch-up", &[]);
    let staging = await_state(&api, "staging", LockState::Locked).await;
    assert!(staging.status.and_then(|s| s.observed_generation).is_some());
    await_state(&api, "production", LockState::Expired).await;
    await_events_announced(&api, "staging").await;
    assert_eq!(event_reasons(&namespace, "staging").await, ["Acquired"]);
}

#[tokio::test]
async fn one_leader_among_two_and_fast_handover() {
    let cluster = cluster();
    let namespace = cluster.namespace("leader").await;
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let lease_args = LEASE_ARGS;
    let first = cluster.spawn_controller(&namespace, "leader", &lease_args);
    let second = cluster.spawn_controller(&namespace, "leader", &lease_args);
    let leader = await_leader(&namespace, "leader", &[&first, &second], WAIT).await;
    let (leader_process, standby) = if leader == first.identity() {
        (first, second)
    } else {
        (second, first)
    };

    // Both run; transitions produce exactly one Event each.
    run_ok(
        &namespace,
        Identity::Alice,
        &["acquire", "--reason", "two replicas"],
    );
    run_ok(&namespace, Identity::Alice, &["extend", "--duration", "40"]);
    run_ok(&namespace, Identity::Alice, &["release"]);
    await_events_announced(&api, "production").await;
    assert_eq!(
        event_reasons(&namespace, "production").await,
        ["Acquired", "Extended", "Released"]
    );

    // SIGTERM: the leader releases its Lease and the standby takes over well
    // within the Lease duration.
    let started = std::time::Instant::now();
    leader_process.signal("TERM");
    let new_leader = await_leader(&namespace, "leader", &[&standby], WAIT).await;
    let handover = started.elapsed();
    eprintln!("hand-over after SIGTERM took {handover:?}");
    assert_eq!(new_leader, standby.identity());
    assert!(
        handover < StdDuration::from_secs(6),
        "hand-over took {handover:?}"
    );

    // kill -9 of the new leader: a third replica takes over after the Lease
    // runs out, and a pending expiry still happens.
    let third = cluster.spawn_controller(&namespace, "leader", &lease_args);
    let expires_at = put_short_lock(&api, "production", Duration::seconds(3)).await;
    await_state(&api, "production", LockState::Locked).await;
    standby.signal("KILL");
    let _ = await_leader(&namespace, "leader", &[&third], WAIT).await;
    let expired = await_state(&api, "production", LockState::Expired).await;
    assert!(Utc::now() >= expires_at);
    assert!(expired.spec.holder.is_some());
    await_events_announced(&api, "production").await;
    let reasons = event_reasons(&namespace, "production").await;
    assert_eq!(
        reasons,
        ["Acquired", "Extended", "Released", "Acquired", "Expired"]
    );
    assert!(lease_holder(&namespace, "leader").await.is_some());
    drop(leader_process);
}

#[tokio::test]
async fn expired_locks_are_cleared_after_retention_with_history_kept() {
    let cluster = cluster();
    let namespace = cluster.namespace("retention").await;
    let _controller = cluster.spawn_controller(&namespace, "retention", &["--retention", "2s"]);
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    put_short_lock(&api, "production", Duration::seconds(2)).await;
    await_state(&api, "production", LockState::Expired).await;
    let cleared = await_state(&api, "production", LockState::Available).await;
    assert!(cleared.spec.holder.is_none());
    let actions: Vec<HistoryAction> = cleared
        .spec
        .history
        .iter()
        .map(|entry| entry.action)
        .collect();
    assert_eq!(actions, [HistoryAction::Acquired, HistoryAction::Cleared]);
    // The controller's identity wrote the clearing, under its minimal RBAC.
    assert_eq!(
        cleared.spec.history.last().map(|entry| entry.by.as_str()),
        Some(Identity::Controller.username())
    );
    let created = api
        .create(
            &PostParams::default(),
            &DeploymentLock::new(
                "unused",
                DeploymentLockSpec {
                    environment: "unused".into(),
                    ..Default::default()
                },
            ),
        )
        .await;
    assert!(created.is_ok(), "admin can still create locks: {created:?}");
}

// ---------------------------------------------------------------------------
// Shutdown (issue 20), clock skew, the clock Lease, malformed locks
// ---------------------------------------------------------------------------

/// The controller's own bound from SIGTERM to exit (SHUTDOWN_BOUND in
/// src/bin/deploylock-controller.rs), below the chart's 30 s grace period.
const SHUTDOWN_BOUND: StdDuration = StdDuration::from_secs(10);
/// Lease timing of these tests: a standby takes over 6 s after the last change.
const LEASE_ARGS: [&str; 6] = [
    "--lease-duration",
    "6",
    "--lease-grace",
    "2",
    "--lease-renew-period",
    "1",
];
const LEASE_DURATION: StdDuration = StdDuration::from_secs(6);

/// A controller started by these tests with what `spawn_controller` does not
/// offer: another kubeconfig (a proxy, impersonation), libfaketime.
struct Spawned {
    child: std::process::Child,
    identity: String,
    port: u16,
    log_path: std::path::PathBuf,
}

impl Spawned {
    fn start(
        kubeconfig: &std::path::Path,
        namespace: &str,
        lease: &str,
        clock_offset: Option<&str>,
        extra: &[&str],
    ) -> Spawned {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let identity = format!("{namespace}-{lease}-{n}");
        let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
            Ok(address) => address.port(),
            Err(err) => panic!("no free port: {err}"),
        };
        let log_path = std::env::temp_dir().join(format!(
            "deploylock-controller-{}-{identity}.log",
            std::process::id()
        ));
        let log = match std::fs::File::create(&log_path) {
            Ok(file) => file,
            Err(err) => panic!("cannot create {}: {err}", log_path.display()),
        };
        let mut command = std::process::Command::new("setpriv");
        command.args(["--pdeathsig", "KILL", "--"]);
        if let Some(offset) = clock_offset {
            // The wall clock shifted, the monotonic clock left alone. The
            // library is preloaded directly: the `faketime` wrapper forks,
            // and a signal to it would not reach the controller.
            command
                .env("LD_PRELOAD", libfaketime())
                .env("FAKETIME", offset)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        command
            .arg(env!("CARGO_BIN_EXE_deploylock-controller"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--namespace", namespace])
            .args(["--lease-namespace", namespace])
            .args(["--lease-name", lease])
            .args(["--identity", &identity])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--log-format", "json"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("KUBECONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(log);
        let child = match command.spawn() {
            Ok(child) => child,
            Err(err) => {
                panic!("cannot start deploylock-controller (faketime {clock_offset:?}): {err}")
            }
        };
        Spawned {
            child,
            identity,
            port,
            log_path,
        }
    }

    fn signal(&self, signal: &str) {
        send_signal(self.child.id(), signal);
    }

    fn metrics(&self) -> String {
        let output = std::process::Command::new("curl")
            .args(["-sf", &format!("http://127.0.0.1:{}/metrics", self.port)])
            .output();
        match output {
            Ok(output) if output.status.success() => {
                String::from_utf8_lossy(&output.stdout).into_owned()
            }
            other => panic!("cannot scrape metrics: {other:?}"),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Spawned {
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

/// libfaketime's preload library (hack/ensure-deps.sh installs it).
fn libfaketime() -> &'static str {
    const CANDIDATES: [&str; 4] = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ];
    CANDIDATES
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
        .unwrap_or_else(|| {
            panic!("libfaketime not found in {CANDIDATES:?}: hack/ensure-deps.sh installs it")
        })
}

/// Asserts that the controller's own wall clock is off by about `seconds`
/// (its log lines carry its time).
async fn assert_clock_skewed(controller: &Spawned, seconds: i64) {
    let first = tokio::time::timeout(WAIT, async {
        loop {
            let log = controller.log();
            let stamp = log.lines().next().and_then(|line| {
                serde_json::from_str::<serde_json::Value>(line)
                    .ok()?
                    .get("timestamp")?
                    .as_str()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            });
            if let Some(stamp) = stamp {
                return stamp.with_timezone(&Utc);
            }
            tokio::time::sleep(StdDuration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no log line from the controller"));
    let skew = (first - Utc::now()).num_seconds();
    assert!(
        (seconds - 100..=seconds + 100).contains(&skew),
        "the controller's clock is off by {skew}s, not {seconds}s"
    );
}

fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
    assert!(
        matches!(status, Ok(s) if s.success()),
        "kill -{signal} {pid} failed"
    );
}

/// Waits for a process to end, at most `bound` (the exit is a condition on a
/// process, checked every 20 ms: there is no event to wait on).
async fn exit_within(
    child: &mut std::process::Child,
    bound: StdDuration,
) -> Option<std::process::ExitStatus> {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
}

/// SIGTERM, then: the process ends within the bound, cleanly.
async fn assert_stops_on_sigterm(child: &mut std::process::Child, log: impl Fn() -> String) {
    let started = std::time::Instant::now();
    send_signal(child.id(), "TERM");
    let status = exit_within(child, SHUTDOWN_BOUND).await;
    eprintln!("exit {:?} after SIGTERM: {status:?}", started.elapsed());
    match status {
        Some(status) => assert!(status.success(), "exit status {status}:\n{}", log()),
        None => panic!("still running {SHUTDOWN_BOUND:?} after SIGTERM:\n{}", log()),
    }
}

/// A pending expiry a few seconds away is marked Expired by whoever leads
/// now, not before its instant on the server's clock (this host's clock: the
/// API server runs here), and the clock Lease reached it first.
async fn assert_pending_expiry_marked(namespace: &str, lease_namespace: &str) {
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster().client(Identity::Admin).await, namespace);
    // A new environment each time: an earlier Expired status must not count.
    static PENDING: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let environment = format!(
        "pending-{}",
        PENDING.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let expires_at = put_short_lock(&api, &environment, Duration::seconds(3)).await;
    let expired = await_state(&api, &environment, LockState::Expired).await;
    let observed = Utc::now();
    eprintln!(
        "{namespace}/{environment}: Expired seen {} ms after expiresAt",
        (observed - expires_at).num_milliseconds()
    );
    assert!(
        observed >= expires_at,
        "marked Expired before {expires_at} (seen {observed})"
    );
    assert_eq!(
        expired.spec.holder.as_ref().map(|h| h.expires_at),
        Some(expires_at)
    );
    let clock = clock_lease_time(lease_namespace).await;
    assert!(
        clock.is_some_and(|clock| clock >= expires_at),
        "clock Lease {clock:?} behind the expiry {expires_at} after the Expired mark"
    );
}

/// The clock Lease's renewTime (deploylock-clock in `namespace`).
async fn clock_lease_time(namespace: &str) -> Option<DateTime<Utc>> {
    let leases: Api<Lease> = Api::namespaced(cluster().client(Identity::Admin).await, namespace);
    leases
        .get_opt("deploylock-clock")
        .await
        .ok()
        .flatten()
        .and_then(|lease| lease.spec)
        .and_then(|spec| spec.renew_time)
        .and_then(|time| deploylock::controller::clock::from_micro_time(&time))
}

/// Waits (on a watch) until the Lease `lease` is held by `identity`.
async fn await_holder(namespace: &str, lease: &str, identity: &str, within: StdDuration) {
    let leases: Api<Lease> = Api::namespaced(cluster().client(Identity::Admin).await, namespace);
    let identity = identity.to_string();
    let wanted = identity.clone();
    let condition = move |lease: Option<&Lease>| {
        lease
            .and_then(|lease| lease.spec.as_ref())
            .and_then(|spec| spec.holder_identity.as_ref())
            .is_some_and(|holder| *holder == wanted)
    };
    if let Err(err) = tokio::time::timeout(within, await_condition(leases, lease, condition)).await
    {
        panic!(
            "{identity} did not hold {lease} within {within:?} ({err}); holder: {:?}",
            lease_holder(namespace, lease).await
        );
    }
}

/// A kubeconfig like `identity`'s, with another server address and/or an
/// impersonated user (`as:`).
fn kubeconfig_variant(
    identity: Identity,
    name: &str,
    server: Option<&str>,
    impersonate: Option<&str>,
) -> std::path::PathBuf {
    let source = cluster().kubeconfig(identity);
    let text = std::fs::read_to_string(&source)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", source.display()));
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text)
        .unwrap_or_else(|err| panic!("{} is not YAML: {err}", source.display()));
    if let Some(server) = server
        && let Some(clusters) = config.get_mut("clusters").and_then(|c| c.as_sequence_mut())
    {
        for entry in clusters {
            if let Some(cluster) = entry.get_mut("cluster").and_then(|c| c.as_mapping_mut()) {
                cluster.insert("server".into(), server.into());
            }
        }
    }
    if let Some(user) = impersonate
        && let Some(users) = config.get_mut("users").and_then(|u| u.as_sequence_mut())
    {
        for entry in users {
            if let Some(auth) = entry.get_mut("user").and_then(|u| u.as_mapping_mut()) {
                auth.insert("as".into(), user.into());
            }
        }
    }
    let path = cluster()
        .dir()
        .join("kubeconfigs")
        .join(format!("{name}.kubeconfig"));
    let text = serde_yaml::to_string(&config).unwrap_or_else(|err| panic!("{err}"));
    if let Err(err) = std::fs::write(&path, text) {
        panic!("cannot write {}: {err}", path.display());
    }
    path
}

/// The API server's address, from the admin kubeconfig.
fn apiserver_address() -> std::net::SocketAddr {
    let text = std::fs::read_to_string(cluster().kubeconfig(Identity::Admin)).unwrap_or_default();
    let server = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("server: https://"))
        .unwrap_or_else(|| panic!("no server in the admin kubeconfig"));
    server
        .trim()
        .parse()
        .unwrap_or_else(|err| panic!("server address {server:?}: {err}"))
}

/// What the loopback proxy in front of the API server does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProxyMode {
    Forward,
    /// Forwards each chunk after this many milliseconds.
    Delay(u64),
    /// Accepts and holds connections, moves nothing (a silent server).
    Freeze,
    /// Closes every connection, accepts none (an unreachable server).
    Refuse,
}

/// A TCP proxy on loopback to the API server (TLS passes through; the
/// server's certificate names 127.0.0.1, so any port will do).
struct Proxy {
    port: u16,
    mode: tokio::sync::watch::Sender<ProxyMode>,
}

impl Proxy {
    async fn start() -> Proxy {
        let upstream = apiserver_address();
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(listener) => listener,
            Err(err) => panic!("cannot bind the proxy: {err}"),
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
        let (mode, modes) = tokio::sync::watch::channel(ProxyMode::Forward);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if *modes.borrow() == ProxyMode::Refuse {
                    drop(inbound);
                    continue;
                }
                let modes = modes.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (from_client, to_client) = inbound.into_split();
                    let (from_server, to_server) = outbound.into_split();
                    tokio::select! {
                        _ = pump(from_client, to_server, modes.clone()) => {}
                        _ = pump(from_server, to_client, modes) => {}
                    }
                });
            }
        });
        Proxy { port, mode }
    }

    fn set(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }

    fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut modes: tokio::sync::watch::Receiver<ProxyMode>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let mode = *modes.borrow_and_update();
        match mode {
            ProxyMode::Refuse => return,
            ProxyMode::Freeze => {
                if modes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                continue;
            }
            ProxyMode::Forward | ProxyMode::Delay(_) => {}
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = modes.changed() => continue,
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let ProxyMode::Delay(ms) = mode {
            tokio::time::sleep(StdDuration::from_millis(ms)).await;
        }
        // Frozen meanwhile: the data waits.
        loop {
            let now = *modes.borrow_and_update();
            match now {
                ProxyMode::Refuse => return,
                ProxyMode::Freeze => {
                    if modes.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                _ => break,
            }
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// Starts a leader through `proxy` and a standby directly; returns both once
/// the proxied one leads.
async fn proxied_leader_and_standby(namespace: &str, proxy: &Proxy) -> (Spawned, Spawned) {
    let kubeconfig = kubeconfig_variant(
        Identity::Controller,
        &format!("proxied-{namespace}"),
        Some(&proxy.server()),
        None,
    );
    let leader = Spawned::start(&kubeconfig, namespace, "leader", None, &LEASE_ARGS);
    await_holder(namespace, "leader", &leader.identity, WAIT).await;
    let standby = Spawned::start(
        &cluster().kubeconfig(Identity::Controller),
        namespace,
        "leader",
        None,
        &LEASE_ARGS,
    );
    (leader, standby)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_standby_waiting_for_leadership() {
    let cluster = cluster();
    let namespace = cluster.namespace("stop-standby").await;
    let kubeconfig = cluster.kubeconfig(Identity::Controller);
    let leader = Spawned::start(&kubeconfig, &namespace, "leader", None, &LEASE_ARGS);
    await_holder(&namespace, "leader", &leader.identity, WAIT).await;
    let mut standby = Spawned::start(&kubeconfig, &namespace, "leader", None, &LEASE_ARGS);
    // Waiting for leadership: it has read the Lease and said so.
    let waiting = tokio::time::timeout(WAIT, async {
        while !standby.log().contains("waiting for leadership") {
            tokio::time::sleep(StdDuration::from_millis(50)).await;
        }
    })
    .await;
    assert!(waiting.is_ok(), "standby never waited:\n{}", standby.log());
    let log_path = standby.log_path.clone();
    assert_stops_on_sigterm(&mut standby.child, || {
        std::fs::read_to_string(&log_path).unwrap_or_default()
    })
    .await;
    assert_eq!(
        lease_holder(&namespace, "leader").await.as_deref(),
        Some(leader.identity.as_str()),
        "the leader is untouched"
    );
    assert_pending_expiry_marked(&namespace, &namespace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_healthy_leader_and_the_standby_takes_over_at_once() {
    let cluster = cluster();
    let namespace = cluster.namespace("stop-leader").await;
    let kubeconfig = cluster.kubeconfig(Identity::Controller);
    let mut leader = Spawned::start(&kubeconfig, &namespace, "leader", None, &LEASE_ARGS);
    await_holder(&namespace, "leader", &leader.identity, WAIT).await;
    let standby = Spawned::start(&kubeconfig, &namespace, "leader", None, &LEASE_ARGS);
    let log_path = leader.log_path.clone();
    let stopped = std::time::Instant::now();
    assert_stops_on_sigterm(&mut leader.child, || {
        std::fs::read_to_string(&log_path).unwrap_or_default()
    })
    .await;
    // Released: the standby does not wait for the Lease to run out.
    await_holder(&namespace, "leader", &standby.identity, LEASE_DURATION).await;
    eprintln!("standby led {:?} after SIGTERM", stopped.elapsed());
    assert_pending_expiry_marked(&namespace, &namespace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_leader_whose_list_and_watch_keep_failing() {
    let cluster = cluster();
    let namespace = cluster.namespace("stop-failing-watch").await;
    // A user that may hold Leases here but not read DeploymentLocks: every
    // list of the watch is refused.
    let user = format!("nolist-{namespace}");
    cluster.grant(
        &namespace,
        "leases-only",
        json!([{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                "verbs": ["get", "list", "watch", "create", "update", "patch"]}]),
        json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]),
    );
    let kubeconfig = kubeconfig_variant(
        Identity::Admin,
        &format!("nolist-{namespace}"),
        None,
        Some(&user),
    );
    let mut leader = Spawned::start(&kubeconfig, &namespace, "leader", None, &LEASE_ARGS);
    await_holder(&namespace, "leader", &leader.identity, WAIT).await;
    let failing = tokio::time::timeout(WAIT, async {
        while !leader.log().contains("watching DeploymentLocks failed") {
            tokio::time::sleep(StdDuration::from_millis(50)).await;
        }
    })
    .await;
    assert!(failing.is_ok(), "the watch did not fail:\n{}", leader.log());
    let standby = Spawned::start(
        &cluster.kubeconfig(Identity::Controller),
        &namespace,
        "leader",
        None,
        &LEASE_ARGS,
    );
    let log_path = leader.log_path.clone();
    assert_stops_on_sigterm(&mut leader.child, || {
        std::fs::read_to_string(&log_path).unwrap_or_default()
    })
    .await;
    await_holder(&namespace, "leader", &standby.identity, LEASE_DURATION).await;
    assert_pending_expiry_marked(&namespace, &namespace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_leader_whose_server_went_silent() {
    let cluster = cluster();
    let namespace = cluster.namespace("stop-silent").await;
    let proxy = Proxy::start().await;
    let (mut leader, standby) = proxied_leader_and_standby(&namespace, &proxy).await;
    // Every request of the leader hangs from now on, the watch's included.
    proxy.set(ProxyMode::Freeze);
    let log_path = leader.log_path.clone();
    assert_stops_on_sigterm(&mut leader.child, || {
        std::fs::read_to_string(&log_path).unwrap_or_default()
    })
    .await;
    // It could not release: the standby takes over when the Lease runs out.
    await_holder(&namespace, "leader", &standby.identity, LEASE_DURATION * 2).await;
    assert_pending_expiry_marked(&namespace, &namespace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_leader_that_cannot_reach_the_server() {
    let cluster = cluster();
    let namespace = cluster.namespace("stop-unreachable").await;
    let proxy = Proxy::start().await;
    let (mut leader, standby) = proxied_leader_and_standby(&namespace, &proxy).await;
    proxy.set(ProxyMode::Refuse);
    let failing = tokio::time::timeout(WAIT, async {
        while !leader.log().contains("cannot read the Lease") {
            tokio::time::sleep(StdDuration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        failing.is_ok(),
        "the leader did not notice:\n{}",
        leader.log()
    );
    let log_path = leader.log_path.clone();
    assert_stops_on_sigterm(&mut leader.child, || {
        std::fs::read_to_string(&log_path).unwrap_or_default()
    })
    .await;
    await_holder(&namespace, "leader", &standby.identity, LEASE_DURATION * 2).await;
    assert_pending_expiry_marked(&namespace, &namespace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_leader_with_reconciles_in_flight() {
    let cluster = cluster();
    let namespace = cluster.namespace("stop-in-flight").await;
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let proxy = Proxy::start().await;
    let (mut leader, standby) = proxied_leader_and_standby(&namespace, &proxy).await;
    // Twenty locks expiring together; every request of the leader takes
    // about a second from now on, so their reconciles are under way when
    // SIGTERM comes.
    let mut expiries = Vec::new();
    for n in 0..20 {
        expiries.push(put_short_lock(&api, &format!("env-{n}"), Duration::seconds(4)).await);
    }
    proxy.set(ProxyMode::Delay(500));
    let last = expiries.iter().max().copied().unwrap_or_else(Utc::now);
    let until = (last - Utc::now()).to_std().unwrap_or_default() + StdDuration::from_millis(300);
    tokio::time::sleep(until).await;
    let log_path = leader.log_path.clone();
    assert_stops_on_sigterm(&mut leader.child, || {
        std::fs::read_to_string(&log_path).unwrap_or_default()
    })
    .await;
    await_holder(&namespace, "leader", &standby.identity, LEASE_DURATION * 2).await;
    for (n, expires_at) in expiries.iter().enumerate() {
        await_state(&api, &format!("env-{n}"), LockState::Expired).await;
        assert!(Utc::now() >= *expires_at);
    }
    assert_pending_expiry_marked(&namespace, &namespace).await;
}

/// libfaketime must be present and effective, or the skew tests prove nothing.
fn assert_faketime_shifts(offset: &str, expected_seconds: i64) {
    let probe = std::process::Command::new("faketime")
        .args(["-f", offset, "date", "+%s"])
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .output()
        .unwrap_or_else(|err| {
            panic!("cannot run `faketime` ({err}): hack/ensure-deps.sh installs libfaketime")
        });
    let faked: i64 = String::from_utf8_lossy(&probe.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("faketime date printed {:?}", probe));
    let skew = faked - Utc::now().timestamp();
    assert!(
        (expected_seconds - 100..=expected_seconds + 100).contains(&skew),
        "faketime -f {offset} shifted the clock by {skew}s"
    );
}

/// Asserts that `identity` keeps the Lease for `period` (watched: any change
/// of holder fails at once).
async fn assert_keeps_lease(namespace: &str, lease: &str, identity: &str, period: StdDuration) {
    let leases: Api<Lease> = Api::namespaced(cluster().client(Identity::Admin).await, namespace);
    let keeper = identity.to_string();
    let condition = move |lease: Option<&Lease>| {
        lease
            .and_then(|lease| lease.spec.as_ref())
            .and_then(|spec| spec.holder_identity.as_ref())
            .is_none_or(|holder| *holder != keeper)
    };
    let changed = tokio::time::timeout(period, await_condition(leases, lease, condition)).await;
    if let Ok(result) = changed {
        panic!("{identity} lost the Lease while healthy: {result:?}");
    }
}

/// Skewed replicas (wall clock 1 h ahead, 1 h behind) as leader: they mark
/// an expiry at its instant (not an hour early, not an hour late), keep the
/// Lease against a healthy standby, and are replaced when killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_leader_marks_expiries_at_their_instant_and_is_replaced_when_killed() {
    for (offset, seconds, name) in [("+1h", 3600, "ahead"), ("-1h", -3600, "behind")] {
        assert_faketime_shifts(offset, seconds);
        let cluster = cluster();
        let namespace = cluster.namespace(&format!("skew-leader-{name}")).await;
        let kubeconfig = cluster.kubeconfig(Identity::Controller);
        let mut leader =
            Spawned::start(&kubeconfig, &namespace, "leader", Some(offset), &LEASE_ARGS);
        assert_clock_skewed(&leader, seconds).await;
        await_holder(&namespace, "leader", &leader.identity, WAIT).await;
        let standby = Spawned::start(&kubeconfig, &namespace, "leader", None, &LEASE_ARGS);
        assert_pending_expiry_marked(&namespace, &namespace).await;
        assert_keeps_lease(&namespace, "leader", &leader.identity, LEASE_DURATION * 2).await;
        assert_eq!(
            lease_holder(&namespace, "leader").await.as_deref(),
            Some(leader.identity.as_str()),
            "{name}: the skewed leader marked the expiry"
        );
        let killed = std::time::Instant::now();
        leader.signal("KILL");
        let _ = leader.child.wait();
        // Within the Lease duration of the last renewal the standby saw, plus
        // the one renew period (1 s) it may have taken to see it.
        await_holder(
            &namespace,
            "leader",
            &standby.identity,
            LEASE_DURATION + StdDuration::from_secs(2),
        )
        .await;
        eprintln!(
            "{name}: killed leader replaced after {:?}",
            killed.elapsed()
        );
        assert_pending_expiry_marked(&namespace, &namespace).await;
    }
}

/// Skewed replicas as standby: they never depose a healthy leader, and take
/// over from a killed one within the Lease duration, marking the pending
/// expiry at its instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_standby_never_deposes_a_healthy_leader_and_replaces_a_killed_one() {
    for (offset, seconds, name) in [("+1h", 3600, "ahead"), ("-1h", -3600, "behind")] {
        assert_faketime_shifts(offset, seconds);
        let cluster = cluster();
        let namespace = cluster.namespace(&format!("skew-standby-{name}")).await;
        let kubeconfig = cluster.kubeconfig(Identity::Controller);
        let mut leader = Spawned::start(&kubeconfig, &namespace, "leader", None, &LEASE_ARGS);
        await_holder(&namespace, "leader", &leader.identity, WAIT).await;
        let standby = Spawned::start(&kubeconfig, &namespace, "leader", Some(offset), &LEASE_ARGS);
        assert_clock_skewed(&standby, seconds).await;
        let waiting = tokio::time::timeout(WAIT, async {
            while !standby.log().contains("waiting for leadership") {
                tokio::time::sleep(StdDuration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            waiting.is_ok(),
            "{name}: standby never waited:\n{}",
            standby.log()
        );
        assert_keeps_lease(&namespace, "leader", &leader.identity, LEASE_DURATION * 2).await;
        let api: Api<DeploymentLock> =
            Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
        let expires_at = put_short_lock(&api, "production", Duration::seconds(8)).await;
        await_state(&api, "production", LockState::Locked).await;
        let killed = std::time::Instant::now();
        leader.signal("KILL");
        let _ = leader.child.wait();
        await_holder(
            &namespace,
            "leader",
            &standby.identity,
            LEASE_DURATION + StdDuration::from_secs(2),
        )
        .await;
        eprintln!(
            "{name}: killed leader replaced after {:?}",
            killed.elapsed()
        );
        let expired = await_state(&api, "production", LockState::Expired).await;
        assert!(
            Utc::now() >= expires_at,
            "{name}: marked before {expires_at}"
        );
        assert!(expired.spec.holder.is_some());
        let clock = clock_lease_time(&namespace).await;
        assert!(
            clock.is_some_and(|clock| clock >= expires_at && clock <= Utc::now()),
            "{name}: clock Lease {clock:?}, expiry {expires_at}"
        );
        assert_pending_expiry_marked(&namespace, &namespace).await;
    }
}

/// One `GET` of the clock Lease, bracketed: its renewTime, the Date of the
/// answer and the local instant it arrived.
async fn bracketed_clock_read(
    client: &kube::Client,
    namespace: &str,
) -> (DateTime<Utc>, DateTime<Utc>, tokio::time::Instant) {
    let request = http::Request::get(format!(
        "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/deploylock-clock"
    ))
    .body(kube::client::Body::empty())
    .unwrap_or_else(|err| panic!("{err}"));
    let response = client
        .send(request)
        .await
        .unwrap_or_else(|err| panic!("cannot read the clock Lease: {err}"));
    let received = tokio::time::Instant::now();
    let date = response
        .headers()
        .get(http::header::DATE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| DateTime::parse_from_rfc2822(value).ok())
        .map(|time| time.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("no Date header"));
    let bytes = response
        .into_body()
        .collect_bytes()
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let lease: Lease = serde_json::from_slice(&bytes)
        .unwrap_or_else(|err| panic!("not a Lease ({err}): {}", String::from_utf8_lossy(&bytes)));
    let renew = lease
        .spec
        .and_then(|spec| spec.renew_time)
        .and_then(|time| deploylock::controller::clock::from_micro_time(&time))
        .unwrap_or_else(|| panic!("the clock Lease has no renewTime"));
    (renew, date, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clock_lease_never_runs_ahead_of_the_server_and_moves_every_second() {
    let cluster = cluster();
    let namespace = cluster.namespace("clock-lease").await;
    let _controller = cluster.spawn_controller(&namespace, "clock", &[]);
    let leases: Api<Lease> = Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let created = tokio::time::timeout(
        WAIT,
        await_condition(
            leases.clone(),
            "deploylock-clock",
            |lease: Option<&Lease>| lease.is_some(),
        ),
    )
    .await;
    assert!(matches!(created, Ok(Ok(_))), "no clock Lease: {created:?}");

    // The test's own measurement of the server's clock, to the millisecond.
    let client = cluster.client(Identity::Admin).await;
    let server = deploylock::servertime::ServerClock::new(client.clone())
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    server
        .refine(deploylock::servertime::MAX_PROBES)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let uncertainty = server.uncertainty(tokio::time::Instant::now());
    eprintln!("test's measurement of the server clock: ±{uncertainty:?}");

    let mut values = Vec::new();
    let window = tokio::time::Instant::now() + StdDuration::from_secs(6);
    while tokio::time::Instant::now() < window {
        let (renew, date, received) = bracketed_clock_read(&client, &namespace).await;
        // The server answered at a time in [Date, Date + 1 s); the Lease
        // was written before.
        assert!(
            renew < date + Duration::seconds(1),
            "renewTime {renew} ahead of the server's clock (Date {date})"
        );
        let upper = server.upper_bound(received);
        assert!(
            renew <= upper,
            "renewTime {renew} ahead of the server's clock (at most {upper})"
        );
        if values.last() != Some(&renew) {
            assert!(
                values.last().is_none_or(|last| *last < renew),
                "renewTime went back: {values:?} then {renew}"
            );
            values.push(renew);
        }
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    // About one write a second: a handful of distinct values in 6 s.
    assert!(values.len() >= 4, "renewTime moved only {values:?}");
}

#[tokio::test]
async fn a_lock_in_a_terminating_namespace_is_still_expired() {
    let cluster = cluster();
    let namespace = cluster.namespace("terminating").await;
    let _controller = cluster.spawn_controller(&namespace, "terminating", &[]);
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let leases: Api<Lease> = Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let clock = tokio::time::timeout(
        WAIT,
        await_condition(leases, "deploylock-clock", |lease: Option<&Lease>| {
            lease.is_some()
        }),
    )
    .await;
    assert!(matches!(clock, Ok(Ok(_))), "no clock Lease: {clock:?}");
    let expires_at = put_short_lock(&api, "production", Duration::seconds(4)).await;
    await_state(&api, "production", LockState::Locked).await;
    // This control plane has no namespace controller: the namespace stays
    // Terminating, and the API server refuses every new object in it
    // (Events included) while updates go through.
    let deleted = cluster.kubectl(
        Identity::Admin,
        &["delete", "namespace", &namespace, "--wait=false"],
    );
    assert!(
        deleted.status.success(),
        "{}",
        String::from_utf8_lossy(&deleted.stderr)
    );
    let expired = await_state(&api, "production", LockState::Expired).await;
    assert!(Utc::now() >= expires_at);
    assert!(expired.spec.holder.is_some());
    let reasons = event_reasons(&namespace, "production").await;
    assert!(
        !reasons.contains(&"Expired".to_string()),
        "the namespace was not terminating: {reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_lock_does_not_stop_the_others() {
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceDefinition, CustomResourceValidation, JSONSchemaProps,
    };
    use kube::CustomResourceExt;
    use kube::api::{ApiResource, DynamicObject};

    // A control plane of its own: its CRD admits anything, as an older and
    // looser schema did, so an object the Rust types cannot read is stored.
    let extra = crate::support::ExtraCluster::start("malformed");
    let client = crate::support::client_from(&extra.admin_kubeconfig())
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let mut crd = DeploymentLock::crd();
    for version in &mut crd.spec.versions {
        version.schema = Some(CustomResourceValidation {
            open_api_v3_schema: Some(JSONSchemaProps {
                type_: Some("object".into()),
                x_kubernetes_preserve_unknown_fields: Some(true),
                ..Default::default()
            }),
        });
        version.additional_printer_columns = None;
        version.selectable_fields = None;
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.create(&PostParams::default(), &crd)
        .await
        .unwrap_or_else(|err| panic!("cannot create the loose CRD: {err}"));
    let established = tokio::time::timeout(
        WAIT,
        await_condition(
            crds,
            &name,
            kube::runtime::wait::conditions::is_crd_established(),
        ),
    )
    .await;
    assert!(matches!(established, Ok(Ok(_))), "{established:?}");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut team = Namespace::default();
    team.metadata.name = Some("team".into());
    namespaces
        .create(&PostParams::default(), &team)
        .await
        .unwrap_or_else(|err| panic!("{err}"));

    let api: Api<DeploymentLock> = Api::namespaced(client.clone(), "team");
    // The CRD may not be served yet for a moment after Established.
    let mut expires_at = None;
    for _ in 0..50 {
        let attempt = tokio::spawn({
            let api = api.clone();
            async move { put_short_lock_checked(&api, "production", Duration::seconds(4)).await }
        })
        .await;
        if let Ok(Ok(at)) = attempt {
            expires_at = Some(at);
            break;
        }
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    let Some(expires_at) = expires_at else {
        panic!("cannot write a lock in the second control plane")
    };
    // A copy with a date-time Rust does not parse.
    let resource = ApiResource::erase::<DeploymentLock>(&());
    let dynamic: Api<DynamicObject> = Api::namespaced_with(client.clone(), "team", &resource);
    let mut broken = dynamic
        .get("production")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    broken.metadata = kube::core::ObjectMeta {
        name: Some("broken".into()),
        ..Default::default()
    };
    broken.data["spec"]["environment"] = json!("broken");
    broken.data["spec"]["holder"]["expiresAt"] = json!("2030-01-01T00:00:00ZT");
    dynamic
        .create(&PostParams::default(), &broken)
        .await
        .unwrap_or_else(|err| panic!("cannot store the malformed lock: {err}"));

    let controller = Spawned::start(&extra.admin_kubeconfig(), "team", "leader", None, &[]);
    let expired = tokio::time::timeout(
        WAIT,
        await_condition(
            api.clone(),
            "production",
            |lock: Option<&DeploymentLock>| {
                lock.and_then(|lock| lock.status.as_ref())
                    .and_then(|status| status.state)
                    == Some(LockState::Expired)
            },
        ),
    )
    .await;
    assert!(
        matches!(expired, Ok(Ok(Some(_)))),
        "the good lock was not reconciled: {expired:?}\n{}",
        controller.log()
    );
    assert!(Utc::now() >= expires_at);
    // Reported once, by name: log, Warning Event, metric.
    let events: Api<Event> = Api::namespaced(client.clone(), "team");
    let reported = tokio::time::timeout(WAIT, async {
        loop {
            let list = events.list(&ListParams::default()).await.map(|l| l.items);
            if let Ok(list) = list
                && let Some(event) = list.into_iter().find(|event| {
                    event.reason.as_deref() == Some("Malformed")
                        && event.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some("broken")
                })
            {
                return event;
            }
            tokio::time::sleep(StdDuration::from_millis(100)).await;
        }
    })
    .await;
    let event = reported.unwrap_or_else(|_| panic!("no Malformed event:\n{}", controller.log()));
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let metrics = controller.metrics();
    assert!(
        metrics.contains(r#"deploylock_malformed_locks{namespace="team",name="broken"} 1"#),
        "{metrics}"
    );
    let log = controller.log();
    assert_eq!(
        log.matches("malformed DeploymentLock skipped").count(),
        1,
        "{log}"
    );
    assert!(log.contains("broken"), "{log}");
}

/// `put_short_lock`, returning errors instead of panicking (for a CRD that
/// is not served yet).
async fn put_short_lock_checked(
    api: &Api<DeploymentLock>,
    environment: &str,
    expires_in: Duration,
) -> Result<DateTime<Utc>, kube::Error> {
    api.get_opt(environment).await?;
    Ok(put_short_lock(api, environment, expires_in).await)
}

/// After an API server restart the watch resumes within seconds (a lock
/// written after the restart expires at its instant), the leader neither
/// exits nor loses its place for good, and nothing retries in a hot loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_rides_out_an_api_server_restart() {
    // A control plane of its own: the restart must not disturb other tests.
    let extra = crate::support::ExtraCluster::start("restart");
    let client = crate::support::client_from(&extra.admin_kubeconfig())
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    crate::support::install_crd(&client)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let mut team = k8s_openapi::api::core::v1::Namespace::default();
    team.metadata.name = Some("team".into());
    namespaces
        .create(&PostParams::default(), &team)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let api: Api<DeploymentLock> = Api::namespaced(client.clone(), "team");
    let mut controller = Spawned::start(
        &extra.admin_kubeconfig(),
        "team",
        "leader",
        None,
        &LEASE_ARGS,
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), "team");
    let identity = controller.identity.clone();
    let leading = tokio::time::timeout(
        WAIT,
        await_condition(leases, "leader", move |lease: Option<&Lease>| {
            lease
                .and_then(|l| l.spec.as_ref())
                .and_then(|s| s.holder_identity.as_ref())
                == Some(&identity)
        }),
    )
    .await;
    assert!(
        matches!(leading, Ok(Ok(_))),
        "{leading:?}\n{}",
        controller.log()
    );
    let expired = |environment: &'static str| {
        let api = api.clone();
        async move {
            tokio::time::timeout(
                WAIT,
                await_condition(api, environment, |lock: Option<&DeploymentLock>| {
                    lock.and_then(|lock| lock.status.as_ref())
                        .and_then(|status| status.state)
                        == Some(LockState::Expired)
                }),
            )
            .await
        }
    };
    put_short_lock(&api, "before", Duration::seconds(2)).await;
    let before = expired("before").await;
    assert!(
        matches!(before, Ok(Ok(Some(_)))),
        "{before:?}\n{}",
        controller.log()
    );

    // Kill the API server; its supervisor starts it again.
    let pid = std::fs::read_to_string(extra.dir.join("apiserver.pid"))
        .unwrap_or_else(|err| panic!("no apiserver.pid: {err}"));
    send_signal(
        pid.trim().parse().unwrap_or_else(|err| panic!("{err}")),
        "KILL",
    );
    let back = tokio::time::timeout(WAIT, async {
        loop {
            if client.apiserver_version().await.is_ok()
                && api.list(&ListParams::default()).await.is_ok()
            {
                return;
            }
            tokio::time::sleep(StdDuration::from_millis(100)).await;
        }
    })
    .await;
    assert!(back.is_ok(), "the API server did not come back");

    let expires_at = put_short_lock(&api, "after", Duration::seconds(3)).await;
    // Within seconds, not the minute of a backed-off watch.
    let after = tokio::time::timeout(StdDuration::from_secs(20), expired("after")).await;
    let observed = Utc::now();
    assert!(
        matches!(after, Ok(Ok(Ok(Some(_))))),
        "not Expired within 20 s of a restart: {after:?}\n{}",
        controller.log()
    );
    eprintln!(
        "after the restart: Expired seen {} ms after expiresAt",
        (observed - expires_at).num_milliseconds()
    );
    assert!(observed >= expires_at);
    assert!(
        matches!(controller.child.try_wait(), Ok(None)),
        "the controller exited:\n{}",
        controller.log()
    );
    let log = controller.log();
    let warnings = log.matches("reconcile failed").count();
    assert!(
        warnings < 20,
        "{warnings} reconcile failures logged:\n{log}"
    );
}

/// A 10 s outage between the leader and the API server (default Lease
/// timing: 15 s) neither stops the leader nor lets the standby take over;
/// afterwards it leads and reconciles as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_second_outage_neither_stops_nor_deposes_the_leader() {
    let cluster = cluster();
    let namespace = cluster.namespace("outage").await;
    let proxy = Proxy::start().await;
    let kubeconfig = kubeconfig_variant(
        Identity::Controller,
        &format!("proxied-{namespace}"),
        Some(&proxy.server()),
        None,
    );
    let mut leader = Spawned::start(&kubeconfig, &namespace, "leader", None, &[]);
    await_holder(&namespace, "leader", &leader.identity, WAIT).await;
    let standby = Spawned::start(
        &cluster.kubeconfig(Identity::Controller),
        &namespace,
        "leader",
        None,
        &[],
    );
    let waiting = tokio::time::timeout(WAIT, async {
        while !standby.log().contains("waiting for leadership") {
            tokio::time::sleep(StdDuration::from_millis(50)).await;
        }
    })
    .await;
    assert!(waiting.is_ok(), "standby never waited:\n{}", standby.log());
    let outage = StdDuration::from_secs(10);
    proxy.set(ProxyMode::Refuse);
    let watched = assert_keeps_lease(&namespace, "leader", &leader.identity, outage);
    watched.await;
    proxy.set(ProxyMode::Forward);
    assert!(
        matches!(leader.child.try_wait(), Ok(None)),
        "the leader exited:\n{}",
        leader.log()
    );
    assert!(
        leader.log().contains("cannot read the Lease"),
        "no outage seen:\n{}",
        leader.log()
    );
    // Past the outage: still the holder a Lease duration later, and reconciling.
    assert_keeps_lease(
        &namespace,
        "leader",
        &leader.identity,
        StdDuration::from_secs(16),
    )
    .await;
    assert_pending_expiry_marked(&namespace, &namespace).await;
    assert!(matches!(leader.child.try_wait(), Ok(None)));
}

/// The controller's text log has colour only on a terminal: its stderr in
/// a file or a pipe gets no escape codes.
#[tokio::test]
async fn text_log_has_no_colour_codes_off_a_terminal() {
    use std::io::{BufRead, BufReader};
    let cluster = cluster();
    let namespace = cluster.namespace("controller-log-text").await;
    let mut child = std::process::Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--"])
        .arg(env!("CARGO_BIN_EXE_deploylock-controller"))
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig(Identity::Controller))
        .args(["--namespace", &namespace])
        .args(["--lease-namespace", &namespace])
        .args(["--lease-name", "log-text"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(["--log-format", "text"])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start deploylock-controller: {err}"));
    let stderr = child
        .stderr
        .take()
        .unwrap_or_else(|| panic!("stderr not piped"));
    // The first lines it logs (a blocking read: no sleep).
    let lines: Vec<String> = BufReader::new(stderr)
        .lines()
        .take(2)
        .map(|line| line.unwrap_or_else(|err| panic!("cannot read the log: {err}")))
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    assert!(!lines.is_empty(), "the controller logged nothing");
    for line in &lines {
        assert!(
            !line.contains('\u{1b}'),
            "colour codes in the log: {line:?}"
        );
        assert!(line.contains("INFO") || line.contains("WARN"), "{line}");
    }
}

/// The controller's `/readyz` status code (0 when it does not answer).
fn readyz(controller: &crate::support::ControllerProcess) -> u16 {
    let output = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{}/readyz", controller.port),
        ])
        .output();
    output
        .ok()
        .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// Polls `/readyz` until it answers `code` (an HTTP probe has no watch).
async fn await_readyz(
    controller: &crate::support::ControllerProcess,
    code: u16,
    limit: StdDuration,
) {
    let deadline = tokio::time::Instant::now() + limit;
    while readyz(controller) != code {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz did not answer {code} within {limit:?}"
        );
        tokio::time::sleep(StdDuration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_replica_is_ready_only_while_the_clock_lease_is_current() {
    let cluster = cluster();
    let namespace = cluster.namespace("readiness").await;
    let leases: Api<Lease> = Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let now = Utc::now();
    let micro = |at: DateTime<Utc>| deploylock::controller::clock::micro_time(at);
    // A leader that went silent just now, with a long Lease: the replica
    // started below stays a standby, and nobody keeps the clock, which
    // was last written two minutes ago.
    let leader: Lease = serde_json::from_value(json!({
        "metadata": {"name": "readiness"},
        "spec": {"holderIdentity": "gone", "leaseDurationSeconds": 600,
                 "acquireTime": micro(now), "renewTime": micro(now)}
    }))
    .expect("a Lease");
    let stale_clock: Lease = serde_json::from_value(json!({
        "metadata": {"name": "readiness-clock"},
        "spec": {"holderIdentity": "gone", "renewTime": micro(now - Duration::seconds(120))}
    }))
    .expect("a Lease");
    for lease in [&leader, &stale_clock] {
        leases
            .create(&PostParams::default(), lease)
            .await
            .expect("create a Lease");
    }
    let controller = cluster.spawn_controller(
        &namespace,
        "readiness",
        &["--clock-lease-name", "readiness-clock"],
    );
    // Serving (healthy), but not ready: the clock is two minutes old.
    await_readyz(&controller, 503, StdDuration::from_secs(60)).await;
    assert_eq!(
        lease_holder(&namespace, "readiness").await.as_deref(),
        Some("gone")
    );
    // Someone keeps the clock: ready.
    let patch = json!({"spec": {"renewTime": micro(Utc::now())}});
    leases
        .patch(
            "readiness-clock",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .expect("advance the clock Lease");
    await_readyz(&controller, 200, StdDuration::from_secs(30)).await;
    // Nobody does any more: not ready once it is 30 s old.
    await_readyz(&controller, 503, StdDuration::from_secs(60)).await;
    assert_eq!(
        lease_holder(&namespace, "readiness").await.as_deref(),
        Some("gone"),
        "still a standby"
    );
}
