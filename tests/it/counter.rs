//! Mutual exclusion under contention: a read-sleep-write counter stays exact.

use std::time::Duration;

use crate::daemon;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_clients_increment_a_shared_file_exactly() {
    const CLIENTS: usize = 32;
    const ROUNDS: usize = 50;
    let d = daemon().await;
    let file = d.dir().join("counter");
    std::fs::write(&file, "0").unwrap();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let client = d.client().await;
        let file = file.clone();
        tasks.push(tokio::spawn(async move {
            let mut last_fence = 0;
            for _ in 0..ROUNDS {
                let guard = client.lock("counter").await.expect("lock");
                assert!(guard.fence() > last_fence, "fences increase per client");
                last_fence = guard.fence();
                let n: u64 = std::fs::read_to_string(&file)
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                tokio::time::sleep(Duration::from_micros(200)).await;
                std::fs::write(&file, (n + 1).to_string()).unwrap();
                guard.release().await.expect("release");
            }
        }));
    }
    for t in tasks {
        crate::within_or_panic(t).await;
    }
    let total: usize = std::fs::read_to_string(&file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        total,
        CLIENTS * ROUNDS,
        "lost updates: the lock did not exclude"
    );
}
