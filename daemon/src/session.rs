//! One client connection: handshake, requests, grants pushed by other connections, wait
//! timeouts, and release of everything the connection held when it ends.
//!
//! Architecture invariants:
//! - the connection's socket belongs to this task alone; others reach it through [`Push`];
//! - responses produced while handling one wake-up are written with one `write` call;
//! - when the task ends, for whatever reason, every session hold and waiter of the connection
//!   is removed from the lock table before its mailbox is dropped;
//! - a waiting acquire leaves `waits` only when the table confirmed it is no longer queued
//!   (cancel succeeded) or its grant arrived, so no grant is ever lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use foldhash::{HashMap, HashMapExt};
use futures_util::StreamExt;
use lockd_protocol::{
    Acquire, ClientMessage, ErrorCode, Event, Grant, Hello, Key, ListQuery, LostReason, Mode, Op,
    Reply, Request, RequestId, Response, ServerCodec, ServerMessage, Stats, Ticket, Wait, Welcome,
    WireError, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;
use tokio_util::time::{delay_queue, DelayQueue};

use crate::auth;
use crate::clock;
use crate::config::DEFAULT_WRITE_TIMEOUT;
use crate::config::{Config, ConfigCell};
use crate::lease::{Lease, LeaseSpec, Leases, Release, TicketError};
use crate::lockspace::{AcquireOutcome, Ended, HoldMeta, LockSpace};
use crate::peer::{AfterCommit, Owner, Peer, Push};
use crate::stats::Global;
use crate::store::{self, Done};
use crate::tickets::TicketPool;
use crate::usage::{HoldShare, Registry, UidUsage};

/// State shared by every connection.
pub struct Shared {
    pub locks: Arc<LockSpace>,
    pub leases: Arc<Leases>,
    pub usage: Arc<Registry>,
    /// The current configuration; replaced on reload (SIGHUP).
    pub config: ConfigCell,
    pub shutdown: CancellationToken,
    pub global: Global,
    /// Live sessions, so shutdown can reach them through their mailboxes (connect and
    /// disconnect only: never on the request path).
    sessions: std::sync::Mutex<HashMap<u64, Owner>>,
    started: std::time::Instant,
    next_conn: AtomicU64,
}

impl Shared {
    pub fn new(
        locks: Arc<LockSpace>,
        leases: Arc<Leases>,
        usage: Arc<Registry>,
        config: Config,
        shutdown: CancellationToken,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            locks,
            leases,
            usage,
            config: ConfigCell::new(config),
            shutdown,
            global: Global::default(),
            sessions: std::sync::Mutex::new(HashMap::new()),
            started: std::time::Instant::now(),
            next_conn: AtomicU64::new(1),
        })
    }

    /// Tells every live session to say `ShuttingDown` and close.
    pub fn stop_sessions(&self) {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        for owner in sessions.values() {
            owner.push(Push::Shutdown);
        }
    }

    fn register(&self, owner: &Owner) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.insert(owner.id, owner.clone());
    }

    fn unregister(&self, id: u64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.remove(&id);
    }

    /// Counters, gauges and distributions, summed over the shards.
    pub fn snapshot(&self) -> Stats {
        let long_ms = self.config.get().long_hold.as_millis() as u64;
        let t = self.locks.totals(long_ms);
        let g = &self.global;
        let counters = [
            ("grants", t.stats.grants),
            ("conflicts", t.stats.conflicts),
            ("releases", t.stats.releases),
            ("timeouts", t.stats.timeouts),
            ("expiries", t.stats.expiries),
            ("disconnect_releases", t.stats.disconnect_releases),
            ("force_releases", t.stats.forced),
            ("deadlocks", 0),
            ("protocol_errors", Global::get(&g.protocol_errors)),
            ("connections_accepted", Global::get(&g.connections_total)),
            ("long_holds_warned", t.stats.long_holds_warned),
        ];
        let gauges = [
            ("connections", Global::get(&g.connections)),
            ("holds", t.holds),
            ("waiters", t.waiters),
            ("keys", t.keys),
            ("leases", self.leases.len() as u64),
            ("long_holds", t.long_holds),
            ("watches", t.watches),
        ];
        Stats {
            counters: counters.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
            gauges: gauges.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
            wait_ms: t.stats.wait_ms.to_wire(),
            hold_ms: t.stats.hold_ms.to_wire(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

/// How far a connection's holds or waits may drift from what its uid's shared counts say
/// before they are synced: per-uid limits may overshoot by this much per connection.
const USAGE_SLACK: usize = 8;

/// Timed waits longer than this (a year, in milliseconds) are treated as waiting forever.
pub const MAX_TIMED_WAIT_MS: u64 = 365 * 24 * 3600 * 1000;
/// Read buffer growth step, bytes.
const READ_CHUNK: usize = 8 * 1024;
/// Stop handling requests while this many bytes of answers wait to be written.
const OUT_CAP: usize = 256 * 1024;
/// Output buffers larger than this are freed after a flush, bytes.
const OUT_KEEP: usize = 64 * 1024;

/// Serves one accepted connection until it closes or the daemon shuts down.
pub async fn serve(stream: UnixStream, shared: Arc<Shared>) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("dropping a connection whose peer credentials are unreadable: {e}");
            return;
        }
    };
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    // Generation first: a reload after this read is picked up at the first wake-up.
    let generation = shared.config.generation();
    let config = shared.config.get();
    // Groups from the kernel at connect time (SO_PEERGROUPS), not from /proc later, when the
    // pid may already belong to another process.
    let groups = auth::socket_peer_groups(&stream, cred.gid());
    let max_frame = config.limits.max_frame;
    let mut conn = Wire {
        stream,
        codec: ServerCodec::new(max_frame),
        inbuf: BytesMut::with_capacity(READ_CHUNK),
        out: BytesMut::with_capacity(READ_CHUNK),
    };
    let who = format!(
        "pid {} uid {}",
        cred.pid().map_or_else(|| "?".into(), |p| p.to_string()),
        cred.uid()
    );
    let usage = shared.usage.of(cred.uid());
    let max_per_uid = config.limits.max_connections_per_uid;
    // Counted from accept on (the uid is known from the kernel before any Hello), so a uid
    // cannot fill the daemon with connections that never say Hello; the guard gives the slot
    // back on every exit path.
    let slot = ConnectionSlot::take(Arc::clone(&usage));
    if slot.others >= max_per_uid {
        tracing::warn!(
            "refusing a connection of {who}: {max_per_uid} connections of its uid are open"
        );
        let msg = format!(
            "uid {} already has {max_per_uid} connections, the limit",
            cred.uid()
        );
        conn.send(ServerMessage::Rejected(WireError::new(
            ErrorCode::LimitExceeded,
            msg,
        )));
        let _ = conn.flush().await;
        return;
    }
    let hello = match conn.handshake(config.limits.handshake_timeout).await {
        Ok(hello) => hello,
        Err(why) => {
            Global::inc(&shared.global.protocol_errors);
            tracing::warn!(conn = id, "handshake with {who} failed: {why}");
            return;
        }
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        let msg = format!(
            "this lockd speaks protocol version {PROTOCOL_VERSION}, the client {}; upgrade the older side",
            hello.protocol_version
        );
        conn.send(ServerMessage::Rejected(WireError::new(
            ErrorCode::VersionMismatch,
            msg,
        )));
        let _ = conn.flush().await;
        return;
    }
    let welcome = Welcome {
        protocol_version: PROTOCOL_VERSION,
        server_version: env!("CARGO_PKG_VERSION").to_string(),
        limits: config.limits.to_wire(),
    };
    conn.send(ServerMessage::Welcome(welcome));
    if conn.flush().await.is_err() {
        return;
    }
    let mut name = hello.client_name;
    truncate_utf8(&mut name, 256);
    let admin = config.authz.is_admin(cred.uid(), &groups);
    let (owner, push_rx) =
        Peer::open_with(id, cred.pid(), cred.uid(), cred.gid(), name, groups, admin);
    tracing::debug!(conn = id, "connected: {}", owner.describe());
    let mut session = Session {
        wire: conn,
        owner,
        push_rx,
        holds: HashMap::new(),
        waits: HashMap::new(),
        timers: DelayQueue::new(),
        tickets: TicketPool::default(),
        watching: std::collections::HashSet::new(),
        unanswered_grants: HashMap::new(),
        usage,
        _slot: slot,
        counted: (0, 0),
        generation,
        config,
        shared,
    };
    Global::inc(&session.shared.global.connections);
    session.shared.register(&session.owner);
    Global::inc(&session.shared.global.connections_total);
    session.run().await;
    // `Session`'s Drop releases everything the connection held, even if a bug panicked above.
}

