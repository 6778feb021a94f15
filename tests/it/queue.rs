//! Shared holds, FIFO queues, no writer starvation, timeouts, and waiters that leave.

use std::future::IntoFuture;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockd_protocol::{ClientMessage, ErrorCode, Mode, Op, Reply, Response, ServerMessage, Wait};
use lockd_tests::raw::RawConn;
use lockd_tests::within;

use crate::{daemon, enqueue, poll_once, PROMPT};

#[tokio::test]
async fn shared_holders_coexist_and_a_queued_writer_blocks_later_readers() {
    let d = daemon().await;
    let (r1, r2, w, r3) = (
        d.client().await,
        d.client().await,
        d.client().await,
        d.client().await,
    );
    let g1 = r1.acquire("doc").shared().await.expect("first reader");
    let g2 = r2
        .acquire("doc")
        .shared()
        .await
        .expect("second reader, concurrently");
    assert_ne!(g1.fence(), g2.fence());

    let mut writer = enqueue(&w, w.acquire("doc").wait_forever()).await;
    // A later shared try conflicts although only readers hold the key...
    let err = r3
        .acquire("doc")
        .shared()
        .await
        .expect_err("must not jump the writer");
    assert!(err.is_conflict(), "{err}");
    // ...and a later shared wait queues behind the writer.
    let mut reader3 = enqueue(&r3, r3.acquire("doc").shared().wait_forever()).await;

    g1.release().await.unwrap();
    assert!(
        poll_once(&mut writer).await.is_none(),
        "writer waits for every reader"
    );
    g2.release().await.unwrap();
    let wg = within(PROMPT, "writer granted", &mut writer)
        .await
        .expect("writer");
    assert!(
        poll_once(&mut reader3).await.is_none(),
        "reader waits for the writer"
    );
    let writer_fence = wg.fence();
    wg.release().await.unwrap();
    let rg = within(PROMPT, "reader granted", &mut reader3)
        .await
        .expect("reader");
    assert_eq!(rg.mode(), Mode::Shared);
    assert!(rg.fence() > writer_fence, "fences increase");
}

#[tokio::test]
async fn ten_waiters_are_granted_in_fifo_order() {
    let d = daemon().await;
    let holder = d.client().await;
    let guard = holder.lock("fifo").await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let client = d.client().await;
        // Queue strictly one after the other, alternating modes to exercise both.
        let acquire = client.acquire("fifo").wait_forever();
        let acquire = if i % 3 == 1 {
            acquire.shared()
        } else {
            acquire
        };
        let pending = enqueue(&client, acquire).await;
        let order = Arc::clone(&order);
        tasks.push(tokio::spawn(async move {
            let g = pending.await.expect("granted");
            order.lock().unwrap().push((i, g.fence()));
            g.release().await.unwrap();
            drop(client);
        }));
    }
    guard.release().await.unwrap();
    for t in tasks {
        crate::within_or_panic(t).await;
    }
    let order = order.lock().unwrap().clone();
    let ids: Vec<usize> = order.iter().map(|(i, _)| *i).collect();
    // Shared waiters next to each other may finish in either order; exclusive ones may not.
    let mut fences: Vec<(u64, usize)> = order.iter().map(|(i, f)| (*f, *i)).collect();
    fences.sort_unstable();
    let by_fence: Vec<usize> = fences.iter().map(|(_, i)| *i).collect();
    assert_eq!(
        by_fence,
        (0..10).collect::<Vec<_>>(),
        "grant order (by fence) is FIFO; completion order {ids:?}"
    );
}

/// The next response on a raw connection, or a panic.
async fn response(raw: &mut RawConn) -> Response {
    match raw.recv(PROMPT).await {
        Some(ServerMessage::Response(r)) => r,
        other => panic!("expected a response, got {other:?}"),
    }
}

#[tokio::test]
async fn bounded_wait_times_out_within_bounds_and_leaves_the_queue() {
    let d = daemon().await;
    let (a, b) = (d.client().await, d.client().await);
    let held = a.lock("slow").await.unwrap();
    let wait = Duration::from_millis(300);
    let start = Instant::now();
    let err = within(
        PROMPT,
        "timeout answer",
        b.acquire("slow").wait(wait).into_future(),
    )
    .await
    .expect_err("must time out");
    let took = start.elapsed();
    assert!(err.is_timeout(), "{err}");
    assert!(
        took >= wait,
        "answered after {took:?}, before the wait of {wait:?}"
    );
    assert!(
        took < wait + Duration::from_secs(5),
        "answered only after {took:?}"
    );

    // A raw waiter (no client-side clean-up to hide behind) times out and leaves the queue:
    // after the holder releases, the key is free at once.
    let mut raw = RawConn::connect_hello(&d.socket).await;
    raw.request(
        1,
        crate::acquire_op("slow", Mode::Exclusive, Wait::Millis(200), None, false),
    )
    .await;
    let r = response(&mut raw).await;
    assert_eq!(r.id, 1);
    assert_eq!(r.result.expect_err("timed out").code, ErrorCode::Timeout);
    held.release().await.unwrap();
    b.try_lock("slow")
        .await
        .expect("no timed-out waiter was granted");
}

