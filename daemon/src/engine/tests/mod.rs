//! The engine without a socket: real table, leases and fences; a store writer the test drives
//! by hand (commits delayed, failed, answered out of order); tokio's clock paused where time
//! matters.

use std::collections::HashSet;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Duration;

use foldhash::HashMap;
use lockd_protocol::{
    Acquire, ErrorCode, Event, Grant, Key, LostReason, Mode, Op, Reply, Ticket, Wait,
};
use tokio::sync::mpsc;

use super::timers::{Timers, MAX_TIMER};
use super::{Answer, Conn, Deferred, Engine, Outgoing};
use crate::config::Config;
use crate::error::Error;
use crate::fence::Fences;
use crate::peer::{Peer, Push};
use crate::store::{Change, Job, LeaseRecord, StoreError, Writer};

mod deadlock;
mod memory;
mod model;
mod semantics;

/// The store as the test drives it: jobs wait until the test commits or fails them.
struct Disk {
    jobs: std_mpsc::Receiver<Job>,
    queued: Vec<Job>,
    stored: HashMap<Ticket, LeaseRecord>,
}

impl Disk {
    fn collect(&mut self) {
        while let Ok(job) = self.jobs.try_recv() {
            self.queued.push(job);
        }
    }

    /// Commits everything submitted so far, in submission order (as the writer does), and
    /// answers the waiters: in order, or last first (`reversed`).
    fn commit_answering(&mut self, reversed: bool) {
        self.collect();
        let mut answers = Vec::new();
        for job in self.queued.drain(..) {
            match job.change {
                Change::Put(r) => {
                    self.stored.insert(r.ticket, r);
                }
                Change::Delete(t) => {
                    self.stored.remove(&t);
                }
                Change::FenceCeiling(_) | Change::Sync => {}
            }
            answers.extend(job.done);
        }
        if reversed {
            answers.reverse();
        }
        for done in answers {
            let _ = done.send(Ok(()));
        }
    }

    fn commit(&mut self) {
        self.commit_answering(false);
    }

    /// Fails the pending commit: waited changes are answered with an error and forgotten;
    /// quiet ones stay for the retry (as the writer does).
    fn fail(&mut self) {
        self.collect();
        let mut kept = Vec::new();
        for job in self.queued.drain(..) {
            match job.done {
                Some(done) => {
                    let _ = done.send(Err(StoreError::CommitFailed("injected".into())));
                }
                None => kept.push(job),
            }
        }
        self.queued = kept;
    }

    fn tickets(&self) -> HashSet<[u8; 16]> {
        self.stored.keys().map(|t| t.bytes()).collect()
    }
}

struct Setup {
    engine: Arc<Engine>,
    disk: Disk,
    config: Arc<Config>,
}

fn setup() -> (Setup, Timers) {
    let (writer, jobs) = Writer::manual();
    // A ceiling far away: no fence reservation ever reaches the store.
    let fences = Fences::new((1, u64::MAX / 2), writer.clone());
    let (engine, timers) = Engine::new(fences, writer);
    let mut config = Config::for_tests();
    config.limits.max_lease = Duration::from_secs(3 * 365 * 24 * 3600);
    let disk = Disk {
        jobs,
        queued: Vec::new(),
        stored: HashMap::default(),
    };
    let config = Arc::new(config);
    (
        Setup {
            engine,
            disk,
            config,
        },
        timers,
    )
}

impl Setup {
    /// A connection with id `id` of `uid` (uid 0 is an admin).
    fn conn(&self, id: u64, uid: u32) -> (Conn, mpsc::UnboundedReceiver<Push>) {
        let (owner, mailbox) = Peer::open(id, Some(1000 + id as i32), uid, uid, format!("c{id}"));
        let conn = Conn::new(Arc::clone(&self.engine), owner, Arc::clone(&self.config));
        (conn, mailbox)
    }

