//! Freeing: the last handle's drop files its block in the freeing thread's
//! front cache (idle), or gathers it there in flight, for the arena (its
//! pool's queue reuses in order) or the pending list (work on another queue
//! is in flight); under `Immediate` it goes to the arena regardless.
//! Promotion moves pending blocks whose work completed to the arena;
//! trimming gives memory back to the device (I1: complete free memory
//! only).

use std::sync::Arc;

use crate::arena::Trimmed;
use crate::backend::Backend;
use crate::block::Block;
use crate::buffer::Shell;
use crate::front::{Deferred, Home};
use crate::history::MemoryAction;
use crate::policy::PolicyKind;
use crate::sync::lock_spinning;
use crate::timeline::QueueId;

use super::state::State;
use super::{BackendTime, Shared, StateGuard};

impl<B: Backend> Shared<B> {
    /// The free path (see the module documentation): `shell` is the buffer's,
    /// still filled, with no handle left. Returns the home slot's reference
    /// to this allocator if the slot lets it go (K1): the caller drops it
    /// after its last use of `self`, since it may be the last one.
    #[must_use]
    #[inline]
    pub(crate) fn free(&self, shell: Shell<B>) -> Option<Arc<Shared<B>>> {
        if self.recording() {
            return self.free_recorded(shell);
        }
        // SAFETY: S1: the caller dropped the last handle; the shell is ours.
        if unsafe { shell.owned_stamps() }.is_empty() {
            self.free_idle(shell)
        } else {
            self.free_bound(shell)
        }
    }

    /// Frees a block with no use in flight (stamps cleared) to the calling
    /// thread's slot: the fast path, on a thread's own slot without a lock.
    #[inline]
    pub(super) fn free_idle(&self, shell: Shell<B>) -> Option<Arc<Shared<B>>> {
        let (size, home) = {
            // SAFETY: S1: the shell has no handle and is ours (the free
            // path's).
            let live = unsafe { shell.owned_live() };
            (live.held.get_mut().size, live.home)
        };
        let me = self.fronts.me();
        if size > self.fronts.cap() {
            // Over any slot's cap: straight to the arena.
            self.count_free(me);
            let mut st = lock_spinning(&self.state);
            let mut spare = Vec::new();
            self.file_shell(&mut st, shell, &mut spare);
            self.trim_to_cap(st);
            drop(spare); // after the lock
            return self.uncount(home, me);
        }
        let mut slot = self.fronts.enter(me);
        slot.frees += 1;
        let cap = self.fronts.cap_for(me);
        match slot.try_push(size, shell, cap) {
            // The common case: done in one section, the uncount last.
            Ok(()) if me.slot() == home => slot.remove_live(self.fronts.closing()),
            Ok(()) => {
                drop(slot);
                self.uncount(home, me)
            }
            Err(shell) => {
                let evicted = slot.push(size, shell, cap);
                drop(slot);
                // A slot takes its share of the cache limit at its first
                // idle block that fits (see `Fronts::claim`).
                let claim = (cap == 0 && size <= self.fronts.cap()).then_some(me);
                self.file_evicted(evicted, claim);
                self.uncount(home, me)
            }
        }
    }

    /// Uncounts a freed buffer from its home slot (rule K1). The free path's
    /// last touch of this allocator: once the home slot's count is down, a
    /// free on another thread may let the slot's reference go and tear the
    /// allocator down. Returns the reference if this uncount let it go; the
    /// caller drops it after every other use of `self`.
    #[inline]
    pub(super) fn uncount(&self, home: u32, me: Home) -> Option<Arc<Shared<B>>> {
        if me.slot() == home {
            self.fronts.enter(me).remove_live(self.fronts.closing())
        } else {
            self.fronts.uncount_remote(home)
        }
    }

    /// Counts a free in the calling thread's slot (its counters), outside
    /// the fast path.
    pub(super) fn count_free(&self, me: Home) {
        self.fronts.enter(me).frees += 1;
    }

    /// Moves shells evicted from a full slot (its older half, or a shell
    /// over the slot's cap) to the arena; claims slot `claim`'s share of
    /// the cache limit, if given, taking it from the arena's.
    #[inline(never)]
    pub(super) fn file_evicted(&self, evicted: Vec<Shell<B>>, claim: Option<Home>) {
        if evicted.is_empty() {
            return;
        }
        let mut st = lock_spinning(&self.state);
        let mut spare = Vec::new();
        for shell in evicted {
            self.file_shell(&mut st, shell, &mut spare);
        }
        if let Some(me) = claim {
            self.fronts.claim(me, |reserve| {
                st.ready_cap = st.limits.cache - reserve;
            });
        }
        self.trim_to_cap(st);
        drop(spare); // after the lock
    }

