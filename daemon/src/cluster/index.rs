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
}

struct Tracked {
    state: State,
    generation: u64,
}

/// See the module doc.
pub struct Index {
    entries: Mutex<HashMap<Vec<u8>, Tracked>>,
}

impl Default for Index {
    fn default() -> Index {
        Index {
            entries: Mutex::new(HashMap::new()),
        }
    }
}

/// The entry was deleted by someone else before it could be recorded as held.
#[derive(Debug)]
pub struct DeletedMeanwhile;

impl Index {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Tracked>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An entry is about to be written in session generation `generation`.
    pub fn begin(&self, etcd_key: &[u8], generation: u64) {
        self.lock().insert(
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
        match entries.get_mut(etcd_key) {
            Some(t) if matches!(t.state, State::Pending { deleted: false }) => {
                t.state = State::Held(held);
                Ok(())
            }
            _ => {
                entries.remove(etcd_key);
                Err(DeletedMeanwhile)
            }
        }
    }

    /// This daemon is deleting the entry (or handing it to someone who will).
    pub fn releasing(&self, etcd_key: &[u8]) {
        if let Some(t) = self.lock().get_mut(etcd_key) {
            t.state = State::Releasing;
        }
    }

    /// Stops tracking an entry (moved to a detached lease's own etcd lease).
    pub fn forget(&self, etcd_key: &[u8]) {
        self.lock().remove(etcd_key);
    }

    /// The deletion watch saw `etcd_key` deleted: the hold it ended, if it was held.
    pub fn deleted(&self, etcd_key: &[u8]) -> Option<HeldRef> {
        let mut entries = self.lock();
        let t = entries.get_mut(etcd_key)?;
        match &t.state {
            State::Pending { .. } => {
                t.state = State::Pending { deleted: true };
                None
            }
            State::Releasing => {
                entries.remove(etcd_key);
                None
            }
            State::Held(_) => match entries.remove(etcd_key) {
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
            .iter()
            .filter_map(|(k, t)| match &t.state {
                State::Held(r) => Some((k.clone(), r.clone())),
                _ => None,
            })
            .collect()
    }

    /// Drops entries being released (after a resynchronisation: their events may be lost).
    pub fn drop_releasing(&self) {
        self.lock()
            .retain(|_, t| !matches!(t.state, State::Releasing));
    }

    /// The session lease of `generation` is lost: every entry on it is gone. Reports each hold
    /// to its connection; pending acquires see it through the session watch. Returns how
    /// many holds were lost.
    pub fn lose_generation(&self, generation: u64) -> usize {
        let lost: Vec<HeldRef> = {
            let mut entries = self.lock();
            let mut lost = Vec::new();
            entries.retain(|_, t| {
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
