//! `lockd-bench`: measures a running lockd, as redis-benchmark and pgbench do for theirs.
//!
//! - default: acquire + release pairs per second and acquire latency percentiles, with
//!   `--clients` connections, `--depth` requests in flight on each, keys per slot or drawn
//!   from `--keys`, through the client crate or (`--raw`) hand-encoded frames;
//! - `--floor`: beside each measurement, an echo server run by lockd-bench itself answering
//!   the same frames, and lockd's ratio to it;
//! - `--handoff`: release-to-next-grant latency on one hot key;
//! - `--hold-many N`: the daemon's memory holding N locks and after releasing them.
//!
//! Modules: `args` (flags, checks), `daemon` (reaching the daemon, its process), `workload`
//! (the drivers and the measurement timeline), `floor` (the echo server and its driver),
//! `report` (progress line, text and JSON output).

mod args;
mod daemon;
mod floor;
mod report;
mod workload;

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use crate::args::{Args, Settings, Workload};
use crate::daemon::Daemon;
use crate::floor::{EchoServer, Sizes};
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
    let settings = Arc::new(Args::parse().resolve());
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
    let daemon = Daemon::probe(&s.socket).await?;
    let report = Report::new(s, &daemon);
    let progress = Progress::new();
    report.header();
    let echo = if s.floor {
        Some(EchoServer::start()?)
    } else {
        None
    };
    for &clients in &s.clients {
        match s.workload {
            Workload::Pairs => {
                let floor = match &echo {
                    Some(server) => Some(measure_floor(s, server, clients, &progress).await?),
                    None => None,
                };
                let mut m = measure_lockd(s, &daemon, clients, &progress).await?;
                m.floor = floor;
                report.pairs(&m);
            }
            Workload::Handoff => {
                let m = measure_lockd(s, &daemon, clients, &progress).await?;
                report.handoff(&m);
            }
            Workload::HoldMany(n) => {
                let r = workload::hold_many::run(s, n, clients, &daemon, &progress).await?;
                report.hold_many(&r);
            }
        }
    }
    Ok(())
}

/// One pairs or handoff measurement against lockd.
async fn measure_lockd(
    s: &Arc<Settings>,
    daemon: &Daemon,
    clients: usize,
    progress: &Progress,
) -> Result<Measurement, Failure> {
    let ctl = Control::new();
    let label = format!("{clients} clients");
    progress.show(&format!("{label}: connecting"));
    let workers = match (s.workload, s.raw) {
        (Workload::Handoff, _) => workload::handoff::start(s, clients, &ctl).await?,
        (_, true) => workload::raw::start(s, clients, &ctl).await?,
        (_, false) => workload::pairs::start(s, clients, &ctl).await?,
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
    let window = workload::measure(
        &ctl,
        workers,
        s.warmup,
        s.duration,
        progress,
        &label,
        &|| None,
    )
    .await
    .map_err(Failure::Run)?;
    Ok(Floor {
        window,
        acquire: ctl.percentiles(Which::Acquire),
        sizes,
    })
}
