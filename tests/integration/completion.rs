//! Shell completion of environment names from the live cluster, asked the
//! way each shell asks it: bash through the function `deploylock completion
//! bash` defines, zsh and fish with the variables and words their scripts
//! pass, kubectl through the real kubectl's `__complete` and the
//! `kubectl_complete-deploylock` script.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kube::config::Kubeconfig;

use crate::support::{Identity, TestCluster, cluster, expect_exit, stderr_of, stdout_of};

const DEPLOYLOCK: &str = env!("CARGO_BIN_EXE_deploylock");

/// The directory of the built binaries (deploylock, kubectl-deploylock),
/// first on PATH as for an installed CLI.
fn path_with(dirs: &[&Path]) -> OsString {
    let mut paths: Vec<PathBuf> = dirs.iter().map(|dir| dir.to_path_buf()).collect();
    if let Some(bin) = Path::new(DEPLOYLOCK).parent() {
        paths.push(bin.to_path_buf());
    }
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(paths).unwrap_or_else(|err| panic!("cannot build PATH: {err}"))
}

fn run(command: &mut Command, what: &str) -> Output {
    command
        .env_remove("KUBECONFIG")
        .output()
        .unwrap_or_else(|err| panic!("cannot run {what}: {err}"))
}

/// Completion must be silent and succeed, whatever it found.
#[track_caller]
fn expect_quiet_success(output: &Output, what: &str) {
    expect_exit(output, 0, what);
    assert!(
        output.stderr.is_empty(),
        "{what}: stderr is not empty:\n{}",
        stderr_of(output)
    );
}

