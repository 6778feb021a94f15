//! Deadlock detection: cycles of every length and mode refused with `Deadlock` (the request
//! that closes the cycle, nobody else), and no false positive against a brute-force model.

use proptest::prelude::*;

use super::*;

fn wait_on(name: &str, mode: Mode) -> Op {
    Op::Acquire(Acquire {
        key: k(name),
        mode,
        wait: Wait::Forever,
        lease_ms: None,
        detach: false,
        permits: None,
        lock_delay_ms: 0,
        data: Vec::new(),
    })
}

fn take(name: &str, mode: Mode) -> Op {
    Op::Acquire(Acquire {
        key: k(name),
        mode,
        wait: Wait::No,
        lease_ms: None,
        detach: false,
        permits: None,
        lock_delay_ms: 0,
        data: Vec::new(),
    })
}

#[track_caller]
fn deadlock_message(answer: Answer) -> String {
    match now(answer) {
        Err(Error::Deadlock(m)) => m,
        other => panic!("expected Deadlock, got {other:?}"),
    }
}

#[tokio::test]
async fn a_two_cycle_refuses_the_wait_that_closes_it_and_names_it() {
    let (s, _timers) = setup();
    let ((mut a, _), (mut b, _), (mut w, mut wmail)) =
        (s.conn(1, 10), s.conn(2, 11), s.conn(3, 12));
    now(w.handle(1, Op::Watch { key: k("k1") })).expect("watching");
    granted(now(a.handle(1, take("k1", Mode::Exclusive))));
    granted(now(b.handle(1, take("k2", Mode::Exclusive))));
    assert!(matches!(
        a.handle(2, wait_on("k2", Mode::Exclusive)),
        Answer::Queued
    ));
    let m = deadlock_message(b.handle(2, wait_on("k1", Mode::Exclusive)));
    for part in [
        "k1",
        "k2",
        "pid 1001 uid 10 client \"c1\"",
        "pid 1002 uid 11 client \"c2\"",
    ] {
        assert!(m.contains(part), "{part:?} missing from {m}");
    }
    // A is untouched: still waiting, granted when B lets go.
    assert_eq!(s.engine.describe(&k("k2"), 65536).waiters.len(), 1);
    assert!(
        s.engine.describe(&k("k1"), 65536).waiters.is_empty(),
        "B's wait withdrawn"
    );
    let totals = s.engine.totals(u64::MAX);
    assert_eq!(totals.stats.deadlocks, 1);
    let mut told = false;
    while let Ok(push) = wmail.try_recv() {
        told |= matches!(
            w.on_push(push),
            Outgoing::Event(Event::Watch {
                change: lockd_protocol::Change::Deadlock { .. },
                ..
            })
        );
    }
    assert!(told, "the watcher of k1 heard of the deadlock");
}

#[tokio::test]
async fn a_three_cycle_across_shards_is_refused() {
    let (s, _timers) = setup();
    // Three keys in three different shards.
    let mut names = Vec::new();
    let mut shards = std::collections::HashSet::new();
    for i in 0.. {
        let name = format!("key-{i}");
        if shards.insert(s.engine.locks.shard_of(&k(&name))) {
            names.push(name);
        }
        if names.len() == 3 {
            break;
        }
    }
    let mut conns: Vec<_> = (0..3).map(|i| s.conn(1 + i, 10)).collect();
    for (i, (c, _)) in conns.iter_mut().enumerate() {
        granted(now(c.handle(1, take(&names[i], Mode::Exclusive))));
    }
    assert!(matches!(
        conns[0].0.handle(2, wait_on(&names[1], Mode::Exclusive)),
        Answer::Queued
    ));
    assert!(matches!(
        conns[1].0.handle(2, wait_on(&names[2], Mode::Exclusive)),
        Answer::Queued
    ));
    let m = deadlock_message(conns[2].0.handle(2, wait_on(&names[0], Mode::Exclusive)));
    for name in &names {
        assert!(m.contains(name.as_str()), "{name} missing from {m}");
    }
}

#[tokio::test]
async fn shared_and_exclusive_mixes_and_a_wait_on_ones_own_hold() {
    let (s, _timers) = setup();
    let ((mut a, _), (mut b, _), (mut c, _)) = (s.conn(1, 10), s.conn(2, 10), s.conn(3, 10));
    // A and B read k1; C holds k2 and waits to write k1 (behind both readers).
    granted(now(a.handle(1, take("k1", Mode::Shared))));
    granted(now(b.handle(1, take("k1", Mode::Shared))));
    granted(now(c.handle(1, take("k2", Mode::Exclusive))));
    assert!(matches!(
        c.handle(2, wait_on("k1", Mode::Exclusive)),
        Answer::Queued
    ));
    // A reading k2 would wait for C, which waits for A: refused.
    deadlock_message(a.handle(2, wait_on("k2", Mode::Shared)));
    // A shared request behind C's queued write waits for C too: B waiting for k1 again is a
    // cycle B -> C -> B only if C waits for B, which it does (B holds k1).
    deadlock_message(b.handle(2, wait_on("k1", Mode::Shared)));
    // Waiting on a key one holds exclusively waits for oneself.
    let (mut d, _) = s.conn(4, 10);
    granted(now(d.handle(1, take("own", Mode::Exclusive))));
    let m = deadlock_message(d.handle(2, wait_on("own", Mode::Exclusive)));
    assert!(m.contains("own"), "{m}");
    // No false positive: a plain wait behind someone who waits for nothing.
    let (mut e, _) = s.conn(5, 10);
    granted(now(e.handle(1, take("other", Mode::Exclusive))));
    assert!(matches!(
        e.handle(2, wait_on("k2", Mode::Exclusive)),
        Answer::Queued
    ));
}

