//! systemd integration: socket activation (`LISTEN_FDS`), readiness, reload and status
//! notifications (`NOTIFY_SOCKET`), and the watchdog (`WATCHDOG_USEC`).
//!
//! Everything here is a no-op outside systemd: `sd_notify` ignores a missing `NOTIFY_SOCKET`.
//!
//! Reload speaks systemd's reload notifications (sd_notify(3); what `Type=notify-reload` expects
//! too, though the shipped unit is `Type=notify` with an `ExecReload=` that checks the file and
//! then sends SIGHUP, which works on systemd before 253 as well): on SIGHUP the daemon sends
//! `RELOADING=1` with `MONOTONIC_USEC=` (systemd counts a reload only if that time is not
//! before it sent the signal), reloads, then sends `READY=1`. The protocol has no "reload
//! failed" message: `READY=1` always ends the reload cycle, and leaving it out makes systemd
//! wait for `TimeoutStartSec=` (and, before systemd 258, stay stuck in "reloading": systemd
//! issue 37515). So a failed reload still ends with `READY=1` (the daemon serves, with its
//! previous configuration) and says why in `STATUS=`; `systemctl reload` fails visibly through
//! the unit's `ExecReload=`, which checks the file with `lockd --check-config` first.

use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use sd_notify::NotifyState;

/// The socket systemd passed, if any (the first of `LISTEN_FDS`).
///
/// # Errors
/// `LISTEN_FDS` is set for us but unusable.
pub fn activated_listener() -> std::io::Result<Option<UnixListener>> {
    let mut fds = sd_notify::listen_fds()?;
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    for (what, opt, want) in [
        ("a Unix socket", libc::SO_DOMAIN, libc::AF_UNIX),
        ("a stream socket", libc::SO_TYPE, libc::SOCK_STREAM),
        ("listening", libc::SO_ACCEPTCONN, 1),
    ] {
        if sockopt(fd, opt)? != want {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the socket systemd passed (fd {fd}) is not {what}; use ListenStream= with a path"),
            ));
        }
    }
    // SAFETY: systemd passed this descriptor to us (LISTEN_PID matched) and nothing else in the
    // process owns it; from here on the listener does.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // systemd hands over blocking sockets; tokio needs non-blocking ones.
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

/// An integer socket option of `fd`.
fn sockopt(fd: std::os::fd::RawFd, opt: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for the kernel to write an int into.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// READY=1 with a one-line STATUS.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A STATUS line.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// RELOADING=1 with MONOTONIC_USEC (now, by `CLOCK_MONOTONIC`, in µs) and a STATUS: a reload
/// begins. Must be followed by [`reloaded`].
pub fn reloading() {
    let status = NotifyState::Status("reloading the configuration");
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, status]),
        // Without the timestamp systemd ignores RELOADING=1 and waits for its timeout; say so.
        Err(e) => {
            tracing::warn!("cannot read CLOCK_MONOTONIC for systemd's reload protocol: {e}");
            send(&[NotifyState::Reloading, status]);
        }
    }
}

/// READY=1 after a reload, with a STATUS saying how it went: `Err(why)` if the new
/// configuration was refused (the previous one stays in force).
pub fn reloaded(outcome: Result<(), &str>) {
    let status = match outcome {
        Ok(()) => "configuration reloaded".to_string(),
        Err(why) => format!(
            "configuration reload failed, still using the previous one: {}",
            lockd_protocol::display::Escaped(why)
        ),
    };
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// STOPPING=1.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// WATCHDOG=1.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC`, if set for us.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}
