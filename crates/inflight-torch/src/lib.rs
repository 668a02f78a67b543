//! # inflight-torch
//!
//! PyTorch's pluggable CUDA allocator
//! (`torch.cuda.memory.CUDAPluggableAllocator`) over inflight's
//! stream-ordered queues, as a C ABI in a shared library:
//! `cargo build --release -p inflight-torch` gives
//! `target/release/libinflight_torch.so`, and the Python package in
//! `python/` (`inflight_torch.enable()`) plugs it into PyTorch.
//!
//! ## A tour, in the order a call flows
//!
//! 1. **The boundary** (`guard.rs`): every entry point below catches
//!    panics, so that none unwinds into PyTorch; bad calls print one line
//!    on stderr, prefixed `inflight_torch:`, and return null or do nothing.
//! 2. **Settings** (`settings.rs`): [`inflight_torch_configure`] (policy,
//!    limits, backend) and what PyTorch's hooks say before the first
//!    allocation; that allocation freezes them.
//! 3. **The plug-in** (`plugin.rs`): one [`inflight::Allocator`] per
//!    device, opened at its first allocation; one queue per stream handle,
//!    adopted ([`inflight::Allocator::adopt_queue`]) at its first sight; a
//!    buffer's free is its drop, stream-ordered.
//! 4. **The address map** (`map.rs`): device address → live buffer,
//!    sharded, for frees and `record_stream`, which PyTorch makes with the
//!    bare address.
//! 5. **The GPUs** (`kind.rs`): CUDA (the default) or inflight's simulated
//!    GPU (`INFLIGHT_TORCH_BACKEND=sim`, or the configure call), for tests
//!    and CI without CUDA.
//! 6. **Statistics** (`stats.rs`): [`InflightTorchStats`], since PyTorch's
//!    own `memory_stats` raises "not supported" with a pluggable allocator.
//!
//! ## The contract PyTorch follows
//!
//! PyTorch (torch/csrc/cuda/CUDAPluggableAllocator.cpp) calls the alloc
//! function with the current device and stream and files the pointer in a
//! map of its own, with that size, device and stream; the free function
//! gets all four back when the tensor's storage dies, from whatever thread
//! drops it (the Python thread, autograd's device threads). A zero-byte
//! tensor asks for 0 bytes: null is the answer (PyTorch's own allocator
//! gives null for it too, and never frees a null). `Tensor.record_stream`
//! calls the record-stream hook, `torch.cuda.empty_cache` the reset hook,
//! CUDA's lazy initialisation the init hook with the device count, and
//! `torch.cuda.set_per_process_memory_fraction` the memory-fraction hook.
//!
//! The C header, `include/inflight_torch.h`, declares these functions in
//! the same order, with the same contracts.

#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod guard;
mod kind;
mod map;
mod plugin;
mod settings;
mod stats;

use std::ffi::{c_char, c_int, c_void, CStr};

use crate::guard::{call, report, Entry};
use crate::plugin::{dispatch, start, started};
use crate::settings::{BackendChoice, PolicyChoice, SETTINGS};

pub use crate::kind::{sim_config, SIM_SUBMIT_COST};
pub use crate::stats::InflightTorchStats;

/// Success.
pub const INFLIGHT_TORCH_OK: c_int = 0;
/// An argument is invalid (reported on stderr).
pub const INFLIGHT_TORCH_EINVAL: c_int = -1;
/// Too late: the first allocation has been made (configure only).
pub const INFLIGHT_TORCH_ESTARTED: c_int = -2;
/// A panic was caught inside the library (reported on stderr).
pub const INFLIGHT_TORCH_EINTERNAL: c_int = -3;

/// The version of this C ABI: it changes when a signature or the layout of
/// [`InflightTorchStats`] changes incompatibly.
pub const INFLIGHT_TORCH_ABI_VERSION: u32 = 1;

/// The version of this library's C ABI ([`INFLIGHT_TORCH_ABI_VERSION`]).
///
/// # Arguments
///
/// None.
///
/// # Returns
///
/// The ABI version; the Python package checks it before anything else.
///
/// # Ownership
///
/// Nothing is owned.
///
/// # Thread safety
///
/// Any thread, at any time.
#[no_mangle]
pub extern "C" fn inflight_torch_abi_version() -> u32 {
    INFLIGHT_TORCH_ABI_VERSION
}

