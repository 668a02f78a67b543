//! The last handle: ready blocks are released, pending ones once their work
//! completes (waiting boundedly), and anything still in use is leaked,
//! never released in flight (I1).

use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::cache::Block;

use super::Shared;

impl<B: Backend> Shared<B> {
    /// Teardown wait: how long dropping the allocator waits for in-flight work
    /// before leaking (never releasing) what is still in use.
    pub(super) fn teardown_timeout(&self) -> Duration {
        self.config.pressure_timeout
    }
}

impl<B: Backend> Drop for Shared<B> {
    fn drop(&mut self) {
        // No handle is left, so no buffer is live and no command buffer holds
        // references. Ready blocks are idle; pending ones wait for their work.
        let mut blocks: Vec<Block<B::Buffer>> = Vec::new();
        let (idle, deferred) = self.fronts.drain_exclusive();
        for shell in idle {
            // SAFETY: S1: an idle shell in a slot is the allocator's.
            blocks.push(unsafe { shell.unfill() });
        }
        let st = self.state.get_mut();
        while let Some(b) = st.ready.pop_oldest() {
            blocks.push(b);
        }
        let mut pending = st.pending.take_all();
        for shell in deferred {
            // SAFETY: S1: a deferred shell in a slot is the allocator's.
            pending.push(unsafe { shell.unfill() });
        }
        self.flush_markers();
        let deadline = Instant::now() + self.teardown_timeout();
        let mut leaked = 0usize;
        for b in pending {
            let idle = b.stamps.iter().all(|s| {
                let q = self.queues.get(s.queue);
                let left = deadline.saturating_duration_since(Instant::now());
                q.watermark.get() >= s.value
                    || matches!(self.backend.wait(&q.raw, s.value, left), Ok(true))
                    || self.backend.completed(&q.raw).is_ok_and(|c| c >= s.value)
            });
            if idle {
                blocks.push(b);
            } else {
                // Never release memory that work may still use (I1): leak it.
                leaked += 1;
                std::mem::forget(b.raw);
            }
        }
        for b in blocks {
            // SAFETY: (1) allocated by this backend. (2) Ready blocks are idle;
            // pending ones were kept only if every stamp was seen completed.
            // Under `Immediate`, the caller accepted releasing in flight.
            unsafe { self.backend.release(b.raw) };
        }
        if leaked > 0 {
            eprintln!(
                "inflight: {leaked} block(s) still in use by unfinished GPU work at teardown were leaked, not released"
            );
        }
    }
}
