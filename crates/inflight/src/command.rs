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
use crate::backend::{Backend, Span};
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
            checksums: 0,
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
    checksums: usize,
    /// Under `Config::scrub`: buffers whose zero fill this command buffer
    /// recorded; their scrub is owed again if it is never submitted.
    scrubbed: Vec<Buffer<B>>,
}

impl<B: Backend> CommandBuffer<B> {
    /// Checks that `buf` belongs to this allocator and `span` fits it, and
    /// records the binding.
    fn bind(&mut self, buf: &Buffer<B>, span: Span) -> Result<()> {
        // The block is read (and so fixed, rule S2) only by the recording
        // after this, or by an error: a rebinding may still replace it.
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
        Ok(())
    }

    /// Records a fill of zeros over the whole of a recycled buffer, before
    /// the operation that binds it first (see `Config::scrub`), in pieces no
    /// longer than the device's largest operation.
    fn scrub(&mut self, buf: &Buffer<B>) -> Result<()> {
        self.scrubbed.push(buf.clone());
        let total = buf.len() & !3;
        let piece = (self.shared.info.max_op_span & !3).max(4);
        let shared = self.shared.clone();
        let mut offset = 0;
        while offset < total {
            let len = piece.min(total - offset);
            let span = Span { offset, len };
            shared.backend.fill(self.cmds(), buf.raw(), span, 0)?;
            offset += len;
        }
        Ok(())
    }

    fn cmds(&mut self) -> &mut B::Commands {
        self.cmds
            .as_mut()
            .expect("commands exist until commit consumes self")
    }

    /// Records: fill the whole buffer with `pattern`.
    pub fn fill(&mut self, dst: &Buffer<B>, pattern: u32) -> Result<()> {
        self.fill_span(dst, dst.span(), pattern)
    }

    /// Records: fill `dst[span]` with `pattern`.
    pub fn fill_span(&mut self, dst: &Buffer<B>, span: Span, pattern: u32) -> Result<()> {
        self.bind(dst, span)?;
        let shared = self.shared.clone();
        shared.backend.fill(self.cmds(), dst.raw(), span, pattern)?;
        Ok(())
    }

    /// Records: copy the first `min(len)` words of `src` to `dst`.
    pub fn copy(&mut self, src: &Buffer<B>, dst: &Buffer<B>) -> Result<()> {
        let span = Span::prefix(src.span().len.min(dst.span().len));
        self.copy_span(src, dst, span)
    }

    /// Records: `dst[span] = src[span]`.
    pub fn copy_span(&mut self, src: &Buffer<B>, dst: &Buffer<B>, span: Span) -> Result<()> {
        self.bind(src, span)?;
        self.bind(dst, span)?;
        let shared = self.shared.clone();
        shared
            .backend
            .copy(self.cmds(), src.raw(), dst.raw(), span)?;
        Ok(())
    }

    /// Records: `out = a + b` (wrapping, per word) over the shortest of the three.
    pub fn add(&mut self, a: &Buffer<B>, b: &Buffer<B>, out: &Buffer<B>) -> Result<()> {
        let len = a.span().len.min(b.span().len).min(out.span().len);
        self.add_span(a, b, out, Span::prefix(len))
    }

    /// Records: `out[i] = a[i] + b[i]` (wrapping) over `span`.
    pub fn add_span(
        &mut self,
        a: &Buffer<B>,
        b: &Buffer<B>,
        out: &Buffer<B>,
        span: Span,
    ) -> Result<()> {
        self.bind(a, span)?;
        self.bind(b, span)?;
        self.bind(out, span)?;
        let shared = self.shared.clone();
        shared
            .backend
            .add(self.cmds(), a.raw(), b.raw(), out.raw(), span)?;
        Ok(())
    }

    /// Records: checksum (see [`crate::backend::checksum_words`]) of `src[span]`
    /// into the next result slot; returns the slot, for [`Ticket::checksum`].
    pub fn checksum_span(&mut self, src: &Buffer<B>, span: Span) -> Result<usize> {
        self.bind(src, span)?;
        let shared = self.shared.clone();
        let slot = shared.backend.checksum(self.cmds(), src.raw(), span)?;
        self.checksums = self.checksums.max(slot + 1);
        Ok(slot)
    }

    /// Records: checksum of the whole buffer.
    pub fn checksum(&mut self, src: &Buffer<B>) -> Result<usize> {
        self.checksum_span(src, src.span())
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
            checksums: self.checksums,
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
    checksums: usize,
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
                return Err(self.submission_error(e));
            }
        }
        Ok(done)
    }

    fn submission_error(&self, e: crate::backend::DeviceError) -> Error {
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

    /// Every checksum the submission recorded, in slot order. An error if
    /// it has not completed.
    pub fn checksums(&self) -> Result<Vec<u64>> {
        if !self.is_complete()? {
            return Err(Error::NotComplete {
                queue: self.queue.id,
                value: self.value,
            });
        }
        self.shared
            .backend
            .results(&self.submission)
            .map_err(|e| self.submission_error(e))
    }

    /// The checksum in `slot`. An error if it has not completed.
    pub fn checksum(&self, slot: usize) -> Result<u64> {
        if slot >= self.checksums {
            return Err(Error::NoSuchSlot {
                slot,
                recorded: self.checksums,
            });
        }
        let all = self.checksums()?;
        all.get(slot).copied().ok_or(Error::NoSuchSlot {
            slot,
            recorded: all.len(),
        })
    }
}
