//! Hostile writers (issue 12): ordinary users, an admin and the controller's
//! own credential try every class of forbidden write through two clients —
//! kubectl (client-go) and raw HTTP requests through kube-rs — and the API
//! server must refuse each one, leave the object untouched, and leave the
//! lock usable by its holder, an admin and the controller. Legitimate raw
//! writes of each transition are accepted, so the refusals are not blanket.

use chrono::{DateTime, Duration, Utc};
use kube::Client;
use kube::api::Api;
use kube::runtime::wait::await_condition;
use serde_json::{Value, json};

use deploylock::crd::{DeploymentLock, HistoryAction, LockState};

use crate::support::{
    Identity, TestCluster, await_object, cluster, expect_exit, ok, status_is_current, stderr_of,
};
use testkit::torture_hostile::{entry_for, first_token, holding, new_lock, stamp};

const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// One write, as both clients send it.
#[derive(Clone, Debug)]
enum Write {
    /// RFC 6902 JSON patch of the main resource.
    JsonPatch(Value),
    /// A whole-object replace (update verb) carrying the read resourceVersion.
    Replace(Value),
    /// A whole-object replace of the status subresource.
    ReplaceStatus(Value),
    Create(Value),
    Delete,
}

/// How a write ended.
#[derive(Debug, PartialEq)]
enum Answer {
    Accepted,
    Refused(String),
}

fn object_url(namespace: &str, name: &str) -> String {
    format!("/apis/deploylock.dev/v1/namespaces/{namespace}/deploymentlocks/{name}")
}

/// Sends `write` with kube-rs as raw HTTP (no deploylock code involved).
async fn send_raw(client: &Client, namespace: &str, name: &str, write: &Write) -> Answer {
    let (method, url, content_type, body) = match write {
        Write::JsonPatch(patch) => (
            http::Method::PATCH,
            object_url(namespace, name),
            "application/json-patch+json",
            patch.to_string(),
        ),
        Write::Replace(object) => (
            http::Method::PUT,
            object_url(namespace, name),
            "application/json",
            object.to_string(),
        ),
        Write::ReplaceStatus(object) => (
            http::Method::PUT,
            format!("{}/status", object_url(namespace, name)),
            "application/json",
            object.to_string(),
        ),
        Write::Create(object) => (
            http::Method::POST,
            format!("/apis/deploylock.dev/v1/namespaces/{namespace}/deploymentlocks"),
            "application/json",
            object.to_string(),
        ),
        Write::Delete => (
            http::Method::DELETE,
            object_url(namespace, name),
            "application/json",
            String::new(),
        ),
    };
    let request = match http::Request::builder()
        .method(method)
        .uri(url)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(body.into_bytes())
    {
        Ok(request) => request,
        Err(err) => panic!("cannot build a request: {err}"),
    };
    match client.request::<Value>(request).await {
        Ok(_) => Answer::Accepted,
        Err(err) => Answer::Refused(err.to_string()),
    }
}

/// Sends `write` with kubectl as `identity`.
fn send_kubectl(
    cluster: &TestCluster,
    identity: Identity,
    namespace: &str,
    name: &str,
    write: &Write,
) -> Answer {
    let output = match write {
        Write::JsonPatch(patch) => {
            // From a file: a large patch exceeds the argument list.
            let file = std::env::temp_dir().join(format!(
                "deploylock-hostile-{}-{}.json",
                std::process::id(),
                uuid::Uuid::new_v4()
            ));
            if let Err(err) = std::fs::write(&file, patch.to_string()) {
                panic!("cannot write {}: {err}", file.display());
            }
            let output = cluster.kubectl(
                identity,
                &[
                    "patch",
                    "deploymentlock",
                    name,
                    "-n",
                    namespace,
                    "--type=json",
                    "--patch-file",
                    &file.display().to_string(),
                ],
            );
            let _ = std::fs::remove_file(&file);
            output
        }
        Write::Replace(object) => cluster.kubectl_with_input(
            identity,
            &["replace", "-n", namespace, "-f", "-"],
            &object.to_string(),
        ),
        Write::ReplaceStatus(object) => cluster.kubectl_with_input(
            identity,
            &[
                "replace",
                "--subresource=status",
                "-n",
                namespace,
                "-f",
                "-",
            ],
            &object.to_string(),
        ),
        Write::Create(object) => cluster.kubectl_with_input(
            identity,
            &["create", "-n", namespace, "-f", "-"],
            &object.to_string(),
        ),
        Write::Delete => cluster.kubectl(
            identity,
            &[
                "delete",
                "deploymentlock",
                name,
                "-n",
                namespace,
                "--wait=false",
            ],
        ),
    };
    if output.status.success() {
        Answer::Accepted
    } else {
        Answer::Refused(stderr_of(&output))
    }
}

/// The stored object as JSON (admin read), or None.
fn stored_json(cluster: &TestCluster, namespace: &str, name: &str) -> Option<Value> {
    let output = cluster.kubectl(
        Identity::Admin,
        &["get", "deploymentlock", name, "-n", namespace, "-o", "json"],
    );
    if !output.status.success() {
        return None;
    }
    serde_json::from_slice(&output.stdout).ok()
}

fn deploylock_ok(cluster: &TestCluster, identity: Identity, namespace: &str, args: &[&str]) {
    let output = cluster.deploylock(identity, namespace, args);
    expect_exit(
        &output,
        0,
        &format!("{} deploylock {args:?}", identity.username()),
    );
}

