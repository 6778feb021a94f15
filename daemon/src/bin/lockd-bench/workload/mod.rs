//! The workload drivers and what they share: the run's [`Control`] (stop and recording
//! flags, counters, latency histograms), key choice, and the measurement timeline.
//!
//! - `pairs`: acquire + release loops through the client crate;
//! - `raw`: the same with hand-encoded, pipelined frames;
//! - `handoff`: every connection queued on one hot key;
//! - `hold_many`: many holds at once and the daemon's memory;
//! - `redis`: the same pairs and many holds against Redis (`--redis`).

#[cfg(feature = "etcd")]
pub mod etcd_lock;
pub mod handoff;
pub mod hold_many;
pub mod pairs;
pub mod raw;
pub mod redis;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use lockd_protocol::ErrorCode;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::args::{KeySpace, Settings};
use crate::report::{Percentiles, Progress};
use crate::Failure;

/// How long one acquire may wait in its key's queue. Far above any measurement, so a timeout
/// means something (another program holding a key, a stalled daemon), and is counted.
pub const ACQUIRE_WAIT: Duration = Duration::from_secs(60);

/// How long the workers may take to finish their last pair once told to stop.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Samples a worker keeps before adding them to the shared histogram.
const SAMPLE_BATCH: usize = 256;

/// A worker's result: `Err` ends the run with that message.
pub type Worker = JoinHandle<Result<(), String>>;

/// Shared by the workers of one measurement.
pub struct Control {
    stop: AtomicBool,
    recording: AtomicBool,
    /// Completed acquire + release pairs since the workers started.
    pub pairs: AtomicU64,
    pub refused: Refused,
    acquire: Mutex<Histogram<u64>>,
    handoff: Mutex<Histogram<u64>>,
    failure: Mutex<Option<String>>,
}

/// Acquires the daemon refused, by reason: counted, not fatal.
#[derive(Default)]
pub struct Refused {
    pub timeout: AtomicU64,
    pub deadlock: AtomicU64,
    pub conflict: AtomicU64,
}

/// Which histogram a sample goes to.
#[derive(Clone, Copy)]
pub enum Which {
    /// From sending an acquire to its grant.
    Acquire,
    /// From sending a release to the next holder's grant (`--handoff`).
    Handoff,
}

/// A latency histogram: nanoseconds, 1 ns to an hour, 3 significant figures (a fixed
/// ~300 KiB).
pub fn new_histogram() -> Histogram<u64> {
    // Constant bounds that hdrhistogram accepts (low >= 1, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds")
}

impl Control {
    pub fn new() -> Arc<Control> {
        let histogram = || Mutex::new(new_histogram());
        Arc::new(Control {
            stop: AtomicBool::new(false),
            recording: AtomicBool::new(false),
            pairs: AtomicU64::new(0),
            refused: Refused::default(),
            acquire: histogram(),
            handoff: histogram(),
            failure: Mutex::new(None),
        })
    }

