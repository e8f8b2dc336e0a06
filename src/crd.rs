//! The `DeploymentLock` custom resource: one object per environment.
//!
//! `spec` is the lock as its holders write it (who holds it, until when, why,
//! the history of past holders and the wait queue); `status` is what the
//! controller observes (the state shown to people, conditions). Every bound a
//! client could break is also stated in the schema, so the API server refuses
//! a bad object whoever writes it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use macro_rules_attribute::apply;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the DeploymentLock resource.
pub const GROUP: &str = "deploylock.dev";

/// Declares a custom resource kind of deploylock from its spec struct
/// (`#[apply(deploylock_kind!)]`, before the struct's other attributes): what
/// every kind shares is written here once — group (the string of [`GROUP`]),
/// version, category, the derives, absent optional fields left out when
/// written, camelCase field names; kube-derive names the plural and singular
/// after the kind. The struct's own `#[kube(...)]` attributes name the kind,
/// its scope, status and columns.
macro_rules! deploylock_kind {
    ($(#[$attribute:meta])* $visibility:vis struct $spec:ident $fields:tt) => {
        #[::serde_with::skip_serializing_none]
        #[derive(
            ::kube::CustomResource,
            ::kube::KubeSchema,
            ::serde::Serialize,
            ::serde::Deserialize,
            Clone,
            Debug,
            PartialEq,
            Default
        )]
        #[kube(group = "deploylock.dev", version = "v1", category = "deploylock", derive = "PartialEq")]
        $(#[$attribute])*
        #[serde(rename_all = "camelCase")]
        $visibility struct $spec $fields
    };
}
pub(crate) use deploylock_kind;

/// Longest environment name: a DNS-1123 label, since it is the object's name.
pub const MAX_ENVIRONMENT_LEN: usize = crate::environment::MAX_DNS_LABEL_LEN;
/// Longest reason accepted.
pub const MAX_REASON_LEN: usize = 1024;
/// Longest owner label, deployment ID or identity accepted.
pub const MAX_NAME_LEN: usize = 253;
/// Longest lock ID or waiter ID.
pub const MAX_ID_LEN: usize = 64;
/// Shortest lock duration: one minute.
pub const MIN_DURATION_SECONDS: i64 = 60;
/// Longest lock duration: seven days (a long maintenance window).
pub const MAX_DURATION_SECONDS: i64 = 7 * 24 * 60 * 60;
/// Most metadata keys a lock may carry.
pub const MAX_METADATA_ENTRIES: usize = 32;
/// Longest metadata key.
pub const MAX_METADATA_KEY_LEN: usize = 63;
/// Longest metadata value.
pub const MAX_METADATA_VALUE_LEN: usize = 1024;
/// History entries kept on the object; the oldest is dropped first.
pub const MAX_HISTORY_ENTRIES: usize = 20;

/// The lock whose holding freezes every other environment of its namespace
/// (config/admission/stop-the-line.yaml).
pub const STOP_THE_LINE: &str = "stop-the-line";
/// Waiters the queue may hold.
pub const MAX_QUEUE_ENTRIES: usize = 64;
/// Places one user may hold in one lock's queue: one identity cannot fill
/// the queue and lock everyone else out of it (the admission policy has the
/// same number).
pub const MAX_QUEUE_PLACES_PER_USER: usize = 8;
/// Largest fencing token or history sequence: JSON's safe integer range, so
/// that every reader (JavaScript and jq included) sees the exact value.
pub const MAX_SAFE_INTEGER: i64 = 9_007_199_254_740_991;
/// Fencing tokens of a new DeploymentLock start at the API server's clock in
/// seconds times this factor, so a lock deleted and created again never
/// repeats a token (the admission policy refuses a delete that could).
pub const FENCING_TOKENS_PER_SECOND: i64 = 1 << 20;
/// A new object's token is taken this many seconds ahead of the server time
/// read, so that the create still lies ahead of the policy's clock when it
/// arrives a moment later.
pub const FENCING_BASE_LEAD_SECONDS: i64 = 5;
/// Free text shown to people (owner labels, reasons, deployment IDs): no
/// control character (C0 with ESC and newlines, DEL, C1), no bidirectional
/// formatting character and no Unicode line or paragraph separator. Readers
/// that print a value as is (`kubectl get deploymentlocks` columns, chat
/// notifications) must not receive a terminal escape sequence or a forged
/// line from another user; the CLI's own rendering escapes the same set.
pub const DISPLAY_TEXT_PATTERN: &str = r"^[^\x00-\x1F\x7F-\x9F\x{061C}\x{200E}\x{200F}\x{202A}-\x{202E}\x{2066}-\x{2069}\x{2028}\x{2029}]*$";

