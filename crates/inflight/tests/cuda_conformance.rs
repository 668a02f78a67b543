//! The shared conformance suite on a real NVIDIA GPU through the CUDA
//! backend, under its own harness (libtest-mimic, `harness = false` in
//! Cargo.toml). The backend is probed once. Where it cannot run (no driver,
//! as in CI; no GPU; no NVRTC) every GPU test is reported as ignored,
//! the reason is printed once on stderr, and only the no-driver test runs.
//! On a machine with a GPU every check runs, under both raw-allocation modes
//! where it matters, and the no-driver test is the one ignored.
//!
//! The usual flags work: a name filter, `--exact`, `--skip`, `--list`,
//! `--test-threads`, `--ignored`/`--include-ignored` (a GPU test forced to
//! run where the backend is missing is ignored again, with the reason).

use inflight::backend::cuda::{probe_driver, CudaConfig, CudaGpu, RawAlloc};
use inflight::backend::DeviceError;
use inflight::conformance as c;
use libtest_mimic::{Arguments, Completion, Trial};

/// A check of the shared suite.
fn main() {
    let args = Arguments::from_args();
    // Once: the driver, then device 0 (which also needs NVRTC).
    // `Unsupported` is the backend's word for "cannot run here", and so is a
    // driver that finds no GPU (cuInit's CUDA_ERROR_NO_DEVICE); any other
    // error is left to the tests, which fail with it.
    let missing = match CudaGpu::new(CudaConfig::default()) {
        Err(e @ DeviceError::Unsupported(_)) => Some(e.to_string()),
        Err(e) if e.to_string().contains("CUDA_ERROR_NO_DEVICE") => Some(e.to_string()),
        Ok(_) | Err(_) => None,
    };
    let missing = missing.as_deref();
    let mut checks = c::checks::<CudaGpu>();
    checks.insert(
        6,
        (
            c::REBIND_CHECK,
            an_unseen_buffer_rebound_sees_only_its_own_writes,
        ),
    );
    let mut trials: Vec<Trial> = checks
        .into_iter()
        .map(|(name, check)| trial(name, missing, move || check(&gpu(RawAlloc::default()))))
        .collect();
    trials.extend([
        trial(
            "whole_suite_with_cu_mem_alloc",
            missing,
            whole_suite_with_cu_mem_alloc,
        ),
        trial(
            "no_driver_is_an_error_not_a_panic",
            probe_driver().is_ok().then_some("a CUDA driver is present"),
            no_driver_is_an_error_not_a_panic,
        ),
        trial(
            "growable_segments_map_pages",
            missing,
            growable_segments_map_pages,
        ),
        trial(
            "cross_stream_hazard_deferred_is_clean",
            missing,
            cross_stream_hazard_deferred_is_clean,
        ),
        trial(
            "cross_stream_hazard_immediate_corrupts",
            missing,
            cross_stream_hazard_immediate_corrupts,
        ),
    ]);
    if let Some(reason) = missing {
        let ignored = trials.iter().filter(|t| t.has_ignored_flag()).count();
        eprintln!(
            "cuda_conformance: {ignored} of {} tests ignored: {reason}",
            trials.len()
        );
    }
    libtest_mimic::run(&args, trials).exit();
}

/// The trial `name`: runs `test`; or, given the reason it `cannot` run here,
/// is ignored (and, run anyway with `--ignored`, ignored again with the
/// reason).
fn trial(name: &str, cannot: Option<&str>, test: impl FnOnce() + Send + 'static) -> Trial {
    match cannot {
        None => Trial::test(name, move || {
            test();
            Ok(())
        }),
        Some(reason) => {
            let reason = reason.to_owned();
            Trial::ignorable_test(name, move || Ok(Completion::ignored_with(reason)))
                .with_ignored_flag(true)
        }
    }
}

/// A factory of fresh backends on device 0 (the probe found a driver).
fn gpu(raw_alloc: RawAlloc) -> impl Fn() -> CudaGpu {
    move || {
        CudaGpu::new(CudaConfig {
            ordinal: 0,
            raw_alloc,
            ..CudaConfig::default()
        })
        .expect("a CUDA device")
    }
}

fn an_unseen_buffer_rebound_sees_only_its_own_writes(make: c::Factory<'_, CudaGpu>) {
    // How often the GPU was still busy enough for a rebinding.
    let n = c::an_unseen_buffer_rebound_sees_only_its_own_writes(make);
    eprintln!("an_unseen_buffer_rebound_sees_only_its_own_writes: {n} of 8 rebound");
}

fn whole_suite_with_cu_mem_alloc() {
    c::run_all(&gpu(RawAlloc::Sync));
}

/// Without a driver, opening a device is an error, never a panic.
fn no_driver_is_an_error_not_a_panic() {
    let r = std::panic::catch_unwind(CudaGpu::default_device);
    match r {
        Ok(Err(e)) => assert!(e.to_string().contains("CUDA"), "{e}"),
        Ok(Ok(_)) => panic!("opened a device without a driver"),
        Err(_) => panic!("CudaGpu::new panicked without a driver"),
    }
}

