//! Every message that crosses the socket. Only these types derive serde.
//!
//! Durations are `u64` milliseconds; instants are milliseconds since the Unix epoch. The
//! structs keep those wire fields (`*_ms`) and offer accessors returning [`Duration`] and
//! [`SystemTime`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Key, Ticket, WireError};

/// Client-chosen request id, echoed by the response.
pub type RequestId = u64;

/// The wall-clock time `ms` milliseconds after the Unix epoch (the wire's instants).
pub fn system_time_from_ms(ms: u64) -> SystemTime {
    // Cannot overflow: `u64::MAX` milliseconds are 1.8e16 seconds, and Unix `SystemTime` has
    // 64-bit signed seconds.
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Milliseconds since the Unix epoch of `t` (0 before the epoch, saturating).
pub fn ms_from_system_time(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Messages from client to daemon.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// First message of a connection (variant 0 forever).
    Hello(Hello),
    /// Any later message.
    Request(Request),
}

/// Messages from daemon to client.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// Handshake accepted (variant 0 forever).
    Welcome(Welcome),
    /// Handshake refused, e.g. [`crate::ErrorCode::VersionMismatch`]; the daemon closes next
    /// (variant 1 forever). Also sent before closing on an undecodable frame.
    Rejected(WireError),
    /// The answer to one request.
    Response(Response),
    /// Something the daemon tells the client unasked.
    Event(Event),
}

/// The client's first message: who it is and which protocol it speaks.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// [`crate::PROTOCOL_VERSION`] of the client.
    pub protocol_version: u32,
    /// Free text shown by describe (e.g. the program's name); at most 256 bytes.
    pub client_name: String,
}

/// The daemon's answer to an accepted [`Hello`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// [`crate::PROTOCOL_VERSION`] of the daemon (equal to the client's).
    pub protocol_version: u32,
    /// The daemon's version string (e.g. `0.1.0`).
    pub server_version: String,
    /// What the daemon enforces on this connection.
    pub limits: Limits,
}

/// Limits the daemon enforces, announced so clients can check before sending.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload accepted, in bytes.
    pub max_frame: u32,
    /// Largest `data` attached to a hold, in bytes.
    pub max_data: u32,
    /// Longest lease, in milliseconds.
    pub max_lease_ms: u64,
}

impl Limits {
    /// The longest lease the daemon grants.
    pub fn max_lease(&self) -> Duration {
        Duration::from_millis(self.max_lease_ms)
    }
}

/// One request of a client.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Request {
    /// Chosen by the client, unique among its requests not yet answered.
    pub id: RequestId,
    /// What to do.
    pub op: Op,
}

/// The operations a client can ask for.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Op {
    /// Take a hold on a key. Answers [`Reply::Granted`] or an error.
    Acquire(Acquire),
    /// End a hold. Answers [`Reply::Released`] or `NotHolder`.
    Release {
        /// The hold's ticket.
        ticket: Ticket,
    },
    /// Withdraw a queued acquire of this connection. Answers [`Reply::Cancelled`]; the
    /// withdrawn acquire itself answers `Timeout`.
    Cancel {
        /// The id of the acquire to withdraw.
        request: RequestId,
    },
    /// Round trip without side effects. Answers [`Reply::Pong`].
    Ping,
    /// Extend a lease by its ticket, from any connection of the acquirer's uid, to `lease_ms`
    /// from now (default: its original length). Answers [`Reply::Renewed`] or `NotHolder`.
    Renew {
        /// The lease's ticket.
        ticket: Ticket,
        /// The new length from now, in milliseconds; `None`: the lease's original length.
        lease_ms: Option<u64>,
    },
    /// Holders and waiters of a key. Answers [`Reply::Described`].
    Describe {
        /// The key to describe.
        key: Key,
    },
    /// Keys with holders or waiters, sorted by `(namespace, name)`, one page at a time.
    /// Answers [`Reply::Listed`].
    List(ListQuery),
    /// End every hold on a key (administrators only). Answers [`Reply::ForceReleased`].
    ForceRelease {
        /// The key whose holds end.
        key: Key,
    },
    /// Stream [`Event::Watch`] events for a key on this connection. Answers
    /// [`Reply::Watching`].
    Watch {
        /// The key to watch.
        key: Key,
    },
    /// Stop a watch. Answers [`Reply::Unwatched`].
    Unwatch {
        /// The key to stop watching.
        key: Key,
    },
    /// Counters, gauges and distributions. Answers [`Reply::Stats`].
    Stats,
}

