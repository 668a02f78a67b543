//! Allocation: the fast path through the calling thread's front cache, the
//! state lock's path (a carve from the queue's pool in the arena, after
//! filing and promoting what completed), growth (a new segment, or pages
//! mapped into the pool's growable one), and memory pressure (trimming to
//! the limits, waiting for in-flight work, failing with
//! [`Error::OutOfMemory`]).
//!
//! # Growth
//!
//! The pool grows only once nothing idle is left that could serve the
//! request: the front caches are drained (their blocks merge back into the
//! arena), owed markers are submitted, the queues are asked how far they
//! got, and completed work is promoted, then the carve is tried again. So
//! reserved bytes rise only when live buffers and work in flight need them.

use std::sync::Arc;
use std::time::Instant;

use crate::arena::{Carved, Class, GRANULE};
use crate::backend::{Backend, DeviceError};
use crate::block::Block;
use crate::buffer::{pack_fence, BufferInner, Shell};
use crate::config::{round_size, DEFAULT_PAGE_SIZE, DEFAULT_SMALL_ALIGN};
use crate::error::{Error, Result};
use crate::front::{Deferred, Home};
use crate::history::MemoryAction;
use crate::policy::PolicyKind;
use crate::sync::{lock_spinning, MutexGuard, Ordering};
use crate::timeline::{QueueId, Stamp, Stamps, AT_FREE};
use crate::Buffer;

use super::queues::QueueShared;
use super::state::State;
use super::{BackendTime, Shared, StateGuard};

/// Requests up to this size come from small segments (PyTorch's rule, and
/// the size below which splitting a 2 MiB page among blocks pays).
pub(crate) const SMALL_MAX: u64 = 1 << 20;
/// A fixed small segment's size.
const SMALL_SEGMENT: u64 = 2 << 20;
/// Large requests below this share fixed segments of `MEDIUM_SEGMENT`.
const MEDIUM_MAX: u64 = 10 << 20;
/// A fixed segment for medium requests.
const MEDIUM_SEGMENT: u64 = 20 << 20;
/// Larger requests get a fixed segment of their own, rounded to this.
const LARGE_ROUND: u64 = 2 << 20;
/// The largest block a front cache serves: the small pool's. A large
/// block served from a thread's front cache would skip the arena's choice
/// (the lowest-addressed of the smallest free blocks that hold it, after
/// merging), and that choice is what keeps the pool's top low: replaying
/// the shared traces with front caches serving blocks up to 10 MiB, one
/// reserved more and mapped more pages than PyTorch does on it
/// (docs/BENCHMARKS.md). So a free of a
/// large block still lands in the freeing thread's front cache (no lock),
/// but every large request misses there, and the miss gives the slot's
/// large blocks back to the arena under the lock it takes anyway, before
/// the carve.
pub(crate) const FRONT_MAX: u64 = SMALL_MAX;
/// Pages of growable small segments.
pub(crate) const SMALL_PAGE: u64 = 2 << 20;
/// Pages of growable large segments.
pub(crate) const LARGE_PAGE: u64 = 20 << 20;

/// The block size of a request: its bytes rounded up to [`GRANULE`].
#[inline]
fn block_size(size: u64) -> Option<u64> {
    size.checked_add(GRANULE - 1).map(|s| s & !(GRANULE - 1))
}

impl Class {
    /// The class of a block of `size` bytes.
    pub(crate) fn of(size: u64) -> Class {
        if size <= SMALL_MAX {
            Class::Small
        } else {
            Class::Large
        }
    }
}

