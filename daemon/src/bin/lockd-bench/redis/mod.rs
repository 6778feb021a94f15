//! `--redis PATH`: Redis over its Unix socket, as the baseline a lock service is compared with.
//! A lock is `SET key token NX PX ms`; its release is a compare-and-delete script run with
//! `EVALSHA` (loaded once with `SCRIPT LOAD`), the usual single-instance Redis lock.
//!
//! `resp` encodes commands and decodes replies; [`RedisConn`] is one connection with the same
//! shape as the raw lockd driver's (everything pending in one write, replies in order).

pub mod resp;

use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::UnixStream;

use self::resp::Reply;
use crate::daemon::{peer_pid, Daemon};
use crate::pipe::Pipe;
use crate::workload::Rng;
use crate::Failure;

/// Deletes the key only if it still holds the caller's token: 1 released, 0 not (expired, or
/// another holder's).
pub const RELEASE_SCRIPT: &str = "if redis.call('get',KEYS[1])==ARGV[1] then \
     return redis.call('del',KEYS[1]) else return 0 end";

/// Length of a lock's token in bytes (hex digits of 128 random bits).
pub const TOKEN_LEN: usize = 32;

/// One connection speaking RESP.
pub struct RedisConn {
    pipe: Pipe,
}

impl RedisConn {
    /// Connects within 10 s.
    pub async fn connect(path: &Path) -> Result<RedisConn, Failure> {
        let connect = UnixStream::connect(path);
        let stream = match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return Err(Failure::Unreachable(format!(
                    "cannot connect to Redis at {}: {e}; is redis-server listening there \
                     (unixsocket)?",
                    path.display()
                )))
            }
            Err(_) => {
                return Err(Failure::Unreachable(format!(
                    "Redis at {} did not accept the connection within 10 s",
                    path.display()
                )))
            }
        };
        Ok(RedisConn {
            pipe: Pipe::new(stream, "Redis"),
        })
    }

    /// Appends a command to the pending output.
    pub fn push(&mut self, args: &[&[u8]]) {
        resp::encode(args, &mut self.pipe.out);
    }

    /// Appends the lock: `SET name token NX PX px`.
    pub fn push_lock(&mut self, name: &str, token: &[u8], px: &str) {
        self.push(&[b"SET", name.as_bytes(), token, b"NX", b"PX", px.as_bytes()]);
    }

    /// Appends the release: `EVALSHA sha 1 name token` of [`RELEASE_SCRIPT`].
    pub fn push_unlock(&mut self, sha: &str, name: &str, token: &[u8]) {
        self.push(&[b"EVALSHA", sha.as_bytes(), b"1", name.as_bytes(), token]);
    }

    /// Writes everything pending.
    pub async fn flush(&mut self) -> Result<(), String> {
        self.pipe.flush().await
    }

    /// The next reply, reading as needed.
    pub async fn next(&mut self) -> Result<Reply, String> {
        self.pipe.next(decode).await
    }

    /// The next reply already read, if any.
    pub fn buffered(&mut self) -> Result<Option<Reply>, String> {
        decode(&mut self.pipe.inbuf)
    }

    /// Sends one command and waits (at most 10 s) for its reply; an error reply is `Err`.
    pub async fn call(&mut self, args: &[&[u8]]) -> Result<Reply, String> {
        self.push(args);
        let round_trip = async {
            self.flush().await?;
            self.next().await
        };
        let what = String::from_utf8_lossy(args.first().copied().unwrap_or_default());
        match tokio::time::timeout(Duration::from_secs(10), round_trip).await {
            Ok(Ok(Reply::Error(e))) => Err(format!("Redis refused {what}: {e:?}")),
            Ok(reply) => reply,
            Err(_) => Err(format!("Redis did not answer {what} within 10 s")),
        }
    }
}

/// What the first connection learnt: the server (version, pid) and the release script's SHA1.
pub struct Server {
    pub daemon: Daemon,
    pub release_sha: String,
}

impl Server {
    /// Connects once: checks Redis answers, learns its version and pid, loads the script.
    pub async fn probe(path: &Path) -> Result<Server, Failure> {
        let mut conn = RedisConn::connect(path).await?;
        let unreachable = |e: String| Failure::Unreachable(format!("{}: {e}", path.display()));
        conn.call(&[b"PING"]).await.map_err(unreachable)?;
        let info = match conn
            .call(&[b"INFO", b"server"])
            .await
            .map_err(Failure::Run)?
        {
            Reply::Bulk(Some(text)) => String::from_utf8_lossy(&text).into_owned(),
            other => return Err(Failure::Run(format!("INFO answered {}", other.describe()))),
        };
        let version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map_or_else(|| "?".to_string(), |v| v.trim().escape_debug().to_string());
        let load = [&b"SCRIPT"[..], b"LOAD", RELEASE_SCRIPT.as_bytes()];
        let release_sha = match conn.call(&load).await.map_err(Failure::Run)? {
            Reply::Bulk(Some(sha)) if sha.len() == 40 && sha.iter().all(u8::is_ascii_hexdigit) => {
                String::from_utf8_lossy(&sha).into_owned()
            }
            other => {
                return Err(Failure::Run(format!(
                    "SCRIPT LOAD answered {}",
                    other.describe()
                )))
            }
        };
        let pid = peer_pid(std::os::fd::AsFd::as_fd(conn.pipe.stream()))
            .ok()
            .flatten();
        Ok(Server {
            daemon: Daemon {
                server_version: version,
                pid,
            },
            release_sha,
        })
    }
}

fn decode(inbuf: &mut BytesMut) -> Result<Option<Reply>, String> {
    resp::decode(inbuf).map_err(|e| format!("undecodable reply from Redis: {e}"))
}

/// A fresh random token (128 bits as 32 hex digits); never printed.
pub fn token(rng: &mut Rng) -> [u8; TOKEN_LEN] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [0u8; TOKEN_LEN];
    let bits = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
    for (i, c) in t.iter_mut().enumerate() {
        *c = HEX[((bits >> (4 * i)) & 0xf) as usize];
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_hex_and_differ() {
        let mut rng = Rng::new(3);
        let (a, b) = (token(&mut rng), token(&mut rng));
        assert_ne!(a, b);
        assert!(a.iter().all(u8::is_ascii_hexdigit));
    }
}
