//! The allocator: the [`Allocator`] handle, its public calls, and the shared
//! state every handle points to.
//!
//! The files of this folder follow the data flow: `queues.rs` (queues,
//! their timelines and faults), `malloc.rs` (the fast path, the state
//! lock's path, memory pressure), `reuse.rs` (binding a block reused in
//! order on another queue), `free.rs` (free, filing, promotion, release),
//! `state.rs` (the state behind the lock, and statistics), `teardown.rs`
//! (the last handle).
//!
//! One [`Allocator`] owns a backend, its queues, the per-thread front caches
//! (`front.rs`), the arena (segments and their free blocks, `arena/`)
//! and the pending list (`pending.rs`). The arena and the pending list sit
//! behind one mutex, the state lock. Slow backend calls (allocating a
//! fixed segment, releasing one, completion queries, waits) are made with
//! it let go; mapping and unmapping pages of a growable segment are made
//! under it, since a carve may map the same pages the moment it goes.
//!
//! # Paths
//!
//! - **free** (the last handle of a buffer is dropped): never bound, or
//!   every stamp passed by the cached watermarks → the freeing thread's
//!   front cache (no state lock), its older half going to the arena when it
//!   is full; else gathered in that front cache as deferred, then filed
//!   (`file_block`) in the arena (complete, or in flight on its pool's
//!   in-order queue alone) or on the pending list, 16 at a time or at the
//!   thread's next miss. Then the buffer's home slot uncounts it, last
//!   (K1). Releasable bytes are trimmed to their share of the cache limit,
//!   oldest first. (Under `Immediate`, a block that was ever bound skips
//!   the front cache and goes to the arena, its stamps ignored: that is
//!   the defect.)
//! - **malloc**: an idle block of the request's size class from the
//!   calling thread's front cache (small requests only), or under in-order
//!   reuse a deferred one in flight on the same queue alone, with no shared
//!   lock. Else, under the state lock: file the slot's deferred shells;
//!   carve from the queue's pool in the arena (best fit, maybe a block in
//!   flight on that queue, reused in order); else drain every front cache,
//!   ask the backend how far the queues got (the lock let go), promote and
//!   carve again; else grow (pages of the pool's growable segment, or a
//!   fixed segment), trimming to the GC and memory limits first, then wait
//!   (boundedly) for the oldest in-flight work, and finally fail with
//!   [`Error::OutOfMemory`].
//! - **bind** on another queue of a buffer reused in order ahead of its
//!   previous owner's work (`order_reuse`): nothing, if that work has
//!   completed; else, if nothing has seen the buffer's block (rule S2 in
//!   `buffer.rs`), another block under the state lock: a complete one, or
//!   one in flight on the binding queue alone; else a wait, on the host or
//!   on the device ([`crate::ReuseWait`]).
//!
//! # Lock order
//!
//! `State` (allocator) → front-cache slots (in index order) → `SubmitState`
//! (queue) → stamps (buffer). Dropping a buffer enters a slot and may take
//! `State`, so nothing may drop a buffer handle while holding a queue's
//! submit lock, a slot or the state lock: handles are collected and dropped
//! after those locks are released.

mod free;
mod history;
mod malloc;
mod queues;
mod reuse;
mod state;
mod teardown;

use std::sync::Arc;
use std::time::Instant;

use crossbeam_utils::CachePadded;

use crate::backend::{Backend, DeviceInfo};
use crate::config::{validate_sizing, Config, Limits};
use crate::error::{Error, Result};
use crate::front::Fronts;
use crate::policy::PolicyKind;
use crate::stats::Stats;
use crate::sync::{AtomicU64, AtomicUsize, Mutex, MutexGuard, Ordering};
use crate::timeline::QueueId;
use crate::{Buffer, Queue};

pub(crate) use self::queues::{QueueRegistry, QueueShared};
use self::state::State;

/// The most queues one allocator supports.
pub const MAX_QUEUES: usize = 64;

