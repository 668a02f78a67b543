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
//! Timing: untimed warm-up batches (at least one, and 250 ms), then `--batches` timed batches; the
//! figure is the median ns per pair (a pair = one alloc + one free), with the
//! fastest and slowest batch as the spread. No GPU work uses any buffer.

mod threads;
#[cfg(feature = "cuda")]
mod torch;

use std::hint::black_box;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use inflight::{Allocator, Config, Harness, Policy, Queue};
use serde::Serialize;

use crate::backends::{with_backend, BackendJob, BackendName, BackendOptions, SimOptions};
use crate::repro::Validator;
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
}

/// xorshift64* (Vigna), seeded as `seed ^ golden ratio` (never 0). The C++
/// harness has the same generator, bit for bit.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let s = seed ^ 0x9E37_79B9_7F4A_7C15;
        Rng(if s == 0 { 1 } else { s })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A size log-uniform in `[lo, hi]`: `2^(log2 lo + u (log2 hi - log2 lo))`
    /// with `u` from the top 53 bits, truncated and clamped.
    pub fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let u = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let (a, b) = ((lo as f64).log2(), (hi as f64).log2());
        ((a + u * (b - a)).exp2() as u64).clamp(lo, hi)
    }
}

/// FNV-1a over 64-bit words (the size sequence's checksum, on both sides).
struct Fnv(u64);

impl Fnv {
    fn add(&mut self, w: u64) {
        self.0 ^= w;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
}

/// The mixed workload: `live` initial sizes, then (slot, size) per step.
pub struct Mixed {
    pub seed: u64,
    pub live: u64,
    pub min: u64,
    pub max: u64,
    pub initial: Vec<u64>,
    pub ops: Vec<(usize, u64)>,
    pub checksum: u64,
}

impl Mixed {
    pub fn generate(seed: u64, live: u64, steps: u64, min: u64, max: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut sum = Fnv(0xcbf2_9ce4_8422_2325);
        let initial: Vec<u64> = (0..live)
            .map(|_| {
                let s = rng.log_uniform(min, max);
                sum.add(s);
                s
            })
            .collect();
        let ops = (0..steps)
            .map(|_| {
                let slot = rng.next_u64() % live;
                let size = rng.log_uniform(min, max);
                sum.add(slot);
                sum.add(size);
                (slot as usize, size)
            })
            .collect();
        Mixed {
            seed,
            live,
            min,
            max,
            initial,
            ops,
            checksum: sum.0,
        }
    }

    /// The most bytes requested and live at once over `passes` passes of
    /// the first `steps` steps.
    fn peak_requested(&self, steps: usize, passes: u32) -> u64 {
        let mut live = self.initial.clone();
        let mut cur: u64 = live.iter().sum();
        let mut peak = cur;
        for _ in 0..passes {
            for &(slot, size) in &self.ops[..steps] {
                cur = cur - live[slot] + size;
                live[slot] = size;
                peak = peak.max(cur);
            }
        }
        peak
    }
}

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

/// Batch figures in ns per pair.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    /// Median over the batches.
    pub ns_per_pair: f64,
    /// Fastest batch.
    pub ns_min: f64,
    /// Slowest batch.
    pub ns_max: f64,
    /// Every batch, in order.
    pub ns_batches: Vec<f64>,
}

impl Timing {
    pub fn from_batches(ns: Vec<f64>) -> Timing {
        let mut sorted = ns.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Timing {
            ns_per_pair: median,
            ns_min: sorted.first().copied().unwrap_or(f64::NAN),
            ns_max: sorted.last().copied().unwrap_or(f64::NAN),
            ns_batches: ns,
        }
    }
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
/// pools are warm before timing. (With 50 ms, the first subject of a process
/// on the H100 machine sometimes ran 30–50% slower than the same code path
/// measured later in the process: docs/BENCHMARKS.md, run 17.)
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
fn merge_rounds(rows: Vec<Row>) -> Vec<Row> {
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
struct InflightJob<'a> {
    plan: &'a Plan,
    policy: Policy,
}

impl BackendJob for InflightJob<'_> {
    type Output = Vec<Row>;

