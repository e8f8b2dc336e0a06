//! Stop the line (config/admission/stop-the-line.yaml): while an admin holds
//! the lock `stop-the-line`, no environment of the namespace can be acquired,
//! new ones included; holders keep theirs, an admin's --force passes, and a
//! waiter waits the freeze out.

use deploylock::crd::{DeploymentLock, HistoryAction};

use crate::support::{
    Identity, cluster, expect_exit, holder_of, last_history, locks_api, stderr_of, stored,
    until_answer_changes,
};

const FROZEN: &str = "the namespace is frozen: stop-the-line is held by carol";

/// Acquires of new environments by `identity` until one is refused (the
/// stop-the-line policy sees a freeze once its parameter cache has the
/// lock); a probe taken before that is given back. Returns the refusal.
fn first_frozen_acquire(ns: &str, identity: Identity) -> std::process::Output {
    let cluster = cluster();
    let mut probe = 0;
    until_answer_changes(
        || {
            probe += 1;
            let name = format!("new-environment-{probe}");
            let output =
                cluster.deploylock(identity, ns, &["acquire", "-e", &name, "--reason", "probe"]);
            if output.status.success() {
                expect_exit(
                    &cluster.deploylock(identity, ns, &["release", "-e", &name]),
                    0,
                    "release the probe",
                );
            }
            output
        },
        true,
        "the freeze takes effect",
    )
}

#[tokio::test]
async fn stop_the_line_freezes_every_environment_but_an_admins_force() {
    let cluster = cluster();
    let ns = cluster.enforced_namespace("stop-the-line").await;
    let deploylock = |identity: Identity, args: &[&str]| cluster.deploylock(identity, &ns, args);

    expect_exit(
        &deploylock(
            Identity::Bob,
            &["acquire", "-e", "production", "--reason", "Deploying 2.1.0"],
        ),
        0,
        "bob holds production before the freeze",
    );
    let not_admin = deploylock(
        Identity::Alice,
        &[
            "acquire",
            "-e",
            "stop-the-line",
            "--reason",
            "I want everything",
        ],
    );
    expect_exit(&not_admin, 5, "an ordinary user stops the line");
    assert!(
        stderr_of(&not_admin).contains("stopping the line"),
        "{}",
        stderr_of(&not_admin)
    );
    expect_exit(
        &deploylock(
            Identity::Carol,
            &[
                "acquire",
                "-e",
                "stop-the-line",
                "--reason",
                "Incident 12: stop all deploys",
            ],
        ),
        0,
        "carol stops the line",
    );

    // Environments that exist and environments created after the freeze.
    let refused = first_frozen_acquire(&ns, Identity::Alice);
    expect_exit(&refused, 5, "acquire of a new environment while frozen");
    assert!(
        stderr_of(&refused).contains(FROZEN),
        "{}",
        stderr_of(&refused)
    );
    for environment in ["staging", "production"] {
        let output = deploylock(
            Identity::Alice,
            &["acquire", "-e", environment, "--reason", "Deploying 3.0"],
        );
        assert!(
            !output.status.success(),
            "{environment} acquired while frozen"
        );
    }
    let staging = deploylock(
        Identity::Alice,
        &["acquire", "-e", "staging", "--reason", "Deploying 3.0"],
    );
    assert!(
        stderr_of(&staging).contains(FROZEN) && stderr_of(&staging).contains("Incident 12"),
        "the refusal must say who froze the namespace and why: {}",
        stderr_of(&staging)
    );

    // bob keeps his holding: extend and release still work.
    expect_exit(
        &deploylock(
            Identity::Bob,
            &["extend", "-e", "production", "--duration", "45m"],
        ),
        0,
        "the holder extends during the freeze",
    );
    expect_exit(
        &deploylock(Identity::Bob, &["release", "-e", "production"]),
        0,
        "the holder releases",
    );

    // An admin's emergency lock passes, and is recorded as such.
    expect_exit(
        &deploylock(
            Identity::Carol,
            &[
                "acquire",
                "-e",
                "staging",
                "--force",
                "--reason",
                "Hotfix during the freeze",
            ],
        ),
        0,
        "an admin's --force during the freeze",
    );
    let api = locks_api(cluster, &ns).await;
    assert_eq!(
        last_history(&stored(&api, "staging").await).action,
        HistoryAction::ForceAcquired
    );

    // The line moves again once stop-the-line is released.
    expect_exit(
        &deploylock(Identity::Carol, &["release", "-e", "stop-the-line"]),
        0,
        "carol releases the line",
    );
    let after = until_answer_changes(
        || {
            deploylock(
                Identity::Alice,
                &["acquire", "-e", "production", "--reason", "Deploying 3.0"],
            )
        },
        false,
        "the line moves again",
    );
    expect_exit(&after, 0, "alice acquires once the line moves");
}

