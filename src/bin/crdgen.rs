//! Prints the DeploymentLock CRD manifest generated from the Rust types.

use std::process::ExitCode;

fn main() -> ExitCode {
    match deploylock::crdgen::crd_manifest_yaml() {
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
