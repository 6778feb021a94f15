//! One acquire on the etcd backend, as etcd's own lock recipe does it: create an entry under
//! the key (its creation revision is its place in the queue), read the key's queue in the same
//! transaction, and while something ahead conflicts, watch only the last such entry for its
//! deletion, then read the queue again. A release therefore wakes only the waiter right
//! behind it.
//!
//! The entry is on this daemon's session lease, so a dead daemon's entries go with its lease.
//! A detached lease moves its entry to an etcd lease of its own once granted (a put keeps the
//! creation revision, so the fence does not change) and adds the ticket index entry.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use lockd_protocol::{Acquire, Grant, Key, Reply, RequestId, Ticket, Wait};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conn::{mode_word, ConnShared, Hold, LeaseClock};
use super::entry::{write_entry, Entry, Written};
use super::index::HeldRef;
use super::layout::{Queue, Record, Standing};
use super::{Cluster, Counters};
use crate::clock;
use crate::error::Error;

/// Timed waits longer than this are waits forever (as on the local backend).
const MAX_TIMED_WAIT_MS: u64 = crate::engine::MAX_TIMED_WAIT_MS;

/// Runs acquire `id` to its answer.
pub async fn run(
    cluster: &Arc<Cluster>,
    conn: &Arc<ConnShared>,
    id: RequestId,
    a: Acquire,
    lease: Option<Duration>,
    ticket: Ticket,
    cancel: CancellationToken,
) -> Result<Reply, Error> {
    let started = Instant::now();
    let deadline = match a.wait {
        Wait::No | Wait::Millis(0) => None,
        Wait::Millis(ms) if ms <= MAX_TIMED_WAIT_MS => {
            Some(Some(started + Duration::from_millis(ms)))
        }
        Wait::Millis(_) | Wait::Forever => Some(None),
    };
    let limit = cluster.config.request_timeout;
    let session = cluster.session.alive_within(limit).await?;
    let o = &conn.owner;
    let record = Record {
        mode: a.mode,
        node: cluster.config.node.clone(),
        pid: o.pid,
        uid: o.uid,
        gid: o.gid,
        client: o.name.clone(),
        at_ms: clock::now_ms(),
        data: Record::hex(&a.data),
        detached: a.detach,
    };
    let prefix = cluster.layout.key_prefix(&a.key);
    let value = record.encode();
    let (entry, revision, mut range_revision, kvs) = {
        let mut tries = 0;
        loop {
            let written = write_entry(cluster, &a.key, &session, &prefix, &value, a.detach).await?;
            match written {
                Written::Queued(entry, created, read_at, kvs) => {
                    break (entry, created, read_at, kvs)
                }
                Written::NameTaken if tries < 3 => {
                    tries += 1;
                    if cluster.session.current().generation != session.generation {
                        return Err(lost_session(&a.key));
                    }
                }
                Written::NameTaken => {
                    return Err(Error::Unavailable(format!(
                        "{}: the names this daemon chose for its entry were taken in etcd \
                         (by entries it lost track of); retry",
                        a.key
                    )))
                }
            }
        }
    };
    let mut queue = Queue::from_kvs(&kvs);
    let mut session_rx = cluster.session.subscribe();
    // The last blocker reported as an orphan.
    let mut suspected = None;
    loop {
        match queue.standing(revision) {
            Standing::Granted => break,
            Standing::Gone => {
                return Err(Error::Unavailable(format!(
                    "{}: the waiting acquire's entry in etcd was removed (by an administrator, \
                     or with this daemon's session lease); retry",
                    a.key
                )))
            }
            Standing::Behind(blocker) => {
                // Behind an entry this daemon is deleting (a release it already acknowledged):
                // wait for its own deleter to confirm, then drop it from the queue as read.
                // No re-read is needed: entries ahead of ours can only go, never come.
                let (blocker_created, blocker_lease) = queue
                    .entries
                    .iter()
                    .find(|e| e.etcd_key == blocker)
                    .map_or((0, 0), |e| (e.create_revision, e.lease));
                if cluster
                    .index
                    .own_deletion(&blocker, blocker_created)
                    .is_some()
                {
                    let limit = Instant::now() + cluster.config.request_timeout;
                    let until = deadline.flatten().map_or(limit, |d| d.min(limit));
                    if own_deletion(cluster, &blocker, blocker_created, until, &cancel).await {
                        queue.entries.retain(|e| e.etcd_key != blocker);
                        continue;
                    }
                }
                if blocker_lease == session.lease
                    && suspected != Some(blocker_created)
                    && !cluster.index.knows(&blocker, blocker_created)
                {
                    // On this daemon's lease, yet no request's (`orphans.rs`).
                    suspected = Some(blocker_created);
                    cluster.suspect(blocker.clone(), session.lease, suspected);
                }
                let until = match deadline {
                    Some(d) => d,
                    None => {
                        Counters::inc(&cluster.counters.conflicts);
                        let msg = conflict_message(&a.key, &queue);
                        entry.delete_now().await;
                        return Err(Error::Conflict(msg));
                    }
                };
                let ended = wait_deleted(
                    cluster,
                    &blocker,
                    range_revision + 1,
                    until,
                    &cancel,
                    &mut session_rx,
                    session.generation,
                )
                .await;
                match ended {
                    WaitEnd::Deleted => {}
                    WaitEnd::TimedOut => {
                        Counters::inc(&cluster.counters.timeouts);
                        entry.delete_now().await;
                        let waited = started.elapsed();
                        return Err(Error::Timeout(format!(
                            "{} not acquired within {:?}",
                            a.key,
                            Duration::from_millis(waited.as_millis() as u64)
                        )));
                    }
                    WaitEnd::Cancelled => {
                        entry.delete_now().await;
                        return Err(Error::Timeout(format!(
                            "{}: the waiting acquire was cancelled",
                            a.key
                        )));
                    }
                    WaitEnd::SessionLost => {
                        return Err(Error::Unavailable(format!(
                            "{}: this daemon lost its etcd session lease while waiting; retry",
                            a.key
                        )))
                    }
                    WaitEnd::Failed(e) => return Err(e),
                }
                let got = cluster.range("read the queue", prefix.as_bytes()).await?;
                range_revision = got.header().map_or(range_revision, |h| h.revision());
                queue = Queue::from_kvs(got.kvs());
            }
        }
    }
    let fence = revision as u64;
    tracing::trace!(request = id, fence, "granted by etcd");
    granted(cluster, conn, entry, a, lease, ticket, fence).await
}

