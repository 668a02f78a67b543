//! Configuration: size rounding, best-fit slack, and the three limits.
//!
//! The limits follow MLX's allocator, with defaults derived from the device's
//! reported capacity:
//!
//! - **memory limit** (default 95% of capacity): reserved bytes never pass it;
//!   past it an allocation trims, waits for in-flight work, then fails.
//! - **GC limit** (default 95% of the memory limit): when active + cached +
//!   request would pass it, ready blocks are trimmed before allocating.
//! - **cache limit** (default the memory limit): ready bytes are trimmed to it
//!   after every allocation and free. Pending bytes may exceed it: they may not
//!   be released yet (I4).
//!
//! Limits must satisfy `0 < gc_limit <= memory_limit <= capacity` and
//! `cache_limit <= memory_limit`; anything else is [`Error::InvalidConfig`].

use std::time::Duration;

use crate::error::{Error, Result};
use crate::policy::Policy;

/// The front caches' page: 16 KiB, Apple silicon's page, as MLX uses.
pub const DEFAULT_PAGE_SIZE: u64 = 16 * 1024;
/// The front caches' size classes of at most one page are multiples of this.
pub const DEFAULT_SMALL_ALIGN: u64 = 256;
/// Size classes per doubling above one page (see [`Config::size_classes`]).
pub const DEFAULT_SIZE_CLASSES: u64 = 4;
/// How long an allocation under memory pressure may wait for in-flight work.
pub const DEFAULT_PRESSURE_TIMEOUT: Duration = Duration::from_secs(10);

/// Allocator settings. `None` limits take their default from the device.
///
/// Build one from [`Config::default`] with the `with_*` methods (or set its
/// public fields); the struct is `#[non_exhaustive]`, so settings can be
/// added without breaking callers. The switches that exist to measure one
/// mechanism against its absence (front caches, the in-order rule,
/// rebinding, who waits on a reused block) are set only with the
/// `experimental` feature.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// The release policy.
    pub policy: Policy,
    /// Reserved bytes never pass this (default 95% of device capacity).
    pub memory_limit: Option<u64>,
    /// Releasable free bytes (whole free segments and pages, front caches
    /// included) are trimmed to this (default: the memory limit).
    pub cache_limit: Option<u64>,
    /// Trim before growing when reserved bytes plus the growth would pass
    /// this (default: 95% of the memory limit).
    pub gc_limit: Option<u64>,
    /// The longest an allocation waits for in-flight work before failing.
    pub pressure_timeout: Duration,
    /// Scrubbing, for multi-tenant servers: a recycled buffer reads as zeros
    /// to its new owner. The first command buffer that binds it records a
    /// fill of zeros over the whole buffer before the operation that binds
    /// it, so the fill is ordered on the new owner's queue before its first
    /// use (and, like any first use, after the previous owner's work). No
    /// extra submission, nothing on the host; a buffer never bound is never
    /// filled. Fresh device memory is not scrubbed: its contents are the
    /// driver's (zeroed on the simulated GPU). Off by default.
    pub scrub: bool,
    /// Whether pools grow by mapping pages into one growable segment each
    /// (an address range reserved once), where the backend can (CUDA's
    /// virtual memory management, the simulated GPU), rather than by
    /// allocating fixed segments (on by default). Free pages in the middle
    /// of a range can be given back, so fragmentation costs address space,
    /// not memory.
    pub growable: bool,
    /// Size classes per doubling for the front caches: a front cache serves
    /// a request with an idle block of at least its size and at most its
    /// class's: a multiple of `max(unit, 2^k / size_classes)`, where `2^k`
    /// is the largest power of two not above the request and `unit` is
    /// [`DEFAULT_PAGE_SIZE`] above one page, else [`DEFAULT_SMALL_ALIGN`]
    /// (at most a quarter more, at the default 4). A power of two from 1 to
    /// 1024; 0 rounds to whole pages only.
    pub(crate) size_classes: u64,
    /// Per-thread front caches (on by default): each thread keeps a few idle
    /// small blocks it freed (never bound since they were last idle, or
    /// every recorded use complete when freed), so a free followed by an
    /// allocation of the same size class on one thread takes no shared
    /// lock. Together they hold at most an eighth of the cache limit, and
    /// a thread's cache takes its share from the arena's only when the
    /// thread first frees an idle block small enough for it; growth,
    /// trimming, clearing, limit changes and memory pressure empty them.
    /// Under `Deferred` with in-order reuse, a thread also takes back, in
    /// order, blocks it freed in flight (see `in_order_reuse`). With them
    /// on, `Stats::peak_active_bytes` may exceed the true peak by at most
    /// the bytes they held at that moment; off, it is exact.
    pub(crate) front_cache: bool,
    /// Whether a thread enters its own front-cache slot as the owner of a
    /// biased lock (on by default): with no atomic read-modify-write, while
    /// other threads (trims, clears, statistics, memory pressure, the last
    /// `Allocator` drop) revoke it with `membarrier(2)`, a barrier that
    /// interrupts every CPU running the process. Off, or where the kernel
    /// does not offer the barrier (anything but Linux, old kernels,
    /// sandboxes that filter it), each slot is a spin lock: an uncontended
    /// atomic pair per allocation and per free, and no interrupts.
    pub(crate) biased_front_cache: bool,
    /// The in-order rule (on by default, `Deferred` only): on a queue whose
    /// backend orders memory, a block still in flight on that queue alone
    /// may go to a new buffer for that queue, its new work queued behind the
    /// old. Less memory; but a buffer so reused and then bound on another
    /// queue must wait for the previous owner's work (see `reuse_wait`).
    /// Off, such a block waits until its work completes.
    pub(crate) in_order_reuse: bool,
    /// Who waits when a buffer reused in order is bound on another queue
    /// before the previous owner's work is done (adaptive by default).
    pub(crate) reuse_wait: ReuseWait,
    /// Whether such a buffer, if nothing has seen its block yet (see
    /// [`crate::Buffer::block_id`]), is first given another block of its
    /// size, so that nobody waits (on by default): a ready one, or one
    /// whose only use in flight is on the queue it is being bound on
    /// (reused in order there). Its reused block goes back to its pool, for
    /// its own queue to reuse again. Only when neither fits does
    /// `reuse_wait` decide.
    pub(crate) rebind_unseen: bool,
}

