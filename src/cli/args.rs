//! The command line's arguments (clap). Values are checked as they are
//! parsed ([`super::input`]): a bad one is a usage error (exit 2) before
//! anything is sent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::environment::Environment;
pub use crate::queue::QueueOrder;

use super::input;
use super::render::OutputFormat;
use super::report::{self, Exit, exit_codes_help};

/// A Kubernetes-native deployment lock: one DeploymentLock per environment.
#[derive(Parser, Debug)]
#[command(name = "deploylock", version, about, after_help = exit_codes_help())]
pub struct Cli {
    #[command(subcommand)]
    pub action: Action,
    #[command(flatten)]
    pub global: GlobalArgs,
}

/// Options every action accepts.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Environment whose lock to act on (the DeploymentLock's name; default:
    /// production). acquire, release, extend, wait and exec take it repeated
    /// (-e a -e b): every lock, taken in name order, all or none.
    #[arg(
        id = "environment",
        short = 'e',
        long = "environment",
        global = true,
        value_name = "ENVIRONMENT",
        action = clap::ArgAction::Append,
        value_parser = input::environment
    )]
    pub environments: Vec<Environment>,
    /// acquire, release, extend, wait, exec: every DeploymentLock of the
    /// namespace, as the API server lists them (instead of -e).
    #[arg(long, global = true, conflicts_with = "environment")]
    pub all_environments: bool,
    /// The environment of a single-environment action: the one -e given, or
    /// production ([`GlobalArgs::resolve`] sets it after parsing).
    #[arg(skip = Environment::production())]
    pub environment: Environment,
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

impl GlobalArgs {
    /// Fills in [`GlobalArgs::environment`]: the first -e, else production.
    pub fn resolve(&mut self) {
        if let Some(first) = self.environments.first() {
            self.environment = first.clone();
        }
    }
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
    /// List the active locks (Locked, ForceLocked, Expired) of a namespace
    /// (or of all namespaces); --all adds the Available ones.
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
    /// List the freeze windows (FreezeWindows): open ones first, then by next start.
    Windows(crate::windows::cli::WindowsArgs),
    /// Team notifications: `notify test NAME` sends a test message.
    #[command(subcommand)]
    Notify(crate::notify::cli::NotifyAction),
    /// Print a shell's completion script (bash, zsh, fish, elvish,
    /// powershell; kubectl: the kubectl_complete-deploylock script). It
    /// completes environment names from the cluster.
    Completion {
        #[arg(value_enum)]
        shell: super::complete::CompletionShell,
    },
    /// Print the man page (roff), or with --dir write one page per action.
    #[command(hide = true)]
    Man {
        /// Write deploylock.1 and deploylock-ACTION.1 pages into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
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

With several environments (-e a -e b, --all-environments) every lock is taken (in name
order, all or none), renewed and watched; losing any one stops the command. The
command then gets DEPLOYLOCK_ENVIRONMENT, DEPLOYLOCK_LOCK_ID and DEPLOYLOCK_FENCING_TOKEN
as space-separated lists in that order, and DEPLOYLOCK_GROUP_ID.

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
    #[arg(long, value_parser = input::reason, required_unless_present = "extend")]
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
    /// Extend the lock you hold instead; unlike `extend`, also renews your
    /// own expired holding (same lock ID and fencing token) if nobody took
    /// it over and nobody waits for it.
    #[arg(long)]
    pub extend: bool,
    /// With --wait-timeout: the order waiters are served in.
    #[arg(long, value_enum, default_value = "oldest-first")]
    pub queue: QueueOrder,
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
    #[arg(long, conflicts_with = "lock_id", value_parser = |s: &str| input::label("--deployment-id", s))]
    pub deployment_id: Option<String>,
    /// Release your holdings of this lock group (as a multi-environment
    /// acquire printed it), in whichever environments of the namespace they are.
    #[arg(long, conflicts_with_all = ["lock_id", "deployment_id"], value_parser = super::multi::group_id)]
    pub group_id: Option<String>,
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
    /// Also list the Available locks (nobody holds them).
    #[arg(long)]
    pub all: bool,
}

#[derive(Args, Debug)]
pub struct WaitArgs {
    /// Give up after this many seconds (exit 4).
    #[arg(long, value_name = "SECONDS")]
    pub wait_timeout: Option<u64>,
}

/// When a `--wait-timeout` of `seconds` from now runs out. One too far
/// for the clock to represent never comes: no deadline.
pub fn deadline_after(seconds: Option<u64>) -> Option<tokio::time::Instant> {
    let seconds = std::time::Duration::from_secs(seconds?);
    tokio::time::Instant::now().checked_add(seconds)
}

/// Parses the command line; a usage error is one line and exit code 2.
pub fn parse() -> Result<Cli, ExitCode> {
    parse_as("deploylock")
}

/// [`parse`], with `bin_name` in help and usage (`kubectl deploylock`).
pub fn parse_as(bin_name: &'static str) -> Result<Cli, ExitCode> {
    use clap::{CommandFactory, FromArgMatches};
    let parsed = Cli::command()
        .bin_name(bin_name)
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches));
    match parsed {
        Ok(mut cli) => {
            cli.global.resolve();
            Ok(cli)
        }
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
                "deploylock: {} (see `{bin_name} --help`)",
                report::safe_line(message)
            );
            Err(Exit::InvalidInput.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;

    use super::*;

    /// A missing --reason is clap's own error, naming the argument.
    #[test]
    fn a_missing_reason_names_the_argument() {
        for args in [
            &["deploylock", "force-release"][..],
            &["deploylock", "acquire"],
            &["deploylock", "exec", "--", "true"],
        ] {
            let err = match Cli::try_parse_from(args) {
                Ok(cli) => panic!("{args:?} parsed: {cli:?}"),
                Err(err) => err,
            };
            assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument, "{args:?}");
            let rendered = err.render().to_string();
            assert!(rendered.contains("--reason"), "{args:?}: {rendered}");
        }
        // Extending needs no reason.
        let extend = Cli::try_parse_from(["deploylock", "acquire", "--extend"]);
        assert!(extend.is_ok(), "{extend:?}");
        let environment =
            Cli::try_parse_from(["deploylock", "-e", "staging", "status"]).map(|mut cli| {
                cli.global.resolve();
                cli.global.environment.to_string()
            });
        assert_eq!(environment.ok().as_deref(), Some("staging"));
    }
}