/// The key is taken: record the hold (or move it to a lease of its own) and answer.
async fn granted(
    cluster: &Arc<Cluster>,
    conn: &Arc<ConnShared>,
    mut entry: Entry<'_>,
    a: Acquire,
    lease: Option<Duration>,
    ticket: Ticket,
    fence: u64,
) -> Result<Reply, Error> {
    if a.detach {
        let length = lease.unwrap_or(Duration::from_secs(1));
        let expires = detach(cluster, &entry, &a.key, length, &ticket, fence).await?;
        entry.done = true;
        cluster.index.forget(&entry.etcd_key, entry.token);
        Counters::inc(&cluster.counters.grants);
        return Ok(Reply::Granted(Grant {
            ticket,
            fence,
            mode: a.mode,
            expires_at_ms: Some(expires),
        }));
    }
    let clock = lease.map(|length| {
        Arc::new(LeaseClock {
            length: std::sync::Mutex::new(length),
            deadline: std::sync::Mutex::new(Instant::now() + length),
            ended: CancellationToken::new(),
        })
    });
    {
        let mut state = conn.state();
        if state.closed {
            drop(state);
            return Err(Error::Unavailable("the connection closed".into()));
        }
        let held = HeldRef {
            conn: Arc::downgrade(conn),
            ticket,
            key: a.key.clone(),
            fence,
        };
        if cluster
            .index
            .hold(&entry.etcd_key, entry.token, held)
            .is_err()
        {
            drop(state);
            // Not `done`: the entry is deleted (guarded by its creation revision, so nothing
            // happens if it is gone), in case the deletion seen was not its own.
            return Err(Error::Unavailable(format!(
                "{}: its entry in etcd was removed as it was granted (by an administrator, or \
                 with this daemon's session lease); retry",
                a.key
            )));
        }
        state.holds.insert(
            ticket,
            Hold {
                key: a.key.clone(),
                etcd_key: entry.etcd_key.clone(),
                token: entry.token,
                fence,
                generation: entry.generation,
                lease: clock.clone(),
            },
        );
        entry.done = true;
    }
    Counters::inc(&cluster.counters.grants);
    let expires_at_ms = clock.as_ref().map(|c| {
        let length = *c.length.lock().unwrap_or_else(|p| p.into_inner());
        clock::now_ms() + length.as_millis() as u64
    });
    if let Some(clock) = clock {
        tokio::spawn(expire_when_due(
            Arc::clone(cluster),
            Arc::downgrade(conn),
            ticket,
            clock,
        ));
    }
    Ok(Reply::Granted(Grant {
        ticket,
        fence,
        mode: a.mode,
        expires_at_ms,
    }))
}

