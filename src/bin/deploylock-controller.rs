//! deploylock-controller: expires DeploymentLocks on time, records Events and
//! serves metrics. Its reconciler lands with the controller issue; until then
//! it answers --help and --version only.

use clap::Parser;

/// Controller for DeploymentLocks (deploylock.dev/v1).
#[derive(Parser, Debug)]
#[command(name = "deploylock-controller", version, about)]
struct Args {}

fn main() {
    let _args = Args::parse();
    eprintln!("deploylock-controller: the reconciler is not implemented yet");
    std::process::exit(1);
}
