//! `lockd-bench` against the real daemon: each workload runs for about a second and must exit
//! 0 with parseable JSON carrying its fields and positive counts. Nothing here asserts speed.

use std::time::Duration;

use lockd_tests::{within, TestDaemon};
use serde_json::Value;

use crate::{code, daemon, text};

const LOCKD_BENCH: &str = env!("CARGO_BIN_EXE_lockd-bench");

/// Runs `lockd-bench --socket SOCKET --json ARGS...` (bounded) and returns its JSON objects,
/// one per line of stdout, after checking it exited 0.
async fn bench(d: &TestDaemon, args: &[&str]) -> Vec<Value> {
    let run = tokio::process::Command::new(LOCKD_BENCH)
        .arg("--socket")
        .arg(&d.socket)
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
        d.log_tail()
    );
    let stdout = text(&out.stdout);
    let objects: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!objects.is_empty(), "no measurement printed");
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

#[tokio::test]
async fn bench_says_when_lockd_is_unreachable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("nobody.sock");
    let run = tokio::process::Command::new(LOCKD_BENCH)
        .arg("--socket")
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
    assert!(
        stderr.contains("cannot connect to lockd") && stderr.contains("nobody.sock"),
        "{stderr}"
    );
}
