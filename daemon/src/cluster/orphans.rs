//! Entries this daemon may have written without knowing it. A write whose answer was lost may
//! still be applied after the daemon gave up on it and deleted its name (an etcd proposal can
//! outlive the client's timeout, and `Cluster::retry` may send a transaction twice). Such an
//! entry sits on the session lease, belongs to no request, and would block its key until the
//! lease ends, that is until the daemon stops.
//!
//! The index tracks every entry of this daemon from before its write until its deletion is
//! seen (and remembers a deleted one a while), so an entry on the session lease that the index
//! does not know is an orphan. Two ways to find one:
//! - an acquire meets it (in its way, or in its own name's place): looked at at once;
//! - every `session_ttl`, the session lease's keys (etcd's `LeaseTimeToLive` with keys) are
//!   checked: an orphan nobody meets blocks its key for about one TTL, as the holds of a
//!   daemon that died do.
//!
//! An orphan is deleted only if it is still that entry on this lease (compared by creation
//! revision and lease), so an entry reused, moved to a detached lease, or re-created
//! meanwhile is never touched.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use tokio::sync::mpsc;

use super::Cluster;

/// An entry that may be an orphan of session lease `lease`.
pub struct Suspect {
    pub etcd_key: Vec<u8>,
    pub lease: i64,
    /// Its creation revision, if seen (then only that entry is one).
    pub created: Option<i64>,
}

/// Runs until the daemon stops.
pub async fn run(cluster: Arc<Cluster>, mut rx: mpsc::UnboundedReceiver<Suspect>) {
    let mut sweeps = tokio::time::interval(cluster.config.session_ttl);
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            s = rx.recv() => match s {
                Some(s) => {
                    look(&cluster, &s).await;
                }
                None => return,
            },
            _ = sweeps.tick() => sweep(&cluster).await,
        }
    }
}

/// Looks at every entry on the current session lease that the index does not track.
async fn sweep(cluster: &Cluster) {
    let session = cluster.session.current();
    if !session.alive {
        return;
    }
    let Ok(ttl) = cluster
        .lease_keys("list the session lease's keys", session.lease)
        .await
    else {
        return;
    };
    let root = cluster.layout.keys_root();
    for key in ttl.keys() {
        if !key.starts_with(root.as_bytes()) || cluster.index.tracks(key) {
            continue;
        }
        let s = Suspect {
            etcd_key: key.clone(),
            lease: session.lease,
            created: None,
        };
        look(cluster, &s).await;
    }
}

/// Deletes the entry under `s`'s name if it is an orphan. True if one was deleted.
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
    let created = kv.create_revision();
    let other = kv.lease() != s.lease || s.created.is_some_and(|c| c != created);
    if other || cluster.index.knows(&s.etcd_key, created) {
        return false;
    }
    let txn = Txn::new()
        .when([
            Compare::create_revision(s.etcd_key.clone(), CompareOp::Equal, created),
            Compare::lease(s.etcd_key.clone(), CompareOp::Equal, s.lease),
        ])
        .and_then([TxnOp::delete(s.etcd_key.clone(), None)]);
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
