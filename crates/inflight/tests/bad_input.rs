//! Hostile input at every public entry point: each gets a clear error or a
//! documented behaviour, never a panic, a hang or undefined behaviour.
//!
//! Sizes (0, 1, page ± 1, the device's largest buffer, one past it,
//! `u64::MAX`), limits (0, above capacity, contradictory), timeouts (0 and
//! `Duration::MAX`), spans past the end or overflowing, handles of another
//! allocator, a ticket waited twice, checksum slots out of range, too many
//! queues, and every drop order of allocator, queues, buffers, command
//! buffers and tickets. Where the simulated GPU runs, its validation layer
//! must see no violation and every raw buffer must be released in the end.

use std::time::Duration;

use inflight::backend::manual::ManualGpu;
use inflight::backend::sim::{SimConfig, SimGpu};
use inflight::{Allocator, Config, Error, Limits, Queue, Span, DEFAULT_PAGE_SIZE, MAX_QUEUES};

const PAGE: u64 = DEFAULT_PAGE_SIZE;

fn sim() -> (SimGpu, Allocator<SimGpu>, Queue<SimGpu>) {
    let g = SimGpu::new(SimConfig {
        seed: 1,
        ..SimConfig::default()
    });
    let a = Allocator::new(
        g.clone(),
        Config::default().with_pressure_timeout(Duration::from_millis(100)),
    )
    .unwrap();
    let q = a.create_queue().unwrap();
    (g, a, q)
}

/// Every raw buffer was released and nothing was used after release.
fn clean(g: &SimGpu) {
    assert_eq!(g.violations(), 0, "{:?}", g.violation_log());
    assert_eq!(g.allocated_bytes(), 0, "a raw buffer was never released");
}

#[test]
fn sizes_zero_tiny_page_edges_device_max_and_beyond() {
    let (g, a, q) = sim();
    let max = a.device_info().max_buffer_size;
    assert!(matches!(a.malloc(0, &q), Err(Error::ZeroSize)));
    for size in [
        1,
        3,
        4,
        255,
        256,
        257,
        PAGE - 1,
        PAGE,
        PAGE + 1,
        max - 1,
        max,
    ] {
        let b = a
            .malloc(size, &q)
            .unwrap_or_else(|e| panic!("malloc({size}): {e}"));
        assert_eq!(b.len(), size);
        assert!(b.capacity() >= size && b.capacity() <= max, "{b:?}");
    }
    for size in [max + 1, usize::MAX as u64, u64::MAX, u64::MAX - PAGE + 2] {
        match a.malloc(size, &q) {
            Err(Error::TooLarge { requested, max: m }) => assert_eq!((requested, m), (size, max)),
            other => panic!("malloc({size}): {other:?}"),
        }
    }
    // A buffer under one word has an empty whole-buffer span: operations
    // over it are refused, not performed out of bounds.
    let tiny = a.malloc(1, &q).unwrap();
    assert_eq!(tiny.span().len, 0);
    let mut cb = q.command_buffer().unwrap();
    assert!(matches!(cb.fill(&tiny, 1), Err(Error::InvalidSpan { .. })));
    assert!(matches!(cb.checksum(&tiny), Err(Error::InvalidSpan { .. })));
    drop((cb, tiny));
    assert!(a.stats().balanced());
    drop((q, a));
    clean(&g);
}

#[test]
fn spans_misaligned_empty_past_the_end_or_overflowing_are_refused() {
    let (g, a, q) = sim();
    let b = a.malloc(4096, &q).unwrap();
    let c = a.malloc(64, &q).unwrap();
    let mut cb = q.command_buffer().unwrap();
    for span in [
        Span { offset: 1, len: 4 },
        Span { offset: 0, len: 3 },
        Span { offset: 0, len: 0 },
        Span {
            offset: 0,
            len: 4100,
        },
        Span {
            offset: 4096,
            len: 4,
        },
        Span {
            offset: u64::MAX - 3,
            len: 8,
        },
        Span {
            offset: 4,
            len: u64::MAX - 3,
        },
    ] {
        assert!(
            matches!(cb.fill_span(&b, span, 0), Err(Error::InvalidSpan { .. })),
            "{span:?}"
        );
        assert!(matches!(
            cb.copy_span(&b, &c, span),
            Err(Error::InvalidSpan { .. })
        ));
        assert!(matches!(
            cb.checksum_span(&b, span),
            Err(Error::InvalidSpan { .. })
        ));
    }
    // A copy longer than the shorter buffer is refused too.
    assert!(matches!(
        cb.copy_span(&b, &c, Span::prefix(128)),
        Err(Error::InvalidSpan { .. })
    ));
    // Nothing refused was recorded; the command buffer still works.
    cb.fill(&b, 9).unwrap();
    let slot = cb.checksum(&b).unwrap();
    let t = cb.commit().unwrap();
    assert!(t.wait(Duration::from_secs(5)).unwrap());
    assert_eq!(
        t.checksum(slot).unwrap(),
        inflight::backend::checksum_uniform(9, 1024)
    );
    drop((b, c, t, q, a));
    clean(&g);
}

