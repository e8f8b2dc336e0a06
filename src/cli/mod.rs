//! The `deploylock` command line: parse, call the store, report.

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

pub mod input;
pub mod render;
pub mod report;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration as StdDuration;

use chrono::Utc;
use clap::{Args, CommandFactory, Parser, Subcommand};
use tokio::time::Instant;

use crate::crd::{HistoryAction, LockType};
use crate::error::Error;
use crate::exec::{ExecOutcome, ExecPlan, Signals, StopDeadlines, run_while_holding};
use crate::rules::{self, AcquireRequest, Actor, NoChange, Refusal, Request};
use crate::store::{
    Applied, ConnectOptions, LockStore, Observed, Outcome, Refused, ServerClock, connect,
};

use render::{LockView, OutputFormat};
use report::{EXIT_CODES_HELP, Exit};

/// A Kubernetes-native deployment lock: one DeploymentLock per environment.
#[derive(Parser, Debug)]
#[command(name = "deploylock", version, about, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub action: Action,
    #[command(flatten)]
    pub global: GlobalArgs,
}

/// Options every action accepts.
#[derive(Args, Debug)]
pub struct GlobalArgs {
    /// Environment whose lock to act on (the DeploymentLock's name).
    #[arg(short = 'e', long, global = true, default_value = "production", value_parser = input::environment)]
    pub environment: String,
    /// Namespace of the DeploymentLocks (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true, value_parser = input::namespace)]
    pub namespace: Option<String>,
    /// Kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Path to the kubeconfig file (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    pub output: OutputFormat,
    /// Show every field (status) and debug logs on stderr.
    #[arg(short = 'v', long, global = true)]
    pub verbose: bool,
}

#[derive(Subcommand, Debug)]
pub enum Action {
    /// Take the lock; exits 3 if someone else holds it (see --wait-timeout).
    Acquire(AcquireArgs),
    /// Give back a lock you hold.
    Release(ReleaseArgs),
    /// Show the lock: state, holder, reason, expiry.
    Status,
    /// Release a lock you do not hold (emergency; the reason is recorded).
    ForceRelease(ForceReleaseArgs),
    /// List the locks of a namespace (or of all namespaces).
    List(ListArgs),
    /// Wait until the lock is Available or Expired.
    Wait(WaitArgs),
    /// Move the expiry of a lock you hold.
    Extend(ExtendArgs),
    /// Show the lock's recent transitions.
    History,
    /// Hold the lock while a command runs: deploylock exec --reason "..." -- COMMAND [ARGS...]
    #[command(after_help = EXEC_HELP)]
    Exec(ExecArgs),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    #[command(hide = true)]
    Man,
}

const EXEC_HELP: &str = "\
The command runs with DEPLOYLOCK_ENVIRONMENT, DEPLOYLOCK_NAMESPACE, DEPLOYLOCK_LOCK_ID,
DEPLOYLOCK_HOLDER and DEPLOYLOCK_FENCING_TOKEN set. The lock (type automatic) is renewed
at a third of --duration while the command runs and released when it exits.
SIGINT, SIGTERM and SIGHUP are passed on to the command (SIGHUP not if it was
ignored when exec started, as under nohup). If the lock is lost (force-released,
taken over), the command gets SIGTERM at once and SIGKILL after --grace. If no
renewal succeeds in time, the command gets SIGTERM --grace before the lock could
expire on the API server's clock and SIGKILL a safety margin before it. If exec
itself dies (even by SIGKILL), its watchdog stops the command and everything it
started the same way.

