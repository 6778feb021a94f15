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

fn acquire(t: &mut T, k: &Key, want: Want<u32, ()>, f: &mut Fences) -> Acquired {
    let k = t.hasher().hashed(k);
    t.acquire(k, want, 0, &mut f.f())
}

fn release(
    t: &mut T,
    k: &Key,
    fence: u64,
    f: &mut Fences,
) -> Option<Outcome<Holder<u32, ()>, u32>> {
    let k = t.hasher().hashed(k);
    t.release(At::Key(k), fence, 0, &mut f.f())
}

fn cancel(
    t: &mut T,
    k: &Key,
    owner: u32,
    request: u64,
    f: &mut Fences,
) -> Option<Outcome<Waiter<u32, ()>, u32>> {
    let k = t.hasher().hashed(k);
    t.cancel(k, &owner, request, 0, &mut f.f())
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
        acquire(&mut t, &k, want(1, 1, Mode::Exclusive, false), &mut f),
        Acquired::Granted(1)
    );
    assert_eq!(
        acquire(&mut t, &k, want(2, 1, Mode::Exclusive, false), &mut f),
        Acquired::Conflict
    );
    assert_eq!(
        acquire(&mut t, &k, want(2, 2, Mode::Shared, false), &mut f),
        Acquired::Conflict
    );
    let Outcome {
        removed: h,
        granted,
        ..
    } = release(&mut t, &k, 1, &mut f).unwrap();
    assert_eq!(h.owner, 1);
    assert!(granted.is_empty());
    assert!(t.is_empty(), "empty keys disappear");
}

#[test]
fn shared_holders_coexist_and_writer_blocks_later_readers() {
    let (mut t, mut f, k) = (T::default(), Fences(0), key("a"));
    assert_eq!(
        acquire(&mut t, &k, want(1, 1, Mode::Shared, false), &mut f),
        Acquired::Granted(1)
    );
    assert_eq!(
        acquire(&mut t, &k, want(2, 1, Mode::Shared, false), &mut f),
        Acquired::Granted(2)
    );
    assert_eq!(
        acquire(&mut t, &k, want(3, 1, Mode::Exclusive, true), &mut f),
        Acquired::Queued
    );
    // A shared request behind a queued writer waits, and a shared try conflicts.
    assert_eq!(
        acquire(&mut t, &k, want(4, 1, Mode::Shared, true), &mut f),
        Acquired::Queued
    );
    assert_eq!(
        acquire(&mut t, &k, want(5, 1, Mode::Shared, false), &mut f),
        Acquired::Conflict
    );
    assert!(release(&mut t, &k, 1, &mut f).unwrap().granted.is_empty());
    let granted = release(&mut t, &k, 2, &mut f).unwrap().granted;
    assert_eq!(granted.len(), 1);
    assert_eq!((granted[0].owner, granted[0].mode), (3, Mode::Exclusive));
    let granted = release(&mut t, &k, granted[0].fence, &mut f)
        .unwrap()
        .granted;
    assert_eq!(granted.iter().map(|g| g.owner).collect::<Vec<_>>(), vec![4]);
}

#[test]
fn consecutive_shared_heads_are_granted_together() {
    let (mut t, mut f, k) = (T::default(), Fences(0), key("a"));
    acquire(&mut t, &k, want(1, 1, Mode::Exclusive, false), &mut f);
    for o in 2..5 {
        assert_eq!(
            acquire(&mut t, &k, want(o, 1, Mode::Shared, true), &mut f),
            Acquired::Queued
        );
    }
    acquire(&mut t, &k, want(5, 1, Mode::Exclusive, true), &mut f);
    acquire(&mut t, &k, want(6, 1, Mode::Shared, true), &mut f);
    let granted = release(&mut t, &k, 1, &mut f).unwrap().granted;
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
    acquire(&mut t, &k, want(1, 1, Mode::Shared, false), &mut f);
    acquire(&mut t, &k, want(2, 7, Mode::Exclusive, true), &mut f);
    acquire(&mut t, &k, want(3, 1, Mode::Shared, true), &mut f);
    assert!(
        cancel(&mut t, &k, 2, 8, &mut f).is_none(),
        "wrong request id"
    );
    assert!(cancel(&mut t, &k, 3, 7, &mut f).is_none(), "wrong owner");
    let Outcome {
        removed: w,
        granted,
        ..
    } = cancel(&mut t, &k, 2, 7, &mut f).unwrap();
    assert_eq!(w.owner, 2);
    assert_eq!(granted.iter().map(|g| g.owner).collect::<Vec<_>>(), vec![3]);
}

#[test]
fn remove_owner_drops_holds_and_waits_then_grants_next() {
    let (mut t, mut f, k) = (T::default(), Fences(0), key("a"));
    acquire(&mut t, &k, want(1, 1, Mode::Exclusive, false), &mut f);
    acquire(&mut t, &k, want(1, 2, Mode::Exclusive, true), &mut f);
    acquire(&mut t, &k, want(2, 1, Mode::Exclusive, true), &mut f);
    let Outcome {
        removed, granted, ..
    } = t.remove_owner(At::Key(t.hasher().hashed(&k)), &1, 0, &mut f.f());
    assert_eq!(removed.len(), 1);
    assert_eq!(granted.len(), 1);
    assert_eq!(granted[0].owner, 2);
    assert_eq!(t.get(t.hasher().hashed(&k)).unwrap().queue_len(), 0);
}

#[test]
fn release_of_unknown_fence_changes_nothing() {
    let (mut t, mut f, k) = (T::default(), Fences(0), key("a"));
    acquire(&mut t, &k, want(1, 1, Mode::Exclusive, false), &mut f);
    assert!(release(&mut t, &k, 99, &mut f).is_none());
    assert!(release(&mut t, &key("b"), 1, &mut f).is_none());
    assert_eq!(t.get(t.hasher().hashed(&k)).unwrap().holders().len(), 1);
}

#[test]
fn a_table_that_emptied_gives_its_memory_back() {
    let (mut t, mut f) = (T::default(), Fences(0));
    let keys: Vec<Key> = (0..20_000).map(|i| key(&format!("k{i}"))).collect();
    for k in &keys {
        acquire(&mut t, k, want(1, 1, Mode::Exclusive, false), &mut f);
    }
    let full = t.nodes.capacity();
    for (i, k) in keys.iter().enumerate() {
        release(&mut t, k, i as u64 + 1, &mut f).unwrap();
    }
    assert!(t.is_empty());
    assert!(
        t.nodes.capacity() * 8 <= full,
        "capacity {} after release, {full} when full",
        t.nodes.capacity()
    );
}
