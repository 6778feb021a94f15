//! Waiting with a timeout: queue for a lock, but give up after a bound.
//!
//! ```text
//! cargo run -p lockd-client --example wait_timeout [NAME] [SECONDS]
//! ```
//!
//! Waits up to SECONDS (default 5) in the FIFO queue of `example-wait` (or NAME). The daemon
//! measures the wait and answers `Timeout` when it runs out; dropping the future earlier (e.g.
//! on Ctrl-C here) withdraws the request from the queue. It connects to `$LOCKD_SOCKET`, else
//! to the daemon's default socket. Exit status: 0 done, 1 timed out, 2 other error.

use std::process::ExitCode;
use std::time::Duration;

use lockd_client::Client;

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "example-wait".to_string());
    let seconds = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let result = tokio::select! {
        r = run(&name, Duration::from_secs(seconds)) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("wait_timeout: interrupted; the request left the queue");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wait_timeout: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(name: &str, timeout: Duration) -> Result<ExitCode, lockd_client::Error> {
    let client = Client::connect_default().await?;
    let guard = match client.acquire(name).wait(timeout).await {
        Ok(guard) => guard,
        Err(e) if e.is_timeout() => {
            println!("timed out after {timeout:?}: {name} is still held");
            return Ok(ExitCode::from(1));
        }
        // Waiting would have closed a cycle of connections waiting on each other: take
        // locks in one global order.
        Err(e) if e.is_deadlock() => {
            println!("refused: {e}");
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e),
    };
    println!("acquired {} with fence {}", guard.key(), guard.fence());
    guard.release().await?;
    println!("released");
    Ok(ExitCode::SUCCESS)
}
