//! The etcd backend (`[backend] kind = "etcd"`): the lock table lives in an etcd cluster that
//! many lockd daemons (one per host) share; each daemon serves its local Unix socket exactly as
//! the local backend does.
//!
//! - `layout.rs` — what lives in etcd (entries per hold or waiter, the ticket index) and the
//!   grant rule that every daemon applies to the same creation order.
//! - `session.rs` — this daemon's etcd lease (its session holds and waiters hang on it): kept
//!   alive, and declared lost *before* etcd could expire it.
//! - `conn.rs` — one connection: its requests, each run as a task that answers through the
//!   connection's mailbox; dropping it deletes its entries.
//! - `batch.rs` — the one writer of entries: acquires' first steps and owed deletions, grouped
//!   into one transaction (many clients, and a release with the next acquire, cost etcd one).
//! - `acquire.rs` — the queue recipe: create an entry, read the key's queue, watch only the
//!   entry just ahead.
//! - `entry.rs` — an acquire's entry: named, written with its queue read, deleted on every
//!   path that does not hand it on.
//! - `admin.rs` — describe, list, force-release, stats, renew and release by ticket.
//! - `index.rs` and `slots.rs` — this daemon's entries, tracked until their deletion is
//!   seen, and the reused slots their names are made of.
//! - `orphans.rs` — entries on this daemon's lease that no request owns (late writes).
//! - `watch.rs` — the daemon-wide watch that tells holders their entry was deleted by someone
//!   else (force-release, expiry), and the per-key watches of `lockctl watch`.
//!
//! Invariants:
//! - **Every etcd call is bounded** by `request_timeout`; a call that fails answers
//!   `Unavailable`, and an entry it may have created is deleted in the background (`cleanup`)
//!   until that succeeds or the entry's lease is gone.
//! - **No hold outlives the certainty of its lease.** A session hold is reported lost
//!   (`HoldLost`) no later than `session_ttl - margin` after the last keepalive etcd confirmed
//!   was *sent*; etcd cannot expire the lease, and so grant the key elsewhere, before that.
//! - **Every entry this daemon creates is in the [`index::Index`] from before it is written
//!   until its deletion is seen**, so a deletion by anyone else is always attributed to its
//!   hold (or to its still-running acquire).
//! - **Entry names are reused, never shared**: a key's slot is reissued only once the
//!   deletion watch saw its entry gone; deletions compare the creation revision, puts that
//!   the name is free (`index.rs`, `batch.rs`).

mod acquire;
mod admin;
mod batch;
mod conn;
mod entry;
mod index;
mod layout;
mod orphans;
mod session;
mod slots;
mod watch;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, GetOptions, GetResponse, LeaseGrantResponse, LeaseTimeToLiveResponse,
    Txn, TxnResponse, WatchOptions,
};
use tokio::sync::mpsc;

pub use conn::Conn;
pub use layout::Layout;

use crate::config::EtcdConfig;
use crate::error::Error;
use crate::usage;

/// Why the etcd backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read {path}: {source}")]
    Tls {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up the etcd client for {endpoints}: {source}; check [backend] endpoints")]
    Client {
        endpoints: String,
        source: etcd_client::Error,
    },
}

/// Per-daemon counters (the cluster-wide gauges are read from etcd on request).
#[derive(Debug, Default)]
pub struct Counters {
    pub grants: AtomicU64,
    pub conflicts: AtomicU64,
    pub releases: AtomicU64,
    pub timeouts: AtomicU64,
    pub expiries: AtomicU64,
    pub disconnect_releases: AtomicU64,
    pub forced: AtomicU64,
    pub lost: AtomicU64,
}

impl Counters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The shared state of the etcd backend.
pub struct Cluster {
    pub(crate) client: Client,
    pub(crate) layout: Layout,
    pub(crate) config: EtcdConfig,
    pub(crate) session: session::Sessions,
    pub(crate) index: index::Index,
    pub(crate) usage: usage::Registry,
    pub(crate) counters: Counters,
    /// Acquires' first steps, to the batching task.
    pub(crate) enqueue: mpsc::UnboundedSender<batch::Enqueue>,
    /// Entries to delete in the background: (etcd key, the session generation it was made in).
    cleanup: mpsc::UnboundedSender<batch::Owed>,
    /// Names that may hold an entry this daemon does not know it wrote.
    orphans: mpsc::UnboundedSender<orphans::Suspect>,
    seq: AtomicU64,
    /// Operations per transaction at most: [`batch::MAX_OPS`], or less once etcd refused as
    /// many (its `--max-txn-ops` is lower).
    pub(crate) max_ops: std::sync::atomic::AtomicUsize,
    /// Notified each time the background deleter has deleted a batch (its keys are out of the
    /// index by then).
    pub(crate) deletions: tokio::sync::Notify,
    /// Notified once the deletion watch knows where it starts: no session lease (so no entry)
    /// exists before.
    pub(crate) watching_deletions: tokio::sync::Notify,
    /// Set by [`Cluster::stop`]: the session lease is not granted again.
    pub(crate) stopping: std::sync::atomic::AtomicBool,
}

