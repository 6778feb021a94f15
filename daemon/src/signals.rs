//! Signals, with signal-hook: SIGTERM and SIGINT stop the daemon gracefully, SIGHUP reloads
//! the configuration. A second SIGTERM or SIGINT during shutdown exits at once.

use std::sync::Arc;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::mpsc;

use crate::shared::Shared;
use crate::{systemd, Reload};

/// Signals caught by a dedicated thread and forwarded to the runtime.
pub struct Signals {
    rx: mpsc::UnboundedReceiver<i32>,
}

impl Signals {
    /// Installs the handlers (before any other thread starts).
    ///
    /// # Errors
    /// The handlers could not be registered.
    pub fn install() -> std::io::Result<Signals> {
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("lockd-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if tx.send(sig).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Signals { rx })
    }

    /// Acts on signals until the channel closes.
    pub async fn handle(mut self, shared: Arc<Shared>, reload: Reload) {
        let reload = Arc::new(reload);
        // Reloads run one at a time, in their own task: a SIGTERM is acted on at once even
        // while a reload waits on a slow user database.
        let one_reload = Arc::new(tokio::sync::Mutex::new(()));
        while let Some(sig) = self.rx.recv().await {
            match sig {
                // Once stopping, a reload would only send READY=1 over systemd's STOPPING=1.
                SIGHUP if shared.shutdown.is_cancelled() => {
                    tracing::info!("SIGHUP while shutting down: not reloading");
                }
                SIGHUP => {
                    let (shared, reload) = (Arc::clone(&shared), Arc::clone(&reload));
                    let one_reload = Arc::clone(&one_reload);
                    tokio::spawn(async move {
                        let _only = one_reload.lock().await;
                        reload_config(&shared, &reload).await;
                    });
                }
                _ => {
                    let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
                    if shared.shutdown.is_cancelled() {
                        tracing::warn!("{name} again: exiting at once");
                        std::process::exit(1);
                    }
                    tracing::info!("{name} received: shutting down");
                    systemd::stopping();
                    shared.shutdown.cancel();
                }
            }
        }
    }
}

/// Reloads the configuration, wrapped in systemd's reload protocol (`RELOADING=1` before,
/// `READY=1` after, whatever the outcome: see [`systemd`]). `reload` reads files and resolves
/// user and group names (which may block on NSS), so it runs on a blocking thread, never on an
/// async worker.
async fn reload_config(shared: &Shared, reload: &Arc<Reload>) {
    systemd::reloading();
    let reload = Arc::clone(reload);
    let loaded = tokio::task::spawn_blocking(move || reload())
        .await
        .unwrap_or_else(|e| Err(format!("the reload panicked: {e}")));
    match loaded {
        Ok(config) => {
            let old = shared.config.get();
            if config.socket != old.socket || config.data_dir != old.data_dir {
                tracing::warn!("the socket and data directory change only with a restart");
            }
            shared.config.replace(config);
            tracing::info!("configuration reloaded");
            systemd::reloaded(Ok(()));
        }
        Err(e) => {
            tracing::error!("configuration reload failed, keeping the old one: {e}");
            systemd::reloaded(Err(&e));
        }
    }
}
