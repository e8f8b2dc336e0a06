//! The API server's clock, measured against the local monotonic clock to
//! better than the `Date` header's second.
//!
//! A request sent at local instant `a` and answered at `b` with `Date: D`
//! (whole seconds, truncated) says: at some instant in `[a, b]` the server's
//! clock read a time in `[D, D + 1 s)`. With `offset = server − local`, that
//! is `D − b ≤ offset ≤ D + 1 s − a`. Intersecting such intervals narrows the
//! offset; a request timed so that the server's second ticks over while it is
//! in flight halves the interval (which side of the tick it saw tells which
//! half), so a few well-timed requests bring the uncertainty down to about
//! one round trip.
//!
//! The bounds are widened over time by a drift allowance (the two clocks may
//! run at slightly different rates, NTP slews by up to 500 ppm), so
//! [`ServerClock::lower_bound`] is never ahead of the server's clock and
//! [`ServerClock::upper_bound`] never behind it, however long ago the last
//! measurement was. The local wall clock is never read.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use kube::Client;
use kube::client::Body;
use tokio::time::Instant;

const NANOS_PER_SECOND: i128 = 1_000_000_000;
const PPM: i128 = 1_000_000;

/// Rate difference allowed between the local monotonic clock and the
/// server's wall clock, in parts per million (NTP's maximum slew plus
/// crystal error).
pub const DEFAULT_DRIFT_PPM: u32 = 600;
/// Time limit of one measuring request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests of one refinement at most.
pub const MAX_PROBES: u32 = 12;

/// Why the server's clock could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the API server's clock: {0}")]
    Kube(#[source] kube::Error),
    #[error("cannot read the API server's clock: no answer within {0:?}")]
    Timeout(Duration),
    #[error("the API server's answer has no usable Date header")]
    NoDate,
    #[error("cannot build the request: {0}")]
    Request(#[source] http::Error),
}

/// One bracketed reading: sent at `sent`, answered at `received`, with the
/// server's `Date` (whole seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub sent: Instant,
    pub received: Instant,
    pub date: DateTime<Utc>,
}

/// The measured samples contradicted the earlier ones: the server's clock
/// was stepped (or a sample was wrong). The bounds restart from the sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inconsistent;

/// Bounds of `offset = server − local` in nanoseconds, valid at local time `at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bounds {
    low: i128,
    high: i128,
    at: i128,
}

/// The pure arithmetic: samples in, bounds out. Local instants are counted
/// in nanoseconds from `origin`, server times in nanoseconds since the epoch.
#[derive(Clone, Debug)]
pub struct Calibration {
    origin: Instant,
    drift_ppm: i128,
    bounds: Option<Bounds>,
    /// The greatest lower bound returned so far (local, server): later
    /// answers never go below it.
    floor: Option<(i128, i128)>,
    /// The shortest round trip seen, to time the probes.
    min_rtt: Option<i128>,
}

fn nanos(duration: Duration) -> i128 {
    i128::try_from(duration.as_nanos()).unwrap_or(i128::MAX)
}

fn server_nanos(time: DateTime<Utc>) -> i128 {
    i128::from(time.timestamp()) * NANOS_PER_SECOND + i128::from(time.timestamp_subsec_nanos())
}

fn to_time(server: i128) -> Option<DateTime<Utc>> {
    let seconds = i64::try_from(server.div_euclid(NANOS_PER_SECOND)).ok()?;
    let subsec = u32::try_from(server.rem_euclid(NANOS_PER_SECOND)).ok()?;
    DateTime::from_timestamp(seconds, subsec)
}

/// Integer division rounding up (positive divisor).
fn div_ceil(value: i128, divisor: i128) -> i128 {
    let quotient = value.div_euclid(divisor);
    if value.rem_euclid(divisor) == 0 {
        quotient
    } else {
        quotient + 1
    }
}

