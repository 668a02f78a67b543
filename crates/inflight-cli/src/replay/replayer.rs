//! The replayer: runs a checked [`Trace`] through the allocator, one event
//! after another on one thread, as fast as the host goes, and reports what
//! the allocator did ([`ReplayReport`]). Generic over the backend;
//! [`crate::backends`] builds one. `replay` and `plot` both run it.
//!
//! Each `use` records a fill of the buffer's first few bytes into its
//! stream's open submission, so the buffer is stamped and the validation
//! layer (where the backend has one) watches it; `commit` submits it. A
//! commit's `gpu_us`, on the simulated GPU, is honoured by padding the
//! submission with fills over its largest bound buffer until its simulated
//! cost reaches that time.
//!
//! A trace without `use` and `commit` events (an allocation log, as
//! PyTorch's memory snapshots give) is replayed on stream-ordered queues
//! ([`Allocator::adopt_queue`]), as the program that recorded it ran: each
//! buffer is used on its stream from its allocation to its free, and its
//! free is stream-ordered. Every stream commits an empty submission every
//! `commit_every` events, the program's kernels' share of the timeline.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use inflight::backend::{Harness, Span};
use inflight::{Allocator, Buffer, CommandBuffer, Config, Policy, PolicyKind, Queue, Ticket};
use serde::Serialize;

use crate::backends::Validator;
use crate::snapshot::SnapshotRequest;
use crate::trace::{Event, Trace};

/// Bytes each `use` fills (fewer if the buffer is smaller).
pub const USE_BYTES: u64 = 64;
/// The most padding fills one `gpu_us` adds.
const MAX_PAD_OPS: u32 = 1 << 16;

/// The simulated GPU's cost model, for honouring `gpu_us`.
#[derive(Copy, Clone, Debug)]
pub struct SimCost {
    pub op_ns: f64,
    pub ns_per_kib: f64,
    pub submit_ns: f64,
}

/// How to replay.
#[derive(Clone, Debug)]
pub struct ReplaySettings {
    /// Without use/commit events: commit every stream's open submission
    /// after this many events.
    pub commit_every: u64,
    /// The allocator's settings, the memory limit filled in; each run sets
    /// its policy.
    pub config: Config,
    /// The simulated GPU's costs, where the backend is the simulated GPU.
    pub sim_cost: Option<SimCost>,
    /// Submissions a stream may have in flight before replay waits for
    /// its oldest (as a runtime waits for results); 0: no limit.
    pub max_in_flight: usize,
    /// How long to wait for a submission, or the queues at the end.
    pub drain_timeout: Duration,
}

/// What one policy's replay did.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    pub policy: PolicyKind,
    pub backend: String,
    pub device: String,
    /// Events replayed (meta lines excluded).
    pub events: u64,
    pub allocations: u64,
    pub frees: u64,
    pub uses: u64,
    /// Submissions made: the trace's commits, or, without them, the
    /// `--commit-every` ones (plus the final commits of open submissions).
    pub submissions: u64,
    /// Whether buffers were bound at allocation (no use/commit events).
    pub implicit_submissions: bool,
    /// Padding fills added to honour `gpu_us`.
    pub padding_ops: u64,
    /// Times replay waited for a stream's oldest submission
    /// (`--max-in-flight`).
    pub in_flight_waits: u64,
    /// Wall time from the first event until every queue was idle.
    pub seconds: f64,
    pub events_per_second: f64,
    /// The highest sum of requested sizes of live trace buffers (a
    /// property of the trace).
    pub peak_requested_bytes: u64,
    /// The highest bytes in live buffers as the allocator counts them:
    /// requests rounded to their blocks (`Stats::peak_active_bytes`; with
    /// front caches on, it may exceed the true peak by the bytes they held
    /// at that moment).
    pub peak_live_bytes: u64,
    /// The highest bytes the allocator held from the device.
    pub peak_reserved_bytes: u64,
    /// peak_reserved_bytes / peak_requested_bytes: rounding, caching and
    /// fragmentation together.
    pub reserved_to_live: f64,
    /// The most segments held at once (device allocations and growable
    /// ranges).
    pub peak_segments: u64,
    /// Blocks split off larger free blocks, and free blocks merged with a
    /// free neighbour.
    pub splits: u64,
    pub merges: u64,
    /// Page runs mapped into and unmapped from growable segments.
    pub pages_mapped: u64,
    pub pages_unmapped: u64,
    /// Free bytes trimming could give back at the end (whole free segments
    /// and pages).
    pub releasable_bytes: u64,
    pub device_allocations: u64,
    pub device_releases: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub hit_rate: f64,
    pub deferred_frees: u64,
    pub waits: u64,
    pub trims: u64,
    pub oom_errors: u64,
    pub violations: u64,
    pub stats_balanced: bool,
    /// The process's peak resident set so far (Linux), bytes.
    pub host_peak_rss_bytes: Option<u64>,
    pub violation_messages: Vec<String>,
}

