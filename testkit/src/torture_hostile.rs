//! The torture run's hostile client (issue 12): while the honest clients
//! work, it reads a lock as alice, bob, carol (a deploylock admin) or the
//! controller's own credential and sends one write that is forbidden in the
//! state it read, drawn from the attack classes of hostile.rs: history
//! insert / reverse / erase / flush, forged entries, a token change without
//! a holding, a holding in another's name or until 2099, a non-holder's
//! release, the controller taking or clearing a live holding, queue jumping,
//! backdating and taking another's place, finalizers and ownerReferences,
//! oversized annotations, poison dates and forged creates.
//!
//! Every write carries the resourceVersion it was crafted for (a JSON patch
//! `test` op, the replaced object's resourceVersion, a delete precondition),
//! so the API server judges it against exactly the state it was made for: an
//! answer "accepted" is a hole in the enforcement, and a write that met a
//! newer object is counted as stale, not as refused. Writes go through raw
//! HTTP with kube-rs or through kubectl, with the field manager
//! `torture-hostile`, so that the torture's recorder can also tell from the
//! stored objects' managedFields whether one ever landed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::torture::Rng;

/// The field manager of every hostile write.
pub const HOSTILE_MANAGER: &str = "torture-hostile";

/// Names of the locks the hostile client tries to create.
pub const HOSTILE_CREATE_PREFIX: &str = "hostile-";

/// One identity the hostile client writes as.
#[derive(Clone, Debug)]
pub struct HostileIdentity {
    pub user: String,
    pub kubeconfig: PathBuf,
    /// Has the `force` verb (deploylock-admin).
    pub can_force: bool,
    /// The controller's credential (`reconcile`, no `force`).
    pub controller: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tool {
    /// kube-rs, raw HTTP requests (no deploylock code involved).
    Raw,
    Kubectl,
}

/// How the API server answered one hostile write.
#[derive(Clone, Debug)]
pub enum Answer {
    /// Stored (with the new resourceVersion): a hole in the enforcement.
    Accepted(String),
    /// Refused by the admission policy or RBAC (403).
    Forbidden(String),
    /// Refused by the schema (422).
    Invalid(String),
    /// The object had changed since the read (409, a failed `test` op, 404):
    /// not judged.
    Stale(String),
    /// No answer (a transport error or a 5xx during a fault).
    Unknown(String),
}

impl Answer {
    /// What the server (or the transport) said.
    pub fn text(&self) -> &str {
        match self {
            Answer::Accepted(text)
            | Answer::Forbidden(text)
            | Answer::Invalid(text)
            | Answer::Stale(text)
            | Answer::Unknown(text) => text,
        }
    }
}

/// One hostile write and its answer.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub attack: &'static str,
    pub user: String,
    pub tool: Tool,
    pub name: String,
    /// The resourceVersion the write was crafted for ("" for a create).
    pub resource_version: String,
    pub answer: Answer,
}

/// A write, as both tools send it.
#[derive(Clone, Debug)]
enum Write {
    /// RFC 6902 JSON patch (its first op tests the read resourceVersion).
    JsonPatch(Value),
    /// A whole-object replace carrying the read resourceVersion.
    Replace(Value),
    /// The same, of the status subresource.
    ReplaceStatus(Value),
    Create(Value),
    /// Delete with the read resourceVersion as precondition.
    Delete(String),
}

/// What an attack is crafted from.
struct Scene<'a> {
    object: &'a Value,
    me: &'a HostileIdentity,
    /// Another user than `me` (never the controller).
    other: &'a str,
    /// The API server's clock, read from this machine's (the local control
    /// plane shares it); attacks that a clock could make legitimate keep
    /// wide margins from it.
    now: DateTime<Utc>,
    resource_version: String,
}

