//! The Kubernetes I/O that applies the lock rules.
//!
//! Every write is conditional: a create (refused with 409 AlreadyExists if
//! another client created the object first) or a replace under the
//! `resourceVersion` that was read (refused with 409 Conflict if anything
//! changed since). On 409 the lock is read again and the rules decide again.
//! Time is the API server's: each read takes the `Date` header of its response.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use kube::client::retry::RetryPolicy;
use kube::client::{Body, ConfigExt};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{Request as KubeRequest, Resource};
use kube::{Client, Config};
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tower::retry::RetryLayer;
use tower::timeout::TimeoutLayer;
use tower::{BoxError, ServiceBuilder};
use tower_http::trace::TraceLayer;

use crate::crd::{DeploymentLock, DeploymentLockSpec, HistoryAction, LockHolder, LockState};
use crate::environment::Environment;
use crate::error::{ApiFailure, ConfigError, Error};
use crate::rules::{self, Decision, NoChange, Refusal, Request};

/// Writes attempted before giving up under contention. Each conflict means
/// another client's write succeeded, so the system as a whole makes progress.
pub const MAX_WRITE_ATTEMPTS: u32 = 32;

/// Longest wait for a TCP connection and TLS handshake with the API server.
pub const CONNECT_TIMEOUT: StdDuration = StdDuration::from_secs(5);

/// Longest wait for one request's whole answer (connecting included): an API
/// server that accepts connections and never answers fails a request after
/// this, never hangs it.
pub const REQUEST_TIMEOUT: StdDuration = StdDuration::from_secs(10);

/// How to reach the cluster, as kubectl's flags say it.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    pub namespace: Option<String>,
}

/// Reads the configuration the way kubectl would: `kubeconfig` if given,
/// else $KUBECONFIG or ~/.kube/config (with `context`), else in-cluster.
/// Shared by the CLI and the controller.
pub async fn load_config(
    kubeconfig: Option<&Path>,
    context: Option<String>,
) -> Result<Config, ConfigError> {
    let has_context = context.is_some();
    let kube_options = KubeConfigOptions {
        context,
        ..KubeConfigOptions::default()
    };
    Ok(match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)?;
            Config::from_custom_kubeconfig(file, &kube_options).await?
        }
        None if has_context => Config::from_kubeconfig(&kube_options).await?,
        None => Config::infer().await?,
    })
}

/// Builds a client the way kubectl would (KUBECONFIG, ~/.kube/config or
/// in-cluster), and returns it with the namespace to use.
pub async fn connect(options: &ConnectOptions) -> Result<(Client, String), Error> {
    let mut config = load_config(options.kubeconfig.as_deref(), options.context.clone())
        .await
        .map_err(Error::Config)?;
    // An unreachable cluster should fail in seconds, not minutes.
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    let namespace = options
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = client_from(config).map_err(|err| Error::Config(err.into()))?;
    Ok((client, namespace))
}

/// kube's default client stack, with TCP_NODELAY on its connections, a
/// connect timeout that covers the TLS handshake, and a timeout on each
/// request's response head ([`REQUEST_TIMEOUT`]): the client to give
/// [`LockStore::new`]. Watches are not cut by it (their head comes at once).
///
/// Without it, the first request on a new TLS connection (every read after a
/// watch ends, since the watch held the pooled connection) waits for the
/// server's delayed ACK of the handshake: 40 ms added to each hand-off.
pub fn client_from(config: Config) -> Result<Client, kube::Error> {
    if config.proxy_url.is_some() {
        // kube decides what a proxy needs (and refuses kinds it was built without).
        return Client::try_from(config);
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    let https = config.rustls_https_connector_with_connector(http)?;
    let mut connector = hyper_timeout::TimeoutConnector::new(https);
    // The TCP connect timeout above does not cover the TLS handshake, which
    // a half-dead server or network can hold open forever.
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    let transport =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector);
    let service = ServiceBuilder::new()
        .layer(TimeoutLayer::new(REQUEST_TIMEOUT))
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .layer(TraceLayer::new_for_http())
        .map_err(BoxError::from)
        .service(transport);
    Ok(Client::new(service, config.default_namespace))
}

