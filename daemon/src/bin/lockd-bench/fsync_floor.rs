//! `--fsync-floor DIR`: what the disk allows durable work, measured beside each measurement:
//! one thread overwrites the same 4 KiB of a preallocated file in DIR and calls fdatasync,
//! again and again, for `--duration` (after the warm-up). Every acknowledged detached lease is
//! committed before its grant and its release is committed too, so at one sync per commit a
//! pair costs two syncs: `pairs/s ÷ (syncs/s ÷ 2)` is the share of that floor a durable
//! workload achieves (above 1 only by sharing syncs between clients).

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::report::{Percentiles, Progress};
use crate::workload::{self, Control, Which, Window};
use crate::Failure;

/// The size of each overwrite.
pub const BLOCK: usize = 4096;

/// The floor measured beside a measurement: syncs (counted as the window's pairs) and each
/// write + fdatasync's latency.
#[derive(Clone, Copy, Debug)]
pub struct FsyncFloor {
    pub window: Window,
    pub latency: Percentiles,
}

impl FsyncFloor {
    pub fn syncs_per_sec(&self) -> f64 {
        if self.window.secs > 0.0 {
            self.window.pairs as f64 / self.window.secs
        } else {
            0.0
        }
    }
}

/// The file synced: created new in DIR, removed on drop.
pub struct SyncFile {
    path: PathBuf,
    file: File,
}

impl SyncFile {
    /// Creates `DIR/.lockd-bench-fsync-PID` (never an existing file), writes and syncs its
    /// block once so that later writes overwrite allocated space.
    pub fn create(dir: &Path) -> Result<SyncFile, Failure> {
        let path = dir.join(format!(".lockd-bench-fsync-{}", std::process::id()));
        let fail = |what: &str, path: &Path, e: std::io::Error| {
            Failure::Run(format!("--fsync-floor: {what} {}: {e}", path.display()))
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| fail("cannot create", &path, e))?;
        let f = SyncFile { path, file };
        f.file
            .write_all_at(&[0xa5; BLOCK], 0)
            .and_then(|()| f.file.sync_all())
            .map_err(|e| fail("cannot write", &f.path, e))?;
        Ok(f)
    }

    /// Writes the block (its first bytes changed) and waits for fdatasync.
    fn overwrite(&self, block: &mut [u8; BLOCK], n: u64) -> std::io::Result<()> {
        block[..8].copy_from_slice(&n.to_le_bytes());
        self.file.write_all_at(block, 0)?;
        self.file.sync_data()
    }
}

impl Drop for SyncFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Measures the floor: the same warm-up and duration as the measurement beside it.
pub async fn measure(
    s: &crate::args::Settings,
    file: &Arc<SyncFile>,
    clients: usize,
    progress: &Progress,
) -> Result<FsyncFloor, Failure> {
    let ctl = Control::new();
    let worker = {
        let (ctl, file) = (Arc::clone(&ctl), Arc::clone(file));
        tokio::task::spawn_blocking(move || {
            let mut samples = ctl.samples(Which::Acquire);
            let mut block = [0xa5; BLOCK];
            let mut n = 0u64;
            while !ctl.stopped() {
                let started = Instant::now();
                if let Err(e) = file.overwrite(&mut block, n) {
                    let msg = format!("--fsync-floor: write + fdatasync failed: {e}");
                    ctl.fail(msg.clone());
                    return Err(msg);
                }
                samples.record(started.elapsed());
                ctl.pair_done();
                n += 1;
            }
            Ok(())
        })
    };
    let label = format!("fsync floor, beside {clients} clients");
    let window = workload::measure_baseline(&ctl, vec![worker], s, progress, &label).await?;
    Ok(FsyncFloor {
        window,
        latency: ctl.percentiles(Which::Acquire),
    })
}
