//! The framed bincode codec: the only code that knows the payload encoding.
//!
//! Frames are a 4-byte big-endian length and a bincode 2 payload. Decoding goes through
//! tokio-util's `LengthDelimitedCodec` (which refuses oversized length prefixes before
//! buffering them); encoding writes the same framing in place, so sending a message costs no
//! intermediate buffer. A payload is decoded under a bincode limit sized to that payload, so a
//! claimed length can never make the decoder allocate much more than the bytes received.

use std::io;
use std::marker::PhantomData;

use bincode::config::{BigEndian, Configuration, Limit, Varint};
use bytes::{BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec, LengthDelimitedCodecError};

use crate::{ClientMessage, Op, RequestId, ServerMessage};

/// Default largest frame payload, in bytes (64 KiB).
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;
/// Hard ceiling for any configured frame size and the bincode decode limit, in bytes (1 MiB).
pub const MAX_FRAME_CEILING: usize = 1024 * 1024;

const LEN_BYTES: usize = 4;

/// Most bytes bincode counts against its limit per payload byte of a valid message: it counts
/// a varint at its in-memory size, so a `u64` (or a length) sent as one byte counts as eight.
const LIMIT_PER_PAYLOAD_BYTE: usize = 8;

type Config<const LIMIT: usize> = Configuration<BigEndian, Varint, Limit<LIMIT>>;

fn config<const LIMIT: usize>() -> Config<LIMIT> {
    bincode::config::standard()
        .with_big_endian()
        .with_limit::<LIMIT>()
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("undecodable frame: {0}")]
    Decode(String),
    #[error("message cannot be encoded: {0}")]
    Encode(String),
}

impl CodecError {
    /// True when the peer sent something that is not a valid frame (as opposed to an I/O error).
    pub fn is_protocol(&self) -> bool {
        !matches!(self, CodecError::Io(_))
    }
}

/// Decodes `In` frames and encodes `Out` frames.
#[derive(Debug, Clone)]
pub struct FrameCodec<In, Out> {
    framing: LengthDelimitedCodec,
    max_frame: usize,
    _types: PhantomData<fn(Out) -> In>,
}

/// The daemon's side: reads [`ClientMessage`], writes [`ServerMessage`].
pub type ServerCodec = FrameCodec<ClientMessage, ServerMessage>;
/// The client's side: reads [`ServerMessage`], writes [`ClientMessage`].
pub type ClientCodec = FrameCodec<ServerMessage, ClientMessage>;

impl<In, Out> FrameCodec<In, Out> {
    /// A codec refusing frames larger than `max_frame` bytes (clamped to [`MAX_FRAME_CEILING`]).
    pub fn new(max_frame: usize) -> Self {
        let max_frame = max_frame.clamp(16, MAX_FRAME_CEILING);
        let framing = LengthDelimitedCodec::builder()
            .length_field_length(LEN_BYTES)
            .big_endian()
            .max_frame_length(max_frame)
            .new_codec();
        FrameCodec {
            framing,
            max_frame,
            _types: PhantomData,
        }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl<In: DeserializeOwned, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        let frame = match self.framing.decode(src) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(None),
            Err(e) => return Err(self.framing_error(e, src)),
        };
        decode_payload(&frame).map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None if src.is_empty() => Ok(None),
            None => Err(CodecError::Decode(format!(
                "connection closed inside a frame ({} bytes buffered)",
                src.len()
            ))),
        }
    }
}

impl<In, Out> FrameCodec<In, Out> {
    fn framing_error(&self, e: io::Error, src: &BytesMut) -> CodecError {
        if e.get_ref()
            .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>())
        {
            let len = src
                .get(..LEN_BYTES)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .unwrap_or(0);
            CodecError::FrameTooLarge {
                len,
                max: self.max_frame,
            }
        } else {
            CodecError::Io(e)
        }
    }
}

