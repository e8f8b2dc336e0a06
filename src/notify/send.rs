//! The HTTP side: a receiver built from a subscription's Secrets, and one
//! delivery attempt with bounded time.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;

use super::payload::{self, Message, Style};
use super::{Provider, ProviderType};

/// Longest a connection may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a whole request may take (a stalled receiver is given up then).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Secret keys, as Flux's notification-controller names them.
pub const ADDRESS_KEY: &str = "address";
pub const TOKEN_KEY: &str = "token";
pub const PROXY_KEY: &str = "proxy";
pub const CA_KEYS: [&str; 2] = ["ca.crt", "caFile"];

/// Why a subscription cannot deliver: said in its Ready condition.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Secret {0:?} not found")]
    SecretNotFound(String),
    #[error("cannot read Secret {name:?}: {source}")]
    SecretUnreadable {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {secret:?} has no {key:?} key")]
    MissingKey { secret: String, key: &'static str },
    #[error("Secret {secret:?} key {key:?} is not UTF-8 text")]
    NotText { secret: String, key: &'static str },
    #[error("Secret {secret:?} key {ADDRESS_KEY:?} is not an http(s) URL: {reason}")]
    InvalidAddress { secret: String, reason: String },
    #[error("Secret {secret:?} key {PROXY_KEY:?} is not a proxy URL: {source}")]
    InvalidProxy {
        secret: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Secret {secret:?} has no usable PEM certificate in ca.crt: {reason}")]
    InvalidCa { secret: String, reason: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error(transparent)]
    InvalidLockSelector(#[from] super::InvalidLockSelector),
}

impl ConfigError {
    /// CamelCase reason for the Ready condition.
    pub fn reason(&self) -> &'static str {
        match self {
            ConfigError::SecretNotFound(_) => "SecretNotFound",
            ConfigError::SecretUnreadable { .. } => "SecretUnreadable",
            ConfigError::MissingKey { .. } | ConfigError::NotText { .. } => "SecretMalformed",
            ConfigError::InvalidAddress { .. } => "InvalidAddress",
            ConfigError::InvalidProxy { .. } => "InvalidProxy",
            ConfigError::InvalidCa { .. } => "InvalidCA",
            ConfigError::Client(_) => "ClientError",
            ConfigError::InvalidLockSelector(_) => "InvalidLockSelector",
        }
    }
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{}", chain(.0))]
    Transport(#[source] reqwest::Error),
    #[error("the receiver answered {status}: {body}")]
    Status { status: u16, body: String },
}

impl SendError {
    /// A 4xx other than 408 and 429 will not get better by retrying.
    pub fn is_permanent(&self) -> bool {
        matches!(self, SendError::Status { status, .. }
            if (400..500).contains(status) && *status != 408 && *status != 429)
    }

    /// Label for the metric.
    pub fn label(&self) -> String {
        match self {
            SendError::Transport(err) if err.is_timeout() => "timeout".into(),
            SendError::Transport(err) if err.is_connect() => "connect".into(),
            SendError::Transport(_) => "transport".into(),
            SendError::Status { status, .. } => format!("http_{status}"),
        }
    }
}

/// An error with its causes ("error sending request: ... : invalid peer
/// certificate: UnknownIssuer"): reqwest's own message omits them.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A receiver ready to take messages.
#[derive(Clone, Debug)]
pub struct Receiver {
    pub provider: ProviderType,
    pub address: reqwest::Url,
    token: Option<String>,
    pub style: Style,
    client: reqwest::Client,
}

fn text(secret: &Secret, name: &str, key: &'static str) -> Result<Option<String>, ConfigError> {
    let Some(bytes) = secret.data.as_ref().and_then(|data| data.get(key)) else {
        return Ok(None);
    };
    String::from_utf8(bytes.0.clone())
        .map(|value| Some(value.trim().to_string()))
        .map_err(|_| ConfigError::NotText {
            secret: name.to_string(),
            key,
        })
}

/// The receiver's address from the Secret `name`: an http or https URL
/// with a host.
fn address(secret: &Secret, name: &str) -> Result<reqwest::Url, ConfigError> {
    let address = text(secret, name, ADDRESS_KEY)?.ok_or_else(|| ConfigError::MissingKey {
        secret: name.to_string(),
        key: ADDRESS_KEY,
    })?;
    reqwest::Url::parse(&address)
        .map_err(|err| err.to_string())
        .and_then(|url| {
            if matches!(url.scheme(), "http" | "https") && url.host().is_some() {
                Ok(url)
            } else {
                Err("the scheme must be http or https, with a host".to_string())
            }
        })
        .map_err(|reason| ConfigError::InvalidAddress {
            secret: name.to_string(),
            reason,
        })
}

/// The CA certificates of the CA Secret `name` (at least one).
fn certificates(name: &str, ca: &Secret) -> Result<Vec<reqwest::Certificate>, ConfigError> {
    let pem = CA_KEYS
        .iter()
        .find_map(|key| ca.data.as_ref().and_then(|data| data.get(*key)))
        .ok_or_else(|| ConfigError::MissingKey {
            secret: name.to_string(),
            key: "ca.crt",
        })?;
    let certificates =
        reqwest::Certificate::from_pem_bundle(&pem.0).map_err(|err| ConfigError::InvalidCa {
            secret: name.to_string(),
            reason: err.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(ConfigError::InvalidCa {
            secret: name.to_string(),
            reason: "no certificate found".into(),
        });
    }
    Ok(certificates)
}

impl Receiver {
    /// The receiver `provider` describes, from its Secret and its CA Secret.
    pub fn from_secrets(
        provider: &Provider,
        secret: &Secret,
        ca: Option<&Secret>,
    ) -> Result<Self, ConfigError> {
        let name = &provider.secret_ref.name;
        let address = address(secret, name)?;
        let token = text(secret, name, TOKEN_KEY)?.filter(|token| !token.is_empty());
        if provider.provider_type == ProviderType::GenericHmac && token.is_none() {
            return Err(ConfigError::MissingKey {
                secret: name.clone(),
                key: TOKEN_KEY,
            });
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            // A webhook that redirects could send the body (and a token)
            // elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("deploylock/", env!("CARGO_PKG_VERSION")));
        builder = match text(secret, name, PROXY_KEY)?.filter(|proxy| !proxy.is_empty()) {
            Some(proxy) => builder.proxy(reqwest::Proxy::all(&proxy).map_err(|source| {
                ConfigError::InvalidProxy {
                    secret: name.clone(),
                    source,
                }
            })?),
            // Only the proxy the Secret names: none from the environment.
            None => builder.no_proxy(),
        };
        if let (Some(reference), Some(ca)) = (&provider.ca_secret_ref, ca) {
            for certificate in certificates(&reference.name, ca)? {
                builder = builder.add_root_certificate(certificate);
            }
        }
        Ok(Receiver {
            provider: provider.provider_type,
            address,
            token,
            style: Style {
                channel: provider.channel.clone(),
                username: provider.username.clone(),
            },
            client: builder.build().map_err(ConfigError::Client)?,
        })
    }

    /// Sends `message` once; `Ok` with the receiver's status on a 2xx.
    pub async fn send(&self, message: &Message) -> Result<u16, SendError> {
        let rendered = payload::render(self.provider, message, &self.style);
        let mut request = self
            .client
            .post(self.address.clone())
            .header(reqwest::header::CONTENT_TYPE, rendered.content_type);
        for (name, value) in &rendered.headers {
            request = request.header(*name, value);
        }
        match (self.provider, &self.token) {
            (ProviderType::GenericHmac, Some(token)) => {
                request = request.header(
                    super::SIGNATURE_HEADER,
                    payload::sign(&rendered.body, token.as_bytes()),
                );
            }
            (ProviderType::Generic | ProviderType::Cloudevents, Some(token)) => {
                request = request.bearer_auth(token);
            }
            _ => {}
        }
        let response = request
            .body(rendered.body)
            .send()
            .await
            .map_err(SendError::Transport)?;
        let status = response.status();
        if status.is_success() {
            return Ok(status.as_u16());
        }
        let body = response.text().await.unwrap_or_default();
        Err(SendError::Status {
            status: status.as_u16(),
            body: body.chars().take(300).collect(),
        })
    }
}