/// Whether `c` is one of the characters [`DISPLAY_TEXT_PATTERN`] refuses:
/// control characters (C0 including ESC, DEL, C1), the bidirectional
/// formatting characters that reorder what follows them (embeddings,
/// overrides, isolates, marks) and the Unicode line and paragraph
/// separators. The CLI escapes the same characters when it prints.
pub fn is_unsafe_display_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
                | '\u{2028}'
                | '\u{2029}'
        )
}

/// Whether `text` is what [`DISPLAY_TEXT_PATTERN`] admits (the CLI checks
/// its input with it, the admission policy with the pattern).
pub fn is_display_text(text: &str) -> bool {
    !text.chars().any(is_unsafe_display_char)
}

/// The only date-time form stored: RFC 3339 in UTC with a `Z`, optional
/// fractional seconds, years 0001-9999 (the range of CEL's timestamps: a
/// year 0000 would make the admission policy fail on every later write).
/// The schema and [`parse_time`] apply the same rule.
pub const DATE_TIME_PATTERN: &str = r"^([1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$";

/// Desired lock for one environment.
#[apply(deploylock_kind!)]
#[kube(
    kind = "DeploymentLock",
    shortname = "dlock",
    namespaced,
    status = "DeploymentLockStatus",
    doc = "A DeploymentLock guards one environment: at most one holder deploys to it at a time, until the lock is released or expires.",
    printcolumn(name = "State", type_ = "string", json_path = ".status.state", description = "Available, Locked, Expired or ForceLocked"),
    printcolumn(name = "Holder", type_ = "string", json_path = ".spec.holder.user", description = "Who holds the lock: the identity the API server authenticated"),
    printcolumn(name = "Owner", type_ = "string", json_path = ".spec.holder.owner", description = "Display label the holder gave (--owner); not an identity"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".spec.holder.reason", description = "Why the lock is held"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".spec.holder.expiresAt", description = "When the lock expires unless extended"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Lock ID", type_ = "string", json_path = ".spec.holder.lockId", priority = 1, description = "ID of the current holding"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.holder.type", priority = 1, description = "manual, automatic, emergency or scheduled"),
    selectable = ".spec.environment",
    validation = Rule::new("self.metadata.name == self.spec.environment").message("spec.environment must equal metadata.name: a DeploymentLock is named after the environment it guards"),
)]
pub struct DeploymentLockSpec {
    /// Environment this lock guards (for example `production`). Equal to the
    /// object's name: a DNS-1123 label of at most 63 characters.
    #[schemars(
        length(min = 1, max = MAX_ENVIRONMENT_LEN),
        regex(pattern = crate::environment::DNS_LABEL_PATTERN)
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.environment is immutable"))]
    pub environment: String,

    /// The current holding. Absent when the environment is available.
    pub holder: Option<LockHolder>,

    /// Incremented every time a new holding starts (acquire, takeover after
    /// expiry, forced takeover). Deploy tools may pass it on as a fencing token
    /// so that writes from a stale holder can be rejected.
    #[serde(default)]
    #[schemars(range(min = 0, max = MAX_SAFE_INTEGER))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message("spec.fencingToken never decreases"))]
    pub fencing_token: i64,

    /// Clients waiting for the lock, in arrival order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_QUEUE_ENTRIES))]
    pub queue: Vec<Waiter>,

    /// Past transitions of this lock, oldest first, at most 20 (the oldest is
    /// dropped first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_HISTORY_ENTRIES))]
    pub history: Vec<HistoryEntry>,
}