fn history(object: &Value) -> Vec<Value> {
    object["spec"]["history"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn last_sequence(object: &Value) -> i64 {
    history(object)
        .last()
        .and_then(|entry| entry["sequence"].as_i64())
        .unwrap_or(0)
}

/// `object` with `change` applied to a copy.
fn changed(object: &Value, change: impl FnOnce(&mut Value)) -> Value {
    let mut copy = object.clone();
    change(&mut copy);
    copy
}

/// `object` with `holder` as a new holding recorded as `action` by `by`,
/// the fencing token increased by `token_step`: a whole-object replace.
fn take_holding(object: &Value, holder: Value, action: &str, by: &str, token_step: i64) -> Write {
    let entry = entry_for(
        last_sequence(object) + 1,
        action,
        &holder,
        by,
        holder_time(&holder),
    );
    Write::Replace(changed(object, |copy| {
        copy["spec"]["holder"] = holder;
        copy["spec"]["fencingToken"] =
            json!(object["spec"]["fencingToken"].as_i64().unwrap_or(0) + token_step);
        if let Some(entries) = copy["spec"]["history"].as_array_mut() {
            entries.push(entry);
        }
    }))
}

/// The next history entry of `action` on the current holding, by `by`.
fn next_entry(object: &Value, action: &str, by: &str, now: DateTime<Utc>) -> Value {
    entry_for(
        last_sequence(object) + 1,
        action,
        &object["spec"]["holder"],
        by,
        now,
    )
}

/// An extension of the current holding to `expires_at`, recorded by `by`.
fn extension(object: &Value, by: &str, expires_at: &str, now: DateTime<Utc>) -> Write {
    let mut entry = next_entry(object, "Extended", by, now);
    entry["expiresAt"] = json!(expires_at);
    Write::JsonPatch(json!([
        { "op": "replace", "path": "/spec/holder/expiresAt", "value": expires_at },
        { "op": "add", "path": "/spec/history/-", "value": entry }
    ]))
}

/// When a crafted holding starts.
fn holder_time(holder: &Value) -> DateTime<Utc> {
    holder["acquiredAt"]
        .as_str()
        .and_then(deploylock::crd::parse_time)
        .unwrap_or_else(Utc::now)
}

/// A forbidden write to a lock alice holds (acquired, then extended).
struct Attack {
    what: &'static str,
    actor: Identity,
    write: fn(&Value, DateTime<Utc>) -> Write,
}

fn attacks_on_a_held_lock() -> Vec<Attack> {
    vec![
        Attack {
            what: "label another's lock (labels route its notifications and gates)",
            actor: Identity::Bob,
            write: |_, _| {
                Write::JsonPatch(
                    json!([{ "op": "add", "path": "/metadata/labels", "value": {"team": "payments"} }]),
                )
            },
        },
        Attack {
            what: "the holder relabels her own lock (only an admin sets labels after creation)",
            actor: Identity::Alice,
            write: |_, _| {
                Write::JsonPatch(
                    json!([{ "op": "add", "path": "/metadata/labels", "value": {"bulk-0": "x", "bulk-1": "x"} }]),
                )
            },
        },
        Attack {
            what: "insert a history entry (higher sequence) at history[0] (bricks the lock)",
            actor: Identity::Bob,
            write: |object, now| {
                let forged = next_entry(object, "Extended", "bob", now);
                Write::JsonPatch(
                    json!([{ "op": "add", "path": "/spec/history/0", "value": forged }]),
                )
            },
        },
        Attack {
            what: "the holder inserts a history entry at history[0]",
            actor: Identity::Alice,
            write: |object, now| {
                let forged = next_entry(object, "Extended", "alice", now);
                Write::JsonPatch(
                    json!([{ "op": "add", "path": "/spec/history/0", "value": forged }]),
                )
            },
        },
        Attack {
            what: "the holder reverses the history",
            actor: Identity::Alice,
            write: |object, _| {
                let mut entries = history(object);
                entries.reverse();
                Write::JsonPatch(
                    json!([{ "op": "replace", "path": "/spec/history", "value": entries }]),
                )
            },
        },
        Attack {
            what: "the holder erases the history",
            actor: Identity::Alice,
            write: |_, _| Write::JsonPatch(json!([{ "op": "remove", "path": "/spec/history" }])),
        },
        Attack {
            what: "the holder removes the newest history entry",
            actor: Identity::Alice,
            write: |object, _| {
                let last = history(object).len().saturating_sub(1);
                Write::JsonPatch(
                    json!([{ "op": "remove", "path": format!("/spec/history/{last}") }]),
                )
            },
        },
        Attack {
            what: "the holder flushes the history with 20 appended entries in one write",
            actor: Identity::Alice,
            write: |object, now| {
                let holder = &object["spec"]["holder"];
                let first = last_sequence(object) + 1;
                let entries: Vec<Value> = (0..20)
                    .map(|i| entry_for(first + i, "Extended", holder, "alice", now))
                    .collect();
                Write::JsonPatch(
                    json!([{ "op": "replace", "path": "/spec/history", "value": entries }]),
                )
            },
        },
        Attack {
            what: "a forged ForceAcquired entry without a new holding (false alerts)",
            actor: Identity::Bob,
            write: |object, now| {
                let forged = next_entry(object, "ForceAcquired", "bob", now);
                Write::JsonPatch(
                    json!([{ "op": "add", "path": "/spec/history/-", "value": forged }]),
                )
            },
        },
        Attack {
            what: "the holder extends to 2099",
            actor: Identity::Alice,
            write: |object, now| extension(object, "alice", "2099-01-01T00:00:00Z", now),
        },
        Attack {
            what: "the holder gives its holding a lock group ID in a valid extension",
            actor: Identity::Alice,
            write: |object, now| {
                let expires_at = stamp(now + Duration::minutes(50));
                let mut entry = next_entry(object, "Extended", "alice", now);
                entry["expiresAt"] = json!(expires_at);
                Write::JsonPatch(json!([
                    { "op": "replace", "path": "/spec/holder/expiresAt", "value": expires_at },
                    { "op": "add", "path": "/spec/holder/groupId", "value": "another-group" },
                    { "op": "add", "path": "/spec/history/-", "value": entry }
                ]))
            },
        },
        Attack {
            what: "a non-holder sets the lock group ID of the holding",
            actor: Identity::Bob,
            write: |_, _| {
                Write::JsonPatch(json!([
                    { "op": "add", "path": "/spec/holder/groupId", "value": "bobs-group" }
                ]))
            },
        },
        Attack {
            what: "a non-holder extends the holding in the holder's name",
            actor: Identity::Bob,
            write: |object, now| extension(object, "bob", &stamp(now + Duration::hours(2)), now),
        },
        Attack {
            what: "the holder shortens acquiredAt (a holding's start is fixed)",
            actor: Identity::Alice,
            write: |object, now| {
                let entry = next_entry(object, "Extended", "alice", now);
                Write::JsonPatch(json!([
                    { "op": "replace", "path": "/spec/holder/acquiredAt", "value": stamp(now - Duration::days(3)) },
                    { "op": "add", "path": "/spec/history/-", "value": entry }
                ]))
            },
        },
        Attack {
            what: "an admin replaces the holding without a history entry (kubectl force)",
            actor: Identity::Carol,
            write: |object, now| {
                Write::Replace(changed(object, |copy| {
                    copy["spec"]["holder"] = holding("carol", "emergency", now);
                    copy["spec"]["fencingToken"] =
                        json!(object["spec"]["fencingToken"].as_i64().unwrap_or(0) + 1);
                }))
            },
        },
        Attack {
            what: "an admin force-acquires without increasing the fencing token",
            actor: Identity::Carol,
            write: |object, now| {
                let mut holder = holding("carol", "emergency", now);
                let old = &object["spec"]["holder"];
                holder["overrode"] = json!({
                    "lockId": old["lockId"], "user": old["user"], "owner": old["owner"], "reason": old["reason"]
                });
                take_holding(object, holder, "ForceAcquired", "carol", 0)
            },
        },
        Attack {
            what: "a user takes over the live holding as if it had expired",
            actor: Identity::Bob,
            write: |object, now| {
                take_holding(
                    object,
                    holding("bob", "manual", now),
                    "TookOverExpired",
                    "bob",
                    1,
                )
            },
        },
        Attack {
            what: "the controller's credential takes the lock for itself",
            actor: Identity::Controller,
            write: |object, now| {
                let holder = holding("deploylock-controller", "manual", now);
                take_holding(
                    object,
                    holder,
                    "TookOverExpired",
                    "deploylock-controller",
                    1,
                )
            },
        },
        Attack {
            what: "the controller's credential clears a live holding",
            actor: Identity::Controller,
            write: |object, now| {
                Write::Replace(changed(object, |copy| {
                    let mut entry = next_entry(object, "Cleared", "deploylock-controller", now);
                    entry["expiresAt"] = object["spec"]["holder"]["expiresAt"].clone();
                    copy["spec"]
                        .as_object_mut()
                        .map(|spec| spec.remove("holder"));
                    if let Some(entries) = copy["spec"]["history"].as_array_mut() {
                        entries.push(entry);
                    }
                }))
            },
        },
        Attack {
            what: "a user writes status",
            actor: Identity::Bob,
            write: |object, _| {
                Write::ReplaceStatus(changed(object, |copy| {
                    copy["status"] = json!({ "state": "Expired" });
                }))
            },
        },
        Attack {
            what: "a user adds a finalizer",
            actor: Identity::Bob,
            write: |_, _| {
                Write::JsonPatch(
                    json!([{ "op": "add", "path": "/metadata/finalizers", "value": ["example.com/stuck"] }]),
                )
            },
        },
        Attack {
            what: "a user adds a dangling ownerReference (garbage collection would delete the lock)",
            actor: Identity::Bob,
            write: |_, _| {
                Write::JsonPatch(
                    json!([{ "op": "add", "path": "/metadata/ownerReferences", "value": [{
                "apiVersion": "v1", "kind": "ConfigMap", "name": "gone", "uid": "00000000-0000-0000-0000-000000000000"
            }] }]),
                )
            },
        },
        Attack {
            what: "a user adds a 200 KB annotation",
            actor: Identity::Bob,
            write: |_, _| {
                Write::JsonPatch(
                    json!([{ "op": "add", "path": "/metadata/annotations", "value": {
                "example.com/blob": "x".repeat(200 * 1024)
            } }]),
                )
            },
        },
        Attack {
            what: "a user releases the holder's lock in the holder's name",
            actor: Identity::Bob,
            write: |object, now| {
                let mut entry = next_entry(object, "Released", "alice", now);
                entry.as_object_mut().map(|e| e.remove("expiresAt"));
                Write::JsonPatch(json!([
                    { "op": "remove", "path": "/spec/holder" },
                    { "op": "add", "path": "/spec/history/-", "value": entry }
                ]))
            },
        },
        Attack {
            what: "a history entry with a date the schema must refuse (poison for readers)",
            actor: Identity::Alice,
            write: |object, now| {
                let mut entry = next_entry(object, "Extended", "alice", now);
                entry["at"] = json!("2030-01-01T00:00:00ZT");
                Write::JsonPatch(
                    json!([{ "op": "add", "path": "/spec/history/-", "value": entry }]),
                )
            },
        },
        Attack {
            what: "a queue place whose reason carries a terminal escape (kubectl get, chats print it)",
            actor: Identity::Bob,
            write: |_, now| {
                Write::JsonPatch(json!([{ "op": "add", "path": "/spec/queue", "value": [{
                "id": "bob-escape", "user": "bob", "owner": "bob",
                "reason": "waiting\u{1b}]0;owned\u{7}\u{1b}[2J",
                "since": stamp(now), "heartbeatAt": stamp(now)
            }] }]))
            },
        },
        Attack {
            what: "a queue place whose owner label forges a second line",
            actor: Identity::Bob,
            write: |_, now| {
                Write::JsonPatch(json!([{ "op": "add", "path": "/spec/queue", "value": [{
                "id": "bob-newline", "user": "bob", "owner": "bob\nproduction released by carol",
                "reason": "waiting", "since": stamp(now), "heartbeatAt": stamp(now)
            }] }]))
            },
        },
        Attack {
            what: "the holder releases with a bidi override in the Released entry's reason",
            actor: Identity::Alice,
            write: |object, now| {
                let mut entry = next_entry(object, "Released", "alice", now);
                entry.as_object_mut().map(|e| e.remove("expiresAt"));
                entry["reason"] = json!("done \u{202e}desaeler yllufsseccus");
                Write::JsonPatch(json!([
                    { "op": "remove", "path": "/spec/holder" },
                    { "op": "add", "path": "/spec/history/-", "value": entry }
                ]))
            },
        },
        Attack {
            what: "the holder releases with an entry claiming another expiry (history forgery)",
            actor: Identity::Alice,
            write: |object, now| {
                let mut entry = next_entry(object, "Released", "alice", now);
                entry["expiresAt"] = json!("2020-01-01T00:00:00Z");
                Write::JsonPatch(json!([
                    { "op": "remove", "path": "/spec/holder" },
                    { "op": "add", "path": "/spec/history/-", "value": entry }
                ]))
            },
        },
        Attack {
            what: "two queue places joined in one write (filling the queue locks everyone out)",
            actor: Identity::Bob,
            write: |_, now| {
                let place = |id: &str| {
                    json!({
                        "id": id, "user": "bob", "owner": "bob", "reason": "x",
                        "since": stamp(now), "heartbeatAt": stamp(now)
                    })
                };
                Write::JsonPatch(json!([{ "op": "add", "path": "/spec/queue",
                    "value": [place("bob-1"), place("bob-2")] }]))
            },
        },
        Attack {
            what: "a queue place with a comma-fraction date (poison for readers)",
            actor: Identity::Bob,
            write: |_, _| {
                Write::JsonPatch(json!([{ "op": "add", "path": "/spec/queue", "value": [{
                "id": "bob-1", "user": "bob", "owner": "bob", "reason": "x",
                "since": "2030-01-01T00:00:00,5Z", "heartbeatAt": "2030-01-01T00:00:00,5Z"
            }] }]))
            },
        },
    ]
}

/// A forbidden create of a new lock.
struct BadCreate {
    what: &'static str,
    object: fn(&str, DateTime<Utc>) -> Value,
}

fn bad_creates() -> Vec<BadCreate> {
    vec![
        BadCreate {
            what: "history sequence 2^63-1 (controller and CLI overflow)",
            object: |name, now| {
                let mut lock = new_lock(name, "alice", now);
                lock["spec"]["history"][0]["sequence"] = json!(i64::MAX);
                lock
            },
        },
        BadCreate {
            what: "fencing token 2^63-1 (saturation)",
            object: |name, now| {
                let mut lock = new_lock(name, "alice", now);
                lock["spec"]["fencingToken"] = json!(i64::MAX);
                lock
            },
        },
        BadCreate {
            what: "fencing token 1 (repeats tokens of a deleted lock)",
            object: |name, now| {
                let mut lock = new_lock(name, "alice", now);
                lock["spec"]["fencingToken"] = json!(1);
                lock
            },
        },
        BadCreate {
            what: "a holding until 9999",
            object: |name, now| {
                let mut lock = new_lock(name, "alice", now);
                lock["spec"]["holder"]["expiresAt"] = json!("9999-12-31T23:59:59Z");
                lock["spec"]["history"][0]["expiresAt"] = json!("9999-12-31T23:59:59Z");
                lock
            },
        },
        BadCreate {
            what: "a holding starting next year",
            object: |name, now| {
                let later = now + Duration::days(365);
                let mut lock = new_lock(name, "alice", later);
                lock["spec"]["fencingToken"] = json!(first_token(now) + 1);
                lock
            },
        },
        BadCreate {
            what: "acquiredAt 2030-01-01T00:00:00ZT (poison date)",
            object: |name, now| {
                let mut lock = new_lock(name, "alice", now);
                lock["spec"]["holder"]["acquiredAt"] = json!("2030-01-01T00:00:00ZT");
                lock
            },
        },
        BadCreate {
            what: "history at 0000-01-01 (outside CEL's timestamps: would fail the policy on every later write)",
            object: |name, now| {
                let mut lock = new_lock(name, "alice", now);
                lock["spec"]["history"][0]["at"] = json!("0000-01-01T00:00:00Z");
                lock
            },
        },
        BadCreate {
            what: "a holding in another user's name",
            object: |name, now| new_lock(name, "bob", now),
        },
        BadCreate {
            what: "a forged history of several entries",
            object: |name, now| {
                let mut lock = new_lock(name, "alice", now);
                let holder = lock["spec"]["holder"].clone();
                lock["spec"]["history"] = json!([
                    entry_for(1, "ForceReleased", &holder, "carol", now),
                    entry_for(2, "Acquired", &holder, "alice", now)
                ]);
                lock
            },
        },
        BadCreate {
            what: "an emergency holding without the force permission",
            object: |name, now| {
                let mut lock = new_lock(name, "alice", now);
                lock["spec"]["holder"]["type"] = json!("emergency");
                lock["spec"]["history"][0]["action"] = json!("ForceAcquired");
                lock
            },
        },
        BadCreate {
            what: "a reason with a terminal escape (kubectl get prints the column as is)",
            object: |name, now| {
                let mut lock = new_lock(name, "alice", now);
                let reason = json!("deploy \u{1b}]0;owned\u{7}\u{1b}[2J\u{1b}[31m");
                lock["spec"]["holder"]["reason"] = reason.clone();
                lock["spec"]["history"][0]["reason"] = reason;
                lock
            },
        },
        BadCreate {
            what: "an owner label with a newline and a C1 CSI",
            object: |name, now| {
                let mut lock = new_lock(name, "alice", now);
                let owner = json!("alice\r\nReleased by carol\u{9b}2J");
                lock["spec"]["holder"]["owner"] = owner.clone();
                lock["spec"]["history"][0]["owner"] = owner;
                lock
            },
        },
        BadCreate {
            what: "a deployment ID with a bidi isolate",
            object: |name, now| {
                let mut lock = new_lock(name, "alice", now);
                lock["spec"]["holder"]["deploymentId"] = json!("run-1\u{2066}\u{2028}");
                lock
            },
        },
        BadCreate {
            what: "a finalizer",
            object: |name, now| {
                let mut lock = new_lock(name, "alice", now);
                lock["metadata"]["finalizers"] = json!(["example.com/stuck"]);
                lock
            },
        },
    ]
}

/// Waits until the controller's status matches the stored spec (state,
/// holding, generation): proof that it still reconciles this lock.
async fn await_reconciled(api: &Api<DeploymentLock>, name: &str, state: LockState) {
    let reconciled = move |lock: &DeploymentLock| {
        status_is_current(lock)
            && lock.status.as_ref().and_then(|status| status.state) == Some(state)
    };
    await_object(
        api,
        name,
        &format!("reconciled to {state}"),
        WAIT,
        reconciled,
    )
    .await;
}

fn assert_refused(answer: &Answer, what: &str, tool: &str) {
    assert!(
        matches!(answer, Answer::Refused(_)),
        "{what}: accepted through {tool}"
    );
}

#[tokio::test]
async fn forbidden_writes_are_refused_and_the_lock_stays_usable() {
    let cluster = cluster();
    let namespace = cluster.enforced_namespace("hostile").await;
    let _controller = cluster.spawn_controller(&namespace, "hostile", &[]);
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let environment = "production";
    deploylock_ok(
        cluster,
        Identity::Alice,
        &namespace,
        &[
            "-e",
            environment,
            "acquire",
            "--duration",
            "30",
            "--reason",
            "Deploying version 2.1.0",
        ],
    );
    deploylock_ok(
        cluster,
        Identity::Alice,
        &namespace,
        &["-e", environment, "extend", "--duration", "45"],
    );
    await_reconciled(&api, environment, LockState::Locked).await;

    let mut accepted = Vec::new();
    for attack in attacks_on_a_held_lock() {
        let client = cluster.client(attack.actor).await;
        let Some(before) = stored_json(cluster, &namespace, environment) else {
            panic!("{environment} disappeared before: {}", attack.what);
        };
        let write = (attack.write)(&before, Utc::now());
        let through_kubectl = send_kubectl(cluster, attack.actor, &namespace, environment, &write);
        let through_raw = send_raw(&client, &namespace, environment, &write).await;
        let after = stored_json(cluster, &namespace, environment);
        for (tool, answer) in [
            ("kubectl", &through_kubectl),
            ("kube-rs raw HTTP", &through_raw),
        ] {
            if !matches!(answer, Answer::Refused(_)) {
                accepted.push(format!(
                    "{} as {}: accepted through {tool}",
                    attack.what,
                    attack.actor.username()
                ));
            }
        }
        let unchanged = after.as_ref().map(|a| &a["spec"]) == Some(&before["spec"])
            && after.as_ref().map(|a| &a["metadata"]["finalizers"])
                == Some(&before["metadata"]["finalizers"]);
        if !unchanged {
            accepted.push(format!("{}: the stored object changed", attack.what));
        }
    }
    assert!(
        accepted.is_empty(),
        "forbidden writes got through:\n{}",
        accepted.join("\n")
    );

    // The lock is still usable by its holder, the controller and an admin.
    await_reconciled(&api, environment, LockState::Locked).await;
    deploylock_ok(
        cluster,
        Identity::Alice,
        &namespace,
        &["-e", environment, "extend", "--duration", "50"],
    );
    deploylock_ok(
        cluster,
        Identity::Alice,
        &namespace,
        &["-e", environment, "release"],
    );
    await_reconciled(&api, environment, LockState::Available).await;
    deploylock_ok(
        cluster,
        Identity::Bob,
        &namespace,
        &[
            "-e",
            environment,
            "acquire",
            "--reason",
            "Deploying version 2.2.0",
        ],
    );
    deploylock_ok(
        cluster,
        Identity::Carol,
        &namespace,
        &[
            "-e",
            environment,
            "force-release",
            "--reason",
            "incident 42",
        ],
    );
    await_reconciled(&api, environment, LockState::Available).await;
    let lock = match api.get(environment).await {
        Ok(lock) => lock,
        Err(err) => panic!("cannot read {environment}: {err}"),
    };
    let actions: Vec<HistoryAction> = lock.spec.history.iter().map(|entry| entry.action).collect();
    assert_eq!(
        actions,
        [
            HistoryAction::Acquired,
            HistoryAction::Extended,
            HistoryAction::Extended,
            HistoryAction::Released,
            HistoryAction::Acquired,
            HistoryAction::ForceReleased,
        ],
        "the history tells exactly the accepted transitions"
    );
}

#[tokio::test]
async fn forbidden_creates_are_refused_and_legitimate_raw_transitions_accepted() {
    let cluster = cluster();
    let namespace = cluster.enforced_namespace("hostile-create").await;
    let _controller = cluster.spawn_controller(&namespace, "hostile-create", &[]);
    let alice = cluster.client(Identity::Alice).await;
    for (index, bad) in bad_creates().into_iter().enumerate() {
        let name = format!("bad-{index}");
        let object = (bad.object)(&name, Utc::now());
        let write = Write::Create(object);
        assert_refused(
            &send_kubectl(cluster, Identity::Alice, &namespace, &name, &write),
            bad.what,
            "kubectl",
        );
        assert_refused(
            &send_raw(&alice, &namespace, &name, &write).await,
            bad.what,
            "kube-rs raw HTTP",
        );
        assert!(
            stored_json(cluster, &namespace, &name).is_none(),
            "{}: an object was stored",
            bad.what
        );
    }

    // The same transitions written correctly by hand are accepted: the
    // policy refuses the forgery, not the client.
    let now = Utc::now();
    let created = send_kubectl(
        cluster,
        Identity::Alice,
        &namespace,
        "raw",
        &Write::Create(new_lock("raw", "alice", now)),
    );
    assert_eq!(
        created,
        Answer::Accepted,
        "alice creates a valid lock by hand"
    );
    let Some(object) = stored_json(cluster, &namespace, "raw") else {
        panic!("the raw lock was not stored");
    };
    let holder = object["spec"]["holder"].clone();
    let mut released = entry_for(2, "Released", &holder, "alice", Utc::now());
    released
        .as_object_mut()
        .map(|entry| entry.remove("expiresAt"));
    let release = Write::JsonPatch(json!([
        { "op": "remove", "path": "/spec/holder" },
        { "op": "add", "path": "/spec/history/-", "value": released }
    ]));
    assert_eq!(
        send_raw(&alice, &namespace, "raw", &release).await,
        Answer::Accepted,
        "alice releases her lock by hand"
    );
    // bob queues by hand, in his own name, at the end.
    let now = Utc::now();
    let join = Write::JsonPatch(json!([{ "op": "add", "path": "/spec/queue", "value": [{
        "id": "bob-1", "user": "bob", "owner": "bob", "reason": "next deploy",
        "since": stamp(now), "heartbeatAt": stamp(now)
    }] }]));
    let bob = cluster.client(Identity::Bob).await;
    assert_eq!(
        send_raw(&bob, &namespace, "raw", &join).await,
        Answer::Accepted,
        "bob joins the queue by hand"
    );

    // Queue attacks while bob waits.
    let Some(queued) = stored_json(cluster, &namespace, "raw") else {
        panic!("raw lock vanished");
    };
    let token = queued["spec"]["fencingToken"].as_i64().unwrap_or(0);
    let jump = {
        let now = Utc::now();
        let holder = holding("alice", "manual", now);
        let entry = entry_for(3, "Acquired", &holder, "alice", now);
        Write::JsonPatch(json!([
            { "op": "add", "path": "/spec/holder", "value": holder },
            { "op": "replace", "path": "/spec/fencingToken", "value": token + 1 },
            { "op": "add", "path": "/spec/history/-", "value": entry }
        ]))
    };
    let queue_attacks = [
        (
            "alice takes the free lock while bob waits (jumping the queue)",
            Identity::Alice,
            jump,
        ),
        (
            "alice inserts her place before bob's",
            Identity::Alice,
            Write::JsonPatch(json!([{ "op": "add", "path": "/spec/queue/0", "value": {
                "id": "alice-1", "user": "alice", "owner": "alice", "reason": "me first",
                "since": stamp(Utc::now()), "heartbeatAt": stamp(Utc::now())
            } }])),
        ),
        (
            "alice takes bob's place by changing its user",
            Identity::Alice,
            Write::JsonPatch(
                json!([{ "op": "replace", "path": "/spec/queue/0/user", "value": "alice" }]),
            ),
        ),
        (
            "alice removes bob's live place",
            Identity::Alice,
            Write::JsonPatch(json!([{ "op": "remove", "path": "/spec/queue/0" }])),
        ),
        (
            "bob backdates his own place",
            Identity::Bob,
            Write::JsonPatch(
                json!([{ "op": "replace", "path": "/spec/queue/0/since", "value": "2020-01-01T00:00:00Z" }]),
            ),
        ),
    ];
    for (what, actor, write) in queue_attacks {
        let client = cluster.client(actor).await;
        assert_refused(
            &send_kubectl(cluster, actor, &namespace, "raw", &write),
            what,
            "kubectl",
        );
        assert_refused(
            &send_raw(&client, &namespace, "raw", &write).await,
            what,
            "kube-rs raw HTTP",
        );
        let after = stored_json(cluster, &namespace, "raw");
        assert_eq!(
            after.as_ref().map(|a| &a["spec"]),
            Some(&queued["spec"]),
            "{what}: the stored object changed"
        );
    }
    // A lock object created only to queue for it (no holding yet): its
    // token starts from the clock, nothing else is needed.
    let now = Utc::now();
    let queue_only = Write::Create(json!({
        "apiVersion": "deploylock.dev/v1",
        "kind": "DeploymentLock",
        "metadata": { "name": "queue-only" },
        "spec": {
            "environment": "queue-only",
            "fencingToken": first_token(now),
            "queue": [{
                "id": "bob-2", "user": "bob", "owner": "bob", "reason": "first in line",
                "since": stamp(now), "heartbeatAt": stamp(now)
            }]
        }
    }));
    assert_eq!(
        send_raw(&bob, &namespace, "queue-only", &queue_only).await,
        Answer::Accepted,
        "bob creates a lock object by joining its queue"
    );

    // bob, whose turn it is, takes the lock through the queue (CLI).
    deploylock_ok(
        cluster,
        Identity::Bob,
        &namespace,
        &[
            "-e",
            "raw",
            "acquire",
            "--reason",
            "next deploy",
            "--wait-timeout",
            "30",
        ],
    );
}

/// Deleting and re-creating a lock never repeats a fencing token: the
/// delete waits until the token is behind the clock, and a re-created lock
/// starts from the clock.
#[tokio::test]
async fn a_recreated_lock_never_repeats_a_fencing_token() {
    let cluster = cluster();
    let namespace = cluster.enforced_namespace("hostile-fencing").await;
    let _controller = cluster.spawn_controller(&namespace, "hostile-fencing", &[]);
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    deploylock_ok(
        cluster,
        Identity::Alice,
        &namespace,
        &["acquire", "--reason", "first"],
    );
    let first = match api.get("production").await {
        Ok(lock) => lock.spec.fencing_token,
        Err(err) => panic!("cannot read production: {err}"),
    };
    deploylock_ok(cluster, Identity::Alice, &namespace, &["release"]);
    // The admin deletes it: refused while the token is ahead of the clock,
    // accepted once the clock has passed it (the controller moves the clock
    // every second; each refused try is a real answer of the API server).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match send_kubectl(
            cluster,
            Identity::Carol,
            &namespace,
            "production",
            &Write::Delete,
        ) {
            Answer::Accepted => break,
            Answer::Refused(message) => {
                assert!(
                    message.contains("fencing token is ahead of the deploylock clock"),
                    "unexpected refusal of the delete: {message}"
                );
                assert!(
                    std::time::Instant::now() < deadline,
                    "the delete was refused for 30 s: {message}"
                );
                await_clock_tick(&api).await;
            }
        }
    }
    let stale = Write::Create(changed(
        &new_lock("production", "bob", Utc::now()),
        |lock| {
            lock["spec"]["fencingToken"] = json!(first);
        },
    ));
    // The refusal names the clock and what to check when it is stale.
    match send_kubectl(cluster, Identity::Bob, &namespace, "production", &stale) {
        Answer::Refused(message) => assert!(
            message.contains("starts its fencing token from the deploylock clock")
                && message.contains("is the deploylock controller running?")
                && message.contains("restart kube-apiserver: kubernetes/kubernetes#130887"),
            "re-create with the old token refused for another reason: {message}"
        ),
        Answer::Accepted => panic!("re-create with the old token was accepted"),
    }
    deploylock_ok(
        cluster,
        Identity::Bob,
        &namespace,
        &["acquire", "--reason", "second"],
    );
    let second = match api.get("production").await {
        Ok(lock) => lock.spec.fencing_token,
        Err(err) => panic!("cannot read production: {err}"),
    };
    assert!(
        second > first,
        "token after re-create {second} must exceed {first}"
    );
}

