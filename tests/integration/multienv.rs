//! Several environments at once (`-e a -e b -e c`, `--all-environments`):
//! real `deploylock` processes on the real control plane. Nothing sleeps to
//! synchronise: the tests follow the processes' exits, the command's own
//! output under exec, and the stored locks.

use std::process::{Output, Stdio};
use std::time::Duration as StdDuration;

use kube::api::Api;
use tokio::io::{AsyncBufReadExt, BufReader};

use deploylock::crd::{DeploymentLock, HistoryAction};

use crate::support::{
    Identity, TestCluster, cluster, expect_exit, holder_of, last_history, locks_api, stderr_of,
    stdout_of, stored,
};

/// Longest wait for anything that should take a second or two.
const WAIT: StdDuration = StdDuration::from_secs(60);

const ABC: [&str; 3] = ["a", "b", "c"];

/// `deploylock ARGS` as `identity`, started now (not waited for).
fn spawn(
    cluster: &TestCluster,
    identity: Identity,
    namespace: &str,
    args: &[&str],
) -> tokio::process::Child {
    let mut command = cluster.deploylock_command(identity, namespace);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match tokio::process::Command::from(command).spawn() {
        Ok(child) => child,
        Err(err) => panic!("cannot start deploylock {args:?}: {err}"),
    }
}

async fn finish(child: tokio::process::Child, what: &str) -> Output {
    match tokio::time::timeout(WAIT, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(err)) => panic!("{what}: {err}"),
        Err(_) => panic!("{what}: still running after {WAIT:?} (a deadlock?)"),
    }
}

/// A fresh namespace (and its locks) in which bob holds `b`.
async fn bob_holds_b(cluster: &TestCluster, test_name: &str) -> (String, Api<DeploymentLock>) {
    let namespace = cluster.namespace(test_name).await;
    let api = locks_api(cluster, &namespace).await;
    let bob = cluster.deploylock(
        Identity::Bob,
        &namespace,
        &["-e", "b", "acquire", "--reason", "hotfix"],
    );
    expect_exit(&bob, 0, "bob takes b");
    (namespace, api)
}

/// bob holds `b`; alice then starts `-e FIRST -e SECOND acquire --reason
/// migration EXTRA` (one of the two being `b`) in a fresh namespace, and is
/// left running: she takes `a` and waits for `b`.
async fn alice_waits_for_bobs_b(
    cluster: &TestCluster,
    test_name: &str,
    order: [&str; 2],
    extra: &[&str],
) -> (String, Api<DeploymentLock>, tokio::process::Child) {
    let (namespace, api) = bob_holds_b(cluster, test_name).await;
    let mut args = vec![
        "-e",
        order[0],
        "-e",
        order[1],
        "acquire",
        "--reason",
        "migration",
    ];
    args.extend_from_slice(extra);
    let alice = spawn(cluster, Identity::Alice, &namespace, &args);
    (namespace, api, alice)
}

/// The stored lock, or None if it was never created.
async fn lock_opt(api: &Api<DeploymentLock>, environment: &str) -> Option<DeploymentLock> {
    match api.get_opt(environment).await {
        Ok(lock) => lock,
        Err(err) => panic!("cannot read {environment}: {err}"),
    }
}

/// Who holds each of `environments` (user, group ID), None if free.
async fn holders(
    api: &Api<DeploymentLock>,
    environments: &[&str],
) -> Vec<Option<(String, Option<String>)>> {
    let mut found = Vec::new();
    for environment in environments {
        let lock = lock_opt(api, environment).await;
        found.push(
            lock.and_then(|lock| lock.spec.holder)
                .map(|holder| (holder.user, holder.group_id)),
        );
    }
    found
}

