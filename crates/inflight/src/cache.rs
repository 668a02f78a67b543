//! The ready list: idle blocks by size for best fit, and by age for trimming.
//!
//! A block here has no incomplete recorded use (under the `Immediate` policy
//! this is not checked: that is the defect). Best fit takes a block of the
//! exact size if one is cached (the common case, in O(1)), else the smallest
//! larger block below the fit bound (see [`crate::Config::fit_factor`]);
//! trimming takes the least recently freed, in O(1). Nothing is pruned
//! lazily: every structure holds exactly the blocks present, plus at most
//! `EMPTY_BUCKETS_KEPT` empty buckets.
//!
//! # Layout
//!
//! ```text
//! nodes:    Vec<Node>                 a slab: one node per block, free slots chained
//!   Node { block, bucket, older, newer }   older/newer: the age list, doubly linked
//! oldest, newest                      the ends of the age list (every block, by insert)
//! buckets:  Vec<Bucket>               a slab: one slot per indexed size, free slots chained
//!   Bucket { size, blocks: VecDeque<node>, prev, next }
//!                                     blocks: oldest at the front, newest at the back;
//!                                     prev/next: the empty-bucket list, while empty
//! by_size:  HashMap<size, bucket>     exact lookup (the cheap `SizeHasher`)
//! sizes:    BTreeMap<size, bucket>    the same sizes in order, for range search
//! empty:    head, tail, count         indexed buckets holding nothing, least recently
//!                                     emptied first
//! ```
//!
//! A hit pops the *newest* node of a bucket (its memory is the warmest) and
//! unlinks it from the age list; a trim takes the head of the age list, which
//! is always the front of its bucket. Either way the node's slot goes back on
//! the free chain, so a hit/free pair reuses one slot and allocates nothing.
//! A bucket that empties is kept indexed (a bucket that empties and fills
//! again on every hit/free pair must not churn the size index) on the
//! empty-bucket list; past `EMPTY_BUCKETS_KEPT` the least recently emptied
//! one is dropped from both indexes. So every operation is O(1) except where
//! the ordered index is touched: the range search when the exact bucket is
//! empty, and indexing a new size or dropping an empty one (O(log sizes)).
//!
//! # Invariant
//!
//! - The age list runs through exactly the occupied nodes, oldest (least
//!   recently inserted) first; a node's `bucket` is the slot of its size.
//! - Each bucket's `blocks` are exactly the nodes of its size, in age-list
//!   order. Inserts append to both and removals take a bucket's back (hits)
//!   or the age list's head (trims), so the two orders never disagree and
//!   the head of the age list is always the front of its bucket.
//! - `by_size` and `sizes` index the same buckets; an indexed bucket is on
//!   the empty-bucket list exactly when it holds nothing, and that list has
//!   at most `EMPTY_BUCKETS_KEPT` entries. So the best-fit range search
//!   skips at most that many empty sizes.
//! - `bytes` and `len` are the sums over the occupied nodes.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use crate::timeline::Stamps;

