//! Model checking of the allocator's shared state with loom: every
//! interleaving (up to `LOOM_MAX_PREEMPTIONS` preemptions) of user threads
//! freeing, allocating, trimming, clearing and changing limits against a
//! "GPU" thread whose completion signal advances a queue's watermark.
//!
//! Run with `scripts/loom.sh` (`RUSTFLAGS="--cfg inflight_loom"`); under that
//! cfg the core's mutexes and atomics are loom's (`src/sync.rs`).
//!
//! The model backend, [`LoomGpu`], keeps books with loom primitives and
//! checks, on every call, what a validation layer would:
//!
//! - **I1**: a raw buffer is released only once every submission that used
//!   it has completed;
//! - **I2**: a submission uses a buffer that an earlier owner's submission
//!   also used only once that one completed (its queues do not order memory,
//!   so no in-order reuse is allowed);
//! - **I3**: after the device drains and the cache is cleared, the
//!   statistics balance, nothing is cached and every raw buffer was
//!   released.

#![cfg(inflight_loom)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use inflight::backend::{Backend, Binding, DeviceError, DeviceInfo, Harness, Span};
use inflight::{Allocator, Buffer, Config, Limits};
use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::Mutex;

const QUEUES: usize = 2;

/// Runs `f` under loom and prints how many interleavings it explored.
fn model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r = runs.clone();
    loom::model(move || {
        r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        f();
    });
    println!(
        "loom: {name}: {} interleavings explored",
        runs.load(std::sync::atomic::Ordering::Relaxed)
    );
}
const KB4: u64 = 4096;

#[derive(Clone)]
struct LoomGpu {
    inner: Arc<Inner>,
}

struct Inner {
    capacity: u64,
    submitted: [AtomicU64; QUEUES],
    completed: [AtomicU64; QUEUES],
    next_queue: std::sync::atomic::AtomicU32,
    books: Mutex<Books>,
}

/// A raw buffer's books: size, owner epoch, uses (queue, value, owner).
/// A raw buffer's size, the owner epochs of its byte ranges (start, end,
/// epoch), and its uses not known complete (queue, value, owner, start, end).
type RawBooks = (u64, Vec<(u64, u64, u64)>, Vec<(usize, u64, u64, u64, u64)>);

#[derive(Default)]
struct Books {
    next_id: u64,
    next_owner: u64,
    bytes: u64,
    /// Live raw buffers: id → (size, owner epoch, uses (queue, value, owner)).
    live: HashMap<u64, RawBooks>,
    violations: Vec<String>,
}

struct Raw {
    id: u64,
}
struct Q {
    id: usize,
}
struct Cmds {
    /// (raw id, start, end) of each use.
    uses: Vec<(u64, u64, u64)>,
}

impl LoomGpu {
    fn new(capacity: u64) -> Self {
        LoomGpu {
            inner: Arc::new(Inner {
                capacity,
                submitted: [AtomicU64::new(0), AtomicU64::new(0)],
                completed: [AtomicU64::new(0), AtomicU64::new(0)],
                next_queue: std::sync::atomic::AtomicU32::new(0),
                books: Mutex::new(Books::default()),
            }),
        }
    }

    /// The GPU: once submission `value` on `queue` exists, completes it.
    fn complete(&self, queue: usize, value: u64) {
        while self.inner.submitted[queue].load(Ordering::Acquire) < value {
            loom::thread::yield_now();
        }
        self.inner.completed[queue].fetch_max(value, Ordering::Release);
    }

    fn complete_all(&self) {
        for q in 0..QUEUES {
            let s = self.inner.submitted[q].load(Ordering::Acquire);
            self.inner.completed[q].fetch_max(s, Ordering::Release);
        }
    }

    /// A new owner took `raw` from the allocator.
    /// The bytes of `b`'s block belong to a new owner from now on.
    fn new_owner(&self, b: &Buffer<LoomGpu>) {
        let (start, end) = (b.offset(), b.offset() + b.capacity());
        let mut books = self.inner.books.lock().unwrap();
        books.next_owner += 1;
        let epoch = books.next_owner;
        if let Some(r) = books.live.get_mut(&b.raw().id) {
            r.1.retain(|&(a, z, _)| z <= start || end <= a);
            r.1.push((start, end, epoch));
        }
    }

    fn done(&self, q: usize, v: u64) -> bool {
        self.inner.completed[q].load(Ordering::Acquire) >= v
    }

    /// Asserts I1 and I2 held and every raw buffer was released (I3).
    fn assert_clean(&self) {
        let b = self.inner.books.lock().unwrap();
        assert!(b.violations.is_empty(), "{:?}", b.violations);
        assert!(
            b.live.is_empty(),
            "raw buffers never released: {}",
            b.live.len()
        );
    }
}

