//! The short torture run inside `make test` (the engine is in torture.rs;
//! `make torture` runs it for minutes with faults): in-process clients and
//! `deploylock` processes, the controller killed midway.

use std::time::Duration as StdDuration;

use chrono::Utc;

use crate::support::cluster;
use crate::torture::{
    OpKind, OpResult, Plan, Target, ambiguous, check, counts, lost_refusals, run,
};
use deploylock::store::Outcome;

#[tokio::test]
async fn short_torture_run_finds_no_violation() {
    let cluster = cluster();
    let namespace = cluster.namespace("torture").await;
    let target = Target::on(cluster, &namespace);
    let seed = Utc::now().timestamp_nanos_opt().unwrap_or(7) as u64;
    eprintln!("torture seed {seed}");
    // The controller is killed with SIGKILL and restarted midway.
    let controller = cluster.spawn_controller(&namespace, "torture", &[]);
    let plan = Plan {
        environments: 3,
        in_process: 2,
        processes: 1,
        duration: StdDuration::from_secs(8),
        seed,
        pauses: false,
    };
    let engine = run(&target, &plan);
    let chaos = async {
        tokio::time::sleep(StdDuration::from_secs(3)).await;
        controller.signal("KILL");
        cluster.spawn_controller(&namespace, "torture", &[])
    };
    let (ops, _restarted) = tokio::join!(engine, chaos);
    let (checked, violations) = check(&target, &ops).await;
    let (unknown, first_unknown) = ambiguous(&ops);
    eprintln!(
        "torture: {checked} operations checked, {} lost/refused as expected, {unknown} of unknown outcome ({first_unknown:?}), {} violations",
        lost_refusals(&ops),
        violations.len()
    );
    eprintln!("torture: {}", counts(&ops));
    assert!(checked > 50, "too few operations: {checked}");
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
        violations.is_empty(),
        "violations:\n{}",
        violations.join("\n")
    );
}