#[test]
fn limits_zero_above_capacity_and_contradictory_are_refused() {
    let cap = 1u64 << 30;
    let make = |c: Config| Allocator::new(ManualGpu::new(cap, true), c);
    for c in [
        Config::default().with_memory_limit(0),
        Config::default().with_memory_limit(cap + 1),
        Config::default().with_memory_limit(u64::MAX),
        Config::default().with_gc_limit(0),
        Config::default()
            .with_memory_limit(cap / 2)
            .with_gc_limit(cap),
        Config::default()
            .with_memory_limit(cap / 2)
            .with_cache_limit(cap),
        Config::default().with_pressure_timeout(Duration::MAX),
    ] {
        assert!(
            matches!(make(c.clone()), Err(Error::InvalidConfig(_))),
            "accepted {c:?}"
        );
    }
    // A cache limit of 0 is valid: nothing idle is kept.
    let a = make(Config::default().with_cache_limit(0)).unwrap();
    let q = a.create_queue().unwrap();
    drop(a.malloc(4096, &q).unwrap());
    assert_eq!(a.stats().ready_bytes, 0);

    // The same checks at run time, leaving the limits in force untouched.
    let before = a.limits();
    for l in [
        Limits {
            memory: 0,
            ..before
        },
        Limits {
            memory: cap + 1,
            ..before
        },
        Limits { gc: 0, ..before },
        Limits {
            gc: before.memory + 1,
            ..before
        },
        Limits {
            cache: before.memory + 1,
            ..before
        },
        Limits {
            memory: u64::MAX,
            cache: u64::MAX,
            gc: u64::MAX,
        },
    ] {
        assert!(
            matches!(a.set_limits(l), Err(Error::InvalidConfig(_))),
            "{l:?}"
        );
        assert_eq!(a.limits(), before);
    }
    assert!(a.set_memory_limit(0).is_err());
    assert!(a.set_memory_limit(u64::MAX).is_err());
    assert!(a.set_gc_limit(0).is_err());
    assert!(a.set_cache_limit(u64::MAX).is_err());
    assert_eq!(a.limits(), before);
}

#[test]
fn a_memory_limit_lowered_below_what_is_reserved_makes_allocations_fail_clearly() {
    let g = ManualGpu::new(1 << 30, true);
    let a = Allocator::new(
        g.clone(),
        Config::default().with_pressure_timeout(Duration::ZERO),
    )
    .unwrap();
    let q = a.create_queue().unwrap();
    let held = a.malloc(4 << 20, &q).unwrap();
    a.set_limits(Limits {
        memory: 1 << 20,
        cache: 0,
        gc: 1 << 20,
    })
    .unwrap();
    // Reserved is above the new limit until the holder lets go: allocations
    // fail at once (timeout 0) with the statistics, nothing panics.
    match a.malloc(4096, &q) {
        Err(Error::OutOfMemory { stats, limit, .. }) => {
            assert_eq!(limit, 1 << 20);
            assert!(stats.balanced(), "{stats:?}");
        }
        other => panic!("{other:?}"),
    }
    drop(held);
    assert!(a.malloc(4096, &q).is_ok());
    assert_eq!(g.violations(), 0);
}

#[test]
fn timeouts_zero_and_huge() {
    let (g, a, q) = sim();
    let b = a.malloc(1 << 20, &q).unwrap();
    // Nothing submitted: waiting for idle is immediate, whatever the timeout.
    assert!(q.wait_idle(Duration::ZERO).unwrap());
    assert!(q.wait_idle(Duration::MAX).unwrap());
    let mut cb = q.command_buffer().unwrap();
    cb.fill(&b, 1).unwrap();
    let t = cb.commit().unwrap();
    // Zero is a poll; it may or may not find it done, and never blocks.
    let _ = t.wait(Duration::ZERO).unwrap();
    let _ = q.wait_idle(Duration::ZERO).unwrap();
    // The largest timeout waits for completion, not for ever.
    assert!(t.wait(Duration::MAX).unwrap());
    assert!(q.wait_idle(Duration::MAX).unwrap());
    // A ticket waited any number of times says the same.
    assert!(t.wait(Duration::MAX).unwrap());
    assert!(t.wait(Duration::ZERO).unwrap());
    assert!(t.is_complete().unwrap());
    drop((b, t, q, a));
    clean(&g);

    // pressure_timeout 0: under pressure, fail at once rather than wait.
    // Queues that do not order memory: no in-order reuse of the pending block.
    let gm = ManualGpu::new(8 << 20, false);
    let a = Allocator::new(
        gm.clone(),
        Config::default()
            .with_memory_limit(4 << 20)
            .with_pressure_timeout(Duration::ZERO),
    )
    .unwrap();
    let q = a.create_queue().unwrap();
    let b = a.malloc(3 << 20, &q).unwrap();
    let mut cb = q.command_buffer().unwrap();
    cb.fill(&b, 1).unwrap();
    let _t = cb.commit().unwrap();
    drop(b); // pending: its submission never completes on its own
    assert!(matches!(
        a.malloc(3 << 20, &q),
        Err(Error::OutOfMemory { .. })
    ));
    // A day is the longest accepted, and it waits only until the work is done.
    let a = Allocator::new(
        gm.clone(),
        Config::default().with_pressure_timeout(Duration::from_secs(24 * 3600)),
    );
    assert!(a.is_ok());
}

