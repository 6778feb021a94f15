//! Looking at the table without changing it: describe, list (both cut to fit one frame),
//! totals for stats, the watchdog probe and the long-hold scan.

use std::sync::atomic::Ordering;

#[cfg(test)]
use lockd_protocol::Ticket;
use lockd_protocol::{
    Description, HolderInfo, Key, KeySummary, ListPage, ListQuery, Mode, WaiterInfo,
};

use lockd_protocol::RequestId;

use super::{lock, owner_info, Entry, LockSpace, Owner, Stored};
use crate::clock;
use crate::stats::ShardStats;
use crate::table::Holder;

/// A key's holder connection ids and queued (connection id, request), for tests.
#[cfg(test)]
pub type KeyQueue = (Key, Vec<u64>, Vec<(u64, u64)>);

/// Largest page [`LockSpace::list`] returns.
pub const MAX_LIST_PAGE: usize = 1000;

/// Bytes kept free in a frame for everything around a list page or a description (the response
/// header, the key, the counts).
const FRAME_MARGIN: usize = 400;

impl LockSpace {
    /// Whom the queued request `request` of connection `waiter` on `key` waits for: the
    /// holders, then the requests queued ahead of it from position `from` on (`None`: from the
    /// start, holders included), keeping those `pick` accepts (by connection id). Returns how
    /// far the queue is now expanded (the request's position + 1) with them, or `None` if it is
    /// no longer queued or the key is a counting semaphore (not searched for deadlocks).
    pub fn wait_targets(
        &self,
        key: &Key,
        waiter: u64,
        request: RequestId,
        from: Option<usize>,
        mut pick: impl FnMut(u64) -> bool,
    ) -> Option<(usize, Vec<Owner>)> {
        let k = self.hasher.hashed(key);
        let shard = self.shard(k.hash);
        let e = shard.table.get(k)?;
        if e.permits().is_some() {
            return None;
        }
        if from.is_some_and(|n| n >= e.queue_len()) {
            // The whole queue was expanded already: nothing new ahead of anyone.
            return Some((e.queue_len(), Vec::new()));
        }
        let queue = e.queue()?;
        // From the back: a new wait is the last one.
        let pos = queue
            .iter()
            .rposition(|w| w.request == request && w.owner.id == waiter)?;
        let start = from.unwrap_or(0);
        let holders = from
            .is_none()
            .then_some(e.holders().iter().map(|h| &h.owner));
        let ahead = queue.range(start..pos.max(start)).map(|w| &w.owner);
        let targets = holders
            .into_iter()
            .flatten()
            .chain(ahead)
            .filter(|o| pick(o.id))
            .cloned()
            .collect();
        // Up to and including the waiter itself: it is being expanded now.
        Some((pos + 1, targets))
    }

