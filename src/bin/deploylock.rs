//! `deploylock`: acquire, release, inspect and wait for deployment locks.
//! Also usable as a kubectl plugin (`kubectl deploylock`).

use std::process::ExitCode;

use deploylock::cli;

fn main() -> ExitCode {
    cli::main()
}
