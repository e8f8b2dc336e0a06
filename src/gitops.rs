//! GitOps gating, the pure part: while an environment's lock is held by
//! anyone but the GitOps tool's own deploy step, the Flux Kustomizations and
//! HelmReleases bound to it are suspended (`spec.suspend: true`) and the Argo
//! CD Applications bound to it stop auto-syncing (`spec.syncPolicy.automated`
//! removed); once the lock is released, expires or disappears, the field comes
//! back exactly as it was.
//!
//! A GitOps object opts in with the label [`ENVIRONMENT_LABEL`]; the lock
//! lives in the object's namespace unless [`LOCK_NAMESPACE_ANNOTATION`] names
//! another, and holdings by the users listed in [`DEPLOYER_ANNOTATION`] (the
//! tool's own hook) do not gate it.
//!
//! [`decide`] looks only at the object and its lock as they are now, never at
//! what happened before: the original value lives in the object's own
//! [`SAVED_ANNOTATION`], written in the same patch that gates it. So a
//! restarted controller or a new leader takes up where the last one stopped,
//! and restores exactly once (every patch carries the resourceVersion it was
//! decided from: a second writer gets a conflict and decides again).
//!
//! A person's edit of the gated field while the lock is held is taken as what
//! they want once the lock is gone: it is saved in place of the original and
//! the field is gated again. An edit the controller did not see before the
//! release (it was down) is kept as it is.

pub mod cli;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Label binding a GitOps object to an environment (the lock's name).
pub const ENVIRONMENT_LABEL: &str = "deploylock.dev/environment";
/// Namespace of the environment's DeploymentLock (default: the object's).
pub const LOCK_NAMESPACE_ANNOTATION: &str = "deploylock.dev/lock-namespace";
/// Comma-separated usernames whose holdings do not gate the object: the
/// GitOps tool's own deploy step (its hook Job's ServiceAccount, say).
pub const DEPLOYER_ANNOTATION: &str = "deploylock.dev/deployer";
/// The value the gated field had before, and the holding that gated it.
/// Written and removed by the controller only.
pub const SAVED_ANNOTATION: &str = "deploylock.dev/gitops-saved";

/// The GitOps kinds gated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GitOpsKind {
    /// Flux kustomize.toolkit.fluxcd.io/v1 Kustomization.
    Kustomization,
    /// Flux helm.toolkit.fluxcd.io/v2 HelmRelease.
    HelmRelease,
    /// Argo CD argoproj.io/v1alpha1 Application.
    Application,
}

impl GitOpsKind {
    pub const ALL: [GitOpsKind; 3] = [
        GitOpsKind::Kustomization,
        GitOpsKind::HelmRelease,
        GitOpsKind::Application,
    ];

    pub fn group(self) -> &'static str {
        match self {
            GitOpsKind::Kustomization => "kustomize.toolkit.fluxcd.io",
            GitOpsKind::HelmRelease => "helm.toolkit.fluxcd.io",
            GitOpsKind::Application => "argoproj.io",
        }
    }

    pub fn version(self) -> &'static str {
        match self {
            GitOpsKind::Kustomization => "v1",
            GitOpsKind::HelmRelease => "v2",
            GitOpsKind::Application => "v1alpha1",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            GitOpsKind::Kustomization => "Kustomization",
            GitOpsKind::HelmRelease => "HelmRelease",
            GitOpsKind::Application => "Application",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            GitOpsKind::Kustomization => "kustomizations",
            GitOpsKind::HelmRelease => "helmreleases",
            GitOpsKind::Application => "applications",
        }
    }

    /// Path of the field gating changes.
    pub fn field(self) -> &'static [&'static str] {
        match self {
            GitOpsKind::Kustomization | GitOpsKind::HelmRelease => &["spec", "suspend"],
            GitOpsKind::Application => &["spec", "syncPolicy", "automated"],
        }
    }

    /// The field's path as people write it (`spec.suspend`).
    pub fn field_name(self) -> String {
        self.field().join(".")
    }

    /// Whether the field's value (None: absent) stops the tool from deploying.
    pub fn is_gated(self, value: Option<&Value>) -> bool {
        match self {
            GitOpsKind::Kustomization | GitOpsKind::HelmRelease => {
                value == Some(&Value::Bool(true))
            }
            GitOpsKind::Application => value.is_none(),
        }
    }

    /// The gated value in a merge patch (null removes the field).
    fn gated_value(self) -> Value {
        match self {
            GitOpsKind::Kustomization | GitOpsKind::HelmRelease => Value::Bool(true),
            GitOpsKind::Application => Value::Null,
        }
    }

    /// What gating does to it, for people.
    pub fn gated_verb(self) -> &'static str {
        match self {
            GitOpsKind::Kustomization | GitOpsKind::HelmRelease => "suspended",
            GitOpsKind::Application => "auto-sync disabled",
        }
    }
}