impl Config {
    /// The same settings with another policy.
    pub fn with_policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// The same settings with a memory limit of `bytes`.
    pub fn with_memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// The same settings with a cache limit of `bytes`.
    pub fn with_cache_limit(mut self, bytes: u64) -> Self {
        self.cache_limit = Some(bytes);
        self
    }

    /// The same settings with a GC limit of `bytes`.
    pub fn with_gc_limit(mut self, bytes: u64) -> Self {
        self.gc_limit = Some(bytes);
        self
    }

    /// The same settings with another pressure timeout.
    pub fn with_pressure_timeout(mut self, timeout: Duration) -> Self {
        self.pressure_timeout = timeout;
        self
    }

    /// The same settings with scrubbing on or off (see [`Config::scrub`]).
    pub fn with_scrub(mut self, on: bool) -> Self {
        self.scrub = on;
        self
    }

    /// The same settings with growable segments on or off (see
    /// [`Config::growable`]).
    pub fn with_growable(mut self, on: bool) -> Self {
        self.growable = on;
        self
    }

    /// Whether `n` may be a size-class count: 0, or a power of two from 1
    /// to 1024.
    pub fn valid_size_classes(n: u64) -> bool {
        n == 0 || (n.is_power_of_two() && n <= 1024)
    }

    /// Whether per-thread front caches are on.
    pub fn front_cache(&self) -> bool {
        self.front_cache
    }

    /// Whether blocks in flight on one in-order queue go to new work for it.
    pub fn in_order_reuse(&self) -> bool {
        self.in_order_reuse
    }

    /// Who waits when a block reused in order is bound on another queue.
    pub fn reuse_wait(&self) -> ReuseWait {
        self.reuse_wait
    }

    /// Whether such a buffer, if unseen, takes another block instead.
    pub fn rebind_unseen(&self) -> bool {
        self.rebind_unseen
    }

    /// The front caches' size classes per doubling.
    pub fn size_classes(&self) -> u64 {
        self.size_classes
    }
}

