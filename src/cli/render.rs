//! How locks are shown: tables for people, JSON and YAML for scripts.

use chrono::{DateTime, Utc};
use comfy_table::{Table, presets};
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

/// A lock as scripts see it with `-o json|yaml`.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct LockView {
    pub namespace: String,
    pub environment: String,
    pub state: LockState,
    pub fencing_token: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
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
        lines.push(("Owner", holder.owner.clone()));
        lines.push(("User", holder.user.clone()));
        lines.push(("Reason", holder.reason.clone()));
        lines.push(("Type", holder.lock_type.to_string()));
        lines.push(("Lock ID", holder.lock_id.clone()));
        lines.push(("Acquired", when(holder.acquired_at, now)));
        lines.push(("Expires", when(holder.expires_at, now)));
        if let Some(deployment) = &holder.deployment_id {
            lines.push(("Deployment ID", deployment.clone()));
        }
        if let Some(overrode) = &holder.overrode {
            lines.push((
                "Overrode",
                format!(
                    "{} ({}), reason: {:?}",
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
                    "{} since {}: {:?}",
                    waiter.owner,
                    when(waiter.since, now),
                    waiter.reason
                ),
            ));
        }
    }
    let width = lines.iter().map(|(key, _)| key.len()).max().unwrap_or(0) + 1;
    let mut out: String = lines
        .iter()
        .map(|(key, value)| format!("{:<width$} {value}\n", format!("{key}:")))
        .collect();
    if verbose && !view.history.is_empty() {
        out.push_str("\nRecent history:\n");
        let recent = view.history.len().saturating_sub(5);
        out.push_str(&history_table(&view.history[recent..], now));
    }
    out
}

/// `list` as kubectl prints `get`.
pub fn list_table(locks: &[DeploymentLock], now: DateTime<Utc>, all_namespaces: bool) -> String {
    let mut header = vec!["ENVIRONMENT", "STATE", "OWNER", "REASON", "EXPIRES", "AGE"];
    if all_namespaces {
        header.insert(0, "NAMESPACE");
    }
    let mut table = plain_table(&header);
    for lock in locks {
        let holder = lock.spec.holder.as_ref();
        let age = lock
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(|time| DateTime::<Utc>::from_timestamp(time.0.as_second(), 0))
            .map(|created| short_span(now - created))
            .unwrap_or_default();
        let mut row = vec![
            lock.spec.environment.clone(),
            rules::state_at(&lock.spec, now).to_string(),
            holder
                .map(|h| h.owner.clone())
                .unwrap_or_else(|| "-".into()),
            holder
                .map(|h| h.reason.clone())
                .unwrap_or_else(|| "-".into()),
            holder
                .map(|h| h.expires_at.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_else(|| "-".into()),
            age,
        ];
        if all_namespaces {
            row.insert(0, lock.metadata.namespace.clone().unwrap_or_default());
        }
        table.add_row(row);
    }
    rendered(table)
}

/// `history`, oldest first.
pub fn history_table(history: &[HistoryEntry], now: DateTime<Utc>) -> String {
    let mut table = plain_table(&[
        "AT", "ACTION", "BY", "OWNER", "LOCK ID", "EXPIRES", "REASON",
    ]);
    for entry in history {
        table.add_row(vec![
            format!(
                "{} ({} ago)",
                entry.at.format("%Y-%m-%dT%H:%M:%SZ"),
                short_span(now - entry.at)
            ),
            format!("{:?}", entry.action),
            entry.by.clone(),
            entry.owner.clone(),
            entry.lock_id.clone(),
            entry
                .expires_at
                .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_else(|| "-".into()),
            entry.reason.clone(),
        ]);
    }
    rendered(table)
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