/// Returns after the next change of the clock Lease (a watch, no sleep).
async fn await_clock_tick(api: &Api<DeploymentLock>) {
    use k8s_openapi::api::coordination::v1::Lease;
    let leases: Api<Lease> = Api::namespaced(api.clone().into_client(), "deploylock-system");
    let current = leases
        .get("deploylock-clock")
        .await
        .ok()
        .and_then(|lease| lease.metadata.resource_version);
    let moved = move |lease: Option<&Lease>| {
        lease.is_some_and(|lease| lease.metadata.resource_version != current)
    };
    let _ = tokio::time::timeout(WAIT, await_condition(leases, "deploylock-clock", moved)).await;
}

/// Growing a lock past what etcd stores (field managers, one server-side
/// apply each) is bounded, and the lock stays writable by its holder; and
/// nobody but an admin takes a place in stop-the-line's queue.
#[tokio::test]
async fn field_managers_are_bounded_and_only_admins_wait_for_stop_the_line() {
    let cluster = cluster();
    let namespace = cluster.enforced_namespace("hostile-bloat").await;
    deploylock_ok(
        cluster,
        Identity::Alice,
        &namespace,
        &["-e", "production", "acquire", "--reason", "Deploying 2.2"],
    );
    let apply = json!({
        "apiVersion": "deploylock.dev/v1", "kind": "DeploymentLock",
        "metadata": {"name": "production"},
        "spec": {"environment": "production"}
    })
    .to_string();
    let mut refused = None;
    for manager in 0..40 {
        let output = cluster.kubectl_with_input(
            Identity::Bob,
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "-n",
                &namespace,
                "--field-manager",
                &format!("bloat-{manager}"),
                "-f",
                "-",
            ],
            &apply,
        );
        if !output.status.success() {
            refused = Some((manager, stderr_of(&output)));
            break;
        }
    }
    let Some((at, why)) = refused else {
        panic!("40 field managers were all admitted");
    };
    assert!(
        why.contains("at most 24 field managers"),
        "refused at manager {at} for another reason: {why}"
    );
    let managers = stored_json(cluster, &namespace, "production")
        .and_then(|object| object["metadata"]["managedFields"].as_array().map(Vec::len))
        .unwrap_or_default();
    assert!(managers <= 24, "{managers} field managers stored");
    // The holder keeps writing (her field manager is already there).
    deploylock_ok(
        cluster,
        Identity::Alice,
        &namespace,
        &["-e", "production", "extend", "--duration", "45"],
    );

    let waiter = cluster.deploylock(
        Identity::Bob,
        &namespace,
        &[
            "-e",
            "stop-the-line",
            "acquire",
            "--reason",
            "me too",
            "--wait-timeout",
            "5",
        ],
    );
    expect_exit(&waiter, 5, "bob waits for stop-the-line");
    assert!(
        stderr_of(&waiter).contains("needs the force permission"),
        "{}",
        stderr_of(&waiter)
    );
    let line = stored_json(cluster, &namespace, "stop-the-line");
    assert!(
        line.as_ref()
            .and_then(|object| object["spec"]["queue"].as_array())
            .is_none_or(|queue| queue.is_empty()),
        "bob has a place in stop-the-line's queue: {line:?}"
    );
}

