//! The shared conformance suite on Vulkan (lavapipe in CI, a GPU where there
//! is one), with the Khronos validation layer watching: every check must
//! also leave zero messages from the layer.
//!
//! The file has its own harness (libtest-mimic, `harness = false` in
//! Cargo.toml), which opens a device once before the tests. Without Vulkan
//! every test is reported as ignored and the reason is printed once on
//! stderr, except with `CI=true`, where every test fails with the reason.
//! With `CI=true` the validation layer is required; elsewhere it is used
//! when installed. A test that cannot run on the device it finds (too small,
//! no layer) is ignored at run time, with the reason.
//!
//! `immediate_policy_draws_the_layers_vuid` demonstrates the defect: it
//! re-runs this test binary as a child process (the release in flight may
//! crash lavapipe) and looks for the layer's VUID in the child's output.

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use inflight::backend::vulkan::{ValidationRequest, VulkanConfig, VulkanGpu};
use inflight::conformance as c;
use inflight::{Allocator, Config, Policy};
use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// Set in the child process of the immediate-policy demonstration.
const CHILD_ENV: &str = "INFLIGHT_VULKAN_IMMEDIATE_CHILD";
/// The layer's VUIDs for destruction in flight.
const VUIDS: [&str; 2] = [
    "VUID-vkDestroyBuffer-buffer-00922",
    "VUID-vkFreeMemory-memory-00677",
];

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn config() -> VulkanConfig {
    VulkanConfig {
        validation: Some(if in_ci() {
            ValidationRequest::Required
        } else {
            ValidationRequest::IfAvailable
        }),
        echo_errors: true,
        ..VulkanConfig::default()
    }
}

/// What the probe found.
enum Found {
    /// A device opened: the tests run.
    Device,
    /// No Vulkan here, for this reason: the tests are ignored.
    Missing(String),
    /// No Vulkan under `CI=true`, for this reason: the tests fail.
    MissingInCi(String),
}

/// Opens a device once, with the tests' own settings.
fn probe() -> Found {
    match VulkanGpu::new(config()) {
        Ok(g) => {
            if !g.validation_enabled() {
                eprintln!("vulkan_conformance: note: running without the validation layer (not installed)");
            }
            Found::Device
        }
        Err(e) if in_ci() => Found::MissingInCi(format!("Vulkan is required in CI: {e}")),
        Err(e) => Found::Missing(e.to_string()),
    }
}

/// A check of the shared suite.
fn main() {
    let args = Arguments::from_args();
    // The demonstration's child runs one test, on a device its parent found.
    let found = if std::env::var_os(CHILD_ENV).is_some() {
        Found::Device
    } else {
        probe()
    };
    let mut checks = c::checks::<VulkanGpu>();
    checks.insert(
        6,
        (
            c::REBIND_CHECK,
            an_unseen_buffer_rebound_sees_only_its_own_writes,
        ),
    );
    let mut trials: Vec<Trial> = checks
        .into_iter()
        .map(|(name, check)| {
            trial(name, &found, move || {
                clean(check);
                Completion::Completed
            })
        })
        .collect();
    trials.extend([
        trial("long_spans_are_split", &found, long_spans_are_split),
        trial(
            "snapshots_give_each_segment_its_own_address",
            &found,
            snapshots_give_each_segment_its_own_address,
        ),
        trial(
            "immediate_policy_draws_the_layers_vuid",
            &found,
            immediate_policy_draws_the_layers_vuid,
        ),
    ]);
    match &found {
        Found::Device => {}
        Found::Missing(reason) => {
            eprintln!(
                "vulkan_conformance: {} tests ignored: {reason}",
                trials.len()
            );
        }
        Found::MissingInCi(reason) => {
            eprintln!("vulkan_conformance: {} tests fail: {reason}", trials.len());
        }
    }
    libtest_mimic::run(&args, trials).exit();
}

/// The trial `name`, as the probe allows: it runs `test`; or, without
/// Vulkan, it is ignored (and, run anyway with `--ignored`, ignored again
/// with the reason); or, without Vulkan under `CI=true`, it fails with the
/// reason.
fn trial(name: &str, found: &Found, test: impl FnOnce() -> Completion + Send + 'static) -> Trial {
    match found {
        Found::Device => Trial::ignorable_test(name, move || Ok(test())),
        Found::Missing(reason) => {
            let reason = reason.clone();
            Trial::ignorable_test(name, move || Ok(Completion::ignored_with(reason)))
                .with_ignored_flag(true)
        }
        Found::MissingInCi(reason) => {
            let reason = reason.clone();
            Trial::test(name, move || Err(Failed::from(reason)))
        }
    }
}

