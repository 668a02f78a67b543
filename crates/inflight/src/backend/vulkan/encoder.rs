//! Encoders: everything one submission records into, recycled once its
//! timeline value completes (after wgpu-core's `EncoderInFlight`).
//!
//! An [`Encoder`] owns a command pool with one command buffer, the
//! descriptor pools its operations' descriptor sets come from, and the
//! host-visible result chunks its checksums land in. Each owner has it alone
//! (a `VulkanCommands` while recording, the queue's in-flight list until
//! completion, the queue's free list after), so the pools' external
//! synchronisation holds without locks.
//!
//! # Ordering inside and across submissions
//!
//! Every dispatch is preceded by a compute-to-compute memory barrier, so the
//! operations of one submission run in recording order, and the first one
//! also orders the submission after earlier work on the same hardware queue.
//! The last command is a compute-to-host barrier, so checksums are visible to
//! the host once the timeline value is reached.
//!
//! # Splitting
//!
//! One binding covers at most `maxStorageBufferRange` bytes (128 MiB on
//! lavapipe) and starts at a multiple of `minStorageBufferOffsetAlignment`,
//! so an operation's span is split into chunks that each fit one binding;
//! the shaders get each chunk's word offsets (and, for checksums, the index
//! of its first word in the span) as push constants.

use ash::vk;

use super::device::{DeviceShared, PARAMS_BYTES, WORKGROUP};
use super::raw::{self, VkError};
use crate::backend::Span;

/// Checksum slots per result chunk (two words each).
pub(crate) const SLOTS_PER_CHUNK: usize = 256;
/// Descriptor sets per descriptor pool.
const SETS_PER_POOL: u32 = 64;
/// At most this many workgroups per dispatch: each invocation loops.
const MAX_GROUPS: u32 = 4096;

/// The binding a buffer takes in every shader (`@binding(n)`), in
/// [`Encoder::dispatch`] order; binding 3 is the result chunk.
const RESULT_BINDING: u32 = 3;

/// Which operation a dispatch runs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Fill,
    Copy,
    Add,
    Checksum,
}

/// A host-visible buffer of [`SLOTS_PER_CHUNK`] checksum slots, mapped for
/// its whole life.
struct ResultChunk {
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    words: *mut u32,
}

// SAFETY: `words` points into memory this chunk owns alone; it is only read
// or written by the chunk's single owner (see the module doc).
unsafe impl Send for ResultChunk {}

/// What one submission records into.
pub(crate) struct Encoder {
    pool: vk::CommandPool,
    pub(crate) cmd: vk::CommandBuffer,
    desc_pools: Vec<vk::DescriptorPool>,
    /// Index in `desc_pools` of the pool sets are allocated from now.
    desc_current: usize,
    results: Vec<ResultChunk>,
    /// Checksum slots recorded so far.
    pub(crate) slots: usize,
}

impl Encoder {
    /// A fresh encoder with one descriptor pool and no result chunk.
    pub(crate) fn new(dev: &DeviceShared) -> Result<Encoder, VkError> {
        let d = &dev.device;
        // SAFETY: the device is live (`dev` is borrowed from an `Arc`) and
        // `family` is its queue family.
        let (pool, cmd) = unsafe { raw::create_command_pool(d, dev.family) }?;
        let mut enc = Encoder {
            pool,
            cmd,
            desc_pools: Vec::new(),
            desc_current: 0,
            results: Vec::new(),
            slots: 0,
        };
        // SAFETY: the device is live.
        match unsafe { raw::create_descriptor_pool(d, SETS_PER_POOL) } {
            Ok(p) => enc.desc_pools.push(p),
            Err(e) => {
                // SAFETY: nothing of the encoder was ever submitted.
                unsafe { enc.destroy(dev) };
                return Err(e);
            }
        }
        Ok(enc)
    }

    /// Starts recording: the command buffer must be in the initial state.
    pub(crate) fn begin(&mut self, dev: &DeviceShared) -> Result<(), VkError> {
        // SAFETY: the encoder's single owner calls this on a new or reset
        // encoder, so the command buffer is in the initial state.
        unsafe { raw::begin_commands(&dev.device, self.cmd) }
    }

