//! Allocation fast-path benchmarks (criterion): `cargo bench -p inflight`.
//!
//! - `pair/cache_hit/{1KiB,1MiB,64MiB}`: one malloc + drop on a warm cache.
//! - `pair/cache_hit_locked_slots/1MiB`: the same with the front caches'
//!   slots spin locks (`Config::biased_front_cache: false`), for scale.
//! - `pair/mixed`: 64 live buffers, log-uniform 1 KiB–64 MiB, one replaced a step.
//! - `threads/cache_hit/N`: the cache-hit pair from N threads at once; the
//!   reported time is per pair in aggregate (wall time / all pairs).
//! - `commit/{deferred,retained}/N`: commit of a submission binding N buffers.
//! - `promote/N`: promoting N pending blocks once their work completed.
//! - `baseline/mutex_btreemap`: a naive `Mutex<BTreeMap>` size cache, for scale.
//!
//! The backends are the simulated GPU in accounting mode (no host memory)
//! for allocation, and the driven backend for commit and promotion, so that
//! only the allocator is measured.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use inflight::backend::manual::ManualGpu;
use inflight::backend::sim::{Backing, SimConfig, SimGpu};
use inflight::{Allocator, Buffer, Config, Policy};

fn sim_allocator() -> Allocator<SimGpu> {
    sim_allocator_with(Config::default())
}

fn sim_allocator_with(config: Config) -> Allocator<SimGpu> {
    let gpu = SimGpu::new(SimConfig {
        backing: Backing::Accounting,
        memory_capacity: 1 << 40,
        ..SimConfig::default()
    });
    Allocator::new(gpu, config).unwrap()
}

fn pairs(c: &mut Criterion) {
    let mut g = c.benchmark_group("pair");
    g.throughput(Throughput::Elements(1));
    for (name, size) in [("1KiB", 1u64 << 10), ("1MiB", 1 << 20), ("64MiB", 64 << 20)] {
        let alloc = sim_allocator();
        let q = alloc.create_queue().unwrap();
        drop(alloc.malloc(size, &q).unwrap());
        g.bench_function(format!("cache_hit/{name}"), |b| {
            b.iter(|| drop(black_box(alloc.malloc(size, &q).unwrap())))
        });
    }
    // The same hit with every slot a spin lock (`biased_front_cache: false`):
    // the baseline for the biased lock, in the same run.
    let alloc = sim_allocator_with(Config::default().with_biased_front_cache(false));
    let q = alloc.create_queue().unwrap();
    drop(alloc.malloc(1 << 20, &q).unwrap());
    g.bench_function("cache_hit_locked_slots/1MiB", |b| {
        b.iter(|| drop(black_box(alloc.malloc(1 << 20, &q).unwrap())))
    });
    // Mixed: 64 live buffers, sizes log-uniform 1 KiB–64 MiB, one replaced per step.
    let alloc = sim_allocator();
    let q = alloc.create_queue().unwrap();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let sizes: Vec<u64> = (0..4096)
        .map(|_| {
            let u = (next() >> 11) as f64 / (1u64 << 53) as f64;
            ((1024f64).ln() + u * ((64u64 << 20) as f64 / 1024.0).ln()).exp() as u64
        })
        .collect();
    let mut live: Vec<Buffer<SimGpu>> = sizes[..64]
        .iter()
        .map(|&s| alloc.malloc(s, &q).unwrap())
        .collect();
    let mut i = 0usize;
    g.bench_function("mixed", |b| {
        b.iter(|| {
            i += 1;
            let slot = (i * 31) % 64;
            live[slot] = alloc.malloc(sizes[i % sizes.len()], &q).unwrap();
        })
    });
    g.finish();
}

