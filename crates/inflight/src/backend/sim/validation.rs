//! The simulator's validation layer: every raw buffer has a generation, and
//! every operation and release is checked against it.
//!
//! Two checks, after the two real layers:
//!
//! - **Release in flight** (Vulkan's `VUID-vkDestroyBuffer-buffer-00922`): a
//!   release while a submitted, incomplete submission recorded a use.
//! - **Use after release** (Metal's "command buffer references deallocated
//!   object", `kIOGPUCommandBufferCallbackErrorInvalidResource`): an executing
//!   operation touches a buffer whose generation has been released.
//!
//! In [`ValidationMode::Abort`] the first violation prints its message and
//! aborts the process, as Metal's assertion does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// What the validation layer does on a violation.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum ValidationMode {
    /// Count and record violations; the operation on a released buffer is
    /// skipped.
    #[default]
    Record,
    /// Print the violation and abort the process (non-zero exit), like
    /// Metal's validation layer.
    Abort,
}

/// The kind of a violation.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// A buffer was released while submitted work still used it.
    ReleasedInFlight,
    /// An executing operation used a released buffer.
    UseAfterRelease,
    /// An executing operation used pages of a growable segment that are
    /// not mapped (never, or no longer).
    UseOfUnmapped,
}

/// One violation the layer saw.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Violation {
    /// What happened.
    pub kind: ViolationKind,
    /// The raw buffer's generation id.
    pub buffer: u64,
    /// The queue of the submission involved.
    pub queue: u32,
    /// The submission's timeline value.
    pub submission: u64,
    /// When the buffer was released, since the device was created.
    pub released_at: Duration,
    /// When the violation was seen, since the device was created.
    pub seen_at: Duration,
    /// The message, as a validation layer would print it.
    pub message: String,
}

/// The most violations kept in full; the rest are only counted.
pub const KEPT_VIOLATIONS: usize = 64;

/// The layer's shared record.
pub(crate) struct Validation {
    mode: ValidationMode,
    start: Instant,
    count: AtomicU64,
    kept: Mutex<Vec<Violation>>,
}

impl Validation {
    pub(crate) fn new(mode: ValidationMode) -> Self {
        Validation {
            mode,
            start: Instant::now(),
            count: AtomicU64::new(0),
            kept: Mutex::new(Vec::new()),
        }
    }

    /// Time since the device was created.
    pub(crate) fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub(crate) fn report(
        &self,
        kind: ViolationKind,
        buffer: u64,
        queue: u32,
        submission: u64,
        released_at: Duration,
    ) {
        let message = match kind {
            ViolationKind::ReleasedInFlight => format!(
                "validation error: buffer {buffer} released at {released_at:?} while in use by \
                 submission {submission} on queue {queue} (VUID-vkDestroyBuffer-buffer-00922 analogue)"
            ),
            ViolationKind::UseOfUnmapped => format!(
                "validation error: submission {submission} on queue {queue} used unmapped pages \
                 of buffer {buffer} (an illegal address on CUDA)"
            ),
            ViolationKind::UseAfterRelease => format!(
                "validation error: command buffer references deallocated buffer: submission \
                 {submission} on queue {queue} used buffer {buffer}, released at {released_at:?} \
                 (kIOGPUCommandBufferCallbackErrorInvalidResource)"
            ),
        };
        if self.mode == ValidationMode::Abort {
            eprintln!("{message}");
            std::process::abort();
        }
        let seen_at = self.now();
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut kept = self.kept.lock();
        if kept.len() < KEPT_VIOLATIONS {
            kept.push(Violation {
                kind,
                buffer,
                queue,
                submission,
                released_at,
                seen_at,
                message,
            });
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub(crate) fn kept(&self) -> Vec<Violation> {
        self.kept.lock().clone()
    }
}
