//! Persistent state in redb.
//!
//! Architecture invariant: this is the only module that imports redb. Every write here is
//! committed with `Durability::Immediate`: when a method returns `Ok`, the data survives a crash.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, TableDefinition};

/// Small scalar state, by name.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Every fence up to this value may have been handed out.
const FENCE_CEILING: &str = "fence_ceiling";
/// File name of the database inside the data directory.
pub const DB_FILE: &str = "lockd.redb";

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
}

fn storage(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Storage(e.into())
}

/// The daemon's database.
pub struct Store {
    db: Database,
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
        let path = dir.join(DB_FILE);
        let db = Database::create(&path).map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(dir.to_owned()),
            source => StoreError::Open { path, source },
        })?;
        let store = Store { db };
        // Make sure the tables exist so readers never see TableDoesNotExist.
        let tx = store.db.begin_write().map_err(storage)?;
        tx.open_table(META).map_err(storage)?;
        tx.commit().map_err(storage)?;
        Ok(store)
    }

    /// The highest fence that may have been handed out (0 for a new data directory).
    ///
    /// # Errors
    /// [`StoreError::Storage`].
    pub fn fence_ceiling(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(storage)?;
        let table = tx.open_table(META).map_err(storage)?;
        Ok(table
            .get(FENCE_CEILING)
            .map_err(storage)?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// Durably records that fences up to `ceiling` may be handed out.
    ///
    /// # Errors
    /// [`StoreError::Storage`]; nothing is recorded then.
    pub fn set_fence_ceiling(&self, ceiling: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(storage)?;
        {
            let mut table = tx.open_table(META).map_err(storage)?;
            table.insert(FENCE_CEILING, ceiling).map_err(storage)?;
        }
        tx.commit().map_err(storage)
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_ceiling_persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.fence_ceiling().unwrap(), 0);
            store.set_fence_ceiling(42).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.fence_ceiling().unwrap(), 42);
    }

    #[test]
    fn second_open_is_refused_as_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        assert!(matches!(Store::open(dir.path()), Err(StoreError::InUse(_))));
    }
}