/// Decodes `payload` under the first listed limit that is at least `need`, else under
/// [`MAX_FRAME_CEILING`]. bincode's limit is a const generic, hence one branch per tier.
macro_rules! decode_under_smallest_limit {
    ($payload:expr, $need:expr; $($tier:expr),+ $(,)?) => {{
        let (payload, need): (&[u8], usize) = ($payload, $need);
        $(
            if need <= $tier {
                bincode::serde::decode_from_slice(payload, config::<{ $tier }>())
            } else
        )+ {
            bincode::serde::decode_from_slice(payload, config::<MAX_FRAME_CEILING>())
        }
    }};
}

/// Decodes one payload, refusing trailing bytes.
///
/// bincode checks every claimed length against its limit before allocating for it, so the
/// limit is sized to this payload: the smallest power of two (at least 256 bytes) holding
/// [`LIMIT_PER_PAYLOAD_BYTE`] times its length, which every valid payload fits, capped at
/// [`MAX_FRAME_CEILING`]. A string claiming more than about 16 times the bytes received is
/// therefore refused before anything is allocated for it.
fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let need = payload.len().saturating_mul(LIMIT_PER_PAYLOAD_BYTE);
    let (value, used) = decode_under_smallest_limit!(
        payload, need;
        1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12, 1 << 13,
        1 << 14, 1 << 15, 1 << 16, 1 << 17, 1 << 18, 1 << 19,
    )
    .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::Decode(format!(
            "{} trailing bytes after the message",
            payload.len() - used
        )));
    }
    Ok(value)
}

impl<In, Out: Serialize> Encoder<&Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: &Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_frame(item, dst, self.max_frame)
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_frame(&item, dst, self.max_frame)
    }
}

