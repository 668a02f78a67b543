//! The CUDA backend: NVIDIA GPUs through the driver API (cudarc, with
//! `libcuda` opened at run time, so the crate builds without CUDA installed).
//!
//! - **Buffers** are raw device memory, by default from a memory pool of the
//!   backend's own with `cuMemAllocFromPoolAsync`/`cuMemFreeAsync` on a
//!   private stream ([`RawAlloc::Pool`]); [`RawAlloc::Sync`] uses
//!   `cuMemAlloc`/`cuMemFree` instead. docs/CUDA.md has the measured figures
//!   behind the default.
//! - **Queues** are non-blocking CUDA streams. A submission is the work that
//!   [`Backend::submit`] enqueues at commit; its completion is an event
//!   recorded after it (events are pooled). Each queue keeps a deque of
//!   `(value, event)` in submission order; [`Backend::completed`] pops the
//!   front while its event has completed (a non-blocking `cuEventQuery`), so
//!   the watermark is the highest value whose event, and every earlier one,
//!   completed. [`Backend::wait`] polls the same way with short sleeps until
//!   its timeout: it never blocks without a bound.
//! - **Ordering**: a stream runs its work in order, so later work sees
//!   earlier work's memory effects: [`Backend::orders_memory`] is true, and
//!   the allocator may hand a block still in use on a stream to new work on
//!   that same stream.
//! - **Operations** are NVRTC-compiled kernels (`kernels.rs`). Checksums add
//!   into a small device results slab per submission (zeroed first), which is
//!   copied into pinned host memory at the end of the submission, before its
//!   event; once the event completes the host copy is final.
//!
//! # Release
//!
//! [`Backend::release`] frees at once (`cuMemFreeAsync` on the private
//! stream, or `cuMemFree`). It adds no synchronisation of its own: that the
//! memory is no longer in use is the allocator's invariant I1, and a hidden
//! sync here would mask a bug in it. Note that `cuMemFree` itself
//! synchronises the device, which is one reason [`RawAlloc::Pool`] is the
//! default.

mod driver;
mod harness;
mod kernels;
#[cfg(feature = "testing")]
pub mod peers;
mod vmm;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::result as cu;
use cudarc::driver::result::DriverError;
use parking_lot::Mutex;

use self::driver::{map_err, Context, DevicePtr, Event, EventState, HostPtr, MemPool, Stream};
pub use self::driver::{probe_driver, probe_nvrtc};
use self::kernels::{Kernels, Op};
use crate::backend::{Backend, Binding, DeviceError, DeviceInfo, Harness, Span};

/// Where raw buffers come from.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum RawAlloc {
    /// `cuMemAllocFromPoolAsync`/`cuMemFreeAsync` on a pool and a stream of
    /// the backend's own; the allocating stream is synchronised once per
    /// allocation so the memory may be used on any stream.
    #[default]
    Pool,
    /// `cuMemAlloc`/`cuMemFree` (the free synchronises the whole device).
    Sync,
}

/// Settings of the CUDA backend.
#[derive(Clone, Debug)]
pub struct CudaConfig {
    /// The device's ordinal.
    pub ordinal: i32,
    /// Where raw buffers come from.
    pub raw_alloc: RawAlloc,
    /// Whether growable segments (virtual memory management) are offered
    /// where the device has them (on by default).
    pub growable: bool,
}

impl Default for CudaConfig {
    fn default() -> Self {
        CudaConfig {
            ordinal: 0,
            raw_alloc: RawAlloc::default(),
            growable: true,
        }
    }
}

/// A CUDA device. Clones share it.
#[derive(Clone)]
pub struct CudaGpu {
    dev: Arc<Device>,
}

struct Device {
    ctx: Arc<Context>,
    kernels: Arc<Kernels>,
    name: String,
    total_mem: u64,
    raw_alloc: RawAlloc,
    /// The pool and its stream, under [`RawAlloc::Pool`].
    pool: Option<(MemPool, Stream)>,
    /// Completed events, ready to record again.
    events: Mutex<Vec<Event>>,
    /// Result slabs not in use by any submission.
    slabs: Mutex<Vec<Slab>>,
    /// The granularity of growable segments' physical memory, where the
    /// device has virtual memory management (and it was not turned off).
    granularity: Option<u64>,
}