impl<B: Backend> Shared<B> {
    /// The fast path: an idle block of the request's size class in this
    /// thread's slot, under the slot's lock alone. Everything else is out of
    /// line, so that this stays a few dozen instructions.
    #[inline]
    pub(super) fn malloc(
        self: &Arc<Self>,
        size: u64,
        queue: &Arc<QueueShared<B>>,
    ) -> Result<Buffer<B>> {
        queue.check_fault()?;
        let Some((block, ceiling)) = self.rounded(size) else {
            return Err(self.size_error(size));
        };
        if self.config.policy.kind() == PolicyKind::Retained {
            self.drain_retained();
        }
        let home = self.fronts.me();
        let mut slot = self.fronts.enter(home);
        slot.add_live(self);
        // An idle block of this size class; else, under in-order reuse, a
        // deferred one in flight on this queue alone (fenced for others).
        // Front caches hold small blocks only (see `FRONT_MAX`).
        let in_order = self.slot_in_order && queue.orders_memory && !self.recording();
        let ceiling = if self.recording() { 0 } else { ceiling };
        let taken = match slot.take(block, ceiling) {
            Some(shell) => Some((shell, 0)),
            None if in_order => {
                slot.take_in_order(block, ceiling, queue.id)
                    .map(|(shell, value)| {
                        let fence = Stamp {
                            queue: queue.id,
                            value,
                        };
                        (shell, pack_fence(fence))
                    })
            }
            None => None,
        };
        if let Some((shell, fence)) = taken {
            drop(slot);
            let (scrub, home) = (self.config.scrub, home.slot());
            let buf = Buffer::reissue(shell, size, queue.id, scrub, home, fence);
            if queue.stream_ordered {
                buf.inner.stamps.lock().record(queue.id, AT_FREE);
            }
            return Ok(buf);
        }
        // Else the slot's blocks freed in flight, and for a large request
        // its large blocks, are filed under the state lock the miss takes
        // anyway, before the carve: the arena then sees them, merged with
        // their free neighbours, where the carve may use them (in order,
        // for blocks in flight on this queue).
        let filed = slot.take_for_miss((block > FRONT_MAX).then_some(FRONT_MAX));
        drop(slot);
        self.malloc_miss(size, block, queue, home, filed)
    }

    /// The block size for a request of `size` bytes, and the largest block
    /// a front cache may serve it with (its size class: at most a quarter,
    /// or a unit, more; 0 above [`FRONT_MAX`], which front caches never
    /// hold), or `None` if `size` is 0 or too large.
    #[inline]
    pub(super) fn rounded(&self, size: u64) -> Option<(u64, u64)> {
        let max = self.info.max_buffer_size;
        if size == 0 || size > max {
            return None;
        }
        let block = block_size(size)?;
        let c = &self.config;
        if block > FRONT_MAX {
            return Some((block, 0));
        }
        let ceiling = round_size(size, DEFAULT_PAGE_SIZE, DEFAULT_SMALL_ALIGN, c.size_classes)?;
        Some((block, ceiling.max(block)))
    }

    /// Why `rounded(size)` is `None`.
    #[cold]
    pub(super) fn size_error(&self, size: u64) -> Error {
        if size == 0 {
            Error::ZeroSize
        } else {
            Error::TooLarge {
                requested: size,
                max: self.info.max_buffer_size,
            }
        }
    }

    /// A front-cache miss: the state lock's path. The buffer is already
    /// counted by `home`, and uncounted here if the allocation fails.
    #[inline(never)]
    pub(super) fn malloc_miss(
        self: &Arc<Self>,
        size: u64,
        block: u64,
        queue: &Arc<QueueShared<B>>,
        home: Home,
        filed: (Vec<Shell<B>>, Deferred<B>),
    ) -> Result<Buffer<B>> {
        let r = self.malloc_locked(size, block, queue, home.slot(), filed);
        if r.is_err() {
            // Not counted after all (K1); `self` is an `Arc` the caller
            // holds, so the slot's reference is never the last.
            let keep = self.fronts.enter(home).remove_live(self.fronts.closing());
            drop(keep);
        }
        r
    }

