//! Watches on etcd.
//!
//! - [`deletions`]: one watch per daemon on every deletion under the keys' root. A deleted
//!   entry that this daemon's [`super::index::Index`] knows as held was ended by someone else
//!   (a force-release, or its lease's expiry in etcd): its client gets `HoldLost`. If the watch
//!   falls behind etcd's compaction, every held entry is checked instead.
//! - [`key`]: `Op::Watch` on one key: the key's holders are read again after each change and
//!   compared, so a watcher sees `granted` and `released` for holds of every daemon.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchFilterType, WatchOptions};
use foldhash::{HashMap, HashMapExt};
use lockd_protocol::{Change, Key, LostReason, Reply, RequestId};
use tokio_util::sync::CancellationToken;

use super::conn::ConnShared;
use super::index::report;
use super::layout::Queue;
use super::Cluster;
use crate::peer::Push;

/// Follows every deletion under the keys' root for as long as the daemon runs.
pub async fn deletions(cluster: Arc<Cluster>) {
    let root = cluster.layout.keys_root();
    // From the cluster's revision before the session lease exists (`session::keep` waits for
    // this): nothing of ours exists before it, so no deletion of ours is missed.
    let mut next_revision = current_revision(&cluster).await + 1;
    cluster.watching_deletions.notify_one();
    loop {
        let options = WatchOptions::new()
            .with_prefix()
            .with_filters([WatchFilterType::NoPut])
            .with_start_revision(next_revision);
        let opened = cluster
            .watch("watch deletions", root.clone(), options)
            .await;
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("{e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.compact_revision() > 0 {
                        tracing::warn!(
                            "the deletion watch fell behind etcd's compaction; checking every hold"
                        );
                        next_revision = resync(&cluster).await + 1;
                        break;
                    }
                    // Resume after the last event seen (a response may be one part of a
                    // catch-up; its header's revision may be ahead of what it carries).
                    if let Some(kv) = resp.events().last().and_then(|e| e.kv()) {
                        next_revision = next_revision.max(kv.mod_revision() + 1);
                    }
                    for e in resp.events() {
                        if e.event_type() != EventType::Delete {
                            continue;
                        }
                        let Some(kv) = e.kv() else { continue };
                        if let Some(held) = cluster.index.deleted(kv.key(), kv.mod_revision()) {
                            report(held, LostReason::ForceReleased);
                        }
                    }
                    if resp.canceled() {
                        break;
                    }
                }
                Ok(None) | Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
            }
        }
    }
}

/// The cluster's current revision (retried until etcd answers).
async fn current_revision(cluster: &Cluster) -> i64 {
    let root = cluster.layout.keys_root();
    loop {
        let options = etcd_client::GetOptions::new()
            .with_prefix()
            .with_count_only();
        match cluster
            .get("read the revision", root.clone(), Some(options))
            .await
        {
            Ok(r) => return r.header().map_or(0, |h| h.revision()),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// After missed events: every held entry that is gone was ended by someone else, and every
/// pending one that is gone must not be granted. Returns the revision the checks are at least
/// as new as; the watch goes on after it.
async fn resync(cluster: &Cluster) -> i64 {
    let from = current_revision(cluster).await;
    cluster.index.drop_releasing();
    for etcd_key in cluster.index.live() {
        let got = cluster.get("check a hold", etcd_key.clone(), None).await;
        if let Ok(got) = got {
            let at = got.header().map_or(from, |h| h.revision());
            if got.kvs().is_empty() {
                if let Some(held) = cluster.index.deleted(&etcd_key, at) {
                    report(held, LostReason::ForceReleased);
                }
            }
        }
    }
    from
}

/// Streams `granted` and `released` events of `key` to the connection until `stop`; answers
/// request `id` (`Watching`) once the holders to compare with are read.
pub async fn key(
    cluster: Arc<Cluster>,
    key: Key,
    conn: Arc<ConnShared>,
    id: RequestId,
    stop: CancellationToken,
) {
    let owner = conn.owner.clone();
    let prefix = cluster.layout.key_prefix(&key);
    // fence -> still held, as last seen.
    let mut holders: HashMap<u64, ()> = HashMap::new();
    let mut first = true;
    loop {
        let read = tokio::select! {
            _ = stop.cancelled() => {
                if first {
                    // Replaced or withdrawn before it was in place: still answer its request.
                    conn.reply(id, Ok(Reply::Unwatched(true)));
                }
                return;
            }
            r = cluster.range("read the queue", prefix.clone()) => r,
        };
        let got = match read {
            Ok(got) => got,
            Err(e) if first => {
                let mut state = conn.state();
                // Only this watch's own entry (a newer Watch of the key may have replaced it).
                if state
                    .watches
                    .get(&key)
                    .is_some_and(|t| t.is_cancelled() || *t == stop)
                {
                    state.watches.remove(&key);
                }
                drop(state);
                conn.reply(id, Err(e));
                return;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        let revision = got.header().map_or(0, |h| h.revision());
        let queue = Queue::from_kvs(got.kvs());
        let (now, _) = queue.split();
        let mut seen: HashMap<u64, ()> = HashMap::new();
        for h in &now {
            let fence = h.create_revision as u64;
            seen.insert(fence, ());
            if !first && !holders.contains_key(&fence) {
                owner.push(Push::Watch {
                    key: key.clone(),
                    change: Change::Granted {
                        fence,
                        mode: h.record.mode,
                        owner: h.record.owner(),
                    },
                });
            }
        }
        if !first {
            let mut ended: Vec<u64> = holders
                .keys()
                .filter(|f| !seen.contains_key(f))
                .copied()
                .collect();
            ended.sort_unstable();
            for fence in ended {
                owner.push(Push::Watch {
                    key: key.clone(),
                    change: Change::Released { fence },
                });
            }
        }
        holders = seen;
        if first {
            conn.reply(id, Ok(Reply::Watching));
            first = false;
        }
        // Wait for the next change of the key's entries.
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            w = cluster.watch("watch a key", prefix.clone(), options) => w,
        };
        let Ok(mut stream) = opened else {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        };
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                m = stream.message() => m,
            };
            match msg {
                Ok(Some(resp)) if resp.events().is_empty() && !resp.canceled() => continue,
                _ => break,
            }
        }
    }
}
