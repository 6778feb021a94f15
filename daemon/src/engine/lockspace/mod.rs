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

use std::hash::BuildHasher;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use foldhash::fast::RandomState;
use foldhash::HashMap;
use lockd_protocol::{Change, Key, LostReason, Mode, OwnerInfo, RequestId, Ticket};
use tokio::sync::mpsc;

use crate::clock;
use crate::fence::Fences;
use crate::peer::{Owner, Push};
use crate::stats::ShardStats;
use crate::table::{Acquired, Delay, Entry, Granted, Holder, Table, Want};

mod view;

use view::conflict_message;

pub use view::{Totals, MAX_LIST_PAGE};

/// Number of shards; a power of two well above the core count so connections rarely meet.
pub const SHARDS: usize = 64;

/// What a hold carries besides what the table tracks. Never shown with its ticket.
#[derive(Debug, Clone)]
pub struct HoldMeta {
    /// Opaque bytes shown by describe.
    pub data: Vec<u8>,
    /// The hold's ticket, so administrative actions can end its lease too.
    pub ticket: Ticket,
    /// Lease end (wall-clock ms), shared with the lease registry so renewals show.
    pub expires_at_ms: Option<Arc<AtomicU64>>,
    /// A long-hold warning was logged for it.
    pub warned: bool,
}

/// Why a hold ended, for watchers and statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Released,
    Expired,
}

