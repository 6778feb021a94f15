//! `lockd`: the lock daemon. Parses flags and hands over to [`lockd::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use lockd::config::Config;

/// A single-host lock daemon: exclusive and shared locks, FIFO waits, fencing tokens.
#[derive(Parser, Debug, Clone)]
#[command(version)]
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
    /// Write the manual page lockd.8 into DIR and exit (for packaging; see man/)
    #[arg(long, value_name = "DIR", hide = true)]
    generate_man: Option<PathBuf>,
}

/// What lockd(8) says besides its options.
const MAN_EXTRA: &str = r#".SH SIGNALS
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Shut down gracefully: every client is told \fBShuttingDown\fR, connections get the configured
grace period to close, and what was acknowledged is on disk before the process exits.
A second such signal during shutdown exits at once.
.TP
\fBSIGHUP\fR
Reload the configuration (defaults, then the file, then the command line, as at start).
A file that does not load is refused and the running configuration kept; the log says why.
The socket and the data directory change only with a restart.
Under systemd the reload is announced with \fBRELOADING=1\fR and ended with \fBREADY=1\fR,
whose \fBSTATUS=\fR says whether it failed; the unit's \fBExecReload=\fR checks the file with
\fB\-\-check\-config\fR first, so \fBsystemctl reload\fR fails on a broken file.
.SH ENVIRONMENT
.TP
\fBRUST_LOG\fR
Log filter, unless \fB\-\-log\-level\fR is given (default \fBinfo\fR). Logs go to standard error.
.TP
\fBJOURNAL_STREAM\fR
Set by systemd: log lines carry syslog priorities (\fB<3>\fR..\fB<7>\fR) and no timestamps.
.TP
\fBRUNTIME_DIRECTORY\fR, \fBSTATE_DIRECTORY\fR
Set by systemd: the default socket directory and data directory.
.TP
\fBXDG_RUNTIME_DIR\fR, \fBXDG_STATE_HOME\fR, \fBHOME\fR
The default socket and data directory of a daemon not run as root.
.TP
\fBLISTEN_FDS\fR, \fBLISTEN_PID\fR
Socket activation: lockd serves on the socket systemd passed and never removes it.
.TP
\fBNOTIFY_SOCKET\fR, \fBWATCHDOG_USEC\fR
Readiness, reload, status and watchdog notifications to systemd.
.SH FILES
.TP
\fI/etc/lockd/lockd.toml\fR
The configuration file, read when it exists and no \fB\-\-config\fR is given; see \fBlockd.toml\fR(5).
.TP
\fI/run/lockd/lockd.sock\fR
The socket of a daemon run as root (with the packaged units, created by \fIlockd.socket\fR).
.TP
\fI/var/lib/lockd/\fR
The data directory of a daemon run as root: \fIlockd.redb\fR (the fence ceiling and detached
leases) and the write\-ahead log \fIlockd.log.0\fR, \fIlockd.log.1\fR.
Session holds are never written to disk.
.SH "EXIT STATUS"
0 after a clean shutdown (or a valid \fB\-\-check\-config\fR file); 1 on any error, which is
printed to standard error.
.SH "SEE ALSO"
\fBlockctl\fR(1), \fBlockd.toml\fR(5), \fBsystemd.service\fR(5), \fBsd_notify\fR(3)
"#;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(dir) = &args.generate_man {
        return generate_man(dir);
    }
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

/// Writes lockd.8 into `dir` (the hidden `--generate-man`).
fn generate_man(dir: &std::path::Path) -> ExitCode {
    use clap::CommandFactory;
    let extra = lockd::man::Extra {
        section: "8",
        after_help_heading: "NOTES",
        roff: MAN_EXTRA,
    };
    match lockd::man::write_pages(Args::command(), &extra, dir) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "lockd: cannot write the manual page into {}: {e}",
                dir.display()
            );
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
