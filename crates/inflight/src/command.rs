//! Buffers, queues, command buffers and tickets: the handles users hold.
//!
//! A [`CommandBuffer`] records operations and the buffers they bind, holding a
//! strong reference to each until commit. [`CommandBuffer::commit`] takes the
//! queue's next timeline value, submits, and stamps every bound buffer with
//! that value; under `Deferred` it then lets the references go (a dropped
//! buffer waits on the pending list), under `Retained` it keeps them until the
//! submission completes. No per-buffer work happens at completion: completion
//! only advances the queue's watermark.
//!
//! A buffer used on a queue other than the one it was allocated for is
//! stamped for that queue too, automatically.

use std::sync::Arc;
use std::time::Duration;

use crate::allocator::{QueueShared, Shared};
use crate::backend::{Backend, Binding, Span};
use crate::buffer::Buffer;
use crate::error::{Error, Result};
use crate::policy::PolicyKind;
use crate::sync::Ordering;
use crate::timeline::{QueueId, Stamp};

/// An in-order stream of submissions with its own timeline. Clones share it.
pub struct Queue<B: Backend> {
    pub(crate) shared: Arc<Shared<B>>,
    pub(crate) q: Arc<QueueShared<B>>,
}

impl<B: Backend> Clone for Queue<B> {
    fn clone(&self) -> Self {
        Queue {
            shared: self.shared.clone(),
            q: self.q.clone(),
        }
    }
}

impl<B: Backend> Queue<B> {
    /// The queue's index inside its allocator.
    pub fn id(&self) -> QueueId {
        self.q.id
    }

    /// The raw backend queue.
    pub fn raw(&self) -> &B::Queue {
        &self.q.raw
    }

    /// Whether the backend orders memory between submissions on this queue.
    pub fn orders_memory(&self) -> bool {
        self.q.orders_memory
    }

    /// Starts recording a submission.
    pub fn command_buffer(&self) -> Result<CommandBuffer<B>> {
        self.q.check_fault()?;
        let cmds = self.shared.backend.begin(&self.q.raw)?;
        Ok(CommandBuffer {
            shared: self.shared.clone(),
            queue: self.q.clone(),
            cmds: Some(cmds),
            bound: Vec::new(),
            device_waits: Vec::new(),
            scrubbed: Vec::new(),
        })
    }

    /// The completed watermark, refreshed from the backend.
    pub fn completed(&self) -> u64 {
        self.shared.refresh(&self.q)
    }

    /// The value of the last commit (0 before the first).
    pub fn last_submitted(&self) -> u64 {
        self.q.submit.lock().next - 1
    }

    /// Waits until everything committed so far has completed, or `timeout`.
    /// `timeout` may be zero (a poll) or [`Duration::MAX`] (no limit). A
    /// failure stored for this queue (a failed submission, a lost device) is
    /// returned after the wait.
    pub fn wait_idle(&self, timeout: Duration) -> Result<bool> {
        let last = self.last_submitted();
        let done = self.shared.backend.wait(&self.q.raw, last, timeout)?;
        self.shared.refresh(&self.q);
        self.q.check_fault()?;
        self.shared.drain_retained();
        Ok(done)
    }
}

/// Work being recorded for one submission on one queue.
pub struct CommandBuffer<B: Backend> {
    shared: Arc<Shared<B>>,
    queue: Arc<QueueShared<B>>,
    cmds: Option<B::Commands>,
    /// Strong references to every bound buffer, until commit (or completion,
    /// under `Retained`).
    bound: Vec<Buffer<B>>,
    /// Device-side waits already recorded (queue, value), not to repeat.
    device_waits: Vec<Stamp>,
    /// Under `Config::scrub`: buffers whose zero fill this command buffer
    /// recorded; their scrub is owed again if it is never submitted.
    scrubbed: Vec<Buffer<B>>,
}

