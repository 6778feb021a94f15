//! The entries this daemon created in etcd, by etcd key, from before each is written until its
//! deletion is seen: the daemon-wide deletion watch looks up every deleted key here to tell
//! which hold (or running acquire) someone else ended. It also names the entries.
//!
//! **Names are reused.** An entry of session lease `L` on key `K` is `K/L.SLOT` with the
//! lowest slot of `K` not in use. etcd keeps every name ever deleted (a tombstone in its index)
//! until its history is compacted, and the range that reads a key's queue walks those too: with
//! a fresh name per acquire, a busy key's acquire grew slower with every lock/unlock pair
//! (0.4 ms per transaction on a fresh etcd, 1.1 ms after 6,000 pairs; etcd compacts nothing by
//! default). Reused names keep a key's tombstones to a few per daemon lease.
//!
//! Invariants:
//! - **a slot is reissued only after the deletion watch saw its entry deleted and the daemon
//!   is done with the entry** (no acquire is still running on it). Watch events come in
//!   revision order, so no event of an earlier entry arrives after its name is reissued.
//! - **every change names its entry** (`Token`, drawn at [`Index::begin`]): a late call about
//!   an earlier entry of a reused name changes nothing.
//! - a slot whose entry may outlive what this daemon knows (a write that may or may not have
//!   happened, an entry dropped by a resynchronisation) is never reissued under this session
//!   lease: it is burned, and every key's numbering starts above the highest burned slot.
//!   Detached leases take names that are never reused (`Naming::Once`), and so does an acquire
//!   begun under a session lease already replaced.
//! - a deletion seen before an entry's creation revision is known is its own only if not older
//!   than that revision (a watch resumed after a resync replays older ones).
//! - bookkeeping is bounded by what is live: a key's slots are dropped once none is out.
//! - deletions of entries with a known creation revision are guarded by it, and every entry
//!   is created only if its name is free (`batch.rs`): together with the above, a stale
//!   deletion never removes a newer entry and a new entry never overwrites an old one.

use std::collections::VecDeque;
use std::sync::{Mutex, Weak};
use std::time::Instant;

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use lockd_protocol::{Key, LostReason, Ticket};

use super::conn::ConnShared;
use super::slots::Slots;

/// A hold whose deletion by others must reach its connection.
#[derive(Clone)]
pub struct HeldRef {
    pub conn: Weak<ConnShared>,
    pub ticket: Ticket,
    pub key: Key,
    pub fence: u64,
}

/// One entry (one use of a name): what every change of the index names.
pub type Token = u64;

/// How an entry is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// A slot of the key, reused once its entry is gone (session holds and waiters).
    Reused,
    /// A name used once (a detached lease's entry lives on under another etcd lease).
    Once,
}

enum State {
    /// Being created or waiting in the queue; `deleted_at` the revision of a deletion seen,
    /// which the acquire checks before it reports a grant. One seen before the entry's own
    /// creation revision was known, and older than it, was an earlier entry's: cleared then.
    Pending { deleted_at: Option<i64> },
    /// Granted to a connection.
    Held(HeldRef),
    /// Being deleted by this daemon; `confirmed` once etcd answered the deletion.
    Releasing { confirmed: bool },
}

struct Tracked {
    token: Token,
    state: State,
    generation: u64,
    /// The entry's creation revision, once its write is answered.
    created: Option<i64>,
    /// The key's queue prefix and the slot, for a reused name.
    slot: Option<(Vec<u8>, u64)>,
}

/// See the module doc.
pub struct Index {
    entries: Mutex<Entries>,
}

struct Entries {
    map: HashMap<Vec<u8>, Tracked>,
    next_token: Token,
    slots: Slots,
    /// Entries of this daemon seen deleted, as (name, creation revision): kept a while so an
    /// acquire that read the queue before the deletion knows it is gone without asking etcd.
    gone: HashSet<(Vec<u8>, i64)>,
    gone_order: VecDeque<(Instant, Vec<u8>, i64)>,
}

/// How long a deleted entry stays known as deleted.
const KEEP_GONE: std::time::Duration = std::time::Duration::from_secs(2);

