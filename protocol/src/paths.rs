//! The default socket and data paths, one rule shared by the daemon and its clients, and the
//! check that a per-user directory under a shared place (`/tmp`) is really ours.
//!
//! Invariant: a path under a directory another local user could have created first is used
//! only after [`check_private_dir`] found that directory a real directory (not a symbolic link)
//! owned by our effective uid and not writable by group or others. Otherwise another user could
//! plant a socket that grants every lock to everyone, or a state directory with a rolled-back
//! fence ceiling.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::users::euid;

/// Socket file name inside the runtime directory.
pub const SOCKET_FILE: &str = "lockd.sock";
/// Environment variable that overrides the socket path for clients.
pub const SOCKET_ENV: &str = "LOCKD_SOCKET";

/// The system daemon's socket.
pub const SYSTEM_SOCKET: &str = "/run/lockd/lockd.sock";

/// Why a per-user directory is not used. Each message names the directory and what to do.
#[derive(Debug, thiserror::Error)]
pub enum UnsafeDir {
    /// Someone else owns it: they may have made it to impersonate lockd.
    #[error("refusing {}: it belongs to uid {owner}, not to you (uid {me}), so another user may have made it to impersonate lockd; remove it (as its owner or root) or name a path explicitly ({SOCKET_ENV} or --socket for clients, --data-dir for lockd)", dir.display())]
    NotOwned { dir: PathBuf, owner: u32, me: u32 },
    /// Group or others may write to it, so they may replace what is inside.
    #[error("refusing {}: its mode {mode:o} lets group or others write to it; run `chmod go-w {}` (or remove it)", dir.display(), dir.display())]
    Writable { dir: PathBuf, mode: u32 },
    /// It is a symbolic link (which could point anywhere), or not a directory at all.
    #[error("refusing {}: it is not a plain directory (a symbolic link or another kind of file); remove it, or name a path explicitly ({SOCKET_ENV} or --socket for clients, --data-dir for lockd)", dir.display())]
    NotADirectory { dir: PathBuf },
    /// It could not be inspected or created.
    #[error("cannot create or inspect {}: {source}", dir.display())]
    Io { dir: PathBuf, source: io::Error },
}

/// Where the daemon listens by default: `$RUNTIME_DIRECTORY/lockd.sock` under systemd,
/// `/run/lockd/lockd.sock` as root, else the per-user path
/// `$XDG_RUNTIME_DIR/lockd/lockd.sock` (or `/tmp/lockd-$UID/lockd.sock` without one).
///
/// The daemon checks the socket's directory when it binds (it must be its own or root's and
/// not writable by others).
pub fn default_socket_path() -> PathBuf {
    if let Some(dir) = env_path("RUNTIME_DIRECTORY") {
        return dir.join(SOCKET_FILE);
    }
    if is_root() {
        return PathBuf::from(SYSTEM_SOCKET);
    }
    user_socket_dir().join(SOCKET_FILE)
}

/// Where clients look: `$LOCKD_SOCKET` if set; as root the system socket; otherwise the
/// per-user daemon's socket if its directory exists, else the system socket.
///
/// The per-user directory (`$XDG_RUNTIME_DIR/lockd` or `/tmp/lockd-$UID`) is used only if it
/// passes [`check_private_dir`]; a directory that exists but fails it is an error, never a
/// silent fallback, since its owner may be impersonating lockd. (The client still checks who
/// answers on whatever path it connects to.)
///
/// `$RUNTIME_DIRECTORY` is deliberately ignored here: in a client it names the *client's*
/// service directory, not lockd's.
///
/// # Errors
/// [`UnsafeDir`] when the per-user directory exists but is not safely ours.
pub fn client_socket_path() -> Result<PathBuf, UnsafeDir> {
    if let Some(path) = env_path(SOCKET_ENV) {
        return Ok(path);
    }
    if is_root() {
        return Ok(PathBuf::from(SYSTEM_SOCKET));
    }
    Ok(user_socket_in(&user_socket_dir(), euid())?.unwrap_or_else(|| PathBuf::from(SYSTEM_SOCKET)))
}

/// The per-user socket in `dir` if `dir` exists and is safely `me`'s and the socket exists;
/// `None` if either does not exist.
fn user_socket_in(dir: &Path, me: u32) -> Result<Option<PathBuf>, UnsafeDir> {
    match std::fs::symlink_metadata(dir) {
        // Not there (or not reachable by us, e.g. another user's $XDG_RUNTIME_DIR kept by
        // `su`): there is no per-user daemon of ours.
        Err(_) => return Ok(None),
        Ok(_) => check_private_dir(dir, me)?,
    }
    let socket = dir.join(SOCKET_FILE);
    Ok(std::fs::symlink_metadata(&socket).is_ok().then_some(socket))
}

/// The per-user runtime directory: `$XDG_RUNTIME_DIR/lockd`, else `/tmp/lockd-$UID`.
fn user_socket_dir() -> PathBuf {
    match env_path("XDG_RUNTIME_DIR") {
        Some(dir) => dir.join("lockd"),
        None => tmp_user_dir(),
    }
}

/// `/tmp/lockd-$UID`: the per-user directory when nothing better is known.
fn tmp_user_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/lockd-{}", euid()))
}

