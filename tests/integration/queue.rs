//! The fair wait queue with real `deploylock acquire --wait-timeout`
//! processes: arrival order, newest-first, and a waiter killed with SIGKILL
//! that must not block the others.

use std::process::{Child, Stdio};

use kube::api::Api;
use kube::runtime::wait::await_condition;

use deploylock::crd::DeploymentLock;

use crate::support::{Identity, cluster};

const WAIT: std::time::Duration = std::time::Duration::from_secs(90);

fn identity_of(i: usize) -> Identity {
    if i % 2 == 0 {
        Identity::Bob
    } else {
        Identity::Alice
    }
}

/// Starts a waiter and returns once its place is in the queue (seen on a
/// watch), so that waiters arrive in a known order.
async fn start_waiter(
    api: &Api<DeploymentLock>,
    namespace: &str,
    i: usize,
    extra: &[&str],
) -> Child {
    let owner = format!("waiter-{i}");
    let reason = format!("deploy {i}");
    let mut command = cluster().deploylock_command(identity_of(i), namespace);
    command
        .args([
            "acquire",
            "--wait-timeout",
            "120",
            "--owner",
            &owner,
            "--reason",
            &reason,
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = match command.spawn() {
        Ok(child) => child,
        Err(err) => panic!("cannot start {owner}: {err}"),
    };
    let queued = move |lock: Option<&DeploymentLock>| {
        lock.is_some_and(|lock| lock.spec.queue.iter().any(|w| w.owner == owner))
    };
    if let Err(err) =
        tokio::time::timeout(WAIT, await_condition(api.clone(), "production", queued)).await
    {
        panic!("waiter-{i} never joined the queue: {err}");
    }
    child
}

async fn holder_owner(api: &Api<DeploymentLock>) -> Option<String> {
    match api.get("production").await {
        Ok(lock) => lock.spec.holder.map(|holder| holder.owner),
        Err(err) => panic!("cannot read the lock: {err}"),
    }
}

/// Waits for a waiter process to finish and asserts it got the lock.
fn expect_acquired(child: Child, who: &str) {
    let output = match child.wait_with_output() {
        Ok(output) => output,
        Err(err) => panic!("{who}: {err}"),
    };
    assert!(
        output.status.success(),
        "{who} did not acquire: {:?} {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn release(namespace: &str, identity: Identity) {
    let output = cluster().deploylock(identity, namespace, &["release"]);
    assert!(
        output.status.success(),
        "release failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn five_waiters_are_served_in_arrival_order() {
    let cluster = cluster();
    let namespace = cluster.namespace("queue-fifo").await;
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let first = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["acquire", "--reason", "holder"],
    );
    assert!(first.status.success());

    let mut waiters = Vec::new();
    for i in 0..5 {
        waiters.push(start_waiter(&api, &namespace, i, &[]).await);
    }
    let lock = api
        .get("production")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let queue: Vec<&str> = lock.spec.queue.iter().map(|w| w.owner.as_str()).collect();
    assert_eq!(
        queue,
        ["waiter-0", "waiter-1", "waiter-2", "waiter-3", "waiter-4"]
    );
    let status = cluster.deploylock(Identity::Viewer, &namespace, &["status", "-v"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("waiter-0") && text.contains("deploy 0"),
        "status shows the queue:\n{text}"
    );

    release(&namespace, Identity::Alice);
    for (i, waiter) in waiters.into_iter().enumerate() {
        let who = format!("waiter-{i}");
        expect_acquired(waiter, &who);
        assert_eq!(
            holder_owner(&api).await.as_deref(),
            Some(who.as_str()),
            "served out of order"
        );
        release(&namespace, identity_of(i));
    }
    let lock = api
        .get("production")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(
        lock.spec.queue.is_empty(),
        "queue not empty: {:?}",
        lock.spec.queue
    );
}

#[tokio::test]
async fn newest_first_serves_the_newest_waiter() {
    let cluster = cluster();
    let namespace = cluster.namespace("queue-newest").await;
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let first = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["acquire", "--reason", "holder"],
    );
    assert!(first.status.success());
    let mut waiters = Vec::new();
    for i in 0..3 {
        waiters.push(start_waiter(&api, &namespace, i, &["--queue", "newest-first"]).await);
    }
    release(&namespace, Identity::Alice);
    let newest = waiters.pop().unwrap_or_else(|| panic!("three waiters"));
    expect_acquired(newest, "waiter-2");
    assert_eq!(holder_owner(&api).await.as_deref(), Some("waiter-2"));
    release(&namespace, identity_of(2));
    let middle = waiters.pop().unwrap_or_else(|| panic!("two waiters"));
    expect_acquired(middle, "waiter-1");
    assert_eq!(holder_owner(&api).await.as_deref(), Some("waiter-1"));
    release(&namespace, identity_of(1));
    let oldest = waiters.pop().unwrap_or_else(|| panic!("one waiter"));
    expect_acquired(oldest, "waiter-0");
}

#[tokio::test]
async fn a_killed_waiter_drops_out_and_does_not_block_the_queue() {
    let cluster = cluster();
    let namespace = cluster.namespace("queue-killed").await;
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let first = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["acquire", "--reason", "holder"],
    );
    assert!(first.status.success());
    let mut doomed = start_waiter(&api, &namespace, 0, &[]).await;
    let survivor = start_waiter(&api, &namespace, 1, &[]).await;
    if let Err(err) = doomed.kill() {
        panic!("cannot SIGKILL waiter-0: {err}");
    }
    let _ = doomed.wait();
    release(&namespace, Identity::Alice);
    // waiter-0's heartbeat runs out (15 s); then waiter-1 is served.
    expect_acquired(survivor, "waiter-1");
    let lock = api
        .get("production")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(
        lock.spec.holder.as_ref().map(|h| h.owner.as_str()),
        Some("waiter-1")
    );
    // Its place, 15 s stale, no longer counts; it is removed by the next
    // queue write after the prune grace (the policy's clock may trail).
    assert!(
        lock.spec
            .queue
            .iter()
            .filter(|w| w.owner == "waiter-0")
            .all(|w| lock
                .spec
                .holder
                .as_ref()
                .is_some_and(|h| h.acquired_at >= deploylock::rules::waiter_deadline(w))),
        "the killed waiter counted after its heartbeat ran out: {:?}",
        lock.spec.queue
    );
}

#[tokio::test]
async fn a_waiter_that_times_out_leaves_the_queue() {
    let cluster = cluster();
    let namespace = cluster.namespace("queue-timeout").await;
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let first = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["acquire", "--reason", "holder"],
    );
    assert!(first.status.success());
    let output = cluster.deploylock(
        Identity::Bob,
        &namespace,
        &["acquire", "--wait-timeout", "2", "--reason", "impatient"],
    );
    assert_eq!(
        output.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("alice"), "names the holder: {stderr}");
    let lock = api
        .get("production")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(
        lock.spec.queue.is_empty(),
        "left the queue: {:?}",
        lock.spec.queue
    );
}

/// Ctrl-C while waiting: exit 130, and the place in the queue is given up
/// at once (not left to lapse with the heartbeat).
#[tokio::test]
async fn sigint_while_waiting_exits_130_and_leaves_the_queue() {
    let cluster = cluster();
    let namespace = cluster.namespace("queue-sigint").await;
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let first = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["acquire", "--reason", "holder"],
    );
    assert!(first.status.success());
    let waiter = start_waiter(&api, &namespace, 0, &[]).await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(waiter.id()).unwrap_or(0));
    if let Err(err) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT) {
        panic!("cannot send SIGINT: {err}");
    }
    let output = match waiter.wait_with_output() {
        Ok(output) => output,
        Err(err) => panic!("cannot wait for the waiter: {err}"),
    };
    assert_eq!(
        output.status.code(),
        Some(130),
        "{:?} {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let lock = api
        .get("production")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(
        lock.spec.queue.is_empty(),
        "the interrupted waiter is still queued: {:?}",
        lock.spec.queue
    );
}

