//! The short torture run inside `make test` (the engine is testkit/src/torture.rs;
//! `make torture` runs it for minutes with more faults): in-process clients
//! and `deploylock` processes in a namespace where the admission policy is
//! enforced, a hostile client sending forbidden writes, the execs' connections
//! frozen, reset and black-holed by a proxy, execs killed with SIGKILL of
//! their process group mid-command, the controller killed midway, every
//! history transition notified to a flaky loopback receiver, and every
//! environment bound to a workload namespace where gate writers (holders,
//! an admin, an identity that never holds) keep writing workloads: the API
//! server's audit log must show no write admitted against the lock.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};

use crate::support::cluster;
use deploylock::store::Outcome;
use testkit::torture::{
    OpKind, OpResult, Partitions, Plan, Target, ambiguous, check, command_report, counts,
    lost_refusals, outcomes, run,
};
use testkit::torture_gate::{
    AcceptedWrite, BoundGate, GateAnswer, GateCheck, LockVersion, STALENESS, Witness, judge,
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
    let environments = 3;
    // The gate's part of the run's time (reported, never asserted).
    let gate_started = std::time::Instant::now();
    let gate = BoundGate::bind(cluster, &namespace, environments).await;
    // The controller is killed with SIGKILL and restarted midway; it keeps
    // the gate's policy bindings of the EnvironmentBindings.
    let controller_args = ["--environment-bindings"];
    let controller = cluster.spawn_controller(&namespace, "torture", &controller_args);
    gate.await_in_force(StdDuration::from_secs(60)).await;
    let gate_set_up = gate_started.elapsed();
    let plan = Plan {
        environments,
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
        cluster.spawn_controller(&namespace, "torture", &controller_args)
    };
    let gate_writers = gate.write(
        tokio::time::Instant::now() + plan.duration,
        StdDuration::from_millis(100),
        seed,
    );
    let (log, _restarted, writes) = tokio::join!(engine, chaos, gate_writers);
    let ops = &log.ops;
    let (checked, mut violations) = check(&target, &log).await;
    let check_started = std::time::Instant::now();
    let (gated, control) = gate.check(&writes);
    eprintln!(
        "torture: {} (set up and bound in {gate_set_up:?}, checked in {:?})",
        gated.summary(),
        check_started.elapsed()
    );
    eprintln!(
        "torture: gate writes: {}",
        testkit::torture_gate::by_kind(&writes)
    );
    violations.extend(gated.violations.iter().cloned());
    // The control: the writes the gate refused, judged as if admitted, are
    // caught (the check fails when a write goes through against the lock).
    eprintln!(
        "torture: gate control: {} of the {} writes the gate refused would be violations had they been admitted, {} within the informer's lag (first: {:?})",
        control.violations.len(),
        control.audited,
        control.stale_former_holder + control.stale_free,
        control.violations.first()
    );
    let notified = notifications
        .check(&log.recorded.history, StdDuration::from_secs(120))
        .await;
    eprintln!(
        "torture: notifications: {} history entries checked against {} requests to a receiver failing every 4th; {} dropped from a history before a leader could deliver them (while the killed controller's lease ran out), reported; {} delivered from a gap of the recorder's watch (not judged); {} violations",
        notified.entries,
        notified.requests,
        notified.reported_lost,
        notified.unrecorded,
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
    let by_processes = |kinds: &[OpKind]| {
        ops.iter()
            .filter(|op| op.process && kinds.contains(&op.kind))
            .count()
    };
    // An acquire with or without a wait: killed execs that wait for held
    // locks can fill a short run's 8 s, leaving room for one or the other.
    for kinds in [&[OpKind::Acquire, OpKind::AcquireWait][..], &[OpKind::Exec]] {
        assert!(
            by_processes(kinds) > 0,
            "no {kinds:?} by a deploylock process"
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
    // The gate was in force and judged: writes were refused by it, accepted
    // writes by identities it restrains were judged, and every write the
    // writers saw accepted is in the audit log.
    assert!(
        gated.sent[1] > 0 && gated.judged > 0,
        "the gate refused or judged nothing: {}",
        gated.summary()
    );
    assert!(
        !control.violations.is_empty(),
        "the checker would have let every write the gate refused pass: {}",
        control.summary()
    );
    assert_eq!(
        gated.unaudited,
        0,
        "accepted writes missing from the audit log: {}",
        gated.summary()
    );
    let other_refusals: Vec<_> = writes
        .iter()
        .filter(|write| matches!(write.answer, GateAnswer::Refused(code, _) if code != 404))
        .take(3)
        .collect();
    assert!(
        other_refusals.is_empty(),
        "gate writes refused for another reason than the gate: {other_refusals:?}"
    );
}

/// The gate checker names a write admitted while another identity held the
/// lock, and tolerates only what the gate's informer lag explains: a crafted
/// audit timeline of `t0` (alice holds from 0 s, bob takes it over at 10 s,
/// bob releases at 20 s, carol takes it at 30 s until 40 s).
#[test]
fn gate_checker_flags_a_write_admitted_against_the_lock() {
    let start: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap_or_default();
    let at = |ms: i64| start + Duration::milliseconds(ms);
    let version = |rv: u64, ms: i64, holder: Option<(&str, i64)>, sequence: i64| LockVersion {
        resource_version: rv,
        received: at(ms - 5),
        stored: at(ms),
        holder: holder.map(|(user, until)| (user.to_string(), format!("{user}-lock"), at(until))),
        last_sequence: sequence,
    };
    let timeline = BTreeMap::from([(
        "t0".to_string(),
        vec![
            version(10, 0, Some(("alice", 60_000)), 1),
            version(20, 10_000, Some(("bob", 60_000)), 2),
            version(30, 20_000, None, 3),
            version(40, 30_000, Some(("carol", 40_000)), 4),
        ],
    )]);
    let write = |user: &str, ms: i64| AcceptedWrite {
        user: user.to_string(),
        environment: "t0".to_string(),
        what: format!("patch deployments/web by {user} at {ms} ms"),
        received: at(ms),
        completed: at(ms + 20),
    };
    let exempt = HashSet::from(["admin".to_string()]);
    let judged_with = |writes: &[AcceptedWrite], witnesses: &[Witness]| {
        let mut check = GateCheck::default();
        judge(&timeline, writes, witnesses, &exempt, STALENESS, &mut check);
        check
    };
    let judged = |writes: &[AcceptedWrite]| judged_with(writes, &[]);
    // Allowed: before any lock, the holder, the former holder within the
    // informer's lag, anyone while free, after the expiry, an exempt admin.
    let fine = judged(&[
        write("viewer", -1_000),
        write("alice", 5_000),
        write("alice", 10_500),
        write("viewer", 20_100),
        write("bob", 41_000),
        write("admin", 35_000),
    ]);
    assert!(fine.violations.is_empty(), "{:?}", fine.violations);
    assert_eq!(
        (
            fine.judged,
            fine.exempt,
            fine.stale_former_holder,
            fine.stale_free
        ),
        (5, 1, 1, 0)
    );
    assert!(
        fine.longest_lag >= StdDuration::from_millis(500),
        "{fine:?}"
    );
    // Violations: a non-holder while alice held; bob while carol held; the
    // former holder past the informer's lag.
    let bad = judged(&[
        write("viewer", 5_000),
        write("bob", 35_000),
        write("alice", 13_000),
    ]);
    assert_eq!(bad.violations.len(), 3, "{:?}", bad.violations);
    assert!(
        bad.violations[0].contains("viewer's patch deployments/web by viewer at 5000 ms")
            && bad.violations[0].contains("alice held t0 (lock ID alice-lock"),
        "{}",
        bad.violations[0]
    );
    assert!(
        bad.violations[1].contains("carol held t0"),
        "{}",
        bad.violations[1]
    );
    assert!(
        bad.violations[2].contains("bob held t0"),
        "{}",
        bad.violations[2]
    );
    // A refusal answered at 10.1 s named bob's holding: the gate's informer
    // had read it, so alice's write at 10.5 s cannot have been admitted by
    // her older holding.
    let bob_seen = Witness {
        environment: "t0".to_string(),
        answered: at(10_100),
        holding: ("bob".to_string(), at(60_000)),
    };
    let witnessed = judged_with(&[write("alice", 10_500)], &[bob_seen]);
    assert_eq!(
        (witnessed.violations.len(), witnessed.below_floor),
        (1, 1),
        "{witnessed:?}"
    );
    // A transition missing from the audit log (sequence 2 to 4) leaves the
    // write undecided, counted, not a violation.
    let gap = BTreeMap::from([(
        "t0".to_string(),
        vec![
            version(10, 0, Some(("alice", 60_000)), 1),
            version(40, 30_000, Some(("carol", 40_000)), 4),
        ],
    )]);
    let mut check = GateCheck::default();
    judge(
        &gap,
        &[write("viewer", 29_000)],
        &[],
        &exempt,
        STALENESS,
        &mut check,
    );
    assert_eq!((check.in_audit_gap, check.violations.len()), (1, 0));
}
