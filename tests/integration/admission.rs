//! Who may do what to a DeploymentLock, decided by the API server: RBAC
//! (config/rbac/clusterroles.yaml) and the ValidatingAdmissionPolicy
//! (config/admission/policy.yaml), in namespaces where the policy is bound.
//!
//! Every operation is tried as every identity three ways: with `deploylock`
//! (where it has an action for it), with kubectl as a script would use it
//! (`get`, `create`, `patch --type=merge`, `delete`), and with `kubectl
//! replace` (the `update` verb: the only write verb the controller's role
//! grants, so the policy, not RBAC, is what stops the controller there).
//! Each try starts from an environment of its own in a known state, with the
//! controller running (only it writes status, and the policy trusts its
//! status). The resulting matrix is printed to stderr and written to
//! `target/rbac-matrix.md`; then every cell is checked against what the roles
//! and the policy say, and the test fails once, listing every wrong cell.

use std::fmt::Write as _;
use std::process::Output;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use futures::StreamExt;
use kube::api::Api;
use serde_json::{Value, json};

use deploylock::crd::{DeploymentLock, HistoryAction, LockState};

use crate::support::{
    ControllerProcess, Identity, await_clock_past_token, await_object, cluster, repo_root,
    status_is_current,
};

const WAIT: StdDuration = StdDuration::from_secs(60);

/// Cells run at once (each is a few short processes).
const PARALLEL_CELLS: usize = 8;

/// The identities of the matrix, in column order.
const ACTORS: [Identity; 5] = [
    Identity::Viewer,
    Identity::Alice,
    Identity::Bob,
    Identity::Carol,
    Identity::Controller,
];

/// Messages of config/admission/policy.yaml: a `deploylock` refusal that
/// quotes one of them came from the policy (the CLI keeps only the policy's
/// words, not the admission plumbing).
const POLICY_MESSAGES: [&str; 12] = [
    "only the deploylock controller writes the status",
    "a lock can only be taken in your own name",
    "only expiresAt of a holding may change",
    "only the holder may release or extend it",
    "needs the force permission",
    "before deleting it, so that the end of the holding is recorded",
    "the history of a DeploymentLock is append-only",
    "a change of the holding or of the fencing token needs its history entry",
    "only the holder extends its holding",
    "the deploylock controller only clears expired holdings",
    "you can only remove your own place in the wait queue",
    "it can be taken over once it has expired",
];

// ---------------------------------------------------------------------------
// The matrix: operations, tools, verdicts, expectations
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tool {
    /// The `deploylock` CLI.
    Deploylock,
    /// kubectl get / create / patch --type=merge / delete.
    Kubectl,
    /// kubectl replace: the `update` verb, with the resourceVersion read.
    Replace,
}

const TOOLS: [Tool; 3] = [Tool::Deploylock, Tool::Kubectl, Tool::Replace];

impl Tool {
    fn title(self) -> &'static str {
        match self {
            Tool::Deploylock => "deploylock",
            Tool::Kubectl => "kubectl (get / create / patch --type=merge / delete)",
            Tool::Replace => "kubectl replace (update verb)",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Get,
    List,
    /// A new lock in one's own name, on an environment with no object yet.
    AcquireNew,
    /// A new holding in one's own name, on an existing object nobody holds.
    AcquireFree,
    /// Crafting a holding whose `user` is someone else (new object).
    AcquireForOtherNew,
    /// Crafting a holding whose `user` is someone else (existing free object).
    AcquireForOtherFree,
    ReleaseOwn,
    ExtendOwn,
    ReleaseOther,
    ExtendOther,
    /// Taking over someone else's live holding (an emergency lock).
    ForceAcquire,
    ForceRelease,
    /// Changing the reason and expiry of someone else's holding.
    EditSpec,
    /// Changing the reason of the oldest history entry.
    HistoryChange,
    /// Removing the oldest history entry.
    HistoryRemove,
    /// Replacing the whole history with 20 fabricated entries numbered after
    /// the last one (probes the policy's "history is full" allowance).
    HistoryForge,
    /// Writing status through the status subresource.
    EditStatus,
    Delete,
}

const OPS: [Op; 18] = [
    Op::Get,
    Op::List,
    Op::AcquireNew,
    Op::AcquireFree,
    Op::AcquireForOtherNew,
    Op::AcquireForOtherFree,
    Op::ReleaseOwn,
    Op::ExtendOwn,
    Op::ReleaseOther,
    Op::ExtendOther,
    Op::ForceAcquire,
    Op::ForceRelease,
    Op::EditSpec,
    Op::HistoryChange,
    Op::HistoryRemove,
    Op::HistoryForge,
    Op::EditStatus,
    Op::Delete,
];

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::List => "list",
            Op::AcquireNew => "acquire (new environment)",
            Op::AcquireFree => "acquire (free existing lock)",
            Op::AcquireForOtherNew => "acquire in another's name (new)",
            Op::AcquireForOtherFree => "acquire in another's name (free existing)",
            Op::ReleaseOwn => "release own",
            Op::ExtendOwn => "extend own",
            Op::ReleaseOther => "release other's",
            Op::ExtendOther => "extend other's",
            Op::ForceAcquire => "force-acquire other's live lock",
            Op::ForceRelease => "force-release other's lock",
            Op::EditSpec => "edit spec of other's lock (reason, expiresAt)",
            Op::HistoryChange => "edit history: change an entry",
            Op::HistoryRemove => "edit history: remove an entry",
            Op::HistoryForge => "edit history: replace with 20 new entries",
            Op::EditStatus => "edit status (status subresource)",
            Op::Delete => "delete a held lock (alice's)",
        }
    }

    /// Whether the operation is meant to change the stored spec.
    fn writes_spec(self) -> bool {
        !matches!(self, Op::Get | Op::List | Op::EditStatus | Op::Delete)
    }
}

