//! The backend traits: the small surface a GPU API must offer the allocator,
//! and the harness operations its tests and demonstrations use.
//!
//! [`Backend`] is what the allocator needs: allocate and release raw device
//! buffers, create queues, start a recording (the backend's native command
//! list, which programs record their own work into), submit it with a
//! timeline value, and report which values have completed. Everything about
//! lifetimes, caching and reuse lives above it, in the allocator; a backend
//! keeps no per-buffer bookkeeping of its own beyond what its API requires.
//!
//! [`Harness`] adds four operations with results the host can check (fill,
//! copy, add, checksum): what `repro`, the conformance suite and the tests
//! record to see whether memory was corrupted. A program's own work needs
//! none of them.
//!
//! # Timeline contract
//!
//! The allocator assigns each submission on a queue the values 1, 2, 3, … in
//! submission order and passes the value to [`Backend::submit`].
//! [`Backend::completed`] returns the highest value `v` such that every
//! submission with a value `<= v` on that queue has finished executing (a
//! watermark; it never goes backwards). [`Backend::wait`] blocks until the
//! watermark reaches a value or the timeout passes.
//!
//! # Memory ordering
//!
//! [`Backend::orders_memory`] says whether work submitted later on a queue is
//! guaranteed to see the memory effects of work submitted earlier on it and to
//! not overlap with it (a CUDA stream: yes; a Vulkan queue without barriers or
//! Metal with untracked hazards: no). Only where it says yes may the allocator
//! hand a block still in use by that queue to new work on the same queue.

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "testing")]
pub mod manual;
#[cfg(feature = "metal")]
pub mod metal;
#[cfg(feature = "sim")]
pub mod sim;
#[cfg(feature = "vulkan")]
pub mod vulkan;

use std::fmt;
use std::time::Duration;

/// A byte range of a buffer that an operation reads or writes.
///
/// Operations work on 32-bit words, so `offset` and `len` are multiples of 4.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    /// First byte, a multiple of 4.
    pub offset: u64,
    /// Length in bytes, a multiple of 4.
    pub len: u64,
}

impl Span {
    /// The first `len` bytes of a buffer.
    pub const fn prefix(len: u64) -> Self {
        Span { offset: 0, len }
    }

    /// One past the last byte.
    pub const fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// Number of 32-bit words covered.
    pub const fn words(&self) -> u64 {
        self.len / 4
    }

    /// Checks that the span is word-aligned, not empty, and inside a buffer
    /// of `size` bytes (without overflowing): the check every backend makes
    /// when an operation is recorded.
    pub fn check_fits(&self, size: u64) -> Result<(), DeviceError> {
        let inside = self
            .offset
            .checked_add(self.len)
            .is_some_and(|end| end <= size);
        if self.offset % 4 != 0 || self.len % 4 != 0 || self.len == 0 || !inside {
            return Err(DeviceError::Unsupported(format!(
                "span {self} does not fit a buffer of {size} bytes"
            )));
        }
        Ok(())
    }
}

/// A buffer as work records it: the backend's raw buffer (a segment of
/// device memory that other buffers may share), and where the buffer lies
/// in it. Spans given with a binding count from `offset`.
#[derive(Debug)]
pub struct Binding<'a, R> {
    /// The backend's raw buffer.
    pub raw: &'a R,
    /// The buffer's first byte in `raw`.
    pub offset: u64,
    /// The buffer's length in bytes.
    pub len: u64,
}

impl<R> Clone for Binding<'_, R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<R> Copy for Binding<'_, R> {}

impl<'a, R> Binding<'a, R> {
    /// The whole of `raw` as one binding (for backends' own tests).
    pub fn whole(raw: &'a R, len: u64) -> Self {
        Binding {
            raw,
            offset: 0,
            len,
        }
    }

    /// `span` of the buffer as a span of the raw buffer.
    pub fn absolute(&self, span: Span) -> Span {
        Span {
            offset: self.offset + span.offset,
            len: span.len,
        }
    }

    /// Checks that `span` is word-aligned, not empty and inside the buffer
    /// (the check every backend makes when an operation is recorded).
    pub fn check(&self, span: Span) -> Result<(), DeviceError> {
        span.check_fits(self.len)
    }
}

