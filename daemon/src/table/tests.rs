//! The table's unit tests: grant rules, FIFO, shared/exclusive, cancel.

use super::*;

type T = Table<u32, ()>;

fn key(n: &str) -> Key {
    Key::new("default", n).unwrap()
}

struct Fences(u64);
impl Fences {
    fn f(&mut self) -> impl FnMut() -> u64 + '_ {
        move || {
            self.0 += 1;
            self.0
        }
    }
}

fn want(owner: u32, request: u64, mode: Mode, wait: bool) -> Want<u32, ()> {
    Want {
        owner,
        request,
        mode,
        wait,
        detached: false,
        permits: None,
        lock_delay: 0,
        payload: (),
    }
}

#[test]
fn exclusive_excludes_and_try_conflicts() {
    let (mut t, mut f, k) = (T::default(), Fences(0), key("a"));
    assert_eq!(
        t.acquire(&k, want(1, 1, Mode::Exclusive, false), 0, &mut f.f()),
        Acquired::Granted(1)
    );
    assert_eq!(
        t.acquire(&k, want(2, 1, Mode::Exclusive, false), 0, &mut f.f()),
        Acquired::Conflict
    );
    assert_eq!(
        t.acquire(&k, want(2, 2, Mode::Shared, false), 0, &mut f.f()),
        Acquired::Conflict
    );
    let (h, granted) = t.release(&k, 1, 0, &mut f.f()).unwrap();
    assert_eq!(h.owner, 1);
    assert!(granted.is_empty());
    assert!(t.is_empty(), "empty keys disappear");
}

#[test]
fn shared_holders_coexist_and_writer_blocks_later_readers() {
    let (mut t, mut f, k) = (T::default(), Fences(0), key("a"));
    assert_eq!(
        t.acquire(&k, want(1, 1, Mode::Shared, false), 0, &mut f.f()),
        Acquired::Granted(1)
    );
    assert_eq!(
        t.acquire(&k, want(2, 1, Mode::Shared, false), 0, &mut f.f()),
        Acquired::Granted(2)
    );
    assert_eq!(
        t.acquire(&k, want(3, 1, Mode::Exclusive, true), 0, &mut f.f()),
        Acquired::Queued
    );
    // A shared request behind a queued writer waits, and a shared try conflicts.
    assert_eq!(
        t.acquire(&k, want(4, 1, Mode::Shared, true), 0, &mut f.f()),
        Acquired::Queued
    );
    assert_eq!(
        t.acquire(&k, want(5, 1, Mode::Shared, false), 0, &mut f.f()),
        Acquired::Conflict
    );
    assert!(t.release(&k, 1, 0, &mut f.f()).unwrap().1.is_empty());
    let granted = t.release(&k, 2, 0, &mut f.f()).unwrap().1;
    assert_eq!(granted.len(), 1);
    assert_eq!((granted[0].owner, granted[0].mode), (3, Mode::Exclusive));
    let granted = t.release(&k, granted[0].fence, 0, &mut f.f()).unwrap().1;
    assert_eq!(granted.iter().map(|g| g.owner).collect::<Vec<_>>(), vec![4]);
}

#[test]
fn consecutive_shared_heads_are_granted_together() {
    let (mut t, mut f, k) = (T::default(), Fences(0), key("a"));
    t.acquire(&k, want(1, 1, Mode::Exclusive, false), 0, &mut f.f());
    for o in 2..5 {
        assert_eq!(
            t.acquire(&k, want(o, 1, Mode::Shared, true), 0, &mut f.f()),
            Acquired::Queued
        );
    }
    t.acquire(&k, want(5, 1, Mode::Exclusive, true), 0, &mut f.f());
    t.acquire(&k, want(6, 1, Mode::Shared, true), 0, &mut f.f());
    let granted = t.release(&k, 1, 0, &mut f.f()).unwrap().1;
    assert_eq!(
        granted.iter().map(|g| g.owner).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    let fences: Vec<u64> = granted.iter().map(|g| g.fence).collect();
    assert!(fences.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn cancel_of_blocking_writer_lets_readers_through() {
    let (mut t, mut f, k) = (T::default(), Fences(0), key("a"));
    t.acquire(&k, want(1, 1, Mode::Shared, false), 0, &mut f.f());
    t.acquire(&k, want(2, 7, Mode::Exclusive, true), 0, &mut f.f());
    t.acquire(&k, want(3, 1, Mode::Shared, true), 0, &mut f.f());
    assert!(
        t.cancel(&k, &2, 8, 0, &mut f.f()).is_none(),
        "wrong request id"
    );
    assert!(t.cancel(&k, &3, 7, 0, &mut f.f()).is_none(), "wrong owner");
    let (w, granted) = t.cancel(&k, &2, 7, 0, &mut f.f()).unwrap();
    assert_eq!(w.owner, 2);
    assert_eq!(granted.iter().map(|g| g.owner).collect::<Vec<_>>(), vec![3]);
}

#[test]
fn remove_owner_drops_holds_and_waits_then_grants_next() {
    let (mut t, mut f, k) = (T::default(), Fences(0), key("a"));
    t.acquire(&k, want(1, 1, Mode::Exclusive, false), 0, &mut f.f());
    t.acquire(&k, want(1, 2, Mode::Exclusive, true), 0, &mut f.f());
    t.acquire(&k, want(2, 1, Mode::Exclusive, true), 0, &mut f.f());
    let (removed, granted) = t.remove_owner(&k, &1, 0, &mut f.f());
    assert_eq!(removed.len(), 1);
    assert_eq!(granted.len(), 1);
    assert_eq!(granted[0].owner, 2);
    assert_eq!(t.get(&k).unwrap().queue.len(), 0);
}

#[test]
fn release_of_unknown_fence_changes_nothing() {
    let (mut t, mut f, k) = (T::default(), Fences(0), key("a"));
    t.acquire(&k, want(1, 1, Mode::Exclusive, false), 0, &mut f.f());
    assert!(t.release(&k, 99, 0, &mut f.f()).is_none());
    assert!(t.release(&key("b"), 1, 0, &mut f.f()).is_none());
    assert_eq!(t.get(&k).unwrap().holders.len(), 1);
}

#[test]
fn a_table_that_emptied_gives_its_memory_back() {
    let (mut t, mut f) = (T::default(), Fences(0));
    let keys: Vec<Key> = (0..20_000).map(|i| key(&format!("k{i}"))).collect();
    for k in &keys {
        t.acquire(k, want(1, 1, Mode::Exclusive, false), 0, &mut f.f());
    }
    let full = t.entries.capacity();
    for (i, k) in keys.iter().enumerate() {
        t.release(k, i as u64 + 1, 0, &mut f.f()).unwrap();
    }
    assert!(t.is_empty());
    assert!(
        t.entries.capacity() * 8 <= full,
        "capacity {} after release, {full} when full",
        t.entries.capacity()
    );
}
