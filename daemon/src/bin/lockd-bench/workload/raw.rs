//! Pairs over hand-encoded frames (`--raw`), to measure the daemon rather than the client
//! crate: one task per connection keeps `--depth` request slots busy, encodes into one
//! reused buffer, writes everything pending in one write per wake-up, and routes answers by
//! request id (the slot's number).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use lockd_protocol::{
    Acquire, ClientCodec, ClientMessage, Event, Hello, Key, Mode, Op, Reply, Response,
    ServerMessage, Wait, PROTOCOL_VERSION,
};
use tokio::net::UnixStream;
use tokio_util::codec::{Decoder, Encoder};

use super::{slot_key, spawn_worker, Control, Rng, Which, Worker, ACQUIRE_WAIT};
use crate::args::{KeySpace, Settings};
use crate::daemon::CLIENT_NAME;
use crate::pipe::Pipe;
use crate::Failure;

/// A connection speaking frames by hand.
pub struct RawConn {
    pipe: Pipe,
    codec: ClientCodec,
}

impl RawConn {
    /// Connects and completes the handshake, within 10 s.
    pub async fn connect(path: &Path) -> Result<RawConn, Failure> {
        let handshake = async {
            let stream = UnixStream::connect(path).await.map_err(|e| {
                Failure::Unreachable(format!(
                    "cannot connect to lockd at {}: {e}; is lockd running there? \
                     (pass --socket or set LOCKD_SOCKET)",
                    path.display()
                ))
            })?;
            let mut conn = RawConn {
                pipe: Pipe::new(stream, "lockd"),
                codec: ClientCodec::default(),
            };
            let hello = ClientMessage::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                client_name: CLIENT_NAME.to_string(),
            });
            conn.codec
                .encode(&hello, &mut conn.pipe.out)
                .map_err(|e| Failure::Run(e.to_string()))?;
            conn.flush().await.map_err(Failure::Run)?;
            match conn.next().await.map_err(Failure::Run)? {
                ServerMessage::Welcome(_) => Ok(conn),
                ServerMessage::Rejected(e) => {
                    Err(Failure::Run(format!("lockd refused the connection: {e}")))
                }
                other => Err(Failure::Run(format!(
                    "unexpected answer to the handshake: {other:?}"
                ))),
            }
        };
        tokio::time::timeout(Duration::from_secs(10), handshake)
            .await
            .unwrap_or_else(|_| {
                Err(Failure::Unreachable(format!(
                    "lockd at {} did not answer the handshake within 10 s",
                    path.display()
                )))
            })
    }

    /// Appends request `id` to the pending output. The ops are the bench's own (a validated
    /// namespace, generated names, no data), so they always fit in a frame.
    pub fn push(&mut self, id: u64, op: &Op) {
        self.codec
            .encode_request(id, op, &mut self.pipe.out)
            .expect("a benchmark request fits in a frame");
    }

    /// Writes everything pending.
    pub async fn flush(&mut self) -> Result<(), String> {
        self.pipe.flush().await
    }

    /// The next message, reading as needed.
    pub async fn next(&mut self) -> Result<ServerMessage, String> {
        let codec = &mut self.codec;
        self.pipe.next(|inbuf| decode(codec, inbuf)).await
    }

    /// The next message already read, if any.
    pub fn buffered(&mut self) -> Result<Option<ServerMessage>, String> {
        decode(&mut self.codec, &mut self.pipe.inbuf)
    }
}

fn decode(codec: &mut ClientCodec, inbuf: &mut BytesMut) -> Result<Option<ServerMessage>, String> {
    codec
        .decode(inbuf)
        .map_err(|e| format!("undecodable answer from lockd: {e}"))
}

/// The acquire every raw driver sends; its key name is rewritten in place per request.
pub fn acquire_op(s: &Settings, name: &str, wait: Wait) -> Op {
    Op::Acquire(Acquire {
        key: Key {
            namespace: s.namespace.clone(),
            name: name.to_string(),
        },
        mode: s.mode,
        wait,
        lease_ms: s.lease_ms(),
        detach: s.detach,
        permits: None,
        lock_delay_ms: 0,
        data: Vec::new(),
    })
}

/// Points `op` (an acquire) at key number `k`.
fn set_key(op: &mut Op, s: &Settings, k: u64) {
    use std::fmt::Write;
    if let Op::Acquire(a) = op {
        a.key.name.clear();
        let _ = write!(a.key.name, "{}{k}", s.prefix);
    }
}

