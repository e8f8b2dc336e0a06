//! The DeploymentLock API as the real API server serves it: the generated CRD
//! is accepted, objects round-trip, and the schema's rules are enforced by the
//! API server itself, whoever the client is.

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::core::ObjectMeta;
use serde_json::{Value, json};

use deploylock::crd::DeploymentLock;

use crate::support::{Identity, cluster, header_of, install_crd};

fn dynamic_api(client: kube::Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client,
        namespace,
        &ApiResource::erase::<DeploymentLock>(&()),
    )
}

/// A valid locked object, as JSON, for the tests to break one field at a time.
fn locked_object(name: &str) -> Value {
    json!({
        "apiVersion": "deploylock.dev/v1",
        "kind": "DeploymentLock",
        "metadata": { "name": name },
        "spec": {
            "environment": name,
            "fencingToken": 1,
            "holder": {
                "lockId": "0b8e6c7e-6d0e-4c61-9a55-3f1f1f1f1f1f",
                "user": "alice",
                "owner": "alice",
                "type": "manual",
                "reason": "Deploying version 2.1.0",
                "acquiredAt": "2026-11-27T10:00:00Z",
                "expiresAt": "2026-11-27T10:30:00Z",
                "durationSeconds": 1800,
                "deploymentId": "pipeline-42",
                "metadata": { "version": "2.1.0" }
            }
        }
    })
}

async fn create_raw(api: &Api<DynamicObject>, object: Value) -> Result<DynamicObject, kube::Error> {
    let object: DynamicObject = match serde_json::from_value(object) {
        Ok(object) => object,
        Err(err) => panic!("test object is not a Kubernetes object: {err}"),
    };
    api.create(&PostParams::default(), &object).await
}

/// Asserts the API server refused the object with 422 Invalid and a message
/// containing `expected`.
fn assert_refused(result: Result<DynamicObject, kube::Error>, expected: &str) {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "expected 422 Invalid, got {status:?}");
            assert!(
                status.message.contains(expected),
                "API server message {:?} does not mention {expected:?}",
                status.message
            );
        }
        Err(other) => panic!("expected an API server refusal, got {other}"),
        Ok(object) => panic!("the API server accepted an invalid object: {object:?}"),
    }
}

#[tokio::test]
async fn generated_crd_is_established_by_the_api_server() {
    let cluster = cluster();
    let client = cluster.client(Identity::Admin).await;
    // Applying again is idempotent and waits on a watch for Established.
    let crd = match install_crd(&client).await {
        Ok(crd) => crd,
        Err(err) => panic!("installing the CRD failed: {err}"),
    };
    let established = crd
        .status
        .and_then(|status| status.conditions)
        .unwrap_or_default()
        .into_iter()
        .any(|condition| condition.type_ == "Established" && condition.status == "True");
    assert!(established, "CRD is not Established");
    assert_eq!(crd.spec.names.short_names, Some(vec!["dlock".to_string()]));
}

#[tokio::test]
async fn lock_round_trips_through_the_api_server() {
    let cluster = cluster();
    let namespace = cluster.namespace("round-trip").await;
    let client = cluster.client(Identity::Admin).await;
    let api = dynamic_api(client.clone(), &namespace);
    if let Err(err) = create_raw(&api, locked_object("production")).await {
        panic!("valid object refused: {err}");
    }
    let typed: Api<DeploymentLock> = Api::namespaced(client, &namespace);
    let lock = match typed.get("production").await {
        Ok(lock) => lock,
        Err(err) => panic!("cannot read the lock back: {err}"),
    };
    assert_eq!(lock.spec.environment, "production");
    let holder = lock.spec.holder.as_ref();
    assert_eq!(
        holder.map(|h| h.reason.as_str()),
        Some("Deploying version 2.1.0")
    );
    assert_eq!(holder.map(|h| h.duration_seconds), Some(1800));
    assert_eq!(
        holder
            .and_then(|h| h.metadata.get("version"))
            .map(String::as_str),
        Some("2.1.0")
    );
}