/// Allocates `size` bytes on `device` for work on `stream`: PyTorch's
/// alloc function (`CUDAPluggableAllocator(path, "inflight_torch_malloc",
/// ...)`).
///
/// The first call of all freezes the settings and chooses the GPU; the
/// first call on a device opens its allocator (on CUDA: the driver is
/// loaded, kernels compiled, a few hundred milliseconds); the first call
/// with a stream adopts it as one of inflight's stream-ordered queues (at
/// most 64 streams per device).
///
/// # Arguments
///
/// - `size`: bytes wanted. 0 gives null with no message (PyTorch asks for
///   0 bytes for empty tensors, and never frees the null). Negative: null
///   and a message.
/// - `device`: the device's ordinal, from 0.
/// - `stream`: the `cudaStream_t` the memory will be used on until its free
///   (0 is the legacy default stream). On the simulated GPU, any integer:
///   each distinct one is a stream.
///
/// # Returns
///
/// The allocation's device address, or null: for size 0, and (with a
/// one-line message on stderr) for a device out of range or unavailable
/// (no CUDA driver), a stream that cannot be adopted, or out of memory
/// (after trimming the cache and waiting, boundedly, for in-flight work).
///
/// # Ownership
///
/// The caller owns the allocation until it passes the address to
/// [`inflight_torch_free`]; it may use it on `stream`, and on other streams
/// it declares with [`inflight_torch_record_stream`].
///
/// # Thread safety
///
/// Any thread, concurrently with every other call of this library.
///
/// # Safety
///
/// 1. On CUDA, `stream` is a valid stream of `device`'s primary context
///    (or 0), and stays valid for as long as allocations made for it, or
///    declared on it, may be in use: the allocator enqueues event records
///    on it after their frees. PyTorch's default and pooled streams live as
///    long as the process.
#[no_mangle]
pub unsafe extern "C" fn inflight_torch_malloc(
    size: isize,
    device: c_int,
    stream: *mut c_void,
) -> *mut c_void {
    call(Entry::Malloc, std::ptr::null_mut(), || {
        if size <= 0 {
            if size < 0 {
                report(&format!(
                    "malloc of {size} bytes: a negative size; returning null"
                ));
            }
            return std::ptr::null_mut();
        }
        dispatch!(start(),
        p => p.malloc(size as usize, device, stream as usize),
        why => {
            report(&format!("malloc of {size} bytes on device {device}: no GPU: {why}"));
            std::ptr::null_mut()
        })
    })
}

/// Frees an allocation: PyTorch's free function. The free is
/// stream-ordered: the memory may serve the next allocation on its own
/// stream at once (that stream runs the new work after the old), and any
/// other stream, or go back to the device, only once the work enqueued on
/// its stream up to this call, and on every stream declared with
/// [`inflight_torch_record_stream`], has completed.
///
/// # Arguments
///
/// - `ptr`: an address [`inflight_torch_malloc`] returned and that has not
///   been freed. Null is ignored, as `free(NULL)` is.
/// - `size`: the size it was allocated with (a mismatch is reported; the
///   allocation is freed all the same).
/// - `device`: the device it was allocated on.
/// - `stream`: the stream it was allocated for (the allocation knows its
///   stream; this one is not used).
///
/// # Returns
///
/// Nothing. A pointer that is not a live allocation of this library on
/// `device` (never allocated, freed already, or inside an allocation), a
/// device out of range, or a free before any allocation: a one-line
/// message on stderr, and nothing is done.
///
/// # Ownership
///
/// The caller gives the allocation back; it must not use the address
/// again, except through work already enqueued on its stream (or on
/// declared streams).
///
/// # Thread safety
///
/// Any thread, including one other than the allocating thread,
/// concurrently with every other call.
///
/// # Safety
///
/// 1. As for [`inflight_torch_malloc`]: the allocation's stream and any
///    declared streams are still valid.
#[no_mangle]
pub unsafe extern "C" fn inflight_torch_free(
    ptr: *mut c_void,
    size: isize,
    device: c_int,
    stream: *mut c_void,
) {
    let _ = stream;
    call(Entry::Free, (), || {
        if ptr.is_null() {
            return;
        }
        let Some(rt) = started() else {
            report(&format!(
                "free of {:#x} before any allocation: ignored",
                ptr as usize
            ));
            return;
        };
        let size = usize::try_from(size).unwrap_or(0);
        dispatch!(rt, p => p.free(ptr as usize, size, device), why => {
            report(&format!("free of {:#x}: no GPU: {why}", ptr as usize));
        })
    })
}

