//! [`Client`]: one multiplexed connection to lockd, and the acquire builder.

use std::os::fd::{BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use lockd_protocol::{
    Change, ClientCodec, ClientMessage, Description, Hello, Key, KeySummary, Limits, ListPage,
    ListQuery, Mode, Op, Reply, ServerMessage, Stats, Ticket, Wait, DEFAULT_NAMESPACE,
    PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, Encoder};

use crate::acquire::{duration_ms, AcquireBuilder};
use crate::connection::{Answer, Conn};
use crate::guard::LockGuard;
use crate::Error;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Shown by describe next to this connection's holds. Defaults to the program's name.
    pub client_name: String,
    /// Bound on connecting plus the handshake.
    pub timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        let client_name = std::env::args()
            .next()
            .and_then(|a| {
                Path::new(&a)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "lockd-client".to_string());
        ConnectOptions {
            client_name,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A connection to lockd. Cheap to clone; clones share the connection.
///
/// Every hold taken through a client ends when the connection closes, which happens when the
/// last clone and the last [`LockGuard`] are dropped, or when the daemon goes away.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    conn: Arc<Conn>,
    limits: Limits,
    server_version: String,
}

impl Drop for Inner {
    /// The last handle is gone: close the connection, which ends every hold taken through it.
    fn drop(&mut self) {
        self.conn.close();
    }
}

impl Client {
    /// Connects to the daemon at `path`.
    ///
    /// # Errors
    /// [`Error::Connect`] if nothing listens there; [`Error::Rejected`] on a version mismatch.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
        Client::connect_with(path, ConnectOptions::default()).await
    }

    /// Connects to `$LOCKD_SOCKET`, else the daemon's default socket path.
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub async fn connect_default() -> Result<Client, Error> {
        Client::connect(lockd_protocol::paths::client_socket_path()?).await
    }

    /// Connects with explicit options.
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub async fn connect_with(
        path: impl AsRef<Path>,
        options: ConnectOptions,
    ) -> Result<Client, Error> {
        let path = path.as_ref();
        let connect_err = |source| Error::Connect {
            path: PathBuf::from(path),
            source,
        };
        let handshake = handshake(path, options.client_name);
        let (stream, codec, inbuf, welcome) = tokio::time::timeout(options.timeout, handshake)
            .await
            .map_err(|_| {
                connect_err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer to the handshake",
                ))
            })??;
        let (conn, task) = Conn::start(stream, codec, inbuf);
        tokio::spawn(task.run());
        Ok(Client {
            inner: Arc::new(Inner {
                conn,
                limits: welcome.limits,
                server_version: welcome.server_version,
            }),
        })
    }

    /// Limits the daemon announced.
    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// The daemon's version string.
    pub fn server_version(&self) -> &str {
        &self.inner.server_version
    }

    /// Starts building an acquire of `name` (namespace `default`, exclusive, no wait).
    pub fn acquire(&self, name: impl Into<String>) -> AcquireBuilder {
        AcquireBuilder {
            client: self.clone(),
            namespace: DEFAULT_NAMESPACE.to_string(),
            name: name.into(),
            mode: Mode::Exclusive,
            wait: Wait::No,
            data: Vec::new(),
            lease: None,
            permits: None,
            lock_delay: Duration::ZERO,
        }
    }

    /// Extends the lease with `ticket` to `lease` from now (default: its original length), from
    /// any connection of the acquirer's uid. Returns the new end, in milliseconds since the Unix
    /// epoch.
    ///
    /// # Errors
    /// [`Error::Lock`] with `NotHolder` if the lease has ended; `Unavailable` if the renewal of
    /// a detached lease could not be stored.
    pub async fn renew(&self, ticket: &Ticket, lease: Option<Duration>) -> Result<u64, Error> {
        let op = Op::Renew {
            ticket: *ticket,
            lease_ms: lease.map(duration_ms),
        };
        match self.call(&op).await?.reply {
            Reply::Renewed { expires_at_ms } => Ok(expires_at_ms),
            other => Err(Error::Protocol(format!("expected Renewed, got {other:?}"))),
        }
    }

    /// Releases the hold with `ticket`: a detached lease, or a hold of this connection or of
    /// another connection of the same uid.
    ///
    /// # Errors
    /// [`Error::Lock`] with `NotHolder` if it has ended.
    pub async fn release(&self, ticket: &Ticket) -> Result<(), Error> {
        match self.call(&Op::Release { ticket: *ticket }).await?.reply {
            Reply::Released => Ok(()),
            other => Err(Error::Protocol(format!("expected Released, got {other:?}"))),
        }
    }

    /// Waits as long as it takes for an exclusive hold of `name`.
    ///
    /// # Errors
    /// See [`AcquireBuilder`].
    pub async fn lock(&self, name: impl Into<String>) -> Result<LockGuard, Error> {
        self.acquire(name).wait_forever().await
    }

    /// Tries once for an exclusive hold of `name`; `Conflict` if it is held.
    ///
    /// # Errors
    /// See [`AcquireBuilder`].
    pub async fn try_lock(&self, name: impl Into<String>) -> Result<LockGuard, Error> {
        self.acquire(name).await
    }

    /// One round trip to the daemon.
    ///
    /// # Errors
    /// [`Error::Disconnected`] if the connection is gone.
    pub async fn ping(&self) -> Result<(), Error> {
        self.call(&Op::Ping).await.map(|_| ())
    }

    /// Who holds and who waits for `key` (never tickets).
    ///
    /// # Errors
    /// `PermissionDenied` if the namespace is not yours; [`Error::Disconnected`].
    pub async fn describe(&self, key: &Key) -> Result<Description, Error> {
        match self.call(&Op::Describe { key: key.clone() }).await?.reply {
            Reply::Described(d) => Ok(d),
            other => Err(Error::Protocol(format!(
                "expected Described, got {other:?}"
            ))),
        }
    }

    /// Every key with holders or waiters in `namespace` (all visible namespaces if `None`)
    /// whose name starts with `prefix`, sorted, fetched page by page.
    ///
    /// # Errors
    /// [`Error::Disconnected`] and the like.
    pub async fn list(
        &self,
        namespace: Option<&str>,
        prefix: &str,
    ) -> Result<Vec<KeySummary>, Error> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = self
                .list_page(ListQuery {
                    namespace: namespace.map(str::to_string),
                    prefix: prefix.to_string(),
                    after,
                    limit: 1000,
                })
                .await?;
            all.extend(page.keys);
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(all),
            }
        }
    }

    /// One page of [`Client::list`].
    ///
    /// # Errors
    /// [`Error::Disconnected`] and the like.
    pub async fn list_page(&self, query: ListQuery) -> Result<ListPage, Error> {
        match self.call(&Op::List(query)).await?.reply {
            Reply::Listed(page) => Ok(page),
            other => Err(Error::Protocol(format!("expected Listed, got {other:?}"))),
        }
    }

    /// Ends every hold on `key` (root or a configured admin). Returns how many ended.
    ///
    /// # Errors
    /// `PermissionDenied` for other users.
    pub async fn force_release(&self, key: &Key) -> Result<u32, Error> {
        match self
            .call(&Op::ForceRelease { key: key.clone() })
            .await?
            .reply
        {
            Reply::ForceReleased { holds } => Ok(holds),
            other => Err(Error::Protocol(format!(
                "expected ForceReleased, got {other:?}"
            ))),
        }
    }

    /// A stream of every change on `key` from now on (granted, released, expired, forced,
    /// disconnected). Dropping the stream stops the watch.
    ///
    /// # Errors
    /// `PermissionDenied` if the namespace is not yours.
    pub async fn watch(&self, key: &Key) -> Result<Watch, Error> {
        let (events, rx) = mpsc::unbounded_channel();
        self.inner.conn.add_watch(key.clone(), events);
        let refused = match self.call(&Op::Watch { key: key.clone() }).await {
            Ok(Answer {
                reply: Reply::Watching,
                ..
            }) => return Ok(Watch { rx }),
            Ok(other) => Error::Protocol(format!("expected Watching, got {:?}", other.reply)),
            Err(e) => e,
        };
        // Refused (e.g. `PermissionDenied`): no events will come, so drop the route now.
        drop(rx);
        self.inner.conn.prune_watches(key);
        Err(refused)
    }

    /// The daemon's counters, gauges and latency distributions.
    ///
    /// # Errors
    /// [`Error::Disconnected`] and the like.
    pub async fn stats(&self) -> Result<Stats, Error> {
        match self.call(&Op::Stats).await?.reply {
            Reply::Stats(s) => Ok(s),
            other => Err(Error::Protocol(format!("expected Stats, got {other:?}"))),
        }
    }

    /// The connection's socket descriptor, or `None` once the connection has ended.
    ///
    /// The connection's socket; a process that inherits it keeps the connection — and its
    /// session holds — open: the daemon sees the connection close, and ends its holds, only
    /// once every copy of the descriptor is closed. It is close-on-exec; `lockctl run` clears
    /// `FD_CLOEXEC` in its command (between fork and exec) so that the command keeps the lock
    /// even if lockctl dies first, as flock(1) does. Never read or write it: the client owns
    /// the stream.
    ///
    /// Closing the connection on purpose (dropping the last handle and guard, with the runtime
    /// still running, or the runtime shutting down) shuts the socket down for every copy, so
    /// the holds end then even if another process still has it. A process that wants the
    /// inheritors alone to decide must leave without closing it: exit (e.g.
    /// `std::process::exit`, which runs no destructors), exec, or be killed.
    ///
    /// The number is valid only while the connection is open; the connection's reader task
    /// closes it when the daemon ends the connection, possibly on another thread right after
    /// this returns. Use [`Client::with_socket_fd`] to use the descriptor without that race.
    pub fn as_raw_fd(&self) -> Option<RawFd> {
        self.with_socket_fd(|fd| std::os::fd::AsRawFd::as_raw_fd(&fd))
    }

    /// Calls `f` with the connection's socket descriptor (see [`Client::as_raw_fd`]), which
    /// stays open while `f` runs; `None` (and `f` is not called) once the connection has ended.
    ///
    /// `f` runs under the connection's writer lock: it must not use this client (that would
    /// deadlock) and should be short (forking a child that inherits the descriptor is the
    /// intended use).
    pub fn with_socket_fd<R>(&self, f: impl FnOnce(BorrowedFd<'_>) -> R) -> Option<R> {
        self.inner.conn.with_socket_fd(f)
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.conn.closed.is_cancelled()
    }

    /// Resolves when the connection ends.
    pub async fn closed(&self) {
        self.inner.conn.closed.cancelled().await
    }

    /// Sends `op` and waits for its answer. Dropping the future withdraws a queued acquire.
    pub(crate) async fn call(&self, op: &Op) -> Result<Answer, Error> {
        self.call_forgetting(op, None).await
    }

    /// As [`Client::call`], and stops tracking the hold with fence `forget` first.
    pub(crate) async fn call_forgetting(
        &self,
        op: &Op,
        forget: Option<u64>,
    ) -> Result<Answer, Error> {
        let conn = &self.inner.conn;
        let (id, rx) = conn.call(op, forget).await?;
        let mut abandon = AbandonOnDrop {
            conn,
            id,
            armed: true,
        };
        let answer = rx.await;
        abandon.armed = false;
        answer.unwrap_or(Err(Error::Disconnected))
    }

    /// Sends `op` without waiting for its answer.
    pub(crate) fn fire(&self, op: &Op, forget: Option<u64>) {
        self.inner.conn.fire(op, forget);
    }
}

