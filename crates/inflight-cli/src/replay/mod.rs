//! `inflight replay`: a trace (docs/TRACE.md) through the allocator under
//! each release policy, with a table of what each did. This file holds the
//! command, the arguments it shares with `plot` ([`RunArgs`]) and its
//! table; [`replayer`] runs one policy's replay.
//!
//! `--snapshot FILE` writes each policy's memory snapshot at the end of its
//! replay ([`crate::snapshot`]).

pub mod replayer;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use inflight::{Harness, Policy, PolicyKind};

pub use self::replayer::{run_with_tap, ReplayReport, ReplaySettings, SimCost};
use crate::args::{check_limits, policies, ConfigArgs, PolicyArg, SnapshotArgs};
use crate::backends::{
    sim_config, with_backend, BackendJob, BackendName, BackendOptions, SimOptions, Validator,
};
use crate::progress::Steps;
use crate::snapshot::SnapshotRequest;
use crate::table::{print_columns, yes_no, Cell};
use crate::trace::Trace;
use crate::units::fmt_bytes;

/// The memory limit of `replay` and `plot` where none is given; the
/// simulated GPU then has that much memory, and a sixteenth more for
/// rounding.
pub const DEFAULT_MEMORY_LIMIT: u64 = 64 << 30;

/// How `replay` and `plot` run a trace.
#[derive(clap::Args)]
pub struct RunArgs {
    /// The GPU backend.
    #[arg(long, value_enum, default_value_t = BackendName::Sim)]
    pub backend: BackendName,
    /// The release policy, or `all` for the three side by side.
    #[arg(long, value_enum, default_value_t = PolicyArg::All)]
    pub policy: PolicyArg,
    /// Without use/commit events in the trace: bind each buffer to its
    /// stream's open submission at allocation and commit every stream's
    /// open submission after this many events.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub commit_every: u64,
    /// Submissions a stream may have in flight before replay waits for its
    /// oldest, as a runtime that reads results does; 0 for no limit (the
    /// host then runs as far ahead of the GPU as memory allows).
    #[arg(long, default_value_t = 16)]
    pub max_in_flight: usize,
    /// Seed of the simulated GPU.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl RunArgs {
    /// The backend's options and the replay's settings, with the
    /// allocator's `config`; `accounting`: no host memory behind the
    /// simulated GPU's buffers.
    pub fn setup(
        &self,
        config: &ConfigArgs,
        accounting: bool,
    ) -> anyhow::Result<(BackendOptions, ReplaySettings)> {
        let mut config = config.config(Policy::DEFERRED);
        let memory_limit = *config.memory_limit.get_or_insert(DEFAULT_MEMORY_LIMIT);
        check_limits(&config)?;
        let opts = BackendOptions {
            seed: self.seed,
            abort_on_violation: false,
            sim: SimOptions {
                accounting,
                // Room for the limit, with a little over for rounding.
                memory_capacity: Some(memory_limit.saturating_add(memory_limit / 16)),
                // Deterministic pacing: a commit's gpu_us is its simulated time.
                jitter: Some(0.0),
                ..SimOptions::default()
            },
        };
        let sim_cost = (self.backend == BackendName::Sim).then(|| {
            let c = sim_config(&opts);
            SimCost {
                op_ns: c.op_cost.as_nanos() as f64,
                ns_per_kib: c.ns_per_kib,
                submit_ns: c.submit_cost.as_nanos() as f64,
            }
        });
        let settings = ReplaySettings {
            commit_every: self.commit_every,
            config,
            sim_cost,
            max_in_flight: self.max_in_flight,
            drain_timeout: Duration::from_secs(600),
        };
        Ok((opts, settings))
    }
}

#[derive(clap::Args)]
pub struct ReplayArgs {
    /// The trace: JSON Lines, one event per line (docs/TRACE.md),
    /// gzip-compressed or not.
    file: PathBuf,
    #[command(flatten)]
    run: RunArgs,
    /// Simulated GPU only: back buffers with host memory and perform every
    /// operation, instead of accounting sizes only.
    #[arg(long)]
    host_backing: bool,
    /// Print one JSON object per policy instead of the table.
    #[arg(long)]
    json: bool,
    /// No progress display.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    snapshot: SnapshotArgs,
    #[command(flatten)]
    config: ConfigArgs,
}

