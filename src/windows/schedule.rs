//! When a freeze window is open: pure arithmetic on instants, no I/O.
//!
//! A recurring window opens at each time a five-field cron schedule names,
//! read as wall-clock time in an IANA time zone, and stays open for a fixed
//! duration of elapsed time. A one-off window is an absolute interval.
//!
//! Wall-clock times that a time-zone change skips or repeats:
//! - a time that does not exist that day (the clock jumps from 02:00 to 03:00
//!   and the schedule says 02:30) opens the window when the jump happens
//!   (03:00 local), for its full duration;
//! - a time that happens twice (the clock goes back from 03:00 to 02:00 and
//!   the schedule says 02:30) opens the window once, at the first 02:30.
//!
//! A duration is elapsed time: an 8-hour window that spans a change lasts
//! 8 hours, so it closes at a wall-clock time an hour earlier or later.

use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// How far ahead (or back) a schedule is searched for its next (previous)
/// time: long enough for "29 February, a Monday" (28 years apart at most).
const SEARCH_DAYS: u32 = 29 * 366;

/// Longest gap a time-zone change ever made in a day (Samoa skipped a whole
/// day in 2011); a skipped wall-clock time is looked up at most this far on.
const LONGEST_GAP_MINUTES: i64 = 24 * 60 + 60;

/// Why a schedule, time zone or duration is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "a cron schedule has five fields (minute hour day-of-month month day-of-week), or is one of @yearly, @monthly, @weekly, @daily, @hourly; got {0:?}"
    )]
    FieldCount(String),
    #[error(
        "cron field {field} ({range}): {value:?} is not a number, name, range, list or step in range"
    )]
    Field {
        field: &'static str,
        range: &'static str,
        value: String,
    },
    #[error("the schedule {0:?} never names a time that exists (for example 30 February)")]
    NeverOccurs(String),
    #[error("unknown time zone {0:?}: use an IANA name such as Europe/Berlin or UTC")]
    TimeZone(String),
    #[error("{0:?} is not a date-time in RFC 3339 form in UTC, such as 2026-12-24T00:00:00Z")]
    Instant(String),
    #[error("a window has either a schedule (with a duration) or a start and an end")]
    Incomplete,
    #[error(
        "duration {0:?}: write hours, minutes and seconds as Kubernetes does, such as 8h, 90m or 1h30m"
    )]
    Duration(String),
}

/// One cron field: the allowed values as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Field {
    bits: u64,
    /// Written as `*` (or `*/1`): for days, "any" rather than a restriction.
    any: bool,
}

impl Field {
    fn contains(self, value: u32) -> bool {
        value < 64 && self.bits & (1 << value) != 0
    }

    fn values(self, low: u32, high: u32) -> impl DoubleEndedIterator<Item = u32> {
        (low..=high).filter(move |value| self.contains(*value))
    }
}

/// What one cron field may hold.
struct FieldRule {
    name: &'static str,
    range: &'static str,
    low: u32,
    high: u32,
    names: &'static [&'static str],
}

const MINUTE: FieldRule = FieldRule {
    name: "minute",
    range: "0-59",
    low: 0,
    high: 59,
    names: &[],
};
const HOUR: FieldRule = FieldRule {
    name: "hour",
    range: "0-23",
    low: 0,
    high: 23,
    names: &[],
};
const DAY_OF_MONTH: FieldRule = FieldRule {
    name: "day of month",
    range: "1-31",
    low: 1,
    high: 31,
    names: &[],
};
const MONTH: FieldRule = FieldRule {
    name: "month",
    range: "1-12 or JAN-DEC",
    low: 1,
    high: 12,
    names: &[
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ],
};
const DAY_OF_WEEK: FieldRule = FieldRule {
    name: "day of week",
    range: "0-7 or SUN-SAT, 0 and 7 both Sunday",
    low: 0,
    high: 7,
    names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
};

impl FieldRule {
    fn error(&self, value: &str) -> ScheduleError {
        ScheduleError::Field {
            field: self.name,
            range: self.range,
            value: value.to_string(),
        }
    }

    fn number(&self, text: &str) -> Result<u32, ScheduleError> {
        let upper = text.to_ascii_uppercase();
        let value = match self.names.iter().position(|name| *name == upper) {
            Some(index) => u32::try_from(index)
                .ok()
                .and_then(|index| index.checked_add(self.low))
                .ok_or_else(|| self.error(text))?,
            None if !text.is_empty()
                && text.len() <= 2
                && text.bytes().all(|b| b.is_ascii_digit()) =>
            {
                text.parse().map_err(|_| self.error(text))?
            }
            None => return Err(self.error(text)),
        };
        if (self.low..=self.high).contains(&value) {
            Ok(value)
        } else {
            Err(self.error(text))
        }
    }

