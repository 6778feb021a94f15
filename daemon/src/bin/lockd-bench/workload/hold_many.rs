//! `--hold-many N`: the daemon's resident memory idle, with the connections open, holding N
//! locks (distinct keys, spread over the connections), and once a second after releasing them
//! all, until it settles or `--rss-watch` runs out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockd_client::{Client, LockGuard};
use lockd_protocol::Ticket;

use super::ACQUIRE_WAIT;
use crate::args::Settings;
use crate::daemon::{self, Daemon};
use crate::report::Progress;
use crate::Failure;

/// What `--hold-many` measured. RSS figures are `None` when /proc/PID/status is unreadable.
#[derive(Debug)]
pub struct HoldMany {
    pub holds: u64,
    pub clients: usize,
    pub rss_idle_kib: Option<u64>,
    pub rss_connected_kib: Option<u64>,
    pub rss_held_kib: Option<u64>,
    pub rss_peak_kib: Option<u64>,
    /// (seconds after the release ended, RSS in KiB), once a second.
    pub rss_after_release_kib: Vec<(f64, u64)>,
    pub acquire_secs: f64,
    pub release_secs: f64,
}

/// The daemon's memory through a `--hold-many` run, read as it goes.
pub struct RssTimeline<'a> {
    daemon: &'a Daemon,
    idle: Option<u64>,
    connected: Option<u64>,
    held: Option<u64>,
    peak: Option<u64>,
}

