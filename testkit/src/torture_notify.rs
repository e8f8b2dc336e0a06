//! Notifications in the torture run: one subscription to every history
//! transition of the namespace's locks, delivered by the controller (killed
//! and restarted by the run) to a flaky loopback receiver, and the checker's
//! side: every history entry of every lock was delivered at least once,
//! unless it was dropped from the lock's bounded history before any leader
//! could deliver it and that loss was reported (the README's limit: a
//! Warning Event `NotificationsLost` naming the entries), and nothing was
//! delivered for a transition that did not happen.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, PostParams};
use kube::{Api, CustomResourceExt};
use serde_json::{Value, json};

use deploylock::crd::{DeploymentLock, HistoryAction};
use deploylock::notify::plan::history_key;
use deploylock::notify::{IDEMPOTENCY_HEADER, NotificationSubscription};

use crate::receiver::{Mode, Receiver, Request};
use crate::{Identity, TestCluster};

/// Every this many requests the receiver answers 503: each delivery is
/// retried now and then, through the controller's restart too.
const FAIL_EVERY: u32 = 4;

/// The subscription and the receiver it delivers to.
pub struct Notifications {
    receiver: Receiver,
    namespace: String,
    client: kube::Client,
}

impl Notifications {
    /// Installs the subscription CRD, starts the flaky receiver and
    /// subscribes it (through a Secret, as users do) to every history
    /// transition of the locks in `namespace`.
    pub async fn subscribe(cluster: &TestCluster, namespace: &str) -> Notifications {
        let client = cluster.client(Identity::Admin).await;
        if let Err(err) = crate::apply_crd(&client, NotificationSubscription::crd()).await {
            panic!("cannot install the NotificationSubscription CRD: {err}");
        }
        let receiver = Receiver::start().await;
        receiver.set_mode(Mode::FailEvery(FAIL_EVERY));
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "torture-hook"},
            "stringData": {"address": receiver.url("/torture")},
        }))
        .unwrap_or_else(|err| panic!("a Secret: {err}"));
        if let Err(err) = Api::<Secret>::namespaced(client.clone(), namespace)
            .create(&PostParams::default(), &secret)
            .await
        {
            panic!("cannot create the torture's Secret: {err}");
        }
        let events: Vec<Value> = HistoryAction::ALL
            .into_iter()
            .map(|action| serde_json::to_value(action).unwrap_or_default())
            .collect();
        let subscription: NotificationSubscription = serde_json::from_value(json!({
            "apiVersion": "deploylock.dev/v1",
            "kind": "NotificationSubscription",
            "metadata": {"name": "torture-history"},
            "spec": {
                "events": events,
                "provider": {"type": "generic", "secretRef": {"name": "torture-hook"}},
                "retry": {"maxBackoffSeconds": 2},
            },
        }))
        .unwrap_or_else(|err| panic!("a subscription: {err}"));
        if let Err(err) = Api::<NotificationSubscription>::namespaced(client.clone(), namespace)
            .create(&PostParams::default(), &subscription)
            .await
        {
            panic!("cannot create the torture's subscription: {err}");
        }
        Notifications {
            receiver,
            namespace: namespace.to_string(),
            client,
        }
    }

    /// Checks deliveries against the history entries the run's recorder saw
    /// (`seen`, by idempotency key) and those stored at the end: waits up to
    /// `within` for every entry to be delivered or reported lost, then
    /// returns what it found.
    pub async fn check(
        &self,
        seen: &BTreeMap<String, (String, HistoryAction)>,
        within: Duration,
    ) -> NotifyCheck {
        let mut history = seen.clone();
        let locks = Api::<DeploymentLock>::namespaced(self.client.clone(), &self.namespace)
            .list(&ListParams::default())
            .await
            .unwrap_or_else(|err| panic!("cannot list the torture's locks: {err}"));
        for lock in &locks.items {
            let uid = lock.metadata.uid.as_deref().unwrap_or_default();
            let name = lock.metadata.name.clone().unwrap_or_default();
            for entry in &lock.spec.history {
                history
                    .entry(history_key(uid, entry.sequence))
                    .or_insert_with(|| (name.clone(), entry.action));
            }
        }
        let uids: BTreeMap<String, String> = locks
            .items
            .iter()
            .filter_map(|lock| Some((lock.metadata.name.clone()?, lock.metadata.uid.clone()?)))
            .collect();
        // Wait on the receiver's requests; the reported losses (Events) are
        // read again every few seconds: the new leader reports a gap when it
        // takes over, which may be after the run's end.
        let deadline = tokio::time::Instant::now() + within;
        let (requests, reported) = loop {
            let reported = self.reported_gaps(&uids).await;
            let settled = |requests: &[Request]| {
                let delivered = delivered_keys(requests);
                history
                    .keys()
                    .all(|key| delivered.contains(key.as_str()) || reported.contains(key))
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self
                .receiver
                .wait_until(left.min(Duration::from_secs(5)), settled)
                .await
            {
                Ok(requests) => break (requests, reported),
                Err(requests) if left <= Duration::from_secs(5) => break (requests, reported),
                Err(_) => continue,
            }
        };
        let mut result = NotifyCheck {
            entries: history.len(),
            requests: requests.len(),
            ..NotifyCheck::default()
        };
        let delivered = delivered_keys(&requests);
        for (key, (environment, action)) in &history {
            if delivered.contains(key.as_str()) {
                continue;
            }
            if reported.contains(key) {
                result.reported_lost += 1;
                continue;
            }
            result.violations.push(format!(
                "notifications: {environment}'s {action:?} ({key}) was neither delivered within {within:?} nor reported lost"
            ));
        }
        let spans = recorded_spans(&history);
        for request in requests.iter().filter(|request| request.delivered()) {
            match unfounded(request, &history, &spans) {
                Some(Unfounded::InRecorderGap) => result.unrecorded += 1,
                Some(Unfounded::Wrong(wrong)) => {
                    result.violations.push(format!("notifications: {wrong}"));
                }
                None => {}
            }
        }
        result
    }

    /// History keys the controller reported lost: the ranges its
    /// `NotificationsLost` Events name ("history entries F to L of ENV").
    async fn reported_gaps(&self, uids: &BTreeMap<String, String>) -> HashSet<String> {
        let events = Api::<Event>::namespaced(self.client.clone(), &self.namespace)
            .list(&ListParams::default())
            .await
            .unwrap_or_else(|err| panic!("cannot list the torture's Events: {err}"));
        let mut lost = HashSet::new();
        for event in &events.items {
            if event.reason.as_deref() != Some("NotificationsLost") {
                continue;
            }
            let note = event.note.as_deref().unwrap_or_default();
            let Some((first, last, environment)) = gap_in(note) else {
                continue;
            };
            let Some(uid) = uids.get(environment) else {
                continue;
            };
            for sequence in first..=last {
                lost.insert(history_key(uid, sequence));
            }
        }
        lost
    }
}