    /// Workers stop starting new pairs once this is true.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn pair_done(&self) {
        self.pairs.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refused acquire; `Err` with a message for refusals that end the run.
    pub fn refusal(&self, code: Option<ErrorCode>, what: &str) -> Result<(), String> {
        let counter = match code {
            Some(ErrorCode::Timeout) => &self.refused.timeout,
            Some(ErrorCode::Deadlock) => &self.refused.deadlock,
            Some(ErrorCode::Conflict) => &self.refused.conflict,
            _ => return Err(what.to_string()),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Records the first fatal error; the measurement ends early.
    pub fn fail(&self, msg: String) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(msg);
        self.stop.store(true, Ordering::Relaxed);
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A worker's buffer of latency samples.
    pub fn samples(self: &Arc<Self>, which: Which) -> Samples {
        Samples {
            ctl: Arc::clone(self),
            which,
            buf: Vec::with_capacity(SAMPLE_BATCH),
        }
    }

    fn histogram(&self, which: Which) -> &Mutex<Histogram<u64>> {
        match which {
            Which::Acquire => &self.acquire,
            Which::Handoff => &self.handoff,
        }
    }

    /// Percentiles of what was recorded during the measurement window.
    pub fn percentiles(&self, which: Which) -> Percentiles {
        let h = self
            .histogram(which)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Percentiles::of(&h)
    }
}

/// Latency samples of one worker, added to the shared histogram in batches (and on drop).
/// Samples count only while the measurement window is open.
pub struct Samples {
    ctl: Arc<Control>,
    which: Which,
    buf: Vec<u64>,
}

impl Samples {
    pub fn record(&mut self, d: Duration) {
        if !self.ctl.recording.load(Ordering::Relaxed) {
            return;
        }
        self.buf
            .push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1));
        if self.buf.len() >= SAMPLE_BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let mut h = self
            .ctl
            .histogram(self.which)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for &v in &self.buf {
            h.saturating_record(v);
        }
        self.buf.clear();
    }
}

impl Drop for Samples {
    fn drop(&mut self) {
        self.flush();
    }
}

/// What one measurement window saw.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub pairs: u64,
    pub secs: f64,
    /// CPU seconds the daemon used during the window, when its /proc entry is readable.
    pub cpu_secs: Option<f64>,
}

/// Runs the timeline of one measurement: `warmup` (nothing recorded), then `duration`
/// (pairs counted, latencies recorded, a progress line each second), then stops the workers
/// and waits (bounded) for them to finish their last pair. `cpu` reads the daemon's CPU time
/// (at the window's start and end).
///
/// # Errors
/// The first worker's fatal error, or a message if the workers do not finish in time.
pub async fn measure(
    ctl: &Control,
    workers: Vec<Worker>,
    warmup: Duration,
    duration: Duration,
    progress: &Progress,
    label: &str,
    cpu: &dyn Fn() -> Option<f64>,
) -> Result<Window, String> {
    let began = Instant::now();
    progress.show(&format!("{label}: warming up"));
    while began.elapsed() < warmup && !ctl.stopped() {
        tokio::time::sleep((warmup - began.elapsed()).min(Duration::from_millis(100))).await;
    }
    ctl.recording.store(true, Ordering::Relaxed);
    let from = ctl.pairs.load(Ordering::Relaxed);
    let cpu_from = cpu();
    let start = Instant::now();
    let mut next_tick = Duration::ZERO;
    while start.elapsed() < duration && !ctl.stopped() {
        let elapsed = start.elapsed();
        if elapsed >= next_tick {
            let pairs = ctl.pairs.load(Ordering::Relaxed) - from;
            let secs = elapsed.as_secs_f64();
            let rate = if secs > 0.0 {
                format!(" ({:.0}/s)", pairs as f64 / secs)
            } else {
                String::new()
            };
            progress.show(&format!(
                "{label}: {secs:.0} s of {:.0} s, {pairs} pairs{rate}",
                duration.as_secs_f64()
            ));
            next_tick += Duration::from_secs(1);
        }
        let left = duration.saturating_sub(start.elapsed());
        tokio::time::sleep(left.min(Duration::from_millis(100))).await;
    }
    let pairs = ctl.pairs.load(Ordering::Relaxed) - from;
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = cpu().zip(cpu_from).map(|(to, from)| (to - from).max(0.0));
    ctl.recording.store(false, Ordering::Relaxed);
    ctl.stop.store(true, Ordering::Relaxed);
    progress.show(&format!("{label}: finishing"));
    let joined = join(workers).await;
    progress.clear();
    if let Some(msg) = ctl.failure() {
        return Err(msg);
    }
    joined?;
    Ok(Window {
        pairs,
        secs,
        cpu_secs,
    })
}

