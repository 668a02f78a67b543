//! The `inflight` command-line tool.
//!
//! - `repro`: the MLX incident as a harness, per release policy
//!   ([`repro`]), on any backend ([`backends`]); `--record` writes its
//!   allocation events as a trace ([`trace`]).
//! - `replay`: a trace through the allocator, per policy ([`replay`]).
//! - `bench`: inflight's allocation fast path beside CUDA's allocators and
//!   PyTorch's, over the same sequences in one run ([`mod@bench`]).
//! - `import-torch`: a PyTorch memory snapshot as a trace
//!   ([`import_torch`]); `plot`: a trace's memory over time per policy
//!   ([`plot`]); `snapshot-check`: a memory snapshot checked as PyTorch's
//!   viewer will use it ([`snapshot`]).
//!
//! Exit codes: 0 success; 1 a safe policy (`deferred`, `retained`) showed a
//! violation or a corrupted checksum; 2 bad arguments or a failed run.

mod backends;
mod bench;
mod import_torch;
mod input;
mod model;
mod pickle;
mod plot;
mod progress;
mod pyvalue;
mod replay;
mod repro;
mod snapshot;
mod trace;
mod trend;
mod units;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use inflight::{Allocator, Harness, Policy, PolicyKind};

use crate::backends::{
    sim_config, with_backend, BackendJob, BackendName, BackendOptions, SimOptions,
};
use crate::progress::{Goal, Progress};
use crate::replay::{ReplayReport, ReplaySettings, SimCost};
use crate::repro::{Live, Report, Validator, Workload};
use crate::trace::{Recorder, Trace};
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
    /// Replay an allocation trace (JSON Lines, see docs/TRACE.md) under each
    /// release policy and report throughput, peak memory and cache behaviour.
    Replay(ReplayArgs),
    /// ns per alloc + free pair of inflight (each policy) beside
    /// cuMemAllocAsync, cuMemAlloc and PyTorch's caching allocator, over the
    /// same sequences in one run.
    Bench(bench::BenchArgs),
    /// Turn a PyTorch memory snapshot (torch.cuda.memory._dump_snapshot's
    /// pickle, or JSON) into a trace for replay and plot.
    ImportTorch(import_torch::ImportArgs),
    /// Plot a trace's live, reserved and pending bytes over time under
    /// each release policy, as SVG or PNG.
    Plot(plot::PlotArgs),
    /// Check a memory snapshot (pickle or JSON) the way PyTorch's viewer
    /// will read it: fields, sizes, and the history against the segments.
    SnapshotCheck(snapshot::CheckArgs),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum ReuseWaitArg {
    /// The thread waits until the other queue has enough work queued ahead,
    /// then that queue waits for the rest (the default).
    Adaptive,
    /// The binding thread waits for all of it.
    Host,
    /// The other queue waits, on the device where the backend can.
    Device,
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
    /// Memory limit [default: 4 GiB, capped at 3/4 of the device's memory
    /// (lavapipe has a 2 GiB heap)].
    #[arg(long, value_parser = parse_bytes)]
    memory_limit: Option<u64>,
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
    /// On the simulated GPU: host time of each device allocation (default
    /// 20us; `0s` makes creating a buffer free, which no driver does).
    #[arg(long, value_parser = parse_duration)]
    sim_alloc_cost: Option<Duration>,
    /// Abort the process on the first violation, as Metal's validation layer does.
    #[arg(long)]
    abort_on_violation: bool,
    /// Inject faults at this rate (0 to 1): refused device allocations and
    /// submissions that complete with an error. Errors they explain are
    /// counted and reported, not fatal.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    faults: f64,
    /// Lose the device after this many submissions (a fault; ends the run).
    #[arg(long)]
    lose_device_after: Option<u64>,
    /// Timed runs: print each trend interval (reserved, pending, ready,
    /// active bytes) as it closes, on stderr. The table shows them all.
    #[arg(long)]
    trend: bool,
    /// Zero every recycled buffer for its new owner (multi-tenant scrubbing).
    #[arg(long)]
    scrub: bool,
    /// Never hand a block still in flight to a new buffer, even on its own
    /// in-order queue (`Config::in_order_reuse = false`).
    #[arg(long)]
    no_in_order_reuse: bool,
    /// Who waits when a buffer reused in order is bound on another queue
    /// before the previous owner's work is done (`Config::reuse_wait`).
    #[arg(long, value_enum, default_value_t = ReuseWaitArg::Adaptive)]
    reuse_wait: ReuseWaitArg,
    /// Never give such a buffer another block instead of waiting, even if
    /// nothing has seen its block yet (`Config::rebind_unseen = false`).
    #[arg(long)]
    no_rebind: bool,
    /// Keep no idle blocks in per-thread front caches: every allocation and
    /// free goes through the shared lists (`Config::front_cache = false`).
    #[arg(long)]
    no_front_cache: bool,
    /// Size classes per doubling (`Config::size_classes`; 0: whole pages).
    #[arg(long, default_value_t = inflight::DEFAULT_SIZE_CLASSES, value_parser = parse_size_classes)]
    size_classes: u64,
    /// Run the policies this many times, taking turns (each repetition
    /// starts one policy later), and add a summary of medians and paired
    /// ratios: on a host whose speed drifts, one run each compares moments,
    /// not policies.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    /// Print one JSON object per policy instead of the table.
    #[arg(long)]
    json: bool,
    /// No progress display.
    #[arg(long, short)]
    quiet: bool,
    /// Write the run's allocation events (alloc, use, commit, free) to this
    /// file as a trace (docs/TRACE.md); one policy only.
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// The trace: JSON Lines, one event per line (docs/TRACE.md).
    file: PathBuf,
    /// The GPU backend.
    #[arg(long, value_enum, default_value_t = BackendName::Sim)]
    backend: BackendName,
    /// The release policy, or `all` for the three side by side.
    #[arg(long, value_enum, default_value_t = PolicyArg::All)]
    policy: PolicyArg,
    /// Without use/commit events in the trace: bind each buffer to its
    /// stream's open submission at allocation and commit every stream's
    /// open submission after this many events.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    commit_every: u64,
    /// Memory limit of the allocator (and, on the simulated GPU, its memory).
    #[arg(long, value_parser = parse_bytes, default_value = "64GiB")]
    memory_limit: u64,
    /// Cache limit (default: the memory limit).
    #[arg(long, value_parser = parse_bytes)]
    cache_limit: Option<u64>,
    /// Submissions a stream may have in flight before replay waits for its
    /// oldest, as a runtime that reads results does; 0 for no limit (the
    /// host then runs as far ahead of the GPU as memory allows).
    #[arg(long, default_value_t = 16)]
    max_in_flight: usize,
    /// Simulated GPU only: back buffers with host memory and perform every
    /// operation, instead of accounting sizes only.
    #[arg(long)]
    host_backing: bool,
    /// Seed of the simulated GPU.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object per policy instead of the table.
    #[arg(long)]
    json: bool,
    /// No progress display.
    #[arg(long, short)]
    quiet: bool,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a rate from 0 to 1")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Repro(args) => repro_command(args),
        Command::Replay(args) => replay_command(args),
        Command::Bench(args) => bench::command(args),
        Command::ImportTorch(args) => import_torch::command(args),
        Command::Plot(args) => plot::command(args),
        Command::SnapshotCheck(args) => snapshot::check_command(args),
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
    recorder: Option<&'a Recorder>,
}

