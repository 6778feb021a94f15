//! Leader election on one key: `campaign` (a blocking acquire whose data is the candidate's
//! identity), `observe` (describe, then describe again after every watch event), `resign`
//! (release).

use std::time::Duration;

use lockd_protocol::{Key, Mode};

use crate::{Client, Error, LockGuard, Lost, Watch};

/// The leader of an election, as observers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Leader {
    /// What the leader passed to [`Election::campaign`].
    pub identity: Vec<u8>,
    /// Its fencing token: pass it to whatever the leader writes to.
    pub fence: u64,
    /// The leader's process id, when the daemon knows it.
    pub pid: Option<i32>,
    /// The leader's user id.
    pub uid: u32,
}

/// One election: a lock key whose exclusive holder is the leader.
///
/// ```no_run
/// # async fn demo(client: lockd_client::Client) -> Result<(), lockd_client::Error> {
/// use std::time::Duration;
/// let election = lockd_client::Election::new(&client, "default", "scheduler")?;
/// let leadership = election.campaign("host-a:8080", Some(Duration::from_secs(30))).await?;
/// // Lead: pass leadership.fence() to whatever the leader writes to ...
/// leadership.resign().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Election {
    client: Client,
    key: Key,
}

impl Election {
    /// An election on `name` in `namespace`.
    ///
    /// # Errors
    /// [`Error::InvalidKey`].
    pub fn new(client: &Client, namespace: &str, name: &str) -> Result<Election, Error> {
        Ok(Election {
            client: client.clone(),
            key: Key::new(namespace, name)?,
        })
    }

    /// Waits until this candidate leads. `identity` (at most 1 KiB, e.g. an address) is what
    /// observers see. With a `lease`, leadership also ends if this process stops renewing
    /// (the guard renews in the background).
    ///
    /// # Errors
    /// As for an acquire; dropping the future withdraws the candidacy.
    pub async fn campaign(
        &self,
        identity: impl Into<Vec<u8>>,
        lease: Option<Duration>,
    ) -> Result<Leadership, Error> {
        let mut acquire = self
            .client
            .acquire(self.key.name.clone())
            .namespace(self.key.namespace.clone())
            .data(identity)
            .wait_forever();
        if let Some(lease) = lease {
            acquire = acquire.lease(lease);
        }
        Ok(Leadership {
            guard: acquire.await?,
        })
    }

    /// The current leader, if any.
    ///
    /// # Errors
    /// [`Error::Disconnected`] and the like.
    pub async fn leader(&self) -> Result<Option<Leader>, Error> {
        let d = self.client.describe(&self.key).await?;
        Ok(d.holders
            .into_iter()
            .find(|h| h.mode == Mode::Exclusive)
            .map(|h| Leader {
                identity: h.data,
                fence: h.fence,
                pid: h.owner.pid,
                uid: h.owner.uid,
            }))
    }

    /// Follows the leadership: see [`Observer::next`].
    ///
    /// # Errors
    /// [`Error::Disconnected`] and the like.
    pub async fn observe(&self) -> Result<Observer, Error> {
        let watch = self.client.watch(&self.key).await?;
        Ok(Observer {
            election: self.clone(),
            watch,
            last: None,
        })
    }
}

/// This candidate's leadership. Resign by [`Leadership::resign`] or by dropping it.
#[derive(Debug)]
pub struct Leadership {
    guard: LockGuard,
}

impl Leadership {
    /// The fencing token of this term: pass it to whatever the leader writes to.
    pub fn fence(&self) -> u64 {
        self.guard.fence()
    }

    /// True once leadership has been lost without resigning (never blocks).
    pub fn is_lost(&self) -> bool {
        self.guard.is_lost()
    }

    /// Resolves when leadership is lost without resigning (lease expired, force-released,
    /// daemon gone): stop acting as leader at once.
    pub async fn lost(&self) -> Lost {
        self.guard.lost().await
    }

    /// Steps down; the next candidate in line becomes leader.
    ///
    /// # Errors
    /// [`Error::Lock`] with `NotHolder` if leadership had already been lost.
    pub async fn resign(self) -> Result<(), Error> {
        self.guard.release().await
    }
    /// The hold behind this leadership (for the blocking client's wrapper).
    pub(crate) fn into_guard(self) -> LockGuard {
        self.guard
    }
}

/// Reports the leader whenever it changes.
#[derive(Debug)]
pub struct Observer {
    election: Election,
    watch: Watch,
    /// What was reported last (`None` before the first report).
    last: Option<Option<Leader>>,
}

impl Observer {
    /// The current leader on the first call, then the leader after each change (`None` while
    /// nobody leads). Returns `None` once the connection has ended.
    pub async fn next(&mut self) -> Option<Result<Option<Leader>, Error>> {
        loop {
            if self.last.is_some() {
                self.watch.next().await?;
            }
            let now = match self.election.leader().await {
                Ok(now) => now,
                Err(e) => return Some(Err(e)),
            };
            if self.last.as_ref() != Some(&now) {
                self.last = Some(now.clone());
                return Some(Ok(now));
            }
        }
    }
}
