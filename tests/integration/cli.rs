//! The `deploylock` binary as users and pipelines run it: real processes
//! against the real control plane, judged by exit code, stdout, stderr and the
//! object the API server stores.
//!
//! Nothing here sleeps to synchronise: a waiting process is followed by
//! reading its stderr until it says it is waiting.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use chrono::{DateTime, Duration, Utc};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

use deploylock::crd::{DeploymentLock, HistoryAction, LockType};

use crate::support::{
    ExtraCluster, Identity, TestCluster, cluster, expect_exit, header_of, holder_of,
    holdings_since_creation, last_history, locks_api, status_json, stderr_of, stdout_of, stored,
};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// An error report is short and made for people: at most `max_lines` lines,
/// starting with `deploylock:`, no panic, no Debug dump, no backtrace.
#[track_caller]
fn expect_clean_error(output: &Output, max_lines: usize, what: &str) {
    let stderr = stderr_of(output);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        !lines.is_empty() && lines.len() <= max_lines,
        "{what}: expected 1 to {max_lines} lines on stderr, got {}:\n{stderr}",
        lines.len()
    );
    assert!(
        stderr.starts_with("deploylock:"),
        "{what}: stderr does not start with `deploylock:`:\n{stderr}"
    );
    for bad in ["panicked", "Error {", "backtrace", "RUST_BACKTRACE"] {
        assert!(
            !stderr.contains(bad),
            "{what}: stderr contains {bad:?}:\n{stderr}"
        );
    }
}

async fn resource_version(api: &Api<DeploymentLock>, environment: &str) -> String {
    stored(api, environment)
        .await
        .metadata
        .resource_version
        .unwrap_or_else(|| panic!("{environment} has no resourceVersion"))
}

/// `list -A` exits 0, or 1 only for malformed locks that other tests of
/// this shared cluster stored on purpose (never one of `namespace`).
#[track_caller]
fn expect_list_all_exit(output: &Output, namespace: &str) {
    let stderr = stderr_of(output);
    let only_others_malformed = output.status.code() == Some(1)
        && !stderr.is_empty()
        && stderr.lines().all(|line| {
            line.starts_with("deploylock: skipped the malformed DeploymentLock")
                && !line.contains(&format!("in namespace {namespace:?}"))
        });
    if !only_others_malformed {
        expect_exit(output, 0, "list -A");
    }
}

fn json_time(value: &Value, what: &str) -> DateTime<Utc> {
    value
        .as_str()
        .and_then(|text| DateTime::parse_from_rfc3339(text).ok())
        .map(|time| time.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("{what} is not an RFC 3339 time: {value}"))
}

/// Creates, as the admin, a lock held by `user` whose holding expired at
/// `expires_at`. Built from JSON, as any client would write it.
async fn create_expired_lock(
    api: &Api<DeploymentLock>,
    environment: &str,
    user: &str,
    expires_at: DateTime<Utc>,
    fencing_token: i64,
) -> DeploymentLock {
    let acquired_at = expires_at - Duration::minutes(30);
    let stamp = |time: DateTime<Utc>| time.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let lock_id = "5f0c2c1e-1111-4222-8333-944455556666";
    let object = json!({
        "apiVersion": "deploylock.dev/v1",
        "kind": "DeploymentLock",
        "metadata": { "name": environment },
        "spec": {
            "environment": environment,
            "fencingToken": fencing_token,
            "holder": {
                "lockId": lock_id,
                "user": user,
                "owner": user,
                "type": "manual",
                "reason": "Deploying version 1.0.0",
                "acquiredAt": stamp(acquired_at),
                "expiresAt": stamp(expires_at),
                "durationSeconds": 1800
            },
            "history": [{
                "sequence": 1,
                "action": "Acquired",
                "at": stamp(acquired_at),
                "lockId": lock_id,
                "by": user,
                "owner": user,
                "reason": "Deploying version 1.0.0",
                "expiresAt": stamp(expires_at)
            }]
        }
    });
    let lock: DeploymentLock = match serde_json::from_value(object) {
        Ok(lock) => lock,
        Err(err) => panic!("the expired lock is not a DeploymentLock: {err}"),
    };
    match api.create(&PostParams::default(), &lock).await {
        Ok(created) => created,
        Err(err) => panic!("cannot create the expired lock {environment}: {err}"),
    }
}

/// Reads `child`'s stderr line by line until a line contains `needle` (the
/// process announced it is waiting). Returns what was read so far and the
/// reader, to drain the rest later. Panics if the stream ends first.
fn read_stderr_until(
    child: &mut Child,
    needle: &str,
) -> (String, BufReader<std::process::ChildStderr>) {
    let stderr = match child.stderr.take() {
        Some(stderr) => stderr,
        None => panic!("the child's stderr is not piped"),
    };
    let mut reader = BufReader::new(stderr);
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "the process ended ({status:?}) before printing {needle:?}; stderr:\n{seen}"
                );
            }
            Ok(_) => {
                seen.push_str(&line);
                if line.contains(needle) {
                    return (seen, reader);
                }
            }
            Err(err) => panic!("cannot read the child's stderr: {err}; so far:\n{seen}"),
        }
    }
}

/// Waits for a child whose stderr was partly read by [`read_stderr_until`]:
/// returns its output with the complete stderr.
fn finish(
    child: Child,
    mut seen: String,
    mut reader: BufReader<std::process::ChildStderr>,
) -> Output {
    if let Err(err) = reader.read_to_string(&mut seen) {
        panic!("cannot read the child's stderr: {err}");
    }
    let mut output = match child.wait_with_output() {
        Ok(output) => output,
        Err(err) => panic!("cannot wait for deploylock: {err}"),
    };
    output.stderr = seen.into_bytes();
    output
}

fn spawn(mut command: Command) -> Child {
    match command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(err) => panic!("cannot start deploylock: {err}"),
    }
}

// ---------------------------------------------------------------------------
// 1. The coordinated deployment cycle
// ---------------------------------------------------------------------------

#[tokio::test]
async fn deployment_cycle_between_two_people() {
    let cluster = cluster();
    let ns = cluster.namespace("cli-cycle").await;
    let api = locks_api(cluster, &ns).await;

    let acquired = cluster.deploylock(
        Identity::Alice,
        &ns,
        &["acquire", "--reason", "Deploying version 2.1.0"],
    );
    expect_exit(&acquired, 0, "alice acquires");
    assert!(
        stdout_of(&acquired).contains("production acquired by alice"),
        "{}",
        stdout_of(&acquired)
    );

    let lock = stored(&api, "production").await;
    let expires = holder_of(&lock)
        .expires_at
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let get = cluster.kubectl(Identity::Admin, &["get", "deploymentlocks", "-n", &ns]);
    assert!(get.status.success(), "kubectl get: {}", stderr_of(&get));
    let table = stdout_of(&get);
    let row = table
        .lines()
        .find(|line| line.starts_with("production "))
        .unwrap_or_else(|| panic!("no production row:\n{table}"));
    // The STATE column is the controller's to fill: not asserted here.
    assert!(row.contains(" alice "), "owner missing: {table}");
    assert!(
        row.contains("Deploying version 2.1.0"),
        "reason missing: {table}"
    );
    assert!(row.contains(&expires), "expiry {expires} missing: {table}");

    let refused = cluster.deploylock(
        Identity::Bob,
        &ns,
        &["acquire", "--reason", "Deploying version 2.2.0"],
    );
    expect_exit(&refused, 3, "bob acquires a held lock");
    let stderr = stderr_of(&refused);
    assert!(stderr.contains("alice"), "holder not named: {stderr}");
    assert!(
        stderr.contains("Deploying version 2.1.0"),
        "reason not named: {stderr}"
    );
    expect_clean_error(&refused, 2, "bob's refused acquire");

    let not_holder = cluster.deploylock(Identity::Bob, &ns, &["release"]);
    expect_exit(&not_holder, 5, "bob releases alice's lock");
    expect_clean_error(&not_holder, 2, "bob's refused release");
    assert_eq!(holder_of(&stored(&api, "production").await).user, "alice");

    let released = cluster.deploylock(Identity::Alice, &ns, &["release"]);
    expect_exit(&released, 0, "alice releases");
    assert!(stored(&api, "production").await.spec.holder.is_none());

    let next = cluster.deploylock(
        Identity::Bob,
        &ns,
        &["acquire", "--reason", "Deploying version 2.2.0"],
    );
    expect_exit(&next, 0, "bob acquires after the release");
    let lock = stored(&api, "production").await;
    assert_eq!(holder_of(&lock).user, "bob");
    assert_eq!(holdings_since_creation(lock.spec.fencing_token), 2);
}

