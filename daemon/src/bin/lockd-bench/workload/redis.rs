//! Redis as the measured server (`--redis`): pairs of `SET key token NX PX ms` + `EVALSHA`
//! of the compare-and-delete script, driven like the raw lockd driver (one task per
//! connection, `--depth` request slots, everything pending in one write per wake-up), and
//! `--hold-many`: Redis's memory holding N such keys.
//!
//! Redis has no queue: a `SET NX` on a taken key (only with `--keys`) answers nil at once; it
//! is counted as a conflict and the slot tries again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockd_protocol::ErrorCode;

use super::hold_many::{HoldMany, RssTimeline};
use super::{slot_key, spawn_worker, Control, Rng, Which, Worker};
use crate::args::Settings;
use crate::redis::resp::Reply;
use crate::redis::{token, RedisConn, Server, TOKEN_LEN};
use crate::report::Progress;
use crate::Failure;

/// The lock's expiry when `--lease` is not given, as in the usual `SET ... PX 30000`.
const DEFAULT_PX_MS: u64 = 30_000;

/// The `PX` argument: the lease in milliseconds.
fn px(s: &Settings) -> String {
    s.lease_ms().unwrap_or(DEFAULT_PX_MS).to_string()
}

/// Connects `clients` connections, then starts one pipelined worker on each.
pub async fn start(
    s: &Arc<Settings>,
    clients: usize,
    server: &Server,
    ctl: &Arc<Control>,
) -> Result<Vec<Worker>, Failure> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(RedisConn::connect(&s.socket).await?);
    }
    let sha: Arc<str> = Arc::from(server.release_sha.as_str());
    Ok(conns
        .into_iter()
        .enumerate()
        .map(|(c, conn)| {
            let body = conn_loop(conn, c, Arc::clone(s), Arc::clone(ctl), Arc::clone(&sha));
            spawn_worker(ctl, body)
        })
        .collect())
}

/// A command in flight, in the order Redis answers, with the request slot it is for.
enum InFlight {
    Set {
        slot: usize,
        key: u64,
        token: [u8; TOKEN_LEN],
        sent: Instant,
    },
    Del {
        slot: usize,
        key: u64,
    },
}

async fn conn_loop(
    mut conn: RedisConn,
    c: usize,
    s: Arc<Settings>,
    ctl: Arc<Control>,
    sha: Arc<str>,
) -> Result<(), String> {
    let px = px(&s);
    let mut idle: Vec<usize> = (0..s.depth).rev().collect();
    let mut pending: VecDeque<InFlight> = VecDeque::with_capacity(s.depth);
    let mut rng = Rng::new(c as u64);
    let mut samples = ctl.samples(Which::Acquire);
    loop {
        while !ctl.stopped() {
            let Some(slot) = idle.pop() else {
                break;
            };
            // Without busy keys to avoid, there always is a key.
            let key = slot_key(&s, c, slot, &mut rng, None).unwrap_or_default();
            let token = token(&mut rng);
            conn.push_lock(&s.key_name(key), &token, &px);
            let sent = Instant::now();
            pending.push_back(InFlight::Set {
                slot,
                key,
                token,
                sent,
            });
        }
        if pending.is_empty() {
            return Ok(());
        }
        conn.flush().await?;
        let mut reply = Some(conn.next().await?);
        while let Some(r) = reply {
            let command = pending
                .pop_front()
                .ok_or("Redis answered more than it was asked")?;
            match (command, r) {
                (
                    InFlight::Set {
                        slot,
                        key,
                        token,
                        sent,
                    },
                    Reply::Simple(ok),
                ) if ok == "OK" => {
                    samples.record(sent.elapsed());
                    conn.push_unlock(&sha, &s.key_name(key), &token);
                    pending.push_back(InFlight::Del { slot, key });
                }
                (InFlight::Set { slot, .. }, Reply::Bulk(None)) => {
                    ctl.refusal(Some(ErrorCode::Conflict), "")?;
                    idle.push(slot);
                }
                (InFlight::Del { slot, .. }, Reply::Int(1)) => {
                    ctl.pair_done();
                    idle.push(slot);
                }
                (InFlight::Del { key, .. }, Reply::Int(0)) => {
                    return Err(format!(
                        "the lock on {} was gone before its release (expired? raise --lease)",
                        s.key_name(key)
                    ))
                }
                (_, other) => return Err(format!("unexpected reply {}", other.describe())),
            }
            reply = conn.buffered()?;
        }
    }
}

/// Sends `count` commands, the `i`th appended by `command(i, conn)`, with at most `window`
/// unanswered, and hands each reply to `check(i, reply)`.
async fn pipelined(
    conn: &mut RedisConn,
    count: usize,
    window: usize,
    mut command: impl FnMut(usize, &mut RedisConn),
    mut check: impl FnMut(usize, Reply) -> Result<(), String>,
) -> Result<(), String> {
    let (mut sent, mut answered) = (0, 0);
    while answered < count {
        while sent < count && sent - answered < window {
            command(sent, conn);
            sent += 1;
        }
        conn.flush().await?;
        let mut reply = Some(conn.next().await?);
        while let Some(r) = reply {
            check(answered, r)?;
            answered += 1;
            reply = if answered < sent {
                conn.buffered()?
            } else {
                None
            };
        }
    }
    Ok(())
}

