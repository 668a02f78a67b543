//! The allocation fast path beside the driver's, measured in one process on
//! one GPU: ns per alloc + free pair for
//!
//! - inflight on a cache hit (`Allocator::malloc` + drop, deferred policy),
//! - `cuMemAlloc` + `cuMemFree`,
//! - `cuMemAllocAsync` + `cuMemFreeAsync` on one stream (the device's default
//!   pool, warm; the first pair on a cold pool is shown apart),
//! - the CUDA backend's own raw `allocate` + `release` in both modes
//!   (`RawAlloc::Pool` includes its stream synchronisation),
//!
//! at 1 KiB, 1 MiB and 64 MiB. Each figure is the median of 7 batches.
//!
//! Run: `cargo run --release --features cuda --example cuda_pairs`

use std::time::Instant;

use inflight::backend::cuda::peers::{DefaultPoolAlloc, DriverAlloc};
use inflight::backend::cuda::{CudaConfig, CudaGpu, RawAlloc};
use inflight::{Allocator, Backend, Config};

const BATCHES: usize = 7;

/// Median ns per iteration of `f` over `BATCHES` batches of `n`.
fn median_ns(n: u32, mut f: impl FnMut()) -> f64 {
    let mut per: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .collect();
    per.sort_by(f64::total_cmp);
    per[BATCHES / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gpu = CudaGpu::new(CudaConfig::default())?;
    let info = gpu.info();
    println!("device: {} ({} MiB)", info.name, info.memory_capacity >> 20);
    let alloc = Allocator::new(gpu.clone(), Config::default())?;
    let q = alloc.create_queue()?;
    let driver = DriverAlloc::new(0)?;
    let pool = DefaultPoolAlloc::new(0)?;
    println!(
        "{:<10} {:>14} {:>16} {:>18} {:>18} {:>16} {:>16}",
        "size",
        "inflight hit",
        "cuMemAlloc+Free",
        "AllocAsync+Free",
        "Async cold 1st",
        "backend Pool",
        "backend Sync"
    );
    let sync_gpu = CudaGpu::new(CudaConfig {
        ordinal: 0,
        raw_alloc: RawAlloc::Sync,
        ..CudaConfig::default()
    })?;
    for (label, size) in [
        ("1 KiB", 1u64 << 10),
        ("1 MiB", 1 << 20),
        ("64 MiB", 64 << 20),
    ] {
        // inflight: warm the cache with one block, then every pair is a hit.
        drop(alloc.malloc(size, &q)?);
        let misses = alloc.stats().cache_misses;
        let hit = median_ns(100_000, || {
            let b = alloc.malloc(size, &q).expect("cache hit");
            std::hint::black_box(&b);
        });
        assert_eq!(
            alloc.stats().cache_misses,
            misses,
            "a timed malloc missed the cache"
        );

        let n_sync = if size >= 64 << 20 { 50 } else { 200 };
        let sync = median_ns(n_sync, || {
            let p = driver.alloc(size).expect("cuMemAlloc");
            // SAFETY: allocated just above, never used.
            unsafe { driver.free(p).expect("cuMemFree") };
        });

        // The default pool's first pair at this size (cold), then warm pairs.
        let cold = {
            pool.trim()?;
            let t = Instant::now();
            let p = pool.alloc(size)?;
            // SAFETY: allocated just above, never used.
            unsafe { pool.free(p)? };
            t.elapsed().as_nanos() as f64
        };
        let asyn = median_ns(10_000, || {
            let p = pool.alloc(size).expect("cuMemAllocAsync");
            // SAFETY: allocated just above, never used.
            unsafe { pool.free(p).expect("cuMemFreeAsync") };
        });
        pool.synchronize()?;

        let raw_pair = |g: &CudaGpu, n: u32| {
            median_ns(n, || {
                let b = g.allocate(size).expect("allocate");
                // SAFETY: the buffer was never used by any submission.
                unsafe { g.release(b) };
            })
        };
        let backend_pool = raw_pair(&gpu, 10_000);
        let sync_backend = raw_pair(&sync_gpu, n_sync);
        println!(
            "{label:<10} {hit:>11.0} ns {:>13.1} µs {asyn:>15.0} ns {:>15.1} µs {backend_pool:>13.0} ns {:>13.1} µs",
            sync / 1e3,
            cold / 1e3,
            sync_backend / 1e3
        );
    }
    Ok(())
}