impl Scene<'_> {
    fn spec(&self) -> &Value {
        &self.object["spec"]
    }

    fn history(&self) -> Vec<Value> {
        self.spec()["history"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn last_sequence(&self) -> i64 {
        self.history()
            .last()
            .and_then(|entry| entry["sequence"].as_i64())
            .unwrap_or(0)
    }

    fn next_sequence(&self) -> i64 {
        self.last_sequence().saturating_add(1)
    }

    fn token(&self) -> i64 {
        self.spec()["fencingToken"].as_i64().unwrap_or(0)
    }

    fn holder(&self) -> Option<&Value> {
        let holder = &self.spec()["holder"];
        holder.is_object().then_some(holder)
    }

    /// The holding, if it is live on any clock for at least 15 s more.
    fn live_holder(&self) -> Option<&Value> {
        self.holder().filter(|holder| {
            holder["expiresAt"]
                .as_str()
                .and_then(|text| text.parse::<DateTime<Utc>>().ok())
                .is_some_and(|expiry| expiry > self.now + Duration::seconds(15))
        })
    }

    fn queue(&self) -> Vec<Value> {
        self.spec()["queue"].as_array().cloned().unwrap_or_default()
    }

    /// Queue places whose heartbeat is at most 5 s old: live for the policy
    /// (which drops a place 15 s after its heartbeat) for 10 s more.
    fn fresh_places(&self) -> Vec<(usize, Value)> {
        self.queue()
            .into_iter()
            .enumerate()
            .filter(|(_, place)| {
                place["heartbeatAt"]
                    .as_str()
                    .and_then(|text| text.parse::<DateTime<Utc>>().ok())
                    .is_some_and(|beat| beat >= self.now - Duration::seconds(5))
            })
            .collect()
    }

    /// A JSON patch guarded by the read resourceVersion.
    fn patch(&self, ops: Vec<Value>) -> Write {
        let mut all = vec![json!({
            "op": "test", "path": "/metadata/resourceVersion", "value": self.resource_version
        })];
        all.extend(ops);
        Write::JsonPatch(Value::Array(all))
    }

    /// Appends `entry` to the history (creating it if absent).
    fn history_add(&self, entry: Value) -> Value {
        if self.spec()["history"].is_array() {
            json!({ "op": "add", "path": "/spec/history/-", "value": entry })
        } else {
            json!({ "op": "add", "path": "/spec/history", "value": [entry] })
        }
    }

    /// Appends `place` to the wait queue (creating it if absent).
    fn queue_add(&self, place: Value) -> Value {
        if self.spec()["queue"].is_array() {
            json!({ "op": "add", "path": "/spec/queue/-", "value": place })
        } else {
            json!({ "op": "add", "path": "/spec/queue", "value": [place] })
        }
    }

    /// The read object changed by `change`, for a replace (managedFields are
    /// left to the server, which then records the hostile field manager).
    fn replaced(&self, change: impl FnOnce(&mut Value)) -> Value {
        let mut copy = self.object.clone();
        if let Some(metadata) = copy["metadata"].as_object_mut() {
            metadata.remove("managedFields");
        }
        change(&mut copy);
        copy
    }
}

pub fn stamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A holding in `user`'s name starting at `now`, 30 minutes long.
pub fn holding(user: &str, lock_type: &str, now: DateTime<Utc>) -> Value {
    json!({
        "lockId": uuid::Uuid::new_v4().to_string(),
        "user": user,
        "owner": user,
        "type": lock_type,
        "reason": "hostile torture",
        "acquiredAt": stamp(now),
        "expiresAt": stamp(now + Duration::minutes(30)),
        "durationSeconds": 1800
    })
}

pub fn entry_for(
    sequence: i64,
    action: &str,
    holder: &Value,
    by: &str,
    at: DateTime<Utc>,
) -> Value {
    json!({
        "sequence": sequence,
        "action": action,
        "at": stamp(at),
        "lockId": holder["lockId"],
        "by": by,
        "owner": holder["owner"],
        "reason": holder["reason"],
        "expiresAt": holder["expiresAt"],
    })
}

/// A queue place in `user`'s name, dated `since`, last renewed `beat`.
fn place(user: &str, since: DateTime<Utc>, beat: DateTime<Utc>) -> Value {
    json!({
        "id": format!("{user}-hostile-{}", uuid::Uuid::new_v4()),
        "user": user, "owner": user, "reason": "hostile torture",
        "since": stamp(since), "heartbeatAt": stamp(beat)
    })
}

/// The token of a lock object created at `now`, as the CLI takes it
/// (before its first holding adds one).
pub fn first_token(now: DateTime<Utc>) -> i64 {
    deploylock::rules::first_fencing_token(now).unwrap_or_else(|refusal| panic!("{refusal}"))
}

/// A whole new lock held by `user`, as `deploylock acquire` creates it.
pub fn new_lock(name: &str, user: &str, now: DateTime<Utc>) -> Value {
    let holder = holding(user, "manual", now);
    let entry = entry_for(1, "Acquired", &holder, user, now);
    let token = first_token(now) + 1;
    json!({
        "apiVersion": "deploylock.dev/v1",
        "kind": "DeploymentLock",
        "metadata": { "name": name },
        "spec": { "environment": name, "fencingToken": token, "holder": holder, "history": [entry] }
    })
}

type Craft = fn(&Scene<'_>) -> Option<Write>;

/// Every attack: its name and how it is crafted from a scene; `None` where
/// the scene does not allow it to be forbidden for sure.
fn attacks() -> Vec<(&'static str, Craft)> {
    vec![
        ("insert a history entry at history[0]", |s| {
            let last = s.history().last().cloned()?;
            let mut forged = last;
            forged["sequence"] = json!(s.next_sequence());
            forged["by"] = json!(s.me.user);
            forged["at"] = json!(stamp(s.now));
            Some(s.patch(vec![
                json!({ "op": "add", "path": "/spec/history/0", "value": forged }),
            ]))
        }),
        ("reverse the history", |s| {
            let mut entries = s.history();
            if entries.len() < 2 {
                return None;
            }
            entries.reverse();
            Some(s.patch(vec![
                json!({ "op": "replace", "path": "/spec/history", "value": entries }),
            ]))
        }),
        ("erase the history", |s| {
            (!s.history().is_empty())
                .then(|| s.patch(vec![json!({ "op": "remove", "path": "/spec/history" })]))
        }),
        ("remove the newest history entry", |s| {
            let last = s.history().len().checked_sub(1)?;
            Some(s.patch(vec![
                json!({ "op": "remove", "path": format!("/spec/history/{last}") }),
            ]))
        }),
        ("flush the history with 20 entries in one write", |s| {
            let holder = s
                .holder()
                .cloned()
                .unwrap_or_else(|| holding(&s.me.user, "manual", s.now));
            let first = s.next_sequence();
            let entries: Vec<Value> = (0..20)
                .map(|i| {
                    entry_for(
                        first.saturating_add(i),
                        "Extended",
                        &holder,
                        &s.me.user,
                        s.now,
                    )
                })
                .collect();
            Some(s.patch(vec![
                json!({ "op": "replace", "path": "/spec/history", "value": entries }),
            ]))
        }),
        ("a forged ForceAcquired entry without a new holding", |s| {
            let holder = s
                .holder()
                .cloned()
                .unwrap_or_else(|| holding(&s.me.user, "emergency", s.now));
            let forged = entry_for(
                s.next_sequence(),
                "ForceAcquired",
                &holder,
                &s.me.user,
                s.now,
            );
            Some(s.patch(vec![s.history_add(forged)]))
        }),
        ("a history entry in another user's name", |s| {
            let holder = s.holder()?;
            let forged = entry_for(s.next_sequence(), "Extended", holder, s.other, s.now);
            Some(s.patch(vec![s.history_add(forged)]))
        }),
        ("the fencing token moves without a new holding", |s| {
            Some(s.patch(vec![json!({
                "op": "add", "path": "/spec/fencingToken", "value": s.token().saturating_add(1)
            })]))
        }),
        ("a history entry numbered 2^63-1", |s| {
            let holder = s
                .holder()
                .cloned()
                .unwrap_or_else(|| holding(&s.me.user, "manual", s.now));
            let forged = entry_for(i64::MAX, "Extended", &holder, &s.me.user, s.now);
            Some(s.patch(vec![s.history_add(forged)]))
        }),
        ("a finalizer set by a non-admin", |s| {
            (!s.me.can_force).then(|| {
                s.patch(vec![json!({
                    "op": "add", "path": "/metadata/finalizers", "value": ["example.com/stuck"]
                })])
            })
        }),
        ("a dangling ownerReference set by a non-admin", |s| {
            (!s.me.can_force).then(|| {
                s.patch(vec![
                    json!({ "op": "add", "path": "/metadata/ownerReferences", "value": [{
                    "apiVersion": "v1", "kind": "ConfigMap", "name": "gone",
                    "uid": "00000000-0000-0000-0000-000000000000"
                }] }),
                ])
            })
        }),
        ("an annotation over 64 KiB", |s| {
            Some(s.patch(vec![json!({
                "op": "add", "path": "/metadata/annotations",
                "value": { "example.com/blob": "x".repeat(66 * 1024) }
            })]))
        }),
        ("a user writes status", |s| {
            (!s.me.can_force && !s.me.controller).then(|| {
                Write::ReplaceStatus(s.replaced(|copy| {
                    copy["status"] = json!({ "state": "Expired" });
                }))
            })
        }),
        ("a history entry with a poison date", |s| {
            let holder = s
                .holder()
                .cloned()
                .unwrap_or_else(|| holding(&s.me.user, "manual", s.now));
            let mut forged = entry_for(s.next_sequence(), "Extended", &holder, &s.me.user, s.now);
            forged["at"] = json!("2030-01-01T00:00:00ZT");
            Some(s.patch(vec![s.history_add(forged)]))
        }),
        ("a queue place with a poison date", |s| {
            let mut forged = place(&s.me.user, s.now, s.now);
            forged["since"] = json!("2030-01-01T00:00:00,5Z");
            forged["heartbeatAt"] = json!("2030-01-01T00:00:00,5Z");
            Some(s.patch(vec![s.queue_add(forged)]))
        }),
        // --- on a live holding ---
        ("extend the holding to 2099", |s| {
            let holder = s.live_holder()?;
            let far = "2099-01-01T00:00:00Z";
            let mut entry = entry_for(s.next_sequence(), "Extended", holder, &s.me.user, s.now);
            entry["expiresAt"] = json!(far);
            Some(s.patch(vec![
                json!({ "op": "add", "path": "/spec/holder/expiresAt", "value": far }),
                s.history_add(entry),
            ]))
        }),
        ("a non-holder releases in the holder's name", |s| {
            let holder = s.live_holder()?;
            let user = holder["user"].as_str()?;
            if user == s.me.user {
                return None;
            }
            let entry = entry_for(s.next_sequence(), "Released", holder, user, s.now);
            Some(s.patch(vec![
                json!({ "op": "remove", "path": "/spec/holder" }),
                s.history_add(entry),
            ]))
        }),
        ("a non-holder releases as itself", |s| {
            let holder = s.live_holder()?;
            if holder["user"].as_str() == Some(s.me.user.as_str()) {
                return None;
            }
            let entry = entry_for(s.next_sequence(), "Released", holder, &s.me.user, s.now);
            Some(s.patch(vec![
                json!({ "op": "remove", "path": "/spec/holder" }),
                s.history_add(entry),
            ]))
        }),
        ("take over a live holding as if it had expired", |s| {
            s.live_holder()?;
            let taken = holding(&s.me.user, "manual", s.now);
            let entry = entry_for(
                s.next_sequence(),
                "TookOverExpired",
                &taken,
                &s.me.user,
                s.now,
            );
            Some(Write::Replace(s.replaced(|copy| {
                copy["spec"]["holder"] = taken;
                copy["spec"]["fencingToken"] = json!(s.token().saturating_add(1));
                if let Some(entries) = copy["spec"]["history"].as_array_mut() {
                    entries.push(entry);
                }
            })))
        }),
        ("the controller clears a live holding", |s| {
            let holder = s.live_holder()?.clone();
            if !s.me.controller {
                return None;
            }
            let entry = entry_for(s.next_sequence(), "Cleared", &holder, &s.me.user, s.now);
            Some(s.patch(vec![
                json!({ "op": "remove", "path": "/spec/holder" }),
                s.history_add(entry),
            ]))
        }),
        ("the holder moves acquiredAt back", |s| {
            let holder = s.live_holder()?;
            if holder["user"].as_str() != Some(s.me.user.as_str()) {
                return None;
            }
            let entry = entry_for(s.next_sequence(), "Extended", holder, &s.me.user, s.now);
            Some(s.patch(vec![
                json!({ "op": "add", "path": "/spec/holder/acquiredAt", "value": stamp(s.now - Duration::days(3)) }),
                s.history_add(entry),
            ]))
        }),
        ("force-acquire without the force permission", |s| {
            let old = s.live_holder()?.clone();
            if s.me.can_force {
                return None;
            }
            let mut taken = holding(&s.me.user, "emergency", s.now);
            taken["overrode"] = json!({
                "lockId": old["lockId"], "user": old["user"], "owner": old["owner"], "reason": old["reason"]
            });
            let entry = entry_for(
                s.next_sequence(),
                "ForceAcquired",
                &taken,
                &s.me.user,
                s.now,
            );
            Some(Write::Replace(s.replaced(|copy| {
                copy["spec"]["holder"] = taken;
                copy["spec"]["fencingToken"] = json!(s.token().saturating_add(1));
                if let Some(entries) = copy["spec"]["history"].as_array_mut() {
                    entries.push(entry);
                }
            })))
        }),
        ("replace the holding without a history entry", |s| {
            s.live_holder()?;
            let taken = holding(&s.me.user, "emergency", s.now);
            Some(Write::Replace(s.replaced(|copy| {
                copy["spec"]["holder"] = taken;
                copy["spec"]["fencingToken"] = json!(s.token().saturating_add(1));
            })))
        }),
        ("force-acquire without increasing the fencing token", |s| {
            let old = s.live_holder()?.clone();
            let mut taken = holding(&s.me.user, "emergency", s.now);
            taken["overrode"] = json!({
                "lockId": old["lockId"], "user": old["user"], "owner": old["owner"], "reason": old["reason"]
            });
            let entry = entry_for(
                s.next_sequence(),
                "ForceAcquired",
                &taken,
                &s.me.user,
                s.now,
            );
            Some(Write::Replace(s.replaced(|copy| {
                copy["spec"]["holder"] = taken;
                if let Some(entries) = copy["spec"]["history"].as_array_mut() {
                    entries.push(entry);
                }
            })))
        }),
        ("a non-holder deletes a live holding", |s| {
            let holder = s.live_holder()?;
            (!s.me.can_force && holder["user"].as_str() != Some(s.me.user.as_str()))
                .then(|| Write::Delete(s.resource_version.clone()))
        }),
        // --- on a free lock ---
        ("take the free lock in another user's name", |s| {
            if s.holder().is_some() {
                return None;
            }
            let taken = holding(s.other, "manual", s.now);
            let entry = entry_for(s.next_sequence(), "Acquired", &taken, &s.me.user, s.now);
            Some(s.patch(vec![
                json!({ "op": "add", "path": "/spec/holder", "value": taken }),
                json!({ "op": "add", "path": "/spec/fencingToken", "value": s.token().saturating_add(1) }),
                s.history_add(entry),
            ]))
        }),
        (
            "take the free lock without increasing the fencing token",
            |s| {
                if s.holder().is_some() {
                    return None;
                }
                let taken = holding(&s.me.user, "manual", s.now);
                let entry = entry_for(s.next_sequence(), "Acquired", &taken, &s.me.user, s.now);
                Some(s.patch(vec![
                    json!({ "op": "add", "path": "/spec/holder", "value": taken }),
                    s.history_add(entry),
                ]))
            },
        ),
        ("take the free lock until 2099", |s| {
            if s.holder().is_some() {
                return None;
            }
            let mut taken = holding(&s.me.user, "manual", s.now);
            taken["expiresAt"] = json!("2099-01-01T00:00:00Z");
            let entry = entry_for(s.next_sequence(), "Acquired", &taken, &s.me.user, s.now);
            Some(s.patch(vec![
                json!({ "op": "add", "path": "/spec/holder", "value": taken }),
                json!({ "op": "add", "path": "/spec/fencingToken", "value": s.token().saturating_add(1) }),
                s.history_add(entry),
            ]))
        }),
        ("take the free lock dated a day ago", |s| {
            if s.holder().is_some() {
                return None;
            }
            let then = s.now - Duration::days(1);
            let taken = holding(&s.me.user, "manual", then);
            let entry = entry_for(s.next_sequence(), "Acquired", &taken, &s.me.user, then);
            Some(s.patch(vec![
                json!({ "op": "add", "path": "/spec/holder", "value": taken }),
                json!({ "op": "add", "path": "/spec/fencingToken", "value": s.token().saturating_add(1) }),
                s.history_add(entry),
            ]))
        }),
        ("the controller takes the free lock", |s| {
            if s.holder().is_some() || !s.me.controller {
                return None;
            }
            let taken = holding(&s.me.user, "manual", s.now);
            let entry = entry_for(s.next_sequence(), "Acquired", &taken, &s.me.user, s.now);
            Some(s.patch(vec![
                json!({ "op": "add", "path": "/spec/holder", "value": taken }),
                json!({ "op": "add", "path": "/spec/fencingToken", "value": s.token().saturating_add(1) }),
                s.history_add(entry),
            ]))
        }),
        (
            "jump the queue: take the free lock while others wait",
            |s| {
                let fresh = s.fresh_places();
                if s.holder().is_some()
                    || fresh.is_empty()
                    || s.queue()
                        .iter()
                        .any(|p| p["user"].as_str() == Some(s.me.user.as_str()))
                {
                    return None;
                }
                let taken = holding(&s.me.user, "manual", s.now);
                let entry = entry_for(s.next_sequence(), "Acquired", &taken, &s.me.user, s.now);
                Some(s.patch(vec![
                json!({ "op": "add", "path": "/spec/holder", "value": taken }),
                json!({ "op": "add", "path": "/spec/fencingToken", "value": s.token().saturating_add(1) }),
                s.history_add(entry),
            ]))
            },
        ),
        // --- the wait queue ---
        ("join the queue in another user's name", |s| {
            Some(s.patch(vec![s.queue_add(place(s.other, s.now, s.now))]))
        }),
        ("join the queue with a backdated since", |s| {
            Some(s.patch(vec![s.queue_add(place(
                &s.me.user,
                s.now - Duration::days(1),
                s.now,
            ))]))
        }),
        ("join the queue at its front", |s| {
            if s.queue().is_empty() {
                return None;
            }
            Some(s.patch(vec![json!({
                "op": "add", "path": "/spec/queue/0", "value": place(&s.me.user, s.now, s.now)
            })]))
        }),
        ("take another's queue place", |s| {
            let (index, _) = s
                .queue()
                .into_iter()
                .enumerate()
                .find(|(_, p)| p["user"].as_str() != Some(s.me.user.as_str()))?;
            Some(s.patch(vec![json!({
                "op": "replace", "path": format!("/spec/queue/{index}/user"), "value": s.me.user
            })]))
        }),
        ("remove another's live queue place", |s| {
            // An admin with the force permission may remove any place.
            if s.me.can_force {
                return None;
            }
            let (index, _) = s
                .fresh_places()
                .into_iter()
                .find(|(_, p)| p["user"].as_str() != Some(s.me.user.as_str()))?;
            Some(s.patch(vec![
                json!({ "op": "remove", "path": format!("/spec/queue/{index}") }),
            ]))
        }),
        ("backdate one's own queue place", |s| {
            let (index, _) = s
                .queue()
                .into_iter()
                .enumerate()
                .find(|(_, p)| p["user"].as_str() == Some(s.me.user.as_str()))?;
            Some(s.patch(vec![json!({
                "op": "replace", "path": format!("/spec/queue/{index}/since"),
                "value": "2020-01-01T00:00:00Z"
            })]))
        }),
        ("the controller joins the queue", |s| {
            s.me.controller
                .then(|| s.patch(vec![s.queue_add(place(&s.me.user, s.now, s.now))]))
        }),
    ]
}

/// Forged creates of a lock of its own (never a torture environment).
/// Makes a forged lock named `name` as `me`, `other` being another user.
type MakeLock = fn(&str, &HostileIdentity, DateTime<Utc>, &str) -> Option<Value>;

fn bad_creates() -> Vec<(&'static str, MakeLock)> {
    vec![
        ("create with fencing token 1", |name, me, now, _| {
            let mut lock = new_lock(name, &me.user, now);
            lock["spec"]["fencingToken"] = json!(1);
            Some(lock)
        }),
        (
            "create with a history sequence of 2^63-1",
            |name, me, now, _| {
                let mut lock = new_lock(name, &me.user, now);
                lock["spec"]["history"][0]["sequence"] = json!(i64::MAX);
                Some(lock)
            },
        ),
        ("create a holding until 9999", |name, me, now, _| {
            let mut lock = new_lock(name, &me.user, now);
            lock["spec"]["holder"]["expiresAt"] = json!("9999-12-31T23:59:59Z");
            lock["spec"]["history"][0]["expiresAt"] = json!("9999-12-31T23:59:59Z");
            Some(lock)
        }),
        (
            "create a holding in another user's name",
            |name, _, now, other| Some(new_lock(name, other, now)),
        ),
        (
            "create with a forged history of several entries",
            |name, me, now, _| {
                let mut lock = new_lock(name, &me.user, now);
                let holder = lock["spec"]["holder"].clone();
                lock["spec"]["history"] = json!([
                    entry_for(1, "ForceReleased", &holder, "carol", now),
                    entry_for(2, "Acquired", &holder, &me.user, now)
                ]);
                Some(lock)
            },
        ),
        (
            "create an emergency holding without the force permission",
            |name, me, now, _| {
                if me.can_force {
                    return None;
                }
                let mut lock = new_lock(name, &me.user, now);
                lock["spec"]["holder"]["type"] = json!("emergency");
                lock["spec"]["history"][0]["action"] = json!("ForceAcquired");
                Some(lock)
            },
        ),
        (
            "create with a finalizer as a non-admin",
            |name, me, now, _| {
                if me.can_force {
                    return None;
                }
                let mut lock = new_lock(name, &me.user, now);
                lock["metadata"]["finalizers"] = json!(["example.com/stuck"]);
                Some(lock)
            },
        ),
    ]
}

/// What the hostile client needs to run.
pub struct HostilePlan {
    pub namespace: String,
    pub identities: Vec<HostileIdentity>,
    pub environments: usize,
    pub kubectl: PathBuf,
    pub deadline: Instant,
    /// Pause between two writes.
    pub pause: StdDuration,
    /// Carry on past the deadline (30 s at most) until the server has
    /// judged (refused or accepted) this many writes.
    pub at_least: usize,
}

/// A client of `kubeconfig` with short timeouts (a torture client must
/// notice a dead connection within seconds).
pub(crate) async fn client_for(kubeconfig: &Path) -> Client {
    let file = Kubeconfig::read_from(kubeconfig).unwrap_or_else(|err| panic!("{err}"));
    let mut config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    config.connect_timeout = Some(StdDuration::from_secs(2));
    config.read_timeout = Some(StdDuration::from_secs(10));
    Client::try_from(config).unwrap_or_else(|err| panic!("{err}"))
}

fn collection_url(namespace: &str) -> String {
    format!("/apis/deploylock.dev/v1/namespaces/{namespace}/deploymentlocks")
}

/// Reads a lock as raw JSON (None if absent or unreadable).
async fn read(client: &Client, namespace: &str, name: &str) -> Option<Value> {
    let request = http::Request::get(format!("{}/{name}", collection_url(namespace)))
        .body(Vec::new())
        .ok()?;
    client.request::<Value>(request).await.ok()
}

/// A JSON patch the server could not apply says why only in the status's
/// causes ("the server rejected our request due to an error in our request").
fn classify_status(status: &kube::core::Status) -> Answer {
    let causes: Vec<&str> = status
        .details
        .iter()
        .flat_map(|details| details.causes.iter())
        .map(|cause| cause.message.as_str())
        .collect();
    let message = if causes.is_empty() {
        status.message.clone()
    } else {
        format!("{} ({})", status.message, causes.join("; "))
    };
    match status.code {
        403 => Answer::Forbidden(message),
        409 | 404 => Answer::Stale(message),
        // The server gives no cause for a patch it could not apply; with
        // the resourceVersion test first, that is the lock having moved on.
        422 if message.contains("test failed") || message.contains("an error in our request") => {
            Answer::Stale(message)
        }
        422 if message.contains("is invalid") => Answer::Invalid(message),
        code => Answer::Unknown(format!("{code}: {message}")),
    }
}

async fn send_raw(client: &Client, namespace: &str, name: &str, write: &Write) -> Answer {
    let manager = format!("?fieldManager={HOSTILE_MANAGER}");
    let object = format!("{}/{name}", collection_url(namespace));
    let (method, url, content_type, body) = match write {
        Write::JsonPatch(patch) => (
            http::Method::PATCH,
            format!("{object}{manager}"),
            "application/json-patch+json",
            patch.to_string(),
        ),
        Write::Replace(value) => (
            http::Method::PUT,
            format!("{object}{manager}"),
            "application/json",
            value.to_string(),
        ),
        Write::ReplaceStatus(value) => (
            http::Method::PUT,
            format!("{object}/status{manager}"),
            "application/json",
            value.to_string(),
        ),
        Write::Create(value) => (
            http::Method::POST,
            format!("{}{manager}", collection_url(namespace)),
            "application/json",
            value.to_string(),
        ),
        Write::Delete(resource_version) => (
            http::Method::DELETE,
            object,
            "application/json",
            json!({
                "apiVersion": "v1", "kind": "DeleteOptions",
                "preconditions": { "resourceVersion": resource_version }
            })
            .to_string(),
        ),
    };
    let request = match http::Request::builder()
        .method(method)
        .uri(url)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(body.into_bytes())
    {
        Ok(request) => request,
        Err(err) => return Answer::Unknown(format!("cannot build the request: {err}")),
    };
    match client.request::<Value>(request).await {
        Ok(stored) => Answer::Accepted(
            stored["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("(deleted)")
                .to_string(),
        ),
        Err(kube::Error::Api(status)) => classify_status(&status),
        Err(err) => Answer::Unknown(err.to_string()),
    }
}

async fn send_kubectl(
    kubectl: &PathBuf,
    me: &HostileIdentity,
    namespace: &str,
    name: &str,
    write: &Write,
) -> Answer {
    let manager = format!("--field-manager={HOSTILE_MANAGER}");
    let rv = "jsonpath={.metadata.resourceVersion}";
    // The server judges, not kubectl's own validation (which also needs the
    // OpenAPI document, unavailable while the server restarts).
    let validate = "--validate=false";
    let (args, input): (Vec<String>, Option<String>) = match write {
        Write::JsonPatch(patch) => (
            vec![
                "patch".into(),
                "deploymentlock".into(),
                name.into(),
                "--type=json".into(),
                "-p".into(),
                patch.to_string(),
                manager,
                "-o".into(),
                rv.into(),
            ],
            None,
        ),
        Write::Replace(value) => (
            vec![
                "replace".into(),
                "-f".into(),
                "-".into(),
                validate.into(),
                manager,
                "-o".into(),
                rv.into(),
            ],
            Some(value.to_string()),
        ),
        Write::ReplaceStatus(value) => (
            vec![
                "replace".into(),
                "--subresource=status".into(),
                "-f".into(),
                "-".into(),
                validate.into(),
                manager,
                "-o".into(),
                rv.into(),
            ],
            Some(value.to_string()),
        ),
        Write::Create(value) => (
            vec![
                "create".into(),
                "-f".into(),
                "-".into(),
                validate.into(),
                manager,
                "-o".into(),
                rv.into(),
            ],
            Some(value.to_string()),
        ),
        // kubectl has no resourceVersion precondition for delete.
        Write::Delete(_) => return Answer::Unknown("kubectl cannot send this delete".into()),
    };
    let mut command = tokio::process::Command::new(kubectl);
    command
        .arg("--kubeconfig")
        .arg(&me.kubeconfig)
        .args(["-n", namespace, "--request-timeout=10s"])
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => return Answer::Unknown(format!("cannot run kubectl: {err}")),
    };
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        use tokio::io::AsyncWriteExt;
        let _ = stdin.write_all(input.as_bytes()).await;
    }
    let output = match child.wait_with_output().await {
        Ok(output) => output,
        Err(err) => return Answer::Unknown(format!("kubectl: {err}")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if output.status.success() {
        return Answer::Accepted(stdout);
    }
    // See classify_status: a patch the server could not apply.
    if stderr.contains("test failed")
        || stderr.contains("an error in our request")
        || stderr.contains("(Conflict)")
        || stderr.contains("the object has been modified")
        || stderr.contains("(NotFound)")
    {
        Answer::Stale(stderr)
    } else if stderr.contains("(Forbidden)") {
        Answer::Forbidden(stderr)
    } else if stderr.contains("is invalid") || stderr.contains("(Invalid)") {
        Answer::Invalid(stderr)
    } else {
        Answer::Unknown(stderr)
    }
}

/// Runs the hostile client until the deadline; every write and its answer
/// goes to `log`.
pub async fn hostile_client(plan: HostilePlan, mut rng: Rng, log: Arc<Mutex<Vec<Attempt>>>) {
    let mut clients = Vec::new();
    for identity in &plan.identities {
        clients.push(client_for(&identity.kubeconfig).await);
    }
    let users: Vec<&str> = plan
        .identities
        .iter()
        .filter(|identity| !identity.controller)
        .map(|identity| identity.user.as_str())
        .collect();
    let attacks = attacks();
    let creates = bad_creates();
    let mut created = 0u64;
    let mut judged = 0usize;
    let last_call = plan.deadline + StdDuration::from_secs(30);
    while Instant::now() < plan.deadline || (judged < plan.at_least && Instant::now() < last_call) {
        tokio::time::sleep(plan.pause).await;
        let pick = rng.below(plan.identities.len() as u64) as usize;
        let (Some(me), Some(client)) = (plan.identities.get(pick), clients.get(pick)) else {
            continue;
        };
        let other = users
            .iter()
            .copied()
            .find(|user| *user != me.user.as_str())
            .unwrap_or("mallory");
        let tool = if rng.below(4) == 0 {
            Tool::Kubectl
        } else {
            Tool::Raw
        };
        let now = Utc::now();
        let (attack, name, resource_version, write) = if rng.below(12) == 0 {
            let (attack, make) = &creates[rng.below(creates.len() as u64) as usize];
            created = created.saturating_add(1);
            let name = format!("{HOSTILE_CREATE_PREFIX}{created}");
            let Some(object) = make(&name, me, now, other) else {
                continue;
            };
            (*attack, name, String::new(), Write::Create(object))
        } else {
            let name = format!("t{}", rng.below(plan.environments as u64));
            let Some(object) = read(client, &plan.namespace, &name).await else {
                continue;
            };
            let resource_version = object["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let scene = Scene {
                object: &object,
                me,
                other,
                now: Utc::now(),
                resource_version: resource_version.clone(),
            };
            let possible: Vec<(&'static str, Write)> = attacks
                .iter()
                .filter_map(|(attack, craft)| craft(&scene).map(|write| (*attack, write)))
                .collect();
            if possible.is_empty() {
                continue;
            }
            let (attack, write) = possible[rng.below(possible.len() as u64) as usize].clone();
            (attack, name, resource_version, write)
        };
        // kubectl cannot guard a delete by the resourceVersion.
        let tool = if matches!(write, Write::Delete(_)) {
            Tool::Raw
        } else {
            tool
        };
        let answer = match tool {
            Tool::Raw => send_raw(client, &plan.namespace, &name, &write).await,
            Tool::Kubectl => send_kubectl(&plan.kubectl, me, &plan.namespace, &name, &write).await,
        };
        if !matches!(answer, Answer::Stale(_) | Answer::Unknown(_)) {
            judged += 1;
        }
        if let Ok(mut log) = log.lock() {
            log.push(Attempt {
                attack,
                user: me.user.clone(),
                tool,
                name,
                resource_version,
                answer,
            });
        }
    }
}

/// Answers per kind (for the report).
pub fn summary(attempts: &[Attempt]) -> String {
    let (mut accepted, mut forbidden, mut invalid, mut stale, mut unknown) = (0, 0, 0, 0, 0);
    let mut kubectl = 0;
    for attempt in attempts {
        match attempt.answer {
            Answer::Accepted(_) => accepted += 1,
            Answer::Forbidden(_) => forbidden += 1,
            Answer::Invalid(_) => invalid += 1,
            Answer::Stale(_) => stale += 1,
            Answer::Unknown(_) => unknown += 1,
        }
        if attempt.tool == Tool::Kubectl {
            kubectl += 1;
        }
    }
    let classes: std::collections::BTreeSet<&str> = attempts
        .iter()
        .filter(|a| matches!(a.answer, Answer::Forbidden(_) | Answer::Invalid(_)))
        .map(|a| a.attack)
        .collect();
    let first_unanswered = attempts
        .iter()
        .find(|a| matches!(a.answer, Answer::Unknown(_)))
        .map(|a| {
            format!(
                " (first unanswered: {:?} through {:?}: {})",
                a.attack,
                a.tool,
                a.answer.text()
            )
        })
        .unwrap_or_default();
    format!(
        "{} hostile writes ({kubectl} through kubectl, the rest raw HTTP), {} kinds of attack refused: {forbidden} refused by the policy or RBAC (403), {invalid} by the schema (422), {stale} stale (the lock had moved on), {unknown} unanswered{first_unanswered}, {accepted} accepted",
        attempts.len(),
        classes.len()
    )
}

/// Answers per attack: refused (403 or 422) / stale / unanswered / accepted
/// (for the long run's report).
pub fn by_attack(attempts: &[Attempt]) -> String {
    let mut table: std::collections::BTreeMap<&str, [usize; 4]> = Default::default();
    for attempt in attempts {
        let row = table.entry(attempt.attack).or_default();
        let column = match attempt.answer {
            Answer::Forbidden(_) | Answer::Invalid(_) => 0,
            Answer::Stale(_) => 1,
            Answer::Unknown(_) => 2,
            Answer::Accepted(_) => 3,
        };
        row[column] += 1;
    }
    table
        .iter()
        .map(|(attack, [refused, stale, unknown, accepted])| {
            format!("  {attack}: {refused} refused, {stale} stale, {unknown} unanswered, {accepted} accepted")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every accepted hostile write, as a violation.
pub fn violations(attempts: &[Attempt]) -> Vec<String> {
    attempts
        .iter()
        .filter_map(|attempt| match &attempt.answer {
            Answer::Accepted(resource_version) => Some(format!(
                "hostile write accepted: {} as {} through {:?} on {} (read at resourceVersion {:?}, stored as {resource_version:?})",
                attempt.attack, attempt.user, attempt.tool, attempt.name, attempt.resource_version
            )),
            _ => None,
        })
        .collect()
}