    /// The allocation path under the state lock: the slot's deferred shells
    /// filed, a carve from the queue's pool; else, once everything idle was
    /// gathered (see the module documentation), growth. The buffer is
    /// already counted by `home`.
    fn malloc_locked(
        self: &Arc<Self>,
        size: u64,
        block: u64,
        queue: &Arc<QueueShared<B>>,
        home: u32,
        (mut idle, deferred): (Vec<Shell<B>>, Deferred<B>),
    ) -> Result<Buffer<B>> {
        // With work outstanding on the queue, learn how far it got (and of
        // a failure or a lost device, reported here rather than after a
        // buffer from the cache was handed out).
        let fault = if queue.submitted.load(Ordering::Acquire) > queue.watermark.get() {
            self.refresh(queue);
            queue.check_fault()
        } else {
            Ok(())
        };
        let class = Class::of(block);
        let mut st = lock_spinning(&self.state);
        let mut spare = Vec::new();
        let mut segments = Vec::new();
        // A large block of exactly this size that the thread freed, kept
        // apart while the rest is filed: it may be the very block the carve
        // would choose.
        let again = idle
            .iter()
            // SAFETY: S1: a shell out of a slot has no handle and is ours.
            .position(|shell| unsafe { shell.owned_live() }.held.get_mut().size == block)
            .map(|i| idle.swap_remove(i));
        // The slot's blocks are filed even when the call fails: nothing
        // taken out of a slot is lost.
        for shell in idle {
            self.file_shell(&mut st, shell, &mut spare);
        }
        self.file_deferred(&mut st, deferred, &mut spare);
        if let Err(e) = fault {
            if let Some(shell) = again {
                self.file_shell(&mut st, shell, &mut spare);
            }
            self.trim_to_cap(st);
            drop(spare); // after the lock
            return Err(e);
        }
        if let Some(shell) = again {
            // SAFETY: S1, as above.
            let node = unsafe { shell.owned_live() }.held.get_mut().node;
            if st.arena.would_carve_again(node, queue.id, class, block) {
                // Handed out again as it is: what its release and the
                // carve would have done (`Arena::would_carve_again`).
                st.stats.allocations += 1;
                st.stats.cache_hits += 1;
                drop(st);
                drop(spare); // after the lock
                let scrub = self.config.scrub;
                let buf = Buffer::reissue(shell, size, queue.id, scrub, home, 0);
                if queue.stream_ordered {
                    buf.inner.stamps.lock().record(queue.id, AT_FREE);
                }
                return Ok(buf);
            }
            self.file_shell(&mut st, shell, &mut spare);
        }
        let mut carved = self.carve_cached(&mut st, queue.id, class, block);
        if carved.is_none() {
            // Gather what is idle elsewhere before growing.
            self.drain_fronts(&mut st);
            MutexGuard::unlocked(&mut st, || {
                self.flush_markers();
                self.refresh_all();
                self.drain_retained();
            });
            let (more, _) = self.promote(&mut st);
            segments.extend(more);
            carved = self.carve_cached(&mut st, queue.id, class, block);
        }
        let recycled = carved.is_some();
        let carved = match carved {
            Some(c) => {
                st.stats.cache_hits += 1;
                c
            }
            None => match self.grow(&mut st, queue.id, class, block, size, &mut segments) {
                Ok(c) => {
                    st.stats.cache_misses += 1;
                    c
                }
                Err(e) => {
                    drop(st);
                    self.release_segments(segments);
                    return Err(e);
                }
            },
        };
        let (block, fence) = self.block_of(carved, queue.id);
        if fence != 0 {
            st.stats.in_order_hits += 1;
        }
        if st.history.is_some() {
            let addr = self.address_of(&block.raw, block.offset);
            self.record(&mut st, MemoryAction::Alloc, addr, block.size, queue.id);
        }
        st.stats.allocations += 1;
        st.stats.active_bytes += block.size;
        st.stats.active_count += 1;
        st.stats.peak_active_bytes = st.stats.peak_active_bytes.max(st.stats.active_bytes);
        let shell = st.spares.pop();
        drop(st);
        drop(spare); // after the lock
        self.release_segments(segments);
        let shell = shell.unwrap_or_else(BufferInner::shell);
        let buf = Buffer::adopt(shell, self, block, size, queue.id, fence, home);
        if queue.stream_ordered {
            buf.inner.stamps.lock().record(queue.id, AT_FREE);
        }
        if recycled && self.config.scrub {
            // Zeroed at its first binding (see `Config::scrub`).
            buf.inner.needs_scrub.store(true, Ordering::Relaxed);
        }
        Ok(buf)
    }

