//! The client's error type.

use std::path::PathBuf;

use lockd_protocol::{ErrorCode, KeyError, WireError};

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be reached.
    #[error("cannot connect to lockd at {}: {source}; is lockd running there? (pass the socket path or set LOCKD_SOCKET)", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The daemon refused the handshake (e.g. a protocol version mismatch).
    #[error("lockd refused the connection: {0}")]
    Rejected(WireError),
    /// The daemon answered the request with an error (conflict, timeout, not holder, ...).
    #[error("{0}")]
    Lock(WireError),
    /// The connection ended (daemon stopped or crashed, or the socket broke).
    #[error("the connection to lockd was lost; holds of this connection have ended")]
    Disconnected,
    /// A lock name or namespace breaks the rules; nothing was sent.
    #[error("invalid lock key: {0}")]
    InvalidKey(#[from] KeyError),
    /// The daemon sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The socket's directory, or the process answering on the socket, is not trusted (see
    /// [`crate::TrustError`]); nothing was sent.
    #[error(transparent)]
    Untrusted(#[from] crate::TrustError),
}

impl Error {
    /// The wire error code, when the daemon answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Lock(e) | Error::Rejected(e) => Some(e.code),
            Error::InvalidKey(_) => Some(ErrorCode::InvalidArgument),
            Error::Protocol(_) => Some(ErrorCode::Protocol),
            Error::Connect { .. } | Error::Disconnected | Error::Untrusted(_) => None,
        }
    }

    /// True for `Conflict` (a try found the lock held).
    pub fn is_conflict(&self) -> bool {
        self.code() == Some(ErrorCode::Conflict)
    }

    /// True for `Timeout` (a wait ran out).
    pub fn is_timeout(&self) -> bool {
        self.code() == Some(ErrorCode::Timeout)
    }

    /// True for `Deadlock`: waiting would have closed a cycle of connections waiting on each
    /// other (the message names each key and owner in it). Release something and retry, or
    /// take locks in one global order.
    pub fn is_deadlock(&self) -> bool {
        self.code() == Some(ErrorCode::Deadlock)
    }

    /// True when the daemon could not be reached or went away.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Connect { .. } | Error::Disconnected)
            || self.code() == Some(ErrorCode::Unavailable)
    }
}
