//! Integration tests: the real `lockd` and `lockctl` binaries, driven as users drive them.
//!
//! One test binary, one module per behaviour. Every daemon runs on its own temporary socket and
//! data directory; every wait is bounded.

mod admin;
mod attacks;
mod bench;
mod blocking;
mod client;
#[cfg(feature = "etcd")]
mod cluster;
mod counter;
mod crash;
mod durability;
mod examples;
mod fences;
mod flock;
mod fuzz;
mod hostile;
mod leases;
mod lockctl;
mod man;
mod package;
mod queue;
mod readme;
mod regressions;
mod security;
mod semantics;
mod systemd;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use lockd_client::{AcquireBuilder, Client, Error, LockGuard};
use lockd_tests::TestDaemon;

pub const LOCKD: &str = env!("CARGO_BIN_EXE_lockd");
pub const LOCKCTL: &str = env!("CARGO_BIN_EXE_lockctl");

/// Generous bound for things that should take milliseconds.
pub const PROMPT: Duration = Duration::from_secs(10);

pub async fn daemon() -> TestDaemon {
    TestDaemon::start(LOCKD).await
}

/// Runs `lockctl --socket SOCKET ARGS...` (bounded) and returns its output.
pub async fn lockctl(socket: &std::path::Path, args: &[&str]) -> std::process::Output {
    let run = tokio::process::Command::new(LOCKCTL)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output();
    lockd_tests::within(Duration::from_secs(60), "lockctl finished", run)
        .await
        .expect("run lockctl")
}

/// A copy of lockctl that other uids can execute (the build directory may sit under a
/// private home), placed in `dir`, which is made traversable too.
pub fn lockctl_for_others(dir: &std::path::Path) -> std::path::PathBuf {
    copy_for_others(LOCKCTL, dir, "lockctl")
}

/// A copy of the binary `src`, named `name` in `dir`, that other uids can execute; `dir` is
/// made traversable too.
pub fn copy_for_others(src: &str, dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let copy = dir.join(name);
    if !copy.exists() {
        // Copied by `cp`, not by this process: a child that another test forks while the copy
        // is open for writing would inherit that descriptor until its exec, and executing the
        // copy meanwhile fails with ETXTBSY ("Text file busy"). Only `cp` ever holds it.
        let status = std::process::Command::new("cp")
            .arg(src)
            .arg(&copy)
            .status()
            .expect("run cp");
        assert!(status.success(), "cp {name}: {status}");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    copy
}

/// A process's exit code (-1 if a signal killed it).
pub fn code(out: &std::process::Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An acquire of `name` in the default namespace, for raw connections.
pub fn acquire_op(
    name: &str,
    mode: lockd_protocol::Mode,
    wait: lockd_protocol::Wait,
    lease_ms: Option<u64>,
    detach: bool,
) -> lockd_protocol::Op {
    lockd_protocol::Op::Acquire(lockd_protocol::Acquire {
        key: lockd_protocol::Key::in_default(name).expect("valid name"),
        mode,
        wait,
        lease_ms,
        detach,
        permits: None,
        lock_delay_ms: 0,
        data: vec![],
    })
}

pub type Pending = Pin<Box<dyn Future<Output = Result<LockGuard, Error>> + Send>>;

/// Sends a (waiting) acquire and returns once the daemon has queued or answered it: the
/// request is polled once (which hands it to the connection), then a ping on the same
/// connection returns after the daemon has processed the acquire.
pub async fn enqueue(client: &Client, acquire: AcquireBuilder) -> Pending {
    let mut fut = acquire.into_future();
    let first = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
    assert!(
        first.is_pending(),
        "acquire answered before reaching the daemon"
    );
    client.ping().await.expect("ping after enqueue");
    fut
}

/// Is `fut` already complete? Polls it once without blocking.
pub async fn poll_once<T>(fut: &mut Pin<Box<dyn Future<Output = T> + Send>>) -> Option<T> {
    match std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// Awaits a spawned task (bounded), re-raising its panic.
pub async fn within_or_panic<T>(handle: tokio::task::JoinHandle<T>) -> T {
    match tokio::time::timeout(Duration::from_secs(120), handle).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
        Err(_) => panic!("task did not finish within 120s"),
    }
}

/// `lockctl --socket S ARGS...` with `env` added, stdin from /dev/null, output captured.
pub fn lockctl_command(
    socket: &std::path::Path,
    args: &[&str],
    env: &[(&str, &std::path::Path)],
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(LOCKCTL);
    cmd.arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("LOCKD_FD")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs lockctl with `env` to completion (bounded).
pub async fn lockctl_with(
    socket: &std::path::Path,
    args: &[&str],
    env: &[(&str, &std::path::Path)],
) -> std::process::Output {
    lockd_tests::within(
        Duration::from_secs(60),
        "lockctl finished",
        lockctl_command(socket, args, env).output(),
    )
    .await
    .expect("run lockctl")
}
