//! Persistent state in redb: the fence ceiling and detached leases.
//!
//! Architecture invariants:
//! - this is the only module that imports redb;
//! - one writer thread owns the database after start-up; every change goes through it and is
//!   committed with `Durability::Immediate` before its waiters hear `Ok` (group commit: all
//!   changes pending when a commit starts share it);
//! - the writer keeps the *latest* desired state per lease, so the stored state converges to the
//!   in-memory state even across failed commits: a failed batch is retried with the next one;
//! - after a failed commit the database is reopened before the next attempt (redb refuses further
//!   use after an I/O error), so the daemon recovers when the disk does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use lockd_protocol::ticket::TICKET_LEN;
use lockd_protocol::Ticket;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

/// Small scalar state, by name.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Detached leases by ticket.
const LEASES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("leases");
/// Every fence up to this value may have been handed out.
const FENCE_CEILING: &str = "fence_ceiling";
/// File name of the database inside the data directory.
pub const DB_FILE: &str = "lockd.redb";
/// Test hook: when this environment variable names a path and that path exists, every write
/// and sync of the database fails with an I/O error (a failing disk).
pub const FAULT_ENV: &str = "LOCKD_TEST_STORAGE_FAULT_FILE";

/// Why the store could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data directory {0} is in use by another lockd process; stop it first or pass a different --data-dir")]
    InUse(PathBuf),
    #[error(
        "cannot create data directory {dir}: {source}; create it or pass a writable --data-dir"
    )]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("storage error: {0}; check the disk holding the data directory (space, permissions, I/O errors)")]
    Storage(#[from] redb::Error),
    #[error("stored lease record is corrupt: {0}")]
    Corrupt(String),
    #[error("commit failed: {0}")]
    CommitFailed(String),
    #[error("the storage writer has stopped")]
    WriterGone,
}

mod fault;
mod record;

pub use record::LeaseRecord;

fn storage(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Storage(e.into())
}

/// The database, used synchronously at start-up and then by the writer thread alone.
pub struct Store {
    db: Option<Database>,
    dir: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the database in `dir`.
    ///
    /// # Errors
    /// [`StoreError::InUse`] when another process has it open; other variants for I/O trouble.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        create_private_dir(dir).map_err(|source| StoreError::CreateDir {
            dir: dir.to_owned(),
            source,
        })?;
        let mut store = Store {
            db: None,
            dir: dir.to_owned(),
        };
        store.reopen()?;
        Ok(store)
    }

    fn reopen(&mut self) -> Result<&Database, StoreError> {
        self.db = None; // close the old handle (and its file lock) first
        let path = self.dir.join(DB_FILE);
        let db = open_database(&path).map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(self.dir.clone()),
            source => StoreError::Open { path, source },
        })?;
        // Make sure the tables exist so readers never see TableDoesNotExist.
        let tx = db.begin_write().map_err(storage)?;
        tx.open_table(META).map_err(storage)?;
        tx.open_table(LEASES).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(self.db.insert(db))
    }

    fn db(&mut self) -> Result<&Database, StoreError> {
        match self.db {
            Some(ref db) => Ok(db),
            None => self.reopen(),
        }
    }

    /// The highest fence that may have been handed out (0 for a new data directory).
    ///
    /// # Errors
    /// [`StoreError::Storage`].
    pub fn fence_ceiling(&mut self) -> Result<u64, StoreError> {
        let tx = self.db()?.begin_read().map_err(storage)?;
        let table = tx.open_table(META).map_err(storage)?;
        Ok(table
            .get(FENCE_CEILING)
            .map_err(storage)?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// Every stored lease, in no particular order. Corrupt records are skipped with an error
    /// logged (never their ticket).
    ///
    /// # Errors
    /// [`StoreError::Storage`].
    pub fn load_leases(&mut self) -> Result<Vec<LeaseRecord>, StoreError> {
        let tx = self.db()?.begin_read().map_err(storage)?;
        let table = tx.open_table(LEASES).map_err(storage)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            let Ok(bytes) = <[u8; TICKET_LEN]>::try_from(k.value()) else {
                tracing::error!("skipping a stored lease with a malformed ticket");
                continue;
            };
            match LeaseRecord::decode(Ticket::from_bytes(bytes), v.value()) {
                Ok(record) => out.push(record),
                Err(e) => tracing::error!("skipping a stored lease: {e}"),
            }
        }
        Ok(out)
    }

    /// Records a fence ceiling at once (start-up, before the writer thread exists).
    ///
    /// # Errors
    /// [`StoreError::Storage`].
    pub fn set_fence_ceiling(&mut self, ceiling: u64) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        batch.add(Change::FenceCeiling(ceiling), true);
        self.apply(&batch)
    }

    /// Applies `batch` in one durable transaction.
    ///
    /// # Errors
    /// [`StoreError::Storage`]; nothing of the batch is stored then, and the database is
    /// reopened on the next call.
    pub fn apply(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let result = self.try_apply(batch);
        if result.is_err() {
            self.db = None;
        }
        result
    }

    fn try_apply(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let tx = self.db()?.begin_write().map_err(storage)?;
        {
            let mut leases = tx.open_table(LEASES).map_err(storage)?;
            for (ticket, (state, _)) in &batch.leases {
                let k = ticket.bytes();
                match state {
                    Some(record) => {
                        leases
                            .insert(&k[..], &record.encode()[..])
                            .map_err(storage)?;
                    }
                    None => {
                        leases.remove(&k[..]).map_err(storage)?;
                    }
                }
            }
            if let Some(ceiling) = batch.fence_ceiling {
                let mut meta = tx.open_table(META).map_err(storage)?;
                meta.insert(FENCE_CEILING, ceiling).map_err(storage)?;
            }
        }
        tx.commit().map_err(storage)
    }
}