Exit code: the command's own (128+N if signal N ended it, 127 if it could not start);
3 or 4 if the lock could not be acquired; 7 if the lock was lost while it ran;
8 if the command ended but the lock could not be released (it expires on its own).";

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    pub lock: AcquireArgs,
    /// Seconds between SIGTERM and SIGKILL when the lock is lost (less than
    /// half of --duration).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub grace: u64,
    /// The command and its arguments, after `--`.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct AcquireArgs {
    /// Why you take the lock (shown to everyone who finds it held).
    #[arg(long, value_parser = input::reason)]
    pub reason: Option<String>,
    /// How long the lock lasts: minutes (30) or with a unit (90m, 2h); 1 minute to 7 days.
    #[arg(long, default_value = "30", value_parser = input::duration, allow_hyphen_values = true)]
    pub duration: chrono::Duration,
    /// Wait up to this many seconds for the lock to become free, then take it.
    #[arg(long, value_name = "SECONDS")]
    pub wait_timeout: Option<u64>,
    /// Emergency lock: override a normal lock (recorded with whom it overrode).
    #[arg(long)]
    pub force: bool,
    /// Display label of the holder (default: your identity as the API server sees it).
    #[arg(long, value_parser = |s: &str| input::label("--owner", s))]
    pub owner: Option<String>,
    /// Context as a JSON object, e.g. '{"version":"2.1.0"}'.
    #[arg(long, value_parser = input::metadata)]
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
    /// ID of the deployment this lock protects.
    #[arg(long, value_parser = |s: &str| input::label("--deployment-id", s))]
    pub deployment_id: Option<String>,
    /// Extend the lock you already hold instead (same as `extend`).
    #[arg(long)]
    pub extend: bool,
    /// With --wait-timeout: the order waiters are served in.
    #[arg(long, value_enum, default_value = "oldest-first")]
    pub queue: QueueOrder,
}

/// How waiters are served (GitLab's resource_group process modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueOrder {
    /// First come, first served.
    OldestFirst,
    /// The latest waiter goes first (only the newest deploy matters).
    NewestFirst,
}

#[derive(Args, Debug)]
pub struct HoldingArgs {
    /// Act only on this holding (as printed by acquire); refused if it is over.
    #[arg(long)]
    pub lock_id: Option<String>,
}

#[derive(Args, Debug)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub holding: HoldingArgs,
    /// Act only on a holding taken with this --deployment-id: when the lock is
    /// free or held under another deployment ID (another run of a pipeline that
    /// shares your identity), nothing is released and the exit code is 0.
    #[arg(long, conflicts_with = "lock_id")]
    pub deployment_id: Option<String>,
}

#[derive(Args, Debug)]
pub struct ExtendArgs {
    /// New remaining time from now: minutes (30) or with a unit (90m, 2h).
    #[arg(long, default_value = "30", value_parser = input::duration, allow_hyphen_values = true)]
    pub duration: chrono::Duration,
    #[command(flatten)]
    pub holding: HoldingArgs,
}

#[derive(Args, Debug)]
pub struct ForceReleaseArgs {
    /// Why the lock is taken away (recorded in the history).
    #[arg(long, required = true, value_parser = input::reason)]
    pub reason: String,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// List the locks of every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
}

#[derive(Args, Debug)]
pub struct WaitArgs {
    /// Give up after this many seconds (exit 4).
    #[arg(long, value_name = "SECONDS")]
    pub wait_timeout: Option<u64>,
}

/// The whole program: parse, log setup, run. Shared by `deploylock` and the
/// kubectl plugin `kubectl-deploylock`.
pub fn main() -> ExitCode {
    // exec's watchdog is this binary run again with a hidden argument.
    if let Some(code) = crate::exec::watchdog_main_if_requested() {
        return code;
    }
    let cli = match parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    // Generated into memory first: a closed pipe (`| head`) must not panic.
    let generated = match &cli.action {
        Action::Completion { shell } => {
            let mut buffer = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "deploylock", &mut buffer);
            Some(Ok(buffer))
        }
        Action::Man => {
            let mut buffer = Vec::new();
            Some(
                clap_mangen::Man::new(Cli::command())
                    .render(&mut buffer)
                    .map(|()| buffer),
            )
        }
        _ => None,
    };
    if let Some(generated) = generated {
        use std::io::Write;
        let written = generated.and_then(|buffer| std::io::stdout().write_all(&buffer));
        return match written {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("deploylock: cannot write the output: {err}");
                ExitCode::FAILURE
            }
        };
    }
    // Only deploylock's own logs: every failure reaches the user as one
    // message from cli::report, not as a library's log line.
    let level = if cli.global.verbose {
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

/// Parses the command line; a usage error is one line and exit code 2.
pub fn parse() -> Result<Cli, ExitCode> {
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(err) => {
            use clap::error::ErrorKind;
            if matches!(
                err.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) || err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            {
                let _ = err.print();
                let code = if err.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    Exit::InvalidInput
                } else {
                    Exit::Success
                };
                return Err(code.into());
            }
            // clap's message and the lines it indents under it (the
            // missing arguments' names), without the usage and tips.
            let rendered = err.render().to_string();
            let message = rendered
                .lines()
                .map(str::trim)
                .skip_while(|line| line.is_empty())
                .take_while(|line| !line.is_empty() && !line.starts_with("Usage:"))
                .collect::<Vec<_>>()
                .join(" ");
            let message = message.trim_start_matches("error: ");
            let message = if message.is_empty() {
                "invalid arguments"
            } else {
                message
            };
            eprintln!(
                "deploylock: {} (see `deploylock --help`)",
                report::safe_line(message)
            );
            Err(Exit::InvalidInput.into())
        }
    }
}