/// One page of [`Op::List`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Only this namespace; `None` for every namespace the peer may use.
    pub namespace: Option<String>,
    /// Only names starting with this.
    pub prefix: String,
    /// Resume after this key (the previous page's `next`).
    pub after: Option<Key>,
    /// Page size; the daemon caps it.
    pub limit: u32,
}

/// An acquire request ([`Op::Acquire`]).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Acquire {
    /// The key to hold.
    pub key: Key,
    /// Exclusive or shared.
    pub mode: Mode,
    /// Whether and how long to wait in the key's queue.
    pub wait: Wait,
    /// Lease length in milliseconds; `None` for a plain session hold.
    pub lease_ms: Option<u64>,
    /// Keep the hold after the connection closes (requires a lease).
    pub detach: bool,
    /// Make the key a counting semaphore with this many slots: at most `permits` holders at
    /// once, each taking one slot (`mode` must be `Exclusive`). The first holder or waiter of
    /// a key fixes its capacity; `None` is a plain lock.
    pub permits: Option<u32>,
    /// Lock-delay in milliseconds: if this hold ends without a release (its connection closed,
    /// its lease expired, it was force-released), the key stays unavailable this long. 0: none.
    pub lock_delay_ms: u64,
    /// Opaque bytes shown by describe, at most [`Limits::max_data`]. Encoded as a byte string
    /// (the same bytes as a sequence of u8), so decoding checks its length before allocating.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// How a hold shares its key.
///
/// Exhaustive on purpose: a new mode would change the grant rules, the wire and the daemon's
/// stored records together (a protocol version bump).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// The only holder (of a plain lock; of one slot of a semaphore).
    Exclusive,
    /// One of any number of shared holders; excludes exclusive ones.
    Shared,
}

impl Mode {
    /// Stable lower-case name: `exclusive` or `shared`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Exclusive => "exclusive",
            Mode::Shared => "shared",
        }
    }
}

/// How long an acquire may wait in the key's queue.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Try once; answer `Conflict` at once.
    No,
    /// Wait up to this many milliseconds, then answer `Timeout`.
    Millis(u64),
    /// Wait until granted, cancelled or disconnected.
    Forever,
}

/// The answer to one [`Request`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Response {
    /// The request's id.
    pub id: RequestId,
    /// What it achieved, or why not.
    pub result: Result<Reply, WireError>,
}

/// The successful answers, one per [`Op`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Reply {
    /// [`Op::Acquire`] succeeded.
    Granted(Grant),
    /// [`Op::Release`] ended the hold.
    Released,
    /// `true` when a queued acquire was withdrawn, `false` when there was none
    /// (already granted, timed out or unknown).
    Cancelled(bool),
    /// Answer to [`Op::Ping`].
    Pong,
    /// The lease now ends at this wall-clock time (milliseconds since the Unix epoch).
    Renewed {
        /// Milliseconds since the Unix epoch.
        expires_at_ms: u64,
    },
    /// Answer to [`Op::Describe`].
    Described(Description),
    /// Answer to [`Op::List`].
    Listed(ListPage),
    /// How many holds ended.
    ForceReleased {
        /// The number of holds ended.
        holds: u32,
    },
    /// The watch is in place: events follow.
    Watching,
    /// `true` when a watch was removed, `false` when there was none.
    Unwatched(bool),
    /// Answer to [`Op::Stats`].
    Stats(Stats),
}

