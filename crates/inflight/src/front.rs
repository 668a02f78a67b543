//! Per-thread front caches: the allocation fast path, and what keeps the
//! allocator alive while buffers are.
//!
//! An allocator has a fixed array of *slots*, on cache lines of their own; a
//! thread uses one (its *home*, see *Slots and locking* below). A slot holds:
//!
//! - up to [`FRONT_BLOCKS`] idle **filled shells**: buffer shells that still
//!   hold their block, whose every recorded use had completed when they were
//!   freed, so any queue may take them (I2 needs no check). A free lands its
//!   idle block in the freeing thread's slot; an allocation of a small block
//!   (at most `FRONT_MAX`, the small pool's largest) of a size the shell
//!   fits takes it back. On a thread's own slot each is a few plain loads
//!   and stores, and no shared cache line written. Large blocks freed here
//!   wait for the thread's next large request, which misses the slot (the
//!   arena chooses large blocks: see `FRONT_MAX`) and files them under the
//!   lock it takes anyway, before its carve.
//! - the count of **live buffers** allocated through it and, while that count
//!   is above zero (and always until the last [`crate::Allocator`] handle is
//!   dropped), one strong reference to the allocator's shared state. A buffer
//!   thus keeps its allocator alive (rule K1: a live buffer's home slot holds
//!   a strong reference) without touching the shared reference count. A
//!   free uncounts its buffer *last*, after every other use of the
//!   allocator (`Shared::uncount`): once the count is down, another
//!   thread's free may let the reference go and tear the allocator down.
//! - up to [`FRONT_DEFERRED`] **deferred shells**: buffers freed while their
//!   work was in flight (their stamps kept). They are pending blocks not yet
//!   filed, never released from here. Filed many under one state lock: the
//!   oldest half when the batch is full, all of them at the slot thread's
//!   next miss (which takes the state lock anyway), and by every drain.
//!   Filing gives each to the arena (`file_block`): to its pool, merged with
//!   its free neighbours, if its work completed or if the only work left is
//!   its own queue's and that queue reuses in order; else to the pending
//!   list. So a free in flight, the common case under `Deferred`, usually
//!   takes no shared lock either.
//!
//!   Under in-order reuse (I2, `Config::in_order_reuse`) with front caches
//!   on (`Config::front_cache`), an allocation on a queue that orders memory
//!   may also take a deferred shell of its size whose only use in flight is
//!   on that queue, the oldest first: the new work runs after the old on
//!   that queue, and work on any other queue waits for the old (the
//!   buffer's `reuse_fence`).
//! - counters (frees, front hits), summed into each statistics snapshot.
//!
//! A slot holds at most `cap` bytes, an eighth of the cache limit over the
//! slot count, and only once it has *claimed* that share: at the first idle
//! block that fits, under the state lock, which takes the share from the
//! arena's (whose releasable bytes are trimmed to the cache limit less the
//! claimed shares). So cached bytes stay under the cache limit (I4), and
//! slots no thread uses leave their share to the arena. Growth, trimming,
//! clearing, limit changes and memory pressure empty the slots; a claim
//! stays.
//!
//! # Slots and locking
//!
//! A thread's index (unique among live threads, reused after a thread
//! exits) picks its slot. Slot `i` below the owned count belongs to the
//! thread of index `i`, which enters it as the owner of a biased lock
//! (`biased.rs`): no atomic read-modify-write, no fence instruction. Threads
//! of higher index share the remaining slots under their spin locks, as do
//! all threads where the kernel offers no asymmetric fence.
//!
//! Other threads enter an owned slot only to drain it, read its counters or
//! close it (revoking the owner's bias, one heavy fence for all slots), and
//! to uncount a buffer of its own they free (its side lock only: the count
//! goes to `remote_frees`, folded into `live` when the slot closes). Such a
//! free files the block in the freeing thread's own slot.
//!
//! Lock order: the allocator's state lock, then slot locks in index order.
//! An owner's unlocked section takes no lock, and nothing takes a lock while
//! inside one (a revoker waits for the section to end).

use std::marker::PhantomData;
use std::sync::Arc;

