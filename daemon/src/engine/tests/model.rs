//! Random operation sequences against the engine (acquire in every mode and lifetime, release,
//! renew, cancel, force-release, disconnect, commits that succeed or fail, pushes delivered
//! late), checked against a model of what the clients were told: once everything is delivered
//! and committed, the table holds exactly the holds some client was told it has, and the
//! table, the leases and the store agree.

use futures_util::FutureExt;
use proptest::prelude::*;

use super::*;
use crate::peer::Owner;

const CONNS: usize = 3;
const KEYS: u8 = 2;

#[derive(Debug, Clone)]
enum Step {
    /// `kind`: 0 session hold, 1 session hold with a lease, 2 detached lease.
    Acquire {
        conn: usize,
        key: u8,
        shared: bool,
        wait: bool,
        kind: u8,
    },
    Release {
        conn: usize,
        nth: usize,
    },
    Renew {
        conn: usize,
        nth: usize,
    },
    Cancel {
        conn: usize,
        nth: usize,
    },
    Force {
        key: u8,
    },
    Disconnect {
        conn: usize,
    },
    Deliver {
        conn: usize,
    },
    Commit,
    Fail,
}

fn step() -> impl Strategy<Value = Step> {
    let conn = 0..CONNS;
    prop_oneof![
        6 => (conn.clone(), 0..KEYS, any::<bool>(), any::<bool>(), 0u8..3).prop_map(
            |(conn, key, shared, wait, kind)| Step::Acquire { conn, key, shared, wait, kind }
        ),
        3 => (conn.clone(), 0..8usize).prop_map(|(conn, nth)| Step::Release { conn, nth }),
        1 => (conn.clone(), 0..8usize).prop_map(|(conn, nth)| Step::Renew { conn, nth }),
        1 => (conn.clone(), 0..4usize).prop_map(|(conn, nth)| Step::Cancel { conn, nth }),
        1 => (0..KEYS).prop_map(|key| Step::Force { key }),
        1 => conn.clone().prop_map(|conn| Step::Disconnect { conn }),
        4 => conn.prop_map(|conn| Step::Deliver { conn }),
        2 => Just(Step::Commit),
        1 => Just(Step::Fail),
    ]
}

/// A hold some client was told it has.
#[derive(Debug)]
struct Belief {
    /// The connection told; `None` once it closed (only detached holds outlive it).
    conn: Option<u64>,
    key: Key,
    fence: u64,
    ticket: Ticket,
    detached: bool,
}

enum Asked {
    Acquire { key: Key, detached: bool },
    Release { ticket: Ticket },
    Other,
}

struct World {
    s: Setup,
    conns: Vec<Option<(Conn, mpsc::UnboundedReceiver<Push>)>>,
    next_conn: u64,
    next_request: u64,
    asked: HashMap<(u64, u64), Asked>,
    deferred: Vec<(Owner, u64, Deferred)>,
    beliefs: Vec<Belief>,
}

impl World {
    fn new() -> World {
        let (s, _arming) = setup();
        World {
            s,
            conns: (0..CONNS).map(|_| None).collect(),
            next_conn: 1,
            next_request: 1,
            asked: HashMap::default(),
            deferred: Vec::new(),
            beliefs: Vec::new(),
        }
    }

    /// Connection slot `i`, connecting it if it is closed. Every connection is uid 10 except
    /// slot 2, which is root (an admin).
    fn conn(&mut self, i: usize) -> &mut (Conn, mpsc::UnboundedReceiver<Push>) {
        if self.conns[i].is_none() {
            let id = self.next_conn;
            self.next_conn += 1;
            self.conns[i] = Some(self.s.conn(id, if i == 2 { 0 } else { 10 }));
        }
        self.conns[i].as_mut().expect("just connected")
    }

    fn ask(&mut self, i: usize, op: Op, asked: Asked) {
        let id = self.next_request;
        self.next_request += 1;
        let (conn, _) = self.conn(i);
        let owner = conn.owner().clone();
        let answer = conn.handle(id, op);
        let side = conn.take_side_answers();
        self.asked.insert((owner.id, id), asked);
        for (request, result) in side {
            self.answered(owner.id, request, result);
        }
        self.answer(owner, id, answer);
    }

    fn answer(&mut self, owner: Owner, id: u64, answer: Answer) {
        match answer {
            Answer::Now(result) => self.answered(owner.id, id, result),
            Answer::Queued => {}
            Answer::AfterCommit(d) => self.deferred.push((owner, id, d)),
        }
    }

    fn answered(&mut self, conn: u64, id: u64, result: Result<Reply, Error>) {
        match (self.asked.remove(&(conn, id)), result) {
            (Some(Asked::Acquire { key, detached }), Ok(Reply::Granted(g))) => {
                self.beliefs.push(Belief {
                    conn: Some(conn),
                    key,
                    fence: g.fence,
                    ticket: g.ticket,
                    detached,
                });
            }
            (Some(Asked::Release { ticket }), Ok(Reply::Released)) => {
                self.beliefs.retain(|b| b.ticket != ticket);
            }
            _ => {}
        }
    }

    /// An answer its connection closed before reading: a grant it never heard of was taken
    /// back, but a release happened all the same.
    fn effect_unheard(&mut self, conn: u64, id: u64, result: Result<Reply, Error>) {
        if matches!(self.asked.get(&(conn, id)), Some(Asked::Release { .. })) {
            self.answered(conn, id, result);
        }
    }