/// Kind of holding: who asked for it and how it may be overridden.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum LockType {
    /// Taken by a person or a pipeline step with `deploylock acquire`.
    #[default]
    Manual,
    /// Taken and renewed by `deploylock exec` while a command runs.
    Automatic,
    /// Taken with `--force`: overrides a normal holding.
    Emergency,
    /// Taken by a freeze window (a `FreezeWindow`) for one of its openings.
    Scheduled,
}

/// One holding of the lock: the Lock Information.
#[serde_with::skip_serializing_none]
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.expiresAt > self.acquiredAt").message("spec.holder.expiresAt must be after spec.holder.acquiredAt"))]
pub struct LockHolder {
    /// Unique ID of this holding; a new one is issued at every acquisition.
    #[schemars(length(min = 1, max = MAX_ID_LEN), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub lock_id: String,

    /// Identity the API server authenticated for the client that took the
    /// lock (its username). Only this identity may release or extend it.
    #[schemars(length(min = 1, max = MAX_NAME_LEN))]
    pub user: String,

    /// Display label of the holder (a person, a bot, a team); defaults to
    /// `user`.
    #[schemars(length(min = 1, max = MAX_NAME_LEN))]
    pub owner: String,

    /// manual, automatic or emergency.
    #[serde(rename = "type")]
    pub lock_type: LockType,

    /// Why the lock is held, for example "Deploying version 2.1.0".
    #[schemars(length(min = 1, max = MAX_REASON_LEN))]
    #[x_kube(validation = Rule::new("self.trim().size() > 0").message("spec.holder.reason must not be blank"))]
    pub reason: String,

    /// When this holding started (RFC 3339, API server clock).
    #[serde(with = "StrictTime")]
    pub acquired_at: DateTime<Utc>,

    /// When this holding ends unless extended (RFC 3339, API server clock).
    #[serde(with = "StrictTime")]
    pub expires_at: DateTime<Utc>,

    /// Duration requested at acquisition, in seconds (60 to 604800).
    #[schemars(range(min = MIN_DURATION_SECONDS, max = MAX_DURATION_SECONDS))]
    pub duration_seconds: i64,

    /// ID of the deployment this lock protects (a pipeline run, a release).
    #[schemars(length(min = 1, max = MAX_NAME_LEN))]
    pub deployment_id: Option<String>,

    /// Free-form context, like annotations: at most 32 keys of at most 63
    /// characters, values of at most 1024 characters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "metadata_schema")]
    #[x_kube(validation = Rule::new("self.all(k, k.size() <= 63 && k.matches('^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$'))").message("spec.holder.metadata keys must be 1-63 characters of letters, digits, '-', '_', '.', '/'"))]
    pub metadata: BTreeMap<String, String>,

    /// The holding this one overrode, when it was taken with --force.
    pub overrode: Option<OverriddenHolding>,

    /// Lock group ID: shared by the holdings one multi-environment acquire
    /// (`-e a -e b`, `--all-environments`) took together. Fixed when the
    /// holding starts, like its other fields.
    #[schemars(length(min = 1, max = MAX_ID_LEN), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub group_id: Option<String>,
}

/// The holding an emergency lock replaced.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OverriddenHolding {
    /// ID of the overridden holding.
    #[schemars(length(min = 1, max = MAX_ID_LEN))]
    pub lock_id: String,
    /// Authenticated identity of the overridden holder.
    #[schemars(length(min = 1, max = MAX_NAME_LEN))]
    pub user: String,
    /// Display label of the overridden holder.
    #[schemars(length(min = 1, max = MAX_NAME_LEN))]
    pub owner: String,
    /// Reason the overridden holder gave.
    #[schemars(length(max = MAX_REASON_LEN))]
    pub reason: String,
}

