//! A Metal queue: an `MTLCommandQueue` with one `MTLSharedEvent` as its
//! timeline, submission, completed handlers, and waiting. Apple targets
//! only; the bookkeeping itself is [`super::timeline`].
//!
//! # Submitting value `v`
//!
//! 1. The open encoder ends; the residency set is committed if buffers were
//!    added since its last commit.
//! 2. `encodeWaitForEvent:value:` on the queue's own event for the value
//!    submitted before `v`, then `encodeSignalEvent:value:` with `v`. The
//!    wait makes signals land in value order even though untracked command
//!    buffers may overlap on the GPU, so `signaledValue >= v` means every
//!    value up to `v` finished: the event is the watermark.
//! 3. A completed handler reads the command buffer's status and error
//!    ([`super::errors`]), the checksums, and records the outcome. A command
//!    buffer that failed may never have reached its signal, so every
//!    handler raises the event from the host (`setSignaledValue:` only
//!    raises it) to the highest value whose handler, and every earlier
//!    one's, has run: the next submission's wait and every host waiter go
//!    on, a failed submission counts as completed (its work is over), and
//!    the event still never runs ahead of a value whose predecessors may be
//!    running (a failure can end a command buffer before the one before it).
//! 4. `v` is recorded as submitted, then the command buffer is committed.
//!
//! # Waiting
//!
//! `waitUntilSignaledValue:timeoutMS:` (macOS 12+) where the event answers
//! it; otherwise the timeline's condition variable, which completed
//! handlers notify. Either way in slices, so a lost device is noticed.

use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block2::RcBlock;
use objc2::rc::Retained;
use objc2::runtime::{NSObjectProtocol, ProtocolObject};
use objc2::sel;
use objc2_metal::{
    MTLCommandBuffer, MTLCommandQueue, MTLDevice, MTLEvent, MTLFence, MTLSharedEvent,
};
use parking_lot::Mutex;

use super::device::{DeviceShared, ResultChunk};
use super::errors::{CommandBufferError, CommandBufferStatus, Finished};
use super::shader::SLOTS_PER_CHUNK;
use super::timeline::{Outcome, Timeline};
use crate::backend::DeviceError;

/// The longest single wait slice: a lost device is noticed this quickly.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// How long a submission's owner waits for its completed handler once the
/// event shows it done (the handler runs moments after the GPU finishes).
pub(crate) const HANDLER_GRACE: Duration = Duration::from_secs(10);

pub(crate) type SharedEvent = ProtocolObject<dyn MTLSharedEvent>;
pub(crate) type CommandBuffer = ProtocolObject<dyn MTLCommandBuffer>;

/// One queue, shared by its handle, its recordings, its submissions and
/// their completed handlers.
pub(crate) struct QueueShared {
    pub(crate) dev: Arc<DeviceShared>,
    pub(crate) queue: Retained<ProtocolObject<dyn MTLCommandQueue>>,
    pub(crate) event: Retained<SharedEvent>,
    pub(crate) timeline: Timeline,
    /// Whether the event answers `waitUntilSignaledValue:timeoutMS:`.
    event_wait: bool,
}

/// What a completed handler needs, taken once. It crosses to the Metal
/// thread that runs the handler (block2 does not ask for `Send`): from
/// submission on nothing else touches it, the chunks are read only after
/// the GPU finished with them, and the rest is `Send + Sync`.
struct InFlight {
    queue: Arc<QueueShared>,
    outcome: Arc<Outcome>,
    chunks: Vec<ResultChunk>,
    slots: usize,
    /// Objects kept until the command buffer completed.
    _keep: KeepAlive,
}

/// Objects a command buffer uses that must live until it completes even
/// when it was made with unretained references: other queues' events it
/// waits on, and its fence. Held, never read.
pub(crate) struct KeepAlive {
    pub(crate) _events: Vec<Retained<SharedEvent>>,
    pub(crate) _fence: Option<Retained<ProtocolObject<dyn MTLFence>>>,
}

impl QueueShared {
    pub(crate) fn new(dev: Arc<DeviceShared>) -> Result<QueueShared, DeviceError> {
        let queue = dev
            .device
            .newCommandQueue()
            .ok_or_else(|| DeviceError::Other("newCommandQueue returned nil".into()))?;
        let event = dev
            .device
            .newSharedEvent()
            .ok_or_else(|| DeviceError::Other("newSharedEvent returned nil".into()))?;
        if let Some(r) = &dev.residency {
            // Residency sets exist, so so does this (macOS 15+).
            queue.addResidencySet(&r.lock().set);
        }
        let event_wait = event.respondsToSelector(sel!(waitUntilSignaledValue:timeoutMS:));
        Ok(QueueShared {
            dev,
            queue,
            event,
            timeline: Timeline::new(),
            event_wait,
        })
    }