// A process-wide counter: std's atomic even under loom (a `static`).
static NEXT_ALLOCATOR_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A GPU buffer caching allocator over backend `B`. Cheap to clone: clones
/// share one cache.
///
/// # Drop order
///
/// Every handle ([`Buffer`], [`Queue`], [`crate::CommandBuffer`],
/// [`crate::Ticket`]) keeps the allocator's shared state alive, so they may
/// be dropped in any order, and a command buffer may still be committed
/// after the last `Allocator` is gone. When the last handle goes, ready
/// blocks are released and pending ones are released once their work
/// completes, waiting up to [`Config::pressure_timeout`]; memory whose work
/// has not completed by then (or whose device was lost) is leaked, never
/// released in flight (I1), and a line says so on stderr.
pub struct Allocator<B: Backend> {
    pub(crate) shared: Arc<Shared<B>>,
}

impl<B: Backend> Clone for Allocator<B> {
    fn clone(&self) -> Self {
        self.shared
            .allocator_handles
            .fetch_add(1, Ordering::Relaxed);
        Allocator {
            shared: self.shared.clone(),
        }
    }
}

impl<B: Backend> Drop for Allocator<B> {
    /// Under `Retained`, the last `Allocator` handle waits (up to
    /// [`Config::pressure_timeout`]) for the submissions that still hold
    /// references and lets them go. Those references point back at the
    /// allocator through their buffers, so without this a program that drops
    /// everything while such work is in flight would keep the allocator and
    /// its device memory alive for good.
    fn drop(&mut self) {
        let s = &self.shared;
        if s.allocator_handles.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        // No allocation can follow: slots with no live buffer let their
        // references go (the others at their last free). `self.shared`
        // outlives these, so none of them is the last.
        drop(s.fronts.close());
        if s.config.policy.kind() != PolicyKind::Retained {
            return;
        }
        let deadline = Instant::now() + s.config.pressure_timeout;
        for q in s.queues.iter() {
            let last = q.submit.lock().retained.back().map(|(v, _)| *v);
            if let Some(value) = last {
                let left = deadline.saturating_duration_since(Instant::now());
                let _ = s.backend.wait(&q.raw, value, left);
            }
        }
        s.drain_retained();
    }
}

/// What every handle of one allocator points to.
pub(crate) struct Shared<B: Backend> {
    pub(crate) id: u64,
    pub(crate) config: Config,
    pub(crate) info: DeviceInfo,
    /// On cache lines of its own: the fast path reads the fields around it
    /// while other threads write the state under the lock.
    state: CachePadded<Mutex<State<B>>>,
    /// The per-thread front caches, and the references that keep this
    /// state alive while buffers are (K1).
    pub(crate) fronts: Fronts<B>,
    /// `Deferred` with in-order reuse and front caches: a slot's deferred
    /// shells may go to new buffers on their queue (see `front.rs`).
    slot_in_order: bool,
    /// Pools grow by mapping pages into a growable segment
    /// (`Config::growable` and a backend that has them).
    growable: bool,
    /// Memory history is being recorded (`Allocator::record_history`): the
    /// fast paths step aside so that every allocation and free is seen.
    history_on: crate::sync::AtomicBool,
    /// When the allocator was made: the zero of history's timestamps.
    born: Instant,
    pub(crate) queues: QueueRegistry<B>,
    /// Cross-queue binds of in-order reused blocks ordered on the device.
    reuse_device_waits: AtomicU64,
    /// ... and those the host had to wait for.
    reuse_host_waits: AtomicU64,
    /// Host time in backend calls (see `Stats::device_allocation_ns` and
    /// the two after it): only the slow calls are timed.
    backend_time: BackendTime,
    /// Live `Allocator` handles (the last one drains `Retained` references).
    allocator_handles: AtomicUsize,
    // Declared last: dropped after the queues and blocks that need it.
    pub(crate) backend: B,
}