/// The switches that measure one mechanism against its absence, and the
/// front caches' size classes: for experiments and their tests.
#[cfg(feature = "experimental")]
impl Config {
    /// Per-thread front caches on or off (on by default).
    pub fn with_front_cache(mut self, on: bool) -> Self {
        self.front_cache = on;
        self
    }

    /// Biased front-cache locks on or off (on by default; off, each slot
    /// is a spin lock).
    pub fn with_biased_front_cache(mut self, on: bool) -> Self {
        self.biased_front_cache = on;
        self
    }

    /// The in-order rule on or off (on by default).
    pub fn with_in_order_reuse(mut self, on: bool) -> Self {
        self.in_order_reuse = on;
        self
    }

    /// Who waits when a block reused in order is bound on another queue
    /// (adaptive by default).
    pub fn with_reuse_wait(mut self, wait: ReuseWait) -> Self {
        self.reuse_wait = wait;
        self
    }

    /// Rebinding unseen buffers on or off (on by default).
    pub fn with_rebind_unseen(mut self, on: bool) -> Self {
        self.rebind_unseen = on;
        self
    }

    /// The front caches' size classes per doubling (see
    /// [`Config::valid_size_classes`]; 4 by default).
    pub fn with_size_classes(mut self, n: u64) -> Self {
        self.size_classes = n;
        self
    }
}

/// Who waits when a buffer reused in order on one queue is bound on another
/// before the previous owner's work there completes (I2), and cannot take
/// another block instead (see `Config::rebind_unseen`). The early reuse
/// was the allocator's choice; the question is who pays for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReuseWait {
    /// The binding thread waits on the host until the other queue has at
    /// least as many submissions queued ahead of this one as the first
    /// queue has left before the previous owner's use, then the other
    /// queue waits for the rest on the device (where the backend can; else
    /// the host waits for all of it). So the other queue will most likely
    /// not stall, and the thread waits no longer than that takes. The
    /// default.
    #[default]
    Adaptive,
    /// The binding thread, on the host, until the previous owner's work is
    /// done, at most the pressure timeout (`Error::ReuseWaitTimedOut` after
    /// it). No queue is made to wait for another.
    Host,
    /// The other queue, on the device, at once, where the backend can (a
    /// CUDA event wait; a wait operation on the simulated GPU); else the
    /// host. The binding thread goes on, but the queue, and every
    /// submission behind this one on it (other threads' too), stalls until
    /// the first queue catches up. Suits one thread driving several queues.
    /// In `repro` on the simulated GPU (4 threads sharing 2 queues) device
    /// waits left the queues stalled on each other more than adaptive ones
    /// did (docs/BENCHMARKS.md, *Reuse waits*).
    Device,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: Policy::DEFERRED,
            memory_limit: None,
            cache_limit: None,
            gc_limit: None,
            pressure_timeout: DEFAULT_PRESSURE_TIMEOUT,
            scrub: false,
            growable: true,
            size_classes: DEFAULT_SIZE_CLASSES,
            front_cache: true,
            biased_front_cache: true,
            in_order_reuse: true,
            reuse_wait: ReuseWait::Adaptive,
            rebind_unseen: true,
        }
    }
}

/// The limits in force, resolved and validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Reserved bytes never pass this.
    pub memory: u64,
    /// Ready bytes are trimmed to this.
    pub cache: u64,
    /// Trim before allocating past this.
    pub gc: u64,
}

impl Limits {
    /// Resolves `None`s against `capacity` and checks the result.
    pub(crate) fn resolve(config: &Config, capacity: u64) -> Result<Limits> {
        let memory = config.memory_limit.unwrap_or(capacity / 20 * 19);
        let limits = Limits {
            memory,
            cache: config.cache_limit.unwrap_or(memory),
            gc: config.gc_limit.unwrap_or(memory / 20 * 19),
        };
        limits.validate(capacity)?;
        Ok(limits)
    }

