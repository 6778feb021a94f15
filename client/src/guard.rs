//! [`LockGuard`]: a granted hold, released by `release().await` or, in the background, on drop.

use std::sync::Arc;
use std::time::Duration;

use lockd_protocol::{Grant, Key, Mode, Op, Reply, Ticket};

use crate::connection::HoldState;
use crate::{Client, Error};

/// Why a hold ended without being released.
///
/// New reasons may be added in a minor release: match with a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lost {
    /// Its lease ran out.
    Expired,
    /// An administrator force-released the key.
    ForceReleased,
    /// Another connection of the same uid released it by its ticket.
    ReleasedElsewhere,
    /// The connection to the daemon broke (daemon crashed, socket closed).
    Disconnected,
    /// The daemon announced it is shutting down.
    DaemonShutdown,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lost::Expired => "the lease expired",
            Lost::ForceReleased => "an administrator force-released the lock",
            Lost::ReleasedElsewhere => "it was released by its ticket from another connection",
            Lost::Disconnected => "the connection to lockd was lost",
            Lost::DaemonShutdown => "lockd is shutting down",
        })
    }
}

/// A granted hold. While it lives (and [`LockGuard::lost`] has not resolved) the holder may use
/// the protected resource, passing [`LockGuard::fence`] along so stale holders can be refused.
///
/// Dropping the guard releases the hold in the background (the release is sent without
/// waiting for its answer); [`LockGuard::release`] waits for the daemon's confirmation. A
/// leased hold is renewed in the background while the guard lives.
#[derive(Debug)]
pub struct LockGuard {
    client: Client,
    key: Key,
    ticket: Ticket,
    fence: u64,
    mode: Mode,
    hold: Arc<HoldState>,
    released: bool,
    /// The background renewal of a leased hold, stopped with the guard.
    renewal: Option<tokio::task::AbortHandle>,
}

impl LockGuard {
    pub(crate) fn new(
        client: Client,
        key: Key,
        grant: Grant,
        hold: Arc<HoldState>,
        lease: Option<Duration>,
    ) -> LockGuard {
        let renewal = lease.map(|lease| {
            let task = renew_loop(client.clone(), grant.ticket, lease, Arc::clone(&hold));
            tokio::spawn(task).abort_handle()
        });
        LockGuard {
            client,
            key,
            ticket: grant.ticket,
            fence: grant.fence,
            mode: grant.mode,
            hold,
            released: false,
            renewal,
        }
    }

    /// The fencing token: greater than every fence the daemon granted before this hold.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// The held key.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The mode granted.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The hold's ticket, a secret capability: never log it.
    pub fn ticket(&self) -> &Ticket {
        &self.ticket
    }

    /// True once the hold has been lost.
    pub fn is_lost(&self) -> bool {
        self.hold.lost_reason().is_some()
    }

    /// Resolves when the hold is lost (lease expired, force-released, connection gone), with
    /// the reason. Never resolves while the hold is intact; cancel-safe.
    pub async fn lost(&self) -> Lost {
        self.hold.lost().await
    }

    /// Releases the hold and waits for the daemon to confirm.
    ///
    /// # Errors
    /// [`Error::Lock`] with `NotHolder` if the hold had already ended; [`Error::Disconnected`].
    pub async fn release(mut self) -> Result<(), Error> {
        self.released = true;
        if let Some(r) = self.renewal.take() {
            r.abort();
        }
        let release = Op::Release {
            ticket: self.ticket,
        };
        let answer = self
            .client
            .call_forgetting(&release, Some(self.fence))
            .await?;
        match answer.reply {
            Reply::Released => Ok(()),
            other => Err(Error::Protocol(format!("expected Released, got {other:?}"))),
        }
    }
}

/// Renews a leased hold every third of its lease until aborted, or until a renewal fails
/// (then the hold is reported lost).
async fn renew_loop(client: Client, ticket: Ticket, lease: Duration, hold: Arc<HoldState>) {
    let every = (lease / 3).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        match client.renew(&ticket, None).await {
            Ok(_) => {}
            Err(Error::Disconnected) => return, // the connection task reports the loss
            Err(e) if e.code() == Some(lockd_protocol::ErrorCode::Unavailable) => {}
            Err(_) => {
                hold.lose(Lost::Expired);
                return;
            }
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(r) = self.renewal.take() {
            r.abort();
        }
        if !self.released {
            self.client.fire(
                &Op::Release {
                    ticket: self.ticket,
                },
                Some(self.fence),
            );
        }
    }
}
