//! A biased lock: a cell that one *owner* thread enters with plain loads
//! and stores (no atomic read-modify-write, no fence instruction), and that
//! other threads enter by revoking the owner's bias for a moment.
//!
//! The front caches' slots are such cells (see `front.rs`): a thread's own
//! slot serves its cache hits and idle frees, and other threads come by only
//! to trim, clear, read statistics or close. Where an uncontended atomic
//! read-modify-write is dear (the Intel CPUs of the GPU machines), the two
//! lock acquisitions of an allocate/free pair were about half of its cost
//! (docs/BENCHMARKS.md, *The biased slot lock*).
//!
//! # Protocol
//!
//! A Dekker pair made asymmetric: the owner's side pays a compiler fence,
//! the other side a process-wide barrier (Linux `membarrier`, private
//! expedited), which runs a full fence on every CPU running this process.
//!
//! - owner: `busy = true`; light fence; if `mode == OPEN`: work, then
//!   `busy = false` (Release); else `busy = false` and take the spin lock.
//! - other: take the spin lock; if `mode == OPEN`: `mode = REVOKED`, heavy
//!   fence, wait until `busy == false` (Acquire); work; `mode = OPEN`
//!   (Release); give the lock back.
//!
//! The two fences act as one `SeqCst` fence on each side: either the owner
//! reads `REVOKED` (and waits for the lock), or the other thread reads the
//! owner's `busy` and waits for its section to end. The Release/Acquire
//! pairs on `busy` and `mode` carry each side's writes to the other.
//! `CLOSED` is `REVOKED` for good: every access then takes the lock.
//!
//! Where `membarrier` is missing (not Linux, an old kernel, a sandbox that
//! filters it), cells are made closed: a plain spin lock. Under loom both
//! fences are `SeqCst` fences, which loom models, and `biased_cell_*` below
//! check the protocol.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};

use crate::sync::{fence, spin_wait, AtomicBool, AtomicU8, Ordering};

/// The owner may enter without the lock.
const OPEN: u8 = 0;
/// Another thread holds the lock and the cell: the owner takes the lock.
const REVOKED: u8 = 1;
/// Every access takes the lock, for good.
const CLOSED: u8 = 2;

/// See the module documentation.
pub(crate) struct Biased<T> {
    locked: AtomicBool,
    /// The owner is inside an unlocked section.
    busy: AtomicBool,
    mode: AtomicU8,
    value: UnsafeCell<T>,
}

// SAFETY: `value` is reached by the owner inside a section the protocol
// makes exclusive, or through a `Held` that holds the lock with the owner
// revoked or closed out, or through `&mut self`; `T: Send` is what handing
// it between threads needs.
unsafe impl<T: Send> Sync for Biased<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Biased<T> {}

/// The lock of a [`Biased`] cell, held. Gives the value when the owner is
/// shut out ([`Held::get`]); else only the lock (see [`Biased::lock_side`]).
pub(crate) struct Held<'a, T> {
    cell: &'a Biased<T>,
    /// This holder revoked the bias, and restores it when dropped.
    revoked: bool,
    /// The owner is shut out (revoked or closed).
    whole: bool,
}

impl<T> Biased<T> {
    /// A cell its owner may enter without the lock if `biased` (which the
    /// caller sets only where [`asymmetric_fences`] is true), else closed.
    pub(crate) fn new(value: T, biased: bool) -> Self {
        Biased {
            locked: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            mode: AtomicU8::new(if biased { OPEN } else { CLOSED }),
            value: UnsafeCell::new(value),
        }
    }

