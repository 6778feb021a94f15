//! The daemon's resolved settings, with the contract's defaults.

use std::path::PathBuf;
use std::time::Duration;

use lockd_protocol::DEFAULT_MAX_FRAME;

/// Default largest `data` attached to a hold, in bytes.
pub const DEFAULT_MAX_DATA: usize = 1024;
/// Default longest lease.
pub const DEFAULT_MAX_LEASE: Duration = Duration::from_secs(24 * 3600);
/// How long a new connection may take to send its `Hello`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for connections to flush and close.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Default most holds one connection may have at once.
pub const DEFAULT_MAX_HOLDS_PER_CONN: usize = 65_536;
/// Default most waiting acquires one connection may have at once.
pub const DEFAULT_MAX_WAITS_PER_CONN: usize = 65_536;
/// Default most keys one connection may watch.
pub const DEFAULT_MAX_WATCHES_PER_CONN: usize = 4096;
/// Default most simultaneous connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;

/// Everything the server needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    pub limits: Limits,
    /// Holds older than this are logged once at WARN and counted as long holds.
    pub long_hold: Duration,
    /// Permission bits of the socket file.
    pub socket_mode: u32,
    /// Besides root, these uids may use administrative operations (force-release).
    pub admin_uids: Vec<u32>,
    /// Peers whose primary gid is one of these may too.
    pub admin_gids: Vec<u32>,
}

impl Config {
    /// May a peer with `uid` and primary `gid` use administrative operations?
    pub fn is_admin(&self, uid: u32, gid: u32) -> bool {
        uid == 0 || self.admin_uids.contains(&uid) || self.admin_gids.contains(&gid)
    }
}

/// Default long-hold threshold.
pub const DEFAULT_LONG_HOLD: Duration = Duration::from_secs(300);

/// Bounds on what one client may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest frame payload, bytes.
    pub max_frame: usize,
    /// Largest hold `data`, bytes.
    pub max_data: usize,
    /// Longest lease.
    pub max_lease: Duration,
    pub handshake_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_holds_per_conn: usize,
    pub max_waits_per_conn: usize,
    /// Connections beyond this are answered `LimitExceeded` and closed.
    pub max_connections: usize,
    /// Most keys one connection may watch at once.
    pub max_watches_per_conn: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: DEFAULT_MAX_FRAME,
            max_data: DEFAULT_MAX_DATA,
            max_lease: DEFAULT_MAX_LEASE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_holds_per_conn: DEFAULT_MAX_HOLDS_PER_CONN,
            max_waits_per_conn: DEFAULT_MAX_WAITS_PER_CONN,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_watches_per_conn: DEFAULT_MAX_WATCHES_PER_CONN,
        }
    }
}

impl Limits {
    /// The part of the limits announced in `Welcome`.
    pub fn to_wire(&self) -> lockd_protocol::Limits {
        lockd_protocol::Limits {
            max_frame: self.max_frame as u32,
            max_data: self.max_data as u32,
            max_lease_ms: self.max_lease.as_millis() as u64,
        }
    }
}
