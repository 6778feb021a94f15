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
//! - **a deletion removes only the entry it was owed for** (compared by creation revision when
//!   known), and **an entry is created only where its name is free**: names are reused
//!   (`index.rs`), so a late deletion must not reach a newer entry of the name, nor a new entry
//!   overwrite a live one (a put keeps the creation revision, so it would take the old one's
//!   place in the queue). Each is a small transaction nested in the batch's.
//! - **an owed deletion is retried until etcd confirms it or its session lease is gone**; on
//!   confirmation the entries are marked deleted in the index and waiting acquires are woken.

use std::collections::VecDeque;
use std::sync::Arc;

use std::sync::atomic::Ordering;

use etcd_client::{
    Compare, CompareOp, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use foldhash::{HashSet, HashSetExt};
use tokio::sync::{mpsc, oneshot};

use super::index::Token;
use super::Cluster;
use crate::error::Error;

/// Operations of one transaction at most: two per acquire, one per deletion. etcd's default
/// limit (`--max-txn-ops`) is 128, and a nested transaction may hold only as many operations as
/// its parent leaves under it (etcd's `checkTxnRequest`): each nested one here holds one, so
/// the outer ones stay below 128.
pub const MAX_OPS: usize = 127;
/// The fewest operations a transaction of one acquire needs: its put and its range (and the
/// put's nested compare under them).
const MIN_OPS: usize = 2;
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
    pub done: oneshot::Sender<Result<Queued, Error>>,
}

/// What one acquire's first step found.
pub struct Queued {
    /// The transaction's revision.
    pub revision: i64,
    /// False if the name was taken (by an entry this daemon does not know): nothing written.
    pub created: bool,
    /// The key's entries as read after the put.
    pub kvs: Vec<KeyValue>,
}

/// An entry this daemon owes a deletion of.
pub struct Owed {
    pub etcd_key: Vec<u8>,
    /// Its session generation (gone with the lease otherwise).
    pub generation: u64,
    pub token: Token,
    /// Its creation revision, if known: only that entry is deleted.
    pub created: Option<i64>,
}

