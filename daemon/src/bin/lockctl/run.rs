//! `lockctl run`: hold a lock while a command runs, flock(1) style.
//!
//! The command gets `LOCKD_FENCE`, `LOCKD_LOCK` and `LOCKD_NAMESPACE`. SIGINT, SIGTERM and
//! SIGHUP sent to lockctl are forwarded to it. If the hold is lost, the command gets SIGTERM at
//! once and SIGKILL after `--kill-after`, and lockctl exits 75. If lockctl itself dies (even by
//! SIGKILL), its connection closes, the lock is released, and the kernel sends the command
//! SIGTERM (`PR_SET_PDEATHSIG`): a command never keeps running silently without its lock.
//!
//! When lockctl's stdin is not a terminal (cron, systemd, scripts), the command runs in a
//! process group of its own and signals go to the whole group, so the command's children stop
//! too. On a terminal the command stays in the foreground group (so it can read the terminal)
//! and signals go to the command alone. The parent-death signal reaches the command itself, not
//! its children.

use std::path::Path;
use std::time::Duration;

use clap::Args;
use lockd_client::{Client, ConnectOptions, LockGuard};
use tokio::signal::unix::{signal, SignalKind};

use crate::exit;
use lockd::duration;

const AFTER_HELP: &str = "\
Examples:
  # Skip this run if the previous one still holds the lock:
  lockctl run -n nightly-backup -- /usr/local/bin/backup.sh
  # Wait up to 30 s for a shared hold; exit 10 if not acquired:
  lockctl run -w 30 -s -E 10 reports -- ./read-reports.sh
  # The command sees its fencing token:
  lockctl run deploy -- sh -c 'echo \"fence $LOCKD_FENCE for $LOCKD_LOCK\"'";

/// Hold a lock while a command runs.
#[derive(Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct RunArgs {
    /// Fail at once if the lock is held (no waiting)
    #[arg(short = 'n', long = "nonblock", conflicts_with = "wait")]
    nonblock: bool,
    /// Wait at most this long: seconds, or 500ms, 30s, 5m, 1h [default: wait forever]
    #[arg(short = 'w', long = "wait", value_name = "SECS", value_parser = duration::parse)]
    wait: Option<Duration>,
    /// Take a shared hold instead of an exclusive one
    #[arg(short = 's', long = "shared")]
    shared: bool,
    /// Exit code when the lock is not acquired (conflict or timeout)
    #[arg(short = 'E', long = "conflict-exit-code", value_name = "CODE", default_value_t = exit::NOT_ACQUIRED)]
    conflict_exit_code: u8,
    /// Lock namespace
    #[arg(long, value_name = "NS", default_value = lockd_protocol::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Hold with a lease of this length, renewed in the background while the command runs
    /// (bounds how long a hung lockctl can keep the lock)
    #[arg(long, value_name = "DUR", value_parser = duration::parse)]
    lease: Option<Duration>,
    /// After the hold is lost, how long the command gets between SIGTERM and SIGKILL
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = duration::parse)]
    kill_after: Duration,
    /// Lock name
    name: String,
    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Runs the subcommand; returns lockctl's exit code.
pub async fn run(socket: &Path, args: RunArgs) -> u8 {
    // Installed first: a signal while we connect or wait ends lockctl cleanly (128 + signal,
    // the command never started); once the command runs, signals are forwarded to it.
    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lockctl: cannot install signal handlers: {e}");
            return exit::INTERNAL;
        }
    };
    let acquired = tokio::select! {
        acquired = acquire(socket, &args) => acquired,
        signo = signals.next() => {
            eprintln!("lockctl: interrupted while waiting for {}", args.name);
            return 128 + signo as u8;
        }
    };
    match acquired {
        Ok(guard) => supervise(&args, guard, signals).await,
        Err(e) => {
            eprintln!("lockctl: {e}");
            exit::for_error(&e, args.conflict_exit_code)
        }
    }
}

