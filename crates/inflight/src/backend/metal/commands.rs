//! Recording one submission: the command buffer, the encoder open on it,
//! and the checksum slots. Apple targets only.
//!
//! # Ordering inside a submission
//!
//! Buffers are untracked, so Metal orders nothing by itself. The harness
//! records into one serial compute encoder while it can, with a
//! buffer-scope memory barrier before every dispatch after the first; a
//! zero fill needs a blit encoder. Where one of our encoders follows
//! another, the first updates the submission's `MTLFence` just before it
//! ends and the next waits for it first. Device-side waits for other queues
//! (`encodeWaitForEvent:value:`) are encoded between encoders and hold
//! back everything encoded after them.
//!
//! # The program's own work
//!
//! [`MetalCommands::compute_encoder`] hands out the harness's own serial
//! compute encoder: work dispatched there is ordered with the harness's
//! operations by the same barriers. [`MetalCommands::command_buffer`] ends
//! that encoder and hands out the command buffer itself, for encoders of
//! the program's own; those order themselves with the harness's through
//! [`MetalCommands::fence`] (see its documentation).

use std::ptr::NonNull;
use std::sync::Arc;

use objc2::rc::{autoreleasepool, Retained};
use objc2::runtime::ProtocolObject;
use objc2_foundation::NSRange;
use objc2_metal::{
    MTLBarrierScope, MTLBlitCommandEncoder, MTLCommandBuffer, MTLCommandEncoder,
    MTLComputeCommandEncoder, MTLDevice, MTLEvent, MTLFence, MTLSize,
};

use super::device::{DeviceShared, ResultChunk};
use super::queue::{CommandBuffer, KeepAlive, QueueShared};
use super::shader::{self, Kernel, Params, GROUP, PARAMS_INDEX, RESULTS_INDEX, SLOTS_PER_CHUNK};
use super::MetalBuffer;
use crate::backend::{Binding, DeviceError, Span};

type ComputeEncoder = ProtocolObject<dyn MTLComputeCommandEncoder>;
type BlitEncoder = ProtocolObject<dyn MTLBlitCommandEncoder>;
type Fence = ProtocolObject<dyn MTLFence>;

/// The encoder open on the command buffer, if any.
enum Open {
    Nothing,
    Compute {
        encoder: Retained<ComputeEncoder>,
        /// Whether anything was dispatched on it yet.
        dispatched: bool,
    },
    Blit(Retained<BlitEncoder>),
}

/// Work being recorded for one Metal submission.
pub struct MetalCommands {
    pub(crate) queue: Arc<QueueShared>,
    pub(crate) cb: Retained<CommandBuffer>,
    open: Open,
    /// The submission's fence, made on the first switch of encoders.
    fence: Option<Retained<Fence>>,
    /// Whether the fence was updated, so new encoders must wait for it.
    fence_updated: bool,
    pub(crate) chunks: Vec<ResultChunk>,
    pub(crate) slots: usize,
    pub(crate) events: Vec<Retained<super::queue::SharedEvent>>,
}

// SAFETY: a recording is used by one thread at a time (`&mut self` for
// every call, and the trait only asks for `Send`); Metal allows a command
// buffer and its encoders to be encoded from any thread, one at a time.
unsafe impl Send for MetalCommands {}

impl MetalCommands {
    pub(crate) fn new(queue: Arc<QueueShared>) -> Result<MetalCommands, DeviceError> {
        // Command buffers and encoders come back autoreleased: a pool per
        // call, so a long-lived thread does not keep them until it exits.
        let cb = autoreleasepool(|_| queue.command_buffer())?;
        Ok(MetalCommands {
            queue,
            cb,
            open: Open::Nothing,
            fence: None,
            fence_updated: false,
            chunks: Vec::new(),
            slots: 0,
            events: Vec::new(),
        })
    }

    fn dev(&self) -> &DeviceShared {
        &self.queue.dev
    }

    /// The submission's fence, made on first use.
    fn fence_object(&mut self) -> Result<Retained<Fence>, DeviceError> {
        if let Some(f) = &self.fence {
            return Ok(f.clone());
        }
        let f = self
            .dev()
            .device
            .newFence()
            .ok_or_else(|| DeviceError::Other("newFence returned nil".into()))?;
        self.fence = Some(f.clone());
        Ok(f)
    }

    /// Ends the open encoder; `more` says whether other work follows in this
    /// command buffer (then the encoder updates the fence first).
    pub(crate) fn end_encoder(&mut self, more: bool) -> Result<(), DeviceError> {
        let fence = match (&self.open, more) {
            (Open::Nothing, _) | (_, false) => None,
            _ => Some(self.fence_object()?),
        };
        match std::mem::replace(&mut self.open, Open::Nothing) {
            Open::Nothing => {}
            Open::Compute { encoder, .. } => {
                if let Some(f) = &fence {
                    encoder.updateFence(f);
                }
                encoder.endEncoding();
            }
            Open::Blit(encoder) => {
                if let Some(f) = &fence {
                    encoder.updateFence(f);
                }
                encoder.endEncoding();
            }
        }
        self.fence_updated |= fence.is_some();
        Ok(())
    }

