//! systemd integration: unit files, socket activation, sd_notify, signals and reload.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use lockd_client::Client;
use lockd_tests::{signal, wait_child, within, TestDaemon};

use crate::{code, text, LOCKCTL, LOCKD, PROMPT};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn tool(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/bin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let Some(analyze) = tool("systemd-analyze") else {
        eprintln!("SKIPPED: systemd-analyze is not installed (.ci/run installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let units = [
        "lockd.service",
        "lockd.socket",
        "examples/nightly-backup.service",
        "examples/myapp-leader@.service",
    ];
    for unit in units {
        // The binaries are not installed here: point the units at the built ones.
        let text = std::fs::read_to_string(repo().join("systemd").join(unit)).unwrap();
        let text = text
            .replace("/usr/bin/lockd ", &format!("{LOCKD} "))
            .replace("/usr/bin/lockctl", LOCKCTL)
            .replace("/usr/local/bin/backup.sh", "/bin/true")
            .replace("/usr/local/bin/myapp", "/bin/true");
        let name = Path::new(unit).file_name().unwrap();
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    std::fs::copy(
        dir.path().join("myapp-leader@.service"),
        dir.path().join("myapp-leader@a.service"),
    )
    .unwrap();
    let out = std::process::Command::new(&analyze)
        .current_dir(dir.path())
        .args(["verify", "--man=no", "./lockd.socket", "./lockd.service"])
        .args(["./nightly-backup.service", "./myapp-leader@a.service"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let warnings = text(&out.stderr);
    assert!(warnings.trim().is_empty(), "warnings: {warnings}");
}

/// A stand-in for lockd's main process: exits 42 on SIGHUP, 43 on SIGTERM (both trapped, so a
/// pending SIGHUP's trap runs first: the shell runs pending traps in signal-number order).
/// Returns once the traps are set (the shell says so), so no signal meets the default action.
fn main_process() -> std::process::Child {
    use std::io::BufRead;
    let mut child = std::process::Command::new("/bin/sh")
        .args([
            "-c",
            "trap 'exit 42' HUP; trap 'exit 43' TERM; echo ready; while :; do sleep 0.05; done",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    let stdout = child.stdout.take().expect("piped stdout");
    std::io::BufReader::new(stdout)
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready, "ready\n", "the stand-in main process set its traps");
    child
}

/// The unit's `ExecReload=` line, run as systemd would run it (`$$` unescaped to `$`, through
/// `sh -c`, which parses its quotes the same way, with `MAINPID` set), with the installed
/// paths replaced by `config` and the built `lockd`. Returns its output and whether the main
/// process got SIGHUP.
fn exec_reload(config: &Path) -> (std::process::Output, bool) {
    let unit = std::fs::read_to_string(repo().join("systemd/lockd.service")).unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecReload="))
        .expect("lockd.service has ExecReload=");
    let line = line
        .replace("$$", "$")
        .replace("/etc/lockd/lockd.toml", config.to_str().unwrap())
        .replace("/usr/bin/lockd ", &format!("{LOCKD} "));
    let line = line.strip_prefix("/bin/sh -c '").unwrap_or(&line);
    let line = line.strip_suffix('\'').unwrap_or(line);
    let mut main = main_process();
    let out = std::process::Command::new("/bin/sh")
        .args(["-c", line])
        .env("MAINPID", main.id().to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    // Signals arrive in order: a SIGHUP sent by the reload is handled before this SIGTERM.
    signal(main.id(), libc::SIGTERM);
    let status = wait_bounded(&mut main);
    (out, status.code() == Some(42))
}

fn wait_bounded(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + PROMPT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "main process did not end"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn exec_reload_signals_lockd_only_when_the_config_is_good() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lockd.toml");
    let (out, hup) = exec_reload(&config);
    assert!(
        out.status.success(),
        "no file is no error: {}",
        text(&out.stderr)
    );
    assert!(hup, "no file: lockd reloads its defaults");
    std::fs::write(&config, "[limits]\nmax_data = 2048\n").unwrap();
    let (out, hup) = exec_reload(&config);
    assert!(
        out.status.success(),
        "a good file passes: {}",
        text(&out.stderr)
    );
    assert!(hup, "a good file: lockd is told to reload");
    std::fs::write(&config, "[limits]\nmax_data = \"lots\"\n").unwrap();
    let (out, hup) = exec_reload(&config);
    assert!(!out.status.success(), "a broken file fails the reload");
    assert!(!hup, "a broken file: lockd is not signalled");
    assert!(
        text(&out.stderr).contains("max_data"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn socket_activation_serves_on_the_passed_socket_and_leaves_it() {
    let Some(activate) = tool("systemd-socket-activate") else {
        eprintln!("SKIPPED: systemd-socket-activate is not installed (.ci/run installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let mut child = std::process::Command::new(activate)
        .arg("-l")
        .arg(&socket)
        .arg(LOCKD)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--socket")
        .arg(dir.path().join("unused.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let c = within(PROMPT, "activated daemon answers", async {
        loop {
            if let Ok(c) = Client::connect(&socket).await {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    c.try_lock("activated").await.unwrap();
    assert!(
        !dir.path().join("unused.sock").exists(),
        "it must not bind its own socket"
    );
    drop(c);
    signal(child.id(), libc::SIGTERM);
    let status = wait_child(&mut child, PROMPT).expect("exits on SIGTERM");
    assert!(status.success(), "{status}");
    assert!(
        socket.exists(),
        "a socket passed by systemd is left in place"
    );
}

/// Receives sd_notify datagrams on a temporary NOTIFY_SOCKET.
struct Notify {
    sock: UnixDatagram,
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Notify {
    fn new() -> Notify {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Notify {
            sock,
            _dir: dir,
            path,
        }
    }

    /// Waits (bounded) for a datagram containing `needle`; returns it.
    fn expect(&self, needle: &str) -> String {
        let deadline = Instant::now() + PROMPT;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == needle) {
                    return msg;
                }
            }
        }
        panic!("no {needle} within {PROMPT:?}");
    }
}

#[tokio::test]
async fn notifies_ready_watchdog_and_stopping() {
    let notify = Notify::new();
    let path = notify.path.to_str().unwrap().to_string();
    let mut d = TestDaemon::start_full(
        LOCKD,
        &[],
        &[
            ("NOTIFY_SOCKET", path.as_str()),
            ("WATCHDOG_USEC", "200000"),
        ],
    )
    .await;
    let ready = notify.expect("READY=1");
    assert!(ready.contains("STATUS="), "{ready}");
    notify.expect("WATCHDOG=1");
    notify.expect("WATCHDOG=1");
    notify.expect("WATCHDOG=1");
    let status = d.terminate(PROMPT);
    assert!(status.success());
    notify.expect("STOPPING=1");
}

/// CLOCK_MONOTONIC in µs, as systemd reads it.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the kernel to fill.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The value of `key=` in a notification.
fn field<'a>(msg: &'a str, key: &str) -> Option<&'a str> {
    msg.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// Sends SIGHUP and checks systemd's notify-reload cycle: `RELOADING=1` with a
/// `MONOTONIC_USEC` taken after the signal, then `READY=1`; returns the READY message.
fn reload_cycle(notify: &Notify, pid: u32) -> String {
    let before = monotonic_usec();
    signal(pid, libc::SIGHUP);
    let reloading = notify.expect("RELOADING=1");
    assert!(!reloading.contains("READY=1"), "{reloading}");
    let usec: u64 = field(&reloading, "MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(
        (before..=monotonic_usec()).contains(&usec),
        "MONOTONIC_USEC={usec} is not CLOCK_MONOTONIC after the signal ({before})"
    );
    notify.expect("READY=1")
}

#[tokio::test]
async fn sighup_speaks_the_notify_reload_protocol_and_reports_a_failed_reload() {
    let notify = Notify::new();
    let path = notify.path.to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lockd.toml");
    std::fs::write(&config, "[limits]\nmax_data = 2048\n").unwrap();
    let config_arg = config.to_str().unwrap().to_string();
    let mut d = TestDaemon::start_full(
        LOCKD,
        &["--config", &config_arg],
        &[("NOTIFY_SOCKET", path.as_str())],
    )
    .await;
    notify.expect("READY=1");

    std::fs::write(&config, "[limits]\nmax_data = 4096\n").unwrap();
    let ready = reload_cycle(&notify, d.pid());
    assert_eq!(
        field(&ready, "STATUS"),
        Some("configuration reloaded"),
        "{ready}"
    );

    // A broken file: the cycle still ends (systemd would otherwise wait for its timeout), and
    // the status says the reload failed and why.
    std::fs::write(&config, "[limits]\nmax_data = \"lots\"\nfake = 1\n").unwrap();
    let ready = reload_cycle(&notify, d.pid());
    let status = field(&ready, "STATUS").unwrap_or_default();
    assert!(
        status.starts_with("configuration reload failed, still using the previous one: "),
        "{ready}"
    );
    assert!(status.contains("max_data"), "{ready}");
    assert_eq!(
        ready.lines().count(),
        2,
        "one STATUS line, no other: {ready:?}"
    );

    // And the daemon still serves.
    d.client().await.ping().await.unwrap();
    assert!(d.terminate(PROMPT).success());
}

#[tokio::test]
async fn sighup_reloads_authorization_without_dropping_connections() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || tool("setpriv").is_none() {
        eprintln!("SKIPPED: needs root and setpriv to act as another uid");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lockd.toml");
    std::fs::write(&config, "[namespaces.ops]\nusers = [1000]\n").unwrap();
    let config_arg = config.to_str().unwrap().to_string();
    let d = TestDaemon::start_with(LOCKD, &["--config", &config_arg, "--socket-mode", "666"]).await;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let stayer = d.client().await;
    let held = stayer.lock("kept-across-reload").await.unwrap();
    let outsider = |d: &TestDaemon| {
        let socket = d.socket.clone();
        async move {
            let run = tokio::process::Command::new("setpriv")
                .args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    LOCKCTL,
                    "--socket",
                ])
                .arg(&socket)
                .args(["run", "-n", "--namespace", "ops", "job", "--", "true"])
                .stdin(Stdio::null())
                .output();
            within(PROMPT, "lockctl", run).await.unwrap()
        }
    };
    assert_eq!(code(&outsider(&d).await), 77, "denied before the reload");

    std::fs::write(&config, "[namespaces.ops]\nusers = [1000, 65534]\n").unwrap();
    signal(d.pid(), libc::SIGHUP);
    let out = within(PROMPT, "reload applied", async {
        loop {
            let out = outsider(&d).await;
            if code(&out) != 77 {
                break out;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));

    // A broken file is refused and the working configuration kept.
    std::fs::write(&config, "[namespaces.ops]\nusers = [1000, 65534\n").unwrap();
    signal(d.pid(), libc::SIGHUP);
    within(PROMPT, "reload failure logged", async {
        while !d.log_tail().contains("keeping the old one") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        code(&outsider(&d).await),
        0,
        "the old configuration still applies"
    );

    // The connection that was there all along kept its lock.
    assert!(!held.is_lost());
    stayer.ping().await.unwrap();
    held.release().await.unwrap();
}

#[tokio::test]
async fn sigterm_says_shutting_down_and_exits_cleanly() {
    let mut d = crate::daemon().await;
    let c = d.client().await;
    let g = c.lock("held-at-shutdown").await.unwrap();
    let lease = c
        .acquire("lease-across-shutdown")
        .lease(std::time::Duration::from_secs(60))
        .detached()
        .await
        .unwrap();
    let status = d.terminate(crate::PROMPT);
    assert!(status.success(), "exit status {status}");
    let why = lockd_tests::within(crate::PROMPT, "loss reported", g.lost()).await;
    assert_eq!(why, lockd_client::Lost::DaemonShutdown);
    assert!(!d.socket.exists(), "the socket file it created is removed");
    d.restart().await;
    let c = d.client().await;
    c.renew(&lease.ticket, None)
        .await
        .expect("detached lease intact after a graceful restart");
}

#[tokio::test]
async fn journald_format_has_priorities_and_no_timestamps() {
    let d = lockd_tests::TestDaemon::start_full(crate::LOCKD, &[], &[("JOURNAL_STREAM", "8:1234")])
        .await;
    let _ = d.client().await.try_lock("x").await;
    let log = d.log_tail();
    let lines: Vec<&str> = log.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let b = l.as_bytes();
        assert!(
            b.len() > 3 && b[0] == b'<' && b[1].is_ascii_digit() && b[2] == b'>',
            "no priority prefix: {l}"
        );
        assert!(!l.contains("Z "), "timestamp in: {l}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>") && l.contains("serving")),
        "{log}"
    );
}
