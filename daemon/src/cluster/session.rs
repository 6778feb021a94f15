//! This daemon's etcd lease: every session hold and waiting entry of its clients hangs on it.
//!
//! One task grants it, sends a keepalive every `session_ttl / 4` and reads the answers. etcd
//! expires the lease no sooner than `session_ttl` after it *received* the last keepalive, so
//! no sooner than `session_ttl` after this daemon *sent* it. The lease counts as alive here
//! until `sent + session_ttl - margin` for the oldest keepalive answered; past that (etcd
//! unreachable) or when etcd answers that the lease is gone, the session is lost: every hold
//! on it is reported lost to its client at once (before etcd could have freed the key for
//! another host), waiters answer `Unavailable`, and a new lease is granted when etcd answers
//! again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::Cluster;
use crate::error::Error;

/// The session lease as the rest of the backend sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// etcd's lease id (0 while none).
    pub lease: i64,
    /// Bumped each time a lease is granted or lost: entries remember the generation they
    /// were made in.
    pub generation: u64,
    /// True while the lease is certainly alive in etcd.
    pub alive: bool,
}

/// The current session, published to every task.
pub struct Sessions {
    tx: watch::Sender<Session>,
}

impl Sessions {
    pub fn new() -> Sessions {
        let (tx, _) = watch::channel(Session {
            lease: 0,
            generation: 0,
            alive: false,
        });
        Sessions { tx }
    }

    pub fn current(&self) -> Session {
        *self.tx.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<Session> {
        self.tx.subscribe()
    }

    /// The live session, waiting for one at most `limit` (etcd unreachable: `Unavailable`).
    pub async fn alive_within(&self, limit: Duration) -> Result<Session, Error> {
        let mut rx = self.tx.subscribe();
        let waited =
            tokio::time::timeout(limit, async { rx.wait_for(|s| s.alive).await.map(|s| *s) }).await;
        match waited {
            Ok(Ok(s)) => Ok(s),
            _ => Err(super::unavailable(
                "confirm this daemon's session lease",
                &format!("no answer within {limit:?}"),
            )),
        }
    }
}

/// How long before etcd could expire the lease this daemon stops trusting it: a fifth of the
/// TTL, at least 500 ms, for scheduling delays, the `HoldLost` message's way to the client
/// and clock-rate differences between hosts.
pub fn margin(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(500)).min(ttl / 2)
}