/// Changes on a watched key, as a [`futures_util::Stream`]; ends when the connection does.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::UnboundedReceiver<Change>,
}

impl Watch {
    /// The next change, or `None` once the connection has ended.
    pub async fn next(&mut self) -> Option<Change> {
        self.rx.recv().await
    }
}

impl futures_util::Stream for Watch {
    type Item = Change;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Change>> {
        self.rx.poll_recv(cx)
    }
}

/// Tells the connection that a caller stopped waiting.
struct AbandonOnDrop<'a> {
    conn: &'a Conn,
    id: u64,
    armed: bool,
}

impl Drop for AbandonOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.conn.abandon(self.id);
        }
    }
}

async fn handshake(
    path: &Path,
    client_name: String,
) -> Result<(UnixStream, ClientCodec, BytesMut, lockd_protocol::Welcome), Error> {
    let connect_err = |source| Error::Connect {
        path: PathBuf::from(path),
        source,
    };
    let stream = UnixStream::connect(path).await.map_err(connect_err)?;
    crate::trust::check_daemon(&stream, path).await?;
    let hello = ClientMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        client_name,
    });
    let mut codec = ClientCodec::default();
    let mut out = BytesMut::new();
    codec
        .encode(hello, &mut out)
        .map_err(|e| Error::Protocol(e.to_string()))?;
    let mut stream = stream;
    // A daemon that refuses the connection (a limit) sends `Rejected` and closes without
    // reading, so writing the Hello can fail with EPIPE while the reason already waits in
    // our receive queue: read it before reporting the write error.
    let write_failed = stream.write_all(&out).await.err();
    let mut inbuf = BytesMut::with_capacity(8 * 1024);
    loop {
        match codec.decode(&mut inbuf) {
            Ok(Some(ServerMessage::Welcome(w))) => {
                let codec = ClientCodec::new(w.limits.max_frame as usize);
                return Ok((stream, codec, inbuf, w));
            }
            Ok(Some(ServerMessage::Rejected(e))) => return Err(Error::Rejected(e)),
            Ok(Some(other)) => {
                return Err(Error::Protocol(format!("expected Welcome, got {other:?}")))
            }
            Ok(None) => {}
            Err(e) => return Err(Error::Protocol(e.to_string())),
        }
        inbuf.reserve(8 * 1024);
        let read = stream.read_buf(&mut inbuf).await;
        if let (Ok(0) | Err(_), Some(e)) = (&read, &write_failed) {
            return Err(Error::Protocol(format!("socket error: {e}")));
        }
        match read {
            Ok(0) => return Err(Error::Disconnected),
            Ok(_) => {}
            Err(e) => return Err(connect_err(e)),
        }
    }
}
