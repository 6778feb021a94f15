//! Keys in the table: one hasher for shard and bucket, and the ways a caller names a key or a
//! hold.

use std::hash::{BuildHasher, Hasher};

use lockd_protocol::Key;

use super::node::Node;

/// Hashes keys. One per lock space, shared by its shards, so a key's hash picks its shard
/// and its bucket (and a connection can find its hold again by hash and fence alone).
#[derive(Debug, Clone, Default)]
pub struct KeyHasher(foldhash::fast::RandomState);

impl KeyHasher {
    /// `key` with its hash.
    pub fn hashed<'k>(&self, key: &'k Key) -> Hashed<'k> {
        Hashed {
            key,
            hash: self.hash(&key.namespace, &key.name),
        }
    }

    /// Where the hold `fence` on `key` is.
    pub fn hold(&self, key: &Key, fence: u64) -> HoldAt {
        HoldAt {
            hash: self.hash(&key.namespace, &key.name),
            fence,
        }
    }

    pub(super) fn hash(&self, namespace: &str, name: &str) -> u64 {
        let mut h = self.0.build_hasher();
        h.write(namespace.as_bytes());
        h.write_u8(0xff);
        h.write(name.as_bytes());
        h.finish()
    }

    pub(super) fn of_node<V>(&self, node: &Node<V>) -> u64 {
        let (namespace, name) = node.key();
        self.hash(namespace, name)
    }
}

/// A key and its hash (by the table's [`KeyHasher`]).
#[derive(Debug, Clone, Copy)]
pub struct Hashed<'k> {
    pub key: &'k Key,
    pub hash: u64,
}

/// A hold, found by its key's hash and its fence (fences are unique): what a connection keeps
/// to end its hold later, instead of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldAt {
    pub hash: u64,
    pub fence: u64,
}

/// How an operation finds its key's entry.
#[derive(Debug, Clone, Copy)]
pub enum At<'k> {
    /// The entry of this key.
    Key(Hashed<'k>),
    /// The entry with this hold: with the hash of the hold's own key (as its grant gave it),
    /// that is the hold's key, since fences are unique. (Any entry whose hash shares a few bits
    /// could match a fence it holds: this is not a way to ask "is this fence on that key".)
    Hold(HoldAt),
}

/// A key as the table stores it, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

impl KeyRef<'_> {
    pub fn to_key(self) -> Key {
        Key {
            namespace: self.namespace.to_owned(),
            name: self.name.to_owned(),
        }
    }

    /// Orders like [`Key`] (namespace, then name).
    pub fn cmp_key(self, key: &Key) -> std::cmp::Ordering {
        (self.namespace, self.name).cmp(&(key.namespace.as_str(), key.name.as_str()))
    }
}

/// `namespace/name` escaped as [`Key`]'s `Display` is (for logs and messages).
impl std::fmt::Display for KeyRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use lockd_protocol::display::Escaped;
        write!(f, "{}/{}", Escaped(self.namespace), Escaped(self.name))
    }
}

pub(super) fn key_ref<V>(node: &Node<V>) -> KeyRef<'_> {
    let (namespace, name) = node.key();
    KeyRef { namespace, name }
}

pub(super) fn is_key<V>(node: &Node<V>, key: &Key) -> bool {
    node.key() == (key.namespace.as_str(), key.name.as_str())
}
