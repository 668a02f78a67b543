//! The C ABI through the built shared library, loaded as PyTorch loads it,
//! on the simulated GPU: normal use, threads, bad calls (each a one-line
//! message and a null or nothing, never an abort), panics caught at the
//! boundary, the backend chosen by the environment, and CUDA without a
//! driver. Tests that read the library's stderr run in a child process.

#![deny(clippy::undocumented_unsafe_blocks)]

mod common;

use std::time::{Duration, Instant};

use common::{child, is_child, Lib};

const MIB: isize = 1 << 20;

/// A copy of the library on the simulated GPU, configured with `policy`.
fn sim(tag: &str, policy: &str) -> Lib {
    let lib = Lib::load_copy(tag);
    assert_eq!((lib.abi_version)(), 1);
    assert_eq!(lib.configure(Some(policy), -1, -1, Some("sim")), 0);
    lib
}

/// Polls `device`'s statistics until `done` holds (markers complete on the
/// simulated queues' executors), at most 10 s.
fn poll_until(
    lib: &Lib,
    device: i32,
    done: impl Fn(&common::InflightTorchStats) -> bool,
) -> common::InflightTorchStats {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let s = lib.stats(device).unwrap();
        if done(&s) || Instant::now() > until {
            return s;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn malloc_free_record_stream_empty_cache_and_stats() {
    let lib = sim("normal", "deferred");
    assert_eq!(lib.backend(), "none");
    assert_eq!(
        lib.stats(0).unwrap(),
        Default::default(),
        "zeros before any allocation"
    );
    let (main, side) = (0usize, 0x5eed_usize);
    let a = lib.alloc(MIB, 0, main);
    let b = lib.alloc(3 * MIB, 0, main);
    let c = lib.alloc(4096, 1, side);
    assert_eq!(lib.backend(), "sim");
    assert_eq!((lib.device_count)(), 2);
    assert!(a != 0 && b != 0 && c != 0);
    assert!(a != b, "two live allocations, two addresses");
    assert_eq!(((lib.live)(0), (lib.live)(1)), (2, 1));
    lib.record(a, side); // a use on another stream
    lib.dealloc(a, MIB, 0, main);
    lib.dealloc(b, 3 * MIB, 0, main);
    lib.dealloc(c, 4096, 1, side);
    assert_eq!(((lib.live)(0), (lib.live)(1)), (0, 0));
    let s = lib.stats(0).unwrap();
    assert_eq!((s.allocations, s.frees, s.active_count), (2, 2, 0), "{s:?}");
    assert_eq!(s.streams, 2, "main and the declared side stream");
    assert!(s.peak_allocated_bytes >= 4 * MIB as u64, "{s:?}");
    assert!(
        s.reserved_bytes >= 4 * MIB as u64,
        "cached, not released: {s:?}"
    );
    // The same size again on the same stream: a cache hit.
    let b2 = lib.alloc(3 * MIB, 0, main);
    assert_ne!(b2, 0);
    let s = lib.stats(0).unwrap();
    assert!(s.cache_hits >= 1, "{s:?}");
    lib.dealloc(b2, 3 * MIB, 0, main);
    // Peaks reset to the current figures (the allocated peak to at most
    // the old one: blocks idle in a thread's front cache count as
    // allocated for the peak, see inflight's `Config::front_cache`).
    let before = lib.stats(0).unwrap();
    (lib.reset_peak)(0);
    let s = lib.stats(0).unwrap();
    assert_eq!(s.peak_reserved_bytes, s.reserved_bytes, "{s:?}");
    assert!(
        s.peak_allocated_bytes <= before.peak_allocated_bytes,
        "{s:?}"
    );
    // empty_cache releases everything once the streams' markers complete.
    (lib.empty_cache)();
    let s = poll_until(&lib, 0, |s| {
        (lib.empty_cache)();
        s.reserved_bytes == 0
    });
    assert_eq!(s.reserved_bytes, 0, "{s:?}");
    assert_eq!(s.device_allocations, s.device_releases, "{s:?}");
    // Device 1 too.
    let s = poll_until(&lib, 1, |s| {
        (lib.empty_cache)();
        s.reserved_bytes == 0
    });
    assert_eq!(s.reserved_bytes, 0, "{s:?}");
}

/// A block with a use declared on another stream is not handed to the
/// allocating stream's next request until that use is over; without the
/// declaration, the same stream takes it back at once (in order).
#[test]
fn a_declared_use_keeps_the_block_from_its_own_stream() {
    let lib = sim("declared", "deferred");
    let (main, side) = (1usize, 2usize);
    let a = lib.alloc(MIB, 0, main);
    lib.dealloc(a, MIB, 0, main);
    let again = lib.alloc(MIB, 0, main);
    assert_eq!(
        again, a,
        "a stream-ordered free is reused in order on its stream"
    );
    lib.record(again, side);
    lib.dealloc(again, MIB, 0, main);
    let other = lib.alloc(MIB, 0, main);
    assert_ne!(
        other, a,
        "reused while the side stream's use may be in flight"
    );
    lib.dealloc(other, MIB, 0, main);
}

/// Under `immediate` the same reuse happens at once: the defect.
#[test]
fn immediate_reuses_a_block_another_stream_still_uses() {
    let lib = sim("immediate", "immediate");
    let (main, side) = (1usize, 2usize);
    let a = lib.alloc(MIB, 0, main);
    lib.record(a, side);
    lib.dealloc(a, MIB, 0, main);
    let b = lib.alloc(MIB, 0, main);
    assert_eq!(
        b, a,
        "immediate hands the block out again whatever side still does"
    );
    lib.dealloc(b, MIB, 0, main);
}

#[test]
fn configure_after_the_first_allocation_is_refused() {
    let lib = sim("late", "deferred");
    assert_eq!(
        lib.configure(Some("retained"), -1, 1 << 30, None),
        0,
        "before: accepted"
    );
    let p = lib.alloc(4096, 0, 0);
    assert_ne!(p, 0);
    assert_eq!(lib.configure(Some("deferred"), -1, -1, None), -2);
    lib.dealloc(p, 4096, 0, 0);
}

#[test]
fn a_memory_limit_and_a_memory_fraction_bound_reservations() {
    let lib = Lib::load_copy("limits");
    assert_eq!(lib.configure(None, -1, 64 * MIB as i64, Some("sim")), 0);
    let big = lib.alloc(48 * MIB, 0, 0);
    assert_ne!(big, 0);
    // Past the memory limit with nothing to trim or wait for: null (after
    // the pressure timeout? no: nothing is in flight, so at once).
    assert_eq!(lib.alloc(48 * MIB, 0, 0), 0);
    let s = lib.stats(0).unwrap();
    assert_eq!(s.oom_errors, 1, "{s:?}");
    lib.dealloc(big, 48 * MIB, 0, 0);
    // The simulated device has 16 GiB: an eighth is 2 GiB.
    (lib.set_memory_fraction)(0.125, 0);
    let p = lib.alloc(1536 * MIB, 0, 0);
    assert_ne!(p, 0, "1.5 GiB fits under 2 GiB");
    assert_eq!(lib.alloc(1024 * MIB, 0, 0), 0, "another GiB does not");
    lib.dealloc(p, 1536 * MIB, 0, 0);
    // A fraction set before the device's first use is applied when it opens.
    (lib.set_memory_fraction)(0.0625, 1);
    assert_eq!(lib.alloc(1100 * MIB, 1, 0), 0, "past 1 GiB on device 1");
    let q = lib.alloc(900 * MIB, 1, 0);
    assert_ne!(q, 0);
    lib.dealloc(q, 900 * MIB, 1, 0);
}

/// Allocations and frees from several threads at once, half of them freed
/// by another thread than the allocating one.
#[test]
fn threads_allocate_and_free_concurrently() {
    let lib = std::sync::Arc::new(sim("threads", "deferred"));
    let (tx, rx) = std::sync::mpsc::channel::<(usize, isize, usize)>();
    let rx = std::sync::Arc::new(parking_lot::Mutex::new(rx));
    let threads: Vec<_> = (0..4usize)
        .map(|t| {
            let (lib, tx, rx) = (lib.clone(), tx.clone(), rx.clone());
            std::thread::spawn(move || {
                let stream = 100 + t % 2;
                for i in 0..2_000usize {
                    let size = 256 * (1 + (i * 7 + t) % 64) as isize;
                    let p = lib.alloc(size, 0, stream);
                    assert_ne!(p, 0);
                    if i % 2 == 0 {
                        lib.dealloc(p, size, 0, stream);
                    } else {
                        tx.send((p, size, stream)).unwrap();
                        if let Ok((q, s, st)) = rx.lock().try_recv() {
                            lib.dealloc(q, s, 0, st);
                        }
                    }
                }
            })
        })
        .collect();
    drop(tx);
    for t in threads {
        t.join().unwrap();
    }
    while let Ok((q, s, st)) = rx.lock().try_recv() {
        lib.dealloc(q, s, 0, st);
    }
    assert_eq!((lib.live)(0), 0);
    let s = lib.stats(0).unwrap();
    assert_eq!(
        (s.allocations, s.frees, s.active_count),
        (8_000, 8_000, 0),
        "{s:?}"
    );
}

// ---- bad calls, in a child process whose stderr is read back ----

#[test]
fn bad_calls_print_one_line_and_return_null_or_do_nothing() {
    let run = child("child_bad_calls", &[]);
    assert!(
        run.success,
        "the child failed ({:?}):\n{}{}",
        run.code, run.stdout, run.stderr
    );
    for expect in [
        &["free of 0x1000", "before any allocation"][..],
        &["record_stream of 0x2000", "before any allocation"],
        &["malloc of -5 bytes", "negative"],
        &["malloc", "device 7 is out of range", "2 devices"],
        &["malloc", "device -1 is out of range"],
        &["free of 0xdead000", "not an allocation of inflight_torch"],
        &["free of", "not an allocation of inflight_torch"],
        &[
            "free of",
            "on device 1, where inflight_torch has allocated nothing",
        ],
        &["free: device 9 is out of range"],
        &["record_stream of 0xbad000", "not a live allocation"],
        &["allocated with size 4096", "freed all the same"],
        &["stats: a null output pointer"],
        &["stats: device 5 is out of range"],
        &["configure: unknown policy \"lazy\""],
        &["configure: unknown backend \"metal\""],
        &["configure: the cache limit"],
        &["configure: the memory limit must be above 0"],
        &["configure after the first allocation"],
        &["set_memory_fraction(NaN, 0)", "not a fraction"],
    ] {
        assert!(
            run.said(expect),
            "no line with {expect:?} in:\n{}",
            run.stderr
        );
    }
    // Size 0 is normal for PyTorch (empty tensors): null, silently.
    assert!(!run.stderr.contains("malloc of 0 bytes"), "{}", run.stderr);
    for line in run.lines() {
        assert!(!line.contains('\n'));
    }
}

#[test]
fn child_bad_calls() {
    if !is_child("child_bad_calls") {
        return;
    }
    let lib = Lib::load_built();
    // Before any allocation.
    lib.dealloc(0x1000, 64, 0, 0);
    lib.record(0x2000, 0);
    (lib.empty_cache)();
    (lib.reset_peak)(0);
    assert_eq!(lib.stats(0).unwrap(), Default::default());
    // Configure: bad names and limits change nothing.
    assert_eq!(lib.configure(Some("lazy"), -1, -1, Some("sim")), -1);
    assert_eq!(lib.configure(None, -1, -1, Some("metal")), -1);
    assert_eq!(lib.configure(None, 2 << 30, 1 << 30, Some("sim")), -1);
    assert_eq!(lib.configure(None, -1, 0, Some("sim")), -1);
    assert_eq!(lib.configure(Some("deferred"), -1, -1, Some("sim")), 0);
    (lib.set_memory_fraction)(f64::NAN, 0);
    // Sizes.
    assert_eq!(lib.alloc(0, 0, 0), 0, "size 0: null");
    assert_eq!(lib.alloc(-5, 0, 0), 0, "negative: null");
    // Devices out of range.
    assert_eq!(lib.alloc(4096, 7, 0), 0);
    assert_eq!(lib.alloc(4096, -1, 0), 0);
    // Pointers inflight never gave out, double frees, pointers inside a block.
    let p = lib.alloc(1 << 20, 0, 0);
    assert_ne!(p, 0);
    lib.dealloc(0xdead000, 64, 0, 0);
    lib.dealloc(p + 256, (1 << 20) - 256, 0, 0);
    lib.dealloc(p, 1 << 20, 1, 0); // wrong device: nothing allocated there
    lib.dealloc(p, 1 << 20, 9, 0); // no such device
    assert_eq!((lib.live)(0), 1, "none of the bad frees freed it");
    lib.dealloc(p, 1 << 20, 0, 0);
    lib.dealloc(p, 1 << 20, 0, 0); // double free
    lib.dealloc(0, 64, 0, 0); // null: ignored silently, as free(NULL)
    lib.record(0xbad000, 0);
    // A size mismatch: reported, freed all the same.
    let q = lib.alloc(4096, 0, 0);
    lib.dealloc(q, 8192, 0, 0);
    assert_eq!((lib.live)(0), 0);
    // Statistics: a null output, a device out of range.
    // SAFETY: a null output pointer is a documented bad call.
    assert_eq!(unsafe { (lib.stats_raw)(0, std::ptr::null_mut(), 8) }, -1);
    assert_eq!(lib.stats(5), Err(-1));
    // A short struct gets the fields it has room for.
    let mut two = [0u64; 2];
    // SAFETY: `two` is valid for 16 bytes.
    let rc = unsafe { (lib.stats_raw)(0, two.as_mut_ptr().cast(), 16) };
    assert_eq!(rc, 0);
    let s = lib.stats(0).unwrap();
    assert_eq!(two, [s.allocated_bytes, s.peak_allocated_bytes]);
    // Too late to configure.
    assert_eq!(lib.configure(Some("deferred"), -1, -1, None), -2);
    // Still working after all that.
    let r = lib.alloc(4096, 0, 0);
    assert_ne!(r, 0);
    lib.dealloc(r, 4096, 0, 0);
    assert_eq!(lib.stats(0).unwrap().active_count, 0);
}

#[test]
fn a_panic_inside_never_crosses_the_boundary() {
    let run = child("child_panics", &[]);
    assert!(
        run.success,
        "the child failed ({:?}):\n{}{}",
        run.code, run.stdout, run.stderr
    );
    for entry in [
        "inflight_torch_malloc",
        "inflight_torch_free",
        "inflight_torch_record_stream",
        "inflight_torch_empty_cache",
        "inflight_torch_init",
        "inflight_torch_set_memory_fraction",
        "inflight_torch_configure",
        "inflight_torch_stats",
        "inflight_torch_reset_peak",
    ] {
        assert!(
            run.said(&["internal error in", entry, "caught at the boundary"]),
            "no caught panic reported for {entry}:\n{}",
            run.stderr
        );
    }
}

#[test]
fn child_panics() {
    if !is_child("child_panics") {
        return;
    }
    let lib = Lib::load_built();
    assert_eq!(lib.arm("inflight_torch_configure"), 0);
    assert_eq!(
        lib.configure(None, -1, -1, Some("sim")),
        -3,
        "the fallback: internal error"
    );
    assert_eq!(
        lib.configure(None, -1, -1, Some("sim")),
        0,
        "disarmed after one panic"
    );
    assert_eq!(lib.arm("inflight_torch_nonexistent"), -1);
    assert_eq!(lib.arm("inflight_torch_malloc"), 0);
    assert_eq!(
        lib.alloc(4096, 0, 0),
        0,
        "the panicking malloc returns null"
    );
    let p = lib.alloc(4096, 0, 0);
    assert_ne!(p, 0, "the next one works");
    assert_eq!(lib.arm("inflight_torch_free"), 0);
    lib.dealloc(p, 4096, 0, 0);
    assert_eq!((lib.live)(0), 1, "the panicking free did nothing");
    assert_eq!(lib.arm("inflight_torch_record_stream"), 0);
    lib.record(p, 3);
    lib.dealloc(p, 4096, 0, 0);
    assert_eq!((lib.live)(0), 0);
    assert_eq!(lib.arm("inflight_torch_stats"), 0);
    assert_eq!(lib.stats(0), Err(-3));
    for entry in [
        "inflight_torch_empty_cache",
        "inflight_torch_init",
        "inflight_torch_set_memory_fraction",
        "inflight_torch_reset_peak",
    ] {
        assert_eq!(lib.arm(entry), 0);
    }
    (lib.empty_cache)();
    (lib.init)(1);
    (lib.set_memory_fraction)(0.5, 0);
    (lib.reset_peak)(0);
    // Everything still works.
    let q = lib.alloc(1 << 20, 0, 0);
    assert_ne!(q, 0);
    lib.dealloc(q, 1 << 20, 0, 0);
    assert_eq!(lib.stats(0).unwrap().active_count, 0);
}

// ---- the backend chosen from the environment; CUDA without a driver ----

#[test]
fn the_environment_chooses_the_simulated_gpu() {
    let run = child("child_env_sim", &[("INFLIGHT_TORCH_BACKEND", "sim")]);
    assert!(
        run.success,
        "the child failed ({:?}):\n{}{}",
        run.code, run.stdout, run.stderr
    );
}

#[test]
fn child_env_sim() {
    if !is_child("child_env_sim") {
        return;
    }
    let lib = Lib::load_built();
    (lib.init)(3); // PyTorch's init hook: three devices
    let p = lib.alloc(4096, 2, 77);
    assert_ne!(p, 0);
    assert_eq!(lib.backend(), "sim");
    assert_eq!((lib.device_count)(), 3);
    lib.dealloc(p, 4096, 2, 77);
}

#[test]
fn an_unknown_backend_in_the_environment_is_reported() {
    let run = child("child_env_unknown", &[("INFLIGHT_TORCH_BACKEND", "rocm")]);
    assert!(
        run.success,
        "the child failed ({:?}):\n{}{}",
        run.code, run.stdout, run.stderr
    );
    assert!(
        run.said(&[
            "no GPU",
            "INFLIGHT_TORCH_BACKEND",
            "unknown backend \"rocm\""
        ]),
        "{}",
        run.stderr
    );
}

#[test]
fn child_env_unknown() {
    if !is_child("child_env_unknown") {
        return;
    }
    let lib = Lib::load_built();
    assert_eq!(lib.alloc(4096, 0, 0), 0);
    assert_eq!(lib.backend(), "unavailable");
}

/// On CUDA: where no driver is installed (CI), malloc prints why and
/// returns null; where one is, the allocation is real and freed.
#[test]
fn cuda_without_a_driver_prints_and_returns_null() {
    let run = child("child_cuda", &[]);
    assert!(
        run.success,
        "the child failed ({:?}):\n{}{}",
        run.code, run.stdout, run.stderr
    );
    if run.stdout.contains("child_cuda: null") {
        assert!(run.said(&["malloc", "device 0"]), "{}", run.stderr);
    }
}

#[test]
fn child_cuda() {
    if !is_child("child_cuda") {
        return;
    }
    let lib = Lib::load_built();
    // SAFETY: stream 0, the legacy default stream, is valid on any device.
    let p = unsafe { (lib.malloc)(4096, 0, std::ptr::null_mut()) };
    if p.is_null() {
        println!("child_cuda: null");
    } else {
        println!("child_cuda: allocated");
        // SAFETY: as above.
        unsafe { (lib.free)(p, 4096, 0, std::ptr::null_mut()) };
    }
    if cfg!(feature = "cuda") {
        assert!(matches!(lib.backend().as_str(), "cuda"));
    }
}