/// Moves a granted entry to an etcd lease of its own (`length` rounded up to whole seconds)
/// and writes the ticket index. Returns the expiry (ms since the epoch).
async fn detach(
    cluster: &Cluster,
    entry: &Entry<'_>,
    key: &Key,
    length: Duration,
    ticket: &Ticket,
    fence: u64,
) -> Result<u64, Error> {
    let ttl = ttl_secs(length);
    let granted = cluster.grant("grant the detached lease", ttl).await?;
    let lease = granted.id();
    let index_key = cluster.layout.ticket_key(ticket);
    let txn = Txn::new()
        // The very entry that was granted (not one re-created under its name).
        .when([Compare::create_revision(
            entry.etcd_key.clone(),
            CompareOp::Equal,
            fence as i64,
        )])
        .and_then([
            TxnOp::put(
                entry.etcd_key.clone(),
                Vec::new(),
                Some(PutOptions::new().with_lease(lease).with_ignore_value()),
            ),
            TxnOp::put(
                index_key,
                entry.etcd_key.clone(),
                Some(PutOptions::new().with_lease(lease)),
            ),
        ]);
    let moved = cluster.txn("move the hold to its lease", txn).await;
    match moved {
        Ok(r) if r.succeeded() => Ok(clock::now_ms() + granted.ttl().max(ttl) as u64 * 1000),
        Ok(_) => {
            let _ = cluster.revoke("revoke a lease", lease).await;
            Err(Error::Unavailable(format!(
                "{key}: the entry was removed by an administrator as it was granted; retry"
            )))
        }
        Err(e) => {
            let _ = cluster.revoke("revoke a lease", lease).await;
            Err(e)
        }
    }
}

/// etcd leases count whole seconds: a lease length rounded up.
pub fn ttl_secs(length: Duration) -> i64 {
    length.as_millis().div_ceil(1000).max(1) as i64
}

/// Ends a session hold whose lease ran out (unless renewed or ended first).
async fn expire_when_due(
    cluster: Arc<Cluster>,
    conn: std::sync::Weak<ConnShared>,
    ticket: Ticket,
    clock: Arc<LeaseClock>,
) {
    loop {
        let deadline = *clock.deadline.lock().unwrap_or_else(|p| p.into_inner());
        tokio::select! {
            _ = clock.ended.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => {}
        }
        let now_due = *clock.deadline.lock().unwrap_or_else(|p| p.into_inner()) <= Instant::now();
        if !now_due {
            continue;
        }
        let Some(conn) = conn.upgrade() else { return };
        let hold = conn.state().holds.remove(&ticket);
        if let Some(h) = hold {
            let (key, fence) = (h.key.clone(), h.fence);
            cluster.give_up(h.owed());
            Counters::inc(&cluster.counters.expiries);
            conn.owner.push(crate::peer::Push::Lost {
                key,
                fence,
                reason: lockd_protocol::LostReason::Expired,
            });
        }
        return;
    }
}

