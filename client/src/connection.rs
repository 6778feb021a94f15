//! The task that owns the socket: it writes requests, routes responses to their callers by
//! request id, and turns pushed events and EOF into lost-hold signals.
//!
//! Invariants:
//! - only this task touches the socket; callers talk to it over an unbounded command channel;
//! - a grant whose caller has gone away (the acquire future was dropped) is released at once,
//!   so an abandoned acquire never leaves a hold behind;
//! - when the connection ends, every registered hold is marked lost and its token cancelled.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::{Buf, BytesMut};
use lockd_protocol::{
    Change, ClientCodec, ClientMessage, Event, Key, LostReason, Op, Reply, Request, RequestId,
    ServerMessage, Ticket, WireError,
};
use tokio::io::AsyncReadExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;

use crate::guard::Lost;
use crate::Error;

/// Stop taking new commands while this many bytes wait to be written.
const OUT_HIGH_WATER: usize = 256 * 1024;
const READ_CHUNK: usize = 8 * 1024;

/// A request from a caller to the connection task.
pub(crate) enum Command {
    /// Send `op` as request `id` and answer on `reply`; forget the hold with fence `forget`
    /// first (a guard releasing it).
    Call {
        id: RequestId,
        op: Op,
        reply: oneshot::Sender<Result<Answer, Error>>,
        forget: Option<u64>,
    },
    /// Send `op` and ignore its answer; forget the hold with fence `forget` first.
    Fire { op: Op, forget: Option<u64> },
    /// The caller of request `id` stopped waiting: withdraw it if it is a queued acquire.
    Abandon { id: RequestId },
    /// Route watch events for `key` to `events` (sent before the `Watch` request).
    Watch {
        key: Key,
        events: mpsc::UnboundedSender<Change>,
    },
}

/// A successful answer; `hold` is set for grants.
pub(crate) struct Answer {
    pub reply: Reply,
    pub hold: Option<PendingHold>,
}

/// A grant on its way to the caller. Releases the hold if dropped before the caller turned it
/// into a guard (the caller gave up, e.g. lost a `select!`), so no hold is ever orphaned.
pub(crate) struct PendingHold {
    state: Arc<HoldState>,
    ticket: Ticket,
    fence: u64,
    tx: mpsc::WeakUnboundedSender<Command>,
    armed: bool,
}

impl PendingHold {
    /// Hands the hold to a guard: from now on the guard releases it.
    pub(crate) fn adopt(mut self) -> Arc<HoldState> {
        self.armed = false;
        Arc::clone(&self.state)
    }
}

impl Drop for PendingHold {
    fn drop(&mut self) {
        if self.armed {
            if let Some(tx) = self.tx.upgrade() {
                let _ = tx.send(Command::Fire {
                    op: Op::Release {
                        ticket: self.ticket,
                    },
                    forget: Some(self.fence),
                });
            }
        }
    }
}

/// Shared between a guard and the task: set when the hold ends other than by release.
#[derive(Debug, Default)]
pub(crate) struct HoldState {
    reason: OnceLock<Lost>,
    changed: Notify,
}

impl HoldState {
    pub(crate) fn lose(&self, why: Lost) {
        let _ = self.reason.set(why);
        self.changed.notify_waiters();
    }

    /// Why the hold was lost, if it was.
    pub(crate) fn lost_reason(&self) -> Option<Lost> {
        self.reason.get().copied()
    }

    /// Resolves when the hold is lost.
    pub(crate) async fn lost(&self) -> Lost {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(why) = self.lost_reason() {
                return why;
            }
            changed.await;
        }
    }
}

struct PendingCall {
    reply: oneshot::Sender<Result<Answer, Error>>,
    /// An acquire that may be queued (so abandoning it must send `Cancel`).
    may_wait: bool,
    /// A detached acquire: its hold is not tied to this connection, so it is not tracked.
    detached: bool,
}

pub(crate) struct Task {
    /// Read through `AsyncRead`, which skips the would-block `recv` after a short read.
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    codec: ClientCodec,
    inbuf: BytesMut,
    out: BytesMut,
    rx: mpsc::UnboundedReceiver<Command>,
    /// For grants' release-on-drop; weak, so it never keeps the connection open.
    tx: mpsc::WeakUnboundedSender<Command>,
    next_id: Arc<AtomicU64>,
    /// Cancelled when the connection ends.
    closed: CancellationToken,
    pending: HashMap<RequestId, PendingCall>,
    holds: HashMap<u64, Arc<HoldState>>,
    /// Watch streams by key; several streams may watch one key.
    watches: HashMap<Key, Vec<mpsc::UnboundedSender<Change>>>,
    shutting_down: bool,
}

impl Task {
    pub(crate) fn new(
        stream: UnixStream,
        codec: ClientCodec,
        inbuf: BytesMut,
        rx: mpsc::UnboundedReceiver<Command>,
        tx: mpsc::WeakUnboundedSender<Command>,
        next_id: Arc<AtomicU64>,
        closed: CancellationToken,
    ) -> Task {
        let (rd, wr) = stream.into_split();
        Task {
            rd,
            wr,
            codec,
            inbuf,
            out: BytesMut::with_capacity(READ_CHUNK),
            rx,
            tx,
            next_id,
            closed,
            pending: HashMap::new(),
            holds: HashMap::new(),
            watches: HashMap::new(),
            shutting_down: false,
        }
    }

