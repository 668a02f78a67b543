//! Scratch probe (not committed): the mixed workload's hit rate.
use inflight::backend::sim::{Backing, SimConfig, SimGpu};
use inflight::{Allocator, Buffer, Config};
use std::time::Instant;
fn main() {
    let gpu = SimGpu::new(SimConfig { backing: Backing::Accounting, memory_capacity: 1 << 40, ..SimConfig::default() });
    let alloc = Allocator::new(gpu, Config::default()).unwrap();
    let q = alloc.create_queue().unwrap();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; state };
    let sizes: Vec<u64> = (0..4096).map(|_| { let u = (next() >> 11) as f64 / (1u64 << 53) as f64; ((1024f64).ln() + u * ((64u64 << 20) as f64 / 1024.0).ln()).exp() as u64 }).collect();
    let mut live: Vec<Buffer<SimGpu>> = sizes[..64].iter().map(|&s| alloc.malloc(s, &q).unwrap()).collect();
    let n = std::env::args().nth(1).map_or(2_000_000, |s| s.parse().unwrap());
    for round in 0..2 {
        let s0 = alloc.stats();
        let t = Instant::now();
        for i in 1..=n {
            let slot = (i * 31) % 64;
            live[slot] = alloc.malloc(sizes[i % sizes.len()], &q).unwrap();
        }
        let dt = t.elapsed();
        let s = alloc.stats();
        println!("round {round}: {:.1} ns/pair, hits {} misses {} (+{}), ready {} blocks {} MiB, reserved {} MiB",
            dt.as_nanos() as f64 / n as f64, s.cache_hits - s0.cache_hits, s.cache_misses - s0.cache_misses, s.device_releases - s0.device_releases, s.ready_count, s.ready_bytes >> 20, s.reserved_bytes >> 20);
    }
}
