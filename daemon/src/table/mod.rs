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
            holders: Vec::new(),
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
    entries: HashMap<Key, Entry<O, P>>,
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
        self.entries.iter()
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
                .entry(key.clone())
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
            .flat_map(|(k, e)| e.holders.iter_mut().map(move |h| (k, h)))
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
                .entry(key.clone())
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
        }
        granted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type T = Table<u32, ()>;

    fn key(n: &str) -> Key {
        Key::new("default", n).unwrap()
    }

    struct Fences(u64);
    impl Fences {
        fn f(&mut self) -> impl FnMut() -> u64 + '_ {
            move || {
                self.0 += 1;
                self.0
            }
        }
    }

    fn want(owner: u32, request: u64, mode: Mode, wait: bool) -> Want<u32, ()> {
        Want {
            owner,
            request,
            mode,
            wait,
            detached: false,
            permits: None,
            lock_delay: 0,
            payload: (),
        }
    }

    #[test]
    fn exclusive_excludes_and_try_conflicts() {
        let (mut t, mut f, k) = (T::default(), Fences(0), key("a"));
        assert_eq!(
            t.acquire(&k, want(1, 1, Mode::Exclusive, false), 0, &mut f.f()),
            Acquired::Granted(1)
        );
        assert_eq!(
            t.acquire(&k, want(2, 1, Mode::Exclusive, false), 0, &mut f.f()),
            Acquired::Conflict
        );
        assert_eq!(
            t.acquire(&k, want(2, 2, Mode::Shared, false), 0, &mut f.f()),
            Acquired::Conflict
        );
        let (h, granted) = t.release(&k, 1, 0, &mut f.f()).unwrap();
        assert_eq!(h.owner, 1);
        assert!(granted.is_empty());
        assert!(t.is_empty(), "empty keys disappear");
    }

    #[test]
    fn shared_holders_coexist_and_writer_blocks_later_readers() {
        let (mut t, mut f, k) = (T::default(), Fences(0), key("a"));
        assert_eq!(
            t.acquire(&k, want(1, 1, Mode::Shared, false), 0, &mut f.f()),
            Acquired::Granted(1)
        );
        assert_eq!(
            t.acquire(&k, want(2, 1, Mode::Shared, false), 0, &mut f.f()),
            Acquired::Granted(2)
        );
        assert_eq!(
            t.acquire(&k, want(3, 1, Mode::Exclusive, true), 0, &mut f.f()),
            Acquired::Queued
        );
        // A shared request behind a queued writer waits, and a shared try conflicts.
        assert_eq!(
            t.acquire(&k, want(4, 1, Mode::Shared, true), 0, &mut f.f()),
            Acquired::Queued
        );
        assert_eq!(
            t.acquire(&k, want(5, 1, Mode::Shared, false), 0, &mut f.f()),
            Acquired::Conflict
        );
        assert!(t.release(&k, 1, 0, &mut f.f()).unwrap().1.is_empty());
        let granted = t.release(&k, 2, 0, &mut f.f()).unwrap().1;
        assert_eq!(granted.len(), 1);
        assert_eq!((granted[0].owner, granted[0].mode), (3, Mode::Exclusive));
        let granted = t.release(&k, granted[0].fence, 0, &mut f.f()).unwrap().1;
        assert_eq!(granted.iter().map(|g| g.owner).collect::<Vec<_>>(), vec![4]);
    }

    #[test]
    fn consecutive_shared_heads_are_granted_together() {
        let (mut t, mut f, k) = (T::default(), Fences(0), key("a"));
        t.acquire(&k, want(1, 1, Mode::Exclusive, false), 0, &mut f.f());
        for o in 2..5 {
            assert_eq!(
                t.acquire(&k, want(o, 1, Mode::Shared, true), 0, &mut f.f()),
                Acquired::Queued
            );
        }
        t.acquire(&k, want(5, 1, Mode::Exclusive, true), 0, &mut f.f());
        t.acquire(&k, want(6, 1, Mode::Shared, true), 0, &mut f.f());
        let granted = t.release(&k, 1, 0, &mut f.f()).unwrap().1;
        assert_eq!(
            granted.iter().map(|g| g.owner).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        let fences: Vec<u64> = granted.iter().map(|g| g.fence).collect();
        assert!(fences.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn cancel_of_blocking_writer_lets_readers_through() {
        let (mut t, mut f, k) = (T::default(), Fences(0), key("a"));
        t.acquire(&k, want(1, 1, Mode::Shared, false), 0, &mut f.f());
        t.acquire(&k, want(2, 7, Mode::Exclusive, true), 0, &mut f.f());
        t.acquire(&k, want(3, 1, Mode::Shared, true), 0, &mut f.f());
        assert!(
            t.cancel(&k, &2, 8, 0, &mut f.f()).is_none(),
            "wrong request id"
        );
        assert!(t.cancel(&k, &3, 7, 0, &mut f.f()).is_none(), "wrong owner");
        let (w, granted) = t.cancel(&k, &2, 7, 0, &mut f.f()).unwrap();
        assert_eq!(w.owner, 2);
        assert_eq!(granted.iter().map(|g| g.owner).collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn remove_owner_drops_holds_and_waits_then_grants_next() {
        let (mut t, mut f, k) = (T::default(), Fences(0), key("a"));
        t.acquire(&k, want(1, 1, Mode::Exclusive, false), 0, &mut f.f());
        t.acquire(&k, want(1, 2, Mode::Exclusive, true), 0, &mut f.f());
        t.acquire(&k, want(2, 1, Mode::Exclusive, true), 0, &mut f.f());
        let (removed, granted) = t.remove_owner(&k, &1, 0, &mut f.f());
        assert_eq!(removed.len(), 1);
        assert_eq!(granted.len(), 1);
        assert_eq!(granted[0].owner, 2);
        assert_eq!(t.get(&k).unwrap().queue.len(), 0);
    }

    #[test]
    fn release_of_unknown_fence_changes_nothing() {
        let (mut t, mut f, k) = (T::default(), Fences(0), key("a"));
        t.acquire(&k, want(1, 1, Mode::Exclusive, false), 0, &mut f.f());
        assert!(t.release(&k, 99, 0, &mut f.f()).is_none());
        assert!(t.release(&key("b"), 1, 0, &mut f.f()).is_none());
        assert_eq!(t.get(&k).unwrap().holders.len(), 1);
    }
}
