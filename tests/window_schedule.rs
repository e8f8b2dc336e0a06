//! The freeze windows' schedule arithmetic, on fixed clocks across time
//! zones and daylight-saving changes (time-zone data: chrono-tz), and the
//! controller's pure decision of when to open.

use chrono::{DateTime, Duration, Utc};
use deploylock::windows::plan::{Step, holding_duration, next_step};
use deploylock::windows::schedule::{
    Cron, Interval, Recurrence, ScheduleError, parse_duration, parse_zone,
};
use deploylock::windows::{FreezeWindowSpec, deployment_id};
use proptest::prelude::*;

fn at(text: &str) -> DateTime<Utc> {
    text.parse()
        .unwrap_or_else(|err| panic!("bad test instant {text}: {err}"))
}

fn cron(schedule: &str, zone: &str, duration: &str) -> Recurrence {
    Recurrence::Cron {
        schedule: schedule
            .parse()
            .unwrap_or_else(|err| panic!("{schedule}: {err}")),
        zone: parse_zone(zone).unwrap_or_else(|err| panic!("{err}")),
        duration: parse_duration(duration).unwrap_or_else(|err| panic!("{err}")),
    }
}

#[test]
fn cron_fields_names_ranges_lists_and_steps_parse() {
    for good in [
        "* * * * *",
        "30 2 * * *",
        "0 22 * * FRI",
        "0 22 * * fri",
        "0 0 24-26 DEC *",
        "*/15 9-17 * * 1-5",
        "5/20 * * * *",
        "0 0 1,15 * *",
        "0 0 * * 7",
        "@daily",
        "@weekly",
        "@monthly",
        "@yearly",
        "@hourly",
        "0 0 29 2 *",
    ] {
        assert!(good.parse::<Cron>().is_ok(), "{good} should parse");
    }
}

#[test]
fn bad_cron_schedules_are_refused_with_what_is_wrong() {
    let cases: [(&str, &str); 10] = [
        ("* * * *", "five fields"),
        ("* * * * * *", "five fields"),
        ("60 * * * *", "minute"),
        ("* 24 * * *", "hour"),
        ("* * 0 * *", "day of month"),
        ("* * * 13 *", "month"),
        ("* * * * 8", "day of week"),
        ("5-3 * * * *", "minute"),
        ("*/0 * * * *", "minute"),
        ("0 0 30 2 *", "never"),
    ];
    for (bad, says) in cases {
        match bad.parse::<Cron>() {
            Ok(_) => panic!("{bad} should be refused"),
            Err(err) => assert!(err.to_string().contains(says), "{bad}: {err}"),
        }
    }
}

#[test]
fn durations_are_written_as_kubernetes_writes_them() {
    assert_eq!(parse_duration("8h"), Ok(Duration::hours(8)));
    assert_eq!(parse_duration("90m"), Ok(Duration::minutes(90)));
    assert_eq!(
        parse_duration("1h30m15s"),
        Ok(Duration::seconds(3600 + 1800 + 15))
    );
    for bad in [
        "",
        "0h",
        "1d",
        "h",
        "30m1h",
        "1h1h",
        "1.5h",
        "-1h",
        "99999999h",
    ] {
        assert!(
            matches!(parse_duration(bad), Err(ScheduleError::Duration(_))),
            "{bad}"
        );
    }
}

#[test]
fn unknown_time_zones_are_refused() {
    assert!(parse_zone("Europe/Berlin").is_ok());
    assert!(parse_zone("UTC").is_ok());
    assert!(matches!(
        parse_zone("Mars/Olympus"),
        Err(ScheduleError::TimeZone(_))
    ));
}