/// Waits until this daemon's deleter confirms `etcd_key` (created at `created`) is deleted (true), or `until`, a
/// cancel, or the entry is no longer tracked (false: the caller asks etcd instead).
async fn own_deletion(
    cluster: &Cluster,
    etcd_key: &[u8],
    created: i64,
    until: Instant,
    cancel: &CancellationToken,
) -> bool {
    loop {
        let notified = cluster.deletions.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match cluster.index.own_deletion(etcd_key, created) {
            Some(true) => return true,
            Some(false) => {}
            // No longer tracked (a resynchronisation, a lost session): ask etcd instead.
            None => return false,
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(until) => return false,
            _ = cancel.cancelled() => return false,
        }
    }
}

/// Why a wait for the blocker's deletion ended.
enum WaitEnd {
    Deleted,
    TimedOut,
    Cancelled,
    SessionLost,
    Failed(Error),
}

/// Waits until `blocker` is deleted (seen from `from_revision` on, so a deletion between the
/// read and the watch is not missed).
async fn wait_deleted(
    cluster: &Cluster,
    blocker: &[u8],
    from_revision: i64,
    deadline: Option<Instant>,
    cancel: &CancellationToken,
    session: &mut tokio::sync::watch::Receiver<super::session::Session>,
    generation: u64,
) -> WaitEnd {
    let timeout = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timeout);
    let lost = async {
        let _ = session
            .wait_for(|s| s.generation != generation || !s.alive)
            .await;
    };
    tokio::pin!(lost);
    let options = WatchOptions::new().with_start_revision(from_revision);
    let opened = tokio::select! {
        _ = &mut timeout => return WaitEnd::TimedOut,
        _ = cancel.cancelled() => return WaitEnd::Cancelled,
        _ = &mut lost => return WaitEnd::SessionLost,
        w = cluster.watch("watch the queue", blocker.to_vec(), options) => w,
    };
    let mut stream = match opened {
        Ok(s) => s,
        Err(e) => return WaitEnd::Failed(e),
    };
    loop {
        let msg = tokio::select! {
            _ = &mut timeout => return WaitEnd::TimedOut,
            _ = cancel.cancelled() => return WaitEnd::Cancelled,
            _ = &mut lost => return WaitEnd::SessionLost,
            m = stream.message() => m,
        };
        match msg {
            Ok(Some(resp)) => {
                if resp.canceled() {
                    // Compacted past our revision: read the queue again.
                    return WaitEnd::Deleted;
                }
                if resp
                    .events()
                    .iter()
                    .any(|e| e.event_type() == EventType::Delete)
                {
                    return WaitEnd::Deleted;
                }
            }
            // The stream broke: read the queue again (which fails if etcd is gone).
            Ok(None) | Err(_) => return WaitEnd::Deleted,
        }
    }
}

/// The answer when the session lease was given up under an acquire.
pub(super) fn lost_session(key: &Key) -> Error {
    Error::Unavailable(format!(
        "{key}: this daemon lost its etcd session lease (etcd unreachable?); retry"
    ))
}

/// "ns/name is held exclusively by pid 1 uid 0 'name@node' (fence 7)".
fn conflict_message(key: &Key, queue: &Queue) -> String {
    let (holders, _) = queue.split();
    match holders.first() {
        Some(h) => {
            let o = h.record.owner();
            let pid = o.pid.map_or_else(|| "?".to_string(), |p| p.to_string());
            let more = if holders.len() > 1 {
                format!(" and {} more", holders.len() - 1)
            } else {
                String::new()
            };
            format!(
                "{key} is held {} by pid {pid} uid {} '{}' (fence {}){more}",
                mode_word(h.record.mode),
                o.uid,
                lockd_protocol::display::Escaped(&o.client_name),
                h.create_revision
            )
        }
        None => format!("{key} is held"),
    }
}