#[test]
fn handles_of_another_allocator_are_refused() {
    let (g1, a1, q1) = sim();
    let (g2, a2, q2) = sim();
    let b1 = a1.malloc(4096, &q1).unwrap();
    let b2 = a2.malloc(4096, &q2).unwrap();
    assert!(matches!(a1.malloc(64, &q2), Err(Error::ForeignQueue)));
    let mut cb = q1.command_buffer().unwrap();
    assert!(matches!(cb.fill(&b2, 1), Err(Error::ForeignBuffer { .. })));
    assert!(matches!(
        cb.copy(&b1, &b2),
        Err(Error::ForeignBuffer { .. })
    ));
    assert!(matches!(
        cb.copy(&b2, &b1),
        Err(Error::ForeignBuffer { .. })
    ));
    assert!(matches!(
        cb.add(&b1, &b2, &b1),
        Err(Error::ForeignBuffer { .. })
    ));
    assert!(matches!(cb.checksum(&b2), Err(Error::ForeignBuffer { .. })));
    assert_eq!(cb.bindings(), 1, "only b1, bound before b2 was refused");
    cb.fill(&b1, 2).unwrap();
    cb.commit().unwrap().wait(Duration::MAX).unwrap();
    // Two allocators over one device: still two caches, still refused.
    let shared = Allocator::new(g1.clone(), Config::default()).unwrap();
    let q3 = shared.create_queue().unwrap();
    assert!(matches!(shared.malloc(64, &q1), Err(Error::ForeignQueue)));
    let mut cb = q3.command_buffer().unwrap();
    assert!(matches!(cb.fill(&b1, 1), Err(Error::ForeignBuffer { .. })));
    drop((cb, q3, shared, b1, b2, q1, q2, a1, a2));
    clean(&g1);
    clean(&g2);
}

#[test]
fn checksum_slots_out_of_range_and_results_before_completion() {
    let (g, a, q) = sim();
    let b = a.malloc(4096, &q).unwrap();
    let mut cb = q.command_buffer().unwrap();
    cb.fill(&b, 3).unwrap();
    let slot = cb.checksum(&b).unwrap();
    let t = cb.commit().unwrap();
    // Whether or not it is done yet, a slot never recorded is an error.
    for bad in [slot + 1, 1000, usize::MAX] {
        assert!(matches!(
            t.checksum(bad),
            Err(Error::NoSuchSlot { recorded: 1, .. })
        ));
    }
    t.wait(Duration::MAX).unwrap();
    assert!(t.checksum(slot).is_ok());
    assert!(matches!(
        t.checksum(usize::MAX),
        Err(Error::NoSuchSlot { .. })
    ));
    // A submission with no checksum has no slot 0.
    let t2 = q.command_buffer().unwrap().commit().unwrap();
    assert!(matches!(t2.checksum(0), Err(Error::NoSuchSlot { .. })));
    assert!(t2.wait(Duration::MAX).unwrap());
    assert!(t2.checksums().unwrap().is_empty());

    // Results asked for before completion: NotComplete, on a driven device.
    let gm = ManualGpu::new(1 << 30, true);
    let am = Allocator::new(gm.clone(), Config::default()).unwrap();
    let qm = am.create_queue().unwrap();
    let bm = am.malloc(64, &qm).unwrap();
    let mut cb = qm.command_buffer().unwrap();
    let s = cb.checksum(&bm).unwrap();
    let tm = cb.commit().unwrap();
    assert!(matches!(tm.checksum(s), Err(Error::NotComplete { .. })));
    assert!(matches!(tm.checksums(), Err(Error::NotComplete { .. })));
    assert!(!tm.wait(Duration::ZERO).unwrap());
    gm.complete_all();
    assert_eq!(tm.checksum(s).unwrap(), 0);
    drop((b, t, t2, q, a));
    clean(&g);
}