#[tokio::test]
async fn waits_of_connections_that_hold_nothing_are_never_searched_but_count_later() {
    let (s, _timers) = setup();
    let ((mut a, _), (mut b, _)) = (s.conn(1, 10), s.conn(2, 10));
    granted(now(a.handle(1, take("k1", Mode::Exclusive))));
    // B holds nothing: its wait on k1 is not registered...
    assert!(matches!(
        b.handle(1, wait_on("k1", Mode::Exclusive)),
        Answer::Queued
    ));
    // ...until B takes a hold: then A waiting for B's k2 closes A -> B -> A.
    granted(now(b.handle(2, take("k2", Mode::Exclusive))));
    deadlock_message(a.handle(2, wait_on("k2", Mode::Exclusive)));
}

/// The wait-for graph of the table, from scratch: connection -> connections it waits for.
fn graph(s: &Setup) -> HashMap<u64, HashSet<u64>> {
    let mut edges: HashMap<u64, HashSet<u64>> = HashMap::default();
    for (_, holders, queue) in s.engine.locks.queues() {
        for (i, (waiter, _)) in queue.iter().enumerate() {
            let out = edges.entry(*waiter).or_default();
            out.extend(holders.iter().copied());
            out.extend(queue[..i].iter().map(|(o, _)| *o));
        }
    }
    edges
}

fn has_cycle(edges: &HashMap<u64, HashSet<u64>>) -> bool {
    fn reach(
        edges: &HashMap<u64, HashSet<u64>>,
        from: u64,
        to: u64,
        seen: &mut HashSet<u64>,
    ) -> bool {
        for &n in edges.get(&from).into_iter().flatten() {
            if n == to || (seen.insert(n) && reach(edges, n, to, seen)) {
                return true;
            }
        }
        false
    }
    edges
        .keys()
        .any(|&n| reach(edges, n, n, &mut HashSet::new()))
}

#[derive(Debug, Clone)]
enum Step {
    Acquire {
        conn: usize,
        key: u8,
        shared: bool,
        wait: bool,
    },
    Release {
        conn: usize,
        nth: usize,
    },
    Cancel {
        conn: usize,
    },
    Deliver {
        conn: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..4usize, 0..4u8, any::<bool>(), proptest::bool::weighted(0.7))
            .prop_map(|(conn, key, shared, wait)| Step::Acquire { conn, key, shared, wait }),
        2 => (0..4usize, 0..4usize).prop_map(|(conn, nth)| Step::Release { conn, nth }),
        1 => (0..4usize).prop_map(|conn| Step::Cancel { conn }),
        3 => (0..4usize).prop_map(|conn| Step::Deliver { conn }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Random workloads: a wait is refused exactly when adding it makes the brute-force graph
    /// cyclic, so the table's graph never has a cycle.
    #[test]
    fn deadlocks_are_refused_exactly_when_a_cycle_would_close(steps in proptest::collection::vec(step(), 1..80)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async move {
            let (s, _timers) = setup();
            let mut conns: Vec<_> = (0..4).map(|i| s.conn(1 + i as u64, 10)).collect();
            let mut tickets: Vec<Vec<Ticket>> = vec![Vec::new(); 4];
            let mut waiting: Vec<Vec<u64>> = vec![Vec::new(); 4];
            let mut next = 1u64;
            for step in steps {
                match step {
                    Step::Acquire { conn, key, shared, wait } => {
                        let mode = if shared { Mode::Shared } else { Mode::Exclusive };
                        let name = format!("k{key}");
                        let op = if wait { wait_on(&name, mode) } else { take(&name, mode) };
                        let id = next;
                        next += 1;
                        match conns[conn].0.handle(id, op) {
                            Answer::Now(Ok(Reply::Granted(g))) => tickets[conn].push(g.ticket),
                            Answer::Now(Err(Error::Deadlock(_))) => {
                                // Justified: with this wait added the graph has a cycle.
                                let mut edges = graph(&s);
                                prop_assert!(!has_cycle(&edges), "cycle before the refused wait");
                                let me = conns[conn].0.owner().id;
                                let e = s.engine.locks.queues();
                                let (_, holders, queue) = e.iter().find(|q| q.0 == k(&name))
                                    .cloned().unwrap_or((k(&name), Vec::new(), Vec::new()));
                                let out = edges.entry(me).or_default();
                                out.extend(holders);
                                out.extend(queue.iter().map(|(o, _)| *o));
                                prop_assert!(has_cycle(&edges), "Deadlock without a cycle");
                            }
                            Answer::Now(_) => {}
                            Answer::Queued => waiting[conn].push(id),
                            Answer::AfterCommit(_) => prop_assert!(false, "no leases here"),
                        }
                    }
                    Step::Release { conn, nth } => {
                        if !tickets[conn].is_empty() {
                            let n = tickets[conn].len();
                            let t = tickets[conn].remove(nth % n);
                            let _ = conns[conn].0.handle(next, Op::Release { ticket: t });
                            next += 1;
                        }
                    }
                    Step::Cancel { conn } => {
                        if let Some(request) = waiting[conn].pop() {
                            let _ = conns[conn].0.handle(next, Op::Cancel { request });
                            conns[conn].0.take_side_answers();
                            next += 1;
                        }
                    }
                    Step::Deliver { conn } => {
                        let (c, mail) = &mut conns[conn];
                        while let Ok(push) = mail.try_recv() {
                            if let Outgoing::Answer(id, Answer::Now(Ok(Reply::Granted(g)))) = c.on_push(push) {
                                tickets[conn].push(g.ticket);
                                waiting[conn].retain(|w| *w != id);
                            }
                        }
                    }
                }
                prop_assert!(!has_cycle(&graph(&s)), "the table's wait-for graph has a cycle");
            }
            Ok(())
        })?;
    }
}

