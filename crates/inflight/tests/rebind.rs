//! Rebinding (rule S2, `Config::rebind_unseen`): a buffer reused in order
//! on one queue and bound first on another, while its previous owner's work
//! is still in flight, takes another block instead of making anyone wait;
//! but only while nothing has seen its block. On the driven backend, which
//! has no device-side waits: a wait there is a host wait, and one that is
//! never satisfied ends in `ReuseWaitTimedOut` after the pressure timeout.
//! Then on the simulated GPU, whose checksums see what a rebound buffer's
//! work really read.

use std::time::Duration;

use inflight::backend::checksum_uniform;
use inflight::backend::manual::ManualGpu;
use inflight::backend::sim::{SimConfig, SimGpu};
use inflight::{Allocator, Buffer, Config, Error, Queue, Stats};

/// Front caches off: a free that was never bound goes straight to the
/// ready list, and in-order reuse goes through the pending list, so the
/// test decides which blocks are where.
fn config() -> Config {
    Config::default()
        .with_pressure_timeout(Duration::from_millis(50))
        .with_front_cache(false)
}

type Setup = (
    ManualGpu,
    Allocator<ManualGpu>,
    Queue<ManualGpu>,
    Queue<ManualGpu>,
);

fn setup(config: Config) -> Setup {
    let gpu = ManualGpu::new(1 << 30, true);
    let alloc = Allocator::new(gpu.clone(), config).unwrap();
    let (q0, q1) = (alloc.create_queue().unwrap(), alloc.create_queue().unwrap());
    (gpu, alloc, q0, q1)
}

fn use_on(q: &Queue<ManualGpu>, b: &Buffer<ManualGpu>) -> Result<u64, Error> {
    let mut cb = q.command_buffer()?;
    cb.fill(b, 1)?;
    Ok(cb.commit()?.value())
}

fn balanced(s: Stats) -> Stats {
    assert!(s.balanced(), "{s:?}");
    s
}

/// Frees a block in flight on `q0` (at value `v`), then reuses it in order
/// there for a new buffer, with a never-bound block of the same size made
/// ready meanwhile. Returns the reused buffer, `v`, and both block ids.
fn reused_in_order_with_a_ready_block(
    alloc: &Allocator<ManualGpu>,
    q0: &Queue<ManualGpu>,
    q1: &Queue<ManualGpu>,
) -> (Buffer<ManualGpu>, u64, u64, u64) {
    let a = alloc.malloc(4096, q0).unwrap();
    let (reused, v) = (a.block_id(), use_on(q0, &a).unwrap());
    drop(a);
    let spare = alloc.malloc(4096, q1).unwrap();
    let ready = spare.block_id();
    let b = alloc.malloc(4096, q0).unwrap();
    drop(spare); // never bound: ready at once
    assert_eq!(alloc.stats().in_order_hits, 1);
    (b, v, reused, ready)
}