    /// Table, leases and store agree: every lease has its hold, every detached hold its lease,
    /// and the store holds exactly the detached leases (after everything was committed).
    fn assert_agree(&mut self) {
        self.disk.commit();
        let leases = self.engine.leases.snapshot();
        let holds = self.engine.locks.snapshot();
        for (ticket, key, fence, _) in &leases {
            assert!(
                holds
                    .iter()
                    .any(|h| h.0 == *key && h.1 == *fence && h.2 == Some(*ticket)),
                "a lease on {key} (fence {fence}) has no hold in the table"
            );
        }
        for h in holds.iter().filter(|h| h.3) {
            assert!(
                leases.iter().any(|l| Some(l.0) == h.2),
                "the detached hold on {} (fence {}) has no lease",
                h.0,
                h.1
            );
        }
        let detached: HashSet<[u8; 16]> =
            leases.iter().filter(|l| l.3).map(|l| l.0.bytes()).collect();
        assert_eq!(
            self.disk.tickets(),
            detached,
            "store and detached leases differ"
        );
    }

    fn holds_on(&self, key: &str) -> Vec<u64> {
        let key = k(key);
        let mut fences: Vec<u64> = self
            .engine
            .locks
            .snapshot()
            .into_iter()
            .filter(|h| h.0 == key)
            .map(|h| h.1)
            .collect();
        fences.sort_unstable();
        fences
    }
}

fn k(name: &str) -> Key {
    Key::in_default(name).expect("valid key")
}

fn acquire(name: &str, wait: Wait, lease_ms: Option<u64>, detach: bool) -> Op {
    Op::Acquire(Acquire {
        key: k(name),
        mode: Mode::Exclusive,
        wait,
        lease_ms,
        detach,
        permits: None,
        lock_delay_ms: 0,
        data: Vec::new(),
    })
}

#[track_caller]
fn now(answer: Answer) -> Result<Reply, Error> {
    match answer {
        Answer::Now(r) => r,
        Answer::Queued => panic!("expected an answer now, got Queued"),
        Answer::AfterCommit(_) => panic!("expected an answer now, got AfterCommit"),
    }
}

#[track_caller]
fn later(answer: Answer) -> Deferred {
    match answer {
        Answer::AfterCommit(d) => d,
        Answer::Queued => panic!("expected AfterCommit, got Queued"),
        Answer::Now(r) => panic!("expected AfterCommit, got {r:?}"),
    }
}

#[track_caller]
fn granted(r: Result<Reply, Error>) -> Grant {
    match r {
        Ok(Reply::Granted(g)) => g,
        other => panic!("expected Granted, got {other:?}"),
    }
}

#[track_caller]
fn code(r: Result<Reply, Error>) -> ErrorCode {
    match r {
        Err(e) => e.code(),
        Ok(reply) => panic!("expected an error, got {reply:?}"),
    }
}

/// The next push of `mailbox`, handled by `conn`.
#[track_caller]
fn next_push(conn: &mut Conn, mailbox: &mut mpsc::UnboundedReceiver<Push>) -> Outgoing {
    let push = mailbox.try_recv().expect("a push is waiting");
    conn.on_push(push)
}

/// A detached acquire of `b` on `name` that queues behind a hold of `a`, then the release
/// that grants it in the table (its grant waits in `b`'s mailbox).
fn queued_detached_grant(s: &Setup, a: &mut Conn, b: &mut Conn, name: &str) {
    let held = granted(now(a.handle(1, acquire(name, Wait::No, None, false))));
    let queued = b.handle(7, acquire(name, Wait::Forever, Some(60_000), true));
    assert!(matches!(queued, Answer::Queued));
    now(a.handle(
        2,
        Op::Release {
            ticket: held.ticket,
        },
    ))
    .expect("released");
    assert_eq!(s.holds_on(name).len(), 1, "granted in the table");
}

