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
mod exec;
pub mod input;
pub mod progress;
pub mod render;
pub mod report;
mod show;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration as StdDuration;

use chrono::Utc;
use clap::CommandFactory;
use tokio::time::Instant;

use crate::crd::{LockState, LockType};
use crate::error::Error;
use crate::queue::{self, TakeRequest, interruptible};
use crate::rules::{self, Actor, Request};
use crate::signals::Signals;
use crate::store::{Applied, ConnectOptions, LockStore, ServerClock, connect};

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
    let cli = match args::parse_as(bin_name) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if let Some(code) = print_generated(&cli.action) {
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

/// Completions and the man page, answered without a cluster.
fn print_generated(action: &Action) -> Option<ExitCode> {
    // Generated into memory first: a closed pipe (`| head`) must not panic.
    let generated = match action {
        Action::Completion { shell } => {
            let mut buffer = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "deploylock", &mut buffer);
            Ok(buffer)
        }
        Action::Man { dir: Some(dir) } => {
            return Some(match write_man_pages(dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!(
                        "deploylock: cannot write the man pages into {}: {err}",
                        dir.display()
                    );
                    ExitCode::FAILURE
                }
            });
        }
        Action::Man { dir: None } => {
            let mut buffer = Vec::new();
            // As `man --dir` writes it: no page for `help` to name.
            clap_mangen::Man::new(Cli::command().disable_help_subcommand(true))
                .render(&mut buffer)
                .map(|()| buffer)
        }
        _ => return None,
    };
    use std::io::Write;
    let written = generated.and_then(|buffer| std::io::stdout().write_all(&buffer));
    Some(match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("deploylock: cannot write the output: {err}");
            ExitCode::FAILURE
        }
    })
}

/// deploylock.1 and one page per action (deploylock-acquire.1, …: the
/// pages the main page's SEE ALSO names), each with its options.
fn write_man_pages(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)
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
    match execute(&cli, &mut signals, &mut clock).await {
        Ok(exit) => exit.into(),
        Err(err) => {
            // Refusals name times relative to now: the API server's now.
            let now = clock
                .as_ref()
                .and_then(ServerClock::now)
                .unwrap_or_else(Utc::now);
            let global = &cli.global;
            let scope = report::scope_flags(
                global.namespace.as_deref(),
                global.context.as_deref(),
                global.kubeconfig.as_deref(),
            );
            let env = &global.environment;
            let (message, exit) = report::describe_for(&err, env, &scope, now);
            eprintln!("deploylock: {message}");
            if global.output != OutputFormat::Table && report::is_refusal(&err) {
                let report = report::ErrorReport::new(&err, env, &scope, now);
                out!("{}", render::structured(&report, global.output));
            }
            exit.into()
        }
    }
}

