//! `lockctl run`: the shell contract (environment, exit codes, signals, lost holds).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use lockd_tests::{signal, within, TestDaemon};

use crate::{code, daemon, lockctl, text, LOCKCTL, PROMPT};

async fn wait_for_file(path: &Path) {
    within(PROMPT, "marker file", async {
        while !path.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn run_passes_fence_and_name_and_the_commands_status() {
    let d = daemon().await;
    let out = lockctl(
        &d.socket,
        &[
            "run",
            "job",
            "--",
            "sh",
            "-c",
            "echo \"$LOCKD_FENCE $LOCKD_LOCK $LOCKD_NAMESPACE\"; exit 7",
        ],
    )
    .await;
    assert_eq!(code(&out), 7, "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let parts: Vec<&str> = stdout.split_whitespace().collect();
    assert!(parts[0].parse::<u64>().unwrap() > 0, "{stdout}");
    assert_eq!(&parts[1..], ["job", "default"]);
    // The lock was released when the command ended.
    d.client().await.try_lock("job").await.expect("released");
}

#[tokio::test]
async fn conflicts_and_timeouts_exit_1_or_the_e_code() {
    let d = daemon().await;
    let holder = d.client().await;
    let _g = holder.lock("busy").await.unwrap();

    let out = lockctl(&d.socket, &["run", "-n", "busy", "--", "echo", "ran"]).await;
    assert_eq!(code(&out), 1);
    assert!(text(&out.stdout).is_empty(), "the command must not run");
    assert!(
        text(&out.stderr).contains("held exclusively"),
        "{}",
        text(&out.stderr)
    );

    let out = lockctl(&d.socket, &["run", "-n", "-E", "42", "busy", "--", "true"]).await;
    assert_eq!(code(&out), 42);

    let start = Instant::now();
    let out = lockctl(&d.socket, &["run", "-w", "0.3", "busy", "--", "true"]).await;
    assert_eq!(code(&out), 1, "{}", text(&out.stderr));
    assert!(start.elapsed() >= Duration::from_millis(300));
    let out = lockctl(
        &d.socket,
        &["run", "-w", "200ms", "-E", "9", "busy", "--", "true"],
    )
    .await;
    assert_eq!(code(&out), 9);
}

#[tokio::test]
async fn shared_and_namespaces() {
    let d = daemon().await;
    let holder = d.client().await;
    let _g = holder.acquire("s").shared().await.unwrap();
    let out = lockctl(&d.socket, &["run", "-n", "-s", "s", "--", "true"]).await;
    assert_eq!(code(&out), 0, "shared next to shared");
    let out = lockctl(&d.socket, &["run", "-n", "s", "--", "true"]).await;
    assert_eq!(code(&out), 1, "exclusive next to shared");
    let out = lockctl(
        &d.socket,
        &["run", "-n", "--namespace", "other", "s", "--", "true"],
    )
    .await;
    assert_eq!(code(&out), 0, "another namespace is another lock");
}

#[tokio::test]
async fn waits_until_the_holder_releases() {
    let d = daemon().await;
    let holder = d.client().await;
    let g = holder.lock("later").await.unwrap();
    let socket = d.socket.clone();
    let run = tokio::spawn(async move {
        lockctl(&socket, &["run", "-w", "30", "later", "--", "echo", "ran"]).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await; // not required for correctness
    g.release().await.unwrap();
    let out = crate::within_or_panic(run).await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "ran");
}

#[tokio::test]
async fn unreachable_daemon_and_usage_errors() {
    let d = daemon().await;
    let missing = d.dir().join("missing.sock");
    let out = lockctl(&missing, &["run", "x", "--", "true"]).await;
    assert_eq!(code(&out), 69, "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("cannot connect"));

    for args in [
        vec!["run", "x"],                                // no command
        vec!["run", "-n", "-w", "3", "x", "--", "true"], // -n with -w
        vec!["run", "-w", "soon", "x", "--", "true"],    // bad duration
        vec!["frobnicate"],                              // unknown subcommand
    ] {
        let out = lockctl(&d.socket, &args).await;
        assert_eq!(code(&out), 2, "{args:?}: {}", text(&out.stderr));
    }
    let out = lockctl(&d.socket, &["run", "", "--", "true"]).await;
    assert_eq!(code(&out), 2, "empty name: {}", text(&out.stderr));
}

#[tokio::test]
async fn socket_comes_from_lockd_socket_env() {
    let d = daemon().await;
    let out = tokio::process::Command::new(LOCKCTL)
        .args(["run", "-n", "env-job", "--", "true"])
        .env("LOCKD_SOCKET", &d.socket)
        .output()
        .await
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
}

fn spawn_run(d: &TestDaemon, name: &str, script: &str) -> tokio::process::Child {
    tokio::process::Command::new(LOCKCTL)
        .arg("--socket")
        .arg(&d.socket)
        .args(["run", name, "--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn lost_hold_terminates_the_command_and_its_children_and_exits_75() {
    let mut d = daemon().await;
    let started = d.dir().join("started");
    let pidfile = d.dir().join("grandchild.pid");
    // The command's own child must not survive the loss either.
    let script = format!(
        "sleep 30 & echo $! > {}; touch {}; wait",
        pidfile.display(),
        started.display()
    );
    let child = spawn_run(&d, "fragile", &script);
    wait_for_file(&started).await;
    let grandchild: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    d.kill9();
    let out = within(
        PROMPT,
        "lockctl exits after the loss",
        child.wait_with_output(),
    )
    .await
    .unwrap();
    assert_eq!(code(&out), 75, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("lost lock"),
        "{}",
        text(&out.stderr)
    );
    within(PROMPT, "the command's child is gone", async {
        // SAFETY: signal 0 only checks for existence.
        while unsafe { libc::kill(grandchild, 0) } == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn killed_lockctl_releases_the_lock_and_terminates_the_command() {
    let d = daemon().await;
    let started = d.dir().join("started");
    let got_term = d.dir().join("got-term");
    let script = format!(
        "trap 'touch {}; kill $!; exit 0' TERM; sleep 30 & touch {}; wait",
        got_term.display(),
        started.display()
    );
    let mut child = spawn_run(&d, "orphan", &script);
    wait_for_file(&started).await;
    let client = d.client().await;
    let waiting = crate::enqueue(&client, client.acquire("orphan").wait_forever()).await;
    child.start_kill().unwrap(); // SIGKILL to lockctl itself
    within(PROMPT, "lock released after lockctl died", waiting)
        .await
        .expect("granted");
    wait_for_file(&got_term).await; // the command was told to stop
    let _ = child.wait().await;
}

#[tokio::test]
async fn signals_are_forwarded_to_the_command() {
    let d = daemon().await;
    let started = d.dir().join("started");
    let script = format!(
        "trap 'kill $!; exit 42' TERM; sleep 30 & touch {}; wait",
        started.display()
    );
    let child = spawn_run(&d, "fwd", &script);
    wait_for_file(&started).await;
    signal(child.id().unwrap(), libc::SIGTERM);
    let out = within(PROMPT, "lockctl exits", child.wait_with_output())
        .await
        .unwrap();
    assert_eq!(
        code(&out),
        42,
        "the command's own status: {}",
        text(&out.stderr)
    );
    d.client().await.try_lock("fwd").await.expect("released");
}

#[tokio::test]
async fn sigterm_while_waiting_ends_lockctl_without_running_the_command() {
    let d = daemon().await;
    let holder = d.client().await;
    let _g = holder.lock("blocked").await.unwrap();
    let marker = d.dir().join("ran");
    let script = format!("touch {}", marker.display());
    let child = spawn_run(&d, "blocked", &script);
    // Let it reach the queue (correctness does not depend on it: a signal at any point must end
    // lockctl without running the command).
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(child.id().unwrap(), libc::SIGTERM);
    let out = within(PROMPT, "lockctl exits on SIGTERM", child.wait_with_output())
        .await
        .unwrap();
    assert_eq!(code(&out), 128 + libc::SIGTERM, "{}", text(&out.stderr));
    assert!(!marker.exists(), "the command must not run");
}

/// A standard output whose reader is already gone: every write fails with EPIPE.
fn stdout_nobody_reads() -> Stdio {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`; each is owned exactly once below.
    // Close-on-exec, so no process other tests start meanwhile keeps the read end open.
    assert_eq!(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
        0,
        "pipe2"
    );
    // SAFETY: as above.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Stdio::from(write)
}

async fn lockctl_into_closed_pipe(d: &TestDaemon, args: &[&str]) -> std::process::Output {
    let run = tokio::process::Command::new(LOCKCTL)
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout_nobody_reads())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lockctl")
        .wait_with_output(); // not `output()`, which would replace stdout with its own pipe
    within(Duration::from_secs(60), "lockctl finished", run)
        .await
        .expect("run lockctl")
}

/// `lockctl stats | head -0`: a reader that went away ends lockctl quietly with status 0 (no
/// panic, no 101); `lockctl acquire` whose ticket cannot be printed releases the lease rather
/// than leave it held with nobody knowing its ticket, and says so.
#[tokio::test]
async fn a_reader_that_went_away_ends_output_quietly_and_an_unprintable_ticket_is_released() {
    let d = daemon().await;
    for args in [&["stats"][..], &["list"], &["describe", "k"], &["metrics"]] {
        let out = lockctl_into_closed_pipe(&d, args).await;
        assert_eq!(code(&out), 0, "{args:?}: {}", text(&out.stderr));
        assert!(!text(&out.stderr).contains("panicked"), "{args:?}");
    }
    let out = lockctl_into_closed_pipe(&d, &["acquire", "--lease", "10m", "-n", "orphan"]).await;
    assert_eq!(code(&out), 70, "stderr: {}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("the lease was released") && !stderr.contains("NOT released"),
        "{stderr}"
    );
    let client = d.client().await;
    let g = client
        .try_lock("orphan")
        .await
        .expect("the lease was released");
    drop(g);
}
