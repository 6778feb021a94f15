//! The default socket and data paths, one rule shared by the daemon and its clients.

use std::path::PathBuf;

/// Socket file name inside the runtime directory.
pub const SOCKET_FILE: &str = "lockd.sock";
/// Environment variable that overrides the socket path for clients.
pub const SOCKET_ENV: &str = "LOCKD_SOCKET";

/// Where the daemon listens by default, and where clients look first:
/// `$RUNTIME_DIRECTORY/lockd.sock` under systemd, `/run/lockd/lockd.sock` as root, else
/// `$XDG_RUNTIME_DIR/lockd/lockd.sock` (falling back to `/tmp/lockd-$UID/lockd.sock`).
pub fn default_socket_path() -> PathBuf {
    if let Some(dir) = env_path("RUNTIME_DIRECTORY") {
        return dir.join(SOCKET_FILE);
    }
    if is_root() {
        return PathBuf::from("/run/lockd").join(SOCKET_FILE);
    }
    match env_path("XDG_RUNTIME_DIR") {
        Some(dir) => dir.join("lockd").join(SOCKET_FILE),
        None => PathBuf::from(format!("/tmp/lockd-{}", uid())).join(SOCKET_FILE),
    }
}

/// The client's socket: `$LOCKD_SOCKET` if set, else [`default_socket_path`].
pub fn client_socket_path() -> PathBuf {
    env_path(SOCKET_ENV).unwrap_or_else(default_socket_path)
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