/// Declares a use of an allocation on another stream: the record-stream
/// hook (`set_record_stream_fn`), called by `Tensor.record_stream`.
/// At the allocation's free, the use is fixed as `stream`'s work enqueued
/// up to then, and the memory is neither reused by another stream nor
/// released until that work has completed.
///
/// # Arguments
///
/// - `ptr`: a live allocation of this library (any device).
/// - `stream`: a stream of the allocation's device (0: the legacy default
///   stream), adopted if it is new.
///
/// # Returns
///
/// Nothing. An unknown pointer (not live), or a stream that cannot be
/// adopted: a one-line message, and nothing is done.
///
/// # Ownership
///
/// Nothing changes hands; the caller must enqueue the use on `stream`
/// after the allocation's first use on its own stream (an event wait), as
/// with any allocator.
///
/// # Thread safety
///
/// Any thread, concurrently with every other call; a free of the same
/// allocation racing with it is the caller's bug (reported, not unsafe).
///
/// # Safety
///
/// 1. As for [`inflight_torch_malloc`], for `stream`.
#[no_mangle]
pub unsafe extern "C" fn inflight_torch_record_stream(ptr: *mut c_void, stream: *mut c_void) {
    call(Entry::RecordStream, (), || {
        let Some(rt) = started() else {
            report(&format!(
                "record_stream of {:#x} before any allocation: ignored",
                ptr as usize
            ));
            return;
        };
        dispatch!(rt, p => p.record_stream(ptr as usize, stream as usize), _why => {})
    })
}

/// Empties every device's cache: the reset hook (`set_reset_fn`), called
/// by `torch.cuda.empty_cache`. Ready blocks go back to the device now;
/// blocks whose last use is still in flight go back once it completes.
/// Live allocations are untouched.
///
/// # Arguments
///
/// None.
///
/// # Returns
///
/// Nothing. Before any allocation it does nothing.
///
/// # Ownership
///
/// Nothing changes hands.
///
/// # Thread safety
///
/// Any thread, concurrently with every other call.
#[no_mangle]
pub extern "C" fn inflight_torch_empty_cache() {
    call(Entry::EmptyCache, (), || {
        if let Some(rt) = started() {
            dispatch!(rt, p => p.empty_cache(), _why => {})
        }
    })
}

/// The init hook (`set_init_fn`): PyTorch calls it at CUDA's lazy
/// initialisation with the number of devices.
///
/// # Arguments
///
/// - `device_count`: devices PyTorch sees. Before the first allocation it
///   sets the simulated GPU's device count; CUDA counts its own.
///
/// # Returns
///
/// Nothing.
///
/// # Ownership
///
/// Nothing changes hands.
///
/// # Thread safety
///
/// Any thread, concurrently with every other call.
#[no_mangle]
pub extern "C" fn inflight_torch_init(device_count: c_int) {
    call(Entry::Init, (), || {
        let mut s = SETTINGS.lock();
        if !s.frozen && device_count > 0 {
            s.device_count = device_count as usize;
        }
    })
}

/// The memory-fraction hook (`set_memory_fraction_fn`), called by
/// `torch.cuda.set_per_process_memory_fraction`: the device's memory limit
/// becomes `fraction` × its capacity (clamped to 1 byte .. capacity), its
/// cache limit the configured one or the new memory limit, whichever is
/// lower, and its GC limit 95% of the memory limit. Allocations past the
/// limit trim, wait, and then return null.
///
/// # Arguments
///
/// - `fraction`: 0.0 to 1.0 (clamped); not finite: reported, ignored.
/// - `device`: the device's ordinal.
///
/// # Returns
///
/// Nothing. Before the device's first allocation the fraction is kept and
/// applied when it is opened.
///
/// # Ownership
///
/// Nothing changes hands.
///
/// # Thread safety
///
/// Any thread, concurrently with every other call.
#[no_mangle]
pub extern "C" fn inflight_torch_set_memory_fraction(fraction: f64, device: c_int) {
    call(Entry::MemoryFraction, (), || {
        if !fraction.is_finite() {
            report(&format!(
                "set_memory_fraction({fraction}, {device}): not a fraction: ignored"
            ));
            return;
        }
        {
            let mut s = SETTINGS.lock();
            if !s.frozen {
                if device < 0 {
                    report(&format!(
                        "set_memory_fraction({fraction}, {device}): no such device: ignored"
                    ));
                } else {
                    s.fractions.push((device as usize, fraction));
                }
                return;
            }
        }
        dispatch!(start(), p => p.set_memory_fraction(fraction, device), _why => {})
    })
}