    fn policy(&self) -> Option<inflight::PolicyKind> {
        Some(self.policy.kind())
    }

    fn run<B: Harness>(self, backend: B, _: &dyn Validator) -> anyhow::Result<Vec<Row>> {
        let alloc = Allocator::new(backend, Config::default().with_policy(self.policy))?;
        let info = alloc.device_info().clone();
        let queue = alloc.create_queue()?;
        let mut s = InflightSubject {
            alloc,
            queue,
            base_device_allocations: 0,
        };
        let name = format!("inflight/{}", self.policy);
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
    let mut rounds: Vec<Vec<Row>> = vec![Vec::new(); policies.len()];
    for round in 0..a.repeat as usize {
        for k in 0..policies.len() {
            let i = (k + round) % policies.len();
            let job = InflightJob {
                plan: &plan,
                policy: policies[i],
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
        BackendName::Cuda => rows.extend(peer_rows(&plan, &a, &rows[0].device.clone())?),
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
        print_table(&rows, &plan, backend);
        threads::print(&scaling);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "cuda")]
fn peer_rows(plan: &Plan, a: &BenchArgs, device: &str) -> anyhow::Result<Vec<Row>> {
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
    if a.no_torch {
        note("PyTorch row skipped (--no-torch)");
        return Ok(rows);
    }
    let torch_rows = torch::find().and_then(|t| {
        note(&format!(
            "PyTorch {} at {}: compiling the harness",
            t.version,
            t.dir.display()
        ));
        let exe = torch::build(&t)?;
        torch::run(&exe, plan)
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
        Err(why) => note(&format!("PyTorch row skipped: {why}")),
    }
    Ok(rows)
}

fn print_table(rows: &[Row], plan: &Plan, backend: BackendName) {
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
    let _ = backend;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xorshift64star_matches_reference_values() {
        // The first outputs for seed 1, computed independently from the
        // definition (state ^= 0x9E3779B97F4A7C15, then >>12, <<25, >>27, * M).
        let mut r = Rng::new(1);
        let mut x: u64 = 1 ^ 0x9E37_79B9_7F4A_7C15;
        for _ in 0..100 {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            assert_eq!(r.next_u64(), x.wrapping_mul(0x2545_F491_4F6C_DD1D));
        }
    }

    #[test]
    fn mixed_sizes_are_log_uniform_in_range_and_reproducible() {
        let m = Mixed::generate(7, 64, 20_000, 1024, 64 << 20);
        let again = Mixed::generate(7, 64, 20_000, 1024, 64 << 20);
        assert_eq!(m.checksum, again.checksum);
        assert_ne!(
            m.checksum,
            Mixed::generate(8, 64, 20_000, 1024, 64 << 20).checksum
        );
        assert!(m
            .ops
            .iter()
            .all(|&(s, b)| s < 64 && (1024..=64 << 20).contains(&b)));
        // Log-uniform over 16 octaves: about 1/16 of the sizes in each.
        let low = m.ops.iter().filter(|&&(_, b)| b < 2048).count();
        assert!((900..1600).contains(&low), "{low} of 20000 below 2 KiB");
        let high = m.ops.iter().filter(|&&(_, b)| b >= 32 << 20).count();
        assert!(
            (900..1600).contains(&high),
            "{high} of 20000 at 32 MiB or above"
        );
    }

    #[test]
    fn timing_takes_the_median_and_the_spread() {
        let t = Timing::from_batches(vec![5.0, 1.0, 3.0, 9.0, 2.0]);
        assert_eq!((t.ns_per_pair, t.ns_min, t.ns_max), (3.0, 1.0, 9.0));
        assert_eq!(Timing::from_batches(vec![4.0, 2.0]).ns_per_pair, 3.0);
    }
}
