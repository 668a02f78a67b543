//! `repro`'s table (one column per policy, [`crate::table`]) and, after
//! `--repeat N`, the summary of medians and paired ratios.

use inflight::{Policy, PolicyKind};

use super::{FaultReport, Report, Workload};
use crate::bench::Timing;
use crate::table::{print_columns, print_rows, yes_no, Cell};
use crate::trend;
use crate::units::fmt_bytes;

/// After `repro --repeat N`: each policy's median rate and peak reserved
/// memory, and deferred's rate over the others' from the same repetition.
pub fn repeat_summary(reports: &[Report], policies: &[Policy]) {
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
        let t = Timing::from_batches(v);
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

/// A cell of the injected-faults rows: `f` of the report's faults, `-`
/// where none were injected.
fn fault_cell(f: fn(&FaultReport) -> String) -> Cell<Report> {
    Box::new(move |r| r.faults.as_ref().map_or("-".into(), f))
}

/// One column per policy: what it did, how fast, the memory it held,
/// where a request thread's time went, the injected faults, the trend.
pub fn table(reports: &[Report], w: &Workload) {
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
        fmt_bytes(w.cache_limit()),
        fmt_bytes(first.memory_limit),
        w.seed
    );
    let secs = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{s:.2} s"));
    let share = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{:.1}%", 100.0 * x));
    let rows: Vec<(&str, Cell<Report>)> = vec![
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
            "peak segments",
            Box::new(|r| r.stats.peak_segments.to_string()),
        ),
        (
            "releasable at end",
            Box::new(|r| fmt_bytes(r.stats.releasable_bytes)),
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
        (
            "  pages mapped",
            Box::new(|r| r.stats.pages_mapped.to_string()),
        ),
        (
            "  pages unmapped",
            Box::new(|r| r.stats.pages_unmapped.to_string()),
        ),
        ("block splits", Box::new(|r| r.stats.splits.to_string())),
        ("block merges", Box::new(|r| r.stats.merges.to_string())),
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
        ("statistics balance", Box::new(|r| yes_no(r.stats_balanced))),
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
