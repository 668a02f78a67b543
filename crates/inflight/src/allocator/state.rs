//! The state behind the allocator's lock: the ready and pending lists, the
//! limits in force, the counters, and spare buffer shells; and statistics
//! snapshots, which add the front caches' figures to the state's.

use crate::backend::Backend;
use crate::buffer::Shell;
use crate::cache::{Block, ReadyList};
use crate::config::Limits;
use crate::front::SlotTotals;
use crate::pending::PendingList;
use crate::stats::Stats;
use crate::sync::Ordering;

use super::Shared;

/// The allocator's mutable state, behind `Shared::state`.
pub(super) struct State<B: Backend> {
    pub(super) ready: ReadyList<B::Buffer>,
    pub(super) pending: PendingList<B::Buffer>,
    pub(super) limits: Limits,
    /// What the ready list may hold: the cache limit less the front caches'
    /// share (so that both together stay under the cache limit, I4).
    pub(super) ready_cap: u64,
    /// Counters; the ready and pending figures are filled in at snapshot.
    /// Here `active_*` count every block handed out of this state: live
    /// buffers and the front caches' idle blocks; the snapshot moves the
    /// latter to `ready_*`. `frees` and front-cache hits are counted in
    /// the slots.
    pub(super) stats: Stats,
    pub(super) next_block_id: u64,
    /// The highest `held()` figure ever reached (`Config::hold_peak`).
    pub(super) high_water: u64,
    /// Empty buffer shells, recycled so that a cache hit allocates nothing.
    pub(super) spares: Vec<Shell<B>>,
}

/// Spare shells kept; more are freed.
const MAX_SPARES: usize = 4096;

impl<B: Backend> State<B> {
    /// Bytes the allocator holds or has handed out.
    pub(super) fn reserved(&self) -> u64 {
        self.stats.reserved_bytes
    }

    /// Reserved bytes less those on the pending list (`Config::hold_peak`).
    pub(super) fn held(&self) -> u64 {
        self.stats.reserved_bytes - self.pending.bytes()
    }

    /// This state's figures, without the front caches (see `Shared::snapshot`).
    pub(super) fn snapshot(&self) -> Stats {
        let mut s = self.stats;
        s.ready_bytes = self.ready.bytes();
        s.ready_count = self.ready.len() as u64;
        s.pending_bytes = self.pending.bytes();
        s.pending_count = self.pending.len() as u64;
        s
    }

    /// Takes blocks off the ready list, oldest first, until ready bytes are
    /// at most `target`, and accounts them as released.
    pub(super) fn trim_ready_to(&mut self, target: u64, out: &mut Vec<Block<B::Buffer>>) {
        while self.ready.bytes() > target {
            let Some(b) = self.ready.pop_oldest() else {
                break;
            };
            self.account_release(&b);
            out.push(b);
        }
    }

    /// Takes blocks off the ready list, oldest first, by as many bytes as
    /// `used + size` is over `limit` (all of them if that is more), and
    /// accounts them as released. Returns whether it took any.
    pub(super) fn trim_ready_over(
        &mut self,
        used: u64,
        size: u64,
        limit: u64,
        out: &mut Vec<Block<B::Buffer>>,
    ) -> bool {
        let over = (used + size).saturating_sub(limit);
        if over == 0 {
            return false;
        }
        let before = out.len();
        let target = self.ready.bytes().saturating_sub(over);
        self.trim_ready_to(target, out);
        out.len() > before
    }

    /// Parks an emptied shell as a spare, or in `spare` when there are
    /// enough (the caller drops those after the lock).
    #[inline]
    pub(super) fn park(&mut self, shell: Shell<B>, spare: &mut Vec<Shell<B>>) {
        if self.spares.len() < MAX_SPARES {
            self.spares.push(shell);
        } else {
            spare.push(shell);
        }
    }

    pub(super) fn account_release(&mut self, b: &Block<B::Buffer>) {
        self.stats.reserved_bytes -= b.size;
        self.stats.device_releases += 1;
        self.stats.trims += 1;
    }

    pub(super) fn account_alloc(&mut self, size: u64) {
        self.stats.reserved_bytes += size;
        self.stats.peak_reserved_bytes = self
            .stats
            .peak_reserved_bytes
            .max(self.stats.reserved_bytes);
        self.high_water = self.high_water.max(self.held());
        self.stats.device_allocations += 1;
    }
}

impl<B: Backend> Shared<B> {
    /// A statistics snapshot: the state's figures with the slots' added.
    pub(super) fn snapshot(&self, st: &State<B>) -> Stats {
        self.snapshot_with(st, &self.fronts.totals(|_| {}))
    }

    /// The state's figures with the slots' `t` added: their idle blocks as
    /// ready, their deferred ones as pending, their counters summed.
    pub(super) fn snapshot_with(&self, st: &State<B>, t: &SlotTotals) -> Stats {
        let mut s = st.snapshot();
        s.ready_bytes += t.idle_bytes;
        s.ready_count += t.idle_count;
        s.pending_bytes += t.deferred_bytes;
        s.pending_count += t.deferred_count;
        s.deferred_frees += t.deferred_count;
        let bytes = t.idle_bytes + t.deferred_bytes;
        let count = t.idle_count + t.deferred_count;
        s.active_bytes = s.active_bytes.saturating_sub(bytes);
        s.active_count = s.active_count.saturating_sub(count);
        s.frees += t.frees;
        s.allocations += t.hits;
        s.cache_hits += t.hits;
        // A shell reused in order from a slot was a deferred free too.
        s.in_order_hits += t.in_order_hits;
        s.deferred_frees += t.in_order_hits;
        s.reuse_device_waits = self.reuse_device_waits.load(Ordering::Relaxed);
        s.reuse_host_waits = self.reuse_host_waits.load(Ordering::Relaxed);
        (
            s.device_allocation_ns,
            s.device_release_ns,
            s.completion_query_ns,
        ) = self.backend_time.load();
        s
    }
}
