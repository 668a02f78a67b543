//! The driver's own allocators, as peers to measure inflight against (the
//! `cuda_pairs` example and `inflight bench`): plain `cuMemAlloc`/`cuMemFree`
//! ([`DriverAlloc`]) and `cuMemAllocAsync`/`cuMemFreeAsync` on the device's
//! default memory pool ([`DefaultPoolAlloc`]).
//!
//! Both hand out bare device addresses. The allocation calls are safe (they
//! return a number); the frees are `unsafe`, because the caller promises that
//! the address came from the same allocator and that no GPU work still uses
//! it. Neither is used by the backend itself.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::result as cu;
use cudarc::driver::sys;

use super::driver::{self, map_err, Context, Stream};
use crate::backend::DeviceError;

/// A device address from one of the peers.
pub type DevicePtr = sys::CUdeviceptr;

/// `cuMemAlloc` + `cuMemFree` on one device (the free synchronises the device).
pub struct DriverAlloc {
    ctx: Arc<Context>,
}

impl DriverAlloc {
    /// The device `ordinal`, through its primary context (shared with every
    /// [`CudaGpu`](super::CudaGpu) of the process).
    pub fn new(ordinal: i32) -> Result<Self, DeviceError> {
        Ok(DriverAlloc {
            ctx: driver::context(ordinal)?,
        })
    }

    /// `cuMemAlloc` of `bytes` bytes.
    pub fn alloc(&self, bytes: u64) -> Result<DevicePtr, DeviceError> {
        self.ctx.make_current()?;
        // SAFETY: a plain allocation in the current (valid) context; the memory
        // is returned as an address and only freed through `free`.
        unsafe { cu::malloc_sync(bytes as usize) }.map_err(|e| map_err("cuMemAlloc", e))
    }

    /// `cuMemFree`.
    ///
    /// # Safety
    ///
    /// 1. `ptr` came from [`DriverAlloc::alloc`] and was not freed since.
    /// 2. No GPU work uses it any more, and it is not used after this call.
    pub unsafe fn free(&self, ptr: DevicePtr) -> Result<(), DeviceError> {
        self.ctx.make_current()?;
        // SAFETY: by the caller's promises 1 and 2.
        unsafe { cu::free_sync(ptr) }.map_err(|e| map_err("cuMemFree", e))
    }
}

/// `cuMemAllocAsync` + `cuMemFreeAsync` on the device's default memory pool,
/// on one non-blocking stream of its own.
///
/// The pool's attributes are left as the driver set them (release threshold
/// 0: unused memory goes back at each synchronisation), except that
/// [`reset_peaks`](Self::reset_peaks) zeroes its high-water marks and
/// [`trim`](Self::trim) gives its unused memory back.
pub struct DefaultPoolAlloc {
    ctx: Arc<Context>,
    pool: sys::CUmemoryPool,
    stream: Stream,
}

// SAFETY: the pool and stream are driver handles; the driver API is
// thread-safe, and the stream is used by one call at a time (`&mut self` is
// not needed: the driver serialises calls on a stream).
unsafe impl Send for DefaultPoolAlloc {}
// SAFETY: as above.
unsafe impl Sync for DefaultPoolAlloc {}

impl DefaultPoolAlloc {
    /// The default pool of device `ordinal` and a new non-blocking stream.
    pub fn new(ordinal: i32) -> Result<Self, DeviceError> {
        let ctx = driver::context(ordinal)?;
        ctx.make_current()?;
        // SAFETY: `ctx.device` is a valid device handle.
        let pool = unsafe { cu::device::get_default_mem_pool(ctx.device) }
            .map_err(|e| map_err("cuDeviceGetDefaultMemPool", e))?;
        let stream = Stream::new(&ctx)?;
        Ok(DefaultPoolAlloc { ctx, pool, stream })
    }

    /// `cuMemAllocAsync` of `bytes` bytes on the stream.
    pub fn alloc(&self, bytes: u64) -> Result<DevicePtr, DeviceError> {
        self.ctx.make_current()?;
        // SAFETY: the stream is valid until drop; the memory is returned as an
        // address and only freed through `free`.
        unsafe { cu::malloc_async(self.stream.0, bytes as usize) }
            .map_err(|e| map_err("cuMemAllocAsync", e))
    }

    /// `cuMemFreeAsync` on the stream.
    ///
    /// # Safety
    ///
    /// 1. `ptr` came from [`DefaultPoolAlloc::alloc`] and was not freed since.
    /// 2. No GPU work on another stream still uses it, and it is not used
    ///    after this call.
    pub unsafe fn free(&self, ptr: DevicePtr) -> Result<(), DeviceError> {
        self.ctx.make_current()?;
        // SAFETY: by the caller's promises 1 and 2; the stream is valid.
        unsafe { cu::free_async(ptr, self.stream.0) }.map_err(|e| map_err("cuMemFreeAsync", e))
    }

    /// Waits for the stream's frees and allocations to be done.
    pub fn synchronize(&self) -> Result<(), DeviceError> {
        self.ctx.make_current()?;
        self.stream.synchronize()
    }

    /// Synchronises, then gives the pool's unused memory back to the driver.
    pub fn trim(&self) -> Result<(), DeviceError> {
        self.synchronize()?;
        // SAFETY: the default pool lives as long as the context.
        unsafe { cu::mem_pool::trim_to(self.pool, 0) }.map_err(|e| map_err("cuMemPoolTrimTo", e))
    }

    /// The pool's `(reserved, used)` high-water marks, in bytes.
    pub fn peaks(&self) -> Result<(u64, u64), DeviceError> {
        let get = |attr| {
            let mut v: u64 = 0;
            // SAFETY: both high-water attributes are cuuint64_t; the pool is valid.
            unsafe { cu::mem_pool::get_attribute(self.pool, attr, (&mut v as *mut u64).cast()) }
                .map_err(|e| map_err("cuMemPoolGetAttribute", e))?;
            Ok::<u64, DeviceError>(v)
        };
        Ok((
            get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
            get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
        ))
    }

    /// Resets both high-water marks to the current figures.
    pub fn reset_peaks(&self) -> Result<(), DeviceError> {
        for attr in [
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        ] {
            let mut zero: u64 = 0;
            // SAFETY: the driver accepts only 0 for these attributes, as a
            // cuuint64_t; the pool is valid.
            unsafe {
                cu::mem_pool::set_attribute(
                    self.pool,
                    attr,
                    (&mut zero as *mut u64).cast::<c_void>(),
                )
            }
            .map_err(|e| map_err("cuMemPoolSetAttribute", e))?;
        }
        Ok(())
    }
}

impl Drop for DefaultPoolAlloc {
    fn drop(&mut self) {
        let _ = self.synchronize();
        // SAFETY: the stream is idle and not used after this.
        unsafe { self.stream.destroy() };
    }
}