    /// A carve from `queue`'s pool of `class` on memory already mapped:
    /// one that would map pages (growth) is undone.
    pub(super) fn carve_cached(
        &self,
        st: &mut State<B>,
        queue: QueueId,
        class: Class,
        block: u64,
    ) -> Option<Carved<B::Buffer>> {
        let c = st.arena.carve(queue, class, block)?;
        if c.maps.is_empty() {
            Some(c)
        } else {
            st.arena.unmark_mapped(c.node, &c.maps);
            st.arena.release(c.node, c.stamp);
            None
        }
    }

    /// A carved block as a buffer takes it, with its reuse fence (packed; 0
    /// for none): a block still in flight on its pool's queue (reused in
    /// order) keeps that use as its stamp, and other queues must wait for
    /// it (I2).
    pub(super) fn block_of(&self, c: Carved<B::Buffer>, queue: QueueId) -> (Block<B::Buffer>, u64) {
        let mut stamps = Stamps::default();
        let mut fence = 0;
        if c.stamp > self.queues.get(queue).watermark.get() {
            stamps.record(queue, c.stamp);
            fence = pack_fence(Stamp {
                queue,
                value: c.stamp,
            });
        }
        let block = Block {
            raw: c.raw,
            offset: c.offset,
            size: c.size,
            id: c.id,
            node: c.node,
            stamps,
        };
        (block, fence)
    }

    /// The size of a new fixed segment for a block of `block` bytes: small
    /// blocks share 2 MiB segments, medium ones 20 MiB segments, larger
    /// ones get their own, rounded to 2 MiB; never past the device's
    /// largest buffer, nor (beyond the block) a sixteenth of the memory
    /// limit `memory`, so that every queue's pools fit under a small one.
    fn segment_size(&self, class: Class, block: u64, memory: u64) -> u64 {
        let s = match class {
            Class::Small => SMALL_SEGMENT,
            Class::Large if block < MEDIUM_MAX => MEDIUM_SEGMENT,
            Class::Large => block.next_multiple_of(LARGE_ROUND),
        };
        let max = self.info.max_buffer_size & !(GRANULE - 1);
        let share = (memory / 16) & !(GRANULE - 1);
        s.min(max).min(share.max(block)).max(block)
    }

    /// Makes sure `queue`'s pool of `class` has its growable segment: an
    /// address range as large as the device's memory, nothing mapped.
    /// Returns whether it has one (the backend may refuse).
    fn ensure_range(&self, st: &mut State<B>, queue: QueueId, class: Class) -> bool {
        if st.arena.range_of(queue, class).is_some() {
            return true;
        }
        if st.ranges_refused {
            return false;
        }
        let page = self.page_size(class);
        let size = self.info.memory_capacity.next_multiple_of(page);
        match self.backend.reserve(size, page) {
            Ok(raw) => {
                st.arena.add_range(queue, class, raw, size, page);
                true
            }
            Err(_) => {
                st.ranges_refused = true;
                false
            }
        }
    }

    /// The page size of growable segments of `class`: a multiple of the
    /// backend's granularity.
    pub(super) fn page_size(&self, class: Class) -> u64 {
        let want = match class {
            Class::Small => SMALL_PAGE,
            Class::Large => LARGE_PAGE,
        };
        let granularity = self.backend.page_granularity().unwrap_or(GRANULE).max(1);
        want.next_multiple_of(granularity)
    }

