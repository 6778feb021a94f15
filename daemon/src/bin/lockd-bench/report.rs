//! What lockd-bench prints: the progress line (stderr), and each measurement as a text row or
//! one JSON object (stdout).

use std::io::{IsTerminal, Write};

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use crate::args::{KeySpace, Settings, Target, Workload};
use crate::daemon::Daemon;
use crate::floor::Sizes;
use crate::fsync_floor::FsyncFloor;
use crate::redis::TOKEN_LEN;
use crate::workload::hold_many::HoldMany;
use crate::workload::Window;

/// Latency percentiles in microseconds; `None` without samples.
#[derive(Clone, Copy, Debug, Default)]
pub struct Percentiles {
    pub count: u64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
}

impl Percentiles {
    /// From a histogram of nanoseconds.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let us = |ns: u64| Some(ns as f64 / 1000.0);
        Percentiles {
            count: h.len(),
            p50: us(h.value_at_quantile(0.50)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }

    fn json(&self) -> Value {
        json!({
            "count": self.count,
            "p50": round1(self.p50),
            "p99": round1(self.p99),
            "p999": round1(self.p999),
            "max": round1(self.max),
        })
    }
}

/// One line on stderr, rewritten in place; only when stderr is a terminal.
pub struct Progress {
    enabled: bool,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            enabled: std::io::stderr().is_terminal(),
        }
    }

    pub fn show(&self, line: &str) {
        if self.enabled {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K{line}");
            let _ = err.flush();
        }
    }

    pub fn clear(&self) {
        self.show("");
    }
}

/// Acquires the daemon refused during a measurement.
#[derive(Clone, Copy, Debug, Default)]
pub struct Refusals {
    pub timeout: u64,
    pub deadlock: u64,
    pub conflict: u64,
}

impl Refusals {
    fn any(&self) -> bool {
        self.timeout + self.deadlock + self.conflict > 0
    }
}

/// The floor measured beside a pairs measurement.
#[derive(Clone, Copy, Debug)]
pub struct Floor {
    pub window: Window,
    pub acquire: Percentiles,
    pub sizes: Sizes,
}

/// One pairs or handoff measurement.
#[derive(Clone, Debug)]
pub struct Measurement {
    pub clients: usize,
    pub window: Window,
    pub acquire: Percentiles,
    /// Release-to-next-grant (`--handoff` only).
    pub handoff: Option<Percentiles>,
    pub refused: Refusals,
    /// Daemon CPU seconds used during the window.
    pub daemon_cpu_secs: Option<f64>,
    pub floor: Option<Floor>,
    pub fsync_floor: Option<FsyncFloor>,
}

impl Measurement {
    fn per_sec(w: &Window) -> f64 {
        if w.secs > 0.0 {
            w.pairs as f64 / w.secs
        } else {
            0.0
        }
    }

    fn ratio(&self) -> Option<f64> {
        let floor = Self::per_sec(&self.floor?.window);
        (floor > 0.0).then(|| Self::per_sec(&self.window) / floor)
    }

    /// pairs/s over half the syncs/s: a pair commits twice (acquire and release).
    fn sync_ratio(&self) -> Option<f64> {
        let half = self.fsync_floor?.syncs_per_sec() / 2.0;
        (half > 0.0).then(|| Self::per_sec(&self.window) / half)
    }

    fn cpu_us_per_pair(&self) -> Option<f64> {
        let cpu = self.daemon_cpu_secs?;
        (self.window.pairs > 0).then(|| cpu * 1e6 / self.window.pairs as f64)
    }
}

/// Prints measurements as text or JSON.
pub struct Report<'a> {
    s: &'a Settings,
    daemon: &'a Daemon,
    out: std::io::Stdout,
}

fn driver(s: &Settings) -> &'static str {
    match s.target {
        Target::Redis => "resp",
        Target::EtcdLock => "etcd-client",
        Target::Flock => "flock",
        Target::Lockd if s.raw => "raw",
        Target::Lockd => "client",
    }
}

fn target_name(t: Target) -> &'static str {
    match t {
        Target::Lockd => "lockd",
        Target::Redis => "redis",
        Target::EtcdLock => "etcd",
        Target::Flock => "flock",
    }
}

/// Whether pairs commit (so the fsync floor's ratio means something).
fn durable(s: &Settings) -> bool {
    s.detach || s.target == Target::Redis
}

fn round1(v: Option<f64>) -> Option<f64> {
    v.map(|v| (v * 10.0).round() / 10.0)
}

fn round3(v: Option<f64>) -> Option<f64> {
    v.map(|v| (v * 1000.0).round() / 1000.0)
}