    /// Ends recording with the compute-to-host barrier.
    pub(crate) fn finish(&mut self, dev: &DeviceShared) -> Result<(), VkError> {
        let to_host = vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::SHADER_WRITE)
            .dst_access_mask(vk::AccessFlags::HOST_READ);
        // SAFETY: the command buffer is recording and owned by us.
        unsafe {
            dev.device.cmd_pipeline_barrier(
                self.cmd,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::PipelineStageFlags::HOST,
                vk::DependencyFlags::empty(),
                &[to_host],
                &[],
                &[],
            );
            raw::end_commands(&dev.device, self.cmd)
        }
    }

    /// Records `kernel` over `span` of `bufs` (one to three buffers, each
    /// with the byte offset its operand starts at, bound at bindings 0, 1,
    /// 2), split into chunks that fit one binding. `arg` is the fill
    /// pattern; `slot` the checksum slot.
    pub(crate) fn record(
        &mut self,
        dev: &DeviceShared,
        kernel: Kernel,
        bufs: &[(vk::Buffer, u64)],
        span: Span,
        arg: u32,
        slot: usize,
    ) -> Result<(), VkError> {
        let align = dev.limits.storage_align;
        // Every chunk of a binding is at most the storage range, including
        // the bytes its aligned start adds.
        let max_chunk = (dev.limits.max_storage_range - (align - 1)) & !3;
        let mut done = 0u64;
        while done < span.len {
            let len = (span.len - done).min(max_chunk);
            let mut params = [0u32; 6];
            let mut bindings = Vec::with_capacity(4);
            for (b, &(buf, base)) in bufs.iter().enumerate() {
                let start = base + span.offset + done;
                let bind_at = start & !(align - 1);
                let skip = start - bind_at;
                params[b] = (skip / 4) as u32;
                bindings.push((b as u32, buf, bind_at, skip + len));
            }
            params[3] = (len / 4) as u32;
            // The checksum index runs on across chunks; index_mix truncates
            // it to u32 exactly as this cast does.
            params[4] = if kernel == Kernel::Checksum {
                (done / 4) as u32
            } else {
                arg
            };
            if kernel == Kernel::Checksum {
                let chunk = self.result_chunk(dev, slot / SLOTS_PER_CHUNK)?;
                params[5] = (slot % SLOTS_PER_CHUNK) as u32;
                bindings.push((RESULT_BINDING, chunk, 0, (SLOTS_PER_CHUNK * 8) as u64));
            }
            self.dispatch(dev, kernel, &bindings, params, (len / 4) as u32)?;
            done += len;
        }
        Ok(())
    }

    /// The buffer of result chunk `index`, created (and zeroed) on first use.
    fn result_chunk(&mut self, dev: &DeviceShared, index: usize) -> Result<vk::Buffer, VkError> {
        while self.results.len() <= index {
            let chunk = new_result_chunk(dev)?;
            self.results.push(chunk);
        }
        Ok(self.results[index].buffer)
    }

    /// Zeroes the result slots of the next recording. Host writes before a
    /// submission are visible to it (host-coherent memory, submission order).
    pub(crate) fn zero_results(&mut self) {
        for c in &self.results {
            // SAFETY: the mapping covers the chunk; no pending submission uses
            // it (the encoder is idle or recording), so nothing else accesses it.
            unsafe { std::ptr::write_bytes(c.words, 0, SLOTS_PER_CHUNK * 2) };
        }
    }

    /// Reads `self.slots` checksums.
    pub(crate) fn read_results(&self) -> Vec<u64> {
        (0..self.slots)
            .map(|s| {
                let c = &self.results[s / SLOTS_PER_CHUNK];
                let i = (s % SLOTS_PER_CHUNK) * 2;
                // SAFETY: the submission completed, and its last barrier made
                // the shader writes visible to the host; `i + 1` is inside the
                // mapping of SLOTS_PER_CHUNK * 2 words.
                let (lo, hi) = unsafe {
                    (
                        c.words.add(i).read_volatile(),
                        c.words.add(i + 1).read_volatile(),
                    )
                };
                u64::from(lo) | (u64::from(hi) << 32)
            })
            .collect()
    }

    /// Makes the encoder ready for a new recording.
    ///
    /// # Safety
    ///
    /// 1. No pending submission uses the encoder (its value completed, or it
    ///    was never submitted).
    pub(crate) unsafe fn reset(&mut self, dev: &DeviceShared) -> Result<(), VkError> {
        // SAFETY: by (1), and we own the pools alone.
        unsafe {
            raw::reset_command_pool(&dev.device, self.pool)?;
            for &p in &self.desc_pools {
                raw::reset_descriptor_pool(&dev.device, p)?;
            }
        }
        self.desc_current = 0;
        self.slots = 0;
        Ok(())
    }

    /// Destroys everything the encoder owns.
    ///
    /// # Safety
    ///
    /// 1. No pending submission uses the encoder.
    pub(crate) unsafe fn destroy(self, dev: &DeviceShared) {
        let d = &dev.device;
        // SAFETY: by (1); each object is destroyed once and never used again.
        unsafe {
            d.destroy_command_pool(self.pool, None);
            for p in self.desc_pools {
                d.destroy_descriptor_pool(p, None);
            }
            for c in self.results {
                raw::destroy_buffer(d, c.buffer, c.memory);
            }
        }
    }

    fn dispatch(
        &mut self,
        dev: &DeviceShared,
        kernel: Kernel,
        bindings: &[(u32, vk::Buffer, u64, u64)],
        params: [u32; 6],
        words: u32,
    ) -> Result<(), VkError> {
        let d = &dev.device;
        let p = &dev.pipelines;
        let set = self.allocate_set(dev)?;
        let infos: Vec<[vk::DescriptorBufferInfo; 1]> = bindings
            .iter()
            .map(|&(_, buffer, offset, range)| {
                [vk::DescriptorBufferInfo {
                    buffer,
                    offset,
                    range,
                }]
            })
            .collect();
        let writes: Vec<vk::WriteDescriptorSet> = bindings
            .iter()
            .zip(&infos)
            .map(|(&(binding, ..), info)| {
                vk::WriteDescriptorSet::default()
                    .dst_set(set)
                    .dst_binding(binding)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(info)
            })
            .collect();
        let pipeline = match kernel {
            Kernel::Fill => p.fill,
            Kernel::Copy => p.copy,
            Kernel::Add => p.add,
            Kernel::Checksum => p.checksum,
        };
        let bytes: Vec<u8> = params.iter().flat_map(|w| w.to_ne_bytes()).collect();
        debug_assert_eq!(bytes.len(), PARAMS_BYTES as usize);
        let groups = words
            .div_ceil(WORKGROUP)
            .clamp(1, MAX_GROUPS.min(dev.limits.max_groups));
        let barrier = vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::SHADER_WRITE)
            .dst_access_mask(vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE);
        // SAFETY: `set` is fresh from our pool and not in use; the buffers
        // are live (the allocator holds them until commit, and their release
        // waits for completion), ranges fit them (spans were checked), and
        // offsets are aligned. The command buffer is recording and ours; the
        // pipeline and layout match the set and the 24 bytes of constants.
        unsafe {
            d.update_descriptor_sets(&writes, &[]);
            d.cmd_pipeline_barrier(
                self.cmd,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::DependencyFlags::empty(),
                &[barrier],
                &[],
                &[],
            );
            d.cmd_bind_pipeline(self.cmd, vk::PipelineBindPoint::COMPUTE, pipeline);
            d.cmd_bind_descriptor_sets(
                self.cmd,
                vk::PipelineBindPoint::COMPUTE,
                p.layout,
                0,
                &[set],
                &[],
            );
            d.cmd_push_constants(self.cmd, p.layout, vk::ShaderStageFlags::COMPUTE, 0, &bytes);
            d.cmd_dispatch(self.cmd, groups, 1, 1);
        }
        Ok(())
    }

    /// A descriptor set from the current pool, adding a pool when it is full.
    fn allocate_set(&mut self, dev: &DeviceShared) -> Result<vk::DescriptorSet, VkError> {
        let layout = dev.pipelines.set_layout;
        loop {
            let pool = self.desc_pools[self.desc_current];
            // SAFETY: the pool is ours alone and the layout is live.
            if let Some(set) = unsafe { raw::allocate_set(&dev.device, pool, layout) }? {
                return Ok(set);
            }
            self.desc_current += 1;
            if self.desc_current == self.desc_pools.len() {
                // SAFETY: the device is live.
                let p = unsafe { raw::create_descriptor_pool(&dev.device, SETS_PER_POOL) }?;
                self.desc_pools.push(p);
            }
        }
    }
}

