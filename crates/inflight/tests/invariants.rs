//! Each invariant on its own, on the driven backend where the test decides
//! when work completes, so that "in flight" is a fact, not a race.

use std::time::Duration;

use inflight::backend::manual::ManualGpu;
use inflight::{Allocator, Buffer, Config, Error, Policy, Queue};

fn config() -> Config {
    Config::default().with_pressure_timeout(Duration::from_millis(50))
}

fn setup(
    in_order: bool,
    config: Config,
) -> (
    ManualGpu,
    Allocator<ManualGpu>,
    Queue<ManualGpu>,
    Queue<ManualGpu>,
) {
    let gpu = ManualGpu::new(1 << 30, in_order);
    let alloc = Allocator::new(gpu.clone(), config).unwrap();
    let q0 = alloc.create_queue().unwrap();
    let q1 = alloc.create_queue().unwrap();
    (gpu, alloc, q0, q1)
}

fn malloc(
    gpu: &ManualGpu,
    alloc: &Allocator<ManualGpu>,
    size: u64,
    q: &Queue<ManualGpu>,
) -> Buffer<ManualGpu> {
    let b = alloc.malloc(size, q).unwrap();
    gpu.note_new_owner(b.raw(), b.offset(), b.capacity());
    b
}

/// Binds `bufs` into one submission on `q` and commits it.
fn use_on(q: &Queue<ManualGpu>, bufs: &[&Buffer<ManualGpu>]) -> u64 {
    let mut cb = q.command_buffer().unwrap();
    for b in bufs {
        cb.fill(b, 1).unwrap();
    }
    cb.commit().unwrap().value()
}

#[test]
fn i1_trim_and_clear_never_release_a_block_in_flight() {
    let (gpu, alloc, q0, _) = setup(false, config().with_cache_limit(0));
    let bufs: Vec<_> = (0..8).map(|_| malloc(&gpu, &alloc, 1 << 20, &q0)).collect();
    let segments = gpu.live_buffers();
    use_on(&q0, &bufs.iter().collect::<Vec<_>>());
    drop(bufs);
    // Cache limit 0: anything ready would be trimmed at once; these are pending.
    let s = alloc.stats();
    assert_eq!((s.pending_count, s.device_releases), (8, 0), "{s:?}");
    alloc.trim(0);
    alloc.clear_cache();
    alloc.set_cache_limit(0).unwrap();
    assert_eq!(gpu.live_buffers(), segments, "a pending block was released");
    gpu.complete(0, 1);
    let s = alloc.stats();
    assert_eq!(
        (s.pending_count, s.device_releases),
        (0, segments as u64),
        "after completion: {s:?}"
    );
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

#[test]
fn i2_pending_block_is_not_reused_by_another_queue_or_on_an_unordered_queue() {
    for in_order in [false, true] {
        let (gpu, alloc, q0, q1) = setup(in_order, config());
        let a = malloc(&gpu, &alloc, 4096, &q0);
        let first = a.block_id();
        use_on(&q0, &[&a]);
        drop(a);
        let b = malloc(&gpu, &alloc, 4096, &q1);
        assert_ne!(
            b.block_id(),
            first,
            "reused on another queue in flight (in_order {in_order})"
        );
        let c = malloc(&gpu, &alloc, 4096, &q0);
        assert_eq!(
            c.block_id() == first,
            in_order,
            "same-queue reuse follows orders_memory"
        );
        use_on(&q0, &[&c]);
        use_on(&q1, &[&b]);
        assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
    }
}

#[test]
fn i2_in_order_reuse_bound_on_another_queue_waits_for_the_previous_owner() {
    // Regression: the first repro run showed corrupted checksums under
    // `deferred` when a block reused in order on queue 0 was bound on queue 1.
    let (gpu, alloc, q0, q1) = setup(true, config());
    let a = malloc(&gpu, &alloc, 4096, &q0);
    use_on(&q0, &[&a]);
    drop(a);
    let b = malloc(&gpu, &alloc, 4096, &q0);
    assert_eq!(alloc.stats().in_order_hits, 1);
    let mut cb = q1.command_buffer().unwrap();
    match cb.fill(&b, 2) {
        Err(Error::ReuseWaitTimedOut { queue: 0, value: 1 }) => {}
        other => panic!("expected a timed-out wait for queue 0 value 1, got {other:?}"),
    }
    // Once the previous owner's work completes, the bind goes through.
    let gpu2 = gpu.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(10));
        gpu2.complete(0, 1);
    });
    let mut cb = q1.command_buffer().unwrap();
    // The 50 ms pressure timeout may elapse first on a slow machine: retry.
    let mut bound = cb.fill(&b, 2);
    while matches!(bound, Err(Error::ReuseWaitTimedOut { .. })) {
        bound = cb.fill(&b, 2);
    }
    bound.unwrap();
    t.join().unwrap();
    cb.commit().unwrap();
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

