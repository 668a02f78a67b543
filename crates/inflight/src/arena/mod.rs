//! The arena: device memory as segments, split into blocks and merged back.
//!
//! A *segment* is one device allocation (a fixed segment), or one reserved
//! address range whose pages are mapped on demand (a growable segment, over
//! CUDA's virtual memory management or the simulated GPU's model of it).
//! Blocks are carved from a segment and handed out; a block given back
//! merges with the free blocks beside it. Every segment belongs to one
//! *pool*: one queue and one size class (small requests from small
//! segments, large ones from large segments), so a block is carved for the
//! queue whose work last used its memory, as PyTorch's per-stream pools do.
//!
//! # Layout
//!
//! ```text
//! segments: Vec<Segment>      raw (shared by its blocks), size, pool, first node,
//!                             pages (growable: mapped runs, page size)
//! nodes:    Vec<Node>         one per block, taken or free: segment, offset, size,
//!                             prev/next in address order, and while free:
//!                             stamp, mapped bytes, releasable bytes, LRU links
//! pools:    Vec<Pool>         per (queue, class): free nodes by (size, address),
//!                             free nodes in flight by stamp (a min-heap)
//! lru:      oldest..newest    free nodes trim could give back, least recently freed first
//! ```
//!
//! # Reuse rule (I2)
//!
//! A free node is in its pool's free index when every recorded use of its
//! memory completed, or when the only uses not yet complete are on the
//! pool's own queue and the caller declared that queue in-order for memory
//! (the node's `stamp` is then the latest such use). The caller files
//! anything else on the pending list, not here. A node carved from a free
//! node in flight carries its stamp out (the buffer's reuse fence). Merging
//! two free nodes keeps the later stamp: the merged node is complete only
//! when both parts are.
//!
//! # Release rule (I1)
//!
//! Only *releasable* memory of a complete free node is ever given back: a
//! whole fixed segment that is one free node, or the whole mapped pages
//! inside a free node of a growable segment. A free node in flight is never
//! on the LRU list that trimming walks.
//!
//! # Accounting
//!
//! `reserved` is the bytes of fixed segments plus the mapped bytes of
//! growable ones; taken nodes always lie on mapped memory, so
//! `reserved == taken + ready + pending`, where `ready` and `pending` are the
//! mapped bytes of complete and in-flight free nodes. [`Arena::check`]
//! verifies all of it from scratch.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::sync::Arc;

use crate::history::PoolKind;
use crate::timeline::QueueId;

use self::pages::Pages;

mod pages;
#[cfg(test)]
mod tests;
mod trim;
mod view;

/// A node's index in [`Arena::nodes`].
pub(crate) type NodeId = u32;
/// A segment's index in [`Arena::segments`].
pub(crate) type SegId = u32;

/// No node: the end of a list.
const NIL: u32 = u32::MAX;

/// Every block's size and offset is a multiple of this (PyTorch's
/// `kMinBlockSize`; also above every backend's buffer offset alignment).
pub(crate) const GRANULE: u64 = 512;

/// The two size classes of pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Class {
    Small,
    Large,
}

impl Class {
    fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn kind(self) -> PoolKind {
        match self {
            Class::Small => PoolKind::Small,
            Class::Large => PoolKind::Large,
        }
    }
}

/// A free node: its own-queue stamp (0: complete), mapped and releasable bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Free {
    stamp: u64,
    mapped: u64,
    releasable: u64,
}

#[derive(Clone, Debug)]
struct Node {
    seg: SegId,
    offset: u64,
    size: u64,
    prev: NodeId,
    next: NodeId,
    /// `None` while taken.
    free: Option<Free>,
    lru_prev: NodeId,
    lru_next: NodeId,
    on_lru: bool,
    /// Bumped at every change, to tell stale heap entries.
    generation: u32,
}

/// One segment.
struct Segment<R> {
    raw: Arc<R>,
    /// Unique for the arena's life (segment ids are reused).
    uid: u64,
    pool: u32,
    size: u64,
    first: NodeId,
    /// Growable segments only.
    pages: Option<Pages>,
}

