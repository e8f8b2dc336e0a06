//! Freeze windows: from a window's start instant to its lock seen held by
//! the window (deploylock:freeze-windows) on a watch, over windows opening
//! one second apart, each on a lock of its own.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::TryStreamExt;
use kube::CustomResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use deploylock::crd::DeploymentLock;
use deploylock::windows::{FreezeWindow, WINDOW_HOLDER};

use super::Row;
use super::support::{Identity, apply_crd, cluster};

const WINDOWS: usize = 20;

pub async fn window_opening(rows: &mut Vec<Row>) {
    let cluster = cluster();
    let client = cluster.client(Identity::Admin).await;
    if let Err(err) = apply_crd(&client, FreezeWindow::crd()).await {
        panic!("cannot install the FreezeWindow CRD: {err}");
    }
    let namespace = cluster.enforced_namespace("bench-windows").await;
    let _controller = cluster.spawn_controller(&namespace, "bench-windows", &[]);
    let windows: Api<FreezeWindow> = Api::namespaced(client.clone(), &namespace);
    let locks: Api<DeploymentLock> = Api::namespaced(client, &namespace);
    // Whole seconds (the schema's date-time), the first a few seconds away
    // so that the controller has seen every window before it opens.
    let first = Utc::now() + chrono::Duration::seconds(6);
    let first = first - chrono::Duration::nanoseconds(i64::from(first.timestamp_subsec_nanos()));
    let mut starts: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
    for index in 0..WINDOWS {
        let environment = format!("w{index}");
        let start = first + chrono::Duration::seconds(index as i64);
        let window: FreezeWindow = serde_json::from_value(json!({
            "apiVersion": "deploylock.dev/v1",
            "kind": "FreezeWindow",
            "metadata": {"name": format!("bench-{index}")},
            // Two minutes: a holding lasts at least one, and an opening with
            // less than that left is skipped.
            "spec": {
                "start": start.to_rfc3339_opts(SecondsFormat::Secs, true),
                "end": (start + chrono::Duration::seconds(120)).to_rfc3339_opts(SecondsFormat::Secs, true),
                "environments": [environment],
                "reason": "bench window",
            }
        }))
        .unwrap_or_else(|err| panic!("a FreezeWindow: {err}"));
        if let Err(err) = windows.create(&PostParams::default(), &window).await {
            panic!("cannot create window {index}: {err}");
        }
        starts.insert(environment, start);
    }
    let mut seen: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
    let mut events = std::pin::pin!(watcher(locks, watcher::Config::default()).applied_objects());
    let deadline = first + chrono::Duration::seconds(WINDOWS as i64 + 30);
    while seen.len() < starts.len() && Utc::now() < deadline {
        let left = (deadline - Utc::now()).to_std().unwrap_or_default();
        let lock = match tokio::time::timeout(left, events.try_next()).await {
            Ok(Ok(Some(lock))) => lock,
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(err)) => panic!("watch of the bench's locks failed: {err}"),
        };
        let held = lock
            .spec
            .holder
            .as_ref()
            .is_some_and(|holder| holder.user == WINDOW_HOLDER);
        if held {
            seen.entry(lock.spec.environment.clone())
                .or_insert_with(Utc::now);
        }
    }
    assert_eq!(
        seen.len(),
        starts.len(),
        "windows that never took their lock: {:?}",
        starts
            .keys()
            .filter(|e| !seen.contains_key(*e))
            .collect::<Vec<_>>()
    );
    let samples: Vec<f64> = starts
        .iter()
        .map(|(environment, start)| {
            let at = seen[environment];
            (at - *start).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
        })
        .collect();
    rows.push(Row {
        name: "freeze window: start → lock held by the window, seen on a watch (ms)".into(),
        samples,
        unit: "ms",
        baseline: None,
        target: "p99 ≤ 1000".into(),
        note: format!(
            "{WINDOWS} one-off windows opening one second apart, one lock each; the controller wakes at the start on the API server's clock"
        ),
    });
}
