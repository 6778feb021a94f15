//! Leader election with blocking calls: [`crate::Election`] on the connection's runtime.

use std::sync::Arc;
use std::time::Duration;

use crate::{Error, Leader, Lost};

use super::{Client, LockGuard, Runtime};

/// One election: a lock key whose exclusive holder is the leader (see [`crate::Election`]).
///
/// ```no_run
/// # fn demo(client: lockd_client::blocking::Client) -> Result<(), lockd_client::Error> {
/// use std::time::Duration;
/// let election = lockd_client::blocking::Election::new(&client, "default", "scheduler")?;
/// let leadership = election.campaign("host-a:8080", Some(Duration::from_secs(30)))?;
/// while !leadership.is_lost() {
///     // One step of the leader's work, fenced with leadership.fence() ...
/// #   break;
/// }
/// leadership.resign()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Election {
    inner: crate::Election,
    rt: Arc<Runtime>,
}

impl Election {
    /// An election on `name` in `namespace`.
    ///
    /// # Errors
    /// [`Error::InvalidKey`].
    pub fn new(client: &Client, namespace: &str, name: &str) -> Result<Election, Error> {
        Ok(Election {
            inner: crate::Election::new(&client.inner, namespace, name)?,
            rt: Arc::clone(&client.rt),
        })
    }

    /// Blocks until this candidate leads; see [`crate::Election::campaign`].
    ///
    /// # Errors
    /// As for an acquire.
    pub fn campaign(
        &self,
        identity: impl Into<Vec<u8>>,
        lease: Option<Duration>,
    ) -> Result<Leadership, Error> {
        let inner = self.rt.block_on(self.inner.campaign(identity, lease))?;
        Ok(Leadership {
            guard: LockGuard::wrap(inner.into_guard(), Arc::clone(&self.rt)),
        })
    }

    /// The current leader, if any.
    ///
    /// # Errors
    /// [`Error::Disconnected`] and the like.
    pub fn leader(&self) -> Result<Option<Leader>, Error> {
        self.rt.block_on(self.inner.leader())
    }

    /// Follows the leadership: see [`Observer::next_timeout`].
    ///
    /// # Errors
    /// [`Error::Disconnected`] and the like.
    pub fn observe(&self) -> Result<Observer, Error> {
        let inner = self.rt.block_on(self.inner.observe())?;
        Ok(Observer {
            inner,
            rt: Arc::clone(&self.rt),
        })
    }
}

/// This candidate's leadership: the blocking hold of the election's key. Resign by
/// [`Leadership::resign`] or by dropping it.
#[derive(Debug)]
pub struct Leadership {
    guard: LockGuard,
}

impl Leadership {
    /// The fencing token of this term: pass it to whatever the leader writes to.
    pub fn fence(&self) -> u64 {
        self.guard.fence()
    }

    /// True once leadership has been lost without resigning: stop acting as leader. Never
    /// blocks.
    pub fn is_lost(&self) -> bool {
        self.guard.is_lost()
    }

    /// Blocks until leadership is lost, for at most `timeout`: `Some(why)` if it was lost,
    /// `None` if it was intact when `timeout` ran out.
    pub fn wait_lost(&self, timeout: Duration) -> Option<Lost> {
        self.guard.wait_lost(timeout)
    }

    /// Steps down; the next candidate in line becomes leader.
    ///
    /// # Errors
    /// [`Error::Lock`] with `NotHolder` if leadership had already been lost.
    pub fn resign(self) -> Result<(), Error> {
        self.guard.release()
    }
}

/// Reports the leader whenever it changes (see [`crate::Observer`]).
#[derive(Debug)]
pub struct Observer {
    inner: crate::Observer,
    rt: Arc<Runtime>,
}

impl Observer {
    /// The current leader on the first call, then the leader after each change (`None` while
    /// nobody leads), waiting at most `timeout` for a change.
    ///
    /// Returns `None` when `timeout` ran out without a change or once the connection has ended
    /// (then [`Client::is_closed`] is true).
    ///
    /// # Errors
    /// [`Error::Disconnected`] and the like, from the describe that follows a change.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Result<Option<Leader>, Error>> {
        let inner = &mut self.inner;
        self.rt
            .block_on(async { tokio::time::timeout(timeout, inner.next()).await })
            .ok()
            .flatten()
    }
}