#[tokio::test]
async fn force_release_before_a_queued_detached_grant_reaches_its_connection() {
    let (mut s, _timers) = setup();
    let ((mut a, _), (mut b, mut bmail), (mut admin, _)) =
        (s.conn(1, 10), s.conn(2, 10), s.conn(3, 0));
    queued_detached_grant(&s, &mut a, &mut b, "k");
    // The admin acts between the table's grant and the connection taking it.
    let forced = now(admin.handle(1, Op::ForceRelease { key: k("k") }));
    assert_eq!(forced, Ok(Reply::ForceReleased { holds: 1 }));
    match next_push(&mut b, &mut bmail) {
        Outgoing::Answer(7, Answer::Now(r)) => assert_eq!(code(r), ErrorCode::NotHolder),
        _ => panic!("the waiter must be refused, never told Granted"),
    }
    assert!(matches!(
        next_push(&mut b, &mut bmail),
        Outgoing::Event(Event::HoldLost {
            reason: LostReason::ForceReleased,
            ..
        })
    ));
    assert!(s.holds_on("k").is_empty());
    s.assert_agree();
}

#[tokio::test]
async fn force_release_while_a_detached_grant_is_being_stored() {
    let (mut s, _timers) = setup();
    let ((mut a, _), (mut b, mut bmail), (mut admin, _)) =
        (s.conn(1, 10), s.conn(2, 10), s.conn(3, 0));
    queued_detached_grant(&s, &mut a, &mut b, "k");
    let Outgoing::Answer(7, answer) = next_push(&mut b, &mut bmail) else {
        panic!("the grant");
    };
    let grant = later(answer);
    let forced = later(admin.handle(1, Op::ForceRelease { key: k("k") }));
    s.disk.commit();
    assert_eq!(code(grant.finish().await), ErrorCode::NotHolder);
    assert_eq!(forced.finish().await, Ok(Reply::ForceReleased { holds: 1 }));
    assert!(s.holds_on("k").is_empty());
    s.assert_agree();
}

#[tokio::test]
async fn force_release_after_a_detached_grant_was_acknowledged() {
    let (mut s, _timers) = setup();
    let ((mut b, mut bmail), (mut admin, _)) = (s.conn(2, 10), s.conn(3, 0));
    let grant = later(b.handle(7, acquire("k", Wait::No, Some(60_000), true)));
    s.disk.commit();
    let g = granted(grant.finish().await);
    let forced = later(admin.handle(1, Op::ForceRelease { key: k("k") }));
    s.disk.commit();
    assert_eq!(forced.finish().await, Ok(Reply::ForceReleased { holds: 1 }));
    assert!(matches!(
        next_push(&mut b, &mut bmail),
        Outgoing::Event(Event::HoldLost { fence, .. }) if fence == g.fence
    ));
    let renew = b.handle(
        8,
        Op::Renew {
            ticket: g.ticket,
            lease_ms: None,
        },
    );
    assert_eq!(
        code(now(renew)),
        ErrorCode::NotHolder,
        "its ticket stopped working"
    );
    s.assert_agree();
}

#[tokio::test]
async fn a_failed_grant_commit_takes_the_grant_back_and_hands_the_key_on() {
    let (mut s, _timers) = setup();
    let ((mut b, _), (mut c, _)) = (s.conn(2, 10), s.conn(3, 10));
    let grant = later(b.handle(7, acquire("k", Wait::No, Some(60_000), true)));
    assert!(matches!(
        c.handle(1, acquire("k", Wait::Forever, None, false)),
        Answer::Queued
    ));
    s.disk.fail();
    assert_eq!(code(grant.finish().await), ErrorCode::Unavailable);
    assert_eq!(s.holds_on("k").len(), 1, "the waiter got the key");
    s.assert_agree();
}

#[tokio::test]
async fn a_detached_grant_whose_connection_closes_before_the_commit_is_taken_back() {
    let (mut s, _timers) = setup();
    let (mut b, _) = s.conn(2, 10);
    let grant = later(b.handle(7, acquire("k", Wait::No, Some(60_000), true)));
    drop(b);
    s.disk.commit();
    assert_eq!(code(grant.finish().await), ErrorCode::NotHolder);
    assert!(s.holds_on("k").is_empty());
    s.assert_agree();
}