    /// Frees a block that was bound. Where it goes: if the cached watermarks
    /// show its every use complete, to the slot like an idle one; else to
    /// the pending list or the arena (see `file_block`), gathered in the
    /// slot first. The free path never asks the backend: a block whose work
    /// completed since the last refresh waits for the next one. Under
    /// `Immediate`, to the arena, its uses ignored.
    #[inline(never)]
    pub(super) fn free_bound(&self, shell: Shell<B>) -> Option<Arc<Shared<B>>> {
        // SAFETY: S1: the shell has no handle and is ours (the free path's).
        let (stamps, live) = unsafe { (shell.owned_stamps(), shell.owned_live()) };
        let (home, size) = (live.home, live.held.get_mut().size);
        if stamps.has_uses_at_free() {
            // Stream-ordered: the program's work on those streams up to now.
            stamps.resolve_at_free(|q| self.queues.get(q).mark_use());
        }
        let me = self.fronts.me();
        if self.config.policy.kind() == PolicyKind::Immediate {
            self.count_free(me);
            self.free_to_lists(shell);
            return self.uncount(home, me);
        }
        if self.first_incomplete_cached(stamps).is_none() {
            stamps.clear();
            return self.free_idle(shell);
        }
        // In flight: gathered in the slot, filed in a batch (see `front.rs`).
        let mut slot = self.fronts.enter(me);
        slot.frees += 1;
        let batch = slot.defer(size, shell);
        drop(slot);
        if let Some(batch) = batch {
            let mut st = lock_spinning(&self.state);
            let mut spare = Vec::new();
            self.file_deferred(&mut st, batch, &mut spare);
            self.trim_to_cap(st);
            drop(spare); // after the lock
        }
        self.uncount(home, me)
    }

    /// Files a batch of shells freed in flight (from a slot), each by
    /// `file_block`. The caller trims after.
    pub(super) fn file_deferred(
        &self,
        st: &mut State<B>,
        batch: Deferred<B>,
        spare: &mut Vec<Shell<B>>,
    ) {
        for shell in batch {
            // SAFETY: S1: a shell in a slot has no handle and is ours.
            let block = unsafe { shell.unfill() };
            st.stats.active_bytes -= block.size;
            st.stats.active_count -= 1;
            st.stats.deferred_frees += 1;
            self.file_block(st, block);
            st.park(shell, spare);
        }
    }

    /// Whether blocks in flight on `queue` alone may go to new work for it
    /// (the in-order rule, I2): `Deferred`, in-order reuse on, and a queue
    /// whose backend orders memory.
    #[inline]
    fn in_order_on(&self, queue: QueueId) -> bool {
        self.config.policy.kind() == PolicyKind::Deferred
            && self.config.in_order_reuse
            && self.queues.get(queue).orders_memory
    }

    /// Files a block that left a buffer with its stamps, by the cached
    /// watermarks: back to the arena (merged with its free neighbours) if
    /// every use completed, or if the uses still in flight are all on its
    /// pool's queue and that queue reuses in order (the node then carries
    /// that use's value); else on the pending list, under the first stamp
    /// that keeps it there. Returns whether it went to the arena.
    pub(super) fn file_block(&self, st: &mut State<B>, block: Block<B::Buffer>) -> bool {
        let owner = st.arena.queue_of(block.node);
        let in_order = self.in_order_on(owner);
        let mut own = 0;
        let mut blocking = None;
        for s in block.stamps.iter() {
            if s.value <= self.queues.get(s.queue).watermark.get() {
                continue;
            }
            if in_order && s.queue == owner {
                own = s.value;
            } else {
                blocking = Some(*s);
                break;
            }
        }
        match blocking {
            Some(due) => {
                st.pending.insert(block, due);
                false
            }
            None => {
                st.arena.release(block.node, own);
                true
            }
        }
    }

    /// Under `Immediate`: files a freed block that was bound in the arena,
    /// its uses ignored (the defect).
    pub(super) fn free_to_lists(&self, shell: Shell<B>) {
        // SAFETY: S1: the shell has no handle and is ours (the free path's).
        let block = unsafe { shell.unfill() };
        let mut st = lock_spinning(&self.state);
        st.stats.active_bytes -= block.size;
        st.stats.active_count -= 1;
        st.arena.release(block.node, 0);
        drop(block);
        let mut spare = Vec::new();
        st.park(shell, &mut spare);
        self.trim_to_cap(st);
        drop(spare); // after the lock
    }

    /// Moves an idle filled shell out of a slot (evicted or drained) to the
    /// arena.
    pub(super) fn file_shell(&self, st: &mut State<B>, shell: Shell<B>, spare: &mut Vec<Shell<B>>) {
        // SAFETY: S1: a shell out of a slot has no handle and is ours.
        let block = unsafe { shell.unfill() };
        debug_assert!(block.stamps.is_empty(), "slots hold idle blocks only");
        st.stats.active_bytes -= block.size;
        st.stats.active_count -= 1;
        st.arena.release(block.node, 0);
        drop(block);
        st.park(shell, spare);
    }

