//! The conformance suite every backend passes: the same bodies run on the
//! simulated GPU, Vulkan, CUDA and Metal (after wgpu's `#[gpu_test]`).
//!
//! Each check takes a factory that makes a fresh backend, builds an
//! allocator over it, and panics with a message on the first disagreement,
//! so that a backend's test file is one line per check:
//!
//! ```ignore
//! #[test]
//! fn ops_compute() { inflight::conformance::ops_compute(&|| my_backend()) }
//! ```
//!
//! [`run_all`] runs every check in order. Checks keep buffers small (at most
//! a few MiB) so they run on lavapipe in CI within seconds.

use std::time::Duration;

use crate::backend::{checksum_uniform, checksum_words, Harness, Span};
use crate::{Allocator, Buffer, Config, Error, Limits, Policy, Queue, ReuseWait};

/// How long a check waits for work that should finish at once.
pub const WAIT: Duration = Duration::from_secs(30);

/// A factory of fresh backends.
pub type Factory<'a, B> = &'a dyn Fn() -> B;

fn allocator<B: Harness>(make: Factory<'_, B>, policy: Policy) -> Allocator<B> {
    allocator_with(make, Config::default().with_policy(policy))
}

fn allocator_with<B: Harness>(make: Factory<'_, B>, config: Config) -> Allocator<B> {
    Allocator::new(make(), config).expect("allocator over a fresh backend")
}

/// Records `fills` fills of the whole of `buf` on `q` (patterns `base`,
/// `base + 1`, …) and commits, without waiting: work for another queue's
/// to race.
fn fill_many<B: Harness>(q: &Queue<B>, buf: &Buffer<B>, base: u32, fills: u32) {
    let mut cb = q.command_buffer().unwrap();
    for i in 0..fills {
        cb.fill(buf, base + i).unwrap();
    }
    let _ticket = cb.commit().unwrap();
}

/// Fills the whole of `buf` with `pattern` on `q`, checksums it, waits, and
/// asserts the work saw only its own fill; `why` says what it means if not.
fn fill_and_check<B: Harness>(
    q: &Queue<B>,
    buf: &Buffer<B>,
    pattern: u32,
    why: impl Fn() -> String,
) {
    let mut cb = q.command_buffer().unwrap();
    cb.fill(buf, pattern).unwrap();
    let slot = cb.checksum(buf).unwrap();
    let t = cb.commit().unwrap();
    assert!(t.wait(WAIT).unwrap());
    assert_eq!(
        t.checksum(slot).unwrap(),
        checksum_uniform(pattern, buf.len() / 4),
        "{}",
        why()
    );
}

/// A check of the suite.
pub type Check<B> = for<'a> fn(Factory<'a, B>);

/// The name of the one check that returns what it saw (how many buffers it
/// rebound), which each backend's test file judges itself:
/// [`an_unseen_buffer_rebound_sees_only_its_own_writes`].
pub const REBIND_CHECK: &str = "an_unseen_buffer_rebound_sees_only_its_own_writes";

/// Every check but [`REBIND_CHECK`], by name, in the suite's order (the
/// rebinding check comes after the sixth): the list a backend's test file
/// turns into tests.
pub fn checks<B: Harness>() -> Vec<(&'static str, Check<B>)> {
    vec![
        ("ops_compute", ops_compute::<B>),
        (
            "timeline_advances_in_order",
            timeline_advances_in_order::<B>,
        ),
        (
            "wait_times_out_on_unsubmitted_value",
            wait_times_out_on_unsubmitted_value::<B>,
        ),
        (
            "freed_buffers_become_reusable_after_completion",
            freed_buffers_become_reusable_after_completion::<B>,
        ),
        (
            "reuse_on_another_queue_is_ordered",
            reuse_on_another_queue_is_ordered::<B>,
        ),
        (
            "in_order_reuse_bound_on_another_queue_is_ordered",
            in_order_reuse_bound_on_another_queue_is_ordered::<B>,
        ),
        (
            "cross_queue_use_is_stamped",
            cross_queue_use_is_stamped::<B>,
        ),
        (
            "clear_cache_releases_everything",
            clear_cache_releases_everything::<B>,
        ),
        (
            "retained_policy_keeps_bindings_alive",
            retained_policy_keeps_bindings_alive::<B>,
        ),
        ("bad_input_is_refused", bad_input_is_refused::<B>),
        (
            "memory_limit_gives_out_of_memory",
            memory_limit_gives_out_of_memory::<B>,
        ),
    ]
}

