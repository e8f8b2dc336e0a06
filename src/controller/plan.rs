//! What one reconcile does to one lock, decided without I/O: given the
//! stored lock (with its status), the API server's time and the settings,
//! which spec or status to write, which Events to record and when to look
//! again. The reconcile ([`super::reconcile`]) carries the plan out.

use chrono::{DateTime, Utc};
use kube::Resource;

use crate::conditions;
use crate::crd::{
    DeploymentLock, DeploymentLockSpec, DeploymentLockStatus, HistoryAction, HistoryEntry,
    LockHolder, LockState,
};
use crate::rules::{self, Actor, Decision, Request};

use super::{LOCKED_CONDITION, Settings};

/// Label of the holder the controller writes as when it clears.
pub const CLEARER_OWNER: &str = "deploylock-controller";

/// A reconcile's decisions.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan<'a> {
    /// The lock's state at the server time given.
    pub state: LockState,
    /// How long the holding in force has lasted (0 when none is), for the
    /// metric.
    pub held_seconds: f64,
    /// Before anything else: bring the clock Lease (the admission policy's
    /// time) to this instant, an expired holding's expiry, so the policy
    /// allows a takeover once the lock is marked Expired.
    pub advance_clock_to: Option<DateTime<Utc>>,
    pub step: Step<'a>,
}

/// What to write and announce.
#[derive(Clone, Debug, PartialEq)]
pub enum Step<'a> {
    /// The holding stayed expired for the whole retention: record its
    /// Expired Event (best effort), then write this spec (through the
    /// store's conditional write; the write triggers the next reconcile).
    Clear { spec: Box<DeploymentLockSpec> },
    /// Keep the lock as it is.
    Keep {
        /// The status to write first, if it differs from the stored one.
        status: Option<DeploymentLockStatus>,
        /// Events to record, in order; after each history entry's Event,
        /// `status.lastEventSequence` may record its sequence.
        events: Vec<Announcement<'a>>,
        /// The last history sequence already announced.
        announced: i64,
        /// When the state will change by itself (server time): look again
        /// then. `None`: only a change of the object wakes it.
        wake_at: Option<DateTime<Utc>>,
    },
}

/// An Event to record.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Announcement<'a> {
    /// A history entry not announced yet.
    Entry(&'a HistoryEntry),
    /// The expiry of the holding in force (Expired).
    Expiry(&'a LockHolder),
}

/// Decides a reconcile of `lock` (named `name`) at the server time `now`;
/// `user` is the controller's identity, recorded when it clears.
pub fn plan<'a>(
    lock: &'a DeploymentLock,
    name: &str,
    now: DateTime<Utc>,
    settings: &Settings,
    user: &str,
) -> Plan<'a> {
    let state = rules::state_at(&lock.spec, now);
    let holder = lock.spec.holder.as_ref();
    let expired = holder.filter(|_| state == LockState::Expired);
    if let Some(holder) = expired {
        // Housekeeping: a holding expired for the whole retention is cleared
        // through the same rules the CLI uses.
        let clear = Request::Clear {
            actor: Actor::new(user.to_string(), Some(CLEARER_OWNER.into())),
            lock_id: holder.lock_id.clone(),
            retention: settings.retention,
        };
        if let Ok(Decision::Change { next, .. }) =
            rules::decide(name, Some(&lock.spec), now, &clear)
        {
            return Plan {
                state,
                held_seconds: 0.0,
                advance_clock_to: Some(holder.expires_at),
                step: Step::Clear {
                    spec: Box::new(next),
                },
            };
        }
    }
    let held_seconds = match (holder, state) {
        (Some(holder), LockState::Locked | LockState::ForceLocked) => {
            (now - holder.acquired_at).num_milliseconds().max(0) as f64 / 1000.0
        }
        _ => 0.0,
    };
    let stored = lock.status.clone().unwrap_or_default();
    let announced = stored.last_event_sequence.unwrap_or(0);
    let desired = desired_status(lock, &stored, state, announced, now);
    let mut events: Vec<Announcement<'a>> = lock
        .spec
        .history
        .iter()
        .filter(|entry| entry.sequence > announced)
        .map(Announcement::Entry)
        .collect();
    events.extend(expired.map(Announcement::Expiry));
    let wake_at = match (holder, state) {
        (Some(holder), LockState::Locked | LockState::ForceLocked) => Some(holder.expires_at),
        (Some(holder), LockState::Expired) => Some(holder.expires_at + settings.retention),
        _ => None,
    };
    Plan {
        state,
        held_seconds,
        advance_clock_to: expired.map(|holder| holder.expires_at),
        step: Step::Keep {
            status: (desired != stored).then_some(desired),
            events,
            announced,
            wake_at,
        },
    }
}

