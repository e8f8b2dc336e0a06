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

use crate::support::{ControllerProcess, Identity, cluster};

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
    });
    let patch = json!({
        "apiVersion": "deploylock.dev/v1",
        "kind": "DeploymentLock",
        "metadata": { "name": environment },
        "spec": spec,
    });
    if let Err(err) = api
        .patch(
            environment,
            &PatchParams::apply("deploylock-tests").force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        panic!("cannot write {environment}: {err}");
    }
    expires_at
}

async fn await_state(
    api: &Api<DeploymentLock>,
    environment: &str,
    state: LockState,
) -> DeploymentLock {
    let condition = move |lock: Option<&DeploymentLock>| {
        lock.and_then(|lock| lock.status.as_ref())
            .and_then(|status| status.state)
            == Some(state)
    };
    match tokio::time::timeout(WAIT, await_condition(api.clone(), environment, condition)).await {
        Ok(Ok(Some(lock))) => lock,
        other => panic!("{environment} did not become {state}: {other:?}"),
    }
}

/// Waits until the controller has announced every history entry.
async fn await_events_announced(api: &Api<DeploymentLock>, environment: &str) -> DeploymentLock {
    let condition = |lock: Option<&DeploymentLock>| {
        lock.is_some_and(|lock| {
            let last = lock.spec.history.last().map_or(0, |entry| entry.sequence);
            lock.status
                .as_ref()
                .and_then(|status| status.last_event_sequence)
                == Some(last)
        })
    };
    match tokio::time::timeout(WAIT, await_condition(api.clone(), environment, condition)).await {
        Ok(Ok(Some(lock))) => lock,
        other => panic!("events of {environment} were not announced: {other:?}"),
    }
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

/// Waits (on a watch) until the Lease is held by one of `candidates`.
async fn await_leader(namespace: &str, lease: &str, candidates: &[&ControllerProcess]) -> String {
    let leases: Api<Lease> = Api::namespaced(cluster().client(Identity::Admin).await, namespace);
    let identities: Vec<String> = candidates.iter().map(|c| c.identity()).collect();
    let condition = move |lease: Option<&Lease>| {
        lease
            .and_then(|lease| lease.spec.as_ref())
            .and_then(|spec| spec.holder_identity.as_ref())
            .is_some_and(|holder| identities.contains(holder))
    };
    match tokio::time::timeout(WAIT, await_condition(leases, lease, condition)).await {
        Ok(Ok(Some(lease))) => lease
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default(),
        other => panic!("no leader for {lease}: {other:?}"),
    }
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
    assert_eq!(
        row.get(1..4),
        Some(&["production", "Locked", "bob"][..]),
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
    let lease_args = ["--lease-duration", "6", "--lease-grace", "2"];
    let first = cluster.spawn_controller(&namespace, "leader", &lease_args);
    let second = cluster.spawn_controller(&namespace, "leader", &lease_args);
    let leader = await_leader(&namespace, "leader", &[&first, &second]).await;
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
    let new_leader = await_leader(&namespace, "leader", &[&standby]).await;
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
    let _ = await_leader(&namespace, "leader", &[&third]).await;
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
