//! The one place where errors become a message and an exit code.

use std::process::ExitCode;

use chrono::{DateTime, Utc};

use crate::crd::LockHolder;
use crate::error::Error;
use crate::rules::Refusal;
use crate::store::MalformedLock;

use super::render::escape;

/// Exit codes, stable: CI scripts branch on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0: the action succeeded.
    Success,
    /// 1: an unexpected failure (an API error not listed below, too much
    /// contention, a malformed lock; `list`: a malformed lock was skipped).
    Failure,
    /// 2: invalid input: a bad flag, name, duration, metadata, or an object
    /// the API server's validation refused. Nothing was changed.
    InvalidInput,
    /// 3: the lock is held by someone else (or already by you).
    Held,
    /// 4: `--wait-timeout` passed before the lock became free.
    WaitTimeout,
    /// 5: not the holder, or the API server forbade the request.
    Forbidden,
    /// 6: the cluster is unreachable or not configured, or the CRD is not installed.
    Unreachable,
    /// 7: the caller's holding is over (released by someone else, taken
    /// over, expired).
    LockLost,
    /// 8: `exec`: the command ended but the lock could not be released (it
    /// stays held until it expires).
    NotReleased,
    /// 130: interrupted by a signal while acquiring or waiting.
    Interrupted,
    /// `exec`: the command's own exit code.
    Child(i32),
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::InvalidInput => 2,
            Exit::Held => 3,
            Exit::WaitTimeout => 4,
            Exit::Forbidden => 5,
            Exit::Unreachable => 6,
            Exit::LockLost => 7,
            Exit::NotReleased => 8,
            Exit::Interrupted => 130,
            Exit::Child(code) => u8::try_from(code).unwrap_or(1),
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

/// The exit code table shown in `--help` and the README.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  unexpected failure, or a malformed lock (list: one was skipped)
  2  invalid input (nothing was changed)
  3  the lock is held by someone else
  4  --wait-timeout passed before the lock became free
  5  not the holder, or forbidden by the API server
  6  cluster unreachable or not configured, the CRD is not installed, or no
     answer from the API server within 10 s (waiting actions retry until --wait-timeout)
  7  your holding is over (taken over, force-released or expired)
  8  exec: the command ended but the lock could not be released (it expires on its own)
  130  interrupted (SIGINT, SIGTERM, SIGHUP) before the command ran, or any other action interrupted
exec exits with the command's own code once the lock is held.";

/// Formats a time with how far it is from the server's now.
pub fn when(time: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let stamp = time.format("%Y-%m-%dT%H:%M:%SZ");
    let delta = time - now;
    let span = humantime::format_duration(std::time::Duration::from_secs(
        delta.num_seconds().unsigned_abs(),
    ));
    if delta.num_seconds() == 0 {
        format!("{stamp} (now)")
    } else if delta.num_seconds() > 0 {
        format!("{stamp} (in {span})")
    } else {
        format!("{stamp} ({span} ago)")
    }
}

fn describe_holder(holder: &LockHolder, now: DateTime<Utc>) -> String {
    let who = if holder.owner == holder.user {
        holder.owner.clone()
    } else {
        format!("{} (user {})", holder.owner, holder.user)
    };
    format!(
        "{who} since {} until {}, reason: \"{}\"",
        holder.acquired_at.format("%Y-%m-%dT%H:%M:%SZ"),
        when(holder.expires_at, now),
        holder.reason
    )
}

/// The message (one or two lines) and exit code for an error. Every line is
/// escaped as a whole: owners, reasons and names come from other clients or
/// from the API server, and none may drive the reader's terminal.
pub fn describe(err: &Error, environment: &str, now: DateTime<Utc>) -> (String, Exit) {
    let (lines, exit) = describe_lines(err, environment, now);
    (safe_lines(&lines), exit)
}

