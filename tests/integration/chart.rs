//! The Helm chart, checked with the pinned helm against the real control
//! plane: lint, schema, server-side dry run of every rendered object whose
//! kind this control plane serves, install and uninstall.

use std::process::{Command, Output};

use crate::support::{ExtraCluster, Identity, chart_dir, cluster, helm, ok, repo_root};

fn kinds(rendered: &str) -> Vec<String> {
    rendered
        .lines()
        .filter_map(|line| line.strip_prefix("kind: "))
        .map(str::to_string)
        .collect()
}

/// `kubectl apply --dry-run=server` of a rendered manifest as the admin.
fn server_dry_run(manifest: &str) -> Output {
    cluster().kubectl_with_input(
        Identity::Admin,
        &["apply", "--dry-run=server", "-f", "-"],
        manifest,
    )
}

#[tokio::test]
async fn chart_lints_and_refuses_bad_values() {
    let lint = helm(None, &["lint", &chart_dir(), "--strict"]);
    ok(&lint, "helm lint");
    // A real file, not a symlink to crds/ (helm warns about those), kept
    // identical to the generated CRD.
    let lint_text = format!(
        "{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    assert!(!lint_text.contains("symlink"), "{lint_text}");
    for crd in [
        "deploymentlocks.deploylock.dev.yaml",
        "notificationsubscriptions.deploylock.dev.yaml",
        "environmentbindings.deploylock.dev.yaml",
    ] {
        let chart_crd = repo_root().join("charts/deploylock/crds").join(crd);
        assert!(
            !chart_crd
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink()),
            "the chart's {crd} is a symlink"
        );
        assert_eq!(
            std::fs::read_to_string(&chart_crd).ok(),
            std::fs::read_to_string(repo_root().join("crds").join(crd)).ok(),
            "charts/deploylock/crds/{crd} differs from crds/ (make crds copies it)"
        );
    }
    // helm built with upstream's version flags renders without --kube-version
    // (the chart's kubeVersion is >=1.30).
    ok(
        &helm(None, &["template", "deploylock", &chart_dir()]),
        "helm template without --kube-version",
    );
    // A parent chart's `global` values are accepted.
    ok(
        &helm(
            None,
            &[
                "lint",
                &chart_dir(),
                "--set",
                "global.imageRegistry=example",
            ],
        ),
        "helm lint with global values",
    );
    // One replica: no PodDisruptionBudget that would block every drain.
    let single = ok(
        &helm(
            None,
            &[
                "template",
                "deploylock",
                &chart_dir(),
                "--set",
                "replicaCount=1",
            ],
        ),
        "helm template with one replica",
    );
    assert!(!kinds(&single).iter().any(|k| k == "PodDisruptionBudget"));
    // Aggregating deploylock-admin into `admin` is an explicit choice.
    let default = ok(
        &helm(None, &["template", "deploylock", &chart_dir()]),
        "helm template",
    );
    assert!(!default.contains("aggregate-to-admin"), "{default}");
    let aggregated = ok(
        &helm(
            None,
            &[
                "template",
                "deploylock",
                &chart_dir(),
                "--set",
                "rbac.aggregateAdminToAdmin=true",
            ],
        ),
        "helm template with admin aggregation",
    );
    assert!(aggregated.contains("rbac.authorization.k8s.io/aggregate-to-admin: \"true\""));
    // The controller's Lease rights: a Role in its own namespace, not cluster-wide.
    for doc in default.split("\n---") {
        if doc.contains("kind: ClusterRole\n") {
            assert!(
                !doc.contains("leases"),
                "a ClusterRole grants Leases: {doc}"
            );
        }
    }
    let all_on = helm(
        None,
        &[
            "lint",
            &chart_dir(),
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "workloadGate.enabled=true",
            "--set",
            "workloadGate.environments[0].name=production",
        ],
    );
    ok(&all_on, "helm lint with every option on");
    for bad in [
        "replicaCount=0",
        "controller.logFormat=xml",
        "image.pullPolicy=Sometimes",
        "typo=1",
        "workloadGate.environments[0].name=Not_A_Name",
        "workloadGate.environments[0].namespaces={shop}",
    ] {
        let output = helm(None, &["lint", &chart_dir(), "--set", bad]);
        assert!(
            !output.status.success(),
            "bad value {bad} passed the schema"
        );
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("schema"), "{bad}: {text}");
    }
}

