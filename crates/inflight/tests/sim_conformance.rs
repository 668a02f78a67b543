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
