//! A client process killed with SIGKILL loses its holds and waits at once.

use std::future::IntoFuture;
use std::process::Stdio;
use std::time::{Duration, Instant};

use lockd_client::Client;
use lockd_tests::within;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::{daemon, enqueue, PROMPT};

const HELPER_ENV: &str = "LOCKD_TEST_HELPER_SOCKET";

/// Not a test on its own: the body of the helper process (this test binary re-executed).
/// It holds `crash-a` and `crash-b`, queues for `crash-c`, says READY, and waits to be killed.
#[tokio::test]
#[ignore = "helper process for sigkilled_client_releases_holds_and_waits"]
async fn helper_holds_and_waits() {
    let Ok(socket) = std::env::var(HELPER_ENV) else {
        return;
    };
    let client = Client::connect(&socket).await.expect("helper connect");
    let _a = client
        .try_lock("crash-a")
        .await
        .expect("helper holds crash-a");
    let _b = client
        .acquire("crash-b")
        .shared()
        .await
        .expect("helper holds crash-b");
    let _waiting = enqueue(&client, client.acquire("crash-c").wait_forever()).await;
    println!("READY");
    tokio::time::sleep(Duration::from_secs(3600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_client_releases_holds_and_waits() {
    let d = daemon().await;
    let tester = d.client().await;
    let held_c = tester.lock("crash-c").await.unwrap();

    let mut helper = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "crash::helper_holds_and_waits",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(HELPER_ENV, &d.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn helper");
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
    within(PROMPT, "helper READY", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.trim() == "READY" {
                return;
            }
        }
        panic!("helper exited before READY");
    })
    .await;

    // Queue behind the helper's exclusive hold, then kill the helper.
    let waiter = d.client().await;
    let pending = enqueue(&waiter, waiter.acquire("crash-a").wait_forever()).await;
    let killed_at = Instant::now();
    helper.start_kill().unwrap();
    let granted = within(PROMPT, "handoff after SIGKILL", pending)
        .await
        .expect("granted after the holder died");
    let handoff = killed_at.elapsed();
    eprintln!("handoff latency after SIGKILL of the holder: {handoff:?}");
    let _ = helper.wait().await;

    // The helper's shared hold is gone (its clean-up may still be finishing: wait, bounded).
    let b = within(
        PROMPT,
        "crash-b free",
        tester.acquire("crash-b").wait(PROMPT).into_future(),
    )
    .await
    .expect("crash-b free");
    // The helper's wait was removed before any of its holds (waits go first), so it was gone
    // before crash-a was handed over: after we release crash-c nobody else gets it.
    held_c.release().await.unwrap();
    let c = tester
        .try_lock("crash-c")
        .await
        .expect("crash-c free, dead waiter not granted");
    drop((granted, b, c));
}