    /// Every key as (key, holder connection ids, queued (connection id, request) in order), for
    /// tests that compute wait-for cycles by brute force.
    #[cfg(test)]
    pub fn queues(&self) -> Vec<KeyQueue> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            for (key, e) in shard.table.iter() {
                let holders = e.holders().iter().map(|h| h.owner.id).collect();
                let queue = e.waiters().map(|w| (w.owner.id, w.request)).collect();
                all.push((key.to_key(), holders, queue));
            }
        }
        all
    }

    /// Bytes the shards' tables ask the allocator for (see `Table::heap_bytes`), for tests
    /// that pin the memory of a held lock.
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        self.shards.iter().map(|s| lock(s).table.heap_bytes()).sum()
    }

    /// The shard `key` lives in (tests pick keys in different shards).
    #[cfg(test)]
    pub fn shard_of(&self, key: &Key) -> usize {
        super::shard_index(self.hasher.hashed(key).hash)
    }
    /// Holders and waiters of `key` (empty lists if it has none), as many as fit in a frame of
    /// `max_frame` bytes: holders first, then waiters in queue order; the rest are counted in
    /// `omitted_holders` and `omitted_waiters`.
    pub fn describe(&self, key: &Key, max_frame: usize) -> Description {
        let mut budget = max_frame.saturating_sub(FRAME_MARGIN);
        let mut fits = |size: usize| {
            let ok = size <= budget;
            if ok {
                budget -= size;
            }
            ok
        };
        let k = self.hasher.hashed(key);
        let shard = self.shard(k.hash);
        let mut d = Description::empty(key.clone());
        let Some(e) = shard.table.get(k) else {
            return d;
        };
        d.permits = e.permits();
        // The delay's end in wall-clock time: the table keeps it in the caller's clock, which
        // is the wall clock (`clock::now_ms`).
        d.delayed_until_ms = e.delay().map(|delay| delay.until);
        for h in e.holders() {
            if d.omitted_holders == 0 && fits(holder_size(h)) {
                d.holders.push(holder_info(h));
            } else {
                d.omitted_holders += 1;
            }
        }
        for w in e.waiters() {
            if d.omitted_waiters == 0 && fits(OWNER_SIZE + w.owner.name.len() + 16) {
                d.waiters.push(WaiterInfo {
                    mode: w.mode,
                    owner: owner_info(&w.owner),
                    since_ms: w.since,
                });
            } else {
                d.omitted_waiters += 1;
            }
        }
        d
    }

    /// Every hold as (key, fence, ticket if leased, detached, owner id), for tests.
    #[cfg(test)]
    pub fn snapshot(&self) -> Vec<(Key, u64, Option<Ticket>, bool, u64)> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            for (key, e) in shard.table.iter() {
                for h in e.holders() {
                    all.push((
                        key.to_key(),
                        h.fence,
                        h.payload.ticket(),
                        h.detached,
                        h.owner.id,
                    ));
                }
            }
        }
        all
    }

    /// One page of keys matching `query` that `visible` allows, sorted by (namespace, name).
    ///
    /// Keeps only the `limit + 1` smallest candidates while scanning (a bounded max-heap), so a
    /// page costs one pass and `O(limit)` memory however many keys exist. The page is cut
    /// shorter when its keys would not fit in a frame of `max_frame` bytes (`next` says where
    /// to go on).
    pub fn list(
        &self,
        query: &ListQuery,
        visible: impl Fn(&str) -> bool,
        max_frame: usize,
    ) -> ListPage {
        use std::collections::BinaryHeap;
        let limit = (query.limit as usize).clamp(1, MAX_LIST_PAGE);
        let mut best: BinaryHeap<(Key, u32, u32, Option<Mode>)> =
            BinaryHeap::with_capacity(limit + 1);
        for shard in self.shards.iter() {
            let shard = lock(shard);
            for (key, entry) in shard.table.iter() {
                let wanted = query
                    .namespace
                    .as_ref()
                    .is_none_or(|ns| *ns == key.namespace)
                    && key.name.starts_with(&query.prefix)
                    && query
                        .after
                        .as_ref()
                        .is_none_or(|after| key.cmp_key(after).is_gt())
                    && visible(key.namespace);
                if !wanted {
                    continue;
                }
                if best.len() > limit {
                    match best.peek() {
                        Some(top) if key.cmp_key(&top.0).is_lt() => {
                            best.pop();
                        }
                        _ => continue,
                    }
                }
                let mode = entry.holders().first().map(|h| h.mode);
                best.push((
                    key.to_key(),
                    entry.holders().len() as u32,
                    entry.queue_len() as u32,
                    mode,
                ));
            }
        }
        let mut keys: Vec<KeySummary> = best
            .into_sorted_vec()
            .into_iter()
            .map(|(key, holders, waiters, mode)| KeySummary {
                key,
                holders,
                waiters,
                mode,
            })
            .collect();
        let mut budget = max_frame.saturating_sub(FRAME_MARGIN);
        let fitting = keys
            .iter()
            .take(limit)
            .take_while(|k| {
                let size = SUMMARY_SIZE + k.key.namespace.len() + k.key.name.len();
                let ok = size <= budget;
                budget = budget.saturating_sub(size);
                ok
            })
            .count()
            .max(1);
        let next = (keys.len() > fitting).then(|| keys[fitting - 1].key.clone());
        keys.truncate(fitting);
        ListPage { keys, next }
    }

    /// Sums the shards: (counters, holds, waiters, keys, long holds, wait histogram, hold
    /// histogram). `long_after_ms` is the long-hold threshold.
    pub fn totals(&self, long_after_ms: u64) -> Totals {
        let now = clock::now_ms();
        let mut t = Totals::default();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            t.stats.add(&shard.stats);
            t.watches += shard.watches.values().map(|w| w.len() as u64).sum::<u64>();
            for (_, e) in shard.table.iter() {
                t.keys += 1;
                t.holds += e.holders().len() as u64;
                t.waiters += e.queue_len() as u64;
                t.long_holds += e
                    .holders()
                    .iter()
                    .filter(|h| now.saturating_sub(h.granted_at) >= long_after_ms)
                    .count() as u64;
            }
        }
        t
    }

    /// Number of keys with holders, waiters or a lock-delay (one shard lock at a time, O(1)
    /// each).
    pub fn key_count(&self) -> usize {
        self.shards.iter().map(|s| lock(s).table.len()).sum()
    }

    /// Takes and releases every shard lock: returns only if no shard is stuck (watchdog).
    pub fn probe(&self) {
        for shard in self.shards.iter() {
            drop(lock(shard));
        }
    }

    /// Logs (once per hold) every hold older than `threshold_ms`; returns how many were new.
    pub fn warn_long_holds(&self, threshold_ms: u64) -> u64 {
        let now = clock::now_ms();
        let mut warned = 0;
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            let mut here = 0;
            for (key, holder) in shard.table.holders_mut() {
                let age = now.saturating_sub(holder.granted_at);
                if age >= threshold_ms && !holder.warned {
                    holder.warned = true;
                    here += 1;
                    tracing::warn!(
                        key = %key,
                        fence = holder.fence,
                        age_s = age / 1000,
                        "long hold by {}",
                        holder.owner.describe()
                    );
                }
            }
            shard.stats.long_holds_warned += here;
            warned += here;
        }
        warned
    }
}

