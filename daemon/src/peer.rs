//! A connected client as the lock table sees it: identity from the kernel and a mailbox.

use std::sync::Arc;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use lockd_protocol::display::Escaped;
use lockd_protocol::{Change, Key, LostReason, Mode, RequestId};
use tokio::sync::mpsc;

/// What other tasks tell a connection's task.
#[derive(Debug)]
pub enum Push {
    /// A queued acquire of this connection was granted by another connection's action.
    Granted {
        request: RequestId,
        fence: u64,
        mode: Mode,
    },
    /// A hold of this connection ended other than by its own release.
    Lost {
        key: Key,
        fence: u64,
        reason: LostReason,
    },
    /// A change on a key this connection watches.
    Watch { key: Key, change: Change },
    /// The daemon is stopping: say `ShuttingDown` and close.
    Shutdown,
    /// The answer to `request`, computed elsewhere (after a store commit).
    Reply {
        request: RequestId,
        result: Result<lockd_protocol::Reply, crate::error::Error>,
    },
}

/// One connection's identity. `pid`, `uid` and `gid` come from `SO_PEERCRED`, never from the
/// client's word.
#[derive(Debug)]
pub struct Peer {
    /// Unique per daemon run.
    pub id: u64,
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
    /// The name given in the handshake (display only).
    pub name: String,
    /// Primary gid and supplementary groups, from the kernel.
    pub groups: Vec<u32>,
    /// Root or a configured admin (decided at connect, updated on config reload).
    pub admin: AtomicBool,
    push: mpsc::UnboundedSender<Push>,
    /// Watch events in the mailbox, not yet taken by the connection's task.
    events_queued: AtomicUsize,
    /// A watch event was dropped because [`MAX_QUEUED_EVENTS`] were queued: the connection
    /// fell behind and must be closed.
    fell_behind: AtomicBool,
}

/// Watch events that may wait in one connection's mailbox. Past this the connection is not
/// reading fast enough for the keys it watches: further events are dropped and the connection
/// is closed (its task checks [`Peer::fell_behind`]), so a slow watcher cannot make the daemon
/// buffer without bound. Grants, lost holds and replies are never dropped: they are bounded by
/// the connection's own waits and holds.
pub const MAX_QUEUED_EVENTS: usize = 4096;

impl Peer {
    /// Registers a new connection: its owner identity and the receiving end of its mailbox.
    pub fn open(
        id: u64,
        pid: Option<i32>,
        uid: u32,
        gid: u32,
        name: String,
    ) -> (Owner, mpsc::UnboundedReceiver<Push>) {
        Peer::open_with(id, pid, uid, gid, name, vec![gid], uid == 0)
    }

    /// As [`Peer::open`], with groups and the admin flag.
    pub fn open_with(
        id: u64,
        pid: Option<i32>,
        uid: u32,
        gid: u32,
        name: String,
        groups: Vec<u32>,
        admin: bool,
    ) -> (Owner, mpsc::UnboundedReceiver<Push>) {
        let (push, rx) = mpsc::unbounded_channel();
        let peer = Peer {
            id,
            pid,
            uid,
            gid,
            name,
            groups,
            admin: AtomicBool::new(admin),
            push,
            events_queued: AtomicUsize::new(0),
            fell_behind: AtomicBool::new(false),
        };
        (Owner(Arc::new(peer)), rx)
    }

    /// Delivers `msg` to the connection's task. Dropped silently if the connection is gone:
    /// its cleanup removes whatever the message was about.
    pub fn push(&self, msg: Push) {
        if matches!(msg, Push::Watch { .. })
            && self.events_queued.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED_EVENTS
        {
            self.events_queued.fetch_sub(1, Ordering::Relaxed);
            self.fell_behind.store(true, Ordering::Relaxed);
            return;
        }
        let _ = self.push.send(msg);
    }

    /// Called by the connection's task for each watch event it takes from the mailbox.
    pub fn event_taken(&self) {
        self.events_queued.fetch_sub(1, Ordering::Relaxed);
    }

    /// True once a watch event had to be dropped: the connection must close.
    pub fn fell_behind(&self) -> bool {
        self.fell_behind.load(Ordering::Relaxed)
    }

    /// Root or a configured admin?
    pub fn is_admin(&self) -> bool {
        self.admin.load(Ordering::Relaxed)
    }

    /// The uid for ticket checks: 0 (acts for anyone) for admins.
    pub fn acting_uid(&self) -> u32 {
        if self.is_admin() {
            0
        } else {
            self.uid
        }
    }

    /// "pid 123 uid 1000 'name'" for messages and logs, the peer-supplied name escaped
    /// ([`lockd_protocol::display`]): no control character of a client's choosing reaches a log
    /// line, a terminal or another client's error message.
    pub fn describe(&self) -> String {
        let pid = self.pid.map_or_else(|| "?".to_string(), |p| p.to_string());
        format!("pid {pid} uid {} '{}'", self.uid, Escaped(&self.name))
    }
}

/// The lock table's owner type: a shared [`Peer`], equal by connection id.
#[derive(Debug, Clone)]
pub struct Owner(pub Arc<Peer>);

impl PartialEq for Owner {
    fn eq(&self, other: &Owner) -> bool {
        self.0.id == other.0.id
    }
}

impl std::ops::Deref for Owner {
    type Target = Peer;
    fn deref(&self) -> &Peer {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_escapes_the_peer_supplied_name() {
        let (owner, _rx) = Peer::open(1, Some(7), 1000, 1000, "x\x1b[31mRED\nfake-line".into());
        let d = owner.describe();
        assert_eq!(d, "pid 7 uid 1000 'x\\x1b[31mRED\\nfake-line'");
        assert_eq!(
            owner.name, "x\x1b[31mRED\nfake-line",
            "the name itself stays exact"
        );
    }
}
