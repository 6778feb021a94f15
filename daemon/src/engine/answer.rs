//! What an engine operation answers: now, later through the queue, or after a store commit.

use std::sync::Arc;

use lockd_protocol::{Grant, Key, Reply, Ticket};

use super::leases::Extension;
use super::Engine;
use crate::error::Error;
use crate::store::{self, Done};

/// The answer to one request.
#[must_use]
pub enum Answer {
    /// The answer, now.
    Now(Result<Reply, Error>),
    /// Queued behind other holders: the grant (or a timeout, or a cancel) answers later, through
    /// the connection's mailbox.
    Queued,
    /// The answer follows a store commit: run the [`Deferred`] to completion (it finishes the
    /// state change even if the connection closes first) and deliver its result.
    AfterCommit(Deferred),
}

/// A change waiting for its store commits; [`Deferred::finish`] completes it.
#[must_use]
pub struct Deferred {
    engine: Arc<Engine>,
    commits: Vec<Done>,
    then: Then,
}

/// What completes once the commits are in (or undoes if they failed).
pub(super) enum Then {
    /// A detached lease was granted; on failure it is taken back.
    Granted { key: Key, grant: Grant },
    /// A detached lease's renewal, applied to memory only on success.
    Renewed { ticket: Ticket, next: Extension },
    /// A detached lease's release by connection `by`; on success its hold ends, on failure it
    /// stays.
    Released { ticket: Ticket, by: u64 },
    /// A force-release whose detached leases' deletions (of `tickets`) were stored.
    ForceReleased { holds: u32, tickets: Vec<Ticket> },
}

impl Deferred {
    pub(super) fn new(engine: Arc<Engine>, commits: Vec<Done>, then: Then) -> Deferred {
        Deferred {
            engine,
            commits,
            then,
        }
    }

    /// Waits for the commits, then makes the state change that depends on them and hands the
    /// request's answer to `deliver` (for a detached grant, while the key's shard is locked, so
    /// the answer is ordered with the key's events: a `HoldLost` never overtakes a `Granted`).
    pub async fn finish_with(self, deliver: impl FnOnce(Result<Reply, Error>)) {
        let mut outcome = Ok(());
        for done in self.commits {
            if let Err(e) = store::outcome(done.await) {
                outcome = Err(e.to_string());
            }
        }
        self.engine.finish(outcome, self.then, deliver);
    }

    /// As [`Deferred::finish_with`], returning the answer.
    pub async fn finish(self) -> Result<Reply, Error> {
        let mut answer = None;
        self.finish_with(|r| answer = Some(r)).await;
        answer.unwrap_or_else(|| Err(Error::Internal("the answer was not delivered".into())))
    }
}
