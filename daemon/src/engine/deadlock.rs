//! Deadlock detection: a wait-for graph between connections, searched when a wait is added.
//!
//! The owner of holds and waits is the connection. A waiting acquire of connection W on key k
//! waits for every holder of k and every request queued ahead of it on k (strict FIFO: it is
//! granted only after all of them). A wait that would close a cycle of such edges back to W is
//! refused with `Deadlock`; every other participant is left alone.
//!
//! Where the graph lives, and why no cycle is missed across shards:
//! - the edges are not stored: they are read from the lock table (holders and queues, shard by
//!   shard, one shard lock at a time) while the search runs;
//! - what is stored, in [`Detector`], is the reverse index the table lacks: which keys each
//!   connection waits on. A wait is registered, and the search run, under the detector's one
//!   mutex, after the wait is in the table. Two waits that close a cycle together, even on keys
//!   in different shards, are therefore searched one after the other, and the second sees the
//!   first;
//! - edges only disappear after a wait is added (a new holder of k is always someone who was
//!   queued ahead, or came when nobody waited), so a cycle can only appear when a wait is added:
//!   searching then is complete.
//!
//! Costs: acquires that do not wait never reach this module. A wait of a connection that holds
//! nothing and waits for nothing else cannot be on a cycle (nobody waits for it except requests
//! behind it on the same key, whose edges already include everything it waits for), so it is
//! neither searched nor registered; it is registered later if the connection takes a hold or a
//! second wait. A search visits each key at most once per queue position, so it is linear in the
//! holds and waits it reaches. Waits on counting semaphores are not searched (a semaphore
//! waiter needs *any* holder to leave, not all: a cycle through one holder is not a deadlock).
//! Lock order: the detector mutex, then one shard mutex at a time; never the reverse.

use std::collections::HashSet;
use std::sync::Mutex;

use foldhash::HashMap;
use lockd_protocol::{Key, RequestId};

use super::lockspace::LockSpace;
use crate::peer::Owner;

/// The registered waits of connections that could be on a cycle.
#[derive(Default)]
pub struct Detector {
    /// Connection id → its registered waits (request, key).
    waits: Mutex<HashMap<u64, Vec<(RequestId, Key)>>>,
}

