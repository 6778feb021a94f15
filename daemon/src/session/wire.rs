//! A connection's socket with its buffers and codec: reading frames, queueing answers, and
//! writing them with a bound on how long the peer may refuse to read.

use std::time::Duration;

use bytes::BytesMut;
use lockd_protocol::{ClientMessage, ErrorCode, Hello, ServerCodec, ServerMessage, WireError};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio_util::codec::{Decoder, Encoder};

use crate::config::DEFAULT_WRITE_TIMEOUT;

/// Read buffer growth step, bytes.
const READ_CHUNK: usize = 8 * 1024;
/// Stop handling requests (and taking pushes) while this many bytes of answers wait to be
/// written.
pub const OUT_CAP: usize = 256 * 1024;
/// Output buffers larger than this are freed after a flush, bytes.
const OUT_KEEP: usize = 64 * 1024;

/// The socket with its buffers and codec.
pub struct Wire {
    stream: UnixStream,
    pub codec: ServerCodec,
    pub inbuf: BytesMut,
    pub out: BytesMut,
    /// Bytes written to the socket since the connection began.
    written: u64,
}

impl Wire {
    pub fn new(stream: UnixStream, max_frame: usize) -> Wire {
        Wire {
            stream,
            codec: ServerCodec::new(max_frame),
            inbuf: BytesMut::with_capacity(READ_CHUNK),
            out: BytesMut::with_capacity(READ_CHUNK),
            written: 0,
        }
    }

    /// Bytes written to the socket since the connection began.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Where the output queued so far ends, counted as [`Wire::written`] counts: a message
    /// queued before this call has reached the socket once `written()` is at least this.
    pub fn queued_end(&self) -> u64 {
        self.written + self.out.len() as u64
    }

    /// Reads the first message, which must be `Hello`, within `limit`. Bytes after it (frames
    /// the client pipelined behind its Hello) stay in the read buffer for the session.
    ///
    /// # Errors
    /// Why the handshake failed; the peer was told (`Rejected(Protocol)`).
    pub async fn handshake(&mut self, limit: Duration) -> Result<Hello, String> {
        let read = async {
            loop {
                match self.codec.decode(&mut self.inbuf) {
                    Ok(Some(ClientMessage::Hello(hello))) => return Ok(hello),
                    Ok(Some(ClientMessage::Request(_))) => {
                        return Err("the first message must be Hello".to_string())
                    }
                    Ok(None) => {}
                    Err(e) => return Err(e.to_string()),
                }
                match self.read_more().await {
                    Ok(0) => return Err("closed before Hello".into()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        let result = match tokio::time::timeout(limit, read).await {
            Ok(r) => r,
            Err(_) => Err(format!("no Hello within {limit:?}")),
        };
        if let Err(why) = &result {
            self.send(ServerMessage::Rejected(WireError::new(
                ErrorCode::Protocol,
                why,
            )));
            let _ = self.flush().await;
        }
        result
    }

    /// Reads whatever is available into the read buffer; 0 at end of stream.
    pub async fn read_more(&mut self) -> std::io::Result<usize> {
        self.inbuf.reserve(READ_CHUNK);
        self.stream.read_buf(&mut self.inbuf).await
    }

    /// Queues a message for the next flush.
    pub fn send(&mut self, msg: ServerMessage) {
        if let Err(e) = self.codec.encode(msg, &mut self.out) {
            tracing::error!("cannot encode a message: {e}");
        }
    }

    /// Writes the output buffer within the default write timeout.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        self.flush_within(DEFAULT_WRITE_TIMEOUT).await
    }

    /// Writes the output buffer; fails with `TimedOut` if the peer does not take it within
    /// `limit` (it is not reading its responses). Whatever was written counts in
    /// [`Wire::written`], also on failure.
    pub async fn flush_within(&mut self, limit: Duration) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        // Fast path: the socket takes everything now, and no timer is armed.
        let mut done = 0;
        let mut r = self.write_ready(&mut done);
        if r.is_ok() && done < self.out.len() {
            let deadline = tokio::time::Instant::now() + limit;
            while r.is_ok() && done < self.out.len() {
                r = match tokio::time::timeout_at(deadline, self.stream.writable()).await {
                    Ok(Ok(())) => self.write_ready(&mut done),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client does not read its responses",
                    )),
                };
            }
        }
        self.written += done as u64;
        if self.out.capacity() > OUT_KEEP {
            self.out = BytesMut::with_capacity(READ_CHUNK);
        } else {
            self.out.clear();
        }
        r
    }

    /// Writes from `out[*done..]` while the socket takes bytes without blocking.
    fn write_ready(&mut self, done: &mut usize) -> std::io::Result<()> {
        while *done < self.out.len() {
            match self.stream.try_write(&self.out[*done..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => *done += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
