//! The two GPUs the plug-in runs on, behind one small trait: how many
//! devices there are, how to open one, how to adopt a stream handle, what
//! a buffer's device address is, and what to do around each call.
//!
//! - [`Cuda`]: inflight's CUDA backend over each device's primary context
//!   (the one PyTorch's runtime uses); streams are PyTorch's `cudaStream_t`
//!   handles, adopted with `CudaGpu::adopt_stream`; a buffer's address is
//!   its raw allocation's `CUdeviceptr` plus its offset.
//! - [`Sim`]: inflight's simulated GPU in accounting mode (sizes and uses
//!   are tracked, no host memory is allocated); a stream handle is any
//!   integer, given a simulated queue of its own on first sight; a
//!   buffer's address is `SimBuffer::address()` plus its offset. Each
//!   submission (the allocator's markers, which fix a stream-ordered
//!   free's place on its stream) takes [`SIM_SUBMIT_COST`] there, standing
//!   for the work a busy stream has queued: a block whose free is marked
//!   on another stream stays pending that long.

use std::time::Duration;

use inflight::backend::sim::{Backing, SimConfig, SimGpu};
use inflight::{Backend, Buffer, DeviceError};

/// Devices the simulated backend offers when PyTorch's init hook gave no
/// count.
pub(crate) const SIM_DEVICES: usize = 2;

/// How long a submission takes on a simulated stream (see the module doc).
pub const SIM_SUBMIT_COST: Duration = Duration::from_millis(5);

/// The simulated GPU's settings: accounting only, no jitter, and
/// [`SIM_SUBMIT_COST`] a submission (the bench makes its Rust API baseline
/// with the same).
pub fn sim_config(ordinal: usize) -> SimConfig {
    SimConfig {
        name: format!("inflight simulated GPU {ordinal}"),
        backing: Backing::Accounting,
        jitter: 0.0,
        submit_cost: SIM_SUBMIT_COST,
        ..SimConfig::default()
    }
}

/// A GPU the plug-in can run on (see the module doc).
pub(crate) trait Kind: Sized + Send + Sync + 'static {
    /// The backend.
    type Gpu: Backend + Clone;
    /// What the plug-in keeps beside each device's allocator.
    type Extra: Send + Sync;
    /// Held around every call into a device (see [`Kind::enter`]).
    type Scope;

    /// Devices present; `hint` is the count PyTorch's init hook gave (0: none).
    fn device_count(hint: usize) -> Result<usize, String>;

    /// Opens device `ordinal`; `devices` is the count [`Kind::device_count`]
    /// gave.
    fn open(ordinal: usize, devices: usize) -> Result<(Self::Gpu, Self::Extra), String>;

    /// A raw queue over the program's stream `handle`.
    ///
    /// # Safety
    ///
    /// 1. On CUDA, `handle` is a valid stream of this device's primary
    ///    context (or 0, the legacy default stream) and stays valid while
    ///    the allocator may enqueue on it: for the life of the process, as
    ///    PyTorch's pooled and default streams do.
    unsafe fn adopt(
        gpu: &Self::Gpu,
        handle: usize,
    ) -> Result<<Self::Gpu as Backend>::Queue, DeviceError>;

    /// The buffer's device address.
    fn address(buf: &Buffer<Self::Gpu>) -> u64;

    /// Prepares the calling thread for calls into this device; the scope
    /// undoes it when dropped.
    fn enter(extra: &Self::Extra) -> Self::Scope;
}

/// The simulated GPU.
pub(crate) struct Sim;

impl Kind for Sim {
    type Gpu = SimGpu;
    type Extra = ();
    type Scope = ();

    fn device_count(hint: usize) -> Result<usize, String> {
        Ok(if hint > 0 { hint } else { SIM_DEVICES })
    }

    fn open(ordinal: usize, _devices: usize) -> Result<(SimGpu, ()), String> {
        Ok((SimGpu::new(sim_config(ordinal)), ()))
    }

    unsafe fn adopt(
        gpu: &SimGpu,
        _handle: usize,
    ) -> Result<inflight::backend::sim::SimQueue, DeviceError> {
        gpu.create_queue()
    }

    #[inline]
    fn address(buf: &Buffer<SimGpu>) -> u64 {
        buf.raw().address() + buf.offset()
    }

    #[inline]
    fn enter(_extra: &()) {}
}

#[cfg(feature = "cuda")]
pub(crate) use self::cuda::Cuda;

#[cfg(feature = "cuda")]
mod cuda {
    use std::ffi::c_void;

    use cudarc::driver::result as cu;
    use cudarc::driver::sys;
    use inflight::backend::cuda::{probe_driver, CudaConfig, CudaGpu, CudaQueue};
    use inflight::{Buffer, DeviceError};

