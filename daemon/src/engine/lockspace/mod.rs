//! The daemon's lock table: [`Table`] split into shards, each behind its own short-held mutex,
//! plus the fence source, delivery of grants to waiting connections, watch events and the
//! per-shard statistics.
//!
//! Architecture invariants:
//! - a shard mutex is held only for a table operation, never across `.await` or I/O;
//! - at most one shard mutex is held at a time (no lock ordering to get wrong);
//! - grants and watch events made on behalf of other connections are pushed to their tasks
//!   before the shard is unlocked (a non-blocking send), so events of a key arrive in order;
//! - counters live inside the shards and are updated under the shard lock the operation takes
//!   anyway: statistics add no shared atomic to the hot path.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use foldhash::HashMap;
use lockd_protocol::{Change, Key, LostReason, Mode, OwnerInfo, RequestId, Ticket};
use tokio::sync::mpsc;

use crate::clock;
use crate::fence::Fences;
use crate::peer::{Owner, Push};
use crate::stats::ShardStats;
use crate::table::{Acquired, At, Delay, Entry, Holder, KeyHasher, Table, Want};

mod shard;
mod stored;
mod view;

use shard::{notify, Shard};
pub use stored::{HoldMeta, Stored};

use view::conflict_message;

pub use crate::table::HoldAt;
pub use view::{Totals, MAX_LIST_PAGE};

/// Number of shards; a power of two well above the core count so connections rarely meet.
pub const SHARDS: usize = 64;

/// Longest lock-delay the table keeps, milliseconds (about 49 days): acquires asking for more
/// are refused, and a longer one recovered from storage is cut to it.
pub const MAX_LOCK_DELAY_MS: u64 = u32::MAX as u64;

/// A lock-delay in the table's width (see [`MAX_LOCK_DELAY_MS`]).
fn delay_ms(ms: u64) -> u32 {
    u32::try_from(ms).unwrap_or(u32::MAX)
}

/// Why a hold ended, for watchers and statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Released,
    Expired,
}

/// How an acquire wants its hold.
#[derive(Debug, Clone, Copy)]
pub struct How {
    pub mode: Mode,
    /// Queue on conflict.
    pub wait: bool,
    /// The hold survives its connection.
    pub detached: bool,
    /// A counting semaphore of this many slots.
    pub permits: Option<u32>,
    /// Lock-delay after an unclean end, milliseconds.
    pub lock_delay_ms: u64,
}

/// Outcome of [`LockSpace::acquire`].
#[derive(Debug)]
pub enum AcquireOutcome {
    /// Granted: where the hold is (its fence, and its key's hash).
    Granted(HoldAt),
    Queued,
    /// The key's capacity differs from the request's (`None`: a plain lock).
    Capacity(Option<u32>),
    /// Not granted; the message says who holds the key or how many wait ahead.
    Conflict(String),
}

/// Pushes made by one table operation, delivered when it is dropped: declared after the
/// shard guard, it delivers while the shard is still locked, so every connection receives the
/// events of a key in table order (an unbounded send never blocks).
#[derive(Default)]
struct Outbox(Vec<(Owner, Push)>);

impl Drop for Outbox {
    fn drop(&mut self) {
        for (owner, push) in self.0.drain(..) {
            owner.push(push);
        }
    }
}

pub struct LockSpace {
    shards: Box<[Mutex<Shard>]>,
    hasher: KeyHasher,
    fences: Arc<Fences>,
    /// Lock-delays that began, for the delay task to end: (key, delay seq, length).
    delays: mpsc::UnboundedSender<(Key, u64, Duration)>,
}

/// The lock-delay task's inbox (see [`LockSpace::new`]).
pub type DelayInbox = mpsc::UnboundedReceiver<(Key, u64, Duration)>;

impl LockSpace {
    /// A lock space handing out `fences`; the returned inbox receives every lock-delay that
    /// begins, to be ended with [`LockSpace::end_delay`] when it has run.
    pub fn new(fences: Arc<Fences>) -> (LockSpace, DelayInbox) {
        let (delays, inbox) = mpsc::unbounded_channel();
        let hasher = KeyHasher::default();
        let shard = || Shard {
            table: Table::with_hasher(hasher.clone()),
            watches: HashMap::default(),
            stats: ShardStats::default(),
        };
        let space = LockSpace {
            shards: (0..SHARDS).map(|_| Mutex::new(shard())).collect(),
            hasher,
            fences,
            delays,
        };
        (space, inbox)
    }

