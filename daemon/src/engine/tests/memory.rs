//! What a held lock costs: pinned, so a change that makes every hold bigger fails here.

use std::mem::size_of;

use lockd_protocol::{Ticket, Wait};

use super::{acquire, granted, now, setup};
use crate::engine::conn::Held;
use crate::engine::lockspace::Stored;
use crate::peer::Owner;
use crate::table::{Entry, Holder};

/// One held session lock (no lease, no data), allocator overhead aside: its key's block in
/// the table, its share of the shards' bucket arrays and of its connection's map of holds.
/// This layout held 1,000,000 locks in 170 MiB of RSS (`lockd-bench --hold-many 1000000
/// --clients 100`), where 526 MiB were needed before.
#[tokio::test]
async fn a_held_lock_stays_within_its_memory_budget() {
    assert!(size_of::<Holder<Owner, Stored>>() <= 40, "a holder grew");
    assert!(size_of::<Entry<Owner, Stored>>() <= 48, "an entry grew");
    assert!(size_of::<Held>() <= 16, "a connection's hold grew");

    const N: usize = 10_000;
    let (s, _timers) = setup();
    let (mut conn, _mailbox) = s.conn(1, 1000);
    for i in 0..N {
        // Names as long as lockd-bench's.
        let op = acquire(
            &format!("lockd-bench-12345-hold-{i}"),
            Wait::No,
            None,
            false,
        );
        granted(now(conn.handle(i as u64 + 1, op)));
    }
    let table = s.engine.locks.heap_bytes();
    // A hash map's capacity is 7/8 of its buckets; each bucket has one control byte.
    let buckets = conn.holds.capacity() / 7 * 8;
    let holds = buckets * (size_of::<(Ticket, Held)>() + 1);
    let per_lock = (table + holds) / N;
    assert!(
        per_lock <= 160,
        "{per_lock} bytes per held lock (table {table}, connection's holds {holds})"
    );
}