/// Runs one action and returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let environment = cli.global.environment.clone();
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
            let (message, exit) = report::describe(&err, &environment, now);
            eprintln!("deploylock: {message}");
            exit.into()
        }
    }
}

/// `future`, unless a signal comes first (exit 130).
async fn interruptible<T>(
    signals: &mut Signals,
    future: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::select! {
        result = future => result,
        _ = signals.next() => Err(Error::Interrupted),
    }
}

async fn execute(
    cli: &Cli,
    signals: &mut Signals,
    clock: &mut Option<ServerClock>,
) -> Result<Exit, Error> {
    let global = &cli.global;
    // Refuse incomplete requests before touching the cluster.
    let lock_args = match &cli.action {
        Action::Acquire(args) => Some(args),
        Action::Exec(args) => Some(&args.lock),
        _ => None,
    };
    if let Some(args) = lock_args
        && !args.extend
        && args.reason.is_none()
    {
        return Err(Error::InvalidInput(
            "acquire needs a reason: add --reason \"...\" (e.g. --reason \"Deploying version 2.1.0\")".into(),
        ));
    }
    if let Action::Exec(args) = &cli.action {
        // The command gets SIGTERM --grace before its deadline: with more
        // than half the duration, a healthy renewal could not prevent it.
        let grace = i64::try_from(args.grace).unwrap_or(i64::MAX);
        if grace.saturating_mul(2) >= args.lock.duration.num_seconds() {
            return Err(Error::InvalidInput(format!(
                "--grace {} is too long for --duration {}m: it must be less than half of the duration",
                args.grace,
                args.lock.duration.num_minutes()
            )));
        }
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
            report_applied(global, &applied, "acquired")
        }
        Action::Exec(args) => exec(&store, global, args, signals).await,
        Action::Wait(args) => {
            let deadline = args
                .wait_timeout
                .map(|seconds| Instant::now() + StdDuration::from_secs(seconds));
            let observed = interruptible(
                signals,
                wait_for_free(&store, &global.environment, deadline),
            )
            .await?;
            if global.output != OutputFormat::Table {
                print_view(global, &observed, false);
            }
            Ok(Exit::Success)
        }
        action => interruptible(signals, one_shot(&store, global, action)).await,
    }
}

