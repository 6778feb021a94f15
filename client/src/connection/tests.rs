//! The connection's own tests: backpressure and route bookkeeping.

use std::time::Duration;

use super::*;

/// A peer that never reads: callers stop adding once `out` reaches the high-water mark.
#[tokio::test]
async fn callers_wait_while_the_unwritten_backlog_is_at_the_high_water_mark() {
    let (ours, _never_reads) = UnixStream::pair().unwrap();
    let (conn, _task) = Conn::start(ours, ClientCodec::default(), BytesMut::new());
    let op = Op::Acquire(lockd_protocol::Acquire {
        key: Key::new("default", "backlog").unwrap(),
        mode: lockd_protocol::Mode::Exclusive,
        wait: lockd_protocol::Wait::No,
        lease_ms: None,
        detach: false,
        permits: None,
        lock_delay_ms: 0,
        data: vec![b'x'; 1000],
    });
    let mut answers = Vec::new();
    for _ in 0..2_000 {
        // A call that does not return in 200 ms is blocked: nothing will drain the
        // backlog while the peer does not read.
        match tokio::time::timeout(Duration::from_millis(200), conn.call(&op, None)).await {
            Ok(sent) => answers.push(sent.unwrap()),
            Err(_) => break,
        }
    }
    assert!(
        answers.len() < 2_000,
        "2 MB accepted while nothing was read"
    );
    let queued = lock(&conn.writer).out.len();
    assert!(
        (OUT_HIGH_WATER..OUT_HIGH_WATER + 2048).contains(&queued),
        "{queued} bytes queued"
    );
}

#[tokio::test]
async fn a_refused_watch_leaves_no_route_behind() {
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let (conn, _task) = Conn::start(ours, ClientCodec::default(), BytesMut::new());
    let key = Key::new("default", "watched").unwrap();
    let (kept_tx, kept_rx) = mpsc::unbounded_channel();
    let (dropped_tx, dropped_rx) = mpsc::unbounded_channel();
    conn.add_watch(key.clone(), kept_tx);
    conn.add_watch(key.clone(), dropped_tx);
    drop(dropped_rx);
    conn.prune_watches(&key);
    assert_eq!(lock(&conn.routes).watches[&key].len(), 1);
    drop(kept_rx);
    conn.prune_watches(&key);
    assert!(lock(&conn.routes).watches.is_empty());
}
