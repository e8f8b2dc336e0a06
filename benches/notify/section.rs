//! `make bench` rows for team notifications: transition → notification
//! received (a real loopback receiver), and acquire latency with 0 and with
//! 10 subscriptions (the lock path does not wait for delivery).

use std::collections::BTreeSet;
use std::time::{Duration as StdDuration, Instant};

use crate::receiver::Receiver;
use crate::support::{Identity, cluster};
use crate::{Row, kubectl_ok, p50, timed};

const TRANSITIONS: usize = 200;
const ACQUIRES: usize = 60;

fn install_crd() {
    let crd = crate::support::repo_root()
        .join("crds/notificationsubscriptions.deploylock.dev.yaml")
        .display()
        .to_string();
    kubectl_ok(&["apply", "--server-side", "-f", &crd], None);
    kubectl_ok(
        &[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "-f",
            &crd,
        ],
        None,
    );
}

fn subscribe(namespace: &str, name: &str, url: &str) {
    kubectl_ok(
        &[
            "-n",
            namespace,
            "create",
            "secret",
            "generic",
            name,
            &format!("--from-literal=address={url}"),
        ],
        None,
    );
    let manifest = format!(
        r#"{{"apiVersion":"deploylock.dev/v1","kind":"NotificationSubscription",
            "metadata":{{"name":"{name}","namespace":"{namespace}"}},
            "spec":{{"provider":{{"type":"generic","secretRef":{{"name":"{name}"}}}},
                     "retry":{{"maxBackoffSeconds":1}}}}}}"#
    );
    kubectl_ok(&["apply", "-f", "-"], Some(&manifest));
}

fn cli(namespace: &str, args: &[&str]) -> f64 {
    let mut command = cluster().deploylock_command(Identity::Alice, namespace);
    command.args(args);
    let (ms, ok) = timed(command);
    assert!(ok, "deploylock {args:?} failed");
    ms
}

fn keys_delivered(receiver: &Receiver) -> BTreeSet<String> {
    receiver
        .delivered()
        .iter()
        .filter_map(|r| r.header("idempotency-key").map(str::to_string))
        .collect()
}

pub async fn notifications(rows: &mut Vec<Row>) {
    install_crd();
    let cluster = cluster();
    let namespace = cluster.namespace("bench-notify").await;
    let receiver = Receiver::start().await;
    subscribe(&namespace, "team", &receiver.url("/team"));
    let _controller = cluster.spawn_controller(&namespace, "bench-notify", &[]);
    // Warm-up: the first transition, once the subscription is served.
    cli(&namespace, &["acquire", "--reason", "bench"]);
    receiver
        .wait_for("the first notification", StdDuration::from_secs(60), |r| {
            r.iter().any(|r| r.delivered())
        })
        .await;
    // Each transition, then its notification: from the CLI's exit (the
    // write is committed) to the receiver reading the request.
    let mut latencies = Vec::with_capacity(TRANSITIONS);
    for i in 0..TRANSITIONS {
        let before = keys_delivered(&receiver).len();
        let action: &[&str] = if i % 2 == 0 {
            &["release"]
        } else {
            &["acquire", "--reason", "bench"]
        };
        cli(&namespace, action);
        let done = Instant::now();
        let requests = receiver
            .wait_for(
                "the transition's notification",
                StdDuration::from_secs(60),
                |r| {
                    r.iter()
                        .filter(|r| r.delivered())
                        .filter_map(|r| r.header("idempotency-key"))
                        .collect::<BTreeSet<_>>()
                        .len()
                        > before
                },
            )
            .await;
        let arrived = requests
            .iter()
            .filter(|r| r.delivered())
            .map(|r| r.arrived)
            .max()
            .unwrap_or(done);
        latencies.push(arrived.saturating_duration_since(done).as_secs_f64() * 1000.0);
    }
    rows.push(Row {
        name: format!("transition → notification received (ms, {TRANSITIONS} transitions)"),
        samples: latencies,
        unit: "ms",
        baseline: None,
        target: "p99 ≤ 1000".into(),
        note: "from the CLI's exit to a loopback receiver reading the request; the leader's one lock watch, the cursor written at most once a second".into(),
    });

    // Acquire latency with 0 and with 10 subscriptions, interleaved (one of
    // each in turn) so that both see the same machine: two namespaces, each
    // with its controller, the subscriptions in one.
    let quiet = cluster.namespace("bench-notify-quiet").await;
    let busy = cluster.namespace("bench-notify-busy").await;
    let _quiet_controller = cluster.spawn_controller(&quiet, "bench-notify-quiet", &[]);
    let _busy_controller = cluster.spawn_controller(&busy, "bench-notify-busy", &[]);
    let receivers: Vec<Receiver> = {
        let mut list = Vec::new();
        for _ in 0..10 {
            list.push(Receiver::start().await);
        }
        list
    };
    for (n, receiver) in receivers.iter().enumerate() {
        subscribe(&busy, &format!("sub-{n}"), &receiver.url("/hook"));
    }
    // Measured once every subscription is served (Ready), not while the
    // controller takes them up.
    kubectl_ok(
        &[
            "-n",
            &busy,
            "wait",
            "--for=condition=Ready",
            "--timeout=120s",
            "notificationsubscriptions",
            "--all",
        ],
        None,
    );
    for namespace in [&quiet, &busy] {
        cli(
            namespace,
            &["-e", "warm-up", "acquire", "--reason", "bench"],
        );
    }
    let mut without = Vec::with_capacity(ACQUIRES);
    let mut with = Vec::with_capacity(ACQUIRES);
    for i in 0..ACQUIRES {
        let environment = format!("env-{i}");
        without.push(cli(
            &quiet,
            &["-e", &environment, "acquire", "--reason", "bench"],
        ));
        with.push(cli(
            &busy,
            &["-e", &environment, "acquire", "--reason", "bench"],
        ));
    }
    // The messages did go out meanwhile.
    for receiver in &receivers {
        receiver
            .wait_for(
                "the acquires' notifications",
                StdDuration::from_secs(120),
                |r| r.iter().filter(|r| r.delivered()).count() > ACQUIRES,
            )
            .await;
    }
    let ratio = p50(&with) / p50(&without);
    rows.push(Row {
        name: "acquire with 10 subscriptions (ms)".into(),
        samples: with,
        unit: "ms",
        baseline: Some(("0 subscriptions".into(), ratio)),
        target: "≈ 1× (no wait on delivery)".into(),
        note: format!(
            "{ACQUIRES} acquires, interleaved with those of a namespace without subscriptions; 10 loopback receivers"
        ),
    });
    rows.push(Row {
        name: "baseline: acquire with 0 subscriptions (ms)".into(),
        samples: without,
        unit: "ms",
        baseline: None,
        target: String::new(),
        note: String::new(),
    });
}