/// Device slots for a submission's checksums and their pinned host copy.
struct Slab {
    dev: DevicePtr,
    host: HostPtr,
    /// Slots (u64) in each.
    cap: usize,
}

/// A raw CUDA buffer.
#[derive(Debug)]
pub struct CudaBuffer {
    ptr: DevicePtr,
    size: u64,
    /// A growable segment's pages (`Backend::reserve`); `None` for memory
    /// from `Backend::allocate`.
    range: Option<Box<vmm::Range>>,
}

/// A CUDA stream with its timeline.
pub struct CudaQueue {
    dev: Arc<Device>,
    stream: Stream,
    state: Arc<QueueState>,
    /// Created by this backend (destroyed with the queue), or adopted from
    /// the program ([`CudaGpu::adopt_stream`]: left to it).
    owned: bool,
}

struct QueueState {
    /// The watermark: written under `inflight`'s lock, read without it.
    completed: AtomicU64,
    /// Submitted, not yet seen complete, oldest first.
    inflight: Mutex<VecDeque<InFlight>>,
}

struct InFlight {
    value: u64,
    event: Event,
    slab: Option<Slab>,
    results: Arc<OnceLock<Vec<u64>>>,
    slots: usize,
}

/// Work being recorded for one CUDA submission.
pub struct CudaCommands {
    steps: Vec<Step>,
    checksums: usize,
    /// Other queues' values this submission must wait for on the device.
    waits: Vec<(Arc<QueueState>, u64)>,
}

/// A submitted CUDA submission.
pub struct CudaSubmission {
    results: Arc<OnceLock<Vec<u64>>>,
    slots: usize,
    state: Arc<QueueState>,
    dev: Arc<Device>,
}

impl CudaGpu {
    /// Opens device `config.ordinal`: probes for the driver and NVRTC, then
    /// retains the device's primary context and compiles the kernels (both
    /// once per process). Without a driver this is a clear
    /// [`DeviceError::Unsupported`], not a panic.
    pub fn new(config: CudaConfig) -> Result<Self, DeviceError> {
        driver::probe_driver()?;
        driver::probe_nvrtc()?;
        let ctx = driver::context(config.ordinal)?;
        ctx.make_current()?;
        let kernels = kernels::kernels(&ctx)?;
        let name = cu::device::get_name(ctx.device).map_err(|e| map_err("cuDeviceGetName", e))?;
        // SAFETY: `ctx.device` is a valid device handle.
        let total_mem = unsafe { cu::device::total_mem(ctx.device) }
            .map_err(|e| map_err("cuDeviceTotalMem", e))? as u64;
        let pool = match config.raw_alloc {
            RawAlloc::Pool => Some((MemPool::new(&ctx)?, Stream::new(&ctx)?)),
            RawAlloc::Sync => None,
        };
        let granularity = if config.growable {
            vmm::granularity(&ctx)
        } else {
            None
        };
        Ok(CudaGpu {
            dev: Arc::new(Device {
                ctx,
                kernels,
                name,
                total_mem,
                raw_alloc: config.raw_alloc,
                pool,
                events: Mutex::new(Vec::new()),
                slabs: Mutex::new(Vec::new()),
                granularity,
            }),
        })
    }

    /// A queue over a stream the program owns (for
    /// [`crate::Allocator::adopt_queue`]): its submissions (markers, and any
    /// command buffers committed to it) are enqueued on `stream`, and the
    /// queue never destroys it. `stream` may be the legacy default stream
    /// (null) or a per-thread one.
    ///
    /// # Safety
    ///
    /// 1. `stream` is a valid stream of this device's primary context, and
    ///    stays valid until the queue (and the allocator's handles to it)
    ///    are dropped.
    pub unsafe fn adopt_stream(
        &self,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<CudaQueue, DeviceError> {
        Ok(self.queue_over(Stream(stream), false))
    }

    fn queue_over(&self, stream: Stream, owned: bool) -> CudaQueue {
        CudaQueue {
            dev: self.dev.clone(),
            stream,
            state: Arc::new(QueueState {
                completed: AtomicU64::new(0),
                inflight: Mutex::new(VecDeque::new()),
            }),
            owned,
        }
    }

    /// Device 0 with default settings.
    pub fn default_device() -> Result<Self, DeviceError> {
        Self::new(CudaConfig::default())
    }

    /// Where raw buffers come from.
    pub fn raw_alloc(&self) -> RawAlloc {
        self.dev.raw_alloc
    }

    /// Makes the device's context current on the calling thread (for code
    /// that calls the driver directly beside this backend, such as the
    /// measurement examples).
    pub fn make_current(&self) -> Result<(), DeviceError> {
        self.dev.ctx.make_current()
    }
}

impl Device {
    fn take_event(&self) -> Result<Event, DeviceError> {
        if let Some(e) = self.events.lock().pop() {
            return Ok(e);
        }
        Event::new(&self.ctx)
    }

