//! Hand-written decoding and encoding of the two requests that make up almost all traffic,
//! `Acquire` and `Release`, and of their answers, `Granted` and `Released`: the same bytes as
//! bincode (standard configuration, big-endian varints).
//!
//! Encoding contract: [`FastEncode::fast_encode`] either writes exactly the frame bincode would
//! write and answers `true`, or writes nothing and answers `false` (property-tested). Both
//! directions are covered, so the client crate gains as much as the daemon.
//!
//! Contract: [`FastDecode::fast_decode`] answers `Some(message)` only when bincode would decode
//! the payload to the same message; for anything else (another message, a non-canonical varint,
//! a bad bool or option tag, invalid UTF-8, trailing bytes, a truncated payload) it answers
//! `None` and the caller decodes with bincode, which also produces the error. So this module
//! can make decoding faster but never accept, refuse or misread a frame differently
//! (property-tested against bincode in `codec/tests.rs`).
//!
//! Why: through serde, bincode decodes a 16-byte ticket element by element and an `Acquire`
//! field by field behind several layers of visitors; that was 45% of the daemon's user-space
//! instructions under pipelined load (callgrind).

use bytes::{BufMut, BytesMut};

use crate::message::{
    Acquire, ClientMessage, Grant, Mode, Op, Reply, Request, Response, ServerMessage, Wait,
};
use crate::ticket::TICKET_LEN;
use crate::{Key, Ticket};

/// A message type with an optional fast decoding path.
pub trait FastDecode: Sized {
    /// The message, if the fast path is sure of it (see the module's contract).
    fn fast_decode(_payload: &[u8]) -> Option<Self> {
        None
    }
}

impl FastDecode for ServerMessage {
    fn fast_decode(payload: &[u8]) -> Option<Self> {
        let mut r = Reader(payload);
        // ServerMessage::Response is variant 2, `Ok` variant 0.
        if r.varint_u32()? != 2 {
            return None;
        }
        let id = r.varint()?;
        if r.varint_u32()? != 0 {
            return None;
        }
        let reply = match r.varint_u32()? {
            0 => Reply::Granted(Grant {
                ticket: Ticket::from_bytes(r.take(TICKET_LEN)?.try_into().ok()?),
                fence: r.varint()?,
                mode: r.mode()?,
                expires_at_ms: if r.option()? { Some(r.varint()?) } else { None },
            }),
            1 => Reply::Released,
            _ => return None,
        };
        r.0.is_empty().then_some(ServerMessage::Response(Response {
            id,
            result: Ok(reply),
        }))
    }
}

/// A message type with an optional fast encoding path.
pub trait FastEncode {
    /// Appends the whole frame (length prefix and payload) to `dst` and answers `true`, or
    /// leaves `dst` as it was and answers `false` (see the module's contract).
    fn fast_encode(&self, _dst: &mut BytesMut, _max_frame: usize) -> bool {
        false
    }
}

impl FastEncode for ClientMessage {
    fn fast_encode(&self, dst: &mut BytesMut, max_frame: usize) -> bool {
        match self {
            ClientMessage::Request(Request { id, op }) => encode_request(*id, op, dst, max_frame),
            ClientMessage::Hello(_) => false,
        }
    }
}

/// [`FastEncode::fast_encode`] of `ClientMessage::Request(Request { id, op })`, by reference.
pub(super) fn encode_request(id: u64, op: &Op, dst: &mut BytesMut, max_frame: usize) -> bool {
    let mut w = Writer::start(dst);
    w.varint(1); // ClientMessage::Request
    w.varint(id);
    match op {
        Op::Acquire(a) => {
            w.varint(0);
            w.bytes_with_len(a.key.namespace.as_bytes());
            w.bytes_with_len(a.key.name.as_bytes());
            w.mode(a.mode);
            match a.wait {
                Wait::No => w.varint(0),
                Wait::Millis(ms) => {
                    w.varint(1);
                    w.varint(ms);
                }
                Wait::Forever => w.varint(2),
            }
            w.option(a.lease_ms);
            w.raw(&[u8::from(a.detach)]);
            w.option(a.permits.map(u64::from));
            w.varint(a.lock_delay_ms);
            w.bytes_with_len(&a.data);
        }
        Op::Release { ticket } => {
            w.varint(1);
            w.raw(&ticket.bytes());
        }
        _ => return w.abandon(),
    }
    w.finish(max_frame)
}

impl FastEncode for ServerMessage {
    fn fast_encode(&self, dst: &mut BytesMut, max_frame: usize) -> bool {
        let ServerMessage::Response(Response {
            id,
            result: Ok(reply),
        }) = self
        else {
            return false;
        };
        let mut w = Writer::start(dst);
        w.varint(2); // ServerMessage::Response
        w.varint(*id);
        w.varint(0); // Ok
        match reply {
            Reply::Granted(Grant {
                ticket,
                fence,
                mode,
                expires_at_ms,
            }) => {
                w.varint(0);
                w.raw(&ticket.bytes());
                w.varint(*fence);
                w.mode(*mode);
                w.option(*expires_at_ms);
            }
            Reply::Released => w.varint(1),
            _ => return w.abandon(),
        }
        w.finish(max_frame)
    }
}

