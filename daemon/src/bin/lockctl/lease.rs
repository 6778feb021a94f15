//! `lockctl acquire`, `renew` and `release`: detached leases for scripts and cron jobs.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use clap::Args;
use lockd_client::Ticket;

use crate::exit;
use crate::waiting::Waiting;
use lockd::duration;

const ACQUIRE_HELP: &str = "\
Prints shell assignments (eval them) or, with --json, an object:
  LOCKD_TICKET=<32 hex digits>   the secret that renews and releases the lease
  LOCKD_FENCE=<n>                the fencing token
  LOCKD_EXPIRES_AT_MS=<ms>       when the lease ends unless renewed (Unix epoch)

The lease outlives lockctl (it is always detached; --detach is accepted for clarity).

Waiting: as `lockctl run` and flock(1), lockctl waits as long as it takes unless -n (fail at
once if held, exit 1) or -w SECS (give up after SECS, exit 1).

Examples:
  lease=$(lockctl acquire --lease 10m -n nightly-report) || exit 1; eval \"$lease\"
  ./build-report.sh --fence \"$LOCKD_FENCE\"
  lockctl renew \"$LOCKD_TICKET\" --lease 10m
  lockctl release \"$LOCKD_TICKET\"";

#[derive(Args, Debug)]
#[command(after_help = ACQUIRE_HELP)]
pub struct AcquireArgs {
    /// Lease length: 500ms, 30s, 5m, 1h
    #[arg(long, value_name = "DUR", value_parser = duration::parse)]
    lease: Duration,
    /// Keep the lease after lockctl exits (always the case; accepted for clarity)
    #[arg(long)]
    detach: bool,
    #[command(flatten)]
    waiting: Waiting,
    /// Take a shared lease
    #[arg(short = 's', long = "shared")]
    shared: bool,
    /// Make the lock a counting semaphore: at most N holders at once (exclusive holds only)
    #[arg(long, value_name = "N")]
    permits: Option<u32>,
    /// If the lease ends without a release (expired, force-released), nobody gets the lock
    /// for this long afterwards
    #[arg(long, value_name = "DUR", value_parser = duration::parse)]
    lock_delay: Option<Duration>,
    /// Text attached to the lease, shown by describe (at most 1 KiB)
    #[arg(long, value_name = "TEXT")]
    data: Option<String>,
    /// Lock namespace
    #[arg(long, value_name = "NS", default_value = lockd_protocol::DEFAULT_NAMESPACE)]
    namespace: String,
    /// Print JSON
    #[arg(long)]
    json: bool,
    /// Lock name
    name: String,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  lockctl renew \"$LOCKD_TICKET\" --lease 10m\n\nTICKET may be - to read it from stdin (keeps it out of the process list)."
)]
pub struct RenewArgs {
    /// The ticket printed by `lockctl acquire`, or - for stdin
    ticket: String,
    /// New lease length from now [default: the lease's own length]
    #[arg(long, value_name = "DUR", value_parser = duration::parse)]
    lease: Option<Duration>,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  lockctl release \"$LOCKD_TICKET\"\n\nTICKET may be - to read it from stdin."
)]
pub struct ReleaseArgs {
    /// The ticket printed by `lockctl acquire`, or - for stdin
    ticket: String,
}

/// Reads a ticket argument (`-` means stdin).
fn ticket(arg: &str) -> Result<Ticket, u8> {
    let text = if arg == "-" {
        let mut s = String::new();
        if std::io::stdin().read_to_string(&mut s).is_err() {
            eprintln!("lockctl: cannot read the ticket from stdin");
            return Err(exit::USAGE);
        }
        s
    } else {
        arg.to_string()
    };
    Ticket::from_text(&text).map_err(|e| {
        eprintln!("lockctl: {e}");
        exit::USAGE
    })
}

pub async fn acquire(socket: &Path, args: AcquireArgs) -> u8 {
    let client = match crate::connect(socket, "acquire").await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut acquire = client
        .acquire(args.name.clone())
        .namespace(args.namespace.clone())
        .lease(args.lease);
    if args.shared {
        acquire = acquire.shared();
    }
    acquire = args.waiting.apply(acquire);
    if let Some(n) = args.permits {
        acquire = acquire.permits(n);
    }
    if let Some(d) = args.lock_delay {
        acquire = acquire.lock_delay(d);
    }
    if let Some(data) = args.data {
        acquire = acquire.data(data.into_bytes());
    }
    let lease = match acquire.detached().await {
        Ok(l) => l,
        Err(e) => return exit::report(&e),
    };
    let expires_at_ms = lockd_protocol::ms_from_system_time(lease.expires_at);
    let text = if args.json {
        let json = serde_json::json!({
            "ticket": lease.ticket.to_text(),
            "fence": lease.fence,
            "namespace": lease.key.namespace,
            "name": lease.key.name,
            "mode": lease.mode.as_str(),
            "expires_at_ms": expires_at_ms,
        });
        format!("{json}\n")
    } else {
        format!(
            "LOCKD_TICKET={}\nLOCKD_FENCE={}\nLOCKD_EXPIRES_AT_MS={expires_at_ms}\n",
            lease.ticket.to_text(),
            lease.fence
        )
    };
    // The ticket is the only way to the lease: if it cannot be handed over, end the lease
    // rather than leave it held, unreachable, until it expires.
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        drop(stdout);
        let released = client.release(&lease.ticket).await;
        eprintln!(
            "lockctl: cannot print the ticket ({e}); the lease was {}",
            if released.is_ok() {
                "released"
            } else {
                "NOT released: it ends when it expires"
            }
        );
        return exit::INTERNAL;
    }
    0
}

pub async fn renew(socket: &Path, args: RenewArgs) -> u8 {
    let ticket = match ticket(&args.ticket) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let client = match crate::connect(socket, "renew").await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.renew(&ticket, args.lease).await {
        Ok(expires_at) => {
            let expires_at_ms = lockd_protocol::ms_from_system_time(expires_at);
            if args.json {
                outln!("{}", serde_json::json!({ "expires_at_ms": expires_at_ms }));
            } else {
                outln!("LOCKD_EXPIRES_AT_MS={expires_at_ms}");
            }
            0
        }
        Err(e) => exit::report(&e),
    }
}

pub async fn release(socket: &Path, args: ReleaseArgs) -> u8 {
    let ticket = match ticket(&args.ticket) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let client = match crate::connect(socket, "release").await {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.release(&ticket).await {
        Ok(()) => 0,
        Err(e) => exit::report(&e),
    }
}
