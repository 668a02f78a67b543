//! What the arena shows of itself: its segments, taken out for teardown or
//! described for a memory snapshot, and (for tests) its consistency check.

use super::*;
use crate::history::{BlockInfo, BlockState, SegmentInfo};

impl<R> Arena<R> {
    /// Every segment's raw buffer, its queue, and for a growable one its
    /// mapped runs, for teardown (the arena is emptied: the caller unmaps
    /// and releases them).
    pub(crate) fn take_segments(&mut self) -> Vec<TakenSegment<R>> {
        let out = self
            .segments
            .drain(..)
            .flatten()
            .map(|s| {
                let runs = s.pages.map(|p| p.runs.into_iter().collect());
                (s.raw, s.pool / 2, runs)
            })
            .collect();
        *self = Arena::default();
        out
    }

    /// The segments and their blocks, for a memory snapshot. `address(raw)`
    /// gives a raw buffer's address; `requested(node)` a taken node's
    /// requested bytes, if known; `pending(node)` whether a taken node is
    /// a block freed while in use (on the pending list).
    pub(crate) fn describe(
        &self,
        address: impl Fn(&R) -> u64,
        requested: impl Fn(NodeId) -> Option<u64>,
        pending: impl Fn(NodeId) -> bool,
    ) -> Vec<SegmentInfo> {
        let mut out = Vec::new();
        for s in self.segments.iter().flatten() {
            // Backends without addresses: the segment's uid, spaced apart.
            let base = match address(&s.raw) {
                0 => s.uid << 40,
                a => a,
            };
            let mut blocks = Vec::new();
            let mut n = s.first;
            while n != NIL {
                let node = &self.nodes[n as usize];
                let (state, requested_size) = match node.free {
                    Some(f) if f.stamp != 0 => (BlockState::PendingFree, 0),
                    Some(_) => (BlockState::Inactive, 0),
                    None if pending(n) => (BlockState::PendingFree, 0),
                    None => (BlockState::Allocated, requested(n).unwrap_or(node.size)),
                };
                blocks.push((node.offset, node.size, state, requested_size));
                n = node.next;
            }
            let queue = s.pool / 2;
            let class = if s.pool % 2 == 0 {
                Class::Small
            } else {
                Class::Large
            };
            match &s.pages {
                None => out.push(SegmentInfo {
                    address: base,
                    total_size: s.size,
                    queue,
                    pool: class.kind(),
                    expandable: false,
                    blocks: blocks
                        .into_iter()
                        .map(|(o, size, state, requested_size)| BlockInfo {
                            address: base + o,
                            size,
                            requested_size,
                            state,
                        })
                        .collect(),
                }),
                Some(p) => {
                    // One segment per mapped run, with the blocks' parts on it.
                    for (&a, &b) in &p.runs {
                        let parts = blocks
                            .iter()
                            .filter_map(|&(o, size, state, requested_size)| {
                                let (lo, hi) = (o.max(a), (o + size).min(b));
                                (hi > lo).then(|| BlockInfo {
                                    address: base + lo,
                                    size: hi - lo,
                                    requested_size: if lo == o { requested_size } else { 0 },
                                    state,
                                })
                            })
                            .collect();
                        out.push(SegmentInfo {
                            address: base + a,
                            total_size: b - a,
                            queue,
                            pool: class.kind(),
                            expandable: true,
                            blocks: parts,
                        });
                    }
                }
            }
        }
        out.sort_by_key(|s| s.address);
        out
    }

    /// Checks every invariant from scratch (for tests): nodes
    /// tile each segment in address order, free nodes are maximal (no two
    /// adjacent) and indexed exactly once, the LRU list holds exactly the
    /// complete free nodes with releasable bytes, taken nodes lie on mapped
    /// pages, and the totals match.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn check(&self) -> Result<(), String> {
        let mut t = Totals {
            splits: self.totals.splits,
            merges: self.totals.merges,
            maps: self.totals.maps,
            unmaps: self.totals.unmaps,
            ..Totals::default()
        };
        let mut indexed = 0usize;
        for (s, seg) in self.segments.iter().enumerate() {
            let Some(seg) = seg else { continue };
            t.segments += 1;
            t.reserved += match &seg.pages {
                None => seg.size,
                Some(p) => p.runs.iter().map(|(a, b)| b - a).sum(),
            };
            let mut at = 0;
            let mut prev = NIL;
            let mut prev_free = false;
            let mut n = seg.first;
            while n != NIL {
                let node = &self.nodes[n as usize];
                if node.seg != s as SegId || node.offset != at || node.prev != prev {
                    return Err(format!("segment {s}: node {n} out of place"));
                }
                if node.size == 0 || node.offset % GRANULE != 0 || node.size % GRANULE != 0 {
                    return Err(format!("node {n}: size {} at {}", node.size, node.offset));
                }
                let (mapped, releasable) = self.measure(s as SegId, node.offset, node.size);
                match node.free {
                    Some(f) => {
                        if prev_free {
                            return Err(format!("node {n}: two free nodes side by side"));
                        }
                        if (f.mapped, f.releasable) != (mapped, releasable) {
                            return Err(format!("node {n}: stale measure {f:?}"));
                        }
                        let key = entry(node.size, self.key(n), n);
                        if !self.pools[seg.pool as usize].index.contains(&key) {
                            return Err(format!("node {n}: free but not indexed"));
                        }
                        indexed += 1;
                        if f.stamp == 0 {
                            t.ready += mapped;
                            t.ready_count += u64::from(mapped > 0);
                            t.releasable += releasable;
                        } else {
                            t.pending += mapped;
                            t.pending_count += 1;
                        }
                        let should = f.stamp == 0 && releasable > 0;
                        if node.on_lru != should {
                            return Err(format!("node {n}: on the LRU list {}", node.on_lru));
                        }
                    }
                    None => {
                        if mapped != node.size {
                            return Err(format!("node {n}: taken on unmapped pages"));
                        }
                        if node.on_lru {
                            return Err(format!("node {n}: taken, on the LRU list"));
                        }
                        t.taken += node.size;
                    }
                }
                prev_free = node.free.is_some();
                at += node.size;
                prev = n;
                n = node.next;
            }
            if at != seg.size {
                return Err(format!("segment {s}: nodes cover {at} of {}", seg.size));
            }
        }
        let in_index: usize = self.pools.iter().map(|p| p.index.len()).sum();
        if in_index != indexed {
            return Err(format!("{in_index} indexed, {indexed} free"));
        }
        let mut on_lru = 0;
        let mut n = self.lru_head;
        while n != NIL {
            on_lru += 1;
            n = self.nodes[n as usize].lru_next;
        }
        let should: usize = self.nodes.iter().filter(|n| n.on_lru).count();
        if on_lru != should {
            return Err(format!("LRU list holds {on_lru}, {should} flagged"));
        }
        if t != self.totals {
            return Err(format!("totals {:?}, counted {t:?}", self.totals));
        }
        Ok(())
    }
}
