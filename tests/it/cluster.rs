//! The etcd backend against a real etcd (one member, or three), with two lockd daemons sharing
//! it as if on two hosts ("host-a", "host-b": two sockets, two session leases). Each test says
//! SKIPPED when no etcd binary is installed; CI sets LOCKD_REQUIRE_ETCD_TESTS=1 and installs it.
//!
//! Timings the closing note quotes are printed with `cargo test -p lockd --test it cluster --
//! --nocapture`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockd_client::{Client, Lost};
use lockd_protocol::{ErrorCode, Key, Mode};
use lockd_tests::etcd::Etcd;
use lockd_tests::{within, TestDaemon};

use crate::{enqueue, lockctl, poll_once, LOCKCTL, LOCKD, PROMPT};

/// Two daemons on one etcd cluster, with the given session TTL.
async fn two_hosts(etcd: &Etcd, ttl: &str, request_timeout: &str) -> (TestDaemon, TestDaemon) {
    let a = etcd.lockd_config("host-a", ttl, request_timeout);
    let b = etcd.lockd_config("host-b", ttl, request_timeout);
    let a = TestDaemon::start_with(LOCKD, &["--config", a.to_str().expect("utf-8 path")]).await;
    let b = TestDaemon::start_with(LOCKD, &["--config", b.to_str().expect("utf-8 path")]).await;
    (a, b)
}

/// One daemon ("host-a") on the cluster.
async fn one_host(etcd: &Etcd) -> TestDaemon {
    let conf = etcd.lockd_config("host-a", "10s", "2s");
    TestDaemon::start_with(LOCKD, &["--config", conf.to_str().expect("utf-8 path")]).await
}

