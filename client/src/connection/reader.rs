//! The reading task: routes responses to callers, turns pushes and EOF into lost-hold
//! signals, and writes what the socket did not take at once.

use super::*;

impl Task {
    pub(crate) async fn run(mut self) {
        let conn = Arc::clone(&self.conn);
        // Set while queued bytes wait for the socket to become writable.
        let mut writing: Option<Arc<OwnedWriteHalf>> = None;
        // Frames that arrived together with the handshake answer.
        let mut alive = self.route_frames();
        while alive {
            alive = tokio::select! {
                biased;
                read = read_some(&mut self.rd, &mut self.inbuf) => match read {
                    Ok(0) | Err(_) => false,
                    Ok(_) => self.route_frames(),
                },
                signal = std::future::poll_fn(|cx| conn.signals.poll(cx)) => match signal {
                    Signal::Stop => {
                        // A release fired just before the last handle went: try to send it.
                        let _ = conn.flush_queued();
                        false
                    }
                    Signal::Write => {
                        let w = lock(&conn.writer);
                        writing = w.wr.clone();
                        !w.failed && writing.is_some()
                    }
                },
                ready = writable(writing.as_deref()), if writing.is_some() => match ready {
                    Err(_) => false,
                    Ok(()) => match conn.flush_queued() {
                        Ok(done) => {
                            if done {
                                writing = None;
                            }
                            true
                        }
                        Err(()) => false,
                    },
                },
            };
        }
        drop(writing);
        // Dropping `self` ends the connection (`Drop for Task`), as it does when this future is
        // dropped unfinished (its runtime shut down).
    }

    /// Routes every complete frame; false on a protocol error.
    fn route_frames(&mut self) -> bool {
        loop {
            match self.codec.decode(&mut self.inbuf) {
                Ok(Some(msg)) => {
                    if !self.route(msg) {
                        return false;
                    }
                }
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }

    fn route(&mut self, msg: ServerMessage) -> bool {
        match msg {
            ServerMessage::Response(resp) => {
                self.response(resp.id, resp.result);
                true
            }
            ServerMessage::Event(Event::HoldLost { fence, reason, .. }) => {
                let hold = lock(&self.conn.routes).holds.remove(&fence);
                if let Some(hold) = hold {
                    hold.lose(match reason {
                        LostReason::Expired => Lost::Expired,
                        LostReason::ForceReleased => Lost::ForceReleased,
                        LostReason::ReleasedElsewhere => Lost::ReleasedElsewhere,
                    });
                }
                true
            }
            ServerMessage::Event(Event::Watch { key, change }) => {
                self.watch_event(key, change);
                true
            }
            ServerMessage::Event(Event::ShuttingDown) => {
                lock(&self.conn.routes).shutting_down = true;
                true
            }
            ServerMessage::Welcome(_) | ServerMessage::Rejected(_) => false,
        }
    }

    fn watch_event(&mut self, key: Key, change: Change) {
        let mut routes = lock(&self.conn.routes);
        let Some(streams) = routes.watches.get_mut(&key) else {
            return;
        };
        streams.retain(|events| events.send(change.clone()).is_ok());
        if streams.is_empty() {
            routes.watches.remove(&key);
            // Every stream was dropped: stop the daemon's events too. Sent under the routes
            // lock (routes, then writer), so a `watch()` of this key either registers first
            // (and nothing is unwatched) or its `Watch` frame follows this `Unwatch`.
            let _ = self.conn.send(self.conn.next_id(), &Op::Unwatch { key });
        }
    }

    fn response(&mut self, id: RequestId, result: Result<Reply, WireError>) {
        let granted = match &result {
            Ok(Reply::Granted(g)) => Some((g.fence, g.ticket)),
            _ => None,
        };
        let (call, state) = {
            let mut routes = lock(&self.conn.routes);
            let call = routes.pending.remove(&id);
            let state = match (&call, granted) {
                (Some(call), Some((fence, _))) => {
                    let state = Arc::new(HoldState::default());
                    if !call.detached {
                        routes.holds.insert(fence, Arc::clone(&state));
                    }
                    Some(state)
                }
                _ => None,
            };
            (call, state)
        };
        let Some(call) = call else {
            // A fire-and-forget request, or an abandoned acquire that was granted anyway.
            if let Some((_, ticket)) = granted {
                let _ = self.conn.send(self.conn.next_id(), &Op::Release { ticket });
            }
            return;
        };
        let answer = match result {
            Ok(reply) => {
                let hold = granted
                    .zip(state)
                    .map(|((fence, ticket), state)| PendingHold {
                        state,
                        ticket,
                        fence,
                        conn: Arc::clone(&self.conn),
                        armed: true,
                    });
                Ok(Answer { reply, hold })
            }
            Err(e) => Err(Error::Lock(e)),
        };
        // If the caller is gone, dropping the answer releases a grant it carried.
        let _ = call.reply.send(answer);
    }

    /// Ends the connection: fails pending calls, marks holds lost, ends watch streams and
    /// closes the socket. Runs once, when the task is dropped.
    fn finish(&mut self) {
        let (holds, pending, watches, why) = {
            let mut routes = lock(&self.conn.routes);
            routes.ended = true;
            let why = if routes.shutting_down {
                Lost::DaemonShutdown
            } else {
                Lost::Disconnected
            };
            (
                std::mem::take(&mut routes.holds),
                std::mem::take(&mut routes.pending),
                std::mem::take(&mut routes.watches),
                why,
            )
        };
        {
            // Dropping the write half (and `self.rd`, dropped with the task) closes the socket.
            let mut w = lock(&self.conn.writer);
            w.wr = None;
            w.out.clear();
        }
        // Closed before anyone is told: whoever learns of the end (a lost hold, a failed
        // call, an ended watch) finds `is_closed()` true.
        self.conn.closed.cancel();
        drop(watches); // the watch streams end
        for (_, hold) in holds {
            hold.lose(why);
        }
        for (_, call) in pending {
            let _ = call.reply.send(Err(Error::Disconnected));
        }
        self.conn.drained.notify_waiters();
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Resolves when the socket takes more bytes.
async fn writable(wr: Option<&OwnedWriteHalf>) -> io::Result<()> {
    match wr {
        Some(wr) => wr.writable().await,
        None => std::future::pending().await,
    }
}

/// Reads whatever is available (cancel-safe: nothing is lost if another branch wins).
async fn read_some(rd: &mut OwnedReadHalf, inbuf: &mut BytesMut) -> io::Result<usize> {
    inbuf.reserve(READ_CHUNK);
    rd.read_buf(inbuf).await
}
