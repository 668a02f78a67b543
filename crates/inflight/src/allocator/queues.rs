//! Queues as the allocator keeps them: their timelines' cached watermarks,
//! submission bookkeeping, faults raised where they could not be returned,
//! and the registry that finds a queue by id without a lock.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use crate::backend::{Backend, DeviceError};
use crate::error::{Error, Result};
use crate::policy::PolicyKind;
use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering};
use crate::timeline::{QueueId, Stamp, Stamps, Watermark};
use crate::Buffer;

use super::{BackendTime, Shared, MAX_QUEUES};

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
    pub(super) fault: Mutex<Option<Error>>,
    /// Whether `fault` may hold an error: lets the fast path skip the lock.
    pub(super) faulted: AtomicBool,
    /// Adopted from the program ([`crate::Allocator::adopt_queue`]): the
    /// program records its own work on the queue's native stream, so a
    /// buffer allocated for it is used there from its allocation to its
    /// free, and its free is stream-ordered.
    pub(crate) stream_ordered: bool,
    /// Whether some block was stamped with the value the next submission
    /// takes (a use fixed at a free, see [`QueueShared::mark_use`]): set
    /// under the submit lock by such a free, cleared by every submission.
    pub(crate) marker_owed: AtomicBool,
}

/// A queue's submission bookkeeping, behind `QueueShared::submit`.
pub(crate) struct SubmitState<B: Backend> {
    /// The value the next commit gets.
    pub(crate) next: u64,
    /// Under `Retained`: (value, buffers it bound), oldest first.
    pub(crate) retained: VecDeque<(u64, Vec<Buffer<B>>)>,
}

impl<B: Backend> QueueShared<B> {
    /// Creates the shared state of queue `id` over `raw`.
    pub(super) fn new(
        id: QueueId,
        raw: B::Queue,
        orders_memory: bool,
        stream_ordered: bool,
    ) -> Self {
        QueueShared {
            id,
            orders_memory,
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
            stream_ordered,
            marker_owed: AtomicBool::new(false),
        }
    }

    /// Fixes a use the program recorded on this queue's native stream up to
    /// now (a free, see [`crate::timeline::AT_FREE`]): the value of the next
    /// submission, which starts after the lock is let go and so runs after
    /// everything enqueued on the stream before this call. That submission
    /// is owed: [`Shared::flush_markers`] makes it an empty one (a marker)
    /// if no commit comes first.
    pub(crate) fn mark_use(&self) -> u64 {
        let sub = self.submit.lock();
        self.marker_owed.store(true, Ordering::Release);
        sub.next
    }

    /// Stores an error raised where it cannot be returned.
    pub(super) fn record_fault(&self, e: DeviceError) {
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
    pub(super) slots: Box<[OnceLock<Arc<QueueShared<B>>>]>,
    pub(super) len: AtomicUsize,
    pub(super) grow: Mutex<()>,
}

impl<B: Backend> QueueRegistry<B> {
    pub(super) fn new() -> Self {
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

    /// Submits an empty submission (a marker: on CUDA, an event recorded on
    /// the stream) on every queue that owes one, so that the uses fixed at
    /// stream-ordered frees can complete. Takes the queues' submit locks:
    /// never called with the state lock held.
    pub(crate) fn flush_markers(&self) {
        for q in self.queues.iter() {
            if q.marker_owed.load(Ordering::Acquire) {
                self.submit_marker(q);
            }
        }
    }

    /// Makes sure a submission of value `value` on `q` exists (submitting
    /// the marker owed if that is the one), so that waiting for it ends.
    pub(crate) fn ensure_submitted(&self, q: &QueueShared<B>, value: u64) {
        if value > q.submitted.load(Ordering::Acquire) {
            self.submit_marker(q);
        }
    }

    /// Submits the marker `q` owes, if it still owes one. A failure is
    /// stored on the queue (reported at its next call) and the marker stays
    /// owed.
    fn submit_marker(&self, q: &QueueShared<B>) {
        let mut sub = q.submit.lock();
        if !q.marker_owed.swap(false, Ordering::AcqRel) {
            return;
        }
        let value = sub.next;
        let made = self
            .backend
            .begin(&q.raw)
            .and_then(|cmds| self.backend.submit(&q.raw, cmds, value));
        match made {
            Ok(_submission) => {
                sub.next += 1;
                q.submitted.store(value, Ordering::Release);
            }
            Err(e) => {
                q.marker_owed.store(true, Ordering::Release);
                drop(sub);
                q.record_fault(e);
            }
        }
    }

    /// Asks the backend how far every queue got (no allocator lock needed:
    /// watermarks only move forward).
    pub(super) fn refresh_all(&self) {
        for q in self.queues.iter() {
            self.refresh(q);
        }
    }

    /// The first stamp the cached watermarks do not show completed (no
    /// backend call).
    #[inline]
    pub(super) fn first_incomplete_cached(&self, stamps: &Stamps) -> Option<Stamp> {
        stamps.first_incomplete(|q| self.queues.get(q).watermark.get())
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

    /// The oldest submission still holding references under `Retained`.
    pub(super) fn oldest_retained(&self) -> Option<Stamp> {
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
}
