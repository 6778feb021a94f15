//! The blocking client (`lockd_client::blocking`) against the real daemon: the async client's
//! guarantees without an async runtime in the caller.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use lockd_client::blocking::Client;
use lockd_client::{Change, Key, Lost};
use lockd_tests::TestDaemon;

use crate::PROMPT;

/// Starts a test daemon from synchronous code (the harness is async).
pub fn start_daemon() -> TestDaemon {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime to start the daemon")
        .block_on(crate::daemon())
}

/// Runs `f` on its own thread and fails the test if it does not finish within `limit` (a
/// blocking call that hangs would otherwise hang the test); re-raises its panic.
pub fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let _ = done.send(f());
    });
    match result.recv_timeout(limit) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Disconnected) => match thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the thread sends before it ends"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("not done within {limit:?}"),
    }
}

/// Holders of `default/name`, as a third connection sees them.
fn holders(c: &Client, name: &str) -> usize {
    let key = Key::in_default(name).expect("valid name");
    c.describe(&key).expect("describe").holders.len()
}

#[test]
fn blocking_guard_excludes_and_releases_on_drop() {
    let d = start_daemon();
    let socket = d.socket.clone();
    bounded(PROMPT * 3, move || {
        let a = Client::connect(&socket).expect("connect a");
        let b = Client::connect(&socket).expect("connect b");
        let guard = a.try_lock("bx").expect("free lock");
        assert!(guard.fence() > 0);
        assert!(!guard.is_lost());
        let err = b.try_lock("bx").expect_err("held by a");
        assert!(err.is_conflict(), "{err}");
        let err = b
            .acquire("bx")
            .wait(Duration::from_millis(50))
            .send()
            .expect_err("still held");
        assert!(err.is_timeout(), "{err}");

        // Dropped from this thread, with no runtime in sight: the release still goes out.
        drop(guard);
        let again = b
            .acquire("bx")
            .wait(PROMPT)
            .send()
            .expect("granted after the drop");
        again.release().expect("release confirmed");
        assert_eq!(holders(&a, "bx"), 0);
    });
}

#[test]
fn dropping_the_blocking_client_and_guard_ends_the_connection_and_its_holds() {
    let d = start_daemon();
    let socket = d.socket.clone();
    bounded(PROMPT * 3, move || {
        let watcher = Client::connect(&socket).expect("connect watcher");
        let a = Client::connect(&socket).expect("connect a");
        let guard = a.lock("gone").expect("free lock");
        // The guard keeps the connection open after the client handle is gone.
        drop(a);
        assert_eq!(holders(&watcher, "gone"), 1);
        drop(guard);
        let b = Client::connect(&socket).expect("connect b");
        b.acquire("gone")
            .wait(PROMPT)
            .send()
            .expect("granted once a's hold ended");
    });
}

#[test]
fn blocking_guard_reports_a_lost_hold_without_async() {
    let mut d = start_daemon();
    let socket = d.socket.clone();
    let c = bounded(PROMPT, move || Client::connect(&socket).expect("connect"));
    let guard = bounded(PROMPT, {
        let c = c.clone();
        move || c.try_lock("lost").expect("free lock")
    });
    let guard = bounded(PROMPT, move || {
        assert_eq!(guard.wait_lost(Duration::from_millis(50)), None, "intact");
        guard
    });
    d.kill9();
    bounded(PROMPT * 2, move || {
        let started = Instant::now();
        let why = guard.wait_lost(PROMPT);
        assert_eq!(why, Some(Lost::Disconnected));
        assert!(started.elapsed() < PROMPT);
        assert!(guard.is_lost());
        assert!(c.is_closed());
        let err = c.ping().expect_err("connection gone");
        assert!(err.is_unavailable(), "{err}");
    });
}

#[test]
fn blocking_lease_is_renewed_while_the_caller_thread_is_busy() {
    let d = start_daemon();
    let socket = d.socket.clone();
    bounded(PROMPT * 3, move || {
        let c = Client::connect(&socket).expect("connect");
        // Generous for a busy 2-core machine: renewals every 1 s, so only a stall of about 2 s
        // in the client's thread or the daemon lets the lease run out.
        let lease = Duration::from_secs(3);
        let guard = c.acquire("renewed").lease(lease).send().expect("granted");
        // The caller's thread does something else entirely for longer than the lease; the
        // client's own thread renews in the meantime.
        std::thread::sleep(lease * 2);
        assert!(!guard.is_lost(), "the lease expired while the guard lived");
        let other = Client::connect(&socket).expect("connect other");
        assert_eq!(holders(&other, "renewed"), 1);
        guard.release().expect("release confirmed");
        assert_eq!(holders(&other, "renewed"), 0);
    });
}

#[test]
fn blocking_watch_and_detached_lease() {
    let d = start_daemon();
    let socket = d.socket.clone();
    bounded(PROMPT * 3, move || {
        let c = Client::connect(&socket).expect("connect");
        let key = Key::in_default("watched").expect("valid name");
        let mut watch = c.watch(&key).expect("watch");
        assert_eq!(
            watch.next_timeout(Duration::from_millis(50)),
            Err(mpsc::RecvTimeoutError::Timeout)
        );
        let lease = c
            .acquire("watched")
            .lease(Duration::from_secs(60))
            .detached()
            .expect("detached lease");
        match watch.next_timeout(PROMPT) {
            Ok(Change::Granted { fence, .. }) => assert_eq!(fence, lease.fence),
            other => panic!("expected a grant, got {other:?}"),
        }
        let until = c.renew(&lease.ticket, None).expect("renewed");
        assert!(until > std::time::SystemTime::now());
        c.release(&lease.ticket).expect("released");
        match watch.next() {
            Some(Change::Released { fence }) => assert_eq!(fence, lease.fence),
            other => panic!("expected a release, got {other:?}"),
        }
    });
}

#[test]
fn blocking_election_hands_leadership_on_and_observers_follow() {
    use lockd_client::blocking::Election;

    let d = start_daemon();
    let socket = d.socket.clone();
    bounded(PROMPT * 3, move || {
        let a = Client::connect(&socket).expect("connect a");
        let b = Client::connect(&socket).expect("connect b");
        let watcher = Client::connect(&socket).expect("connect watcher");
        let on = |c: &Client| Election::new(c, "default", "leader").expect("valid key");
        let mut observer = on(&watcher).observe().expect("observe");
        assert_eq!(
            observer
                .next_timeout(PROMPT)
                .expect("first report")
                .unwrap(),
            None
        );

        let first = on(&a).campaign("a", None).expect("a leads");
        let leader = observer.next_timeout(PROMPT).expect("a report").unwrap();
        assert_eq!(
            leader.map(|l| (l.identity, l.fence)),
            Some((b"a".to_vec(), first.fence()))
        );

        // b waits in line on its own thread while a leads.
        let waiting = std::thread::spawn(move || on(&b).campaign("b", None).map(|l| (b, l)));
        assert!(!first.is_lost());
        assert_eq!(first.wait_lost(Duration::from_millis(50)), None);
        first.resign().expect("a resigns");
        let (_b, second) = waiting.join().expect("b's thread").expect("b leads");
        let mut seen = None;
        while seen
            .as_ref()
            .map(|l: &lockd_client::Leader| l.identity.clone())
            != Some(b"b".to_vec())
        {
            seen = observer
                .next_timeout(PROMPT)
                .expect("a report within the bound")
                .expect("describe");
        }
        assert_eq!(seen.map(|l| l.fence), Some(second.fence()));
        assert!(second.fence() > 0);
    });
}
