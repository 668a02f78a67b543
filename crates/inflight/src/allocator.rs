//! The allocator: malloc, free, promotion, trimming and limits.
//!
//! One [`Allocator`] owns a backend, its queues, the per-thread front caches
//! (`front.rs`), the ready list and the pending list. The lists sit behind
//! one mutex, the state lock; backends are only called for cheap queries
//! under it (device allocation is made with it let go; release, rare next
//! to cache hits, under it).
//!
//! # Paths
//!
//! - **free** (the last handle of a buffer is dropped): the buffer's home
//!   slot counts it gone (K1); never bound, or every stamp passed by the
//!   cached watermarks → the freeing thread's front cache (no state lock),
//!   its older half going to the ready list when it is full; else gathered
//!   in that front cache as deferred, then filed on the pending list under
//!   its first incomplete stamp, 32 at a time or at the thread's next miss.
//!   Ready bytes are trimmed to their share of the cache limit, oldest
//!   first. (Under `Immediate`, a block that was ever bound skips the front
//!   cache and goes to the ready list, its stamps ignored: that is the
//!   defect.)
//! - **malloc**: a block of the rounded size (its size class) from the
//!   calling thread's front cache, with no shared lock. Else, under the
//!   state lock: file the thread's deferred shells; best fit from ready;
//!   else promote due pending blocks by the cached watermarks and try again;
//!   else, on a queue that orders memory, a pending block whose only stamp
//!   is on that queue; else promote again after asking the backend (the
//!   state lock let go), and try again; else trim the ready list to its
//!   share of the cache limit and make a device allocation: drain the front
//!   caches, trim to the GC limit, trim to the memory limit, ask the device
//!   (the state lock let go), wait (boundedly) for the oldest in-flight
//!   stamp, and finally fail with [`Error::OutOfMemory`].
//! - **bind** on another queue of a buffer reused in order ahead of its
//!   previous owner's work (`order_reuse`): nothing, if that work has
//!   completed; else, if nothing has seen the buffer's block (rule S2 in
//!   `buffer.rs`), another block under the state lock: a ready one, or
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

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::backend::{Backend, DeviceError, DeviceInfo};
use crate::biased::Section;
use crate::buffer::{pack_fence, unpack_fence, BufferInner, Shell};
use crate::cache::{Block, ReadyList};
use crate::config::{fit_bound, round_size, validate_sizing, Config, Limits, ReuseWait};
use crate::error::{Error, Result};
use crate::front::{Deferred, Fronts, Home, SlotState, SlotTotals};
use crate::pending::PendingList;
use crate::policy::PolicyKind;
use crate::stats::Stats;
use crate::sync::{lock_spinning, AtomicBool, AtomicU64, AtomicUsize, Mutex, MutexGuard, Ordering};
use crate::timeline::{QueueId, Stamp, Stamps, Watermark};
use crate::{Buffer, Queue};

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

/// What `Shared::free_through` gives: the freeing thread's slot, entered;
/// the home slot's reference to the allocator if it goes now (K1); and the
/// freeing thread's `Home`.
type FreeThrough<'a, B> = (Section<'a, SlotState<B>>, Option<Arc<Shared<B>>>, Home);

/// Nanoseconds spent in the backend's slow calls, summed over threads.
/// Statistics only, ordering nothing: std's atomics even under loom, so that
/// they add no scheduling points to the models.
#[derive(Default)]
struct BackendTime {
    allocate: std::sync::atomic::AtomicU64,
    release: std::sync::atomic::AtomicU64,
    completed: std::sync::atomic::AtomicU64,
}

