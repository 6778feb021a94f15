//! `lockd-load`: a load generator, run on purpose (never from the test suite).
//!
//! For each client count it measures, in the same run and on the same machine:
//! 1. the baseline: a raw Unix-socket request/response echo server (a separate process that
//!    frames and batches like lockd, but does no work), driven by N connections;
//! 2. lockd: N connections doing try-lock + release pairs through the client crate, each on
//!    its own key (no contention) or, with `--contended K`, on K shared keys.
//!
//! Baseline and lockd alternate `--rounds` times; it prints the median round trips per second of
//! each and the median of the per-round ratios. Build with `--release`:
//!   cargo build --release -p lockd -p lockd-tests && target/release/lockd-load

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Buf, BufMut, BytesMut};
use clap::Parser;
use lockd_protocol::{
    Acquire, ClientCodec, ClientMessage, Key, Mode, Op, Reply, Request, Response, ServerMessage,
    Wait,
};
use lockd_tests::raw::RawConn;
use lockd_tests::TestDaemon;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{Decoder, Encoder};

#[derive(Parser, Debug)]
#[command(
    about = "Load generator: lockd lock+release round trips vs a raw Unix-socket echo baseline"
)]
struct Args {
    /// Client counts to measure (comma-separated)
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    clients: Vec<usize>,
    /// Seconds per measurement
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Alternate baseline and lockd this many times per client count; report medians
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Path to the lockd binary [default: next to this executable]
    #[arg(long)]
    lockd: Option<PathBuf>,
    /// Share K keys among all clients instead of one key per client
    #[arg(long, value_name = "K")]
    contended: Option<usize>,
    /// Drive lockd with hand-encoded frames instead of the client crate (isolates daemon cost)
    #[arg(long)]
    raw: bool,
    /// Drive an already running lockd at this socket (skips the baseline; for profiling)
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Measure detached leases (acquire + release, each committed to disk) against the raw
    /// fsync rate of the same filesystem, instead of session locks against the echo server
    #[arg(long)]
    detached: bool,
    /// Measure recovery: store this many detached leases, SIGKILL lockd, time the restart
    #[arg(long, value_name = "N")]
    recovery: Option<usize>,
    /// Internal: run the echo server on this socket
    #[arg(long, hide = true)]
    echo_server: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(path) = &args.echo_server {
        return echo_server(path);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

async fn bench(args: Args) -> Result<()> {
    let exe = std::env::current_exe()?;
    let lockd = match &args.lockd {
        Some(p) => p.clone(),
        None => exe.with_file_name("lockd"),
    };
    if args.socket.is_none() && !lockd.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p lockd) or pass --lockd",
            lockd.display()
        );
    }
    let secs = Duration::from_secs_f64(args.seconds);
    if let Some(n) = args.recovery {
        return recovery(&lockd, n).await;
    }
    if args.detached {
        return detached(&lockd, &args.clients, secs, args.rounds).await;
    }
    println!(
        "{:>7} {:>14} {:>14} {:>7} {:>16}",
        "clients", "echo req/s", "lockd req/s", "ratio", "lock+release/s"
    );
    if let Some(socket) = &args.socket {
        for &n in &args.clients {
            let rate = drive_lockd(socket, n, secs, args.contended, args.raw).await?;
            println!(
                "{n:>7} {:>14} {rate:>14.0} {:>7} {:>16.0}",
                "-",
                "-",
                rate / 2.0
            );
        }
        return Ok(());
    }
    for &n in &args.clients {
        let (mut echoes, mut rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.rounds.max(1) {
            let echo = run_echo(&exe, n, secs).await?;
            let rate = run_lockd(&lockd, n, secs, args.contended, args.raw).await?;
            echoes.push(echo);
            rates.push(rate);
            ratios.push(rate / echo);
        }
        let (echo, rate, ratio) = (median(echoes), median(rates), median(ratios));
        println!(
            "{n:>7} {echo:>14.0} {rate:>14.0} {ratio:>6.2}x {:>16.0}",
            rate / 2.0
        );
    }
    Ok(())
}

/// Detached lease acquire+release pairs per second beside the raw fsync rate.
async fn detached(lockd: &Path, clients: &[usize], secs: Duration, rounds: usize) -> Result<()> {
    println!(
        "{:>7} {:>12} {:>18} {:>10}",
        "clients", "fsync/s", "lease acq+rel/s", "pairs/fsync"
    );
    for &n in clients {
        let (mut syncs, mut pairs) = (Vec::new(), Vec::new());
        for _ in 0..rounds.max(1) {
            let daemon =
                TestDaemon::start(lockd.to_str().context("lockd path is not UTF-8")?).await;
            syncs.push(fsync_rate(daemon.dir(), secs)?);
            pairs.push(drive_detached(&daemon.socket, n, secs).await? / 2.0);
        }
        let (sync, pair) = (median(syncs), median(pairs));
        println!("{n:>7} {sync:>12.0} {pair:>18.0} {:>10.2}", pair / sync);
    }
    Ok(())
}

