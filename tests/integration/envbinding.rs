//! EnvironmentBindings (src/envbinding/, src/controller/envbinding.rs): a
//! cluster admin binds an environment to namespaces with an object, the
//! controller (--environment-bindings) keeps the workload gate's policy
//! binding of it, and the gate follows every change of it; only cluster
//! admins may bind, bad specs are refused by the schema, and a same-named
//! policy binding deploylock did not create is left alone.

use std::process::Output;
use std::time::Duration;

use deploylock::envbinding::{EnvironmentBinding, policy_binding_name};
use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding;
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use serde_json::{Value, json};

use crate::gate::{Gate, set_up_unbound, update_web};
use crate::support::until_answer_changes;
use crate::support::{Identity, TestCluster, cluster, expect_exit, stderr_of, stdout_of};

const ENVIRONMENT: &str = "production";
const WAIT: Duration = Duration::from_secs(60);

fn binding_manifest(name: &str, lock_namespace: &str, spec_extra: Value) -> Value {
    let mut spec = json!({"environment": ENVIRONMENT, "lockNamespace": lock_namespace});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), spec_extra.as_object()) {
        spec.extend(extra.clone());
    }
    json!({
        "apiVersion": "deploylock.dev/v1", "kind": "EnvironmentBinding",
        "metadata": {"name": name}, "spec": spec,
    })
}

fn create_as(cluster: &TestCluster, identity: Identity, manifest: &Value, dry_run: bool) -> Output {
    let mut args = vec!["create", "-f", "-"];
    if dry_run {
        args.push("--dry-run=server");
    }
    cluster.kubectl_with_input(identity, &args, &manifest.to_string())
}

/// Waits (on a watch) until the EnvironmentBinding `name` satisfies `ready`.
async fn await_binding(
    api: &Api<EnvironmentBinding>,
    name: &str,
    what: &str,
    ready: impl Fn(&EnvironmentBinding) -> bool,
) -> EnvironmentBinding {
    let waited = tokio::time::timeout(
        WAIT,
        await_condition(
            api.clone(),
            name,
            move |binding: Option<&EnvironmentBinding>| binding.is_some_and(&ready),
        ),
    )
    .await;
    match waited {
        Ok(Ok(Some(binding))) => binding,
        other => {
            let now = api.get_opt(name).await;
            panic!("{what}: not reached within {WAIT:?} ({other:?}); now: {now:?}")
        }
    }
}

/// The Ready condition as (status, reason, message), for the generation now.
fn ready_of(binding: &EnvironmentBinding) -> Option<(String, String, String)> {
    let status = binding.status.as_ref()?;
    if status.observed_generation != binding.metadata.generation {
        return None;
    }
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.observed_generation == binding.metadata.generation)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub(crate) fn is_ready(binding: &EnvironmentBinding) -> bool {
    ready_of(binding).is_some_and(|(status, _, _)| status == "True")
}

/// Waits until the policy binding `name` satisfies `ready`.
async fn await_policy_binding(
    api: &Api<ValidatingAdmissionPolicyBinding>,
    name: &str,
    what: &str,
    ready: impl Fn(&ValidatingAdmissionPolicyBinding) -> bool,
) -> ValidatingAdmissionPolicyBinding {
    let waited = tokio::time::timeout(
        WAIT,
        await_condition(
            api.clone(),
            name,
            move |found: Option<&ValidatingAdmissionPolicyBinding>| found.is_some_and(&ready),
        ),
    )
    .await;
    match waited {
        Ok(Ok(Some(found))) => found,
        other => panic!("{what}: not reached within {WAIT:?}: {other:?}"),
    }
}

