//! One simulated queue's executor: a thread that runs submissions in order.
//!
//! Each operation is checked by the validation layer, performed on host
//! memory, and paced: its simulated cost (fixed + per KiB, with jitter) is
//! added to a running deadline and the thread sleeps whenever it is ahead of
//! the deadline. A submission's deadline starts where the previous one's
//! ended, or at its arrival if the queue was idle: as a GPU's queue runs, so
//! that the thread's own lateness (waking from a sleep) is not charged to
//! the work behind it. Completion stores the submission's checksums, drops its
//! in-flight marks, then advances the watermark and wakes waiters, in that
//! order, so that a waiter that sees the value also sees the results.
//!
//! A submission the fault injector fails runs a prefix of its operations,
//! then completes the same way with its failure stored on its outcome and on
//! the queue's failure list, both before the watermark advances: whoever sees
//! the value also sees the failure.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex as StdMutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::faults::Injector;
use super::validation::ViolationKind;
use super::{Memory, SimConfig, SimGpu};
use crate::backend::{DeviceError, Span};

/// An operand: a raw buffer's memory and the span of it an operation
/// covers (absolute: the binding's offset added).
pub(crate) struct Operand {
    pub(crate) mem: Arc<Memory>,
    pub(crate) span: Span,
}

/// A program's own operation: the memory it declared, and what it does to
/// it (see [`super::SimCommands::user`]).
pub(crate) type UserFn = Box<dyn FnOnce(&[super::SimView<'_>]) + Send>;

/// One recorded operation.
pub(crate) enum Op {
    Fill {
        dst: Operand,
        pattern: u32,
    },
    Copy {
        src: Operand,
        dst: Operand,
    },
    Add {
        a: Operand,
        b: Operand,
        out: Operand,
    },
    Checksum {
        src: Operand,
        slot: usize,
    },
    /// A program's own operation on the spans it declared.
    User {
        operands: Vec<Operand>,
        run: UserFn,
    },
    /// Wait until another queue's timeline reaches `value` (a device-side
    /// event wait).
    Wait {
        timeline: Arc<Timeline>,
        value: u64,
    },
}

impl Op {
    /// The operands, in order.
    pub(crate) fn operands(&self) -> Vec<&Operand> {
        match self {
            Op::Fill { dst, .. } => vec![dst],
            Op::Copy { src, dst } => vec![src, dst],
            Op::Add { a, b, out } => vec![a, b, out],
            Op::Checksum { src, .. } => vec![src],
            Op::User { operands, .. } => operands.iter().collect(),
            Op::Wait { .. } => Vec::new(),
        }
    }

    /// Every buffer the operation touches.
    pub(crate) fn buffers(&self) -> Vec<&Arc<Memory>> {
        self.operands().into_iter().map(|o| &o.mem).collect()
    }

    /// Bytes of work it simulates: the span of a harness operation, the
    /// spans of a program's own.
    fn work(&self) -> u64 {
        match self {
            Op::User { operands, .. } => operands.iter().map(|o| o.span.len).sum(),
            other => other.operands().first().map_or(0, |o| o.span.len),
        }
    }
}

/// A submission on its way to the executor.
pub(crate) struct Job {
    pub(crate) value: u64,
    /// When the host submitted it: the earliest it can start.
    pub(crate) submitted: Instant,
    pub(crate) ops: Vec<Op>,
    pub(crate) touched: Vec<Arc<Memory>>,
    /// Spans of growable segments it uses, registered in flight until it
    /// completes.
    pub(crate) ranges: Vec<(Arc<Memory>, Span)>,
    pub(crate) outcome: Arc<Mutex<Outcome>>,
}

/// What a submission left: its checksums, or the error it completed with.
pub(crate) struct Outcome {
    pub(crate) sums: Vec<u64>,
    pub(crate) failure: Option<DeviceError>,
}

/// Failures kept for `take_failure`; older ones are dropped past this (each
/// submission's own outcome still reports it).
const KEPT_FAILURES: usize = 1024;

/// A queue's completed value and the condition its waiters sleep on.
pub(crate) struct Timeline {
    completed: AtomicU64,
    /// Failed submissions not yet taken, oldest first.
    failures: Mutex<VecDeque<DeviceError>>,
    lock: StdMutex<()>,
    cv: Condvar,
}

/// The handle a `SimQueue` holds.
pub(crate) struct Executor {
    timeline: Arc<Timeline>,
    tx: Mutex<Option<Sender<Job>>>,
    thread: Option<JoinHandle<()>>,
    gpu: SimGpu,
}

/// SplitMix64: a tiny seeded generator for jitter.
struct Jitter {
    state: u64,
    amount: f64,
}

impl Jitter {
    fn factor(&mut self) -> f64 {
        if self.amount <= 0.0 {
            return 1.0;
        }
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let u = (z >> 11) as f64 / (1u64 << 53) as f64;
        1.0 + self.amount * (2.0 * u - 1.0)
    }
}

/// How long a device-side wait spins before it sleeps (see the executor).
const WAIT_SPIN: Duration = Duration::from_micros(200);

/// Sleep only when this far ahead of the deadline: shorter sleeps cost more
/// than they simulate.
const MIN_SLEEP: Duration = Duration::from_micros(50);

impl Executor {
    pub(crate) fn start(id: u32, config: &SimConfig, gpu: SimGpu) -> Result<Executor, DeviceError> {
        let timeline = Arc::new(Timeline {
            completed: AtomicU64::new(0),
            failures: Mutex::new(VecDeque::new()),
            lock: StdMutex::new(()),
            cv: Condvar::new(),
        });
        let (tx, rx) = channel::<Job>();
        let tl = timeline.clone();
        let g = gpu.clone();
        let mut jitter = Jitter {
            state: config.seed ^ (u64::from(id) + 1).wrapping_mul(0xD1B5_4A32_D192_ED03),
            amount: config.jitter.clamp(0.0, 1.0),
        };
        let op_cost = config.op_cost.as_nanos() as f64;
        let ns_per_kib = config.ns_per_kib.max(0.0);
        let submit_cost = config.submit_cost.as_nanos() as f64;
        let thread = std::thread::Builder::new()
            .name(format!("inflight-sim-q{id}"))
            .spawn(move || {
                let mut busy_until = Instant::now();
                for mut job in rx {
                    if g.is_lost() {
                        continue; // a lost device completes nothing
                    }
                    let n_ops = job.ops.len();
                    let fault = g.inner.injector.submission_fault(id, job.value, n_ops);
                    let started = Instant::now();
                    let mut stalled = Duration::ZERO;
                    // A GPU starts a submission when the previous one ends
                    // or when it arrives, whichever is later. Not when this
                    // thread got round to it: its sleep past the previous
                    // deadline (timer slack, tens of µs) is the host's, and
                    // charging it to every queued submission would slow a
                    // busy queue below its simulated rate.
                    busy_until = busy_until.max(job.submitted);
                    busy_until += Duration::from_nanos((submit_cost * jitter.factor()) as u64);
                    let mut sums = Vec::new();
                    for op in std::mem::take(&mut job.ops)
                        .into_iter()
                        .take(fault.unwrap_or(n_ops))
                    {
                        if let Op::Wait { timeline, value } = &op {
                            // Idle until the other queue gets there: the
                            // wait costs no simulated work. A GPU's queue
                            // resumes as soon as the signal lands; a thread
                            // woken from a condition variable resumes tens
                            // of microseconds later, time this queue would
                            // lose to each wait. So spin a while first,
                            // yielding (a small host runs the other queue).
                            let waiting = Instant::now();
                            let spin_until = waiting + WAIT_SPIN;
                            while timeline.completed.load(Ordering::Acquire) < *value
                                && Instant::now() < spin_until
                            {
                                std::thread::yield_now();
                            }
                            while !timeline.wait(*value, Duration::from_millis(10), &g) {
                                if g.is_lost() {
                                    break;
                                }
                            }
                            let now = Instant::now();
                            stalled += now - waiting;
                            busy_until = busy_until.max(now);
                            continue;
                        }
                        let ns = op_cost + op.work() as f64 / 1024.0 * ns_per_kib;
                        run_op(&g, id, job.value, op, &mut sums);
                        busy_until += Duration::from_nanos((ns * jitter.factor()) as u64);
                        pace(busy_until, MIN_SLEEP * 4);
                    }
                    pace(busy_until, Duration::ZERO);
                    if let Some(ran) = fault {
                        let e = Injector::submission_error(id, job.value, ran, n_ops);
                        job.outcome.lock().failure = Some(e.clone());
                        g.inner
                            .injector
                            .submission_failures
                            .fetch_add(1, Ordering::Relaxed);
                        let mut f = tl.failures.lock();
                        if f.len() == KEPT_FAILURES {
                            f.pop_front();
                        }
                        f.push_back(e);
                    } else {
                        let mut r = job.outcome.lock();
                        for (slot, sum) in sums {
                            r.sums[slot] = sum;
                        }
                    }
                    for m in &job.touched {
                        m.in_flight.fetch_sub(1, Ordering::AcqRel);
                    }
                    for (m, span) in &job.ranges {
                        if let Some(r) = &m.range {
                            let mut r = r.lock();
                            let key = (span.offset, span.end());
                            if let Some(i) = r.in_flight.iter().position(|&s| s == key) {
                                r.in_flight.swap_remove(i);
                            }
                        }
                    }
                    let value = job.value;
                    drop(job);
                    let ran = started.elapsed().saturating_sub(stalled);
                    let ns = |d: Duration| d.as_nanos() as u64;
                    g.inner.busy_ns.fetch_add(ns(ran), Ordering::Relaxed);
                    g.inner.stalled_ns.fetch_add(ns(stalled), Ordering::Relaxed);
                    let _g = tl.lock.lock().unwrap_or_else(|e| e.into_inner());
                    tl.completed.fetch_max(value, Ordering::Release);
                    tl.cv.notify_all();
                }
            })
            .map_err(|e| DeviceError::Other(format!("cannot start a simulated queue: {e}")))?;
        Ok(Executor {
            timeline,
            tx: Mutex::new(Some(tx)),
            thread: Some(thread),
            gpu,
        })
    }

    pub(crate) fn send(&self, job: Job) -> Result<(), DeviceError> {
        match self.tx.lock().as_ref() {
            Some(tx) => tx
                .send(job)
                .map_err(|_| DeviceError::Lost("simulated queue stopped".into())),
            None => Err(DeviceError::Lost("simulated queue stopped".into())),
        }
    }

    pub(crate) fn completed(&self) -> u64 {
        self.timeline.completed.load(Ordering::Acquire)
    }

    pub(crate) fn take_failure(&self) -> Option<DeviceError> {
        self.timeline.failures.lock().pop_front()
    }

    pub(crate) fn wait(&self, value: u64, timeout: Duration) -> bool {
        self.timeline.wait(value, timeout, &self.gpu)
    }

    /// The queue's timeline, for other queues' device-side waits.
    pub(crate) fn timeline(&self) -> Arc<Timeline> {
        self.timeline.clone()
    }
}

impl Timeline {
    /// Blocks until the completed value reaches `value` or `timeout` passes
    /// or the device is lost; returns whether the value was reached.
    pub(crate) fn wait(&self, value: u64, timeout: Duration, gpu: &SimGpu) -> bool {
        let deadline = Instant::now() + timeout.min(Duration::from_secs(365 * 24 * 3600));
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.completed.load(Ordering::Acquire) >= value {
                return true;
            }
            let now = Instant::now();
            if now >= deadline || gpu.is_lost() {
                return false;
            }
            // Wake now and then to notice a lost device.
            let slice = (deadline - now).min(Duration::from_millis(10));
            g = self
                .cv
                .wait_timeout(g, slice)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        // Closing the channel lets the thread finish queued work and exit.
        self.tx.lock().take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sleeps until `deadline` if it is more than `slack` away.
fn pace(deadline: Instant, slack: Duration) {
    let now = Instant::now();
    if deadline > now + slack.max(MIN_SLEEP) {
        std::thread::sleep(deadline - now);
    }
}

/// Validates and performs one operation.
fn run_op(gpu: &SimGpu, queue: u32, value: u64, op: Op, sums: &mut Vec<(usize, u64)>) {
    let v = &gpu.inner.validation;
    let mut ok = true;
    for o in op.operands() {
        let unmapped = o
            .mem
            .range
            .as_ref()
            .is_some_and(|r| !r.lock().covers(o.span.offset, o.span.len));
        if unmapped {
            v.report(
                ViolationKind::UseOfUnmapped,
                o.mem.generation,
                queue,
                value,
                v.now(),
            );
            ok = false;
        }
    }
    for m in op.buffers() {
        if m.released.load(Ordering::Acquire) {
            let at = Duration::from_nanos(m.released_at_ns.load(Ordering::Acquire));
            v.report(
                ViolationKind::UseAfterRelease,
                m.generation,
                queue,
                value,
                at,
            );
            ok = false;
        }
    }
    let accounting = gpu.inner.config.backing == super::Backing::Accounting;
    if !ok || (accounting && !matches!(op, Op::User { .. })) {
        if let Op::Checksum { slot, .. } = op {
            sums.push((slot, 0));
        }
        return;
    }
    let at = |s: Span| ((s.offset / 4) as usize, s.words() as usize);
    // Reads a span into a scratch vector (None if released meanwhile), so
    // that no two buffer locks are ever held at once.
    let read = |o: &Operand| {
        let (start, len) = at(o.span);
        o.mem.data.lock().as_ref().map(|d| d.read(start, len))
    };
    let write = |o: &Operand, src: &[u32]| {
        if let Some(d) = o.mem.data.lock().as_mut() {
            d.write(at(o.span).0, src);
        }
    };
    match op {
        Op::Fill { dst, pattern } => {
            if let Some(d) = dst.mem.data.lock().as_mut() {
                let (start, len) = at(dst.span);
                d.fill(start, len, pattern);
            }
        }
        Op::Copy { src, dst } => {
            if let Some(tmp) = read(&src) {
                write(&dst, &tmp);
            }
        }
        Op::Add { a, b, out } => {
            if let (Some(mut x), Some(y)) = (read(&a), read(&b)) {
                for (x, y) in x.iter_mut().zip(&y) {
                    *x = x.wrapping_add(*y);
                }
                write(&out, &x);
            }
        }
        Op::Checksum { src, slot } => {
            let (start, len) = at(src.span);
            let sum = src
                .mem
                .data
                .lock()
                .as_ref()
                .map_or(0, |d| d.checksum(start, len));
            sums.push((slot, sum));
        }
        Op::User { operands, run } => {
            let views: Vec<super::SimView<'_>> = operands
                .iter()
                .map(|o| super::SimView {
                    mem: &o.mem,
                    span: o.span,
                })
                .collect();
            run(&views);
        }
        Op::Wait { .. } => unreachable!("the executor loop handles waits"),
    }
}