/// Runs every check, in order.
pub fn run_all<B: Harness>(make: Factory<'_, B>) {
    for (i, (_, check)) in checks::<B>().into_iter().enumerate() {
        if i == 6 {
            an_unseen_buffer_rebound_sees_only_its_own_writes(make);
        }
        check(make);
    }
}

/// fill, copy, add and checksum compute what the CPU model says, on whole
/// buffers and on spans at an offset.
pub fn ops_compute<B: Harness>(make: Factory<'_, B>) {
    let alloc = allocator(make, Policy::DEFERRED);
    let q = alloc.create_queue().unwrap();
    let len = 64 * 1024 + 12; // not a page multiple
    let a = alloc.malloc(len, &q).unwrap();
    let b = alloc.malloc(len, &q).unwrap();
    let c = alloc.malloc(len, &q).unwrap();
    let d = alloc.malloc(len, &q).unwrap();
    let words = len / 4;
    let mut cb = q.command_buffer().unwrap();
    cb.fill(&a, 0xDEAD_BEEF).unwrap();
    cb.fill(&b, 0x1234_5678).unwrap();
    cb.add(&a, &b, &c).unwrap();
    cb.copy(&c, &d).unwrap();
    let s_d = cb.checksum(&d).unwrap();
    // A span at an offset: overwrite the middle of `d` and checksum it alone.
    let mid = Span {
        offset: 4096,
        len: 8192,
    };
    cb.fill_span(&d, mid, 7).unwrap();
    let s_mid = cb.checksum_span(&d, mid).unwrap();
    let s_all = cb.checksum(&d).unwrap();
    let t = cb.commit().unwrap();
    assert!(
        t.wait(WAIT).unwrap(),
        "submission did not complete in {WAIT:?}"
    );
    let sum = 0xDEAD_BEEFu32.wrapping_add(0x1234_5678);
    assert_eq!(
        t.checksum(s_d).unwrap(),
        checksum_uniform(sum, words),
        "fill + add + copy"
    );
    assert_eq!(
        t.checksum(s_mid).unwrap(),
        checksum_uniform(7, mid.words()),
        "span checksum"
    );
    let mut model = vec![sum; words as usize];
    model[1024..1024 + 2048].fill(7);
    assert_eq!(
        t.checksum(s_all).unwrap(),
        checksum_words(&model),
        "ops run in recording order"
    );
}

/// Values are assigned 1, 2, 3, …; the watermark reaches the last.
pub fn timeline_advances_in_order<B: Harness>(make: Factory<'_, B>) {
    let alloc = allocator(make, Policy::DEFERRED);
    let q = alloc.create_queue().unwrap();
    let buf = alloc.malloc(4096, &q).unwrap();
    let mut tickets = Vec::new();
    for i in 0..8u32 {
        let mut cb = q.command_buffer().unwrap();
        cb.fill(&buf, i).unwrap();
        tickets.push(cb.commit().unwrap());
    }
    let values: Vec<u64> = tickets.iter().map(|t| t.value()).collect();
    assert_eq!(values, (1..=8).collect::<Vec<_>>());
    assert!(tickets.last().unwrap().wait(WAIT).unwrap());
    assert!(q.completed() >= 8);
    for t in &tickets {
        assert!(
            t.is_complete().unwrap(),
            "an earlier submission is not complete after a later one"
        );
    }
    assert_eq!(q.last_submitted(), 8);
}

/// Waiting for a value never submitted times out and says so.
pub fn wait_times_out_on_unsubmitted_value<B: Harness>(make: Factory<'_, B>) {
    let alloc = allocator(make, Policy::DEFERRED);
    let q = alloc.create_queue().unwrap();
    let b = alloc.backend();
    let raw_q = q.raw();
    let reached = b.wait(raw_q, 5, Duration::from_millis(20)).unwrap();
    assert!(!reached, "wait for an unsubmitted value reported success");
    assert!(
        b.wait(raw_q, 0, Duration::ZERO).unwrap(),
        "value 0 is always complete"
    );
}

