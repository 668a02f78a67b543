//! The thin raw layer over ash: every Vulkan call the backend makes that can
//! fail goes through here and returns `Result<_, VkError>`, with the call's
//! name kept for the message (after cudarc's `result` layer). Recording calls
//! (`vkCmd*`) cannot fail and are made directly by `encoder.rs`.
//!
//! The functions are `unsafe` exactly where Vulkan has a validity rule the
//! type system cannot see; each lists it under `# Safety`.

use std::ffi::c_void;

use ash::vk;

use crate::backend::DeviceError;

/// A failed Vulkan call: its name and the code it returned.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{call} failed: {code:?}")]
pub struct VkError {
    /// The Vulkan entry point, e.g. `vkAllocateMemory`.
    pub call: &'static str,
    /// The code it returned.
    pub code: vk::Result,
}

impl From<VkError> for DeviceError {
    fn from(e: VkError) -> Self {
        match e.code {
            vk::Result::ERROR_OUT_OF_DEVICE_MEMORY | vk::Result::ERROR_OUT_OF_HOST_MEMORY => {
                DeviceError::OutOfMemory
            }
            vk::Result::ERROR_DEVICE_LOST => DeviceError::Lost(e.to_string()),
            _ => DeviceError::Other(e.to_string()),
        }
    }
}

/// Tags an ash result with the call's name.
pub(crate) fn check<T>(call: &'static str, r: ash::prelude::VkResult<T>) -> Result<T, VkError> {
    r.map_err(|code| VkError { call, code })
}

/// Creates a buffer of `size` bytes usable as a storage buffer and for
/// transfers, with exclusive sharing.
///
/// # Safety
///
/// 1. `dev` is a live device.
pub(crate) unsafe fn create_buffer(
    dev: &ash::Device,
    size: u64,
    usage: vk::BufferUsageFlags,
) -> Result<vk::Buffer, VkError> {
    let info = vk::BufferCreateInfo::default()
        .size(size)
        .usage(usage)
        .sharing_mode(vk::SharingMode::EXCLUSIVE);
    // SAFETY: `info` is a valid create info (size > 0 is the caller's check
    // in `VulkanGpu::allocate`); the device is live by (1).
    check("vkCreateBuffer", unsafe { dev.create_buffer(&info, None) })
}

/// Allocates `size` bytes of memory type `type_index` dedicated to `buffer`.
///
/// # Safety
///
/// 1. `dev` is a live device and `buffer` one of its buffers, not yet bound.
/// 2. `type_index` is a memory type allowed by the buffer's requirements and
///    `size` is at least the required size.
pub(crate) unsafe fn allocate_dedicated(
    dev: &ash::Device,
    buffer: vk::Buffer,
    size: u64,
    type_index: u32,
) -> Result<vk::DeviceMemory, VkError> {
    let mut dedicated = vk::MemoryDedicatedAllocateInfo::default().buffer(buffer);
    let info = vk::MemoryAllocateInfo::default()
        .allocation_size(size)
        .memory_type_index(type_index)
        .push_next(&mut dedicated);
    // SAFETY: by (1) and (2) the allocate info is valid for this device.
    check("vkAllocateMemory", unsafe {
        dev.allocate_memory(&info, None)
    })
}

/// Binds `memory` to `buffer` at offset 0.
///
/// # Safety
///
/// 1. Both belong to the live `dev`; `buffer` is unbound; `memory` was
///    allocated for it (type and size from its requirements).
pub(crate) unsafe fn bind_buffer_memory(
    dev: &ash::Device,
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
) -> Result<(), VkError> {
    // SAFETY: by (1).
    check("vkBindBufferMemory", unsafe {
        dev.bind_buffer_memory(buffer, memory, 0)
    })
}

/// Maps the whole of `memory`.
///
/// # Safety
///
/// 1. `memory` belongs to the live `dev`, is host-visible and not mapped.
pub(crate) unsafe fn map_whole(
    dev: &ash::Device,
    memory: vk::DeviceMemory,
) -> Result<*mut c_void, VkError> {
    // SAFETY: by (1).
    check("vkMapMemory", unsafe {
        dev.map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty())
    })
}

