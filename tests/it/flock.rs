//! `lockctl run` as flock(1): the command inherits the lock's connection (so a killed lockctl
//! never lets it run without the lock), flock's argument shapes and spellings, and `lockctl
//! acquire` waiting by default like flock.

use std::future::IntoFuture;
use std::path::Path;
use std::time::{Duration, Instant};

use lockd_client::{Client, ConnectOptions, ErrorCode, Key};
use lockd_tests::within;

use crate::{
    code, daemon, lockctl, lockctl_command as command, lockctl_with as run_with, text, PROMPT,
};

async fn wait_for_file(path: &Path) {
    within(PROMPT, "marker file", async {
        while !path.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Waits until `name` has at least one waiter.
async fn wait_for_waiter(client: &Client, name: &str) {
    let key = Key::in_default(name).unwrap();
    within(PROMPT, "a waiter queued", async {
        while client.describe(&key).await.unwrap().waiters.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The bug as it was found: lockctl is SIGKILLed while its command (which traps the SIGTERM
/// its parent's death sends and keeps working for a second) still runs. A second `lockctl run`
/// started right after must not run before the first command has finished.
#[tokio::test]
async fn a_killed_lockctl_leaves_the_lock_with_its_command_until_the_command_exits() {
    let d = daemon().await;
    let file = d.dir().join("order");
    let started = d.dir().join("started");
    let script = "trap 'kill $! 2>/dev/null; sleep 1; echo last >> \"$F\"; exit 0' TERM; \
                  echo first >> \"$F\"; sleep 30 & touch \"$S\"; wait";
    let env = [("F", file.as_path()), ("S", started.as_path())];
    let mut first = command(
        &d.socket,
        &["run", "handover", "--", "sh", "-c", script],
        &env,
    )
    .spawn()
    .unwrap();
    wait_for_file(&started).await;
    first.start_kill().unwrap(); // SIGKILL to lockctl itself
    within(PROMPT, "the killed lockctl is reaped", first.wait())
        .await
        .unwrap();

    let out = run_with(
        &d.socket,
        &[
            "run",
            "-w",
            "30",
            "handover",
            "--",
            "sh",
            "-c",
            "echo start >> \"$F\"",
        ],
        &env,
    )
    .await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(
        read(&file),
        "first\nlast\nstart\n",
        "the second command ran while the first still worked"
    );
}

/// `-o` keeps the old behaviour: the command does not get the descriptor, so lockctl's death
/// frees the lock at once. Deterministic: the first command writes its last line only after
/// the second command has run (or after 20 s, which fails the test).
#[tokio::test]
async fn with_close_a_killed_lockctl_frees_the_lock_while_its_command_still_runs() {
    let d = daemon().await;
    let file = d.dir().join("order");
    let started = d.dir().join("started");
    let second_ran = d.dir().join("second-ran");
    let script = "trap 'kill $! 2>/dev/null; i=0; \
                  while [ ! -e \"$M\" ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; \
                  echo last >> \"$F\"; exit 0' TERM; \
                  echo first >> \"$F\"; sleep 30 & touch \"$S\"; wait";
    let env = [
        ("F", file.as_path()),
        ("S", started.as_path()),
        ("M", second_ran.as_path()),
    ];
    let mut first = command(
        &d.socket,
        &["run", "-o", "old", "--", "sh", "-c", script],
        &env,
    )
    .spawn()
    .unwrap();
    wait_for_file(&started).await;
    first.start_kill().unwrap();
    within(PROMPT, "the killed lockctl is reaped", first.wait())
        .await
        .unwrap();

    let out = run_with(
        &d.socket,
        &[
            "run",
            "-w",
            "30",
            "old",
            "-c",
            "echo start >> \"$F\"; touch \"$M\"",
        ],
        &env,
    )
    .await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    within(
        Duration::from_secs(30),
        "the first command's last line",
        async {
            while !read(&file).contains("last") {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;
    assert_eq!(read(&file), "first\nstart\nlast\n");
}

/// As with flock: processes the command left behind hold the inherited descriptor, and the lock
/// with it, until they exit.
#[tokio::test]
async fn processes_the_command_left_behind_keep_the_lock_until_they_exit() {
    let d = daemon().await;
    let file = d.dir().join("order");
    let env = [("F", file.as_path())];
    let out = run_with(
        &d.socket,
        &[
            "run",
            "left",
            "-c",
            "(sleep 2; echo behind >> \"$F\") >/dev/null 2>&1 & echo command >> \"$F\"",
        ],
        &env,
    )
    .await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("left processes behind"),
        "{}",
        text(&out.stderr)
    );
    let out = run_with(
        &d.socket,
        &["run", "-w", "30", "left", "-c", "echo next >> \"$F\""],
        &env,
    )
    .await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(read(&file), "command\nbehind\nnext\n");
}

#[tokio::test]
async fn the_command_gets_the_connection_as_lockd_fd_unless_close() {
    let d = daemon().await;
    let out = run_with(
        &d.socket,
        &[
            "run",
            "fd",
            "-c",
            "echo \"$LOCKD_FD\"; readlink \"/proc/$$/fd/$LOCKD_FD\"",
        ],
        &[],
    )
    .await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].parse::<u32>().is_ok(), "{stdout}");
    assert!(lines[1].starts_with("socket:"), "{stdout}");

    for close in ["-o", "--close"] {
        let out = run_with(
            &d.socket,
            &["run", close, "fd", "-c", "echo \"${LOCKD_FD-unset}\""],
            &[],
        )
        .await;
        assert_eq!(code(&out), 0, "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), "unset");
    }
}

/// README's cases: the command killed (lockctl stays, releases and reports 128+9).
#[tokio::test]
async fn a_killed_command_ends_the_hold_with_status_137() {
    let d = daemon().await;
    let out = lockctl(&d.socket, &["run", "victim", "-c", "kill -9 $$"]).await;
    assert_eq!(code(&out), 137, "{}", text(&out.stderr));
    d.client().await.try_lock("victim").await.expect("released");
}

#[tokio::test]
async fn flock_argument_shapes() {
    let d = daemon().await;
    // A path is a name like any other, unchanged, in the default namespace.
    let out = lockctl(
        &d.socket,
        &[
            "run",
            "-n",
            "/run/lock/backup.lock",
            "-c",
            "echo \"hi $LOCKD_NAMESPACE $LOCKD_LOCK\"",
        ],
    )
    .await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi default /run/lock/backup.lock\n");

    let out = lockctl(&d.socket, &["run", "shapes", "--command", "exit 3"]).await;
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));

    // Without `--`: what follows the command's name is the command's, options included.
    let out = lockctl(&d.socket, &["run", "shapes", "echo", "a", "b"]).await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "a b\n");
    let out = lockctl(&d.socket, &["run", "shapes", "echo", "-n", "x"]).await;
    assert_eq!(text(&out.stdout), "x");
    // `--` still works, and a later `--` is the command's.
    let out = lockctl(&d.socket, &["run", "shapes", "--", "echo", "--", "y"]).await;
    assert_eq!(text(&out.stdout), "-- y\n");

    // -c takes exactly one string; a command is required.
    for args in [
        &["run", "shapes", "-c", "echo", "extra"][..],
        &["run", "shapes"][..],
    ] {
        let out = lockctl(&d.socket, args).await;
        assert_eq!(code(&out), 2, "{args:?}: {}", text(&out.stderr));
    }
}

#[tokio::test]
async fn flock_spellings_and_exit_codes() {
    let d = daemon().await;
    let holder = d.client().await;
    let _busy = holder.lock("busy").await.unwrap();
    let _shared = holder.acquire("sh").shared().await.unwrap();

    for args in [
        &["-n"][..],
        &["--nb"],
        &["--nonblock"],
        &["--nonblocking"],
        &["-w", "0.2"],
        &["--wait", "0.2"],
        &["--timeout", "0.2"],
    ] {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["busy", "echo", "ran"]);
        let out = lockctl(&d.socket, &all).await;
        assert_eq!(code(&out), 1, "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stdout).is_empty(), "{args:?}: the command ran");
    }

    let start = Instant::now();
    let out = lockctl(&d.socket, &["run", "-w", "0.5", "-E", "42", "busy", "true"]).await;
    assert_eq!(code(&out), 42, "{}", text(&out.stderr));
    assert!(start.elapsed() >= Duration::from_millis(500));
    let out = lockctl(
        &d.socket,
        &["run", "-n", "--conflict-exit-code", "7", "busy", "true"],
    )
    .await;
    assert_eq!(code(&out), 7);

    // Exclusive by default and with -x/-e/--exclusive; shared with -s; the last one wins.
    for (args, want) in [
        (&["-n"][..], 1),
        (&["-n", "-x"], 1),
        (&["-n", "-e"], 1),
        (&["-n", "--exclusive"], 1),
        (&["-n", "-s"], 0),
        (&["-n", "--shared"], 0),
        (&["-n", "-x", "-s"], 0),
        (&["-n", "-s", "-x"], 1),
    ] {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["sh", "true"]);
        let out = lockctl(&d.socket, &all).await;
        assert_eq!(code(&out), want, "{args:?}: {}", text(&out.stderr));
    }
}

#[tokio::test]
async fn flock_forms_without_an_equivalent_are_refused_with_what_to_use() {
    let d = daemon().await;
    for args in [
        &["run", "9"][..],
        &["run", "-n", "9"],
        &["run", "-x", "-w", "1", "9"],
    ] {
        let out = lockctl(&d.socket, args).await;
        assert_eq!(code(&out), 2, "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains("descriptor"), "{err}");
        assert!(err.contains("lockctl run NAME -- CMD"), "{err}");
    }
    for args in [&["run", "-u", "x", "true"][..], &["run", "--unlock", "x"]] {
        let out = lockctl(&d.socket, args).await;
        assert_eq!(code(&out), 2, "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains("not supported"), "{err}");
        assert!(err.contains("lockctl release TICKET"), "{err}");
    }
}

#[tokio::test]
async fn verbose_names_the_holder_and_the_time_waited() {
    let d = daemon().await;
    let options = ConnectOptions::default().client_name("the-holder");
    let holder = Client::connect_with(&d.socket, options).await.unwrap();
    let guard = holder.lock("vb").await.unwrap();

    let out = lockctl(&d.socket, &["run", "--verbose", "-n", "vb", "true"]).await;
    assert_eq!(code(&out), 1);
    let err = text(&out.stderr);
    assert!(err.contains("the-holder"), "{err}");

    // Its stderr goes to a file, read while it waits: the holder is released only once
    // lockctl has said whom it waits for.
    let stderr_file = d.dir().join("stderr");
    let mut waiting = command(
        &d.socket,
        &["run", "--verbose", "-w", "30", "vb", "true"],
        &[],
    );
    waiting.stderr(std::fs::File::create(&stderr_file).unwrap());
    let mut waiting = waiting.spawn().unwrap();
    within(PROMPT, "lockctl says whom it waits for", async {
        while !read(&stderr_file).contains("the-holder") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    guard.release().await.unwrap();
    let status = within(PROMPT, "lockctl got the lock", waiting.wait())
        .await
        .unwrap();
    let err = read(&stderr_file);
    assert_eq!(status.code(), Some(0), "{err}");
    let me = format!("pid {}", std::process::id());
    assert!(err.contains("waiting for vb"), "{err}");
    assert!(err.contains(&me), "{err}");
    assert!(err.contains("the-holder"), "{err}");
    let waited: f64 = err
        .split("got lock vb after ")
        .nth(1)
        .and_then(|rest| rest.split('s').next())
        .and_then(|secs| secs.parse().ok())
        .unwrap_or_else(|| panic!("no wait time in {err}"));
    assert!(waited >= 0.2, "{err}");
}

#[tokio::test]
async fn no_fork_runs_the_command_in_place_holding_the_lock() {
    let d = daemon().await;
    let pidfile = d.dir().join("pid");
    let go = d.dir().join("go");
    let script = "echo $$ > \"$P.tmp\"; mv \"$P.tmp\" \"$P\"; i=0; \
                  while [ ! -e \"$G\" ] && [ $i -lt 1000 ]; do sleep 0.02; i=$((i+1)); done";
    let env = [("P", pidfile.as_path()), ("G", go.as_path())];
    let child = command(&d.socket, &["run", "-F", "inplace", "-c", script], &env)
        .spawn()
        .unwrap();
    wait_for_file(&pidfile).await;
    assert_eq!(
        read(&pidfile).trim(),
        child.id().unwrap().to_string(),
        "-F runs the command in lockctl's own process"
    );
    let client = d.client().await;
    let err = client.try_lock("inplace").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "held while it runs");
    std::fs::write(&go, "").unwrap();
    let out = within(PROMPT, "the command exits", child.wait_with_output())
        .await
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    within(
        PROMPT,
        "released when the command exited",
        client.acquire("inplace").wait(PROMPT).into_future(),
    )
    .await
    .expect("granted");

    for args in [
        &["run", "-F", "--lease", "30s", "x", "true"][..],
        &["run", "-F", "-o", "x", "true"],
    ] {
        let out = lockctl(&d.socket, args).await;
        assert_eq!(code(&out), 2, "{args:?}");
    }
    let out = lockctl(
        &d.socket,
        &["run", "--no-fork", "--lease", "30s", "x", "true"],
    )
    .await;
    assert!(
        text(&out.stderr).contains("nobody would renew"),
        "{}",
        text(&out.stderr)
    );
}

/// `lockctl acquire` waits like `lockctl run` and flock: forever unless -n or -w.
#[tokio::test]
async fn acquire_waits_by_default_like_run() {
    let d = daemon().await;
    let holder = d.client().await;
    let guard = holder.lock("aq").await.unwrap();

    let start = Instant::now();
    let out = lockctl(&d.socket, &["acquire", "--lease", "1m", "-w", "0.3", "aq"]).await;
    assert_eq!(code(&out), 1, "{}", text(&out.stderr));
    assert!(start.elapsed() >= Duration::from_millis(300));
    let out = lockctl(&d.socket, &["acquire", "--lease", "1m", "-n", "aq"]).await;
    assert_eq!(code(&out), 1, "{}", text(&out.stderr));

    let waiting = command(&d.socket, &["acquire", "--lease", "1m", "aq"], &[])
        .spawn()
        .unwrap();
    wait_for_waiter(&holder, "aq").await;
    guard.release().await.unwrap();
    let out = within(PROMPT, "acquire got the lease", waiting.wait_with_output())
        .await
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("LOCKD_TICKET="));
    // The detached lease it printed holds the lock.
    let err = holder.try_lock("aq").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict));
}
