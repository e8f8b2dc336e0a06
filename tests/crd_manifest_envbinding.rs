//! The committed EnvironmentBinding CRD YAML (and the chart's copy) must be
//! exactly what the Rust types generate.

use deploylock::crdgen::{
    ENVIRONMENT_BINDING_CRD_MANIFEST_PATH, environment_binding_crd_manifest_yaml,
};

#[test]
fn committed_environment_binding_crd_matches_the_rust_types() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = ENVIRONMENT_BINDING_CRD_MANIFEST_PATH;
    let generated = environment_binding_crd_manifest_yaml()
        .unwrap_or_else(|err| panic!("cannot generate {path}: {err}"));
    for file in [root.join(path), root.join("charts/deploylock").join(path)] {
        let committed = std::fs::read_to_string(&file)
            .unwrap_or_else(|err| panic!("cannot read {}: {err}", file.display()));
        assert!(
            committed == generated,
            "{} is out of date with src/envbinding/mod.rs: run `make crds` and commit the result",
            file.display()
        );
    }
}
