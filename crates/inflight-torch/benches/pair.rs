//! What the C ABI costs: an alloc + free pair through it beside the same
//! pair through inflight's Rust API, in one process, on the simulated GPU
//! (accounting mode, the plug-in's own settings: `inflight_torch::sim_config`),
//! every pair on a stream-ordered queue adopted for one stream, as PyTorch's
//! are. `cargo bench -p inflight-torch`.
//!
//! - `rust`: `Allocator::malloc` + drop.
//! - `c-rlib`: `inflight_torch_malloc` + `inflight_torch_free`, called
//!   directly (this crate's rlib, linked in).
//! - `c-dlopen`: the same functions from the built shared library, loaded
//!   with `dlopen` as PyTorch loads it, called through function pointers.
//!
//! Workloads: a cache hit at 4 KiB and at 1 MiB (one pair at a time); a
//! mixed one (64 live buffers, log-uniform 1 KiB-64 MiB, one replaced a
//! step); and two threads making cache-hit pairs at once on streams of
//! their own (time per pair in aggregate).
//!
//! The variants take turns, round after round (a small timed harness, not
//! criterion: interleaving keeps a shared machine's drift out of the
//! differences); each figure is the median over rounds, in nanoseconds a
//! pair, and the last columns are the C ABI's overhead over the Rust API.
//! Under `cargo test --benches` (no `--bench` argument) it runs a few short
//! rounds, as a smoke test.

#![deny(clippy::undocumented_unsafe_blocks)]

use std::ffi::{c_char, c_int, c_void};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use inflight::backend::sim::SimGpu;
use inflight::{Allocator, Backend, Buffer, Config, Queue};

type MallocFn = unsafe extern "C" fn(isize, c_int, *mut c_void) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void, isize, c_int, *mut c_void);
type ConfigureFn = unsafe extern "C" fn(*const c_char, i64, i64, *const c_char) -> c_int;

/// A pair of C entry points: the rlib's or a loaded library's.
#[derive(Clone, Copy)]
struct CAbi {
    malloc: MallocFn,
    free: FreeFn,
}

impl CAbi {
    fn rlib() -> CAbi {
        configure(inflight_torch::inflight_torch_configure);
        CAbi {
            malloc: inflight_torch::inflight_torch_malloc,
            free: inflight_torch::inflight_torch_free,
        }
    }

    fn dlopen() -> Option<CAbi> {
        let path = built_library()?;
        // SAFETY: the library is this crate's own build.
        let lib = unsafe { libloading::Library::new(&path) }.ok()?;
        let lib: &'static libloading::Library = Box::leak(Box::new(lib));
        // SAFETY: the symbols are the library's entry points, of these
        // C signatures.
        unsafe {
            configure(*lib.get::<ConfigureFn>(b"inflight_torch_configure").ok()?);
            Some(CAbi {
                malloc: *lib.get::<MallocFn>(b"inflight_torch_malloc").ok()?,
                free: *lib.get::<FreeFn>(b"inflight_torch_free").ok()?,
            })
        }
    }

    #[inline(always)]
    fn pair(&self, size: isize, stream: usize) {
        // SAFETY: the simulated GPU: any stream handle is valid.
        unsafe {
            let p = (self.malloc)(size, 0, stream as *mut c_void);
            assert!(!p.is_null());
            (self.free)(black_box(p), size, 0, stream as *mut c_void);
        }
    }
}

/// Configures a copy of the library for the simulated GPU, `deferred`.
fn configure(f: ConfigureFn) {
    // SAFETY: NUL-terminated static strings.
    let rc = unsafe { f(c"deferred".as_ptr(), -1, -1, c"sim".as_ptr()) };
    assert_eq!(rc, 0, "configure");
}

/// The shared library beside this bench's `deps` folder.
fn built_library() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    let name = format!(
        "{}inflight_torch{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let found = [Some(deps), deps.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(&name))
        .find(|p| p.exists());
    found
}

/// The Rust API over the same simulated device and configuration.
struct RustApi {
    alloc: Allocator<SimGpu>,
    queues: Vec<Queue<SimGpu>>,
}

impl RustApi {
    fn new() -> RustApi {
        let gpu = SimGpu::new(inflight_torch::sim_config(0));
        let alloc = Allocator::new(gpu.clone(), Config::default()).unwrap();
        let queues = (0..4)
            .map(|_| alloc.adopt_queue(gpu.create_queue().unwrap()).unwrap())
            .collect();
        RustApi { alloc, queues }
    }

    #[inline(always)]
    fn pair(&self, size: u64, stream: usize) {
        drop(black_box(
            self.alloc.malloc(size, &self.queues[stream]).unwrap(),
        ));
    }
}

