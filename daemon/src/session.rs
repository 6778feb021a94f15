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
    Acquire, ClientMessage, ErrorCode, Event, Grant, Hello, Mode, Op, Reply, Request, RequestId,
    Response, ServerCodec, ServerMessage, Ticket, Wait, Welcome, WireError, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;
use tokio_util::time::{delay_queue, DelayQueue};

use crate::config::Config;
use crate::lockspace::{AcquireOutcome, HoldMeta, LockSpace};
use crate::peer::{Owner, Peer, Push};
use crate::tickets::TicketPool;

/// State shared by every connection.
pub struct Shared {
    pub locks: LockSpace,
    pub config: Config,
    pub shutdown: CancellationToken,
    next_conn: AtomicU64,
}

impl Shared {
    pub fn new(locks: LockSpace, config: Config, shutdown: CancellationToken) -> Arc<Shared> {
        Arc::new(Shared {
            locks,
            config,
            shutdown,
            next_conn: AtomicU64::new(1),
        })
    }
}

/// Timed waits longer than this (a year, in milliseconds) are treated as waiting forever.
pub const MAX_TIMED_WAIT_MS: u64 = 365 * 24 * 3600 * 1000;
/// Read buffer growth step, bytes.
const READ_CHUNK: usize = 8 * 1024;
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
    let max_frame = shared.config.limits.max_frame;
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
    let hello = match conn.handshake(shared.config.limits.handshake_timeout).await {
        Ok(hello) => hello,
        Err(why) => {
            tracing::debug!(conn = id, "handshake with {who} failed: {why}");
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
        limits: shared.config.limits.to_wire(),
    };
    conn.send(ServerMessage::Welcome(welcome));
    if conn.flush().await.is_err() {
        return;
    }
    let mut name = hello.client_name;
    truncate_utf8(&mut name, 256);
    let (owner, push_rx) = Peer::open(id, cred.pid(), cred.uid(), cred.gid(), name);
    tracing::debug!(conn = id, "connected: {}", owner.describe());
    let mut session = Session {
        wire: conn,
        owner,
        push_rx,
        holds: HashMap::new(),
        waits: HashMap::new(),
        timers: DelayQueue::new(),
        tickets: TicketPool::default(),
        shared,
    };
    session.run().await;
    // `Session`'s Drop releases everything the connection held, even if a bug panicked above.
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
        if self.out.is_empty() {
            return Ok(());
        }
        let r = self.stream.write_all(&self.out).await;
        if self.out.capacity() > OUT_KEEP {
            self.out = BytesMut::with_capacity(READ_CHUNK);
        } else {
            self.out.clear();
        }
        r
    }
}

/// A hold of this connection, by ticket.
struct Held {
    key: lockd_protocol::Key,
    fence: u64,
}

/// A queued acquire of this connection, by request id.
struct Pending {
    key: lockd_protocol::Key,
    /// `None` for `wait = forever`, or once the timer has fired.
    timer: Option<delay_queue::Key>,
    waited: Option<Duration>,
}

