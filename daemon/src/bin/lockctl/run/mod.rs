//! `lockctl run`: hold a lock while a command runs, flock(1) style.
//!
//! Accepts flock(1)'s command-line shapes and spellings, so flock scripts work with `lockctl
//! run` in its place: `NAME CMD [ARGS…]` (with or without `--`), `NAME -c STRING`, `-x`/`-e`,
//! `-s`, `-n`, `-w`, `-E`, `-o`, `-F`, `--verbose`. The lock file's path becomes the lock's
//! name, unchanged. flock's descriptor form (`flock 9`) and `-u` have no lockd equivalent and
//! are refused with what to use instead.
//!
//! The command gets `LOCKD_FENCE`, `LOCKD_LOCK`, `LOCKD_NAMESPACE` and, unless `-o`,
//! `LOCKD_FD`: as flock(1) does with its lock file, the command inherits the connection's
//! socket, so the daemon keeps the hold until lockctl *and* every process that inherited the
//! descriptor have closed it. If lockctl dies (even by SIGKILL) the command gets SIGTERM
//! (`PR_SET_PDEATHSIG`) and keeps the lock until it has exited: a command never runs on
//! without its lock (with `--lease`, only until the lease runs out: nobody renews it). With
//! `-o` the descriptor is not passed (for commands that start
//! long-lived daemons): lockctl's death then releases the lock at once.
//!
//! SIGINT, SIGTERM and SIGHUP sent to lockctl are forwarded to the command. If the hold is
//! lost (daemon gone, lease expired, force-release), the command gets SIGTERM at once and
//! SIGKILL after `--kill-after`, and lockctl exits 75.
//!
//! When the command exits and processes it left behind (which may hold the descriptor) still
//! run 250 ms later, lockctl exits without releasing the lock or closing the connection (it
//! leaves by `process::exit`): the lock ends when they have all closed the descriptor, as with
//! flock. lockctl learns this by being their reaper (`PR_SET_CHILD_SUBREAPER`). Otherwise it
//! releases the lock before exiting, so the next acquirer never depends on when the daemon
//! notices a closed socket.
//!
//! When lockctl's stdin is not a terminal (cron, systemd, scripts), the command runs in a
//! process group of its own and signals go to the whole group, so the command's children stop
//! too. On a terminal the command stays in the foreground group (so it can read the terminal)
//! and signals go to the command alone. The parent-death signal reaches the command itself, not
//! its children.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::waiting::Waiting;
use crate::{exit, output};
use clap::Args;
use lockd::duration;
use lockd_client::{Client, ConnectOptions, Description, Error, ErrorCode, Key, LockGuard};

mod command;

use command::*;

const AFTER_HELP: &str = "\
NAME is the lock's name. A path, as flock takes (/run/lock/backup.lock), is used as the name
unchanged, in the default namespace (or --namespace): nothing is opened or created on disk,
and two spellings of one file (./x.lock, /tmp/x.lock) are two different locks.

Waiting: as flock, lockctl waits as long as it takes unless -n (fail at once if held) or
-w SECS (give up after SECS). Both fail with exit 1, or the -E code.

The command inherits the connection's socket (LOCKD_FD=<n>, like flock's lock descriptor):
the lock is held until lockctl and every process that inherited it have exited (or closed
it), even if lockctl is killed first. -o does not pass it (for commands that start daemons, which would
otherwise keep the lock). -F runs the command in lockctl's place (no supervision: a lost hold
is not noticed).

The command also gets LOCKD_FENCE (the fencing token), LOCKD_LOCK and LOCKD_NAMESPACE.

Examples:
  # Skip this run if the previous one still holds the lock:
  lockctl run -n nightly-backup -- /usr/local/bin/backup.sh
  # A flock(1) line, unchanged but for the program name:
  lockctl run -n /run/lock/backup.lock -c '/usr/local/bin/backup.sh --full'
  # Wait up to 30 s for a shared hold; exit 10 if not acquired:
  lockctl run -w 30 -s -E 10 reports ./read-reports.sh
  # The command sees its fencing token:
  lockctl run deploy -- sh -c 'echo \"fence $LOCKD_FENCE for $LOCKD_LOCK\"'";

