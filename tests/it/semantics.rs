//! Counting semaphores, deadlock detection and lock-delay, as users meet them: through the
//! client crate and through lockctl, against the real daemon. Every wait is bounded; time-based
//! checks have margins of seconds.

use std::future::IntoFuture;
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lockd_client::{Change, Client, ConnectOptions, Description, ErrorCode, Key};
use lockd_tests::{within, TestDaemon};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::{
    code, daemon, enqueue, lockctl, lockctl_command as command, lockctl_with as run_with,
    poll_once, text, LOCKCTL, LOCKD, PROMPT,
};

fn key(name: &str) -> Key {
    Key::in_default(name).expect("valid name")
}

/// A client connection whose handshake name is `name` (describe and deadlock messages show it).
async fn named(d: &TestDaemon, name: &str) -> Client {
    let options = ConnectOptions::default().client_name(name);
    Client::connect_with(&d.socket, options)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}; log:\n{}", d.log_tail()))
}

/// A daemon started with `--config` holding `toml` (and `args`); keep the directory as long as
/// the daemon runs.
async fn configured(toml: &str, args: &[&str]) -> (TestDaemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("config dir");
    let path = dir.path().join("lockd.toml");
    std::fs::write(&path, toml).expect("write config");
    let path = path.to_str().expect("utf-8 path").to_string();
    let mut all = vec!["--config", path.as_str()];
    all.extend_from_slice(args);
    let d = TestDaemon::start_with(LOCKD, &all).await;
    (d, dir)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// The daemon's counter `name`.
async fn counter(c: &Client, name: &str) -> u64 {
    let s = c.stats().await.expect("stats");
    s.counters
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no counter {name} in {:?}", s.counters))
}

/// Polls describe until `pred` accepts the description (bounded); returns it.
async fn describe_until(
    d: &TestDaemon,
    c: &Client,
    name: &str,
    what: &str,
    pred: impl Fn(&Description) -> bool,
) -> Description {
    let deadline = Instant::now() + PROMPT;
    loop {
        let desc = c.describe(&key(name)).await.expect("describe");
        if pred(&desc) {
            return desc;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {PROMPT:?}: {desc:?}; log:\n{}",
            d.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the daemon counts at least `n` watches.
async fn watches_registered(c: &Client, n: u64) {
    within(PROMPT, "watches registered", async {
        loop {
            let s = c.stats().await.unwrap();
            if s.gauges.iter().any(|(g, v)| g == "watches" && *v >= n) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// The first line of `lines` that `pred` accepts (bounded).
async fn line_where(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> String {
    within(PROMPT, what, async {
        loop {
            let line = lines
                .next_line()
                .await
                .expect("read watch output")
                .unwrap_or_else(|| panic!("{what}: lockctl watch ended"));
            if pred(&line) {
                return line;
            }
        }
    })
    .await
}

fn spawn_watch(d: &TestDaemon, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(LOCKCTL)
        .arg("--socket")
        .arg(&d.socket)
        .arg("watch")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn lockctl watch")
}

fn lines_of(
    child: &mut tokio::process::Child,
) -> tokio::io::Lines<BufReader<tokio::process::ChildStdout>> {
    BufReader::new(child.stdout.take().expect("piped stdout")).lines()
}

// ---------------------------------------------------------------------------------------------
// Counting semaphores
// ---------------------------------------------------------------------------------------------

/// Ten workers, each running `lockctl run --permits 3` twice around a 100 ms job: never more
/// than three jobs at once. Each job records its start (with the number of jobs it sees
/// running, by mkdir-based counting) and its end, both while lockctl holds its permit.
#[tokio::test]
async fn ten_lockctl_workers_on_three_permits_never_run_more_than_three_at_once() {
    const WORKERS: usize = 10;
    const RUNS: usize = 2;
    let d = daemon().await;
    let log = d.dir().join("runs");
    let running = d.dir().join("running");
    std::fs::create_dir(&running).unwrap();
    let script = "mkdir \"$D/$$\"; n=$(ls \"$D\" | wc -l); echo \"start $$ $n\" >> \"$F\"; \
                  sleep 0.1; echo \"end $$\" >> \"$F\"; rmdir \"$D/$$\"";
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let (socket, log, running) = (d.socket.clone(), log.clone(), running.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..RUNS {
                let out = run_with(
                    &socket,
                    &[
                        "run",
                        "-w",
                        "30",
                        "--permits",
                        "3",
                        "pool",
                        "--",
                        "sh",
                        "-c",
                        script,
                    ],
                    &[("F", log.as_path()), ("D", running.as_path())],
                )
                .await;
                assert_eq!(code(&out), 0, "{}", text(&out.stderr));
            }
        }));
    }
    for t in tasks {
        crate::within_or_panic(t).await;
    }

    let record = std::fs::read_to_string(&log).unwrap();
    let (mut now, mut most, mut most_seen, mut starts, mut ends) = (0i64, 0i64, 0i64, 0, 0);
    for line in record.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["start", _, seen] => {
                starts += 1;
                now += 1;
                most = most.max(now);
                most_seen = most_seen.max(seen.parse().expect("a count"));
            }
            ["end", _] => {
                ends += 1;
                now -= 1;
                assert!(now >= 0, "an end before its start:\n{record}");
            }
            _ => panic!("unexpected line {line:?} in\n{record}"),
        }
    }
    assert_eq!((starts, ends), (WORKERS * RUNS, WORKERS * RUNS), "{record}");
    assert!(
        most <= 3,
        "{most} jobs ran at once (by start/end order):\n{record}"
    );
    assert!(
        most_seen <= 3,
        "a job saw {most_seen} jobs running:\n{record}"
    );
    // Every permit came back: the key is idle again.
    let c = d.client().await;
    let desc = c.describe(&key("pool")).await.unwrap();
    assert!(
        desc.holders.is_empty() && desc.waiters.is_empty(),
        "{desc:?}"
    );
}

#[tokio::test]
async fn a_semaphore_grants_n_at_once_in_fifo_order_and_describe_shows_its_capacity() {
    let d = daemon().await;
    let (a, b) = (named(&d, "holder-a").await, named(&d, "holder-b").await);
    let (w1, w2, x) = (
        named(&d, "waiter-1").await,
        named(&d, "waiter-2").await,
        d.client().await,
    );
    let ga = a.acquire("slots").permits(2).await.expect("first permit");
    let gb = b.acquire("slots").permits(2).await.expect("second permit");
    assert_ne!(ga.fence(), gb.fence(), "each permit has its own fence");
    let err = x.acquire("slots").permits(2).await.expect_err("full");
    assert!(err.is_conflict(), "{err}");
    let long = Duration::from_secs(30);
    let mut p1 = enqueue(&w1, w1.acquire("slots").permits(2).wait(long)).await;
    let mut p2 = enqueue(&w2, w2.acquire("slots").permits(2).wait(long)).await;

    let desc = x.describe(&key("slots")).await.unwrap();
    assert_eq!(desc.permits, Some(2), "{desc:?}");
    assert_eq!(desc.delayed_until_ms, None, "{desc:?}");
    let holders: Vec<&str> = desc
        .holders
        .iter()
        .map(|h| h.owner.client_name.as_str())
        .collect();
    assert_eq!(holders, ["holder-a", "holder-b"], "{desc:?}");
    let waiters: Vec<&str> = desc
        .waiters
        .iter()
        .map(|w| w.owner.client_name.as_str())
        .collect();
    assert_eq!(waiters, ["waiter-1", "waiter-2"], "{desc:?}");

    let human = lockctl(&d.socket, &["describe", "slots"]).await;
    assert_eq!(code(&human), 0, "{}", text(&human.stderr));
    let out = text(&human.stdout);
    assert!(out.contains("semaphore: 2 of 2 permits taken"), "{out}");
    assert!(
        out.contains("holder-a") && out.contains("waiter-2"),
        "{out}"
    );
    assert!(!out.contains("lock-delay"), "{out}");
    let json = lockctl(&d.socket, &["describe", "--json", "slots"]).await;
    assert_eq!(code(&json), 0, "{}", text(&json.stderr));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["permits"], 2, "{v}");
    assert_eq!(v["delayed_until_ms"], serde_json::Value::Null, "{v}");
    assert_eq!(v["holders"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["waiters"].as_array().unwrap().len(), 2, "{v}");
    // A plain lock says so: no capacity.
    let _plain = x.lock("plain").await.unwrap();
    let json = lockctl(&d.socket, &["describe", "--json", "plain"]).await;
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["permits"], serde_json::Value::Null, "{v}");
    let human = lockctl(&d.socket, &["describe", "plain"]).await;
    assert!(!text(&human.stdout).contains("semaphore"));

    // One permit comes back: the first waiter gets it, the second keeps waiting, and a try
    // still finds the semaphore full.
    ga.release().await.unwrap();
    let g1 = within(PROMPT, "first waiter granted", &mut p1)
        .await
        .expect("granted");
    assert!(
        poll_once(&mut p2).await.is_none(),
        "only one permit came back"
    );
    let err = x.acquire("slots").permits(2).await.expect_err("full again");
    assert!(err.is_conflict(), "{err}");
    let human = lockctl(&d.socket, &["describe", "slots"]).await;
    assert!(
        text(&human.stdout).contains("semaphore: 2 of 2 permits taken"),
        "{}",
        text(&human.stdout)
    );
    gb.release().await.unwrap();
    let g2 = within(PROMPT, "second waiter granted", &mut p2)
        .await
        .expect("granted");
    assert!(g1.fence() < g2.fence(), "granted in FIFO order");
    g2.release().await.unwrap();
    let human = lockctl(&d.socket, &["describe", "slots"]).await;
    assert!(
        text(&human.stdout).contains("semaphore: 1 of 2 permits taken"),
        "{}",
        text(&human.stdout)
    );

    // Once nobody holds or waits, the next first holder fixes a new capacity.
    g1.release().await.unwrap();
    let g = x
        .acquire("slots")
        .permits(5)
        .await
        .expect("an idle key takes a new capacity");
    assert_eq!(x.describe(&key("slots")).await.unwrap().permits, Some(5));
    drop(g);
}

#[tokio::test]
async fn a_capacity_mismatch_is_invalid_argument_naming_the_current_capacity() {
    let d = daemon().await;
    let (a, b) = (d.client().await, d.client().await);
    let _sem = a.acquire("pool").permits(3).await.unwrap();
    let _plain = a.lock("plain").await.unwrap();

    for (what, attempt) in [
        ("other N", b.acquire("pool").permits(2)),
        (
            "other N, waiting",
            b.acquire("pool").permits(4).wait(PROMPT),
        ),
        ("no permits", b.acquire("pool")),
        ("no permits, waiting", b.acquire("pool").wait(PROMPT)),
    ] {
        let err = within(PROMPT, what, attempt.into_future())
            .await
            .expect_err(what);
        assert_eq!(
            err.code(),
            Some(ErrorCode::InvalidArgument),
            "{what}: {err}"
        );
        assert!(err.to_string().contains("3 permits"), "{what}: {err}");
    }
    for (what, attempt) in [
        ("permits on a plain lock", b.acquire("plain").permits(2)),
        (
            "permits on a plain lock, waiting",
            b.acquire("plain").permits(2).wait(PROMPT),
        ),
    ] {
        let err = within(PROMPT, what, attempt.into_future())
            .await
            .expect_err(what);
        assert_eq!(
            err.code(),
            Some(ErrorCode::InvalidArgument),
            "{what}: {err}"
        );
        assert!(err.to_string().contains("plain lock"), "{what}: {err}");
    }
    for (what, attempt) in [
        ("zero permits", b.acquire("zero").permits(0)),
        ("shared permits", b.acquire("shared").permits(2).shared()),
    ] {
        let err = attempt.await.expect_err(what);
        assert_eq!(
            err.code(),
            Some(ErrorCode::InvalidArgument),
            "{what}: {err}"
        );
    }
    // The capacity stands and the holder keeps its permit.
    let desc = b.describe(&key("pool")).await.unwrap();
    assert_eq!((desc.permits, desc.holders.len()), (Some(3), 1), "{desc:?}");
    assert!(desc.waiters.is_empty(), "{desc:?}");

    // lockctl: exit 2 (usage), the daemon's message on stderr, the command never runs.
    for args in [
        &["run", "-n", "--permits", "2", "pool", "echo", "ran"][..],
        &["run", "-w", "10", "--permits", "2", "pool", "echo", "ran"],
        &["run", "-n", "pool", "echo", "ran"],
        &["acquire", "--lease", "1m", "-n", "--permits", "4", "pool"],
    ] {
        let out = lockctl(&d.socket, args).await;
        assert_eq!(code(&out), 2, "{args:?}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("3 permits"),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(text(&out.stdout).is_empty(), "{args:?}: the command ran");
    }
    let out = lockctl(
        &d.socket,
        &["run", "-n", "--permits", "2", "plain", "echo", "ran"],
    )
    .await;
    assert_eq!(code(&out), 2, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("plain lock"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).is_empty());
    // The matching capacity works through lockctl.
    let out = lockctl(
        &d.socket,
        &["run", "-n", "--permits", "3", "pool", "echo", "ran"],
    )
    .await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ran\n");
}

/// A permit held by `lockctl run` whose lockctl and command are both SIGKILLed comes back:
/// the queued waiter gets it, and the other permit's holder is untouched.
#[tokio::test]
async fn a_sigkilled_lockctl_holder_frees_its_permit() {
    let d = daemon().await;
    let steady = named(&d, "steady").await;
    let _kept = steady.acquire("slots").permits(2).await.unwrap();
    let pidfile = d.dir().join("pid");
    let script = "echo $$ > \"$P.tmp\"; mv \"$P.tmp\" \"$P\"; exec sleep 60";
    let mut holder = command(
        &d.socket,
        &["run", "-n", "--permits", "2", "slots", "-c", script],
        &[("P", pidfile.as_path())],
    )
    .spawn()
    .unwrap();
    within(PROMPT, "the command started under its permit", async {
        while !pidfile.exists() {
            if let Ok(Some(status)) = holder.try_wait() {
                panic!("lockctl exited early: {status}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let command_pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Its process group, read while lockctl (its parent) is alive, so the pid is still its.
    let stat = std::fs::read_to_string(format!("/proc/{command_pid}/stat")).unwrap();
    let pgrp: i32 = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(2))
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("no pgrp in {stat}"));

    let waiter = named(&d, "waiter").await;
    let err = waiter.acquire("slots").permits(2).await.expect_err("full");
    assert!(err.is_conflict(), "{err}");
    let mut waiting = enqueue(
        &waiter,
        waiter
            .acquire("slots")
            .permits(2)
            .wait(Duration::from_secs(30)),
    )
    .await;

    holder.start_kill().unwrap(); // SIGKILL to lockctl
    within(PROMPT, "the killed lockctl is reaped", holder.wait())
        .await
        .unwrap();
    // SAFETY: kill and getpgrp have no memory-safety preconditions; never our own group.
    unsafe {
        if pgrp == command_pid && pgrp != libc::getpgrp() {
            libc::kill(-pgrp, libc::SIGKILL);
        } else {
            libc::kill(command_pid, libc::SIGKILL);
        }
    }
    let g = within(PROMPT, "the waiter gets the freed permit", &mut waiting)
        .await
        .expect("granted");
    let desc = steady.describe(&key("slots")).await.unwrap();
    let mut holders: Vec<&str> = desc
        .holders
        .iter()
        .map(|h| h.owner.client_name.as_str())
        .collect();
    holders.sort_unstable();
    assert_eq!(holders, ["steady", "waiter"], "{desc:?}");
    drop(g);
}

// ---------------------------------------------------------------------------------------------
// Deadlock detection
// ---------------------------------------------------------------------------------------------

/// Asserts `err` is a Deadlock whose message names every one of `parts`.
fn assert_deadlock(err: &lockd_client::Error, parts: &[&str]) {
    assert_eq!(err.code(), Some(ErrorCode::Deadlock), "{err}");
    assert!(err.is_deadlock());
    let msg = err.to_string();
    for part in parts {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
}

#[tokio::test]
async fn a_two_connection_cycle_refuses_the_closing_wait_at_once_and_leaves_the_other() {
    let d = daemon().await;
    let observer = d.client().await;
    let mut watch = observer.watch(&key("k1")).await.unwrap();
    let mut json_watch = spawn_watch(&d, &["--json", "k1"]);
    let mut json_lines = lines_of(&mut json_watch);
    let mut human_watch = spawn_watch(&d, &["k1"]);
    let mut human_lines = lines_of(&mut human_watch);
    watches_registered(&observer, 3).await;
    assert_eq!(counter(&observer, "deadlocks").await, 0);

    let (alpha, beta) = (named(&d, "alpha").await, named(&d, "beta").await);
    let _g1 = alpha.lock("k1").await.unwrap();
    let g2 = beta.lock("k2").await.unwrap();
    let long = Duration::from_secs(60);
    let mut alpha_waits = enqueue(&alpha, alpha.acquire("k2").wait(long)).await;
    let err = within(
        PROMPT,
        "beta's closing wait is answered at once",
        beta.acquire("k1").wait(long).into_future(),
    )
    .await
    .expect_err("a deadlock");
    let me = format!("pid {}", std::process::id());
    assert_deadlock(
        &err,
        &["default/k1", "default/k2", "\"alpha\"", "\"beta\"", &me],
    );

    // Only the closing request was refused: alpha still waits, beta still holds k2.
    assert!(
        poll_once(&mut alpha_waits).await.is_none(),
        "alpha untouched"
    );
    let k1 = observer.describe(&key("k1")).await.unwrap();
    assert!(
        k1.waiters.is_empty(),
        "the refused wait left the queue: {k1:?}"
    );
    let k2 = observer.describe(&key("k2")).await.unwrap();
    assert_eq!(k2.holders[0].owner.client_name, "beta", "{k2:?}");
    assert_eq!(k2.waiters.len(), 1, "{k2:?}");
    assert_eq!(k2.waiters[0].owner.client_name, "alpha", "{k2:?}");

    // Counted, logged at WARN, and told to the key's watchers.
    assert_eq!(counter(&observer, "deadlocks").await, 1);
    let stats = lockctl(&d.socket, &["stats", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(v["counters"]["deadlocks"], 1, "{v}");
    let log = d.log_tail();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("deadlock") && l.contains("default/k1")),
        "no WARN line about the deadlock in:\n{log}"
    );
    let (owner, cycle) = within(PROMPT, "the Deadlock change", async {
        loop {
            if let Change::Deadlock { owner, cycle } = watch.next().await.expect("watch open") {
                break (owner, cycle);
            }
        }
    })
    .await;
    assert_eq!(owner.client_name, "beta");
    assert_eq!(owner.pid, Some(std::process::id() as i32));
    for part in ["default/k1", "default/k2", "\"alpha\"", "\"beta\""] {
        assert!(cycle.contains(part), "{part:?} missing from {cycle}");
    }
    let line = line_where(&mut json_lines, "a deadlock line (--json)", |l| {
        l.contains("\"deadlock\"")
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["event"], "deadlock", "{v}");
    assert_eq!(v["name"], "k1", "{v}");
    assert_eq!(v["client"], "beta", "{v}");
    assert_eq!(v["pid"], std::process::id(), "{v}");
    assert_eq!(v["fence"], serde_json::Value::Null, "{v}");
    assert_eq!(v["cycle"], cycle.as_str(), "{v}");
    let line = line_where(&mut human_lines, "a deadlock line", |l| {
        l.starts_with("deadlock")
    })
    .await;
    assert!(line.contains("client=\"beta\""), "{line}");
    assert!(line.contains("default/k2"), "{line}");

    // When beta gives up k2, alpha's untouched wait is granted.
    g2.release().await.unwrap();
    within(PROMPT, "alpha granted k2", &mut alpha_waits)
        .await
        .expect("granted");
}

#[tokio::test]
async fn a_three_connection_cycle_names_every_key_and_owner() {
    let d = daemon().await;
    let (a, b, c) = (
        named(&d, "first").await,
        named(&d, "second").await,
        named(&d, "third").await,
    );
    let _ga = a.lock("k1").await.unwrap();
    let gb = b.lock("k2").await.unwrap();
    let gc = c.lock("k3").await.unwrap();
    let long = Duration::from_secs(60);
    let mut a_waits = enqueue(&a, a.acquire("k2").wait(long)).await; // first -> second
    let mut b_waits = enqueue(&b, b.acquire("k3").wait(long)).await; // second -> third
    let err = within(
        PROMPT,
        "third's closing wait is answered",
        c.acquire("k1").wait(long).into_future(), // third -> first: the cycle
    )
    .await
    .expect_err("a deadlock");
    assert_deadlock(
        &err,
        &[
            "default/k1",
            "default/k2",
            "default/k3",
            "\"first\"",
            "\"second\"",
            "\"third\"",
        ],
    );
    assert!(poll_once(&mut a_waits).await.is_none(), "first untouched");
    assert!(poll_once(&mut b_waits).await.is_none(), "second untouched");
    assert_eq!(counter(&a, "deadlocks").await, 1);

    // Third gives up: the chain unwinds.
    gc.release().await.unwrap();
    let gb3 = within(PROMPT, "second granted k3", &mut b_waits)
        .await
        .expect("granted");
    assert!(poll_once(&mut a_waits).await.is_none());
    gb.release().await.unwrap();
    gb3.release().await.unwrap();
    within(PROMPT, "first granted k2", &mut a_waits)
        .await
        .expect("granted");
}

/// A waiter waits for the requests queued ahead of it too: a shared request behind a queued
/// writer closes a cycle through that writer, though the current (shared) holder is in no
/// cycle and would be compatible with it.
#[tokio::test]
async fn a_cycle_through_a_request_queued_ahead_is_a_deadlock() {
    let d = daemon().await;
    let (reader, writer, blocker) = (
        named(&d, "reader").await,
        named(&d, "writer").await,
        named(&d, "blocker").await,
    );
    let gr = reader.acquire("doc").shared().await.unwrap();
    let gk = blocker.lock("other").await.unwrap();
    let long = Duration::from_secs(60);
    // The writer queues for doc (behind the reader) and for other (behind the blocker).
    let mut w_doc = enqueue(&writer, writer.acquire("doc").wait(long)).await;
    let mut w_other = enqueue(&writer, writer.acquire("other").wait(long)).await;
    // The blocker asks for a shared hold of doc: it would queue behind the writer, who waits
    // for the blocker's key.
    let err = within(
        PROMPT,
        "the blocker's shared wait is answered",
        blocker.acquire("doc").shared().wait(long).into_future(),
    )
    .await
    .expect_err("a deadlock");
    assert_deadlock(
        &err,
        &["default/doc", "default/other", "\"writer\"", "\"blocker\""],
    );
    assert!(poll_once(&mut w_doc).await.is_none());
    assert!(poll_once(&mut w_other).await.is_none());

    gr.release().await.unwrap();
    within(PROMPT, "writer granted doc", &mut w_doc)
        .await
        .expect("granted");
    gk.release().await.unwrap();
    within(PROMPT, "writer granted other", &mut w_other)
        .await
        .expect("granted");
}

/// A wait of a connection that held nothing is not searched when it is added, but it counts
/// once that connection takes a hold: a later wait closing a cycle through it is refused.
#[tokio::test]
async fn a_wait_added_while_holding_nothing_still_counts_once_its_connection_holds() {
    let d = daemon().await;
    let (holder, late) = (named(&d, "holder").await, named(&d, "late").await);
    let g1 = holder.lock("k1").await.unwrap();
    let long = Duration::from_secs(60);
    let mut late_waits = enqueue(&late, late.acquire("k1").wait(long)).await; // holds nothing
    let _g2 = late
        .try_lock("k2")
        .await
        .expect("late takes k2 while it waits");
    let err = within(
        PROMPT,
        "holder's closing wait is answered",
        holder.acquire("k2").wait(long).into_future(),
    )
    .await
    .expect_err("a deadlock through the late-registered wait");
    assert_deadlock(
        &err,
        &["default/k1", "default/k2", "\"holder\"", "\"late\""],
    );
    assert!(poll_once(&mut late_waits).await.is_none());
    g1.release().await.unwrap();
    within(PROMPT, "late granted k1", &mut late_waits)
        .await
        .expect("granted");
}

/// Waits on semaphores are not checked, in either order: both requests queue.
#[tokio::test]
async fn waits_on_semaphores_are_not_checked_for_deadlocks() {
    let d = daemon().await;
    let long = Duration::from_secs(60);
    for order in ["semaphore wait last", "semaphore wait first"] {
        let (a, b) = (d.client().await, d.client().await);
        let sem = format!("sem {order}");
        let plain = format!("plain {order}");
        let gs = a.acquire(sem.as_str()).permits(1).await.unwrap();
        let gp = b.lock(plain.as_str()).await.unwrap();
        let (mut a_waits, mut b_waits) = if order == "semaphore wait last" {
            let a_waits = enqueue(&a, a.acquire(plain.as_str()).wait(long)).await;
            let b_waits = enqueue(&b, b.acquire(sem.as_str()).permits(1).wait(long)).await;
            (a_waits, b_waits)
        } else {
            let b_waits = enqueue(&b, b.acquire(sem.as_str()).permits(1).wait(long)).await;
            let a_waits = enqueue(&a, a.acquire(plain.as_str()).wait(long)).await;
            (a_waits, b_waits)
        };
        // enqueue pinged after each request: a refusal would have arrived already.
        assert!(poll_once(&mut a_waits).await.is_none(), "{order}: a queued");
        assert!(poll_once(&mut b_waits).await.is_none(), "{order}: b queued");
        assert_eq!(counter(&a, "deadlocks").await, 0, "{order}");
        gs.release().await.unwrap();
        let gb = within(PROMPT, "b granted the permit", &mut b_waits)
            .await
            .expect("granted");
        gp.release().await.unwrap();
        let ga = within(PROMPT, "a granted the lock", &mut a_waits)
            .await
            .expect("granted");
        drop((ga, gb));
    }
}

// ---------------------------------------------------------------------------------------------
// Lock-delay
// ---------------------------------------------------------------------------------------------

/// A holder whose connection goes away without a release: the key grants nobody for the
/// lock-delay (tries conflict, saying so; describe shows until when), then the waiter gets it.
#[tokio::test]
async fn an_unclean_end_delays_the_key_and_a_waiter_is_granted_after_the_delay() {
    const DELAY: Duration = Duration::from_secs(4);
    let d = daemon().await;
    let crashy = named(&d, "crashy").await;
    let guard = crashy.acquire("ld").lock_delay(DELAY).await.unwrap();
    let other = named(&d, "other").await;

    let t0 = Instant::now();
    // The connection ends under the client, without a release (as if the process died).
    crashy
        .with_socket_fd(|fd| {
            // SAFETY: shutdown on a descriptor that stays open while this closure runs.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) }
        })
        .expect("connection open");
    describe_until(&d, &other, "ld", "the hold ended", |desc| {
        desc.holders.is_empty()
    })
    .await;
    let err = other.try_lock("ld").await.expect_err("in lock-delay");
    assert!(err.is_conflict(), "{err}");
    assert!(err.to_string().contains("lock-delay"), "{err}");

    let desc = other.describe(&key("ld")).await.unwrap();
    let until = desc
        .delayed_until_ms
        .unwrap_or_else(|| panic!("no delayed_until_ms: {desc:?}"));
    let now = now_ms();
    assert!(until > now, "delay already over? until {until}, now {now}");
    assert!(
        until <= now + DELAY.as_millis() as u64 + 1000,
        "until {until} is beyond the delay from now {now}"
    );
    let json = lockctl(&d.socket, &["describe", "--json", "ld"]).await;
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["delayed_until_ms"], until, "{v}");
    let human = lockctl(&d.socket, &["describe", "ld"]).await;
    let out = text(&human.stdout);
    assert!(out.contains("lock-delay until "), "{out}");
    assert!(out.contains("(in "), "{out}");
    let out = lockctl(&d.socket, &["run", "-n", "ld", "echo", "ran"]).await;
    assert_eq!(code(&out), 1, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("lock-delay"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).is_empty());

    let waiter = named(&d, "waiter").await;
    let g = within(
        Duration::from_secs(30),
        "the waiter is granted after the delay",
        waiter
            .acquire("ld")
            .wait(Duration::from_secs(30))
            .into_future(),
    )
    .await
    .expect("granted once the delay ended");
    let (granted_at, elapsed) = (now_ms(), t0.elapsed());
    assert!(
        granted_at + 250 >= until,
        "granted at {granted_at}, before the delay's end {until}"
    );
    assert!(
        elapsed >= DELAY - Duration::from_millis(500),
        "granted {elapsed:?} after the connection ended, the delay is {DELAY:?}"
    );
    assert!(
        elapsed < Duration::from_secs(25),
        "granted only after {elapsed:?}"
    );
    let desc = other.describe(&key("ld")).await.unwrap();
    assert_eq!(desc.delayed_until_ms, None, "{desc:?}");
    assert_eq!(desc.holders[0].owner.client_name, "waiter", "{desc:?}");
    drop((g, guard));
}

/// A clean release never delays, through the client or lockctl, whatever the command's status.
#[tokio::test]
async fn a_clean_release_never_delays() {
    let d = daemon().await;
    let (a, b) = (d.client().await, d.client().await);
    let g = a
        .acquire("clean")
        .lock_delay(Duration::from_secs(30))
        .await
        .unwrap();
    g.release().await.unwrap();
    b.try_lock("clean")
        .await
        .expect("free at once after a clean release")
        .release()
        .await
        .unwrap();
    let desc = b.describe(&key("clean")).await.unwrap();
    assert_eq!(desc.delayed_until_ms, None, "{desc:?}");

    for (script, status) in [("true", 0), ("exit 3", 3), ("kill -9 $$", 137)] {
        let out = lockctl(
            &d.socket,
            &[
                "run",
                "-n",
                "--lock-delay",
                "30s",
                "clean-run",
                "-c",
                script,
            ],
        )
        .await;
        assert_eq!(code(&out), status, "{script}: {}", text(&out.stderr));
        let out = lockctl(&d.socket, &["run", "-n", "clean-run", "echo", "next"]).await;
        assert_eq!(code(&out), 0, "after {script:?}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "next\n");
    }
}

/// An expired lease and a force-release end holds uncleanly: both start the lock-delay. On a
/// semaphore the delay holds back the whole key, free permits included.
#[tokio::test]
async fn expiry_and_force_release_start_the_lock_delay_on_locks_and_semaphores() {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() }.to_string();
    let d = TestDaemon::start_with(LOCKD, &["--admin-uid", &me]).await;
    let (a, b) = (d.client().await, d.client().await);
    let long = Duration::from_secs(20);

    let _lease = a
        .acquire("expires")
        .lease(Duration::from_millis(300))
        .lock_delay(long)
        .detached()
        .await
        .unwrap();
    let _held = a.acquire("forced").lock_delay(long).await.unwrap();
    // A semaphore of 2: one permit on a short lease with a delay, one held plainly.
    let _permit = a
        .acquire("sem")
        .permits(2)
        .lease(Duration::from_millis(300))
        .lock_delay(long)
        .detached()
        .await
        .unwrap();
    let _other_permit = b.acquire("sem").permits(2).await.unwrap();

    assert_eq!(b.force_release(&key("forced")).await.unwrap(), 1);
    for name in ["expires", "forced"] {
        describe_until(&d, &b, name, "the hold ended", |desc| {
            desc.holders.is_empty()
        })
        .await;
    }
    describe_until(&d, &b, "sem", "the leased permit expired", |desc| {
        desc.holders.len() == 1
    })
    .await;
    let now = now_ms();
    for (name, permits) in [("expires", None), ("forced", None), ("sem", Some(2))] {
        let mut attempt = b.acquire(name);
        if let Some(n) = permits {
            attempt = attempt.permits(n);
        }
        let err = attempt.await.expect_err(name);
        assert!(err.is_conflict(), "{name}: {err}");
        assert!(err.to_string().contains("lock-delay"), "{name}: {err}");
        let desc = b.describe(&key(name)).await.unwrap();
        let until = desc.delayed_until_ms.unwrap_or(0);
        assert!(
            until > now + 10_000,
            "{name}: a 20 s delay should run until well after {now}: {desc:?}"
        );
    }
}

/// A lock-delay above `[limits] max_lock_delay` is refused with LimitExceeded (lockctl: 69);
/// the maximum itself is accepted. The default maximum is 60 s.
#[tokio::test]
async fn a_lock_delay_above_the_maximum_is_limit_exceeded() {
    let (d, _cfg) = configured("[limits]\nmax_lock_delay = \"5s\"\n", &[]).await;
    let c = d.client().await;
    let err = c
        .acquire("m")
        .lock_delay(Duration::from_secs(6))
        .await
        .expect_err("above the maximum");
    assert_eq!(err.code(), Some(ErrorCode::LimitExceeded), "{err}");
    assert!(err.to_string().contains("5000"), "{err}");
    let err = c
        .acquire("m")
        .lock_delay(Duration::from_secs(6))
        .wait(PROMPT)
        .await
        .expect_err("above the maximum, waiting");
    assert_eq!(err.code(), Some(ErrorCode::LimitExceeded), "{err}");
    c.acquire("m")
        .lock_delay(Duration::from_secs(5))
        .await
        .expect("the maximum itself")
        .release()
        .await
        .unwrap();
    let out = lockctl(
        &d.socket,
        &["run", "-n", "--lock-delay", "6s", "m", "echo", "ran"],
    )
    .await;
    assert_eq!(code(&out), 69, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("lock-delay"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).is_empty());

    let d = daemon().await;
    let c = d.client().await;
    let err = c
        .acquire("m")
        .lock_delay(Duration::from_secs(61))
        .await
        .expect_err("above the default maximum");
    assert_eq!(err.code(), Some(ErrorCode::LimitExceeded), "{err}");
    c.acquire("m")
        .lock_delay(Duration::from_secs(60))
        .await
        .expect("the default maximum itself");
}
