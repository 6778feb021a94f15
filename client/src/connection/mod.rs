//! One connection to the daemon, shared by every clone of a [`crate::Client`].
//!
//! Callers encode their requests and write them to the socket themselves (no task hop on the
//! way out). One task reads: it routes responses to their callers by request id, turns pushed
//! events and EOF into lost-hold signals, and writes what the socket did not take at once.
//!
//! Invariants:
//! - bytes are appended to [`Writer::out`] and written only under the writer lock, so frames
//!   never interleave; while `out` is not empty, new frames queue behind it;
//! - a call is registered in [`Routes::pending`] before its frame is written, so its answer
//!   always finds it; once the connection has ended nothing is registered (calls fail with
//!   `Disconnected`);
//! - lock order: routes, then writer; no lock is held across an `.await`;
//! - a grant whose caller has gone away (the acquire future was dropped) is released at once,
//!   so an abandoned acquire never leaves a hold behind;
//! - when the connection ends, every registered hold is marked lost;
//! - the connection closes when the last handle is gone ([`Conn::close`]) or the daemon
//!   closes it; [`Conn`] itself may live on (in a pending grant) without keeping it open.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use futures_util::task::AtomicWaker;
use lockd_protocol::{
    Change, ClientCodec, Event, Key, LostReason, Op, Reply, RequestId, ServerMessage, Ticket,
    WireError,
};
use tokio::io::AsyncReadExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use crate::guard::Lost;
use crate::Error;

/// Callers wait before adding frames while this many bytes wait to be written.
const OUT_HIGH_WATER: usize = 256 * 1024;
const READ_CHUNK: usize = 8 * 1024;

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
    conn: Arc<Conn>,
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
            let release = Op::Release {
                ticket: self.ticket,
            };
            self.conn.fire(&release, Some(self.fence));
        }
    }
}

/// Shared between a guard and the connection: set when the hold ends other than by release.
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

/// Who waits for what on this connection.
#[derive(Default)]
struct Routes {
    pending: HashMap<RequestId, PendingCall>,
    holds: HashMap<u64, Arc<HoldState>>,
    /// Watch streams by key; several streams may watch one key.
    watches: HashMap<Key, Vec<mpsc::UnboundedSender<Change>>>,
    /// The connection is over: nothing more is registered.
    ended: bool,
    /// The daemon said it is shutting down (holds end with `DaemonShutdown`).
    shutting_down: bool,
}

/// The sending side of the socket.
struct Writer {
    /// `None` once the connection has ended (dropping it closes our side). Shared with the
    /// task only while it waits for the socket to become writable.
    wr: Option<Arc<OwnedWriteHalf>>,
    codec: ClientCodec,
    /// Encoded frames the socket has not taken yet.
    out: BytesMut,
    /// A write failed: the connection is broken, the task ends it.
    failed: bool,
}

/// What one attempt to write `out` achieved.
enum Flushed {
    All,
    Partly,
    Failed,
}

impl Writer {
    /// Writes what the socket takes now, without waiting.
    fn flush(&mut self) -> Flushed {
        let Some(wr) = &self.wr else {
            return Flushed::Failed;
        };
        while !self.out.is_empty() {
            match wr.try_write(&self.out) {
                Ok(0) => return self.fail(),
                Ok(n) => self.out.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flushed::Partly,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.fail(),
            }
        }
        Flushed::All
    }

    fn fail(&mut self) -> Flushed {
        self.failed = true;
        self.out.clear();
        Flushed::Failed
    }
}

/// The state every handle of one connection shares.
pub(crate) struct Conn {
    routes: Mutex<Routes>,
    writer: Mutex<Writer>,
    /// Wakes the task: queued bytes, a failed write, or the last handle gone.
    signals: Signals,
    /// Wakes callers waiting for `out` to drop below [`OUT_HIGH_WATER`] (or the end).
    drained: Notify,
    /// `out` is at or above [`OUT_HIGH_WATER`]: written under the writer lock, read without it
    /// (a hint that spares callers a second lock per request while the socket keeps up).
    backlogged: AtomicBool,
    next_id: AtomicU64,
    /// Cancelled when the connection has ended.
    pub(crate) closed: CancellationToken,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("closed", &self.closed.is_cancelled())
            .finish_non_exhaustive()
    }
}