#[tokio::test]
async fn available_lock_needs_no_holder() {
    let cluster = cluster();
    let namespace = cluster.namespace("available").await;
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);
    let lock = DeploymentLock {
        metadata: ObjectMeta {
            name: Some("staging".into()),
            ..ObjectMeta::default()
        },
        spec: deploylock::crd::DeploymentLockSpec {
            environment: "staging".into(),
            ..Default::default()
        },
        status: None,
    };
    let created = match api.create(&PostParams::default(), &lock).await {
        Ok(created) => created,
        Err(err) => panic!("available lock refused: {err}"),
    };
    assert!(created.spec.holder.is_none());
    assert_eq!(created.spec.fencing_token, 0);
}

#[tokio::test]
async fn api_server_refuses_invalid_locks() {
    let cluster = cluster();
    let namespace = cluster.namespace("invalid").await;
    let api = dynamic_api(cluster.client(Identity::Admin).await, &namespace);

    let mut bad_name = locked_object("production");
    bad_name["metadata"]["name"] = json!("Bad Name!");
    bad_name["spec"]["environment"] = json!("Bad Name!");
    assert_refused(create_raw(&api, bad_name).await, "metadata.name");

    let mut mismatched = locked_object("production");
    mismatched["spec"]["environment"] = json!("staging");
    assert_refused(
        create_raw(&api, mismatched).await,
        "spec.environment must equal metadata.name",
    );

    let mut negative_duration = locked_object("production");
    negative_duration["spec"]["holder"]["durationSeconds"] = json!(-5);
    assert_refused(create_raw(&api, negative_duration).await, "durationSeconds");

    let mut huge_duration = locked_object("production");
    huge_duration["spec"]["holder"]["durationSeconds"] = json!(6_000_000);
    assert_refused(create_raw(&api, huge_duration).await, "durationSeconds");

    let mut missing_reason = locked_object("production");
    if let Some(holder) = missing_reason["spec"]["holder"].as_object_mut() {
        holder.remove("reason");
    }
    assert_refused(
        create_raw(&api, missing_reason).await,
        "spec.holder.reason: Required value",
    );

    let mut blank_reason = locked_object("production");
    blank_reason["spec"]["holder"]["reason"] = json!("   ");
    assert_refused(
        create_raw(&api, blank_reason).await,
        "reason must not be blank",
    );

    let mut too_many_keys = locked_object("production");
    let many: serde_json::Map<String, Value> = (0..33)
        .map(|i| (format!("key{i}"), json!("value")))
        .collect();
    too_many_keys["spec"]["holder"]["metadata"] = Value::Object(many);
    assert_refused(
        create_raw(&api, too_many_keys).await,
        "spec.holder.metadata",
    );

    let mut long_value = locked_object("production");
    long_value["spec"]["holder"]["metadata"] = json!({ "notes": "x".repeat(1025) });
    assert_refused(create_raw(&api, long_value).await, "spec.holder.metadata");

    let mut bad_key = locked_object("production");
    bad_key["spec"]["holder"]["metadata"] = json!({ "bad key!": "value" });
    assert_refused(create_raw(&api, bad_key).await, "metadata keys must be");

    let mut backwards = locked_object("production");
    backwards["spec"]["holder"]["expiresAt"] = json!("2026-11-27T09:00:00Z");
    assert_refused(create_raw(&api, backwards).await, "expiresAt must be after");

    let mut bad_type = locked_object("production");
    bad_type["spec"]["holder"]["type"] = json!("sneaky");
    assert_refused(create_raw(&api, bad_type).await, "spec.holder.type");

    // None of the refused objects exists.
    let list = match api.list(&Default::default()).await {
        Ok(list) => list,
        Err(err) => panic!("cannot list: {err}"),
    };
    assert!(
        list.items.is_empty(),
        "refused objects were stored: {:?}",
        list.items
    );
}