impl Default for Index {
    fn default() -> Index {
        Index {
            entries: Mutex::new(Entries {
                map: HashMap::new(),
                next_token: 1,
                slots: Slots::default(),
                gone: HashSet::new(),
                gone_order: VecDeque::new(),
            }),
        }
    }
}

impl Entries {
    /// Removes a finished entry: its deletion was seen, so its slot may be reused, unless its
    /// creation revision is unknown (a deletion of it, not guarded by one, may still come).
    fn settle(&mut self, name: &[u8]) -> Option<Tracked> {
        let t = self.map.remove(name)?;
        let now = Instant::now();
        if let Some(created) = t.created {
            self.gone.insert((name.to_vec(), created));
            self.gone_order.push_back((now, name.to_vec(), created));
        }
        while let Some((at, _, _)) = self.gone_order.front() {
            if now.duration_since(*at) < KEEP_GONE {
                break;
            }
            if let Some((_, k, c)) = self.gone_order.pop_front() {
                self.gone.remove(&(k, c));
            }
        }
        self.slots
            .end(t.generation, t.slot.clone(), t.created.is_some());
        Some(t)
    }

    /// Removes an entry whose fate this daemon may not know: its slot is never reused.
    fn abandon(&mut self, name: &[u8]) {
        if let Some(t) = self.map.remove(name) {
            self.slots.end(t.generation, t.slot, false);
        }
    }

    /// The tracked entry `token` of `name`.
    fn get_mut(&mut self, name: &[u8], token: Token) -> Option<&mut Tracked> {
        self.map.get_mut(name).filter(|t| t.token == token)
    }
}

/// The entry was deleted by someone else before it could be recorded as held.
#[derive(Debug)]
pub struct DeletedMeanwhile;

impl Index {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Names a new entry of the key with queue prefix `prefix` in session generation
    /// `generation` and tracks it as pending: `name(slot)` makes the name from a slot (for
    /// [`Naming::Reused`]) or from `once` (a number never used before).
    pub fn begin(
        &self,
        prefix: &[u8],
        generation: u64,
        naming: Naming,
        once: u64,
        name: impl Fn(Naming, u64) -> String,
    ) -> (Vec<u8>, Token) {
        let mut entries = self.lock();
        let token = entries.next_token;
        entries.next_token += 1;
        // A session already replaced (the acquire is refused right after): never touch the
        // current generation's slots.
        let naming = if generation < entries.slots.generation() {
            Naming::Once
        } else {
            naming
        };
        let (etcd_key, slot) = loop {
            if naming == Naming::Once {
                break (name(Naming::Once, once).into_bytes(), None);
            }
            let n = entries.slots.take(prefix, generation);
            let k = name(Naming::Reused, n).into_bytes();
            if !entries.map.contains_key(&k) {
                break (k, Some((prefix.to_vec(), n)));
            }
            // Cannot happen while the invariants hold; never share a name.
            let slot = Some((prefix.to_vec(), n));
            entries.slots.end(generation, slot, false);
        };
        let tracked = Tracked {
            token,
            state: State::Pending { deleted_at: None },
            generation,
            created: None,
            slot,
        };
        if let Some(old) = entries.map.insert(etcd_key.clone(), tracked) {
            // A name used once cannot be tracked already; if it were, never reuse either.
            entries.slots.end(old.generation, old.slot, false);
        }
        (etcd_key, token)
    }

    /// The entry's write was answered: it was created at `revision`.
    pub fn created(&self, name: &[u8], token: Token, revision: i64) {
        if let Some(t) = self.lock().get_mut(name, token) {
            t.created = Some(revision);
            if let State::Pending { deleted_at } = &mut t.state {
                if deleted_at.is_some_and(|d| d < revision) {
                    // An earlier entry's deletion, replayed (a watch resumed after a resync).
                    *deleted_at = None;
                }
            }
        }
    }

    /// The name was taken in etcd by an entry this daemon does not know (its write was not
    /// applied): stop tracking it and never reuse its slot.
    pub fn collided(&self, name: &[u8], token: Token) {
        let mut entries = self.lock();
        if entries.get_mut(name, token).is_some() {
            entries.abandon(name);
        }
    }

