//! The `repro` harness: the reference incident, reproducible.
//!
//! The workload that crashed MLX's Metal allocator: several request threads,
//! each looping: allocate a mix of buffers (log-uniform sizes, with a share of
//! large "KV snapshot" buffers), encode fills, adds, copies and checksums into
//! one command buffer, commit without waiting (the async-eval pattern), and
//! drop the handles at once. A small cache limit makes trimming fire
//! constantly. Every submission's checksums are checked against a CPU model
//! of the same arithmetic once it completes (at most `max_in_flight`
//! submissions per thread stay unchecked), so both hazards show: a release in
//! flight as a validation violation, a reuse in flight as a corrupted checksum.
//!
//! Under injected faults (`--faults`), errors that the faults explain are
//! expected: a refused allocation that ends in out-of-memory, a failed
//! submission (on its ticket, or reported at the next call on its queue), a
//! lost device (which ends the run). They are counted, compared with what the
//! backend injected, and the run goes on; checksums are checked only for
//! submissions that did not fail.
//!
//! Timed runs record the memory trend ([`crate::trend`]).
//!
//! The harness is generic over the backend; [`crate::backends`] builds one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inflight::backend::{Harness, Span};
use inflight::{Allocator, Buffer, Config, Error, Policy, PolicyKind, Queue, Stats, Ticket};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::backends::{InjectedFaults, Validator};
use crate::model::UniformChecksums;
use crate::snapshot::SnapshotRequest;
use crate::trace::Recorder;
use crate::trend::{Trend, TrendRecorder};

/// What one run does.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Request threads.
    pub threads: usize,
    /// Queues (streams); thread `t` submits to queue `t % queues`, and every
    /// few rounds also to the next queue, with buffers allocated for its own.
    pub queues: usize,
    /// Stop after this many buffer allocations in all (if no duration).
    pub allocations: u64,
    /// Stop after this long instead, if set.
    pub duration: Option<Duration>,
    /// Buffers allocated per round (rounded down to a multiple of 4).
    pub buffers_per_round: usize,
    /// Smallest buffer, bytes.
    pub min_size: u64,
    /// Largest buffer and KV-snapshot size, bytes.
    pub max_size: u64,
    /// Share of buffers that are KV snapshots (`max_size`).
    pub kv_share: f64,
    /// Bytes of each buffer the kernels touch (from its start).
    pub window: u64,
    /// Unchecked submissions a thread may have in flight.
    pub max_in_flight: usize,
    /// The allocator's settings (`--memory-limit` and the rest), its limits
    /// filled in ([`Workload::memory_limit`], [`Workload::cache_limit`]);
    /// each run sets its policy.
    pub config: Config,
    /// Lower the memory limit to 3/4 of the device's memory when above it
    /// (set when the limit was not given explicitly).
    pub cap_memory_to_device: bool,
    /// Seed of every random choice.
    pub seed: u64,
    /// The backend injects faults: errors they explain are counted, not fatal.
    pub faults: bool,
    /// Print each trend interval as it closes (timed runs).
    pub print_trend: bool,
}

/// `repro`'s memory limit where none is given (then lowered to 3/4 of the
/// device's memory where that is less).
pub const DEFAULT_MEMORY_LIMIT: u64 = 4 << 30;
/// `repro`'s cache limit where none is given: small, so that trimming
/// fires constantly.
pub const DEFAULT_CACHE_LIMIT: u64 = 256 << 20;

impl Workload {
    /// The memory limit asked for (a run may lower it to fit the device).
    pub fn memory_limit(&self) -> u64 {
        self.config.memory_limit.unwrap_or(DEFAULT_MEMORY_LIMIT)
    }

    /// The cache limit asked for (a run lowers it to its memory limit).
    pub fn cache_limit(&self) -> u64 {
        self.config.cache_limit.unwrap_or(DEFAULT_CACHE_LIMIT)
    }
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            threads: 4,
            queues: 2,
            allocations: 1_000_000,
            duration: None,
            buffers_per_round: 24,
            min_size: 4 << 10,
            max_size: 16 << 20,
            kv_share: 0.125,
            window: 16 << 10,
            max_in_flight: 8,
            config: Config::default()
                .with_memory_limit(DEFAULT_MEMORY_LIMIT)
                .with_cache_limit(DEFAULT_CACHE_LIMIT),
            cap_memory_to_device: true,
            seed: 1,
            faults: false,
            print_trend: false,
        }
    }
}