/// What a backend tells the allocator about its device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The backend's short name: `sim`, `vulkan`, `cuda`, `metal`.
    pub backend: &'static str,
    /// The device's name, as its driver reports it.
    pub name: String,
    /// Device memory the allocator may plan with, in bytes.
    pub memory_capacity: u64,
    /// The largest single buffer the device can create, in bytes.
    pub max_buffer_size: u64,
    /// The largest span one operation may cover, in bytes (a storage-buffer
    /// range limit, for instance). Operations on longer spans are refused.
    pub max_op_span: u64,
}

/// The small set of errors every backend maps its own codes onto
/// (after wgpu-hal's `DeviceError`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The device could not satisfy an allocation.
    #[error("device out of memory")]
    OutOfMemory,
    /// The device is gone; nothing submitted to it will complete.
    #[error("device lost: {0}")]
    Lost(String),
    /// A submission finished with an error on the device.
    #[error("submission {value} failed on the device: {reason}")]
    SubmissionFailed {
        /// The submission's timeline value.
        value: u64,
        /// What the backend reported.
        reason: String,
    },
    /// The request is outside what this backend or device supports.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Anything else, with the backend's own description.
    #[error("backend error: {0}")]
    Other(String),
}

/// A GPU API as the allocator sees it. See the module documentation for the
/// timeline and memory-ordering contracts.
///
/// Implementations must be cheap to call concurrently from many threads: the
/// allocator calls [`Backend::completed`] on its allocation path.
pub trait Backend: Send + Sync + 'static {
    /// A raw device buffer.
    type Buffer: Send + Sync + 'static;
    /// A raw in-order queue of submissions.
    type Queue: Send + Sync + 'static;
    /// Work being recorded for one submission.
    type Commands: Send + 'static;
    /// A submitted piece of work; gives back its checksums once complete.
    type Submission: Send + Sync + 'static;

    /// Facts about the device.
    fn info(&self) -> DeviceInfo;

    /// Creates a raw buffer of exactly `bytes` bytes (a multiple of 4, > 0).
    fn allocate(&self, bytes: u64) -> Result<Self::Buffer, DeviceError>;

    /// Gives a raw buffer back to the driver: a buffer from
    /// [`Backend::allocate`], or a range from [`Backend::reserve`] with
    /// nothing mapped in it any more.
    ///
    /// # Safety
    ///
    /// 1. `buffer` was created by this backend.
    /// 2. Every submission that recorded a use of `buffer` has completed
    ///    (invariant I1). The only caller that breaks this rule on purpose is
    ///    the `Immediate` policy, whose constructor is `unsafe` for that reason;
    ///    on a real driver the result is undefined behaviour.
    unsafe fn release(&self, buffer: Self::Buffer);

    /// The page granularity of growable segments (CUDA's virtual memory
    /// management: `cuMemGetAllocationGranularity`), or `None` where the
    /// backend has none; the allocator then uses fixed segments only.
    fn page_granularity(&self) -> Option<u64> {
        None
    }

    /// Reserves an address range of `bytes` bytes with nothing mapped: a
    /// growable segment's raw buffer. Every later [`Backend::map`] and
    /// [`Backend::unmap`] on it covers whole pages of `page` bytes (a
    /// multiple of the granularity, dividing `bytes`), aligned to them, so a
    /// backend may back each page with one physical allocation.
    /// [`Backend::release`] gives it back once nothing in it is mapped.
    fn reserve(&self, bytes: u64, page: u64) -> Result<Self::Buffer, DeviceError> {
        let _ = (bytes, page);
        Err(DeviceError::Unsupported(
            "this backend has no growable segments".into(),
        ))
    }

    /// Backs `[offset, offset + bytes)` of a reserved range with fresh
    /// device memory (both multiples of the page granularity, not mapped
    /// now), usable on every queue. Out of memory is
    /// [`DeviceError::OutOfMemory`].
    fn map(&self, range: &Self::Buffer, offset: u64, bytes: u64) -> Result<(), DeviceError> {
        let _ = (range, offset, bytes);
        Err(DeviceError::Unsupported(
            "this backend has no growable segments".into(),
        ))
    }

    /// Unmaps `[offset, offset + bytes)` of a reserved range and gives its
    /// memory back to the driver.
    ///
    /// # Safety
    ///
    /// 1. `range` came from [`Backend::reserve`] of this backend, and the
    ///    pages were mapped by [`Backend::map`] calls covering them.
    /// 2. Every submission that recorded a use of those pages has completed
    ///    (invariant I1), as for [`Backend::release`].
    unsafe fn unmap(&self, range: &Self::Buffer, offset: u64, bytes: u64) {
        let _ = (range, offset, bytes);
    }

    /// The device address of a raw buffer's first byte, for memory
    /// snapshots (0 where the backend has no addresses; snapshots then
    /// number segments themselves).
    fn address(&self, buffer: &Self::Buffer) -> u64 {
        let _ = buffer;
        0
    }

    /// Creates a queue with its own timeline, starting at 0 (nothing done).
    fn create_queue(&self) -> Result<Self::Queue, DeviceError>;

    /// Whether later work on `queue` is ordered after earlier work on it for
    /// memory (see the module documentation).
    fn orders_memory(&self, queue: &Self::Queue) -> bool;

    /// Starts recording a submission for `queue`.
    fn begin(&self, queue: &Self::Queue) -> Result<Self::Commands, DeviceError>;

    /// Records: write zeros to every byte of `dst[span]` (`vkCmdFillBuffer`,
    /// `cuMemsetD8Async`): how a recycled buffer is scrubbed for its new
    /// owner ([`crate::Config::scrub`]).
    fn zero(
        &self,
        cmds: &mut Self::Commands,
        dst: Binding<'_, Self::Buffer>,
        span: Span,
    ) -> Result<(), DeviceError>;

    /// Records, ahead of the work recorded next, a device-side wait until
    /// `other`'s completed watermark reaches `value` (a GPU-side event wait,
    /// like `cuStreamWaitEvent`). `value` was submitted already. Returns
    /// `false` if the backend cannot; the allocator then waits on the host.
    fn wait_on_device(
        &self,
        cmds: &mut Self::Commands,
        other: &Self::Queue,
        value: u64,
    ) -> Result<bool, DeviceError> {
        let _ = (cmds, other, value);
        Ok(false)
    }

    /// Submits recorded work to `queue` as timeline value `value`. Values on a
    /// queue are submitted in increasing order, one call at a time.
    fn submit(
        &self,
        queue: &Self::Queue,
        cmds: Self::Commands,
        value: u64,
    ) -> Result<Self::Submission, DeviceError>;

    /// The queue's completed watermark (see the module documentation).
    /// Does not block.
    fn completed(&self, queue: &Self::Queue) -> Result<u64, DeviceError>;

    /// Blocks until `completed(queue) >= value` or `timeout` passes; returns
    /// whether the value was reached.
    fn wait(&self, queue: &Self::Queue, value: u64, timeout: Duration)
        -> Result<bool, DeviceError>;

    /// Takes the oldest not yet taken failure of a submission on `queue`: one
    /// that completed *with an error* (a Metal command buffer whose status is
    /// `error`, a faulting kernel). A failed submission still counts as
    /// completed for [`Backend::completed`]: its work is over, so its buffers
    /// may be released and reused. The allocator drains this after every
    /// [`Backend::completed`] and reports the error at the next call on that
    /// queue; the submission's own ticket learns it from
    /// [`Backend::submission_failure`]. Backends that cannot tell one
    /// submission's failure apart (they lose the device instead) keep the
    /// default, `None`.
    fn take_failure(&self, queue: &Self::Queue) -> Option<DeviceError> {
        let _ = queue;
        None
    }

    /// The error a completed submission completed with, if any (see
    /// [`Backend::take_failure`]); asked by its ticket once it is done, so it
    /// must be cheap. The default, `None`, is for backends without
    /// per-submission failures.
    fn submission_failure(&self, submission: &Self::Submission) -> Option<DeviceError> {
        let _ = submission;
        None
    }
}
/// The harness operations: four kernels whose results the host can check,
/// recorded into a [`Backend`]'s command list. The conformance suite,
/// `repro` and the tests use them to see whether memory was corrupted; a
/// program records its own work instead (see [`crate::CommandBuffer::native`]).
pub trait Harness: Backend {
    /// Records: write `pattern` to every word of `span` of `dst`.
    fn fill(
        &self,
        cmds: &mut Self::Commands,
        dst: Binding<'_, Self::Buffer>,
        span: Span,
        pattern: u32,
    ) -> Result<(), DeviceError>;

