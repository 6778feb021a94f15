//! The daemon under test: reaching it, and its process (found by SO_PEERCRED of a connection,
//! read from /proc).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

use lockd_client::{Client, ConnectOptions};

use crate::Failure;

/// The name this program's connections give in their handshake (shown by `lockctl describe`).
pub const CLIENT_NAME: &str = "lockd-bench";

/// Connects through the client crate; an unreachable daemon is [`Failure::Unreachable`].
pub async fn connect(socket: &Path) -> Result<Client, Failure> {
    let options = ConnectOptions::default()
        .client_name(CLIENT_NAME)
        .timeout(Duration::from_secs(10));
    Client::connect_with(socket, options)
        .await
        .map_err(|e| match e {
            lockd_client::Error::Connect { path, source } => Failure::Unreachable(format!(
                "cannot connect to lockd at {}: {source}; is lockd running there? \
                 (pass --socket PATH or set LOCKD_SOCKET)",
                path.display()
            )),
            other => Failure::Run(format!("lockd refused the connection: {other}")),
        })
}

/// What the first connection learnt about the daemon.
#[derive(Clone, Debug)]
pub struct Daemon {
    pub server_version: String,
    /// `None` when the kernel did not tell (another pid namespace).
    pub pid: Option<u32>,
}

impl Daemon {
    /// Connects once to check the daemon answers and to learn its version and pid.
    pub async fn probe(socket: &Path) -> Result<Daemon, Failure> {
        let client = connect(socket).await?;
        client
            .ping()
            .await
            .map_err(|e| Failure::Unreachable(format!("lockd at {}: {e}", socket.display())))?;
        let pid = client
            .with_socket_fd(|fd| peer_pid(fd).ok().flatten())
            .flatten();
        Ok(Daemon {
            server_version: client.server_version().to_string(),
            pid,
        })
    }

    /// Resident memory now (VmRSS), in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.status_field("VmRSS:")
    }

    /// Peak resident memory since the daemon started (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.status_field("VmHWM:")
    }

    fn status_field(&self, name: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    /// CPU time (user + system) the daemon used so far, in seconds.
    pub fn cpu_secs(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid?)).ok()?;
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let rest = stat.rsplit(')').next()?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (per_sec > 0).then(|| ticks as f64 / per_sec as f64)
    }
}

/// The pid of the process at the other end of a Unix socket (SO_PEERCRED); `None` if the
/// kernel reports none (the peer is in a pid namespace we cannot see).
pub fn peer_pid(fd: BorrowedFd<'_>) -> std::io::Result<Option<u32>> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the fd is borrowed
    // for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u32::try_from(cred.pid).ok().filter(|&p| p > 0))
}
