//! `inflight bench`: inflight beside its peers over the same operation
//! sequences, in one process and one run.
//!
//! Rows: inflight under each policy (`deferred`, `retained`, `immediate`);
//! with `--backend cuda` also `cuMemAllocAsync`/`cuMemFreeAsync` on the
//! device's default pool, `cuMemAlloc`/`cuMemFree`, and PyTorch's
//! CUDACachingAllocator through a C++ harness compiled on the fly
//! (`bench/torch.rs`), where its headers and libraries are found.
//!
//! Sequences: cache-hit pairs (alloc + free of one size, repeated) at each
//! `--sizes`, and the mixed workload (`--live` buffers of log-uniform sizes
//! from `--min` to `--max`, one replaced per step). The mixed sequence is
//! generated once from `--seed` with xorshift64* and fed to every row; the
//! C++ harness generates it with the same algorithm and its checksum is
//! compared with ours.
//!
//! Timing: untimed warm-up batches (at least one, and 250 ms), then
//! `--batches` timed batches; the figure is the median ns per pair (a pair
//! = one alloc + one free), with the fastest and slowest batch as the
//! spread. No GPU work uses any buffer. The allocator's settings are
//! `--memory-limit` and the rest ([`crate::args::ConfigArgs`]).
//!
//! This file holds the command and its table; `sequences.rs` the
//! sequences and their timing, `measure.rs` how a row is measured,
//! `threads.rs` the thread scaling, `torch.rs` the PyTorch harness.

mod measure;
mod sequences;
mod threads;
#[cfg(feature = "cuda")]
mod torch;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use inflight::Policy;

use self::measure::{merge_rounds, InflightJob, Plan, Row};
use self::sequences::Mixed;
pub use self::sequences::Timing;
use crate::args::{check_limits, ConfigArgs};
use crate::backends::{with_backend, BackendName, BackendOptions, SimOptions};
use crate::units::{fmt_bytes, parse_bytes};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// The GPU backend (default: cuda where a driver is found, else sim).
    #[arg(long, value_enum)]
    backend: Option<BackendName>,
    /// Alloc + free pairs per timed batch of each cache-hit sequence.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pairs: u64,
    /// Steps per timed batch of the mixed workload.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    /// Timed batches per sequence (after one warm-up batch); the median is reported.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=1000))]
    batches: u32,
    /// Seed of the mixed workload's sizes and slots.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Sizes of the cache-hit pair sequences.
    #[arg(long, value_parser = parse_bytes, value_delimiter = ',', default_value = "1KiB,1MiB,64MiB")]
    sizes: Vec<u64>,
    /// Buffers live in the mixed workload.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    live: u64,
    /// Smallest size of the mixed workload.
    #[arg(long, value_parser = parse_bytes, default_value = "1KiB")]
    min: u64,
    /// Largest size of the mixed workload.
    #[arg(long, value_parser = parse_bytes, default_value = "64MiB")]
    max: u64,
    /// At most this many pairs per batch for `cuMemAlloc`/`cuMemFree` (about
    /// 80 µs a pair): a prefix of the same sequence.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    driver_ops: u64,
    /// Measure inflight's policies this many times, taking turns (each
    /// round starts one policy later); each row's median is then over all
    /// of its rounds' batches. On a host whose speed drifts within a
    /// process, one round compares moments, not policies.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    /// Skip the PyTorch row.
    #[arg(long)]
    no_torch: bool,
    /// Also measure how the cache-hit pair (of the first `--sizes` size)
    /// scales over these thread counts, e.g. `1,2,4,8,16`.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Vec<u16>,
    /// Write one JSON object per (allocator, sequence), one a line, to FILE;
    /// `--json` alone prints them on stdout instead of the table.
    #[arg(long, num_args = 0..=1, default_missing_value = "-", value_name = "FILE")]
    json: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArgs,
}

/// The default backend: CUDA where this build has it and a driver loads.
fn default_backend() -> BackendName {
    #[cfg(feature = "cuda")]
    if inflight::backend::cuda::probe_driver().is_ok() {
        return BackendName::Cuda;
    }
    BackendName::Sim
}

/// Notes for the table, printed on stderr.
fn note(msg: &str) {
    eprintln!("inflight bench: {msg}");
}