    /// Records: `dst[span] = src[span]`.
    fn copy(
        &self,
        cmds: &mut Self::Commands,
        src: Binding<'_, Self::Buffer>,
        dst: Binding<'_, Self::Buffer>,
        span: Span,
    ) -> Result<(), DeviceError>;

    /// Records: `out[i] = a[i] + b[i]` (wrapping) for every word of `span`.
    fn add(
        &self,
        cmds: &mut Self::Commands,
        a: Binding<'_, Self::Buffer>,
        b: Binding<'_, Self::Buffer>,
        out: Binding<'_, Self::Buffer>,
        span: Span,
    ) -> Result<(), DeviceError>;

    /// Records: compute [`checksum_words`] over `span` of `src` (indices
    /// counted from the span's first word) into the next result slot of
    /// this submission, and returns that slot's index (0, 1, 2, … in
    /// recording order).
    fn checksum(
        &self,
        cmds: &mut Self::Commands,
        src: Binding<'_, Self::Buffer>,
        span: Span,
    ) -> Result<usize, DeviceError>;

    /// How many checksum slots a submission recorded (known at submit).
    fn slots(&self, submission: &Self::Submission) -> usize;

    /// The checksums a completed submission computed, in slot order; for a
    /// submission that completed with an error, that error
    /// ([`DeviceError::SubmissionFailed`]): its results are undefined.
    fn results(&self, submission: &Self::Submission) -> Result<Vec<u64>, DeviceError>;
}