/// `--owner` is a display label: every line names the authenticated holder
/// first and the label beside it.
#[tokio::test]
async fn the_holder_is_named_before_the_owner_label() {
    let cluster = cluster();
    let ns = cluster.namespace("cli-holder").await;
    let acquired = cluster.deploylock(
        Identity::Bob,
        &ns,
        &["acquire", "--owner", "alice", "--reason", "Deploying 2.1.0"],
    );
    expect_exit(&acquired, 0, "bob acquires as alice");
    let stdout = stdout_of(&acquired);
    assert!(
        stdout.contains("production acquired by bob (owner label: alice) until "),
        "{stdout}"
    );

    let refused = cluster.deploylock(Identity::Alice, &ns, &["acquire", "--reason", "mine"]);
    expect_exit(&refused, 3, "alice is refused");
    assert!(
        stderr_of(&refused)
            .contains("production: the lock is held by bob (owner label: alice) since "),
        "{}",
        stderr_of(&refused)
    );
    let not_holder = cluster.deploylock(Identity::Alice, &ns, &["release"]);
    expect_exit(&not_holder, 5, "alice releases bob's lock");
    assert!(
        stderr_of(&not_holder).contains("held by bob (owner label: alice), not by you"),
        "{}",
        stderr_of(&not_holder)
    );
    let waited = cluster.deploylock(
        Identity::Alice,
        &ns,
        &["acquire", "--reason", "mine", "--wait-timeout", "1"],
    );
    expect_exit(&waited, 4, "alice waits 1 s");
    assert!(
        stderr_of(&waited).contains("held by bob (owner label: alice)"),
        "{}",
        stderr_of(&waited)
    );

    let list = cluster.deploylock(Identity::Viewer, &ns, &["list"]);
    expect_exit(&list, 0, "list");
    let text = stdout_of(&list);
    assert_eq!(
        header_of(&text)[..4],
        ["ENVIRONMENT", "STATE", "HOLDER", "OWNER"],
        "{text}"
    );
    let row: Vec<&str> = text
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row[..4], ["production", "Locked", "bob", "alice"], "{text}");

    for (identity, expected) in [
        (Identity::Bob, "You hold this lock."),
        (
            Identity::Alice,
            "You do not hold this lock; bob (owner label: alice) does.",
        ),
    ] {
        let status = cluster.deploylock(identity, &ns, &["status", "-v"]);
        expect_exit(&status, 0, "status -v");
        let text = stdout_of(&status);
        assert!(text.contains(expected), "{identity:?}: {text}");
        let holder_line = text
            .lines()
            .find(|line| line.starts_with("Holder:"))
            .unwrap_or_default();
        assert!(holder_line.ends_with(" bob"), "{text}");
    }
}

// ---------------------------------------------------------------------------
// 2. Races between real processes
// ---------------------------------------------------------------------------

#[tokio::test]
async fn twenty_concurrent_acquires_have_exactly_one_winner() {
    const ROUNDS: usize = 5;
    const RACERS: usize = 20;
    let cluster = cluster();
    let ns = cluster.namespace("cli-race").await;
    let api = locks_api(cluster, &ns).await;
    // Losers authenticated as the winner's user that were not told the
    // winner's owner label (checked last, see below).
    let mut unnamed: Vec<String> = Vec::new();

    for round in 0..ROUNDS {
        let environment = format!("race-{round}");
        let children: Vec<Child> = (0..RACERS)
            .map(|i| {
                let identity = if i % 2 == 0 {
                    Identity::Alice
                } else {
                    Identity::Bob
                };
                let mut command = cluster.deploylock_command(identity, &ns);
                command.args([
                    "-e",
                    &environment,
                    "acquire",
                    "--owner",
                    &format!("runner-{i}"),
                    "--reason",
                    &format!("race round {round}"),
                ]);
                spawn(command)
            })
            .collect();
        let outputs: Vec<Output> = children
            .into_iter()
            .map(|child| match child.wait_with_output() {
                Ok(output) => output,
                Err(err) => panic!("cannot wait for deploylock: {err}"),
            })
            .collect();

        let winners: Vec<usize> = (0..RACERS)
            .filter(|&i| outputs[i].status.code() == Some(0))
            .collect();
        let described: Vec<String> = outputs
            .iter()
            .enumerate()
            .map(|(i, o)| format!("runner-{i}: {:?} {}", o.status.code(), stderr_of(o).trim()))
            .collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: expected exactly one winner:\n{}",
            described.join("\n")
        );
        let winner = winners[0];
        let label = format!("runner-{winner}");
        let winner_user = if winner.is_multiple_of(2) {
            "alice"
        } else {
            "bob"
        };
        assert!(
            stdout_of(&outputs[winner])
                .contains(&format!("acquired by {winner_user} (owner label: {label})")),
            "{}",
            stdout_of(&outputs[winner])
        );

        for (i, output) in outputs.iter().enumerate() {
            if i == winner {
                continue;
            }
            expect_exit(output, 3, &format!("round {round}, loser runner-{i}"));
            expect_clean_error(output, 2, &format!("round {round}, loser runner-{i}"));
            let stderr = stderr_of(output);
            let same_user = i.is_multiple_of(2) == winner.is_multiple_of(2);
            if same_user {
                assert!(
                    stderr.contains("you already hold"),
                    "round {round}, runner-{i} (same user as the winner): {stderr}"
                );
                // Matched with a trailing space or newline so that runner-1
                // does not match runner-10.
                if !stderr.contains(&format!("(owner label: {label})")) {
                    unnamed.push(format!("round {round}, runner-{i}: {}", stderr.trim()));
                }
            } else {
                assert!(
                    stderr.contains(&format!("{winner_user} (owner label: {label})")),
                    "round {round}, runner-{i} not told the winner {label}: {stderr}"
                );
            }
        }

        let lock = stored(&api, &environment).await;
        let holder = holder_of(&lock);
        assert_eq!(holder.owner, label, "round {round}");
        assert_eq!(holder.user, winner_user, "round {round}");
        assert_eq!(
            holdings_since_creation(lock.spec.fencing_token),
            1,
            "round {round}"
        );
        assert_eq!(
            lock.spec.history.len(),
            1,
            "round {round}: {:?}",
            lock.spec.history
        );
    }

    // BUG: a loser authenticated as the same user as the winner is told
    // "you already hold <env> (lock ID …)" without the winner's owner label,
    // so runner-3 cannot tell that runner-7 holds the lock (report.rs,
    // Refusal::AlreadyHeldByYou ignores holder.owner).
    assert!(
        unnamed.is_empty(),
        "{} of {} losers were told \"you already hold\" without the holder's owner label, e.g.:\n{}",
        unnamed.len(),
        ROUNDS * (RACERS - 1),
        unnamed.first().map(String::as_str).unwrap_or_default()
    );
}

// ---------------------------------------------------------------------------
// 3. Expiry
// ---------------------------------------------------------------------------

#[tokio::test]
async fn expired_lock_is_taken_over() {
    let cluster = cluster();
    let ns = cluster.namespace("cli-expired").await;
    let api = locks_api(cluster, &ns).await;
    create_expired_lock(
        &api,
        "production",
        "alice",
        Utc::now() - Duration::minutes(10),
        4,
    )
    .await;

    let took_over = cluster.deploylock(
        Identity::Bob,
        &ns,
        &["acquire", "--reason", "Deploying version 2.2.0"],
    );
    expect_exit(&took_over, 0, "bob takes over an expired lock");
    let stdout = stdout_of(&took_over);
    assert!(
        stdout.contains("took over an expired lock"),
        "no takeover notice: {stdout}"
    );

    let lock = stored(&api, "production").await;
    let holder = holder_of(&lock);
    assert_eq!(holder.user, "bob");
    assert_eq!(holder.reason, "Deploying version 2.2.0");
    assert!(holder.expires_at > Utc::now());
    assert_eq!(last_history(&lock).action, HistoryAction::TookOverExpired);
    assert_eq!(
        holdings_since_creation(lock.spec.fencing_token),
        5,
        "fencing token must increase"
    );

    // `history` tells the whole story: alice's expiry sits before bob's takeover.
    let history = cluster.deploylock(Identity::Viewer, &ns, &["history"]);
    expect_exit(&history, 0, "history");
    let text = stdout_of(&history);
    let actions: Vec<(&str, &str)> = text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            Some((*columns.get(3)?, *columns.get(5)?))
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("Acquired", "alice"),
            ("Expired", "alice"),
            ("TookOverExpired", "bob")
        ],
        "{text}"
    );
}

// ---------------------------------------------------------------------------
// 4. Emergency override
// ---------------------------------------------------------------------------

