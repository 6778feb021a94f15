//! A connected client as the lock table sees it: identity from the kernel and a mailbox.

use std::sync::Arc;

use lockd_protocol::{Change, Grant, Key, LostReason, Mode, RequestId, Ticket};
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
        result: Result<lockd_protocol::Reply, lockd_protocol::WireError>,
    },
}

/// What a connection answers once a store commit succeeded (or undoes if it failed).
#[derive(Debug)]
pub enum AfterCommit {
    /// A detached lease was granted; on failure, it is taken back.
    Granted {
        key: Key,
        grant: Grant,
    },
    Renewed {
        expires_at_ms: u64,
    },
    /// A force-release whose detached leases' deletions were stored.
    ForceReleased {
        holds: u32,
    },
    /// A detached lease's release; on success its hold ends, on failure it stays.
    Released {
        ticket: Ticket,
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
    pub admin: std::sync::atomic::AtomicBool,
    push: mpsc::UnboundedSender<Push>,
}

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
            admin: std::sync::atomic::AtomicBool::new(admin),
            push,
        };
        (Owner(Arc::new(peer)), rx)
    }

    /// Delivers `msg` to the connection's task. Dropped silently if the connection is gone:
    /// its cleanup removes whatever the message was about.
    pub fn push(&self, msg: Push) {
        let _ = self.push.send(msg);
    }

    /// Root or a configured admin?
    pub fn is_admin(&self) -> bool {
        self.admin.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The uid for ticket checks: 0 (acts for anyone) for admins.
    pub fn acting_uid(&self) -> u32 {
        if self.is_admin() {
            0
        } else {
            self.uid
        }
    }

    /// "pid 123 uid 1000 'name'" for messages and logs.
    pub fn describe(&self) -> String {
        let pid = self.pid.map_or_else(|| "?".to_string(), |p| p.to_string());
        format!("pid {pid} uid {} '{}'", self.uid, self.name)
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
