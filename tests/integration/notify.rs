//! Team notifications end to end: the real controller, the real control
//! plane, and a real HTTP(S) receiver on loopback (receiver.rs) that records
//! what arrives and can fail, stall, be slow or be down.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;
use std::time::Duration;

use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde_json::{Value, json};
use sha2::Sha256;

use deploylock::crd::{DeploymentLock, HistoryAction};
use deploylock::notify::{DeliveryResult, NotificationSubscription};

use crate::receiver::{Mode, Receiver, Request, TestCa};
use crate::support::{
    Identity, apply_lock_spec, await_leader, await_object, cluster, expect_acquired, expect_exit,
    start_waiter,
};

const WAIT: Duration = Duration::from_secs(90);

static CRD: OnceLock<Result<(), String>> = OnceLock::new();

/// Installs the NotificationSubscription CRD once.
fn install_subscription_crd() {
    let result = CRD.get_or_init(|| cluster().apply_crd_blocking(NotificationSubscription::crd()));
    if let Err(reason) = result {
        panic!("cannot install the NotificationSubscription CRD: {reason}");
    }
}

struct Setup {
    namespace: String,
    client: Client,
}

async fn setup(name: &str) -> Setup {
    install_subscription_crd();
    let cluster = cluster();
    let namespace = cluster.namespace(name).await;
    let client = cluster.client(Identity::Admin).await;
    Setup { namespace, client }
}

impl Setup {
    async fn secret(&self, name: &str, data: &[(&str, &str)]) {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": name},
            "stringData": data.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect::<serde_json::Map<_, _>>(),
        }))
        .expect("a Secret");
        if let Err(err) = secrets.create(&PostParams::default(), &secret).await {
            panic!("cannot create Secret {name}: {err}");
        }
    }

    fn subscriptions(&self) -> Api<NotificationSubscription> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn locks(&self) -> Api<DeploymentLock> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn subscription(&self, name: &str, spec: Value) {
        let object: NotificationSubscription = match serde_json::from_value(json!({
            "apiVersion": "deploylock.dev/v1",
            "kind": "NotificationSubscription",
            "metadata": {"name": name},
            "spec": spec,
        })) {
            Ok(object) => object,
            Err(err) => panic!("bad subscription {name}: {err}"),
        };
        if let Err(err) = self
            .subscriptions()
            .create(&PostParams::default(), &object)
            .await
        {
            panic!("cannot create subscription {name}: {err}");
        }
    }

    /// Waits, on a watch, until the subscription satisfies `condition`.
    async fn await_subscription(
        &self,
        name: &str,
        what: &str,
        condition: impl Fn(&NotificationSubscription) -> bool,
    ) -> NotificationSubscription {
        await_object(&self.subscriptions(), name, what, WAIT, condition).await
    }

    async fn await_ready(
        &self,
        name: &str,
        ready: &str,
        reason: Option<&str>,
    ) -> NotificationSubscription {
        self.await_subscription(name, &format!("Ready={ready} {reason:?}"), |sub| {
            sub.status.as_ref().is_some_and(|status| {
                status.conditions.iter().any(|c| {
                    c.type_ == "Ready" && c.status == ready && reason.is_none_or(|r| c.reason == r)
                })
            })
        })
        .await
    }

    fn cli(&self, identity: Identity, args: &[&str]) {
        let output = cluster().deploylock(identity, &self.namespace, args);
        expect_exit(&output, 0, &format!("deploylock {args:?}"));
    }

    async fn lock(&self, environment: &str) -> DeploymentLock {
        let api: Api<DeploymentLock> = Api::namespaced(self.client.clone(), &self.namespace);
        match api.get(environment).await {
            Ok(lock) => lock,
            Err(err) => panic!("cannot read {environment}: {err}"),
        }
    }

    /// The idempotency keys of the lock's history entries, in order.
    async fn history_keys(&self, environment: &str) -> Vec<String> {
        let lock = self.lock(environment).await;
        let uid = lock.uid().expect("a UID");
        lock.spec
            .history
            .iter()
            .map(|entry| format!("{uid}-{}", entry.sequence))
            .collect()
    }
}

fn key_of(request: &Request) -> String {
    request
        .header("idempotency-key")
        .unwrap_or_else(|| panic!("no Idempotency-Key header: {request:?}"))
        .to_string()
}

/// The idempotency keys of the requests answered 2xx.
fn delivered_keys(requests: &[Request]) -> BTreeSet<String> {
    requests
        .iter()
        .filter(|r| r.delivered())
        .map(key_of)
        .collect()
}

fn delivered_on<'a>(requests: &'a [Request], path: &str) -> Vec<&'a Request> {
    requests
        .iter()
        .filter(|r| r.delivered() && r.path == path)
        .collect()
}