/// Locks `m`; a panic while it was held cannot leave these maps and buffers half-updated in a
/// way that matters more than losing the connection, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Conn {
    /// Sets up the shared state and the task that reads `stream` (it must be spawned).
    pub(crate) fn start(
        stream: UnixStream,
        codec: ClientCodec,
        inbuf: BytesMut,
    ) -> (Arc<Conn>, Task) {
        let (rd, wr) = stream.into_split();
        let conn = Arc::new(Conn {
            routes: Mutex::new(Routes::default()),
            writer: Mutex::new(Writer {
                wr: Some(Arc::new(wr)),
                codec: codec.clone(),
                out: BytesMut::with_capacity(READ_CHUNK),
                failed: false,
            }),
            signals: Signals::default(),
            drained: Notify::new(),
            backlogged: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            closed: CancellationToken::new(),
        });
        let task = Task {
            conn: Arc::clone(&conn),
            rd,
            codec,
            inbuf,
        };
        (conn, task)
    }

    fn next_id(&self) -> RequestId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Calls `f` with the socket's descriptor, kept open meanwhile by the writer lock (the
    /// connection's end drops the write half under it); `None` once the connection has ended.
    pub(crate) fn with_socket_fd<R>(
        &self,
        f: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> R,
    ) -> Option<R> {
        use std::os::fd::AsFd;
        let w = lock(&self.writer);
        let wr = w.wr.as_ref().filter(|_| !w.failed)?;
        let stream: &UnixStream = (**wr).as_ref();
        Some(f(stream.as_fd()))
    }

    /// Asks the task to close the connection (the last handle is gone).
    pub(crate) fn close(&self) {
        self.signals.raise(&self.signals.stop);
    }

    /// Sends `op` and returns its request id and where its answer will arrive; stops tracking
    /// the hold with fence `forget` first (a guard releasing it). Waits while too much is
    /// unwritten (the daemon is not reading).
    pub(crate) async fn call(
        &self,
        op: &Op,
        forget: Option<u64>,
    ) -> Result<(RequestId, oneshot::Receiver<Result<Answer, Error>>), Error> {
        self.wait_for_room().await;
        let id = self.next_id();
        let (reply, rx) = oneshot::channel();
        {
            let mut routes = lock(&self.routes);
            if routes.ended {
                return Err(Error::Disconnected);
            }
            if let Some(fence) = forget {
                routes.holds.remove(&fence);
            }
            let call = PendingCall {
                reply,
                may_wait: matches!(op, Op::Acquire(a) if a.wait != lockd_protocol::Wait::No),
                detached: matches!(op, Op::Acquire(a) if a.detach),
            };
            routes.pending.insert(id, call);
        }
        if let Err(e) = self.send(id, op) {
            lock(&self.routes).pending.remove(&id);
            return Err(e);
        }
        Ok((id, rx))
    }

    /// Sends `op` and ignores its answer; stops tracking the hold with fence `forget` first.
    /// Never waits (it runs in `Drop`).
    pub(crate) fn fire(&self, op: &Op, forget: Option<u64>) {
        if let Some(fence) = forget {
            lock(&self.routes).holds.remove(&fence);
        }
        let _ = self.send(self.next_id(), op);
    }

    /// The caller of request `id` stopped waiting: withdraw it if it is a queued acquire.
    pub(crate) fn abandon(&self, id: RequestId) {
        let call = lock(&self.routes).pending.remove(&id);
        if call.is_some_and(|c| c.may_wait) {
            let _ = self.send(self.next_id(), &Op::Cancel { request: id });
        }
    }

    /// Routes watch events for `key` to `events` (before the `Watch` request is sent).
    pub(crate) fn add_watch(&self, key: Key, events: mpsc::UnboundedSender<Change>) {
        let mut routes = lock(&self.routes);
        if !routes.ended {
            routes.watches.entry(key).or_default().push(events);
        }
    }

    /// Forgets the watch streams of `key` that were dropped.
    pub(crate) fn prune_watches(&self, key: &Key) {
        let mut routes = lock(&self.routes);
        if let Some(streams) = routes.watches.get_mut(key) {
            streams.retain(|events| !events.is_closed());
            if streams.is_empty() {
                routes.watches.remove(key);
            }
        }
    }

    async fn wait_for_room(&self) {
        if !self.backlogged.load(Ordering::Acquire) {
            return;
        }
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let w = lock(&self.writer);
                if w.out.len() < OUT_HIGH_WATER || w.wr.is_none() {
                    return;
                }
            }
            drained.await;
        }
    }

    /// Appends the frame of request `id` and writes it at once if nothing waits before it;
    /// what the socket does not take is left to the task.
    fn send(&self, id: RequestId, op: &Op) -> Result<(), Error> {
        let mut w = lock(&self.writer);
        if w.wr.is_none() || w.failed {
            return Err(Error::Disconnected);
        }
        let was_empty = w.out.is_empty();
        let Writer { codec, out, .. } = &mut *w;
        codec
            .encode_request(id, op, out)
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let left_over = was_empty && !matches!(w.flush(), Flushed::All);
        if w.out.len() >= OUT_HIGH_WATER {
            self.backlogged.store(true, Ordering::Release);
        }
        drop(w);
        if left_over {
            self.signals.raise(&self.signals.write);
        }
        Ok(())
    }

    /// Writes what is queued (the task, once the socket is writable); true when all is out.
    fn flush_queued(&self) -> Result<bool, ()> {
        let mut w = lock(&self.writer);
        if w.failed {
            return Err(());
        }
        let was_full = w.out.len() >= OUT_HIGH_WATER;
        let flushed = w.flush();
        let below = w.out.len() < OUT_HIGH_WATER;
        if below {
            self.backlogged.store(false, Ordering::Release);
        }
        drop(w);
        if was_full && below {
            self.drained.notify_waiters();
        }
        match flushed {
            Flushed::All => Ok(true),
            Flushed::Partly => Ok(false),
            Flushed::Failed => Err(()),
        }
    }
}