    /// The entry was granted: from now on its deletion by others is reported to `held`'s
    /// connection. Fails if a deletion was already seen.
    pub fn hold(&self, name: &[u8], token: Token, held: HeldRef) -> Result<(), DeletedMeanwhile> {
        let mut entries = self.lock();
        match entries.get_mut(name, token) {
            Some(t) if matches!(t.state, State::Pending { deleted_at: None }) => {
                t.state = State::Held(held);
                Ok(())
            }
            Some(t)
                if matches!(
                    t.state,
                    State::Pending {
                        deleted_at: Some(_)
                    }
                ) =>
            {
                entries.settle(name);
                Err(DeletedMeanwhile)
            }
            Some(_) => {
                entries.abandon(name);
                Err(DeletedMeanwhile)
            }
            None => Err(DeletedMeanwhile),
        }
    }

    /// This daemon is deleting the entry (or handing it to someone who will).
    pub fn releasing(&self, name: &[u8], token: Token) {
        let mut entries = self.lock();
        let Some(t) = entries.get_mut(name, token) else {
            return;
        };
        if matches!(
            t.state,
            State::Pending {
                deleted_at: Some(_)
            }
        ) {
            // Its deletion was seen already: the deletion this daemon owes is a no-op.
            entries.settle(name);
            return;
        }
        if !matches!(t.state, State::Releasing { .. }) {
            t.state = State::Releasing { confirmed: false };
        }
    }

    /// This daemon's own deletion of the entry created at `created`: `None` if it is not
    /// deleting it, else whether the deletion is done.
    pub fn own_deletion(&self, name: &[u8], created: i64) -> Option<bool> {
        let entries = self.lock();
        match entries.map.get(name) {
            Some(t) if t.created == Some(created) => match t.state {
                State::Releasing { confirmed } => Some(confirmed),
                _ => None,
            },
            _ => entries
                .gone
                .contains(&(name.to_vec(), created))
                .then_some(true),
        }
    }

    /// Whether an entry named `name` is tracked (whichever).
    pub fn tracks(&self, name: &[u8]) -> bool {
        self.lock().map.contains_key(name)
    }

    /// Whether this daemon knows the entry `name` created at `created`: tracked (from before
    /// its write until its deletion is seen), or recently seen deleted. An entry on this
    /// daemon's session lease that it does not know is an orphan (`orphans.rs`).
    pub fn knows(&self, name: &[u8], created: i64) -> bool {
        let entries = self.lock();
        entries.map.contains_key(name) || entries.gone.contains(&(name.to_vec(), created))
    }

