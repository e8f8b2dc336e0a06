//! `deploylock`: acquire, release, inspect and wait for deployment locks.
//! Also usable as a kubectl plugin (`kubectl deploylock`).

use std::process::ExitCode;

use deploylock::cli;

fn main() -> ExitCode {
    let cli = match cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    // Only deploylock's own logs: every failure reaches the user as one
    // message from cli::report, not as a library's log line.
    let level = if cli.global.verbose {
        "deploylock=debug"
    } else {
        "deploylock=warn"
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEPLOYLOCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("deploylock: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(cli::run(cli))
}