impl Cluster {
    /// Connects (lazily: an unreachable cluster is not an error here) and starts the session
    /// lease, the deletion watch and the cleanup task on the current runtime.
    pub async fn start(config: EtcdConfig) -> Result<Arc<Cluster>, StartError> {
        let client = connect(&config).await?;
        let (cleanup, cleanup_rx) = mpsc::unbounded_channel();
        let (enqueue, enqueue_rx) = mpsc::unbounded_channel();
        let (orphans, orphans_rx) = mpsc::unbounded_channel();
        let cluster = Arc::new(Cluster {
            layout: Layout::new(&config.prefix),
            session: session::Sessions::new(),
            index: index::Index::default(),
            usage: usage::Registry::default(),
            counters: Counters::default(),
            client,
            config,
            cleanup,
            orphans,
            enqueue,
            seq: AtomicU64::new(1),
            max_ops: std::sync::atomic::AtomicUsize::new(batch::MAX_OPS),
            stopping: std::sync::atomic::AtomicBool::new(false),
            deletions: tokio::sync::Notify::new(),
            watching_deletions: tokio::sync::Notify::new(),
        });
        tokio::spawn(session::keep(Arc::clone(&cluster)));
        tokio::spawn(watch::deletions(Arc::clone(&cluster)));
        tokio::spawn(batch::run(Arc::clone(&cluster), enqueue_rx, cleanup_rx));
        tokio::spawn(orphans::run(Arc::clone(&cluster), orphans_rx));
        Ok(cluster)
    }

    /// The daemon stops (its connections are closed): revoking the session lease deletes every
    /// entry on it at once, so other hosts need not wait for the TTL.
    pub async fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let s = self.session.current();
        if s.alive {
            match self.revoke("revoke the session lease", s.lease).await {
                Ok(()) => tracing::info!("etcd session lease revoked: this daemon's holds ended"),
                Err(e) => tracing::warn!("{e}; this daemon's holds end with its lease's TTL"),
            }
        }
    }

    /// A fresh sequence number for an entry's name.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs an etcd call made by `make`, again while it fails to reach a member (another
    /// endpoint answers the next try), all within `request_timeout`. Only calls that may be
    /// repeated go through here: reads, deletes, puts of this daemon's unique entries.
    pub(crate) async fn retry<T, F, Fut>(&self, what: &str, mut make: F) -> Result<T, Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let limit = self.config.request_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, make(self.client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if unreachable(&e) => {
                    tracing::debug!("{what}: {e}; trying again");
                    let pause = tokio::time::Instant::now() + Duration::from_millis(20);
                    if pause >= deadline {
                        return Err(unavailable(what, &e.to_string()));
                    }
                    tokio::time::sleep_until(pause).await;
                }
                Ok(Err(e)) => return Err(unavailable(what, &e.to_string())),
                Err(_) => {
                    return Err(unavailable(
                        what,
                        &format!("etcd did not answer within {limit:?}"),
                    ))
                }
            }
        }
    }

    pub(crate) async fn get(
        &self,
        what: &str,
        key: impl Into<Vec<u8>>,
        options: Option<GetOptions>,
    ) -> Result<GetResponse, Error> {
        let key = key.into();
        self.retry(what, |mut c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.get(key, options).await }
        })
        .await
    }

    /// The entries with prefix `prefix`.
    pub(crate) async fn range(
        &self,
        what: &str,
        prefix: impl Into<Vec<u8>>,
    ) -> Result<GetResponse, Error> {
        self.get(what, prefix, Some(GetOptions::new().with_prefix()))
            .await
    }

    /// Every entry with prefix `prefix`, read in pages at one revision: a table of any size,
    /// where one response may carry at most 4 MiB. A page that is too large is read again in
    /// halves; a revision compacted away meanwhile starts the read over.
    pub(crate) async fn range_all(
        &self,
        what: &str,
        prefix: impl Into<Vec<u8>>,
    ) -> Result<Vec<etcd_client::KeyValue>, Error> {
        let prefix = prefix.into();
        let mut tries = 0;
        loop {
            match self.range_pages(what, &prefix).await {
                Err(e) if compacted(&e) && tries < 3 => tries += 1,
                other => return other,
            }
        }
    }

    async fn range_pages(
        &self,
        what: &str,
        prefix: &[u8],
    ) -> Result<Vec<etcd_client::KeyValue>, Error> {
        let mut start = prefix.to_vec();
        let end = prefix_end(prefix);
        let mut page = PAGE;
        let mut revision = 0;
        let mut all = Vec::new();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let got = match self.get(what, start.clone(), Some(options)).await {
                Err(e) if too_large(&e) && page > 1 => {
                    page /= 2;
                    continue;
                }
                got => got?,
            };
            if revision == 0 {
                revision = got.header().map_or(0, |h| h.revision());
            }
            all.extend_from_slice(got.kvs());
            match got.kvs().last() {
                Some(last) if got.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok(all),
            }
        }
    }

    pub(crate) async fn txn(&self, what: &str, txn: Txn) -> Result<TxnResponse, Error> {
        self.retry(what, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    pub(crate) async fn grant(&self, what: &str, ttl: i64) -> Result<LeaseGrantResponse, Error> {
        self.retry(what, |mut c| async move { c.lease_grant(ttl, None).await })
            .await
    }

    /// Revokes etcd lease `id` (a lease already gone counts as revoked).
    pub(crate) async fn revoke(&self, what: &str, id: i64) -> Result<(), Error> {
        let revoked = self
            .retry(what, |mut c| async move {
                match c.lease_revoke(id).await {
                    Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::NotFound => {
                        Ok(())
                    }
                    other => other.map(drop),
                }
            })
            .await;
        revoked
    }

    /// The remaining and granted TTL of etcd lease `id`.
    pub(crate) async fn time_to_live(
        &self,
        what: &str,
        id: i64,
    ) -> Result<LeaseTimeToLiveResponse, Error> {
        self.retry(
            what,
            |mut c| async move { c.lease_time_to_live(id, None).await },
        )
        .await
    }

    /// Lease `id` with the keys attached to it.
    pub(crate) async fn lease_keys(
        &self,
        what: &str,
        id: i64,
    ) -> Result<LeaseTimeToLiveResponse, Error> {
        let options = etcd_client::LeaseTimeToLiveOptions::new().with_keys();
        self.retry(what, |mut c| {
            let options = options.clone();
            async move { c.lease_time_to_live(id, Some(options)).await }
        })
        .await
    }

    pub(crate) async fn watch(
        &self,
        what: &str,
        key: impl Into<Vec<u8>>,
        options: WatchOptions,
    ) -> Result<etcd_client::WatchStream, Error> {
        let key = key.into();
        self.retry(what, |mut c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.watch(key, Some(options)).await }
        })
        .await
    }

    /// Gives up an entry this daemon created: tracked as being deleted, and deleted in the
    /// background.
    pub(crate) fn give_up(&self, owed: batch::Owed) {
        self.index.releasing(&owed.etcd_key, owed.token);
        self.delete_later(owed);
    }

    /// `etcd_key` may hold an entry of session lease `lease` that no request owns (the one
    /// created at `created`, seen there: looked at at once): deleted in the background.
    pub(crate) fn suspect(&self, etcd_key: Vec<u8>, lease: i64, created: Option<i64>) {
        let _ = self.orphans.send(orphans::Suspect {
            etcd_key,
            lease,
            created,
        });
    }

    /// Deletes an entry in the background, retrying until it is gone or its session lease
    /// is.
    pub(crate) fn delete_later(&self, owed: batch::Owed) {
        let _ = self.cleanup.send(owed);
    }
}

