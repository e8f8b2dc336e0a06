//! Stop the line (config/admission/stop-the-line.yaml): while an admin holds
//! the lock `stop-the-line`, no environment of the namespace can be acquired,
//! new ones included; holders keep theirs, and an admin's --force passes.

use deploylock::crd::HistoryAction;

use crate::support::{
    Identity, cluster, expect_exit, last_history, locks_api, stderr_of, stored,
    until_answer_changes,
};

const FROZEN: &str = "the namespace is frozen: stop-the-line is held by carol";

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
    let mut probe = 0;
    let refused = until_answer_changes(
        || {
            probe += 1;
            let name = format!("new-environment-{probe}");
            let output = deploylock(
                Identity::Alice,
                &["acquire", "-e", &name, "--reason", "probe"],
            );
            if output.status.success() {
                // Taken before the API server saw the freeze: give it back.
                expect_exit(
                    &deploylock(Identity::Alice, &["release", "-e", &name]),
                    0,
                    "release the probe",
                );
            }
            output
        },
        true,
        "the freeze takes effect",
    );
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
