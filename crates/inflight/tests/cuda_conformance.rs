//! The shared conformance suite on a real NVIDIA GPU through the CUDA
//! backend. Where no driver is found (CI has no GPU) each test says so in one
//! line and passes without running; on a machine with a driver every check
//! runs, under both raw-allocation modes where it matters.
#![cfg(feature = "cuda")]

use inflight::backend::cuda::{probe_driver, CudaConfig, CudaGpu, RawAlloc};
use inflight::conformance as c;

/// A fresh backend on device 0, or `None` (with the reason printed) when this
/// machine has no CUDA driver.
fn gpu(raw_alloc: RawAlloc) -> Option<impl Fn() -> CudaGpu> {
    if let Err(e) = probe_driver() {
        println!("skipped: {e}");
        return None;
    }
    Some(move || {
        CudaGpu::new(CudaConfig {
            ordinal: 0,
            raw_alloc,
        })
        .expect("a CUDA device")
    })
}

fn run(check: fn(c::Factory<'_, CudaGpu>)) {
    if let Some(make) = gpu(RawAlloc::default()) {
        check(&make);
    }
}

#[test]
fn ops_compute() {
    run(c::ops_compute);
}
#[test]
fn timeline_advances_in_order() {
    run(c::timeline_advances_in_order);
}
#[test]
fn wait_times_out_on_unsubmitted_value() {
    run(c::wait_times_out_on_unsubmitted_value);
}
#[test]
fn freed_buffers_become_reusable_after_completion() {
    run(c::freed_buffers_become_reusable_after_completion);
}
#[test]
fn reuse_on_another_queue_is_ordered() {
    run(c::reuse_on_another_queue_is_ordered);
}
#[test]
fn cross_queue_use_is_stamped() {
    run(c::cross_queue_use_is_stamped);
}
#[test]
fn clear_cache_releases_everything() {
    run(c::clear_cache_releases_everything);
}
#[test]
fn retained_policy_keeps_bindings_alive() {
    run(c::retained_policy_keeps_bindings_alive);
}
#[test]
fn bad_input_is_refused() {
    run(c::bad_input_is_refused);
}
#[test]
fn memory_limit_gives_out_of_memory() {
    run(c::memory_limit_gives_out_of_memory);
}
#[test]
fn whole_suite_with_cu_mem_alloc() {
    if let Some(make) = gpu(RawAlloc::Sync) {
        c::run_all(&make);
    }
}

/// Without a driver, opening a device is an error, never a panic.
#[test]
fn no_driver_is_an_error_not_a_panic() {
    if probe_driver().is_ok() {
        println!("skipped: a CUDA driver is present");
        return;
    }
    let r = std::panic::catch_unwind(CudaGpu::default_device);
    match r {
        Ok(Err(e)) => assert!(e.to_string().contains("CUDA"), "{e}"),
        Ok(Ok(_)) => panic!("opened a device without a driver"),
        Err(_) => panic!("CudaGpu::new panicked without a driver"),
    }
}
