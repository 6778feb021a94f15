//! Leases: detached leases through lockctl, expiry, renewal, HoldLost, recovery after SIGKILL.

use std::future::IntoFuture;
use std::process::Output;
use std::time::{Duration, Instant};

use lockd_client::{ErrorCode, Lost, Ticket};
use lockd_protocol::{Acquire, Event, Key, LostReason, Mode, Op, Reply, ServerMessage, Wait};
use lockd_tests::raw::RawConn;
use lockd_tests::within;

use crate::{code, daemon, enqueue, lockctl, PROMPT};

fn field(out: &Output, name: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {stdout:?}"))
        .to_string()
}

#[tokio::test]
async fn detached_lease_from_lockctl_outlives_it_and_is_managed_by_ticket() {
    let d = daemon().await;
    let out = lockctl(
        &d.socket,
        &["acquire", "--lease", "1m", "--detach", "-n", "cron-job"],
    )
    .await;
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let ticket = field(&out, "LOCKD_TICKET");
    let fence: u64 = field(&out, "LOCKD_FENCE").parse().unwrap();
    assert!(fence > 0);
    Ticket::from_text(&ticket).expect("a ticket");

    // lockctl has exited; the lease still blocks others.
    let out = lockctl(&d.socket, &["run", "-n", "cron-job", "--", "true"]).await;
    assert_eq!(code(&out), 1, "the detached lease must block run -n");

    // Renewed and released from other processes by the ticket.
    let out = lockctl(&d.socket, &["renew", &ticket, "--lease", "2m"]).await;
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let out = lockctl(&d.socket, &["release", &ticket]).await;
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let out = lockctl(&d.socket, &["run", "-n", "cron-job", "--", "true"]).await;
    assert_eq!(code(&out), 0, "released");

    // An ended ticket and a wrong ticket: exit 3. A malformed one: usage error.
    let out = lockctl(&d.socket, &["release", &ticket]).await;
    assert_eq!(code(&out), 3);
    let out = lockctl(&d.socket, &["renew", &ticket]).await;
    assert_eq!(code(&out), 3);
    let wrong = Ticket::generate().unwrap().to_text();
    let out = lockctl(&d.socket, &["release", &wrong]).await;
    assert_eq!(code(&out), 3);
    let out = lockctl(&d.socket, &["release", "not-a-ticket"]).await;
    assert_eq!(code(&out), 2);
}

#[tokio::test]
async fn lease_arguments_are_checked() {
    let d = daemon().await;
    let mut raw = RawConn::connect_hello(&d.socket).await;
    use lockd_protocol::ErrorCode::{InvalidArgument, LimitExceeded};
    let cases = [
        (Some(0), false, InvalidArgument),              // zero lease
        (Some(25 * 3600 * 1000), false, LimitExceeded), // above the 24 h default maximum
        (None, true, InvalidArgument),                  // detached without a lease
    ];
    for (i, (lease_ms, detach, expected)) in cases.into_iter().enumerate() {
        raw.request(
            i as u64,
            Op::Acquire(Acquire {
                key: Key::in_default("args").unwrap(),
                mode: Mode::Exclusive,
                wait: Wait::No,
                lease_ms,
                detach,
                permits: None,
                lock_delay_ms: 0,
                data: vec![],
            }),
        )
        .await;
        match raw.recv(PROMPT).await {
            Some(ServerMessage::Response(r)) => {
                assert_eq!(r.result.unwrap_err().code, expected)
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn expiry_hands_the_key_to_the_next_waiter_and_renewal_prevents_it() {
    let d = daemon().await;
    let (a, b) = (d.client().await, d.client().await);
    let lease = Duration::from_millis(500);
    let start = Instant::now(); // before the acquire: the lease runs from the grant on
    let detached = a.acquire("exp").lease(lease).detached().await.unwrap();
    let waiting = enqueue(&b, b.acquire("exp").wait_forever()).await;
    let g = within(PROMPT, "granted by expiry", waiting)
        .await
        .expect("granted");
    let took = start.elapsed();
    assert!(
        took >= lease - Duration::from_millis(50),
        "expired early: {took:?}"
    );
    assert!(
        took < lease + Duration::from_secs(5),
        "expired late: {took:?}"
    );
    assert!(g.fence() > detached.fence);
    let err = a.renew(&detached.ticket, None).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotHolder));
    drop(g);

    // A leased guard renews itself: it outlives several lease lengths.
    let held = a
        .acquire("renewed")
        .lease(Duration::from_millis(300))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!held.is_lost());
    let err = b.try_lock("renewed").await.unwrap_err();
    assert!(err.is_conflict(), "{err}");
    held.release().await.unwrap();

    // A detached lease renewed by ticket does not expire either.
    let kept = a
        .acquire("kept")
        .lease(Duration::from_millis(400))
        .detached()
        .await
        .unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        a.renew(&kept.ticket, None).await.expect("renewed in time");
    }
    assert!(b.try_lock("kept").await.unwrap_err().is_conflict());
    a.release(&kept.ticket).await.unwrap();
}

