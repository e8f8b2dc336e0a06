//! The committed NotificationSubscription and FreezeWindow CRD YAML (and the
//! chart's copies) must be exactly what the Rust types generate.

use deploylock::crdgen::{
    SUBSCRIPTION_CRD_MANIFEST_PATH, WINDOW_CRD_MANIFEST_PATH, subscription_crd_manifest_yaml,
    window_crd_manifest_yaml,
};

#[test]
fn committed_subscription_and_window_crds_match_the_rust_types() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifests = [
        (
            SUBSCRIPTION_CRD_MANIFEST_PATH,
            subscription_crd_manifest_yaml(),
            "src/notify/mod.rs",
        ),
        (
            WINDOW_CRD_MANIFEST_PATH,
            window_crd_manifest_yaml(),
            "src/windows/mod.rs",
        ),
    ];
    for (path, generated, source) in manifests {
        let generated = generated.unwrap_or_else(|err| panic!("cannot generate {path}: {err}"));
        for file in [root.join(path), root.join("charts/deploylock").join(path)] {
            let committed = std::fs::read_to_string(&file)
                .unwrap_or_else(|err| panic!("cannot read {}: {err}", file.display()));
            assert!(
                committed == generated,
                "{} is out of date with {source}: run `make crds` and commit the result",
                file.display()
            );
        }
    }
}
