//! The requests of one connection: checks (authorization, limits, request ids), then the
//! table, the leases and the store in the order the engine's invariants fix.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockd_protocol::{Acquire, Grant, Key, ListQuery, Mode, Op, Reply, RequestId, Ticket, Wait};
use tokio::time::Instant;

use super::answer::Then;
use super::conn::{Held, Minted, Pending, Tracked, Unanswered};
use super::leases::{Lease, LeaseSpec, Release, Renewal, TicketError};
use super::lockspace::{AcquireOutcome, Ended, HoldAt, HoldMeta, How, MAX_LOCK_DELAY_MS};
use super::{Answer, Conn, Deferred};
use crate::clock;
use crate::error::Error;
use crate::peer::Push;
use crate::usage::{HoldShare, UidUsage};

/// Timed waits longer than this (a year, in milliseconds) are treated as waiting forever.
pub const MAX_TIMED_WAIT_MS: u64 = 365 * 24 * 3600 * 1000;

impl Conn {
    /// Handles one request. `Op::Stats` is the session's (it adds connection counters).
    pub fn handle(&mut self, id: RequestId, op: Op) -> Answer {
        if self.in_use(id) {
            return Answer::Now(Err(Error::InvalidArgument(format!(
                "request id {id} is still in use by an unanswered request of this connection; \
                 use a new id per request"
            ))));
        }
        let answer = match op {
            Op::Acquire(acquire) => self.acquire(id, acquire),
            Op::Release { ticket } => self.release(&ticket),
            Op::Renew { ticket, lease_ms } => self.renew(&ticket, lease_ms),
            Op::Cancel { request } => Answer::Now(Ok(Reply::Cancelled(self.cancel(request, id)))),
            Op::Ping => Answer::Now(Ok(Reply::Pong)),
            Op::Describe { key } => Answer::Now(self.describe(&key)),
            Op::List(query) => Answer::Now(self.list(&query)),
            Op::ForceRelease { key } => self.force_release(&key),
            Op::Watch { key } => Answer::Now(self.watch(key)),
            Op::Unwatch { key } => Answer::Now(Ok(Reply::Unwatched(self.unwatch(&key)))),
            Op::Stats => Answer::Now(Err(Error::Internal(
                "stats are answered by the session".into(),
            ))),
        };
        if matches!(answer, Answer::AfterCommit(_)) {
            // Its id stays in use until the answer is delivered (`Push::Reply`).
            self.in_flight.entry(id).or_insert(None);
        }
        answer
    }

    /// Is `id` the id of a request still waiting for its answer?
    fn in_use(&self, id: RequestId) -> bool {
        (!self.waits.is_empty() && self.waits.contains_key(&id))
            || (!self.in_flight.is_empty() && self.in_flight.contains_key(&id))
    }

    /// PermissionDenied unless this peer may use `namespace`.
    fn authorize(&self, namespace: &str) -> Result<(), Error> {
        let o = &self.owner;
        self.config.authz.authorize(namespace, o.uid, &o.groups)
    }