#[test]
fn i3_statistics_balance_and_clear_after_drain_releases_everything() {
    let (gpu, alloc, q0, q1) = setup(false, config());
    let mut live = Vec::new();
    for i in 0..200u64 {
        let q = if i % 3 == 0 { &q1 } else { &q0 };
        let b = malloc(&gpu, &alloc, 1024 * (1 + i % 17), q);
        use_on(q, &[&b]);
        live.push(b);
        if i % 2 == 0 {
            live.swap_remove((i as usize * 7) % live.len());
        }
        if i % 25 == 0 {
            gpu.complete(0, i / 2);
        }
        assert!(alloc.stats().balanced(), "step {i}: {:?}", alloc.stats());
    }
    drop(live);
    gpu.complete_all();
    alloc.clear_cache();
    let s = alloc.stats();
    assert_eq!(s.reserved_bytes, 0, "{s:?}");
    assert_eq!(s.device_allocations, s.device_releases);
    assert_eq!(gpu.allocated_bytes(), 0);
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

#[test]
fn i3_pending_blocks_cleared_are_released_once_they_complete() {
    let (gpu, alloc, q0, _) = setup(false, config());
    let a = malloc(&gpu, &alloc, 1 << 16, &q0);
    use_on(&q0, &[&a]);
    drop(a);
    alloc.clear_cache();
    assert_eq!(gpu.live_buffers(), 1, "released in flight");
    gpu.complete(0, 1);
    let s = alloc.stats();
    assert_eq!(
        (s.reserved_bytes, s.ready_count, s.device_releases),
        (0, 0, 1),
        "{s:?}"
    );
}

#[test]
fn i4_ready_bytes_stay_under_the_cache_limit() {
    let (gpu, alloc, q0, _) = setup(false, config().with_cache_limit(3 << 20));
    for round in 0..20u64 {
        let bufs: Vec<_> = (0..6)
            .map(|i| malloc(&gpu, &alloc, (1 + (round + i) % 4) << 19, &q0))
            .collect();
        drop(bufs);
        let s = alloc.stats();
        assert!(s.ready_bytes <= 3 << 20, "round {round}: {s:?}");
    }
    assert!(alloc.stats().trims > 0, "the limit never bit");
}

#[test]
fn i4_pressure_trims_then_waits_then_fails_with_statistics() {
    let mb = 1 << 20;
    let (gpu, alloc, q0, _) = setup(
        false,
        config().with_memory_limit(8 * mb).with_gc_limit(8 * mb),
    );
    // Fill memory with pending blocks.
    let bufs: Vec<_> = (0..8).map(|_| malloc(&gpu, &alloc, mb, &q0)).collect();
    use_on(&q0, &bufs.iter().collect::<Vec<_>>());
    drop(bufs);
    // Nothing ready to trim, work never completes: out of memory after waiting.
    let t0 = std::time::Instant::now();
    match alloc.malloc(2 * mb, &q0) {
        Err(Error::OutOfMemory {
            requested,
            limit,
            stats,
            ..
        }) => {
            assert_eq!((requested, limit), (2 * mb, 8 * mb));
            assert_eq!(stats.pending_bytes, 8 * mb);
            assert!(stats.waits >= 1 && stats.oom_errors == 1, "{stats:?}");
        }
        other => panic!("expected out of memory, got {other:?}"),
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(50),
        "did not wait for in-flight work"
    );
    // Work that completes while the allocation waits lets it through.
    let gpu2 = gpu.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(5));
        gpu2.complete(0, 1);
    });
    let big = alloc.malloc(2 * mb, &q0);
    t.join().unwrap();
    let big = big.or_else(|_| alloc.malloc(2 * mb, &q0)).unwrap();
    assert_eq!(big.len(), 2 * mb);
    let s = alloc.stats();
    assert!(s.reserved_bytes <= 8 * mb && s.balanced(), "{s:?}");
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

#[test]
fn device_refusal_trims_and_retries_before_failing() {
    let (gpu, alloc, q0, _) = setup(false, config());
    drop(malloc(&gpu, &alloc, 1 << 20, &q0));
    assert_eq!(alloc.stats().ready_count, 1);
    gpu.fail_next_allocation();
    let b = malloc(&gpu, &alloc, 4 << 20, &q0);
    let s = alloc.stats();
    // The free small segment went back, then the device said yes.
    assert_eq!(
        (s.releasable_bytes, s.device_releases, s.oom_errors),
        (0, 1, 0),
        "{s:?}"
    );
    drop(b);
}