/// One pool: a queue's segments of one size class.
#[derive(Default)]
struct Pool {
    /// Free nodes by size, then address, then node: [`entry`] packs the
    /// three in one `u128`, which compares in one instruction pair and
    /// packs more entries in a B-tree node than a tuple.
    index: BTreeSet<u128>,
    /// Free nodes in flight on the pool's queue, by stamp.
    due: BinaryHeap<Reverse<(u64, NodeId, u32)>>,
    /// The pool's growable segment, if it has one.
    range: Option<SegId>,
}

/// A block carved for an allocation.
pub(crate) struct Carved<R> {
    pub(crate) node: NodeId,
    pub(crate) raw: Arc<R>,
    pub(crate) offset: u64,
    pub(crate) size: u64,
    /// A stable id of the block's memory (segment and offset).
    pub(crate) id: u64,
    /// The latest use on the pool's queue not yet complete, or 0 (the
    /// block is reused in order: the buffer's reuse fence).
    pub(crate) stamp: u64,
    /// Page runs the caller must map before handing the block out
    /// (growable segments), already marked mapped.
    pub(crate) maps: Vec<(u64, u64)>,
}

/// What trimming gives back: the caller makes the device calls.
pub(crate) enum Trimmed<R> {
    /// A whole fixed segment, removed from the arena.
    Segment { raw: R, size: u64, queue: QueueId },
    /// Pages of a growable segment, already marked unmapped.
    Pages {
        raw: Arc<R>,
        runs: Vec<(u64, u64)>,
        queue: QueueId,
    },
}

impl<R> Trimmed<R> {
    /// Bytes it gives back.
    pub(crate) fn bytes(&self) -> u64 {
        match self {
            Trimmed::Segment { size, .. } => *size,
            Trimmed::Pages { runs, .. } => runs.iter().map(|(a, b)| b - a).sum(),
        }
    }
}

/// A segment taken out at teardown: its raw buffer, its queue, and for a
/// growable one its mapped runs.
pub(crate) type TakenSegment<R> = (Arc<R>, QueueId, Option<Vec<(u64, u64)>>);

/// Totals, for statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    /// Fixed segments' bytes plus growable segments' mapped bytes.
    pub(crate) reserved: u64,
    /// Taken nodes' bytes.
    pub(crate) taken: u64,
    /// Complete free nodes' mapped bytes, and how many such nodes (with any
    /// mapped byte).
    pub(crate) ready: u64,
    pub(crate) ready_count: u64,
    /// In-flight free nodes' mapped bytes, and how many.
    pub(crate) pending: u64,
    pub(crate) pending_count: u64,
    /// What trimming could give back now.
    pub(crate) releasable: u64,
    /// Segments (fixed and growable).
    pub(crate) segments: u64,
    /// Nodes split off and merged away, over the arena's life.
    pub(crate) splits: u64,
    pub(crate) merges: u64,
    /// Page runs mapped and unmapped, over the arena's life.
    pub(crate) maps: u64,
    pub(crate) unmaps: u64,
}

/// Segments, blocks and pools (see the module documentation).
pub(crate) struct Arena<R> {
    segments: Vec<Option<Segment<R>>>,
    free_segments: Vec<SegId>,
    nodes: Vec<Node>,
    free_nodes: Vec<NodeId>,
    pools: Vec<Pool>,
    lru_head: NodeId,
    lru_tail: NodeId,
    next_uid: u64,
    totals: Totals,
}

impl<R> Default for Arena<R> {
    fn default() -> Self {
        Arena {
            segments: Vec::new(),
            free_segments: Vec::new(),
            nodes: Vec::new(),
            free_nodes: Vec::new(),
            pools: Vec::new(),
            lru_head: NIL,
            lru_tail: NIL,
            next_uid: 1,
            totals: Totals::default(),
        }
    }
}