    /// The compute encoder, opened (after the fence) if another is open.
    fn compute(&mut self) -> Result<(&ComputeEncoder, bool), DeviceError> {
        if !matches!(self.open, Open::Compute { .. }) {
            self.end_encoder(true)?;
            let encoder = autoreleasepool(|_| self.cb.computeCommandEncoder())
                .ok_or_else(|| DeviceError::Other("no compute encoder".into()))?;
            if self.fence_updated {
                if let Some(f) = &self.fence {
                    encoder.waitForFence(f);
                }
            }
            self.open = Open::Compute {
                encoder,
                dispatched: false,
            };
        }
        match &mut self.open {
            Open::Compute {
                encoder,
                dispatched,
            } => Ok((&**encoder, std::mem::replace(dispatched, true))),
            _ => unreachable!("opened above"),
        }
    }

    /// The blit encoder, opened (after the fence) if another is open.
    fn blit(&mut self) -> Result<&BlitEncoder, DeviceError> {
        if !matches!(self.open, Open::Blit(_)) {
            self.end_encoder(true)?;
            let encoder = autoreleasepool(|_| self.cb.blitCommandEncoder())
                .ok_or_else(|| DeviceError::Other("no blit encoder".into()))?;
            if self.fence_updated {
                if let Some(f) = &self.fence {
                    encoder.waitForFence(f);
                }
            }
            self.open = Open::Blit(encoder);
        }
        match &self.open {
            Open::Blit(encoder) => Ok(encoder),
            _ => unreachable!("opened above"),
        }
    }

    /// Records `kernel` over `span` of `bufs` (bound at indices 0, 1, 2).
    pub(crate) fn dispatch(
        &mut self,
        kernel: Kernel,
        bufs: &[Binding<'_, MetalBuffer>],
        span: Span,
        arg: u32,
    ) -> Result<Option<usize>, DeviceError> {
        for b in bufs {
            self.check(b, span)?;
        }
        let words = span.words();
        let mut params = Params {
            count: u32::try_from(words).map_err(|_| {
                DeviceError::Unsupported(format!("span {span} is longer than one operation"))
            })?,
            arg,
            slot: 0,
        };
        let result = if kernel == Kernel::Checksum {
            let slot = self.slots;
            if slot / SLOTS_PER_CHUNK == self.chunks.len() {
                let chunk = self.dev().take_chunk()?;
                self.chunks.push(chunk);
            }
            params.slot = (slot % SLOTS_PER_CHUNK) as u32;
            Some(slot)
        } else {
            None
        };
        let chunk = result.map(|slot| self.chunks[slot / SLOTS_PER_CHUNK].buffer.clone());
        let dev = self.queue.dev.clone();
        let (encoder, after_another) = self.compute()?;
        if after_another {
            encoder.memoryBarrierWithScope(MTLBarrierScope::Buffers);
        }
        encoder.setComputePipelineState(dev.kernels.get(kernel));
        for (index, b) in bufs.iter().enumerate() {
            // SAFETY: the binding was checked against its raw buffer above,
            // so the offset lies inside it and the span after it; index
            // 0..3 is the kernel's argument for this operand; the buffer
            // lives until the submission completes (the allocator's I1, or
            // the command buffer's own reference under retained references).
            unsafe {
                encoder.setBuffer_offset_atIndex(
                    Some(&b.raw.buffer),
                    (b.offset + span.offset) as usize,
                    index,
                )
            };
        }
        // SAFETY: `params` is a live `repr(C)` struct of the length given,
        // which Metal copies; PARAMS_INDEX is the kernels' `[[buffer(3)]]`.
        unsafe {
            encoder.setBytes_length_atIndex(
                NonNull::from(&params).cast(),
                std::mem::size_of::<Params>(),
                PARAMS_INDEX,
            )
        };
        if let Some(chunk) = &chunk {
            // SAFETY: the chunk holds SLOTS_PER_CHUNK slots and `params.slot`
            // is below that; it is owned by this recording, then by its
            // completed handler, so it outlives the GPU's use.
            unsafe { encoder.setBuffer_offset_atIndex(Some(chunk), 0, RESULTS_INDEX) };
        }
        let groups = shader::groups(words);
        encoder.dispatchThreadgroups_threadsPerThreadgroup(
            MTLSize {
                width: groups as usize,
                height: 1,
                depth: 1,
            },
            MTLSize {
                width: GROUP as usize,
                height: 1,
                depth: 1,
            },
        );
        if result.is_some() {
            self.slots += 1;
        }
        Ok(result)
    }

    /// Records a zero fill of `span` of `dst` with a blit encoder.
    pub(crate) fn zero(
        &mut self,
        dst: Binding<'_, MetalBuffer>,
        span: Span,
    ) -> Result<(), DeviceError> {
        self.check(&dst, span)?;
        let start = (dst.offset + span.offset) as usize;
        let blit = self.blit()?;
        blit.fillBuffer_range_value(&dst.raw.buffer, NSRange::new(start, span.len as usize), 0);
        Ok(())
    }

    /// Records a device-side wait for `event` to reach `value` before the
    /// work recorded next.
    pub(crate) fn wait_for(
        &mut self,
        event: &Retained<super::queue::SharedEvent>,
        value: u64,
    ) -> Result<(), DeviceError> {
        self.end_encoder(true)?;
        let e: &ProtocolObject<dyn MTLEvent> = ProtocolObject::from_ref(&**event);
        self.cb.encodeWaitForEvent_value(e, value);
        self.events.push(event.clone());
        Ok(())
    }

    fn check(&self, b: &Binding<'_, MetalBuffer>, span: Span) -> Result<(), DeviceError> {
        if !Arc::ptr_eq(&b.raw.dev, &self.queue.dev) {
            return Err(DeviceError::Unsupported(
                "a buffer of another Metal device".into(),
            ));
        }
        b.check(span)?;
        b.absolute(span).check_fits(b.raw.size)?;
        if span.len > self.queue.dev.info.max_op_span {
            return Err(DeviceError::Unsupported(format!(
                "span {span} is longer than one operation ({} bytes)",
                self.queue.dev.info.max_op_span
            )));
        }
        Ok(())
    }

    /// Ends recording: the open encoder ends, and what the command buffer
    /// must keep alive is handed over.
    pub(crate) fn finish(&mut self) -> Result<KeepAlive, DeviceError> {
        self.end_encoder(false)?;
        Ok(KeepAlive {
            _events: std::mem::take(&mut self.events),
            _fence: self.fence.clone(),
        })
    }
}

impl MetalCommands {
    /// The harness's own compute encoder, open on this submission's command
    /// buffer (a serial one: dispatches run in order), for the program's
    /// own dispatches on bound buffers ([`crate::CommandBuffer::bind`];
    /// [`Binding::buffer`] and [`Binding::offset`] say where each lies).
    /// A buffer-scope memory barrier is encoded before it is handed out,
    /// and the harness encodes one before its next operation, so the
    /// program's work is ordered with the harness's on either side. The
    /// program sets its own pipeline and arguments (the harness sets its
    /// own again for each operation) and must not end the encoder.
    pub fn compute_encoder(
        &mut self,
    ) -> Result<&ProtocolObject<dyn MTLComputeCommandEncoder>, DeviceError> {
        let (encoder, after_another) = self.compute()?;
        if after_another {
            encoder.memoryBarrierWithScope(MTLBarrierScope::Buffers);
        }
        Ok(encoder)
    }