async fn acquire(socket: &Path, args: &RunArgs) -> Result<LockGuard, lockd_client::Error> {
    let options = ConnectOptions {
        client_name: format!("lockctl run {}", args.command[0]),
        ..ConnectOptions::default()
    };
    let client = Client::connect_with(socket, options).await?;
    let mut acquire = client
        .acquire(args.name.clone())
        .namespace(args.namespace.clone());
    if args.shared {
        acquire = acquire.shared();
    }
    if let Some(lease) = args.lease {
        acquire = acquire.lease(lease);
    }
    acquire = match (args.nonblock, args.wait) {
        (true, _) => acquire,
        (false, Some(d)) => acquire.wait(d),
        (false, None) => acquire.wait_forever(),
    };
    acquire.await
}

/// The signals lockctl forwards to the command.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next of the three signals to arrive.
    async fn next(&mut self) -> libc::c_int {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}

/// Where signals for the command go: its process, or its whole process group.
#[derive(Clone, Copy)]
struct Target {
    pid: Option<i32>,
    group: bool,
}

impl Target {
    fn kill(self, sig: libc::c_int) {
        if let Some(pid) = self.pid {
            let to = if self.group { -pid } else { pid };
            // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child
            // (and, for a group, the group it leads).
            unsafe { libc::kill(to, sig) };
        }
    }
}

/// Runs the command while holding `guard`; returns the exit code.
async fn supervise(args: &RunArgs, guard: LockGuard, mut signals: Signals) -> u8 {
    use std::io::IsTerminal;
    let own_group = !std::io::stdin().is_terminal();
    let mut child = match spawn(args, &guard, own_group) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lockctl: cannot run {}: {e}", args.command[0]);
            return if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
        }
    };
    let target = Target {
        pid: child.id().and_then(|p| i32::try_from(p).ok()),
        group: own_group,
    };
    let mut lost = false;
    let kill_deadline = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(kill_deadline);
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            why = guard.lost(), if !lost => {
                eprintln!(
                    "lockctl: lost lock {} ({why}); sending SIGTERM to {}, SIGKILL in {:?}",
                    guard.key(), args.command[0], args.kill_after
                );
                target.kill(libc::SIGTERM);
                lost = true;
                kill_deadline.as_mut().reset(tokio::time::Instant::now() + args.kill_after);
            }
            _ = &mut kill_deadline, if lost => {
                target.kill(libc::SIGKILL);
                kill_deadline.as_mut().reset(tokio::time::Instant::now() + Duration::MAX / 4);
            }
            signo = signals.next() => target.kill(signo),
        }
    };
    if lost {
        // The command's children may outlive it; make sure the group is gone too.
        if target.group {
            target.kill(libc::SIGKILL);
        }
        return exit::LOST;
    }
    let code = match status {
        Ok(status) => exit_code_of(status),
        Err(e) => {
            eprintln!("lockctl: lost track of the command: {e}");
            exit::INTERNAL
        }
    };
    if let Err(e) = guard.release().await {
        eprintln!("lockctl: releasing the lock failed: {e}");
    }
    code
}

fn spawn(
    args: &RunArgs,
    guard: &LockGuard,
    own_group: bool,
) -> std::io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(&args.command[0]);
    cmd.args(&args.command[1..])
        .env("LOCKD_FENCE", guard.fence().to_string())
        .env("LOCKD_LOCK", &guard.key().name)
        .env("LOCKD_NAMESPACE", &guard.key().namespace);
    // SAFETY: getpid is async-signal-safe; we call it before forking.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe functions
    // (setpgid, prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if own_group && libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // If lockctl dies, the command gets SIGTERM: it must not run on without the lock.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // lockctl died between fork and prctl: do not start at all.
            if libc::getppid() != parent {
                libc::_exit(exit::LOST as i32);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// The shell's convention: the exit status, or 128 + the signal that killed the command.
fn exit_code_of(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(exit::INTERNAL),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(exit::INTERNAL),
        (None, None) => exit::INTERNAL,
    }
}
