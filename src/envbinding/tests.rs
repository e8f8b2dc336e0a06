use super::*;
use serde_json::json;

fn binding(spec: serde_json::Value) -> EnvironmentBinding {
    let mut binding: EnvironmentBinding = match serde_json::from_value(json!({
        "apiVersion": "deploylock.dev/v1",
        "kind": "EnvironmentBinding",
        "metadata": {"name": "production-shop", "uid": "u-1"},
        "spec": spec,
    })) {
        Ok(binding) => binding,
        Err(err) => panic!("test binding: {err}"),
    };
    binding.metadata.generation = Some(1);
    binding
}

fn rendered(spec: serde_json::Value) -> serde_json::Value {
    match render_policy_binding(&binding(spec)) {
        Ok(vap) => serde_json::to_value(vap).unwrap_or_default(),
        Err(err) => panic!("render: {err}"),
    }
}

/// The chart's binding (templates/workload-gate.yaml) for the same values,
/// with the controller's labels and owner.
fn expected(selector: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {
            "name": "deploylock.dev-workload-gate.deploy.production",
            "labels": {
                "app.kubernetes.io/name": "deploylock",
                "app.kubernetes.io/managed-by": "deploylock",
                "deploylock.dev/environment": "production",
                "deploylock.dev/lock-namespace": "deploy",
            },
            "ownerReferences": [{
                "apiVersion": "deploylock.dev/v1",
                "kind": "EnvironmentBinding",
                "name": "production-shop",
                "uid": "u-1",
                "controller": true,
            }],
        },
        "spec": {
            "policyName": "deploylock.dev-workload-gate",
            "validationActions": ["Deny"],
            "paramRef": {
                "name": "production",
                "namespace": "deploy",
                "parameterNotFoundAction": "Allow",
            },
            "matchResources": {"namespaceSelector": selector},
        },
    })
}

#[test]
fn named_namespaces_render_the_charts_binding() {
    let vap = rendered(json!({
        "environment": "production", "lockNamespace": "deploy",
        "namespaces": ["shop", "payments"],
    }));
    assert_eq!(
        vap,
        expected(json!({"matchExpressions": [{
            "key": "kubernetes.io/metadata.name", "operator": "In", "values": ["shop", "payments"],
        }]}))
    );
}

#[test]
fn without_namespaces_or_selector_the_environment_label_selects() {
    let spec = json!({"environment": "production", "lockNamespace": "deploy"});
    assert_eq!(
        rendered(spec.clone()),
        expected(json!({"matchLabels": {"deploylock.dev/environment": "production"}}))
    );
    assert_eq!(
        binding(spec).spec.describe(),
        "namespaces labelled deploylock.dev/environment=production"
    );
}

#[test]
fn a_selector_is_passed_on_as_given() {
    let selector = json!({
        "matchLabels": {"team": "shop"},
        "matchExpressions": [
            {"key": "tier", "operator": "NotIn", "values": ["dev", "test"]},
            {"key": "pci", "operator": "Exists"},
            {"key": "legacy", "operator": "DoesNotExist"},
        ],
    });
    let spec = json!({
        "environment": "production", "lockNamespace": "deploy", "namespaceSelector": selector,
    });
    assert_eq!(rendered(spec.clone()), expected(selector));
    assert_eq!(
        selector_text(&binding(spec).spec.effective_selector()),
        "team=shop,tier notin (dev,test),pci,!legacy"
    );
}

#[test]
fn the_name_is_the_charts_scheme() {
    assert_eq!(
        policy_binding_name("deploy", "production"),
        "deploylock.dev-workload-gate.deploy.production"
    );
    let spec =
        binding(json!({"environment": "staging", "lockNamespace": "ops", "namespaces": ["a"]}));
    assert_eq!(
        spec.spec.policy_binding_name(),
        "deploylock.dev-workload-gate.ops.staging"
    );
    assert_eq!(spec.spec.describe(), "namespaces a");
}

#[test]
fn a_binding_without_uid_is_not_rendered() {
    let mut unsaved = binding(json!({"environment": "production", "lockNamespace": "deploy"}));
    unsaved.metadata.uid = None;
    assert_eq!(
        render_policy_binding(&unsaved),
        Err(RenderError::NoIdentity)
    );
}

#[test]
fn ownership_tells_ours_another_bindings_and_foreign_apart() {
    let ours = binding(json!({"environment": "production", "lockNamespace": "deploy"}));
    let vap = match render_policy_binding(&ours) {
        Ok(vap) => vap,
        Err(err) => panic!("render: {err}"),
    };
    assert_eq!(ownership(&vap, "u-1"), Ownership::Ours);
    assert_eq!(
        ownership(&vap, "u-2"),
        Ownership::OtherBinding {
            name: "production-shop".into(),
            uid: "u-1".into()
        }
    );
    // The chart's: Helm's labels, no owner.
    let mut chart = vap.clone();
    chart.metadata.owner_references = None;
    chart
        .labels_mut()
        .insert(MANAGED_BY_LABEL.into(), "Helm".into());
    assert_eq!(ownership(&chart, "u-1"), Ownership::Foreign);
    // An owner reference alone (copied by hand) does not make it ours
    // unless it names this very binding.
    let mut copied = vap;
    copied.labels_mut().remove(MANAGED_BY_LABEL);
    assert_eq!(ownership(&copied, "u-2"), Ownership::Foreign);
}

#[test]
fn the_schema_carries_the_rules() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(EnvironmentBinding::crd()).unwrap_or_default();
    assert_eq!(crd["spec"]["scope"], "Cluster");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["required"], json!(["environment", "lockNamespace"]));
    assert_eq!(
        spec["properties"]["namespaces"]["x-kubernetes-list-type"],
        "set"
    );
    assert_eq!(
        spec["properties"]["namespaces"]["maxItems"],
        MAX_BOUND_NAMESPACES
    );
    for field in ["environment", "lockNamespace"] {
        assert_eq!(
            spec["properties"][field]["x-kubernetes-validations"][0]["rule"],
            "self == oldSelf"
        );
    }
    let rules = spec["x-kubernetes-validations"].to_string();
    assert!(rules.contains("not both"), "{rules}");
}