/// Destroys `buffer` and frees `memory` (either may be null).
///
/// # Safety
///
/// 1. Both belong to the live `dev` and no pending command buffer uses them
///    (VUID-vkDestroyBuffer-buffer-00922, VUID-vkFreeMemory-memory-00677);
///    the only deliberate exception is the `Immediate` policy's
///    demonstration, which is undefined behaviour on a real driver.
/// 2. Neither is used again.
pub(crate) unsafe fn destroy_buffer(
    dev: &ash::Device,
    buffer: vk::Buffer,
    memory: vk::DeviceMemory,
) {
    // SAFETY: by (1) and (2); destroying a null handle is a no-op.
    unsafe {
        dev.destroy_buffer(buffer, None);
        dev.free_memory(memory, None);
    }
}

/// Creates a timeline semaphore starting at 0.
///
/// # Safety
///
/// 1. `dev` is live and was created with the `timelineSemaphore` feature.
pub(crate) unsafe fn create_timeline(dev: &ash::Device) -> Result<vk::Semaphore, VkError> {
    let mut kind = vk::SemaphoreTypeCreateInfo::default()
        .semaphore_type(vk::SemaphoreType::TIMELINE)
        .initial_value(0);
    let info = vk::SemaphoreCreateInfo::default().push_next(&mut kind);
    // SAFETY: by (1) timeline semaphores are enabled.
    check("vkCreateSemaphore", unsafe {
        dev.create_semaphore(&info, None)
    })
}

/// The timeline semaphore's current counter value.
///
/// # Safety
///
/// 1. `sem` is a live timeline semaphore of the live `dev`.
pub(crate) unsafe fn counter_value(dev: &ash::Device, sem: vk::Semaphore) -> Result<u64, VkError> {
    // SAFETY: by (1); the call needs no external synchronisation.
    check("vkGetSemaphoreCounterValue", unsafe {
        dev.get_semaphore_counter_value(sem)
    })
}

/// Waits until `sem` reaches `value` or `timeout_ns` passes; returns whether
/// it was reached.
///
/// # Safety
///
/// 1. `sem` is a live timeline semaphore of the live `dev`.
pub(crate) unsafe fn wait_timeline(
    dev: &ash::Device,
    sem: vk::Semaphore,
    value: u64,
    timeout_ns: u64,
) -> Result<bool, VkError> {
    let sems = [sem];
    let values = [value];
    let info = vk::SemaphoreWaitInfo::default()
        .semaphores(&sems)
        .values(&values);
    // SAFETY: by (1); waiting needs no external synchronisation.
    match unsafe { dev.wait_semaphores(&info, timeout_ns) } {
        Ok(()) => Ok(true),
        Err(vk::Result::TIMEOUT) => Ok(false),
        Err(code) => Err(VkError {
            call: "vkWaitSemaphores",
            code,
        }),
    }
}

/// Submits one command buffer that signals `sem` with `value` on completion.
///
/// # Safety
///
/// 1. `queue` belongs to the live `dev` and the caller holds its lock (queue
///    submission is externally synchronised).
/// 2. `cmd` is in the executable state and not pending.
/// 3. `value` is greater than every value already signalled or pending on
///    `sem`.
pub(crate) unsafe fn submit_signal(
    dev: &ash::Device,
    queue: vk::Queue,
    cmd: vk::CommandBuffer,
    sem: vk::Semaphore,
    value: u64,
) -> Result<(), VkError> {
    let cmds = [cmd];
    let sems = [sem];
    let values = [value];
    let mut timeline = vk::TimelineSemaphoreSubmitInfo::default().signal_semaphore_values(&values);
    let submit = vk::SubmitInfo::default()
        .command_buffers(&cmds)
        .signal_semaphores(&sems)
        .push_next(&mut timeline);
    // SAFETY: by (1) to (3).
    check("vkQueueSubmit", unsafe {
        dev.queue_submit(queue, &[submit], vk::Fence::null())
    })
}

/// Creates a command pool for `family` with one primary command buffer.
///
/// # Safety
///
/// 1. `dev` is live and `family` one of its queue families.
pub(crate) unsafe fn create_command_pool(
    dev: &ash::Device,
    family: u32,
) -> Result<(vk::CommandPool, vk::CommandBuffer), VkError> {
    let info = vk::CommandPoolCreateInfo::default()
        .queue_family_index(family)
        .flags(vk::CommandPoolCreateFlags::TRANSIENT);
    // SAFETY: by (1).
    let pool = check("vkCreateCommandPool", unsafe {
        dev.create_command_pool(&info, None)
    })?;
    let alloc = vk::CommandBufferAllocateInfo::default()
        .command_pool(pool)
        .level(vk::CommandBufferLevel::PRIMARY)
        .command_buffer_count(1);
    // SAFETY: `pool` was just created on `dev`; nothing else uses it.
    match unsafe { dev.allocate_command_buffers(&alloc) } {
        Ok(v) => Ok((pool, v[0])),
        Err(code) => {
            // SAFETY: the pool is unused; it is destroyed once.
            unsafe { dev.destroy_command_pool(pool, None) };
            Err(VkError {
                call: "vkAllocateCommandBuffers",
                code,
            })
        }
    }
}