fn threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("threads");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(3));
    let max = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .max(1);
    for n in [1usize, 2, 4, 8, 16] {
        if n > max * 2 {
            continue;
        }
        let alloc = sim_allocator();
        let queues: Vec<_> = (0..n).map(|_| alloc.create_queue().unwrap()).collect();
        g.bench_function(format!("cache_hit/{n}"), |b| {
            b.iter_custom(|iters| {
                let per = iters.div_ceil(n as u64);
                let barrier = Arc::new(Barrier::new(n + 1));
                // Each worker times itself (the main thread may not run
                // again until they finish): first start to last end.
                let (start, end) = std::thread::scope(|s| {
                    let workers: Vec<_> = queues
                        .iter()
                        .map(|q| {
                            let (alloc, barrier) = (&alloc, barrier.clone());
                            s.spawn(move || {
                                drop(alloc.malloc(4096, q).unwrap());
                                barrier.wait();
                                let start = Instant::now();
                                for _ in 0..per {
                                    drop(black_box(alloc.malloc(4096, q).unwrap()));
                                }
                                (start, Instant::now())
                            })
                        })
                        .collect();
                    barrier.wait();
                    workers
                        .into_iter()
                        .map(|w| w.join().unwrap())
                        .reduce(|(s0, e0), (s1, e1)| (s0.min(s1), e0.max(e1)))
                        .unwrap()
                });
                (end - start) * (iters as u32).max(1) / (per * n as u64).max(1) as u32
            })
        });
    }
    g.finish();
}

fn commits(c: &mut Criterion) {
    let mut g = c.benchmark_group("commit");
    for policy in [Policy::DEFERRED, Policy::RETAINED] {
        for n in [1usize, 16, 256] {
            let gpu = ManualGpu::new(1 << 40, true);
            let alloc = Allocator::new(gpu.clone(), Config::default().with_policy(policy)).unwrap();
            let q = alloc.create_queue().unwrap();
            let bufs: Vec<_> = (0..n).map(|_| alloc.malloc(4096, &q).unwrap()).collect();
            g.throughput(Throughput::Elements(n as u64));
            g.bench_function(format!("{policy}/{n}"), |b| {
                b.iter_batched(
                    || {
                        let mut cb = q.command_buffer().unwrap();
                        for buf in &bufs {
                            cb.fill(buf, 0).unwrap();
                        }
                        cb
                    },
                    |cb| {
                        let t = cb.commit().unwrap();
                        gpu.complete(0, t.value());
                        t
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

fn promotion(c: &mut Criterion) {
    let mut g = c.benchmark_group("promote");
    for n in [16usize, 256, 4096] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("{n}"), |b| {
            b.iter_batched(
                || {
                    let gpu = ManualGpu::new(1 << 40, false);
                    let alloc = Allocator::new(gpu.clone(), Config::default()).unwrap();
                    let q = alloc.create_queue().unwrap();
                    let bufs: Vec<_> = (0..n)
                        .map(|i| alloc.malloc(4096 + 256 * (i as u64 % 64), &q).unwrap())
                        .collect();
                    let mut cb = q.command_buffer().unwrap();
                    for b in &bufs {
                        cb.fill(b, 0).unwrap();
                    }
                    cb.commit().unwrap();
                    drop(bufs);
                    gpu.complete(0, 1);
                    alloc
                },
                |alloc| {
                    let s = alloc.stats(); // promotes everything
                    assert_eq!(s.pending_count, 0);
                    alloc
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn baseline(c: &mut Criterion) {
    // The naive cache: Mutex<BTreeMap<size, Vec<block>>>, with a boxed handle
    // per allocation, as a simple runtime might write it.
    let cache: Mutex<BTreeMap<u64, Vec<u64>>> = Mutex::new(BTreeMap::new());
    cache.lock().unwrap().entry(4096).or_default().push(1);
    c.bench_function("baseline/mutex_btreemap", |b| {
        b.iter(|| {
            let block = {
                let mut m = cache.lock().unwrap();
                m.range_mut(4096..)
                    .next()
                    .and_then(|(_, v)| v.pop())
                    .unwrap_or(0)
            };
            let handle = black_box(Box::new(block));
            cache.lock().unwrap().entry(4096).or_default().push(*handle);
        })
    });
}

criterion_group!(benches, pairs, threads, commits, promotion, baseline);
criterion_main!(benches);
