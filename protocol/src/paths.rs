//! The default socket and data paths, one rule shared by the daemon and its clients.

use std::path::PathBuf;

/// Socket file name inside the runtime directory.
pub const SOCKET_FILE: &str = "lockd.sock";
/// Environment variable that overrides the socket path for clients.
pub const SOCKET_ENV: &str = "LOCKD_SOCKET";

/// The system daemon's socket.
pub const SYSTEM_SOCKET: &str = "/run/lockd/lockd.sock";

/// Where the daemon listens by default: `$RUNTIME_DIRECTORY/lockd.sock` under systemd,
/// `/run/lockd/lockd.sock` as root, else the per-user path
/// `$XDG_RUNTIME_DIR/lockd/lockd.sock` (or `/tmp/lockd-$UID/lockd.sock` without one).
pub fn default_socket_path() -> PathBuf {
    if let Some(dir) = env_path("RUNTIME_DIRECTORY") {
        return dir.join(SOCKET_FILE);
    }
    if is_root() {
        return PathBuf::from(SYSTEM_SOCKET);
    }
    user_socket_path()
}

/// Where clients look: `$LOCKD_SOCKET` if set; as root the system socket; otherwise the
/// per-user daemon's socket if it exists, else the system socket.
///
/// `$RUNTIME_DIRECTORY` is deliberately ignored here: in a client it names the *client's*
/// service directory, not lockd's.
pub fn client_socket_path() -> PathBuf {
    if let Some(path) = env_path(SOCKET_ENV) {
        return path;
    }
    if is_root() {
        return PathBuf::from(SYSTEM_SOCKET);
    }
    let user = user_socket_path();
    if user.exists() {
        user
    } else {
        PathBuf::from(SYSTEM_SOCKET)
    }
}

fn user_socket_path() -> PathBuf {
    match env_path("XDG_RUNTIME_DIR") {
        Some(dir) => dir.join("lockd").join(SOCKET_FILE),
        None => PathBuf::from(format!("/tmp/lockd-{}", uid())).join(SOCKET_FILE),
    }
}

/// Where the daemon keeps its state by default: `$STATE_DIRECTORY` under systemd,
/// `/var/lib/lockd` as root, else `$XDG_STATE_HOME/lockd` or `~/.local/state/lockd`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = env_path("STATE_DIRECTORY") {
        // systemd may pass several colon-separated directories; the first is ours.
        let first = dir.to_string_lossy().split(':').next().map(PathBuf::from);
        return first.unwrap_or(dir);
    }
    if is_root() {
        return PathBuf::from("/var/lib/lockd");
    }
    if let Some(dir) = env_path("XDG_STATE_HOME") {
        return dir.join("lockd");
    }
    match env_path("HOME") {
        Some(home) => home.join(".local/state/lockd"),
        None => PathBuf::from(format!("/tmp/lockd-{}/state", uid())),
    }
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn uid() -> u32 {
    // /proc/self is ours; its owner is our effective uid. Avoids a libc dependency here.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

fn is_root() -> bool {
    uid() == 0
}
