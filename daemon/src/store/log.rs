//! The write-ahead log: each committed batch is one checksummed record, made durable with one
//! `fdatasync` before anyone hears `Ok`; the checkpointer folds the log into redb later.
//!
//! Layout: two files, `lockd.log.0` and `lockd.log.1`, used in turn. Each record is
//!
//! ```text
//! len: u32 LE (payload bytes) | crc32: u32 LE of (len, epoch, payload) | epoch: u64 LE | payload
//! ```
//!
//! followed on disk by [`END_MARK`] zero bytes, written in the same `pwrite` and overwritten by
//! the next record, so whatever an earlier use of the file left beyond the last record is never
//! read. A file holds the records of one *epoch*: the writer switches to the other file with the
//! next epoch once the checkpointer has folded the epoch that file held into redb.
//!
//! Invariants:
//! - a record is acknowledged only after `fdatasync` of the file it is in returned `Ok`;
//! - a file is rewritten (from offset 0, with a new epoch) only after redb durably records that
//!   every epoch up to the one it held is folded (`log_folded`), so replay never needs it;
//! - replay reads each file from its start while records are whole, checksummed and of the file's
//!   first epoch, keeps the epochs above `log_folded`, and applies them in epoch order: a torn
//!   tail (a crash or power loss inside a write) ends the file there, and that record was never
//!   acknowledged;
//! - files grow in [`GROW_BY`] steps of written zeros, so a steady-state `fdatasync` writes data
//!   only, never the file's size or block map.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use lockd_protocol::ticket::TICKET_LEN;
use lockd_protocol::Ticket;

use super::{Batch, Change, LeaseRecord, StoreError};

/// File names of the two log files inside the data directory.
pub const LOG_FILES: [&str; 2] = ["lockd.log.0", "lockd.log.1"];
/// Header bytes before each record's payload.
const HEADER: usize = 16;
/// Zero bytes written after each record (a header with length 0 ends the file).
const END_MARK: usize = HEADER;
/// Files are extended by this many bytes of zeros at a time.
const GROW_BY: u64 = 1 << 20;
/// A record longer than this is treated as a torn tail (no batch comes near it).
const MAX_RECORD: usize = 1 << 30;

const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;
const TAG_FENCE_CEILING: u8 = 3;

/// What replay found: the changes of every epoch above the folded one, in epoch order.
#[derive(Debug, Default)]
pub struct Replay {
    /// Everything the unfolded epochs changed (later changes win).
    pub batch: Batch,
    /// The highest epoch seen in either file (0 when both are empty).
    pub last_epoch: u64,
    /// Records replayed.
    pub records: usize,
}

/// The writer's end of the log.
pub struct Log {
    files: [File; 2],
    /// Index into `files` of the file taking records.
    active: usize,
    /// Epoch of the records going into the active file.
    epoch: u64,
    /// Where the next record goes in the active file.
    offset: u64,
    /// Bytes of the active file known to exist (written data or zeros).
    len: u64,
    buf: Vec<u8>,
    /// Test hook: while this path exists, appends fail like a broken disk.
    fault: Option<PathBuf>,
}

impl Log {
    /// Opens (creating if needed) both files in `dir` and reads what they hold above
    /// `folded`. The returned log writes epoch `max(folded, last seen) + 1` into file 0 once
    /// the caller has folded the replay into redb.
    ///
    /// # Errors
    /// [`StoreError::Log`] for I/O trouble, [`StoreError::Corrupt`] for a whole, checksummed
    /// record that does not decode (a bug or a foreign file: refusing to start is safer than
    /// dropping acknowledged changes).
    pub fn open(dir: &Path, folded: u64) -> Result<(Log, Replay), StoreError> {
        let io = |e| StoreError::Log(dir.to_owned(), e);
        let mut files = Vec::with_capacity(2);
        let mut created = false;
        for name in LOG_FILES {
            let path = dir.join(name);
            created |= !path.exists();
            files.push(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(io)?,
            );
        }
        if created {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        let mut epochs = Vec::new();
        for (i, file) in files.iter_mut().enumerate() {
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).map_err(io)?;
            if let Some(found) = read_file(&bytes, LOG_FILES[i])? {
                epochs.push(found);
            }
        }
        epochs.sort_by_key(|(epoch, _, _)| *epoch);
        let mut replay = Replay::default();
        for (epoch, batch, records) in epochs {
            replay.last_epoch = replay.last_epoch.max(epoch);
            if epoch > folded {
                replay.batch.absorb(batch);
                replay.records += records;
            }
        }
        let [first, second] = <[File; 2]>::try_from(files)
            .map_err(|_| StoreError::Corrupt("log files: expected exactly two".into()))?;
        let len = first.metadata().map_err(io)?.len();
        let log = Log {
            files: [first, second],
            active: 0,
            epoch: folded.max(replay.last_epoch) + 1,
            offset: 0,
            len,
            buf: Vec::new(),
            fault: super::fault_trigger(),
        };
        Ok((log, replay))
    }

    /// The epoch of the records now being written.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Bytes of records in the active file.
    pub fn written(&self) -> u64 {
        self.offset
    }

