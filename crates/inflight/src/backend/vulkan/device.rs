//! Opening the device: the loader (at run time), the instance with the
//! optional validation layer, the choice of physical device, the logical
//! device with one compute queue and timeline semaphores, and the compute
//! pipelines of the four operations.
//!
//! # Device choice
//!
//! Without an override, the first discrete GPU, else the first integrated
//! GPU, else a virtual GPU, else the CPU device (lavapipe). An override (the
//! config's `device`, else `INFLIGHT_VULKAN_DEVICE`) is an index in
//! enumeration order or a case-insensitive substring of the device's name.

use std::ffi::{c_char, CStr};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use ash::vk;
use parking_lot::Mutex;

use super::raw::{check, VkError};
use super::validation::{messenger_info, ValidationLog, ValidationRequest};
use super::VulkanConfig;
use crate::backend::{DeviceError, DeviceInfo};

const VALIDATION_LAYER: &CStr = c"VK_LAYER_KHRONOS_validation";

/// Words per workgroup of every shader (`WORKGROUP` in `common.wgsl`).
pub(crate) const WORKGROUP: u32 = 256;
/// Bytes of the push constants (`Params` in `common.wgsl`).
pub(crate) const PARAMS_BYTES: u32 = 24;

/// The compute pipelines, one per operation, sharing one layout.
pub(crate) struct Pipelines {
    pub set_layout: vk::DescriptorSetLayout,
    pub layout: vk::PipelineLayout,
    pub fill: vk::Pipeline,
    pub copy: vk::Pipeline,
    pub add: vk::Pipeline,
    pub checksum: vk::Pipeline,
}

/// Device limits the backend respects.
#[derive(Copy, Clone, Debug)]
pub(crate) struct Limits {
    /// `minStorageBufferOffsetAlignment`.
    pub storage_align: u64,
    /// `maxStorageBufferRange`: the longest range one binding may cover.
    pub max_storage_range: u64,
    /// `maxMemoryAllocationCount`.
    pub max_allocations: u64,
    /// `maxComputeWorkGroupCount[0]`.
    pub max_groups: u32,
}

/// Everything the device's objects share; dropped last.
pub(crate) struct DeviceShared {
    _entry: ash::Entry,
    instance: ash::Instance,
    messenger: Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
    /// The layer's score; behind an `Arc` so its address (the callback's
    /// user data) never moves while the messenger and instance live.
    pub log: Arc<ValidationLog>,
    pub validation: bool,
    pub device: ash::Device,
    /// The one hardware queue; submission is externally synchronised.
    pub queue: Mutex<vk::Queue>,
    pub family: u32,
    pub memory: vk::PhysicalDeviceMemoryProperties,
    pub limits: Limits,
    pub pipelines: Pipelines,
    pub info: DeviceInfo,
    /// Raw buffers currently allocated: count and bytes.
    pub live_allocations: AtomicU64,
    pub live_bytes: AtomicU64,
    /// The next synthetic address (see `VulkanBuffer::address`): only grows.
    pub next_address: AtomicU64,
}

/// A physical device as the chooser sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub name: String,
    pub kind: vk::PhysicalDeviceType,
}

/// Picks a device: the override if given, else by kind preference.
pub(crate) fn choose(candidates: &[Candidate], choice: Option<&str>) -> Result<usize, String> {
    let list = || {
        candidates
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{i}: {} ({:?})", c.name, c.kind))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if candidates.is_empty() {
        return Err("no Vulkan physical device".into());
    }
    if let Some(choice) = choice.map(str::trim).filter(|c| !c.is_empty()) {
        if let Ok(i) = choice.parse::<usize>() {
            return if i < candidates.len() {
                Ok(i)
            } else {
                Err(format!("no Vulkan device {i}; devices: {}", list()))
            };
        }
        let needle = choice.to_lowercase();
        return candidates
            .iter()
            .position(|c| c.name.to_lowercase().contains(&needle))
            .ok_or_else(|| {
                format!(
                    "no Vulkan device named like {choice:?}; devices: {}",
                    list()
                )
            });
    }
    let rank = |k: vk::PhysicalDeviceType| match k {
        vk::PhysicalDeviceType::DISCRETE_GPU => 0,
        vk::PhysicalDeviceType::INTEGRATED_GPU => 1,
        vk::PhysicalDeviceType::VIRTUAL_GPU => 2,
        vk::PhysicalDeviceType::CPU => 3,
        _ => 4,
    };
    Ok((0..candidates.len())
        .min_by_key(|&i| (rank(candidates[i].kind), i))
        .expect("not empty"))
}