impl Calibration {
    pub fn new(origin: Instant, drift_ppm: u32) -> Self {
        Calibration {
            origin,
            drift_ppm: i128::from(drift_ppm),
            bounds: None,
            floor: None,
            min_rtt: None,
        }
    }

    fn local(&self, at: Instant) -> i128 {
        match at.checked_duration_since(self.origin) {
            Some(after) => nanos(after),
            None => -nanos(self.origin.duration_since(at)),
        }
    }

    fn instant(&self, local: i128) -> Instant {
        if local <= 0 {
            return self.origin;
        }
        let local = u64::try_from(local).unwrap_or(u64::MAX);
        self.origin + Duration::from_nanos(local)
    }

    /// How much the offset may have drifted over `elapsed` nanoseconds.
    fn drift(&self, elapsed: i128) -> i128 {
        div_ceil(elapsed.abs().saturating_mul(self.drift_ppm), PPM)
    }

    /// The bounds as they hold at local time `local`.
    fn widened(&self, local: i128) -> Option<(i128, i128)> {
        self.bounds.map(|bounds| {
            let drift = self.drift(local - bounds.at);
            (bounds.low - drift, bounds.high + drift)
        })
    }

    /// Whether any sample was taken.
    pub fn is_calibrated(&self) -> bool {
        self.bounds.is_some()
    }

    /// Adds a sample. On a contradiction with the earlier bounds the bounds
    /// restart from this sample alone (the returned lower bound still never
    /// goes back).
    pub fn add(&mut self, sample: &Sample) -> Result<(), Inconsistent> {
        let sent = self.local(sample.sent);
        let received = self.local(sample.received).max(sent);
        let date = server_nanos(sample.date);
        let rtt = received - sent;
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |min| min.min(rtt)));
        // The Date was taken somewhere in [sent, received]; as of `received`
        // the drift over that span is added too.
        let drift = self.drift(rtt);
        let low = date - received - drift;
        let high = date + NANOS_PER_SECOND - sent + drift;
        let (low, high, result) = match self.widened(received) {
            None => (low, high, Ok(())),
            Some((old_low, old_high)) => {
                let (low2, high2) = (old_low.max(low), old_high.min(high));
                if low2 <= high2 {
                    (low2, high2, Ok(()))
                } else {
                    (low, high, Err(Inconsistent))
                }
            }
        };
        self.bounds = Some(Bounds {
            low,
            high,
            at: received,
        });
        result
    }

    fn lower_nanos(&self, local: i128) -> Option<i128> {
        let (low, _) = self.widened(local)?;
        let mut value = local + low;
        if let Some((floor_local, floor_value)) = self.floor
            && local >= floor_local
        {
            value = value.max(floor_value);
        }
        Some(value)
    }

    /// The server's time at `at`, rounded down: never ahead of its clock.
    /// Never less than an earlier answer for an earlier or equal instant.
    pub fn lower_bound(&mut self, at: Instant) -> Option<DateTime<Utc>> {
        let local = self.local(at);
        let value = self.lower_nanos(local)?;
        if self
            .floor
            .is_none_or(|(floor_local, _)| local >= floor_local)
        {
            self.floor = Some((local, value));
        }
        to_time(value)
    }

    /// The server's time at `at`, rounded up: never behind its clock.
    pub fn upper_bound(&self, at: Instant) -> Option<DateTime<Utc>> {
        let local = self.local(at);
        let (_, high) = self.widened(local)?;
        to_time(local + high)
    }

    /// Width of the interval the server's clock is known to be in at `at`.
    pub fn uncertainty(&self, at: Instant) -> Option<Duration> {
        let (low, high) = self.widened(self.local(at))?;
        u64::try_from(high - low).ok().map(Duration::from_nanos)
    }

    /// The first local instant at which `lower_bound` reaches `server`
    /// (at or after it; `origin` if already before it).
    pub fn reached_at(&self, server: DateTime<Utc>) -> Option<Instant> {
        let bounds = self.bounds?;
        let target = server_nanos(server);
        // Solve local + low − k·|local − at| = target, k = ppm / 1e6.
        let k = self.drift_ppm;
        let after = div_ceil((target - bounds.low) * PPM - k * bounds.at, PPM - k);
        let local = if after >= bounds.at {
            after
        } else {
            div_ceil((target - bounds.low) * PPM + k * bounds.at, PPM + k)
        };
        // The drift is rounded up in lower_bound: step past it.
        let mut local = local;
        for _ in 0..4 {
            if self.lower_nanos(local).is_some_and(|value| value >= target) {
                break;
            }
            local += 1_000;
        }
        Some(self.instant(local))
    }

    /// The first local instant at which `upper_bound` reaches `server`: the
    /// earliest the server's clock may reach it (`origin` if before it).
    pub fn upper_reached_at(&self, server: DateTime<Utc>) -> Option<Instant> {
        let bounds = self.bounds?;
        let target = server_nanos(server);
        // Solve local + high + k·|local − at| = target, rounding down.
        let k = self.drift_ppm;
        let after = ((target - bounds.high) * PPM + k * bounds.at).div_euclid(PPM + k);
        let local = if after >= bounds.at {
            after
        } else {
            ((target - bounds.high) * PPM - k * bounds.at).div_euclid(PPM - k)
        };
        Some(self.instant(local))
    }

    /// When to send the next probe of a refinement, given that it cannot be
    /// sent before `earliest`: so that, under the middle of the current
    /// bounds, the server's second ticks over halfway through the request.
    pub fn next_probe(&self, earliest: Instant) -> Option<Instant> {
        let local = self.local(earliest);
        let (low, high) = self.widened(local)?;
        let middle = low + (high - low) / 2;
        let half_rtt = self.min_rtt.unwrap_or(0) / 2;
        // The tick N (server) happens at local N − middle; send half a
        // round trip before it.
        let tick = div_ceil(local + half_rtt + middle, NANOS_PER_SECOND) * NANOS_PER_SECOND;
        Some(self.instant(tick - middle - half_rtt))
    }

    /// Whether the bounds are as tight as probing can make them: a couple of
    /// round trips (or a millisecond).
    pub fn is_tight(&self, at: Instant) -> bool {
        let floor = (2 * self.min_rtt.unwrap_or(0)).max(1_000_000);
        self.widened(self.local(at))
            .is_some_and(|(low, high)| high - low <= floor)
    }
}

