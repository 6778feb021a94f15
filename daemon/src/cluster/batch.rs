//! The one writer of entries. The first step of every acquire (write its entry, read its key's
//! queue) and every deletion the daemon owes (releases answered at once, entries of failed or
//! withdrawn acquires, disconnects) go through one task, which puts everything that arrived
//! meanwhile into one etcd transaction: deletions first, then a put and a range per acquire.
//! Many clients cost etcd one request and one raft entry instead of one each, and a client's
//! release travels with its next acquire (one round trip per lock/unlock pair). A lone
//! request goes at once, alone.
//!
//! Invariants:
//! - **a transaction holds at most one new entry per lockd key.** Entries written by one
//!   transaction share its revision; two of the same key would tie for their place in its
//!   queue (and their fence). A second acquire of a key already in the batch waits for the
//!   next one.
//! - **deletions come before the puts and ranges**, so an acquire behind a hold released just
//!   before reads the key free.
//! - **an owed deletion is retried until etcd confirms it or its session lease is gone**; on
//!   confirmation the entries are marked deleted in the index and waiting acquires are woken.

use std::collections::VecDeque;
use std::sync::Arc;

use etcd_client::{GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse};
use foldhash::{HashSet, HashSetExt};
use tokio::sync::{mpsc, oneshot};

use super::Cluster;
use crate::error::Error;

/// etcd's default limit is 128 operations per transaction: two per acquire, one per deletion.
const MAX_OPS: usize = 128;
/// How long deletions wait for an acquire to travel with.
const LINGER: std::time::Duration = std::time::Duration::from_millis(1);
/// Acquires per transaction at most (leaving room for deletions).
const MAX_BATCH: usize = 48;
const _: () = assert!(2 * MAX_BATCH < MAX_OPS);
/// Bytes of keys and values in one transaction at most (etcd refuses requests over 1.5 MiB by
/// default; `max_data` may be raised).
const MAX_BATCH_BYTES: usize = 512 * 1024;

/// One acquire's first step.
pub struct Enqueue {
    pub etcd_key: Vec<u8>,
    pub value: Vec<u8>,
    pub lease: i64,
    /// The key's queue prefix (also what makes two acquires "the same key").
    pub prefix: Vec<u8>,
    /// The transaction's revision and the key's entries as read after the put.
    pub done: oneshot::Sender<Result<(i64, Vec<KeyValue>), Error>>,
}