/// What the notification check found.
#[derive(Debug, Default)]
pub struct NotifyCheck {
    /// History entries checked.
    pub entries: usize,
    /// Requests the receiver got (failed ones included).
    pub requests: usize,
    /// Entries dropped from a lock's history before a leader could deliver
    /// them, and reported so.
    pub reported_lost: usize,
    /// Deliveries of entries the recorder's watch did not see: numbered
    /// between entries of the same lock it saw, so they fell into a gap of
    /// its watch (a relist after a fault, while a busy lock dropped more
    /// than its history holds). Entries are numbered one by one, so nothing
    /// but a gap leaves such a hole; they cannot be judged, only counted.
    pub unrecorded: usize,
    pub violations: Vec<String>,
}

/// Why a delivered request does not stand for a recorded history entry.
enum Unfounded {
    /// The entry falls into a gap of the recorder's watch.
    InRecorderGap,
    /// It stands for no entry that happened, or for another one.
    Wrong(String),
}

/// `<lock UID>-<sequence>` (see `history_key`) as its parts.
fn key_parts(key: &str) -> Option<(&str, i64)> {
    let (uid, sequence) = key.rsplit_once('-')?;
    Some((uid, sequence.parse().ok()?))
}

/// Per lock UID, the lowest and highest sequence the recorder saw.
fn recorded_spans(
    history: &BTreeMap<String, (String, HistoryAction)>,
) -> HashMap<&str, (i64, i64)> {
    let mut spans: HashMap<&str, (i64, i64)> = HashMap::new();
    for (uid, sequence) in history.keys().filter_map(|key| key_parts(key)) {
        let span = spans.entry(uid).or_insert((sequence, sequence));
        *span = (span.0.min(sequence), span.1.max(sequence));
    }
    spans
}

