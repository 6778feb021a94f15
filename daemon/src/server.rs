//! The accept loop: one task per connection, stopped by the shutdown token.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use lockd_protocol::{ErrorCode, ServerCodec, ServerMessage, WireError};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::Encoder;
use tokio_util::task::TaskTracker;

use crate::session;
use crate::shared::Shared;

/// Pause after an accept error such as EMFILE, so a full fd table does not spin the loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts connections on `listener` until `shared.shutdown` is cancelled, then waits (at most
/// the configured grace period) for every connection to say `ShuttingDown` and close.
pub async fn run(listener: UnixListener, shared: Arc<Shared>) {
    let tracker = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let max = shared.config.get().limits.max_connections;
                    if tracker.len() >= max {
                        refuse(&stream, max);
                        continue;
                    }
                    tracker.spawn(session::serve(stream, Arc::clone(&shared)));
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}; pausing {ACCEPT_BACKOFF:?}");
                    tokio::select! {
                        _ = shared.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            },
        }
    }
    drop(listener);
    shared.stop_sessions();
    tracker.close();
    let grace = shared.config.get().limits.shutdown_grace;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("some connections did not close within {grace:?}");
    }
}

/// Tells a connection over the limit why it is closed (best effort, never blocks).
fn refuse(stream: &UnixStream, max: usize) {
    tracing::warn!("refusing a connection: {max} connections are open, the configured maximum");
    let msg = ServerMessage::Rejected(WireError::new(
        ErrorCode::LimitExceeded,
        format!("lockd already serves {max} connections, its limit; retry later"),
    ));
    let mut buf = BytesMut::new();
    if ServerCodec::default().encode(msg, &mut buf).is_ok() {
        let _ = stream.try_write(&buf);
    }
}