    fn take_slab(&self, slots: usize) -> Result<Slab, DeviceError> {
        {
            let mut slabs = self.slabs.lock();
            let best = slabs
                .iter()
                .enumerate()
                .filter(|(_, s)| s.cap >= slots)
                .min_by_key(|(_, s)| s.cap)
                .map(|(i, _)| i);
            if let Some(i) = best {
                return Ok(slabs.swap_remove(i));
            }
        }
        let cap = slots.next_power_of_two().max(16);
        // SAFETY: a plain device allocation, owned by the slab until the
        // device is dropped; the context is current (made so by the caller).
        let dev = unsafe { cu::malloc_sync(cap * 8) }.map_err(|e| map_err("cuMemAlloc", e))?;
        let host = match driver::host_alloc(&self.ctx, cap) {
            Ok(h) => h,
            Err(e) => {
                // SAFETY: `dev` was just allocated and never used.
                let _ = unsafe { cu::free_sync(dev) };
                return Err(e);
            }
        };
        Ok(Slab { dev, host, cap })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Every queue is gone (each holds an `Arc<Device>`), and each
        // synchronised its stream on drop: nothing in flight uses the slabs.
        if self.ctx.make_current().is_err() {
            return;
        }
        for e in self.events.get_mut().drain(..) {
            // SAFETY: pooled events are complete and no longer referenced.
            let _ = unsafe { cu::event::destroy(e.0) };
        }
        for s in self.slabs.get_mut().drain(..) {
            // SAFETY: pooled slabs belong to no submission; their memory came
            // from cuMemAlloc and cuMemHostAlloc.
            unsafe {
                let _ = cu::free_sync(s.dev);
                let _ = cu::free_host(s.host.0.cast());
            }
        }
        if let Some((pool, stream)) = self.pool.take() {
            let _ = stream.synchronize();
            // SAFETY: the stream and the pool are not used after this; the
            // driver defers the pool's destruction while allocations remain.
            unsafe {
                stream.destroy();
                let _ = cu::mem_pool::destroy(pool.0);
            }
        }
    }
}

impl QueueState {
    /// Pops every leading submission whose event completed, moving its
    /// checksums into its result cell and its event and slab back to the
    /// pools; returns the watermark.
    ///
    /// The newest event is asked first: a stream completes its work in
    /// order, so if the newest event has completed, so has every earlier
    /// one, and one query harvests them all (the common case when the GPU is
    /// ahead; a query can wait behind other threads' driver calls), which
    /// keeps completion queries off `repro`'s profile (docs/BENCHMARKS.md,
    /// *CUDA*). Otherwise, and on an error, each from the front, which
    /// attributes a failure to its submission.
    fn harvest(&self, dev: &Device) -> Result<u64, DeviceError> {
        let mut inflight = self.inflight.lock();
        let all_done = inflight
            .back()
            .is_some_and(|newest| matches!(newest.event.query(), Ok(EventState::Done)));
        while let Some(front) = inflight.front() {
            let state = if all_done {
                Ok(EventState::Done)
            } else {
                front.event.query()
            };
            match state {
                Ok(EventState::Pending) => break,
                Ok(EventState::Done) => {
                    let f = inflight.pop_front().expect("front exists");
                    if let Some(slab) = f.slab {
                        // SAFETY: the event completed, so the copy into the
                        // pinned host slab that preceded it on the stream has
                        // finished; the slab holds `cap >= slots` u64.
                        let got = unsafe { std::slice::from_raw_parts(slab.host.0, f.slots) };
                        let _ = f.results.set(got.to_vec());
                        dev.slabs.lock().push(slab);
                    }
                    dev.events.lock().push(f.event);
                    self.completed.store(f.value, Ordering::Release);
                }
                Err(e) => return Err(fault(front.value, e)),
            }
        }
        Ok(self.completed.load(Ordering::Acquire))
    }
}

/// A failure seen through submission `value`'s event.
fn fault(value: u64, e: DriverError) -> DeviceError {
    match map_err("cuEventQuery", e) {
        lost @ DeviceError::Lost(_) => lost,
        other => DeviceError::SubmissionFailed {
            value,
            reason: other.to_string(),
        },
    }
}

impl Drop for CudaQueue {
    fn drop(&mut self) {
        if self.dev.ctx.make_current().is_err() {
            return;
        }
        // Teardown: the allocator has already waited (boundedly) for its
        // queues; this makes sure the slabs in flight are done with.
        let _ = self.stream.synchronize();
        let _ = self.state.harvest(&self.dev);
        // Whatever is left failed; its slabs and events are leaked rather
        // than reused while the device may still touch them.
        if self.owned {
            // SAFETY: the stream is ours and not used after this.
            unsafe { self.stream.destroy() };
        }
    }
}

impl Backend for CudaGpu {
    type Buffer = CudaBuffer;
    type Queue = CudaQueue;
    type Commands = CudaCommands;
    type Submission = CudaSubmission;

