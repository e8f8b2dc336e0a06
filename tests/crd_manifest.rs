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