impl std::fmt::Display for GitOpsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

/// Where an object's lock is and who may deploy through it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub lock_namespace: String,
    pub environment: String,
    pub deployers: Vec<String>,
}

fn metadata_map<'a>(object: &'a Value, which: &str) -> Option<&'a Map<String, Value>> {
    object.get("metadata")?.get(which)?.as_object()
}

fn metadata_text<'a>(object: &'a Value, which: &str, key: &str) -> Option<&'a str> {
    metadata_map(object, which)?.get(key)?.as_str()
}

/// The object's binding, if it has the environment label.
pub fn binding_of(object: &Value) -> Option<Binding> {
    let environment = metadata_text(object, "labels", ENVIRONMENT_LABEL)?
        .trim()
        .to_string();
    if environment.is_empty() {
        return None;
    }
    let lock_namespace = metadata_text(object, "annotations", LOCK_NAMESPACE_ANNOTATION)
        .map(str::trim)
        .filter(|namespace| !namespace.is_empty())
        .or_else(|| {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
        })?
        .to_string();
    let deployers = metadata_text(object, "annotations", DEPLOYER_ANNOTATION)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|user| !user.is_empty())
        .map(String::from)
        .collect();
    Some(Binding {
        lock_namespace,
        environment,
        deployers,
    })
}

/// What [`SAVED_ANNOTATION`] holds.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Saved {
    /// The gated field (`spec.suspend`), for people reading the object.
    pub field: String,
    /// Its value before gating; absent when the field was absent.
    pub value: Option<Value>,
    /// The lock that gates the object.
    pub lock_namespace: String,
    pub environment: String,
    /// The holding that gates it.
    pub lock_id: String,
    pub holder: String,
}

/// The saved state: absent, readable, or not (edited by hand).
#[derive(Clone, Debug, PartialEq)]
pub enum SavedState {
    Absent,
    Readable(Saved),
    Unreadable(String),
}

pub fn saved_of(object: &Value) -> SavedState {
    match metadata_text(object, "annotations", SAVED_ANNOTATION) {
        None => SavedState::Absent,
        Some(text) => match serde_json::from_str(text) {
            Ok(saved) => SavedState::Readable(saved),
            Err(err) => SavedState::Unreadable(err.to_string()),
        },
    }
}

/// A holding in force, as far as the gating is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holding {
    pub lock_id: String,
    pub user: String,
    pub owner: String,
    pub reason: String,
    pub expires_at: String,
}