/// A generic subscription to `url`'s Secret, with a short backoff cap so a
/// receiver that comes back is retried within seconds.
fn generic_spec(secret: &str) -> Value {
    json!({
        "provider": {"type": "generic", "secretRef": {"name": secret}},
        "retry": {"maxBackoffSeconds": 2}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_provider_gets_its_documented_format() {
    let setup = setup("notify-formats").await;
    let receiver = Receiver::start().await;
    let providers = [
        "slack",
        "msteams",
        "discord",
        "googlechat",
        "mattermost",
        "generic",
        "generic-hmac",
        "cloudevents",
    ];
    for provider in providers {
        let secret = format!("hook-{provider}");
        setup
            .secret(
                &secret,
                &[
                    ("address", &receiver.url(&format!("/{provider}"))),
                    ("token", "s3cret"),
                ],
            )
            .await;
        let mut spec = json!({
            "environments": ["production"],
            "provider": {"type": provider, "secretRef": {"name": secret}}
        });
        if ["slack", "mattermost"].contains(&provider) {
            spec["provider"]["channel"] = json!("#deploys");
        }
        if ["slack", "discord", "mattermost"].contains(&provider) {
            spec["provider"]["username"] = json!("deploylock");
        }
        setup.subscription(&format!("to-{provider}"), spec).await;
    }
    let _controller = cluster().spawn_controller(&setup.namespace, "notify-formats", &[]);
    for provider in providers {
        setup
            .await_ready(&format!("to-{provider}"), "True", None)
            .await;
    }
    setup.cli(
        Identity::Alice,
        &["acquire", "-e", "production", "--reason", "Deploying 2.1.0"],
    );
    // Another environment: not covered by these subscriptions.
    setup.cli(
        Identity::Bob,
        &["acquire", "-e", "staging", "--reason", "other"],
    );
    setup.cli(Identity::Alice, &["release", "-e", "production"]);
    let keys = setup.history_keys("production").await;
    assert_eq!(keys.len(), 2, "acquire and release: {keys:?}");
    let requests = receiver
        .wait_for("two messages per provider", WAIT, |requests| {
            providers
                .iter()
                .all(|p| delivered_on(requests, &format!("/{p}")).len() >= 2)
        })
        .await;
    let lock = setup.lock("production").await;
    let uid = lock.uid().expect("a UID");
    for provider in providers {
        let got = delivered_on(&requests, &format!("/{provider}"));
        assert_eq!(
            got.len(),
            2,
            "{provider}: exactly one message per transition"
        );
        let got_keys: Vec<String> = got.iter().map(|r| key_of(r)).collect();
        assert_eq!(got_keys, keys, "{provider}: both transitions, in order");
        let (acquired, released) = (got[0], got[1]);
        assert_eq!(acquired.method, "POST");
        let content_type = acquired.header("content-type").unwrap_or_default();
        let body = acquired.json();
        match provider {
            "slack" => {
                assert_eq!(content_type, "application/json");
                assert!(
                    body["text"]
                        .as_str()
                        .unwrap()
                        .contains("production locked by alice")
                );
                assert_eq!(body["blocks"][0]["type"], "header");
                assert_eq!(body["blocks"][1]["type"], "section");
                assert_eq!(body["blocks"][1]["text"]["type"], "mrkdwn");
                assert!(body["blocks"][1]["fields"].as_array().unwrap().len() <= 10);
                assert_eq!(body["blocks"][2]["type"], "context");
                assert_eq!(body["channel"], "#deploys");
                assert_eq!(body["username"], "deploylock");
            }
            "msteams" => {
                assert_eq!(content_type, "application/json");
                assert_eq!(body["type"], "message");
                let attachment = &body["attachments"][0];
                assert_eq!(
                    attachment["contentType"],
                    "application/vnd.microsoft.card.adaptive"
                );
                let card = &attachment["content"];
                assert_eq!(card["type"], "AdaptiveCard");
                assert!(card["version"].as_str().is_some());
                assert!(
                    card["fallbackText"]
                        .as_str()
                        .unwrap()
                        .contains("production locked")
                );
                let blocks = card["body"].as_array().unwrap();
                assert_eq!(blocks[0]["type"], "TextBlock");
                let facts = blocks
                    .iter()
                    .find(|b| b["type"] == "FactSet")
                    .expect("a FactSet");
                assert!(
                    facts["facts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|f| f["title"] == "Reason" && f["value"] == "Deploying 2.1.0")
                );
            }
            "discord" => {
                assert_eq!(content_type, "application/json");
                let content = body["content"].as_str().unwrap();
                assert!(
                    content.contains("production locked by alice")
                        && content.chars().count() <= 2000
                );
                assert_eq!(body["username"], "deploylock");
                assert_eq!(body["allowed_mentions"]["parse"], json!([]));
                let embed = &body["embeds"][0];
                assert!(embed["title"].as_str().unwrap().chars().count() <= 256);
                assert!(embed["fields"].as_array().unwrap().len() <= 25);
            }
            "googlechat" => {
                assert_eq!(content_type, "application/json");
                assert!(
                    body["text"]
                        .as_str()
                        .unwrap()
                        .contains("production locked by alice")
                );
            }
            "mattermost" => {
                assert_eq!(content_type, "application/json");
                assert!(
                    body["text"]
                        .as_str()
                        .unwrap()
                        .contains("production locked by alice")
                );
                assert_eq!(body["channel"], "#deploys");
                assert_eq!(body["props"]["idempotency_key"], keys[0].as_str());
            }
            "generic" | "generic-hmac" => {
                assert_eq!(content_type, "application/json");
                assert_eq!(body["idempotencyKey"], keys[0].as_str());
                assert_eq!(body["event"], "Acquired");
                assert_eq!(body["environment"], "production");
                assert_eq!(body["namespace"], setup.namespace.as_str());
                assert_eq!(body["lockUid"], uid.as_str());
                assert_eq!(body["by"], "alice");
                assert_eq!(body["reason"], "Deploying 2.1.0");
                assert_eq!(body["state"], "Locked");
                assert!(body["expiresAt"].as_str().is_some());
                assert_eq!(released.json()["event"], "Released");
                if provider == "generic-hmac" {
                    for request in [acquired, released] {
                        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"s3cret").unwrap();
                        mac.update(&request.body);
                        let expected =
                            format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
                        assert_eq!(request.header("x-signature"), Some(expected.as_str()));
                    }
                } else {
                    assert_eq!(acquired.header("x-signature"), None);
                    assert_eq!(acquired.header("authorization"), Some("Bearer s3cret"));
                }
            }
            "cloudevents" => {
                assert!(
                    content_type.starts_with("application/cloudevents+json"),
                    "{content_type}"
                );
                assert_eq!(body["specversion"], "1.0");
                assert_eq!(body["id"], keys[0].as_str());
                assert_eq!(body["type"], "dev.deploylock.lock.acquired");
                assert_eq!(body["subject"], "production");
                assert!(
                    body["source"]
                        .as_str()
                        .unwrap()
                        .ends_with("/deploymentlocks/production")
                );
                assert!(
                    chrono::DateTime::parse_from_rfc3339(body["time"].as_str().unwrap()).is_ok()
                );
                assert_eq!(body["datacontenttype"], "application/json");
                assert_eq!(body["data"]["lockUid"], uid.as_str());
                assert_eq!(released.json()["type"], "dev.deploylock.lock.released");
            }
            other => unreachable!("{other}"),
        }
    }
    // Status: the last delivery and a cursor for production only.
    let sub = setup
        .await_subscription("to-generic", "cursor at the release", |sub| {
            sub.status.as_ref().is_some_and(|s| {
                s.cursors
                    .iter()
                    .any(|c| c.environment == "production" && c.sequence >= 2)
            })
        })
        .await;
    let status = sub.status.unwrap();
    assert!(status.cursors.iter().all(|c| c.environment == "production"));
    assert_eq!(
        status.last_delivery.unwrap().result,
        DeliveryResult::Delivered
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_receiver_with_a_custom_ca() {
    let setup = setup("notify-tls").await;
    let ca = TestCa::new();
    let receiver = Receiver::start_tls(&ca).await;
    setup
        .secret("hook", &[("address", &receiver.url("/trusted"))])
        .await;
    setup.secret("hook-ca", &[("ca.crt", &ca.ca_pem)]).await;
    setup
        .secret("untrusted", &[("address", &receiver.url("/untrusted"))])
        .await;
    setup
        .subscription(
            "trusted",
            json!({"provider": {"type": "generic", "secretRef": {"name": "hook"}, "caSecretRef": {"name": "hook-ca"}}}),
        )
        .await;
    setup
        .subscription("untrusted", generic_spec("untrusted"))
        .await;
    let _controller = cluster().spawn_controller(&setup.namespace, "notify-tls", &[]);
    setup.await_ready("trusted", "True", None).await;
    setup.cli(Identity::Alice, &["acquire", "--reason", "over TLS"]);
    let keys = setup.history_keys("production").await;
    let requests = receiver
        .wait_for("the Acquired over TLS", WAIT, |r| {
            !delivered_on(r, "/trusted").is_empty()
        })
        .await;
    assert_eq!(key_of(delivered_on(&requests, "/trusted")[0]), keys[0]);
    // Without the CA the certificate is refused before any HTTP: retried,
    // and the status says why.
    let sub = setup
        .await_subscription("untrusted", "a Retrying delivery", |sub| {
            sub.status
                .as_ref()
                .and_then(|s| s.last_delivery.as_ref())
                .is_some_and(|d| d.result == DeliveryResult::Retrying)
        })
        .await;
    let error = sub
        .status
        .unwrap()
        .last_delivery
        .unwrap()
        .error
        .unwrap_or_default();
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    assert!(receiver.requests().iter().all(|r| r.path != "/untrusted"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_down_for_30s_then_back_gets_everything_once_in_order() {
    let setup = setup("notify-down").await;
    let receiver = setup.team_receiver().await;
    let _controller = cluster().spawn_controller(&setup.namespace, "notify-down", &[]);
    setup.await_ready("team", "True", None).await;
    receiver.down();
    let down_at = tokio::time::Instant::now();
    setup.cli(
        Identity::Alice,
        &["acquire", "-e", "production", "--reason", "r1"],
    );
    setup.cli(
        Identity::Alice,
        &["extend", "-e", "production", "--duration", "45m"],
    );
    setup.cli(
        Identity::Bob,
        &["acquire", "-e", "staging", "--reason", "r2"],
    );
    setup.cli(Identity::Alice, &["release", "-e", "production"]);
    setup.cli(Identity::Bob, &["release", "-e", "staging"]);
    // Attempts were made and failed while it was down.
    setup.await_retrying("team").await;
    assert!(receiver.requests().is_empty());
    // The scenario itself: the receiver stays down for 30 s.
    tokio::time::sleep_until(down_at + Duration::from_secs(30)).await;
    let up_at = std::time::Instant::now();
    receiver.up().await;
    let production = setup.history_keys("production").await;
    let staging = setup.history_keys("staging").await;
    let expected: BTreeSet<String> = production.iter().chain(&staging).cloned().collect();
    assert_eq!(expected.len(), 5);
    let requests = receiver
        .wait_for("all five transitions", WAIT, |r| {
            delivered_keys(r) == expected
        })
        .await;
    let got: Vec<String> = requests
        .iter()
        .filter(|r| r.delivered())
        .map(key_of)
        .collect();
    assert_eq!(got.len(), 5, "each delivered once: {got:?}");
    assert!(requests.iter().all(|r| r.arrived >= up_at));
    for keys in [&production, &staging] {
        let order: Vec<&String> = got.iter().filter(|k| keys.contains(k)).collect();
        assert_eq!(order, keys.iter().collect::<Vec<_>>(), "in order per lock");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_mid_burst_loses_nothing() {
    let setup = setup("notify-kill").await;
    let receiver = Receiver::start().await;
    receiver.set_mode(Mode::Slow(Duration::from_millis(300)));
    setup
        .secret("hook", &[("address", &receiver.url("/hook"))])
        .await;
    setup.subscription("team", generic_spec("hook")).await;
    let first = cluster().spawn_controller(&setup.namespace, "notify-kill-1", &[]);
    setup.await_ready("team", "True", None).await;
    for round in 0..8 {
        let reason = format!("burst {round}");
        setup.cli(Identity::Alice, &["acquire", "--reason", &reason]);
        setup.cli(Identity::Alice, &["release"]);
    }
    let expected = setup.history_keys("production").await;
    assert_eq!(expected.len(), 16);
    receiver
        .wait_for("the first messages", WAIT, |r| r.len() >= 4)
        .await;
    first.signal("KILL");
    let before_kill = receiver.requests().len();
    assert!(
        before_kill < expected.len(),
        "the burst was not over when killed"
    );
    receiver.set_mode(Mode::Accept);
    let _second = cluster().spawn_controller(&setup.namespace, "notify-kill-2", &[]);
    let wanted: BTreeSet<String> = expected.iter().cloned().collect();
    let requests = receiver
        .wait_for("every transition", WAIT, |r| delivered_keys(r) == wanted)
        .await;
    // Duplicates carry the same key and describe the same transition (the
    // holding's details, such as acquiredAt, are added only while that
    // holding is still the lock's, so a later copy may lack them).
    let identity = |request: &Request| {
        let body = request.json();
        [
            "idempotencyKey",
            "event",
            "sequence",
            "at",
            "by",
            "owner",
            "reason",
            "lockId",
            "lockUid",
        ]
        .map(|field| body[field].clone())
    };
    let mut first: BTreeMap<String, [Value; 9]> = BTreeMap::new();
    for request in requests.iter().filter(|r| r.delivered()) {
        let key = key_of(request);
        assert_eq!(request.json()["idempotencyKey"], key.as_str());
        let seen = first
            .entry(key.clone())
            .or_insert_with(|| identity(request));
        assert_eq!(
            *seen,
            identity(request),
            "a repeated {key} describes another transition"
        );
    }
    let mut first_seen: Vec<String> = Vec::new();
    for request in requests.iter().filter(|r| r.delivered()) {
        let key = key_of(request);
        if !first_seen.contains(&key) {
            first_seen.push(key);
        }
    }
    assert_eq!(first_seen, expected, "first deliveries in history order");
    let duplicates = requests.len() - wanted.len();
    eprintln!("killed after {before_kill} requests; {duplicates} duplicate(s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_secret_is_reported_and_locks_still_work() {
    let setup = setup("notify-secret").await;
    let receiver = Receiver::start().await;
    setup
        .subscription("team", generic_spec("not-there-yet"))
        .await;
    let _controller = cluster().spawn_controller(&setup.namespace, "notify-secret", &[]);
    let sub = setup
        .await_ready("team", "False", Some("SecretNotFound"))
        .await;
    let condition = sub
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert!(
        condition.message.contains("not-there-yet"),
        "{}",
        condition.message
    );
    // Lock operations do not depend on notifications.
    setup.cli(
        Identity::Alice,
        &["acquire", "--reason", "while unconfigured"],
    );
    let lock = setup.lock("production").await;
    assert_eq!(
        lock.spec.history.last().map(|e| e.action),
        Some(HistoryAction::Acquired)
    );
    // A malformed Secret is named too.
    setup.secret("not-there-yet", &[("token", "x")]).await;
    setup
        .await_ready("team", "False", Some("SecretMalformed"))
        .await;
    let secrets: Api<Secret> = Api::namespaced(setup.client.clone(), &setup.namespace);
    let patch = json!({"stringData": {"address": receiver.url("/hook")}});
    secrets
        .patch(
            "not-there-yet",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .expect("patch the Secret");
    // The next change of the subscription or the periodic look picks it up.
    setup.await_ready("team", "True", None).await;
    let keys = setup.history_keys("production").await;
    let requests = receiver
        .wait_for("the Acquired, once the Secret exists", WAIT, |r| {
            !r.is_empty()
        })
        .await;
    assert_eq!(key_of(&requests[0]), keys[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reminder_fires_for_a_long_held_lock_and_not_after_release() {
    let setup = setup("notify-remind").await;
    let receiver = Receiver::start().await;
    setup
        .secret("hook", &[("address", &receiver.url("/hook"))])
        .await;
    setup
        .subscription(
            "team",
            json!({
                "events": ["Released"],
                "reminder": {"afterSeconds": 2, "repeatSeconds": 2},
                "provider": {"type": "generic", "secretRef": {"name": "hook"}}
            }),
        )
        .await;
    let _controller = cluster().spawn_controller(&setup.namespace, "notify-remind", &[]);
    setup.await_ready("team", "True", None).await;
    setup.cli(
        Identity::Alice,
        &["acquire", "-e", "production", "--reason", "long deploy"],
    );
    setup.cli(
        Identity::Bob,
        &["acquire", "-e", "canary", "--reason", "also long"],
    );
    let reminders = |requests: &[Request], environment: &str| -> Vec<i64> {
        requests
            .iter()
            .filter(|r| r.delivered())
            .map(Request::json)
            .filter(|b| b["event"] == "Reminder" && b["environment"] == environment)
            .map(|b| b["reminder"].as_i64().unwrap_or(0))
            .collect()
    };
    receiver
        .wait_for("two reminders for production", WAIT, |r| {
            reminders(r, "production").len() >= 2
        })
        .await;
    let first = receiver
        .delivered()
        .iter()
        .map(Request::json)
        .find(|b| b["environment"] == "production")
        .expect("a production reminder");
    assert_eq!(first["reminder"], 1);
    assert_eq!(first["by"], "alice");
    assert_eq!(first["reason"], "long deploy");
    setup.cli(Identity::Alice, &["release", "-e", "production"]);
    let requests = receiver
        .wait_for("the Released", WAIT, |r| {
            r.iter()
                .any(|r| r.delivered() && r.json()["event"] == "Released")
        })
        .await;
    let released_at = requests
        .iter()
        .position(|r| r.delivered() && r.json()["event"] == "Released")
        .unwrap();
    // The canary is still held: two more of its reminders mean production's
    // next one (2 s period) would have come by then.
    let canary_then = reminders(&requests, "canary")
        .into_iter()
        .max()
        .unwrap_or(0);
    let requests = receiver
        .wait_for("two more canary reminders", WAIT, |r| {
            reminders(r, "canary").into_iter().max().unwrap_or(0) >= canary_then + 2
        })
        .await;
    let after = reminders(&requests[released_at + 1..], "production");
    assert!(after.is_empty(), "reminders after the release: {after:?}");
    // Reminders are numbered without repeats.
    let numbers = reminders(&requests, "canary");
    let unique: BTreeSet<i64> = numbers.iter().copied().collect();
    assert_eq!(unique.len(), numbers.len(), "{numbers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_receiver_is_given_up_loudly_and_a_stalled_one_retried() {
    let setup = setup("notify-fail").await;
    let receiver = Receiver::start().await;
    receiver.set_mode(Mode::Fail(503));
    setup
        .secret("hook", &[("address", &receiver.url("/hook"))])
        .await;
    setup
        .subscription(
            "team",
            json!({
                "provider": {"type": "generic", "secretRef": {"name": "hook"}},
                "retry": {"forSeconds": 4, "maxBackoffSeconds": 1}
            }),
        )
        .await;
    let controller = cluster().spawn_controller(&setup.namespace, "notify-fail", &[]);
    setup.await_ready("team", "True", None).await;
    setup.cli(Identity::Alice, &["acquire", "--reason", "receiver broken"]);
    let keys = setup.history_keys("production").await;
    let sub = setup
        .await_subscription("team", "a Failed delivery", |sub| {
            sub.status
                .as_ref()
                .and_then(|s| s.last_delivery.as_ref())
                .is_some_and(|d| d.result == DeliveryResult::Failed)
        })
        .await;
    let last = sub.status.unwrap().last_delivery.unwrap();
    assert_eq!(last.key, keys[0]);
    assert!(last.error.unwrap_or_default().contains("503"));
    assert!(receiver.requests().len() >= 2, "retried before giving up");
    // Never silent: a Warning Event on the subscription and the metric.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(setup.client.clone(), &setup.namespace);
    let listed = events.list(&Default::default()).await.expect("list Events");
    assert!(
        listed
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("NotificationFailed")
                && e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("team")),
        "no NotificationFailed Event: {:?}",
        listed.items.iter().map(|e| &e.reason).collect::<Vec<_>>()
    );
    let metrics = controller.metrics();
    assert!(
        metrics.contains(r#"deploylock_notifications_total{provider="generic",result="failed"} 1"#),
        "{metrics}"
    );
    // A receiver that never answers is given up per attempt (bounded
    // request time) and retried; lock operations go on meanwhile.
    // A longer retry period than the request time limit (10 s).
    let patch = json!({"spec": {"retry": {"forSeconds": 120, "maxBackoffSeconds": 1}}});
    setup
        .subscriptions()
        .patch("team", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch the subscription");
    setup
        .await_subscription("team", "the new spec observed", |sub| {
            sub.metadata.generation.is_some()
                && sub.status.as_ref().and_then(|s| s.observed_generation)
                    == sub.metadata.generation
        })
        .await;
    receiver.set_mode(Mode::Stall);
    setup.cli(Identity::Alice, &["release"]);
    let keys = setup.history_keys("production").await;
    receiver
        .wait_for("a stalled request", WAIT, |r| {
            r.iter().any(|r| r.answered.is_none())
        })
        .await;
    setup.cli(Identity::Bob, &["acquire", "--reason", "during the stall"]);
    receiver.set_mode(Mode::Accept);
    let requests = receiver
        .wait_for("the Released after the stall", WAIT, |r| {
            r.iter().any(|r| r.delivered() && key_of(r) == keys[1])
        })
        .await;
    let stalled = requests.iter().find(|r| r.answered.is_none()).unwrap();
    assert_eq!(key_of(stalled), keys[1], "the retry carries the same key");
}

#[tokio::test]
async fn example_subscriptions_pass_a_server_side_dry_run() {
    install_subscription_crd();
    let cluster = cluster();
    let created = cluster.kubectl(Identity::Admin, &["create", "namespace", "payments"]);
    let stderr = String::from_utf8_lossy(&created.stderr);
    assert!(
        created.status.success() || stderr.contains("AlreadyExists"),
        "{stderr}"
    );
    let dir = crate::support::repo_root().join("examples/notifications");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    for file in files {
        let output = cluster.kubectl(
            Identity::Admin,
            &[
                "apply",
                "--dry-run=server",
                "-f",
                &file.display().to_string(),
            ],
        );
        assert!(
            output.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The schema refuses what the controller could not use.
    let bad = r#"{"apiVersion":"deploylock.dev/v1","kind":"NotificationSubscription",
        "metadata":{"name":"bad","namespace":"payments"},
        "spec":{"environments":["Not A Name"],"provider":{"type":"telegram","secretRef":{"name":"x"}}}}"#;
    let output = cluster.kubectl_with_input(
        Identity::Admin,
        &["apply", "--dry-run=server", "-f", "-"],
        bad,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a bad subscription was accepted");
    assert!(
        stderr.contains("telegram") || stderr.contains("provider.type"),
        "{stderr}"
    );
    let bad = r##"{"apiVersion":"deploylock.dev/v1","kind":"NotificationSubscription",
        "metadata":{"name":"bad","namespace":"payments"},
        "spec":{"provider":{"type":"msteams","channel":"#x","secretRef":{"name":"x"}}}}"##;
    let output = cluster.kubectl_with_input(
        Identity::Admin,
        &["apply", "--dry-run=server", "-f", "-"],
        bad,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a channel for msteams was accepted"
    );
    assert!(
        stderr.contains("provider.channel applies to slack and mattermost only"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_test_command_and_status_line() {
    let setup = setup("notify-cli").await;
    let receiver = Receiver::start().await;
    setup
        .secret("hook", &[("address", &receiver.url("/hook"))])
        .await;
    setup
        .secret("broken", &[("address", &receiver.url("/broken"))])
        .await;
    setup.subscription("team", generic_spec("hook")).await;
    setup
        .subscription(
            "staging-only",
            json!({"environments": ["staging"], "provider": {"type": "slack", "secretRef": {"name": "broken"}}}),
        )
        .await;
    setup.cli(
        Identity::Alice,
        &["acquire", "--reason", "testing the hook"],
    );
    // No controller here: the CLI sends the test message itself. Reading the
    // Secret needs its RBAC (the admin here).
    let output = cluster().deploylock(
        Identity::Admin,
        &setup.namespace,
        &["notify", "test", "team"],
    );
    expect_exit(&output, 0, "notify test team");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("answered 200"), "{stdout}");
    let requests = receiver
        .wait_for("the test message", WAIT, |r| !r.is_empty())
        .await;
    let body = requests[0].json();
    assert_eq!(body["event"], "Test");
    assert_eq!(body["environment"], "production");
    assert_eq!(body["owner"], "alice");
    assert!(key_of(&requests[0]).starts_with("test-"));
    // The receiver's refusal is reported, exit 1.
    receiver.set_mode(Mode::Fail(404));
    let output = cluster().deploylock(
        Identity::Admin,
        &setup.namespace,
        &["notify", "test", "team"],
    );
    expect_exit(&output, 1, "notify test team (refused)");
    assert!(String::from_utf8_lossy(&output.stderr).contains("404"));
    let output = cluster().deploylock(
        Identity::Admin,
        &setup.namespace,
        &["notify", "test", "absent"],
    );
    expect_exit(&output, 1, "notify test absent");
    assert!(String::from_utf8_lossy(&output.stderr).contains("\"absent\" not found"));
    // status -v names the subscriptions covering the lock.
    let output = cluster().deploylock(Identity::Alice, &setup.namespace, &["status", "-v"]);
    expect_exit(&output, 0, "status -v");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("Notifications: team (generic)"), "{stdout}");
    assert!(!stdout.contains("staging-only"), "{stdout}");
}

/// Writes a one-minute holding by alice that ends `expires_in` from now,
/// straight through the API (the CLI's shortest duration is a minute).
async fn put_expiring_lock(
    setup: &Setup,
    environment: &str,
    expires_in: chrono::Duration,
) -> String {
    use deploylock::crd::{DeploymentLockSpec, HistoryEntry, LockHolder, LockType};
    let expires_at = chrono::Utc::now() + expires_in;
    let acquired_at = expires_at - chrono::Duration::minutes(1);
    let lock_id = uuid::Uuid::new_v4().to_string();
    let spec = DeploymentLockSpec {
        environment: environment.to_string(),
        holder: Some(LockHolder {
            lock_id: lock_id.clone(),
            user: "alice".into(),
            owner: "alice".into(),
            lock_type: LockType::Manual,
            reason: "short deploy".into(),
            acquired_at,
            expires_at,
            duration_seconds: 60,
            deployment_id: Some("run-7".into()),
            metadata: Default::default(),
            overrode: None,
            group_id: None,
        }),
        fencing_token: 1,
        queue: vec![],
        history: vec![HistoryEntry {
            sequence: 1,
            action: HistoryAction::Acquired,
            // Now, after the subscription was created: announced.
            at: chrono::Utc::now(),
            lock_id: lock_id.clone(),
            by: "alice".into(),
            owner: "alice".into(),
            reason: "short deploy".into(),
            expires_at: Some(expires_at),
        }],
    };
    let api = setup.locks();
    apply_lock_spec(&api, environment, &spec).await;
    lock_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_announced_once_with_a_stable_key() {
    let setup = setup("notify-expiry").await;
    let receiver = setup.team_receiver().await;
    let _controller =
        cluster().spawn_controller(&setup.namespace, "notify-expiry", &["--retention", "2s"]);
    setup.await_ready("team", "True", None).await;
    let lock_id = put_expiring_lock(&setup, "production", chrono::Duration::seconds(3)).await;
    let uid = setup.lock("production").await.uid().expect("a UID");
    let expired_key = format!("{uid}-expired-{lock_id}");
    // Acquired, then Expired (observed by the controller), then Cleared
    // after the 2 s retention.
    let requests = receiver
        .wait_for("the Cleared", WAIT, |r| {
            r.iter()
                .any(|r| r.delivered() && r.json()["event"] == "Cleared")
        })
        .await;
    let events: Vec<(String, String)> = requests
        .iter()
        .filter(|r| r.delivered())
        .map(|r| {
            (
                r.json()["event"].as_str().unwrap_or_default().to_string(),
                key_of(r),
            )
        })
        .collect();
    let names: Vec<&str> = events.iter().map(|(event, _)| event.as_str()).collect();
    assert_eq!(names, ["Acquired", "Expired", "Cleared"], "{events:?}");
    assert_eq!(events[1].1, expired_key);
    let expired = requests
        .iter()
        .find(|r| key_of(r) == expired_key)
        .unwrap()
        .json();
    assert_eq!(expired["state"], "Expired");
    assert_eq!(expired["deploymentId"], "run-7");
    assert_eq!(expired["idempotencyKey"], expired_key.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_waiter_is_announced_once_per_place_with_who_and_why() {
    let setup = setup("notify-queue").await;
    let receiver = Receiver::start().await;
    setup
        .secret("hook", &[("address", &receiver.url("/hook"))])
        .await;
    setup
        .secret("chat", &[("address", &receiver.url("/slack"))])
        .await;
    setup
        .subscription(
            "queue",
            json!({
                "events": ["WaiterQueued"],
                "provider": {"type": "generic", "secretRef": {"name": "hook"}}
            }),
        )
        .await;
    setup
        .subscription(
            "chat",
            json!({
                "events": ["WaiterQueued"],
                "provider": {"type": "slack", "secretRef": {"name": "chat"}}
            }),
        )
        .await;
    let _controller = cluster().spawn_controller(&setup.namespace, "notify-queue", &[]);
    setup.await_ready("queue", "True", None).await;
    setup.await_ready("chat", "True", None).await;
    setup.cli(Identity::Alice, &["acquire", "--reason", "Deploying 2.1.0"]);
    let bob = start_waiter(&setup.locks(), Identity::Bob, "bob-ci", "release 2.2", &[]).await;
    let carol = start_waiter(
        &setup.locks(),
        Identity::Carol,
        "carol",
        "hotfix 2.1.1",
        &[],
    )
    .await;
    let lock = setup.lock("production").await;
    let uid = lock.uid().expect("a UID");
    let places: Vec<(String, String)> = lock
        .spec
        .queue
        .iter()
        .map(|w| (w.owner.clone(), format!("{uid}-queued-{}", w.id)))
        .collect();
    assert_eq!(places.len(), 2, "two places: {places:?}");
    // Each waiter renews its place every few seconds (a lock change each
    // time): wait for a renewal of both before looking for repeats.
    let renewed_from = lock.spec.queue.iter().map(|w| w.heartbeat_at).min();
    let api = setup.locks();
    let renewed = move |lock: &DeploymentLock| {
        lock.spec.queue.len() == 2
            && lock
                .spec
                .queue
                .iter()
                .all(|w| Some(w.heartbeat_at) > renewed_from)
    };
    await_object(&api, "production", "renewed by both waiters", WAIT, renewed).await;
    let requests = receiver
        .wait_for("a message per place and subscription", WAIT, |r| {
            delivered_on(r, "/hook").len() >= 2 && delivered_on(r, "/slack").len() >= 2
        })
        .await;
    let generic = delivered_on(&requests, "/hook");
    let keys: Vec<String> = generic.iter().map(|r| key_of(r)).collect();
    let expected: Vec<String> = places.iter().map(|(_, key)| key.clone()).collect();
    assert_eq!(keys, expected, "one message per place, in queue order");
    let first = generic[0].json();
    assert_eq!(first["event"], "WaiterQueued");
    assert_eq!(first["environment"], "production");
    assert_eq!(first["by"], "bob");
    assert_eq!(first["owner"], "bob-ci");
    assert_eq!(first["reason"], "release 2.2");
    assert_eq!(first["queuePosition"], 1);
    assert_eq!(first["waitingFor"], "alice");
    assert_eq!(first["state"], "Locked");
    let second = generic[1].json();
    assert_eq!(second["owner"], "carol");
    assert_eq!(second["reason"], "hotfix 2.1.1");
    assert_eq!(second["queuePosition"], 2);
    let slack = delivered_on(&requests, "/slack");
    let text = slack[0].json()["text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        text.contains("waiter queued (place 1) by bob (as bob-ci): release 2.2; held by alice"),
        "{text}"
    );
    // The queue moves on: alice releases, bob then carol take the lock.
    setup.cli(Identity::Alice, &["release"]);
    expect_acquired(bob, "bob-ci");
    setup.cli(Identity::Bob, &["release"]);
    expect_acquired(carol, "carol");
    // Both places left the queue; once the subscription's cursor has
    // forgotten them the controller has seen every renewal since: still
    // exactly one message per place.
    setup
        .await_subscription("queue", "both places forgotten", |sub| {
            sub.status.as_ref().is_some_and(|status| {
                status.cursors.iter().any(|c| c.lock_uid == uid)
                    && status
                        .cursors
                        .iter()
                        .all(|c| c.lock_uid != uid || c.queued_ids.is_empty())
            })
        })
        .await;
    let generic_keys: Vec<String> = delivered_on(&receiver.requests(), "/hook")
        .iter()
        .map(|r| key_of(r))
        .collect();
    assert_eq!(generic_keys, expected, "no repeat for a renewed place");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_selector_and_environments_choose_the_locks_covered() {
    let setup = setup("notify-select").await;
    let receiver = Receiver::start().await;
    setup
        .secret("hook", &[("address", &receiver.url("/prod"))])
        .await;
    setup
        .secret("payments", &[("address", &receiver.url("/payments"))])
        .await;
    // Every lock labelled tier=prod.
    setup
        .subscription(
            "prod",
            json!({
                "lockSelector": {"matchLabels": {"tier": "prod"}},
                "events": ["Acquired"],
                "provider": {"type": "generic", "secretRef": {"name": "hook"}}
            }),
        )
        .await;
    // production or staging, and only when the team label is payments.
    setup
        .subscription(
            "payments",
            json!({
                "environments": ["production", "staging"],
                "lockSelector": {"matchExpressions": [
                    {"key": "team", "operator": "In", "values": ["payments"]}
                ]},
                "events": ["Acquired"],
                "provider": {"type": "generic", "secretRef": {"name": "payments"}}
            }),
        )
        .await;
    // A selector the API server cannot use is refused with the reason.
    let bad_selectors = [
        (
            json!({"matchExpressions": [{"key": "team", "operator": "In"}]}),
            "In and NotIn need values",
        ),
        (
            json!({"matchLabels": {"bad key!": "payments"}}),
            "lockSelector.matchLabels: every key must be a label key",
        ),
        (
            json!({"matchLabels": {"team": "not a value"}}),
            "in body should match",
        ),
        (
            json!({"matchExpressions": [{"key": "team", "operator": "In", "values": ["a b"]}]}),
            "in body should match",
        ),
    ];
    for (selector, expected) in bad_selectors {
        let refused = setup
            .subscriptions()
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "apiVersion": "deploylock.dev/v1",
                    "kind": "NotificationSubscription",
                    "metadata": {"name": "bad-selector"},
                    "spec": {
                        "lockSelector": selector,
                        "provider": {"type": "generic", "secretRef": {"name": "hook"}}
                    }
                }))
                .expect("a subscription"),
            )
            .await;
        match refused {
            Err(kube::Error::Api(status)) => assert!(
                status.message.contains(expected),
                "{selector}: {}",
                status.message
            ),
            other => panic!("the selector {selector} was not refused: {other:?}"),
        }
    }
    let _controller = cluster().spawn_controller(&setup.namespace, "notify-select", &[]);
    setup.await_ready("prod", "True", None).await;
    setup.await_ready("payments", "True", None).await;
    // The locks exist (and are labelled) before the transitions watched.
    let labels = [
        ("production", json!({"tier": "prod", "team": "payments"})),
        ("staging", json!({"tier": "test", "team": "payments"})),
        ("canary", json!({"tier": "prod", "team": "search"})),
        ("sandbox", json!({"team": "payments"})),
    ];
    let api = setup.locks();
    for (environment, labels) in &labels {
        setup.cli(
            Identity::Alice,
            &["acquire", "-e", environment, "--reason", "first"],
        );
        setup.cli(Identity::Alice, &["release", "-e", environment]);
        let patch = json!({"metadata": {"labels": labels}});
        if let Err(err) = api
            .patch(environment, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            panic!("cannot label {environment}: {err}");
        }
    }
    for (environment, _) in &labels {
        setup.cli(
            Identity::Bob,
            &["acquire", "-e", environment, "--reason", "watched"],
        );
    }
    // Last, a transition both subscriptions cover: once its message is in,
    // every earlier change was judged.
    setup.cli(Identity::Bob, &["release", "-e", "production"]);
    setup.cli(
        Identity::Alice,
        &["acquire", "-e", "production", "--reason", "sentinel"],
    );
    let requests = receiver
        .wait_for("the sentinel on both paths", WAIT, |r| {
            ["/prod", "/payments"].iter().all(|path| {
                delivered_on(r, path)
                    .iter()
                    .any(|r| r.json()["reason"] == "sentinel")
            })
        })
        .await;
    let covered = |path: &str| -> Vec<(String, String)> {
        delivered_on(&requests, path)
            .iter()
            .map(|r| {
                let body = r.json();
                (
                    body["environment"].as_str().unwrap_or_default().to_string(),
                    body["reason"].as_str().unwrap_or_default().to_string(),
                )
            })
            .filter(|(_, reason)| reason != "first")
            .collect()
    };
    let mut prod = covered("/prod");
    prod.sort();
    assert_eq!(
        prod,
        vec![
            ("canary".to_string(), "watched".to_string()),
            ("production".to_string(), "sentinel".to_string()),
            ("production".to_string(), "watched".to_string()),
        ],
        "tier=prod: canary and production"
    );
    let mut payments = covered("/payments");
    payments.sort();
    assert_eq!(
        payments,
        vec![
            ("production".to_string(), "sentinel".to_string()),
            ("production".to_string(), "watched".to_string()),
            ("staging".to_string(), "watched".to_string()),
        ],
        "team=payments among production and staging (not sandbox)"
    );
    // status -v names the subscriptions covering each lock.
    let output = cluster().deploylock(
        Identity::Alice,
        &setup.namespace,
        &["status", "-v", "-e", "canary"],
    );
    expect_exit(&output, 0, "status -v");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("Notifications: prod (generic)"), "{stdout}");
}

impl Setup {
    /// A loopback receiver at `/hook` and the subscription `team`
    /// ([`generic_spec`]) delivering to it through the Secret `hook`.
    async fn team_receiver(&self) -> Receiver {
        let receiver = Receiver::start().await;
        self.secret("hook", &[("address", &receiver.url("/hook"))])
            .await;
        self.subscription("team", generic_spec("hook")).await;
        receiver
    }

    /// Waits until a delivery of subscription `name` failed and is retried.
    async fn await_retrying(&self, name: &str) {
        self.await_subscription(name, "a Retrying delivery", |sub| {
            sub.status
                .as_ref()
                .and_then(|s| s.last_delivery.as_ref())
                .is_some_and(|d| d.result == DeliveryResult::Retrying)
        })
        .await;
    }

    /// The notes of the `NotificationsLost` Events of the namespace.
    async fn lost_notices(&self) -> Vec<String> {
        let events: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.namespace);
        match events.list(&Default::default()).await {
            Ok(list) => list
                .items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("NotificationsLost"))
                .map(|e| e.note.unwrap_or_default())
                .collect(),
            Err(err) => panic!("cannot list Events: {err}"),
        }
    }

    /// `rounds` acquire + release pairs by alice on production.
    fn acquire_release(&self, rounds: usize) {
        for round in 0..rounds {
            let reason = format!("round {round}");
            self.cli(Identity::Alice, &["acquire", "--reason", &reason]);
            self.cli(Identity::Alice, &["release"]);
        }
    }

    /// Waits until every entry `1..=last` of production's history reached
    /// `receiver`, then checks each arrived once and in order, and that
    /// nothing was reported lost.
    async fn expect_every_entry_once_in_order(&self, receiver: &Receiver, last: i64) {
        let lock = self.lock("production").await;
        let uid = lock.uid().expect("a UID");
        assert_eq!(
            lock.spec.history.last().map(|e| e.sequence),
            Some(last),
            "the lock's last entry"
        );
        assert!(
            lock.spec.history.first().map(|e| e.sequence) > Some(1),
            "the lock itself no longer holds its first entries"
        );
        let expected: Vec<String> = (1..=last)
            .map(|sequence| format!("{uid}-{sequence}"))
            .collect();
        let wanted: BTreeSet<String> = expected.iter().cloned().collect();
        let requests = receiver
            .wait_for("every history entry", WAIT, |r| {
                delivered_keys(r).is_superset(&wanted)
            })
            .await;
        let got: Vec<String> = requests
            .iter()
            .filter(|r| r.delivered())
            .map(key_of)
            .collect();
        assert_eq!(got, expected, "each entry once, in history order");
        assert_eq!(self.lost_notices().await, Vec::<String>::new());
    }
}

/// Polls a controller's `/readyz` until it answers 200.
async fn await_controller_ready(controller: &crate::support::ControllerProcess) {
    let url = format!("http://127.0.0.1:{}/readyz", controller.port);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ready = std::process::Command::new("curl")
            .args(["-sf", "-o", "/dev/null", &url])
            .status()
            .is_ok_and(|status| status.success());
        if ready {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the controller on port {} never became ready",
            controller.port
        );
        // An HTTP probe has no watch: polled.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Who the Lease `name` names as its holder.
async fn lease_holder(setup: &Setup, name: &str) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(setup.client.clone(), &setup.namespace);
    match leases.get_opt(name).await {
        Ok(lease) => lease
            .and_then(|lease| lease.spec)
            .and_then(|spec| spec.holder_identity),
        Err(err) => panic!("cannot read Lease {name}: {err}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_delivers_what_a_busy_lock_dropped_while_nobody_led() {
    let setup = setup("notify-standby").await;
    let receiver = setup.team_receiver().await;
    // A long Lease: the whole burst falls between the leader's death and
    // the standby's takeover.
    let lease = ["--lease-duration", "45"];
    let leader = cluster().spawn_controller(&setup.namespace, "notify-standby", &lease);
    setup.await_ready("team", "True", None).await;
    await_leader(&setup.namespace, "notify-standby", &[&leader], WAIT).await;
    let standby = cluster().spawn_controller(&setup.namespace, "notify-standby", &lease);
    await_controller_ready(&standby).await;
    setup.cli(Identity::Alice, &["acquire", "--reason", "before"]);
    let first = setup.history_keys("production").await;
    receiver
        .wait_for("the first entry", WAIT, |r| {
            r.iter()
                .filter(|r| r.delivered())
                .map(key_of)
                .eq(first.clone())
        })
        .await;
    // Killed once its cursor is stored: the standby repeats nothing.
    setup
        .await_subscription("team", "the first entry's cursor stored", |sub| {
            sub.status
                .as_ref()
                .is_some_and(|s| s.cursors.iter().any(|c| c.sequence >= 1))
        })
        .await;
    leader.signal("KILL");
    // 30 more entries: the lock keeps only the last 20 of the 31.
    setup.cli(Identity::Alice, &["release"]);
    setup.acquire_release(14);
    setup.cli(Identity::Alice, &["acquire", "--reason", "last"]);
    assert_eq!(
        lease_holder(&setup, "notify-standby").await,
        Some(leader.identity()),
        "the burst was over before the standby took over (nobody led meanwhile)"
    );
    setup.expect_every_entry_once_in_order(&receiver, 31).await;
    assert_eq!(
        lease_holder(&setup, "notify-standby").await,
        Some(standby.identity()),
        "delivered by the standby"
    );
    // The standby recorded an Event for each entry too, the dropped ones
    // included.
    await_object(
        &setup.locks(),
        "production",
        "every entry announced",
        WAIT,
        |lock| lock.status.as_ref().and_then(|s| s.last_event_sequence) == Some(31),
    )
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(setup.client.clone(), &setup.namespace);
    let transitions = match events.list(&Default::default()).await {
        Ok(list) => list
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("production"))
            .filter(|e| matches!(e.reason.as_deref(), Some("Acquired" | "Released")))
            .count(),
        Err(err) => panic!("cannot list Events: {err}"),
    };
    assert_eq!(transitions, 31, "one Event per history entry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_while_a_busy_lock_moves_past_its_history_misses_nothing() {
    let setup = setup("notify-down-busy").await;
    let receiver = setup.team_receiver().await;
    let _controller = cluster().spawn_controller(&setup.namespace, "notify-down-busy", &[]);
    setup.await_ready("team", "True", None).await;
    receiver.down();
    // 30 entries: the lock keeps only the last 20.
    setup.acquire_release(15);
    setup.await_retrying("team").await;
    assert!(receiver.requests().is_empty());
    receiver.up().await;
    setup.expect_every_entry_once_in_order(&receiver, 30).await;
}