#[tokio::test(start_paused = true)]
async fn a_detached_grant_that_expires_before_its_commit_is_not_acknowledged() {
    let (mut s, timers) = setup();
    tokio::spawn(timers.run(Arc::clone(&s.engine)));
    let (mut b, _) = s.conn(2, 10);
    let grant = later(b.handle(7, acquire("k", Wait::No, Some(1_000), true)));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    s.disk.commit();
    assert_eq!(code(grant.finish().await), ErrorCode::NotHolder);
    assert!(s.holds_on("k").is_empty());
    s.assert_agree();
}

/// Lets the expiry task run after the clock moved.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_renewal_leaves_the_lease_as_it_was() {
    let (mut s, timers) = setup();
    tokio::spawn(timers.run(Arc::clone(&s.engine)));
    let (mut b, _) = s.conn(2, 10);
    let grant = later(b.handle(1, acquire("k", Wait::No, Some(10_000), true)));
    s.disk.commit();
    let g = granted(grant.finish().await);
    let renewal = later(b.handle(
        2,
        Op::Renew {
            ticket: g.ticket,
            lease_ms: Some(600_000),
        },
    ));
    s.disk.fail();
    assert_eq!(code(renewal.finish().await), ErrorCode::Unavailable);
    assert_eq!(
        s.disk.stored[&g.ticket].expires_at_ms,
        g.expires_at_ms.unwrap_or(0)
    );
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    settle().await;
    assert!(s.holds_on("k").is_empty(), "expired at its original end");
    s.assert_agree();
}

#[tokio::test(start_paused = true)]
async fn renewals_committed_out_of_order_apply_in_the_order_they_were_made() {
    let (mut s, timers) = setup();
    tokio::spawn(timers.run(Arc::clone(&s.engine)));
    let (mut b, _) = s.conn(2, 10);
    let grant = later(b.handle(1, acquire("k", Wait::No, Some(10_000), true)));
    s.disk.commit();
    let g = granted(grant.finish().await);
    let long = later(b.handle(
        2,
        Op::Renew {
            ticket: g.ticket,
            lease_ms: Some(600_000),
        },
    ));
    let short = later(b.handle(
        3,
        Op::Renew {
            ticket: g.ticket,
            lease_ms: Some(2_000),
        },
    ));
    s.disk.commit_answering(true);
    assert!(matches!(short.finish().await, Ok(Reply::Renewed { .. })));
    assert!(matches!(long.finish().await, Ok(Reply::Renewed { .. })));
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    settle().await;
    assert!(
        s.holds_on("k").is_empty(),
        "the later (2 s) renewal is the one in force"
    );
    s.assert_agree();
}

#[tokio::test]
async fn a_failed_release_commit_keeps_the_lease_and_a_retry_works() {
    let (mut s, _timers) = setup();
    let (mut b, _) = s.conn(2, 10);
    let grant = later(b.handle(1, acquire("k", Wait::No, Some(60_000), true)));
    s.disk.commit();
    let g = granted(grant.finish().await);
    let release = later(b.handle(2, Op::Release { ticket: g.ticket }));
    s.disk.fail();
    assert_eq!(code(release.finish().await), ErrorCode::Unavailable);
    assert_eq!(s.holds_on("k"), vec![g.fence]);
    s.assert_agree();
    let release = later(b.handle(3, Op::Release { ticket: g.ticket }));
    s.disk.commit();
    assert_eq!(release.finish().await, Ok(Reply::Released));
    assert!(s.holds_on("k").is_empty());
    s.assert_agree();
}

#[tokio::test]
async fn a_detached_lease_released_elsewhere_tells_its_acquirer() {
    let (mut s, _timers) = setup();
    let ((mut a, mut amail), (mut c, _)) = (s.conn(1, 10), s.conn(2, 10));
    let grant = later(a.handle(1, acquire("k", Wait::No, Some(60_000), true)));
    s.disk.commit();
    let g = granted(grant.finish().await);
    let release = later(c.handle(1, Op::Release { ticket: g.ticket }));
    s.disk.commit();
    assert_eq!(release.finish().await, Ok(Reply::Released));
    assert!(matches!(
        next_push(&mut a, &mut amail),
        Outgoing::Event(Event::HoldLost {
            reason: LostReason::ReleasedElsewhere,
            ..
        })
    ));
    s.assert_agree();
}

