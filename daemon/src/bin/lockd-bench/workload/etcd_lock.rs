//! etcd's own v3 lock API as the measured server (`--etcd-lock URL`): the baseline for lockd
//! on its etcd backend. Each connection is one etcd client with its own session lease (as
//! `etcdctl lock` and etcd's concurrency package make one per process); a pair is `Lock(name,
//! lease)` + `Unlock(key)`, one request at a time per connection (`--depth 1`), on its own
//! name unless `--keys` makes them share.

use std::sync::Arc;
use std::time::Instant;

use etcd_client::{Client, LockOptions};

use super::{slot_key, spawn_worker, Control, Rng, Which, Worker};
use crate::args::Settings;
use crate::Failure;

/// The session lease of each connection, seconds: longer than any measurement.
const SESSION_TTL: i64 = 600;

/// Connects `clients` etcd clients, each with its lease, then starts one worker on each.
pub async fn start(
    s: &Arc<Settings>,
    clients: usize,
    endpoints: &[String],
    ctl: &Arc<Control>,
) -> Result<Vec<Worker>, Failure> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut client = Client::connect(endpoints, None)
            .await
            .map_err(|e| Failure::Unreachable(format!("etcd at {}: {e}", endpoints.join(","))))?;
        let lease = client
            .lease_grant(SESSION_TTL, None)
            .await
            .map_err(|e| Failure::Run(format!("etcd refused a lease: {e}")))?
            .id();
        conns.push((client, lease));
    }
    Ok(conns
        .into_iter()
        .enumerate()
        .map(|(c, (client, lease))| {
            spawn_worker(
                ctl,
                conn_loop(client, lease, c, Arc::clone(s), Arc::clone(ctl)),
            )
        })
        .collect())
}

async fn conn_loop(
    mut client: Client,
    lease: i64,
    c: usize,
    s: Arc<Settings>,
    ctl: Arc<Control>,
) -> Result<(), String> {
    let mut rng = Rng::new(c as u64);
    let mut samples = ctl.samples(Which::Acquire);
    while !ctl.stopped() {
        let key = slot_key(&s, c, 0, &mut rng, None).unwrap_or_default();
        let name = format!("/lockd-bench/{}", s.key_name(key));
        let sent = Instant::now();
        let locked = client
            .lock(name, Some(LockOptions::new().with_lease(lease)))
            .await
            .map_err(|e| format!("etcd Lock: {e}"))?;
        samples.record(sent.elapsed());
        client
            .unlock(locked.key().to_vec())
            .await
            .map_err(|e| format!("etcd Unlock: {e}"))?;
        ctl.pair_done();
    }
    let _ = client.lease_revoke(lease).await;
    Ok(())
}