    fn acquire(&mut self, id: RequestId, mut a: Acquire) -> Answer {
        let lease = match self.check_acquire(&a) {
            Ok(lease) => lease,
            Err(e) => return Answer::Now(Err(e)),
        };
        if self.unregistered > 0 {
            // This acquire may give the connection a hold or a second wait.
            self.register_waits();
        }
        let waited = match a.wait {
            Wait::No | Wait::Millis(0) => None,
            Wait::Millis(ms) if ms <= MAX_TIMED_WAIT_MS => Some(Some(Duration::from_millis(ms))),
            // Longer than a timer can represent usefully: the same as waiting forever.
            Wait::Millis(_) | Wait::Forever => Some(None),
        };
        // The ticket exists before the grant, so the table can name it to administrative
        // actions (force-release ends the lease too); it is never shown.
        let ticket = match self.tickets.draw() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("the OS random source failed: {e}");
                return Answer::Now(Err(Error::Internal(
                    "the daemon could not draw a ticket from the OS random source".into(),
                )));
            }
        };
        let minted = Minted {
            ticket,
            shown_expiry: lease.as_ref().map(|_| Arc::new(AtomicU64::new(0))),
        };
        let meta = HoldMeta {
            // Moved, not cloned: the request needs it no more (a lease keeps its own copy).
            data: std::mem::take(&mut a.data),
            ticket,
            expires_at_ms: minted.shown_expiry.clone(),
            warned: false,
        };
        let how = How {
            mode: a.mode,
            wait: waited.is_some(),
            detached: lease.as_ref().is_some_and(|l| l.detached),
            permits: a.permits,
            lock_delay_ms: a.lock_delay_ms,
        };
        let outcome = self
            .engine
            .locks
            .acquire(&a.key, &self.owner, id, how, meta);
        match outcome {
            AcquireOutcome::Granted(at) => self.granted(id, a.key, at, a.mode, lease, minted),
            AcquireOutcome::Capacity(current) => {
                self.tickets.put_back(ticket);
                let now = match current {
                    Some(n) => format!("a counting semaphore of {n} permits; ask with permits {n}"),
                    None => "a plain lock; acquire it without permits".to_string(),
                };
                Answer::Now(Err(Error::InvalidArgument(format!("{} is {now}", a.key))))
            }
            AcquireOutcome::Conflict(msg) => {
                self.tickets.put_back(ticket);
                Answer::Now(Err(Error::Conflict(msg)))
            }
            AcquireOutcome::Queued => {
                self.queued(id, a.key, a.permits, waited.flatten(), lease, minted)
            }
        }
    }

    /// Records a queued acquire, unless waiting would close a cycle of connections waiting on
    /// each other: then it is withdrawn and answers `Deadlock`.
    fn queued(
        &mut self,
        id: RequestId,
        key: Key,
        permits: Option<u32>,
        waited: Option<Duration>,
        lease: Option<LeaseSpec>,
        minted: Minted,
    ) -> Answer {
        let tracked = if permits.is_some() {
            Tracked::Never
        } else if self.holds.is_empty() && self.waits.is_empty() && !self.had_detached {
            // Holding nothing and waiting for nothing else, it cannot be on a cycle.
            self.unregistered += 1;
            Tracked::Unregistered
        } else {
            let detector = &self.engine.deadlocks;
            if let Some(cycle) =
                detector.register_and_check(&self.engine.locks, &self.owner, id, &key)
            {
                // Withdrawn unless it was granted meanwhile (then the grant is on its way).
                if self.engine.locks.cancel(&key, &self.owner, id) {
                    detector.unregister(&self.owner, id);
                    self.tickets.put_back(minted.ticket);
                    self.engine.locks.deadlock(&key, &self.owner, &cycle);
                    tracing::warn!(key = %key, "deadlock refused: {cycle}");
                    return Answer::Now(Err(Error::Deadlock(format!("{key}: {cycle}"))));
                }
            }
            Tracked::Registered
        };
        let timer = waited.map(|d| self.timers.insert(id, d));
        let pending = Pending {
            key,
            timer,
            waited,
            lease,
            minted,
            tracked,
        };
        self.waits.insert(id, pending);
        Answer::Queued
    }

    /// Checks an acquire; returns its lease, if any.
    fn check_acquire(&self, a: &Acquire) -> Result<Option<LeaseSpec>, Error> {
        a.key.validate().map_err(invalid)?;
        self.authorize(&a.key.namespace)?;
        let limits = &self.config.limits;
        limits.check_data(a.data.len())?;
        match a.permits {
            Some(0) => return Err(invalid("permits must be at least 1")),
            Some(_) if a.mode == Mode::Shared => {
                return Err(invalid(
                    "a semaphore permit is taken in exclusive mode (each holder takes one of the permits)",
                ))
            }
            _ => {}
        }
        // The table keeps lock-delays in 32 bits of milliseconds (about 49 days).
        let max_delay = limits
            .max_lock_delay
            .min(Duration::from_millis(MAX_LOCK_DELAY_MS));
        if Duration::from_millis(a.lock_delay_ms) > max_delay {
            return Err(Error::LimitExceeded(format!(
                "lock-delay of {} ms: the limit is {} ms",
                a.lock_delay_ms,
                max_delay.as_millis()
            )));
        }
        let lease = match (a.lease_ms, a.detach) {
            (None, true) => {
                return Err(Error::InvalidArgument(
                    "a detached hold needs a lease: set lease_ms".into(),
                ));
            }
            (None, false) => None,
            (Some(ms), detached) => Some(LeaseSpec {
                length: self.check_lease(ms)?,
                detached,
                data: a.data.clone(),
                permits: a.permits,
                lock_delay_ms: a.lock_delay_ms,
            }),
        };
        let limit = |what: String| Err(Error::LimitExceeded(what));
        if self.holds.len() >= limits.max_holds_per_conn {
            return limit(format!(
                "this connection already has {} holds, the limit; release some first",
                self.holds.len()
            ));
        }
        if UidUsage::get(&self.usage.holds) >= limits.max_holds_per_uid {
            return limit(format!(
                "uid {} already has {} holds, the limit",
                self.owner.uid, limits.max_holds_per_uid
            ));
        }
        if a.wait != Wait::No && UidUsage::get(&self.usage.waits) >= limits.max_waits_per_uid {
            return limit(format!(
                "uid {} already has {} waiting acquires, the limit",
                self.owner.uid, limits.max_waits_per_uid
            ));
        }
        if a.wait != Wait::No && self.waits.len() >= limits.max_waits_per_conn {
            return limit(format!(
                "this connection already has {} waiting acquires, the limit",
                self.waits.len()
            ));
        }
        Ok(lease)
    }

    /// A lease length in milliseconds, checked against the configured maximum.
    fn check_lease(&self, ms: u64) -> Result<Duration, Error> {
        self.config.limits.check_lease(ms)
    }

    /// Records a grant of request `id` and builds its answer (after the store, for a detached
    /// lease).
    pub(super) fn granted(
        &mut self,
        id: RequestId,
        key: Key,
        at: HoldAt,
        mode: Mode,
        lease: Option<LeaseSpec>,
        minted: Minted,
    ) -> Answer {
        let (ticket, fence) = (minted.ticket, at.fence);
        let Some(spec) = lease else {
            self.holds.insert(ticket, Held { at });
            let grant = Grant {
                ticket,
                fence,
                mode,
                expires_at_ms: None,
            };
            return Answer::Now(Ok(Reply::Granted(grant)));
        };
        let record = spec.record(
            ticket,
            key.clone(),
            mode,
            fence,
            &self.owner,
            clock::now_ms(),
        );
        let shown_expiry = minted
            .shown_expiry
            .unwrap_or_else(|| Arc::new(AtomicU64::new(0)));
        shown_expiry.store(record.expires_at_ms, Ordering::Relaxed);
        let grant = Grant {
            ticket,
            fence,
            mode,
            expires_at_ms: Some(record.expires_at_ms),
        };
        let detached = spec.detached;
        self.had_detached |= detached;
        let commit = self.engine.leases.insert(Lease {
            record,
            owner: self.owner.clone(),
            length: spec.length,
            deadline: Instant::now() + spec.length,
            detached,
            releasing: false,
            shown_expiry,
            share: detached.then(|| HoldShare::new(Arc::clone(&self.usage))),
            renewals: 0,
            applied: 0,
        });
        let Some(done) = commit else {
            // Session-bound: if a force-release ended the hold before the lease was registered,
            // its HoldLost follows in the mailbox and forgets the lease (`on_push`).
            self.holds.insert(ticket, Held { at });
            self.leased.insert(ticket);
            return Answer::Now(Ok(Reply::Granted(grant)));
        };
        // Invariant 4: the lease is registered; is the hold still there? A force-release
        // before this check is seen here, one after it finds the lease and ends it.
        if !self.engine.locks.holds(&key, fence) {
            self.engine.leases.revoke(&ticket);
            return Answer::Now(Err(Error::NotHolder(format!(
                "{key} was force-released before the lease could be stored; acquire again"
            ))));
        }
        let unanswered = Unanswered {
            key: key.clone(),
            ticket,
            fence,
        };
        self.in_flight.insert(id, Some(unanswered));
        let then = Then::Granted { key, grant };
        Answer::AfterCommit(Deferred::new(Arc::clone(&self.engine), vec![done], then))
    }

    fn release(&mut self, ticket: &Ticket) -> Answer {
        if let Some(held) = self.holds.remove(ticket) {
            crate::table::shrink_if_sparse(&mut self.holds);
            if !self.leased.is_empty() && self.leased.remove(ticket) {
                self.engine.leases.forget(ticket);
            }
            let released = self.engine.locks.release_at(held.at, Ended::Released);
            return Answer::Now(if released {
                Ok(Reply::Released)
            } else {
                Err(Error::not_holder())
            });
        }
        // A lease: detached, or bound to another connection of the same uid.
        if let Some(ns) = self.engine.leases.namespace_of(ticket) {
            if let Err(e) = self.authorize(&ns) {
                return Answer::Now(Err(e));
            }
        }
        match self.engine.leases.release(ticket, self.owner.acting_uid()) {
            Err(TicketError::NotHolder) => Answer::Now(Err(Error::not_holder())),
            Ok(Release::Pending(done)) => {
                let then = Then::Released {
                    ticket: *ticket,
                    by: self.owner.id,
                };
                Answer::AfterCommit(Deferred::new(Arc::clone(&self.engine), vec![done], then))
            }
            Ok(Release::Done(lease)) => {
                let (key, fence) = (&lease.record.key, lease.record.fence);
                if !self.engine.locks.release(key, fence, Ended::Released) {
                    return Answer::Now(Err(Error::not_holder()));
                }
                lease.owner.push(Push::Lost {
                    key: key.clone(),
                    fence,
                    reason: lockd_protocol::LostReason::ReleasedElsewhere,
                });
                Answer::Now(Ok(Reply::Released))
            }
        }
    }

    fn renew(&mut self, ticket: &Ticket, lease_ms: Option<u64>) -> Answer {
        let length = match lease_ms.map(|ms| self.check_lease(ms)).transpose() {
            Ok(l) => l,
            Err(e) => return Answer::Now(Err(e)),
        };
        if let Some(ns) = self.engine.leases.namespace_of(ticket) {
            if let Err(e) = self.authorize(&ns) {
                return Answer::Now(Err(e));
            }
        }
        let renewed = self.engine.leases.renew(
            ticket,
            self.owner.acting_uid(),
            length,
            Instant::now(),
            clock::now_ms(),
        );
        match renewed {
            Ok(Renewal::Done(expires_at_ms)) => Answer::Now(Ok(Reply::Renewed { expires_at_ms })),
            Ok(Renewal::Pending(done, next)) => {
                let then = Then::Renewed {
                    ticket: *ticket,
                    next,
                };
                Answer::AfterCommit(Deferred::new(Arc::clone(&self.engine), vec![done], then))
            }
            Err(TicketError::NotHolder) => Answer::Now(Err(Error::not_holder())),
        }
    }

    /// Withdraws the queued acquire `request`; true if it was still queued. The withdrawn
    /// acquire answers `Timeout` (a side answer).
    fn cancel(&mut self, request: RequestId, by: RequestId) -> bool {
        let Some(pending) = self.waits.get(&request) else {
            return false;
        };
        if !self.engine.locks.cancel(&pending.key, &self.owner, request) {
            return false; // granted already; its grant is on the way
        }
        if let Some(pending) = self.waits.remove(&request) {
            if let Some(timer) = pending.timer {
                self.timers.remove(&timer);
            }
            self.left_wait(request, &pending);
        }
        let msg = format!("wait cancelled by request {by}");
        self.side_answers.push((request, Err(Error::Timeout(msg))));
        true
    }

    fn describe(&self, key: &Key) -> Result<Reply, Error> {
        key.validate().map_err(invalid)?;
        self.authorize(&key.namespace)?;
        let max_frame = self.config.limits.max_frame;
        Ok(Reply::Described(self.engine.describe(key, max_frame)))
    }

    fn list(&self, query: &ListQuery) -> Result<Reply, Error> {
        if let Some(ns) = &query.namespace {
            lockd_protocol::key::validate_namespace(ns).map_err(invalid)?;
            self.authorize(ns)?;
        }
        let (authz, o) = (&self.config.authz, &self.owner);
        let visible = |ns: &str| authz.may_use(ns, o.uid, &o.groups);
        let max_frame = self.config.limits.max_frame;
        Ok(Reply::Listed(self.engine.list(query, visible, max_frame)))
    }

    /// Ends every hold on `key`: root only (configured admins come with the config file).
    fn force_release(&mut self, key: &Key) -> Answer {
        if let Err(e) = key.validate() {
            return Answer::Now(Err(invalid(e)));
        }
        if !self.owner.is_admin() {
            return Answer::Now(Err(Error::force_release_denied(self.owner.uid)));
        }
        tracing::warn!(key = %key, "force-release by {}", self.owner.describe());
        self.engine.force_release(key)
    }

    fn watch(&mut self, key: Key) -> Result<Reply, Error> {
        key.validate().map_err(invalid)?;
        self.authorize(&key.namespace)?;
        let max = self.config.limits.max_watches_per_conn;
        if !self.watching.contains(&key) && self.watching.len() >= max {
            return Err(Error::LimitExceeded(format!(
                "this connection already watches {max} keys, the limit"
            )));
        }
        self.engine.locks.watch(&key, &self.owner);
        self.watching.insert(key);
        Ok(Reply::Watching)
    }

    fn unwatch(&mut self, key: &Key) -> bool {
        self.watching.remove(key);
        self.engine.locks.unwatch(key, &self.owner)
    }
}

fn invalid(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(e.to_string())
}
