//! The Vulkan backend, on ash with the loader opened at run time: it builds
//! without any Vulkan SDK and runs on Mesa's lavapipe (the CPU), on a GPU's
//! driver, or on Metal through MoltenVK. See `docs/VULKAN.md`.
//!
//! Layers, after cudarc: [`raw`] wraps each fallible Vulkan call in a
//! `Result`; [`device`](self) opens the instance, chooses the physical device
//! and builds the pipelines; `encoder` records operations as compute
//! dispatches; `queue` submits them against timeline semaphores and recycles
//! encoders; this module maps it all onto [`Backend`].
//!
//! - **Buffers**: a `VkBuffer` with a dedicated `VkDeviceMemory`
//!   (device-local when the device offers it); release destroys both.
//!   The backend asks for no device addresses (`bufferDeviceAddress` is
//!   off), so [`Backend::address`] gives each raw buffer a synthetic one,
//!   for memory snapshots ([`VulkanBuffer::address`]).
//! - **Queues**: one hardware queue shared by every logical queue (submits
//!   take a lock), one timeline semaphore per logical queue.
//! - **Memory ordering**: [`Backend::orders_memory`] is `false`. Vulkan does
//!   not order memory between submissions by itself; our encoders do put a
//!   barrier before every dispatch, but the allocator is told not to rely on
//!   it, so a freed block is reused only once its submissions completed.
//! - **Validation** ([`validation`]): with `VK_LAYER_KHRONOS_validation` on,
//!   [`VulkanGpu::violations`] counts the layer's own error messages.

mod device;
mod encoder;
mod queue;
pub mod raw;
pub mod validation;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ash::vk;

use self::device::DeviceShared;
use self::encoder::{Encoder, Kernel};
use self::queue::{QueueInner, ResultCell};
pub use self::validation::{LayerMessage, ValidationRequest};
use crate::backend::{Backend, Binding, DeviceError, DeviceInfo, Harness, Span};

/// Environment variable choosing the device: an index or a name substring.
pub const DEVICE_ENV: &str = "INFLIGHT_VULKAN_DEVICE";
/// Environment variable turning validation on (`1`, `required`), to
/// "when available" (`auto`), or off (`0`).
pub const VALIDATION_ENV: &str = "INFLIGHT_VULKAN_VALIDATION";

/// Allocations kept free for the backend's own result buffers, below the
/// device's `maxMemoryAllocationCount`.
const RESERVED_ALLOCATIONS: u64 = 256;

/// The first synthetic address of a device's raw buffers (1 TiB: clear of
/// 0, which snapshots read as "no address").
const SYNTHETIC_ADDRESS_BASE: u64 = 1 << 40;
/// Synthetic addresses are this far apart at least, and aligned to it, as
/// a driver's allocations are.
const SYNTHETIC_ADDRESS_ALIGN: u64 = 2 << 20;

/// Settings of the Vulkan backend.
#[derive(Clone, Debug, Default)]
pub struct VulkanConfig {
    /// The device: an index in enumeration order or a substring of its name.
    /// `None`: [`DEVICE_ENV`], else a GPU when there is one, else the CPU.
    pub device: Option<String>,
    /// Whether to enable the validation layer. `None`: [`VALIDATION_ENV`],
    /// else off.
    pub validation: Option<ValidationRequest>,
    /// Write each validation error to stderr as it arrives (before a driver
    /// that really frees memory can crash on a release in flight).
    pub echo_errors: bool,
}

impl VulkanConfig {
    fn device_choice(&self) -> Option<String> {
        self.device
            .clone()
            .or_else(|| std::env::var(DEVICE_ENV).ok())
    }

    fn validation_request(&self) -> ValidationRequest {
        if let Some(v) = self.validation {
            return v;
        }
        match std::env::var(VALIDATION_ENV).ok().as_deref().map(str::trim) {
            Some("1" | "true" | "required" | "on") => ValidationRequest::Required,
            Some("auto") => ValidationRequest::IfAvailable,
            _ => ValidationRequest::Off,
        }
    }
}

/// A Vulkan device. Clones share it.
#[derive(Clone)]
pub struct VulkanGpu {
    dev: Arc<DeviceShared>,
}

/// A raw Vulkan buffer: a `VkBuffer` and its dedicated memory.
pub struct VulkanBuffer {
    dev: Arc<DeviceShared>,
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    size: u64,
    /// Synthetic, fixed at creation (see [`VulkanBuffer::address`]).
    address: u64,
}

