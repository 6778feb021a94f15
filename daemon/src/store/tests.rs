use super::*;
use lockd_protocol::{Key, Mode};
use std::collections::HashMap;
use std::time::Duration;

fn record(n: u64) -> LeaseRecord {
    LeaseRecord {
        ticket: Ticket::generate().unwrap(),
        key: Key::new("ns", format!("name-{n}")).unwrap(),
        mode: Mode::Shared,
        fence: n,
        uid: 1000,
        gid: 100,
        pid: Some(42),
        client_name: "test".into(),
        acquired_at_ms: 1,
        expires_at_ms: 2,
        lease_ms: 3,
        data: b"leader=10.0.0.1".to_vec(),
        permits: Some(3),
        lock_delay_ms: 5,
    }
}

#[test]
fn version_1_records_still_decode() {
    let r = record(7);
    let mut v1 = r.encode();
    v1[0] = 1;
    v1.truncate(v1.len() - 12);
    let old = LeaseRecord::decode(r.ticket, &v1).unwrap();
    assert_eq!((old.permits, old.lock_delay_ms), (None, 0));
    assert_eq!(old.data, r.data);
}

#[test]
fn record_round_trip() {
    let r = record(7);
    assert_eq!(LeaseRecord::decode(r.ticket, &r.encode()).unwrap(), r);
    assert!(LeaseRecord::decode(r.ticket, &r.encode()[..10]).is_err());
}

#[test]
fn changes_persist_across_reopen_and_latest_wins() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (record(1), record(2));
    {
        let mut store = Store::open(dir.path()).unwrap();
        assert_eq!(store.fence_ceiling().unwrap(), 0);
        let mut batch = Batch::default();
        batch.add(Change::Put(a.clone()), true);
        batch.add(Change::Put(b.clone()), false);
        batch.add(Change::Delete(b.ticket), true);
        batch.add(Change::FenceCeiling(42), true);
        store.apply(&batch).unwrap();
    }
    let mut store = Store::open(dir.path()).unwrap();
    assert_eq!(store.fence_ceiling().unwrap(), 42);
    assert_eq!(store.load_leases().unwrap(), vec![a]);
}

#[test]
fn second_open_is_refused_as_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Store::open(dir.path()).unwrap();
    assert!(matches!(Store::open(dir.path()), Err(StoreError::InUse(_))));
}

#[tokio::test]
async fn writer_groups_changes_and_answers_each() {
    let dir = tempfile::tempdir().unwrap();
    let writer = Writer::start(Store::open(dir.path()).unwrap()).unwrap();
    let dones: Vec<Done> = (0..50)
        .map(|n| writer.submit(Change::Put(record(n))))
        .collect();
    for d in dones {
        outcome(d.await).unwrap();
    }
}

/// A store whose writer thread has stopped and released the database (polls: the checkpointer
/// thread finishes its last fold after the writer's handles are gone).
fn reopen_when_released(dir: &Path) -> Store {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Store::open(dir) {
            Err(StoreError::InUse(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other.unwrap(),
        }
    }
}

fn one(change: Change) -> Batch {
    let mut b = Batch::default();
    b.add(change, true);
    b
}

fn sorted(mut v: Vec<LeaseRecord>) -> Vec<LeaseRecord> {
    v.sort_by_key(|r| r.fence);
    v
}

#[test]
fn acknowledged_appends_survive_a_crash_before_any_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (record(1), record(2));
    {
        let mut store = Store::open(dir.path()).unwrap();
        let log = store.log.as_mut().unwrap();
        log.append(&one(Change::Put(a.clone()))).unwrap();
        log.append(&one(Change::Put(b.clone()))).unwrap();
        log.append(&one(Change::Delete(b.ticket))).unwrap();
        log.append(&one(Change::FenceCeiling(42))).unwrap();
        // Dropped without a checkpoint: redb knows nothing of these.
    }
    let mut store = Store::open(dir.path()).unwrap();
    assert_eq!(store.fence_ceiling().unwrap(), 42);
    assert_eq!(store.load_leases().unwrap(), vec![a.clone()]);
    // The replay was folded: opening again replays nothing and loses nothing.
    drop(store);
    let folded = Store::open(dir.path()).unwrap().meta(LOG_FOLDED).unwrap();
    let (_, replay) = log::Log::open(dir.path(), folded).unwrap();
    assert_eq!(replay.records, 0);
    assert_eq!(
        Store::open(dir.path()).unwrap().load_leases().unwrap(),
        vec![a]
    );
}