/// A client waiting for the lock.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Waiter {
    /// Unique ID of this wait.
    #[schemars(length(min = 1, max = MAX_ID_LEN), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub id: String,
    /// Authenticated identity of the waiting client.
    #[schemars(length(min = 1, max = MAX_NAME_LEN))]
    pub user: String,
    /// Display label of the waiting client.
    #[schemars(length(min = 1, max = MAX_NAME_LEN))]
    pub owner: String,
    /// Why the client wants the lock.
    #[schemars(length(min = 1, max = MAX_REASON_LEN))]
    pub reason: String,
    /// When the client started waiting.
    #[serde(with = "StrictTime")]
    pub since: DateTime<Utc>,
    /// Last sign of life of the waiting client; stale waiters drop out.
    #[serde(with = "StrictTime")]
    pub heartbeat_at: DateTime<Utc>,
    /// Served before older waiters (`--queue newest-first`): for teams that
    /// only care about the latest deploy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub newest_first: bool,
}

/// What happened to the lock.
#[derive(
    Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum HistoryAction {
    /// A holder took an available lock.
    Acquired,
    /// A holder took a lock whose previous holding had expired.
    TookOverExpired,
    /// The holder moved the expiry later.
    Extended,
    /// The holder released the lock.
    Released,
    /// An emergency holder took the lock, overriding any normal holding.
    ForceAcquired,
    /// Someone released the lock without being its holder.
    ForceReleased,
    /// The controller cleared a holding that had stayed expired for the
    /// retention period.
    Cleared,
}

impl HistoryAction {
    /// Every action, in the order of the declaration (and of the schema).
    pub const ALL: [HistoryAction; 7] = [
        HistoryAction::Acquired,
        HistoryAction::TookOverExpired,
        HistoryAction::Extended,
        HistoryAction::Released,
        HistoryAction::ForceAcquired,
        HistoryAction::ForceReleased,
        HistoryAction::Cleared,
    ];
}

/// One past transition of the lock.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.action != 'ForceReleased' || self.reason.trim().size() > 0").message("a ForceReleased history entry needs a reason"))]
pub struct HistoryEntry {
    /// Position of this entry in the lock's whole history (1, 2, 3, ...),
    /// kept when older entries are dropped.
    #[serde(default)]
    #[schemars(range(min = 0, max = MAX_SAFE_INTEGER))]
    pub sequence: i64,
    /// What happened.
    pub action: HistoryAction,
    /// When it happened (API server clock).
    #[serde(with = "StrictTime")]
    pub at: DateTime<Utc>,
    /// ID of the holding concerned.
    #[schemars(length(min = 1, max = MAX_ID_LEN))]
    pub lock_id: String,
    /// Authenticated identity that made the change.
    #[schemars(length(min = 1, max = MAX_NAME_LEN))]
    pub by: String,
    /// Display label of the holder concerned.
    #[schemars(length(min = 1, max = MAX_NAME_LEN))]
    pub owner: String,
    /// Reason given for the change (or the holding's reason).
    #[schemars(length(max = MAX_REASON_LEN))]
    pub reason: String,
    /// Expiry of the holding after the change, when there is one.
    #[serde(default, with = "StrictOptionalTime")]
    #[schemars(with = "StrictTime")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// State of a lock as shown to people.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum LockState {
    /// Nobody holds the lock.
    #[default]
    Available,
    /// A manual or automatic holding is in force.
    Locked,
    /// The holding passed its expiry; anyone may take the lock over.
    Expired,
    /// An emergency holding is in force.
    ForceLocked,
}

impl std::fmt::Display for LockState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LockState::Available => "Available",
            LockState::Locked => "Locked",
            LockState::Expired => "Expired",
            LockState::ForceLocked => "ForceLocked",
        })
    }
}

impl std::fmt::Display for LockType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LockType::Manual => "manual",
            LockType::Automatic => "automatic",
            LockType::Emergency => "emergency",
            LockType::Scheduled => "scheduled",
        })
    }
}

/// What the controller observed.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentLockStatus {
    /// Available, Locked, Expired or ForceLocked.
    pub state: Option<LockState>,
    /// ID of the holding the state refers to.
    pub lock_id: Option<String>,
    /// Standard conditions; `Locked` is True while a holding is in force.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// metadata.generation the status was computed from.
    pub observed_generation: Option<i64>,
    /// Sequence of the last history entry announced as a Kubernetes Event.
    pub last_event_sequence: Option<i64>,
}

