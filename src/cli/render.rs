//! How locks are shown: tables for people, JSON and YAML for scripts.
//!
//! Every string in a lock was written by some client, possibly a hostile one.
//! Human-readable output passes it through [`escape`] where it is written
//! out (tables escape every cell, `status` every value, `report` every line),
//! so that a terminal escape sequence or a bidi override in an owner or
//! reason is shown, not obeyed. JSON and YAML stay exact: their serialisers escape what they must.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use chrono::{DateTime, Utc};
use comfy_table::{Table, presets};
use kube::ResourceExt;
use serde::Serialize;

use crate::crd::{DeploymentLock, HistoryEntry, LockHolder, LockState, Waiter};
use crate::rules;

use super::report::when;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
    Yaml,
}

// What must not reach a terminal as is is what the policy refuses in new
// free text: one definition.
use crate::crd::is_unsafe_display_char as is_unsafe;

/// `text` with every unsafe character spelled out as Go's `strconv.Quote`
/// does: `\n`, `\r`, `\t`, `\x1b` for the other C0 controls and DEL,
/// `\u0085` or `\u202e` above. (kubectl shows ESC as `^[`; a spelling
/// that names every character tells the reader what was hidden.) Nothing
/// else changes (a backslash stays one): the exact value is in `-o json`.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            // Writing to a String cannot fail.
            c if is_unsafe(c) && u32::from(c) < 0x80 => {
                let _ = write!(escaped, "\\x{:02x}", u32::from(c));
            }
            c if is_unsafe(c) => {
                let _ = write!(escaped, "\\u{:04x}", u32::from(c));
            }
            c => escaped.push(c),
        }
    }
    Cow::Owned(escaped)
}

/// Displays a string escaped (see [`escape`]): `format!("{}", Safe(&owner))`.
#[derive(Clone, Copy, Debug)]
pub struct Safe<'a>(pub &'a str);

impl fmt::Display for Safe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape(self.0))
    }
}

/// A lock as scripts see it with `-o json|yaml`.
#[serde_with::skip_serializing_none]
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct LockView {
    pub namespace: String,
    pub environment: String,
    pub state: LockState,
    pub fencing_token: i64,
    pub holder: Option<LockHolder>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub queue: Vec<Waiter>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEntry>,
    /// The API server's time when the lock was read.
    pub server_time: DateTime<Utc>,
}

impl LockView {
    pub fn new(
        namespace: &str,
        environment: &str,
        lock: Option<&DeploymentLock>,
        now: DateTime<Utc>,
    ) -> Self {
        let spec = lock.map(|lock| &lock.spec);
        LockView {
            namespace: lock
                .and_then(|lock| lock.metadata.namespace.clone())
                .unwrap_or_else(|| namespace.to_string()),
            environment: environment.to_string(),
            state: spec
                .map(|spec| rules::state_at(spec, now))
                .unwrap_or_default(),
            fencing_token: spec.map(|spec| spec.fencing_token).unwrap_or_default(),
            holder: spec.and_then(|spec| spec.holder.clone()),
            queue: spec.map(|spec| spec.queue.clone()).unwrap_or_default(),
            history: spec.map(|spec| spec.history.clone()).unwrap_or_default(),
            server_time: now,
        }
    }
}

/// Serialises for `-o json|yaml`.
pub fn structured<T: Serialize>(value: &T, format: OutputFormat) -> String {
    let rendered = match format {
        OutputFormat::Yaml => serde_yaml::to_string(value).map_err(|err| err.to_string()),
        _ => serde_json::to_string_pretty(value)
            .map(|json| json + "\n")
            .map_err(|err| err.to_string()),
    };
    rendered.unwrap_or_else(|err| format!("cannot serialise the output: {err}\n"))
}

fn plain_table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    table.set_header(header.iter().map(|h| h.to_string()));
    table
}

/// A column of a listing: its title and how an object fills it.
type Column<'a, K> = (&'static str, &'a dyn Fn(&K) -> String);

