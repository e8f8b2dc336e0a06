//! `kubectl deploylock`: the deploylock CLI as a kubectl plugin. kubectl runs
//! `kubectl-<name>` from PATH with the remaining arguments.

use std::process::ExitCode;

use deploylock::cli;

fn main() -> ExitCode {
    // Help and usage read as the user types it: `kubectl deploylock`.
    cli::main_as("kubectl deploylock")
}
