//! Tickets: the unforgeable capability for renewing and releasing a hold.
//!
//! A ticket never appears in logs or debug output: its `Debug` is redacted and it has no
//! `Display`. The only way to see its bytes as text is the explicit [`Ticket::to_text`].

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// Length of a ticket in bytes (128 bits).
pub const TICKET_LEN: usize = 16;

/// 128 random bits from the OS CSPRNG, compared in constant time.
#[derive(Serialize, Deserialize, Clone, Copy, Eq)]
pub struct Ticket([u8; TICKET_LEN]);

/// A text form that is not a ticket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a lockd ticket: expected {} hexadecimal digits", TICKET_LEN * 2)]
pub struct TicketParseError;

impl Ticket {
    /// Wraps bytes that came from the OS CSPRNG (the daemon draws them in batches).
    pub fn from_bytes(bytes: [u8; TICKET_LEN]) -> Ticket {
        Ticket(bytes)
    }

    /// The raw bytes, for storage. Treat them as a secret.
    pub fn bytes(&self) -> [u8; TICKET_LEN] {
        self.0
    }

    /// Draws a fresh ticket from the OS CSPRNG.
    ///
    /// # Errors
    /// The OS random source failed (practically never on Linux).
    pub fn generate() -> Result<Ticket, getrandom::Error> {
        let mut bytes = [0u8; TICKET_LEN];
        getrandom::fill(&mut bytes)?;
        Ok(Ticket(bytes))
    }

    /// The ticket as 32 lower-case hex digits, for scripts. Treat the result as a secret.
    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(TICKET_LEN * 2);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s
    }

    /// Parses the text form made by [`Ticket::to_text`] (surrounding whitespace allowed).
    ///
    /// # Errors
    /// [`TicketParseError`] for anything else.
    pub fn from_text(text: &str) -> Result<Ticket, TicketParseError> {
        let text = text.trim().as_bytes();
        if text.len() != TICKET_LEN * 2 {
            return Err(TicketParseError);
        }
        let mut bytes = [0u8; TICKET_LEN];
        for (i, pair) in text.chunks_exact(2).enumerate() {
            bytes[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        }
        Ok(Ticket(bytes))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Result<u8, TicketParseError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(TicketParseError),
    }
}

impl PartialEq for Ticket {
    fn eq(&self, other: &Ticket) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::hash::Hash for Ticket {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ticket(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip() {
        let t = Ticket::generate().unwrap();
        let text = t.to_text();
        assert_eq!(text.len(), 32);
        assert_eq!(Ticket::from_text(&text).unwrap(), t);
        assert_eq!(
            Ticket::from_text(&format!(" {}\n", text.to_uppercase())).unwrap(),
            t
        );
    }

    #[test]
    fn bad_text_is_refused() {
        for s in ["", "abc", &"g".repeat(32), &"0".repeat(33)] {
            assert_eq!(Ticket::from_text(s), Err(TicketParseError));
        }
    }

    #[test]
    fn debug_is_redacted() {
        let t = Ticket::generate().unwrap();
        let dbg = format!("{t:?}");
        assert!(!dbg.contains(&t.to_text()[..8]));
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn tickets_differ() {
        assert_ne!(Ticket::generate().unwrap(), Ticket::generate().unwrap());
    }
}
