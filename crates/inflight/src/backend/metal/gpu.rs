//! [`MetalGpu`]: the Metal device as a [`Backend`] and a [`Harness`].
//! Apple targets only; see the module documentation of [`super`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use objc2::rc::Retained;
use objc2::runtime::ProtocolObject;
use objc2_metal::{MTLBuffer, MTLDevice};

use super::commands::MetalCommands;
use super::device::{DeviceShared, RawBuffer};
use super::queue::{QueueShared, HANDLER_GRACE};
use super::shader::Kernel;
use super::timeline::Outcome;
use super::MetalConfig;
use crate::backend::{Backend, Binding, DeviceError, DeviceInfo, Harness, Span};

/// A Metal device. Clones share it.
#[derive(Clone)]
pub struct MetalGpu {
    dev: Arc<DeviceShared>,
}

/// A raw Metal buffer: shared storage, untracked hazards.
pub struct MetalBuffer {
    pub(crate) dev: Arc<DeviceShared>,
    pub(crate) buffer: Retained<RawBuffer>,
    id: u64,
    pub(crate) size: u64,
}

// SAFETY: an MTLBuffer may be bound, queried and released from any thread
// (Metal resources are thread-safe objects); inflight never writes its
// contents from the host, and the residency bookkeeping it touches on drop
// is behind the device's mutex.
unsafe impl Send for MetalBuffer {}
// SAFETY: as above: `&MetalBuffer` only reads immutable properties and
// hands the object to encoders.
unsafe impl Sync for MetalBuffer {}

/// A Metal command queue with its shared event as timeline.
pub struct MetalQueue {
    inner: Arc<QueueShared>,
}

/// A committed Metal command buffer.
pub struct MetalSubmission {
    queue: Arc<QueueShared>,
    outcome: Arc<Outcome>,
    value: u64,
    slots: usize,
}

impl MetalGpu {
    /// Opens the system's default Metal device and compiles the harness
    /// kernels. Without a device this is [`DeviceError::Unsupported`].
    pub fn new(config: MetalConfig) -> Result<Self, DeviceError> {
        let dev = objc2::rc::autoreleasepool(|_| DeviceShared::open(config))?;
        Ok(MetalGpu { dev: Arc::new(dev) })
    }

    /// The settings it was opened with.
    pub fn config(&self) -> &MetalConfig {
        &self.dev.config
    }

    /// The `MTLDevice`, for the program's own pipelines.
    pub fn device(&self) -> &ProtocolObject<dyn MTLDevice> {
        &self.dev.device
    }

    /// Bytes of raw buffers currently allocated.
    pub fn allocated_bytes(&self) -> u64 {
        self.dev.live_bytes.load(Ordering::Relaxed)
    }

    /// Whether buffers go into a residency set (macOS 15+, and
    /// [`MetalConfig::residency_sets`] on).
    pub fn has_residency_set(&self) -> bool {
        self.dev.residency.is_some()
    }

    /// Bytes of buffers in the residency set and bytes left out of it (over
    /// the wired budget); `None` without a residency set.
    pub fn wired_bytes(&self) -> Option<(u64, u64)> {
        self.dev.wired()
    }

    /// Changes the wired budget (MLX's `set_wired_limit`): buffers move in
    /// or out of the residency set to fit. Returns the previous budget; an
    /// [`DeviceError::Unsupported`] error without a residency set.
    pub fn set_wired_limit(&self, bytes: u64) -> Result<u64, DeviceError> {
        self.dev.set_wired_limit(bytes).ok_or_else(|| {
            DeviceError::Unsupported("no residency set (macOS 15+, and turned on)".into())
        })
    }

    fn same_queue(&self, queue: &MetalQueue) -> Result<(), DeviceError> {
        if Arc::ptr_eq(&self.dev, &queue.inner.dev) {
            Ok(())
        } else {
            Err(DeviceError::Unsupported(
                "a queue of another Metal device".into(),
            ))
        }
    }
}

impl Backend for MetalGpu {
    type Buffer = MetalBuffer;
    type Queue = MetalQueue;
    type Commands = MetalCommands;
    type Submission = MetalSubmission;

    fn info(&self) -> DeviceInfo {
        self.dev.info.clone()
    }

    fn allocate(&self, bytes: u64) -> Result<MetalBuffer, DeviceError> {
        let max = self.dev.info.max_buffer_size;
        if bytes == 0 || bytes % 4 != 0 || bytes > max {
            return Err(DeviceError::Unsupported(format!(
                "cannot create a buffer of {bytes} bytes (max {max})"
            )));
        }
        let (buffer, id) = self.dev.new_buffer(bytes)?;
        Ok(MetalBuffer {
            dev: self.dev.clone(),
            buffer,
            id,
            size: bytes,
        })
    }

    unsafe fn release(&self, buffer: MetalBuffer) {
        // Dropping takes the buffer out of the residency set and lets go of
        // the last reference: Metal frees it. With unretained command-buffer
        // references nothing else holds it, which is why the caller's
        // promise (no submission in flight uses it) matters here.
        drop(buffer);
    }

    fn create_queue(&self) -> Result<MetalQueue, DeviceError> {
        Ok(MetalQueue {
            inner: Arc::new(QueueShared::new(self.dev.clone())?),
        })
    }

    fn orders_memory(&self, _queue: &MetalQueue) -> bool {
        // Untracked buffers: a later command buffer on the queue may overlap
        // an earlier one and is not ordered after it for memory.
        false
    }

    fn begin(&self, queue: &MetalQueue) -> Result<MetalCommands, DeviceError> {
        self.same_queue(queue)?;
        MetalCommands::new(queue.inner.clone())
    }

