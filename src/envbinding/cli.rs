//! What `deploylock status -v` says about the workload gate: the namespaces
//! the EnvironmentBindings of the lock's environment gate.

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use super::{EnvironmentBinding, READY_CONDITION, selector_text};
use crate::conditions;

/// The line's text, or `None` when there is nothing to say: the kind is not
/// installed, or the caller may not list EnvironmentBindings.
pub async fn gated_namespaces(
    client: &Client,
    lock_namespace: &str,
    environment: &str,
) -> Option<String> {
    let api: Api<EnvironmentBinding> = Api::all(client.clone());
    let bindings = match api.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(err) => {
            tracing::debug!(error = %err, "EnvironmentBindings not readable");
            return None;
        }
    };
    let mut found = Vec::new();
    for binding in bindings.iter().filter(|binding| {
        binding.spec.environment == environment && binding.spec.lock_namespace == lock_namespace
    }) {
        let mut text = binding.spec.describe();
        if binding.spec.namespaces.is_empty()
            && let Some(names) = selected_names(client, binding).await
        {
            text.push_str(&format!(" (now: {names})"));
        }
        // Only a status written for this spec describes it (just after an
        // edit, the previous spec is still what the gate enforces).
        let conditions = binding
            .status
            .as_ref()
            .filter(|status| status.observed_generation == binding.metadata.generation)
            .map_or(&[][..], |status| &status.conditions[..]);
        let state = if conditions::is_true(conditions, READY_CONDITION) {
            "in force".to_string()
        } else if let Some(condition) = conditions::false_condition(conditions, READY_CONDITION) {
            format!("NOT in force: {}", condition.message)
        } else {
            "not yet in force: no controller has applied this version".to_string()
        };
        found.push(format!(
            "{text} (EnvironmentBinding {}, {state})",
            binding.name_any()
        ));
    }
    Some(if found.is_empty() {
        "no namespaces (no EnvironmentBinding for this environment)".to_string()
    } else {
        found.join("; ")
    })
}

/// The namespaces a selector-based binding selects now, if the caller may
/// list namespaces.
async fn selected_names(client: &Client, binding: &EnvironmentBinding) -> Option<String> {
    let selector = selector_text(&binding.spec.effective_selector());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let list = namespaces
        .list(&ListParams::default().labels(&selector))
        .await
        .ok()?;
    let names: Vec<String> = list.items.iter().map(|ns| ns.name_any()).collect();
    Some(if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    })
}
