//! Property test over request handling: random (often invalid) requests sent to the real
//! daemon never crash it, every request gets exactly one answer, and other clients keep
//! working. `PROPTEST_CASES` sets the number of cases (default here: 64; the closing note
//! reports a run of 100,000 with `PROPTEST_CASES=100000 cargo test --release -p lockd --test it fuzz`).

use std::time::Duration;

use lockd_protocol::{
    Acquire, ClientMessage, Key, ListQuery, Mode, Op, Request, ServerMessage, Ticket, Wait,
};
use lockd_tests::raw::RawConn;
use lockd_tests::TestDaemon;
use proptest::prelude::*;

use crate::LOCKD;

fn key() -> impl Strategy<Value = Key> {
    (
        prop_oneof!["default", "ops", "[a-z0-9._-]{1,8}", ".{0,70}"],
        prop_oneof!["[a-c]", ".{0,40}", ".{255,260}"],
    )
        .prop_map(|(namespace, name)| Key { namespace, name })
}

fn ticket() -> impl Strategy<Value = Ticket> {
    any::<[u8; 16]>().prop_map(Ticket::from_bytes)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (key(), any::<bool>(), prop_oneof![Just(Wait::No), (0u64..30).prop_map(Wait::Millis)],
              proptest::option::of(0u64..100_000), any::<bool>(), proptest::collection::vec(any::<u8>(), 0..1100))
            .prop_map(|(key, shared, wait, lease_ms, detach, data)| Op::Acquire(Acquire {
                key,
                mode: if shared { Mode::Shared } else { Mode::Exclusive },
                wait,
                lease_ms,
                detach,
                permits: None,
                lock_delay_ms: 0,
                data,
            })),
        1 => ticket().prop_map(|ticket| Op::Release { ticket }),
        1 => (ticket(), proptest::option::of(any::<u64>())).prop_map(|(ticket, lease_ms)| Op::Renew { ticket, lease_ms }),
        1 => any::<u64>().prop_map(|request| Op::Cancel { request }),
        1 => key().prop_map(|key| Op::Describe { key }),
        1 => (proptest::option::of(".{0,70}"), ".{0,10}", any::<u32>()).prop_map(|(namespace, prefix, limit)| {
            Op::List(ListQuery { namespace, prefix, after: None, limit })
        }),
        1 => key().prop_map(|key| Op::Watch { key }),
        1 => key().prop_map(|key| Op::Unwatch { key }),
        1 => key().prop_map(|key| Op::ForceRelease { key }),
        1 => Just(Op::Stats),
        1 => Just(Op::Ping),
    ]
}

/// A runner with `PROPTEST_CASES` cases (default 64) and no failure files.
fn runner() -> (u32, proptest::test_runner::TestRunner) {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(64);
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    (cases, proptest::test_runner::TestRunner::new(config))
}

#[test]
fn random_requests_never_hurt_the_daemon() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let d = rt.block_on(TestDaemon::start(LOCKD));
    let bystander = rt.block_on(d.client());
    let (cases, mut runner) = runner();
    let result = runner.run(&proptest::collection::vec(op(), 1..8), |ops| {
        rt.block_on(async {
            let mut raw = RawConn::connect_hello(&d.socket).await;
            let n = ops.len();
            for (i, op) in ops.into_iter().enumerate() {
                raw.send(ClientMessage::Request(Request { id: i as u64, op }))
                    .await;
            }
            let mut answered = vec![false; n];
            let mut got = 0;
            while got < n {
                match raw.recv(Duration::from_secs(10)).await {
                    Some(ServerMessage::Response(r)) => {
                        let i = r.id as usize;
                        prop_assert!(i < n && !answered[i], "unexpected or repeated answer {r:?}");
                        answered[i] = true;
                        got += 1;
                    }
                    Some(ServerMessage::Event(_)) => {}
                    other => prop_assert!(false, "expected answers, got {other:?}"),
                }
            }
            prop_assert!(
                bystander.ping().await.is_ok(),
                "the daemon stopped serving others"
            );
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}\n{}", d.log_tail());
    }
    eprintln!("{cases} random request sequences handled");
}

/// Raw bytes after a good handshake (garbage, truncated and oversized frames, a second Hello,
/// valid frames mixed in): the offender is answered or closed, never anyone else.
#[test]
fn random_bytes_close_only_their_connection() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let d = rt.block_on(TestDaemon::start(LOCKD));
    let bystander = rt.block_on(d.client());
    let held = rt.block_on(bystander.try_lock("bystander-lock")).unwrap();
    let (cases, mut runner) = runner();
    let chunk = prop_oneof![
        // A plausible frame: length prefix and arbitrary payload (maybe shorter than claimed).
        (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(len, body)| {
            let mut v = (len % 200).to_be_bytes().to_vec();
            v.extend(body);
            v
        }),
        // An oversized length prefix.
        any::<u32>().prop_map(|len| (len | 0x0100_0000).to_be_bytes().to_vec()),
        // Pure noise.
        proptest::collection::vec(any::<u8>(), 0..64),
    ];
    let result = runner.run(&proptest::collection::vec(chunk, 1..6), |chunks| {
        rt.block_on(async {
            let mut raw = RawConn::connect_hello(&d.socket).await;
            for c in &chunks {
                raw.send_bytes(c).await;
            }
            // Whatever it says, the connection ends or idles; it never takes others down.
            let _ = raw.recv(Duration::from_millis(50)).await;
            drop(raw);
            prop_assert!(
                bystander.ping().await.is_ok(),
                "the daemon stopped serving others"
            );
            prop_assert!(!held.is_lost(), "another client's lock was lost");
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}\n{}", d.log_tail());
    }
    eprintln!("{cases} random byte sequences survived");
}
