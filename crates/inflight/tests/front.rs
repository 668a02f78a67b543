//! The per-thread front caches: what they take, what they must never take,
//! and that trimming, pressure, teardown and other threads reach them. On
//! the driven backend, where the test decides when work completes. Its
//! segments are fixed device allocations: small blocks share 2 MiB ones.

use std::sync::mpsc;
use std::time::Duration;

use inflight::backend::manual::ManualGpu;
use inflight::{Allocator, Buffer, Config, Policy, Queue, Stats};

fn setup(config: Config) -> (ManualGpu, Allocator<ManualGpu>, Queue<ManualGpu>) {
    let gpu = ManualGpu::new(1 << 30, false);
    let alloc = Allocator::new(gpu.clone(), config).unwrap();
    let q = alloc.create_queue().unwrap();
    (gpu, alloc, q)
}

fn config() -> Config {
    Config::default().with_pressure_timeout(Duration::from_millis(50))
}

fn use_on(q: &Queue<ManualGpu>, b: &Buffer<ManualGpu>) -> u64 {
    let mut cb = q.command_buffer().unwrap();
    cb.fill(b, 1).unwrap();
    cb.commit().unwrap().value()
}

fn balanced(s: Stats) -> Stats {
    assert!(s.balanced(), "{s:?}");
    s
}

#[test]
fn a_free_then_malloc_of_one_size_reuses_the_block_without_the_device() {
    let (gpu, alloc, q) = setup(config());
    let id = alloc.malloc(4096, &q).unwrap().block_id();
    for _ in 0..1000 {
        let b = alloc.malloc(4000, &q).unwrap();
        assert_eq!((b.block_id(), b.len(), b.capacity()), (id, 4000, 4096));
    }
    let s = balanced(alloc.stats());
    assert_eq!(
        (s.device_allocations, s.cache_hits, s.frees),
        (1, 1000, 1001)
    );
    // The block in the front cache, and the rest of its segment.
    assert_eq!(
        (s.ready_count, s.ready_bytes, s.active_count),
        (2, 2 << 20, 0)
    );
    assert_eq!(gpu.live_buffers(), 1);
}

