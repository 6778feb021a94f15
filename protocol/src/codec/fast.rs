//! A hand-written decoder for the two requests that make up almost all traffic, `Acquire` and
//! `Release`, reading the same bytes as bincode (standard configuration, big-endian varints).
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

use crate::message::{Acquire, ClientMessage, Mode, Op, Request, ServerMessage, Wait};
use crate::ticket::TICKET_LEN;
use crate::{Key, Ticket};

/// A message type with an optional fast decoding path.
pub trait FastDecode: Sized {
    /// The message, if the fast path is sure of it (see the module's contract).
    fn fast_decode(_payload: &[u8]) -> Option<Self> {
        None
    }
}

impl FastDecode for ServerMessage {}

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

    /// The fields of [`Acquire`], in declaration order.
    fn acquire(&mut self) -> Option<Acquire> {
        let key = Key {
            namespace: self.string()?,
            name: self.string()?,
        };
        let mode = match self.varint_u32()? {
            0 => Mode::Exclusive,
            1 => Mode::Shared,
            _ => return None,
        };
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