/// The state lock, held.
type StateGuard<'a, B> = MutexGuard<'a, State<B>>;

/// Nanoseconds spent in the backend's slow calls, summed over threads.
/// Statistics only, ordering nothing: std's atomics even under loom, so that
/// they add no scheduling points to the models.
#[derive(Default)]
pub(super) struct BackendTime {
    allocate: std::sync::atomic::AtomicU64,
    release: std::sync::atomic::AtomicU64,
    completed: std::sync::atomic::AtomicU64,
}

impl BackendTime {
    /// Runs `f`, adding its duration to `counter`.
    #[inline]
    pub(super) fn timed<R>(counter: &std::sync::atomic::AtomicU64, f: impl FnOnce() -> R) -> R {
        let t = Instant::now();
        let r = f();
        let ns = t.elapsed().as_nanos() as u64;
        counter.fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
        r
    }

    /// The three sums.
    fn load(&self) -> (u64, u64, u64) {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        (
            get(&self.allocate),
            get(&self.release),
            get(&self.completed),
        )
    }
}

impl<B: Backend> Allocator<B> {
    /// Creates an allocator over `backend`. Limits left `None` in `config`
    /// take their defaults from the device's capacity (see [`Config`]).
    pub fn new(backend: B, config: Config) -> Result<Self> {
        validate_sizing(&config)?;
        let info = backend.info();
        if info.max_buffer_size < 4 {
            return Err(Error::InvalidConfig(format!(
                "device {} reports a largest buffer of {} bytes",
                info.name, info.max_buffer_size
            )));
        }
        let limits = Limits::resolve(&config, info.memory_capacity)?;
        let fronts = Fronts::new(config.front_cache, config.biased_front_cache, limits.cache);
        let ready_cap = limits.cache - fronts.reserve();
        let slot_in_order = config.policy.kind() == PolicyKind::Deferred
            && config.in_order_reuse
            && config.front_cache;
        let growable = config.growable && backend.page_granularity().is_some();
        Ok(Allocator {
            shared: Arc::new(Shared {
                id: NEXT_ALLOCATOR_ID.fetch_add(1, Ordering::Relaxed),
                config,
                info,
                state: CachePadded::new(Mutex::new(State::new(limits, ready_cap))),
                fronts,
                slot_in_order,
                growable,
                history_on: crate::sync::AtomicBool::new(false),
                born: Instant::now(),
                queues: QueueRegistry::new(),
                reuse_device_waits: AtomicU64::new(0),
                reuse_host_waits: AtomicU64::new(0),
                backend_time: BackendTime::default(),
                allocator_handles: AtomicUsize::new(1),
                backend,
            }),
        })
    }

    /// Creates a queue: an in-order stream with its own timeline.
    pub fn create_queue(&self) -> Result<Queue<B>> {
        let s = &self.shared;
        let _grow = s.queues.grow.lock();
        let id = s.queues.len.load(Ordering::Acquire);
        if id >= MAX_QUEUES {
            return Err(Error::TooManyQueues(MAX_QUEUES));
        }
        let raw = s.backend.create_queue()?;
        self.register_queue(id, raw, false)
    }

    /// Adopts a queue the program owns and records its own work on (on
    /// CUDA, a stream from `backend::cuda::CudaGpu::adopt_stream`):
    /// a *stream-ordered* queue, as `cuMemAllocAsync`'s streams are.
    ///
    /// A buffer allocated for it is taken to be used on its stream from its
    /// allocation to its free, by work the allocator does not see. Its free
    /// (the last handle dropped) is stream-ordered: the allocator fixes the
    /// use as the queue's next submission, so the block may go to the next
    /// allocation for this queue at once (the stream runs that work after
    /// the old), and to another queue, or back to the device, only once
    /// that submission completes. If no commit comes first, the allocator
    /// makes it an empty submission of its own (a marker: a CUDA event
    /// recorded on the stream) when it needs the block. Uses on other
    /// queues are declared with [`Buffer::record_stream`]. Command buffers
    /// may be committed to it too.
    pub fn adopt_queue(&self, raw: B::Queue) -> Result<Queue<B>> {
        let s = &self.shared;
        let _grow = s.queues.grow.lock();
        let id = s.queues.len.load(Ordering::Acquire);
        if id >= MAX_QUEUES {
            return Err(Error::TooManyQueues(MAX_QUEUES));
        }
        self.register_queue(id, raw, true)
    }