/// The pool of `queue` and `class`.
/// An index entry: size in granules (bits 92..128), address key (bits
/// 32..92, see [`Arena::key`]), node (bits 0..32). Segments are below
/// 32 TiB (checked where they are made), so every size fits and the
/// packing keeps the order of `(size, key, node)`.
#[inline]
fn entry(size: u64, key: u64, n: NodeId) -> u128 {
    debug_assert!(size / GRANULE < 1 << 36 && key < 1 << 60);
    ((u128::from(size / GRANULE)) << 92) | (u128::from(key) << 32) | u128::from(n)
}

/// The node of an index entry.
#[inline]
fn entry_node(e: u128) -> NodeId {
    e as u32
}

fn pool_of(queue: QueueId, class: Class) -> u32 {
    queue * 2 + class.index() as u32
}

impl<R> Arena<R> {
    /// The running totals.
    pub(crate) fn totals(&self) -> Totals {
        self.totals
    }

    fn pool(&mut self, pool: u32) -> &mut Pool {
        let p = pool as usize;
        if self.pools.len() <= p {
            self.pools.resize_with(p + 1, Pool::default);
        }
        &mut self.pools[p]
    }

    fn seg(&self, s: SegId) -> &Segment<R> {
        self.segments[s as usize].as_ref().expect("a live segment")
    }

    /// A node for `node`'s fields, reusing a retired one where there is.
    /// A reused node keeps counting its generation: a heap entry left from
    /// its former life (in any pool) must never match it again.
    fn new_node(&mut self, mut node: Node) -> NodeId {
        match self.free_nodes.pop() {
            Some(n) => {
                node.generation = self.nodes[n as usize].generation.wrapping_add(1);
                self.nodes[n as usize] = node;
                n
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as NodeId
            }
        }
    }

    /// The address key of a node (60 bits): its segment's uid (its low 16
    /// bits: segments made 65,536 apart may tie-break in either order,
    /// which only the lowest-address preference among equal sizes sees),
    /// then its offset in granules.
    fn key(&self, n: NodeId) -> u64 {
        let node = &self.nodes[n as usize];
        ((self.seg(node.seg).uid & 0xFFFF) << 44) | (node.offset / GRANULE)
    }

    /// The growable segment of `queue`'s pool of `class`, if it has one.
    pub(crate) fn range_of(&self, queue: QueueId, class: Class) -> Option<SegId> {
        self.pools
            .get(pool_of(queue, class) as usize)
            .and_then(|p| p.range)
    }

    /// Adds a fixed segment of `size` bytes to `queue`'s pool of `class`,
    /// all of it one free node.
    pub(crate) fn add_segment(&mut self, queue: QueueId, class: Class, raw: R, size: u64) {
        let pool = pool_of(queue, class);
        self.insert_segment(pool, raw, size, None);
        self.totals.reserved += size;
    }

    /// Adds a growable segment (a reserved range, nothing mapped) of `size`
    /// bytes and pages of `page` bytes as `queue`'s range for `class`.
    pub(crate) fn add_range(&mut self, queue: QueueId, class: Class, raw: R, size: u64, page: u64) {
        let pool = pool_of(queue, class);
        let pages = Pages::new(page);
        let s = self.insert_segment(pool, raw, size, Some(pages));
        self.pool(pool).range = Some(s);
    }

    fn insert_segment(&mut self, pool: u32, raw: R, size: u64, pages: Option<Pages>) -> SegId {
        debug_assert!(size % GRANULE == 0 && size > 0);
        // Sizes take 36 bits of granules in an index entry (`entry`).
        assert!(
            size / GRANULE < 1 << 36,
            "a segment of {size} bytes (at most 32 TiB)"
        );
        let uid = self.next_uid;
        self.next_uid += 1;
        let seg = Segment {
            raw: Arc::new(raw),
            uid,
            pool,
            size,
            first: NIL,
            pages,
        };
        let s = match self.free_segments.pop() {
            Some(s) => {
                self.segments[s as usize] = Some(seg);
                s
            }
            None => {
                self.segments.push(Some(seg));
                (self.segments.len() - 1) as SegId
            }
        };
        let n = self.new_node(Node {
            seg: s,
            offset: 0,
            size,
            prev: NIL,
            next: NIL,
            free: None,
            lru_prev: NIL,
            lru_next: NIL,
            on_lru: false,
            generation: 0,
        });
        self.segments[s as usize].as_mut().expect("just made").first = n;
        self.totals.segments += 1;
        self.totals.taken += size; // `release` moves it to the free side
        self.make_free(n, 0);
        s
    }

