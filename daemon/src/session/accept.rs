//! A new connection: the peer's credentials, its place in the per-uid connection count, the
//! handshake, and the hand-over to the session loop.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use lockd_protocol::display::Escaped;
use lockd_protocol::{ErrorCode, ServerMessage, Welcome, WireError, PROTOCOL_VERSION};
use tokio::net::UnixStream;

use super::wire::Wire;
use super::Session;
use crate::auth;
use crate::peer::Peer;
use crate::shared::Shared;
use crate::stats::Global;
use crate::usage::UidUsage;

/// Longest client name kept, bytes (longer ones are cut at a character boundary).
const MAX_CLIENT_NAME: usize = 256;

/// Serves one accepted connection until it closes or the daemon shuts down.
pub async fn serve(stream: UnixStream, shared: Arc<Shared>) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("dropping a connection whose peer credentials are unreadable: {e}");
            return;
        }
    };
    let id = shared.next_conn_id();
    // Generation first: a reload after this read is picked up at the first wake-up.
    let generation = shared.config.generation();
    let config = shared.config.get();
    // Groups from the kernel at connect time (SO_PEERGROUPS), not from /proc later, when the
    // pid may already belong to another process.
    let groups = auth::socket_peer_groups(&stream, cred.gid());
    let mut wire = Wire::new(stream, config.limits.max_frame);
    let who = format!(
        "pid {} uid {}",
        cred.pid().map_or_else(|| "?".into(), |p| p.to_string()),
        cred.uid()
    );
    let usage = shared.backend.usage().of(cred.uid());
    let max_per_uid = config.limits.max_connections_per_uid;
    // Counted from accept on (the uid is known from the kernel before any Hello), so a uid
    // cannot fill the daemon with connections that never say Hello; the guard gives the slot
    // back on every exit path.
    let slot = ConnectionSlot::take(usage);
    if slot.others >= max_per_uid {
        tracing::warn!(
            "refusing a connection of {who}: {max_per_uid} connections of its uid are open"
        );
        let msg = format!(
            "uid {} already has {max_per_uid} connections, the limit",
            cred.uid()
        );
        refuse(&mut wire, ErrorCode::LimitExceeded, msg).await;
        return;
    }
    let hello = match wire.handshake(config.limits.handshake_timeout).await {
        Ok(hello) => hello,
        Err(why) => {
            Global::inc(&shared.global.protocol_errors);
            // `why` may quote what the peer sent.
            tracing::warn!(conn = id, "handshake with {who} failed: {}", Escaped(&why));
            return;
        }
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        let msg = format!(
            "this lockd speaks protocol version {PROTOCOL_VERSION}, the client {}; upgrade the older side",
            hello.protocol_version
        );
        refuse(&mut wire, ErrorCode::VersionMismatch, msg).await;
        return;
    }
    let welcome = Welcome {
        protocol_version: PROTOCOL_VERSION,
        server_version: env!("CARGO_PKG_VERSION").to_string(),
        limits: config.limits.to_wire(),
    };
    wire.send(ServerMessage::Welcome(welcome));
    let mut name = hello.client_name;
    truncate_utf8(&mut name, MAX_CLIENT_NAME);
    let admin = config.authz.is_admin(cred.uid(), &groups);
    let (owner, mailbox) =
        Peer::open_with(id, cred.pid(), cred.uid(), cred.gid(), name, groups, admin);
    tracing::debug!(conn = id, "connected: {}", owner.describe());
    let conn = shared.backend.connect(owner, config);
    let mut session = Session {
        wire,
        conn,
        mailbox,
        unwritten: Vec::new(),
        _slot: slot,
        generation,
        shared,
    };
    Global::inc(&session.shared.global.connections);
    session.shared.register(session.conn.owner());
    Global::inc(&session.shared.global.connections_total);
    session.run().await;
    // Dropping the session ends the connection in the engine (`Conn`'s Drop), even if a bug
    // panicked above.
}

/// Says why the connection is refused, then closes it (best effort, bounded).
async fn refuse(wire: &mut Wire, code: ErrorCode, msg: String) {
    wire.send(ServerMessage::Rejected(WireError::new(code, msg)));
    let _ = wire.flush().await;
}

/// One connection counted against its uid; given back when dropped.
pub(super) struct ConnectionSlot {
    usage: Arc<UidUsage>,
    /// Connections of the uid before this one.
    others: usize,
}

impl ConnectionSlot {
    fn take(usage: Arc<UidUsage>) -> ConnectionSlot {
        let others = usage.connections.fetch_add(1, Ordering::Relaxed);
        ConnectionSlot { usage, others }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.usage.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}
