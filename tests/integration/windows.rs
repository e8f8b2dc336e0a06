//! Freeze windows on the real control plane: the controller takes a window's
//! locks at its start as deploylock:freeze-windows (type scheduled), queues
//! behind a holder or overrides it as the window says, and its holdings end
//! at the window's end; a restarted controller does not take them twice; an
//! admin's --force overrides a window; the API server refuses bad windows
//! and scheduled holdings by anyone else.

use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use deploylock::crd::{DeploymentLock, HistoryAction, LockType};
use deploylock::windows::{FreezeWindow, WINDOW_HOLDER};
use kube::CustomResourceExt;
use kube::api::Api;
use serde_json::json;

use crate::support::{
    Identity, TestCluster, await_object, cluster, expect_exit, holder_of, locks_api, stderr_of,
    stored,
};

static CRD: OnceLock<Result<(), String>> = OnceLock::new();

/// The FreezeWindow CRD, generated from the Rust types, once per run.
fn install_window_crd() {
    let result = CRD.get_or_init(|| cluster().apply_crd_blocking(FreezeWindow::crd()));
    if let Err(err) = result {
        panic!("cannot install the FreezeWindow CRD: {err}");
    }
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A one-off window from `start` for `seconds`, as JSON.
fn one_off(
    name: &str,
    start: DateTime<Utc>,
    seconds: i64,
    environments: &[&str],
    when_held: &str,
) -> serde_json::Value {
    json!({
        "apiVersion": "deploylock.dev/v1",
        "kind": "FreezeWindow",
        "metadata": {"name": name},
        "spec": {
            "start": rfc3339(start),
            "end": rfc3339(start + chrono::Duration::seconds(seconds)),
            "environments": environments,
            "reason": format!("Freeze {name}"),
            "whenHeld": when_held,
        }
    })
}

fn apply_window(cluster: &TestCluster, namespace: &str, window: &serde_json::Value) {
    let output = cluster.kubectl_with_input(
        Identity::Admin,
        &["apply", "-n", namespace, "-f", "-"],
        &window.to_string(),
    );
    expect_exit(&output, 0, "kubectl apply the FreezeWindow");
}

/// How long a window test waits for the controller (an opening starts at
/// the next whole minute).
const WAIT: Duration = Duration::from_secs(120);

async fn await_lock(
    api: &Api<DeploymentLock>,
    environment: &str,
    what: &str,
    condition: impl Fn(&DeploymentLock) -> bool,
) -> DeploymentLock {
    await_object(api, environment, what, WAIT, condition).await
}

fn held_by_window(lock: &DeploymentLock) -> bool {
    lock.spec
        .holder
        .as_ref()
        .is_some_and(|holder| holder.user == WINDOW_HOLDER)
}

fn window_entries(lock: &DeploymentLock) -> usize {
    lock.spec
        .history
        .iter()
        .filter(|entry| entry.by == WINDOW_HOLDER && entry.action != HistoryAction::Extended)
        .count()
}

async fn await_window(
    api: &Api<FreezeWindow>,
    name: &str,
    what: &str,
    condition: impl Fn(&FreezeWindow) -> bool,
) -> FreezeWindow {
    await_object(api, name, what, WAIT, condition).await
}

#[tokio::test]
async fn a_window_takes_its_locks_at_its_start_queues_behind_a_holder_and_ends_at_its_end() {
    install_window_crd();
    let cluster = cluster();
    let ns = cluster.enforced_namespace("window-open").await;
    let deploylock = |identity: Identity, args: &[&str]| cluster.deploylock(identity, &ns, args);
    let controller = cluster.spawn_controller(&ns, "window-open", &[]);
    let locks = locks_api(cluster, &ns).await;
    let windows: Api<FreezeWindow> = Api::namespaced(cluster.client(Identity::Admin).await, &ns);

    // bob holds staging when the window opens.
    expect_exit(
        &deploylock(
            Identity::Bob,
            &["acquire", "-e", "staging", "--reason", "Deploying 2.1.0"],
        ),
        0,
        "bob holds staging",
    );
    let start = Utc::now() + chrono::Duration::seconds(8);
    let start = DateTime::from_timestamp(start.timestamp(), 0).unwrap_or(start);
    let end = start + chrono::Duration::seconds(120);
    apply_window(
        cluster,
        &ns,
        &one_off(
            "release-freeze",
            start,
            120,
            &["production", "staging"],
            "Queue",
        ),
    );

    // At its start, production is the window's.
    let production = await_lock(&locks, "production", "held by the window", held_by_window).await;
    let holder = holder_of(&production);
    assert!(
        holder.acquired_at >= start,
        "taken before the start: {holder:?}"
    );
    assert!(
        holder.expires_at <= end && holder.expires_at > end - chrono::Duration::seconds(1),
        "a window's holding ends at its end ({end}): {holder:?}"
    );
    assert_eq!(holder.lock_type, LockType::Scheduled);
    assert_eq!(holder.owner, "release-freeze");
    assert_eq!(holder.reason, "Freeze release-freeze");
    let frozen_id = holder.lock_id.clone();

    // Staging: the window waits at the head of the queue behind bob.
    let opened = await_window(&windows, "release-freeze", "open", |window| {
        window
            .status
            .as_ref()
            .is_some_and(|status| status.open.is_some())
    })
    .await;
    let outcomes = opened
        .status
        .and_then(|status| status.open)
        .map(|open| open.environments)
        .unwrap_or_default();
    let outcome_of = |name: &str| {
        outcomes
            .iter()
            .find(|entry| entry.name == name)
            .map(|entry| entry.outcome.clone())
    };
    assert_eq!(outcome_of("production").as_deref(), Some("Held"));
    assert_eq!(outcome_of("staging").as_deref(), Some("Queued"));

    // Others are refused while it is frozen, with the window named.
    let refused = deploylock(
        Identity::Alice,
        &["acquire", "-e", "production", "--reason", "Deploying 2.2.0"],
    );
    expect_exit(&refused, 3, "alice acquires a frozen environment");
    assert!(
        stderr_of(&refused).contains("release-freeze"),
        "{}",
        stderr_of(&refused)
    );

    // alice tries to jump ahead of the window with a newest-first place: the
    // window's place is served first all the same.
    let mut jumper = cluster
        .deploylock_command(Identity::Alice, &ns)
        .args(["acquire", "-e", "staging", "--reason", "Jump the freeze"])
        .args(["--wait-timeout", "100", "--queue", "newest-first"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start alice's acquire: {err}"));
    await_lock(&locks, "staging", "with alice queued", |lock| {
        lock.spec.queue.iter().any(|waiter| waiter.user == "alice")
    })
    .await;

    // bob releases staging: the window takes it, to the same end.
    expect_exit(
        &deploylock(Identity::Bob, &["release", "-e", "staging"]),
        0,
        "bob releases staging",
    );
    let staging = await_lock(&locks, "staging", "held by someone", |lock| {
        lock.spec.holder.is_some()
    })
    .await;
    assert_eq!(
        holder_of(&staging).user,
        WINDOW_HOLDER,
        "the window is served first"
    );
    assert!(
        holder_of(&staging).expires_at <= end,
        "held past the window's end"
    );
    let _ = jumper.kill();
    let _ = jumper.wait();

    // A controller killed and started again mid-window takes nothing twice.
    drop(controller);
    let controller = cluster.spawn_controller(&ns, "window-open", &[]);

    // At the end, both holdings are over (expired, then cleared).
    for environment in ["production", "staging"] {
        let over = await_lock(&locks, environment, "free after the window", |lock| {
            lock.spec
                .holder
                .as_ref()
                .is_none_or(|holder| holder.expires_at <= Utc::now())
        })
        .await;
        assert_eq!(
            window_entries(&over),
            1,
            "{environment}: {:?}",
            over.spec.history
        );
    }
    let production = stored(&locks, "production").await;
    assert!(
        production
            .spec
            .holder
            .as_ref()
            .is_none_or(|holder| holder.lock_id == frozen_id),
        "production was taken again: {:?}",
        production.spec
    );
    drop(controller);
}

/// A window deleted while it waits in a lock's queue leaves its place at
/// once (the Controller reconciles no deletion: the wait watches for it),
/// and takes nothing when the holder releases. Its place would otherwise
/// stand first in the queue, refusing everyone, until the opening's end.
#[tokio::test]
async fn a_deleted_window_leaves_its_queue_places() {
    install_window_crd();
    let cluster = cluster();
    let ns = cluster.enforced_namespace("window-deleted").await;
    let deploylock = |identity: Identity, args: &[&str]| cluster.deploylock(identity, &ns, args);
    let controller = cluster.spawn_controller(&ns, "window-deleted", &[]);
    let locks = locks_api(cluster, &ns).await;
    expect_exit(
        &deploylock(
            Identity::Bob,
            &["acquire", "-e", "staging", "--reason", "Deploying 2.1.0"],
        ),
        0,
        "bob holds staging",
    );
    let start = Utc::now() + chrono::Duration::seconds(5);
    let start = DateTime::from_timestamp(start.timestamp(), 0).unwrap_or(start);
    apply_window(
        cluster,
        &ns,
        &one_off("mistake", start, 3600, &["staging"], "Queue"),
    );
    let window_queued = |lock: &DeploymentLock| {
        lock.spec
            .queue
            .iter()
            .any(|waiter| waiter.user == WINDOW_HOLDER)
    };
    await_lock(&locks, "staging", "with the window queued", window_queued).await;

    let deleted = cluster.kubectl(
        Identity::Admin,
        &[
            "delete",
            "freezewindow",
            "mistake",
            "-n",
            &ns,
            "--wait=true",
        ],
    );
    expect_exit(&deleted, 0, "kubectl delete the window");
    await_lock(
        &locks,
        "staging",
        "without the deleted window's place",
        |lock| !window_queued(lock),
    )
    .await;
    expect_exit(
        &deploylock(Identity::Bob, &["release", "-e", "staging"]),
        0,
        "bob releases staging",
    );
    let staging = stored(&locks, "staging").await;
    assert!(
        staging.spec.holder.is_none() && staging.spec.queue.is_empty(),
        "staging after the deleted window's release: {:?}",
        staging.spec
    );
    drop(controller);
}

#[tokio::test]
async fn a_take_over_window_overrides_the_holder_and_an_admin_overrides_the_window() {
    install_window_crd();
    let cluster = cluster();
    let ns = cluster.enforced_namespace("window-takeover").await;
    let deploylock = |identity: Identity, args: &[&str]| cluster.deploylock(identity, &ns, args);
    let controller = cluster.spawn_controller(&ns, "window-takeover", &[]);
    let locks = locks_api(cluster, &ns).await;

    expect_exit(
        &deploylock(
            Identity::Bob,
            &["acquire", "-e", "production", "--reason", "Deploying 2.1.0"],
        ),
        0,
        "bob holds production",
    );
    let start = Utc::now() + chrono::Duration::seconds(6);
    let start = DateTime::from_timestamp(start.timestamp(), 0).unwrap_or(start);
    apply_window(
        cluster,
        &ns,
        &one_off("incident-freeze", start, 90, &["production"], "TakeOver"),
    );
    let taken = await_lock(
        &locks,
        "production",
        "taken over by the window",
        held_by_window,
    )
    .await;
    let entry = taken.spec.history.last().cloned();
    assert_eq!(
        entry.as_ref().map(|e| e.action),
        Some(HistoryAction::ForceAcquired)
    );
    let overrode = holder_of(&taken).overrode.clone();
    assert_eq!(overrode.map(|o| o.user), Some("bob".to_string()));
    assert_eq!(holder_of(&taken).lock_type, LockType::Scheduled);

    // An admin's emergency overrides the window, and the window leaves it.
    expect_exit(
        &deploylock(
            Identity::Carol,
            &[
                "acquire",
                "-e",
                "production",
                "--force",
                "--reason",
                "Hotfix 2.1.1",
            ],
        ),
        0,
        "carol forces production during the window",
    );
    let forced = stored(&locks, "production").await;
    assert_eq!(holder_of(&forced).user, "carol");
    assert_eq!(holder_of(&forced).lock_type, LockType::Emergency);
    expect_exit(
        &deploylock(Identity::Carol, &["release", "-e", "production"]),
        0,
        "carol releases",
    );
    // Until the window's end nobody re-took it for the window.
    let end = start + chrono::Duration::seconds(90);
    let windows: Api<FreezeWindow> = Api::namespaced(cluster.client(Identity::Admin).await, &ns);
    await_window(&windows, "incident-freeze", "closed", |window| {
        window
            .status
            .as_ref()
            .is_some_and(|status| status.open.is_none() && status.last_opened.is_some())
            && Utc::now() >= end
    })
    .await;
    let after = stored(&locks, "production").await;
    assert_eq!(window_entries(&after), 1, "{:?}", after.spec.history);
    drop(controller);
}

#[tokio::test]
async fn bad_windows_are_refused_or_not_ready_and_scheduled_holdings_are_the_windows_alone() {
    install_window_crd();
    let cluster = cluster();
    let ns = cluster.enforced_namespace("window-bad").await;
    let base = |spec: serde_json::Value| {
        json!({"apiVersion": "deploylock.dev/v1", "kind": "FreezeWindow",
               "metadata": {"name": "bad"}, "spec": spec})
    };
    let refused: [(serde_json::Value, &str); 5] = [
        (
            base(
                json!({"schedule": "0 22 * * 5", "duration": "8h", "start": "2026-12-24T00:00:00Z",
                        "end": "2026-12-25T00:00:00Z", "environments": ["production"], "reason": "x"}),
            ),
            "either schedule",
        ),
        (
            base(
                json!({"schedule": "0 22 * * 5", "duration": "1d", "environments": ["production"], "reason": "x"}),
            ),
            "spec.duration",
        ),
        (
            base(json!({"schedule": "0 22 * * 5", "duration": "8h", "reason": "x"})),
            "allEnvironments",
        ),
        (
            base(
                json!({"start": "2026-12-25T00:00:00Z", "end": "2026-12-24T00:00:00Z",
                        "environments": ["production"], "reason": "x"}),
            ),
            "end must be after start",
        ),
        (
            base(
                json!({"schedule": "0 22 * * 5", "duration": "8h", "environments": ["Production!"], "reason": "x"}),
            ),
            "spec.environments",
        ),
    ];
    for (window, says) in refused {
        let output = cluster.kubectl_with_input(
            Identity::Admin,
            &["create", "-n", &ns, "-f", "-"],
            &window.to_string(),
        );
        expect_exit(&output, 1, &format!("a bad window ({says})"));
        assert!(
            stderr_of(&output).contains(says),
            "{says}: {}",
            stderr_of(&output)
        );
    }

    // Well formed for the schema, but it never happens: not Ready, and why.
    let controller = cluster.spawn_controller(&ns, "window-bad", &[]);
    let windows: Api<FreezeWindow> = Api::namespaced(cluster.client(Identity::Admin).await, &ns);
    for (name, schedule, zone, says) in [
        ("never", "0 0 30 2 *", "UTC", "never names"),
        ("nowhere", "0 22 * * 5", "Mars/Olympus", "unknown time zone"),
    ] {
        apply_window(
            cluster,
            &ns,
            &json!({"apiVersion": "deploylock.dev/v1", "kind": "FreezeWindow",
                    "metadata": {"name": name},
                    "spec": {"schedule": schedule, "timeZone": zone, "duration": "8h",
                             "environments": ["production"], "reason": "x"}}),
        );
        let window = await_window(&windows, name, "marked not Ready", |window| {
            window.status.as_ref().is_some_and(|status| {
                status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "False")
            })
        })
        .await;
        let message = window
            .status
            .map(|status| status.conditions)
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.message)
            .collect::<Vec<_>>()
            .join("; ");
        assert!(message.contains(says), "{name}: {message}");
    }

    // Nobody but the windows' identity takes a scheduled holding, even with
    // kubectl and an admin's force.
    let now = Utc::now();
    let expires = now + chrono::Duration::seconds(600);
    for identity in [Identity::Alice, Identity::Carol] {
        let forged = json!({
            "apiVersion": "deploylock.dev/v1", "kind": "DeploymentLock",
            "metadata": {"name": "qa"},
            "spec": {
                "environment": "qa",
                "fencingToken": (now.timestamp() + 5) * (1 << 20) + 1,
                "holder": {"lockId": "forged-1", "user": identity.username(), "owner": "a window",
                           "type": "scheduled", "reason": "pretend", "acquiredAt": rfc3339(now),
                           "expiresAt": rfc3339(expires), "durationSeconds": 600},
                "history": [{"sequence": 1, "action": "Acquired", "lockId": "forged-1",
                             "by": identity.username(), "owner": "a window", "reason": "pretend",
                             "at": rfc3339(now), "expiresAt": rfc3339(expires)}]
            }
        });
        let output = cluster.kubectl_with_input(
            identity,
            &["create", "-n", &ns, "-f", "-"],
            &forged.to_string(),
        );
        expect_exit(&output, 1, "a scheduled holding by someone else");
        assert!(
            stderr_of(&output).contains("only deploylock's freeze windows"),
            "{:?}: {}",
            identity,
            stderr_of(&output)
        );
    }
    drop(controller);
}

/// The examples in examples/freeze-windows are applied for real and the
/// controller schedules each one (Ready, with its next start and end).
#[tokio::test]
async fn the_freeze_window_examples_are_scheduled() {
    install_window_crd();
    let cluster = cluster();
    let ns = cluster.enforced_namespace("window-examples").await;
    let dir = crate::support::repo_root().join("examples/freeze-windows");
    let applied = cluster.kubectl(
        Identity::Admin,
        &["apply", "-n", &ns, "-f", &dir.display().to_string()],
    );
    expect_exit(&applied, 0, "kubectl apply examples/freeze-windows");
    let _controller = cluster.spawn_controller(&ns, "window-examples", &[]);
    let windows: Api<FreezeWindow> = Api::namespaced(cluster.client(Identity::Admin).await, &ns);
    for name in ["nightly-batch", "weekend", "holiday-freeze"] {
        let scheduled = await_window(&windows, name, "scheduled", |window| {
            window.status.as_ref().is_some_and(|status| {
                status.next_start.is_some()
                    && status
                        .conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .await;
        let status = scheduled.status.unwrap_or_default();
        assert!(status.next_start < status.next_end, "{name}: {status:?}");
    }
    let listed = cluster.deploylock(Identity::Alice, &ns, &["windows"]);
    expect_exit(&listed, 0, "deploylock windows");
    let table = crate::support::stdout_of(&listed);
    for name in [
        "nightly-batch",
        "weekend",
        "holiday-freeze",
        "Europe/Berlin",
        "once",
    ] {
        assert!(table.contains(name), "{name} missing from:\n{table}");
    }
}