/// Entries per read of [`Cluster::range_all`] (a few hundred KiB).
const PAGE: i64 = 1000;

/// The end of the key range of every key starting with `prefix` (etcd's prefix end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: to the end of the keyspace.
    vec![0]
}

/// etcd's refusal of a transaction with more operations than its `--max-txn-ops`
/// (`rpctypes.ErrGRPCTooManyOps`), as [`Cluster::txn`] reports it.
pub(crate) fn too_many_ops(err: &Error) -> bool {
    err.to_string()
        .contains("too many operations in txn request")
}

/// A response larger than the client accepts (tonic's 4 MiB), as [`Cluster::get`] reports it.
fn too_large(err: &Error) -> bool {
    err.to_string().contains("message length too large")
}

/// A read at a revision etcd has compacted away (`rpctypes.ErrGRPCCompacted`).
fn compacted(err: &Error) -> bool {
    err.to_string()
        .contains("required revision has been compacted")
}

/// A failure to reach a member (connection refused or reset, no leader): another try may
/// reach another member.
fn unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::Unavailable,
        _ => false,
    }
}

/// The answer when etcd could not be reached.
pub(crate) fn unavailable(what: &str, why: &str) -> Error {
    Error::Unavailable(format!(
        "the etcd cluster did not {what} ({why}); retry later, or check the cluster and [backend] endpoints"
    ))
}

async fn connect(config: &EtcdConfig) -> Result<Client, StartError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.request_timeout)
        .with_keep_alive(Duration::from_secs(1), config.request_timeout)
        .with_keep_alive_while_idle(true)
        // A member cut off from the leader fails streams ("no leader") instead of keeping a
        // watch open and silent: the reconnect paths then reach a member that has one.
        .with_require_leader(true);
    if config.tls_ca.is_some() || config.tls_cert.is_some() {
        let read = |p: &std::path::PathBuf| {
            std::fs::read(p).map_err(|source| StartError::Tls {
                path: p.clone(),
                source,
            })
        };
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &config.tls_ca {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
            tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    let endpoints = config.endpoints.join(", ");
    Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(|source| StartError::Client { endpoints, source })
}
