//! `lockctl`: lockd from the shell. Argument parsing lives here; each subcommand in its module.

/// `println!` for lockctl's standard output: when the reader has gone (`lockctl list | head`),
/// lockctl exits 0 quietly instead of panicking on the broken pipe (as ripgrep does).
macro_rules! outln {
    () => {
        $crate::output::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for lockctl's standard output; see [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format_args!($($arg)*))
    };
}

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
  lease=$(lockctl acquire --lease 10m -n report) && eval \"$lease\" && lockctl release \"$LOCKD_TICKET\"
  lockctl describe nightly-backup
  lockctl list --namespace ops
  lockctl metrics > /var/lib/node_exporter/lockd.prom";

/// Take lockd locks from the shell: flock(1) for a whole host, with fencing tokens.
#[derive(Parser, Debug)]
#[command(name = "lockctl", version, after_help = AFTER_HELP)]
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
    /// Release a lease by its ticket (a lease of your uid; root and admins: any)
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

/// What lockctl(1) says besides its options, subcommands, exit codes and examples.
const MAN_EXTRA: &str = r#".SH ENVIRONMENT
.TP
\fBLOCKD_SOCKET\fR
lockd's socket, unless \fB\-\-socket\fR is given. Without either, lockctl uses
\fI/run/lockd/lockd.sock\fR as root, and otherwise a per\-user daemon's socket
(\fI$XDG_RUNTIME_DIR/lockd/lockd.sock\fR) when there is one it may trust, else the system socket.
.TP
\fBLOCKD_FENCE\fR, \fBLOCKD_LOCK\fR, \fBLOCKD_NAMESPACE\fR, \fBLOCKD_FD\fR
Given by \fBlockctl run\fR to its command; see \fBlockctl\-run\fR(1).
.TP
\fBLOCKD_TICKET\fR
Printed by \fBlockctl acquire\fR for the shell to keep: the secret that renews and releases a
lease. Keep it out of logs and process lists (pass \fB\-\fR to read it from standard input).
.SH "SEE ALSO"
\fBlockd\fR(8), \fBlockd.toml\fR(5), \fBflock\fR(1)
"#;

/// Connects for subcommand `what` (shown by describe as the client name); on failure prints
/// why and returns the exit code.
pub(crate) async fn connect(
    socket: &std::path::Path,
    what: &str,
) -> Result<lockd_client::Client, u8> {
    let options = lockd_client::ConnectOptions::default().client_name(format!("lockctl {what}"));
    lockd_client::Client::connect_with(socket, options)
        .await
        .map_err(|e| exit::report(&e))
}

/// `lockctl --generate-man DIR` (for packaging: see man/) writes lockctl.1 and
/// lockctl-SUBCOMMAND.1 into DIR. It is read before clap parses, so that neither help nor the
/// shell completions (which list hidden subcommands too) ever offer it.
fn generate_man() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    let (Some(flag), Some(dir), None) = (args.next(), args.next(), args.next()) else {
        return None;
    };
    if flag != "--generate-man" {
        return None;
    }
    use clap::CommandFactory;
    let extra = lockd::man::Extra {
        section: "1",
        after_help_heading: "EXIT STATUS AND EXAMPLES",
        roff: MAN_EXTRA,
    };
    let dir = PathBuf::from(dir);
    Some(
        match lockd::man::write_pages(Cli::command(), &extra, &dir) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "lockctl: cannot write the manual pages into {}: {e}",
                    dir.display()
                );
                ExitCode::from(exit::INTERNAL)
            }
        },
    )
}

fn main() -> ExitCode {
    if let Some(code) = generate_man() {
        return code;
    }
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
