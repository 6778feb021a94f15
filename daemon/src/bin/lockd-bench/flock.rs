//! `--flock --handoff`: the handoff measured on flock(2), the kernel's own lock, as the floor
//! for lockd's: `--clients` processes (lockd-bench itself, run with a hidden `--flock-child
//! FILE`) loop flock(LOCK_EX) + flock(LOCK_UN) on one file in a private temporary directory.
//!
//! The processes alternate, as lockd's clients queued on one key do: a holder releases only
//! once another process is blocked in flock(2) on the file (listed as a waiter in /proc/locks;
//! the holder yields the CPU while it looks), so that every release wakes a sleeping waiter.
//! Without that, flock(2)'s critical section is so short that nobody is ever waiting, and the
//! releaser takes the lock straight back. flock(2) is also not fair, so after a release the
//! releaser asks again only once the waiter has the lock (it clears the release stamp).
//!
//! The file carries what the processes share, as 8-byte words: the last release's stamp
//! (CLOCK_MONOTONIC nanoseconds, written by the holder just before LOCK_UN, as lockd's handoff
//! stamps just before sending the release), the phase (warm-up, recording, stop; written by
//! the parent), the number of processes, then one word per process: since when it asks (0:
//! it does not). As with lockd, only grants of flock calls made before that release count as
//! handoffs. Each child prints its pair count and histograms (value count lines) to its own
//! output file, which the parent merges.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::args::Settings;
use crate::floor::private_temp_dir;
use crate::report::{Measurement, Percentiles, Progress, Refusals};
use crate::workload::{new_histogram, Window};
use crate::Failure;

const PHASE_WARMUP: u64 = 0;
const PHASE_RECORDING: u64 = 1;
const PHASE_STOP: u64 = 2;

/// Offsets in the shared file.
const AT_RELEASED: u64 = 0;
const AT_PHASE: u64 = 8;
const AT_PROCESSES: u64 = 16;
/// Process `i`'s word is at `AT_ASKING + 8 * i`.
const AT_ASKING: u64 = 24;

/// How long the children may take to see the stop and exit.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process of the machine.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for writes; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// flock(2), retried on EINTR.
fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: the descriptor is open for the duration of the call.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn read_u64(file: &File, at: u64) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, at)?;
    Ok(u64::from_le_bytes(b))
}

/// The hidden `--flock-child FILE --flock-slot I`: contends until the phase says stop, then
/// prints its counts.
pub fn child(path: &Path, slot: u64) -> ExitCode {
    match contend(path, slot) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lockd-bench --flock-child: {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

/// Whether another process is blocked in flock(2) on the file (the kernel lists it in
/// /proc/locks as a waiter, `->`, on the file's inode), or the phase is stop. Only a blocked
/// waiter makes a release a handoff: a process that announced itself but has not entered the
/// kernel yet would take a free lock without being woken, which measures nothing.
fn someone_waits(file: &File, inode: u64, buf: &mut String) -> std::io::Result<bool> {
    if read_u64(file, AT_PHASE)? == PHASE_STOP {
        return Ok(true);
    }
    buf.clear();
    std::io::Read::read_to_string(&mut File::open("/proc/locks")?, buf)?;
    let suffix = format!(":{inode}");
    Ok(buf.lines().any(|line| {
        line.contains("->")
            && line
                .split_whitespace()
                .any(|field| field.ends_with(&suffix))
    }))
}

fn contend(path: &Path, slot: u64) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let processes = read_u64(&file, AT_PROCESSES)?;
    if slot >= processes {
        return Err(std::io::Error::other(format!(
            "slot {slot} of {processes} processes"
        )));
    }
    let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata()?);
    let mut locks = String::new();
    let (mut acquire, mut handoff) = (new_histogram(), new_histogram());
    let mut pairs = 0u64;
    loop {
        let asked = mono_ns();
        file.write_all_at(&asked.to_le_bytes(), AT_ASKING + 8 * slot)?;
        flock(&file, libc::LOCK_EX)?;
        let granted = mono_ns();
        let released = read_u64(&file, AT_RELEASED)?;
        // Tells the releaser the lock changed hands (see below).
        file.write_all_at(&[0; 8], AT_RELEASED)?;
        let phase = read_u64(&file, AT_PHASE)?;
        file.write_all_at(&[0; 8], AT_ASKING + 8 * slot)?;
        if phase == PHASE_STOP {
            flock(&file, libc::LOCK_UN)?;
            break;
        }
        if phase == PHASE_RECORDING {
            acquire.saturating_record(granted.saturating_sub(asked).max(1));
            if released > asked {
                handoff.saturating_record(granted.saturating_sub(released).max(1));
            }
            pairs += 1;
        }
        while !someone_waits(&file, inode, &mut locks)? {
            std::thread::yield_now();
        }
        file.write_all_at(&mono_ns().to_le_bytes(), AT_RELEASED)?;
        flock(&file, libc::LOCK_UN)?;
        // flock(2) is not fair: asking again at once would usually take the lock back before
        // the woken waiter runs. Wait until it has the lock, so the processes alternate.
        while read_u64(&file, AT_RELEASED)? != 0 && read_u64(&file, AT_PHASE)? != PHASE_STOP {
            std::thread::yield_now();
        }
    }
    let mut out = format!("pairs {pairs}\n");
    for (tag, h) in [("a", &acquire), ("h", &handoff)] {
        for v in h.iter_recorded() {
            out.push_str(&format!(
                "{tag} {} {}\n",
                v.value_iterated_to(),
                v.count_at_value()
            ));
        }
    }
    std::io::Write::write_all(&mut std::io::stdout().lock(), out.as_bytes())
}