/// Cuts a log file after every possible byte of its last record (a crash or power loss in the
/// middle of the write) and after each whole record: replay keeps exactly the whole records.
#[test]
fn a_torn_tail_is_dropped_and_every_whole_record_kept() {
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<LeaseRecord> = (1..=3).map(record).collect();
    let mut ends = vec![0u64];
    {
        let (mut log, _) = log::Log::open(dir.path(), 0).unwrap();
        for r in &records {
            log.append(&one(Change::Put(r.clone()))).unwrap();
            ends.push(log.written());
        }
    }
    let whole = std::fs::read(dir.path().join(log::LOG_FILES[0])).unwrap();
    for cut in 0..=ends[3] as usize + 40 {
        let case = tempfile::tempdir().unwrap();
        std::fs::write(case.path().join(log::LOG_FILES[0]), &whole[..cut]).unwrap();
        let (_, replay) = log::Log::open(case.path(), 0).unwrap();
        let kept = ends.iter().filter(|&&e| e > 0 && e as usize <= cut).count();
        assert_eq!(replay.records, kept, "cut at byte {cut}");
        let mut replayed: Vec<LeaseRecord> = replay
            .batch
            .leases
            .into_values()
            .filter_map(|(r, _)| r)
            .collect();
        replayed.sort_by_key(|r| r.fence);
        assert_eq!(replayed, records[..kept], "cut at byte {cut}");
    }
    // A flipped bit inside the last record drops it (and only it).
    let mut flipped = whole.clone();
    flipped[ends[2] as usize + 30] ^= 1;
    let case = tempfile::tempdir().unwrap();
    std::fs::write(case.path().join(log::LOG_FILES[0]), &flipped).unwrap();
    assert_eq!(log::Log::open(case.path(), 0).unwrap().1.records, 2);
}

/// A file is rewritten with a later epoch once its epoch is folded: what an earlier epoch left
/// beyond the new records is never replayed, even when the new records are shorter.
#[test]
fn a_reused_log_file_never_replays_an_older_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut b) = (record(1), record(2));
    let mut big = record(3);
    big.data = vec![7; 4000];
    // As long as `big`: without the end mark and the epoch check, `a`'s old record would
    // follow `b`'s new one exactly.
    b.data = vec![7; 4000];
    {
        let mut store = Store::open(dir.path()).unwrap();
        let mut log = store.log.take().unwrap();
        // Epoch 1 in file 0: a big record, then `a`.
        let e1 = log.epoch();
        let epoch1 = [Change::Put(big.clone()), Change::Put(a.clone())];
        let mut unfolded = Batch::default();
        for c in epoch1 {
            let batch = one(c);
            log.append(&batch).unwrap();
            unfolded.absorb(batch);
        }
        log.switch().unwrap();
        store.fold(&unfolded, e1).unwrap();
        // Epoch 2 in file 1: both deleted.
        let e2 = log.epoch();
        let mut unfolded = Batch::default();
        for t in [big.ticket, a.ticket] {
            let batch = one(Change::Delete(t));
            log.append(&batch).unwrap();
            unfolded.absorb(batch);
        }
        log.switch().unwrap();
        store.fold(&unfolded, e2).unwrap();
        // Epoch 3 back in file 0, over epoch 1's bytes: one short record, not folded.
        log.append(&one(Change::Put(b.clone()))).unwrap();
    }
    let mut store = Store::open(dir.path()).unwrap();
    assert_eq!(store.load_leases().unwrap(), vec![b]);
}

