//! The lock table: who holds each key and who waits for it, in FIFO order.
//!
//! Architecture invariant: this module is pure. It knows no sockets, no redb and no clock:
//! times come in as arguments (milliseconds, caller's epoch), fences come from a caller-supplied
//! source, and the table answers with what happened so the caller can notify connections.
//!
//! Queue rules (the contract's "Waiting" section):
//! - a try (`wait = false`) is granted only if it is compatible with the holders *and* nobody is
//!   queued, so it never jumps the queue;
//! - a queued request is granted only when everything queued before it has been granted or has
//!   left; consecutive shared requests at the head are granted together; a queued exclusive
//!   request holds back every request behind it.

use hashbrown::hash_table::Entry as Slot;
use hashbrown::HashTable;

use lockd_protocol::{Key, Mode, RequestId};

mod entry;
mod keys;
#[cfg(test)]
mod model;
mod node;

pub use entry::{Delay, Entry, Holder, Waiter};
use keys::{is_key, key_ref};
pub use keys::{At, Hashed, HoldAt, KeyHasher, KeyRef};
use node::Node;

/// A request granted from the queue, to be announced to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted<O> {
    pub owner: O,
    pub request: RequestId,
    pub mode: Mode,
    pub fence: u64,
    /// When the request was queued, caller's milliseconds.
    pub since: u64,
}

/// What an operation that ended holds or waits did.
#[derive(Debug)]
pub struct Outcome<T, O> {
    /// What it removed.
    pub removed: T,
    /// What was granted from the queue as a result, in queue order.
    pub granted: Vec<Granted<O>>,
    /// A lock-delay that began on the key (with the key, for the caller's timer).
    pub delayed: Option<(Key, Delay)>,
}

impl<T: Default, O> Default for Outcome<T, O> {
    fn default() -> Self {
        Outcome {
            removed: T::default(),
            granted: Vec::new(),
            delayed: None,
        }
    }
}

/// What an acquire did.
#[derive(Debug, PartialEq, Eq)]
pub enum Acquired {
    /// Granted at once with this fence.
    Granted(u64),
    /// Queued; a later [`Granted`] announces the grant.
    Queued,
    /// Not granted and not queued (`wait = false`).
    Conflict,
    /// Refused: the key's capacity is this (`None`: a plain lock), not the request's.
    Capacity(Option<u32>),
}

/// The holders and queues of many keys.
///
/// Each key with an entry is one heap block (its [`Entry`] and then its bytes, see `node`);
/// the hash table holds thin pointers to them.
#[derive(Debug)]
pub struct Table<O, P> {
    nodes: HashTable<Node<Entry<O, P>>>,
    hasher: KeyHasher,
    /// The last lock-delay's [`Delay::seq`].
    delays: u64,
}

impl<O, P> Default for Table<O, P> {
    fn default() -> Self {
        Table::with_hasher(KeyHasher::default())
    }
}

/// An acquire as the table sees it.
#[derive(Debug, Clone)]
pub struct Want<O, P> {
    pub owner: O,
    pub request: RequestId,
    pub mode: Mode,
    /// Queue on conflict instead of answering [`Acquired::Conflict`].
    pub wait: bool,
    /// The hold, once granted, survives [`Table::remove_owner`] of its owner.
    pub detached: bool,
    /// A counting semaphore with this many slots (`None`: a lock).
    pub permits: Option<u32>,
    /// Lock-delay of the hold, caller's milliseconds (0: none).
    pub lock_delay: u32,
    pub payload: P,
}

impl<O, P> Table<O, P> {
    /// An empty table hashing keys with `hasher`.
    pub fn with_hasher(hasher: KeyHasher) -> Self {
        Table {
            nodes: HashTable::new(),
            hasher,
            delays: 0,
        }
    }

