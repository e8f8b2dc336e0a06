//! Hostile data: any object the schema admits, any request: no panic.

use super::*;

/// Instants anywhere in the range the schema's date-time pattern admits
/// (years 0001-9999), including the edges.
fn any_instant() -> impl Strategy<Value = DateTime<Utc>> {
    let first = -62_135_596_800_i64; // 0001-01-01T00:00:00Z
    let last = 253_402_300_799_i64; // 9999-12-31T23:59:59Z
    prop_oneof![
        Just(first),
        Just(last),
        first..=last,
        1_700_000_000_i64..1_900_000_000,
    ]
    .prop_map(|seconds| DateTime::from_timestamp(seconds, 0).unwrap_or(DateTime::<Utc>::MIN_UTC))
}

/// Counters anywhere in the schema's range, edges included.
fn any_counter() -> impl Strategy<Value = i64> {
    let max = deploylock::crd::MAX_SAFE_INTEGER;
    prop_oneof![Just(0), Just(max), Just(max - 1), 0..=max]
}

fn any_hostile_spec() -> impl Strategy<Value = DeploymentLockSpec> {
    (
        any_instant(),
        any_instant(),
        60_i64..=604_800,
        any_counter(),
        any_counter(),
        prop::collection::vec((any_instant(), any_instant(), any::<bool>()), 0..6),
        any::<bool>(),
        prop_oneof![
            Just(LockType::Manual),
            Just(LockType::Automatic),
            Just(LockType::Emergency)
        ],
    )
        .prop_map(
            |(acquired_at, expires_at, duration, token, sequence, waiters, held, lock_type)| {
                let holder = held.then(|| LockHolder {
                    lock_id: "lock-x".into(),
                    user: "mallory".into(),
                    owner: "mallory".into(),
                    lock_type,
                    reason: "hostile".into(),
                    acquired_at,
                    expires_at,
                    duration_seconds: duration,
                    deployment_id: None,
                    metadata: BTreeMap::new(),
                    overrode: None,
                    group_id: None,
                });
                DeploymentLockSpec {
                    environment: ENV.into(),
                    holder,
                    fencing_token: token,
                    queue: waiters
                        .into_iter()
                        .enumerate()
                        .map(|(i, (since, heartbeat_at, newest_first))| Waiter {
                            id: format!("w{i}"),
                            user: format!("user{i}"),
                            owner: format!("user{i}"),
                            reason: "wait".into(),
                            since,
                            heartbeat_at,
                            newest_first,
                        })
                        .collect(),
                    history: vec![HistoryEntry {
                        sequence,
                        action: HistoryAction::Acquired,
                        at: acquired_at,
                        lock_id: "lock-x".into(),
                        by: "mallory".into(),
                        owner: "mallory".into(),
                        reason: "hostile".into(),
                        expires_at: Some(expires_at),
                    }],
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..ProptestConfig::default()
    })]

    /// Whatever the schema lets a hostile writer store, the rules decide
    /// every request without panicking, and never write a counter beyond
    /// JSON's safe integer range.
    #[test]
    fn hostile_objects_never_make_the_rules_panic(
        spec in any_hostile_spec(),
        now in any_instant(),
        duration in 60_i64..=604_800,
    ) {
        let mallory = person("mallory");
        let alice = person("alice");
        let duration = Duration::seconds(duration);
        let mut forced = acquire_request(&alice, "lock-f", "hotfix", duration);
        forced.force = true;
        let requests = vec![
            Request::Acquire(acquire_request(&alice, "lock-a", "deploy", duration)),
            Request::Acquire(forced),
            release(&mallory, None),
            force_release(&alice, "incident"),
            extend(&mallory, duration, None),
            clear("lock-x", Duration::hours(1)),
            Request::JoinQueue {
                actor: alice.clone(),
                waiter_id: "w-alice".into(),
                reason: "wait".into(),
                newest_first: false,
            },
            Request::LeaveQueue { waiter_id: "w0".into() },
        ];
        let _ = state_at(&spec, now);
        let _ = next_waiter(&spec, now);
        for request in &requests {
            for current in [Some(&spec), None] {
                if let Ok(Decision::Change { next, .. } | Decision::Queue { next }) =
                    decide(ENV, current, now, request)
                {
                    prop_assert!(next.fencing_token <= deploylock::crd::MAX_SAFE_INTEGER);
                    prop_assert!(next
                        .history
                        .iter()
                        .all(|entry| entry.sequence <= deploylock::crd::MAX_SAFE_INTEGER));
                }
            }
        }
    }

    /// The strict date-time parser accepts exactly what it writes and never
    /// panics on anything else.
    #[test]
    fn the_stored_date_time_form_round_trips(instant in any_instant(), junk in ".{0,40}") {
        let written = instant.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        prop_assert_eq!(deploylock::crd::parse_time(&written), Some(instant));
        let _ = deploylock::crd::parse_time(&junk);
        prop_assert_eq!(deploylock::crd::parse_time(&format!("{written}T")), None);
        prop_assert_eq!(deploylock::crd::parse_time("0000-01-01T00:00:00Z"), None);
    }
}