/// Everything [`LockSpace::totals`] adds up.
#[derive(Default, Debug)]
pub struct Totals {
    pub stats: ShardStats,
    pub keys: u64,
    pub holds: u64,
    pub waiters: u64,
    pub long_holds: u64,
    pub watches: u64,
}

/// Upper bound of an encoded [`OwnerInfo`] without its name (varints at their widest, the
/// name's length prefix included), bytes.
const OWNER_SIZE: usize = 6 + 5 + 5 + 9;
/// Upper bound of an encoded [`KeySummary`] without its key's strings, bytes.
const SUMMARY_SIZE: usize = 9 + 9 + 5 + 5 + 2;

/// Upper bound of the encoded size of a holder's [`HolderInfo`], bytes.
fn holder_size(h: &Holder<Owner, Stored>) -> usize {
    OWNER_SIZE + h.owner.name.len() + 1 + 9 + 9 + 10 + 1 + 9 + h.payload.data().len()
}

fn holder_info(h: &Holder<Owner, Stored>) -> HolderInfo {
    HolderInfo {
        mode: h.mode,
        fence: h.fence,
        owner: owner_info(&h.owner),
        acquired_at_ms: h.granted_at,
        expires_at_ms: h.payload.expires_at_ms().map(|e| e.load(Ordering::Relaxed)),
        detached: h.detached,
        data: h.payload.data().to_vec(),
    }
}

/// Why a try was refused: who holds the key, or what else stands in the way.
pub(super) fn conflict_message(
    key: &Key,
    entry: Option<&Entry<Owner, Stored>>,
    mode: Mode,
) -> String {
    let Some(entry) = entry else {
        return format!("{key} is busy");
    };
    if let Some(d) = entry.delay() {
        let left = d.until.saturating_sub(clock::now_ms());
        return format!(
            "{key} is in lock-delay for {left} ms more (a holder ended without releasing it)"
        );
    }
    if let Some(n) = entry.permits() {
        return format!(
            "{key} has all {n} permits taken ({} holders, {} requests queued)",
            entry.holders().len(),
            entry.queue_len()
        );
    }
    match entry.holders() {
        [h] if h.mode == Mode::Exclusive => format!(
            "{key} is held exclusively by {} (fence {})",
            h.owner.describe(),
            h.fence
        ),
        [] => format!("{key} has {} requests queued", entry.queue_len()),
        holders if mode == Mode::Shared => format!(
            "{key} is held shared by {} holders, and {} requests are queued ahead (an exclusive one first)",
            holders.len(),
            entry.queue_len()
        ),
        holders => format!(
            "{key} is held shared by {} holders (first: {})",
            holders.len(),
            holders[0].owner.describe()
        ),
    }
}
