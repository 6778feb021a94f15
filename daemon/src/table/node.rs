//! One key of the table in one heap block: its entry, then its namespace and name.
//!
//! A held key costs one allocation: the entry (holders, a pointer to the rarely used parts)
//! followed by the key's bytes, `[ns_len][name_len][namespace][name]` with both lengths as
//! LEB128 varints (one byte each for names under 128 bytes). The hash table holds only the
//! thin pointer, so its empty buckets cost 8 bytes each.
//!
//! This is the table's only unsafe code: a hand-made layout (the standard library has no thin
//! box for "a value followed by bytes"). Every block is made by [`Node::new`] and freed by
//! `Drop` with the layout recomputed from the stored lengths.

use std::alloc::{self, Layout};
use std::marker::PhantomData;
use std::ptr::NonNull;

/// A `V` followed by a key's namespace and name, behind one thin pointer.
pub(super) struct Node<V> {
    ptr: NonNull<u8>,
    _owns: PhantomData<V>,
}

// SAFETY: a `Node<V>` owns its `V` and its bytes exclusively, like a `Box<V>`.
unsafe impl<V: Send> Send for Node<V> {}
// SAFETY: as above; `&Node<V>` gives out only `&V` and `&str`.
unsafe impl<V: Sync> Sync for Node<V> {}

/// Longest LEB128 encoding of a `usize`.
const MAX_VARINT: usize = 10;

fn put_varint(buf: &mut [u8; 2 * MAX_VARINT], at: &mut usize, mut n: usize) {
    loop {
        let low = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            buf[*at] = low;
            *at += 1;
            return;
        }
        buf[*at] = low | 0x80;
        *at += 1;
    }
}

/// Decodes a varint written by [`put_varint`] at `p`; returns it and its length.
///
/// # Safety
/// `p` points at a complete varint written by `put_varint`.
unsafe fn get_varint(p: *const u8) -> (usize, usize) {
    let (mut n, mut shift, mut i) = (0usize, 0u32, 0usize);
    loop {
        // SAFETY: the caller guarantees a complete varint at `p`: byte `i` belongs to it.
        let b = unsafe { *p.add(i) };
        n |= usize::from(b & 0x7f) << shift;
        i += 1;
        if b & 0x80 == 0 {
            return (n, i);
        }
        shift += 7;
    }
}

impl<V> Node<V> {
    /// The block's layout for a key tail of `tail` bytes, and where the tail starts.
    fn layout(tail: usize) -> (Layout, usize) {
        let bytes = Layout::array::<u8>(tail).expect("a key tail fits in memory");
        let (layout, offset) = Layout::new::<V>()
            .extend(bytes)
            .expect("a key tail fits in memory");
        (layout.pad_to_align(), offset)
    }

    /// Where the key's bytes start.
    fn tail(&self) -> *const u8 {
        let (_, offset) = Self::layout(0);
        // SAFETY: the block holds a `V` and then at least the two varints: `offset` is in it.
        unsafe { self.ptr.as_ptr().add(offset) }
    }

    /// (namespace length, name length, length of the two varints).
    fn lengths(&self) -> (usize, usize, usize) {
        let p = self.tail();
        // SAFETY: `new` wrote two complete varints at the tail's start.
        let (ns, a) = unsafe { get_varint(p) };
        // SAFETY: as above, the second follows the first.
        let (name, b) = unsafe { get_varint(p.add(a)) };
        (ns, name, a + b)
    }

    /// Moves `value` and copies `namespace` and `name` into one new block.
    pub fn new(value: V, namespace: &str, name: &str) -> Node<V> {
        let mut head = [0u8; 2 * MAX_VARINT];
        let mut h = 0;
        put_varint(&mut head, &mut h, namespace.len());
        put_varint(&mut head, &mut h, name.len());
        let tail = h + namespace.len() + name.len();
        let (layout, offset) = Self::layout(tail);
        // SAFETY: the layout is not zero-sized (the tail has at least the two varints).
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        // SAFETY: the block is fresh and `layout` has room for a `V` at 0 (aligned as `V`) and
        // `tail` bytes at `offset`; the sources do not overlap it.
        unsafe {
            ptr.as_ptr().cast::<V>().write(value);
            let t = ptr.as_ptr().add(offset);
            std::ptr::copy_nonoverlapping(head.as_ptr(), t, h);
            let t = t.add(h);
            std::ptr::copy_nonoverlapping(namespace.as_ptr(), t, namespace.len());
            let t = t.add(namespace.len());
            std::ptr::copy_nonoverlapping(name.as_ptr(), t, name.len());
        }
        Node {
            ptr,
            _owns: PhantomData,
        }
    }

