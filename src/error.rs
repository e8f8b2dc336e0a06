//! The library's errors. The CLI turns each into one message and one exit code
//! in a single place (`cli::report`).

use crate::crd::LockHolder;
use crate::rules::Refusal;

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
    Config(String),

    /// The API server could not be reached.
    #[error("cannot reach the Kubernetes API server: {0}")]
    Unreachable(String),

    /// The DeploymentLock CRD is not installed in the cluster.
    #[error(
        "the DeploymentLock CRD (deploymentlocks.deploylock.dev) is not installed in this cluster"
    )]
    CrdNotInstalled,

    /// The namespace does not exist.
    #[error("namespace {0:?} not found")]
    NamespaceNotFound(String),

    /// The API server did not accept the caller's credentials.
    #[error("the API server did not accept your credentials: {0}")]
    Unauthorized(String),

    /// RBAC or admission refused the request.
    #[error("the API server refused: {0}")]
    Forbidden(String),

    /// The API server's validation refused the object.
    #[error("the API server rejected the lock: {0}")]
    Rejected(String),

    /// Too many concurrent writers; every attempt met a conflict.
    #[error("gave up after {0} conflicting writes from other clients")]
    Contention(u32),

    /// The lock did not become free before the wait timeout.
    #[error("timed out waiting for the lock")]
    WaitTimedOut(Option<Box<LockHolder>>),

    /// Interrupted (Ctrl-C) while waiting.
    #[error("interrupted")]
    Interrupted,

    /// The API server stores a lock that cannot be decoded.
    #[error(transparent)]
    Malformed(#[from] Box<crate::store::MalformedLock>),

    /// Any other API failure.
    #[error("Kubernetes API error: {0}")]
    Api(String),
}

impl Error {
    /// Classifies a kube error from a request on DeploymentLocks in `namespace`.
    pub fn from_kube(err: kube::Error, namespace: &str) -> Self {
        match err {
            kube::Error::Api(status) => match status.code {
                401 => Error::Unauthorized(status.message),
                // The admission policy's clock Lease does not exist: the
                // controller has never run (or the binding names another).
                // The API server answers 403 or, on create, 422.
                403 | 422 if status.message.contains("no params found") => {
                    Error::Forbidden(format!(
                        "{}: the deploylock controller's clock Lease (deploylock-clock) is missing; is the deploylock controller installed and running?",
                        status.message
                    ))
                }
                403 => Error::Forbidden(status.message),
                404 if status.message.contains("namespaces") => {
                    Error::NamespaceNotFound(namespace.to_string())
                }
                404 => Error::CrdNotInstalled,
                422 => Error::Rejected(status.message),
                // Overload and a server or etcd that is restarting: the
                // server is there but cannot answer now.
                429 | 500 | 502 | 503 | 504 => {
                    Error::Unreachable(format!("HTTP {}: {}", status.code, status.message))
                }
                _ => Error::Api(status.message),
            },
            kube::Error::HyperError(err) => Error::Unreachable(root_cause(&err)),
            kube::Error::Service(err) if is_timeout(err.as_ref()) => Error::Unreachable(format!(
                "no answer in time ({} s to connect, {} s for a request)",
                crate::store::CONNECT_TIMEOUT.as_secs(),
                crate::store::REQUEST_TIMEOUT.as_secs()
            )),
            kube::Error::Service(err) => Error::Unreachable(root_cause(err.as_ref())),
            other => Error::Api(other.to_string()),
        }
    }

    /// A fault that may pass by itself (no connection, no answer in time, a
    /// server restarting or overloaded): a waiting client retries it until
    /// its deadline.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unreachable(_))
    }

    /// A 403 from authorization (RBAC: "User ... cannot ..."), as opposed to
    /// one from the admission policy. Right after an API server starts, RBAC
    /// refuses everyone until its caches are filled, so a waiting client
    /// retries this for a short while; the policy's refusal is final.
    pub fn is_authorization_refusal(&self) -> bool {
        match self {
            Error::Forbidden(message) => {
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
