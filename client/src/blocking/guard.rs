//! The blocking [`AcquireBuilder`], [`LockGuard`] and [`Watch`]: the async ones, each with the
//! connection's runtime to block on.

use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use crate::{Change, DetachedLease, Error, Key, Lost, Mode, Ticket};

use super::Runtime;

/// An acquire being set up; [`AcquireBuilder::send`] sends it and blocks until it is granted or
/// refused. The options are those of [`crate::AcquireBuilder`].
///
/// ```no_run
/// # fn demo(client: lockd_client::blocking::Client) -> Result<(), lockd_client::Error> {
/// use std::time::Duration;
/// let guard = client
///     .acquire("reports")
///     .shared()
///     .wait(Duration::from_secs(5))
///     .send()?;
/// # drop(guard); Ok(()) }
/// ```
#[must_use = "an acquire does nothing until sent"]
pub struct AcquireBuilder {
    inner: crate::AcquireBuilder,
    rt: Arc<Runtime>,
}

impl std::fmt::Debug for AcquireBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcquireBuilder").finish_non_exhaustive()
    }
}

impl AcquireBuilder {
    pub(super) fn new(inner: crate::AcquireBuilder, rt: Arc<Runtime>) -> AcquireBuilder {
        AcquireBuilder { inner, rt }
    }

    fn map(self, f: impl FnOnce(crate::AcquireBuilder) -> crate::AcquireBuilder) -> Self {
        AcquireBuilder {
            inner: f(self.inner),
            rt: self.rt,
        }
    }

    /// Use namespace `ns` instead of `default`.
    pub fn namespace(self, ns: impl Into<String>) -> Self {
        self.map(|b| b.namespace(ns))
    }

    /// Ask for a shared hold (many shared holders may coexist).
    pub fn shared(self) -> Self {
        self.map(crate::AcquireBuilder::shared)
    }

    /// Ask for an exclusive hold (the default).
    pub fn exclusive(self) -> Self {
        self.map(crate::AcquireBuilder::exclusive)
    }

    /// Ask for `mode`.
    pub fn mode(self, mode: Mode) -> Self {
        self.map(|b| b.mode(mode))
    }

    /// Wait in the key's FIFO queue for at most `d` (zero means do not wait); then fail with
    /// `Timeout` ([`Error::is_timeout`]).
    pub fn wait(self, d: Duration) -> Self {
        self.map(|b| b.wait(d))
    }

    /// Wait until granted. The call cannot be interrupted: prefer [`AcquireBuilder::wait`].
    pub fn wait_forever(self) -> Self {
        self.map(crate::AcquireBuilder::wait_forever)
    }

    /// Attach opaque bytes shown by describe.
    pub fn data(self, data: impl Into<Vec<u8>>) -> Self {
        self.map(|b| b.data(data))
    }

    /// Give the hold a lease: the guard renews it on the client's thread every third of the
    /// lease, and reports [`Lost::Expired`] if a renewal fails.
    pub fn lease(self, lease: Duration) -> Self {
        self.map(|b| b.lease(lease))
    }

    /// Make the key a counting semaphore of `n` slots (see [`crate::AcquireBuilder::permits`]).
    pub fn permits(self, n: u32) -> Self {
        self.map(|b| b.permits(n))
    }

    /// Lock-delay `d` (see [`crate::AcquireBuilder::lock_delay`]).
    pub fn lock_delay(self, d: Duration) -> Self {
        self.map(|b| b.lock_delay(d))
    }

    /// Sends the acquire and blocks until it is granted or refused.
    ///
    /// # Errors
    /// As [`crate::AcquireBuilder`].
    pub fn send(self) -> Result<LockGuard, Error> {
        let guard = self
            .rt
            .block_on(std::future::IntoFuture::into_future(self.inner))?;
        Ok(LockGuard::wrap(guard, self.rt))
    }

