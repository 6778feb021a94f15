//! Entries this daemon may have written without knowing it. A write whose answer was lost may
//! still be applied after the daemon gave up on it and deleted its name (an etcd proposal can
//! outlive the client's timeout). Such an entry sits on the session lease, belongs to no
//! request, and would block its key until the lease ends, that is until the daemon stops.
//!
//! Two ways to find one:
//! - the name of a write given up without an answer: the index never reuses it under the same
//!   session lease (`index.rs` burns its slot), so whatever is found under it on that lease
//!   later is an orphan. Looked at a few times.
//! - an entry an acquire found in its way (or in the place of its own write) that is on this
//!   daemon's session lease but not in the index: every entry the daemon creates is tracked
//!   from before its write until its deletion is seen, so that entry is an orphan. Looked at
//!   once, at once, and only that entry (by creation revision) is one: its name may have been
//!   reused meanwhile.
//!
//! An orphan is deleted guarded by its creation revision.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use tokio::sync::mpsc;
use tokio_util::time::DelayQueue;

use super::Cluster;

/// A name that may hold an orphan of session lease `lease`.
pub struct Suspect {
    pub etcd_key: Vec<u8>,
    pub lease: i64,
    /// The orphan's creation revision, if seen (then only that entry is one).
    pub created: Option<i64>,
}

/// Looks at each suspect at these times after it is reported, in multiples of
/// `request_timeout` (a late write lands within a few timeouts, or never).
const LOOKS: [u32; 3] = [1, 3, 10];

/// Runs until the daemon stops.
pub async fn run(cluster: Arc<Cluster>, mut rx: mpsc::UnboundedReceiver<Suspect>) {
    let unit = cluster.config.request_timeout;
    let mut due: DelayQueue<(Suspect, usize)> = DelayQueue::new();
    loop {
        tokio::select! {
            s = rx.recv() => match s {
                Some(s) => {
                    let first = if s.created.is_some() { Duration::ZERO } else { unit * LOOKS[0] };
                    due.insert((s, 0), first);
                }
                None => return,
            },
            Some(expired) = futures_next(&mut due) => {
                let (s, looked) = expired.into_inner();
                let removed = look(&cluster, &s).await;
                let next = looked + 1;
                if !removed && s.created.is_none() && next < LOOKS.len() {
                    due.insert((s, next), unit * (LOOKS[next] - LOOKS[looked]));
                }
            }
        }
    }
}

/// The next expired suspect (pending while there is none).
async fn futures_next(
    due: &mut DelayQueue<(Suspect, usize)>,
) -> Option<tokio_util::time::delay_queue::Expired<(Suspect, usize)>> {
    if due.is_empty() {
        return std::future::pending().await;
    }
    std::future::poll_fn(|cx| due.poll_expired(cx)).await
}

/// Deletes the orphan under `s`'s name, if there is one. True if one was deleted.
async fn look(cluster: &Cluster, s: &Suspect) -> bool {
    let Ok(got) = cluster
        .get("look for an orphan", s.etcd_key.clone(), None)
        .await
    else {
        return false;
    };
    let Some(kv) = got.kvs().first() else {
        return false;
    };
    if kv.lease() != s.lease || s.created.is_some_and(|c| c != kv.create_revision()) {
        return false;
    }
    let same = Compare::create_revision(s.etcd_key.clone(), CompareOp::Equal, kv.create_revision());
    let delete = TxnOp::delete(s.etcd_key.clone(), None);
    let txn = Txn::new().when([same]).and_then([delete]);
    match cluster.txn("delete an orphan", txn).await {
        Ok(r) if r.succeeded() => {
            let name = String::from_utf8_lossy(&s.etcd_key);
            tracing::warn!(
                key = %lockd_protocol::display::Escaped(&name),
                "deleted an entry of this daemon that no request owned (a write applied after \
                 its answer was lost)"
            );
            true
        }
        _ => false,
    }
}
