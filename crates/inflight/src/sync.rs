//! The synchronisation primitives the core uses, swapped for loom's under
//! `--cfg inflight_loom` so that the model checker explores every
//! interleaving of the allocator's shared state (see `tests/loom.rs` and
//! `scripts/loom.sh`).
//!
//! Normally: `parking_lot`'s mutex and std's atomics, re-exported as they
//! are (no cost). Under loom: loom's atomics and fence, and a [`Mutex`] that
//! offers the few parking_lot calls the core makes (`lock` without
//! poisoning, `data_ptr`, and `MutexGuard::unlocked`) over a
//! loom mutex guarding a plain cell. Loom then sees every lock, unlock and
//! atomic access as a scheduling point and models their happens-before
//! edges; it does not check the cell's accesses for data races themselves
//! (the lock's edges order them).
//!
//! Not swapped, hence not explored: `Arc` reference counts, the queue
//! registry's `OnceLock` (queues are created before model threads start),
//! the buffer shell's `UnsafeCell` (its ownership rule S1 is ordered by the
//! `handles` atomic, which is swapped), and the process-wide allocator id.

#[cfg(not(inflight_loom))]
pub(crate) use parking_lot::{Mutex, MutexGuard};
#[cfg(not(inflight_loom))]
pub(crate) use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};

#[cfg(inflight_loom)]
pub(crate) use self::model::{Mutex, MutexGuard};
#[cfg(inflight_loom)]
pub(crate) use loom::sync::atomic::{
    fence, AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

/// One turn of a spin-wait that found a lock taken: a CPU hint for the
/// first few turns, then the scheduler (the holder may have been preempted).
/// Under loom, always a yield, so the model switches to the holder.
#[inline]
pub(crate) fn spin_wait(turns: &mut u32) {
    #[cfg(inflight_loom)]
    {
        let _ = turns;
        loom::thread::yield_now();
    }
    #[cfg(not(inflight_loom))]
    {
        *turns += 1;
        if *turns < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// Turns [`lock_spinning`] spins before it parks.
#[cfg(not(inflight_loom))]
const LOCK_SPIN_TURNS: u32 = 128;

/// Takes `m`, spinning a while before parking. For locks whose sections
/// are short (the allocator's state lock: no backend call is made under
/// it): a waiter that parks pays a sleep and a wake-up, tens of µs, for a
/// lock that would have been free in one. It reads the lock before trying
/// it, so that waiters do not fight over its cache line. Under loom, a
/// plain `lock`.
#[inline]
pub(crate) fn lock_spinning<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    #[cfg(not(inflight_loom))]
    {
        let mut turns = 0;
        while turns < LOCK_SPIN_TURNS {
            if !m.is_locked() {
                if let Some(g) = m.try_lock() {
                    return g;
                }
            }
            spin_wait(&mut turns);
        }
    }
    m.lock()
}

/// Runs `f` under loom and prints how many interleavings it explored (the
/// unit models' runner).
#[cfg(all(test, inflight_loom))]
pub(crate) fn loom_model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r = runs.clone();
    loom::model(move || {
        r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    let n = runs.load(std::sync::atomic::Ordering::Relaxed);
    println!("loom: {name}: {n} interleavings explored");
}

#[cfg(inflight_loom)]
mod model {
    use std::cell::UnsafeCell;
    use std::ops::{Deref, DerefMut};

    /// A loom mutex over a plain cell, with parking_lot's surface.
    pub(crate) struct Mutex<T> {
        lock: loom::sync::Mutex<()>,
        value: UnsafeCell<T>,
    }

    // SAFETY: `value` is only reached through a guard of `lock` (or through
    // `&mut self`, or `data_ptr` under the caller's own exclusion), as with
    // any mutex; `T: Send` is what moving it between threads needs.
    unsafe impl<T: Send> Sync for Mutex<T> {}
    // SAFETY: as above.
    unsafe impl<T: Send> Send for Mutex<T> {}

    /// A held [`Mutex`].
    pub(crate) struct MutexGuard<'a, T> {
        mutex: &'a Mutex<T>,
        held: Option<loom::sync::MutexGuard<'a, ()>>,
    }

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Mutex {
                lock: loom::sync::Mutex::new(()),
                value: UnsafeCell::new(value),
            }
        }

        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard {
                mutex: self,
                held: Some(self.lock.lock().unwrap_or_else(|e| e.into_inner())),
            }
        }

        pub(crate) fn data_ptr(&self) -> *mut T {
            self.value.get()
        }
    }

    impl<T: Default> Default for Mutex<T> {
        fn default() -> Self {
            Mutex::new(T::default())
        }
    }

    impl<'a, T> MutexGuard<'a, T> {
        /// Releases the lock while `f` runs, then takes it again.
        pub(crate) fn unlocked<R>(this: &mut Self, f: impl FnOnce() -> R) -> R {
            this.held = None;
            let r = f();
            this.held = Some(this.mutex.lock.lock().unwrap_or_else(|e| e.into_inner()));
            r
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            // SAFETY: the guard holds the lock (it is only `None` inside
            // `unlocked`, which holds `&mut self`).
            unsafe { &*self.mutex.value.get() }
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            // SAFETY: as in `deref`, and `&mut self` makes it unique.
            unsafe { &mut *self.mutex.value.get() }
        }
    }
}