/// Whether an admission refusal depends only on the policy's clock trailing
/// the API server's (an expiry or a waiter's drop-out not yet reached).
fn is_clock_refusal(message: &str) -> bool {
    message.contains("it can be taken over once it has expired")
        || message.contains("starts its fencing token from the deploylock clock")
        || message
            .contains("join the queue (deploylock acquire --wait-timeout) instead of jumping it")
}

/// A lock as read, with the API server's time at the read.
#[derive(Clone, Debug)]
pub struct Observed {
    pub namespace: String,
    pub environment: Environment,
    /// `None` when no object exists for the environment yet.
    pub lock: Option<DeploymentLock>,
    /// The API server's clock when it answered.
    pub server_time: DateTime<Utc>,
    /// The local monotonic instant of the answer, to turn server times into
    /// local deadlines without trusting the local wall clock.
    pub local_instant: Instant,
    /// The local instant the request was sent. The server stamped
    /// `server_time` somewhere between this and `local_instant`.
    pub sent: Instant,
}

impl Observed {
    pub fn spec(&self) -> Option<&DeploymentLockSpec> {
        self.lock.as_ref().map(|lock| &lock.spec)
    }

    pub fn state(&self) -> LockState {
        self.spec()
            .map(|spec| rules::state_at(spec, self.server_time))
            .unwrap_or(LockState::Available)
    }

    pub fn holder(&self) -> Option<&LockHolder> {
        self.spec().and_then(|spec| spec.holder.as_ref())
    }

    /// The local instant at which a server time will be reached (an
    /// estimate that errs late: for waking up to look again).
    pub fn local_deadline(&self, server_time: DateTime<Utc>) -> Instant {
        let ahead = (server_time - self.server_time)
            .to_std()
            .unwrap_or_default();
        self.local_instant + ahead
    }

    /// The earliest local instant at which the server's clock can read
    /// `server_time` (an estimate that errs early: for stopping in time).
    ///
    /// The `Date` header is the server's clock truncated to the second,
    /// stamped at some instant between sending the request and reading the
    /// answer: at the send instant the server's clock may already have read
    /// up to `server_time + 1 s`. Clock rates are taken as equal; the caller
    /// adds a margin for drift.
    pub fn earliest_local(&self, server_time: DateTime<Utc>) -> Instant {
        let ahead = (server_time - self.server_time - chrono::Duration::seconds(1))
            .to_std()
            .unwrap_or_default();
        self.sent + ahead
    }
}

/// What an applied request wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A transition of the lock, with its history action.
    Transition(HistoryAction),
    /// Only the wait queue changed.
    QueueUpdated,
    /// Nothing was written.
    Unchanged(NoChange),
}

/// What an applied request did.
#[derive(Clone, Debug)]
pub struct Applied {
    /// The lock after the request (as written, or as read when unchanged).
    pub observed: Observed,
    pub outcome: Outcome,
}

/// A refusal from the rules, with the lock as read when it was decided (for
/// a caller that waits: who holds it, until when, on the server's clock).
#[derive(Clone, Debug)]
pub struct Refused {
    pub refusal: Refusal,
    pub observed: Observed,
}

/// The locks of a list, with the API server's time of the answer.
#[derive(Debug)]
pub struct Listing {
    /// The locks that decode, in the API server's order (namespace, name).
    pub locks: Vec<DeploymentLock>,
    /// Objects stored but undecodable, skipped.
    pub malformed: Vec<MalformedLock>,
    pub server_time: DateTime<Utc>,
}

/// A list response, its items still undecoded.
#[derive(serde::Deserialize)]
struct RawList {
    items: Option<Vec<serde_json::Value>>,
}

