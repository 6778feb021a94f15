//! Tickets for new holds, drawn from the OS CSPRNG in batches (one syscall per 32 grants).

use lockd_protocol::ticket::TICKET_LEN;
use lockd_protocol::Ticket;

const BATCH: usize = 32;

/// A per-connection buffer of OS random bytes. Used bytes are zeroed.
pub struct TicketPool {
    buf: [u8; TICKET_LEN * BATCH],
    used: usize,
    /// A ticket drawn for a request that was refused, never shown to anyone: reused first.
    spare: Option<Ticket>,
}

impl Default for TicketPool {
    fn default() -> Self {
        TicketPool {
            buf: [0; TICKET_LEN * BATCH],
            used: BATCH,
            spare: None,
        }
    }
}

impl TicketPool {
    /// A fresh ticket.
    ///
    /// # Errors
    /// The OS random source failed.
    pub fn draw(&mut self) -> Result<Ticket, getrandom::Error> {
        if let Some(t) = self.spare.take() {
            return Ok(t);
        }
        if self.used == BATCH {
            getrandom::fill(&mut self.buf)?;
            self.used = 0;
        }
        let slot = &mut self.buf[self.used * TICKET_LEN..(self.used + 1) * TICKET_LEN];
        let mut bytes = [0u8; TICKET_LEN];
        bytes.copy_from_slice(slot);
        slot.fill(0);
        self.used += 1;
        Ok(Ticket::from_bytes(bytes))
    }
}

impl TicketPool {
    /// Gives back a ticket that never left the daemon (its request was refused at once).
    pub fn put_back(&mut self, ticket: Ticket) {
        self.spare = Some(ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_distinct_across_batches() {
        let mut pool = TicketPool::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..(BATCH * 3) {
            assert!(seen.insert(pool.draw().unwrap().to_text()));
        }
    }
}
