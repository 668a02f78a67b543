//! Binding a block reused in order on one queue to work on another before
//! its previous owner's work there completed (I2): another block if nobody
//! has seen this one yet (rule S2), else a wait on the device or the host
//! ([`crate::ReuseWait`]).

use std::time::Instant;

use crate::backend::Backend;
use crate::block::Block;
use crate::buffer::unpack_fence;
use crate::config::ReuseWait;
use crate::error::{Error, Result};
use crate::history::MemoryAction;
use crate::sync::{lock_spinning, Ordering};
use crate::timeline::{QueueId, Stamp};
use crate::Buffer;

use super::Shared;

impl<B: Backend> Shared<B> {
    /// Before `buf` is bound to work recorded in `cmds` for queue `on`: if
    /// the block was reused ahead of its previous owner's work on another
    /// queue, orders the new work after that work: on the device where the
    /// backend can ([`Backend::wait_on_device`]), else by waiting on the host
    /// (bounded by the pressure timeout). Work on the buffer's own queue is
    /// ordered behind it already (the in-order reuse rule).
    pub(crate) fn order_reuse(
        &self,
        buf: &Buffer<B>,
        on: QueueId,
        cmds: &mut B::Commands,
        waited: &mut Vec<Stamp>,
    ) -> Result<()> {
        let Some(Stamp { queue: home, value }) =
            unpack_fence(buf.inner.reuse_fence.load(Ordering::Acquire))
        else {
            return Ok(());
        };
        if on == home {
            return Ok(());
        }
        let q = self.queues.get(home);
        // A value fixed at a stream-ordered free may be a marker still owed.
        self.ensure_submitted(q, value);
        if q.watermark.get() >= value || self.refresh(q) >= value {
            buf.inner.reuse_fence.store(0, Ordering::Release);
            return Ok(());
        }
        if waited.iter().any(|s| s.queue == home && s.value >= value) {
            return Ok(()); // this submission already waits for it
        }
        if self.config.rebind_unseen && self.rebind(buf, on) {
            return Ok(()); // nobody waits: the buffer has another block now
        }
        let deadline = Instant::now() + self.config.pressure_timeout;
        if self.config.reuse_wait != ReuseWait::Host {
            // Hand the rest to the device once the other queue has at least
            // as many submissions queued ahead of this one as `home` has
            // left before `value` (at once under `Device`): then it will
            // most likely not stall. Until then the host waits.
            let other = self.queues.get(on);
            let mut host_waited = false;
            loop {
                let done = self.refresh(q);
                if done >= value {
                    if host_waited {
                        self.reuse_host_waits.fetch_add(1, Ordering::Relaxed);
                    }
                    buf.inner.reuse_fence.store(0, Ordering::Release);
                    return Ok(());
                }
                let ahead = match self.config.reuse_wait {
                    ReuseWait::Device => u64::MAX,
                    _ => other
                        .submitted
                        .load(Ordering::Acquire)
                        .saturating_sub(self.refresh(other)),
                };
                if value - done <= ahead {
                    if self.backend.wait_on_device(cmds, &q.raw, value)? {
                        if host_waited {
                            self.reuse_host_waits.fetch_add(1, Ordering::Relaxed);
                        }
                        self.reuse_device_waits.fetch_add(1, Ordering::Relaxed);
                        waited.push(Stamp { queue: home, value });
                        return Ok(());
                    }
                    break; // no device-side waits here: the host waits for all
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::ReuseWaitTimedOut { queue: home, value });
                }
                host_waited = true;
                self.backend.wait(&q.raw, value - ahead, deadline - now)?;
            }
        }
        self.reuse_host_waits.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let done = self
            .backend
            .wait(&q.raw, value, deadline.saturating_duration_since(now))?;
        if !done && self.refresh(q) < value {
            return Err(Error::ReuseWaitTimedOut { queue: home, value });
        }
        buf.inner.reuse_fence.store(0, Ordering::Release);
        Ok(())
    }

    /// Gives `buf`, reused in order ahead of its previous owner's work and
    /// now bound on queue `on`, another block of its size, if nothing has
    /// seen its block yet (rule S2): a ready one, or one in flight on `on`
    /// alone (reused in order there, fenced for other queues). Its reused
    /// block goes back to the pending list, still due at that work, where
    /// its queue may reuse it in order again. Returns whether it did.
    #[inline(never)]
    pub(super) fn rebind(&self, buf: &Buffer<B>, on: QueueId) -> bool {
        let Some((block, _)) = self.rounded(buf.len()) else {
            return false;
        };
        let Some(held) = buf.inner.try_rebind() else {
            return false; // seen already: its block stays
        };
        // SAFETY: S2: this thread moved `pin` to REBINDING, so it alone
        // reaches `held` until it pins or unpins it below.
        let held = unsafe { &mut *held };
        let mut st = lock_spinning(&self.state);
        // The caller refreshed the watermark of the queue that matters.
        let Some((fresh, fence)) = self.take_cached(&mut st, on, block) else {
            drop(st);
            buf.inner.unpin_after_rebinding();
            return false;
        };
        let raw = held.raw.as_mut().expect("a live buffer has its raw buffer");
        let mut stamps = buf.inner.stamps.lock();
        // Uses to be fixed at the free are the buffer's, not the block's:
        // they move to the new block with it.
        let mine = stamps.take_uses_at_free();
        let mut fresh_stamps = fresh.stamps;
        for s in mine.iter() {
            fresh_stamps.record(s.queue, s.value);
        }
        let fresh = Block {
            stamps: fresh_stamps,
            ..fresh
        };
        let reused = Block {
            raw: std::mem::replace(raw, fresh.raw),
            offset: std::mem::replace(&mut held.offset, fresh.offset),
            node: std::mem::replace(&mut held.node, fresh.node),
            size: std::mem::replace(&mut held.size, fresh.size),
            id: std::mem::replace(&mut held.id, fresh.id),
            stamps: std::mem::replace(&mut *stamps, fresh.stamps),
        };
        drop(stamps);
        st.stats.active_bytes = st.stats.active_bytes + held.size - reused.size;
        st.stats.peak_active_bytes = st.stats.peak_active_bytes.max(st.stats.active_bytes);
        st.stats.reuse_rebinds += 1;
        if st.history.is_some() {
            // In the history, the old block is freed and the new one
            // allocated, so that a snapshot's blocks add up.
            let old = (self.address_of(&reused.raw, reused.offset), reused.size);
            let old_queue = st.arena.queue_of(reused.node);
            let new = (self.address_of(raw, held.offset), held.size);
            self.record(
                &mut st,
                MemoryAction::FreeRequested,
                old.0,
                old.1,
                old_queue,
            );
            self.record(&mut st, MemoryAction::Alloc, new.0, new.1, on);
            if self.file_block(&mut st, reused) {
                self.record(
                    &mut st,
                    MemoryAction::FreeCompleted,
                    old.0,
                    old.1,
                    old_queue,
                );
            }
        } else {
            self.file_block(&mut st, reused);
        }
        drop(st);
        buf.inner.reuse_fence.store(fence, Ordering::Release);
        if self.config.scrub {
            // A recycled block: zeroed at its first binding, this one.
            buf.inner.needs_scrub.store(true, Ordering::Relaxed);
        }
        buf.inner.pin_after_rebinding();
        true
    }
}