    /// Registers queue `id` (the caller holds the registry's grow lock).
    fn register_queue(&self, id: usize, raw: B::Queue, stream_ordered: bool) -> Result<Queue<B>> {
        let s = &self.shared;
        let orders_memory = s.backend.orders_memory(&raw);
        let q = Arc::new(QueueShared::new(
            id as QueueId,
            raw,
            orders_memory,
            stream_ordered,
        ));
        s.queues.slots[id]
            .set(q.clone())
            .unwrap_or_else(|_| unreachable!("slot {id} filled twice"));
        s.queues.len.store(id + 1, Ordering::Release);
        Ok(Queue {
            shared: s.clone(),
            q,
        })
    }

    /// Allocates a buffer of `size` bytes for work on `queue`.
    ///
    /// `size` 0 is [`Error::ZeroSize`]; above the device's largest buffer,
    /// [`Error::TooLarge`]. Under memory pressure the cache is trimmed, then
    /// the call waits up to [`Config::pressure_timeout`] for in-flight work,
    /// then returns [`Error::OutOfMemory`] with a statistics snapshot.
    pub fn malloc(&self, size: u64, queue: &Queue<B>) -> Result<Buffer<B>> {
        if !Arc::ptr_eq(&queue.shared, &self.shared) {
            return Err(Error::ForeignQueue);
        }
        self.shared.malloc(size, &queue.q)
    }

