//! Environment bindings, the controller's part (the leader only, with
//! `--environment-bindings`): each `EnvironmentBinding` becomes the workload
//! gate's ValidatingAdmissionPolicyBinding the chart would render
//! ([`crate::envbinding::render_policy_binding`]), applied server-side,
//! owned by the EnvironmentBinding; `Ready` says whether it is in place.
//!
//! A policy binding of the same name that deploylock did not create (the
//! chart's, or one written by hand) is never overwritten: Ready=False and a
//! Warning Event say so. Deleting an EnvironmentBinding deletes its policy
//! binding through the owner reference (the garbage collector); where no
//! garbage collector runs (a control plane without kube-controller-manager)
//! the sweeper here deletes the controller's policy bindings whose owner is
//! gone.
//!
//! With `--namespace`, only the bindings of locks in that namespace are
//! handled.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::conditions::Observation;
use crate::envbinding::{
    EnvironmentBinding, EnvironmentBindingStatus, GATE_POLICY, LOCK_NAMESPACE_LABEL, MANAGED_BY,
    MANAGED_BY_LABEL, Ownership, READY_CONDITION, ownership, render_policy_binding, selector_text,
};

use super::plan::{EventText, short_id};
use super::{Error, LeaderContext, WATCH_TIMEOUT_SECONDS, post_event, timed};

/// The field manager of the policy bindings and the status.
const FIELD_MANAGER: &str = "deploylock-controller";
/// How often a missing EnvironmentBinding CRD is looked for again.
const CRD_RECHECK: Duration = Duration::from_secs(30);
/// How soon a refused binding (RBAC not yet granted, the policy or the
/// name not yet free) is tried again.
const RETRY_REFUSED: Duration = Duration::from_secs(30);
/// Events about cluster-scoped objects live in `default`.
const EVENT_NAMESPACE: &str = "default";

/// What the environment bindings' task needs.
pub struct EnvironmentBindings {
    /// Only the bindings of locks in the leader's namespace (all when
    /// `None`).
    pub leader: LeaderContext,
}

impl EnvironmentBindings {
    /// Runs until `term` turns true.
    pub async fn run(self, term: watch::Receiver<bool>) {
        let bindings: Api<EnvironmentBinding> = Api::all(self.leader.client.clone());
        // Without the CRD (or the right to read it), look again now and then.
        let mut stop = term.clone();
        loop {
            match timed(bindings.list(&ListParams::default().limit(1))).await {
                Ok(_) => break,
                Err(err) => tracing::debug!(
                    error = %err,
                    "EnvironmentBindings not readable; looking again in {CRD_RECHECK:?}"
                ),
            }
            tokio::select! {
                _ = tokio::time::sleep(CRD_RECHECK) => {}
                _ = stop.wait_for(|ended| *ended) => return,
            }
        }
        tracing::info!("keeping the workload gate's policy bindings of EnvironmentBindings");
        let shared = Arc::new(self);
        let sweeper = tokio::spawn(sweep(shared.clone(), term.clone()));
        let policy_bindings: Api<ValidatingAdmissionPolicyBinding> =
            Api::all(shared.leader.client.clone());
        let config = watcher::Config::default()
            .any_semantic()
            .timeout(WATCH_TIMEOUT_SECONDS);
        let controller = Controller::new(bindings, config.clone());
        let store = controller.store();
        let mut ended = term.clone();
        // Any policy binding of a name some EnvironmentBinding renders
        // (ours changed by hand, a foreign one deleted) wakes that binding.
        controller
            .watches(policy_bindings, config, move |policy_binding| {
                let name = policy_binding.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|binding| binding.spec.policy_binding_name() == name)
                    .map(|binding| ObjectRef::from_obj(binding.as_ref()))
                    .collect::<Vec<_>>()
            })
            // One reconcile at a time: two bindings of one environment
            // created together must not both find its policy binding
            // missing and apply it (the same field manager: the second
            // apply would silently take it over). Bindings are few.
            .with_config(controller::Config::default().concurrency(1))
            .graceful_shutdown_on(async move {
                let _ = ended.wait_for(|ended| *ended).await;
            })
            .run(reconcile, error_policy, shared)
            .for_each(|result| async move {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "environment binding reconcile");
                }
            })
            .await;
        sweeper.abort();
    }

    fn in_scope(&self, binding: &EnvironmentBinding) -> bool {
        self.leader
            .namespace
            .as_ref()
            .is_none_or(|namespace| *namespace == binding.spec.lock_namespace)
    }
}

