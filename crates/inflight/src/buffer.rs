//! The buffer handle: a reference-counted view of one live block, whose heap
//! shell is recycled so that a cache hit allocates nothing on the host.
//!
//! A [`Buffer`] is an `Arc<BufferInner>` plus one count in `handles`.
//! Cloning adds a handle; dropping the last handle frees the block. An idle
//! block stays in its shell, parked in a per-thread front cache (see
//! `front.rs`) from which the next allocation of its size takes it whole;
//! otherwise the block goes to the allocator's lists and the empty shell to
//! its spare pool, from which the next allocation takes it.
//!
//! A buffer reaches its allocator through a plain pointer: its home slot
//! (the front-cache slot of the thread that allocated it) counts it and holds
//! a strong reference while it lives (rule K1 in `front.rs`).
//!
//! # Ownership rule (S1)
//!
//! The fields in `BufferInner::live` are written only by the shell's sole
//! owner: the allocator while `handles == 0` (filling a shell at malloc,
//! emptying it at the last drop). They are read only through a live handle
//! (`handles > 0`). An `Arc` clone left over from a handle that has already
//! decremented `handles` may still exist for a moment, but it never reads
//! those fields: it only gives its strong count back.
//!
//! # Rebinding rule (S2)
//!
//! One exception, the block itself (`Live::held`: raw buffer, size, id): a
//! buffer reused in order on one queue and then bound first on another
//! before its previous owner's work there completed may be given another
//! block (a ready one, or one in flight on the queue it is being bound on)
//! instead of waiting for that work (`Shared::rebind`), if no one has seen
//! its block yet. `BufferInner::pin` says whether anyone has:
//! every read of `held` through a handle first sets it to `PINNED` (raw
//! buffer, id, capacity, the recording of any command), and the one write
//! while live is made by the thread that moved it from `UNPINNED` to
//! `REBINDING`, which stores `PINNED` with Release when done. Readers meet
//! a rebinding in progress by spinning until it ends; after it, nothing
//! writes `held` while the buffer lives. The owner (handles == 0) resets
//! `pin` to `UNPINNED` before publishing a new handle.

use std::cell::UnsafeCell;
use std::mem::ManuallyDrop;
use std::sync::Arc;

use crate::allocator::Shared;
use crate::backend::{Backend, Span};
use crate::block::Block;
use crate::sync::{
    fence, spin_wait, AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Mutex, Ordering,
};
use crate::timeline::{QueueId, Stamp, Stamps};

/// A device buffer from the cache. Clones share it; dropping the last clone
/// frees it into the cache (pending if submitted work still uses it).
pub struct Buffer<B: Backend> {
    // Taken (not dropped) by the last handle's `drop`, to recycle the shell.
    pub(crate) inner: ManuallyDrop<Arc<BufferInner<B>>>,
}

/// The shared part of a buffer; an empty one is a *shell* (see the module doc).
///
/// Aligned to 128 bytes (two cache lines, the unit adjacent-line prefetch
/// pulls in): shells made by one thread sit side by side on the heap and then
/// serve different threads, and every allocate/free pair writes its shell,
/// so without the padding two threads' pairs could keep stealing one cache
/// line from each other.
#[repr(align(128))]
pub(crate) struct BufferInner<B: Backend> {
    /// Live handles; 0 for a shell.
    handles: AtomicUsize,
    /// Written only by the sole owner (S1).
    live: UnsafeCell<Live<B>>,
    /// The last recorded use on each queue; written at commit.
    pub(crate) stamps: Mutex<Stamps>,
    /// Set when the block was reused before its previous owner's work on
    /// one queue completed (the in-order reuse rule): that work's stamp,
    /// packed by [`pack_fence`]; 0 for none. Work on any other queue must
    /// wait for it first (I2).
    pub(crate) reuse_fence: AtomicU64,
    /// Under [`crate::Config::scrub`]: a recycled block not yet zeroed for
    /// its new owner. Set at malloc, taken by the first binding, which
    /// records the fill (and sets it again if that command buffer is never
    /// submitted).
    pub(crate) needs_scrub: AtomicBool,
    /// Whether the block in `live.held` may still be replaced (rule S2):
    /// [`UNPINNED`], [`REBINDING`] or [`PINNED`].
    pub(crate) pin: AtomicU8,
}

/// Timeline values a reuse fence can hold (below the queue's byte).
const FENCE_VALUE_BITS: u32 = 56;

