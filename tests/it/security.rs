//! Authorization, configuration, limits and hostile clients.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use lockd_client::{Client, ErrorCode};
use lockd_protocol::{Mode, Op, ServerMessage, Wait};
use lockd_tests::raw::RawConn;
use lockd_tests::{within, TestDaemon};

use crate::{code, lockctl, text, LOCKD, PROMPT};

/// Tests that need a second uid run only as root with setpriv; otherwise they say so.
fn can_switch_uid() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root && Path::new("/usr/bin/setpriv").exists();
    if !ok {
        eprintln!("SKIPPED: needs root and setpriv to run lockctl as other uids");
    }
    ok
}

/// Runs lockctl as `uid`/`gid` with extra `groups`.
async fn lockctl_as(d: &TestDaemon, uid: u32, gid: u32, groups: &[u32], args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        cmd.arg(format!("--groups={}", list.join(",")));
    }
    let run = cmd
        .arg(crate::lockctl_for_others(d.dir()))
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .stdin(Stdio::null())
        .output();
    within(Duration::from_secs(60), "lockctl as another uid", run)
        .await
        .unwrap()
}

async fn daemon_with_config(toml: &str, extra: &[&str]) -> TestDaemon {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lockd.toml");
    std::fs::write(&path, toml).unwrap();
    let path = path.to_str().unwrap().to_string();
    let mut args = vec!["--config", path.as_str()];
    args.extend_from_slice(extra);
    let d = TestDaemon::start_with(LOCKD, &args).await;
    std::mem::forget(dir); // the daemon read it at start; keep it for the test's lifetime
    d
}

fn open_dir(d: &TestDaemon) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test]
async fn namespace_access_follows_the_config() {
    if !can_switch_uid() {
        return;
    }
    let d = daemon_with_config(
        "[namespaces.ops]\ngroups = [4242]\n",
        &["--socket-mode", "666"],
    )
    .await;
    open_dir(&d);
    const INSIDER: (u32, u32) = (1000, 4242);
    const OUTSIDER: (u32, u32) = (65534, 65534);
    let as_in = |args: &'static [&'static str]| lockctl_as(&d, INSIDER.0, INSIDER.1, &[], args);
    let as_out = |args: &'static [&'static str]| lockctl_as(&d, OUTSIDER.0, OUTSIDER.1, &[], args);

    let out = as_in(&["run", "-n", "--namespace", "ops", "deploy", "--", "true"]).await;
    assert_eq!(code(&out), 0, "insider: {}", text(&out.stderr));
    let out = lockctl_as(
        &d,
        1001,
        1001,
        &[4242],
        &["run", "-n", "--namespace", "ops", "deploy", "--", "true"],
    )
    .await;
    assert_eq!(
        code(&out),
        0,
        "member by supplementary group: {}",
        text(&out.stderr)
    );

    let held = as_in(&["acquire", "--lease", "1m", "--namespace", "ops", "deploy"]).await;
    assert_eq!(code(&held), 0, "{}", text(&held.stderr));
    for args in [
        &["run", "-n", "--namespace", "ops", "deploy", "--", "true"][..],
        &["acquire", "--lease", "1m", "--namespace", "ops", "other"][..],
        &["describe", "--namespace", "ops", "deploy"][..],
        &["list", "--namespace", "ops"][..],
        &["watch", "--namespace", "ops", "deploy"][..],
    ] {
        let out = lockctl_as(&d, OUTSIDER.0, OUTSIDER.1, &[], args).await;
        assert_eq!(code(&out), 77, "outsider {args:?}: {}", text(&out.stderr));
    }
    // Listing everything shows the outsider nothing of ops; root sees it.
    let out = as_out(&["list", "--json"]).await;
    assert!(
        !text(&out.stdout).contains("\"ops\""),
        "{}",
        text(&out.stdout)
    );
    let out = lockctl(&d.socket, &["list", "--json"]).await;
    assert!(text(&out.stdout).contains("\"ops\""));
    // The outsider still uses the default namespace.
    let out = as_out(&["run", "-n", "mine", "--", "true"]).await;
    assert_eq!(code(&out), 0);

    // A ticket is useless to another uid.
    let lease = as_in(&["acquire", "--lease", "1m", "shared-space"]).await;
    let ticket = text(&lease.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("LOCKD_TICKET=").map(str::to_string))
        .unwrap();
    let out = lockctl_as(&d, OUTSIDER.0, OUTSIDER.1, &[], &["renew", &ticket]).await;
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));
    let out = lockctl_as(&d, OUTSIDER.0, OUTSIDER.1, &[], &["release", &ticket]).await;
    assert_eq!(code(&out), 3);
    let out = lockctl_as(&d, INSIDER.0, INSIDER.1, &[], &["renew", &ticket]).await;
    assert_eq!(code(&out), 0, "its owner still can: {}", text(&out.stderr));
}

#[tokio::test]
async fn check_config_accepts_good_files_and_names_the_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "socket_mode = \"0660\"\n[limits]\nmax_lease = \"1h\"\n[namespaces.ops]\nusers = [0]\n",
    )
    .unwrap();
    let out = std::process::Command::new(LOCKD)
        .arg("--check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_lease = \"1h\"\nmax_leases = 3\n").unwrap();
    let out = std::process::Command::new(LOCKD)
        .arg("--check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("line 3") && err.contains("max_leases"),
        "{err}"
    );
}