/// The cross-stream hazard, shown (PyTorch's `record_stream` case): a
/// 64 MiB buffer allocated for queue A is written many times on queue B;
/// the host drops it right after B's commit and allocates the same size
/// for A again, which fills and checksums it. Blocks go back to their own
/// queue's pool, so A's next request may take the block. Under `immediate`
/// it does while B still writes it, and A's checksums come out wrong; under
/// `deferred` the block waits for B's work and A gets another one, with
/// every checksum right.
fn cross_stream_reuse(make: &dyn Fn() -> CudaGpu, policy: inflight::Policy) -> (u32, u32, u32) {
    use inflight::{Allocator, Config};
    use std::time::Duration;
    const LEN: u64 = 64 << 20;
    const ROUNDS: u32 = 8;
    const A_PATTERN: u32 = 0xA0A0_A0A0;
    let expect = inflight::backend::checksum_uniform(A_PATTERN, LEN / 4);
    let alloc = Allocator::new(make(), Config::default().with_policy(policy)).unwrap();
    let (qa, qb) = (alloc.create_queue().unwrap(), alloc.create_queue().unwrap());
    let (mut corrupted, mut reused) = (0, 0);
    for round in 0..ROUNDS {
        let x = alloc.malloc(LEN, &qa).unwrap();
        let x_id = x.block_id();
        let mut cb = qb.command_buffer().unwrap();
        for i in 0..32 {
            cb.fill(&x, 0xB000_0000 + round * 100 + i).unwrap();
        }
        let tb = cb.commit().unwrap();
        drop(x); // still being written on B
        let y = alloc.malloc(LEN, &qa).unwrap();
        reused += u32::from(y.block_id() == x_id);
        let mut cb = qa.command_buffer().unwrap();
        cb.fill(&y, A_PATTERN).unwrap();
        let slot = cb.checksum(&y).unwrap();
        let ta = cb.commit().unwrap();
        assert!(ta.wait(Duration::from_secs(30)).unwrap());
        assert!(tb.wait(Duration::from_secs(30)).unwrap());
        corrupted += u32::from(ta.checksum(slot).unwrap() != expect);
    }
    (corrupted, reused, ROUNDS)
}

/// With the default configuration, blocks come from growable segments (an
/// address range, pages mapped on demand), whose memory kernels write and
/// read, and whose whole free pages go back.
fn growable_segments_map_pages() {
    use inflight::{Allocator, Config};
    use std::time::Duration;
    let alloc = Allocator::new(gpu(RawAlloc::default())(), Config::default()).unwrap();
    let q = alloc.create_queue().unwrap();
    let small = alloc.malloc(4096, &q).unwrap();
    let large = alloc.malloc(48 << 20, &q).unwrap();
    let mut cb = q.command_buffer().unwrap();
    cb.fill(&small, 7).unwrap();
    cb.fill(&large, 9).unwrap();
    let (a, b) = (cb.checksum(&small).unwrap(), cb.checksum(&large).unwrap());
    let t = cb.commit().unwrap();
    assert!(t.wait(Duration::from_secs(30)).unwrap());
    assert_eq!(
        t.checksum(a).unwrap(),
        inflight::backend::checksum_uniform(7, 1024)
    );
    assert_eq!(
        t.checksum(b).unwrap(),
        inflight::backend::checksum_uniform(9, (48 << 20) / 4)
    );
    let s = alloc.stats();
    assert!(s.pages_mapped >= 2, "no pages mapped: {s:?}");
    assert_eq!(s.device_allocations, s.pages_mapped, "{s:?}");
    drop((small, large));
    alloc.clear_cache();
    let s = alloc.stats();
    assert_eq!(s.reserved_bytes, 0, "whole free pages stay mapped: {s:?}");
    assert!(s.pages_unmapped >= 2, "{s:?}");
}

fn cross_stream_hazard_deferred_is_clean() {
    let make = gpu(RawAlloc::default());
    let (corrupted, reused, rounds) = cross_stream_reuse(&make, inflight::Policy::DEFERRED);
    println!("deferred: {corrupted}/{rounds} corrupted, {reused} reused in flight");
    assert_eq!(
        reused, 0,
        "deferred reused a block in flight on another stream"
    );
    assert_eq!(corrupted, 0);
}

fn cross_stream_hazard_immediate_corrupts() {
    let make = gpu(RawAlloc::default());
    // SAFETY: `Policy::immediate` contract (1): here the reused block is
    // never released (the cache limit is far above 64 MiB), so the defect
    // is a data race between two streams on memory this test owns; the
    // outcome is wrong checksums, which is what the test looks for.
    let policy = unsafe { inflight::Policy::immediate() };
    let (corrupted, reused, rounds) = cross_stream_reuse(&make, policy);
    println!("immediate: {corrupted}/{rounds} corrupted, {reused} reused in flight");
    assert_eq!(reused, rounds, "immediate should hand A's block to B");
    assert!(
        corrupted > 0,
        "no corruption in {rounds} rounds of unordered cross-stream reuse"
    );
}