/// Connects, then runs the action.
async fn execute(
    cli: &Cli,
    signals: &mut Signals,
    clock: &mut Option<ServerClock>,
) -> Result<Exit, Error> {
    let global = &cli.global;
    // Refuse incomplete requests before touching the cluster.
    if let Action::Exec(args) = &cli.action {
        exec::check(args)?;
    }
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
    match &cli.action {
        Action::Acquire(args) if !args.extend => {
            let applied = take_lock(&store, global, args, LockType::Manual, signals).await?;
            show::applied(global, &applied, "acquired")
        }
        Action::Exec(args) => exec::run(&store, global, args, signals).await,
        Action::Wait(args) => {
            let deadline = args
                .wait_timeout
                .map(|seconds| Instant::now() + StdDuration::from_secs(seconds));
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
        Action::Acquire(args) => renew(store, global, args.duration).await,
        Action::Exec(_) | Action::Wait(_) => Err(Error::Api("not a one-shot action".into())),
        // Answered by `main` without a cluster.
        Action::Completion { .. } | Action::Man { .. } => Ok(Exit::Success),
        Action::Release(args) => {
            let lock_id = match &args.deployment_id {
                None => args.holding.lock_id.clone(),
                // That holding's lock ID, so the release is refused if the
                // holding ends before the write lands.
                Some(deployment_id) => {
                    let observed = store.read(env).await?;
                    match show::holding_of_deployment(&observed, deployment_id) {
                        Some(lock_id) => Some(lock_id),
                        None => return Ok(show::not_held_by(global, &observed, deployment_id)),
                    }
                }
            };
            let actor = Actor::new(store.whoami().await?, None);
            let applied = store
                .apply(env, &Request::Release { actor, lock_id })
                .await?;
            show::applied(global, &applied, "released")
        }
        Action::ForceRelease(args) => {
            let actor = Actor::new(store.whoami().await?, None);
            let reason = args.reason.clone();
            let request = Request::ForceRelease { actor, reason };
            show::applied(global, &store.apply(env, &request).await?, "force-released")
        }
        Action::Extend(args) => {
            extend(store, global, args.duration, args.holding.lock_id.clone()).await
        }
        Action::Status => {
            let observed = store.read(env).await?;
            show::view(global, &observed, true);
            if global.verbose && global.output == OutputFormat::Table {
                show::caller_holding(store, &observed).await;
                let covering = crate::notify::cli::covering(
                    store.client(),
                    store.namespace(),
                    env,
                    observed.lock.as_ref(),
                )
                .await;
                outln!("Notifications: {covering}");
                let gates =
                    crate::gitops::cli::gates(store.client(), store.namespace(), env.as_str())
                        .await;
                outln!("Gates: {gates}");
            }
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

async fn extend(
    store: &LockStore,
    global: &GlobalArgs,
    duration: chrono::Duration,
    lock_id: Option<String>,
) -> Result<Exit, Error> {
    let actor = Actor::new(store.whoami().await?, None);
    let request = Request::Extend {
        actor,
        duration,
        lock_id,
    };
    let applied = store.apply(&global.environment, &request).await?;
    show::applied(global, &applied, "extended")
}

/// `acquire --extend`: extends one's holding, or renews it if it expired and
/// is still the lock's holding (the rules refuse it otherwise: exit 5 if
/// someone else holds it or it was cleared, 3 if someone waits for it).
async fn renew(
    store: &LockStore,
    global: &GlobalArgs,
    duration: chrono::Duration,
) -> Result<Exit, Error> {
    let actor = Actor::new(store.whoami().await?, None);
    let request = Request::Renew { actor, duration };
    let applied = store.apply(&global.environment, &request).await?;
    if let Some(spec) = applied.observed.spec()
        && let Some(gap) = show::renewal_gap(spec)
    {
        eprintln!("deploylock: warning: {}", report::safe_line(&gap));
    }
    show::applied(global, &applied, "extended")
}

/// Acquires for `acquire` and `exec`; with --wait-timeout, waits its turn in
/// the lock's queue, showing who holds it or who is ahead.
async fn take_lock(
    store: &LockStore,
    global: &GlobalArgs,
    args: &AcquireArgs,
    lock_type: LockType,
    signals: &mut Signals,
) -> Result<Applied, Error> {
    let request = TakeRequest {
        owner: args.owner.clone(),
        lock_type,
        force: args.force,
        reason: args.reason.clone().unwrap_or_default(),
        duration: args.duration,
        deployment_id: args.deployment_id.clone(),
        metadata: args.metadata.clone().unwrap_or_default(),
        order: args.queue,
    };
    let deadline = args
        .wait_timeout
        .map(|seconds| Instant::now() + StdDuration::from_secs(seconds));
    let env = &global.environment;
    match deadline {
        Some(_) => {
            let mut progress = WaitProgress::acquiring(env);
            queue::take(store, env, &request, deadline, signals, &mut progress).await
        }
        None => queue::take(store, env, &request, None, signals, &mut ()).await,
    }
}