/// Resets every command buffer of `pool` to the initial state.
///
/// # Safety
///
/// 1. `pool` belongs to the live `dev`, the caller has exclusive access to
///    it, and none of its command buffers is pending.
pub(crate) unsafe fn reset_command_pool(
    dev: &ash::Device,
    pool: vk::CommandPool,
) -> Result<(), VkError> {
    // SAFETY: by (1).
    check("vkResetCommandPool", unsafe {
        dev.reset_command_pool(pool, vk::CommandPoolResetFlags::empty())
    })
}

/// Begins recording a one-time-submit command buffer.
///
/// # Safety
///
/// 1. `cmd` belongs to the live `dev`, is in the initial state, and the
///    caller has exclusive access to its pool.
pub(crate) unsafe fn begin_commands(
    dev: &ash::Device,
    cmd: vk::CommandBuffer,
) -> Result<(), VkError> {
    let info =
        vk::CommandBufferBeginInfo::default().flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
    // SAFETY: by (1).
    check("vkBeginCommandBuffer", unsafe {
        dev.begin_command_buffer(cmd, &info)
    })
}

/// Ends recording.
///
/// # Safety
///
/// 1. `cmd` belongs to the live `dev`, is recording, and the caller has
///    exclusive access to its pool.
pub(crate) unsafe fn end_commands(
    dev: &ash::Device,
    cmd: vk::CommandBuffer,
) -> Result<(), VkError> {
    // SAFETY: by (1).
    check("vkEndCommandBuffer", unsafe { dev.end_command_buffer(cmd) })
}

/// Creates a descriptor pool for `sets` sets of up to four storage buffers.
///
/// # Safety
///
/// 1. `dev` is live.
pub(crate) unsafe fn create_descriptor_pool(
    dev: &ash::Device,
    sets: u32,
) -> Result<vk::DescriptorPool, VkError> {
    let sizes = [vk::DescriptorPoolSize {
        ty: vk::DescriptorType::STORAGE_BUFFER,
        descriptor_count: sets * 4,
    }];
    let info = vk::DescriptorPoolCreateInfo::default()
        .max_sets(sets)
        .pool_sizes(&sizes);
    // SAFETY: by (1).
    check("vkCreateDescriptorPool", unsafe {
        dev.create_descriptor_pool(&info, None)
    })
}

/// Allocates one set of `layout` from `pool`; `Ok(None)` when the pool is
/// full.
///
/// # Safety
///
/// 1. `pool` and `layout` belong to the live `dev`; the caller has exclusive
///    access to `pool`.
pub(crate) unsafe fn allocate_set(
    dev: &ash::Device,
    pool: vk::DescriptorPool,
    layout: vk::DescriptorSetLayout,
) -> Result<Option<vk::DescriptorSet>, VkError> {
    let layouts = [layout];
    let info = vk::DescriptorSetAllocateInfo::default()
        .descriptor_pool(pool)
        .set_layouts(&layouts);
    // SAFETY: by (1).
    match unsafe { dev.allocate_descriptor_sets(&info) } {
        Ok(v) => Ok(Some(v[0])),
        Err(vk::Result::ERROR_OUT_OF_POOL_MEMORY | vk::Result::ERROR_FRAGMENTED_POOL) => Ok(None),
        Err(code) => Err(VkError {
            call: "vkAllocateDescriptorSets",
            code,
        }),
    }
}

/// Frees every set of `pool`.
///
/// # Safety
///
/// 1. `pool` belongs to the live `dev`, the caller has exclusive access, and
///    no pending command buffer uses its sets.
pub(crate) unsafe fn reset_descriptor_pool(
    dev: &ash::Device,
    pool: vk::DescriptorPool,
) -> Result<(), VkError> {
    // SAFETY: by (1).
    check("vkResetDescriptorPool", unsafe {
        dev.reset_descriptor_pool(pool, vk::DescriptorPoolResetFlags::empty())
    })
}