/// A logical queue: a timeline semaphore over the shared hardware queue.
pub struct VulkanQueue {
    inner: Arc<QueueInner>,
}

/// Work being recorded for one submission.
pub struct VulkanCommands {
    queue: Arc<QueueInner>,
    encoder: Option<Encoder>,
}

/// A submitted piece of work.
pub struct VulkanSubmission {
    queue: Arc<QueueInner>,
    slots: usize,
    value: u64,
    results: ResultCell,
}

impl VulkanGpu {
    /// Opens the device `config` chooses. An `Unsupported` error says why
    /// when no Vulkan loader or device is present.
    pub fn new(config: VulkanConfig) -> Result<Self, DeviceError> {
        Ok(VulkanGpu {
            dev: DeviceShared::open(&config)?,
        })
    }

    /// Whether the validation layer is on.
    pub fn validation_enabled(&self) -> bool {
        self.dev.validation
    }

    /// Error messages from the validation layer so far.
    pub fn violations(&self) -> u64 {
        self.dev.log.errors()
    }

    /// Warning messages from the validation layer so far.
    pub fn warnings(&self) -> u64 {
        self.dev.log.warnings()
    }

    /// The first messages from the layer, in full
    /// (at most [`validation::KEPT_MESSAGES`]).
    pub fn violation_log(&self) -> Vec<LayerMessage> {
        self.dev.log.kept()
    }

    /// Bytes of raw buffers currently allocated.
    pub fn allocated_bytes(&self) -> u64 {
        self.dev.live_bytes.load(Ordering::Relaxed)
    }

    fn same_device(&self, other: &Arc<DeviceShared>) -> Result<(), DeviceError> {
        if Arc::ptr_eq(&self.dev, other) {
            Ok(())
        } else {
            Err(DeviceError::Unsupported(
                "an object of another Vulkan device".into(),
            ))
        }
    }

    fn record(
        &self,
        cmds: &mut VulkanCommands,
        kernel: Kernel,
        bufs: &[Binding<'_, VulkanBuffer>],
        span: Span,
        arg: u32,
        slot: usize,
    ) -> Result<(), DeviceError> {
        for b in bufs {
            self.same_device(&b.raw.dev)?;
            b.check(span)?;
            b.absolute(span).check_fits(b.raw.size)?;
        }
        let raw: Vec<(vk::Buffer, u64)> = bufs.iter().map(|b| (b.raw.buffer, b.offset)).collect();
        let enc = cmds
            .encoder
            .as_mut()
            .ok_or_else(|| DeviceError::Other("commands already submitted".into()))?;
        enc.record(&self.dev, kernel, &raw, span, arg, slot)?;
        Ok(())
    }
}

impl Backend for VulkanGpu {
    type Buffer = VulkanBuffer;
    type Queue = VulkanQueue;
    type Commands = VulkanCommands;
    type Submission = VulkanSubmission;

    fn info(&self) -> DeviceInfo {
        self.dev.info.clone()
    }

    fn allocate(&self, bytes: u64) -> Result<VulkanBuffer, DeviceError> {
        let info = &self.dev.info;
        if bytes == 0 || bytes % 4 != 0 || bytes > info.max_buffer_size {
            return Err(DeviceError::Unsupported(format!(
                "cannot create a buffer of {bytes} bytes (max {})",
                info.max_buffer_size
            )));
        }
        let limit = self
            .dev
            .limits
            .max_allocations
            .saturating_sub(RESERVED_ALLOCATIONS);
        if self.dev.live_allocations.fetch_add(1, Ordering::AcqRel) >= limit {
            self.dev.live_allocations.fetch_sub(1, Ordering::AcqRel);
            return Err(DeviceError::OutOfMemory);
        }
        let made = self.create_buffer(bytes);
        match made {
            Ok(b) => {
                self.dev.live_bytes.fetch_add(bytes, Ordering::AcqRel);
                Ok(b)
            }
            Err(e) => {
                self.dev.live_allocations.fetch_sub(1, Ordering::AcqRel);
                Err(e.into())
            }
        }
    }

    fn address(&self, buffer: &VulkanBuffer) -> u64 {
        buffer.address()
    }

    unsafe fn release(&self, buffer: VulkanBuffer) {
        // Dropping destroys the buffer and frees its memory; the caller's
        // contract (every use completed) is what makes that valid.
        drop(buffer);
    }

