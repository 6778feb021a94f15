//! One client connection's task: it decodes requests, calls the engine, encodes the answers
//! and writes them; it takes pushes from other tasks (grants, lost holds, watch events,
//! answers computed after a store commit) and its wait timers.
//!
//! Architecture invariants:
//! - the connection's socket belongs to this task alone; others reach it through its mailbox
//!   ([`Push`]);
//! - answers produced while handling one wake-up are written with one `write` call;
//! - the task never buffers more than [`wire::OUT_CAP`] of answers before writing them, and a
//!   peer that does not take them within `write_timeout` is disconnected; watch events are
//!   bounded in the mailbox too ([`crate::peer::MAX_QUEUED_EVENTS`]);
//! - when the task ends, for whatever reason, dropping its [`Conn`] ends the connection in the
//!   engine (every session hold and waiter leaves the table).

mod accept;
mod wire;

use std::sync::Arc;

use lockd_protocol::{
    ClientMessage, ErrorCode, Event, Op, Reply, RequestId, Response, ServerMessage, WireError,
};
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder, Encoder};

pub use accept::serve;

use crate::backend::Conn;
use crate::engine::{Answer, Outgoing};
use crate::error::Error;
use crate::peer::Push;
use crate::shared::Shared;
use crate::stats::Global;
use accept::ConnectionSlot;
use wire::{Wire, OUT_CAP};

struct Session {
    /// Declared before `wire`, so it drops first: a connection's holds are released before its
    /// socket closes, and a peer that sees the close (a refused frame, a write timeout) can
    /// rely on them being gone.
    conn: Conn,
    wire: Wire,
    mailbox: mpsc::UnboundedReceiver<Push>,
    /// This connection's place in its uid's connection count (returned when dropped).
    _slot: ConnectionSlot,
    /// Answers computed after a commit, queued but not yet written: (request, where its bytes
    /// end in the output stream). Each is reported to `conn` once written.
    unwritten: Vec<(RequestId, u64)>,
    /// The configuration generation `conn` applies (checked once per wake-up: one relaxed
    /// load of a rarely written word).
    generation: u64,
    shared: Arc<Shared>,
}

/// What [`Session::handle_frames`] stopped at.
enum Frames {
    /// Every complete frame was handled.
    Drained,
    /// The output buffer is full: write it, then handle the rest.
    Paused,
    /// A protocol error: close the connection.
    Close,
}

/// Why a session's loop ended.
enum End {
    Closed,
    Shutdown,
}

impl Session {
    async fn run(&mut self) {
        let end = self.serve_until_end().await;
        if matches!(end, End::Shutdown) {
            self.wire.send(ServerMessage::Event(Event::ShuttingDown));
            let _ = self.flush().await;
        }
    }

    async fn serve_until_end(&mut self) -> End {
        // Shutdown arrives through the mailbox (`Push::Shutdown`): polling a cancellation
        // token on every wake-up would take a mutex per request.
        if self.shared.shutdown.is_cancelled() {
            return End::Shutdown;
        }
        // Frames pipelined behind Hello are already buffered: answer them now, not after the
        // next read.
        if let Some(end) = self.handle_input().await {
            return end;
        }
        loop {
            if let Err(end) = self.flush().await {
                return end;
            }
            tokio::select! {
                biased;
                Some(push) = self.mailbox.recv() => {
                    if let Some(end) = self.take_pushes(push).await {
                        return end;
                    }
                }
                Some(expired) = self.conn.next_timeout(), if self.conn.has_timers() => {
                    let out = self.conn.on_timeout(expired);
                    self.deliver(out);
                }
                read = self.wire.read_more() => match read {
                    Ok(0) => {
                        if !self.wire.inbuf.is_empty() {
                            self.protocol_error("connection closed inside a frame");
                            let _ = self.flush().await;
                        }
                        return End::Closed;
                    }
                    Ok(_) => {
                        if let Some(end) = self.handle_input().await {
                            return end;
                        }
                    }
                    Err(_) => return End::Closed,
                },
            }
            self.conn.sync_usage(false);
        }
    }

