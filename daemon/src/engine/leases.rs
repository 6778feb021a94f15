//! Leases: holds that end when their time runs out unless renewed by ticket.
//!
//! Every leased hold (session-bound or detached) has an entry here, keyed by ticket, so it can be
//! renewed or released from any connection of its uid. Deadlines are sent to the expiry task
//! (`engine::expiry`) over [`Arming`]; a renewal re-arms the timer.
//!
//! Invariants:
//! - deadlines use tokio's monotonic clock; the wall-clock `expires_at_ms` is kept for display and
//!   persistence only;
//! - for a detached lease, every in-memory transition (grant, renew, release, expiry) submits the
//!   matching store change while holding the entry's shard lock, so the store receives changes
//!   in the same order as memory makes them and converges to the same state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use foldhash::HashMap;
use lockd_protocol::{Key, Mode, Ticket};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::peer::Owner;
use crate::store::{Change, Done, LeaseRecord, Writer};
use crate::usage::HoldShare;

const SHARDS: usize = 16;

/// One leased hold.
pub struct Lease {
    /// What is (or would be) stored; its `expires_at_ms` tracks renewals.
    pub record: LeaseRecord,
    /// The connection that acquired it (it may have closed since, for a detached lease).
    pub owner: Owner,
    /// Original length, the default for renewals.
    pub length: Duration,
    pub deadline: Instant,
    pub detached: bool,
    /// A release by ticket is waiting for its store commit (detached leases only).
    pub releasing: bool,
    /// The lease end describe shows, shared with the hold in the lock table.
    pub shown_expiry: Arc<AtomicU64>,
    /// A detached lease counts toward its uid's holds until it ends (dropped).
    pub share: Option<HoldShare>,
    /// Renewals started (sequence number of the latest).
    pub renewals: u64,
    /// Sequence number of the latest renewal applied to `deadline` and `record`.
    pub applied: u64,
}

impl Lease {
    fn extend(&mut self, next: &Extension) {
        self.deadline = next.deadline;
        self.record.expires_at_ms = next.expires_at_ms;
        self.applied = next.seq;
        self.shown_expiry
            .store(self.record.expires_at_ms, Ordering::Relaxed);
    }
}

/// A renewal's new end, applied when (and if) it may be.
#[derive(Debug, Clone, Copy)]
pub struct Extension {
    pub deadline: Instant,
    /// Wall-clock milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    seq: u64,
}

/// Outcome of [`Leases::renew`].
pub enum Renewal {
    /// Extended; the lease now ends at this wall-clock time.
    Done(u64),
    /// A detached lease: apply `Extension` with [`Leases::finish_renewal`] after this commit.
    Pending(Done, Extension),
}

/// The expiry task's inbox: `(ticket, Some(deadline))` arms or re-arms, `None` disarms.
pub type Arming = mpsc::UnboundedReceiver<(Ticket, Option<Instant>)>;

/// Why a ticket operation was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum TicketError {
    /// No live lease has this ticket (or it belongs to another uid: indistinguishable on purpose).
    NotHolder,
}

/// All leases, sharded by ticket.
pub struct Leases {
    shards: Box<[Mutex<HashMap<Ticket, Lease>>]>,
    arm: mpsc::UnboundedSender<(Ticket, Option<Instant>)>,
    writer: Writer,
}

impl Leases {
    /// Creates the registry and its expiry task's inbox; run [`Leases::expire_loop`] with it.
    pub fn new(writer: Writer) -> (Leases, Arming) {
        let (arm, rx) = mpsc::unbounded_channel();
        let leases = Leases {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
            arm,
            writer,
        };
        (leases, rx)
    }

    fn shard(&self, ticket: &Ticket) -> MutexGuard<'_, HashMap<Ticket, Lease>> {
        // Tickets are uniformly random: their first byte is a fine shard index.
        let i = usize::from(ticket.bytes()[0]) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The namespace of the lease with this ticket, if any.
    pub fn namespace_of(&self, ticket: &Ticket) -> Option<String> {
        self.shard(ticket)
            .get(ticket)
            .map(|l| l.record.key.namespace.clone())
    }

    /// Whether a live lease has this ticket.
    pub fn contains(&self, ticket: &Ticket) -> bool {
        self.shard(ticket).contains_key(ticket)
    }

