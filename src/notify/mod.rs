//! Team notifications: the `NotificationSubscription` custom resource (which
//! locks, which transitions, where to), the messages sent for each provider
//! ([`payload`]), what is due for delivery from a lock's history and a
//! subscription's delivery cursor ([`plan`]) and the HTTP client that sends
//! them ([`send`]). The controller's leader delivers them
//! (`controller::notify`); `deploylock notify test` sends a test message.
//!
//! Durability rests on the lock's history: every transition is a history
//! entry with a sequence number, and each subscription keeps, per lock (by
//! UID), the last sequence it delivered in its status. After a restart or a
//! leader hand-over delivery resumes after that sequence. A crash between a
//! delivery and the cursor write repeats one message, with the same
//! idempotency key (`<lock UID>-<sequence>`), so a receiver can drop it.

pub mod cli;
pub mod payload;
pub mod plan;
pub mod send;

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::core::{Selector, SelectorExt};
use kube::{KubeSchema, ResourceExt};
use macro_rules_attribute::apply;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::{DeploymentLock, HistoryAction, deploylock_kind};

/// Condition type saying whether the spec is usable (the shared one).
pub use crate::conditions::READY_CONDITION;
/// Header carrying the idempotency key of every delivery.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";
/// Header carrying the HMAC-SHA256 signature of the body (`generic-hmac`),
/// as Flux's notification-controller sends it: `sha256=<hex>`.
pub const SIGNATURE_HEADER: &str = "X-Signature";
/// Default time a failing delivery is retried before it is given up.
pub const DEFAULT_RETRY_FOR_SECONDS: i64 = 3600;
/// Default longest wait between two attempts.
pub const DEFAULT_MAX_BACKOFF_SECONDS: i64 = 60;

/// Where and which lock transitions to announce.
#[apply(deploylock_kind!)]
#[kube(
    kind = "NotificationSubscription",
    shortname = "dlnotify",
    namespaced,
    status = "NotificationSubscriptionStatus",
    doc = "A NotificationSubscription sends the transitions of the DeploymentLocks in its namespace (all, or the environments it names) to a team chat or a webhook, and reminds the team of locks held too long. The controller's leader delivers them, in order per lock, none lost across restarts.",
    printcolumn(
        name = "Provider",
        type_ = "string",
        json_path = ".spec.provider.type",
        description = "Where messages go"
    ),
    printcolumn(
        name = "Environments",
        type_ = "string",
        json_path = ".spec.environments",
        description = "Locks covered (empty: all in the namespace)"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the subscription can deliver"
    ),
    printcolumn(
        name = "Last Delivery",
        type_ = "date",
        json_path = ".status.lastDelivery.at",
        description = "When the last message was sent"
    ),
    printcolumn(
        name = "Result",
        type_ = "string",
        json_path = ".status.lastDelivery.result",
        description = "Delivered, Retrying or Failed"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct NotificationSubscriptionSpec {
    /// Environments (DeploymentLock names) whose transitions are sent; empty
    /// means every lock in the namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "environments_schema")]
    pub environments: Vec<String>,

    /// Label selector on the DeploymentLocks covered (standard
    /// `matchLabels` / `matchExpressions`); combined with `environments`: a
    /// lock is covered when both say so. Absent: no label condition.
    #[schemars(default, schema_with = "lock_selector_schema")]
    pub lock_selector: Option<LabelSelector>,

    /// Transitions sent; empty means all of them (Acquired, TookOverExpired,
    /// Extended, Released, ForceAcquired, ForceReleased, Cleared, Expired,
    /// WaiterQueued).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub events: Vec<NotifyEvent>,

    /// A reminder for a lock held longer than `afterSeconds`, repeated every
    /// `repeatSeconds` while it is still held.
    pub reminder: Option<Reminder>,

    /// Where messages go.
    pub provider: Provider,

    /// How failing deliveries are retried.
    pub retry: Option<RetryPolicy>,
}

/// A transition a subscription can ask for.
///
/// Every [`HistoryAction`], and the expiry; written as the variant's name
/// (`Acquired`, …, `Expired`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NotifyEvent {
    /// A transition the lock's history records.
    Transition(HistoryAction),
    /// The holding passed its expiry (observed by the controller; not a
    /// history entry).
    Expired,
    /// A client took a new place in the lock's wait queue (once per place,
    /// by its ID; observed by the controller, not a history entry).
    WaiterQueued,
}

impl NotifyEvent {
    const EXPIRED: &'static str = "Expired";
    const WAITER_QUEUED: &'static str = "WaiterQueued";

