//! The state behind the allocator's lock: the arena (segments and their
//! free blocks), the pending list, the limits in force, the counters, and
//! spare buffer shells; and statistics snapshots, which add the front
//! caches' figures to the state's.

use crate::arena::{Arena, Totals};
use crate::backend::Backend;
use crate::buffer::Shell;
use crate::config::Limits;
use crate::front::SlotTotals;
use crate::pending::PendingList;
use crate::stats::Stats;
use crate::sync::Ordering;

use super::history::History;
use super::Shared;

/// The allocator's mutable state, behind `Shared::state`.
pub(super) struct State<B: Backend> {
    /// Segments, their blocks, and the free ones by pool.
    pub(super) arena: Arena<B::Buffer>,
    /// Blocks freed while a queue other than their pool's (or, where reuse
    /// in order does not apply, any queue) may still use them.
    pub(super) pending: PendingList<B::Buffer>,
    pub(super) limits: Limits,
    /// The releasable bytes the arena may hold: the cache limit less the
    /// front caches' share (so that both together stay under it, I4).
    pub(super) ready_cap: u64,
    /// Bytes being allocated from the device with the lock let go: reserved
    /// already, so that no other allocation counts on them.
    pub(super) claimed: u64,
    /// Counters; the byte figures are filled in at snapshot. Here
    /// `active_*` count every block out of the arena but on the pending
    /// list: live buffers and the front caches' blocks; the snapshot moves
    /// the latter to `ready_*` and `pending_*`. `frees` and front-cache hits
    /// are counted in the slots.
    pub(super) stats: Stats,
    /// Empty buffer shells, recycled so that a cache hit allocates nothing.
    pub(super) spares: Vec<Shell<B>>,
    /// The memory history, while it is recorded.
    pub(super) history: Option<History>,
    /// Set by `clear_cache` while memory it could not give back was in
    /// flight: promotion gives back everything releasable until nothing is
    /// in flight any more.
    pub(super) release_pending: bool,
    /// The backend refused an address range for a growable segment: growth
    /// makes fixed segments from then on, without asking at every growth.
    pub(super) ranges_refused: bool,
}

/// Spare shells kept; more are freed.
const MAX_SPARES: usize = 4096;

impl<B: Backend> State<B> {
    /// A new state under `limits`.
    pub(super) fn new(limits: Limits, ready_cap: u64) -> Self {
        State {
            arena: Arena::default(),
            pending: PendingList::default(),
            limits,
            ready_cap,
            claimed: 0,
            stats: Stats::default(),
            spares: Vec::new(),
            history: None,
            release_pending: false,
            ranges_refused: false,
        }
    }

    /// Bytes held from the device, or being allocated from it.
    pub(super) fn reserved(&self) -> u64 {
        self.arena.totals().reserved + self.claimed
    }

    /// Counts new device memory: peaks, and device allocations made.
    pub(super) fn note_growth(&mut self, calls: u64) {
        self.stats.device_allocations += calls;
        let t = self.arena.totals();
        self.stats.peak_reserved_bytes = self.stats.peak_reserved_bytes.max(t.reserved);
        self.stats.peak_segments = self.stats.peak_segments.max(t.segments);
    }

    /// Counts device memory given back by trimming.
    pub(super) fn note_trimmed(&mut self, calls: u64) {
        self.stats.device_releases += calls;
        self.stats.trims += calls;
    }

    /// This state's figures, without the front caches (see `Shared::snapshot`).
    pub(super) fn snapshot(&self) -> Stats {
        let mut s = self.stats;
        let t: Totals = self.arena.totals();
        s.reserved_bytes = t.reserved;
        s.ready_bytes = t.ready;
        s.ready_count = t.ready_count;
        s.releasable_bytes = t.releasable;
        s.pending_bytes = self.pending.bytes() + t.pending;
        s.pending_count = self.pending.len() as u64 + t.pending_count;
        s.segments = t.segments;
        s.splits = t.splits;
        s.merges = t.merges;
        s.pages_mapped = t.maps;
        s.pages_unmapped = t.unmaps;
        s
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
        s.releasable_bytes += t.idle_bytes;
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