    /// Grows `queue`'s pool of `class` for a block of `block` bytes and
    /// carves it: maps the pages under it in the pool's growable segment,
    /// or allocates a fixed segment. Makes room under the limits first
    /// (trimming to the GC limit, then the memory limit), then waits
    /// (boundedly) for in-flight work, and finally fails. Segments to give
    /// back after the lock go to `segments` (given back at once when the
    /// device needs the room).
    fn grow(
        &self,
        st: &mut StateGuard<'_, B>,
        queue: QueueId,
        class: Class,
        block: u64,
        requested: u64,
        segments: &mut Vec<B::Buffer>,
    ) -> Result<Carved<B::Buffer>> {
        let deadline = Instant::now() + self.config.pressure_timeout;
        let mut device_refused = false;
        loop {
            // The plan: the pages under a carve of the growable segment, or
            // (none, or no room left in its range) a new fixed segment.
            let plan = if self.growable && self.ensure_range(st, queue, class) {
                st.arena.carve(queue, class, block)
            } else {
                None
            };
            // What growing adds to the reserved bytes: the carve marked its
            // pages mapped (counted already); a fixed segment is not yet.
            let planned: u64 = plan
                .as_ref()
                .map_or(0, |c| c.maps.iter().map(|(a, b)| b - a).sum());
            let mut need = if plan.is_some() {
                0
            } else {
                self.segment_size(class, block, st.limits.memory)
            };
            // Make room: to the GC limit (and the memory limit), or all of
            // it if the device refused.
            let limit = st.limits.gc.min(st.limits.memory);
            let over = if device_refused {
                u64::MAX
            } else {
                (st.reserved() + need).saturating_sub(limit)
            };
            if over > 0 && st.arena.totals().releasable > 0 {
                let trimmed = st.arena.trim(over);
                let (more, _) = self.apply_trims(st, trimmed);
                segments.extend(more);
            }
            // Near the memory limit, a fixed segment of the block alone
            // rather than one the pool could share, or than pages of the
            // growable segment (larger than the block).
            let mut plan = plan;
            let without = st.reserved() - planned;
            if st.reserved() + need > st.limits.memory && without + block <= st.limits.memory {
                if let Some(c) = plan.take() {
                    self.undo_carve(st, c);
                }
                need = block;
            }
            if st.reserved() + need <= st.limits.memory {
                let made = match plan {
                    Some(c) => match self.map_carved(&c) {
                        Ok(()) => {
                            st.note_growth(c.maps.len() as u64);
                            for &(a, b) in &c.maps {
                                let addr = self.address_of(&c.raw, a);
                                self.record(st, MemoryAction::SegmentMap, addr, b - a, queue);
                            }
                            return Ok(c);
                        }
                        Err(e) => {
                            self.undo_carve(st, c);
                            Err(e)
                        }
                    },
                    None => {
                        // Driver calls are slow: the segment is allocated
                        // without the state lock, its bytes claimed first so
                        // that no other allocation counts on them (reserved
                        // bytes never pass the limit), and memory trimmed on
                        // the way given back before asking for more.
                        st.claimed += need;
                        let made = MutexGuard::unlocked(st, || {
                            self.release_segments(std::mem::take(segments));
                            BackendTime::timed(&self.backend_time.allocate, || {
                                self.backend.allocate(need)
                            })
                        });
                        st.claimed -= need;
                        match made {
                            Ok(raw) => {
                                let addr = self.address_of(&raw, 0);
                                self.record(st, MemoryAction::SegmentAlloc, addr, need, queue);
                                st.arena.add_segment(queue, class, raw, need);
                                st.note_growth(1);
                                return Ok(st
                                    .arena
                                    .carve(queue, class, block)
                                    .expect("a new segment holds its block"));
                            }
                            Err(e) => Err(e),
                        }
                    }
                };
                match made {
                    Err(DeviceError::OutOfMemory) => {
                        st.stats.device_alloc_failures += 1;
                        if !device_refused || st.arena.totals().releasable > 0 {
                            device_refused = true;
                            continue;
                        }
                    }
                    Err(e) => {
                        st.stats.device_alloc_failures += 1;
                        return Err(e.into());
                    }
                    Ok(()) => unreachable!("a success returns above"),
                }
            } else if let Some(c) = plan {
                self.undo_carve(st, c);
            }
            // Nothing left to trim: wait for the oldest in-flight work,
            // counting what other threads freed in flight meanwhile (their
            // slots gather it), then try a plain carve again.
            self.drain_fronts(st);
            let now = Instant::now();
            match self.oldest_in_flight(st) {
                Some(stamp) if now < deadline => {
                    st.stats.waits += 1;
                    let waited = MutexGuard::unlocked(st, || {
                        let q = self.queues.get(stamp.queue);
                        self.ensure_submitted(q, stamp.value);
                        let r = self.backend.wait(&q.raw, stamp.value, deadline - now);
                        self.refresh_all();
                        self.drain_retained();
                        r
                    });
                    waited?;
                    let (more, _) = self.promote(st);
                    segments.extend(more);
                    if let Some(c) = self.carve_cached(st, queue, class, block) {
                        return Ok(c);
                    }
                }
                _ => {
                    st.stats.oom_errors += 1;
                    self.record(st, MemoryAction::Oom, 0, requested, queue);
                    let reason = if device_refused {
                        "the device refused the allocation"
                    } else {
                        "the memory limit would be passed"
                    };
                    return Err(Error::OutOfMemory {
                        requested,
                        reason,
                        limit: st.limits.memory,
                        stats: Box::new(self.snapshot(st)),
                    });
                }
            }
        }
    }

