//! Environment bindings: the `EnvironmentBinding` custom resource, which
//! says which namespaces make up an environment (by name, or by label), and
//! the workload gate's ValidatingAdmissionPolicyBinding rendered from it
//! (the same one the chart renders from `workloadGate.environments`).
//!
//! The kind is cluster-scoped: binding namespaces gates other teams'
//! workloads, so only cluster admins may create one. The controller
//! (`--environment-bindings`, see [`crate::controller::envbinding`]) applies
//! the rendered policy binding and reports `Ready`.

pub mod cli;

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::{
    MatchResources, ParamRef, ValidatingAdmissionPolicyBinding,
    ValidatingAdmissionPolicyBindingSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    Condition, LabelSelector, LabelSelectorRequirement, OwnerReference,
};
use kube::{Resource, ResourceExt};
use macro_rules_attribute::apply;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::deploylock_kind;
use crate::environment::{DNS_LABEL_PATTERN, MAX_DNS_LABEL_LEN};
use crate::gitops::ENVIRONMENT_LABEL;

/// The workload gate's policy (config/admission/workload-gate.yaml).
pub const GATE_POLICY: &str = "deploylock.dev-workload-gate";
/// Most namespaces one binding names.
pub const MAX_BOUND_NAMESPACES: usize = 64;
/// Label saying who manages a policy binding; `deploylock` on the
/// controller's, which is how it tells its own from others'.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`] on the controller's policy bindings.
pub const MANAGED_BY: &str = "deploylock";
/// Label carrying the lock's namespace on the controller's policy bindings
/// (a controller watching one namespace looks only at its own).
pub const LOCK_NAMESPACE_LABEL: &str = "deploylock.dev/lock-namespace";
/// The namespace label every namespace carries (its name).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Condition type saying whether the policy binding is in place.
pub use crate::conditions::READY_CONDITION;

/// An environment's namespaces.
#[apply(deploylock_kind!)]
#[kube(
    kind = "EnvironmentBinding",
    shortname = "dlbinding",
    status = "EnvironmentBindingStatus",
    doc = "An EnvironmentBinding says which namespaces make up an environment: while the environment's DeploymentLock is held, workloads in those namespaces change only by the holder, deployers and admins (the workload gate, a ValidatingAdmissionPolicy). The controller (--environment-bindings) keeps one ValidatingAdmissionPolicyBinding per EnvironmentBinding. Cluster-scoped: only cluster admins bind namespaces.",
    printcolumn(
        name = "Environment",
        type_ = "string",
        json_path = ".spec.environment",
        description = "The environment (its DeploymentLock's name)"
    ),
    printcolumn(
        name = "Lock Namespace",
        type_ = "string",
        json_path = ".spec.lockNamespace",
        description = "Namespace of the DeploymentLock"
    ),
    printcolumn(
        name = "Namespaces",
        type_ = "string",
        json_path = ".spec.namespaces",
        description = "Namespaces gated by name (empty: by selector)"
    ),
    printcolumn(
        name = "Selector",
        type_ = "string",
        json_path = ".status.selector",
        description = "The namespace selector in force",
        priority = 1
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the policy binding is in place"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!(has(self.namespaces) && size(self.namespaces) > 0 && has(self.namespaceSelector))").message("name the namespaces or select them by label (namespaceSelector), not both"))]
pub struct EnvironmentBindingSpec {
    /// The environment: the name of its DeploymentLock (a DNS label).
    /// Immutable.
    #[schemars(schema_with = "immutable_dns_label_schema")]
    pub environment: String,

    /// The namespace of the environment's DeploymentLock. Immutable.
    #[schemars(schema_with = "immutable_dns_label_schema")]
    pub lock_namespace: String,

    /// The namespaces the environment is made of, by name (at most 64).
    /// Neither this nor namespaceSelector: the namespaces labelled
    /// deploylock.dev/environment=<environment>.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "namespaces_schema")]
    pub namespaces: Vec<String>,

    /// The namespaces the environment is made of, by label (standard
    /// matchLabels / matchExpressions; not empty: an empty selector would
    /// gate every namespace).
    #[schemars(default, schema_with = "namespace_selector_schema")]
    pub namespace_selector: Option<LabelSelector>,
}

fn immutable_dns_label_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_DNS_LABEL_LEN,
        "pattern": DNS_LABEL_PATTERN,
        "x-kubernetes-validations": [{
            "rule": "self == oldSelf",
            "message": "is immutable: create another EnvironmentBinding",
        }],
    })
}

fn namespaces_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": MAX_BOUND_NAMESPACES,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_DNS_LABEL_LEN,
            "pattern": DNS_LABEL_PATTERN,
        },
    })
}

fn namespace_selector_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = crate::label_selector::schema("namespaceSelector", "a namespace");
    schema.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([{
            "rule": "(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)",
            "message": "an empty namespaceSelector would gate every namespace: give matchLabels or matchExpressions, or leave it out (the namespaces labelled deploylock.dev/environment=<environment>)",
        }]),
    );
    schema
}

/// What the controller observed and did.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentBindingStatus {
    /// Ready: whether the ValidatingAdmissionPolicyBinding is in place.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// The ValidatingAdmissionPolicyBinding the controller keeps.
    pub policy_binding: Option<String>,

    /// The namespace selector in force, as `kubectl get -l` reads it.
    pub selector: Option<String>,

    /// The generation the status describes.
    pub observed_generation: Option<i64>,
}

