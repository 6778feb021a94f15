//! The closed set of errors a request can answer with.

use serde::{Deserialize, Serialize};

/// Every failure the daemon reports on the wire.
///
/// A new code comes only with a protocol version bump (an old peer never receives one), but
/// this crate may add codes in a minor release: match with a wildcard arm.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The lock is held in a conflicting mode and the request did not wait.
    Conflict,
    /// The request waited for its whole wait duration (or its wait was cancelled).
    Timeout,
    /// The ticket names a hold that has ended or never existed.
    NotHolder,
    /// Waiting would close a cycle of connections waiting on each other.
    Deadlock,
    /// The peer's credentials do not allow this operation.
    PermissionDenied,
    /// A field of the request is out of range or malformed.
    InvalidArgument,
    /// A configured limit would be exceeded.
    LimitExceeded,
    /// The daemon could not store the change (its disk failed); nothing changed, and retrying
    /// later may succeed.
    Unavailable,
    /// Client and daemon speak different protocol versions.
    VersionMismatch,
    /// A frame could not be decoded; the connection is closed.
    Protocol,
    /// A bug in the daemon.
    Internal,
}

impl ErrorCode {
    /// Stable lower-case name, used in logs, `--json` output and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Conflict => "conflict",
            ErrorCode::Timeout => "timeout",
            ErrorCode::NotHolder => "not_holder",
            ErrorCode::Deadlock => "deadlock",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::Protocol => "protocol",
            ErrorCode::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as carried on the wire: a code to match on and a message for humans.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    /// What went wrong, to match on.
    pub code: ErrorCode,
    /// What went wrong, for humans (may name keys and owners: peer-supplied text).
    pub message: String,
}

impl WireError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }
}
