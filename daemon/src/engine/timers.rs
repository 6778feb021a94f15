//! The engine's timers: lease expiry and the end of lock-delays, each one `DelayQueue` (no
//! scanning, no polling), run together by [`Timers::run`].
//!
//! Invariant: no deadline can break the tasks. `DelayQueue` panics on deadlines more than about
//! 2^36 ms (795 days) ahead, so every timer is armed at most [`MAX_TIMER`] ahead; a timer that
//! fires before its lease's deadline is simply armed again ([`Engine::expire`] finds the lease
//! still running and re-arms it). If the task ends anyway (a bug), [`run`] returns and the
//! daemon stops rather than serving leases that never expire.

use std::sync::Arc;
use std::time::Duration;

use foldhash::HashMap;
use futures_util::StreamExt;
use lockd_protocol::Ticket;
use tokio::time::Instant;
use tokio_util::time::{delay_queue, DelayQueue};

use lockd_protocol::Key;

use super::leases::Arming;
use super::lockspace::DelayInbox;
use super::Engine;

/// Longest a timer is armed ahead (a year); longer deadlines are reached in steps.
pub const MAX_TIMER: Duration = Duration::from_secs(365 * 24 * 3600);

/// The inboxes of the engine's timer tasks (see [`Engine::new`]).
pub struct Timers {
    pub(super) arming: Arming,
    pub(super) delays: DelayInbox,
}

impl Timers {
    /// Runs lease expiry and lock-delay ends for `engine`. Returns only if one of them ended
    /// (a bug: the daemon must then stop), saying which.
    pub async fn run(self, engine: Arc<Engine>) -> &'static str {
        tokio::select! {
            _ = expire_leases(Arc::clone(&engine), self.arming) => "the lease-expiry task ended",
            _ = end_delays(engine, self.delays) => "the lock-delay task ended",
        }
    }
}

/// Ends each lock-delay when it has run (a lock-delay is at most the configured maximum, but is
/// clamped like any timer).
async fn end_delays(engine: Arc<Engine>, mut inbox: DelayInbox) {
    let mut timers: DelayQueue<(Key, u64)> = DelayQueue::new();
    loop {
        tokio::select! {
            started = inbox.recv() => {
                let Some((key, seq, length)) = started else { return };
                timers.insert((key, seq), length.min(MAX_TIMER));
            }
            Some(fired) = timers.next(), if !timers.is_empty() => {
                let (key, seq) = fired.into_inner();
                engine.locks.end_delay(&key, seq);
            }
        }
    }
}

/// Fires lease deadlines and ends expired holds, until every sender of `arming` is gone.
async fn expire_leases(engine: Arc<Engine>, mut arming: Arming) {
    let mut timers: DelayQueue<Ticket> = DelayQueue::new();
    let mut keys: HashMap<Ticket, delay_queue::Key> = HashMap::default();
    loop {
        tokio::select! {
            armed = arming.recv() => {
                let Some((ticket, deadline)) = armed else { return };
                let deadline = deadline.map(clamp);
                match (keys.get(&ticket), deadline) {
                    (Some(k), Some(deadline)) => timers.reset_at(k, deadline),
                    (None, Some(deadline)) => {
                        keys.insert(ticket, timers.insert_at(ticket, deadline));
                    }
                    (Some(_), None) => {
                        if let Some(k) = keys.remove(&ticket) {
                            timers.remove(&k);
                        }
                    }
                    (None, None) => {}
                }
            }
            Some(fired) = timers.next(), if !timers.is_empty() => {
                let ticket = fired.into_inner();
                keys.remove(&ticket);
                engine.expire(&ticket, Instant::now());
            }
        }
    }
}

/// `deadline`, or [`MAX_TIMER`] from now if that is sooner.
fn clamp(deadline: Instant) -> Instant {
    deadline.min(Instant::now() + MAX_TIMER)
}
