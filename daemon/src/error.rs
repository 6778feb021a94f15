//! The daemon's one error type for requests, and its one mapping to wire error codes.
//!
//! Every refusal the engine or a session produces is an [`Error`]; only
//! `From<Error> for WireError` turns it into what the client sees. Messages say what to do next.

use lockd_protocol::{ErrorCode, WireError};

/// Why a request was refused. Each variant maps to exactly one [`ErrorCode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The key is held in a conflicting mode and the request did not wait.
    #[error("{0}")]
    Conflict(String),
    /// The request waited its whole wait, or its wait was cancelled.
    #[error("{0}")]
    Timeout(String),
    /// The ticket names no live hold the caller may act on.
    #[error("{0}")]
    NotHolder(String),
    /// Waiting would close a cycle of connections waiting on each other (the message names
    /// it).
    #[error("{0}")]
    Deadlock(String),
    /// The caller's credentials do not allow this.
    #[error("{0}")]
    PermissionDenied(String),
    /// A field of the request is malformed or out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// A configured limit would be exceeded.
    #[error("{0}")]
    LimitExceeded(String),
    /// The change could not be stored (or the daemon is stopping); retrying later may work.
    #[error("{0}")]
    Unavailable(String),
    /// A failure of the daemon itself (e.g. the OS random source).
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The wire code this error is reported as.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Conflict(_) => ErrorCode::Conflict,
            Error::Timeout(_) => ErrorCode::Timeout,
            Error::NotHolder(_) => ErrorCode::NotHolder,
            Error::Deadlock(_) => ErrorCode::Deadlock,
            Error::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Error::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Error::LimitExceeded(_) => ErrorCode::LimitExceeded,
            Error::Unavailable(_) => ErrorCode::Unavailable,
            Error::Internal(_) => ErrorCode::Internal,
        }
    }

    /// The usual answer to a ticket that names no live hold.
    pub fn not_holder() -> Error {
        Error::NotHolder(
            "no live hold has this ticket (released, expired, or never granted to your uid)".into(),
        )
    }

    /// Force-release asked by someone who is neither root nor an admin.
    pub fn force_release_denied(uid: u32) -> Error {
        Error::PermissionDenied(format!(
            "force-release needs root or an admin (lockd --admin-uid/--admin-gid); uid {uid} is neither"
        ))
    }

    /// A store commit failed: the change was not made.
    pub fn not_stored(why: &str) -> Error {
        Error::Unavailable(format!(
            "the change could not be stored ({why}); it was not made, retry later"
        ))
    }
}

impl From<Error> for WireError {
    fn from(e: Error) -> WireError {
        let code = e.code();
        let message = match e {
            Error::Conflict(m)
            | Error::Timeout(m)
            | Error::NotHolder(m)
            | Error::Deadlock(m)
            | Error::PermissionDenied(m)
            | Error::InvalidArgument(m)
            | Error::LimitExceeded(m)
            | Error::Unavailable(m)
            | Error::Internal(m) => m,
        };
        WireError::new(code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_keeps_its_message_and_maps_to_one_code() {
        let e = Error::LimitExceeded("too much".into());
        let wire = WireError::from(e.clone());
        assert_eq!(wire.code, ErrorCode::LimitExceeded);
        assert_eq!(wire.message, "too much");
        assert_eq!(e.to_string(), "too much");
        assert_eq!(Error::not_holder().code(), ErrorCode::NotHolder);
    }
}