#[tokio::test]
async fn cancel_withdraws_a_wait_and_the_next_waiter_is_granted() {
    let d = daemon().await;
    let (a, c) = (d.client().await, d.client().await);
    let held = a.lock("k").await.unwrap();
    let mut raw = RawConn::connect_hello(&d.socket).await;
    raw.request(
        1,
        crate::acquire_op("k", Mode::Exclusive, Wait::Forever, None, false),
    )
    .await;
    raw.request(2, Op::Cancel { request: 1 }).await;
    let first = response(&mut raw).await;
    assert_eq!(first.id, 1, "the withdrawn acquire answers first");
    assert_eq!(
        first.result.expect_err("withdrawn").code,
        ErrorCode::Timeout
    );
    let second = response(&mut raw).await;
    assert_eq!((second.id, second.result), (2, Ok(Reply::Cancelled(true))));
    raw.request(3, Op::Cancel { request: 1 }).await;
    assert_eq!(response(&mut raw).await.result, Ok(Reply::Cancelled(false)));

    let next = enqueue(&c, c.acquire("k").wait_forever()).await;
    let held_fence = held.fence();
    held.release().await.unwrap();
    let g = within(PROMPT, "next waiter granted", next)
        .await
        .expect("granted");
    assert_eq!(g.fence(), held_fence + 1, "nobody was granted in between");
}

#[tokio::test]
async fn dropped_acquire_future_withdraws_its_wait() {
    let d = daemon().await;
    let (a, b, c) = (d.client().await, d.client().await, d.client().await);
    let held = a.lock("k").await.unwrap();
    let abandoned = enqueue(&b, b.acquire("k").wait_forever()).await;
    let next = enqueue(&c, c.acquire("k").wait_forever()).await;
    drop(abandoned);
    b.ping().await.unwrap(); // the cancel has been processed
    let held_fence = held.fence();
    held.release().await.unwrap();
    let g = within(PROMPT, "next waiter granted", next)
        .await
        .expect("granted");
    assert_eq!(
        g.fence(),
        held_fence + 1,
        "the abandoned wait was never granted"
    );
}

#[tokio::test]
async fn grant_that_arrives_after_its_future_was_dropped_is_released() {
    let d = daemon().await;
    let (a, b, c) = (d.client().await, d.client().await, d.client().await);
    let held = a.lock("late").await.unwrap();
    let granted_meanwhile = enqueue(&b, b.acquire("late").wait_forever()).await;
    held.release().await.unwrap();
    b.ping().await.unwrap(); // the grant reached b's connection task before this answer
    drop(granted_meanwhile); // ...but the caller never looks at it
    let g = within(
        PROMPT,
        "released in the background",
        c.acquire("late").wait_forever().into_future(),
    )
    .await
    .expect("granted");
    drop(g);
}

#[tokio::test]
async fn absurdly_long_wait_is_a_forever_wait_not_a_crash() {
    let d = daemon().await;
    let a = d.client().await;
    let held = a.lock("long").await.unwrap();
    let mut raw = RawConn::connect_hello(&d.socket).await;
    raw.request(
        1,
        crate::acquire_op("long", Mode::Exclusive, Wait::Millis(u64::MAX), None, false),
    )
    .await;
    raw.request(2, Op::Ping).await;
    assert_eq!(response(&mut raw).await.id, 2, "queued, connection alive");
    held.release().await.unwrap();
    let r = response(&mut raw).await;
    assert_eq!(r.id, 1);
    assert!(matches!(r.result, Ok(Reply::Granted(_))), "{r:?}");
}

#[tokio::test]
async fn waiter_whose_connection_closes_leaves_the_queue() {
    let d = daemon().await;
    let (holder, next) = (d.client().await, d.client().await);
    let held = holder.lock("q").await.unwrap();
    // A raw connection queues and then vanishes without cancelling.
    let mut raw = RawConn::connect_hello(&d.socket).await;
    raw.request(
        1,
        crate::acquire_op("q", Mode::Exclusive, Wait::Forever, None, false),
    )
    .await;
    raw.send(ClientMessage::Request(lockd_protocol::Request {
        id: 2,
        op: Op::Ping,
    }))
    .await;
    let pong = raw.recv(PROMPT).await;
    assert!(matches!(pong, Some(lockd_protocol::ServerMessage::Response(r)) if r.id == 2));
    let mut waiting = enqueue(&next, next.acquire("q").wait_forever()).await;
    drop(raw);
    held.release().await.unwrap();
    within(
        PROMPT,
        "the waiter behind the vanished one is granted",
        &mut waiting,
    )
    .await
    .expect("granted");
}
