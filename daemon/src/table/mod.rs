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
use std::sync::Arc;

use foldhash::HashMap;

use lockd_protocol::{Key, Mode, RequestId};

#[cfg(test)]
mod model;

/// One holder of a key.
#[derive(Debug, Clone)]
pub struct Holder<O, P> {
    pub owner: O,
    /// The acquire request that was granted.
    pub request: RequestId,
    pub mode: Mode,
    /// Unique per grant; also the hold's identity inside the table.
    pub fence: u64,
    /// When it was granted, caller's milliseconds.
    pub granted_at: u64,
    /// Survives its owner's [`Table::remove_owner`] (a detached lease).
    pub detached: bool,
    /// Lock-delay, caller's milliseconds: if this hold ends uncleanly, the key grants nobody
    /// until the caller ends the delay ([`Table::end_delay`]).
    pub lock_delay: u64,
    pub payload: P,
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
    pub lock_delay: u64,
    pub payload: P,
}

/// Holders and waiters of one key. Exists while one of the two is non-empty or the key is in
/// lock-delay.
///
/// Invariant: for a lock (`permits == None`), `holders` is either empty, exactly one exclusive
/// hold, or only shared holds; for a counting semaphore, at most `permits` holders.
#[derive(Debug, Clone)]
pub struct Entry<O, P> {
    pub holders: Vec<Holder<O, P>>,
    pub queue: VecDeque<Waiter<O, P>>,
    /// The key's capacity when it is a counting semaphore (fixed by its first holder or
    /// waiter, for as long as the entry exists).
    pub permits: Option<u32>,
    /// The key is in lock-delay: nobody is granted until [`Table::end_delay`] with this.
    pub delay: Option<Delay>,
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
            // Most keys have one holder: room for exactly one (a plain `push` would reserve
            // four, ~300 bytes more per held key).
            holders: Vec::with_capacity(1),
            queue: VecDeque::new(),
            permits,
            delay: None,
        }
    }

    /// Could a request in `mode` be granted next to the current holders?
    pub(crate) fn compatible(&self, mode: Mode) -> bool {
        if self.delay.is_some() {
            return false;
        }
        if let Some(n) = self.permits {
            return self.holders.len() < n as usize;
        }
        match self.holders.first() {
            None => true,
            Some(h) => mode == Mode::Shared && h.mode == Mode::Shared,
        }
    }

    fn is_empty(&self) -> bool {
        self.holders.is_empty() && self.queue.is_empty() && self.delay.is_none()
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

/// Something removed from the table, with what was granted because of it.
pub type Removed<T, O> = (T, Vec<Granted<O>>);

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
#[derive(Debug)]
pub struct Table<O, P> {
    /// Keys are shared (`Arc`) with the connections that hold them, so a held key's strings
    /// exist once.
    entries: HashMap<Arc<Key>, Entry<O, P>>,
    /// The last lock-delay's [`Delay::seq`].
    delays: u64,
}

impl<O, P> Default for Table<O, P> {
    fn default() -> Self {
        Table {
            entries: HashMap::default(),
            delays: 0,
        }
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
    pub lock_delay: u64,
    pub payload: P,
}

impl<O: PartialEq + Clone, P> Table<O, P> {
    /// Number of keys with holders or waiters.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of a key, if it has holders or waiters.
    pub fn get(&self, key: &Key) -> Option<&Entry<O, P>> {
        self.entries.get(key)
    }

    /// Every key with holders or waiters, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Entry<O, P>)> {
        self.entries.iter().map(|(k, e)| (&**k, e))
    }

    /// The table's own copy of `key`, to share (present while the key has an entry).
    pub fn shared_key(&self, key: &Key) -> Option<Arc<Key>> {
        self.entries.get_key_value(key).map(|(k, _)| Arc::clone(k))
    }

    /// Grants, queues or refuses `want` on `key` at time `now`.
    ///
    /// `fence` is called once per grant and must return strictly increasing values.
    pub fn acquire(
        &mut self,
        key: &Key,
        want: Want<O, P>,
        now: u64,
        fence: &mut impl FnMut() -> u64,
    ) -> Acquired {
        let entry = match self.entries.get_mut(key) {
            Some(entry) => entry,
            None => self
                .entries
                .entry(Arc::new(key.clone()))
                .or_insert_with(|| Entry::new(want.permits)),
        };
        if entry.permits != want.permits {
            return Acquired::Capacity(entry.permits);
        }
        if entry.queue.is_empty() && entry.compatible(want.mode) {
            let f = fence();
            entry.holders.push(Holder {
                owner: want.owner,
                request: want.request,
                mode: want.mode,
                fence: f,
                granted_at: now,
                detached: want.detached,
                lock_delay: want.lock_delay,
                payload: want.payload,
            });
            return Acquired::Granted(f);
        }
        if !want.wait {
            // The entry existed (it conflicts), so there is nothing to clean up.
            return Acquired::Conflict;
        }
        entry.queue.push_back(Waiter {
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

    /// Ends the hold with `fence` on `key` (a clean release) and grants whoever may go next.
    ///
    /// Returns `None` if there is no such hold (nothing changes).
    pub fn release(
        &mut self,
        key: &Key,
        fence: u64,
        now: u64,
        next_fence: &mut impl FnMut() -> u64,
    ) -> Option<Removed<Holder<O, P>, O>> {
        self.end_hold(key, fence, false, now, next_fence)
    }

    /// As [`Table::release`]; `unclean` (an expiry) starts the hold's lock-delay, if it has
    /// one.
    pub fn end_hold(
        &mut self,
        key: &Key,
        fence: u64,
        unclean: bool,
        now: u64,
        next_fence: &mut impl FnMut() -> u64,
    ) -> Option<Removed<Holder<O, P>, O>> {
        let entry = self.entries.get_mut(key)?;
        let i = entry.holders.iter().position(|h| h.fence == fence)?;
        let holder = entry.holders.swap_remove(i);
        if unclean {
            self.delay(key, holder.lock_delay, now);
        }
        let granted = self.pump(key, now, next_fence);
        Some((holder, granted))
    }

    /// Starts (or lengthens) a lock-delay of `ms` on `key` at `now`.
    fn delay(&mut self, key: &Key, ms: u64, now: u64) {
        if ms == 0 {
            return;
        }
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        let until = now.saturating_add(ms);
        if entry.delay.is_some_and(|d| d.until >= until) {
            return;
        }
        self.delays += 1;
        entry.delay = Some(Delay {
            until,
            seq: self.delays,
        });
    }

    /// The lock-delay in force on `key`, if any.
    pub fn delay_of(&self, key: &Key) -> Option<Delay> {
        self.entries.get(key).and_then(|e| e.delay)
    }

    /// Ends the lock-delay `seq` on `key` (a later delay stays) and grants whoever may go next.
    pub fn end_delay(
        &mut self,
        key: &Key,
        seq: u64,
        now: u64,
        next_fence: &mut impl FnMut() -> u64,
    ) -> Vec<Granted<O>> {
        match self.entries.get_mut(key) {
            Some(entry) if entry.delay.is_some_and(|d| d.seq == seq) => entry.delay = None,
            _ => return Vec::new(),
        }
        self.pump(key, now, next_fence)
    }

    /// Withdraws the queued request `request` of `owner` on `key`.
    ///
    /// Returns `None` if it is not queued (already granted, or unknown): nothing changes.
    pub fn cancel(
        &mut self,
        key: &Key,
        owner: &O,
        request: RequestId,
        now: u64,
        next_fence: &mut impl FnMut() -> u64,
    ) -> Option<Removed<Waiter<O, P>, O>> {
        let entry = self.entries.get_mut(key)?;
        let i = entry
            .queue
            .iter()
            .position(|w| w.request == request && w.owner == *owner)?;
        let waiter = entry.queue.remove(i)?;
        let granted = self.pump(key, now, next_fence);
        Some((waiter, granted))
    }

    /// Removes every queued request and every hold that is not detached of `owner` on `key`
    /// (its connection closed).
    ///
    /// Returns the removed holds and what was granted as a result.
    pub fn remove_owner(
        &mut self,
        key: &Key,
        owner: &O,
        now: u64,
        next_fence: &mut impl FnMut() -> u64,
    ) -> (Vec<Holder<O, P>>, Vec<Granted<O>>) {
        let Some(entry) = self.entries.get_mut(key) else {
            return (Vec::new(), Vec::new());
        };
        entry.queue.retain(|w| w.owner != *owner);
        let mut removed: Vec<Holder<O, P>> = Vec::new();
        let mut i = 0;
        while i < entry.holders.len() {
            let h = &entry.holders[i];
            if h.owner == *owner && !h.detached {
                removed.push(entry.holders.swap_remove(i));
            } else {
                i += 1;
            }
        }
        let delay = removed.iter().map(|h| h.lock_delay).max().unwrap_or(0);
        self.delay(key, delay, now);
        let granted = self.pump(key, now, next_fence);
        (removed, granted)
    }

    /// Ends every hold on `key` (force-release) and grants whoever may go next.
    pub fn remove_holders(
        &mut self,
        key: &Key,
        now: u64,
        next_fence: &mut impl FnMut() -> u64,
    ) -> (Vec<Holder<O, P>>, Vec<Granted<O>>) {
        let Some(entry) = self.entries.get_mut(key) else {
            return (Vec::new(), Vec::new());
        };
        let removed = std::mem::take(&mut entry.holders);
        let delay = removed.iter().map(|h| h.lock_delay).max().unwrap_or(0);
        self.delay(key, delay, now);
        let granted = self.pump(key, now, next_fence);
        (removed, granted)
    }

    /// Every holder, mutably (for bookkeeping in the payload, such as long-hold warnings).
    pub fn holders_mut(&mut self) -> impl Iterator<Item = (&Key, &mut Holder<O, P>)> {
        self.entries
            .iter_mut()
            .flat_map(|(k, e)| e.holders.iter_mut().map(move |h| (&**k, h)))
    }

    /// Puts back a hold recovered from storage, with its original fence, if it is compatible
    /// with the holders already restored on `key` (queues are empty during recovery).
    ///
    /// Returns false, changing nothing, on a conflict.
    pub fn restore(&mut self, key: &Key, holder: Holder<O, P>, permits: Option<u32>) -> bool {
        let entry = match self.entries.get_mut(key) {
            Some(entry) => entry,
            None => self
                .entries
                .entry(Arc::new(key.clone()))
                .or_insert_with(|| Entry::new(permits)),
        };
        if entry.permits != permits || !entry.compatible(holder.mode) {
            return false;
        }
        entry.holders.push(holder);
        true
    }

    /// Grants from the head of `key`'s queue while the head is compatible, and drops the
    /// entry if it became empty.
    fn pump(
        &mut self,
        key: &Key,
        now: u64,
        next_fence: &mut impl FnMut() -> u64,
    ) -> Vec<Granted<O>> {
        let Some(entry) = self.entries.get_mut(key) else {
            return Vec::new();
        };
        let mut granted = Vec::new();
        while entry
            .queue
            .front()
            .is_some_and(|w| entry.compatible(w.mode))
        {
            let Some(w) = entry.queue.pop_front() else {
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
            entry.holders.push(Holder {
                owner: w.owner,
                request: w.request,
                mode: w.mode,
                fence,
                granted_at: now,
                detached: w.detached,
                lock_delay: w.lock_delay,
                payload: w.payload,
            });
        }
        if entry.is_empty() {
            self.entries.remove(key);
            shrink_if_sparse(&mut self.entries);
        }
        granted
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