/// A device allocation as the cache holds it.
#[derive(Debug)]
pub struct Block<R> {
    /// The raw device buffer.
    pub raw: R,
    /// Where the block starts in `raw`.
    pub offset: u64,
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

/// Empty buckets kept indexed (a bucket that empties and fills again on
/// every hit/free pair should not churn the size index); past this many the
/// least recently emptied is dropped.
const EMPTY_BUCKETS_KEPT: usize = 256;

/// No node or bucket: the end of a list.
const NIL: u32 = u32::MAX;

/// A slab slot for one block.
#[derive(Debug)]
struct Node<R> {
    /// The block; `None` while the slot is on the free chain.
    block: Option<Block<R>>,
    /// The slot in `buckets` of the block's size.
    bucket: u32,
    /// The next older node in the age list, or `NIL` at the oldest.
    older: u32,
    /// The next newer node in the age list, or `NIL` at the newest; while
    /// the slot is free, the next free slot.
    newer: u32,
}

/// A slab slot for one indexed size.
#[derive(Debug)]
struct Bucket {
    size: u64,
    /// The nodes of this size, oldest at the front, newest at the back.
    blocks: VecDeque<u32>,
    /// The previous (less recently emptied) bucket on the empty-bucket list.
    prev: u32,
    /// The next bucket on the empty-bucket list; while the slot is free,
    /// the next free slot.
    next: u32,
}

/// Idle blocks, ordered for best fit and for LRU trimming.
#[derive(Debug)]
pub struct ReadyList<R> {
    nodes: Vec<Node<R>>,
    free_node: u32,
    oldest: u32,
    newest: u32,
    buckets: Vec<Bucket>,
    free_bucket: u32,
    by_size: HashMap<u64, u32, BuildHasherDefault<SizeHasher>>,
    sizes: BTreeMap<u64, u32>,
    empty_head: u32,
    empty_tail: u32,
    empty_len: usize,
    bytes: u64,
    len: usize,
}

impl<R> Default for ReadyList<R> {
    fn default() -> Self {
        ReadyList {
            nodes: Vec::new(),
            free_node: NIL,
            oldest: NIL,
            newest: NIL,
            buckets: Vec::new(),
            free_bucket: NIL,
            by_size: HashMap::default(),
            sizes: BTreeMap::new(),
            empty_head: NIL,
            empty_tail: NIL,
            empty_len: 0,
            bytes: 0,
            len: 0,
        }
    }
}

/// A slab index as stored in the lists.
fn slot(len: usize) -> u32 {
    u32::try_from(len)
        .ok()
        .filter(|&i| i != NIL)
        .expect("ready list slab index overflow")
}

impl<R> ReadyList<R> {
    /// Files an idle block as the most recently used.
    pub fn insert(&mut self, block: Block<R>) {
        let size = block.size;
        self.bytes += size;
        self.len += 1;
        let b = self.bucket_for(size);
        let node = Node {
            block: Some(block),
            bucket: b,
            older: self.newest,
            newer: NIL,
        };
        let n = if self.free_node == NIL {
            let n = slot(self.nodes.len());
            self.nodes.push(node);
            n
        } else {
            let n = self.free_node;
            let free = &mut self.nodes[n as usize];
            self.free_node = free.newer;
            *free = node;
            n
        };
        match self.newest {
            NIL => self.oldest = n,
            newest => self.nodes[newest as usize].newer = n,
        }
        self.newest = n;
        self.buckets[b as usize].blocks.push_back(n);
    }

    /// The bucket slot for `size`, indexed (and off the empty list) on return.
    fn bucket_for(&mut self, size: u64) -> u32 {
        match self.by_size.entry(size) {
            Entry::Occupied(e) => {
                let b = *e.get();
                if self.buckets[b as usize].blocks.is_empty() {
                    self.unlink_empty(b);
                }
                b
            }
            Entry::Vacant(e) => {
                let bucket = Bucket {
                    size,
                    blocks: VecDeque::new(),
                    prev: NIL,
                    next: NIL,
                };
                let b = if self.free_bucket == NIL {
                    let b = slot(self.buckets.len());
                    self.buckets.push(bucket);
                    b
                } else {
                    let b = self.free_bucket;
                    let free = &mut self.buckets[b as usize];
                    self.free_bucket = free.next;
                    // Keep the slot's (emptied) deque and its allocation.
                    free.size = size;
                    free.prev = NIL;
                    free.next = NIL;
                    b
                };
                e.insert(b);
                self.sizes.insert(size, b);
                b
            }
        }
    }

    /// Takes the smallest block with `size <= block.size < bound`: one of
    /// exactly `size` bytes if cached, else the smallest larger one.
    #[inline]
    pub fn take_best_fit(&mut self, size: u64, bound: u64) -> Option<Block<R>> {
        let b = match self.by_size.get(&size) {
            Some(&b) if !self.buckets[b as usize].blocks.is_empty() => b,
            _ => {
                let buckets = &self.buckets;
                *self
                    .sizes
                    .range(size..bound)
                    .find(|(_, &b)| !buckets[b as usize].blocks.is_empty())?
                    .1
            }
        };
        let n = self.buckets[b as usize].blocks.pop_back()?;
        Some(self.take_node(n, b))
    }

    /// Takes the least recently freed block.
    pub fn pop_oldest(&mut self) -> Option<Block<R>> {
        let n = self.oldest;
        if n == NIL {
            return None;
        }
        let b = self.nodes[n as usize].bucket;
        let front = self.buckets[b as usize].blocks.pop_front();
        debug_assert_eq!(front, Some(n), "the oldest node fronts its bucket");
        Some(self.take_node(n, b))
    }

    /// Unlinks node `n` (already popped from bucket `b`) from the age list,
    /// frees its slot and returns its block.
    fn take_node(&mut self, n: u32, b: u32) -> Block<R> {
        let node = &mut self.nodes[n as usize];
        let (older, newer) = (node.older, node.newer);
        let block = node.block.take().expect("a listed node holds a block");
        node.newer = self.free_node;
        self.free_node = n;
        match older {
            NIL => self.oldest = newer,
            o => self.nodes[o as usize].newer = newer,
        }
        match newer {
            NIL => self.newest = older,
            x => self.nodes[x as usize].older = older,
        }
        self.bytes -= block.size;
        self.len -= 1;
        if self.buckets[b as usize].blocks.is_empty() {
            self.push_empty(b);
        }
        block
    }