/// The acceptance test of issue 18: two processes acquiring the same three
/// environments in opposite orders, 20 rounds (half of them waiting for
/// their turn, half not): never a deadlock, never a partial holding, exactly
/// one winner holding all three in one lock group.
#[tokio::test]
async fn opposite_orders_never_deadlock_and_exactly_one_wins_each_round() {
    let cluster = cluster();
    let namespace = cluster.namespace("multienv-race").await;
    let api = locks_api(cluster, &namespace).await;
    let forward = ["-e", "a", "-e", "b", "-e", "c"];
    let backward = ["-e", "c", "-e", "b", "-e", "a"];
    let mut wins = [0_u32; 2];
    for round in 0..20 {
        let waiting = round % 2 == 1;
        let acquire = |order: &[&'static str]| {
            let mut args: Vec<&str> = order.to_vec();
            args.extend(["acquire", "--reason", "migration"]);
            if waiting {
                args.extend(["--wait-timeout", "2"]);
            }
            args
        };
        let alice = spawn(cluster, Identity::Alice, &namespace, &acquire(&forward));
        let bob = spawn(cluster, Identity::Bob, &namespace, &acquire(&backward));
        let (alice, bob) = tokio::join!(
            finish(alice, "alice's acquire"),
            finish(bob, "bob's acquire")
        );
        let codes = (alice.status.code(), bob.status.code());
        let lost = if waiting { 4 } else { 3 };
        let (winner, winner_output, loser_output) = match codes {
            (Some(0), Some(code)) if code == lost => (Identity::Alice, &alice, &bob),
            (Some(code), Some(0)) if code == lost => (Identity::Bob, &bob, &alice),
            _ => panic!(
                "round {round}: expected one winner (0) and one loser ({lost}), got {codes:?}\n--- alice ---\n{}{}\n--- bob ---\n{}{}",
                stdout_of(&alice),
                stderr_of(&alice),
                stdout_of(&bob),
                stderr_of(&bob)
            ),
        };
        wins[usize::from(winner == Identity::Bob)] += 1;
        // The winner holds all three, in one lock group; the loser none.
        let held = holders(&api, &ABC).await;
        let group = match &held[0] {
            Some((user, Some(group))) if user == winner.username() => group.clone(),
            other => panic!("round {round}: a is held as {other:?}, not by the winner in a group"),
        };
        for (environment, holder) in ABC.iter().zip(&held) {
            assert_eq!(
                holder.as_ref(),
                Some(&(winner.username().to_string(), Some(group.clone()))),
                "round {round}: {environment}"
            );
        }
        let printed = stdout_of(winner_output);
        assert!(
            printed.contains(&format!("lock group ID {group} (3 environments: a b c)")),
            "round {round}: the winner's output does not name the group:\n{printed}"
        );
        // The loser names the lock it failed on; it released what it took.
        let refused = stderr_of(loser_output);
        assert!(
            refused.contains("could not acquire "),
            "round {round}: the loser's error does not name the lock:\n{refused}"
        );
        // Give the locks back: by lock group on odd rounds, by name on even.
        let released = if round % 2 == 1 {
            cluster.deploylock(winner, &namespace, &["release", "--group-id", &group])
        } else {
            cluster.deploylock(winner, &namespace, &[&forward[..], &["release"]].concat())
        };
        expect_exit(&released, 0, &format!("round {round}: the winner releases"));
        assert_eq!(
            holders(&api, &ABC).await,
            vec![None, None, None],
            "round {round}: a lock stayed held after the release"
        );
    }
    eprintln!("wins alice/bob over 20 rounds: {wins:?}");
}

