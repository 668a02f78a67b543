//! Growable segments on CUDA: an address range reserved once
//! (`cuMemAddressReserve`), whose pages are backed on demand by physical
//! allocations (`cuMemCreate`, one per page, so that any page can go back
//! alone), mapped (`cuMemMap`) and made readable and writable by the device
//! (`cuMemSetAccess`), and given back (`cuMemUnmap`, `cuMemRelease`).
//!
//! Unmapping adds no synchronisation: that no submitted work still uses the
//! pages is the allocator's invariant I1 (PyTorch's expandable segments
//! synchronise the stream or the device first, as they cannot know).

use std::collections::BTreeMap;

use cudarc::driver::sys;
use parking_lot::Mutex;

use super::driver::{map_err, Context, DevicePtr};
use crate::backend::DeviceError;

/// The physical allocations mapped into one reserved range, by offset.
#[derive(Debug)]
pub(crate) struct Range {
    /// Bytes each physical allocation backs (the allocator's page).
    pub(crate) page: u64,
    /// Offset of each mapped page → its physical allocation.
    pub(crate) handles: Mutex<BTreeMap<u64, sys::CUmemGenericAllocationHandle>>,
}

/// The properties of device memory on `device`: pinned, on the device.
fn properties(device: sys::CUdevice) -> sys::CUmemAllocationProp {
    // SAFETY: a plain C struct; all-zero is its documented default.
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    prop
}

/// The granularity of physical allocations on the context's device, or
/// `None` where the device or driver has no virtual memory management.
pub(crate) fn granularity(ctx: &Context) -> Option<u64> {
    let mut supported = 0i32;
    // SAFETY: `ctx.device` is a valid device handle; the out-pointer is ours.
    let r = unsafe {
        sys::cuDeviceGetAttribute(
            &mut supported,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
            ctx.device,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS || supported == 0 {
        return None;
    }
    let prop = properties(ctx.device);
    let mut g = 0usize;
    // SAFETY: `prop` describes device memory; the out-pointer is ours.
    let r = unsafe {
        sys::cuMemGetAllocationGranularity(
            &mut g,
            &prop,
            sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
    };
    (r == sys::CUresult::CUDA_SUCCESS && g > 0).then_some(g as u64)
}

/// Reserves `bytes` of address space (a multiple of the allocation
/// granularity, as `page` is). The range is aligned to the granularity
/// (alignment 0: the driver's default), which is all `cuMemMap` needs at
/// offsets that are multiples of `page`; a page that is not a power of two
/// (20 MiB) is refused as an alignment.
pub(crate) fn reserve(ctx: &Context, bytes: u64, page: u64) -> Result<DevicePtr, DeviceError> {
    ctx.make_current()?;
    debug_assert!(page > 0 && bytes % page == 0);
    let mut ptr: DevicePtr = 0;
    // SAFETY: the out-pointer is ours; no fixed address is asked for.
    unsafe { sys::cuMemAddressReserve(&mut ptr, bytes as usize, 0, 0, 0) }
        .result()
        .map_err(|e| map_err("cuMemAddressReserve", e))?;
    Ok(ptr)
}

/// Backs `[offset, offset + bytes)` of the range at `base` with fresh
/// device memory, one physical allocation per page; on a failure, gives
/// back what it made.
pub(crate) fn map(
    ctx: &Context,
    base: DevicePtr,
    range: &Range,
    offset: u64,
    bytes: u64,
) -> Result<(), DeviceError> {
    ctx.make_current()?;
    let prop = properties(ctx.device);
    let page = range.page;
    let mut made: Vec<(u64, sys::CUmemGenericAllocationHandle)> = Vec::new();
    let mut at = offset;
    let result = (|| {
        while at < offset + bytes {
            let mut h: sys::CUmemGenericAllocationHandle = 0;
            // SAFETY: `prop` describes device memory; `page` is a multiple
            // of the granularity (the allocator's contract).
            unsafe { sys::cuMemCreate(&mut h, page as usize, &prop, 0) }
                .result()
                .map_err(|e| map_err("cuMemCreate", e))?;
            made.push((at, h));
            // SAFETY: `[base + at, base + at + page)` lies in the reserved
            // range and is not mapped (the allocator's contract); `h` backs
            // exactly `page` bytes.
            unsafe { sys::cuMemMap(base + at, page as usize, 0, h, 0) }
                .result()
                .map_err(|e| map_err("cuMemMap", e))?;
            at += page;
        }
        let desc = sys::CUmemAccessDesc {
            location: prop.location,
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the whole run was just mapped; one descriptor.
        unsafe { sys::cuMemSetAccess(base + offset, bytes as usize, &desc, 1) }
            .result()
            .map_err(|e| map_err("cuMemSetAccess", e))
    })();
    match result {
        Ok(()) => {
            range.handles.lock().extend(made);
            Ok(())
        }
        Err(e) => {
            for (o, h) in made {
                // SAFETY: made above and used by nothing yet: unmapping a
                // page not mapped fails harmlessly.
                unsafe {
                    let _ = sys::cuMemUnmap(base + o, page as usize);
                    let _ = sys::cuMemRelease(h);
                }
            }
            Err(e)
        }
    }
}

/// Unmaps `[offset, offset + bytes)` of the range at `base` and gives its
/// pages' memory back.
///
/// # Safety
///
/// 1. The run was mapped by [`map`] (whole pages).
/// 2. No submitted work still uses it (invariant I1).
pub(crate) unsafe fn unmap(ctx: &Context, base: DevicePtr, range: &Range, offset: u64, bytes: u64) {
    if ctx.make_current().is_err() {
        return;
    }
    let mut handles = range.handles.lock();
    let mut at = offset;
    while at < offset + bytes {
        if let Some(h) = handles.remove(&at) {
            // SAFETY: by (1) the page is mapped to `h`; by (2) nothing uses it.
            unsafe {
                let _ = sys::cuMemUnmap(base + at, range.page as usize);
                let _ = sys::cuMemRelease(h);
            }
        }
        at += range.page;
    }
}

/// Unmaps whatever is still mapped and frees the address range.
///
/// # Safety
///
/// 1. `base` and `bytes` are a range from [`reserve`], not used after this.
/// 2. No submitted work still uses any of it (invariant I1).
pub(crate) unsafe fn release(ctx: &Context, base: DevicePtr, bytes: u64, range: &Range) {
    if ctx.make_current().is_err() {
        return;
    }
    let offsets: Vec<u64> = range.handles.lock().keys().copied().collect();
    for o in offsets {
        // SAFETY: each offset is a mapped page (1); nothing uses it (2).
        unsafe { unmap(ctx, base, range, o, range.page) };
    }
    // SAFETY: by (1), a reserved range with nothing mapped any more.
    unsafe {
        let _ = sys::cuMemAddressFree(base, bytes as usize);
    }
}