/// A listing as kubectl prints `get`: a row per object, with a NAMESPACE
/// column first across all namespaces.
fn listing<K: ResourceExt>(
    objects: &[K],
    columns: &[Column<'_, K>],
    all_namespaces: bool,
) -> String {
    let namespace = all_namespaces.then_some("NAMESPACE");
    let titles: Vec<&str> = namespace
        .into_iter()
        .chain(columns.iter().map(|(title, _)| *title))
        .collect();
    let mut table = plain_table(&titles);
    for object in objects {
        let cells = namespace
            .map(|_| object.namespace().unwrap_or_default())
            .into_iter()
            .chain(columns.iter().map(|(_, cell)| cell(object)))
            .collect();
        add_row(&mut table, cells);
    }
    rendered(table)
}

/// Adds a row with every cell escaped: no cell of a table legitimately holds
/// a control character, so none is trusted to be free of one.
fn add_row(table: &mut Table, cells: Vec<String>) {
    table.add_row(
        cells
            .iter()
            .map(|cell| escape(cell).into_owned())
            .collect::<Vec<_>>(),
    );
}

fn rendered(table: Table) -> String {
    // comfy-table pads the first column with one space; kubectl does not.
    let lines: Vec<String> = table
        .to_string()
        .lines()
        .map(|line| {
            line.strip_prefix(' ')
                .unwrap_or(line)
                .trim_end()
                .to_string()
        })
        .collect();
    lines.join("\n") + "\n"
}

/// `status` as key/value lines, like `kubectl describe`.
pub fn status_table(view: &LockView, verbose: bool) -> String {
    let now = view.server_time;
    let mut lines = vec![
        ("Environment", view.environment.clone()),
        ("Namespace", view.namespace.clone()),
        ("State", view.state.to_string()),
    ];
    if let Some(holder) = &view.holder {
        if holder.lock_type == crate::crd::LockType::Scheduled {
            lines.push((
                "Frozen",
                format!(
                    "by window {} until {}",
                    holder.owner,
                    when(holder.expires_at, now)
                ),
            ));
        }
        // The authenticated identity first; `--owner` is only a label.
        lines.push(("Holder", holder.user.clone()));
        lines.push(("Owner", holder.owner.clone()));
        lines.push(("Reason", holder.reason.clone()));
        lines.push(("Type", holder.lock_type.to_string()));
        lines.push(("Lock ID", holder.lock_id.clone()));
        if let Some(group_id) = &holder.group_id {
            lines.push(("Lock group ID", group_id.clone()));
        }
        lines.push(("Acquired", when(holder.acquired_at, now)));
        lines.push(("Expires", when(holder.expires_at, now)));
        if let Some(deployment) = &holder.deployment_id {
            lines.push(("Deployment ID", deployment.clone()));
        }
        if let Some(overrode) = &holder.overrode {
            lines.push((
                "Overrode",
                format!(
                    "{} ({}), reason: \"{}\"",
                    overrode.owner, overrode.lock_id, overrode.reason
                ),
            ));
        }
    }
    lines.push(("Fencing token", view.fencing_token.to_string()));
    if verbose {
        if let Some(holder) = &view.holder {
            for (key, value) in &holder.metadata {
                lines.push(("Metadata", format!("{key}={value}")));
            }
        }
        for waiter in &view.queue {
            lines.push((
                "Waiting",
                format!(
                    "{} since {}: \"{}\"",
                    super::report::shown_name(&waiter.user, &waiter.owner),
                    when(waiter.since, now),
                    waiter.reason
                ),
            ));
        }
    }
    let width = lines.iter().map(|(key, _)| key.len()).max().unwrap_or(0) + 1;
    // Every value is escaped here, whatever it was built from.
    let mut out: String = lines
        .iter()
        .map(|(key, value)| format!("{:<width$} {}\n", format!("{key}:"), Safe(value)))
        .collect();
    if verbose && !view.history.is_empty() {
        out.push_str("\nRecent history:\n");
        let recent = view.history.len().saturating_sub(5);
        out.push_str(&history_table(&view.history[recent..], None, now));
    }
    out
}

/// `status -v`'s plain answer to "do I hold this lock?" for `caller` (the
/// identity the API server authenticated).
pub fn caller_holding(view: &LockView, caller: &str) -> String {
    let Some(holder) = &view.holder else {
        return "Nobody holds this lock.".to_string();
    };
    let name = super::report::holder_name(holder);
    let expired = rules::is_expired(holder, view.server_time);
    let line = match (holder.user == caller, expired) {
        (true, false) => "You hold this lock.".to_string(),
        (false, false) => format!("You do not hold this lock; {name} does."),
        (true, true) => format!(
            "You do not hold this lock: your holding expired at {} (renew it with `deploylock acquire --extend` while nobody else takes it).",
            when(holder.expires_at, view.server_time)
        ),
        (false, true) => format!(
            "Nobody holds this lock: {name}'s holding expired at {}.",
            when(holder.expires_at, view.server_time)
        ),
    };
    escape(&line).into_owned()
}

/// `list` as kubectl prints `get`.
pub fn list_table(locks: &[DeploymentLock], now: DateTime<Utc>, all_namespaces: bool) -> String {
    // A field of the holding, "-" while nobody holds the lock.
    let held = |lock: &DeploymentLock, field: fn(&LockHolder) -> String| {
        lock.spec.holder.as_ref().map_or_else(|| "-".into(), field)
    };
    let columns: [Column<'_, DeploymentLock>; 7] = [
        ("ENVIRONMENT", &|lock| lock.spec.environment.clone()),
        ("STATE", &|lock| {
            rules::state_at(&lock.spec, now).to_string()
        }),
        ("HOLDER", &|lock| held(lock, |h| h.user.clone())),
        ("OWNER", &|lock| held(lock, |h| h.owner.clone())),
        ("REASON", &|lock| held(lock, |h| h.reason.clone())),
        ("EXPIRES", &|lock| {
            held(lock, |h| {
                h.expires_at.format("%Y-%m-%dT%H:%M:%SZ").to_string()
            })
        }),
        ("AGE", &|lock| {
            lock.metadata
                .creation_timestamp
                .as_ref()
                .and_then(|time| DateTime::<Utc>::from_timestamp(time.0.as_second(), 0))
                .map(|created| short_span(now - created))
                .unwrap_or_default()
        }),
    ];
    listing(locks, &columns, all_namespaces)
}

/// `history`, oldest first, with the expiries in their place: the expiry
/// instant is not a write (the API server has no timer), so an "Expired" row
/// is derived where the record shows one happened: before the Cleared or
/// TookOverExpired entry that followed it, and at the end for a current
/// holding whose `expiresAt` has passed (`current_holder`).
pub fn history_table(
    history: &[HistoryEntry],
    current_holder: Option<&LockHolder>,
    now: DateTime<Utc>,
) -> String {
    let mut table = plain_table(&[
        "AT", "ACTION", "BY", "OWNER", "LOCK ID", "EXPIRES", "REASON",
    ]);
    let at = |time: DateTime<Utc>| {
        format!(
            "{} ({} ago)",
            time.format("%Y-%m-%dT%H:%M:%SZ"),
            short_span(now - time)
        )
    };
    let expired_row = |expiry: &Expiry| {
        vec![
            at(expiry.at),
            "Expired".to_string(),
            "-".to_string(),
            expiry.owner.clone(),
            expiry.lock_id.clone(),
            "-".to_string(),
            "(derived: expiresAt passed)".to_string(),
        ]
    };
    for (entry, expired_before) in with_expiries(history) {
        if let Some(expiry) = expired_before {
            add_row(&mut table, expired_row(&expiry));
        }
        add_row(
            &mut table,
            vec![
                at(entry.at),
                format!("{:?}", entry.action),
                entry.by.clone(),
                entry.owner.clone(),
                entry.lock_id.clone(),
                entry
                    .expires_at
                    .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                    .unwrap_or_else(|| "-".into()),
                entry.reason.clone(),
            ],
        );
    }
    if let Some(holder) = current_holder.filter(|holder| rules::is_expired(holder, now)) {
        add_row(
            &mut table,
            expired_row(&Expiry {
                at: holder.expires_at,
                lock_id: holder.lock_id.clone(),
                owner: holder.owner.clone(),
            }),
        );
    }
    rendered(table)
}

/// A holding's expiry, as the history shows it happened.
#[derive(Clone, Debug, PartialEq)]
pub struct Expiry {
    pub at: DateTime<Utc>,
    pub lock_id: String,
    pub owner: String,
}

/// Each entry with the expiry it records, if any: a Cleared entry clears an
/// expired holding, a TookOverExpired entry takes over the holding before
/// it. The expiry instant is the holding's last recorded `expiresAt`.
pub fn with_expiries(history: &[HistoryEntry]) -> Vec<(&HistoryEntry, Option<Expiry>)> {
    use crate::crd::HistoryAction;
    let mut last_expiry: std::collections::HashMap<&str, DateTime<Utc>> = Default::default();
    let mut current: Option<(&str, &str)> = None;
    let mut rows = Vec::with_capacity(history.len());
    for entry in history {
        let ended = match entry.action {
            HistoryAction::Cleared => Some((entry.lock_id.as_str(), entry.owner.as_str())),
            HistoryAction::TookOverExpired => current,
            _ => None,
        };
        let expiry = ended.and_then(|(lock_id, owner)| {
            last_expiry.get(lock_id).map(|at| Expiry {
                at: *at,
                lock_id: lock_id.to_string(),
                owner: owner.to_string(),
            })
        });
        if let Some(expires_at) = entry.expires_at {
            last_expiry.insert(entry.lock_id.as_str(), expires_at);
        }
        current = match entry.action {
            HistoryAction::Acquired
            | HistoryAction::TookOverExpired
            | HistoryAction::ForceAcquired
            | HistoryAction::Extended => Some((entry.lock_id.as_str(), entry.owner.as_str())),
            _ => None,
        };
        rows.push((entry, expiry));
    }
    rows
}

/// kubectl-style short durations: 45s, 12m, 3h, 5d.
fn short_span(span: chrono::Duration) -> String {
    let seconds = span.num_seconds().max(0);
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// `windows` as a table: when each window opens next and whether it is open.
pub fn windows_table(
    windows: &[crate::windows::FreezeWindow],
    now: DateTime<Utc>,
    all_namespaces: bool,
) -> String {
    use crate::windows::{FreezeWindow, FreezeWindowStatus};
    let status = |window: &FreezeWindow| window.status.clone().unwrap_or_default();
    let at =
        |time: Option<DateTime<Utc>>| time.map_or_else(|| "-".to_string(), |time| when(time, now));
    let next_start = |status: FreezeWindowStatus| {
        crate::conditions::false_condition(&status.conditions, crate::windows::READY_CONDITION)
            .map(|c| format!("not ready: {}", c.message))
            .unwrap_or_else(|| at(status.next_start))
    };
    let text_or =
        |value: &Option<String>, absent: &str| value.clone().unwrap_or_else(|| absent.into());
    let columns: [Column<'_, FreezeWindow>; 8] = [
        ("NAME", &|window| window.name_any()),
        ("SCHEDULE", &|window| text_or(&window.spec.schedule, "once")),
        ("TIME ZONE", &|window| {
            text_or(&window.spec.time_zone, "UTC")
        }),
        ("OPEN UNTIL", &|window| {
            at(status(window).open.map(|open| open.end))
        }),
        ("NEXT START", &|window| next_start(status(window))),
        ("NEXT END", &|window| at(status(window).next_end)),
        ("ENVIRONMENTS", &|window| {
            if window.spec.all_environments {
                "all".to_string()
            } else {
                window.spec.environments.join(",")
            }
        }),
        ("REASON", &|window| window.spec.reason.clone()),
    ];
    listing(windows, &columns, all_namespaces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata;

    /// A lock as a hostile client could store it: every user-written string
    /// carries terminal escapes or bidi overrides.
    fn hostile_lock() -> DeploymentLock {
        let evil = "\u{1b}]8;;http://evil\u{7}click\u{1b}]8;;\u{7}\u{1b}[2J\u{202e}txt.exe";
        let mut holder = testdata::holder(evil);
        holder["reason"] = format!("reason{evil}\nsecond line").into();
        holder["deploymentId"] = format!("deploy{evil}").into();
        holder["metadata"] = serde_json::json!({ "key": format!("value{evil}") });
        holder["overrode"] = serde_json::json!({
            "lockId": format!("old{evil}"),
            "user": "u",
            "owner": format!("oldowner{evil}"),
            "reason": format!("oldreason{evil}")
        });
        let object = serde_json::json!({
            "apiVersion": "deploylock.dev/v1",
            "kind": "DeploymentLock",
            "metadata": { "name": "production", "namespace": "team-a" },
            "spec": {
                "environment": "production",
                "fencingToken": 3,
                "holder": holder,
                "queue": [testdata::waiter(evil)],
                "history": [testdata::acquired_entry(evil)]
            }
        });
        match serde_json::from_value(object) {
            Ok(lock) => lock,
            Err(err) => panic!("the hostile lock does not decode: {err}"),
        }
    }

    fn now() -> DateTime<Utc> {
        match DateTime::parse_from_rfc3339("2030-01-01T00:10:00Z") {
            Ok(time) => time.with_timezone(&Utc),
            Err(err) => panic!("{err}"),
        }
    }

    /// Nothing a terminal would act on, and each hostile field shown escaped.
    #[track_caller]
    fn assert_rendered_safely(text: &str, expected_fields: &[&str]) {
        assert!(
            !text.chars().any(|c| is_unsafe(c) && c != '\n'),
            "unescaped control or bidi character in:\n{text:?}"
        );
        for field in expected_fields {
            let shown = format!(
                "{field}\\x1b]8;;http://evil\\x07click\\x1b]8;;\\x07\\x1b[2J\\u202etxt.exe"
            );
            assert!(
                text.contains(&shown),
                "{field} not shown escaped in:\n{text}"
            );
        }
    }

    #[test]
    fn every_class_of_unsafe_character_is_escaped() {
        // C0, with the usual short forms for the three whitespace controls.
        assert_eq!(escape("a\nb\rc\td"), "a\\nb\\rc\\td");
        assert_eq!(escape("\u{1b}[2J"), "\\x1b[2J");
        assert_eq!(escape("\u{0}\u{7}\u{8}\u{1f}"), "\\x00\\x07\\x08\\x1f");
        for c in (0u32..0x20).filter_map(char::from_u32) {
            let escaped = escape(&c.to_string()).into_owned();
            assert!(
                escaped.starts_with('\\') && escaped.len() >= 2,
                "{c:?}: {escaped}"
            );
        }
        // DEL.
        assert_eq!(escape("\u{7f}"), "\\x7f");
        // C1 (CSI, NEL, OSC, ST and the rest).
        assert_eq!(escape("\u{9b}2J"), "\\u009b2J");
        assert_eq!(escape("\u{85}\u{9d}\u{9c}"), "\\u0085\\u009d\\u009c");
        for c in (0x80u32..0xa0).filter_map(char::from_u32) {
            assert_eq!(escape(&c.to_string()), format!("\\u{:04x}", u32::from(c)));
        }
        // Bidi embeddings, overrides, isolates and marks; line separators.
        for (c, shown) in [
            ('\u{202a}', "\\u202a"),
            ('\u{202b}', "\\u202b"),
            ('\u{202c}', "\\u202c"),
            ('\u{202d}', "\\u202d"),
            ('\u{202e}', "\\u202e"),
            ('\u{2066}', "\\u2066"),
            ('\u{2067}', "\\u2067"),
            ('\u{2068}', "\\u2068"),
            ('\u{2069}', "\\u2069"),
            ('\u{200e}', "\\u200e"),
            ('\u{200f}', "\\u200f"),
            ('\u{061c}', "\\u061c"),
            ('\u{2028}', "\\u2028"),
            ('\u{2029}', "\\u2029"),
        ] {
            assert_eq!(escape(&format!("a{c}b")), format!("a{shown}b"));
        }
    }

    #[test]
    fn printable_text_is_left_as_is() {
        for text in [
            "Deploying version 2.1.0",
            "café, 日本語, emoji 🚀, Ω",
            "a \\x1b typed as text, a \"quote\"",
            "",
        ] {
            assert!(matches!(escape(text), Cow::Borrowed(_)), "{text}");
            assert_eq!(Safe(text).to_string(), text);
        }
    }

    #[test]
    fn status_escapes_every_user_written_value() {
        let lock = hostile_lock();
        let view = LockView::new("team-a", "production", Some(&lock), now());
        let text = status_table(&view, true);
        assert_rendered_safely(
            &text,
            &[
                "owner",
                "user",
                "reason",
                "id",
                "deploy",
                "value",
                "oldowner",
                "old",
                "oldreason",
                "waiter",
                "waiting",
                "by",
            ],
        );
        assert!(text.contains("second line"), "{text}");
        assert!(text.contains("\\nsecond line"), "{text}");
    }

    /// `status -v` answers "do I hold it?" for each case in words.
    #[test]
    fn status_says_whether_the_caller_holds_the_lock() {
        let lock = |holder: Option<serde_json::Value>| -> DeploymentLock {
            let object = serde_json::json!({
                "apiVersion": "deploylock.dev/v1",
                "kind": "DeploymentLock",
                "metadata": { "name": "production", "namespace": "team-a" },
                "spec": { "environment": "production", "fencingToken": 3, "holder": holder }
            });
            serde_json::from_value(object).unwrap_or_else(|err| panic!("{err}"))
        };
        let held = lock(Some(testdata::holder("")));
        let free = lock(None);
        let at = |time: &str| -> DateTime<Utc> {
            DateTime::parse_from_rfc3339(time)
                .unwrap_or_else(|err| panic!("{err}"))
                .with_timezone(&Utc)
        };
        let live = LockView::new("team-a", "production", Some(&held), now());
        assert_eq!(caller_holding(&live, "user"), "You hold this lock.");
        assert_eq!(
            caller_holding(&live, "bob"),
            "You do not hold this lock; user (owner label: owner) does."
        );
        let expired = LockView::new(
            "team-a",
            "production",
            Some(&held),
            at("2030-01-01T00:34:00Z"),
        );
        let mine = caller_holding(&expired, "user");
        assert!(
            mine.starts_with(
                "You do not hold this lock: your holding expired at 2030-01-01T00:30:00Z (4m ago)"
            ) && mine.contains("acquire --extend"),
            "{mine}"
        );
        let theirs = caller_holding(&expired, "bob");
        assert!(
            theirs
                .starts_with("Nobody holds this lock: user (owner label: owner)'s holding expired"),
            "{theirs}"
        );
        let view = LockView::new("team-a", "production", Some(&free), now());
        assert_eq!(caller_holding(&view, "bob"), "Nobody holds this lock.");
    }

    #[test]
    fn list_escapes_every_cell() {
        let lock = hostile_lock();
        for all_namespaces in [false, true] {
            let text = list_table(std::slice::from_ref(&lock), now(), all_namespaces);
            assert_rendered_safely(&text, &["owner", "reason"]);
            assert_eq!(text.lines().count(), 2, "{text}");
        }
    }

    fn decoded<K: serde::de::DeserializeOwned>(object: serde_json::Value) -> K {
        match serde_json::from_value(object) {
            Ok(decoded) => decoded,
            Err(err) => panic!("the test object does not decode: {err}"),
        }
    }

    /// The cells of each line, split on kubectl's column gaps.
    fn cells(text: &str) -> Vec<Vec<String>> {
        text.lines()
            .map(|line| {
                line.split("  ")
                    .map(str::trim)
                    .filter(|cell| !cell.is_empty())
                    .map(String::from)
                    .collect()
            })
            .collect()
    }

    /// `list`: kubectl's column order, NAMESPACE first across namespaces,
    /// "-" for a free lock's holding.
    #[test]
    fn list_has_kubectl_columns_and_a_dash_for_a_free_lock() {
        let free: DeploymentLock = decoded(serde_json::json!({
            "apiVersion": "deploylock.dev/v1", "kind": "DeploymentLock",
            "metadata": {"name": "staging", "namespace": "team-b",
                         "creationTimestamp": "2030-01-01T00:00:00Z"},
            "spec": {"environment": "staging", "fencingToken": 1}
        }));
        let text = list_table(std::slice::from_ref(&free), now(), false);
        let rows = cells(&text);
        assert_eq!(
            rows[0].join(" "),
            "ENVIRONMENT STATE HOLDER OWNER REASON EXPIRES AGE",
            "{text}"
        );
        assert_eq!(
            rows[1..],
            [vec!["staging", "Available", "-", "-", "-", "-", "10m"]],
            "{text}"
        );
        let text = list_table(std::slice::from_ref(&free), now(), true);
        let rows = cells(&text);
        assert_eq!(rows[0][0], "NAMESPACE", "{text}");
        assert_eq!(rows[1][..2], ["team-b", "staging"], "{text}");
    }

    /// `windows`: its columns, "once" and "UTC" for a one-off window, "-"
    /// for instants not known, NAMESPACE first across namespaces.
    #[test]
    fn windows_lists_its_columns_with_defaults() {
        let window: crate::windows::FreezeWindow = decoded(serde_json::json!({
            "apiVersion": "deploylock.dev/v1", "kind": "FreezeWindow",
            "metadata": {"name": "release-freeze", "namespace": "team-a"},
            "spec": {"start": "2030-01-02T00:00:00Z", "end": "2030-01-03T00:00:00Z",
                     "environments": ["production", "staging"], "reason": "audit"}
        }));
        let text = windows_table(std::slice::from_ref(&window), now(), false);
        assert_eq!(
            cells(&text),
            [
                vec![
                    "NAME",
                    "SCHEDULE",
                    "TIME ZONE",
                    "OPEN UNTIL",
                    "NEXT START",
                    "NEXT END",
                    "ENVIRONMENTS",
                    "REASON",
                ],
                vec![
                    "release-freeze",
                    "once",
                    "UTC",
                    "-",
                    "-",
                    "-",
                    "production,staging",
                    "audit"
                ],
            ],
            "{text}"
        );
        let text = windows_table(std::slice::from_ref(&window), now(), true);
        let rows = cells(&text);
        assert_eq!(rows[0][0], "NAMESPACE", "{text}");
        assert_eq!(rows[1][..2], ["team-a", "release-freeze"], "{text}");
    }

    fn entry(
        sequence: i64,
        action: crate::crd::HistoryAction,
        lock_id: &str,
        owner: &str,
        minute: i64,
        expires_minute: Option<i64>,
    ) -> HistoryEntry {
        let base = now() - chrono::Duration::hours(1);
        HistoryEntry {
            sequence,
            action,
            at: base + chrono::Duration::minutes(minute),
            lock_id: lock_id.into(),
            by: owner.into(),
            owner: owner.into(),
            reason: "r".into(),
            expires_at: expires_minute.map(|m| base + chrono::Duration::minutes(m)),
        }
    }

    #[test]
    fn history_shows_each_expiry_where_the_record_proves_it() {
        use crate::crd::HistoryAction::*;
        let base = now() - chrono::Duration::hours(1);
        let history = [
            entry(1, Acquired, "a", "alice", 0, Some(10)),
            entry(2, Extended, "a", "alice", 5, Some(20)),
            entry(3, TookOverExpired, "b", "bob", 25, Some(40)),
            entry(4, Released, "b", "bob", 30, None),
            entry(5, Acquired, "c", "carol", 31, Some(35)),
            entry(6, Cleared, "c", "carol", 50, None),
        ];
        let expiries: Vec<(i64, Option<Expiry>)> = with_expiries(&history)
            .into_iter()
            .map(|(entry, expiry)| (entry.sequence, expiry))
            .collect();
        let expiry = |lock_id: &str, owner: &str, minute: i64| Expiry {
            at: base + chrono::Duration::minutes(minute),
            lock_id: lock_id.into(),
            owner: owner.into(),
        };
        assert_eq!(
            expiries,
            [
                (1, None),
                (2, None),
                (3, Some(expiry("a", "alice", 20))),
                (4, None),
                (5, None),
                (6, Some(expiry("c", "carol", 35))),
            ]
        );
        let text = history_table(&history, None, now());
        let expired_rows = text
            .lines()
            .filter(|line| line.split_whitespace().nth(3) == Some("Expired"))
            .count();
        assert_eq!(expired_rows, 2, "{text}");
    }

    #[test]
    fn history_escapes_every_cell() {
        let lock = hostile_lock();
        let text = history_table(&lock.spec.history, None, now());
        assert_rendered_safely(&text, &["by", "owner", "id", "reason"]);
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    #[test]
    fn json_and_yaml_stay_exact() {
        let lock = hostile_lock();
        let view = LockView::new("team-a", "production", Some(&lock), now());
        let owner = lock.spec.holder.as_ref().map(|h| h.owner.clone());
        let json: serde_json::Value =
            serde_json::from_str(&structured(&view, OutputFormat::Json)).unwrap_or_default();
        assert_eq!(json["holder"]["owner"].as_str().map(String::from), owner);
        let yaml: serde_yaml::Value =
            serde_yaml::from_str(&structured(&view, OutputFormat::Yaml)).unwrap_or_default();
        assert_eq!(yaml["holder"]["owner"].as_str().map(String::from), owner);
    }

    proptest::proptest! {
        #[test]
        fn escaped_text_never_holds_an_unsafe_character(text in "\\PC*|[\\x00-\\x{a0}\\x{2000}-\\x{206f}]*") {
            let escaped = escape(&text);
            proptest::prop_assert!(!escaped.chars().any(is_unsafe), "{escaped:?}");
            // Safe characters pass through in order.
            let kept: String = text.chars().filter(|c| !is_unsafe(*c)).collect();
            let mut rest = escaped.as_ref();
            for c in kept.chars() {
                let at = rest.find(c);
                proptest::prop_assert!(at.is_some(), "{c:?} lost from {text:?}");
                rest = &rest[at.unwrap_or_default() + c.len_utf8()..];
            }
        }
    }
}