/// Waiters ride out an API server restart and an etcd restart (each killed,
/// then restarted by the control plane's supervisor) with their places and order intact. A control
/// plane of its own, so that no other test sees the outage; everyone is its
/// admin, told apart by --owner.
#[tokio::test]
async fn waiters_keep_their_order_through_api_server_and_etcd_restarts() {
    use crate::support::{ExtraCluster, client_from, install_crd};
    let extra = ExtraCluster::start("queue-restart");
    let kubeconfig = extra.admin_kubeconfig();
    let client = client_from(&kubeconfig)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    if let Err(err) = install_crd(&client).await {
        panic!("cannot install the CRD: {err}");
    }
    let api: Api<DeploymentLock> = Api::namespaced(client, "default");
    let deploylock = |args: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_deploylock"));
        command
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["-n", "default"])
            .args(args)
            .env_remove("KUBECONFIG");
        command
    };
    let held = deploylock(&["acquire", "--reason", "holder", "--owner", "holder"])
        .output()
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(
        held.status.success(),
        "{}",
        String::from_utf8_lossy(&held.stderr)
    );

    let mut waiters = Vec::new();
    for i in 0..3 {
        let owner = format!("waiter-{i}");
        let child = deploylock(&[
            "acquire",
            "--wait-timeout",
            "240",
            "--owner",
            &owner,
            "--reason",
            "after the restart",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {owner}: {err}"));
        let queued = move |lock: Option<&DeploymentLock>| {
            lock.is_some_and(|lock| lock.spec.queue.iter().any(|w| w.owner == owner))
        };
        if let Err(err) =
            tokio::time::timeout(WAIT, await_condition(api.clone(), "production", queued)).await
        {
            panic!("waiter-{i} never joined the queue: {err}");
        }
        waiters.push(child);
    }

    // The restarts: the supervisor brings each killed server back.
    for server in ["restart-apiserver", "restart-etcd"] {
        let restarted =
            std::process::Command::new(crate::support::repo_root().join("hack/cluster.sh"))
                .arg(server)
                .arg("--dir")
                .arg(&extra.dir)
                .output()
                .unwrap_or_else(|err| panic!("cannot run hack/cluster.sh {server}: {err}"));
        assert!(
            restarted.status.success(),
            "{server}: {}",
            String::from_utf8_lossy(&restarted.stderr)
        );
        // Back when a read answers again (the waiters see the same).
        let deadline = std::time::Instant::now() + WAIT;
        while api.get("production").await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "never back after {server}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    for (i, waiter) in waiters.iter_mut().enumerate() {
        assert!(
            matches!(waiter.try_wait(), Ok(None)),
            "waiter-{i} gave up during the restart"
        );
    }

    // Released in turn, the lock goes to the waiters in their order.
    let mut previous = "holder".to_string();
    for (i, waiter) in waiters.into_iter().enumerate() {
        let lock = api
            .get("production")
            .await
            .unwrap_or_else(|err| panic!("{err}"));
        let holder = lock.spec.holder.unwrap_or_else(|| panic!("no holder"));
        assert_eq!(holder.owner, previous, "queue order after the restart");
        let released = deploylock(&["release", "--lock-id", &holder.lock_id])
            .output()
            .unwrap_or_else(|err| panic!("{err}"));
        assert!(
            released.status.success(),
            "{}",
            String::from_utf8_lossy(&released.stderr)
        );
        expect_acquired(waiter, &format!("waiter-{i}"));
        previous = format!("waiter-{i}");
    }
    let lock = api
        .get("production")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(
        lock.spec.holder.map(|h| h.owner).as_deref(),
        Some("waiter-2")
    );
}
