//! `--floor`: what the same traffic costs against a server that does no work.
//!
//! lockd-bench starts an echo server in its own process, on its own tokio runtime and
//! threads (as many workers as lockd's default), on a temporary Unix socket. It frames like
//! lockd (4-byte big-endian length, then the payload), reads what is there, and answers every
//! complete frame in one write per wake-up. Each request names the size of the answer it
//! wants in its first four payload bytes, so the floor's frames have the sizes of lockd's: an
//! acquire and its grant, a release and its answer, encoded by the real codec.
//!
//! The driver mirrors the raw lockd driver: `--depth` requests in flight per connection, one
//! write per wake-up. lockd's pairs/s divided by the floor's is the share of the
//! machine's Unix-socket round-trip capacity that lockd achieves.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BufMut, BytesMut};
use lockd_protocol::ticket::TICKET_LEN;
use lockd_protocol::{
    ClientCodec, Grant, Op, Reply, Response, ServerCodec, ServerMessage, Ticket, Wait,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::Encoder;

use crate::args::Settings;
use crate::workload::raw::acquire_op;
use crate::workload::{spawn_worker, Control, Which, Worker};
use crate::Failure;

/// Payload sizes of one pair's four frames, as lockd's codec encodes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub acquire: usize,
    pub granted: usize,
    pub release: usize,
    pub released: usize,
}