#[tokio::test]
async fn force_acquire_and_force_release() {
    let cluster = cluster();
    let ns = cluster.namespace("cli-force").await;
    let api = locks_api(cluster, &ns).await;

    let held = cluster.deploylock(
        Identity::Alice,
        &ns,
        &["acquire", "--reason", "Deploying version 2.1.0"],
    );
    expect_exit(&held, 0, "alice acquires");

    let forced = cluster.deploylock(
        Identity::Bob,
        &ns,
        &["acquire", "--force", "--reason", "hotfix"],
    );
    expect_exit(&forced, 0, "bob forces");
    assert!(
        stdout_of(&forced).contains("overrode"),
        "{}",
        stdout_of(&forced)
    );
    let lock = stored(&api, "production").await;
    let holder = holder_of(&lock);
    assert_eq!(holder.user, "bob");
    assert_eq!(holder.lock_type, LockType::Emergency);
    assert_eq!(holder.reason, "hotfix");
    let overrode = holder
        .overrode
        .as_ref()
        .unwrap_or_else(|| panic!("no overrode record: {holder:?}"));
    assert_eq!(overrode.user, "alice");
    assert_eq!(overrode.reason, "Deploying version 2.1.0");
    assert_eq!(last_history(&lock).action, HistoryAction::ForceAcquired);
    assert_eq!(holdings_since_creation(lock.spec.fencing_token), 2);

    let status = status_json(cluster, Identity::Alice, &ns, "production");
    assert_eq!(status["state"], "ForceLocked", "{status}");

    let refused = cluster.deploylock(
        Identity::Alice,
        &ns,
        &["acquire", "--reason", "Deploying version 2.1.0"],
    );
    expect_exit(&refused, 3, "alice acquires a force-locked lock");
    assert!(
        stderr_of(&refused).contains("bob"),
        "{}",
        stderr_of(&refused)
    );

    let before = resource_version(&api, "production").await;
    let no_reason = cluster.deploylock(Identity::Alice, &ns, &["force-release"]);
    expect_exit(&no_reason, 2, "force-release without --reason");
    expect_clean_error(&no_reason, 2, "force-release without --reason");
    assert_eq!(resource_version(&api, "production").await, before);

    let released = cluster.deploylock(
        Identity::Alice,
        &ns,
        &["force-release", "--reason", "incident over"],
    );
    expect_exit(&released, 0, "force-release with a reason");
    let status = status_json(cluster, Identity::Alice, &ns, "production");
    assert_eq!(status["state"], "Available", "{status}");
    let lock = stored(&api, "production").await;
    assert!(lock.spec.holder.is_none());
    let entry = last_history(&lock);
    assert_eq!(entry.action, HistoryAction::ForceReleased);
    assert_eq!(entry.reason, "incident over");
    assert_eq!(entry.by, "alice");
    assert_eq!(entry.owner, "bob");
}

// ---------------------------------------------------------------------------
// 5. Extend
// ---------------------------------------------------------------------------

#[tokio::test]
async fn holder_extends_and_others_cannot() {
    let cluster = cluster();
    let ns = cluster.namespace("cli-extend").await;

    let acquired = cluster.deploylock(
        Identity::Alice,
        &ns,
        &["acquire", "--duration", "30", "--reason", "long deploy"],
    );
    expect_exit(&acquired, 0, "alice acquires for 30 minutes");
    let first = status_json(cluster, Identity::Alice, &ns, "production");
    let first_expiry = json_time(&first["holder"]["expiresAt"], "expiresAt");
    let acquired_at = json_time(&first["holder"]["acquiredAt"], "acquiredAt");
    assert_eq!(first_expiry - acquired_at, Duration::minutes(30));

    let extended = cluster.deploylock(Identity::Alice, &ns, &["extend", "--duration", "2h"]);
    expect_exit(&extended, 0, "alice extends by 2h");
    let second = status_json(cluster, Identity::Alice, &ns, "production");
    let second_expiry = json_time(&second["holder"]["expiresAt"], "expiresAt");
    assert!(
        second_expiry >= first_expiry + Duration::minutes(89),
        "expiry {first_expiry} -> {second_expiry}"
    );
    assert_eq!(
        second["holder"]["lockId"], first["holder"]["lockId"],
        "extending keeps the holding"
    );

    let refused = cluster.deploylock(Identity::Bob, &ns, &["extend", "--duration", "2h"]);
    expect_exit(&refused, 5, "bob extends alice's lock");
    expect_clean_error(&refused, 2, "bob's extend");
    assert!(
        stderr_of(&refused).contains("alice"),
        "{}",
        stderr_of(&refused)
    );

    let again = cluster.deploylock(
        Identity::Alice,
        &ns,
        &["acquire", "--extend", "--duration", "3h"],
    );
    expect_exit(&again, 0, "alice acquire --extend");
    let third = status_json(cluster, Identity::Alice, &ns, "production");
    let third_expiry = json_time(&third["holder"]["expiresAt"], "expiresAt");
    assert!(
        third_expiry >= second_expiry + Duration::minutes(59),
        "expiry {second_expiry} -> {third_expiry}"
    );
    assert_eq!(third["holder"]["user"], "alice");
    assert_eq!(
        holdings_since_creation(third["fencingToken"].as_i64().unwrap_or(0)),
        1
    );
}

