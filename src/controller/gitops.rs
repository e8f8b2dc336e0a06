//! GitOps gating, the controller's part (run by the leader only, with
//! `--gitops-gating`): Flux Kustomizations and HelmReleases and Argo CD
//! Applications bound to an environment are gated while its lock is held
//! and restored after, by the pure decision of [`crate::gitops`].
//!
//! One kube-runtime controller per kind, over untyped objects, woken by the
//! object's own changes and by any change of a DeploymentLock (mapped to the
//! objects bound to it, or gated by it). Each reconcile reads the lock afresh
//! and writes one JSON merge patch carrying the object's resourceVersion: a
//! person's concurrent edit makes it fail with a conflict, and the object is
//! read again and decided again, never overwritten. A kind whose CRD is not
//! installed is looked for again every [`DISCOVERY_PERIOD`].
//!
//! Events (events.k8s.io) go to the GitOps object and to the lock, with names
//! derived from the object, the action and the holding, so that a restarted
//! controller or a new leader never records one twice. An Event is written
//! after its patch: a controller killed in between leaves that one Event out.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio::sync::watch;

use crate::crd::DeploymentLock;
use crate::gitops::{self, Change, GitOpsKind, SavedState};

use super::plan::EventText;
use super::{LeaderContext, Reporter, post_event};

/// How often a kind whose CRD is not installed is looked for again.
pub const DISCOVERY_PERIOD: Duration = Duration::from_secs(30);
/// Time limit of each request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Watches end after this long and are renewed (a dead connection is
/// noticed within the client's read timeout).
const WATCH_TIMEOUT_SECONDS: u32 = 20;
/// The field manager of the controller's patches.
pub const FIELD_MANAGER: &str = "deploylock-controller";

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[source] kube::Error),
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    #[error("cannot serialize the object: {0}")]
    Serialize(#[source] serde_json::Error),
    #[error("object has no name")]
    MissingName,
}

async fn timed<T>(request: impl Future<Output = Result<T, kube::Error>>) -> Result<T, Error> {
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .map_err(|_| Error::Timeout(REQUEST_TIMEOUT))?
        .map_err(Error::Kube)
}

fn is_conflict(err: &Error) -> bool {
    matches!(err, Error::Kube(kube::Error::Api(status)) if status.code == 409)
}

/// The GitOps gating task.
#[derive(Clone)]
pub struct GitOpsGating {
    /// Only objects bound to locks of the leader's namespace (all when
    /// `None`).
    pub leader: LeaderContext,
}

impl GitOpsGating {
    /// Gates every kind until `stop` turns true (the end of a leadership
    /// term); in-flight reconciles finish first.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        tracing::info!(scope = ?self.leader.namespace, "GitOps gating on");
        let tasks = GitOpsKind::ALL
            .into_iter()
            .map(|kind| self.clone().run_kind(kind, stop.clone()));
        futures::future::join_all(tasks).await;
    }

    fn resource(kind: GitOpsKind) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(kind.group(), kind.version(), kind.kind()),
            kind.plural(),
        )
    }

    /// Whether the API server serves the kind (its CRD is installed).
    async fn installed(&self, kind: GitOpsKind) -> Result<bool, Error> {
        let group_version = format!("{}/{}", kind.group(), kind.version());
        match timed(self.leader.client.list_api_group_resources(&group_version)).await {
            Ok(list) => Ok(list
                .resources
                .iter()
                .any(|resource| resource.name == kind.plural())),
            Err(Error::Kube(kube::Error::Api(status))) if status.code == 404 => Ok(false),
            Err(err) => Err(err),
        }
    }

    async fn run_kind(self, kind: GitOpsKind, mut stop: watch::Receiver<bool>) {
        let mut reported = false;
        loop {
            match self.installed(kind).await {
                Ok(true) => break,
                Ok(false) if !reported => {
                    tracing::info!(%kind, group = kind.group(), version = kind.version(), "CRD not installed: not gating this kind; looking again every {DISCOVERY_PERIOD:?}");
                    reported = true;
                }
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(%kind, error = %err, "cannot tell whether the CRD is installed")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(DISCOVERY_PERIOD) => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
        }
        tracing::info!(%kind, "gating {}s bound to environments", kind.kind());
        let resource = Self::resource(kind);
        let objects: Api<DynamicObject> = Api::all_with(self.leader.client.clone(), &resource);
        let lock_resource = ApiResource::erase::<DeploymentLock>(&());
        let locks =
            super::lock_objects_api(self.leader.client.clone(), self.leader.namespace.as_deref());
        let config = watcher::Config::default()
            .any_semantic()
            .timeout(WATCH_TIMEOUT_SECONDS);
        let controller = Controller::new_with(objects, config.clone(), resource.clone());
        let store = controller.store();
        let mapped = resource.clone();
        let context = Arc::new(KindContext {
            gating: self,
            kind,
            resource,
        });
        let stopped = async move {
            let _ = stop.wait_for(|stopped| *stopped).await;
        };
        controller
            .watches_with(locks, lock_resource, config, move |lock: DynamicObject| {
                let namespace = lock.namespace().unwrap_or_default();
                let name = lock.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|object| concerns(object, &namespace, &name))
                    .map(|object| ObjectRef::from_obj_with(object.as_ref(), mapped.clone()))
                    .collect::<Vec<_>>()
            })
            .graceful_shutdown_on(stopped)
            .run(reconcile, error_policy, context)
            .for_each(|result| async move {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "GitOps reconcile failed");
                }
            })
            .await;
        tracing::info!(%kind, "GitOps gating stopped");
    }
}

