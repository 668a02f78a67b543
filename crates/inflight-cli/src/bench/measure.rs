//! How `bench` measures one allocator: the [`Subject`] trait every row's
//! allocator implements (inflight's, and with CUDA the driver's), the
//! batches of one sequence ([`measure`]), and the [`Row`] each sequence
//! gives.

use std::hint::black_box;
use std::time::Instant;

use inflight::{Allocator, Config, Harness, Queue};
use serde::Serialize;

use super::sequences::{Mixed, Timing};
use crate::backends::{BackendJob, Validator};

/// What every row runs.
pub struct Plan {
    pub pairs: u64,
    pub batches: u32,
    pub pair_sizes: Vec<u64>,
    pub mixed: Mixed,
    /// Pairs a batch for `cuMemAlloc` (CUDA builds only).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub driver_ops: u64,
}

/// One (allocator, sequence) result: the JSON object and a table row.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub allocator: String,
    pub backend: String,
    pub device: String,
    /// `pair-1KiB`, …, or `mixed`.
    pub sequence: String,
    /// The pair size; `null` for the mixed workload.
    pub bytes: Option<u64>,
    pub seed: u64,
    /// Checksum of the mixed workload's sizes and slots (hex).
    pub size_checksum: String,
    /// Pairs per timed batch (after warm-up batches of as many).
    pub ops_per_batch: u64,
    pub batches: u32,
    #[serde(flatten)]
    pub timing: Timing,
    /// Device allocations made over the sequence (warm-up included), where known.
    pub device_allocations: Option<u64>,
    /// Most bytes held from the device, where known.
    pub peak_reserved_bytes: Option<u64>,
    /// Most bytes in live buffers as the allocator counts them (rounded), where known.
    pub peak_live_bytes: Option<u64>,
    /// Most bytes requested and live at once (the sequence's own figure).
    pub peak_requested_bytes: u64,
}

/// What an allocator reports over one sequence.
#[derive(Default)]
struct Figures {
    device_allocations: Option<u64>,
    peak_reserved: Option<u64>,
    peak_live: Option<u64>,
}

/// An allocator under test.
trait Subject {
    type Handle;
    fn alloc(&mut self, bytes: u64) -> anyhow::Result<Self::Handle>;
    fn free(&mut self, h: Self::Handle) -> anyhow::Result<()>;
    /// Empties caches and resets peaks and counts before a sequence.
    fn begin(&mut self) -> anyhow::Result<()>;
    /// The figures since `begin`, once every handle is freed.
    fn end(&mut self) -> anyhow::Result<Figures>;
}

/// Which sequence a measurement is of.
#[derive(Copy, Clone)]
enum Seq {
    Pair(u64),
    Mixed,
}

impl Seq {
    fn name(self) -> String {
        match self {
            Seq::Pair(b) if b % (1 << 20) == 0 => format!("pair-{}MiB", b >> 20),
            Seq::Pair(b) if b % (1 << 10) == 0 => format!("pair-{}KiB", b >> 10),
            Seq::Pair(b) => format!("pair-{b}B"),
            Seq::Mixed => "mixed".into(),
        }
    }

    fn bytes(self) -> Option<u64> {
        match self {
            Seq::Pair(b) => Some(b),
            Seq::Mixed => None,
        }
    }
}

/// One sequence's results on one subject.
struct Measured {
    timing: Timing,
    figures: Figures,
    peak_requested: u64,
}

/// Runs one sequence on `s`: `ops` pairs a batch, one warm-up batch, then
/// `plan.batches` timed ones.
fn measure<S: Subject>(s: &mut S, plan: &Plan, seq: Seq, ops: u64) -> anyhow::Result<Measured> {
    s.begin()?;
    let mut ns = Vec::with_capacity(plan.batches as usize);
    let peak_requested;
    match seq {
        Seq::Pair(bytes) => {
            let batch = |s: &mut S| -> anyhow::Result<f64> {
                let t = Instant::now();
                for _ in 0..ops {
                    let h = s.alloc(bytes)?;
                    s.free(black_box(h))?;
                }
                Ok(t.elapsed().as_nanos() as f64 / ops as f64)
            };
            warm_up(|| batch(&mut *s))?;
            for _ in 0..plan.batches {
                ns.push(batch(s)?);
            }
            peak_requested = bytes;
        }
        Seq::Mixed => {
            let m = &plan.mixed;
            let steps = &m.ops[..ops as usize];
            let mut live = Vec::with_capacity(m.initial.len());
            for &size in &m.initial {
                live.push(Some(s.alloc(size)?));
            }
            let mut pass = |s: &mut S| -> anyhow::Result<f64> {
                let t = Instant::now();
                for &(slot, size) in steps {
                    if let Some(h) = live[slot].take() {
                        s.free(h)?;
                    }
                    live[slot] = Some(s.alloc(size)?);
                }
                Ok(t.elapsed().as_nanos() as f64 / steps.len() as f64)
            };
            let warm = warm_up(|| pass(&mut *s))?;
            for _ in 0..plan.batches {
                ns.push(pass(s)?);
            }
            for h in live.into_iter().flatten() {
                s.free(h)?;
            }
            peak_requested = m.peak_requested(steps.len(), warm + plan.batches);
        }
    }
    let figures = s.end()?;
    Ok(Measured {
        timing: Timing::from_batches(ns),
        figures,
        peak_requested,
    })
}