    fn zero(
        &self,
        cmds: &mut MetalCommands,
        dst: Binding<'_, MetalBuffer>,
        span: Span,
    ) -> Result<(), DeviceError> {
        cmds.zero(dst, span)
    }

    fn wait_on_device(
        &self,
        cmds: &mut MetalCommands,
        other: &MetalQueue,
        value: u64,
    ) -> Result<bool, DeviceError> {
        if !Arc::ptr_eq(&cmds.queue.dev, &other.inner.dev) {
            return Ok(false);
        }
        cmds.wait_for(&other.inner.event, value)?;
        Ok(true)
    }

    fn submit(
        &self,
        queue: &MetalQueue,
        mut cmds: MetalCommands,
        value: u64,
    ) -> Result<MetalSubmission, DeviceError> {
        if !Arc::ptr_eq(&queue.inner, &cmds.queue) {
            return Err(DeviceError::Unsupported(
                "commands were begun on another queue".into(),
            ));
        }
        let keep = cmds.finish()?;
        if let Some(r) = &self.dev.residency {
            r.lock().commit_if_needed();
        }
        let chunks = std::mem::take(&mut cmds.chunks);
        let slots = cmds.slots;
        let outcome = queue.inner.submit(&cmds.cb, value, chunks, slots, keep)?;
        Ok(MetalSubmission {
            queue: queue.inner.clone(),
            outcome,
            value,
            slots,
        })
    }

    fn completed(&self, queue: &MetalQueue) -> Result<u64, DeviceError> {
        queue.inner.completed()
    }

    fn wait(&self, queue: &MetalQueue, value: u64, timeout: Duration) -> Result<bool, DeviceError> {
        queue.inner.wait(value, timeout)
    }

    fn take_failure(&self, queue: &MetalQueue) -> Option<DeviceError> {
        queue.inner.timeline.with(|b| b.take_failure())
    }

    fn submission_failure(&self, submission: &MetalSubmission) -> Option<DeviceError> {
        submission.outcome().and_then(Result::err)
    }
}

impl MetalSubmission {
    /// The outcome, waiting briefly for the completed handler when the
    /// event already shows the submission done; `None` while in flight.
    fn outcome(&self) -> Option<Result<Vec<u64>, DeviceError>> {
        if let Some(o) = self.outcome.get() {
            return Some(o);
        }
        match self.queue.completed() {
            Ok(done) if done >= self.value => self.outcome.wait(HANDLER_GRACE),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

impl Harness for MetalGpu {
    fn fill(
        &self,
        cmds: &mut MetalCommands,
        dst: Binding<'_, MetalBuffer>,
        span: Span,
        pattern: u32,
    ) -> Result<(), DeviceError> {
        cmds.dispatch(Kernel::Fill, &[dst], span, pattern).map(drop)
    }

    fn copy(
        &self,
        cmds: &mut MetalCommands,
        src: Binding<'_, MetalBuffer>,
        dst: Binding<'_, MetalBuffer>,
        span: Span,
    ) -> Result<(), DeviceError> {
        cmds.dispatch(Kernel::Copy, &[src, dst], span, 0).map(drop)
    }

    fn add(
        &self,
        cmds: &mut MetalCommands,
        a: Binding<'_, MetalBuffer>,
        b: Binding<'_, MetalBuffer>,
        out: Binding<'_, MetalBuffer>,
        span: Span,
    ) -> Result<(), DeviceError> {
        cmds.dispatch(Kernel::Add, &[a, b, out], span, 0).map(drop)
    }

    fn checksum(
        &self,
        cmds: &mut MetalCommands,
        src: Binding<'_, MetalBuffer>,
        span: Span,
    ) -> Result<usize, DeviceError> {
        cmds.dispatch(Kernel::Checksum, &[src], span, 0)?
            .ok_or_else(|| DeviceError::Other("a checksum without a slot".into()))
    }

    fn slots(&self, submission: &MetalSubmission) -> usize {
        submission.slots
    }

    fn results(&self, submission: &MetalSubmission) -> Result<Vec<u64>, DeviceError> {
        submission.outcome().unwrap_or_else(|| {
            Err(DeviceError::Other(format!(
                "submission {} has not completed",
                submission.value
            )))
        })
    }
}

impl Binding<'_, MetalBuffer> {
    /// The `MTLBuffer` the buffer lies in, at the binding's offset
    /// (`setBuffer:offset:atIndex:` with [`Binding::offset`]).
    pub fn buffer(&self) -> &ProtocolObject<dyn MTLBuffer> {
        &self.raw.buffer
    }
}

impl MetalBuffer {
    /// Bytes of the buffer.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The `MTLBuffer`.
    pub fn buffer(&self) -> &ProtocolObject<dyn MTLBuffer> {
        &self.buffer
    }
}

impl Drop for MetalBuffer {
    fn drop(&mut self) {
        // The allocator drops a raw buffer only through `Backend::release`
        // (whose caller promises no submission in flight uses it) or, at
        // teardown, leaks those it cannot prove idle.
        self.dev.forget_buffer(self.id, self.size);
    }
}

impl MetalQueue {
    /// The `MTLCommandQueue`. Work a program commits on it directly is
    /// outside the queue's timeline: nothing stamps the buffers it uses.
    /// (The queue's shared event is not handed out: setting its value from
    /// outside would move the watermark.)
    pub fn command_queue(&self) -> &ProtocolObject<dyn objc2_metal::MTLCommandQueue> {
        &self.inner.queue
    }
}