fn selected_names(policy_binding: &ValidatingAdmissionPolicyBinding) -> Value {
    let value = serde_json::to_value(policy_binding).unwrap_or_default();
    value["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]["values"].clone()
}

/// alice's server-side dry-run update of the Deployment `web` in `namespace`.
fn alice_updates(cluster: &TestCluster, namespace: &str) -> Output {
    cluster.kubectl(Identity::Alice, &update_web(namespace))
}

/// Waits until alice's update in `namespace` is refused (returned).
fn until_refused(cluster: &TestCluster, namespace: &str, what: &str) -> Output {
    until_answer_changes(|| alice_updates(cluster, namespace), true, what)
}

/// Waits until alice's update in `namespace` is admitted.
fn until_admitted(cluster: &TestCluster, namespace: &str, what: &str) {
    until_answer_changes(|| alice_updates(cluster, namespace), false, what);
}

#[tokio::test]
async fn an_environment_binding_gates_its_namespaces_and_follows_edits_until_deleted() {
    cluster().install_environment_bindings();
    let cluster = cluster();
    let Gate {
        lock_namespace,
        workloads,
        unbound,
        ..
    } = set_up_unbound("envbind-story").await;
    let _controller = cluster.spawn_controller(
        &lock_namespace,
        "envbind-story",
        &["--environment-bindings"],
    );
    let admin = cluster.client(Identity::Admin).await;
    let bindings: Api<EnvironmentBinding> = Api::all(admin.clone());
    let policy_bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(admin);
    let name = format!("{lock_namespace}-{ENVIRONMENT}");
    let vap_name = policy_binding_name(&lock_namespace, ENVIRONMENT);

    expect_exit(
        &create_as(
            cluster,
            Identity::Admin,
            &binding_manifest(&name, &lock_namespace, json!({"namespaces": [workloads]})),
            false,
        ),
        0,
        "the cluster admin creates the EnvironmentBinding",
    );
    let bound = await_binding(&bindings, &name, "Ready", is_ready).await;
    let status = bound.status.clone().unwrap_or_default();
    assert_eq!(status.policy_binding.as_deref(), Some(vap_name.as_str()));
    assert_eq!(
        status.selector,
        Some(format!("kubernetes.io/metadata.name in ({workloads})"))
    );
    let vap = match policy_bindings.get(&vap_name).await {
        Ok(vap) => vap,
        Err(err) => panic!("the policy binding {vap_name} is not there: {err}"),
    };
    assert_eq!(selected_names(&vap), json!([workloads]));
    assert_eq!(vap.spec.policy_name, "deploylock.dev-workload-gate");
    assert_eq!(vap.spec.validation_actions, vec!["Deny".to_string()]);
    let param = vap.spec.param_ref.clone().unwrap_or_default();
    assert_eq!(
        (
            param.name.as_deref(),
            param.namespace.as_deref(),
            param.parameter_not_found_action.as_deref()
        ),
        (
            Some(ENVIRONMENT),
            Some(lock_namespace.as_str()),
            Some("Allow")
        )
    );
    assert_eq!(
        vap.owner_references()
            .iter()
            .map(|o| o.uid.as_str())
            .collect::<Vec<_>>(),
        vec![bound.uid().unwrap_or_default().as_str()]
    );
    let managers: Vec<String> = vap
        .managed_fields()
        .iter()
        .filter_map(|entry| entry.manager.clone())
        .collect();
    assert_eq!(managers, vec!["deploylock-controller".to_string()]);

    // bob holds production: alice's change in the bound namespace is refused
    // with bob's name; the unbound namespace is not gated.
    expect_exit(
        &cluster.deploylock(
            Identity::Bob,
            &lock_namespace,
            &[
                "acquire",
                "-e",
                ENVIRONMENT,
                "--reason",
                "Database migration",
            ],
        ),
        0,
        "bob acquires",
    );
    let refused = until_refused(cluster, &workloads, "alice's update in the bound namespace");
    let said = stderr_of(&refused);
    assert!(
        said.contains("production is locked by bob") && said.contains("Database migration"),
        "the refusal must name the holder and the reason: {said}"
    );
    expect_exit(
        &alice_updates(cluster, &unbound),
        0,
        "alice's update in the unbound namespace",
    );

    // status -v names what the lock gates.
    let status = cluster.deploylock(
        Identity::Bob,
        &lock_namespace,
        &["-e", ENVIRONMENT, "status", "-v"],
    );
    expect_exit(&status, 0, "status -v");
    let expected_line =
        format!("Workload gate: namespaces {workloads} (EnvironmentBinding {name}, in force)");
    assert!(
        stdout_of(&status).contains(&expected_line),
        "status -v lacks {expected_line:?}:\n{}",
        stdout_of(&status)
    );

    // The binding now names the other namespace: the policy binding follows,
    // and the gate with it.
    let edited = bindings
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"namespaces": [unbound]}})),
        )
        .await;
    assert!(edited.is_ok(), "edit the binding: {edited:?}");
    await_policy_binding(
        &policy_bindings,
        &vap_name,
        "the policy binding follows",
        |vap| selected_names(vap) == json!([unbound]),
    )
    .await;
    await_binding(&bindings, &name, "Ready for generation 2", |binding| {
        binding.metadata.generation == Some(2) && is_ready(binding)
    })
    .await;
    until_refused(
        cluster,
        &unbound,
        "alice's update in the newly bound namespace",
    );
    until_admitted(
        cluster,
        &workloads,
        "alice's update in the no longer bound namespace",
    );

    // Deleted: its policy binding goes (the controller sweeps it: this
    // control plane runs no garbage collector), and nothing is gated.
    let uid = vap.uid().unwrap_or_default();
    let deleted = bindings.delete(&name, &DeleteParams::default()).await;
    assert!(deleted.is_ok(), "delete the binding: {deleted:?}");
    let gone = tokio::time::timeout(
        WAIT,
        await_condition(
            policy_bindings.clone(),
            &vap_name,
            conditions::is_deleted(&uid),
        ),
    )
    .await;
    assert!(
        matches!(gone, Ok(Ok(_))),
        "the policy binding outlived its EnvironmentBinding: {gone:?}"
    );
    until_admitted(
        cluster,
        &unbound,
        "alice's update once the binding is deleted",
    );
}

