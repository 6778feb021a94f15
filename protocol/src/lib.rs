//! The lockd wire protocol, shared by the daemon, the client crate and `lockctl`.
//!
//! The wire format in five lines:
//! 1. A stream is a sequence of frames: a 4-byte big-endian length, then that many bytes.
//! 2. Each payload is one bincode 2 (standard config) encoding of [`ClientMessage`] or
//!    [`ServerMessage`]; frames above the negotiated maximum are refused.
//! 3. The client opens with [`ClientMessage::Hello`]; the daemon answers
//!    [`ServerMessage::Welcome`] or [`ServerMessage::Rejected`] (then closes).
//! 4. Every [`Request`] carries a client-chosen id that its [`Response`] echoes; responses may
//!    come out of order.
//! 5. Daemon-initiated messages are [`ServerMessage::Event`].
//!
//! Compatibility rule: the first two variants of [`ClientMessage`] and [`ServerMessage`] and the
//! layout of [`Hello`], [`Welcome`] and [`WireError`] never change, so a version mismatch can
//! always be reported.

pub mod codec;
pub mod display;
pub mod error;
pub mod key;
pub mod message;
pub mod paths;
pub mod ticket;
pub mod users;

pub use codec::{ClientCodec, CodecError, ServerCodec, DEFAULT_MAX_FRAME};
pub use error::{ErrorCode, WireError};
pub use key::{Key, KeyError, DEFAULT_NAMESPACE, MAX_NAMESPACE_LEN, MAX_NAME_LEN};
pub use message::*;
pub use ticket::{Ticket, TicketParseError};

/// Version of the protocol spoken by this crate. Bumped on any incompatible message change.
pub const PROTOCOL_VERSION: u32 = 2;
