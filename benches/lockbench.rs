//! `make bench`: deploylock measured against baselines on the local control
//! plane. Prints one table and writes it to docs/benchmarks.md.
//!
//! Whole-process timings (the CLI as a CI job runs it) are taken with a small
//! harness of our own; every figure is a distribution over repeated samples,
//! with the ratio to its baseline measured in the same run.

/// The test kit, given this package's binaries.
mod support {
    pub use testkit::*;

    pub fn cluster() -> &'static TestCluster {
        testkit::cluster(testkit::binaries!())
    }
}

use testkit::receiver;

#[path = "notify/section.rs"]
mod notify_section;

#[path = "lockbench/gitops.rs"]
mod gitops;

#[path = "lockbench/gate.rs"]
mod gate;

#[path = "lockbench/windows.rs"]
mod windows;

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration as StdDuration, Instant};

use chrono::{Duration, Utc};
use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, Patch, PatchParams, WatchEvent, WatchParams};
use kube::runtime::wait::await_condition;
use serde_json::json;

use deploylock::crd::{DeploymentLock, LockState};
use support::{Fault, FaultProxy, Identity, cluster};

const SAMPLES: usize = 30;

struct Row {
    name: String,
    samples: Vec<f64>,
    unit: &'static str,
    baseline: Option<(String, f64)>,
    target: String,
    note: String,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn summary(samples: &[f64]) -> (f64, f64, f64, f64) {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    (
        percentile(&sorted, 50.0),
        percentile(&sorted, 90.0),
        percentile(&sorted, 99.0),
        sorted.last().copied().unwrap_or(f64::NAN),
    )
}

/// kubectl as the admin (`input` on stdin when given), which must succeed.
fn kubectl_ok(args: &[&str], input: Option<&str>) {
    let output = match input {
        Some(input) => cluster().kubectl_with_input(Identity::Admin, args, input),
        None => cluster().kubectl(Identity::Admin, args),
    };
    assert!(
        output.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn p50(samples: &[f64]) -> f64 {
    summary(samples).0
}

fn timed(mut command: Command) -> (f64, bool) {
    let started = Instant::now();
    let status = command.stdout(Stdio::null()).stderr(Stdio::null()).status();
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    (elapsed, matches!(status, Ok(s) if s.success()))
}

fn lock_json(name: &str, user: &str) -> serde_json::Value {
    let now = Utc::now();
    json!({
        "apiVersion": "deploylock.dev/v1",
        "kind": "DeploymentLock",
        "metadata": { "name": name },
        "spec": {
            "environment": name,
            "fencingToken": 1,
            "holder": {
                "lockId": uuid::Uuid::new_v4().to_string(),
                "user": user, "owner": user, "type": "manual",
                "reason": "bench",
                "acquiredAt": now.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                "expiresAt": (now + Duration::minutes(30)).format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                "durationSeconds": 1800
            }
        }
    })
}

/// acquire vs curl POST vs kubectl create, whole process each.
async fn acquire_latency(rows: &mut Vec<Row>) {
    let cluster = cluster();
    let namespace = cluster.namespace("bench-acquire").await;
    let kubeconfig = cluster.kubeconfig(Identity::Alice);
    let pki = kubeconfig
        .parent()
        .and_then(|dir| dir.parent())
        .map(|dir| dir.join("pki"))
        .unwrap_or_default();
    let server = std::fs::read_to_string(&kubeconfig)
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.trim().strip_prefix("server: ").map(str::to_string))
        .unwrap_or_default();
    let temp = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    // The API server spends about 2 s on the first DeploymentLock created
    // after it starts (its quota admission adds an evaluator for the type),
    // whoever creates it: one warm-up acquire, not counted.
    let mut warm_up = cluster.deploylock_command(Identity::Alice, &namespace);
    warm_up.args(["-e", "warm-up", "acquire", "--reason", "bench"]);
    assert!(timed(warm_up).1, "warm-up acquire failed");
    let (mut ours, mut curl, mut kubectl) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..SAMPLES {
        let mut command = cluster.deploylock_command(Identity::Alice, &namespace);
        command.args(["-e", &format!("ours-{i}"), "acquire", "--reason", "bench"]);
        let (ms, ok) = timed(command);
        assert!(ok, "deploylock acquire failed");
        ours.push(ms);

        let body = temp.path().join(format!("curl-{i}.json"));
        std::fs::write(&body, lock_json(&format!("curl-{i}"), "alice").to_string())
            .unwrap_or_else(|err| panic!("{err}"));
        let mut command = Command::new("curl");
        command
            .args([
                "-sf",
                "-o",
                "/dev/null",
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
            ])
            .arg("--cacert")
            .arg(pki.join("ca.crt"))
            .arg("--cert")
            .arg(pki.join("alice.crt"))
            .arg("--key")
            .arg(pki.join("alice.key"))
            .arg("--data-binary")
            .arg(format!("@{}", body.display()))
            .arg(format!(
                "{server}/apis/deploylock.dev/v1/namespaces/{namespace}/deploymentlocks"
            ));
        let (ms, ok) = timed(command);
        assert!(ok, "curl POST failed");
        curl.push(ms);

        let file = temp.path().join(format!("kubectl-{i}.json"));
        std::fs::write(
            &file,
            lock_json(&format!("kubectl-{i}"), "alice").to_string(),
        )
        .unwrap_or_else(|err| panic!("{err}"));
        let mut command = Command::new(cluster.bin_dir().join("kubectl"));
        command
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["-n", &namespace, "create", "-f"])
            .arg(&file);
        let (ms, ok) = timed(command);
        assert!(ok, "kubectl create failed");
        kubectl.push(ms);
    }
    let ours_p50 = p50(&ours);
    rows.push(Row {
        name: "acquire, whole process (ms)".into(),
        baseline: Some(("curl POST".into(), ours_p50 / p50(&curl))),
        samples: ours.clone(),
        unit: "ms",
        target: "≤ 1.3× curl".into(),
        note: "SelfSubjectReview + GET + create; after one warm-up create".into(),
    });
    rows.push(Row {
        name: "acquire vs kubectl create (ms)".into(),
        baseline: Some(("kubectl create".into(), ours_p50 / p50(&kubectl))),
        samples: ours,
        unit: "ms",
        target: "≤ 0.5× kubectl".into(),
        note: String::new(),
    });
    rows.push(Row {
        name: "baseline: curl POST (ms)".into(),
        samples: curl,
        unit: "ms",
        baseline: None,
        target: String::new(),
        note: "one HTTPS request".into(),
    });
    rows.push(Row {
        name: "baseline: kubectl create (ms)".into(),
        samples: kubectl,
        unit: "ms",
        baseline: None,
        target: String::new(),
        note: String::new(),
    });
}

/// Time from `release` returning to the waiting client holding the lock.
async fn hand_off(rows: &mut Vec<Row>) {
    let cluster = cluster();
    let namespace = cluster.namespace("bench-handoff").await;
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let mut watched = Vec::new();
    let mut polled = Vec::new();
    for i in 0..SAMPLES {
        for polling in [false, true] {
            let env = format!("handoff-{i}-{polling}");
            let held = cluster.deploylock(
                Identity::Alice,
                &namespace,
                &["-e", &env, "acquire", "--reason", "holder"],
            );
            assert!(held.status.success());
            let bin = env!("CARGO_BIN_EXE_deploylock");
            let kubeconfig = cluster.kubeconfig(Identity::Bob);
            let script = if polling {
                format!(
                    "until {bin} --kubeconfig {} -n {namespace} -e {env} acquire --reason next 2>/dev/null; do sleep 1; done",
                    kubeconfig.display()
                )
            } else {
                format!(
                    "{bin} --kubeconfig {} -n {namespace} -e {env} acquire --wait-timeout 60 --reason next",
                    kubeconfig.display()
                )
            };
            let mut waiter = Command::new("sh")
                .args(["-c", &script])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|err| panic!("{err}"));
            if !polling {
                let queued =
                    |lock: Option<&DeploymentLock>| lock.is_some_and(|l| !l.spec.queue.is_empty());
                let _ = tokio::time::timeout(
                    StdDuration::from_secs(30),
                    await_condition(api.clone(), &env, queued),
                )
                .await;
            } else {
                // The polling client has made its first attempt when it has run once.
                tokio::time::sleep(StdDuration::from_millis(1500)).await;
            }
            let released =
                cluster.deploylock(Identity::Alice, &namespace, &["-e", &env, "release"]);
            let released_at = Instant::now();
            assert!(released.status.success());
            let bob_holds = |lock: Option<&DeploymentLock>| {
                lock.and_then(|l| l.spec.holder.as_ref())
                    .is_some_and(|h| h.user == "bob")
            };
            let _ = tokio::time::timeout(
                StdDuration::from_secs(30),
                await_condition(api.clone(), &env, bob_holds),
            )
            .await;
            let ms = released_at.elapsed().as_secs_f64() * 1000.0;
            let _ = waiter.wait();
            if polling {
                polled.push(ms)
            } else {
                watched.push(ms)
            }
        }
    }
    let ratio = p50(&watched) / p50(&polled);
    rows.push(Row {
        name: "hand-off: release → waiter holds (ms)".into(),
        samples: watched,
        unit: "ms",
        baseline: Some(("1 s polling client".into(), ratio)),
        target: "p50 ≤ 50, p99 ≤ 200".into(),
        note: "queued waiter woken by a watch".into(),
    });
    rows.push(Row {
        name: "baseline: polling once a second (ms)".into(),
        samples: polled,
        unit: "ms",
        baseline: None,
        target: String::new(),
        note: "`until acquire; do sleep 1; done`".into(),
    });
}