    /// Trims the arena's releasable bytes to their cap, releasing whole
    /// segments after the lock.
    pub(super) fn trim_to_cap(&self, mut st: StateGuard<'_, B>) {
        let over = st.arena.totals().releasable.saturating_sub(st.ready_cap);
        if over > 0 {
            let trimmed = st.arena.trim(over);
            let (segments, _) = self.apply_trims(&mut st, trimmed);
            drop(st);
            self.release_segments(segments);
        }
    }

    /// Makes the device calls for trimmed memory. Pages are unmapped now,
    /// under the state lock: the arena marked them unmapped, and a carve
    /// may map them again the moment the lock goes. Whole fixed segments
    /// are returned, to be released after the lock, with the bytes given
    /// back (pages and segments).
    #[must_use]
    pub(super) fn apply_trims(
        &self,
        st: &mut State<B>,
        trimmed: Vec<Trimmed<B::Buffer>>,
    ) -> (Vec<B::Buffer>, u64) {
        let mut segments = Vec::new();
        let mut calls = 0;
        let mut bytes = 0;
        for t in trimmed {
            bytes += t.bytes();
            match t {
                Trimmed::Segment { raw, size, queue } => {
                    calls += 1;
                    let addr = self.address_of(&raw, 0);
                    self.record(st, MemoryAction::SegmentFree, addr, size, queue);
                    segments.push(raw);
                }
                Trimmed::Pages { raw, runs, queue } => {
                    for &(a, b) in &runs {
                        let addr = self.address_of(&raw, a);
                        self.record(st, MemoryAction::SegmentUnmap, addr, b - a, queue);
                    }
                    BackendTime::timed(&self.backend_time.release, || {
                        for (a, b) in runs {
                            calls += 1;
                            // SAFETY: (1) `raw` is a growable segment this
                            // backend reserved, and the run is mapped (the
                            // arena mapped it). (2) The run lies wholly in a
                            // complete free node: no submission that recorded
                            // a use of it is incomplete (I1); `Immediate`'s
                            // caller accepted the exception.
                            unsafe { self.backend.unmap(&raw, a, b - a) };
                        }
                    });
                }
            }
        }
        st.note_trimmed(calls);
        (segments, bytes)
    }

    /// Moves every slot's blocks to the arena or the pending list (for
    /// growth, trims, clears, limit changes and memory pressure). The caller
    /// trims after.
    pub(super) fn drain_fronts(&self, st: &mut State<B>) {
        let mut spare = Vec::new();
        let (idle, deferred) = self.fronts.drain_all();
        for shell in idle {
            self.file_shell(st, shell, &mut spare);
        }
        self.file_deferred(st, deferred, &mut spare);
    }

    /// Files pending blocks whose stamps the cached watermarks show passed
    /// (`file_block`: to the arena, or under their next stamp), marks the
    /// arena's free blocks whose work completed ready, then trims the
    /// releasable bytes to the cache limit; returns the segments to release
    /// after the lock, and the bytes given back. Asks the backend nothing: callers refresh first
    /// ([`Shared::refresh_all`], without the state lock) where it matters.
    #[must_use]
    pub(super) fn promote(&self, st: &mut State<B>) -> (Vec<B::Buffer>, u64) {
        let mut trimmed = Vec::new();
        for qid in 0..st.pending.queue_slots() as QueueId {
            if !st.pending.has_queue(qid) {
                continue;
            }
            let completed = self.queues.get(qid).watermark.get();
            for block in st.pending.take_due(qid, completed) {
                let queue = st.arena.queue_of(block.node);
                let (addr, size) = (self.address_of(&block.raw, block.offset), block.size);
                if self.file_block(st, block) {
                    self.record(st, MemoryAction::FreeCompleted, addr, size, queue);
                }
            }
        }
        for q in self.queues.iter() {
            st.arena.promote(q.id, q.watermark.get());
        }
        if st.release_pending {
            // After `clear_cache`: what completed goes back too.
            trimmed.extend(st.arena.trim(u64::MAX));
            st.release_pending = st.pending.len() > 0 || st.arena.totals().pending_count > 0;
        }
        let (mut segments, mut bytes) = self.apply_trims(st, trimmed);
        // Promoted blocks count against the cache limit like freed ones (I4).
        let over = st.arena.totals().releasable.saturating_sub(st.ready_cap);
        if over > 0 {
            let more = st.arena.trim(over);
            let (more, more_bytes) = self.apply_trims(st, more);
            segments.extend(more);
            bytes += more_bytes;
        }
        (segments, bytes)
    }

    /// Gives whole fixed segments back to the device.
    pub(super) fn release_segments(&self, segments: Vec<B::Buffer>) {
        if segments.is_empty() {
            return;
        }
        BackendTime::timed(&self.backend_time.release, || {
            for raw in segments {
                // SAFETY: (1) every segment came from `self.backend.allocate`.
                // (2) It was one complete free node of the arena: no
                // submission that recorded a use of any of its blocks is
                // incomplete (I1), and no block of it is out (the arena
                // unwrapped its only reference). The exception is the
                // `Immediate` policy, whose `unsafe` constructor makes the
                // caller accept releasing in flight.
                unsafe { self.backend.release(raw) };
            }
        });
    }
}