impl Backend for LoomGpu {
    type Buffer = Raw;
    type Queue = Q;
    type Commands = Cmds;
    type Submission = usize;

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            backend: "loom",
            name: "loom model device".into(),
            memory_capacity: self.inner.capacity,
            max_buffer_size: self.inner.capacity,
            max_op_span: self.inner.capacity,
        }
    }

    fn allocate(&self, bytes: u64) -> Result<Raw, DeviceError> {
        let mut b = self.inner.books.lock().unwrap();
        if b.bytes + bytes > self.inner.capacity {
            return Err(DeviceError::OutOfMemory);
        }
        b.bytes += bytes;
        b.next_id += 1;
        let id = b.next_id;
        b.live.insert(id, (bytes, Vec::new(), Vec::new()));
        Ok(Raw { id })
    }

    unsafe fn release(&self, raw: Raw) {
        let mut b = self.inner.books.lock().unwrap();
        let Some((size, _, uses)) = b.live.remove(&raw.id) else {
            b.violations
                .push(format!("buffer {} released twice", raw.id));
            return;
        };
        b.bytes -= size;
        for (q, v, _, _, _) in uses {
            if !self.done(q, v) {
                b.violations
                    .push(format!("I1: buffer {} released while {q}:{v} runs", raw.id));
            }
        }
    }

    fn create_queue(&self) -> Result<Q, DeviceError> {
        let id = self
            .inner
            .next_queue
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!((id as usize) < QUEUES);
        Ok(Q { id: id as usize })
    }

    fn orders_memory(&self, _: &Q) -> bool {
        false
    }

    fn begin(&self, _: &Q) -> Result<Cmds, DeviceError> {
        Ok(Cmds { uses: Vec::new() })
    }

    fn zero(&self, c: &mut Cmds, dst: Binding<'_, Raw>, span: Span) -> Result<(), DeviceError> {
        Harness::fill(self, c, dst, span, 0)
    }

    fn submit(&self, q: &Q, cmds: Cmds, value: u64) -> Result<usize, DeviceError> {
        let mut guard = self.inner.books.lock().unwrap();
        let b = &mut *guard;
        for (id, start, end) in cmds.uses {
            let Some((_, owners, uses)) = b.live.get_mut(&id) else {
                b.violations
                    .push(format!("{}:{value} uses released buffer {id}", q.id));
                continue;
            };
            let owner = owners
                .iter()
                .find(|&&(a, z, _)| a <= start && start < z)
                .map_or(0, |&(_, _, e)| e);
            for &(uq, uv, uo, us, ue) in uses.iter() {
                if us < end && start < ue && uo != owner && !self.done(uq, uv) {
                    b.violations.push(format!(
                        "I2: {}:{value} reuses bytes of buffer {id} while {uq}:{uv} of their previous owner runs",
                        q.id
                    ));
                }
            }
            uses.push((q.id, value, owner, start, end));
        }
        self.inner.submitted[q.id].store(value, Ordering::Release);
        Ok(0)
    }

    fn completed(&self, q: &Q) -> Result<u64, DeviceError> {
        Ok(self.inner.completed[q.id].load(Ordering::Acquire))
    }

    fn wait(&self, q: &Q, value: u64, timeout: Duration) -> Result<bool, DeviceError> {
        // Every model's GPU thread completes all it is given: spin (loom
        // schedules the others) rather than model time.
        while !self.done(q.id, value) {
            if timeout.is_zero() {
                return Ok(false);
            }
            loom::thread::yield_now();
        }
        Ok(true)
    }
}

/// The absolute byte range an operation on `span` of `b` uses.
fn range(b: Binding<'_, Raw>, span: Span) -> (u64, u64, u64) {
    let abs = b.absolute(span);
    (b.raw.id, abs.offset, abs.end())
}

impl Harness for LoomGpu {
    fn fill(&self, c: &mut Cmds, d: Binding<'_, Raw>, s: Span, _: u32) -> Result<(), DeviceError> {
        c.uses.push(range(d, s));
        Ok(())
    }

    fn copy(
        &self,
        c: &mut Cmds,
        a: Binding<'_, Raw>,
        d: Binding<'_, Raw>,
        s: Span,
    ) -> Result<(), DeviceError> {
        c.uses.extend([range(a, s), range(d, s)]);
        Ok(())
    }

    fn add(
        &self,
        c: &mut Cmds,
        a: Binding<'_, Raw>,
        b: Binding<'_, Raw>,
        o: Binding<'_, Raw>,
        s: Span,
    ) -> Result<(), DeviceError> {
        c.uses.extend([range(a, s), range(b, s), range(o, s)]);
        Ok(())
    }

    fn checksum(&self, c: &mut Cmds, a: Binding<'_, Raw>, s: Span) -> Result<usize, DeviceError> {
        c.uses.push(range(a, s));
        Ok(0)
    }