/// What a message means to the raw drivers that is not a response.
pub fn not_a_response(m: ServerMessage) -> Result<(), String> {
    match m {
        ServerMessage::Event(Event::ShuttingDown) => Err("lockd is shutting down".into()),
        ServerMessage::Event(Event::HoldLost { key, reason, .. }) => {
            Err(format!("a hold on {key} was lost: {reason}"))
        }
        ServerMessage::Rejected(e) => Err(format!("lockd closed the connection: {e}")),
        ServerMessage::Event(Event::Watch { .. }) | ServerMessage::Welcome(_) => Ok(()),
        ServerMessage::Response(r) => Err(format!("unexpected response {r:?}")),
    }
}

/// Connects `clients` raw connections, then starts one pipelined worker on each.
pub async fn start(
    s: &Arc<Settings>,
    clients: usize,
    ctl: &Arc<Control>,
) -> Result<Vec<Worker>, Failure> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(RawConn::connect(&s.socket).await?);
    }
    Ok(conns
        .into_iter()
        .enumerate()
        .map(|(c, conn)| spawn_worker(ctl, conn_loop(conn, c, Arc::clone(s), Arc::clone(ctl))))
        .collect())
}

#[derive(Clone, Copy)]
enum Slot {
    Idle,
    Acquiring { key: u64, sent: Instant },
    Releasing { key: u64 },
}

async fn conn_loop(
    mut conn: RawConn,
    c: usize,
    s: Arc<Settings>,
    ctl: Arc<Control>,
) -> Result<(), String> {
    let depth = s.depth;
    let wait_ms = u64::try_from(ACQUIRE_WAIT.as_millis()).unwrap_or(u64::MAX);
    let mut op = acquire_op(&s, "", Wait::Millis(wait_ms));
    let mut slots = vec![Slot::Idle; depth];
    let mut in_flight = 0usize;
    // Keys this connection has a request on (exclusive mode with --keys; see LocalKeys).
    let mut busy: HashSet<u64> = HashSet::new();
    let exclusive_random = matches!(s.keys, KeySpace::Random(_)) && s.mode == Mode::Exclusive;
    let mut rng = Rng::new(c as u64);
    let mut samples = ctl.samples(Which::Acquire);
    loop {
        if !ctl.stopped() {
            for (i, slot) in slots.iter_mut().enumerate() {
                if !matches!(slot, Slot::Idle) {
                    continue;
                }
                let busy = exclusive_random.then_some(&mut busy);
                let Some(key) = slot_key(&s, c, i, &mut rng, busy) else {
                    continue;
                };
                set_key(&mut op, &s, key);
                conn.push(i as u64, &op);
                *slot = Slot::Acquiring {
                    key,
                    sent: Instant::now(),
                };
                in_flight += 1;
            }
        }
        if in_flight == 0 {
            return Ok(());
        }
        conn.flush().await?;
        let mut msg = Some(conn.next().await?);
        while let Some(m) = msg {
            let ServerMessage::Response(Response { id, result }) = m else {
                not_a_response(m)?;
                msg = conn.buffered()?;
                continue;
            };
            let slot = usize::try_from(id)
                .ok()
                .and_then(|i| slots.get_mut(i))
                .ok_or_else(|| format!("answer to an unknown request {id}"))?;
            match (*slot, result) {
                (Slot::Acquiring { key, sent }, Ok(Reply::Granted(g))) => {
                    samples.record(sent.elapsed());
                    conn.push(id, &Op::Release { ticket: g.ticket });
                    *slot = Slot::Releasing { key };
                }
                (Slot::Acquiring { key, .. }, Err(e)) => {
                    ctl.refusal(Some(e.code), &format!("acquire failed: {e}"))?;
                    busy.remove(&key);
                    *slot = Slot::Idle;
                    in_flight -= 1;
                }
                (Slot::Releasing { key }, Ok(Reply::Released)) => {
                    ctl.pair_done();
                    busy.remove(&key);
                    *slot = Slot::Idle;
                    in_flight -= 1;
                }
                (Slot::Releasing { .. }, Err(e)) => return Err(format!("release failed: {e}")),
                (_, other) => return Err(format!("unexpected answer to request {id}: {other:?}")),
            }
            msg = conn.buffered()?;
        }
    }
}
