//! The committed FreezeWindow CRD YAML (and the chart's copy)
//! must be exactly what the Rust types generate.

use deploylock::crdgen::{WINDOW_CRD_MANIFEST_PATH, window_crd_manifest_yaml};

#[test]
fn committed_window_crd_matches_the_rust_types() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let generated =
        window_crd_manifest_yaml().unwrap_or_else(|err| panic!("cannot generate the CRD: {err}"));
    for path in [
        root.join(WINDOW_CRD_MANIFEST_PATH),
        root.join("charts/deploylock")
            .join(WINDOW_CRD_MANIFEST_PATH),
    ] {
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
        assert!(
            committed == generated,
            "{} is out of date with src/windows/mod.rs: run `make crds` and commit the result",
            path.display()
        );
    }
}