    /// Appends `batch` as one record and makes it durable.
    ///
    /// # Errors
    /// [`StoreError::Log`]: nothing is acknowledged, and the next append overwrites the same
    /// place (a retry rewrites the whole record).
    pub fn append(&mut self, batch: &Batch) -> Result<(), StoreError> {
        self.buf.clear();
        self.buf.resize(HEADER, 0);
        encode_batch(batch, &mut self.buf);
        let payload = self.buf.len() - HEADER;
        let len = u32::try_from(payload)
            .ok()
            .filter(|&l| (l as usize) <= MAX_RECORD)
            .ok_or_else(|| StoreError::CommitFailed("batch too large for one log record".into()))?;
        let epoch = self.epoch.to_le_bytes();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&len.to_le_bytes());
        crc.update(&epoch);
        crc.update(&self.buf[HEADER..]);
        self.buf[0..4].copy_from_slice(&len.to_le_bytes());
        self.buf[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
        self.buf[8..16].copy_from_slice(&epoch);
        let record_end = self.offset + self.buf.len() as u64;
        let mut end = record_end + END_MARK as u64;
        if end > self.len {
            end = end.div_ceil(GROW_BY) * GROW_BY;
        }
        self.buf.resize((end - self.offset) as usize, 0);
        let result = self.write_and_sync();
        if result.is_ok() {
            self.offset = record_end;
            self.len = self.len.max(end);
        }
        result
    }

    fn write_and_sync(&mut self) -> Result<(), StoreError> {
        let err = |e| StoreError::Log(PathBuf::from(LOG_FILES[self.active]), e);
        if self.fault.as_ref().is_some_and(|p| p.exists()) {
            return Err(err(std::io::Error::other("injected storage fault")));
        }
        let file = &self.files[self.active];
        file.write_all_at(&self.buf, self.offset).map_err(err)?;
        file.sync_data().map_err(err)
    }

    /// Starts the next epoch in the other file. Call only once redb records the epoch that
    /// file held as folded (the invariant above).
    ///
    /// # Errors
    /// [`StoreError::Log`] when the other file's size cannot be read; nothing changes then.
    pub fn switch(&mut self) -> Result<(), StoreError> {
        let next = 1 - self.active;
        let len = self.files[next]
            .metadata()
            .map_err(|e| StoreError::Log(PathBuf::from(LOG_FILES[next]), e))?
            .len();
        self.active = next;
        self.epoch += 1;
        self.offset = 0;
        self.len = len;
        Ok(())
    }
}

/// Reads one file's records: `(epoch, changes, record count)`, or `None` when it has none.
fn read_file(mut bytes: &[u8], name: &str) -> Result<Option<(u64, Batch, usize)>, StoreError> {
    let mut found: Option<(u64, Batch, usize)> = None;
    while bytes.len() >= HEADER {
        let len = u32::from_le_bytes(bytes[0..4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(bytes[4..8].try_into().unwrap_or_default());
        let epoch_bytes = &bytes[8..16];
        let epoch = u64::from_le_bytes(epoch_bytes.try_into().unwrap_or_default());
        if len == 0 || len > MAX_RECORD || bytes.len() - HEADER < len {
            break;
        }
        let payload = &bytes[HEADER..HEADER + len];
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&bytes[0..4]);
        hasher.update(epoch_bytes);
        hasher.update(payload);
        if hasher.finalize() != crc {
            break; // a torn tail: never acknowledged
        }
        let (file_epoch, batch, records) =
            found.get_or_insert_with(|| (epoch, Batch::default(), 0));
        if epoch != *file_epoch {
            break; // left over from an earlier use of this file
        }
        decode_batch(payload, batch)
            .map_err(|what| StoreError::Corrupt(format!("{name}: record {records}: {what}")))?;
        *records += 1;
        bytes = &bytes[HEADER + len..];
    }
    Ok(found)
}

/// Appends the payload of `batch`: one tagged entry per change.
fn encode_batch(batch: &Batch, out: &mut Vec<u8>) {
    for (ticket, (state, _)) in &batch.leases {
        match state {
            Some(record) => {
                out.push(TAG_PUT);
                out.extend_from_slice(&ticket.bytes());
                let bytes = record.encode();
                out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                out.extend_from_slice(&bytes);
            }
            None => {
                out.push(TAG_DELETE);
                out.extend_from_slice(&ticket.bytes());
            }
        }
    }
    if let Some(ceiling) = batch.fence_ceiling {
        out.push(TAG_FENCE_CEILING);
        out.extend_from_slice(&ceiling.to_le_bytes());
    }
}

/// Adds the changes of one record's payload to `into`.
fn decode_batch(mut b: &[u8], into: &mut Batch) -> Result<(), String> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err("truncated entry".into());
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn ticket(b: &mut &[u8]) -> Result<Ticket, String> {
        let bytes =
            <[u8; TICKET_LEN]>::try_from(take(b, TICKET_LEN)?).map_err(|_| "ticket".to_string())?;
        Ok(Ticket::from_bytes(bytes))
    }
    while let Some((&tag, rest)) = b.split_first() {
        b = rest;
        let change = match tag {
            TAG_PUT => {
                let ticket = ticket(&mut b)?;
                let len = u32::from_le_bytes(take(&mut b, 4)?.try_into().unwrap_or_default());
                let bytes = take(&mut b, len as usize)?;
                let record = LeaseRecord::decode(ticket, bytes).map_err(|e| e.to_string())?;
                Change::Put(record)
            }
            TAG_DELETE => Change::Delete(ticket(&mut b)?),
            TAG_FENCE_CEILING => Change::FenceCeiling(u64::from_le_bytes(
                take(&mut b, 8)?.try_into().unwrap_or_default(),
            )),
            other => return Err(format!("unknown entry tag {other}")),
        };
        into.add(change, false);
    }
    Ok(())
}
