//! The fair wait queue with real `deploylock acquire --wait-timeout`
//! processes: arrival order, newest-first, and a waiter killed with SIGKILL
//! that must not block the others.

use std::process::{Child, Stdio};

use kube::api::Api;

use deploylock::crd::DeploymentLock;

use crate::support::{
    self, Identity, await_leader, await_object, await_queued, cluster, expect_acquired, expect_exit,
};

const WAIT: std::time::Duration = std::time::Duration::from_secs(90);

fn identity_of(i: usize) -> Identity {
    if i.is_multiple_of(2) {
        Identity::Bob
    } else {
        Identity::Alice
    }
}

/// Starts waiter `i` (its owner `waiter-<i>`) and returns once its place is
/// in the queue.
async fn start_waiter(api: &Api<DeploymentLock>, i: usize, extra: &[&str]) -> Child {
    let owner = format!("waiter-{i}");
    let reason = format!("deploy {i}");
    support::start_waiter(api, identity_of(i), &owner, &reason, extra).await
}

async fn holder_owner(api: &Api<DeploymentLock>) -> Option<String> {
    match api.get("production").await {
        Ok(lock) => lock.spec.holder.map(|holder| holder.owner),
        Err(err) => panic!("cannot read the lock: {err}"),
    }
}

fn release(namespace: &str, identity: Identity) {
    let output = cluster().deploylock(identity, namespace, &["release"]);
    assert!(
        output.status.success(),
        "release failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A namespace for `test` whose `production` lock alice holds, and the
/// admin's view of its locks.
async fn held_by_alice(test: &str) -> (String, Api<DeploymentLock>) {
    let cluster = cluster();
    let namespace = cluster.namespace(test).await;
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let first = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["acquire", "--reason", "holder"],
    );
    expect_exit(&first, 0, "alice acquires");
    (namespace, api)
}

/// Fails, saying `what`, unless `production`'s queue is empty.
async fn assert_queue_empty(api: &Api<DeploymentLock>, what: &str) {
    let lock = api
        .get("production")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(lock.spec.queue.is_empty(), "{what}: {:?}", lock.spec.queue);
}

#[tokio::test]
async fn five_waiters_are_served_in_arrival_order() {
    let (namespace, api) = held_by_alice("queue-fifo").await;

    let mut waiters = Vec::new();
    for i in 0..5 {
        waiters.push(start_waiter(&api, i, &[]).await);
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
    let status = cluster().deploylock(Identity::Viewer, &namespace, &["status", "-v"]);
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
    assert_queue_empty(&api, "queue not empty").await;
}

#[tokio::test]
async fn newest_first_serves_the_newest_waiter() {
    let (namespace, api) = held_by_alice("queue-newest").await;
    let mut waiters = Vec::new();
    for i in 0..3 {
        waiters.push(start_waiter(&api, i, &["--queue", "newest-first"]).await);
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
    let (namespace, api) = held_by_alice("queue-killed").await;
    let mut doomed = start_waiter(&api, 0, &[]).await;
    let survivor = start_waiter(&api, 1, &[]).await;
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
    let (namespace, api) = held_by_alice("queue-timeout").await;
    let output = cluster().deploylock(
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
    assert_queue_empty(&api, "left the queue").await;
}

/// Ctrl-C while waiting: exit 130, and the place in the queue is given up
/// at once (not left to lapse with the heartbeat).
#[tokio::test]
async fn sigint_while_waiting_exits_130_and_leaves_the_queue() {
    let (_namespace, api) = held_by_alice("queue-sigint").await;
    let waiter = start_waiter(&api, 0, &[]).await;
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
    assert_queue_empty(&api, "the interrupted waiter is still queued").await;
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
        await_queued(&api, &owner).await;
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

/// Waits (on a watch) until the controller's status names the holding of
/// `owner` as Locked.
async fn await_status_of(api: &Api<DeploymentLock>, owner: &str) -> DeploymentLock {
    use deploylock::crd::LockState;
    let what = format!("reported as Locked by {owner}");
    let owner = owner.to_string();
    let reconciled = move |lock: &DeploymentLock| {
        let holding = lock
            .spec
            .holder
            .as_ref()
            .filter(|holder| holder.owner == owner);
        let status = lock.status.as_ref();
        holding.is_some_and(|holder| {
            status.and_then(|s| s.state) == Some(LockState::Locked)
                && status.and_then(|s| s.lock_id.as_deref()) == Some(holder.lock_id.as_str())
        })
    };
    await_object(api, "production", &what, WAIT, reconciled).await
}

/// Three waiters queue in an enforced namespace watched by two controllers
/// sharing one Lease. The leader is killed (SIGKILL: no hand-over, the
/// standby takes over once the Lease runs out, 15 s, as long as a waiter's
/// heartbeat timeout); the holder releases while no controller leads. The
/// waiters keep their places through the gap and are served in arrival
/// order, and the new leader reconciles each hand-off.
///
/// The admission policy's clock here is the harness's own controller (in
/// deploylock-system), so the fail-over does not stop it: what is covered
/// is the waiters against the controllers' status writes and a leaderless
/// gap, not a stopped clock.
#[tokio::test]
async fn waiters_keep_their_order_through_a_controller_failover() {
    let cluster = cluster();
    let namespace = cluster.enforced_namespace("queue-failover").await;
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let first = cluster.spawn_controller(&namespace, "failover", &[]);
    let second = cluster.spawn_controller(&namespace, "failover", &[]);
    let leader = await_leader(&namespace, "failover", &[&first, &second], WAIT).await;
    let (leader, standby) = if leader == first.identity() {
        (first, second)
    } else {
        (second, first)
    };

    let held = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["acquire", "--owner", "holder", "--reason", "holder"],
    );
    assert!(
        held.status.success(),
        "{}",
        String::from_utf8_lossy(&held.stderr)
    );
    await_status_of(&api, "holder").await;
    let mut waiters = Vec::new();
    for i in 0..3 {
        waiters.push(start_waiter(&api, i, &[]).await);
    }

    leader.signal("KILL");
    release(&namespace, Identity::Alice);
    let mut waiters = waiters.into_iter();
    let waiter = waiters.next().unwrap_or_else(|| panic!("three waiters"));
    expect_acquired(waiter, "waiter-0");
    assert_eq!(holder_owner(&api).await.as_deref(), Some("waiter-0"));

    let new_leader = await_leader(&namespace, "failover", &[&standby], WAIT).await;
    assert_eq!(new_leader, standby.identity());
    await_status_of(&api, "waiter-0").await;
    let mut waiters: Vec<Child> = waiters.collect();
    for (i, waiter) in waiters.iter_mut().enumerate() {
        assert!(
            matches!(waiter.try_wait(), Ok(None)),
            "waiter-{} gave up during the fail-over",
            i + 1
        );
    }
    let lock = api
        .get("production")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let queue: Vec<&str> = lock.spec.queue.iter().map(|w| w.owner.as_str()).collect();
    assert_eq!(queue, ["waiter-1", "waiter-2"], "{:?}", lock.spec.queue);

    for (i, waiter) in (1..).zip(waiters) {
        release(&namespace, identity_of(i - 1));
        let who = format!("waiter-{i}");
        expect_acquired(waiter, &who);
        assert_eq!(
            holder_owner(&api).await.as_deref(),
            Some(who.as_str()),
            "served out of order"
        );
        await_status_of(&api, &who).await;
    }
    release(&namespace, identity_of(2));
    let lock = api
        .get("production")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(lock.spec.holder.is_none(), "{:?}", lock.spec.holder);
    assert!(lock.spec.queue.is_empty(), "{:?}", lock.spec.queue);
}

/// `command` in a process group of its own (a shell's foreground job),
/// stdout and stderr piped.
fn foreground(mut command: std::process::Command) -> tokio::process::Child {
    use std::os::unix::process::CommandExt;
    command
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match tokio::process::Command::from(command).spawn() {
        Ok(child) => child,
        Err(err) => panic!("cannot start deploylock: {err}"),
    }
}

/// Ctrl-C as a terminal sends it (SIGINT to the foreground process group);
/// the process must exit 130 soon after.
async fn ctrl_c_exits_130(child: tokio::process::Child, what: &str) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    let pid = Pid::from_raw(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .unwrap_or(0),
    );
    crate::exec::await_proc("catching SIGINT", || {
        crate::exec::catches(pid, Signal::SIGINT)
    })
    .await;
    if let Err(err) = killpg(pid, Signal::SIGINT) {
        panic!("{what}: cannot send SIGINT: {err}");
    }
    let output = match tokio::time::timeout(WAIT, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(err)) => panic!("{what}: cannot wait: {err}"),
        Err(_) => panic!("{what}: still running {WAIT:?} after Ctrl-C"),
    };
    assert_eq!(
        output.status.code(),
        Some(130),
        "{what}: {:?} {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Ctrl-C during each phase of `acquire --wait-timeout`: while connecting to
/// a silent server and while queued. It exits 130 each time and leaves no
/// holding and no place in the queue: right after it, a client that did not
/// queue takes the freed lock (a place left behind would refuse it).
#[tokio::test]
async fn ctrl_c_in_every_phase_of_acquire_wait_timeout_exits_130_and_leaves_nothing() {
    let cluster = cluster();
    let namespace = cluster.namespace("queue-ctrl-c").await;
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));

    // Connecting: the server accepts and never answers.
    let (port, accepted) = crate::exec::silent_server();
    let mut command = crate::exec::deploylock_at(port, &namespace, dir.path());
    command.args(["acquire", "--wait-timeout", "300", "--reason", "silence"]);
    let child = foreground(command);
    let connected = tokio::task::spawn_blocking(move || accepted.recv_timeout(WAIT)).await;
    assert!(
        matches!(connected, Ok(Ok(()))),
        "acquire never connected to the silent server"
    );
    ctrl_c_exits_130(child, "Ctrl-C while connecting").await;

    // Queued behind alice.
    let held = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["acquire", "--reason", "holder"],
    );
    assert!(
        held.status.success(),
        "{}",
        String::from_utf8_lossy(&held.stderr)
    );
    let mut command = cluster.deploylock_command(Identity::Bob, &namespace);
    command.args([
        "acquire",
        "--wait-timeout",
        "300",
        "--owner",
        "interrupted",
        "--reason",
        "queued",
    ]);
    let child = foreground(command);
    await_queued(&api, "interrupted").await;
    ctrl_c_exits_130(child, "Ctrl-C while queued").await;
    let lock = api
        .get("production")
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(
        lock.spec.holder.as_ref().map(|h| h.user.as_str()),
        Some("alice")
    );
    assert!(
        lock.spec.queue.is_empty(),
        "the interrupted waiter is still queued: {:?}",
        lock.spec.queue
    );

    release(&namespace, Identity::Alice);
    let again = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["acquire", "--reason", "next"],
    );
    assert!(
        again.status.success(),
        "a client that did not queue cannot take the freed lock: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(holder_owner(&api).await.as_deref(), Some("alice"));
}
