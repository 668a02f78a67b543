//! The simulated GPU: the default backend, in plain Rust, needing nothing
//! installed.
//!
//! - **Buffers** are real host memory, zeroed, backed lazily in 64 KiB chunks
//!   as the OS backs a fresh mapping (a 16 MiB buffer whose kernels touch
//!   4 KiB costs 64 KiB of host memory), or, in [`Backing::Accounting`], no memory at all: sizes are
//!   accounted and operations validated but not performed (for replaying
//!   traces that peak at many GiB).
//! - **Queues** each have an executor thread that runs submissions in order.
//!   Each operation takes simulated time, a fixed cost plus a cost per KiB of
//!   its span, with seeded jitter, spread across the submission, so that work
//!   really is in flight while the host goes on and operations of different
//!   queues interleave.
//! - **Validation** ([`validation`]): every raw buffer has a generation; a
//!   release while in use, and a use after release, are violations.
//!
//! - **Faults** ([`faults`]): refused allocations, submissions that complete
//!   with an error, and a lost device, injected at configured rates from a
//!   seed; off by default.
//!
//! Queues order memory by default (one executor runs a queue's work in
//! order); [`SimConfig::in_order_memory`] turns that off to model Metal's
//! untracked hazards, where reuse must wait for completion.

mod executor;
pub mod faults;
mod pages;
pub mod validation;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use self::executor::{Executor, Job, Op, Operand, Outcome};
use self::faults::{Faults, Injected, Injector};
use self::pages::Pages;
use self::validation::{Validation, ValidationMode, Violation, ViolationKind};
use crate::backend::{Backend, Binding, DeviceError, DeviceInfo, Harness, Span};

/// How simulated buffers are backed.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Backing {
    /// Real host memory: operations compute and checksums are real.
    #[default]
    Host,
    /// No memory: sizes are accounted and uses validated; operations do
    /// nothing and checksums read 0.
    Accounting,
}

/// Settings of the simulated GPU.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The device's name.
    pub name: String,
    /// Device memory, in bytes.
    pub memory_capacity: u64,
    /// The largest buffer, in bytes.
    pub max_buffer_size: u64,
    /// Fixed time of each operation.
    pub op_cost: Duration,
    /// Time per KiB of an operation's span, in nanoseconds.
    pub ns_per_kib: f64,
    /// Fixed time of each submission (a command-buffer boundary).
    pub submit_cost: Duration,
    /// Host time of each device allocation, spent by the caller as a driver
    /// call spends it (a `cuMemAlloc` + `cuMemFree` pair takes tens of µs:
    /// docs/CUDA.md, docs/BENCHMARKS.md). Creating buffers is slow: that is
    /// why caching allocators exist. Without it, a lazily backed new buffer
    /// would be cheaper than a reused one, and a policy that caches less
    /// would look faster than one that caches more.
    pub alloc_cost: Duration,
    /// Relative jitter of every cost, 0.0 to 1.0, drawn from `seed`.
    pub jitter: f64,
    /// Seed of the jitter.
    pub seed: u64,
    /// Whether queues order memory between submissions (see the module doc).
    pub in_order_memory: bool,
    /// What the validation layer does on a violation.
    pub validation: ValidationMode,
    /// How buffers are backed.
    pub backing: Backing,
    /// Faults to inject (none by default).
    pub faults: Faults,
    /// The page granularity of growable segments (address ranges whose
    /// pages are mapped on demand, as CUDA's virtual memory management
    /// has them): 2 MiB by default, as on NVIDIA GPUs; `None` for a device
    /// without them.
    pub page_granularity: Option<u64>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            name: "inflight simulated GPU".into(),
            memory_capacity: 16 << 30,
            max_buffer_size: 4 << 30,
            op_cost: Duration::from_micros(2),
            ns_per_kib: 20.0,
            submit_cost: Duration::from_micros(20),
            alloc_cost: Duration::from_micros(20),
            jitter: 0.25,
            seed: 0,
            in_order_memory: true,
            validation: ValidationMode::Record,
            backing: Backing::Host,
            faults: Faults::default(),
            page_granularity: Some(2 << 20),
        }
    }
}

/// The simulated device. Clones share it.
#[derive(Clone)]
pub struct SimGpu {
    inner: Arc<SimShared>,
}