/// The workload gate covers every road to running or scaling workloads in a
/// bound namespace: a ReplicationController (it runs Pods like a ReplicaSet)
/// and a HorizontalPodAutoscaler (Kubernetes' own autoscaler, which the gate
/// exempts, scales the Deployment to the bounds a non-holder writes). Both
/// were admitted for bob while alice held the lock.
#[tokio::test]
async fn the_workload_gate_covers_replication_controllers_and_autoscalers() {
    use crate::gate::{LockState as GateState, set_state, set_up};
    let cluster = cluster();
    let gate = set_up("hostile-gate-roads").await;
    let namespace = gate.workloads.as_str();
    cluster.grant(
        namespace,
        "other-roads",
        json!([
            {"apiGroups": [""], "verbs": ["*"],
             "resources": ["replicationcontrollers", "replicationcontrollers/scale"]},
            {"apiGroups": ["autoscaling"], "verbs": ["*"], "resources": ["horizontalpodautoscalers"]}
        ]),
        json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "deploylock:users"}]),
    );
    let replication_controller = json!({
        "apiVersion": "v1", "kind": "ReplicationController",
        "metadata": {"name": "side-door", "namespace": namespace},
        "spec": {"replicas": 3, "selector": {"app": "side-door"},
                 "template": {"metadata": {"labels": {"app": "side-door"}},
                              "spec": {"containers": [{"name": "app", "image": "example.invalid/app:2"}]}}}
    })
    .to_string();
    let autoscaler = json!({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                 "minReplicas": 50, "maxReplicas": 50}
    })
    .to_string();
    let create = |identity: Identity, manifest: &str| {
        cluster.kubectl_with_input(
            identity,
            &["create", "--dry-run=server", "-f", "-"],
            manifest,
        )
    };

    set_state(cluster, &gate, GateState::LockedByAlice);
    for (what, manifest) in [
        ("a ReplicationController", &replication_controller),
        (
            "a HorizontalPodAutoscaler of the locked Deployment",
            &autoscaler,
        ),
    ] {
        let refused = create(Identity::Bob, manifest);
        assert!(
            !refused.status.success(),
            "bob created {what} while alice held the lock"
        );
        assert!(
            stderr_of(&refused).contains("production is locked by alice"),
            "{what}: refused for another reason: {}",
            stderr_of(&refused)
        );
        ok(
            &create(Identity::Alice, manifest),
            &format!("the holder creates {what}"),
        );
    }

    set_state(cluster, &gate, GateState::Available);
    ok(
        &create(Identity::Bob, &replication_controller),
        "bob creates a ReplicationController once the lock is free",
    );
    ok(
        &create(Identity::Bob, &autoscaler),
        "bob creates an autoscaler once the lock is free",
    );
}