fn error_policy(
    binding: Arc<EnvironmentBinding>,
    err: &Error,
    _: Arc<EnvironmentBindings>,
) -> Action {
    tracing::warn!(binding = %binding.name_any(), error = %err, "environment binding: retrying");
    Action::requeue(Duration::from_secs(2))
}

/// What became of a binding's policy binding.
struct Outcome {
    ready: bool,
    reason: &'static str,
    message: String,
    /// Warning (not ready) or Normal.
    announce: bool,
    then: Action,
}

async fn reconcile(
    binding: Arc<EnvironmentBinding>,
    context: Arc<EnvironmentBindings>,
) -> Result<Action, Error> {
    if !context.in_scope(&binding) || binding.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let desired = render_policy_binding(&binding).map_err(|_| Error::MissingObjectKey)?;
    let uid = binding.uid().unwrap_or_default();
    let name = binding.spec.policy_binding_name();
    let policy_bindings: Api<ValidatingAdmissionPolicyBinding> =
        Api::all(context.leader.client.clone());
    let existing = timed(policy_bindings.get_opt(&name)).await?;
    let taken = match existing.as_ref().map(|existing| ownership(existing, &uid)) {
        None | Some(Ownership::Ours) => None,
        Some(Ownership::Foreign) => existing.as_ref().map(|existing| {
            format!(
                "a ValidatingAdmissionPolicyBinding named {name} exists that deploylock did not create ({}): it is left alone; delete it (or the chart's workloadGate.environments entry for {}) to let this EnvironmentBinding bind the environment",
                written_by(existing),
                binding.spec.environment
            )
        }),
        Some(Ownership::OtherBinding {
            name: other,
            uid: other_uid,
        }) => owner_alive(&context.leader.client, &other, &other_uid)
            .await?
            .then(|| {
                format!(
                    "environment {} (lock namespace {}) is already bound by EnvironmentBinding {other}: one binding per environment",
                    binding.spec.environment, binding.spec.lock_namespace
                )
            }),
    };
    let outcome = match taken {
        Some(message) => Outcome {
            ready: false,
            reason: "NameTaken",
            message,
            announce: true,
            then: Action::requeue(RETRY_REFUSED),
        },
        None if !policy_installed(&context.leader.client).await? => Outcome {
            ready: false,
            reason: "PolicyMissing",
            message: format!(
                "the workload gate's ValidatingAdmissionPolicy {GATE_POLICY} is not installed (config/admission/workload-gate.yaml, or the chart's workloadGate.enabled): nothing would be gated"
            ),
            announce: true,
            then: Action::requeue(RETRY_REFUSED),
        },
        None => apply(&policy_bindings, desired, existing.as_ref(), &binding).await?,
    };
    record(&context, &binding, &outcome).await?;
    Ok(outcome.then)
}

