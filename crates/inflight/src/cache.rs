//! The ready list: idle blocks by size for best fit, and by age for trimming.
//!
//! A block here has no incomplete recorded use (under the `Immediate` policy
//! this is not checked: that is the defect). Best fit takes a block of the
//! exact size if one is cached (the common case, in O(1)), else the smallest
//! larger block below the fit bound (see [`crate::Config::fit_factor`]);
//! trimming takes the least recently freed.
//!
//! # Layout
//!
//! ```text
//! buckets: size ─> VecDeque<(tick, Block)>   oldest at the front, newest at the back
//! sizes:   BTreeSet<size>                    every size with a bucket, for range search
//! age:     VecDeque<(tick, size)>            every insert, oldest first; lazily pruned
//! ```
//!
//! A hit pops the *newest* block of a bucket (its memory is the warmest); a
//! trim pops the *oldest* entry of `age` and takes the block only if it is
//! still the front of its bucket.
//!
//! # Invariant
//!
//! Ticks grow with every insert and each bucket holds its blocks in tick
//! order, so an `age` entry `(t, s)` is live exactly when bucket `s` still
//! holds tick `t`, and the oldest live entry is always its bucket's front.
//! `bytes` and `len` are the sums over the buckets.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use crate::timeline::Stamps;

/// A device allocation as the cache holds it.
#[derive(Debug)]
pub struct Block<R> {
    /// The raw device buffer.
    pub raw: R,
    /// Its size in bytes (the rounded request).
    pub size: u64,
    /// The allocator-wide id of the device allocation.
    pub id: u64,
    /// The last recorded use on each queue.
    pub stamps: Stamps,
    /// Release rather than cache once idle (set by `clear_cache` on pending blocks).
    pub release_when_idle: bool,
}

/// Hashes a block size (a multiple of 4) with one multiply: sizes are
/// already well spread in their high bits once multiplied.
#[derive(Default)]
pub struct SizeHasher(u64);

impl Hasher for SizeHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Buckets<R> = HashMap<u64, VecDeque<(u64, Block<R>)>, BuildHasherDefault<SizeHasher>>;

/// Empty buckets kept before they are swept (a bucket that empties and fills
/// again on every hit/free pair should not churn the size index).
const EMPTY_BUCKETS_KEPT: usize = 256;

/// Idle blocks, ordered for best fit and for LRU trimming.
#[derive(Debug)]
pub struct ReadyList<R> {
    buckets: Buckets<R>,
    sizes: BTreeSet<u64>,
    age: VecDeque<(u64, u64)>,
    bytes: u64,
    len: usize,
    tick: u64,
}

impl<R> Default for ReadyList<R> {
    fn default() -> Self {
        ReadyList {
            buckets: HashMap::default(),
            sizes: BTreeSet::new(),
            age: VecDeque::new(),
            bytes: 0,
            len: 0,
            tick: 0,
        }
    }
}

impl<R> ReadyList<R> {
    /// Files an idle block as the most recently used.
    pub fn insert(&mut self, block: Block<R>) {
        self.tick += 1;
        let (tick, size) = (self.tick, block.size);
        self.bytes += size;
        self.len += 1;
        let bucket = self.buckets.entry(size).or_insert_with(|| {
            self.sizes.insert(size);
            VecDeque::new()
        });
        bucket.push_back((tick, block));
        self.age.push_back((tick, size));
        if self.age.len() > 2 * self.len + 1024 {
            self.prune_age();
        }
    }

    /// Takes the smallest block with `size <= block.size < bound`: one of
    /// exactly `size` bytes if cached, else the smallest larger one.
    #[inline]
    pub fn take_best_fit(&mut self, size: u64, bound: u64) -> Option<Block<R>> {
        let found = match self.buckets.get_mut(&size) {
            Some(bucket) if !bucket.is_empty() => size,
            _ => {
                let buckets = &self.buckets;
                *self
                    .sizes
                    .range(size..bound)
                    .find(|s| buckets.get(s).is_some_and(|b| !b.is_empty()))?
            }
        };
        let (tick, block) = self.buckets.get_mut(&found)?.pop_back()?;
        // Hit/free ping-pong: the block freed last is taken first, and its
        // age entry is the newest; drop it now rather than prune it later.
        if self.age.back() == Some(&(tick, found)) {
            self.age.pop_back();
        }
        self.took(&block);
        Some(block)
    }