    fn parse(&self, text: &str) -> Result<Field, ScheduleError> {
        let mut bits = 0_u64;
        let mut any = false;
        for part in text.split(',') {
            let (span, step) = match part.split_once('/') {
                Some((span, step)) => {
                    let step: u32 = match step.parse() {
                        Ok(step) if step >= 1 && step <= self.high => step,
                        _ => return Err(self.error(part)),
                    };
                    (span, step)
                }
                None => (part, 1),
            };
            let (first, last) = if span == "*" {
                any = any || step == 1;
                (self.low, self.high)
            } else if let Some((first, last)) = span.split_once('-') {
                let (first, last) = (self.number(first)?, self.number(last)?);
                if first > last {
                    return Err(self.error(part));
                }
                (first, last)
            } else {
                let first = self.number(span)?;
                // `5/15` means from 5 to the end, every 15.
                (first, if part.contains('/') { self.high } else { first })
            };
            let mut value = first;
            while value <= last {
                bits |= 1 << value;
                match value.checked_add(step) {
                    Some(next) => value = next,
                    None => break,
                }
            }
        }
        Ok(Field { bits, any })
    }
}

/// A five-field cron schedule (minute hour day-of-month month day-of-week),
/// with cron's rule that when both day fields are restricted, a day matching
/// either one matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: Field,
    hours: Field,
    days_of_month: Field,
    months: Field,
    days_of_week: Field,
    text: String,
}

impl FromStr for Cron {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<Cron, ScheduleError> {
        let expanded = match text.trim() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            other => other,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [minutes, hours, days_of_month, months, days_of_week] = fields[..] else {
            return Err(ScheduleError::FieldCount(text.to_string()));
        };
        let mut days_of_week = DAY_OF_WEEK.parse(days_of_week)?;
        // 7 is Sunday too.
        if days_of_week.contains(7) {
            days_of_week.bits = (days_of_week.bits | 1) & !(1 << 7);
        }
        let cron = Cron {
            minutes: MINUTE.parse(minutes)?,
            hours: HOUR.parse(hours)?,
            days_of_month: DAY_OF_MONTH.parse(days_of_month)?,
            months: MONTH.parse(months)?,
            days_of_week,
            text: text.to_string(),
        };
        if !cron.names_a_real_day() {
            return Err(ScheduleError::NeverOccurs(text.to_string()));
        }
        Ok(cron)
    }
}

impl std::fmt::Display for Cron {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Cron {
    fn day_matches(&self, day: NaiveDate) -> bool {
        if !self.months.contains(day.month()) {
            return false;
        }
        let by_month = self.days_of_month.contains(day.day());
        let by_week = self
            .days_of_week
            .contains(day.weekday().num_days_from_sunday());
        match (self.days_of_month.any, self.days_of_week.any) {
            (true, true) => true,
            (true, false) => by_week,
            (false, true) => by_month,
            (false, false) => by_month || by_week,
        }
    }

    /// Some day in a 29-year span matches (so `0 0 30 2 *` is refused).
    fn names_a_real_day(&self) -> bool {
        let Some(mut day) = NaiveDate::from_ymd_opt(2000, 1, 1) else {
            return false;
        };
        for _ in 0..SEARCH_DAYS {
            if self.day_matches(day) {
                return true;
            }
            match day.succ_opt() {
                Some(next) => day = next,
                None => return false,
            }
        }
        false
    }

    /// The wall-clock times of one day, in order.
    fn times(&self) -> impl DoubleEndedIterator<Item = (u32, u32)> + '_ {
        self.hours
            .values(0, 23)
            .flat_map(move |hour| self.minutes.values(0, 59).map(move |minute| (hour, minute)))
    }
}

/// The instant a wall-clock time names in `zone`: the earlier one when the
/// time happens twice, the end of the jump when it does not exist.
fn instant_of(zone: Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    match zone.from_local_datetime(&local) {
        LocalResult::Single(at) => Some(at.with_timezone(&Utc)),
        LocalResult::Ambiguous(first, second) => Some(first.min(second).with_timezone(&Utc)),
        LocalResult::None => (1..=LONGEST_GAP_MINUTES).find_map(|minutes| {
            let later = local.checked_add_signed(Duration::minutes(minutes))?;
            zone.from_local_datetime(&later)
                .earliest()
                .map(|at| at.with_timezone(&Utc))
        }),
    }
}