/// The state a cell starts from, on an environment of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    /// No object for the environment.
    Absent,
    /// The object exists, nobody holds it (alice acquired and released it).
    Free,
    /// alice holds a 30-minute lock.
    HeldByAlice,
    /// alice holds a 30-minute lock she extended once (two history entries).
    HeldByAliceExtended,
    /// Someone other than the actor holds it: alice, or bob when the actor
    /// is alice.
    HeldByOther,
    /// The actor holds it.
    HeldByActor,
}

fn setup_of(op: Op) -> Setup {
    match op {
        Op::AcquireNew | Op::AcquireForOtherNew => Setup::Absent,
        Op::AcquireFree | Op::AcquireForOtherFree => Setup::Free,
        Op::Get | Op::List | Op::EditStatus | Op::Delete => Setup::HeldByAlice,
        Op::HistoryChange | Op::HistoryRemove | Op::HistoryForge => Setup::HeldByAliceExtended,
        Op::ReleaseOwn | Op::ExtendOwn => Setup::HeldByActor,
        Op::ReleaseOther | Op::ExtendOther | Op::ForceAcquire | Op::ForceRelease | Op::EditSpec => {
            Setup::HeldByOther
        }
    }
}

/// The identity's column in the matrix.
fn column(identity: Identity) -> &'static str {
    match identity {
        Identity::Controller => "controller",
        other => other.username(),
    }
}

/// The identity whose lock "other's" means for `actor`.
fn other_than(actor: Identity) -> Identity {
    match actor {
        Identity::Alice => Identity::Bob,
        _ => Identity::Alice,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Allow,
    /// Refused by RBAC (kubectl: "Error from server (Forbidden)", "cannot").
    DenyRbac,
    /// Refused by the ValidatingAdmissionPolicy.
    DenyPolicy,
    /// Refused by the CLI's own rules before anything was written.
    DenyCli,
    /// No such action for this tool, or no such state for this identity.
    NotApplicable,
    /// Anything else: an error that is neither allowed nor a clean refusal.
    Unexpected(String),
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Allow => f.write_str("allow"),
            Verdict::DenyRbac => f.write_str("deny(rbac)"),
            Verdict::DenyPolicy => f.write_str("deny(policy)"),
            Verdict::DenyCli => f.write_str("deny(cli)"),
            Verdict::NotApplicable => f.write_str("n/a"),
            Verdict::Unexpected(_) => f.write_str("ERROR"),
        }
    }
}

/// The four kinds of identity the roles distinguish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// deploylock-viewer: get, list, watch.
    Viewer,
    /// deploylock-user: also create, update, patch (no delete, no force).
    User,
    /// deploylock-admin: also delete and force.
    Admin,
    /// deploylock-controller: get, list, watch, update, reconcile; status
    /// update/patch. No create, no patch, no delete, no force.
    Controller,
}

fn role_of(identity: Identity) -> Role {
    match identity {
        Identity::Viewer => Role::Viewer,
        Identity::Alice | Identity::Bob => Role::User,
        Identity::Carol | Identity::Admin => Role::Admin,
        Identity::Controller => Role::Controller,
    }
}

