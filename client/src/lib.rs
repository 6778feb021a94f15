//! Async client for lockd, the single-host lock daemon.
//!
//! ```no_run
//! # async fn demo() -> Result<(), lockd_client::Error> {
//! use std::time::Duration;
//! let client = lockd_client::Client::connect_default().await?;
//! let guard = client.acquire("nightly-backup").wait(Duration::from_secs(30)).await?;
//! println!("holding with fence {}", guard.fence());
//! tokio::select! {
//!     _ = guard.lost() => eprintln!("lock lost: stop touching the resource"),
//!     _ = tokio::time::sleep(Duration::from_secs(1)) => {}
//! }
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! One [`Client`] is one connection, multiplexed: any number of holds and waiting acquires
//! share it, and a waiting acquire never delays other requests. Every hold ends when the
//! connection closes, so a crashed program never leaves a lock behind.

mod acquire;
mod client;
mod connection;
mod election;
mod error;
mod guard;
mod trust;

pub use acquire::{AcquireBuilder, DetachedLease};
pub use client::{Client, ConnectOptions, Watch};
pub use election::{Election, Leader, Leadership, Observer};
pub use error::Error;
pub use guard::{LockGuard, Lost};
pub use lockd_protocol::{
    Change, Description, ErrorCode, HolderInfo, Key, KeySummary, ListPage, ListQuery, Mode,
    OwnerInfo, Stats, Ticket, WaiterInfo, WireError,
};
pub use trust::{TrustError, DAEMON_USER_ENV};