    /// Takes a detached lease instead of a guard (requires [`AcquireBuilder::lease`]); see
    /// [`crate::AcquireBuilder::detached`].
    ///
    /// # Errors
    /// As [`crate::AcquireBuilder::detached`].
    pub fn detached(self) -> Result<DetachedLease, Error> {
        self.rt.block_on(self.inner.detached())
    }
}

/// A granted hold: the blocking form of [`crate::LockGuard`], with the same guarantees.
///
/// Dropping it releases the hold (sent at once, without waiting for the answer);
/// [`LockGuard::release`] waits for the daemon's confirmation. Check [`LockGuard::is_lost`]
/// between steps of work, or block in [`LockGuard::wait_lost`] (e.g. on a watchdog thread:
/// the guard is `Sync`).
#[derive(Debug)]
pub struct LockGuard {
    /// `None` only while being released or dropped. Dropped before `rt`.
    guard: Option<crate::LockGuard>,
    rt: Arc<Runtime>,
}

impl LockGuard {
    /// Wraps an async hold driven by `rt`.
    pub(super) fn wrap(guard: crate::LockGuard, rt: Arc<Runtime>) -> LockGuard {
        LockGuard {
            guard: Some(guard),
            rt,
        }
    }

    fn inner(&self) -> &crate::LockGuard {
        self.guard
            .as_ref()
            .expect("a guard is only taken out when it is consumed")
    }

    /// The fencing token: greater than every fence the daemon granted before this hold.
    pub fn fence(&self) -> u64 {
        self.inner().fence()
    }

    /// The held key.
    pub fn key(&self) -> &Key {
        self.inner().key()
    }

    /// The mode granted.
    pub fn mode(&self) -> Mode {
        self.inner().mode()
    }

    /// The hold's ticket, a secret capability: never log it.
    pub fn ticket(&self) -> &Ticket {
        self.inner().ticket()
    }

    /// True once the hold has been lost (lease expired, force-released, connection gone). Never
    /// blocks.
    pub fn is_lost(&self) -> bool {
        self.inner().is_lost()
    }

    /// Blocks until the hold is lost, for at most `timeout`: `Some(why)` if it was lost (at
    /// once if it already was), `None` if it was still intact when `timeout` ran out.
    pub fn wait_lost(&self, timeout: Duration) -> Option<Lost> {
        let guard = self.inner();
        self.rt
            .block_on(async { tokio::time::timeout(timeout, guard.lost()).await.ok() })
    }

    /// Releases the hold and waits for the daemon to confirm.
    ///
    /// # Errors
    /// [`Error::Lock`] with `NotHolder` if the hold had already ended; [`Error::Disconnected`].
    pub fn release(mut self) -> Result<(), Error> {
        match self.guard.take() {
            Some(guard) => self.rt.block_on(guard.release()),
            None => Ok(()),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take() {
            // The async guard's drop sends the release without waiting.
            self.rt.enter(|| drop(guard));
        }
    }
}

/// Changes on a watched key, as a blocking iterator; it ends when the connection does.
#[derive(Debug)]
pub struct Watch {
    inner: crate::Watch,
    rt: Arc<Runtime>,
}

impl Watch {
    pub(super) fn new(inner: crate::Watch, rt: Arc<Runtime>) -> Watch {
        Watch { inner, rt }
    }

    /// Blocks until the next change for at most `timeout`.
    ///
    /// # Errors
    /// [`RecvTimeoutError::Timeout`] if none came in time; [`RecvTimeoutError::Disconnected`]
    /// once the connection has ended.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Change, RecvTimeoutError> {
        let inner = &mut self.inner;
        match self
            .rt
            .block_on(async { tokio::time::timeout(timeout, inner.next()).await })
        {
            Ok(Some(change)) => Ok(change),
            Ok(None) => Err(RecvTimeoutError::Disconnected),
            Err(_) => Err(RecvTimeoutError::Timeout),
        }
    }
}

impl Iterator for Watch {
    type Item = Change;

    /// Blocks until the next change; `None` once the connection has ended.
    fn next(&mut self) -> Option<Change> {
        let inner = &mut self.inner;
        self.rt.block_on(inner.next())
    }
}