/// What the roles and the policy say, derived by hand from the two files.
fn expected(op: Op, actor: Identity, tool: Tool) -> Verdict {
    use Verdict::{Allow, DenyCli, DenyPolicy, DenyRbac, NotApplicable};
    let role = role_of(actor);
    // A write RBAC lets through (viewer: no write verb; controller: update
    // but not patch) and the policy refuses.
    let refused_by_policy = || match (role, tool) {
        (Role::Viewer, _) | (Role::Controller, Tool::Kubectl) => DenyRbac,
        _ => DenyPolicy,
    };
    // A change to someone else's live holding: needs `force`.
    let needs_force = || match (role, tool) {
        (Role::Viewer, _) | (Role::Controller, Tool::Kubectl) => DenyRbac,
        (Role::Admin, _) => Allow,
        _ => DenyPolicy,
    };
    match (op, tool) {
        (Op::Get | Op::List, Tool::Replace) => NotApplicable,
        (Op::Get | Op::List, _) => Allow,
        (Op::AcquireNew, Tool::Replace) => NotApplicable,
        (Op::AcquireNew, _) => match role {
            Role::Viewer | Role::Controller => DenyRbac,
            Role::User | Role::Admin => Allow,
        },
        // The controller's `update` verb would let it write a holding: the
        // policy refuses it (the controller only clears expired holdings).
        (Op::AcquireFree, _) => match (role, tool) {
            (Role::Viewer, _) | (Role::Controller, Tool::Kubectl) => DenyRbac,
            (Role::Controller, _) => DenyPolicy,
            _ => Allow,
        },
        (Op::AcquireForOtherNew, Tool::Kubectl) => match role {
            Role::Viewer | Role::Controller => DenyRbac,
            Role::User | Role::Admin => DenyPolicy,
        },
        (Op::AcquireForOtherNew, _) | (Op::AcquireForOtherFree, Tool::Deploylock) => NotApplicable,
        (Op::AcquireForOtherFree, _) => refused_by_policy(),
        // Neither a viewer nor the controller can hold a lock.
        (Op::ReleaseOwn | Op::ExtendOwn, _) => match role {
            Role::Viewer | Role::Controller => NotApplicable,
            _ => Allow,
        },
        // The CLI refuses "not by you" itself, carol included (she has
        // force-release for that).
        (Op::ReleaseOther | Op::ExtendOther, Tool::Deploylock) => DenyCli,
        // Released and Extended are the holder's own transitions: an admin
        // records ForceReleased (or ForceAcquired) instead.
        (Op::ReleaseOther | Op::ExtendOther, _) => refused_by_policy(),
        (Op::ForceAcquire | Op::ForceRelease, _) => needs_force(),
        (Op::EditSpec, Tool::Deploylock) => NotApplicable,
        // A change of the holding without its history entry: nobody.
        (Op::EditSpec, _) => refused_by_policy(),
        (Op::HistoryChange | Op::HistoryRemove | Op::HistoryForge, Tool::Deploylock) => {
            NotApplicable
        }
        // "history is append-only" (policy.yaml). Forging 20 entries numbered
        // after the last one passes the policy's `size(newHistory) >= 20`
        // allowance today: a policy bug, expected to be refused.
        (Op::HistoryChange | Op::HistoryRemove | Op::HistoryForge, _) => refused_by_policy(),
        (Op::EditStatus, Tool::Deploylock) => NotApplicable,
        // Only the controller's role has deploymentlocks/status at all.
        (Op::EditStatus, _) => match role {
            Role::Controller => Allow,
            _ => DenyRbac,
        },
        // Only admins have delete; a held lock must be (force-)released
        // first, so that the end of the holding is recorded.
        (Op::Delete, Tool::Kubectl) => match role {
            Role::Admin => DenyPolicy,
            _ => DenyRbac,
        },
        (Op::Delete, _) => NotApplicable,
    }
}

/// One tried cell.
struct Cell {
    op: Op,
    actor: Identity,
    tool: Tool,
    expected: Verdict,
    actual: Verdict,
    /// What was run.
    command: String,
    /// The refusal (or error) as the tool reported it.
    detail: String,
    /// The stored object does not match the verdict (written though refused,
    /// or unchanged though allowed).
    effect_problem: Option<String>,
}

impl Cell {
    fn is_wrong(&self) -> bool {
        self.actual != self.expected || self.effect_problem.is_some()
    }
}

// ---------------------------------------------------------------------------
// Running things
// ---------------------------------------------------------------------------

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn one_line(text: &str, max: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > max {
        let cut: String = line.chars().take(max).collect();
        format!("{cut}…")
    } else {
        line
    }
}

/// kubectl as `identity`, with `input` on stdin.
fn kubectl_with_input(identity: Identity, args: &[&str], input: &Value) -> Output {
    cluster().kubectl_with_input(identity, args, &input.to_string())
}

/// The stored object as JSON, read by the cluster admin; `None` if absent.
async fn admin_get(api: &Api<DeploymentLock>, environment: &str) -> Option<Value> {
    match api.get_opt(environment).await {
        Ok(lock) => lock.map(|lock| match serde_json::to_value(lock) {
            Ok(value) => value,
            Err(err) => panic!("{environment} does not serialize: {err}"),
        }),
        Err(err) => panic!("the admin cannot read {environment}: {err}"),
    }
}

/// Classifies what kubectl did: allowed, or refused by RBAC or by the policy.
fn classify_kubectl(output: &Output) -> (Verdict, String) {
    if output.status.success() {
        return (Verdict::Allow, one_line(&stdout_of(output), 160));
    }
    let stderr = stderr_of(output);
    let detail = one_line(&stderr, 300);
    let verdict = if !stderr.contains("Error from server (Forbidden)") {
        Verdict::Unexpected(detail.clone())
    } else if stderr.contains("ValidatingAdmissionPolicy") {
        Verdict::DenyPolicy
    } else if stderr.contains(" cannot ") {
        Verdict::DenyRbac
    } else {
        Verdict::Unexpected(detail.clone())
    };
    (verdict, detail)
}

/// Classifies what `deploylock` did. Exit 5 with "the API server refused" is
/// the server's refusal (RBAC names the user and the verb it lacks; the
/// policy's own message is quoted); exit 5 with "not by you" is the CLI's.
fn classify_deploylock(output: &Output) -> (Verdict, String) {
    let stderr = stderr_of(output);
    let detail = one_line(&stderr, 300);
    let verdict = match output.status.code() {
        Some(0) => return (Verdict::Allow, one_line(&stdout_of(output), 160)),
        Some(5) if stderr.contains("the API server refused") => {
            if stderr.contains("is forbidden: User \"") && stderr.contains(" cannot ") {
                Verdict::DenyRbac
            } else if POLICY_MESSAGES
                .iter()
                .any(|message| stderr.contains(message))
            {
                Verdict::DenyPolicy
            } else {
                Verdict::Unexpected(detail.clone())
            }
        }
        Some(5) if stderr.contains("not by you") => Verdict::DenyCli,
        other => Verdict::Unexpected(format!("exit {other:?}: {detail}")),
    };
    (verdict, detail)
}