/// Runs `batch` untimed at least once and until 250 ms have passed (at most
/// 100 times), so that caches, the clock frequency and the allocator's own
/// pools are warm before timing. (A shorter warm-up left the first subject
/// of a process slower than the same code path measured later in it:
/// docs/BENCHMARKS.md, *Tried and rejected*.)
/// Returns how many it ran.
fn warm_up(mut batch: impl FnMut() -> anyhow::Result<f64>) -> anyhow::Result<u32> {
    let t = Instant::now();
    for n in 1..=100 {
        batch()?;
        if t.elapsed().as_millis() >= 250 {
            return Ok(n);
        }
    }
    Ok(100)
}

/// Every sequence of the plan on one subject.
fn measure_all<S: Subject>(
    s: &mut S,
    plan: &Plan,
    cap: u64,
    mut row: impl FnMut(Seq, u64, Measured) -> Row,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let seqs = plan
        .pair_sizes
        .iter()
        .map(|&b| Seq::Pair(b))
        .chain([Seq::Mixed]);
    for seq in seqs {
        let ops = match seq {
            Seq::Pair(_) => plan.pairs,
            Seq::Mixed => plan.mixed.ops.len() as u64,
        }
        .min(cap);
        let m = measure(s, plan, seq, ops)?;
        rows.push(row(seq, ops, m));
    }
    Ok(rows)
}

struct InflightSubject<B: Harness> {
    alloc: Allocator<B>,
    queue: Queue<B>,
    base_device_allocations: u64,
}

impl<B: Harness> Subject for InflightSubject<B> {
    type Handle = inflight::Buffer<B>;

    #[inline]
    fn alloc(&mut self, bytes: u64) -> anyhow::Result<Self::Handle> {
        Ok(self.alloc.malloc(bytes, &self.queue)?)
    }

    #[inline]
    fn free(&mut self, h: Self::Handle) -> anyhow::Result<()> {
        drop(h);
        Ok(())
    }

    fn begin(&mut self) -> anyhow::Result<()> {
        self.alloc.clear_cache();
        self.alloc.reset_peak();
        self.base_device_allocations = self.alloc.stats().device_allocations;
        Ok(())
    }

    fn end(&mut self) -> anyhow::Result<Figures> {
        let st = self.alloc.stats();
        Ok(Figures {
            device_allocations: Some(st.device_allocations - self.base_device_allocations),
            peak_reserved: Some(st.peak_reserved_bytes),
            peak_live: Some(st.peak_active_bytes),
        })
    }
}

/// One policy's rows over `--repeat` rounds, in the order measured: one row
/// per sequence, its timing over every round's batches, its other figures
/// the first round's.
pub fn merge_rounds(rows: Vec<Row>) -> Vec<Row> {
    let mut merged: Vec<Row> = Vec::new();
    for r in rows {
        match merged.iter_mut().find(|m| m.sequence == r.sequence) {
            Some(m) => {
                let mut ns = std::mem::take(&mut m.timing.ns_batches);
                ns.extend(r.timing.ns_batches);
                m.timing = Timing::from_batches(ns);
                m.batches += r.batches;
            }
            None => merged.push(r),
        }
    }
    merged
}

/// Who ran a row: allocator, backend and device names.
struct Who<'a>(&'a str, &'a str, &'a str);

fn make_row(plan: &Plan, who: Who<'_>, seq: Seq, ops: u64, m: Measured) -> Row {
    let Who(allocator, backend, device) = who;
    let f = m.figures;
    Row {
        allocator: allocator.to_string(),
        backend: backend.to_string(),
        device: device.to_string(),
        sequence: seq.name(),
        bytes: seq.bytes(),
        seed: plan.mixed.seed,
        size_checksum: format!("{:016x}", plan.mixed.checksum),
        ops_per_batch: ops,
        batches: plan.batches,
        timing: m.timing,
        device_allocations: f.device_allocations,
        peak_reserved_bytes: f.peak_reserved,
        peak_live_bytes: f.peak_live,
        peak_requested_bytes: m.peak_requested,
    }
}

/// The inflight rows of one policy, on a backend built by [`with_backend`].
pub struct InflightJob<'a> {
    pub plan: &'a Plan,
    /// The allocator's settings, its policy included (`--memory-limit`
    /// and the rest).
    pub config: Config,
}

