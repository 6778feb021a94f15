//! Requests on the etcd backend besides acquire: release and renew by ticket, describe, list,
//! force-release and stats. Describe, list and stats read etcd, so they see every daemon's
//! holds; the counters and histograms in stats are this daemon's.

use std::time::Duration;

use std::sync::atomic::Ordering;

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use lockd_protocol::{
    Description, HolderInfo, Key, KeySummary, ListPage, ListQuery, Reply, Stats, Ticket, WaiterInfo,
};
use tokio::time::Instant;

use super::acquire::ttl_secs;
use super::conn::ConnShared;
use super::layout::{Queue, Record};
use super::{Cluster, Counters};
use crate::clock;
use crate::config::Config;
use crate::error::Error;
use crate::peer::Owner;

/// Room kept in a frame for the answer around the entries (as the local backend keeps).
const FRAME_MARGIN: usize = 400;
/// Upper bound of an encoded owner without its name.
const OWNER_SIZE: usize = 25;
/// Keys in one list page at most.
const MAX_LIST_PAGE: usize = 1000;

impl Cluster {
    /// Release by ticket of a detached lease of the caller's uid (any connection, any daemon);
    /// a session hold of the connection is released before this is reached.
    pub(crate) async fn release(&self, conn: &ConnShared, ticket: Ticket) -> Result<Reply, Error> {
        let (lease, _hold_key) = self.detached(&conn.owner, &ticket).await?;
        self.revoke("revoke the detached lease", lease).await?;
        Counters::inc(&self.counters.releases);
        Ok(Reply::Released)
    }

    /// The etcd lease and entry of detached lease `ticket`, if the caller may act on it.
    async fn detached(&self, owner: &Owner, ticket: &Ticket) -> Result<(i64, Vec<u8>), Error> {
        let index = self.layout.ticket_key(ticket);
        let got = self.get("find the lease", index, None).await?;
        let Some(ix) = got.kvs().first() else {
            return Err(Error::not_holder());
        };
        let hold_key = ix.value().to_vec();
        let got = self.get("read the hold", hold_key.clone(), None).await?;
        let Some(hold) = got.kvs().first() else {
            return Err(Error::not_holder());
        };
        let record = Record::decode(hold.value()).ok_or_else(Error::not_holder)?;
        if owner.acting_uid() != 0 && record.uid != owner.uid {
            return Err(Error::not_holder());
        }
        Ok((hold.lease(), hold_key))
    }

    /// Renews a lease by ticket: a session lease of this connection (kept by this daemon), or
    /// a detached lease (its etcd lease: a keepalive when the length is unchanged, else a new
    /// etcd lease for the entry and its index).
    pub(crate) async fn renew(
        &self,
        conn: &ConnShared,
        ticket: Ticket,
        length: Option<Duration>,
    ) -> Result<Reply, Error> {
        let mine = conn
            .state()
            .holds
            .get(&ticket)
            .map(|h| (h.lease.clone(), h.key.clone()));
        if let Some((clock, key)) = mine {
            let Some(clock) = clock else {
                return Err(Error::InvalidArgument(format!(
                    "{key}: this hold has no lease to renew (it lasts as long as its connection)"
                )));
            };
            let mut len = clock.length.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = length {
                *len = l;
            }
            *clock.deadline.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now() + *len;
            return Ok(Reply::Renewed {
                expires_at_ms: clock::now_ms() + len.as_millis() as u64,
            });
        }
        let (lease, hold_key) = self.detached(&conn.owner, &ticket).await?;
        let current = self.time_to_live("read the lease", lease).await?;
        if current.ttl() <= 0 {
            return Err(Error::not_holder());
        }
        let granted = current.granted_ttl();
        let wanted = length.map_or(granted, ttl_secs);
        if wanted == granted {
            // etcd-client sends one keepalive as it opens the stream and reads its answer: an
            // open stream means etcd renewed the lease to its granted TTL.
            let mut leases = self.client.lease_client();
            let limit = self.config.request_timeout;
            return match tokio::time::timeout(limit, leases.keep_alive(lease)).await {
                Ok(Ok(_)) => Ok(Reply::Renewed {
                    expires_at_ms: clock::now_ms() + granted as u64 * 1000,
                }),
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => Err(Error::not_holder()),
                Ok(Err(e)) => Err(super::unavailable("renew the lease", &e.to_string())),
                Err(_) => Err(super::unavailable(
                    "renew the lease",
                    &format!("etcd did not answer within {limit:?}"),
                )),
            };
        }
        // A new length: a new etcd lease for both entries (their creation revision, and so
        // the fence, stays), then the old lease goes.
        let fresh = self.grant("grant the renewed lease", wanted).await?;
        let index = self.layout.ticket_key(&ticket);
        let hold_key_again = hold_key.clone();
        let txn = Txn::new()
            .when([etcd_client::Compare::lease(
                hold_key.clone(),
                etcd_client::CompareOp::Equal,
                lease,
            )])
            .and_then([
                TxnOp::put(
                    hold_key.clone(),
                    Vec::new(),
                    Some(
                        etcd_client::PutOptions::new()
                            .with_lease(fresh.id())
                            .with_ignore_value(),
                    ),
                ),
                TxnOp::put(
                    index,
                    hold_key,
                    Some(etcd_client::PutOptions::new().with_lease(fresh.id())),
                ),
            ]);
        let moved = self.txn("renew the lease", txn).await;
        // A retried transaction whose first try went through fails its compare: the entry is
        // on the new lease already, which is success.
        let moved_before = match &moved {
            Ok(r) if !r.succeeded() => self
                .get("read the hold", hold_key_again.clone(), None)
                .await
                .ok()
                .and_then(|g| g.kvs().first().map(|kv| kv.lease() == fresh.id()))
                .unwrap_or(false),
            _ => false,
        };
        match moved {
            Ok(_) if moved_before => {
                let _ = self.revoke("revoke a lease", lease).await;
                Ok(Reply::Renewed {
                    expires_at_ms: clock::now_ms() + fresh.ttl().max(wanted) as u64 * 1000,
                })
            }
            Ok(r) if r.succeeded() => {
                let _ = self.revoke("revoke a lease", lease).await;
                Ok(Reply::Renewed {
                    expires_at_ms: clock::now_ms() + fresh.ttl().max(wanted) as u64 * 1000,
                })
            }
            other => {
                let _ = self.revoke("revoke a lease", fresh.id()).await;
                other.and(Err(Error::not_holder()))
            }
        }
    }