/// N concurrent acquirers: time until all have their answer; one winner.
async fn contention(rows: &mut Vec<Row>) {
    let cluster = cluster();
    let namespace = cluster.namespace("bench-contention").await;
    for clients in [2usize, 8, 32, 64] {
        let rounds = if clients >= 32 { 3 } else { 8 };
        let mut samples = Vec::new();
        for round in 0..rounds {
            let env = format!("c{clients}-{round}");
            let started = Instant::now();
            let children: Vec<_> = (0..clients)
                .map(|i| {
                    let identity = if i % 2 == 0 {
                        Identity::Alice
                    } else {
                        Identity::Bob
                    };
                    cluster
                        .deploylock_command(identity, &namespace)
                        .args([
                            "-e",
                            &env,
                            "acquire",
                            "--reason",
                            "race",
                            "--owner",
                            &format!("r{i}"),
                        ])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap_or_else(|err| panic!("{err}"))
                })
                .collect();
            let winners = children
                .into_iter()
                .filter_map(|mut child| child.wait().ok())
                .filter(|status| status.success())
                .count();
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(winners, 1, "{clients} clients: {winners} winners");
        }
        rows.push(Row {
            name: format!("contention: {clients} acquirers, all answered (ms)"),
            samples,
            unit: "ms",
            baseline: None,
            target: "exactly one winner".into(),
            note: format!("{rounds} rounds, one winner each"),
        });
    }
}

