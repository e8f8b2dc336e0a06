//! The one place where errors become a message and an exit code.

use std::process::ExitCode;

use chrono::{DateTime, Utc};

use crate::crd::LockHolder;
use crate::environment::Environment;
use crate::error::Error;
use crate::rules::Refusal;
use crate::store::MalformedLock;

use super::args::GlobalArgs;
use super::render::{self, OutputFormat, escape};

/// Exit codes, stable: CI scripts branch on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0: the action succeeded.
    Success,
    /// 1: an unexpected failure (an API error not listed below, too much
    /// contention, a malformed lock; `list`: a malformed lock was skipped).
    Failure,
    /// 2: invalid input: a bad flag, name, duration, metadata, or an object
    /// the API server's validation refused. Nothing was changed.
    InvalidInput,
    /// 3: the lock is held by someone else (or already by you).
    Held,
    /// 4: `--wait-timeout` passed before the lock became free.
    WaitTimeout,
    /// 5: not the holder, or the API server forbade the request.
    Forbidden,
    /// 6: the cluster is unreachable or not configured, or the CRD is not installed.
    Unreachable,
    /// 7: the caller's holding is over (released by someone else, taken
    /// over, expired).
    LockLost,
    /// 8: `exec`: the command ended but the lock could not be released (it
    /// stays held until it expires).
    NotReleased,
    /// 130: interrupted by a signal while acquiring or waiting.
    Interrupted,
    /// `exec`: the command's own exit code.
    Child(i32),
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::InvalidInput => 2,
            Exit::Held => 3,
            Exit::WaitTimeout => 4,
            Exit::Forbidden => 5,
            Exit::Unreachable => 6,
            Exit::LockLost => 7,
            Exit::NotReleased => 8,
            Exit::Interrupted => 130,
            Exit::Child(code) => u8::try_from(code).unwrap_or(1),
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

/// Every exit code and its meaning, in order: `--help` shows them
/// ([`exit_codes_help`]) and a test holds the README's table to them.
pub const EXIT_CODES: &[(Exit, &str)] = &[
    (Exit::Success, "success"),
    (
        Exit::Failure,
        "unexpected failure; also: the lock is malformed (stored, but undecodable), or `list` skipped a malformed lock",
    ),
    (
        Exit::InvalidInput,
        "invalid input: bad flag, name, namespace, duration, metadata; nothing was changed",
    ),
    (
        Exit::Held,
        "the lock is held by someone else (the message says who, since when, until when, why)",
    ),
    (
        Exit::WaitTimeout,
        "`--wait-timeout` passed before the lock became free",
    ),
    (
        Exit::Forbidden,
        "not the holder, or the API server forbade the request",
    ),
    (
        Exit::Unreachable,
        "cluster unreachable or not configured, the CRD is not installed, or no answer from the API server within 10 s (waiters: a fault that outlasted `--wait-timeout`)",
    ),
    (
        Exit::LockLost,
        "your holding is over (taken over, force-released or expired); `exec`: lost while the command ran, or stopped because no renewal succeeded before the holding could expire",
    ),
    (
        Exit::NotReleased,
        "`exec`: the command ended but the lock could not be released; it stays held until it expires",
    ),
    (
        Exit::Interrupted,
        "interrupted (Ctrl-C, SIGTERM, SIGHUP) while connecting, acquiring or waiting, or any other action interrupted",
    ),
];

/// The exit code table shown after `deploylock --help`.
pub fn exit_codes_help() -> String {
    let mut help = String::from("Exit codes:\n");
    for (exit, meaning) in EXIT_CODES {
        help.push_str(&format!("  {:>3}  {meaning}\n", exit.code()));
    }
    help.push_str("exec exits with the command's own code once the lock is held.");
    help
}

/// The README's exit code table, as [`EXIT_CODES`] makes it.
pub fn exit_codes_markdown() -> String {
    let mut table = String::from("| code | meaning |\n|---|---|\n");
    for (exit, meaning) in EXIT_CODES {
        table.push_str(&format!("| {} | {meaning} |\n", exit.code()));
    }
    table
}