#[test]
fn a_nightly_window_in_utc_opens_each_night() {
    let nightly = cron("0 22 * * *", "UTC", "8h");
    assert_eq!(
        nightly.next_start_after(at("2026-11-27T12:00:00Z")),
        Some(at("2026-11-27T22:00:00Z"))
    );
    // Strictly after: at the start, the next one is tomorrow's.
    assert_eq!(
        nightly.next_start_after(at("2026-11-27T22:00:00Z")),
        Some(at("2026-11-28T22:00:00Z"))
    );
    let open = Interval {
        start: at("2026-11-27T22:00:00Z"),
        end: at("2026-11-28T06:00:00Z"),
    };
    assert_eq!(nightly.open_at(at("2026-11-28T03:00:00Z")), Some(open));
    assert_eq!(nightly.open_at(at("2026-11-27T22:00:00Z")), Some(open));
    // The end is not part of it.
    assert_eq!(nightly.open_at(at("2026-11-28T06:00:00Z")), None);
    assert_eq!(nightly.open_at(at("2026-11-28T12:00:00Z")), None);
}

#[test]
fn a_schedule_reads_wall_clock_time_in_its_zone() {
    // 22:00 in Berlin is 21:00Z in winter and 20:00Z in summer.
    let berlin = cron("0 22 * * *", "Europe/Berlin", "1h");
    assert_eq!(
        berlin.next_start_after(at("2026-01-10T00:00:00Z")),
        Some(at("2026-01-10T21:00:00Z"))
    );
    assert_eq!(
        berlin.next_start_after(at("2026-07-10T00:00:00Z")),
        Some(at("2026-07-10T20:00:00Z"))
    );
    // New York is behind UTC.
    let new_york = cron("30 9 * * MON", "America/New_York", "1h");
    // Monday 30 November 2026, 09:30 EST.
    assert_eq!(
        new_york.next_start_after(at("2026-11-27T00:00:00Z")),
        Some(at("2026-11-30T14:30:00Z"))
    );
}

#[test]
fn a_time_the_clock_skips_opens_the_window_when_the_clock_jumps() {
    // Berlin, 29 March 2026: 02:00 CET jumps to 03:00 CEST (01:00Z).
    let window = cron("30 2 * * *", "Europe/Berlin", "2h");
    // The day before: 02:30 CET = 01:30Z.
    assert_eq!(
        window.next_start_after(at("2026-03-28T00:00:00Z")),
        Some(at("2026-03-28T01:30:00Z"))
    );
    // The day of the change: no 02:30; it opens at the jump, for 2 hours.
    let skipped = window.next_start_after(at("2026-03-28T12:00:00Z"));
    assert_eq!(skipped, Some(at("2026-03-29T01:00:00Z")));
    assert_eq!(
        window.open_at(at("2026-03-29T02:00:00Z")),
        Some(Interval {
            start: at("2026-03-29T01:00:00Z"),
            end: at("2026-03-29T03:00:00Z"),
        })
    );
    // The day after: 02:30 CEST = 00:30Z.
    assert_eq!(
        window.next_start_after(at("2026-03-29T12:00:00Z")),
        Some(at("2026-03-30T00:30:00Z"))
    );
}

#[test]
fn a_time_the_clock_repeats_opens_the_window_once() {
    // Berlin, 25 October 2026: 03:00 CEST goes back to 02:00 CET (01:00Z),
    // so 02:30 happens at 00:30Z and again at 01:30Z.
    let window = cron("30 2 * * *", "Europe/Berlin", "30m");
    assert_eq!(
        window.next_start_after(at("2026-10-24T12:00:00Z")),
        Some(at("2026-10-25T00:30:00Z"))
    );
    // After the first 02:30, the next opening is the next day's.
    assert_eq!(
        window.next_start_after(at("2026-10-25T00:30:00Z")),
        Some(at("2026-10-26T01:30:00Z"))
    );
    assert_eq!(window.open_at(at("2026-10-25T01:45:00Z")), None);
}

#[test]
fn a_duration_is_elapsed_time_across_a_clock_change() {
    // Midnight to 8 hours later on the night Berlin springs forward: the
    // window ends at 09:00 local (07:00Z), 8 real hours on.
    let window = cron("0 0 * * *", "Europe/Berlin", "8h");
    assert_eq!(
        window.open_at(at("2026-03-29T06:59:59Z")),
        Some(Interval {
            start: at("2026-03-28T23:00:00Z"),
            end: at("2026-03-29T07:00:00Z"),
        })
    );
}