    /// A new command buffer: with unretained references (MLX's setting)
    /// unless the config asks for retained ones.
    pub(crate) fn command_buffer(&self) -> Result<Retained<CommandBuffer>, DeviceError> {
        self.check_lost()?;
        let cb = if self.dev.config.retained_references {
            self.queue.commandBuffer()
        } else {
            self.queue.commandBufferWithUnretainedReferences()
        };
        cb.ok_or_else(|| DeviceError::Other("the queue gave no command buffer".into()))
    }

    fn check_lost(&self) -> Result<(), DeviceError> {
        match self.timeline.with(|b| b.lost()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The completed watermark.
    pub(crate) fn completed(&self) -> Result<u64, DeviceError> {
        let signalled = self.event.signaledValue();
        self.timeline.with(|b| match b.lost() {
            Some(e) => Err(e),
            None => Ok(b.watermark(signalled)),
        })
    }

    /// Blocks until the watermark reaches `value` or `timeout` passes.
    pub(crate) fn wait(&self, value: u64, timeout: Duration) -> Result<bool, DeviceError> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            if self.completed()? >= value {
                return Ok(true);
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => WAIT_SLICE,
            };
            if left.is_zero() {
                return Ok(false);
            }
            let slice = left.min(WAIT_SLICE);
            if self.event_wait {
                // Whole milliseconds, at least one (a slice may end up to a
                // millisecond late).
                let ms = slice.as_micros().div_ceil(1000).max(1) as u64;
                self.event.waitUntilSignaledValue_timeoutMS(value, ms);
            } else {
                self.timeline.wait_finished(value, slice)?;
            }
        }
    }

    /// Submits `cb` as `value` (steps 2–4 of the module doc; the caller did
    /// step 1). `chunks` hold its `slots` checksums.
    pub(crate) fn submit(
        self: &Arc<Self>,
        cb: &CommandBuffer,
        value: u64,
        chunks: Vec<ResultChunk>,
        slots: usize,
        keep: KeepAlive,
    ) -> Result<Arc<Outcome>, DeviceError> {
        let previous = self.timeline.with(|b| b.check_next(value))?;
        let event: &ProtocolObject<dyn MTLEvent> = ProtocolObject::from_ref(&*self.event);
        if previous > 0 {
            cb.encodeWaitForEvent_value(event, previous);
        }
        cb.encodeSignalEvent_value(event, value);
        let outcome = Arc::new(Outcome::new());
        let state = Mutex::new(Some(InFlight {
            queue: self.clone(),
            outcome: outcome.clone(),
            chunks,
            slots,
            _keep: keep,
        }));
        let handler = RcBlock::new(move |done: NonNull<CommandBuffer>| {
            if let Some(job) = state.lock().take() {
                // SAFETY: Metal passes the command buffer that completed,
                // alive for the duration of the call.
                let done = unsafe { done.as_ref() };
                finish(value, done, job);
            }
        });
        // SAFETY: `handler` is a valid heap block (RcBlock), which Metal
        // copies; the command buffer is not yet committed, as
        // addCompletedHandler: requires.
        unsafe { cb.addCompletedHandler(RcBlock::as_ptr(&handler)) };
        self.timeline.with(|b| b.submitted(value));
        cb.commit();
        Ok(outcome)
    }
}

/// The completed handler's work for submission `value`.
fn finish(value: u64, cb: &CommandBuffer, job: InFlight) {
    let status = CommandBufferStatus::from_raw(cb.status().0 as u64);
    let error = cb.error();
    let (code, description) = match &error {
        Some(e) => (
            Some(CommandBufferError::from_ns_error(
                &e.domain().to_string(),
                e.code() as i64,
            )),
            e.localizedDescription().to_string(),
        ),
        None => (None, String::new()),
    };
    let failure = Finished {
        status,
        error: code,
        description: &description,
    }
    .failure(value);
    let q = &job.queue;
    match &failure {
        Some(e) => job.outcome.set(Err(e.clone())),
        None => {
            let sums = job
                .chunks
                .iter()
                .enumerate()
                .flat_map(|(i, c)| c.read(job.slots.saturating_sub(i * SLOTS_PER_CHUNK)))
                .collect();
            job.outcome.set(Ok(sums));
        }
    }
    let finished = q.timeline.finish(value, failure);
    // Step 3's host signal (a no-op where the GPU's signals got there).
    if q.event.signaledValue() < finished {
        q.event.setSignaledValue(finished);
    }
    q.dev.give_back_chunks(job.chunks);
}
