//! The client for programs without an async runtime: the async [`crate::Client`] behind
//! blocking calls.
//!
//! ```no_run
//! use std::time::Duration;
//! use lockd_client::blocking::Client;
//!
//! # fn main() -> Result<(), lockd_client::Error> {
//! let client = Client::connect_default()?;
//! let guard = client.acquire("nightly-backup").wait(Duration::from_secs(30)).send()?;
//! println!("holding with fence {}", guard.fence());
//! // ... work, checking `guard.is_lost()` between steps ...
//! if let Some(why) = guard.wait_lost(Duration::from_secs(1)) {
//!     eprintln!("lock lost ({why}): stop touching the resource");
//! }
//! guard.release()?;
//! # Ok(()) }
//! ```
//!
//! The guarantees are the async client's: one [`Client`] is one connection, every hold ends
//! when it closes, a [`LockGuard`] releases its hold when dropped, and a lost hold is reported
//! ([`LockGuard::is_lost`], [`LockGuard::wait_lost`]). [`Election`] is leader election, the
//! same way.
//!
//! Each connection runs a private current-thread tokio runtime on a background thread
//! (`lockd-client`), which reads the socket, delivers lost-hold signals and renews leases while
//! the caller's thread does something else. The thread ends when the client, its clones and
//! every guard, builder and watch made from it are gone (dropping them from any thread is
//! fine). Calls block the calling thread until the daemon answers.
//!
//! # Panics
//! Every blocking call panics when made from inside an async runtime (tokio forbids blocking
//! there): use the async [`crate::Client`] in async code.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;

use crate::{
    ConnectOptions, Description, Error, Key, KeySummary, Limits, ListPage, ListQuery, Stats, Ticket,
};

mod election;
mod guard;

pub use election::{Election, Leadership, Observer};
pub use guard::{AcquireBuilder, LockGuard, Watch};

/// A connection to lockd with blocking calls. Cheap to clone; clones share the connection.
///
/// Every hold taken through a client ends when the connection closes, which happens when the
/// last clone and the last [`LockGuard`] are dropped, or when the daemon goes away.
#[derive(Clone, Debug)]
pub struct Client {
    // Dropped before `rt` (declaration order), so the connection closes while its runtime runs.
    inner: crate::Client,
    rt: Arc<Runtime>,
}

