//! `deploylock notify ...` and the subscriptions line of `status -v`: kept
//! here so the CLI module only dispatches.

use crate::environment::Environment;
use chrono::Utc;
use kube::api::Api;
use kube::{Client, ResourceExt};

use super::NotificationSubscription;
use super::payload::{Message, Occurrence};
use crate::crd::{DeploymentLock, LockState};

/// Team notifications (NotificationSubscriptions).
#[derive(clap::Subcommand, Debug)]
pub enum NotifyAction {
    /// Send a test message through a subscription and show the receiver's
    /// answer (the lock's current holder, if any, is in it).
    Test {
        /// Name of the NotificationSubscription.
        name: String,
    },
}

/// Why `notify test` did not deliver: printed, exit 1.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    #[error("NotificationSubscription {0:?} not found in namespace {1:?}")]
    NotFound(String, String),
    #[error("cannot read NotificationSubscription {name:?}: {source}")]
    Api {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("subscription {0:?} is not usable: {1}")]
    Config(String, #[source] super::send::ConfigError),
    #[error("{provider} receiver did not take the test message: {source}")]
    Send {
        provider: &'static str,
        #[source]
        source: super::send::SendError,
    },
}

/// Sends a test message for `environment` through subscription `name`;
/// the line to print on success.
pub async fn test(
    client: &Client,
    namespace: &str,
    environment: &Environment,
    name: &str,
) -> Result<String, TestError> {
    let subscriptions: Api<NotificationSubscription> = Api::namespaced(client.clone(), namespace);
    let sub = match subscriptions.get_opt(name).await {
        Ok(Some(sub)) => sub,
        Ok(None) => return Err(TestError::NotFound(name.into(), namespace.into())),
        Err(source) => {
            return Err(TestError::Api {
                name: name.into(),
                source,
            });
        }
    };
    let receiver = crate::controller::notify::load_receiver(client, &sub)
        .await
        .map_err(|err| TestError::Config(name.into(), err))?;
    let locks: Api<DeploymentLock> = Api::namespaced(client.clone(), namespace);
    let lock = locks.get_opt(environment.as_str()).await.ok().flatten();
    let holder = lock.as_ref().and_then(|lock| lock.spec.holder.as_ref());
    let message = Message {
        key: format!("test-{}", uuid::Uuid::new_v4()),
        occurrence: Occurrence::Test,
        namespace: namespace.to_string(),
        environment: environment.to_string(),
        lock_uid: lock.as_ref().and_then(|l| l.uid()).unwrap_or_default(),
        sequence: None,
        at: Utc::now(),
        state: lock
            .as_ref()
            .and_then(|l| l.status.as_ref())
            .and_then(|s| s.state)
            .unwrap_or(LockState::Available),
        lock_id: holder.map(|h| h.lock_id.clone()),
        by: None,
        owner: holder.map(|h| h.owner.clone()),
        reason: Some("test message from `deploylock notify test`".into()),
        lock_type: holder.map(|h| h.lock_type),
        acquired_at: holder.map(|h| h.acquired_at),
        expires_at: holder.map(|h| h.expires_at),
        deployment_id: holder.and_then(|h| h.deployment_id.clone()),
        overridden: None,
        waiter_id: None,
        waiting_for: None,
    };
    let provider = receiver.provider.as_str();
    let status = receiver
        .send(&message)
        .await
        .map_err(|source| TestError::Send { provider, source })?;
    Ok(format!(
        "test message sent through {name} ({provider}): the receiver answered {status} (key {})",
        message.key
    ))
}

/// What `status -v` says about the subscriptions in `namespace` that cover
/// `environment`: their names and providers, "none", or why it cannot tell.
pub async fn covering(
    client: &Client,
    namespace: &str,
    environment: &Environment,
    lock: Option<&DeploymentLock>,
) -> String {
    let subscriptions: Api<NotificationSubscription> = Api::namespaced(client.clone(), namespace);
    match subscriptions.list(&Default::default()).await {
        Ok(list) => {
            let names: Vec<String> = list
                .items
                .iter()
                .filter(|sub| match (lock, sub.spec.coverage()) {
                    (Some(lock), Ok(coverage)) => coverage.covers(lock),
                    // No lock object yet: it has no labels.
                    (None, Ok(coverage)) => {
                        coverage.covers_labelled(environment.as_str(), &Default::default())
                    }
                    (_, Err(_)) => false,
                })
                .map(|sub| {
                    format!(
                        "{} ({})",
                        sub.name_any(),
                        sub.spec.provider.provider_type.as_str()
                    )
                })
                .collect();
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        }
        // The CRD is not installed: nothing can subscribe.
        Err(kube::Error::Api(status)) if status.code == 404 => "none".into(),
        Err(err) => format!("unknown (cannot list NotificationSubscriptions: {err})"),
    }
}
