//! The standard status conditions (`metav1.Condition`) of the deploylock
//! resources, set one way for all of them: as apimachinery's
//! `meta.SetStatusCondition` does, a condition's last transition time moves
//! only when its status does.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Condition type saying whether a resource's spec is usable (a
/// subscription's Secrets, a window's schedule).
pub const READY_CONDITION: &str = "Ready";

/// What a condition says, without its times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation<'a> {
    pub type_: &'a str,
    pub status: bool,
    pub reason: &'a str,
    pub message: &'a str,
}

impl Observation<'_> {
    fn status_text(&self) -> &'static str {
        if self.status { "True" } else { "False" }
    }

    /// Whether `conditions` say this already, for `generation` (same
    /// status, reason and message, observed at that generation).
    pub fn is_recorded_in(&self, conditions: &[Condition], generation: Option<i64>) -> bool {
        conditions.iter().any(|c| {
            c.type_ == self.type_
                && c.status == self.status_text()
                && c.reason == self.reason
                && c.message == self.message
                && c.observed_generation == generation
        })
    }

    /// Records this in `conditions` for `generation` at `now` unless they
    /// say it already; whether anything changed.
    pub fn record_if_changed(
        &self,
        conditions: &mut Vec<Condition>,
        generation: Option<i64>,
        now: DateTime<Utc>,
    ) -> bool {
        if self.is_recorded_in(conditions, generation) {
            return false;
        }
        self.record(conditions, generation, now);
        true
    }

    /// The condition saying this for `generation` at `now`; the last
    /// transition time of the stored one (in `previous`) is kept when its
    /// status is the same.
    pub fn condition(
        &self,
        previous: &[Condition],
        generation: Option<i64>,
        now: DateTime<Utc>,
    ) -> Condition {
        let status = self.status_text();
        let last_transition_time = previous
            .iter()
            .find(|c| c.type_ == self.type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| condition_time(now));
        Condition {
            type_: self.type_.to_string(),
            status: status.to_string(),
            reason: self.reason.to_string(),
            message: self.message.to_string(),
            observed_generation: generation,
            last_transition_time,
        }
    }

    /// Records this in `conditions` for `generation` at `now`, in place of
    /// the condition of the same type.
    pub fn record(
        &self,
        conditions: &mut Vec<Condition>,
        generation: Option<i64>,
        now: DateTime<Utc>,
    ) {
        let condition = self.condition(conditions, generation, now);
        match conditions.iter_mut().find(|c| c.type_ == self.type_) {
            Some(existing) => *existing = condition,
            None => conditions.push(condition),
        }
    }
}

/// Whether the condition `type_` is True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

/// The condition `type_` when it is False.
pub fn false_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == "False")
}

/// A condition's time: whole seconds, as the API server stores it.
fn condition_time(now: DateTime<Utc>) -> Time {
    Time(Timestamp::from_second(now.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    fn ready(status: bool, reason: &'static str) -> Observation<'static> {
        Observation {
            type_: READY_CONDITION,
            status,
            reason,
            message: "why",
        }
    }

    #[test]
    fn the_transition_time_moves_only_with_the_status() {
        let mut conditions = Vec::new();
        ready(true, "Ok").record(&mut conditions, Some(1), at(0));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, condition_time(at(0)));

        // Same status, new reason and generation: the time stays.
        ready(true, "StillOk").record(&mut conditions, Some(2), at(10));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].reason, "StillOk");
        assert_eq!(conditions[0].observed_generation, Some(2));
        assert_eq!(conditions[0].last_transition_time, condition_time(at(0)));

        // A new status: a new time.
        ready(false, "Broken").record(&mut conditions, Some(2), at(20));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].status, "False");
        assert_eq!(conditions[0].last_transition_time, condition_time(at(20)));
        assert!(!is_true(&conditions, READY_CONDITION));
        assert_eq!(
            false_condition(&conditions, READY_CONDITION).map(|c| c.reason.as_str()),
            Some("Broken")
        );
    }

    #[test]
    fn a_recorded_observation_is_recognised_and_others_are_kept() {
        let other = Observation {
            type_: "Locked",
            status: true,
            reason: "Locked",
            message: "",
        };
        let mut conditions = Vec::new();
        other.record(&mut conditions, None, at(0));
        ready(true, "Ok").record(&mut conditions, None, at(0));
        assert_eq!(conditions.len(), 2);
        assert!(ready(true, "Ok").is_recorded_in(&conditions, None));
        assert!(!ready(true, "Other").is_recorded_in(&conditions, None));
        assert!(!ready(false, "Ok").is_recorded_in(&conditions, None));
        assert!(is_true(&conditions, "Locked"));
    }

    #[test]
    fn a_new_generation_is_recorded_even_when_the_words_are_the_same() {
        let mut conditions = Vec::new();
        assert!(ready(true, "Ok").record_if_changed(&mut conditions, Some(1), at(0)));
        assert!(!ready(true, "Ok").record_if_changed(&mut conditions, Some(1), at(5)));
        assert!(ready(true, "Ok").record_if_changed(&mut conditions, Some(2), at(10)));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].observed_generation, Some(2));
        assert_eq!(conditions[0].last_transition_time, condition_time(at(0)));
    }
}