    /// Maps the pages a carve needs; on a failure unmaps what it mapped.
    fn map_carved(&self, c: &Carved<B::Buffer>) -> std::result::Result<(), DeviceError> {
        BackendTime::timed(&self.backend_time.allocate, || {
            for (i, &(a, b)) in c.maps.iter().enumerate() {
                if let Err(e) = self.backend.map(&c.raw, a, b - a) {
                    for &(x, y) in &c.maps[..i] {
                        // SAFETY: (1) mapped just now by this call; (2) no
                        // submission has seen it: the block was never handed
                        // out.
                        unsafe { self.backend.unmap(&c.raw, x, y - x) };
                    }
                    return Err(e);
                }
            }
            Ok(())
        })
    }

    /// Puts a carve back as it was (its pages unmarked, its node free).
    fn undo_carve(&self, st: &mut State<B>, c: Carved<B::Buffer>) {
        st.arena.unmark_mapped(c.node, &c.maps);
        st.arena.release(c.node, c.stamp);
    }

    /// The oldest in-flight work that, once complete, frees memory: on the
    /// pending list, in the arena, or (under `Retained`) held by a
    /// submission.
    fn oldest_in_flight(&self, st: &State<B>) -> Option<Stamp> {
        let arena = self.queues.iter().filter_map(|q| {
            st.arena
                .oldest_due(q.id)
                .map(|value| Stamp { queue: q.id, value })
        });
        st.pending
            .oldest()
            .into_iter()
            .chain(arena)
            .chain(self.oldest_retained())
            .min_by_key(|s| s.value)
    }

    /// Another block for a buffer being rebound on queue `on` (rule S2): a
    /// carve from `on`'s pool on mapped memory, with its reuse fence.
    pub(super) fn take_cached(
        &self,
        st: &mut State<B>,
        on: QueueId,
        block: u64,
    ) -> Option<(Block<B::Buffer>, u64)> {
        let c = self.carve_cached(st, on, Class::of(block), block)?;
        Some(self.block_of(c, on))
    }
}
