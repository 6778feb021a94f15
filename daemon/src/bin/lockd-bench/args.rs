//! Command-line arguments, the checks between them, and the resolved [`Settings`].

use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, ValueEnum};
use lockd_protocol::Mode;

const AFTER_HELP: &str = "\
Workloads (one per run):
  default      each connection loops acquire + release (a pair) on its keys
  --handoff    all connections queue on one hot key; measures release-to-next-grant
  --hold-many  holds N locks, reports the daemon's memory, releases them

Baselines, measured by the same harness:
  --floor            an echo server answering lockd's frames (beside each measurement)
  --fsync-floor DIR  4 KiB overwrite + fdatasync in DIR (beside each measurement)
  --redis PATH       Redis instead of lockd: SET NX PX + compare-and-delete (EVALSHA)
  --flock            with --handoff: flock(2) between processes instead of lockd
  --etcd-lock URL    etcd's own v3 lock API instead of lockd: Lock + Unlock pairs

Output: a progress line on stderr (when it is a terminal), then per measurement
pairs/s and acquire latency percentiles in microseconds (--json: one JSON object
per measurement, on stdout).

Exit codes: 0 done, 1 a measurement failed (lockd refused or stopped answering),
2 usage error, 69 lockd (or Redis) unreachable.

Examples:
  lockd-bench                                  # 1 connection, 5 s
  lockd-bench --clients 1,64 --floor           # and an echo server's floor, same frames
  lockd-bench --clients 64 --depth 8 --keys 1  # one hot key
  lockd-bench --lease 30s --detach             # detached leases (each one committed)
  lockd-bench --hold-many 100000 --clients 100 # memory per held lock
  lockd-bench --handoff --clients 16           # release -> next grant latency
  lockd-bench --lease 30s --detach --fsync-floor /var/lib/lockd  # vs the disk's syncs/s
  lockd-bench --redis /run/redis/redis.sock --clients 1,64       # the same pairs on Redis
  lockd-bench --handoff --flock --clients 2    # flock(2) handoff between two processes
  lockd-bench --etcd-lock http://127.0.0.1:2379 --clients 1,64  # etcd's lock API";