    /// Carves a block of `size` bytes (a multiple of [`GRANULE`]) from
    /// `queue`'s pool of `class`: the smallest free node that holds it, the
    /// lowest address of that size, split if larger. Growable segments'
    /// unmapped pages under it are marked mapped and returned in
    /// [`Carved::maps`] for the caller to map. `None` if no free node fits.
    pub(crate) fn carve(&mut self, queue: QueueId, class: Class, size: u64) -> Option<Carved<R>> {
        debug_assert!(size % GRANULE == 0 && size > 0);
        let pool = pool_of(queue, class);
        let n = entry_node(
            *self
                .pools
                .get(pool as usize)?
                .index
                .range(entry(size, 0, 0)..)
                .next()?,
        );
        let free = self.unfree(n);
        let node_size = self.nodes[n as usize].size;
        if node_size > size {
            // The rest stays free, with the same stamp.
            let (seg, offset, next) = {
                let node = &self.nodes[n as usize];
                (node.seg, node.offset, node.next)
            };
            let rest = self.new_node(Node {
                seg,
                offset: offset + size,
                size: node_size - size,
                prev: n,
                next,
                free: None,
                lru_prev: NIL,
                lru_next: NIL,
                on_lru: false,
                generation: 0,
            });
            if next != NIL {
                self.nodes[next as usize].prev = rest;
            }
            let node = &mut self.nodes[n as usize];
            node.next = rest;
            node.size = size;
            self.totals.splits += 1;
            self.make_free(rest, free.stamp);
        }
        let (seg, offset) = {
            let node = &self.nodes[n as usize];
            (node.seg, node.offset)
        };
        let mut maps = Vec::new();
        let segment = self.segments[seg as usize].as_mut().expect("live");
        if let Some(pages) = segment.pages.as_mut() {
            maps = pages.unmapped_within(offset, offset + size);
            for &(a, b) in &maps {
                pages.map(a, b);
            }
        }
        let mapped_now: u64 = maps.iter().map(|(a, b)| b - a).sum();
        self.totals.reserved += mapped_now;
        self.totals.maps += maps.len() as u64;
        if !maps.is_empty() {
            // Pages mapped for this block may reach into its neighbours.
            self.refresh_neighbours(n);
        }
        let segment = self.seg(seg);
        Some(Carved {
            node: n,
            raw: segment.raw.clone(),
            offset,
            size,
            id: (segment.uid << 40) | offset,
            stamp: free.stamp,
            maps,
        })
    }

    /// Whether taken node `n` is what a carve of `size` bytes from `queue`'s
    /// pool of `class` would give again if `n` were released first: `n` is
    /// of that pool and exactly that size, its previous node is not free
    /// (so the merged node would start at `n`), and no free node of the pool
    /// sorts before the merged one (`n` with its free next node, if any)
    /// among those that hold `size`. Then keeping `n` taken is the release
    /// and the carve without the index work: the same block, the same
    /// neighbours, nothing mapped.
    pub(crate) fn would_carve_again(
        &self,
        n: NodeId,
        queue: QueueId,
        class: Class,
        size: u64,
    ) -> bool {
        let node = &self.nodes[n as usize];
        let pool = pool_of(queue, class);
        if node.free.is_some() || node.size != size || self.seg(node.seg).pool != pool {
            return false;
        }
        if node.prev != NIL && self.nodes[node.prev as usize].free.is_some() {
            return false;
        }
        // The free next node merges into the released one: its own entry
        // would be gone.
        let (next_free, next_entry) = match node.next {
            m if m != NIL && self.nodes[m as usize].free.is_some() => {
                let next = &self.nodes[m as usize];
                (next.size, Some(entry(next.size, self.key(m), m)))
            }
            _ => (0, None),
        };
        let merged = entry(size + next_free, self.key(n), n);
        match self.pools.get(pool as usize) {
            Some(p) => p
                .index
                .range(entry(size, 0, 0)..)
                .find(|&&e| Some(e) != next_entry)
                .is_none_or(|&e| e > merged),
            None => true,
        }
    }

