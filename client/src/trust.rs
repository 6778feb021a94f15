//! Who may answer on lockd's socket: checked with `SO_PEERCRED` right after connecting, before
//! anything (not even the Hello) is sent.
//!
//! A lock is only as good as the daemon that granted it. A socket path another local user
//! could have created first (say `/tmp/lockd-$UID/lockd.sock`, for a cron job without
//! `$XDG_RUNTIME_DIR`) would let that user answer with a fake daemon that grants every lock to
//! everyone. Two checks close that:
//! - the default per-user socket is used only in a directory that is safely ours
//!   ([`lockd_protocol::paths::client_socket_path`]);
//! - on every connection, default or explicit path alike, the process answering must run as
//!   root, as this process's effective uid, or as the lockd system user: the uid of
//!   `$LOCKD_DAEMON_USER` (a user name or a numeric uid) if set, else of the user named
//!   [`lockd_protocol::users::DAEMON_USER`] (`lockd`) if it exists.
//!
//! Explicit paths (`Client::connect(path)`, `$LOCKD_SOCKET`, `--socket`) are checked too: a
//! path named by hand can still sit in a shared directory, and the check costs one
//! `getsockopt`. A daemon legitimately run by another account is allowed with
//! `LOCKD_DAEMON_USER=that-account`. A socket-activated daemon shows as root (the kernel
//! reports who called `listen`, which is systemd).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lockd_protocol::paths::UnsafeDir;
use lockd_protocol::users::{self, euid, DAEMON_USER};
use tokio::net::UnixStream;

use crate::Error;

/// Environment variable naming the account (user name or numeric uid) a trusted daemon may run
/// as, besides root and the caller's own uid. Default: the `lockd` user, if it exists.
pub const DAEMON_USER_ENV: &str = "LOCKD_DAEMON_USER";

/// Why the client refused to use a socket or the daemon answering on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// The default per-user socket's directory is not safely this user's.
    #[error(transparent)]
    SocketDir(#[from] UnsafeDir),
    /// The process answering on the socket runs as a uid this client does not trust.
    #[error("refusing the daemon at {}: the process answering there (pid {}) runs as uid {uid}, which is neither root, you (uid {me}) nor the lockd user ({}), so it may be another user impersonating lockd; use the right socket, or if that daemon is legitimate set {DAEMON_USER_ENV} to the user it runs as", path.display(), pid.map_or_else(|| "?".to_string(), |p| p.to_string()), daemon_user.map_or_else(|| "no such user here".to_string(), |u| format!("uid {u}")))]
    Impostor {
        /// The socket connected to.
        path: PathBuf,
        /// The answering process, as the kernel reports it.
        pid: Option<i32>,
        /// Its uid.
        uid: u32,
        /// This process's effective uid.
        me: u32,
        /// The lockd user's uid, if known.
        daemon_user: Option<u32>,
    },
    /// The kernel did not say who answers (SO_PEERCRED failed).
    #[error("cannot tell who answers at {}: {source}", path.display())]
    Credentials {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `$LOCKD_DAEMON_USER` names no user, or the user database could not be read.
    #[error("cannot resolve the lockd user: {0}; set {DAEMON_USER_ENV} to an existing user name or a numeric uid")]
    DaemonUser(String),
}

impl From<UnsafeDir> for Error {
    fn from(e: UnsafeDir) -> Error {
        Error::Untrusted(TrustError::SocketDir(e))
    }
}

/// Refuses the connection unless the process answering on `stream` runs as root, as us, or as
/// the lockd user (see the module doc).
///
/// # Errors
/// [`Error::Untrusted`] with [`TrustError::Impostor`], [`TrustError::Credentials`] or
/// [`TrustError::DaemonUser`].
pub(crate) async fn check_daemon(stream: &UnixStream, path: &Path) -> Result<(), Error> {
    let cred = stream
        .peer_cred()
        .map_err(|source| TrustError::Credentials {
            path: path.to_owned(),
            source,
        })?;
    let me = euid();
    if cred.uid() == 0 || cred.uid() == me {
        return Ok(());
    }
    let daemon_user = daemon_uid().await?;
    if daemon_user == Some(cred.uid()) {
        return Ok(());
    }
    Err(TrustError::Impostor {
        path: path.to_owned(),
        pid: cred.pid(),
        uid: cred.uid(),
        me,
        daemon_user,
    }
    .into())
}

/// The lockd user's uid (looked up once per process, off the async workers), `None` if there is
/// no such user.
async fn daemon_uid() -> Result<Option<u32>, TrustError> {
    static RESOLVED: OnceLock<Option<u32>> = OnceLock::new();
    if let Some(uid) = RESOLVED.get() {
        return Ok(*uid);
    }
    let lookup = tokio::task::spawn_blocking(resolve_daemon_user)
        .await
        .map_err(|e| TrustError::DaemonUser(e.to_string()))??;
    Ok(*RESOLVED.get_or_init(|| lookup))
}

/// `$LOCKD_DAEMON_USER` (a name or a numeric uid; an unknown name is an error), else the
/// `lockd` user if it exists.
fn resolve_daemon_user() -> Result<Option<u32>, TrustError> {
    match std::env::var(DAEMON_USER_ENV)
        .ok()
        .filter(|v| !v.is_empty())
    {
        Some(value) => match value.parse::<u32>() {
            Ok(uid) => Ok(Some(uid)),
            Err(_) => match users::uid_by_name(&value) {
                Ok(Some(uid)) => Ok(Some(uid)),
                Ok(None) => Err(TrustError::DaemonUser(format!(
                    "{DAEMON_USER_ENV}={value:?} names no user"
                ))),
                Err(e) => Err(TrustError::DaemonUser(e.to_string())),
            },
        },
        None => users::uid_by_name(DAEMON_USER).map_err(|e| TrustError::DaemonUser(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_daemon_of_our_own_uid_is_trusted() {
        let (a, _b) = UnixStream::pair().unwrap();
        check_daemon(&a, Path::new("/pair")).await.unwrap();
    }

    #[test]
    fn the_impostor_message_names_the_path_the_uid_and_the_way_out() {
        let e = Error::from(TrustError::Impostor {
            path: PathBuf::from("/tmp/lockd-1000/lockd.sock"),
            pid: Some(4242),
            uid: 1001,
            me: 1000,
            daemon_user: None,
        });
        let msg = e.to_string();
        for part in [
            "/tmp/lockd-1000/lockd.sock",
            "pid 4242",
            "uid 1001",
            "uid 1000",
            DAEMON_USER_ENV,
        ] {
            assert!(msg.contains(part), "{part:?} missing from {msg}");
        }
    }
}
