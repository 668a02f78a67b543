//! The Metal device: opening it, compiling the harness kernels, creating
//! and releasing buffers, the residency set, and the pool of result
//! buffers. Apple targets only.
//!
//! # Buffers
//!
//! Made as MLX makes them: `newBufferWithLength:options:` with
//! `MTLResourceStorageModeShared | MTLResourceHazardTrackingModeUntracked`.
//! Shared storage is the one memory of Apple silicon, seen by CPU and GPU;
//! untracked hazards mean Metal inserts no dependency between passes or
//! command buffers that use the same buffer: ordering is ours (fences
//! between our encoders, events between command buffers).
//!
//! # Residency
//!
//! Where the OS has residency sets (macOS 15+; found by asking the device
//! whether it answers `newResidencySetWithDescriptor:error:`), one set per
//! device is attached to every queue. Buffers go into it at allocation and
//! out at release, within the wired budget ([`super::residency`] does the
//! accounting). Elsewhere, or with [`super::MetalConfig::residency_sets`]
//! off, buffers are simply not wired.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use objc2::rc::Retained;
use objc2::runtime::{NSObjectProtocol, ProtocolObject};
use objc2::sel;
use objc2_foundation::{NSError, NSString};
use objc2_metal::{
    MTLBuffer, MTLComputePipelineState, MTLCreateSystemDefaultDevice, MTLDevice, MTLLibrary,
    MTLResidencySet, MTLResidencySetDescriptor, MTLResourceOptions,
};
use parking_lot::Mutex;

use super::residency::{Placement, ResidencyBudget};
use super::shader::{Kernel, GROUP, MAX_OP_SPAN, SLOTS_PER_CHUNK, SOURCE};
use super::MetalConfig;
use crate::backend::{DeviceError, DeviceInfo};

// MTLCreateSystemDefaultDevice needs CoreGraphics linked (objc2-metal's
// crate documentation says so).
#[link(name = "CoreGraphics", kind = "framework")]
extern "C" {}

/// A raw Metal buffer object.
pub(crate) type RawBuffer = ProtocolObject<dyn MTLBuffer>;
/// A compiled kernel.
pub(crate) type Pipeline = ProtocolObject<dyn MTLComputePipelineState>;

/// How every buffer is made: MLX's options (see the module doc).
pub(crate) const BUFFER_OPTIONS: MTLResourceOptions =
    MTLResourceOptions::StorageModeShared.union(MTLResourceOptions::HazardTrackingModeUntracked);

/// The description of an `NSError`, with its domain and code.
pub(crate) fn describe(e: &NSError) -> String {
    format!("{} ({} {})", e.localizedDescription(), e.domain(), e.code())
}

/// The four compiled kernels.
pub(crate) struct Kernels {
    pipelines: [Retained<Pipeline>; 4],
}

impl Kernels {
    fn compile(device: &ProtocolObject<dyn MTLDevice>) -> Result<Kernels, DeviceError> {
        let library = device
            .newLibraryWithSource_options_error(&NSString::from_str(SOURCE), None)
            .map_err(|e| {
                DeviceError::Other(format!("compiling the Metal kernels: {}", describe(&e)))
            })?;
        let pipeline = |k: Kernel| -> Result<Retained<Pipeline>, DeviceError> {
            let function = library
                .newFunctionWithName(&NSString::from_str(k.entry()))
                .ok_or_else(|| {
                    DeviceError::Other(format!("kernel {} missing from its library", k.entry()))
                })?;
            let p = device
                .newComputePipelineStateWithFunction_error(&function)
                .map_err(|e| {
                    DeviceError::Other(format!("pipeline for {}: {}", k.entry(), describe(&e)))
                })?;
            if p.maxTotalThreadsPerThreadgroup() < GROUP as usize {
                return Err(DeviceError::Unsupported(format!(
                    "kernel {} allows {} threads per threadgroup, below {GROUP}",
                    k.entry(),
                    p.maxTotalThreadsPerThreadgroup()
                )));
            }
            Ok(p)
        };
        let [fill, copy, add, checksum] = Kernel::ALL;
        Ok(Kernels {
            pipelines: [
                pipeline(fill)?,
                pipeline(copy)?,
                pipeline(add)?,
                pipeline(checksum)?,
            ],
        })
    }

    /// The pipeline of `kernel`.
    pub(crate) fn get(&self, kernel: Kernel) -> &Pipeline {
        let i = Kernel::ALL
            .iter()
            .position(|&k| k == kernel)
            .expect("every kernel is in ALL");
        &self.pipelines[i]
    }
}