/// All or nothing: bob holds b; alice's acquire of a, b and c takes a,
/// fails on b, releases a again and never touches c. The error is b's.
#[tokio::test]
async fn a_refusal_on_the_middle_environment_releases_the_first() {
    let cluster = cluster();
    let (namespace, api) = bob_holds_b(cluster, "multienv-middle").await;

    for (wait, code) in [(None, 3), (Some("1"), 4)] {
        let mut args = vec![
            "-e",
            "c",
            "-e",
            "a",
            "-e",
            "b",
            "acquire",
            "--reason",
            "migration",
        ];
        if let Some(seconds) = wait {
            args.extend(["--wait-timeout", seconds]);
        }
        let alice = cluster.deploylock(Identity::Alice, &namespace, &args);
        expect_exit(
            &alice,
            code,
            &format!("alice's acquire of a, b, c ({wait:?})"),
        );
        let said = stderr_of(&alice);
        assert!(
            said.contains("could not acquire b:") && said.contains("bob"),
            "the error is not b's, held by bob:\n{said}"
        );
        assert!(
            said.contains("released again the locks taken before it: a"),
            "the release of a is not reported:\n{said}"
        );
        // a: taken and released again, in one lock group, by alice.
        let a = stored(&api, "a").await;
        assert!(
            a.spec.holder.is_none(),
            "a is still held: {:?}",
            a.spec.holder
        );
        let history = &a.spec.history;
        let (acquired, released) = match history.as_slice() {
            [.., acquired, released] => (acquired, released),
            _ => panic!("a's history: {history:?}"),
        };
        assert_eq!(
            (acquired.action, released.action),
            (HistoryAction::Acquired, HistoryAction::Released),
            "{history:?}"
        );
        assert_eq!(acquired.lock_id, released.lock_id);
        assert_eq!(released.by, "alice");
        // b is still bob's, c was never created.
        assert_eq!(holder_of(&stored(&api, "b").await).user, "bob");
        assert!(lock_opt(&api, "c").await.is_none(), "c was touched");
    }
}

/// exec with three environments: the command sees them (and the lock group)
/// in its environment; a force-release of one mid-command stops it (exit
/// 7, naming that environment) and the other two are released.
#[tokio::test]
async fn exec_stops_the_command_when_any_one_lock_is_lost() {
    let cluster = cluster();
    let namespace = cluster.namespace("multienv-exec").await;
    let api = locks_api(cluster, &namespace).await;
    let script = r#"echo "env=$DEPLOYLOCK_ENVIRONMENT"; echo "group=$DEPLOYLOCK_GROUP_ID"; echo "ids=$DEPLOYLOCK_LOCK_ID"; echo "tokens=$DEPLOYLOCK_FENCING_TOKEN"; echo ready; while true; do sleep 0.1; done"#;
    let mut exec = spawn(
        cluster,
        Identity::Alice,
        &namespace,
        &[
            "-e",
            "c",
            "-e",
            "b",
            "-e",
            "a",
            "exec",
            "--grace",
            "3",
            "--reason",
            "migration",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let stdout = exec
        .stdout
        .take()
        .unwrap_or_else(|| panic!("exec's stdout is not piped"));
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, lines.next_line()).await {
            Ok(Ok(Some(line))) if line == "ready" => break,
            Ok(Ok(Some(line))) => seen.push(line),
            other => panic!("no \"ready\" from the command: {other:?}; stdout: {seen:?}"),
        }
    }
    let held = holders(&api, &ABC).await;
    let group = match &held[0] {
        Some((user, Some(group))) if user == "alice" => group.clone(),
        other => panic!("a is held as {other:?}"),
    };
    assert!(held.iter().all(|h| h == &held[0]), "{held:?}");
    let mut ids = Vec::new();
    let mut tokens = Vec::new();
    for environment in ABC {
        let lock = stored(&api, environment).await;
        ids.push(holder_of(&lock).lock_id.clone());
        tokens.push(lock.spec.fencing_token.to_string());
    }
    assert_eq!(
        seen,
        vec![
            "env=a b c".to_string(),
            format!("group={group}"),
            format!("ids={}", ids.join(" ")),
            format!("tokens={}", tokens.join(" ")),
        ]
    );

    let forced = cluster.deploylock(
        Identity::Bob,
        &namespace,
        &["-e", "b", "force-release", "--reason", "incident"],
    );
    expect_exit(&forced, 0, "bob force-releases b");
    let output = finish(exec, "exec").await;
    let said = stderr_of(&output);
    expect_exit(&output, 7, "exec after b was force-released");
    assert!(
        said.contains("lost the lock on b while the command ran"),
        "the loss does not name b:\n{said}"
    );
    assert_eq!(holders(&api, &ABC).await, vec![None, None, None]);
    for environment in ["a", "c"] {
        let released = last_history(&stored(&api, environment).await).clone();
        assert_eq!(
            (released.action, released.by.as_str()),
            (HistoryAction::Released, "alice"),
            "{environment}"
        );
    }
    assert_eq!(
        last_history(&stored(&api, "b").await).action,
        HistoryAction::ForceReleased
    );
}

