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
    /// Opaque bytes shown by describe, at most [`Limits::max_data`].
    pub data: Vec<u8>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
