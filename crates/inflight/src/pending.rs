//! The pending list: freed blocks that work on another queue may still use.
//!
//! # Release point
//!
//! A pending block leaves this list only when the watermark of the queue it is
//! filed under passes its stamp there ([`PendingList::take_due`]); the caller
//! then checks its other stamps and files it again under the next incomplete
//! one, or gives it back to the arena. Nothing here releases memory:
//! trimming never sees a pending block (I1).
//!
//! # What is filed here
//!
//! A block freed while a queue other than its pool's may still use it, or,
//! where reuse in order does not apply (queues that do not order memory,
//! policies other than `Deferred`), while any queue may. A block in flight
//! on its pool's in-order queue alone goes back to the arena at once (see
//! `arena/`, the reuse rule), so nothing here is reused before it is due.
//!
//! # Ordering and layout
//!
//! Blocks live in a slab. Each queue keeps a min-heap of the slab positions
//! filed under it, in (stamp value, block id) order, so the due ones are
//! popped from its top. Stamps arrive in nearly increasing order (threads
//! file their batches a little out of turn), so a push rarely climbs the
//! heap. Filing and taking are a few words moved, under the allocator's
//! state lock.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::block::Block;
use crate::timeline::{QueueId, Stamp};

/// An index entry: the filing's stamp value and block id (its order: the
/// derived order compares them first), and where the filing lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    value: u64,
    id: u64,
    slot: u32,
    generation: u64,
}

#[derive(Default)]
struct QueuePending {
    /// Every block filed here, least (stamp value, block id) on top.
    by_value: BinaryHeap<Reverse<Entry>>,
    /// Blocks filed here now (entries not stale).
    live: usize,
}

/// The filed blocks, at the positions index entries name.
struct Slab<R> {
    blocks: Vec<Option<Block<R>>>,
    /// The generation of the last filing at each position: an entry is
    /// live while its position is filled and its generation is this one.
    generations: Vec<u64>,
    /// Empty positions, reused before the slab grows.
    free: Vec<u32>,
    /// The filed blocks' bytes.
    bytes: u64,
}

impl<R> Default for Slab<R> {
    fn default() -> Self {
        Slab {
            blocks: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            bytes: 0,
        }
    }
}

impl<R> Slab<R> {
    /// Files `block`: its position and the filing's generation.
    fn put(&mut self, block: Block<R>) -> (u32, u64) {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.blocks.push(None);
                self.generations.push(0);
                (self.blocks.len() - 1) as u32
            }
        };
        debug_assert!(self.blocks[slot as usize].is_none());
        self.bytes += block.size;
        self.blocks[slot as usize] = Some(block);
        let generation = &mut self.generations[slot as usize];
        *generation += 1;
        (slot, *generation)
    }

    /// Whether `e` names the filing now at its position.
    fn live(&self, e: Entry) -> bool {
        self.blocks[e.slot as usize].is_some() && self.generations[e.slot as usize] == e.generation
    }

    /// Takes the block a live entry names.
    fn take(&mut self, e: Entry) -> Block<R> {
        let block = self.blocks[e.slot as usize]
            .take()
            .expect("a live entry names a filled slab position");
        self.free.push(e.slot);
        self.bytes -= block.size;
        block
    }

    /// Blocks filed.
    fn len(&self) -> usize {
        self.blocks.len() - self.free.len()
    }
}

/// Freed blocks waiting for their stamps to complete, filed by stamp.
pub(crate) struct PendingList<R> {
    queues: Vec<QueuePending>,
    slab: Slab<R>,
}

impl<R> Default for PendingList<R> {
    fn default() -> Self {
        PendingList {
            queues: Vec::new(),
            slab: Slab::default(),
        }
    }
}

impl<R> PendingList<R> {
    /// Files `block` under `at`, one of its incomplete stamps.
    pub(crate) fn insert(&mut self, block: Block<R>, at: Stamp) {
        debug_assert!(
            block.stamps.iter().any(|s| *s == at),
            "filed under a stamp it lacks"
        );
        let q = at.queue as usize;
        if self.queues.len() <= q {
            self.queues.resize_with(q + 1, Default::default);
        }
        let id = block.id;
        let (slot, generation) = self.slab.put(block);
        let e = Entry {
            value: at.value,
            id,
            slot,
            generation,
        };
        let index = &mut self.queues[q];
        index.live += 1;
        index.by_value.push(Reverse(e));
    }

    /// Takes every block filed under `queue` with a stamp value `<= completed`.
    #[must_use]
    pub(crate) fn take_due(&mut self, queue: QueueId, completed: u64) -> Vec<Block<R>> {
        let mut out = Vec::new();
        let Some(index) = self.queues.get_mut(queue as usize) else {
            return out;
        };
        while let Some(&Reverse(e)) = index.by_value.peek() {
            if e.value > completed {
                break;
            }
            index.by_value.pop();
            debug_assert!(self.slab.live(e), "every filing is taken once");
            out.push(self.slab.take(e));
            index.live -= 1;
        }
        out
    }

    /// The lowest-valued stamp a block is filed under, over all queues: the
    /// one to wait for under memory pressure.
    pub(crate) fn oldest(&self) -> Option<Stamp> {
        self.queues
            .iter()
            .enumerate()
            .filter_map(|(q, index)| {
                // The top, unless stale (then a scan: pressure is rare).
                let e = match index.by_value.peek() {
                    Some(Reverse(e)) if self.slab.live(*e) => *e,
                    _ => index
                        .by_value
                        .iter()
                        .map(|e| e.0)
                        .filter(|e| self.slab.live(*e))
                        .min()?,
                };
                Some(Stamp {
                    queue: q as QueueId,
                    value: e.value,
                })
            })
            .min_by_key(|s| s.value)
    }

    /// One more than the highest queue id blocks were ever filed under.
    pub(crate) fn queue_slots(&self) -> usize {
        self.queues.len()
    }

    /// Whether a block is filed under `queue`.
    pub(crate) fn has_queue(&self, queue: QueueId) -> bool {
        self.queues
            .get(queue as usize)
            .is_some_and(|index| index.live > 0)
    }

    /// Takes every block out, due or not (for teardown).
    #[must_use]
    pub(crate) fn take_all(&mut self) -> Vec<Block<R>> {
        for index in &mut self.queues {
            *index = QueuePending::default();
        }
        let slab = std::mem::take(&mut self.slab);
        slab.blocks.into_iter().flatten().collect()
    }

    /// The arena nodes of the blocks held.
    pub(crate) fn nodes(&self) -> impl Iterator<Item = crate::arena::NodeId> + '_ {
        self.slab.blocks.iter().flatten().map(|b| b.node)
    }

    /// Total bytes held.
    pub(crate) fn bytes(&self) -> u64 {
        self.slab.bytes
    }

    /// Blocks held.
    pub(crate) fn len(&self) -> usize {
        self.slab.len()
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
            raw: std::sync::Arc::new(()),
            offset: 0,
            size,
            id,
            node: 0,
            stamps: s,
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
            let rest = p.take_all();
            assert_eq!(rest.len(), model.len());
            assert!(p.len() == 0 && p.bytes() == 0);
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
}
