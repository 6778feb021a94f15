//! `--handoff`: every connection loops acquire (waiting) + release on one hot key, so while
//! one holds, the others are queued. Just before a holder sends its release it stamps the
//! time (monotonic, this process); the next holder, on its grant, reads the stamp: that is
//! the release-to-next-grant latency, the time the lock sits idle between two holders.
//!
//! Only grants whose acquire was sent before the stamped release count as handoffs (the
//! acquirer was queued); the others (the key happened to be free) only count as pairs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockd_client::Client;
use lockd_protocol::{Op, Reply, Response, ServerMessage, Wait};

use super::raw::{acquire_op, not_a_response, RawConn};
use super::{spawn_worker, Control, Samples, Which, Worker, ACQUIRE_WAIT};
use crate::args::Settings;
use crate::{daemon, Failure};

/// The last release's stamp, in nanoseconds since `base` (0: none yet).
struct Stamp {
    base: Instant,
    released_at: AtomicU64,
}

impl Stamp {
    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Called on a grant of an acquire sent at `sent`: records the handoff if this grant
    /// followed a release sent after it.
    fn granted(&self, sent: u64, samples: &mut Samples) {
        let now = self.now();
        let released = self.released_at.load(Ordering::SeqCst);
        if released != 0 && released > sent {
            samples.record(Duration::from_nanos(now.saturating_sub(released)));
        }
    }

    /// Called just before sending the release.
    fn releasing(&self) {
        self.released_at.store(self.now().max(1), Ordering::SeqCst);
    }
}

/// Connects `clients` connections, then starts one worker on each.
pub async fn start(
    s: &Arc<Settings>,
    clients: usize,
    ctl: &Arc<Control>,
) -> Result<Vec<Worker>, Failure> {
    let stamp = Arc::new(Stamp {
        base: Instant::now(),
        released_at: AtomicU64::new(0),
    });
    let mut workers = Vec::with_capacity(clients);
    if s.raw {
        let mut conns = Vec::with_capacity(clients);
        for _ in 0..clients {
            conns.push(RawConn::connect(&s.socket).await?);
        }
        for conn in conns {
            let body = raw_loop(conn, Arc::clone(s), Arc::clone(ctl), Arc::clone(&stamp));
            workers.push(spawn_worker(ctl, body));
        }
    } else {
        let mut conns = Vec::with_capacity(clients);
        for _ in 0..clients {
            conns.push(daemon::connect(&s.socket).await?);
        }
        for client in conns {
            let body = client_loop(client, Arc::clone(s), Arc::clone(ctl), Arc::clone(&stamp));
            workers.push(spawn_worker(ctl, body));
        }
    }
    Ok(workers)
}

async fn client_loop(
    client: Client,
    s: Arc<Settings>,
    ctl: Arc<Control>,
    stamp: Arc<Stamp>,
) -> Result<(), String> {
    let mut acquires = ctl.samples(Which::Acquire);
    let mut handoffs = ctl.samples(Which::Handoff);
    let name = s.hot_key();
    while !ctl.stopped() {
        let mut acquire = client
            .acquire(name.as_str())
            .namespace(s.namespace.as_str())
            .wait(ACQUIRE_WAIT);
        if let Some(lease) = s.lease {
            acquire = acquire.lease(lease);
        }
        let (sent, sent_ns) = (Instant::now(), stamp.now());
        if s.detach {
            match acquire.detached().await {
                Ok(lease) => {
                    stamp.granted(sent_ns, &mut handoffs);
                    acquires.record(sent.elapsed());
                    stamp.releasing();
                    client
                        .release(&lease.ticket)
                        .await
                        .map_err(|e| format!("release failed: {e}"))?;
                }
                Err(e) => {
                    ctl.refusal(e.code(), &format!("acquire failed: {e}"))?;
                    continue;
                }
            }
        } else {
            match acquire.await {
                Ok(guard) => {
                    stamp.granted(sent_ns, &mut handoffs);
                    acquires.record(sent.elapsed());
                    stamp.releasing();
                    guard
                        .release()
                        .await
                        .map_err(|e| format!("release failed: {e}"))?;
                }
                Err(e) => {
                    ctl.refusal(e.code(), &format!("acquire failed: {e}"))?;
                    continue;
                }
            }
        }
        ctl.pair_done();
    }
    Ok(())
}

async fn raw_loop(
    mut conn: RawConn,
    s: Arc<Settings>,
    ctl: Arc<Control>,
    stamp: Arc<Stamp>,
) -> Result<(), String> {
    let mut acquires = ctl.samples(Which::Acquire);
    let mut handoffs = ctl.samples(Which::Handoff);
    let wait_ms = u64::try_from(ACQUIRE_WAIT.as_millis()).unwrap_or(u64::MAX);
    let op = acquire_op(&s, &s.hot_key(), Wait::Millis(wait_ms));
    while !ctl.stopped() {
        conn.push(1, &op);
        let (sent, sent_ns) = (Instant::now(), stamp.now());
        conn.flush().await?;
        let ticket = match response(&mut conn).await? {
            Ok(Reply::Granted(g)) => {
                stamp.granted(sent_ns, &mut handoffs);
                acquires.record(sent.elapsed());
                g.ticket
            }
            Err(e) => {
                ctl.refusal(Some(e.code), &format!("acquire failed: {e}"))?;
                continue;
            }
            Ok(other) => return Err(format!("unexpected answer to an acquire: {other:?}")),
        };
        conn.push(2, &Op::Release { ticket });
        stamp.releasing();
        conn.flush().await?;
        match response(&mut conn).await? {
            Ok(Reply::Released) => ctl.pair_done(),
            other => return Err(format!("release failed: {other:?}")),
        }
    }
    Ok(())
}

/// The next response (one request is in flight at a time).
async fn response(conn: &mut RawConn) -> Result<Result<Reply, lockd_protocol::WireError>, String> {
    loop {
        match conn.next().await? {
            ServerMessage::Response(Response { result, .. }) => return Ok(result),
            other => not_a_response(other)?,
        }
    }
}