    /// Checks `0 < gc <= memory <= capacity` and `cache <= memory`.
    pub(crate) fn validate(&self, capacity: u64) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidConfig(msg));
        if self.memory == 0 {
            return bad("the memory limit must be above 0".into());
        }
        if self.memory > capacity {
            return bad(format!(
                "the memory limit ({} B) is above the device's capacity ({capacity} B)",
                self.memory
            ));
        }
        if self.gc == 0 || self.gc > self.memory {
            return bad(format!(
                "the GC limit ({} B) must be above 0 and at most the memory limit ({} B)",
                self.gc, self.memory
            ));
        }
        if self.cache > self.memory {
            return bad(format!(
                "the cache limit ({} B) is above the memory limit ({} B)",
                self.cache, self.memory
            ));
        }
        Ok(())
    }
}

/// Checks the sizing fields of a configuration.
pub(crate) fn validate_sizing(config: &Config) -> Result<()> {
    let bad = |msg: &str| Err(Error::InvalidConfig(msg.to_string()));
    if !Config::valid_size_classes(config.size_classes) {
        return bad("size_classes must be 0 or a power of two from 1 to 1024");
    }
    if config.pressure_timeout > Duration::from_secs(24 * 3600) {
        return bad("pressure_timeout must be at most a day");
    }
    Ok(())
}

/// Rounds a request up to its block size: a multiple of the larger of its
/// unit (the page above one page, else `small_align`) and its size class's
/// step (`2^k / classes`, see [`Config::size_classes`]; no step when
/// `classes` is 0). `None` on overflow.
#[inline]
pub(crate) fn round_size(size: u64, page: u64, small_align: u64, classes: u64) -> Option<u64> {
    let unit = if size <= page { small_align } else { page };
    let align = if classes == 0 {
        unit
    } else {
        // `classes` is a power of two (validated): a shift, not a division.
        let octave = 1u64 << (63 - size.leading_zeros());
        (octave >> classes.trailing_zeros()).max(unit)
    };
    size.checked_add(align - 1).map(|s| s & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_follows_pages_and_alignment() {
        for classes in [0, 4] {
            assert_eq!(round_size(1, 16384, 256, classes), Some(256));
            assert_eq!(round_size(256, 16384, 256, classes), Some(256));
            assert_eq!(round_size(16384, 16384, 256, classes), Some(16384));
            assert_eq!(round_size(16385, 16384, 256, classes), Some(32768));
            assert_eq!(round_size(u64::MAX, 16384, 256, classes), None);
        }
        // Pages only: 1 MiB + 1 takes one more page.
        assert_eq!(
            round_size((1 << 20) + 1, 16384, 256, 0),
            Some((1 << 20) + 16384)
        );
        // Four classes per doubling: 1 MiB + 1 rounds to 1.25 MiB, 4 KiB + 1
        // to 5 KiB, and a request is at most a quarter (or a unit) under
        // its block.
        assert_eq!(round_size(4097, 16384, 256, 4), Some(5 << 10));
        assert_eq!(round_size(4097, 16384, 256, 0), Some(4352));
        assert_eq!(round_size((1 << 20) + 1, 16384, 256, 4), Some(5 << 18));
        assert_eq!(round_size(3 << 20, 16384, 256, 4), Some(3 << 20));
        for size in (16385u64..(1 << 40)).step_by(999_999_937) {
            let r = round_size(size, 16384, 256, 4).unwrap();
            let waste = r - size;
            assert!(
                r >= size && (waste * 4 <= size || waste < 16384),
                "{size} -> {r}"
            );
            assert_eq!(r % 16384, 0);
        }
    }

    #[test]
    fn contradictory_limits_are_refused() {
        let cap = 1 << 30;
        let ok = Limits {
            memory: cap,
            cache: cap,
            gc: cap,
        };
        assert!(ok.validate(cap).is_ok());
        assert!(Limits { memory: 0, ..ok }.validate(cap).is_err());
        assert!(Limits {
            memory: cap + 1,
            ..ok
        }
        .validate(cap)
        .is_err());
        assert!(Limits { gc: 0, ..ok }.validate(cap).is_err());
        assert!(Limits {
            memory: cap / 2,
            ..ok
        }
        .validate(cap)
        .is_err());
        assert!(Limits {
            cache: cap + 1,
            ..ok
        }
        .validate(cap)
        .is_err());
    }
}