impl Sizes {
    /// Encodes an acquire of the longest key name a measurement with `clients` uses, its
    /// grant (a fence of typical magnitude), the release and its answer.
    pub fn of(s: &Settings, clients: usize) -> Sizes {
        let longest = s.key_count(clients).saturating_sub(1);
        let op = acquire_op(s, &s.key_name(longest), Wait::Millis(60_000));
        let ticket = Ticket::from_bytes([0xa5; TICKET_LEN]);
        let payload_len = |buf: BytesMut| buf.len() - 4;
        let client = ClientCodec::default();
        let mut server = ServerCodec::default();
        let request = |op: &Op| {
            let mut b = BytesMut::new();
            // A validated namespace (≤ 64 bytes) and a generated name: far below any frame.
            client
                .encode_request(1000, op, &mut b)
                .expect("a benchmark request fits in a frame");
            payload_len(b)
        };
        let mut response = |reply: Reply| {
            let mut b = BytesMut::new();
            let msg = ServerMessage::Response(Response {
                id: 1000,
                result: Ok(reply),
            });
            // A grant, a release answer: a few dozen bytes.
            server
                .encode(&msg, &mut b)
                .expect("a benchmark answer fits in a frame");
            payload_len(b)
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Sizes {
            acquire: request(&op),
            granted: response(Reply::Granted(Grant {
                ticket,
                fence: 1 << 30,
                mode: s.mode,
                expires_at_ms: s.lease_ms().map(|l| now_ms + l),
            })),
            release: request(&Op::Release { ticket }),
            released: response(Reply::Released),
        }
    }
}

/// The echo server: its runtime and temporary directory go away on drop.
pub struct EchoServer {
    runtime: Option<tokio::runtime::Runtime>,
    dir: PathBuf,
    pub socket: PathBuf,
}

impl EchoServer {
    pub fn start() -> Result<EchoServer, Failure> {
        let fail =
            |what: &str, e: std::io::Error| Failure::Run(format!("echo server: {what}: {e}"));
        let dir = private_temp_dir().map_err(|e| fail("temporary directory", e))?;
        let socket = dir.join("echo.sock");
        let mut server = EchoServer {
            runtime: None,
            dir,
            socket,
        };
        let listener =
            std::os::unix::net::UnixListener::bind(&server.socket).map_err(|e| fail("bind", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| fail("set_nonblocking", e))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_io()
            .thread_name("lockd-bench-echo")
            .build()
            .map_err(|e| fail("runtime", e))?;
        runtime.spawn(async move {
            let Ok(listener) = UnixListener::from_std(listener) else {
                return;
            };
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(echo(stream));
            }
        });
        server.runtime = Some(runtime);
        Ok(server)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A new directory only we can enter, under the system's temporary directory.
pub fn private_temp_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    let mut attempt = 0u32;
    loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!("lockd-bench-{}-{nanos:x}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Serves one connection: every complete frame is answered with a frame of the size its
/// first four payload bytes ask for; everything answerable is written in one write.
async fn echo(mut stream: UnixStream) {
    let mut inbuf = BytesMut::with_capacity(8192);
    let mut out = BytesMut::with_capacity(8192);
    loop {
        inbuf.reserve(8192);
        match stream.read_buf(&mut inbuf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        while inbuf.len() >= 8 {
            let len = u32::from_be_bytes([inbuf[0], inbuf[1], inbuf[2], inbuf[3]]) as usize;
            if inbuf.len() < 4 + len {
                break;
            }
            let answer = u32::from_be_bytes([inbuf[4], inbuf[5], inbuf[6], inbuf[7]]) as usize;
            out.put_u32(answer as u32);
            out.put_bytes(0, answer);
            inbuf.advance(4 + len);
        }
        if stream.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
    }
}

/// A request frame of `len` payload bytes asking for an answer of `answer` bytes.
fn request_frame(len: usize, answer: usize) -> Vec<u8> {
    let len = len.max(4);
    let mut f = Vec::with_capacity(4 + len);
    f.extend_from_slice(&(len as u32).to_be_bytes());
    f.extend_from_slice(&(answer as u32).to_be_bytes());
    f.resize(4 + len, 0);
    f
}

struct Frames {
    acquire: Vec<u8>,
    release: Vec<u8>,
}

/// Connects `clients` connections to the echo server and starts one worker on each.
pub async fn start(
    server: &EchoServer,
    sizes: Sizes,
    clients: usize,
    depth: usize,
    ctl: &Arc<Control>,
) -> Result<Vec<Worker>, Failure> {
    let frames = Arc::new(Frames {
        acquire: request_frame(sizes.acquire, sizes.granted),
        release: request_frame(sizes.release, sizes.released),
    });
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        let stream = UnixStream::connect(&server.socket)
            .await
            .map_err(|e| Failure::Run(format!("cannot connect to the echo server: {e}")))?;
        conns.push(stream);
    }
    Ok(conns
        .into_iter()
        .map(|stream| {
            let body = echo_loop(stream, depth, Arc::clone(&frames), Arc::clone(ctl));
            spawn_worker(ctl, body)
        })
        .collect())
}

/// `depth` pairs in flight: acquire-sized request, then release-sized request, again.
async fn echo_loop(
    mut stream: UnixStream,
    depth: usize,
    frames: Arc<Frames>,
    ctl: Arc<Control>,
) -> Result<(), String> {
    let mut samples = ctl.samples(Which::Acquire);
    // The requests in flight, in order (the server answers in order): acquire?, sent at.
    let mut queue: VecDeque<(bool, Instant)> = VecDeque::with_capacity(depth);
    let (mut out, mut inbuf) = (BytesMut::new(), BytesMut::with_capacity(8192));
    for _ in 0..depth {
        out.extend_from_slice(&frames.acquire);
        queue.push_back((true, Instant::now()));
    }
    loop {
        if !out.is_empty() {
            stream
                .write_all(&out)
                .await
                .map_err(|e| format!("echo server: write failed: {e}"))?;
            out.clear();
        }
        if queue.is_empty() {
            return Ok(());
        }
        match stream.read_buf(&mut inbuf).await {
            Ok(0) => return Err("the echo server closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("echo server: read failed: {e}")),
        }
        while inbuf.len() >= 4 {
            let len = u32::from_be_bytes([inbuf[0], inbuf[1], inbuf[2], inbuf[3]]) as usize;
            if inbuf.len() < 4 + len {
                break;
            }
            inbuf.advance(4 + len);
            let (acquire, sent) = queue
                .pop_front()
                .ok_or("the echo server answered more than it was asked")?;
            if acquire {
                samples.record(sent.elapsed());
                out.extend_from_slice(&frames.release);
                queue.push_back((false, Instant::now()));
            } else {
                ctl.pair_done();
                if !ctl.stopped() {
                    out.extend_from_slice(&frames.acquire);
                    queue.push_back((true, Instant::now()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn sizes_follow_the_key_and_the_lease() {
        let settings = |extra: &[&str]| {
            let mut v = vec!["lockd-bench", "--socket", "/x"];
            v.extend_from_slice(extra);
            crate::args::Args::parse_from(v).resolve()
        };
        let plain = Sizes::of(&settings(&[]), 1);
        assert!(
            plain.acquire > 20 && plain.granted > TICKET_LEN,
            "{plain:?}"
        );
        assert!(
            plain.release > TICKET_LEN && plain.released < plain.granted,
            "{plain:?}"
        );
        let many = Sizes::of(&settings(&[]), 100_000);
        assert!(many.acquire > plain.acquire, "a longer key name");
        let lease = Sizes::of(&settings(&["--lease", "30s"]), 1);
        assert!(lease.acquire > plain.acquire && lease.granted > plain.granted);
    }

    #[test]
    fn request_frames_carry_the_answer_size() {
        let f = request_frame(40, 77);
        assert_eq!(f.len(), 44);
        assert_eq!(&f[..4], &40u32.to_be_bytes());
        assert_eq!(&f[4..8], &77u32.to_be_bytes());
    }
}