/// One stream's open submission.
struct Open<B: Harness> {
    cb: CommandBuffer<B>,
    /// Simulated cost recorded so far, ns.
    cost_ns: f64,
    /// The largest buffer bound, for padding.
    largest: Option<Buffer<B>>,
}

struct Replayer<'a, B: Harness> {
    alloc: &'a Allocator<B>,
    queues: &'a [Queue<B>],
    open: Vec<Option<Open<B>>>,
    settings: &'a ReplaySettings,
    max_op_span: u64,
    submissions: u64,
    padding_ops: u64,
    in_flight: Vec<VecDeque<Ticket<B>>>,
    in_flight_waits: u64,
}

impl<B: Harness> Replayer<'_, B> {
    fn bind(&mut self, stream: usize, buf: &Buffer<B>) -> anyhow::Result<()> {
        let len = buf.len().min(USE_BYTES) & !3;
        if len == 0 {
            return Ok(()); // under 4 bytes: nothing a 32-bit op can touch
        }
        let open = match &mut self.open[stream] {
            Some(o) => o,
            slot => slot.insert(Open {
                cb: self.queues[stream].command_buffer()?,
                cost_ns: 0.0,
                largest: None,
            }),
        };
        open.cb.fill_span(buf, Span::prefix(len), 0)?;
        if let Some(c) = &self.settings.sim_cost {
            open.cost_ns += c.op_ns + len as f64 / 1024.0 * c.ns_per_kib;
            if open.largest.as_ref().is_none_or(|l| l.len() < buf.len()) {
                open.largest = Some(buf.clone());
            }
        }
        Ok(())
    }

    fn commit(&mut self, stream: usize, gpu_us: Option<f64>) -> anyhow::Result<()> {
        let mut open = match self.open[stream].take() {
            Some(o) => o,
            None => Open {
                cb: self.queues[stream].command_buffer()?,
                cost_ns: 0.0,
                largest: None,
            },
        };
        if let (Some(g), Some(c), Some(big)) = (gpu_us, self.settings.sim_cost, &open.largest) {
            let mut left = g * 1000.0 - c.submit_ns - open.cost_ns;
            let full = big.len().min(self.max_op_span) & !3;
            let mut n = 0;
            while left > c.op_ns && n < MAX_PAD_OPS && full >= 4 {
                let want = if c.ns_per_kib > 0.0 {
                    ((left - c.op_ns) / c.ns_per_kib * 1024.0) as u64
                } else {
                    full
                };
                let len = want.min(full).max(4) & !3;
                open.cb.fill_span(big, Span::prefix(len), 0)?;
                left -= c.op_ns + len as f64 / 1024.0 * c.ns_per_kib;
                n += 1;
            }
            self.padding_ops += u64::from(n);
        }
        drop(open.largest);
        let ticket = open.cb.commit()?;
        self.submissions += 1;
        let max = self.settings.max_in_flight;
        if max > 0 {
            let q = &mut self.in_flight[stream];
            q.push_back(ticket);
            while q.len() > max {
                let oldest = q.pop_front().expect("non-empty");
                if !oldest.is_complete()? {
                    self.in_flight_waits += 1;
                    if !oldest.wait(self.settings.drain_timeout)? {
                        anyhow::bail!(
                            "submission {} did not complete within {:?}",
                            oldest.value(),
                            self.settings.drain_timeout
                        );
                    }
                }
            }
        }
        Ok(())
    }

    fn commit_all(&mut self) -> anyhow::Result<()> {
        for s in 0..self.open.len() {
            if self.open[s].is_some() {
                self.commit(s, None)?;
            }
        }
        Ok(())
    }
}

