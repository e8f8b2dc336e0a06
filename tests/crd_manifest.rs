//! The committed CRD YAML must be exactly what the Rust types generate.

use deploylock::crdgen::{CRD_MANIFEST_PATH, crd_manifest_yaml};

#[test]
fn committed_crd_matches_the_rust_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(CRD_MANIFEST_PATH);
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
    let generated =
        crd_manifest_yaml().unwrap_or_else(|err| panic!("cannot generate the CRD: {err}"));
    assert!(
        committed == generated,
        "{} is out of date with src/crd.rs: run `make crds` and commit the result",
        CRD_MANIFEST_PATH
    );
}

/// The schema's bounds are the Rust constants the CLI checks input against:
/// a bound changed on one side only fails here.
#[test]
fn schema_bounds_are_the_rust_constants() {
    use deploylock::crd::{
        DeploymentLock, MAX_DURATION_SECONDS, MAX_ENVIRONMENT_LEN, MAX_HISTORY_ENTRIES, MAX_ID_LEN,
        MAX_METADATA_ENTRIES, MAX_METADATA_KEY_LEN, MAX_METADATA_VALUE_LEN, MAX_NAME_LEN,
        MAX_QUEUE_ENTRIES, MAX_REASON_LEN, MAX_SAFE_INTEGER, MIN_DURATION_SECONDS,
    };
    use deploylock::environment::{DNS_LABEL_PATTERN, MAX_DNS_LABEL_LEN};
    use kube::CustomResourceExt;
    use serde_json::{Value, json};

    let crd = serde_json::to_value(DeploymentLock::crd())
        .unwrap_or_else(|err| panic!("cannot serialize the CRD: {err}"));
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let at = |pointer: &str| -> &Value {
        spec.pointer(pointer)
            .unwrap_or_else(|| panic!("the schema has no {pointer}"))
    };
    let holder = "/properties/holder/properties";
    let waiter = "/properties/queue/items/properties";
    let entry = "/properties/history/items/properties";
    let overrode = "/properties/holder/properties/overrode/properties";
    let bounds: Vec<(String, Value)> = vec![
        (
            "/properties/environment/maxLength".into(),
            json!(MAX_ENVIRONMENT_LEN),
        ),
        (
            "/properties/environment/pattern".into(),
            json!(DNS_LABEL_PATTERN),
        ),
        (
            "/properties/fencingToken/maximum".into(),
            json!(MAX_SAFE_INTEGER),
        ),
        (
            "/properties/queue/maxItems".into(),
            json!(MAX_QUEUE_ENTRIES),
        ),
        (
            "/properties/history/maxItems".into(),
            json!(MAX_HISTORY_ENTRIES),
        ),
        (format!("{holder}/lockId/maxLength"), json!(MAX_ID_LEN)),
        (format!("{holder}/groupId/maxLength"), json!(MAX_ID_LEN)),
        (
            format!("{holder}/groupId/pattern"),
            json!("^[A-Za-z0-9-]+$"),
        ),
        (format!("{holder}/user/maxLength"), json!(MAX_NAME_LEN)),
        (format!("{holder}/owner/maxLength"), json!(MAX_NAME_LEN)),
        (
            format!("{holder}/deploymentId/maxLength"),
            json!(MAX_NAME_LEN),
        ),
        (format!("{holder}/reason/maxLength"), json!(MAX_REASON_LEN)),
        (
            format!("{holder}/durationSeconds/minimum"),
            json!(MIN_DURATION_SECONDS),
        ),
        (
            format!("{holder}/durationSeconds/maximum"),
            json!(MAX_DURATION_SECONDS),
        ),
        (
            format!("{holder}/metadata/maxProperties"),
            json!(MAX_METADATA_ENTRIES),
        ),
        (
            format!("{holder}/metadata/additionalProperties/maxLength"),
            json!(MAX_METADATA_VALUE_LEN),
        ),
        (format!("{overrode}/lockId/maxLength"), json!(MAX_ID_LEN)),
        (
            format!("{overrode}/reason/maxLength"),
            json!(MAX_REASON_LEN),
        ),
        (format!("{waiter}/id/maxLength"), json!(MAX_ID_LEN)),
        (format!("{waiter}/owner/maxLength"), json!(MAX_NAME_LEN)),
        (format!("{waiter}/reason/maxLength"), json!(MAX_REASON_LEN)),
        (format!("{entry}/lockId/maxLength"), json!(MAX_ID_LEN)),
        (format!("{entry}/by/maxLength"), json!(MAX_NAME_LEN)),
        (format!("{entry}/reason/maxLength"), json!(MAX_REASON_LEN)),
        (format!("{entry}/sequence/maximum"), json!(MAX_SAFE_INTEGER)),
    ];
    for (pointer, expected) in &bounds {
        let found = at(pointer);
        // schemars writes integer bounds as floats (2^53-1 is exact in both).
        match (found.as_f64(), expected.as_f64()) {
            (Some(found), Some(expected)) => assert_eq!(found, expected, "schema {pointer}"),
            _ => assert_eq!(found, expected, "schema {pointer}"),
        }
    }
    // The CEL rule on metadata keys spells its bound as a literal.
    let rule = at(&format!(
        "{holder}/metadata/x-kubernetes-validations/0/rule"
    ));
    let rule = rule.as_str().unwrap_or_default();
    assert!(
        rule.contains(&format!("k.size() <= {MAX_METADATA_KEY_LEN} ")),
        "metadata key rule: {rule}"
    );
    // An environment is the object's name: a DNS-1123 label.
    assert_eq!(MAX_ENVIRONMENT_LEN, MAX_DNS_LABEL_LEN);
}

