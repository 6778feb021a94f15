//! A lease with renewal: a hold that also ends if its holder stops renewing it (hung, not
//! just dead), and stopping the work as soon as it is lost.
//!
//! ```text
//! cargo run -p lockd-client --example lease_renewal [NAME]
//! ```
//!
//! Takes `example-lease` (or NAME) with a 3-second lease and works for 5 seconds: longer than
//! the lease. The guard renews it in the background every third of the lease; if a renewal
//! fails, or an administrator force-releases the key (`lockctl force-release NAME`), `lost()`
//! resolves and the work stops at once. It connects to `$LOCKD_SOCKET`, else to the daemon's
//! default socket. Exit status: 0 done, 1 lost, 2 other error.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use lockd_client::{Client, Key};

#[tokio::main]
async fn main() -> ExitCode {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "example-lease".to_string());
    match run(&name).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lease_renewal: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(name: &str) -> Result<ExitCode, lockd_client::Error> {
    let client = Client::connect_default().await?;
    let lease = Duration::from_secs(3);
    let guard = client.acquire(name).lease(lease).wait(lease).await?;
    println!("acquired {} with fence {}", guard.key(), guard.fence());

    let work = async {
        for step in 1..=5 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            println!(
                "step {step} done; lease ends in {:?}",
                ends_in(&client, name).await
            );
        }
    };
    tokio::select! {
        () = work => {}
        why = guard.lost() => {
            eprintln!("lease_renewal: lost the lock ({why}): stopped the work");
            return Ok(ExitCode::from(1));
        }
    }

    // A renewal can also be asked for by ticket, from any connection of this user: here, one
    // last extension to a whole minute, as a job handing over to a slower step might.
    let until = client
        .renew(guard.ticket(), Some(Duration::from_secs(60)))
        .await?;
    println!(
        "renewed until {:?} from now",
        until.duration_since(SystemTime::now()).unwrap_or_default()
    );
    guard.release().await?;
    println!("released");
    Ok(ExitCode::SUCCESS)
}

/// How long the lease has left, as describe reports it.
async fn ends_in(client: &Client, name: &str) -> Option<Duration> {
    let d = client.describe(&Key::in_default(name).ok()?).await.ok()?;
    let end = d.holders.first()?.expires_at()?;
    Some(end.duration_since(SystemTime::now()).unwrap_or_default())
}
