//! The allocator's error type: one enum for the whole public API.
//!
//! Backend errors arrive as [`DeviceError`] and are wrapped, never unwrapped
//! into panics. The out-of-memory error carries the request and a statistics
//! snapshot so that a caller can log why memory ran out (invariant I4).

use crate::backend::{DeviceError, Span};
use crate::stats::Stats;

/// Everything that can go wrong in a call on the allocator.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `malloc(0)`: inflight hands out no zero-sized buffers.
    #[error("cannot allocate a buffer of 0 bytes")]
    ZeroSize,
    /// The request is larger than the device can create in one buffer.
    #[error("cannot allocate {requested} bytes: the device's largest buffer is {max} bytes")]
    TooLarge {
        /// Bytes asked for.
        requested: u64,
        /// The device's largest buffer.
        max: u64,
    },
    /// Memory ran out after trimming the cache and waiting for in-flight work.
    #[error(
        "out of memory: cannot allocate {requested} bytes ({reason}); active {} B, \
         cached {} B ready + {} B pending, reserved {} B, memory limit {limit} B",
        stats.active_bytes, stats.ready_bytes, stats.pending_bytes, stats.reserved_bytes
    )]
    OutOfMemory {
        /// Bytes asked for (before rounding).
        requested: u64,
        /// Which limit was hit.
        reason: &'static str,
        /// The memory limit in force.
        limit: u64,
        /// The allocator's statistics at the moment of failure.
        stats: Box<Stats>,
    },
    /// A buffer was bound to a command buffer of another allocator.
    #[error("buffer {buffer} belongs to another allocator (or device) than this command buffer")]
    ForeignBuffer {
        /// The offending buffer's id.
        buffer: u64,
    },
    /// A queue of another allocator was passed.
    #[error("queue belongs to another allocator (or device)")]
    ForeignQueue,
    /// An operation's span is misaligned, empty, or past the buffer's end.
    #[error("span {span} is invalid for buffer {buffer} of {len} bytes: {why}")]
    InvalidSpan {
        /// The buffer's id.
        buffer: u64,
        /// The buffer's length in bytes.
        len: u64,
        /// The span asked for.
        span: Span,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Limits or configuration that contradict each other or the device.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The device is lost; nothing more will complete on it.
    #[error("device lost: {0}")]
    DeviceLost(String),
    /// Work submitted earlier on this queue failed on the device. Reported at
    /// the next call on that queue, and on the failed submission's ticket.
    #[error("submission {value} on queue {queue} failed: {reason}")]
    SubmissionFailed {
        /// The queue's index.
        queue: u32,
        /// The failed submission's timeline value.
        value: u64,
        /// What the device reported.
        reason: String,
    },
    /// Results were asked for before the submission completed.
    #[error("submission {value} on queue {queue} has not completed yet")]
    NotComplete {
        /// The queue's index.
        queue: u32,
        /// The submission's value.
        value: u64,
    },
    /// A checksum slot that the submission did not record.
    #[error("no checksum slot {slot}: the submission recorded {recorded}")]
    NoSuchSlot {
        /// The slot asked for.
        slot: usize,
        /// How many the submission recorded.
        recorded: usize,
    },
    /// More queues than one allocator supports.
    #[error("too many queues: an allocator supports at most {0}")]
    TooManyQueues(usize),
    /// A block reused ahead of its previous owner's work on one queue was
    /// bound on another, and that work did not complete in time.
    #[error(
        "waited too long for submission {value} on queue {queue}, which still uses a reused buffer bound on another queue"
    )]
    ReuseWaitTimedOut {
        /// The previous owner's queue.
        queue: u32,
        /// Its submission's value.
        value: u64,
    },
    /// Any other error the backend reported.
    #[error(transparent)]
    Device(DeviceError),
}

impl From<DeviceError> for Error {
    fn from(e: DeviceError) -> Self {
        match e {
            DeviceError::Lost(why) => Error::DeviceLost(why),
            other => Error::Device(other),
        }
    }
}

/// The allocator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
