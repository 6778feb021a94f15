//! `lockctl`: lockd from the shell. Argument parsing lives here; each subcommand in its module.

mod admin;
mod exit;
mod lease;
mod output;
mod run;
mod waiting;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

const AFTER_HELP: &str = "\
Exit codes:
   0  success (for `run`: the command's own status)
   1  lock not acquired: conflict or timeout (`run -E` changes it)
   2  usage error
   3  not holder: the ticket's hold has ended or never existed
  69  lockd unavailable (not running, unreachable, shutting down, storage failing)
      or a limit reached
  70  internal or protocol error
  75  the hold was lost while the command ran
  77  permission denied

Examples:
  lockctl run -n nightly-backup -- /usr/local/bin/backup.sh
  lockctl run -w 30 -s reports -- ./read-reports.sh
  lockctl run -n /run/lock/backup.lock -c 'backup.sh --full'    # a flock(1) line
  eval \"$(lockctl acquire --lease 10m -n report)\" && lockctl release \"$LOCKD_TICKET\"
  lockctl describe nightly-backup
  lockctl list --namespace ops
  lockctl metrics > /var/lib/node_exporter/lockd.prom";

/// Take lockd locks from the shell: flock(1) for a whole host, with fencing tokens.
#[derive(Parser, Debug)]
#[command(version, about, after_help = AFTER_HELP)]
struct Cli {
    /// lockd's socket [default: $LOCKD_SOCKET, else the daemon's default path]
    #[arg(long, global = true, value_name = "PATH", env = "LOCKD_SOCKET")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

// Each subcommand's arguments are built only when it is the one invoked or help needs them
// (`defer`): the others cost nothing at start. So a subcommand's one-line description is its
// variant's doc comment here, not its arguments struct's (which would be built too late).
#[derive(Subcommand, Debug)]
#[command(defer = true)]
enum Command {
    /// Hold a lock while a command runs (flock(1)'s options and shapes work too)
    Run(run::RunArgs),
    /// Take a detached lease and print its ticket and fence
    Acquire(lease::AcquireArgs),
    /// Extend a lease by its ticket
    Renew(lease::RenewArgs),
    /// Release a lease (or any hold of your uid) by its ticket
    Release(lease::ReleaseArgs),
    /// Who holds a lock and who waits for it (never tickets)
    Describe(admin::DescribeArgs),
    /// Locks that have holders or waiters
    List(admin::ListArgs),
    /// End every hold on a lock (root or a configured admin); holders are told they lost it
    ForceRelease(admin::ForceArgs),
    /// Print one line per event on a lock until interrupted
    Watch(admin::WatchArgs),
    /// Counters, gauges and latency distributions
    Stats(admin::StatsArgs),
    /// Print the daemon's statistics in Prometheus text format (lockd_ prefix)
    #[command(
        after_help = "Example (node_exporter textfile collector):\n  lockctl metrics > /var/lib/node_exporter/lockd.prom.$$ && mv /var/lib/node_exporter/lockd.prom.$$ /var/lib/node_exporter/lockd.prom"
    )]
    Metrics,
    /// Print a shell completion script
    #[command(
        after_help = "Example:\n  lockctl completions bash > /etc/bash_completion.d/lockctl"
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
}

/// Connects for subcommand `what` (shown by describe as the client name); on failure prints
/// why and returns the exit code.
pub(crate) async fn connect(
    socket: &std::path::Path,
    what: &str,
) -> Result<lockd_client::Client, u8> {
    let options = lockd_client::ConnectOptions {
        client_name: format!("lockctl {what}"),
        ..lockd_client::ConnectOptions::default()
    };
    lockd_client::Client::connect_with(socket, options)
        .await
        .map_err(|e| exit::report(&e))
}

fn main() -> ExitCode {
    // Parsed before the runtime exists: --help, --version and usage errors need none.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lockctl: cannot start: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    ExitCode::from(runtime.block_on(dispatch(cli)))
}

/// Runs the subcommand; returns lockctl's exit code.
async fn dispatch(cli: Cli) -> u8 {
    let socket = match cli
        .socket
        .map_or_else(lockd_protocol::paths::client_socket_path, Ok)
    {
        Ok(socket) => socket,
        Err(e) => return exit::report(&e.into()),
    };
    match cli.command {
        Command::Run(args) => run::run(&socket, args).await,
        Command::Acquire(args) => lease::acquire(&socket, args).await,
        Command::Renew(args) => lease::renew(&socket, args).await,
        Command::Release(args) => lease::release(&socket, args).await,
        Command::Describe(args) => admin::describe(&socket, args).await,
        Command::List(args) => admin::list(&socket, args).await,
        Command::ForceRelease(args) => admin::force_release(&socket, args).await,
        Command::Watch(args) => admin::watch(&socket, args).await,
        Command::Stats(args) => admin::stats(&socket, args).await,
        Command::Metrics => admin::metrics(&socket).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "lockctl",
                &mut std::io::stdout(),
            );
            0
        }
    }
}
