//! The short torture run inside `make test` (the engine is testkit/src/torture.rs;
//! `make torture` runs it for minutes with more faults): in-process clients
//! and `deploylock` processes in a namespace where the admission policy is
//! enforced, a hostile client sending forbidden writes, the execs' connections
//! frozen, reset and black-holed by a proxy, execs killed with SIGKILL of
//! their process group mid-command, the controller killed midway, and every
//! history transition notified to a flaky loopback receiver.

use std::time::Duration as StdDuration;

use chrono::Utc;

use crate::support::cluster;
use deploylock::store::Outcome;
use testkit::torture::{
    OpKind, OpResult, Partitions, Plan, Target, ambiguous, check, command_report, counts,
    lost_refusals, outcomes, run,
};
use testkit::torture_hostile::{Answer, by_attack, summary};
use testkit::torture_notify::Notifications;

// The fault proxies run on the test's runtime while exec workers block
// threads of their own: a second worker thread keeps the proxies forwarding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_torture_run_finds_no_violation() {
    let cluster = cluster();
    let namespace = cluster.enforced_namespace("torture").await;
    let target = Target::on(cluster, &namespace);
    let seed = Utc::now().timestamp_nanos_opt().unwrap_or(7) as u64;
    eprintln!("torture seed {seed}");
    let notifications = Notifications::subscribe(cluster, &namespace).await;
    // The controller is killed with SIGKILL and restarted midway.
    let controller = cluster.spawn_controller(&namespace, "torture", &[]);
    let plan = Plan {
        environments: 3,
        in_process: 2,
        processes: 1,
        duration: StdDuration::from_secs(8),
        seed,
        pauses: false,
        hostile: 1,
        hostile_pause: StdDuration::from_millis(50),
        hostile_at_least: 20,
        partitions: Some(Partitions {
            gap: (StdDuration::from_millis(1500), StdDuration::from_secs(3)),
            length: (StdDuration::from_millis(200), StdDuration::from_millis(800)),
            long_ones: false,
        }),
        kill_every: Some(StdDuration::from_secs(4)),
        longest_command: StdDuration::from_secs(2),
        killed_left_to_expire: false,
    };
    let engine = run(&target, &plan);
    let chaos = async {
        tokio::time::sleep(StdDuration::from_secs(3)).await;
        controller.signal("KILL");
        cluster.spawn_controller(&namespace, "torture", &[])
    };
    let (log, _restarted) = tokio::join!(engine, chaos);
    let ops = &log.ops;
    let (checked, mut violations) = check(&target, &log).await;
    let notified = notifications
        .check(&log.recorded.history, StdDuration::from_secs(120))
        .await;
    eprintln!(
        "torture: notifications: {} history entries checked against {} requests to a receiver failing every 4th; {} dropped from a history before a leader could deliver them (while the killed controller's lease ran out), reported; {} violations",
        notified.entries,
        notified.requests,
        notified.reported_lost,
        notified.violations.len()
    );
    let entries = notified.entries;
    violations.extend(notified.violations);
    let (unknown, first_unknown) = ambiguous(ops);
    eprintln!(
        "torture: {checked} operations, hostile writes and commands checked, {} lost/refused as expected, {unknown} of unknown outcome ({first_unknown:?}), {} violations",
        lost_refusals(ops),
        violations.len()
    );
    eprintln!("torture: {}", counts(ops));
    for kind in [OpKind::Exec, OpKind::ExecKilled] {
        eprintln!("torture: {}", outcomes(ops, kind));
    }
    eprintln!("torture: {}", summary(&log.attempts));
    eprintln!("{}", by_attack(&log.attempts));
    eprintln!("torture: {}", command_report(&log));
    if let Some(unanswered) = log
        .attempts
        .iter()
        .find(|attempt| matches!(attempt.answer, Answer::Unknown(_)))
    {
        eprintln!("torture: first unanswered hostile write: {unanswered:?}");
    }
    assert!(
        violations.is_empty(),
        "violations:\n{}",
        violations.join("\n")
    );
    assert!(ops.len() > 50, "too few operations: {}", ops.len());
    let by_processes = |kind: OpKind| {
        ops.iter()
            .filter(|op| op.process && op.kind == kind)
            .count()
    };
    for kind in [OpKind::Acquire, OpKind::Exec] {
        assert!(
            by_processes(kind) > 0,
            "no {kind:?} by a deploylock process"
        );
    }
    let acquisitions = ops
        .iter()
        .filter(|op| {
            matches!(
                op.result,
                OpResult::Done {
                    outcome: Outcome::Transition(_),
                    ..
                }
            )
        })
        .count();
    assert!(acquisitions > 10, "too few transitions: {acquisitions}");
    assert!(
        entries > 10,
        "too few history entries for the notification check: {entries}"
    );
    // The hostile client was answered, and refused.
    let refused = log
        .attempts
        .iter()
        .filter(|attempt| matches!(attempt.answer, Answer::Forbidden(_) | Answer::Invalid(_)))
        .count();
    assert!(
        refused >= 20,
        "too few hostile writes judged: {}",
        summary(&log.attempts)
    );
    // Commands were timed, and at least one exec was killed while its
    // command ran (and the checker found its tree gone before the expiry).
    assert!(
        log.commands.iter().any(|command| command.ticks > 0),
        "no exec command wrote its times"
    );
    assert!(
        log.commands.iter().any(|command| command.killed.is_some()),
        "no exec was killed while its command ran: {}",
        counts(ops)
    );
    assert!(!log.faults.is_empty(), "no fault was injected");
}