/// Formats a time with how far it is from the server's now.
pub fn when(time: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let stamp = time.format("%Y-%m-%dT%H:%M:%SZ");
    let delta = time - now;
    let span = humantime::format_duration(std::time::Duration::from_secs(
        delta.num_seconds().unsigned_abs(),
    ));
    if delta.num_seconds() == 0 {
        format!("{stamp} (now)")
    } else if delta.num_seconds() > 0 {
        format!("{stamp} (in {span})")
    } else {
        format!("{stamp} ({span} ago)")
    }
}

/// The message (one or two lines) and exit code for an error. Every line is
/// escaped as a whole: owners, reasons and names come from other clients or
/// from the API server, and none may drive the reader's terminal.
pub fn describe(err: &Error, environment: &Environment, now: DateTime<Utc>) -> (String, Exit) {
    describe_for(err, environment, "", now)
}

/// [`describe`], with the hints naming `scope` after the environment: the
/// flags the user gave to pick the cluster and namespace ([`scope_flags`]),
/// so that a suggested command pasted as is acts on the same lock.
pub fn describe_for(
    err: &Error,
    environment: &Environment,
    scope: &str,
    now: DateTime<Utc>,
) -> (String, Exit) {
    let lines = describe_lines(err, environment, scope, now);
    (safe_lines(&lines), exit_for(err))
}

/// Says on stderr why an action failed and returns its exit code; with
/// `-o json`/`yaml`, a refusal is also printed on stdout as a structured
/// report. `now` is the API server's, if it was reached: refusals name
/// times relative to it.
pub fn print_failure(err: &Error, global: &GlobalArgs, now: DateTime<Utc>) -> Exit {
    let scope = global_scope_flags(global);
    let env = &global.environment;
    let (message, exit) = describe_for(err, env, &scope, now);
    eprintln!("deploylock: {message}");
    if global.output != OutputFormat::Table && is_refusal(err) {
        let report = ErrorReport::new(err, env, &scope, now);
        out!("{}", render::structured(&report, global.output));
    }
    exit
}

/// [`scope_flags`] of the global arguments.
pub fn global_scope_flags(global: &GlobalArgs) -> String {
    scope_flags(
        global.namespace.as_deref(),
        global.context.as_deref(),
        global.kubeconfig.as_deref(),
    )
}

/// The flags that chose the lock's cluster and namespace, as the user gave
/// them, quoted for a POSIX shell: " -n team-a --context ci --kubeconfig '/my dir/k'".
pub fn scope_flags(
    namespace: Option<&str>,
    context: Option<&str>,
    kubeconfig: Option<&std::path::Path>,
) -> String {
    let mut flags = String::new();
    if let Some(namespace) = namespace {
        flags.push_str(&format!(" -n {}", shell_quoted(namespace)));
    }
    if let Some(context) = context {
        flags.push_str(&format!(" --context {}", shell_quoted(context)));
    }
    if let Some(kubeconfig) = kubeconfig {
        flags.push_str(&format!(
            " --kubeconfig {}",
            shell_quoted(&kubeconfig.to_string_lossy())
        ));
    }
    flags
}