    fn info(&self) -> DeviceInfo {
        let max = self.dev.total_mem & !3;
        DeviceInfo {
            backend: "cuda",
            name: self.dev.name.clone(),
            memory_capacity: self.dev.total_mem,
            max_buffer_size: max,
            max_op_span: max,
        }
    }

    fn allocate(&self, bytes: u64) -> Result<CudaBuffer, DeviceError> {
        if bytes == 0 || bytes % 4 != 0 || bytes > self.dev.total_mem {
            return Err(DeviceError::Unsupported(format!(
                "cannot create a buffer of {bytes} bytes"
            )));
        }
        let d = &self.dev;
        d.ctx.make_current()?;
        let ptr = match &d.pool {
            None => {
                // SAFETY: a plain device allocation; the context is current.
                unsafe { cu::malloc_sync(bytes as usize) }.map_err(|e| map_err("cuMemAlloc", e))?
            }
            Some((pool, stream)) => {
                // SAFETY: pool and stream are valid; the context is current.
                let mut r = unsafe { cu::mem_pool::alloc_async(pool.0, bytes as usize, stream.0) };
                if matches!(r, Err(DriverError(c)) if c == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)
                {
                    // The pool keeps freed memory (release threshold: max);
                    // give it back and try once more.
                    pool.trim()?;
                    // SAFETY: as above.
                    r = unsafe { cu::mem_pool::alloc_async(pool.0, bytes as usize, stream.0) };
                }
                let ptr = r.map_err(|e| map_err("cuMemAllocFromPoolAsync", e))?;
                // The allocation is ordered on the private stream; finish it
                // so that any queue may use the memory at once.
                stream.synchronize()?;
                ptr
            }
        };
        Ok(CudaBuffer {
            ptr,
            size: bytes,
            range: None,
        })
    }

    fn page_granularity(&self) -> Option<u64> {
        self.dev.granularity
    }

    fn reserve(&self, bytes: u64, page: u64) -> Result<CudaBuffer, DeviceError> {
        let Some(g) = self.dev.granularity else {
            return Err(DeviceError::Unsupported(
                "this device has no virtual memory management".into(),
            ));
        };
        if page == 0 || page % g != 0 || bytes == 0 || bytes % page != 0 {
            return Err(DeviceError::Unsupported(format!(
                "cannot reserve {bytes} bytes in pages of {page} (granularity {g})"
            )));
        }
        let ptr = vmm::reserve(&self.dev.ctx, bytes, page)?;
        Ok(CudaBuffer {
            ptr,
            size: bytes,
            range: Some(Box::new(vmm::Range {
                page,
                handles: Mutex::new(Default::default()),
            })),
        })
    }