#[tokio::test]
async fn only_cluster_admins_bind_and_bad_specs_are_refused_by_the_schema() {
    cluster().install_environment_bindings();
    let cluster = cluster();
    let lock_namespace = cluster.namespace("envbind-schema").await;
    let good = binding_manifest(
        &format!("{lock_namespace}-good"),
        &lock_namespace,
        json!({"namespaces": ["shop"]}),
    );
    // alice (deploylock-user) and carol (deploylock-admin, bound
    // cluster-wide) may not bind namespaces; they may read bindings.
    for identity in [Identity::Alice, Identity::Carol] {
        let refused = create_as(cluster, identity, &good, true);
        assert!(
            !refused.status.success(),
            "{identity:?} created an EnvironmentBinding"
        );
        let said = stderr_of(&refused);
        assert!(
            said.contains("forbidden") && said.contains("environmentbindings"),
            "{identity:?}: expected 403 Forbidden, got: {said}"
        );
        expect_exit(
            &cluster.kubectl(identity, &["get", "environmentbindings"]),
            0,
            "reading EnvironmentBindings",
        );
    }
    expect_exit(
        &create_as(cluster, Identity::Admin, &good, true),
        0,
        "the cluster admin's dry run",
    );

    let too_many: Vec<String> = (0..65).map(|i| format!("ns-{i}")).collect();
    let cases = [
        (
            json!({"environment": "Production!"}),
            "spec.environment in body should match",
        ),
        (
            json!({"lockNamespace": "-deploy"}),
            "spec.lockNamespace in body should match",
        ),
        (
            json!({"namespaces": ["shop", "shop"]}),
            "Duplicate value: \"shop\"",
        ),
        (
            json!({"namespaces": ["Shop_1"]}),
            "spec.namespaces[0] in body should match",
        ),
        (
            json!({"namespaces": too_many}),
            "must have at most 64 items",
        ),
        (
            json!({"namespaces": ["shop"], "namespaceSelector": {"matchLabels": {"team": "shop"}}}),
            "name the namespaces or select them by label (namespaceSelector), not both",
        ),
        (
            json!({"namespaceSelector": {}}),
            "an empty namespaceSelector would gate every namespace",
        ),
        (
            json!({"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In"}]}}),
            "In and NotIn need values",
        ),
        (
            json!({"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Exists", "values": ["x"]}]}}),
            "Exists and DoesNotExist take none",
        ),
        (
            json!({"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Near", "values": ["x"]}]}}),
            "Unsupported value: \"Near\"",
        ),
        (
            json!({"namespaceSelector": {"matchLabels": {"bad key!": "x"}}}),
            "matchLabels: every key must be a label key",
        ),
        (
            json!({"namespaceSelector": {"matchLabels": {"team": "not a value"}}}),
            "in body should match",
        ),
    ];
    let mut wrong = Vec::new();
    for (i, (spec, expected)) in cases.iter().enumerate() {
        let manifest = binding_manifest(
            &format!("{lock_namespace}-bad-{i}"),
            &lock_namespace,
            spec.clone(),
        );
        let output = create_as(cluster, Identity::Admin, &manifest, true);
        let said = stderr_of(&output);
        if output.status.success() || !said.contains("is invalid") || !said.contains(expected) {
            wrong.push(format!(
                "{spec}: expected a 422 saying {expected:?}, got: {said}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // environment and lockNamespace are immutable.
    expect_exit(
        &create_as(cluster, Identity::Admin, &good, false),
        0,
        "create the good binding",
    );
    let good_name = format!("{lock_namespace}-good");
    for patch in [
        r#"{"spec":{"environment":"staging"}}"#,
        r#"{"spec":{"lockNamespace":"other"}}"#,
    ] {
        let output = cluster.kubectl(
            Identity::Admin,
            &[
                "patch",
                "environmentbinding",
                &good_name,
                "--type=merge",
                "-p",
                patch,
            ],
        );
        let said = stderr_of(&output);
        assert!(
            !output.status.success() && said.contains("is immutable"),
            "{patch}: expected refused as immutable, got: {said}"
        );
    }
    // kubectl explain reads the generated docs.
    let explained = cluster.kubectl(Identity::Admin, &["explain", "environmentbinding.spec"]);
    expect_exit(&explained, 0, "kubectl explain environmentbinding.spec");
    let text = stdout_of(&explained);
    for part in [
        "lockNamespace",
        "namespaceSelector",
        "the name of its DeploymentLock",
    ] {
        assert!(
            text.contains(part),
            "kubectl explain lacks {part:?}:\n{text}"
        );
    }
    expect_exit(
        &cluster.kubectl(
            Identity::Admin,
            &["delete", "environmentbinding", &good_name],
        ),
        0,
        "delete the good binding",
    );
}

#[tokio::test]
async fn a_same_named_policy_binding_deploylock_did_not_create_is_left_alone() {
    cluster().install_environment_bindings();
    let cluster = cluster();
    let lock_namespace = cluster.namespace("envbind-foreign").await;
    let admin = cluster.client(Identity::Admin).await;
    let bindings: Api<EnvironmentBinding> = Api::all(admin.clone());
    let policy_bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(admin.clone());
    let vap_name = policy_binding_name(&lock_namespace, ENVIRONMENT);
    // The chart's binding (by hand here): Helm's label, no owner.
    let foreign: ValidatingAdmissionPolicyBinding = match serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": vap_name, "labels": {"app.kubernetes.io/managed-by": "Helm"}},
        "spec": {
            "policyName": "deploylock.dev-workload-gate", "validationActions": ["Deny"],
            "paramRef": {"name": ENVIRONMENT, "namespace": lock_namespace, "parameterNotFoundAction": "Allow"},
            "matchResources": {"namespaceSelector": {"matchLabels": {"team": "chart"}}}
        }
    })) {
        Ok(foreign) => foreign,
        Err(err) => panic!("foreign binding: {err}"),
    };
    let foreign = match policy_bindings
        .create(&PostParams::default(), &foreign)
        .await
    {
        Ok(created) => created,
        Err(err) => panic!("create the foreign policy binding: {err}"),
    };
    let _controller = cluster.spawn_controller(
        &lock_namespace,
        "envbind-foreign",
        &["--environment-bindings"],
    );
    let name = format!("{lock_namespace}-{ENVIRONMENT}");
    expect_exit(
        &create_as(
            cluster,
            Identity::Admin,
            &binding_manifest(&name, &lock_namespace, json!({"namespaces": ["shop"]})),
            false,
        ),
        0,
        "create the EnvironmentBinding",
    );
    let refused = await_binding(&bindings, &name, "Ready=False", |binding| {
        ready_of(binding).is_some_and(|(status, _, _)| status == "False")
    })
    .await;
    let (_, reason, message) = ready_of(&refused).unwrap_or_default();
    assert_eq!(reason, "NameTaken");
    assert!(
        message.contains(&vap_name)
            && message.contains("deploylock did not create")
            && message.contains("Helm"),
        "{message}"
    );
    // The Warning Event, once per generation.
    let event_name = format!(
        "{name}.{}.nametaken.1",
        deploylock::controller::plan::short_id(&refused.uid().unwrap_or_default())
    );
    let events: Api<Event> = Api::namespaced(admin, "default");
    let event = tokio::time::timeout(
        WAIT,
        await_condition(events, &event_name, |event: Option<&Event>| event.is_some()),
    )
    .await;
    match event {
        Ok(Ok(Some(event))) => {
            assert_eq!(event.type_.as_deref(), Some("Warning"));
            assert_eq!(event.regarding.and_then(|r| r.name), Some(name.clone()));
        }
        other => panic!("no Warning Event {event_name}: {other:?}"),
    }
    // Left exactly as it was.
    let now = match policy_bindings.get(&vap_name).await {
        Ok(now) => now,
        Err(err) => panic!("the foreign policy binding is gone: {err}"),
    };
    assert_eq!(now.resource_version(), foreign.resource_version());
    assert!(now.owner_references().is_empty());

    // Once the foreign one is deleted, the EnvironmentBinding takes the name.
    let deleted = policy_bindings
        .delete(&vap_name, &DeleteParams::default())
        .await;
    assert!(deleted.is_ok(), "delete the foreign binding: {deleted:?}");
    await_binding(&bindings, &name, "Ready once the name is free", is_ready).await;
    let ours = await_policy_binding(&policy_bindings, &vap_name, "our policy binding", |vap| {
        !vap.owner_references().is_empty()
    })
    .await;
    assert_eq!(selected_names(&ours), json!(["shop"]));

    // A second EnvironmentBinding of the same environment does not take the
    // first one's policy binding.
    let second = format!("{name}-again");
    expect_exit(
        &create_as(
            cluster,
            Identity::Admin,
            &binding_manifest(&second, &lock_namespace, json!({"namespaces": ["other"]})),
            false,
        ),
        0,
        "create a second EnvironmentBinding of the environment",
    );
    let refused = await_binding(
        &bindings,
        &second,
        "the second one Ready=False",
        |binding| ready_of(binding).is_some_and(|(status, _, _)| status == "False"),
    )
    .await;
    let (_, reason, message) = ready_of(&refused).unwrap_or_default();
    assert_eq!(reason, "NameTaken");
    assert!(
        message.contains(&format!("already bound by EnvironmentBinding {name}")),
        "{message}"
    );
    let kept = match policy_bindings.get(&vap_name).await {
        Ok(kept) => kept,
        Err(err) => panic!("the policy binding is gone: {err}"),
    };
    assert_eq!(kept.resource_version(), ours.resource_version());
    assert_eq!(selected_names(&kept), json!(["shop"]));
    for binding in [&second, &name] {
        let deleted = bindings.delete(binding, &DeleteParams::default()).await;
        assert!(deleted.is_ok(), "delete {binding}: {deleted:?}");
    }
}