/// Measure a running lockd: acquire+release pairs per second, acquire latency, hot-key
/// handoff latency, memory per held lock.
#[derive(Parser, Debug)]
#[command(name = "lockd-bench", version, after_help = AFTER_HELP)]
pub struct Args {
    /// lockd's socket [default: $LOCKD_SOCKET, else the daemon's default path]
    #[arg(long, value_name = "PATH", env = "LOCKD_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Connections; a comma list (1,64) runs one measurement per count [default: 1; with
    /// --handoff 2; with --hold-many N one per 10000 locks]
    #[arg(
        long,
        value_name = "N[,N...]",
        value_delimiter = ',',
        value_parser = clap::value_parser!(u32).range(1..=100_000)
    )]
    pub clients: Vec<u32>,
    /// Requests in flight per connection
    #[arg(long, value_name = "D", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub depth: u32,
    /// Draw each acquire's key at random from K keys (1: one hot key) [default: one key per
    /// request slot (clients x depth): no contention]
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    pub keys: Option<u64>,
    /// Lock mode
    #[arg(long, value_enum, default_value_t = ModeArg::Exclusive)]
    pub mode: ModeArg,
    /// Give every hold a lease of DUR (e.g. 30s)
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub lease: Option<Duration>,
    /// Take detached leases (committed to disk before they are granted); needs --lease
    #[arg(long, requires = "lease")]
    pub detach: bool,
    /// Length of each measurement (seconds, or 500ms, 1m...)
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_duration)]
    pub duration: Duration,
    /// Run this long before each measurement starts counting [default: a fifth of
    /// --duration, at most 1 s]
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// Print one JSON object per measurement instead of text
    #[arg(long)]
    pub json: bool,
    /// Also measure, in the same run, an echo server (started by lockd-bench on a temporary
    /// socket) answering the same frames with frames of the same sizes, and print lockd's
    /// ratio to it
    #[arg(long, conflicts_with_all = ["hold_many", "handoff"])]
    pub floor: bool,
    /// Hold N locks over --clients connections; report the daemon's RSS idle, holding, and
    /// after releasing them
    #[arg(long, value_name = "N", conflicts_with = "handoff",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub hold_many: Option<u64>,
    /// With --hold-many: watch the RSS after the release for at most this long, once a second
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_duration)]
    pub rss_watch: Duration,
    /// Measure release-to-next-grant latency on one hot key with --clients connections queued
    #[arg(long)]
    pub handoff: bool,
    /// Drive lockd with hand-encoded frames instead of the client crate (isolates the
    /// daemon's cost)
    #[arg(long, conflicts_with = "hold_many")]
    pub raw: bool,
    /// Namespace of the keys (named lockd-bench-PID-...)
    #[arg(long, value_name = "NS", default_value = lockd_protocol::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Worker threads of lockd-bench itself
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,
    /// Measure Redis at this Unix socket instead of lockd: a lock is `SET key token NX PX`
    /// (the --lease, default 30s) with a 32-byte random token, its release a compare-and-delete
    /// script run by EVALSHA; same clients, depth and keys (a taken key is a conflict: Redis
    /// does not queue). With --hold-many: Redis's memory holding N such keys
    #[arg(long, value_name = "PATH",
          conflicts_with_all = ["floor", "handoff", "raw", "detach", "flock"])]
    pub redis: Option<PathBuf>,
    /// Measure etcd's own v3 lock API at this endpoint instead of lockd (the baseline for lockd
    /// on its etcd backend): each connection is an etcd client with its own session lease, a
    /// pair is Lock(name, lease) + Unlock, one at a time per connection
    #[arg(long, value_name = "URL",
          conflicts_with_all = ["floor", "handoff", "raw", "detach", "flock", "redis",
                                "hold_many", "fsync_floor", "lease"])]
    pub etcd_lock: Option<String>,
    /// With --handoff: measure flock(2) instead of lockd, --clients processes taking turns on
    /// one file in a temporary directory
    #[arg(long, requires = "handoff", conflicts_with_all = ["raw", "lease", "fsync_floor"])]
    pub flock: bool,
    /// Beside each measurement, the disk's floor for durable work: 4 KiB overwrite + fdatasync
    /// of a file created in DIR (use the daemon's data directory), as many as fit in
    /// --duration; with --detach or --redis, the ratio pairs/s / (syncs/s / 2)
    #[arg(long, value_name = "DIR", conflicts_with_all = ["hold_many", "handoff"])]
    pub fsync_floor: Option<PathBuf>,
    /// (internal) one contender of --flock, on this file
    #[arg(long, hide = true, value_name = "FILE")]
    pub flock_child: Option<PathBuf>,
    /// (internal) which contender of --flock this is
    #[arg(long, hide = true, value_name = "I", default_value_t = 0)]
    pub flock_slot: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Exclusive,
    Shared,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    lockd::duration::parse(text)
}

/// Which measurement a run makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Pairs,
    Handoff,
    HoldMany(u64),
}

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Lockd,
    /// Redis at `Settings::socket`.
    Redis,
    /// etcd's lock API at `Settings::etcd`.
    EtcdLock,
    /// flock(2) on a temporary file (`--handoff` only).
    Flock,
}

/// How acquires pick their key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySpace {
    /// Each request slot (connection x depth) has its own key: no contention.
    PerSlot,
    /// Uniformly at random among this many keys.
    Random(u64),
}

