//! The `inflight` command-line tool.
//!
//! - `repro`: the MLX incident as a harness, per release policy
//!   ([`repro`]), on any backend ([`backends`]).
//! - `bench`: inflight's allocation fast path beside CUDA's allocators and
//!   PyTorch's, over the same sequences in one run ([`bench`]).
//!
//! Exit codes: 0 success; 1 a safe policy (`deferred`, `retained`) showed a
//! violation or a corrupted checksum; 2 bad arguments or a failed run.

mod backends;
mod bench;
mod model;
mod progress;
mod repro;
mod units;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use inflight::{Allocator, Backend, Policy, PolicyKind};

use crate::backends::{with_backend, BackendJob, BackendName, BackendOptions};
use crate::progress::{Goal, Progress};
use crate::repro::{Live, Report, Validator, Workload};
use crate::units::{fmt_bytes, parse_bytes, parse_duration};

#[derive(Parser)]
#[command(
    name = "inflight",
    version,
    about = "A GPU buffer cache that never releases or reuses a buffer in flight"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reproduce the MLX incident: sustained allocation with cache trimming
    /// while command buffers are in flight, under each release policy.
    Repro(ReproArgs),
    /// ns per alloc + free pair of inflight (each policy) beside
    /// cuMemAllocAsync, cuMemAlloc and PyTorch's caching allocator, over the
    /// same sequences in one run.
    Bench(bench::BenchArgs),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum PolicyArg {
    Deferred,
    Retained,
    Immediate,
    All,
}

#[derive(clap::Args)]
struct ReproArgs {
    /// The GPU backend.
    #[arg(long, value_enum, default_value_t = BackendName::Sim)]
    backend: BackendName,
    /// The release policy, or `all` for the three side by side.
    #[arg(long, value_enum, default_value_t = PolicyArg::Deferred)]
    policy: PolicyArg,
    /// Run for this long (e.g. 30s, 10m) instead of a count of allocations.
    #[arg(long, value_parser = parse_duration, conflicts_with_all = ["allocations", "rounds"])]
    duration: Option<Duration>,
    /// Stop after this many buffer allocations, over all threads.
    #[arg(long, default_value_t = 1_000_000)]
    allocations: u64,
    /// Stop after this many rounds per thread (instead of --allocations).
    #[arg(long, conflicts_with = "allocations")]
    rounds: Option<u64>,
    /// Request threads.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Queues (streams) the threads submit to.
    #[arg(long, visible_alias = "streams", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=32))]
    queues: u16,
    /// Buffers allocated per round (a multiple of 4).
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u16).range(4..=4096))]
    buffers: u16,
    /// Cache limit: small, so trimming fires constantly.
    #[arg(long, value_parser = parse_bytes, default_value = "256MiB")]
    cache_limit: u64,
    /// Memory limit.
    #[arg(long, value_parser = parse_bytes, default_value = "4GiB")]
    memory_limit: u64,
    /// Smallest buffer.
    #[arg(long, value_parser = parse_bytes, default_value = "4KiB")]
    min_size: u64,
    /// Largest buffer, and the size of KV snapshots.
    #[arg(long, value_parser = parse_bytes, default_value = "16MiB")]
    max_size: u64,
    /// Bytes of each buffer the kernels touch.
    #[arg(long, value_parser = parse_bytes, default_value = "16KiB")]
    window: u64,
    /// Seed of every random choice (sizes, patterns, GPU timing jitter).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Abort the process on the first violation, as Metal's validation layer does.
    #[arg(long)]
    abort_on_violation: bool,
    /// Print one JSON object per policy instead of the table.
    #[arg(long)]
    json: bool,
    /// No progress display.
    #[arg(long, short)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Repro(args) => repro_command(args),
        Command::Bench(args) => bench::command(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("inflight: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

struct ReproJob<'a> {
    policy: Policy,
    workload: &'a Workload,
    quiet: bool,
}

impl BackendJob for ReproJob<'_> {
    type Output = Report;

    fn run<B: Backend>(self, backend: B, validator: &dyn Validator) -> anyhow::Result<Report> {
        let w = self.workload;
        let goal = match w.duration {
            Some(d) => Goal::Duration(d),
            None => Goal::Allocations(w.allocations),
        };
        let mut progress = Progress::new(&self.policy.to_string(), goal, self.quiet);
        let live = Arc::new(Live::default());
        let mut tick = |live: &Live, alloc: &Allocator<B>, violations: u64| {
            progress.update(live, &alloc.stats(), violations)
        };
        let report = repro::run(backend, validator, self.policy, w, &live, &mut tick);
        progress.finish();
        report
    }
}

