//! The codec's tests: framing, limits, hostile payloads, round trips.

use super::*;
use crate::*;
use proptest::prelude::*;

fn key() -> Key {
    Key::new("default", "job").unwrap()
}

#[test]
fn a_request_by_reference_encodes_to_the_same_bytes() {
    let codec = ClientCodec::default();
    for msg in client_messages() {
        let ClientMessage::Request(req) = &msg else {
            continue;
        };
        let (mut owned, mut borrowed) = (BytesMut::new(), BytesMut::new());
        ClientCodec::default().encode(&msg, &mut owned).unwrap();
        codec
            .encode_request(req.id, &req.op, &mut borrowed)
            .unwrap();
        assert_eq!(owned, borrowed, "{msg:?}");
    }
}

fn client_messages() -> Vec<ClientMessage> {
    let ticket = Ticket::generate().unwrap();
    let mut v = vec![ClientMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        client_name: "test".into(),
    })];
    let ops = [
        Op::Acquire(Acquire {
            key: key(),
            mode: Mode::Shared,
            wait: Wait::Millis(1500),
            lease_ms: Some(30_000),
            detach: true,
            permits: None,
            lock_delay_ms: 0,
            data: b"leader at 10.0.0.1".to_vec(),
        }),
        Op::Acquire(Acquire {
            key: key(),
            mode: Mode::Exclusive,
            wait: Wait::Forever,
            lease_ms: None,
            detach: false,
            permits: None,
            lock_delay_ms: 0,
            data: vec![],
        }),
        Op::Acquire(Acquire {
            key: key(),
            mode: Mode::Exclusive,
            wait: Wait::No,
            lease_ms: None,
            detach: false,
            permits: None,
            lock_delay_ms: 0,
            data: vec![],
        }),
        Op::Release { ticket },
        Op::Cancel { request: 7 },
        Op::Ping,
        Op::Renew {
            ticket,
            lease_ms: Some(5000),
        },
    ];
    for (i, op) in ops.into_iter().enumerate() {
        v.push(ClientMessage::Request(Request { id: i as u64, op }));
    }
    v
}

fn server_messages() -> Vec<ServerMessage> {
    let mut v = vec![
        ServerMessage::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            server_version: "0.1.0".into(),
            limits: Limits {
                max_frame: 65536,
                max_data: 1024,
                max_lease_ms: 86_400_000,
            },
        }),
        ServerMessage::Rejected(WireError::new(ErrorCode::VersionMismatch, "v2 please")),
        ServerMessage::Event(Event::ShuttingDown),
        ServerMessage::Event(Event::HoldLost {
            key: key(),
            fence: 9,
            reason: LostReason::Expired,
        }),
    ];
    let replies = [
        Ok(Reply::Granted(Grant {
            ticket: Ticket::generate().unwrap(),
            fence: u64::MAX,
            mode: Mode::Exclusive,
            expires_at_ms: Some(1),
        })),
        Ok(Reply::Released),
        Ok(Reply::Cancelled(true)),
        Ok(Reply::Pong),
        Ok(Reply::Renewed { expires_at_ms: 99 }),
    ];
    for (i, result) in replies.into_iter().enumerate() {
        v.push(ServerMessage::Response(Response {
            id: i as u64,
            result,
        }));
    }
    for (i, code) in [
        ErrorCode::Conflict,
        ErrorCode::Timeout,
        ErrorCode::NotHolder,
        ErrorCode::Deadlock,
        ErrorCode::PermissionDenied,
        ErrorCode::InvalidArgument,
        ErrorCode::LimitExceeded,
        ErrorCode::Unavailable,
        ErrorCode::VersionMismatch,
        ErrorCode::Protocol,
        ErrorCode::Internal,
    ]
    .into_iter()
    .enumerate()
    {
        v.push(ServerMessage::Response(Response {
            id: 100 + i as u64,
            result: Err(WireError::new(code, format!("{code} happened"))),
        }));
    }
    v
}

