//! The leader's one watch of the DeploymentLocks, shared: the reconciles
//! are driven by it ([`super::run`]) and the notification workers
//! ([`super::notify`]) read its cache and are told which lock changed. N
//! subscriptions cost no further watch, no second copy of the locks and no
//! rescan of every lock on every change.

use kube::ResourceExt;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::watcher;
use tokio::sync::{broadcast, watch};

use super::journal::Journal;
use crate::crd::DeploymentLock;

/// Changes buffered for a reader; one that falls further behind is told
/// (`Lagged`) and reads the whole cache again.
const CHANGE_BUFFER: usize = 1024;

/// What a reader of the cache is told, after the cache has taken it in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockChange {
    /// A (re)list completed: anything may have changed.
    Listed,
    /// This lock was created, changed or deleted (or became unreadable).
    Changed(LockKey),
}

/// A lock's name and namespace (and UID, when known).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LockKey {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

impl LockKey {
    pub fn object_ref(&self) -> ObjectRef<DeploymentLock> {
        ObjectRef::new(&self.name).within(&self.namespace)
    }
}

/// The writing end, consumed by the watch in [`super::run`].
pub struct LockWatch {
    writer: Writer<DeploymentLock>,
    feed: Feed,
}

/// What the watch tells the readers.
#[derive(Clone)]
pub struct Feed {
    changes: broadcast::Sender<LockChange>,
    listed: watch::Sender<bool>,
    /// The replica's journal, which takes in each version first.
    journal: Journal,
}

/// The reading end: the cache and the changes.
#[derive(Clone)]
pub struct LockView {
    pub store: Store<DeploymentLock>,
    feed: Feed,
}

/// A cache and its change feed, for one leadership term; every version
/// seen also goes to the replica's `journal`.
pub fn lock_watch(journal: Journal) -> (LockWatch, LockView) {
    let (store, writer) = reflector::store();
    let (changes, _) = broadcast::channel(CHANGE_BUFFER);
    let (listed, _) = watch::channel(false);
    let feed = Feed {
        changes,
        listed,
        journal,
    };
    (
        LockWatch {
            writer,
            feed: feed.clone(),
        },
        LockView { store, feed },
    )
}

impl Feed {
    /// Tells the readers of `event`, once the cache (and the journal) took
    /// it in.
    pub fn publish(&self, event: &watcher::Event<DeploymentLock>) {
        if let watcher::Event::Apply(lock) | watcher::Event::InitApply(lock) = event {
            self.journal.record(lock);
        }
        let change = match event {
            watcher::Event::InitDone => {
                self.listed.send_replace(true);
                LockChange::Listed
            }
            watcher::Event::Apply(lock) | watcher::Event::Delete(lock) => {
                LockChange::Changed(LockKey {
                    namespace: lock.namespace().unwrap_or_default(),
                    name: lock.name_any(),
                    uid: lock.uid(),
                })
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => return,
        };
        // No reader (notifications not running yet) is not an error.
        let _ = self.changes.send(change);
    }
}

impl LockWatch {
    pub(super) fn into_parts(self) -> (Writer<DeploymentLock>, Feed) {
        (self.writer, self.feed)
    }
}

impl LockView {
    /// Changes from now on; subscribe before reading the cache, so that
    /// nothing falls between the read and the first change.
    pub fn subscribe(&self) -> broadcast::Receiver<LockChange> {
        self.feed.changes.subscribe()
    }

    /// The replica's journal of the history entries seen.
    pub fn journal(&self) -> &Journal {
        &self.feed.journal
    }

    /// Waits until the cache holds a complete list. (Not the store's own
    /// `wait_until_ready`: its one-shot channel keeps a single waker, and
    /// the reconciles' runner already waits on it, so a second waiter may
    /// never wake.)
    pub async fn listed(&self) {
        let mut listed = self.feed.listed.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = listed.wait_for(|listed| *listed).await;
    }
}