    /// Writes what this wake-up produced, within the configured write timeout.
    async fn flush(&mut self) -> Result<(), End> {
        self.refresh_config();
        let limit = self.conn.config().limits.write_timeout;
        let flushed = self.wire.flush_within(limit).await;
        if !self.unwritten.is_empty() {
            // Also after a failed write: what reached the socket was delivered; the rest is
            // taken back when the connection ends.
            let written = self.wire.written();
            let conn = &mut self.conn;
            self.unwritten.retain(|&(id, end)| {
                let done = end <= written;
                if done {
                    conn.written(id);
                }
                !done
            });
        }
        match flushed {
            Ok(()) => Ok(()),
            Err(e) => {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    tracing::warn!(
                        conn = self.conn.owner().id,
                        "disconnecting {}: it has not read its responses for {limit:?}",
                        self.conn.owner().describe()
                    );
                }
                Err(End::Closed)
            }
        }
    }

    /// Handles `first` and every push already waiting, writing whenever [`OUT_CAP`] bytes of
    /// output are pending.
    async fn take_pushes(&mut self, first: Push) -> Option<End> {
        let mut next = Some(first);
        while let Some(push) = next {
            if matches!(push, Push::Shutdown) {
                return Some(End::Shutdown);
            }
            let out = self.conn.on_push(push);
            self.deliver(out);
            if self.conn.owner().fell_behind() {
                return Some(self.fell_behind().await);
            }
            if self.wire.out.len() >= OUT_CAP {
                if let Err(end) = self.flush().await {
                    return Some(end);
                }
            }
            next = self.mailbox.try_recv().ok();
        }
        None
    }

    /// The connection did not take its watch events fast enough: say why and close.
    async fn fell_behind(&mut self) -> End {
        tracing::warn!(
            conn = self.conn.owner().id,
            "disconnecting {}: it fell {} watch events behind",
            self.conn.owner().describe(),
            crate::peer::MAX_QUEUED_EVENTS
        );
        self.wire.send(ServerMessage::Rejected(WireError::new(
            ErrorCode::LimitExceeded,
            format!(
                "this connection fell {} watch events behind; read events faster or watch fewer keys",
                crate::peer::MAX_QUEUED_EVENTS
            ),
        )));
        let _ = self.flush().await;
        End::Closed
    }

    /// Handles every complete frame in the read buffer, writing whenever the output is full.
    async fn handle_input(&mut self) -> Option<End> {
        self.refresh_config();
        loop {
            match self.handle_frames() {
                Frames::Drained => return None,
                Frames::Close => {
                    let _ = self.flush().await;
                    return Some(End::Closed);
                }
                // Many answers are waiting: write them before reading on, so a client that
                // never reads cannot make the daemon buffer more.
                Frames::Paused => {
                    if let Err(end) = self.flush().await {
                        return Some(end);
                    }
                }
            }
        }
    }

    /// Picks up a reloaded configuration (authorization, limits) without dropping anything.
    fn refresh_config(&mut self) {
        let generation = self.shared.config.generation();
        if generation != self.generation {
            self.generation = generation;
            self.conn.set_config(self.shared.config.get());
        }
    }

    fn handle_frames(&mut self) -> Frames {
        loop {
            if self.wire.out.len() >= OUT_CAP {
                return Frames::Paused;
            }
            match self.wire.codec.decode(&mut self.wire.inbuf) {
                Ok(Some(ClientMessage::Request(req))) => self.handle(req.id, req.op),
                Ok(Some(ClientMessage::Hello(_))) => {
                    self.protocol_error("Hello sent twice");
                    return Frames::Close;
                }
                Ok(None) => return Frames::Drained,
                Err(e) => {
                    self.protocol_error(&e.to_string());
                    return Frames::Close;
                }
            }
        }
    }

    fn handle(&mut self, id: RequestId, op: Op) {
        let shared = &self.shared;
        let answer = self.conn.handle(id, op, || shared.snapshot());
        // A withdrawn wait answers before the cancel that withdrew it.
        for (request, result) in self.conn.take_side_answers() {
            self.respond(request, result);
        }
        self.answer(id, answer);
    }

    fn deliver(&mut self, out: Outgoing) {
        match out {
            Outgoing::Answer(id, answer) => self.answer(id, answer),
            Outgoing::Committed(id, result) => {
                self.respond(id, result);
                self.unwritten.push((id, self.wire.queued_end()));
            }
            Outgoing::Event(event) => self.wire.send(ServerMessage::Event(event)),
            Outgoing::Nothing => {}
        }
    }

    /// Sends an answer now, or arranges for it to come through the mailbox after its commit.
    fn answer(&mut self, id: RequestId, answer: Answer) {
        match answer {
            Answer::Now(result) => self.respond(id, result),
            Answer::Queued => {}
            Answer::AfterCommit(deferred) => {
                // A task of its own, so the state change completes even if this connection
                // closes first; only the answer goes through the mailbox.
                let owner = self.conn.owner().clone();
                tokio::spawn(deferred.finish_with(move |result| {
                    owner.push(Push::Reply {
                        request: id,
                        result,
                    })
                }));
            }
        }
    }

    fn respond(&mut self, id: RequestId, result: Result<Reply, Error>) {
        let result = result.map_err(WireError::from);
        let msg = ServerMessage::Response(Response { id, result });
        if let Err(e) = self.wire.codec.encode(msg, &mut self.wire.out) {
            // Never leave the request hanging (describe and list cut themselves to fit, so
            // this is a bug or a tiny configured frame).
            let result = Err(WireError::new(
                ErrorCode::LimitExceeded,
                format!("the answer does not fit in a frame ({e}); ask for less"),
            ));
            self.wire
                .send(ServerMessage::Response(Response { id, result }));
        }
    }

    fn protocol_error(&mut self, why: &str) {
        Global::inc(&self.shared.global.protocol_errors);
        tracing::warn!(
            conn = self.conn.owner().id,
            "protocol error from {}: {why}; closing its connection",
            self.conn.owner().describe()
        );
        self.wire.send(ServerMessage::Rejected(WireError::new(
            ErrorCode::Protocol,
            format!("{why}; closing the connection"),
        )));
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        Global::dec(&self.shared.global.connections);
        self.shared.unregister(self.conn.owner().id);
    }
}