/// Writes batches until the daemon stops.
pub async fn run(
    cluster: Arc<Cluster>,
    mut rx: mpsc::UnboundedReceiver<Enqueue>,
    mut deletions: mpsc::UnboundedReceiver<Owed>,
) {
    let mut waiting: VecDeque<Enqueue> = VecDeque::new();
    let mut owed: Vec<Owed> = Vec::new();
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
        owed.retain(|o| o.generation == current);
        // etcd refuses a transaction that names a key twice: one deletion per name, and no
        // acquire of a name being deleted (a reused name whose old deletion is still owed).
        let deleting = take_deletions(&mut owed);
        let names: HashSet<&[u8]> = deleting.iter().map(|o| o.etcd_key.as_slice()).collect();
        let max_ops = cluster.max_ops.load(Ordering::Relaxed);
        // Deletions keep up to a third of the room: releases must reach etcd too.
        let room = deleting.len().min(max_ops / 3);
        let batch = take_batch(&mut waiting, &names, MAX_BATCH.min((max_ops - room) / 2));
        let n = deleting.len().min(max_ops - 2 * batch.len());
        let mut now = deleting;
        let later = now.split_off(n);
        if now.is_empty() && batch.is_empty() {
            // Everything owed went with its session lease.
            continue;
        }
        match commit(&cluster, &now, &batch).await {
            Ok(resp) => {
                answer(batch, now.len(), &resp);
                let done = now.iter().map(|o| (o.etcd_key.as_slice(), o.token));
                cluster.index.deleted_by_us(done);
                cluster.deletions.notify_waiters();
                owed.splice(0..0, later);
            }
            Err(err) if super::too_many_ops(&err) && max_ops > MIN_OPS => {
                // etcd runs with a lower `--max-txn-ops`: learn it, and send the same again
                // in smaller transactions.
                let fewer = (max_ops / 2).max(MIN_OPS);
                cluster.max_ops.store(fewer, Ordering::Relaxed);
                tracing::warn!(
                    "etcd refused a transaction of {} operations (its --max-txn-ops is lower \
                     than 128); sending at most {fewer} per transaction from now on",
                    now.len() + 2 * batch.len()
                );
                for e in batch.into_iter().rev() {
                    waiting.push_front(e);
                }
                now.extend(later);
                owed.splice(0..0, now);
            }
            Err(err) => {
                if n > 0 {
                    tracing::warn!("{err}; retrying the deletion of {n} entries");
                }
                // The batch, and acquires held back because their names are being deleted
                // (they would wait for as long as the deletion fails).
                let names: HashSet<&[u8]> = now.iter().map(|o| o.etcd_key.as_slice()).collect();
                let (held_back, rest) = std::mem::take(&mut waiting)
                    .into_iter()
                    .partition(|e: &Enqueue| names.contains(e.etcd_key.as_slice()));
                waiting = rest;
                for e in batch.into_iter().chain(held_back) {
                    let _ = e.done.send(Err(err.clone()));
                }
                now.extend(later);
                owed.splice(0..0, now);
                if n > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// The owed deletions to try now, oldest first: one per name (the rest stay in order).
fn take_deletions(owed: &mut Vec<Owed>) -> Vec<Owed> {
    let first: Vec<bool> = {
        let mut names = HashSet::new();
        owed.iter()
            .map(|o| names.insert(o.etcd_key.as_slice()))
            .collect()
    };
    let mut first = first.into_iter();
    let (now, rest): (Vec<Owed>, Vec<Owed>) = std::mem::take(owed)
        .into_iter()
        .partition(|_| first.next().unwrap_or(true));
    *owed = rest;
    now
}

/// Up to `most` acquires (and [`MAX_BATCH_BYTES`]) of distinct keys, none named in
/// `deleting`, oldest first; the rest stay in order.
fn take_batch(
    waiting: &mut VecDeque<Enqueue>,
    deleting: &HashSet<&[u8]>,
    most: usize,
) -> Vec<Enqueue> {
    let mut keys = HashSet::new();
    let mut batch = Vec::new();
    let mut bytes = 0;
    let mut rest = VecDeque::with_capacity(waiting.len());
    while let Some(e) = waiting.pop_front() {
        if e.done.is_closed() {
            // Its acquire is gone (and deletes the name, which is never reused): write nothing.
            continue;
        }
        let size = e.etcd_key.len() + e.value.len() + e.prefix.len();
        let fits = batch.is_empty() || (batch.len() < most && bytes + size <= MAX_BATCH_BYTES);
        if fits && !deleting.contains(e.etcd_key.as_slice()) && keys.insert(e.prefix.clone()) {
            bytes += size;
            batch.push(e);
        } else {
            rest.push_back(e);
        }
    }
    *waiting = rest;
    batch
}

/// One transaction: `owed` deletions, then `batch`'s puts and ranges.
async fn commit(cluster: &Cluster, owed: &[Owed], batch: &[Enqueue]) -> Result<TxnResponse, Error> {
    let mut ops = Vec::with_capacity(owed.len() + 2 * batch.len());
    for o in owed {
        ops.push(deletion(o));
    }
    for e in batch {
        let put = TxnOp::put(
            e.etcd_key.clone(),
            e.value.clone(),
            Some(PutOptions::new().with_lease(e.lease)),
        );
        let absent = Compare::create_revision(e.etcd_key.clone(), CompareOp::Equal, 0);
        ops.push(TxnOp::txn(Txn::new().when([absent]).and_then([put])));
        ops.push(TxnOp::get(
            e.prefix.clone(),
            Some(GetOptions::new().with_prefix()),
        ));
    }
    cluster
        .txn("queue the acquire", Txn::new().and_then(ops))
        .await
}

/// Answers each acquire of `batch` from `resp` (whose first `deletions` answers are the
/// deletions').
fn answer(batch: Vec<Enqueue>, deletions: usize, resp: &TxnResponse) {
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut answers = resp.op_responses().into_iter().skip(deletions);
    for e in batch {
        let created = matches!(answers.next(), Some(TxnOpResponse::Txn(t)) if t.succeeded());
        let kvs = match answers.next() {
            Some(TxnOpResponse::Get(g)) => g.kvs().to_vec(),
            _ => Vec::new(),
        };
        let queued = Queued {
            revision,
            created,
            kvs,
        };
        let _ = e.done.send(Ok(queued));
    }
}

/// The operation deleting `o`: only the entry created at its revision, if that is known.
pub fn deletion(o: &Owed) -> TxnOp {
    let delete = TxnOp::delete(o.etcd_key.clone(), None);
    match o.created {
        Some(revision) => {
            let same = Compare::create_revision(o.etcd_key.clone(), CompareOp::Equal, revision);
            TxnOp::txn(Txn::new().when([same]).and_then([delete]))
        }
        None => delete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Answer = oneshot::Receiver<Result<Queued, Error>>;

    /// An acquire of `name` (of key `prefix`), and where its answer goes.
    fn enqueue(prefix: &str, name: &str) -> (Enqueue, Answer) {
        let (done, answer) = oneshot::channel();
        let e = Enqueue {
            etcd_key: format!("{prefix}{name}").into_bytes(),
            value: Vec::new(),
            lease: 1,
            prefix: prefix.as_bytes().to_vec(),
            done,
        };
        (e, answer)
    }

    fn queue(of: impl Iterator<Item = (Enqueue, Answer)>) -> (VecDeque<Enqueue>, Vec<Answer>) {
        of.unzip()
    }

    #[test]
    fn a_batch_never_holds_two_entries_of_one_key_and_keeps_the_rest_in_order() {
        let (mut waiting, _answers) = queue(
            ["a/", "b/", "a/", "c/", "a/"]
                .into_iter()
                .map(|p| enqueue(p, "x")),
        );
        let batch = take_batch(&mut waiting, &HashSet::new(), MAX_BATCH);
        let names = |v: &[&Enqueue]| {
            v.iter()
                .map(|e| String::from_utf8_lossy(&e.prefix).into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&batch.iter().collect::<Vec<_>>()), ["a/", "b/", "c/"]);
        assert_eq!(names(&waiting.iter().collect::<Vec<_>>()), ["a/", "a/"]);
        let batch = take_batch(&mut waiting, &HashSet::new(), MAX_BATCH);
        assert_eq!(batch.len(), 1);
        assert_eq!(waiting.len(), 1);
    }

    #[test]
    fn a_name_being_deleted_is_neither_deleted_twice_nor_written_in_the_same_transaction() {
        let owed = |k: &str, token| Owed {
            etcd_key: k.as_bytes().to_vec(),
            generation: 1,
            token,
            created: Some(3),
        };
        let mut all = vec![owed("a/1.0", 1), owed("b/1.0", 2), owed("a/1.0", 3)];
        let now = take_deletions(&mut all);
        assert_eq!(now.iter().map(|o| o.token).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(all.iter().map(|o| o.token).collect::<Vec<_>>(), [3]);
        let names: HashSet<&[u8]> = now.iter().map(|o| o.etcd_key.as_slice()).collect();
        let (mut waiting, answers) =
            queue([enqueue("a/", "1.0"), enqueue("c/", "1.0")].into_iter());
        let batch = take_batch(&mut waiting, &names, MAX_BATCH);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].etcd_key, b"c/1.0");
        assert_eq!(
            waiting.len(),
            1,
            "the reused name waits for the next transaction"
        );
        // An acquire that gave up before its entry was written is dropped.
        drop(batch);
        drop(answers);
        assert!(take_batch(&mut waiting, &HashSet::new(), MAX_BATCH).is_empty());
        assert!(waiting.is_empty());
    }

    #[test]
    fn a_batch_leaves_room_for_deletions_within_etcds_transaction_limit() {
        let (mut waiting, _answers) = queue((0..200).map(|i| enqueue(&format!("k{i}/"), "x")));
        assert_eq!(
            take_batch(&mut waiting, &HashSet::new(), MAX_BATCH).len(),
            MAX_BATCH
        );
        assert_eq!(waiting.len(), 200 - MAX_BATCH);
    }
}
