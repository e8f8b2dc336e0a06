//! Every replica's memory of the lock history it has watched, so that
//! notifications survive the lock's short history.
//!
//! A lock keeps only its last [`MAX_HISTORY_ENTRIES`] entries. When no
//! replica delivers for a while (a killed leader's Lease has not run out
//! yet) or a receiver is down while a busy lock moves on, the entries a
//! subscription has not had yet can leave the lock before they are sent.
//! Each replica therefore watches the locks for as long as it runs, leader
//! or not, and keeps the entries it saw (the leader's own lock watch adds
//! them too, before its readers are told of a change). A new leader's
//! notification workers plan each lock with the entries after their cursor
//! that the lock no longer holds but this journal does, and its reconciles
//! record their Events. Only what no running replica saw (every replica
//! down, or a watch that had to list again) can still be lost, and that is
//! reported as before.
//!
//! [`MAX_HISTORY_ENTRIES`]: crate::crd::MAX_HISTORY_ENTRIES

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::api::DynamicObject;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;

use crate::crd::{DeploymentLock, HistoryEntry};

use super::WATCH_TIMEOUT_SECONDS;

/// Entries kept per lock (the newest): far more than a lock keeps, so that
/// a receiver down for minutes or a leaderless quarter minute on a busy
/// lock loses nothing, and bounded, so that a lock moving for days does not
/// grow the controller's memory (a few hundred bytes an entry).
pub const JOURNAL_DEPTH: usize = 500;

/// Per lock UID, its history entries by sequence.
type Entries = HashMap<String, BTreeMap<i64, HistoryEntry>>;

/// The replica's journal; clones share it.
#[derive(Clone, Default)]
pub struct Journal {
    entries: Arc<Mutex<Entries>>,
}

impl Journal {
    fn with<T>(&self, read: impl FnOnce(&mut Entries) -> T) -> T {
        read(&mut super::locked(&self.entries))
    }

    /// Takes in the entries `lock` holds now (an entry is never changed
    /// once written, so one already known is kept as it is).
    pub fn record(&self, lock: &DeploymentLock) {
        let Some(uid) = lock.uid() else {
            return;
        };
        if lock.spec.history.is_empty() {
            return;
        }
        self.with(|entries| {
            let kept = entries.entry(uid).or_default();
            for entry in &lock.spec.history {
                kept.entry(entry.sequence).or_insert_with(|| entry.clone());
            }
            while kept.len() > JOURNAL_DEPTH {
                kept.pop_first();
            }
        });
    }

    /// Forgets a deleted lock.
    pub fn forget(&self, uid: &str) {
        self.with(|entries| entries.remove(uid));
    }

    /// Forgets every lock but those in `live` (after a list).
    fn retain(&self, live: &HashSet<String>) {
        self.with(|entries| entries.retain(|uid, _| live.contains(uid)));
    }

