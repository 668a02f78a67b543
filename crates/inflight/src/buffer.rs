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

use std::cell::UnsafeCell;
use std::mem::ManuallyDrop;
use std::sync::Arc;

use crate::allocator::Shared;
use crate::backend::{Backend, Span};
use crate::cache::Block;
use crate::sync::{fence, AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering};
use crate::timeline::{QueueId, Stamps};

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
    /// `queue` completed (the in-order reuse rule): that work's value. Work
    /// on any other queue must wait for it first (I2).
    pub(crate) reuse_fence: AtomicU64,
    /// Under [`crate::Config::scrub`]: a recycled block not yet zeroed for
    /// its new owner. Set at malloc, taken by the first binding, which
    /// records the fill (and sets it again if that command buffer is never
    /// submitted).
    pub(crate) needs_scrub: AtomicBool,
}

/// What a live buffer is. In an empty shell `raw` is `None`; in a filled
/// idle one (in a front cache) only `len` and `queue` are stale.
pub(crate) struct Live<B: Backend> {
    /// The allocator, kept alive by the home slot (K1); null in a new shell.
    pub(crate) shared: *const Shared<B>,
    pub(crate) raw: Option<B::Buffer>,
    pub(crate) len: u64,
    pub(crate) size: u64,
    pub(crate) id: u64,
    pub(crate) queue: QueueId,
    /// The front-cache slot that counts this buffer.
    pub(crate) home: u32,
}

/// An empty `BufferInner`, owned by the allocator (S1).
pub(crate) type Shell<B> = Arc<BufferInner<B>>;

// SAFETY: `live` is an `UnsafeCell` accessed under rule S1: written only by
// the one owner while no handle exists, read only while handles exist, with
// the `handles` counter (Release decrement, Acquire load or fence) and the
// state and slot locks ordering those accesses across threads. Everything
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
                raw: None,
                len: 0,
                size: 0,
                id: 0,
                queue: 0,
                home: 0,
            }),
            stamps: Mutex::new(Stamps::default()),
            reuse_fence: AtomicU64::new(0),
            needs_scrub: AtomicBool::new(false),
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
                raw: Some(block.raw),
                len,
                size: block.size,
                id: block.id,
                queue,
                home,
            };
            *shell.stamps.data_ptr() = block.stamps;
        }
        shell.reuse_fence.store(fence_value, Ordering::Relaxed);
        shell.needs_scrub.store(false, Ordering::Relaxed);
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
            debug_assert!(live.raw.is_some() && !live.shared.is_null());
            live.len = len;
            live.queue = queue;
            live.home = home;
        }
        shell.reuse_fence.store(fence, Ordering::Relaxed);
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
        self.live().size
    }

    /// The id of the device allocation behind it (stable across reuse).
    pub fn block_id(&self) -> u64 {
        self.live().id
    }

    /// The queue it was allocated for.
    pub fn queue_id(&self) -> QueueId {
        self.live().queue
    }

    /// The raw backend buffer.
    pub fn raw(&self) -> &B::Buffer {
        self.live()
            .raw
            .as_ref()
            .expect("a live buffer has its raw buffer")
    }

    /// The whole buffer as a span, rounded down to whole words. Empty for a
    /// buffer of under 4 bytes: whole-buffer operations on it return
    /// [`crate::Error::InvalidSpan`].
    pub fn span(&self) -> Span {
        Span::prefix(self.live().len & !3)
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
    /// The block of a filled shell with no handle, leaving the shell empty.
    ///
    /// # Safety
    ///
    /// S1: `handles == 0` and the caller is the shell's only owner.
    pub(crate) unsafe fn unfill(&self) -> Block<B::Buffer> {
        // SAFETY: the caller's contract.
        let (live, stamps) = unsafe { (&mut *self.live.get(), &mut *self.stamps.data_ptr()) };
        Block {
            raw: live.raw.take().expect("a filled shell has its raw buffer"),
            size: live.size,
            id: live.id,
            stamps: std::mem::take(stamps),
            release_when_idle: false,
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
        let l = self.live();
        f.debug_struct("Buffer")
            .field("block", &l.id)
            .field("len", &l.len)
            .field("capacity", &l.size)
            .field("queue", &l.queue)
            .finish()
    }
}