pub fn command(a: BenchArgs) -> anyhow::Result<ExitCode> {
    if a.min == 0 || a.min > a.max {
        anyhow::bail!("--min must be above 0 and at most --max");
    }
    if a.sizes.contains(&0) {
        anyhow::bail!("--sizes must be above 0");
    }
    let backend = a.backend.unwrap_or_else(default_backend);
    let plan = Plan {
        pairs: a.pairs,
        batches: a.batches,
        pair_sizes: a.sizes.clone(),
        mixed: Mixed::generate(a.seed, a.live, a.steps, a.min, a.max),
        driver_ops: a.driver_ops,
    };
    let opts = BackendOptions {
        seed: a.seed,
        abort_on_violation: false,
        // An accounting-only simulated GPU of an H100's 80 GiB: no host
        // memory behind buffers, so only the allocator is measured.
        sim: SimOptions {
            accounting: true,
            memory_capacity: Some(80 << 30),
            ..SimOptions::default()
        },
    };
    // SAFETY: `Policy::immediate`'s contract (1): releasing in flight is the
    // hazard. Here no GPU work ever uses a buffer (no command buffer is
    // recorded), so releasing or reusing at once is harmless.
    let immediate = unsafe { Policy::immediate() };
    let policies = [Policy::DEFERRED, Policy::RETAINED, immediate];
    let config = a.config.config(Policy::DEFERRED);
    check_limits(&config)?;
    let mut rounds: Vec<Vec<Row>> = vec![Vec::new(); policies.len()];
    for round in 0..a.repeat as usize {
        for k in 0..policies.len() {
            let i = (k + round) % policies.len();
            let job = InflightJob {
                plan: &plan,
                config: config.clone().with_policy(policies[i]),
            };
            rounds[i].extend(with_backend(backend, &opts, job)?);
        }
    }
    let mut rows = Vec::new();
    for policy_rows in rounds {
        rows.extend(merge_rounds(policy_rows));
    }
    match backend {
        BackendName::Sim => {
            note("simulated GPU: inflight rows only (the peers need --backend cuda)")
        }
        #[cfg(feature = "cuda")]
        BackendName::Cuda => {
            let device = rows[0].device.clone();
            rows.extend(measure::peer_rows(&plan, a.no_torch, &device)?)
        }
        #[cfg(feature = "vulkan")]
        BackendName::Vulkan => {
            note("vulkan: inflight rows only (the CUDA and PyTorch peers need --backend cuda)")
        }
        #[cfg(feature = "metal")]
        BackendName::Metal => {
            note("metal: inflight rows only (the CUDA and PyTorch peers need --backend cuda)")
        }
    }

    let scaling = if a.threads.is_empty() {
        Vec::new()
    } else {
        let job = threads::ScalingJob {
            threads: a.threads.iter().map(|&n| usize::from(n)).collect(),
            pairs: a.pairs,
            batches: a.batches,
            size: a.sizes.first().copied().unwrap_or(4096),
            config: config.clone(),
        };
        with_backend(backend, &opts, job)?
    };

    let stdout_json = a.json.as_deref() == Some(std::path::Path::new("-"));
    let mut lines = Vec::new();
    for r in &rows {
        lines.push(serde_json::to_string(r)?);
    }
    for r in &scaling {
        lines.push(serde_json::to_string(r)?);
    }
    if let Some(path) = a.json.as_ref().filter(|_| !stdout_json) {
        let mut f = std::fs::File::create(path)?;
        for l in &lines {
            writeln!(f, "{l}")?;
        }
    }
    if stdout_json {
        for l in &lines {
            println!("{l}");
        }
    } else {
        if a.repeat > 1 {
            note(&format!(
                "inflight's rows: {} rounds, the policies taking turns; each median is over all rounds' batches",
                a.repeat
            ));
        }
        print_table(&rows, &plan);
        threads::print(&scaling);
    }
    Ok(ExitCode::SUCCESS)
}

/// The table: one line per (sequence, allocator), then each peer's time
/// over inflight deferred's.
fn print_table(rows: &[Row], plan: &Plan) {
    let Some(first) = rows.first() else { return };
    let m = &plan.mixed;
    println!(
        "inflight bench on {} ({}): {} pairs a batch, {} batches after a warm-up (median, fastest..slowest); \
         mixed: {} live, {} steps a batch, sizes {}..{} log-uniform, seed {} (sizes checksum {:016x})",
        first.backend,
        first.device,
        plan.pairs,
        plan.batches,
        m.live,
        m.ops.len(),
        fmt_bytes(m.min),
        fmt_bytes(m.max),
        m.seed,
        m.checksum
    );
    println!(
        "{:<12} {:<20} {:>11} {:>21} {:>9} {:>13} {:>13} {:>9}",
        "sequence", "allocator", "ns/pair", "spread", "device", "peak", "peak", "pairs"
    );
    println!(
        "{:<12} {:<20} {:>11} {:>21} {:>9} {:>13} {:>13} {:>9}",
        "", "", "(median)", "(min..max)", "allocs", "reserved", "live", "a batch"
    );
    let opt = |v: Option<u64>, f: &dyn Fn(u64) -> String| v.map_or("-".into(), f);
    let mut seqs: Vec<String> = Vec::new();
    for r in rows {
        if !seqs.contains(&r.sequence) {
            seqs.push(r.sequence.clone());
        }
    }
    for seq in &seqs {
        for r in rows.iter().filter(|r| &r.sequence == seq) {
            println!(
                "{:<12} {:<20} {:>11} {:>21} {:>9} {:>13} {:>13} {:>9}",
                r.sequence,
                r.allocator,
                fmt_ns(r.timing.ns_per_pair),
                format!("{}..{}", fmt_ns(r.timing.ns_min), fmt_ns(r.timing.ns_max)),
                opt(r.device_allocations, &|v| v.to_string()),
                opt(r.peak_reserved_bytes, &fmt_bytes),
                opt(r.peak_live_bytes, &fmt_bytes),
                r.ops_per_batch
            );
        }
    }
    println!("ratios (peer's ns per pair / inflight deferred's, from this run):");
    for seq in &seqs {
        let of = |name: &str| {
            rows.iter()
                .find(|r| &r.sequence == seq && r.allocator == name)
                .map(|r| r.timing.ns_per_pair)
        };
        let Some(base) = of("inflight/deferred") else {
            continue;
        };
        let parts: Vec<String> = [
            "pytorch",
            "cuMemAllocAsync",
            "cuMemAlloc",
            "inflight/retained",
            "inflight/immediate",
        ]
        .iter()
        .filter_map(|n| of(n).map(|v| format!("{n} {:.2}x", v / base)))
        .collect();
        println!("  {seq:<12} {}", parts.join(", "));
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 10_000.0 {
        format!("{:.1} µs", ns / 1000.0)
    } else if ns >= 100.0 {
        format!("{ns:.0} ns")
    } else {
        format!("{ns:.1} ns")
    }
}