    /// Number of live leases.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every live lease as (ticket, key, fence, detached), for tests that check the table,
    /// the leases and the store agree.
    #[cfg(test)]
    pub fn snapshot(&self) -> Vec<(Ticket, Key, u64, bool)> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for (t, l) in shard.iter() {
                all.push((*t, l.record.key.clone(), l.record.fence, l.detached));
            }
        }
        all
    }

    /// Registers a granted lease and arms its timer. For a detached lease, returns the store
    /// commit to wait for before acknowledging the grant.
    pub fn insert(&self, lease: Lease) -> Option<Done> {
        let ticket = lease.record.ticket;
        let deadline = lease.deadline;
        let mut shard = self.shard(&ticket);
        let done = lease
            .detached
            .then(|| self.writer.submit(Change::Put(lease.record.clone())));
        shard.insert(ticket, lease);
        // Sent under the shard lock, so arming messages for one ticket arrive in order.
        let _ = self.arm.send((ticket, Some(deadline)));
        done
    }

    /// Registers a lease recovered from storage (already stored) and arms its timer.
    pub fn restore(&self, lease: Lease) {
        let ticket = lease.record.ticket;
        let deadline = lease.deadline;
        let mut shard = self.shard(&ticket);
        shard.insert(ticket, lease);
        let _ = self.arm.send((ticket, Some(deadline)));
    }

    /// Extends the lease to `length` (default: its original length) from `now`.
    ///
    /// A session-bound lease is extended at once: [`Renewal::Done`]. A detached one is not
    /// touched in memory yet: the new expiry is submitted to the store and
    /// [`Leases::finish_renewal`] applies it once the commit succeeded ([`Renewal::Pending`]),
    /// so a failed commit leaves the lease exactly as it was.
    ///
    /// # Errors
    /// [`TicketError::NotHolder`] if the ticket names no live lease of `uid` (root may renew
    /// any).
    pub fn renew(
        &self,
        ticket: &Ticket,
        uid: u32,
        length: Option<Duration>,
        now: Instant,
        now_ms: u64,
    ) -> Result<Renewal, TicketError> {
        let mut shard = self.shard(ticket);
        let lease = shard.get_mut(ticket).ok_or(TicketError::NotHolder)?;
        if !may_act(uid, lease.record.uid) || lease.deadline <= now || lease.releasing {
            return Err(TicketError::NotHolder);
        }
        let length = length.unwrap_or(lease.length);
        let next = Extension {
            deadline: now + length,
            expires_at_ms: now_ms.saturating_add(length.as_millis() as u64),
            seq: lease.renewals + 1,
        };
        lease.renewals = next.seq;
        if lease.detached {
            let mut record = lease.record.clone();
            // `lease_ms` stays the length given at acquire: a renewal without a length uses that
            // one, before a restart (`lease.length`) and after it (recovered from the record).
            record.expires_at_ms = next.expires_at_ms;
            return Ok(Renewal::Pending(
                self.writer.submit(Change::Put(record)),
                next,
            ));
        }
        lease.extend(&next);
        let _ = self.arm.send((*ticket, Some(next.deadline)));
        Ok(Renewal::Done(next.expires_at_ms))
    }

    /// Applies a detached renewal whose commit succeeded. Returns the new wall-clock end, or
    /// `None` if the lease ended meanwhile (expired, released, force-released).
    ///
    /// Renewals committed out of order are applied in the order they were made: an older one
    /// arriving after a newer one changes nothing.
    pub fn finish_renewal(&self, ticket: &Ticket, next: &Extension) -> Option<u64> {
        let mut shard = self.shard(ticket);
        let lease = shard.get_mut(ticket)?;
        if next.seq > lease.applied {
            lease.extend(next);
            let _ = self.arm.send((*ticket, Some(next.deadline)));
        }
        Some(next.expires_at_ms)
    }

    /// After a failed renewal commit: memory was never changed; tell the store to keep what
    /// memory has (the failed put is not retried, this makes sure of it).
    pub fn abort_renewal(&self, ticket: &Ticket) {
        let shard = self.shard(ticket);
        if let Some(lease) = shard.get(ticket) {
            self.writer.submit_quiet(Change::Put(lease.record.clone()));
        }
    }

    /// Releases a session-bound lease by ticket at once, or starts the release of a detached
    /// one: the entry stays (and keeps its hold) until [`Leases::finish_release`] after the
    /// store commit, so a failed commit changes nothing.
    ///
    /// # Errors
    /// [`TicketError::NotHolder`] as for [`Leases::renew`].
    pub fn release(&self, ticket: &Ticket, uid: u32) -> Result<Release, TicketError> {
        let mut shard = self.shard(ticket);
        let lease = match shard.get_mut(ticket) {
            // A second release while one is being stored is refused: its outcome decides.
            Some(l) if may_act(uid, l.record.uid) && !l.releasing => l,
            _ => return Err(TicketError::NotHolder),
        };
        if lease.detached {
            lease.releasing = true;
            return Ok(Release::Pending(
                self.writer.submit(Change::Delete(*ticket)),
            ));
        }
        let lease = take(&mut shard, ticket).ok_or(TicketError::NotHolder)?;
        let _ = self.arm.send((*ticket, None));
        Ok(Release::Done(Box::new(lease)))
    }

    /// Completes a detached release whose commit succeeded; `None` if the lease ended
    /// meanwhile (expired).
    pub fn finish_release(&self, ticket: &Ticket) -> Option<Lease> {
        let mut shard = self.shard(ticket);
        let lease = take(&mut shard, ticket)?;
        let _ = self.arm.send((*ticket, None));
        Some(lease)
    }

    /// Undoes a detached release whose commit failed: the lease stays, and the store is told to
    /// keep it (the failed delete would otherwise be retried).
    pub fn abort_release(&self, ticket: &Ticket) {
        let mut shard = self.shard(ticket);
        if let Some(lease) = shard.get_mut(ticket) {
            lease.releasing = false;
            self.writer.submit_quiet(Change::Put(lease.record.clone()));
        }
    }

    /// Ends the lease of a force-released hold; for a detached one, returns the commit of its
    /// deletion.
    pub fn end_forced(&self, ticket: &Ticket) -> Option<Done> {
        let mut shard = self.shard(ticket);
        let lease = take(&mut shard, ticket)?;
        let _ = self.arm.send((*ticket, None));
        lease
            .detached
            .then(|| self.writer.submit(Change::Delete(*ticket)))
    }

    /// Takes back a detached grant whose commit failed (nothing was acknowledged).
    pub fn revoke(&self, ticket: &Ticket) -> Option<Lease> {
        let mut shard = self.shard(ticket);
        let lease = take(&mut shard, ticket)?;
        let _ = self.arm.send((*ticket, None));
        // Belt and braces: make sure no copy of the failed put reaches the disk later.
        self.writer.submit_quiet(Change::Delete(*ticket));
        Some(lease)
    }

    /// Forgets a session-bound lease whose hold ended with its connection (no store change).
    pub fn forget(&self, ticket: &Ticket) {
        let mut shard = self.shard(ticket);
        if take(&mut shard, ticket).is_some() {
            let _ = self.arm.send((*ticket, None));
        }
    }

    /// Removes the lease if its deadline has passed (a renewal may have moved it).
    pub fn take_expired(&self, ticket: &Ticket, now: Instant) -> Option<Lease> {
        let mut shard = self.shard(ticket);
        let deadline = shard.get(ticket)?.deadline;
        if deadline > now {
            // Renewed: make sure a timer exists for the new deadline.
            let _ = self.arm.send((*ticket, Some(deadline)));
            return None;
        }
        let lease = take(&mut shard, ticket)?;
        if lease.detached {
            // Not waited for: an expired lease that reappears after a crash is dropped again at
            // recovery, because its stored expiry has passed.
            self.writer.submit_quiet(Change::Delete(*ticket));
        }
        Some(lease)
    }
}