/// Who holds and who waits for a key. Never contains tickets.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Description {
    /// The described key.
    pub key: Key,
    /// The first holders, as many as fit in one frame.
    pub holders: Vec<HolderInfo>,
    /// The first waiters in queue order, as many as fit in one frame after the holders.
    pub waiters: Vec<WaiterInfo>,
    /// Holders left out of `holders` so the answer fits in one frame.
    pub omitted_holders: u32,
    /// Waiters left out of `waiters` (the last ones in the queue) so the answer fits.
    pub omitted_waiters: u32,
    /// The key's capacity when it is a counting semaphore.
    pub permits: Option<u32>,
    /// The key is in lock-delay until this wall-clock time (milliseconds since the Unix epoch):
    /// nobody is granted before then.
    pub delayed_until_ms: Option<u64>,
}

impl Description {
    /// A key with no holders and no waiters (what describe answers for an unused key).
    pub fn empty(key: Key) -> Description {
        Description {
            key,
            holders: Vec::new(),
            waiters: Vec::new(),
            omitted_holders: 0,
            omitted_waiters: 0,
            permits: None,
            delayed_until_ms: None,
        }
    }
}

impl Description {
    /// The end of the key's lock-delay ([`Description::delayed_until_ms`]), if it is in one.
    pub fn delayed_until(&self) -> Option<SystemTime> {
        self.delayed_until_ms.map(system_time_from_ms)
    }
}

/// Identity of a connection, from the kernel (SO_PEERCRED) plus its handshake name.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct OwnerInfo {
    /// The peer's process id; `None` for a detached lease whose connection has closed.
    pub pid: Option<i32>,
    /// The peer's user id.
    pub uid: u32,
    /// The peer's group id.
    pub gid: u32,
    /// What the peer said in its [`Hello`]: untrusted text, escape it before showing it.
    pub client_name: String,
}

/// One holder of a key, as describe shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HolderInfo {
    /// How it holds the key.
    pub mode: Mode,
    /// Its fencing token.
    pub fence: u64,
    /// Who holds it.
    pub owner: OwnerInfo,
    /// Milliseconds since the Unix epoch.
    pub acquired_at_ms: u64,
    /// Lease end, milliseconds since the Unix epoch; `None` without a lease.
    pub expires_at_ms: Option<u64>,
    /// A detached lease: it outlives its connection.
    pub detached: bool,
    /// What the acquirer attached: untrusted bytes. Encoded as a byte string, as
    /// [`Acquire::data`].
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl HolderInfo {
    /// When the hold was granted (wall clock).
    pub fn acquired_at(&self) -> SystemTime {
        system_time_from_ms(self.acquired_at_ms)
    }

    /// When its lease ends unless renewed; `None` without a lease.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at_ms.map(system_time_from_ms)
    }
}

/// One waiter for a key, as describe shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WaiterInfo {
    /// The mode it asked for.
    pub mode: Mode,
    /// Who waits.
    pub owner: OwnerInfo,
    /// Milliseconds since the Unix epoch.
    pub since_ms: u64,
}

impl WaiterInfo {
    /// When it started waiting (wall clock).
    pub fn since(&self) -> SystemTime {
        system_time_from_ms(self.since_ms)
    }
}

/// One key of a list.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct KeySummary {
    /// The key.
    pub key: Key,
    /// How many hold it.
    pub holders: u32,
    /// How many wait for it.
    pub waiters: u32,
    /// Mode of the current holders, if any.
    pub mode: Option<Mode>,
}

/// One page of keys ([`Op::List`]).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// The keys, sorted by `(namespace, name)`.
    pub keys: Vec<KeySummary>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next: Option<Key>,
}

/// The daemon's counters (since start), gauges (now) and distributions.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Stats {
    /// Counters since the daemon started, by name.
    pub counters: Vec<(String, u64)>,
    /// Current values, by name.
    pub gauges: Vec<(String, u64)>,
    /// Time from queueing to grant, for requests that waited.
    pub wait_ms: Histogram,
    /// Time from grant to end, for ended holds.
    pub hold_ms: Histogram,
    /// Milliseconds since the daemon started.
    pub uptime_ms: u64,
}

impl Stats {
    /// How long the daemon has been running.
    pub fn uptime(&self) -> Duration {
        Duration::from_millis(self.uptime_ms)
    }
}

