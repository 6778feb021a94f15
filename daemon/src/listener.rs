//! The listening socket: bound with its final mode from the first instant, replacing a stale
//! socket file left by a crashed daemon but never stealing the path of a live one.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why the socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("another lockd is already serving {0}; stop it first or pass a different --socket")]
    AlreadyRunning(PathBuf),
    #[error("{0} exists and is not a socket; remove it or pass a different --socket")]
    NotASocket(PathBuf),
    #[error("the socket's directory {0} is writable by others or owned by another user; fix its ownership and mode (e.g. chmod 755) or pass a different --socket")]
    UnsafeDirectory(PathBuf),
    #[error("cannot bind {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A socket file this daemon created.
#[derive(Debug)]
pub struct BoundSocket {
    pub listener: UnixListener,
    pub path: PathBuf,
    /// (device, inode) of the file we created, so we never unlink someone else's.
    identity: (u64, u64),
}

/// Binds `path` with permission bits `mode`, creating the parent directory if missing.
///
/// The umask is set around `bind(2)` so the socket never exists with wider permissions; call
/// this before starting threads (the umask is process-wide).
///
/// # Errors
/// [`ListenError::AlreadyRunning`] when a daemon answers on `path`; other variants for I/O.
pub fn bind(path: &Path, mode: u32, group: Option<u32>) -> Result<BoundSocket, ListenError> {
    let io_err = |source| ListenError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        use std::os::unix::fs::DirBuilderExt;
        let dir_mode = if mode & 0o077 == 0 { 0o700 } else { 0o755 };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(parent)
            .map_err(io_err)?;
    }
    check_directory(path)?;
    remove_if_stale(path)?;
    // With a group to set, the socket is born with no permissions at all, gets its group,
    // then its mode: at no instant can anyone outside the intended group connect.
    let mask = if group.is_some() {
        0o777
    } else {
        !mode & 0o777
    };
    // SAFETY: umask has no memory-safety preconditions.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(io_err)?;
    if let Some(gid) = group {
        use std::os::unix::fs::PermissionsExt;
        std::os::unix::fs::lchown(path, None, Some(gid)).map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
    }
    let meta = std::fs::symlink_metadata(path).map_err(io_err)?;
    Ok(BoundSocket {
        listener,
        path: path.to_owned(),
        identity: (meta.dev(), meta.ino()),
    })
}

/// Refuses a socket directory that others could tamper with: it must belong to root or to us,
/// and must not be writable by group or others unless it is sticky (like /tmp).
fn check_directory(path: &Path) -> Result<(), ListenError> {
    let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    let meta = std::fs::metadata(dir).map_err(|source| ListenError::Io {
        path: dir.to_owned(),
        source,
    })?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let owner_ok = meta.uid() == 0 || meta.uid() == me;
    let sticky = meta.mode() & 0o1000 != 0;
    let writable_by_others = meta.mode() & 0o022 != 0;
    if owner_ok && (!writable_by_others || sticky) {
        Ok(())
    } else {
        Err(ListenError::UnsafeDirectory(dir.to_owned()))
    }
}

/// Removes `path` if it is a socket nobody answers on.
fn remove_if_stale(path: &Path) -> Result<(), ListenError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ListenError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ListenError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ListenError::AlreadyRunning(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!("removing stale socket {}", path.display());
            std::fs::remove_file(path).map_err(|source| ListenError::Io {
                path: path.to_owned(),
                source,
            })
        }
        Err(source) => Err(ListenError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

impl BoundSocket {
    /// Unlinks the socket file if it is still the one we created.
    pub fn remove(&self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.identity)
            .unwrap_or(false);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!("cannot remove socket {}: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn binds_with_mode_and_replaces_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/lockd.sock");
        let first = bind(&path, 0o600, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Live: refused.
        assert!(matches!(
            bind(&path, 0o600, None),
            Err(ListenError::AlreadyRunning(_))
        ));
        // Stale (listener closed, file left behind): replaced.
        drop(first);
        let second = bind(&path, 0o600, None).unwrap();
        second.remove();
        assert!(!path.exists());
    }

    #[test]
    fn refuses_a_world_writable_directory() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            bind(&open.join("s"), 0o600, None),
            Err(ListenError::UnsafeDirectory(_))
        ));
    }

    #[test]
    fn refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, b"keep me").unwrap();
        assert!(matches!(
            bind(&path, 0o600, None),
            Err(ListenError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }
}