    fn slots(&self, _: &usize) -> usize {
        0
    }

    fn results(&self, _: &usize) -> Result<Vec<u64>, DeviceError> {
        Ok(Vec::new())
    }
}

fn alloc_over(gpu: &LoomGpu, limits: Limits) -> Allocator<LoomGpu> {
    Allocator::new(
        gpu.clone(),
        Config::default()
            .with_memory_limit(limits.memory)
            .with_cache_limit(limits.cache)
            .with_gc_limit(limits.gc)
            .with_pressure_timeout(Duration::from_secs(60)),
    )
    .unwrap()
}

fn malloc(
    gpu: &LoomGpu,
    a: &Allocator<LoomGpu>,
    size: u64,
    q: &inflight::Queue<LoomGpu>,
) -> Buffer<LoomGpu> {
    let b = a.malloc(size, q).unwrap();
    gpu.new_owner(&b);
    b
}

/// Binds `b` into one submission on `q`; returns its value.
fn use_on(q: &inflight::Queue<LoomGpu>, b: &Buffer<LoomGpu>) -> u64 {
    let mut cb = q.command_buffer().unwrap();
    cb.fill(b, 1).unwrap();
    cb.commit().unwrap().value()
}

/// Drains the device, clears the cache, and checks I1–I3.
fn finish(gpu: &LoomGpu, a: Allocator<LoomGpu>) {
    gpu.complete_all();
    let s = a.stats();
    assert!(s.balanced(), "{s:?}");
    a.clear_cache();
    let s = a.stats();
    assert!(s.balanced(), "{s:?}");
    assert_eq!(
        (s.ready_count, s.pending_count, s.active_count),
        (0, 0, 0),
        "{s:?}"
    );
    assert_eq!(s.device_allocations, s.device_releases, "{s:?}");
    drop(a);
    gpu.assert_clean();
}

const ROOMY: Limits = Limits {
    memory: 1 << 20,
    cache: 1 << 20,
    gc: 1 << 20,
};

/// A free on a user thread races the completion signal: the block goes to
/// the ready or the pending list, and a following malloc may reuse it only
/// once the work completed (the queue does not order memory).
#[test]
fn free_races_the_completion_signal() {
    model("free_races_the_completion_signal", || {
        let gpu = LoomGpu::new(1 << 20);
        let a = alloc_over(&gpu, ROOMY);
        let q = a.create_queue().unwrap();
        let b = malloc(&gpu, &a, KB4, &q);
        let v = use_on(&q, &b);
        let g = gpu.clone();
        let signal = loom::thread::spawn(move || g.complete(0, v));
        drop(b);
        let again = malloc(&gpu, &a, KB4, &q);
        use_on(&q, &again);
        drop(again);
        signal.join().unwrap();
        drop(q);
        finish(&gpu, a);
    });
}

/// Two user threads free and allocate on two queues while the GPU completes
/// the first queue's work.
#[test]
fn frees_from_two_threads_and_a_completion() {
    model("frees_from_two_threads_and_a_completion", || {
        let gpu = LoomGpu::new(1 << 20);
        let a = alloc_over(&gpu, ROOMY);
        let q0 = a.create_queue().unwrap();
        let q1 = a.create_queue().unwrap();
        let b0 = malloc(&gpu, &a, KB4, &q0);
        let b1 = malloc(&gpu, &a, KB4, &q1);
        let v0 = use_on(&q0, &b0);
        let g = gpu.clone();
        let signal = loom::thread::spawn(move || g.complete(0, v0));
        let (a2, g2) = (a.clone(), gpu.clone());
        let user = loom::thread::spawn(move || {
            drop(b0);
            let c = a2.malloc(KB4, &q1).unwrap();
            g2.new_owner(&c);
            use_on(&q1, &c);
        });
        drop(b1);
        signal.join().unwrap();
        user.join().unwrap();
        finish(&gpu, a);
    });
}

/// Under memory pressure a malloc trims the ready block, then waits for the
/// pending one's stamp, which the GPU thread completes; it then reuses or
/// releases it, never while in flight.
#[test]
fn malloc_trims_then_waits_for_in_flight_work() {
    model("malloc_trims_then_waits_for_in_flight_work", || {
        let gpu = LoomGpu::new(1 << 20);
        let lim = Limits {
            memory: 2 * KB4,
            cache: 2 * KB4,
            gc: 2 * KB4,
        };
        let a = alloc_over(&gpu, lim);
        let q = a.create_queue().unwrap();
        let busy = malloc(&gpu, &a, KB4, &q);
        let v = use_on(&q, &busy);
        drop(busy); // pending
        drop(malloc(&gpu, &a, KB4, &q)); // ready
        let g = gpu.clone();
        let signal = loom::thread::spawn(move || g.complete(0, v));
        let big = malloc(&gpu, &a, 2 * KB4, &q);
        assert!(a.stats().reserved_bytes <= 2 * KB4);
        drop(big);
        signal.join().unwrap();
        drop(q);
        finish(&gpu, a);
    });
}