/// A reuse fence in one word, so that it is read and replaced whole: the
/// queue plus one in the top byte, the value below it.
#[inline]
pub(crate) fn pack_fence(s: Stamp) -> u64 {
    debug_assert!(s.value < 1 << FENCE_VALUE_BITS && (s.queue as u64) < 255);
    (u64::from(s.queue) + 1) << FENCE_VALUE_BITS | s.value
}

/// The stamp a reuse fence word holds, if any (see [`pack_fence`]).
#[inline]
pub(crate) fn unpack_fence(word: u64) -> Option<Stamp> {
    (word != 0).then(|| Stamp {
        queue: (word >> FENCE_VALUE_BITS) as QueueId - 1,
        value: word & ((1 << FENCE_VALUE_BITS) - 1),
    })
}

/// `BufferInner::pin`: nobody has seen the block; it may be replaced.
pub(crate) const UNPINNED: u8 = 0;
/// `BufferInner::pin`: a thread is replacing the block (S2).
pub(crate) const REBINDING: u8 = 1;
/// `BufferInner::pin`: the block was seen; it stays until the last drop.
pub(crate) const PINNED: u8 = 2;

/// What a live buffer is. In an empty shell `held.raw` is `None`; in a
/// filled idle one (in a front cache) only `len` and `queue` are stale.
pub(crate) struct Live<B: Backend> {
    /// The allocator, kept alive by the home slot (K1); null in a new shell.
    pub(crate) shared: *const Shared<B>,
    pub(crate) len: u64,
    pub(crate) queue: QueueId,
    /// The front-cache slot that counts this buffer.
    pub(crate) home: u32,
    /// The block, in a cell of its own: it may be replaced once while the
    /// buffer lives (rule S2), while readers hold `&Live`.
    pub(crate) held: UnsafeCell<Held<B>>,
}

/// The block a buffer holds (see [`Live::held`]).
pub(crate) struct Held<B: Backend> {
    /// Its segment's raw buffer (shared with the segment's other blocks).
    pub(crate) raw: Option<Arc<B::Buffer>>,
    pub(crate) offset: u64,
    /// Its node in the arena.
    pub(crate) node: crate::arena::NodeId,
    pub(crate) size: u64,
    pub(crate) id: u64,
}

/// An empty `BufferInner`, owned by the allocator (S1).
pub(crate) type Shell<B> = Arc<BufferInner<B>>;

// SAFETY: `live` is an `UnsafeCell` accessed under rule S1: written only by
// the one owner while no handle exists, read only while handles exist, with
// the `handles` counter (Release decrement, Acquire load or fence) and the
// state and slot locks ordering those accesses across threads; its `held`
// cell may also be written once while live, under rule S2, ordered by the
// `pin` atomic (Acquire to take it, Release to hand it on). Everything
// else in it is `Sync` (atomics, a mutex). The raw buffer and the `Shared`
// the pointer reaches are `Send + Sync` by the `Backend` trait's bounds.
unsafe impl<B: Backend> Sync for BufferInner<B> {}
// SAFETY: as above; moving the shell between threads moves `Send` fields.
unsafe impl<B: Backend> Send for BufferInner<B> {}

impl<B: Backend> BufferInner<B> {
    /// A new empty shell.
    pub(crate) fn shell() -> Shell<B> {
        Arc::new(BufferInner {
            handles: AtomicUsize::new(0),
            live: UnsafeCell::new(Live {
                shared: std::ptr::null(),
                len: 0,
                queue: 0,
                home: 0,
                held: UnsafeCell::new(Held {
                    raw: None,
                    offset: 0,
                    node: 0,
                    size: 0,
                    id: 0,
                }),
            }),
            stamps: Mutex::new(Stamps::default()),
            reuse_fence: AtomicU64::new(0),
            needs_scrub: AtomicBool::new(false),
            pin: AtomicU8::new(UNPINNED),
        })
    }
}

