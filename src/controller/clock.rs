//! The clock Lease: the admission policy's trusted time.
//!
//! Admission has no clock. The leader keeps a `coordination.k8s.io/v1` Lease
//! whose `spec.renewTime` is a lower bound of the API server's clock
//! ([`ServerClock::lower_bound`]), written every second and, on demand, at
//! each lock's expiry instant. The policy reads it as its parameter and lets
//! an expired holding be taken over once `expiresAt <= renewTime`.
//!
//! The stored value never decreases and is never ahead of the API server's
//! clock: every write is conditional on the `resourceVersion` read and only
//! ever raises the value; on a conflict the Lease is read again. Several
//! controllers may write the same clock Lease; each writes a valid lower
//! bound, so the greatest stays valid.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::leader::{self, jitter};
use crate::servertime::ServerClock;

/// How often the clock Lease is written.
pub const PERIOD: Duration = Duration::from_secs(1);
/// Time limit of one clock Lease request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// `time` as a MicroTime, rounded down to the microsecond (the Lease's precision).
pub fn micro_time(time: DateTime<Utc>) -> MicroTime {
    MicroTime(Timestamp::from_microsecond(time.timestamp_micros()).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// A MicroTime as a chrono time.
pub fn from_micro_time(time: &MicroTime) -> Option<DateTime<Utc>> {
    let nanos = time.0.as_nanosecond();
    let seconds = i64::try_from(nanos.div_euclid(1_000_000_000)).ok()?;
    let subsec = u32::try_from(nanos.rem_euclid(1_000_000_000)).ok()?;
    DateTime::from_timestamp(seconds, subsec)
}

/// Why the clock could not be advanced.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// "clock Lease request failed" or "timed out".
    #[error("clock {0}")]
    Lease(#[from] leader::Error),
    #[error("the clock Lease writer has stopped")]
    Stopped,
}

type Reply = oneshot::Sender<Result<(), String>>;

/// Asks the writer to bring the clock Lease to at least a time.
#[derive(Clone)]
pub struct ClockHandle {
    requests: mpsc::UnboundedSender<(DateTime<Utc>, Reply)>,
}

impl ClockHandle {
    /// Returns once the clock Lease's renewTime is at least `at` (written
    /// at the first instant the server's clock has certainly reached it).
    pub async fn advance_to(&self, at: DateTime<Utc>) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((at, reply))
            .map_err(|_| Error::Stopped.to_string())?;
        match tokio::time::timeout(REQUEST_TIMEOUT * 3, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Stopped.to_string()),
            Err(_) => Err(Error::Lease(leader::Error::Timeout(REQUEST_TIMEOUT * 3)).to_string()),
        }
    }
}

/// The writer of one clock Lease.
pub struct ClockWriter {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub clock: ServerClock,
}