/// The actions that make one request or two and do not wait.
async fn one_shot(store: &LockStore, global: &GlobalArgs, action: &Action) -> Result<Exit, Error> {
    let store = store.clone();
    let env = global.environment.as_str();
    match action {
        Action::Acquire(args) => extend(&store, global, args.duration, None).await,
        Action::Exec(_) | Action::Wait(_) => Err(Error::Api("not a one-shot action".into())),
        // Answered by `main` without a cluster.
        Action::Completion { .. } | Action::Man => Ok(Exit::Success),
        Action::Release(args) => {
            let lock_id = match &args.deployment_id {
                None => args.holding.lock_id.clone(),
                // The holding's lock ID, so that the release is refused if
                // that holding ends before it lands.
                Some(deployment_id) => {
                    let observed = store.read(env).await?;
                    let mine = observed
                        .holder()
                        .filter(|holder| holder.deployment_id.as_deref() == Some(deployment_id));
                    match mine {
                        Some(holder) => Some(holder.lock_id.clone()),
                        None if global.output != OutputFormat::Table => {
                            print_view(global, &observed, false);
                            return Ok(Exit::Success);
                        }
                        None => {
                            outln!(
                                "{env} is not held by deployment {}: nothing to release",
                                render::Safe(deployment_id)
                            );
                            return Ok(Exit::Success);
                        }
                    }
                }
            };
            let actor = Actor::new(store.whoami().await?, None);
            let request = Request::Release { actor, lock_id };
            let applied = store.apply(env, &request).await?;
            report_applied(global, &applied, "released")
        }
        Action::ForceRelease(args) => {
            let actor = Actor::new(store.whoami().await?, None);
            let request = Request::ForceRelease {
                actor,
                reason: args.reason.clone(),
            };
            let applied = store.apply(env, &request).await?;
            report_applied(global, &applied, "force-released")
        }
        Action::Extend(args) => {
            extend(&store, global, args.duration, args.holding.lock_id.clone()).await
        }
        Action::Status => {
            let observed = store.read(env).await?;
            print_view(global, &observed, true);
            Ok(Exit::Success)
        }
        Action::History => {
            let observed = store.read(env).await?;
            let history = observed.spec().map_or(&[][..], |spec| &spec.history[..]);
            match global.output {
                OutputFormat::Table => {
                    out!("{}", render::history_table(history, observed.server_time))
                }
                format => out!("{}", render::structured(&history, format)),
            }
            Ok(Exit::Success)
        }
        Action::List(args) => {
            // Like `kubectl get`: show every lock that can be read, name each
            // one that cannot, and exit 1 if there was one.
            let listing = store.list(args.all_namespaces).await?;
            let (locks, now) = (&listing.locks, listing.server_time);
            match global.output {
                OutputFormat::Table => {
                    out!("{}", render::list_table(locks, now, args.all_namespaces))
                }
                format => {
                    let views: Vec<LockView> = locks
                        .iter()
                        .map(|lock| {
                            LockView::new(
                                store.namespace(),
                                &lock.spec.environment,
                                Some(lock),
                                now,
                            )
                        })
                        .collect();
                    out!("{}", render::structured(&views, format));
                }
            }
            for malformed in &listing.malformed {
                eprintln!("deploylock: {}", report::skipped_malformed(malformed));
            }
            Ok(if listing.malformed.is_empty() {
                Exit::Success
            } else {
                Exit::Failure
            })
        }
    }
}

/// How often a waiting client renews its place in the queue.
const QUEUE_HEARTBEAT: StdDuration = StdDuration::from_secs(5);

/// How long a waiting client retries 403s from authorization: right after an
/// API server starts, RBAC refuses everyone until its caches are filled.
const RBAC_SETTLE: StdDuration = StdDuration::from_secs(30);

/// Longest pause between retries of a waiting client.
const MAX_RETRY_BACKOFF: StdDuration = StdDuration::from_secs(2);

/// Retries of a waiting client: transient faults (no connection, no answer
/// in time, 5xx, 429) until its deadline, 403s from authorization for
/// [`RBAC_SETTLE`]; anything else ends the wait.
struct Retry {
    deadline: Option<Instant>,
    backoff: StdDuration,
    forbidden_since: Option<Instant>,
    warned: bool,
}

impl Retry {
    fn new(deadline: Option<Instant>) -> Self {
        Retry {
            deadline,
            backoff: StdDuration::from_millis(250),
            forbidden_since: None,
            warned: false,
        }
    }

    /// After a failure: whether to try again (having paused), or give up.
    async fn again(&mut self, err: &Error) -> bool {
        let now = Instant::now();
        let worth_it = if err.is_authorization_refusal() {
            now.duration_since(*self.forbidden_since.get_or_insert(now)) < RBAC_SETTLE
        } else {
            err.is_transient()
        };
        let wake = now + self.backoff;
        if !worth_it || self.deadline.is_some_and(|deadline| wake >= deadline) {
            return false;
        }
        if !self.warned {
            tracing::warn!(error = %err, "the API server failed; retrying while waiting");
            self.warned = true;
        } else {
            tracing::debug!(error = %err, "retrying");
        }
        tokio::time::sleep_until(wake).await;
        self.backoff = (self.backoff * 2).min(MAX_RETRY_BACKOFF);
        true
    }

    fn succeeded(&mut self) {
        if self.warned {
            tracing::warn!("the API server answers again");
        }
        self.backoff = StdDuration::from_millis(250);
        self.forbidden_since = None;
        self.warned = false;
    }
}

/// `attempt` again and again while `retry` says so.
async fn retrying<T, F, Fut>(retry: &mut Retry, mut attempt: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    loop {
        match attempt().await {
            Ok(value) => {
                retry.succeeded();
                return Ok(value);
            }
            Err(err) => {
                if !retry.again(&err).await {
                    return Err(err);
                }
            }
        }
    }
}