impl<B: Backend> Buffer<B> {
    /// Fills `shell` with `block` and makes it a live buffer of one handle,
    /// counted by slot `home`.
    pub(crate) fn adopt(
        shell: Shell<B>,
        shared: &Arc<Shared<B>>,
        block: Block<B::Buffer>,
        len: u64,
        queue: QueueId,
        fence_value: u64,
        home: u32,
    ) -> Self {
        debug_assert_eq!(
            shell.handles.load(Ordering::Relaxed),
            0,
            "adopting a live shell"
        );
        // SAFETY: S1: `shell` came from the spare pool or was just created,
        // so `handles == 0` and the caller is its only owner; no handle can
        // read `live` or `stamps` until we publish one below.
        unsafe {
            *shell.live.get() = Live {
                shared: Arc::as_ptr(shared),
                len,
                queue,
                home,
                held: UnsafeCell::new(Held {
                    raw: Some(block.raw),
                    offset: block.offset,
                    node: block.node,
                    size: block.size,
                    id: block.id,
                }),
            };
            *shell.stamps.data_ptr() = block.stamps;
        }
        shell.reuse_fence.store(fence_value, Ordering::Relaxed);
        shell.needs_scrub.store(false, Ordering::Relaxed);
        shell.pin.store(UNPINNED, Ordering::Relaxed);
        shell.handles.store(1, Ordering::Release);
        Buffer {
            inner: ManuallyDrop::new(shell),
        }
    }

    /// Makes a filled shell from a front cache a live buffer again, counted
    /// by slot `home` (the shell may have been freed into this slot by a
    /// buffer of another): an idle one (its uses all complete, its stamps
    /// cleared, `fence` 0), or a deferred one reused in order on `queue`
    /// (its stamps kept; `fence` the value of its use there, I2).
    #[inline]
    pub(crate) fn reissue(
        shell: Shell<B>,
        len: u64,
        queue: QueueId,
        scrub: bool,
        home: u32,
        fence: u64,
    ) -> Self {
        debug_assert_eq!(shell.handles.load(Ordering::Relaxed), 0);
        // SAFETY: S1: the shell came out of a slot, whose lock made the
        // caller its only owner.
        unsafe {
            let live = &mut *shell.live.get();
            debug_assert!(live.held.get_mut().raw.is_some() && !live.shared.is_null());
            live.len = len;
            live.queue = queue;
            live.home = home;
        }
        shell.reuse_fence.store(fence, Ordering::Relaxed);
        shell.pin.store(UNPINNED, Ordering::Relaxed);
        // Zeroed at its first binding (see `Config::scrub`).
        shell.needs_scrub.store(scrub, Ordering::Relaxed);
        shell.handles.store(1, Ordering::Release);
        Buffer {
            inner: ManuallyDrop::new(shell),
        }
    }

    #[inline]
    pub(crate) fn live(&self) -> &Live<B> {
        // SAFETY: S1: this handle keeps `handles > 0`, so nobody writes `live`.
        unsafe { &*self.inner.live.get() }
    }

    /// The block, pinned: it stays this buffer's until the last drop (S2).
    #[inline]
    pub(crate) fn held(&self) -> &Held<B> {
        // SAFETY: S2: `pinned` returns once `pin` is PINNED (seen with
        // Acquire, after any rebinding thread's Release), so nobody writes
        // `held` while this handle keeps the buffer live.
        unsafe { &*self.inner.pinned() }
    }

    /// The allocator this buffer belongs to.
    #[inline]
    pub(crate) fn shared(&self) -> &Shared<B> {
        // SAFETY: K1: this live buffer is counted by its home slot, which
        // holds a strong reference to the allocator while it does.
        unsafe { &*self.live().shared }
    }

    /// Bytes requested.
    pub fn len(&self) -> u64 {
        self.live().len
    }

    /// Always false: zero-sized buffers are refused at allocation.
    pub fn is_empty(&self) -> bool {
        self.live().len == 0
    }

    /// Bytes of the underlying block (the rounded request, or a larger cached
    /// block chosen by best fit).
    pub fn capacity(&self) -> u64 {
        self.held().size
    }

    /// The id of the device allocation behind it (stable across reuse).
    ///
    /// A buffer's block is fixed once anything has seen it: this call, its
    /// raw buffer, its capacity, or recording it into a command buffer.
    /// Before that, a buffer reused ahead of its previous owner's work and
    /// then first bound on another queue may be given a ready block instead
    /// of waiting for that work (see [`crate::ReuseWait`]).
    pub fn block_id(&self) -> u64 {
        self.held().id
    }

    /// The queue it was allocated for.
    pub fn queue_id(&self) -> QueueId {
        self.live().queue
    }

    /// The raw backend buffer (fixed from now on: see [`Buffer::block_id`]).
    pub fn raw(&self) -> &B::Buffer {
        self.held()
            .raw
            .as_deref()
            .expect("a live buffer has its raw buffer")
    }

    /// Where the buffer starts in its raw buffer (fixed from now on: see
    /// [`Buffer::block_id`]).
    pub fn offset(&self) -> u64 {
        self.held().offset
    }

