//! Fencing tokens: strictly increasing across grants, restarts and crashes.
//!
//! Fences are handed out from an in-memory counter, but never above a *ceiling* that is
//! committed to the store first. Ceilings are reserved in blocks of [`FENCE_BLOCK`], so a grant
//! costs an atomic increment, not a disk sync. When less than half a block is left, one
//! background thread commits the next ceiling while grants go on. After a crash the daemon
//! starts above the last committed ceiling, so no fence is ever handed out twice and fences
//! never go backwards (a restart skips at most one block).
//!
//! Invariant: every value returned by [`Fences::next`] is `<=` a ceiling that the store has
//! durably recorded.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::store::{self, Change, Store, StoreError, Writer};

/// Fences reserved per store commit. A new reservation starts when half is left, so grants
/// go on for 2^23 more while a failing disk retries (minutes at full speed); only past that do
/// grants wait for the disk.
pub const FENCE_BLOCK: u64 = 1 << 24;

/// The fence source shared by every shard of the lock table.
pub struct Fences {
    /// The next fence to hand out.
    next: AtomicU64,
    /// Highest fence durably reserved.
    ceiling: AtomicU64,
    /// True while a reservation commit is running.
    extending: AtomicBool,
    writer: Writer,
    /// Wakes allocators that ran past the ceiling (only when the store is slow or failing).
    reserved: (Mutex<()>, Condvar),
}

impl Fences {
    /// Reserves a first block above everything `store` says may have been handed out, then
    /// hands later reservations to `writer` (call before [`Writer::start`] takes the store).
    ///
    /// # Errors
    /// The store could not be read or the first reservation could not be committed.
    pub fn reserve_first(store: &mut Store) -> Result<(u64, u64), StoreError> {
        let last = store.fence_ceiling()?;
        let ceiling = last.saturating_add(FENCE_BLOCK);
        store.set_fence_ceiling(ceiling)?;
        Ok((last + 1, ceiling))
    }

    /// Fences starting at `first`, durably reserved up to `ceiling`.
    pub fn new((first, ceiling): (u64, u64), writer: Writer) -> Arc<Fences> {
        Arc::new(Fences {
            next: AtomicU64::new(first),
            ceiling: AtomicU64::new(ceiling),
            extending: AtomicBool::new(false),
            writer,
            reserved: (Mutex::new(()), Condvar::new()),
        })
    }

    /// The next fence: strictly greater than every fence handed out before, by any shard.
    ///
    /// Costs one atomic increment. Blocks only if grants outrun a reservation commit by half a
    /// block (a failing or stalled disk), until a reservation succeeds.
    pub fn next(self: &Arc<Self>) -> u64 {
        let fence = self.next.fetch_add(1, Ordering::Relaxed);
        let ceiling = self.ceiling.load(Ordering::Acquire);
        if fence.saturating_add(FENCE_BLOCK / 2) > ceiling {
            self.extend_in_background(fence);
            if fence > ceiling {
                self.wait_for_ceiling(fence);
            }
        }
        fence
    }

    /// Highest fence handed out so far (0 if none); for stats.
    pub fn last(&self) -> u64 {
        self.next.load(Ordering::Relaxed).saturating_sub(1)
    }

    fn extend_in_background(self: &Arc<Self>, from: u64) {
        if self.extending.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("lockd-fence".into())
            .spawn(move || this.extend(from));
        if let Err(e) = spawned {
            tracing::error!("cannot start the fence reservation thread: {e}");
            self.extending.store(false, Ordering::Release);
        }
    }

    /// Commits a new ceiling, retrying while the store fails.
    fn extend(&self, from: u64) {
        let mut delay = Duration::from_millis(10);
        loop {
            let target = from
                .max(self.next.load(Ordering::Relaxed))
                .saturating_add(FENCE_BLOCK);
            let done = self.writer.submit(Change::FenceCeiling(target));
            match store::outcome(done.blocking_recv()) {
                Ok(()) => {
                    self.ceiling.fetch_max(target, Ordering::AcqRel);
                    break;
                }
                Err(e) => {
                    tracing::error!("cannot reserve fencing tokens: {e}; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
        self.extending.store(false, Ordering::Release);
        let _guard = self.reserved.0.lock();
        self.reserved.1.notify_all();
    }

    fn wait_for_ceiling(self: &Arc<Self>, fence: u64) {
        let (lock, cvar) = &self.reserved;
        let mut guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.ceiling.load(Ordering::Acquire) < fence {
            self.extend_in_background(fence);
            guard = match cvar.wait_timeout(guard, Duration::from_millis(100)) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the store, waiting (bounded) for a previous writer thread to let go of it.
    fn open(dir: &std::path::Path) -> Arc<Fences> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut store = loop {
            match Store::open(dir) {
                Ok(s) => break s,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        };
        let first = Fences::reserve_first(&mut store).unwrap();
        Fences::new(first, Writer::start(store).unwrap())
    }

    #[test]
    fn fences_increase_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut last = 0;
        for _ in 0..3 {
            let fences = open(dir.path());
            for _ in 0..1000 {
                let f = fences.next();
                assert!(f > last, "{f} after {last}");
                last = f;
            }
        }
    }

    #[test]
    fn running_past_half_a_block_reserves_more() {
        let dir = tempfile::tempdir().unwrap();
        let fences = open(dir.path());
        // Jump close to the ceiling, then allocate across it.
        fences.next.store(FENCE_BLOCK - 2, Ordering::Relaxed);
        let mut last = 0;
        for _ in 0..10 {
            let f = fences.next();
            assert!(f > last);
            last = f;
            assert!(f <= fences.ceiling.load(Ordering::Acquire));
        }
        let ceiling = fences.ceiling.load(Ordering::Acquire);
        assert!(ceiling >= last);
        drop(fences);
        // What was committed survives: a new start begins above it.
        let fences = open(dir.path());
        assert!(fences.next() > ceiling);
    }
}
