//! The thin layer over the CUDA driver: every call returns `Result`, every
//! handle is a newtype that says why it may cross threads, and every driver
//! code is mapped onto the core's [`DeviceError`].
//!
//! # Loading
//!
//! cudarc opens `libcuda.so` (and `libnvrtc.so`) on first use and panics when
//! it is missing. [`probe_driver`] and [`probe_nvrtc`] open the library first
//! (and catch a panic besides), so that a machine without CUDA gets a clear
//! [`DeviceError::Unsupported`], never a panic.
//!
//! # Contexts
//!
//! A device's primary context is retained once per process and never
//! released ([`context`]): the compiled kernels and pooled events live in it,
//! and every backend on that device shares them. Driver calls need the
//! context current on the calling thread; [`Context::make_current`] sets it
//! once per thread.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::result::{self as cu, DriverError};
use cudarc::driver::sys::{self, CUresult};

use crate::backend::DeviceError;

/// Maps a driver error onto the core's set. Errors that leave the context
/// unusable ("sticky" errors: a kernel faulted) mean the device is lost.
pub(crate) fn map_err(what: &str, e: DriverError) -> DeviceError {
    let code = e.0;
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{code:?}"));
    match code {
        CUresult::CUDA_ERROR_OUT_OF_MEMORY => DeviceError::OutOfMemory,
        c if is_sticky(c) => DeviceError::Lost(format!("{what}: {name}")),
        _ => DeviceError::Other(format!("{what}: {name}")),
    }
}

/// Codes after which the context is corrupt and every later call fails.
pub(crate) fn is_sticky(code: CUresult) -> bool {
    matches!(
        code,
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS
            | CUresult::CUDA_ERROR_LAUNCH_FAILED
            | CUresult::CUDA_ERROR_HARDWARE_STACK_ERROR
            | CUresult::CUDA_ERROR_ILLEGAL_INSTRUCTION
            | CUresult::CUDA_ERROR_MISALIGNED_ADDRESS
            | CUresult::CUDA_ERROR_INVALID_ADDRESS_SPACE
            | CUresult::CUDA_ERROR_INVALID_PC
            | CUresult::CUDA_ERROR_ECC_UNCORRECTABLE
            | CUresult::CUDA_ERROR_DEINITIALIZED
            | CUresult::CUDA_ERROR_CONTEXT_IS_DESTROYED
    )
}

/// Whether `libcuda` can be opened, without letting cudarc panic.
pub fn probe_driver() -> Result<(), DeviceError> {
    // SAFETY: `is_culib_present` only tries to open the library by its usual
    // names; it runs no code of the library beyond its initialisers.
    let present = std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
    if present {
        Ok(())
    } else {
        Err(DeviceError::Unsupported(
            "no CUDA driver: libcuda.so could not be loaded".into(),
        ))
    }
}

/// Whether `libnvrtc` can be opened, without letting cudarc panic.
pub fn probe_nvrtc() -> Result<(), DeviceError> {
    // SAFETY: as in `probe_driver`, for NVRTC.
    let present = std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() })
        .unwrap_or(false);
    if present {
        Ok(())
    } else {
        Err(DeviceError::Unsupported(
            "no NVRTC: libnvrtc.so could not be loaded (add CUDA's lib64 to LD_LIBRARY_PATH)"
                .into(),
        ))
    }
}

/// A retained primary context of one device.
pub(crate) struct Context {
    pub(crate) ctx: sys::CUcontext,
    pub(crate) device: sys::CUdevice,
    pub(crate) ordinal: i32,
}

// SAFETY: a CUcontext is a driver handle; the driver API is thread-safe and a
// context may be made current on any thread.
unsafe impl Send for Context {}
// SAFETY: as above; the handle is never mutated after creation.
unsafe impl Sync for Context {}

thread_local! {
    static CURRENT: Cell<sys::CUcontext> = const { Cell::new(std::ptr::null_mut()) };
}

