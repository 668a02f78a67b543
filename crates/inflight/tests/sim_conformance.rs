//! The shared conformance suite on the simulated GPU, with its validation
//! layer watching: every check must also leave zero violations.

use inflight::backend::sim::{SimConfig, SimGpu};
use inflight::conformance as c;

fn sim() -> SimGpu {
    SimGpu::new(SimConfig {
        seed: 7,
        ..SimConfig::default()
    })
}

/// Runs `check` on fresh simulated GPUs and asserts none saw a violation.
fn clean(check: fn(c::Factory<'_, SimGpu>)) {
    let made = std::sync::Mutex::new(Vec::new());
    let make = || {
        let g = sim();
        made.lock().unwrap().push(g.clone());
        g
    };
    check(&make);
    for g in made.lock().unwrap().iter() {
        assert_eq!(g.violations(), 0, "validation: {:?}", g.violation_log());
    }
}

#[test]
fn ops_compute() {
    clean(c::ops_compute);
}
#[test]
fn timeline_advances_in_order() {
    clean(c::timeline_advances_in_order);
}
#[test]
fn wait_times_out_on_unsubmitted_value() {
    clean(c::wait_times_out_on_unsubmitted_value);
}
#[test]
fn freed_buffers_become_reusable_after_completion() {
    clean(c::freed_buffers_become_reusable_after_completion);
}
#[test]
fn reuse_on_another_queue_is_ordered() {
    clean(c::reuse_on_another_queue_is_ordered);
}
#[test]
fn in_order_reuse_bound_on_another_queue_is_ordered() {
    clean(c::in_order_reuse_bound_on_another_queue_is_ordered);
}
#[test]
fn an_unseen_buffer_rebound_sees_only_its_own_writes() {
    // 64 fills of 16 MiB take the simulated GPU about 21 ms: every round's
    // bind comes while they run, so every round rebinds.
    clean(|make| {
        assert_eq!(
            c::an_unseen_buffer_rebound_sees_only_its_own_writes(make),
            8
        )
    });
}
#[test]
fn cross_queue_use_is_stamped() {
    clean(c::cross_queue_use_is_stamped);
}
#[test]
fn clear_cache_releases_everything() {
    clean(c::clear_cache_releases_everything);
}
#[test]
fn retained_policy_keeps_bindings_alive() {
    clean(c::retained_policy_keeps_bindings_alive);
}
#[test]
fn bad_input_is_refused() {
    clean(c::bad_input_is_refused);
}
#[test]
fn memory_limit_gives_out_of_memory() {
    clean(c::memory_limit_gives_out_of_memory);
}
#[test]
fn untracked_hazards_mode_passes_too() {
    let make = || {
        SimGpu::new(SimConfig {
            in_order_memory: false,
            ..SimConfig::default()
        })
    };
    c::run_all(&make);
}

/// A block reused in order on queue 0 (from the freeing thread's slot),
/// then bound on queue 1 before queue 0's work on it is done; with
/// `busy_other`, queue 1 has a slow submission of its own queued first.
/// Under `wait`, the simulator orders queue 1's work after the previous
/// owner's on the device, or the binding thread waits for it; either way
/// queue 1 sees only its own writes. Returns (device waits, host waits).
fn in_order_reuse_bound_on_another_queue(
    wait: inflight::ReuseWait,
    busy_other: bool,
) -> (u64, u64) {
    use inflight::backend::checksum_uniform;
    use inflight::{Allocator, Config};
    use std::time::Duration;
    let gpu = SimGpu::new(SimConfig {
        // Slow enough that queue 0 is still writing when queue 1 is told to go.
        op_cost: Duration::from_micros(300),
        ..SimConfig::default()
    });
    let config = Config::default().with_reuse_wait(wait);
    let alloc = Allocator::new(gpu.clone(), config).unwrap();
    let (q0, q1) = (alloc.create_queue().unwrap(), alloc.create_queue().unwrap());
    let len = 64 * 1024;
    let ahead = busy_other.then(|| {
        let z = alloc.malloc(len, &q1).unwrap();
        let mut cb = q1.command_buffer().unwrap();
        for i in 0..64 {
            cb.fill(&z, i).unwrap();
        }
        cb.commit().unwrap()
    });
    let x = alloc.malloc(len, &q0).unwrap();
    let block = x.block_id();
    let mut cb = q0.command_buffer().unwrap();
    for i in 0..32 {
        cb.fill(&x, i).unwrap();
    }
    let t0 = cb.commit().unwrap();
    drop(x);
    let y = alloc.malloc(len, &q0).unwrap();
    assert_eq!(y.block_id(), block, "in-order reuse on queue 0");
    assert!(
        !t0.is_complete().unwrap(),
        "queue 0 finished too soon to test anything"
    );
    let mut cb = q1.command_buffer().unwrap();
    cb.fill(&y, 0xABCD).unwrap();
    let host_waited = t0.is_complete().unwrap();
    let slot = cb.checksum(&y).unwrap();
    let t1 = cb.commit().unwrap();
    assert!(t1.wait(Duration::from_secs(10)).unwrap());
    assert!(
        t0.is_complete().unwrap(),
        "queue 1 finished before the previous owner"
    );
    assert_eq!(
        t1.checksum(slot).unwrap(),
        checksum_uniform(0xABCD, len / 4)
    );
    drop(ahead);
    let s = alloc.stats();
    assert_eq!(
        host_waited,
        s.reuse_host_waits == 1,
        "the binding returned before the previous owner's work was done \
         exactly when it did not wait on the host: {s:?}"
    );
    assert_eq!(s.in_order_hits, 1, "{s:?}");
    assert!(s.balanced(), "{s:?}");
    assert_eq!(gpu.violations(), 0);
    (s.reuse_device_waits, s.reuse_host_waits)
}

#[test]
fn in_order_reuse_bound_on_another_queue_under_each_reuse_wait() {
    use inflight::ReuseWait::{Adaptive, Device, Host};
    assert_eq!(inflight::Config::default().reuse_wait(), Adaptive);
    for busy_other in [false, true] {
        assert_eq!(
            in_order_reuse_bound_on_another_queue(Device, busy_other),
            (1, 0)
        );
        assert_eq!(
            in_order_reuse_bound_on_another_queue(Host, busy_other),
            (0, 1)
        );
    }
    // Adaptive: an idle queue 1 would stall at once, so the thread waits;
    // with a submission queued ahead on queue 1 (queue 0 has one left), the
    // device wait most likely costs queue 1 nothing.
    assert_eq!(
        in_order_reuse_bound_on_another_queue(Adaptive, false),
        (0, 1)
    );
    assert_eq!(
        in_order_reuse_bound_on_another_queue(Adaptive, true),
        (1, 0)
    );
}