/// The `Date` header of a response (one-second resolution).
pub(crate) fn date_header(headers: &http::HeaderMap) -> Option<DateTime<Utc>> {
    headers
        .get(http::header::DATE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| DateTime::parse_from_rfc2822(value).ok())
        .map(|time| time.with_timezone(&Utc))
}

/// The API server's clock, shared by everything that needs it (clone freely).
#[derive(Clone)]
pub struct ServerClock {
    client: Client,
    calibration: Arc<Mutex<Calibration>>,
}

impl ServerClock {
    /// Takes one sample (so the bounds exist, about a second wide) and
    /// returns. [`refine`](Self::refine) narrows them.
    pub async fn new(client: Client) -> Result<Self, Error> {
        let clock = ServerClock {
            client,
            calibration: Arc::new(Mutex::new(Calibration::new(
                Instant::now(),
                DEFAULT_DRIFT_PPM,
            ))),
        };
        let sample = clock.sample().await?;
        clock.add(&sample);
        Ok(clock)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Calibration) -> T) -> T {
        let mut calibration = match self.calibration.lock() {
            Ok(guard) => guard,
            // The calibration is plain data: a panic elsewhere left it valid.
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut calibration)
    }

    fn add(&self, sample: &Sample) {
        if self.with(|c| c.add(sample)).is_err() {
            tracing::warn!(
                date = %sample.date,
                "the API server's clock jumped; measuring it again"
            );
        }
    }

    /// One bracketed `GET /version`.
    pub async fn sample(&self) -> Result<Sample, Error> {
        let request = http::Request::get("/version")
            .body(Body::empty())
            .map_err(Error::Request)?;
        let sent = Instant::now();
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.client.send(request))
            .await
            .map_err(|_| Error::Timeout(REQUEST_TIMEOUT))?
            .map_err(Error::Kube)?;
        let received = Instant::now();
        let date = date_header(response.headers()).ok_or(Error::NoDate)?;
        Ok(Sample {
            sent,
            received,
            date,
        })
    }

    /// Narrows the bounds with up to `max_probes` requests timed around the
    /// server's second ticks (each waits for its tick: at most about a second).
    pub async fn refine(&self, max_probes: u32) -> Result<(), Error> {
        for _ in 0..max_probes {
            let now = Instant::now();
            if self.with(|c| c.is_tight(now)) {
                break;
            }
            // A few milliseconds ahead, so the timer can make it.
            let earliest = now + Duration::from_millis(5);
            let Some(send_at) = self.with(|c| c.next_probe(earliest)) else {
                break;
            };
            tokio::time::sleep_until(send_at).await;
            let sample = self.sample().await?;
            self.add(&sample);
        }
        Ok(())
    }

    /// Refines now and then every `every` (every 2 s after a failure), for
    /// ever (spawn it; abort to stop).
    pub async fn keep_calibrated(self, every: Duration) {
        let mut first = true;
        loop {
            match self.refine(MAX_PROBES).await {
                Ok(()) => {
                    let uncertainty_us = self.uncertainty(Instant::now()).as_micros();
                    if std::mem::take(&mut first) {
                        tracing::info!(uncertainty_us, "API server clock measured");
                    } else {
                        tracing::debug!(uncertainty_us, "API server clock measured");
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot measure the API server's clock");
                    // The bounds only widen meanwhile: try again soon.
                    tokio::time::sleep(every.min(Duration::from_secs(2))).await;
                    continue;
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// The server's time at `at`: never ahead of the server's clock, never
    /// less than an earlier answer.
    pub fn lower_bound(&self, at: Instant) -> DateTime<Utc> {
        self.with(|c| c.lower_bound(at))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// The server's time at `at`: never behind the server's clock.
    pub fn upper_bound(&self, at: Instant) -> DateTime<Utc> {
        self.with(|c| c.upper_bound(at))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// How wide the interval of the server's possible times is at `at`.
    pub fn uncertainty(&self, at: Instant) -> Duration {
        self.with(|c| c.uncertainty(at)).unwrap_or(Duration::MAX)
    }

    /// The local instant from which `lower_bound` is at least `server`.
    pub fn reached_at(&self, server: DateTime<Utc>) -> Instant {
        self.with(|c| c.reached_at(server))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1))
    }

    /// When to look again to act at the first instant the server's clock
    /// has certainly reached `server`: at the earliest instant it may have
    /// (the upper bound's), then every `step` while the bounds straddle it,
    /// since a measurement meanwhile may narrow them.
    pub fn wake_for(&self, server: DateTime<Utc>, now: Instant, step: Duration) -> Instant {
        self.with(|c| {
            let reached = c.reached_at(server)?;
            let earliest = c.upper_reached_at(server)?;
            Some(if earliest > now {
                earliest.min(reached)
            } else {
                reached.min(now + step)
            })
        })
        .unwrap_or(now + step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(origin: Instant, ms: u64) -> Instant {
        origin + Duration::from_millis(ms)
    }

    fn time(text: &str) -> DateTime<Utc> {
        match DateTime::parse_from_rfc3339(text) {
            Ok(time) => time.with_timezone(&Utc),
            Err(err) => panic!("{text}: {err}"),
        }
    }

    /// A calibration (drift allowance `ppm`) from one probe sent at a local
    /// `origin` to a server whose clock then read `server`, answering after
    /// `delay_ms` each way.
    fn calibrated(ppm: u32, server: &str, delay_ms: u64) -> (Instant, DateTime<Utc>, Calibration) {
        let origin = Instant::now();
        let mut calibration = Calibration::new(origin, ppm);
        let server = time(server);
        assert_eq!(calibration.add(&probe(origin, server, 0, delay_ms)), Ok(()));
        (origin, server, calibration)
    }

    /// A server whose clock reads `server_at_origin` at local `origin`,
    /// answering after `delay_ms` each way.
    fn probe(
        origin: Instant,
        server_at_origin: DateTime<Utc>,
        sent_ms: u64,
        delay_ms: u64,
    ) -> Sample {
        let stamp = server_at_origin
            + chrono::Duration::milliseconds(i64::try_from(sent_ms + delay_ms).unwrap_or(0));
        let truncated = DateTime::from_timestamp(stamp.timestamp(), 0).unwrap_or_default();
        Sample {
            sent: at(origin, sent_ms),
            received: at(origin, sent_ms + 2 * delay_ms),
            date: truncated,
        }
    }

    #[test]
    fn one_sample_brackets_the_server_clock_within_a_second_and_the_round_trip() {
        let origin = Instant::now();
        let mut calibration = Calibration::new(origin, 0);
        // Server reads 12:00:00.700 at local 0 ms; one-way delay 5 ms.
        let server = time("2030-01-01T12:00:00.700Z");
        let sample = probe(origin, server, 100, 5);
        assert_eq!(sample.date, time("2030-01-01T12:00:00Z"));
        assert_eq!(calibration.add(&sample), Ok(()));
        let query = at(origin, 1_000);
        let truth = time("2030-01-01T12:00:01.700Z");
        let lower = calibration.lower_bound(query);
        let upper = calibration.upper_bound(query);
        assert!(lower.is_some_and(|l| l <= truth), "{lower:?}");
        assert!(upper.is_some_and(|u| u >= truth), "{upper:?}");
        // Date 12:00:00 received at 110 ms: the server was at least at 12:00:00
        // at local 110 ms, i.e. at 12:00:00.890 at local 1000 ms.
        assert_eq!(lower, Some(time("2030-01-01T12:00:00.890Z")));
        // ... and before 12:00:01 at local 100 ms: 12:00:01.900 at 1000 ms.
        assert_eq!(upper, Some(time("2030-01-01T12:00:01.900Z")));
    }

    #[test]
    fn probes_timed_at_the_tick_narrow_the_bounds_to_the_round_trip() {
        let origin = Instant::now();
        let mut calibration = Calibration::new(origin, 0);
        let server = time("2030-01-01T12:00:00.437Z");
        let delay = 1; // ms each way
        assert_eq!(calibration.add(&probe(origin, server, 0, delay)), Ok(()));
        let mut now = 10;
        for _ in 0..MAX_PROBES {
            let Some(send) = calibration.next_probe(at(origin, now)) else {
                panic!("no probe")
            };
            let sent_ms = u64::try_from(send.duration_since(origin).as_millis()).unwrap_or(0);
            assert!(sent_ms >= now, "probe scheduled in the past");
            assert_eq!(
                calibration.add(&probe(origin, server, sent_ms, delay)),
                Ok(())
            );
            now = sent_ms + 2 * delay + 1;
        }
        let query = at(origin, now);
        let width = calibration.uncertainty(query);
        assert!(
            width.is_some_and(|w| w <= Duration::from_millis(4)),
            "{width:?}"
        );
        let truth = server + chrono::Duration::milliseconds(i64::try_from(now).unwrap_or(0));
        assert!(calibration.lower_bound(query).is_some_and(|l| l <= truth));
        assert!(calibration.upper_bound(query).is_some_and(|u| u >= truth));
    }

    #[test]
    fn drift_widens_the_bounds_with_time_since_the_measurement() {
        let (origin, _, mut calibration) = calibrated(500, "2030-01-01T12:00:00.500Z", 0);
        let soon = calibration.uncertainty(at(origin, 0));
        let later = calibration.uncertainty(at(origin, 100_000));
        // 100 s at 500 ppm: 50 ms on each side.
        assert_eq!(
            later.zip(soon).map(|(later, soon)| later - soon),
            Some(Duration::from_millis(100))
        );
        // Lower bound still moves forward with local time.
        let a = calibration.lower_bound(at(origin, 50_000));
        let b = calibration.lower_bound(at(origin, 50_001));
        assert!(a < b);
    }

    #[test]
    fn a_stepped_server_clock_restarts_the_bounds_but_the_lower_bound_never_goes_back() {
        let (origin, server, mut calibration) = calibrated(0, "2030-01-01T12:00:00.500Z", 1);
        let before = calibration.lower_bound(at(origin, 1_000));
        // The server's clock went back 10 s.
        let stepped = server - chrono::Duration::seconds(10);
        assert_eq!(
            calibration.add(&probe(origin, stepped, 2_000, 1)),
            Err(Inconsistent)
        );
        let after = calibration.lower_bound(at(origin, 2_100));
        assert!(after >= before, "{after:?} < {before:?}");
        assert!(
            calibration
                .upper_bound(at(origin, 2_100))
                .zip(Some(stepped + chrono::Duration::milliseconds(2_100)))
                .is_some_and(|(upper, truth)| upper >= truth)
        );
    }

    #[test]
    fn reached_at_is_the_first_instant_the_lower_bound_passes_a_time() {
        let (origin, _, calibration) = calibrated(300, "2030-01-01T12:00:00.250Z", 2);
        for target in [
            "2030-01-01T12:00:03Z",
            "2030-01-01T12:00:00.100Z",
            "2030-01-01T13:00:00Z",
        ] {
            let target = time(target);
            let Some(instant) = calibration.reached_at(target) else {
                panic!("not calibrated")
            };
            let mut copy = calibration.clone();
            assert!(
                copy.lower_bound(instant).is_some_and(|l| l >= target),
                "{target}: not reached at the instant"
            );
            if instant > origin + Duration::from_millis(1) {
                let mut copy = calibration.clone();
                let just_before = instant - Duration::from_millis(1);
                assert!(
                    copy.lower_bound(just_before).is_some_and(|l| l < target),
                    "{target}: reached a millisecond earlier"
                );
            }
        }
    }

    #[test]
    fn the_upper_bound_reaches_a_time_first() {
        let (_, _, calibration) = calibrated(300, "2030-01-01T12:00:00.250Z", 2);
        let target = time("2030-01-01T12:00:05Z");
        let (Some(earliest), Some(certain)) = (
            calibration.upper_reached_at(target),
            calibration.reached_at(target),
        ) else {
            panic!("not calibrated")
        };
        assert!(earliest < certain);
        assert!(
            calibration
                .upper_bound(earliest)
                .is_some_and(|u| u >= target)
        );
        let before = earliest - Duration::from_millis(1);
        assert!(calibration.upper_bound(before).is_some_and(|u| u < target));
    }

    #[test]
    fn absurd_dates_do_not_overflow() {
        let origin = Instant::now();
        let mut calibration = Calibration::new(origin, 500);
        let sample = Sample {
            sent: origin,
            received: origin,
            date: DateTime::<Utc>::MAX_UTC,
        };
        let _ = calibration.add(&sample);
        let _ = calibration.lower_bound(at(origin, 10));
        assert_eq!(calibration.upper_bound(at(origin, 10_000)), None);
        let _ = calibration.reached_at(DateTime::<Utc>::MIN_UTC);
        let _ = calibration.upper_reached_at(DateTime::<Utc>::MAX_UTC);
    }
}