#[test]
fn an_unseen_buffer_bound_on_another_queue_takes_a_ready_block() {
    let (gpu, alloc, q0, q1) = setup(config());
    let (b, _, reused, ready) = reused_in_order_with_a_ready_block(&alloc, &q0, &q1);
    // q0's work is in flight and never completes before the bind: without
    // the rebinding the host would wait for it and time out.
    let w = use_on(&q1, &b).expect("rebound: nobody waits");
    assert_eq!(b.block_id(), ready, "the ready block");
    let s = balanced(alloc.stats());
    assert_eq!(
        (s.reuse_rebinds, s.reuse_host_waits, s.reuse_device_waits),
        (1, 0, 0),
        "{s:?}"
    );
    // The reused block went back to its segment, still due at `v` (q0's
    // whole segment is in flight there); q1's segment has the rest free.
    assert_eq!((s.pending_count, s.ready_count), (1, 1), "{s:?}");
    // Fixed from now on: binding it on q0 now needs nothing either (its new
    // block has no fence), and it stays the same block.
    use_on(&q0, &b).unwrap();
    assert_eq!(b.block_id(), ready);
    drop(b);
    gpu.complete(1, w);
    gpu.complete_all();
    let again = alloc.malloc(4096, &q0).unwrap();
    assert!([reused, ready].contains(&again.block_id()));
    drop(again);
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

#[test]
fn a_seen_buffer_keeps_its_block_and_waits() {
    let (gpu, alloc, q0, q1) = setup(config());
    let (b, v, reused, _) = reused_in_order_with_a_ready_block(&alloc, &q0, &q1);
    assert_eq!(b.block_id(), reused, "seen: pinned to its block");
    match use_on(&q1, &b) {
        Err(Error::ReuseWaitTimedOut { queue: 0, value }) => assert_eq!(value, v),
        other => panic!("expected a host wait that times out, got {other:?}"),
    }
    assert_eq!(alloc.stats().reuse_rebinds, 0);
    gpu.complete(0, v);
    use_on(&q1, &b).expect("its previous owner's work is done");
    assert_eq!(b.block_id(), reused);
    drop(b);
    gpu.complete_all();
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

#[test]
fn with_rebinding_off_an_unseen_buffer_waits() {
    let config = config().with_rebind_unseen(false);
    let (gpu, alloc, q0, q1) = setup(config);
    let (b, v, _, _) = reused_in_order_with_a_ready_block(&alloc, &q0, &q1);
    assert!(matches!(
        use_on(&q1, &b),
        Err(Error::ReuseWaitTimedOut { queue: 0, .. })
    ));
    assert_eq!(alloc.stats().reuse_rebinds, 0);
    gpu.complete(0, v);
    drop(b);
    gpu.complete_all();
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

#[test]
fn without_a_ready_block_it_takes_one_in_flight_on_the_binding_queue() {
    let (gpu, alloc, q0, q1) = setup(config());
    // A block in flight on q1 alone, at value `w`.
    let x = alloc.malloc(4096, &q1).unwrap();
    let (on_q1, w) = (x.block_id(), use_on(&q1, &x).unwrap());
    drop(x);
    // A block in flight on q0, reused in order there.
    let a = alloc.malloc(4096, &q0).unwrap();
    use_on(&q0, &a).unwrap();
    drop(a);
    let b = alloc.malloc(4096, &q0).unwrap();
    let s = balanced(alloc.stats());
    // q1's segment, and the rest of q0's: in flight, each on its queue.
    assert_eq!((s.in_order_hits, s.ready_count, s.pending_count), (1, 0, 2));
    // Bound on q1: q1's own block, reused in order there, no wait.
    let mut cb = q1.command_buffer().unwrap();
    cb.fill(&b, 2).unwrap();
    assert_eq!(b.block_id(), on_q1, "the block in flight on q1");
    let t = cb.commit().unwrap().value();
    assert!(t > w);
    let s = balanced(alloc.stats());
    assert_eq!((s.reuse_rebinds, s.reuse_host_waits), (1, 0), "{s:?}");
    // Its fence moved to q1: work on q0 must now wait for q1's `w`.
    match use_on(&q0, &b) {
        Err(Error::ReuseWaitTimedOut { queue: 1, value }) => assert_eq!(value, w),
        other => panic!("expected a wait for q1's work, got {other:?}"),
    }
    gpu.complete(1, w);
    use_on(&q0, &b).expect("q1's previous work is done");
    drop(b);
    gpu.complete_all();
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

/// A simulated GPU slow enough (5 ms an operation) that work a test submits
/// is still running when the test binds the next buffer.
fn slow_sim() -> (SimGpu, Allocator<SimGpu>, Queue<SimGpu>, Queue<SimGpu>) {
    let gpu = SimGpu::new(SimConfig {
        op_cost: Duration::from_millis(5),
        jitter: 0.0,
        ..SimConfig::default()
    });
    let alloc = Allocator::new(gpu.clone(), config()).unwrap();
    let (q0, q1) = (alloc.create_queue().unwrap(), alloc.create_queue().unwrap());
    (gpu, alloc, q0, q1)
}

/// Records `fills` fills of `buf` on `q` (patterns `base + i`) and commits.
fn fill_on(q: &Queue<SimGpu>, buf: &Buffer<SimGpu>, base: u32, fills: u32) {
    let mut cb = q.command_buffer().unwrap();
    for i in 0..fills {
        cb.fill(buf, base + i).unwrap();
    }
    cb.commit().unwrap();
}

/// Binds `buf` first on `q`: fills it with `pattern`, spends 20 ms on
/// `other` (so that any work racing it on another queue lands in between),
/// checksums it, waits, and checks that the work saw only its own fill.
fn fill_and_check(q: &Queue<SimGpu>, buf: &Buffer<SimGpu>, other: &Buffer<SimGpu>, pattern: u32) {
    let mut cb = q.command_buffer().unwrap();
    cb.fill(buf, pattern).unwrap();
    for i in 0..4 {
        cb.fill(other, i).unwrap();
    }
    let slot = cb.checksum(buf).unwrap();
    let t = cb.commit().unwrap();
    assert!(t.wait(Duration::from_secs(10)).unwrap());
    assert_eq!(
        t.checksum(slot).unwrap(),
        checksum_uniform(pattern, buf.len() / 4),
        "another owner's writes reached the buffer"
    );
}

/// The end of a simulator test: one in-order reuse, rebound once with no
/// wait; then the buffers go, the work drains, and no violation was seen.
fn rebound_once_and_clean(
    gpu: &SimGpu,
    alloc: &Allocator<SimGpu>,
    q0: &Queue<SimGpu>,
    buffers: (Buffer<SimGpu>, Buffer<SimGpu>),
) {
    let s = balanced(alloc.stats());
    assert_eq!(
        (s.in_order_hits, s.reuse_rebinds, s.reuse_host_waits),
        (1, 1, 0),
        "{s:?}"
    );
    drop(buffers);
    assert!(q0.wait_idle(Duration::from_secs(10)).unwrap());
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.violation_log());
}

#[test]
fn on_the_simulator_a_buffer_rebound_to_a_ready_block_sees_only_its_own_writes() {
    let (gpu, alloc, q0, q1) = slow_sim();
    let len = 1 << 20;
    let other = alloc.malloc(len / 2, &q1).unwrap();
    let spare = alloc.malloc(len, &q1).unwrap();
    let x = alloc.malloc(len, &q0).unwrap();
    fill_on(&q0, &x, 100, 8); // 40 ms of writes on q0
    drop(x);
    let y = alloc.malloc(len, &q0).unwrap(); // in order: x's block
    drop(spare); // never bound: ready
    fill_and_check(&q1, &y, &other, 0xC0DE);
    rebound_once_and_clean(&gpu, &alloc, &q0, (y, other));
}

#[test]
fn on_the_simulator_a_buffer_rebound_in_order_on_its_new_queue_runs_after_that_queue_s_work() {
    let (gpu, alloc, q0, q1) = slow_sim();
    let len = 1 << 20;
    let other = alloc.malloc(len / 2, &q1).unwrap();
    // A block in flight on q1 alone: its fills still run when y binds it.
    let z = alloc.malloc(len, &q1).unwrap();
    fill_on(&q1, &z, 200, 8);
    drop(z);
    let x = alloc.malloc(len, &q0).unwrap();
    fill_on(&q0, &x, 100, 8);
    drop(x);
    // In order: x's block. Bound on q1, it is rebound to z's, in order
    // behind z's fills there: its fill lands after theirs, and x's fills
    // on q0 never reach it.
    let y = alloc.malloc(len, &q0).unwrap();
    fill_and_check(&q1, &y, &other, 0xBEEF);
    rebound_once_and_clean(&gpu, &alloc, &q0, (y, other));
}
