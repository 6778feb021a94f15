//! A raw protocol connection, for tests that must send what the client crate never would.

use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use lockd_protocol::{
    ClientCodec, ClientMessage, Hello, Op, Request, ServerMessage, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::codec::{Decoder, Encoder};

/// A socket speaking frames by hand.
pub struct RawConn {
    pub stream: UnixStream,
    codec: ClientCodec,
    buf: BytesMut,
}

impl RawConn {
    /// Connects without a handshake.
    pub async fn connect(path: &Path) -> RawConn {
        let stream = UnixStream::connect(path).await.expect("raw connect");
        RawConn {
            stream,
            codec: ClientCodec::default(),
            buf: BytesMut::new(),
        }
    }

    /// Connects and completes the handshake.
    pub async fn connect_hello(path: &Path) -> RawConn {
        let mut c = RawConn::connect(path).await;
        c.send(ClientMessage::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            client_name: "raw-test".into(),
        }))
        .await;
        match c.recv(Duration::from_secs(5)).await {
            Some(ServerMessage::Welcome(_)) => c,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    pub async fn send(&mut self, msg: ClientMessage) {
        let mut out = BytesMut::new();
        self.codec.encode(msg, &mut out).expect("encode");
        self.stream.write_all(&out).await.expect("write");
    }

    pub async fn request(&mut self, id: u64, op: Op) {
        self.send(ClientMessage::Request(Request { id, op })).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // The daemon may already have closed; that is fine for hostile-input tests.
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next message, or `None` on EOF, error or timeout.
    pub async fn recv(&mut self, within: Duration) -> Option<ServerMessage> {
        let read = async {
            loop {
                match self.codec.decode(&mut self.buf) {
                    Ok(Some(m)) => return Some(m),
                    Ok(None) => {}
                    Err(_) => return None,
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(within, read).await.ok().flatten()
    }

    /// True if the daemon closes the connection within `within` (after any pending messages).
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut scratch = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut scratch)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// What [`RawConn::next`] saw.
#[derive(Debug)]
pub enum Next {
    /// A complete message.
    Msg(ServerMessage),
    /// End of stream or a socket error (such as ECONNRESET): the daemon closed the connection.
    Closed,
    /// Bytes that do not decode as a message, or a frame above the codec's limit.
    Undecodable(String),
    /// Nothing complete arrived within the time allowed.
    TimedOut,
}

impl RawConn {
    /// Connects and completes the handshake, announcing `client_name`.
    pub async fn connect_hello_as(path: &Path, client_name: &str) -> RawConn {
        let mut c = RawConn::connect(path).await;
        c.send(ClientMessage::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            client_name: client_name.into(),
        }))
        .await;
        match c.recv(Duration::from_secs(5)).await {
            Some(ServerMessage::Welcome(_)) => c,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// Sends every message of `msgs` in ONE write (pipelined frames).
    pub async fn send_all(&mut self, msgs: impl IntoIterator<Item = ClientMessage>) {
        let mut out = BytesMut::new();
        for msg in msgs {
            self.codec.encode(msg, &mut out).expect("encode");
        }
        self.stream.write_all(&out).await.expect("write");
    }

    /// The next message, telling a closed connection, a bad frame and a timeout apart.
    pub async fn next(&mut self, within: Duration) -> Next {
        let read = async {
            loop {
                match self.codec.decode(&mut self.buf) {
                    Ok(Some(m)) => return Next::Msg(m),
                    Ok(None) => {}
                    Err(e) => return Next::Undecodable(e.to_string()),
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return Next::Closed,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(within, read)
            .await
            .unwrap_or(Next::TimedOut)
    }
}

impl RawConn {
    /// Shuts down the reading half (`shutdown(SHUT_RD)`): from now on every write of the daemon
    /// to this connection fails (EPIPE), so nothing it answers can ever be delivered.
    pub fn shutdown_read(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: shutdown on a socket this connection owns; no memory is involved.
        let rc = unsafe { libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_RD) };
        assert_eq!(
            rc,
            0,
            "shutdown(SHUT_RD): {}",
            std::io::Error::last_os_error()
        );
    }
}