/// A fresh device (the probe opened one like it).
fn device() -> VulkanGpu {
    VulkanGpu::new(config()).expect("a device like the probe's")
}

/// Runs `check` on fresh Vulkan devices and asserts the layer said nothing.
fn clean(check: c::Check<VulkanGpu>) {
    let made = Mutex::new(vec![device()]);
    let make = || {
        let g = VulkanGpu::new(config()).expect("a second device like the first");
        made.lock().unwrap().push(g.clone());
        g
    };
    check(&make);
    for g in made.lock().unwrap().iter() {
        assert_eq!(
            (g.violations(), g.warnings()),
            (0, 0),
            "validation: {:#?}",
            g.violation_log()
        );
    }
}

fn an_unseen_buffer_rebound_sees_only_its_own_writes(make: c::Factory<'_, VulkanGpu>) {
    // Vulkan queues do not order memory here: nothing is reused in order,
    // so nothing is rebound, and the check says so.
    assert_eq!(
        c::an_unseen_buffer_rebound_sees_only_its_own_writes(make),
        0
    )
}

/// Spans longer than one storage-buffer binding are split, and the checksum
/// index runs on across the pieces (lavapipe's range is 128 MiB).
fn long_spans_are_split() -> Completion {
    let gpu = device();
    let len: u64 = (160 << 20) + 12;
    if gpu_info_too_small(&gpu, len) {
        return Completion::ignored_with(format!("device too small for {len} bytes"));
    }
    let alloc = Allocator::new(gpu.clone(), Config::default()).unwrap();
    let q = alloc.create_queue().unwrap();
    let a = alloc.malloc(len, &q).unwrap();
    let b = alloc.malloc(len, &q).unwrap();
    let mut cb = q.command_buffer().unwrap();
    cb.fill(&a, 0x0102_0304).unwrap();
    cb.fill_span(
        &a,
        inflight::Span {
            offset: 4,
            len: len - 8,
        },
        5,
    )
    .unwrap();
    cb.copy(&a, &b).unwrap();
    let slot = cb.checksum(&b).unwrap();
    let t = cb.commit().unwrap();
    assert!(t.wait(c::WAIT * 4).unwrap());
    let words = len / 4;
    let mut want = inflight::backend::checksum_uniform(5, words);
    for i in [0, words - 1] {
        // The two end words hold the first fill: swap their terms.
        let (mix, value) = (
            inflight::backend::index_mix(i),
            inflight::backend::value_mix,
        );
        want = want
            .wrapping_sub(u64::from(5 ^ mix) + u64::from(value(5)))
            .wrapping_add(u64::from(0x0102_0304 ^ mix) + u64::from(value(0x0102_0304)));
    }
    assert_eq!(t.checksum(slot).unwrap(), want);
    drop((a, b, t));
    assert_eq!(
        (gpu.violations(), gpu.warnings()),
        (0, 0),
        "{:#?}",
        gpu.violation_log()
    );
    Completion::Completed
}

/// Vulkan raw buffers have synthetic addresses (the backend enables no
/// device addresses): stable, never 0, and apart, so that a memory
/// snapshot of a Vulkan run shows each segment where its history events
/// say it is, with its blocks inside it.
fn snapshots_give_each_segment_its_own_address() -> Completion {
    use inflight::history::MemoryAction;
    use inflight::Backend;
    let gpu = device();
    let (a, b) = (gpu.allocate(4096).unwrap(), gpu.allocate(3 << 20).unwrap());
    let (x, y) = (gpu.address(&a), gpu.address(&b));
    assert!(x != 0 && y != 0, "{x:#x} {y:#x}");
    assert_eq!(gpu.address(&a), x, "an address is stable");
    assert!(y >= x + 4096 || x >= y + (3 << 20), "{x:#x} {y:#x} overlap");
    // SAFETY: `Backend::release`'s contract: (1) both came from this
    // backend; (2) no submission ever used them.
    unsafe {
        gpu.release(a);
        gpu.release(b);
    }

    let alloc = Allocator::new(gpu.clone(), Config::default()).unwrap();
    alloc.record_history(Some(1000));
    let q = alloc.create_queue().unwrap();
    // A small segment with two blocks, and large segments of their own.
    let bufs: Vec<_> = [1 << 10, 12 << 20, 16 << 20, 2 << 10]
        .into_iter()
        .map(|n| alloc.malloc(n, &q).unwrap())
        .collect();
    let snap = alloc.memory_snapshot();
    let made: Vec<u64> = snap
        .events
        .iter()
        .filter(|e| e.action == MemoryAction::SegmentAlloc)
        .map(|e| e.addr)
        .collect();
    assert!(made.len() >= 2, "{:?}", snap.events);
    let mut segments: Vec<(u64, u64)> = snap
        .segments
        .iter()
        .map(|s| (s.address, s.address + s.total_size))
        .collect();
    segments.sort_unstable();
    for w in segments.windows(2) {
        assert!(w[0].1 <= w[1].0, "segments overlap: {segments:x?}");
    }
    for addr in &made {
        assert!(
            *addr != 0 && segments.iter().any(|s| s.0 == *addr),
            "segment_alloc at {addr:#x} is no segment of {segments:x?}"
        );
    }
    for s in &snap.segments {
        for blk in &s.blocks {
            assert!(
                s.address <= blk.address && blk.address + blk.size <= s.address + s.total_size,
                "a block outside its segment: {s:?}"
            );
        }
    }
    drop(bufs);
    drop((q, alloc));
    assert_eq!(
        (gpu.violations(), gpu.warnings()),
        (0, 0),
        "{:#?}",
        gpu.violation_log()
    );
    Completion::Completed
}