/// Where the daemon keeps its state by default: `$STATE_DIRECTORY` under systemd,
/// `/var/lib/lockd` as root, else `$XDG_STATE_HOME/lockd` or `~/.local/state/lockd`, or, with
/// no `$HOME` either, `/tmp/lockd-$UID/state`.
///
/// For that last one, both `/tmp/lockd-$UID` and `state` are created (mode 0700) if missing and
/// must pass [`check_private_dir`]: a state directory someone else prepared could hold a
/// rolled-back fence ceiling.
///
/// # Errors
/// [`UnsafeDir`] when the `/tmp` fallback exists but is not safely ours, or cannot be made.
pub fn default_data_dir() -> Result<PathBuf, UnsafeDir> {
    if let Some(dir) = env_path("STATE_DIRECTORY") {
        // systemd may pass several colon-separated directories; the first is ours.
        let first = dir.to_string_lossy().split(':').next().map(PathBuf::from);
        return Ok(first.unwrap_or(dir));
    }
    if is_root() {
        return Ok(PathBuf::from("/var/lib/lockd"));
    }
    if let Some(dir) = env_path("XDG_STATE_HOME") {
        return Ok(dir.join("lockd"));
    }
    match env_path("HOME") {
        Some(home) => Ok(home.join(".local/state/lockd")),
        None => {
            let base = tmp_user_dir();
            ensure_private_dir(&base)?;
            let state = base.join("state");
            ensure_private_dir(&state)?;
            Ok(state)
        }
    }
}

/// Creates `dir` with mode 0700 if it does not exist (its parent must), then checks it with
/// [`check_private_dir`] against our effective uid.
///
/// # Errors
/// [`UnsafeDir`] when it exists but is not safely ours, or cannot be created.
pub fn ensure_private_dir(dir: &Path) -> Result<(), UnsafeDir> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(UnsafeDir::Io {
                dir: dir.to_owned(),
                source,
            })
        }
    }
    check_private_dir(dir, euid())
}

/// Checks that `dir` itself (not what a symbolic link points to) is a directory owned by uid
/// `me` and not writable by group or others.
///
/// # Errors
/// The [`UnsafeDir`] variant naming the first problem found.
pub fn check_private_dir(dir: &Path, me: u32) -> Result<(), UnsafeDir> {
    let meta = std::fs::symlink_metadata(dir).map_err(|source| UnsafeDir::Io {
        dir: dir.to_owned(),
        source,
    })?;
    if !meta.file_type().is_dir() {
        return Err(UnsafeDir::NotADirectory {
            dir: dir.to_owned(),
        });
    }
    if meta.uid() != me {
        return Err(UnsafeDir::NotOwned {
            dir: dir.to_owned(),
            owner: meta.uid(),
            me,
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(UnsafeDir::Writable {
            dir: dir.to_owned(),
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn is_root() -> bool {
    euid() == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_private_dir_of_ours_is_accepted_and_its_socket_used() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lockd");
        ensure_private_dir(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().mode() & 0o777,
            0o700,
            "created 0700"
        );
        assert_eq!(user_socket_in(&dir, euid()).unwrap(), None, "no socket yet");
        std::fs::write(dir.join(SOCKET_FILE), b"").unwrap();
        assert_eq!(
            user_socket_in(&dir, euid()).unwrap(),
            Some(dir.join(SOCKET_FILE))
        );
        chmod(&dir, 0o755);
        assert!(
            check_private_dir(&dir, euid()).is_ok(),
            "readable by others is fine"
        );
    }

    #[test]
    fn a_missing_dir_means_no_user_daemon() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            user_socket_in(&tmp.path().join("nope"), euid()).unwrap(),
            None
        );
    }

    #[test]
    fn someone_elses_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(SOCKET_FILE), b"").unwrap();
        let me = euid().wrapping_add(1);
        let err = user_socket_in(tmp.path(), me).unwrap_err();
        assert!(
            matches!(err, UnsafeDir::NotOwned { owner, .. } if owner == euid()),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&tmp.path().display().to_string()) && msg.contains("LOCKD_SOCKET"));
    }

    #[test]
    fn a_group_or_world_writable_dir_is_refused() {
        for mode in [0o770, 0o703, 0o1777] {
            let tmp = tempfile::tempdir().unwrap();
            chmod(tmp.path(), mode);
            let err = check_private_dir(tmp.path(), euid()).unwrap_err();
            assert!(matches!(err, UnsafeDir::Writable { .. }), "{mode:o}: {err}");
            assert!(err.to_string().contains("chmod go-w"));
            assert!(ensure_private_dir(tmp.path()).is_err(), "{mode:o}");
        }
    }

    #[test]
    fn a_symlink_to_our_own_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        ensure_private_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = user_socket_in(&link, euid()).unwrap_err();
        assert!(matches!(err, UnsafeDir::NotADirectory { .. }), "{err}");
        assert!(ensure_private_dir(&link).is_err());
    }

    #[test]
    fn the_effective_uid_is_the_kernels() {
        // /proc/self/status: "Uid:\treal\teffective\tsaved\tfs".
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let effective = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|e| e.parse::<u32>().ok());
        assert_eq!(Some(euid()), effective);
    }
}
