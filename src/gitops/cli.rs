//! What `deploylock status -v` says about GitOps gating: the Flux and Argo CD
//! objects bound to the environment, and whether each is gated now.

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::{Client, ResourceExt};

use super::{ENVIRONMENT_LABEL, GitOpsKind, SavedState, binding_of, saved_of};

/// One line: `Kustomization flux-system/shop (suspended), …`, `none`, or
/// why it is unknown. Kinds whose CRD is not installed are left out.
pub async fn gates(client: &Client, lock_namespace: &str, environment: &str) -> String {
    let mut found = Vec::new();
    for kind in GitOpsKind::ALL {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(kind.group(), kind.version(), kind.kind()),
            kind.plural(),
        );
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let selector = format!("{ENVIRONMENT_LABEL}={environment}");
        let list = match api.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => list,
            Err(kube::Error::Api(status)) if status.code == 404 => continue,
            Err(kube::Error::Api(status)) if status.code == 403 => {
                return format!("unknown (you may not list {}s cluster-wide)", kind.kind());
            }
            Err(err) => return format!("unknown (cannot list {}s: {err})", kind.kind()),
        };
        for object in list.items {
            let Ok(value) = serde_json::to_value(&object) else {
                continue;
            };
            if binding_of(&value).is_none_or(|binding| binding.lock_namespace != lock_namespace) {
                continue;
            }
            let state = match saved_of(&value) {
                SavedState::Absent => "not gated now",
                _ => kind.gated_verb(),
            };
            found.push(format!(
                "{kind} {}/{} ({state})",
                object.namespace().unwrap_or_default(),
                object.name_any()
            ));
        }
    }
    if found.is_empty() {
        "none".into()
    } else {
        found.join(", ")
    }
}