/// Applies the rendered policy binding; an answer the API server will give
/// again (forbidden, invalid) is an outcome, not an error to retry at once.
async fn apply(
    policy_bindings: &Api<ValidatingAdmissionPolicyBinding>,
    mut desired: ValidatingAdmissionPolicyBinding,
    existing: Option<&ValidatingAdmissionPolicyBinding>,
    binding: &EnvironmentBinding,
) -> Result<Outcome, Error> {
    let name = binding.spec.policy_binding_name();
    // Forced (undoing edits by hand) only over the version just read as
    // ours. A create is not forced, so a binding written in between by
    // another field manager conflicts; two of our own bindings of one
    // environment never race here (reconciles run one at a time).
    desired.metadata.resource_version = existing.and_then(|existing| existing.resource_version());
    let params = PatchParams::apply(FIELD_MANAGER);
    let params = if existing.is_some() {
        params.force()
    } else {
        params
    };
    let applied = timed(policy_bindings.patch(&name, &params, &Patch::Apply(&desired))).await;
    match applied {
        Ok(_) => Ok(Outcome {
            ready: true,
            reason: "Bound",
            message: format!(
                "ValidatingAdmissionPolicyBinding {name} gates {} while DeploymentLock {}/{} is held",
                binding.spec.describe(),
                binding.spec.lock_namespace,
                binding.spec.environment
            ),
            announce: false,
            then: Action::await_change(),
        }),
        Err(Error::Kube(kube::Error::Api(status))) if matches!(status.code, 403 | 422) => {
            // Either may change without the binding changing (RBAC
            // granted, the policy installed): looked at again.
            let reason = if status.code == 403 {
                "Forbidden"
            } else {
                "Invalid"
            };
            let then = Action::requeue(RETRY_REFUSED);
            Ok(Outcome {
                ready: false,
                reason,
                message: format!(
                    "cannot apply ValidatingAdmissionPolicyBinding {name}: {}",
                    status.message
                ),
                announce: true,
                then,
            })
        }
        Err(err) => Err(err),
    }
}

/// Whether the workload gate's policy is installed: without it the API
/// server refuses a binding with a parameter (it cannot tell what reading
/// the parameter needs). Unknown (no right to read it) counts as installed.
async fn policy_installed(client: &Client) -> Result<bool, Error> {
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    match timed(policies.get_opt(GATE_POLICY)).await {
        Ok(found) => Ok(found.is_some()),
        Err(Error::Kube(kube::Error::Api(status))) if status.code == 403 => Ok(true),
        Err(err) => Err(err),
    }
}

/// Who wrote a policy binding deploylock did not create, for the message.
fn written_by(existing: &ValidatingAdmissionPolicyBinding) -> String {
    if let Some(manager) = existing.labels().get(MANAGED_BY_LABEL) {
        return format!("managed by {manager}");
    }
    let managers: Vec<&str> = existing
        .managed_fields()
        .iter()
        .filter_map(|entry| entry.manager.as_deref())
        .collect();
    match managers.as_slice() {
        [] => "no owner reference to an EnvironmentBinding".to_string(),
        managers => format!("written by {}", managers.join(", ")),
    }
}

/// Whether the EnvironmentBinding `name` with `uid` still exists.
async fn owner_alive(client: &Client, name: &str, uid: &str) -> Result<bool, Error> {
    let bindings: Api<EnvironmentBinding> = Api::all(client.clone());
    let found = timed(bindings.get_opt(name)).await?;
    Ok(found.is_some_and(|binding| binding.uid().as_deref() == Some(uid)))
}

/// Writes the status (when it changes) and, for a refusal, a Warning Event
/// once per generation.
async fn record(
    context: &EnvironmentBindings,
    binding: &EnvironmentBinding,
    outcome: &Outcome,
) -> Result<(), Error> {
    let now = context.leader.clock.lower_bound(Instant::now());
    let old = binding.status.clone().unwrap_or_default();
    let new = status_after(&old, binding, outcome, now);
    if new != old {
        let bindings: Api<EnvironmentBinding> = Api::all(context.leader.client.clone());
        let patch = serde_json::json!({ "status": new });
        timed(bindings.patch_status(
            &binding.name_any(),
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.to_string()),
                ..Default::default()
            },
            &Patch::Merge(&patch),
        ))
        .await?;
    }
    if outcome.announce {
        let uid = binding.uid().unwrap_or_default();
        let generation = binding.metadata.generation.unwrap_or_default();
        let text = EventText {
            suffix: String::new(),
            reason: outcome.reason,
            event_type: "Warning",
            note: outcome.message.clone(),
        };
        let name = format!(
            "{}.{}.{}.{generation}",
            binding.name_any(),
            short_id(&uid),
            outcome.reason.to_ascii_lowercase()
        );
        let name: String = name.chars().take(253).collect();
        let reporter = context.leader.reporter();
        let reference = binding.object_ref(&());
        if let Err(err) = post_event(reporter, EVENT_NAMESPACE, name, reference, &text).await {
            tracing::warn!(error = %err, "cannot record the environment binding's Event");
        }
        tracing::warn!(binding = %binding.name_any(), reason = outcome.reason, message = %outcome.message, "environment binding not in force");
    }
    Ok(())
}

