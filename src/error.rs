//! The library's errors. Each keeps the failure it came from as its
//! `source()` (a `kube::Error`, a kubeconfig error); the CLI turns each into
//! one message ([`crate::cli::report::describe`]) and one exit code
//! ([`crate::cli::report::exit_for`]).

use crate::crd::LockHolder;
use crate::rules::Refusal;

/// How the stop-the-line policy's refusal begins
/// (config/admission/stop-the-line.yaml; a test ties them together).
pub const STOP_THE_LINE_DENIAL: &str = "the namespace is frozen: stop-the-line is held by ";

/// What the API server (or the way to it) answered, in the words shown to
/// the user, with the kube error behind it when there is one.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiFailure {
    pub message: String,
    #[source]
    pub source: Option<kube::Error>,
}

impl ApiFailure {
    /// A failure with no kube error behind it (an answer that makes no sense).
    pub fn new(message: impl Into<String>) -> Self {
        ApiFailure {
            message: message.into(),
            source: None,
        }
    }

    pub fn caused_by(message: impl Into<String>, source: kube::Error) -> Self {
        ApiFailure {
            message: message.into(),
            source: Some(source),
        }
    }
}

impl From<String> for ApiFailure {
    fn from(message: String) -> Self {
        ApiFailure::new(message)
    }
}

impl From<&str> for ApiFailure {
    fn from(message: &str) -> Self {
        ApiFailure::new(message)
    }
}