#[tokio::test]
async fn api_server_refuses_invalid_updates() {
    let cluster = cluster();
    let namespace = cluster.namespace("invalid-update").await;
    let api = dynamic_api(cluster.client(Identity::Admin).await, &namespace);
    let created = match create_raw(&api, locked_object("production")).await {
        Ok(created) => created,
        Err(err) => panic!("valid object refused: {err}"),
    };

    let mut lowered = serde_json::to_value(&created).unwrap_or_default();
    lowered["spec"]["fencingToken"] = json!(0);
    let lowered: DynamicObject =
        serde_json::from_value(lowered).unwrap_or_else(|err| panic!("{err}"));
    match api
        .replace("production", &PostParams::default(), &lowered)
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422);
            assert!(
                status.message.contains("fencingToken never decreases"),
                "{}",
                status.message
            );
        }
        other => panic!("lowering the fencing token was not refused: {other:?}"),
    }
}

#[tokio::test]
async fn identities_are_authenticated_and_rbac_is_enforced() {
    let cluster = cluster();
    let namespace = cluster.namespace("identities").await;
    for identity in [
        Identity::Admin,
        Identity::Alice,
        Identity::Bob,
        Identity::Viewer,
        Identity::Controller,
    ] {
        let client = cluster.client(identity).await;
        let reviews: Api<SelfSubjectReview> = Api::all(client.clone());
        let review = match reviews
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await
        {
            Ok(review) => review,
            Err(err) => panic!("SelfSubjectReview as {identity:?}: {err}"),
        };
        let username = review
            .status
            .and_then(|status| status.user_info)
            .and_then(|user| user.username);
        assert_eq!(username.as_deref(), Some(identity.username()));
    }

    // RBAC is enforced: a viewer may read but not write.
    let viewer = dynamic_api(cluster.client(Identity::Viewer).await, &namespace);
    assert!(
        viewer.list(&Default::default()).await.is_ok(),
        "viewer cannot list"
    );
    match create_raw(&viewer, locked_object("production")).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("a viewer created a lock: {other:?}"),
    }
}

#[tokio::test]
async fn kubectl_shows_printer_columns_and_field_docs() {
    let cluster = cluster();
    let namespace = cluster.namespace("kubectl").await;
    let api = dynamic_api(cluster.client(Identity::Admin).await, &namespace);
    if let Err(err) = create_raw(&api, locked_object("production")).await {
        panic!("valid object refused: {err}");
    }

    let get = cluster.kubectl(Identity::Admin, &["get", "dlock", "-n", &namespace]);
    let stdout = String::from_utf8_lossy(&get.stdout);
    assert!(
        get.status.success(),
        "kubectl get failed: {}",
        String::from_utf8_lossy(&get.stderr)
    );
    let header = header_of(&stdout);
    assert_eq!(
        header,
        [
            "NAME", "STATE", "HOLDER", "OWNER", "REASON", "EXPIRES", "AGE"
        ]
    );
    assert!(stdout.contains("Deploying version 2.1.0"), "{stdout}");
    assert!(stdout.contains("2026-11-27T10:30:00Z"), "{stdout}");

    let explain = cluster.kubectl(Identity::Admin, &["explain", "deploymentlock.spec.holder"]);
    let stdout = String::from_utf8_lossy(&explain.stdout);
    assert!(
        explain.status.success(),
        "kubectl explain failed: {}",
        String::from_utf8_lossy(&explain.stderr)
    );
    assert!(stdout.contains("Why the lock is held"), "{stdout}");
    assert!(
        stdout.contains("Only this identity may release or extend it"),
        "{stdout}"
    );

    let version = cluster.kubectl(Identity::Admin, &["version", "-o", "json"]);
    let stdout = String::from_utf8_lossy(&version.stdout);
    assert!(stdout.contains("\"gitVersion\": \"v1.35"), "{stdout}");
}