impl Client {
    /// Connects to the daemon at `path`.
    ///
    /// # Errors
    /// [`Error::Connect`] if nothing listens there (or the background thread cannot start);
    /// [`Error::Rejected`] on a version mismatch.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
        Client::connect_with(path, ConnectOptions::default())
    }

    /// Connects to `$LOCKD_SOCKET`, else the daemon's default socket path.
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub fn connect_default() -> Result<Client, Error> {
        // The async client resolves the path (and checks it) as it always does.
        Client::start(
            Path::new("the default socket"),
            crate::Client::connect_default(),
        )
    }

    /// Connects with explicit options.
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub fn connect_with(path: impl AsRef<Path>, options: ConnectOptions) -> Result<Client, Error> {
        let path = path.as_ref();
        Client::start(path, crate::Client::connect_with(path, options))
    }

    /// Starts the connection's runtime and runs `connect` on it; `path` names the socket in
    /// the error if the runtime cannot start.
    fn start(
        path: &Path,
        connect: impl Future<Output = Result<crate::Client, Error>>,
    ) -> Result<Client, Error> {
        let rt = Runtime::start().map_err(|source| Error::Connect {
            path: PathBuf::from(path),
            source,
        })?;
        let rt = Arc::new(rt);
        let inner = rt.block_on(connect)?;
        Ok(Client { inner, rt })
    }

    /// Limits the daemon announced in the handshake.
    pub fn limits(&self) -> Limits {
        self.inner.limits()
    }

    /// The daemon's version string.
    pub fn server_version(&self) -> &str {
        self.inner.server_version()
    }

    /// Starts building an acquire of `name` (namespace `default`, exclusive, no wait); finish
    /// it with [`AcquireBuilder::send`] or [`AcquireBuilder::detached`].
    pub fn acquire(&self, name: impl Into<String>) -> AcquireBuilder {
        AcquireBuilder::new(self.inner.acquire(name), Arc::clone(&self.rt))
    }

    /// Waits as long as it takes for an exclusive hold of `name`.
    ///
    /// # Errors
    /// See [`crate::AcquireBuilder`].
    pub fn lock(&self, name: impl Into<String>) -> Result<LockGuard, Error> {
        self.acquire(name).wait_forever().send()
    }

    /// Tries once for an exclusive hold of `name`; `Conflict` ([`Error::is_conflict`]) if it
    /// is held.
    ///
    /// # Errors
    /// See [`crate::AcquireBuilder`].
    pub fn try_lock(&self, name: impl Into<String>) -> Result<LockGuard, Error> {
        self.acquire(name).send()
    }

    /// Extends the lease with `ticket`: see [`crate::Client::renew`].
    ///
    /// # Errors
    /// As [`crate::Client::renew`].
    pub fn renew(&self, ticket: &Ticket, lease: Option<Duration>) -> Result<SystemTime, Error> {
        self.rt.block_on(self.inner.renew(ticket, lease))
    }

    /// Releases the hold with `ticket`: see [`crate::Client::release`].
    ///
    /// # Errors
    /// As [`crate::Client::release`].
    pub fn release(&self, ticket: &Ticket) -> Result<(), Error> {
        self.rt.block_on(self.inner.release(ticket))
    }

    /// One round trip to the daemon.
    ///
    /// # Errors
    /// [`Error::Disconnected`] if the connection is gone.
    pub fn ping(&self) -> Result<(), Error> {
        self.rt.block_on(self.inner.ping())
    }

    /// Who holds and who waits for `key` (never tickets).
    ///
    /// # Errors
    /// As [`crate::Client::describe`].
    pub fn describe(&self, key: &Key) -> Result<Description, Error> {
        self.rt.block_on(self.inner.describe(key))
    }

    /// Every key with holders or waiters: see [`crate::Client::list`].
    ///
    /// # Errors
    /// As [`crate::Client::list`].
    pub fn list(&self, namespace: Option<&str>, prefix: &str) -> Result<Vec<KeySummary>, Error> {
        self.rt.block_on(self.inner.list(namespace, prefix))
    }

    /// One page of [`Client::list`].
    ///
    /// # Errors
    /// As [`crate::Client::list_page`].
    pub fn list_page(&self, query: ListQuery) -> Result<ListPage, Error> {
        self.rt.block_on(self.inner.list_page(query))
    }

    /// Ends every hold on `key` (root or a configured admin). Returns how many ended.
    ///
    /// # Errors
    /// As [`crate::Client::force_release`].
    pub fn force_release(&self, key: &Key) -> Result<u32, Error> {
        self.rt.block_on(self.inner.force_release(key))
    }

    /// Every change on `key` from now on, as a blocking iterator. Dropping it stops the watch.
    ///
    /// # Errors
    /// As [`crate::Client::watch`].
    pub fn watch(&self, key: &Key) -> Result<Watch, Error> {
        let watch = self.rt.block_on(self.inner.watch(key))?;
        Ok(Watch::new(watch, Arc::clone(&self.rt)))
    }

    /// The daemon's counters, gauges and latency distributions.
    ///
    /// # Errors
    /// As [`crate::Client::stats`].
    pub fn stats(&self) -> Result<Stats, Error> {
        self.rt.block_on(self.inner.stats())
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// The async client this one wraps (for a program that also runs async code on its own
    /// runtime; its calls then run there, not on this client's thread).
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }
}

/// A current-thread runtime driven by its own thread until this is dropped.
#[derive(Debug)]
struct Runtime {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    thread_id: ThreadId,
}

impl Runtime {
    fn start() -> std::io::Result<Runtime> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("lockd-client".to_string())
            .spawn(move || {
                // Drives the connection's tasks and timers (and the I/O of every `block_on`)
                // until stopped; dropping `rt` then drops what is left (the connection's task
                // closes the socket).
                rt.block_on(async {
                    let _ = stopped.await;
                });
                // Not a plain drop, which would wait without end for a blocking task (a user
                // database lookup that hangs): the connection's tasks are dropped either way.
                rt.shutdown_background();
            })?;
        Ok(Runtime {
            handle,
            stop: Some(stop),
            thread_id: thread.thread().id(),
            thread: Some(thread),
        })
    }

    /// Runs `f` to completion on the calling thread; the runtime's thread drives its I/O and
    /// timers, and runs what it spawns.
    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.handle.block_on(f)
    }

    /// Makes `tokio` calls that need a runtime (spawning, timers) work in `f`.
    fn enter<R>(&self, f: impl FnOnce() -> R) -> R {
        let _entered = self.handle.enter();
        f()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Joined so that the connection's socket is closed when the last handle is gone; never
        // from the runtime's own thread (nothing there holds a handle, but a join would hang).
        if let Some(thread) = self.thread.take() {
            if std::thread::current().id() != self.thread_id {
                let _ = thread.join();
            }
        }
    }
}
