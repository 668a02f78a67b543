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
//! # Ordering
//!
//! Blocks are filed per queue by (stamp value, block id), so the due ones are a
//! prefix that `split_off` cuts in O(log n).

use std::collections::BTreeMap;

use crate::cache::Block;
use crate::timeline::{QueueId, Stamp};

struct QueuePending<R> {
    by_value: BTreeMap<(u64, u64), Block<R>>,
    /// (size, block id) → stamp value, for blocks whose only stamp is here.
    by_size: BTreeMap<(u64, u64), u64>,
}

impl<R> Default for QueuePending<R> {
    fn default() -> Self {
        QueuePending {
            by_value: BTreeMap::new(),
            by_size: BTreeMap::new(),
        }
    }
}

/// Freed blocks waiting for their stamps to complete, filed by stamp.
pub struct PendingList<R> {
    queues: Vec<QueuePending<R>>,
    bytes: u64,
    len: usize,
}

impl<R> Default for PendingList<R> {
    fn default() -> Self {
        PendingList {
            queues: Vec::new(),
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
        let slot = &mut self.queues[q];
        if block.stamps.single() == Some(at) {
            slot.by_size.insert((block.size, block.id), at.value);
        }
        self.bytes += block.size;
        self.len += 1;
        slot.by_value.insert((at.value, block.id), block);
    }

    /// Takes every block filed under `queue` with a stamp value `<= completed`.
    #[must_use]
    pub fn take_due(&mut self, queue: QueueId, completed: u64) -> Vec<Block<R>> {
        let Some(slot) = self.queues.get_mut(queue as usize) else {
            return Vec::new();
        };
        let Some((&(first, _), _)) = slot.by_value.first_key_value() else {
            return Vec::new();
        };
        if first > completed {
            return Vec::new();
        }
        let later = slot.by_value.split_off(&(completed.saturating_add(1), 0));
        let due = std::mem::replace(&mut slot.by_value, later);
        let mut out = Vec::with_capacity(due.len());
        for (_, block) in due {
            slot.by_size.remove(&(block.size, block.id));
            self.bytes -= block.size;
            self.len -= 1;
            out.push(block);
        }
        out
    }

    /// Takes the smallest block with `size <= block.size < bound` whose only
    /// stamp is on `queue`. The caller must have checked that `queue` orders
    /// memory (see the module's reuse rule).
    pub fn take_in_order(&mut self, queue: QueueId, size: u64, bound: u64) -> Option<Block<R>> {
        let slot = self.queues.get_mut(queue as usize)?;
        let (&(found, id), &value) = slot.by_size.range((size, 0)..).next()?;
        if found >= bound {
            return None;
        }
        slot.by_size.remove(&(found, id));
        let block = slot.by_value.remove(&(value, id))?;
        self.bytes -= block.size;
        self.len -= 1;
        Some(block)
    }

    /// The lowest-valued stamp a block is filed under, over all queues: the
    /// one to wait for under memory pressure.
    pub fn oldest(&self) -> Option<Stamp> {
        self.queues
            .iter()
            .enumerate()
            .filter_map(|(q, slot)| {
                slot.by_value
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
            .is_some_and(|s| !s.by_value.is_empty())
    }

    /// Marks every block to be released, not cached, once idle.
    pub fn mark_all_for_release(&mut self) {
        for slot in &mut self.queues {
            for block in slot.by_value.values_mut() {
                block.release_when_idle = true;
            }
        }
    }

    /// Takes every block out, due or not (for teardown).
    #[must_use]
    pub fn take_all(&mut self) -> Vec<Block<R>> {
        let mut out = Vec::with_capacity(self.len);
        for slot in &mut self.queues {
            slot.by_size.clear();
            out.extend(std::mem::take(&mut slot.by_value).into_values());
        }
        self.bytes = 0;
        self.len = 0;
        out
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