/// Parses a duration written as Kubernetes writes one (`8h`, `90m`,
/// `1h30m`, `45s`): hours, minutes and seconds, each at most once, in that
/// order.
pub fn parse_duration(text: &str) -> Result<Duration, ScheduleError> {
    let error = || ScheduleError::Duration(text.to_string());
    let mut rest = text;
    let mut total = Duration::zero();
    let mut last_unit = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 7 {
            return Err(error());
        }
        let (number, tail) = rest.split_at(digits);
        let number: i64 = number.parse().map_err(|_| error())?;
        let (unit, per) = match tail.as_bytes().first() {
            Some(b'h') => (1, 3600),
            Some(b'm') => (2, 60),
            Some(b's') => (3, 1),
            _ => return Err(error()),
        };
        if unit <= last_unit {
            return Err(error());
        }
        last_unit = unit;
        let seconds = number.checked_mul(per).ok_or_else(error)?;
        total = total
            .checked_add(&Duration::seconds(seconds))
            .ok_or_else(error)?;
        rest = &tail[1..];
    }
    if total <= Duration::zero() {
        return Err(error());
    }
    Ok(total)
}

/// An open interval of time: from `start` (included) to `end` (excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Interval {
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        self.start <= at && at < self.end
    }
}

/// When a window is open.
#[derive(Debug, Clone, PartialEq)]
pub enum Recurrence {
    /// At each time the schedule names in `zone`, for `duration`.
    Cron {
        schedule: Cron,
        zone: Tz,
        duration: Duration,
    },
    /// Once.
    Once(Interval),
}

/// Parses an IANA time-zone name.
pub fn parse_zone(name: &str) -> Result<Tz, ScheduleError> {
    name.parse::<Tz>()
        .map_err(|_| ScheduleError::TimeZone(name.to_string()))
}

impl Recurrence {
    /// The first start strictly after `after`.
    pub fn next_start_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Recurrence::Once(interval) => (interval.start > after).then_some(interval.start),
            Recurrence::Cron { schedule, zone, .. } => {
                // From the day before: a time skipped late that day can
                // open the window on the next.
                let mut day = after.with_timezone(zone).date_naive().pred_opt()?;
                for _ in 0..SEARCH_DAYS {
                    if schedule.day_matches(day) {
                        let found = schedule
                            .times()
                            .filter_map(|(hour, minute)| {
                                instant_of(*zone, day.and_hms_opt(hour, minute, 0)?)
                            })
                            .find(|at| *at > after);
                        if found.is_some() {
                            return found;
                        }
                    }
                    day = day.succ_opt()?;
                }
                None
            }
        }
    }

    /// The last start at or before `at`, looking back at most `within`.
    fn last_start_at_or_before(
        &self,
        at: DateTime<Utc>,
        within: Duration,
    ) -> Option<DateTime<Utc>> {
        match self {
            Recurrence::Once(interval) => (interval.start <= at).then_some(interval.start),
            Recurrence::Cron { schedule, zone, .. } => {
                let earliest = at.checked_sub_signed(within)?;
                // From the day after, and one more day than the span: a
                // day's times can map to the day before or after.
                let mut day = at.with_timezone(zone).date_naive().succ_opt()?;
                let days = within.num_days().checked_add(3)?;
                for _ in 0..days {
                    if schedule.day_matches(day) {
                        let found = schedule
                            .times()
                            .rev()
                            .filter_map(|(hour, minute)| {
                                instant_of(*zone, day.and_hms_opt(hour, minute, 0)?)
                            })
                            .find(|start| *start <= at);
                        if let Some(start) = found {
                            return (start >= earliest).then_some(start);
                        }
                    }
                    day = day.pred_opt()?;
                }
                None
            }
        }
    }

    /// How long each opening lasts.
    fn length_from(&self, start: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Recurrence::Once(interval) => Some(interval.end),
            Recurrence::Cron { duration, .. } => start.checked_add_signed(*duration),
        }
    }

    /// The opening that holds `at`, if the window is open then. When two
    /// openings overlap (a duration longer than the schedule's spacing), the
    /// later one: it is the one that lasts longer.
    pub fn open_at(&self, at: DateTime<Utc>) -> Option<Interval> {
        let within = match self {
            Recurrence::Once(interval) => interval.end.signed_duration_since(interval.start),
            Recurrence::Cron { duration, .. } => *duration,
        };
        let start = self.last_start_at_or_before(at, within)?;
        let interval = Interval {
            start,
            end: self.length_from(start)?,
        };
        interval.contains(at).then_some(interval)
    }

    /// The opening that holds `at`, else the next one.
    pub fn current_or_next(&self, at: DateTime<Utc>) -> Option<Interval> {
        self.open_at(at).or_else(|| {
            let start = self.next_start_after(at)?;
            Some(Interval {
                start,
                end: self.length_from(start)?,
            })
        })
    }
}