/// The children; killed and reaped if still running when dropped. The directory goes too.
struct Contenders {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for Contenders {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One handoff measurement with `clients` processes (blocking; run it off the runtime).
pub fn measure(s: &Settings, clients: usize, progress: &Progress) -> Result<Measurement, Failure> {
    let fail = |what: &str, e: std::io::Error| Failure::Run(format!("--flock: {what}: {e}"));
    let exe = std::env::current_exe().map_err(|e| fail("cannot find lockd-bench itself", e))?;
    let dir = private_temp_dir().map_err(|e| fail("temporary directory", e))?;
    let mut run = Contenders {
        dir,
        children: Vec::with_capacity(clients),
    };
    let path = run.dir.join("lock");
    let file = File::create(&path).map_err(|e| fail("cannot create the lock file", e))?;
    let set_phase = |phase: u64| {
        file.write_all_at(&phase.to_le_bytes(), AT_PHASE)
            .map_err(|e| fail("cannot write the lock file", e))
    };
    let mut header = vec![0u8; 24 + 8 * clients];
    header[16..24].copy_from_slice(&(clients as u64).to_le_bytes());
    file.write_all_at(&header, AT_RELEASED)
        .map_err(|e| fail("cannot write the lock file", e))?;
    set_phase(PHASE_WARMUP)?;
    for i in 0..clients {
        progress.show(&format!("flock, {clients} processes: starting {i}"));
        let out = File::create(run.dir.join(format!("child-{i}.out")))
            .map_err(|e| fail("cannot create a child's output file", e))?;
        let child = Command::new(&exe)
            .arg("--flock-child")
            .arg(&path)
            .arg("--flock-slot")
            .arg(i.to_string())
            .stdin(Stdio::null())
            .stdout(out)
            .spawn()
            .map_err(|e| fail("cannot start a contender", e))?;
        run.children.push(child);
    }
    let label = format!("flock, {clients} processes");
    progress.show(&format!("{label}: warming up"));
    std::thread::sleep(s.warmup);
    set_phase(PHASE_RECORDING)?;
    let start = Instant::now();
    while start.elapsed() < s.duration {
        progress.show(&format!(
            "{label}: {:.0} s of {:.0} s",
            start.elapsed().as_secs_f64(),
            s.duration.as_secs_f64()
        ));
        std::thread::sleep(
            s.duration
                .saturating_sub(start.elapsed())
                .min(Duration::from_secs(1)),
        );
    }
    set_phase(PHASE_STOP)?;
    let secs = start.elapsed().as_secs_f64();
    progress.show(&format!("{label}: finishing"));
    reap(&mut run.children)?;
    progress.clear();

    let (mut acquire, mut handoff) = (new_histogram(), new_histogram());
    let mut pairs = 0;
    for i in 0..clients {
        let text = std::fs::read_to_string(run.dir.join(format!("child-{i}.out")))
            .map_err(|e| fail("cannot read a child's output", e))?;
        pairs += merge(&text, &mut acquire, &mut handoff).map_err(Failure::Run)?;
    }
    Ok(Measurement {
        clients,
        window: Window {
            pairs,
            secs,
            cpu_secs: None,
        },
        acquire: Percentiles::of(&acquire),
        handoff: Some(Percentiles::of(&handoff)),
        refused: Refusals::default(),
        daemon_cpu_secs: None,
        floor: None,
        fsync_floor: None,
    })
}

/// Waits for every child to exit 0, at most [`DRAIN_LIMIT`].
fn reap(children: &mut Vec<Child>) -> Result<(), Failure> {
    let deadline = Instant::now() + DRAIN_LIMIT;
    while let Some(c) = children.last_mut() {
        match c.try_wait() {
            Ok(Some(status)) if status.success() => {
                children.pop();
            }
            Ok(Some(status)) => {
                return Err(Failure::Run(format!("a flock contender failed: {status}")))
            }
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                return Err(Failure::Run(format!(
                    "the flock contenders did not stop within {DRAIN_LIMIT:?}"
                )))
            }
            Err(e) => return Err(Failure::Run(format!("waiting for a contender: {e}"))),
        }
    }
    Ok(())
}

/// Adds one child's output to the histograms; its pair count.
fn merge(
    text: &str,
    acquire: &mut Histogram<u64>,
    handoff: &mut Histogram<u64>,
) -> Result<u64, String> {
    let mut pairs = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        match (f.first().copied(), num(1), num(2)) {
            (Some("pairs"), Some(n), None) => pairs = Some(n),
            (Some("a"), Some(v), Some(c)) => acquire.saturating_record_n(v, c),
            (Some("h"), Some(v), Some(c)) => handoff.saturating_record_n(v, c),
            _ => {
                return Err(format!(
                    "a flock contender printed {:?}",
                    line.escape_debug().to_string()
                ))
            }
        }
    }
    pairs.ok_or_else(|| "a flock contender printed no count".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_outputs_merge() {
        let (mut a, mut h) = (new_histogram(), new_histogram());
        let n = merge("pairs 3\na 1000 2\na 5000 1\nh 700 1\n", &mut a, &mut h).expect("valid");
        assert_eq!(n, 3);
        assert_eq!((a.len(), h.len()), (3, 1));
        assert!(merge("a 1 1\n", &mut a, &mut h).is_err(), "no count");
        assert!(merge("pairs 1\nx 1 1\n", &mut a, &mut h).is_err());
    }
}
