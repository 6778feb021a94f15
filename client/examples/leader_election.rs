//! Leader election: candidates queue for one key; its holder leads, and observers follow who
//! leads.
//!
//! ```text
//! cargo run -p lockd-client --example leader_election [IDENTITY] [SECONDS]
//! ```
//!
//! Campaigns in the election `example-leader` as IDENTITY (default: `candidate-<pid>`, e.g. an
//! address other services could use to reach the leader), leads for SECONDS (default 3) and
//! resigns. Start several at once to see them take turns: each prints the leader whenever it
//! changes. Leadership has a 10-second lease, so a candidate that hangs (not just one that
//! dies) loses it. It connects to `$LOCKD_SOCKET`, else to the daemon's default socket. Exit
//! status: 0 done, 1 leadership lost, 2 other error.

use std::process::ExitCode;
use std::time::Duration;

use lockd_client::{Client, Election};

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let identity = args
        .next()
        .unwrap_or_else(|| format!("candidate-{}", std::process::id()));
    let seconds = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    match run(identity, Duration::from_secs(seconds)).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("leader_election: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(identity: String, term: Duration) -> Result<ExitCode, lockd_client::Error> {
    let client = Client::connect_default().await?;
    let election = Election::new(&client, "default", "example-leader")?;

    // Follow the leadership on the side (the identity is the leader's own text: print it
    // escaped).
    let mut observer = election.observe().await?;
    tokio::spawn(async move {
        while let Some(Ok(leader)) = observer.next().await {
            match leader {
                Some(l) => println!(
                    "leader: {:?} (fence {})",
                    String::from_utf8_lossy(&l.identity),
                    l.fence
                ),
                None => println!("leader: nobody"),
            }
        }
    });

    println!("{identity}: campaigning");
    let leadership = election
        .campaign(identity.clone(), Some(Duration::from_secs(10)))
        .await?;
    println!("{identity}: leading with fence {}", leadership.fence());
    tokio::select! {
        // The leader's work; pass `leadership.fence()` to whatever it writes to.
        () = tokio::time::sleep(term) => {}
        why = leadership.lost() => {
            eprintln!("{identity}: lost leadership ({why}): stop acting as leader");
            return Ok(ExitCode::from(1));
        }
    }
    leadership.resign().await?;
    println!("{identity}: resigned");
    // Let the observer print the next leader before the connection closes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(ExitCode::SUCCESS)
}
