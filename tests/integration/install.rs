//! `make install` (hack/install.sh) on an empty cluster: it installs the
//! admission policy with the CRD and the roles, so enforcement is on from the
//! first lock, and it says that writes need the controller's clock.

use std::path::Path;
use std::process::{Child, Command, Output};

use crate::support::{ExtraCluster, cluster, expect_exit, repo_root, stderr_of, stdout_of};

fn run(command: &mut Command, what: &str) -> Output {
    match command.output() {
        Ok(output) => output,
        Err(err) => panic!("cannot run {what}: {err}"),
    }
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Output {
    run(
        Command::new(cluster().bin_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args),
        "kubectl",
    )
}

fn deploylock(kubeconfig: &Path, args: &[&str]) -> Output {
    run(
        Command::new(env!("CARGO_BIN_EXE_deploylock"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["-n", "default"])
            .args(args)
            .env_remove("KUBECONFIG"),
        "deploylock",
    )
}

/// The controller as `make install`'s note tells a user to run it; killed on drop.
struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn make_install_enforces_the_policy_from_the_first_lock() {
    let extra = ExtraCluster::start("install");
    let admin = extra.admin_kubeconfig();
    let alice = extra.dir.join("kubeconfigs/alice.kubeconfig");
    let bob = extra.dir.join("kubeconfigs/bob.kubeconfig");
    let kubectl_path = cluster().bin_dir().join("kubectl");

    let install = run(
        Command::new(repo_root().join("hack/install.sh"))
            .arg(&kubectl_path)
            .env("KUBECONFIG", &admin),
        "hack/install.sh",
    );
    expect_exit(&install, 0, "hack/install.sh");
    assert!(
        stdout_of(&install).contains("enforcement ON"),
        "install must say that enforcement is on: {}",
        stdout_of(&install)
    );
    for object in [
        "crd/deploymentlocks.deploylock.dev",
        "namespace/deploylock-system",
        "clusterrole/deploylock-user",
        "clusterrole/deploylock-admin",
        "clusterrole/deploylock-controller",
        "validatingadmissionpolicy/deploylock.dev",
        "validatingadmissionpolicybinding/deploylock.dev",
        "validatingadmissionpolicy/deploylock.dev-stop-the-line",
        "validatingadmissionpolicybinding/deploylock.dev-stop-the-line",
        "validatingadmissionpolicy/deploylock.dev-workload-gate",
        "clusterrole/deploylock-deployer",
    ] {
        expect_exit(&kubectl(&admin, &["get", object]), 0, object);
    }
    let bindings = repo_root().join("config/dev/bindings.yaml");
    expect_exit(
        &kubectl(&admin, &["apply", "-f", &bindings.display().to_string()]),
        0,
        "bind the local identities",
    );
    let awaited = run(
        Command::new(repo_root().join("hack/await-admission.sh"))
            .arg(&kubectl_path)
            .arg(&admin)
            .arg("default"),
        "hack/await-admission.sh",
    );
    expect_exit(&awaited, 0, "the policy is enforced");

    // No controller yet: the policy has no clock, and the CLI says why.
    let early = deploylock(
        &alice,
        &["acquire", "-e", "production", "--reason", "first"],
    );
    expect_exit(&early, 5, "acquire before any controller ran");
    assert!(
        stderr_of(&early).contains("clock Lease"),
        "the refusal must point at the missing controller: {}",
        stderr_of(&early)
    );

    let controller = Controller(
        match Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(env!("CARGO_BIN_EXE_deploylock-controller"))
            .arg("--kubeconfig")
            .arg(extra.dir.join("kubeconfigs/controller.kubeconfig"))
            .args(["--lease-namespace", "deploylock-system"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(err) => panic!("cannot start deploylock-controller: {err}"),
        },
    );
    expect_exit(
        &kubectl(
            &admin,
            &[
                "wait",
                "--for=create",
                "lease/deploylock-clock",
                "-n",
                "deploylock-system",
                "--timeout=60s",
            ],
        ),
        0,
        "the controller writes the policy's clock",
    );

    let acquired = deploylock(
        &alice,
        &["acquire", "-e", "production", "--reason", "Deploying 2.1.0"],
    );
    expect_exit(&acquired, 0, "alice acquires once the controller runs");

    // bob, an ordinary user, edits the lock with kubectl: refused, unchanged.
    let patched = kubectl(
        &bob,
        &[
            "patch",
            "deploymentlock",
            "production",
            "-n",
            "default",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"holder":{"user":"bob","owner":"bob","reason":"mine now"}}}"#,
        ],
    );
    assert!(!patched.status.success(), "bob's patch was admitted");
    assert!(
        stderr_of(&patched).contains("denied request"),
        "the admission policy must refuse bob's patch: {}",
        stderr_of(&patched)
    );
    let deleted = kubectl(
        &bob,
        &["delete", "deploymentlock", "production", "-n", "default"],
    );
    assert!(!deleted.status.success(), "bob's delete was admitted");
    let holder = kubectl(
        &admin,
        &[
            "get",
            "deploymentlock",
            "production",
            "-n",
            "default",
            "-o",
            "jsonpath={.spec.holder.user}",
        ],
    );
    assert_eq!(stdout_of(&holder), "alice", "the lock changed hands");
    drop(controller);
}
