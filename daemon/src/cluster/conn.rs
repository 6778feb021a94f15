//! One connection on the etcd backend. The session calls it exactly as it calls the local
//! engine's `Conn`; each request that needs etcd runs as a task of its own and answers through
//! the connection's mailbox (`Push::Reply`), so a slow cluster never blocks the socket.
//!
//! Invariants:
//! - a request id is in use from `handle` until its answer is pushed (`ConnShared::reply`);
//! - a hold is in `State::holds` only while its entry is in etcd as far as this daemon knows;
//!   whoever removes it from there (release, expiry, the deletion watch, a lost session)
//!   deletes the entry or reports `HoldLost`, never neither;
//! - dropping the `Conn` (the disconnect) cancels its waits (each deletes its own entry) and
//!   deletes its holds' entries; detached leases stay.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use foldhash::{HashMap, HashSet};
use lockd_protocol::{Event, Key, LostReason, Mode, Op, Reply, RequestId, Ticket, Wait};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::batch::Owed;
use super::index::Token;
use super::Cluster;
use crate::config::Config;
use crate::engine::{Answer, Outgoing};
use crate::error::Error;
use crate::peer::{Owner, Push};

/// A hold of this connection.
pub(crate) struct Hold {
    pub key: Key,
    pub etcd_key: Vec<u8>,
    /// Its entry in the index.
    pub token: Token,
    /// The entry's creation revision.
    pub fence: u64,
    pub generation: u64,
    /// A session hold with a lease: when it ends unless renewed.
    pub lease: Option<Arc<LeaseClock>>,
}

impl Hold {
    /// The deletion of its entry, owed once the hold ends.
    pub fn owed(self) -> Owed {
        Owed {
            etcd_key: self.etcd_key,
            generation: self.generation,
            token: self.token,
            created: Some(self.fence as i64),
        }
    }
}

/// The end of a session hold's lease (kept by this daemon; the entry is on the session lease).
pub(crate) struct LeaseClock {
    pub length: Mutex<Duration>,
    pub deadline: Mutex<Instant>,
    /// Cancelled when the hold ends otherwise (its expiry task stops).
    pub ended: CancellationToken,
}

/// A waiting acquire: cancelled by `Cancel` or the disconnect; `finished` once it answered.
pub(crate) struct Waiting {
    pub cancel: CancellationToken,
    pub finished: CancellationToken,
}

#[derive(Default)]
pub(crate) struct State {
    pub holds: HashMap<Ticket, Hold>,
    pub waits: HashMap<RequestId, Waiting>,
    pub in_use: HashSet<RequestId>,
    pub watches: HashMap<Key, CancellationToken>,
    pub closed: bool,
}

/// What the connection's tasks share with it.
pub(crate) struct ConnShared {
    pub owner: Owner,
    state: Mutex<State>,
}

impl ConnShared {
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers request `id` (its id is free again).
    pub fn reply(&self, id: RequestId, result: Result<Reply, Error>) {
        self.state().in_use.remove(&id);
        self.owner.push(Push::Reply {
            request: id,
            result,
        });
    }

    /// A hold ended other than by this connection's release: forget it and say so.
    pub fn lost(&self, ticket: &Ticket, key: Key, fence: u64, reason: LostReason) {
        let removed = self.state().holds.remove(ticket);
        if let Some(hold) = removed {
            if let Some(clock) = &hold.lease {
                clock.ended.cancel();
            }
            self.owner.push(Push::Lost { key, fence, reason });
        }
    }
}

/// One connection on the etcd backend.
pub struct Conn {
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) shared: Arc<ConnShared>,
    pub(crate) config: Arc<Config>,
    /// Tickets drawn from the OS in batches (one syscall per 32 acquires, as on the local
    /// backend).
    tickets: crate::tickets::TicketPool,
}

impl Conn {
    pub fn new(cluster: Arc<Cluster>, owner: Owner, config: Arc<Config>) -> Conn {
        Conn {
            cluster,
            shared: Arc::new(ConnShared {
                owner,
                state: Mutex::new(State::default()),
            }),
            config,
            tickets: crate::tickets::TicketPool::default(),
        }
    }

