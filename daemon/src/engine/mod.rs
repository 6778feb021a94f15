//! The lock engine: the lock table, the leases and the handle to the store writer, with one
//! method per operation. No sockets: a session decodes a request, calls the engine, and encodes
//! the [`Answer`].
//!
//! [`Engine`] is shared by every connection; [`Conn`] is what the engine tracks for one
//! connection (its holds, waits, wait timers, watches and unanswered commits). Dropping a
//! `Conn` is the disconnect.
//!
//! Invariants (each kept in one place, named in brackets):
//! 1. **No grant is lost.** A waiting acquire leaves `Conn::waits` only when the table confirmed
//!    it is no longer queued (cancel or timeout succeeded) or its grant arrived; a disconnect
//!    removes every wait and session hold of the connection from the table, which also removes
//!    grants made but not yet delivered, and ends detached grants nobody will learn of
//!    [`Conn::disconnect`].
//! 2. **Acknowledged means committed.** A detached grant, a renewal of a detached lease and a
//!    release of one are answered `Ok` only after the commit holding them succeeded
//!    ([`Answer::AfterCommit`]); a failed commit leaves memory as it was before the request
//!    (the grant is taken back, the renewal never applied, the release undone) [`finish`].
//! 3. **The store follows memory.** Every store change of a lease is submitted under that
//!    lease's shard lock, in the order memory makes the transitions; the writer keeps the latest
//!    state per lease, so the store converges to memory across failed commits [`leases`].
//! 4. **A lease exists only with its hold.** A lease is registered after the table granted its
//!    hold and then the hold is checked again: a force-release before the check is seen by the
//!    check (the grant is taken back), one after it finds the lease and ends it [`Conn`].
//!    Every path that ends a hold (release, expiry, force-release, disconnect) ends its lease
//!    in the same call.
//! 5. **Every path that ends a hold wakes the queue.** Holds end only through `LockSpace`
//!    (`release`, `remove_owner`, `force_release`), and each grants from the head of the queue
//!    before the shard is unlocked.
//! 6. **No timer can break expiry.** Lease deadlines of any length (and recovered ones) are
//!    armed clamped to [`timers::MAX_TIMER`] and re-armed when they fire early; if the timer
//!    tasks end anyway, the daemon stops (its supervisor restarts it) [`timers`].
//! 7. **Shutdown drains the writer.** [`Engine::sync`] returns once everything submitted before
//!    it is durable (or failed).

mod answer;
mod conn;
mod deadlock;
pub mod leases;
pub mod lockspace;
mod ops;
pub mod recovery;
#[cfg(test)]
mod tests;
pub mod timers;

use std::sync::Arc;

use lockd_protocol::{Description, Key, ListPage, ListQuery, LostReason, Reply, Ticket};
use tokio::time::Instant;

pub use answer::{Answer, Deferred};
pub use conn::{Conn, Outgoing};
pub use ops::MAX_TIMED_WAIT_MS;

use crate::error::Error;
use crate::fence::Fences;
use crate::peer::Push;
use crate::store::{self, Change, LeaseRecord, Writer};
use crate::usage::Registry;
use answer::Then;
use leases::Leases;
use lockspace::{Ended, LockSpace, Totals};
use recovery::Recovered;
use timers::Timers;

/// Everything the engine shares between connections.
pub struct Engine {
    locks: LockSpace,
    leases: Leases,
    writer: Writer,
    usage: Registry,
    deadlocks: deadlock::Detector,
}

impl Engine {
    /// An engine granting fences from `fences` and storing through `writer`; run
    /// [`Timers::run`] with the returned timers.
    pub fn new(fences: Arc<Fences>, writer: Writer) -> (Arc<Engine>, Timers) {
        let (leases, arming) = Leases::new(writer.clone());
        let (locks, delays) = LockSpace::new(fences);
        let engine = Engine {
            locks,
            leases,
            writer,
            usage: Registry::default(),
            deadlocks: deadlock::Detector::default(),
        };
        (Arc::new(engine), Timers { arming, delays })
    }

    /// The sharded lock table (for the watchdog probe and the long-hold scan).
    pub fn locks(&self) -> &LockSpace {
        &self.locks
    }

    /// Per-uid usage counts.
    pub fn usage(&self) -> &Registry {
        &self.usage
    }

    /// Number of live leases.
    pub fn leases(&self) -> usize {
        self.leases.len()
    }

    /// Counters, gauges and distributions of the table, summed over the shards; holds older
    /// than `long_after_ms` count as long.
    pub fn totals(&self, long_after_ms: u64) -> Totals {
        self.locks.totals(long_after_ms)
    }

    /// Puts the detached leases found in the store back (start-up, before any connection),
    /// given the wall clock `now_ms` and the monotonic `now` of the same moment.
    pub fn recover(&self, records: Vec<LeaseRecord>, now_ms: u64, now: Instant) -> Recovered {
        recovery::restore(
            records,
            &self.locks,
            &self.leases,
            &self.usage,
            &self.writer,
            now_ms,
            now,
        )
    }

    /// Ends the lease with `ticket` if its deadline has passed at `now` (the expiry task's
    /// call): the key goes to the next waiter, the owner hears `HoldLost(Expired)`.
    pub fn expire(&self, ticket: &Ticket, now: Instant) {
        let Some(lease) = self.leases.take_expired(ticket, now) else {
            return;
        };
        let key = &lease.record.key;
        if self.locks.release(key, lease.record.fence, Ended::Expired) {
            tracing::info!(key = %key, fence = lease.record.fence, "lease expired");
            lease.owner.push(Push::Lost {
                key: key.clone(),
                fence: lease.record.fence,
                reason: LostReason::Expired,
            });
        }
    }

