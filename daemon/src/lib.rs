//! lockd: a single-host lock daemon. The binary `lockd` is a thin wrapper around [`run`].
//!
//! See ARCHITECTURE.md for the map of modules and their invariants.

pub mod auth;
pub mod backend;
pub mod clock;
#[cfg(feature = "etcd")]
pub mod cluster;
pub mod config;
pub mod config_file;
pub mod duration;
pub mod engine;
pub mod error;
pub mod fence;
pub mod listener;
pub mod man;
pub mod peer;
pub mod server;
pub mod session;
pub mod shared;
pub mod signals;
pub mod stats;
pub mod store;
pub mod systemd;
pub mod table;
pub mod tickets;
pub mod usage;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Listen(#[from] listener::ListenError),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}; lockd stopped so that its supervisor restarts it")]
    Fatal(String),
    #[error("{0}")]
    Backend(String),
}

/// Socket permission bits: group access for a system daemon run as root, owner only otherwise.
pub fn default_socket_mode() -> u32 {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        0o660
    } else {
        0o600
    }
}

/// Produces a fresh configuration on SIGHUP, or says why the file is not usable.
pub type Reload = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// Opens the store, binds the socket (or adopts systemd's), serves until SIGTERM or SIGINT,
/// then shuts down cleanly. SIGHUP calls `reload` and applies the result (a bad configuration
/// is logged and the old one kept).
///
/// Order matters: the store is opened first, so a second daemon on the same data directory fails
/// before it touches the socket; the socket is bound before any thread starts (see
/// [`listener::bind`]).
///
/// # Errors
/// [`RunError`] describing what the operator must fix.
pub fn run(config: Config, reload: Reload) -> Result<(), RunError> {
    let started = std::time::Instant::now();
    // The local backend's store opens before the socket is bound: a daemon that cannot read
    // its data never answers a client.
    let local = match &config.backend {
        config::Backend::Local => Some(open_local(&config)?),
        config::Backend::Etcd(_) => None,
    };
    let (std_listener, bound) = match systemd::activated_listener().map_err(RunError::Runtime)? {
        Some(l) => (l, None),
        None => {
            let bound = listener::bind(&config.socket, config.socket_mode, config.socket_gid)?;
            let l = bound.listener.try_clone().map_err(RunError::Runtime)?;
            (l, Some(bound))
        }
    };
    let signals = signals::Signals::install().map_err(RunError::Runtime)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lockd-worker")
        .build()
        .map_err(RunError::Runtime)?;
    let result = runtime.block_on(async {
        std_listener
            .set_nonblocking(true)
            .map_err(RunError::Runtime)?;
        let listener =
            tokio::net::UnixListener::from_std(std_listener).map_err(RunError::Runtime)?;
        let shutdown = CancellationToken::new();
        let fatal = Arc::new(std::sync::Mutex::new(None));
        let (backend, where_data, status) = match local {
            Some(local) => {
                let (engine, status) = start_local(local, started, &shutdown, &fatal)?;
                let data_dir = format!("data in {}", config.data_dir.display());
                (backend::Backend::Local(engine), data_dir, status)
            }
            None => start_etcd(&config).await?,
        };

        let where_ = bound.as_ref().map_or_else(
            || "a socket passed by systemd".to_string(),
            |b| b.path.display().to_string(),
        );
        let shared = shared::Shared::new(backend.clone(), config, shutdown.clone());
        tokio::spawn(signals.handle(Arc::clone(&shared), reload));
        if let Some(engine) = backend.local() {
            tokio::spawn(watch_long_holds(Arc::clone(&shared), Arc::clone(engine)));
            tokio::spawn(return_freed_memory(Arc::clone(engine)));
        }
        if let Some(every) = systemd::watchdog_interval() {
            tokio::spawn(watchdog(Arc::clone(&shared), every));
        }
        tracing::info!(
            "lockd {} serving {where_} ({where_data})",
            env!("CARGO_PKG_VERSION")
        );
        systemd::ready(&status);
        server::run(listener, shared).await;
        #[cfg(feature = "etcd")]
        if let backend::Backend::Etcd(cluster) = &backend {
            cluster.stop().await;
        }
        if let Some(engine) = backend.local() {
            match tokio::time::timeout(SYNC_AT_EXIT, engine.sync()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("could not store the last changes: {e}"),
                Err(_) => tracing::error!("the store did not finish within {SYNC_AT_EXIT:?}"),
            }
        }
        let why = fatal.lock().unwrap_or_else(|p| p.into_inner()).take();
        match why {
            Some(why) => Err(RunError::Fatal(why)),
            None => Ok(()),
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if let Some(bound) = bound {
        bound.remove();
    }
    tracing::info!("lockd stopped");
    result
}

/// The local backend's store, opened: what `start_local` needs.
struct LocalStore {
    store: store::Store,
    first_fences: (u64, u64),
    records: Vec<store::LeaseRecord>,
}

fn open_local(config: &Config) -> Result<LocalStore, RunError> {
    let mut store = store::Store::open(&config.data_dir)?;
    let first_fences = fence::Fences::reserve_first(&mut store)?;
    let records = store.load_leases()?;
    Ok(LocalStore {
        store,
        first_fences,
        records,
    })
}

/// Starts the local engine (its writer, recovery and timers); returns it and the status line.
fn start_local(
    local: LocalStore,
    started: std::time::Instant,
    shutdown: &CancellationToken,
    fatal: &Arc<std::sync::Mutex<Option<String>>>,
) -> Result<(Arc<engine::Engine>, String), RunError> {
    let writer = store::Writer::start(local.store).map_err(RunError::Runtime)?;
    let fences = fence::Fences::new(local.first_fences, writer.clone());
    let (engine, timers) = engine::Engine::new(fences, writer);
    let recovered = engine.recover(local.records, clock::now_ms(), tokio::time::Instant::now());
    tracing::info!(
        restored = recovered.restored,
        expired = recovered.expired,
        superseded = recovered.superseded,
        "recovered detached leases in {:?}",
        started.elapsed()
    );
    let timers = tokio::spawn(timers.run(Arc::clone(&engine)));
    tokio::spawn(stop_if_ended(timers, shutdown.clone(), Arc::clone(fatal)));
    let status = format!("serving; {} detached leases recovered", recovered.restored);
    Ok((engine, status))
}

#[cfg(feature = "etcd")]
async fn start_etcd(config: &Config) -> Result<(backend::Backend, String, String), RunError> {
    let config::Backend::Etcd(etcd) = &config.backend else {
        return Err(RunError::Fatal("start_etcd without [backend] etcd".into()));
    };
    let cluster = cluster::Cluster::start(etcd.clone())
        .await
        .map_err(|e| RunError::Backend(e.to_string()))?;
    let where_data = format!(
        "lock table in etcd at {} under {:?}, node {:?}",
        etcd.endpoints.join(","),
        etcd.prefix,
        etcd.node
    );
    Ok((
        backend::Backend::Etcd(cluster),
        where_data,
        "serving; lock table in etcd".into(),
    ))
}

#[cfg(not(feature = "etcd"))]
async fn start_etcd(_config: &Config) -> Result<(backend::Backend, String, String), RunError> {
    Err(RunError::Backend(
        "this lockd was built without the etcd backend (cargo feature \"etcd\"); \
         rebuild with default features or set [backend] kind = \"local\""
            .into(),
    ))
}

const SYNC_AT_EXIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Stops the daemon if the engine's timer tasks end (they never should): leases that never
/// expire are worse than a restart by the supervisor.
async fn stop_if_ended(
    task: tokio::task::JoinHandle<&'static str>,
    shutdown: CancellationToken,
    fatal: Arc<std::sync::Mutex<Option<String>>>,
) {
    let why = match task.await {
        Ok(why) => why.to_string(),
        Err(e) if e.is_panic() => "the engine's timer task panicked".to_string(),
        Err(_) => return, // cancelled: the runtime is shutting down
    };
    tracing::error!("{why}; stopping");
    *fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    shutdown.cancel();
}

/// Pings the systemd watchdog only after proving the daemon works: every shard lock can be
/// taken (no stuck lock table) and this task got scheduled (the runtime is alive).
async fn watchdog(shared: Arc<shared::Shared>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if shared.shutdown.is_cancelled() {
            return;
        }
        if let Some(engine) = shared.backend.local() {
            engine.locks().probe();
        }
        systemd::watchdog();
        let s = shared.snapshot();
        let gauge = |name: &str| s.gauges.iter().find(|(n, _)| n == name).map_or(0, |g| g.1);
        systemd::status(&format!(
            "{} connections, {} holds, {} waiters, {} leases",
            gauge("connections"),
            gauge("holds"),
            gauge("waiters"),
            gauge("leases")
        ));
    }
}

/// Gives freed memory back to the OS after many holds ended: once the number of keys fell to
/// under half its peak (by at least [`TRIM_AFTER`] keys), asks the allocator to return free
/// pages (`malloc_trim`; glibc keeps them otherwise). Checks once a second: one shard lock at a
/// time, O(1) each.
async fn return_freed_memory(engine: Arc<engine::Engine>) {
    const TRIM_AFTER: usize = 10_000;
    let mut peak = 0usize;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let keys = engine.locks().key_count();
        peak = peak.max(keys);
        if peak - keys >= TRIM_AFTER && keys < peak / 2 {
            tokio::task::spawn_blocking(trim_heap);
            peak = keys;
        }
    }
}

/// Returns free heap pages to the OS.
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions; it only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Logs holds older than the configured threshold once each, checking a few times per
/// threshold (the threshold follows configuration reloads).
async fn watch_long_holds(shared: Arc<shared::Shared>, engine: Arc<engine::Engine>) {
    use std::time::Duration;
    loop {
        let threshold = shared.config.get().long_hold;
        let every = (threshold / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
        tokio::time::sleep(every).await;
        engine.locks().warn_long_holds(threshold.as_millis() as u64);
    }
}