/// The outcome of one policy's run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub policy: PolicyKind,
    /// Which repetition of `repro --repeat` this run was (from 0).
    pub repetition: u32,
    pub backend: String,
    pub device: String,
    pub memory_limit: u64,
    pub threads: usize,
    pub queues: usize,
    pub rounds: u64,
    pub submissions: u64,
    pub allocations: u64,
    pub violations: u64,
    pub corruptions: u64,
    pub checked: u64,
    pub seconds: f64,
    pub first_violation_seconds: Option<f64>,
    pub first_corruption_seconds: Option<f64>,
    pub allocations_per_second: f64,
    pub rounds_per_second: f64,
    pub peak_active_bytes: u64,
    pub peak_reserved_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub hit_rate: f64,
    pub device_allocations: u64,
    pub device_releases: u64,
    pub deferred_frees: u64,
    pub waits: u64,
    pub trims: u64,
    pub errors: Vec<String>,
    pub stats_balanced: bool,
    /// Where a request thread's time went, per round.
    pub phases: Phases,
    pub stats: Stats,
    pub violation_messages: Vec<String>,
    /// On the simulated GPU: where its queues' time went.
    pub queues_time: Option<QueueShares>,
    /// Under injected faults: injected against observed.
    pub faults: Option<FaultReport>,
    /// Timed runs: the memory trend.
    pub trend: Option<Trend>,
}

/// Shares of the queues' wall time (queues × seconds) the simulated GPU
/// spent running submissions and stalled in device-side waits for another
/// queue; the rest it was idle. A run whose busy share is near 1 is bound by
/// the GPU, not by the allocator.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct QueueShares {
    pub busy: f64,
    pub stalled: f64,
}

/// Injected faults against what the allocator reported.
#[derive(Clone, Debug, Serialize)]
pub struct FaultReport {
    pub injected: InjectedFaults,
    /// Refused device allocations the allocator counted
    /// (`Stats::device_alloc_failures`); each was retried or returned.
    pub alloc_failures_observed: u64,
    /// Of those, calls that ended in an out-of-memory error.
    pub alloc_errors_returned: u64,
    /// Failed submissions whose ticket reported the failure.
    pub submission_failures_observed: u64,
    /// Failures reported again at the next call on their queue
    /// (`malloc`, `command_buffer`, `commit`, `wait_idle`).
    pub queue_reports: u64,
    /// Whether a call reported the device lost.
    pub device_lost_observed: bool,
    /// Every injected fault was reported.
    pub all_reported: bool,
}

/// Live counters, shared with the progress display.
#[derive(Default)]
pub struct Live {
    pub rounds: AtomicU64,
    pub allocations: AtomicU64,
    pub submissions: AtomicU64,
    pub corruptions: AtomicU64,
    pub checked: AtomicU64,
    pub stop: AtomicBool,
    /// Under faults: out-of-memory errors, failed submissions seen on their
    /// tickets, failures reported at a queue's next call, a lost device.
    pub alloc_errors: AtomicU64,
    pub failed_submissions: AtomicU64,
    pub queue_reports: AtomicU64,
    pub device_lost: AtomicBool,
    /// Where the request threads' time went, summed over threads.
    pub phases: PhaseClock,
}

/// Nanoseconds the request threads spent in each phase of a round, summed
/// over threads: where a policy's time goes.
#[derive(Default)]
pub struct PhaseClock {
    /// Allocating the round's buffers.
    pub malloc_ns: AtomicU64,
    /// Recording the commands and committing them.
    pub commit_ns: AtomicU64,
    /// Dropping the round's buffer handles (the frees).
    pub free_ns: AtomicU64,
    /// Waiting for the oldest submissions and checking their checksums.
    pub wait_ns: AtomicU64,
}

