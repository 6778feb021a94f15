//! One Unix-socket connection of a driver that encodes by hand (raw lockd frames, RESP): what
//! is pending goes out in one write; answers are cut off the front of the input buffer by the
//! protocol's decoder.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub struct Pipe {
    stream: UnixStream,
    /// Who answers, for messages: "lockd", "Redis".
    peer: &'static str,
    pub inbuf: BytesMut,
    pub out: BytesMut,
}

impl Pipe {
    pub fn new(stream: UnixStream, peer: &'static str) -> Pipe {
        Pipe {
            stream,
            peer,
            inbuf: BytesMut::with_capacity(8192),
            out: BytesMut::with_capacity(8192),
        }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Writes everything pending.
    pub async fn flush(&mut self) -> Result<(), String> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.stream
            .write_all(&self.out)
            .await
            .map_err(|e| format!("write to {} failed: {e}", self.peer))?;
        self.out.clear();
        Ok(())
    }

    /// The next answer `decode` finds in the input, reading as needed.
    pub async fn next<T>(
        &mut self,
        mut decode: impl FnMut(&mut BytesMut) -> Result<Option<T>, String>,
    ) -> Result<T, String> {
        loop {
            if let Some(m) = decode(&mut self.inbuf)? {
                return Ok(m);
            }
            match self.stream.read_buf(&mut self.inbuf).await {
                Ok(0) => return Err(format!("{} closed the connection", self.peer)),
                Ok(_) => {}
                Err(e) => return Err(format!("read from {} failed: {e}", self.peer)),
            }
        }
    }
}
