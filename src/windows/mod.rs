//! Freeze windows: the `FreezeWindow` custom resource (a calendar of times
//! when environments are frozen), the arithmetic of its schedule
//! ([`schedule`]) and what the controller does about it ([`plan`]).
//!
//! At each opening the controller's leader takes the window's locks in the
//! window's name (holding type `scheduled`), and lets them expire at the
//! opening's end: a window never outlives its end, even when the controller
//! is down then.

pub mod cli;
pub mod plan;
pub mod schedule;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use macro_rules_attribute::apply;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::{
    DATE_TIME_PATTERN, MAX_REASON_LEN, StrictOptionalTime, StrictTime, deploylock_kind,
};
use schedule::{Interval, Recurrence, ScheduleError};

/// The identity the controller takes windows' locks as (it impersonates
/// it): a user name no person or ServiceAccount can have.
pub const WINDOW_HOLDER: &str = "deploylock:freeze-windows";
/// Condition type saying whether the spec is usable (the shared one).
pub use crate::conditions::READY_CONDITION;
/// Longest opening: 90 days.
pub const MAX_WINDOW_HOURS: i64 = 90 * 24;

/// A calendar of freezes.
#[apply(deploylock_kind!)]
#[kube(
    kind = "FreezeWindow",
    shortname = "dlwindow",
    namespaced,
    status = "FreezeWindowStatus",
    doc = "A FreezeWindow freezes environments on a calendar: at each opening (a cron schedule in a time zone, or once between two instants) the controller takes their DeploymentLocks in the window's name (type scheduled) until the opening ends.",
    printcolumn(
        name = "Schedule",
        type_ = "string",
        json_path = ".spec.schedule",
        description = "Cron schedule (empty for a one-off window)"
    ),
    printcolumn(name = "Time Zone", type_ = "string", json_path = ".spec.timeZone"),
    printcolumn(
        name = "Environments",
        type_ = "string",
        json_path = ".spec.environments",
        description = "Environments frozen (empty with allEnvironments)"
    ),
    printcolumn(
        name = "Open",
        type_ = "string",
        json_path = ".status.open.end",
        description = "While open: when this opening ends"
    ),
    printcolumn(
        name = "Next Start",
        type_ = "string",
        json_path = ".status.nextStart",
        description = "When the current or next opening starts"
    ),
    printcolumn(
        name = "Next End",
        type_ = "string",
        json_path = ".status.nextEnd",
        description = "When the current or next opening ends"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".spec.reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.schedule) != has(self.start)").message("set either schedule (with duration) or start and end"))]
#[x_kube(validation = Rule::new("has(self.schedule) == has(self.duration)").message("duration goes with schedule (a one-off window has start and end)"))]
#[x_kube(validation = Rule::new("has(self.start) == has(self.end)").message("start and end go together"))]
#[x_kube(validation = Rule::new("!has(self.timeZone) || has(self.schedule)").message("timeZone applies to a schedule; start and end are instants"))]
#[x_kube(validation = Rule::new("!has(self.start) || (timestamp(self.end) > timestamp(self.start) && timestamp(self.end) - timestamp(self.start) <= duration('2160h'))").message("end must be after start, at most 90 days (2160h) later"))]
#[x_kube(validation = Rule::new("!has(self.duration) || (duration(self.duration) >= duration('1m') && duration(self.duration) <= duration('2160h'))").message("duration must be between 1m and 2160h (90 days)"))]
#[x_kube(validation = Rule::new("(has(self.environments) && size(self.environments) > 0) != (has(self.allEnvironments) && self.allEnvironments)").message("name the environments, or set allEnvironments (every DeploymentLock in the namespace), not both"))]
pub struct FreezeWindowSpec {
    /// When the window opens: five cron fields (minute hour day-of-month
    /// month day-of-week) read in `timeZone`, or @yearly, @monthly, @weekly,
    /// @daily, @hourly. A time a clock change skips opens the window when the
    /// clock jumps; a time it repeats opens it once, the first time.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[0-9A-Za-z*/,@ -]+$"))]
    pub schedule: Option<String>,

    /// IANA time zone of the schedule (default UTC), for example Europe/Berlin.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_+/-]+$"))]
    pub time_zone: Option<String>,

