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

mod fast;
pub use fast::{FastDecode, FastEncode};

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
#[non_exhaustive]
pub enum CodecError {
    /// Reading or writing the socket failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// A length prefix (or an encoded message) exceeds the frame limit.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// The frame's length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// A frame's payload is not a valid message.
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// A message could not be encoded (e.g. a field too large).
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

    /// The largest frame payload this codec accepts, in bytes.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl<In, Out> Default for FrameCodec<In, Out> {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl<In: DeserializeOwned + FastDecode, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        let frame = match self.framing.decode(src) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(None),
            Err(e) => return Err(self.framing_error(e, src)),
        };
        if let Some(message) = In::fast_decode(&frame) {
            return Ok(Some(message));
        }
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

impl<In, Out: Serialize + FastEncode> Encoder<&Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: &Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        if item.fast_encode(dst, self.max_frame) {
            return Ok(());
        }
        encode_frame(item, dst, self.max_frame)
    }
}

impl<In, Out: Serialize + FastEncode> Encoder<Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&item, dst)
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
        if fast::encode_request(id, op, dst, self.max_frame) {
            return Ok(());
        }
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
mod tests;