    /// Reads one key's queue.
    async fn queue(&self, key: &Key) -> Result<Queue, Error> {
        let got = self
            .range("read the queue", self.layout.key_prefix(key))
            .await?;
        Ok(Queue::from_kvs(got.kvs()))
    }

    /// Holders and waiters of `key` across the cluster, cut to fit a frame.
    pub(crate) async fn describe(&self, key: &Key, max_frame: usize) -> Result<Reply, Error> {
        let queue = self.queue(key).await?;
        let (holders, waiters) = queue.split();
        let mut budget = max_frame.saturating_sub(FRAME_MARGIN);
        let mut fits = |size: usize| {
            let ok = size <= budget;
            if ok {
                budget -= size;
            }
            ok
        };
        let mut d = Description::empty(key.clone());
        for h in holders {
            let r = &h.record;
            let size = OWNER_SIZE + r.client.len() + r.node.len() + 50 + r.data.len() / 2;
            if d.omitted_holders > 0 || !fits(size) {
                d.omitted_holders += 1;
                continue;
            }
            let expires_at_ms = if r.detached {
                self.time_to_live("read a lease", h.lease)
                    .await
                    .ok()
                    .filter(|t| t.ttl() > 0)
                    .map(|t| clock::now_ms() + t.ttl() as u64 * 1000)
            } else {
                None
            };
            d.holders.push(HolderInfo {
                mode: r.mode,
                fence: h.create_revision as u64,
                owner: r.owner(),
                acquired_at_ms: r.at_ms,
                expires_at_ms,
                detached: r.detached,
                data: r.data_bytes(),
            });
        }
        for w in waiters {
            let r = &w.record;
            if d.omitted_waiters > 0 || !fits(OWNER_SIZE + r.client.len() + r.node.len() + 17) {
                d.omitted_waiters += 1;
                continue;
            }
            d.waiters.push(WaiterInfo {
                mode: r.mode,
                owner: r.owner(),
                since_ms: r.at_ms,
            });
        }
        Ok(Reply::Described(d))
    }

    /// One page of keys with holders or waiters, across the cluster.
    pub(crate) async fn list(
        &self,
        owner: &Owner,
        config: &Config,
        query: &ListQuery,
    ) -> Result<Reply, Error> {
        if let Some(ns) = &query.namespace {
            lockd_protocol::key::validate_namespace(ns)
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
            config.authz.authorize(ns, owner.uid, &owner.groups)?;
        }
        let root = match &query.namespace {
            Some(ns) => self.layout.name_prefix(ns, &query.prefix),
            None => self.layout.keys_root(),
        };
        let got = self.range_all("list the keys", root).await?;
        let mut by_key: std::collections::BTreeMap<(String, String), Vec<etcd_client::KeyValue>> =
            std::collections::BTreeMap::new();
        for kv in &got {
            let Some(key) = self.layout.key_of(kv.key()) else {
                continue;
            };
            let wanted = key.name.starts_with(&query.prefix)
                && config
                    .authz
                    .may_use(&key.namespace, owner.uid, &owner.groups)
                && query.after.as_ref().is_none_or(|after| {
                    (&key.namespace, &key.name) > (&after.namespace, &after.name)
                });
            if wanted {
                by_key
                    .entry((key.namespace, key.name))
                    .or_default()
                    .push(kv.clone());
            }
        }
        let limit = (query.limit as usize).clamp(1, MAX_LIST_PAGE);
        let mut budget = config.limits.max_frame.saturating_sub(FRAME_MARGIN);
        let mut keys = Vec::new();
        let mut next = None;
        for ((namespace, name), kvs) in by_key {
            let size = 30 + namespace.len() + name.len();
            if keys.len() == limit || (size > budget && !keys.is_empty()) {
                next = keys.last().map(|k: &KeySummary| k.key.clone());
                break;
            }
            budget = budget.saturating_sub(size);
            let queue = Queue::from_kvs(&kvs);
            let (holders, waiters) = queue.split();
            let Ok(key) = Key::new(namespace, name) else {
                continue;
            };
            keys.push(KeySummary {
                key,
                holders: holders.len() as u32,
                waiters: waiters.len() as u32,
                mode: holders.first().map(|h| h.record.mode),
            });
        }
        Ok(Reply::Listed(ListPage { keys, next }))
    }

