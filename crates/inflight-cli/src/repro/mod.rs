//! `inflight repro`: the MLX incident as a harness, run under each release
//! policy on any backend. This file holds the command (its arguments, and
//! running each policy, or each repetition, on a fresh backend);
//! [`harness`] the workload itself; `print.rs` the table.
//!
//! `--record FILE` writes the run's allocation events as a trace
//! ([`crate::trace`]); `--snapshot FILE` a memory snapshot at its end
//! ([`crate::snapshot`]).

mod harness;
mod print;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use inflight::{Allocator, Harness, Policy, PolicyKind};

pub use self::harness::{FaultReport, Live, Report, Workload};
use crate::args::{check_limits, parse_rate, policies, ConfigArgs, PolicyArg, SnapshotArgs};
use crate::backends::{
    with_backend, BackendJob, BackendName, BackendOptions, SimOptions, Validator,
};
use crate::progress::{Goal, Progress};
use crate::snapshot::SnapshotRequest;
use crate::trace::Recorder;
use crate::units::{parse_bytes, parse_duration};

#[derive(clap::Args)]
pub struct ReproArgs {
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
    #[command(flatten)]
    snapshot: SnapshotArgs,
    #[command(flatten)]
    config: ConfigArgs,
}

/// One policy's run on a backend built by [`with_backend`].
struct ReproJob<'a> {
    policy: Policy,
    workload: &'a Workload,
    quiet: bool,
    recorder: Option<&'a Recorder>,
    snapshot: Option<&'a SnapshotRequest>,
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
        let outputs = harness::Outputs {
            recorder: self.recorder,
            snapshot: self.snapshot,
        };
        let report = harness::run(
            backend,
            validator,
            self.policy,
            w,
            &live,
            outputs,
            &mut tick,
        );
        progress.finish();
        report
    }
}

/// `inflight repro`: exit status 1 if a safe policy showed a violation,
/// a corrupted checksum, an error or unbalanced statistics.
pub fn command(a: ReproArgs) -> anyhow::Result<ExitCode> {
    if a.min_size == 0 || a.min_size > a.max_size {
        anyhow::bail!("--min-size must be above 0 and at most --max-size");
    }
    if a.window < 4 {
        anyhow::bail!("--window must be at least 4 bytes");
    }
    if (a.faults > 0.0 || a.lose_device_after.is_some()) && a.backend != BackendName::Sim {
        anyhow::bail!("--faults and --lose-device-after inject faults into --backend sim only");
    }
    let config = a.config.config(Policy::DEFERRED);
    check_limits(&config)?;
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
        cap_memory_to_device: config.memory_limit.is_none(),
        config,
        seed: a.seed,
        faults: a.faults > 0.0 || a.lose_device_after.is_some(),
        print_trend: a.trend,
        ..Workload::default()
    };
    if a.record.is_some() && (a.policy == PolicyArg::All || a.repeat > 1) {
        anyhow::bail!("--record writes one run: name one --policy, without --repeat");
    }
    if a.snapshot.snapshot.is_some() && a.repeat > 1 {
        anyhow::bail!("--snapshot writes one file per policy: without --repeat");
    }
    let policies = policies(a.policy);
    let snapshots = policies
        .iter()
        .map(|p| a.snapshot.request(p.kind(), &policies))
        .collect::<anyhow::Result<Vec<_>>>()?;
    a.snapshot.announce()?;
    let recorder = match &a.record {
        Some(path) => Some(Recorder::create(
            path,
            &format!(
                r#""source":"inflight repro","policy":"{}","threads":{},"queues":{},"cache_limit":{},"memory_limit":{},"seed":{}"#,
                policies[0],
                workload.threads,
                workload.queues,
                workload.cache_limit(),
                workload.memory_limit(),
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
        let mut order: Vec<usize> = (0..policies.len()).collect();
        let turn = rep as usize % order.len();
        order.rotate_left(turn);
        let mut round = Vec::new();
        for i in order {
            let job = ReproJob {
                policy: policies[i],
                workload: &workload,
                quiet: a.quiet || a.json,
                recorder: recorder.as_ref(),
                snapshot: snapshots[i].as_ref(),
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
            print::table(&round, &workload);
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
        print::repeat_summary(&reports, &policies);
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