/// One connection counted against its uid; given back when dropped.
struct ConnectionSlot {
    usage: Arc<UidUsage>,
    /// Connections of the uid before this one.
    others: usize,
}

impl ConnectionSlot {
    fn take(usage: Arc<UidUsage>) -> ConnectionSlot {
        let others = usage.connections.fetch_add(1, Ordering::Relaxed);
        ConnectionSlot { usage, others }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.usage.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The socket with its buffers and codec.
struct Wire {
    stream: UnixStream,
    codec: ServerCodec,
    inbuf: BytesMut,
    out: BytesMut,
}

impl Wire {
    async fn handshake(&mut self, limit: Duration) -> Result<Hello, String> {
        let read = async {
            loop {
                match self.codec.decode(&mut self.inbuf) {
                    Ok(Some(ClientMessage::Hello(hello))) => return Ok(hello),
                    Ok(Some(ClientMessage::Request(_))) => {
                        return Err("the first message must be Hello".to_string())
                    }
                    Ok(None) => {}
                    Err(e) => return Err(e.to_string()),
                }
                self.inbuf.reserve(READ_CHUNK);
                match self.stream.read_buf(&mut self.inbuf).await {
                    Ok(0) => return Err("closed before Hello".into()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        let result = match tokio::time::timeout(limit, read).await {
            Ok(r) => r,
            Err(_) => Err(format!("no Hello within {limit:?}")),
        };
        if let Err(why) = &result {
            self.send(ServerMessage::Rejected(WireError::new(
                ErrorCode::Protocol,
                why,
            )));
            let _ = self.flush().await;
        }
        result
    }

    /// Queues a message for the next flush.
    fn send(&mut self, msg: ServerMessage) {
        if let Err(e) = self.codec.encode(msg, &mut self.out) {
            tracing::error!("cannot encode a response: {e}");
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.flush_within(DEFAULT_WRITE_TIMEOUT).await
    }

    /// Writes the output buffer; fails with `TimedOut` if the peer does not take it within
    /// `limit` (it is not reading its responses).
    async fn flush_within(&mut self, limit: Duration) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        // Fast path: the socket takes everything now, and no timer is armed.
        let mut written = 0;
        while written < self.out.len() {
            match self.stream.try_write(&self.out[written..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let r = if written == self.out.len() {
            Ok(())
        } else {
            let rest = &self.out[written..];
            match tokio::time::timeout(limit, self.stream.write_all(rest)).await {
                Ok(r) => r,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client does not read its responses",
                )),
            }
        };
        if self.out.capacity() > OUT_KEEP {
            self.out = BytesMut::with_capacity(READ_CHUNK);
        } else {
            self.out.clear();
        }
        r
    }
}

/// A hold bound to this connection, by ticket.
struct Held {
    key: Key,
    fence: u64,
    /// Also registered in [`Leases`] (a session hold with a lease).
    leased: bool,
}

/// A queued acquire of this connection, by request id.
struct Pending {
    key: Key,
    /// `None` for `wait = forever`, or once the timer has fired.
    timer: Option<delay_queue::Key>,
    waited: Option<Duration>,
    lease: Option<LeaseSpec>,
    minted: Minted,
}

/// The ticket of a hold-to-be, and the lease end that describe shows for it.
struct Minted {
    ticket: Ticket,
    shown_expiry: Option<Arc<AtomicU64>>,
}

struct Session {
    wire: Wire,
    owner: Owner,
    push_rx: mpsc::UnboundedReceiver<Push>,
    holds: HashMap<Ticket, Held>,
    waits: HashMap<RequestId, Pending>,
    timers: DelayQueue<RequestId>,
    tickets: TicketPool,
    /// Keys this connection watches.
    watching: std::collections::HashSet<Key>,
    /// The configuration this connection applies, refreshed when a reload bumps the
    /// generation (checked once per wake-up: one relaxed load of a rarely written word).
    config: Arc<Config>,
    generation: u64,
    /// This uid's usage, and the (holds, waits) this connection last added to it.
    usage: Arc<UidUsage>,
    /// This connection's place in its uid's connection count (returned when dropped).
    _slot: ConnectionSlot,
    counted: (usize, usize),
    /// Detached grants whose answer waits for a commit: if the connection closes first,
    /// nobody will ever learn their tickets, so they are taken back.
    unanswered_grants: HashMap<RequestId, (Key, Ticket, u64)>,
    shared: Arc<Shared>,
}

/// What [`Session::handle_frames`] stopped at.
enum Frames {
    /// Every complete frame was handled.
    Drained,
    /// The output buffer is full: write it, then handle the rest.
    Paused,
    /// A protocol error: close the connection.
    Close,
}

/// Why a session's loop ended.
enum End {
    Closed,
    Shutdown,
}

impl Session {
    async fn run(&mut self) {
        let end = self.serve_until_end().await;
        if matches!(end, End::Shutdown) {
            self.wire.send(ServerMessage::Event(Event::ShuttingDown));
            let _ = self.wire.flush().await;
        }
    }

    async fn serve_until_end(&mut self) -> End {
        // Shutdown arrives through the mailbox (`Push::Shutdown`): polling a cancellation
        // token on every wake-up would take a mutex per request.
        if self.shared.shutdown.is_cancelled() {
            return End::Shutdown;
        }
        loop {
            tokio::select! {
                biased;
                Some(push) = self.push_rx.recv() => {
                    if matches!(push, Push::Shutdown) {
                        return End::Shutdown;
                    }
                    self.on_push(push);
                    while let Ok(push) = self.push_rx.try_recv() {
                        if matches!(push, Push::Shutdown) {
                            return End::Shutdown;
                        }
                        self.on_push(push);
                    }
                }
                Some(expired) = self.timers.next(), if !self.timers.is_empty() => {
                    self.on_timeout(expired.into_inner());
                }
                read = read_more(&mut self.wire) => match read {
                    Ok(0) => {
                        if !self.wire.inbuf.is_empty() {
                            self.protocol_error("connection closed inside a frame");
                            let _ = self.wire.flush().await;
                        }
                        return End::Closed;
                    }
                    Ok(_) => {
                        self.refresh_config();
                        loop {
                            match self.handle_frames() {
                                Frames::Drained => break,
                                Frames::Close => {
                                    let _ = self.wire.flush().await;
                                    return End::Closed;
                                }
                                // Many answers are waiting: write them before reading on, so a
                                // client that never reads cannot make the daemon buffer more.
                                Frames::Paused => {
                                    let limit = self.config.limits.write_timeout;
                                    if self.wire.flush_within(limit).await.is_err() {
                                        return End::Closed;
                                    }
                                }
                            }
                        }
                    }
                    Err(_) => return End::Closed,
                },
            }
            self.sync_usage();
            self.refresh_config();
            let limit = self.config.limits.write_timeout;
            if let Err(e) = self.wire.flush_within(limit).await {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    tracing::warn!(
                        conn = self.owner.id,
                        "disconnecting {}: it has not read its responses for {limit:?}",
                        self.owner.describe()
                    );
                }
                return End::Closed;
            }
        }
    }

    /// Picks up a reloaded configuration (authorization, limits) without dropping anything.
    fn refresh_config(&mut self) {
        let generation = self.shared.config.generation();
        if generation != self.generation {
            self.generation = generation;
            self.config = self.shared.config.get();
            let o = &self.owner;
            o.admin.store(
                self.config.authz.is_admin(o.uid, &o.groups),
                Ordering::Relaxed,
            );
        }
    }

    /// Brings this uid's hold and wait counts up to date with this connection's once they
    /// drift by [`USAGE_SLACK`] (so a lock/unlock loop touches no shared counter), and always
    /// when `exact`.
    fn sync_usage_with(&mut self, exact: bool) {
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

    fn sync_usage(&mut self) {
        self.sync_usage_with(false);
    }

    /// PermissionDenied unless this peer may use `namespace`.
    fn authorize(&self, namespace: &str) -> Result<(), WireError> {
        let o = &self.owner;
        if self.config.authz.may_use(namespace, o.uid, &o.groups) {
            Ok(())
        } else {
            Err(WireError::new(
                ErrorCode::PermissionDenied,
                format!("uid {} may not use namespace {namespace:?}", o.uid),
            ))
        }
    }

    /// Handles every complete frame in the read buffer. False if the connection must close.
    fn handle_frames(&mut self) -> Frames {
        loop {
            if self.wire.out.len() >= OUT_CAP {
                return Frames::Paused;
            }
            match self.wire.codec.decode(&mut self.wire.inbuf) {
                Ok(Some(ClientMessage::Request(req))) => self.handle(req),
                Ok(Some(ClientMessage::Hello(_))) => {
                    self.protocol_error("Hello sent twice");
                    return Frames::Close;
                }
                Ok(None) => return Frames::Drained,
                Err(e) => {
                    self.protocol_error(&e.to_string());
                    return Frames::Close;
                }
            }
        }
    }

    fn protocol_error(&mut self, why: &str) {
        Global::inc(&self.shared.global.protocol_errors);
        tracing::warn!(
            conn = self.owner.id,
            "protocol error from {}: {why}; closing its connection",
            self.owner.describe()
        );
        self.wire.send(ServerMessage::Rejected(WireError::new(
            ErrorCode::Protocol,
            format!("{why}; closing the connection"),
        )));
    }

    fn respond(&mut self, id: RequestId, result: Result<Reply, WireError>) {
        let msg = ServerMessage::Response(Response { id, result });
        if let Err(e) = self.wire.codec.encode(msg, &mut self.wire.out) {
            // E.g. a describe larger than a frame: answer, never leave the request hanging.
            let result = Err(WireError::new(
                ErrorCode::LimitExceeded,
                format!("the answer does not fit in a frame ({e}); ask for less"),
            ));
            self.wire
                .send(ServerMessage::Response(Response { id, result }));
        }
    }

    fn handle(&mut self, req: Request) {
        let result = match req.op {
            Op::Acquire(acquire) => self.acquire(req.id, acquire),
            Op::Release { ticket } => self.release(req.id, &ticket),
            Op::Renew { ticket, lease_ms } => self.renew(req.id, &ticket, lease_ms),
            Op::Cancel { request } => Some(Ok(Reply::Cancelled(self.cancel(request, req.id)))),
            Op::Ping => Some(Ok(Reply::Pong)),
            Op::Describe { key } => Some(self.describe(&key)),
            Op::List(query) => Some(self.list(&query)),
            Op::ForceRelease { key } => self.force_release(req.id, &key),
            Op::Watch { key } => Some(self.watch(key)),
            Op::Unwatch { key } => Some(Ok(Reply::Unwatched(self.unwatch(&key)))),
            Op::Stats => Some(Ok(Reply::Stats(self.shared.snapshot()))),
        };
        if let Some(result) = result {
            self.respond(req.id, result);
        }
    }

    /// Answers at once, or returns `None` when the answer comes later (queued, or waiting for
    /// a store commit).
    fn acquire(&mut self, id: RequestId, mut a: Acquire) -> Option<Result<Reply, WireError>> {
        let lease = match self.check_acquire(id, &a) {
            Ok(lease) => lease,
            Err(e) => return Some(Err(e)),
        };
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
                return Some(Err(WireError::new(
                    ErrorCode::Internal,
                    "the daemon could not draw a ticket from the OS random source",
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
        let detached = lease.as_ref().is_some_and(|l| l.detached);
        let outcome = self.shared.locks.acquire(
            &a.key,
            &self.owner,
            id,
            a.mode,
            waited.is_some(),
            detached,
            meta,
        );
        match outcome {
            AcquireOutcome::Granted(fence) => self.granted(id, a.key, fence, a.mode, lease, minted),
            AcquireOutcome::Conflict(msg) => {
                self.tickets.put_back(ticket);
                Some(Err(WireError::new(ErrorCode::Conflict, msg)))
            }
            AcquireOutcome::Queued => {
                let waited = waited.flatten();
                let timer = waited.map(|d| self.timers.insert(id, d));
                self.waits.insert(
                    id,
                    Pending {
                        key: a.key,
                        timer,
                        waited,
                        lease,
                        minted,
                    },
                );
                None
            }
        }
    }

    /// Checks an acquire; returns its lease, if any.
    fn check_acquire(&self, id: RequestId, a: &Acquire) -> Result<Option<LeaseSpec>, WireError> {
        let invalid = |m: String| Err(WireError::new(ErrorCode::InvalidArgument, m));
        if let Err(e) = a.key.validate() {
            return invalid(e.to_string());
        }
        self.authorize(&a.key.namespace)?;
        let limits = &self.config.limits;
        if a.data.len() > limits.max_data {
            return invalid(format!(
                "data is {} bytes; the limit is {}",
                a.data.len(),
                limits.max_data
            ));
        }
        let lease = match (a.lease_ms, a.detach) {
            (None, true) => {
                return invalid("a detached hold needs a lease: set lease_ms".into());
            }
            (None, false) => None,
            (Some(ms), detached) => Some(LeaseSpec {
                length: self.check_lease(ms)?,
                detached,
                data: a.data.clone(),
            }),
        };
        if self.waits.contains_key(&id) {
            return invalid(format!(
                "request id {id} is already used by a waiting acquire"
            ));
        }
        if self.holds.len() >= limits.max_holds_per_conn {
            return Err(WireError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "this connection already has {} holds, the limit; release some first",
                    self.holds.len()
                ),
            ));
        }
        if UidUsage::get(&self.usage.holds) >= limits.max_holds_per_uid {
            return Err(WireError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "uid {} already has {} holds, the limit",
                    self.owner.uid, limits.max_holds_per_uid
                ),
            ));
        }
        if a.wait != Wait::No && UidUsage::get(&self.usage.waits) >= limits.max_waits_per_uid {
            return Err(WireError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "uid {} already has {} waiting acquires, the limit",
                    self.owner.uid, limits.max_waits_per_uid
                ),
            ));
        }
        if a.wait != Wait::No && self.waits.len() >= limits.max_waits_per_conn {
            return Err(WireError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "this connection already has {} waiting acquires, the limit",
                    self.waits.len()
                ),
            ));
        }
        Ok(lease)
    }

    /// A lease length in milliseconds, checked against the configured maximum.
    fn check_lease(&self, ms: u64) -> Result<Duration, WireError> {
        let max = self.config.limits.max_lease;
        let length = Duration::from_millis(ms);
        if ms == 0 || length > max {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "lease of {ms} ms: it must be above 0 and at most {} ms",
                    max.as_millis()
                ),
            ));
        }
        Ok(length)
    }

    /// Records a grant of request `id` and builds its reply; `None` when the reply waits for
    /// the store (a detached lease).
    fn granted(
        &mut self,
        id: RequestId,
        key: Key,
        fence: u64,
        mode: Mode,
        lease: Option<LeaseSpec>,
        minted: Minted,
    ) -> Option<Result<Reply, WireError>> {
        let ticket = minted.ticket;
        let Some(spec) = lease else {
            self.holds.insert(
                ticket,
                Held {
                    key,
                    fence,
                    leased: false,
                },
            );
            return Some(Ok(Reply::Granted(Grant {
                ticket,
                fence,
                mode,
                expires_at_ms: None,
            })));
        };
        let now_ms = clock::now_ms();
        let record = spec.record(ticket, key.clone(), mode, fence, &self.owner, now_ms);
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
        let commit = self.shared.leases.insert(Lease {
            record,
            owner: self.owner.clone(),
            length: spec.length,
            deadline: Instant::now() + spec.length,
            detached,
            releasing: false,
            shown_expiry,
            share: detached.then(|| HoldShare::new(Arc::clone(&self.usage))),
        });
        if let Some(done) = commit {
            self.unanswered_grants
                .insert(id, (key.clone(), ticket, fence));
            self.after_commit(id, done, AfterCommit::Granted { key, grant });
            return None;
        }
        self.holds.insert(
            ticket,
            Held {
                key,
                fence,
                leased: true,
            },
        );
        Some(Ok(Reply::Granted(grant)))
    }

    /// Answers request `id` once `done` reports (through this connection's mailbox).
    ///
    /// The state change that depends on the commit (finishing a release, taking back a failed
    /// grant) happens in the spawned task, so it happens even if this connection closes first;
    /// only the answer goes through the mailbox.
    fn after_commit(&self, id: RequestId, done: Done, then: AfterCommit) {
        let owner = self.owner.clone();
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let outcome = store::outcome(done.await).map_err(|e| e.to_string());
            let result = finish_commit(&shared, outcome, then);
            owner.push(Push::Reply {
                request: id,
                result,
            });
        });
    }

    fn release(&mut self, id: RequestId, ticket: &Ticket) -> Option<Result<Reply, WireError>> {
        if let Some(held) = self.holds.remove(ticket) {
            if held.leased {
                self.shared.leases.forget(ticket);
            }
            return Some(
                if self
                    .shared
                    .locks
                    .release(&held.key, held.fence, Ended::Released)
                {
                    Ok(Reply::Released)
                } else {
                    Err(not_holder())
                },
            );
        }
        // A lease: detached, or bound to another connection of the same uid.
        if let Some(ns) = self.shared.leases.namespace_of(ticket) {
            if let Err(e) = self.authorize(&ns) {
                return Some(Err(e));
            }
        }
        match self.shared.leases.release(ticket, self.owner.acting_uid()) {
            Err(TicketError::NotHolder) => Some(Err(not_holder())),
            Ok(Release::Pending(done)) => {
                self.after_commit(id, done, AfterCommit::Released { ticket: *ticket });
                None
            }
            Ok(Release::Done(lease)) => {
                let (key, fence) = (&lease.record.key, lease.record.fence);
                if !self.shared.locks.release(key, fence, Ended::Released) {
                    return Some(Err(not_holder()));
                }
                lease.owner.push(Push::Lost {
                    key: key.clone(),
                    fence,
                    reason: LostReason::ReleasedElsewhere,
                });
                Some(Ok(Reply::Released))
            }
        }
    }

    fn renew(
        &mut self,
        id: RequestId,
        ticket: &Ticket,
        lease_ms: Option<u64>,
    ) -> Option<Result<Reply, WireError>> {
        let length = match lease_ms.map(|ms| self.check_lease(ms)).transpose() {
            Ok(l) => l,
            Err(e) => return Some(Err(e)),
        };
        if let Some(ns) = self.shared.leases.namespace_of(ticket) {
            if let Err(e) = self.authorize(&ns) {
                return Some(Err(e));
            }
        }
        let renewed = self.shared.leases.renew(
            ticket,
            self.owner.acting_uid(),
            length,
            Instant::now(),
            clock::now_ms(),
        );
        match renewed {
            Ok((expires_at_ms, None)) => Some(Ok(Reply::Renewed { expires_at_ms })),
            Ok((expires_at_ms, Some(done))) => {
                self.after_commit(id, done, AfterCommit::Renewed { expires_at_ms });
                None
            }
            Err(TicketError::NotHolder) => Some(Err(not_holder())),
        }
    }

    fn describe(&self, key: &Key) -> Result<Reply, WireError> {
        key.validate().map_err(invalid)?;
        self.authorize(&key.namespace)?;
        Ok(Reply::Described(self.shared.locks.describe(key)))
    }

    fn list(&self, query: &ListQuery) -> Result<Reply, WireError> {
        if let Some(ns) = &query.namespace {
            lockd_protocol::key::validate_namespace(ns).map_err(invalid)?;
            self.authorize(ns)?;
        }
        let (authz, o) = (&self.config.authz, &self.owner);
        let visible = |ns: &str| authz.may_use(ns, o.uid, &o.groups);
        Ok(Reply::Listed(self.shared.locks.list(query, visible)))
    }

    /// Ends every hold on `key`: root only (configured admins come with the config file).
    fn force_release(&mut self, id: RequestId, key: &Key) -> Option<Result<Reply, WireError>> {
        if let Err(e) = key.validate() {
            return Some(Err(invalid(e)));
        }
        if !self.owner.is_admin() {
            return Some(Err(WireError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "force-release needs root or an admin (lockd --admin-uid/--admin-gid); uid {} is neither",
                    self.owner.uid
                ),
            )));
        }
        let tickets = self.shared.locks.force_release(key);
        tracing::warn!(key = %key, holds = tickets.len(), "force-released by {}", self.owner.describe());
        let holds = tickets.len() as u32;
        let commits: Vec<Done> = tickets
            .iter()
            .filter_map(|t| self.shared.leases.end_forced(t))
            .collect();
        if commits.is_empty() {
            return Some(Ok(Reply::ForceReleased { holds }));
        }
        // Answer once every detached lease's deletion is stored.
        let owner = self.owner.clone();
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let mut outcome = Ok(());
            for done in commits {
                if let Err(e) = store::outcome(done.await) {
                    outcome = Err(e.to_string());
                }
            }
            let result = finish_commit(&shared, outcome, AfterCommit::ForceReleased { holds });
            owner.push(Push::Reply {
                request: id,
                result,
            });
        });
        None
    }

    fn watch(&mut self, key: Key) -> Result<Reply, WireError> {
        key.validate().map_err(invalid)?;
        self.authorize(&key.namespace)?;
        let max = self.config.limits.max_watches_per_conn;
        if !self.watching.contains(&key) && self.watching.len() >= max {
            return Err(WireError::new(
                ErrorCode::LimitExceeded,
                format!("this connection already watches {max} keys, the limit"),
            ));
        }
        self.shared.locks.watch(&key, &self.owner);
        self.watching.insert(key);
        Ok(Reply::Watching)
    }

    fn unwatch(&mut self, key: &Key) -> bool {
        self.watching.remove(key);
        self.shared.locks.unwatch(key, &self.owner)
    }

    /// Withdraws the queued acquire `request`; true if it was still queued. The withdrawn
    /// acquire answers `Timeout`.
    fn cancel(&mut self, request: RequestId, by: RequestId) -> bool {
        let Some(pending) = self.waits.get(&request) else {
            return false;
        };
        if !self.shared.locks.cancel(&pending.key, &self.owner, request) {
            return false; // granted already; its grant is on the way
        }
        if let Some(pending) = self.waits.remove(&request) {
            if let Some(timer) = pending.timer {
                self.timers.remove(&timer);
            }
        }
        self.respond(
            request,
            Err(WireError::new(
                ErrorCode::Timeout,
                format!("wait cancelled by request {by}"),
            )),
        );
        true
    }

    fn on_timeout(&mut self, request: RequestId) {
        let Some(pending) = self.waits.get_mut(&request) else {
            return;
        };
        pending.timer = None;
        if !self.shared.locks.cancel(&pending.key, &self.owner, request) {
            return; // granted in the meantime; the grant wins
        }
        if let Some(pending) = self.waits.remove(&request) {
            self.shared.locks.count_timeout(&pending.key);
            let waited = pending.waited.unwrap_or_default();
            let msg = format!("{} not acquired within {waited:?}", pending.key);
            self.respond(request, Err(WireError::new(ErrorCode::Timeout, msg)));
        }
    }

    fn on_push(&mut self, push: Push) {
        match push {
            Push::Granted {
                request,
                fence,
                mode,
            } => {
                let Some(pending) = self.waits.remove(&request) else {
                    tracing::error!(conn = self.owner.id, request, "grant for an unknown wait");
                    return;
                };
                if let Some(timer) = pending.timer {
                    self.timers.remove(&timer);
                }
                let granted = self.granted(
                    request,
                    pending.key,
                    fence,
                    mode,
                    pending.lease,
                    pending.minted,
                );
                if let Some(result) = granted {
                    self.respond(request, result);
                }
            }
            Push::Watch { key, change } => {
                self.wire
                    .send(ServerMessage::Event(Event::Watch { key, change }));
            }
            Push::Lost { key, fence, reason } => {
                self.holds.retain(|_, h| h.fence != fence);
                self.wire
                    .send(ServerMessage::Event(Event::HoldLost { key, fence, reason }));
            }
            Push::Shutdown => {} // handled by the loop
            Push::Reply { request, result } => {
                self.unanswered_grants.remove(&request);
                self.respond(request, result);
            }
        }
    }

    /// Releases every session hold and waiter of the connection. Waits go first, so a hold
    /// released below is never handed to this dying connection's own waiter. Detached leases
    /// stay.
    fn cleanup(&mut self) {
        let locks = &self.shared.locks;
        let mut ended = 0;
        // Also catches grants that were made but not yet delivered to this task.
        for (request, pending) in self.waits.drain() {
            ended += locks.remove_owner(&pending.key, &self.owner);
            // A detached grant made for this request survives remove_owner, but nobody will
            // ever learn its ticket: end it.
            if pending.lease.as_ref().is_some_and(|l| l.detached) {
                ended += locks.abandon_detached(&pending.key, &self.owner, request);
            }
        }
        for (ticket, held) in self.holds.drain() {
            if held.leased {
                self.shared.leases.forget(&ticket);
            }
            ended += locks.remove_owner(&held.key, &self.owner);
        }
        for key in self.watching.drain() {
            locks.unwatch(&key, &self.owner);
        }
        for (_, (key, ticket, fence)) in self.unanswered_grants.drain() {
            if self.shared.leases.revoke(&ticket).is_some() {
                locks.release(&key, fence, Ended::Released);
                ended += 1;
            }
        }
        self.sync_usage_with(true);
        Global::dec(&self.shared.global.connections);
        self.shared.unregister(self.owner.id);
        tracing::debug!(
            conn = self.owner.id,
            ended,
            "disconnected: {}",
            self.owner.describe()
        );
    }
}

