//! Giving memory back: trimming walks the free nodes that have releasable
//! memory, least recently freed first (the LRU list), and takes whole free
//! fixed segments out of the arena or marks whole free pages unmapped
//! (rule I1: only complete free nodes are on the list).

use std::sync::Arc;

use super::{Arena, NodeId, Trimmed, NIL};

impl<R> Arena<R> {
    /// Gives back releasable memory, least recently freed first, until
    /// `bytes` are given back or nothing releasable is left. Fixed segments
    /// leave the arena; growable segments' pages are marked unmapped. The
    /// caller releases and unmaps them on the device.
    pub(crate) fn trim(&mut self, bytes: u64) -> Vec<Trimmed<R>> {
        let mut out = Vec::new();
        let mut given = 0;
        while given < bytes && self.lru_head != NIL {
            let n = self.lru_head;
            let t = self.give_back(n);
            given += t.bytes();
            out.push(t);
        }
        out
    }

    /// Gives back the releasable memory of LRU node `n`.
    fn give_back(&mut self, n: NodeId) -> Trimmed<R> {
        let f = self.unfree(n);
        debug_assert!(f.stamp == 0 && f.releasable > 0);
        let (seg, offset, size) = {
            let node = &self.nodes[n as usize];
            (node.seg, node.offset, node.size)
        };
        let growable = self.seg(seg).pages.is_some();
        if !growable {
            // A whole free fixed segment: it leaves.
            self.totals.taken -= size;
            self.totals.reserved -= size;
            self.totals.segments -= 1;
            self.nodes[n as usize].generation = self.nodes[n as usize].generation.wrapping_add(1);
            self.free_nodes.push(n);
            let segment = self.segments[seg as usize].take().expect("live");
            self.free_segments.push(seg);
            let raw = Arc::try_unwrap(segment.raw)
                .ok()
                .expect("a whole free segment has no block out (I1)");
            return Trimmed::Segment {
                raw,
                size,
                queue: segment.pool / 2,
            };
        }
        let segment = self.segments[seg as usize].as_mut().expect("live");
        let pages = segment.pages.as_mut().expect("growable");
        let runs = pages.whole_mapped_within(offset, offset + size);
        for &(a, b) in &runs {
            pages.unmap(a, b);
            self.totals.reserved -= b - a;
        }
        self.totals.unmaps += runs.len() as u64;
        let raw = segment.raw.clone();
        let queue = segment.pool / 2;
        self.make_free(n, 0);
        Trimmed::Pages { raw, runs, queue }
    }

    pub(super) fn lru_push(&mut self, n: NodeId) {
        let node = &mut self.nodes[n as usize];
        node.on_lru = true;
        node.lru_prev = self.lru_tail;
        node.lru_next = NIL;
        match self.lru_tail {
            NIL => self.lru_head = n,
            t => self.nodes[t as usize].lru_next = n,
        }
        self.lru_tail = n;
    }

    pub(super) fn lru_remove(&mut self, n: NodeId) {
        let (p, x) = {
            let node = &mut self.nodes[n as usize];
            node.on_lru = false;
            (node.lru_prev, node.lru_next)
        };
        match p {
            NIL => self.lru_head = x,
            p => self.nodes[p as usize].lru_next = x,
        }
        match x {
            NIL => self.lru_tail = p,
            x => self.nodes[x as usize].lru_prev = p,
        }
    }
}
