//! Leader election on a `coordination.k8s.io/v1` Lease that tolerates
//! skewed clocks the way client-go's does.
//!
//! Nothing here compares a time written in the Lease with a local clock. A
//! standby times the Lease by when *it* saw the Lease last change (any change
//! of its `resourceVersion`), on its own monotonic clock, and takes it over
//! only once it has seen no change for the Lease's duration, with a write
//! conditional on that unchanged `resourceVersion`. The leader counts from
//! the instant it *sent* its last successful renewal: any standby saw that
//! renewal later, so none can take over before `sent + duration`. The leader
//! therefore keeps leading until `sent + duration − grace`, by its monotonic
//! clock, through an outage of the API server; past that it steps down (stops
//! reconciling) but keeps trying, and leads again at once if the Lease is
//! still its own when the server is back. A replica whose wall clock is an
//! hour off behaves exactly like the others.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

use super::clock::micro_time;
use crate::servertime::ServerClock;

/// The Lease's timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a standby waits after the Lease last changed before taking it.
    pub lease_duration: Duration,
    /// The leader stops reconciling this long before a standby could take over.
    pub grace: Duration,
    /// How often the leader renews and a standby looks at the Lease.
    pub renew_period: Duration,
}

impl Timing {
    /// Time limit of one Lease request.
    pub fn request_timeout(&self) -> Duration {
        (self.renew_period * 2).clamp(Duration::from_secs(1), Duration::from_secs(5))
    }

    /// Checks that a renewal fits in the leading window, with room for a retry.
    pub fn validate(&self) -> Result<(), String> {
        if self.grace.is_zero() || self.grace >= self.lease_duration {
            return Err("--lease-grace must be at least 1 and less than --lease-duration".into());
        }
        if self.renew_period.is_zero() || self.renew_period >= self.lease_duration - self.grace {
            return Err(
                "--lease-renew-period must be at least 1 and less than --lease-duration minus --lease-grace"
                    .into(),
            );
        }
        Ok(())
    }

    /// Until when a leader whose last successful renewal was sent at `sent` leads.
    pub fn leading_until(&self, sent: Instant) -> Instant {
        sent + self.lease_duration - self.grace
    }
}

/// What this replica knows of the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum View {
    /// Not read yet.
    Unknown,
    /// No Lease object exists.
    Absent,
    Held {
        resource_version: String,
        /// `None` when released.
        holder: Option<String>,
        /// The holder's declared duration.
        duration: Duration,
        /// When this replica first saw this resourceVersion (local monotonic).
        since: Instant,
    },
}

/// The Lease as seen at `now`, keeping the instant of the first sighting of
/// an unchanged `resourceVersion`.
pub fn observe(previous: &View, lease: Option<&Lease>, default: Duration, now: Instant) -> View {
    let Some(lease) = lease else {
        return View::Absent;
    };
    let resource_version = lease.metadata.resource_version.clone().unwrap_or_default();
    let spec = lease.spec.as_ref();
    let holder = spec
        .and_then(|spec| spec.holder_identity.clone())
        .filter(|holder| !holder.is_empty());
    let duration = spec
        .and_then(|spec| spec.lease_duration_seconds)
        .and_then(|seconds| u64::try_from(seconds).ok())
        .filter(|seconds| *seconds > 0)
        .map_or(default, Duration::from_secs);
    let since = match previous {
        View::Held {
            resource_version: seen,
            since,
            ..
        } if *seen == resource_version => *since,
        _ => now,
    };
    View::Held {
        resource_version,
        holder,
        duration,
        since,
    }
}

/// What to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Read the Lease first.
    Read,
    /// Create the Lease, holding it.
    Create,
    /// Take the Lease over (released, or not renewed for its duration).
    Take,
    /// Renew our own holding.
    Renew,
    /// Someone else holds it: look again, at the latest at this instant.
    WaitUntil(Instant),
}

/// The election's decision, a pure function of what was observed.
pub fn decide(me: &str, view: &View, now: Instant) -> Step {
    match view {
        View::Unknown => Step::Read,
        View::Absent => Step::Create,
        View::Held { holder: None, .. } => Step::Take,
        View::Held {
            holder: Some(holder),
            ..
        } if holder == me => Step::Renew,
        View::Held {
            duration, since, ..
        } => {
            let free_at = *since + *duration;
            if now >= free_at {
                Step::Take
            } else {
                Step::WaitUntil(free_at)
            }
        }
    }
}