    /// The whole buffer as a span, rounded down to whole words. Empty for a
    /// buffer of under 4 bytes: whole-buffer operations on it return
    /// [`crate::Error::InvalidSpan`].
    pub fn span(&self) -> Span {
        Span::prefix(self.live().len & !3)
    }

    /// The last recorded use on each queue that used it: one stamp a
    /// queue, (queue, timeline value of the submission).
    pub fn stamps(&self) -> Vec<Stamp> {
        self.inner.stamps.lock().iter().copied().collect()
    }

    /// Declares a use of the buffer on `queue` by work the program records
    /// on that queue's native stream itself (PyTorch's `record_stream`):
    /// at the buffer's free the use is fixed as `queue`'s next submission,
    /// and the block is neither reused by another queue nor released until
    /// that completes (see [`crate::Allocator::adopt_queue`]). Work recorded
    /// through command buffers is stamped at commit and needs no
    /// declaration. The program must order that work after the buffer's
    /// allocation on its own queue (its first use there), as any use of a
    /// stream-ordered allocation on another stream must be.
    pub fn record_stream(&self, queue: &crate::Queue<B>) -> crate::Result<()> {
        if !std::ptr::eq(Arc::as_ptr(&queue.shared), self.shared()) {
            return Err(crate::Error::ForeignQueue);
        }
        self.inner
            .stamps
            .lock()
            .record(queue.id(), crate::timeline::AT_FREE);
        Ok(())
    }

    /// Whether two handles are the same buffer.
    pub fn same(&self, other: &Buffer<B>) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl<B: Backend> Clone for Buffer<B> {
    fn clone(&self) -> Self {
        // Relaxed, as `Arc::clone`: the new handle is made from a live one.
        self.inner.handles.fetch_add(1, Ordering::Relaxed);
        Buffer {
            inner: ManuallyDrop::new(Arc::clone(&self.inner)),
        }
    }
}

impl<B: Backend> BufferInner<B> {
    /// The block's cell. The caller holds a live handle (S1: nobody writes
    /// `live` meanwhile); reading through the pointer is S2's business.
    #[inline]
    fn held_cell(&self) -> *mut Held<B> {
        // SAFETY: S1: a live handle exists, so `live` is not written; only
        // the pointer to its `held` cell is taken here.
        unsafe { &*self.live.get() }.held.get()
    }

    /// Pins the block (S2) and returns it; the caller holds a live handle.
    #[inline]
    fn pinned(&self) -> *const Held<B> {
        if self.pin.load(Ordering::Acquire) != PINNED {
            self.pin_slow();
        }
        self.held_cell()
    }

    /// Takes the right to replace the block (S2), if nobody has seen it:
    /// then the caller may write `held` through the pointer returned, and
    /// must call [`BufferInner::pin_after_rebinding`] (or
    /// [`BufferInner::unpin_after_rebinding`]) when done. The caller holds
    /// a live handle.
    pub(crate) fn try_rebind(&self) -> Option<*mut Held<B>> {
        self.pin
            .compare_exchange(UNPINNED, REBINDING, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| self.held_cell())
    }

    /// Pins the block (S2), waiting out a rebinding in progress.
    #[cold]
    fn pin_slow(&self) {
        let mut turns = 0;
        loop {
            match self.pin.compare_exchange_weak(
                UNPINNED,
                PINNED,
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) | Err(PINNED) => return,
                Err(_) => spin_wait(&mut turns),
            }
        }
    }

    /// Ends a rebinding begun by [`BufferInner::try_rebind`]: the block is
    /// fixed, and readers may see it (S2).
    pub(crate) fn pin_after_rebinding(&self) {
        debug_assert_eq!(self.pin.load(Ordering::Relaxed), REBINDING);
        self.pin.store(PINNED, Ordering::Release);
    }

    /// Ends a rebinding begun by [`BufferInner::try_rebind`] that replaced
    /// nothing: the block may still be replaced later (S2).
    pub(crate) fn unpin_after_rebinding(&self) {
        debug_assert_eq!(self.pin.load(Ordering::Relaxed), REBINDING);
        self.pin.store(UNPINNED, Ordering::Release);
    }

    /// The block of a filled shell with no handle, leaving the shell empty.
    ///
    /// # Safety
    ///
    /// S1: `handles == 0` and the caller is the shell's only owner.
    pub(crate) unsafe fn unfill(&self) -> Block<B::Buffer> {
        // SAFETY: the caller's contract.
        let (live, stamps) = unsafe { (&mut *self.live.get(), &mut *self.stamps.data_ptr()) };
        let held = live.held.get_mut();
        Block {
            raw: held.raw.take().expect("a filled shell has its raw buffer"),
            offset: held.offset,
            node: held.node,
            size: held.size,
            id: held.id,
            stamps: std::mem::take(stamps),
        }
    }

