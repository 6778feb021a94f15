//! The writer thread (group commit into the log) and the checkpointer thread (folding the log
//! into redb).
//!
//! Invariants:
//! - every change goes through the writer; a batch's waiters hear `Ok` only after the log
//!   record holding it is durable (one `fdatasync` per batch, whatever its size);
//! - the writer keeps the *latest* desired state per lease, so the stored state converges to the
//!   in-memory state even across failed appends: a failed batch's quiet changes are retried with
//!   the next one;
//! - the checkpointer alone writes redb after start-up; it receives one epoch's changes at a
//!   time, in epoch order, and records the epoch as folded in the same durable transaction;
//! - the writer starts rewriting a log file only after the checkpointer reported the epoch that
//!   file held as folded ([`super::log`]'s invariant).

use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::log::Log;
use super::{Batch, Change, Store, StoreError};

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

/// Delay before retrying a failed append or checkpoint when nothing else wakes the thread.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// An epoch is handed to the checkpointer once its file holds this many bytes…
const CHECKPOINT_BYTES: u64 = 4 << 20;
/// …or once it is this old and the writer has nothing else to do.
const CHECKPOINT_AFTER: Duration = Duration::from_secs(1);
/// How often a due rotation is retried while the checkpointer is still folding.
const ROTATE_POLL: Duration = Duration::from_millis(50);