    /// The journal's entries after sequence `after` that `lock` no longer
    /// holds, in sequence order (with holes where no version showed an
    /// entry: the notification plan reports those).
    pub fn missed(&self, lock: &DeploymentLock, after: i64) -> Vec<HistoryEntry> {
        let Some(uid) = lock.uid() else {
            return Vec::new();
        };
        let held: HashSet<i64> = lock.spec.history.iter().map(|e| e.sequence).collect();
        self.with(|entries| {
            entries
                .get(&uid)
                .map(|kept| {
                    kept.range(after.saturating_add(1)..)
                        .filter(|(sequence, _)| !held.contains(sequence))
                        .map(|(_, entry)| entry.clone())
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    /// `lock` with [`Journal::missed`] added to its history, in sequence
    /// order; `None` when nothing is missed (the lock as it is has
    /// everything the journal knows). For planning only: never written.
    pub fn fill_in(&self, lock: &DeploymentLock, after: i64) -> Option<DeploymentLock> {
        let missed = self.missed(lock, after);
        if missed.is_empty() {
            return None;
        }
        let mut filled = lock.clone();
        filled.spec.history.extend(missed);
        filled.spec.history.sort_by_key(|entry| entry.sequence);
        Some(filled)
    }

    /// Watches the locks of `namespace` (all when `None`) until `stop`,
    /// taking in every version seen. A lock that does not decode is skipped
    /// here (the leader reports it).
    pub async fn watch(
        self,
        client: Client,
        namespace: Option<String>,
        stop: watch::Receiver<bool>,
    ) {
        let api = super::lock_objects_api(client, namespace.as_deref());
        let config = watcher::Config::default()
            .any_semantic()
            .timeout(WATCH_TIMEOUT_SECONDS);
        let mut listed: HashSet<String> = HashSet::new();
        let events = watcher(api, config).default_backoff();
        let mut events = std::pin::pin!(events);
        let mut stop = stop;
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                _ = stop.wait_for(|stopped| *stopped) => return,
            };
            match event {
                None => return,
                Some(Err(err)) => {
                    tracing::debug!(error = %err, "journal: watching DeploymentLocks failed; retrying");
                }
                Some(Ok(event)) => self.take(event, &mut listed),
            }
        }
    }

    fn take(&self, event: watcher::Event<DynamicObject>, listed: &mut HashSet<String>) {
        match event {
            watcher::Event::Init => listed.clear(),
            watcher::Event::InitApply(object) => {
                if let Some(uid) = object.uid() {
                    listed.insert(uid);
                }
                self.record_object(&object);
            }
            watcher::Event::InitDone => self.retain(&std::mem::take(listed)),
            watcher::Event::Apply(object) => self.record_object(&object),
            watcher::Event::Delete(object) => {
                if let Some(uid) = object.uid() {
                    self.forget(&uid);
                }
            }
        }
    }

    fn record_object(&self, object: &DynamicObject) {
        if let Ok(lock) = super::typed(object) {
            self.record(&lock);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DeploymentLockSpec, HistoryAction};
    use chrono::{TimeZone, Utc};

    fn entry(sequence: i64) -> HistoryEntry {
        HistoryEntry {
            sequence,
            action: if sequence % 2 == 1 {
                HistoryAction::Acquired
            } else {
                HistoryAction::Released
            },
            at: Utc.timestamp_opt(1_800_000_000 + sequence, 0).unwrap(),
            lock_id: format!("id-{}", (sequence + 1) / 2),
            by: "alice".into(),
            owner: "alice".into(),
            reason: "deploy".into(),
            expires_at: None,
        }
    }

    /// A lock whose history holds entries `first..=last`.
    fn lock(uid: &str, first: i64, last: i64) -> DeploymentLock {
        let mut lock = DeploymentLock::new(
            "production",
            DeploymentLockSpec {
                environment: "production".into(),
                history: (first..=last).map(entry).collect(),
                ..Default::default()
            },
        );
        lock.metadata.uid = Some(uid.into());
        lock
    }

    fn sequences(lock: &DeploymentLock) -> Vec<i64> {
        lock.spec.history.iter().map(|e| e.sequence).collect()
    }

    #[test]
    fn entries_the_lock_dropped_are_filled_in_after_the_cursor() {
        let journal = Journal::default();
        for last in 1..=30 {
            journal.record(&lock("u", (last - 19).max(1), last));
        }
        let now = lock("u", 11, 30);
        let filled = journal
            .fill_in(&now, 4)
            .expect("entries 5 to 10 were dropped");
        assert_eq!(sequences(&filled), (5..=30).collect::<Vec<_>>());
        assert!(
            journal.fill_in(&now, 10).is_none(),
            "nothing missing after 10"
        );
        assert!(journal.fill_in(&lock("other", 11, 30), 4).is_none());
    }

    #[test]
    fn what_no_version_showed_stays_missing() {
        let journal = Journal::default();
        journal.record(&lock("u", 1, 20));
        // Versions with entries 21..=25 were never seen.
        journal.record(&lock("u", 26, 45));
        let filled = journal.fill_in(&lock("u", 26, 45), 10).expect("11..=20");
        assert_eq!(
            sequences(&filled),
            (11..=20).chain(26..=45).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_journal_is_bounded_and_forgets_deleted_locks() {
        let journal = Journal::default();
        let last = i64::try_from(JOURNAL_DEPTH).unwrap() + 100;
        for first in (1..=last).step_by(20) {
            journal.record(&lock("u", first, (first + 19).min(last)));
        }
        let filled = journal.fill_in(&lock("u", last, last), 0).expect("filled");
        assert_eq!(filled.spec.history.len(), JOURNAL_DEPTH);
        assert_eq!(
            sequences(&filled).first(),
            Some(&(last + 1 - i64::try_from(JOURNAL_DEPTH).unwrap()))
        );
        journal.forget("u");
        assert!(journal.fill_in(&lock("u", last, last), 0).is_none());
        journal.record(&lock("a", 1, 3));
        journal.record(&lock("b", 1, 3));
        journal.retain(&HashSet::from(["b".to_string()]));
        assert!(journal.fill_in(&lock("a", 3, 3), 0).is_none());
        assert!(journal.fill_in(&lock("b", 3, 3), 0).is_some());
    }
}
