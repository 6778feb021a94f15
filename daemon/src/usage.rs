//! Per-uid resource counts, for the per-uid limits.
//!
//! One [`UidUsage`] per uid, shared by that uid's connections and detached leases. Counts are
//! updated once per wake-up of a connection (by difference) and when a detached lease ends
//! (its `Drop`), not per request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What one uid uses now.
#[derive(Debug, Default)]
pub struct UidUsage {
    pub connections: AtomicUsize,
    /// Session holds plus detached leases.
    pub holds: AtomicUsize,
    pub waits: AtomicUsize,
}

impl UidUsage {
    pub fn get(a: &AtomicUsize) -> usize {
        a.load(Ordering::Relaxed)
    }

    /// Moves `counter` by `new - old`.
    pub fn adjust(counter: &AtomicUsize, old: usize, new: usize) {
        if new > old {
            counter.fetch_add(new - old, Ordering::Relaxed);
        } else if old > new {
            counter.fetch_sub(old - new, Ordering::Relaxed);
        }
    }
}

/// A detached lease's share of its uid's hold count, returned when dropped.
#[derive(Debug)]
pub struct HoldShare(Arc<UidUsage>);

impl HoldShare {
    pub fn new(usage: Arc<UidUsage>) -> HoldShare {
        usage.holds.fetch_add(1, Ordering::Relaxed);
        HoldShare(usage)
    }
}

impl Drop for HoldShare {
    fn drop(&mut self) {
        self.0.holds.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The usage of every uid seen.
#[derive(Debug, Default)]
pub struct Registry {
    by_uid: Mutex<HashMap<u32, Arc<UidUsage>>>,
}

impl Registry {
    /// The usage record of `uid` (created on first use).
    pub fn of(&self, uid: u32) -> Arc<UidUsage> {
        let mut map = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(uid).or_default())
    }
}