impl PhaseClock {
    fn add(counter: &AtomicU64, since: Instant) -> Instant {
        let now = Instant::now();
        counter.fetch_add((now - since).as_nanos() as u64, Ordering::Relaxed);
        now
    }

    /// Microseconds per round, by phase, over `rounds` rounds, with the
    /// allocator's backend time from `stats`.
    fn per_round(&self, rounds: u64, stats: &Stats) -> Phases {
        let per = |ns: u64| ns as f64 / 1e3 / rounds.max(1) as f64;
        let us = |c: &AtomicU64| per(c.load(Ordering::Relaxed));
        Phases {
            malloc_us: us(&self.malloc_ns),
            commit_us: us(&self.commit_ns),
            free_us: us(&self.free_ns),
            wait_us: us(&self.wait_ns),
            device_allocation_us: per(stats.device_allocation_ns),
            device_release_us: per(stats.device_release_ns),
            completion_query_us: per(stats.completion_query_ns),
        }
    }
}

/// Microseconds of one request thread's time per round, by phase (see
/// [`PhaseClock`]).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Phases {
    pub malloc_us: f64,
    pub commit_us: f64,
    pub free_us: f64,
    pub wait_us: f64,
    /// Of all phases: in the backend's device allocations, device releases
    /// and completion queries (`Stats::device_allocation_ns` and the rest).
    pub device_allocation_us: f64,
    pub device_release_us: f64,
    pub completion_query_us: f64,
}

/// One expected checksum of a submission.
struct Expect {
    slot: usize,
    value: u64,
}

struct InFlight<B: Harness> {
    ticket: Ticket<B>,
    expect: Vec<Expect>,
}

/// What one run records besides its report.
#[derive(Clone, Copy, Default)]
pub struct Outputs<'a> {
    /// The allocation events, as a trace (`--record`).
    pub recorder: Option<&'a Recorder>,
    /// The memory snapshot at the end (`--snapshot`).
    pub snapshot: Option<&'a SnapshotRequest>,
}