impl<B: Backend> CommandBuffer<B> {
    /// Binds the whole of `buf` to this submission and returns where it
    /// lies: the backend's raw buffer, and the buffer's offset and length in
    /// it. The program records its own work on it through
    /// [`CommandBuffer::native`]; [`CommandBuffer::commit`] stamps every
    /// bound buffer with the submission's timeline value, so that none is
    /// released or reused while the work may still use it (I1, I2).
    ///
    /// The raw handle is fixed from now on (see [`Buffer::block_id`]); if
    /// the buffer's block was reused ahead of earlier work on another queue,
    /// this orders the submission after that work first (I2).
    pub fn bind<'b>(&mut self, buf: &'b Buffer<B>) -> Result<Binding<'b, B::Buffer>> {
        self.bind_span(buf, buf.span())
    }

    /// Binds `buf` as [`CommandBuffer::bind`] does, for work on `span` of it
    /// alone: checks that the span is word-aligned, not empty, inside the
    /// buffer and no longer than the device's largest operation.
    pub fn bind_span<'b>(
        &mut self,
        buf: &'b Buffer<B>,
        span: Span,
    ) -> Result<Binding<'b, B::Buffer>> {
        // The block is read (and so fixed, rule S2) only after the checks
        // and the reuse ordering: until then a rebinding may replace it.
        if !std::ptr::eq(buf.shared(), Arc::as_ptr(&self.shared)) {
            return Err(Error::ForeignBuffer {
                buffer: buf.block_id(),
            });
        }
        let len = buf.len();
        let why = if span.offset % 4 != 0 || span.len % 4 != 0 {
            Some("offset and length must be multiples of 4")
        } else if span.len == 0 {
            Some("the span is empty")
        } else if span
            .offset
            .checked_add(span.len)
            .is_none_or(|end| end > len)
        {
            Some("the span ends past the buffer")
        } else if span.len > self.shared.info.max_op_span {
            Some("the span is longer than the device's largest operation")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(Error::InvalidSpan {
                buffer: buf.block_id(),
                len,
                span,
                why,
            });
        }
        let cmds = self.cmds.as_mut().expect("commands exist until commit");
        self.shared
            .order_reuse(buf, self.queue.id, cmds, &mut self.device_waits)?;
        if buf.inner.needs_scrub.load(Ordering::Relaxed)
            && buf.inner.needs_scrub.swap(false, Ordering::AcqRel)
        {
            self.scrub(buf)?;
        }
        if !self.bound.last().is_some_and(|b| b.same(buf)) {
            self.bound.push(buf.clone());
        }
        Ok(Binding {
            raw: buf.raw(),
            offset: buf.offset(),
            len,
        })
    }

    /// The backend and its native recording for this submission (the
    /// simulated GPU's list of operations, the Vulkan command buffer, the
    /// CUDA work to enqueue on the submission's stream), to record the
    /// program's own work on buffers bound with [`CommandBuffer::bind`].
    /// Work on a buffer that was not bound is not tracked: the allocator
    /// may then release or reuse it while that work runs.
    pub fn native(&mut self) -> (&B, &mut B::Commands) {
        let cmds = self
            .cmds
            .as_mut()
            .expect("commands exist until commit consumes self");
        (&self.shared.backend, cmds)
    }

    /// The queue this submission is for.
    pub fn queue_id(&self) -> QueueId {
        self.queue.id
    }

    /// Records a fill of zeros over the whole of a recycled buffer, before
    /// the operation that binds it first (see `Config::scrub`), in pieces no
    /// longer than the device's largest operation.
    fn scrub(&mut self, buf: &Buffer<B>) -> Result<()> {
        self.scrubbed.push(buf.clone());
        let total = buf.len() & !3;
        let piece = (self.shared.info.max_op_span & !3).max(4);
        let binding = Binding {
            raw: buf.raw(),
            offset: buf.offset(),
            len: buf.len(),
        };
        let (backend, cmds) = self.native();
        let mut offset = 0;
        while offset < total {
            let len = piece.min(total - offset);
            let span = Span { offset, len };
            backend.zero(cmds, binding, span)?;
            offset += len;
        }
        Ok(())
    }

    /// Buffers bound so far (with repeats where bindings alternate).
    pub fn bindings(&self) -> usize {
        self.bound.len()
    }

    /// Submits the work: assigns the queue's next value, stamps every bound
    /// buffer with it, and lets the references go (under `Retained`, keeps
    /// them until completion). The returned ticket reports completion.
    pub fn commit(mut self) -> Result<Ticket<B>> {
        self.queue.check_fault()?;
        let cmds = self.cmds.take().expect("commands exist until commit");
        let mut bound = std::mem::take(&mut self.bound);
        let q = &self.queue;
        let retained = self.shared.config.policy.kind() == PolicyKind::Retained;
        let (value, submission) = {
            let mut sub = q.submit.lock();
            let value = sub.next;
            // Submit before stamping: a failed submit leaves no stamp that
            // would never complete. The references in `bound` keep every
            // buffer alive, so no free can read its stamps in between.
            let submission = self.shared.backend.submit(&q.raw, cmds, value);
            let submission = match submission {
                Ok(s) => s,
                Err(e) => {
                    drop(sub);
                    drop(bound);
                    return Err(e.into());
                }
            };
            sub.next += 1;
            q.submitted.store(value, Ordering::Release);
            // Any use fixed at a free as this value is covered now.
            q.marker_owed.store(false, Ordering::Release);
            for b in &bound {
                b.inner.stamps.lock().record(q.id, value);
            }
            if retained {
                bound.sort_unstable_by_key(|b| Arc::as_ptr(&b.inner) as usize);
                bound.dedup_by(|a, b| a.same(b));
                sub.retained.push_back((value, std::mem::take(&mut bound)));
                q.retained_len.store(sub.retained.len(), Ordering::Release);
            }
            (value, submission)
        };
        // Dropped here, after the submit lock: this may free buffers.
        drop(bound);
        // Submitted: the scrubs are on their way (see `Drop`).
        self.scrubbed.clear();
        Ok(Ticket {
            shared: self.shared.clone(),
            queue: self.queue.clone(),
            value,
            submission,
        })
    }
}

