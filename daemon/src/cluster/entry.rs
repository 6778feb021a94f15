//! An acquire's entry in etcd: named (`index.rs`), written through the batch writer with the
//! key's queue read in the same transaction, and deleted on every path that does not hand it
//! on (a grant records it as a hold; a detached lease moves it to a lease of its own).

use etcd_client::Txn;
use lockd_protocol::Key;

use super::acquire::lost_session;
use super::batch::Owed;
use super::index::{Naming, Token};
use super::layout::hold_name;
use super::Cluster;
use crate::error::Error;

/// An entry this acquire wrote: deleted on every path that does not hand it on.
pub(super) struct Entry<'a> {
    pub cluster: &'a Cluster,
    pub etcd_key: Vec<u8>,
    pub token: Token,
    pub generation: u64,
    /// Its creation revision, once etcd answered the write.
    pub created: Option<i64>,
    /// Handed on (held, detached, or already deleted).
    pub done: bool,
}

impl Entry<'_> {
    /// The deletion owed for it. (Without a known creation revision the write may yet be
    /// applied after the deletion: `orphans.rs` finds such an entry.)
    fn owed(&mut self) -> Owed {
        Owed {
            etcd_key: std::mem::take(&mut self.etcd_key),
            generation: self.generation,
            token: self.token,
            created: self.created,
        }
    }

    /// Deletes the entry before answering (a retry must not queue behind it), falling back
    /// to the background.
    pub async fn delete_now(mut self) {
        self.done = true;
        self.cluster.index.releasing(&self.etcd_key, self.token);
        let owed = self.owed();
        let txn = Txn::new().and_then([super::batch::deletion(&owed)]);
        if self.cluster.txn("delete an entry", txn).await.is_err() {
            self.cluster.delete_later(owed);
        } else {
            // Known gone: acquires of this daemon queued behind it need not ask etcd.
            let done = std::iter::once((owed.etcd_key.as_slice(), owed.token));
            self.cluster.index.deleted_by_us(done);
            self.cluster.deletions.notify_waiters();
        }
    }
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.cluster.session.current().generation != self.generation {
            // Its session lease is gone, and the entry with it.
            self.cluster.index.forget(&self.etcd_key, self.token);
            return;
        }
        let owed = self.owed();
        self.cluster.give_up(owed);
    }
}

/// How writing an acquire's entry ended.
pub(super) enum Written<'a> {
    /// In the queue: the entry, its creation revision (its place and fence), the revision the
    /// queue was read at, and the key's entries then.
    Queued(Entry<'a>, i64, i64, Vec<etcd_client::KeyValue>),
    /// The name chosen was taken in etcd by an entry this daemon lost track of: try another.
    NameTaken,
}

/// Names an entry for the acquire, writes it through the batch writer and reads the key's
/// queue with it.
pub(super) async fn write_entry<'a>(
    cluster: &'a Cluster,
    key: &Key,
    session: &super::session::Session,
    prefix: &str,
    value: &[u8],
    detach: bool,
) -> Result<Written<'a>, Error> {
    let naming = if detach { Naming::Once } else { Naming::Reused };
    let (etcd_key, token) = cluster.index.begin(
        prefix.as_bytes(),
        session.generation,
        naming,
        cluster.next_seq(),
        |naming, n| hold_name(prefix, session.lease, naming, n),
    );
    let mut entry = Entry {
        cluster,
        etcd_key,
        token,
        generation: session.generation,
        created: None,
        done: false,
    };
    // The session may have been given up since it was read. `lose` publishes the new
    // generation before it purges the index, so either this sees the change, or the purge
    // removes the entry just begun and its grant is refused (`Index::hold`).
    let now = cluster.session.current();
    if now.generation != session.generation || !now.alive {
        return Err(lost_session(key));
    }
    let (done, answer) = tokio::sync::oneshot::channel();
    let _ = cluster.enqueue.send(super::batch::Enqueue {
        etcd_key: entry.etcd_key.clone(),
        value: value.to_vec(),
        lease: session.lease,
        prefix: prefix.as_bytes().to_vec(),
        done,
    });
    let queued = answer
        .await
        .map_err(|_| Error::Unavailable("the daemon is stopping".into()))??;
    let taker = queued
        .kvs
        .iter()
        .find(|kv| kv.key() == entry.etcd_key.as_slice());
    let created = if queued.created {
        Some(queued.revision)
    } else {
        // Written by an earlier try of the same transaction (retried after a lost answer),
        // or the name is taken by an entry this daemon does not know.
        taker
            .filter(|kv| kv.value() == value && kv.lease() == session.lease)
            .map(|kv| kv.create_revision())
    };
    let Some(created) = created else {
        entry.done = true;
        cluster.index.collided(&entry.etcd_key, token);
        if let Some(kv) = taker.filter(|kv| kv.lease() == session.lease) {
            // On this daemon's lease, yet no request's: an orphan of an earlier lost write.
            cluster.suspect(kv.key().to_vec(), session.lease, Some(kv.create_revision()));
        }
        return Ok(Written::NameTaken);
    };
    entry.created = Some(created);
    cluster.index.created(&entry.etcd_key, token, created);
    Ok(Written::Queued(entry, created, queued.revision, queued.kvs))
}
