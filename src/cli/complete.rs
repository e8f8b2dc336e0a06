//! Shell completion that asks the cluster, as kubectl completes resource
//! names: `-e <TAB>` lists the DeploymentLocks of the namespace the command
//! line selects (its `-n`, `--context` and `--kubeconfig`, else the
//! kubeconfig context's namespace), `-n <TAB>` the namespaces, `--context
//! <TAB>` the kubeconfig's contexts.
//!
//! The scripts `deploylock completion SHELL` prints are clap_complete's
//! dynamic ones: on each Tab the shell runs this binary with
//! `DEPLOYLOCK_COMPLETE=SHELL` and the words of the line after `--`, and
//! [`main_if_requested`] answers with the candidates. `kubectl deploylock
//! <TAB>` works the same way through `kubectl_complete-deploylock`, the
//! script `deploylock completion kubectl` prints (kubectl 1.26 or newer runs
//! it with the words after `kubectl deploylock`).
//!
//! A Tab must never hang or scribble on the prompt: whatever fails (no
//! cluster, no permission, a bad kubeconfig) gives no candidates, nothing
//! on stderr and exit code 0, and the cluster gets [`CLUSTER_TIMEOUT`].

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::CommandFactory;
use clap_complete::engine::{ArgValueCompleter, CompletionCandidate, PathCompleter};
use clap_complete::env::{Bash, Elvish, EnvCompleter, Fish, Powershell, Shells, Zsh};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams};
use kube::config::{ExecInteractiveMode, Kubeconfig};

use super::args::Cli;
use super::input;
use crate::crd::DeploymentLock;
use crate::store::{client_from, load_config};

/// The variable that puts the binary into completion mode. Not clap's
/// default `COMPLETE`: a pipeline that happens to set that must still take
/// its lock, not print completions and exit 0.
pub const COMPLETE_VAR: &str = "DEPLOYLOCK_COMPLETE";

/// How long a Tab may wait for the cluster (loading the kubeconfig,
/// credentials, connecting and listing, all together).
pub const CLUSTER_TIMEOUT: Duration = Duration::from_secs(2);

/// clap's shells, and kubectl's plugin completion protocol.
const SHELLS: Shells<'static> = Shells(&[&Bash, &Elvish, &Fish, &Powershell, &Zsh, &Kubectl]);

/// The shells `deploylock completion` writes a script for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
    Elvish,
    Powershell,
    /// `kubectl_complete-deploylock`, for `kubectl deploylock <TAB>`.
    Kubectl,
}

impl CompletionShell {
    fn completer(self) -> &'static dyn EnvCompleter {
        match self {
            CompletionShell::Bash => &Bash,
            CompletionShell::Zsh => &Zsh,
            CompletionShell::Fish => &Fish,
            CompletionShell::Elvish => &Elvish,
            CompletionShell::Powershell => &Powershell,
            CompletionShell::Kubectl => &Kubectl,
        }
    }
}

/// The script `deploylock completion SHELL` prints: it registers the
/// completion function that calls `deploylock` back on each Tab.
pub fn script(shell: CompletionShell) -> std::io::Result<Vec<u8>> {
    let mut buffer = Vec::new();
    shell.completer().write_registration(
        COMPLETE_VAR,
        "deploylock",
        "deploylock",
        "deploylock",
        &mut buffer,
    )?;
    if shell == CompletionShell::Zsh {
        // clap's script defines the function and binds it with compdef; when
        // the file is autoloaded from $fpath as `_deploylock` instead of
        // sourced, the first Tab runs this body and must complete too.
        buffer.extend_from_slice(
            b"if [[ \"${funcstack[1]}\" == \"_deploylock\" ]]; then\n    \
              _clap_dynamic_completer_deploylock \"$@\"\nfi\n",
        );
    }
    Ok(buffer)
}

