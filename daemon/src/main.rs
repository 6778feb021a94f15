//! `lockd`: the lock daemon. Parses flags and hands over to [`lockd::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use lockd::config::Config;

/// A single-host lock daemon: exclusive and shared locks, FIFO waits, fencing tokens.
#[derive(Parser, Debug, Clone)]
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
    /// [default: 300]
    #[arg(long, value_name = "SECS")]
    long_hold: Option<f64>,
    /// Configuration file [default: /etc/lockd/lockd.toml when it exists]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate a configuration file and exit (non-zero, naming the bad line, if invalid)
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// A uid (besides root) allowed to force-release; repeat for several
    #[arg(long = "admin-uid", value_name = "UID")]
    admin_uids: Vec<u32>,
    /// Members of this group (primary or supplementary) are admins too; repeat for several
    #[arg(long = "admin-gid", value_name = "GID")]
    admin_gids: Vec<u32>,
    /// Log filter in RUST_LOG syntax (overrides $RUST_LOG), e.g. `info` or `lockd=debug`
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.check_config {
        return match lockd::config_file::load(path) {
            Ok(_) => {
                println!("{}: OK", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("lockd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    init_logging(args.log_level.as_deref());
    let config = match build_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lockd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let reload_args = args.clone();
    let reload: lockd::Reload = Box::new(move || build_config(&reload_args));
    match lockd::run(config, reload) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("lockd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Defaults, then the configuration file, then the command line.
fn build_config(args: &Args) -> Result<Config, String> {
    let mut config = Config::new(
        args.socket
            .clone()
            .unwrap_or_else(lockd_protocol::paths::default_socket_path),
        match args.data_dir.clone() {
            Some(dir) => dir,
            None => lockd_protocol::paths::default_data_dir().map_err(|e| e.to_string())?,
        },
        args.socket_mode.unwrap_or_else(lockd::default_socket_mode),
    );
    if let Some(secs) = args.long_hold {
        config.long_hold = std::time::Duration::from_secs_f64(secs.max(0.001));
    }
    config.authz.add_admins(&args.admin_uids, &args.admin_gids);
    let file = match &args.config {
        Some(path) => Some(path.clone()),
        None => {
            let default = PathBuf::from(lockd::config_file::DEFAULT_PATH);
            default.exists().then_some(default)
        }
    };
    if let Some(path) = file {
        let overrides = lockd::config_file::CliOverrides {
            socket: args.socket.is_some(),
            data_dir: args.data_dir.is_some(),
            socket_mode: args.socket_mode.is_some(),
            long_hold: args.long_hold.is_some(),
        };
        let loaded = lockd::config_file::load(&path).map_err(|e| e.to_string())?;
        loaded.apply(&mut config, &overrides);
    }
    Ok(config)
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
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // journald adds its own timestamps; `<N>` prefixes keep the priorities.
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_level(false)
            .with_target(false)
            .with_ansi(false);
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(journald::Prefixed(format))
            .init();
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

mod journald {
    //! syslog-style `<N>` priority prefixes, which journald reads from a service's stderr.

    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
    use tracing_subscriber::registry::LookupSpan;

    pub struct Prefixed<F>(pub F);

    impl<S, N, F> FormatEvent<S, N> for Prefixed<F>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
        F: FormatEvent<S, N>,
    {
        fn format_event(
            &self,
            ctx: &FmtContext<'_, S, N>,
            mut writer: Writer<'_>,
            event: &Event<'_>,
        ) -> std::fmt::Result {
            let priority = match *event.metadata().level() {
                Level::ERROR => 3,
                Level::WARN => 4,
                Level::INFO => 6,
                Level::DEBUG | Level::TRACE => 7,
            };
            write!(writer, "<{priority}>")?;
            self.0.format_event(ctx, writer, event)
        }
    }
}