/// One connection's share of `--hold-many`: keys `from..from + tokens.len()`.
struct Share {
    conn: RedisConn,
    from: u64,
    tokens: Vec<[u8; TOKEN_LEN]>,
}

/// What [`each_key`] does to every key of a share.
enum Phase {
    /// `SET NX PX` with a fresh token; counts in `held`.
    Take { px: String, held: Arc<AtomicU64> },
    /// The compare-and-delete script.
    GiveBack { sha: Arc<str> },
}

/// Takes or gives back every key of the share, `--depth` commands in flight.
async fn each_key(mut share: Share, s: Arc<Settings>, phase: Phase) -> Result<Share, String> {
    if let Phase::Take { .. } = phase {
        let mut rng = Rng::new(share.from);
        share.tokens.iter_mut().for_each(|t| *t = token(&mut rng));
    }
    let Share { conn, from, tokens } = &mut share;
    let name = |i: usize| format!("{}hold-{}", s.prefix, *from + i as u64);
    let command = |i: usize, conn: &mut RedisConn| match &phase {
        Phase::Take { px, .. } => conn.push_lock(&name(i), &tokens[i], px),
        Phase::GiveBack { sha } => conn.push_unlock(sha, &name(i), &tokens[i]),
    };
    let check = |i: usize, reply: Reply| match (&phase, reply) {
        (Phase::Take { held, .. }, Reply::Simple(ok)) if ok == "OK" => {
            held.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        (Phase::GiveBack { .. }, Reply::Int(1)) => Ok(()),
        (Phase::Take { .. }, other) => {
            Err(format!("SET {} answered {}", name(i), other.describe()))
        }
        (Phase::GiveBack { .. }, other) => Err(format!(
            "releasing {} answered {} (expired before the release? raise --lease)",
            name(i),
            other.describe()
        )),
    };
    pipelined(conn, tokens.len(), s.depth, command, check).await?;
    Ok(share)
}

/// Waits for every task (polling a progress line), at most `limit` in all.
async fn join_all<T>(
    tasks: Vec<tokio::task::JoinHandle<Result<T, String>>>,
    limit: Duration,
    progress: &Progress,
    status: &dyn Fn() -> String,
) -> Result<Vec<T>, Failure> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut done = Vec::with_capacity(tasks.len());
    for mut task in tasks {
        loop {
            progress.show(&status());
            let tick = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
            match tokio::time::timeout_at(tick, &mut task).await {
                Ok(joined) => {
                    let r = joined.map_err(|e| Failure::Run(format!("a worker failed: {e}")))?;
                    done.push(r.map_err(Failure::Run)?);
                    break;
                }
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    task.abort();
                    return Err(Failure::Run(format!(
                        "{} after {limit:?}: Redis stopped answering",
                        status()
                    )));
                }
                Err(_) => {}
            }
        }
    }
    Ok(done)
}

/// `--hold-many N` against Redis: N keys set over `clients` connections, Redis's RSS.
pub async fn hold_many(
    s: &Arc<Settings>,
    n: u64,
    clients: usize,
    server: &Server,
    progress: &Progress,
) -> Result<HoldMany, Failure> {
    let daemon = &server.daemon;
    let limit = Duration::from_secs(600);
    let mut rss = RssTimeline::idle(daemon);
    let mut shares = Vec::with_capacity(clients);
    let mut from = 0u64;
    for c in 0..clients {
        progress.show(&format!("hold-many: connecting {c}/{clients}"));
        let count = n / clients as u64 + u64::from((c as u64) < n % clients as u64);
        shares.push(Share {
            conn: RedisConn::connect(&s.socket).await?,
            from,
            tokens: vec![[0; TOKEN_LEN]; count as usize],
        });
        from += count;
    }
    rss.connected();

    let held = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks = shares
        .into_iter()
        .map(|sh| {
            let take = Phase::Take {
                px: px(s),
                held: Arc::clone(&held),
            };
            tokio::spawn(each_key(sh, Arc::clone(s), take))
        })
        .collect();
    let status = || {
        format!(
            "hold-many: {} of {n} keys set",
            held.load(Ordering::Relaxed)
        )
    };
    let shares = join_all(tasks, limit, progress, &status).await?;
    let acquire_secs = started.elapsed().as_secs_f64();
    rss.holding();

    let started = Instant::now();
    let sha: Arc<str> = Arc::from(server.release_sha.as_str());
    let tasks = shares
        .into_iter()
        .map(|sh| {
            let give_back = Phase::GiveBack {
                sha: Arc::clone(&sha),
            };
            tokio::spawn(each_key(sh, Arc::clone(s), give_back))
        })
        .collect();
    let status = || format!("hold-many: releasing {n} keys");
    join_all(tasks, limit, progress, &status).await?;
    let release_secs = started.elapsed().as_secs_f64();
    let times = (acquire_secs, release_secs);
    Ok(rss.finish(s, (n, clients), times, progress).await)
}
