//! The address map: each live allocation's device address to its
//! [`inflight::Buffer`], so that a free or a `record_stream`, which PyTorch
//! makes with the bare address, finds its buffer.
//!
//! # Shards
//!
//! PyTorch allocates and frees from several threads at once (the Python
//! thread runs the forward pass, autograd's device thread the backward
//! pass), so one lock over one table would make every pair of calls meet.
//! The map is 64 tables, each behind its own lock on cache lines of its
//! own; an address picks its shard by a hash of its own. An uncontended
//! lock is one atomic read-modify-write to take and one to let go, and
//! the table's operations are a multiply and a probe or two: the whole map
//! costs a few tens of nanoseconds a pair (docs/TORCH.md has the measured
//! figure beside the Rust API's pair).
//!
//! # Hashing
//!
//! Addresses are aligned (256 bytes and up), so their low bits carry
//! nothing. Two different mixes are used: one picks the shard from the
//! high bits of one product, the other is the tables' hash, folded so that
//! its low bits (the bucket) and its top seven (the tag a probe compares)
//! both depend on every bit of the address, and neither repeats the shard's
//! choice.
//!
//! # Lock order
//!
//! A shard's lock is a leaf: nothing that may take another lock of this
//! crate or of the allocator runs under it, except [`inflight::Buffer`]'s
//! `record_stream`, which takes only that buffer's own stamp lock. Values
//! removed are returned and dropped by the caller, after the lock.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

/// Shards: a power of two.
const SHARDS: usize = 64;

/// Entries each shard has room for before it first grows.
const SHARD_CAPACITY: usize = 64;

/// The shard of an address: the top bits of a product of its significant
/// bits (those above the 256-byte alignment).
#[inline]
fn shard_of(addr: u64) -> usize {
    ((addr >> 8).wrapping_mul(0xD6E8_FEB8_6659_FD93) >> (64 - SHARDS.trailing_zeros())) as usize
}

/// The tables' hash of an address (see the module doc).
#[derive(Default, Clone, Copy)]
pub(crate) struct AddrHasher(u64);

impl Hasher for AddrHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write_u64(&mut self, addr: u64) {
        let h = addr.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = h ^ (h >> 32);
    }

    /// Keys are `u64`, hashed by `write_u64`; this is for completeness.
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(b));
        }
    }
}

type Table<V> = HashMap<u64, V, BuildHasherDefault<AddrHasher>>;

/// Device address → value, sharded (see the module doc).
pub(crate) struct AddressMap<V> {
    shards: Box<[CachePadded<Mutex<Table<V>>>]>,
}

impl<V> AddressMap<V> {
    /// An empty map.
    pub(crate) fn new() -> Self {
        AddressMap {
            shards: (0..SHARDS)
                .map(|_| {
                    CachePadded::new(Mutex::new(Table::with_capacity_and_hasher(
                        SHARD_CAPACITY,
                        Default::default(),
                    )))
                })
                .collect(),
        }
    }

    /// Files `value` under `addr`; returns what was there (an allocator that
    /// handed out one address twice: the caller reports it).
    #[inline]
    pub(crate) fn insert(&self, addr: u64, value: V) -> Option<V> {
        self.shards[shard_of(addr)].lock().insert(addr, value)
    }

    /// Takes the value under `addr` out of the map.
    #[inline]
    pub(crate) fn remove(&self, addr: u64) -> Option<V> {
        self.shards[shard_of(addr)].lock().remove(&addr)
    }

    /// Whether `addr` is in the map.
    pub(crate) fn contains(&self, addr: u64) -> bool {
        self.shards[shard_of(addr)].lock().contains_key(&addr)
    }

    /// Runs `f` on the value under `addr`, under its shard's lock (so `f`
    /// must be short and take no lock of its own but a leaf one).
    pub(crate) fn with<R>(&self, addr: u64, f: impl FnOnce(&V) -> R) -> Option<R> {
        self.shards[shard_of(addr)].lock().get(&addr).map(f)
    }

    /// Entries, summed over the shards (not a snapshot: shards are counted
    /// one at a time).
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_and_lookup() {
        let m = AddressMap::new();
        for i in 0..10_000u64 {
            assert!(m.insert(0x7f00_0000_0000 + (i << 9), i).is_none());
        }
        assert_eq!(m.len(), 10_000);
        assert_eq!(m.insert(0x7f00_0000_0000, 7), Some(0));
        assert_eq!(m.with(0x7f00_0000_0000 + (5 << 9), |v| *v), Some(5));
        assert!(m.contains(0x7f00_0000_0000 + (9_999 << 9)));
        assert_eq!(m.remove(0x7f00_0000_0000 + (5 << 9)), Some(5));
        assert_eq!(m.remove(0x7f00_0000_0000 + (5 << 9)), None);
        assert_eq!(m.with(0x7f00_0000_0000 + 1, |v| *v), None);
        assert_eq!(m.len(), 9_999);
    }

    /// Aligned addresses spread over every shard, not a few.
    #[test]
    fn aligned_addresses_spread_over_the_shards() {
        let mut seen = [0usize; SHARDS];
        for i in 0..(SHARDS as u64 * 64) {
            seen[shard_of(0x7f12_3400_0000 + i * (2 << 20))] += 1;
        }
        let (min, max) = (seen.iter().min().unwrap(), seen.iter().max().unwrap());
        assert!(*min > 16 && *max < 160, "shard loads {min}..{max}");
    }
}