    /// The deleter deleted these entries (etcd answered).
    pub fn deleted_by_us<'a>(&self, done: impl Iterator<Item = (&'a [u8], Token)>) {
        let mut entries = self.lock();
        for (name, token) in done {
            let Some(t) = entries.get_mut(name, token) else {
                continue;
            };
            if let State::Releasing { confirmed } = &mut t.state {
                *confirmed = true;
                if t.created.is_none() {
                    // Its write may never have happened, and then no deletion event comes:
                    // done with it (its slot is burned, so a late event meets no new entry).
                    entries.abandon(name);
                }
            }
        }
    }

    /// Stops tracking an entry whose fate this daemon no longer follows (moved to a detached
    /// lease's own etcd lease, or its session lease is gone).
    pub fn forget(&self, name: &[u8], token: Token) {
        let mut entries = self.lock();
        if entries.get_mut(name, token).is_some() {
            entries.abandon(name);
        }
    }

    /// The deletion watch saw `name` deleted at `revision`: the hold it ended, if it was held.
    pub fn deleted(&self, name: &[u8], revision: i64) -> Option<HeldRef> {
        let mut entries = self.lock();
        let t = entries.map.get_mut(name)?;
        if t.created.is_some_and(|c| revision < c) {
            // The deletion of an earlier entry of this name (not seen before: a resync).
            return None;
        }
        match &t.state {
            State::Pending { .. } => {
                t.state = State::Pending {
                    deleted_at: Some(revision),
                };
                None
            }
            State::Releasing { .. } => {
                entries.settle(name);
                None
            }
            State::Held(_) => match entries.settle(name) {
                Some(Tracked {
                    state: State::Held(r),
                    ..
                }) => Some(r),
                _ => None,
            },
        }
    }

    /// The entries whose deletion by others matters, for a resynchronisation after the watch
    /// missed events: the held ones, and pending ones already written (which may be granted
    /// from a read made before the deletion).
    pub fn live(&self) -> Vec<Vec<u8>> {
        self.lock()
            .map
            .iter()
            .filter(|(_, t)| match &t.state {
                State::Held(_) => true,
                State::Pending { deleted_at } => deleted_at.is_none() && t.created.is_some(),
                State::Releasing { .. } => false,
            })
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Drops entries being released (after a resynchronisation: their events may be lost),
    /// never to reuse their names.
    pub fn drop_releasing(&self) {
        let mut entries = self.lock();
        let releasing: Vec<Vec<u8>> = entries
            .map
            .iter()
            .filter(|(_, t)| matches!(t.state, State::Releasing { .. }))
            .map(|(k, _)| k.clone())
            .collect();
        for k in releasing {
            entries.abandon(&k);
        }
        entries.gone.clear();
        entries.gone_order.clear();
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
            entries.slots.lose(generation);
            lost
        };
        let n = lost.len();
        for r in lost {
            report(r, LostReason::Expired);
        }
        n
    }

    /// Keys with slot bookkeeping (for tests: a key nobody uses has none).
    #[cfg(test)]
    fn keys_with_slots(&self) -> usize {
        self.lock().slots.keys()
    }
}

