//! The pending list: freed blocks that submitted work may still use.
//!
//! # Release point
//!
//! A pending block leaves this list only when the watermark of the queue it is
//! filed under passes its stamp there ([`PendingList::take_due`]); the caller
//! then checks its other stamps and files it again under the next incomplete
//! one, or makes it ready. Nothing here releases memory: trimming never sees a
//! pending block (I1).
//!
//! # Reuse rule
//!
//! A pending block may go to new work before it is due only through
//! [`PendingList::take_in_order`]: its one stamp is on the requesting queue and
//! the backend declared that queue in-order for memory, so the new work runs
//! after the old (I2). The allocator checks the declaration; this list keeps
//! the size index only for single-stamp blocks.
//!
//! # Ordering and layout
//!
//! Blocks live in a slab. Each queue indexes its blocks by (stamp value,
//! block id), so the due ones are a prefix that `split_off` cuts in
//! O(log n); and its single-stamp blocks by (size, stamp value, block id),
//! for in-order reuse. The indexes hold slab positions, not blocks: their
//! nodes stay small, and filing or taking a block moves a few words instead
//! of the block (the pending list is worked under the allocator's state
//! lock, at every filing and miss).

use std::collections::BTreeMap;

use crate::cache::Block;
use crate::timeline::{QueueId, Stamp};

/// A block's position in the slab.
type Slot = u32;

#[derive(Default)]
struct QueuePending {
    /// (stamp value, block id) → slab position.
    by_value: BTreeMap<(u64, u64), Slot>,
    /// (size, stamp value, block id) → slab position, for blocks whose only
    /// stamp is here: of one size, the oldest use comes first.
    by_size: BTreeMap<(u64, u64, u64), Slot>,
}

/// Freed blocks waiting for their stamps to complete, filed by stamp.
pub struct PendingList<R> {
    queues: Vec<QueuePending>,
    /// Every filed block, at the position its queue's index names.
    slab: Vec<Option<Block<R>>>,
    /// Empty slab positions, reused before the slab grows.
    free: Vec<Slot>,
    bytes: u64,
    len: usize,
}

impl<R> Default for PendingList<R> {
    fn default() -> Self {
        PendingList {
            queues: Vec::new(),
            slab: Vec::new(),
            free: Vec::new(),
            bytes: 0,
            len: 0,
        }
    }
}

impl<R> PendingList<R> {
    /// Files `block` under `at`, one of its incomplete stamps.
    pub fn insert(&mut self, block: Block<R>, at: Stamp) {
        debug_assert!(
            block.stamps.iter().any(|s| *s == at),
            "filed under a stamp it lacks"
        );
        let q = at.queue as usize;
        if self.queues.len() <= q {
            self.queues.resize_with(q + 1, Default::default);
        }
        let (size, id) = (block.size, block.id);
        let single = block.stamps.single() == Some(at);
        let slot = self.put(block);
        let index = &mut self.queues[q];
        if single {
            index.by_size.insert((size, at.value, id), slot);
        }
        index.by_value.insert((at.value, id), slot);
        self.bytes += size;
        self.len += 1;
    }

    /// Takes every block filed under `queue` with a stamp value `<= completed`.
    #[must_use]
    pub fn take_due(&mut self, queue: QueueId, completed: u64) -> Vec<Block<R>> {
        let Some(index) = self.queues.get_mut(queue as usize) else {
            return Vec::new();
        };
        let Some((&(first, _), _)) = index.by_value.first_key_value() else {
            return Vec::new();
        };
        if first > completed {
            return Vec::new();
        }
        let later = index.by_value.split_off(&(completed.saturating_add(1), 0));
        let due = std::mem::replace(&mut index.by_value, later);
        let mut out = Vec::with_capacity(due.len());
        for ((value, id), slot) in due {
            let block = self.take(slot);
            self.queues[queue as usize]
                .by_size
                .remove(&(block.size, value, id));
            out.push(block);
        }
        out
    }