/// `word` as one word of a POSIX shell: as is when it needs no quoting,
/// else in single quotes.
fn shell_quoted(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// With `-o json|yaml`, an error is also an object on stdout for scripts:
/// `{"error": {"code", "reason", "message", "holder"}}` (exact text, not
/// escaped: the serialiser escapes what it must).
#[derive(serde::Serialize, Debug)]
pub struct ErrorReport {
    pub error: ErrorBody,
}

#[derive(serde::Serialize, Debug)]
pub struct ErrorBody {
    /// The exit code.
    pub code: u8,
    /// A stable word for the kind of error, e.g. `HeldByOther`.
    pub reason: &'static str,
    pub message: String,
    /// The holding the error names, if any.
    pub holder: Option<LockHolder>,
}

impl ErrorReport {
    pub fn new(err: &Error, environment: &Environment, scope: &str, now: DateTime<Utc>) -> Self {
        ErrorReport {
            error: ErrorBody {
                code: exit_for(err).code(),
                reason: error_reason(err),
                message: describe_lines(err, environment, scope, now).join("\n"),
                holder: named_holder(err).cloned(),
            },
        }
    }
}

/// A refusal of the lock (held, not yours, over, timed out waiting): what
/// `-o json|yaml` also reports as an object on stdout.
pub fn is_refusal(err: &Error) -> bool {
    matches!(
        err,
        Error::Refused(_) | Error::WaitTimedOut(_) | Error::WaitTimedOutFrozen(_)
    )
}

/// The kind of an error, one stable word.
fn error_reason(err: &Error) -> &'static str {
    match err {
        Error::Refused(refusal) => match refusal {
            Refusal::HeldByOther(_) => "HeldByOther",
            Refusal::AlreadyHeldByYou(_) => "AlreadyHeldByYou",
            Refusal::EmergencyLockInForce(_) => "EmergencyLockInForce",
            Refusal::NotHolder(_) => "NotHolder",
            Refusal::LockLost { .. } => "LockLost",
            Refusal::NotHeld => "NotHeld",
            Refusal::ExpiredCannotExtend(_) => "ExpiredCannotExtend",
            Refusal::ReasonRequired => "ReasonRequired",
            Refusal::DurationOutOfRange => "DurationOutOfRange",
            Refusal::QueuedBehind { .. } => "QueuedBehind",
            Refusal::QueueFull => "QueueFull",
            Refusal::TooManyPlaces => "TooManyPlaces",
            Refusal::CounterExhausted => "CounterExhausted",
        },
        Error::InvalidInput(_) => "InvalidInput",
        Error::Rejected(_) => "Rejected",
        Error::NamespaceNotFound { .. } => "NamespaceNotFound",
        Error::Config(_) => "Config",
        Error::Unreachable(_) => "Unreachable",
        Error::CrdNotInstalled(_) => "CrdNotInstalled",
        Error::Unauthorized(_) => "Unauthorized",
        Error::Forbidden(_) => "Forbidden",
        Error::Contention(_) => "Contention",
        Error::WaitTimedOut(_) | Error::WaitTimedOutFrozen(_) => "WaitTimedOut",
        Error::Malformed(_) => "Malformed",
        Error::Api(_) => "Api",
        Error::Interrupted => "Interrupted",
    }
}

/// The holding an error names (who holds the lock), if any.
fn named_holder(err: &Error) -> Option<&LockHolder> {
    match err {
        Error::Refused(
            Refusal::HeldByOther(holder)
            | Refusal::AlreadyHeldByYou(holder)
            | Refusal::EmergencyLockInForce(holder)
            | Refusal::NotHolder(holder)
            | Refusal::ExpiredCannotExtend(holder),
        ) => Some(holder),
        Error::Refused(Refusal::LockLost { current, .. }) => current.as_deref(),
        Error::WaitTimedOut(holder) => holder.as_deref(),
        Error::WaitTimedOutFrozen(holder) => Some(holder),
        _ => None,
    }
}