#[derive(Args, Debug)]
#[command(
    after_help = AFTER_HELP,
    override_usage = "lockctl run [OPTIONS] NAME [--] CMD [ARGS]...\n       lockctl run [OPTIONS] NAME -c STRING"
)]
pub struct RunArgs {
    /// Take an exclusive hold (the default)
    #[arg(
        short = 'x',
        visible_short_alias = 'e',
        long = "exclusive",
        overrides_with = "shared"
    )]
    exclusive: bool,
    /// Take a shared hold instead of an exclusive one
    #[arg(short = 's', long = "shared", overrides_with = "exclusive")]
    shared: bool,
    #[command(flatten)]
    waiting: Waiting,
    /// Exit code when the lock is not acquired (conflict or timeout)
    #[arg(short = 'E', long = "conflict-exit-code", value_name = "CODE", default_value_t = exit::NOT_ACQUIRED)]
    conflict_exit_code: u8,
    /// Do not pass the lock's descriptor to the command (for commands that start long-lived
    /// daemons): if lockctl dies, the lock is released at once, even while the command runs
    #[arg(short = 'o', long = "close")]
    close: bool,
    /// Run the command in lockctl's place (exec, no fork): it holds the lock for as long as it
    /// (and whatever inherits LOCKD_FD) lives; nothing supervises it; not with --lease
    #[arg(short = 'F', long = "no-fork")]
    no_fork: bool,
    /// Not supported: the lock is released when the command exits (for a lock that outlives
    /// lockctl, use `lockctl acquire --lease` and `lockctl release TICKET`)
    #[arg(short = 'u', long = "unlock")]
    unlock: bool,
    /// Print to stderr whom lockctl waits for and how long it waited
    #[arg(long)]
    verbose: bool,
    /// Run STRING through `sh -c` instead of CMD (flock's -c)
    #[arg(short = 'c', long = "command", value_name = "STRING")]
    shell_command: Option<String>,
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
    /// Make the lock a counting semaphore: at most N holders at once (exclusive holds only)
    #[arg(long, value_name = "N")]
    permits: Option<u32>,
    /// If this hold ends without a release (lockctl and the command gone, lease expired,
    /// force-release), nobody gets the lock for this long afterwards
    #[arg(long, value_name = "DUR", value_parser = duration::parse)]
    lock_delay: Option<Duration>,
    /// Lock name (a lock file's path is fine: it is the name, unchanged)
    name: String,
    /// The command and its arguments (`--` before it is optional)
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

impl RunArgs {
    /// The program and arguments to run, or the usage error to report (exit 2).
    fn argv(&self) -> Result<Vec<String>, String> {
        if self.unlock {
            return Err(
                "-u/--unlock is not supported: the lock is released when the command exits \
                 (or use lockctl release TICKET for a detached lease taken with lockctl acquire)"
                    .into(),
            );
        }
        if self.no_fork && self.lease.is_some() {
            return Err(
                "-F/--no-fork cannot be used with --lease: with lockctl gone, nobody \
                 would renew the lease and it would expire while the command runs; use -F \
                 alone (the hold lasts exactly as long as the command) or --lease without -F"
                    .into(),
            );
        }
        if self.no_fork && self.close {
            return Err(
                "-F/--no-fork and -o/--close contradict each other: with -F the \
                 command itself holds the lock's connection"
                    .into(),
            );
        }
        match (&self.shell_command, self.command.as_slice()) {
            (Some(s), []) => Ok(vec!["sh".into(), "-c".into(), s.clone()]),
            (Some(_), extra) => Err(format!(
                "-c takes exactly one command string; unexpected {extra:?} after it \
                 (quote the whole command: lockctl run NAME -c 'CMD ARGS')"
            )),
            (None, [])
                if !self.name.is_empty() && self.name.bytes().all(|b| b.is_ascii_digit()) =>
            {
                Err(format!(
                    "`lockctl run {0}` looks like flock's descriptor form (`flock {0}`), which \
                     lockd has no equivalent for: a lockd lock belongs to a connection, not to \
                     a descriptor your shell opened. Run the command under the lock instead: \
                     lockctl run NAME -- CMD [ARGS...] (or lockctl run NAME -c 'CMD ...')",
                    self.name
                ))
            }
            (None, []) => Err(
                "no command given: lockctl run NAME [--] CMD [ARGS...] or lockctl run NAME -c \
                 STRING"
                    .into(),
            ),
            (None, cmd) => Ok(cmd.to_vec()),
        }
    }

    fn mode_is_shared(&self) -> bool {
        // -x/-s override each other (the last one wins, as in flock).
        self.shared && !self.exclusive
    }
}