struct SimShared {
    config: SimConfig,
    validation: Validation,
    allocated: AtomicU64,
    next_buffer: AtomicU64,
    next_queue: AtomicU64,
    lost: AtomicBool,
    injector: Injector,
    /// Where the queues' executors spent their time, summed over queues.
    busy_ns: AtomicU64,
    stalled_ns: AtomicU64,
}

/// Where the simulated queues spent their time, summed over queues (see
/// [`SimGpu::queue_time`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueTime {
    /// Running submissions: from taking one to completing it, less its
    /// device-side waits.
    pub busy: Duration,
    /// In device-side waits for another queue (a cross-queue dependency),
    /// with nothing else this queue could run.
    pub stalled: Duration,
}

/// A raw simulated buffer: one generation of device memory.
pub struct SimBuffer {
    mem: Arc<Memory>,
}

/// Device memory of one raw buffer. Operations hold an `Arc` to it, as a
/// GPU's page tables would keep the address mapped; `released` is what the
/// validation layer checks.
pub(crate) struct Memory {
    pub(crate) generation: u64,
    pub(crate) size: u64,
    pub(crate) data: Mutex<Option<Pages>>,
    pub(crate) released: AtomicBool,
    pub(crate) released_at_ns: AtomicU64,
    /// Submitted, incomplete submissions that recorded a use.
    pub(crate) in_flight: AtomicU64,
    /// (queue << 48) | value of the last submission that recorded a use.
    pub(crate) last_use: AtomicU64,
    /// A growable segment's pages and the spans its work in flight uses;
    /// `None` for a plain buffer.
    pub(crate) range: Option<Mutex<RangeState>>,
}

/// The mapped pages of a reserved range, and the spans submitted work not
/// yet complete uses (what the validation layer checks unmapping against).
pub(crate) struct RangeState {
    page: u64,
    mapped: Vec<bool>,
    pub(crate) in_flight: Vec<(u64, u64)>,
}

impl RangeState {
    fn pages(&self, offset: u64, bytes: u64) -> std::ops::Range<usize> {
        (offset / self.page) as usize..(offset + bytes).div_ceil(self.page) as usize
    }

    /// Whether every page under `[offset, offset + bytes)` is mapped.
    pub(crate) fn covers(&self, offset: u64, bytes: u64) -> bool {
        self.pages(offset, bytes)
            .all(|p| self.mapped.get(p) == Some(&true))
    }
}

/// A simulated queue: an executor thread and its timeline.
pub struct SimQueue {
    id: u32,
    exec: Executor,
}

/// Work being recorded for one simulated submission.
pub struct SimCommands {
    ops: Vec<Op>,
    checksums: usize,
}

/// A submitted simulated submission.
pub struct SimSubmission {
    outcome: Arc<Mutex<Outcome>>,
}

impl SimGpu {
    /// A simulated device with the given settings.
    pub fn new(config: SimConfig) -> Self {
        SimGpu {
            inner: Arc::new(SimShared {
                validation: Validation::new(config.validation),
                injector: Injector::new(config.faults.clone()),
                config,
                allocated: AtomicU64::new(0),
                next_buffer: AtomicU64::new(1),
                next_queue: AtomicU64::new(0),
                lost: AtomicBool::new(false),
                busy_ns: AtomicU64::new(0),
                stalled_ns: AtomicU64::new(0),
            }),
        }
    }

    /// Where the queues' executors have spent their time so far, summed
    /// over queues; the rest of each queue's life it was idle, waiting for
    /// work. A GPU-bound run shows busy near the queues' wall time; one
    /// whose queues wait on each other shows it as stalled.
    pub fn queue_time(&self) -> QueueTime {
        let d = |a: &AtomicU64| Duration::from_nanos(a.load(Ordering::Relaxed));
        QueueTime {
            busy: d(&self.inner.busy_ns),
            stalled: d(&self.inner.stalled_ns),
        }
    }

    /// The settings it was created with.
    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    /// Violations the validation layer has seen.
    pub fn violations(&self) -> u64 {
        self.inner.validation.count()
    }

    /// The first violations, in full (at most [`validation::KEPT_VIOLATIONS`]).
    pub fn violation_log(&self) -> Vec<Violation> {
        self.inner.validation.kept()
    }

    /// Bytes of raw buffers currently allocated.
    pub fn allocated_bytes(&self) -> u64 {
        self.inner.allocated.load(Ordering::Relaxed)
    }