fn opt(v: Option<f64>, width: usize, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:>width$.decimals$}"),
        None => format!("{:>width$}", "-"),
    }
}

impl<'a> Report<'a> {
    pub fn new(s: &'a Settings, daemon: &'a Daemon) -> Report<'a> {
        Report {
            s,
            daemon,
            out: std::io::stdout(),
        }
    }

    fn line(&self, text: &str) {
        let mut out = self.out.lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }

    /// The text header: what is measured, and the column names.
    pub fn header(&self) {
        if self.s.json {
            return;
        }
        let s = self.s;
        let pid = self
            .daemon
            .pid
            .map_or_else(|| "pid unknown".to_string(), |p| format!("pid {p}"));
        let px = s.lease_ms().unwrap_or(30_000);
        let mut what = match (s.target, s.raw, s.workload) {
            (Target::Flock, _, _) => {
                "handoff between processes on a file in a temporary directory".to_string()
            }
            (Target::Redis, _, Workload::HoldMany(n)) => {
                format!("holding {n} keys (SET NX PX {px}, {TOKEN_LEN}-byte tokens)")
            }
            (Target::Redis, _, _) => {
                format!("SET NX PX {px} + compare-and-delete (EVALSHA) pairs, hand-encoded RESP")
            }
            (Target::EtcdLock, _, _) => {
                "Lock (with a session lease) + Unlock pairs, etcd-client".to_string()
            }
            (_, _, Workload::HoldMany(n)) => format!("holding {n} locks"),
            (_, true, Workload::Handoff) => "handoff on one hot key, raw frames".to_string(),
            (_, false, Workload::Handoff) => "handoff on one hot key, client crate".to_string(),
            (_, true, Workload::Pairs) => "acquire+release pairs, raw frames".to_string(),
            (_, false, Workload::Pairs) => "acquire+release pairs, client crate".to_string(),
        };
        if s.target == Target::Lockd {
            what.push_str(&format!(", {}", s.mode.as_str()));
        }
        if let Some(l) = s.lease.filter(|_| s.target == Target::Lockd) {
            what.push_str(&format!(
                ", {} lease of {:?}",
                if s.detach { "detached" } else { "session" },
                l
            ));
        }
        self.line(&match s.target {
            Target::Flock => format!("flock(2): {what}"),
            Target::EtcdLock => format!(
                "etcd {} at {}: {what}",
                self.daemon.server_version,
                s.etcd.as_deref().unwrap_or_default()
            ),
            Target::Lockd | Target::Redis => format!(
                "{} {} at {} ({pid}): {what}",
                target_name(s.target),
                self.daemon.server_version,
                s.socket.display()
            ),
        });
        match s.workload {
            Workload::HoldMany(_) => {}
            Workload::Pairs | Workload::Handoff => self.line(&format!(
                "{:.1} s per measurement after {:.1} s of warm-up; latencies in microseconds",
                s.duration.as_secs_f64(),
                s.warmup.as_secs_f64()
            )),
        }
        match s.workload {
            Workload::Pairs => {
                let mut cols = format!(
                    "{:>7} {:>5} {:>8} {:>10} {:>9} {:>9} {:>9} {:>9}",
                    "clients", "depth", "keys", "pairs/s", "acq p50", "acq p99", "p99.9", "max"
                );
                if s.floor {
                    cols.push_str(&format!(" {:>10} {:>6}", "floor/s", "ratio"));
                }
                if s.fsync_floor.is_some() {
                    cols.push_str(&format!(" {:>9}", "syncs/s"));
                    if durable(s) {
                        cols.push_str(&format!(" {:>7}", "vs sync"));
                    }
                }
                cols.push_str(&format!(" {:>12}", "cpu us/pair"));
                self.line(&cols);
            }
            Workload::Handoff => self.line(&format!(
                "{:>7} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9}",
                if s.target == Target::Flock {
                    "procs"
                } else {
                    "clients"
                },
                "handoffs",
                "hand p50",
                "hand p99",
                "p99.9",
                "pairs/s",
                "acq p50",
                "acq p99"
            )),
            Workload::HoldMany(_) => {}
        }
    }

    /// Common JSON fields.
    fn base(&self, workload: &str, clients: usize) -> Map<String, Value> {
        let s = self.s;
        let mut m = Map::new();
        m.insert("target".into(), json!(target_name(s.target)));
        m.insert("workload".into(), json!(workload));
        m.insert("socket".into(), json!(s.socket.display().to_string()));
        m.insert("server_version".into(), json!(self.daemon.server_version));
        m.insert("daemon_pid".into(), json!(self.daemon.pid));
        m.insert("clients".into(), json!(clients));
        m.insert("mode".into(), json!(s.mode.as_str()));
        m.insert("lease_ms".into(), json!(s.lease_ms()));
        m.insert("detach".into(), json!(s.detach));
        m
    }

    fn timed(&self, m: &mut Map<String, Value>, meas: &Measurement) {
        let s = self.s;
        m.insert("driver".into(), json!(driver(s)));
        m.insert("warmup_s".into(), json!(s.warmup.as_secs_f64()));
        m.insert("duration_s".into(), json!(meas.window.secs));
        m.insert("pairs".into(), json!(meas.window.pairs));
        m.insert(
            "pairs_per_sec".into(),
            json!(Measurement::per_sec(&meas.window).round()),
        );
        m.insert("acquire_us".into(), meas.acquire.json());
        m.insert(
            "refused".into(),
            json!({
                "timeout": meas.refused.timeout,
                "deadlock": meas.refused.deadlock,
                "conflict": meas.refused.conflict,
            }),
        );
        m.insert(
            "daemon_cpu_us_per_pair".into(),
            json!(round1(meas.cpu_us_per_pair())),
        );
    }

    fn emit(&self, m: Map<String, Value>) {
        self.line(&Value::Object(m).to_string());
    }

    fn refusals(&self, r: &Refusals) {
        if r.any() && !self.s.json {
            self.line(&format!(
                "        refused (not counted as pairs): {} timeouts, {} deadlocks, {} conflicts",
                r.timeout, r.deadlock, r.conflict
            ));
        }
    }

    pub fn pairs(&self, meas: &Measurement) {
        let s = self.s;
        if s.json {
            let mut m = self.base("pairs", meas.clients);
            m.insert("depth".into(), json!(s.depth));
            m.insert("keys".into(), json!(s.key_count(meas.clients)));
            let choice = match s.keys {
                KeySpace::PerSlot => "per-slot",
                KeySpace::Random(_) => "random",
            };
            m.insert("key_choice".into(), json!(choice));
            self.timed(&mut m, meas);
            if let Some(f) = &meas.floor {
                m.insert(
                    "floor".into(),
                    json!({
                        "duration_s": f.window.secs,
                        "pairs": f.window.pairs,
                        "pairs_per_sec": Measurement::per_sec(&f.window).round(),
                        "acquire_us": f.acquire.json(),
                        "frame_bytes": {
                            "acquire": f.sizes.acquire,
                            "granted": f.sizes.granted,
                            "release": f.sizes.release,
                            "released": f.sizes.released,
                        },
                    }),
                );
                m.insert("ratio".into(), json!(round3(meas.ratio())));
            }
            if let Some(f) = &meas.fsync_floor {
                let dir = s.fsync_floor.as_deref().unwrap_or(std::path::Path::new(""));
                m.insert(
                    "fsync_floor".into(),
                    json!({
                        "dir": dir.display().to_string(),
                        "block_bytes": crate::fsync_floor::BLOCK,
                        "duration_s": f.window.secs,
                        "syncs": f.window.pairs,
                        "syncs_per_sec": f.syncs_per_sec().round(),
                        "sync_us": f.latency.json(),
                    }),
                );
                if durable(s) {
                    m.insert("sync_ratio".into(), json!(round3(meas.sync_ratio())));
                }
            }
            return self.emit(m);
        }
        let keys = match s.keys {
            KeySpace::PerSlot => "per-slot".to_string(),
            KeySpace::Random(k) => k.to_string(),
        };
        let a = &meas.acquire;
        let mut row = format!(
            "{:>7} {:>5} {:>8} {:>10.0} {} {} {} {}",
            meas.clients,
            s.depth,
            keys,
            Measurement::per_sec(&meas.window),
            opt(a.p50, 9, 1),
            opt(a.p99, 9, 1),
            opt(a.p999, 9, 1),
            opt(a.max, 9, 0),
        );
        if let Some(f) = &meas.floor {
            row.push_str(&format!(
                " {:>10.0} {}",
                Measurement::per_sec(&f.window),
                opt(meas.ratio(), 6, 3)
            ));
        }
        if let Some(f) = &meas.fsync_floor {
            row.push_str(&format!(" {:>9.0}", f.syncs_per_sec()));
            if durable(s) {
                row.push_str(&format!(" {}", opt(meas.sync_ratio(), 7, 3)));
            }
        }
        row.push_str(&format!(" {}", opt(meas.cpu_us_per_pair(), 12, 1)));
        self.line(&row);
        if let Some(f) = &meas.floor {
            self.line(&format!(
                "        floor: echo server, same frames ({}+{} and {}+{} bytes), acquire p50 {} us",
                f.sizes.acquire,
                f.sizes.granted,
                f.sizes.release,
                f.sizes.released,
                opt(f.acquire.p50, 0, 1)
            ));
        }
        if let Some(f) = &meas.fsync_floor {
            let dir = s.fsync_floor.as_deref().unwrap_or(std::path::Path::new(""));
            self.line(&format!(
                "        fsync floor: {} B overwrite + fdatasync in {}, p50 {} us",
                crate::fsync_floor::BLOCK,
                dir.display(),
                opt(f.latency.p50, 0, 1)
            ));
        }
        self.refusals(&meas.refused);
    }

    pub fn handoff(&self, meas: &Measurement) {
        let h = meas.handoff.unwrap_or_default();
        if self.s.json {
            let mut m = self.base("handoff", meas.clients);
            if self.s.target == Target::Lockd {
                m.insert("key".into(), json!(self.s.hot_key()));
            }
            self.timed(&mut m, meas);
            m.insert("handoffs".into(), json!(h.count));
            m.insert("handoff_us".into(), h.json());
            return self.emit(m);
        }
        let a = &meas.acquire;
        self.line(&format!(
            "{:>7} {:>9} {} {} {} {:>10.0} {} {}",
            meas.clients,
            h.count,
            opt(h.p50, 9, 1),
            opt(h.p99, 9, 1),
            opt(h.p999, 9, 1),
            Measurement::per_sec(&meas.window),
            opt(a.p50, 9, 1),
            opt(a.p99, 9, 1),
        ));
        self.refusals(&meas.refused);
    }

    pub fn hold_many(&self, r: &HoldMany) {
        let growth = match (r.rss_held_kib, r.rss_connected_kib) {
            (Some(h), Some(c)) if r.holds > 0 => {
                Some(h.saturating_sub(c) as f64 * 1024.0 / r.holds as f64)
            }
            _ => None,
        };
        let rate = |secs: f64| {
            if secs > 0.0 {
                r.holds as f64 / secs
            } else {
                0.0
            }
        };
        if self.s.json {
            let mut m = self.base("hold-many", r.clients);
            m.insert("holds".into(), json!(r.holds));
            m.insert(
                "rss_kib".into(),
                json!({
                    "idle": r.rss_idle_kib,
                    "connected": r.rss_connected_kib,
                    "held": r.rss_held_kib,
                    "peak": r.rss_peak_kib,
                }),
            );
            let after: Vec<Value> = r
                .rss_after_release_kib
                .iter()
                .map(|(t, kib)| json!({"t_s": (t * 10.0).round() / 10.0, "kib": kib}))
                .collect();
            m.insert("rss_after_release".into(), Value::Array(after));
            m.insert("bytes_per_hold".into(), json!(growth.map(f64::round)));
            m.insert("acquire_s".into(), json!(r.acquire_secs));
            m.insert("release_s".into(), json!(r.release_secs));
            m.insert(
                "acquires_per_sec".into(),
                json!(rate(r.acquire_secs).round()),
            );
            return self.emit(m);
        }
        let mib = |k: Option<u64>| {
            k.map_or_else(
                || "unreadable".to_string(),
                |k| format!("{:.1} MiB", k as f64 / 1024.0),
            )
        };
        self.line(&format!("  RSS idle              {}", mib(r.rss_idle_kib)));
        self.line(&format!(
            "  RSS connected         {}  ({} connections)",
            mib(r.rss_connected_kib),
            r.clients
        ));
        self.line(&format!(
            "  RSS holding           {}  ({} locks{}); peak {}",
            mib(r.rss_held_kib),
            r.holds,
            growth.map_or_else(String::new, |g| format!(", {g:.0} bytes per lock")),
            mib(r.rss_peak_kib)
        ));
        self.line(&format!(
            "  acquired in {:.2} s ({:.0}/s), released in {:.2} s",
            r.acquire_secs,
            rate(r.acquire_secs),
            r.release_secs
        ));
        let after: Vec<String> = r
            .rss_after_release_kib
            .iter()
            .map(|(t, k)| format!("{t:.0} s {}", mib(Some(*k))))
            .collect();
        if after.is_empty() {
            self.line("  RSS after release     unreadable");
        } else {
            self.line(&format!("  RSS after release     {}", after.join(", ")));
        }
        if self.daemon.pid.is_none() {
            self.line("  (the kernel did not name the daemon's pid: another pid namespace?)");
        }
    }
}