/// The status the lock should show at `now`: its state and the `Locked`
/// condition (whose transition time moves only when its value changes).
pub fn desired_status(
    lock: &DeploymentLock,
    current: &DeploymentLockStatus,
    state: LockState,
    last_event_sequence: i64,
    now: DateTime<Utc>,
) -> DeploymentLockStatus {
    let holder = lock.spec.holder.as_ref();
    let locked = matches!(state, LockState::Locked | LockState::ForceLocked);
    let message = match holder {
        Some(holder) if locked => format!(
            "held by {} until {}: {}",
            holder.owner,
            holder.expires_at.format("%Y-%m-%dT%H:%M:%SZ"),
            holder.reason
        ),
        Some(holder) => format!(
            "expired at {} (was held by {})",
            holder.expires_at.format("%Y-%m-%dT%H:%M:%SZ"),
            holder.owner
        ),
        None => "available".to_string(),
    };
    let generation = lock.meta().generation;
    let locked_condition = conditions::Observation {
        type_: LOCKED_CONDITION,
        status: locked,
        reason: &state.to_string(),
        message: &message,
    }
    .condition(&current.conditions, generation, now);
    DeploymentLockStatus {
        state: Some(state),
        lock_id: holder.map(|holder| holder.lock_id.clone()),
        conditions: vec![locked_condition],
        observed_generation: generation,
        last_event_sequence: Some(last_event_sequence),
    }
}

/// An Event's content, decided from what it announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventText {
    /// Appended to the Event's name (lock name, UID): unique per
    /// announcement, so a second create of the same Event is refused.
    pub suffix: String,
    pub reason: &'static str,
    /// `Normal` or `Warning`.
    pub event_type: &'static str,
    pub note: String,
}

impl Announcement<'_> {
    pub fn text(&self) -> EventText {
        match self {
            Announcement::Entry(entry) => entry_text(entry),
            Announcement::Expiry(holder) => expiry_text(holder),
        }
    }
}

fn entry_text(entry: &HistoryEntry) -> EventText {
    let (reason, event_type) = match entry.action {
        HistoryAction::Acquired | HistoryAction::TookOverExpired => ("Acquired", "Normal"),
        HistoryAction::Extended => ("Extended", "Normal"),
        HistoryAction::Released => ("Released", "Normal"),
        HistoryAction::ForceAcquired => ("ForceAcquired", "Warning"),
        HistoryAction::ForceReleased => ("ForceReleased", "Warning"),
        HistoryAction::Cleared => ("Cleared", "Normal"),
    };
    let expiry = entry
        .expires_at
        .map(|at| format!(" until {}", at.format("%Y-%m-%dT%H:%M:%SZ")))
        .unwrap_or_default();
    let takeover = if entry.action == HistoryAction::TookOverExpired {
        " (took over an expired lock)"
    } else {
        ""
    };
    EventText {
        suffix: entry.sequence.to_string(),
        reason,
        event_type,
        note: format!(
            "{} by {} (owner {}){expiry}{takeover}: {}",
            reason, entry.by, entry.owner, entry.reason
        ),
    }
}

fn expiry_text(holder: &LockHolder) -> EventText {
    EventText {
        suffix: format!("expired-{}", short_id(&holder.lock_id)),
        reason: "Expired",
        event_type: "Normal",
        note: format!(
            "Expired at {}: held by {} (owner {}): {}",
            holder.expires_at.format("%Y-%m-%dT%H:%M:%SZ"),
            holder.user,
            holder.owner,
            holder.reason
        ),
    }
}

/// Up to 12 lowercase letters and digits of an ID, for an Event's name.
pub fn short_id(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(12)
        .collect::<String>()
        .to_lowercase()
}