    /// Marks the device lost: queues stop, and every call reports it.
    pub fn lose_device(&self) {
        self.inner.lost.store(true, Ordering::Release);
    }

    /// What has been injected so far (see [`faults`]).
    pub fn injected(&self) -> Injected {
        let i = &self.inner.injector;
        Injected {
            alloc_failures: i.alloc_failures.load(Ordering::Relaxed),
            submission_failures: i.submission_failures.load(Ordering::Relaxed),
            device_lost: self.is_lost(),
        }
    }

    /// Whether the device is lost, losing it first if its configured time
    /// has come.
    pub(crate) fn is_lost(&self) -> bool {
        if self.inner.lost.load(Ordering::Acquire) {
            return true;
        }
        let due = self.inner.config.faults.lose_after;
        if due.is_some_and(|at| self.inner.validation.now() >= at) {
            self.lose_device();
            return true;
        }
        false
    }

    fn check_lost(&self) -> Result<(), DeviceError> {
        if self.is_lost() {
            Err(DeviceError::Lost("the simulated device was lost".into()))
        } else {
            Ok(())
        }
    }
}

impl Backend for SimGpu {
    type Buffer = SimBuffer;
    type Queue = SimQueue;
    type Commands = SimCommands;
    type Submission = SimSubmission;

    fn info(&self) -> DeviceInfo {
        let c = &self.inner.config;
        DeviceInfo {
            backend: "sim",
            name: c.name.clone(),
            memory_capacity: c.memory_capacity,
            max_buffer_size: c.max_buffer_size,
            max_op_span: c.max_buffer_size,
        }
    }

    fn allocate(&self, bytes: u64) -> Result<SimBuffer, DeviceError> {
        self.check_lost()?;
        let c = &self.inner.config;
        if bytes == 0 || bytes % 4 != 0 || bytes > c.max_buffer_size {
            return Err(DeviceError::Unsupported(format!(
                "cannot create a buffer of {bytes} bytes"
            )));
        }
        if self.inner.injector.refuse_allocation() {
            return Err(DeviceError::OutOfMemory);
        }
        let before = self.inner.allocated.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > c.memory_capacity {
            self.inner.allocated.fetch_sub(bytes, Ordering::AcqRel);
            return Err(DeviceError::OutOfMemory);
        }
        spend(c.alloc_cost);
        Ok(self.new_buffer(bytes, None))
    }

    fn address(&self, buffer: &SimBuffer) -> u64 {
        buffer.address()
    }

    fn page_granularity(&self) -> Option<u64> {
        self.inner.config.page_granularity
    }

    fn reserve(&self, bytes: u64, _page: u64) -> Result<SimBuffer, DeviceError> {
        self.check_lost()?;
        let Some(page) = self.inner.config.page_granularity else {
            return Err(DeviceError::Unsupported(
                "this simulated device has no growable segments".into(),
            ));
        };
        if bytes == 0 || bytes % page != 0 {
            return Err(DeviceError::Unsupported(format!(
                "cannot reserve a range of {bytes} bytes (pages of {page})"
            )));
        }
        let range = RangeState {
            page,
            mapped: vec![false; (bytes / page) as usize],
            in_flight: Vec::new(),
        };
        Ok(self.new_buffer(bytes, Some(Mutex::new(range))))
    }

    fn map(&self, range: &SimBuffer, offset: u64, bytes: u64) -> Result<(), DeviceError> {
        self.check_lost()?;
        let Some(state) = &range.mem.range else {
            return Err(DeviceError::Unsupported(
                "mapping into a plain buffer".into(),
            ));
        };
        let mut r = state.lock();
        let aligned = offset % r.page == 0 && bytes % r.page == 0 && bytes > 0;
        let pages = r.pages(offset, bytes);
        if !aligned || pages.end > r.mapped.len() || r.mapped[pages.clone()].iter().any(|&m| m) {
            return Err(DeviceError::Unsupported(format!(
                "cannot map [{offset}, {}) of a range of {} bytes",
                offset + bytes,
                range.mem.size
            )));
        }
        if self.inner.injector.refuse_allocation() {
            return Err(DeviceError::OutOfMemory);
        }
        let c = &self.inner.config;
        let before = self.inner.allocated.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > c.memory_capacity {
            self.inner.allocated.fetch_sub(bytes, Ordering::AcqRel);
            return Err(DeviceError::OutOfMemory);
        }
        r.mapped[pages].fill(true);
        spend(c.alloc_cost);
        Ok(())
    }