/// A buffer dropped right after commit is pending or ready, never released;
/// after completion it is ready and a same-size malloc reuses it.
pub fn freed_buffers_become_reusable_after_completion<B: Harness>(make: Factory<'_, B>) {
    let alloc = allocator(make, Policy::DEFERRED);
    let q = alloc.create_queue().unwrap();
    let buf = alloc.malloc(1 << 20, &q).unwrap();
    let id = buf.block_id();
    let mut cb = q.command_buffer().unwrap();
    // Enough work that a fast GPU is most likely still on it at `stats`.
    for i in 0..64 {
        cb.fill(&buf, i).unwrap();
    }
    let t = cb.commit().unwrap();
    drop(buf);
    let s = alloc.stats();
    assert_eq!(s.device_releases, 0, "released in flight");
    // Pending until the work completes: `stats` asks the backend, so a
    // block no longer pending means the ticket was complete by then.
    assert!(
        s.pending_bytes >= 1 << 20 || t.is_complete().unwrap(),
        "neither pending nor complete: {s:?}"
    );
    assert!(s.balanced(), "{s:?}");
    assert!(t.wait(WAIT).unwrap());
    let s = alloc.stats();
    assert_eq!(
        (s.pending_count, s.ready_bytes),
        (0, s.reserved_bytes),
        "completed block not promoted: {s:?}"
    );
    let again = alloc.malloc(1 << 20, &q).unwrap();
    assert_eq!(
        again.block_id(),
        id,
        "a ready block of the same size was not reused"
    );
    assert_eq!(alloc.stats().cache_hits, 1);
}

/// A block freed while queue A still writes it, reused on queue B: B's
/// results are B's alone (I2).
pub fn reuse_on_another_queue_is_ordered<B: Harness>(make: Factory<'_, B>) {
    let alloc = allocator(make, Policy::DEFERRED);
    let qa = alloc.create_queue().unwrap();
    let qb = alloc.create_queue().unwrap();
    let len = 256 * 1024;
    for round in 0..16u32 {
        let x = alloc.malloc(len, &qa).unwrap();
        fill_many(&qa, &x, round * 100, 8);
        drop(x);
        let y = alloc.malloc(len, &qb).unwrap();
        fill_and_check(&qb, &y, 0xB0B0_0000 + round, || {
            format!("round {round}: queue A's writes reached queue B's reuse")
        });
    }
    assert!(qa.wait_idle(WAIT).unwrap());
    assert!(alloc.stats().balanced());
}

/// On a queue that orders memory, a block reused while its previous owner's
/// work still runs there, then bound on another queue: the new queue's work
/// is ordered after the old (on the device or by a host wait), and sees only
/// its own writes. Under each [`ReuseWait`]: the binding thread waits, or
/// queue B on the device where the backend can; and with rebinding on (the
/// unseen buffer may take another block instead, rule S2) and off (the
/// wait is the only way). Nothing to check where queues do not order
/// memory.
pub fn in_order_reuse_bound_on_another_queue_is_ordered<B: Harness>(make: Factory<'_, B>) {
    for wait in [ReuseWait::Adaptive, ReuseWait::Host, ReuseWait::Device] {
        for rebind in [false, true] {
            in_order_reuse_bound_on_another_queue_is_ordered_with(make, wait, rebind);
        }
    }
}