impl BackendTime {
    /// Runs `f`, adding its duration to `counter`.
    #[inline]
    fn timed<R>(counter: &std::sync::atomic::AtomicU64, f: impl FnOnce() -> R) -> R {
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

/// `T` alone on its cache lines (128 bytes: two lines, the unit the
/// adjacent-line prefetcher moves), as crossbeam's `CachePadded`.
#[repr(align(128))]
struct CachePadded<T>(T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> std::ops::DerefMut for CachePadded<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// The allocator's mutable state, behind `Shared::state`.
struct State<B: Backend> {
    ready: ReadyList<B::Buffer>,
    pending: PendingList<B::Buffer>,
    limits: Limits,
    /// What the ready list may hold: the cache limit less the front caches'
    /// share (so that both together stay under the cache limit, I4).
    ready_cap: u64,
    /// Counters; the ready and pending figures are filled in at snapshot.
    /// Here `active_*` count every block handed out of this state: live
    /// buffers and the front caches' idle blocks; the snapshot moves the
    /// latter to `ready_*`. `frees` and front-cache hits are counted in
    /// the slots.
    stats: Stats,
    next_block_id: u64,
    /// The highest `held()` figure ever reached (`Config::hold_peak`).
    high_water: u64,
    /// Empty buffer shells, recycled so that a cache hit allocates nothing.
    spares: Vec<Shell<B>>,
}

/// Spare shells kept; more are freed.
const MAX_SPARES: usize = 4096;

impl<B: Backend> State<B> {
    /// Bytes the allocator holds or has handed out.
    fn reserved(&self) -> u64 {
        self.stats.reserved_bytes
    }

    /// Reserved bytes less those on the pending list (`Config::hold_peak`).
    fn held(&self) -> u64 {
        self.stats.reserved_bytes - self.pending.bytes()
    }

    /// This state's figures, without the front caches (see `Shared::snapshot`).
    fn snapshot(&self) -> Stats {
        let mut s = self.stats;
        s.ready_bytes = self.ready.bytes();
        s.ready_count = self.ready.len() as u64;
        s.pending_bytes = self.pending.bytes();
        s.pending_count = self.pending.len() as u64;
        s
    }

    /// Takes blocks off the ready list, oldest first, until ready bytes are
    /// at most `target`, and accounts them as released.
    fn trim_ready_to(&mut self, target: u64, out: &mut Vec<Block<B::Buffer>>) {
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
    fn trim_ready_over(
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
    fn park(&mut self, shell: Shell<B>, spare: &mut Vec<Shell<B>>) {
        if self.spares.len() < MAX_SPARES {
            self.spares.push(shell);
        } else {
            spare.push(shell);
        }
    }

    fn account_release(&mut self, b: &Block<B::Buffer>) {
        self.stats.reserved_bytes -= b.size;
        self.stats.device_releases += 1;
        self.stats.trims += 1;
    }

    fn account_alloc(&mut self, size: u64) {
        self.stats.reserved_bytes += size;
        self.stats.peak_reserved_bytes = self
            .stats
            .peak_reserved_bytes
            .max(self.stats.reserved_bytes);
        self.high_water = self.high_water.max(self.held());
        self.stats.device_allocations += 1;
    }
}

/// One queue's shared state.
pub(crate) struct QueueShared<B: Backend> {
    pub(crate) id: QueueId,
    pub(crate) raw: B::Queue,
    pub(crate) orders_memory: bool,
    pub(crate) watermark: Watermark,
    pub(crate) submit: Mutex<SubmitState<B>>,
    /// Submissions under `Retained` whose references are still held.
    pub(crate) retained_len: AtomicUsize,
    /// The value of the last commit (0 before the first): with the
    /// watermark, how much work is queued ahead of the next submission.
    pub(crate) submitted: AtomicU64,
    /// An error from the completion path, reported at the next call.
    fault: Mutex<Option<Error>>,
    /// Whether `fault` may hold an error: lets the fast path skip the lock.
    faulted: AtomicBool,
}

/// A queue's submission bookkeeping, behind `QueueShared::submit`.
pub(crate) struct SubmitState<B: Backend> {
    /// The value the next commit gets.
    pub(crate) next: u64,
    /// Under `Retained`: (value, buffers it bound), oldest first.
    pub(crate) retained: VecDeque<(u64, Vec<Buffer<B>>)>,
}

impl<B: Backend> QueueShared<B> {
    /// Stores an error raised where it cannot be returned.
    fn record_fault(&self, e: DeviceError) {
        let mut f = self.fault.lock();
        self.faulted.store(true, Ordering::Release);
        if !matches!(*f, Some(Error::DeviceLost(_))) {
            *f = Some(match e {
                DeviceError::SubmissionFailed { value, reason } => Error::SubmissionFailed {
                    queue: self.id,
                    value,
                    reason,
                },
                other => other.into(),
            });
        }
    }

    /// Reports a stored error once (a lost device: every time).
    #[inline]
    pub(crate) fn check_fault(&self) -> Result<()> {
        if !self.faulted.load(Ordering::Acquire) {
            return Ok(());
        }
        self.take_fault()
    }

    /// `check_fault` once a fault was flagged.
    #[cold]
    fn take_fault(&self) -> Result<()> {
        let mut f = self.fault.lock();
        match f.as_ref() {
            None => Ok(()),
            Some(Error::DeviceLost(why)) => Err(Error::DeviceLost(why.clone())),
            Some(_) => {
                self.faulted.store(false, Ordering::Release);
                Err(f.take().expect("checked above"))
            }
        }
    }

    /// The stored error if it concerns submission `value` or the whole device.
    pub(crate) fn fault_for(&self, value: u64) -> Option<Error> {
        if !self.faulted.load(Ordering::Acquire) {
            return None;
        }
        match self.fault.lock().as_ref() {
            Some(e @ Error::DeviceLost(_)) => Some(e.clone()),
            Some(e @ Error::SubmissionFailed { value: v, .. }) if *v == value => Some(e.clone()),
            _ => None,
        }
    }
}

/// Queues by id, append-only, readable without a lock.
pub(crate) struct QueueRegistry<B: Backend> {
    slots: Box<[OnceLock<Arc<QueueShared<B>>>]>,
    len: AtomicUsize,
    grow: Mutex<()>,
}

impl<B: Backend> QueueRegistry<B> {
    fn new() -> Self {
        QueueRegistry {
            slots: (0..MAX_QUEUES).map(|_| OnceLock::new()).collect(),
            len: AtomicUsize::new(0),
            grow: Mutex::new(()),
        }
    }

    /// The queue with id `id`. Ids come from this registry, so it exists.
    #[inline]
    pub(crate) fn get(&self, id: QueueId) -> &Arc<QueueShared<B>> {
        self.slots[id as usize]
            .get()
            .expect("queue ids are handed out only after registration")
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<QueueShared<B>>> {
        let n = self.len.load(Ordering::Acquire);
        self.slots[..n].iter().filter_map(|s| s.get())
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
        Ok(Allocator {
            shared: Arc::new(Shared {
                id: NEXT_ALLOCATOR_ID.fetch_add(1, Ordering::Relaxed),
                config,
                info,
                state: CachePadded(Mutex::new(State {
                    ready: ReadyList::default(),
                    pending: PendingList::default(),
                    limits,
                    ready_cap,
                    stats: Stats::default(),
                    next_block_id: 1,
                    high_water: 0,
                    spares: Vec::new(),
                })),
                fronts,
                slot_in_order,
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
        let q = Arc::new(QueueShared {
            id: id as QueueId,
            orders_memory: s.backend.orders_memory(&raw),
            raw,
            watermark: Watermark::default(),
            submit: Mutex::new(SubmitState {
                next: 1,
                retained: VecDeque::new(),
            }),
            retained_len: AtomicUsize::new(0),
            submitted: AtomicU64::new(0),
            fault: Mutex::new(None),
            faulted: AtomicBool::new(false),
        });
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
        let release = s.promote(&mut st);
        let snap = s.snapshot_with(&st, &slots);
        drop(st);
        s.release_blocks(release);
        snap
    }

    /// Promotes completed pending blocks and drops references held for
    /// completed submissions, without allocating.
    pub fn poll(&self) {
        let _ = self.stats();
    }

    /// Resets the peak figures to the current ones.
    pub fn reset_peak(&self) {
        let mut st = self.shared.state.lock();
        st.stats.peak_active_bytes = st.stats.active_bytes;
        st.stats.peak_reserved_bytes = st.stats.reserved_bytes;
    }

    /// Releases every ready block now, and every pending block once its work
    /// completes. Returns the bytes released now.
    pub fn clear_cache(&self) -> u64 {
        let s = &self.shared;
        s.drain_retained();
        s.refresh_all();
        let mut st = s.state.lock();
        s.drain_fronts(&mut st);
        let mut release = s.promote(&mut st);
        st.trim_ready_to(0, &mut release);
        st.pending.mark_all_for_release();
        drop(st);
        s.release_blocks(release)
    }

    /// Releases ready blocks, oldest first, until at most `ready_bytes` remain.
    /// Never touches pending blocks. Returns the bytes released.
    pub fn trim(&self, ready_bytes: u64) -> u64 {
        let s = &self.shared;
        s.refresh_all();
        let mut st = s.state.lock();
        s.drain_fronts(&mut st);
        let mut release = s.promote(&mut st);
        st.trim_ready_to(ready_bytes, &mut release);
        drop(st);
        s.release_blocks(release)
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
        let mut release = Vec::new();
        let ready_cap = st.ready_cap;
        st.trim_ready_to(ready_cap, &mut release);
        drop(st);
        self.shared.release_blocks(release);
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

impl<B: Backend> Shared<B> {
    /// Refreshes a queue's watermark from the backend. A backend error, and
    /// any submission that completed with an error
    /// ([`Backend::take_failure`]), is stored on the queue and reported at
    /// its next call; a failed submission still advances the watermark (its
    /// work is over).
    pub(crate) fn refresh(&self, q: &QueueShared<B>) -> u64 {
        let asked = BackendTime::timed(&self.backend_time.completed, || {
            self.backend.completed(&q.raw)
        });
        let completed = match asked {
            Ok(v) => q.watermark.advance(v),
            Err(e) => {
                q.record_fault(e);
                q.watermark.get()
            }
        };
        while let Some(e) = self.backend.take_failure(&q.raw) {
            q.record_fault(e);
        }
        completed
    }

    /// The fast path: an idle block of the rounded size in this thread's
    /// slot, under the slot's lock alone. Everything else is out of line, so
    /// that this stays a few dozen instructions.
    #[inline]
    fn malloc(self: &Arc<Self>, size: u64, queue: &Arc<QueueShared<B>>) -> Result<Buffer<B>> {
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
            return Ok(Buffer::reissue(shell, size, queue.id, scrub, home, fence));
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
    fn rounded(&self, size: u64) -> Option<u64> {
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
    fn size_error(&self, size: u64) -> Error {
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
    fn malloc_miss(
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
    fn malloc_locked(
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
            MutexGuard::unlocked(&mut st, || self.refresh_all());
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
        if recycled && self.config.scrub {
            // Zeroed at its first binding (see `Config::scrub`).
            buf.inner.needs_scrub.store(true, Ordering::Relaxed);
        }
        Ok(buf)
    }

    /// The miss path: makes room under the limits, then asks the device.
    /// Blocks to release are collected in `release` (released here too when
    /// the device needs the room at once).
    fn allocate_device<'a>(
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
    fn rebind(&self, buf: &Buffer<B>, on: QueueId) -> bool {
        let Some(rounded) = self.rounded(buf.len()) else {
            return false;
        };
        let Some(held) = buf.inner.try_rebind() else {
            return false; // seen already: its block stays
        };
        // SAFETY: S2: this thread moved `pin` to REBINDING, so it alone
        // reaches `held` until it pins or unpins it below.
        let held = unsafe { &mut *held };
        let bound = fit_bound(rounded, &self.config);
        let in_order =
            (self.config.in_order_reuse && self.queues.get(on).orders_memory).then_some(on);
        let mut release = Vec::new();
        let mut st = lock_spinning(&self.state);
        // The caller refreshed the watermark of the queue that matters.
        let Some((fresh, fence)) =
            self.take_cached(&mut st, rounded, bound, in_order, &mut release)
        else {
            drop(st);
            self.release_blocks(release);
            buf.inner.unpin_after_rebinding();
            return false;
        };
        let raw = held.raw.as_mut().expect("a live buffer has its raw buffer");
        let mut stamps = buf.inner.stamps.lock();
        let reused = Block {
            raw: std::mem::replace(raw, fresh.raw),
            size: std::mem::replace(&mut held.size, fresh.size),
            id: std::mem::replace(&mut held.id, fresh.id),
            stamps: std::mem::replace(&mut *stamps, fresh.stamps),
            release_when_idle: false,
        };
        drop(stamps);
        st.stats.active_bytes = st.stats.active_bytes + held.size - reused.size;
        st.stats.peak_active_bytes = st.stats.peak_active_bytes.max(st.stats.active_bytes);
        st.stats.reuse_rebinds += 1;
        self.file_block(&mut st, reused);
        drop(st);
        self.release_blocks(release);
        buf.inner.reuse_fence.store(fence, Ordering::Release);
        if self.config.scrub {
            // A recycled block: zeroed at its first binding, this one.
            buf.inner.needs_scrub.store(true, Ordering::Relaxed);
        }
        buf.inner.pin_after_rebinding();
        true
    }

    /// A cached block of `rounded` bytes (below `bound`), asking the backend
    /// nothing: best fit from the ready list; else the same after promoting
    /// by the cached watermarks (blocks that trims go to `release`); else,
    /// on `in_order`'s queue, a pending block whose only use in flight is
    /// there. Returns it with its reuse fence (packed; 0 for none).
    fn take_cached(
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

    /// The oldest submission still holding references under `Retained`.
    fn oldest_retained(&self) -> Option<Stamp> {
        self.queues
            .iter()
            .filter(|q| q.retained_len.load(Ordering::Acquire) > 0)
            .filter_map(|q| {
                q.submit.lock().retained.front().map(|(v, _)| Stamp {
                    queue: q.id,
                    value: *v,
                })
            })
            .min_by_key(|s| s.value)
    }

    /// Moves pending blocks whose stamps have all passed by the cached
    /// watermarks to the ready list, then trims ready bytes to the cache
    /// limit; returns the blocks to release (trimmed, or marked for release
    /// by `clear_cache`). Asks the backend nothing: callers refresh first
    /// ([`Shared::refresh_all`], without the state lock) where it matters.
    #[must_use]
    fn promote(&self, st: &mut State<B>) -> Vec<Block<B::Buffer>> {
        let mut release = Vec::new();
        if st.pending.is_empty() {
            return release;
        }
        for qid in 0..st.pending.queue_slots() as QueueId {
            if !st.pending.has_queue(qid) {
                continue;
            }
            let completed = self.queues.get(qid).watermark.get();
            for mut block in st.pending.take_due(qid, completed) {
                match self.first_incomplete_cached(&block.stamps) {
                    Some(next) => st.pending.insert(block, next),
                    None if block.release_when_idle => {
                        st.account_release(&block);
                        release.push(block);
                    }
                    None => {
                        block.stamps.clear();
                        st.ready.insert(block);
                    }
                }
            }
        }
        // Promoted blocks count against the cache limit like freed ones (I4).
        let ready_cap = st.ready_cap;
        st.trim_ready_to(ready_cap, &mut release);
        release
    }

    /// Asks the backend how far every queue got (no allocator lock needed:
    /// watermarks only move forward).
    fn refresh_all(&self) {
        for q in self.queues.iter() {
            self.refresh(q);
        }
    }

    /// The first stamp the cached watermarks do not show completed (no
    /// backend call).
    #[inline]
    fn first_incomplete_cached(&self, stamps: &Stamps) -> Option<Stamp> {
        stamps.first_incomplete(|q| self.queues.get(q).watermark.get())
    }

    /// The free path (see the module documentation): `shell` is the buffer's,
    /// still filled, with no handle left. Returns the home slot's reference
    /// to this allocator if the slot lets it go (K1): the caller drops it
    /// after its last use of `self`, since it may be the last one.
    #[must_use]
    #[inline]
    pub(crate) fn free(&self, shell: Shell<B>) -> Option<Arc<Shared<B>>> {
        // SAFETY: S1: the caller dropped the last handle; the shell is ours.
        if unsafe { shell.owned_stamps() }.is_empty() {
            self.free_idle(shell)
        } else {
            self.free_bound(shell)
        }
    }

    /// Frees a block with no use in flight (stamps cleared) to the calling
    /// thread's slot: the fast path, on a thread's own slot without a lock.
    #[inline]
    fn free_idle(&self, shell: Shell<B>) -> Option<Arc<Shared<B>>> {
        // SAFETY: S1: the shell has no handle and is ours (the free path's).
        let (size, home) = {
            let live = unsafe { shell.owned_live() };
            (live.held.get_mut().size, live.home)
        };
        let (mut slot, keep, me) = self.free_through(home);
        let cap = self.fronts.cap_for(me);
        if let Err(shell) = slot.try_push(size, shell, cap) {
            let evicted = slot.push(size, shell, cap);
            drop(slot);
            // A slot takes its share of the cache limit at its first idle
            // block that fits (see `Fronts::claim`).
            let claim = (cap == 0 && size <= self.fronts.cap()).then_some(me);
            self.file_evicted(evicted, claim);
        }
        keep
    }

    /// Uncounts a freed buffer from its home slot (K1) and enters the
    /// calling thread's slot, where the block goes. Returns the section, the
    /// home slot's reference to this allocator if it goes now (the caller
    /// drops it last, after the section), and the calling thread's home.
    #[inline]
    fn free_through(&self, home: u32) -> FreeThrough<'_, B> {
        let me = self.fronts.me();
        // Another thread's buffer: uncounted there first (no lock may be
        // taken inside the section).
        let remote = (me.slot() != home).then(|| self.fronts.uncount_remote(home));
        let mut slot = self.fronts.enter(me);
        slot.frees += 1;
        let keep = match remote {
            Some(keep) => keep,
            None => slot.remove_live(self.fronts.closing()),
        };
        (slot, keep, me)
    }

    /// Moves shells evicted from a full slot (its older half, or a shell
    /// over the slot's cap) to the ready list; claims slot `claim`'s share
    /// of the cache limit, if given, taking it from the ready list's.
    #[inline(never)]
    fn file_evicted(&self, evicted: Vec<Shell<B>>, claim: Option<Home>) {
        if evicted.is_empty() {
            return;
        }
        let mut st = lock_spinning(&self.state);
        let mut spare = Vec::new();
        for shell in evicted {
            self.file_shell(&mut st, shell, &mut spare);
        }
        let mut made_room = Vec::new();
        if let Some(me) = claim {
            self.fronts.claim(me, |reserve| {
                st.ready_cap = st.limits.cache - reserve;
                let ready_cap = st.ready_cap;
                st.trim_ready_to(ready_cap, &mut made_room);
            });
        }
        self.trim_to_cap(st);
        drop(spare); // after the lock
        self.release_blocks(made_room);
    }

    /// Frees a block that was bound. Where it goes: if the cached watermarks
    /// show its every use complete, to the slot like an idle one; else to
    /// the pending list, gathered in the slot first. The free path never
    /// asks the backend: a block whose work completed since the last
    /// refresh waits on the pending list for the next one. Under
    /// `Immediate`, to the ready list, its uses ignored.
    #[inline(never)]
    fn free_bound(&self, shell: Shell<B>) -> Option<Arc<Shared<B>>> {
        // SAFETY: S1: the shell has no handle and is ours (the free path's).
        let (stamps, live) = unsafe { (shell.owned_stamps(), shell.owned_live()) };
        let (home, size) = (live.home, live.held.get_mut().size);
        if self.config.policy.kind() == PolicyKind::Immediate {
            let (slot, keep, _) = self.free_through(home);
            drop(slot);
            self.free_to_lists(shell);
            return keep;
        }
        if self.first_incomplete_cached(stamps).is_none() {
            stamps.clear();
            return self.free_idle(shell);
        }
        // In flight: gathered in the slot, filed in a batch (see `front.rs`).
        let (mut slot, keep, _) = self.free_through(home);
        let batch = slot.defer(size, shell);
        drop(slot);
        if let Some(batch) = batch {
            let mut st = lock_spinning(&self.state);
            let mut spare = Vec::new();
            self.file_deferred(&mut st, batch, &mut spare);
            self.trim_to_cap(st);
            drop(spare); // after the lock
        }
        keep
    }

    /// Files a batch of shells freed in flight (from a slot): on the pending
    /// list under its first incomplete stamp, or, if the cached watermarks
    /// show that its work has completed since (the GPU is often ahead), on
    /// the ready list at once, with no round trip through the pending list.
    /// The caller trims the ready list after.
    fn file_deferred(&self, st: &mut State<B>, batch: Deferred<B>, spare: &mut Vec<Shell<B>>) {
        for shell in batch {
            // SAFETY: S1: a shell in a slot has no handle and is ours.
            let block = unsafe { shell.unfill() };
            st.stats.active_bytes -= block.size;
            st.stats.active_count -= 1;
            st.stats.deferred_frees += 1;
            self.file_block(st, block);
            st.park(shell, spare);
        }
    }

    /// Files a block that left a buffer with its stamps: on the pending
    /// list under its first incomplete stamp, or on the ready list if the
    /// cached watermarks show every use complete.
    fn file_block(&self, st: &mut State<B>, mut block: Block<B::Buffer>) {
        match self.first_incomplete_cached(&block.stamps) {
            Some(due) => st.pending.insert(block, due),
            None => {
                block.stamps.clear();
                st.ready.insert(block);
            }
        }
    }

    /// Under `Immediate`: files a freed block that was bound on the ready
    /// list, its uses ignored (the defect).
    fn free_to_lists(&self, shell: Shell<B>) {
        // SAFETY: S1: the shell has no handle and is ours (the free path's).
        let mut block = unsafe { shell.unfill() };
        let mut st = lock_spinning(&self.state);
        st.stats.active_bytes -= block.size;
        st.stats.active_count -= 1;
        block.stamps.clear();
        st.ready.insert(block);
        let mut spare = Vec::new();
        st.park(shell, &mut spare);
        self.trim_to_cap(st);
        drop(spare); // after the lock
    }

    /// Moves an idle filled shell out of a slot (evicted or drained) to the
    /// ready list.
    fn file_shell(&self, st: &mut State<B>, shell: Shell<B>, spare: &mut Vec<Shell<B>>) {
        // SAFETY: S1: a shell out of a slot has no handle and is ours.
        let block = unsafe { shell.unfill() };
        debug_assert!(block.stamps.is_empty(), "slots hold idle blocks only");
        st.stats.active_bytes -= block.size;
        st.stats.active_count -= 1;
        st.ready.insert(block);
        st.park(shell, spare);
    }

    /// Trims the ready list to its cap, releasing after the lock.
    fn trim_to_cap(&self, mut st: StateGuard<'_, B>) {
        let ready_cap = st.ready_cap;
        if st.ready.bytes() > ready_cap {
            let mut release = Vec::new();
            st.trim_ready_to(ready_cap, &mut release);
            drop(st);
            self.release_blocks(release);
        }
    }

    /// Moves every slot's blocks to the lists (for trims, clears, limit
    /// changes and memory pressure). The caller trims after.
    fn drain_fronts(&self, st: &mut State<B>) {
        let mut spare = Vec::new();
        let (idle, deferred) = self.fronts.drain_all();
        for shell in idle {
            self.file_shell(st, shell, &mut spare);
        }
        self.file_deferred(st, deferred, &mut spare);
    }

    /// A statistics snapshot: the state's figures with the slots' added.
    fn snapshot(&self, st: &State<B>) -> Stats {
        self.snapshot_with(st, &self.fronts.totals(|_| {}))
    }

    /// The state's figures with the slots' `t` added: their idle blocks as
    /// ready, their deferred ones as pending, their counters summed.
    fn snapshot_with(&self, st: &State<B>, t: &SlotTotals) -> Stats {
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

    /// Gives blocks back to the device; returns the bytes released.
    #[inline]
    fn release_blocks(&self, blocks: Vec<Block<B::Buffer>>) -> u64 {
        if blocks.is_empty() {
            return 0;
        }
        let mut bytes = 0;
        BackendTime::timed(&self.backend_time.release, || {
            for b in blocks {
                bytes += b.size;
                // SAFETY: (1) every block came from `self.backend.allocate`.
                // (2) It came off the ready list, or was promoted with every
                // stamp passed: no submission that recorded a use is
                // incomplete. The exception is the `Immediate` policy, whose
                // `unsafe` constructor makes the caller accept releasing in
                // flight.
                unsafe { self.backend.release(b.raw) };
            }
        });
        bytes
    }

    /// Under `Retained`: drops the references held for completed submissions.
    /// Never called with the state lock held (dropping may free buffers).
    pub(crate) fn drain_retained(&self) {
        if self.config.policy.kind() != PolicyKind::Retained {
            return;
        }
        for q in self.queues.iter() {
            if q.retained_len.load(Ordering::Acquire) == 0 {
                continue;
            }
            let completed = self.refresh(q);
            let mut done = Vec::new();
            {
                let mut sub = q.submit.lock();
                while sub.retained.front().is_some_and(|(v, _)| *v <= completed) {
                    done.push(sub.retained.pop_front().expect("front checked"));
                }
                q.retained_len.store(sub.retained.len(), Ordering::Release);
            }
            drop(done);
        }
    }

    /// Teardown wait: how long dropping the allocator waits for in-flight work
    /// before leaking (never releasing) what is still in use.
    fn teardown_timeout(&self) -> Duration {
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