/// A DeploymentLock the API server stores but these types cannot decode: a
/// value the schema admitted and Rust refuses. It is named, never fatal to
/// the reading of other locks.
#[derive(Debug, thiserror::Error)]
#[error(
    "the DeploymentLock {name:?} in namespace {namespace:?} is malformed: {location}: {source}"
)]
pub struct MalformedLock {
    pub namespace: String,
    pub name: String,
    /// Where the first undecodable value is, e.g. `spec.history[0].at`.
    pub location: String,
    #[source]
    pub source: serde_json::Error,
}

/// Decodes one DeploymentLock as the API server returned it; on failure, says
/// which object and, as closely as it can tell, which part of it.
pub fn decode_lock(object: serde_json::Value) -> Result<DeploymentLock, Box<MalformedLock>> {
    use serde_json::Value;
    let text = |pointer: &str| {
        object
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    let (namespace, name) = (text("/metadata/namespace"), text("/metadata/name"));
    // From a reference: no copy of the object on this path (every read).
    let (location, source) = match <DeploymentLock as serde::Deserialize>::deserialize(&object) {
        Ok(lock) => return Ok(lock),
        Err(err) => locate_error(&object).unwrap_or_else(|| ("object".to_string(), err)),
    };
    Err(Box::new(MalformedLock {
        namespace,
        name,
        location,
        source,
    }))
}

/// The first part of `object` that does not decode on its own, with its
/// error: `spec.history[3].at` rather than "trailing input" somewhere.
fn locate_error(object: &serde_json::Value) -> Option<(String, serde_json::Error)> {
    use serde::de::DeserializeOwned;
    use serde_json::Value;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    use crate::crd::{DeploymentLockStatus, HistoryEntry, Waiter};

    fn check<T: DeserializeOwned>(
        path: String,
        value: &Value,
    ) -> Option<(String, serde_json::Error)> {
        let err = serde_json::from_value::<T>(value.clone()).err()?;
        // Name the date-time field at fault, judged by the rule the types
        // decode with (`crd::parse_time`).
        let fields = value.as_object().into_iter().flatten();
        for (field, inner) in fields {
            if TIME_FIELDS.contains(&field.as_str())
                && !inner.is_null()
                && inner
                    .as_str()
                    .is_none_or(|text| crate::crd::parse_time(text).is_none())
            {
                return Some((format!("{path}.{field}"), err));
            }
        }
        Some((path, err))
    }
    /// The fields decoded with `crd::parse_time`.
    const TIME_FIELDS: [&str; 5] = ["at", "acquiredAt", "expiresAt", "since", "heartbeatAt"];

    if !object.is_object() {
        return None;
    }
    let null = Value::Null;
    let part = |pointer: &str| object.pointer(pointer).unwrap_or(&null);
    let items = |pointer: &str| {
        part(pointer)
            .as_array()
            .map(|items| items.iter().enumerate().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    if let Some(holder) = object.pointer("/spec/holder").filter(|h| !h.is_null())
        && let Some(found) = check::<LockHolder>("spec.holder".into(), holder)
    {
        return Some(found);
    }
    for (i, waiter) in items("/spec/queue") {
        if let Some(found) = check::<Waiter>(format!("spec.queue[{i}]"), waiter) {
            return Some(found);
        }
    }
    for (i, entry) in items("/spec/history") {
        if let Some(found) = check::<HistoryEntry>(format!("spec.history[{i}]"), entry) {
            return Some(found);
        }
    }
    if let Some(found) = check::<DeploymentLockSpec>("spec".into(), part("/spec")) {
        return Some(found);
    }
    for (i, condition) in items("/status/conditions") {
        if let Some(found) = check::<Condition>(format!("status.conditions[{i}]"), condition) {
            return Some(found);
        }
    }
    if let Some(status) = object.pointer("/status").filter(|s| !s.is_null())
        && let Some(found) = check::<DeploymentLockStatus>("status".into(), status)
    {
        return Some(found);
    }
    check::<kube::core::ObjectMeta>("metadata".into(), part("/metadata"))
}

/// The API server's clock as last read (its `Date` and the local instant of
/// the answer), shared by the clones of a store: relative times in messages
/// ("in 25m") are counted from it rather than from the local clock.
#[derive(Clone, Debug, Default)]
pub struct ServerClock(Arc<Mutex<Option<ClockReading>>>);

/// The server's time in an answer, and the local instant of that answer.
type ClockReading = (DateTime<Utc>, Instant);

impl ServerClock {
    fn record(&self, server_time: DateTime<Utc>, at: Instant) {
        if let Ok(mut last) = self.0.lock() {
            *last = Some((server_time, at));
        }
    }

    /// The server's clock now, if any answer was read.
    pub fn now(&self) -> Option<DateTime<Utc>> {
        let last = *self.0.lock().ok()?;
        let (server_time, at) = last?;
        Some(server_time + chrono::Duration::from_std(at.elapsed()).ok()?)
    }
}

/// DeploymentLocks in one namespace, read and written under the rules.
#[derive(Clone)]
pub struct LockStore {
    client: Client,
    namespace: String,
    api: Api<DeploymentLock>,
    clock: ServerClock,
}

/// `future` bounded by [`REQUEST_TIMEOUT`]; running out is an unreachable
/// server (exit 6), like a refused connection.
async fn bounded<T>(
    future: impl Future<Output = Result<T, Error>>,
    what: &str,
) -> Result<T, Error> {
    match tokio::time::timeout(REQUEST_TIMEOUT, future).await {
        Ok(result) => result,
        Err(elapsed) => Err(Error::Unreachable(ApiFailure::caused_by(
            format!("no answer to {what} within {} s", REQUEST_TIMEOUT.as_secs()),
            kube::Error::Service(Box::new(elapsed)),
        ))),
    }
}

impl LockStore {
    pub fn new(client: Client, namespace: &str) -> Self {
        LockStore {
            api: Api::namespaced(client.clone(), namespace),
            client,
            namespace: namespace.to_string(),
            clock: ServerClock::default(),
        }
    }

    /// The API server's clock as this store (and its clones) last read it.
    pub fn server_clock(&self) -> ServerClock {
        self.clock.clone()
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The client (for reads beside the locks, e.g. notification subscriptions).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn kube_error(&self, err: kube::Error) -> Error {
        Error::from_kube(err, &self.namespace)
    }

    /// The username the API server authenticates for this client.
    pub async fn whoami(&self) -> Result<String, Error> {
        let reviews: Api<SelfSubjectReview> = Api::all(self.client.clone());
        let review = bounded(
            async {
                reviews
                    .create(&PostParams::default(), &SelfSubjectReview::default())
                    .await
                    .map_err(|err| self.kube_error(err))
            },
            "who am I (SelfSubjectReview)",
        )
        .await?;
        review
            .status
            .and_then(|status| status.user_info)
            .and_then(|user| user.username)
            .ok_or_else(|| Error::Api("SelfSubjectReview returned no username".into()))
    }

    /// Reads the lock of `environment` with the server's time.
    pub async fn read(&self, environment: &Environment) -> Result<Observed, Error> {
        let request = KubeRequest::new(DeploymentLock::url_path(&(), Some(&self.namespace)))
            .get(environment.as_str(), &Default::default())
            .map_err(|err| self.kube_error(kube::Error::BuildRequest(err)))?;
        let sent = Instant::now();
        let (lock, server_time, local_instant) = match self.send_with_time(request).await {
            Ok((object, time, instant)) => (Some(decode_lock(object)?), time, instant),
            Err((kube::Error::Api(status), Some((time, instant))))
                if status.code == 404
                    && status
                        .details
                        .as_ref()
                        .is_some_and(|d| d.name == environment.as_str()) =>
            {
                (None, time, instant)
            }
            Err((err, _)) => return Err(self.kube_error(err)),
        };
        Ok(Observed {
            namespace: self.namespace.clone(),
            environment: environment.clone(),
            lock,
            server_time,
            local_instant,
            sent,
        })
    }

    /// Lists locks in this namespace, or in all namespaces, with the server's
    /// time. Items are decoded one by one: a malformed object is returned
    /// beside the others, never in their way.
    pub async fn list(&self, all_namespaces: bool) -> Result<Listing, Error> {
        let namespace = (!all_namespaces).then_some(self.namespace.as_str());
        let request = KubeRequest::new(DeploymentLock::url_path(&(), namespace))
            .list(&Default::default())
            .map_err(|err| self.kube_error(kube::Error::BuildRequest(err)))?;
        let (list, server_time, _): (RawList, _, _) = self
            .send_with_time(request)
            .await
            .map_err(|(err, _)| self.kube_error(err))?;
        let mut listing = Listing {
            locks: Vec::new(),
            malformed: Vec::new(),
            server_time,
        };
        for object in list.items.unwrap_or_default() {
            match decode_lock(object) {
                Ok(lock) => listing.locks.push(lock),
                Err(malformed) => listing.malformed.push(*malformed),
            }
        }
        Ok(listing)
    }

    /// Sends a GET and returns the decoded body with the `Date` of the answer.
    /// Errors carry the time too when the server answered at all.
    #[allow(clippy::type_complexity)]
    async fn send_with_time<T: DeserializeOwned>(
        &self,
        request: http::Request<Vec<u8>>,
    ) -> Result<(T, DateTime<Utc>, Instant), (kube::Error, Option<(DateTime<Utc>, Instant)>)> {
        let whole = self.send_with_time_unbounded(request);
        match tokio::time::timeout(REQUEST_TIMEOUT, whole).await {
            Ok(result) => result,
            Err(elapsed) => Err((kube::Error::Service(Box::new(elapsed)), None)),
        }
    }

    #[allow(clippy::type_complexity)]
    async fn send_with_time_unbounded<T: DeserializeOwned>(
        &self,
        request: http::Request<Vec<u8>>,
    ) -> Result<(T, DateTime<Utc>, Instant), (kube::Error, Option<(DateTime<Utc>, Instant)>)> {
        let response = self
            .client
            .send(request.map(Body::from))
            .await
            .map_err(|err| (err, None))?;
        let local_instant = Instant::now();
        // Every Kubernetes API server sends Date; a proxy that strips it
        // leaves us only the local clock.
        let server_time =
            crate::servertime::date_header(response.headers()).unwrap_or_else(Utc::now);
        self.clock.record(server_time, local_instant);
        let timing = Some((server_time, local_instant));
        let status = response.status();
        let bytes = response
            .into_body()
            .collect_bytes()
            .await
            .map_err(|err| (err, timing))?;
        if !status.is_success() {
            let status: kube::core::Status = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                kube::core::Status::failure(&String::from_utf8_lossy(&bytes), "")
                    .with_code(status.as_u16())
            });
            return Err((kube::Error::Api(Box::new(status)), timing));
        }
        let value =
            serde_json::from_slice(&bytes).map_err(|err| (kube::Error::SerdeError(err), timing))?;
        Ok((value, server_time, local_instant))
    }

    /// Decides `request` on the current lock and writes the result under the
    /// read `resourceVersion`, again and again while other clients win the
    /// race. A refusal from the rules is returned as is.
    pub async fn apply(
        &self,
        environment: &Environment,
        request: &Request,
    ) -> Result<Applied, Error> {
        self.try_apply(environment, request)
            .await?
            .map_err(|refused| Error::Refused(refused.refusal))
    }

    /// `apply`, with a refusal returned beside the lock it was decided on.
    pub async fn try_apply(
        &self,
        environment: &Environment,
        request: &Request,
    ) -> Result<Result<Applied, Refused>, Error> {
        for attempt in 1..=MAX_WRITE_ATTEMPTS {
            let observed = self.read(environment).await?;
            let decision = match rules::decide(
                environment.as_str(),
                observed.spec(),
                observed.server_time,
                request,
            ) {
                Ok(decision) => decision,
                Err(refusal) => return Ok(Err(Refused { refusal, observed })),
            };
            let (next, outcome) = match decision {
                Decision::Unchanged(why) => {
                    return Ok(Ok(Applied {
                        observed,
                        outcome: Outcome::Unchanged(why),
                    }));
                }
                Decision::Change { next, action } => (next, Outcome::Transition(action)),
                Decision::Queue { next } => (next, Outcome::QueueUpdated),
            };
            // A write without an answer may or may not have happened: the
            // caller decides again on a fresh read (a retried acquire finds
            // its own holding, a retried release finds the lock free).
            let written = self.write(environment, observed.lock.as_ref(), next).await;
            match written {
                Ok(lock) => {
                    tracing::debug!(%environment, ?outcome, attempt, "lock written");
                    return Ok(Ok(Applied {
                        observed: Observed {
                            lock: Some(lock),
                            ..observed
                        },
                        outcome,
                    }));
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    tracing::debug!(%environment, attempt, reason = %status.reason, "write conflict, deciding again");
                }
                // The admission policy's clock is the controller's clock
                // Lease, a lower bound of the API server's time that the
                // controller moves at each expiry instant (then marks the
                // lock Expired) and every second. A takeover, or a turn in
                // the queue after a waiter dropped out, can be refused for
                // that moment: wait for the lock's status write, briefly.
                Err(kube::Error::Api(status))
                    if status.code == 403
                        && (observed.lock.is_none()
                            || matches!(
                                outcome,
                                Outcome::Transition(
                                    HistoryAction::TookOverExpired | HistoryAction::Acquired
                                )
                            ))
                        && is_clock_refusal(&status.message)
                        && attempt < 6 =>
                {
                    tracing::debug!(
                        %environment,
                        attempt,
                        message = %status.message,
                        "refused until the deploylock clock catches up"
                    );
                    self.wait_for_change(&observed, Instant::now() + StdDuration::from_secs(2))
                        .await?;
                }
                Err(err) => return Err(self.kube_error(err)),
            }
        }
        Err(Error::Contention(MAX_WRITE_ATTEMPTS))
    }

    /// The one conditional write of a lock: creates it when `current` is
    /// `None` (refused with 409 AlreadyExists if another client created it
    /// first), else replaces `current`'s spec with `next` under the
    /// `resourceVersion` `current` was read at (409 Conflict if anything
    /// changed since). Bounded by [`REQUEST_TIMEOUT`].
    pub async fn write(
        &self,
        environment: &Environment,
        current: Option<&DeploymentLock>,
        next: DeploymentLockSpec,
    ) -> Result<DeploymentLock, kube::Error> {
        let write = async {
            match current {
                None => {
                    let lock = DeploymentLock::new(environment.as_str(), next);
                    self.api.create(&PostParams::default(), &lock).await
                }
                Some(current) => {
                    let mut lock = current.clone();
                    lock.spec = next;
                    self.api
                        .replace(environment.as_str(), &PostParams::default(), &lock)
                        .await
                }
            }
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, write).await {
            Ok(written) => written,
            Err(elapsed) => Err(kube::Error::Service(Box::new(elapsed))),
        }
    }

    /// Returns at the first change of the lock after `observed`, or at
    /// `until`, whichever comes first. Driven by a watch: nothing polls.
    pub async fn wait_for_change(&self, observed: &Observed, until: Instant) -> Result<(), Error> {
        let resource_version = observed
            .lock
            .as_ref()
            .and_then(|lock| lock.metadata.resource_version.clone())
            .unwrap_or_else(|| "0".to_string());
        let mut changes = self.watch(&observed.environment, &resource_version).await?;
        tokio::select! {
            // Any event, or the end of the watch, means: read again.
            _ = changes.try_next() => {}
            _ = tokio::time::sleep_until(until) => {}
        }
        Ok(())
    }

    /// Changes of one lock after `resource_version` ("0": its current state
    /// first). The API server ends a watch after a few minutes.
    pub async fn watch(
        &self,
        environment: &Environment,
        resource_version: &str,
    ) -> Result<BoxStream<'static, Result<WatchEvent<DeploymentLock>, kube::Error>>, Error> {
        let params = WatchParams::default()
            .fields(&format!("metadata.name={environment}"))
            .timeout(290);
        let stream = bounded(
            async {
                self.api
                    .watch(&params, resource_version)
                    .await
                    .map_err(|err| self.kube_error(err))
            },
            "a watch",
        )
        .await?;
        Ok(stream.boxed())
    }

    /// Waits until the lock is Available or Expired, or `deadline` passes.
    /// Woken by a watch on the object and by a timer at the holder's expiry.
    /// `on_held` is called each time a different holder is seen.
    pub async fn wait_until_free(
        &self,
        environment: &Environment,
        deadline: Option<Instant>,
        mut on_held: impl FnMut(&Observed),
    ) -> Result<Observed, Error> {
        let mut last_lock_id: Option<String> = None;
        loop {
            let observed = self.read(environment).await?;
            let holder = match (observed.state(), observed.holder()) {
                (LockState::Locked | LockState::ForceLocked, Some(holder)) => holder.clone(),
                _ => return Ok(observed),
            };
            if last_lock_id.as_deref() != Some(holder.lock_id.as_str()) {
                on_held(&observed);
                last_lock_id = Some(holder.lock_id.clone());
            }
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return Err(Error::WaitTimedOut(Some(Box::new(holder))));
            }
            let mut until = observed.local_deadline(holder.expires_at);
            if let Some(deadline) = deadline {
                until = until.min(deadline);
            }
            self.wait_for_change(&observed, until).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    /// A lock as the API server returns it.
    fn stored_lock(name: &str) -> Value {
        json!({
            "apiVersion": "deploylock.dev/v1",
            "kind": "DeploymentLock",
            "metadata": {
                "name": name,
                "namespace": "team-a",
                "resourceVersion": "42",
                "creationTimestamp": "2030-01-01T00:00:00Z"
            },
            "spec": {
                "environment": name,
                "fencingToken": 1,
                "holder": crate::testdata::holder(""),
                "queue": [crate::testdata::waiter("")],
                "history": [crate::testdata::acquired_entry("")]
            },
            "status": {
                "state": "Locked",
                "conditions": [{
                    "type": "Ready",
                    "status": "True",
                    "reason": "Observed",
                    "message": "",
                    "lastTransitionTime": "2030-01-01T00:00:00Z"
                }]
            }
        })
    }

    fn poisoned(pointer: &str, value: Value) -> Value {
        let mut object = stored_lock("production");
        match object.pointer_mut(pointer) {
            Some(slot) => *slot = value,
            None => panic!("no {pointer} in the test lock"),
        }
        object
    }

    #[test]
    fn a_well_formed_lock_decodes() {
        let lock = match decode_lock(stored_lock("production")) {
            Ok(lock) => lock,
            Err(err) => panic!("{err}"),
        };
        assert_eq!(lock.spec.environment, "production");
        assert_eq!(lock.spec.history.len(), 1);
    }

    #[test]
    fn a_malformed_lock_is_named_with_the_place_of_its_fault() {
        // Values the schema admitted at some point, or a hostile admin wrote.
        let cases = [
            (
                "/spec/history/0/at",
                json!("2030-01-01T00:00:00ZT"),
                "spec.history[0].at",
            ),
            (
                "/spec/history/0/at",
                json!("2030-01-01T00:00:00,5Z"),
                "spec.history[0].at",
            ),
            (
                "/spec/holder/expiresAt",
                json!("2099-13-01T00:00:00Z"),
                "spec.holder.expiresAt",
            ),
            (
                "/spec/queue/0/since",
                json!("yesterday"),
                "spec.queue[0].since",
            ),
            (
                "/spec/holder/acquiredAt",
                json!("2030-01-01T01:00:00+01:00"),
                "spec.holder.acquiredAt",
            ),
            (
                "/spec/history/0/at",
                json!(1_893_456_000),
                "spec.history[0].at",
            ),
            (
                "/spec/history/0/action",
                json!("Teleported"),
                "spec.history[0]",
            ),
            (
                "/spec/fencingToken",
                json!(9_223_372_036_854_775_808_u64),
                "spec",
            ),
            ("/spec/holder/durationSeconds", json!(1.5), "spec.holder"),
            (
                "/status/conditions/0/lastTransitionTime",
                json!("2030-01-01T00:00:00ZT"),
                "status.conditions[0]",
            ),
            ("/status/state", json!("Haunted"), "status"),
            ("/metadata/creationTimestamp", json!("never"), "metadata"),
        ];
        for (pointer, value, location) in cases {
            let what = format!("{pointer} = {value}");
            let err = match decode_lock(poisoned(pointer, value)) {
                Ok(lock) => panic!("{what} decoded: {lock:?}"),
                Err(err) => err,
            };
            assert_eq!(err.namespace, "team-a", "{what}");
            assert_eq!(err.name, "production", "{what}");
            assert_eq!(err.location, location, "{what}: {err}");
            let message = err.to_string();
            assert!(
                message.contains("\"production\"") && message.contains("malformed"),
                "{what}: {message}"
            );
            assert!(
                std::error::Error::source(&*err).is_some(),
                "{what}: the decode error is kept as the source"
            );
        }
    }

    #[test]
    fn a_lock_that_is_not_even_an_object_is_named_as_well_as_can_be() {
        let err = match decode_lock(json!({"metadata": {"name": "staging"}, "spec": 7})) {
            Ok(lock) => panic!("decoded: {lock:?}"),
            Err(err) => err,
        };
        assert_eq!(err.name, "staging");
        assert_eq!(err.namespace, "?");
        assert_eq!(err.location, "spec");
        let err = match decode_lock(json!("not an object")) {
            Ok(lock) => panic!("decoded: {lock:?}"),
            Err(err) => err,
        };
        assert_eq!((err.name.as_str(), err.location.as_str()), ("?", "object"));
    }

    #[test]
    fn a_list_is_decoded_item_by_item() {
        let body = json!({
            "apiVersion": "deploylock.dev/v1",
            "kind": "DeploymentLockList",
            "metadata": { "resourceVersion": "43" },
            "items": [
                stored_lock("a"),
                poisoned("/spec/history/0/at", json!("2030-01-01T00:00:00ZT")),
                stored_lock("z"),
            ]
        });
        let list: RawList = match serde_json::from_value(body) {
            Ok(list) => list,
            Err(err) => panic!("{err}"),
        };
        let (locks, malformed): (Vec<_>, Vec<_>) = list
            .items
            .unwrap_or_default()
            .into_iter()
            .map(decode_lock)
            .partition(Result::is_ok);
        let names: Vec<String> = locks
            .into_iter()
            .filter_map(Result::ok)
            .filter_map(|lock| lock.metadata.name)
            .collect();
        assert_eq!(names, ["a", "z"]);
        assert_eq!(malformed.len(), 1);
        let empty: RawList = match serde_json::from_value(json!({"items": null})) {
            Ok(list) => list,
            Err(err) => panic!("{err}"),
        };
        assert!(empty.items.unwrap_or_default().is_empty());
    }
}