/// Runs the subcommand; returns lockctl's exit code.
pub async fn run(socket: &Path, args: RunArgs) -> u8 {
    let argv = match args.argv() {
        Ok(argv) => argv,
        Err(msg) => {
            eprintln!("lockctl: {msg}");
            return exit::USAGE;
        }
    };
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
        acquired = acquire(socket, &args, &argv) => acquired,
        signo = signals.next() => {
            eprintln!("lockctl: interrupted while waiting for {}", args.name);
            return 128 + signo as u8;
        }
    };
    match acquired {
        Ok((client, guard)) if args.no_fork => exec_in_place(&args, &argv, &client, guard),
        Ok((client, guard)) => supervise(&args, &argv, &client, guard, signals).await,
        Err(e) => {
            eprintln!(
                "lockctl: {}",
                lockd_protocol::display::escape(&e.to_string())
            );
            exit::for_error(&e, args.conflict_exit_code)
        }
    }
}

/// Connects and acquires; with `--verbose`, says whom it waits for and how long it waited.
async fn acquire(
    socket: &Path,
    args: &RunArgs,
    argv: &[String],
) -> Result<(Client, LockGuard), Error> {
    let options = ConnectOptions::default().client_name(format!("lockctl run {}", argv[0]));
    let client = Client::connect_with(socket, options).await?;
    let mut acquire = client
        .acquire(args.name.clone())
        .namespace(args.namespace.clone());
    if args.mode_is_shared() {
        acquire = acquire.shared();
    }
    if let Some(lease) = args.lease {
        acquire = acquire.lease(lease);
    }
    if let Some(n) = args.permits {
        acquire = acquire.permits(n);
    }
    if let Some(d) = args.lock_delay {
        acquire = acquire.lock_delay(d);
    }
    let may_wait = args.waiting.may_wait();
    acquire = args.waiting.apply(acquire);
    let started = Instant::now();
    let mut pending = std::pin::pin!(std::future::IntoFuture::into_future(acquire));
    let result = if args.verbose && may_wait {
        // The daemon answers requests in order: once the ping is answered, an acquire still
        // unanswered is queued behind a holder.
        let answered = tokio::select! {
            biased;
            r = &mut pending => Some(r),
            _ = client.ping() => None,
        };
        match answered {
            Some(r) => r,
            None => {
                tell_holders(&client, args, "waiting for").await;
                pending.await
            }
        }
    } else {
        pending.await
    };
    if args.verbose {
        let waited = secs(started.elapsed());
        match &result {
            Ok(guard) => eprintln!(
                "lockctl: got lock {} after {waited} (fence {})",
                args.name,
                guard.fence()
            ),
            Err(Error::Lock(e)) if e.code == ErrorCode::Timeout => {
                eprintln!("lockctl: gave up on {} after {waited}", args.name);
                tell_holders(&client, args, "still").await;
            }
            Err(Error::Lock(e)) if e.code == ErrorCode::Conflict => {
                tell_holders(&client, args, "not waiting for").await;
            }
            Err(_) => {}
        }
    }
    result.map(|guard| (client, guard))
}

/// `0.523s`.
fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

/// Prints who holds (or why nobody is granted) the lock, from a describe.
async fn tell_holders(client: &Client, args: &RunArgs, what: &str) {
    let Ok(key) = Key::new(args.namespace.clone(), args.name.clone()) else {
        return;
    };
    match client.describe(&key).await {
        Ok(d) => {
            for line in holder_lines(&d) {
                eprintln!("lockctl: {what} {}, {line}", args.name);
            }
        }
        Err(e) => eprintln!(
            "lockctl: {what} {} (cannot describe it: {})",
            args.name,
            lockd_protocol::display::escape(&e.to_string())
        ),
    }
}

/// One line per holder (at most five), or why the lock is not granted without one.
fn holder_lines(d: &Description) -> Vec<String> {
    const SHOWN: usize = 5;
    let mut lines: Vec<String> = d
        .holders
        .iter()
        .take(SHOWN)
        .map(|h| {
            format!(
                "held ({}) by pid {}, uid {} ('{}') for {}",
                h.mode.as_str(),
                h.owner.pid.map_or_else(|| "?".into(), |p| p.to_string()),
                h.owner.uid,
                lockd_protocol::display::Escaped(&h.owner.client_name),
                output::duration(output::now_ms().saturating_sub(h.acquired_at_ms)),
            )
        })
        .collect();
    let more = (d.holders.len().saturating_sub(SHOWN)) as u64 + u64::from(d.omitted_holders);
    if more > 0 {
        lines.push(format!("and {more} more holder(s)"));
    }
    if lines.is_empty() {
        let waiters = d.waiters.len() as u64 + u64::from(d.omitted_waiters);
        lines.push(match d.delayed_until_ms {
            Some(until) => format!("in lock-delay until {}", output::relative(until)),
            None => format!("no holder now, {waiters} waiter(s) queued"),
        });
    }
    lines
}