    /// A snapshot of the statistics, after promoting what has completed.
    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        s.drain_retained();
        s.flush_markers();
        s.refresh_all();
        let mut st = s.state.lock();
        // One visit to the slots (one heavy fence): their deferred shells,
        // filed so that promotion sees them, and their figures.
        let mut deferred = Vec::new();
        let slots = s
            .fronts
            .totals(|slot| deferred.append(&mut slot.take_deferred()));
        let mut spare = Vec::new();
        s.file_deferred(&mut st, deferred, &mut spare);
        let (release, _) = s.promote(&mut st);
        let snap = s.snapshot_with(&st, &slots);
        drop(st);
        s.release_segments(release);
        snap
    }

    /// Starts recording memory history, keeping at most `max_entries`
    /// events (the oldest are dropped first), or, with `None`, stops and
    /// forgets them: PyTorch's `_record_memory_history`. While recording,
    /// allocations and frees skip the per-thread front caches (every one is
    /// recorded under the state lock): slower, for diagnosis.
    pub fn record_history(&self, max_entries: Option<usize>) {
        self.shared.set_history(max_entries);
    }

    /// A memory snapshot: every segment with its blocks (allocated, pending
    /// or free) and the events recorded so far, as PyTorch's
    /// `torch.cuda.memory._snapshot()` gives them (see [`crate::history`]).
    /// The front caches' blocks go back to their segments first.
    pub fn memory_snapshot(&self) -> crate::history::MemorySnapshot {
        self.shared.snapshot_memory()
    }

    /// Checks the allocator's bookkeeping from scratch: the arena's
    /// segments, blocks and indexes, and that the statistics agree with
    /// them. For tests (the `testing` feature).
    #[cfg(feature = "testing")]
    pub fn check_consistency(&self) -> std::result::Result<(), String> {
        let st = self.shared.state.lock();
        st.arena.check()?;
        let t = st.arena.totals();
        let taken = st.stats.active_bytes + st.pending.bytes();
        if t.taken != taken {
            return Err(format!(
                "the arena has {} bytes out, the counters {} (active {} + pending {})",
                t.taken,
                taken,
                st.stats.active_bytes,
                st.pending.bytes()
            ));
        }
        Ok(())
    }

    /// Promotes completed pending blocks and drops references held for
    /// completed submissions, without allocating.
    pub fn poll(&self) {
        let _ = self.stats();
    }

    /// Resets the peak figures to the current ones.
    pub fn reset_peak(&self) {
        let s = &self.shared;
        let mut st = s.state.lock();
        // The live bytes, without the front caches' blocks (see `snapshot`).
        st.stats.peak_active_bytes = s.snapshot(&st).active_bytes;
        let t = st.arena.totals();
        st.stats.peak_reserved_bytes = t.reserved;
        st.stats.peak_segments = t.segments;
    }

    /// Gives back every releasable byte now (whole free segments, whole
    /// free pages), and the memory of every block on the pending list once
    /// its work completes. Returns the bytes given back now.
    pub fn clear_cache(&self) -> u64 {
        let released = self.trim(0);
        self.shared.state.lock().release_pending = true;
        released
    }

    /// Gives back releasable memory (whole free segments, whole free pages
    /// of growable ones), least recently freed first, until at most
    /// `ready_bytes` releasable bytes remain. Never touches memory in
    /// flight, nor free memory between live blocks. Returns the bytes given
    /// back.
    pub fn trim(&self, ready_bytes: u64) -> u64 {
        let s = &self.shared;
        s.drain_retained();
        s.flush_markers();
        s.refresh_all();
        let mut st = s.state.lock();
        s.drain_fronts(&mut st);
        let (mut segments, mut bytes) = s.promote(&mut st);
        let over = st.arena.totals().releasable.saturating_sub(ready_bytes);
        let trimmed = st.arena.trim(over);
        let (more, more_bytes) = s.apply_trims(&mut st, trimmed);
        segments.extend(more);
        bytes += more_bytes;
        drop(st);
        s.release_segments(segments);
        bytes
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.shared.state.lock().limits
    }

    /// Replaces all three limits at once, after checking them against each
    /// other and the device; then trims to the new cache limit.
    pub fn set_limits(&self, limits: Limits) -> Result<()> {
        limits.validate(self.shared.info.memory_capacity)?;
        let s = &self.shared;
        let mut st = s.state.lock();
        st.limits = limits;
        s.fronts.set_cache_limit(limits.cache);
        st.ready_cap = limits.cache - s.fronts.reserve();
        s.drain_fronts(&mut st);
        s.trim_to_cap(st);
        Ok(())
    }

    /// Sets the memory limit (see [`Config`]); the others must still fit under it.
    ///
    /// Lowering it below the bytes reserved now is accepted: live and pending
    /// blocks stay until freed and completed, and allocations trim, wait, and
    /// fail with [`Error::OutOfMemory`] until reserved bytes fit again.
    pub fn set_memory_limit(&self, bytes: u64) -> Result<()> {
        self.set_limits(Limits {
            memory: bytes,
            ..self.limits()
        })
    }

    /// Sets the cache limit and trims to it.
    pub fn set_cache_limit(&self, bytes: u64) -> Result<()> {
        self.set_limits(Limits {
            cache: bytes,
            ..self.limits()
        })
    }

    /// Sets the GC limit.
    pub fn set_gc_limit(&self, bytes: u64) -> Result<()> {
        self.set_limits(Limits {
            gc: bytes,
            ..self.limits()
        })
    }

    /// A process-unique id of this allocator.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The release policy.
    pub fn policy(&self) -> PolicyKind {
        self.shared.config.policy.kind()
    }

    /// The configuration it was created with.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// The device, as the backend describes it.
    pub fn device_info(&self) -> &DeviceInfo {
        &self.shared.info
    }

    /// The backend, for backend-specific calls (the simulator's validation
    /// report, for instance).
    pub fn backend(&self) -> &B {
        &self.shared.backend
    }
}
