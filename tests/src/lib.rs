//! Test harness for lockd: start the real daemon on a private socket and data directory, wait
//! for it by connecting (never by sleeping), kill it with SIGKILL or SIGTERM, restart it on the
//! same data, and talk raw protocol to it.
//!
//! Every wait here is bounded, so a bug fails a test instead of hanging CI.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use lockd_client::Client;
use tempfile::TempDir;

pub mod etcd;
pub mod raw;

/// Upper bound for the daemon to start answering.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `lockd` with its own temporary socket and data directory.
pub struct TestDaemon {
    bin: PathBuf,
    child: Option<Child>,
    dir: TempDir,
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    log: PathBuf,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
    nofile: Option<u64>,
}

impl TestDaemon {
    /// Starts `lockd` (path to the binary) in a fresh temporary directory and waits until it
    /// accepts connections.
    pub async fn start(bin: &str) -> TestDaemon {
        TestDaemon::start_with(bin, &[]).await
    }

    /// As [`TestDaemon::start`], with extra command-line arguments.
    pub async fn start_with(bin: &str, extra_args: &[&str]) -> TestDaemon {
        TestDaemon::start_full(bin, extra_args, &[]).await
    }

    /// As [`TestDaemon::start`], with extra arguments and environment variables.
    pub async fn start_full(bin: &str, extra_args: &[&str], env: &[(&str, &str)]) -> TestDaemon {
        TestDaemon::start_limited(bin, extra_args, env, None).await
    }

    /// As [`TestDaemon::start_full`], with the daemon's open-file limit set to `nofile`.
    pub async fn start_limited(
        bin: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
        nofile: Option<u64>,
    ) -> TestDaemon {
        let dir = tempfile::Builder::new()
            .prefix("lockd-test-")
            .tempdir()
            .expect("create temp dir");
        let mut d = TestDaemon {
            bin: PathBuf::from(bin),
            child: None,
            socket: dir.path().join("lockd.sock"),
            data_dir: dir.path().join("data"),
            log: dir.path().join("lockd.log"),
            dir,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            nofile,
        };
        d.spawn();
        d.wait_ready().await;
        d
    }

    /// The temporary directory holding socket, data and log; tests may put files there.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("daemon running")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open daemon log");
        let mut cmd = Command::new(&self.bin);
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .arg("--socket")
            .arg(&self.socket)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.extra_args)
            .env("RUST_LOG", "lockd=debug,info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// Peak resident memory of the daemon (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// CPU time the daemon used so far (user + system), in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let rest = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        get(11) + get(12)
    }

    /// Waits until a client can connect, or panics with the log tail.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(c) = Client::connect(&self.socket).await {
                if c.ping().await.is_ok() {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "lockd exited during start-up ({status}); log:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "lockd not ready within {READY_TIMEOUT:?}; log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A new client connection.
    pub async fn client(&self) -> Client {
        Client::connect(&self.socket)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}; log:\n{}", self.log_tail()))
    }

    /// SIGKILLs the daemon (a crash) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        signal(child.id(), libc::SIGTERM);
        wait_child(&mut child, within).unwrap_or_else(|| {
            let _ = child.kill();
            panic!(
                "lockd did not exit within {within:?} of SIGTERM; log:\n{}",
                self.log_tail()
            )
        })
    }

    /// Starts the daemon again on the same socket and data directory.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the daemon before restarting it");
        self.spawn();
        self.wait_ready().await;
    }

    /// The last lines of the daemon's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// Waits for `child` to exit, at most `within`.
pub fn wait_child(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `fut` with a deadline, panicking with `what` if it is missed.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not done within {limit:?}"),
    }
}