fn deploylock_ok(namespace: &str, identity: Identity, args: &[&str]) -> Result<(), String> {
    let output = cluster().deploylock(identity, namespace, args);
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{identity:?}: deploylock {args:?} exited {:?}: {}",
            output.status.code(),
            one_line(&stderr_of(&output), 300)
        ))
    }
}

/// Brings `environment` into `setup`'s state with the CLI.
fn prepare(
    namespace: &str,
    environment: &str,
    setup: Setup,
    actor: Identity,
) -> Result<(), String> {
    let acquire = |identity: Identity| {
        deploylock_ok(
            namespace,
            identity,
            &[
                "-e",
                environment,
                "acquire",
                "--duration",
                "30",
                "--reason",
                &format!("matrix setup: {} deploys", identity.username()),
            ],
        )
    };
    let release =
        |identity: Identity| deploylock_ok(namespace, identity, &["-e", environment, "release"]);
    match setup {
        Setup::Absent => Ok(()),
        Setup::Free => {
            acquire(Identity::Alice)?;
            release(Identity::Alice)
        }
        Setup::HeldByAlice => acquire(Identity::Alice),
        Setup::HeldByAliceExtended => {
            acquire(Identity::Alice)?;
            deploylock_ok(
                namespace,
                Identity::Alice,
                &["-e", environment, "extend", "--duration", "45"],
            )
        }
        Setup::HeldByOther => acquire(other_than(actor)),
        Setup::HeldByActor => acquire(actor),
    }
}

/// Waits until the controller has caught up with the lock (status for this
/// generation and holding, every history entry announced), so that it does
/// not write while the cell runs.
async fn await_reconciled(api: &Api<DeploymentLock>, environment: &str) {
    let caught_up = |lock: &DeploymentLock| {
        let last = lock.spec.history.last().map_or(0, |entry| entry.sequence);
        status_is_current(lock)
            && lock
                .status
                .as_ref()
                .and_then(|status| status.last_event_sequence)
                == Some(last)
    };
    await_object(api, environment, "reconciled", WAIT, caught_up).await;
}

// ---------------------------------------------------------------------------
// Objects and patches, crafted the way the CLI writes them
// ---------------------------------------------------------------------------