/// Writes batches until the daemon stops.
pub async fn run(
    cluster: Arc<Cluster>,
    mut rx: mpsc::UnboundedReceiver<Enqueue>,
    mut deletions: mpsc::UnboundedReceiver<(Vec<u8>, u64)>,
) {
    let mut waiting: VecDeque<Enqueue> = VecDeque::new();
    let mut owed: Vec<(Vec<u8>, u64)> = Vec::new();
    loop {
        if waiting.is_empty() && owed.is_empty() {
            tokio::select! {
                e = rx.recv() => match e {
                    Some(e) => waiting.push_back(e),
                    None => return,
                },
                d = deletions.recv() => match d {
                    Some(d) => owed.push(d),
                    None => return,
                },
            }
        }
        while let Ok(e) = rx.try_recv() {
            waiting.push_back(e);
        }
        while let Ok(d) = deletions.try_recv() {
            owed.push(d);
        }
        if waiting.is_empty() && !owed.is_empty() {
            // Deletions alone: give the releasing client's next acquire a moment to join them
            // (one round trip per lock/unlock pair instead of two). The key stays held for
            // others that much longer, never shorter.
            if let Ok(Some(e)) = tokio::time::timeout(LINGER, rx.recv()).await {
                waiting.push_back(e);
            }
        }
        // Entries of a lost session lease are gone with it.
        let current = cluster.session.current().generation;
        owed.retain(|(_, g)| *g == current);
        // etcd refuses a transaction that names a key twice.
        if owed.len() > 1 {
            let mut seen = HashSet::new();
            owed.retain(|(k, _)| seen.insert(k.clone()));
        }
        let batch = take_batch(&mut waiting);
        let n = owed.len().min(MAX_OPS - 2 * batch.len());
        let deleted = commit(&cluster, &owed[..n], batch).await;
        if deleted {
            let done: Vec<Vec<u8>> = owed.drain(..n).map(|(k, _)| k).collect();
            cluster.index.deleted_by_us(done.iter().map(Vec::as_slice));
            cluster.deletions.notify_waiters();
        } else if n > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// Up to [`MAX_BATCH`] acquires (and [`MAX_BATCH_BYTES`]) of distinct keys, oldest first (at
/// least one); the rest stay in order.
fn take_batch(waiting: &mut VecDeque<Enqueue>) -> Vec<Enqueue> {
    let mut keys = HashSet::new();
    let mut batch = Vec::new();
    let mut bytes = 0;
    let mut rest = VecDeque::with_capacity(waiting.len());
    while let Some(e) = waiting.pop_front() {
        let size = e.etcd_key.len() + e.value.len() + e.prefix.len();
        let fits = batch.is_empty() || (batch.len() < MAX_BATCH && bytes + size <= MAX_BATCH_BYTES);
        if fits && keys.insert(e.prefix.clone()) {
            bytes += size;
            batch.push(e);
        } else {
            rest.push_back(e);
        }
    }
    *waiting = rest;
    batch
}

/// One transaction: `owed` deletions, then `batch`'s puts and ranges. True if it went through.
async fn commit(cluster: &Cluster, owed: &[(Vec<u8>, u64)], batch: Vec<Enqueue>) -> bool {
    if owed.is_empty() && batch.is_empty() {
        return true;
    }
    let mut ops = Vec::with_capacity(owed.len() + 2 * batch.len());
    for (k, _) in owed {
        ops.push(TxnOp::delete(k.clone(), None));
    }
    for e in &batch {
        ops.push(TxnOp::put(
            e.etcd_key.clone(),
            e.value.clone(),
            Some(PutOptions::new().with_lease(e.lease)),
        ));
        ops.push(TxnOp::get(
            e.prefix.clone(),
            Some(GetOptions::new().with_prefix()),
        ));
    }
    match cluster
        .txn("queue the acquire", Txn::new().and_then(ops))
        .await
    {
        Ok(resp) => {
            let revision = resp.header().map_or(0, |h| h.revision());
            let mut ranges = resp.op_responses().into_iter().filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g),
                _ => None,
            });
            for e in batch {
                let kvs = ranges.next().map(|g| g.kvs().to_vec()).unwrap_or_default();
                let _ = e.done.send(Ok((revision, kvs)));
            }
            true
        }
        Err(err) => {
            if !owed.is_empty() {
                tracing::warn!("{err}; retrying the deletion of {} entries", owed.len());
            }
            for e in batch {
                let _ = e.done.send(Err(err.clone()));
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enqueue(prefix: &str) -> Enqueue {
        Enqueue {
            etcd_key: format!("{prefix}x").into_bytes(),
            value: Vec::new(),
            lease: 1,
            prefix: prefix.as_bytes().to_vec(),
            done: oneshot::channel().0,
        }
    }

    #[test]
    fn a_batch_never_holds_two_entries_of_one_key_and_keeps_the_rest_in_order() {
        let mut waiting: VecDeque<Enqueue> = ["a/", "b/", "a/", "c/", "a/"]
            .into_iter()
            .map(enqueue)
            .collect();
        let batch = take_batch(&mut waiting);
        let names = |v: &[&Enqueue]| {
            v.iter()
                .map(|e| String::from_utf8_lossy(&e.prefix).into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&batch.iter().collect::<Vec<_>>()), ["a/", "b/", "c/"]);
        assert_eq!(names(&waiting.iter().collect::<Vec<_>>()), ["a/", "a/"]);
        let batch = take_batch(&mut waiting);
        assert_eq!(batch.len(), 1);
        assert_eq!(waiting.len(), 1);
    }

    #[test]
    fn a_batch_leaves_room_for_deletions_within_etcds_transaction_limit() {
        let mut waiting: VecDeque<Enqueue> = (0..200).map(|i| enqueue(&format!("k{i}/"))).collect();
        assert_eq!(take_batch(&mut waiting).len(), MAX_BATCH);
        assert_eq!(waiting.len(), 200 - MAX_BATCH);
    }
}
