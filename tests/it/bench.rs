//! `lockd-bench` against the real daemon: each workload runs for about a second and must exit
//! 0 with parseable JSON carrying its fields and positive counts. Nothing here asserts speed.

use std::ffi::OsStr;
use std::time::Duration;

use lockd_tests::{within, TestDaemon};
use serde_json::Value;

use crate::{code, daemon, text};

const LOCKD_BENCH: &str = env!("CARGO_BIN_EXE_lockd-bench");

/// Runs `lockd-bench --json ARGS...` (bounded) and returns its JSON objects, one per line of
/// stdout, after checking it exited 0; `log` is shown if it did not.
async fn bench_json(args: &[&OsStr], log: &dyn Fn() -> String) -> Vec<Value> {
    let run = tokio::process::Command::new(LOCKD_BENCH)
        .arg("--json")
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within(Duration::from_secs(60), "lockd-bench finished", run)
        .await
        .expect("run lockd-bench");
    assert_eq!(
        code(&out),
        0,
        "lockd-bench {args:?} failed; stderr:\n{}\nstdout:\n{}\nlog:\n{}",
        text(&out.stderr),
        text(&out.stdout),
        log()
    );
    let stdout = text(&out.stdout);
    let objects: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!objects.is_empty(), "no measurement printed");
    objects
}

fn os<'a>(args: &[&'a str]) -> Vec<&'a OsStr> {
    args.iter().map(|a| OsStr::new(*a)).collect()
}

/// Runs `lockd-bench --socket SOCKET --json ARGS...` against `d`: [`bench_json`], then checks
/// that it left nothing held.
async fn bench(d: &TestDaemon, args: &[&str]) -> Vec<Value> {
    let mut all = vec![OsStr::new("--socket"), d.socket.as_os_str()];
    all.extend(os(args));
    let objects = bench_json(&all, &|| d.log_tail()).await;
    // Whatever it did, it left nothing held (detached leases included).
    let left = d
        .client()
        .await
        .list(None, "lockd-bench-")
        .await
        .expect("list");
    assert!(left.is_empty(), "lockd-bench left keys held: {left:?}");
    objects
}

fn num(v: &Value, path: &str) -> f64 {
    path.split('.')
        .fold(v, |v, field| &v[field])
        .as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number in {v}"))
}

fn positive(v: &Value, path: &str) {
    assert!(num(v, path) > 0.0, "{path} should be positive in {v}");
}

/// The fields every pairs or handoff measurement carries.
fn check_timed(m: &Value, workload: &str, clients: u64) {
    assert_eq!(m["workload"], workload, "{m}");
    assert_eq!(m["clients"], clients, "{m}");
    assert!(m["server_version"].is_string(), "{m}");
    assert!(m["daemon_pid"].as_u64().is_some(), "{m}");
    for path in ["pairs", "pairs_per_sec", "duration_s", "acquire_us.count"] {
        positive(m, path);
    }
    for path in ["acquire_us.p50", "acquire_us.p99", "acquire_us.p999"] {
        positive(m, path);
    }
    assert!(num(m, "acquire_us.p50") <= num(m, "acquire_us.p999"), "{m}");
    for path in ["refused.timeout", "refused.deadlock", "refused.conflict"] {
        num(m, path);
    }
}

#[tokio::test]
async fn bench_measures_pairs_for_each_client_count() {
    let d = daemon().await;
    let out = bench(&d, &["--duration", "1", "--clients", "1,2"]).await;
    assert_eq!(out.len(), 2, "one object per client count: {out:?}");
    for (m, clients) in out.iter().zip([1, 2]) {
        check_timed(m, "pairs", clients);
        assert_eq!(m["driver"], "client");
        assert_eq!(m["depth"], 1);
        assert_eq!(m["key_choice"], "per-slot");
        assert_eq!(m["keys"], clients);
        assert_eq!(m["mode"], "exclusive");
        assert!(m.get("floor").is_none(), "{m}");
    }
}