    /// The fields of a shell with no handle.
    ///
    /// # Safety
    ///
    /// As for [`BufferInner::unfill`].
    #[inline]
    #[allow(clippy::mut_from_ref)] // S1 makes the access unique
    pub(crate) unsafe fn owned_live(&self) -> &mut Live<B> {
        // SAFETY: the caller's contract.
        unsafe { &mut *self.live.get() }
    }

    /// The stamps of a shell with no handle.
    ///
    /// # Safety
    ///
    /// As for [`BufferInner::unfill`].
    #[inline]
    #[allow(clippy::mut_from_ref)] // S1 makes the access unique
    pub(crate) unsafe fn owned_stamps(&self) -> &mut Stamps {
        // SAFETY: the caller's contract.
        unsafe { &mut *self.stamps.data_ptr() }
    }
}

impl<B: Backend> Drop for Buffer<B> {
    #[inline]
    fn drop(&mut self) {
        // One handle: nobody else can clone it, so no decrement is needed
        // to know it is the last (the Acquire load sees every earlier
        // handle's Release decrement and so its last access).
        if self.inner.handles.load(Ordering::Acquire) == 1 {
            self.inner.handles.store(0, Ordering::Relaxed);
        } else if self.inner.handles.fetch_sub(1, Ordering::Release) != 1 {
            // SAFETY: `inner` is not used again; this handle's Arc goes.
            unsafe { ManuallyDrop::drop(&mut self.inner) };
            return;
        } else {
            // The last handle: see every other handle's last access first.
            fence(Ordering::Acquire);
        }
        // SAFETY: `inner` is not used again after this take.
        let shell = unsafe { ManuallyDrop::take(&mut self.inner) };
        // SAFETY: S1: `handles` is 0 and this was the last handle, so we own
        // the shell; K1: the buffer was live until now, so its home slot
        // still holds a reference to the allocator.
        let shared = unsafe { &*shell.owned_live().shared };
        // The slot's reference, if it lets it go: dropped last, after every
        // use of `shared` (it may be the allocator's last).
        let keep = shared.free(shell);
        drop(keep);
    }
}

impl<B: Backend> std::fmt::Debug for Buffer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (l, held) = (self.live(), self.held());
        f.debug_struct("Buffer")
            .field("block", &held.id)
            .field("len", &l.len)
            .field("capacity", &held.size)
            .field("queue", &l.queue)
            .finish()
    }
}

#[cfg(all(test, inflight_loom))]
mod loom_models {
    //! Rule S2's handshake under loom: a thread that reads a live buffer's
    //! block races one that tries to replace it. (The block's cell is std's,
    //! so loom checks the protocol's outcomes, not the cell's accesses.)

    use super::*;
    use crate::backend::manual::ManualGpu;

    /// The reader sees the old block and the rebinding fails, or the
    /// rebinding succeeds and the reader sees only the new block: never
    /// the old block once it was replaced, nor a block replaced after it
    /// was seen.
    #[test]
    fn a_reader_sees_the_block_before_a_rebinding_or_after_it() {
        crate::sync::loom_model("S2: a reader races a rebinding", || {
            let inner: Shell<ManualGpu> = BufferInner::shell();
            // SAFETY: S1: no handle exists yet; this thread owns the shell.
            unsafe { (*inner.live.get()).held.get_mut().id = 1 };
            inner.handles.store(1, Ordering::Release); // the reader's handle
            let other = inner.clone();
            let rebinder = loom::thread::spawn(move || match other.try_rebind() {
                Some(held) => {
                    // The write takes time: a reader may come meanwhile
                    // (loom switches threads only at its own operations).
                    loom::thread::yield_now();
                    // SAFETY: S2: this thread moved `pin` to REBINDING.
                    unsafe { (*held).id = 2 };
                    other.pin_after_rebinding();
                    true
                }
                None => false,
            });
            // SAFETY: S2: `pinned` returns once the block is fixed.
            let seen = unsafe { (*inner.pinned()).id };
            let rebound = rebinder.join().unwrap();
            assert_eq!(rebound, seen == 2, "seen {seen}, rebound {rebound}");
            // SAFETY: as above; the block stays fixed.
            assert_eq!(unsafe { (*inner.pinned()).id }, seen);
        });
    }
}