/// A waiter (`--wait-timeout`) meeting a frozen namespace waits the freeze
/// out in its queue place, saying so, and takes the lock once the line
/// moves; one whose timeout passes first exits 4 naming the freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_waits_out_a_freeze_and_takes_the_lock_when_the_line_moves() {
    let cluster = cluster();
    let ns = cluster.enforced_namespace("stop-the-line-wait").await;
    let deploylock = |identity: Identity, args: &[&str]| cluster.deploylock(identity, &ns, args);
    expect_exit(
        &deploylock(
            Identity::Carol,
            &["acquire", "-e", "stop-the-line", "--reason", "Incident 13"],
        ),
        0,
        "carol stops the line",
    );
    // The policy sees the freeze once its parameter cache has the lock.
    let frozen = first_frozen_acquire(&ns, Identity::Bob);
    expect_exit(&frozen, 5, "an acquire without a wait is refused at once");

    let timed_out = deploylock(
        Identity::Alice,
        &[
            "acquire",
            "-e",
            "production",
            "--reason",
            "Deploy",
            "--wait-timeout",
            "3",
        ],
    );
    expect_exit(&timed_out, 4, "a waiter whose timeout passes while frozen");
    assert!(
        stderr_of(&timed_out)
            .contains("the namespace is still frozen, stop-the-line held by carol")
            && stderr_of(&timed_out).contains("Incident 13"),
        "{}",
        stderr_of(&timed_out)
    );

    let mut waiter = cluster.deploylock_command(Identity::Alice, &ns);
    waiter
        .args([
            "acquire",
            "-e",
            "production",
            "--reason",
            "Deploy 3.1",
            "--wait-timeout",
            "120",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let waiter = match waiter.spawn() {
        Ok(child) => child,
        Err(err) => panic!("cannot start the waiter: {err}"),
    };
    // Its place in production's queue is kept while frozen.
    let api = locks_api(cluster, &ns).await;
    let queued = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        kube::runtime::wait::await_condition(
            api.clone(),
            "production",
            |lock: Option<&DeploymentLock>| {
                lock.is_some_and(|lock| lock.spec.queue.iter().any(|waiter| waiter.user == "alice"))
            },
        ),
    )
    .await;
    assert!(
        matches!(queued, Ok(Ok(Some(_)))),
        "alice's place never appeared: {queued:?}"
    );
    expect_exit(
        &deploylock(Identity::Carol, &["release", "-e", "stop-the-line"]),
        0,
        "carol releases the line",
    );
    let output = match tokio::task::spawn_blocking(move || waiter.wait_with_output()).await {
        Ok(Ok(output)) => output,
        other => panic!("the waiter did not finish: {other:?}"),
    };
    expect_exit(
        &output,
        0,
        "the waiter takes production once the line moves",
    );
    let lock = stored(&api, "production").await;
    let holder = holder_of(&lock);
    assert_eq!(holder.user, "alice");
    assert_eq!(holder.reason, "Deploy 3.1");
    assert!(lock.spec.queue.is_empty(), "{:?}", lock.spec.queue);
}