    /// The hasher of this table's keys.
    pub fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    /// Number of keys with holders or waiters.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn find(&self, at: At<'_>) -> Option<&Node<Entry<O, P>>> {
        match at {
            At::Key(k) => self.nodes.find(k.hash, |n| is_key(n, k.key)),
            At::Hold(h) => self.nodes.find(h.hash, |n| n.value().holds(h.fence)),
        }
    }

    /// The entry of a key, if it has holders or waiters.
    pub fn get(&self, key: Hashed<'_>) -> Option<&Entry<O, P>> {
        self.find(At::Key(key)).map(Node::value)
    }

    /// The key of the entry `at` finds.
    pub fn key_at(&self, at: At<'_>) -> Option<Key> {
        self.find(at).map(|n| key_ref(n).to_key())
    }

    /// Every key with holders or waiters, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (KeyRef<'_>, &Entry<O, P>)> {
        self.nodes.iter().map(|n| (key_ref(n), n.value()))
    }

    /// Every holder, mutably (for bookkeeping such as long-hold warnings).
    pub fn holders_mut(&mut self) -> impl Iterator<Item = (KeyRef<'_>, &mut Holder<O, P>)> {
        self.nodes.iter_mut().flat_map(|n| {
            let ((namespace, name), entry) = n.split_mut();
            let key = KeyRef { namespace, name };
            entry
                .holders
                .as_mut_slice()
                .iter_mut()
                .map(move |h| (key, h))
        })
    }

    /// The entry of `key`, made if missing (with `permits`).
    fn entry_or_new(&mut self, key: Hashed<'_>, permits: Option<u32>) -> &mut Entry<O, P> {
        let hasher = &self.hasher;
        let slot = self
            .nodes
            .entry(key.hash, |n| is_key(n, key.key), |n| hasher.of_node(n));
        let node = match slot {
            Slot::Occupied(o) => o.into_mut(),
            Slot::Vacant(v) => v
                .insert(Node::new(
                    Entry::new(permits),
                    &key.key.namespace,
                    &key.key.name,
                ))
                .into_mut(),
        };
        node.value_mut()
    }

    /// Runs `f` on the entry `at` finds (if any), then drops the entry if it became empty,
    /// giving memory back once the table is mostly empty. `f` gets the key (for a delay) and
    /// the delay counter.
    fn change<R>(
        &mut self,
        at: At<'_>,
        f: impl FnOnce(KeyRef<'_>, &mut Entry<O, P>, &mut u64) -> R,
    ) -> Option<R> {
        let found = match at {
            At::Key(k) => self.nodes.find_entry(k.hash, |n| is_key(n, k.key)),
            At::Hold(h) => self.nodes.find_entry(h.hash, |n| n.value().holds(h.fence)),
        };
        let mut found = found.ok()?;
        let (key, entry) = found.get_mut().split_mut();
        let r = f(
            KeyRef {
                namespace: key.0,
                name: key.1,
            },
            entry,
            &mut self.delays,
        );
        if entry.is_empty() {
            found.remove();
            self.shrink_if_sparse();
        }
        Some(r)
    }

    /// Gives memory back once the table that grew large is mostly empty: shrinks to twice
    /// its length when under a quarter full. Amortized O(1) per removal.
    fn shrink_if_sparse(&mut self) {
        const SMALL: usize = 1024;
        if self.nodes.capacity() > SMALL && self.nodes.len() * 4 < self.nodes.capacity() {
            let hasher = &self.hasher;
            self.nodes
                .shrink_to((self.nodes.len() * 2).max(SMALL), |n| hasher.of_node(n));
        }
    }
}

#[cfg(test)]
impl<O, P> Table<O, P> {
    /// Bytes this table asks the allocator for (its bucket array, each key's block and the
    /// entries' own blocks; the payloads' blocks and the allocator's overhead aside).
    pub fn heap_bytes(&self) -> usize {
        let nodes: usize = self
            .nodes
            .iter()
            .map(|n| n.block_size() + n.value().heap_bytes())
            .sum();
        self.nodes.allocation_size() + nodes
    }
}

impl<O: PartialEq + Clone, P> Table<O, P> {
    /// Grants, queues or refuses `want` on `key` at time `now`.
    ///
    /// `fence` is called once per grant and must return strictly increasing values.
    pub fn acquire(
        &mut self,
        key: Hashed<'_>,
        want: Want<O, P>,
        now: u64,
        fence: &mut impl FnMut() -> u64,
    ) -> Acquired {
        let entry = self.entry_or_new(key, want.permits);
        if entry.permits() != want.permits {
            return Acquired::Capacity(entry.permits());
        }
        if entry.queue_len() == 0 && entry.compatible(want.mode) {
            let f = fence();
            entry.holders.push(Holder {
                owner: want.owner,
                fence: f,
                granted_at: now,
                payload: want.payload,
                lock_delay: want.lock_delay,
                mode: want.mode,
                detached: want.detached,
                warned: false,
            });
            return Acquired::Granted(f);
        }
        if !want.wait {
            // The entry existed (it conflicts), so there is nothing to clean up.
            return Acquired::Conflict;
        }
        entry.rare_mut().queue.push_back(Waiter {
            owner: want.owner,
            request: want.request,
            mode: want.mode,
            since: now,
            detached: want.detached,
            lock_delay: want.lock_delay,
            payload: want.payload,
        });
        Acquired::Queued
    }

    /// Ends the hold `fence` on the key `at` finds (a clean release) and grants whoever may
    /// go next.
    ///
    /// Returns `None` if there is no such hold (nothing changes).
    pub fn release(
        &mut self,
        at: At<'_>,
        fence: u64,
        now: u64,
        next_fence: &mut impl FnMut() -> u64,
    ) -> Option<Outcome<Holder<O, P>, O>> {
        self.end_hold(at, fence, false, now, next_fence)
    }

