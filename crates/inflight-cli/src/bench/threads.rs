//! `inflight bench --threads 1,2,4,…`: how the cache-hit pair scales.
//!
//! N threads, each with its own queue, share one allocator and each run
//! alloc + free pairs of one size on a warm cache; every batch starts all
//! threads at a barrier and is timed from the barrier to the last thread's
//! end. Reported: aggregate pairs per second, the aggregate time per pair,
//! and the speedup over one thread (issue 6 asks for 8× at 16 threads on 16
//! cores). The median of the batches is taken.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use inflight::{Allocator, Config, Harness, Policy};
use serde::Serialize;

use crate::backends::BackendJob;
use crate::backends::Validator;

/// One scaling measurement.
#[derive(Clone, Debug, Serialize)]
pub struct ScalingRow {
    pub threads: usize,
    pub pairs_per_thread: u64,
    pub size: u64,
    pub aggregate_pairs_per_second: f64,
    pub ns_per_pair_aggregate: f64,
    pub speedup_vs_one_thread: f64,
    pub backend: String,
}

/// Measures each thread count on a fresh allocator over one backend.
pub struct ScalingJob {
    pub threads: Vec<usize>,
    pub pairs: u64,
    pub batches: u32,
    pub size: u64,
    /// The allocator's settings (its policy is deferred's).
    pub config: Config,
}

impl BackendJob for ScalingJob {
    type Output = Vec<ScalingRow>;

    fn run<B: Harness>(self, backend: B, _: &dyn Validator) -> anyhow::Result<Vec<ScalingRow>> {
        let alloc = Allocator::new(backend, self.config.with_policy(Policy::DEFERRED))?;
        let name = alloc.device_info().backend.to_string();
        let most = self.threads.iter().copied().max().unwrap_or(1);
        let queues = (0..most)
            .map(|_| alloc.create_queue())
            .collect::<Result<Vec<_>, _>>()?;
        let mut rows: Vec<ScalingRow> = Vec::new();
        for &n in &self.threads {
            let mut times = Vec::new();
            // One warm-up batch, then the timed ones.
            for batch in 0..=self.batches {
                let barrier = Arc::new(Barrier::new(n + 1));
                let secs = std::thread::scope(|s| -> anyhow::Result<f64> {
                    let mut workers = Vec::new();
                    for q in &queues[..n] {
                        let (alloc, barrier, pairs, size) =
                            (&alloc, barrier.clone(), self.pairs, self.size);
                        workers.push(s.spawn(move || -> inflight::Result<(Instant, Instant)> {
                            drop(alloc.malloc(size, q)?); // warm this thread's block
                            barrier.wait();
                            let start = Instant::now();
                            for _ in 0..pairs {
                                drop(black_box(alloc.malloc(size, q)?));
                            }
                            Ok((start, Instant::now()))
                        }));
                    }
                    barrier.wait();
                    // Each worker times itself: the span from the first start
                    // to the last end. (Timing from this thread would miss
                    // the work done before it is scheduled again, when the
                    // workers fill every core.)
                    let mut span: Option<(Instant, Instant)> = None;
                    for w in workers {
                        let (start, end) = w
                            .join()
                            .map_err(|_| anyhow::anyhow!("a bench thread panicked"))??;
                        span = Some(span.map_or((start, end), |(s, e)| (s.min(start), e.max(end))));
                    }
                    let (start, end) = span.expect("at least one thread");
                    Ok((end - start).as_secs_f64())
                })?;
                if batch > 0 {
                    times.push(secs);
                }
            }
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            let total = (n as u64 * self.pairs) as f64;
            let rate = total / median;
            let one = rows.first().map_or(rate, |r| r.aggregate_pairs_per_second);
            rows.push(ScalingRow {
                threads: n,
                pairs_per_thread: self.pairs,
                size: self.size,
                aggregate_pairs_per_second: rate,
                ns_per_pair_aggregate: median * 1e9 / total,
                speedup_vs_one_thread: if self.threads.first() == Some(&1) {
                    rate / one
                } else {
                    f64::NAN
                },
                backend: name.clone(),
            });
        }
        Ok(rows)
    }
}

/// Prints the scaling table.
pub fn print(rows: &[ScalingRow]) {
    let Some(first) = rows.first() else { return };
    println!();
    println!(
        "cache-hit pair scaling ({} B, inflight/deferred on {}, {} pairs a thread a batch, median):",
        first.size, first.backend, first.pairs_per_thread
    );
    println!(
        "{:>8} {:>18} {:>18} {:>10}",
        "threads", "pairs/s (total)", "ns/pair (total)", "speedup"
    );
    for r in rows {
        println!(
            "{:>8} {:>18.0} {:>18.1} {:>9.2}x",
            r.threads,
            r.aggregate_pairs_per_second,
            r.ns_per_pair_aggregate,
            r.speedup_vs_one_thread
        );
    }
}
