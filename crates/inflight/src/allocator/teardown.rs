//! The last handle: every segment is given back once the work that used it
//! completed (waiting boundedly), and a segment still in use is leaked,
//! never released in flight (I1).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::block::Block;
use crate::timeline::{QueueId, Stamp};

use super::Shared;

impl<B: Backend> Shared<B> {
    /// Teardown wait: how long dropping the allocator waits for in-flight work
    /// before leaking (never releasing) what is still in use.
    pub(super) fn teardown_timeout(&self) -> Duration {
        self.config.pressure_timeout
    }

    /// Waits (until `deadline`) for stamp `s`; returns whether it completed.
    fn wait_for(&self, s: Stamp, deadline: Instant) -> bool {
        let q = self.queues.get(s.queue);
        let left = deadline.saturating_duration_since(Instant::now());
        q.watermark.get() >= s.value
            || matches!(self.backend.wait(&q.raw, s.value, left), Ok(true))
            || self.backend.completed(&q.raw).is_ok_and(|c| c >= s.value)
    }
}

impl<B: Backend> Drop for Shared<B> {
    fn drop(&mut self) {
        // No handle is left, so no buffer is live and no command buffer holds
        // references. The front caches' idle blocks go back to the arena;
        // blocks in flight wait for their work.
        self.flush_markers();
        let deadline = Instant::now() + self.teardown_timeout();
        let (idle, deferred) = self.fronts.drain_exclusive();
        let mut in_flight: Vec<Block<B::Buffer>> = Vec::new();
        for shell in deferred {
            // SAFETY: S1: a deferred shell in a slot is the allocator's.
            in_flight.push(unsafe { shell.unfill() });
        }
        let mut st = self.state.lock();
        for shell in idle {
            // SAFETY: S1: an idle shell in a slot is the allocator's.
            let block = unsafe { shell.unfill() };
            st.arena.release(block.node, 0);
        }
        in_flight.extend(st.pending.take_all());
        // Blocks whose work does not complete keep a reference to their
        // segment, so it cannot be given back below.
        let mut kept: Vec<Arc<B::Buffer>> = Vec::new();
        for b in in_flight {
            if b.stamps.iter().all(|&s| self.wait_for(s, deadline)) {
                st.arena.release(b.node, 0);
            } else {
                kept.push(b.raw.clone());
            }
        }
        // Free blocks in flight on their pool's queue: the whole queue's
        // segments stay if that work does not complete.
        let mut unfinished: HashSet<QueueId> = HashSet::new();
        for q in self.queues.iter() {
            if let Some(value) = st.arena.latest_due(q.id) {
                if !self.wait_for(Stamp { queue: q.id, value }, deadline) {
                    unfinished.insert(q.id);
                }
            }
        }
        let mut leaked = 0usize;
        for (raw, queue, runs) in st.arena.take_segments() {
            let raw = match Arc::try_unwrap(raw) {
                Ok(raw) if !unfinished.contains(&queue) => raw,
                other => {
                    // Never release memory that work may still use (I1).
                    leaked += 1;
                    std::mem::forget(other);
                    continue;
                }
            };
            for (a, b) in runs.unwrap_or_default() {
                // SAFETY: (1) a growable segment of this backend and a run
                // the arena mapped; (2) every block on it was given back and
                // its work completed (or its queue's segments are leaked
                // above). Under `Immediate`, the caller accepted releasing in
                // flight.
                unsafe { self.backend.unmap(&raw, a, b - a) };
            }
            // SAFETY: (1) allocated or reserved by this backend, nothing
            // mapped in it any more; (2) as above.
            unsafe { self.backend.release(raw) };
        }
        std::mem::forget(kept);
        if leaked > 0 {
            eprintln!(
                "inflight: {leaked} segment(s) still in use by unfinished GPU work at teardown were leaked, not released"
            );
        }
    }
}
