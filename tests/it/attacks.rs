//! The two local attacks of issue 12, replayed: terminal and log injection through peer-supplied
//! names, and socket spoofing through a per-user socket path another user made first.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use lockd_client::{Client, ConnectOptions, Error, TrustError};
use lockd_tests::{within, READY_TIMEOUT};

use crate::{code, daemon, lockctl, lockctl_for_others, text, PROMPT};

/// A client name with a colour escape and a newline that would forge a line.
const EVIL: &str = "x\x1b[31mRED\nfake-line";
/// `nobody`: the "other user" of these tests.
const OTHER: u32 = 65534;

/// True if `out` holds an ESC byte or a line that starts with the forged text.
fn injected(out: &str) -> bool {
    out.contains('\x1b') || out.lines().any(|l| l.trim_start().starts_with("fake-line"))
}

/// Tests that act as other uids run only as root with setpriv; otherwise they say so loudly.
fn root_with_setpriv() -> bool {
    // SAFETY: geteuid has no preconditions.
    let ok = unsafe { libc::geteuid() } == 0 && Path::new("/usr/bin/setpriv").exists();
    if !ok {
        eprintln!("SKIPPED: needs root and setpriv to act as other uids (socket-spoofing cases)");
    }
    ok
}

#[tokio::test]
async fn issue_12_peer_supplied_names_reach_no_terminal_and_no_log_line_raw() {
    let d = daemon().await;
    let options = ConnectOptions::default().client_name(EVIL);
    let evil = Client::connect_with(&d.socket, options.clone())
        .await
        .unwrap();
    let _held = evil.acquire("k").await.unwrap();
    // A valid name may still hold a bidirectional override (it is not a control character).
    let _bidi = evil.acquire("exe\u{202e}txt.sh").await.unwrap();
    let waiter = Client::connect_with(&d.socket, options).await.unwrap();
    let _queued = crate::enqueue(&waiter, waiter.acquire("k").wait(PROMPT)).await;

    let described = lockctl(&d.socket, &["describe", "k"]).await;
    let out = text(&described.stdout);
    assert_eq!(code(&described), 0, "{out}");
    assert!(!injected(&out), "describe printed the name raw:\n{out}");
    assert!(out.contains("x\\x1b[31mRED\\nfake-line"), "{out}");

    let listed = lockctl(&d.socket, &["list"]).await;
    let out = text(&listed.stdout);
    assert!(
        !out.contains('\u{202e}'),
        "list printed a bidi override raw:\n{out}"
    );
    assert!(out.contains("exe\\u{202e}txt.sh"), "{out}");

    // The daemon's conflict message names the holder; lockctl prints it.
    let refused = lockctl(&d.socket, &["run", "-n", "k", "--", "true"]).await;
    let err = text(&refused.stderr);
    assert_eq!(code(&refused), 1, "{err}");
    assert!(
        !injected(&err),
        "the conflict message carried the name raw:\n{err}"
    );
    assert!(err.contains("x\\x1b[31mRED\\nfake-line"), "{err}");

    // JSON stays exact.
    let json = lockctl(&d.socket, &["describe", "--json", "k"]).await;
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["holders"][0]["client"], EVIL);
    assert_eq!(v["waiters"][0]["client"], EVIL);

    // The daemon logged the connections (at debug) and the conflict's holder.
    let log = d.log_tail();
    assert!(
        log.contains("fake-line"),
        "the log should mention the client:\n{log}"
    );
    assert!(
        !injected(&log),
        "the daemon's log took the name raw:\n{log}"
    );
}