impl<B: Backend> Drop for CommandBuffer<B> {
    fn drop(&mut self) {
        // Never submitted (dropped, or its commit failed): the zero fills it
        // recorded never ran, so the next binding must record them again.
        for b in self.scrubbed.drain(..) {
            b.inner.needs_scrub.store(true, Ordering::Release);
        }
    }
}

/// A committed submission: completion, waiting, and its checksums.
pub struct Ticket<B: Backend> {
    shared: Arc<Shared<B>>,
    queue: Arc<QueueShared<B>>,
    value: u64,
    submission: B::Submission,
}

impl<B: Backend> Ticket<B> {
    /// The submission's timeline value.
    pub fn value(&self) -> u64 {
        self.value
    }

    /// The queue it was committed to.
    pub fn queue_id(&self) -> QueueId {
        self.queue.id
    }

    /// Whether it has completed. An error if it (or the device) failed:
    /// [`Error::SubmissionFailed`] once a submission that completed with an
    /// error is done (every time it is asked, whoever else was told at the
    /// queue's next call), [`Error::DeviceLost`] once the device is lost.
    pub fn is_complete(&self) -> Result<bool> {
        let done = self.shared.refresh(&self.queue) >= self.value;
        if let Some(e) = self.queue.fault_for(self.value) {
            return Err(e);
        }
        if done {
            // The submission's own status: the queue's stored fault may
            // already have been reported to (and cleared by) another call.
            if let Some(e) = self.shared.backend.submission_failure(&self.submission) {
                return Err(self.error(e));
            }
        }
        Ok(done)
    }

    /// This submission's error for a backend error about it: a failed
    /// submission names its queue.
    pub fn error(&self, e: crate::backend::DeviceError) -> Error {
        match e {
            crate::backend::DeviceError::SubmissionFailed { value, reason } => {
                Error::SubmissionFailed {
                    queue: self.queue.id,
                    value,
                    reason,
                }
            }
            other => other.into(),
        }
    }

    /// Blocks until it completes or `timeout` passes; returns whether it
    /// completed. The status is checked again after waking (see
    /// [`Ticket::is_complete`]), so a submission that completed with an error
    /// returns that error, not `Ok(true)`. It may be waited on any number of
    /// times; `timeout` may be zero (a poll) or [`Duration::MAX`].
    pub fn wait(&self, timeout: Duration) -> Result<bool> {
        let waited = self
            .shared
            .backend
            .wait(&self.queue.raw, self.value, timeout);
        let done = self.is_complete()?;
        waited?;
        self.shared.drain_retained();
        Ok(done)
    }

    /// The backend's submission, for backend-specific results.
    pub fn submission(&self) -> &B::Submission {
        &self.submission
    }

    /// The backend the submission went to.
    pub fn backend(&self) -> &B {
        &self.shared.backend
    }
}
