//! Stored objects as the API server returns them, for the unit tests. Every
//! user-written string ends in `tag`: nothing for a plain object, terminal
//! escapes for a hostile one.

use serde_json::{Value, json};

/// A holding taken at 2030-01-01T00:00:00Z for 30 minutes.
pub fn holder(tag: &str) -> Value {
    json!({
        "lockId": format!("id{tag}"),
        "user": format!("user{tag}"),
        "owner": format!("owner{tag}"),
        "type": "manual",
        "reason": format!("reason{tag}"),
        "acquiredAt": "2030-01-01T00:00:00Z",
        "expiresAt": "2030-01-01T00:30:00Z",
        "durationSeconds": 1800
    })
}

/// carol, waiting since a minute after the holding started.
pub fn waiter(tag: &str) -> Value {
    json!({
        "id": "w1",
        "user": "carol",
        "owner": format!("waiter{tag}"),
        "reason": format!("waiting{tag}"),
        "since": "2030-01-01T00:01:00Z",
        "heartbeatAt": "2030-01-01T00:01:00Z"
    })
}

/// The history entry of [`holder`]'s acquisition.
pub fn acquired_entry(tag: &str) -> Value {
    json!({
        "sequence": 1,
        "action": "Acquired",
        "at": "2030-01-01T00:00:00Z",
        "lockId": format!("id{tag}"),
        "by": format!("by{tag}"),
        "owner": format!("owner{tag}"),
        "reason": format!("reason{tag}"),
        "expiresAt": "2030-01-01T00:30:00Z"
    })
}