/// Configures the allocators, before the first allocation.
///
/// # Arguments
///
/// - `policy`: `"deferred"` (the default: nothing is reused or released
///   while work that may use it is in flight), `"retained"`, or
///   `"immediate"`, which reproduces the defect inflight exists to prevent
///   (a freed block is reused or released at once, whatever its streams
///   still do): for demonstrations only, it corrupts results. Null: unchanged.
/// - `cache_limit`: per device, ready bytes are trimmed to this (0 caches
///   nothing); negative: inflight's default (the memory limit).
/// - `memory_limit`: per device, reserved bytes never pass this (above 0);
///   negative: 95% of the device's memory.
/// - `backend`: `"cuda"` or `"sim"`; null: `INFLIGHT_TORCH_BACKEND` from
///   the environment at the first allocation, else CUDA.
///
/// # Returns
///
/// [`INFLIGHT_TORCH_OK`]; [`INFLIGHT_TORCH_EINVAL`] for an unknown name or
/// a limit out of range (nothing is changed); [`INFLIGHT_TORCH_ESTARTED`]
/// after the first allocation (nothing is changed). Limits that exceed the
/// device are found at its opening: its allocations then return null with
/// the reason on stderr.
///
/// # Ownership
///
/// The strings are read during the call only.
///
/// # Thread safety
///
/// Any thread; a configure racing with the first allocation either takes
/// effect before it or returns [`INFLIGHT_TORCH_ESTARTED`].
///
/// # Safety
///
/// 1. `policy` and `backend` are each null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn inflight_torch_configure(
    policy: *const c_char,
    cache_limit: i64,
    memory_limit: i64,
    backend: *const c_char,
) -> c_int {
    let read = |p: *const c_char| -> Option<String> {
        // SAFETY: the caller's promise 1: null or a NUL-terminated string.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    let (policy, backend) = (read(policy), read(backend));
    call(Entry::Configure, INFLIGHT_TORCH_EINTERNAL, || {
        configure(policy, cache_limit, memory_limit, backend)
    })
}

fn configure(
    policy: Option<String>,
    cache_limit: i64,
    memory_limit: i64,
    backend: Option<String>,
) -> c_int {
    let policy = match policy.as_deref().map(PolicyChoice::parse).transpose() {
        Ok(p) => p,
        Err(e) => {
            report(&format!("configure: {e}"));
            return INFLIGHT_TORCH_EINVAL;
        }
    };
    let backend = match backend.as_deref().map(BackendChoice::parse).transpose() {
        Ok(b) => b,
        Err(e) => {
            report(&format!("configure: {e}"));
            return INFLIGHT_TORCH_EINVAL;
        }
    };
    let limit = |v: i64| u64::try_from(v).ok();
    let (cache, memory) = (limit(cache_limit), limit(memory_limit));
    if memory == Some(0) {
        report("configure: the memory limit must be above 0");
        return INFLIGHT_TORCH_EINVAL;
    }
    if let (Some(c), Some(m)) = (cache, memory) {
        if c > m {
            report(&format!(
                "configure: the cache limit ({c} B) is above the memory limit ({m} B)"
            ));
            return INFLIGHT_TORCH_EINVAL;
        }
    }
    let mut s = SETTINGS.lock();
    if s.frozen {
        report(
            "configure after the first allocation: ignored (configure before any CUDA allocation)",
        );
        return INFLIGHT_TORCH_ESTARTED;
    }
    if let Some(p) = policy {
        s.policy = p;
    }
    if backend.is_some() {
        s.backend = backend;
    }
    s.cache_limit = cache;
    s.memory_limit = memory;
    INFLIGHT_TORCH_OK
}

/// Fills `out` with device `device`'s statistics ([`InflightTorchStats`]).
///
/// # Arguments
///
/// - `device`: the device's ordinal.
/// - `out`: where to write.
/// - `out_size`: the bytes the caller's struct has (`sizeof`): at most that
///   many are written, so that a caller built against an older, shorter
///   struct keeps working.
///
/// # Returns
///
/// [`INFLIGHT_TORCH_OK`] (zeros for a device not used yet, or before any
/// allocation); [`INFLIGHT_TORCH_EINVAL`] for a null `out` or a device out
/// of range; [`INFLIGHT_TORCH_EINTERNAL`] if a panic was caught.
///
/// # Ownership
///
/// The caller owns `out`; it is written during the call only.
///
/// # Thread safety
///
/// Any thread, concurrently with every other call. The figures are a
/// snapshot taken under the allocator's lock; taking it also moves blocks
/// whose work has completed to the ready list.
///
/// # Safety
///
/// 1. `out` is null or valid for writes of `out_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn inflight_torch_stats(
    device: c_int,
    out: *mut InflightTorchStats,
    out_size: usize,
) -> c_int {
    let out = out as usize;
    call(Entry::Stats, INFLIGHT_TORCH_EINTERNAL, || {
        if out == 0 {
            report("stats: a null output pointer");
            return INFLIGHT_TORCH_EINVAL;
        }
        let figures = match started() {
            None => {
                if device < 0 {
                    report(&format!("stats: device {device} is out of range"));
                    return INFLIGHT_TORCH_EINVAL;
                }
                InflightTorchStats::default()
            }
            Some(rt) => {
                match dispatch!(rt, p => p.stats(device), _why => Some(InflightTorchStats::default()))
                {
                    Some(s) => s,
                    None => return INFLIGHT_TORCH_EINVAL,
                }
            }
        };
        let n = out_size.min(std::mem::size_of::<InflightTorchStats>());
        // SAFETY: the caller's promise 1: `out` is valid for `out_size`
        // bytes, and `n` is at most that; the source is a whole struct.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&figures as *const InflightTorchStats).cast::<u8>(),
                out as *mut u8,
                n,
            );
        }
        INFLIGHT_TORCH_OK
    })
}