/// One user cannot fill a lock's queue (64 places) and lock everyone else
/// out of it: a write joins one place, and a user holds at most 8 places of
/// a queue. bob's ninth place is refused, carol still joins, and bob's own
/// heartbeats still pass.
#[tokio::test]
async fn one_user_cannot_fill_the_queue() {
    use deploylock::crd::MAX_QUEUE_PLACES_PER_USER;

    let cluster = cluster();
    let namespace = cluster.enforced_namespace("hostile-queue-fill").await;
    deploylock_ok(
        cluster,
        Identity::Alice,
        &namespace,
        &["-e", "production", "acquire", "--reason", "Deploying 2.2"],
    );
    let place = |user: &str, id: String| {
        let now = Utc::now();
        json!({
            "id": id, "user": user, "owner": user, "reason": "next deploy",
            "since": stamp(now), "heartbeatAt": stamp(now)
        })
    };
    let join = |user: &str, id: String, first: bool| {
        if first {
            Write::JsonPatch(
                json!([{ "op": "add", "path": "/spec/queue", "value": [place(user, id)] }]),
            )
        } else {
            Write::JsonPatch(
                json!([{ "op": "add", "path": "/spec/queue/-", "value": place(user, id) }]),
            )
        }
    };
    let bob = cluster.client(Identity::Bob).await;
    for i in 0..MAX_QUEUE_PLACES_PER_USER {
        assert_eq!(
            send_raw(
                &bob,
                &namespace,
                "production",
                &join("bob", format!("bob-{i}"), i == 0)
            )
            .await,
            Answer::Accepted,
            "bob's place {i}"
        );
    }
    let ninth = join("bob", "bob-more".to_string(), false);
    match send_raw(&bob, &namespace, "production", &ninth).await {
        Answer::Refused(message) => assert!(
            message.contains("at most 8 places"),
            "bob's ninth place refused for another reason: {message}"
        ),
        Answer::Accepted => panic!("bob's ninth place was accepted"),
    }
    let refused = send_kubectl(cluster, Identity::Bob, &namespace, "production", &ninth);
    assert_refused(&refused, "bob's ninth place", "kubectl");
    let carol = cluster.client(Identity::Carol).await;
    assert_eq!(
        send_raw(
            &carol,
            &namespace,
            "production",
            &join("carol", "carol-1".to_string(), false)
        )
        .await,
        Answer::Accepted,
        "carol joins after bob's eight places"
    );
    let Some(stored) = stored_json(cluster, &namespace, "production") else {
        panic!("production vanished");
    };
    let queue = stored["spec"]["queue"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(queue.len(), MAX_QUEUE_PLACES_PER_USER + 1, "{queue:?}");
    // bob still renews his own first place.
    let renew = Write::JsonPatch(
        json!([{ "op": "replace", "path": "/spec/queue/0/heartbeatAt",
        "value": stamp(Utc::now() + Duration::seconds(1)) }]),
    );
    assert_eq!(
        send_raw(&bob, &namespace, "production", &renew).await,
        Answer::Accepted,
        "bob renews his place"
    );
}