    fn create_queue(&self) -> Result<VulkanQueue, DeviceError> {
        Ok(VulkanQueue {
            inner: Arc::new(QueueInner::new(self.dev.clone())?),
        })
    }

    fn orders_memory(&self, _queue: &VulkanQueue) -> bool {
        // See the module documentation: reuse waits for completion.
        false
    }

    fn begin(&self, queue: &VulkanQueue) -> Result<VulkanCommands, DeviceError> {
        self.same_device(&queue.inner.dev)?;
        let encoder = queue.inner.take_encoder()?;
        Ok(VulkanCommands {
            queue: queue.inner.clone(),
            encoder: Some(encoder),
        })
    }

    fn zero(
        &self,
        cmds: &mut Self::Commands,
        dst: Binding<'_, Self::Buffer>,
        span: Span,
    ) -> Result<(), DeviceError> {
        Harness::fill(self, cmds, dst, span, 0)
    }

    fn submit(
        &self,
        queue: &VulkanQueue,
        mut cmds: VulkanCommands,
        value: u64,
    ) -> Result<VulkanSubmission, DeviceError> {
        if !Arc::ptr_eq(&queue.inner, &cmds.queue) {
            return Err(DeviceError::Unsupported(
                "commands were begun on another queue".into(),
            ));
        }
        let enc = cmds
            .encoder
            .take()
            .ok_or_else(|| DeviceError::Other("commands already submitted".into()))?;
        let slots = enc.slots;
        let results = queue.inner.submit(enc, value)?;
        Ok(VulkanSubmission {
            slots,
            queue: queue.inner.clone(),
            value,
            results,
        })
    }

    fn completed(&self, queue: &VulkanQueue) -> Result<u64, DeviceError> {
        let done = queue.inner.counter()?;
        queue.inner.reclaim(done)?;
        Ok(done)
    }

    fn wait(
        &self,
        queue: &VulkanQueue,
        value: u64,
        timeout: Duration,
    ) -> Result<bool, DeviceError> {
        Ok(queue.inner.wait(value, timeout)?)
    }
}

impl Harness for VulkanGpu {
    fn fill(
        &self,
        cmds: &mut VulkanCommands,
        dst: Binding<'_, VulkanBuffer>,
        span: Span,
        pattern: u32,
    ) -> Result<(), DeviceError> {
        self.record(cmds, Kernel::Fill, &[dst], span, pattern, 0)
    }

    fn copy(
        &self,
        cmds: &mut VulkanCommands,
        src: Binding<'_, VulkanBuffer>,
        dst: Binding<'_, VulkanBuffer>,
        span: Span,
    ) -> Result<(), DeviceError> {
        self.record(cmds, Kernel::Copy, &[src, dst], span, 0, 0)
    }

    fn add(
        &self,
        cmds: &mut VulkanCommands,
        a: Binding<'_, VulkanBuffer>,
        b: Binding<'_, VulkanBuffer>,
        out: Binding<'_, VulkanBuffer>,
        span: Span,
    ) -> Result<(), DeviceError> {
        self.record(cmds, Kernel::Add, &[a, b, out], span, 0, 0)
    }

    fn checksum(
        &self,
        cmds: &mut VulkanCommands,
        src: Binding<'_, VulkanBuffer>,
        span: Span,
    ) -> Result<usize, DeviceError> {
        let slot = cmds.encoder.as_ref().map_or(0, |e| e.slots);
        self.record(cmds, Kernel::Checksum, &[src], span, 0, slot)?;
        if let Some(e) = cmds.encoder.as_mut() {
            e.slots += 1;
        }
        Ok(slot)
    }

    fn slots(&self, submission: &VulkanSubmission) -> usize {
        submission.slots
    }