/// The status saying `outcome` for the binding's generation.
fn status_after(
    old: &EnvironmentBindingStatus,
    binding: &EnvironmentBinding,
    outcome: &Outcome,
    now: DateTime<Utc>,
) -> EnvironmentBindingStatus {
    let generation = binding.metadata.generation;
    let mut status = old.clone();
    status.observed_generation = generation;
    status.policy_binding = Some(binding.spec.policy_binding_name());
    status.selector = Some(selector_text(&binding.spec.effective_selector()));
    let observation = Observation {
        type_: READY_CONDITION,
        status: outcome.ready,
        reason: outcome.reason,
        message: &outcome.message,
    };
    observation.record_if_changed(&mut status.conditions, generation, now);
    status
}

/// Deletes the controller's policy bindings whose EnvironmentBinding is
/// gone (the garbage collector's job, where none runs). Every change of
/// either kind looks again; a missing owner is confirmed by a read before
/// the delete, which is conditional on the policy binding's version.
async fn sweep(context: Arc<EnvironmentBindings>, term: watch::Receiver<bool>) {
    let mut selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY}");
    if let Some(namespace) = &context.leader.namespace {
        selector.push_str(&format!(",{LOCK_NAMESPACE_LABEL}={namespace}"));
    }
    let config = watcher::Config::default().timeout(WATCH_TIMEOUT_SECONDS);
    let (policy_store, policy_writer) = reflector::store();
    let (binding_store, binding_writer) = reflector::store();
    let policy_bindings: Api<ValidatingAdmissionPolicyBinding> =
        Api::all(context.leader.client.clone());
    let bindings: Api<EnvironmentBinding> = Api::all(context.leader.client.clone());
    let policy_events = watcher(policy_bindings.clone(), config.clone().labels(&selector))
        .default_backoff()
        .reflect(policy_writer)
        .map(|_| ());
    let binding_events = watcher(bindings, config)
        .default_backoff()
        .reflect(binding_writer)
        .map(|_| ());
    let mut changes = std::pin::pin!(futures::stream::select(policy_events, binding_events));
    let mut stop = term;
    loop {
        tokio::select! {
            change = changes.next() => if change.is_none() { return },
            _ = stop.wait_for(|ended| *ended) => return,
        }
        let ready = policy_store.wait_until_ready().now_or_never().is_some()
            && binding_store.wait_until_ready().now_or_never().is_some();
        if !ready {
            continue;
        }
        let known: HashSet<String> = binding_store
            .state()
            .iter()
            .filter_map(|binding| binding.uid())
            .collect();
        for policy_binding in policy_store.state() {
            let kind = EnvironmentBinding::kind(&());
            let Some(owner) = policy_binding
                .owner_references()
                .iter()
                .find(|owner| owner.kind == kind)
            else {
                continue;
            };
            if known.contains(&owner.uid) {
                continue;
            }
            match owner_alive(&context.leader.client, &owner.name, &owner.uid).await {
                Ok(false) => delete_orphan(&policy_bindings, &policy_binding, &owner.name).await,
                Ok(true) => {}
                Err(err) => tracing::debug!(error = %err, "cannot read an EnvironmentBinding"),
            }
        }
    }
}

async fn delete_orphan(
    policy_bindings: &Api<ValidatingAdmissionPolicyBinding>,
    orphan: &ValidatingAdmissionPolicyBinding,
    owner: &str,
) {
    let name = orphan.name_any();
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: orphan.uid(),
            resource_version: orphan.resource_version(),
        }),
        ..Default::default()
    };
    match timed(policy_bindings.delete(&name, &params)).await {
        Ok(_) => tracing::info!(
            policy_binding = %name,
            environment_binding = owner,
            "deleted the policy binding of a deleted EnvironmentBinding"
        ),
        Err(Error::Kube(kube::Error::Api(status))) if matches!(status.code, 404 | 409) => {}
        Err(err) => {
            tracing::warn!(policy_binding = %name, error = %err, "cannot delete an orphaned policy binding")
        }
    }
}