fn unavailable(why: impl std::fmt::Display) -> DeviceError {
    DeviceError::Unsupported(format!("Vulkan unavailable: {why}"))
}

fn name_of(raw: &[c_char]) -> String {
    // SAFETY: Vulkan fills fixed-size name arrays with a NUL-terminated string.
    unsafe { CStr::from_ptr(raw.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

impl DeviceShared {
    /// Opens the loader and the device the config chooses.
    pub(crate) fn open(config: &VulkanConfig) -> Result<Arc<DeviceShared>, DeviceError> {
        // SAFETY: loading the system's Vulkan loader runs its initialisers;
        // the loader is a well-behaved shared library.
        let entry = unsafe { ash::Entry::load() }.map_err(unavailable)?;
        // SAFETY: `entry` is a loaded loader; the call takes no pointers.
        let layers = unsafe { entry.enumerate_instance_layer_properties() }.map_err(|code| {
            unavailable(VkError {
                call: "vkEnumerateInstanceLayerProperties",
                code,
            })
        })?;
        let have_layer = layers
            .iter()
            .any(|l| name_of(&l.layer_name) == VALIDATION_LAYER.to_string_lossy());
        let validation = match config.validation_request() {
            ValidationRequest::Off => false,
            ValidationRequest::IfAvailable => have_layer,
            ValidationRequest::Required if have_layer => true,
            ValidationRequest::Required => {
                return Err(unavailable(
                    "validation was required but VK_LAYER_KHRONOS_validation is not installed",
                ))
            }
        };
        let log = Arc::new(ValidationLog::default());
        log.echo(config.echo_errors);

        let app = vk::ApplicationInfo::default()
            .application_name(c"inflight")
            .engine_name(c"inflight")
            .api_version(vk::API_VERSION_1_2);
        let layer_names = [VALIDATION_LAYER.as_ptr()];
        let ext_names = [ash::ext::debug_utils::NAME.as_ptr()];
        let mut chained = messenger_info(&log);
        let mut info = vk::InstanceCreateInfo::default().application_info(&app);
        if validation {
            info = info
                .enabled_layer_names(&layer_names)
                .enabled_extension_names(&ext_names)
                .push_next(&mut chained);
        }
        // SAFETY: `info` and everything it points at live across the call;
        // the chained messenger's user data (`log`) outlives the instance
        // (it is kept in `DeviceShared`, dropped after the instance).
        let instance = unsafe { entry.create_instance(&info, None) }.map_err(|code| {
            let e = VkError {
                call: "vkCreateInstance",
                code,
            };
            if code == vk::Result::ERROR_INCOMPATIBLE_DRIVER {
                unavailable(format!(
                    "no Vulkan driver found ({e}); check VK_DRIVER_FILES"
                ))
            } else {
                unavailable(e)
            }
        })?;
        let mut guard = InstanceGuard {
            instance: Some(instance),
            messenger: None,
        };
        let instance = guard.instance.as_ref().expect("just set");
        if validation {
            let du = ash::ext::debug_utils::Instance::new(&entry, instance);
            // SAFETY: the instance enabled VK_EXT_debug_utils; `log` outlives
            // the messenger (destroyed in `Drop` before `log` is dropped).
            let m = unsafe { du.create_debug_utils_messenger(&messenger_info(&log), None) }
                .map_err(|code| {
                    DeviceError::from(VkError {
                        call: "vkCreateDebugUtilsMessengerEXT",
                        code,
                    })
                })?;
            guard.messenger = Some((du, m));
        }

        // SAFETY: `instance` is live.
        let physicals = unsafe { instance.enumerate_physical_devices() }.map_err(|code| {
            unavailable(VkError {
                call: "vkEnumeratePhysicalDevices",
                code,
            })
        })?;
        let mut candidates = Vec::new();
        for &pd in &physicals {
            // SAFETY: `pd` was enumerated from the live instance.
            let p = unsafe { instance.get_physical_device_properties(pd) };
            candidates.push(Candidate {
                name: name_of(&p.device_name),
                kind: p.device_type,
            });
        }
        let choice = config.device_choice();
        let index = choose(&candidates, choice.as_deref()).map_err(unavailable)?;
        let physical = physicals[index];

        // SAFETY: `physical` belongs to the live instance.
        let props = unsafe { instance.get_physical_device_properties(physical) };
        if props.api_version < vk::API_VERSION_1_2 {
            return Err(unavailable(format!(
                "{} supports Vulkan {}.{}; timeline semaphores need 1.2",
                candidates[index].name,
                vk::api_version_major(props.api_version),
                vk::api_version_minor(props.api_version)
            )));
        }
        let mut v11 = vk::PhysicalDeviceVulkan11Properties::default();
        let mut props2 = vk::PhysicalDeviceProperties2::default().push_next(&mut v11);
        // SAFETY: as above; `props2` chains only core 1.1 structs.
        unsafe { instance.get_physical_device_properties2(physical, &mut props2) };
        let max_alloc = v11.max_memory_allocation_size;
        // SAFETY: as above.
        let families = unsafe { instance.get_physical_device_queue_family_properties(physical) };
        let family = families
            .iter()
            .position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE))
            .ok_or_else(|| unavailable("the device has no compute queue"))?
            as u32;
        // SAFETY: as above.
        let memory = unsafe { instance.get_physical_device_memory_properties(physical) };

        let priorities = [1.0f32];
        let queue_info = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(family)
            .queue_priorities(&priorities)];
        let mut v12 = vk::PhysicalDeviceVulkan12Features::default().timeline_semaphore(true);
        let dinfo = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queue_info)
            .push_next(&mut v12);
        // SAFETY: `dinfo` is valid and lives across the call; the device
        // supports Vulkan 1.2, where timelineSemaphore is required.
        let device = unsafe { instance.create_device(physical, &dinfo, None) }.map_err(|code| {
            DeviceError::from(VkError {
                call: "vkCreateDevice",
                code,
            })
        })?;
        // SAFETY: queue 0 of `family` was requested above.
        let queue = unsafe { device.get_device_queue(family, 0) };
        // SAFETY: `device` is live.
        let pipelines = match unsafe { create_pipelines(&device) } {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: nothing was created on the device.
                unsafe { device.destroy_device(None) };
                return Err(e.into());
            }
        };

        let l = &props.limits;
        let limits = Limits {
            storage_align: l.min_storage_buffer_offset_alignment.max(4),
            max_storage_range: u64::from(l.max_storage_buffer_range),
            max_allocations: u64::from(l.max_memory_allocation_count),
            max_groups: l.max_compute_work_group_count[0],
        };
        let heap = buffer_heap_size(&memory);
        let info = DeviceInfo {
            backend: "vulkan",
            name: candidates[index].name.clone(),
            memory_capacity: heap,
            // One dedicated allocation per buffer: bounded by the largest
            // allocation, the heap, and kept to whole words.
            max_buffer_size: max_alloc.min(heap) & !3,
            // Longer spans are split into dispatches of at most one storage
            // range each, so an operation may span a whole buffer.
            max_op_span: max_alloc.min(heap) & !3,
        };
        let (instance, messenger) = guard.take();
        Ok(Arc::new(DeviceShared {
            _entry: entry,
            instance,
            messenger,
            log,
            validation,
            device,
            queue: Mutex::new(queue),
            family,
            memory,
            limits,
            pipelines,
            info,
            live_allocations: AtomicU64::new(0),
            live_bytes: AtomicU64::new(0),
            next_address: AtomicU64::new(super::SYNTHETIC_ADDRESS_BASE),
        }))
    }

    /// The memory type for a buffer with `allowed` type bits: device-local
    /// when offered, else any allowed type.
    pub(crate) fn buffer_memory_type(&self, allowed: u32) -> Option<u32> {
        self.memory_type(allowed, vk::MemoryPropertyFlags::DEVICE_LOCAL)
            .or_else(|| self.memory_type(allowed, vk::MemoryPropertyFlags::empty()))
    }

    /// A memory type among `allowed` with all of `flags`.
    pub(crate) fn memory_type(&self, allowed: u32, flags: vk::MemoryPropertyFlags) -> Option<u32> {
        (0..self.memory.memory_type_count).find(|&i| {
            allowed & (1 << i) != 0
                && self.memory.memory_types[i as usize]
                    .property_flags
                    .contains(flags)
        })
    }
}