/// `counts[i]` observations were `<= bounds_ms[i]` (and above the previous bound); the extra
/// last count is above every bound.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Histogram {
    /// Upper bounds of the buckets, in milliseconds, ascending.
    pub bounds_ms: Vec<u64>,
    /// Observations per bucket: one more than `bounds_ms`.
    pub counts: Vec<u64>,
    /// The sum of all observations, in milliseconds.
    pub sum_ms: u64,
}

impl Histogram {
    /// The buckets' upper bounds ([`Histogram::bounds_ms`]).
    pub fn bounds(&self) -> impl Iterator<Item = Duration> + '_ {
        self.bounds_ms.iter().map(|&ms| Duration::from_millis(ms))
    }

    /// The sum of all observations.
    pub fn sum(&self) -> Duration {
        Duration::from_millis(self.sum_ms)
    }
}

/// A granted hold.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The capability to release (and renew) the hold: a secret.
    pub ticket: Ticket,
    /// Fencing token: greater than every fence this data directory granted before.
    pub fence: u64,
    /// The mode granted.
    pub mode: Mode,
    /// Lease end, milliseconds since the Unix epoch; `None` for plain session holds.
    pub expires_at_ms: Option<u64>,
}

impl Grant {
    /// When the lease ends unless renewed; `None` for plain session holds.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at_ms.map(system_time_from_ms)
    }
}

/// Daemon-initiated messages.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A hold of this connection ended other than by its own release.
    HoldLost {
        /// The key of the hold.
        key: Key,
        /// The hold's fence (names it among this connection's holds).
        fence: u64,
        /// Why it ended.
        reason: LostReason,
    },
    /// The daemon is stopping; the connection closes next and its session holds end.
    ShuttingDown,
    /// Something happened on a watched key.
    Watch {
        /// The watched key.
        key: Key,
        /// What happened.
        change: Change,
    },
}

/// What happened on a watched key.
///
/// New kinds of change may be added: match with a wildcard arm ([`Change::kind`] names each).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// A hold was granted.
    Granted {
        /// The new hold's fence.
        fence: u64,
        /// Its mode.
        mode: Mode,
        /// Who holds it now.
        owner: OwnerInfo,
    },
    /// A hold was released by its holder.
    Released {
        /// The ended hold's fence.
        fence: u64,
    },
    /// A hold's lease ran out.
    Expired {
        /// The ended hold's fence.
        fence: u64,
    },
    /// An administrator force-released a hold.
    Forced {
        /// The ended hold's fence.
        fence: u64,
    },
    /// The holder's connection closed.
    Disconnected {
        /// The ended hold's fence.
        fence: u64,
    },
    /// A waiting acquire of `owner` on this key was refused: it would have closed a cycle of
    /// connections waiting on each other (`cycle` names each key and owner in it).
    Deadlock {
        /// Whose acquire was refused.
        owner: OwnerInfo,
        /// The cycle, for humans: untrusted text (client names).
        cycle: String,
    },
}

impl Change {
    /// The fence of the hold concerned; 0 for [`Change::Deadlock`] (no hold).
    pub fn fence(&self) -> u64 {
        match self {
            Change::Granted { fence, .. }
            | Change::Released { fence }
            | Change::Expired { fence }
            | Change::Forced { fence }
            | Change::Disconnected { fence } => *fence,
            Change::Deadlock { .. } => 0,
        }
    }

    /// Stable lower-case name: granted, released, expired, forced, disconnected, deadlock.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Granted { .. } => "granted",
            Change::Released { .. } => "released",
            Change::Expired { .. } => "expired",
            Change::Forced { .. } => "forced",
            Change::Disconnected { .. } => "disconnected",
            Change::Deadlock { .. } => "deadlock",
        }
    }
}

/// Why a hold ended other than by its own release ([`Event::HoldLost`]).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    /// Its lease ran out.
    Expired,
    /// An administrator force-released it.
    ForceReleased,
    /// Released by its ticket from another connection.
    ReleasedElsewhere,
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LostReason::Expired => "lease expired",
            LostReason::ForceReleased => "force-released by an administrator",
            LostReason::ReleasedElsewhere => "released by its ticket from another connection",
        })
    }
}
