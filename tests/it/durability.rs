//! Crash safety of detached leases under load, and behaviour while the disk fails.

use std::collections::HashMap;
use std::time::Duration;

use lockd_client::{Client, ErrorCode, Ticket};
use lockd_tests::{within, TestDaemon};

use crate::{LOCKD, PROMPT};

/// What one worker learned before the daemon died.
#[derive(Default)]
struct Outcome {
    /// Acknowledged, unreleased leases: ticket -> fence.
    held: HashMap<Ticket, u64>,
    /// Acknowledged releases.
    released: Vec<Ticket>,
    /// A release in flight when the daemon died: its outcome is unknown.
    uncertain: Vec<Ticket>,
    max_fence: u64,
}

/// Acquires, renews and releases detached leases on its own keys until the connection breaks.
async fn worker(client: Client, prefix: String, mut out: Outcome, seed: u64) -> Outcome {
    let mut rng = seed;
    let mut next = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        rng >> 33
    };
    let lease = Duration::from_secs(120);
    let mut n = 0u64;
    loop {
        n += 1;
        let choice = next() % 4;
        if out.held.len() < 3 || choice == 0 {
            let name = format!("{prefix}-{n}");
            match client.acquire(name).lease(lease).detached().await {
                Ok(l) => {
                    assert!(
                        l.fence > out.max_fence,
                        "fences go forward on one connection"
                    );
                    out.max_fence = l.fence;
                    out.held.insert(l.ticket, l.fence);
                }
                Err(_) => return out, // an unacknowledged acquire: nobody knows its ticket
            }
        } else if choice == 1 {
            let ticket = *out
                .held
                .keys()
                .nth(next() as usize % out.held.len())
                .unwrap();
            if client.renew(&ticket, Some(lease)).await.is_err() {
                return out;
            }
        } else {
            let ticket = *out
                .held
                .keys()
                .nth(next() as usize % out.held.len())
                .unwrap();
            out.held.remove(&ticket);
            match client.release(&ticket).await {
                Ok(()) => out.released.push(ticket),
                Err(e) => {
                    assert!(e.is_unavailable(), "release failed oddly: {e}");
                    out.uncertain.push(ticket);
                    return out;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_leases_survive_twenty_sigkills_under_load() {
    survive_sigkills_under_load(&[]).await;
}

/// As above with the log handed to the checkpointer after every append: the kills land inside
/// checkpoints into redb and while log files are being reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_leases_survive_sigkills_inside_checkpoints() {
    survive_sigkills_under_load(&[("LOCKD_TEST_CHECKPOINT_BYTES", "1")]).await;
}

async fn survive_sigkills_under_load(env: &[(&str, &str)]) {
    const WORKERS: usize = 6;
    const CRASHES: usize = 20;
    let mut d = TestDaemon::start_full(LOCKD, &[], env).await;
    let mut outcomes: Vec<Outcome> = (0..WORKERS).map(|_| Outcome::default()).collect();
    let mut max_fence = 0;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    for round in 0..CRASHES {
        let mut tasks = Vec::new();
        for (w, out) in outcomes.drain(..).enumerate() {
            let client = d.client().await;
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(w as u64 + 1);
            let prefix = format!("r{round}-w{w}");
            tasks.push(tokio::spawn(worker(client, prefix, out, seed)));
        }
        // Kill at a random moment 20–220 ms into the load.
        let delay = 20 + (seed >> 40) % 200;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        d.kill9();
        for t in tasks {
            outcomes.push(crate::within_or_panic(t).await);
        }
        d.restart().await;

        let check = d.client().await;
        for out in &mut outcomes {
            for (ticket, fence) in &out.held {
                max_fence = max_fence.max(*fence);
                check.renew(ticket, None).await.unwrap_or_else(|e| {
                    panic!(
                        "round {round}: acknowledged lease with fence {fence} lost: {e}\n{}",
                        d.log_tail()
                    )
                });
            }
            for ticket in &out.released {
                let err = check
                    .renew(ticket, None)
                    .await
                    .expect_err("released lease came back");
                assert_eq!(err.code(), Some(ErrorCode::NotHolder), "round {round}");
            }
            out.released.clear();
            // Settle the uncertain ones so later rounds need not reason about them.
            for ticket in out.uncertain.drain(..) {
                let _ = check.release(&ticket).await;
            }
        }
        let probe = check
            .acquire(format!("probe-{round}"))
            .lease(Duration::from_secs(5))
            .detached()
            .await
            .expect("serving after restart");
        assert!(
            probe.fence > max_fence,
            "round {round}: fence {} after {max_fence}",
            probe.fence
        );
        max_fence = probe.fence;
        check.release(&probe.ticket).await.unwrap();
        for out in &mut outcomes {
            out.max_fence = max_fence;
        }
    }
    let total: usize = outcomes.iter().map(|o| o.held.len()).sum();
    eprintln!("{CRASHES} crashes survived; {total} leases held at the end");
}

#[tokio::test]
async fn failing_disk_answers_unavailable_keeps_session_locks_and_recovers() {
    let fault_dir = tempfile::tempdir().unwrap();
    let fault = fault_dir.path().join("fail-now");
    let fault_str = fault.to_str().unwrap();
    let mut d =
        TestDaemon::start_full(LOCKD, &[], &[("LOCKD_TEST_STORAGE_FAULT_FILE", fault_str)]).await;
    let c = d.client().await;
    let lease = Duration::from_secs(60);
    let before = c.acquire("before").lease(lease).detached().await.unwrap();
    let kept = c.acquire("kept").lease(lease).detached().await.unwrap();

    std::fs::write(&fault, b"").unwrap(); // the disk starts failing
    let err = c.release(&kept.ticket).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    let err = c
        .acquire("during")
        .lease(lease)
        .detached()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    let err = c.renew(&before.ticket, None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    let err = c.release(&before.ticket).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    // Nothing unacknowledged took effect: "during" is free, "before" is still held.
    let g = c
        .try_lock("during")
        .await
        .expect("the failed grant was taken back");
    drop(g);
    assert!(c.try_lock("before").await.unwrap_err().is_conflict());
    // Session locks keep working throughout.
    for _ in 0..20 {
        let g = c
            .try_lock("session")
            .await
            .expect("session locks work on a failing disk");
        g.release().await.unwrap();
    }

    std::fs::remove_file(&fault).unwrap(); // the disk recovers
    let after = within(PROMPT, "storage works again", async {
        loop {
            match c.acquire("after").lease(lease).detached().await {
                Ok(l) => break l,
                Err(e) if e.code() == Some(ErrorCode::Unavailable) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    c.release(&before.ticket)
        .await
        .expect("release works again");
    drop(c);

    // What is stored matches what was acknowledged.
    d.kill9();
    d.restart().await;
    let c = d.client().await;
    c.try_lock("before").await.expect("its release was stored");
    c.try_lock("during")
        .await
        .expect("the failed grant never reached the disk");
    c.renew(&after.ticket, None)
        .await
        .expect("the lease taken after recovery survived");
}

#[tokio::test]
async fn detached_grant_to_a_closing_connection_is_not_orphaned() {
    use lockd_protocol::{Acquire, Key, Mode, Op, Wait};
    use lockd_tests::raw::RawConn;
    use std::os::fd::AsRawFd;
    let d = TestDaemon::start(LOCKD).await;
    let holder = d.client().await;
    let other = d.client().await;
    for i in 0..20 {
        let name = format!("orphan-{i}");
        let held = holder.lock(name.as_str()).await.unwrap();
        let mut raw = RawConn::connect_hello(&d.socket).await;
        raw.request(
            1,
            Op::Acquire(Acquire {
                key: Key::in_default(name.as_str()).unwrap(),
                mode: Mode::Exclusive,
                wait: Wait::Forever,
                lease_ms: Some(60_000),
                detach: true,
                permits: None,
                lock_delay_ms: 0,
                data: vec![],
            }),
        )
        .await;
        raw.request(2, Op::Ping).await;
        let _ = raw.recv(PROMPT).await; // the Pong: the acquire is queued
                                        // This client will never read again: from here the daemon's writes to it fail. (A grant
                                        // that did reach its socket would be the client's lease: the daemon cannot tell whether
                                        // a peer read what it was sent before closing, so that is no orphan to find.)
                                        // SAFETY: shutdown on a descriptor the stream owns and keeps open.
        let rc = unsafe { libc::shutdown(raw.stream.as_raw_fd(), libc::SHUT_RD) };
        assert_eq!(rc, 0, "shutdown(SHUT_RD)");
        // Release and vanish at the same moment: the grant races the disconnect.
        let (released, ()) = tokio::join!(held.release(), async { drop(raw) });
        released.unwrap();
        // Either the waiter was gone before the grant, or it got a detached lease whose
        // ticket it will never read; both ways the key must not stay held for the lease's
        // minute: a lease nobody knows the ticket of is abandoned with its connection.
        let g = within(PROMPT, "key free again", async {
            loop {
                match other.try_lock(name.as_str()).await {
                    Ok(g) => break g,
                    Err(e) if e.is_conflict() => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .await;
        drop(g);
    }
}