/// The size of the heap buffers are allocated from: the largest
/// device-local heap.
fn buffer_heap_size(memory: &vk::PhysicalDeviceMemoryProperties) -> u64 {
    let heaps = &memory.memory_heaps[..memory.memory_heap_count as usize];
    heaps
        .iter()
        .filter(|h| h.flags.contains(vk::MemoryHeapFlags::DEVICE_LOCAL))
        .chain(heaps.iter())
        .map(|h| h.size)
        .max()
        .unwrap_or(0)
}

/// Destroys the instance (and messenger) if device opening fails half-way.
struct InstanceGuard {
    instance: Option<ash::Instance>,
    messenger: Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
}

impl InstanceGuard {
    #[allow(clippy::type_complexity)]
    fn take(
        &mut self,
    ) -> (
        ash::Instance,
        Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
    ) {
        (
            self.instance.take().expect("taken once"),
            self.messenger.take(),
        )
    }
}

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        if let Some(instance) = self.instance.take() {
            // SAFETY: opening failed; no child object of the instance is
            // left except the messenger, destroyed first.
            unsafe {
                if let Some((du, m)) = self.messenger.take() {
                    du.destroy_debug_utils_messenger(m, None);
                }
                instance.destroy_instance(None);
            }
        }
    }
}

/// Creates the shared descriptor-set layout (bindings 0 to 3, storage
/// buffers), the pipeline layout with the push constants, and the four
/// pipelines from the SPIR-V that build.rs compiled.
///
/// # Safety
///
/// 1. `dev` is live.
unsafe fn create_pipelines(dev: &ash::Device) -> Result<Pipelines, VkError> {
    let bindings: Vec<_> = (0..4)
        .map(|b| {
            vk::DescriptorSetLayoutBinding::default()
                .binding(b)
                .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                .descriptor_count(1)
                .stage_flags(vk::ShaderStageFlags::COMPUTE)
        })
        .collect();
    let info = vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings);
    // SAFETY: by (1); `info` is valid.
    let set_layout = check("vkCreateDescriptorSetLayout", unsafe {
        dev.create_descriptor_set_layout(&info, None)
    })?;
    let ranges = [vk::PushConstantRange {
        stage_flags: vk::ShaderStageFlags::COMPUTE,
        offset: 0,
        size: PARAMS_BYTES,
    }];
    let set_layouts = [set_layout];
    let info = vk::PipelineLayoutCreateInfo::default()
        .set_layouts(&set_layouts)
        .push_constant_ranges(&ranges);
    // SAFETY: by (1); `set_layout` is live.
    let layout = check("vkCreatePipelineLayout", unsafe {
        dev.create_pipeline_layout(&info, None)
    })?;
    let sources: [&[u8]; 4] = [
        include_bytes!(concat!(env!("OUT_DIR"), "/fill.spv")),
        include_bytes!(concat!(env!("OUT_DIR"), "/copy.spv")),
        include_bytes!(concat!(env!("OUT_DIR"), "/add.spv")),
        include_bytes!(concat!(env!("OUT_DIR"), "/checksum.spv")),
    ];
    let mut pipelines = Vec::new();
    for spv in sources {
        let words: Vec<u32> = spv
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let info = vk::ShaderModuleCreateInfo::default().code(&words);
        // SAFETY: by (1); `words` is SPIR-V that naga validated and wrote.
        let module = check("vkCreateShaderModule", unsafe {
            dev.create_shader_module(&info, None)
        })?;
        let stage = vk::PipelineShaderStageCreateInfo::default()
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(module)
            .name(c"main");
        let info = vk::ComputePipelineCreateInfo::default()
            .stage(stage)
            .layout(layout);
        // SAFETY: by (1); the module and layout are live and match: the
        // shader uses set 0 bindings 0-3 and the 24-byte push constants.
        let made =
            unsafe { dev.create_compute_pipelines(vk::PipelineCache::null(), &[info], None) };
        // SAFETY: the module is no longer needed once the pipeline exists.
        unsafe { dev.destroy_shader_module(module, None) };
        let p = made.map_err(|(_, code)| VkError {
            call: "vkCreateComputePipelines",
            code,
        })?;
        pipelines.push(p[0]);
    }
    Ok(Pipelines {
        set_layout,
        layout,
        fill: pipelines[0],
        copy: pipelines[1],
        add: pipelines[2],
        checksum: pipelines[3],
    })
}