/// Waits until `name` has `n` waiters in etcd: on the cluster a request is in the queue once
/// its entry is written, which a ping on the same connection does not wait for.
async fn queued(c: &Client, name: &str, n: usize) {
    within(PROMPT, "the waiter's entry is in etcd", async {
        while c
            .describe(&key(name))
            .await
            .expect("describe")
            .waiters
            .len()
            < n
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Locks `name`, trying again while the daemon answers Unavailable (etcd electing a leader or
/// coming back), at most `limit`; any other refusal fails the test.
async fn lock_while_unavailable(
    c: &Client,
    name: &str,
    limit: Duration,
) -> lockd_client::LockGuard {
    within(limit, "lock while etcd recovers", async {
        loop {
            match c.lock(name).await {
                Ok(g) => return g,
                Err(e) if e.is_unavailable() => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("lock {name}: {e}"),
            }
        }
    })
    .await
}

fn key(name: &str) -> Key {
    Key::in_default(name).expect("key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_two_daemons_share_one_lock_table() {
    let Some(etcd) = Etcd::start(1, "cluster_two_daemons_share_one_lock_table") else {
        return;
    };
    let (a, b) = two_hosts(&etcd, "10s", "2s").await;
    let (ca, cb) = (a.client().await, b.client().await);

    // Exclusion across hosts, and the conflict names the holder's host.
    let held = ca.lock("job").await.expect("a takes job");
    let err = cb.try_lock("job").await.expect_err("b must not");
    assert!(err.is_conflict(), "{err}");
    assert!(err.to_string().contains("@host-a"), "{err}");

    // A release is answered before etcd applied the deletion, but this daemon's own next
    // acquire never trips over it: a try-lock right after a release always succeeds.
    let mut last = 0;
    for _ in 0..50 {
        let g = ca
            .try_lock("again")
            .await
            .expect("try right after own release");
        assert!(g.fence() > last);
        last = g.fence();
        g.release().await.expect("release");
    }

    // FIFO waiting across hosts; fences increase across hosts.
    let mut waiting = enqueue(&cb, cb.acquire("job").wait_forever()).await;
    queued(&cb, "job", 1).await;
    assert!(poll_once(&mut waiting).await.is_none(), "b waits");
    let first = held.fence();
    held.release().await.expect("release");
    let got = within(PROMPT, "b granted after a's release", &mut waiting)
        .await
        .expect("b's grant");
    assert!(got.fence() > first, "{} > {first}", got.fence());
    got.release().await.expect("release");

    // Shared holders on both hosts; a writer queues; a later reader does not jump it.
    let r1 = ca.acquire("doc").shared().await.expect("reader on a");
    let r2 = cb.acquire("doc").shared().await.expect("reader on b");
    let cw = b.client().await;
    let mut writer = enqueue(&cw, cw.acquire("doc").wait_forever()).await;
    queued(&cw, "doc", 1).await;
    let err = ca
        .acquire("doc")
        .shared()
        .await
        .expect_err("a reader behind a waiting writer conflicts");
    assert!(err.is_conflict(), "{err}");
    let d = cb.describe(&key("doc")).await.expect("describe");
    assert_eq!(d.holders.len(), 2);
    assert_eq!(d.waiters.len(), 1);
    let names: Vec<&str> = d
        .holders
        .iter()
        .map(|h| h.owner.client_name.as_str())
        .collect();
    assert!(names.iter().any(|n| n.ends_with("@host-a")), "{names:?}");
    assert!(names.iter().any(|n| n.ends_with("@host-b")), "{names:?}");
    r1.release().await.expect("release");
    assert!(
        poll_once(&mut writer).await.is_none(),
        "writer waits for both"
    );
    r2.release().await.expect("release");
    let w = within(PROMPT, "writer granted", &mut writer)
        .await
        .expect("writer");
    assert_eq!(w.mode(), Mode::Exclusive);

    // Watch on one host sees the other host's grant and release.
    let mut watch = cb.watch(&key("w")).await.expect("watch");
    let g = ca.lock("w").await.expect("lock w");
    let change = within(PROMPT, "granted event", watch.next())
        .await
        .expect("event");
    assert_eq!(change.kind(), "granted");
    assert_eq!(change.fence(), g.fence());
    let fence = g.fence();
    g.release().await.expect("release");
    let change = within(PROMPT, "released event", watch.next())
        .await
        .expect("event");
    assert_eq!((change.kind(), change.fence()), ("released", fence));

    // Force-release from the other host: the holder is told.
    let victim = ca.lock("stuck").await.expect("lock stuck");
    let n = cb.force_release(&key("stuck")).await.expect("force");
    assert_eq!(n, 1);
    let lost = within(PROMPT, "holder told", victim.lost()).await;
    assert_eq!(lost, Lost::ForceReleased);
    cb.try_lock("stuck")
        .await
        .expect("free after force-release");

    // A detached lease taken on a is renewed and released on b, by ticket only.
    let lease = ca
        .acquire("nightly")
        .lease(Duration::from_secs(30))
        .detached()
        .await
        .expect("detached");
    drop(ca);
    let renewed = cb
        .renew(&lease.ticket, Some(Duration::from_secs(60)))
        .await
        .expect("renew on b");
    assert!(renewed > lease.expires_at, "renewed for longer");
    let again = cb
        .renew(&lease.ticket, None)
        .await
        .expect("renew with its own length");
    assert!(
        again <= renewed + Duration::from_secs(2),
        "{again:?} {renewed:?}"
    );
    let d = cb.describe(&key("nightly")).await.expect("describe");
    assert!(d.holders[0].detached && d.holders[0].expires_at_ms.is_some());
    assert_eq!(d.holders[0].fence, lease.fence, "renewal keeps the fence");
    let stats = cb.stats().await.expect("stats");
    let gauge = |n: &str| stats.gauges.iter().find(|g| g.0 == n).map(|g| g.1);
    assert_eq!(gauge("leases"), Some(1), "{stats:?}");
    cb.release(&lease.ticket).await.expect("release on b");
    let err = cb.release(&lease.ticket).await.expect_err("gone");
    assert_eq!(err.code(), Some(ErrorCode::NotHolder));
    assert!(cb
        .describe(&key("nightly"))
        .await
        .unwrap()
        .holders
        .is_empty());

    // What the cluster does not do is refused, not half done.
    let err = cb
        .acquire("sem")
        .permits(3)
        .await
        .expect_err("no semaphores");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
    let err = cb
        .acquire("delayed")
        .lock_delay(Duration::from_secs(1))
        .await
        .expect_err("no lock-delay");
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");

    // lockctl works unchanged: list sees both hosts' keys.
    let out = lockctl(&a.socket, &["run", "from-lockctl", "--", "true"]).await;
    assert!(out.status.success(), "{out:?}");
    let _held = cb.lock("listed").await.expect("lock");
    let out = lockctl(&a.socket, &["list"]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("listed"),
        "{out:?}"
    );
}

/// Workers on both hosts take one key in turns; some vanish while holding (their connection
/// dropped, as a SIGKILL does), and real lockctl processes are SIGKILLed while they hold.
/// No two ever hold at once, and fences only grow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mutual_exclusion_and_fence_order_under_client_kills() {
    let Some(etcd) = Etcd::start(
        1,
        "cluster_mutual_exclusion_and_fence_order_under_client_kills",
    ) else {
        return;
    };
    let (a, b) = two_hosts(&etcd, "10s", "2s").await;
    let inside = Arc::new(AtomicBool::new(false));
    let last_fence = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let socket = if w % 2 == 0 { &a.socket } else { &b.socket }.clone();
        let (inside, last_fence) = (Arc::clone(&inside), Arc::clone(&last_fence));
        workers.push(tokio::spawn(async move {
            let mut client = Client::connect(&socket).await.expect("connect");
            for round in 0..25u32 {
                let guard = client
                    .acquire("counter")
                    .wait(Duration::from_secs(30))
                    .await
                    .expect("acquire");
                assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                let previous = last_fence.swap(guard.fence(), Ordering::SeqCst);
                assert!(
                    guard.fence() > previous,
                    "fence {} after {previous}",
                    guard.fence()
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.store(false, Ordering::SeqCst);
                if (round + w) % 7 == 3 {
                    // Vanish while holding: the connection closes without a release.
                    drop(guard);
                    drop(client);
                    client = Client::connect(&socket).await.expect("reconnect");
                } else {
                    guard.release().await.expect("release");
                }
            }
        }));
    }
    // Meanwhile: lockctl holders SIGKILLed while they hold; their hold ends at once (well
    // within the 10 s session TTL), on either host.
    let observer = a.client().await;
    for i in 0..4 {
        let socket = if i % 2 == 0 { &a.socket } else { &b.socket };
        let mut child = std::process::Command::new(LOCKCTL)
            .arg("--socket")
            .arg(socket)
            .args(["run", "-w", "60", "counter", "--", "sleep", "60"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("lockctl");
        let pid = child.id() as i32;
        within(Duration::from_secs(60), "lockctl holds", async {
            loop {
                let d = observer.describe(&key("counter")).await.expect("describe");
                if d.holders.iter().any(|h| h.owner.pid == Some(pid)) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(
            !inside.swap(true, Ordering::SeqCst),
            "lockctl and a worker hold at once"
        );
        let killed = Instant::now();
        inside.store(false, Ordering::SeqCst);
        let _ = child.kill();
        let _ = child.wait();
        // The sleep it ran is its child: it must not keep the lock (flock semantics end with
        // lockctl's own connection).
        let freed = within(Duration::from_secs(5), "hold ended after SIGKILL", async {
            loop {
                let d = observer.describe(&key("counter")).await.expect("describe");
                if !d.holders.iter().any(|h| h.owner.pid == Some(pid)) {
                    return killed.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        eprintln!(
            "cluster: lockctl SIGKILLed on host {}, its hold gone after {freed:?}",
            ["a", "b"][i % 2]
        );
    }
    for w in workers {
        within(Duration::from_secs(120), "worker finished", w)
            .await
            .expect("worker");
    }
}

/// A daemon SIGKILLed while its client holds: the other host is granted once the dead
/// daemon's session lease expires in etcd (the TTL), not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_killed_daemons_holds_free_after_its_session_ttl() {
    let Some(etcd) = Etcd::start(
        1,
        "cluster_a_killed_daemons_holds_free_after_its_session_ttl",
    ) else {
        return;
    };
    let (mut a, b) = two_hosts(&etcd, "3s", "1s").await;
    let ca = a.client().await;
    let held = ca.lock("db").await.expect("a holds");
    let cb = b.client().await;
    let mut waiting = enqueue(&cb, cb.acquire("db").wait(Duration::from_secs(30))).await;
    queued(&cb, "db", 1).await;
    assert!(poll_once(&mut waiting).await.is_none());
    let killed = Instant::now();
    a.kill9();
    let got = within(
        Duration::from_secs(20),
        "b granted after a's lease expired",
        &mut waiting,
    )
    .await
    .expect("granted");
    let after = killed.elapsed();
    eprintln!("cluster: daemon a SIGKILLed; host b granted after {after:?} (session_ttl 3s, keepalive every 750ms)");
    assert!(got.fence() > held.fence());
    // The lease was kept alive until the kill: etcd expires it between TTL - keepalive
    // interval and TTL (plus its expiry check) after the kill.
    assert!(
        after >= Duration::from_millis(2000),
        "granted too early: {after:?}"
    );
    assert!(
        after <= Duration::from_secs(10),
        "granted too late: {after:?}"
    );
    // Host a comes back and serves again.
    a.restart().await;
    let ca = a.client().await;
    got.release().await.expect("release");
    within(PROMPT, "a serves again", ca.lock("db"))
        .await
        .expect("lock after restart");
}

/// Three members: one SIGKILLed (the one both daemons list first, often the leader) changes
/// nothing for holders or new acquires. A new leader takes etcd's election timeout (1 s), so
/// the request timeout here (3 s) outlasts an election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_of_three_survives_a_killed_member() {
    let Some(mut etcd) = Etcd::start(3, "cluster_of_three_survives_a_killed_member") else {
        return;
    };
    let (a, b) = two_hosts(&etcd, "6s", "3s").await;
    let (ca, cb) = (a.client().await, b.client().await);
    let held = ca.lock("steady").await.expect("hold");
    etcd.kill(0);
    let killed = Instant::now();
    // For two session TTLs, both hosts keep serving and the hold is never lost. Killing the
    // leader makes etcd elect another: requests in that window may answer Unavailable (the
    // client retries, as it would); the longest such gap is reported and bounded.
    let mut rounds = 0;
    let mut longest_gap = Duration::ZERO;
    while killed.elapsed() < Duration::from_secs(12) {
        for c in [&ca, &cb] {
            let asked = Instant::now();
            let g = lock_while_unavailable(c, "busy", Duration::from_secs(10)).await;
            longest_gap = longest_gap.max(asked.elapsed());
            g.release().await.expect("release");
            rounds += 1;
        }
        assert!(!held.is_lost(), "a hold was lost with 2 of 3 members up");
    }
    eprintln!(
        "cluster: 3 members, 1 SIGKILLed: {rounds} acquire/release rounds in 12 s, hold kept; longest wait for a grant {longest_gap:?}"
    );
    assert!(cb
        .try_lock("steady")
        .await
        .expect_err("still held")
        .is_conflict());
    let e = tokio::task::spawn_blocking(move || {
        etcd.restart(0, &[0, 1, 2]);
        etcd
    })
    .await
    .expect("restart");
    held.release().await.expect("release");
    drop(e);
}

/// Every member down: holders are told their holds are lost before the session TTL could run
/// out, new acquires answer Unavailable within the request timeout, and service resumes when
/// etcd is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_outage_loses_holds_in_time_and_service_resumes() {
    let Some(mut etcd) = Etcd::start(1, "cluster_outage_loses_holds_in_time_and_service_resumes")
    else {
        return;
    };
    let ttl = Duration::from_secs(4);
    let (a, b) = two_hosts(&etcd, "4s", "1s").await;
    let (ca, cb) = (a.client().await, b.client().await);
    let held = ca.lock("x").await.expect("hold");
    etcd.kill(0);
    let down = Instant::now();
    let lost = within(
        Duration::from_secs(20),
        "HoldLost during the outage",
        held.lost(),
    )
    .await;
    let after = down.elapsed();
    eprintln!(
        "cluster: etcd down; HoldLost after {after:?} ({lost}; session_ttl 4s, margin 800ms)"
    );
    assert_eq!(lost, Lost::Expired);
    // The last keepalive was sent before the outage, so etcd could expire the lease no sooner
    // than TTL after the outage began; the holder knew before that.
    assert!(after < ttl, "HoldLost after {after:?}: not before the TTL");
    let asked = Instant::now();
    let err = within(
        Duration::from_secs(10),
        "acquire during the outage",
        cb.lock("y"),
    )
    .await
    .expect_err("no etcd: no grant");
    eprintln!(
        "cluster: acquire during the outage answered {:?} after {:?}",
        err.code(),
        asked.elapsed()
    );
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    assert!(asked.elapsed() < Duration::from_secs(5));
    let etcd = tokio::task::spawn_blocking(move || {
        etcd.restart(0, &[0]);
        etcd
    })
    .await
    .expect("restart");
    let back = Instant::now();
    let g = lock_while_unavailable(&ca, "x", Duration::from_secs(30)).await;
    let resumed = back.elapsed();
    eprintln!("cluster: etcd back; first grant after {resumed:?}");
    // The lost lease survived etcd's restart (etcd renews leases then) and its entry held
    // "x": the daemon revokes it as soon as etcd answers, rather than leaving it to expire.
    assert!(
        resumed < ttl,
        "the lost lease's key stayed held for {resumed:?}"
    );
    let err = cb.try_lock("x").await.expect_err("held again");
    assert!(err.is_conflict(), "{err}");
    g.release().await.expect("release");
    drop(etcd);
}

/// A daemon stopped with SIGTERM revokes its session lease on the way out: the other host is
/// granted at once, not after the TTL; a detached lease taken through it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_a_stopped_daemon_frees_its_holds_at_once() {
    let Some(etcd) = Etcd::start(1, "cluster_a_stopped_daemon_frees_its_holds_at_once") else {
        return;
    };
    let (mut a, b) = two_hosts(&etcd, "10s", "2s").await;
    let ca = a.client().await;
    let _held = ca.lock("svc").await.expect("a holds");
    let lease = ca
        .acquire("kept")
        .lease(Duration::from_secs(60))
        .detached()
        .await
        .expect("detached");
    let cb = b.client().await;
    let mut waiting = enqueue(&cb, cb.acquire("svc").wait(Duration::from_secs(30))).await;
    queued(&cb, "svc", 1).await;
    let stopped = Instant::now();
    let status = a.terminate(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
    within(
        Duration::from_secs(5),
        "b granted after a stopped",
        &mut waiting,
    )
    .await
    .expect("granted");
    let after = stopped.elapsed();
    eprintln!(
        "cluster: daemon a stopped (SIGTERM); host b granted after {after:?} (session_ttl 10s)"
    );
    assert!(after < Duration::from_secs(5), "{after:?}");
    let d = cb.describe(&key("kept")).await.expect("describe");
    assert_eq!(d.holders.len(), 1, "the detached lease outlives its daemon");
    cb.release(&lease.ticket).await.expect("release on b");
}

/// Workers on both hosts take one key in turns while host a's daemon is SIGKILLed and
/// restarted: no two ever hold at once, fences only grow, host b's workers wait about the
/// session TTL for a dead holder's key, and both hosts serve again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_exclusion_holds_while_a_daemon_is_sigkilled_under_load() {
    let Some(etcd) = Etcd::start(
        1,
        "cluster_exclusion_holds_while_a_daemon_is_sigkilled_under_load",
    ) else {
        return;
    };
    let (mut a, b) = two_hosts(&etcd, "3s", "1s").await;
    let inside = Arc::new(AtomicBool::new(false));
    let last_fence = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(10);
    let mut workers = Vec::new();
    for w in 0..4 {
        let socket = if w % 2 == 0 { &a.socket } else { &b.socket }.clone();
        let (inside, last_fence) = (Arc::clone(&inside), Arc::clone(&last_fence));
        workers.push(tokio::spawn(async move {
            let (mut pairs, mut longest) = (0u32, Duration::ZERO);
            let mut client: Option<Client> = None;
            while Instant::now() < end {
                let c = match &client {
                    Some(c) if !c.is_closed() => c.clone(),
                    _ => {
                        client = Client::connect(&socket).await.ok();
                        if client.is_none() {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        continue;
                    }
                };
                let asked = Instant::now();
                let guard = match c.acquire("contended").wait(Duration::from_secs(20)).await {
                    Ok(g) => g,
                    Err(_) => {
                        // This worker's daemon died under it: connect again when it is back.
                        client = None;
                        continue;
                    }
                };
                longest = longest.max(asked.elapsed());
                assert!(!inside.swap(true, Ordering::SeqCst), "two holders at once");
                let previous = last_fence.swap(guard.fence(), Ordering::SeqCst);
                assert!(
                    guard.fence() > previous,
                    "fence {} after {previous}",
                    guard.fence()
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.store(false, Ordering::SeqCst);
                pairs += 1;
                let _ = guard.release().await;
            }
            (w, pairs, longest)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.kill9();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.restart().await;
    eprintln!(
        "cluster: daemon a SIGKILLed under load and restarted after {:?}",
        killed.elapsed()
    );
    for w in workers {
        let (w, pairs, longest) = within(Duration::from_secs(60), "worker finished", w)
            .await
            .expect("worker");
        eprintln!(
            "cluster: worker {w} on host {}: {pairs} holds, longest wait {longest:?}",
            ["a", "b"][w % 2]
        );
        assert!(pairs > 0, "worker {w} never held the key");
    }
}

/// A client of the cluster's first member, to look at (and write) what lockd keeps there.
async fn etcd_client_of(etcd: &Etcd) -> etcd_client::Client {
    etcd_client::Client::connect([etcd.endpoint(0)], None)
        .await
        .expect("connect to etcd")
}

/// Writes `value` at `name` on etcd lease `lease`, by hand.
async fn put_on_lease(direct: &mut etcd_client::Client, name: &str, lease: i64, value: &str) {
    let put = etcd_client::PutOptions::new().with_lease(lease);
    direct
        .put(name, value, Some(put))
        .await
        .expect("put by hand");
}

/// Every name a PUT event under `prefix` ever wrote, from etcd's whole history (read up to the
/// revision current when called).
async fn names_ever_written(etcd: &mut etcd_client::Client, prefix: &str) -> Vec<String> {
    use etcd_client::{EventType, GetOptions, WatchOptions};
    let now = etcd
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("read the revision")
        .header()
        .map_or(0, |h| h.revision());
    let options = WatchOptions::new().with_prefix().with_start_revision(1);
    let mut stream = etcd.watch(prefix, Some(options)).await.expect("watch");
    let mut names = std::collections::BTreeSet::new();
    within(PROMPT, "etcd's history replayed", async {
        loop {
            let resp = stream.message().await.expect("watch").expect("open");
            for e in resp.events() {
                let Some(kv) = e.kv() else { continue };
                if e.event_type() == EventType::Put {
                    names.insert(String::from_utf8_lossy(kv.key()).into_owned());
                }
                if kv.mod_revision() >= now {
                    return;
                }
            }
        }
    })
    .await;
    names.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_entry_names_are_reused_and_never_overwrite_an_entry_they_do_not_know() {
    let Some(etcd) = Etcd::start(1, "cluster_entry_names_are_reused") else {
        return;
    };
    let a = one_host(&etcd).await;
    let c = a.client().await;
    let mut direct = etcd_client_of(&etcd).await;

    // etcd keeps every deleted name until compaction, and reading a key's queue walks them
    // all: a fresh name per acquire would make each acquire slower than the last. One client
    // doing 300 pairs, then 4 clients contending for 50 pairs each, leave a handful of names.
    let mut last = 0;
    for _ in 0..300 {
        let g = c.lock("busy").await.expect("lock");
        assert!(g.fence() > last, "fences still grow with reused names");
        last = g.fence();
        g.release().await.expect("release");
    }
    let busy = "/lockd-test/k/default/busy/";
    let busy_names = names_ever_written(&mut direct, busy).await;
    let n = busy_names.len();
    println!("300 sequential pairs wrote {n} names: {busy_names:?}");
    // Usually 2; more only if the daemon's watch fell many pairs behind (a loaded machine).
    assert!(n <= 10, "{busy_names:?}");

    let clients: Vec<Client> = clients_of(4, &a).await;
    let overlap = Arc::new(AtomicBool::new(false));
    let inside = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in clients {
        let (overlap, inside) = (overlap.clone(), inside.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                let g = c.lock("contended").await.expect("lock");
                if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                    overlap.store(true, Ordering::SeqCst);
                }
                tokio::task::yield_now().await;
                inside.fetch_sub(1, Ordering::SeqCst);
                g.release().await.expect("release");
            }
        }));
    }
    within(Duration::from_secs(60), "200 contended pairs", async {
        for t in tasks {
            t.await.expect("worker");
        }
    })
    .await;
    assert!(!overlap.load(Ordering::SeqCst), "two holders at once");
    let names = names_ever_written(&mut direct, "/lockd-test/k/default/contended/").await;
    println!(
        "200 contended pairs (4 clients) wrote {} names",
        names.len()
    );
    assert!(names.len() <= 40, "{names:?}");

    // The names the daemon would reuse are taken by entries it does not know (written by
    // hand here; in life, writes whose answers were lost): they are never overwritten. It
    // takes other names and queues behind the strangers, exclusive blockers of unknown owner,
    // until they are gone.
    //
    // First every slot of "busy" is free again: its entries are deleted in etcd, and then the
    // daemon's deletion watch reports a later deletion (a force-release its holder hears of);
    // watch events come in order, so it saw the earlier ones. Its first choice is slot 0.
    let count = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    within(PROMPT, "busy's entries deleted", async {
        while direct
            .get(busy, Some(count.clone()))
            .await
            .expect("count")
            .count()
            > 0
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let g = c.lock("sync").await.expect("lock");
    assert_eq!(
        c.force_release(&key("sync")).await.expect("force-release"),
        1
    );
    within(PROMPT, "the holder hears of it", g.lost()).await;
    let lease_hex = busy_names[0]
        .rsplit('/')
        .next()
        .and_then(|l| l.split('.').next())
        .expect("LEASE.SLOT")
        .to_string();
    let strangers: Vec<String> = (0..2).map(|n| format!("{busy}{lease_hex}.{n:x}")).collect();
    let mut before = Vec::new();
    for s in &strangers {
        direct
            .put(s.as_str(), "not a lockd record", None)
            .await
            .expect("put a stranger");
        let got = direct.get(s.as_str(), None).await.expect("get");
        before.push(got.kvs()[0].create_revision());
    }
    let err = c.try_lock("busy").await.expect_err("the strangers block");
    assert!(err.is_conflict(), "{err}");
    for (s, created) in strangers.iter().zip(&before) {
        let after = direct.get(s.as_str(), None).await.expect("get");
        let kv = &after.kvs()[0];
        assert_eq!(kv.value(), b"not a lockd record");
        assert_eq!(kv.create_revision(), *created, "{s} not written over");
        assert_eq!(kv.lease(), 0, "{s} still on no lease: not taken over");
        direct.delete(s.as_str(), None).await.expect("delete");
    }
    let g = c.try_lock("busy").await.expect("free again");
    let live = direct
        .get(busy, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .expect("get");
    assert_eq!(live.kvs().len(), 1);
    assert!(live.kvs()[0].create_revision() as u64 == g.fence());
    g.release().await.expect("release");
}

/// `n` clients of daemon `d`.
async fn clients_of(n: usize, d: &TestDaemon) -> Vec<Client> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(d.client().await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_many_clients_share_whole_transactions() {
    let Some(etcd) = Etcd::start(1, "cluster_many_clients_share_whole_transactions") else {
        return;
    };
    // 64 clients with a key each: their acquires and the deletions their releases owe fill
    // the writer's transactions to the brim, which etcd must accept (its operation limit
    // counts nested transactions too).
    let a = one_host(&etcd).await;
    pairs_on_own_keys(&etcd, &a, 64, 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_works_with_an_etcd_that_allows_fewer_operations_per_transaction() {
    let test = "cluster_works_with_an_etcd_that_allows_fewer_operations";
    let Some(etcd) = Etcd::start_with(1, test, &["--max-txn-ops", "16"]) else {
        return;
    };
    let a = one_host(&etcd).await;
    // 20 shared holders: one force-release deletes more entries than one transaction may.
    let clients = clients_of(20, &a).await;
    let mut holds = Vec::new();
    for c in &clients {
        holds.push(c.acquire("shared").shared().await.expect("shared hold"));
    }
    let n = clients[0]
        .force_release(&key("shared"))
        .await
        .expect("force-release");
    assert_eq!(n, 20);
    for g in &holds {
        within(PROMPT, "each holder hears of it", g.lost()).await;
    }
    // The daemon learns the lower limit from etcd's first refusal and sends smaller
    // transactions; no request fails for it, and every release still reaches etcd.
    pairs_on_own_keys(&etcd, &a, 32, 20).await;
}

/// `clients` clients of daemon `a`, `pairs` lock/unlock pairs each on a key of their own, all
/// at once: every pair succeeds with growing fences, and afterwards no entry is left in etcd.
async fn pairs_on_own_keys(etcd: &Etcd, a: &TestDaemon, clients: usize, pairs: usize) {
    let mut tasks = Vec::new();
    for (i, c) in clients_of(clients, a).await.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for _ in 0..pairs {
                let g = c.lock(format!("own-{i}")).await.expect("lock");
                assert!(g.fence() > last);
                last = g.fence();
                g.release().await.expect("release");
            }
        }));
    }
    within(Duration::from_secs(60), "every client's pairs", async {
        for t in tasks {
            t.await.expect("worker");
        }
    })
    .await;
    // Every release's deletion got through (they travel in the same transactions).
    let mut direct = etcd_client_of(etcd).await;
    let all = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    within(PROMPT, "every entry deleted", async {
        loop {
            let left = direct
                .get("/lockd-test/k/", Some(all.clone()))
                .await
                .expect("count");
            if left.count() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_an_entry_on_the_daemons_lease_that_no_request_owns_is_deleted() {
    let Some(etcd) = Etcd::start(1, "cluster_an_entry_on_the_daemons_lease") else {
        return;
    };
    // session_ttl 3 s: the daemon checks its lease's keys every 3 s.
    let conf = etcd.lockd_config("host-a", "3s", "1s");
    let a = TestDaemon::start_with(LOCKD, &["--config", conf.to_str().expect("utf-8 path")]).await;
    let c = a.client().await;
    let mut direct = etcd_client_of(&etcd).await;
    let prefix = "/lockd-test/k/default/orphaned/";
    let entries = |got: etcd_client::GetResponse| -> Vec<(String, i64, i64)> {
        got.kvs()
            .iter()
            .map(|kv| {
                let name = String::from_utf8_lossy(kv.key()).into_owned();
                (name, kv.create_revision(), kv.lease())
            })
            .collect()
    };
    let all = || Some(etcd_client::GetOptions::new().with_prefix());

    // The daemon's session lease, from its first entry's name (LEASE.SLOT).
    let g = c.lock("orphaned").await.expect("lock");
    let live = entries(direct.get(prefix, all()).await.expect("get"));
    let (name, _, lease) = live[0].clone();
    g.release().await.expect("release");
    let lease_hex = name.rsplit('/').next().and_then(|l| l.split('.').next());
    assert_eq!(lease_hex, Some(format!("{lease:x}").as_str()), "{name}");
    // The release is answered before its deletion is in etcd: wait for it, so the orphans
    // below are not written over the released entry.
    within(PROMPT, "the released entry deleted", async {
        while !entries(direct.get(prefix, all()).await.expect("get")).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    // A write the daemon gave up on but etcd applied later: entries on the daemon's lease that
    // no request owns, at the names it would reuse first. Left alone they would hold the key
    // until the daemon stops. An acquire that meets one (in its way, or in its name's place)
    // has it deleted, and is granted after it.
    for slot in 0..2 {
        let orphan = format!("{prefix}{lease:x}.{slot:x}");
        put_on_lease(&mut direct, &orphan, lease, "a write applied late").await;
    }
    let orphans = entries(direct.get(prefix, all()).await.expect("get"));
    let started = Instant::now();
    let g = within(
        PROMPT,
        "granted once the orphans are gone",
        c.lock("orphaned"),
    )
    .await
    .expect("lock");
    println!("granted {:?} after the orphans appeared", started.elapsed());
    for (_, created, _) in &orphans {
        assert!(g.fence() > *created as u64, "queued behind the orphans");
    }
    let live = entries(direct.get(prefix, all()).await.expect("get"));
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(
        live[0].1 as u64,
        g.fence(),
        "only the grant's own entry is left"
    );
    g.release().await.expect("release");

    // An entry on another lease (another daemon's, or a stranger's) is never taken for one.
    let other = direct.lease_grant(60, None).await.expect("grant").id();
    let stranger = format!("{prefix}{other:x}.0");
    put_on_lease(&mut direct, &stranger, other, "another daemon's").await;
    let err = c.try_lock("orphaned").await.expect_err("blocked");
    assert!(err.is_conflict(), "{err}");
    let err = within(PROMPT, "try again", c.try_lock("orphaned"))
        .await
        .expect_err("still blocked");
    assert!(err.is_conflict(), "{err}");

    // An orphan that no acquire of this daemon meets (another daemon would wait behind it):
    // found among the session lease's keys, which the daemon checks every session_ttl.
    let lonely = format!("/lockd-test/k/default/lonely/{lease:x}.0");
    put_on_lease(&mut direct, &lonely, lease, "a write applied late").await;
    let started = Instant::now();
    within(PROMPT, "the lonely orphan deleted", async {
        while !direct
            .get(lonely.as_str(), None)
            .await
            .expect("get")
            .kvs()
            .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    println!(
        "a lonely orphan deleted after {:?} (session_ttl 3 s)",
        started.elapsed()
    );
    // A sweep ran after the stranger was written: it is still there.
    let left = direct.get(stranger.as_str(), None).await.expect("get");
    assert_eq!(left.kvs().len(), 1, "the other lease's entry is left alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_list_and_stats_read_a_table_larger_than_one_etcd_response() {
    let Some(etcd) = Etcd::start(1, "cluster_list_and_stats_read_a_large_table") else {
        return;
    };
    let a = one_host(&etcd).await;
    let c = a.client().await;
    let mut direct = etcd_client_of(&etcd).await;
    // 5,000 entries of 1 KiB (written by hand, 100 per transaction): more than the 4 MiB one
    // etcd response may carry to lockd's client. Undecodable entries count as exclusive holds
    // of an unknown owner.
    let value = vec![b'x'; 1024];
    for chunk in 0..50 {
        let puts: Vec<etcd_client::TxnOp> = (0..100)
            .map(|i| {
                let name = format!("/lockd-test/k/default/bulk-{:05}/1.0", chunk * 100 + i);
                etcd_client::TxnOp::put(name, value.clone(), None)
            })
            .collect();
        direct
            .txn(etcd_client::Txn::new().and_then(puts))
            .await
            .expect("write a chunk");
    }
    let g = c.lock("bulk-mine").await.expect("lock");
    let listed = within(PROMPT, "list", c.list(None, "bulk-"))
        .await
        .expect("list");
    assert_eq!(listed.len(), 5001);
    assert!(listed.iter().all(|k| k.holders == 1));
    let stats = within(PROMPT, "stats", c.stats()).await.expect("stats");
    let gauge = |name: &str| {
        stats
            .gauges
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    };
    assert_eq!(gauge("keys"), Some(5001));
    assert_eq!(gauge("holds"), Some(5001));
    g.release().await.expect("release");
}
