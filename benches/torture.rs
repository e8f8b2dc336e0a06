//! `make torture`: the torture engine of testkit/src/torture.rs run for
//! minutes on a control plane of its own, in a namespace where the admission
//! policy is enforced, with faults injected: kube-apiserver and etcd
//! restarted, the controller killed with SIGKILL and restarted, holders
//! paused past their expiry (in-process ones sleep; an exec process is
//! stopped with SIGSTOP), the execs' connections frozen, reset and
//! black-holed (some for longer than a holding can go unrenewed), execs
//! killed with SIGKILL of their process group mid-command, and hostile
//! clients sending forbidden writes throughout, and every history transition
//! notified to a flaky loopback receiver (each entry delivered at least once,
//! none that did not happen), and every environment bound to a workload
//! namespace where gate writers keep writing workloads (no write admitted
//! against the lock, by the API server's audit log). Reports how many operations
//! it checked; exits 1 on any violation. TORTURE_SECONDS sets the length
//! (default 720).

use std::process::{Command, ExitCode};
use std::time::Duration;

use testkit::{TestCluster, repo_root, torture, torture_gate, torture_hostile, torture_notify};

/// The shared control plane, with this package's binaries.
fn cluster() -> &'static TestCluster {
    testkit::cluster(testkit::binaries!())
}

fn restart(server: &str) {
    let status = Command::new(repo_root().join("hack/cluster.sh"))
        .arg(format!("restart-{server}"))
        .arg("--dir")
        .arg(cluster().dir())
        .status();
    eprintln!("[torture] fault: restarted {server} ({status:?})");
}

#[tokio::main]
async fn main() -> ExitCode {
    let seconds: u64 = std::env::var("TORTURE_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(720);
    let seed = std::env::var("TORTURE_SEED")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| chrono::Utc::now().timestamp_nanos_opt().unwrap_or(7) as u64);
    let cluster = cluster();
    let namespace = cluster.enforced_namespace("torture-long").await;
    let target = torture::Target::on(cluster, &namespace);
    let notifications = torture_notify::Notifications::subscribe(cluster, &namespace).await;
    let environments = 4;
    let gate = torture_gate::BoundGate::bind(cluster, &namespace, environments).await;
    // Every controller of the run keeps the gate's policy bindings.
    let controller_args = ["--environment-bindings"];
    let first_controller = cluster.spawn_controller(&namespace, "torture", &controller_args);
    gate.await_in_force(Duration::from_secs(60)).await;
    eprintln!("[torture] {seconds} s, seed {seed}, namespace {namespace}");
    let duration = Duration::from_secs(seconds);
    let plan = torture::Plan {
        environments,
        in_process: 3,
        processes: 1,
        duration,
        seed,
        pauses: true,
        hostile: 2,
        hostile_pause: Duration::from_millis(100),
        hostile_at_least: 0,
        partitions: Some(torture::Partitions {
            gap: (Duration::from_secs(3), Duration::from_secs(20)),
            length: (Duration::from_secs(1), Duration::from_secs(15)),
            long_ones: true,
        }),
        kill_every: Some(Duration::from_secs(30)),
        longest_command: Duration::from_secs(100),
        killed_left_to_expire: true,
    };
    let engine = torture::run(&target, &plan);
    let chaos = async {
        let mut controller = first_controller;
        let started = std::time::Instant::now();
        let mut round = 0;
        while started.elapsed() + Duration::from_secs(20) < duration {
            tokio::time::sleep(Duration::from_secs(15)).await;
            match round % 3 {
                0 => restart("apiserver"),
                1 => restart("etcd"),
                _ => {
                    controller.signal("KILL");
                    eprintln!("[torture] fault: controller killed with SIGKILL; restarting it");
                    controller = cluster.spawn_controller(&namespace, "torture", &controller_args);
                }
            }
            round += 1;
        }
        // The controller outlives the run: it still has notifications to send.
        (round, controller)
    };
    let gate_writers = gate.write(
        tokio::time::Instant::now() + duration,
        Duration::from_millis(200),
        seed,
    );
    let (log, (faults, _controller), writes) = tokio::join!(engine, chaos, gate_writers);
    // Let the restarted servers settle before reading the final objects.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (checked, mut violations) = torture::check(&target, &log).await;
    let notified = notifications
        .check(&log.recorded.history, Duration::from_secs(300))
        .await;
    violations.extend(notified.violations.iter().cloned());
    let (gated, control) = gate.check(&writes);
    violations.extend(gated.violations.iter().cloned());
    let ops = &log.ops;
    let (unknown, first_unknown) = torture::ambiguous(ops);
    println!(
        "torture: {checked} operations, hostile writes and commands checked in {seconds} s with {faults} server and controller faults; {} refusals to stale or overridden holders; {unknown} of unknown outcome during faults ({first_unknown:?}); {} violations",
        torture::lost_refusals(ops),
        violations.len()
    );
    println!("operations: {}", torture::counts(ops));
    println!("hostile: {}", torture_hostile::summary(&log.attempts));
    println!("{}", torture_hostile::by_attack(&log.attempts));
    println!("exec: {}", torture::command_report(&log));
    println!(
        "notifications: {} history entries checked against {} requests to a receiver failing every 4th; {} dropped from a history before a leader could deliver them, reported; {} delivered from a gap of the recorder's watch (not judged)",
        notified.entries, notified.requests, notified.reported_lost, notified.unrecorded
    );
    println!("{}", gated.summary());
    println!(
        "gate control: {} of the {} writes the gate refused would be violations had they been admitted, {} within the informer's lag",
        control.violations.len(),
        control.audited,
        control.stale_former_holder + control.stale_free
    );
    println!("gate writes: {}", torture_gate::by_kind(&writes));
    for violation in &violations {
        println!("VIOLATION {violation}");
    }
    if violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