/// One policy's replay on a backend built by [`with_backend`].
struct ReplayJob<'a> {
    policy: Policy,
    trace: &'a Trace,
    settings: &'a ReplaySettings,
    snapshot: Option<&'a SnapshotRequest>,
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
        let mut steps = Steps::new(&self.policy.to_string(), "events", n, self.quiet);
        let report = run_with_tap(
            backend,
            validator,
            self.policy,
            self.trace,
            self.settings,
            self.snapshot,
            &mut |i, _| steps.set(i as u64 + 1),
        );
        steps.finish();
        report
    }
}

/// `inflight replay`: exit status 1 if a safe policy showed a violation.
pub fn command(a: ReplayArgs) -> anyhow::Result<ExitCode> {
    let (opts, settings) = a.run.setup(&a.config, !a.host_backing)?;
    let policies = policies(a.run.policy);
    let snapshots = policies
        .iter()
        .map(|p| a.snapshot.request(p.kind(), &policies))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let trace = crate::trace::load(&a.file)?;
    a.snapshot.announce()?;
    let mut reports = Vec::new();
    for (policy, snapshot) in policies.into_iter().zip(&snapshots) {
        let job = ReplayJob {
            policy,
            trace: &trace,
            settings: &settings,
            snapshot: snapshot.as_ref(),
            quiet: a.quiet || a.json,
        };
        let report = with_backend(a.run.backend, &opts, job)?;
        if a.json {
            println!("{}", serde_json::to_string(&report)?);
        }
        reports.push(report);
    }
    if !a.json {
        print_table(&reports, &a, &settings, &trace);
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

/// One column per policy: throughput, the memory (requested by the trace,
/// live as the allocator rounds it, reserved), the segments, the cache.
fn print_table(reports: &[ReplayReport], a: &ReplayArgs, s: &ReplaySettings, trace: &Trace) {
    let Some(first) = reports.first() else { return };
    println!(
        "inflight replay of {} on {} ({}): {} events, {} streams, {}; memory limit {}, cache limit {}, max in flight {}",
        a.file.display(),
        first.backend,
        first.device,
        trace.events.len(),
        trace.streams.len(),
        if first.implicit_submissions {
            format!("no use/commit events: bound at allocation, committed every {} events", s.commit_every)
        } else {
            "submissions as in the trace".to_string()
        },
        fmt_bytes(s.config.memory_limit.unwrap_or(DEFAULT_MEMORY_LIMIT)),
        s.config.cache_limit.map_or("= memory limit".to_string(), fmt_bytes),
        if s.max_in_flight == 0 {
            "unlimited".to_string()
        } else {
            format!("{} per stream", s.max_in_flight)
        },
    );
    let rows: Vec<(&str, Cell<ReplayReport>)> = vec![
        ("events", Box::new(|r| r.events.to_string())),
        ("submissions", Box::new(|r| r.submissions.to_string())),
        ("seconds", Box::new(|r| format!("{:.2}", r.seconds))),
        (
            "events/s",
            Box::new(|r| format!("{:.0}", r.events_per_second)),
        ),
        (
            "peak requested",
            Box::new(|r| fmt_bytes(r.peak_requested_bytes)),
        ),
        (
            "peak live (rounded)",
            Box::new(|r| fmt_bytes(r.peak_live_bytes)),
        ),
        (
            "peak reserved",
            Box::new(|r| fmt_bytes(r.peak_reserved_bytes)),
        ),
        (
            "reserved / requested",
            Box::new(|r| format!("{:.3}", r.reserved_to_live)),
        ),
        (
            "releasable at end",
            Box::new(|r| fmt_bytes(r.releasable_bytes)),
        ),
        ("peak segments", Box::new(|r| r.peak_segments.to_string())),
        (
            "device allocations",
            Box::new(|r| r.device_allocations.to_string()),
        ),
        ("  pages mapped", Box::new(|r| r.pages_mapped.to_string())),
        (
            "  pages unmapped",
            Box::new(|r| r.pages_unmapped.to_string()),
        ),
        ("block splits", Box::new(|r| r.splits.to_string())),
        ("block merges", Box::new(|r| r.merges.to_string())),
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
        ("statistics balance", Box::new(|r| yes_no(r.stats_balanced))),
    ];
    print_columns(reports.iter().map(|r| r.policy.to_string()), reports, &rows);
    for r in reports {
        if let Some(m) = r.violation_messages.first() {
            println!("{}: first violation: {m}", r.policy);
        }
    }
}
