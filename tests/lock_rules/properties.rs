//! Properties over random sequences of requests, checked against an independent model of holdings.

use super::*;

/// The bounds of a lock duration, stated independently of the crate's check.
fn acceptable_duration(duration: Duration) -> bool {
    duration >= Duration::seconds(MIN_DURATION_SECONDS)
        && duration <= Duration::seconds(MAX_DURATION_SECONDS)
        && duration
            .num_nanoseconds()
            .is_some_and(|n| n % 1_000_000_000 == 0)
}

#[derive(Clone, Debug)]
enum Advance {
    By(Duration),
    /// Exactly to the current holding's expiry (if it is ahead).
    ToExpiry,
    /// One nanosecond before the current holding's expiry (if it is ahead).
    JustBeforeExpiry,
}

#[derive(Clone, Debug)]
enum Op {
    Acquire {
        who: usize,
        force: bool,
        lock_type: LockType,
        duration: Duration,
        blank_reason: bool,
    },
    Release {
        who: usize,
        with_lock_id: bool,
    },
    ForceRelease {
        who: usize,
        blank_reason: bool,
    },
    Extend {
        who: usize,
        duration: Duration,
        with_lock_id: bool,
    },
    /// The controller's housekeeping, naming the current holding or (as
    /// after a stale read) the one before it.
    Clear {
        stale: bool,
        retention: Duration,
    },
}

#[derive(Clone, Debug)]
struct Step {
    advance: Advance,
    op: Op,
}

fn actors() -> [Actor; 3] {
    [
        Actor::new("alice", None),
        Actor::new("bob", Some("Bob (release manager)".to_string())),
        Actor::new("system:serviceaccount:ci:deployer", Some("ci".to_string())),
    ]
}

fn advance_strategy() -> impl Strategy<Value = Advance> {
    prop_oneof![
        2 => Just(Advance::By(Duration::zero())),
        5 => (0i64..=7200).prop_map(|s| Advance::By(Duration::seconds(s))),
        1 => (0i64..=7200, 0i64..1_000_000_000)
            .prop_map(|(s, n)| Advance::By(Duration::seconds(s) + nanos(n))),
        2 => Just(Advance::ToExpiry),
        1 => Just(Advance::JustBeforeExpiry),
    ]
}

fn valid_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        6 => (MIN_DURATION_SECONDS..=7200).prop_map(Duration::seconds),
        1 => Just(Duration::seconds(MIN_DURATION_SECONDS)),
        1 => (7200..=MAX_DURATION_SECONDS).prop_map(Duration::seconds),
        1 => Just(Duration::seconds(MAX_DURATION_SECONDS)),
    ]
}

fn invalid_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::zero()),
        Just(Duration::seconds(MIN_DURATION_SECONDS - 1)),
        Just(Duration::seconds(-MIN_DURATION_SECONDS)),
        Just(Duration::seconds(MAX_DURATION_SECONDS + 1)),
        (
            MIN_DURATION_SECONDS..MAX_DURATION_SECONDS,
            1i64..1_000_000_000
        )
            .prop_map(|(s, n)| Duration::seconds(s) + nanos(n)),
    ]
}

fn duration_strategy() -> impl Strategy<Value = Duration> {
    prop_oneof![9 => valid_duration(), 1 => invalid_duration()]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let who = 0usize..3;
    prop_oneof![
        5 => (
            who.clone(),
            prop::bool::weighted(0.25),
            prop_oneof![Just(LockType::Manual), Just(LockType::Automatic)],
            duration_strategy(),
            prop::bool::weighted(0.05),
        )
            .prop_map(|(who, force, lock_type, duration, blank_reason)| Op::Acquire {
                who,
                force,
                lock_type,
                duration,
                blank_reason,
            }),
        3 => (who.clone(), prop::bool::weighted(0.7))
            .prop_map(|(who, with_lock_id)| Op::Release { who, with_lock_id }),
        1 => (who.clone(), prop::bool::weighted(0.1))
            .prop_map(|(who, blank_reason)| Op::ForceRelease { who, blank_reason }),
        1 => (
            prop::bool::weighted(0.2),
            prop_oneof![
                Just(Duration::zero()),
                (0i64..=7200).prop_map(Duration::seconds),
            ],
        )
            .prop_map(|(stale, retention)| Op::Clear { stale, retention }),
        3 => (who, duration_strategy(), prop::bool::weighted(0.7)).prop_map(
            |(who, duration, with_lock_id)| Op::Extend {
                who,
                duration,
                with_lock_id,
            }
        ),
    ]
}

