//! The chart ships copies of the admission policies in config/admission/
//! (Helm reads only files inside the chart): they must not drift apart.

use std::path::Path;

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

#[test]
fn the_charts_policies_are_the_configs() {
    for (config, chart) in [
        (
            "config/admission/policy.yaml",
            "charts/deploylock/files/admission-policy.yaml",
        ),
        (
            "config/admission/workload-gate.yaml",
            "charts/deploylock/files/workload-gate.yaml",
        ),
        (
            "config/rbac/environment-bindings.yaml",
            "charts/deploylock/files/environment-bindings-clusterrole.yaml",
        ),
    ] {
        assert!(
            read(config) == read(chart),
            "{chart} differs from {config}: copy {config} over it"
        );
    }
}
