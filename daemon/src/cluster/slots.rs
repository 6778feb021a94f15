//! The slots entry names are made of (`LEASE.SLOT`), per key and session generation: the
//! lowest free slot is handed out, a freed one comes back, a burned one never does.
//! `index.rs` decides when a slot is freed or burned; this module only counts.
//!
//! Invariants:
//! - a burned slot is never handed out again in its generation: every key's numbering starts
//!   above the highest burned slot (`floor`), whatever became of the key's bookkeeping.
//! - a key with no slot out has no bookkeeping, so it costs nothing while unused.
//! - only the newest generation has slots: a newer one starts over (its lease, and so every
//!   name, is new); an older one is never handed any.

use foldhash::{HashMap, HashMapExt};

/// The slots of one key.
struct KeySlots {
    next: u64,
    free: Vec<u64>,
    /// Slots handed out and neither freed nor burned.
    out: usize,
}

/// See the module doc.
pub struct Slots {
    /// The session generation the slots belong to.
    generation: u64,
    /// By key prefix.
    keys: HashMap<Vec<u8>, KeySlots>,
    /// Above every slot burned in this generation.
    floor: u64,
}

impl Default for Slots {
    fn default() -> Slots {
        Slots {
            generation: 0,
            keys: HashMap::new(),
            floor: 0,
        }
    }
}

impl Slots {
    /// The generation the slots belong to (the newest seen).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The lowest free slot of the key with prefix `prefix` in `generation`, which must not be
    /// older than [`Slots::generation`].
    pub fn take(&mut self, prefix: &[u8], generation: u64) -> u64 {
        if generation > self.generation {
            self.keys.clear();
            self.floor = 0;
            self.generation = generation;
        }
        let floor = self.floor;
        let slots = match self.keys.get_mut(prefix) {
            Some(s) => s,
            None => self.keys.entry(prefix.to_vec()).or_insert(KeySlots {
                next: floor,
                free: Vec::new(),
                out: 0,
            }),
        };
        slots.out += 1;
        match slots.free.iter().enumerate().min_by_key(|(_, s)| **s) {
            Some((i, _)) => slots.free.swap_remove(i),
            None => {
                slots.next += 1;
                slots.next - 1
            }
        }
    }

    /// Ends the use of `slot` (key prefix and slot) taken in `generation`: `reuse` it, or burn
    /// it for the rest of the generation.
    pub fn end(&mut self, generation: u64, slot: Option<(Vec<u8>, u64)>, reuse: bool) {
        let Some((prefix, n)) = slot else { return };
        if generation != self.generation {
            return;
        }
        let Some(slots) = self.keys.get_mut(&prefix) else {
            return;
        };
        slots.out = slots.out.saturating_sub(1);
        if reuse {
            slots.free.push(n);
        } else {
            self.floor = self.floor.max(n + 1);
        }
        if slots.out == 0 {
            self.keys.remove(&prefix);
        }
    }

    /// The session lease of `generation` is gone, and every name on it.
    pub fn lose(&mut self, generation: u64) {
        if generation == self.generation {
            self.keys.clear();
            self.floor = 0;
        }
    }

    /// Keys with bookkeeping.
    #[cfg(test)]
    pub fn keys(&self) -> usize {
        self.keys.len()
    }
}