fn steps_strategy() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (advance_strategy(), op_strategy()).prop_map(|(advance, op)| Step { advance, op }),
        1..=60,
    )
}

/// One holding as the model sees it, built only from the decisions.
#[derive(Clone, Debug)]
struct Holding {
    lock_id: String,
    user: String,
    emergency: bool,
    start: DateTime<Utc>,
    /// The expiry as last extended.
    expires_at: DateTime<Utc>,
    /// When it was released, force-released or overridden.
    ended_at: Option<DateTime<Utc>>,
}

impl Holding {
    fn end(&self) -> DateTime<Utc> {
        self.ended_at
            .map_or(self.expires_at, |at| at.min(self.expires_at))
    }

    fn live_at(&self, now: DateTime<Utc>) -> bool {
        self.start <= now && now < self.end()
    }
}

#[derive(Debug, Default)]
struct Model {
    holdings: Vec<Holding>,
    /// The holding last acquired and neither released nor overridden: what
    /// the spec must show as its holder, live or expired.
    current: Option<usize>,
}

impl Model {
    fn current(&self) -> Option<&Holding> {
        self.current.map(|index| &self.holdings[index])
    }

    fn live(&self, now: DateTime<Utc>) -> Option<&Holding> {
        self.current().filter(|holding| now < holding.expires_at)
    }

