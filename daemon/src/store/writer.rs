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

use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::log::Log;
use super::{Batch, Change, Store, StoreError};

/// Answer to a change: `Ok` once it (and everything queued before it) is durable.
///
/// Awaiting it is what gets the change committed: the first poll commits the queue right there,
/// on the awaiting thread, when no commit is running and this change is alone, as the last one
/// was (one `fdatasync` with no thread hand-off: the case of a lone client); otherwise it wakes the writer
/// thread, which commits everything queued as one batch. Dropping it unpolled also wakes the
/// writer, so a change is never left waiting for a poll that does not come.
pub struct Done {
    rx: Option<oneshot::Receiver<Result<(), StoreError>>>,
    /// Set until the first poll (or drop) has committed or handed the queue on.
    kick: Option<Arc<Shared>>,
}

/// What [`Done`] yields: an `Err` outside means the writer is gone.
pub type DoneResult = Result<Result<(), StoreError>, oneshot::error::RecvError>;

impl Done {
    /// Blocks the calling (non-async) thread until the change is durable or failed. The
    /// writer thread commits it.
    pub fn blocking_recv(mut self) -> DoneResult {
        if let Some(shared) = self.kick.take() {
            shared.wake_writer();
        }
        match self.rx.take() {
            Some(rx) => rx.blocking_recv(),
            None => Ok(Err(StoreError::WriterGone)),
        }
    }
}

impl Future for Done {
    type Output = DoneResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<DoneResult> {
        if let Some(shared) = self.kick.take() {
            shared.commit_here_or_wake();
        }
        match self.rx.as_mut() {
            Some(rx) => Pin::new(rx).poll(cx),
            None => Poll::Ready(Ok(Err(StoreError::WriterGone))),
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if let Some(shared) = self.kick.take() {
            shared.wake_writer();
        }
    }
}

/// Maps a finished [`Done`] to a result.
pub fn outcome(r: DoneResult) -> Result<(), StoreError> {
    r.unwrap_or(Err(StoreError::WriterGone))
}

/// One change for the writer, with whom to tell when it is durable.
pub(crate) struct Job {
    pub(crate) change: Change,
    pub(crate) done: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// Handle to the writer. Cloning is cheap; the writer thread stops once every handle is gone
/// and everything queued is committed.
pub struct Writer {
    inner: Inner,
}

enum Inner {
    Threads(Arc<Shared>),
    /// The engine's tests take the jobs themselves.
    #[cfg(test)]
    Manual(std_mpsc::Sender<Job>),
}

/// State shared by the handles, the writer thread and whoever commits inline.
///
/// Lock order: `committer` before `queue`. Jobs leave the queue only while `committer` is
/// held, so batches reach the log in the order their changes were queued.
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when jobs arrive for the writer thread or the last handle goes.
    wake: Condvar,
    committer: Mutex<Committer>,
}

struct Queue {
    jobs: Vec<Job>,
    /// Live [`Writer`] handles.
    handles: usize,
    /// The writer thread waits on `wake`: only then is a notify needed (a notify is a futex
    /// syscall; under load most commits would pay one for a thread that is already awake).
    writer_asleep: bool,
}

/// Delay before retrying a failed append or checkpoint when nothing else wakes the thread.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// An epoch is handed to the checkpointer once its file holds this many bytes…
const CHECKPOINT_BYTES: u64 = 4 << 20;
/// …or once it is this old and the writer has nothing else to do.
const CHECKPOINT_AFTER: Duration = Duration::from_secs(1);
/// How often a due rotation is retried while the checkpointer is still folding.
const ROTATE_POLL: Duration = Duration::from_millis(50);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Writer {
    /// Moves `store` to two new threads: the writer (which commits to the log when no awaiting
    /// task does) and the checkpointer (which owns redb).
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
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: Vec::new(),
                handles: 1,
                writer_asleep: false,
            }),
            wake: Condvar::new(),
            committer: Mutex::new(Committer {
                log,
                checkpointer,
                checkpoint_bytes,
                batch: Batch::default(),
                unfolded: Batch::default(),
                waiters: Vec::new(),
                failing: false,
                epoch_started: Instant::now(),
                last_batch_jobs: 0,
            }),
        });
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("lockd-store".into())
            .spawn(move || writer_loop(&thread_shared))?;
        Ok(Writer {
            inner: Inner::Threads(shared),
        })
    }

    /// Queues `change`; the returned [`Done`] answers once it is durable (or failed). Await it
    /// (or drop it): that is what commits it.
    pub fn submit(&self, change: Change) -> Done {
        let (done, rx) = oneshot::channel();
        let job = Job {
            change,
            done: Some(done),
        };
        let kick = match &self.inner {
            Inner::Threads(shared) => {
                lock(&shared.queue).jobs.push(job);
                Some(Arc::clone(shared))
            }
            #[cfg(test)]
            Inner::Manual(tx) => {
                // If the taker is gone, `done` is dropped and the receiver reports an error.
                let _ = tx.send(job);
                None
            }
        };
        Done { rx: Some(rx), kick }
    }

    /// A writer without a thread: the caller takes the jobs and answers them as it likes
    /// (the engine's tests use it to delay, fail and reorder commits).
    #[cfg(test)]
    pub(crate) fn manual() -> (Writer, std_mpsc::Receiver<Job>) {
        let (tx, rx) = std_mpsc::channel();
        (
            Writer {
                inner: Inner::Manual(tx),
            },
            rx,
        )
    }

    /// Answers once every change submitted before this call is durable (or failed).
    pub fn sync(&self) -> Done {
        self.submit(Change::Sync)
    }

    /// Queues `change` without waiting for it (it still converges to disk in order).
    pub fn submit_quiet(&self, change: Change) {
        let job = Job { change, done: None };
        match &self.inner {
            Inner::Threads(shared) => {
                let mut queue = lock(&shared.queue);
                queue.jobs.push(job);
                shared.wake_writer_with(queue);
            }
            #[cfg(test)]
            Inner::Manual(tx) => {
                let _ = tx.send(job);
            }
        }
    }
}

