//! A detached lease handed to another process: one process takes the lock, another finishes
//! the work and releases it, with no connection held in between.
//!
//! ```text
//! cargo run -p lockd-client --example detached_handoff [NAME]
//! ```
//!
//! The first process takes a detached 60-second lease on `example-handoff` (or NAME), starts a
//! second copy of this program (`finish` mode) and writes the lease's ticket to the second's
//! stdin, a pipe only the two share; then it disconnects and exits. The lease outlives its
//! connection. The second process reads the ticket, renews the lease and releases it.
//!
//! **Tickets are secrets.** Whoever has the ticket (and runs as the same user) can renew and
//! release the lease. Hand it on through a private channel: a pipe, or a file only the user
//! can read (mode 0600, in a directory only the user can write). Never put it on a command
//! line (other users see it in `ps`), in an environment other programs inherit, or in a log.
//! `Ticket`'s `Debug` is redacted for that reason; `to_text` is the explicit way out.
//!
//! It connects to `$LOCKD_SOCKET`, else to the daemon's default socket. Exit status: 0 done,
//! 1 the second process failed, 2 other error.

use std::io::{Read, Write};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, SystemTime};

use lockd_client::{Client, Ticket};

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("finish") => finish().await,
        name => take(name.unwrap_or("example-handoff")).await,
    };
    result.unwrap_or_else(|e| {
        eprintln!("detached_handoff: {e}");
        ExitCode::from(2)
    })
}

/// Takes the lease and hands its ticket to a second process.
async fn take(name: &str) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let client = Client::connect_default().await?;
    let lease = client
        .acquire(name)
        .lease(Duration::from_secs(60))
        .detached()
        .await?;
    let left = lease.expires_at.duration_since(SystemTime::now())?;
    println!(
        "took a detached lease on {} with fence {}, ending in {}s",
        lease.key,
        lease.fence,
        left.as_secs()
    );
    // The lease does not depend on this connection: close it before handing over.
    drop(client);

    let mut child = Command::new(std::env::current_exe()?)
        .arg("finish")
        .stdin(Stdio::piped())
        .spawn()?;
    let mut pipe = child.stdin.take().ok_or("no pipe to the second process")?;
    // The ticket's text form, through the pipe: never printed, never an argument.
    writeln!(pipe, "{}", lease.ticket.to_text())?;
    drop(pipe);
    let status = child.wait()?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Reads a ticket from stdin, renews the lease once and releases it.
async fn finish() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text)?;
    let ticket = Ticket::from_text(text.trim())?;
    let client = Client::connect_default().await?;
    let until = client.renew(&ticket, None).await?;
    let left = until.duration_since(SystemTime::now())?;
    println!(
        "second process: renewed the lease, ending in {}s",
        left.as_secs()
    );
    // ... the rest of the work ...
    client.release(&ticket).await?;
    println!("second process: released");
    Ok(ExitCode::SUCCESS)
}