    /// Conn slot `i` takes one push (or all, with `all`).
    fn deliver(&mut self, i: usize, all: bool) -> bool {
        let mut any = false;
        loop {
            let Some((conn, mailbox)) = self.conns[i].as_mut() else {
                return any;
            };
            let Ok(push) = mailbox.try_recv() else {
                return any;
            };
            any = true;
            let owner = conn.owner().clone();
            match conn.on_push(push) {
                Outgoing::Answer(id, answer) => self.answer(owner, id, answer),
                Outgoing::Committed(id, result) => {
                    conn.written(id);
                    self.answered(owner.id, id, result);
                }
                Outgoing::Event(Event::HoldLost { fence, .. }) => {
                    self.beliefs
                        .retain(|b| !(b.conn == Some(owner.id) && b.fence == fence));
                }
                Outgoing::Event(_) | Outgoing::Nothing => {}
            }
            if !all {
                return any;
            }
        }
    }

    /// Every deferred answer is ready once its commits were answered: finish them all and send
    /// the results through the mailboxes, as sessions do. An answer to a closed connection
    /// still counts for the model (a release completes whether or not its sender heard it).
    fn finish_deferred(&mut self) {
        for (owner, id, d) in std::mem::take(&mut self.deferred) {
            let result = d.finish().now_or_never().expect("commits were answered");
            let open = self
                .conns
                .iter()
                .flatten()
                .any(|(c, _)| c.owner().id == owner.id);
            if open {
                owner.push(Push::Reply {
                    request: id,
                    result,
                });
            } else {
                self.effect_unheard(owner.id, id, result);
            }
        }
    }

    fn run(&mut self, step: Step) {
        match step {
            Step::Acquire {
                conn,
                key,
                shared,
                wait,
                kind,
            } => {
                let key = k(&format!("key{key}"));
                let detached = kind == 2;
                let op = Op::Acquire(Acquire {
                    key: key.clone(),
                    mode: if shared {
                        Mode::Shared
                    } else {
                        Mode::Exclusive
                    },
                    wait: if wait { Wait::Forever } else { Wait::No },
                    lease_ms: (kind > 0).then_some(3_600_000),
                    detach: detached,
                    permits: None,
                    lock_delay_ms: 0,
                    data: Vec::new(),
                });
                self.ask(conn, op, Asked::Acquire { key, detached });
            }
            Step::Release { conn, nth } => {
                if let Some(b) = self.beliefs.get(nth) {
                    let ticket = b.ticket;
                    self.ask(conn, Op::Release { ticket }, Asked::Release { ticket });
                }
            }
            Step::Renew { conn, nth } => {
                if let Some(b) = self.beliefs.get(nth) {
                    let op = Op::Renew {
                        ticket: b.ticket,
                        lease_ms: Some(7_200_000),
                    };
                    self.ask(conn, op, Asked::Other);
                }
            }
            Step::Cancel { conn, nth } => {
                let Some(id) = self.conns[conn].as_ref().map(|(c, _)| c.owner().id) else {
                    return;
                };
                let mut waiting: Vec<u64> = self
                    .asked
                    .iter()
                    .filter(|((c, _), a)| *c == id && matches!(a, Asked::Acquire { .. }))
                    .map(|((_, r), _)| *r)
                    .collect();
                waiting.sort_unstable();
                if let Some(&request) = waiting.get(nth) {
                    self.ask(conn, Op::Cancel { request }, Asked::Other);
                }
            }
            Step::Force { key } => {
                let key = k(&format!("key{key}"));
                // Holders whose connection closed hear nothing: forget them here.
                self.beliefs.retain(|b| !(b.conn.is_none() && b.key == key));
                self.ask(2, Op::ForceRelease { key }, Asked::Other);
            }
            Step::Disconnect { conn } => {
                if let Some((c, mut mailbox)) = self.conns[conn].take() {
                    let id = c.owner().id;
                    drop(c);
                    // Answers already sent count, read or not (a release completed).
                    // Holds lost are lost, heard or not.
                    while let Ok(push) = mailbox.try_recv() {
                        match push {
                            Push::Reply { request, result } => {
                                self.effect_unheard(id, request, result);
                            }
                            Push::Lost { fence, .. } => self.beliefs.retain(|b| b.fence != fence),
                            _ => {}
                        }
                    }
                    self.beliefs.retain(|b| b.conn != Some(id) || b.detached);
                    for b in &mut self.beliefs {
                        if b.conn == Some(id) {
                            b.conn = None;
                        }
                    }
                }
            }
            Step::Deliver { conn } => {
                self.deliver(conn, false);
            }
            Step::Commit => {
                self.s.disk.commit();
                self.finish_deferred();
            }
            Step::Fail => {
                self.s.disk.fail();
                self.finish_deferred();
            }
        }
    }

    /// Commits and delivers everything, then compares the table with the model.
    fn settle_and_check(&mut self) -> Result<(), TestCaseError> {
        loop {
            self.s.disk.commit();
            self.finish_deferred();
            let mut any = false;
            for i in 0..CONNS {
                any |= self.deliver(i, true);
            }
            if !any && self.deferred.is_empty() {
                break;
            }
        }
        self.s.assert_agree();
        let mut table: Vec<(Key, u64)> = self
            .s
            .engine
            .locks
            .snapshot()
            .into_iter()
            .map(|h| (h.0, h.1))
            .collect();
        let mut told: Vec<(Key, u64)> = self
            .beliefs
            .iter()
            .map(|b| (b.key.clone(), b.fence))
            .collect();
        table.sort();
        told.sort();
        prop_assert_eq!(
            table,
            told,
            "the table holds exactly what clients were told"
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn engine_matches_what_clients_were_told(steps in proptest::collection::vec(step(), 1..60)) {
        let mut world = World::new();
        for (i, step) in steps.into_iter().enumerate() {
            world.run(step);
            if i % 15 == 14 {
                world.settle_and_check()?;
            }
        }
        world.settle_and_check()?;
    }
}