    pub(crate) async fn run(mut self) {
        // Frames that arrived together with the handshake answer.
        let _ = self.route_frames();
        loop {
            let keep_going = tokio::select! {
                biased;
                read = read_some(&mut self.rd, &mut self.inbuf) => match read {
                    Ok(0) | Err(_) => false,
                    Ok(_) => self.route_frames(),
                },
                ready = self.wr.writable(), if !self.out.is_empty() => {
                    ready.is_ok() && self.write_ready()
                }
                cmd = self.rx.recv(), if self.out.len() < OUT_HIGH_WATER => match cmd {
                    Some(cmd) => {
                        self.command(cmd);
                        while self.out.len() < OUT_HIGH_WATER {
                            match self.rx.try_recv() {
                                Ok(cmd) => self.command(cmd),
                                Err(_) => break,
                            }
                        }
                        true
                    }
                    None => false, // every Client handle and guard is gone
                },
            };
            if !keep_going || (!self.out.is_empty() && !self.write_ready()) {
                break;
            }
        }
        self.finish();
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Call {
                id,
                op,
                reply,
                forget,
            } => {
                if let Some(fence) = forget {
                    self.holds.remove(&fence);
                }
                let may_wait = matches!(&op, Op::Acquire(a) if a.wait != lockd_protocol::Wait::No);
                let detached = matches!(&op, Op::Acquire(a) if a.detach);
                self.pending.insert(
                    id,
                    PendingCall {
                        reply,
                        may_wait,
                        detached,
                    },
                );
                self.send(id, op);
            }
            Command::Fire { op, forget } => {
                if let Some(fence) = forget {
                    self.holds.remove(&fence);
                }
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                self.send(id, op);
            }
            Command::Watch { key, events } => {
                self.watches.entry(key).or_default().push(events);
            }
            Command::Abandon { id } => {
                if let Some(call) = self.pending.remove(&id) {
                    if call.may_wait {
                        let cancel_id = self.next_id.fetch_add(1, Ordering::Relaxed);
                        self.send(cancel_id, Op::Cancel { request: id });
                    }
                }
            }
        }
    }

    fn send(&mut self, id: RequestId, op: Op) {
        let msg = ClientMessage::Request(Request { id, op });
        if let Err(e) = self.codec.encode(msg, &mut self.out) {
            if let Some(call) = self.pending.remove(&id) {
                let _ = call.reply.send(Err(Error::Protocol(e.to_string())));
            }
        }
    }

    /// Writes what the socket takes; false when the connection is over.
    fn write_ready(&mut self) -> bool {
        while !self.out.is_empty() {
            match self.wr.try_write(&self.out) {
                Ok(0) => return false,
                Ok(n) => self.out.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        true
    }

    /// Routes every complete frame; false on a protocol error.
    fn route_frames(&mut self) -> bool {
        loop {
            match self.codec.decode(&mut self.inbuf) {
                Ok(Some(msg)) => {
                    if !self.route(msg) {
                        return false;
                    }
                }
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }

    fn route(&mut self, msg: ServerMessage) -> bool {
        match msg {
            ServerMessage::Response(resp) => {
                self.response(resp.id, resp.result);
                true
            }
            ServerMessage::Event(Event::HoldLost { fence, reason, .. }) => {
                if let Some(hold) = self.holds.remove(&fence) {
                    hold.lose(match reason {
                        LostReason::Expired => Lost::Expired,
                        LostReason::ForceReleased => Lost::ForceReleased,
                        LostReason::ReleasedElsewhere => Lost::ReleasedElsewhere,
                    });
                }
                true
            }
            ServerMessage::Event(Event::Watch { key, change }) => {
                let gone = match self.watches.get_mut(&key) {
                    Some(streams) => {
                        streams.retain(|events| events.send(change.clone()).is_ok());
                        streams.is_empty()
                    }
                    None => false,
                };
                if gone {
                    // Every stream was dropped: stop the daemon's events too.
                    self.watches.remove(&key);
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    self.send(id, Op::Unwatch { key });
                }
                true
            }
            ServerMessage::Event(Event::ShuttingDown) => {
                self.shutting_down = true;
                true
            }
            ServerMessage::Welcome(_) | ServerMessage::Rejected(_) => false,
        }
    }

    fn response(&mut self, id: RequestId, result: Result<Reply, WireError>) {
        let call = self.pending.remove(&id);
        let granted = match &result {
            Ok(Reply::Granted(g)) => Some((g.fence, g.ticket)),
            _ => None,
        };
        let Some(call) = call else {
            // A fire-and-forget request, or an abandoned acquire that was granted anyway.
            if let Some((_, ticket)) = granted {
                let release_id = self.next_id.fetch_add(1, Ordering::Relaxed);
                self.send(release_id, Op::Release { ticket });
            }
            return;
        };
        let answer = match result {
            Ok(reply) => {
                let hold = granted.map(|(fence, ticket)| {
                    let state = Arc::new(HoldState::default());
                    if !call.detached {
                        self.holds.insert(fence, Arc::clone(&state));
                    }
                    PendingHold {
                        state,
                        ticket,
                        fence,
                        tx: self.tx.clone(),
                        armed: true,
                    }
                });
                Ok(Answer { reply, hold })
            }
            Err(e) => Err(Error::Lock(e)),
        };
        // If the caller is gone, dropping the answer releases a grant it carried.
        let _ = call.reply.send(answer);
    }

    fn finish(mut self) {
        let why = if self.shutting_down {
            Lost::DaemonShutdown
        } else {
            Lost::Disconnected
        };
        for (_, hold) in self.holds.drain() {
            hold.lose(why);
        }
        for (_, call) in self.pending.drain() {
            let _ = call.reply.send(Err(Error::Disconnected));
        }
        self.closed.cancel();
    }
}

/// Reads whatever is available (cancel-safe: nothing is lost if another branch wins).
async fn read_some(rd: &mut OwnedReadHalf, inbuf: &mut BytesMut) -> io::Result<usize> {
    inbuf.reserve(READ_CHUNK);
    rd.read_buf(inbuf).await
}