impl Writer {
    /// Moves `store` to two new threads: the writer (which owns the log) and the checkpointer
    /// (which owns redb).
    ///
    /// # Errors
    /// A thread could not be started.
    pub fn start(store: Store) -> std::io::Result<Writer> {
        let checkpoint_bytes = std::env::var(super::CHECKPOINT_BYTES_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(CHECKPOINT_BYTES);
        Writer::start_tuned(store, checkpoint_bytes)
    }

    /// [`Writer::start`], handing an epoch to the checkpointer once its file holds
    /// `checkpoint_bytes` (tests rotate after every append with 1).
    pub(super) fn start_tuned(mut store: Store, checkpoint_bytes: u64) -> std::io::Result<Writer> {
        let log = store
            .log
            .take()
            .ok_or_else(|| std::io::Error::other("the store's log was already taken"))?;
        let (tx, rx) = std_mpsc::channel();
        let (to_checkpointer, checkpoints) = std_mpsc::channel();
        let (folded_tx, folded) = std_mpsc::channel();
        std::thread::Builder::new()
            .name("lockd-checkpoint".into())
            .spawn(move || checkpoint_loop(store, checkpoints, folded_tx))?;
        let checkpointer = Checkpointer {
            tx: to_checkpointer,
            folded,
            busy: false,
        };
        std::thread::Builder::new()
            .name("lockd-store".into())
            .spawn(move || writer_loop(log, checkpointer, rx, checkpoint_bytes))?;
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

/// One epoch's changes for the checkpointer.
struct Checkpoint {
    epoch: u64,
    batch: Batch,
}

/// The writer's side of the checkpointer thread.
struct Checkpointer {
    tx: std_mpsc::Sender<Checkpoint>,
    /// Epochs folded into redb, in order.
    folded: std_mpsc::Receiver<u64>,
    /// An epoch was handed over and is not folded yet.
    busy: bool,
}

impl Checkpointer {
    fn idle(&mut self) -> bool {
        if self.busy && self.folded.try_recv().is_ok() {
            self.busy = false;
        }
        !self.busy
    }

    /// Hands the active epoch (its changes are `unfolded`) to the checkpointer and switches the
    /// log to the other file. Does nothing while the previous epoch is still being folded: the
    /// active file keeps growing until then.
    fn rotate(&mut self, log: &mut Log, unfolded: &mut Batch) {
        if !self.idle() {
            return;
        }
        let epoch = log.epoch();
        if let Err(e) = log.switch() {
            tracing::error!("cannot switch log files: {e}; the current one keeps growing");
            return;
        }
        let batch = std::mem::take(unfolded);
        self.busy = self.tx.send(Checkpoint { epoch, batch }).is_ok();
    }
}

fn writer_loop(
    mut log: Log,
    mut checkpointer: Checkpointer,
    rx: std_mpsc::Receiver<Job>,
    checkpoint_bytes: u64,
) {
    let mut batch = Batch::default();
    let mut unfolded = Batch::default();
    let mut epoch_started = Instant::now();
    let mut waiters: Vec<oneshot::Sender<Result<(), StoreError>>> = Vec::new();
    let mut failing = false;
    loop {
        // Wait for work; while a failed batch is pending, wake up to retry it anyway, and while
        // the active epoch holds changes, wake up to hand it to the checkpointer.
        let timeout = if failing {
            Some(RETRY_AFTER)
        } else if log.written() > 0 {
            // At least a little: while the checkpointer is busy, a due rotation waits.
            Some(
                CHECKPOINT_AFTER
                    .saturating_sub(epoch_started.elapsed())
                    .max(ROTATE_POLL),
            )
        } else {
            None
        };
        let first = match timeout {
            Some(t) => match rx.recv_timeout(t) {
                Ok(job) => Some(job),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            },
            None => match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            },
        };
        for job in first
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        {
            batch.add(job.change, job.done.is_some());
            waiters.extend(job.done);
        }
        if !batch.is_empty() {
            if log.written() == 0 {
                epoch_started = Instant::now();
            }
            failing = !append(&mut log, &mut batch, &mut unfolded, &mut waiters, failing);
        }
        // Only syncs are left (or nothing): everything before them is durable or was answered.
        for w in waiters.drain(..) {
            let _ = w.send(Ok(()));
        }
        let due = log.written() >= checkpoint_bytes
            || (log.written() > 0 && epoch_started.elapsed() >= CHECKPOINT_AFTER);
        if due && !failing {
            checkpointer.rotate(&mut log, &mut unfolded);
        }
    }
}

/// Appends `batch` to the log and answers its waiters. Returns whether it worked; on failure
/// the waiters hear the error and the quiet changes stay in `batch` for the retry.
fn append(
    log: &mut Log,
    batch: &mut Batch,
    unfolded: &mut Batch,
    waiters: &mut Vec<oneshot::Sender<Result<(), StoreError>>>,
    was_failing: bool,
) -> bool {
    match log.append(batch) {
        Ok(()) => {
            if was_failing {
                tracing::info!("storage works again; pending changes are committed");
            }
            unfolded.absorb(std::mem::take(batch));
            for w in waiters.drain(..) {
                let _ = w.send(Ok(()));
            }
            true
        }
        Err(e) => {
            if !was_failing {
                tracing::error!(
                    "commit failed: {e}; affected requests answer Unavailable, retrying"
                );
            }
            batch.keep_quiet_changes();
            let msg = e.to_string();
            for w in waiters.drain(..) {
                let _ = w.send(Err(StoreError::CommitFailed(msg.clone())));
            }
            false
        }
    }
}

/// Folds each epoch into redb, in order, retrying until it is durable.
fn checkpoint_loop(
    mut store: Store,
    checkpoints: std_mpsc::Receiver<Checkpoint>,
    folded: std_mpsc::Sender<u64>,
) {
    for Checkpoint { epoch, batch } in checkpoints {
        let mut failed = false;
        loop {
            match store.fold(&batch, epoch) {
                Ok(()) => break,
                Err(e) => {
                    if !failed {
                        tracing::error!("checkpoint into redb failed: {e}; retrying (the log keeps every change meanwhile)");
                    }
                    failed = true;
                    std::thread::sleep(RETRY_AFTER);
                }
            }
        }
        if failed {
            tracing::info!("checkpoint into redb works again");
        }
        if folded.send(epoch).is_err() {
            return;
        }
    }
}