/// --all-environments acts on every DeploymentLock the namespace has (and
/// refuses an empty namespace); status and JSON show the lock group.
#[tokio::test]
async fn all_environments_takes_every_lock_of_the_namespace() {
    let cluster = cluster();
    let namespace = cluster.namespace("multienv-all").await;
    let api = locks_api(cluster, &namespace).await;
    let none = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["--all-environments", "acquire", "--reason", "freeze"],
    );
    expect_exit(&none, 2, "--all-environments in an empty namespace");
    assert!(
        stderr_of(&none).contains("there is no DeploymentLock in namespace"),
        "{}",
        stderr_of(&none)
    );
    for environment in ["dev", "staging", "production"] {
        let made = cluster.deploylock(
            Identity::Alice,
            &namespace,
            &["-e", environment, "acquire", "--reason", "create"],
        );
        expect_exit(&made, 0, environment);
        let freed =
            cluster.deploylock(Identity::Alice, &namespace, &["-e", environment, "release"]);
        expect_exit(&freed, 0, environment);
    }
    let all = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &[
            "--all-environments",
            "acquire",
            "--reason",
            "freeze",
            "-o",
            "json",
        ],
    );
    expect_exit(&all, 0, "--all-environments acquire");
    let views: serde_json::Value = serde_json::from_slice(&all.stdout)
        .unwrap_or_else(|err| panic!("not JSON ({err}): {}", stdout_of(&all)));
    let names: Vec<&str> = views
        .as_array()
        .map(|views| {
            views
                .iter()
                .filter_map(|v| v["environment"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(names, ["dev", "production", "staging"], "{views}");
    let group = views[0]["holder"]["groupId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!group.is_empty(), "{views}");
    for view in views.as_array().into_iter().flatten() {
        assert_eq!(view["holder"]["groupId"].as_str(), Some(group.as_str()));
    }
    let status = cluster.deploylock(Identity::Alice, &namespace, &["-e", "staging", "status"]);
    expect_exit(&status, 0, "status");
    assert!(
        stdout_of(&status).contains("Lock group ID") && stdout_of(&status).contains(&group),
        "{}",
        stdout_of(&status)
    );
    // Extend and release every one, reported per environment.
    let extended = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["--all-environments", "extend", "--duration", "45"],
    );
    expect_exit(&extended, 0, "--all-environments extend");
    assert_eq!(
        stdout_of(&extended).matches(" extended by ").count(),
        3,
        "{}",
        stdout_of(&extended)
    );
    let released = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["--all-environments", "release"],
    );
    expect_exit(&released, 0, "--all-environments release");
    for environment in ["dev", "production", "staging"] {
        assert!(stdout_of(&released).contains(&format!("{environment} released")));
        assert!(stored(&api, environment).await.spec.holder.is_none());
    }
}

/// release and extend of several: each environment is attempted and
/// reported; a failure of one gives its exit code (the first failed, in
/// lock order) and names it, the others are still done.
#[tokio::test]
async fn release_of_several_reports_each_and_fails_with_the_first_failure() {
    let cluster = cluster();
    let namespace = cluster.namespace("multienv-release").await;
    let api = locks_api(cluster, &namespace).await;
    let alice = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["-e", "a", "-e", "c", "acquire", "--reason", "migration"],
    );
    expect_exit(&alice, 0, "alice takes a and c");
    let bob = cluster.deploylock(
        Identity::Bob,
        &namespace,
        &["-e", "b", "acquire", "--reason", "hotfix"],
    );
    expect_exit(&bob, 0, "bob takes b");
    let released = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["-e", "a", "-e", "b", "-e", "c", "release"],
    );
    expect_exit(&released, 5, "alice releases a, b (bob's) and c");
    assert!(
        stderr_of(&released).contains("deploylock: b: "),
        "{}",
        stderr_of(&released)
    );
    assert!(
        stdout_of(&released).contains("a released") && stdout_of(&released).contains("c released")
    );
    assert_eq!(
        holders(&api, &ABC).await,
        vec![None, Some(("bob".to_string(), None)), None]
    );
}