impl BackendJob for ReproJob<'_> {
    type Output = Report;

    fn policy(&self) -> Option<PolicyKind> {
        Some(self.policy.kind())
    }

    fn run<B: Harness>(self, backend: B, validator: &dyn Validator) -> anyhow::Result<Report> {
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
        let report = repro::run(
            backend,
            validator,
            self.policy,
            w,
            &live,
            self.recorder,
            &mut tick,
        );
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
    if (a.faults > 0.0 || a.lose_device_after.is_some()) && a.backend != BackendName::Sim {
        anyhow::bail!("--faults and --lose-device-after inject faults into --backend sim only");
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
        memory_limit: a.memory_limit.unwrap_or(Workload::default().memory_limit),
        cap_memory_to_device: a.memory_limit.is_none(),
        seed: a.seed,
        faults: a.faults > 0.0 || a.lose_device_after.is_some(),
        print_trend: a.trend,
        scrub: a.scrub,
        in_order_reuse: !a.no_in_order_reuse,
        reuse_wait: match a.reuse_wait {
            ReuseWaitArg::Adaptive => inflight::ReuseWait::Adaptive,
            ReuseWaitArg::Host => inflight::ReuseWait::Host,
            ReuseWaitArg::Device => inflight::ReuseWait::Device,
        },
        rebind_unseen: !a.no_rebind,
        front_cache: !a.no_front_cache,
        size_classes: a.size_classes,
        ..Workload::default()
    };
    if a.record.is_some() && (a.policy == PolicyArg::All || a.repeat > 1) {
        anyhow::bail!("--record writes one run: name one --policy, without --repeat");
    }
    let policies = policies(a.policy);
    let recorder = match &a.record {
        Some(path) => Some(Recorder::create(
            path,
            &format!(
                r#""source":"inflight repro","policy":"{}","threads":{},"queues":{},"cache_limit":{},"memory_limit":{},"seed":{}"#,
                policies[0],
                workload.threads,
                workload.queues,
                workload.cache_limit,
                workload.memory_limit,
                workload.seed
            ),
        )?),
        None => None,
    };
    let opts = BackendOptions {
        seed: a.seed,
        abort_on_violation: a.abort_on_violation,
        sim: SimOptions {
            fault_rate: a.faults,
            lose_device_after: a.lose_device_after,
            alloc_cost: a.sim_alloc_cost,
            ..SimOptions::default()
        },
    };
    let mut reports = Vec::new();
    for rep in 0..a.repeat {
        // Taking turns: repetition k starts with policy k (mod the count).
        let mut order = policies.clone();
        let turn = rep as usize % order.len();
        order.rotate_left(turn);
        let mut round = Vec::new();
        for policy in order {
            let job = ReproJob {
                policy,
                workload: &workload,
                quiet: a.quiet || a.json,
                recorder: recorder.as_ref(),
            };
            let mut report = with_backend(a.backend, &opts, job)?;
            report.repetition = rep;
            if a.json {
                println!("{}", serde_json::to_string(&report)?);
            }
            round.push(report);
        }
        // The table keeps the policies' usual order.
        round.sort_by_key(|r| policies.iter().position(|p| p.kind() == r.policy));
        if !a.json {
            if a.repeat > 1 {
                println!("repetition {} of {}", rep + 1, a.repeat);
            }
            print_table(&round, &workload);
        }
        reports.extend(round);
    }
    if let (Some(rec), Some(path)) = (&recorder, &a.record) {
        let events = rec.finish()?;
        if !a.json {
            eprintln!("inflight: recorded {events} events to {}", path.display());
        }
    }
    if !a.json && a.repeat > 1 {
        print_repeat_summary(&reports, &policies);
    }
    let unsafe_result = reports.iter().any(|r| {
        r.policy != PolicyKind::Immediate
            && (r.violations > 0
                || r.corruptions > 0
                || !r.errors.is_empty()
                || !r.stats_balanced
                || r.faults.as_ref().is_some_and(|f| !f.all_reported))
    });
    Ok(if unsafe_result {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// After `repro --repeat N`: each policy's median rate and peak reserved
/// memory, and deferred's rate over the others' from the same repetition.
fn print_repeat_summary(reports: &[Report], policies: &[Policy]) {
    let reps = reports
        .iter()
        .map(|r| r.repetition)
        .max()
        .map_or(0, |m| m + 1);
    println!("over {reps} repetitions: median (min..max)");
    // The median and range, as the bench takes them over its batches.
    let spread = |v: Vec<f64>, f: &dyn Fn(f64) -> String| -> String {
        if v.is_empty() {
            return "-".into();
        }
        let t = bench::Timing::from_batches(v);
        format!("{} ({}..{})", f(t.ns_per_pair), f(t.ns_min), f(t.ns_max))
    };
    let of = |p: PolicyKind| reports.iter().filter(move |r| r.policy == p);
    for p in policies {
        let k = p.kind();
        println!(
            "  {:<10} allocations/s {:<28} peak reserved {}",
            k.to_string(),
            spread(
                of(k).map(|r| r.allocations_per_second).collect(),
                &|x| format!("{x:.0}")
            ),
            spread(
                of(k).map(|r| r.peak_reserved_bytes as f64).collect(),
                &|x| fmt_bytes(x as u64)
            ),
        );
    }
    // Paired: deferred over each other policy, within a repetition.
    for other in [PolicyKind::Immediate, PolicyKind::Retained] {
        let pairs = |f: &dyn Fn(&Report) -> f64| -> Vec<f64> {
            of(PolicyKind::Deferred)
                .filter_map(|d| {
                    of(other)
                        .find(|o| o.repetition == d.repetition)
                        .map(|o| f(d) / f(o))
                })
                .collect()
        };
        let rate = pairs(&|r| r.allocations_per_second);
        if rate.is_empty() {
            continue;
        }
        let reserved = pairs(&|r| r.peak_reserved_bytes as f64);
        println!(
            "  deferred / {:<9} rate {:<26} peak reserved {}",
            other.to_string(),
            spread(rate, &|x| format!("{x:.3}")),
            spread(reserved, &|x| format!("{x:.3}")),
        );
    }
}

fn policies(p: PolicyArg) -> Vec<Policy> {
    match p {
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
    }
}

struct ReplayJob<'a> {
    policy: Policy,
    trace: &'a Trace,
    settings: &'a ReplaySettings,
    quiet: bool,
}

impl BackendJob for ReplayJob<'_> {
    type Output = ReplayReport;

    fn policy(&self) -> Option<PolicyKind> {
        Some(self.policy.kind())
    }

    fn run<B: Harness>(
        self,
        backend: B,
        validator: &dyn Validator,
    ) -> anyhow::Result<ReplayReport> {
        let n = self.trace.events.len() as u64;
        let mut steps = progress::Steps::new(&self.policy.to_string(), "events", n, self.quiet);
        let report = replay::run_with_tap(
            backend,
            validator,
            self.policy,
            self.trace,
            self.settings,
            &mut |i, _| steps.set(i as u64 + 1),
        );
        steps.finish();
        report
    }
}

fn replay_command(a: ReplayArgs) -> anyhow::Result<ExitCode> {
    if let Some(c) = a.cache_limit {
        if c > a.memory_limit {
            anyhow::bail!("--cache-limit must be at most --memory-limit");
        }
    }
    let trace = trace::load(&a.file)?;
    let opts = BackendOptions {
        seed: a.seed,
        abort_on_violation: false,
        sim: SimOptions {
            accounting: !a.host_backing,
            // Room for the limit, with a little over for rounding.
            memory_capacity: Some(a.memory_limit.saturating_add(a.memory_limit / 16)),
            // Deterministic pacing: a commit's gpu_us is its simulated time.
            jitter: Some(0.0),
            ..SimOptions::default()
        },
    };
    let sim_cost = (a.backend == BackendName::Sim).then(|| {
        let c = sim_config(&opts);
        SimCost {
            op_ns: c.op_cost.as_nanos() as f64,
            ns_per_kib: c.ns_per_kib,
            submit_ns: c.submit_cost.as_nanos() as f64,
        }
    });
    let settings = ReplaySettings {
        commit_every: a.commit_every,
        memory_limit: a.memory_limit,
        cache_limit: a.cache_limit,
        sim_cost,
        max_in_flight: a.max_in_flight,
        drain_timeout: Duration::from_secs(600),
    };
    let mut reports = Vec::new();
    for policy in policies(a.policy) {
        let job = ReplayJob {
            policy,
            trace: &trace,
            settings: &settings,
            quiet: a.quiet || a.json,
        };
        let report = with_backend(a.backend, &opts, job)?;
        if a.json {
            println!("{}", serde_json::to_string(&report)?);
        }
        reports.push(report);
    }
    if !a.json {
        print_replay_table(&reports, &a, &trace);
    }
    let unsafe_result = reports
        .iter()
        .any(|r| r.policy != PolicyKind::Immediate && r.violations > 0);
    Ok(if unsafe_result {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// One cell of the replay table.
type ReplayCell = Cell<ReplayReport>;

fn print_replay_table(reports: &[ReplayReport], a: &ReplayArgs, trace: &Trace) {
    let Some(first) = reports.first() else { return };
    println!(
        "inflight replay of {} on {} ({}): {} events, {} streams, {}; memory limit {}, cache limit {}, max in flight {}",
        a.file.display(),
        first.backend,
        first.device,
        trace.events.len(),
        trace.streams.len(),
        if first.implicit_submissions {
            format!("no use/commit events: bound at allocation, committed every {} events", a.commit_every)
        } else {
            "submissions as in the trace".to_string()
        },
        fmt_bytes(a.memory_limit),
        a.cache_limit.map_or("= memory limit".to_string(), fmt_bytes),
        if a.max_in_flight == 0 {
            "unlimited".to_string()
        } else {
            format!("{} per stream", a.max_in_flight)
        },
    );
    let rows: Vec<(&str, ReplayCell)> = vec![
        ("events", Box::new(|r| r.events.to_string())),
        ("submissions", Box::new(|r| r.submissions.to_string())),
        ("seconds", Box::new(|r| format!("{:.2}", r.seconds))),
        (
            "events/s",
            Box::new(|r| format!("{:.0}", r.events_per_second)),
        ),
        ("peak live", Box::new(|r| fmt_bytes(r.peak_live_bytes))),
        (
            "peak reserved",
            Box::new(|r| fmt_bytes(r.peak_reserved_bytes)),
        ),
        (
            "reserved / live",
            Box::new(|r| format!("{:.3}", r.reserved_to_live)),
        ),
        (
            "device allocations",
            Box::new(|r| r.device_allocations.to_string()),
        ),
        ("cache hits", Box::new(|r| r.cache_hits.to_string())),
        ("cache misses", Box::new(|r| r.cache_misses.to_string())),
        (
            "cache hit rate",
            Box::new(|r| format!("{:.1}%", 100.0 * r.hit_rate)),
        ),
        ("deferred frees", Box::new(|r| r.deferred_frees.to_string())),
        ("pressure waits", Box::new(|r| r.waits.to_string())),
        (
            "in-flight waits",
            Box::new(|r| r.in_flight_waits.to_string()),
        ),
        ("violations", Box::new(|r| r.violations.to_string())),
        (
            "statistics balance",
            Box::new(|r| if r.stats_balanced { "yes" } else { "NO" }.to_string()),
        ),
    ];
    print_columns(reports.iter().map(|r| r.policy.to_string()), reports, &rows);
    for r in reports {
        if let Some(m) = r.violation_messages.first() {
            println!("{}: first violation: {m}", r.policy);
        }
    }
}

/// One cell of the report table, computed from a policy's report.
type Cell<R = Report> = Box<dyn Fn(&R) -> String>;

/// Prints one column per policy: a header of policy names, then each row's
/// label and its cell for every report.
fn print_columns<R>(
    policies: impl Iterator<Item = String>,
    reports: &[R],
    rows: &[(&str, Cell<R>)],
) {
    print!("{:<22}", "");
    for p in policies {
        print!("{p:>16}");
    }
    println!();
    print_rows(reports, rows);
}

/// Each row's label and its cell for every report.
fn print_rows<R>(reports: &[R], rows: &[(&str, Cell<R>)]) {
    for (name, f) in rows {
        print!("{name:<22}");
        for r in reports {
            print!("{:>16}", f(r));
        }
        println!();
    }
}

/// A cell of the injected-faults rows: `f` of the report's faults, `-`
/// where none were injected.
fn fault_cell(f: fn(&repro::FaultReport) -> String) -> Cell<Report> {
    Box::new(move |r| r.faults.as_ref().map_or("-".into(), f))
}

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
        fmt_bytes(first.memory_limit),
        w.seed
    );
    let secs = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{s:.2} s"));
    let share = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{:.1}%", 100.0 * x));
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
            "in-order reuses",
            Box::new(|r| r.stats.in_order_hits.to_string()),
        ),
        (
            "reuse waits (device)",
            Box::new(|r| r.stats.reuse_device_waits.to_string()),
        ),
        (
            "reuse waits (host)",
            Box::new(|r| r.stats.reuse_host_waits.to_string()),
        ),
        (
            "reuse rebinds",
            Box::new(|r| r.stats.reuse_rebinds.to_string()),
        ),
        (
            "statistics balance",
            Box::new(|r| if r.stats_balanced { "yes" } else { "NO" }.to_string()),
        ),
        (
            "µs/round: malloc",
            Box::new(|r| format!("{:.1}", r.phases.malloc_us)),
        ),
        (
            "  record + commit",
            Box::new(|r| format!("{:.1}", r.phases.commit_us)),
        ),
        ("  free", Box::new(|r| format!("{:.1}", r.phases.free_us))),
        (
            "  wait + check",
            Box::new(|r| format!("{:.1}", r.phases.wait_us)),
        ),
        (
            "  in device allocation",
            Box::new(|r| format!("{:.1}", r.phases.device_allocation_us)),
        ),
        (
            "  in device release",
            Box::new(|r| format!("{:.1}", r.phases.device_release_us)),
        ),
        (
            "  in completion queries",
            Box::new(|r| format!("{:.1}", r.phases.completion_query_us)),
        ),
        (
            "GPU queues: busy",
            Box::new(move |r| share(r.queues_time.map(|q| q.busy))),
        ),
        (
            "  stalled on each other",
            Box::new(move |r| share(r.queues_time.map(|q| q.stalled))),
        ),
    ];
    print_columns(reports.iter().map(|r| r.policy.to_string()), reports, &rows);
    if reports.iter().any(|r| r.faults.is_some()) {
        println!("injected faults (injected / reported)");
        let fault_rows: Vec<(&str, Cell<Report>)> = vec![
            (
                "refused allocations",
                fault_cell(|f| {
                    let (i, o) = (f.injected.alloc_failures, f.alloc_failures_observed);
                    format!("{i} / {o}")
                }),
            ),
            (
                "  of which OOM errors",
                fault_cell(|f| f.alloc_errors_returned.to_string()),
            ),
            (
                "failed submissions",
                fault_cell(|f| {
                    let i = f.injected.submission_failures;
                    format!("{i} / {}", f.submission_failures_observed)
                }),
            ),
            (
                "  reported on queue",
                fault_cell(|f| f.queue_reports.to_string()),
            ),
            (
                "device lost",
                fault_cell(|f| {
                    let yn = |b: bool| if b { "yes" } else { "no" };
                    format!(
                        "{} / {}",
                        yn(f.injected.device_lost),
                        yn(f.device_lost_observed)
                    )
                }),
            ),
            (
                "every fault reported",
                fault_cell(|f| if f.all_reported { "yes" } else { "NO" }.to_string()),
            ),
        ];
        print_rows(reports, &fault_rows);
    }
    for r in reports {
        if let Some(t) = &r.trend {
            println!(
                "{}: memory trend, {:.0} s intervals:",
                r.policy, t.interval_seconds
            );
            for p in &t.points {
                println!("  {}", trend::line(p));
            }
            println!("{}: {}", r.policy, trend::summary(t));
        }
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

/// `--size-classes`: 0 or a power of two up to 1024.
fn parse_size_classes(s: &str) -> Result<u64, String> {
    let n: u64 = s.parse().map_err(|e| format!("{e}"))?;
    if inflight::Config::valid_size_classes(n) {
        Ok(n)
    } else {
        Err("must be 0 or a power of two up to 1024".into())
    }
}
