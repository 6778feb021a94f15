//! What every connection shares: the engine, the live configuration, the shutdown token,
//! connection counters and the registry of live sessions.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};
use lockd_protocol::Stats;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::config::{Config, ConfigCell};
use crate::peer::{Owner, Push};
use crate::stats::Global;

/// State shared by every connection.
pub struct Shared {
    pub backend: Backend,
    /// The current configuration; replaced on reload (SIGHUP).
    pub config: ConfigCell,
    pub shutdown: CancellationToken,
    pub global: Global,
    /// Live sessions, so shutdown can reach them through their mailboxes (connect and
    /// disconnect only: never on the request path).
    sessions: std::sync::Mutex<HashMap<u64, Owner>>,
    started: std::time::Instant,
    next_conn: AtomicU64,
}

impl Shared {
    pub fn new(backend: Backend, config: Config, shutdown: CancellationToken) -> Arc<Shared> {
        Arc::new(Shared {
            backend,
            config: ConfigCell::new(config),
            shutdown,
            global: Global::default(),
            sessions: std::sync::Mutex::new(HashMap::new()),
            started: std::time::Instant::now(),
            next_conn: AtomicU64::new(1),
        })
    }

    /// A new connection id, unique for this daemon run (0 is never used).
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Tells every live session to say `ShuttingDown` and close.
    pub fn stop_sessions(&self) {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        for owner in sessions.values() {
            owner.push(Push::Shutdown);
        }
    }

    pub fn register(&self, owner: &Owner) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.insert(owner.id, owner.clone());
    }

    pub fn unregister(&self, id: u64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.remove(&id);
    }

    /// Counters, gauges and distributions, summed over the shards.
    pub fn snapshot(&self) -> Stats {
        let long_ms = self.config.get().long_hold.as_millis() as u64;
        // The etcd backend replaces the lock table's figures with the cluster's.
        let (t, leases) = match self.backend.local() {
            Some(e) => (e.totals(long_ms), e.leases() as u64),
            None => (Default::default(), 0),
        };
        let g = &self.global;
        let counters = [
            ("grants", t.stats.grants),
            ("conflicts", t.stats.conflicts),
            ("releases", t.stats.releases),
            ("timeouts", t.stats.timeouts),
            ("expiries", t.stats.expiries),
            ("disconnect_releases", t.stats.disconnect_releases),
            ("force_releases", t.stats.forced),
            ("deadlocks", t.stats.deadlocks),
            ("protocol_errors", Global::get(&g.protocol_errors)),
            ("connections_accepted", Global::get(&g.connections_total)),
            ("long_holds_warned", t.stats.long_holds_warned),
        ];
        let gauges = [
            ("connections", Global::get(&g.connections)),
            ("holds", t.holds),
            ("waiters", t.waiters),
            ("keys", t.keys),
            ("leases", leases),
            ("long_holds", t.long_holds),
            ("watches", t.watches),
        ];
        Stats {
            counters: counters.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
            gauges: gauges.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
            wait_ms: t.stats.wait_ms.to_wire(),
            hold_ms: t.stats.hold_ms.to_wire(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}