#[tokio::test]
async fn bench_measures_an_echo_floor_beside_lockd() {
    let d = daemon().await;
    let out = bench(&d, &["--duration", "1", "--floor"]).await;
    let m = &out[0];
    check_timed(m, "pairs", 1);
    for path in [
        "floor.pairs",
        "floor.pairs_per_sec",
        "floor.acquire_us.count",
        "floor.acquire_us.p50",
        "floor.frame_bytes.acquire",
        "floor.frame_bytes.granted",
        "floor.frame_bytes.release",
        "floor.frame_bytes.released",
        "ratio",
    ] {
        positive(m, path);
    }
}

#[tokio::test]
async fn bench_pipelines_on_one_hot_key() {
    let d = daemon().await;
    for raw in [false, true] {
        let mut args = vec![
            "--duration",
            "1",
            "--depth",
            "8",
            "--keys",
            "1",
            "--clients",
            "2",
        ];
        if raw {
            args.push("--raw");
        }
        let out = bench(&d, &args).await;
        let m = &out[0];
        check_timed(m, "pairs", 2);
        assert_eq!(m["depth"], 8);
        assert_eq!(m["keys"], 1);
        assert_eq!(m["key_choice"], "random");
        assert_eq!(m["driver"], if raw { "raw" } else { "client" });
    }
}

#[tokio::test]
async fn bench_takes_and_releases_detached_leases() {
    let d = daemon().await;
    let out = bench(&d, &["--duration", "1", "--lease", "30s", "--detach"]).await;
    let m = &out[0];
    check_timed(m, "pairs", 1);
    assert_eq!(m["lease_ms"], 30_000);
    assert_eq!(m["detach"], true);
}

#[tokio::test]
async fn bench_reports_the_daemons_memory_holding_many_locks() {
    let d = daemon().await;
    let out = bench(
        &d,
        &["--hold-many", "1000", "--clients", "4", "--rss-watch", "2"],
    )
    .await;
    let m = &out[0];
    assert_eq!(m["workload"], "hold-many", "{m}");
    assert_eq!(m["holds"], 1000);
    assert_eq!(m["clients"], 4);
    assert_eq!(m["daemon_pid"], d.pid(), "the pid found by SO_PEERCRED");
    for path in [
        "rss_kib.idle",
        "rss_kib.connected",
        "rss_kib.held",
        "rss_kib.peak",
        "acquire_s",
        "release_s",
    ] {
        positive(m, path);
    }
    let after = m["rss_after_release"].as_array().expect("an array");
    assert!(!after.is_empty() && after.len() <= 3, "{m}");
    for sample in after {
        positive(sample, "kib");
        num(sample, "t_s");
    }
}

#[tokio::test]
async fn bench_measures_handoffs_on_one_hot_key() {
    let d = daemon().await;
    let out = bench(&d, &["--duration", "1", "--handoff", "--clients", "4"]).await;
    let m = &out[0];
    check_timed(m, "handoff", 4);
    for path in [
        "handoffs",
        "handoff_us.count",
        "handoff_us.p50",
        "handoff_us.p99",
    ] {
        positive(m, path);
    }
}

/// Runs `lockd-bench FLAG DIR/nobody.sock --json` with nothing listening there: it must exit
/// 69, print nothing on stdout, and name the socket; its stderr.
async fn unreachable(flag: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("nobody.sock");
    let run = tokio::process::Command::new(LOCKD_BENCH)
        .arg(flag)
        .arg(&socket)
        .arg("--json")
        .kill_on_drop(true)
        .output();
    let out = within(Duration::from_secs(30), "lockd-bench finished", run)
        .await
        .expect("run lockd-bench");
    assert_eq!(code(&out), 69, "stderr: {}", text(&out.stderr));
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("nobody.sock"), "{stderr}");
    stderr
}

#[tokio::test]
async fn bench_says_when_lockd_is_unreachable() {
    let stderr = unreachable("--socket").await;
    assert!(stderr.contains("cannot connect to lockd"), "{stderr}");
}

#[tokio::test]
async fn bench_says_when_redis_is_unreachable() {
    let stderr = unreachable("--redis").await;
    assert!(stderr.contains("cannot connect to Redis"), "{stderr}");
}

