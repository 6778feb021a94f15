//! The client crate's own machinery against the real daemon: requests that the socket cannot
//! take at once, and the connection's life tied to its handles.

use std::collections::HashSet;
use std::time::Duration;

use lockd_client::Client;
use lockd_tests::{signal, within};

use crate::{daemon, PROMPT};

async fn open_connections(observer: &Client) -> u64 {
    let stats = observer.stats().await.unwrap();
    stats
        .gauges
        .iter()
        .find(|(name, _)| name == "connections")
        .map(|(_, v)| *v)
        .expect("a connections gauge")
}

/// True once every thread of `pid` is in the stopped state (`T` in /proc).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    threads.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
            // The state follows the parenthesised command name.
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'))
        })
    })
}

/// 1,500 acquires of ~1 KiB each (1.5 MB: more than the socket buffer and the client's
/// high-water mark) sent while the daemon is stopped: callers queue behind bytes the socket has
/// not taken, and every request is answered, intact and once, when the daemon resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_written_while_the_daemon_is_stopped_are_all_answered_when_it_resumes() {
    const N: usize = 1_500;
    let d = daemon().await;
    let client = d.client().await;
    signal(d.pid(), libc::SIGSTOP);
    within(PROMPT, "every thread of lockd stops", async {
        while !all_threads_stopped(d.pid()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .acquire(format!("stopped-{i}"))
                    .data(vec![b'x'; 1000])
                    .await
            })
        })
        .collect();
    // Give the callers time to fill the socket; nothing can be answered meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answered = tasks.iter().filter(|t| t.is_finished()).count();
    signal(d.pid(), libc::SIGCONT);
    assert_eq!(answered, 0, "answers from a stopped daemon");
    let mut fences = HashSet::new();
    let mut guards = Vec::new();
    for t in tasks {
        let guard = within(PROMPT * 3, "an acquire sent while stopped", t)
            .await
            .expect("task")
            .expect("granted");
        assert!(
            fences.insert(guard.fence()),
            "fence {} twice",
            guard.fence()
        );
        guards.push(guard);
    }
    for g in guards {
        g.release().await.unwrap();
    }
    client.ping().await.unwrap();
}

/// A guard keeps its connection (and hold) alive after its `Client` is dropped; dropping the
/// guard too closes the connection.
#[tokio::test]
async fn the_connection_lives_while_a_handle_does_and_closes_with_the_last() {
    let d = daemon().await;
    let observer = d.client().await;
    // The harness's readiness probe may still be closing: wait until the observer is alone.
    let before = 1;
    within(PROMPT, "the readiness probe's connection closes", async {
        while open_connections(&observer).await != before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let client = d.client().await;
    let guard = client.lock("kept").await.unwrap();
    assert_eq!(open_connections(&observer).await, before + 1);
    drop(client);
    let other = d.client().await;
    let err = other.try_lock("kept").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(lockd_protocol::ErrorCode::Conflict),
        "{err}"
    );
    drop(other);
    drop(guard);
    within(PROMPT, "the connection closes", async {
        while open_connections(&observer).await != before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    observer
        .try_lock("kept")
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
}

/// A client whose runtime is gone (its reader task dropped unfinished) fails its calls with
/// `Disconnected` at once instead of waiting forever, and its connection is closed.
#[test]
fn calls_fail_at_once_when_the_runtime_that_ran_the_connection_is_gone() {
    let main = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let d = main.block_on(daemon());
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = first.block_on(async { d.client().await });
    let guard = first.block_on(client.lock("orphaned")).unwrap();
    drop(first);
    main.block_on(async {
        let err = within(
            PROMPT,
            "a call on a client whose runtime is gone",
            client.ping(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, lockd_client::Error::Disconnected), "{err}");
        assert!(client.is_closed());
        within(PROMPT, "the hold is lost", guard.lost()).await;
        // The daemon saw the connection close: the key is free.
        let other = d.client().await;
        within(PROMPT, "the key is released", async {
            loop {
                match other.try_lock("orphaned").await {
                    Ok(g) => break g.release().await.unwrap(),
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        })
        .await;
    });
    drop(guard);
    drop(client);
}
