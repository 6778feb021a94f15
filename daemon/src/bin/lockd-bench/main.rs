//! `lockd-bench`: measures a running lockd, as redis-benchmark and pgbench do for theirs.
//!
//! - default: acquire + release pairs per second and acquire latency percentiles, with
//!   `--clients` connections, `--depth` requests in flight on each, keys per slot or drawn
//!   from `--keys`, through the client crate or (`--raw`) hand-encoded frames;
//! - `--floor`: beside each measurement, an echo server run by lockd-bench itself answering
//!   the same frames, and lockd's ratio to it;
//! - `--handoff`: release-to-next-grant latency on one hot key;
//! - `--hold-many N`: the daemon's memory holding N locks and after releasing them;
//! - baselines in the same harness: `--fsync-floor DIR` (the disk's syncs/s beside each
//!   measurement), `--redis PATH` (the same pairs and holds on Redis), `--flock` (the handoff
//!   on flock(2) between processes).
//!
//! Modules: `args` (flags, checks), `daemon` (reaching the daemon, its process), `workload`
//! (the drivers and the measurement timeline), `floor` (the echo server and its driver),
//! `fsync_floor` (write + fdatasync), `pipe` (a hand-encoding driver's connection), `redis`
//! (RESP and Redis connections), `flock` (the flock(2) contenders), `report` (progress line,
//! text and JSON output).

mod args;
mod daemon;
mod flock;
mod floor;
mod fsync_floor;
mod pipe;
mod redis;
mod report;
mod workload;

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use crate::args::{Args, Settings, Target, Workload};
use crate::daemon::Daemon;
use crate::floor::{EchoServer, Sizes};
use crate::fsync_floor::SyncFile;
use crate::redis::Server;
use crate::report::{Floor, Measurement, Progress, Refusals, Report};
use crate::workload::{Control, Which};

/// Why a run ended early.
#[derive(Debug)]
pub enum Failure {
    /// lockd could not be reached (exit 69).
    Unreachable(String),
    /// A measurement failed: lockd refused, stopped answering, or the machine refused (exit 1).
    Run(String),
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(file) = &args.flock_child {
        return flock::child(file, args.flock_slot);
    }
    let settings = Arc::new(args.resolve());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.threads)
        .thread_name("lockd-bench")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lockd-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(&settings));
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Unreachable(msg)) => {
            eprintln!("lockd-bench: {msg}");
            ExitCode::from(69)
        }
        Err(Failure::Run(msg)) => {
            eprintln!("lockd-bench: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn run(s: &Arc<Settings>) -> Result<(), Failure> {
    let (daemon, redis) = match s.target {
        Target::Lockd => (Daemon::probe(&s.socket).await?, None),
        Target::Redis => {
            let server = Server::probe(&s.socket).await?;
            (server.daemon.clone(), Some(server))
        }
        Target::EtcdLock => {
            let etcd = Daemon {
                server_version: "v3 lock API".into(),
                pid: None,
            };
            (etcd, None)
        }
        Target::Flock => {
            let kernel = Daemon {
                server_version: String::new(),
                pid: None,
            };
            (kernel, None)
        }
    };
    let report = Report::new(s, &daemon);
    let progress = Progress::new();
    report.header();
    let echo = if s.floor {
        Some(EchoServer::start()?)
    } else {
        None
    };
    let sync_file = match &s.fsync_floor {
        Some(dir) => Some(Arc::new(SyncFile::create(dir)?)),
        None => None,
    };
    for &clients in &s.clients {
        match (s.workload, &redis) {
            (Workload::Pairs, _) => {
                let floor = match &echo {
                    Some(server) => Some(measure_floor(s, server, clients, &progress).await?),
                    None => None,
                };
                let fsync_floor = match &sync_file {
                    Some(f) => Some(fsync_floor::measure(s, f, clients, &progress).await?),
                    None => None,
                };
                let mut m = measure(s, &daemon, redis.as_ref(), clients, &progress).await?;
                m.floor = floor;
                m.fsync_floor = fsync_floor;
                report.pairs(&m);
            }
            (Workload::Handoff, _) if s.target == Target::Flock => {
                let m = tokio::task::block_in_place(|| flock::measure(s, clients, &progress))?;
                report.handoff(&m);
            }
            (Workload::Handoff, _) => {
                let m = measure(s, &daemon, None, clients, &progress).await?;
                report.handoff(&m);
            }
            (Workload::HoldMany(n), Some(server)) => {
                let r = workload::redis::hold_many(s, n, clients, server, &progress).await?;
                report.hold_many(&r);
            }
            (Workload::HoldMany(n), None) => {
                let r = workload::hold_many::run(s, n, clients, &daemon, &progress).await?;
                report.hold_many(&r);
            }
        }
    }
    Ok(())
}

/// One pairs or handoff measurement against lockd, or pairs against Redis (`redis`).
async fn measure(
    s: &Arc<Settings>,
    daemon: &Daemon,
    redis: Option<&Server>,
    clients: usize,
    progress: &Progress,
) -> Result<Measurement, Failure> {
    let ctl = Control::new();
    let label = format!("{clients} clients");
    progress.show(&format!("{label}: connecting"));
    let workers = match (redis, s.workload, s.raw) {
        #[cfg(not(feature = "etcd"))]
        _ if s.target == Target::EtcdLock => {
            return Err(Failure::Run(
                "this lockd-bench was built without the etcd feature".into(),
            ))
        }
        #[cfg(feature = "etcd")]
        _ if s.target == Target::EtcdLock => {
            let endpoints: Vec<String> = s
                .etcd
                .iter()
                .flat_map(|e| e.split(','))
                .map(str::to_owned)
                .collect();
            workload::etcd_lock::start(s, clients, &endpoints, &ctl).await?
        }
        (Some(server), _, _) => workload::redis::start(s, clients, server, &ctl).await?,
        (None, Workload::Handoff, _) => workload::handoff::start(s, clients, &ctl).await?,
        (None, _, true) => workload::raw::start(s, clients, &ctl).await?,
        (None, _, false) => workload::pairs::start(s, clients, &ctl).await?,
    };
    let cpu = || daemon.cpu_secs();
    let window = workload::measure(&ctl, workers, s.warmup, s.duration, progress, &label, &cpu)
        .await
        .map_err(Failure::Run)?;
    let refused = Refusals {
        timeout: ctl.refused.timeout.load(Ordering::Relaxed),
        deadlock: ctl.refused.deadlock.load(Ordering::Relaxed),
        conflict: ctl.refused.conflict.load(Ordering::Relaxed),
    };
    Ok(Measurement {
        clients,
        window,
        acquire: ctl.percentiles(Which::Acquire),
        handoff: (s.workload == Workload::Handoff).then(|| ctl.percentiles(Which::Handoff)),
        refused,
        daemon_cpu_secs: window.cpu_secs,
        floor: None,
        fsync_floor: None,
    })
}

/// The echo server driven like lockd, with the same clients and depth.
async fn measure_floor(
    s: &Arc<Settings>,
    server: &EchoServer,
    clients: usize,
    progress: &Progress,
) -> Result<Floor, Failure> {
    let ctl = Control::new();
    let sizes = Sizes::of(s, clients);
    let workers = floor::start(server, sizes, clients, s.depth, &ctl).await?;
    let label = format!("floor, {clients} clients");
    let window = workload::measure_baseline(&ctl, workers, s, progress, &label).await?;
    Ok(Floor {
        window,
        acquire: ctl.percentiles(Which::Acquire),
        sizes,
    })
}