impl Detector {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<(RequestId, Key)>>> {
        self.waits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the wait `request` of `owner` on `key` without searching (a wait of a
    /// connection that became able to be on a cycle).
    pub fn register(&self, owner: &Owner, request: RequestId, key: &Key) {
        self.lock()
            .entry(owner.id)
            .or_default()
            .push((request, key.clone()));
    }

    /// Forgets a registered wait (granted, cancelled, timed out, refused, disconnected).
    pub fn unregister(&self, owner: &Owner, request: RequestId) {
        let mut waits = self.lock();
        if let Some(list) = waits.get_mut(&owner.id) {
            list.retain(|(r, _)| *r != request);
            if list.is_empty() {
                waits.remove(&owner.id);
            }
        }
    }

    /// Registers the wait `request` of `owner` on `key` (already queued in `locks`) and
    /// searches for a cycle through it. Returns the cycle, described for humans, if there is
    /// one (the wait stays registered: the caller withdraws it and unregisters).
    pub fn register_and_check(
        &self,
        locks: &LockSpace,
        owner: &Owner,
        request: RequestId,
        key: &Key,
    ) -> Option<String> {
        let mut waits = self.lock();
        waits
            .entry(owner.id)
            .or_default()
            .push((request, key.clone()));
        let mut search = Search {
            locks,
            start: owner,
            owners: HashMap::default(),
            parent: HashMap::default(),
            expanded: HashMap::default(),
            stack: Vec::new(),
        };
        if let Some(found) = search.expand(&waits, owner, request, key) {
            return Some(search.describe(found, key));
        }
        while let Some(next) = search.stack.pop() {
            let Some(list) = waits.get(&next.id) else {
                continue;
            };
            for (r, k) in list {
                if let Some(found) = search.expand(&waits, &next, *r, k) {
                    return Some(search.describe(found, key));
                }
            }
        }
        None
    }
}

/// Registered waits by connection id.
type Waits = HashMap<u64, Vec<(RequestId, Key)>>;

/// One depth-first search from a new wait.
struct Search<'a> {
    locks: &'a LockSpace,
    start: &'a Owner,
    /// Every connection reached, by id.
    owners: HashMap<u64, Owner>,
    /// How each connection was reached: (the waiting connection, the key it waits on).
    parent: HashMap<u64, (u64, Key)>,
    /// Per key, how far its queue has been expanded (holders are expanded with the first).
    expanded: HashMap<Key, usize>,
    stack: Vec<Owner>,
}

/// The last link of a cycle: `.0` waits on `.1`, held (or queued ahead) by the start.
type Closing = (Owner, Key);

impl Search<'_> {
    /// Follows the wait `request` of `waiter` on `key`: every connection it waits for is
    /// reached. Returns the closing link if one of them is the start.
    ///
    /// Only connections that can lead further are followed: the start, and connections not
    /// reached yet that wait on some other key (one that waits only on `key` is a waiter ahead
    /// of this one, and everything it waits for here is already a target).
    fn expand(
        &mut self,
        waits: &Waits,
        waiter: &Owner,
        request: RequestId,
        key: &Key,
    ) -> Option<Closing> {
        let from = self.expanded.get(key).copied();
        let start = self.start.id;
        let owners = &self.owners;
        let pick = |id: u64| {
            id == start
                || (!owners.contains_key(&id)
                    && waits
                        .get(&id)
                        .is_some_and(|list| list.iter().any(|(_, k)| k != key)))
        };
        let (upto, targets) = self
            .locks
            .wait_targets(key, waiter.id, request, from, pick)?;
        self.expanded
            .insert(key.clone(), upto.max(from.unwrap_or(0)));
        for target in targets {
            if target.id == self.start.id {
                return Some((waiter.clone(), key.clone()));
            }
            if self.owners.contains_key(&target.id) {
                continue;
            }
            self.owners.insert(target.id, target.clone());
            self.parent.insert(target.id, (waiter.id, key.clone()));
            self.stack.push(target);
        }
        None
    }

    /// "pid 1 uid 1000 client "a" waits for k2, held by pid 2 …, which waits for k1, held by
    /// pid 1 …" from the start around the cycle.
    fn describe(&self, (last, last_key): Closing, start_key: &Key) -> String {
        // Walk back from the closing waiter to the start.
        let mut chain: Vec<(Owner, Key)> = vec![(last.clone(), last_key)];
        let mut at = last.id;
        let mut seen = HashSet::new();
        while at != self.start.id && seen.insert(at) {
            let Some((parent, key)) = self.parent.get(&at) else {
                break;
            };
            let owner = if *parent == self.start.id {
                self.start.clone()
            } else {
                match self.owners.get(parent) {
                    Some(o) => o.clone(),
                    None => break,
                }
            };
            chain.push((owner, key.clone()));
            at = *parent;
        }
        chain.reverse();
        let mut out = String::from("waiting would close a cycle: ");
        for (i, (owner, key)) in chain.iter().enumerate() {
            if i > 0 {
                out.push_str("; ");
            }
            let held_by = chain.get(i + 1).map_or(self.start, |(next, _)| next);
            out.push_str(&format!(
                "{} waits for {key}, held or queued ahead by {}",
                label(owner),
                label(held_by)
            ));
        }
        if chain.first().is_none_or(|(_, k)| k != start_key) {
            out.push_str(&format!(" (this request waits for {start_key})"));
        }
        out
    }
}

/// "pid 1 uid 1000 client \"name\"" with the peer-supplied name escaped.
fn label(o: &Owner) -> String {
    let pid = o.pid.map_or_else(|| "?".to_string(), |p| p.to_string());
    format!("pid {pid} uid {} client {:?}", o.uid, o.name)
}
