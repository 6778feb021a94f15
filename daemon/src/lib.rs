//! lockd: a single-host lock daemon. The binary `lockd` is a thin wrapper around [`run`].
//!
//! See ARCHITECTURE.md for the map of modules and their invariants.

pub mod auth;
pub mod clock;
pub mod config;
pub mod config_file;
pub mod duration;
pub mod fence;
pub mod lease;
pub mod listener;
pub mod lockspace;
pub mod peer;
pub mod recovery;
pub mod server;
pub mod session;
pub mod stats;
pub mod store;
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

/// Opens the store, binds the socket, serves until SIGTERM or SIGINT, then shuts down cleanly.
///
/// Order matters: the store is opened first, so a second daemon on the same data directory fails
/// before it touches the socket; the socket is bound before any thread starts (see
/// [`listener::bind`]).
///
/// # Errors
/// [`RunError`] describing what the operator must fix.
pub fn run(config: Config) -> Result<(), RunError> {
    let mut store = store::Store::open(&config.data_dir)?;
    let first_fences = fence::Fences::reserve_first(&mut store)?;
    let started = std::time::Instant::now();
    let records = store.load_leases()?;
    let writer = store::Writer::start(store).map_err(RunError::Runtime)?;
    let fences = fence::Fences::new(first_fences, writer.clone());
    let bound = listener::bind(&config.socket, config.socket_mode, config.socket_gid)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lockd-worker")
        .build()
        .map_err(RunError::Runtime)?;
    let result = runtime.block_on(async {
        bound
            .listener
            .set_nonblocking(true)
            .map_err(RunError::Runtime)?;
        let listener = tokio::net::UnixListener::from_std(
            bound.listener.try_clone().map_err(RunError::Runtime)?,
        )
        .map_err(RunError::Runtime)?;
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone()).map_err(RunError::Runtime)?;
        let locks = Arc::new(lockspace::LockSpace::new(fences));
        let (leases, arm) = lease::Leases::new(writer.clone());
        let usage = Arc::new(usage::Registry::default());
        let recovered = recovery::restore(
            records,
            &locks,
            &leases,
            &usage,
            &writer,
            clock::now_ms(),
            tokio::time::Instant::now(),
        );
        tracing::info!(
            restored = recovered.restored,
            expired = recovered.expired,
            superseded = recovered.superseded,
            "recovered detached leases in {:?}",
            started.elapsed()
        );
        tokio::spawn(Arc::clone(&leases).expire_loop(arm, Arc::clone(&locks)));
        tokio::spawn(watch_long_holds(Arc::clone(&locks), config.long_hold));
        let shared = session::Shared::new(locks, leases, usage, config, shutdown);
        tracing::info!(
            "lockd {} serving {} (data in {})",
            env!("CARGO_PKG_VERSION"),
            shared.config.socket.display(),
            shared.config.data_dir.display()
        );
        server::run(listener, shared).await;
        Ok(())
    });
    bound.remove();
    tracing::info!("lockd stopped");
    result
}

/// Logs holds older than `threshold` once each, checking a few times per threshold.
async fn watch_long_holds(locks: Arc<lockspace::LockSpace>, threshold: std::time::Duration) {
    use std::time::Duration;
    let every = (threshold / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        locks.warn_long_holds(threshold.as_millis() as u64);
    }
}

fn spawn_signal_handler(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{which} received: shutting down");
        shutdown.cancel();
    });
    Ok(())
}
