//! Try-lock: take a lock if it is free, else report who has it and give up at once.
//!
//! ```text
//! cargo run -p lockd-client --example try_lock [NAME]
//! ```
//!
//! Tries once for an exclusive hold of `example-try-lock` (or NAME), works briefly, and
//! releases it. It connects to `$LOCKD_SOCKET`, else to the daemon's default socket. Exit
//! status: 0 done, 1 the lock was busy, 2 other error.

use std::process::ExitCode;
use std::time::Duration;

use lockd_client::{Client, Key};

#[tokio::main]
async fn main() -> ExitCode {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "example-try-lock".to_string());
    match run(&name).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("try_lock: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(name: &str) -> Result<ExitCode, lockd_client::Error> {
    let client = Client::connect_default().await?;
    let guard = match client.try_lock(name).await {
        Ok(guard) => guard,
        Err(e) if e.is_conflict() => {
            // Describe shows who holds it (never their ticket). The client name is whatever
            // the holder chose: print it escaped (`{:?}`), never raw.
            let holders = client.describe(&Key::in_default(name)?).await?.holders;
            for h in holders {
                println!(
                    "busy: held by pid {:?} uid {} ({:?}) with fence {}",
                    h.owner.pid, h.owner.uid, h.owner.client_name, h.fence
                );
            }
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e),
    };
    println!("acquired {} with fence {}", guard.key(), guard.fence());
    // The work. Pass `guard.fence()` to whatever you write to, so that a stale holder (one
    // that lost the lock but kept running) can be refused.
    tokio::time::sleep(Duration::from_millis(100)).await;
    guard.release().await?;
    println!("released");
    Ok(ExitCode::SUCCESS)
}