    /// Every event, in the schema's order.
    pub fn all() -> impl Iterator<Item = NotifyEvent> {
        let transitions = HistoryAction::ALL.into_iter().map(NotifyEvent::Transition);
        transitions.chain([NotifyEvent::Expired, NotifyEvent::WaiterQueued])
    }

    /// The name it is written as.
    pub fn name(self) -> String {
        match self {
            NotifyEvent::Transition(action) => serde_json::to_value(action)
                .ok()
                .and_then(|name| name.as_str().map(str::to_string))
                .unwrap_or_default(),
            NotifyEvent::Expired => Self::EXPIRED.to_string(),
            NotifyEvent::WaiterQueued => Self::WAITER_QUEUED.to_string(),
        }
    }
}

impl From<HistoryAction> for NotifyEvent {
    fn from(action: HistoryAction) -> Self {
        NotifyEvent::Transition(action)
    }
}

impl Serialize for NotifyEvent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            NotifyEvent::Transition(action) => action.serialize(serializer),
            NotifyEvent::Expired => serializer.serialize_str(Self::EXPIRED),
            NotifyEvent::WaiterQueued => serializer.serialize_str(Self::WAITER_QUEUED),
        }
    }
}

impl<'de> Deserialize<'de> for NotifyEvent {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{Error, IntoDeserializer, value};
        let name = String::deserialize(deserializer)?;
        if name == Self::EXPIRED {
            return Ok(NotifyEvent::Expired);
        }
        if name == Self::WAITER_QUEUED {
            return Ok(NotifyEvent::WaiterQueued);
        }
        let action: Result<HistoryAction, value::Error> =
            HistoryAction::deserialize(name.as_str().into_deserializer());
        action.map(NotifyEvent::Transition).map_err(|_| {
            let names: Vec<String> = NotifyEvent::all().map(NotifyEvent::name).collect();
            D::Error::custom(format!(
                "unknown event {name:?}, expected one of {}",
                names.join(", ")
            ))
        })
    }
}

impl JsonSchema for NotifyEvent {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        "NotifyEvent".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let names: Vec<String> = NotifyEvent::all().map(NotifyEvent::name).collect();
        schemars::json_schema!({
            "description": "A transition a subscription can ask for.",
            "type": "string",
            "enum": names,
        })
    }
}

/// A repeated reminder for a long-held lock.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Reminder {
    /// First reminder once a holding has lasted this many seconds.
    #[schemars(range(min = 1, max = 604800))]
    pub after_seconds: i64,
    /// Further reminders every this many seconds; absent: only one.
    #[schemars(range(min = 1, max = 604800))]
    pub repeat_seconds: Option<i64>,
}

/// Kind of receiver, and so the message format.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProviderType {
    /// Slack incoming webhook: Block Kit blocks with a text fallback.
    #[default]
    Slack,
    /// Microsoft Teams Workflows webhook: an Adaptive Card.
    Msteams,
    /// Discord webhook: content and an embed.
    Discord,
    /// Google Chat incoming webhook: text.
    Googlechat,
    /// Mattermost incoming webhook: text (Slack-compatible).
    Mattermost,
    /// JSON with every Lock Information field.
    Generic,
    /// The generic JSON, signed: `X-Signature: sha256=<HMAC-SHA256 hex>`
    /// keyed with the Secret's `token`.
    #[serde(rename = "generic-hmac")]
    GenericHmac,
    /// A CloudEvents 1.0 event in structured mode
    /// (`application/cloudevents+json`).
    Cloudevents,
}

impl ProviderType {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderType::Slack => "slack",
            ProviderType::Msteams => "msteams",
            ProviderType::Discord => "discord",
            ProviderType::Googlechat => "googlechat",
            ProviderType::Mattermost => "mattermost",
            ProviderType::Generic => "generic",
            ProviderType::GenericHmac => "generic-hmac",
            ProviderType::Cloudevents => "cloudevents",
        }
    }
}