    /// Undoes the page mapping of a carve whose device map failed: marks
    /// `runs` of the node's segment unmapped again (the caller then gives
    /// the node back).
    pub(crate) fn unmark_mapped(&mut self, node: NodeId, runs: &[(u64, u64)]) {
        let seg = self.nodes[node as usize].seg;
        let segment = self.segments[seg as usize].as_mut().expect("live");
        let pages = segment.pages.as_mut().expect("a growable segment");
        for &(a, b) in runs {
            pages.unmap(a, b);
            self.totals.reserved -= b - a;
            self.totals.maps -= 1;
        }
        self.refresh_neighbours(node);
    }

    /// The queue whose pool node `n`'s segment belongs to.
    pub(crate) fn queue_of(&self, n: NodeId) -> QueueId {
        self.seg(self.nodes[n as usize].seg).pool / 2
    }

    /// Gives a taken node back: free, with `stamp` the latest use on its
    /// pool's queue not yet complete (0 if none: see the reuse rule),
    /// merged with free neighbours. Returns the free node it is part of.
    pub(crate) fn release(&mut self, n: NodeId, stamp: u64) -> NodeId {
        debug_assert!(
            self.nodes[n as usize].free.is_none(),
            "a node given back twice"
        );
        let mut n = n;
        let mut stamp = stamp;
        // Merge with the previous node, then the next, if free.
        let prev = self.nodes[n as usize].prev;
        if prev != NIL && self.nodes[prev as usize].free.is_some() {
            let f = self.unfree(prev);
            stamp = stamp.max(f.stamp);
            self.absorb(prev, n);
            n = prev;
        }
        let next = self.nodes[n as usize].next;
        if next != NIL && self.nodes[next as usize].free.is_some() {
            let f = self.unfree(next);
            stamp = stamp.max(f.stamp);
            self.absorb(n, next);
        }
        self.make_free(n, stamp);
        n
    }

    /// Taken node `a` takes over its next node `b`, taken too (the bytes
    /// taken do not change).
    fn absorb(&mut self, a: NodeId, b: NodeId) {
        let (b_size, b_next) = {
            let nb = &self.nodes[b as usize];
            (nb.size, nb.next)
        };
        debug_assert_eq!(self.nodes[a as usize].next, b);
        let na = &mut self.nodes[a as usize];
        na.size += b_size;
        na.next = b_next;
        if b_next != NIL {
            self.nodes[b_next as usize].prev = a;
        }
        self.nodes[b as usize].generation = self.nodes[b as usize].generation.wrapping_add(1);
        self.free_nodes.push(b);
        self.totals.merges += 1;
    }

    /// Makes taken node `n` free with `stamp`: indexed, and on the LRU list
    /// or the due heap.
    fn make_free(&mut self, n: NodeId, stamp: u64) {
        let (seg, offset, size) = {
            let node = &self.nodes[n as usize];
            (node.seg, node.offset, node.size)
        };
        let (mapped, releasable) = self.measure(seg, offset, size);
        let node = &mut self.nodes[n as usize];
        node.generation = node.generation.wrapping_add(1);
        let generation = node.generation;
        node.free = Some(Free {
            stamp,
            mapped,
            releasable,
        });
        self.totals.taken -= size;
        if stamp == 0 {
            self.totals.ready += mapped;
            self.totals.ready_count += u64::from(mapped > 0);
            self.totals.releasable += releasable;
            if releasable > 0 {
                self.lru_push(n);
            }
        } else {
            self.totals.pending += mapped;
            self.totals.pending_count += 1;
        }
        let key = self.key(n);
        let pool = self.seg(seg).pool;
        let p = self.pool(pool);
        p.index.insert(entry(size, key, n));
        if stamp != 0 {
            p.due.push(Reverse((stamp, n, generation)));
        }
    }

