//! The entries this daemon created in etcd, by etcd key, from before each is written until its
//! deletion is seen: the daemon-wide deletion watch looks up every deleted key here to tell
//! which hold (or running acquire) someone else ended.

use std::sync::{Mutex, Weak};

use foldhash::{HashMap, HashMapExt};
use lockd_protocol::{Key, LostReason, Ticket};

use super::conn::ConnShared;

/// A hold whose deletion by others must reach its connection.
#[derive(Clone)]
pub struct HeldRef {
    pub conn: Weak<ConnShared>,
    pub ticket: Ticket,
    pub key: Key,
    pub fence: u64,
}

enum State {
    /// Being created or waiting in the queue; `deleted` once a deletion was seen, which the
    /// acquire checks before it reports a grant.
    Pending { deleted: bool },
    /// Granted to a connection.
    Held(HeldRef),
    /// Being deleted by this daemon: its deletion event means nothing.
    Releasing,
    /// Deleted by this daemon (confirmed by etcd, or its deletion seen): kept a while so an
    /// acquire that read the queue before the deletion knows it is gone without asking etcd.
    Deleted,
}

struct Tracked {
    state: State,
    generation: u64,
}

/// See the module doc.
pub struct Index {
    entries: Mutex<Entries>,
}

struct Entries {
    map: HashMap<Vec<u8>, Tracked>,
    /// Keys in `State::Deleted`, oldest first, with when they got there.
    deleted: std::collections::VecDeque<(std::time::Instant, Vec<u8>)>,
}

/// How long a deleted entry stays known as deleted.
const KEEP_DELETED: std::time::Duration = std::time::Duration::from_secs(10);

impl Default for Index {
    fn default() -> Index {
        Index {
            entries: Mutex::new(Entries {
                map: HashMap::new(),
                deleted: std::collections::VecDeque::new(),
            }),
        }
    }
}

impl Entries {
    /// Marks `key` deleted by this daemon (if tracked), and forgets old deleted keys.
    fn mark_deleted(&mut self, key: &[u8]) {
        let now = std::time::Instant::now();
        if let Some(t) = self.map.get_mut(key) {
            if !matches!(t.state, State::Deleted) {
                t.state = State::Deleted;
                self.deleted.push_back((now, key.to_vec()));
            }
        }
        while let Some((at, _)) = self.deleted.front() {
            if now.duration_since(*at) < KEEP_DELETED {
                break;
            }
            if let Some((_, k)) = self.deleted.pop_front() {
                if self
                    .map
                    .get(&k)
                    .is_some_and(|t| matches!(t.state, State::Deleted))
                {
                    self.map.remove(&k);
                }
            }
        }
    }
}

/// The entry was deleted by someone else before it could be recorded as held.
#[derive(Debug)]
pub struct DeletedMeanwhile;

impl Index {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An entry is about to be written in session generation `generation`.
    pub fn begin(&self, etcd_key: &[u8], generation: u64) {
        self.lock().map.insert(
            etcd_key.to_vec(),
            Tracked {
                state: State::Pending { deleted: false },
                generation,
            },
        );
    }

    /// The entry was granted: from now on its deletion by others is reported to `held`'s
    /// connection. Fails if a deletion was already seen.
    pub fn hold(&self, etcd_key: &[u8], held: HeldRef) -> Result<(), DeletedMeanwhile> {
        let mut entries = self.lock();
        match entries.map.get_mut(etcd_key) {
            Some(t) if matches!(t.state, State::Pending { deleted: false }) => {
                t.state = State::Held(held);
                Ok(())
            }
            _ => {
                entries.map.remove(etcd_key);
                Err(DeletedMeanwhile)
            }
        }
    }

    /// This daemon is deleting the entry (or handing it to someone who will).
    pub fn releasing(&self, etcd_key: &[u8]) {
        if let Some(t) = self.lock().map.get_mut(etcd_key) {
            t.state = State::Releasing;
        }
    }

    /// This daemon's own deletion of the entry: `None` if it is not deleting it, else whether
    /// the deletion is done.
    pub fn own_deletion(&self, etcd_key: &[u8]) -> Option<bool> {
        match self.lock().map.get(etcd_key).map(|t| &t.state) {
            Some(State::Releasing) => Some(false),
            Some(State::Deleted) => Some(true),
            _ => None,
        }
    }

    /// The deleter deleted these entries.
    pub fn deleted_by_us<'a>(&self, keys: impl Iterator<Item = &'a [u8]>) {
        let mut entries = self.lock();
        for k in keys {
            entries.mark_deleted(k);
        }
    }

    /// Stops tracking an entry (moved to a detached lease's own etcd lease).
    pub fn forget(&self, etcd_key: &[u8]) {
        self.lock().map.remove(etcd_key);
    }

    /// The deletion watch saw `etcd_key` deleted: the hold it ended, if it was held.
    pub fn deleted(&self, etcd_key: &[u8]) -> Option<HeldRef> {
        let mut entries = self.lock();
        let t = entries.map.get_mut(etcd_key)?;
        match &t.state {
            State::Pending { .. } => {
                t.state = State::Pending { deleted: true };
                None
            }
            State::Releasing | State::Deleted => {
                entries.mark_deleted(etcd_key);
                None
            }
            State::Held(_) => match entries.map.remove(etcd_key) {
                Some(Tracked {
                    state: State::Held(r),
                    ..
                }) => Some(r),
                _ => None,
            },
        }
    }

    /// The held entries, for a resynchronisation after the watch missed events.
    pub fn held(&self) -> Vec<(Vec<u8>, HeldRef)> {
        self.lock()
            .map
            .iter()
            .filter_map(|(k, t)| match &t.state {
                State::Held(r) => Some((k.clone(), r.clone())),
                _ => None,
            })
            .collect()
    }

    /// Drops entries being released (after a resynchronisation: their events may be lost).
    pub fn drop_releasing(&self) {
        let mut entries = self.lock();
        entries
            .map
            .retain(|_, t| !matches!(t.state, State::Releasing | State::Deleted));
        entries.deleted.clear();
    }

    /// The session lease of `generation` is lost: every entry on it is gone. Reports each hold
    /// to its connection; pending acquires see it through the session watch. Returns how
    /// many holds were lost.
    pub fn lose_generation(&self, generation: u64) -> usize {
        let lost: Vec<HeldRef> = {
            let mut entries = self.lock();
            let mut lost = Vec::new();
            entries.map.retain(|_, t| {
                if t.generation != generation {
                    return true;
                }
                if let State::Held(r) = &t.state {
                    lost.push(r.clone());
                }
                false
            });
            lost
        };
        let n = lost.len();
        for r in lost {
            report(r, LostReason::Expired);
        }
        n
    }
}

/// Tells a hold's connection it ended (if the connection still has it).
pub fn report(r: HeldRef, reason: LostReason) {
    if let Some(conn) = r.conn.upgrade() {
        conn.lost(&r.ticket, r.key, r.fence, reason);
    }
}