/// The candidates bash gets: the completion function that `deploylock
/// completion bash` defines, called as bash calls it for `words`, the last
/// word being completed (COMPREPLY, one a line).
fn bash_candidates(words: &[&str]) -> Vec<String> {
    let script = run(
        Command::new(DEPLOYLOCK).args(["completion", "bash"]),
        "completion bash",
    );
    expect_quiet_success(&script, "deploylock completion bash");
    let driver = r#"
eval "$COMPLETION_SCRIPT"
COMP_WORDS=("$@")
COMP_CWORD=$(( $# - 1 ))
COMP_LINE="$*"
COMP_POINT=${#COMP_LINE}
COMP_TYPE=9
_clap_complete_deploylock "$1" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
status=$?
printf '%s\n' "${COMPREPLY[@]}"
exit $status
"#;
    let output = run(
        Command::new("bash")
            .arg("-c")
            .arg(driver)
            .arg("bash")
            .args(words)
            .env("COMPLETION_SCRIPT", stdout_of(&script))
            .env("PATH", path_with(&[])),
        "bash",
    );
    expect_quiet_success(&output, &format!("bash completion of {words:?}"));
    lines(&output)
}

/// The candidates fish gets: its script runs `DEPLOYLOCK_COMPLETE=fish
/// deploylock -- WORDS...` (the words up to the cursor, the last being
/// completed) and reads `value[<TAB>help]` lines.
fn fish_candidates(words: &[&str]) -> Vec<String> {
    let output = run(
        Command::new(DEPLOYLOCK)
            .arg("--")
            .args(words)
            .env("DEPLOYLOCK_COMPLETE", "fish"),
        "deploylock as fish's completer",
    );
    expect_quiet_success(&output, &format!("fish completion of {words:?}"));
    lines(&output)
        .into_iter()
        .map(|line| line.split('\t').next().unwrap_or_default().to_string())
        .collect()
}

/// The candidates zsh gets: its script passes all words and the index of
/// the one being completed, and reads `value[:help]` lines.
fn zsh_candidates(words: &[&str]) -> Vec<String> {
    let index = words.len().saturating_sub(1);
    let output = run(
        Command::new(DEPLOYLOCK)
            .arg("--")
            .args(words)
            .env("DEPLOYLOCK_COMPLETE", "zsh")
            .env("_CLAP_COMPLETE_INDEX", index.to_string())
            .env("_CLAP_IFS", "\n"),
        "deploylock as zsh's completer",
    );
    expect_quiet_success(&output, &format!("zsh completion of {words:?}"));
    lines(&output)
}

/// What `kubectl __complete deploylock WORDS...` offers (kubectl runs
/// kubectl_complete-deploylock from PATH), and cobra's directive.
fn kubectl_candidates(cluster: &TestCluster, bin: &Path, words: &[&str]) -> (Vec<String>, String) {
    let output = run(
        Command::new(cluster.bin_dir().join("kubectl"))
            .arg("__complete")
            .arg("deploylock")
            .args(words)
            .env("PATH", path_with(&[bin])),
        "kubectl __complete",
    );
    expect_exit(
        &output,
        0,
        &format!("kubectl __complete deploylock {words:?}"),
    );
    let mut candidates = lines(&output);
    let directive = candidates.pop().unwrap_or_default();
    (candidates, directive)
}

fn as_strs(words: &[String]) -> Vec<&str> {
    words.iter().map(String::as_str).collect()
}

fn lines(output: &Output) -> Vec<String> {
    stdout_of(output)
        .lines()
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect()
}

fn acquire(cluster: &TestCluster, namespace: &str, environment: &str) {
    let output = cluster.deploylock(
        Identity::Alice,
        namespace,
        &["-e", environment, "acquire", "--reason", "completion test"],
    );
    expect_exit(&output, 0, &format!("acquire {environment} in {namespace}"));
}

/// `kubeconfig` with its context's namespace set, or its server replaced.
fn edited_kubeconfig(
    kubeconfig: &Path,
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut Kubeconfig),
) -> PathBuf {
    let mut config = Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", kubeconfig.display()));
    edit(&mut config);
    let text = serde_yaml::to_string(&config)
        .unwrap_or_else(|err| panic!("cannot write the kubeconfig {name}: {err}"));
    let path = dir.join(name);
    std::fs::write(&path, text)
        .unwrap_or_else(|err| panic!("cannot write {}: {err}", path.display()));
    path
}

#[tokio::test]
async fn environment_names_come_from_the_namespace_the_line_selects() {
    let cluster = cluster();
    let first = cluster.namespace("complete-first").await;
    let second = cluster.namespace("complete-second").await;
    acquire(cluster, &first, "production");
    acquire(cluster, &first, "preview");
    acquire(cluster, &second, "staging");
    let kubeconfig = cluster.kubeconfig(Identity::Alice);
    let kubeconfig = kubeconfig.to_string_lossy();
    let both = ["preview", "production"];

    // -e after the subcommand, the scope before it, as typed.
    let line = |namespace: &str, current: &str| -> Vec<String> {
        [
            "deploylock",
            "--kubeconfig",
            &kubeconfig,
            "-n",
            namespace,
            "status",
            "-e",
            current,
        ]
        .map(str::to_string)
        .to_vec()
    };
    for (namespace, current, expected) in [
        (first.as_str(), "", &both[..]),
        (first.as_str(), "pr", &both[..]),
        (first.as_str(), "prod", &["production"][..]),
        (first.as_str(), "x", &[][..]),
        (second.as_str(), "", &["staging"][..]),
    ] {
        let words = line(namespace, current);
        let words = as_strs(&words);
        assert_eq!(bash_candidates(&words), expected, "bash: {words:?}");
        assert_eq!(fish_candidates(&words), expected, "fish: {words:?}");
        assert_eq!(zsh_candidates(&words), expected, "zsh: {words:?}");
    }

    // The other spellings: --environment=, -e before the subcommand, the
    // scope options after it and as --namespace=.
    let spelled = [
        "deploylock",
        "-n",
        &first,
        "--kubeconfig",
        &kubeconfig,
        "acquire",
        "--reason",
        "x",
        "--environment=pre",
    ];
    assert_eq!(fish_candidates(&spelled), ["--environment=preview"]);
    let namespace_flag = format!("--namespace={second}");
    let spelled = [
        "deploylock",
        "-e",
        "",
        "--kubeconfig",
        &kubeconfig,
        &namespace_flag,
    ];
    let index_of_e_value = 2;
    let output = run(
        Command::new(DEPLOYLOCK)
            .arg("--")
            .args(spelled)
            .env("DEPLOYLOCK_COMPLETE", "bash")
            .env("_CLAP_COMPLETE_INDEX", index_of_e_value.to_string())
            .env("_CLAP_IFS", "\n"),
        "deploylock as bash's completer",
    );
    expect_quiet_success(&output, "scope typed after the cursor");
    assert_eq!(lines(&output), ["staging"]);

    // No -n: the kubeconfig context's namespace, as the CLI resolves it.
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("no temp dir: {err}"));
    let in_first = edited_kubeconfig(
        &cluster.kubeconfig(Identity::Alice),
        dir.path(),
        "in-first.kubeconfig",
        |config| {
            for context in &mut config.contexts {
                if let Some(context) = context.context.as_mut() {
                    context.namespace = Some(first.clone());
                }
            }
        },
    );
    let in_first = in_first.to_string_lossy();
    let words = ["deploylock", "--kubeconfig", &in_first, "history", "-e", ""];
    assert_eq!(bash_candidates(&words), both);
    let words = [
        "deploylock",
        "--kubeconfig",
        &in_first,
        "-n",
        &second,
        "-e",
        "",
    ];
    assert_eq!(bash_candidates(&words), ["staging"]);

    // kubectl deploylock <TAB>: the real kubectl runs the script `deploylock
    // completion kubectl` writes, found on PATH.
    let bin = tempfile::tempdir().unwrap_or_else(|err| panic!("no temp dir: {err}"));
    let script = run(
        Command::new(DEPLOYLOCK).args(["completion", "kubectl"]),
        "completion kubectl",
    );
    expect_quiet_success(&script, "deploylock completion kubectl");
    let script_path = bin.path().join("kubectl_complete-deploylock");
    std::fs::write(&script_path, &script.stdout)
        .unwrap_or_else(|err| panic!("cannot write the script: {err}"));
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script_path, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|err| panic!("cannot make the script executable: {err}"));
    }
    let (candidates, directive) = kubectl_candidates(
        cluster,
        bin.path(),
        &[
            "--kubeconfig",
            &kubeconfig,
            "-n",
            &first,
            "status",
            "-e",
            "",
        ],
    );
    assert_eq!(candidates, both);
    // ShellCompDirectiveNoFileComp: no file names offered instead.
    assert_eq!(directive, ":4");
    let (candidates, _) = kubectl_candidates(
        cluster,
        bin.path(),
        &["--kubeconfig", &kubeconfig, "-n", &second, "-e", "st"],
    );
    assert_eq!(candidates, ["staging"]);
    let (candidates, _) = kubectl_candidates(cluster, bin.path(), &["force-r"]);
    assert_eq!(candidates.len(), 1, "{candidates:?}");
    assert!(candidates[0].starts_with("force-release"), "{candidates:?}");
}