#[derive(Default)]
struct Shard {
    table: Table<Owner, HoldMeta>,
    /// Connections watching each key (kept even while the key has no holders or waiters).
    watches: HashMap<Key, Vec<Owner>>,
    stats: ShardStats,
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
    /// Granted with this fence; the key is the table's own copy, to share.
    Granted(u64, Arc<Key>),
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
    hasher: RandomState,
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
        let space = LockSpace {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::default(),
            fences,
            delays,
        };
        (space, inbox)
    }

    /// Sends a lock-delay of `key` that began during this operation to the delay task
    /// (`before`: the delay in force before it).
    fn arm_delay(&self, shard: &Shard, key: &Key, before: Option<Delay>, now: u64) {
        if let Some(d) = shard.table.delay_of(key) {
            if before.map(|b| b.seq) != Some(d.seq) {
                let length = Duration::from_millis(d.until.saturating_sub(now));
                let _ = self.delays.send((key.clone(), d.seq, length));
            }
        }
    }

    /// Ends lock-delay `seq` of `key` (if still in force): waiters are granted.
    pub fn end_delay(&self, key: &Key, seq: u64) {
        let mut guard = self.shard(key);
        let mut out = Outbox::default();
        let shard = &mut *guard;
        let now = clock::now_ms();
        let granted = shard
            .table
            .end_delay(key, seq, now, &mut || self.fences.next());
        shard.granted(key, granted, now, &mut out);
    }

    pub fn fences(&self) -> &Arc<Fences> {
        &self.fences
    }

    fn shard(&self, key: &Key) -> MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(key) as usize) & (SHARDS - 1);
        lock(&self.shards[i])
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
            lock_delay: how.lock_delay_ms,
            payload: meta,
        };
        let outcome = {
            let mut guard = self.shard(key);
            // Declared after the guard, so it is dropped (and delivers) before the unlock:
            // watchers see events in table order.
            let mut out = Outbox::default();
            let shard = &mut *guard;
            let now = clock::now_ms();
            match shard
                .table
                .acquire(key, want, now, &mut || self.fences.next())
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
                    let shared = shard
                        .table
                        .shared_key(key)
                        .unwrap_or_else(|| Arc::new(key.clone()));
                    AcquireOutcome::Granted(fence, shared)
                }
                Acquired::Queued => AcquireOutcome::Queued,
                Acquired::Capacity(permits) => AcquireOutcome::Capacity(permits),
                Acquired::Conflict => {
                    shard.stats.conflicts += 1;
                    AcquireOutcome::Conflict(conflict_message(key, shard.table.get(key), mode))
                }
            }
        };
        outcome
    }

    /// Ends the hold `fence` on `key`; returns false if there is none.
    pub fn release(&self, key: &Key, fence: u64, why: Ended) -> bool {
        let released = {
            let mut guard = self.shard(key);
            // Declared after the guard, so it is dropped (and delivers) before the unlock:
            // watchers see events in table order.
            let mut out = Outbox::default();
            let shard = &mut *guard;
            let now = clock::now_ms();
            let unclean = why == Ended::Expired;
            let before = if unclean {
                shard.table.delay_of(key)
            } else {
                None
            };
            match shard
                .table
                .end_hold(key, fence, unclean, now, &mut || self.fences.next())
            {
                Some((holder, granted)) => {
                    if unclean {
                        self.arm_delay(shard, key, before, now);
                    }
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
                        .observe(now.saturating_sub(holder.granted_at));
                    shard.ended(key, change, &mut out);
                    shard.granted(key, granted, now, &mut out);
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
            let mut guard = self.shard(key);
            // Declared after the guard, so it is dropped (and delivers) before the unlock:
            // watchers see events in table order.
            let mut out = Outbox::default();
            let shard = &mut *guard;
            let now = clock::now_ms();
            match shard
                .table
                .cancel(key, owner, request, now, &mut || self.fences.next())
            {
                Some((_, granted)) => {
                    shard.granted(key, granted, now, &mut out);
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
        let ended = {
            let mut guard = self.shard(key);
            // Declared after the guard, so it is dropped (and delivers) before the unlock:
            // watchers see events in table order.
            let mut out = Outbox::default();
            let shard = &mut *guard;
            let now = clock::now_ms();
            let before = shard.table.delay_of(key);
            let (removed, granted) = shard
                .table
                .remove_owner(key, owner, now, &mut || self.fences.next());
            self.arm_delay(shard, key, before, now);
            for holder in &removed {
                shard.stats.disconnect_releases += 1;
                shard
                    .stats
                    .hold_ms
                    .observe(now.saturating_sub(holder.granted_at));
                let change = Change::Disconnected {
                    fence: holder.fence,
                };
                shard.ended(key, change, &mut out);
            }
            shard.granted(key, granted, now, &mut out);
            removed.len()
        };
        ended
    }

    /// Ends a detached hold granted to `owner`'s `request` that the owner never learned of
    /// (its connection closed first). Returns 1 if there was one.
    pub fn abandon_detached(&self, key: &Key, owner: &Owner, request: RequestId) -> usize {
        let fence = self.inspect(key, |e| {
            e?.holders
                .iter()
                .find(|h| h.detached && h.request == request && h.owner == *owner)
                .map(|h| h.fence)
        });
        match fence {
            Some(fence) => usize::from(self.release(key, fence, Ended::Released)),
            None => 0,
        }
    }

    /// Ends every hold on `key` (administrators only; the caller checked). Holders are told
    /// `HoldLost(ForceReleased)`. Returns the tickets of the ended holds, so their leases can be
    /// ended too.
    pub fn force_release(&self, key: &Key) -> Vec<Ticket> {
        let tickets = {
            let mut guard = self.shard(key);
            // Declared after the guard, so it is dropped (and delivers) before the unlock:
            // watchers see events in table order.
            let mut out = Outbox::default();
            let shard = &mut *guard;
            let now = clock::now_ms();
            let before = shard.table.delay_of(key);
            let (removed, granted) = shard
                .table
                .remove_holders(key, now, &mut || self.fences.next());
            self.arm_delay(shard, key, before, now);
            let mut tickets = Vec::with_capacity(removed.len());
            for holder in removed {
                shard.stats.forced += 1;
                shard
                    .stats
                    .hold_ms
                    .observe(now.saturating_sub(holder.granted_at));
                shard.ended(
                    key,
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
                tickets.push(holder.payload.ticket);
            }
            shard.granted(key, granted, now, &mut out);
            tickets
        };
        tickets
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
            request: 0,
            mode: how.mode,
            fence,
            granted_at,
            detached: true,
            lock_delay: how.lock_delay_ms,
            payload: meta,
        };
        self.shard(key).table.restore(key, holder, how.permits)
    }

    /// Whether the hold `fence` on `key` is in the table.
    pub fn holds(&self, key: &Key, fence: u64) -> bool {
        self.inspect(key, |e| {
            e.is_some_and(|e| e.holders.iter().any(|h| h.fence == fence))
        })
    }

    /// Runs `f` while the shard of `key` is locked, if the hold `fence` is in the table;
    /// returns whether it was. A message `f` pushes is ordered with every event of the key
    /// (a later force-release's `HoldLost` comes after it, an earlier one makes this false).
    pub fn with_hold(&self, key: &Key, fence: u64, f: impl FnOnce()) -> bool {
        let shard = self.shard(key);
        let held = shard
            .table
            .get(key)
            .is_some_and(|e| e.holders.iter().any(|h| h.fence == fence));
        if held {
            f();
        }
        drop(shard);
        held
    }

    /// Tells the watchers of `key` that a waiting acquire of `owner` was refused as a
    /// deadlock.
    pub fn deadlock(&self, key: &Key, owner: &Owner, cycle: &str) {
        let mut guard = self.shard(key);
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
        let mut shard = self.shard(key);
        let watchers = shard.watches.entry(key.clone()).or_default();
        if !watchers.contains(owner) {
            watchers.push(owner.clone());
        }
    }

    /// Stops a watch; false if there was none.
    pub fn unwatch(&self, key: &Key, owner: &Owner) -> bool {
        let mut shard = self.shard(key);
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
        self.shard(key).stats.timeouts += 1;
    }

    /// Runs `f` on the entry of `key` (None if it has no holders or waiters).
    pub fn inspect<R>(&self, key: &Key, f: impl FnOnce(Option<&Entry<Owner, HoldMeta>>) -> R) -> R {
        f(self.shard(key).table.get(key))
    }
}

impl Shard {
    /// Watchers of `key`; skips hashing when nobody in this shard watches anything (the hot
    /// path).
    fn watchers(&self, key: &Key) -> Option<&Vec<Owner>> {
        if self.watches.is_empty() {
            None
        } else {
            self.watches.get(key)
        }
    }

    /// Queues the watch event for a hold that ended.
    fn ended(&mut self, key: &Key, change: Change, out: &mut Outbox) {
        if let Some(watchers) = self.watchers(key) {
            notify(out, watchers, key, change);
        }
    }

    /// Queues the pushes for holds granted from the queue, with their watch events.
    fn granted(&mut self, key: &Key, granted: Vec<Granted<Owner>>, now: u64, out: &mut Outbox) {
        for g in granted {
            self.stats.grants += 1;
            self.stats.wait_ms.observe(now.saturating_sub(g.since));
            if let Some(watchers) = self.watchers(key) {
                let change = Change::Granted {
                    fence: g.fence,
                    mode: g.mode,
                    owner: owner_info(&g.owner),
                };
                notify(out, watchers, key, change);
            }
            out.0.push((
                g.owner,
                Push::Granted {
                    request: g.request,
                    fence: g.fence,
                    mode: g.mode,
                },
            ));
        }
    }
}

fn notify(out: &mut Outbox, watchers: &[Owner], key: &Key, change: Change) {
    for w in watchers {
        out.0.push((
            w.clone(),
            Push::Watch {
                key: key.clone(),
                change: change.clone(),
            },
        ));
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