impl ClockWriter {
    async fn timed<T>(
        &self,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, Error> {
        Ok(leader::timed(REQUEST_TIMEOUT, request).await?)
    }

    /// Starts the writer; it runs until `stop` turns true or every handle is gone.
    pub fn spawn(self, stop: watch::Receiver<bool>) -> ClockHandle {
        let (requests, receiver) = mpsc::unbounded_channel();
        tokio::spawn(self.run(receiver, stop));
        ClockHandle { requests }
    }

    async fn run(
        self,
        mut requests: mpsc::UnboundedReceiver<(DateTime<Utc>, Reply)>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut cached: Option<Lease> = None;
        let mut pending: Vec<(DateTime<Utc>, Reply)> = Vec::new();
        let mut next_tick = Instant::now();
        loop {
            // Wake for the tick, or for the earliest instant a pending
            // request's time is certainly reached on the server.
            let wake = pending
                .iter()
                .map(|(at, _)| self.clock.reached_at(*at))
                .min()
                .map_or(next_tick, |reached| reached.min(next_tick));
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => return,
                request = requests.recv() => match request {
                    Some(request) => {
                        pending.push(request);
                        // Take everything queued at once: one write serves all.
                        while let Ok(request) = requests.try_recv() {
                            pending.push(request);
                        }
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(wake) => {}
            }
            let now = Instant::now();
            let tick_due = now >= next_tick;
            if tick_due {
                next_tick = now + PERIOD;
            }
            let value = self.clock.lower_bound(now);
            let stored_before = stored(cached.as_ref());
            let request_due = pending
                .iter()
                .any(|(at, _)| *at <= value && stored_before.is_none_or(|stored| stored < *at));
            let result = if tick_due || request_due {
                self.write(&mut cached, value).await
            } else {
                Ok(())
            };
            if let Err(err) = &result {
                tracing::warn!(error = %err, lease = %self.name, "cannot write the clock Lease");
            }
            let stored_now = stored(cached.as_ref());
            for (at, reply) in std::mem::take(&mut pending) {
                if stored_now.is_some_and(|stored| stored >= at) {
                    let _ = reply.send(Ok(()));
                } else if let (Err(err), true) = (&result, at <= value) {
                    let _ = reply.send(Err(err.to_string()));
                } else {
                    pending.push((at, reply));
                }
            }
        }
    }

    /// Writes `value` unless the Lease already holds a greater one.
    async fn write(&self, cached: &mut Option<Lease>, value: DateTime<Utc>) -> Result<(), Error> {
        let value_micro = micro_time(value);
        for attempt in 0..4u32 {
            if attempt > 0 {
                tokio::time::sleep(jitter(Duration::from_millis(20) * attempt)).await;
            }
            let current = match cached.clone() {
                Some(lease) => lease,
                None => match self.timed(self.api.get_opt(&self.name)).await? {
                    Some(lease) => lease,
                    None => {
                        let lease = Lease {
                            metadata: kube::core::ObjectMeta {
                                name: Some(self.name.clone()),
                                ..Default::default()
                            },
                            spec: Some(LeaseSpec {
                                holder_identity: Some(self.identity.clone()),
                                renew_time: Some(value_micro.clone()),
                                ..Default::default()
                            }),
                        };
                        match self
                            .timed(self.api.create(&PostParams::default(), &lease))
                            .await
                        {
                            Ok(created) => {
                                *cached = Some(created);
                                return Ok(());
                            }
                            Err(Error::Lease(leader::Error::Kube(kube::Error::Api(status))))
                                if status.code == 409 =>
                            {
                                continue;
                            }
                            Err(err) => return Err(err),
                        }
                    }
                },
            };
            if stored(Some(&current)).is_some_and(|stored| stored >= value) {
                *cached = Some(current);
                return Ok(());
            }
            let mut next = current.clone();
            let spec = next.spec.get_or_insert_with(Default::default);
            spec.renew_time = Some(value_micro.clone());
            spec.holder_identity = Some(self.identity.clone());
            // `next` carries the resourceVersion read: refused if it moved on.
            match self
                .timed(self.api.replace(&self.name, &PostParams::default(), &next))
                .await
            {
                Ok(written) => {
                    *cached = Some(written);
                    return Ok(());
                }
                Err(Error::Lease(leader::Error::Kube(kube::Error::Api(status))))
                    if status.code == 409 =>
                {
                    *cached = None;
                }
                Err(err) => {
                    *cached = None;
                    return Err(err);
                }
            }
        }
        // Others keep writing greater values: theirs are valid too.
        Ok(())
    }
}

/// How far behind the API server's clock the clock Lease may lag while a
/// replica says it is ready. A lock can only be created while the clock is
/// recent (the policy dates a new lock's fencing token from it, five
/// minutes' slack at most), so `helm install --wait` returns once the
/// leader keeps the clock, not merely once the pods run; a leader hand-over
/// (the Lease's 15 s by default) stays well within this.
pub const READY_WITHIN: chrono::Duration = chrono::Duration::seconds(30);
/// How often readiness is judged again (the clock moves every [`PERIOD`]).
const READINESS_CHECK: Duration = Duration::from_secs(1);

/// Whether a clock Lease holding `stored` is current at `now`.
pub fn is_current(stored: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    stored.is_some_and(|stored| stored >= now - READY_WITHIN)
}

/// Keeps `ready` true exactly while the clock Lease `name` is current (see
/// [`READY_WITHIN`]), by whichever replica writes it, until `stop`.
pub async fn keep_readiness(
    api: Api<Lease>,
    name: String,
    clock: ServerClock,
    ready: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut leases = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
    let mut latest: Option<DateTime<Utc>> = None;
    let mut check = tokio::time::interval(READINESS_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            lease = leases.next() => match lease {
                Some(Ok(lease)) => latest = latest.max(stored(Some(&lease))),
                // Retried by the watcher's backoff; a clock that stays
                // unseen turns the replica unready by itself.
                Some(Err(err)) => tracing::debug!(error = %err, "watching the clock Lease failed; retrying"),
                None => return,
            },
            _ = check.tick() => {}
        }
        let current = is_current(latest, clock.lower_bound(Instant::now()));
        if ready.swap(current, Ordering::Relaxed) != current {
            if current {
                tracing::info!(lease = %name, "the clock Lease is current: ready");
            } else {
                tracing::warn!(lease = %name, "the clock Lease is not current (no leader keeps it?): not ready");
            }
        }
    }
}

/// The renewTime stored in a clock Lease.
fn stored(lease: Option<&Lease>) -> Option<DateTime<Utc>> {
    lease
        .and_then(|lease| lease.spec.as_ref())
        .and_then(|spec| spec.renew_time.as_ref())
        .and_then(from_micro_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_lease_is_current_within_half_a_minute() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        assert!(is_current(Some(now), now));
        assert!(is_current(Some(now - READY_WITHIN), now));
        assert!(!is_current(
            Some(now - READY_WITHIN - chrono::Duration::milliseconds(1)),
            now
        ));
        assert!(!is_current(None, now), "no clock Lease yet");
    }

    #[test]
    fn micro_time_rounds_down_and_round_trips() {
        let time = DateTime::from_timestamp(1_900_000_000, 123_456_789).unwrap_or_default();
        let micro = micro_time(time);
        assert_eq!(
            from_micro_time(&micro),
            DateTime::from_timestamp(1_900_000_000, 123_456_000)
        );
        let before_epoch = DateTime::from_timestamp(-5, 999_999_999).unwrap_or_default();
        assert!(from_micro_time(&micro_time(before_epoch)).is_some_and(|t| t <= before_epoch));
    }
}