/// Whether a DeploymentLock (as the API server stores it) is held, by the
/// workload gate's rule (config/admission/workload-gate.yaml): a holder is
/// present and the controller's status, when it is current for this very
/// holding and generation, does not say Available or Expired.
pub fn holding_of(lock: &Value) -> Option<Holding> {
    let holder = lock.pointer("/spec/holder")?.as_object()?;
    let text = |key: &str| {
        holder
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let lock_id = text("lockId");
    let status = lock.get("status");
    let status_current = status.is_some_and(|status| {
        let observed = status.get("observedGeneration").and_then(Value::as_i64);
        status.get("lockId").and_then(Value::as_str) == Some(lock_id.as_str())
            && observed.is_some()
            && observed == lock.pointer("/metadata/generation").and_then(Value::as_i64)
            && status.get("state").is_some_and(Value::is_string)
    });
    let state = status
        .and_then(|status| status.get("state"))
        .and_then(Value::as_str);
    if status_current && matches!(state, Some("Available" | "Expired")) {
        return None;
    }
    Some(Holding {
        lock_id,
        user: text("user"),
        owner: text("owner"),
        reason: text("reason"),
        expires_at: text("expiresAt"),
    })
}

/// What a change does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The object is gated for a holding (the field may already have had
    /// the gated value: then only the original is saved).
    Gated,
    /// The field was changed while gated: the new value is saved for after
    /// the lock, and the field gated again.
    Regated,
    /// Still gated, now for another holding (handover, takeover, new lock).
    HandedOver,
    /// The lock is no longer held: the field is back as it was.
    Restored,
    /// The lock is no longer held, but the field had been changed meanwhile
    /// (while the controller did not run): that value is kept.
    KeptEdit,
    /// The saved state was unreadable and the lock is not held: the field is
    /// left as it is (gated, in doubt) and the annotation removed.
    Abandoned,
}

impl Action {
    /// The Event reason.
    pub fn reason(self, kind: GitOpsKind) -> &'static str {
        let flux = kind != GitOpsKind::Application;
        match self {
            Action::Gated if flux => "Suspended",
            Action::Gated => "AutoSyncDisabled",
            Action::Regated if flux => "Resuspended",
            Action::Regated => "AutoSyncDisabledAgain",
            Action::HandedOver => "GatedForNewHolding",
            Action::Restored if flux => "Resumed",
            Action::Restored => "AutoSyncRestored",
            Action::KeptEdit => "GateLifted",
            Action::Abandoned => "GateStateUnreadable",
        }
    }

    /// Warning or Normal.
    pub fn event_type(self) -> &'static str {
        match self {
            Action::Regated | Action::Abandoned => "Warning",
            _ => "Normal",
        }
    }

    /// Whether the object ends up gated.
    pub fn gates(self) -> bool {
        matches!(self, Action::Gated | Action::Regated | Action::HandedOver)
    }
}

/// A change to make to one GitOps object.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub action: Action,
    /// JSON merge patch, with the resourceVersion it was decided from (the
    /// API server refuses it with a conflict if the object moved on).
    pub patch: Value,
    /// Whether the patch changes the gated field (not only the annotation).
    pub changes_field: bool,
    /// What was saved before (restore) or is saved now (gate).
    pub saved: Option<Saved>,
    /// For people: what happened and why.
    pub note: String,
}

fn field_value(object: &Value, path: &[&str]) -> Option<Value> {
    let mut current = object;
    for key in path {
        current = current.get(*key)?;
    }
    (!current.is_null()).then(|| current.clone())
}

/// A merge patch setting `path` to `value` (null removes it).
fn nested(path: &[&str], value: Value) -> Value {
    path.iter()
        .rev()
        .fold(value, |inner, key| json!({ (*key): inner }))
}

fn with_annotation(patch: Value, object: &Value, annotation: Value) -> Value {
    let mut patch = match patch {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    let resource_version = object
        .pointer("/metadata/resourceVersion")
        .cloned()
        .unwrap_or(Value::Null);
    patch.insert(
        "metadata".into(),
        json!({
            "resourceVersion": resource_version,
            "annotations": { SAVED_ANNOTATION: annotation },
        }),
    );
    Value::Object(patch)
}

fn describe(value: Option<&Value>) -> String {
    match value {
        None => "absent".into(),
        Some(value) => value.to_string(),
    }
}

/// What [`decide`] reads off a GitOps object, shared by its cases.
struct Target<'a> {
    kind: GitOpsKind,
    object: &'a Value,
    /// The gated field's name, for notes.
    field: String,
    /// The gated field's value now.
    current: Option<Value>,
    /// Whether that value is the gated one.
    gated_now: bool,
}