/// Writes one frame at the end of a buffer: a length prefix, patched by [`Writer::finish`].
struct Writer<'a> {
    dst: &'a mut BytesMut,
    start: usize,
}

impl<'a> Writer<'a> {
    fn start(dst: &'a mut BytesMut) -> Writer<'a> {
        let start = dst.len();
        dst.put_u32(0);
        Writer { dst, start }
    }

    fn raw(&mut self, b: &[u8]) {
        self.dst.extend_from_slice(b);
    }

    /// bincode's varint (see [`Reader::varint`]), big-endian.
    fn varint(&mut self, v: u64) {
        if v < 251 {
            self.dst.put_u8(v as u8);
        } else if let Ok(v) = u16::try_from(v) {
            self.dst.put_u8(251);
            self.dst.put_u16(v);
        } else if let Ok(v) = u32::try_from(v) {
            self.dst.put_u8(252);
            self.dst.put_u32(v);
        } else {
            self.dst.put_u8(253);
            self.dst.put_u64(v);
        }
    }

    fn bytes_with_len(&mut self, b: &[u8]) {
        self.varint(b.len() as u64);
        self.raw(b);
    }

    fn mode(&mut self, mode: Mode) {
        self.varint(match mode {
            Mode::Exclusive => 0,
            Mode::Shared => 1,
        });
    }

    fn option(&mut self, v: Option<u64>) {
        match v {
            None => self.raw(&[0]),
            Some(v) => {
                self.raw(&[1]);
                self.varint(v);
            }
        }
    }

    /// Takes back what was written; the caller encodes with bincode.
    fn abandon(self) -> bool {
        self.dst.truncate(self.start);
        false
    }

    /// Patches the length prefix, or takes everything back if the payload is over
    /// `max_frame` (bincode's path then reports it).
    fn finish(self, max_frame: usize) -> bool {
        let len = self.dst.len() - self.start - super::LEN_BYTES;
        match u32::try_from(len) {
            Ok(n) if len <= max_frame => {
                self.dst[self.start..self.start + super::LEN_BYTES]
                    .copy_from_slice(&n.to_be_bytes());
                true
            }
            _ => self.abandon(),
        }
    }
}

impl FastDecode for ClientMessage {
    fn fast_decode(payload: &[u8]) -> Option<Self> {
        let mut r = Reader(payload);
        // ClientMessage::Request is variant 1 (Hello, variant 0, is once per connection).
        if r.varint_u32()? != 1 {
            return None;
        }
        let id = r.varint()?;
        let op = match r.varint_u32()? {
            0 => Op::Acquire(r.acquire()?),
            1 => Op::Release {
                ticket: Ticket::from_bytes(r.take(TICKET_LEN)?.try_into().ok()?),
            },
            _ => return None,
        };
        r.0.is_empty()
            .then_some(ClientMessage::Request(Request { id, op }))
    }
}

/// Reads from the front of a payload.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    /// bincode's varint: one byte below 251, else a marker (251: u16, 252: u32, 253: u64)
    /// and the value big-endian. Non-canonical forms (a value that fits a shorter form) and
    /// u128 are left to bincode.
    fn varint(&mut self) -> Option<u64> {
        let v = match self.byte()? {
            b @ 0..=250 => return Some(u64::from(b)),
            251 => u64::from(u16::from_be_bytes(self.take(2)?.try_into().ok()?)),
            252 => u64::from(u32::from_be_bytes(self.take(4)?.try_into().ok()?)),
            253 => u64::from_be_bytes(self.take(8)?.try_into().ok()?),
            _ => return None,
        };
        (v >= 251).then_some(v)
    }

    /// A u32's varint: bincode refuses the u64 marker (253) for it.
    fn varint_u32(&mut self) -> Option<u32> {
        if self.0.first() == Some(&253) {
            return None;
        }
        u32::try_from(self.varint()?).ok()
    }

    fn bool(&mut self) -> Option<bool> {
        match self.byte()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        self.take(len)
    }

    fn string(&mut self) -> Option<String> {
        Some(std::str::from_utf8(self.bytes()?).ok()?.to_owned())
    }

    fn option(&mut self) -> Option<bool> {
        self.bool()
    }

    fn mode(&mut self) -> Option<Mode> {
        match self.varint_u32()? {
            0 => Some(Mode::Exclusive),
            1 => Some(Mode::Shared),
            _ => None,
        }
    }

    /// The fields of [`Acquire`], in declaration order.
    fn acquire(&mut self) -> Option<Acquire> {
        let key = Key {
            namespace: self.string()?,
            name: self.string()?,
        };
        let mode = self.mode()?;
        let wait = match self.varint_u32()? {
            0 => Wait::No,
            1 => Wait::Millis(self.varint()?),
            2 => Wait::Forever,
            _ => return None,
        };
        let lease_ms = if self.option()? {
            Some(self.varint()?)
        } else {
            None
        };
        let detach = self.bool()?;
        let permits = if self.option()? {
            Some(self.varint_u32()?)
        } else {
            None
        };
        let lock_delay_ms = self.varint()?;
        let data = self.bytes()?.to_vec();
        Some(Acquire {
            key,
            mode,
            wait,
            lease_ms,
            detach,
            permits,
            lock_delay_ms,
            data,
        })
    }
}
