//! What a hold carries besides what the table tracks: its ticket, data and shown expiry, in
//! one optional block that only holds with a lease or data fill.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use lockd_protocol::{RequestId, Ticket};

/// What a hold carries besides what the table tracks, as an acquire gives it. Never shown with
/// its ticket.
#[derive(Debug, Clone)]
pub struct HoldMeta {
    /// Opaque bytes shown by describe.
    pub data: Vec<u8>,
    /// The hold's ticket, so administrative actions can end its lease too.
    pub ticket: Ticket,
    /// Lease end (wall-clock ms), shared with the lease registry so renewals show.
    pub expires_at_ms: Option<Arc<AtomicU64>>,
    /// A long-hold warning was logged for it.
    pub warned: bool,
}

/// What the table keeps of a [`HoldMeta`]: nothing (a null pointer) for a session hold with
/// no lease and no data, the common case; the rest in one block otherwise.
#[derive(Debug, Clone, Default)]
pub struct Stored(Option<Box<Extra>>);

#[derive(Debug, Clone)]
pub(super) struct Extra {
    /// Kept for leased holds only: only they have a lease to end with the hold.
    pub(super) ticket: Option<Ticket>,
    /// The acquire that was granted (a detached grant its connection never learned of is
    /// found by it).
    pub(super) request: RequestId,
    pub(super) data: Box<[u8]>,
    pub(super) expires_at_ms: Option<Arc<AtomicU64>>,
}

impl Stored {
    pub(super) fn new(meta: HoldMeta, request: RequestId) -> Stored {
        let leased = meta.expires_at_ms.is_some();
        if !leased && meta.data.is_empty() {
            return Stored(None);
        }
        Stored(Some(Box::new(Extra {
            ticket: leased.then_some(meta.ticket),
            request,
            data: meta.data.into_boxed_slice(),
            expires_at_ms: meta.expires_at_ms,
        })))
    }

    /// The hold's ticket, if it has a lease.
    pub fn ticket(&self) -> Option<Ticket> {
        self.0.as_ref().and_then(|e| e.ticket)
    }

    /// The granted acquire's id (leased holds and holds with data only).
    pub fn request(&self) -> Option<RequestId> {
        self.0.as_ref().map(|e| e.request)
    }

    pub fn data(&self) -> &[u8] {
        self.0.as_ref().map_or(&[], |e| &e.data)
    }

    pub fn expires_at_ms(&self) -> Option<&Arc<AtomicU64>> {
        self.0.as_ref().and_then(|e| e.expires_at_ms.as_ref())
    }
}