/// Several environments where an action takes one: refused before anything
/// is sent, naming the flag (exit 2), and nothing changes.
#[tokio::test]
async fn single_environment_actions_refuse_several() {
    let cluster = cluster();
    let namespace = cluster.namespace("multienv-single").await;
    let api = locks_api(cluster, &namespace).await;
    for args in [
        &["-e", "a", "-e", "b", "status"][..],
        &["-e", "a", "-e", "b", "history"],
        &["-e", "a", "-e", "b", "force-release", "--reason", "x"],
        &["--all-environments", "status"],
        &["-e", "a", "-e", "b", "acquire", "--extend"],
        &["-e", "a", "-e", "b", "release", "--lock-id", "abc"],
        &["-e", "a", "-e", "b", "extend", "--lock-id", "abc"],
        &["-e", "a", "release", "--group-id", "abc"],
    ] {
        let output = cluster.deploylock(Identity::Alice, &namespace, args);
        expect_exit(&output, 2, &format!("{args:?}"));
        let said = stderr_of(&output);
        assert!(
            said.contains("-e/--environment") || said.contains("--all-environments"),
            "{args:?}: the refusal names no flag: {said}"
        );
    }
    // The same environment twice is one environment.
    let twice = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["-e", "a", "-e", "a", "acquire", "--reason", "once"],
    );
    expect_exit(&twice, 0, "-e a -e a");
    assert_eq!(holder_of(&stored(&api, "a").await).group_id, None);
    assert!(lock_opt(&api, "b").await.is_none());
}

/// A signal while waiting for a later lock gives up all of them: the locks
/// taken so far are released again (exit 130, naming the lock waited for).
#[tokio::test]
async fn a_signal_while_waiting_releases_the_locks_taken() {
    use kube::runtime::wait::await_condition;
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let cluster = cluster();
    let (_namespace, api, alice) = alice_waits_for_bobs_b(
        cluster,
        "multienv-signal",
        ["b", "a"],
        &["--wait-timeout", "300"],
    )
    .await;
    // a is taken first, then alice queues for b: wait for her place there.
    let queued = |lock: Option<&DeploymentLock>| {
        lock.is_some_and(|lock| lock.spec.queue.iter().any(|w| w.user == "alice"))
    };
    match tokio::time::timeout(WAIT, await_condition(api.clone(), "b", queued)).await {
        Ok(Ok(_)) => {}
        other => panic!("alice never queued for b: {other:?}"),
    }
    assert_eq!(
        holders(&api, &["a"]).await[0]
            .as_ref()
            .map(|(user, group)| (user.as_str(), group.is_some())),
        Some(("alice", true)),
        "a is not alice's, in a group, while she waits for b"
    );
    let pid = alice
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .unwrap_or_else(|| panic!("no PID"));
    if let Err(err) = kill(Pid::from_raw(pid), Signal::SIGTERM) {
        panic!("cannot signal alice's acquire: {err}");
    }
    let output = finish(alice, "alice's acquire").await;
    expect_exit(&output, 130, "alice's acquire after SIGTERM");
    let said = stderr_of(&output);
    assert!(said.contains("could not acquire b"), "{said}");
    assert!(
        said.contains("released again the locks taken before it: a"),
        "{said}"
    );
    assert_eq!(
        holders(&api, &["a", "b"]).await,
        vec![None, Some(("bob".to_string(), None))]
    );
    let b = stored(&api, "b").await;
    assert!(
        b.spec.queue.iter().all(|w| w.user != "alice"),
        "alice left her place in b's queue: {:?}",
        b.spec.queue
    );
}