    /// Enters the cell as its owner: without the lock while the bias
    /// stands, else under the lock. The section ends when the guard drops.
    ///
    /// # Safety
    ///
    /// Only one thread, the owner, enters a cell this way at a time (the
    /// front caches' thread indices are unique among live threads, and a
    /// cell's owner is the thread holding its index); and nothing inside
    /// the section takes a lock or enters another section of this cell.
    #[inline]
    pub(crate) unsafe fn enter_as_owner(&self) -> Section<'_, T> {
        self.busy.store(true, Ordering::Relaxed);
        light_fence();
        if self.mode.load(Ordering::Acquire) == OPEN {
            return Section::Owner(self);
        }
        self.busy.store(false, Ordering::Release);
        self.enter_locked()
    }

    /// `enter_as_owner` with the bias revoked or closed.
    #[cold]
    fn enter_locked(&self) -> Section<'_, T> {
        let mut held = self.acquire();
        held.whole = true; // revoked or closed: the holder has it all
        Section::Locked(held)
    }

    /// Takes the lock, shutting the owner out: the value is the holder's
    /// until the guard drops. Costs a heavy fence when the bias stood.
    pub(crate) fn lock(&self) -> Held<'_, T> {
        let mut held = self.acquire();
        if self.mode.load(Ordering::Relaxed) == OPEN {
            self.mode.store(REVOKED, Ordering::Relaxed);
            heavy_fence();
            self.wait_idle();
            held.revoked = true;
        }
        held.whole = true;
        held
    }

    /// Takes the lock without revoking: the holder gets the value only if
    /// the cell is closed, and otherwise excludes other lock holders alone.
    pub(crate) fn lock_side(&self) -> Held<'_, T> {
        let mut held = self.acquire();
        held.whole = self.mode.load(Ordering::Relaxed) == CLOSED;
        held
    }

    /// Locks every cell, shutting their owners out, with one heavy fence
    /// for all (the guards are in the cells' order; lock them in no other
    /// order elsewhere while holding one).
    pub(crate) fn lock_all<'a>(cells: impl Iterator<Item = &'a Self>) -> Vec<Held<'a, T>>
    where
        T: 'a,
    {
        let mut held: Vec<Held<'a, T>> = cells.map(|c| c.acquire()).collect();
        let mut any = false;
        for h in &mut held {
            if h.cell.mode.load(Ordering::Relaxed) == OPEN {
                h.cell.mode.store(REVOKED, Ordering::Relaxed);
                h.revoked = true;
                any = true;
            }
            h.whole = true;
        }
        if any {
            heavy_fence();
            for h in &held {
                if h.revoked {
                    h.cell.wait_idle();
                }
            }
        }
        held
    }

    /// With exclusive access.
    pub(crate) fn get_mut(&mut self) -> &mut T {
        self.value.get_mut()
    }

    /// The spin lock alone.
    fn acquire(&self) -> Held<'_, T> {
        let mut turns = 0;
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while self.locked.load(Ordering::Relaxed) {
                spin_wait(&mut turns);
            }
        }
        Held {
            cell: self,
            revoked: false,
            whole: false,
        }
    }

    /// Waits for the owner's section to end (after revoking).
    fn wait_idle(&self) {
        let mut turns = 0;
        while self.busy.load(Ordering::Acquire) {
            spin_wait(&mut turns);
        }
    }
}

/// An owner's section of a [`Biased`] cell (see [`Biased::enter_as_owner`]).
pub(crate) enum Section<'a, T> {
    /// Unlocked: the bias stands and `busy` is set.
    Owner(&'a Biased<T>),
    /// Under the lock, the bias revoked or closed.
    Locked(Held<'a, T>),
}

impl<T> Deref for Section<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        match self {
            // SAFETY: the protocol (module documentation): with the bias
            // standing and `busy` set no other thread enters, and the
            // caller of `enter_as_owner` is the only owner.
            Section::Owner(cell) => unsafe { &*cell.value.get() },
            Section::Locked(held) => held,
        }
    }
}

impl<T> DerefMut for Section<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        match self {
            // SAFETY: as in `deref`; `&mut self` makes the access unique.
            Section::Owner(cell) => unsafe { &mut *cell.value.get() },
            Section::Locked(held) => held,
        }
    }
}

impl<T> Drop for Section<'_, T> {
    #[inline]
    fn drop(&mut self) {
        if let Section::Owner(cell) = self {
            // Carries the section's writes to the next revoker.
            cell.busy.store(false, Ordering::Release);
        }
    }
}

impl<T> Held<'_, T> {
    /// Closes the held cell for good: every later access takes the lock.
    /// The holder must have shut the owner out ([`Biased::lock`],
    /// [`Biased::lock_all`]).
    pub(crate) fn close_for_good(&mut self) {
        assert!(self.whole, "the owner is not shut out");
        self.cell.mode.store(CLOSED, Ordering::Relaxed);
        self.revoked = false;
    }

    /// The value, if this holder has shut the owner out.
    pub(crate) fn get(&mut self) -> Option<&mut T> {
        // SAFETY: `whole`: the lock is held and the owner is revoked (and
        // out of its section) or closed out: no one else reaches the value.
        self.whole.then(|| unsafe { &mut *self.cell.value.get() })
    }
}

impl<T> Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        assert!(self.whole, "the owner is not shut out");
        // SAFETY: as in `get`.
        unsafe { &*self.cell.value.get() }
    }
}

impl<T> DerefMut for Held<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.get().expect("the owner is not shut out")
    }
}

impl<T> Drop for Held<'_, T> {
    fn drop(&mut self) {
        if self.revoked {
            // Carries this holder's writes to the owner's next section.
            self.cell.mode.store(OPEN, Ordering::Release);
        }
        self.cell.locked.store(false, Ordering::Release);
    }
}

/// Whether the heavy fence is available, so that cells may be biased.
pub(crate) fn asymmetric_fences() -> bool {
    #[cfg(inflight_loom)]
    {
        true
    }
    #[cfg(all(not(inflight_loom), target_os = "linux"))]
    {
        static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *REGISTERED.get_or_init(membarrier::register)
    }
    #[cfg(all(not(inflight_loom), not(target_os = "linux")))]
    {
        false
    }
}

/// The owner's side: keeps the compiler from moving its `busy` store past
/// its `mode` load; the heavy fence does the CPU's part.
#[inline(always)]
fn light_fence() {
    #[cfg(inflight_loom)]
    fence(Ordering::SeqCst);
    #[cfg(not(inflight_loom))]
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
}

