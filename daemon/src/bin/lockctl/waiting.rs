//! How long `lockctl run` and `lockctl acquire` wait: flock's `-n` and `-w`, and the default of
//! waiting as long as it takes.

use std::time::Duration;

use clap::Args;
use lockd::duration;
use lockd_client::AcquireBuilder;

// `-n/--nonblock` and `-w/--wait SECS`, shared by `run` and `acquire`. (A `///` comment here
// would become the about text of the subcommands that flatten it.)
#[derive(Args, Debug, Clone, Copy)]
pub struct Waiting {
    /// Fail at once if the lock is held [default: wait as long as it takes]
    #[arg(
        short = 'n',
        long = "nonblock",
        visible_aliases = ["nb", "nonblocking"],
        conflicts_with = "wait"
    )]
    pub nonblock: bool,
    /// Wait at most this long: seconds (fractions too), or 500ms, 30s, 5m, 1h [default: wait
    /// as long as it takes]
    #[arg(
        short = 'w',
        long = "wait",
        visible_alias = "timeout",
        value_name = "SECS",
        value_parser = duration::parse
    )]
    pub wait: Option<Duration>,
}

impl Waiting {
    /// True unless the acquire tries once (`-n` or `-w 0`).
    pub fn may_wait(&self) -> bool {
        !self.nonblock && self.wait != Some(Duration::ZERO)
    }

    /// `acquire` with this wait: try once, wait at most `-w`, or wait forever.
    pub fn apply(&self, acquire: AcquireBuilder) -> AcquireBuilder {
        match (self.nonblock, self.wait) {
            (true, _) => acquire,
            (false, Some(d)) => acquire.wait(d),
            (false, None) => acquire.wait_forever(),
        }
    }
}