#[tokio::test(start_paused = true)]
async fn leases_of_any_allowed_length_never_stop_expiry() {
    let (mut s, timers) = setup();
    let task = tokio::spawn(timers.run(Arc::clone(&s.engine)));
    let (mut b, mut bmail) = s.conn(2, 10);
    let thousand_days = 1000 * 24 * 3600 * 1000;
    granted(now(b.handle(
        1,
        acquire("long", Wait::No, Some(thousand_days), false),
    )));
    let short = granted(now(
        b.handle(2, acquire("short", Wait::No, Some(1_000), false))
    ));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    settle().await;
    assert!(!task.is_finished(), "the expiry task is alive");
    assert!(s.holds_on("short").is_empty(), "the 1 s lease expired");
    assert!(matches!(
        next_push(&mut b, &mut bmail),
        Outgoing::Event(Event::HoldLost { reason: LostReason::Expired, fence, .. }) if fence == short.fence
    ));
    // Past the longest timer the task arms: the long lease is re-armed, not ended.
    tokio::time::sleep(MAX_TIMER + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(s.holds_on("long").len(), 1, "still held");
    assert!(!task.is_finished());
    s.assert_agree();
}

#[tokio::test]
async fn a_request_id_still_in_use_is_refused_and_corrupts_nothing() {
    let (mut s, _timers) = setup();
    let ((mut a, _), (mut b, mut bmail)) = (s.conn(1, 10), s.conn(2, 10));
    let held = granted(now(a.handle(1, acquire("k", Wait::No, None, false))));
    assert!(matches!(
        b.handle(5, acquire("k", Wait::Forever, None, false)),
        Answer::Queued
    ));
    let dup = b.handle(5, acquire("other", Wait::No, Some(60_000), true));
    assert_eq!(code(now(dup)), ErrorCode::InvalidArgument);
    now(a.handle(
        2,
        Op::Release {
            ticket: held.ticket,
        },
    ))
    .expect("released");
    match next_push(&mut b, &mut bmail) {
        Outgoing::Answer(5, Answer::Now(r)) => {
            granted(r);
        }
        _ => panic!("the waiting acquire is still answered"),
    }
    // An id whose answer waits for a commit is in use until the answer is delivered.
    let pending = later(b.handle(6, acquire("d", Wait::No, Some(60_000), true)));
    assert_eq!(code(now(b.handle(6, Op::Ping))), ErrorCode::InvalidArgument);
    s.disk.commit();
    let result = pending.finish().await;
    assert!(matches!(
        b.on_push(Push::Reply { request: 6, result }),
        Outgoing::Committed(6, Ok(Reply::Granted(_)))
    ));
    assert_eq!(
        code(now(b.handle(6, Op::Ping))),
        ErrorCode::InvalidArgument,
        "in use until the answer is written"
    );
    b.written(6);
    assert_eq!(now(b.handle(6, Op::Ping)), Ok(Reply::Pong));
    s.assert_agree();
}

#[tokio::test]
async fn a_stored_grant_whose_answer_was_never_written_is_taken_back() {
    let (mut s, _timers) = setup();
    let (mut b, mut bmail) = s.conn(2, 10);
    let owner = b.owner().clone();
    let grant = later(b.handle(7, acquire("k", Wait::No, Some(60_000), true)));
    s.disk.commit();
    grant
        .finish_with(|result| owner.push(Push::Reply { request: 7, result }))
        .await;
    assert!(matches!(
        next_push(&mut b, &mut bmail),
        Outgoing::Committed(7, Ok(_))
    ));
    drop(b); // the connection ends before the answer reached its socket
    assert!(s.holds_on("k").is_empty(), "the grant was taken back");
    s.assert_agree();
}

#[tokio::test]
async fn a_force_release_after_the_grant_is_stored_is_heard_after_the_granted() {
    let (mut s, _timers) = setup();
    let ((mut b, mut bmail), (mut admin, _)) = (s.conn(2, 10), s.conn(3, 0));
    let owner = b.owner().clone();
    let grant = later(b.handle(7, acquire("k", Wait::No, Some(60_000), true)));
    s.disk.commit();
    grant
        .finish_with(|result| owner.push(Push::Reply { request: 7, result }))
        .await;
    let _forced = admin.handle(1, Op::ForceRelease { key: k("k") });
    assert!(matches!(
        next_push(&mut b, &mut bmail),
        Outgoing::Committed(7, Ok(_))
    ));
    assert!(matches!(
        next_push(&mut b, &mut bmail),
        Outgoing::Event(Event::HoldLost {
            reason: LostReason::ForceReleased,
            ..
        })
    ));
    s.assert_agree();
}

#[tokio::test]
async fn sync_returns_only_once_everything_before_it_is_stored() {
    let (mut s, _timers) = setup();
    let (mut b, _) = s.conn(2, 10);
    let _grant = later(b.handle(1, acquire("k", Wait::No, Some(60_000), true)));
    drop(b); // the grant is taken back: a quiet delete follows the put
    let engine = Arc::clone(&s.engine);
    let sync = tokio::spawn(async move { engine.sync().await });
    settle().await;
    assert!(!sync.is_finished(), "nothing was committed yet");
    s.disk.commit();
    sync.await.expect("joined").expect("synced");
    assert!(s.disk.stored.is_empty(), "the revoked grant is not on disk");
}

#[tokio::test]
async fn describe_and_list_fit_one_frame() {
    let (s, _timers) = setup();
    let max_frame = s.config.limits.max_frame;
    let mut conns = Vec::new();
    for i in 0..120 {
        let (mut c, _) = s.conn(10 + i, 10);
        let op = Op::Acquire(Acquire {
            key: k("shared"),
            mode: Mode::Shared,
            wait: Wait::No,
            lease_ms: None,
            detach: false,
            permits: None,
            lock_delay_ms: 0,
            data: vec![b'x'; 1000],
        });
        granted(now(c.handle(1, op)));
        conns.push(c);
    }
    let d = s.engine.describe(&k("shared"), max_frame);
    assert!(d.omitted_holders > 0);
    assert_eq!(d.holders.len() + d.omitted_holders as usize, 120);
    let mut buf = bytes::BytesMut::new();
    let msg = lockd_protocol::Reply::Described(d);
    lockd_protocol::codec::encode_frame(&msg, &mut buf, max_frame).expect("fits a frame");
}

#[tokio::test]
async fn a_renewal_being_stored_when_the_key_is_force_released_is_not_acknowledged() {
    let (mut s, _timers) = setup();
    let ((mut b, _), (mut admin, _)) = (s.conn(2, 10), s.conn(3, 0));
    let grant = later(b.handle(1, acquire("k", Wait::No, Some(60_000), true)));
    s.disk.commit();
    let g = granted(grant.finish().await);
    let renewal = later(b.handle(
        2,
        Op::Renew {
            ticket: g.ticket,
            lease_ms: None,
        },
    ));
    let forced = later(admin.handle(1, Op::ForceRelease { key: k("k") }));
    s.disk.commit();
    assert_eq!(code(renewal.finish().await), ErrorCode::NotHolder);
    assert_eq!(forced.finish().await, Ok(Reply::ForceReleased { holds: 1 }));
    assert!(s.holds_on("k").is_empty());
    s.assert_agree();
}

#[tokio::test(start_paused = true)]
async fn a_lease_that_expires_while_its_renewal_is_stored_stays_expired() {
    let (mut s, timers) = setup();
    tokio::spawn(timers.run(Arc::clone(&s.engine)));
    let (mut b, _) = s.conn(2, 10);
    let grant = later(b.handle(1, acquire("k", Wait::No, Some(1_000), true)));
    s.disk.commit();
    let g = granted(grant.finish().await);
    let renewal = later(b.handle(
        2,
        Op::Renew {
            ticket: g.ticket,
            lease_ms: Some(60_000),
        },
    ));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    settle().await;
    s.disk.commit();
    assert_eq!(code(renewal.finish().await), ErrorCode::NotHolder);
    assert!(s.holds_on("k").is_empty());
    s.assert_agree();
}