/// Acquires for `acquire` and `exec`; with --wait-timeout, waits its turn in
/// the lock's queue.
async fn take_lock(
    store: &LockStore,
    global: &GlobalArgs,
    args: &AcquireArgs,
    lock_type: LockType,
    signals: &mut Signals,
) -> Result<Applied, Error> {
    let env = global.environment.as_str();
    let Some(wait_seconds) = args.wait_timeout else {
        let user = interruptible(signals, store.whoami()).await?;
        let request = Request::Acquire(acquire_request(user, args, lock_type, None));
        return interruptible(signals, store.apply(env, &request)).await;
    };
    let deadline = Instant::now() + StdDuration::from_secs(wait_seconds);
    let mut retry = Retry::new(Some(deadline));
    let user = interruptible(signals, retrying(&mut retry, || store.whoami())).await?;
    let waiter_id = uuid::Uuid::new_v4().to_string();
    let acquire = acquire_request(user, args, lock_type, Some(waiter_id.clone()));
    let join = Request::JoinQueue {
        actor: acquire.actor.clone(),
        waiter_id: waiter_id.clone(),
        reason: acquire.reason.clone(),
        newest_first: args.queue == QueueOrder::NewestFirst,
    };
    let lock_id = acquire.lock_id.clone();
    let acquire = Request::Acquire(acquire);
    let queued = wait_in_queue(store, env, &acquire, &lock_id, &join, &mut retry);
    let result = interruptible(signals, queued).await;
    if result.is_err() {
        // Give up our place (a second signal gives up on that); if this
        // fails, the place lapses with the heartbeat.
        let leave = Request::LeaveQueue { waiter_id };
        if let Err(err) = interruptible(signals, store.apply(env, &leave)).await {
            tracing::debug!(error = %err, "could not leave the queue");
        }
    }
    result
}

fn acquire_request(
    user: String,
    args: &AcquireArgs,
    lock_type: LockType,
    waiter_id: Option<String>,
) -> AcquireRequest {
    AcquireRequest {
        actor: Actor::new(user, args.owner.clone()),
        lock_id: uuid::Uuid::new_v4().to_string(),
        lock_type,
        force: args.force,
        reason: args.reason.clone().unwrap_or_default(),
        duration: args.duration,
        deployment_id: args.deployment_id.clone(),
        metadata: args.metadata.clone().unwrap_or_default(),
        waiter_id,
    }
}

/// Joins the queue, then takes the lock when it is free and it is our turn.
/// Woken by changes of the lock (a watch), the holder's expiry, the expiry of
/// the waiter ahead's heartbeat, and our own heartbeat. Faults of the API
/// server are retried (see [`Retry`]); the heartbeat resumes after them.
async fn wait_in_queue(
    store: &LockStore,
    env: &str,
    acquire: &Request,
    lock_id: &str,
    join: &Request,
    retry: &mut Retry,
) -> Result<Applied, Error> {
    let mut progress = WaitProgress::new(env);
    let mut next_heartbeat = Instant::now();
    loop {
        let step = queue_step(
            store,
            env,
            acquire,
            lock_id,
            join,
            &mut next_heartbeat,
            &mut progress,
            retry.deadline,
        )
        .await;
        match step {
            Ok(Some(applied)) => {
                progress.finish(&applied.observed);
                return Ok(applied);
            }
            Ok(None) => retry.succeeded(),
            Err(err) => {
                if !retry.again(&err).await {
                    return Err(err);
                }
            }
        }
    }
}

/// One round of waiting in the queue: Some once the lock is ours.
#[allow(clippy::too_many_arguments)]
async fn queue_step(
    store: &LockStore,
    env: &str,
    acquire: &Request,
    lock_id: &str,
    join: &Request,
    next_heartbeat: &mut Instant,
    progress: &mut WaitProgress,
    deadline: Option<Instant>,
) -> Result<Option<Applied>, Error> {
    let deadline = deadline.unwrap_or_else(|| Instant::now() + StdDuration::from_secs(3600));
    if Instant::now() >= *next_heartbeat {
        store.apply(env, join).await?;
        *next_heartbeat = Instant::now() + QUEUE_HEARTBEAT;
    }
    // One read decides: on a hand-off the lock is usually ours to take;
    // otherwise the refusal says until when to sleep.
    let Refused { refusal, observed } = match store.try_apply(env, acquire).await? {
        Ok(applied) => return Ok(Some(applied)),
        Err(refused) => refused,
    };
    let wake = match refusal {
        // Our own acquire, written by an attempt whose answer was lost.
        Refusal::AlreadyHeldByYou(holder) if holder.lock_id == lock_id => {
            return Ok(Some(Applied {
                observed,
                outcome: Outcome::Transition(HistoryAction::Acquired),
            }));
        }
        // Waiting for one's own earlier holding is what a second CI run
        // under the same identity does: it queues like anyone else.
        Refusal::HeldByOther(holder)
        | Refusal::EmergencyLockInForce(holder)
        | Refusal::AlreadyHeldByYou(holder) => {
            progress.held(&holder, &observed);
            observed.local_deadline(holder.expires_at)
        }
        Refusal::QueuedBehind { next, waiting } => {
            progress.queued(&next, waiting, &observed);
            observed.local_deadline(rules::waiter_deadline(&next))
        }
        refusal => return Err(refusal.into()),
    };
    if Instant::now() >= deadline {
        return Err(Error::WaitTimedOut(
            observed.holder().cloned().map(Box::new),
        ));
    }
    store
        .wait_for_change(&observed, wake.min(*next_heartbeat).min(deadline))
        .await?;
    Ok(None)
}