/// Everything a run needs, checked.
#[derive(Clone, Debug)]
pub struct Settings {
    pub target: Target,
    /// lockd's socket, or Redis's.
    pub socket: PathBuf,
    pub workload: Workload,
    pub clients: Vec<usize>,
    pub depth: usize,
    pub keys: KeySpace,
    pub mode: Mode,
    pub lease: Option<Duration>,
    pub detach: bool,
    pub duration: Duration,
    pub warmup: Duration,
    pub json: bool,
    pub floor: bool,
    pub rss_watch: Duration,
    pub raw: bool,
    pub namespace: String,
    pub threads: usize,
    pub fsync_floor: Option<PathBuf>,
    /// Key names start with this: `lockd-bench-PID-`.
    pub prefix: String,
    /// etcd's endpoint, with `Target::EtcdLock`.
    pub etcd: Option<String>,
}

impl Args {
    /// Checks the combinations clap cannot express; a bad one exits with a usage error (2).
    pub fn resolve(self) -> Settings {
        match self.check() {
            Ok(s) => s,
            Err(msg) => Args::command()
                .error(ErrorKind::ArgumentConflict, msg)
                .exit(),
        }
    }

    fn check(self) -> Result<Settings, String> {
        let workload = match (self.hold_many, self.handoff) {
            (Some(n), _) => Workload::HoldMany(n),
            (None, true) => Workload::Handoff,
            (None, false) => Workload::Pairs,
        };
        if self.duration.is_zero() {
            return Err("--duration must be more than 0".into());
        }
        if self.lease.is_some_and(|l| l < Duration::from_millis(1)) {
            return Err("--lease must be at least 1ms".into());
        }
        let target = match (&self.redis, self.flock, &self.etcd_lock) {
            (_, _, Some(_)) => Target::EtcdLock,
            (Some(_), _, _) => Target::Redis,
            (None, true, _) => Target::Flock,
            (None, false, None) => Target::Lockd,
        };
        if target == Target::EtcdLock && (self.mode == ModeArg::Shared || self.depth != 1) {
            return Err(
                "--etcd-lock takes exclusive locks one at a time per connection; drop --mode and --depth"
                    .into(),
            );
        }
        if target == Target::Redis && self.mode == ModeArg::Shared {
            return Err("--redis locks are SET NX: exclusive only; drop --mode shared".into());
        }
        lockd_protocol::key::validate_namespace(&self.namespace).map_err(|e| e.to_string())?;
        let mode = match self.mode {
            ModeArg::Exclusive => Mode::Exclusive,
            ModeArg::Shared => Mode::Shared,
        };
        let mut clients: Vec<usize> = self.clients.iter().map(|&c| c as usize).collect();
        match workload {
            Workload::Pairs => {}
            Workload::Handoff => {
                if mode == Mode::Shared {
                    return Err("--handoff needs exclusive holds (shared ones never queue)".into());
                }
                if self.depth != 1 {
                    return Err("--handoff sends one request per connection at a time; \
                                drop --depth"
                        .into());
                }
                if self.keys.is_some_and(|k| k != 1) {
                    return Err("--handoff uses one hot key; drop --keys".into());
                }
                if clients.iter().any(|&c| c < 2) {
                    return Err("--handoff needs --clients 2 or more (someone must queue)".into());
                }
            }
            Workload::HoldMany(n) => {
                if self.keys.is_some() {
                    return Err("--hold-many holds N distinct keys; drop --keys".into());
                }
                if clients.is_empty() {
                    clients.push(n.div_ceil(10_000).max(1) as usize);
                }
            }
        }
        if clients.is_empty() {
            clients.push(if workload == Workload::Handoff { 2 } else { 1 });
        }
        let warmup = self
            .warmup
            .unwrap_or_else(|| (self.duration / 5).min(Duration::from_secs(1)));
        let etcd = self.etcd_lock.clone();
        let socket = match (self.redis, self.socket) {
            (Some(redis), _) => redis,
            (None, Some(socket)) => socket,
            (None, None) => {
                lockd_protocol::paths::client_socket_path().map_err(|e| e.to_string())?
            }
        };
        Ok(Settings {
            target,
            socket,
            workload,
            clients,
            depth: self.depth as usize,
            keys: self.keys.map_or(KeySpace::PerSlot, KeySpace::Random),
            mode,
            lease: self.lease,
            detach: self.detach,
            duration: self.duration,
            warmup,
            json: self.json,
            floor: self.floor,
            rss_watch: self.rss_watch,
            raw: self.raw,
            namespace: self.namespace,
            threads: self.threads as usize,
            fsync_floor: self.fsync_floor,
            prefix: format!("lockd-bench-{}-", std::process::id()),
            etcd,
        })
    }
}