/// 1,000 live locks with spread expiries: delay from expiresAt to Expired.
async fn expiry_precision(rows: &mut Vec<Row>) {
    let cluster = cluster();
    let namespace = cluster.namespace("bench-expiry").await;
    let _controller = cluster.spawn_controller(&namespace, "bench-expiry", &[]);
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let count = 1000;
    let base = Utc::now() + Duration::seconds(20);
    let mut expiries = std::collections::HashMap::new();
    for i in 0..count {
        let name = format!("e{i}");
        let expires = base + Duration::milliseconds((i as i64 * 20_000) / count as i64);
        let mut object = lock_json(&name, "alice");
        object["spec"]["holder"]["acquiredAt"] = json!(expires - Duration::minutes(1));
        object["spec"]["holder"]["expiresAt"] = json!(expires);
        api.patch(
            &name,
            &PatchParams::apply("bench").force(),
            &Patch::Apply(&object),
        )
        .await
        .unwrap_or_else(|err| panic!("{err}"));
        expiries.insert(name, expires);
    }
    let mut delays = Vec::new();
    let mut stream = api
        .watch(&WatchParams::default().timeout(120), "0")
        .await
        .unwrap_or_else(|err| panic!("{err}"))
        .boxed();
    let deadline = Instant::now() + StdDuration::from_secs(120);
    while delays.len() < count && Instant::now() < deadline {
        let event = tokio::time::timeout(StdDuration::from_secs(30), stream.try_next()).await;
        let Ok(Ok(Some(WatchEvent::Modified(lock) | WatchEvent::Added(lock)))) = event else {
            continue;
        };
        let name = lock.metadata.name.clone().unwrap_or_default();
        if lock.status.as_ref().and_then(|s| s.state) == Some(LockState::Expired)
            && let Some(expires) = expiries.remove(&name)
        {
            delays.push((Utc::now() - expires).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        }
    }
    rows.push(Row {
        name: "expiry: expiresAt → Expired seen on a watch (ms)".into(),
        note: format!(
            "{} of {count} locks, expiries spread over 20 s",
            delays.len()
        ),
        samples: delays,
        unit: "ms",
        baseline: None,
        target: "p99 ≤ 1000".into(),
    });
}

/// From force-release returning to the exec child receiving SIGTERM.
async fn lost_lock(rows: &mut Vec<Row>) {
    let cluster = cluster();
    let namespace = cluster.namespace("bench-lost").await;
    let temp = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let mut samples = Vec::new();
    for i in 0..10 {
        let env = format!("lost-{i}");
        let marker = temp.path().join(format!("term-{i}"));
        let ready = temp.path().join(format!("ready-{i}"));
        let script = format!(
            "trap 'date +%s%N > {}; exit 0' TERM; touch {}; while true; do sleep 0.05; done",
            marker.display(),
            ready.display()
        );
        let mut exec = cluster
            .deploylock_command(Identity::Alice, &namespace)
            .args([
                "-e", &env, "exec", "--reason", "bench", "--", "sh", "-c", &script,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("{err}"));
        let started = Instant::now();
        while !ready.exists() && started.elapsed() < StdDuration::from_secs(30) {
            tokio::time::sleep(StdDuration::from_millis(10)).await;
        }
        let released = cluster.deploylock(
            Identity::Bob,
            &namespace,
            &["-e", &env, "force-release", "--reason", "bench"],
        );
        let released_at = Utc::now();
        assert!(released.status.success());
        let _ = exec.wait();
        let nanos: i64 = std::fs::read_to_string(&marker)
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(0);
        let term = chrono::DateTime::from_timestamp_nanos(nanos);
        samples.push((term - released_at).num_microseconds().unwrap_or(0) as f64 / 1000.0);
    }
    rows.push(Row {
        name: "lost lock: force-release → child SIGTERM (ms)".into(),
        samples,
        unit: "ms",
        baseline: None,
        target: "≤ 2000".into(),
        note: "exec watches the lock object".into(),
    });
}

/// A command tree that outlives a plain SIGTERM: a grandchild ignoring it,
/// one in a session of its own. Every process of it holds the write end of
/// the fifo `$TREE` (fd 3), which neither exec nor its watchdog opens: the
/// fifo's end of file is the end of the tree, not of exec (which outlives
/// its command by its release attempts).
const STUBBORN_TREE: &str =
    r#"exec 3> "$TREE"; (trap '' TERM; exec sleep 300) & setsid sleep 300 & wait"#;

/// One partitioned exec: the margin (ms) between its command tree being
/// gone and the holding's expiresAt, on the server's clock (the upper bound
/// of its possible time at that instant, so the margin errs small), and
/// exec's exit code.
async fn partitioned_exec(
    namespace: &str,
    environment: &str,
    fault: Fault,
    clock: &deploylock::servertime::ServerClock,
    dir: &std::path::Path,
) -> Result<(f64, Option<i32>), String> {
    let cluster = cluster();
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, namespace);
    let proxy_dir = dir.join(environment);
    std::fs::create_dir_all(&proxy_dir)
        .map_err(|err| format!("cannot create {}: {err}", proxy_dir.display()))?;
    let proxy = FaultProxy::start(&cluster.kubeconfig(Identity::Alice), &proxy_dir).await;
    let tree = dir.join(format!("{environment}.tree"));
    let made = Command::new("mkfifo").arg(&tree).status();
    if !matches!(made, Ok(status) if status.success()) {
        return Err(format!("mkfifo {}: {made:?}", tree.display()));
    }
    // The instant the fifo's last writer closes it: every process of the
    // tree is gone.
    let (closed_sender, closed) = tokio::sync::oneshot::channel();
    let reader = tree.clone();
    std::thread::spawn(move || {
        use std::io::Read;
        // Opening blocks until the command opens the write end.
        let Ok(mut fifo) = std::fs::File::open(&reader) else {
            return;
        };
        let mut buffer = [0u8; 512];
        while matches!(fifo.read(&mut buffer), Ok(n) if n > 0) {}
        let _ = closed_sender.send(tokio::time::Instant::from_std(Instant::now()));
    });
    let mut exec = tokio::process::Command::new(env!("CARGO_BIN_EXE_deploylock"))
        .arg("--kubeconfig")
        .arg(proxy.kubeconfig())
        .args(["-n", namespace, "-e", environment, "exec"])
        .args(["--duration", "1", "--grace", "3", "--reason", "partitioned"])
        .args(["--", "sh", "-c", STUBBORN_TREE])
        .env("TREE", &tree)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| format!("cannot start exec: {err}"))?;

    let holder = |lock: Option<&DeploymentLock>| lock.and_then(|l| l.spec.holder.clone());
    let first = tokio::time::timeout(
        StdDuration::from_secs(30),
        await_condition(
            api.clone(),
            environment,
            move |lock: Option<&DeploymentLock>| holder(lock).is_some(),
        ),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .flatten()
    .and_then(|lock| lock.spec.holder)
    .ok_or("exec never held the lock")?;
    // Just after the first renewal (at a third of the minute).
    let lock_id = first.lock_id.clone();
    let renewed = tokio::time::timeout(
        StdDuration::from_secs(60),
        await_condition(
            api.clone(),
            environment,
            move |lock: Option<&DeploymentLock>| {
                holder(lock)
                    .is_some_and(|h| h.lock_id == lock_id && h.expires_at > first.expires_at)
            },
        ),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .flatten()
    .and_then(|lock| lock.spec.holder)
    .ok_or("exec never renewed the lock")?;
    proxy.set(fault);
    let stopped = tokio::time::timeout(StdDuration::from_secs(120), closed)
        .await
        .map_err(|_| "the command tree still runs 120 s after the partition")?
        .map_err(|_| "the fifo's reader ended without a time")?;
    let server_at_stop = clock.upper_bound(stopped);
    let margin = (renewed.expires_at - server_at_stop)
        .num_microseconds()
        .unwrap_or(i64::MIN) as f64
        / 1000.0;
    let code = tokio::time::timeout(StdDuration::from_secs(30), exec.wait())
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|status| status.code());
    Ok((margin, code))
}

/// exec partitioned from the API server just after a renewal, three ways
/// (all samples at once, on their own locks): the margin between the
/// command's stop and the holding's expiresAt on the server's clock.
async fn partition_margin(rows: &mut Vec<Row>) {
    const PER_FAULT: usize = 4;
    let cluster = cluster();
    let namespace = cluster.namespace("bench-partition").await;
    let temp = tempfile::tempdir().unwrap_or_else(|err| panic!("{err}"));
    let clock = deploylock::servertime::ServerClock::new(cluster.client(Identity::Admin).await)
        .await
        .unwrap_or_else(|err| panic!("cannot read the server's clock: {err}"));
    let calibrating = tokio::spawn(clock.clone().keep_calibrated(StdDuration::from_secs(10)));
    let faults = [
        (Fault::Freeze, "frozen connection"),
        (Fault::ResetThenStall, "reset, then a hung TLS handshake"),
        (Fault::BlackHole, "black hole"),
    ];
    let runs = faults.iter().flat_map(|&(fault, _)| {
        (0..PER_FAULT).map(move |i| (fault, format!("{fault:?}-{i}").to_lowercase()))
    });
    let results = futures::future::join_all(runs.map(|(fault, environment)| {
        let (namespace, clock, dir) = (&namespace, &clock, temp.path());
        async move {
            let result = partitioned_exec(namespace, &environment, fault, clock, dir).await;
            (fault, result)
        }
    }))
    .await;
    let uncertainty = clock.uncertainty(tokio::time::Instant::now());
    calibrating.abort();
    for (fault, name) in faults {
        let mut samples = Vec::new();
        let mut failures = Vec::new();
        for (_, result) in results.iter().filter(|(f, _)| *f == fault) {
            match result {
                Ok((margin, Some(7))) => samples.push(*margin),
                Ok((margin, code)) => {
                    samples.push(*margin);
                    failures.push(format!("exit {code:?}"));
                }
                Err(why) => failures.push(why.clone()),
            }
        }
        let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
        let late = samples.iter().filter(|margin| **margin <= 0.0).count();
        // A cut that swallows the renewal's answer leaves exec with the
        // previous deadline: it stops a renewal interval (20 s) early.
        let early = samples.iter().filter(|margin| **margin > 10_000.0).count();
        let verdict = if late == 0 && failures.is_empty() {
            format!("min {min:.1}, > 0 in every sample")
        } else {
            format!("min {min:.1}; NOT MET: {late} at or after expiresAt; {failures:?}")
        };
        let verdict = if early > 0 {
            format!(
                "{verdict}; {early} stopped 20 s early (the cut swallowed the renewal's answer: exec kept the previous deadline)"
            )
        } else {
            verdict
        };
        rows.push(Row {
            name: format!("lost lock: partition ({name}) → command tree gone, before expiresAt (ms)"),
            samples,
            unit: "ms",
            baseline: None,
            target: "> 0 in every sample".into(),
            note: format!(
                "{verdict}; exec --duration 1 --grace 3, cut after a renewal; server clock ±{:.1} ms",
                uncertainty.as_secs_f64() * 1000.0
            ),
        });
    }
}

fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn cpu_ticks(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    utime + stime
}

/// 1,000 and 10,000 locks: memory, time to reconcile all at start, idle CPU.
async fn controller_scale(rows: &mut Vec<Row>, idle: StdDuration) {
    let cluster = cluster();
    for count in [1000usize, 10_000] {
        let namespace = cluster.namespace(&format!("bench-scale-{count}")).await;
        let api: Api<DeploymentLock> =
            Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
        let futures = (0..count).map(|i| {
            let api = api.clone();
            async move {
                let object = lock_json(&format!("s{i}"), "alice");
                api.patch(
                    &format!("s{i}"),
                    &PatchParams::apply("bench").force(),
                    &Patch::Apply(&object),
                )
                .await
                .map(|_| ())
            }
        });
        let created: Vec<_> = futures::stream::iter(futures)
            .buffer_unordered(32)
            .collect()
            .await;
        assert!(
            created.iter().all(Result::is_ok),
            "could not create {count} locks"
        );
        // First start: every lock needs its status written (write-bound).
        let started = Instant::now();
        let first = cluster.spawn_controller(&namespace, &format!("bench-scale-{count}"), &[]);
        loop {
            let listed = api
                .list(&Default::default())
                .await
                .unwrap_or_else(|err| panic!("{err}"));
            if listed
                .items
                .iter()
                .all(|lock| lock.status.as_ref().and_then(|s| s.state).is_some())
            {
                break;
            }
            assert!(
                started.elapsed() < StdDuration::from_secs(900),
                "status fill took over 15 minutes"
            );
            tokio::time::sleep(StdDuration::from_millis(500)).await;
        }
        let fill = started.elapsed().as_secs_f64();
        drop(first);
        // Restart: a full resync of locks whose status is already right.
        let started = Instant::now();
        let controller =
            cluster.spawn_controller(&namespace, &format!("bench-scale-{count}-again"), &[]);
        loop {
            let reconciled = controller
                .metrics()
                .lines()
                .find_map(|line| line.strip_prefix("deploylock_reconcile_duration_seconds_count "))
                .and_then(|value| value.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            if reconciled >= count as f64 {
                break;
            }
            assert!(
                started.elapsed() < StdDuration::from_secs(600),
                "resync took over 10 minutes"
            );
            tokio::time::sleep(StdDuration::from_millis(100)).await;
        }
        let resync = started.elapsed().as_secs_f64();
        rows.push(Row {
            name: format!("controller, {count} new locks: all statuses written (s)"),
            samples: vec![fill],
            unit: "s",
            baseline: None,
            target: String::new(),
            note: "one status write per lock: bound by the API server".into(),
        });
        let pid = controller.child.id();
        let before = cpu_ticks(pid);
        tokio::time::sleep(idle).await;
        let ticks_per_second = 100.0;
        let cpu_percent = (cpu_ticks(pid) - before) / ticks_per_second / idle.as_secs_f64() * 100.0;
        let rss_mib = rss_kib(pid) / 1024.0;
        rows.push(Row {
            name: format!("controller, {count} locks: full resync (s)"),
            samples: vec![resync],
            unit: "s",
            baseline: None,
            target: if count == 10_000 {
                "≤ 10 s".into()
            } else {
                String::new()
            },
            note: "restart to every lock reconciled (metrics count)".into(),
        });
        rows.push(Row {
            name: format!("controller, {count} locks: RSS (MiB)"),
            samples: vec![rss_mib],
            unit: "MiB",
            baseline: None,
            target: if count == 10_000 {
                "≤ 64 MiB".into()
            } else {
                String::new()
            },
            note: "release build".into(),
        });
        rows.push(Row {
            name: format!("controller, {count} locks: idle CPU (%)"),
            samples: vec![cpu_percent],
            unit: "%",
            baseline: None,
            target: "close to 0".into(),
            note: format!("over {} s idle", idle.as_secs()),
        });
    }
}

fn render(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| measure | n | p50 | p90 | p99 | max | vs baseline (p50) | target | note |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let (p50, p90, p99, max) = summary(&row.samples);
        let baseline = row
            .baseline
            .as_ref()
            .map(|(name, ratio)| format!("{ratio:.2}× {name}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "| {} | {} | {p50:.1} | {p90:.1} | {p99:.1} | {max:.1} | {baseline} | {} | {} |",
            row.name,
            row.samples.len(),
            row.target,
            row.note
        );
        let _ = row.unit;
    }
    out
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("model name\t: ").map(str::to_string))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let version = |args: &[&str]| {
        Command::new(cluster().bin_dir().join(args[0]))
            .args(&args[1..])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .unwrap_or_default()
    };
    format!(
        "- date: {}\n- machine: {cores} cores, {cpu}\n- kube-apiserver: {}\n- etcd: {}\n- deploylock: {} (release build)\n",
        Utc::now().format("%Y-%m-%d %H:%M UTC"),
        version(&["kube-apiserver", "--version"]),
        version(&["etcd", "--version"]),
        env!("CARGO_PKG_VERSION"),
    )
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; a quick mode for smoke runs.
    let quick = std::env::args().any(|arg| arg == "--quick");
    let idle = if quick {
        StdDuration::from_secs(5)
    } else {
        StdDuration::from_secs(60)
    };
    // `--only handoff,scale` runs some sections and leaves docs/benchmarks.md alone.
    let only: Option<Vec<String>> = std::env::args()
        .skip_while(|arg| arg != "--only")
        .nth(1)
        .map(|list| list.split(',').map(str::to_string).collect());
    let runs = |section: &str| {
        only.as_ref()
            .is_none_or(|names| names.iter().any(|n| n == section))
    };
    let mut rows = Vec::new();
    if runs("acquire") {
        eprintln!("[bench] acquire latency vs curl and kubectl");
        acquire_latency(&mut rows).await;
    }
    if runs("handoff") {
        eprintln!("[bench] hand-off");
        hand_off(&mut rows).await;
    }
    if runs("contention") {
        eprintln!("[bench] contention");
        contention(&mut rows).await;
    }
    if runs("expiry") {
        eprintln!("[bench] expiry precision (1,000 locks)");
        expiry_precision(&mut rows).await;
    }
    if runs("lost") {
        eprintln!("[bench] lost lock");
        lost_lock(&mut rows).await;
        eprintln!("[bench] lost lock: partitioned exec (about 90 s)");
        partition_margin(&mut rows).await;
    }
    if runs("gitops") {
        eprintln!("[bench] GitOps gating");
        gitops::gitops_gating(&mut rows).await;
    }
    if runs("gate") {
        eprintln!("[bench] workload gate on vs off");
        gate::gate_cost(&mut rows).await;
    }
    if runs("windows") {
        eprintln!("[bench] freeze windows: start → held");
        windows::window_opening(&mut rows).await;
    }
    if runs("scale") {
        eprintln!("[bench] controller scale (1,000 and 10,000 locks)");
        controller_scale(&mut rows, idle).await;
    }
    if runs("notifications") {
        eprintln!(
            "[bench] notifications: transition → received, acquire with 0 and 10 subscriptions"
        );
        notify_section::notifications(&mut rows).await;
    }
    let table = render(&rows);
    println!("{table}");
    if only.is_some() {
        return;
    }
    let document = format!(
        "# deploylock benchmarks\n\nGenerated by `make bench` (benches/lockbench.rs) against the local control plane.\nTimes in milliseconds unless the measure says otherwise.\n\n{}\n{table}",
        machine()
    );
    let path = support::repo_root().join("docs/benchmarks.md");
    let _ = std::fs::create_dir_all(support::repo_root().join("docs"));
    if let Err(err) = std::fs::write(&path, document) {
        eprintln!("cannot write {}: {err}", path.display());
    }
}
