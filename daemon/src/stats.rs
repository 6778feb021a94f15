//! Statistics: per-shard counters and latency histograms, summed on request.
//!
//! Counters are plain integers inside each lock-table shard, updated under the shard lock the
//! operation holds anyway. Connection-level counts live in [`Global`] atomics, touched only on
//! connect, disconnect and protocol errors.

use std::sync::atomic::{AtomicU64, Ordering};

/// Histogram bucket upper bounds, milliseconds (powers of 4 from 1 ms to ~4.6 h).
pub const BOUNDS_MS: [u64; 13] = [
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262_144, 1_048_576, 4_194_304, 16_777_216,
];

/// A fixed-bucket histogram of milliseconds.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    /// One count per bound, plus one above the last.
    counts: [u64; BOUNDS_MS.len() + 1],
    sum_ms: u64,
}

impl Histogram {
    pub fn observe(&mut self, ms: u64) {
        let i = BOUNDS_MS.partition_point(|&b| b < ms);
        self.counts[i] += 1;
        self.sum_ms = self.sum_ms.saturating_add(ms);
    }

    pub fn add(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.sum_ms = self.sum_ms.saturating_add(other.sum_ms);
    }

    pub fn to_wire(&self) -> lockd_protocol::Histogram {
        lockd_protocol::Histogram {
            bounds_ms: BOUNDS_MS.to_vec(),
            counts: self.counts.to_vec(),
            sum_ms: self.sum_ms,
        }
    }
}

/// Counters kept per shard.
#[derive(Debug, Clone, Default)]
pub struct ShardStats {
    pub grants: u64,
    pub conflicts: u64,
    pub releases: u64,
    pub timeouts: u64,
    pub expiries: u64,
    pub disconnect_releases: u64,
    pub forced: u64,
    /// Waiting acquires refused because they would have closed a wait-for cycle.
    pub deadlocks: u64,
    pub long_holds_warned: u64,
    pub wait_ms: Histogram,
    pub hold_ms: Histogram,
}

impl ShardStats {
    pub fn add(&mut self, o: &ShardStats) {
        self.grants += o.grants;
        self.conflicts += o.conflicts;
        self.deadlocks += o.deadlocks;
        self.releases += o.releases;
        self.timeouts += o.timeouts;
        self.expiries += o.expiries;
        self.disconnect_releases += o.disconnect_releases;
        self.forced += o.forced;
        self.long_holds_warned += o.long_holds_warned;
        self.wait_ms.add(&o.wait_ms);
        self.hold_ms.add(&o.hold_ms);
    }
}

/// Daemon-wide counts that are not per key.
#[derive(Debug, Default)]
pub struct Global {
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub protocol_errors: AtomicU64,
}

impl Global {
    pub fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    pub fn inc(a: &AtomicU64) {
        a.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(a: &AtomicU64) {
        a.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_by_upper_bound() {
        let mut h = Histogram::default();
        for ms in [0, 1, 2, 4, 5, 100_000_000] {
            h.observe(ms);
        }
        let w = h.to_wire();
        assert_eq!(w.counts[0], 2, "0 and 1 ms are <= 1");
        assert_eq!(w.counts[1], 2, "2 and 4 ms are <= 4");
        assert_eq!(w.counts[2], 1, "5 ms is <= 16");
        assert_eq!(*w.counts.last().unwrap(), 1, "above every bound");
        assert_eq!(w.counts.len(), w.bounds_ms.len() + 1);
    }
}