/// A receiver. The address (a webhook URL is a secret), any token or HMAC
/// key and any proxy come only from Secrets.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.channel) || self.type in ['slack', 'mattermost']").message("provider.channel applies to slack and mattermost only (other webhooks post to a fixed channel)"))]
#[x_kube(validation = Rule::new("!has(self.username) || self.type in ['slack', 'discord', 'mattermost']").message("provider.username applies to slack, discord and mattermost only"))]
pub struct Provider {
    /// slack, msteams, discord, googlechat, mattermost, generic,
    /// generic-hmac or cloudevents.
    #[serde(rename = "type")]
    pub provider_type: ProviderType,
    /// Secret in this namespace with `address` (the URL, required), and
    /// optionally `token` (HMAC key for generic-hmac; a bearer token for
    /// generic and cloudevents) and `proxy` (an HTTP(S) proxy URL).
    pub secret_ref: SecretReference,
    /// Secret in this namespace with `ca.crt`: PEM CA certificates trusted
    /// for the receiver (besides the system's).
    pub ca_secret_ref: Option<SecretReference>,
    /// Channel to post to, where the provider lets a webhook choose
    /// (Slack legacy webhooks, Mattermost).
    #[schemars(length(min = 1, max = 253))]
    pub channel: Option<String>,
    /// Name the message is posted as, where the provider allows it.
    #[schemars(length(min = 1, max = 80))]
    pub username: Option<String>,
}

/// A Secret in the subscription's namespace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
pub struct SecretReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// How failing deliveries are retried.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Give a message up (Warning Event, metric) after retrying it this
    /// long; default 3600.
    #[schemars(range(min = 1, max = 604800))]
    pub for_seconds: Option<i64>,
    /// Longest wait between attempts (the wait doubles from 1 s up to
    /// this); default 60.
    #[schemars(range(min = 1, max = 3600))]
    pub max_backoff_seconds: Option<i64>,
}

/// What the controller observed and delivered.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NotificationSubscriptionStatus {
    /// `Ready`: False with the reason when a Secret is missing or malformed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// metadata.generation the status was computed from.
    pub observed_generation: Option<i64>,
    /// The last delivery attempt's outcome.
    pub last_delivery: Option<LastDelivery>,
    /// Per lock, what was already delivered: delivery resumes after it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["lockUid"]))]
    pub cursors: Vec<DeliveryCursor>,
}

/// Outcome of the last delivery attempt.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LastDelivery {
    /// When (controller clock).
    pub at: DateTime<Utc>,
    /// Idempotency key of the message.
    pub key: String,
    /// Delivered, Retrying or Failed.
    pub result: DeliveryResult,
    /// The receiver's answer or the transport error, when not delivered.
    pub error: Option<String>,
}

/// Outcome of a delivery attempt.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryResult {
    Delivered,
    Retrying,
    /// Retried for the whole retry period, then given up.
    Failed,
}

/// What a subscription has delivered for one lock.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryCursor {
    /// UID of the DeploymentLock (a lock deleted and created again is a new
    /// lock).
    pub lock_uid: String,
    /// Its name, for people.
    pub environment: String,
    /// Sequence of the last history entry handled (delivered, filtered out
    /// or given up).
    #[serde(default)]
    pub sequence: i64,
    /// Holding whose expiry was last handled.
    pub expired_lock_id: Option<String>,
    /// Holding the last reminder was for, and its number (1, 2, ...).
    pub reminder_lock_id: Option<String>,
    pub reminder_count: Option<i64>,
    /// IDs of the queue places already handled that are still in the queue
    /// (kept only while the subscription asks for WaiterQueued).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::crd::MAX_QUEUE_ENTRIES))]
    pub queued_ids: Vec<String>,
}

fn environments_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    crate::environment::names_schema()
}

/// `spec.lockSelector`: a label selector on the DeploymentLocks covered.
fn lock_selector_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    crate::label_selector::schema("lockSelector", "a lock")
}