/// Tells a person at a terminal who holds the lock or who is ahead (a
/// spinner line); in CI (no terminal) one line when waiting starts and one
/// when it ends.
struct WaitProgress {
    environment: String,
    spinner: Option<indicatif::ProgressBar>,
    started: Instant,
    announced: bool,
    last: String,
}

impl WaitProgress {
    fn new(environment: &str) -> Self {
        let spinner = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(StdDuration::from_millis(120));
            bar
        });
        WaitProgress {
            environment: environment.to_string(),
            spinner,
            started: Instant::now(),
            announced: false,
            last: String::new(),
        }
    }

    fn show(&mut self, line: String) {
        let line = report::safe_line(&line);
        if line == self.last {
            return;
        }
        match &self.spinner {
            Some(bar) => bar.set_message(line.clone()),
            None if !self.announced => eprintln!("deploylock: {line}"),
            None => {}
        }
        self.announced = true;
        self.last = line;
    }

    fn held(&mut self, holder: &crate::crd::LockHolder, observed: &Observed) {
        let line = format!(
            "waiting for {}: held by {} since {} until {}, reason: \"{}\"",
            self.environment,
            holder.owner,
            holder.acquired_at.format("%H:%M:%SZ"),
            report::when(holder.expires_at, observed.server_time),
            holder.reason
        );
        self.show(line);
    }

    fn queued(&mut self, next: &crate::crd::Waiter, waiting: usize, observed: &Observed) {
        let line = format!(
            "waiting for {}: {waiting} in the queue, next is {} (since {})",
            self.environment,
            next.owner,
            report::when(next.since, observed.server_time)
        );
        self.show(line);
    }

    fn finish(&mut self, observed: &Observed) {
        if let Some(bar) = self.spinner.take() {
            bar.finish_and_clear();
        }
        if self.announced {
            eprintln!(
                "deploylock: {} is {} (waited {}s)",
                self.environment,
                observed.state(),
                self.started.elapsed().as_secs()
            );
        }
    }
}

impl Drop for WaitProgress {
    fn drop(&mut self) {
        if let Some(bar) = self.spinner.take() {
            bar.finish_and_clear();
        }
    }
}