use crate::allocator::Shared;
use crate::backend::Backend;
use crate::biased::{asymmetric_fences, Biased, Section};
use crate::buffer::Shell;
use crate::sync::{AtomicBool, AtomicU64, Ordering};
use crate::timeline::QueueId;

/// Idle blocks one slot holds at most (its bytes are capped apart). With
/// sizes that vary, more blocks mean more frees taken back by the same
/// thread without the state lock, and a longer scan at a miss (newest
/// first); at 128 the mixed benchmark gained a few percent at most.
pub(crate) const FRONT_BLOCKS: usize = 64;

/// Deferred shells one slot gathers before filing them as a batch.
pub(crate) const FRONT_DEFERRED: usize = 32;

/// Shells freed in flight (see the module documentation).
pub(crate) type Deferred<B> = Vec<Shell<B>>;

/// The share of the cache limit all slots together may hold: 1/8.
const FRONT_SHARE: u64 = 8;

/// Slots shared under their spin locks by threads without an owned slot.
const SHARED_SLOTS: usize = 8;

/// Thread indices: the lowest free one for each new thread, given back
/// when the thread exits, so that owned slots go to the live threads.
static NEXT_THREAD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static FREE_INDICES: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

/// A thread's index, held until the thread exits.
struct ThreadIndex(usize);

impl ThreadIndex {
    fn take() -> Self {
        let mut free = FREE_INDICES.lock().unwrap_or_else(|e| e.into_inner());
        match free.iter().enumerate().min_by_key(|(_, i)| **i) {
            Some((at, _)) => ThreadIndex(free.swap_remove(at)),
            None => ThreadIndex(NEXT_THREAD.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
        }
    }
}

impl Drop for ThreadIndex {
    fn drop(&mut self) {
        // The lock orders this thread's last use of its slots before the
        // next holder's first.
        FREE_INDICES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.0);
    }
}

thread_local! {
    static THREAD_INDEX: ThreadIndex = ThreadIndex::take();
}

/// The calling thread's slot, from [`Fronts::me`]; it stays on that thread
/// (not `Send`), which is what lets [`Fronts::enter`] enter an owned slot
/// without its lock.
#[derive(Clone, Copy)]
pub(crate) struct Home {
    slot: u32,
    owned: bool,
    _not_send: PhantomData<*const ()>,
}

impl Home {
    /// The slot's index: a buffer allocated here is counted here.
    #[inline]
    pub(crate) fn slot(self) -> u32 {
        self.slot
    }
}

/// The slots of one allocator.
pub(crate) struct Fronts<B: Backend> {
    slots: Box<[Slot<B>]>,
    /// Slots `0..owned` belong to the threads of those indices; the rest
    /// are shared under their locks. 0 where slots are never biased.
    owned: usize,
    /// Whether idle blocks are kept at all (`Config::front_cache`).
    enabled: bool,
    /// Bytes one slot may hold; changes with the cache limit.
    cap: AtomicU64,
    /// Slots that have claimed their cap (changed under the state lock).
    /// The claim counts order nothing the models check (I4 is checked by
    /// the tests at quiet points): std's atomics even under loom.
    claimed: std::sync::atomic::AtomicUsize,
    /// Set when the last `Allocator` handle is dropped: no allocation can
    /// follow, so a slot whose live count reaches zero lets its reference go.
    closing: AtomicBool,
}

/// The slots' figures summed, for a statistics snapshot.
#[derive(Default)]
pub(crate) struct SlotTotals {
    pub(crate) idle_bytes: u64,
    pub(crate) idle_count: u64,
    pub(crate) deferred_bytes: u64,
    pub(crate) deferred_count: u64,
    pub(crate) frees: u64,
    pub(crate) hits: u64,
    pub(crate) in_order_hits: u64,
}

/// One slot, alone on its cache lines.
#[repr(align(128))]
pub(crate) struct Slot<B: Backend> {
    cell: Biased<SlotState<B>>,
    /// Buffers homed here that other threads freed while the bias stood,
    /// taken off `live` when the slot closes. Written under the cell's lock.
    remote_frees: AtomicU64,
    /// The slot has claimed its share of the cache limit (set once, under
    /// the state lock).
    claimed: std::sync::atomic::AtomicBool,
}