impl Drop for Session {
    /// Runs on every exit path, panics included: no session hold outlives its connection.
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Completes a change whose store commit finished: the reply, and the state change that
/// depends on the outcome.
fn finish_commit(
    shared: &Shared,
    outcome: Result<(), String>,
    then: AfterCommit,
) -> Result<Reply, WireError> {
    let unavailable = |why: &str| {
        WireError::new(
            ErrorCode::Unavailable,
            format!("the change could not be stored ({why}); it was not made, retry later"),
        )
    };
    match (outcome, then) {
        (Ok(()), AfterCommit::Granted { grant, .. }) => {
            if shared.leases.contains(&grant.ticket) {
                Ok(Reply::Granted(grant))
            } else {
                Err(WireError::new(
                    ErrorCode::NotHolder,
                    "the lease was granted but ended (force-released or expired) before it was stored",
                ))
            }
        }
        (Ok(()), AfterCommit::Renewed { expires_at_ms }) => Ok(Reply::Renewed { expires_at_ms }),
        (Ok(()), AfterCommit::Released { ticket }) => {
            if let Some(lease) = shared.leases.finish_release(&ticket) {
                shared
                    .locks
                    .release(&lease.record.key, lease.record.fence, Ended::Released);
            }
            Ok(Reply::Released)
        }
        (Err(why), AfterCommit::Granted { key, grant }) => {
            // Take the grant back: nothing unacknowledged may hold the key.
            if shared.leases.revoke(&grant.ticket).is_some() {
                shared.locks.release(&key, grant.fence, Ended::Released);
            }
            Err(unavailable(&why))
        }
        (Err(why), AfterCommit::Renewed { .. }) => Err(unavailable(&why)),
        (Ok(()), AfterCommit::ForceReleased { holds }) => Ok(Reply::ForceReleased { holds }),
        (Err(why), AfterCommit::ForceReleased { .. }) => Err(WireError::new(
            ErrorCode::Unavailable,
            format!(
                "the holds ended, but storing it failed ({why}); detached leases may reappear \
                 after a crash: force-release again later"
            ),
        )),
        (Err(why), AfterCommit::Released { ticket }) => {
            shared.leases.abort_release(&ticket);
            Err(unavailable(&why))
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::InvalidArgument, e.to_string())
}

fn not_holder() -> WireError {
    WireError::new(
        ErrorCode::NotHolder,
        "no live hold has this ticket (released, expired, or never granted to your uid)",
    )
}

/// Reads whatever is available into the read buffer.
async fn read_more(wire: &mut Wire) -> std::io::Result<usize> {
    wire.inbuf.reserve(READ_CHUNK);
    wire.stream.read_buf(&mut wire.inbuf).await
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}