#[test]
fn promotion_moves_blocks_in_stamp_order_as_watermarks_pass() {
    let (gpu, alloc, q0, q1) = setup(false, config());
    let bufs: Vec<_> = (0..4).map(|_| malloc(&gpu, &alloc, 4096, &q0)).collect();
    for b in &bufs {
        use_on(&q0, &[b]); // values 1..=4
    }
    use_on(&q1, &[&bufs[3]]); // the last also on queue 1
    drop(bufs);
    assert_eq!(alloc.stats().pending_count, 4);
    for (done, ready) in [(1, 1), (3, 3), (4, 3)] {
        gpu.complete(0, done);
        let s = alloc.stats();
        assert_eq!(
            s.pending_bytes,
            (4 - ready) * 4096,
            "queue 0 at {done}: {s:?}"
        );
    }
    gpu.complete(1, 1);
    let s = alloc.stats();
    assert_eq!(
        (s.pending_bytes, s.ready_bytes),
        (0, s.reserved_bytes),
        "the two-queue block waits for both: {s:?}"
    );
}

#[test]
fn retained_policy_frees_at_completion_only() {
    let (gpu, alloc, q0, _) = setup(false, config().with_policy(Policy::RETAINED));
    let a = malloc(&gpu, &alloc, 4096, &q0);
    use_on(&q0, &[&a]);
    drop(a);
    let s = alloc.stats();
    assert_eq!((s.active_count, s.frees), (1, 0), "{s:?}");
    gpu.complete(0, 1);
    let s = alloc.stats();
    assert_eq!((s.active_count, s.frees, s.ready_count), (0, 1, 1), "{s:?}");
}

#[test]
fn immediate_policy_reproduces_both_hazards() {
    // SAFETY: `Policy::immediate` contract (1): the driven backend performs no
    // GPU work; releasing in flight only counts a violation.
    let policy = unsafe { Policy::immediate() };
    let (gpu, alloc, q0, _) = setup(false, config().with_policy(policy).with_cache_limit(0));
    let a = malloc(&gpu, &alloc, 4096, &q0);
    use_on(&q0, &[&a]);
    drop(a); // ready at once, and the cache limit 0 trims it: release in flight
    assert_eq!(gpu.violations(), 1, "release in flight went unseen");

    let (gpu, alloc, q0, q1) = setup(false, config().with_policy(policy));
    let a = malloc(&gpu, &alloc, 4096, &q0);
    use_on(&q0, &[&a]);
    drop(a);
    // Reused in flight (pools are per queue: on its own queue, which does
    // not order memory).
    let b = malloc(&gpu, &alloc, 4096, &q0);
    use_on(&q0, &[&b]);
    assert_eq!(gpu.violations(), 1, "reuse in flight went unseen");
    drop(q1);
}

#[test]
fn waiting_on_a_lost_device_is_an_error() {
    let (gpu, alloc, q0, _) = setup(false, config());
    let a = malloc(&gpu, &alloc, 4096, &q0);
    let mut cb = q0.command_buffer().unwrap();
    cb.fill(&a, 1).unwrap();
    let t = cb.commit().unwrap();
    gpu.lose_device();
    assert!(matches!(
        t.wait(Duration::from_millis(10)),
        Err(Error::DeviceLost(_))
    ));
    assert!(matches!(t.is_complete(), Err(Error::DeviceLost(_))));
    assert!(matches!(alloc.malloc(4096, &q0), Err(Error::DeviceLost(_))));
    drop(a);
    drop(t);
    // Teardown with work still in flight on a lost device leaks, never releases.
    drop(q0);
    drop(alloc);
    assert_eq!(gpu.violations(), 0);
}

#[test]
fn retained_references_do_not_keep_a_dropped_allocator_alive() {
    // Regression: under `Retained` a queue's list of held references points
    // back at the allocator; dropping every handle while a submission was in
    // flight leaked the allocator and its device memory.
    let (gpu, alloc, q0, _) = setup(false, config().with_policy(Policy::RETAINED));
    let a = malloc(&gpu, &alloc, 4096, &q0);
    use_on(&q0, &[&a]);
    drop(a);
    let gpu2 = gpu.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        gpu2.complete_all();
    });
    drop(q0);
    drop(alloc);
    t.join().unwrap();
    assert_eq!(
        gpu.live_buffers(),
        0,
        "the allocator outlived its last handle"
    );
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}