    /// As [`Table::release`]; `unclean` (an expiry) starts the hold's lock-delay, if it has
    /// one.
    pub fn end_hold(
        &mut self,
        at: At<'_>,
        fence: u64,
        unclean: bool,
        now: u64,
        next_fence: &mut impl FnMut() -> u64,
    ) -> Option<Outcome<Holder<O, P>, O>> {
        self.change(at, |key, entry, delays| {
            let i = entry.holders().iter().position(|h| h.fence == fence)?;
            let holder = entry.holders.swap_remove(i)?;
            let delayed = if unclean {
                entry
                    .delay_for(holder.lock_delay, now, delays)
                    .map(|d| (key.to_key(), d))
            } else {
                None
            };
            let granted = entry.pump(now, next_fence);
            Some(Outcome {
                removed: holder,
                granted,
                delayed,
            })
        })
        .flatten()
    }

    /// Ends the lock-delay `seq` on `key` (a later delay stays) and grants whoever may go next.
    pub fn end_delay(
        &mut self,
        key: Hashed<'_>,
        seq: u64,
        now: u64,
        next_fence: &mut impl FnMut() -> u64,
    ) -> Vec<Granted<O>> {
        self.change(At::Key(key), |_, entry, _| {
            match entry.rare.as_mut() {
                Some(r) if r.delay.is_some_and(|d| d.seq == seq) => r.delay = None,
                _ => return Vec::new(),
            }
            entry.pump(now, next_fence)
        })
        .unwrap_or_default()
    }

    /// Withdraws the queued request `request` of `owner` on `key`.
    ///
    /// Returns `None` if it is not queued (already granted, or unknown): nothing changes.
    pub fn cancel(
        &mut self,
        key: Hashed<'_>,
        owner: &O,
        request: RequestId,
        now: u64,
        next_fence: &mut impl FnMut() -> u64,
    ) -> Option<Outcome<Waiter<O, P>, O>> {
        self.change(At::Key(key), |_, entry, _| {
            let queue = &mut entry.rare.as_mut()?.queue;
            let i = queue
                .iter()
                .position(|w| w.request == request && w.owner == *owner)?;
            let waiter = queue.remove(i)?;
            let granted = entry.pump(now, next_fence);
            Some(Outcome {
                removed: waiter,
                granted,
                delayed: None,
            })
        })
        .flatten()
    }

    /// Removes every queued request and every hold that is not detached of `owner` on the key
    /// `at` finds (its connection closed).
    ///
    /// Returns the removed holds and what was granted as a result.
    pub fn remove_owner(
        &mut self,
        at: At<'_>,
        owner: &O,
        now: u64,
        next_fence: &mut impl FnMut() -> u64,
    ) -> Outcome<Vec<Holder<O, P>>, O> {
        self.change(at, |key, entry, delays| {
            if let Some(rare) = entry.rare.as_mut() {
                rare.queue.retain(|w| w.owner != *owner);
            }
            let removed = entry.holders.extract(|h| h.owner == *owner && !h.detached);
            entry.after_unclean(key, removed, now, delays, next_fence)
        })
        .unwrap_or_default()
    }

    /// Ends every hold on `key` (force-release) and grants whoever may go next.
    pub fn remove_holders(
        &mut self,
        key: Hashed<'_>,
        now: u64,
        next_fence: &mut impl FnMut() -> u64,
    ) -> Outcome<Vec<Holder<O, P>>, O> {
        self.change(At::Key(key), |key, entry, delays| {
            let removed = entry.holders.take();
            entry.after_unclean(key, removed, now, delays, next_fence)
        })
        .unwrap_or_default()
    }

    /// Puts back a hold recovered from storage, with its original fence, if it is compatible
    /// with the holders already restored on `key` (queues are empty during recovery).
    ///
    /// Returns false, changing nothing, on a conflict.
    pub fn restore(&mut self, key: Hashed<'_>, holder: Holder<O, P>, permits: Option<u32>) -> bool {
        let entry = self.entry_or_new(key, permits);
        if entry.permits() != permits || !entry.compatible(holder.mode) {
            return false;
        }
        entry.holders.push(holder);
        true
    }
}

/// Gives memory back once a map that grew large is mostly empty (after many holds ended):
/// shrinks to twice its length when under a quarter full. Amortized O(1) per removal.
pub fn shrink_if_sparse<K: std::hash::Hash + Eq, V, S: std::hash::BuildHasher>(
    map: &mut std::collections::HashMap<K, V, S>,
) {
    const SMALL: usize = 1024;
    if map.capacity() > SMALL && map.len() * 4 < map.capacity() {
        map.shrink_to((map.len() * 2).max(SMALL));
    }
}

#[cfg(test)]
mod tests;