    fn map(&self, range: &CudaBuffer, offset: u64, bytes: u64) -> Result<(), DeviceError> {
        let Some(r) = &range.range else {
            return Err(DeviceError::Unsupported(
                "mapping into a plain buffer".into(),
            ));
        };
        let aligned = offset % r.page == 0 && bytes % r.page == 0 && bytes > 0;
        if !aligned || offset + bytes > range.size {
            return Err(DeviceError::Unsupported(format!(
                "cannot map [{offset}, {}) of a range of {} bytes in pages of {}",
                offset + bytes,
                range.size,
                r.page
            )));
        }
        vmm::map(&self.dev.ctx, range.ptr, r, offset, bytes)
    }

    unsafe fn unmap(&self, range: &CudaBuffer, offset: u64, bytes: u64) {
        if let Some(r) = &range.range {
            // SAFETY: the caller's promises (1) and (2) are `vmm::unmap`'s.
            unsafe { vmm::unmap(&self.dev.ctx, range.ptr, r, offset, bytes) };
        }
    }

    unsafe fn release(&self, buffer: CudaBuffer) {
        let d = &self.dev;
        if d.ctx.make_current().is_err() {
            return;
        }
        if let Some(r) = &buffer.range {
            // SAFETY: a range this backend reserved (promise 1), which no
            // submitted work uses any more (promise 2).
            unsafe { vmm::release(&d.ctx, buffer.ptr, buffer.size, r) };
            return;
        }
        match &d.pool {
            // SAFETY: the buffer came from cuMemAlloc (promise 1) and no
            // submitted work uses it any more (promise 2, the allocator's I1).
            None => drop(unsafe { cu::free_sync(buffer.ptr) }),
            // SAFETY: the buffer came from this pool (promise 1); promise 2
            // means no queue's work still uses it, so a stream-ordered free
            // on the private stream is safe.
            Some((_, stream)) => drop(unsafe { cu::free_async(buffer.ptr, stream.0) }),
        }
    }

    fn create_queue(&self) -> Result<CudaQueue, DeviceError> {
        Ok(self.queue_over(Stream::new(&self.dev.ctx)?, true))
    }

    fn address(&self, buffer: &CudaBuffer) -> u64 {
        buffer.ptr
    }

    fn orders_memory(&self, _queue: &CudaQueue) -> bool {
        true
    }

    fn begin(&self, _queue: &CudaQueue) -> Result<CudaCommands, DeviceError> {
        Ok(CudaCommands {
            steps: Vec::new(),
            checksums: 0,
            waits: Vec::new(),
        })
    }

    fn zero(
        &self,
        cmds: &mut Self::Commands,
        dst: Binding<'_, Self::Buffer>,
        span: Span,
    ) -> Result<(), DeviceError> {
        Harness::fill(self, cmds, dst, span, 0)
    }

    fn wait_on_device(
        &self,
        cmds: &mut CudaCommands,
        other: &CudaQueue,
        value: u64,
    ) -> Result<bool, DeviceError> {
        cmds.waits.push((other.state.clone(), value));
        Ok(true)
    }

