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

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};

use hashbrown::hash_table::Entry as Slot;
use hashbrown::HashTable;

use lockd_protocol::{Key, Mode, RequestId};

#[cfg(test)]
mod model;
mod node;

use node::Node;

/// One holder of a key. Kept small: a held key's block holds one inline.
#[derive(Debug, Clone)]
pub struct Holder<O, P> {
    pub owner: O,
    /// Unique per grant; also the hold's identity inside the table.
    pub fence: u64,
    /// When it was granted, caller's milliseconds.
    pub granted_at: u64,
    pub payload: P,
    /// Lock-delay, caller's milliseconds: if this hold ends uncleanly, the key grants nobody
    /// until the caller ends the delay ([`Table::end_delay`]).
    pub lock_delay: u32,
    pub mode: Mode,
    /// Survives its owner's [`Table::remove_owner`] (a detached lease).
    pub detached: bool,
    /// The caller's mark: a long-hold warning was logged for it.
    pub warned: bool,
}

/// One queued request for a key.
#[derive(Debug, Clone)]
pub struct Waiter<O, P> {
    pub owner: O,
    pub request: RequestId,
    pub mode: Mode,
    /// When it was queued, caller's milliseconds.
    pub since: u64,
    /// The hold, once granted, is detached from its owner.
    pub detached: bool,
    /// The hold's lock-delay once granted, caller's milliseconds.
    pub lock_delay: u32,
    pub payload: P,
}

/// The holders of one key: most keys have exactly one, kept inline (no allocation).
#[derive(Debug, Clone)]
enum Holders<H> {
    None,
    One(H),
    /// Two or more.
    Many(Vec<H>),
}

