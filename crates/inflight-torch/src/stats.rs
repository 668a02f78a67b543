//! The statistics one device's allocator gives through the C ABI: a
//! `#[repr(C)]` struct of 64-bit counters, filled by `inflight_torch_stats`.
//!
//! PyTorch raises "not supported" from `torch.cuda.memory_stats` once a
//! pluggable allocator is in place, so the plug-in offers its own; the
//! Python package maps these fields onto the names `memory_stats` users
//! know (`allocated_bytes.all.current`, `reserved_bytes.all.peak`, ...).
//!
//! Byte figures are of inflight's blocks (requests rounded up to their size
//! class), as PyTorch's are of its rounded blocks. The struct only grows at
//! its end: a caller passes the size it knows, and gets that many bytes.

use inflight::Stats;

/// One device's statistics (see the module doc). Field order is the ABI.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InflightTorchStats {
    /// Bytes in live allocations (PyTorch's `allocated_bytes.all.current`).
    pub allocated_bytes: u64,
    /// The highest `allocated_bytes` since the start or the last peak reset.
    pub peak_allocated_bytes: u64,
    /// Bytes held from the device: live + cached (`reserved_bytes.all.current`).
    pub reserved_bytes: u64,
    /// The highest `reserved_bytes` since the start or the last peak reset.
    pub peak_reserved_bytes: u64,
    /// Cached bytes ready for reuse.
    pub cached_ready_bytes: u64,
    /// Cached bytes whose last use (on some stream) has not completed yet.
    pub cached_pending_bytes: u64,
    /// Live allocations.
    pub active_count: u64,
    /// Allocations made (cache hits + device allocations).
    pub allocations: u64,
    /// Allocations freed.
    pub frees: u64,
    /// Allocations served from the cache.
    pub cache_hits: u64,
    /// Raw allocations made on the device (`num_device_alloc`).
    pub device_allocations: u64,
    /// Raw allocations given back to the device (`num_device_free`).
    pub device_releases: u64,
    /// Raw allocations the device refused, each retried after trimming and
    /// waiting (`num_alloc_retries`).
    pub device_alloc_failures: u64,
    /// Allocations that failed for want of memory (`num_ooms`).
    pub oom_errors: u64,
    /// Frees whose block waited for in-flight work before reuse elsewhere.
    pub deferred_frees: u64,
    /// Times an allocation waited for in-flight work under memory pressure.
    pub waits: u64,
    /// Streams adopted (one inflight queue each).
    pub streams: u64,
}

impl InflightTorchStats {
    /// The figures of one allocator, with its stream count.
    pub(crate) fn from_stats(s: &Stats, streams: u64) -> Self {
        InflightTorchStats {
            allocated_bytes: s.active_bytes,
            peak_allocated_bytes: s.peak_active_bytes,
            reserved_bytes: s.reserved_bytes,
            peak_reserved_bytes: s.peak_reserved_bytes,
            cached_ready_bytes: s.ready_bytes,
            cached_pending_bytes: s.pending_bytes,
            active_count: s.active_count,
            allocations: s.allocations,
            frees: s.frees,
            cache_hits: s.cache_hits,
            device_allocations: s.device_allocations,
            device_releases: s.device_releases,
            device_alloc_failures: s.device_alloc_failures,
            oom_errors: s.oom_errors,
            deferred_frees: s.deferred_frees,
            waits: s.waits,
            streams,
        }
    }
}