/// The residency set and its accounting.
pub(crate) struct Residency {
    pub(crate) set: Retained<ProtocolObject<dyn MTLResidencySet>>,
    budget: ResidencyBudget,
    /// Every accounted buffer, for promotions and demotions; an entry goes
    /// at the buffer's release, before its last reference is dropped.
    objects: HashMap<u64, Retained<RawBuffer>>,
}

// SAFETY: Metal objects may be used from any thread (Apple's "Metal
// objects are thread-safe" for devices, resources and residency sets' own
// calls); every use of these goes through the device's `residency` mutex,
// so no two threads call into the set at once.
unsafe impl Send for Residency {}

impl Residency {
    fn add(&mut self, id: u64, bytes: u64, buffer: &Retained<RawBuffer>) {
        if self.budget.insert(id, bytes) == Placement::Wired {
            self.set.addAllocation(ProtocolObject::from_ref(&**buffer));
        }
        self.objects.insert(id, buffer.clone());
    }

    fn remove(&mut self, id: u64) {
        let Some(buffer) = self.objects.remove(&id) else {
            return;
        };
        let removal = self.budget.remove(id);
        if removal.was_wired {
            self.set
                .removeAllocation(ProtocolObject::from_ref(&*buffer));
        }
        for p in removal.promoted {
            if let Some(b) = self.objects.get(&p) {
                self.set.addAllocation(ProtocolObject::from_ref(&**b));
            }
        }
        if removal.commit_now {
            self.set.commit();
            self.budget.committed();
        }
    }

    /// Commits the set if buffers were added since the last commit.
    pub(crate) fn commit_if_needed(&mut self) {
        if self.budget.needs_commit() {
            self.set.commit();
            self.budget.committed();
        }
    }

    fn set_limit(&mut self, limit: u64) -> u64 {
        let before = self.budget.limit();
        let change = self.budget.set_limit(limit);
        for id in change.demoted {
            if let Some(b) = self.objects.get(&id) {
                self.set.removeAllocation(ProtocolObject::from_ref(&**b));
            }
        }
        for id in change.promoted {
            if let Some(b) = self.objects.get(&id) {
                self.set.addAllocation(ProtocolObject::from_ref(&**b));
            }
        }
        self.commit_if_needed();
        before
    }
}

/// A shared-storage buffer of [`SLOTS_PER_CHUNK`] checksum slots.
pub(crate) struct ResultChunk {
    pub(crate) buffer: Retained<RawBuffer>,
}

// SAFETY: a chunk has one owner at a time (the device's pool, a recording,
// or a submission's completed handler), and its contents are touched only
// by that owner: zeroed before recording, read after the GPU finished.
unsafe impl Send for ResultChunk {}

impl ResultChunk {
    /// Reads slots `0..n` (`n <= SLOTS_PER_CHUNK`) as u64 from (lo, hi).
    pub(crate) fn read(&self, n: usize) -> Vec<u64> {
        let words = self.buffer.contents().cast::<u32>().as_ptr();
        (0..n.min(SLOTS_PER_CHUNK))
            .map(|s| {
                // SAFETY: the buffer holds SLOTS_PER_CHUNK * 2 words in shared
                // storage, mapped for its life; the caller reads only after
                // the command buffer that wrote it completed.
                let (lo, hi) = unsafe {
                    (
                        words.add(2 * s).read_volatile(),
                        words.add(2 * s + 1).read_volatile(),
                    )
                };
                u64::from(lo) | (u64::from(hi) << 32)
            })
            .collect()
    }

    fn zero(&self) {
        // SAFETY: the chunk is owned by the caller and no submission uses it
        // (pooled chunks come back only from completed handlers); the
        // mapping covers SLOTS_PER_CHUNK * 8 bytes.
        unsafe {
            std::ptr::write_bytes(
                self.buffer.contents().cast::<u8>().as_ptr(),
                0,
                SLOTS_PER_CHUNK * 8,
            )
        };
    }
}

/// Result chunks kept for reuse; more are released.
const MAX_POOLED_CHUNKS: usize = 64;

/// Everything one device shares between its handles, queues and buffers.
pub(crate) struct DeviceShared {
    pub(crate) device: Retained<ProtocolObject<dyn MTLDevice>>,
    pub(crate) kernels: Kernels,
    pub(crate) info: DeviceInfo,
    pub(crate) config: MetalConfig,
    /// The residency set, where the OS has them and the config wants one.
    pub(crate) residency: Option<Mutex<Residency>>,
    chunks: Mutex<Vec<ResultChunk>>,
    next_buffer: AtomicU64,
    pub(crate) live_bytes: AtomicU64,
}

