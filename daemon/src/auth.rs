//! Authorization by peer credentials: which namespaces a peer may use, and who is an admin.
//!
//! Identity is the peer's uid, primary gid and supplementary groups as the kernel recorded them
//! when it connected (SO_PEERCRED, SO_PEERGROUPS), never a claim in a message. A namespace listed in the configuration
//! is open only to its users and groups (and admins); every other namespace, `default`
//! included, is open to every peer that can connect.

use std::collections::HashMap;

/// The uids and gids allowed somewhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowed {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl Allowed {
    fn admits(&self, uid: u32, groups: &[u32]) -> bool {
        self.uids.contains(&uid) || groups.iter().any(|g| self.gids.contains(g))
    }
}

/// The authorization rules.
#[derive(Debug, Clone, Default)]
pub struct Authz {
    namespaces: HashMap<String, Allowed>,
    admins: Allowed,
}

impl Authz {
    pub fn new(namespaces: HashMap<String, Allowed>, admins: Allowed) -> Authz {
        Authz { namespaces, admins }
    }

    /// Adds `other`'s rules (a configuration file on top of command-line admins).
    pub fn merge(&mut self, other: Authz) {
        self.namespaces.extend(other.namespaces);
        self.admins.uids.extend(other.admins.uids);
        self.admins.gids.extend(other.admins.gids);
    }

    /// Adds admins given on the command line.
    pub fn add_admins(&mut self, uids: &[u32], gids: &[u32]) {
        self.admins.uids.extend_from_slice(uids);
        self.admins.gids.extend_from_slice(gids);
    }

    /// Root, or a configured admin uid, or a member of a configured admin group.
    /// `groups` holds the primary gid and the supplementary groups.
    pub fn is_admin(&self, uid: u32, groups: &[u32]) -> bool {
        uid == 0 || self.admins.admits(uid, groups)
    }

    /// `PermissionDenied` unless this peer may use `namespace` (both backends' one check).
    pub fn authorize(
        &self,
        namespace: &str,
        uid: u32,
        groups: &[u32],
    ) -> Result<(), crate::error::Error> {
        if self.may_use(namespace, uid, groups) {
            Ok(())
        } else {
            Err(crate::error::Error::PermissionDenied(format!(
                "uid {uid} may not use namespace {namespace:?}"
            )))
        }
    }

    /// May this peer use `namespace`?
    pub fn may_use(&self, namespace: &str, uid: u32, groups: &[u32]) -> bool {
        match self.namespaces.get(namespace) {
            None => true,
            Some(allowed) => self.is_admin(uid, groups) || allowed.admits(uid, groups),
        }
    }
}

/// The primary gid plus the supplementary groups of the peer of `stream`, as the kernel
/// recorded them when it connected (`SO_PEERGROUPS`). Falls back to the primary gid alone.
pub fn socket_peer_groups(stream: &impl std::os::fd::AsRawFd, gid: u32) -> Vec<u32> {
    let fd = stream.as_raw_fd();
    let mut buf = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = (buf.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `buf` is valid for `len` bytes; the kernel writes at most that many and
        // reports the size it needs in `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            buf.truncate(needed);
            let mut groups = vec![gid];
            groups.extend(buf.into_iter().filter(|g| *g != gid));
            return groups;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && needed > buf.len() && needed <= 65536 {
            buf.resize(needed, 0);
            continue;
        }
        return vec![gid];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_namespaces_are_closed_to_others() {
        let mut ns = HashMap::new();
        ns.insert(
            "ops".to_string(),
            Allowed {
                uids: vec![1000],
                gids: vec![50],
            },
        );
        let a = Authz::new(
            ns,
            Allowed {
                uids: vec![7],
                gids: vec![],
            },
        );
        assert!(a.may_use("default", 1234, &[1234]));
        assert!(a.may_use("anything", 1234, &[1234]));
        assert!(a.may_use("ops", 1000, &[1000]));
        assert!(
            a.may_use("ops", 2000, &[2000, 50]),
            "by supplementary group"
        );
        assert!(!a.may_use("ops", 2000, &[2000]));
        assert!(a.may_use("ops", 7, &[7]), "admins may use every namespace");
        assert!(a.may_use("ops", 0, &[0]), "root too");
    }

    #[test]
    fn peer_groups_come_from_the_socket() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        let groups = socket_peer_groups(&a, gid);
        assert_eq!(groups[0], gid);
    }
}