    /// Takes the least recently freed block.
    pub fn pop_oldest(&mut self) -> Option<Block<R>> {
        while let Some((tick, size)) = self.age.pop_front() {
            let Some(bucket) = self.buckets.get_mut(&size) else {
                continue;
            };
            if bucket.front().is_some_and(|(t, _)| *t == tick) {
                let (_, block) = bucket.pop_front()?;
                self.took(&block);
                return Some(block);
            }
            // Stale: that block was taken by a hit since.
        }
        None
    }

    fn took(&mut self, block: &Block<R>) {
        self.bytes -= block.size;
        self.len -= 1;
        if self.buckets.len() > self.len + EMPTY_BUCKETS_KEPT {
            self.sweep_empty_buckets();
        }
    }

    /// Drops `age` entries whose blocks were taken by hits.
    fn prune_age(&mut self) {
        let buckets = &self.buckets;
        self.age.retain(|&(tick, size)| {
            buckets
                .get(&size)
                .is_some_and(|b| b.binary_search_by_key(&tick, |(t, _)| *t).is_ok())
        });
    }

    /// Forgets buckets that hold nothing.
    fn sweep_empty_buckets(&mut self) {
        let sizes = &mut self.sizes;
        self.buckets.retain(|size, b| {
            let keep = !b.is_empty();
            if !keep {
                sizes.remove(size);
            }
            keep
        });
    }

    /// Total bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(size: u64, id: u64) -> Block<()> {
        Block {
            raw: (),
            size,
            id,
            stamps: Stamps::default(),
            release_when_idle: false,
        }
    }

    #[test]
    fn best_fit_takes_the_smallest_large_enough_block_within_bound() {
        let mut r = ReadyList::default();
        r.insert(block(100, 1));
        r.insert(block(300, 2));
        r.insert(block(200, 3));
        assert_eq!(r.take_best_fit(150, 250).map(|b| b.id), Some(3));
        assert!(r.take_best_fit(150, 250).is_none(), "300 is past the bound");
        assert_eq!(r.take_best_fit(50, 1000).map(|b| b.id), Some(1));
        assert_eq!(r.bytes(), 300);
    }

    #[test]
    fn exact_size_hits_take_the_newest_block() {
        let mut r = ReadyList::default();
        r.insert(block(64, 1));
        r.insert(block(64, 2));
        assert_eq!(r.take_best_fit(64, 65).map(|b| b.id), Some(2));
        assert_eq!(r.pop_oldest().map(|b| b.id), Some(1));
        assert!(r.pop_oldest().is_none());
    }

    #[test]
    fn age_index_stays_bounded_under_hit_free_churn() {
        let mut r = ReadyList::default();
        r.insert(block(4096, 0));
        for i in 1..100_000 {
            let b = r.take_best_fit(4096, 8192).unwrap();
            r.insert(Block { id: i, ..b });
        }
        assert!(
            r.age.len() <= 2 * r.len() + 1025,
            "age grew to {}",
            r.age.len()
        );
        assert_eq!(r.pop_oldest().map(|b| b.id), Some(99_999));
        for s in 1..2000u64 {
            r.insert(block(s * 4, s));
            let _ = r.take_best_fit(s * 4, s * 4 + 1);
        }
        assert!(
            r.buckets.len() <= EMPTY_BUCKETS_KEPT + 1,
            "{} buckets",
            r.buckets.len()
        );
        assert_eq!(r.sizes.len(), r.buckets.len());
    }

    #[test]
    fn trimming_goes_oldest_first() {
        let mut r = ReadyList::default();
        for id in 0..4 {
            r.insert(block(64 * (4 - id), id));
        }
        let _ = r.take_best_fit(128, 129);
        let order: Vec<u64> = std::iter::from_fn(|| r.pop_oldest())
            .map(|b| b.id)
            .collect();
        assert_eq!(order, vec![0, 1, 3]);
        assert!(r.is_empty());
        assert_eq!(r.bytes(), 0);
    }
}