/// Keeps the session lease alive for as long as the daemon runs.
pub async fn keep(cluster: Arc<Cluster>) {
    let ttl = cluster.config.session_ttl;
    let stopping = || cluster.stopping.load(std::sync::atomic::Ordering::Relaxed);
    // No entry may exist before the deletion watch knows where it starts.
    cluster.watching_deletions.notified().await;
    // A lost lease etcd may still have (it keeps leases alive across its own restart): its
    // entries would hold their keys, for everyone, until it expires.
    let mut unrevoked: Option<i64> = None;
    loop {
        if stopping() {
            return;
        }
        let lease = match grant(&cluster, ttl).await {
            Some(lease) => lease,
            None => {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        if let Some(old) = unrevoked.take() {
            // etcd answers again: free the lost lease's keys now, not when it expires.
            let c = Arc::clone(&cluster);
            tokio::spawn(async move {
                if c.revoke("revoke the lost session lease", old).await.is_ok() {
                    tracing::info!(
                        lease = format_args!("{old:x}"),
                        "the lost etcd session lease is revoked: its keys are free"
                    );
                }
            });
        }
        let why = keep_alive(&cluster, lease, ttl).await;
        if stopping() {
            return;
        }
        lose(&cluster, lease, &why);
        // Free whatever is left of it (etcd may still have it, if only we lost touch); if etcd
        // does not answer, again once it does.
        if cluster.revoke("revoke a lease", lease.0).await.is_err() {
            unrevoked = Some(lease.0);
        }
    }
}

/// A granted lease: its id and until when it certainly lives.
#[derive(Clone, Copy)]
struct Granted(i64, Instant);

async fn grant(cluster: &Cluster, ttl: Duration) -> Option<Granted> {
    let sent = Instant::now();
    let granted = cluster
        .grant("grant this daemon's session lease", ttl.as_secs() as i64)
        .await;
    match granted {
        Ok(r) if r.ttl() > 0 => {
            let until = sent + Duration::from_secs(r.ttl() as u64) - margin(ttl);
            let generation = cluster.session.current().generation + 1;
            cluster.session.tx.send_replace(Session {
                lease: r.id(),
                generation,
                alive: true,
            });
            tracing::info!(
                lease = format_args!("{:x}", r.id()),
                "etcd session lease granted ({} s)",
                r.ttl()
            );
            Some(Granted(r.id(), until))
        }
        Ok(r) => {
            tracing::warn!("etcd refused a session lease: {}", r.error());
            None
        }
        Err(e) => {
            tracing::warn!("{e}");
            None
        }
    }
}

/// Sends keepalives until the lease can no longer be trusted; says why.
async fn keep_alive(cluster: &Cluster, lease: Granted, ttl: Duration) -> String {
    let Granted(id, mut until) = lease;
    let every = ttl / 4;
    'stream: loop {
        if Instant::now() >= until {
            return "no keepalive answered in time".into();
        }
        let mut leases = cluster.client.lease_client();
        let opening = Instant::now();
        let opened = tokio::time::timeout_at(until, leases.keep_alive(id)).await;
        let (mut keeper, mut stream) = match opened {
            Ok(Ok(pair)) => pair,
            // etcd-client reads the first answer itself and reports a lease etcd no longer has
            // as this error: lost now, not at `until`.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(e))) => {
                return format!("etcd says the lease is gone ({e})");
            }
            Ok(Err(e)) => {
                tracing::warn!("etcd keepalive stream: {e}");
                let pause = (Instant::now() + Duration::from_millis(100).min(every)).min(until);
                tokio::time::sleep_until(pause).await;
                continue 'stream;
            }
            Err(_) => return "etcd did not open a keepalive stream in time".into(),
        };
        // Opening sent a keepalive and etcd answered it (etcd-client read that answer): the
        // lease was renewed after `opening`.
        until = until.max(opening + ttl - margin(ttl));
        let mut sent: VecDeque<Instant> = VecDeque::new();
        let mut next = Instant::now() + every;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {
                    return format!("etcd answered no keepalive for {:?}", ttl - margin(ttl));
                }
                _ = tokio::time::sleep_until(next) => {
                    next = Instant::now() + every;
                    if keeper.keep_alive().await.is_err() {
                        continue 'stream;
                    }
                    sent.push_back(Instant::now());
                    if sent.len() > 64 {
                        sent.pop_front();
                    }
                }
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => {
                        let Some(at) = sent.pop_front() else { continue };
                        if resp.ttl() <= 0 {
                            return "etcd says the lease has expired".into();
                        }
                        until = until.max(at + Duration::from_secs(resp.ttl() as u64) - margin(ttl));
                    }
                    Ok(None) | Err(_) => {
                        let pause = (Instant::now() + Duration::from_millis(100).min(every)).min(until);
                        tokio::time::sleep_until(pause).await;
                        continue 'stream;
                    }
                },
            }
        }
    }
}

/// The session lease can no longer be trusted: end everything on it.
fn lose(cluster: &Cluster, lease: Granted, why: &str) {
    let old = cluster.session.current();
    cluster.session.tx.send_replace(Session {
        lease: 0,
        generation: old.generation + 1,
        alive: false,
    });
    let lost = cluster.index.lose_generation(old.generation);
    super::Counters::inc(&cluster.counters.lost);
    tracing::error!(
        lease = format_args!("{:x}", lease.0),
        holds = lost,
        "etcd session lease lost: {why}; its holds were reported lost to their clients"
    );
}
