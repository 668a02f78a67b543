//! The ready list: idle blocks by size for best fit, and by age for trimming.
//!
//! A block here has no incomplete recorded use (under the `Immediate` policy
//! this is not checked: that is the defect). Best fit takes the smallest
//! block at least as large as the request and below the fit bound (see
//! [`crate::Config::fit_factor`]); trimming takes the least recently freed.
//!
//! # Invariant
//!
//! `by_size` and `by_age` hold the same blocks: every `(size, tick)` key of
//! one has its twin in the other, and `bytes` is the sum of their sizes.

use std::collections::BTreeMap;

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

/// Idle blocks, ordered for best fit and for LRU trimming.
#[derive(Debug)]
pub struct ReadyList<R> {
    by_size: BTreeMap<(u64, u64), Block<R>>,
    by_age: BTreeMap<u64, u64>,
    bytes: u64,
    tick: u64,
}

impl<R> Default for ReadyList<R> {
    fn default() -> Self {
        ReadyList {
            by_size: BTreeMap::new(),
            by_age: BTreeMap::new(),
            bytes: 0,
            tick: 0,
        }
    }
}

impl<R> ReadyList<R> {
    /// Files an idle block as the most recently used.
    pub fn insert(&mut self, block: Block<R>) {
        self.tick += 1;
        let tick = self.tick;
        self.bytes += block.size;
        self.by_age.insert(tick, block.size);
        self.by_size.insert((block.size, tick), block);
    }

    /// Takes the smallest block with `size <= block.size < bound`.
    pub fn take_best_fit(&mut self, size: u64, bound: u64) -> Option<Block<R>> {
        let (&(found, tick), _) = self.by_size.range((size, 0)..).next()?;
        if found >= bound {
            return None;
        }
        self.remove(found, tick)
    }

    /// Takes the least recently freed block.
    pub fn pop_oldest(&mut self) -> Option<Block<R>> {
        let (&tick, &size) = self.by_age.iter().next()?;
        self.remove(size, tick)
    }

    fn remove(&mut self, size: u64, tick: u64) -> Option<Block<R>> {
        let block = self.by_size.remove(&(size, tick))?;
        self.by_age.remove(&tick);
        self.bytes -= block.size;
        Some(block)
    }

    /// Total bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.by_size.len()
    }

    /// Whether no block is held.
    pub fn is_empty(&self) -> bool {
        self.by_size.is_empty()
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