/// What a slot holds (in its biased cell). `repr(C)`: the fields a hit or
/// an idle free touches come first.
#[repr(C)]
pub(crate) struct SlotState<B: Backend> {
    /// Idle filled shells with their block sizes, oldest first; never more
    /// than [`FRONT_BLOCKS`] between operations (its capacity is one more).
    idle: Vec<(u64, Shell<B>)>,
    /// The sum of their sizes.
    idle_bytes: u64,
    /// Live buffers whose home this slot is.
    live: u64,
    /// Held while `live > 0`, and until closing (rule K1).
    keepalive: Option<Arc<Shared<B>>>,
    /// Allocations served from `idle`.
    hits: u64,
    /// Frees made through this slot (by its thread, of any buffer).
    pub(crate) frees: u64,
    /// Shells freed in flight with their block sizes, to file on the
    /// pending list, oldest first (capacity [`FRONT_DEFERRED`]).
    deferred: Vec<(u64, Shell<B>)>,
    /// The sum of their sizes.
    deferred_bytes: u64,
    /// Allocations served from `deferred` (in-order reuse; also in `hits`).
    in_order_hits: u64,
}

impl<B: Backend> SlotState<B> {
    /// Idle blocks held.
    fn idle_count(&self) -> u64 {
        self.idle.len() as u64
    }

    /// Takes the newest idle shell of `lo..=hi` bytes (a request's block
    /// size and its size class), counting a hit and a new live buffer.
    #[inline]
    pub(crate) fn take(&mut self, lo: u64, hi: u64) -> Option<Shell<B>> {
        // The common ping-pong: the newest.
        let (size, shell) = if self.idle.last().is_some_and(|(s, _)| lo <= *s && *s <= hi) {
            self.idle.pop()?
        } else {
            self.take_older(lo, hi)?
        };
        self.idle_bytes -= size;
        self.hits += 1;
        Some(shell)
    }

    /// `take` past the newest.
    #[inline(never)]
    fn take_older(&mut self, lo: u64, hi: u64) -> Option<(u64, Shell<B>)> {
        let i = self.idle.iter().rposition(|(s, _)| lo <= *s && *s <= hi)?;
        Some(self.idle.remove(i))
    }

    /// Counts a buffer about to be allocated through this slot; takes the
    /// reference K1 needs if the slot has none.
    #[inline]
    pub(crate) fn add_live(&mut self, shared: &Arc<Shared<B>>) {
        self.live += 1;
        if self.keepalive.is_none() {
            self.keepalive = Some(shared.clone());
        }
    }

    /// Counts a buffer homed here gone (freed, or its allocation failed).
    /// Returns the slot's reference if it should go now; the caller drops it
    /// after its last use of the allocator.
    #[must_use]
    #[inline]
    pub(crate) fn remove_live(&mut self, closing: &AtomicBool) -> Option<Arc<Shared<B>>> {
        self.live -= 1;
        if self.live == 0 && closing.load(Ordering::Acquire) {
            self.keepalive.take()
        } else {
            None
        }
    }

    /// Files an idle filled shell as the newest if it fits in `cap` bytes
    /// and [`FRONT_BLOCKS`] blocks as they are; else gives it back, for
    /// [`SlotState::push`].
    #[inline]
    pub(crate) fn try_push(
        &mut self,
        size: u64,
        shell: Shell<B>,
        cap: u64,
    ) -> Result<(), Shell<B>> {
        if self.idle.len() < FRONT_BLOCKS && self.idle_bytes + size <= cap {
            self.idle.push((size, shell));
            self.idle_bytes += size;
            Ok(())
        } else {
            Err(shell)
        }
    }