/// Parses a stored date-time by the schema's rule: `YYYY-MM-DDTHH:MM:SS`,
/// optional 1-9 fractional digits, `Z`, and a real calendar instant.
pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    let bytes = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        bytes
            .get(range)
            .is_some_and(|part| part.iter().all(u8::is_ascii_digit))
    };
    let shape = bytes.len() >= 20
        && digits(0..4)
        && bytes[4] == b'-'
        && digits(5..7)
        && bytes[7] == b'-'
        && digits(8..10)
        && bytes[10] == b'T'
        && digits(11..13)
        && bytes[13] == b':'
        && digits(14..16)
        && bytes[16] == b':'
        && digits(17..19)
        && bytes[bytes.len() - 1] == b'Z';
    if !shape || &bytes[0..4] == b"0000" {
        return None;
    }
    let fraction = &bytes[19..bytes.len() - 1];
    let fraction_ok = fraction.is_empty()
        || (fraction[0] == b'.'
            && (2..=10).contains(&fraction.len())
            && fraction[1..].iter().all(u8::is_ascii_digit));
    if !fraction_ok {
        return None;
    }
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|time| time.with_timezone(&Utc))
}

/// Serde and schema of a stored date-time (`#[serde(with = "StrictTime")]`):
/// written as RFC 3339 with `Z`, read only in the form the schema admits. A
/// type, not a module: the schema derive takes the field's schema from it.
#[derive(JsonSchema)]
#[schemars(extend("format" = "date-time"))]
#[allow(dead_code)] // Never built: only its schema and functions are used.
pub(crate) struct StrictTime(#[schemars(regex(pattern = DATE_TIME_PATTERN))] String);

impl StrictTime {
    pub(crate) fn serialize<S: serde::Serializer>(
        time: &DateTime<Utc>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<DateTime<Utc>, D::Error> {
        Self::parse::<D::Error>(String::deserialize(deserializer)?)
    }

    fn parse<E: serde::de::Error>(text: String) -> Result<DateTime<Utc>, E> {
        parse_time(&text).ok_or_else(|| {
            E::custom(format!(
                "invalid date-time {text:?}: expected RFC 3339 in UTC such as 2026-11-27T10:00:00Z"
            ))
        })
    }
}

/// [`StrictTime`]'s serde for an optional date-time (absent when `None`);
/// its schema is `#[schemars(with = "StrictTime")]`.
pub(crate) struct StrictOptionalTime;

impl StrictOptionalTime {
    pub(crate) fn serialize<S: serde::Serializer>(
        time: &Option<DateTime<Utc>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match time {
            Some(time) => StrictTime::serialize(time, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(StrictTime::parse::<D::Error>)
            .transpose()
    }
}

fn metadata_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": MAX_METADATA_ENTRIES,
        "additionalProperties": {
            "type": "string",
            "maxLength": MAX_METADATA_VALUE_LEN,
        },
    })
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    /// The group the macro writes is [`super::GROUP`], and every kind
    /// declared with it shares the version and category.
    #[test]
    fn every_kind_is_declared_in_the_deploylock_group() {
        let definitions = [
            super::DeploymentLock::crd(),
            crate::envbinding::EnvironmentBinding::crd(),
            crate::notify::NotificationSubscription::crd(),
            crate::windows::FreezeWindow::crd(),
        ];
        for definition in definitions {
            let kind = &definition.spec.names.kind;
            assert_eq!(definition.spec.group, super::GROUP, "{kind}");
            let versions: Vec<&str> = definition
                .spec
                .versions
                .iter()
                .map(|version| version.name.as_str())
                .collect();
            assert_eq!(versions, ["v1"], "{kind}");
            assert_eq!(
                definition.spec.names.categories,
                Some(vec!["deploylock".to_string()]),
                "{kind}"
            );
            assert_eq!(
                definition.spec.names.plural,
                format!("{}s", kind.to_lowercase()),
                "{kind}"
            );
        }
    }
}