/// Whether `object` is bound to the lock `namespace/name`, or was gated by it.
fn concerns(object: &DynamicObject, namespace: &str, name: &str) -> bool {
    let Ok(value) = serde_json::to_value(object) else {
        return false;
    };
    let bound = gitops::binding_of(&value)
        .is_some_and(|binding| binding.lock_namespace == namespace && binding.environment == name);
    bound
        || matches!(gitops::saved_of(&value), SavedState::Readable(saved)
            if saved.lock_namespace == namespace && saved.environment == name)
}

struct KindContext {
    gating: GitOpsGating,
    kind: GitOpsKind,
    resource: ApiResource,
}

impl KindContext {
    fn reporter(&self) -> Reporter<'_> {
        self.gating.leader.reporter()
    }

    fn in_scope(&self, lock_namespace: &str) -> bool {
        self.gating
            .leader
            .namespace
            .as_deref()
            .is_none_or(|scope| scope == lock_namespace)
    }

    fn objects(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.gating.leader.client.clone(), namespace, &self.resource)
    }

    fn locks(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.gating.leader.client.clone(),
            namespace,
            &ApiResource::erase::<DeploymentLock>(&()),
        )
    }
}

fn error_policy(object: Arc<DynamicObject>, err: &Error, context: Arc<KindContext>) -> Action {
    let delay = if is_conflict(err) {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(2)
    };
    tracing::warn!(kind = %context.kind, namespace = object.namespace().unwrap_or_default(), name = %object.name_any(), error = %err, "GitOps gating failed; retrying");
    Action::requeue(super::leader::jitter(delay))
}

/// One reconcile of one GitOps object: decide on the object and its lock as
/// they are, write the change under the object's resourceVersion; on a
/// conflict read the object again and decide again (once, then back off).
async fn reconcile(object: Arc<DynamicObject>, context: Arc<KindContext>) -> Result<Action, Error> {
    let namespace = object.namespace().unwrap_or_default();
    let name = object.meta().name.clone().ok_or(Error::MissingName)?;
    let api = context.objects(&namespace);
    let mut current = (*object).clone();
    let mut attempt = 0;
    loop {
        attempt += 1;
        // managedFields are the bulk of the object and never read here.
        current.managed_fields_mut().clear();
        let value = serde_json::to_value(&current).map_err(Error::Serialize)?;
        let binding = gitops::binding_of(&value);
        let relevant = match (&binding, gitops::saved_of(&value)) {
            (Some(binding), _) => context.in_scope(&binding.lock_namespace),
            (None, SavedState::Readable(saved)) => context.in_scope(&saved.lock_namespace),
            // Nothing bound and nothing saved: not ours.
            (None, SavedState::Absent) => false,
            // No telling which lock it was: only an unscoped controller.
            (None, SavedState::Unreadable(_)) => context.gating.leader.namespace.is_none(),
        };
        if !relevant {
            return Ok(Action::await_change());
        }
        let lock = match &binding {
            Some(binding) => {
                timed(
                    context
                        .locks(&binding.lock_namespace)
                        .get_opt(&binding.environment),
                )
                .await?
            }
            None => None,
        };
        let lock_value = lock
            .as_ref()
            .map(serde_json::to_value)
            .transpose()
            .map_err(Error::Serialize)?;
        let Some(change) = gitops::decide(context.kind, &value, lock_value.as_ref()) else {
            return Ok(Action::await_change());
        };
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        match timed(api.patch(&name, &params, &Patch::Merge(&change.patch))).await {
            Ok(_) => {
                log_change(&context, &namespace, &name, &change);
                record(&context, &current, &change, lock.as_ref()).await;
                return Ok(Action::await_change());
            }
            Err(err) if is_conflict(&err) && attempt == 1 => {
                tracing::debug!(kind = %context.kind, namespace, name, "object changed meanwhile; deciding again");
                match timed(api.get_opt(&name)).await? {
                    Some(fresh) => current = fresh,
                    None => return Ok(Action::await_change()),
                }
            }
            Err(err) => return Err(err),
        }
    }
}