/// What to do with `object` (a GitOps object of `kind`, as stored) given its
/// bound lock as stored (`None`: unbound, or no such lock). `None`: nothing.
pub fn decide(kind: GitOpsKind, object: &Value, lock: Option<&Value>) -> Option<Change> {
    if object.pointer("/metadata/deletionTimestamp").is_some() {
        return None;
    }
    let binding = binding_of(object);
    let holding = binding.as_ref().and(lock).and_then(holding_of);
    // A holding by one of the object's deployers does not gate it; a
    // restore then says so rather than that the lock is free.
    let (deployer_holding, gating) = match (binding.as_ref(), holding) {
        (Some(binding), Some(holding)) if binding.deployers.contains(&holding.user) => {
            (Some(holding.user), None)
        }
        (Some(binding), Some(holding)) => (None, Some((binding, holding))),
        _ => (None, None),
    };
    let current = field_value(object, kind.field());
    let target = Target {
        kind,
        object,
        field: kind.field_name(),
        gated_now: kind.is_gated(current.as_ref()),
        current,
    };
    match (gating, saved_of(object)) {
        (None, SavedState::Absent) => None,
        (Some((binding, holding)), saved) => gate(&target, binding, &holding, &saved),
        (None, SavedState::Readable(saved)) => Some(release(
            &target,
            binding.as_ref(),
            saved,
            deployer_holding.as_deref(),
        )),
        (None, SavedState::Unreadable(err)) => Some(Change {
            action: Action::Abandoned,
            patch: with_annotation(json!({}), object, Value::Null),
            changes_field: false,
            saved: None,
            note: format!(
                "the lock no longer gates this object, but the saved state ({SAVED_ANNOTATION}) is unreadable ({err}): {} is left as it is ({})",
                target.field,
                describe(target.current.as_ref())
            ),
        }),
    }
}

/// The object is bound to a lock held by someone who is not one of its
/// deployers: gate it (or gate it again, or record the new holding).
/// `None` when it is gated under this very holding already.
fn gate(
    target: &Target<'_>,
    binding: &Binding,
    holding: &Holding,
    saved: &SavedState,
) -> Option<Change> {
    let action = gate_action(binding, holding, saved, target.gated_now)?;
    // The value to restore: the current one unless the field is already
    // gated under a readable saved state (then keep that).
    let value = match (action, saved) {
        (Action::HandedOver, SavedState::Readable(previous)) => previous.value.clone(),
        _ => target.current.clone(),
    };
    let record = Saved {
        field: target.field.clone(),
        value,
        lock_namespace: binding.lock_namespace.clone(),
        environment: binding.environment.clone(),
        lock_id: holding.lock_id.clone(),
        holder: holding.user.clone(),
    };
    let text = serde_json::to_string(&record).ok()?;
    let patch = if target.gated_now {
        json!({})
    } else {
        nested(target.kind.field(), target.kind.gated_value())
    };
    let note = gate_note(target, action, binding, holding, saved, &record);
    Some(Change {
        action,
        patch: with_annotation(patch, target.object, Value::String(text)),
        changes_field: !target.gated_now,
        saved: Some(record),
        note,
    })
}

/// Which gating action the saved state and the field call for; `None`
/// when the field is gated under the same holding already.
fn gate_action(
    binding: &Binding,
    holding: &Holding,
    saved: &SavedState,
    gated_now: bool,
) -> Option<Action> {
    match (saved, gated_now) {
        (SavedState::Absent | SavedState::Unreadable(_), _) => Some(Action::Gated),
        (SavedState::Readable(_), false) => Some(Action::Regated),
        (SavedState::Readable(saved), true)
            if saved.lock_id != holding.lock_id
                || saved.lock_namespace != binding.lock_namespace
                || saved.environment != binding.environment
                || saved.holder != holding.user =>
        {
            Some(Action::HandedOver)
        }
        (SavedState::Readable(_), true) => None,
    }
}