    /// The command buffer this submission records into, for encoders of the
    /// program's own on bound buffers. The harness's open encoder is ended
    /// first (updating [`MetalCommands::fence`]); the program must end each
    /// encoder it opens before returning control, and must not commit,
    /// wait on, or add handlers to the command buffer.
    ///
    /// Buffers are untracked, so Metal does not order the program's
    /// encoders with the harness's: the program's first encoder should
    /// `waitForFence` on [`MetalCommands::fence`] and its last should
    /// `updateFence` it, and the harness's next encoder then waits for it.
    /// With unretained references (the `Deferred` and `Immediate` policies'
    /// setting) the command buffer holds no reference to objects the program
    /// binds: the program keeps them alive until the submission completes
    /// (the allocator does so for its buffers).
    pub fn command_buffer(&mut self) -> Result<&ProtocolObject<dyn MTLCommandBuffer>, DeviceError> {
        self.end_encoder(true)?;
        Ok(&self.cb)
    }

    /// The submission's fence (made on first use): what orders the
    /// program's own encoders with the harness's (see
    /// [`MetalCommands::command_buffer`]). Once asked for, every encoder the
    /// harness opens afterwards waits for it.
    pub fn fence(&mut self) -> Result<&ProtocolObject<dyn MTLFence>, DeviceError> {
        self.fence_object()?;
        self.fence_updated = true;
        Ok(self.fence.as_deref().expect("made above"))
    }

    /// Whether the command buffer holds references to the objects it uses
    /// (the `Retained` policy's setting) or not (MLX's, the incident's).
    pub fn retained_references(&self) -> bool {
        self.cb.retainedReferences()
    }
}

impl Drop for MetalCommands {
    fn drop(&mut self) {
        // Never submitted (or already finished): an open encoder must end
        // before its command buffer goes; the chunks were never used.
        let _ = self.end_encoder(false);
        let chunks = std::mem::take(&mut self.chunks);
        self.queue.dev.give_back_chunks(chunks);
    }
}