/// Runs the workload once under `policy` and reports.
pub fn run<B: Harness>(
    backend: B,
    validator: &dyn Validator,
    policy: Policy,
    w: &Workload,
    live: &Arc<Live>,
    outputs: Outputs<'_>,
    on_tick: &mut dyn FnMut(&Live, &Allocator<B>, u64),
) -> anyhow::Result<Report> {
    let recorder = outputs.recorder;
    let capacity = backend.info().memory_capacity;
    let memory_limit = if w.cap_memory_to_device {
        w.memory_limit().min(capacity / 4 * 3)
    } else {
        w.memory_limit()
    };
    let config = w
        .config
        .clone()
        .with_policy(policy)
        .with_memory_limit(memory_limit)
        .with_cache_limit(w.cache_limit().min(memory_limit));
    let alloc = Allocator::new(backend, config)?;
    if let Some(s) = outputs.snapshot {
        s.start(&alloc);
    }
    let queues: Vec<Queue<B>> = (0..w.queues.max(1))
        .map(|_| alloc.create_queue())
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    let first_violation: AtomicU64 = AtomicU64::new(u64::MAX);
    let first_corruption = AtomicU64::new(u64::MAX);
    let errors = parking_lot::Mutex::new(Vec::<String>::new());
    let mut trend = w.duration.map(TrendRecorder::new);

    std::thread::scope(|s| {
        for t in 0..w.threads.max(1) {
            let (alloc, queues, live) = (&alloc, &queues, live.clone());
            let (first_corruption, errors) = (&first_corruption, &errors);
            s.spawn(move || {
                let mut rng =
                    StdRng::seed_from_u64(w.seed.wrapping_mul(0x9E37_79B9).wrapping_add(t as u64));
                if let Err(e) = request_loop(
                    alloc,
                    queues,
                    t,
                    w,
                    &mut rng,
                    &live,
                    start,
                    first_corruption,
                    recorder,
                ) {
                    errors.lock().push(format!("thread {t}: {e}"));
                    live.stop.store(true, Ordering::Release);
                }
            });
        }
        // The watcher: progress, stop conditions, first violation time.
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let elapsed = start.elapsed();
            if validator.violations() > 0 && first_violation.load(Ordering::Relaxed) == u64::MAX {
                first_violation.store(elapsed.as_nanos() as u64, Ordering::Relaxed);
            }
            let allocs = live.allocations.load(Ordering::Relaxed);
            if let Some(t) = trend.as_mut() {
                if let Some(p) = t.sample(elapsed, &alloc.stats()) {
                    if w.print_trend {
                        eprintln!("{} trend {}", policy, crate::trend::line(&p));
                    }
                }
            }
            on_tick(live, &alloc, validator.violations());
            let done = match w.duration {
                Some(d) => elapsed >= d,
                None => allocs >= w.allocations,
            };
            if done {
                live.stop.store(true, Ordering::Release);
            }
            if live.stop.load(Ordering::Acquire) {
                break;
            }
        }
    });
    for q in &queues {
        // Under faults, a failure may still be waiting for its queue's next
        // call: this one. A lost device ends the wait.
        for _ in 0..3 {
            match q.wait_idle(Duration::from_secs(60)) {
                Ok(_) => break,
                Err(e) if w.faults && expected(&e, live) => {
                    if matches!(e, Error::DeviceLost(_)) {
                        break;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let queues_time = validator.queue_time().map(|(busy, stalled)| {
        let wall = seconds * queues.len() as f64;
        QueueShares {
            busy: busy.as_secs_f64() / wall,
            stalled: stalled.as_secs_f64() / wall,
        }
    });
    let violations = validator.violations();
    if violations > 0 && first_violation.load(Ordering::Relaxed) == u64::MAX {
        first_violation.store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    let stats = alloc.stats();
    if let Some(s) = outputs.snapshot {
        // After the statistics: taking the snapshot empties the front
        // caches and promotes completed frees.
        s.finish(&alloc)?;
    }
    if let Some(at) = validator.first_seen() {
        first_violation.store(at.as_nanos() as u64, Ordering::Relaxed);
    }
    let secs = |ns: u64| (ns != u64::MAX).then(|| ns as f64 / 1e9);
    let allocations = live.allocations.load(Ordering::Relaxed);
    let rounds = live.rounds.load(Ordering::Relaxed);
    let info = alloc.device_info().clone();
    let faults = validator.injected().map(|injected| {
        let observed_lost = live.device_lost.load(Ordering::Relaxed);
        let report = FaultReport {
            injected,
            alloc_failures_observed: stats.device_alloc_failures,
            alloc_errors_returned: live.alloc_errors.load(Ordering::Relaxed),
            submission_failures_observed: live.failed_submissions.load(Ordering::Relaxed),
            queue_reports: live.queue_reports.load(Ordering::Relaxed),
            device_lost_observed: observed_lost,
            all_reported: false,
        };
        // A lost device may leave failures unreported: the submissions
        // that would have reported them never complete. It also fails the
        // allocations made after it, beyond the injected refusals.
        let subs_ok = report.submission_failures_observed == injected.submission_failures;
        let allocs_ok = report.alloc_failures_observed == injected.alloc_failures
            || (injected.device_lost && report.alloc_failures_observed > injected.alloc_failures);
        FaultReport {
            all_reported: allocs_ok
                && (subs_ok || injected.device_lost)
                && observed_lost == injected.device_lost,
            ..report
        }
    });
    Ok(Report {
        policy: policy.kind(),
        repetition: 0,
        backend: info.backend.to_string(),
        device: info.name,
        memory_limit,
        threads: w.threads,
        queues: w.queues,
        rounds,
        submissions: live.submissions.load(Ordering::Relaxed),
        allocations,
        violations,
        corruptions: live.corruptions.load(Ordering::Relaxed),
        checked: live.checked.load(Ordering::Relaxed),
        seconds,
        first_violation_seconds: secs(first_violation.load(Ordering::Relaxed)),
        first_corruption_seconds: secs(first_corruption.load(Ordering::Relaxed)),
        allocations_per_second: allocations as f64 / seconds,
        rounds_per_second: rounds as f64 / seconds,
        peak_active_bytes: stats.peak_active_bytes,
        peak_reserved_bytes: stats.peak_reserved_bytes,
        cache_hits: stats.cache_hits,
        cache_misses: stats.cache_misses,
        hit_rate: stats.hit_rate(),
        device_allocations: stats.device_allocations,
        device_releases: stats.device_releases,
        deferred_frees: stats.deferred_frees,
        waits: stats.waits,
        trims: stats.trims,
        errors: errors.into_inner(),
        stats_balanced: stats.balanced(),
        phases: live.phases.per_round(rounds, &stats),
        stats,
        violation_messages: validator.messages().into_iter().take(5).collect(),
        queues_time,
        faults,
        trend: trend.map(|t| t.finish(w.memory_limit())),
    })
}

/// Draws a buffer size: a KV snapshot, or log-uniform in [min, max].
fn draw_size(rng: &mut StdRng, w: &Workload) -> u64 {
    if rng.random_bool(w.kv_share.clamp(0.0, 1.0)) {
        return w.max_size;
    }
    let (lo, hi) = (
        (w.min_size.max(4)) as f64,
        (w.max_size.max(w.min_size.max(4))) as f64,
    );
    let x = (lo.ln() + rng.random::<f64>() * (hi.ln() - lo.ln())).exp();
    (x as u64).clamp(w.min_size.max(4), w.max_size.max(4))
}

#[allow(clippy::too_many_arguments)]
fn request_loop<B: Harness>(
    alloc: &Allocator<B>,
    queues: &[Queue<B>],
    t: usize,
    w: &Workload,
    rng: &mut StdRng,
    live: &Live,
    start: Instant,
    first_corruption: &AtomicU64,
    recorder: Option<&Recorder>,
) -> anyhow::Result<()> {
    let (home_idx, other_idx) = (t % queues.len(), (t + 1) % queues.len());
    let (home, other) = (&queues[home_idx], &queues[other_idx]);
    let mut ids: Vec<u64> = Vec::new();
    let groups = (w.buffers_per_round / 4).max(1);
    let mut in_flight: VecDeque<InFlight<B>> = VecDeque::new();
    let mut model = UniformChecksums::default();
    let mut round = 0u64;
    while !live.stop.load(Ordering::Acquire) {
        // Every fourth round, the work goes to the next queue with buffers
        // allocated for this thread's own: a cross-queue use.
        let (q, q_idx) = if round % 4 == 3 {
            (other, other_idx)
        } else {
            (home, home_idx)
        };
        round += 1;
        live.rounds.fetch_add(1, Ordering::Relaxed);
        let queues = ((home, home_idx), (q, q_idx));
        let round_result = one_round(
            alloc, queues, groups, w, rng, live, &mut model, recorder, &mut ids,
        );
        let submitted = match round_result {
            Ok(f) => f,
            Err(e) if w.faults && expected(&e, live) => {
                if matches!(e, Error::DeviceLost(_)) {
                    break;
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        in_flight.push_back(submitted);
        let waiting = Instant::now();
        while in_flight.len() > w.max_in_flight {
            let f = in_flight.pop_front().expect("non-empty");
            if !check(f, w, live, start, first_corruption)? {
                in_flight.clear();
            }
        }
        PhaseClock::add(&live.phases.wait_ns, waiting);
    }
    while let Some(f) = in_flight.pop_front() {
        if !check(f, w, live, start, first_corruption)? {
            break;
        }
    }
    Ok(())
}

/// Whether an error is one that injected faults explain; counts it.
fn expected(e: &Error, live: &Live) -> bool {
    match e {
        Error::OutOfMemory { reason, .. } if reason.contains("refused") => {
            live.alloc_errors.fetch_add(1, Ordering::Relaxed);
            true
        }
        Error::SubmissionFailed { .. } => {
            live.queue_reports.fetch_add(1, Ordering::Relaxed);
            true
        }
        Error::DeviceLost(_) => {
            // Nothing more will complete: the run is over.
            live.device_lost.store(true, Ordering::Relaxed);
            live.stop.store(true, Ordering::Release);
            true
        }
        _ => false,
    }
}

/// One round: allocate on `home`, record, commit on `q`, drop the handles.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn one_round<B: Harness>(
    alloc: &Allocator<B>,
    ((home, home_idx), (q, q_idx)): ((&Queue<B>, usize), (&Queue<B>, usize)),
    groups: usize,
    w: &Workload,
    rng: &mut StdRng,
    live: &Live,
    model: &mut UniformChecksums,
    recorder: Option<&Recorder>,
    ids: &mut Vec<u64>,
) -> Result<InFlight<B>, Error> {
    let clock = &live.phases;
    let t = Instant::now();
    let mut bufs: Vec<Buffer<B>> = Vec::with_capacity(groups * 4);
    for _ in 0..groups * 4 {
        bufs.push(alloc.malloc(draw_size(rng, w), home)?);
    }
    let t = PhaseClock::add(&clock.malloc_ns, t);
    if let Some(rec) = recorder {
        // The round's allocs under one lock: fewer lock round trips.
        ids.clear();
        ids.extend(bufs.iter().map(|_| rec.next_id()));
        rec.alloc_all(ids, bufs.iter().map(|b| b.len()), home_idx);
    }
    live.allocations
        .fetch_add(bufs.len() as u64, Ordering::Relaxed);
    let mut record_and_commit = || -> Result<InFlight<B>, Error> {
        let mut cb = q.command_buffer()?;
        let mut expect = Vec::with_capacity(groups);
        for g in bufs.chunks_exact(4) {
            let [a, b, c, d] = g else { unreachable!() };
            let len = [a, b, c, d]
                .iter()
                .map(|x| x.len())
                .min()
                .unwrap_or(4)
                .min(w.window)
                & !3;
            let span = Span::prefix(len.max(4));
            let (p, r) = (rng.random::<u32>(), rng.random::<u32>());
            cb.fill_span(a, span, p)?;
            cb.fill_span(b, span, r)?;
            cb.add_span(a, b, c, span)?;
            cb.copy_span(c, d, span)?;
            let slot = cb.checksum_span(d, span)?;
            expect.push(Expect {
                slot,
                value: model.get(p.wrapping_add(r), span.words()),
            });
        }
        let ticket = cb.commit()?;
        live.submissions.fetch_add(1, Ordering::Relaxed);
        Ok(InFlight { ticket, expect })
    };
    let result = record_and_commit();
    let t = PhaseClock::add(&clock.commit_ns, t);
    if let Some(rec) = recorder {
        // Each buffer is bound once; uses and commit go in under one
        // lock, so the trace's submission is this one. A round that failed
        // (under injected faults) records only its frees.
        if result.is_ok() {
            rec.use_all_and_commit(ids, q_idx);
        }
        rec.free_all(ids);
    }
    drop(bufs); // the async-eval pattern: handles go while the GPU works
    PhaseClock::add(&clock.free_ns, t);
    result
}

/// Waits for a submission and compares its checksums with the model.
/// Returns false if the device is lost (nothing more will complete).
fn check<B: Harness>(
    f: InFlight<B>,
    w: &Workload,
    live: &Live,
    start: Instant,
    first: &AtomicU64,
) -> anyhow::Result<bool> {
    let status = f.ticket.wait(Duration::from_secs(60)).and_then(|done| {
        if done {
            f.ticket.checksums().map(Some)
        } else {
            Ok(None)
        }
    });
    let sums = match status {
        Ok(Some(sums)) => sums,
        Ok(None) => anyhow::bail!("submission {} did not complete in 60 s", f.ticket.value()),
        // Its own failure, on its ticket: its results are undefined.
        Err(Error::SubmissionFailed { value, .. }) if w.faults && value == f.ticket.value() => {
            live.failed_submissions.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        Err(e @ Error::DeviceLost(_)) if w.faults => {
            expected(&e, live);
            return Ok(false);
        }
        Err(e) => return Err(e.into()),
    };
    for e in &f.expect {
        live.checked.fetch_add(1, Ordering::Relaxed);
        if sums.get(e.slot) != Some(&e.value) {
            live.corruptions.fetch_add(1, Ordering::Relaxed);
            let _ = first.compare_exchange(
                u64::MAX,
                start.elapsed().as_nanos() as u64,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }
    Ok(true)
}