/// A load generator, run on purpose (it asserts nothing about speed):
/// `cargo test --release -p lockd --lib deadlock_detection_cost -- --ignored --nocapture`
#[tokio::test]
#[ignore]
async fn deadlock_detection_cost() {
    use std::time::Instant;
    let per = |t: Instant, n: usize| t.elapsed().as_nanos() as f64 / n as f64 / 1000.0;
    let n = 10_000;
    // Baseline: acquires that conflict at once (no queue, no detection).
    let (s, _timers) = setup();
    let (mut holder, _) = s.conn(1, 10);
    granted(now(holder.handle(1, take("hot", Mode::Exclusive))));
    let mut conns: Vec<_> = (0..n).map(|i| s.conn(10 + i as u64, 10)).collect();
    let t = Instant::now();
    for (c, _) in conns.iter_mut() {
        let _ = c.handle(1, take("hot", Mode::Exclusive));
    }
    println!(
        "try-acquire that conflicts:                {:>8.2} µs each",
        per(t, n)
    );
    // 10,000 waiters on one key, holding nothing: never searched.
    let t = Instant::now();
    for (c, _) in conns.iter_mut() {
        assert!(matches!(
            c.handle(2, wait_on("hot", Mode::Exclusive)),
            Answer::Queued
        ));
    }
    println!(
        "queue behind 10,000 (waiters hold nothing): {:>8.2} µs each",
        per(t, n)
    );
    // 10,000 waiters on one key that each hold another key: every wait is searched.
    let (s, _timers) = setup();
    let (mut holder, _) = s.conn(1, 10);
    granted(now(holder.handle(1, take("hot", Mode::Exclusive))));
    let mut conns: Vec<_> = (0..n).map(|i| s.conn(10 + i as u64, 10)).collect();
    for (i, (c, _)) in conns.iter_mut().enumerate() {
        granted(now(c.handle(1, take(&format!("own-{i}"), Mode::Exclusive))));
    }
    let t = Instant::now();
    for (c, _) in conns.iter_mut() {
        assert!(matches!(
            c.handle(2, wait_on("hot", Mode::Exclusive)),
            Answer::Queued
        ));
    }
    println!(
        "queue behind 10,000 (waiters hold a key):   {:>8.2} µs each",
        per(t, n)
    );
    // A chain: 1,000 connections each holding one key and waiting for the next, built from
    // the far end (each new wait walks the whole chain ahead), then closed.
    let m = 1_000;
    let (s, _timers) = setup();
    let mut conns: Vec<_> = (0..m).map(|i| s.conn(1 + i as u64, 10)).collect();
    for (i, (c, _)) in conns.iter_mut().enumerate() {
        granted(now(c.handle(1, take(&format!("c{i}"), Mode::Exclusive))));
    }
    let t = Instant::now();
    for i in (0..m - 1).rev() {
        let next = format!("c{}", i + 1);
        assert!(matches!(
            conns[i].0.handle(2, wait_on(&next, Mode::Exclusive)),
            Answer::Queued
        ));
    }
    println!(
        "chain of 1,000, each wait walks the rest:   {:>8.2} µs each",
        per(t, m - 1)
    );
    let t = Instant::now();
    deadlock_message(conns[m - 1].0.handle(2, wait_on("c0", Mode::Exclusive)));
    println!(
        "closing the 1,000-cycle (refused):          {:>8.2} µs",
        per(t, 1)
    );
}