#[tokio::test]
async fn bench_measures_the_disks_sync_floor_beside_detached_leases() {
    let d = daemon().await;
    let dir = d.data_dir.to_str().expect("a UTF-8 temporary path");
    let out = bench(
        &d,
        &[
            "--duration",
            "1",
            "--lease",
            "30s",
            "--detach",
            "--fsync-floor",
            dir,
        ],
    )
    .await;
    let m = &out[0];
    check_timed(m, "pairs", 1);
    assert_eq!(m["fsync_floor"]["block_bytes"], 4096, "{m}");
    for path in [
        "fsync_floor.syncs",
        "fsync_floor.syncs_per_sec",
        "fsync_floor.sync_us.count",
        "fsync_floor.sync_us.p50",
        "sync_ratio",
    ] {
        positive(m, path);
    }
    // Session locks do not commit: the floor is measured, no ratio is claimed.
    let out = bench(&d, &["--duration", "1", "--fsync-floor", dir]).await;
    positive(&out[0], "fsync_floor.syncs");
    assert!(out[0].get("sync_ratio").is_none(), "{}", out[0]);
    let left: Vec<_> = std::fs::read_dir(&d.data_dir)
        .expect("read the data directory")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".lockd-bench"))
        .collect();
    assert!(left.is_empty(), "the synced file was left: {left:?}");
}

#[tokio::test]
async fn bench_measures_flock_handoffs_between_processes() {
    let args = os(&["--duration", "1", "--handoff", "--flock", "--clients", "2"]);
    let out = bench_json(&args, &String::new).await;
    let m = &out[0];
    assert_eq!(m["target"], "flock", "{m}");
    assert_eq!(m["workload"], "handoff", "{m}");
    assert_eq!(m["driver"], "flock", "{m}");
    assert_eq!(m["clients"], 2, "{m}");
    assert!(m["daemon_pid"].is_null(), "{m}");
    for path in [
        "pairs",
        "pairs_per_sec",
        "acquire_us.count",
        "handoffs",
        "handoff_us.p50",
        "handoff_us.p99",
    ] {
        positive(m, path);
    }
}

/// A redis-server on a socket in a temporary directory (no persistence), killed on drop.
struct Redis {
    child: std::process::Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// `None` when redis-server is not installed.
    fn start() -> Option<Redis> {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("redis.sock");
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let redis = Redis {
            child,
            socket,
            _dir: dir,
        };
        let started = std::time::Instant::now();
        while !redis.socket.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(redis)
    }

    /// The number of keys (DBSIZE, spoken by hand).
    fn dbsize(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(b"*1\r\n$6\r\nDBSIZE\r\n").expect("write");
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while !reply.ends_with(b"\r\n") {
            s.read_exact(&mut byte).expect("read");
            reply.push(byte[0]);
        }
        text(&reply)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn bench_measures_redis_when_it_is_installed() {
    let Some(redis) = Redis::start() else {
        eprintln!(
            "\n*** SKIPPED bench_measures_redis_when_it_is_installed: redis-server is not \
             installed (apt-get install redis-server) ***\n"
        );
        return;
    };
    let socket = redis.socket.as_os_str();
    let mut args = vec![OsStr::new("--redis"), socket];
    args.extend(os(&["--duration", "1", "--clients", "1,2", "--depth", "2"]));
    let out = bench_json(&args, &String::new).await;
    assert_eq!(out.len(), 2, "{out:?}");
    for (m, clients) in out.iter().zip([1, 2]) {
        check_timed(m, "pairs", clients);
        assert_eq!(m["target"], "redis", "{m}");
        assert_eq!(m["driver"], "resp", "{m}");
        assert_eq!(
            m["daemon_pid"],
            redis.child.id(),
            "the pid found by SO_PEERCRED"
        );
        assert_eq!(m["refused"]["conflict"], 0, "one key per slot: {m}");
    }
    let mut args = vec![OsStr::new("--redis"), socket];
    args.extend(os(&[
        "--hold-many",
        "1000",
        "--clients",
        "4",
        "--rss-watch",
        "1",
    ]));
    let out = bench_json(&args, &String::new).await;
    let m = &out[0];
    assert_eq!(
        (m["target"].as_str(), m["holds"].as_u64()),
        (Some("redis"), Some(1000))
    );
    positive(m, "rss_kib.held");
    assert_eq!(redis.dbsize(), ":0\r\n", "every key was released");
}
