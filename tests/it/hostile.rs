//! Bad input closes the offending connection only; everyone else keeps their locks.

use bytes::{BufMut, BytesMut};
use lockd_protocol::{Acquire, ErrorCode, Key, Mode, Op, ServerMessage, Wait};
use lockd_tests::raw::RawConn;

use crate::{daemon, PROMPT};

fn expect_protocol_rejection(msg: Option<ServerMessage>) {
    match msg {
        Some(ServerMessage::Rejected(e)) => assert_eq!(e.code, ErrorCode::Protocol, "{e}"),
        other => panic!("expected Rejected(Protocol), got {other:?}"),
    }
}

#[tokio::test]
async fn garbage_truncated_and_oversized_frames_close_only_their_connection() {
    let d = daemon().await;
    let holder = d.client().await;
    let guard = holder.lock("precious").await.unwrap();
    let other = d.client().await;

    let check_intact = || async {
        assert!(!guard.is_lost(), "the holder's lock was lost");
        holder.ping().await.expect("holder's connection works");
        let err = other.try_lock("precious").await.expect_err("still held");
        assert!(err.is_conflict(), "{err}");
    };

    // 1. Garbage instead of a handshake.
    let mut raw = RawConn::connect(&d.socket).await;
    raw.send_bytes(b"GET / HTTP/1.1\r\nHost: lockd\r\n\r\n")
        .await;
    assert!(
        raw.closed_within(PROMPT).await,
        "garbage handshake must close"
    );
    check_intact().await;

    // 2. A well-framed payload that is not a message, after a good handshake.
    let mut raw = RawConn::connect_hello(&d.socket).await;
    let mut frame = BytesMut::new();
    frame.put_u32(8);
    frame.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xff]);
    raw.send_bytes(&frame).await;
    expect_protocol_rejection(raw.recv(PROMPT).await);
    assert!(raw.closed_within(PROMPT).await);
    check_intact().await;

    // 3. A truncated frame: the length promises more than ever arrives.
    let mut raw = RawConn::connect_hello(&d.socket).await;
    let mut frame = BytesMut::new();
    frame.put_u32(100);
    frame.extend_from_slice(&[1, 2, 3]);
    raw.send_bytes(&frame).await;
    tokio::io::AsyncWriteExt::shutdown(&mut raw.stream)
        .await
        .expect("half-close");
    assert!(
        raw.closed_within(PROMPT).await,
        "truncated frame must close"
    );
    check_intact().await;

    // 4. An oversized length prefix.
    let mut raw = RawConn::connect_hello(&d.socket).await;
    raw.send_bytes(&u32::MAX.to_be_bytes()).await;
    expect_protocol_rejection(raw.recv(PROMPT).await);
    assert!(raw.closed_within(PROMPT).await);
    check_intact().await;

    guard.release().await.expect("release after all that");
}

#[tokio::test]
async fn protocol_error_releases_the_offenders_own_holds() {
    let d = daemon().await;
    let mut raw = RawConn::connect_hello(&d.socket).await;
    raw.request(
        1,
        crate::acquire_op("raw-held", Mode::Exclusive, Wait::No, None, false),
    )
    .await;
    match raw.recv(PROMPT).await {
        Some(ServerMessage::Response(r)) => assert!(r.result.is_ok(), "{r:?}"),
        other => panic!("expected a grant, got {other:?}"),
    }
    let other = d.client().await;
    assert!(other.try_lock("raw-held").await.unwrap_err().is_conflict());
    raw.send_bytes(&[0, 0, 0, 2, 0xff, 0xff]).await;
    expect_protocol_rejection(raw.recv(PROMPT).await);
    assert!(raw.closed_within(PROMPT).await);
    other
        .try_lock("raw-held")
        .await
        .expect("the offender's hold ended with its connection");
}

#[tokio::test]
async fn invalid_names_get_invalid_argument_and_oversized_data_limit_exceeded() {
    let d = daemon().await;
    let mut raw = RawConn::connect_hello(&d.socket).await;
    let bad = [
        Key {
            namespace: "Bad NS".into(),
            name: "x".into(),
        },
        Key {
            namespace: "default".into(),
            name: "n".repeat(257),
        },
        Key {
            namespace: "default".into(),
            name: "ctl\u{7}".into(),
        },
    ];
    for (i, key) in bad.into_iter().enumerate() {
        raw.request(
            i as u64,
            Op::Acquire(Acquire {
                key,
                mode: Mode::Exclusive,
                wait: Wait::No,
                lease_ms: None,
                detach: false,
                permits: None,
                lock_delay_ms: 0,
                data: vec![],
            }),
        )
        .await;
        match raw.recv(PROMPT).await {
            Some(ServerMessage::Response(r)) => {
                let e = r.result.expect_err("refused");
                assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
            }
            other => panic!("expected a response, got {other:?}"),
        }
    }
    let client = d.client().await;
    let err = client
        .acquire("big")
        .data(vec![0u8; 2048])
        .await
        .expect_err("data over 1 KiB");
    assert_eq!(err.code(), Some(ErrorCode::LimitExceeded), "{err}");
    client
        .ping()
        .await
        .expect("connection still fine after refusals");
}
