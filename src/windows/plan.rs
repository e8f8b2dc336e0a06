//! What the controller does about one window now: pure, decided on the
//! API server's clock.

use chrono::{DateTime, Duration, Utc};

use super::schedule::{Interval, Recurrence};

/// The controller's next step for one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Take the opening's locks now: it is open and its locks were not
    /// taken yet (also when the controller was down at its start: it opens
    /// late, never past its end).
    Open(Interval),
    /// Nothing until `until` (the next start, or the end of the opening
    /// under way); `None`: never again.
    Wait { until: Option<DateTime<Utc>> },
}

/// Decides the next step of a window whose last handled opening started at
/// `last_opened`.
pub fn next_step(
    recurrence: &Recurrence,
    suspended: bool,
    last_opened: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Step {
    let open = recurrence.open_at(now);
    if let Some(interval) = open
        && !suspended
        && last_opened != Some(interval.start)
    {
        return Step::Open(interval);
    }
    let next_start = recurrence.next_start_after(now);
    let until = match (open.map(|interval| interval.end), next_start) {
        (Some(end), Some(start)) => Some(end.min(start)),
        (end, start) => end.or(start),
    };
    Step::Wait { until }
}

/// How long the window's holding of an opening ending at `end` may last
/// from `now`: to the end, or as far as a lock may be taken (the controller
/// extends it later), or `None` when less than the shortest holding is left.
pub fn holding_duration(end: DateTime<Utc>, now: DateTime<Utc>) -> Option<Duration> {
    let left = end.signed_duration_since(now);
    if left < Duration::seconds(crate::crd::MIN_DURATION_SECONDS) {
        return None;
    }
    Some(left.min(Duration::seconds(crate::crd::MAX_DURATION_SECONDS)))
}