impl BackendJob for InflightJob<'_> {
    type Output = Vec<Row>;

    fn policy(&self) -> Option<inflight::PolicyKind> {
        Some(self.config.policy.kind())
    }

    fn run<B: Harness>(self, backend: B, _: &dyn Validator) -> anyhow::Result<Vec<Row>> {
        let name = format!("inflight/{}", self.config.policy);
        let alloc = Allocator::new(backend, self.config)?;
        let info = alloc.device_info().clone();
        let queue = alloc.create_queue()?;
        let mut s = InflightSubject {
            alloc,
            queue,
            base_device_allocations: 0,
        };
        measure_all(&mut s, self.plan, u64::MAX, |seq, ops, m| {
            make_row(self.plan, Who(&name, info.backend, &info.name), seq, ops, m)
        })
    }
}

#[cfg(feature = "cuda")]
mod cuda_peers {
    //! The driver's allocators as subjects.
    use inflight::backend::cuda::peers::{DefaultPoolAlloc, DevicePtr, DriverAlloc};

    use super::{Figures, Subject};

    pub struct Sync {
        pub driver: DriverAlloc,
        pub count: u64,
    }

    impl Subject for Sync {
        type Handle = DevicePtr;

        fn alloc(&mut self, bytes: u64) -> anyhow::Result<DevicePtr> {
            self.count += 1;
            Ok(self.driver.alloc(bytes)?)
        }

        fn free(&mut self, p: DevicePtr) -> anyhow::Result<()> {
            // SAFETY: `p` came from `alloc` above, is freed once, and no GPU
            // work ever used it.
            unsafe { self.driver.free(p)? };
            Ok(())
        }

        fn begin(&mut self) -> anyhow::Result<()> {
            self.count = 0;
            Ok(())
        }

        fn end(&mut self) -> anyhow::Result<Figures> {
            Ok(Figures {
                device_allocations: Some(self.count),
                ..Figures::default()
            })
        }
    }

    pub struct Async {
        pub pool: DefaultPoolAlloc,
    }

    impl Subject for Async {
        type Handle = DevicePtr;

        fn alloc(&mut self, bytes: u64) -> anyhow::Result<DevicePtr> {
            Ok(self.pool.alloc(bytes)?)
        }

        fn free(&mut self, p: DevicePtr) -> anyhow::Result<()> {
            // SAFETY: `p` came from `alloc` above, is freed once, and no GPU
            // work ever used it.
            unsafe { self.pool.free(p)? };
            Ok(())
        }

        fn begin(&mut self) -> anyhow::Result<()> {
            self.pool.trim()?;
            self.pool.reset_peaks()?;
            Ok(())
        }

        fn end(&mut self) -> anyhow::Result<Figures> {
            self.pool.synchronize()?;
            let (reserved, used) = self.pool.peaks()?;
            self.pool.trim()?;
            Ok(Figures {
                device_allocations: None,
                peak_reserved: Some(reserved),
                peak_live: Some(used),
            })
        }
    }
}

/// The CUDA peers' rows: `cuMemAllocAsync`, `cuMemAlloc`, and PyTorch's
/// caching allocator where its headers and libraries are found.
#[cfg(feature = "cuda")]
pub fn peer_rows(plan: &Plan, no_torch: bool, device: &str) -> anyhow::Result<Vec<Row>> {
    use inflight::backend::cuda::peers::{DefaultPoolAlloc, DriverAlloc};
    let mut rows = Vec::new();
    let mut pool = cuda_peers::Async {
        pool: DefaultPoolAlloc::new(0)?,
    };
    rows.extend(measure_all(&mut pool, plan, u64::MAX, |seq, ops, m| {
        make_row(plan, Who("cuMemAllocAsync", "cuda", device), seq, ops, m)
    })?);
    drop(pool);
    let mut sync = cuda_peers::Sync {
        driver: DriverAlloc::new(0)?,
        count: 0,
    };
    rows.extend(measure_all(
        &mut sync,
        plan,
        plan.driver_ops,
        |seq, ops, m| make_row(plan, Who("cuMemAlloc", "cuda", device), seq, ops, m),
    )?);
    if no_torch {
        super::note("PyTorch row skipped (--no-torch)");
        return Ok(rows);
    }
    let torch_rows = super::torch::find().and_then(|t| {
        super::note(&format!(
            "PyTorch {} at {}: compiling the harness",
            t.version,
            t.dir.display()
        ));
        let exe = super::torch::build(&t)?;
        super::torch::run(&exe, plan)
    });
    match torch_rows {
        Ok(trs) => {
            for tr in trs {
                let seq = match tr.bytes {
                    Some(b) => Seq::Pair(b),
                    None => Seq::Mixed,
                };
                let m = Measured {
                    timing: tr.timing,
                    figures: Figures {
                        device_allocations: Some(tr.device_allocations),
                        peak_reserved: Some(tr.peak_reserved_bytes),
                        peak_live: Some(tr.peak_live_bytes),
                    },
                    peak_requested: tr.peak_requested_bytes,
                };
                rows.push(make_row(
                    plan,
                    Who("pytorch", "cuda", device),
                    seq,
                    tr.ops,
                    m,
                ));
            }
        }
        Err(why) => super::note(&format!("PyTorch row skipped: {why}")),
    }
    Ok(rows)
}