    unsafe fn unmap(&self, range: &SimBuffer, offset: u64, bytes: u64) {
        let Some(state) = &range.mem.range else {
            return;
        };
        let mut r = state.lock();
        let pages = r.pages(offset, bytes);
        let end = offset + bytes;
        if r.in_flight.iter().any(|&(a, b)| a < end && offset < b) {
            let last = range.mem.last_use.load(Ordering::Acquire);
            self.inner.validation.report(
                ViolationKind::ReleasedInFlight,
                range.mem.generation,
                (last >> 48) as u32,
                last & ((1 << 48) - 1),
                self.inner.validation.now(),
            );
        }
        let was: u64 = r.mapped[pages.clone()].iter().filter(|&&m| m).count() as u64 * r.page;
        r.mapped[pages].fill(false);
        drop(r);
        // The memory goes back for real: a use after this reads zeros.
        if let Some(d) = range.mem.data.lock().as_mut() {
            d.clear((offset / 4) as usize, (bytes / 4) as usize);
        }
        self.inner.allocated.fetch_sub(was, Ordering::AcqRel);
    }

    unsafe fn release(&self, buffer: SimBuffer) {
        let mem = buffer.mem;
        let now = self.inner.validation.now();
        mem.released_at_ns
            .store(now.as_nanos() as u64, Ordering::Release);
        mem.released.store(true, Ordering::Release);
        if mem.in_flight.load(Ordering::Acquire) > 0 {
            let last = mem.last_use.load(Ordering::Acquire);
            self.inner.validation.report(
                ViolationKind::ReleasedInFlight,
                mem.generation,
                (last >> 48) as u32,
                last & ((1 << 48) - 1),
                now,
            );
        }
        // The memory goes back for real: a use after this sees nothing.
        *mem.data.lock() = None;
        if mem.range.is_none() {
            self.inner.allocated.fetch_sub(mem.size, Ordering::AcqRel);
        }
    }

    fn create_queue(&self) -> Result<SimQueue, DeviceError> {
        self.check_lost()?;
        let id = self.inner.next_queue.fetch_add(1, Ordering::Relaxed) as u32;
        let c = &self.inner.config;
        let exec = Executor::start(id, c, self.clone())?;
        Ok(SimQueue { id, exec })
    }

    fn orders_memory(&self, _queue: &SimQueue) -> bool {
        self.inner.config.in_order_memory
    }