/// The writer thread, rotating log files after every append, against a model: whatever was
/// folded and whatever was only in the log when it stopped, a reopen sees the model's state.
#[tokio::test]
async fn the_writer_across_many_checkpoints_converges_to_the_last_change_of_each_lease() {
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<LeaseRecord> = (0..20).map(record).collect();
    let mut model: HashMap<Ticket, LeaseRecord> = HashMap::new();
    {
        let writer = Writer::start_tuned(Store::open(dir.path()).unwrap(), 1).unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for step in 0..400u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let r = &records[(x % 20) as usize];
            let change = if x % 3 == 0 {
                model.remove(&r.ticket);
                Change::Delete(r.ticket)
            } else {
                let mut r = r.clone();
                r.expires_at_ms = step;
                model.insert(r.ticket, r.clone());
                Change::Put(r)
            };
            if step % 7 == 0 {
                writer.submit_quiet(change);
            } else {
                outcome(writer.submit(change).await).unwrap();
            }
        }
        writer.submit_quiet(Change::FenceCeiling(99));
        outcome(writer.sync().await).unwrap();
    }
    let mut store = reopen_when_released(dir.path());
    assert_eq!(store.fence_ceiling().unwrap(), 99);
    let want = sorted(model.into_values().collect());
    assert_eq!(sorted(store.load_leases().unwrap()), want);
}

/// Tasks on two async workers and a plain thread commit at once, some inline (the first poll
/// of a lone change), some through the writer thread (a busy log, a long queue, a blocking
/// wait, a dropped answer): each lease's last change is the one stored, whoever committed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_and_writer_thread_commits_keep_each_lease_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let writer = Writer::start_tuned(Store::open(dir.path()).unwrap(), 4096).unwrap();
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            let leases: Vec<LeaseRecord> = (0..5).map(|i| record(t * 1000 + i)).collect();
            let mut last = HashMap::new();
            for step in 0..150u64 {
                let mut r = leases[(step % 5) as usize].clone();
                r.expires_at_ms = step;
                let change = if step % 11 == 3 {
                    last.remove(&r.ticket);
                    Change::Delete(r.ticket)
                } else {
                    last.insert(r.ticket, r.clone());
                    Change::Put(r)
                };
                match step % 4 {
                    0 => writer.submit_quiet(change),
                    1 => drop(writer.submit(change)),
                    _ => outcome(writer.submit(change).await).unwrap(),
                }
            }
            last
        }));
    }
    let blocking = {
        let writer = writer.clone();
        std::thread::spawn(move || {
            let leases: Vec<LeaseRecord> = (0..3).map(|i| record(9000 + i)).collect();
            let mut last = HashMap::new();
            for step in 0..50u64 {
                let mut r = leases[(step % 3) as usize].clone();
                r.expires_at_ms = step;
                last.insert(r.ticket, r.clone());
                outcome(writer.submit(Change::Put(r)).blocking_recv()).unwrap();
            }
            last
        })
    };
    let mut model: HashMap<Ticket, LeaseRecord> = HashMap::new();
    for task in tasks {
        model.extend(task.await.unwrap());
    }
    model.extend(blocking.join().unwrap());
    outcome(writer.sync().await).unwrap();
    drop(writer);
    let mut store = reopen_when_released(dir.path());
    let want = sorted(model.into_values().collect());
    assert_eq!(sorted(store.load_leases().unwrap()), want);
}

/// A rough figure, not a check: `cargo test -p lockd --release -- --ignored --nocapture
/// recovery_of_100k`.
#[test]
#[ignore = "load generator: prints how long replaying 100,000 leases takes"]
fn recovery_of_100k_leases_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, _) = log::Log::open(dir.path(), 0).unwrap();
        let mut batch = Batch::default();
        for n in 0..100_000 {
            batch.add(Change::Put(record(n)), false);
            if batch.leases.len() == 64 {
                log.append(&std::mem::take(&mut batch)).unwrap();
            }
        }
        log.append(&batch).unwrap();
    }
    let started = std::time::Instant::now();
    let mut store = Store::open(dir.path()).unwrap();
    let leases = store.load_leases().unwrap();
    eprintln!(
        "replayed, folded and loaded {} leases in {:?}",
        leases.len(),
        started.elapsed()
    );
}