/// The name of the policy binding of `environment` (lock in
/// `lock_namespace`): the chart's name scheme, so either kind of binding
/// takes the same name.
pub fn policy_binding_name(lock_namespace: &str, environment: &str) -> String {
    format!("{GATE_POLICY}.{lock_namespace}.{environment}")
}

impl EnvironmentBindingSpec {
    /// The name of the policy binding this spec renders to.
    pub fn policy_binding_name(&self) -> String {
        policy_binding_name(&self.lock_namespace, &self.environment)
    }

    /// The namespaces gated, as a namespace selector: the names, the
    /// selector given, or the environment label.
    pub fn effective_selector(&self) -> LabelSelector {
        if !self.namespaces.is_empty() {
            return LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: NAMESPACE_NAME_LABEL.to_string(),
                    operator: "In".to_string(),
                    values: Some(self.namespaces.clone()),
                }]),
                match_labels: None,
            };
        }
        match &self.namespace_selector {
            Some(selector) => selector.clone(),
            None => LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    ENVIRONMENT_LABEL.to_string(),
                    self.environment.clone(),
                )])),
                match_expressions: None,
            },
        }
    }

    /// What the spec binds, for people: `namespaces shop, payments` or
    /// `namespaces labelled deploylock.dev/environment=production`.
    pub fn describe(&self) -> String {
        if self.namespaces.is_empty() {
            format!(
                "namespaces labelled {}",
                selector_text(&self.effective_selector())
            )
        } else {
            format!("namespaces {}", self.namespaces.join(", "))
        }
    }
}

/// A label selector as `kubectl get -l` reads it:
/// `a=b,c in (d,e),!f`.
pub fn selector_text(selector: &LabelSelector) -> String {
    let mut parts: Vec<String> = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    for requirement in selector.match_expressions.iter().flatten() {
        let values = requirement.values.as_deref().unwrap_or_default().join(",");
        let key = &requirement.key;
        parts.push(match requirement.operator.as_str() {
            "In" => format!("{key} in ({values})"),
            "NotIn" => format!("{key} notin ({values})"),
            "Exists" => key.clone(),
            "DoesNotExist" => format!("!{key}"),
            other => format!("{key} {other} ({values})"),
        });
    }
    parts.join(",")
}

/// Why a binding cannot be rendered.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("the EnvironmentBinding has no name or UID (not read from the API server)")]
    NoIdentity,
}

/// The labels of the controller's policy binding for `spec`.
pub fn policy_binding_labels(spec: &EnvironmentBindingSpec) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "deploylock".to_string(),
        ),
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (ENVIRONMENT_LABEL.to_string(), spec.environment.clone()),
        (
            LOCK_NAMESPACE_LABEL.to_string(),
            spec.lock_namespace.clone(),
        ),
    ])
}

/// The ValidatingAdmissionPolicyBinding of `binding`: the chart's (policy
/// deploylock.dev-workload-gate, Deny, the lock as parameter, no lock
/// object means nothing gated), owned by the EnvironmentBinding so that
/// deleting it deletes the policy binding.
pub fn render_policy_binding(
    binding: &EnvironmentBinding,
) -> Result<ValidatingAdmissionPolicyBinding, RenderError> {
    let (Some(uid), Some(name)) = (binding.uid(), binding.metadata.name.clone()) else {
        return Err(RenderError::NoIdentity);
    };
    let spec = &binding.spec;
    let owner = OwnerReference {
        api_version: EnvironmentBinding::api_version(&()).into_owned(),
        kind: EnvironmentBinding::kind(&()).into_owned(),
        name,
        uid,
        controller: Some(true),
        block_owner_deletion: None,
    };
    Ok(ValidatingAdmissionPolicyBinding {
        metadata: kube::core::ObjectMeta {
            name: Some(spec.policy_binding_name()),
            labels: Some(policy_binding_labels(spec)),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: ValidatingAdmissionPolicyBindingSpec {
            policy_name: GATE_POLICY.to_string(),
            validation_actions: vec!["Deny".to_string()],
            param_ref: Some(ParamRef {
                name: Some(spec.environment.clone()),
                namespace: Some(spec.lock_namespace.clone()),
                parameter_not_found_action: Some("Allow".to_string()),
                selector: None,
            }),
            match_resources: Some(MatchResources {
                namespace_selector: Some(spec.effective_selector()),
                ..Default::default()
            }),
        },
    })
}

/// Whose a policy binding found under the rendered name is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ownership {
    /// This EnvironmentBinding's (its UID in the owner references).
    Ours,
    /// The controller's, for another EnvironmentBinding: that one may be
    /// gone (then it is an orphan to adopt) or bind the same environment
    /// (then this one must not take it).
    OtherBinding { name: String, uid: String },
    /// Not deploylock's: the chart's, or written by hand.
    Foreign,
}

/// Whose `existing` is, seen from the EnvironmentBinding with `uid`.
pub fn ownership(existing: &ValidatingAdmissionPolicyBinding, uid: &str) -> Ownership {
    let kind = EnvironmentBinding::kind(&());
    let api_version = EnvironmentBinding::api_version(&());
    let managed = existing.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY);
    let owners: Vec<&OwnerReference> = existing
        .owner_references()
        .iter()
        .filter(|owner| owner.kind == kind && owner.api_version == api_version)
        .collect();
    if owners.iter().any(|owner| owner.uid == uid) {
        Ownership::Ours
    } else if let (true, Some(owner)) = (managed, owners.first()) {
        Ownership::OtherBinding {
            name: owner.name.clone(),
            uid: owner.uid.clone(),
        }
    } else {
        Ownership::Foreign
    }
}

#[cfg(test)]
mod tests;
