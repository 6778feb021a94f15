//! Start-up: put the detached leases found in the store back into the lock table.
//!
//! Rules:
//! - the lease clock keeps running while the daemon is down: a lease whose stored wall-clock
//!   expiry has passed is dropped (and deleted from the store);
//! - a surviving lease gets the remaining wall-clock time as a fresh monotonic deadline;
//! - if two stored leases conflict on a key (possible only when a release or expiry was not yet
//!   stored when the daemon died), the one with the higher fence wins: a later grant on a key
//!   proves the earlier hold had ended.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::leases::{Lease, Leases};
use super::lockspace::{HoldMeta, How, LockSpace};
use crate::peer::{Owner, Peer};
use crate::store::{Change, LeaseRecord, Writer};
use crate::usage::{HoldShare, Registry};

/// Longest remaining lease time recovery restores (a century).
const MAX_REMAINING: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// What recovery did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Recovered {
    pub restored: usize,
    pub expired: usize,
    pub superseded: usize,
}

/// Restores `records` into `locks` and `leases`, given the wall clock `now_ms` and monotonic
/// `now` of the same moment.
pub fn restore(
    mut records: Vec<LeaseRecord>,
    locks: &LockSpace,
    leases: &Leases,
    usage: &Registry,
    writer: &Writer,
    now_ms: u64,
    now: Instant,
) -> Recovered {
    let mut out = Recovered::default();
    // Restored leases of one former client share one owner (all have connection id 0, which
    // no live connection has), not an owner and a mailbox each.
    let mut owners: HashMap<(Option<i32>, u32, u32, String), Owner> = HashMap::new();
    // Highest fence first, so on a conflict the newest grant is the one kept.
    records.sort_unstable_by_key(|r| std::cmp::Reverse(r.fence));
    for record in records {
        if record.expires_at_ms <= now_ms {
            writer.submit_quiet(Change::Delete(record.ticket));
            out.expired += 1;
            continue;
        }
        let owner = owners
            .entry((
                record.pid,
                record.uid,
                record.gid,
                record.client_name.clone(),
            ))
            .or_insert_with(|| {
                // A connection id of 0 never belongs to a live connection.
                Peer::open(
                    0,
                    record.pid,
                    record.uid,
                    record.gid,
                    format!("{} (before restart)", record.client_name),
                )
                .0
            })
            .clone();
        let shown_expiry = Arc::new(AtomicU64::new(record.expires_at_ms));
        let meta = HoldMeta {
            data: record.data.clone(),
            ticket: record.ticket,
            expires_at_ms: Some(Arc::clone(&shown_expiry)),
            warned: false,
        };
        let restored = locks.restore(
            &record.key,
            owner.clone(),
            How {
                mode: record.mode,
                wait: false,
                detached: true,
                permits: record.permits,
                lock_delay_ms: record.lock_delay_ms,
            },
            record.fence,
            record.acquired_at_ms,
            meta,
        );
        if !restored {
            writer.submit_quiet(Change::Delete(record.ticket));
            out.superseded += 1;
            continue;
        }
        // Clamped, so no stored expiry (however far, however corrupt) can overflow the clock;
        // the expiry task arms long deadlines in steps.
        let remaining = Duration::from_millis(record.expires_at_ms - now_ms).min(MAX_REMAINING);
        leases.restore(Lease {
            length: Duration::from_millis(record.lease_ms.max(1)),
            deadline: now + remaining,
            renewals: 0,
            applied: 0,
            detached: true,
            releasing: false,
            shown_expiry,
            share: Some(HoldShare::new(usage.of(record.uid))),
            owner,
            record,
        });
        out.restored += 1;
    }
    out
}