/// `wait` for several returns once all of them are free: one still held
/// makes it time out (exit 4, naming it) although the other is free.
#[tokio::test]
async fn wait_for_several_returns_when_all_are_free() {
    let cluster = cluster();
    let namespace = cluster.namespace("multienv-wait").await;
    for environment in ["a", "b"] {
        let held = cluster.deploylock(
            Identity::Bob,
            &namespace,
            &["-e", environment, "acquire", "--reason", "hotfix"],
        );
        expect_exit(&held, 0, environment);
    }
    let waiter = spawn(
        cluster,
        Identity::Alice,
        &namespace,
        &[
            "-e",
            "a",
            "-e",
            "b",
            "wait",
            "--wait-timeout",
            "120",
            "-o",
            "json",
        ],
    );
    let released = cluster.deploylock(Identity::Bob, &namespace, &["-e", "a", "release"]);
    expect_exit(&released, 0, "bob releases a");
    // b is still held: a short wait times out on b, although a is free.
    let short = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &["-e", "a", "-e", "b", "wait", "--wait-timeout", "1"],
    );
    expect_exit(&short, 4, "a wait for a and b while b is held");
    assert!(stderr_of(&short).contains("b"), "{}", stderr_of(&short));
    let released = cluster.deploylock(Identity::Bob, &namespace, &["-e", "b", "release"]);
    expect_exit(&released, 0, "bob releases b");
    let output = finish(waiter, "alice's wait").await;
    expect_exit(&output, 0, "the wait for a and b");
    let views: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("not JSON ({err}): {}", stdout_of(&output)));
    let states: Vec<(&str, &str)> = views
        .as_array()
        .map(|views| {
            views
                .iter()
                .map(|v| {
                    (
                        v["environment"].as_str().unwrap_or_default(),
                        v["state"].as_str().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(states, [("a", "Available"), ("b", "Available")], "{views}");
}

/// While a later lock is waited for, the ones taken are renewed (at a third
/// of --duration): a wait longer than the duration does not let them expire.
#[tokio::test]
async fn locks_taken_are_renewed_while_a_later_one_is_waited_for() {
    use kube::runtime::wait::await_condition;

    let cluster = cluster();
    let (namespace, api, alice) = alice_waits_for_bobs_b(
        cluster,
        "multienv-renew",
        ["a", "b"],
        &["--duration", "1", "--wait-timeout", "120"],
    )
    .await;
    // a's holding extended by alice while she waits for b (about 20 s in).
    let renewed = |lock: Option<&DeploymentLock>| {
        lock.is_some_and(|lock| {
            lock.spec
                .history
                .last()
                .is_some_and(|entry| entry.action == HistoryAction::Extended && entry.by == "alice")
        })
    };
    let limit = StdDuration::from_secs(50);
    let a = match tokio::time::timeout(limit, await_condition(api.clone(), "a", renewed)).await {
        Ok(Ok(Some(lock))) => lock,
        other => panic!("a was not renewed while alice waited for b: {other:?}"),
    };
    let first_holding = holder_of(&a).lock_id.clone();
    let released = cluster.deploylock(Identity::Bob, &namespace, &["-e", "b", "release"]);
    expect_exit(&released, 0, "bob releases b");
    let output = finish(alice, "alice's acquire").await;
    expect_exit(&output, 0, "alice's acquire of a and b");
    let a = stored(&api, "a").await;
    let b = stored(&api, "b").await;
    assert_eq!(holder_of(&a).lock_id, first_holding, "a's holding changed");
    assert_eq!(holder_of(&a).group_id, holder_of(&b).group_id);
    assert!(holder_of(&a).group_id.is_some());
}