    pub fn value(&self) -> &V {
        // SAFETY: `new` wrote a `V` at the block's start; it lives until `drop`.
        unsafe { &*self.ptr.as_ptr().cast::<V>() }
    }

    pub fn value_mut(&mut self) -> &mut V {
        // SAFETY: as in `value`; `&mut self` makes the access exclusive.
        unsafe { &mut *self.ptr.as_ptr().cast::<V>() }
    }

    /// The key's namespace and name.
    pub fn key(&self) -> (&str, &str) {
        // SAFETY: the strings live as long as `self` and nothing writes to them.
        unsafe { self.key_unbound() }
    }

    /// The key and the value at once (they do not overlap).
    pub fn split_mut(&mut self) -> ((&str, &str), &mut V) {
        // SAFETY: the key's bytes lie after the value and are never written after `new`, so
        // shared references to them may live beside the exclusive one to the value.
        let key = unsafe { self.key_unbound() };
        // SAFETY: as in `value`; `&mut self` makes the access exclusive.
        let value = unsafe { &mut *self.ptr.as_ptr().cast::<V>() };
        (key, value)
    }

    /// # Safety
    /// The caller bounds the returned lifetime by a borrow of `self`.
    unsafe fn key_unbound<'a>(&self) -> (&'a str, &'a str) {
        let (ns, name, h) = self.lengths();
        // SAFETY: `new` copied `ns` bytes of a `&str` and then `name` bytes of another right
        // after the varints; both are valid UTF-8 and live as long as the block.
        unsafe {
            let p = self.tail().add(h);
            let namespace = std::slice::from_raw_parts(p, ns);
            let name = std::slice::from_raw_parts(p.add(ns), name);
            (
                std::str::from_utf8_unchecked(namespace),
                std::str::from_utf8_unchecked(name),
            )
        }
    }

    /// Bytes this block asks the allocator for (tests pin the per-key budget with it).
    #[cfg(test)]
    pub fn block_size(&self) -> usize {
        let (ns, name, h) = self.lengths();
        Self::layout(h + ns + name).0.size()
    }
}

impl<V> Drop for Node<V> {
    fn drop(&mut self) {
        let (ns, name, h) = self.lengths();
        let (layout, _) = Self::layout(h + ns + name);
        // SAFETY: the `V` written by `new` is still there and dropped once; the block was
        // allocated by `new` with this same layout (recomputed from the same lengths).
        unsafe {
            std::ptr::drop_in_place(self.ptr.as_ptr().cast::<V>());
            alloc::dealloc(self.ptr.as_ptr(), layout);
        }
    }
}

impl<V: std::fmt::Debug> std::fmt::Debug for Node<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ns, name) = self.key();
        f.debug_struct("Node")
            .field("key", &format_args!("{ns}/{name}"))
            .field("value", self.value())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::Node;

    #[test]
    fn keeps_the_key_and_drops_the_value_once() {
        let value = Arc::new(());
        for len in [0usize, 1, 22, 127, 128, 255, 256, 300, 20_000] {
            let name: String = "é".repeat(len / 2) + &"n".repeat(len % 2);
            let node = Node::new((Arc::clone(&value), len as u64), "some.namespace", &name);
            assert_eq!(node.key(), ("some.namespace", name.as_str()));
            assert_eq!(node.value().1, len as u64);
            assert_eq!(Arc::strong_count(&value), 2);
            drop(node);
            assert_eq!(Arc::strong_count(&value), 1);
        }
    }

    #[test]
    fn value_is_mutable_in_place() {
        let mut node = Node::new(vec![1u32], "default", "k");
        node.value_mut().push(2);
        assert_eq!(node.value(), &vec![1, 2]);
        assert_eq!(node.key(), ("default", "k"));
    }

    #[test]
    fn one_block_holds_value_and_key() {
        let node = Node::new([0u64; 6], "default", "lockd-bench-12345-hold-999999");
        // 48 bytes of value, 2 varint bytes, 7 + 29 key bytes, rounded to 8.
        assert_eq!(node.block_size(), 88);
    }
}
