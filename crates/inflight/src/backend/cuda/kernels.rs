//! The four operations as CUDA kernels, compiled at run time with NVRTC once
//! per device (the module is cached for the life of the process, beside its
//! primary context), and their launches.
//!
//! All kernels take 32-bit words and a word count, and walk the span with a
//! grid-stride loop. The checksum kernel computes the core's
//! [`crate::backend::checksum_words`] bit for bit: each thread sums
//! `w[i] ^ (u32)(i * 0x9E3779B1)` (i relative to the span start, wrapping
//! u32 multiply) and `w[i]` rotated left by 7, each widened, into a u64, a
//! warp reduces with shuffles, and one lane per
//! warp adds into the slot with `atomicAdd` (wrapping, so order is free).

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::result as cu;
use cudarc::driver::sys;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use super::driver::{self, map_err, Context, DevicePtr, Stream};
use crate::backend::DeviceError;

/// The kernels' source.
const SOURCE: &str = r#"
typedef unsigned int u32;
typedef unsigned long long u64;

extern "C" __global__ void inflight_fill(u32* dst, u64 n, u32 pattern) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        dst[i] = pattern;
}

extern "C" __global__ void inflight_copy(const u32* src, u32* dst, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        dst[i] = src[i];
}

extern "C" __global__ void inflight_add(const u32* a, const u32* b, u32* out, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

extern "C" __global__ void inflight_checksum(const u32* src, u64 n, u64* slot) {
    u64 sum = 0;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
    {
        u32 w = src[i];
        sum += (u64)(w ^ ((u32)i * 0x9E3779B1u)) + (u64)((w << 7) | (w >> 25));
    }
    for (int off = 16; off > 0; off >>= 1)
        sum += __shfl_down_sync(0xffffffffu, sum, off);
    if ((threadIdx.x & 31) == 0 && sum != 0)
        atomicAdd(slot, sum);
}
"#;

/// Threads per block (a multiple of 32: the checksum reduces whole warps).
const BLOCK: u32 = 256;

/// The compiled module's functions on one device.
pub(crate) struct Kernels {
    fill: Function,
    copy: Function,
    add: Function,
    checksum: Function,
    /// Blocks per launch at most: enough to fill every SM a few times over.
    max_grid: u32,
}

#[derive(Copy, Clone)]
struct Function(sys::CUfunction);
// SAFETY: a CUfunction is a driver handle of a module that is never unloaded;
// launching it from several threads is allowed.
unsafe impl Send for Function {}
// SAFETY: as above.
unsafe impl Sync for Function {}

/// The kernels of `ctx`'s device, compiled on first use.
pub(crate) fn kernels(ctx: &Arc<Context>) -> Result<Arc<Kernels>, DeviceError> {
    static CACHE: OnceLock<Mutex<HashMap<i32, Arc<Kernels>>>> = OnceLock::new();
    let mut map = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(k) = map.get(&ctx.ordinal) {
        return Ok(k.clone());
    }
    let k = Arc::new(compile(ctx)?);
    map.insert(ctx.ordinal, k.clone());
    Ok(k)
}

fn compile(ctx: &Context) -> Result<Kernels, DeviceError> {
    driver::probe_nvrtc()?;
    ctx.make_current()?;
    let major = driver::attribute(
        ctx,
        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
    )?;
    let minor = driver::attribute(
        ctx,
        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
    )?;
    let sms = driver::attribute(
        ctx,
        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
    )?;
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
        name: Some("inflight_ops.cu".into()),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(SOURCE, opts)
        .map_err(|e| DeviceError::Other(format!("NVRTC could not compile the kernels: {e:?}")))?;
    let image = CString::new(ptx.to_src())
        .map_err(|_| DeviceError::Other("NVRTC's PTX holds a NUL byte".into()))?;
    // SAFETY: `image` is a NUL-terminated PTX text that outlives the call;
    // the context is current. The module is never unloaded (cached for the
    // life of the process with its context).
    let module = unsafe { cu::module::load_data(image.as_ptr().cast::<c_void>()) }
        .map_err(|e| map_err("cuModuleLoadData", e))?;
    let get = |name: &str| -> Result<Function, DeviceError> {
        let cname = CString::new(name).expect("kernel names hold no NUL");
        // SAFETY: `module` is the valid module just loaded.
        unsafe { cu::module::get_function(module, cname) }
            .map(Function)
            .map_err(|e| map_err("cuModuleGetFunction", e))
    };
    Ok(Kernels {
        fill: get("inflight_fill")?,
        copy: get("inflight_copy")?,
        add: get("inflight_add")?,
        checksum: get("inflight_checksum")?,
        max_grid: (sms.max(1) as u32) * 8,
    })
}

/// One recorded operation, with device addresses already offset to its span.
#[derive(Copy, Clone, Debug)]
pub(crate) enum Op {
    Fill {
        dst: DevicePtr,
        words: u64,
        pattern: u32,
    },
    Copy {
        src: DevicePtr,
        dst: DevicePtr,
        words: u64,
    },
    Add {
        a: DevicePtr,
        b: DevicePtr,
        out: DevicePtr,
        words: u64,
    },
    Checksum {
        src: DevicePtr,
        words: u64,
        slot: usize,
    },
}

impl Kernels {
    fn grid(&self, words: u64) -> u32 {
        let blocks = words.div_ceil(u64::from(BLOCK)).max(1);
        blocks.min(u64::from(self.max_grid)) as u32
    }

    /// Enqueues `op` on `stream`; checksum slots are in `results`.
    ///
    /// # Safety
    ///
    /// 1. Every address in `op` lies in device memory that stays allocated
    ///    until the work completes, over the whole span (`words` words).
    /// 2. `results` holds at least `slot + 1` u64 slots, zeroed earlier on
    ///    `stream`, and stays allocated until the work completes.
    /// 3. The context is current on this thread.
    pub(crate) unsafe fn launch(
        &self,
        stream: &Stream,
        op: Op,
        results: DevicePtr,
    ) -> Result<(), DeviceError> {
        let (f, words) = match op {
            Op::Fill { words, .. } => (self.fill, words),
            Op::Copy { words, .. } => (self.copy, words),
            Op::Add { words, .. } => (self.add, words),
            Op::Checksum { words, .. } => (self.checksum, words),
        };
        let grid = self.grid(words);
        // Arguments, by value, in the kernels' parameter order; the driver
        // copies them at launch, so these locals may die after it.
        let mut p: [u64; 4] = [0; 4];
        let mut pattern: u32 = 0;
        match op {
            Op::Fill {
                dst, pattern: v, ..
            } => {
                p[0] = dst;
                p[1] = words;
                pattern = v;
            }
            Op::Copy { src, dst, .. } => {
                p[0] = src;
                p[1] = dst;
                p[2] = words;
            }
            Op::Add { a, b, out, .. } => {
                p[0] = a;
                p[1] = b;
                p[2] = out;
                p[3] = words;
            }
            Op::Checksum { src, slot, .. } => {
                p[0] = src;
                p[1] = words;
                p[2] = results + 8 * slot as u64;
            }
        }
        let n_u64 = match op {
            Op::Fill { .. } => 2,
            Op::Copy { .. } | Op::Checksum { .. } => 3,
            Op::Add { .. } => 4,
        };
        let mut args: [*mut c_void; 4] = [std::ptr::null_mut(); 4];
        for (a, v) in args.iter_mut().zip(p.iter_mut()).take(n_u64) {
            *a = (v as *mut u64).cast::<c_void>();
        }
        let mut n_args = n_u64;
        if matches!(op, Op::Fill { .. }) {
            args[2] = (&mut pattern as *mut u32).cast::<c_void>();
            n_args = 3;
        }
        // SAFETY: `f` is a function of a loaded module; `args` points to one
        // value per kernel parameter, of the parameter's type (u64 for
        // pointers and counts, u32 for the pattern), alive during the call;
        // the memory it addresses is valid by the caller's promises 1 and 2,
        // and the context is current by promise 3.
        unsafe {
            cu::launch_kernel(
                f.0,
                (grid, 1, 1),
                (BLOCK, 1, 1),
                0,
                stream.0,
                &mut args[..n_args],
            )
        }
        .map_err(|e| map_err("cuLaunchKernel", e))
    }
}
