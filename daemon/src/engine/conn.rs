//! What the engine tracks for one connection: its holds, waits, wait timers, watches and
//! unanswered commits, and what happens when it ends (dropping a [`Conn`] is the disconnect).

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use foldhash::{HashMap, HashMapExt};
use futures_util::StreamExt;
use lockd_protocol::{Event, Key, Reply, RequestId, Ticket};
use tokio_util::time::{delay_queue, DelayQueue};

use super::leases::LeaseSpec;
use super::lockspace::{Ended, HoldAt};
use super::{Answer, Engine};
use crate::config::Config;
use crate::error::Error;
use crate::peer::{Owner, Push};
use crate::tickets::TicketPool;
use crate::usage::UidUsage;

/// How far a connection's holds or waits may drift from what its uid's shared counts say
/// before they are synced: per-uid limits may overshoot by this much per connection.
const USAGE_SLACK: usize = 8;

/// A hold bound to this connection, by ticket: where it is in the table. The key itself is
/// only in the table (a connection finds its hold by the key's hash and the fence).
pub(super) struct Held {
    pub at: HoldAt,
}

/// A queued acquire of this connection, by request id.
pub(super) struct Pending {
    pub key: Key,
    /// `None` for `wait = forever`, or once the timer has fired.
    pub timer: Option<delay_queue::Key>,
    pub waited: Option<Duration>,
    pub lease: Option<LeaseSpec>,
    pub minted: Minted,
    /// Its place in deadlock detection.
    pub tracked: Tracked,
}

/// A wait's place in deadlock detection (see `deadlock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tracked {
    /// Registered with the detector.
    Registered,
    /// A lone wait of a connection holding nothing: registered once the connection takes a
    /// hold or another wait.
    Unregistered,
    /// A wait on a counting semaphore: never searched.
    Never,
}

/// The ticket of a hold-to-be, and the lease end that describe shows for it.
pub(super) struct Minted {
    pub ticket: Ticket,
    pub shown_expiry: Option<Arc<AtomicU64>>,
}

/// A detached grant whose answer waits for its commit: if the connection closes first, nobody
/// will ever learn its ticket, so it is taken back.
pub(super) struct Unanswered {
    pub key: Key,
    pub ticket: Ticket,
    pub fence: u64,
}

/// What the connection's task sends after a push or a timer.
pub enum Outgoing {
    /// Answer request `.0`.
    Answer(RequestId, Answer),
    /// The answer of request `.0`, computed after its commit: once it is written to the socket,
    /// say so with [`Conn::written`] (until then a detached grant is taken back if the
    /// connection ends).
    Committed(RequestId, Result<Reply, Error>),
    /// Send this event.
    Event(Event),
    /// Nothing to send.
    Nothing,
}

/// One connection as the engine sees it.
pub struct Conn {
    pub(super) engine: Arc<Engine>,
    pub(super) owner: Owner,
    pub(super) holds: HashMap<Ticket, Held>,
    /// The holds that are also registered in the leases (session holds with a lease).
    pub(super) leased: HashSet<Ticket>,
    pub(super) waits: HashMap<RequestId, Pending>,
    pub(super) timers: DelayQueue<RequestId>,
    pub(super) tickets: TicketPool,
    /// Keys this connection watches.
    pub(super) watching: HashSet<Key>,
    /// Requests whose answer waits for a store commit; `Some` for detached grants.
    pub(super) in_flight: HashMap<RequestId, Option<Unanswered>>,
    /// Answers to other requests produced while handling one (a cancel answers the wait it
    /// withdrew): taken by [`Conn::take_side_answers`].
    pub(super) side_answers: Vec<(RequestId, Result<Reply, Error>)>,
    /// How many waits are [`Tracked::Unregistered`] (0 or 1).
    pub(super) unregistered: usize,
    /// A detached grant was made to this connection (it may hold keys it does not track).
    pub(super) had_detached: bool,
    /// The configuration this connection applies (authorization, limits).
    pub(super) config: Arc<Config>,
    /// This uid's usage, and the (holds, waits) this connection last added to it.
    pub(super) usage: Arc<UidUsage>,
    counted: (usize, usize),
}

