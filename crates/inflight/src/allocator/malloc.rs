//! Allocation: the fast path through the calling thread's front cache, the
//! state lock's path (best fit, promotion, in-order reuse), and memory
//! pressure (trimming to the limits, waiting for in-flight work, failing
//! with [`Error::OutOfMemory`]).

use std::sync::Arc;
use std::time::Instant;

use crate::backend::{Backend, DeviceError};
use crate::buffer::{pack_fence, BufferInner};
use crate::cache::Block;
use crate::config::{fit_bound, round_size};
use crate::error::{Error, Result};
use crate::front::{Deferred, Home};
use crate::policy::PolicyKind;
use crate::sync::{lock_spinning, MutexGuard, Ordering};
use crate::timeline::{QueueId, Stamp, Stamps, AT_FREE};
use crate::Buffer;

use super::queues::QueueShared;
use super::state::State;
use super::{BackendTime, Shared, StateGuard};

impl<B: Backend> Shared<B> {
    /// The fast path: an idle block of the rounded size in this thread's
    /// slot, under the slot's lock alone. Everything else is out of line, so
    /// that this stays a few dozen instructions.
    #[inline]
    pub(super) fn malloc(
        self: &Arc<Self>,
        size: u64,
        queue: &Arc<QueueShared<B>>,
    ) -> Result<Buffer<B>> {
        queue.check_fault()?;
        let Some(rounded) = self.rounded(size) else {
            return Err(self.size_error(size));
        };
        if self.config.policy.kind() == PolicyKind::Retained {
            self.drain_retained();
        }
        let home = self.fronts.me();
        let mut slot = self.fronts.enter(home);
        slot.add_live(self);
        // An idle block of this size; else, under in-order reuse, a
        // deferred one in flight on this queue alone (fenced for others).
        let in_order = self.slot_in_order && queue.orders_memory;
        let taken = match slot.take(rounded) {
            Some(shell) => Some((shell, 0)),
            None if in_order => slot.take_in_order(rounded, queue.id).map(|(shell, value)| {
                let fence = Stamp {
                    queue: queue.id,
                    value,
                };
                (shell, pack_fence(fence))
            }),
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
        // Else the slot's deferred shells go on the pending list under the
        // state lock the miss takes anyway, where promotion and in-order
        // reuse see them. A slot that reuses them in order itself keeps
        // those still in flight; the rest are idle now and go to the ready
        // list, within the cache limit (I4), not kept here beyond it.
        let deferred = if in_order {
            slot.take_completed(|stamps| self.first_incomplete_cached(stamps).is_none())
        } else {
            slot.take_deferred()
        };
        let kept = slot.has_deferred();
        drop(slot);
        self.malloc_miss(size, rounded, queue, home, (deferred, kept))
    }

    /// The block size for a request of `size` bytes (its size class), or
    /// `None` if `size` is 0 or too large.
    #[inline]
    pub(super) fn rounded(&self, size: u64) -> Option<u64> {
        let max = self.info.max_buffer_size;
        if size == 0 || size > max {
            return None;
        }
        let c = &self.config;
        round_size(size, c.page_size, c.small_align, c.size_classes)
            .map(|r| r.min(max & !3))
            .filter(|&r| r >= size)
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
        rounded: u64,
        queue: &Arc<QueueShared<B>>,
        home: Home,
        deferred: (Deferred<B>, bool),
    ) -> Result<Buffer<B>> {
        let r = self.malloc_locked(size, rounded, queue, home.slot(), deferred);
        if r.is_err() {
            // Not counted after all (K1); `self` is an `Arc` the caller
            // holds, so the slot's reference is never the last.
            let keep = self.fronts.enter(home).remove_live(self.fronts.closing());
            drop(keep);
        }
        r
    }

    /// The allocation path under the state lock: promotion, best fit, the
    /// in-order rule, the device. The buffer is already counted by `home`;
    /// `deferred.0` is filed first, and `deferred.1` says whether the slot
    /// kept shells in flight (their completion is learnt like the pending
    /// list's, for the slot's next miss to file them).
    pub(super) fn malloc_locked(
        self: &Arc<Self>,
        size: u64,
        rounded: u64,
        queue: &Arc<QueueShared<B>>,
        home: u32,
        (deferred, kept): (Deferred<B>, bool),
    ) -> Result<Buffer<B>> {
        let policy = self.config.policy.kind();
        let mut st = lock_spinning(&self.state);
        let mut spare = Vec::new();
        self.file_deferred(&mut st, deferred, &mut spare);
        // Promotion only when the ready list has nothing that fits: by the
        // cached watermarks first; then, on a queue that orders memory, a
        // pending block whose only stamp is on it; then after asking the
        // backend how far the queues got. (Promoting at every allocation was
        // measured: completed blocks then meet the cache limit sooner, and on
        // CUDA the hit rate fell from 72% to 70% and deferred's rate with it;
        // H100 run 16, docs/BENCHMARKS.md.) The backend is asked without the
        // state lock: on CUDA a query can wait behind other threads' driver
        // calls, and no other allocation or free need wait with it. In-order
        // reuse comes before that question because it needs no answer: the
        // queue runs the new work after the old whether or not the old is
        // done, and the lock is not let go and taken again. (With the
        // question first, deferred ran at 0.87-0.89 of retained's rate on the
        // 16-core simulator; with it after, 0.95-0.96; H100 host, run 36.)
        let bound = fit_bound(rounded, &self.config);
        let mut release = Vec::new();
        let in_order =
            (policy == PolicyKind::Deferred && queue.orders_memory && self.config.in_order_reuse)
                .then_some(queue.id);
        let (mut hit, fence) = self
            .take_cached(&mut st, rounded, bound, in_order, &mut release)
            .map_or((None, 0), |(block, fence)| (Some(block), fence));
        if fence != 0 {
            st.stats.in_order_hits += 1;
        }
        if hit.is_none() && (kept || !st.pending.is_empty()) {
            MutexGuard::unlocked(&mut st, || {
                self.flush_markers();
                self.refresh_all();
            });
            release.extend(self.promote(&mut st));
            hit = st.ready.take_best_fit(rounded, bound);
        }
        // Filing may have put the ready list over its share of the cache
        // limit, and promotion trims only when it runs: trim now, so that a
        // device allocation never counts a cache over its limit (I4 holds at
        // the peak, not only after it).
        if st.ready.bytes() > st.ready_cap {
            let ready_cap = st.ready_cap;
            st.trim_ready_to(ready_cap, &mut release);
        }
        let recycled = hit.is_some();
        let block = match hit {
            Some(b) => {
                st.stats.cache_hits += 1;
                b
            }
            None => match self.allocate_device(st, size, rounded, &mut release) {
                Ok((guard, block)) => {
                    st = guard;
                    st.stats.cache_misses += 1;
                    block
                }
                Err(e) => {
                    // Blocks trimmed on the way are accounted as released:
                    // release them, or they are lost (I3).
                    self.release_blocks(release);
                    return Err(e);
                }
            },
        };
        st.stats.allocations += 1;
        st.stats.active_bytes += block.size;
        st.stats.active_count += 1;
        st.stats.peak_active_bytes = st.stats.peak_active_bytes.max(st.stats.active_bytes);
        let shell = st.spares.pop();
        drop(st);
        drop(spare); // after the lock
        if !release.is_empty() {
            self.release_blocks(release);
        }
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

    /// The miss path: makes room under the limits, then asks the device.
    /// Blocks to release are collected in `release` (released here too when
    /// the device needs the room at once).
    pub(super) fn allocate_device<'a>(
        &'a self,
        mut st: StateGuard<'a, B>,
        requested: u64,
        size: u64,
        release: &mut Vec<Block<B::Buffer>>,
    ) -> Result<(StateGuard<'a, B>, Block<B::Buffer>)> {
        let deadline = Instant::now() + self.config.pressure_timeout;
        let mut device_refused = false;
        let mut fronts_drained = false;
        loop {
            // Under pressure the front caches' idle blocks join the ready
            // list first, so that trimming reaches them.
            if !fronts_drained
                && (device_refused || st.reserved() + size > st.limits.gc.min(st.limits.memory))
            {
                self.drain_fronts(&mut st);
                fronts_drained = true;
            }
            // Hold the peak: release ready blocks, oldest first, rather
            // than let the bytes held (all but pending ones) pass their
            // high-water mark (`Config::hold_peak`).
            if self.config.hold_peak {
                let (held, mark) = (st.held(), st.high_water);
                if st.trim_ready_over(held, size, mark, release) {
                    st.stats.peak_holds += 1;
                }
            }
            // GC limit: trim ready blocks while used + request would pass it.
            let (used, gc) = (st.reserved(), st.limits.gc);
            st.trim_ready_over(used, size, gc, release);
            // Memory limit, or the device said no: trim harder.
            if device_refused {
                st.trim_ready_to(0, release);
            } else {
                let (used, memory) = (st.reserved(), st.limits.memory);
                st.trim_ready_over(used, size, memory, release);
            }
            let fits = st.reserved() + size <= st.limits.memory;
            if fits {
                // Driver calls are slow: the release and the allocation are
                // made without the state lock, the bytes claimed first, so
                // that no other allocation counts on the room trimming made
                // (nor on the bytes being allocated) while the lock is let
                // go: reserved bytes never pass the limits or the peak held
                // (a snapshot taken meanwhile sees them reserved).
                st.stats.reserved_bytes += size;
                if device_refused || !release.is_empty() {
                    // Give memory back before asking for more.
                    MutexGuard::unlocked(&mut st, || self.release_blocks(std::mem::take(release)));
                }
                let made = MutexGuard::unlocked(&mut st, || {
                    BackendTime::timed(&self.backend_time.allocate, || self.backend.allocate(size))
                });
                st.stats.reserved_bytes -= size;
                match made {
                    Ok(raw) => {
                        st.account_alloc(size);
                        let id = st.next_block_id;
                        st.next_block_id += 1;
                        let block = Block {
                            raw,
                            offset: 0,
                            size,
                            id,
                            stamps: Stamps::default(),
                            release_when_idle: false,
                        };
                        return Ok((st, block));
                    }
                    Err(DeviceError::OutOfMemory) => {
                        st.stats.device_alloc_failures += 1;
                        device_refused = true;
                    }
                    Err(e) => {
                        st.stats.device_alloc_failures += 1;
                        return Err(e.into());
                    }
                }
                if !st.ready.is_empty() || !fronts_drained {
                    continue;
                }
            }
            // Nothing left to trim: wait for the oldest in-flight work,
            // counting what other threads freed in flight since the first
            // drain (their slots gather it).
            self.drain_fronts(&mut st);
            let now = Instant::now();
            let target = st.pending.oldest().or_else(|| self.oldest_retained());
            match target {
                Some(stamp) if now < deadline => {
                    st.stats.waits += 1;
                    let waited = MutexGuard::unlocked(&mut st, || {
                        let q = self.queues.get(stamp.queue);
                        self.ensure_submitted(q, stamp.value);
                        let r = self.backend.wait(&q.raw, stamp.value, deadline - now);
                        self.refresh_all();
                        self.drain_retained();
                        r
                    });
                    if let Err(e) = waited {
                        return Err(e.into());
                    }
                    let more = self.promote(&mut st);
                    release.extend(more);
                }
                _ => {
                    st.stats.oom_errors += 1;
                    let reason = if device_refused {
                        "the device refused the allocation"
                    } else {
                        "the memory limit would be passed"
                    };
                    let limit = st.limits.memory;
                    let stats = Box::new(self.snapshot(&st));
                    drop(st);
                    self.release_blocks(std::mem::take(release));
                    return Err(Error::OutOfMemory {
                        requested,
                        reason,
                        limit,
                        stats,
                    });
                }
            }
        }
    }

    /// A cached block of `rounded` bytes (below `bound`), asking the backend
    /// nothing: best fit from the ready list; else the same after promoting
    /// by the cached watermarks (blocks that trims go to `release`); else,
    /// on `in_order`'s queue, a pending block whose only use in flight is
    /// there. Returns it with its reuse fence (packed; 0 for none).
    pub(super) fn take_cached(
        &self,
        st: &mut State<B>,
        rounded: u64,
        bound: u64,
        in_order: Option<QueueId>,
        release: &mut Vec<Block<B::Buffer>>,
    ) -> Option<(Block<B::Buffer>, u64)> {
        if let Some(b) = st.ready.take_best_fit(rounded, bound) {
            return Some((b, 0));
        }
        if !st.pending.is_empty() {
            release.extend(self.promote(st));
            if let Some(b) = st.ready.take_best_fit(rounded, bound) {
                return Some((b, 0));
            }
        }
        let b = st.pending.take_in_order(in_order?, rounded, bound)?;
        let fence = b.stamps.single().map_or(0, pack_fence);
        Some((b, fence))
    }
}