/// Removes the lease with `ticket` from its shard, giving the shard's memory back once it is
/// mostly empty (after many leases ended).
fn take(shard: &mut HashMap<Ticket, Lease>, ticket: &Ticket) -> Option<Lease> {
    let lease = shard.remove(ticket)?;
    crate::table::shrink_if_sparse(shard);
    Some(lease)
}

/// Outcome of [`Leases::release`].
pub enum Release {
    /// A session-bound lease, removed; its hold is the caller's to end.
    Done(Box<Lease>),
    /// A detached lease: answer after this commit.
    Pending(Done),
}

/// May a peer with `uid` act on a lease acquired by `owner_uid`? Root may act for anyone;
/// callers pass 0 for configured admins too.
pub fn may_act(uid: u32, owner_uid: u32) -> bool {
    uid == owner_uid || uid == 0
}

/// A lease being granted, before its ticket exists.
#[derive(Debug, Clone)]
pub struct LeaseSpec {
    pub length: Duration,
    pub detached: bool,
    pub data: Vec<u8>,
    pub permits: Option<u32>,
    pub lock_delay_ms: u64,
}

impl LeaseSpec {
    /// The record for a grant of `key` with `fence` and `ticket` to `owner` at `now`.
    pub fn record(
        &self,
        ticket: Ticket,
        key: Key,
        mode: Mode,
        fence: u64,
        owner: &Owner,
        now_ms: u64,
    ) -> LeaseRecord {
        LeaseRecord {
            ticket,
            key,
            mode,
            fence,
            uid: owner.uid,
            gid: owner.gid,
            pid: owner.pid,
            client_name: owner.name.clone(),
            acquired_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(self.length.as_millis() as u64),
            lease_ms: self.length.as_millis() as u64,
            data: self.data.clone(),
            permits: self.permits,
            lock_delay_ms: self.lock_delay_ms,
        }
    }
}