fn in_order_reuse_bound_on_another_queue_is_ordered_with<B: Harness>(
    make: Factory<'_, B>,
    wait: ReuseWait,
    rebind_unseen: bool,
) {
    let alloc = allocator_with(
        make,
        Config::default()
            .with_reuse_wait(wait)
            .with_rebind_unseen(rebind_unseen),
    );
    let (qa, qb) = (alloc.create_queue().unwrap(), alloc.create_queue().unwrap());
    if !qa.orders_memory() {
        return;
    }
    let len = 4 << 20;
    for round in 0..8u32 {
        let x = alloc.malloc(len, &qa).unwrap();
        fill_many(&qa, &x, round * 100, 16);
        drop(x);
        let y = alloc.malloc(len, &qa).unwrap(); // in order, if still pending
        fill_and_check(&qb, &y, 0xC0DE_0000 + round, || {
            format!(
                "round {round}, {wait:?} wait, rebinding {rebind_unseen}: the previous \
                 owner's writes on queue A reached queue B"
            )
        });
    }
    assert!(qa.wait_idle(WAIT).unwrap());
    let s = alloc.stats();
    assert!(s.balanced(), "{s:?}");
    if !rebind_unseen {
        assert_eq!(s.reuse_rebinds, 0, "{s:?}");
    }
}

/// Rebinding (rule S2) on a real device: a block reused in order on queue
/// A while 64 fills of it still run there, given to a buffer that is then
/// bound first on queue B with a ready block of its size at hand, is
/// rebound to that block, and B's work sees only its own fill. Where A's
/// work finished first there is nothing to rebind, and the check is the
/// plain ordering one. Returns how many binds were rebound. Nothing to
/// check where queues do not order memory.
pub fn an_unseen_buffer_rebound_sees_only_its_own_writes<B: Harness>(make: Factory<'_, B>) -> u64 {
    // Front caches off: a never-bound free goes straight to the arena.
    let alloc = allocator_with(make, Config::default().with_front_cache(false));
    let (qa, qb) = (alloc.create_queue().unwrap(), alloc.create_queue().unwrap());
    if !qa.orders_memory() {
        return 0;
    }
    let len = 16 << 20;
    for round in 0..8u32 {
        let spare = alloc.malloc(len, &qb).unwrap();
        let x = alloc.malloc(len, &qa).unwrap();
        fill_many(&qa, &x, round * 100, 64);
        drop(x);
        let y = alloc.malloc(len, &qa).unwrap(); // in order, if still pending
        drop(spare); // never bound: ready
        fill_and_check(&qb, &y, 0xFEED_0000 + round, || {
            format!("round {round}: another owner's writes reached a rebound buffer")
        });
    }
    assert!(qa.wait_idle(WAIT).unwrap());
    let s = alloc.stats();
    assert!(s.balanced(), "{s:?}");
    s.reuse_rebinds
}

/// A buffer allocated for queue A and used on queue B is stamped for B.
pub fn cross_queue_use_is_stamped<B: Harness>(make: Factory<'_, B>) {
    let alloc = allocator(make, Policy::DEFERRED);
    let qa = alloc.create_queue().unwrap();
    let qb = alloc.create_queue().unwrap();
    let buf = alloc.malloc(4096, &qa).unwrap();
    let mut cb = qb.command_buffer().unwrap();
    cb.fill(&buf, 3).unwrap();
    let t = cb.commit().unwrap();
    let stamps = buf.stamps();
    assert_eq!(stamps.len(), 1);
    assert_eq!((stamps[0].queue, stamps[0].value), (qb.id(), t.value()));
    drop(buf);
    assert!(t.wait(WAIT).unwrap());
    assert_eq!(alloc.stats().ready_count, 1);
}

/// After the device drains, clearing the cache releases everything (I3).
pub fn clear_cache_releases_everything<B: Harness>(make: Factory<'_, B>) {
    let alloc = allocator(make, Policy::DEFERRED);
    let q = alloc.create_queue().unwrap();
    let mut last = None;
    for i in 0..32u64 {
        let buf = alloc.malloc(4096 * (1 + i % 5), &q).unwrap();
        let mut cb = q.command_buffer().unwrap();
        cb.fill(&buf, i as u32).unwrap();
        last = Some(cb.commit().unwrap());
    }
    let pending_clear = alloc.clear_cache();
    assert!(last.unwrap().wait(WAIT).unwrap());
    let s = alloc.stats();
    assert_eq!(
        s.reserved_bytes, 0,
        "after clear_cache ({pending_clear} B at once) and drain: {s:?}"
    );
    assert_eq!(s.device_allocations, s.device_releases);
    assert!(s.balanced());
}