fn history_of(object: &Value) -> Vec<Value> {
    object["spec"]["history"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn last_sequence(history: &[Value]) -> i64 {
    history
        .last()
        .and_then(|entry| entry["sequence"].as_i64())
        .unwrap_or(0)
}

fn holding(user: &str, lock_type: &str, reason: &str, now: DateTime<Utc>) -> Value {
    json!({
        "lockId": uuid::Uuid::new_v4().to_string(),
        "user": user,
        "owner": user,
        "type": lock_type,
        "reason": reason,
        "acquiredAt": stamp(now),
        "expiresAt": stamp(now + Duration::minutes(30)),
        "durationSeconds": 1800
    })
}

fn history_entry(
    sequence: i64,
    action: &str,
    holder: &Value,
    by: &str,
    reason: &Value,
    expires_at: Option<&Value>,
    now: DateTime<Utc>,
) -> Value {
    let mut entry = json!({
        "sequence": sequence,
        "action": action,
        "at": stamp(now),
        "lockId": holder["lockId"],
        "by": by,
        "owner": holder["owner"],
        "reason": reason,
    });
    if let Some(expires_at) = expires_at {
        entry["expiresAt"] = expires_at.clone();
    }
    entry
}

/// A whole new lock whose holder is `holder_user`, as `deploylock acquire`
/// creates it.
fn new_lock(environment: &str, holder_user: &str, by: &str) -> Value {
    let now = Utc::now();
    let holder = holding(holder_user, "manual", "matrix: kubectl create", now);
    let entry = history_entry(
        1,
        "Acquired",
        &holder,
        by,
        &holder["reason"],
        Some(&holder["expiresAt"]),
        now,
    );
    json!({
        "apiVersion": "deploylock.dev/v1",
        "kind": "DeploymentLock",
        "metadata": { "name": environment },
        "spec": {
            "environment": environment,
            "fencingToken": testkit::torture_hostile::first_token(now) + 1,
            "holder": holder,
            "history": [entry]
        }
    })
}

/// The JSON merge patch (RFC 7386) that performs `op` as `actor` on `object`.
fn merge_patch(op: Op, actor: Identity, object: &Value) -> Value {
    let user = actor.username();
    let now = Utc::now();
    let spec = &object["spec"];
    let mut history = history_of(object);
    let next = last_sequence(&history) + 1;
    let token = spec["fencingToken"].as_i64().unwrap_or(0);
    let current = &spec["holder"];
    match op {
        Op::AcquireFree | Op::AcquireForOtherFree => {
            let holder_user = if op == Op::AcquireFree {
                user
            } else {
                other_than(actor).username()
            };
            let holder = holding(holder_user, "manual", "matrix: kubectl acquire", now);
            history.push(history_entry(
                next,
                "Acquired",
                &holder,
                holder_user,
                &holder["reason"],
                Some(&holder["expiresAt"]),
                now,
            ));
            json!({ "spec": { "holder": holder, "fencingToken": token + 1, "history": history } })
        }
        Op::ReleaseOwn | Op::ReleaseOther => {
            history.push(history_entry(
                next,
                "Released",
                current,
                user,
                &current["reason"],
                None,
                now,
            ));
            json!({ "spec": { "holder": null, "history": history } })
        }
        Op::ForceRelease => {
            history.push(history_entry(
                next,
                "ForceReleased",
                current,
                user,
                &json!("matrix: force-release"),
                None,
                now,
            ));
            json!({ "spec": { "holder": null, "history": history } })
        }
        Op::ExtendOwn | Op::ExtendOther => {
            let expires_at = json!(stamp(now + Duration::minutes(60)));
            history.push(history_entry(
                next,
                "Extended",
                current,
                user,
                &current["reason"],
                Some(&expires_at),
                now,
            ));
            json!({ "spec": { "holder": { "expiresAt": expires_at }, "history": history } })
        }
        Op::ForceAcquire => {
            let mut holder = holding(user, "emergency", "matrix: emergency", now);
            holder["overrode"] = json!({
                "lockId": current["lockId"],
                "user": current["user"],
                "owner": current["owner"],
                "reason": current["reason"],
            });
            history.push(history_entry(
                next,
                "ForceAcquired",
                &holder,
                user,
                &holder["reason"],
                Some(&holder["expiresAt"]),
                now,
            ));
            json!({ "spec": { "holder": holder, "fencingToken": token + 1, "history": history } })
        }
        Op::EditSpec => json!({ "spec": { "holder": {
            "reason": format!("edited by {user}"),
            "expiresAt": stamp(now + Duration::hours(2)),
        } } }),
        Op::HistoryChange => {
            if let Some(first) = history.first_mut() {
                first["reason"] = json!(format!("rewritten by {user}"));
            }
            json!({ "spec": { "history": history } })
        }
        Op::HistoryRemove => {
            history.remove(0);
            json!({ "spec": { "history": history } })
        }
        Op::HistoryForge => {
            let forged: Vec<Value> = (next..next + 20)
                .map(|sequence| {
                    history_entry(
                        sequence,
                        "Extended",
                        current,
                        user,
                        &json!("nothing to see here"),
                        Some(&current["expiresAt"]),
                        now,
                    )
                })
                .collect();
            json!({ "spec": { "history": forged } })
        }
        Op::EditStatus => json!({ "status": { "observedGeneration": 12345 } }),
        Op::Get | Op::List | Op::AcquireNew | Op::AcquireForOtherNew | Op::Delete => {
            unreachable!("{op:?} is not a patch")
        }
    }
}

/// Applies a JSON merge patch (RFC 7386) to `target`.
fn apply_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(map) = target {
        for (key, value) in fields {
            if value.is_null() {
                map.remove(key);
            } else {
                apply_merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// One cell
// ---------------------------------------------------------------------------

/// Performs `op` as `actor` with `tool` on a prepared environment whose
/// object (read by the admin) is `object`; returns the verdict, what was run,
/// and what the tool said.
fn perform(
    namespace: &str,
    environment: &str,
    op: Op,
    actor: Identity,
    tool: Tool,
    object: Option<Value>,
) -> (Verdict, String, String) {
    let cluster = cluster();
    match tool {
        Tool::Deploylock => {
            let args: Vec<&str> = match op {
                Op::Get => vec!["-e", environment, "status"],
                Op::List => vec!["list"],
                Op::AcquireNew | Op::AcquireFree => {
                    vec!["-e", environment, "acquire", "--reason", "matrix: acquire"]
                }
                Op::ReleaseOwn | Op::ReleaseOther => vec!["-e", environment, "release"],
                Op::ExtendOwn | Op::ExtendOther => {
                    vec!["-e", environment, "extend", "--duration", "60"]
                }
                Op::ForceAcquire => vec![
                    "-e",
                    environment,
                    "acquire",
                    "--force",
                    "--reason",
                    "matrix: emergency",
                ],
                Op::ForceRelease => vec![
                    "-e",
                    environment,
                    "force-release",
                    "--reason",
                    "matrix: force-release",
                ],
                other => unreachable!("deploylock has no action for {other:?}"),
            };
            let output = cluster.deploylock(actor, namespace, &args);
            let (verdict, detail) = classify_deploylock(&output);
            let verdict = match verdict {
                Verdict::Allow if matches!(op, Op::Get | Op::List) => {
                    if stdout_of(&output).contains(environment) {
                        Verdict::Allow
                    } else {
                        Verdict::Unexpected(format!("{environment} not shown: {detail}"))
                    }
                }
                other => other,
            };
            (verdict, format!("deploylock {}", args.join(" ")), detail)
        }
        Tool::Kubectl => {
            let (output, command) = match op {
                Op::Get | Op::List => {
                    let args: Vec<&str> = if op == Op::Get {
                        vec![
                            "get",
                            "deploymentlock",
                            environment,
                            "-n",
                            namespace,
                            "-o",
                            "json",
                        ]
                    } else {
                        vec!["get", "deploymentlocks", "-n", namespace]
                    };
                    (
                        cluster.kubectl(actor, &args),
                        format!("kubectl {}", args.join(" ")),
                    )
                }
                Op::AcquireNew | Op::AcquireForOtherNew => {
                    let holder_user = if op == Op::AcquireNew {
                        actor.username()
                    } else {
                        other_than(actor).username()
                    };
                    let object = new_lock(environment, holder_user, actor.username());
                    (
                        kubectl_with_input(actor, &["create", "-n", namespace, "-f", "-"], &object),
                        format!("kubectl create -f - <<< {object}"),
                    )
                }
                Op::Delete => {
                    let args = ["delete", "deploymentlock", environment, "-n", namespace];
                    (
                        cluster.kubectl(actor, &args),
                        format!("kubectl {}", args.join(" ")),
                    )
                }
                _ => {
                    let Some(object) = object else {
                        panic!("{environment} vanished before the cell ran");
                    };
                    let patch = merge_patch(op, actor, &object).to_string();
                    let mut args = vec![
                        "patch",
                        "deploymentlock",
                        environment,
                        "-n",
                        namespace,
                        "--type=merge",
                        "-p",
                        &patch,
                    ];
                    if op == Op::EditStatus {
                        args.push("--subresource=status");
                    }
                    let output = cluster.kubectl(actor, &args);
                    let mut shown = args.clone();
                    shown[7] = "'…'";
                    (output, format!("kubectl {}  # -p {patch}", shown.join(" ")))
                }
            };
            let (verdict, detail) = classify_kubectl(&output);
            let verdict = match verdict {
                Verdict::Allow
                    if matches!(op, Op::Get | Op::List)
                        && !stdout_of(&output).contains(environment) =>
                {
                    Verdict::Unexpected(format!("{environment} not shown: {detail}"))
                }
                other => other,
            };
            (verdict, command, detail)
        }
        Tool::Replace => {
            let mut args = vec!["replace", "-n", namespace, "-f", "-"];
            if op == Op::EditStatus {
                args.push("--subresource=status");
            }
            let Some(mut object) = object else {
                panic!("{environment} vanished before the cell ran");
            };
            // Under the resourceVersion read.
            let patch = merge_patch(op, actor, &object);
            apply_merge_patch(&mut object, &patch);
            let output = kubectl_with_input(actor, &args, &object);
            let (verdict, detail) = classify_kubectl(&output);
            (
                verdict,
                format!(
                    "kubectl {}  # the object read, with {patch}",
                    args.join(" ")
                ),
                detail,
            )
        }
    }
}

/// Whether the stored object agrees with the verdict.
fn check_effect(
    op: Op,
    verdict: &Verdict,
    before: &Option<Value>,
    after: &Option<Value>,
) -> Option<String> {
    let spec = |object: &Option<Value>| object.as_ref().map(|object| object["spec"].clone());
    let allowed = *verdict == Verdict::Allow;
    let denied = matches!(
        verdict,
        Verdict::DenyRbac | Verdict::DenyPolicy | Verdict::DenyCli
    );
    match op {
        Op::Get | Op::List => None,
        Op::Delete if allowed && after.is_some() => {
            Some("allowed, but the lock is still there".into())
        }
        Op::Delete if denied && spec(after) != spec(before) => {
            Some("refused, but the lock changed or disappeared".into())
        }
        Op::EditStatus if denied => {
            let forged = after
                .as_ref()
                .and_then(|object| object["status"]["observedGeneration"].as_i64())
                == Some(12345);
            forged.then(|| "refused, but the status was written".into())
        }
        _ if op.writes_spec() && allowed && spec(after) == spec(before) => {
            Some("allowed, but the spec did not change".into())
        }
        _ if denied && spec(after) != spec(before) => Some("refused, but the spec changed".into()),
        _ => None,
    }
}

async fn run_cell(
    api: Api<DeploymentLock>,
    namespace: String,
    number: u32,
    op: Op,
    actor: Identity,
    tool: Tool,
) -> Cell {
    let expected = expected(op, actor, tool);
    let mut cell = Cell {
        op,
        actor,
        tool,
        expected: expected.clone(),
        actual: Verdict::NotApplicable,
        command: String::new(),
        detail: String::new(),
        effect_problem: None,
    };
    if expected == Verdict::NotApplicable {
        return cell;
    }
    let environment = format!("cell-{number}");
    let setup = setup_of(op);
    let prepared = {
        let (namespace, environment) = (namespace.clone(), environment.clone());
        blocking(move || prepare(&namespace, &environment, setup, actor)).await
    };
    if let Err(reason) = prepared {
        cell.actual = Verdict::Unexpected(format!("setup failed: {reason}"));
        cell.detail = reason;
        return cell;
    }
    if setup != Setup::Absent {
        await_reconciled(&api, &environment).await;
    }
    // A delete is refused while the lock's fencing token is ahead of the
    // policy's clock (the lock was created this very second).
    if op == Op::Delete
        && let Some(object) = admin_get(&api, &environment).await
    {
        let token = object["spec"]["fencingToken"].as_i64().unwrap_or(0);
        await_clock_past_token(&api.clone().into_client(), token).await;
    }
    // A replace that meets a 409 (the controller wrote in between) reads
    // again and retries, as any client would.
    let mut attempt = 0;
    let (before, (verdict, command, detail)) = loop {
        attempt += 1;
        let before = admin_get(&api, &environment).await;
        let (namespace, environment, object) =
            (namespace.clone(), environment.clone(), before.clone());
        let result =
            blocking(move || perform(&namespace, &environment, op, actor, tool, object)).await;
        let conflict = matches!(&result.0, Verdict::Unexpected(said) if said.contains("the object has been modified"));
        if !conflict || attempt >= 5 {
            break (before, result);
        }
    };
    let after = admin_get(&api, &environment).await;
    cell.effect_problem = check_effect(op, &verdict, &before, &after);
    cell.actual = verdict;
    cell.command = command;
    cell.detail = detail;
    cell
}

/// Reads the controller's log as it comes: nobody else reads the pipe, and a
/// full pipe would stop the controller in the middle of a write.
fn drain_stderr(controller: &mut ControllerProcess) {
    if let Some(mut stderr) = controller.child.stderr.take() {
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    }
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}

// ---------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------

fn find(cells: &[Cell], op: Op, actor: Identity, tool: Tool) -> Option<&Cell> {
    cells.iter().find(|cell| {
        cell.op == op && cell.tool == tool && cell.actor.username() == actor.username()
    })
}

/// One markdown table per tool: rows are operations, columns identities.
fn render_tables(cells: &[Cell]) -> String {
    let mut out = String::new();
    for tool in TOOLS {
        let _ = writeln!(out, "### {}\n", tool.title());
        let _ = write!(out, "| operation |");
        for actor in ACTORS {
            let _ = write!(out, " {} |", column(actor));
        }
        let _ = write!(out, "\n|---|");
        for _ in ACTORS {
            let _ = write!(out, "---|");
        }
        out.push('\n');
        for op in OPS {
            let _ = write!(out, "| {} |", op.label());
            for actor in ACTORS {
                let text = match find(cells, op, actor, tool) {
                    Some(cell) if cell.actual != cell.expected => {
                        format!("**{}** ✗ expected {}", cell.actual, cell.expected)
                    }
                    Some(cell) if cell.effect_problem.is_some() => {
                        format!("**{}** ✗ effect", cell.actual)
                    }
                    Some(cell) => cell.actual.to_string(),
                    None => "?".to_string(),
                };
                let _ = write!(out, " {text} |");
            }
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

fn render_report(cells: &[Cell], tables: &str, mismatches: &[String]) -> String {
    let mut out = String::from(
        "# DeploymentLock permission matrix\n\n\
         Generated by `cargo test --test integration admission::` against a real \
         kube-apiserver with config/rbac/clusterroles.yaml, \
         config/dev/bindings.yaml and the ValidatingAdmissionPolicy \
         config/admission/policy.yaml bound in the namespace.\n\n\
         Identities: viewer (deploylock-viewer), alice and bob (deploylock-user), \
         carol (deploylock-admin: delete, force), controller (deploylock-controller: \
         update, reconcile, status). \"Other's lock\" is alice's, or bob's when the \
         actor is alice. Every cell starts from an environment of its own.\n\n\
         Cells: `allow`; `deny(rbac)` (API server, RBAC: \"Error from server \
         (Forbidden)\" … \"cannot\"); `deny(policy)` (API server, \
         ValidatingAdmissionPolicy); `deny(cli)` (deploylock's own rules refused \
         before writing: exit 5 \"not by you\"; the kubectl rows show what the \
         server does); `n/a` (no such action in that tool, or a viewer cannot \
         hold a lock). `✗` marks a cell that differs from what the roles and the \
         policy say.\n\n",
    );
    out.push_str(tables);
    out.push_str("## Mismatches\n\n");
    if mismatches.is_empty() {
        out.push_str("None.\n\n");
    } else {
        for mismatch in mismatches {
            let _ = writeln!(out, "- {mismatch}");
        }
        out.push('\n');
    }
    out.push_str("## Every cell\n\n");
    for cell in cells
        .iter()
        .filter(|cell| cell.expected != Verdict::NotApplicable)
    {
        let _ = writeln!(
            out,
            "- **{}** as {} with {}: {} (expected {})\n  - `{}`\n  - {}",
            cell.op.label(),
            column(cell.actor),
            cell.tool.title(),
            cell.actual,
            cell.expected,
            one_line(&cell.command, 400).replace('`', "'"),
            if cell.detail.is_empty() {
                "(no output)".to_string()
            } else {
                cell.detail.clone()
            }
        );
    }
    out
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn permission_matrix_of_roles_and_admission_policy() {
    let cluster = cluster();
    let namespace = cluster.enforced_namespace("admission-matrix").await;
    let mut controller = cluster.spawn_controller(&namespace, "admission-matrix", &[]);
    drain_stderr(&mut controller);
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);

    let mut plan = Vec::new();
    for op in OPS {
        for actor in ACTORS {
            for tool in TOOLS {
                plan.push((plan.len() as u32, op, actor, tool));
            }
        }
    }
    let mut cells: Vec<Cell> = futures::stream::iter(plan)
        .map(|(number, op, actor, tool)| {
            run_cell(api.clone(), namespace.clone(), number, op, actor, tool)
        })
        .buffer_unordered(PARALLEL_CELLS)
        .collect()
        .await;
    cells.sort_by_key(|cell| {
        (
            TOOLS.iter().position(|tool| *tool == cell.tool),
            OPS.iter().position(|op| *op == cell.op),
            ACTORS
                .iter()
                .position(|actor| actor.username() == cell.actor.username()),
        )
    });

    let mismatches: Vec<String> = cells
        .iter()
        .filter(|cell| cell.is_wrong())
        .map(|cell| {
            let mut line = format!(
                "{} as {} with {}: expected {}, got {}",
                cell.op.label(),
                column(cell.actor),
                cell.tool.title(),
                cell.expected,
                cell.actual
            );
            if let Some(problem) = &cell.effect_problem {
                let _ = write!(line, " ({problem})");
            }
            let _ = write!(
                line,
                "\n    command: {}\n    said: {}",
                one_line(&cell.command, 600),
                cell.detail
            );
            line
        })
        .collect();

    let tables = render_tables(&cells);
    eprintln!("\nDeploymentLock permission matrix (namespace {namespace}):\n\n{tables}");
    let report = render_report(&cells, &tables, &mismatches);
    let path = repo_root().join("target").join("rbac-matrix.md");
    if let Err(err) = std::fs::create_dir_all(repo_root().join("target"))
        .and_then(|()| std::fs::write(&path, report))
    {
        panic!("cannot write {}: {err}", path.display());
    }
    eprintln!("written to {}", path.display());

    assert!(
        mismatches.is_empty(),
        "{} of {} cells differ from what the roles and the policy say:\n{}",
        mismatches.len(),
        cells
            .iter()
            .filter(|cell| cell.expected != Verdict::NotApplicable)
            .count(),
        mismatches.join("\n")
    );
}

/// The policy's clock is the controller's clock Lease: a holding can be
/// taken over once its expiresAt is behind that clock, which the controller
/// moves at the expiry instant. Before, the takeover is refused even though
/// nothing but time stands in the way; nobody, the cluster admin included,
/// can shorten a holding to get there sooner.
#[tokio::test]
async fn takeover_of_an_expired_lock_once_the_clock_passed_its_expiry() {
    let cluster = cluster();
    let namespace = cluster.enforced_namespace("admission-expired").await;
    let mut controller = cluster.spawn_controller(&namespace, "admission-expired", &[]);
    drain_stderr(&mut controller);
    let api: Api<DeploymentLock> =
        Api::namespaced(cluster.client(Identity::Admin).await, &namespace);

    let acquired = cluster.deploylock(
        Identity::Alice,
        &namespace,
        &[
            "acquire",
            "--duration",
            "1",
            "--reason",
            "Deploying version 3.0.0",
        ],
    );
    assert_eq!(
        acquired.status.code(),
        Some(0),
        "alice acquires: {}",
        stderr_of(&acquired)
    );
    let refused = cluster.deploylock(
        Identity::Bob,
        &namespace,
        &["acquire", "--reason", "Deploying version 3.0.1"],
    );
    assert_eq!(
        refused.status.code(),
        Some(3),
        "bob's acquire of alice's live lock: {}",
        stderr_of(&refused)
    );
    let before = match api.get("production").await {
        Ok(lock) => lock,
        Err(err) => panic!("cannot read production: {err}"),
    };

    // Shortening the holding without a transition: refused to the admin too.
    let shortened =
        json!({ "spec": { "holder": { "expiresAt": stamp(Utc::now() + Duration::seconds(2)) } } })
            .to_string();
    let args = [
        "patch",
        "deploymentlock",
        "production",
        "-n",
        &namespace,
        "--type=merge",
        "-p",
        &shortened,
    ];
    let output = cluster.kubectl(Identity::Admin, &args);
    let stderr = stderr_of(&output);
    assert!(
        !output.status.success() && stderr.contains("ValidatingAdmissionPolicy"),
        "the admin shortened alice's holding: {:?}\n{}{stderr}",
        output.status,
        stdout_of(&output)
    );

    let expired = |lock: &DeploymentLock| {
        let holding = lock.spec.holder.as_ref().map(|holder| &holder.lock_id);
        lock.status.as_ref().is_some_and(|status| {
            status.state == Some(LockState::Expired) && status.lock_id.as_ref() == holding
        })
    };
    let limit = StdDuration::from_secs(120);
    await_object(&api, "production", "marked Expired", limit, expired).await;

    let took_over = cluster.deploylock(
        Identity::Bob,
        &namespace,
        &["acquire", "--reason", "Deploying version 3.0.1"],
    );
    assert_eq!(
        took_over.status.code(),
        Some(0),
        "bob takes over the expired lock: {}",
        stderr_of(&took_over)
    );
    assert!(
        stdout_of(&took_over).contains("took over an expired lock"),
        "{}",
        stdout_of(&took_over)
    );
    let lock = match api.get("production").await {
        Ok(lock) => lock,
        Err(err) => panic!("cannot read production: {err}"),
    };
    let holder = match lock.spec.holder.as_ref() {
        Some(holder) => holder,
        None => panic!("production has no holder after bob's takeover"),
    };
    assert_eq!(holder.user, "bob");
    assert_eq!(lock.spec.fencing_token, before.spec.fencing_token + 1);
    assert_eq!(
        lock.spec.history.last().map(|entry| entry.action),
        Some(HistoryAction::TookOverExpired)
    );
}