    /// How long each opening lasts, in elapsed time (8h, 90m, 1h30m).
    #[schemars(
        length(min = 2, max = 32),
        regex(pattern = r"^([0-9]{1,7}h)?([0-9]{1,7}m)?([0-9]{1,7}s)?$")
    )]
    pub duration: Option<String>,

    /// A one-off window's start (RFC 3339 in UTC, for example
    /// 2026-12-24T00:00:00Z).
    #[schemars(length(max = 40), regex(pattern = DATE_TIME_PATTERN))]
    pub start: Option<String>,

    /// A one-off window's end (RFC 3339 in UTC), after its start.
    #[schemars(length(max = 40), regex(pattern = DATE_TIME_PATTERN))]
    pub end: Option<String>,

    /// Environments (DeploymentLock names in this namespace) frozen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "environments_schema")]
    pub environments: Vec<String>,

    /// Freeze every DeploymentLock of the namespace existing at the opening.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_environments: bool,

    /// Why: recorded as the reason of every holding the window takes (free
    /// text without control characters, as the lock's admission policy
    /// requires of a holding's reason).
    #[schemars(length(min = 1, max = MAX_REASON_LEN), regex(pattern = crate::crd::DISPLAY_TEXT_PATTERN))]
    pub reason: String,

    /// What happens to an environment held when the window opens: Queue
    /// (the default) waits at the head of its queue and takes it when it is
    /// released or expires; TakeOver overrides the holding as `--force`
    /// does, and records whom it overrode.
    #[serde(default)]
    pub when_held: WhenHeld,

    /// No new opening starts while true; an opening under way runs to its
    /// end (release its locks with force-release to end it early).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
}

fn environments_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    crate::environment::names_schema()
}

/// What a window does to a held environment when it opens.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WhenHeld {
    /// Wait at the head of the environment's queue.
    #[default]
    Queue,
    /// Override the holding (the window's identity has the force permission).
    TakeOver,
}

/// What the controller observed and did.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FreezeWindowStatus {
    /// Ready: whether the schedule, time zone and duration are usable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// Start of the current or next opening.
    #[serde(default, with = "StrictOptionalTime")]
    #[schemars(with = "Option<StrictTime>")]
    pub next_start: Option<DateTime<Utc>>,

    /// End of the current or next opening.
    #[serde(default, with = "StrictOptionalTime")]
    #[schemars(with = "Option<StrictTime>")]
    pub next_end: Option<DateTime<Utc>>,

    /// The opening under way, once the controller has taken its locks.
    pub open: Option<Opening>,

    /// Start of the last opening the controller handled: each opening's
    /// locks are taken once, so an admin's override stands until the next.
    #[serde(default, with = "StrictOptionalTime")]
    #[schemars(with = "Option<StrictTime>")]
    pub last_opened: Option<DateTime<Utc>>,

    /// The generation the status describes.
    pub observed_generation: Option<i64>,
}

/// One opening and what became of each environment.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Opening {
    /// When the opening started.
    #[serde(with = "StrictTime")]
    #[schemars(with = "StrictTime")]
    pub start: DateTime<Utc>,
    /// When it ends: the window's holdings expire then.
    #[serde(with = "StrictTime")]
    #[schemars(with = "StrictTime")]
    pub end: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::environment::MAX_NAMED_ENVIRONMENTS))]
    pub environments: Vec<EnvironmentOutcome>,
}

/// What the window did to one environment at an opening.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentOutcome {
    pub name: String,
    /// Held, Queued, TookOver or Failed.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Parses a stored date-time of a window (the schema's rule).
fn parse_instant(text: &str) -> Result<DateTime<Utc>, ScheduleError> {
    crate::crd::parse_time(text).ok_or_else(|| ScheduleError::Instant(text.to_string()))
}

impl FreezeWindowSpec {
    /// When the window is open, or why its spec cannot say.
    pub fn recurrence(&self) -> Result<Recurrence, ScheduleError> {
        match (&self.schedule, &self.start, &self.end) {
            (Some(schedule), _, _) => Ok(Recurrence::Cron {
                schedule: schedule.parse()?,
                zone: schedule::parse_zone(self.time_zone.as_deref().unwrap_or("UTC"))?,
                duration: schedule::parse_duration(self.duration.as_deref().unwrap_or(""))?,
            }),
            (None, Some(start), Some(end)) => Ok(Recurrence::Once(Interval {
                start: parse_instant(start)?,
                end: parse_instant(end)?,
            })),
            _ => Err(ScheduleError::Incomplete),
        }
    }

    /// Whether this window freezes the lock named `environment`.
    pub fn covers(&self, environment: &str) -> bool {
        self.all_environments || self.environments.iter().any(|e| e == environment)
    }
}

/// The deployment ID of the window's holdings for one opening: the window's
/// UID and the opening's start, so a holding is known as this opening's.
pub fn deployment_id(window_uid: &str, opening_start: DateTime<Utc>) -> String {
    format!("freezewindow/{window_uid}/{}", opening_start.timestamp())
}