#[test]
fn every_message_round_trips() {
    let mut server = ServerCodec::default();
    let mut client = ClientCodec::default();
    let mut buf = BytesMut::new();
    let sent = client_messages();
    for m in &sent {
        client.encode(m, &mut buf).unwrap();
    }
    for m in &sent {
        assert_eq!(server.decode(&mut buf).unwrap().as_ref(), Some(m));
    }
    assert!(buf.is_empty());

    let sent = server_messages();
    for m in &sent {
        server.encode(m, &mut buf).unwrap();
    }
    for m in &sent {
        assert_eq!(client.decode(&mut buf).unwrap().as_ref(), Some(m));
    }
    assert_eq!(client.decode(&mut buf).unwrap(), None);
}

#[test]
fn partial_frame_waits_for_more() {
    let mut client = ClientCodec::default();
    let mut server = ServerCodec::default();
    let mut full = BytesMut::new();
    client.encode(&client_messages()[1], &mut full).unwrap();
    let mut buf = BytesMut::from(&full[..full.len() - 1]);
    assert!(server.decode(&mut buf).unwrap().is_none());
    buf.extend_from_slice(&full[full.len() - 1..]);
    assert!(server.decode(&mut buf).unwrap().is_some());
}

#[test]
fn truncated_frame_at_eof_is_a_protocol_error() {
    let mut client = ClientCodec::default();
    let mut server = ServerCodec::default();
    let mut full = BytesMut::new();
    client.encode(&client_messages()[1], &mut full).unwrap();
    let mut buf = BytesMut::from(&full[..full.len() - 3]);
    let err = server.decode_eof(&mut buf).unwrap_err();
    assert!(err.is_protocol(), "{err}");
}

#[test]
fn oversized_length_prefix_is_refused_before_buffering() {
    let mut server = ServerCodec::new(1024);
    let mut buf = BytesMut::new();
    buf.put_u32(1025);
    let err = server.decode(&mut buf).unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::FrameTooLarge {
                len: 1025,
                max: 1024
            }
        ),
        "{err}"
    );
    let mut buf = BytesMut::new();
    buf.put_u32(u32::MAX);
    assert!(server.decode(&mut buf).unwrap_err().is_protocol());
}

#[test]
fn oversized_outgoing_message_is_refused() {
    let mut client = ClientCodec::new(64);
    let mut buf = BytesMut::from(&b"keep"[..]);
    let msg = ClientMessage::Hello(Hello {
        protocol_version: 1,
        client_name: "x".repeat(200),
    });
    assert!(matches!(
        client.encode(&msg, &mut buf),
        Err(CodecError::FrameTooLarge { .. })
    ));
    assert_eq!(&buf[..], b"keep", "nothing appended on failure");
}

#[test]
fn garbage_payload_is_a_protocol_error() {
    let mut server = ServerCodec::default();
    let mut buf = BytesMut::new();
    buf.put_u32(6);
    buf.extend_from_slice(&[0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa]);
    let err = server.decode(&mut buf).unwrap_err();
    assert!(matches!(err, CodecError::Decode(_)), "{err}");
}

#[test]
fn trailing_bytes_are_refused() {
    let mut client = ClientCodec::default();
    let mut server = ServerCodec::default();
    let mut one = BytesMut::new();
    client.encode(&client_messages()[6], &mut one).unwrap();
    let payload_len = one.len() - 4;
    let mut buf = BytesMut::new();
    buf.put_u32(payload_len as u32 + 2);
    buf.extend_from_slice(&one[4..]);
    buf.extend_from_slice(&[0, 0]);
    assert!(matches!(
        server.decode(&mut buf),
        Err(CodecError::Decode(_))
    ));
}

