//! The daemon's lock table: [`Table`] split into shards, each behind its own short-held mutex,
//! plus the fence source and delivery of grants to waiting connections.
//!
//! Architecture invariants:
//! - a shard mutex is held only for a table operation, never across `.await` or I/O;
//! - at most one shard mutex is held at a time (no lock ordering to get wrong);
//! - grants made on behalf of another connection are pushed to that connection's task after
//!   the shard is unlocked.

use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use std::sync::{Arc, Mutex, MutexGuard};

use lockd_protocol::{Key, Mode, RequestId};

use crate::clock;
use crate::fence::Fences;
use crate::peer::{Owner, Push};
use crate::table::{Acquired, Entry, Granted, Holder, Table, Want};

/// Number of shards; a power of two well above the core count so connections rarely meet.
pub const SHARDS: usize = 64;

/// What a hold carries besides what the table tracks.
#[derive(Debug, Clone, Default)]
pub struct HoldMeta {
    /// Opaque bytes shown by describe.
    pub data: Vec<u8>,
}

type Shard = Table<Owner, HoldMeta>;

/// Outcome of [`LockSpace::acquire`].
#[derive(Debug)]
pub enum AcquireOutcome {
    Granted(u64),
    Queued,
    /// Not granted; the message says who holds the key or how many wait ahead.
    Conflict(String),
}

pub struct LockSpace {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    fences: Arc<Fences>,
}

impl LockSpace {
    pub fn new(fences: Arc<Fences>) -> LockSpace {
        LockSpace {
            shards: (0..SHARDS).map(|_| Mutex::new(Table::default())).collect(),
            hasher: RandomState::default(),
            fences,
        }
    }

    pub fn fences(&self) -> &Arc<Fences> {
        &self.fences
    }

    fn shard(&self, key: &Key) -> MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(key) as usize) & (SHARDS - 1);
        // A panic while holding a shard would be a bug in the pure table; the data is still
        // consistent per operation, so keep serving rather than poisoning every later request.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Grants, queues or refuses an acquire of `owner` (`detached`: the hold will survive the
    /// owner's connection).
    #[allow(clippy::too_many_arguments)]
    pub fn acquire(
        &self,
        key: &Key,
        owner: &Owner,
        request: RequestId,
        mode: Mode,
        wait: bool,
        detached: bool,
        meta: HoldMeta,
    ) -> AcquireOutcome {
        let want = Want {
            owner: owner.clone(),
            request,
            mode,
            wait,
            detached,
            payload: meta,
        };
        let mut shard = self.shard(key);
        match shard.acquire(key, want, clock::now_ms(), &mut || self.fences.next()) {
            Acquired::Granted(fence) => AcquireOutcome::Granted(fence),
            Acquired::Queued => AcquireOutcome::Queued,
            Acquired::Conflict => {
                AcquireOutcome::Conflict(conflict_message(key, shard.get(key), mode))
            }
        }
    }

    /// Ends the hold `fence` on `key`; returns false if there is none.
    pub fn release(&self, key: &Key, fence: u64) -> bool {
        let released = {
            let mut shard = self.shard(key);
            shard.release(key, fence, clock::now_ms(), &mut || self.fences.next())
        };
        match released {
            Some((_, granted)) => {
                deliver(granted);
                true
            }
            None => false,
        }
    }

    /// Withdraws a queued acquire; returns false if it is no longer queued.
    pub fn cancel(&self, key: &Key, owner: &Owner, request: RequestId) -> bool {
        let cancelled = {
            let mut shard = self.shard(key);
            shard.cancel(key, owner, request, clock::now_ms(), &mut || {
                self.fences.next()
            })
        };
        match cancelled {
            Some((_, granted)) => {
                deliver(granted);
                true
            }
            None => false,
        }
    }

    /// Removes every hold and waiter of `owner` on `key`; returns how many holds ended.
    pub fn remove_owner(&self, key: &Key, owner: &Owner) -> usize {
        let (removed, granted) = {
            let mut shard = self.shard(key);
            shard.remove_owner(key, owner, clock::now_ms(), &mut || self.fences.next())
        };
        deliver(granted);
        removed.len()
    }

    /// Puts back a detached lease recovered from storage; false (nothing changes) if it
    /// conflicts with holds already restored.
    pub fn restore(
        &self,
        key: &Key,
        owner: Owner,
        mode: Mode,
        fence: u64,
        granted_at: u64,
        data: Vec<u8>,
    ) -> bool {
        let holder = Holder {
            owner,
            request: 0,
            mode,
            fence,
            granted_at,
            detached: true,
            payload: HoldMeta { data },
        };
        self.shard(key).restore(key, holder)
    }

    /// Runs `f` on the entry of `key` (None if it has no holders or waiters).
    pub fn inspect<R>(&self, key: &Key, f: impl FnOnce(Option<&Entry<Owner, HoldMeta>>) -> R) -> R {
        f(self.shard(key).get(key))
    }
}

fn deliver(granted: Vec<Granted<Owner>>) {
    for g in granted {
        g.owner.push(Push::Granted {
            request: g.request,
            fence: g.fence,
            mode: g.mode,
        });
    }
}

fn conflict_message(key: &Key, entry: Option<&Entry<Owner, HoldMeta>>, mode: Mode) -> String {
    let Some(entry) = entry else {
        return format!("{key} is busy");
    };
    match entry.holders.as_slice() {
        [h] if h.mode == Mode::Exclusive => format!(
            "{key} is held exclusively by {} (fence {})",
            h.owner.describe(),
            h.fence
        ),
        [] => format!("{key} has {} requests queued", entry.queue.len()),
        holders if mode == Mode::Shared => format!(
            "{key} is held shared by {} holders, and {} requests are queued ahead (an exclusive one first)",
            holders.len(),
            entry.queue.len()
        ),
        holders => format!(
            "{key} is held shared by {} holders (first: {})",
            holders.len(),
            holders[0].owner.describe()
        ),
    }
}