/// Whether `key` is numbered between two entries of the same lock that the
/// recorder saw (`spans`, from [`recorded_spans`]).
fn in_recorder_gap(key: &str, spans: &HashMap<&str, (i64, i64)>) -> bool {
    key_parts(key).is_some_and(|(uid, sequence)| {
        spans
            .get(uid)
            .is_some_and(|&(lowest, highest)| lowest < sequence && sequence < highest)
    })
}

/// (first, last, environment) of a `NotificationsLost` note.
fn gap_in(note: &str) -> Option<(i64, i64, &str)> {
    let rest = note.strip_prefix("history entries ")?;
    let (first, rest) = rest.split_once(" to ")?;
    let (last, rest) = rest.split_once(" of ")?;
    let environment = rest.split_whitespace().next()?;
    Some((first.parse().ok()?, last.parse().ok()?, environment))
}

/// Idempotency keys of the requests answered 2xx.
fn delivered_keys(requests: &[Request]) -> HashSet<&str> {
    requests
        .iter()
        .filter(|request| request.delivered())
        .filter_map(|request| request.header(IDEMPOTENCY_HEADER))
        .collect()
}

/// Why a delivered request does not stand for a history entry that
/// happened, if it does not.
fn unfounded(
    request: &Request,
    history: &BTreeMap<String, (String, HistoryAction)>,
    spans: &HashMap<&str, (i64, i64)>,
) -> Option<Unfounded> {
    let wrong = |why: String| Some(Unfounded::Wrong(why));
    let body: Value = match serde_json::from_slice(&request.body) {
        Ok(body) => body,
        Err(err) => return wrong(format!("a body that is not JSON ({err})")),
    };
    let key = body["idempotencyKey"].as_str().unwrap_or_default();
    if request.header(IDEMPOTENCY_HEADER) != Some(key) {
        return wrong(format!(
            "the header key {:?} differs from the body's {key:?}",
            request.header(IDEMPOTENCY_HEADER)
        ));
    }
    let Some((environment, action)) = history.get(key) else {
        if in_recorder_gap(key, spans) {
            return Some(Unfounded::InRecorderGap);
        }
        return wrong(format!(
            "{key} ({} on {}) was delivered but no history entry records it",
            body["event"], body["environment"]
        ));
    };
    let expected = serde_json::to_value(action).unwrap_or_default();
    if body["event"] != expected || body["environment"].as_str() != Some(environment) {
        return wrong(format!(
            "{key} was delivered as {} on {}, but the history records {action:?} on {environment}",
            body["event"], body["environment"]
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a number between two recorded entries of the same lock is a gap
    /// of the recorder; before, after or on another lock it is unfounded.
    #[test]
    fn a_recorder_gap_lies_between_recorded_entries_of_the_same_lock() {
        let history: BTreeMap<String, (String, HistoryAction)> = ["a-b-1", "a-b-2", "a-b-5"]
            .into_iter()
            .map(|key| (key.to_string(), ("t0".to_string(), HistoryAction::Acquired)))
            .collect();
        let spans = recorded_spans(&history);
        assert!(in_recorder_gap("a-b-3", &spans));
        assert!(in_recorder_gap("a-b-4", &spans));
        assert!(!in_recorder_gap("a-b-6", &spans));
        assert!(!in_recorder_gap("a-b-0", &spans));
        assert!(!in_recorder_gap("a-c-3", &spans));
        assert!(!in_recorder_gap("a-b-x", &spans));
    }
}
