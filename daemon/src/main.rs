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