    fn results(&self, submission: &VulkanSubmission) -> Result<Vec<u64>, DeviceError> {
        if let Some(r) = submission.results.get() {
            return Ok(r.clone());
        }
        let q = &submission.queue;
        let done = q.counter()?;
        if done < submission.value {
            return Err(DeviceError::Other(format!(
                "submission {} has not completed (watermark {done})",
                submission.value
            )));
        }
        q.reclaim_blocking(done)?;
        submission.results.get().cloned().ok_or_else(|| {
            DeviceError::Other(format!(
                "the results of submission {} were lost",
                submission.value
            ))
        })
    }
}

impl VulkanGpu {
    fn create_buffer(&self, bytes: u64) -> Result<VulkanBuffer, raw::VkError> {
        let d = &self.dev.device;
        let usage = vk::BufferUsageFlags::STORAGE_BUFFER
            | vk::BufferUsageFlags::TRANSFER_SRC
            | vk::BufferUsageFlags::TRANSFER_DST;
        // SAFETY: the device is live; `bytes` > 0 was checked.
        let buffer = unsafe { raw::create_buffer(d, bytes, usage) }?;
        // SAFETY: `buffer` is live.
        let req = unsafe { d.get_buffer_memory_requirements(buffer) };
        let memory = match self.dev.buffer_memory_type(req.memory_type_bits) {
            // SAFETY: the type is allowed and the size is the requirement's.
            Some(ty) => unsafe { raw::allocate_dedicated(d, buffer, req.size, ty) },
            None => Err(raw::VkError {
                call: "vkAllocateMemory (no memory type for a storage buffer)",
                code: vk::Result::ERROR_FEATURE_NOT_PRESENT,
            }),
        };
        // A null memory handle is freed as a no-op below.
        let memory_or_null = *memory.as_ref().unwrap_or(&vk::DeviceMemory::null());
        // SAFETY: the memory was allocated for the unbound `buffer`.
        let bound = memory.and_then(|m| unsafe { raw::bind_buffer_memory(d, buffer, m) });
        match bound {
            Ok(()) => Ok(VulkanBuffer {
                dev: self.dev.clone(),
                buffer,
                memory: memory_or_null,
                size: bytes,
                address: self.dev.next_address.fetch_add(
                    bytes.next_multiple_of(SYNTHETIC_ADDRESS_ALIGN),
                    Ordering::Relaxed,
                ),
            }),
            Err(e) => {
                // SAFETY: neither was ever used by any command.
                unsafe { raw::destroy_buffer(d, buffer, memory_or_null) };
                Err(e)
            }
        }
    }
}

impl VulkanCommands {
    /// The command buffer this submission records into, in the recording
    /// state, for the program's own commands on bound buffers
    /// ([`crate::CommandBuffer::bind`]; [`Binding::buffer`] and the
    /// binding's offset say where each lies). The program records between
    /// the harness's dispatches, in order, and adds the barriers its own
    /// commands need; it must not end, reset or submit the command buffer.
    /// `None` once submitted.
    pub fn command_buffer(&self) -> Option<vk::CommandBuffer> {
        self.encoder.as_ref().map(|e| e.cmd)
    }
}

impl VulkanGpu {
    /// The logical device, for recording the program's own commands (see
    /// [`VulkanCommands::command_buffer`]).
    pub fn device(&self) -> &ash::Device {
        &self.dev.device
    }
}

impl Binding<'_, VulkanBuffer> {
    /// The `VkBuffer` the buffer lies in, at the binding's offset.
    pub fn buffer(&self) -> vk::Buffer {
        self.raw.buffer
    }
}

impl VulkanBuffer {
    /// Bytes of the buffer.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// A synthetic device address of the buffer's first byte, for memory
    /// snapshots: the backend enables no device addresses, so each raw
    /// buffer of a device gets `[address, address + size)` of an address
    /// space of its own, starting at 1 TiB, handed out in creation order
    /// and aligned to 2 MiB. Stable for the buffer's life, distinct from
    /// every other buffer of the device (never reused, even after a
    /// release), never 0. Not a `VkDeviceAddress`: nothing on the device
    /// can use it.
    pub fn address(&self) -> u64 {
        self.address
    }
}

impl Drop for VulkanBuffer {
    fn drop(&mut self) {
        // SAFETY: the allocator drops a raw buffer only through
        // `Backend::release`, whose caller guarantees no pending submission
        // uses it (the `Immediate` policy breaks that on purpose: see its
        // docs); buffers it cannot prove idle at teardown are leaked with
        // `mem::forget`, so this never runs for them.
        unsafe { raw::destroy_buffer(&self.dev.device, self.buffer, self.memory) };
        self.dev.live_allocations.fetch_sub(1, Ordering::AcqRel);
        self.dev.live_bytes.fetch_sub(self.size, Ordering::AcqRel);
    }
}

impl Drop for VulkanCommands {
    fn drop(&mut self) {
        if let Some(enc) = self.encoder.take() {
            self.queue.give_back(enc);
        }
    }
}
