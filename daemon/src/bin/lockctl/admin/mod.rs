//! `lockctl describe`, `list`, `force-release`, `watch`, `stats`, `metrics`: seeing and fixing
//! what the daemon holds.

use std::path::Path;

use clap::Args;
use lockd_client::{Change, Description, Key, Stats};
use serde_json::json;

use crate::{exit, output};

#[derive(Args, Debug)]
pub struct KeyArgs {
    /// Lock name
    pub name: String,
    /// Lock namespace
    #[arg(long, value_name = "NS", default_value = lockd_protocol::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  lockctl describe nightly-backup\n  lockctl describe --json --namespace ops deploy | jq '.holders[0].pid'"
)]
pub struct DescribeArgs {
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Args, Debug)]
#[command(after_help = "Example:\n  lockctl list --namespace ops --prefix deploy-")]
pub struct ListArgs {
    /// Only this namespace [default: every namespace you may use]
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// Only names starting with this
    #[arg(long, value_name = "P", default_value = "")]
    pub prefix: String,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
#[command(after_help = "Example:\n  lockctl force-release stuck-job")]
pub struct ForceArgs {
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Args, Debug)]
#[command(after_help = "Example:\n  lockctl watch leader --json | while read -r ev; do ...; done")]
pub struct WatchArgs {
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Args, Debug)]
#[command(after_help = "Example:\n  lockctl stats --json | jq .gauges.holds")]
pub struct StatsArgs {
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

fn key(name: &str, namespace: &str) -> Result<Key, u8> {
    Key::new(namespace, name).map_err(|e| {
        eprintln!("lockctl: {e}");
        exit::USAGE
    })
}

pub async fn describe(socket: &Path, args: DescribeArgs) -> u8 {
    let k = match key(&args.key.name, &args.key.namespace) {
        Ok(k) => k,
        Err(c) => return c,
    };
    let client = match crate::connect(socket, "describe").await {
        Ok(c) => c,
        Err(c) => return c,
    };
    match client.describe(&k).await {
        Ok(d) if args.key.json => {
            println!("{}", describe_json(&d));
            0
        }
        Ok(d) => {
            print_description(&d);
            0
        }
        Err(e) => exit::report(&e),
    }
}

fn describe_json(d: &Description) -> serde_json::Value {
    json!({
        "namespace": d.key.namespace,
        "name": d.key.name,
        "holders": d.holders.iter().map(|h| json!({
            "mode": h.mode.as_str(),
            "fence": h.fence,
            "pid": h.owner.pid,
            "uid": h.owner.uid,
            "gid": h.owner.gid,
            "client": h.owner.client_name,
            "acquired_at_ms": h.acquired_at_ms,
            "expires_at_ms": h.expires_at_ms,
            "detached": h.detached,
            "data": output::data(&h.data),
        })).collect::<Vec<_>>(),
        "waiters": d.waiters.iter().map(|w| json!({
            "mode": w.mode.as_str(),
            "pid": w.owner.pid,
            "uid": w.owner.uid,
            "gid": w.owner.gid,
            "client": w.owner.client_name,
            "since_ms": w.since_ms,
        })).collect::<Vec<_>>(),
        "omitted_holders": d.omitted_holders,
        "omitted_waiters": d.omitted_waiters,
        "permits": d.permits,
        "delayed_until_ms": d.delayed_until_ms,
    })
}

fn pid(p: Option<i32>) -> String {
    p.map_or_else(|| "-".into(), |p| p.to_string())
}

/// A peer-supplied string made safe for a terminal (the shared rule of
/// [`lockd_protocol::display`]): control characters shown escaped, the rest unchanged.
fn printable(s: &str) -> String {
    lockd_protocol::display::escape(s).into_owned()
}

/// `2024-05-01 12:00:03.250 UTC` for milliseconds since the Unix epoch.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03} UTC",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}

/// `... and 12 more holders (...)` when the daemon left `n` of them out, else nothing.
fn print_omitted(n: u32, singular: &str, plural: &str) {
    if n > 0 {
        let what = if n == 1 { singular } else { plural };
        println!("... and {n} more {what} (not shown: the answer must fit one frame)");
    }
}

fn print_description(d: &Description) {
    println!(
        "{}: {} holder(s), {} waiter(s)",
        d.key,
        d.holders.len() + d.omitted_holders as usize,
        d.waiters.len() + d.omitted_waiters as usize
    );
    if let Some(n) = d.permits {
        let taken = d.holders.len() + d.omitted_holders as usize;
        println!("semaphore: {taken} of {n} permits taken");
    }
    if let Some(until) = d.delayed_until_ms {
        println!(
            "lock-delay until {} ({}): nobody is granted before then",
            utc(until),
            output::relative(until)
        );
    }
    if !d.holders.is_empty() {
        let rows: Vec<Vec<String>> = d
            .holders
            .iter()
            .map(|h| {
                vec![
                    h.mode.as_str().into(),
                    h.fence.to_string(),
                    pid(h.owner.pid),
                    h.owner.uid.to_string(),
                    printable(&h.owner.client_name),
                    output::relative(h.acquired_at_ms),
                    h.expires_at_ms.map_or_else(|| "-".into(), output::relative),
                    output::data(&h.data),
                ]
            })
            .collect();
        println!();
        output::table(
            &[
                "MODE", "FENCE", "PID", "UID", "CLIENT", "ACQUIRED", "EXPIRES", "DATA",
            ],
            &rows,
        );
    }
    print_omitted(d.omitted_holders, "holder", "holders");
    if !d.waiters.is_empty() {
        let rows: Vec<Vec<String>> = d
            .waiters
            .iter()
            .enumerate()
            .map(|(i, w)| {
                vec![
                    (i + 1).to_string(),
                    w.mode.as_str().into(),
                    pid(w.owner.pid),
                    w.owner.uid.to_string(),
                    printable(&w.owner.client_name),
                    output::relative(w.since_ms),
                ]
            })
            .collect();
        println!();
        output::table(
            &["#", "MODE", "PID", "UID", "CLIENT", "WAITING SINCE"],
            &rows,
        );
    }
    print_omitted(d.omitted_waiters, "waiter", "waiters");
}

pub async fn list(socket: &Path, args: ListArgs) -> u8 {
    let client = match crate::connect(socket, "list").await {
        Ok(c) => c,
        Err(c) => return c,
    };
    let keys = match client.list(args.namespace.as_deref(), &args.prefix).await {
        Ok(k) => k,
        Err(e) => return exit::report(&e),
    };
    if args.json {
        let v: Vec<_> = keys
            .iter()
            .map(|k| {
                json!({
                    "namespace": k.key.namespace,
                    "name": k.key.name,
                    "mode": k.mode.map(|m| m.as_str()),
                    "holders": k.holders,
                    "waiters": k.waiters,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return 0;
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                printable(&k.key.namespace),
                printable(&k.key.name),
                k.mode.map_or("-", |m| m.as_str()).into(),
                k.holders.to_string(),
                k.waiters.to_string(),
            ]
        })
        .collect();
    output::table(&["NAMESPACE", "NAME", "MODE", "HOLDERS", "WAITERS"], &rows);
    0
}

pub async fn force_release(socket: &Path, args: ForceArgs) -> u8 {
    let k = match key(&args.key.name, &args.key.namespace) {
        Ok(k) => k,
        Err(c) => return c,
    };
    let client = match crate::connect(socket, "force-release").await {
        Ok(c) => c,
        Err(c) => return c,
    };
    match client.force_release(&k).await {
        Ok(n) if args.key.json => {
            println!(
                "{}",
                json!({ "namespace": k.namespace, "name": k.name, "ended": n })
            );
            0
        }
        Ok(n) => {
            println!("{k}: ended {n} hold(s)");
            0
        }
        Err(e) => exit::report(&e),
    }
}

pub async fn watch(socket: &Path, args: WatchArgs) -> u8 {
    let k = match key(&args.key.name, &args.key.namespace) {
        Ok(k) => k,
        Err(c) => return c,
    };
    let client = match crate::connect(socket, "watch").await {
        Ok(c) => c,
        Err(c) => return c,
    };
    let mut events = match client.watch(&k).await {
        Ok(w) => w,
        Err(e) => return exit::report(&e),
    };
    use std::io::Write;
    let mut stdout = std::io::stdout();
    while let Some(change) = events.next().await {
        let at = output::now_ms();
        let line = if args.key.json {
            change_json(&k, &change, at).to_string()
        } else {
            change_line(&change)
        };
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return 0; // the reader went away (e.g. `| head`)
        }
    }
    eprintln!("lockctl: the connection to lockd was lost");
    exit::UNAVAILABLE
}

fn change_line(c: &Change) -> String {
    match c {
        Change::Granted { fence, mode, owner } => format!(
            "granted  fence={fence} mode={} pid={} uid={} client={:?}",
            mode.as_str(),
            pid(owner.pid),
            owner.uid,
            owner.client_name
        ),
        Change::Deadlock { owner, cycle } => format!(
            "deadlock refused pid={} uid={} client={:?}: {}",
            pid(owner.pid),
            owner.uid,
            owner.client_name,
            printable(cycle)
        ),
        other => format!("{:<8} fence={}", other.kind(), other.fence()),
    }
}

fn change_json(k: &Key, c: &Change, at_ms: u64) -> serde_json::Value {
    let mut v = json!({
        "event": c.kind(),
        "namespace": k.namespace,
        "name": k.name,
        "fence": c.fence(),
        "at_ms": at_ms,
    });
    match c {
        Change::Granted { mode, owner, .. } => {
            v["mode"] = json!(mode.as_str());
            v["pid"] = json!(owner.pid);
            v["uid"] = json!(owner.uid);
            v["client"] = json!(owner.client_name);
        }
        Change::Deadlock { owner, cycle } => {
            // No hold is involved: the refused request never got a fence.
            v["fence"] = serde_json::Value::Null;
            v["pid"] = json!(owner.pid);
            v["uid"] = json!(owner.uid);
            v["client"] = json!(owner.client_name);
            v["cycle"] = json!(cycle);
        }
        _ => {}
    }
    v
}

pub async fn stats(socket: &Path, args: StatsArgs) -> u8 {
    let client = match crate::connect(socket, "stats").await {
        Ok(c) => c,
        Err(c) => return c,
    };
    let s = match client.stats().await {
        Ok(s) => s,
        Err(e) => return exit::report(&e),
    };
    if args.json {
        let counters: serde_json::Map<_, _> = s
            .counters
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        let gauges: serde_json::Map<_, _> = s
            .gauges
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        let hist = |h: &lockd_protocol::Histogram| json!({ "bounds_ms": h.bounds_ms, "counts": h.counts, "sum_ms": h.sum_ms });
        println!(
            "{}",
            json!({
                "uptime_ms": s.uptime_ms,
                "counters": counters,
                "gauges": gauges,
                "wait_ms": hist(&s.wait_ms),
                "hold_ms": hist(&s.hold_ms),
            })
        );
        return 0;
    }
    let mut rows = vec![vec!["uptime".to_string(), output::duration(s.uptime_ms)]];
    rows.extend(
        s.gauges
            .iter()
            .map(|(k, v)| vec![printable(k), v.to_string()]),
    );
    rows.extend(
        s.counters
            .iter()
            .map(|(k, v)| vec![format!("{} (total)", printable(k)), v.to_string()]),
    );
    for (name, h) in [("wait", &s.wait_ms), ("hold", &s.hold_ms)] {
        let n: u64 = h.counts.iter().sum();
        let mean = h.sum_ms.checked_div(n).unwrap_or(0);
        rows.push(vec![
            format!("{name} time"),
            format!("{n} observed, mean {}", output::duration(mean)),
        ]);
    }
    output::table(&["NAME", "VALUE"], &rows);
    0
}

pub async fn metrics(socket: &Path) -> u8 {
    let client = match crate::connect(socket, "metrics").await {
        Ok(c) => c,
        Err(c) => return c,
    };
    match client.stats().await {
        Ok(s) => {
            print!("{}", prometheus(&s));
            0
        }
        Err(e) => exit::report(&e),
    }
}

/// Prometheus text exposition format (valid for the node_exporter textfile collector).
pub fn prometheus(s: &Stats) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP lockd_uptime_seconds Seconds since lockd started."
    );
    let _ = writeln!(out, "# TYPE lockd_uptime_seconds gauge");
    let _ = writeln!(out, "lockd_uptime_seconds {}", s.uptime_ms as f64 / 1000.0);
    for (name, v) in &s.counters {
        let name = metric_name(name);
        let _ = writeln!(
            out,
            "# HELP lockd_{name}_total Count of {} since start.",
            name.replace('_', " ")
        );
        let _ = writeln!(out, "# TYPE lockd_{name}_total counter");
        let _ = writeln!(out, "lockd_{name}_total {v}");
    }
    for (name, v) in &s.gauges {
        let name = metric_name(name);
        let _ = writeln!(
            out,
            "# HELP lockd_{name} Current number of {}.",
            name.replace('_', " ")
        );
        let _ = writeln!(out, "# TYPE lockd_{name} gauge");
        let _ = writeln!(out, "lockd_{name} {v}");
    }
    for (name, help, h) in [
        (
            "wait",
            "Time requests waited in a queue before their grant.",
            &s.wait_ms,
        ),
        (
            "hold",
            "Time holds were held before they ended.",
            &s.hold_ms,
        ),
    ] {
        let _ = writeln!(out, "# HELP lockd_{name}_seconds {help}");
        let _ = writeln!(out, "# TYPE lockd_{name}_seconds histogram");
        let mut cumulative = 0;
        for (bound, count) in h.bounds_ms.iter().zip(&h.counts) {
            cumulative += count;
            let le = *bound as f64 / 1000.0;
            let _ = writeln!(
                out,
                "lockd_{name}_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        let total: u64 = h.counts.iter().sum();
        let _ = writeln!(out, "lockd_{name}_seconds_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "lockd_{name}_seconds_sum {}", h.sum_ms as f64 / 1000.0);
        let _ = writeln!(out, "lockd_{name}_seconds_count {total}");
    }
    out
}

/// A statistic's name as a Prometheus metric name part: `[a-zA-Z0-9_]`, anything else `_` (the
/// names come from the daemon; none may add a line or a label to the exposition).
fn metric_name(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests;