#[tokio::test]
async fn rendered_chart_passes_server_side_dry_run() {
    let cluster = cluster();
    let namespace = cluster.namespace("chart-dry-run").await;
    let render = |extra: &[&str]| {
        let mut args = vec![
            "template",
            "deploylock",
            &chart_dir(),
            "--namespace",
            &namespace,
            "--include-crds",
            "--kube-version",
            "1.35.4",
        ]
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&helm(None, &args), "helm template")
    };
    let default = render(&[]);
    let mut expected = [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ];
    expected.sort();
    let mut found = kinds(&default);
    found.sort();
    found.dedup();
    assert_eq!(found, expected);
    ok(
        &server_dry_run(&default),
        "server-side dry run of the default chart",
    );

    let all_on = render(&[
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "workloadGate.enabled=true",
        "--set",
        "workloadGate.environments[0].name=production",
        "--set",
        "workloadGate.environments[0].namespaces={shop,payments}",
        "--set",
        "workloadGate.environments[1].name=staging",
        "--set",
        "workloadGate.environmentBindings=true",
    ]);
    assert!(
        all_on.contains("- --environment-bindings")
            && all_on.contains("name: deploylock-controller-environment-bindings"),
        "workloadGate.environmentBindings adds the flag and the controller's role"
    );
    let all_kinds = kinds(&all_on);
    assert_eq!(
        all_kinds
            .iter()
            .filter(|k| *k == "ValidatingAdmissionPolicyBinding")
            .count(),
        4,
        "the lock policy's and stop-the-line's bindings, and one workload gate binding per environment"
    );
    assert!(all_kinds.iter().any(|k| k == "ServiceMonitor"));
    assert!(all_kinds.iter().any(|k| k == "PrometheusRule"));
    // This control plane has no Prometheus operator CRDs: those two objects
    // are checked for shape only; everything else goes to the API server.
    let served: Vec<&str> = all_on
        .split("\n---")
        .filter(|doc| {
            !doc.contains("kind: ServiceMonitor") && !doc.contains("kind: PrometheusRule")
        })
        .collect();
    ok(
        &server_dry_run(&served.join("\n---")),
        "server-side dry run with every option on",
    );
    for doc in all_on
        .split("\n---")
        .filter(|doc| doc.contains("monitoring.coreos.com"))
    {
        let parsed: Result<serde_yaml::Value, _> = serde_yaml::from_str(doc);
        assert!(parsed.is_ok(), "not YAML: {doc}");
    }
}

#[tokio::test]
async fn helm_install_creates_everything_and_uninstall_removes_it() {
    // A fresh control plane: the shared one already has deploylock's roles.
    let extra = ExtraCluster::start("helm");
    let kubeconfig = extra.admin_kubeconfig();
    let install = helm(
        Some(&kubeconfig),
        &[
            "install",
            "deploylock",
            &chart_dir(),
            "--namespace",
            "deploylock-system",
            "--create-namespace",
        ],
    );
    ok(&install, "helm install");
    let kubectl = |args: &[&str]| -> Output {
        match Command::new(cluster().bin_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .output()
        {
            Ok(output) => output,
            Err(err) => panic!("kubectl: {err}"),
        }
    };
    // No nodes run Pods here: the Deployment exists but has no ready replicas.
    for object in [
        "crd/deploymentlocks.deploylock.dev",
        "clusterrole/deploylock-viewer",
        "clusterrole/deploylock-user",
        "clusterrole/deploylock-admin",
        "clusterrole/deploylock-controller",
        "clusterrolebinding/deploylock-controller",
        "validatingadmissionpolicy/deploylock.dev",
        "validatingadmissionpolicybinding/deploylock.dev",
        "validatingadmissionpolicy/deploylock.dev-stop-the-line",
        "validatingadmissionpolicybinding/deploylock.dev-stop-the-line",
    ] {
        ok(&kubectl(&["get", object]), object);
    }
    for object in [
        "deployment/deploylock",
        "serviceaccount/deploylock",
        "service/deploylock-metrics",
        "poddisruptionbudget/deploylock",
    ] {
        ok(
            &kubectl(&["get", "-n", "deploylock-system", object]),
            object,
        );
    }
    let replicas = ok(
        &kubectl(&[
            "get",
            "-n",
            "deploylock-system",
            "deployment/deploylock",
            "-o",
            "jsonpath={.spec.replicas}",
        ]),
        "replicas",
    );
    assert_eq!(replicas, "2");

    ok(
        &helm(
            Some(&kubeconfig),
            &[
                "uninstall",
                "deploylock",
                "--namespace",
                "deploylock-system",
                "--wait",
            ],
        ),
        "helm uninstall",
    );
    for object in [
        "clusterrole/deploylock-admin",
        "validatingadmissionpolicy/deploylock.dev",
    ] {
        assert!(
            !kubectl(&["get", object]).status.success(),
            "{object} survived uninstall"
        );
    }
    assert!(
        !kubectl(&["get", "-n", "deploylock-system", "deployment/deploylock"])
            .status
            .success(),
        "the Deployment survived uninstall"
    );
    // Helm never deletes CRDs from crds/ (it would delete every lock): kept.
    ok(
        &kubectl(&["get", "crd/deploymentlocks.deploylock.dev"]),
        "CRD kept",
    );
}