fn new_result_chunk(dev: &DeviceShared) -> Result<ResultChunk, VkError> {
    let d = &dev.device;
    let size = (SLOTS_PER_CHUNK * 8) as u64;
    // SAFETY: the device is live.
    let buffer = unsafe { raw::create_buffer(d, size, vk::BufferUsageFlags::STORAGE_BUFFER) }?;
    // SAFETY: `buffer` is live.
    let req = unsafe { d.get_buffer_memory_requirements(buffer) };
    let flags = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
    let made = (|| {
        let ty = dev
            .memory_type(req.memory_type_bits, flags)
            .ok_or(VkError {
                call: "vkAllocateMemory (no host-visible coherent memory type)",
                code: vk::Result::ERROR_FEATURE_NOT_PRESENT,
            })?;
        // SAFETY: `ty` is allowed by the requirements and the size is theirs.
        let memory = unsafe { raw::allocate_dedicated(d, buffer, req.size, ty) }?;
        // SAFETY: `memory` was allocated for `buffer`, which is unbound; it
        // is host-visible and unmapped.
        let words = unsafe {
            raw::bind_buffer_memory(d, buffer, memory)
                .and_then(|()| raw::map_whole(d, memory))
                .inspect_err(|_| d.free_memory(memory, None))
        }?;
        // SAFETY: the mapping covers `size` bytes and nothing uses it yet.
        unsafe { std::ptr::write_bytes(words as *mut u8, 0, size as usize) };
        Ok((memory, words as *mut u32))
    })();
    match made {
        Ok((memory, words)) => Ok(ResultChunk {
            buffer,
            memory,
            words,
        }),
        Err(e) => {
            // SAFETY: the buffer was never used.
            unsafe { d.destroy_buffer(buffer, None) };
            Err(e)
        }
    }
}