impl<'a> RssTimeline<'a> {
    /// Reads the RSS before anything is connected.
    pub fn idle(daemon: &'a Daemon) -> RssTimeline<'a> {
        RssTimeline {
            daemon,
            idle: daemon.rss_kib(),
            connected: None,
            held: None,
            peak: None,
        }
    }

    /// Reads the RSS with the connections open.
    pub fn connected(&mut self) {
        self.connected = self.daemon.rss_kib();
    }

    /// Reads the RSS and its peak with every lock held.
    pub fn holding(&mut self) {
        self.held = self.daemon.rss_kib();
        self.peak = self.daemon.peak_rss_kib();
    }

    /// Once everything is released: watches the RSS settle, and puts the figures together.
    pub async fn finish(
        self,
        s: &Settings,
        (holds, clients): (u64, usize),
        (acquire_secs, release_secs): (f64, f64),
        progress: &Progress,
    ) -> HoldMany {
        let after = watch_rss(self.daemon, s.rss_watch, self.idle, self.held, progress).await;
        progress.clear();
        HoldMany {
            holds,
            clients,
            rss_idle_kib: self.idle,
            rss_connected_kib: self.connected,
            rss_held_kib: self.held,
            rss_peak_kib: self.peak,
            rss_after_release_kib: after,
            acquire_secs,
            release_secs,
        }
    }
}

enum Held {
    Guard(LockGuard),
    Detached(Ticket),
}

pub async fn run(
    s: &Arc<Settings>,
    n: u64,
    clients: usize,
    daemon: &Daemon,
    progress: &Progress,
) -> Result<HoldMany, Failure> {
    let mut rss = RssTimeline::idle(daemon);
    let mut conns = Vec::with_capacity(clients);
    for i in 0..clients {
        progress.show(&format!("hold-many: connecting {i}/{clients}"));
        conns.push(daemon::connect(&s.socket).await?);
    }
    rss.connected();

    // Acquire: each connection takes its share, `--depth` requests at a time.
    let held = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut next = 0u64;
    for (c, client) in conns.iter().enumerate() {
        let share = n / clients as u64 + u64::from((c as u64) < n % clients as u64);
        let per_task = share.div_ceil(s.depth as u64).max(1);
        let mut from = next;
        let end = next + share;
        while from < end {
            let to = (from + per_task).min(end);
            let (client, s, held) = (client.clone(), Arc::clone(s), Arc::clone(&held));
            let task = tokio::spawn(acquire_range(client.clone(), s, from..to, held));
            tasks.push((client, task));
            from = to;
        }
        next = end;
    }
    let mut holds = Vec::with_capacity(tasks.len());
    let mut acquiring = tasks.into_iter();
    let mut current = acquiring.next();
    while let Some((client, task)) = current.as_mut() {
        match tokio::time::timeout(Duration::from_secs(1), task).await {
            Ok(joined) => {
                let range = joined.map_err(|e| Failure::Run(format!("a worker failed: {e}")))?;
                holds.push((client.clone(), range.map_err(Failure::Run)?));
                current = acquiring.next();
            }
            Err(_) => {
                let done = held.load(Ordering::Relaxed);
                progress.show(&format!("hold-many: holding {done} of {n}"));
                if started.elapsed() > ACQUIRE_WAIT * 2 {
                    return Err(Failure::Run(format!(
                        "only {done} of {n} locks held after {:?}: lockd stopped answering",
                        started.elapsed()
                    )));
                }
            }
        }
    }
    let acquire_secs = started.elapsed().as_secs_f64();
    rss.holding();

    // Release every hold explicitly, then close the connections.
    progress.show(&format!("hold-many: releasing {n} locks"));
    let started = Instant::now();
    let tasks: Vec<_> = holds
        .into_iter()
        .map(|(client, range)| tokio::spawn(release_all(client, range)))
        .collect();
    for t in tasks {
        let released = tokio::time::timeout(ACQUIRE_WAIT, t).await.map_err(|_| {
            Failure::Run("releasing took over a minute: lockd stopped answering".into())
        })?;
        released
            .map_err(|e| Failure::Run(format!("a worker failed: {e}")))?
            .map_err(Failure::Run)?;
    }
    let release_secs = started.elapsed().as_secs_f64();
    drop(conns);
    let times = (acquire_secs, release_secs);
    Ok(rss.finish(s, (n, clients), times, progress).await)
}

async fn acquire_range(
    client: Client,
    s: Arc<Settings>,
    range: std::ops::Range<u64>,
    held: Arc<AtomicU64>,
) -> Result<Vec<Held>, String> {
    let mut holds = Vec::with_capacity((range.end - range.start) as usize);
    for k in range {
        let mut acquire = client
            .acquire(format!("{}hold-{k}", s.prefix))
            .namespace(s.namespace.as_str())
            .mode(s.mode)
            .wait(ACQUIRE_WAIT);
        if let Some(lease) = s.lease {
            acquire = acquire.lease(lease);
        }
        let hold = if s.detach {
            acquire.detached().await.map(|l| Held::Detached(l.ticket))
        } else {
            acquire.await.map(Held::Guard)
        };
        holds.push(hold.map_err(|e| format!("acquire {k} failed: {e}"))?);
        held.fetch_add(1, Ordering::Relaxed);
    }
    Ok(holds)
}

async fn release_all(client: Client, holds: Vec<Held>) -> Result<(), String> {
    for h in holds {
        match h {
            Held::Guard(g) => g.release().await,
            Held::Detached(t) => client.release(&t).await,
        }
        .map_err(|e| format!("release failed: {e}"))?;
    }
    Ok(())
}

/// Samples the RSS now and once a second for at most `limit`, stopping early once it is back
/// within a tenth of the growth above idle, or has not changed for three samples.
async fn watch_rss(
    daemon: &Daemon,
    limit: Duration,
    idle: Option<u64>,
    held: Option<u64>,
    progress: &Progress,
) -> Vec<(f64, u64)> {
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let started = Instant::now();
    loop {
        let Some(rss) = daemon.rss_kib() else {
            return samples;
        };
        samples.push((started.elapsed().as_secs_f64(), rss));
        progress.show(&format!("hold-many: RSS after release {} KiB", rss));
        let back = match (idle, held) {
            (Some(i), Some(h)) => rss.saturating_sub(i) <= h.saturating_sub(i) / 10,
            _ => false,
        };
        let flat = samples.len() >= 3 && samples[samples.len() - 3..].iter().all(|s| s.1 == rss);
        let next = Duration::from_secs(samples.len() as u64);
        if back || flat || next > limit {
            return samples;
        }
        tokio::time::sleep(next.saturating_sub(started.elapsed())).await;
    }
}
