//! `lockd`: the lock daemon. Parses flags and hands over to [`lockd::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use lockd::config::{Config, Limits};

/// A single-host lock daemon: exclusive and shared locks, FIFO waits, fencing tokens.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Unix socket to listen on [default: $RUNTIME_DIRECTORY/lockd.sock under systemd,
    /// /run/lockd/lockd.sock as root, else $XDG_RUNTIME_DIR/lockd/lockd.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Directory for persistent state [default: $STATE_DIRECTORY under systemd, /var/lib/lockd
    /// as root, else $XDG_STATE_HOME/lockd or ~/.local/state/lockd]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Permission bits of the socket file, octal [default: 660 as root, else 600]
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    socket_mode: Option<u32>,
    /// Log holds older than this many seconds once at WARN (and count them in stats)
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    long_hold: f64,
    /// A uid (besides root) allowed to force-release; repeat for several
    #[arg(long = "admin-uid", value_name = "UID")]
    admin_uids: Vec<u32>,
    /// Peers with this primary gid may force-release too; repeat for several
    #[arg(long = "admin-gid", value_name = "GID")]
    admin_gids: Vec<u32>,
    /// Log filter in RUST_LOG syntax (overrides $RUST_LOG), e.g. `info` or `lockd=debug`
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_level.as_deref());
    let config = Config {
        socket: args
            .socket
            .unwrap_or_else(lockd_protocol::paths::default_socket_path),
        data_dir: args
            .data_dir
            .unwrap_or_else(lockd_protocol::paths::default_data_dir),
        limits: Limits::default(),
        long_hold: std::time::Duration::from_secs_f64(args.long_hold.max(0.001)),
        socket_mode: args.socket_mode.unwrap_or_else(lockd::default_socket_mode),
        admin_uids: args.admin_uids,
        admin_gids: args.admin_gids,
    };
    match lockd::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("lockd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal permission mode like 660"))
}

fn init_logging(level: Option<&str>) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