    /// Takes free node `n` out of every index, making it taken; returns
    /// what it was.
    fn unfree(&mut self, n: NodeId) -> Free {
        let key = self.key(n);
        let node = &mut self.nodes[n as usize];
        let f = node.free.take().expect("a free node");
        node.generation = node.generation.wrapping_add(1);
        let (seg, size) = (node.seg, node.size);
        if f.stamp == 0 {
            self.totals.ready -= f.mapped;
            self.totals.ready_count -= u64::from(f.mapped > 0);
            self.totals.releasable -= f.releasable;
        } else {
            self.totals.pending -= f.mapped;
            self.totals.pending_count -= 1;
        }
        self.totals.taken += size;
        if self.nodes[n as usize].on_lru {
            self.lru_remove(n);
        }
        let pool = self.seg(seg).pool;
        let removed = self.pool(pool).index.remove(&entry(size, key, n));
        debug_assert!(removed, "a free node is indexed");
        f
    }

    /// Mapped and releasable bytes of `[offset, offset + size)` of `seg`
    /// as one free node.
    fn measure(&self, seg: SegId, offset: u64, size: u64) -> (u64, u64) {
        let s = self.seg(seg);
        match &s.pages {
            None => {
                let whole = offset == 0 && size == s.size;
                (size, if whole { size } else { 0 })
            }
            Some(p) => p.measure(offset, offset + size),
        }
    }

    /// Re-measures the free neighbours of `n` after pages changed under it.
    fn refresh_neighbours(&mut self, n: NodeId) {
        let (prev, next) = {
            let node = &self.nodes[n as usize];
            (node.prev, node.next)
        };
        for m in [prev, n, next] {
            if m != NIL && self.nodes[m as usize].free.is_some() {
                let f = self.unfree(m);
                self.make_free(m, f.stamp);
            }
        }
    }

    /// Clears the stamps of free nodes of `queue`'s pools whose stamp
    /// `completed` has passed: they become ready. Returns how many.
    pub(crate) fn promote(&mut self, queue: QueueId, completed: u64) -> usize {
        let mut promoted = 0;
        for class in [Class::Small, Class::Large] {
            let pool = pool_of(queue, class) as usize;
            while let Some(p) = self.pools.get_mut(pool) {
                let Some(&Reverse((stamp, n, generation))) = p.due.peek() else {
                    break;
                };
                if stamp > completed {
                    break;
                }
                p.due.pop();
                let node = &self.nodes[n as usize];
                let current =
                    node.generation == generation && node.free.is_some_and(|f| f.stamp == stamp);
                if current {
                    self.unfree(n);
                    self.make_free(n, 0);
                    promoted += 1;
                }
            }
        }
        promoted
    }

    /// The lowest stamp of a free node in flight on `queue`, if any.
    pub(crate) fn oldest_due(&self, queue: QueueId) -> Option<u64> {
        [Class::Small, Class::Large]
            .iter()
            .filter_map(|&c| self.pools.get(pool_of(queue, c) as usize))
            .flat_map(|p| p.due.iter())
            .filter(|Reverse((stamp, n, g))| {
                let node = &self.nodes[*n as usize];
                node.generation == *g && node.free.is_some_and(|f| f.stamp == *stamp)
            })
            .map(|Reverse((stamp, _, _))| *stamp)
            .min()
    }

    /// The highest stamp of a free node in flight on `queue`, if any.
    pub(crate) fn latest_due(&self, queue: QueueId) -> Option<u64> {
        [Class::Small, Class::Large]
            .iter()
            .filter_map(|&c| self.pools.get(pool_of(queue, c) as usize))
            .flat_map(|p| p.due.iter())
            .map(|Reverse((stamp, _, _))| *stamp)
            .max()
    }
}