/// Answers a shell's completion request if `DEPLOYLOCK_COMPLETE` names a
/// shell; `None` (run normally) otherwise.
pub fn main_if_requested() -> Option<ExitCode> {
    let requested = std::env::var_os(COMPLETE_VAR)?;
    let shell = std::path::Path::new(&requested).file_stem()?.to_str()?;
    SHELLS.completer(shell)?;
    silence_stderr();
    let args: Vec<OsString> = std::env::args_os().collect();
    let words: Vec<OsString> = match args.iter().position(|arg| arg == "--") {
        // The first word after `--` is the program as typed.
        Some(escape) => args.iter().skip(escape + 2).cloned().collect(),
        None => Vec::new(),
    };
    let mut cli = Cli::command();
    cli.build();
    let scope = Scope::from_words(&cli, &words);
    let current_dir = std::env::current_dir().ok();
    // Errors are clap's (a line it cannot follow): no candidates either.
    let _ = clap_complete::CompleteEnv::with_factory(move || with_completers(scope.clone()))
        .var(COMPLETE_VAR)
        .bin("deploylock")
        .completer("deploylock")
        .shells(SHELLS)
        .try_complete(args, current_dir.as_deref());
    Some(ExitCode::SUCCESS)
}

/// stderr to /dev/null: an exec credential plugin or a library must not
/// write over the user's prompt (zsh's script discards stderr, bash's not).
fn silence_stderr() {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stderr(null);
    }
}

/// The command line with the completers that need `scope`.
fn with_completers(scope: Scope) -> clap::Command {
    let environments = scope.clone();
    let namespaces = scope.clone();
    let contexts = scope;
    Cli::command()
        .mut_arg("environment", move |arg| {
            arg.add(ArgValueCompleter::new(move |current: &OsStr| {
                candidates(current, environments.ask_cluster(lock_names))
            }))
        })
        .mut_arg("namespace", move |arg| {
            arg.add(ArgValueCompleter::new(move |current: &OsStr| {
                candidates(current, namespaces.ask_cluster(namespace_names))
            }))
        })
        .mut_arg("context", move |arg| {
            arg.add(ArgValueCompleter::new(move |current: &OsStr| {
                candidates(current, contexts.context_names())
            }))
        })
        // exec's command: a script or program path, as the shell would.
        .mut_subcommand("exec", |exec| {
            exec.mut_arg("command", |arg| {
                arg.add(ArgValueCompleter::new(PathCompleter::any()))
            })
        })
}

/// The names that start with what was typed, sorted.
fn candidates(current: &OsStr, names: Vec<String>) -> Vec<CompletionCandidate> {
    let Some(prefix) = current.to_str() else {
        return Vec::new();
    };
    let mut names: Vec<String> = names
        .into_iter()
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names.dedup();
    names.into_iter().map(CompletionCandidate::new).collect()
}

/// Where the command line points: its `-n`, `--context` and `--kubeconfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    pub namespace: Option<String>,
    pub context: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    /// A scope option has a value the real run would refuse (`-n BAD`):
    /// no candidates rather than another namespace's.
    pub invalid: bool,
}

impl Scope {
    /// Reads the scope options from the words after the program name, as
    /// clap reads them: `--namespace NS`, `--namespace=NS`, `-n NS`, `-nNS`,
    /// `-n=NS` and short clusters (`-vn NS`), in the subcommand they follow;
    /// nothing after `--` or after the start of exec's command (its own
    /// `-n` is not deploylock's). The word being completed may be among
    /// them: a scope option's value is never completed together with `-e`.
    pub fn from_words(cli: &clap::Command, words: &[OsString]) -> Scope {
        let mut scope = Scope::default();
        let mut command = cli;
        // The option whose value is the next word.
        let mut pending: Option<&clap::Arg> = None;
        for word in words {
            if let Some(arg) = pending.take() {
                scope.set(arg, word);
                continue;
            }
            let Some(text) = word.to_str() else {
                // Not UTF-8: no option of ours; a positional value.
                if starts_command(command) {
                    break;
                }
                continue;
            };
            if text == "--" {
                break;
            }
            if let Some(long) = text.strip_prefix("--") {
                let (name, value) = match long.split_once('=') {
                    Some((name, value)) => (name, Some(value)),
                    None => (long, None),
                };
                let Some(arg) = command
                    .get_arguments()
                    .find(|arg| arg.get_long() == Some(name))
                else {
                    continue;
                };
                match value {
                    Some(value) => scope.set(arg, OsStr::new(value)),
                    None if takes_value(arg) => pending = Some(arg),
                    None => {}
                }
            } else if let Some(shorts) = text.strip_prefix('-').filter(|rest| !rest.is_empty()) {
                // A cluster: flags up to the first option that takes a
                // value, which takes the rest of the word or the next word.
                for (at, short) in shorts.char_indices() {
                    let Some(arg) = command
                        .get_arguments()
                        .find(|arg| arg.get_short() == Some(short))
                    else {
                        break;
                    };
                    if takes_value(arg) {
                        let rest = &shorts[at + short.len_utf8()..];
                        let rest = rest.strip_prefix('=').unwrap_or(rest);
                        if rest.is_empty() {
                            pending = Some(arg);
                        } else {
                            scope.set(arg, OsStr::new(rest));
                        }
                        break;
                    }
                }
            } else if let Some(subcommand) = command.find_subcommand(text) {
                command = subcommand;
            } else if starts_command(command) {
                break;
            }
        }
        scope
    }

