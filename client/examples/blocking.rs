//! The blocking client: a lock for a program without an async runtime.
//!
//! Waits up to 10 seconds for the lock `example-blocking` (or the name given as the first
//! argument), works in three steps while checking that the hold is intact, and releases it.
//!
//! ```text
//! cargo run -p lockd-client --example blocking [NAME]
//! ```
//!
//! It connects to `$LOCKD_SOCKET`, else to the daemon's default socket. Exit status: 0 done,
//! 1 not acquired in time, 2 hold lost, 3 other error.

use std::process::ExitCode;
use std::time::Duration;

use lockd_client::blocking::Client;

fn main() -> ExitCode {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "example-blocking".to_string());
    match run(&name) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("blocking: {e}");
            ExitCode::from(3)
        }
    }
}

fn run(name: &str) -> Result<ExitCode, lockd_client::Error> {
    let client = Client::connect_default()?;
    let guard = match client.acquire(name).wait(Duration::from_secs(10)).send() {
        Ok(guard) => guard,
        Err(e) if e.is_timeout() => {
            eprintln!("blocking: {name} is still held by someone else after 10 s");
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e),
    };
    println!("holding {} with fence {}", guard.key(), guard.fence());
    for step in 1..=3 {
        // Between steps: stop at once if the hold was lost (daemon gone, force-released).
        // `wait_lost` doubles as the pause; it returns early with the reason if it is lost.
        if let Some(why) = guard.wait_lost(Duration::from_millis(100)) {
            eprintln!("blocking: lost the lock before step {step}: {why}");
            return Ok(ExitCode::from(2));
        }
        println!("step {step} done");
    }
    guard.release()?;
    println!("released");
    Ok(ExitCode::SUCCESS)
}