#[test]
fn huge_claimed_string_length_does_not_allocate() {
    // Hello { version 1, name length claimed as u64::MAX as varint }.
    let mut server = ServerCodec::default();
    let mut buf = BytesMut::new();
    let payload = [0u8, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
    buf.put_u32(payload.len() as u32);
    buf.extend_from_slice(&payload);
    assert!(server.decode(&mut buf).unwrap_err().is_protocol());
}

/// A `Hello` payload whose name claims `claimed` bytes but carries only `carried`.
fn hello_claiming_a_name_of(claimed: u32, carried: usize) -> BytesMut {
    let mut payload = vec![0u8, 1]; // variant `Hello`, protocol_version 1
    payload.push(252); // varint marker: a big-endian u32 follows
    payload.extend_from_slice(&claimed.to_be_bytes());
    payload.resize(payload.len() + carried, b'a');
    let mut buf = BytesMut::new();
    buf.put_u32(payload.len() as u32);
    buf.extend_from_slice(&payload);
    buf
}

#[test]
fn a_claimed_length_is_checked_against_the_frame_before_allocating() {
    // bincode claims a string's length against the limit before allocating it, and only
    // then finds the bytes missing (`UnexpectedEnd`). `LimitExceeded` therefore proves that
    // the limit follows the frame's size, not the 1 MiB ceiling.
    let ceiling = MAX_FRAME_CEILING as u32;
    for (claimed, carried) in [
        (4 * 1024, 2),
        (100 * 1024, 2),
        (ceiling - 64, 2),
        (64 * 1024, 1000),
        (ceiling / 2, 30_000),
    ] {
        let mut buf = hello_claiming_a_name_of(claimed, carried);
        let err = ServerCodec::new(MAX_FRAME_CEILING)
            .decode(&mut buf)
            .unwrap_err();
        assert!(
            matches!(&err, CodecError::Decode(m) if m.contains("LimitExceeded")),
            "a name claiming {claimed} bytes with {carried} sent: \
             expected LimitExceeded, got: {err}"
        );
    }
}

#[test]
fn claimed_data_is_checked_before_allocating() {
    // An Acquire whose `data` claims ~1 MiB but carries nothing: a sequence of u8 would be
    // reserved up front (serde's cautious size hint), a byte string is claimed against the
    // limit first.
    let acquire = ClientMessage::Request(crate::Request {
        id: 1,
        op: Op::Acquire(crate::Acquire {
            key: crate::Key::in_default("k").unwrap(),
            mode: crate::Mode::Exclusive,
            wait: crate::Wait::No,
            lease_ms: None,
            detach: false,
            permits: None,
            lock_delay_ms: 0,
            data: vec![7; 3],
        }),
    });
    let mut buf = BytesMut::new();
    ClientCodec::new(MAX_FRAME_CEILING)
        .encode(&acquire, &mut buf)
        .unwrap();
    // The payload ends with the data: varint length 3, then the 3 bytes. Claim 1,000,000
    // (varint 0xfc + u32 big-endian) and drop the bytes.
    let payload_end = buf.len() - 4;
    buf.truncate(payload_end);
    buf.extend_from_slice(&[0xfc, 0x00, 0x0f, 0x42, 0x40]);
    let len = (buf.len() - LEN_BYTES) as u32;
    buf[..LEN_BYTES].copy_from_slice(&len.to_be_bytes());
    let err = ServerCodec::new(MAX_FRAME_CEILING)
        .decode(&mut buf)
        .unwrap_err();
    assert!(
        matches!(&err, CodecError::Decode(m) if m.contains("LimitExceeded")),
        "expected LimitExceeded, got: {err}"
    );
}

#[test]
fn integer_heavy_messages_decode_at_every_size() {
    // bincode counts a varint integer at its in-memory size (8 bytes for a u64 sent as one
    // byte), so a valid message can claim 8 times its payload against the limit.
    let mut client = ClientCodec::new(MAX_FRAME_CEILING);
    let mut server = ServerCodec::new(MAX_FRAME_CEILING);
    let lens = [
        0, 1, 30, 31, 32, 33, 120, 127, 128, 129, 250, 255, 256, 257, 500, 1000,
    ];
    let lens = lens
        .into_iter()
        .chain([
            1020, 1023, 1024, 1025, 2047, 2048, 4090, 4096, 8191, 16_000, 16_384,
        ])
        .chain([65_000, 65_536, 100_000, 131_000]);
    for len in lens {
        let msg = ServerMessage::Response(Response {
            id: 0,
            result: Ok(Reply::Stats(Stats {
                wait_ms: Histogram {
                    bounds_ms: vec![0; len],
                    counts: vec![],
                    sum_ms: 0,
                },
                ..Stats::default()
            })),
        });
        let mut buf = BytesMut::new();
        server.encode(&msg, &mut buf).unwrap();
        let payload = buf.len() - LEN_BYTES;
        match client.decode(&mut buf) {
            Ok(Some(got)) => assert_eq!(got, msg, "{len} zeros"),
            other => panic!("{len} zeros in a {payload}-byte payload: {other:?}"),
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut server = ServerCodec::new(256);
        let mut buf = BytesMut::from(&bytes[..]);
        for _ in 0..64 {
            match server.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn framed_arbitrary_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut server = ServerCodec::default();
        let mut buf = BytesMut::new();
        buf.put_u32(payload.len() as u32);
        buf.extend_from_slice(&payload);
        let _ = server.decode(&mut buf);
    }
}

/// Requests of the kinds the fast decoder reads, with every field arbitrary.
fn hot_requests() -> impl Strategy<Value = ClientMessage> {
    let wait = prop_oneof![
        Just(Wait::No),
        any::<u64>().prop_map(Wait::Millis),
        Just(Wait::Forever),
    ];
    let acquire = (
        ("\\PC{0,12}", "\\PC{0,24}"),
        any::<bool>(),
        wait,
        any::<Option<u64>>(),
        any::<bool>(),
        any::<Option<u32>>(),
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(
            |((namespace, name), shared, wait, lease_ms, detach, permits, lock_delay_ms, data)| {
                Op::Acquire(Acquire {
                    key: Key { namespace, name },
                    mode: if shared {
                        Mode::Shared
                    } else {
                        Mode::Exclusive
                    },
                    wait,
                    lease_ms,
                    detach,
                    permits,
                    lock_delay_ms,
                    data,
                })
            },
        );
    let release = any::<[u8; crate::ticket::TICKET_LEN]>().prop_map(|b| Op::Release {
        ticket: Ticket::from_bytes(b),
    });
    (any::<u64>(), prop_oneof![acquire, release])
        .prop_map(|(id, op)| ClientMessage::Request(Request { id, op }))
}

/// The payload bincode writes for `msg` (the frame without its length prefix).
fn payload_of(msg: &ClientMessage) -> Vec<u8> {
    let mut buf = BytesMut::new();
    ClientCodec::default().encode(msg, &mut buf).unwrap();
    buf[LEN_BYTES..].to_vec()
}

/// The fast decoder's contract: `Some` only with bincode's own answer.
fn agrees_with_bincode(payload: &[u8]) -> Result<(), TestCaseError> {
    if let Some(fast) = ClientMessage::fast_decode(payload) {
        let slow: ClientMessage = decode_payload(payload).map_err(|e| {
            TestCaseError::fail(format!("fast path accepted what bincode refuses: {e}"))
        })?;
        prop_assert_eq!(fast, slow);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_fast_decoder_reads_every_hot_request_as_bincode_does(msg in hot_requests()) {
        let payload = payload_of(&msg);
        prop_assert_eq!(ClientMessage::fast_decode(&payload), Some(msg));
    }

    #[test]
    fn the_fast_decoder_never_accepts_a_damaged_request_differently(
        msg in hot_requests(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        extra in proptest::collection::vec(any::<u8>(), 0..3),
    ) {
        let mut payload = payload_of(&msg);
        for (at, byte) in edits {
            let i = at.index(payload.len());
            payload[i] = byte;
        }
        agrees_with_bincode(&payload)?;
        agrees_with_bincode(&payload[..cut.index(payload.len() + 1)])?;
        payload.extend_from_slice(&extra);
        agrees_with_bincode(&payload)?;
    }

    #[test]
    fn the_fast_decoder_never_accepts_arbitrary_bytes_differently(
        tail in proptest::collection::vec(any::<u8>(), 0..80),
        op in 0u8..3,
    ) {
        // A Request (variant 1) with request id 7 and operation `op`, then anything.
        let mut payload = vec![1, 7, op];
        payload.extend_from_slice(&tail);
        agrees_with_bincode(&payload)?;
    }
}

/// Answers of the kinds the fast encoder writes, with every field arbitrary.
fn hot_answers() -> impl Strategy<Value = ServerMessage> {
    let granted = (
        any::<[u8; crate::ticket::TICKET_LEN]>(),
        any::<u64>(),
        any::<bool>(),
        any::<Option<u64>>(),
    )
        .prop_map(|(t, fence, shared, expires_at_ms)| {
            Reply::Granted(Grant {
                ticket: Ticket::from_bytes(t),
                fence,
                mode: if shared {
                    Mode::Shared
                } else {
                    Mode::Exclusive
                },
                expires_at_ms,
            })
        });
    let reply = prop_oneof![granted, Just(Reply::Released), Just(Reply::Pong)];
    (any::<u64>(), reply).prop_map(|(id, reply)| {
        ServerMessage::Response(Response {
            id,
            result: Ok(reply),
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_fast_encoder_writes_bincodes_bytes_or_nothing(
        msg in hot_answers(),
        max_frame in 16usize..64,
        prefix in proptest::collection::vec(any::<u8>(), 0..4),
    ) {
        let mut slow = BytesMut::from(&prefix[..]);
        let slow_result = encode_frame(&msg, &mut slow, max_frame);
        let mut fast = BytesMut::from(&prefix[..]);
        if msg.fast_encode(&mut fast, max_frame) {
            prop_assert!(slow_result.is_ok());
            prop_assert_eq!(&fast[..], &slow[..]);
        } else {
            prop_assert_eq!(&fast[..], &prefix[..]);
        }
        // Through the codec, the bytes are bincode's either way.
        let mut via_codec = BytesMut::from(&prefix[..]);
        let codec_result = ServerCodec::new(max_frame).encode(&msg, &mut via_codec);
        prop_assert_eq!(codec_result.is_ok(), slow_result.is_ok());
        if slow_result.is_ok() {
            prop_assert_eq!(&via_codec[..], &slow[..]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_client_side_fast_paths_write_and_read_bincodes_bytes(
        request in hot_requests(),
        answer in hot_answers(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        // Encoding a request: the same frame as bincode's.
        let mut fast = BytesMut::new();
        let mut slow = BytesMut::new();
        let wrote = request.fast_encode(&mut fast, DEFAULT_MAX_FRAME);
        encode_frame(&request, &mut slow, DEFAULT_MAX_FRAME).unwrap();
        prop_assert!(wrote);
        prop_assert_eq!(&fast[..], &slow[..]);
        if let ClientMessage::Request(Request { id, op }) = &request {
            let mut by_ref = BytesMut::new();
            ClientCodec::default().encode_request(*id, op, &mut by_ref).unwrap();
            prop_assert_eq!(&by_ref[..], &slow[..]);
        }
        // Decoding an answer: bincode's reading, also of damaged bytes.
        let mut payload = BytesMut::new();
        encode_frame(&answer, &mut payload, DEFAULT_MAX_FRAME).unwrap();
        let mut payload = payload[LEN_BYTES..].to_vec();
        if matches!(answer, ServerMessage::Response(Response { result: Ok(Reply::Granted(_) | Reply::Released), .. })) {
            prop_assert_eq!(ServerMessage::fast_decode(&payload), Some(answer.clone()));
        }
        for (at, byte) in edits {
            let i = at.index(payload.len());
            payload[i] = byte;
        }
        if let Some(fast) = ServerMessage::fast_decode(&payload) {
            let slow: ServerMessage = decode_payload(&payload)
                .map_err(|e| TestCaseError::fail(format!("fast path accepted what bincode refuses: {e}")))?;
            prop_assert_eq!(fast, slow);
        }
    }
}