impl Context {
    /// Makes the context current on this thread (a thread-local check when
    /// it already is).
    pub(crate) fn make_current(&self) -> Result<(), DeviceError> {
        if CURRENT.with(|c| c.get()) == self.ctx {
            return Ok(());
        }
        // SAFETY: `self.ctx` is a primary context retained for the life of the
        // process (see `context`), so it is valid.
        unsafe { cu::ctx::set_current(self.ctx) }.map_err(|e| map_err("cuCtxSetCurrent", e))?;
        CURRENT.with(|c| c.set(self.ctx));
        Ok(())
    }
}

/// The process-wide primary context of device `ordinal`, retained on first
/// use and kept for the life of the process.
pub(crate) fn context(ordinal: i32) -> Result<Arc<Context>, DeviceError> {
    static CONTEXTS: OnceLock<Mutex<HashMap<i32, Arc<Context>>>> = OnceLock::new();
    probe_driver()?;
    let mut map = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(c) = map.get(&ordinal) {
        return Ok(c.clone());
    }
    cu::init().map_err(|e| map_err("cuInit", e))?;
    let count = cu::device::get_count().map_err(|e| map_err("cuDeviceGetCount", e))?;
    if ordinal < 0 || ordinal >= count {
        return Err(DeviceError::Unsupported(format!(
            "no CUDA device {ordinal}: the driver sees {count}"
        )));
    }
    let device = cu::device::get(ordinal).map_err(|e| map_err("cuDeviceGet", e))?;
    // SAFETY: `device` is a valid device handle from cuDeviceGet; the primary
    // context is retained here and never released (kept in `CONTEXTS`).
    let ctx = unsafe { cu::primary_ctx::retain(device) }
        .map_err(|e| map_err("cuDevicePrimaryCtxRetain", e))?;
    let c = Arc::new(Context {
        ctx,
        device,
        ordinal,
    });
    c.make_current()?;
    map.insert(ordinal, c.clone());
    Ok(c)
}

/// A device attribute of the context's device.
pub(crate) fn attribute(ctx: &Context, attr: sys::CUdevice_attribute) -> Result<i32, DeviceError> {
    // SAFETY: `ctx.device` is a valid device handle.
    unsafe { cu::device::get_attribute(ctx.device, attr) }
        .map_err(|e| map_err("cuDeviceGetAttribute", e))
}

/// A CUDA stream (created non-blocking: no implicit sync with stream 0).
pub(crate) struct Stream(pub(crate) sys::CUstream);
// SAFETY: a CUstream is a driver handle; the driver serialises concurrent
// calls on one stream, and the allocator submits to a queue one call at a time.
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}

impl Stream {
    pub(crate) fn new(ctx: &Context) -> Result<Self, DeviceError> {
        ctx.make_current()?;
        cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map(Stream)
            .map_err(|e| map_err("cuStreamCreate", e))
    }

    /// Blocks until everything enqueued has run. Used only at teardown.
    pub(crate) fn synchronize(&self) -> Result<(), DeviceError> {
        // SAFETY: the stream is valid until `destroy`.
        unsafe { cu::stream::synchronize(self.0) }.map_err(|e| map_err("cuStreamSynchronize", e))
    }

    /// Destroys the stream. Work still enqueued runs to completion first
    /// (the driver's rule), so this never cuts work short.
    ///
    /// # Safety
    ///
    /// 1. The stream is not used after this call.
    pub(crate) unsafe fn destroy(&self) {
        // SAFETY: by the caller's promise the handle is not used again.
        let _ = unsafe { cu::stream::destroy(self.0) };
    }
}

/// A CUDA event without timing (the cheap kind), for completion only.
#[derive(Copy, Clone)]
pub(crate) struct Event(pub(crate) sys::CUevent);
// SAFETY: a CUevent is a driver handle; record and query are thread-safe.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

/// What a non-blocking query of an event found.
pub(crate) enum EventState {
    Done,
    Pending,
}

impl Event {
    pub(crate) fn new(ctx: &Context) -> Result<Self, DeviceError> {
        ctx.make_current()?;
        cu::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map(Event)
            .map_err(|e| map_err("cuEventCreate", e))
    }

    /// Records the event at the current end of `stream`.
    pub(crate) fn record(&self, stream: &Stream) -> Result<(), DeviceError> {
        // SAFETY: both handles are valid (owned by live backend objects).
        unsafe { cu::event::record(self.0, stream.0) }.map_err(|e| map_err("cuEventRecord", e))
    }