    /// Takes the smallest block with `size <= block.size < bound` whose only
    /// stamp is on `queue`, of that size the one with the oldest stamp (the
    /// likeliest to have completed, so that binding it on another queue
    /// waits least). The caller must have checked that `queue` orders memory
    /// (see the module's reuse rule).
    pub fn take_in_order(&mut self, queue: QueueId, size: u64, bound: u64) -> Option<Block<R>> {
        let index = self.queues.get_mut(queue as usize)?;
        let (&(found, value, id), &slot) = index.by_size.range((size, 0, 0)..).next()?;
        if found >= bound {
            return None;
        }
        index.by_size.remove(&(found, value, id));
        index.by_value.remove(&(value, id));
        Some(self.take(slot))
    }

    /// The lowest-valued stamp a block is filed under, over all queues: the
    /// one to wait for under memory pressure.
    pub fn oldest(&self) -> Option<Stamp> {
        self.queues
            .iter()
            .enumerate()
            .filter_map(|(q, index)| {
                index
                    .by_value
                    .first_key_value()
                    .map(|(&(value, _), _)| Stamp {
                        queue: q as QueueId,
                        value,
                    })
            })
            .min_by_key(|s| s.value)
    }

    /// One more than the highest queue id blocks were ever filed under.
    pub fn queue_slots(&self) -> usize {
        self.queues.len()
    }

    /// Whether a block is filed under `queue`.
    pub fn has_queue(&self, queue: QueueId) -> bool {
        self.queues
            .get(queue as usize)
            .is_some_and(|index| !index.by_value.is_empty())
    }

    /// Marks every block to be released, not cached, once idle.
    pub fn mark_all_for_release(&mut self) {
        for block in self.slab.iter_mut().flatten() {
            block.release_when_idle = true;
        }
    }