/// Lines escaped one by one, then joined: the only line breaks are ours.
fn safe_lines(lines: &[String]) -> String {
    lines
        .iter()
        .map(|line| escape(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One progress or notice line, escaped (it may name another client's holder).
pub fn safe_line(line: &str) -> String {
    escape(line).into_owned()
}

/// The warning `list` prints for each object it skipped.
pub fn skipped_malformed(malformed: &MalformedLock) -> String {
    safe_line(&format!(
        "skipped the malformed DeploymentLock {:?} in namespace {:?} ({}: {}): an admin can inspect it with `kubectl get deploymentlock {} -n {} -o yaml`",
        malformed.name,
        malformed.namespace,
        malformed.location,
        malformed.source,
        malformed.name,
        malformed.namespace
    ))
}

fn describe_lines(err: &Error, environment: &str, now: DateTime<Utc>) -> (Vec<String>, Exit) {
    let env = environment;
    match err {
        Error::Refused(refusal) => match refusal {
            Refusal::HeldByOther(holder) => (
                vec![
                    format!("{env} is locked by {}", describe_holder(holder, now)),
                    format!(
                        "wait for it with `deploylock wait -e {env}`, or override with `deploylock force-release -e {env} --reason ...`"
                    ),
                ],
                Exit::Held,
            ),
            Refusal::AlreadyHeldByYou(holder) => (
                vec![
                    format!(
                        "you already hold {env} as {} (user {}, lock ID {}) until {}, reason: \"{}\"",
                        holder.owner,
                        holder.user,
                        holder.lock_id,
                        when(holder.expires_at, now),
                        holder.reason
                    ),
                    format!(
                        "extend it with `deploylock extend -e {env}` or release it with `deploylock release -e {env}`"
                    ),
                ],
                Exit::Held,
            ),
            Refusal::EmergencyLockInForce(holder) => (
                vec![
                    format!(
                        "{env} is force-locked (emergency) by {}",
                        describe_holder(holder, now)
                    ),
                    format!(
                        "it must be released first: `deploylock force-release -e {env} --reason ...`"
                    ),
                ],
                Exit::Held,
            ),
            Refusal::NotHolder(holder) => (
                vec![
                    format!(
                        "{env} is held by {}, not by you: only the holder can release or extend it",
                        describe_holder(holder, now)
                    ),
                    format!(
                        "to take it away use `deploylock force-release -e {env} --reason ...`"
                    ),
                ],
                Exit::Forbidden,
            ),
            Refusal::LockLost {
                expected_lock_id,
                current,
            } => {
                let now_held = match current {
                    Some(holder) => format!("it is now held by {}", describe_holder(holder, now)),
                    None => "it is now available".to_string(),
                };
                (
                    vec![format!(
                        "your holding {expected_lock_id} of {env} is over: {now_held}"
                    )],
                    Exit::LockLost,
                )
            }
            Refusal::NotHeld => (
                vec![
                    format!("{env} is not locked: nothing to extend"),
                    format!("acquire it with `deploylock acquire -e {env} --reason ...`"),
                ],
                Exit::Forbidden,
            ),
            Refusal::ExpiredCannotExtend(holder) => (
                vec![
                    format!(
                        "your lock on {env} expired at {}: it can no longer be extended",
                        when(holder.expires_at, now)
                    ),
                    format!("acquire it again with `deploylock acquire -e {env} --reason ...`"),
                ],
                Exit::LockLost,
            ),
            Refusal::ReasonRequired => (
                vec!["a reason is required: add --reason \"...\"".to_string()],
                Exit::InvalidInput,
            ),
            Refusal::QueuedBehind { next, waiting } => (
                vec![
                    format!(
                        "{env} is free but {waiting} client(s) are waiting for it; next is {} (waiting since {}), reason: \"{}\"",
                        next.owner,
                        when(next.since, now),
                        next.reason
                    ),
                    format!(
                        "join the queue with `deploylock acquire -e {env} --wait-timeout SECONDS --reason ...`"
                    ),
                ],
                Exit::Held,
            ),
            Refusal::QueueFull => (
                vec![format!("the wait queue of {env} is full: try again later")],
                Exit::Held,
            ),
            Refusal::CounterExhausted => (
                vec![format!(
                    "the fencing token or history sequence of {env} reached its maximum (2^53-1): an admin must delete the lock (it is created again with a token from the clock)"
                )],
                Exit::Failure,
            ),
            Refusal::DurationOutOfRange => (
                vec!["duration is out of range: a lock lasts from 1 minute to 7 days".to_string()],
                Exit::InvalidInput,
            ),
        },
        Error::InvalidInput(message) => (vec![message.clone()], Exit::InvalidInput),
        Error::Rejected(message) => (
            vec![format!("the API server rejected the lock: {message}")],
            Exit::InvalidInput,
        ),
        Error::NamespaceNotFound(namespace) => (
            vec![format!(
                "namespace {namespace:?} does not exist: pick another with -n/--namespace"
            )],
            Exit::InvalidInput,
        ),
        Error::Config(message) => (
            vec![format!(
                "no usable Kubernetes configuration ({message}): set KUBECONFIG or pass --kubeconfig/--context"
            )],
            Exit::Unreachable,
        ),
        Error::Unreachable(message) => (
            vec![format!(
                "cannot reach the Kubernetes API server ({message}): check --kubeconfig/--context and that the cluster is up"
            )],
            Exit::Unreachable,
        ),
        Error::CrdNotInstalled => (
            vec!["the DeploymentLock CRD is not installed in this cluster: install it with `make install` or `kubectl apply -f crds/`".to_string()],
            Exit::Unreachable,
        ),
        Error::Unauthorized(message) => (
            vec![format!(
                "the API server did not accept your credentials ({message}): check your kubeconfig"
            )],
            Exit::Forbidden,
        ),
        Error::Forbidden(message) => {
            // Keep the policy's own words, not the admission plumbing.
            let reason = message
                .split_once("denied request: ")
                .map_or(message.as_str(), |(_, reason)| reason);
            (
                vec![format!("the API server refused: {reason}")],
                Exit::Forbidden,
            )
        }
        Error::Contention(attempts) => (
            vec![format!(
                "gave up after {attempts} conflicting writes from other clients: try again"
            )],
            Exit::Failure,
        ),
        Error::WaitTimedOut(holder) => {
            let held = match holder {
                Some(holder) => format!(": still held by {}", describe_holder(holder, now)),
                None => String::new(),
            };
            (
                vec![format!("timed out waiting for {env}{held}")],
                Exit::WaitTimeout,
            )
        }
        Error::Malformed(malformed) => (
            vec![
                format!(
                    "the DeploymentLock {:?} in namespace {:?} is malformed and cannot be read ({}: {})",
                    malformed.name, malformed.namespace, malformed.location, malformed.source
                ),
                format!(
                    "an admin can inspect it with `kubectl get deploymentlock {} -n {} -o yaml`, then fix or delete it",
                    malformed.name, malformed.namespace
                ),
            ],
            Exit::Failure,
        ),
        Error::Api(message) => (
            vec![format!("Kubernetes API error: {message}")],
            Exit::Failure,
        ),
        Error::Interrupted => (
            vec![format!(
                "interrupted by a signal while acquiring {env}: gave up (and left the queue)"
            )],
            Exit::Interrupted,
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::crd::Waiter;

    const EVIL: &str = "\u{1b}]8;;http://evil\u{7}\u{1b}[2J\u{202e}\u{9b}\r\n";

    fn decoded<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
        match serde_json::from_value(value) {
            Ok(decoded) => decoded,
            Err(err) => panic!("test value does not decode: {err}"),
        }
    }

    fn holder() -> Box<LockHolder> {
        decoded(json!({
            "lockId": format!("id{EVIL}"),
            "user": format!("user{EVIL}"),
            "owner": format!("owner{EVIL}"),
            "type": "manual",
            "reason": format!("reason{EVIL}"),
            "acquiredAt": "2030-01-01T00:00:00Z",
            "expiresAt": "2030-01-01T00:30:00Z",
            "durationSeconds": 1800
        }))
    }

    fn now() -> DateTime<Utc> {
        match DateTime::parse_from_rfc3339("2030-01-01T00:10:00Z") {
            Ok(time) => time.with_timezone(&Utc),
            Err(err) => panic!("{err}"),
        }
    }

    /// Every message, whatever it names, is at most two lines of text a
    /// terminal only prints.
    #[test]
    fn every_message_is_escaped() {
        let waiter: Box<Waiter> = decoded(json!({
            "id": "w1",
            "user": "carol",
            "owner": format!("waiter{EVIL}"),
            "reason": format!("waiting{EVIL}"),
            "since": "2030-01-01T00:01:00Z",
            "heartbeatAt": "2030-01-01T00:01:00Z"
        }));
        let malformed = crate::store::decode_lock(json!({
            "metadata": { "name": format!("bad{EVIL}"), "namespace": format!("ns{EVIL}") },
            "spec": { "environment": format!("{EVIL}"), "history": [{ "at": format!("x{EVIL}") }] }
        }));
        let errors = vec![
            Error::Refused(Refusal::HeldByOther(holder())),
            Error::Refused(Refusal::AlreadyHeldByYou(holder())),
            Error::Refused(Refusal::EmergencyLockInForce(holder())),
            Error::Refused(Refusal::NotHolder(holder())),
            Error::Refused(Refusal::LockLost {
                expected_lock_id: format!("mine{EVIL}"),
                current: Some(holder()),
            }),
            Error::Refused(Refusal::QueuedBehind {
                next: waiter,
                waiting: 2,
            }),
            Error::WaitTimedOut(Some(holder())),
            Error::Forbidden(format!("denied request: {EVIL}")),
            Error::Api(format!("api{EVIL}")),
            Error::Rejected(format!("rejected{EVIL}")),
            Error::InvalidInput(format!("input{EVIL}")),
            match malformed {
                Ok(lock) => panic!("decoded: {lock:?}"),
                Err(malformed) => Error::Malformed(malformed),
            },
        ];
        for err in &errors {
            let (message, _) = describe(err, "production", now());
            let lines: Vec<&str> = message.split('\n').collect();
            assert!(!lines.is_empty() && lines.len() <= 2, "{err:?}: {message}");
            assert!(
                !message.chars().any(
                    |c| (c.is_control() && c != '\n') || ('\u{202a}'..='\u{202e}').contains(&c)
                ),
                "{err:?}: {message:?}"
            );
            assert!(
                message.contains("\\x1b]8;;http://evil\\x07\\x1b[2J\\u202e\\u009b\\r\\n"),
                "{err:?}: the hostile text is not shown escaped: {message}"
            );
        }
    }

    #[test]
    fn malformed_locks_exit_1_and_name_the_object() {
        let malformed = match crate::store::decode_lock(json!({
            "metadata": { "name": "production", "namespace": "team-a" },
            "spec": { "environment": "production", "history": [{ "at": "2030-01-01T00:00:00ZT" }] }
        })) {
            Ok(lock) => panic!("decoded: {lock:?}"),
            Err(malformed) => malformed,
        };
        let warning = skipped_malformed(&malformed);
        assert!(
            warning.contains("\"production\"") && warning.contains("\"team-a\""),
            "{warning}"
        );
        let (message, exit) = describe(&Error::Malformed(malformed), "production", now());
        assert_eq!(exit, Exit::Failure);
        assert!(
            message.contains("is malformed") && message.contains("spec.history[0]"),
            "{message}"
        );
    }
}
