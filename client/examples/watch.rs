//! Watching a key: every grant, release, expiry, force-release and disconnect on it, as it
//! happens.
//!
//! ```text
//! cargo run -p lockd-client --example watch [NAME] [SECONDS]
//! ```
//!
//! Prints the holders of `example-watch` (or NAME) now, then each change for SECONDS
//! (default 30). Run `lockctl run NAME -- sleep 1` meanwhile to see a grant and a release. A
//! watch needs the same permission as describe. It connects to `$LOCKD_SOCKET`, else to the
//! daemon's default socket. Exit status: 0 done, 2 error.

use std::process::ExitCode;
use std::time::Duration;

use lockd_client::{Change, Client, Key};

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "example-watch".to_string());
    let seconds = args.next().and_then(|s| s.parse().ok()).unwrap_or(30);
    match run(&name, Duration::from_secs(seconds)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("watch: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(name: &str, for_how_long: Duration) -> Result<(), lockd_client::Error> {
    let client = Client::connect_default().await?;
    let key = Key::in_default(name)?;
    // Watch first, then describe: no change falls between the two.
    let mut watch = client.watch(&key).await?;
    let now = client.describe(&key).await?;
    println!(
        "{key}: {} holder(s), {} waiter(s)",
        now.holders.len(),
        now.waiters.len()
    );

    let deadline = tokio::time::sleep(for_how_long);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            change = watch.next() => match change {
                Some(change) => println!("{}", describe(&change)),
                None => {
                    eprintln!("watch: the connection to lockd ended");
                    return Err(lockd_client::Error::Disconnected);
                }
            },
            () = &mut deadline => return Ok(()),
        }
    }
}

fn describe(change: &Change) -> String {
    match change {
        // Client names are the holders' own text: print them escaped.
        Change::Granted { fence, mode, owner } => format!(
            "granted fence={fence} mode={} uid={} client={:?}",
            mode.as_str(),
            owner.uid,
            owner.client_name
        ),
        // Released, expired, forced, disconnected, deadlock, and kinds newer than this
        // program: `kind()` names each.
        other => format!("{} fence={}", other.kind(), other.fence()),
    }
}