    /// A ticket for the next hold (a capability: never logged).
    fn ticket(&mut self) -> Result<Ticket, Error> {
        self.tickets.draw().map_err(|e| {
            tracing::error!("the OS random source failed: {e}");
            Error::Internal("the daemon could not draw a ticket from the OS random source".into())
        })
    }

    pub fn owner(&self) -> &Owner {
        &self.shared.owner
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub fn set_config(&mut self, config: Arc<Config>) {
        let o = &self.shared.owner;
        o.admin.store(
            config.authz.is_admin(o.uid, &o.groups),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.config = config;
    }

    /// Handles one request: checks now, etcd in a task of its own.
    pub fn handle(&mut self, id: RequestId, op: Op) -> Answer {
        {
            let mut state = self.shared.state();
            // Each request in flight is a task: bounded per connection, like its waits.
            let max = self.config.limits.max_waits_per_conn;
            if state.in_use.len() >= max {
                return Answer::Now(Err(Error::LimitExceeded(format!(
                    "this connection already has {max} requests in flight, the limit; wait for answers"
                ))));
            }
            if !state.in_use.insert(id) {
                return Answer::Now(Err(Error::InvalidArgument(format!(
                    "request id {id} is still in use by an unanswered request of this connection; \
                     use a new id per request"
                ))));
            }
        }
        // Err: the answer now. Ok: a task answers.
        let checked: Result<(), Result<Reply, Error>> = match op {
            Op::Ping => Err(Ok(Reply::Pong)),
            Op::Acquire(a) => match self.check_acquire(&a).and_then(|l| Ok((l, self.ticket()?))) {
                Ok((lease, ticket)) => {
                    self.spawn_acquire(id, a, lease, ticket);
                    Ok(())
                }
                Err(e) => Err(Err(e)),
            },
            Op::Release { ticket } => match self.release_session_hold(&ticket) {
                true => Err(Ok(Reply::Released)),
                false => {
                    // A detached lease's ticket, perhaps of another connection or host.
                    self.spawn(id, move |c, s| async move { c.release(&s, ticket).await });
                    Ok(())
                }
            },
            Op::Renew { ticket, lease_ms } => match lease_ms.map(|ms| self.check_lease(ms)) {
                Some(Err(e)) => Err(Err(e)),
                length => {
                    let length = length.and_then(Result::ok);
                    self.spawn(
                        id,
                        move |c, s| async move { c.renew(&s, ticket, length).await },
                    );
                    Ok(())
                }
            },
            Op::Cancel { request } => {
                self.cancel(id, request);
                Ok(())
            }
            Op::Describe { key } => self
                .check_key(&key)
                .map(|()| {
                    let max = self.config.limits.max_frame;
                    self.spawn(id, move |c, _| async move { c.describe(&key, max).await })
                })
                .map_err(Err),
            Op::List(query) => {
                let config = Arc::clone(&self.config);
                self.spawn(id, move |c, s| async move {
                    c.list(&s.owner, &config, &query).await
                });
                Ok(())
            }
            Op::ForceRelease { key } => self
                .check_force(&key)
                .map(|()| {
                    tracing::warn!(key = %key, "force-release by {}", self.owner().describe());
                    self.spawn(id, move |c, _| async move { c.force_release(&key).await })
                })
                .map_err(Err),
            Op::Watch { key } => self.watch(id, key).map_err(Err),
            Op::Unwatch { key } => {
                let had = self.shared.state().watches.remove(&key);
                if let Some(stop) = &had {
                    stop.cancel();
                }
                Err(Ok(Reply::Unwatched(had.is_some())))
            }
            Op::Stats => Err(Err(Error::Internal(
                "stats are answered by the session".into(),
            ))),
        };
        match checked {
            Ok(()) => Answer::Queued,
            Err(now) => {
                self.shared.state().in_use.remove(&id);
                Answer::Now(now)
            }
        }
    }

    /// Ends a session hold of this connection: acknowledged at once, its entry deleted by the
    /// background deleter (batched with other deletions; retried until done or the session
    /// lease is gone). Nobody else is granted the key before the deletion is in etcd, so the
    /// early answer can only make others wait, never overlap. False if `ticket` is not one.
    fn release_session_hold(&self, ticket: &Ticket) -> bool {
        let removed = self.shared.state().holds.remove(ticket);
        let Some(h) = removed else {
            return false;
        };
        if let Some(clock) = &h.lease {
            clock.ended.cancel();
        }
        self.cluster.give_up(h.owed());
        super::Counters::inc(&self.cluster.counters.releases);
        true
    }

    /// Statistics: the session's `base` with the cluster's lock table in it.
    pub fn stats(&mut self, id: RequestId, base: lockd_protocol::Stats) -> Answer {
        if !self.shared.state().in_use.insert(id) {
            return Answer::Now(Err(Error::InvalidArgument(format!(
                "request id {id} is still in use by an unanswered request of this connection; \
                 use a new id per request"
            ))));
        }
        self.spawn(id, move |c, _| async move { c.stats(base).await });
        Answer::Queued
    }

    /// Runs `work` as a task; its result answers request `id`.
    fn spawn<F, Fut>(&self, id: RequestId, work: F)
    where
        F: FnOnce(Arc<Cluster>, Arc<ConnShared>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<Reply, Error>> + Send + 'static,
    {
        let (cluster, shared) = (Arc::clone(&self.cluster), Arc::clone(&self.shared));
        tokio::spawn(async move {
            let result = work(cluster, Arc::clone(&shared)).await;
            shared.reply(id, result);
        });
    }

    fn spawn_acquire(
        &self,
        id: RequestId,
        a: lockd_protocol::Acquire,
        lease: Option<Duration>,
        ticket: Ticket,
    ) {
        let waiting = !matches!(a.wait, Wait::No | Wait::Millis(0));
        let finished = CancellationToken::new();
        let cancel = CancellationToken::new();
        if waiting {
            self.shared.state().waits.insert(
                id,
                Waiting {
                    cancel: cancel.clone(),
                    finished: finished.clone(),
                },
            );
        }
        let (cluster, shared) = (Arc::clone(&self.cluster), Arc::clone(&self.shared));
        tokio::spawn(async move {
            let result = super::acquire::run(&cluster, &shared, id, a, lease, ticket, cancel).await;
            shared.state().waits.remove(&id);
            shared.reply(id, result);
            finished.cancel();
        });
    }

    /// Withdraws waiting acquire `request`: it answers `Timeout` first, then the cancel
    /// answers `Cancelled(true)` (`false` if it was not waiting).
    fn cancel(&self, id: RequestId, request: RequestId) {
        let waiting = self
            .shared
            .state()
            .waits
            .get(&request)
            .map(|w| (w.cancel.clone(), w.finished.clone()));
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let withdrawn = match waiting {
                Some((cancel, finished)) => {
                    cancel.cancel();
                    finished.cancelled().await;
                    true
                }
                None => false,
            };
            shared.reply(id, Ok(Reply::Cancelled(withdrawn)));
        });
    }

    fn check_key(&self, key: &Key) -> Result<(), Error> {
        key.validate()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.authorize(&key.namespace)
    }

    fn authorize(&self, namespace: &str) -> Result<(), Error> {
        let o = self.owner();
        self.config.authz.authorize(namespace, o.uid, &o.groups)
    }

    fn check_force(&self, key: &Key) -> Result<(), Error> {
        key.validate()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if !self.owner().is_admin() {
            return Err(Error::force_release_denied(self.owner().uid));
        }
        Ok(())
    }

    /// The checks of the local engine that apply here, and the refusals of what the cluster
    /// does not do. Returns the lease length, if any.
    fn check_acquire(&self, a: &lockd_protocol::Acquire) -> Result<Option<Duration>, Error> {
        self.check_key(&a.key)?;
        let limits = &self.config.limits;
        limits.check_data(a.data.len())?;
        if a.permits.is_some() {
            return Err(Error::InvalidArgument(
                "counting semaphores (permits) are not available on the etcd backend; \
                 use plain locks, or a local lockd"
                    .into(),
            ));
        }
        if a.lock_delay_ms > 0 {
            return Err(Error::InvalidArgument(
                "lock-delay is not available on the etcd backend; acquire without it".into(),
            ));
        }
        let lease = match (a.lease_ms, a.detach) {
            (None, true) => {
                return Err(Error::InvalidArgument(
                    "a detached hold needs a lease: set lease_ms".into(),
                ))
            }
            (None, false) => None,
            (Some(ms), _) => Some(self.check_lease(ms)?),
        };
        let state = self.shared.state();
        if state.holds.len() >= limits.max_holds_per_conn {
            return Err(Error::LimitExceeded(format!(
                "this connection already has {} holds, the limit; release some first",
                state.holds.len()
            )));
        }
        if a.wait != Wait::No && state.waits.len() >= limits.max_waits_per_conn {
            return Err(Error::LimitExceeded(format!(
                "this connection already has {} waiting acquires, the limit",
                state.waits.len()
            )));
        }
        Ok(lease)
    }

    fn check_lease(&self, ms: u64) -> Result<Duration, Error> {
        self.config.limits.check_lease(ms)
    }

    /// Starts watching `key`; the watch task answers `Watching` once it has read the key's
    /// holders, so every change after the answer is reported.
    fn watch(&mut self, id: RequestId, key: Key) -> Result<(), Error> {
        key.validate()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.authorize(&key.namespace)?;
        let max = self.config.limits.max_watches_per_conn;
        let mut state = self.shared.state();
        if let Some(old) = state.watches.remove(&key) {
            // Watching again restarts the watch (and answers once it is in place).
            old.cancel();
        }
        if state.watches.len() >= max {
            return Err(Error::LimitExceeded(format!(
                "this connection already watches {max} keys, the limit"
            )));
        }
        let stop = CancellationToken::new();
        state.watches.insert(key.clone(), stop.clone());
        drop(state);
        tokio::spawn(super::watch::key(
            Arc::clone(&self.cluster),
            key,
            Arc::clone(&self.shared),
            id,
            stop,
        ));
        Ok(())
    }

    /// No timers of its own: waits time out in their tasks.
    pub fn has_timers(&self) -> bool {
        false
    }

    pub async fn next_timeout(&mut self) -> Option<RequestId> {
        std::future::pending().await
    }

    pub fn on_timeout(&mut self, _request: RequestId) -> Outgoing {
        Outgoing::Nothing
    }

    pub fn take_side_answers(&mut self) -> Vec<(RequestId, Result<Reply, Error>)> {
        Vec::new()
    }

    pub fn on_push(&mut self, push: Push) -> Outgoing {
        match push {
            Push::Reply { request, result } => Outgoing::Answer(request, Answer::Now(result)),
            Push::Lost { key, fence, reason } => {
                Outgoing::Event(Event::HoldLost { key, fence, reason })
            }
            Push::Watch { key, change } => {
                self.owner().event_taken();
                Outgoing::Event(Event::Watch { key, change })
            }
            Push::Granted { .. } | Push::Shutdown => Outgoing::Nothing,
        }
    }

    pub fn written(&mut self, _request: RequestId) {}

    pub fn sync_usage(&mut self, _exact: bool) {}

    /// Ends the connection: waits withdraw (their tasks delete their entries), holds' entries
    /// are deleted, watches stop.
    fn disconnect(&mut self) -> usize {
        let mut state = self.shared.state();
        state.closed = true;
        for (_, w) in state.waits.drain() {
            w.cancel.cancel();
        }
        for (_, stop) in state.watches.drain() {
            stop.cancel();
        }
        let holds: Vec<Hold> = state.holds.drain().map(|(_, h)| h).collect();
        drop(state);
        let n = holds.len();
        for h in holds {
            if let Some(clock) = &h.lease {
                clock.ended.cancel();
            }
            self.cluster.give_up(h.owed());
            super::Counters::inc(&self.cluster.counters.disconnect_releases);
        }
        n
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let ended = self.disconnect();
        tracing::debug!(
            conn = self.owner().id,
            ended,
            "disconnected: {}",
            self.owner().describe()
        );
    }
}

/// Mode names for messages.
pub(crate) fn mode_word(mode: Mode) -> &'static str {
    match mode {
        Mode::Exclusive => "exclusively",
        Mode::Shared => "shared",
    }
}