    fn submit(
        &self,
        queue: &CudaQueue,
        cmds: CudaCommands,
        value: u64,
    ) -> Result<CudaSubmission, DeviceError> {
        let d = &self.dev;
        d.ctx.make_current()?;
        // Device-side waits first, for the whole submission. The other
        // queue's deque lock is held across cuStreamWaitEvent so that its
        // event cannot be harvested and re-recorded in between; an entry
        // already harvested has completed and needs no wait.
        for (other, wait_for) in &cmds.waits {
            let inflight = other.inflight.lock();
            if let Some(f) = inflight.iter().find(|f| f.value == *wait_for) {
                f.event.wait_on(&queue.stream)?;
            }
        }
        let slots = cmds.checksums;
        let slab = if slots > 0 {
            Some(d.take_slab(slots)?)
        } else {
            None
        };
        let s = &queue.stream;
        let results_dev = slab.as_ref().map_or(0, |s| s.dev);
        let enqueue = || -> Result<Event, DeviceError> {
            if let Some(slab) = &slab {
                // SAFETY: the slab's device memory holds `cap >= slots` u64
                // and stays allocated (owned by this submission, then pooled).
                unsafe { cu::memset_d8_async(slab.dev, 0, slots * 8, s.0) }
                    .map_err(|e| map_err("cuMemsetD8Async", e))?;
            }
            for step in cmds.steps {
                match step {
                    // SAFETY: every address in `op` was checked against its
                    // buffer's size when recorded, and the allocator keeps
                    // those buffers allocated until this submission
                    // completes (I1); the results slab is zeroed above on
                    // the same stream; the context is current.
                    Step::Kernel(op) => unsafe { d.kernels.launch(s, op, results_dev) }?,
                    Step::User(work) => work(s.0)?,
                }
            }
            if let Some(slab) = &slab {
                // SAFETY: pinned host memory of `cap >= slots` u64, read only
                // after the event below completes.
                unsafe {
                    cudarc::driver::sys::cuMemcpyDtoHAsync_v2(
                        slab.host.0.cast(),
                        slab.dev,
                        slots * 8,
                        s.0,
                    )
                }
                .result()
                .map_err(|e| map_err("cuMemcpyDtoHAsync", e))?;
            }
            let event = d.take_event()?;
            event.record(s)?;
            Ok(event)
        };
        // On an error part of the work may be enqueued: the slab is then
        // leaked (dropped without being pooled) rather than reused.
        let event = enqueue()?;
        let results = Arc::new(OnceLock::new());
        if slab.is_none() {
            let _ = results.set(Vec::new());
        }
        // The core submits to a queue one call at a time, so entries are
        // pushed in value order.
        queue.state.inflight.lock().push_back(InFlight {
            value,
            event,
            slab,
            results: results.clone(),
            slots,
        });
        Ok(CudaSubmission {
            results,
            slots,
            state: queue.state.clone(),
            dev: self.dev.clone(),
        })
    }

    fn completed(&self, queue: &CudaQueue) -> Result<u64, DeviceError> {
        self.dev.ctx.make_current()?;
        queue.state.harvest(&self.dev)
    }

    fn wait(&self, queue: &CudaQueue, value: u64, timeout: Duration) -> Result<bool, DeviceError> {
        if value == 0 {
            return Ok(true);
        }
        let start = Instant::now();
        let mut nap = Duration::from_micros(5);
        loop {
            if self.completed(queue)? >= value {
                return Ok(true);
            }
            let elapsed = start.elapsed();
            if elapsed >= timeout {
                return Ok(false);
            }
            // Spin briefly (most submissions take microseconds), then sleep
            // in growing naps, never past the deadline.
            if elapsed < Duration::from_micros(50) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(nap.min(timeout - elapsed));
                nap = (nap * 2).min(Duration::from_micros(500));
            }
        }
    }
}

impl CudaQueue {
    /// The stream (`CUstream`) its submissions are enqueued on.
    pub fn stream(&self) -> cudarc::driver::sys::CUstream {
        self.stream.0
    }
}

impl CudaBuffer {
    /// The raw buffer's device address (`CUdeviceptr`); a buffer's own
    /// address adds its offset ([`crate::Buffer::offset`]).
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// Bytes of the raw buffer.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Binding<'_, CudaBuffer> {
    /// The buffer's device address (`CUdeviceptr`): its raw buffer's base
    /// plus its offset.
    pub fn device_ptr(&self) -> u64 {
        self.raw.ptr + self.offset
    }
}

/// A program's own work on a submission's stream (see
/// [`CudaCommands::user`]).
pub type UserWork =
    Box<dyn FnOnce(cudarc::driver::sys::CUstream) -> Result<(), DeviceError> + Send>;

/// One recorded step of a submission.
enum Step {
    /// A harness kernel.
    Kernel(Op),
    /// The program's own work.
    User(UserWork),
}

impl CudaCommands {
    /// Records the program's own work: at commit, `work` is called with the
    /// submission's stream, in recording order among this submission's
    /// steps, to enqueue whatever it likes there (kernel launches, copies,
    /// library calls) on buffers bound to the command buffer
    /// ([`crate::CommandBuffer::bind`], whose [`Binding::device_ptr`] gives
    /// their addresses). The submission's completion event is recorded after
    /// it. `work` must only enqueue: it must not synchronise the stream or
    /// free memory.
    pub fn user(
        &mut self,
        work: impl FnOnce(cudarc::driver::sys::CUstream) -> Result<(), DeviceError> + Send + 'static,
    ) {
        self.steps.push(Step::User(Box::new(work)));
    }
}
