//! Persistent state: the fence ceiling and detached leases, in a write-ahead log folded into
//! redb.
//!
//! Architecture invariants:
//! - this is the only module that imports redb;
//! - a change is durable when its log record is ([`log`]): one `fdatasync` per group of changes
//!   ([`writer`]); redb is the checkpoint the log is folded into, in the background;
//! - at start-up, [`Store::open`] folds whatever the log holds beyond redb's last checkpoint
//!   into redb before anything reads the state, so readers see only redb;
//! - after a failed redb commit the database is reopened before the next attempt (redb refuses
//!   further use after an I/O error), so the daemon recovers when the disk does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lockd_protocol::ticket::TICKET_LEN;
use lockd_protocol::Ticket;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

/// Small scalar state, by name.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Detached leases by ticket.
const LEASES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("leases");
/// Every fence up to this value may have been handed out.
const FENCE_CEILING: &str = "fence_ceiling";
/// Every log epoch up to this value is folded into redb.
const LOG_FOLDED: &str = "log_folded";
/// File name of the database inside the data directory.
pub const DB_FILE: &str = "lockd.redb";
/// Test hook: when this environment variable names a path and that path exists, every write
/// and sync of the database fails with an I/O error (a failing disk).
pub const FAULT_ENV: &str = "LOCKD_TEST_STORAGE_FAULT_FILE";
/// Test hook: when set to a number of bytes, the log is handed to the checkpointer as soon as
/// its active file holds that many (1: after every append, so crashes land inside checkpoints
/// and file reuse).
pub const CHECKPOINT_BYTES_ENV: &str = "LOCKD_TEST_CHECKPOINT_BYTES";

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
    #[error("cannot write the log in {0}: {1}; check the disk holding the data directory (space, permissions, I/O errors)")]
    Log(PathBuf, std::io::Error),
    #[error("commit failed: {0}")]
    CommitFailed(String),
    #[error("the storage writer has stopped")]
    WriterGone,
}

mod fault;
mod log;
mod record;
mod writer;

pub use record::LeaseRecord;
#[cfg(test)]
pub(crate) use writer::Job;
pub use writer::{outcome, Done, Writer};

/// The failing-disk trigger of [`FAULT_ENV`], if set.
fn fault_trigger() -> Option<PathBuf> {
    std::env::var_os(FAULT_ENV).map(PathBuf::from)
}

fn storage(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Storage(e.into())
}

/// The database, used synchronously at start-up and then by the writer thread alone.
pub struct Store {
    db: Option<Database>,
    dir: PathBuf,
    /// Taken by [`Writer::start`].
    log: Option<log::Log>,
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
            log: None,
        };
        store.reopen()?;
        let folded = store.meta(LOG_FOLDED)?;
        let (log, replay) = log::Log::open(dir, folded)?;
        if replay.records > 0 {
            tracing::info!(
                records = replay.records,
                "replaying the log's changes since the last checkpoint"
            );
            store.fold(&replay.batch, replay.last_epoch)?;
        }
        store.log = Some(log);
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
        self.meta(FENCE_CEILING)
    }

    /// A scalar of the meta table (0 when never written).
    fn meta(&mut self, name: &str) -> Result<u64, StoreError> {
        let tx = self.db()?.begin_read().map_err(storage)?;
        let table = tx.open_table(META).map_err(storage)?;
        Ok(table
            .get(name)
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
        self.commit(batch, None)
    }

    /// Folds log epoch `epoch`'s changes into redb, recording the epoch as folded in the same
    /// durable transaction.
    ///
    /// # Errors
    /// As [`Store::apply`].
    fn fold(&mut self, batch: &Batch, epoch: u64) -> Result<(), StoreError> {
        self.commit(batch, Some(epoch))
    }

    fn commit(&mut self, batch: &Batch, folded: Option<u64>) -> Result<(), StoreError> {
        let result = self.try_commit(batch, folded);
        if result.is_err() {
            self.db = None;
        }
        result
    }

    fn try_commit(&mut self, batch: &Batch, folded: Option<u64>) -> Result<(), StoreError> {
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
            let mut meta = tx.open_table(META).map_err(storage)?;
            if let Some(ceiling) = batch.fence_ceiling {
                let old = meta.get(FENCE_CEILING).map_err(storage)?.map(|v| v.value());
                meta.insert(FENCE_CEILING, old.unwrap_or(0).max(ceiling))
                    .map_err(storage)?;
            }
            if let Some(epoch) = folded {
                meta.insert(LOG_FOLDED, epoch).map_err(storage)?;
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

    /// Adds `later`'s changes after this batch's (later changes to a lease win).
    fn absorb(&mut self, later: Batch) {
        self.leases.extend(later.leases);
        if let Some(c) = later.fence_ceiling {
            self.add(Change::FenceCeiling(c), false);
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

#[cfg(test)]
mod tests;