fn gpu_info_too_small(gpu: &VulkanGpu, len: u64) -> bool {
    use inflight::Backend;
    let info = gpu.info();
    info.max_buffer_size < len || info.memory_capacity < 3 * len
}

/// The defect, reproduced: under `Immediate`, trimming a buffer that a
/// submitted command buffer still uses draws the layer's VUID (lavapipe
/// then often crashes, which is why this runs in a child process).
fn immediate_policy_draws_the_layers_vuid() -> Completion {
    if std::env::var_os(CHILD_ENV).is_some() {
        immediate_child();
        return Completion::Completed;
    }
    let gpu = device();
    if !gpu.validation_enabled() {
        return Completion::ignored_with("no validation layer");
    }
    drop(gpu);
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "immediate_policy_draws_the_layers_vuid",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("re-run this test binary");
    // A real GPU may hang rather than crash after a release in flight:
    // the child gets a deadline, then is killed; its output is what counts.
    let out = wait_with_deadline(child, Duration::from_secs(60));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        VUIDS.iter().any(|v| text.contains(v)),
        "the layer did not report the release in flight (child exit {:?}):\n{text}",
        out.status
    );
    eprintln!(
        "immediate: the layer reported {} (child exit: {:?})",
        VUIDS
            .iter()
            .filter(|v| text.contains(*v))
            .copied()
            .collect::<Vec<_>>()
            .join(", "),
        out.status
    );
    Completion::Completed
}

/// The child: commits long work on a buffer, drops it, and trims the cache
/// at once, so the buffer is destroyed while the work runs.
fn immediate_child() {
    let gpu = VulkanGpu::new(VulkanConfig {
        validation: Some(ValidationRequest::Required),
        echo_errors: true,
        ..VulkanConfig::default()
    })
    .expect("the parent found a device");
    // SAFETY: this is the child process whose crash is the expected outcome.
    let policy = unsafe { Policy::immediate() };
    let alloc = Allocator::new(gpu.clone(), Config::default().with_policy(policy)).unwrap();
    let q = alloc.create_queue().unwrap();
    let buf = alloc.malloc(32 << 20, &q).unwrap();
    let mut cb = q.command_buffer().unwrap();
    for i in 0..64 {
        cb.fill(&buf, i).unwrap();
    }
    let t = cb.commit().unwrap();
    drop(buf);
    alloc.clear_cache();
    // The messenger reports inside vkDestroyBuffer, so the message is out.
    // Exit without tearing down: on a real GPU, waiting for work that uses a
    // destroyed buffer, or destroying the device under it, can hang.
    eprintln!("child: {} layer errors", gpu.violations());
    drop(t);
    std::process::exit(0);
}

/// Waits for `child` until `deadline` passes, then kills it; returns its
/// output either way.
fn wait_with_deadline(mut child: std::process::Child, deadline: Duration) -> std::process::Output {
    use std::io::Read;
    let mut pipes = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut o = Vec::new();
        let _ = pipes.0.read_to_end(&mut o);
        o
    });
    let err = std::thread::spawn(move || {
        let mut e = Vec::new();
        let _ = pipes.1.read_to_end(&mut e);
        e
    });
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll the child") {
            break status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            break child.wait().expect("reap the killed child");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}
