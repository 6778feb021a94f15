//! One shard: its part of the table, its watchers and its statistics, and how its changes
//! reach watchers and waiting connections.

use std::borrow::Cow;

use foldhash::HashMap;
use lockd_protocol::{Change, Key};

use super::{owner_info, Outbox, Stored};
use crate::peer::{Owner, Push};
use crate::stats::ShardStats;
use crate::table::{At, Granted, Table};

pub(super) struct Shard {
    pub(super) table: Table<Owner, Stored>,
    /// Connections watching each key (kept even while the key has no holders or waiters).
    pub(super) watches: HashMap<Key, Vec<Owner>>,
    pub(super) stats: ShardStats,
}

impl Shard {
    /// Watchers of `key`; skips hashing when nobody in this shard watches anything (the hot
    /// path).
    pub(super) fn watchers(&self, key: &Key) -> Option<&Vec<Owner>> {
        if self.watches.is_empty() {
            None
        } else {
            self.watches.get(key)
        }
    }

    /// The key of the entry `at` finds, if anybody in this shard watches anything (events
    /// need it then): `key` when the caller has it, else the table's copy.
    pub(super) fn watched_key<'k>(&self, key: Option<&'k Key>, at: At<'_>) -> Option<Cow<'k, Key>> {
        if self.watches.is_empty() {
            return None;
        }
        match key {
            Some(key) => Some(Cow::Borrowed(key)),
            None => self.table.key_at(at).map(Cow::Owned),
        }
    }

    /// Queues the watch event for a hold that ended (`key`: see [`Shard::watched_key`]).
    pub(super) fn ended(&mut self, key: Option<&Key>, change: Change, out: &mut Outbox) {
        if let Some((key, watchers)) = key.and_then(|k| Some((k, self.watchers(k)?))) {
            notify(out, watchers, key, change);
        }
    }

    /// Queues the pushes for holds granted from the queue, with their watch events (`key`:
    /// see [`Shard::watched_key`]).
    pub(super) fn granted(
        &mut self,
        key: Option<&Key>,
        granted: Vec<Granted<Owner>>,
        now: u64,
        out: &mut Outbox,
    ) {
        for g in granted {
            self.stats.grants += 1;
            self.stats.wait_ms.observe(now.saturating_sub(g.since));
            if let Some((key, watchers)) = key.and_then(|k| Some((k, self.watchers(k)?))) {
                let change = Change::Granted {
                    fence: g.fence,
                    mode: g.mode,
                    owner: owner_info(&g.owner),
                };
                notify(out, watchers, key, change);
            }
            out.0.push((
                g.owner,
                Push::Granted {
                    request: g.request,
                    fence: g.fence,
                    mode: g.mode,
                },
            ));
        }
    }
}

pub(super) fn notify(out: &mut Outbox, watchers: &[Owner], key: &Key, change: Change) {
    for w in watchers {
        out.0.push((
            w.clone(),
            Push::Watch {
                key: key.clone(),
                change: change.clone(),
            },
        ));
    }
}