/// Lines escaped one by one, then joined: the only line breaks are ours.
fn safe_lines(lines: &[String]) -> String {
    lines
        .iter()
        .map(|line| escape(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One progress or notice line, escaped (it may name another client's holder).
pub fn safe_line(line: &str) -> String {
    escape(line).into_owned()
}

/// The warning `list` prints for each object it skipped.
pub fn skipped_malformed(malformed: &MalformedLock) -> String {
    safe_line(&format!(
        "skipped the malformed DeploymentLock {:?} in namespace {:?} ({}: {}): an admin can inspect it with `kubectl get deploymentlock {} -n {} -o yaml`",
        malformed.name,
        malformed.namespace,
        malformed.location,
        malformed.source,
        malformed.name,
        malformed.namespace
    ))
}

/// The exit code of an error: the one place that decides it.
pub fn exit_for(err: &Error) -> Exit {
    match err {
        Error::Refused(refusal) => match refusal {
            Refusal::HeldByOther(_)
            | Refusal::AlreadyHeldByYou(_)
            | Refusal::EmergencyLockInForce(_)
            | Refusal::QueuedBehind { .. }
            | Refusal::QueueFull
            | Refusal::TooManyPlaces => Exit::Held,
            Refusal::NotHolder(_) | Refusal::NotHeld => Exit::Forbidden,
            Refusal::LockLost { .. } | Refusal::ExpiredCannotExtend(_) => Exit::LockLost,
            Refusal::ReasonRequired | Refusal::DurationOutOfRange => Exit::InvalidInput,
            Refusal::CounterExhausted => Exit::Failure,
        },
        Error::InvalidInput(_) | Error::Rejected(_) | Error::NamespaceNotFound { .. } => {
            Exit::InvalidInput
        }
        Error::Config(_) | Error::Unreachable(_) | Error::CrdNotInstalled(_) => Exit::Unreachable,
        Error::Unauthorized(_) | Error::Forbidden(_) => Exit::Forbidden,
        Error::Contention(_) | Error::Malformed(_) | Error::Api(_) => Exit::Failure,
        Error::WaitTimedOut(_) | Error::WaitTimedOutFrozen(_) => Exit::WaitTimeout,
        Error::Interrupted => Exit::Interrupted,
    }
}

/// Who holds a lock, as people should read it: the identity the API
/// server authenticated first, the `--owner` display label beside it when it
/// differs ("bob (owner label: alice)").
pub fn holder_name(holder: &LockHolder) -> String {
    shown_name(&holder.user, &holder.owner)
}

/// A user and their display label, as [`holder_name`] shows a holder.
pub fn shown_name(user: &str, owner: &str) -> String {
    if owner == user {
        user.to_string()
    } else {
        format!("{user} (owner label: {owner})")
    }
}

/// "since … until …, reason: …" of a holding.
fn held_since(holder: &LockHolder, now: DateTime<Utc>) -> String {
    format!(
        "since {} until {}, reason: \"{}\"",
        holder.acquired_at.format("%Y-%m-%dT%H:%M:%SZ"),
        when(holder.expires_at, now),
        holder.reason
    )
}

/// "user (owner label: L) since … until …, reason: …" of a holding.
fn holding(holder: &LockHolder, now: DateTime<Utc>) -> String {
    format!("{} {}", holder_name(holder), held_since(holder, now))
}

/// A refusal's lines: its one wording (`Refusal`'s Display) for the
/// environment, what the refusal names (relative to the server's now), and
/// what to do next. One arm per refusal, side by side on purpose (so it is
/// a little over the usual length).
fn refusal_lines(
    refusal: &Refusal,
    env: &Environment,
    scope: &str,
    now: DateTime<Utc>,
) -> Vec<String> {
    let headline = format!("{env}: {refusal}");
    // What hints name: this lock, in the namespace and cluster the user chose.
    let target = format!("-e {env}{scope}");
    match refusal {
        // The holder is named by identity first, not by the refusal's
        // Display (which names the display label).
        Refusal::HeldByOther(holder) => vec![
            format!("{env}: the lock is held by {}", holding(holder, now)),
            format!(
                "wait for it with `deploylock wait {target}`, or override with `deploylock force-release {target} --reason ...`"
            ),
        ],
        Refusal::AlreadyHeldByYou(holder) => vec![
            format!(
                "{headline} as {} (lock ID {}) until {}, reason: \"{}\"",
                holder_name(holder),
                holder.lock_id,
                when(holder.expires_at, now),
                holder.reason
            ),
            format!(
                "extend it with `deploylock extend {target}` or release it with `deploylock release {target}`"
            ),
        ],
        Refusal::EmergencyLockInForce(holder) => vec![
            format!(
                "{env}: an emergency lock held by {} is in force",
                holding(holder, now)
            ),
            format!("it must be released first: `deploylock force-release {target} --reason ...`"),
        ],
        Refusal::NotHolder(holder) => vec![
            format!(
                "{env}: the lock is held by {}, not by you {}: only the holder can release or extend it",
                holder_name(holder),
                held_since(holder, now)
            ),
            format!("to take it away use `deploylock force-release {target} --reason ...`"),
        ],
        Refusal::LockLost { current, .. } => {
            let now_held = match current {
                Some(holder) => format!("it is now held by {}", holding(holder, now)),
                None => "it is now available".to_string(),
            };
            vec![format!("{headline}: {now_held}")]
        }
        Refusal::NotHeld => vec![
            format!("{headline}: nothing to extend"),
            format!("acquire it with `deploylock acquire {target} --reason ...`"),
        ],
        Refusal::ExpiredCannotExtend(holder) => vec![
            format!(
                "{headline} ({}): it can no longer be extended",
                when(holder.expires_at, now)
            ),
            format!(
                "renew it with `deploylock acquire {target} --extend` (if nobody took it over or waits for it), or acquire it again with `deploylock acquire {target} --reason ...`"
            ),
        ],
        Refusal::ReasonRequired => vec![format!("{refusal}: add --reason \"...\"")],
        Refusal::QueuedBehind { next, waiting } => vec![
            format!(
                "{env}: {waiting} client(s) are waiting for the lock; {} is next (waiting since {}), reason: \"{}\"",
                shown_name(&next.user, &next.owner),
                when(next.since, now),
                next.reason
            ),
            format!(
                "join the queue with `deploylock acquire {target} --wait-timeout SECONDS --reason ...`"
            ),
        ],
        Refusal::QueueFull => vec![format!("{headline}: try again later")],
        Refusal::TooManyPlaces => vec![format!(
            "{headline}: try again once one of your waiting clients is served or gives up"
        )],
        Refusal::CounterExhausted => vec![format!(
            "{headline} (2^53-1): an admin must delete the lock (it is created again with a token from the clock)"
        )],
        Refusal::DurationOutOfRange => {
            vec![format!("{refusal}: a lock lasts from 1 minute to 7 days")]
        }
    }
}

fn describe_lines(
    err: &Error,
    environment: &Environment,
    scope: &str,
    now: DateTime<Utc>,
) -> Vec<String> {
    let env = environment;
    match err {
        Error::Refused(refusal) => refusal_lines(refusal, env, scope, now),
        Error::InvalidInput(message) => vec![message.clone()],
        Error::Rejected(failure) => {
            vec![format!("the API server rejected the lock: {failure}")]
        }
        Error::NamespaceNotFound { namespace, .. } => vec![format!(
            "namespace {namespace:?} does not exist: pick another with -n/--namespace"
        )],
        Error::Config(source) => vec![format!(
            "no usable Kubernetes configuration ({source}): set KUBECONFIG or pass --kubeconfig/--context"
        )],
        Error::Unreachable(failure) => vec![format!(
            "cannot reach the Kubernetes API server ({failure}): check --kubeconfig/--context and that the cluster is up"
        )],
        Error::CrdNotInstalled(_) => vec!["the DeploymentLock CRD is not installed in this cluster: install it with `make install` or `kubectl apply -f crds/`".to_string()],
        Error::Unauthorized(failure) => vec![format!(
            "the API server did not accept your credentials ({failure}): check your kubeconfig"
        )],
        Error::Forbidden(failure) => {
            // Keep the policy's own words, not the admission plumbing.
            let message = failure.message.as_str();
            let reason = message
                .split_once("denied request: ")
                .map_or(message, |(_, reason)| reason);
            vec![format!("the API server refused: {reason}")]
        }
        Error::Contention(attempts) => vec![format!(
            "gave up after {attempts} conflicting writes from other clients: try again"
        )],
        Error::WaitTimedOut(holder) => {
            let held = match holder {
                Some(holder) => format!(": still held by {}", holding(holder, now)),
                None => String::new(),
            };
            vec![format!("timed out waiting for {env}{held}")]
        }
        Error::WaitTimedOutFrozen(holder) => vec![format!(
            "timed out waiting for {env}: the namespace is still frozen, stop-the-line held by {}",
            holding(holder, now)
        )],
        Error::Malformed(malformed) => vec![
            format!(
                "the DeploymentLock {:?} in namespace {:?} is malformed and cannot be read ({}: {})",
                malformed.name, malformed.namespace, malformed.location, malformed.source
            ),
            format!(
                "an admin can inspect it with `kubectl get deploymentlock {} -n {} -o yaml`, then fix or delete it",
                malformed.name, malformed.namespace
            ),
        ],
        Error::Api(failure) => vec![format!("Kubernetes API error: {failure}")],
        Error::Interrupted => vec![format!(
            "interrupted by a signal while acquiring {env}: gave up (and left the queue)"
        )],
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::crd::Waiter;

    const EVIL: &str = "\u{1b}]8;;http://evil\u{7}\u{1b}[2J\u{202e}\u{9b}\r\n";

    fn decoded<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
        match serde_json::from_value(value) {
            Ok(decoded) => decoded,
            Err(err) => panic!("test value does not decode: {err}"),
        }
    }

    fn holder() -> Box<LockHolder> {
        decoded(crate::testdata::holder(EVIL))
    }

    fn production() -> Environment {
        "production".parse().unwrap_or_else(|err| panic!("{err}"))
    }

    fn now() -> DateTime<Utc> {
        match DateTime::parse_from_rfc3339("2030-01-01T00:10:00Z") {
            Ok(time) => time.with_timezone(&Utc),
            Err(err) => panic!("{err}"),
        }
    }

    /// Every message, whatever it names, is at most two lines of text a
    /// terminal only prints.
    #[test]
    fn every_message_is_escaped() {
        let waiter: Box<Waiter> = decoded(crate::testdata::waiter(EVIL));
        let malformed = crate::store::decode_lock(json!({
            "metadata": { "name": format!("bad{EVIL}"), "namespace": format!("ns{EVIL}") },
            "spec": { "environment": format!("{EVIL}"), "history": [{ "at": format!("x{EVIL}") }] }
        }));
        let errors = vec![
            Error::Refused(Refusal::HeldByOther(holder())),
            Error::Refused(Refusal::AlreadyHeldByYou(holder())),
            Error::Refused(Refusal::EmergencyLockInForce(holder())),
            Error::Refused(Refusal::NotHolder(holder())),
            Error::Refused(Refusal::LockLost {
                expected_lock_id: format!("mine{EVIL}"),
                current: Some(holder()),
            }),
            Error::Refused(Refusal::QueuedBehind {
                next: waiter,
                waiting: 2,
            }),
            Error::WaitTimedOut(Some(holder())),
            Error::Forbidden(format!("denied request: {EVIL}").into()),
            Error::Api(format!("api{EVIL}").into()),
            Error::Rejected(format!("rejected{EVIL}").into()),
            Error::InvalidInput(format!("input{EVIL}")),
            match malformed {
                Ok(lock) => panic!("decoded: {lock:?}"),
                Err(malformed) => Error::Malformed(malformed),
            },
        ];
        for err in &errors {
            let (message, _) = describe(err, &production(), now());
            let lines: Vec<&str> = message.split('\n').collect();
            assert!(!lines.is_empty() && lines.len() <= 2, "{err:?}: {message}");
            assert!(
                !message.chars().any(
                    |c| (c.is_control() && c != '\n') || ('\u{202a}'..='\u{202e}').contains(&c)
                ),
                "{err:?}: {message:?}"
            );
            assert!(
                message.contains("\\x1b]8;;http://evil\\x07\\x1b[2J\\u202e\\u009b\\r\\n"),
                "{err:?}: the hostile text is not shown escaped: {message}"
            );
        }
    }

    /// Every exit code is listed once, in order, and the README's table is
    /// the list's.
    #[test]
    fn exit_code_table_is_complete_and_the_readme_shows_it() {
        let listed: Vec<u8> = EXIT_CODES.iter().map(|(exit, _)| exit.code()).collect();
        let mut sorted = listed.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(listed, sorted, "codes listed twice or out of order");
        for (exit, _) in EXIT_CODES {
            // A new variant fails to compile here until it is listed.
            match exit {
                Exit::Success
                | Exit::Failure
                | Exit::InvalidInput
                | Exit::Held
                | Exit::WaitTimeout
                | Exit::Forbidden
                | Exit::Unreachable
                | Exit::LockLost
                | Exit::NotReleased
                | Exit::Interrupted => {}
                Exit::Child(_) => panic!("a command's own code is not a deploylock code"),
            }
        }
        assert_eq!(listed, [0, 1, 2, 3, 4, 5, 6, 7, 8, 130]);
        let timeout = format!("within {} s", crate::store::REQUEST_TIMEOUT.as_secs());
        assert!(
            EXIT_CODES
                .iter()
                .any(|(_, meaning)| meaning.contains(&timeout)),
            "the table's request timeout is not REQUEST_TIMEOUT"
        );
        let readme_path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(readme_path)
            .unwrap_or_else(|err| panic!("cannot read {readme_path}: {err}"));
        let table = exit_codes_markdown();
        assert!(
            readme.contains(&table),
            "README.md's exit code table differs from cli::report::EXIT_CODES; it should read:\n{table}"
        );
        let help = exit_codes_help();
        for (exit, meaning) in EXIT_CODES {
            assert!(
                help.contains(&format!("{:>3}  {meaning}\n", exit.code())),
                "{help}"
            );
        }
    }

    /// Hints repeat the flags that chose the lock, quoted for a shell, so
    /// that a pasted hint acts on the same lock.
    #[test]
    fn hints_repeat_the_namespace_context_and_kubeconfig() {
        let scope = scope_flags(
            Some("team-a"),
            Some("ci"),
            Some(std::path::Path::new("/home/me/my dir/it's.yaml")),
        );
        assert_eq!(
            scope,
            " -n team-a --context ci --kubeconfig '/home/me/my dir/it'\\''s.yaml'"
        );
        assert_eq!(scope_flags(None, None, None), "");
        let err = Error::Refused(Refusal::HeldByOther(decoded(crate::testdata::holder(""))));
        let (message, _) = describe_for(&err, &production(), " -n team-a", now());
        assert!(
            message.contains("`deploylock wait -e production -n team-a`")
                && message
                    .contains("`deploylock force-release -e production -n team-a --reason ...`"),
            "{message}"
        );
        assert!(
            message.starts_with("production: the lock is held by user (owner label: owner) since "),
            "{message}"
        );
    }

    /// `-o json`'s error object: the exit code, a stable reason, the
    /// message and the holder it names.
    #[test]
    fn error_report_names_code_reason_and_holder() {
        let err = Error::Refused(Refusal::HeldByOther(decoded(crate::testdata::holder(""))));
        let report = serde_json::to_value(ErrorReport::new(&err, &production(), "", now()))
            .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(report["error"]["code"], 3);
        assert_eq!(report["error"]["reason"], "HeldByOther");
        assert_eq!(report["error"]["holder"]["user"], "user");
        assert!(
            report["error"]["message"]
                .as_str()
                .is_some_and(|message| message.starts_with("production: the lock is held by user")),
            "{report}"
        );
        let none = serde_json::to_value(ErrorReport::new(
            &Error::WaitTimedOut(None),
            &production(),
            "",
            now(),
        ))
        .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(none["error"]["code"], 4);
        assert!(none["error"]["holder"].is_null(), "{none}");
    }

    /// Each error's exit code, decided by `exit_for` alone.
    #[test]
    fn exit_codes_of_errors() {
        let api = |code: u16| {
            kube::Error::Api(Box::new(
                kube::core::Status::failure("message", "Reason").with_code(code),
            ))
        };
        let cases = vec![
            (Error::Refused(Refusal::HeldByOther(holder())), Exit::Held),
            (
                Error::Refused(Refusal::AlreadyHeldByYou(holder())),
                Exit::Held,
            ),
            (
                Error::Refused(Refusal::EmergencyLockInForce(holder())),
                Exit::Held,
            ),
            (Error::Refused(Refusal::QueueFull), Exit::Held),
            (Error::Refused(Refusal::TooManyPlaces), Exit::Held),
            (
                Error::Refused(Refusal::NotHolder(holder())),
                Exit::Forbidden,
            ),
            (Error::Refused(Refusal::NotHeld), Exit::Forbidden),
            (
                Error::Refused(Refusal::LockLost {
                    expected_lock_id: "a".into(),
                    current: None,
                }),
                Exit::LockLost,
            ),
            (
                Error::Refused(Refusal::ExpiredCannotExtend(holder())),
                Exit::LockLost,
            ),
            (Error::Refused(Refusal::ReasonRequired), Exit::InvalidInput),
            (
                Error::Refused(Refusal::DurationOutOfRange),
                Exit::InvalidInput,
            ),
            (Error::Refused(Refusal::CounterExhausted), Exit::Failure),
            (Error::InvalidInput("x".into()), Exit::InvalidInput),
            (Error::from_kube(api(422), "ns"), Exit::InvalidInput),
            (Error::from_kube(api(401), "ns"), Exit::Forbidden),
            (Error::from_kube(api(403), "ns"), Exit::Forbidden),
            (Error::from_kube(api(404), "ns"), Exit::Unreachable),
            (Error::from_kube(api(503), "ns"), Exit::Unreachable),
            (Error::from_kube(api(429), "ns"), Exit::Unreachable),
            (Error::from_kube(api(418), "ns"), Exit::Failure),
            (Error::Contention(32), Exit::Failure),
            (Error::WaitTimedOut(None), Exit::WaitTimeout),
            (Error::Interrupted, Exit::Interrupted),
        ];
        for (err, exit) in &cases {
            assert_eq!(exit_for(err), *exit, "{err:?}");
        }
    }

    /// A kube error stays reachable as the error's source.
    #[test]
    fn errors_keep_the_kube_error_as_their_source() {
        use std::error::Error as _;
        let status = kube::core::Status::failure("denied request: no", "Forbidden").with_code(403);
        let err = Error::from_kube(kube::Error::Api(Box::new(status)), "ns");
        let mut chain = err.source();
        let mut found = false;
        while let Some(cause) = chain {
            found |= cause.downcast_ref::<kube::Error>().is_some();
            chain = cause.source();
        }
        assert!(found, "no kube::Error in the chain of {err:?}");
    }

    #[test]
    fn malformed_locks_exit_1_and_name_the_object() {
        let malformed = match crate::store::decode_lock(json!({
            "metadata": { "name": "production", "namespace": "team-a" },
            "spec": { "environment": "production", "history": [{ "at": "2030-01-01T00:00:00ZT" }] }
        })) {
            Ok(lock) => panic!("decoded: {lock:?}"),
            Err(malformed) => malformed,
        };
        let warning = skipped_malformed(&malformed);
        assert!(
            warning.contains("\"production\"") && warning.contains("\"team-a\""),
            "{warning}"
        );
        let (message, exit) = describe(&Error::Malformed(malformed), &production(), now());
        assert_eq!(exit, Exit::Failure);
        assert!(
            message.contains("is malformed") && message.contains("spec.history[0]"),
            "{message}"
        );
    }
}
