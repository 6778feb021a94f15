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