fn repro_command(a: ReproArgs) -> anyhow::Result<ExitCode> {
    if a.min_size == 0 || a.min_size > a.max_size {
        anyhow::bail!("--min-size must be above 0 and at most --max-size");
    }
    if a.window < 4 {
        anyhow::bail!("--window must be at least 4 bytes");
    }
    let buffers = (a.buffers / 4 * 4) as usize;
    let allocations = match a.rounds {
        Some(r) => r
            .saturating_mul(u64::from(a.threads))
            .saturating_mul(buffers as u64),
        None => a.allocations,
    };
    let workload = Workload {
        threads: a.threads as usize,
        queues: a.queues as usize,
        allocations,
        duration: a.duration,
        buffers_per_round: buffers,
        min_size: a.min_size,
        max_size: a.max_size,
        window: a.window,
        cache_limit: a.cache_limit,
        memory_limit: a.memory_limit,
        seed: a.seed,
        ..Workload::default()
    };
    let policies: Vec<Policy> = match a.policy {
        PolicyArg::Deferred => vec![Policy::DEFERRED],
        PolicyArg::Retained => vec![Policy::RETAINED],
        // SAFETY: `Policy::immediate`'s contract (1): releasing in flight is
        // the defect this harness exists to show; on the simulated GPU it is
        // caught by the validation layer, and other backends run it only
        // where their validation layer or a child process contains it.
        PolicyArg::Immediate => vec![unsafe { Policy::immediate() }],
        // SAFETY: as above.
        PolicyArg::All => vec![Policy::DEFERRED, Policy::RETAINED, unsafe {
            Policy::immediate()
        }],
    };
    let opts = BackendOptions {
        seed: a.seed,
        abort_on_violation: a.abort_on_violation,
        accounting: false,
    };
    let mut reports = Vec::new();
    for policy in policies {
        let job = ReproJob {
            policy,
            workload: &workload,
            quiet: a.quiet || a.json,
        };
        let report = with_backend(a.backend, &opts, job)?;
        if a.json {
            println!("{}", serde_json::to_string(&report)?);
        }
        reports.push(report);
    }
    if !a.json {
        print_table(&reports, &workload);
    }
    let unsafe_result = reports.iter().any(|r| {
        r.policy != PolicyKind::Immediate
            && (r.violations > 0 || r.corruptions > 0 || !r.errors.is_empty())
    });
    Ok(if unsafe_result {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// One cell of the report table, computed from a policy's report.
type Cell = Box<dyn Fn(&Report) -> String>;

fn print_table(reports: &[Report], w: &Workload) {
    let Some(first) = reports.first() else { return };
    println!(
        "inflight repro on {} ({}): {} threads, {} queues, {} buffers/round, sizes {}..{}, cache limit {}, memory limit {}, seed {}",
        first.backend,
        first.device,
        w.threads,
        w.queues,
        w.buffers_per_round,
        fmt_bytes(w.min_size),
        fmt_bytes(w.max_size),
        fmt_bytes(w.cache_limit),
        fmt_bytes(w.memory_limit),
        w.seed
    );
    let secs = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{s:.2} s"));
    let rows: Vec<(&str, Cell)> = vec![
        ("rounds", Box::new(|r| r.rounds.to_string())),
        ("submissions", Box::new(|r| r.submissions.to_string())),
        ("buffers allocated", Box::new(|r| r.allocations.to_string())),
        ("violations", Box::new(|r| r.violations.to_string())),
        (
            "corrupted checksums",
            Box::new(|r| format!("{} / {}", r.corruptions, r.checked)),
        ),
        (
            "first violation",
            Box::new(move |r| secs(r.first_violation_seconds)),
        ),
        (
            "first corruption",
            Box::new(move |r| secs(r.first_corruption_seconds)),
        ),
        ("seconds", Box::new(|r| format!("{:.2}", r.seconds))),
        (
            "allocations/s",
            Box::new(|r| format!("{:.0}", r.allocations_per_second)),
        ),
        (
            "rounds/s",
            Box::new(|r| format!("{:.0}", r.rounds_per_second)),
        ),
        ("peak active", Box::new(|r| fmt_bytes(r.peak_active_bytes))),
        (
            "peak reserved",
            Box::new(|r| fmt_bytes(r.peak_reserved_bytes)),
        ),
        (
            "cache hit rate",
            Box::new(|r| format!("{:.1}%", 100.0 * r.hit_rate)),
        ),
        (
            "device allocations",
            Box::new(|r| r.device_allocations.to_string()),
        ),
        (
            "device releases",
            Box::new(|r| r.device_releases.to_string()),
        ),
        ("deferred frees", Box::new(|r| r.deferred_frees.to_string())),
        ("pressure waits", Box::new(|r| r.waits.to_string())),
        (
            "statistics balance",
            Box::new(|r| if r.stats_balanced { "yes" } else { "NO" }.to_string()),
        ),
    ];
    print!("{:<22}", "");
    for r in reports {
        print!("{:>16}", r.policy.to_string());
    }
    println!();
    for (name, f) in &rows {
        print!("{name:<22}");
        for r in reports {
            print!("{:>16}", f(r));
        }
        println!();
    }
    for r in reports {
        for e in &r.errors {
            println!("{}: error: {e}", r.policy);
        }
        if let Some(m) = r.violation_messages.first() {
            println!("{}: first violation: {m}", r.policy);
        }
    }
}