/// No cluster: no candidates, nothing on stderr, exit 0, whether the
/// server refuses the connection or accepts it and never answers.
#[tokio::test]
async fn an_unreachable_cluster_gives_no_candidates_and_no_error() {
    let cluster = cluster();
    let dir = tempfile::tempdir().unwrap_or_else(|err| panic!("no temp dir: {err}"));
    // Accepts connections (the kernel does) and never answers a byte.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|err| panic!("cannot listen on loopback: {err}"));
    let silent_port = silent
        .local_addr()
        .unwrap_or_else(|err| panic!("no local address: {err}"))
        .port();
    for (name, server) in [
        ("refused.kubeconfig", "https://127.0.0.1:1".to_string()),
        (
            "silent.kubeconfig",
            format!("https://127.0.0.1:{silent_port}"),
        ),
    ] {
        let kubeconfig = edited_kubeconfig(
            &cluster.kubeconfig(Identity::Alice),
            dir.path(),
            name,
            |config| {
                for named in &mut config.clusters {
                    if let Some(cluster) = named.cluster.as_mut() {
                        cluster.server = Some(server.clone());
                    }
                }
            },
        );
        let kubeconfig = kubeconfig.to_string_lossy();
        let words = [
            "deploylock",
            "--kubeconfig",
            &kubeconfig,
            "-n",
            "default",
            "-e",
            "",
        ];
        assert!(bash_candidates(&words).is_empty(), "{name}");
        assert!(fish_candidates(&words).is_empty(), "{name}");
        assert!(zsh_candidates(&words).is_empty(), "{name}");
    }
    // A kubeconfig that does not exist: the same.
    let missing = dir.path().join("missing.kubeconfig");
    let missing = missing.to_string_lossy();
    let words = ["deploylock", "--kubeconfig", &missing, "-e", "pro"];
    assert!(fish_candidates(&words).is_empty());
    // The run itself is unchanged: without the variable, a real error.
    let output = run(
        Command::new(DEPLOYLOCK).args(["--kubeconfig", &missing, "status"]),
        "deploylock status",
    );
    assert_ne!(output.status.code(), Some(0), "{}", stderr_of(&output));
}

/// The scripts `deploylock completion SHELL` prints, as the README installs
/// them: each registers a function that calls deploylock back.
#[test]
fn completion_scripts_call_deploylock_back() {
    for (shell, markers) in [
        (
            "bash",
            &[
                "_clap_complete_deploylock()",
                "DEPLOYLOCK_COMPLETE=\"bash\"",
                "-F _clap_complete_deploylock deploylock",
            ][..],
        ),
        (
            "zsh",
            &[
                "#compdef deploylock",
                "DEPLOYLOCK_COMPLETE=\"zsh\"",
                "compdef ",
            ],
        ),
        (
            "fish",
            &[
                "complete --keep-order --exclusive --command deploylock",
                "DEPLOYLOCK_COMPLETE=fish",
            ],
        ),
        ("elvish", &["DEPLOYLOCK_COMPLETE=\"elvish\""]),
        (
            "powershell",
            &["Register-ArgumentCompleter", "DEPLOYLOCK_COMPLETE"],
        ),
        (
            "kubectl",
            &[
                "#!/bin/sh",
                "DEPLOYLOCK_COMPLETE=kubectl exec kubectl-deploylock --",
            ],
        ),
    ] {
        let output = run(Command::new(DEPLOYLOCK).args(["completion", shell]), shell);
        expect_quiet_success(&output, &format!("completion {shell}"));
        let text = stdout_of(&output);
        for marker in markers {
            assert!(text.contains(marker), "{shell}: no {marker:?} in:\n{text}");
        }
    }
    // Actions and options come from the binary too.
    let words = ["deploylock", "force-"];
    assert_eq!(
        fish_candidates(&words).first().map(String::as_str),
        Some("force-release")
    );
    let words = ["deploylock", "status", "--envi"];
    assert_eq!(fish_candidates(&words), ["--environment"]);
}