/// Tells a hold's connection it ended (if the connection still has it).
pub fn report(r: HeldRef, reason: LostReason) {
    if let Some(conn) = r.conn.upgrade() {
        conn.lost(&r.ticket, r.key, r.fence, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(naming: Naming, n: u64) -> String {
        match naming {
            Naming::Reused => format!("k/a/1.{n:x}"),
            Naming::Once => format!("k/a/1-{n:x}"),
        }
    }

    fn begin(ix: &Index) -> (Vec<u8>, Token) {
        ix.begin(b"k/a/", 1, Naming::Reused, 0, name)
    }

    fn held() -> HeldRef {
        HeldRef {
            conn: Weak::new(),
            ticket: Ticket::from_bytes([7; 16]),
            key: Key::new("ns", "a").unwrap(),
            fence: 5,
        }
    }

    #[test]
    fn a_name_is_reused_only_after_its_deletion_was_seen_and_confirmed_or_not() {
        let ix = Index::default();
        let (a, ta) = begin(&ix);
        assert_eq!(a, b"k/a/1.0");
        ix.created(&a, ta, 5);
        ix.hold(&a, ta, held()).unwrap();
        // Held, then released: the name stays taken until the watch sees the deletion.
        ix.releasing(&a, ta);
        let (b, tb) = begin(&ix);
        assert_eq!(b, b"k/a/1.1");
        ix.deleted_by_us([(a.as_slice(), ta)].into_iter());
        assert_eq!(ix.own_deletion(&a, 5), Some(true));
        assert_eq!(begin(&ix).0, b"k/a/1.2");
        assert!(ix.deleted(&a, 6).is_none());
        // Seen: reused, and its deletion is still known by its creation revision.
        let (c, tc) = begin(&ix);
        assert_eq!(c, b"k/a/1.0");
        assert_eq!(ix.own_deletion(&a, 5), Some(true));
        // A late change about the earlier entry does nothing to the new one.
        ix.releasing(&a, ta);
        ix.created(&c, tc, 9);
        ix.hold(&c, tc, held()).unwrap();
        // The deletion event of the earlier entry (revision 6 < 9) is not this entry's.
        assert!(ix.deleted(&c, 6).is_none());
        assert!(
            ix.deleted(&c, 10).is_some(),
            "a later deletion ends the hold"
        );
        ix.forget(&b, tb);
    }

    #[test]
    fn a_slot_whose_entry_may_live_on_is_never_reused() {
        let ix = Index::default();
        let (a, ta) = begin(&ix);
        // The write's answer was lost: the entry may exist.
        ix.forget(&a, ta);
        let (b, tb) = begin(&ix);
        assert_eq!(b, b"k/a/1.1");
        ix.created(&b, tb, 3);
        ix.releasing(&b, tb);
        ix.deleted(&b, 4);
        // Slot 1 is free again, slot 0 never is, even once the key's bookkeeping is gone.
        assert_eq!(ix.keys_with_slots(), 0);
        assert_eq!(begin(&ix).0, b"k/a/1.1");
        // A new session lease starts over (its names are new).
        let (c, _) = ix.begin(b"k/a/", 2, Naming::Reused, 0, name);
        assert_eq!(c, b"k/a/1.0");
    }

    #[test]
    fn a_deletion_seen_before_the_entrys_revision_is_known_counts_only_if_not_older() {
        let ix = Index::default();
        // A replayed deletion of an earlier entry of the name (revision 5 < 7).
        let (a, ta) = begin(&ix);
        ix.deleted(&a, 5);
        ix.created(&a, ta, 7);
        ix.hold(&a, ta, held()).expect("not this entry's deletion");
        // This entry's own deletion (9 >= 7), seen before its write was answered.
        let (b, tb) = begin(&ix);
        ix.deleted(&b, 9);
        ix.created(&b, tb, 7);
        assert!(ix.hold(&b, tb, held()).is_err());
    }

    #[test]
    fn a_write_without_answer_never_lends_its_name_again() {
        let ix = Index::default();
        // Given up, deletion confirmed, never seen (the write never happened): done with,
        // not kept forever.
        let (a, ta) = begin(&ix);
        ix.releasing(&a, ta);
        ix.deleted_by_us([(a.as_slice(), ta)].into_iter());
        assert_eq!(ix.keys_with_slots(), 0);
        assert!(!ix.knows(&a, 0));
        // Given up, and a deletion seen (the write did happen): settled, name burned too.
        let (b, tb) = begin(&ix);
        assert_eq!(b, b"k/a/1.1");
        ix.releasing(&b, tb);
        ix.deleted(&b, 3);
        assert_eq!(ix.keys_with_slots(), 0);
        assert_eq!(
            begin(&ix).0,
            b"k/a/1.2",
            "slots 0 and 1 are never handed out again"
        );
    }

    #[test]
    fn an_older_generation_never_touches_the_current_slots() {
        let ix = Index::default();
        let (a, _) = ix.begin(b"k/a/", 2, Naming::Reused, 0, name);
        assert_eq!(a, b"k/a/1.0");
        let (stale, _) = ix.begin(b"k/a/", 1, Naming::Reused, 9, name);
        assert_eq!(stale, b"k/a/1-9", "a stale session gets a name used once");
        assert_eq!(ix.begin(b"k/a/", 2, Naming::Reused, 0, name).0, b"k/a/1.1");
    }

    #[test]
    fn a_key_nobody_uses_keeps_no_bookkeeping() {
        let ix = Index::default();
        let (a, ta) = begin(&ix);
        let (b, tb) = begin(&ix);
        for (k, t, rev) in [(&a, ta, 2), (&b, tb, 3)] {
            ix.created(k, t, rev);
            ix.releasing(k, t);
            ix.deleted(k, rev + 10);
        }
        assert_eq!(ix.keys_with_slots(), 0);
        // A pending entry deleted by someone else is settled when its acquire gives up.
        let (c, tc) = begin(&ix);
        assert_eq!(c, b"k/a/1.0");
        ix.created(&c, tc, 20);
        ix.deleted(&c, 21);
        assert!(ix.hold(&c, tc, held()).is_err());
        assert_eq!(ix.keys_with_slots(), 0);
        // Names used once never touch the slots.
        let (d, _) = ix.begin(b"k/a/", 1, Naming::Once, 42, name);
        assert_eq!(d, b"k/a/1-2a");
        assert_eq!(ix.keys_with_slots(), 0);
    }
}
