//! Statistics: what the allocator holds and what it has done.
//!
//! Byte figures are of blocks (requests rounded up to 512 bytes, or a
//! front cache's block a little larger). At every quiet point (no call in
//! progress) they add up (invariant I3):
//!
//! ```text
//! reserved_bytes = active_bytes + ready_bytes + pending_bytes
//! allocations - frees = active_count
//! ```
//!
//! Reserved bytes are the device memory held: fixed segments whole, and the
//! mapped pages of growable ones. Ready bytes are free memory on them whose
//! every recorded use completed; only the part of it in whole free
//! segments or whole free pages can be given back (`releasable_bytes`), the
//! rest lies between live blocks.

use serde::Serialize;

/// A snapshot of the allocator's statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Bytes in buffers that a handle (or, under `Retained`, a command buffer) holds.
    pub active_bytes: u64,
    /// The highest `active_bytes` since creation or [`reset_peak`](crate::Allocator::reset_peak).
    pub peak_active_bytes: u64,
    /// Free bytes ready for reuse: every recorded use has completed.
    pub ready_bytes: u64,
    /// Of the ready bytes, those trimming could give back now (whole free
    /// segments, whole free pages of growable ones, front caches' blocks):
    /// what the cache limit bounds.
    pub releasable_bytes: u64,
    /// Cached bytes whose last recorded use has not completed yet.
    pub pending_bytes: u64,
    /// Bytes held from the device: active + ready + pending.
    pub reserved_bytes: u64,
    /// The highest `reserved_bytes` since creation or reset.
    pub peak_reserved_bytes: u64,
    /// Buffers live.
    pub active_count: u64,
    /// Free blocks ready (each maximal: free neighbours merge).
    pub ready_count: u64,
    /// Freed blocks whose work is in flight.
    pub pending_count: u64,
    /// Segments held: device allocations, and growable ranges.
    pub segments: u64,
    /// The highest `segments` since creation or reset.
    pub peak_segments: u64,
    /// Blocks split off a larger free block.
    pub splits: u64,
    /// Free blocks merged with a free neighbour.
    pub merges: u64,
    /// Page runs mapped into growable segments (each a device allocation).
    pub pages_mapped: u64,
    /// Page runs unmapped from growable segments (each a device release).
    pub pages_unmapped: u64,
    /// Successful allocations (cache hits + misses).
    pub allocations: u64,
    /// Buffers freed (last handle dropped).
    pub frees: u64,
    /// Allocations served from the cache.
    pub cache_hits: u64,
    /// Of the hits, those that took a pending block on an in-order queue.
    pub in_order_hits: u64,
    /// Allocations that went to the device.
    pub cache_misses: u64,
    /// Device allocations: fixed segments created, and page runs mapped.
    pub device_allocations: u64,
    /// Device releases: fixed segments given back, and page runs unmapped.
    pub device_releases: u64,
    /// Raw allocations the device refused (each is retried after trimming
    /// and waiting, or ends in an error).
    pub device_alloc_failures: u64,
    /// Frees that went to the pending list because work was still in flight.
    pub deferred_frees: u64,
    /// Times an allocation waited for in-flight work under memory pressure.
    pub waits: u64,
    /// Segments and page runs given back by trimming (cache limit, GC
    /// limit, pressure, clear).
    pub trims: u64,
    /// Out-of-memory errors returned.
    pub oom_errors: u64,
    /// Blocks reused in order on one queue and then bound on another, whose
    /// new work the device was told to order after the previous owner's.
    pub reuse_device_waits: u64,
    /// Such binds for which the host waited (under
    /// [`crate::ReuseWait::Adaptive`], one that waited on the host and then
    /// left the rest to the device counts in both).
    pub reuse_host_waits: u64,
    /// Such binds that instead gave the buffer another block, ready or in
    /// order on the binding queue (nothing had seen its block yet, see
    /// [`crate::Config::rebind_unseen`]): nobody waited.
    pub reuse_rebinds: u64,
    /// Host time in the backend's device allocations, summed over threads
    /// (nanoseconds).
    pub device_allocation_ns: u64,
    /// Host time in the backend's device releases, summed over threads.
    pub device_release_ns: u64,
    /// Host time asking the backend how far queues got (`completed`),
    /// summed over threads.
    pub completion_query_ns: u64,
}

impl Stats {
    /// Whether the byte and count identities of invariant I3 hold.
    pub fn balanced(&self) -> bool {
        self.reserved_bytes == self.active_bytes + self.ready_bytes + self.pending_bytes
            && self.allocations - self.frees == self.active_count
            && self.releasable_bytes <= self.ready_bytes
    }

    /// Cache hits over allocations, 0 when nothing was allocated.
    pub fn hit_rate(&self) -> f64 {
        if self.allocations == 0 {
            0.0
        } else {
            self.cache_hits as f64 / self.allocations as f64
        }
    }
}