/// Under `Retained` a dropped buffer stays active until its submission
/// completes, then becomes ready.
pub fn retained_policy_keeps_bindings_alive<B: Harness>(make: Factory<'_, B>) {
    let alloc = allocator(make, Policy::RETAINED);
    let q = alloc.create_queue().unwrap();
    let buf = alloc.malloc(1 << 16, &q).unwrap();
    let mut cb = q.command_buffer().unwrap();
    cb.fill(&buf, 9).unwrap();
    let t = cb.commit().unwrap();
    drop(buf);
    let s = alloc.stats();
    assert!(s.active_count <= 1, "{s:?}");
    assert_eq!(s.pending_count, 0, "retained never files pending blocks");
    assert!(t.wait(WAIT).unwrap());
    let s = alloc.stats();
    assert_eq!(
        (s.active_count, s.frees, s.ready_bytes),
        (0, 1, s.reserved_bytes),
        "{s:?}"
    );
}

/// Bad input gets a clear error, never a panic.
pub fn bad_input_is_refused<B: Harness>(make: Factory<'_, B>) {
    let alloc = allocator(make, Policy::DEFERRED);
    let q = alloc.create_queue().unwrap();
    assert!(matches!(alloc.malloc(0, &q), Err(Error::ZeroSize)));
    let max = alloc.device_info().max_buffer_size;
    assert!(matches!(
        alloc.malloc(max + 1, &q),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        alloc.malloc(u64::MAX, &q),
        Err(Error::TooLarge { .. })
    ));
    let buf = alloc.malloc(100, &q).unwrap();
    let mut cb = q.command_buffer().unwrap();
    for span in [
        Span { offset: 2, len: 4 },
        Span { offset: 0, len: 0 },
        Span {
            offset: 0,
            len: 104,
        },
        Span {
            offset: u64::MAX - 3,
            len: 8,
        },
    ] {
        assert!(
            matches!(cb.fill_span(&buf, span, 0), Err(Error::InvalidSpan { .. })),
            "{span}"
        );
    }
    let other = allocator(make, Policy::DEFERRED);
    let oq = other.create_queue().unwrap();
    assert!(matches!(other.malloc(64, &q), Err(Error::ForeignQueue)));
    let foreign = other.malloc(64, &oq).unwrap();
    assert!(matches!(
        cb.fill(&foreign, 1),
        Err(Error::ForeignBuffer { .. })
    ));
    let t = cb.commit().unwrap();
    assert!(t.wait(WAIT).unwrap());
    assert!(matches!(t.checksum(0), Err(Error::NoSuchSlot { .. })));
    let l = alloc.limits();
    assert!(alloc.set_limits(Limits { memory: 0, ..l }).is_err());
    assert!(alloc.set_cache_limit(l.memory + 1).is_err());
    assert!(alloc.set_gc_limit(l.memory + 1).is_err());
    assert_eq!(alloc.limits(), l, "a refused setter changed the limits");
}

/// Past the memory limit with nothing to trim or wait for: out of memory,
/// with statistics; the allocator stays usable.
pub fn memory_limit_gives_out_of_memory<B: Harness>(make: Factory<'_, B>) {
    let config = Config::default()
        .with_memory_limit(1 << 20)
        .with_pressure_timeout(Duration::from_millis(100));
    let alloc = allocator_with(make, config);
    let q = alloc.create_queue().unwrap();
    let a = alloc.malloc(768 * 1024, &q).unwrap();
    match alloc.malloc(512 * 1024, &q) {
        Err(Error::OutOfMemory {
            requested, stats, ..
        }) => {
            assert_eq!(requested, 512 * 1024);
            assert_eq!(stats.active_bytes, 768 * 1024);
            assert_eq!(stats.oom_errors, 1);
        }
        other => panic!("expected out of memory, got {other:?}"),
    }
    drop(a);
    // The freed block is ready; the next request trims it and fits.
    let b = alloc.malloc(512 * 1024, &q).unwrap();
    assert_eq!(b.len(), 512 * 1024);
    assert!(alloc.stats().balanced());
}