/// Whether this replica leads, and until when at the latest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leadership {
    Follower,
    /// Leads until this instant unless renewed before.
    Leader {
        until: Instant,
    },
}

/// Resolves once `leadership` says this replica does not lead (now or
/// because its `until` passed without a renewal).
pub async fn lost(mut leadership: watch::Receiver<Leadership>) {
    loop {
        let current = *leadership.borrow_and_update();
        match current {
            Leadership::Follower => return,
            Leadership::Leader { until } => {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {
                        if *leadership.borrow() == current {
                            return;
                        }
                    }
                    changed = leadership.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// Resolves once `leadership` says this replica leads (`false` if the
/// election ended first).
pub async fn gained(leadership: &mut watch::Receiver<Leadership>) -> bool {
    loop {
        if let Leadership::Leader { until } = *leadership.borrow_and_update()
            && Instant::now() < until
        {
            return true;
        }
        if leadership.changed().await.is_err() {
            return false;
        }
    }
}

/// Errors of one Lease request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Lease request failed: {0}")]
    Kube(#[source] kube::Error),
    #[error("Lease request timed out after {0:?}")]
    Timeout(Duration),
}

impl Error {
    fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(status)) if status.code == 409)
    }
}

/// One replica's side of the election.
pub struct Elector {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub timing: Timing,
    pub clock: ServerClock,
}

/// One Lease request, given up after `limit`.
pub(crate) async fn timed<T>(
    limit: Duration,
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(limit, request)
        .await
        .map_err(|_| Error::Timeout(limit))?
        .map_err(Error::Kube)
}

impl Elector {
    async fn timed<T>(
        &self,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, Error> {
        timed(self.timing.request_timeout(), request).await
    }

    fn spec_for_us(&self, current: Option<&LeaseSpec>, new_term: bool) -> LeaseSpec {
        let now = micro_time(self.clock.lower_bound(Instant::now()));
        let mut spec = current.cloned().unwrap_or_default();
        if new_term {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(
                spec.lease_transitions
                    .unwrap_or(0)
                    .checked_add(1)
                    .unwrap_or(0)
                    .max(0),
            );
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.renew_time = Some(now);
        spec.lease_duration_seconds =
            Some(i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(i32::MAX));
        spec
    }

    /// Writes the Lease as ours: create, take over or renew, conditional on
    /// the `resourceVersion` read.
    async fn write(&self, step: Step, current: Option<&Lease>) -> Result<Lease, Error> {
        match (step, current) {
            (Step::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: kube::core::ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec_for_us(None, true)),
                };
                self.timed(self.api.create(&PostParams::default(), &lease))
                    .await
            }
            (step, Some(current)) => {
                let mut lease = current.clone();
                lease.spec = Some(self.spec_for_us(current.spec.as_ref(), step == Step::Take));
                self.timed(self.api.replace(&self.name, &PostParams::default(), &lease))
                    .await
            }
        }
    }

    /// Runs the election until `stop` turns true; then releases the Lease
    /// if this replica may hold it, so a standby takes over at once.
    ///
    /// One loop on purpose (longer than most functions): `may_hold` and the
    /// view of the Lease change together at each step, and the release at a
    /// stop depends on both.
    pub async fn run(self, leadership: watch::Sender<Leadership>, mut stop: watch::Receiver<bool>) {
        let mut view = View::Unknown;
        let mut current: Option<Lease> = None;
        // Set once a write that makes us holder may have reached the server.
        let mut may_hold = false;
        let mut announced_wait = false;
        loop {
            let now = Instant::now();
            let step = decide(&self.identity, &view, now);
            let mut next = now + self.timing.renew_period;
            match step {
                Step::Read => next = now,
                Step::WaitUntil(free_at) => {
                    if leadership.send_if_modified(|state| {
                        std::mem::replace(state, Leadership::Follower) != Leadership::Follower
                    }) {
                        tracing::warn!(
                            lease = %self.name,
                            holder = ?current.as_ref().and_then(|l| l.spec.as_ref()).and_then(|s| s.holder_identity.clone()),
                            "another replica holds the Lease: no longer leader"
                        );
                    }
                    if !announced_wait {
                        tracing::info!(identity = %self.identity, lease = %self.name, "waiting for leadership");
                        announced_wait = true;
                    }
                    next = next.min(free_at);
                }
                Step::Create | Step::Take | Step::Renew => {
                    let sent = Instant::now();
                    may_hold = true;
                    let written = tokio::select! {
                        written = self.write(step, current.as_ref()) => written,
                        _ = stop.wait_for(|stopped| *stopped) => break,
                    };
                    match written {
                        Ok(lease) => {
                            let until = self.timing.leading_until(sent);
                            let was = *leadership.borrow();
                            leadership.send_replace(Leadership::Leader { until });
                            if !matches!(was, Leadership::Leader { until } if until > sent) {
                                tracing::info!(identity = %self.identity, lease = %self.name, "became leader");
                            }
                            view = observe(
                                &view,
                                Some(&lease),
                                self.timing.lease_duration,
                                Instant::now(),
                            );
                            current = Some(lease);
                            next = sent + self.timing.renew_period;
                        }
                        Err(err) => {
                            if err.is_conflict() {
                                tracing::debug!(error = %err, "Lease changed meanwhile; reading it again");
                            } else {
                                tracing::warn!(error = %err, "cannot write the Lease; retrying");
                            }
                            // Read again before the next decision, soon.
                            view = View::Unknown;
                            next = Instant::now() + jitter(Duration::from_millis(200));
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.wait_for(|stopped| *stopped) => break,
            }
            let read = tokio::select! {
                read = self.timed(self.api.get_opt(&self.name)) => read,
                _ = stop.wait_for(|stopped| *stopped) => break,
            };
            match read {
                Ok(lease) => {
                    view = observe(
                        &view,
                        lease.as_ref(),
                        self.timing.lease_duration,
                        Instant::now(),
                    );
                    current = lease;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the Lease");
                    // Not a hot loop while the server is away.
                    tokio::select! {
                        _ = tokio::time::sleep(jitter(Duration::from_secs(1))) => {}
                        _ = stop.wait_for(|stopped| *stopped) => break,
                    }
                }
            }
        }
        leadership.send_replace(Leadership::Follower);
        if may_hold {
            self.release().await;
        }
    }

    /// Gives the Lease up if it is ours (bounded by two request timeouts).
    async fn release(&self) {
        for _ in 0..2 {
            let lease = match self.timed(self.api.get_opt(&self.name)).await {
                Ok(Some(lease)) => lease,
                Ok(None) => return,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot release the Lease");
                    return;
                }
            };
            let ours = lease
                .spec
                .as_ref()
                .and_then(|spec| spec.holder_identity.as_deref())
                == Some(self.identity.as_str());
            if !ours {
                return;
            }
            let mut released = lease.clone();
            if let Some(spec) = released.spec.as_mut() {
                spec.holder_identity = None;
                spec.lease_duration_seconds = Some(1);
                spec.renew_time = Some(micro_time(self.clock.lower_bound(Instant::now())));
            }
            match self
                .timed(
                    self.api
                        .replace(&self.name, &PostParams::default(), &released),
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(lease = %self.name, "released the Lease");
                    return;
                }
                Err(err) if err.is_conflict() => continue,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot release the Lease");
                    return;
                }
            }
        }
    }
}

/// `base` scaled by a random factor in [0.5, 1.5).
pub fn jitter(base: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let factor = 0.5 + (random % 1000) as f64 / 1000.0;
    base.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::ObjectMeta;

    const DURATION: Duration = Duration::from_secs(15);

    fn lease(resource_version: &str, holder: Option<&str>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some("l".into()),
                resource_version: Some(resource_version.into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_standby_takes_over_only_after_seeing_no_change_for_the_duration() {
        let start = Instant::now();
        let seen = observe(
            &View::Unknown,
            Some(&lease("1", Some("a"))),
            DURATION,
            start,
        );
        assert_eq!(decide("b", &seen, start), Step::WaitUntil(start + DURATION));
        // Unchanged 14 s later: still waiting, the first sighting counts.
        let later = start + Duration::from_secs(14);
        let seen = observe(&seen, Some(&lease("1", Some("a"))), DURATION, later);
        assert_eq!(decide("b", &seen, later), Step::WaitUntil(start + DURATION));
        let expired = start + DURATION;
        assert_eq!(decide("b", &seen, expired), Step::Take);
        // A renewal (new resourceVersion) restarts the wait from its sighting.
        let renewed = observe(&seen, Some(&lease("2", Some("a"))), DURATION, later);
        assert_eq!(
            decide("b", &renewed, expired),
            Step::WaitUntil(later + DURATION)
        );
    }

    #[test]
    fn timestamps_in_the_lease_do_not_matter() {
        // A holder whose clock is an hour off writes renewTime an hour away;
        // the standby's decision is the same either way.
        let start = Instant::now();
        let mut skewed = lease("7", Some("a"));
        if let Some(spec) = skewed.spec.as_mut() {
            spec.renew_time = Some(micro_time(chrono::Utc::now() - chrono::Duration::hours(1)));
        }
        let seen = observe(&View::Unknown, Some(&skewed), DURATION, start);
        assert_eq!(
            decide("b", &seen, start + Duration::from_secs(1)),
            Step::WaitUntil(start + DURATION)
        );
    }

    #[test]
    fn released_or_absent_leases_are_taken_at_once_and_our_own_is_renewed() {
        let now = Instant::now();
        assert_eq!(decide("b", &View::Absent, now), Step::Create);
        let released = observe(&View::Unknown, Some(&lease("3", None)), DURATION, now);
        assert_eq!(decide("b", &released, now), Step::Take);
        let empty = observe(&View::Unknown, Some(&lease("3", Some(""))), DURATION, now);
        assert_eq!(decide("b", &empty, now), Step::Take);
        let ours = observe(&View::Unknown, Some(&lease("4", Some("b"))), DURATION, now);
        assert_eq!(decide("b", &ours, now), Step::Renew);
        assert_eq!(decide("b", &View::Unknown, now), Step::Read);
    }

    #[test]
    fn the_holders_declared_duration_is_respected() {
        let now = Instant::now();
        let mut long = lease("5", Some("a"));
        if let Some(spec) = long.spec.as_mut() {
            spec.lease_duration_seconds = Some(60);
        }
        let seen = observe(&View::Unknown, Some(&long), DURATION, now);
        assert_eq!(
            decide("b", &seen, now + DURATION),
            Step::WaitUntil(now + Duration::from_secs(60))
        );
    }

    #[test]
    fn the_leader_leads_until_no_standby_can_have_taken_over_minus_the_grace() {
        let timing = Timing {
            lease_duration: DURATION,
            grace: Duration::from_secs(2),
            renew_period: Duration::from_secs(2),
        };
        assert_eq!(timing.validate(), Ok(()));
        let sent = Instant::now();
        // A 12 s outage right after a renewal: still leading after it.
        assert!(timing.leading_until(sent) > sent + Duration::from_secs(12));
        // A standby saw the renewal no earlier than it was sent, so it cannot
        // take over before `sent + duration`: after the leader stopped.
        let seen = observe(&View::Unknown, Some(&lease("9", Some("a"))), DURATION, sent);
        match decide("b", &seen, sent) {
            Step::WaitUntil(free_at) => assert!(free_at > timing.leading_until(sent)),
            other => panic!("{other:?}"),
        }
        let bad = Timing {
            renew_period: Duration::from_secs(13),
            ..timing
        };
        assert!(bad.validate().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn leadership_is_lost_when_its_deadline_passes_without_renewal() {
        let until = Instant::now() + Duration::from_secs(5);
        let (sender, receiver) = watch::channel(Leadership::Leader { until });
        let lost = tokio::spawn(lost(receiver));
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Renewed: the deadline moves.
        sender.send_replace(Leadership::Leader {
            until: Instant::now() + Duration::from_secs(5),
        });
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!lost.is_finished());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(lost.await.is_ok());
    }
}