#[test]
fn both_day_fields_restricted_match_either_as_cron_does() {
    // "On the 13th, or on any Friday."
    let window = cron("0 12 13 * FRI", "UTC", "1h");
    // Friday 27 November 2026.
    assert_eq!(
        window.next_start_after(at("2026-11-26T13:00:00Z")),
        Some(at("2026-11-27T12:00:00Z"))
    );
    // Sunday 13 December 2026 (after Friday 11 December).
    assert_eq!(
        window.next_start_after(at("2026-12-11T13:00:00Z")),
        Some(at("2026-12-13T12:00:00Z"))
    );
}

#[test]
fn overlapping_openings_take_the_later_one() {
    let window = cron("0 * * * *", "UTC", "90m");
    assert_eq!(
        window.open_at(at("2026-11-27T10:15:00Z")),
        Some(Interval {
            start: at("2026-11-27T10:00:00Z"),
            end: at("2026-11-27T11:30:00Z"),
        })
    );
}

#[test]
fn a_one_off_window_is_open_between_its_instants() {
    let holiday = Interval {
        start: at("2026-12-24T00:00:00Z"),
        end: at("2026-12-27T00:00:00Z"),
    };
    let window = Recurrence::Once(holiday);
    assert_eq!(window.open_at(at("2026-12-23T23:59:59Z")), None);
    assert_eq!(window.open_at(at("2026-12-25T12:00:00Z")), Some(holiday));
    assert_eq!(window.open_at(at("2026-12-27T00:00:00Z")), None);
    assert_eq!(
        window.next_start_after(at("2026-11-27T00:00:00Z")),
        Some(holiday.start)
    );
    assert_eq!(window.next_start_after(holiday.start), None);
    assert_eq!(
        window.current_or_next(at("2026-11-27T00:00:00Z")),
        Some(holiday)
    );
}

#[test]
fn the_spec_says_which_recurrence_and_refuses_an_incomplete_one() {
    let spec = FreezeWindowSpec {
        schedule: Some("0 22 * * 5".into()),
        time_zone: Some("Europe/Berlin".into()),
        duration: Some("60h".into()),
        environments: vec!["production".into()],
        reason: "weekend".into(),
        ..Default::default()
    };
    assert!(matches!(spec.recurrence(), Ok(Recurrence::Cron { .. })));
    assert!(spec.covers("production"));
    assert!(!spec.covers("staging"));
    let bad_zone = FreezeWindowSpec {
        time_zone: Some("Nowhere/Special".into()),
        ..spec.clone()
    };
    assert!(matches!(
        bad_zone.recurrence(),
        Err(ScheduleError::TimeZone(_))
    ));
    let once = FreezeWindowSpec {
        schedule: None,
        time_zone: None,
        duration: None,
        start: Some("2026-12-24T00:00:00Z".into()),
        end: Some("2026-12-27T00:00:00Z".into()),
        all_environments: true,
        environments: vec![],
        ..spec.clone()
    };
    assert!(matches!(once.recurrence(), Ok(Recurrence::Once(_))));
    assert!(once.covers("anything"));
    let neither = FreezeWindowSpec {
        schedule: None,
        ..spec
    };
    assert_eq!(neither.recurrence(), Err(ScheduleError::Incomplete));
}

#[test]
fn the_controller_opens_each_opening_once_and_late_but_never_past_its_end() {
    let nightly = cron("0 22 * * *", "UTC", "8h");
    let start = at("2026-11-27T22:00:00Z");
    let end = at("2026-11-28T06:00:00Z");
    let open = Interval { start, end };
    // Before: wait for the start.
    assert_eq!(
        next_step(&nightly, false, None, at("2026-11-27T21:00:00Z")),
        Step::Wait { until: Some(start) }
    );
    // At the start: open.
    assert_eq!(next_step(&nightly, false, None, start), Step::Open(open));
    // A controller that was down at the start opens it late, with its end.
    assert_eq!(
        next_step(&nightly, false, None, at("2026-11-28T05:00:00Z")),
        Step::Open(open)
    );
    // Handled already (a restart mid-window): wait for the end.
    assert_eq!(
        next_step(&nightly, false, Some(start), at("2026-11-28T01:00:00Z")),
        Step::Wait { until: Some(end) }
    );
    // Suspended: no opening.
    assert_eq!(
        next_step(&nightly, true, None, at("2026-11-28T01:00:00Z")),
        Step::Wait { until: Some(end) }
    );
    // After the end: the next night.
    assert_eq!(
        next_step(&nightly, false, Some(start), end),
        Step::Wait {
            until: Some(at("2026-11-28T22:00:00Z"))
        }
    );
}

