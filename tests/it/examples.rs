//! The client crate's examples (`client/examples/`), built by cargo and run against a test
//! daemon as a user runs them, so that they cannot rot.
//!
//! The examples are not binaries of this package, so Cargo sets no `CARGO_BIN_EXE_*` for them:
//! the first test to need one runs `cargo build -p lockd-client --examples` (the cargo running
//! these tests, same target directory, bounded) and takes each path from its JSON messages.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lockd_client::blocking::Client;
use lockd_client::Key;

use crate::blocking::{bounded, start_daemon};
use crate::PROMPT;

/// Bound on building the examples (the first build of a fresh checkout compiles them).
const BUILD: Duration = Duration::from_secs(600);

/// The path of example `name`, after building every example of the client crate once per test
/// run with the cargo that runs these tests.
fn example(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<HashMap<String, PathBuf>, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| bounded(BUILD, build_examples));
    match built {
        Ok(paths) => paths
            .get(name)
            .unwrap_or_else(|| panic!("no example {name} among {:?}", paths.keys()))
            .clone(),
        Err(e) => panic!("building the examples failed: {e}"),
    }
}

fn build_examples() -> Result<HashMap<String, PathBuf>, String> {
    let out = Command::new(env!("CARGO"))
        .args(["build", "-p", "lockd-client", "--examples"])
        .args(["--message-format", "json-render-diagnostics"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo build --examples: {}", out.status));
    }
    let mut paths = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_example = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "example"));
        if msg["reason"] == "compiler-artifact" && is_example {
            if let (Some(name), Some(exe)) =
                (msg["target"]["name"].as_str(), msg["executable"].as_str())
            {
                paths.insert(name.to_string(), PathBuf::from(exe));
            }
        }
    }
    Ok(paths)
}

/// Starts example `name` with `args`, talking to the daemon at `socket`.
fn spawn(name: &str, socket: &Path, args: &[&str]) -> Child {
    Command::new(example(name))
        .args(args)
        .env("LOCKD_SOCKET", socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start example {name}: {e}"))
}

/// Waits (bounded) for `child` and returns its output.
fn finish(name: &str, mut child: Child) -> Output {
    if lockd_tests::wait_child(&mut child, PROMPT * 3).is_none() {
        let _ = child.kill();
        panic!("example {name} did not finish within {:?}", PROMPT * 3);
    }
    child.wait_with_output().expect("example output")
}

/// Runs example `name` to its end.
fn run(name: &str, socket: &Path, args: &[&str]) -> Output {
    finish(name, spawn(name, socket, args))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn example_try_lock_acquires_a_free_lock_and_reports_a_busy_one() {
    let d = start_daemon();
    let free = run("try_lock", &d.socket, &["ex-try"]);
    assert_eq!(free.status.code(), Some(0), "{}", show(&free));
    let out = stdout(&free);
    assert!(
        out.contains("acquired default/ex-try with fence"),
        "{}",
        show(&free)
    );
    assert!(out.contains("released"), "{}", show(&free));

    let socket = d.socket.clone();
    let holder = bounded(PROMPT, move || {
        let c = Client::connect_with(
            &socket,
            lockd_client::ConnectOptions::default().client_name("the-holder"),
        )
        .expect("connect");
        let guard = c.try_lock("ex-try").expect("free lock");
        (c, guard)
    });
    let busy = run("try_lock", &d.socket, &["ex-try"]);
    assert_eq!(busy.status.code(), Some(1), "{}", show(&busy));
    assert!(
        stdout(&busy).contains("busy: held by") && stdout(&busy).contains("\"the-holder\""),
        "{}",
        show(&busy)
    );
    drop(holder);
}

#[test]
fn example_blocking_waits_for_the_lock_then_works_and_releases() {
    let d = start_daemon();
    let socket = d.socket.clone();
    let (watcher, guard) = bounded(PROMPT, move || {
        let c = Client::connect(&socket).expect("connect");
        let guard = c.try_lock("ex-blocking").expect("free lock");
        (c, guard)
    });
    let child = spawn("blocking", &d.socket, &["ex-blocking"]);
    // Release only once the example waits in the queue, so that it must wait to succeed.
    let key = Key::in_default("ex-blocking").expect("valid name");
    let deadline = Instant::now() + PROMPT;
    bounded(PROMPT * 2, move || {
        while watcher.describe(&key).expect("describe").waiters.is_empty() {
            assert!(Instant::now() < deadline, "the example never queued");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(guard);
    });
    let out = finish("blocking", child);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = stdout(&out);
    assert!(
        text.contains("holding default/ex-blocking with fence"),
        "{}",
        show(&out)
    );
    assert!(
        text.contains("step 3 done") && text.contains("released"),
        "{}",
        show(&out)
    );
}

#[test]
fn example_detached_handoff_passes_the_lease_to_a_second_process() {
    let d = start_daemon();
    let out = run("detached_handoff", &d.socket, &["ex-handoff"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let text = stdout(&out);
    assert!(
        text.contains("took a detached lease on default/ex-handoff"),
        "{}",
        show(&out)
    );
    assert!(
        text.contains("second process: renewed the lease"),
        "{}",
        show(&out)
    );
    assert!(text.contains("second process: released"), "{}", show(&out));
    let socket = d.socket.clone();
    let left = bounded(PROMPT, move || {
        let c = Client::connect(&socket).expect("connect");
        c.describe(&Key::in_default("ex-handoff").expect("valid name"))
            .expect("describe")
            .holders
            .len()
    });
    assert_eq!(left, 0, "the lease outlived its release");
}