    use super::Kind;

    /// NVIDIA GPUs through the driver API.
    pub(crate) struct Cuda;

    /// What the plug-in keeps per CUDA device: its primary context, and
    /// whether the process has other devices (then each call makes the
    /// context current and puts the caller's back after: see
    /// [`Kind::enter`] for [`Cuda`]).
    pub(crate) struct CudaExtra {
        /// The device's primary context (`CUcontext`), as an address.
        ctx: usize,
        /// More than one device in the process.
        several: bool,
    }

    /// Restores the caller's current context when dropped (several devices only).
    pub(crate) struct CtxScope(Option<usize>);

    impl Drop for CtxScope {
        fn drop(&mut self) {
            if let Some(saved) = self.0 {
                // SAFETY: `saved` was the thread's current context when the
                // call began (null or a context the program made current);
                // putting it back is what the program expects to find.
                let _ = unsafe { cu::ctx::set_current(saved as sys::CUcontext) };
            }
        }
    }

    impl Kind for Cuda {
        type Gpu = CudaGpu;
        type Extra = CudaExtra;
        type Scope = CtxScope;

        fn device_count(_hint: usize) -> Result<usize, String> {
            probe_driver().map_err(|e| e.to_string())?;
            cu::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
            let n =
                cu::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))?;
            Ok(n.max(0) as usize)
        }

        fn open(ordinal: usize, devices: usize) -> Result<(CudaGpu, CudaExtra), String> {
            let ordinal_i32 =
                i32::try_from(ordinal).map_err(|_| format!("device {ordinal} is out of range"))?;
            // The backend makes the primary context current on this thread;
            // with several devices, the caller's is put back after.
            let saved = if devices > 1 { current() } else { None };
            let opened = CudaGpu::new(CudaConfig {
                ordinal: ordinal_i32,
                ..CudaConfig::default()
            })
            .map_err(|e| e.to_string());
            let ctx = opened.as_ref().ok().map(|_| primary(ordinal_i32));
            if let Some(saved) = saved {
                // SAFETY: as in `CtxScope::drop`.
                let _ = unsafe { cu::ctx::set_current(saved as sys::CUcontext) };
            }
            let gpu = opened?;
            let ctx = ctx.expect("opened")?;
            Ok((
                gpu,
                CudaExtra {
                    ctx,
                    several: devices > 1,
                },
            ))
        }

        unsafe fn adopt(gpu: &CudaGpu, handle: usize) -> Result<CudaQueue, DeviceError> {
            // SAFETY: the caller's promise 1 is `adopt_stream`'s promise 1.
            unsafe { gpu.adopt_stream(handle as *mut c_void as sys::CUstream) }
        }

        #[inline]
        fn address(buf: &Buffer<CudaGpu>) -> u64 {
            buf.raw().device_ptr() + buf.offset()
        }

        /// With one device there is nothing to do: the backend makes the
        /// primary context current where it needs it, and it is the one
        /// PyTorch's runtime has current too. With several, PyTorch's
        /// current device on this thread may be another one, and the
        /// backend's own record of what is current (a thread-local) may be
        /// stale: the device's context is made current for the call, and
        /// the caller's put back after it.
        #[inline]
        fn enter(extra: &CudaExtra) -> CtxScope {
            if !extra.several {
                return CtxScope(None);
            }
            let saved = current().unwrap_or(0);
            if saved == extra.ctx {
                return CtxScope(None);
            }
            // SAFETY: `extra.ctx` is the device's primary context, retained
            // for the life of the process (`primary`).
            let _ = unsafe { cu::ctx::set_current(extra.ctx as sys::CUcontext) };
            CtxScope(Some(saved))
        }
    }

    /// The calling thread's current context, as an address (`None` if the
    /// driver could not say).
    fn current() -> Option<usize> {
        match cu::ctx::get_current() {
            Ok(Some(ctx)) => Some(ctx as usize),
            Ok(None) => Some(0),
            Err(_) => None,
        }
    }

    /// Device `ordinal`'s primary context, retained (never released: the
    /// backend holds it for the life of the process as well).
    fn primary(ordinal: i32) -> Result<usize, String> {
        let dev = cu::device::get(ordinal)
            .map_err(|e| format!("cuDeviceGet({ordinal}) failed: {e:?}"))?;
        // SAFETY: `dev` is a valid device handle from cuDeviceGet.
        let ctx = unsafe { cu::primary_ctx::retain(dev) }
            .map_err(|e| format!("cuDevicePrimaryCtxRetain({ordinal}) failed: {e:?}"))?;
        Ok(ctx as usize)
    }
}