#[test]
fn a_holding_lasts_to_the_end_at_most_seven_days_and_at_least_a_minute() {
    let now = at("2026-11-27T00:00:00Z");
    assert_eq!(
        holding_duration(at("2026-11-27T08:00:00Z"), now),
        Some(Duration::hours(8))
    );
    assert_eq!(
        holding_duration(at("2026-12-27T00:00:00Z"), now),
        Some(Duration::days(7))
    );
    assert_eq!(holding_duration(at("2026-11-27T00:00:59Z"), now), None);
    assert_eq!(
        deployment_id("uid-1", at("2026-11-27T22:00:00Z")),
        "freezewindow/uid-1/1795816800"
    );
}

const ZONES: [&str; 6] = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Kathmandu",
    "America/Santiago",
];

fn arbitrary_schedule() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            Just("*".to_string()),
            (0u32..60).prop_map(|m| m.to_string()),
            Just("*/15".to_string())
        ],
        prop_oneof![
            Just("*".to_string()),
            (0u32..24).prop_map(|h| h.to_string()),
            Just("1-3".to_string())
        ],
        prop_oneof![
            Just("*".to_string()),
            (1u32..29).prop_map(|d| d.to_string())
        ],
        prop_oneof![
            Just("*".to_string()),
            (1u32..13).prop_map(|m| m.to_string())
        ],
        prop_oneof![Just("*".to_string()), (0u32..7).prop_map(|d| d.to_string())],
    )
        .prop_map(|(m, h, dom, mon, dow)| format!("{m} {h} {dom} {mon} {dow}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// The next start is after the instant asked about, opens an opening
    /// that starts there, and is the first: just before it, no later
    /// opening has started.
    #[test]
    fn next_start_is_the_first_start_after(
        schedule in arbitrary_schedule(),
        zone in 0usize..ZONES.len(),
        seconds in 1_700_000_000i64..1_900_000_000,
        minutes in 1i64..600,
    ) {
        let window = cron(&schedule, ZONES[zone], &format!("{minutes}m"));
        let now = DateTime::from_timestamp(seconds, 0).unwrap_or_default();
        if let Some(start) = window.next_start_after(now) {
            prop_assert!(start > now);
            let open = window.open_at(start);
            prop_assert_eq!(open.map(|o| o.start), Some(start));
            prop_assert_eq!(open.map(|o| o.end), Some(start + Duration::minutes(minutes)));
            // No start lies strictly between now and `start`.
            let before = start - Duration::seconds(1);
            if before > now {
                let earlier = window.open_at(before);
                prop_assert!(earlier.is_none_or(|o| o.start <= now));
            }
        }
    }

    /// Open at an instant means an opening holds it; an opening found is
    /// never longer than the window's duration.
    #[test]
    fn open_at_holds_the_instant(
        schedule in arbitrary_schedule(),
        zone in 0usize..ZONES.len(),
        seconds in 1_700_000_000i64..1_900_000_000,
        minutes in 1i64..600,
    ) {
        let window = cron(&schedule, ZONES[zone], &format!("{minutes}m"));
        let now = DateTime::from_timestamp(seconds, 0).unwrap_or_default();
        if let Some(open) = window.open_at(now) {
            prop_assert!(open.contains(now));
            prop_assert_eq!(open.end - open.start, Duration::minutes(minutes));
        }
    }
}