impl<H> Holders<H> {
    fn as_slice(&self) -> &[H] {
        match self {
            Holders::None => &[],
            Holders::One(h) => std::slice::from_ref(h),
            Holders::Many(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [H] {
        match self {
            Holders::None => &mut [],
            Holders::One(h) => std::slice::from_mut(h),
            Holders::Many(v) => v,
        }
    }

    fn push(&mut self, h: H) {
        match self {
            Holders::Many(v) => v.push(h),
            Holders::None => *self = Holders::One(h),
            Holders::One(_) => {
                if let Holders::One(first) = std::mem::replace(self, Holders::None) {
                    *self = Holders::Many(vec![first, h]);
                }
            }
        }
    }

    /// Removes and returns holder `i` (the last one takes its place).
    fn swap_remove(&mut self, i: usize) -> Option<H> {
        if i >= self.as_slice().len() {
            return None;
        }
        match self {
            Holders::Many(v) => {
                let h = v.swap_remove(i);
                if v.len() == 1 {
                    *self = Holders::from_vec(std::mem::take(v));
                }
                Some(h)
            }
            _ => match std::mem::replace(self, Holders::None) {
                Holders::One(h) => Some(h),
                _ => None,
            },
        }
    }

    /// Removes and returns the holders `pick` chooses.
    fn extract(&mut self, mut pick: impl FnMut(&H) -> bool) -> Vec<H> {
        if !self.as_slice().iter().any(&mut pick) {
            return Vec::new();
        }
        let (out, keep) = self.take().into_iter().partition(|h| pick(h));
        *self = Holders::from_vec(keep);
        out
    }

    /// Removes and returns every holder.
    fn take(&mut self) -> Vec<H> {
        match std::mem::replace(self, Holders::None) {
            Holders::None => Vec::new(),
            Holders::One(h) => vec![h],
            Holders::Many(v) => v,
        }
    }

    fn from_vec(mut v: Vec<H>) -> Holders<H> {
        if v.len() > 1 {
            Holders::Many(v)
        } else {
            v.pop().map_or(Holders::None, Holders::One)
        }
    }
}

/// What few keys need: a queue, a capacity, a lock-delay. Allocated on first need and kept
/// while the key has an entry.
#[derive(Debug, Clone)]
struct Rare<O, P> {
    queue: VecDeque<Waiter<O, P>>,
    permits: Option<u32>,
    delay: Option<Delay>,
}

impl<O, P> Rare<O, P> {
    fn new(permits: Option<u32>) -> Box<Self> {
        Box::new(Rare {
            queue: VecDeque::new(),
            permits,
            delay: None,
        })
    }
}

/// Holders and waiters of one key. Exists while one of the two is non-empty or the key is in
/// lock-delay.
///
/// Invariant: for a lock (no permits), the holders are either none, exactly one exclusive
/// hold, or only shared holds; for a counting semaphore, at most `permits` holders.
#[derive(Debug, Clone)]
pub struct Entry<O, P> {
    holders: Holders<Holder<O, P>>,
    /// The queue, the capacity and the lock-delay: `None` while the key has none of them.
    rare: Option<Box<Rare<O, P>>>,
}

/// A lock-delay in force on a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delay {
    /// When it ends, caller's milliseconds (for display; ending it is the caller's call).
    pub until: u64,
    /// Identifies this delay, so a late timer of an earlier one ends nothing.
    pub seq: u64,
}

impl<O, P> Entry<O, P> {
    fn new(permits: Option<u32>) -> Self {
        Entry {
            holders: Holders::None,
            rare: permits.map(|p| Rare::new(Some(p))),
        }
    }

    /// The holders, in no particular order.
    pub fn holders(&self) -> &[Holder<O, P>] {
        self.holders.as_slice()
    }

    /// The queued requests, first to be granted first.
    pub fn waiters(&self) -> impl DoubleEndedIterator<Item = &Waiter<O, P>> {
        self.rare.iter().flat_map(|r| r.queue.iter())
    }

    /// The queue, if the key ever had one while it had an entry.
    pub fn queue(&self) -> Option<&VecDeque<Waiter<O, P>>> {
        self.rare.as_ref().map(|r| &r.queue)
    }

    pub fn queue_len(&self) -> usize {
        self.rare.as_ref().map_or(0, |r| r.queue.len())
    }

    /// The key's capacity when it is a counting semaphore (fixed by its first holder or
    /// waiter, for as long as the entry exists).
    pub fn permits(&self) -> Option<u32> {
        self.rare.as_ref().and_then(|r| r.permits)
    }

    /// The lock-delay in force: nobody is granted until [`Table::end_delay`] with it.
    pub fn delay(&self) -> Option<Delay> {
        self.rare.as_ref().and_then(|r| r.delay)
    }

    fn rare_mut(&mut self) -> &mut Rare<O, P> {
        self.rare.get_or_insert_with(|| Rare::new(None))
    }

    /// Could a request in `mode` be granted next to the current holders?
    pub(crate) fn compatible(&self, mode: Mode) -> bool {
        if let Some(rare) = &self.rare {
            if rare.delay.is_some() {
                return false;
            }
            if let Some(n) = rare.permits {
                return self.holders().len() < n as usize;
            }
        }
        match self.holders().first() {
            None => true,
            Some(h) => mode == Mode::Shared && h.mode == Mode::Shared,
        }
    }

    /// Whether the hold `fence` is one of the holders.
    pub fn holds(&self, fence: u64) -> bool {
        self.holders().iter().any(|h| h.fence == fence)
    }

    fn is_empty(&self) -> bool {
        self.holders().is_empty()
            && self
                .rare
                .as_ref()
                .is_none_or(|r| r.queue.is_empty() && r.delay.is_none())
    }

    /// Starts (or lengthens) a lock-delay of `ms` at `now`; returns it if it is new.
    fn delay_for(&mut self, ms: u32, now: u64, seq: &mut u64) -> Option<Delay> {
        if ms == 0 {
            return None;
        }
        let until = now.saturating_add(u64::from(ms));
        if self.delay().is_some_and(|d| d.until >= until) {
            return None;
        }
        *seq += 1;
        let delay = Delay { until, seq: *seq };
        self.rare_mut().delay = Some(delay);
        Some(delay)
    }

    /// After `removed` ended uncleanly (their connection closed, or a force-release): starts
    /// the longest of their lock-delays on `key`, then grants whoever may go next.
    fn after_unclean(
        &mut self,
        key: KeyRef<'_>,
        removed: Vec<Holder<O, P>>,
        now: u64,
        delays: &mut u64,
        next_fence: &mut impl FnMut() -> u64,
    ) -> Outcome<Vec<Holder<O, P>>, O>
    where
        O: Clone,
    {
        let delay = removed.iter().map(|h| h.lock_delay).max().unwrap_or(0);
        let delayed = self
            .delay_for(delay, now, delays)
            .map(|d| (key.to_key(), d));
        let granted = self.pump(now, next_fence);
        Outcome {
            removed,
            granted,
            delayed,
        }
    }

    /// Grants from the head of the queue while the head is compatible.
    fn pump(&mut self, now: u64, next_fence: &mut impl FnMut() -> u64) -> Vec<Granted<O>>
    where
        O: Clone,
    {
        let mut granted = Vec::new();
        loop {
            let head = self.rare.as_ref().and_then(|r| r.queue.front());
            let Some(mode) = head.map(|w| w.mode) else {
                break;
            };
            if !self.compatible(mode) {
                break;
            }
            let Some(w) = self.rare.as_mut().and_then(|r| r.queue.pop_front()) else {
                break;
            };
            let fence = next_fence();
            granted.push(Granted {
                owner: w.owner.clone(),
                request: w.request,
                mode: w.mode,
                fence,
                since: w.since,
            });
            self.holders.push(Holder {
                owner: w.owner,
                fence,
                granted_at: now,
                payload: w.payload,
                lock_delay: w.lock_delay,
                mode: w.mode,
                detached: w.detached,
                warned: false,
            });
        }
        granted
    }
}

#[cfg(test)]
impl<O, P> Entry<O, P> {
    /// Bytes of the entry's own blocks (besides the key's block): the rare parts, and the
    /// holders of a key with several.
    fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        let many = match &self.holders {
            Holders::Many(v) => v.capacity() * size_of::<Holder<O, P>>(),
            _ => 0,
        };
        let rare = self.rare.as_ref().map_or(0, |r| {
            size_of::<Rare<O, P>>() + r.queue.capacity() * size_of::<Waiter<O, P>>()
        });
        many + rare
    }
}

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

/// Hashes keys. One per lock space, shared by its shards, so a key's hash picks its shard
/// and its bucket (and a connection can find its hold again by hash and fence alone).
#[derive(Debug, Clone, Default)]
pub struct KeyHasher(foldhash::fast::RandomState);

impl KeyHasher {
    /// `key` with its hash.
    pub fn hashed<'k>(&self, key: &'k Key) -> Hashed<'k> {
        Hashed {
            key,
            hash: self.hash(&key.namespace, &key.name),
        }
    }

    /// Where the hold `fence` on `key` is.
    pub fn hold(&self, key: &Key, fence: u64) -> HoldAt {
        HoldAt {
            hash: self.hash(&key.namespace, &key.name),
            fence,
        }
    }

    fn hash(&self, namespace: &str, name: &str) -> u64 {
        let mut h = self.0.build_hasher();
        h.write(namespace.as_bytes());
        h.write_u8(0xff);
        h.write(name.as_bytes());
        h.finish()
    }

    fn of_node<V>(&self, node: &Node<V>) -> u64 {
        let (namespace, name) = node.key();
        self.hash(namespace, name)
    }
}