    fn set(&mut self, arg: &clap::Arg, value: &OsStr) {
        // The word being completed (`-n <TAB>`): not a choice yet.
        if value.is_empty() {
            return;
        }
        match arg.get_id().as_str() {
            "namespace" => match value.to_str().map(input::namespace) {
                Some(Ok(namespace)) => self.namespace = Some(namespace),
                _ => self.invalid = true,
            },
            "context" => match value.to_str() {
                Some(context) => self.context = Some(context.to_string()),
                None => self.invalid = true,
            },
            "kubeconfig" => self.kubeconfig = Some(PathBuf::from(value)),
            _ => {}
        }
    }

    /// Runs `list` against the cluster the scope selects, within
    /// [`CLUSTER_TIMEOUT`]; any failure is an empty list.
    fn ask_cluster<F>(&self, list: F) -> Vec<String>
    where
        F: AsyncFnOnce(kube::Client, String) -> Result<Vec<String>, kube::Error>,
    {
        if self.invalid {
            return Vec::new();
        }
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return Vec::new();
        };
        let asked = async {
            let mut config = load_config(self.kubeconfig.as_deref(), self.context.clone())
                .await
                .ok()?;
            // An exec credential plugin must not ask for a login in the
            // middle of a Tab: told it is not interactive, it fails instead.
            if let Some(exec) = config.auth_info.exec.as_mut() {
                exec.interactive_mode = Some(ExecInteractiveMode::Never);
            }
            config.connect_timeout = Some(CLUSTER_TIMEOUT);
            config.read_timeout = Some(CLUSTER_TIMEOUT);
            let namespace = self
                .namespace
                .clone()
                .unwrap_or_else(|| config.default_namespace.clone());
            let client = client_from(config).ok()?;
            list(client, namespace).await.ok()
        };
        runtime
            .block_on(async { tokio::time::timeout(CLUSTER_TIMEOUT, asked).await })
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// The contexts of the kubeconfig the scope selects (read, not asked of
    /// the cluster).
    fn context_names(&self) -> Vec<String> {
        let kubeconfig = match &self.kubeconfig {
            Some(path) => Kubeconfig::read_from(path),
            None => Kubeconfig::read(),
        };
        kubeconfig
            .map(|kubeconfig| {
                kubeconfig
                    .contexts
                    .into_iter()
                    .map(|context| context.name)
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn takes_value(arg: &clap::Arg) -> bool {
    arg.get_num_args().is_some_and(|range| range.takes_values())
}

/// Whether a positional word in `command` starts a trailing command line
/// (exec's): the words after it are that command's, not ours.
fn starts_command(command: &clap::Command) -> bool {
    command
        .get_positionals()
        .any(|arg| arg.is_trailing_var_arg_set())
}

async fn lock_names(client: kube::Client, namespace: String) -> Result<Vec<String>, kube::Error> {
    names(Api::<DeploymentLock>::namespaced(client, &namespace)).await
}

async fn namespace_names(client: kube::Client, _: String) -> Result<Vec<String>, kube::Error> {
    names(Api::<Namespace>::all(client)).await
}

/// The names of the objects `api` lists (metadata only).
async fn names<K>(api: Api<K>) -> Result<Vec<String>, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let listed = api.list_metadata(&ListParams::default()).await?;
    Ok(listed
        .items
        .into_iter()
        .filter_map(|object| object.metadata.name)
        .collect())
}

/// kubectl's plugin completion: kubectl runs `kubectl_complete-deploylock`
/// with the words after `kubectl deploylock`, the last one being completed,
/// and reads cobra's `__complete` answer: one `candidate<TAB>description` a
/// line, then `:DIRECTIVE`.
#[derive(Clone, Copy, Debug)]
pub struct Kubectl;

/// cobra's ShellCompDirective bits.
const NO_SPACE: u32 = 2;
const NO_FILE_COMPLETION: u32 = 4;

impl EnvCompleter for Kubectl {
    fn name(&self) -> &'static str {
        "kubectl"
    }

    fn is(&self, name: &str) -> bool {
        name == "kubectl"
    }

    fn write_registration(
        &self,
        var: &str,
        _name: &str,
        _bin: &str,
        _completer: &str,
        buf: &mut dyn std::io::Write,
    ) -> Result<(), std::io::Error> {
        // kubectl found kubectl-deploylock on PATH to run the plugin.
        write!(
            buf,
            "#!/bin/sh\n\
             # `kubectl deploylock <TAB>`: kubectl (1.26 or newer) runs this script,\n\
             # found on PATH as kubectl_complete-deploylock, with the words typed after\n\
             # `kubectl deploylock`. Written by `deploylock completion kubectl`.\n\
             {var}=kubectl exec kubectl-deploylock -- kubectl-deploylock \"$@\"\n"
        )
    }

    fn write_complete(
        &self,
        cmd: &mut clap::Command,
        args: Vec<OsString>,
        current_dir: Option<&std::path::Path>,
        buf: &mut dyn std::io::Write,
    ) -> Result<(), std::io::Error> {
        let index = args.len().saturating_sub(1);
        let completions = clap_complete::engine::complete(cmd, args, index, current_dir)?;
        let mut directive = NO_FILE_COMPLETION;
        for candidate in completions {
            let value = candidate.get_value().to_string_lossy();
            // A directory or `--flag=`: the word goes on.
            if value.ends_with(['/', '=']) {
                directive |= NO_SPACE;
            }
            write!(buf, "{value}")?;
            if let Some(help) = candidate.get_help() {
                let help = help.to_string();
                write!(buf, "\t{}", help.lines().next().unwrap_or_default())?;
            }
            writeln!(buf)?;
        }
        writeln!(buf, ":{directive}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope_of(line: &[&str]) -> Scope {
        let mut cli = Cli::command();
        cli.build();
        let words: Vec<OsString> = line.iter().map(OsString::from).collect();
        Scope::from_words(&cli, &words)
    }

    fn namespace_of(line: &[&str]) -> Option<String> {
        scope_of(line).namespace
    }

    #[test]
    fn the_namespace_is_read_in_every_spelling_clap_accepts() {
        for line in [
            &["-n", "ns", "status", "-e", ""][..],
            &["--namespace", "ns", "status", "-e"],
            &["--namespace=ns", "-e", "pro"],
            &["-nns", "-e", ""],
            &["-n=ns", "-e", ""],
            &["-vn", "ns", "-e", ""],
            &["-vnns", "-e", ""],
            // A global option after the subcommand.
            &["acquire", "--reason", "x", "-n", "ns", "-e", ""],
            &["-e", "", "-n", "ns"],
            // The word being completed is -e's value, not a scope option.
            &["-n", "ns", "-epro"],
            &["-n", "ns", "--environment=pro"],
        ] {
            assert_eq!(namespace_of(line).as_deref(), Some("ns"), "{line:?}");
        }
    }

    #[test]
    fn context_and_kubeconfig_are_read_and_the_last_value_wins() {
        let scope = scope_of(&[
            "--kubeconfig",
            "/tmp/a",
            "--context=one",
            "-n",
            "first",
            "--context",
            "two",
            "-n",
            "second",
            "status",
            "-e",
            "",
        ]);
        assert_eq!(
            scope,
            Scope {
                namespace: Some("second".into()),
                context: Some("two".into()),
                kubeconfig: Some(PathBuf::from("/tmp/a")),
                invalid: false,
            }
        );
        assert_eq!(scope_of(&["-e", ""]), Scope::default());
    }

    #[test]
    fn values_of_other_options_and_exec_commands_are_not_ours() {
        // After `--` and inside exec's command, -n belongs to the command.
        assert_eq!(
            namespace_of(&["exec", "--reason", "x", "--", "kubectl", "-n", "ns"]),
            None
        );
        assert_eq!(
            namespace_of(&["exec", "--reason", "x", "kubectl", "-n", "ns"]),
            None
        );
        // A value that is a word, not an option: --reason's.
        assert_eq!(namespace_of(&["acquire", "--reason", "-n"]), None);
        assert_eq!(
            namespace_of(&["exec", "--reason", "x", "-n", "ns", "--", "true"]).as_deref(),
            Some("ns")
        );
        // Unknown words and flags change nothing.
        assert_eq!(namespace_of(&["--bogus", "-Z", "status", "-e", ""]), None);
    }

    #[test]
    fn a_namespace_the_run_would_refuse_gives_no_scope() {
        let scope = scope_of(&["-n", "../kube-system", "-e", ""]);
        assert!(scope.invalid, "{scope:?}");
        assert!(scope.ask_cluster(lock_names).is_empty());
    }

    #[test]
    fn candidates_keep_the_names_with_the_typed_prefix_sorted() {
        let names = vec![
            "staging".to_string(),
            "production".to_string(),
            "preview".to_string(),
            "production".to_string(),
        ];
        let values = |prefix: &str| -> Vec<String> {
            candidates(OsStr::new(prefix), names.clone())
                .iter()
                .map(|candidate| candidate.get_value().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(values(""), ["preview", "production", "staging"]);
        assert_eq!(values("pr"), ["preview", "production"]);
        assert_eq!(values("prod"), ["production"]);
        assert!(values("x").is_empty());
    }

    #[test]
    fn every_script_calls_deploylock_back_with_its_variable() {
        for shell in [
            CompletionShell::Bash,
            CompletionShell::Zsh,
            CompletionShell::Fish,
            CompletionShell::Elvish,
            CompletionShell::Powershell,
            CompletionShell::Kubectl,
        ] {
            let script = script(shell).map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
            let script = script.unwrap_or_else(|err| panic!("{shell:?}: {err}"));
            assert!(script.contains(COMPLETE_VAR), "{shell:?}:\n{script}");
            assert!(script.contains("deploylock"), "{shell:?}:\n{script}");
        }
    }

    /// kubectl reads cobra's format: candidates, then the directive line.
    #[test]
    fn the_kubectl_answer_ends_with_a_cobra_directive() {
        let mut buffer = Vec::new();
        let args = ["kubectl-deploylock", "sta"].map(OsString::from).to_vec();
        let written = Kubectl.write_complete(&mut Cli::command(), args, None, &mut buffer);
        assert!(written.is_ok(), "{written:?}");
        let text = String::from_utf8_lossy(&buffer);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.first().map(|line| line.split('\t').next()),
            Some(Some("status")),
            "{text}"
        );
        assert_eq!(lines.last(), Some(&":4"), "{text}");
        let mut buffer = Vec::new();
        let args = ["kubectl-deploylock", "--names"]
            .map(OsString::from)
            .to_vec();
        let written = Kubectl.write_complete(&mut Cli::command(), args, None, &mut buffer);
        assert!(written.is_ok(), "{written:?}");
        assert_eq!(
            String::from_utf8_lossy(&buffer)
                .lines()
                .next()
                .map(|line| line.split('\t').next()),
            Some(Some("--namespace"))
        );
    }
}