#[test]
fn a_block_in_flight_never_enters_a_front_cache() {
    let (gpu, alloc, q) = setup(config());
    let b = alloc.malloc(4096, &q).unwrap();
    let id = b.block_id();
    let v = use_on(&q, &b);
    drop(b);
    let s = balanced(alloc.stats());
    assert_eq!((s.pending_count, s.deferred_frees), (1, 1), "{s:?}");
    assert_eq!(s.pending_bytes, 4096, "{s:?}");
    // The queue does not order memory: the same size must get another block.
    let c = alloc.malloc(4096, &q).unwrap();
    assert_ne!(c.block_id(), id);
    gpu.complete(0, v);
    // Completed: promoted back into its segment (by the snapshot here, or
    // by the next allocation that finds nothing free).
    let _d = alloc.malloc(4096, &q).unwrap();
    let s = balanced(alloc.stats());
    assert_eq!((s.pending_count, s.device_allocations), (0, 1), "{s:?}");
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

#[test]
fn in_order_reuse_orders_other_queues_after_the_previous_owner() {
    let gpu = ManualGpu::new(1 << 30, true);
    let alloc = Allocator::new(gpu.clone(), config()).unwrap();
    let (q0, q1) = (alloc.create_queue().unwrap(), alloc.create_queue().unwrap());
    let a = alloc.malloc(4096, &q0).unwrap();
    let id = a.block_id();
    use_on(&q0, &a);
    drop(a);
    let other = alloc.malloc(4096, &q1).unwrap();
    assert_ne!(other.block_id(), id, "not on another queue");
    let b = alloc.malloc(4096, &q0).unwrap();
    assert_eq!(b.block_id(), id, "in order on its own queue");
    assert_eq!(alloc.stats().in_order_hits, 1);
    let mut cb = q1.command_buffer().unwrap();
    assert!(
        matches!(
            cb.fill(&b, 2),
            Err(inflight::Error::ReuseWaitTimedOut { queue: 0, value: 1 })
        ),
        "a bind on another queue waits for the previous owner"
    );
    gpu.complete_all();
    drop(other);
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

#[test]
fn a_miss_files_the_slots_shells_freed_in_flight() {
    // No `stats()` until the end: a snapshot files every slot's shells.
    let gpu = ManualGpu::new(1 << 30, true);
    let alloc = Allocator::new(gpu.clone(), config()).unwrap();
    let q = alloc.create_queue().unwrap();
    let a = alloc.malloc(4096, &q).unwrap();
    let (segment, offset) = (a.block_id() >> 40, a.offset());
    let v = use_on(&q, &a);
    drop(a);
    // A miss of another size while the shell is in flight: the slot files
    // it under the lock the miss takes anyway; the arena merges it with
    // the free bytes after it (under its stamp), and the carve takes the
    // lowest address that fits, in order on the shell's own queue.
    let b = alloc.malloc(8192, &q).unwrap();
    assert_eq!((b.block_id() >> 40, b.offset()), (segment, offset));
    let s = balanced(alloc.stats());
    assert_eq!(
        (s.in_order_hits, s.cache_hits, s.device_allocations),
        (1, 1, 1),
        "an in-order carve over the filed shell: {s:?}"
    );
    gpu.complete(0, v);
    drop(b);
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

#[test]
fn a_slot_reuses_its_shell_in_flight_in_order_on_its_queue_only() {
    let gpu = ManualGpu::new(1 << 30, true);
    let alloc = Allocator::new(gpu.clone(), config()).unwrap();
    let (q0, q1) = (alloc.create_queue().unwrap(), alloc.create_queue().unwrap());
    let a = alloc.malloc(4096, &q0).unwrap();
    let id = a.block_id();
    let v = use_on(&q0, &a);
    drop(a);
    let other = alloc.malloc(4096, &q1).unwrap();
    assert_ne!(other.block_id(), id, "never on another queue");
    let b = alloc.malloc(4096, &q0).unwrap();
    assert_eq!(b.block_id(), id, "in order, from the slot");
    let s = balanced(alloc.stats());
    assert_eq!((s.in_order_hits, s.deferred_frees), (1, 1), "{s:?}");
    // Its stamp stays: freed again in flight, it waits for both uses.
    let w = use_on(&q0, &b);
    drop(b);
    gpu.complete(0, v);
    assert_eq!(balanced(alloc.stats()).pending_count, 1);
    gpu.complete(0, w);
    drop(other);
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

#[test]
fn under_immediate_a_bound_block_skips_the_front_cache() {
    // SAFETY: `Policy::immediate`'s contract (1): the driven test GPU is no
    // real driver; a release in flight there is a counted violation, not
    // undefined behaviour.
    let policy = unsafe { Policy::immediate() };
    let (gpu, alloc, q) = setup(config().with_policy(policy));
    drop(alloc.malloc(512, &q).unwrap()); // this thread's slot claims its share
    let b = alloc.malloc(4096, &q).unwrap();
    use_on(&q, &b);
    drop(b);
    // Back in its segment, which is whole again: not in a front cache.
    let s = balanced(alloc.stats());
    assert_eq!(s.releasable_bytes, s.reserved_bytes, "{s:?}");
    let c = alloc.malloc(8192, &q).unwrap();
    drop(c); // never bound: front cache
    let s = balanced(alloc.stats());
    assert_eq!((s.ready_count, s.releasable_bytes), (2, 8192), "{s:?}");
    gpu.complete_all();
}

#[test]
fn trim_clear_and_limits_reach_the_front_caches() {
    let (gpu, alloc, q) = setup(config());
    let bufs: Vec<_> = (1..=8)
        .map(|i| alloc.malloc(i * 4096, &q).unwrap())
        .collect();
    drop(bufs);
    let before = balanced(alloc.stats());
    assert_eq!(before.ready_bytes, before.reserved_bytes);
    let released = alloc.trim(6 * 4096);
    let after = balanced(alloc.stats());
    assert!(after.releasable_bytes <= 6 * 4096, "{after:?}");
    assert_eq!(released, before.reserved_bytes - after.reserved_bytes);
    alloc.set_cache_limit(4096).unwrap();
    let s = balanced(alloc.stats());
    assert!(s.releasable_bytes <= 4096, "{s:?}");
    alloc.set_cache_limit(1 << 29).unwrap();
    drop(alloc.malloc(4096, &q).unwrap());
    alloc.clear_cache();
    let s = balanced(alloc.stats());
    assert_eq!((s.reserved_bytes, s.ready_count), (0, 0), "{s:?}");
    assert_eq!(gpu.live_buffers(), 0);
}

#[test]
fn memory_pressure_takes_idle_blocks_from_front_caches() {
    let (gpu, alloc, q) = setup(
        config()
            .with_memory_limit(1 << 20)
            .with_cache_limit(1 << 20)
            .with_gc_limit(1 << 20),
    );
    // Small blocks fill a front cache, then a large one needs their room.
    let small: Vec<_> = (0..4)
        .map(|_| alloc.malloc(16 << 10, &q).unwrap())
        .collect();
    drop(small);
    let big = alloc.malloc(1 << 20, &q).unwrap();
    let s = balanced(alloc.stats());
    assert_eq!((s.oom_errors, s.reserved_bytes), (0, 1 << 20), "{s:?}");
    assert_eq!(gpu.allocated_bytes(), 1 << 20);
    drop(big);
}

#[test]
fn the_fronts_share_stays_under_the_cache_limit() {
    let cache = 1 << 20;
    let (_gpu, alloc, q) = setup(config().with_cache_limit(cache));
    for round in 0..50u64 {
        let bufs: Vec<_> = (1..=40)
            .map(|i| alloc.malloc((i * 7 + round) * 1024, &q).unwrap())
            .collect();
        drop(bufs);
        let s = balanced(alloc.stats());
        assert!(s.releasable_bytes <= cache, "round {round}: {s:?}");
    }
}

#[test]
fn a_buffer_freed_on_another_thread_is_cached_in_that_threads_slot() {
    let (gpu, alloc, q) = setup(config());
    let b = alloc.malloc(4096, &q).unwrap();
    let id = b.block_id();
    let (a, qq) = (&alloc, &q);
    let again = std::thread::scope(|s| {
        s.spawn(move || {
            drop(b); // uncounted at its home, cached here
            a.malloc(4096, qq).unwrap().block_id()
        })
        .join()
        .unwrap()
    });
    assert_eq!(again, id, "the freeing thread's slot served it");
    let s = balanced(alloc.stats());
    assert_eq!((s.frees, s.active_count), (2, 0), "{s:?}");
    // That thread is gone; a trim still reaches its slot: its block goes
    // back to its segment, whole again, which goes back to the device.
    assert_eq!(alloc.trim(0), 2 << 20);
    assert_eq!(gpu.live_buffers(), 0);
}

#[test]
fn buffers_outlive_the_allocator_on_other_threads() {
    let gpu = ManualGpu::new(1 << 30, false);
    let alloc = Allocator::new(gpu.clone(), config()).unwrap();
    let q = alloc.create_queue().unwrap();
    let bufs: Vec<_> = (0..64)
        .map(|i| alloc.malloc(4096 << (i % 4), &q).unwrap())
        .collect();
    drop(alloc.malloc(4096, &q).unwrap()); // one idle block in a front cache
    drop((alloc, q));
    assert!(gpu.live_buffers() >= 1, "buffers keep the allocator alive");
    let (tx, rx) = mpsc::channel::<Buffer<ManualGpu>>();
    let t = std::thread::spawn(move || rx.into_iter().for_each(drop));
    for (i, b) in bufs.into_iter().enumerate() {
        if i % 2 == 0 {
            tx.send(b).unwrap();
        } else {
            drop(b);
        }
    }
    drop(tx);
    t.join().unwrap();
    assert_eq!(gpu.live_buffers(), 0, "the last buffer released everything");
}

#[test]
fn many_threads_trading_buffers_lose_nothing() {
    threads_trading_buffers(config());
}

#[test]
fn many_threads_trading_buffers_lose_nothing_with_locked_slots() {
    threads_trading_buffers(config().with_biased_front_cache(false));
}

fn threads_trading_buffers(config: Config) {
    let (gpu, alloc, _) = setup(config);
    let threads = 8;
    let queues: Vec<_> = (0..threads)
        .map(|_| alloc.create_queue().unwrap())
        .collect();
    let (tx, rx) = mpsc::sync_channel::<Buffer<ManualGpu>>(64);
    let rx = std::sync::Mutex::new(rx);
    std::thread::scope(|s| {
        for (t, q) in queues.iter().enumerate() {
            let (alloc, tx, rx) = (&alloc, tx.clone(), &rx);
            s.spawn(move || {
                let mut seed = 0x9E37_79B9u64 + t as u64;
                for i in 0..5000u64 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let b = alloc.malloc(1024 + (seed % 64) * 1000, q).unwrap();
                    if i % 3 == 0 {
                        let _ = tx.try_send(b); // freed by whoever takes it
                    }
                    if let Ok(other) = rx.lock().unwrap().try_recv() {
                        drop(other);
                    }
                }
            });
        }
        drop(tx);
    });
    drop(rx);
    let s = balanced(alloc.stats());
    assert_eq!(s.active_count, 0, "{s:?}");
    assert_eq!(s.allocations, threads as u64 * 5000);
    alloc.clear_cache();
    assert_eq!(balanced(alloc.stats()).reserved_bytes, 0);
    assert_eq!(gpu.live_buffers(), 0);
}

#[test]
fn without_front_caches_the_active_peak_is_exact() {
    let (_gpu, alloc, q) = setup(config().with_front_cache(false));
    drop(alloc.malloc(1 << 20, &q).unwrap());
    let small = alloc.malloc(4096, &q).unwrap();
    let s = balanced(alloc.stats());
    assert_eq!(s.peak_active_bytes, 1 << 20, "{s:?}");
    drop(small);
    let (_gpu, alloc, q) = setup(config());
    drop(alloc.malloc(1 << 20, &q).unwrap());
    let small = alloc.malloc(4096, &q).unwrap();
    let s = balanced(alloc.stats());
    assert!(
        s.peak_active_bytes <= (1 << 20) + 4096 && s.peak_active_bytes >= 1 << 20,
        "at most the front caches' bytes over: {s:?}"
    );
    drop(small);
}

/// Binds every buffer to one submission on `q`; returns its value.
fn use_all_on(q: &Queue<ManualGpu>, bufs: &[Buffer<ManualGpu>]) -> u64 {
    let mut cb = q.command_buffer().unwrap();
    for b in bufs {
        cb.fill(b, 1).unwrap();
    }
    cb.commit().unwrap().value()
}

#[test]
fn frees_in_flight_wait_in_the_slot_as_pending_then_are_filed_and_reused() {
    let (gpu, alloc, q) = setup(config());
    // More than one batch (FRONT_DEFERRED is 32), so one is filed at a free.
    let bufs: Vec<_> = (0..40u64)
        .map(|i| alloc.malloc(4096 * (1 + i % 5), &q).unwrap())
        .collect();
    let ids: Vec<u64> = bufs.iter().map(|b| b.block_id()).collect();
    let v = use_all_on(&q, &bufs);
    drop(bufs);
    // Wherever they wait, they are pending: counted, never handed out.
    let s = balanced(alloc.stats());
    assert_eq!(
        (
            s.pending_count,
            s.pending_bytes,
            s.deferred_frees,
            s.active_count
        ),
        (40, 8 * 5 * 3 * 4096, 40, 0),
        "{s:?}"
    );
    let fresh = alloc.malloc(4096, &q).unwrap();
    assert!(!ids.contains(&fresh.block_id()), "reused in flight");
    drop(fresh);
    gpu.complete(0, v);
    // Completed: the next misses promote them, wherever they waited.
    let again: Vec<_> = (0..40u64)
        .map(|i| alloc.malloc(4096 * (1 + i % 5), &q).unwrap())
        .collect();
    let s = balanced(alloc.stats());
    assert_eq!((s.pending_count, s.device_allocations), (0, 1), "{s:?}");
    drop(again);
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

#[test]
fn memory_pressure_waits_for_blocks_freed_in_flight_on_other_threads() {
    let (gpu, alloc, q) = setup(
        config()
            .with_memory_limit(1 << 20)
            .with_cache_limit(1 << 20)
            .with_gc_limit(1 << 20)
            .with_pressure_timeout(Duration::from_secs(5)),
    );
    // Another thread fills the memory, binds it and frees it in flight:
    // its slot gathers the blocks.
    let v = std::thread::scope(|s| {
        s.spawn(|| {
            let bufs: Vec<_> = (0..4)
                .map(|_| alloc.malloc(256 << 10, &q).unwrap())
                .collect();
            let v = use_all_on(&q, &bufs);
            drop(bufs);
            v
        })
        .join()
        .unwrap()
    });
    // This thread needs the room: it waits for that work (completed by a
    // third thread), then takes the memory back, never releasing in flight.
    let completer = {
        let gpu = gpu.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            gpu.complete(0, v);
        })
    };
    let big = alloc.malloc(1 << 20, &q).unwrap();
    completer.join().unwrap();
    let s = balanced(alloc.stats());
    assert_eq!((s.oom_errors, s.waits > 0), (0, true), "{s:?}");
    assert_eq!(gpu.allocated_bytes(), 1 << 20);
    drop(big);
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

#[test]
fn teardown_waits_for_blocks_freed_in_flight() {
    let (gpu, alloc, q) = setup(config());
    let bufs: Vec<_> = (0..8).map(|_| alloc.malloc(4096, &q).unwrap()).collect();
    let v = use_all_on(&q, &bufs);
    drop(bufs);
    let completer = {
        let gpu = gpu.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            gpu.complete(0, v);
        })
    };
    drop((alloc, q)); // waits (up to the pressure timeout) for the work
    completer.join().unwrap();
    assert_eq!(gpu.live_buffers(), 0, "released once complete");
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

#[test]
fn frees_on_other_threads_before_the_allocator_goes_are_counted_at_its_close() {
    let gpu = ManualGpu::new(1 << 30, false);
    let alloc = Allocator::new(gpu.clone(), config()).unwrap();
    let q = alloc.create_queue().unwrap();
    for round in 0..4 {
        let mut bufs: Vec<_> = (0..64).map(|_| alloc.malloc(4096, &q).unwrap()).collect();
        // Half freed on another thread while the allocator lives: their
        // home slot's owner is not told at once.
        let theirs: Vec<_> = bufs.drain(..32).collect();
        std::thread::spawn(move || drop(theirs)).join().unwrap();
        if round < 3 {
            drop(bufs);
            continue;
        }
        drop((alloc, q)); // the close folds those frees into the count
        assert!(gpu.live_buffers() >= 1, "live buffers keep the allocator");
        drop(bufs); // the last one lets the allocator go
        assert_eq!(gpu.live_buffers(), 0, "nothing leaked");
        return;
    }
    unreachable!();
}

#[test]
fn a_batch_filed_as_ready_is_trimmed_to_the_cache_limit_before_the_device_grows() {
    let config = config().with_cache_limit(256 << 10);
    let (gpu, alloc, q) = setup(config);
    let bufs: Vec<_> = (0..10)
        .map(|_| alloc.malloc(64 << 10, &q).unwrap())
        .collect();
    let mut cb = q.command_buffer().unwrap();
    for b in &bufs {
        cb.fill(b, 1).unwrap();
    }
    let ticket = cb.commit().unwrap();
    drop(bufs); // in flight: gathered in this thread's slot, not filed
    gpu.complete(0, ticket.value());
    // Waiting moves the cached watermark; the batch is still unfiled, so
    // the next miss files all ten as ready at once.
    assert!(ticket.wait(Duration::from_secs(1)).unwrap());
    let before = gpu.allocated_bytes();
    assert_eq!(before, 2 << 20, "one small segment");
    let big = alloc.malloc(128 << 10, &q).unwrap();
    // Filed, the blocks make their segment whole again: 2 MiB releasable,
    // over the cache limit, goes back to the device before the device is
    // asked for more.
    assert!(
        gpu.peak_allocated_bytes() <= before,
        "the device grew to {} KiB with {} KiB cached",
        gpu.peak_allocated_bytes() >> 10,
        before >> 10
    );
    let s = balanced(alloc.stats());
    assert!(s.releasable_bytes <= 256 << 10, "{s:?}");
    drop(big);
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

#[test]
fn slots_no_thread_fills_leave_their_share_to_the_ready_list() {
    let cache = 2 << 20;
    let (gpu, alloc, q) = setup(config().with_cache_limit(cache));
    // Blocks over a slot's cap never enter one: no slot claims its share,
    // and the arena may hold the whole cache limit (one free segment).
    let bufs: Vec<_> = (0..16)
        .map(|_| alloc.malloc(64 << 10, &q).unwrap())
        .collect();
    drop(bufs);
    let s = balanced(alloc.stats());
    assert_eq!((s.releasable_bytes, s.device_releases), (cache, 0), "{s:?}");
    // A small block claims this thread's slot: its share leaves the
    // arena's, and the total stays under the limit: the free segment goes.
    drop(alloc.malloc(4096, &q).unwrap());
    let s = balanced(alloc.stats());
    assert!(s.releasable_bytes <= cache, "{s:?}");
    assert_eq!(s.device_releases, 1, "the free segment made room: {s:?}");
    drop(alloc.malloc(4096, &q).unwrap()); // a new segment; now in the slot
    let s = balanced(alloc.stats());
    // Reused from there on, through the claimed slot.
    for _ in 0..10 {
        drop(alloc.malloc(4096, &q).unwrap());
    }
    let t = balanced(alloc.stats());
    assert_eq!(
        (t.cache_hits, t.device_allocations),
        (s.cache_hits + 10, s.device_allocations)
    );
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}

#[test]
fn a_large_block_asked_again_by_its_thread_comes_back_as_it_is() {
    let gpu = ManualGpu::new(1 << 30, true);
    let alloc = Allocator::new(gpu.clone(), config()).unwrap();
    let q = alloc.create_queue().unwrap();
    let a = alloc.malloc(48 << 20, &q).unwrap();
    let (id, offset) = (a.block_id(), a.offset());
    drop(a);
    let before = balanced(alloc.stats());
    let b = alloc.malloc(48 << 20, &q).unwrap();
    assert_eq!((b.block_id(), b.offset()), (id, offset));
    let s = balanced(alloc.stats());
    // The block never went through the free index: no merge, no split.
    assert_eq!(
        (s.merges, s.splits),
        (before.merges, before.splits),
        "{s:?}"
    );
    assert_eq!(s.cache_hits, before.cache_hits + 1);
    alloc.check_consistency().unwrap();
    drop(b);
    // With a free block before it, the arena's choice (the lowest address
    // of the merged block) wins over taking the same block back.
    // (Blocks under 10 MiB share 20 MiB segments.)
    let first = alloc.malloc(4 << 20, &q).unwrap();
    let second = alloc.malloc(8 << 20, &q).unwrap();
    let (low, high) = (first.offset(), second.offset());
    assert_eq!(
        (first.block_id() >> 40, high),
        (second.block_id() >> 40, low + (4 << 20))
    );
    drop(first);
    drop(second);
    let c = alloc.malloc(8 << 20, &q).unwrap();
    assert_eq!(c.offset(), low, "the lowest address that fits");
    alloc.check_consistency().unwrap();
    drop(c);
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}
