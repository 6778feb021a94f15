//! User and group lookups by name, thread-safe (`getpwnam_r`, `getgrnam_r`), and the effective
//! uid: what the daemon's configuration and the client's trust check need from the user
//! database.
//!
//! The lookups may block (NSS can ask a directory server): call them from a plain thread or
//! `spawn_blocking`, never on an async worker. Nothing here keeps a pointer into libc's static
//! buffers, so any number of threads may call them at once.

use std::ffi::CString;

/// The system account the packaged daemon runs as (`systemd/lockd.sysusers`).
pub const DAEMON_USER: &str = "lockd";

/// Largest buffer a lookup grows to before giving up (an entry larger than this is not sane).
const MAX_BUFFER: usize = 1 << 20;

/// Why a name could not be looked up (an unknown name is not an error: it is `Ok(None)`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    /// The name contains a NUL byte, so no entry can have it.
    #[error("{0:?} is not a valid user or group name (it contains a NUL byte)")]
    BadName(String),
    /// The user database could not be read.
    #[error("cannot look up {name:?} in the user database: {source}")]
    Io {
        /// The name looked up.
        name: String,
        /// What the system said.
        source: std::io::Error,
    },
}

/// This process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// This machine's host name (`gethostname`), `None` if it cannot be read or is not UTF-8.
pub fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or fails.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0)?;
    String::from_utf8(buf[..end].to_vec())
        .ok()
        .filter(|h| !h.is_empty())
}

/// The uid of user `name`, `Ok(None)` if there is no such user.
///
/// # Errors
/// [`LookupError`] when the name is malformed or the database cannot be read.
pub fn uid_by_name(name: &str) -> Result<Option<u32>, LookupError> {
    lookup(name, |c, buf| {
        // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids).
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: `c` is NUL-terminated; `entry`, `buf` and `found` are valid for writes and
        // outlive the call; `buf.len()` is the buffer's true length.
        let rc = unsafe {
            libc::getpwnam_r(
                c.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        (rc, (!found.is_null()).then_some(entry.pw_uid))
    })
}

/// The gid of group `name`, `Ok(None)` if there is no such group.
///
/// # Errors
/// [`LookupError`] when the name is malformed or the database cannot be read.
pub fn gid_by_name(name: &str) -> Result<Option<u32>, LookupError> {
    lookup(name, |c, buf| {
        // SAFETY: all-zero is a valid `group` (null pointers, zero id).
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in `uid_by_name`.
        let rc = unsafe {
            libc::getgrnam_r(
                c.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        (rc, (!found.is_null()).then_some(entry.gr_gid))
    })
}

/// Runs one `get*nam_r` call with a buffer that grows on `ERANGE`; `call` returns the call's
/// result code and the id it found.
fn lookup(
    name: &str,
    mut call: impl FnMut(&CString, &mut [libc::c_char]) -> (libc::c_int, Option<u32>),
) -> Result<Option<u32>, LookupError> {
    let c = CString::new(name).map_err(|_| LookupError::BadName(name.to_string()))?;
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        match call(&c, &mut buf) {
            (0, id) => return Ok(id),
            // Some libcs report "no such entry" as an error code rather than a null result.
            (libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM, _) => return Ok(None),
            (libc::ERANGE, _) if buf.len() < MAX_BUFFER => {
                let bigger = buf.len() * 2;
                buf.resize(bigger, 0);
            }
            (rc, _) => {
                return Err(LookupError::Io {
                    name: name.to_string(),
                    source: std::io::Error::from_raw_os_error(rc),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_uid_and_gid_zero() {
        assert_eq!(uid_by_name("root").unwrap(), Some(0));
        assert_eq!(gid_by_name("root").unwrap(), Some(0));
    }

    #[test]
    fn unknown_names_are_none_and_nul_is_refused() {
        assert_eq!(uid_by_name("no-such-user-lockd-test").unwrap(), None);
        assert_eq!(gid_by_name("no-such-group-lockd-test").unwrap(), None);
        assert!(matches!(uid_by_name("a\0b"), Err(LookupError::BadName(_))));
    }

    #[test]
    fn lookups_from_many_threads_agree() {
        let threads: Vec<_> = (0..8)
            .map(|_| {
                std::thread::spawn(|| (0..200).all(|_| uid_by_name("root").unwrap() == Some(0)))
            })
            .collect();
        assert!(threads.into_iter().all(|t| t.join().unwrap()));
    }
}
