//! Fencing tokens increase strictly, across grants and across a daemon crash.

use crate::daemon;

#[tokio::test]
async fn fences_increase_across_grants_and_a_daemon_sigkill() {
    let mut d = daemon().await;
    let client = d.client().await;
    let mut last = 0;
    for i in 0..1000 {
        let name = format!("fence-{}", i % 7);
        let g = if i % 2 == 0 {
            client.lock(name).await.unwrap()
        } else {
            client.acquire(name).shared().await.unwrap()
        };
        assert!(
            g.fence() > last,
            "grant {i}: fence {} after {last}",
            g.fence()
        );
        last = g.fence();
        g.release().await.unwrap();
    }
    drop(client);
    d.kill9();
    d.restart().await;
    let client = d.client().await;
    for _ in 0..10 {
        let g = client.lock("fence-0").await.unwrap();
        assert!(
            g.fence() > last,
            "after restart: fence {} after {last}",
            g.fence()
        );
        last = g.fence();
        g.release().await.unwrap();
    }
}

#[tokio::test]
async fn second_daemon_on_the_same_data_dir_refuses_to_start() {
    let d = daemon().await;
    let other_socket = d.dir().join("other.sock");
    let out = std::process::Command::new(crate::LOCKD)
        .arg("--socket")
        .arg(&other_socket)
        .arg("--data-dir")
        .arg(&d.data_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use by another lockd"), "{stderr}");
    assert!(
        !other_socket.exists(),
        "the refused daemon must not bind its socket"
    );
    d.client()
        .await
        .ping()
        .await
        .expect("first daemon unharmed");
}

#[tokio::test]
async fn live_socket_is_not_stolen_and_stale_socket_is_replaced() {
    let mut d = daemon().await;
    let other_data = d.dir().join("other-data");
    let out = std::process::Command::new(crate::LOCKD)
        .arg("--socket")
        .arg(&d.socket)
        .arg("--data-dir")
        .arg(&other_data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already serving"), "{stderr}");
    d.client()
        .await
        .ping()
        .await
        .expect("first daemon still serving");

    // A crash leaves the socket file behind; the next start replaces it.
    d.kill9();
    assert!(d.socket.exists(), "SIGKILL leaves a stale socket file");
    d.restart().await;
    d.client().await.ping().await.unwrap();
}
