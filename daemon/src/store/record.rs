//! The stored form of a detached lease: a versioned, self-describing byte layout.

use lockd_protocol::{Key, Mode, Ticket};

use super::StoreError;

/// A detached lease as stored. Never logged: it holds the ticket.
#[derive(Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub ticket: Ticket,
    pub key: Key,
    pub mode: Mode,
    pub fence: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    pub client_name: String,
    /// Wall-clock milliseconds since the Unix epoch.
    pub acquired_at_ms: u64,
    /// Wall-clock milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    pub lease_ms: u64,
    pub data: Vec<u8>,
    /// The key's capacity when it is a counting semaphore.
    pub permits: Option<u32>,
    /// Lock-delay after an unclean end, milliseconds.
    pub lock_delay_ms: u64,
}

impl std::fmt::Debug for LeaseRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseRecord")
            .field("key", &self.key)
            .field("fence", &self.fence)
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

/// Version 2 appends the capacity (u32, 0 for a lock) and the lock-delay (u64 ms); version 1
/// records (without them) are still read.
const RECORD_VERSION: u8 = 2;

impl LeaseRecord {
    /// A versioned, self-describing byte layout (little-endian, length-prefixed strings).
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(96 + self.key.name.len() + self.data.len());
        b.push(RECORD_VERSION);
        put_bytes(&mut b, self.key.namespace.as_bytes());
        put_bytes(&mut b, self.key.name.as_bytes());
        b.push(match self.mode {
            Mode::Exclusive => 0,
            Mode::Shared => 1,
        });
        for v in [
            self.fence,
            self.acquired_at_ms,
            self.expires_at_ms,
            self.lease_ms,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.uid.to_le_bytes());
        b.extend_from_slice(&self.gid.to_le_bytes());
        b.extend_from_slice(&self.pid.unwrap_or(-1).to_le_bytes());
        put_bytes(&mut b, self.client_name.as_bytes());
        put_bytes(&mut b, &self.data);
        b.extend_from_slice(&self.permits.unwrap_or(0).to_le_bytes());
        b.extend_from_slice(&self.lock_delay_ms.to_le_bytes());
        b
    }

    pub(super) fn decode(ticket: Ticket, mut b: &[u8]) -> Result<LeaseRecord, StoreError> {
        let bad = |what: &str| StoreError::Corrupt(what.to_string());
        let version = take(&mut b, 1).ok_or_else(|| bad("empty"))?[0];
        if !(1..=RECORD_VERSION).contains(&version) {
            return Err(bad("unknown record version"));
        }
        let namespace = take_string(&mut b).ok_or_else(|| bad("namespace"))?;
        let name = take_string(&mut b).ok_or_else(|| bad("name"))?;
        let mode = match take(&mut b, 1).ok_or_else(|| bad("mode"))?[0] {
            0 => Mode::Exclusive,
            1 => Mode::Shared,
            _ => return Err(bad("mode")),
        };
        let mut u64s = [0u64; 4];
        for v in &mut u64s {
            *v = u64::from_le_bytes(take_array(&mut b).ok_or_else(|| bad("times"))?);
        }
        let uid = u32::from_le_bytes(take_array(&mut b).ok_or_else(|| bad("uid"))?);
        let gid = u32::from_le_bytes(take_array(&mut b).ok_or_else(|| bad("gid"))?);
        let pid = i32::from_le_bytes(take_array(&mut b).ok_or_else(|| bad("pid"))?);
        let client_name = take_string(&mut b).ok_or_else(|| bad("client name"))?;
        let data = take_bytes(&mut b).ok_or_else(|| bad("data"))?.to_vec();
        let (permits, lock_delay_ms) = if version >= 2 {
            let p = u32::from_le_bytes(take_array(&mut b).ok_or_else(|| bad("permits"))?);
            let d = u64::from_le_bytes(take_array(&mut b).ok_or_else(|| bad("lock delay"))?);
            ((p > 0).then_some(p), d)
        } else {
            (None, 0)
        };
        Ok(LeaseRecord {
            ticket,
            key: Key { namespace, name },
            mode,
            fence: u64s[0],
            uid,
            gid,
            pid: (pid >= 0).then_some(pid),
            client_name,
            acquired_at_ms: u64s[1],
            expires_at_ms: u64s[2],
            lease_ms: u64s[3],
            data,
            permits,
            lock_delay_ms,
        })
    }
}

fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    b.extend_from_slice(&(v.len() as u32).to_le_bytes());
    b.extend_from_slice(v);
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (head, tail) = b.split_at(n);
    *b = tail;
    Some(head)
}

fn take_array<const N: usize>(b: &mut &[u8]) -> Option<[u8; N]> {
    take(b, N)?.try_into().ok()
}

fn take_bytes<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = u32::from_le_bytes(take_array(b)?) as usize;
    take(b, len)
}

fn take_string(b: &mut &[u8]) -> Option<String> {
    String::from_utf8(take_bytes(b)?.to_vec()).ok()
}