    fn state_at(&self, now: DateTime<Utc>) -> LockState {
        match self.current() {
            None => LockState::Available,
            Some(holding) if now >= holding.expires_at => LockState::Expired,
            Some(holding) if holding.emergency => LockState::ForceLocked,
            Some(_) => LockState::Locked,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    Change(HistoryAction),
    Unchanged(NoChange),
}

type Expected = Result<Outcome, Refusal>;

fn requester(request: &Request) -> &Actor {
    match request {
        Request::Acquire(acquire) => &acquire.actor,
        Request::Release { actor, .. }
        | Request::ForceRelease { actor, .. }
        | Request::Extend { actor, .. }
        | Request::Renew { actor, .. }
        | Request::Clear { actor, .. }
        | Request::JoinQueue { actor, .. } => actor,
        Request::LeaveQueue { .. } => panic!("no queue requests are generated here"),
    }
}

/// A decision without the next spec.
fn outcome(decision: Result<Decision, Refusal>) -> Expected {
    match decision {
        Ok(Decision::Change { action, .. }) => Ok(Outcome::Change(action)),
        Ok(Decision::Unchanged(reason)) => Ok(Outcome::Unchanged(reason)),
        Ok(Decision::Queue { .. }) => panic!("no queue requests are generated here"),
        Err(refusal) => Err(refusal),
    }
}

/// What the model allows as the answer to `request` at `now`. The refusals
/// carry the holder as stored, which must agree with the model (checked
/// after every step).
fn expected_outcomes(
    model: &Model,
    stored: Option<&LockHolder>,
    now: DateTime<Utc>,
    request: &Request,
) -> Vec<Expected> {
    let held = || Box::new(stored.expect("the model says the lock is held").clone());
    let lock_lost = |expected: &str, current: Option<Box<LockHolder>>| {
        Err(Refusal::LockLost {
            expected_lock_id: expected.to_string(),
            current,
        })
    };
    match request {
        Request::Acquire(acquire) => {
            if acquire.reason.trim().is_empty() {
                return vec![Err(Refusal::ReasonRequired)];
            }
            if !acceptable_duration(acquire.duration) {
                return vec![Err(Refusal::DurationOutOfRange)];
            }
            match model.live(now) {
                Some(live) if live.user == acquire.actor.user => {
                    if acquire.force && !live.emergency {
                        // Turning one's own normal holding into an emergency
                        // one: either answer keeps one holder at a time.
                        vec![
                            Ok(Outcome::Change(HistoryAction::ForceAcquired)),
                            Err(Refusal::AlreadyHeldByYou(held())),
                        ]
                    } else {
                        vec![Err(Refusal::AlreadyHeldByYou(held()))]
                    }
                }
                Some(live) if live.emergency => vec![Err(if acquire.force {
                    Refusal::EmergencyLockInForce(held())
                } else {
                    Refusal::HeldByOther(held())
                })],
                Some(_) if acquire.force => vec![Ok(Outcome::Change(HistoryAction::ForceAcquired))],
                Some(_) => vec![Err(Refusal::HeldByOther(held()))],
                None if acquire.force => vec![Ok(Outcome::Change(HistoryAction::ForceAcquired))],
                None if model.current().is_some() => {
                    vec![Ok(Outcome::Change(HistoryAction::TookOverExpired))]
                }
                None => vec![Ok(Outcome::Change(HistoryAction::Acquired))],
            }
        }
        Request::Release { actor, lock_id } => vec![match (model.current(), lock_id) {
            (None, Some(expected)) => lock_lost(expected, None),
            (None, None) => Ok(Outcome::Unchanged(NoChange::AlreadyAvailable)),
            (Some(current), Some(expected)) if *expected != current.lock_id => {
                lock_lost(expected, Some(held()))
            }
            (Some(current), _) if current.user != actor.user => Err(Refusal::NotHolder(held())),
            (Some(_), _) => Ok(Outcome::Change(HistoryAction::Released)),
        }],
        Request::ForceRelease { reason, .. } => vec![if reason.trim().is_empty() {
            Err(Refusal::ReasonRequired)
        } else if model.current().is_none() {
            Ok(Outcome::Unchanged(NoChange::AlreadyAvailable))
        } else {
            Ok(Outcome::Change(HistoryAction::ForceReleased))
        }],
        Request::Extend {
            actor,
            duration,
            lock_id,
            ..
        } => vec![if !acceptable_duration(*duration) {
            Err(Refusal::DurationOutOfRange)
        } else {
            match (model.current(), lock_id) {
                (None, Some(expected)) => lock_lost(expected, None),
                (None, None) => Err(Refusal::NotHeld),
                (Some(current), Some(expected)) if *expected != current.lock_id => {
                    lock_lost(expected, Some(held()))
                }
                (Some(current), _) if current.user != actor.user => Err(Refusal::NotHolder(held())),
                (Some(current), _) if now >= current.expires_at => {
                    Err(Refusal::ExpiredCannotExtend(held()))
                }
                (Some(_), _) => Ok(Outcome::Change(HistoryAction::Extended)),
            }
        }],
        Request::Clear {
            lock_id, retention, ..
        } => vec![match model.current() {
            None => Ok(Outcome::Unchanged(NoChange::AlreadyAvailable)),
            Some(current) if *lock_id != current.lock_id => lock_lost(lock_id, Some(held())),
            Some(current) if now < current.expires_at + *retention => {
                Err(Refusal::HeldByOther(held()))
            }
            Some(_) => Ok(Outcome::Change(HistoryAction::Cleared)),
        }],
        Request::JoinQueue { .. } | Request::LeaveQueue { .. } | Request::Renew { .. } => {
            panic!("no queue or renew requests are generated here")
        }
    }
}

/// Property 3: exactly one entry appended, the oldest dropped beyond the bound.
fn check_history(
    previous: &[HistoryEntry],
    next: &[HistoryEntry],
    action: HistoryAction,
    now: DateTime<Utc>,
) -> Result<(), TestCaseError> {
    prop_assert!(next.len() <= MAX_HISTORY_ENTRIES);
    let kept = if previous.len() < MAX_HISTORY_ENTRIES {
        previous
    } else {
        &previous[previous.len() + 1 - MAX_HISTORY_ENTRIES..]
    };
    prop_assert_eq!(next.len(), kept.len() + 1);
    prop_assert_eq!(&next[..kept.len()], kept);
    let last = next.last().expect("an entry was appended");
    prop_assert_eq!(last.action, action);
    prop_assert_eq!(last.at, now);
    // Numbered after the last entry, whatever was dropped.
    prop_assert_eq!(
        last.sequence,
        previous.last().map_or(0, |entry| entry.sequence) + 1
    );
    Ok(())
}

/// Properties 2 and 6: the stored lock and the model agree.
fn check_agreement(
    spec: Option<&DeploymentLockSpec>,
    model: &Model,
    now: DateTime<Utc>,
) -> Result<(), TestCaseError> {
    let empty = empty_spec();
    let spec = spec.unwrap_or(&empty);
    prop_assert_eq!(state_at(spec, now), model.state_at(now));
    prop_assert_eq!(
        live_holder(spec, now).map(|h| h.lock_id.as_str()),
        model.live(now).map(|h| h.lock_id.as_str())
    );
    match (spec.holder.as_ref(), model.current()) {
        (None, None) => {}
        (Some(stored), Some(holding)) => {
            prop_assert_eq!(&stored.lock_id, &holding.lock_id);
            prop_assert_eq!(&stored.user, &holding.user);
            prop_assert_eq!(stored.acquired_at, holding.start);
            prop_assert_eq!(stored.expires_at, holding.expires_at);
            prop_assert_eq!(stored.lock_type == LockType::Emergency, holding.emergency);
            // The state flips exactly at the expiry.
            let just_before = holding.expires_at - nanos(1);
            prop_assert_eq!(state_at(spec, just_before), model.state_at(just_before));
            prop_assert_ne!(state_at(spec, just_before), LockState::Expired);
            prop_assert_eq!(state_at(spec, holding.expires_at), LockState::Expired);
        }
        (stored, holding) => prop_assert!(
            false,
            "stored holder {:?} but the model's is {:?}",
            stored,
            holding
        ),
    }
    Ok(())
}

fn run_scenario(start_nanos: i64, steps: &[Step]) -> Result<(), TestCaseError> {
    let actors = actors();
    let mut last_lock_id: [Option<String>; 3] = Default::default();
    let mut spec: Option<DeploymentLockSpec> = None;
    let mut model = Model::default();
    let mut now = t0() + nanos(start_nanos);
    let mut next_id = 0;

    for (index, step) in steps.iter().enumerate() {
        let target = match step.advance {
            Advance::By(by) => now + by,
            Advance::ToExpiry => model.current().map_or(now, |h| h.expires_at),
            Advance::JustBeforeExpiry => model.current().map_or(now, |h| h.expires_at - nanos(1)),
        };
        // Time never goes backwards.
        now = now.max(target);
        check_agreement(spec.as_ref(), &model, now)?;

        let (who, request) = match &step.op {
            Op::Acquire {
                who,
                force,
                lock_type,
                duration,
                blank_reason,
            } => {
                next_id += 1;
                let reason = if *blank_reason { " " } else { DEPLOY_REASON };
                let mut request =
                    acquire_request(&actors[*who], &format!("lock-{next_id}"), reason, *duration);
                request.force = *force;
                request.lock_type = *lock_type;
                (Some(*who), Request::Acquire(request))
            }
            Op::Release { who, with_lock_id } => {
                let lock_id = last_lock_id[*who].as_deref().filter(|_| *with_lock_id);
                (Some(*who), release(&actors[*who], lock_id))
            }
            Op::ForceRelease { who, blank_reason } => {
                let reason = if *blank_reason { "" } else { "stuck pipeline" };
                (Some(*who), force_release(&actors[*who], reason))
            }
            Op::Extend {
                who,
                duration,
                with_lock_id,
            } => {
                let lock_id = last_lock_id[*who].as_deref().filter(|_| *with_lock_id);
                (Some(*who), extend(&actors[*who], *duration, lock_id))
            }
            Op::Clear { stale, retention } => {
                let named = if *stale {
                    let current = model.current();
                    model
                        .holdings
                        .iter()
                        .rev()
                        .find(|h| current.is_none_or(|c| c.lock_id != h.lock_id))
                } else {
                    model.current()
                };
                let lock_id = named.map_or("lock-0", |h| h.lock_id.as_str());
                (None, clear(lock_id, *retention))
            }
        };

        let stored = spec.as_ref().and_then(|s| s.holder.as_ref());
        let expected = expected_outcomes(&model, stored, now, &request);
        let decision = decide(ENV, spec.as_ref(), now, &request);
        let actual: Expected = match &decision {
            Ok(Decision::Change { action, .. }) => Ok(Outcome::Change(*action)),
            Ok(Decision::Unchanged(reason)) => Ok(Outcome::Unchanged(*reason)),
            Ok(Decision::Queue { .. }) => panic!("no queue requests are generated here"),
            Err(refusal) => Err(refusal.clone()),
        };
        prop_assert!(
            expected.contains(&actual),
            "step {}: {:?} at {}: expected one of {:?}, got {:?}",
            index,
            request,
            now,
            expected,
            actual
        );

        if let Ok(Decision::Change { next, action }) = decision {
            let previous_history = spec.as_ref().map_or(&[][..], |s| s.history.as_slice());
            check_history(previous_history, &next.history, action, now)?;
            let previous_token = spec
                .as_ref()
                .map_or(first_token_at(now), |s| s.fencing_token);
            prop_assert!(next.fencing_token >= previous_token);
            prop_assert_eq!(next.environment.as_str(), ENV);
            let entry = next.history.last().expect("checked above");
            prop_assert_eq!(&entry.by, &requester(&request).user);

            match (&request, action) {
                (
                    Request::Acquire(acquire),
                    HistoryAction::Acquired
                    | HistoryAction::TookOverExpired
                    | HistoryAction::ForceAcquired,
                ) => {
                    // Property 2: expiry is honoured.
                    if !acquire.force {
                        prop_assert!(
                            model
                                .holdings
                                .iter()
                                .all(|h| h.user == acquire.actor.user || !h.live_at(now)),
                            "step {}: {} acquired while another identity held the lock",
                            index,
                            acquire.actor.user
                        );
                    }
                    let overridden = model.live(now).map(|h| (h.lock_id.clone(), h.user.clone()));
                    // A forced takeover ends the previous holding now.
                    if let Some(current) = model.current {
                        let previous = &mut model.holdings[current];
                        if now < previous.expires_at {
                            previous.ended_at = Some(now);
                        }
                    }
                    // Property 1: every earlier holding is over.
                    for earlier in &model.holdings {
                        prop_assert!(
                            earlier.end() <= now,
                            "step {}: {:?} still runs at {}",
                            index,
                            earlier,
                            now
                        );
                    }
                    // Property 4.
                    prop_assert_eq!(next.fencing_token, previous_token + 1);

                    let new = next.holder.as_ref().expect("a new holding is stored");
                    prop_assert_eq!(
                        new.overrode
                            .as_ref()
                            .map(|o| (o.lock_id.clone(), o.user.clone())),
                        overridden
                    );
                    prop_assert_eq!(&new.lock_id, &acquire.lock_id);
                    prop_assert_eq!(&new.user, &acquire.actor.user);
                    prop_assert_eq!(&new.owner, &acquire.actor.owner);
                    prop_assert_eq!(
                        new.lock_type,
                        if acquire.force {
                            LockType::Emergency
                        } else {
                            acquire.lock_type
                        }
                    );
                    prop_assert_eq!(new.acquired_at, now);
                    prop_assert_eq!(new.expires_at, now + acquire.duration);
                    prop_assert_eq!(&entry.lock_id, &acquire.lock_id);
                    prop_assert_eq!(entry.expires_at, Some(new.expires_at));
                    prop_assert!(
                        model.holdings.iter().all(|h| h.lock_id != acquire.lock_id),
                        "lock ids are never reused"
                    );

                    model.holdings.push(Holding {
                        lock_id: acquire.lock_id.clone(),
                        user: acquire.actor.user.clone(),
                        emergency: acquire.force,
                        start: now,
                        expires_at: now + acquire.duration,
                        ended_at: None,
                    });
                    model.current = Some(model.holdings.len() - 1);
                    if let Some(who) = who {
                        last_lock_id[who] = Some(acquire.lock_id.clone());
                    }
                }
                (Request::Release { .. }, HistoryAction::Released)
                | (Request::ForceRelease { .. }, HistoryAction::ForceReleased) => {
                    let current = model.current.take().expect("the oracle saw a holder");
                    let ended = &mut model.holdings[current];
                    prop_assert_eq!(&entry.lock_id, &ended.lock_id);
                    prop_assert_eq!(entry.expires_at, None);
                    if let Request::ForceRelease { reason, .. } = &request {
                        prop_assert_eq!(&entry.reason, reason);
                    }
                    ended.ended_at = Some(now);
                    prop_assert_eq!(next.holder.as_ref(), None);
                    prop_assert_eq!(next.fencing_token, previous_token);
                }
                (Request::Extend { duration, .. }, HistoryAction::Extended) => {
                    let current = model.current.expect("the oracle saw a holder");
                    let extended = &mut model.holdings[current];
                    // Property 5: only a holding still in force is extended,
                    // and never to an earlier expiry.
                    prop_assert!(now < extended.expires_at);
                    let stored = next.holder.as_ref().expect("still held");
                    prop_assert!(stored.expires_at >= extended.expires_at);
                    prop_assert!(stored.expires_at >= now + *duration);
                    prop_assert_eq!(stored.expires_at, extended.expires_at.max(now + *duration));
                    prop_assert_eq!(&stored.lock_id, &extended.lock_id);
                    prop_assert_eq!(entry.expires_at, Some(stored.expires_at));
                    prop_assert_eq!(next.fencing_token, previous_token);
                    extended.expires_at = stored.expires_at;
                }
                (Request::Clear { retention, .. }, HistoryAction::Cleared) => {
                    let current = model.current.take().expect("the oracle saw a holder");
                    let cleared = &mut model.holdings[current];
                    // Only a holding that stayed expired for the retention.
                    prop_assert!(now >= cleared.expires_at + *retention);
                    prop_assert_eq!(&entry.lock_id, &cleared.lock_id);
                    prop_assert_eq!(entry.expires_at, Some(cleared.expires_at));
                    cleared.ended_at = Some(now);
                    prop_assert_eq!(next.holder.as_ref(), None);
                    prop_assert_eq!(next.fencing_token, previous_token);
                }
                (request, action) => {
                    prop_assert!(false, "{:?} answered with {:?}", request, action)
                }
            }
            spec = Some(next);
        }
        check_agreement(spec.as_ref(), &model, now)?;
    }

    // Property 1 over the whole run: no two holdings overlap.
    for (index, a) in model.holdings.iter().enumerate() {
        for b in &model.holdings[index + 1..] {
            prop_assert!(
                a.end() <= b.start || b.end() <= a.start,
                "{:?} overlaps {:?}",
                a,
                b
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Integration tests have no lib.rs beside them: keep failures next to
        // this file (tests/lock_rules.proptest-regressions).
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_request_sequences_keep_one_holder_at_a_time(
        start_nanos in 0i64..1_000_000_000,
        steps in steps_strategy(),
    ) {
        run_scenario(start_nanos, &steps)?;
    }

    #[test]
    fn duration_in_range_accepts_exactly_whole_seconds_from_one_minute_to_seven_days(
        seconds in prop_oneof![
            -2 * MAX_DURATION_SECONDS..=2 * MAX_DURATION_SECONDS,
            MIN_DURATION_SECONDS - 2..=MIN_DURATION_SECONDS + 2,
            MAX_DURATION_SECONDS - 2..=MAX_DURATION_SECONDS + 2,
        ],
        subsec in prop_oneof![Just(0i64), -999_999_999i64..=999_999_999],
    ) {
        let duration = Duration::seconds(seconds) + nanos(subsec);
        prop_assert_eq!(duration_in_range(duration), acceptable_duration(duration));
    }

    #[test]
    fn a_holding_is_over_exactly_at_its_expiry(
        start_nanos in 0i64..86_400_000_000_000,
        duration in valid_duration(),
        force in any::<bool>(),
    ) {
        let now = t0() + nanos(start_nanos);
        let alice = person("alice");
        let request = Request::Acquire(AcquireRequest {
            force,
            ..acquire_request(&alice, "lock-a", DEPLOY_REASON, duration)
        });
        let (spec, _) = change(None, now, &request);
        let expiry = now + duration;
        let in_force = if force { LockState::ForceLocked } else { LockState::Locked };
        prop_assert_eq!(state_at(&spec, now), in_force);
        prop_assert_eq!(state_at(&spec, expiry - nanos(1)), in_force);
        prop_assert_eq!(state_at(&spec, expiry), LockState::Expired);

        let bob = person("bob");
        let takeover = acquire(&bob, "lock-b", duration);
        let renew = extend(&alice, duration, Some("lock-a"));
        let held = Box::new(holder(&spec).clone());
        prop_assert_eq!(
            outcome(decide(ENV, Some(&spec), expiry - nanos(1), &takeover)),
            Err(Refusal::HeldByOther(held.clone()))
        );
        prop_assert_eq!(
            outcome(decide(ENV, Some(&spec), expiry, &takeover)),
            Ok(Outcome::Change(HistoryAction::TookOverExpired))
        );
        prop_assert_eq!(
            outcome(decide(ENV, Some(&spec), expiry - nanos(1), &renew)),
            Ok(Outcome::Change(HistoryAction::Extended))
        );
        prop_assert_eq!(
            outcome(decide(ENV, Some(&spec), expiry, &renew)),
            Err(Refusal::ExpiredCannotExtend(held))
        );
    }
}