#[tokio::test]
async fn expired_session_lease_pushes_hold_lost_to_its_connection() {
    let d = daemon().await;
    let mut raw = RawConn::connect_hello(&d.socket).await;
    raw.request(
        1,
        crate::acquire_op("lost", Mode::Exclusive, Wait::No, Some(300), false),
    )
    .await;
    let fence = match raw.recv(PROMPT).await {
        Some(ServerMessage::Response(r)) => match r.result {
            Ok(Reply::Granted(g)) => g.fence,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    match raw.recv(PROMPT).await {
        Some(ServerMessage::Event(Event::HoldLost {
            fence: f, reason, ..
        })) => {
            assert_eq!((f, reason), (fence, LostReason::Expired));
        }
        other => panic!("expected HoldLost, got {other:?}"),
    }
    // And a client guard whose renewals stop (connection kept, lease released elsewhere)
    // reports the loss.
    let a = d.client().await;
    let g = a
        .acquire("elsewhere")
        .lease(Duration::from_secs(30))
        .await
        .unwrap();
    let other = d.client().await;
    other
        .release(g.ticket())
        .await
        .expect("same uid may release by ticket");
    let why = within(PROMPT, "loss reported", g.lost()).await;
    assert_eq!(why, Lost::ReleasedElsewhere);
}

#[tokio::test]
async fn detached_leases_survive_a_daemon_sigkill_and_expired_ones_do_not() {
    let mut d = daemon().await;
    let c = d.client().await;
    let long = c
        .acquire("survivor")
        .lease(Duration::from_secs(60))
        .data("leader=a")
        .detached()
        .await
        .unwrap();
    let short = c
        .acquire("short")
        .lease(Duration::from_millis(300))
        .detached()
        .await
        .unwrap();
    let released = c
        .acquire("gone")
        .lease(Duration::from_secs(60))
        .detached()
        .await
        .unwrap();
    c.release(&released.ticket).await.unwrap();
    drop(c);
    d.kill9();
    tokio::time::sleep(Duration::from_millis(400)).await; // the short lease runs out while down
    d.restart().await;
    let c = d.client().await;
    assert!(
        c.try_lock("survivor").await.unwrap_err().is_conflict(),
        "survivor held again"
    );
    c.renew(&long.ticket, None)
        .await
        .expect("its ticket still works");
    c.try_lock("short")
        .await
        .expect("expired while the daemon was down");
    assert_eq!(
        c.renew(&short.ticket, None).await.unwrap_err().code(),
        Some(ErrorCode::NotHolder)
    );
    c.try_lock("gone")
        .await
        .expect("an acknowledged release does not come back");
    let g = c.acquire("fresh").into_future().await.unwrap();
    assert!(
        g.fence() > long.fence.max(released.fence),
        "fences keep increasing"
    );
}

/// A renewal without a length uses the length given at acquire, before and after a restart
/// (after a restart it once used the last renewal's length).
#[tokio::test]
async fn a_renewal_without_a_length_uses_the_acquired_length_across_a_restart() {
    let mut d = daemon().await;
    let c = d.client().await;
    let mut tickets = Vec::new();
    for name in ["before", "after"] {
        let lease = c
            .acquire(name)
            .lease(Duration::from_secs(10))
            .detached()
            .await
            .unwrap();
        c.renew(&lease.ticket, Some(Duration::from_secs(600)))
            .await
            .unwrap();
        tickets.push(lease.ticket);
    }
    let left = |at: std::time::SystemTime| {
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
    };
    // Generous bounds: the acquired length is 10 s, the last explicit renewal's 600 s.
    let before = left(c.renew(&tickets[0], None).await.unwrap());
    let acquired = Duration::from_secs(5)..=Duration::from_secs(10);
    assert!(acquired.contains(&before), "before a restart: {before:?}");
    drop(c);
    d.kill9();
    d.restart().await;
    let c = d.client().await;
    let after = left(c.renew(&tickets[1], None).await.unwrap());
    assert!(acquired.contains(&after), "after a restart: {after:?}");
}