impl Settings {
    /// The name of key number `i`.
    pub fn key_name(&self, i: u64) -> String {
        format!("{}{i}", self.prefix)
    }

    /// The hot key of `--handoff`.
    pub fn hot_key(&self) -> String {
        format!("{}hot", self.prefix)
    }

    /// Lease length in milliseconds, as the protocol carries it.
    pub fn lease_ms(&self) -> Option<u64> {
        self.lease
            .map(|l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX).max(1))
    }

    /// How many keys a measurement with `clients` connections uses.
    pub fn key_count(&self, clients: usize) -> u64 {
        match self.keys {
            KeySpace::PerSlot => (clients * self.depth) as u64,
            KeySpace::Random(k) => k,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let mut v = vec!["lockd-bench"];
        v.extend_from_slice(args);
        Args::try_parse_from(v).map_err(|e| e.to_string())?.check()
    }

    #[test]
    fn defaults() {
        let s = parse(&["--socket", "/x"]).unwrap();
        assert_eq!(s.clients, [1]);
        assert_eq!(s.depth, 1);
        assert_eq!(s.keys, KeySpace::PerSlot);
        assert_eq!(s.duration, Duration::from_secs(5));
        assert_eq!(s.warmup, Duration::from_secs(1));
        assert_eq!(s.workload, Workload::Pairs);
    }

    #[test]
    fn comma_lists_and_durations() {
        let s = parse(&["--clients", "1,64", "--duration", "500ms", "--lease", "30s"]).unwrap();
        assert_eq!(s.clients, [1, 64]);
        assert_eq!(s.warmup, Duration::from_millis(100));
        assert_eq!(s.lease_ms(), Some(30_000));
    }

    #[test]
    fn refused_combinations() {
        assert!(parse(&["--detach"]).is_err(), "detach needs a lease");
        assert!(parse(&["--handoff", "--clients", "1"]).is_err());
        assert!(parse(&["--handoff", "--mode", "shared"]).is_err());
        assert!(parse(&["--floor", "--handoff"]).is_err());
        assert!(parse(&["--hold-many", "10", "--raw"]).is_err());
        assert!(parse(&["--clients", "0"]).is_err());
        assert!(parse(&["--duration", "0"]).is_err());
        assert!(parse(&["--namespace", "Bad NS"]).is_err());
        assert!(parse(&["--redis", "/r", "--detach", "--lease", "1s"]).is_err());
        assert!(parse(&["--redis", "/r", "--mode", "shared"]).is_err());
        assert!(parse(&["--redis", "/r", "--floor"]).is_err());
        assert!(parse(&["--flock"]).is_err(), "flock needs --handoff");
        assert!(parse(&["--fsync-floor", "/d", "--handoff"]).is_err());
    }

    #[test]
    fn targets() {
        assert_eq!(parse(&["--socket", "/l"]).unwrap().target, Target::Lockd);
        let r = parse(&["--socket", "/l", "--redis", "/r"]).unwrap();
        assert_eq!((r.target, r.socket), (Target::Redis, PathBuf::from("/r")));
        let f = parse(&["--handoff", "--flock"]).unwrap();
        assert_eq!((f.target, f.clients), (Target::Flock, vec![2]));
    }

    #[test]
    fn per_workload_client_defaults() {
        assert_eq!(parse(&["--handoff"]).unwrap().clients, [2]);
        assert_eq!(parse(&["--hold-many", "100000"]).unwrap().clients, [10]);
        assert_eq!(parse(&["--hold-many", "5"]).unwrap().clients, [1]);
    }
}
