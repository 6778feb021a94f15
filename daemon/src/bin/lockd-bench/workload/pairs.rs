//! Acquire + release pairs through the client crate: `--depth` tasks per connection, each
//! looping acquire (waiting) then release on its key.

use std::sync::Arc;
use std::time::Instant;

use lockd_client::Client;
use lockd_protocol::Mode;

use super::{spawn_worker, Control, LocalKeys, Rng, Which, Worker, ACQUIRE_WAIT};
use crate::args::{KeySpace, Settings};
use crate::daemon;
use crate::Failure;

/// Connects `clients` connections, then starts `--depth` workers on each.
pub async fn start(
    s: &Arc<Settings>,
    clients: usize,
    ctl: &Arc<Control>,
) -> Result<Vec<Worker>, Failure> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(daemon::connect(&s.socket).await?);
    }
    let mut workers = Vec::with_capacity(clients * s.depth);
    for (c, client) in conns.into_iter().enumerate() {
        let local = Arc::new(LocalKeys::default());
        for slot in 0..s.depth {
            let index = (c * s.depth + slot) as u64;
            let body = slot_loop(
                client.clone(),
                Arc::clone(s),
                Arc::clone(ctl),
                Arc::clone(&local),
                index,
            );
            workers.push(spawn_worker(ctl, body));
        }
    }
    Ok(workers)
}

/// Gives a key taken from [`LocalKeys`] back when the pair ends, however it ends.
struct Taken<'a>(Option<(&'a LocalKeys, u64)>);

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some((keys, k)) = self.0 {
            keys.put(k);
        }
    }
}

/// One request slot: acquire, release, again, until told to stop.
async fn slot_loop(
    client: Client,
    s: Arc<Settings>,
    ctl: Arc<Control>,
    local: Arc<LocalKeys>,
    index: u64,
) -> Result<(), String> {
    let mut samples = ctl.samples(Which::Acquire);
    let mut rng = Rng::new(index);
    while !ctl.stopped() {
        let (k, _taken) = match s.keys {
            KeySpace::PerSlot => (index, Taken(None)),
            KeySpace::Random(n) if s.mode == Mode::Exclusive => {
                let k = local.take(&mut rng, n).await;
                (k, Taken(Some((&local, k))))
            }
            KeySpace::Random(n) => (rng.below(n), Taken(None)),
        };
        let mut acquire = client
            .acquire(s.key_name(k))
            .namespace(s.namespace.as_str())
            .mode(s.mode)
            .wait(ACQUIRE_WAIT);
        if let Some(lease) = s.lease {
            acquire = acquire.lease(lease);
        }
        let sent = Instant::now();
        if s.detach {
            match acquire.detached().await {
                Ok(lease) => {
                    samples.record(sent.elapsed());
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
                    samples.record(sent.elapsed());
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