impl DeviceShared {
    /// Opens the system's default Metal device.
    pub(crate) fn open(config: MetalConfig) -> Result<DeviceShared, DeviceError> {
        let device = MTLCreateSystemDefaultDevice().ok_or_else(|| {
            DeviceError::Unsupported(
                "no Metal device (MTLCreateSystemDefaultDevice returned nil)".into(),
            )
        })?;
        let kernels = Kernels::compile(&device)?;
        let max_buffer = (device.maxBufferLength() as u64) & !3;
        let capacity = device.recommendedMaxWorkingSetSize();
        let info = DeviceInfo {
            backend: "metal",
            name: device.name().to_string(),
            memory_capacity: capacity,
            max_buffer_size: max_buffer,
            max_op_span: max_buffer.min(MAX_OP_SPAN),
        };
        let residency = if config.residency_sets && has_residency_sets(&device) {
            let desc = MTLResidencySetDescriptor::new();
            let set = device
                .newResidencySetWithDescriptor_error(&desc)
                .map_err(|e| DeviceError::Other(format!("residency set: {}", describe(&e))))?;
            Some(Mutex::new(Residency {
                set,
                budget: ResidencyBudget::new(config.wired_limit.unwrap_or(capacity)),
                objects: HashMap::new(),
            }))
        } else {
            None
        };
        Ok(DeviceShared {
            device,
            kernels,
            info,
            config,
            residency,
            chunks: Mutex::new(Vec::new()),
            next_buffer: AtomicU64::new(1),
            live_bytes: AtomicU64::new(0),
        })
    }

    /// A new buffer of `bytes` bytes (checked by the caller), with its id,
    /// placed in the residency set when it fits the budget.
    pub(crate) fn new_buffer(&self, bytes: u64) -> Result<(Retained<RawBuffer>, u64), DeviceError> {
        let len = usize::try_from(bytes).map_err(|_| DeviceError::OutOfMemory)?;
        let buffer = self
            .device
            .newBufferWithLength_options(len, BUFFER_OPTIONS)
            .ok_or(DeviceError::OutOfMemory)?;
        let id = self.next_buffer.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = &self.residency {
            r.lock().add(id, bytes, &buffer);
        }
        self.live_bytes.fetch_add(bytes, Ordering::AcqRel);
        Ok((buffer, id))
    }

    /// Forgets buffer `id` of `bytes` bytes, just before its last reference
    /// is dropped: out of the residency set, committed at once.
    pub(crate) fn forget_buffer(&self, id: u64, bytes: u64) {
        if let Some(r) = &self.residency {
            r.lock().remove(id);
        }
        self.live_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Changes the wired budget; returns the previous one.
    pub(crate) fn set_wired_limit(&self, bytes: u64) -> Option<u64> {
        self.residency.as_ref().map(|r| r.lock().set_limit(bytes))
    }

    /// Bytes wired and bytes left out of the set.
    pub(crate) fn wired(&self) -> Option<(u64, u64)> {
        self.residency.as_ref().map(|r| {
            let r = r.lock();
            (r.budget.wired_bytes(), r.budget.unwired_bytes())
        })
    }

    /// A zeroed result chunk: a pooled one, else a new one.
    pub(crate) fn take_chunk(&self) -> Result<ResultChunk, DeviceError> {
        let chunk = match self.chunks.lock().pop() {
            Some(c) => c,
            None => ResultChunk {
                buffer: self
                    .device
                    .newBufferWithLength_options(
                        SLOTS_PER_CHUNK * 8,
                        MTLResourceOptions::StorageModeShared,
                    )
                    .ok_or(DeviceError::OutOfMemory)?,
            },
        };
        chunk.zero();
        Ok(chunk)
    }

    /// Takes back chunks no submission uses any more.
    pub(crate) fn give_back_chunks(&self, chunks: Vec<ResultChunk>) {
        let mut pool = self.chunks.lock();
        for c in chunks {
            if pool.len() < MAX_POOLED_CHUNKS {
                pool.push(c);
            }
        }
    }
}

/// Whether the OS offers residency sets (macOS 15+).
fn has_residency_sets(device: &ProtocolObject<dyn MTLDevice>) -> bool {
    device.respondsToSelector(sel!(newResidencySetWithDescriptor:error:))
}