/// Two EnvironmentBindings of one environment created together (one
/// `kubectl create` of both): the first reconciled binds it, the other is
/// refused (NameTaken), and the policy binding belongs to the bound one.
/// Reconciled side by side, both found no policy binding and both applied
/// it, the second taking it over silently.
#[tokio::test]
async fn two_bindings_of_one_environment_created_together_bind_it_once() {
    cluster().install_environment_bindings();
    let cluster = cluster();
    let lock_namespace = cluster.namespace("envbind-together").await;
    let admin = cluster.client(Identity::Admin).await;
    let bindings: Api<EnvironmentBinding> = Api::all(admin.clone());
    let policy_bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(admin);
    let _controller = cluster.spawn_controller(
        &lock_namespace,
        "envbind-together",
        &["--environment-bindings"],
    );
    let names = [
        format!("{lock_namespace}-one"),
        format!("{lock_namespace}-two"),
    ];
    let list = json!({
        "apiVersion": "v1", "kind": "List",
        "items": [
            binding_manifest(&names[0], &lock_namespace, json!({"namespaces": ["one"]})),
            binding_manifest(&names[1], &lock_namespace, json!({"namespaces": ["two"]})),
        ],
    });
    let created =
        cluster.kubectl_with_input(Identity::Admin, &["create", "-f", "-"], &list.to_string());
    expect_exit(&created, 0, "create both EnvironmentBindings");
    let mut outcomes = Vec::new();
    for name in &names {
        let decided = await_binding(&bindings, name, "Ready decided", |binding| {
            ready_of(binding).is_some()
        })
        .await;
        let (status, reason, _) = ready_of(&decided).unwrap_or_default();
        outcomes.push((name.clone(), status, reason, decided.uid()));
    }
    let bound: Vec<_> = outcomes.iter().filter(|o| o.1 == "True").collect();
    let refused: Vec<_> = outcomes
        .iter()
        .filter(|o| o.1 == "False" && o.2 == "NameTaken")
        .collect();
    assert!(
        bound.len() == 1 && refused.len() == 1,
        "not one bound and one refused: {outcomes:?}"
    );
    let vap_name = policy_binding_name(&lock_namespace, ENVIRONMENT);
    let vap = match policy_bindings.get(&vap_name).await {
        Ok(vap) => vap,
        Err(err) => panic!("no policy binding {vap_name}: {err}"),
    };
    let owners: Vec<_> = vap
        .owner_references()
        .iter()
        .map(|owner| Some(owner.uid.clone()))
        .collect();
    assert_eq!(owners, vec![bound[0].3.clone()], "owners of {vap_name}");
    let expected = if bound[0].0 == names[0] { "one" } else { "two" };
    assert_eq!(selected_names(&vap), json!([expected]));
    for name in &names {
        let deleted = bindings.delete(name, &DeleteParams::default()).await;
        assert!(deleted.is_ok(), "delete {name}: {deleted:?}");
    }
}
