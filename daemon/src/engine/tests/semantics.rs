//! Counting semaphores and lock-delay in the engine.

use super::*;

fn acquire_with(name: &str, wait: Wait, permits: Option<u32>, lock_delay_ms: u64) -> Op {
    Op::Acquire(Acquire {
        key: k(name),
        mode: Mode::Exclusive,
        wait,
        lease_ms: None,
        detach: false,
        permits,
        lock_delay_ms,
        data: Vec::new(),
    })
}

#[tokio::test]
async fn a_semaphore_admits_its_permits_in_fifo_order_and_a_closed_holder_frees_a_slot() {
    let (s, _timers) = setup();
    let mut conns: Vec<_> = (0..5).map(|i| s.conn(10 + i, 10)).collect();
    let mut fences = Vec::new();
    for (c, _) in conns.iter_mut().take(3) {
        fences.push(granted(now(c.handle(1, acquire_with("pool", Wait::No, Some(3), 0)))).fence);
    }
    let full = now(conns[3]
        .0
        .handle(1, acquire_with("pool", Wait::No, Some(3), 0)));
    assert_eq!(code(full), ErrorCode::Conflict);
    for i in [3, 4] {
        let queued = conns[i]
            .0
            .handle(2, acquire_with("pool", Wait::Forever, Some(3), 0));
        assert!(matches!(queued, Answer::Queued));
    }
    let d = s.engine.describe(&k("pool"), 65536);
    assert_eq!(
        (d.permits, d.holders.len(), d.waiters.len()),
        (Some(3), 3, 2)
    );
    drop(conns.remove(0)); // a holder's connection closes: its slot goes to the first waiter
    let (c3, mail3) = &mut conns[2];
    assert!(matches!(
        next_push(c3, mail3),
        Outgoing::Answer(2, Answer::Now(Ok(_)))
    ));
    assert!(
        conns[3].1.try_recv().is_err(),
        "the second waiter still waits"
    );
    assert_eq!(s.holds_on("pool").len(), 3);
}

#[tokio::test]
async fn a_semaphore_refuses_another_capacity_and_plain_or_shared_requests() {
    let (s, _timers) = setup();
    let ((mut a, _), (mut b, _)) = (s.conn(1, 10), s.conn(2, 10));
    granted(now(a.handle(1, acquire_with("pool", Wait::No, Some(3), 0))));
    let other = now(b.handle(1, acquire_with("pool", Wait::No, Some(4), 0)));
    match other {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("3 permits"), "{m}"),
        r => panic!("expected InvalidArgument, got {r:?}"),
    }
    let plain = now(b.handle(2, acquire_with("pool", Wait::No, None, 0)));
    assert_eq!(code(plain), ErrorCode::InvalidArgument);
    let mut shared = Acquire {
        key: k("other"),
        mode: Mode::Shared,
        wait: Wait::No,
        lease_ms: None,
        detach: false,
        permits: Some(2),
        lock_delay_ms: 0,
        data: Vec::new(),
    };
    assert_eq!(
        code(now(b.handle(3, Op::Acquire(shared.clone())))),
        ErrorCode::InvalidArgument
    );
    shared.mode = Mode::Exclusive;
    shared.permits = Some(0);
    assert_eq!(
        code(now(b.handle(4, Op::Acquire(shared)))),
        ErrorCode::InvalidArgument
    );
    // A plain lock on a key refuses semaphore requests too.
    granted(now(a.handle(5, acquire_with("lock", Wait::No, None, 0))));
    let sem = now(b.handle(6, acquire_with("lock", Wait::No, Some(2), 0)));
    assert_eq!(code(sem), ErrorCode::InvalidArgument);
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_disconnects_leaves_its_lock_delay_and_a_clean_release_none() {
    let (s, timers) = setup();
    tokio::spawn(timers.run(Arc::clone(&s.engine)));
    let ((mut a, _), (mut b, mut bmail)) = (s.conn(1, 10), s.conn(2, 10));
    granted(now(a.handle(1, acquire_with("k", Wait::No, None, 5_000))));
    assert!(matches!(
        b.handle(1, acquire_with("k", Wait::Forever, None, 0)),
        Answer::Queued
    ));
    drop(a); // unclean: the key stays unavailable for 5 s
    let d = s.engine.describe(&k("k"), 65536);
    assert!(d.delayed_until_ms.is_some(), "describe shows the delay");
    let (mut c, _) = s.conn(3, 10);
    match now(c.handle(1, acquire_with("k", Wait::No, None, 0))) {
        Err(Error::Conflict(m)) => assert!(m.contains("lock-delay"), "{m}"),
        r => panic!("expected Conflict, got {r:?}"),
    }
    tokio::time::sleep(Duration::from_millis(4_000)).await;
    settle().await;
    assert!(bmail.try_recv().is_err(), "not granted during the delay");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    settle().await;
    let g = match next_push(&mut b, &mut bmail) {
        Outgoing::Answer(1, Answer::Now(r)) => granted(r),
        _ => panic!("granted when the delay ended"),
    };
    assert!(s.engine.describe(&k("k"), 65536).delayed_until_ms.is_none());
    // A clean release never delays.
    let (mut w, mut wmail) = s.conn(4, 10);
    assert!(matches!(
        w.handle(1, acquire_with("k", Wait::Forever, None, 0)),
        Answer::Queued
    ));
    now(b.handle(2, Op::Release { ticket: g.ticket })).expect("released");
    assert!(matches!(
        next_push(&mut w, &mut wmail),
        Outgoing::Answer(1, Answer::Now(Ok(_)))
    ));
}

#[tokio::test(start_paused = true)]
async fn force_release_and_expiry_start_the_lock_delay_too() {
    let (s, timers) = setup();
    tokio::spawn(timers.run(Arc::clone(&s.engine)));
    let ((mut a, _), (mut admin, _)) = (s.conn(1, 10), s.conn(2, 0));
    granted(now(
        a.handle(1, acquire_with("forced", Wait::No, None, 3_000))
    ));
    now(admin.handle(1, Op::ForceRelease { key: k("forced") })).expect("forced");
    assert!(s
        .engine
        .describe(&k("forced"), 65536)
        .delayed_until_ms
        .is_some());
    let mut leased = Acquire {
        key: k("leased"),
        mode: Mode::Exclusive,
        wait: Wait::No,
        lease_ms: Some(1_000),
        detach: false,
        permits: None,
        lock_delay_ms: 3_000,
        data: Vec::new(),
    };
    granted(now(a.handle(2, Op::Acquire(leased.clone()))));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    settle().await;
    assert!(s.holds_on("leased").is_empty(), "expired");
    assert!(s
        .engine
        .describe(&k("leased"), 65536)
        .delayed_until_ms
        .is_some());
    leased.lease_ms = None;
    assert_eq!(
        code(now(a.handle(3, Op::Acquire(leased.clone())))),
        ErrorCode::Conflict
    );
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    settle().await;
    granted(now(a.handle(4, Op::Acquire(leased))));
    assert!(s
        .engine
        .describe(&k("forced"), 65536)
        .delayed_until_ms
        .is_none());
}