#[test]
fn too_many_queues() {
    let a = Allocator::new(ManualGpu::new(1 << 30, true), Config::default()).unwrap();
    let qs: Vec<_> = (0..MAX_QUEUES).map(|_| a.create_queue().unwrap()).collect();
    assert!(matches!(a.create_queue(), Err(Error::TooManyQueues(n)) if n == MAX_QUEUES));
    // The last queue works.
    let b = a.malloc(64, qs.last().unwrap()).unwrap();
    drop(b);
    assert!(a.stats().balanced());
}

/// Builds live state of every kind: a buffer in flight, a buffer idle, an
/// uncommitted command buffer holding a third, a ticket, two queues.
struct World {
    g: SimGpu,
    a: Option<Allocator<SimGpu>>,
    q0: Option<Queue<SimGpu>>,
    q1: Option<Queue<SimGpu>>,
    busy: Option<inflight::Buffer<SimGpu>>,
    idle: Option<inflight::Buffer<SimGpu>>,
    open: Option<inflight::CommandBuffer<SimGpu>>,
    ticket: Option<inflight::Ticket<SimGpu>>,
}

fn world() -> World {
    let g = SimGpu::new(SimConfig {
        seed: 5,
        op_cost: Duration::from_millis(30),
        jitter: 0.0,
        ..SimConfig::default()
    });
    let a = Allocator::new(
        g.clone(),
        Config::default().with_pressure_timeout(Duration::from_secs(5)),
    )
    .unwrap();
    let q0 = a.create_queue().unwrap();
    let q1 = a.create_queue().unwrap();
    let busy = a.malloc(1 << 16, &q0).unwrap();
    let idle = a.malloc(1 << 12, &q1).unwrap();
    let held = a.malloc(1 << 12, &q1).unwrap();
    let mut cb = q0.command_buffer().unwrap();
    cb.fill(&busy, 1).unwrap();
    cb.fill(&busy, 2).unwrap();
    let ticket = cb.commit().unwrap();
    let mut open = q1.command_buffer().unwrap();
    open.fill(&held, 7).unwrap();
    drop(held); // only the open command buffer holds it now
    World {
        g,
        a: Some(a),
        q0: Some(q0),
        q1: Some(q1),
        busy: Some(busy),
        idle: Some(idle),
        open: Some(open),
        ticket: Some(ticket),
    }
}

#[test]
fn every_drop_order_releases_everything_and_nothing_in_flight() {
    // The seven handles, dropped in every rotation and its reverse, and the
    // open command buffer committed after the allocator is gone when it
    // outlives it.
    let names = ["a", "q0", "q1", "busy", "idle", "open", "ticket"];
    let mut orders: Vec<Vec<usize>> = Vec::new();
    for r in 0..names.len() {
        let o: Vec<usize> = (0..names.len()).map(|i| (i + r) % names.len()).collect();
        orders.push(o.iter().rev().copied().collect());
        orders.push(o);
    }
    for order in orders {
        let mut w = world();
        let g = w.g.clone();
        let mut allocator_gone = false;
        for &i in &order {
            match names[i] {
                "a" => {
                    w.a = None;
                    allocator_gone = true;
                }
                "q0" => w.q0 = None,
                "q1" => w.q1 = None,
                "busy" => w.busy = None,
                "idle" => w.idle = None,
                "open" => {
                    let cb = w.open.take().unwrap();
                    if allocator_gone {
                        // Committing after the allocator was dropped works:
                        // the command buffer keeps what it needs alive.
                        let t = cb.commit().unwrap();
                        assert!(t.wait(Duration::MAX).unwrap());
                    } else {
                        drop(cb); // never committed: its buffer is freed idle
                    }
                }
                "ticket" => {
                    if let Some(t) = w.ticket.take() {
                        if allocator_gone {
                            assert!(t.wait(Duration::MAX).unwrap());
                        }
                    }
                }
                _ => unreachable!(),
            }
        }
        drop(w);
        let names: Vec<&str> = order.iter().map(|&i| names[i]).collect();
        assert_eq!(g.violations(), 0, "{names:?}: {:?}", g.violation_log());
        assert_eq!(g.allocated_bytes(), 0, "{names:?}: a raw buffer was lost");
    }
}

#[test]
fn dropping_the_allocator_with_work_in_flight_waits_then_releases() {
    // The teardown waits (up to pressure_timeout) for pending blocks, so
    // memory in flight is never released; here the work finishes in time.
    let mut w = world();
    let g = w.g.clone();
    w.open = None;
    w.idle = None;
    w.busy = None; // pending: the submission runs ~60 ms
    w.q0 = None;
    w.q1 = None;
    w.ticket = None;
    w.a = None; // the last handle: Shared drops here and waits
    assert_eq!(g.violations(), 0, "{:?}", g.violation_log());
    assert_eq!(g.allocated_bytes(), 0);
}