/// No usable kubeconfig, context or client.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error(transparent)]
    Infer(#[from] kube::config::InferConfigError),
    /// The configuration was read but no client could be built from it.
    #[error(transparent)]
    Client(#[from] kube::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The lock rules refused the request.
    #[error(transparent)]
    Refused(#[from] Refusal),

    /// Input the API would refuse, caught before anything is sent.
    #[error("{0}")]
    InvalidInput(String),

    /// No usable kubeconfig or context.
    #[error("cannot load the Kubernetes configuration: {0}")]
    Config(#[source] ConfigError),

    /// The API server could not be reached.
    #[error("cannot reach the Kubernetes API server: {0}")]
    Unreachable(#[source] ApiFailure),

    /// The DeploymentLock CRD is not installed in the cluster.
    #[error(
        "the DeploymentLock CRD (deploymentlocks.deploylock.dev) is not installed in this cluster"
    )]
    CrdNotInstalled(#[source] kube::Error),

    /// The namespace does not exist.
    #[error("namespace {namespace:?} not found")]
    NamespaceNotFound {
        namespace: String,
        #[source]
        source: kube::Error,
    },

    /// The API server did not accept the caller's credentials.
    #[error("the API server did not accept your credentials: {0}")]
    Unauthorized(#[source] ApiFailure),

    /// RBAC or admission refused the request.
    #[error("the API server refused: {0}")]
    Forbidden(#[source] ApiFailure),

    /// The API server's validation refused the object.
    #[error("the API server rejected the lock: {0}")]
    Rejected(#[source] ApiFailure),

    /// Too many concurrent writers; every attempt met a conflict.
    #[error("gave up after {0} conflicting writes from other clients")]
    Contention(u32),

    /// The lock did not become free before the wait timeout.
    #[error("timed out waiting for the lock")]
    WaitTimedOut(Option<Box<LockHolder>>),

    /// The wait timeout passed while the namespace was frozen: its
    /// `stop-the-line` lock was held (by this holding) all along.
    #[error("timed out waiting for the namespace's freeze (stop-the-line) to end")]
    WaitTimedOutFrozen(Box<LockHolder>),

    /// Interrupted (Ctrl-C) while waiting.
    #[error("interrupted")]
    Interrupted,

    /// The API server stores a lock that cannot be decoded.
    #[error(transparent)]
    Malformed(#[from] Box<crate::store::MalformedLock>),

    /// Any other API failure.
    #[error("Kubernetes API error: {0}")]
    Api(#[source] ApiFailure),
}

impl Error {
    /// Classifies a kube error from a request on DeploymentLocks in `namespace`.
    pub fn from_kube(err: kube::Error, namespace: &str) -> Self {
        let message = match &err {
            kube::Error::Api(status) => status.message.clone(),
            kube::Error::HyperError(inner) => root_cause(inner),
            kube::Error::Service(inner) if is_timeout(inner.as_ref()) => format!(
                "no answer in time ({} s to connect, {} s for a request)",
                crate::store::CONNECT_TIMEOUT.as_secs(),
                crate::store::REQUEST_TIMEOUT.as_secs()
            ),
            kube::Error::Service(inner) => root_cause(inner.as_ref()),
            other => other.to_string(),
        };
        let code = match &err {
            kube::Error::Api(status) => Some(status.code),
            _ => None,
        };
        match code {
            Some(401) => Error::Unauthorized(ApiFailure::caused_by(message, err)),
            // The admission policy's clock Lease does not exist: the
            // controller has never run (or the binding names another).
            // The API server answers 403 or, on create, 422.
            Some(403 | 422) if message.contains("no params found") => {
                Error::Forbidden(ApiFailure::caused_by(
                    format!(
                        "{message}: the deploylock controller's clock Lease (deploylock-clock) is missing; is the deploylock controller installed and running?"
                    ),
                    err,
                ))
            }
            Some(403) => Error::Forbidden(ApiFailure::caused_by(message, err)),
            Some(404) if message.contains("namespaces") => Error::NamespaceNotFound {
                namespace: namespace.to_string(),
                source: err,
            },
            Some(404) => Error::CrdNotInstalled(err),
            Some(422) => Error::Rejected(ApiFailure::caused_by(message, err)),
            // An object etcd refuses to store: retrying cannot help.
            Some(500) if message.contains("request is too large") => {
                Error::Api(ApiFailure::caused_by(message, err))
            }
            // Overload and a server or etcd that is restarting: the
            // server is there but cannot answer now.
            Some(code @ (429 | 500 | 502 | 503 | 504)) => Error::Unreachable(
                ApiFailure::caused_by(format!("HTTP {code}: {message}"), err),
            ),
            Some(_) => Error::Api(ApiFailure::caused_by(message, err)),
            None if matches!(err, kube::Error::HyperError(_) | kube::Error::Service(_)) => {
                Error::Unreachable(ApiFailure::caused_by(message, err))
            }
            None => Error::Api(ApiFailure::caused_by(message, err)),
        }
    }

    /// A fault that may pass by itself (no connection, no answer in time, a
    /// server restarting or overloaded): a waiting client retries it until
    /// its deadline.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unreachable(_))
    }

    /// Whether the API server refused an acquisition because the namespace
    /// is frozen (the stop-the-line policy): a waiter waits that out.
    pub fn is_stop_the_line_refusal(&self) -> bool {
        matches!(self, Error::Forbidden(ApiFailure { message, .. })
            if message.contains(STOP_THE_LINE_DENIAL))
    }

    /// A 403 from authorization (RBAC: "User ... cannot ..."), as opposed to
    /// one from the admission policy. Right after an API server starts, RBAC
    /// refuses everyone until its caches are filled, so a waiting client
    /// retries this for a short while; the policy's refusal is final.
    pub fn is_authorization_refusal(&self) -> bool {
        match self {
            Error::Forbidden(ApiFailure { message, .. }) => {
                !message.contains("denied request")
                    && !message.contains("ValidatingAdmissionPolicy")
                    && !message.contains("admission webhook")
                    && message.contains(" cannot ")
            }
            _ => false,
        }
    }
}

/// Whether an error chain holds a timeout (tower's per-request timeout, or
/// one of tokio's).
fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(err) = current {
        if err.is::<tower::timeout::error::Elapsed>() || err.is::<tokio::time::error::Elapsed>() {
            return true;
        }
        // A connect timeout comes as an io::Error, whose source() skips the
        // error it wraps.
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return true;
        }
        current = err.source();
    }
    false
}

/// The innermost message of an error chain ("connection refused" rather than
/// "client error (Connect)").
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stop_the_line_denial_is_the_policys_and_only_it_is_recognised() {
        let policy = include_str!("../config/admission/stop-the-line.yaml");
        assert!(
            policy.contains(&format!("'{STOP_THE_LINE_DENIAL}'")),
            "config/admission/stop-the-line.yaml no longer begins its message with {STOP_THE_LINE_DENIAL:?}"
        );
        let denied = |message: &str| Error::Forbidden(ApiFailure::new(message));
        assert!(
            denied(&format!(
                "admission webhook denied request: {STOP_THE_LINE_DENIAL}carol until ..."
            ))
            .is_stop_the_line_refusal()
        );
        assert!(!denied("user \"bob\" cannot update resource").is_stop_the_line_refusal());
        assert!(!Error::Api(ApiFailure::new(STOP_THE_LINE_DENIAL)).is_stop_the_line_refusal());
    }

    #[test]
    fn an_object_etcd_refuses_is_not_a_passing_fault() {
        let status = |message: &str| {
            kube::Error::Api(Box::new(
                kube::core::Status::failure(message, "InternalError").with_code(500),
            ))
        };
        let too_large = Error::from_kube(status("etcdserver: request is too large"), "team");
        assert!(matches!(too_large, Error::Api(_)), "{too_large:?}");
        assert!(!too_large.is_transient());
        let restarting = Error::from_kube(status("etcdserver: leader changed"), "team");
        assert!(restarting.is_transient(), "{restarting:?}");
    }
}