/// `lockd` running as another uid, killed on drop.
struct ForeignDaemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl ForeignDaemon {
    /// Starts a copy of lockd as `uid` (its primary group the same number), listening on
    /// `socket` (whose directory `uid` owns) for everyone (mode 666), with its state in
    /// `state` (created for `uid`).
    async fn start(uid: u32, socket: &Path, state: &Path, bin_dir: &Path) -> ForeignDaemon {
        std::fs::create_dir_all(state).unwrap();
        std::os::unix::fs::chown(state, Some(uid), Some(uid)).unwrap();
        let log = state.join("lockd.log");
        let data = state.join("data");
        let args = [
            "--socket".as_ref(),
            socket.as_os_str(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            // An impostor wants every user to find it.
            "--socket-mode".as_ref(),
            "666".as_ref(),
        ];
        let child = lockd_as(uid, bin_dir, &args, &log);
        let mut d = ForeignDaemon {
            child,
            socket: socket.to_owned(),
            log,
        };
        // Ready once the socket accepts (a raw connect: our client would refuse this daemon).
        let deadline = Instant::now() + READY_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(&d.socket).is_err() {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("lockd as uid {uid} exited ({status}): {}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "lockd as uid {uid} not ready: {}",
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        d
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Spawns a copy of lockd (placed in `bin_dir`) as `uid` with `args`, its output to `log`,
/// without the environment variables that choose its default paths.
fn lockd_as(uid: u32, bin_dir: &Path, args: &[&std::ffi::OsStr], log: &Path) -> Child {
    let bin = crate::copy_for_others(crate::LOCKD, bin_dir, "lockd");
    let file = std::fs::File::create(log).unwrap();
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(args)
        .env("RUST_LOG", "lockd=debug,info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .uid(uid)
        .gid(uid);
    for var in [
        "HOME",
        "XDG_STATE_HOME",
        "STATE_DIRECTORY",
        "RUNTIME_DIRECTORY",
        "XDG_RUNTIME_DIR",
        "LISTEN_FDS",
        "LISTEN_PID",
        "NOTIFY_SOCKET",
    ] {
        cmd.env_remove(var);
    }
    cmd.spawn().unwrap()
}

impl Drop for ForeignDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory for `uid` with `mode`.
fn dir_for(path: &Path, uid: u32, mode: u32) {
    std::fs::create_dir_all(path).unwrap();
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs lockctl as `uid` without `--socket`, `$LOCKD_SOCKET` or `$LOCKD_DAEMON_USER`, with
/// `$XDG_RUNTIME_DIR` set to `xdg` or unset.
async fn lockctl_as(bin_dir: &Path, uid: u32, xdg: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg(lockctl_for_others(bin_dir))
        .args(args)
        .env_remove("LOCKD_SOCKET")
        .env_remove("LOCKD_DAEMON_USER")
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null());
    if let Some(xdg) = xdg {
        cmd.env("XDG_RUNTIME_DIR", xdg);
    }
    within(
        Duration::from_secs(60),
        "lockctl as another uid",
        cmd.output(),
    )
    .await
    .unwrap()
}

/// Removes a directory under /tmp when the test ends, however it ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn issue_12_a_per_user_socket_directory_made_by_another_user_is_refused() {
    if !root_with_setpriv() {
        return;
    }
    // The victim: a cron job of uid VICTIM, without $XDG_RUNTIME_DIR, so it looks in
    // /tmp/lockd-VICTIM. The attacker (nobody) made that directory first and serves there.
    const VICTIM: u32 = 4243;
    let tmp_dir = PathBuf::from(format!("/tmp/lockd-{VICTIM}"));
    let _ = std::fs::remove_dir_all(&tmp_dir);
    let _cleanup = RemoveOnDrop(tmp_dir.clone());
    dir_for(&tmp_dir, OTHER, 0o755);
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = tmp_dir.join("lockd.sock");
    let attacker =
        ForeignDaemon::start(OTHER, &socket, &work.path().join("state"), work.path()).await;

    let out = lockctl_as(work.path(), VICTIM, None, &["run", "-n", "k", "--", "true"]).await;
    let err = text(&out.stderr);
    assert_eq!(code(&out), 69, "the attacker's daemon was used: {err}");
    assert!(
        err.contains(&format!("refusing {}", tmp_dir.display()))
            && err.contains(&format!("belongs to uid {OTHER}")),
        "{err}"
    );

    // The victim's own directory, but writable by others: refused too.
    std::os::unix::fs::chown(&tmp_dir, Some(VICTIM), Some(VICTIM)).unwrap();
    std::fs::set_permissions(&tmp_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = lockctl_as(work.path(), VICTIM, None, &["run", "-n", "k", "--", "true"]).await;
    let err = text(&out.stderr);
    assert_eq!(code(&out), 69, "{err}");
    assert!(err.contains("chmod go-w"), "{err}");
    drop(attacker);

    // $XDG_RUNTIME_DIR/lockd as a symbolic link (to a directory of the victim's): refused.
    let xdg = work.path().join("xdg");
    dir_for(&xdg, VICTIM, 0o700);
    let real = work.path().join("real");
    dir_for(&real, VICTIM, 0o700);
    std::os::unix::fs::symlink(&real, xdg.join("lockd")).unwrap();
    let out = lockctl_as(work.path(), VICTIM, Some(&xdg), &["list"]).await;
    let err = text(&out.stderr);
    assert_eq!(code(&out), 69, "{err}");
    assert!(err.contains("not a plain directory"), "{err}");
}

#[tokio::test]
async fn issue_12_a_daemon_of_another_uid_is_refused_and_ones_own_accepted() {
    if !root_with_setpriv() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // nobody's own per-user runtime directory, $XDG_RUNTIME_DIR/lockd.
    let xdg = work.path().join("xdg");
    dir_for(&xdg, OTHER, 0o700);
    let run_dir = xdg.join("lockd");
    dir_for(&run_dir, OTHER, 0o700);
    let socket = run_dir.join("lockd.sock");
    let theirs =
        ForeignDaemon::start(OTHER, &socket, &work.path().join("state"), work.path()).await;

    // Root's client refuses nobody's daemon, with the new error, before saying Hello.
    let refused = within(PROMPT, "connect", Client::connect(&socket)).await;
    match refused {
        Err(Error::Untrusted(TrustError::Impostor { uid, pid, .. })) => {
            assert_eq!(uid, OTHER);
            assert_eq!(pid, Some(theirs.child.id() as i32));
        }
        other => panic!("expected Untrusted(Impostor), got {other:?}"),
    }
    let out = lockctl(&socket, &["run", "-n", "k", "--", "true"]).await;
    let err = text(&out.stderr);
    assert_eq!(code(&out), 69, "{err}");
    assert!(
        err.contains("refusing the daemon at") && err.contains(&format!("uid {OTHER}")),
        "{err}"
    );
    assert!(
        !theirs.log_text().contains("connected: "),
        "nothing reached the impostor: {}",
        theirs.log_text()
    );

    // Trusted on purpose: LOCKD_DAEMON_USER names the account it runs as.
    let mut cmd = crate::lockctl_command(&socket, &["run", "-n", "k", "--", "true"], &[]);
    cmd.env("LOCKD_DAEMON_USER", OTHER.to_string());
    let out = within(Duration::from_secs(60), "lockctl", cmd.output())
        .await
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));

    // nobody's own client finds and accepts nobody's daemon at the default per-user path.
    let out = lockctl_as(
        work.path(),
        OTHER,
        Some(&xdg),
        &["run", "-n", "k", "--", "true"],
    )
    .await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));

    // And root's client accepts root's daemon.
    let own = daemon().await;
    Client::connect(&own.socket)
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();
}

#[tokio::test]
async fn issue_12_the_tmp_data_dir_fallback_is_created_private_and_refused_if_anothers() {
    if !root_with_setpriv() {
        return;
    }
    // A daemon of uid OWNER with no $HOME nor state directory keeps its state in
    // /tmp/lockd-OWNER/state.
    const OWNER: u32 = 4244;
    let base = PathBuf::from(format!("/tmp/lockd-{OWNER}"));
    let _ = std::fs::remove_dir_all(&base);
    let _cleanup = RemoveOnDrop(base.clone());
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock_dir = work.path().join("run");
    dir_for(&sock_dir, OWNER, 0o700);
    let socket = sock_dir.join("lockd.sock");
    let args = ["--socket".as_ref(), socket.as_os_str()];
    let log = work.path().join("lockd.log");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // Nothing there: both directories are created 0700 and the daemon serves.
    let mut child = lockd_as(OWNER, work.path(), &args, &log);
    let deadline = Instant::now() + READY_TIMEOUT;
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "lockd exited: {}",
            log_text()
        );
        assert!(Instant::now() < deadline, "lockd not ready: {}", log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    for dir in [base.clone(), base.join("state")] {
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (meta.uid(), meta.mode() & 0o7777),
            (OWNER, 0o700),
            "{}",
            dir.display()
        );
    }

    // Made first by another user (writable for the victim, with state the attacker chose):
    // refused with a clear message, before anything is read from it.
    std::fs::remove_dir_all(&base).unwrap();
    dir_for(&base, OTHER, 0o777);
    dir_for(&base.join("state"), OTHER, 0o777);
    let _ = std::fs::remove_file(&socket);
    let mut child = lockd_as(OWNER, work.path(), &args, &log);
    let status = lockd_tests::wait_child(&mut child, PROMPT).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("lockd used another user's state directory: {}", log_text())
    });
    let out = log_text();
    assert!(!status.success(), "{out}");
    assert!(
        out.contains(&format!("refusing {}", base.display()))
            && out.contains(&format!("belongs to uid {OTHER}")),
        "{out}"
    );

    // Its own, but writable by others: refused too.
    std::os::unix::fs::chown(&base, Some(OWNER), Some(OWNER)).unwrap();
    let mut child = lockd_as(OWNER, work.path(), &args, &log);
    let status = lockd_tests::wait_child(&mut child, PROMPT).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "lockd used a world-writable state directory: {}",
            log_text()
        )
    });
    let out = log_text();
    assert!(!status.success() && out.contains("chmod go-w"), "{out}");
}
