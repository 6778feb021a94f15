//! lockctl's exit codes (the shell contract) and the mapping from client errors to them.

use lockd_client::{Error, ErrorCode};

/// Lock not acquired: conflict, timeout or deadlock (`-E` changes it).
pub const NOT_ACQUIRED: u8 = 1;
/// Usage error.
pub const USAGE: u8 = 2;
/// The ticket names no live hold.
pub const NOT_HOLDER: u8 = 3;
/// The daemon cannot be reached (EX_UNAVAILABLE).
pub const UNAVAILABLE: u8 = 69;
/// Internal or protocol error (EX_SOFTWARE).
pub const INTERNAL: u8 = 70;
/// The hold was lost while the command ran (EX_TEMPFAIL).
pub const LOST: u8 = 75;
/// Permission denied (EX_NOPERM).
pub const PERMISSION: u8 = 77;

/// The exit code for `err`; `not_acquired` is the code for conflict/timeout (`-E`).
pub fn for_error(err: &Error, not_acquired: u8) -> u8 {
    match err {
        Error::Connect { .. } | Error::Disconnected | Error::Untrusted(_) => UNAVAILABLE,
        Error::InvalidKey(_) => USAGE,
        Error::Protocol(_) => INTERNAL,
        Error::Lock(e) | Error::Rejected(e) => match e.code {
            ErrorCode::Conflict | ErrorCode::Timeout | ErrorCode::Deadlock => not_acquired,
            ErrorCode::NotHolder => NOT_HOLDER,
            ErrorCode::PermissionDenied => PERMISSION,
            ErrorCode::InvalidArgument => USAGE,
            ErrorCode::Unavailable | ErrorCode::VersionMismatch | ErrorCode::LimitExceeded => {
                UNAVAILABLE
            }
            ErrorCode::Protocol | ErrorCode::Internal => INTERNAL,
        },
        // Error is non-exhaustive in spirit: anything new is a bug to report.
        #[allow(unreachable_patterns)]
        _ => INTERNAL,
    }
}

/// Prints `err` for the user (escaped: daemon messages quote peer-supplied names) and returns
/// its exit code (conflict and timeout: 1).
pub fn report(err: &Error) -> u8 {
    eprintln!(
        "lockctl: {}",
        lockd_protocol::display::escape(&err.to_string())
    );
    for_error(err, NOT_ACQUIRED)
}