/// A `spec.lockSelector` that is not a valid label selector.
#[derive(Debug, thiserror::Error)]
#[error("spec.lockSelector is not a valid label selector: {0}")]
pub struct InvalidLockSelector(#[source] pub kube::core::ParseExpressionError);

/// Which locks of its namespace a subscription covers.
#[derive(Clone, Debug)]
pub struct Coverage {
    environments: Vec<String>,
    selector: Option<Selector>,
}

impl Coverage {
    /// Whether `lock` is covered.
    pub fn covers(&self, lock: &DeploymentLock) -> bool {
        self.covers_labelled(&lock.spec.environment, lock.labels())
    }

    /// Whether a lock named `environment` with `labels` is covered.
    pub fn covers_labelled(
        &self,
        environment: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> bool {
        (self.environments.is_empty() || self.environments.iter().any(|e| e == environment))
            && self
                .selector
                .as_ref()
                .is_none_or(|selector| selector.matches(labels))
    }
}

impl NotificationSubscriptionSpec {
    /// The locks this subscription covers; an error when its lock selector
    /// is malformed (the schema refuses most such selectors).
    pub fn coverage(&self) -> Result<Coverage, InvalidLockSelector> {
        let selector = match &self.lock_selector {
            Some(selector) => {
                Some(Selector::try_from(selector.clone()).map_err(InvalidLockSelector)?)
            }
            None => None,
        };
        Ok(Coverage {
            environments: self.environments.clone(),
            selector,
        })
    }

    /// Whether this subscription covers `lock` (a lock of its namespace);
    /// a malformed selector covers nothing.
    pub fn covers(&self, lock: &DeploymentLock) -> bool {
        self.coverage().is_ok_and(|coverage| coverage.covers(lock))
    }

    /// The transitions asked for (all when the list is empty).
    pub fn wanted(&self) -> BTreeSet<NotifyEvent> {
        if self.events.is_empty() {
            NotifyEvent::all().collect()
        } else {
            self.events.iter().copied().collect()
        }
    }

    pub fn retry_for_seconds(&self) -> i64 {
        self.retry
            .as_ref()
            .and_then(|retry| retry.for_seconds)
            .unwrap_or(DEFAULT_RETRY_FOR_SECONDS)
    }

    pub fn max_backoff_seconds(&self) -> i64 {
        self.retry
            .as_ref()
            .and_then(|retry| retry.max_backoff_seconds)
            .unwrap_or(DEFAULT_MAX_BACKOFF_SECONDS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::DeploymentLockSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn events_are_written_as_their_names_and_read_back() {
        let names: Vec<String> = NotifyEvent::all().map(NotifyEvent::name).collect();
        assert_eq!(
            names,
            [
                "Acquired",
                "TookOverExpired",
                "Extended",
                "Released",
                "ForceAcquired",
                "ForceReleased",
                "Cleared",
                "Expired",
                "WaiterQueued"
            ]
        );
        for event in NotifyEvent::all() {
            let written = serde_json::to_value(event).expect("an event serializes");
            assert_eq!(written, serde_json::json!(event.name()));
            let read: NotifyEvent = serde_json::from_value(written).expect("and reads back");
            assert_eq!(read, event);
        }
    }

    #[test]
    fn an_unknown_event_is_refused_with_the_known_ones() {
        let refused = serde_json::from_value::<NotifyEvent>(serde_json::json!("Deleted"));
        let message = refused.expect_err("Deleted is no event").to_string();
        assert!(
            message.contains("\"Deleted\"") && message.contains("Cleared, Expired"),
            "{message}"
        );
    }

    fn lock(name: &str, labels: &[(&str, &str)]) -> DeploymentLock {
        let mut lock = DeploymentLock::new(
            name,
            DeploymentLockSpec {
                environment: name.into(),
                ..Default::default()
            },
        );
        lock.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        lock
    }

    fn requirement(key: &str, operator: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: values.map(|values| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn environments_and_the_lock_selector_both_apply() {
        let spec = NotificationSubscriptionSpec {
            environments: vec!["production".into(), "staging".into()],
            lock_selector: Some(LabelSelector {
                match_labels: Some([("tier".to_string(), "prod".to_string())].into()),
                match_expressions: Some(vec![requirement(
                    "team",
                    "In",
                    Some(&["payments", "search"]),
                )]),
            }),
            ..Default::default()
        };
        let coverage = spec.coverage().unwrap();
        let covered = |name, labels: &[(&str, &str)]| coverage.covers(&lock(name, labels));
        assert!(covered(
            "production",
            &[("tier", "prod"), ("team", "payments")]
        ));
        assert!(!covered(
            "production",
            &[("tier", "test"), ("team", "payments")]
        ));
        assert!(!covered("production", &[("tier", "prod"), ("team", "web")]));
        assert!(!covered("production", &[("tier", "prod")]));
        assert!(!covered(
            "canary",
            &[("tier", "prod"), ("team", "payments")]
        ));
        // No selector: every environment named (or every lock).
        let all = NotificationSubscriptionSpec::default().coverage().unwrap();
        assert!(all.covers(&lock("anything", &[])));
    }

    #[test]
    fn a_selector_the_api_server_would_refuse_is_an_error_not_coverage() {
        let spec = NotificationSubscriptionSpec {
            lock_selector: Some(LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![requirement("team", "Near", Some(&["x"]))]),
            }),
            ..Default::default()
        };
        let err = spec.coverage().unwrap_err();
        assert!(err.to_string().contains("spec.lockSelector"), "{err}");
        assert!(!spec.covers(&lock("production", &[("team", "x")])));
    }
}