/// A key and its hash (by the table's [`KeyHasher`]).
#[derive(Debug, Clone, Copy)]
pub struct Hashed<'k> {
    pub key: &'k Key,
    pub hash: u64,
}

/// A hold, found by its key's hash and its fence (fences are unique): what a connection keeps
/// to end its hold later, instead of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldAt {
    pub hash: u64,
    pub fence: u64,
}

/// How an operation finds its key's entry.
#[derive(Debug, Clone, Copy)]
pub enum At<'k> {
    /// The entry of this key.
    Key(Hashed<'k>),
    /// The entry with this hold: with the hash of the hold's own key (as its grant gave it),
    /// that is the hold's key, since fences are unique. (Any entry whose hash shares a few bits
    /// could match a fence it holds: this is not a way to ask "is this fence on that key".)
    Hold(HoldAt),
}

/// A key as the table stores it, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

impl KeyRef<'_> {
    pub fn to_key(self) -> Key {
        Key {
            namespace: self.namespace.to_owned(),
            name: self.name.to_owned(),
        }
    }

    /// Orders like [`Key`] (namespace, then name).
    pub fn cmp_key(self, key: &Key) -> std::cmp::Ordering {
        (self.namespace, self.name).cmp(&(key.namespace.as_str(), key.name.as_str()))
    }
}

impl std::fmt::Display for KeyRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn key_ref<V>(node: &Node<V>) -> KeyRef<'_> {
    let (namespace, name) = node.key();
    KeyRef { namespace, name }
}

fn is_key<V>(node: &Node<V>, key: &Key) -> bool {
    node.key() == (key.namespace.as_str(), key.name.as_str())
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