/// Two misses race for room under the memory limit. One must trim the ready
/// list to fit; it releases the trimmed blocks without the state lock, and
/// the other miss runs meanwhile. The room it made is its own: the bytes it
/// asks for are claimed before the lock is let go, so reserved bytes never
/// pass the limit. (12 KiB and 4 KiB cannot both fit under 12 KiB: one of
/// the two fails, whichever comes second.)
#[test]
fn trimmed_room_is_claimed_before_the_release() {
    model("trimmed_room_is_claimed_before_the_release", || {
        let gpu = LoomGpu::new(1 << 20);
        let lim = Limits {
            memory: 3 * KB4,
            cache: 3 * KB4,
            gc: 3 * KB4,
        };
        let a = alloc_over(&gpu, lim);
        let q = a.create_queue().unwrap();
        let (x, y) = (malloc(&gpu, &a, KB4, &q), malloc(&gpu, &a, KB4, &q));
        drop((x, y)); // never bound: both ready, 8 KiB reserved
        let (a2, g2) = (a.clone(), gpu.clone());
        let q2 = a.create_queue().unwrap();
        let small = loom::thread::spawn(move || {
            let b = a2.malloc(KB4, &q2).ok();
            if let Some(b) = &b {
                g2.new_owner(b);
            }
            (b, q2) // kept live until both have run
        });
        let big = a.malloc(3 * KB4, &q).ok();
        let (small, q2) = small.join().unwrap();
        let s = a.stats();
        assert!(
            s.peak_reserved_bytes <= 3 * KB4,
            "reserved passed the memory limit: {s:?}"
        );
        assert!(small.is_none() || big.is_none(), "both fit: {s:?}");
        drop((small, big, q, q2));
        finish(&gpu, a);
    });
}

/// clear_cache and a limit change on one thread, a free on another, the
/// completion signal on a third.
#[test]
fn clear_cache_and_limit_changes_race_frees_and_completion() {
    model(
        "clear_cache_and_limit_changes_race_frees_and_completion",
        || {
            let gpu = LoomGpu::new(1 << 20);
            let a = alloc_over(&gpu, ROOMY);
            let q = a.create_queue().unwrap();
            let busy = malloc(&gpu, &a, KB4, &q);
            let idle = malloc(&gpu, &a, KB4, &q);
            let v = use_on(&q, &busy);
            let g = gpu.clone();
            let signal = loom::thread::spawn(move || g.complete(0, v));
            let a2 = a.clone();
            let user = loom::thread::spawn(move || {
                drop(busy);
                a2.clear_cache();
            });
            a.set_cache_limit(0).unwrap();
            drop(idle);
            signal.join().unwrap();
            user.join().unwrap();
            drop(q);
            finish(&gpu, a);
        },
    );
}

/// The models can fail: under the `Immediate` policy (the MLX defect) a
/// free releases a block whose work is still in flight, and loom finds the
/// interleaving where the release comes before the completion signal.
#[test]
#[should_panic(expected = "I1")]
fn the_immediate_policy_is_caught() {
    model("the_immediate_policy_is_caught", || {
        let gpu = LoomGpu::new(1 << 20);
        // SAFETY: `Policy::immediate`'s contract: releasing in flight is the
        // defect this model exists to catch, on a model device.
        let policy = unsafe { inflight::Policy::immediate() };
        let a = Allocator::new(
            gpu.clone(),
            Config::default().with_cache_limit(0).with_policy(policy),
        )
        .unwrap();
        let q = a.create_queue().unwrap();
        let b = malloc(&gpu, &a, KB4, &q);
        let v = use_on(&q, &b);
        let g = gpu.clone();
        let signal = loom::thread::spawn(move || g.complete(0, v));
        drop(b);
        signal.join().unwrap();
        drop(q);
        finish(&gpu, a);
    });
}

/// The last `Allocator` handle goes while another thread frees a buffer
/// and this one frees another: whichever drop is last tears the allocator
/// down, once, after every free (rule K1: a live buffer's home slot keeps
/// the allocator alive), and every raw buffer is released.
#[test]
fn the_last_buffer_and_the_last_allocator_handle_race() {
    model("the_last_buffer_and_the_last_allocator_handle_race", || {
        let gpu = LoomGpu::new(1 << 20);
        let a = alloc_over(&gpu, ROOMY);
        let q = a.create_queue().unwrap();
        let b = malloc(&gpu, &a, KB4, &q);
        let c = malloc(&gpu, &a, 2 * KB4, &q);
        drop(q);
        let user = loom::thread::spawn(move || drop(b));
        drop(a);
        drop(c);
        user.join().unwrap();
        gpu.assert_clean();
    });
}
