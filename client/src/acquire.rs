//! [`AcquireBuilder`]: one acquire, set up then awaited; and [`DetachedLease`], what a
//! detached acquire returns.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use lockd_protocol::{Acquire, Key, Mode, Op, Reply, Ticket, Wait};

use crate::client::Client;
use crate::connection::Answer;
use crate::guard::LockGuard;
use crate::Error;

/// An acquire being set up; `.await` it to send it.
///
/// Defaults: namespace `default`, exclusive, no wait (answer `Conflict` at once). Dropping the
/// future while it waits withdraws the request from the queue.
///
/// # Errors
/// [`Error::Lock`] with `Conflict` (held, no wait), `Timeout` (waited in vain),
/// `InvalidArgument`, `LimitExceeded` or `PermissionDenied`; [`Error::InvalidKey`];
/// [`Error::Disconnected`].
#[must_use = "an acquire does nothing until awaited"]
pub struct AcquireBuilder {
    pub(crate) client: Client,
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) mode: Mode,
    pub(crate) wait: Wait,
    pub(crate) data: Vec<u8>,
    pub(crate) lease: Option<Duration>,
    pub(crate) permits: Option<u32>,
    pub(crate) lock_delay: Duration,
}

/// Milliseconds of `d`, saturating.
pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A detached lease: it outlives the connection and ends when released by ticket
/// ([`Client::release`]) or when its time runs out without a renewal ([`Client::renew`]).
/// Nothing renews or releases it automatically.
///
/// Any connection of the same uid, in any process, may renew or release it with its ticket.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DetachedLease {
    /// The leased key.
    pub key: Key,
    /// The capability to renew and release it: a secret (its `Debug` is redacted); hand it on
    /// only through a private channel. [`Ticket::to_text`] for scripts.
    pub ticket: Ticket,
    /// The fencing token of the hold.
    pub fence: u64,
    /// The mode granted.
    pub mode: Mode,
    /// When the lease ends unless renewed (wall clock).
    pub expires_at: SystemTime,
}

impl AcquireBuilder {
    /// Use namespace `ns` instead of `default`.
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = ns.into();
        self
    }

    /// Ask for a shared hold (many shared holders may coexist).
    pub fn shared(mut self) -> Self {
        self.mode = Mode::Shared;
        self
    }

    /// Ask for an exclusive hold (the default).
    pub fn exclusive(mut self) -> Self {
        self.mode = Mode::Exclusive;
        self
    }

    /// Ask for `mode` (same as [`AcquireBuilder::shared`] or [`AcquireBuilder::exclusive`]).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Wait in the key's FIFO queue for at most `d` (zero means do not wait), measured by the
    /// daemon from when it receives the request; then fail with `Timeout`.
    pub fn wait(mut self, d: Duration) -> Self {
        let ms = duration_ms(d);
        self.wait = if ms == 0 { Wait::No } else { Wait::Millis(ms) };
        self
    }

    /// Wait until granted (or until the future is dropped, which withdraws the request).
    pub fn wait_forever(mut self) -> Self {
        self.wait = Wait::Forever;
        self
    }

    /// Attach opaque bytes shown by describe (at most [`lockd_protocol::Limits::max_data`]).
    pub fn data(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.data = data.into();
        self
    }

    /// Give the hold a lease: it also ends if not renewed within `lease`. The guard renews it in
    /// the background every third of the lease, and reports [`crate::Lost::Expired`] if a
    /// renewal fails.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Make the key a counting semaphore: at most `n` holders at once, each taking one slot
    /// (the hold must be exclusive, the default). The first holder or waiter of a key fixes its
    /// capacity; without this the key is a plain lock.
    pub fn permits(mut self, n: u32) -> Self {
        self.permits = Some(n);
        self
    }

    /// Lock-delay: if this hold ends without a release (its connection closed, its lease
    /// expired, it was force-released), nobody is granted the key for `d` afterwards, so work
    /// the lost holder may still be doing has time to stop. Zero (the default): none.
    pub fn lock_delay(mut self, d: Duration) -> Self {
        self.lock_delay = d;
        self
    }

    /// Takes a detached lease instead of a guard (requires [`AcquireBuilder::lease`]). When
    /// this returns, the lease is stored: it survives this connection and a daemon restart.
    ///
    /// ```no_run
    /// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
    /// use std::time::Duration;
    /// let lease = client
    ///     .acquire("deploy")
    ///     .lease(Duration::from_secs(600))
    ///     .detached()
    ///     .await?;
    /// // Hand `lease.ticket.to_text()` to the process that finishes the work (privately).
    /// client.release(&lease.ticket).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As for the guard; also `Unavailable` if the lease could not be stored.
    pub async fn detached(self) -> Result<DetachedLease, Error> {
        let (key, answer) = self.send_op(true).await?;
        let grant = match (answer.reply, answer.hold) {
            // Detached: the connection must not release it when the answer is dropped.
            (Reply::Granted(grant), Some(hold)) => {
                let _ = hold.adopt();
                grant
            }
            (other, _) => return Err(Error::Protocol(format!("expected Granted, got {other:?}"))),
        };
        Ok(DetachedLease {
            key,
            ticket: grant.ticket,
            fence: grant.fence,
            mode: grant.mode,
            // A detached grant always carries its lease's end; the epoch if a daemon forgot it.
            expires_at: grant.expires_at().unwrap_or(std::time::UNIX_EPOCH),
        })
    }

    async fn send_op(self, detach: bool) -> Result<(Key, Answer), Error> {
        let op = Op::Acquire(Acquire {
            key: Key::new(self.namespace, self.name)?,
            mode: self.mode,
            wait: self.wait,
            lease_ms: self.lease.map(duration_ms),
            detach,
            permits: self.permits,
            lock_delay_ms: duration_ms(self.lock_delay),
            data: self.data,
        });
        let answer = self.client.call(&op).await?;
        let Op::Acquire(Acquire { key, .. }) = op else {
            unreachable!("built as an acquire above")
        };
        Ok((key, answer))
    }

    async fn send(self) -> Result<LockGuard, Error> {
        let client = self.client.clone();
        let lease = self.lease;
        let (key, answer) = self.send_op(false).await?;
        match (answer.reply, answer.hold) {
            (Reply::Granted(grant), Some(hold)) => {
                Ok(LockGuard::new(client, key, grant, hold.adopt(), lease))
            }
            (other, _) => Err(Error::Protocol(format!("expected Granted, got {other:?}"))),
        }
    }
}

impl IntoFuture for AcquireBuilder {
    type Output = Result<LockGuard, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<LockGuard, Error>> + Send + 'static>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}