fn log_change(context: &KindContext, namespace: &str, name: &str, change: &Change) {
    tracing::info!(
        kind = %context.kind,
        namespace,
        name,
        action = change.action.reason(context.kind),
        lock = ?gitops::lock_of(change),
        "{}",
        change.note
    );
}

/// Records the change as Events on the object and on the lock. Failures are
/// logged: the patch is what matters, and it is done.
async fn record(
    context: &KindContext,
    object: &DynamicObject,
    change: &Change,
    bound_lock: Option<&DynamicObject>,
) {
    let kind = context.kind;
    let tag = event_tag(kind, object, change);
    let namespace = object.namespace().unwrap_or_default();
    let uid = object.meta().uid.clone().unwrap_or_default();
    let event_name = format!(
        "{}.{}.{tag}",
        truncate(&object.name_any(), 180),
        short_id(&uid)
    );
    let text = event_text(kind, change, change.note.clone());
    let object_ref = object.object_ref(&context.resource);
    if let Err(err) = post_event(
        context.reporter(),
        &namespace,
        event_name,
        object_ref,
        &text,
    )
    .await
    {
        tracing::warn!(%kind, namespace, name = %object.name_any(), error = %err, "cannot record the Event on the object");
    }

    // The lock's Event: the lock that gates (or gated) the object.
    let Some((lock_namespace, environment)) = gitops::lock_of(change) else {
        return;
    };
    let Some(lock) = gating_lock(context, bound_lock, lock_namespace, environment).await else {
        return;
    };
    let lock_uid = lock.meta().uid.clone().unwrap_or_default();
    let lock_ref = lock.object_ref(&ApiResource::erase::<DeploymentLock>(&()));
    let event_name = format!(
        "{environment}.{}.{}-{}-{tag}",
        short_id(&lock_uid),
        kind.plural(),
        short_id(&uid)
    );
    let note = format!("{kind} {namespace}/{}: {}", object.name_any(), change.note);
    let text = event_text(kind, change, note);
    if let Err(err) = post_event(
        context.reporter(),
        lock_namespace,
        event_name,
        lock_ref,
        &text,
    )
    .await
    {
        tracing::warn!(%kind, lock_namespace, environment, error = %err, "cannot record the Event on the lock");
    }
}

/// What makes a change's Event names unique: the action and the holding,
/// and for a regate or an abandon (which may recur under one holding) the
/// object's resourceVersion.
fn event_tag(kind: GitOpsKind, object: &DynamicObject, change: &Change) -> String {
    let holding = change
        .saved
        .as_ref()
        .map(|saved| short_id(&saved.lock_id))
        .unwrap_or_default();
    let mut tag = format!("{}-{holding}", change.action.reason(kind).to_lowercase());
    if matches!(
        change.action,
        gitops::Action::Regated | gitops::Action::Abandoned
    ) {
        tag.push('-');
        tag.push_str(&short_id(&object.resource_version().unwrap_or_default()));
    }
    tag
}

fn event_text(kind: GitOpsKind, change: &Change, note: String) -> EventText {
    EventText {
        // The name is built by `record`.
        suffix: String::new(),
        reason: change.action.reason(kind),
        event_type: change.action.event_type(),
        note,
    }
}

/// The lock `lock_namespace/environment` as stored: the bound lock already
/// read when it is that one, else read now (`None` when gone or unreadable).
async fn gating_lock(
    context: &KindContext,
    bound_lock: Option<&DynamicObject>,
    lock_namespace: &str,
    environment: &str,
) -> Option<DynamicObject> {
    match bound_lock {
        Some(lock)
            if lock.namespace().as_deref() == Some(lock_namespace)
                && lock.name_any() == environment =>
        {
            Some(lock.clone())
        }
        _ => timed(context.locks(lock_namespace).get_opt(environment))
            .await
            .ok()
            .flatten(),
    }
}

fn short_id(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect::<String>()
        .to_lowercase()
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}