#[tokio::test]
async fn per_connection_hold_and_per_uid_connection_limits() {
    let d = daemon_with_config(
        "[limits]\nmax_holds_per_connection = 3\nmax_connections_per_uid = 4\n",
        &[],
    )
    .await;
    let good = d.client().await;
    let busy = d.client().await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(busy.try_lock(format!("h{i}")).await.unwrap());
    }
    let err = busy.try_lock("h3").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::LimitExceeded), "{err}");
    good.try_lock("free")
        .await
        .unwrap()
        .release()
        .await
        .unwrap();

    let c3 = d.client().await;
    let _c4 = d.client().await;
    // The daemon refuses without reading the Hello and closes, so the client's Hello write
    // races the close (EPIPE); the reason must reach the caller however that race goes.
    for _ in 0..50 {
        let err = Client::connect(&d.socket).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::LimitExceeded), "{err}");
    }
    good.try_lock("still-served")
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    drop(c3);
    within(PROMPT, "a slot frees up", async {
        loop {
            if Client::connect(&d.socket).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

fn raise_fd_limit(want: u64) -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur >= want {
            return true;
        }
        lim.rlim_cur = want.min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur >= want
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_while_a_client_works() {
    if !raise_fd_limit(8192) {
        eprintln!("SKIPPED: cannot raise the open-file limit to 8192");
        return;
    }
    let d = TestDaemon::start(LOCKD).await; // inherits the raised limit
    let mut idle = Vec::with_capacity(2000);
    for _ in 0..2000 {
        idle.push(RawConn::connect_hello(&d.socket).await);
    }
    let good = d.client().await;
    for i in 0..100 {
        let g = good.try_lock(format!("busy-{}", i % 5)).await.unwrap();
        g.release().await.unwrap();
    }
    let stats = good.stats().await.unwrap();
    let conns = stats
        .gauges
        .iter()
        .find(|(n, _)| n == "connections")
        .unwrap()
        .1;
    assert!(conns >= 2001, "connections gauge {conns}");
    drop(idle);
}

#[tokio::test]
async fn running_out_of_file_descriptors_neither_spins_nor_crashes() {
    let d = TestDaemon::start_limited(LOCKD, &[], &[], Some(64)).await;
    let mut conns = Vec::new();
    for _ in 0..100 {
        if let Ok(s) = tokio::net::UnixStream::connect(&d.socket).await {
            conns.push(s);
        }
    }
    let before = d.cpu_ticks();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = d.cpu_ticks() - before;
    assert!(used < 50, "the accept loop spins: {used} ticks in 1 s");
    drop(conns);
    let c = within(PROMPT, "serving again", async {
        loop {
            if let Ok(c) = Client::connect(&d.socket).await {
                if c.ping().await.is_ok() {
                    break c;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    c.try_lock("after-emfile").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_disconnected_and_memory_stays_bounded() {
    let d = daemon_with_config("[limits]\nwrite_timeout = \"1s\"\n", &[]).await;
    let good = d.client().await;
    let mut flooder = RawConn::connect_hello(&d.socket).await;
    flooder
        .request(
            1,
            crate::acquire_op("flood-held", Mode::Exclusive, Wait::No, None, false),
        )
        .await;
    match flooder.recv(PROMPT).await {
        Some(ServerMessage::Response(r)) => assert!(r.result.is_ok()),
        other => panic!("{other:?}"),
    }
    // Flood pings without ever reading the answers, until the daemon hangs up.
    let mut batch = bytes::BytesMut::new();
    {
        use tokio_util::codec::Encoder;
        let mut codec = lockd_protocol::ClientCodec::default();
        for id in 0..10_000u64 {
            let msg = lockd_protocol::ClientMessage::Request(lockd_protocol::Request {
                id: id + 2,
                op: Op::Ping,
            });
            codec.encode(msg, &mut batch).unwrap();
        }
    }
    let start = Instant::now();
    let flood = async {
        use tokio::io::AsyncWriteExt;
        loop {
            if flooder.stream.write_all(&batch).await.is_err() {
                break;
            }
        }
    };
    within(Duration::from_secs(60), "flooder disconnected", flood).await;
    eprintln!("flooder cut off after {:?}", start.elapsed());
    // Meanwhile and afterwards, others are served, and the flooder's hold is gone.
    good.ping().await.unwrap();
    let take = std::future::IntoFuture::into_future(good.acquire("flood-held").wait(PROMPT));
    within(PROMPT, "flooder's hold released", take)
        .await
        .unwrap();
    let rss = d.peak_rss_kib();
    eprintln!("daemon peak RSS: {} KiB", rss);
    assert!(rss < 200 * 1024, "peak RSS {rss} KiB");
}

#[tokio::test]
async fn clients_that_vanish_during_the_handshake_do_not_use_up_their_uids_slots() {
    let d = daemon_with_config("[limits]\nmax_connections_per_uid = 2\n", &[]).await;
    for _ in 0..10 {
        let mut raw = RawConn::connect(&d.socket).await;
        raw.send(lockd_protocol::ClientMessage::Hello(
            lockd_protocol::Hello {
                protocol_version: lockd_protocol::PROTOCOL_VERSION,
                client_name: "gone".into(),
            },
        ))
        .await;
        drop(raw); // before reading Welcome
    }
    // Both slots come back (the daemon notices the closes asynchronously: bounded wait).
    let (a, b) = within(PROMPT, "two connections fit again", async {
        loop {
            if let (Ok(a), Ok(b)) = (
                Client::connect(&d.socket).await,
                Client::connect(&d.socket).await,
            ) {
                break (a, b);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    a.ping().await.unwrap();
    b.ping().await.unwrap();
}