/// [`measure`] for a baseline that lockd-bench runs itself (no daemon CPU time to read),
/// with the run's warm-up and duration.
pub async fn measure_baseline(
    ctl: &Control,
    workers: Vec<Worker>,
    s: &Settings,
    progress: &Progress,
    label: &str,
) -> Result<Window, Failure> {
    measure(ctl, workers, s.warmup, s.duration, progress, label, &|| {
        None
    })
    .await
    .map_err(Failure::Run)
}

/// Waits for every worker, at most [`DRAIN_LIMIT`] in all.
async fn join(workers: Vec<Worker>) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
    let mut first_err = None;
    for w in workers {
        let abort = w.abort_handle();
        match tokio::time::timeout_at(deadline, w).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                first_err.get_or_insert(e);
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(format!("a worker failed: {e}"));
            }
            Err(_) => {
                abort.abort();
                first_err.get_or_insert(format!(
                    "the workers did not finish within {DRAIN_LIMIT:?} of the stop: \
                     lockd stopped answering"
                ));
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Runs `body` as a worker: a fatal error is also recorded in `ctl`, so the measurement
/// stops early.
pub fn spawn_worker<F>(ctl: &Arc<Control>, body: F) -> Worker
where
    F: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let ctl = Arc::clone(ctl);
    tokio::spawn(async move {
        let result = body.await;
        if let Err(e) = &result {
            ctl.fail(e.clone());
        }
        result
    })
}

/// A small fast generator (splitmix64) for key choice; no need for cryptographic quality.
pub struct Rng(u64);

impl Rng {
    pub fn new(stream: u64) -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng(t ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// The key of request slot `i` of connection `c` for its next acquire: the slot's own
/// (per-slot keys) or one drawn at random; with `busy`, one this connection is not using
/// (then added to it; see [`LocalKeys`]), `None` if a few draws all hit busy keys.
pub fn slot_key(
    s: &Settings,
    c: usize,
    i: usize,
    rng: &mut Rng,
    busy: Option<&mut HashSet<u64>>,
) -> Option<u64> {
    match (s.keys, busy) {
        (KeySpace::PerSlot, _) => Some((c * s.depth + i) as u64),
        (KeySpace::Random(n), Some(busy)) => (0..8).map(|_| rng.below(n)).find(|&k| busy.insert(k)),
        (KeySpace::Random(n), None) => Some(rng.below(n)),
    }
}

/// The keys one connection has requests on, in exclusive mode with `--keys`.
///
/// A connection must never wait for a key it holds or already waits for: the owner of holds
/// is the connection, so the daemon would refuse that wait as a deadlock (the connection
/// waiting for itself). The request slots of one connection therefore take turns on a key, as
/// the tasks of a real program sharing one connection would have to.
#[derive(Default)]
pub struct LocalKeys {
    busy: Mutex<HashSet<u64>>,
    freed: Notify,
}

impl LocalKeys {
    /// A random key among `n` that no other slot of this connection is using; waits for one
    /// to be freed if the draws keep hitting busy keys.
    pub async fn take(&self, rng: &mut Rng, n: u64) -> u64 {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(k) = self.try_take(rng, n) {
                return k;
            }
            freed.await;
        }
    }

    /// A random key among `n` not in use by this connection, if a few draws find one.
    pub fn try_take(&self, rng: &mut Rng, n: u64) -> Option<u64> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        (0..8).map(|_| rng.below(n)).find(|&k| busy.insert(k))
    }

    pub fn put(&self, k: u64) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&k);
        self.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = Rng::new(7);
        let mut seen = [false; 5];
        for _ in 0..1000 {
            let v = rng.below(5);
            assert!(v < 5);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(rng.below(1), 0);
    }

    #[test]
    fn local_keys_are_never_handed_out_twice() {
        let keys = LocalKeys::default();
        let mut rng = Rng::new(1);
        let a = keys.try_take(&mut rng, 1).expect("free");
        assert_eq!(keys.try_take(&mut rng, 1), None);
        keys.put(a);
        assert_eq!(keys.try_take(&mut rng, 1), Some(0));
    }
}