fn open_database(path: &Path) -> Result<Database, redb::DatabaseError> {
    match std::env::var_os(FAULT_ENV) {
        Some(trigger) => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)?;
            let backend = fault::FaultyBackend::new(file, PathBuf::from(trigger))?;
            Database::builder().create_with_backend(backend)
        }
        None => Database::create(path),
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Changes to commit together. Later changes to the same lease replace earlier ones.
#[derive(Default, Debug)]
pub struct Batch {
    /// `Some` to store a lease, `None` to delete it; `true` when a requester waits on it.
    leases: HashMap<Ticket, (Option<LeaseRecord>, bool)>,
    fence_ceiling: Option<u64>,
}

/// One change.
#[derive(Debug)]
pub enum Change {
    Put(LeaseRecord),
    Delete(Ticket),
    FenceCeiling(u64),
    /// Changes nothing; answered once everything submitted before it is durable (or failed).
    Sync,
}

impl Batch {
    fn add(&mut self, change: Change, waited: bool) {
        match change {
            Change::Put(record) => {
                self.leases.insert(record.ticket, (Some(record), waited));
            }
            Change::Delete(ticket) => {
                self.leases.insert(ticket, (None, waited));
            }
            Change::FenceCeiling(c) => {
                self.fence_ceiling = Some(self.fence_ceiling.map_or(c, |old| old.max(c)));
            }
            Change::Sync => {}
        }
    }

    fn is_empty(&self) -> bool {
        self.leases.is_empty() && self.fence_ceiling.is_none()
    }

    /// After a failed commit: forget the changes whose requesters were told it failed (they
    /// were "not made"; their undo, if any, follows as a quiet change) and keep the quiet ones
    /// for the retry. The fence thread retries its own reservation.
    fn keep_quiet_changes(&mut self) {
        self.leases.retain(|_, (_, waited)| !*waited);
        self.fence_ceiling = None;
    }
}

/// Answer to a change: `Ok` once it (and everything queued before it) is durable.
pub type Done = oneshot::Receiver<Result<(), StoreError>>;

/// One change for the writer, with whom to tell when it is durable.
pub(crate) struct Job {
    pub(crate) change: Change,
    pub(crate) done: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// Handle to the writer thread. Cloning is cheap; the thread stops when every handle is gone.
#[derive(Clone)]
pub struct Writer {
    tx: std_mpsc::Sender<Job>,
}

/// Delay before retrying a failed commit when no new change arrives.
const RETRY_AFTER: Duration = Duration::from_millis(200);

impl Writer {
    /// Moves `store` to a new writer thread.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn start(store: Store) -> std::io::Result<Writer> {
        let (tx, rx) = std_mpsc::channel();
        std::thread::Builder::new()
            .name("lockd-store".into())
            .spawn(move || writer_loop(store, rx))?;
        Ok(Writer { tx })
    }

    /// Queues `change`; the returned receiver answers once it is durable (or failed).
    pub fn submit(&self, change: Change) -> Done {
        let (done, rx) = oneshot::channel();
        // If the writer is gone, `done` is dropped and the receiver reports an error.
        let _ = self.tx.send(Job {
            change,
            done: Some(done),
        });
        rx
    }

    /// A writer without a thread: the caller takes the jobs and answers them as it likes
    /// (the engine's tests use it to delay, fail and reorder commits).
    #[cfg(test)]
    pub(crate) fn manual() -> (Writer, std_mpsc::Receiver<Job>) {
        let (tx, rx) = std_mpsc::channel();
        (Writer { tx }, rx)
    }