/// Appends one frame holding `item` to `dst`, without an intermediate buffer.
///
/// # Errors
/// [`CodecError::FrameTooLarge`] if the payload exceeds `max_frame` (nothing is appended).
pub fn encode_frame<T: Serialize>(
    item: &T,
    dst: &mut BytesMut,
    max_frame: usize,
) -> Result<(), CodecError> {
    let start = dst.len();
    dst.put_u32(0);
    let mut writer = dst.writer();
    let written =
        bincode::serde::encode_into_std_write(item, &mut writer, config::<MAX_FRAME_CEILING>());
    let dst = writer.into_inner();
    let len = match written {
        Ok(len) => len,
        Err(e) => {
            dst.truncate(start);
            return Err(CodecError::Encode(e.to_string()));
        }
    };
    if len > max_frame {
        dst.truncate(start);
        return Err(CodecError::FrameTooLarge {
            len,
            max: max_frame,
        });
    }
    // len <= max_frame <= MAX_FRAME_CEILING, so it fits in u32.
    dst[start..start + LEN_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

impl<In> FrameCodec<In, ClientMessage> {
    /// Appends the frame of `ClientMessage::Request(Request { id, op })` without taking `op`,
    /// so a caller keeps its request (and its key) after sending it.
    ///
    /// # Errors
    /// As [`encode_frame`].
    pub fn encode_request(
        &self,
        id: RequestId,
        op: &Op,
        dst: &mut BytesMut,
    ) -> Result<(), CodecError> {
        encode_frame(
            &ClientMessageRef::Request(RequestRef { id, op }),
            dst,
            self.max_frame,
        )
    }
}

/// [`ClientMessage`] by reference: serializes to the same bytes (same variants, same order).
#[derive(Serialize)]
enum ClientMessageRef<'a> {
    #[allow(dead_code)] // only here to keep the variant index of `Request`
    Hello(&'a crate::Hello),
    Request(RequestRef<'a>),
}

/// [`Request`] by reference (same fields, same order).
#[derive(Serialize)]
struct RequestRef<'a> {
    id: RequestId,
    op: &'a Op,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use proptest::prelude::*;

    fn key() -> Key {
        Key::new("default", "job").unwrap()
    }

    #[test]
    fn a_request_by_reference_encodes_to_the_same_bytes() {
        let codec = ClientCodec::default();
        for msg in client_messages() {
            let ClientMessage::Request(req) = &msg else {
                continue;
            };
            let (mut owned, mut borrowed) = (BytesMut::new(), BytesMut::new());
            ClientCodec::default().encode(&msg, &mut owned).unwrap();
            codec
                .encode_request(req.id, &req.op, &mut borrowed)
                .unwrap();
            assert_eq!(owned, borrowed, "{msg:?}");
        }
    }

    fn client_messages() -> Vec<ClientMessage> {
        let ticket = Ticket::generate().unwrap();
        let mut v = vec![ClientMessage::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            client_name: "test".into(),
        })];
        let ops = [
            Op::Acquire(Acquire {
                key: key(),
                mode: Mode::Shared,
                wait: Wait::Millis(1500),
                lease_ms: Some(30_000),
                detach: true,
                permits: None,
                lock_delay_ms: 0,
                data: b"leader at 10.0.0.1".to_vec(),
            }),
            Op::Acquire(Acquire {
                key: key(),
                mode: Mode::Exclusive,
                wait: Wait::Forever,
                lease_ms: None,
                detach: false,
                permits: None,
                lock_delay_ms: 0,
                data: vec![],
            }),
            Op::Acquire(Acquire {
                key: key(),
                mode: Mode::Exclusive,
                wait: Wait::No,
                lease_ms: None,
                detach: false,
                permits: None,
                lock_delay_ms: 0,
                data: vec![],
            }),
            Op::Release { ticket },
            Op::Cancel { request: 7 },
            Op::Ping,
            Op::Renew {
                ticket,
                lease_ms: Some(5000),
            },
        ];
        for (i, op) in ops.into_iter().enumerate() {
            v.push(ClientMessage::Request(Request { id: i as u64, op }));
        }
        v
    }

    fn server_messages() -> Vec<ServerMessage> {
        let mut v = vec![
            ServerMessage::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                server_version: "0.1.0".into(),
                limits: Limits {
                    max_frame: 65536,
                    max_data: 1024,
                    max_lease_ms: 86_400_000,
                },
            }),
            ServerMessage::Rejected(WireError::new(ErrorCode::VersionMismatch, "v2 please")),
            ServerMessage::Event(Event::ShuttingDown),
            ServerMessage::Event(Event::HoldLost {
                key: key(),
                fence: 9,
                reason: LostReason::Expired,
            }),
        ];
        let replies = [
            Ok(Reply::Granted(Grant {
                ticket: Ticket::generate().unwrap(),
                fence: u64::MAX,
                mode: Mode::Exclusive,
                expires_at_ms: Some(1),
            })),
            Ok(Reply::Released),
            Ok(Reply::Cancelled(true)),
            Ok(Reply::Pong),
            Ok(Reply::Renewed { expires_at_ms: 99 }),
        ];
        for (i, result) in replies.into_iter().enumerate() {
            v.push(ServerMessage::Response(Response {
                id: i as u64,
                result,
            }));
        }
        for (i, code) in [
            ErrorCode::Conflict,
            ErrorCode::Timeout,
            ErrorCode::NotHolder,
            ErrorCode::Deadlock,
            ErrorCode::PermissionDenied,
            ErrorCode::InvalidArgument,
            ErrorCode::LimitExceeded,
            ErrorCode::Unavailable,
            ErrorCode::VersionMismatch,
            ErrorCode::Protocol,
            ErrorCode::Internal,
        ]
        .into_iter()
        .enumerate()
        {
            v.push(ServerMessage::Response(Response {
                id: 100 + i as u64,
                result: Err(WireError::new(code, format!("{code} happened"))),
            }));
        }
        v
    }

    #[test]
    fn every_message_round_trips() {
        let mut server = ServerCodec::default();
        let mut client = ClientCodec::default();
        let mut buf = BytesMut::new();
        let sent = client_messages();
        for m in &sent {
            client.encode(m, &mut buf).unwrap();
        }
        for m in &sent {
            assert_eq!(server.decode(&mut buf).unwrap().as_ref(), Some(m));
        }
        assert!(buf.is_empty());

        let sent = server_messages();
        for m in &sent {
            server.encode(m, &mut buf).unwrap();
        }
        for m in &sent {
            assert_eq!(client.decode(&mut buf).unwrap().as_ref(), Some(m));
        }
        assert_eq!(client.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn partial_frame_waits_for_more() {
        let mut client = ClientCodec::default();
        let mut server = ServerCodec::default();
        let mut full = BytesMut::new();
        client.encode(&client_messages()[1], &mut full).unwrap();
        let mut buf = BytesMut::from(&full[..full.len() - 1]);
        assert!(server.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&full[full.len() - 1..]);
        assert!(server.decode(&mut buf).unwrap().is_some());
    }

    #[test]
    fn truncated_frame_at_eof_is_a_protocol_error() {
        let mut client = ClientCodec::default();
        let mut server = ServerCodec::default();
        let mut full = BytesMut::new();
        client.encode(&client_messages()[1], &mut full).unwrap();
        let mut buf = BytesMut::from(&full[..full.len() - 3]);
        let err = server.decode_eof(&mut buf).unwrap_err();
        assert!(err.is_protocol(), "{err}");
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_buffering() {
        let mut server = ServerCodec::new(1024);
        let mut buf = BytesMut::new();
        buf.put_u32(1025);
        let err = server.decode(&mut buf).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::FrameTooLarge {
                    len: 1025,
                    max: 1024
                }
            ),
            "{err}"
        );
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        assert!(server.decode(&mut buf).unwrap_err().is_protocol());
    }

    #[test]
    fn oversized_outgoing_message_is_refused() {
        let mut client = ClientCodec::new(64);
        let mut buf = BytesMut::from(&b"keep"[..]);
        let msg = ClientMessage::Hello(Hello {
            protocol_version: 1,
            client_name: "x".repeat(200),
        });
        assert!(matches!(
            client.encode(&msg, &mut buf),
            Err(CodecError::FrameTooLarge { .. })
        ));
        assert_eq!(&buf[..], b"keep", "nothing appended on failure");
    }

    #[test]
    fn garbage_payload_is_a_protocol_error() {
        let mut server = ServerCodec::default();
        let mut buf = BytesMut::new();
        buf.put_u32(6);
        buf.extend_from_slice(&[0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa]);
        let err = server.decode(&mut buf).unwrap_err();
        assert!(matches!(err, CodecError::Decode(_)), "{err}");
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut client = ClientCodec::default();
        let mut server = ServerCodec::default();
        let mut one = BytesMut::new();
        client.encode(&client_messages()[6], &mut one).unwrap();
        let payload_len = one.len() - 4;
        let mut buf = BytesMut::new();
        buf.put_u32(payload_len as u32 + 2);
        buf.extend_from_slice(&one[4..]);
        buf.extend_from_slice(&[0, 0]);
        assert!(matches!(
            server.decode(&mut buf),
            Err(CodecError::Decode(_))
        ));
    }

    #[test]
    fn huge_claimed_string_length_does_not_allocate() {
        // Hello { version 1, name length claimed as u64::MAX as varint }.
        let mut server = ServerCodec::default();
        let mut buf = BytesMut::new();
        let payload = [0u8, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        buf.put_u32(payload.len() as u32);
        buf.extend_from_slice(&payload);
        assert!(server.decode(&mut buf).unwrap_err().is_protocol());
    }

    /// A `Hello` payload whose name claims `claimed` bytes but carries only `carried`.
    fn hello_claiming_a_name_of(claimed: u32, carried: usize) -> BytesMut {
        let mut payload = vec![0u8, 1]; // variant `Hello`, protocol_version 1
        payload.push(252); // varint marker: a big-endian u32 follows
        payload.extend_from_slice(&claimed.to_be_bytes());
        payload.resize(payload.len() + carried, b'a');
        let mut buf = BytesMut::new();
        buf.put_u32(payload.len() as u32);
        buf.extend_from_slice(&payload);
        buf
    }

    #[test]
    fn a_claimed_length_is_checked_against_the_frame_before_allocating() {
        // bincode claims a string's length against the limit before allocating it, and only
        // then finds the bytes missing (`UnexpectedEnd`). `LimitExceeded` therefore proves that
        // the limit follows the frame's size, not the 1 MiB ceiling.
        let ceiling = MAX_FRAME_CEILING as u32;
        for (claimed, carried) in [
            (4 * 1024, 2),
            (100 * 1024, 2),
            (ceiling - 64, 2),
            (64 * 1024, 1000),
            (ceiling / 2, 30_000),
        ] {
            let mut buf = hello_claiming_a_name_of(claimed, carried);
            let err = ServerCodec::new(MAX_FRAME_CEILING)
                .decode(&mut buf)
                .unwrap_err();
            assert!(
                matches!(&err, CodecError::Decode(m) if m.contains("LimitExceeded")),
                "a name claiming {claimed} bytes with {carried} sent: \
                 expected LimitExceeded, got: {err}"
            );
        }
    }

    #[test]
    fn claimed_data_is_checked_before_allocating() {
        // An Acquire whose `data` claims ~1 MiB but carries nothing: a sequence of u8 would be
        // reserved up front (serde's cautious size hint), a byte string is claimed against the
        // limit first.
        let acquire = ClientMessage::Request(crate::Request {
            id: 1,
            op: Op::Acquire(crate::Acquire {
                key: crate::Key::in_default("k").unwrap(),
                mode: crate::Mode::Exclusive,
                wait: crate::Wait::No,
                lease_ms: None,
                detach: false,
                permits: None,
                lock_delay_ms: 0,
                data: vec![7; 3],
            }),
        });
        let mut buf = BytesMut::new();
        ClientCodec::new(MAX_FRAME_CEILING)
            .encode(&acquire, &mut buf)
            .unwrap();
        // The payload ends with the data: varint length 3, then the 3 bytes. Claim 1,000,000
        // (varint 0xfc + u32 big-endian) and drop the bytes.
        let payload_end = buf.len() - 4;
        buf.truncate(payload_end);
        buf.extend_from_slice(&[0xfc, 0x00, 0x0f, 0x42, 0x40]);
        let len = (buf.len() - LEN_BYTES) as u32;
        buf[..LEN_BYTES].copy_from_slice(&len.to_be_bytes());
        let err = ServerCodec::new(MAX_FRAME_CEILING)
            .decode(&mut buf)
            .unwrap_err();
        assert!(
            matches!(&err, CodecError::Decode(m) if m.contains("LimitExceeded")),
            "expected LimitExceeded, got: {err}"
        );
    }

    #[test]
    fn integer_heavy_messages_decode_at_every_size() {
        // bincode counts a varint integer at its in-memory size (8 bytes for a u64 sent as one
        // byte), so a valid message can claim 8 times its payload against the limit.
        let mut client = ClientCodec::new(MAX_FRAME_CEILING);
        let mut server = ServerCodec::new(MAX_FRAME_CEILING);
        let lens = [
            0, 1, 30, 31, 32, 33, 120, 127, 128, 129, 250, 255, 256, 257, 500, 1000,
        ];
        let lens = lens
            .into_iter()
            .chain([
                1020, 1023, 1024, 1025, 2047, 2048, 4090, 4096, 8191, 16_000, 16_384,
            ])
            .chain([65_000, 65_536, 100_000, 131_000]);
        for len in lens {
            let msg = ServerMessage::Response(Response {
                id: 0,
                result: Ok(Reply::Stats(Stats {
                    wait_ms: Histogram {
                        bounds_ms: vec![0; len],
                        counts: vec![],
                        sum_ms: 0,
                    },
                    ..Stats::default()
                })),
            });
            let mut buf = BytesMut::new();
            server.encode(&msg, &mut buf).unwrap();
            let payload = buf.len() - LEN_BYTES;
            match client.decode(&mut buf) {
                Ok(Some(got)) => assert_eq!(got, msg, "{len} zeros"),
                other => panic!("{len} zeros in a {payload}-byte payload: {other:?}"),
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut server = ServerCodec::new(256);
            let mut buf = BytesMut::from(&bytes[..]);
            for _ in 0..64 {
                match server.decode(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }

        #[test]
        fn framed_arbitrary_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut server = ServerCodec::default();
            let mut buf = BytesMut::new();
            buf.put_u32(payload.len() as u32);
            buf.extend_from_slice(&payload);
            let _ = server.decode(&mut buf);
        }
    }
}