    /// Files an idle filled shell as the newest, within `cap` bytes and
    /// [`FRONT_BLOCKS`] blocks. Returns what does not fit, for the ready
    /// list: the shell itself when it alone is over `cap`; else, when the
    /// slot is over, its oldest half at once (one state lock for many frees),
    /// then more of the oldest until the bytes fit.
    pub(crate) fn push(&mut self, size: u64, shell: Shell<B>, cap: u64) -> Vec<Shell<B>> {
        if size > cap {
            return vec![shell];
        }
        self.idle.push((size, shell));
        self.idle_bytes += size;
        if self.idle.len() <= FRONT_BLOCKS && self.idle_bytes <= cap {
            return Vec::new();
        }
        let mut n = if self.idle.len() > FRONT_BLOCKS {
            FRONT_BLOCKS / 2
        } else {
            0
        };
        let mut left = self.idle_bytes - self.idle[..n].iter().map(|(s, _)| s).sum::<u64>();
        while left > cap {
            left -= self.idle[n].0;
            n += 1;
        }
        self.idle_bytes = left;
        self.idle.drain(..n).map(|(_, s)| s).collect()
    }

    /// Takes every idle shell.
    fn drain(&mut self, out: &mut Vec<Shell<B>>) {
        out.extend(self.idle.drain(..).map(|(_, s)| s));
        self.idle_bytes = 0;
    }

    /// Takes every idle shell and every deferred one.
    fn empty_into(&mut self, idle: &mut Vec<Shell<B>>, deferred: &mut Deferred<B>) {
        self.drain(idle);
        deferred.append(&mut self.take_deferred());
    }

    /// Deferred shells held.
    fn deferred_count(&self) -> u64 {
        self.deferred.len() as u64
    }

    /// Gathers a shell of `size` bytes freed while its work was in flight.
    /// Returns the batch to file when it is full: the oldest half (the
    /// newest stay for in-order reuse).
    #[inline]
    pub(crate) fn defer(&mut self, size: u64, shell: Shell<B>) -> Option<Deferred<B>> {
        self.deferred.push((size, shell));
        self.deferred_bytes += size;
        (self.deferred.len() >= FRONT_DEFERRED).then(|| self.take_oldest_deferred())
    }

    /// Takes the oldest half of the deferred shells.
    #[inline(never)]
    fn take_oldest_deferred(&mut self) -> Deferred<B> {
        let n = self.deferred.len() / 2;
        let bytes = &mut self.deferred_bytes;
        self.deferred
            .drain(..n)
            .map(|(size, shell)| {
                *bytes -= size;
                shell
            })
            .collect()
    }

    /// What a miss gives back to the arena before it carves: every
    /// deferred shell and, for a large request, the idle shells over
    /// `over` bytes (large blocks, which no request takes from a front
    /// cache: see `FRONT_MAX`).
    #[inline(never)]
    pub(crate) fn take_for_miss(&mut self, over: Option<u64>) -> (Vec<Shell<B>>, Deferred<B>) {
        let mut idle = Vec::new();
        if let Some(over) = over {
            let mut i = 0;
            while i < self.idle.len() {
                if self.idle[i].0 > over {
                    let (size, shell) = self.idle.remove(i);
                    self.idle_bytes -= size;
                    idle.push(shell);
                } else {
                    i += 1;
                }
            }
        }
        (idle, self.take_deferred())
    }

    /// Takes the deferred shells, if any, for the caller to file.
    #[inline]
    pub(crate) fn take_deferred(&mut self) -> Deferred<B> {
        self.deferred_bytes = 0;
        self.deferred.drain(..).map(|(_, shell)| shell).collect()
    }

    /// In-order reuse from the slot: takes the oldest deferred shell of
    /// `lo..=hi` bytes whose only recorded use is on `queue`, counting a
    /// hit; returns it with that use's value (the buffer's reuse fence).
    /// The caller has checked that `queue` orders memory and that the
    /// policy reuses in order.
    #[inline(never)]
    pub(crate) fn take_in_order(
        &mut self,
        lo: u64,
        hi: u64,
        queue: QueueId,
    ) -> Option<(Shell<B>, u64)> {
        let (at, fence) = self
            .deferred
            .iter()
            .enumerate()
            .filter(|(_, (s, _))| lo <= *s && *s <= hi)
            .find_map(|(i, (_, shell))| {
                // SAFETY: S1: a shell in a slot has no handle and is the
                // allocator's; this section is the only one in the slot.
                let stamps = unsafe { shell.owned_stamps() };
                stamps
                    .single()
                    .filter(|st| st.queue == queue)
                    .map(|st| (i, st.value))
            })?;

        self.hits += 1;
        self.in_order_hits += 1;
        let (size, shell) = self.deferred.remove(at);
        self.deferred_bytes -= size;
        Some((shell, fence))
    }
}