impl Clone for Writer {
    fn clone(&self) -> Writer {
        let inner = match &self.inner {
            Inner::Threads(shared) => {
                lock(&shared.queue).handles += 1;
                Inner::Threads(Arc::clone(shared))
            }
            #[cfg(test)]
            Inner::Manual(tx) => Inner::Manual(tx.clone()),
        };
        Writer { inner }
    }
}

impl Drop for Writer {
    // Without tests there is only `Inner::Threads`.
    #[allow(irrefutable_let_patterns)]
    fn drop(&mut self) {
        if let Inner::Threads(shared) = &self.inner {
            let mut queue = lock(&shared.queue);
            queue.handles -= 1;
            if queue.handles == 0 {
                shared.wake_writer_with(queue);
            }
        }
    }
}

impl Shared {
    fn wake_writer(&self) {
        self.wake_writer_with(lock(&self.queue));
    }

    /// Wakes the writer thread if it sleeps; `queue` is the caller's lock on the queue.
    fn wake_writer_with(&self, queue: MutexGuard<'_, Queue>) {
        let asleep = queue.writer_asleep;
        drop(queue);
        if asleep {
            self.wake.notify_one();
        }
    }

    /// Commits the queue on this thread if no commit is running and this change is alone (as
    /// the last commit's was), else leaves it to the writer thread.
    fn commit_here_or_wake(&self) {
        let Ok(mut committer) = self.committer.try_lock() else {
            // A commit is running: whoever runs it hands what is queued on when done.
            self.wake_writer();
            return;
        };
        let jobs = {
            let mut queue = lock(&self.queue);
            // Inline only for a lone change after a lone change: under concurrent load the
            // writer thread batches, and no async worker blocks its other connections for a
            // sync (inline commits at 64 clients halved throughput).
            if queue.jobs.len() > 1 || committer.last_batch_jobs > 1 {
                drop(committer);
                self.wake_writer_with(queue);
                return;
            }
            std::mem::take(&mut queue.jobs)
        };
        committer.commit(jobs);
        drop(committer);
        let queue = lock(&self.queue);
        if !queue.jobs.is_empty() {
            self.wake_writer_with(queue);
        }
    }
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

/// The log and what is on its way into it; held by whoever commits.
struct Committer {
    log: Log,
    checkpointer: Checkpointer,
    checkpoint_bytes: u64,
    /// Changes not yet durable (a failed batch's quiet changes wait here for the retry).
    batch: Batch,
    /// The active epoch's changes, for the checkpointer.
    unfolded: Batch,
    waiters: Vec<oneshot::Sender<Result<(), StoreError>>>,
    /// The last append failed.
    failing: bool,
    epoch_started: Instant,
    /// How many jobs the last commit took: more than one means concurrent writers.
    last_batch_jobs: usize,
}

impl Committer {
    /// Appends `jobs` (and a failed batch's leftovers) as one record, answers their waiters,
    /// and hands the epoch to the checkpointer when it is due.
    fn commit(&mut self, jobs: Vec<Job>) {
        if !jobs.is_empty() {
            self.last_batch_jobs = jobs.len();
        }
        for job in jobs {
            self.batch.add(job.change, job.done.is_some());
            self.waiters.extend(job.done);
        }
        if !self.batch.is_empty() {
            if self.log.written() == 0 {
                self.epoch_started = Instant::now();
            }
            self.failing = !self.append();
        }
        // Only syncs are left (or nothing): everything before them is durable or was answered.
        for w in self.waiters.drain(..) {
            let _ = w.send(Ok(()));
        }
        let due = self.log.written() >= self.checkpoint_bytes
            || (self.log.written() > 0 && self.epoch_started.elapsed() >= CHECKPOINT_AFTER);
        if due && !self.failing {
            self.checkpointer.rotate(&mut self.log, &mut self.unfolded);
        }
    }

