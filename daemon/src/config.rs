//! The daemon's resolved settings, with the contract's defaults.

use std::path::PathBuf;
use std::time::Duration;

use lockd_protocol::DEFAULT_MAX_FRAME;

use crate::auth::Authz;

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
/// Default most connections of one uid.
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 4096;
/// Default most holds of one uid.
pub const DEFAULT_MAX_HOLDS_PER_UID: usize = 262_144;
/// Default most waiting acquires of one uid.
pub const DEFAULT_MAX_WAITS_PER_UID: usize = 262_144;
/// Default write stall after which a non-reading client is disconnected.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default most keys one connection may watch.
pub const DEFAULT_MAX_WATCHES_PER_CONN: usize = 4096;
/// Default longest lock-delay an acquire may ask for.
pub const DEFAULT_MAX_LOCK_DELAY: Duration = Duration::from_secs(60);
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
    /// Group of the socket file (`None`: the daemon's own).
    pub socket_gid: Option<u32>,
    /// Namespaces' users and groups, and admins.
    pub authz: Authz,
    /// Where the lock table lives. Read at start only: a reload keeps the running backend.
    pub backend: Backend,
}

/// Where the lock table lives (`[backend]` in the file).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Backend {
    /// In this process, with detached leases in the data directory (redb): the default.
    #[default]
    Local,
    /// In an etcd cluster shared by every lockd that names it.
    Etcd(EtcdConfig),
}

/// `[backend] kind = "etcd"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port`, one or more members.
    pub endpoints: Vec<String>,
    /// Every key lockd writes lives under it (ends with `/`).
    pub prefix: String,
    /// The TTL of this daemon's etcd lease (whole seconds, at least 2): its session holds end
    /// this long after it or its host dies.
    pub session_ttl: Duration,
    /// This daemon's name in owner details (default: the host name).
    pub node: String,
    /// How long one etcd request may take before the request answers `Unavailable`.
    pub request_timeout: Duration,
    /// CA certificate (PEM) to verify the members with; with it, `https` endpoints.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for members that ask for one.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// The default `session_ttl`.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(10);
/// The default `request_timeout`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

impl Config {
    /// Defaults with the given socket and data directory.
    pub fn new(socket: PathBuf, data_dir: PathBuf, socket_mode: u32) -> Config {
        Config {
            socket,
            data_dir,
            limits: Limits::default(),
            long_hold: DEFAULT_LONG_HOLD,
            socket_mode,
            socket_gid: None,
            authz: Authz::default(),
            backend: Backend::Local,
        }
    }

    /// Defaults with throw-away paths, for unit tests.
    pub fn for_tests() -> Config {
        Config::new(
            "/nonexistent/lockd.sock".into(),
            "/nonexistent/data".into(),
            0o600,
        )
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
    /// Connections of one uid beyond this are answered `LimitExceeded` and closed.
    pub max_connections_per_uid: usize,
    /// Holds (session holds and detached leases) of one uid at once.
    pub max_holds_per_uid: usize,
    /// Waiting acquires of one uid at once.
    pub max_waits_per_uid: usize,
    /// A connection whose responses cannot be written for this long (it does not read them)
    /// is closed and its session holds are released.
    pub write_timeout: Duration,
    /// Most keys one connection may watch at once.
    pub max_watches_per_conn: usize,
    /// Longest lock-delay an acquire may ask for.
    pub max_lock_delay: Duration,
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
            max_connections_per_uid: DEFAULT_MAX_CONNECTIONS_PER_UID,
            max_holds_per_uid: DEFAULT_MAX_HOLDS_PER_UID,
            max_waits_per_uid: DEFAULT_MAX_WAITS_PER_UID,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            max_watches_per_conn: DEFAULT_MAX_WATCHES_PER_CONN,
            max_lock_delay: DEFAULT_MAX_LOCK_DELAY,
        }
    }
}

impl Limits {
    /// The part of the limits announced in `Welcome`.
    /// A hold's data of `len` bytes, checked against `max_data`.
    pub fn check_data(&self, len: usize) -> Result<(), crate::error::Error> {
        if len > self.max_data {
            return Err(crate::error::Error::LimitExceeded(format!(
                "data is {len} bytes; the limit is {}",
                self.max_data
            )));
        }
        Ok(())
    }

    /// A requested lease length in milliseconds, checked: above 0, at most `max_lease`.
    pub fn check_lease(&self, ms: u64) -> Result<Duration, crate::error::Error> {
        use crate::error::Error;
        if ms == 0 {
            return Err(Error::InvalidArgument(
                "a lease of 0 ms: it must be above 0".into(),
            ));
        }
        let length = Duration::from_millis(ms);
        if length > self.max_lease {
            return Err(Error::LimitExceeded(format!(
                "lease of {ms} ms: the limit is {} ms",
                self.max_lease.as_millis()
            )));
        }
        Ok(length)
    }

    pub fn to_wire(&self) -> lockd_protocol::Limits {
        lockd_protocol::Limits {
            max_frame: self.max_frame as u32,
            max_data: self.max_data as u32,
            max_lease_ms: self.max_lease.as_millis() as u64,
        }
    }
}

/// The live configuration: read by connections (each keeps an `Arc` and re-reads it when the
/// generation changes), replaced as a whole on reload.
#[derive(Debug)]
pub struct ConfigCell {
    current: std::sync::RwLock<std::sync::Arc<Config>>,
    generation: std::sync::atomic::AtomicU64,
}

impl ConfigCell {
    pub fn new(config: Config) -> ConfigCell {
        ConfigCell {
            current: std::sync::RwLock::new(std::sync::Arc::new(config)),
            generation: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The current configuration.
    pub fn get(&self) -> std::sync::Arc<Config> {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        std::sync::Arc::clone(&guard)
    }

    /// Bumped by every [`ConfigCell::replace`].
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Installs `config`; connections pick it up at their next wake-up.
    pub fn replace(&self, config: Config) {
        let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
        *guard = std::sync::Arc::new(config);
        drop(guard);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}
