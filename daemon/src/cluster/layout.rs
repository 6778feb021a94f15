//! What lockd keeps in etcd, and how a key's queue is read back.
//!
//! Under the configured prefix `P`:
//! - `P` `k/` NAMESPACE `/` NAME `/` HOLD — one entry per hold or waiting acquire of the key
//!   (NAME with `%` and `/` percent-encoded, so a key's entries are exactly one prefix and no
//!   other key's). HOLD is `LEASE.SLOT` (or `LEASE-SEQ` for a detached lease): the creating
//!   daemon's etcd lease id in hex, and a slot of the key that the daemon reuses once the
//!   entry is gone (or a number it never reuses), so it names its daemon and no two live
//!   entries share it.
//!   The value is a [`Record`] (JSON, readable with `etcdctl get`). Its **create revision**
//!   orders the queue and is the hold's fence.
//! - `P` `t/` SHA256(ticket) — for a detached lease only: the HOLD key it names, under the same
//!   etcd lease. The ticket itself is never stored.
//!
//! Invariants:
//! - an entry is granted exactly when [`Queue`] says so: an exclusive entry when no entry of the
//!   key was created before it; a shared one when no exclusive entry was created before it.
//!   Every daemon reads the same order from etcd, so two daemons never both grant.
//! - every entry is attached to an etcd lease (the daemon's session lease, or a detached
//!   lease's own), so nothing outlives its owner's lease.

use lockd_protocol::{Key, Mode, OwnerInfo};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::index::Naming;