async fn exec(
    store: &LockStore,
    global: &GlobalArgs,
    args: &ExecArgs,
    signals: &mut Signals,
) -> Result<Exit, Error> {
    // Signals are ours from the start: a SIGTERM while waiting leaves the
    // queue, one while the command runs is passed on to it.
    let applied = take_lock(store, global, &args.lock, LockType::Automatic, signals).await?;
    let observed = &applied.observed;
    let Some(holding) = observed.holder().cloned() else {
        return Err(Error::Api("the lock was written without a holder".into()));
    };
    let fencing_token = observed.spec().map(|s| s.fencing_token).unwrap_or_default();
    eprintln!(
        "deploylock: {} acquired (lock ID {}, fencing token {fencing_token}); running {:?}",
        global.environment,
        holding.lock_id,
        args.command.join(" ")
    );
    let grace = StdDuration::from_secs(args.grace);
    let plan = ExecPlan {
        environment: global.environment.clone(),
        actor: Actor::new(holding.user.clone(), Some(holding.owner.clone())),
        fencing_token,
        deadlines: StopDeadlines::for_holding(observed, holding.expires_at, grace),
        taken_at: observed.sent,
        grace,
        command: args.command.clone(),
        holding,
    };
    match run_while_holding(store, plan, signals).await? {
        ExecOutcome::Exited {
            code,
            release_error: None,
        } => Ok(Exit::Child(code)),
        ExecOutcome::Exited {
            code,
            release_error: Some(why),
        } => {
            eprintln!(
                "deploylock: warning: the command exited with {code} but the lock on {} could not be released ({}); it stays held until it expires (see `deploylock status`)",
                global.environment,
                render::Safe(&why)
            );
            Ok(Exit::NotReleased)
        }
        ExecOutcome::CouldNotStart { error } => {
            eprintln!("deploylock: cannot run {error}; the lock was released");
            Ok(Exit::Child(127))
        }
        ExecOutcome::LockLost {
            now_held_by,
            renewal_error,
            child_code,
        } => {
            if let Some(why) = renewal_error {
                eprintln!(
                    "deploylock: could not renew the lock before it could expire ({}): the command was stopped in time",
                    render::Safe(&why)
                );
            }
            let now_held = match now_held_by {
                Some(holder) => report::safe_line(&format!(
                    "now held by {} ({}), reason: \"{}\"",
                    holder.owner, holder.lock_type, holder.reason
                )),
                None => {
                    "someone else released it, or it expired (see `deploylock history`)".to_string()
                }
            };
            eprintln!(
                "deploylock: lost the lock on {} while the command ran: {now_held}; the command was stopped (its exit code: {child_code})",
                global.environment
            );
            Ok(Exit::LockLost)
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
    report_applied(global, &applied, "extended")
}

/// Waits until the lock is free (the `wait` action; no place in the queue).
/// Faults of the API server are retried until the deadline (forever
/// without one).
async fn wait_for_free(
    store: &LockStore,
    env: &str,
    deadline: Option<Instant>,
) -> Result<Observed, Error> {
    let mut progress = WaitProgress::new(env);
    let mut retry = Retry::new(deadline);
    loop {
        let waited = store
            .wait_until_free(env, deadline, |observed| {
                if let Some(holder) = observed.holder() {
                    progress.held(holder, observed);
                }
            })
            .await;
        match waited {
            Ok(observed) => {
                progress.finish(&observed);
                return Ok(observed);
            }
            Err(err) => {
                if !retry.again(&err).await {
                    return Err(err);
                }
            }
        }
    }
}

fn print_view(global: &GlobalArgs, observed: &Observed, as_status: bool) {
    let view = LockView::new(
        &observed.namespace,
        &observed.environment,
        observed.lock.as_ref(),
        observed.server_time,
    );
    match global.output {
        OutputFormat::Table if as_status => {
            out!("{}", render::status_table(&view, global.verbose))
        }
        OutputFormat::Table => {}
        format => out!("{}", render::structured(&view, format)),
    }
}

fn report_applied(global: &GlobalArgs, applied: &Applied, verb: &str) -> Result<Exit, Error> {
    let observed = &applied.observed;
    let env = &observed.environment;
    if global.output != OutputFormat::Table {
        print_view(global, observed, false);
        return Ok(Exit::Success);
    }
    match (applied.outcome, observed.holder()) {
        (Outcome::Unchanged(NoChange::AlreadyAvailable), _) => {
            outln!("{env} was not locked: nothing to do")
        }
        (Outcome::Unchanged(NoChange::NotQueued) | Outcome::QueueUpdated, _) => {}
        (Outcome::Transition(HistoryAction::Released | HistoryAction::ForceReleased), _) => {
            outln!("{env} {verb}")
        }
        (Outcome::Transition(action), Some(holder)) => {
            let takeover = match action {
                HistoryAction::TookOverExpired => " (took over an expired lock)",
                HistoryAction::ForceAcquired if holder.overrode.is_some() => {
                    " (emergency: overrode the previous holder)"
                }
                HistoryAction::ForceAcquired => " (emergency)",
                _ => "",
            };
            outln!(
                "{env} {verb} by {} until {}{takeover}",
                render::Safe(&holder.owner),
                report::when(holder.expires_at, observed.server_time)
            );
            outln!(
                "lock ID {}, fencing token {}",
                render::Safe(&holder.lock_id),
                observed.spec().map(|s| s.fencing_token).unwrap_or_default()
            );
        }
        (Outcome::Transition(_), None) => outln!("{env} {verb}"),
    }
    Ok(Exit::Success)
}
