//! Prints a CRD manifest generated from the Rust types: the DeploymentLock
//! CRD, or with `notificationsubscriptions` / `freezewindows` /
//! `environmentbindings` those CRDs.

use std::process::ExitCode;

fn main() -> ExitCode {
    let which = std::env::args().nth(1);
    let generated = match which.as_deref() {
        None | Some("deploymentlocks") => deploylock::crdgen::crd_manifest_yaml(),
        Some("notificationsubscriptions") => deploylock::crdgen::subscription_crd_manifest_yaml(),
        Some("freezewindows") => deploylock::crdgen::window_crd_manifest_yaml(),
        Some("environmentbindings") => deploylock::crdgen::environment_binding_crd_manifest_yaml(),
        Some(other) => {
            eprintln!(
                "crdgen: unknown CRD {other:?}: use deploymentlocks, notificationsubscriptions, freezewindows or environmentbindings"
            );
            return ExitCode::from(2);
        }
    };
    match generated {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("crdgen: cannot serialise the CRD: {err}");
            ExitCode::FAILURE
        }
    }
}