    /// Takes every block out, due or not (for teardown).
    #[must_use]
    pub fn take_all(&mut self) -> Vec<Block<R>> {
        for index in &mut self.queues {
            index.by_size.clear();
            index.by_value.clear();
        }
        self.free.clear();
        self.bytes = 0;
        self.len = 0;
        std::mem::take(&mut self.slab)
            .into_iter()
            .flatten()
            .collect()
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

    /// Stores `block` in the slab.
    fn put(&mut self, block: Block<R>) -> Slot {
        match self.free.pop() {
            Some(slot) => {
                debug_assert!(self.slab[slot as usize].is_none());
                self.slab[slot as usize] = Some(block);
                slot
            }
            None => {
                self.slab.push(Some(block));
                (self.slab.len() - 1) as Slot
            }
        }
    }

    /// Takes the block at `slot` (which an index named), with its bytes.
    fn take(&mut self, slot: Slot) -> Block<R> {
        let block = self.slab[slot as usize]
            .take()
            .expect("an index names a filled slab slot");
        self.free.push(slot);
        self.bytes -= block.size;
        self.len -= 1;
        block
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::Stamps;

    fn block(size: u64, id: u64, stamps: &[(QueueId, u64)]) -> Block<()> {
        let mut s = Stamps::default();
        for &(q, v) in stamps {
            s.record(q, v);
        }
        Block {
            raw: (),
            size,
            id,
            stamps: s,
            release_when_idle: false,
        }
    }

    /// xorshift64: deterministic, no dependencies.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// A filed block as the model sees it.
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Filed {
        queue: QueueId,
        value: u64,
        size: u64,
        id: u64,
        single: bool,
    }

    #[test]
    fn agrees_with_a_reference_model() {
        for seed in [0x2545_F491_4F6C_DD1D_u64, 0x9E37_79B9_7F4A_7C15, 7] {
            let mut rng = Rng(seed);
            let mut p = PendingList::default();
            let mut model: Vec<Filed> = Vec::new();
            let mut next_id = 0u64;
            for step in 0..6000 {
                // Growing and shrinking phases, so slab positions are reused.
                let insert_pct = if (step / 700) % 2 == 0 { 55 } else { 30 };
                let roll = rng.below(100);
                let queue = rng.below(3) as QueueId;
                if roll < insert_pct {
                    next_id += 1;
                    let (value, size) = (1 + rng.below(300), 4 * (1 + rng.below(40)));
                    let mut stamps = vec![(queue, value)];
                    if rng.below(4) == 0 {
                        stamps.push(((queue + 1) % 3, 1 + rng.below(300)));
                    }
                    p.insert(block(size, next_id, &stamps), Stamp { queue, value });
                    model.push(Filed {
                        queue,
                        value,
                        size,
                        id: next_id,
                        single: stamps.len() == 1,
                    });
                } else if roll < 75 {
                    let completed = rng.below(320);
                    let mut want: Vec<Filed> = model
                        .iter()
                        .filter(|f| f.queue == queue && f.value <= completed)
                        .copied()
                        .collect();
                    want.sort_by_key(|f| (f.value, f.id));
                    model.retain(|f| !(f.queue == queue && f.value <= completed));
                    let got: Vec<u64> = p.take_due(queue, completed).iter().map(|b| b.id).collect();
                    let want: Vec<u64> = want.iter().map(|f| f.id).collect();
                    assert_eq!(got, want, "seed {seed:#x} step {step}: take_due");
                } else if roll < 95 {
                    let size = 4 * (1 + rng.below(40));
                    let span = [1, 8, 60][rng.below(3) as usize];
                    let bound = size + 1 + 4 * rng.below(span);
                    let want = model
                        .iter()
                        .filter(|f| f.queue == queue && f.single)
                        .filter(|f| f.size >= size && f.size < bound)
                        .min_by_key(|f| (f.size, f.value, f.id))
                        .copied();
                    model.retain(|f| Some(*f) != want);
                    let got = p.take_in_order(queue, size, bound).map(|b| b.id);
                    assert_eq!(got, want.map(|f| f.id), "seed {seed:#x} step {step}");
                } else {
                    let want = (0..3)
                        .filter_map(|q| {
                            let value = model
                                .iter()
                                .filter(|f| f.queue == q)
                                .map(|f| f.value)
                                .min()?;
                            Some(Stamp { queue: q, value })
                        })
                        .min_by_key(|s| s.value);
                    assert_eq!(p.oldest(), want, "seed {seed:#x} step {step}: oldest");
                }
                assert_eq!(p.len(), model.len());
                assert_eq!(p.bytes(), model.iter().map(|f| f.size).sum::<u64>());
                for q in 0..3 {
                    assert_eq!(p.has_queue(q), model.iter().any(|f| f.queue == q));
                }
            }
            p.mark_all_for_release();
            let rest = p.take_all();
            assert_eq!(rest.len(), model.len());
            assert!(rest.iter().all(|b| b.release_when_idle));
            assert!(p.is_empty() && p.bytes() == 0);
        }
    }

    #[test]
    fn due_blocks_come_out_in_stamp_order_and_only_when_passed() {
        let mut p = PendingList::default();
        p.insert(block(10, 1, &[(0, 3)]), Stamp { queue: 0, value: 3 });
        p.insert(block(10, 2, &[(0, 1)]), Stamp { queue: 0, value: 1 });
        p.insert(block(10, 3, &[(1, 1)]), Stamp { queue: 1, value: 1 });
        assert!(p.take_due(0, 0).is_empty());
        let ids: Vec<u64> = p.take_due(0, 2).iter().map(|b| b.id).collect();
        assert_eq!(ids, vec![2]);
        assert_eq!(p.oldest(), Some(Stamp { queue: 1, value: 1 }));
        assert_eq!(p.len(), 2);
        assert_eq!(p.bytes(), 20);
    }

    #[test]
    fn in_order_reuse_takes_only_single_stamp_blocks_of_that_queue() {
        let mut p = PendingList::default();
        p.insert(
            block(64, 1, &[(0, 5), (1, 2)]),
            Stamp { queue: 0, value: 5 },
        );
        assert!(
            p.take_in_order(0, 64, 128).is_none(),
            "two stamps: not in order"
        );
        p.insert(block(64, 2, &[(0, 6)]), Stamp { queue: 0, value: 6 });
        assert!(p.take_in_order(1, 64, 128).is_none(), "other queue");
        assert_eq!(p.take_in_order(0, 64, 128).map(|b| b.id), Some(2));
        assert_eq!(p.len(), 1);
        assert_eq!(p.take_all().len(), 1);
        assert!(p.is_empty());
    }
}