    /// Sends a lock-delay that began during this operation to the delay task.
    fn arm_delay(&self, delayed: Option<(Key, Delay)>, now: u64) {
        if let Some((key, d)) = delayed {
            let length = Duration::from_millis(d.until.saturating_sub(now));
            let _ = self.delays.send((key, d.seq, length));
        }
    }

    /// Ends lock-delay `seq` of `key` (if still in force): waiters are granted.
    pub fn end_delay(&self, key: &Key, seq: u64) {
        let k = self.hasher.hashed(key);
        let mut guard = self.shard(k.hash);
        let mut out = Outbox::default();
        let shard = &mut *guard;
        let now = clock::now_ms();
        let granted = shard
            .table
            .end_delay(k, seq, now, &mut || self.fences.next());
        shard.granted(Some(key), granted, now, &mut out);
    }

    pub fn fences(&self) -> &Arc<Fences> {
        &self.fences
    }

    /// The shard of the key with this hash (bits the shard's own table does not use to
    /// pick a bucket).
    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        lock(&self.shards[shard_index(hash)])
    }

    fn shard_of_key(&self, key: &Key) -> MutexGuard<'_, Shard> {
        self.shard(self.hasher.hashed(key).hash)
    }

    /// Where the hold `fence` on `key` is (for [`LockSpace::release_at`]).
    pub fn hold_at(&self, key: &Key, fence: u64) -> HoldAt {
        self.hasher.hold(key, fence)
    }

    /// Grants, queues or refuses request `request` of `owner` on `key`.
    pub fn acquire(
        &self,
        key: &Key,
        owner: &Owner,
        request: RequestId,
        how: How,
        meta: HoldMeta,
    ) -> AcquireOutcome {
        let mode = how.mode;
        let want = Want {
            owner: owner.clone(),
            request,
            mode,
            wait: how.wait,
            detached: how.detached,
            permits: how.permits,
            lock_delay: delay_ms(how.lock_delay_ms),
            payload: Stored::new(meta, request),
        };
        let k = self.hasher.hashed(key);
        let outcome = {
            let mut guard = self.shard(k.hash);
            // Declared after the guard, so it is dropped (and delivers) before the unlock:
            // watchers see events in table order.
            let mut out = Outbox::default();
            let shard = &mut *guard;
            let now = clock::now_ms();
            match shard
                .table
                .acquire(k, want, now, &mut || self.fences.next())
            {
                Acquired::Granted(fence) => {
                    shard.stats.grants += 1;
                    if let Some(watchers) = shard.watchers(key) {
                        let change = Change::Granted {
                            fence,
                            mode,
                            owner: owner_info(owner),
                        };
                        notify(&mut out, watchers, key, change);
                    }
                    AcquireOutcome::Granted(HoldAt {
                        hash: k.hash,
                        fence,
                    })
                }
                Acquired::Queued => AcquireOutcome::Queued,
                Acquired::Capacity(permits) => AcquireOutcome::Capacity(permits),
                Acquired::Conflict => {
                    shard.stats.conflicts += 1;
                    AcquireOutcome::Conflict(conflict_message(key, shard.table.get(k), mode))
                }
            }
        };
        outcome
    }

    /// Ends the hold `fence` on `key`; returns false if there is none.
    pub fn release(&self, key: &Key, fence: u64, why: Ended) -> bool {
        self.end_hold(At::Key(self.hasher.hashed(key)), fence, Some(key), why)
    }

    /// Ends the hold `at` (a connection's own hold, as its grant gave it: found without its
    /// key); returns false if there is none.
    pub fn release_at(&self, at: HoldAt, why: Ended) -> bool {
        self.end_hold(At::Hold(at), at.fence, None, why)
    }

    fn end_hold(&self, at: At<'_>, fence: u64, key: Option<&Key>, why: Ended) -> bool {
        let released = {
            let mut guard = self.shard(hash_of(at));
            // Declared after the guard, so it is dropped (and delivers) before the unlock:
            // watchers see events in table order.
            let mut out = Outbox::default();
            let shard = &mut *guard;
            let now = clock::now_ms();
            let unclean = why == Ended::Expired;
            let watched = shard.watched_key(key, at);
            match shard
                .table
                .end_hold(at, fence, unclean, now, &mut || self.fences.next())
            {
                Some(ended) => {
                    self.arm_delay(ended.delayed, now);
                    let change = match why {
                        Ended::Released => {
                            shard.stats.releases += 1;
                            Change::Released { fence }
                        }
                        Ended::Expired => {
                            shard.stats.expiries += 1;
                            Change::Expired { fence }
                        }
                    };
                    shard
                        .stats
                        .hold_ms
                        .observe(now.saturating_sub(ended.removed.granted_at));
                    let watched = watched.as_deref();
                    shard.ended(watched, change, &mut out);
                    shard.granted(watched, ended.granted, now, &mut out);
                    true
                }
                None => false,
            }
        };
        released
    }

    /// Withdraws a queued acquire; returns false if it is no longer queued.
    pub fn cancel(&self, key: &Key, owner: &Owner, request: RequestId) -> bool {
        let cancelled = {
            let k = self.hasher.hashed(key);
            let mut guard = self.shard(k.hash);
            // Declared after the guard, so it is dropped (and delivers) before the unlock:
            // watchers see events in table order.
            let mut out = Outbox::default();
            let shard = &mut *guard;
            let now = clock::now_ms();
            match shard
                .table
                .cancel(k, owner, request, now, &mut || self.fences.next())
            {
                Some(cancelled) => {
                    shard.granted(Some(key), cancelled.granted, now, &mut out);
                    true
                }
                None => false,
            }
        };
        cancelled
    }

    /// Removes every waiter and session hold of `owner` on `key` (its connection closed);
    /// returns how many holds ended.
    pub fn remove_owner(&self, key: &Key, owner: &Owner) -> usize {
        self.remove_owner_in(At::Key(self.hasher.hashed(key)), Some(key), owner)
    }

    /// As [`LockSpace::remove_owner`], on the key of the hold `at` (if it is still there).
    pub fn remove_owner_at(&self, at: HoldAt, owner: &Owner) -> usize {
        self.remove_owner_in(At::Hold(at), None, owner)
    }

    fn remove_owner_in(&self, at: At<'_>, key: Option<&Key>, owner: &Owner) -> usize {
        let ended = {
            let mut guard = self.shard(hash_of(at));
            // Declared after the guard, so it is dropped (and delivers) before the unlock:
            // watchers see events in table order.
            let mut out = Outbox::default();
            let shard = &mut *guard;
            let now = clock::now_ms();
            let watched = shard.watched_key(key, at);
            let watched = watched.as_deref();
            let removed = shard
                .table
                .remove_owner(at, owner, now, &mut || self.fences.next());
            self.arm_delay(removed.delayed, now);
            for holder in &removed.removed {
                shard.stats.disconnect_releases += 1;
                shard
                    .stats
                    .hold_ms
                    .observe(now.saturating_sub(holder.granted_at));
                let change = Change::Disconnected {
                    fence: holder.fence,
                };
                shard.ended(watched, change, &mut out);
            }
            shard.granted(watched, removed.granted, now, &mut out);
            removed.removed.len()
        };
        ended
    }

    /// Ends a detached hold granted to `owner`'s `request` that the owner never learned of
    /// (its connection closed first). Returns 1 if there was one.
    pub fn abandon_detached(&self, key: &Key, owner: &Owner, request: RequestId) -> usize {
        let fence = self.inspect(key, |e| {
            e?.holders()
                .iter()
                .find(|h| h.detached && h.payload.request() == Some(request) && h.owner == *owner)
                .map(|h| h.fence)
        });
        match fence {
            Some(fence) => usize::from(self.release(key, fence, Ended::Released)),
            None => 0,
        }
    }

    /// Ends every hold on `key` (administrators only; the caller checked). Holders are told
    /// `HoldLost(ForceReleased)`. Returns how many holds ended and the tickets of those with
    /// a lease, so their leases can be ended too.
    pub fn force_release(&self, key: &Key) -> (usize, Vec<Ticket>) {
        let forced = {
            let k = self.hasher.hashed(key);
            let mut guard = self.shard(k.hash);
            // Declared after the guard, so it is dropped (and delivers) before the unlock:
            // watchers see events in table order.
            let mut out = Outbox::default();
            let shard = &mut *guard;
            let now = clock::now_ms();
            let removed = shard
                .table
                .remove_holders(k, now, &mut || self.fences.next());
            self.arm_delay(removed.delayed, now);
            let holds = removed.removed.len();
            let mut tickets = Vec::new();
            for holder in removed.removed {
                shard.stats.forced += 1;
                shard
                    .stats
                    .hold_ms
                    .observe(now.saturating_sub(holder.granted_at));
                shard.ended(
                    Some(key),
                    Change::Forced {
                        fence: holder.fence,
                    },
                    &mut out,
                );
                out.0.push((
                    holder.owner.clone(),
                    Push::Lost {
                        key: key.clone(),
                        fence: holder.fence,
                        reason: LostReason::ForceReleased,
                    },
                ));
                tickets.extend(holder.payload.ticket());
            }
            shard.granted(Some(key), removed.granted, now, &mut out);
            (holds, tickets)
        };
        forced
    }

    /// Puts back a detached lease recovered from storage; false (nothing changes) if it
    /// conflicts with holds already restored.
    pub fn restore(
        &self,
        key: &Key,
        owner: Owner,
        how: How,
        fence: u64,
        granted_at: u64,
        meta: HoldMeta,
    ) -> bool {
        let holder = Holder {
            owner,
            fence,
            granted_at,
            lock_delay: delay_ms(how.lock_delay_ms),
            mode: how.mode,
            detached: true,
            warned: meta.warned,
            payload: Stored::new(meta, 0),
        };
        let k = self.hasher.hashed(key);
        self.shard(k.hash).table.restore(k, holder, how.permits)
    }

    /// Whether the hold `fence` on `key` is in the table.
    pub fn holds(&self, key: &Key, fence: u64) -> bool {
        self.inspect(key, |e| e.is_some_and(|e| e.holds(fence)))
    }

    /// Runs `f` while the shard of `key` is locked, if the hold `fence` is in the table;
    /// returns whether it was. A message `f` pushes is ordered with every event of the key
    /// (a later force-release's `HoldLost` comes after it, an earlier one makes this false).
    pub fn with_hold(&self, key: &Key, fence: u64, f: impl FnOnce()) -> bool {
        let k = self.hasher.hashed(key);
        let shard = self.shard(k.hash);
        let held = shard.table.get(k).is_some_and(|e| e.holds(fence));
        if held {
            f();
        }
        drop(shard);
        held
    }

    /// Tells the watchers of `key` that a waiting acquire of `owner` was refused as a
    /// deadlock.
    pub fn deadlock(&self, key: &Key, owner: &Owner, cycle: &str) {
        let mut guard = self.shard_of_key(key);
        let mut out = Outbox::default();
        let shard = &mut *guard;
        shard.stats.deadlocks += 1;
        if let Some(watchers) = shard.watchers(key) {
            let change = Change::Deadlock {
                owner: owner_info(owner),
                cycle: cycle.to_string(),
            };
            notify(&mut out, watchers, key, change);
        }
    }

    /// Sends `owner` every change on `key` from now on.
    pub fn watch(&self, key: &Key, owner: &Owner) {
        let mut shard = self.shard_of_key(key);
        let watchers = shard.watches.entry(key.clone()).or_default();
        if !watchers.contains(owner) {
            watchers.push(owner.clone());
        }
    }

    /// Stops a watch; false if there was none.
    pub fn unwatch(&self, key: &Key, owner: &Owner) -> bool {
        let mut shard = self.shard_of_key(key);
        let Some(watchers) = shard.watches.get_mut(key) else {
            return false;
        };
        let before = watchers.len();
        watchers.retain(|w| w != owner);
        let removed = watchers.len() != before;
        if watchers.is_empty() {
            shard.watches.remove(key);
        }
        removed
    }

    /// Counts a request that timed out waiting (for stats).
    pub fn count_timeout(&self, key: &Key) {
        self.shard_of_key(key).stats.timeouts += 1;
    }

    /// Runs `f` on the entry of `key` (None if it has no holders or waiters).
    pub fn inspect<R>(&self, key: &Key, f: impl FnOnce(Option<&Entry<Owner, Stored>>) -> R) -> R {
        let k = self.hasher.hashed(key);
        f(self.shard(k.hash).table.get(k))
    }
}

/// The shard of a key's hash: bits 32.. (a shard's table picks buckets with the low bits and
/// tags them with the top seven).
fn shard_index(hash: u64) -> usize {
    (hash >> 32) as usize & (SHARDS - 1)
}

fn hash_of(at: At<'_>) -> u64 {
    match at {
        At::Key(k) => k.hash,
        At::Hold(h) => h.hash,
    }
}

fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding a shard would be a bug in the pure table; the data is still
    // consistent per operation, so keep serving rather than poisoning every later request.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn owner_info(o: &Owner) -> OwnerInfo {
    OwnerInfo {
        pid: o.pid,
        uid: o.uid,
        gid: o.gid,
        client_name: o.name.clone(),
    }
}