/// Free text shown to others: the admission policy's pattern is
/// DISPLAY_TEXT_PATTERN, the CLI's check (`is_display_text`) admits exactly
/// what the pattern admits, and the FreezeWindow schema (whose reason
/// becomes a holding's) uses it too.
#[test]
fn display_text_rule_is_one_rule_everywhere() {
    use deploylock::crd::{DISPLAY_TEXT_PATTERN, is_display_text};
    use kube::CustomResourceExt;

    let policy = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/admission/policy.yaml"),
    )
    .unwrap_or_else(|err| panic!("cannot read the policy: {err}"));
    assert!(
        policy.contains(&format!("r'{DISPLAY_TEXT_PATTERN}'")),
        "config/admission/policy.yaml does not use DISPLAY_TEXT_PATTERN as its displayText"
    );
    let window = serde_json::to_value(deploylock::windows::FreezeWindow::crd())
        .unwrap_or_else(|err| panic!("cannot serialize the FreezeWindow CRD: {err}"));
    assert_eq!(
        window.pointer(
            "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/reason/pattern"
        ),
        Some(&serde_json::json!(DISPLAY_TEXT_PATTERN)),
        "FreezeWindow spec.reason pattern"
    );
    let pattern = regex::Regex::new(DISPLAY_TEXT_PATTERN)
        .unwrap_or_else(|err| panic!("DISPLAY_TEXT_PATTERN: {err}"));
    let samples = (0u32..0x3000).chain([0xFEFF, 0xFFFD, 0x1F680, 0x10FFFF]);
    for code in samples.filter_map(char::from_u32) {
        let text = format!("a{code}b");
        assert_eq!(
            is_display_text(&text),
            pattern.is_match(&text),
            "U+{:04X}: is_display_text and the pattern disagree",
            u32::from(code)
        );
    }
    assert!(!is_display_text("\u{1b}[2J"));
    assert!(is_display_text("Déploiement 2.1 🚀"));
}

/// The policy's cap on one user's places in a queue is the rules' constant.
#[test]
fn queue_places_per_user_are_one_number_everywhere() {
    use deploylock::crd::MAX_QUEUE_PLACES_PER_USER;
    let policy = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/admission/policy.yaml"),
    )
    .unwrap_or_else(|err| panic!("cannot read the policy: {err}"));
    assert!(
        policy.contains(&format!(
            "size(variables.newQueue.filter(w, w.user == variables.user)) <= {MAX_QUEUE_PLACES_PER_USER})"
        )) && policy.contains(&format!(
            "one user holds at most {MAX_QUEUE_PLACES_PER_USER} places"
        )),
        "config/admission/policy.yaml does not cap a user's places at MAX_QUEUE_PLACES_PER_USER"
    );
}