    /// Holders and waiters of `key`, cut to fit a frame of `max_frame` bytes.
    pub fn describe(&self, key: &Key, max_frame: usize) -> Description {
        self.locks.describe(key, max_frame)
    }

    /// One page of keys matching `query` in namespaces `visible` allows, cut to fit a frame of
    /// `max_frame` bytes.
    pub fn list(
        &self,
        query: &ListQuery,
        visible: impl Fn(&str) -> bool,
        max_frame: usize,
    ) -> ListPage {
        self.locks.list(query, visible, max_frame)
    }

    /// Ends every hold on `key` and their leases (the caller checked the right to). Answers
    /// once the deletions of detached leases are stored.
    pub fn force_release(self: &Arc<Self>, key: &Key) -> Answer {
        let (holds, tickets) = self.locks.force_release(key);
        let holds = holds as u32;
        let mut commits = Vec::new();
        let mut stored = Vec::new();
        for ticket in tickets {
            if let Some(done) = self.leases.end_forced(&ticket) {
                commits.push(done);
                stored.push(ticket);
            }
        }
        if commits.is_empty() {
            return Answer::Now(Ok(Reply::ForceReleased { holds }));
        }
        let then = Then::ForceReleased {
            holds,
            tickets: stored,
        };
        Answer::AfterCommit(Deferred::new(Arc::clone(self), commits, then))
    }

    /// Waits until every store change submitted before this call is durable (or failed): the
    /// last step of a graceful shutdown, so nothing memory decided is lost by exiting.
    ///
    /// # Errors
    /// The writer reported a failed commit or has stopped.
    pub async fn sync(&self) -> Result<(), store::StoreError> {
        store::outcome(self.writer.sync().await)
    }

    /// Completes a change whose commits finished with `outcome` (invariant 2) and hands its
    /// answer to `deliver`.
    fn finish(
        &self,
        outcome: Result<(), String>,
        then: Then,
        deliver: impl FnOnce(Result<Reply, Error>),
    ) {
        if let (Ok(()), Then::Granted { key, grant }) = (&outcome, &then) {
            // Acknowledged only while the hold is still in the table, under its shard lock.
            let mut deliver = Some(deliver);
            let granted = Ok(Reply::Granted(grant.clone()));
            self.locks.with_hold(key, grant.fence, || {
                if let Some(d) = deliver.take() {
                    d(granted);
                }
            });
            if let Some(d) = deliver {
                d(Err(Error::NotHolder(
                    "the lease was granted but ended (force-released or expired) before it was stored".into(),
                )));
            }
            return;
        }
        deliver(self.complete(outcome, then));
    }

    /// The state change and answer of [`Engine::finish`] for everything but an acknowledged
    /// detached grant.
    fn complete(&self, outcome: Result<(), String>, then: Then) -> Result<Reply, Error> {
        match (outcome, then) {
            (Ok(()), Then::Granted { .. }) => Err(Error::Internal(
                "a stored grant is answered by Engine::finish".into(),
            )),
            (Err(why), Then::Granted { key, grant }) => {
                // Take the grant back: nothing unacknowledged may hold the key.
                if self.leases.revoke(&grant.ticket).is_some() {
                    self.locks.release(&key, grant.fence, Ended::Released);
                }
                Err(Error::not_stored(&why))
            }
            (Ok(()), Then::Renewed { ticket, next }) => {
                match self.leases.finish_renewal(&ticket, &next) {
                    Some(expires_at_ms) => Ok(Reply::Renewed { expires_at_ms }),
                    None => Err(Error::NotHolder(
                        "the lease ended (expired, released or force-released) before its renewal was stored".into(),
                    )),
                }
            }
            (Err(why), Then::Renewed { ticket, .. }) => {
                self.leases.abort_renewal(&ticket);
                Err(Error::not_stored(&why))
            }
            (Ok(()), Then::Released { ticket, by }) => {
                if let Some(lease) = self.leases.finish_release(&ticket) {
                    let (key, fence) = (&lease.record.key, lease.record.fence);
                    if self.locks.release(key, fence, Ended::Released) && lease.owner.id != by {
                        lease.owner.push(Push::Lost {
                            key: key.clone(),
                            fence,
                            reason: LostReason::ReleasedElsewhere,
                        });
                    }
                }
                Ok(Reply::Released)
            }
            (Err(why), Then::Released { ticket, .. }) => {
                self.leases.abort_release(&ticket);
                Err(Error::not_stored(&why))
            }
            (Ok(()), Then::ForceReleased { holds, .. }) => Ok(Reply::ForceReleased { holds }),
            (Err(why), Then::ForceReleased { tickets, .. }) => {
                // The holds are gone from memory: the store must follow (invariant 3), so the
                // deletions are retried until they are stored.
                for ticket in tickets {
                    self.writer.submit_quiet(Change::Delete(ticket));
                }
                Err(Error::Unavailable(format!(
                    "the holds ended, but storing that failed ({why}); it is retried, and until \
                     it succeeds a crash of lockd could bring the detached leases back"
                )))
            }
        }
    }
}