impl Conn {
    /// A new connection of `owner`, applying `config`.
    pub fn new(engine: Arc<Engine>, owner: Owner, config: Arc<Config>) -> Conn {
        let usage = engine.usage.of(owner.uid);
        Conn {
            engine,
            owner,
            holds: HashMap::new(),
            leased: HashSet::new(),
            waits: HashMap::new(),
            timers: DelayQueue::new(),
            tickets: TicketPool::default(),
            watching: HashSet::new(),
            in_flight: HashMap::new(),
            side_answers: Vec::new(),
            unregistered: 0,
            had_detached: false,
            config,
            usage,
            counted: (0, 0),
        }
    }

    /// The connection's identity and mailbox.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// The configuration this connection applies.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Applies a reloaded configuration from the next request on (nothing is dropped).
    pub fn set_config(&mut self, config: Arc<Config>) {
        let o = &self.owner;
        o.admin.store(
            config.authz.is_admin(o.uid, &o.groups),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.config = config;
    }

    /// Answers produced for other requests by the last call (a cancelled wait's `Timeout`).
    pub fn take_side_answers(&mut self) -> Vec<(RequestId, Result<Reply, Error>)> {
        std::mem::take(&mut self.side_answers)
    }

    /// True while a wait timer is armed (poll [`Conn::next_timeout`] only then).
    pub fn has_timers(&self) -> bool {
        !self.timers.is_empty()
    }

    /// The next waiting acquire whose time ran out; pending forever without timers.
    pub async fn next_timeout(&mut self) -> Option<RequestId> {
        self.timers.next().await.map(|e| e.into_inner())
    }

    /// A wait timer fired: withdraw the acquire (answer `Timeout`) unless it was granted in
    /// the meantime (the grant wins; it is on its way through the mailbox).
    pub fn on_timeout(&mut self, request: RequestId) -> Outgoing {
        let Some(pending) = self.waits.get_mut(&request) else {
            return Outgoing::Nothing;
        };
        pending.timer = None;
        if !self.engine.locks.cancel(&pending.key, &self.owner, request) {
            return Outgoing::Nothing;
        }
        let Some(pending) = self.waits.remove(&request) else {
            return Outgoing::Nothing;
        };
        self.left_wait(request, &pending);
        self.engine.locks.count_timeout(&pending.key);
        let waited = pending.waited.unwrap_or_default();
        let msg = format!("{} not acquired within {waited:?}", pending.key);
        Outgoing::Answer(request, Answer::Now(Err(Error::Timeout(msg))))
    }

    /// Handles a message from another task.
    pub fn on_push(&mut self, push: Push) -> Outgoing {
        match push {
            Push::Granted {
                request,
                fence,
                mode,
            } => {
                let Some(pending) = self.waits.remove(&request) else {
                    tracing::error!(conn = self.owner.id, request, "grant for an unknown wait");
                    return Outgoing::Nothing;
                };
                if let Some(timer) = pending.timer {
                    self.timers.remove(&timer);
                }
                self.left_wait(request, &pending);
                let at = self.engine.locks.hold_at(&pending.key, fence);
                let answer = self.granted(
                    request,
                    pending.key,
                    at,
                    mode,
                    pending.lease,
                    pending.minted,
                );
                Outgoing::Answer(request, answer)
            }
            Push::Watch { key, change } => {
                self.owner.event_taken();
                Outgoing::Event(Event::Watch { key, change })
            }
            Push::Lost { key, fence, reason } => {
                let (engine, leased) = (&self.engine, &mut self.leased);
                self.holds.retain(|ticket, h| {
                    let lost = h.at.fence == fence;
                    if lost && leased.remove(ticket) {
                        // Already ended by whoever ended the hold; forgetting also covers a
                        // lease registered after a force-release that could not find it.
                        engine.leases.forget(ticket);
                    }
                    !lost
                });
                Outgoing::Event(Event::HoldLost { key, fence, reason })
            }
            Push::Reply { request, result } => Outgoing::Committed(request, result),
            Push::Shutdown => Outgoing::Nothing,
        }
    }

    /// Bookkeeping for a wait that left `waits` (granted, withdrawn, refused, disconnected).
    pub(super) fn left_wait(&mut self, request: RequestId, pending: &Pending) {
        match pending.tracked {
            Tracked::Registered => self.engine.deadlocks.unregister(&self.owner, request),
            Tracked::Unregistered => self.unregistered = self.unregistered.saturating_sub(1),
            Tracked::Never => {}
        }
    }

    /// Registers the waits deadlock detection skipped, once the connection may be on a cycle
    /// (it is about to take a hold or another wait).
    pub(super) fn register_waits(&mut self) {
        for (request, pending) in self.waits.iter_mut() {
            if pending.tracked == Tracked::Unregistered {
                self.engine
                    .deadlocks
                    .register(&self.owner, *request, &pending.key);
                pending.tracked = Tracked::Registered;
            }
        }
        self.unregistered = 0;
    }

    /// The answer to `request` (an [`Outgoing::Committed`]) reached the socket: its id is free
    /// again, and a detached grant it announced is the client's.
    pub fn written(&mut self, request: RequestId) {
        self.in_flight.remove(&request);
    }

    /// Brings this uid's hold and wait counts up to date with this connection's once they
    /// drift by [`USAGE_SLACK`] (so a lock/unlock loop touches no shared counter), and always
    /// when `exact`.
    pub fn sync_usage(&mut self, exact: bool) {
        let now = (self.holds.len(), self.waits.len());
        let drift = now
            .0
            .abs_diff(self.counted.0)
            .max(now.1.abs_diff(self.counted.1));
        if drift == 0 || (!exact && drift < USAGE_SLACK) {
            return;
        }
        UidUsage::adjust(&self.usage.holds, self.counted.0, now.0);
        UidUsage::adjust(&self.usage.waits, self.counted.1, now.1);
        self.counted = now;
    }

    /// Releases every session hold and waiter of the connection, its watches, and the
    /// detached grants it was never told of (invariant 1). Waits go first, so a hold released
    /// below is never handed to this dying connection's own waiter. Detached leases stay.
    /// Returns how many holds ended.
    fn disconnect(&mut self) -> usize {
        let mut ended = 0;
        // Also catches grants that were made but not yet delivered to this connection.
        let waits: Vec<_> = self.waits.drain().collect();
        for (request, pending) in waits {
            self.left_wait(request, &pending);
            let locks = &self.engine.locks;
            ended += locks.remove_owner(&pending.key, &self.owner);
            // A detached grant made for this request survives remove_owner, but nobody will
            // ever learn its ticket: end it.
            if pending.lease.as_ref().is_some_and(|l| l.detached) {
                ended += locks.abandon_detached(&pending.key, &self.owner, request);
            }
        }
        let locks = &self.engine.locks;
        for ticket in self.leased.drain() {
            self.engine.leases.forget(&ticket);
        }
        for (_, held) in self.holds.drain() {
            ended += locks.remove_owner_at(held.at, &self.owner);
        }
        for key in self.watching.drain() {
            locks.unwatch(&key, &self.owner);
        }
        for (_, grant) in self.in_flight.drain() {
            let Some(g) = grant else { continue };
            if self.engine.leases.revoke(&g.ticket).is_some() {
                locks.release(&g.key, g.fence, Ended::Released);
                ended += 1;
            }
        }
        self.sync_usage(true);
        ended
    }
}

impl Drop for Conn {
    /// Runs on every exit path of the connection's task, panics included: no session hold
    /// outlives its connection.
    fn drop(&mut self) {
        let ended = self.disconnect();
        tracing::debug!(
            conn = self.owner.id,
            ended,
            "disconnected: {}",
            self.owner.describe()
        );
    }
}