/// Resets the peak figures (allocated and reserved) to the current ones.
///
/// # Arguments
///
/// - `device`: the device's ordinal; negative: every device.
///
/// # Returns
///
/// Nothing. A device out of range: a message, nothing done.
///
/// # Ownership
///
/// Nothing changes hands.
///
/// # Thread safety
///
/// Any thread, concurrently with every other call.
#[no_mangle]
pub extern "C" fn inflight_torch_reset_peak(device: c_int) {
    call(Entry::ResetPeak, (), || {
        if let Some(rt) = started() {
            dispatch!(rt, p => p.reset_peak(device), _why => {})
        }
    })
}

/// The GPU the library runs on: `"cuda"`, `"sim"`, `"unavailable"` (no
/// GPU could be used: the reason was printed at the first allocation), or
/// `"none"` before the first allocation.
///
/// # Arguments
///
/// None.
///
/// # Returns
///
/// A static NUL-terminated string.
///
/// # Ownership
///
/// The string is the library's, valid for the life of the process.
///
/// # Thread safety
///
/// Any thread, at any time.
#[no_mangle]
pub extern "C" fn inflight_torch_backend() -> *const c_char {
    let name: &'static CStr = match started().map(|rt| rt.name()) {
        Some("cuda") => c"cuda",
        Some("sim") => c"sim",
        Some(_) => c"unavailable",
        None => c"none",
    };
    name.as_ptr()
}

/// Devices the library counted at its first allocation (0 before it, or
/// when no GPU is available).
///
/// # Arguments
///
/// None.
///
/// # Returns
///
/// The count.
///
/// # Ownership
///
/// Nothing is owned.
///
/// # Thread safety
///
/// Any thread, at any time.
#[no_mangle]
pub extern "C" fn inflight_torch_device_count() -> c_int {
    started().map_or(
        0,
        |rt| dispatch!(rt, p => p.device_count() as c_int, _why => 0),
    )
}

/// Live allocations on `device` (entries of its address map), for tests
/// and leak checks.
///
/// # Arguments
///
/// - `device`: the device's ordinal.
///
/// # Returns
///
/// The count; 0 for a device out of range or not used yet.
///
/// # Ownership
///
/// Nothing is owned.
///
/// # Thread safety
///
/// Any thread, at any time; the count is not a snapshot across threads.
#[no_mangle]
pub extern "C" fn inflight_torch_live_allocations(device: c_int) -> usize {
    let Ok(d) = usize::try_from(device) else {
        return 0;
    };
    started().map_or(0, |rt| dispatch!(rt, p => p.live(d), _why => 0))
}

/// A test hook: makes the next call of the entry point named `entry` (an
/// `inflight_torch_*` name, such as `"inflight_torch_malloc"`) panic inside
/// the library, to show that the panic is caught at the boundary.
///
/// # Arguments
///
/// - `entry`: the entry point's full name.
///
/// # Returns
///
/// [`INFLIGHT_TORCH_OK`], or [`INFLIGHT_TORCH_EINVAL`] for a null or
/// unknown name.
///
/// # Ownership
///
/// The string is read during the call only.
///
/// # Thread safety
///
/// Any thread; the armed call is the next one from any thread.
///
/// # Safety
///
/// 1. `entry` is null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn inflight_torch_debug_arm_panic(entry: *const c_char) -> c_int {
    if entry.is_null() {
        return INFLIGHT_TORCH_EINVAL;
    }
    // SAFETY: the caller's promise 1.
    let name = unsafe { CStr::from_ptr(entry) }.to_string_lossy();
    match Entry::ALL.iter().find(|e| e.name() == name) {
        Some(&e) => {
            guard::arm(e);
            INFLIGHT_TORCH_OK
        }
        None => INFLIGHT_TORCH_EINVAL,
    }
}