impl Drop for DeviceShared {
    fn drop(&mut self) {
        // SAFETY: the last reference is gone: every queue, buffer and
        // encoder holds an `Arc` to this, so none is left; waiting for idle
        // makes sure no submitted work still runs.
        unsafe {
            let _ = self.device.device_wait_idle();
            let p = &self.pipelines;
            for pipeline in [p.fill, p.copy, p.add, p.checksum] {
                self.device.destroy_pipeline(pipeline, None);
            }
            self.device.destroy_pipeline_layout(p.layout, None);
            self.device
                .destroy_descriptor_set_layout(p.set_layout, None);
            self.device.destroy_device(None);
            if let Some((du, m)) = self.messenger.take() {
                du.destroy_debug_utils_messenger(m, None);
            }
            self.instance.destroy_instance(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, kind: vk::PhysicalDeviceType) -> Candidate {
        Candidate {
            name: name.into(),
            kind,
        }
    }

    #[test]
    fn prefers_a_gpu_and_honours_overrides() {
        let list = [
            c(
                "llvmpipe (LLVM 15.0.6, 256 bits)",
                vk::PhysicalDeviceType::CPU,
            ),
            c(
                "NVIDIA H100 80GB HBM3",
                vk::PhysicalDeviceType::DISCRETE_GPU,
            ),
        ];
        assert_eq!(choose(&list, None), Ok(1));
        assert_eq!(choose(&list[..1], None), Ok(0));
        assert_eq!(choose(&list, Some("0")), Ok(0));
        assert_eq!(choose(&list, Some("LLVMPIPE")), Ok(0));
        assert_eq!(choose(&list, Some(" ")), Ok(1));
        assert!(choose(&list, Some("7"))
            .unwrap_err()
            .contains("no Vulkan device 7"));
        assert!(choose(&list, Some("radeon"))
            .unwrap_err()
            .contains("llvmpipe"));
        assert!(choose(&[], None).is_err());
    }
}