/// The other side: a full fence on every CPU running this process.
fn heavy_fence() {
    #[cfg(inflight_loom)]
    fence(Ordering::SeqCst);
    #[cfg(all(not(inflight_loom), target_os = "linux"))]
    {
        fence(Ordering::SeqCst);
        membarrier::private_expedited();
    }
    #[cfg(all(not(inflight_loom), not(target_os = "linux")))]
    {
        // Cells are never biased here (`asymmetric_fences` is false).
        fence(Ordering::SeqCst);
    }
}

#[cfg(all(not(inflight_loom), target_os = "linux"))]
mod membarrier {
    use std::os::raw::c_int;

    const QUERY: c_int = 0;
    const PRIVATE_EXPEDITED: c_int = 1 << 3;
    const REGISTER_PRIVATE_EXPEDITED: c_int = 1 << 4;

    fn call(cmd: c_int) -> i64 {
        // SAFETY: membarrier(2) takes a command and flags (0) and touches
        // no memory of ours.
        unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as c_int, 0 as c_int) as i64 }
    }

    /// Registers the process for private expedited barriers; false if the
    /// kernel (or a sandbox) does not offer them.
    pub(super) fn register() -> bool {
        let offered = call(QUERY);
        let needed = i64::from(PRIVATE_EXPEDITED | REGISTER_PRIVATE_EXPEDITED);
        offered >= 0 && offered & needed == needed && call(REGISTER_PRIVATE_EXPEDITED) == 0
    }

    /// The barrier. It cannot fail once registered, except in a process
    /// forked from the one that registered (the kernel keeps registrations
    /// per address space), which registers again. If it still failed, a
    /// biased cell could be entered twice, so the process stops instead.
    pub(super) fn private_expedited() {
        if call(PRIVATE_EXPEDITED) == 0 {
            return;
        }
        if call(REGISTER_PRIVATE_EXPEDITED) != 0 || call(PRIVATE_EXPEDITED) != 0 {
            eprintln!(
                "inflight: membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) failed after registration: {}",
                std::io::Error::last_os_error()
            );
            std::process::abort();
        }
    }
}

#[cfg(all(test, inflight_loom))]
mod tests {
    use super::*;
    /// A cell whose every access loom checks for a data race.
    type TrackedCell<V> = loom::cell::UnsafeCell<V>;
    use loom::sync::Arc;

    use crate::sync::loom_model as model;

    fn add(v: &TrackedCell<u32>, n: u32) {
        // SAFETY: a plain write; loom reports it if it is not ordered after
        // every other access to the cell (a data race).
        v.with_mut(|p| unsafe { *p += n });
    }

    fn read(v: &TrackedCell<u32>) -> u32 {
        // SAFETY: as in `add`.
        v.with(|p| unsafe { *p })
    }

    /// The owner's unlocked sections and another thread's revoking lock
    /// never overlap, and each sees the other's writes (loom checks every
    /// access to the tracked cell for a race).
    #[test]
    fn biased_cell_owner_and_revoker_never_overlap() {
        model("biased_cell_owner_and_revoker_never_overlap", || {
            let cell = Arc::new(Biased::new(TrackedCell::new(0u32), true));
            let other = {
                let cell = cell.clone();
                loom::thread::spawn(move || add(&cell.lock(), 10))
            };
            for _ in 0..2 {
                // SAFETY: this thread is the cell's only owner.
                add(&*unsafe { cell.enter_as_owner() }, 1);
            }
            other.join().unwrap();
            assert_eq!(read(&cell.lock()), 12);
        });
    }

    /// After `close_for_good`, the owner takes the lock for good.
    #[test]
    fn biased_cell_close_shuts_the_owner_out_for_good() {
        model("biased_cell_close_shuts_the_owner_out_for_good", || {
            let cell = Arc::new(Biased::new(TrackedCell::new(0u32), true));
            let closer = {
                let cell = cell.clone();
                loom::thread::spawn(move || {
                    let mut held = cell.lock();
                    held.close_for_good();
                    add(&held, 10);
                })
            };
            // SAFETY: this thread is the cell's only owner.
            add(&*unsafe { cell.enter_as_owner() }, 1);
            closer.join().unwrap();
            // SAFETY: as above.
            add(&*unsafe { cell.enter_as_owner() }, 1);
            assert!(cell.lock_side().get().is_some(), "closed for good");
            assert_eq!(read(&cell.lock()), 12);
        });
    }

    /// Two other threads (a side lock and a revoking lock) and the owner.
    #[test]
    fn biased_cell_side_locks_exclude_each_other_not_the_owner() {
        model(
            "biased_cell_side_locks_exclude_each_other_not_the_owner",
            || {
                let cell = Arc::new(Biased::new(TrackedCell::new(0u32), true));
                let side = Arc::new(TrackedCell::new(0u32));
                let t = {
                    let (cell, side) = (cell.clone(), side.clone());
                    loom::thread::spawn(move || {
                        let held = cell.lock_side();
                        add(&side, 1);
                        drop(held);
                    })
                };
                {
                    let mut held = cell.lock();
                    add(held.get().expect("revoked"), 5);
                    add(&side, 1); // under the same lock as the side holder
                }
                t.join().unwrap();
                assert_eq!(read(&side), 2);
            },
        );
    }
}