impl<B: Backend> Fronts<B> {
    /// Slots for this machine: twice the hardware threads, a power of two
    /// from 4 to 64, owned if `biased` (`Config::biased_front_cache`) and
    /// the kernel offers asymmetric fences (never under loom, whose threads
    /// share std's thread-locals); and [`SHARED_SLOTS`] more, shared.
    pub(crate) fn new(enabled: bool, biased: bool, cache_limit: u64) -> Self {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
        let n = (2 * threads).next_power_of_two().clamp(4, 64);
        let biased = biased && !cfg!(inflight_loom) && asymmetric_fences();
        let owned = if biased { n } else { 0 };
        let fronts = Fronts {
            slots: (0..n + SHARED_SLOTS)
                .map(|i| Slot {
                    cell: Biased::new(
                        SlotState {
                            idle: Vec::with_capacity(FRONT_BLOCKS + 1),
                            idle_bytes: 0,
                            live: 0,
                            keepalive: None,
                            hits: 0,
                            frees: 0,
                            deferred: Vec::with_capacity(FRONT_DEFERRED),
                            deferred_bytes: 0,
                            in_order_hits: 0,
                        },
                        i < owned,
                    ),
                    remote_frees: AtomicU64::new(0),
                    claimed: std::sync::atomic::AtomicBool::new(false),
                })
                .collect(),
            owned,
            enabled,
            cap: AtomicU64::new(0),
            claimed: std::sync::atomic::AtomicUsize::new(0),
            closing: AtomicBool::new(false),
        };
        fronts.set_cache_limit(cache_limit);
        fronts
    }

    /// The calling thread's slot.
    #[inline]
    pub(crate) fn me(&self) -> Home {
        let shared = |i: usize| self.owned + i % (self.slots.len() - self.owned);
        let (slot, owned) = match THREAD_INDEX.try_with(|t| t.0) {
            Ok(i) if i < self.owned => (i, true),
            Ok(i) => (shared(i), false),
            // The thread is exiting and its index is gone.
            Err(_) => (shared(0), false),
        };
        Home {
            slot: slot as u32,
            owned,
            _not_send: PhantomData,
        }
    }