struct Session {
    wire: Wire,
    owner: Owner,
    push_rx: mpsc::UnboundedReceiver<Push>,
    holds: HashMap<Ticket, Held>,
    waits: HashMap<RequestId, Pending>,
    timers: DelayQueue<RequestId>,
    tickets: TicketPool,
    shared: Arc<Shared>,
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
        // A child token per connection: polling a token's future takes that token's mutex,
        // and the daemon-wide token would be a lock every connection fights over.
        let shutdown = self.shared.shutdown.child_token().cancelled_owned();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => return End::Shutdown,
                Some(push) = self.push_rx.recv() => {
                    self.on_push(push);
                    while let Ok(push) = self.push_rx.try_recv() {
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
                        if !self.handle_frames() {
                            let _ = self.wire.flush().await;
                            return End::Closed;
                        }
                    }
                    Err(_) => return End::Closed,
                },
            }
            if self.wire.flush().await.is_err() {
                return End::Closed;
            }
        }
    }

    /// Handles every complete frame in the read buffer. False if the connection must close.
    fn handle_frames(&mut self) -> bool {
        loop {
            match self.wire.codec.decode(&mut self.wire.inbuf) {
                Ok(Some(ClientMessage::Request(req))) => self.handle(req),
                Ok(Some(ClientMessage::Hello(_))) => {
                    self.protocol_error("Hello sent twice");
                    return false;
                }
                Ok(None) => return true,
                Err(e) => {
                    self.protocol_error(&e.to_string());
                    return false;
                }
            }
        }
    }

    fn protocol_error(&mut self, why: &str) {
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
        self.wire
            .send(ServerMessage::Response(Response { id, result }));
    }

    fn handle(&mut self, req: Request) {
        let result = match req.op {
            Op::Acquire(acquire) => match self.acquire(req.id, acquire) {
                Some(result) => result,
                None => return,
            },
            Op::Release { ticket } => self.release(&ticket),
            Op::Cancel { request } => Ok(Reply::Cancelled(self.cancel(request, req.id))),
            Op::Ping => Ok(Reply::Pong),
        };
        self.respond(req.id, result);
    }

    /// Answers at once, or returns `None` when the request was queued.
    fn acquire(&mut self, id: RequestId, a: Acquire) -> Option<Result<Reply, WireError>> {
        if let Err(e) = self.check_acquire(id, &a) {
            return Some(Err(e));
        }
        let waited = match a.wait {
            Wait::No | Wait::Millis(0) => None,
            Wait::Millis(ms) if ms <= MAX_TIMED_WAIT_MS => Some(Some(Duration::from_millis(ms))),
            // Longer than a timer can represent usefully: the same as waiting forever.
            Wait::Millis(_) | Wait::Forever => Some(None),
        };
        let meta = HoldMeta { data: a.data };
        let outcome =
            self.shared
                .locks
                .acquire(&a.key, &self.owner, id, a.mode, waited.is_some(), meta);
        match outcome {
            AcquireOutcome::Granted(fence) => Some(self.granted(a.key, fence, a.mode)),
            AcquireOutcome::Conflict(msg) => Some(Err(WireError::new(ErrorCode::Conflict, msg))),
            AcquireOutcome::Queued => {
                let waited = waited.flatten();
                let timer = waited.map(|d| self.timers.insert(id, d));
                self.waits.insert(
                    id,
                    Pending {
                        key: a.key,
                        timer,
                        waited,
                    },
                );
                None
            }
        }
    }

    fn check_acquire(&self, id: RequestId, a: &Acquire) -> Result<(), WireError> {
        let invalid = |m: String| Err(WireError::new(ErrorCode::InvalidArgument, m));
        if let Err(e) = a.key.validate() {
            return invalid(e.to_string());
        }
        let max_data = self.shared.config.limits.max_data;
        if a.data.len() > max_data {
            return invalid(format!(
                "data is {} bytes; the limit is {max_data}",
                a.data.len()
            ));
        }
        if a.lease_ms.is_some() || a.detach {
            return invalid("leases are not supported by this lockd version".into());
        }
        if self.waits.contains_key(&id) {
            return invalid(format!(
                "request id {id} is already used by a waiting acquire"
            ));
        }
        Ok(())
    }

    /// Records a grant of this connection and builds its reply.
    fn granted(
        &mut self,
        key: lockd_protocol::Key,
        fence: u64,
        mode: Mode,
    ) -> Result<Reply, WireError> {
        let ticket = match self.tickets.draw() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("the OS random source failed: {e}");
                self.shared.locks.release(&key, fence);
                return Err(WireError::new(
                    ErrorCode::Internal,
                    "the daemon could not draw a ticket from the OS random source",
                ));
            }
        };
        self.holds.insert(ticket, Held { key, fence });
        Ok(Reply::Granted(Grant {
            ticket,
            fence,
            mode,
            expires_at_ms: None,
        }))
    }

    fn release(&mut self, ticket: &Ticket) -> Result<Reply, WireError> {
        let not_holder = || {
            WireError::new(
                ErrorCode::NotHolder,
                "no hold with this ticket on this connection (released already, or never granted)",
            )
        };
        let held = self.holds.remove(ticket).ok_or_else(not_holder)?;
        if self.shared.locks.release(&held.key, held.fence) {
            Ok(Reply::Released)
        } else {
            Err(not_holder())
        }
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
                let result = self.granted(pending.key, fence, mode);
                self.respond(request, result);
            }
        }
    }

    /// Releases every session hold and waiter of the connection. Waits go first, so a hold
    /// released below is never handed to this dying connection's own waiter.
    fn cleanup(&mut self) {
        let locks = &self.shared.locks;
        let mut ended = 0;
        // Also catches grants that were made but not yet delivered to this task.
        for (_, pending) in self.waits.drain() {
            ended += locks.remove_owner(&pending.key, &self.owner);
        }
        for (_, held) in self.holds.drain() {
            ended += locks.remove_owner(&held.key, &self.owner);
        }
        tracing::debug!(
            conn = self.owner.id,
            ended,
            "disconnected: {}",
            self.owner.describe()
        );
    }
}

impl Drop for Session {
    /// Runs on every exit path, panics included: no hold outlives its connection.
    fn drop(&mut self) {
        self.cleanup();
    }
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