    /// Files bucket `b`, just emptied, as the most recently emptied; drops
    /// the least recently emptied from the indexes past the limit.
    fn push_empty(&mut self, b: u32) {
        let tail = self.empty_tail;
        let bucket = &mut self.buckets[b as usize];
        bucket.prev = tail;
        bucket.next = NIL;
        match tail {
            NIL => self.empty_head = b,
            t => self.buckets[t as usize].next = b,
        }
        self.empty_tail = b;
        self.empty_len += 1;
        if self.empty_len > EMPTY_BUCKETS_KEPT {
            let head = self.empty_head;
            self.unlink_empty(head);
            let bucket = &mut self.buckets[head as usize];
            self.by_size.remove(&bucket.size);
            self.sizes.remove(&bucket.size);
            // A once-large bucket's deque should not pin its peak capacity.
            bucket.blocks.shrink_to(4);
            bucket.next = self.free_bucket;
            self.free_bucket = head;
        }
    }

    /// Takes bucket `b` off the empty-bucket list.
    fn unlink_empty(&mut self, b: u32) {
        let bucket = &self.buckets[b as usize];
        let (prev, next) = (bucket.prev, bucket.next);
        match prev {
            NIL => self.empty_head = next,
            p => self.buckets[p as usize].next = next,
        }
        match next {
            NIL => self.empty_tail = prev,
            x => self.buckets[x as usize].prev = prev,
        }
        self.empty_len -= 1;
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
            offset: 0,
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

    impl<R> ReadyList<R> {
        /// Checks every invariant of the module doc by walking the lists.
        fn check(&self) {
            // The age list: linked both ways through exactly the occupied nodes.
            let mut age = Vec::new();
            let (mut n, mut prev) = (self.oldest, NIL);
            while n != NIL {
                let node = &self.nodes[n as usize];
                assert_eq!(node.older, prev, "age list back link at {n}");
                assert!(node.block.is_some(), "free node {n} in the age list");
                age.push(n);
                (prev, n) = (n, node.newer);
            }
            assert_eq!(self.newest, prev);
            let occupied = self.nodes.iter().filter(|n| n.block.is_some()).count();
            assert_eq!(age.len(), occupied);
            assert_eq!(self.len, occupied);
            let mut free = 0;
            let mut f = self.free_node;
            while f != NIL {
                assert!(self.nodes[f as usize].block.is_none());
                free += 1;
                f = self.nodes[f as usize].newer;
            }
            assert_eq!(free + occupied, self.nodes.len());
            let bytes: u64 = age
                .iter()
                .map(|&n| self.nodes[n as usize].block.as_ref().unwrap().size)
                .sum();
            assert_eq!(self.bytes, bytes);
            // Buckets: the age list restricted to their size, in order.
            assert_eq!(self.by_size.len(), self.sizes.len());
            for (&size, &b) in &self.sizes {
                assert_eq!(self.by_size.get(&size), Some(&b));
                assert_eq!(self.buckets[b as usize].size, size);
                let expect: Vec<u32> = age
                    .iter()
                    .copied()
                    .filter(|&n| self.nodes[n as usize].bucket == b)
                    .collect();
                assert!(expect
                    .iter()
                    .all(|&n| { self.nodes[n as usize].block.as_ref().unwrap().size == size }));
                assert!(self.buckets[b as usize].blocks.iter().eq(expect.iter()));
            }
            // The empty-bucket list: exactly the indexed empty buckets.
            let mut empty = 0;
            let (mut b, mut prev) = (self.empty_head, NIL);
            while b != NIL {
                let bucket = &self.buckets[b as usize];
                assert_eq!(bucket.prev, prev);
                assert!(bucket.blocks.is_empty());
                assert_eq!(self.by_size.get(&bucket.size), Some(&b));
                empty += 1;
                (prev, b) = (b, bucket.next);
            }
            assert_eq!(self.empty_tail, prev);
            assert_eq!(empty, self.empty_len);
            let indexed_empty = self
                .sizes
                .values()
                .filter(|&&b| self.buckets[b as usize].blocks.is_empty())
                .count();
            assert_eq!(empty, indexed_empty);
            assert!(empty <= EMPTY_BUCKETS_KEPT);
        }
    }

    #[test]
    fn structures_stay_bounded_under_hit_free_churn() {
        let mut r = ReadyList::default();
        r.insert(block(4096, 0));
        for i in 1..100_000 {
            let b = r.take_best_fit(4096, 8192).unwrap();
            r.insert(Block { id: i, ..b });
        }
        assert_eq!(r.nodes.len(), 1, "a hit/free pair reuses its slot");
        assert_eq!(r.buckets.len(), 1);
        r.check();
        assert_eq!(r.pop_oldest().map(|b| b.id), Some(99_999));
        for s in 1..2000u64 {
            r.insert(block(s * 4, s));
            let _ = r.take_best_fit(s * 4, s * 4 + 1);
        }
        assert_eq!(r.nodes.len(), 1);
        assert!(
            r.sizes.len() <= EMPTY_BUCKETS_KEPT,
            "{} sizes indexed",
            r.sizes.len()
        );
        assert!(
            r.buckets.len() <= EMPTY_BUCKETS_KEPT + 1,
            "{} bucket slots",
            r.buckets.len()
        );
        r.check();
    }

    #[test]
    fn an_emptied_bucket_refills_without_reindexing() {
        let mut r = ReadyList::default();
        r.insert(block(64, 1));
        assert_eq!(r.take_best_fit(64, 65).map(|b| b.id), Some(1));
        assert_eq!(r.empty_len, 1);
        r.insert(block(64, 2));
        assert_eq!(r.empty_len, 0);
        assert_eq!(r.buckets.len(), 1);
        r.check();
        // A range search skips the empty exact bucket.
        r.insert(block(128, 3));
        assert_eq!(r.take_best_fit(64, 65).map(|b| b.id), Some(2));
        assert_eq!(r.take_best_fit(64, 256).map(|b| b.id), Some(3));
        r.check();
    }

    /// xorshift64: deterministic, no dependencies.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn agrees_with_a_reference_model() {
        for seed in [0x2545_F491_4F6C_DD1D_u64, 0x9E37_79B9_7F4A_7C15, 42] {
            let mut rng = Rng(seed);
            let mut r = ReadyList::default();
            // (tick, size, id) of every block the list should hold.
            let mut model: Vec<(u64, u64, u64)> = Vec::new();
            let (mut tick, mut id) = (0u64, 0u64);
            for step in 0..5000 {
                // Alternate growing and shrinking phases; now and then a wide
                // size range, so more than `EMPTY_BUCKETS_KEPT` sizes empty.
                let insert_pct = if (step / 500) % 2 == 0 { 60 } else { 30 };
                let wide = (step / 1000) % 2 == 1;
                let roll = rng.below(100);
                if roll < insert_pct {
                    let classes = if wide { 2000 } else { 40 };
                    let size = 4 * (1 + rng.below(classes));
                    tick += 1;
                    id += 1;
                    model.push((tick, size, id));
                    r.insert(block(size, id));
                } else if roll < 90 {
                    let size = 4 * (1 + rng.below(if wide { 2000 } else { 40 }));
                    // Exact only, a narrow window, or a wide one.
                    let span = [1, 8, 4000][rng.below(3) as usize];
                    let bound = size + 1 + 4 * rng.below(span);
                    let exact = model.iter().filter(|e| e.1 == size).max_by_key(|e| e.0);
                    let want = exact.or_else(|| {
                        let fit = model.iter().filter(|e| e.1 > size && e.1 < bound);
                        let best = fit.clone().map(|e| e.1).min()?;
                        fit.filter(|e| e.1 == best).max_by_key(|e| e.0)
                    });
                    let want = want.copied();
                    model.retain(|e| Some(*e) != want);
                    let got = r.take_best_fit(size, bound).map(|b| b.id);
                    assert_eq!(
                        got,
                        want.map(|e| e.2),
                        "seed {seed:#x} step {step}: take_best_fit({size}, {bound})"
                    );
                } else {
                    let want = model.iter().min_by_key(|e| e.0).copied();
                    model.retain(|e| Some(*e) != want);
                    let got = r.pop_oldest().map(|b| b.id);
                    assert_eq!(
                        got,
                        want.map(|e| e.2),
                        "seed {seed:#x} step {step}: pop_oldest"
                    );
                }
                assert_eq!(r.len(), model.len());
                assert_eq!(r.bytes(), model.iter().map(|e| e.1).sum::<u64>());
                assert_eq!(r.is_empty(), model.is_empty());
                if step % 97 == 0 {
                    r.check();
                }
            }
            r.check();
            while let Some(b) = r.pop_oldest() {
                let want = model.remove(0);
                assert_eq!(b.id, want.2);
            }
            assert!(model.is_empty());
            r.check();
        }
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