    /// Ends every hold on `key`, on whichever daemon: deletes their entries (a detached lease's
    /// whole etcd lease). Their daemons tell their clients (`HoldLost`). Each entry is deleted
    /// only if it is still the one read (names are reused): a hold that ended meanwhile is not
    /// counted, and a later entry under its name is left alone.
    pub(crate) async fn force_release(&self, key: &Key) -> Result<Reply, Error> {
        let queue = self.queue(key).await?;
        let (holders, _) = queue.split();
        let mut ops = Vec::new();
        let mut leases = Vec::new();
        for h in &holders {
            // A detached lease's entry is on its own etcd lease once moved there; until then
            // (just granted) it is on its daemon's session lease, which must not be revoked.
            let own_lease = super::layout::creator_lease(&h.etcd_key) != Some(h.lease);
            if h.record.detached && own_lease {
                leases.push(h.lease);
            } else {
                let same = Compare::create_revision(
                    h.etcd_key.clone(),
                    CompareOp::Equal,
                    h.create_revision,
                );
                let delete = TxnOp::delete(h.etcd_key.clone(), None);
                ops.push(TxnOp::txn(Txn::new().when([same]).and_then([delete])));
            }
        }
        let mut ended = 0;
        // Nested transactions count against etcd's operation limit with their parent's; a
        // lower limit (`--max-txn-ops`) is learned from etcd's refusal.
        let mut most = self.max_ops.load(Ordering::Relaxed);
        while !ops.is_empty() {
            let take = ops.len().min(most);
            let chunk = Txn::new().and_then(ops[..take].to_vec());
            match self.txn("delete the holds", chunk).await {
                Ok(done) => {
                    ops.drain(..take);
                    ended += done
                        .op_responses()
                        .iter()
                        .filter(|r| matches!(r, TxnOpResponse::Txn(t) if t.succeeded()))
                        .count();
                }
                Err(e) if super::too_many_ops(&e) && most > 1 => {
                    most = (most / 2).max(1);
                    self.max_ops.fetch_min(most, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        for lease in leases {
            self.revoke("revoke a detached lease", lease).await?;
            ended += 1;
        }
        for _ in 0..ended {
            Counters::inc(&self.counters.forced);
        }
        Ok(Reply::ForceReleased {
            holds: ended as u32,
        })
    }

    /// This daemon's counters and the cluster's holds, waiters, keys and leases.
    pub(crate) async fn stats(&self, base: Stats) -> Result<Reply, Error> {
        let got = self
            .range_all("read the lock table", self.layout.keys_root())
            .await?;
        let mut by_key: std::collections::HashMap<Key, Vec<etcd_client::KeyValue>> =
            std::collections::HashMap::new();
        for kv in &got {
            if let Some(key) = self.layout.key_of(kv.key()) {
                by_key.entry(key).or_default().push(kv.clone());
            }
        }
        let (mut holds, mut waiters, mut detached) = (0u64, 0u64, 0u64);
        for kvs in by_key.values() {
            let queue = Queue::from_kvs(kvs);
            let (h, w) = queue.split();
            holds += h.len() as u64;
            waiters += w.len() as u64;
            detached += h.iter().filter(|e| e.record.detached).count() as u64;
        }
        let c = &self.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let counters = [
            ("grants", get(&c.grants)),
            ("conflicts", get(&c.conflicts)),
            ("releases", get(&c.releases)),
            ("timeouts", get(&c.timeouts)),
            ("expiries", get(&c.expiries)),
            ("disconnect_releases", get(&c.disconnect_releases)),
            ("force_releases", get(&c.forced)),
            ("session_leases_lost", get(&c.lost)),
        ];
        let gauges = [
            ("holds", holds),
            ("waiters", waiters),
            ("keys", by_key.len() as u64),
            ("leases", detached),
        ];
        // The session's own (connections, protocol errors, uptime) stay; the lock table's are
        // replaced by the cluster's.
        let mut stats = base;
        let ours = |name: &str| {
            counters.iter().any(|(n, _)| *n == name) || gauges.iter().any(|(n, _)| *n == name)
        };
        stats.counters.retain(|(n, _)| !ours(n));
        stats.gauges.retain(|(n, _)| !ours(n));
        stats
            .counters
            .extend(counters.iter().map(|(n, v)| (n.to_string(), *v)));
        stats
            .gauges
            .extend(gauges.iter().map(|(n, v)| (n.to_string(), *v)));
        Ok(Reply::Stats(stats))
    }
}
