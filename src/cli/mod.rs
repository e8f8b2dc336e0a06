//! The `deploylock` command line: parse, call the library, report. The
//! arguments are in [`args`], the lock protocol in [`crate::queue`] and
//! [`crate::store`], what is printed in [`show`], [`progress`] and
//! [`report`] (the one place errors become messages and exit codes).

/// Writes to stdout, ignoring a closed pipe (`deploylock list | head -1`):
/// what the reader stopped reading is not an error.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod args;
pub mod complete;
mod exec;
mod generated;
pub mod input;
mod multi;
pub mod progress;
pub mod render;
pub mod report;
mod show;
mod writes;

use std::io::IsTerminal;
use std::process::ExitCode;

use chrono::Utc;

use crate::crd::{LockState, LockType};
use crate::error::Error;
use crate::queue::{self, interruptible};
use crate::rules;
use crate::signals::Signals;
use crate::store::{ConnectOptions, LockStore, ServerClock, connect};

pub use args::{
    AcquireArgs, Action, Cli, ExecArgs, ExtendArgs, ForceReleaseArgs, GlobalArgs, HoldingArgs,
    ListArgs, QueueOrder, WaitArgs, parse,
};
use progress::WaitProgress;
use render::OutputFormat;
use report::Exit;

/// The whole program: parse, log setup, run. Shared by `deploylock` and the
/// kubectl plugin `kubectl-deploylock`.
pub fn main() -> ExitCode {
    main_as("deploylock")
}

/// [`main`], with `bin_name` as help and usage name the program
/// (`kubectl deploylock` for the plugin).
pub fn main_as(bin_name: &'static str) -> ExitCode {
    // exec's watchdog is this binary run again with a hidden argument.
    if let Some(code) = crate::exec::watchdog_main_if_requested() {
        return code;
    }
    // A shell asking for completions (DEPLOYLOCK_COMPLETE=SHELL).
    if let Some(code) = complete::main_if_requested() {
        return code;
    }
    let cli = match args::parse_as(bin_name) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if let Some(code) = generated::print(&cli.action) {
        return code;
    }
    init_logging(cli.global.verbose);
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
    runtime.block_on(run(cli))
}

/// Only deploylock's own logs: every failure reaches the user as one
/// message from cli::report, not as a library's log line.
fn init_logging(verbose: bool) {
    let level = if verbose {
        "deploylock=debug"
    } else {
        "deploylock=warn"
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEPLOYLOCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .init();
}

/// Runs one action and returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    // From the very start: Ctrl-C and SIGTERM end every action at any moment
    // (connecting included), and no signal can end exec between acquiring
    // and releasing.
    let mut signals = Signals::new();
    let mut clock = None;
    // The environment acted on, once known (--all-environments may find one).
    let mut global = cli.global.clone();
    match execute(&cli, &mut signals, &mut clock, &mut global.environment).await {
        Ok(exit) => exit.into(),
        Err(err) => {
            let now = clock.as_ref().and_then(ServerClock::now);
            report::print_failure(&err, &global, now.unwrap_or_else(Utc::now)).into()
        }
    }
}

/// Connects, then runs the action.
async fn execute(
    cli: &Cli,
    signals: &mut Signals,
    clock: &mut Option<ServerClock>,
    acted_on: &mut crate::environment::Environment,
) -> Result<Exit, Error> {
    // Refuse incomplete requests before touching the cluster.
    if let Action::Exec(args) = &cli.action {
        exec::check(args)?;
    }
    multi::check(cli)?;
    let mut global = cli.global.clone();
    let options = ConnectOptions {
        kubeconfig: global.kubeconfig.clone(),
        context: global.context.clone(),
        namespace: global.namespace.clone(),
    };
    let (client, namespace) = interruptible(signals, connect(&options)).await?;
    // The kubeconfig's namespace is checked like -n's: it goes into every path.
    input::namespace(&namespace).map_err(|message| {
        Error::InvalidInput(format!(
            "{message} (from the kubeconfig context; pick another with -n/--namespace)"
        ))
    })?;
    let store = LockStore::new(client, &namespace);
    *clock = Some(store.server_clock());
    match interruptible(signals, multi::targets(&store, cli)).await? {
        multi::Targets::One(environment) => {
            acted_on.clone_from(&environment);
            global.environment = environment;
        }
        several => return multi::run(&store, cli, several, signals).await,
    }
    let global = &global;
    match &cli.action {
        Action::Acquire(args) if !args.extend => {
            let applied =
                writes::take_lock(&store, global, args, LockType::Manual, signals).await?;
            show::applied(global, &applied, "acquired")
        }
        Action::Exec(args) => exec::run(&store, global, args, signals).await,
        Action::Wait(args) => {
            let deadline = args::deadline_after(args.wait_timeout);
            let mut progress = WaitProgress::new(&global.environment);
            let waited =
                queue::wait_until_free(&store, &global.environment, deadline, &mut progress);
            let observed = interruptible(signals, waited).await?;
            if global.output != OutputFormat::Table {
                show::view(global, &observed, false);
            }
            Ok(Exit::Success)
        }
        action => interruptible(signals, one_shot(&store, global, action)).await,
    }
}

/// The actions that make one request or two and do not wait.
async fn one_shot(store: &LockStore, global: &GlobalArgs, action: &Action) -> Result<Exit, Error> {
    let env = &global.environment;
    match action {
        Action::Acquire(args) => writes::renew(store, global, args.duration).await,
        Action::Exec(_) | Action::Wait(_) => Err(Error::Api("not a one-shot action".into())),
        // Answered by `main` without a cluster.
        Action::Completion { .. } | Action::Man { .. } => Ok(Exit::Success),
        Action::Release(args) => writes::release(store, global, args).await,
        Action::ForceRelease(args) => {
            writes::force_release(store, global, args.reason.clone()).await
        }
        Action::Extend(args) => {
            let lock_id = args.holding.lock_id.clone();
            writes::extend(store, global, args.duration, lock_id).await
        }
        Action::Status => {
            show::status(store, global, &store.read(env).await?).await;
            Ok(Exit::Success)
        }
        Action::Notify(crate::notify::cli::NotifyAction::Test { name }) => {
            match crate::notify::cli::test(store.client(), store.namespace(), env, name).await {
                Ok(line) => {
                    outln!("{line}");
                    Ok(Exit::Success)
                }
                Err(err) => {
                    eprintln!("deploylock: {err}");
                    Ok(Exit::Failure)
                }
            }
        }
        Action::History => {
            show::history(global, &store.read(env).await?);
            Ok(Exit::Success)
        }
        Action::Windows(args) => {
            let windows =
                crate::windows::cli::list(store.client(), store.namespace(), args.all_namespaces)
                    .await
                    .map_err(|err| Error::from_kube(err, store.namespace()))?;
            show::windows(
                global,
                &windows,
                store.server_clock().now(),
                args.all_namespaces,
            );
            Ok(Exit::Success)
        }
        Action::List(args) => {
            let mut listing = store.list(args.all_namespaces).await?;
            // Active locks only, unless --all: what the seed's `list` shows.
            if !args.all {
                let now = listing.server_time;
                listing
                    .locks
                    .retain(|lock| rules::state_at(&lock.spec, now) != LockState::Available);
            }
            Ok(show::list(global, store, &listing, args.all_namespaces))
        }
    }
}