    fn begin(&self, _queue: &SimQueue) -> Result<SimCommands, DeviceError> {
        self.check_lost()?;
        Ok(SimCommands {
            ops: Vec::new(),
            checksums: 0,
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
        cmds: &mut SimCommands,
        other: &SimQueue,
        value: u64,
    ) -> Result<bool, DeviceError> {
        cmds.ops.push(Op::Wait {
            timeline: other.exec.timeline(),
            value,
        });
        Ok(true)
    }

    fn submit(
        &self,
        queue: &SimQueue,
        cmds: SimCommands,
        value: u64,
    ) -> Result<SimSubmission, DeviceError> {
        self.check_lost()?;
        let outcome = Arc::new(Mutex::new(Outcome {
            sums: vec![0u64; cmds.checksums],
            failure: None,
        }));
        // Record the uses now: from here until completion, releasing any of
        // these buffers is a release in flight.
        let (touched, ranges) = touch(&cmds, (u64::from(queue.id) << 48) | value);
        let sent = queue.exec.send(Job {
            value,
            submitted: std::time::Instant::now(),
            ops: cmds.ops,
            touched,
            ranges,
            outcome: outcome.clone(),
        });
        if sent.is_ok() && self.inner.injector.count_submission() {
            self.lose_device();
        }
        sent?;
        Ok(SimSubmission { outcome })
    }

    fn completed(&self, queue: &SimQueue) -> Result<u64, DeviceError> {
        self.check_lost()?;
        Ok(queue.exec.completed())
    }

    fn wait(&self, queue: &SimQueue, value: u64, timeout: Duration) -> Result<bool, DeviceError> {
        self.check_lost()?;
        let reached = queue.exec.wait(value, timeout);
        self.check_lost()?;
        Ok(reached)
    }

    fn take_failure(&self, queue: &SimQueue) -> Option<DeviceError> {
        queue.exec.take_failure()
    }

    fn submission_failure(&self, submission: &SimSubmission) -> Option<DeviceError> {
        submission.outcome.lock().failure.clone()
    }
}

impl Harness for SimGpu {
    fn fill(
        &self,
        cmds: &mut SimCommands,
        dst: Binding<'_, SimBuffer>,
        span: Span,
        pattern: u32,
    ) -> Result<(), DeviceError> {
        let dst = operand(dst, span)?;
        cmds.ops.push(Op::Fill { dst, pattern });
        Ok(())
    }

    fn copy(
        &self,
        cmds: &mut SimCommands,
        src: Binding<'_, SimBuffer>,
        dst: Binding<'_, SimBuffer>,
        span: Span,
    ) -> Result<(), DeviceError> {
        let (src, dst) = (operand(src, span)?, operand(dst, span)?);
        cmds.ops.push(Op::Copy { src, dst });
        Ok(())
    }

    fn add(
        &self,
        cmds: &mut SimCommands,
        a: Binding<'_, SimBuffer>,
        b: Binding<'_, SimBuffer>,
        out: Binding<'_, SimBuffer>,
        span: Span,
    ) -> Result<(), DeviceError> {
        let (a, b, out) = (operand(a, span)?, operand(b, span)?, operand(out, span)?);
        cmds.ops.push(Op::Add { a, b, out });
        Ok(())
    }

    fn checksum(
        &self,
        cmds: &mut SimCommands,
        src: Binding<'_, SimBuffer>,
        span: Span,
    ) -> Result<usize, DeviceError> {
        let src = operand(src, span)?;
        let slot = cmds.checksums;
        cmds.checksums += 1;
        cmds.ops.push(Op::Checksum { src, slot });
        Ok(slot)
    }

    fn slots(&self, submission: &SimSubmission) -> usize {
        submission.outcome.lock().sums.len()
    }

    fn results(&self, submission: &SimSubmission) -> Result<Vec<u64>, DeviceError> {
        let o = submission.outcome.lock();
        match &o.failure {
            Some(e) => Err(e.clone()),
            None => Ok(o.sums.clone()),
        }
    }
}

/// `span` of a binding as an operand: checked against the binding and the
/// raw buffer, made absolute.
fn operand(b: Binding<'_, SimBuffer>, span: Span) -> Result<Operand, DeviceError> {
    b.check(span)?;
    let span = b.absolute(span);
    span.check_fits(b.raw.mem.size)?;
    Ok(Operand {
        mem: b.raw.mem.clone(),
        span,
    })
}

impl SimCommands {
    /// Records the program's own operation: `run` is called on the queue's
    /// executor, in submission order, with one [`SimView`] per binding in
    /// `buffers` (each its whole buffer, rounded down to whole words), after
    /// the validation layer has checked that none of them was released (a
    /// released one is a violation, and `run` is then not called). Under
    /// [`Backing::Accounting`] the views read zeros and writes are dropped.
    pub fn user(
        &mut self,
        buffers: &[Binding<'_, SimBuffer>],
        run: impl FnOnce(&[SimView<'_>]) + Send + 'static,
    ) -> Result<(), DeviceError> {
        let operands = buffers
            .iter()
            .map(|b| operand(*b, Span::prefix(b.len & !3)))
            .collect::<Result<Vec<_>, _>>()?;
        self.ops.push(Op::User {
            operands,
            run: Box::new(run),
        });
        Ok(())
    }

    /// Operations recorded so far.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A program's view of one buffer while its operation runs on the
/// simulated GPU (see [`SimCommands::user`]): 32-bit words.
pub struct SimView<'a> {
    pub(crate) mem: &'a Memory,
    pub(crate) span: Span,
}

impl SimView<'_> {
    /// Words in the view.
    pub fn words(&self) -> usize {
        self.span.words() as usize
    }

    /// Reads every word.
    pub fn read(&self) -> Vec<u32> {
        let start = (self.span.offset / 4) as usize;
        self.mem
            .data
            .lock()
            .as_ref()
            .map_or_else(|| vec![0; self.words()], |d| d.read(start, self.words()))
    }

    /// Writes `words` from the view's first word on (at most the view's
    /// length; the rest is ignored).
    pub fn write(&self, words: &[u32]) {
        let start = (self.span.offset / 4) as usize;
        let n = words.len().min(self.words());
        if let Some(d) = self.mem.data.lock().as_mut() {
            d.write(start, &words[..n]);
        }
    }
}

impl SimGpu {
    /// A raw buffer of `bytes`, with host memory behind it unless the
    /// device only accounts; `range` makes it a growable segment's range.
    fn new_buffer(&self, bytes: u64, range: Option<Mutex<RangeState>>) -> SimBuffer {
        let data = match self.inner.config.backing {
            Backing::Host => Some(Pages::new((bytes / 4) as usize)),
            Backing::Accounting => None,
        };
        SimBuffer {
            mem: Arc::new(Memory {
                generation: self.inner.next_buffer.fetch_add(1, Ordering::Relaxed),
                size: bytes,
                data: Mutex::new(data),
                released: AtomicBool::new(false),
                released_at_ns: AtomicU64::new(0),
                in_flight: AtomicU64::new(0),
                last_use: AtomicU64::new(0),
                range,
            }),
        }
    }

    /// Enqueues work the program records itself on `queue`'s executor,
    /// outside the allocator's timeline (as a program launches kernels on a
    /// CUDA stream it owns): it runs in order with the queue's submissions,
    /// after everything enqueued before it, and advances no watermark. The
    /// validation layer checks it like any submission: releasing a buffer
    /// it uses before it has run is a violation. For stream-ordered queues
    /// ([`crate::Allocator::adopt_queue`]).
    pub fn launch(&self, queue: &SimQueue, cmds: SimCommands) -> Result<(), DeviceError> {
        self.check_lost()?;
        let outcome = Arc::new(Mutex::new(Outcome {
            sums: vec![0u64; cmds.checksums],
            failure: None,
        }));
        let (touched, ranges) = touch(&cmds, u64::from(queue.id) << 48);
        queue.exec.send(Job {
            value: 0,
            submitted: std::time::Instant::now(),
            ops: cmds.ops,
            touched,
            ranges,
            outcome,
        })
    }
}

/// The buffers a submission touches (once each), and the spans of growable
/// segments it uses.
type Touched = (Vec<Arc<Memory>>, Vec<(Arc<Memory>, Span)>);

/// Marks every buffer `cmds` uses as in flight under `tag` (queue << 48 |
/// value), and every span of a growable segment; returns them.
fn touch(cmds: &SimCommands, tag: u64) -> Touched {
    let mut touched: Vec<&Arc<Memory>> = cmds.ops.iter().flat_map(Op::buffers).collect();
    touched.sort_unstable_by_key(|m| Arc::as_ptr(m) as usize);
    touched.dedup_by(|a, b| Arc::ptr_eq(a, b));
    let touched: Vec<Arc<Memory>> = touched.into_iter().cloned().collect();
    for m in &touched {
        m.in_flight.fetch_add(1, Ordering::AcqRel);
        m.last_use.store(tag, Ordering::Release);
    }
    let mut ranges = Vec::new();
    for op in &cmds.ops {
        for o in op.operands() {
            if let Some(r) = &o.mem.range {
                r.lock().in_flight.push((o.span.offset, o.span.end()));
                ranges.push((o.mem.clone(), o.span));
            }
        }
    }
    (touched, ranges)
}

impl SimBuffer {
    /// The raw buffer's generation id (unique per device allocation).
    pub fn generation(&self) -> u64 {
        self.mem.generation
    }

    /// A device address for the raw buffer, as a real device would give
    /// one: unique per device allocation while it lives, aligned to 1 MiB,
    /// with its bytes at `address()..address() + size` (a simulated address
    /// space: nothing is mapped there on the host).
    pub fn address(&self) -> u64 {
        (1 << 40) + (self.mem.generation << 36)
    }

    /// Bytes of the raw buffer.
    pub fn size(&self) -> u64 {
        self.mem.size
    }
}

/// Spins for `cost` on the calling thread: host time a driver call spends
/// (a sleep this short would oversleep).
fn spend(cost: Duration) {
    if cost.is_zero() {
        return;
    }
    let until = std::time::Instant::now() + cost;
    while std::time::Instant::now() < until {
        std::hint::spin_loop();
    }
}
