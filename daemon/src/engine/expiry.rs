//! The lease-expiry task: one `DelayQueue` of lease deadlines (no scanning, no polling).
//!
//! Invariant: no deadline can break the task. `DelayQueue` panics on deadlines more than about
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

use super::leases::Arming;
use super::Engine;

/// Longest a timer is armed ahead (a year); longer deadlines are reached in steps.
pub const MAX_TIMER: Duration = Duration::from_secs(365 * 24 * 3600);

/// Runs until every sender of `arming` is gone: fires lease deadlines and ends expired holds.
pub async fn run(engine: Arc<Engine>, mut arming: Arming) {
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