    /// Answers once every change submitted before this call is durable (or failed).
    pub fn sync(&self) -> Done {
        self.submit(Change::Sync)
    }

    /// Queues `change` without waiting for it (it still converges to disk in order).
    pub fn submit_quiet(&self, change: Change) {
        let _ = self.tx.send(Job { change, done: None });
    }
}

/// Maps a finished [`Done`] to a result.
pub fn outcome(
    r: Result<Result<(), StoreError>, oneshot::error::RecvError>,
) -> Result<(), StoreError> {
    r.unwrap_or(Err(StoreError::WriterGone))
}

fn writer_loop(mut store: Store, rx: std_mpsc::Receiver<Job>) {
    let mut batch = Batch::default();
    let mut waiters: Vec<oneshot::Sender<Result<(), StoreError>>> = Vec::new();
    let mut failing = false;
    loop {
        // Wait for work; while a failed batch is pending, wake up to retry it anyway.
        let first = if failing {
            match rx.recv_timeout(RETRY_AFTER) {
                Ok(job) => Some(job),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            }
        };
        for job in first
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        {
            batch.add(job.change, job.done.is_some());
            waiters.extend(job.done);
        }
        if batch.is_empty() {
            // Only syncs: everything before them was already committed (jobs are handled in
            // order, one batch at a time).
            for w in waiters.drain(..) {
                let _ = w.send(Ok(()));
            }
            continue;
        }
        match store.apply(&batch) {
            Ok(()) => {
                if failing {
                    tracing::info!("storage works again; pending changes are committed");
                }
                failing = false;
                batch = Batch::default();
                for w in waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
            }
            Err(e) => {
                if !failing {
                    tracing::error!(
                        "commit failed: {e}; affected requests answer Unavailable, retrying"
                    );
                }
                failing = true;
                batch.keep_quiet_changes();
                let msg = e.to_string();
                for w in waiters.drain(..) {
                    let _ = w.send(Err(StoreError::CommitFailed(msg.clone())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockd_protocol::{Key, Mode};

    fn record(n: u64) -> LeaseRecord {
        LeaseRecord {
            ticket: Ticket::generate().unwrap(),
            key: Key::new("ns", format!("name-{n}")).unwrap(),
            mode: Mode::Shared,
            fence: n,
            uid: 1000,
            gid: 100,
            pid: Some(42),
            client_name: "test".into(),
            acquired_at_ms: 1,
            expires_at_ms: 2,
            lease_ms: 3,
            data: b"leader=10.0.0.1".to_vec(),
            permits: Some(3),
            lock_delay_ms: 5,
        }
    }

    #[test]
    fn version_1_records_still_decode() {
        let r = record(7);
        let mut v1 = r.encode();
        v1[0] = 1;
        v1.truncate(v1.len() - 12);
        let old = LeaseRecord::decode(r.ticket, &v1).unwrap();
        assert_eq!((old.permits, old.lock_delay_ms), (None, 0));
        assert_eq!(old.data, r.data);
    }

    #[test]
    fn record_round_trip() {
        let r = record(7);
        assert_eq!(LeaseRecord::decode(r.ticket, &r.encode()).unwrap(), r);
        assert!(LeaseRecord::decode(r.ticket, &r.encode()[..10]).is_err());
    }

    #[test]
    fn changes_persist_across_reopen_and_latest_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (record(1), record(2));
        {
            let mut store = Store::open(dir.path()).unwrap();
            assert_eq!(store.fence_ceiling().unwrap(), 0);
            let mut batch = Batch::default();
            batch.add(Change::Put(a.clone()), true);
            batch.add(Change::Put(b.clone()), false);
            batch.add(Change::Delete(b.ticket), true);
            batch.add(Change::FenceCeiling(42), true);
            store.apply(&batch).unwrap();
        }
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.fence_ceiling().unwrap(), 42);
        assert_eq!(store.load_leases().unwrap(), vec![a]);
    }

    #[test]
    fn second_open_is_refused_as_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        assert!(matches!(Store::open(dir.path()), Err(StoreError::InUse(_))));
    }

    #[tokio::test]
    async fn writer_groups_changes_and_answers_each() {
        let dir = tempfile::tempdir().unwrap();
        let writer = Writer::start(Store::open(dir.path()).unwrap()).unwrap();
        let dones: Vec<Done> = (0..50)
            .map(|n| writer.submit(Change::Put(record(n))))
            .collect();
        for d in dones {
            outcome(d.await).unwrap();
        }
    }
}