    /// Makes later work on `stream` wait, on the device, for the work this
    /// event was last recorded after (`cuStreamWaitEvent`). The wait binds to
    /// that recording at the time of this call, so re-recording the event
    /// later does not affect it.
    pub(crate) fn wait_on(&self, stream: &Stream) -> Result<(), DeviceError> {
        // SAFETY: both handles are valid (owned by live backend objects), and
        // the event was recorded (it sits in a queue's in-flight deque).
        unsafe {
            cu::stream::wait_event(
                stream.0,
                self.0,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| map_err("cuStreamWaitEvent", e))
    }

    /// Queries without blocking. A fault of the work before it is an error.
    pub(crate) fn query(&self) -> Result<EventState, DriverError> {
        // SAFETY: the event is valid and was recorded.
        match unsafe { cu::event::query(self.0) } {
            Ok(()) => Ok(EventState::Done),
            Err(DriverError(CUresult::CUDA_ERROR_NOT_READY)) => Ok(EventState::Pending),
            Err(e) => Err(e),
        }
    }
}

/// Device memory from `cuMemAlloc` or a memory pool.
pub(crate) type DevicePtr = sys::CUdeviceptr;

/// A CUDA memory pool of this backend's own (not the device's default pool,
/// whose attributes other code in the process may rely on).
pub(crate) struct MemPool(pub(crate) sys::CUmemoryPool);
// SAFETY: a pool handle is a driver handle; pool calls are thread-safe.
unsafe impl Send for MemPool {}
// SAFETY: as above.
unsafe impl Sync for MemPool {}

impl MemPool {
    /// A pool on the context's device that keeps freed memory (release
    /// threshold: unlimited) so that a sync point does not hand it back to
    /// the OS; [`MemPool::trim`] does that on demand.
    pub(crate) fn new(ctx: &Context) -> Result<Self, DeviceError> {
        ctx.make_current()?;
        // SAFETY: CUmemPoolProps is a plain C struct; all-zero is its
        // documented "no options" state, and the fields that matter are set
        // below.
        let mut props: sys::CUmemPoolProps = unsafe { std::mem::zeroed() };
        props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        props.handleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
        props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        props.location.id = ctx.ordinal;
        // SAFETY: `props` is a valid, initialised CUmemPoolProps.
        let pool =
            unsafe { cu::mem_pool::create(&props) }.map_err(|e| map_err("cuMemPoolCreate", e))?;
        let mut threshold: u64 = u64::MAX;
        // SAFETY: the release threshold attribute takes a cuuint64_t.
        unsafe {
            cu::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast::<c_void>(),
            )
        }
        .map_err(|e| map_err("cuMemPoolSetAttribute", e))?;
        Ok(MemPool(pool))
    }

    /// Gives the pool's unused memory back to the driver.
    pub(crate) fn trim(&self) -> Result<(), DeviceError> {
        // SAFETY: the pool is valid until drop.
        unsafe { cu::mem_pool::trim_to(self.0, 0) }.map_err(|e| map_err("cuMemPoolTrimTo", e))
    }
}

/// Pinned host memory (for checksum results copied back asynchronously).
pub(crate) struct HostPtr(pub(crate) *mut u64);
// SAFETY: the pointer is owned memory from cuMemHostAlloc, accessed by one
// owner at a time (a result slab is either in a pool or in one submission).
unsafe impl Send for HostPtr {}
// SAFETY: as above.
unsafe impl Sync for HostPtr {}

/// Allocates `words` u64 of pinned host memory.
pub(crate) fn host_alloc(ctx: &Context, words: usize) -> Result<HostPtr, DeviceError> {
    ctx.make_current()?;
    // SAFETY: plain page-locked host allocation; the memory is only read as
    // u64 after the device wrote it (or after it was zeroed by a copy).
    let p = unsafe { cu::malloc_host(words * 8, sys::CU_MEMHOSTALLOC_PORTABLE) }
        .map_err(|e| map_err("cuMemHostAlloc", e))?;
    Ok(HostPtr(p.cast::<u64>()))
}
