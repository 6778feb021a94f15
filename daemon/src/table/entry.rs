//! One key's entry: its holders (one inline), and behind one optional box its queue, its
//! capacity and its lock-delay; `pump` grants from the queue.

use std::collections::VecDeque;

use lockd_protocol::{Mode, RequestId};

use super::{Granted, KeyRef, Outcome};

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
pub(super) enum Holders<H> {
    None,
    One(H),
    /// Two or more.
    Many(Vec<H>),
}

impl<H> Holders<H> {
    pub(super) fn as_slice(&self) -> &[H] {
        match self {
            Holders::None => &[],
            Holders::One(h) => std::slice::from_ref(h),
            Holders::Many(v) => v,
        }
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [H] {
        match self {
            Holders::None => &mut [],
            Holders::One(h) => std::slice::from_mut(h),
            Holders::Many(v) => v,
        }
    }

    pub(super) fn push(&mut self, h: H) {
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
    pub(super) fn swap_remove(&mut self, i: usize) -> Option<H> {
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
    pub(super) fn extract(&mut self, mut pick: impl FnMut(&H) -> bool) -> Vec<H> {
        if !self.as_slice().iter().any(&mut pick) {
            return Vec::new();
        }
        let (out, keep) = self.take().into_iter().partition(|h| pick(h));
        *self = Holders::from_vec(keep);
        out
    }

    /// Removes and returns every holder.
    pub(super) fn take(&mut self) -> Vec<H> {
        match std::mem::replace(self, Holders::None) {
            Holders::None => Vec::new(),
            Holders::One(h) => vec![h],
            Holders::Many(v) => v,
        }
    }

    pub(super) fn from_vec(mut v: Vec<H>) -> Holders<H> {
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
pub(super) struct Rare<O, P> {
    pub(super) queue: VecDeque<Waiter<O, P>>,
    pub(super) permits: Option<u32>,
    pub(super) delay: Option<Delay>,
}

impl<O, P> Rare<O, P> {
    pub(super) fn new(permits: Option<u32>) -> Box<Self> {
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
    pub(super) holders: Holders<Holder<O, P>>,
    /// The queue, the capacity and the lock-delay: `None` while the key has none of them.
    pub(super) rare: Option<Box<Rare<O, P>>>,
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
    pub(super) fn new(permits: Option<u32>) -> Self {
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

    pub(super) fn rare_mut(&mut self) -> &mut Rare<O, P> {
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

    pub(super) fn is_empty(&self) -> bool {
        self.holders().is_empty()
            && self
                .rare
                .as_ref()
                .is_none_or(|r| r.queue.is_empty() && r.delay.is_none())
    }

    /// Starts (or lengthens) a lock-delay of `ms` at `now`; returns it if it is new.
    pub(super) fn delay_for(&mut self, ms: u32, now: u64, seq: &mut u64) -> Option<Delay> {
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
    pub(super) fn after_unclean(
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
    pub(super) fn pump(&mut self, now: u64, next_fence: &mut impl FnMut() -> u64) -> Vec<Granted<O>>
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
    pub(super) fn heap_bytes(&self) -> usize {
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