/// Key names under the prefix.
#[derive(Debug, Clone)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    /// `prefix` ends with `/` (checked by the configuration).
    pub fn new(prefix: &str) -> Layout {
        Layout {
            prefix: prefix.to_owned(),
        }
    }

    /// Where every key's entries live.
    pub fn keys_root(&self) -> String {
        format!("{}k/", self.prefix)
    }

    /// The entries of one namespace.
    pub fn namespace_root(&self, namespace: &str) -> String {
        format!("{}k/{namespace}/", self.prefix)
    }

    /// The prefix of one key's entries (ends with `/`).
    pub fn key_prefix(&self, key: &Key) -> String {
        let mut s = self.namespace_root(&key.namespace);
        encode_name(&key.name, &mut s);
        s.push('/');
        s
    }

    /// The prefix of entries of keys in `namespace` whose names start with `name_prefix`.
    pub fn name_prefix(&self, namespace: &str, name_prefix: &str) -> String {
        let mut s = self.namespace_root(namespace);
        encode_name(name_prefix, &mut s);
        s
    }

    /// The ticket index entry of a detached lease.
    pub fn ticket_key(&self, ticket: &lockd_protocol::Ticket) -> String {
        let digest = Sha256::digest(ticket.bytes());
        let mut s = format!("{}t/", self.prefix);
        for b in digest {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// The lockd key an entry's etcd key belongs to (`None`: not an entry of this layout).
    pub fn key_of(&self, etcd_key: &[u8]) -> Option<Key> {
        let rest = etcd_key.strip_prefix(self.keys_root().as_bytes())?;
        let rest = std::str::from_utf8(rest).ok()?;
        let (namespace, rest) = rest.split_once('/')?;
        let (name, _hold) = rest.rsplit_once('/')?;
        Key::new(namespace, decode_name(name)?).ok()
    }
}

/// The entry name under key prefix `prefix`: `LEASE.SLOT`, or `LEASE-SEQ` for a name used
/// once (the two never collide: hex digits never contain the other's separator).
pub fn hold_name(prefix: &str, session_lease: i64, naming: Naming, n: u64) -> String {
    match naming {
        Naming::Reused => format!("{prefix}{session_lease:x}.{n:x}"),
        Naming::Once => format!("{prefix}{session_lease:x}-{n:x}"),
    }
}

/// The session lease an entry was created on, from its name (`LEASE.SLOT` or `LEASE-SEQ`).
pub fn creator_lease(etcd_key: &[u8]) -> Option<i64> {
    let leaf = etcd_key.rsplit(|b| *b == b'/').next()?;
    let hex = leaf.split(|b| *b == b'.' || *b == b'-').next()?;
    i64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// `%` and `/` as `%25` and `%2F`: a name's encoding never contains `/`, and the encoding of
/// a prefix of a name is a prefix of the name's encoding.
fn encode_name(name: &str, out: &mut String) {
    for c in name.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
}

fn decode_name(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        match rest.get(i + 1..i + 3)? {
            "25" => out.push('%'),
            "2F" => out.push('/'),
            _ => return None,
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// What an entry's value says about its owner and hold (JSON).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Record {
    pub mode: Mode,
    /// The daemon (`[backend] node`) whose client made the request.
    pub node: String,
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
    /// The client's name (untrusted text).
    pub client: String,
    /// When the request reached the daemon (milliseconds since the Unix epoch).
    pub at_ms: u64,
    /// The hold's data, in hex.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data: String,
    /// A detached lease (on its own etcd lease).
    #[serde(default)]
    pub detached: bool,
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// What an undecodable entry is taken for: exclusive, owner unknown.
    pub fn unknown() -> Record {
        Record {
            mode: Mode::Exclusive,
            node: "?".into(),
            pid: None,
            uid: u32::MAX,
            gid: u32::MAX,
            client: "an entry lockd cannot read".into(),
            at_ms: 0,
            data: String::new(),
            detached: false,
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<Record> {
        serde_json::from_slice(bytes).ok()
    }

    pub fn data_bytes(&self) -> Vec<u8> {
        (0..self.data.len() / 2)
            .filter_map(|i| u8::from_str_radix(self.data.get(2 * i..2 * i + 2)?, 16).ok())
            .collect()
    }

    pub fn hex(data: &[u8]) -> String {
        data.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Owner details as describe shows them: the client's name with its daemon's node
    /// (`NAME@NODE`), so a cluster-wide answer says which host.
    pub fn owner(&self) -> OwnerInfo {
        OwnerInfo {
            pid: self.pid,
            uid: self.uid,
            gid: self.gid,
            client_name: format!("{}@{}", self.client, self.node),
        }
    }
}

/// One entry of a key's queue as read from etcd.
#[derive(Debug, Clone)]
pub struct Entry {
    pub etcd_key: Vec<u8>,
    /// Its place in the queue, and its fence once granted.
    pub create_revision: i64,
    /// The etcd lease it is attached to.
    pub lease: i64,
    pub record: Record,
}

/// A key's entries in creation order, with the grant rule.
#[derive(Debug, Default)]
pub struct Queue {
    pub entries: Vec<Entry>,
}

/// Where one entry stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Standing {
    /// Granted: nothing ahead of it conflicts.
    Granted,
    /// Waiting for the deletion of this entry (the last one ahead of it that conflicts).
    Behind(Vec<u8>),
    /// Not in the queue (deleted).
    Gone,
}

impl Queue {
    /// From a range answer. An entry whose value is not a [`Record`] (written by something
    /// else than this lockd) counts as an exclusive entry of an unknown owner: it blocks
    /// rather than being overlooked.
    pub fn from_kvs(kvs: &[etcd_client::KeyValue]) -> Queue {
        let mut entries: Vec<Entry> = kvs
            .iter()
            .map(|kv| Entry {
                etcd_key: kv.key().to_vec(),
                create_revision: kv.create_revision(),
                lease: kv.lease(),
                record: Record::decode(kv.value()).unwrap_or_else(Record::unknown),
            })
            .collect();
        entries.sort_by_key(|e| e.create_revision);
        Queue { entries }
    }

    /// Whether the entry created at `revision` holds the key, or what it waits for.
    pub fn standing(&self, revision: i64) -> Standing {
        let Some(me) = self.entries.iter().find(|e| e.create_revision == revision) else {
            return Standing::Gone;
        };
        let mut ahead = self
            .entries
            .iter()
            .filter(|e| e.create_revision < revision)
            .filter(|e| me.record.mode == Mode::Exclusive || e.record.mode == Mode::Exclusive);
        match ahead.next_back() {
            None => Standing::Granted,
            Some(blocker) => Standing::Behind(blocker.etcd_key.clone()),
        }
    }

    /// The granted entries (in creation order) and the waiting ones.
    pub fn split(&self) -> (Vec<&Entry>, Vec<&Entry>) {
        let mut holders = Vec::new();
        let mut waiters = Vec::new();
        let mut any_before = false;
        let mut exclusive_before = false;
        for e in &self.entries {
            let granted = match e.record.mode {
                Mode::Exclusive => !any_before,
                Mode::Shared => !exclusive_before,
            };
            if granted {
                holders.push(e);
            } else {
                waiters.push(e);
            }
            any_before = true;
            exclusive_before |= e.record.mode == Mode::Exclusive;
        }
        (holders, waiters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(rev: i64, mode: Mode) -> Entry {
        Entry {
            etcd_key: format!("k{rev}").into_bytes(),
            create_revision: rev,
            lease: 1,
            record: Record {
                mode,
                node: "n".into(),
                pid: None,
                uid: 0,
                gid: 0,
                client: "c".into(),
                at_ms: 0,
                data: String::new(),
                detached: false,
            },
        }
    }

    #[test]
    fn readers_wait_only_for_earlier_writers_and_writers_for_everyone_earlier() {
        use Mode::{Exclusive as X, Shared as S};
        let q = Queue {
            entries: vec![
                entry(1, S),
                entry(2, S),
                entry(3, X),
                entry(4, S),
                entry(5, X),
            ],
        };
        assert_eq!(q.standing(1), Standing::Granted);
        assert_eq!(q.standing(2), Standing::Granted);
        assert_eq!(q.standing(3), Standing::Behind(b"k2".to_vec()));
        assert_eq!(q.standing(4), Standing::Behind(b"k3".to_vec()));
        assert_eq!(q.standing(5), Standing::Behind(b"k4".to_vec()));
        assert_eq!(q.standing(9), Standing::Gone);
        let (holders, waiters) = q.split();
        let revs = |v: Vec<&Entry>| v.iter().map(|e| e.create_revision).collect::<Vec<_>>();
        assert_eq!(revs(holders), [1, 2]);
        assert_eq!(revs(waiters), [3, 4, 5]);
    }

    #[test]
    fn names_encode_without_slashes_and_decode_back() {
        let layout = Layout::new("/lockd/");
        let key = Key::new("ops", "a/b%c").unwrap();
        let prefix = layout.key_prefix(&key);
        assert_eq!(prefix, "/lockd/k/ops/a%2Fb%25c/");
        for (naming, n) in [(Naming::Reused, 7), (Naming::Once, 7)] {
            let hold = hold_name(&prefix, 0xabc, naming, n);
            assert_eq!(layout.key_of(hold.as_bytes()), Some(key.clone()));
        }
        for naming in [Naming::Reused, Naming::Once] {
            let hold = hold_name(&prefix, 0xabc, naming, 7);
            assert_eq!(creator_lease(hold.as_bytes()), Some(0xabc));
        }
        assert_ne!(
            hold_name(&prefix, 0xabc, Naming::Reused, 0xd7),
            hold_name(&prefix, 0xabc, Naming::Once, 7)
        );
        // "a" and "a/b" are different keys: neither's entries are in the other's prefix.
        let a = layout.key_prefix(&Key::new("ops", "a").unwrap());
        assert!(!prefix.starts_with(&a));
        assert!(layout
            .key_prefix(&key)
            .starts_with(&layout.name_prefix("ops", "a/b")));
    }

    #[test]
    fn the_ticket_index_holds_a_digest_never_the_ticket() {
        let layout = Layout::new("/p/");
        let ticket = lockd_protocol::Ticket::from_bytes([7; 16]);
        let k = layout.ticket_key(&ticket);
        assert!(k.starts_with("/p/t/") && k.len() == 5 + 64, "{k}");
        assert!(!k.contains(&Record::hex(&[7; 16])));
    }
}