/// Raw `write(4 KiB) + fdatasync` per second in `dir`: the disk's commit floor.
fn fsync_rate(dir: &Path, secs: Duration) -> Result<f64> {
    use std::io::{Seek, Write};
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    let block = [0u8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < secs {
        f.seek(std::io::SeekFrom::Start(0))?;
        f.write_all(&block)?;
        f.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// Round trips per second of detached acquire + release with `n` clients on distinct keys.
async fn drive_detached(socket: &Path, n: usize, secs: Duration) -> Result<f64> {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..n {
        let client = lockd_client::Client::connect(socket).await?;
        let (count, stop) = (Arc::clone(&count), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let key = format!("lease-{i}");
            while !stop.load(Ordering::Relaxed) {
                let acquired = client
                    .acquire(key.as_str())
                    .lease(Duration::from_secs(60))
                    .wait(Duration::from_secs(10))
                    .detached()
                    .await;
                let Ok(lease) = acquired else { break };
                if client.release(&lease.ticket).await.is_err() {
                    break;
                }
                count.fetch_add(2, Ordering::Relaxed);
            }
        }));
    }
    measure_and_join(&count, &stop, secs, tasks).await
}

/// Stores `n` detached leases, SIGKILLs lockd, and times the restart until it serves.
async fn recovery(lockd: &Path, n: usize) -> Result<()> {
    let mut daemon = TestDaemon::start(lockd.to_str().context("lockd path is not UTF-8")?).await;
    let per = n.div_ceil(64);
    let mut tasks = Vec::new();
    let filled = Instant::now();
    for w in 0..64 {
        let client = lockd_client::Client::connect(&daemon.socket).await?;
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let name = format!("recover-{w}-{i}");
                client
                    .acquire(name)
                    .lease(Duration::from_secs(3600))
                    .detached()
                    .await
                    .map(|_| ())?;
            }
            Ok::<(), lockd_client::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    println!("stored {} leases in {:.1?}", per * 64, filled.elapsed());
    daemon.kill9();
    let start = Instant::now();
    daemon.restart().await;
    println!("restart until serving: {:.1?}", start.elapsed());
    if let Some(line) = daemon
        .log_tail()
        .lines()
        .rev()
        .find(|l| l.contains("recovered detached leases"))
    {
        println!("daemon says: {}", line.trim());
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Round trips per second against the echo server with `n` clients.
async fn run_echo(exe: &Path, n: usize, secs: Duration) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("echo.sock");
    let mut server = std::process::Command::new(exe)
        .arg("--echo-server")
        .arg(&socket)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&socket).await.is_err() {
        if Instant::now() > deadline {
            let _ = server.kill();
            bail!("echo server did not start");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut stream = UnixStream::connect(&socket).await?;
        let (count, stop) = (Arc::clone(&count), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let payload = [7u8; 40];
            let mut frame = BytesMut::new();
            frame.put_u32(payload.len() as u32);
            frame.extend_from_slice(&payload);
            let mut buf = vec![0u8; frame.len()];
            while !stop.load(Ordering::Relaxed) {
                if stream.write_all(&frame).await.is_err()
                    || stream.read_exact(&mut buf).await.is_err()
                {
                    break;
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let rate = measure_and_join(&count, &stop, secs, tasks).await;
    let _ = server.kill();
    let _ = server.wait();
    rate
}

/// Round trips per second against lockd with `n` clients doing try-lock + release.
async fn run_lockd(
    bin: &Path,
    n: usize,
    secs: Duration,
    contended: Option<usize>,
    raw: bool,
) -> Result<f64> {
    let daemon = TestDaemon::start(bin.to_str().context("lockd path is not UTF-8")?).await;
    drive_lockd(&daemon.socket, n, secs, contended, raw).await
}

async fn drive_lockd(
    socket: &Path,
    n: usize,
    secs: Duration,
    contended: Option<usize>,
    raw: bool,
) -> Result<f64> {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..n {
        let key = match contended {
            Some(k) => format!("bench-{}", i % k.max(1)),
            None => format!("bench-{i}"),
        };
        let (count, stop) = (Arc::clone(&count), Arc::clone(&stop));
        if raw {
            let conn = RawConn::connect_hello(socket).await;
            tasks.push(tokio::spawn(raw_pairs(conn, key, count, stop)));
            continue;
        }
        let client = lockd_client::Client::connect(socket).await?;
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client
                    .acquire(key.as_str())
                    .wait(Duration::from_secs(10))
                    .await
                {
                    Ok(g) => {
                        if g.release().await.is_err() {
                            break;
                        }
                        count.fetch_add(2, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("acquire failed: {e}");
                        break;
                    }
                }
            }
        }));
    }
    measure_and_join(&count, &stop, secs, tasks).await
}

/// Lock + release pairs over a raw connection, one request in flight at a time.
///
/// As lean as the echo client, so the comparison measures the daemon: the acquire frame is
/// encoded once (ids may repeat once answered), buffers are reused, and no timer is armed per
/// request (a daemon that stops answering stalls the run, which `drive_lockd` bounds).
async fn raw_pairs(conn: RawConn, name: String, count: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let mut stream = conn.stream;
    let mut codec = ClientCodec::default();
    let key = Key::in_default(name).expect("valid key");
    let acquire = ClientMessage::Request(Request {
        id: 1,
        op: Op::Acquire(Acquire {
            key,
            mode: Mode::Exclusive,
            wait: Wait::Millis(10_000),
            lease_ms: None,
            detach: false,
            permits: None,
            lock_delay_ms: 0,
            data: Vec::new(),
        }),
    });
    let mut acquire_frame = BytesMut::new();
    codec.encode(&acquire, &mut acquire_frame).expect("encode");
    let (mut out, mut inbuf) = (BytesMut::new(), BytesMut::with_capacity(4096));
    while !stop.load(Ordering::Relaxed) {
        if stream.write_all(&acquire_frame).await.is_err() {
            return;
        }
        let ticket = match next_message(&mut stream, &mut codec, &mut inbuf).await {
            Some(ServerMessage::Response(Response {
                result: Ok(Reply::Granted(g)),
                ..
            })) => g.ticket,
            other => {
                eprintln!("unexpected answer: {other:?}");
                return;
            }
        };
        let release = ClientMessage::Request(Request {
            id: 2,
            op: Op::Release { ticket },
        });
        out.clear();
        codec.encode(&release, &mut out).expect("encode");
        if stream.write_all(&out).await.is_err()
            || next_message(&mut stream, &mut codec, &mut inbuf)
                .await
                .is_none()
        {
            return;
        }
        count.fetch_add(2, Ordering::Relaxed);
    }
}

async fn next_message(
    stream: &mut UnixStream,
    codec: &mut ClientCodec,
    inbuf: &mut BytesMut,
) -> Option<ServerMessage> {
    loop {
        if let Some(m) = codec.decode(inbuf).ok()? {
            return Some(m);
        }
        match stream.read_buf(inbuf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Measures, stops the workers and waits for them: a worker that does not stop within 30 s
/// means the server stopped answering.
async fn measure_and_join(
    count: &AtomicU64,
    stop: &AtomicBool,
    secs: Duration,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) -> Result<f64> {
    let rate = measure(count, stop, secs).await;
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .is_err()
        {
            bail!(
                "a worker made no progress for 30 s after the stop: the server stopped answering"
            );
        }
    }
    Ok(rate)
}

/// Lets the workers warm up for a fifth of the time, then counts for `secs`.
async fn measure(count: &AtomicU64, stop: &AtomicBool, secs: Duration) -> f64 {
    tokio::time::sleep(secs / 5).await;
    let start_count = count.load(Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(secs).await;
    let done = count.load(Ordering::Relaxed) - start_count;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    done as f64 / elapsed
}

/// The baseline server: echoes every complete frame, one write per wake-up.
fn echo_server(path: &Path) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = UnixListener::bind(path)?;
        loop {
            let (mut stream, _) = listener.accept().await?;
            tokio::spawn(async move {
                let mut inbuf = BytesMut::with_capacity(8192);
                let mut out = BytesMut::with_capacity(8192);
                loop {
                    inbuf.reserve(8192);
                    match stream.read_buf(&mut inbuf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    while inbuf.len() >= 4 {
                        let len =
                            u32::from_be_bytes([inbuf[0], inbuf[1], inbuf[2], inbuf[3]]) as usize;
                        if inbuf.len() < 4 + len {
                            break;
                        }
                        out.extend_from_slice(&inbuf[..4 + len]);
                        inbuf.advance(4 + len);
                    }
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                }
            });
        }
    })
}