/// A refusal's hint, pasted as is (no -n, no --kubeconfig added, no
/// KUBECONFIG), acts on the same lock; with `-o json` the refusal is also a
/// JSON error object on stdout.
#[tokio::test]
async fn refusal_hints_work_when_pasted_and_json_errors() {
    let cluster = cluster();
    let ns = cluster.namespace("cli-hints").await;
    let held = cluster.deploylock(Identity::Alice, &ns, &["acquire", "--reason", "deploying"]);
    expect_exit(&held, 0, "alice acquires");

    let refused = cluster.deploylock(Identity::Bob, &ns, &["acquire", "--reason", "mine"]);
    expect_exit(&refused, 3, "bob is refused");
    let stderr = stderr_of(&refused);
    let kubeconfig = cluster.kubeconfig(Identity::Bob);
    let hint = stderr
        .split('`')
        .find(|part| part.starts_with("deploylock wait "))
        .unwrap_or_else(|| panic!("no wait hint in:\n{stderr}"));
    assert_eq!(
        hint,
        format!(
            "deploylock wait -e production -n {ns} --kubeconfig {}",
            kubeconfig.display()
        ),
        "{stderr}"
    );
    // The hint as a shell would run it, from another directory, with no
    // KUBECONFIG: it waits for alice's lock, not another namespace's.
    let words: Vec<&str> = hint.split_whitespace().skip(1).collect();
    let pasted = Command::new(env!("CARGO_BIN_EXE_deploylock"))
        .args(&words)
        .args(["--wait-timeout", "1"])
        .env_remove("KUBECONFIG")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap_or_else(|err| panic!("cannot run the pasted hint: {err}"));
    expect_exit(&pasted, 4, "the pasted wait hint");
    assert!(
        stderr_of(&pasted).contains("timed out waiting for production: still held by alice"),
        "{}",
        stderr_of(&pasted)
    );

    let json = cluster.deploylock(
        Identity::Bob,
        &ns,
        &["acquire", "--reason", "mine", "-o", "json"],
    );
    expect_exit(&json, 3, "bob is refused, -o json");
    // The same lines on stderr (but for the "(in …)" of the moment).
    let until = |text: &str| -> String {
        text.lines()
            .map(|line| line.split(" (in ").next().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        until(&stderr_of(&json)),
        until(&stderr),
        "stderr is the same with -o json"
    );
    let parsed: Value = serde_json::from_slice(&json.stdout)
        .unwrap_or_else(|err| panic!("the refusal is not JSON ({err}):\n{}", stdout_of(&json)));
    let error = &parsed["error"];
    assert_eq!(error["code"], 3, "{parsed}");
    assert_eq!(error["reason"], "HeldByOther", "{parsed}");
    assert_eq!(error["holder"]["user"], "alice", "{parsed}");
    assert!(
        error["message"].as_str().is_some_and(
            |message| message.starts_with("production: the lock is held by alice since ")
        ),
        "{parsed}"
    );
    let free = cluster.deploylock(
        Identity::Bob,
        &ns,
        &["-e", "staging", "release", "-o", "json"],
    );
    expect_exit(&free, 0, "release of a free lock, -o json");
    let not_holder = cluster.deploylock(Identity::Bob, &ns, &["release", "-o", "json"]);
    expect_exit(&not_holder, 5, "bob releases alice's lock, -o json");
    let parsed: Value = serde_json::from_slice(&not_holder.stdout).unwrap_or_default();
    assert_eq!(parsed["error"]["code"], 5, "{}", stdout_of(&not_holder));
    assert_eq!(parsed["error"]["reason"], "NotHolder");
}

/// `acquire --extend` renews one's own expired holding (same lock ID and
/// fencing token, an Extended entry, a warning saying how long it was
/// unprotected) while plain `extend` exits 7; it is refused when someone
/// waits for the lock or took it over.
#[tokio::test]
async fn acquire_extend_renews_an_expired_holding() {
    let cluster = cluster();
    let ns = cluster.namespace("cli-renew").await;
    let api = locks_api(cluster, &ns).await;

    let acquired = cluster.deploylock(
        Identity::Alice,
        &ns,
        &["acquire", "--duration", "1m", "--reason", "short deploy"],
    );
    expect_exit(&acquired, 0, "alice acquires for a minute");
    let before = stored(&api, "production").await;
    let lock_id = holder_of(&before).lock_id.clone();
    // `wait` returns when the lock is Expired on the API server's clock
    // (a watch and the holder's expiry, not a sleep).
    let waited = cluster.deploylock(Identity::Viewer, &ns, &["wait", "--wait-timeout", "120"]);
    expect_exit(&waited, 0, "the holding expires");
    assert_eq!(
        status_json(cluster, Identity::Viewer, &ns, "production")["state"],
        "Expired"
    );

    let extend = cluster.deploylock(Identity::Alice, &ns, &["extend"]);
    expect_exit(&extend, 7, "plain extend of an expired holding");
    assert_eq!(
        stored(&api, "production").await.spec,
        before.spec,
        "a refused extend changes nothing"
    );

    let renewed = cluster.deploylock(
        Identity::Alice,
        &ns,
        &["acquire", "--extend", "--duration", "5"],
    );
    expect_exit(&renewed, 0, "alice renews with acquire --extend");
    let warning = stderr_of(&renewed);
    let expired_at = holder_of(&before)
        .expires_at
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    assert!(
        warning.starts_with("deploylock: warning: your holding of production had expired at ")
            && warning.contains(&expired_at)
            && warning.contains(" unprotected; nobody took it over"),
        "{warning}"
    );
    assert!(
        stdout_of(&renewed).contains("production extended by alice until "),
        "{}",
        stdout_of(&renewed)
    );
    let after = stored(&api, "production").await;
    let holder = holder_of(&after);
    assert_eq!(holder.lock_id, lock_id, "the same holding");
    assert_eq!(after.spec.fencing_token, before.spec.fencing_token);
    assert!(holder.expires_at > Utc::now() + Duration::minutes(4));
    let entry = last_history(&after);
    assert_eq!(entry.action, HistoryAction::Extended);
    assert_eq!(entry.lock_id, lock_id);
    assert_eq!(
        status_json(cluster, Identity::Viewer, &ns, "production")["state"],
        "Locked"
    );

    // Someone waits for an expired holding: they go first.
    let expired = Utc::now() - Duration::minutes(1);
    let mut staging = create_expired_lock(&api, "staging", "alice", expired, 7).await;
    let waiter = json!({
        "id": "carol-waiter",
        "user": "carol",
        "owner": "carol",
        "reason": "next deploy",
        "since": Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        "heartbeatAt": Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
    });
    staging
        .spec
        .queue
        .push(serde_json::from_value(waiter).unwrap_or_else(|err| panic!("not a waiter: {err}")));
    let staging = match api
        .replace("staging", &PostParams::default(), &staging)
        .await
    {
        Ok(lock) => lock,
        Err(err) => panic!("cannot queue carol: {err}"),
    };
    let queued = cluster.deploylock(
        Identity::Alice,
        &ns,
        &["-e", "staging", "acquire", "--extend"],
    );
    expect_exit(&queued, 3, "renewal with a live waiter");
    assert!(
        stderr_of(&queued).contains("carol is next"),
        "{}",
        stderr_of(&queued)
    );
    assert_eq!(stored(&api, "staging").await.spec, staging.spec);

    // Someone else took it over: not alice's to renew.
    create_expired_lock(&api, "qa", "alice", expired, 7).await;
    let taken = cluster.deploylock(
        Identity::Bob,
        &ns,
        &["-e", "qa", "acquire", "--reason", "taking over"],
    );
    expect_exit(&taken, 0, "bob takes over qa");
    let refused = cluster.deploylock(Identity::Alice, &ns, &["-e", "qa", "acquire", "--extend"]);
    expect_exit(&refused, 5, "renewal of a holding taken over");
    assert_eq!(holder_of(&stored(&api, "qa").await).user, "bob");
}

// ---------------------------------------------------------------------------
// 6. Bad input, unreachable cluster, missing CRD
// ---------------------------------------------------------------------------

#[tokio::test]
async fn bad_input_changes_nothing() {
    let cluster = cluster();
    let ns = cluster.namespace("cli-bad-input").await;
    let api = locks_api(cluster, &ns).await;
    let held = cluster.deploylock(
        Identity::Alice,
        &ns,
        &["acquire", "--reason", "Deploying version 2.1.0"],
    );
    expect_exit(&held, 0, "alice acquires");
    let before = resource_version(&api, "production").await;

    let too_many_keys = format!(
        "{{{}}}",
        (0..33)
            .map(|i| format!("\"key{i}\":\"v\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let long_value = format!("{{\"notes\":\"{}\"}}", "x".repeat(2000));
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "bad environment name",
            vec!["-e", "Bad Name!", "acquire", "--reason", "r"],
        ),
        (
            "zero duration",
            vec!["acquire", "--reason", "r", "--duration", "0"],
        ),
        (
            "negative duration",
            vec!["acquire", "--reason", "r", "--duration", "-5"],
        ),
        (
            "non-numeric duration",
            vec!["acquire", "--reason", "r", "--duration", "abc"],
        ),
        (
            "duration over 7 days",
            vec!["acquire", "--reason", "r", "--duration", "100000"],
        ),
        (
            "metadata not an object",
            vec!["acquire", "--reason", "r", "--metadata", "[1,2]"],
        ),
        (
            "metadata not JSON",
            vec!["acquire", "--reason", "r", "--metadata", "{bad json"],
        ),
        (
            "metadata with 33 keys",
            vec!["acquire", "--reason", "r", "--metadata", &too_many_keys],
        ),
        (
            "metadata value of 2000 characters",
            vec!["acquire", "--reason", "r", "--metadata", &long_value],
        ),
        ("no reason", vec!["acquire"]),
        ("unknown flag", vec!["acquire", "--reason", "r", "--bogus"]),
    ];
    for (what, args) in &cases {
        for identity in [Identity::Bob, Identity::Alice] {
            let label = format!("{what} ({identity:?})");
            let output = cluster.deploylock(identity, &ns, args);
            expect_exit(&output, 2, &label);
            expect_clean_error(&output, 2, &label);
            assert!(
                stdout_of(&output).is_empty(),
                "{label}: {}",
                stdout_of(&output)
            );
            assert_eq!(
                resource_version(&api, "production").await,
                before,
                "{label} changed the lock"
            );
        }
    }
    let listed = match api.list(&Default::default()).await {
        Ok(list) => list.items.len(),
        Err(err) => panic!("cannot list: {err}"),
    };
    assert_eq!(listed, 1, "bad input created a lock");
}

#[tokio::test]
async fn unreachable_cluster_exits_6() {
    let cluster = cluster();
    let alice = match std::fs::read_to_string(cluster.kubeconfig(Identity::Alice)) {
        Ok(text) => text,
        Err(err) => panic!("cannot read alice's kubeconfig: {err}"),
    };
    let mut replaced = 0;
    let unreachable: String = alice
        .lines()
        .map(|line| {
            if line.trim_start().starts_with("server:") {
                replaced += 1;
                "    server: https://127.0.0.1:1".to_string()
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(replaced, 1, "unexpected kubeconfig:\n{alice}");
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("cannot create a temp dir: {err}"));
    let kubeconfig = dir.path().join("unreachable.kubeconfig");
    if let Err(err) = std::fs::write(&kubeconfig, unreachable + "\n") {
        panic!("cannot write {}: {err}", kubeconfig.display());
    }

    for args in [
        vec!["status"],
        vec!["acquire", "--reason", "x"],
        vec!["release"],
    ] {
        let output = deploylock_with(&kubeconfig, "default", &args);
        let what = format!("{args:?} against an unreachable cluster");
        expect_exit(&output, 6, &what);
        assert!(
            stderr_of(&output).contains("cannot reach the Kubernetes API server"),
            "{what}: {}",
            stderr_of(&output)
        );
        // BUG: before its own line, deploylock lets kube_client's tracing
        // ERROR log through to stderr (ANSI-coloured, "failed with error
        // client error (Connect)"): the default filter in
        // src/bin/deploylock.rs is "warn" for every crate, not only
        // deploylock's.
        expect_clean_error(&output, 1, &what);
    }
}

fn deploylock_with(kubeconfig: &Path, namespace: &str, args: &[&str]) -> Output {
    let result = Command::new(env!("CARGO_BIN_EXE_deploylock"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("-n")
        .arg(namespace)
        .args(args)
        .env_remove("KUBECONFIG")
        .output();
    match result {
        Ok(output) => output,
        Err(err) => panic!("cannot run deploylock: {err}"),
    }
}

#[tokio::test]
async fn cluster_without_the_crd_exits_6() {
    let mut bare = ExtraCluster::start("bare-cluster");
    let kubeconfig = bare.admin_kubeconfig();

    for args in [vec!["status"], vec!["acquire", "--reason", "x"]] {
        let output = deploylock_with(&kubeconfig, "default", &args);
        let what = format!("{args:?} on a cluster without the CRD");
        expect_exit(&output, 6, &what);
        expect_clean_error(&output, 1, &what);
        assert!(
            stderr_of(&output).contains("CRD is not installed"),
            "{what}: {}",
            stderr_of(&output)
        );
    }

    let down = bare.stop();
    assert!(
        down.status.success(),
        "hack/cluster.sh down failed: {}",
        stderr_of(&down)
    );
    assert!(
        !bare.dir.exists(),
        "cluster.sh down left {}",
        bare.dir.display()
    );
}

// ---------------------------------------------------------------------------
// 7. Waiting
// ---------------------------------------------------------------------------

#[tokio::test]
async fn wait_and_acquire_wait_follow_the_release() {
    let cluster = cluster();
    let ns = cluster.namespace("cli-wait").await;
    let api = locks_api(cluster, &ns).await;
    let held = cluster.deploylock(
        Identity::Alice,
        &ns,
        &["acquire", "--reason", "Deploying version 2.1.0"],
    );
    expect_exit(&held, 0, "alice acquires");

    let timed_out = cluster.deploylock(Identity::Bob, &ns, &["wait", "--wait-timeout", "2"]);
    expect_exit(&timed_out, 4, "bob waits 2 s");
    assert!(
        stderr_of(&timed_out).contains("timed out") && stderr_of(&timed_out).contains("alice"),
        "{}",
        stderr_of(&timed_out)
    );

    // `wait` returns once alice releases.
    let mut command = cluster.deploylock_command(Identity::Bob, &ns);
    command.args(["wait", "--wait-timeout", "60"]);
    let mut waiter = spawn(command);
    let (seen, reader) = read_stderr_until(&mut waiter, "waiting for");
    assert!(seen.contains("alice"), "{seen}");
    let released = cluster.deploylock(Identity::Alice, &ns, &["release"]);
    expect_exit(&released, 0, "alice releases");
    let waited = finish(waiter, seen, reader);
    expect_exit(&waited, 0, "bob's wait after the release");
    assert!(
        stderr_of(&waited).contains("production is Available"),
        "{}",
        stderr_of(&waited)
    );

    // `acquire --wait-timeout` takes the lock once alice releases.
    let held = cluster.deploylock(
        Identity::Alice,
        &ns,
        &["acquire", "--reason", "Deploying version 2.1.1"],
    );
    expect_exit(&held, 0, "alice acquires again");
    let mut command = cluster.deploylock_command(Identity::Bob, &ns);
    command.args(["acquire", "--wait-timeout", "60", "--reason", "next"]);
    let mut acquirer = spawn(command);
    let (seen, reader) = read_stderr_until(&mut acquirer, "waiting for");
    assert!(seen.contains("alice"), "{seen}");
    assert_eq!(holder_of(&stored(&api, "production").await).user, "alice");
    let released = cluster.deploylock(Identity::Alice, &ns, &["release"]);
    expect_exit(&released, 0, "alice releases again");
    let acquired = finish(acquirer, seen, reader);
    expect_exit(
        &acquired,
        0,
        "bob's acquire --wait-timeout after the release",
    );
    assert!(
        stdout_of(&acquired).contains("acquired by bob"),
        "{}",
        stdout_of(&acquired)
    );
    // The waiter's last progress line says it acquired the lock.
    assert!(
        stderr_of(&acquired).contains("deploylock: production acquired by bob (waited "),
        "{}",
        stderr_of(&acquired)
    );
    let lock = stored(&api, "production").await;
    let holder = holder_of(&lock);
    assert_eq!(holder.user, "bob");
    assert_eq!(holder.reason, "next");
    assert_eq!(last_history(&lock).action, HistoryAction::Acquired);
}

// ---------------------------------------------------------------------------
// 8. Output formats
// ---------------------------------------------------------------------------

#[tokio::test]
async fn status_list_and_history_outputs() {
    let cluster = cluster();
    let ns = cluster.namespace("cli-output").await;

    let steps: [&[&str]; 4] = [
        &["acquire", "--reason", "Deploying version 2.0.0"],
        &["extend", "--duration", "1h"],
        &["release"],
        &[
            "acquire",
            "--reason",
            "Deploying version 2.1.0",
            "--metadata",
            r#"{"version":"2.1.0"}"#,
            "--deployment-id",
            "pipeline-42",
        ],
    ];
    for args in steps {
        let output = cluster.deploylock(Identity::Alice, &ns, args);
        expect_exit(&output, 0, &format!("alice {args:?}"));
    }
    let staging = cluster.deploylock(
        Identity::Bob,
        &ns,
        &["-e", "staging", "acquire", "--reason", "Testing 3.0.0-rc1"],
    );
    expect_exit(&staging, 0, "bob acquires staging");
    // qa was held and given back: Available, listed only with --all.
    for args in [
        &["-e", "qa", "acquire", "--reason", "Testing"][..],
        &["-e", "qa", "release"],
    ] {
        let output = cluster.deploylock(Identity::Bob, &ns, args);
        expect_exit(&output, 0, &format!("bob {args:?}"));
    }

    // status, as a table.
    let status = cluster.deploylock(Identity::Viewer, &ns, &["status"]);
    expect_exit(&status, 0, "status");
    let text = stdout_of(&status);
    assert!(text.contains("State:") && text.contains("Locked"), "{text}");
    assert!(text.contains("Holder:") && text.contains("alice"), "{text}");
    assert!(text.contains("Owner:"), "{text}");
    assert!(text.contains("Deploying version 2.1.0"), "{text}");

    // status -v: metadata and deployment ID.
    let verbose = cluster.deploylock(Identity::Viewer, &ns, &["status", "-v"]);
    expect_exit(&verbose, 0, "status -v");
    let text = stdout_of(&verbose);
    assert!(text.contains("version=2.1.0"), "{text}");
    assert!(text.contains("pipeline-42"), "{text}");
    assert!(
        text.contains("You do not hold this lock; alice does."),
        "{text}"
    );
    let own = cluster.deploylock(Identity::Alice, &ns, &["status", "-v"]);
    expect_exit(&own, 0, "alice's status -v");
    assert!(
        stdout_of(&own).contains("You hold this lock."),
        "{}",
        stdout_of(&own)
    );
    let free = cluster.deploylock(Identity::Alice, &ns, &["-e", "qa", "status", "-v"]);
    expect_exit(&free, 0, "status -v of qa");
    assert!(
        stdout_of(&free).contains("Nobody holds this lock."),
        "{}",
        stdout_of(&free)
    );

    // status -o yaml.
    let yaml = cluster.deploylock(Identity::Viewer, &ns, &["status", "-o", "yaml"]);
    expect_exit(&yaml, 0, "status -o yaml");
    let parsed: serde_yaml::Value = match serde_yaml::from_slice(&yaml.stdout) {
        Ok(value) => value,
        Err(err) => panic!("status -o yaml is not YAML ({err}):\n{}", stdout_of(&yaml)),
    };
    assert_eq!(
        parsed["environment"].as_str(),
        Some("production"),
        "{parsed:?}"
    );
    assert_eq!(parsed["state"].as_str(), Some("Locked"), "{parsed:?}");
    assert_eq!(
        parsed["holder"]["owner"].as_str(),
        Some("alice"),
        "{parsed:?}"
    );
    assert_eq!(
        parsed["holder"]["metadata"]["version"].as_str(),
        Some("2.1.0"),
        "{parsed:?}"
    );

    // list, in this namespace.
    let list = cluster.deploylock(Identity::Viewer, &ns, &["list"]);
    expect_exit(&list, 0, "list");
    let text = stdout_of(&list);
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "ENVIRONMENT",
            "STATE",
            "HOLDER",
            "OWNER",
            "REASON",
            "EXPIRES",
            "AGE"
        ],
        "{text}"
    );
    let rows: Vec<&str> = lines.collect();
    // The active locks only: qa is Available.
    assert_eq!(rows.len(), 2, "{text}");
    assert!(!rows.iter().any(|row| row.starts_with("qa ")), "{text}");
    let production = rows
        .iter()
        .find(|row| row.starts_with("production "))
        .unwrap_or_else(|| panic!("no production row:\n{text}"));
    assert!(
        production.contains("Locked")
            && production.contains("alice")
            && production.contains("Deploying version 2.1.0"),
        "{text}"
    );
    let staging = rows
        .iter()
        .find(|row| row.starts_with("staging "))
        .unwrap_or_else(|| panic!("no staging row:\n{text}"));
    assert!(
        staging.contains("bob") && staging.contains("Testing 3.0.0-rc1"),
        "{text}"
    );

    // list --all adds the Available ones.
    let every = cluster.deploylock(Identity::Viewer, &ns, &["list", "--all"]);
    expect_exit(&every, 0, "list --all");
    let text = stdout_of(&every);
    assert_eq!(text.lines().count(), 4, "{text}");
    let qa = text
        .lines()
        .find(|row| row.starts_with("qa "))
        .unwrap_or_else(|| panic!("no qa row with --all:\n{text}"));
    assert_eq!(
        qa.split_whitespace().take(3).collect::<Vec<_>>(),
        ["qa", "Available", "-"],
        "{text}"
    );
    let active_json = cluster.deploylock(Identity::Viewer, &ns, &["list", "-o", "json"]);
    expect_exit(&active_json, 0, "list -o json");
    let parsed: Value = serde_json::from_slice(&active_json.stdout).unwrap_or_default();
    assert_eq!(parsed.as_array().map(Vec::len), Some(2), "{parsed}");

    // list -A: a NAMESPACE column, and this namespace's rows.
    let all = cluster.deploylock(Identity::Viewer, &ns, &["list", "-A"]);
    expect_list_all_exit(&all, &ns);
    let text = stdout_of(&all);
    let header = header_of(&text);
    assert_eq!(
        header,
        [
            "NAMESPACE",
            "ENVIRONMENT",
            "STATE",
            "HOLDER",
            "OWNER",
            "REASON",
            "EXPIRES",
            "AGE"
        ],
        "{text}"
    );
    let ours: Vec<&str> = text
        .lines()
        .filter(|line| line.split_whitespace().next() == Some(ns.as_str()))
        .collect();
    assert_eq!(ours.len(), 2, "{text}");

    // history -o json: every transition, oldest first.
    let history = cluster.deploylock(Identity::Viewer, &ns, &["history", "-o", "json"]);
    expect_exit(&history, 0, "history -o json");
    let parsed: Value = match serde_json::from_slice(&history.stdout) {
        Ok(value) => value,
        Err(err) => panic!(
            "history -o json is not JSON ({err}):\n{}",
            stdout_of(&history)
        ),
    };
    let actions: Vec<&str> = parsed
        .as_array()
        .unwrap_or_else(|| panic!("history -o json is not an array: {parsed}"))
        .iter()
        .map(|entry| entry["action"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(actions, ["Acquired", "Extended", "Released", "Acquired"]);

    // history as a table.
    let table = cluster.deploylock(Identity::Viewer, &ns, &["history"]);
    expect_exit(&table, 0, "history");
    let text = stdout_of(&table);
    assert!(text.starts_with("AT"), "{text}");
    assert_eq!(text.lines().count(), 5, "{text}");
}

// ---------------------------------------------------------------------------
// 9. Clock skew: the API server's clock decides, not the client's
// ---------------------------------------------------------------------------

/// `deploylock` as `identity` under libfaketime, its wall clock shifted by
/// `offset` (e.g. "+1h"); monotonic time is left alone.
fn deploylock_skewed(
    cluster: &TestCluster,
    identity: Identity,
    namespace: &str,
    offset: &str,
    args: &[&str],
) -> Output {
    let result = Command::new("faketime")
        .args([
            "-f",
            offset,
            env!("CARGO_BIN_EXE_deploylock"),
            "--kubeconfig",
        ])
        .arg(cluster.kubeconfig(identity))
        .args(["-n", namespace])
        .args(args)
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env_remove("KUBECONFIG")
        .output();
    match result {
        Ok(output) => output,
        Err(err) => panic!(
            "cannot run `faketime` ({err}): libfaketime is required for the clock-skew tests (hack/ensure-deps.sh installs it)"
        ),
    }
}

#[tokio::test]
async fn client_clock_skew_does_not_decide_expiry() {
    // libfaketime must be present and effective, or this test proves nothing.
    let probe = Command::new("faketime")
        .args(["-f", "+1h", "date", "+%s"])
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run `faketime` ({err}): libfaketime is required for the clock-skew tests"
            )
        });
    let faked: i64 = String::from_utf8_lossy(&probe.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| {
            panic!(
                "faketime date printed {:?}: {}",
                stdout_of(&probe),
                stderr_of(&probe)
            )
        });
    let skew = faked - Utc::now().timestamp();
    assert!(
        (3500..=3700).contains(&skew),
        "faketime -f +1h shifted the clock by {skew}s"
    );

    let cluster = cluster();
    let ns = cluster.namespace("cli-skew").await;
    let api = locks_api(cluster, &ns).await;

    // A live 30-minute lock looks expired to a client one hour ahead.
    let held = cluster.deploylock(
        Identity::Alice,
        &ns,
        &[
            "acquire",
            "--duration",
            "30",
            "--reason",
            "Deploying version 2.1.0",
        ],
    );
    expect_exit(&held, 0, "alice acquires");
    let before = resource_version(&api, "production").await;
    let ahead = deploylock_skewed(
        cluster,
        Identity::Bob,
        &ns,
        "+1h",
        &["acquire", "--reason", "clock ahead"],
    );
    expect_exit(&ahead, 3, "bob one hour ahead must not steal a live lock");
    assert!(stderr_of(&ahead).contains("alice"), "{}", stderr_of(&ahead));
    assert_eq!(resource_version(&api, "production").await, before);
    assert_eq!(holder_of(&stored(&api, "production").await).user, "alice");

    // An expired lock looks live to a client one hour behind.
    create_expired_lock(
        &api,
        "staging",
        "alice",
        Utc::now() - Duration::minutes(1),
        1,
    )
    .await;
    let behind = deploylock_skewed(
        cluster,
        Identity::Bob,
        &ns,
        "-1h",
        &["-e", "staging", "acquire", "--reason", "clock behind"],
    );
    expect_exit(&behind, 0, "bob one hour behind takes over an expired lock");
    let lock = stored(&api, "staging").await;
    let holder = holder_of(&lock);
    assert_eq!(holder.user, "bob");
    assert_eq!(last_history(&lock).action, HistoryAction::TookOverExpired);
    // Times written are the server's, not the skewed client's.
    let drift = (holder.acquired_at - Utc::now()).num_seconds().abs();
    assert!(
        drift < 300,
        "acquiredAt {} is {drift}s off",
        holder.acquired_at
    );
}

// ---------------------------------------------------------------------------
// 9. Hostile strings, bad namespaces, malformed objects
// ---------------------------------------------------------------------------

/// An OSC 8 hyperlink, a clear-screen and a right-to-left override: what a
/// hostile owner or reason would carry to other users' terminals.
const EVIL: &str = "\u{1b}]8;;http://evil\u{7}\u{1b}[2J\u{202e}";
/// `EVIL` as deploylock shows it.
const EVIL_SHOWN: &str = "\\x1b]8;;http://evil\\x07\\x1b[2J\\u202e";

/// No character a terminal would act on (line breaks between lines aside).
#[track_caller]
fn expect_no_raw_controls(text: &str, what: &str) {
    let raw: Vec<char> = text
        .chars()
        .filter(|&c| {
            (c.is_control() && c != '\n')
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .collect();
    assert!(
        raw.is_empty(),
        "{what}: raw control characters {raw:?} in:\n{text:?}"
    );
}

#[tokio::test]
async fn hostile_strings_are_shown_escaped_and_kept_exact_in_json() {
    let cluster = cluster();
    let ns = cluster.namespace("cli-hostile").await;
    let api = locks_api(cluster, &ns).await;
    let owner = format!("mallory{EVIL}");
    let reason = format!("Deploying{EVIL}\nnow");
    let metadata = json!({ "version": format!("2.1.0{EVIL}") }).to_string();
    let deployment = format!("pipeline{EVIL}");
    // The CLI refuses such text (as the admission policy does) and writes
    // nothing...
    let refused = cluster.deploylock(
        Identity::Alice,
        &ns,
        &[
            "acquire",
            "--owner",
            &owner,
            "--reason",
            &reason,
            "--metadata",
            &metadata,
            "--deployment-id",
            &deployment,
        ],
    );
    expect_exit(&refused, 2, "alice acquires with hostile strings");
    expect_no_raw_controls(&stderr_of(&refused), "the CLI's refusal");
    assert!(
        api.get_opt("production").await.ok().flatten().is_none(),
        "a refused acquire wrote a lock"
    );
    // ...but a lock stored before that rule, or in a namespace the policy
    // does not enforce, may carry it: written here through the API.
    let now = chrono::Utc::now();
    let mut object = testkit::torture_hostile::new_lock("production", "alice", now);
    object["spec"]["holder"]["owner"] = json!(owner);
    object["spec"]["holder"]["reason"] = json!(reason);
    object["spec"]["holder"]["metadata"] =
        serde_json::from_str(&metadata).unwrap_or_else(|err| panic!("metadata: {err}"));
    object["spec"]["holder"]["deploymentId"] = json!(deployment);
    object["spec"]["history"][0]["owner"] = json!(owner);
    object["spec"]["history"][0]["reason"] = json!(reason);
    let created = cluster.kubectl_with_input(
        Identity::Admin,
        &["create", "-n", &ns, "-f", "-"],
        &object.to_string(),
    );
    expect_exit(
        &created,
        0,
        "the lock with hostile strings, through the API",
    );
    let lock = stored(&api, "production").await;
    assert_eq!(holder_of(&lock).owner, owner, "stored exactly");
    assert_eq!(holder_of(&lock).reason, reason, "stored exactly");

    let owner_shown = format!("mallory{EVIL_SHOWN}");
    let reason_shown = format!("Deploying{EVIL_SHOWN}\\nnow");
    let human: [(&str, &[&str], Vec<String>); 6] = [
        (
            "status",
            &["status"],
            vec![owner_shown.clone(), reason_shown.clone()],
        ),
        (
            "status -v",
            &["status", "-v"],
            vec![
                owner_shown.clone(),
                reason_shown.clone(),
                format!("version=2.1.0{EVIL_SHOWN}"),
                format!("pipeline{EVIL_SHOWN}"),
            ],
        ),
        (
            "list",
            &["list"],
            vec![owner_shown.clone(), reason_shown.clone()],
        ),
        (
            "list -A",
            &["list", "-A"],
            vec![owner_shown.clone(), reason_shown.clone()],
        ),
        (
            "history",
            &["history"],
            vec![owner_shown.clone(), reason_shown.clone()],
        ),
        (
            "wait",
            &["wait", "--wait-timeout", "0"],
            vec![owner_shown.clone(), reason_shown.clone()],
        ),
    ];
    for (what, args, shown) in human {
        let output = cluster.deploylock(Identity::Viewer, &ns, args);
        match what {
            "list -A" => expect_list_all_exit(&output, &ns),
            "wait" => expect_exit(&output, 4, what),
            _ => expect_exit(&output, 0, what),
        }
        let text = format!("{}{}", stdout_of(&output), stderr_of(&output));
        expect_no_raw_controls(&text, what);
        for expected in shown {
            assert!(
                text.contains(&expected),
                "{what}: {expected:?} not shown in:\n{text}"
            );
        }
    }
    // The list row stays one row: the reason's line break is shown, not obeyed.
    let list = cluster.deploylock(Identity::Viewer, &ns, &["list"]);
    expect_exit(&list, 0, "list");
    assert_eq!(stdout_of(&list).lines().count(), 2, "{}", stdout_of(&list));

    // Another user's refusal, progress lines and timeout.
    let refused = cluster.deploylock(Identity::Bob, &ns, &["acquire", "--reason", "mine"]);
    expect_exit(&refused, 3, "bob is refused");
    expect_clean_error(&refused, 2, "bob's refusal");
    expect_no_raw_controls(&stderr_of(&refused), "bob's refusal");
    assert!(
        stderr_of(&refused).contains(&owner_shown) && stderr_of(&refused).contains(&reason_shown),
        "{}",
        stderr_of(&refused)
    );
    let waited = cluster.deploylock(
        Identity::Bob,
        &ns,
        &["acquire", "--reason", "mine", "--wait-timeout", "1"],
    );
    expect_exit(&waited, 4, "bob waits 1 s");
    expect_no_raw_controls(&stderr_of(&waited), "bob's wait");
    assert!(
        stderr_of(&waited).contains("waiting for production")
            && stderr_of(&waited).contains(&owner_shown),
        "{}",
        stderr_of(&waited)
    );

    // JSON and YAML are exact.
    let status = status_json(cluster, Identity::Viewer, &ns, "production");
    assert_eq!(status["holder"]["owner"].as_str(), Some(owner.as_str()));
    assert_eq!(status["holder"]["reason"].as_str(), Some(reason.as_str()));
    assert_eq!(
        status["holder"]["metadata"]["version"].as_str(),
        Some(format!("2.1.0{EVIL}").as_str())
    );
    let list = cluster.deploylock(Identity::Viewer, &ns, &["list", "-o", "json"]);
    expect_exit(&list, 0, "list -o json");
    let parsed: Value = serde_json::from_slice(&list.stdout)
        .unwrap_or_else(|err| panic!("list -o json is not JSON ({err}):\n{}", stdout_of(&list)));
    assert_eq!(parsed[0]["holder"]["owner"].as_str(), Some(owner.as_str()));
    let history = cluster.deploylock(Identity::Viewer, &ns, &["history", "-o", "yaml"]);
    expect_exit(&history, 0, "history -o yaml");
    let parsed: serde_yaml::Value = serde_yaml::from_slice(&history.stdout).unwrap_or_else(|err| {
        panic!(
            "history -o yaml is not YAML ({err}):\n{}",
            stdout_of(&history)
        )
    });
    assert_eq!(parsed[0]["owner"].as_str(), Some(owner.as_str()));
    assert_eq!(parsed[0]["reason"].as_str(), Some(reason.as_str()));
}

/// Alice's kubeconfig with its server replaced by a closed port and, if
/// given, its context's namespace replaced: a request would exit 6.
fn offline_kubeconfig(
    cluster: &TestCluster,
    dir: &Path,
    context_namespace: Option<&str>,
) -> std::path::PathBuf {
    let alice = std::fs::read_to_string(cluster.kubeconfig(Identity::Alice))
        .unwrap_or_else(|err| panic!("cannot read alice's kubeconfig: {err}"));
    let mut replaced = (0, 0);
    let text: String = alice
        .lines()
        .map(|line| match line.trim_start() {
            l if l.starts_with("server:") => {
                replaced.0 += 1;
                "    server: https://127.0.0.1:1".to_string()
            }
            l if l.starts_with("namespace:") && context_namespace.is_some() => {
                replaced.1 += 1;
                format!("    namespace: {:?}", context_namespace.unwrap_or_default())
            }
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(replaced.0, 1, "unexpected kubeconfig:\n{alice}");
    assert_eq!(
        replaced.1,
        usize::from(context_namespace.is_some()),
        "unexpected kubeconfig:\n{alice}"
    );
    let path = dir.join(format!("offline-{}.kubeconfig", replaced.1));
    if let Err(err) = std::fs::write(&path, text + "\n") {
        panic!("cannot write {}: {err}", path.display());
    }
    path
}

#[tokio::test]
async fn bad_namespaces_are_refused_before_any_request() {
    let cluster = cluster();
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("cannot create a temp dir: {err}"));
    let offline = offline_kubeconfig(cluster, dir.path(), None);
    let too_long = "n".repeat(64);
    for namespace in [
        "BAD NS",
        "../kube-system",
        "",
        too_long.as_str(),
        "default/../kube-system",
        "Default",
    ] {
        for args in [
            vec!["status"],
            vec!["list"],
            vec!["acquire", "--reason", "x"],
        ] {
            let what = format!("-n {namespace:?} {args:?}");
            // Against a closed port: a request would exit 6, not 2.
            let output = deploylock_with(&offline, namespace, &args);
            expect_exit(&output, 2, &what);
            expect_clean_error(&output, 1, &what);
            assert!(
                stderr_of(&output).contains("invalid namespace"),
                "{what}: {}",
                stderr_of(&output)
            );
            // And against the real cluster.
            let output = cluster.deploylock(Identity::Alice, namespace, &args);
            expect_exit(&output, 2, &format!("{what} on the cluster"));
        }
    }
    // A valid -n reaches the (closed) server.
    let output = deploylock_with(&offline, "default", &["status"]);
    expect_exit(&output, 6, "-n default against a closed port");

    // The kubeconfig context's namespace is checked the same way.
    let bad_context = offline_kubeconfig(cluster, dir.path(), Some("../kube-system"));
    let output = Command::new(env!("CARGO_BIN_EXE_deploylock"))
        .arg("--kubeconfig")
        .arg(&bad_context)
        .arg("status")
        .env_remove("KUBECONFIG")
        .output()
        .unwrap_or_else(|err| panic!("cannot run deploylock: {err}"));
    expect_exit(&output, 2, "a kubeconfig namespace of ../kube-system");
    expect_clean_error(&output, 1, "a kubeconfig namespace of ../kube-system");
    assert!(
        stderr_of(&output).contains("invalid namespace")
            && stderr_of(&output).contains("kubeconfig"),
        "{}",
        stderr_of(&output)
    );
    // -n overrides it.
    let output = deploylock_with(&bad_context, "default", &["status"]);
    expect_exit(&output, 6, "-n default over a bad kubeconfig namespace");
}

/// Ways to store a DeploymentLock that the API server accepts and the Rust
/// types cannot decode, tried in order (a stricter schema refuses the first
/// ones): the JSON pointer poisoned, its value, and where deploylock must say
/// the fault is.
const POISONS: [(&str, &str, &str); 3] = [
    (
        "/spec/history/0/at",
        "2030-01-01T00:00:00ZT",
        "spec.history[0].at",
    ),
    (
        "/spec/history/0/at",
        "2030-01-01T00:00:00,5Z",
        "spec.history[0].at",
    ),
    (
        "/status/conditions/0/lastTransitionTime",
        "2030-01-01T00:00:00ZT",
        "status.conditions[0]",
    ),
];

/// Stores a malformed `production` lock in `namespace` as the admin with
/// kubectl (raw JSON), with the first poison the API server accepts.
/// Returns where the fault is. Panics if the API server refuses them all:
/// then this test must find another way, not pass without one.
fn store_malformed_lock(cluster: &TestCluster, namespace: &str) -> &'static str {
    let mut refusals = Vec::new();
    for (pointer, value, location) in POISONS {
        let _ = cluster.kubectl(
            Identity::Admin,
            &[
                "delete",
                "deploymentlock",
                "production",
                "-n",
                namespace,
                "--ignore-not-found",
            ],
        );
        let mut object = json!({
            "apiVersion": "deploylock.dev/v1",
            "kind": "DeploymentLock",
            "metadata": { "name": "production", "namespace": namespace },
            "spec": {
                "environment": "production",
                "fencingToken": 1,
                "history": [{
                    "sequence": 1,
                    "action": "Released",
                    "at": "2030-01-01T00:00:00Z",
                    "lockId": "5f0c2c1e-1111-4222-8333-944455556666",
                    "by": "mallory",
                    "owner": "mallory",
                    "reason": "poison"
                }]
            }
        });
        let status = pointer.starts_with("/status");
        if !status && let Some(slot) = object.pointer_mut(pointer) {
            *slot = json!(value);
        }
        let created = cluster.kubectl_with_input(
            Identity::Admin,
            &["create", "-o", "name", "-f", "-"],
            &object.to_string(),
        );
        if !created.status.success() {
            refusals.push(format!("{pointer}={value}: {}", stderr_of(&created)));
            continue;
        }
        if status {
            let patch = json!({ "status": { "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "Poisoned",
                "message": "",
                "lastTransitionTime": value,
            }]}});
            let patched = cluster.kubectl(
                Identity::Admin,
                &[
                    "patch",
                    "deploymentlock",
                    "production",
                    "-n",
                    namespace,
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    &patch.to_string(),
                ],
            );
            if !patched.status.success() {
                refusals.push(format!("{pointer}={value}: {}", stderr_of(&patched)));
                continue;
            }
        }
        // Stored as written: the API server did not normalise it away.
        let read = cluster.kubectl(
            Identity::Admin,
            &[
                "get",
                "deploymentlock",
                "production",
                "-n",
                namespace,
                "-o",
                "json",
            ],
        );
        let stored: Value = serde_json::from_slice(&read.stdout)
            .unwrap_or_else(|err| panic!("kubectl get -o json: {err}: {}", stderr_of(&read)));
        let pointer_in_store = if status {
            "/status/conditions/0/lastTransitionTime"
        } else {
            pointer
        };
        if stored.pointer(pointer_in_store).and_then(Value::as_str) == Some(value) {
            return location;
        }
        refusals.push(format!("{pointer}={value}: stored as {stored}"));
    }
    panic!(
        "the API server refuses every malformed value tried, so this test cannot store a malformed lock; find another value (the tolerant decoding is unit-tested in src/store.rs):\n{}",
        refusals.join("\n")
    );
}

#[tokio::test]
async fn one_malformed_lock_blinds_no_one() {
    let cluster = cluster();
    let ns = cluster.namespace("cli-malformed").await;
    let held = cluster.deploylock(
        Identity::Alice,
        &ns,
        &["-e", "staging", "acquire", "--reason", "Testing 3.0.0-rc1"],
    );
    expect_exit(&held, 0, "alice acquires staging");
    let location = store_malformed_lock(cluster, &ns);

    // list shows what can be shown, names what cannot, and exits 1.
    for args in [vec!["list"], vec!["list", "-A"], vec!["list", "-o", "json"]] {
        let what = format!("{args:?} with a malformed lock");
        let output = cluster.deploylock(Identity::Viewer, &ns, &args);
        expect_exit(&output, 1, &what);
        let stdout = stdout_of(&output);
        let stderr = stderr_of(&output);
        assert!(
            stdout.contains("staging") && stdout.contains("Testing 3.0.0-rc1"),
            "{what}: the good lock is missing:\n{stdout}"
        );
        // With -A, other tests' namespaces have their own production locks.
        let ours = |line: &&str| !args.contains(&"-A") || line.starts_with(&format!("{ns} "));
        assert!(
            !stdout
                .lines()
                .filter(ours)
                .any(|line| line.contains("production")),
            "{what}: the malformed lock is shown as a lock:\n{stdout}"
        );
        let warning = stderr
            .lines()
            .find(|line| line.contains("\"production\"") && line.contains(&ns))
            .unwrap_or_else(|| panic!("{what}: the malformed lock is not named:\n{stderr}"));
        assert!(
            warning.starts_with("deploylock: ")
                && warning.contains("malformed")
                && warning.contains(location),
            "{what}: {warning}"
        );
        if args.contains(&"json") {
            let parsed: Value = serde_json::from_str(&stdout)
                .unwrap_or_else(|err| panic!("{what}: not JSON ({err}):\n{stdout}"));
            assert_eq!(parsed.as_array().map(Vec::len), Some(1), "{what}: {parsed}");
        }
    }

    // The other lock is read and used as usual.
    let status = status_json(cluster, Identity::Viewer, &ns, "staging");
    assert_eq!(status["holder"]["user"], "alice");
    let released = cluster.deploylock(Identity::Alice, &ns, &["-e", "staging", "release"]);
    expect_exit(&released, 0, "alice releases staging");

    // The malformed one is named, with where its fault is, and exit 1.
    for (identity, args) in [
        (Identity::Viewer, vec!["status"]),
        (Identity::Viewer, vec!["history"]),
        (Identity::Viewer, vec!["status", "-o", "json"]),
        (Identity::Bob, vec!["acquire", "--reason", "x"]),
    ] {
        let what = format!("{identity:?} {args:?} of the malformed lock");
        let output = cluster.deploylock(identity, &ns, &args);
        expect_exit(&output, 1, &what);
        expect_clean_error(&output, 2, &what);
        let stderr = stderr_of(&output);
        assert!(
            stderr.contains("\"production\"")
                && stderr.contains(&ns)
                && stderr.contains("is malformed")
                && stderr.contains(location),
            "{what}: {stderr}"
        );
        assert!(
            !stderr.contains("Error deserializing response"),
            "{what}: {stderr}"
        );
        assert!(
            stdout_of(&output).is_empty(),
            "{what}: {}",
            stdout_of(&output)
        );
    }
}

/// A missing required argument is named in the one-line usage error.
#[test]
fn a_missing_required_argument_is_named() {
    let output = Command::new(env!("CARGO_BIN_EXE_deploylock"))
        .args(["force-release", "-e", "production"])
        .output()
        .unwrap_or_else(|err| panic!("cannot run deploylock: {err}"));
    expect_exit(&output, 2, "force-release without --reason");
    let stderr = stderr_of(&output);
    assert!(
        stderr.contains("--reason") && stderr.lines().count() == 1,
        "the error must name --reason on one line: {stderr}"
    );
}

// ---------------------------------------------------------------------------
// Papercuts: the plugin's name, the man pages, the controller's log
// ---------------------------------------------------------------------------

/// `kubectl deploylock --help` names the command as the user types it.
#[test]
fn kubectl_plugin_help_reads_kubectl_deploylock() {
    for (args, usage) in [
        (&["--help"][..], "Usage: kubectl deploylock "),
        (&["acquire", "--help"], "Usage: kubectl deploylock acquire "),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_kubectl-deploylock"))
            .args(args)
            .env_remove("KUBECONFIG")
            .output()
            .unwrap_or_else(|err| panic!("cannot run kubectl-deploylock: {err}"));
        expect_exit(&output, 0, "kubectl-deploylock --help");
        let text = stdout_of(&output);
        assert!(text.contains(usage), "{args:?}: {text}");
        assert!(!text.contains("kubectl-deploylock"), "{args:?}: {text}");
    }
    let usage_error = Command::new(env!("CARGO_BIN_EXE_kubectl-deploylock"))
        .args(["acquire", "--bogus"])
        .output()
        .unwrap_or_else(|err| panic!("cannot run kubectl-deploylock: {err}"));
    expect_exit(&usage_error, 2, "a usage error");
    assert!(
        stderr_of(&usage_error).contains("(see `kubectl deploylock --help`)"),
        "{}",
        stderr_of(&usage_error)
    );
}

/// `deploylock man --dir` (what `make completions` runs) writes the main
/// page and every page it names, each with an OPTIONS section.
#[test]
fn man_pages_exist_for_every_action_with_options() {
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("no temp dir: {err}"));
    let output = Command::new(env!("CARGO_BIN_EXE_deploylock"))
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap_or_else(|err| panic!("cannot run deploylock man: {err}"));
    expect_exit(&output, 0, "deploylock man --dir");
    let read = |name: &str| {
        std::fs::read_to_string(dir.path().join(name))
            .unwrap_or_else(|err| panic!("{name} was not written: {err}"))
    };
    let main_page = read("deploylock.1");
    // clap_mangen names the pages in the SUBCOMMANDS section.
    let see_also = main_page
        .split(".SH SUBCOMMANDS")
        .nth(1)
        .and_then(|rest| rest.split("\n.SH ").next())
        .unwrap_or_else(|| panic!("no SUBCOMMANDS in deploylock.1:\n{main_page}"));
    // roff spells the hyphen `\-`.
    let named: Vec<String> = see_also
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter_map(|word| word.strip_suffix("(1)"))
        .map(|name| {
            name.replace("\\-", "-")
                .replace("\\fB", "")
                .replace("\\fR", "")
        })
        .collect();
    for action in [
        "acquire",
        "release",
        "status",
        "force-release",
        "list",
        "wait",
        "extend",
        "history",
        "exec",
        "notify",
        "completion",
    ] {
        let name = format!("deploylock-{action}");
        assert!(
            named.contains(&name),
            "{name} not in SUBCOMMANDS: {named:?}"
        );
    }
    assert!(main_page.contains(".SH OPTIONS"), "deploylock.1");
    for name in &named {
        let page = read(&format!("{name}.1"));
        assert!(
            page.contains(".SH OPTIONS"),
            "{name}.1 has no OPTIONS:\n{page}"
        );
    }
    let acquire = read("deploylock-acquire.1");
    for option in [
        "\\-\\-reason",
        "\\-\\-duration",
        "\\-\\-extend",
        "\\-\\-environment",
    ] {
        assert!(
            acquire.contains(option),
            "{option} not documented:\n{acquire}"
        );
    }
}