    /// Enters the calling thread's slot: as its owner without a lock, or
    /// under the slot's lock. Until the guard drops, take no lock and drop
    /// no buffer or shell.
    #[inline]
    pub(crate) fn enter(&self, home: Home) -> Section<'_, SlotState<B>> {
        let cell = &self.slots[home.slot as usize].cell;
        if home.owned {
            // SAFETY: `home` came from `me` on this thread (it is not
            // `Send`), and an owned slot's index is this thread's, unique
            // among live threads: this thread is the cell's only owner. The
            // callers keep the section free of locks and of buffer drops.
            unsafe { cell.enter_as_owner() }
        } else {
            Section::Locked(cell.lock())
        }
    }

    /// Uncounts a buffer homed at `slot` that a thread other than the
    /// slot's freed. Returns the slot's reference to the allocator if it
    /// goes now (K1); the caller drops it last.
    #[must_use]
    pub(crate) fn uncount_remote(&self, slot: u32) -> Option<Arc<Shared<B>>> {
        let s = &self.slots[slot as usize];
        let mut held = s.cell.lock_side();
        match held.get() {
            // Shared, or closed: counted exactly under the lock.
            Some(state) => state.remove_live(&self.closing),
            // The owner counts without a lock: this free waits in
            // `remote_frees` until the slot closes (nothing is decided on
            // the count before that).
            None => {
                s.remote_frees.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Bytes one slot may hold now.
    #[inline]
    pub(crate) fn cap(&self) -> u64 {
        self.cap.load(Ordering::Relaxed)
    }

    /// Bytes the calling thread's slot may hold now: its cap once claimed,
    /// else nothing.
    #[inline]
    pub(crate) fn cap_for(&self, home: Home) -> u64 {
        let claimed = &self.slots[home.slot as usize].claimed;
        if claimed.load(std::sync::atomic::Ordering::Acquire) {
            self.cap()
        } else {
            0
        }
    }

    /// Under the state lock: claims `home`'s share of the cache limit, if
    /// not yet claimed. `make_room` gets the new [`Fronts::reserve`], for
    /// the caller to lower the arena's releasable cap and trim to it; only then is
    /// the claim marked, so no thread (the owner, or a sharer of a shared
    /// slot) files an idle block in the slot before the room is made (I4).
    /// Claims are serialized by the state lock.
    pub(crate) fn claim(&self, home: Home, make_room: impl FnOnce(u64)) {
        let flag = &self.slots[home.slot as usize].claimed;
        if !self.enabled || flag.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        self.claimed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        make_room(self.reserve());
        flag.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Bytes the claimed slots together may hold: the arena gets the
    /// rest of the cache limit.
    pub(crate) fn reserve(&self) -> u64 {
        self.cap() * self.claimed.load(std::sync::atomic::Ordering::Relaxed) as u64
    }

    /// Sizes the slots for a new cache limit. The caller then drains them,
    /// so that none holds more than the new cap.
    pub(crate) fn set_cache_limit(&self, cache_limit: u64) {
        let cap = if self.enabled {
            cache_limit / FRONT_SHARE / self.slots.len() as u64
        } else {
            0
        };
        self.cap.store(cap, Ordering::Relaxed);
    }

    /// Whether the last `Allocator` handle is gone.
    pub(crate) fn closing(&self) -> &AtomicBool {
        &self.closing
    }

    /// Every slot, the owners shut out (one heavy fence for all).
    pub(crate) fn each(&self, mut f: impl FnMut(&mut SlotState<B>)) {
        for mut held in Biased::lock_all(self.slots.iter().map(|s| &s.cell)) {
            f(&mut held);
        }
    }

    /// Runs `f` on every slot, then sums the slots' figures (one visit).
    pub(crate) fn totals(&self, mut f: impl FnMut(&mut SlotState<B>)) -> SlotTotals {
        let mut t = SlotTotals::default();
        self.each(|s| {
            f(s);
            t.idle_bytes += s.idle_bytes;
            t.idle_count += s.idle_count();
            t.deferred_bytes += s.deferred_bytes;
            t.deferred_count += s.deferred_count();
            t.frees += s.frees;
            t.hits += s.hits;
            t.in_order_hits += s.in_order_hits;
        });
        t
    }

    /// Takes every idle shell and every deferred one from every slot.
    pub(crate) fn drain_all(&self) -> (Vec<Shell<B>>, Deferred<B>) {
        let (mut idle, mut deferred) = (Vec::new(), Vec::new());
        self.each(|s| s.empty_into(&mut idle, &mut deferred));
        (idle, deferred)
    }

    /// At the last `Allocator` handle's drop: marks the allocator closing,
    /// closes every slot for good (each access then takes its lock, so
    /// counts are exact), folds remote frees into the live counts, and
    /// returns the references of slots with no live buffer, for the caller
    /// to drop (slots with live buffers let theirs go at their last free).
    #[must_use]
    pub(crate) fn close(&self) -> Vec<Arc<Shared<B>>> {
        self.closing.store(true, Ordering::SeqCst);
        let mut refs = Vec::new();
        for (slot, mut held) in self
            .slots
            .iter()
            .zip(Biased::lock_all(self.slots.iter().map(|s| &s.cell)))
        {
            held.close_for_good();
            let s = held.get().expect("shut out");
            s.live -= slot.remote_frees.swap(0, Ordering::Relaxed);
            if s.live == 0 {
                refs.extend(s.keepalive.take());
            }
        }
        refs
    }

    /// With exclusive access (teardown): every idle shell and every
    /// deferred one.
    pub(crate) fn drain_exclusive(&mut self) -> (Vec<Shell<B>>, Deferred<B>) {
        let (mut idle, mut deferred) = (Vec::new(), Vec::new());
        for slot in self.slots.iter_mut() {
            slot.cell.get_mut().empty_into(&mut idle, &mut deferred);
        }
        (idle, deferred)
    }
}