/// For people: why the object is (again) gated and what comes back later.
fn gate_note(
    target: &Target<'_>,
    action: Action,
    binding: &Binding,
    holding: &Holding,
    saved: &SavedState,
    record: &Saved,
) -> String {
    let field = &target.field;
    let holder = if holding.owner.is_empty() || holding.owner == holding.user {
        holding.user.clone()
    } else {
        format!("{} ({})", holding.user, holding.owner)
    };
    match action {
        Action::Regated => format!(
            "{field} was changed to {} while {}/{} is locked by {holder}: {} again; the change is kept for when the lock is released or expires",
            describe(target.current.as_ref()),
            binding.lock_namespace,
            binding.environment,
            target.kind.gated_verb(),
        ),
        _ => {
            let unreadable = match saved {
                SavedState::Unreadable(err) => format!(
                    " (the saved state was unreadable: {err}; the current value is kept as the original)"
                ),
                _ => String::new(),
            };
            format!(
                "{} while {}/{} is locked by {holder} until {}, reason: {:?}; {field} was {} and comes back when the lock is released or expires{unreadable}",
                capitalized(target.kind.gated_verb()),
                binding.lock_namespace,
                binding.environment,
                holding.expires_at,
                holding.reason,
                describe(record.value.as_ref()),
            )
        }
    }
}

/// The lock no longer gates the object and a readable saved state is on it:
/// restore the saved value, or keep an edit made meanwhile.
fn release(
    target: &Target<'_>,
    binding: Option<&Binding>,
    saved: Saved,
    deployer_holding: Option<&str>,
) -> Change {
    let field = &target.field;
    let (action, patch) = if target.gated_now {
        (
            Action::Restored,
            nested(
                target.kind.field(),
                saved.value.clone().unwrap_or(Value::Null),
            ),
        )
    } else {
        (Action::KeptEdit, json!({}))
    };
    let changes_field =
        action == Action::Restored && target.current.as_ref() != saved.value.as_ref();
    let why = release_reason(binding, &saved, deployer_holding);
    let note = match action {
        Action::Restored => format!(
            "{why} (was held by {}): {field} restored to {}",
            saved.holder,
            describe(saved.value.as_ref())
        ),
        _ => format!(
            "{why} (was held by {}): {field} had been changed to {} meanwhile and is kept",
            saved.holder,
            describe(target.current.as_ref())
        ),
    };
    Change {
        action,
        patch: with_annotation(patch, target.object, Value::Null),
        changes_field,
        saved: Some(saved),
        note,
    }
}

/// Why the saved lock no longer gates the object, for people.
fn release_reason(
    binding: Option<&Binding>,
    saved: &Saved,
    deployer_holding: Option<&str>,
) -> String {
    match (binding, deployer_holding) {
        // Whoever may edit the object may name deployers: the restore must
        // not pass for the end of the holding.
        (Some(binding), Some(user)) => format!(
            "{}/{} is held by {user}, whom this object's annotation {DEPLOYER_ANNOTATION} names as a deployer, so the holding does not gate it",
            binding.lock_namespace, binding.environment
        ),
        (Some(binding), None)
            if binding.lock_namespace == saved.lock_namespace
                && binding.environment == saved.environment =>
        {
            format!(
                "{}/{} is no longer locked",
                saved.lock_namespace, saved.environment
            )
        }
        (Some(binding), None) => format!(
            "the object is now bound to {}/{}, which is not locked",
            binding.lock_namespace, binding.environment
        ),
        (None, _) => format!(
            "the object is no longer bound to {}/{} (label {ENVIRONMENT_LABEL} removed)",
            saved.lock_namespace, saved.environment
        ),
    }
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The lock a change concerns (for the Event on the lock): the bound one
/// when gating, the one that had gated it when restoring.
pub fn lock_of(change: &Change) -> Option<(&str, &str)> {
    change
        .saved
        .as_ref()
        .map(|saved| (saved.lock_namespace.as_str(), saved.environment.as_str()))
}

/// RFC 7386 JSON merge patch, as the API server applies it (for tests and
/// for reasoning about a patch before sending it).
pub fn apply_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(map) = target {
        for (key, value) in patch {
            if value.is_null() {
                map.remove(key);
            } else {
                apply_merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

#[cfg(test)]
mod tests;