    /// How long the writer thread may sleep with an empty queue: while a failed batch is
    /// pending, until its retry; while the active epoch holds changes, until it is due.
    fn idle_timeout(&self) -> Option<Duration> {
        if self.failing {
            Some(RETRY_AFTER)
        } else if self.log.written() > 0 {
            // At least a little: while the checkpointer is busy, a due rotation waits.
            Some(
                CHECKPOINT_AFTER
                    .saturating_sub(self.epoch_started.elapsed())
                    .max(ROTATE_POLL),
            )
        } else {
            None
        }
    }

    /// Appends the batch to the log and answers its waiters. Returns whether it worked; on
    /// failure the waiters hear the error and the quiet changes stay for the retry.
    fn append(&mut self) -> bool {
        match self.log.append(&self.batch) {
            Ok(()) => {
                if self.failing {
                    tracing::info!("storage works again; pending changes are committed");
                }
                self.unfolded.absorb(std::mem::take(&mut self.batch));
                for w in self.waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
                true
            }
            Err(e) => {
                if !self.failing {
                    tracing::error!(
                        "commit failed: {e}; affected requests answer Unavailable, retrying"
                    );
                }
                self.batch.keep_quiet_changes();
                let msg = e.to_string();
                for w in self.waiters.drain(..) {
                    let _ = w.send(Err(StoreError::CommitFailed(msg.clone())));
                }
                false
            }
        }
    }
}

/// The writer thread: commits what is queued whenever no awaiting task did, retries failed
/// batches, and rotates due epochs. Returns once every handle is gone and the queue is empty.
fn writer_loop(shared: &Shared) {
    loop {
        let timeout = lock(&shared.committer).idle_timeout();
        {
            let mut queue = lock(&shared.queue);
            if queue.jobs.is_empty() {
                if queue.handles == 0 {
                    return;
                }
                queue.writer_asleep = true;
                queue = match timeout {
                    Some(t) => {
                        shared
                            .wake
                            .wait_timeout(queue, t)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0
                    }
                    None => shared
                        .wake
                        .wait(queue)
                        .unwrap_or_else(PoisonError::into_inner),
                };
                queue.writer_asleep = false;
            }
            drop(queue);
        }
        let mut committer = lock(&shared.committer);
        let jobs = std::mem::take(&mut lock(&shared.queue).jobs);
        committer.commit(jobs);
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
