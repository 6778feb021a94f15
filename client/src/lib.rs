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
//!
//! Programs without an async runtime use [`blocking`] (feature `blocking`, on by default): the
//! same client behind blocking calls. The crate's `examples/` folder has one small program per
//! use: try-lock, waiting with a timeout, a lease with renewal, a detached lease handed to
//! another process, leader election, watching a key, and the blocking client.
//!
//! Times are [`std::time::Duration`] (lengths) and [`std::time::SystemTime`] (wall-clock
//! instants); the protocol types re-exported here keep their wire fields in milliseconds
//! (`*_ms`) and offer accessors returning those types.

#![warn(missing_docs)]

mod acquire;
mod client;
mod connection;
mod election;
mod error;
mod guard;
mod trust;

#[cfg(feature = "blocking")]
pub mod blocking;

pub use acquire::{AcquireBuilder, DetachedLease};
pub use client::{Client, ConnectOptions, Watch};
pub use election::{Election, Leader, Leadership, Observer};
pub use error::Error;
pub use guard::{LockGuard, Lost};
pub use lockd_protocol::{
    Change, Description, ErrorCode, Histogram, HolderInfo, Key, KeyError, KeySummary, Limits,
    ListPage, ListQuery, Mode, OwnerInfo, Stats, Ticket, TicketParseError, WaiterInfo, WireError,
};
pub use trust::{TrustError, DAEMON_USER_ENV};