/// Replays `trace` once under `policy`, calling `tap` after each event with its index and the
/// allocator: for progress, and for `plot` to sample the statistics. With
/// `snapshot`, records the allocator's history from the start and writes
/// its memory snapshot at the end.
pub fn run_with_tap<B: Harness>(
    backend: B,
    validator: &dyn Validator,
    policy: Policy,
    trace: &Trace,
    settings: &ReplaySettings,
    snapshot: Option<&SnapshotRequest>,
    tap: &mut dyn FnMut(usize, &Allocator<B>),
) -> anyhow::Result<ReplayReport> {
    let alloc = Allocator::new(backend, settings.config.clone().with_policy(policy))?;
    if let Some(s) = snapshot {
        s.start(&alloc);
    }
    let implicit = !trace.explicit_submissions;
    let queues: Vec<Queue<B>> = (0..trace.streams.len())
        .map(|_| {
            if implicit {
                alloc.adopt_queue(alloc.backend().create_queue()?)
            } else {
                alloc.create_queue()
            }
        })
        .collect::<Result<_, _>>()?;
    let info = alloc.device_info().clone();
    let mut r = Replayer {
        alloc: &alloc,
        queues: &queues,
        open: (0..queues.len()).map(|_| None).collect(),
        settings,
        max_op_span: info.max_op_span,
        submissions: 0,
        padding_ops: 0,
        in_flight: (0..queues.len()).map(|_| VecDeque::new()).collect(),
        in_flight_waits: 0,
    };
    let mut live: Vec<Option<Buffer<B>>> = (0..trace.slots).map(|_| None).collect();
    let every = settings.commit_every.max(1);
    let start = Instant::now();
    for (i, ev) in trace.events.iter().enumerate() {
        let line = trace.lines[i];
        let result: anyhow::Result<()> = (|| {
            match *ev {
                Event::Alloc {
                    slot,
                    bytes,
                    stream,
                } => {
                    // On a stream-ordered queue (implicit uses), used on its
                    // stream until its free.
                    let b = r.alloc.malloc(bytes, &r.queues[stream as usize])?;
                    live[slot as usize] = Some(b);
                }
                Event::Free { slot } => live[slot as usize] = None,
                Event::Use { slot, stream } => {
                    let b = live[slot as usize]
                        .as_ref()
                        .ok_or_else(|| anyhow::anyhow!("slot {slot} is empty"))?;
                    r.bind(stream as usize, b)?;
                }
                Event::Commit { stream, gpu_us } => r.commit(stream as usize, gpu_us)?,
            }
            if implicit && (i as u64 + 1) % every == 0 {
                for s in 0..r.queues.len() {
                    r.commit(s, None)?;
                }
            }
            Ok(())
        })();
        result.map_err(|e| e.context(format!("replaying line {line}")))?;
        tap(i, &alloc);
    }
    r.commit_all()?;
    let (submissions, padding_ops, in_flight_waits) =
        (r.submissions, r.padding_ops, r.in_flight_waits);
    drop(r);
    drop(live);
    for (s, q) in queues.iter().enumerate() {
        if !q.wait_idle(settings.drain_timeout)? {
            anyhow::bail!(
                "stream {} did not drain within {:?}",
                s,
                settings.drain_timeout
            );
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let stats = alloc.stats();
    if let Some(s) = snapshot {
        // After the statistics: taking the snapshot empties the front
        // caches and promotes completed frees.
        s.finish(&alloc)?;
    }
    let events = trace.events.len() as u64;
    let ratio = if trace.peak_live_bytes == 0 {
        0.0
    } else {
        stats.peak_reserved_bytes as f64 / trace.peak_live_bytes as f64
    };
    Ok(ReplayReport {
        policy: policy.kind(),
        backend: info.backend.to_string(),
        device: info.name,
        events,
        allocations: trace.allocations,
        frees: trace.frees,
        uses: if implicit {
            trace.allocations
        } else {
            trace.uses
        },
        submissions,
        implicit_submissions: implicit,
        padding_ops,
        in_flight_waits,
        seconds,
        events_per_second: events as f64 / seconds.max(1e-9),
        peak_requested_bytes: trace.peak_live_bytes,
        peak_live_bytes: stats.peak_active_bytes,
        peak_reserved_bytes: stats.peak_reserved_bytes,
        reserved_to_live: ratio,
        peak_segments: stats.peak_segments,
        splits: stats.splits,
        merges: stats.merges,
        pages_mapped: stats.pages_mapped,
        pages_unmapped: stats.pages_unmapped,
        releasable_bytes: stats.releasable_bytes,
        device_allocations: stats.device_allocations,
        device_releases: stats.device_releases,
        cache_hits: stats.cache_hits,
        cache_misses: stats.cache_misses,
        hit_rate: stats.hit_rate(),
        deferred_frees: stats.deferred_frees,
        waits: stats.waits,
        trims: stats.trims,
        oom_errors: stats.oom_errors,
        violations: validator.violations(),
        stats_balanced: stats.balanced(),
        host_peak_rss_bytes: host_peak_rss(),
        violation_messages: validator.messages().into_iter().take(5).collect(),
    })
}

/// VmHWM from /proc/self/status, where there is one.
fn host_peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