/// Nanoseconds a pair of `n` pairs of `f`.
fn time(n: u32, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_nanos() as f64 / f64::from(n)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The variants of one workload: a name and a function timing one round.
type Variant<'a> = (&'static str, Box<dyn FnMut() -> f64 + 'a>);

/// Runs the variants in turn for `rounds` rounds and prints a row.
fn row(name: &str, rounds: usize, mut variants: Vec<Variant<'_>>) {
    for (_, v) in variants.iter_mut() {
        v(); // warm-up
    }
    let mut times = vec![Vec::new(); variants.len()];
    for r in 0..rounds {
        for i in 0..variants.len() {
            let k = (i + r) % variants.len();
            times[k].push((variants[k].1)());
        }
    }
    let medians: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
    let mut line = format!("{name:<20}");
    for (i, (label, _)) in variants.iter().enumerate() {
        line += &format!(" {label} {:>7.1}", medians[i]);
    }
    for (i, (label, _)) in variants.iter().enumerate().skip(1) {
        line += &format!("   {label}-rust {:>+6.1}", medians[i] - medians[0]);
    }
    println!("{line}");
}

/// A log-uniform size sequence, 1 KiB to 64 MiB.
fn mixed_sizes(n: usize) -> Vec<u64> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            (1024f64.ln() + u * (65536f64).ln()).exp() as u64
        })
        .collect()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, n) = if full { (21, 200_000) } else { (3, 2_000) };
    let rust = RustApi::new();
    let rlib = CAbi::rlib();
    let dl = CAbi::dlopen();
    if dl.is_none() {
        println!("(the shared library was not found beside the bench: c-dlopen is left out)");
    }
    println!(
        "inflight-torch pair bench: simulated GPU, deferred, stream-ordered queues; \
         ns a pair, median of {rounds} rounds of {n} pairs"
    );
    for (label, size) in [("hit 4KiB", 4096u64), ("hit 1MiB", 1 << 20)] {
        let mut v: Vec<Variant<'_>> = vec![
            ("rust", Box::new(|| time(n, || rust.pair(size, 0)))),
            (
                "c-rlib",
                Box::new(|| time(n, || rlib.pair(size as isize, 0))),
            ),
        ];
        if let Some(dl) = dl {
            v.push((
                "c-dlopen",
                Box::new(move || time(n, || dl.pair(size as isize, 0))),
            ));
        }
        row(label, rounds, v);
    }
    // Mixed: 64 live buffers, one replaced a step.
    let sizes = mixed_sizes(4096);
    let steps = (n / 4).max(1);
    let mut live_rust: Vec<Buffer<SimGpu>> = sizes[..64]
        .iter()
        .map(|&s| rust.alloc.malloc(s, &rust.queues[0]).unwrap())
        .collect();
    let c_live = |abi: CAbi| -> Vec<(usize, isize)> {
        sizes[..64]
            .iter()
            .map(|&s| {
                // SAFETY: as in `CAbi::pair`.
                let p = unsafe { (abi.malloc)(s as isize, 0, std::ptr::null_mut()) };
                (p as usize, s as isize)
            })
            .collect()
    };
    let mut live_rlib = c_live(rlib);
    let mut live_dl = dl.map(c_live);
    let mut i = 0usize;
    let mut j = 0usize;
    let mut k = 0usize;
    let c_step = |abi: CAbi, live: &mut Vec<(usize, isize)>, at: &mut usize| {
        let slot = *at % 64;
        let size = sizes[*at % sizes.len()] as isize;
        let (p, s) = live[slot];
        // SAFETY: as in `CAbi::pair`.
        unsafe {
            (abi.free)(p as *mut c_void, s, 0, std::ptr::null_mut());
            live[slot] = ((abi.malloc)(size, 0, std::ptr::null_mut()) as usize, size);
        }
        *at += 1;
    };
    {
        let mut v: Vec<Variant<'_>> = vec![
            (
                "rust",
                Box::new(|| {
                    time(steps, || {
                        let slot = i % 64;
                        live_rust[slot] = rust
                            .alloc
                            .malloc(sizes[i % sizes.len()], &rust.queues[0])
                            .unwrap();
                        i += 1;
                    })
                }),
            ),
            (
                "c-rlib",
                Box::new(|| time(steps, || c_step(rlib, &mut live_rlib, &mut j))),
            ),
        ];
        if let (Some(dl), Some(live)) = (dl, live_dl.as_mut()) {
            v.push((
                "c-dlopen",
                Box::new(move || time(steps, || c_step(dl, live, &mut k))),
            ));
        }
        row("mixed 64 live", rounds, v);
    }
    // Two threads at once, each on a stream of its own.
    let threads = 2;
    let concurrent = |f: &(dyn Fn(usize) + Sync)| -> f64 {
        let barrier = Arc::new(Barrier::new(threads));
        let t = Instant::now();
        std::thread::scope(|s| {
            for th in 0..threads {
                let barrier = barrier.clone();
                s.spawn(move || {
                    barrier.wait();
                    for _ in 0..n {
                        f(th + 1);
                    }
                });
            }
        });
        t.elapsed().as_nanos() as f64 / (n * threads as u32) as f64
    };
    let mut v: Vec<Variant<'_>> = vec![
        ("rust", Box::new(|| concurrent(&|q| rust.pair(1 << 20, q)))),
        (
            "c-rlib",
            Box::new(|| concurrent(&|q| rlib.pair(1 << 20, q))),
        ),
    ];
    if let Some(dl) = dl {
        v.push((
            "c-dlopen",
            Box::new(move || concurrent(&|q| dl.pair(1 << 20, q))),
        ));
    }
    row("2 threads hit 1MiB", rounds, v);
}