/// Why the task was woken other than by the socket.
enum Signal {
    /// The last handle is gone: close the connection.
    Stop,
    /// Bytes wait in `out` that the socket did not take, or a write failed.
    Write,
}

/// The task's wake-ups, as flags and one waker: polling them takes no lock (the task polls
/// them on every wake-up).
#[derive(Default)]
struct Signals {
    waker: AtomicWaker,
    stop: AtomicBool,
    write: AtomicBool,
}

impl Signals {
    fn raise(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<Signal> {
        if let Some(signal) = self.take() {
            return Poll::Ready(signal);
        }
        self.waker.register(cx.waker());
        // Raised between the check and the registration: seen now, or woken later.
        match self.take() {
            Some(signal) => Poll::Ready(signal),
            None => Poll::Pending,
        }
    }

    fn take(&self) -> Option<Signal> {
        if self.stop.load(Ordering::Acquire) {
            Some(Signal::Stop)
        } else if self.write.swap(false, Ordering::AcqRel) {
            Some(Signal::Write)
        } else {
            None
        }
    }
}

/// The task that reads the socket. It ends when the daemon closes the connection, on a
/// protocol error, on a failed write, or when the last handle is gone.
pub(crate) struct Task {
    conn: Arc<Conn>,
    /// Read through `AsyncRead`, which skips the would-block `recv` after a short read.
    rd: OwnedReadHalf,
    codec: ClientCodec,
    inbuf: BytesMut,
}

mod reader;
#[cfg(test)]
mod tests;
