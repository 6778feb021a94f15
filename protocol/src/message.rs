//! Every message that crosses the socket. Only these types derive serde.
//!
//! Durations are `u64` milliseconds; instants are milliseconds since the Unix epoch.

use serde::{Deserialize, Serialize};

use crate::{Key, Ticket, WireError};

/// Client-chosen request id, echoed by the response.
pub type RequestId = u64;

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

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u32,
    /// Free text shown by describe (e.g. the program's name); at most 256 bytes.
    pub client_name: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub protocol_version: u32,
    pub server_version: String,
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

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Request {
    pub id: RequestId,
    pub op: Op,
}

/// The operations a client can ask for.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Op {
    /// Take a hold on a key. Answers [`Reply::Granted`] or an error.
    Acquire(Acquire),
    /// End a hold. Answers [`Reply::Released`] or `NotHolder`.
    Release { ticket: Ticket },
    /// Withdraw a queued acquire of this connection. Answers [`Reply::Cancelled`]; the
    /// withdrawn acquire itself answers `Timeout`.
    Cancel { request: RequestId },
    /// Round trip without side effects. Answers [`Reply::Pong`].
    Ping,
    /// Extend a lease by its ticket, from any connection of the acquirer's uid, to `lease_ms`
    /// from now (default: its original length). Answers [`Reply::Renewed`] or `NotHolder`.
    Renew {
        ticket: Ticket,
        lease_ms: Option<u64>,
    },
    /// Holders and waiters of a key. Answers [`Reply::Described`].
    Describe { key: Key },
    /// Keys with holders or waiters, sorted by `(namespace, name)`, one page at a time.
    /// Answers [`Reply::Listed`].
    List(ListQuery),
    /// End every hold on a key (administrators only). Answers [`Reply::ForceReleased`].
    ForceRelease { key: Key },
    /// Stream [`Event::Watch`] events for a key on this connection. Answers
    /// [`Reply::Watching`].
    Watch { key: Key },
    /// Stop a watch. Answers [`Reply::Unwatched`].
    Unwatch { key: Key },
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

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Acquire {
    pub key: Key,
    pub mode: Mode,
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

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    Exclusive,
    Shared,
}

impl Mode {
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

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Response {
    pub id: RequestId,
    pub result: Result<Reply, WireError>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Reply {
    Granted(Grant),
    Released,
    /// `true` when a queued acquire was withdrawn, `false` when there was none
    /// (already granted, timed out or unknown).
    Cancelled(bool),
    Pong,
    /// The lease now ends at this wall-clock time (milliseconds since the Unix epoch).
    Renewed {
        expires_at_ms: u64,
    },
    Described(Description),
    Listed(ListPage),
    /// How many holds ended.
    ForceReleased {
        holds: u32,
    },
    Watching,
    Unwatched(bool),
    Stats(Stats),
}

/// Who holds and who waits for a key. Never contains tickets.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Description {
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

/// Identity of a connection, from the kernel (SO_PEERCRED) plus its handshake name.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct OwnerInfo {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
    pub client_name: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HolderInfo {
    pub mode: Mode,
    pub fence: u64,
    pub owner: OwnerInfo,
    /// Milliseconds since the Unix epoch.
    pub acquired_at_ms: u64,
    /// Lease end, milliseconds since the Unix epoch; `None` without a lease.
    pub expires_at_ms: Option<u64>,
    pub detached: bool,
    /// Encoded as a byte string, as [`Acquire::data`].
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WaiterInfo {
    pub mode: Mode,
    pub owner: OwnerInfo,
    /// Milliseconds since the Unix epoch.
    pub since_ms: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct KeySummary {
    pub key: Key,
    pub holders: u32,
    pub waiters: u32,
    /// Mode of the current holders, if any.
    pub mode: Option<Mode>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    pub keys: Vec<KeySummary>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next: Option<Key>,
}

/// The daemon's counters (since start), gauges (now) and distributions.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Stats {
    pub counters: Vec<(String, u64)>,
    pub gauges: Vec<(String, u64)>,
    /// Time from queueing to grant, for requests that waited.
    pub wait_ms: Histogram,
    /// Time from grant to end, for ended holds.
    pub hold_ms: Histogram,
    pub uptime_ms: u64,
}

/// `counts[i]` observations were `<= bounds_ms[i]` (and above the previous bound); the extra
/// last count is above every bound.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Histogram {
    pub bounds_ms: Vec<u64>,
    pub counts: Vec<u64>,
    pub sum_ms: u64,
}

/// A granted hold.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub ticket: Ticket,
    /// Fencing token: greater than every fence this data directory granted before.
    pub fence: u64,
    pub mode: Mode,
    /// Lease end, milliseconds since the Unix epoch; `None` for plain session holds.
    pub expires_at_ms: Option<u64>,
}

/// Daemon-initiated messages.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A hold of this connection ended other than by its own release.
    HoldLost {
        key: Key,
        fence: u64,
        reason: LostReason,
    },
    /// The daemon is stopping; the connection closes next and its session holds end.
    ShuttingDown,
    /// Something happened on a watched key.
    Watch { key: Key, change: Change },
}

/// What happened on a watched key.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Granted {
        fence: u64,
        mode: Mode,
        owner: OwnerInfo,
    },
    Released {
        fence: u64,
    },
    Expired {
        fence: u64,
    },
    Forced {
        fence: u64,
    },
    /// The holder's connection closed.
    Disconnected {
        fence: u64,
    },
    /// A waiting acquire of `owner` on this key was refused: it would have closed a cycle of
    /// connections waiting on each other (`cycle` names each key and owner in it).
    Deadlock {
        owner: OwnerInfo,
        cycle: String,
    },
}

impl Change {
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

    /// Stable lower-case name: granted, released, expired, forced, disconnected.
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

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostReason {
    Expired,
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