/// The checksum every backend computes: the wrapping u64 sum over the words
/// `w[i]` of a span of two u32 terms, each widened to u64:
/// `w[i] ^ (i * 0x9E37_79B1)` (wrapping u32 multiply) and `w[i]` rotated
/// left by 7. The index term makes a shifted or misplaced copy visible. The
/// value term makes every value count: over `2^k` words the index term of
/// a uniform span is the same whatever the value (the index terms' low
/// bits run through every pattern, so XOR with the value only permutes
/// them), and alone it could not tell one owner's fill from another's.
pub fn checksum_words(words: &[u32]) -> u64 {
    words.iter().enumerate().fold(0u64, |acc, (i, &w)| {
        acc.wrapping_add(u64::from(w ^ index_mix(i as u64)))
            .wrapping_add(u64::from(value_mix(w)))
    })
}

/// The per-value term of [`checksum_words`].
#[inline]
pub const fn value_mix(w: u32) -> u32 {
    w.rotate_left(7)
}

/// The per-index term of [`checksum_words`].
#[inline]
pub const fn index_mix(i: u64) -> u32 {
    (i as u32).wrapping_mul(0x9E37_79B1)
}

/// The checksum of `words` words that all hold `value`, computed without
/// materialising them (for the harness's CPU model).
pub fn checksum_uniform(value: u32, words: u64) -> u64 {
    checksum_uniform_from(value, 0, words)
}

/// The checksum terms of `words` words that all hold `value`, for indices
/// `first..first + words` (a piece of a longer span).
pub fn checksum_uniform_from(value: u32, first: u64, words: u64) -> u64 {
    (first..first + words)
        .fold(0u64, |acc, i| {
            acc.wrapping_add(u64::from(value ^ index_mix(i)))
        })
        .wrapping_add(words.wrapping_mul(u64::from(value_mix(value))))
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}..{})", self.offset, self.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over a power-of-two span of 16 words or more the index term alone is
    /// blind to values that differ in their low bits (uniform fills of them
    /// sum alike); with the value term, no two values collide.
    #[test]
    fn uniform_checksums_tell_values_apart_on_power_of_two_spans() {
        for k in [0, 1, 5, 10, 12, 16, 20] {
            let n = 1u64 << k;
            let index_only =
                |v: u32| (0..n).fold(0u64, |acc, i| acc.wrapping_add(u64::from(v ^ index_mix(i))));
            if k >= 4 {
                // Fills that differ in their low bits (a round's patterns).
                assert!(
                    (100..108).all(|v| index_only(v) == index_only(100)),
                    "the index term alone tells these apart at 2^{k}: the premise changed"
                );
            }
            let mut values = vec![0u32, 1, 7, 0xC0DE, 0xC0DE_0001, 0xFFFF_FFFF, 0x8000_0000];
            values.extend(100..108);
            let sums: Vec<u64> = values.iter().map(|&v| checksum_uniform(v, n)).collect();
            for (a, x) in sums.iter().enumerate() {
                for y in &sums[a + 1..] {
                    assert_ne!(x, y, "2^{k} words: two values, one checksum");
                }
            }
            for &v in &values {
                let words = vec![v; n as usize];
                assert_eq!(checksum_words(&words), checksum_uniform(v, n));
            }
        }
    }
}
