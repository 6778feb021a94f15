//! Integration tests: the real `lockd` and `lockctl` binaries, driven as users drive them.
//!
//! One test binary, one module per behaviour. Every daemon runs on its own temporary socket and
//! data directory; every wait is bounded.

mod admin;
mod counter;
mod crash;
mod durability;
mod fences;
mod hostile;
mod leases;
mod lockctl;
mod queue;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use lockd_client::{AcquireBuilder, Client, Error, LockGuard};
use lockd_tests::TestDaemon;

pub const LOCKD: &str = env!("CARGO_BIN_EXE_lockd");
pub const LOCKCTL: &str = env!("CARGO_BIN_EXE_lockctl");

/// Generous bound for things that should take milliseconds.
pub const PROMPT: Duration = Duration::from_secs(10);

pub async fn daemon() -> TestDaemon {
    TestDaemon::start(LOCKD).await
}

pub type Pending = Pin<Box<dyn Future<Output = Result<LockGuard, Error>> + Send>>;

/// Sends a (waiting) acquire and returns once the daemon has queued or answered it: the
/// request is polled once (which hands it to the connection), then a ping on the same
/// connection returns after the daemon has processed the acquire.
pub async fn enqueue(client: &Client, acquire: AcquireBuilder) -> Pending {
    let mut fut = acquire.into_future();
    let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
    assert!(
        first.is_pending(),
        "acquire answered before reaching the daemon"
    );
    client.ping().await.expect("ping after enqueue");
    fut
}

/// Is `fut` already complete? Polls it once without blocking.
pub async fn poll_once<T>(fut: &mut Pin<Box<dyn Future<Output = T> + Send>>) -> Option<T> {
    match std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// Awaits a spawned task (bounded), re-raising its panic.
pub async fn within_or_panic<T>(handle: tokio::task::JoinHandle<T>) -> T {
    match tokio::time::timeout(Duration::from_secs(120), handle).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
        Err(_) => panic!("task did not finish within 120s"),
    }
}
