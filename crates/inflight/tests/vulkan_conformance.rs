//! The shared conformance suite on Vulkan (lavapipe in CI, a GPU where there
//! is one), with the Khronos validation layer watching: every check must
//! also leave zero messages from the layer.
//!
//! Without Vulkan these tests skip with a one-line reason, except with
//! `CI=true`, where they fail. With `CI=true` the validation layer is
//! required; elsewhere it is used when installed.
//!
//! `immediate_policy_draws_the_layers_vuid` demonstrates the defect: it
//! re-runs this test binary as a child process (the release in flight may
//! crash lavapipe) and looks for the layer's VUID in the child's output.
#![cfg(feature = "vulkan")]

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use inflight::backend::vulkan::{ValidationRequest, VulkanConfig, VulkanGpu};
use inflight::conformance as c;
use inflight::{Allocator, Config, Policy};

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

/// A device, or `None` (after a one-line reason) when Vulkan is missing
/// outside CI.
fn probe(test: &str) -> Option<VulkanGpu> {
    match VulkanGpu::new(config()) {
        Ok(g) => {
            if !g.validation_enabled() {
                eprintln!("{test}: note: running without the validation layer (not installed)");
            }
            Some(g)
        }
        Err(e) if in_ci() => panic!("{test}: Vulkan is required in CI: {e}"),
        Err(e) => {
            eprintln!("{test}: skipped: {e}");
            None
        }
    }
}

/// Runs `check` on fresh Vulkan devices and asserts the layer said nothing.
fn clean(test: &str, check: fn(c::Factory<'_, VulkanGpu>)) {
    let Some(first) = probe(test) else { return };
    let made = Mutex::new(vec![first]);
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

#[test]
fn ops_compute() {
    clean("ops_compute", c::ops_compute);
}
#[test]
fn timeline_advances_in_order() {
    clean("timeline_advances_in_order", c::timeline_advances_in_order);
}
#[test]
fn wait_times_out_on_unsubmitted_value() {
    clean(
        "wait_times_out_on_unsubmitted_value",
        c::wait_times_out_on_unsubmitted_value,
    );
}
#[test]
fn freed_buffers_become_reusable_after_completion() {
    clean(
        "freed_buffers_become_reusable_after_completion",
        c::freed_buffers_become_reusable_after_completion,
    );
}
#[test]
fn reuse_on_another_queue_is_ordered() {
    clean(
        "reuse_on_another_queue_is_ordered",
        c::reuse_on_another_queue_is_ordered,
    );
}
#[test]
fn in_order_reuse_bound_on_another_queue_is_ordered() {
    clean(
        "in_order_reuse_bound_on_another_queue_is_ordered",
        c::in_order_reuse_bound_on_another_queue_is_ordered,
    );
}
#[test]
fn an_unseen_buffer_rebound_sees_only_its_own_writes() {
    // Vulkan queues do not order memory here: nothing is reused in order,
    // so nothing is rebound, and the check says so.
    clean(
        "an_unseen_buffer_rebound_sees_only_its_own_writes",
        |make| {
            assert_eq!(
                c::an_unseen_buffer_rebound_sees_only_its_own_writes(make),
                0
            )
        },
    );
}
#[test]
fn cross_queue_use_is_stamped() {
    clean("cross_queue_use_is_stamped", c::cross_queue_use_is_stamped);
}
#[test]
fn clear_cache_releases_everything() {
    clean(
        "clear_cache_releases_everything",
        c::clear_cache_releases_everything,
    );
}
#[test]
fn retained_policy_keeps_bindings_alive() {
    clean(
        "retained_policy_keeps_bindings_alive",
        c::retained_policy_keeps_bindings_alive,
    );
}
#[test]
fn bad_input_is_refused() {
    clean("bad_input_is_refused", c::bad_input_is_refused);
}
#[test]
fn memory_limit_gives_out_of_memory() {
    clean(
        "memory_limit_gives_out_of_memory",
        c::memory_limit_gives_out_of_memory,
    );
}

/// Spans longer than one storage-buffer binding are split, and the checksum
/// index runs on across the pieces (lavapipe's range is 128 MiB).
#[test]
fn long_spans_are_split() {
    let Some(gpu) = probe("long_spans_are_split") else {
        return;
    };
    let len: u64 = (160 << 20) + 12;
    if gpu_info_too_small(&gpu, len) {
        eprintln!("long_spans_are_split: skipped: device too small for {len} bytes");
        return;
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
}

fn gpu_info_too_small(gpu: &VulkanGpu, len: u64) -> bool {
    use inflight::Backend;
    let info = gpu.info();
    info.max_buffer_size < len || info.memory_capacity < 3 * len
}

/// The defect, reproduced: under `Immediate`, trimming a buffer that a
/// submitted command buffer still uses draws the layer's VUID (lavapipe
/// then often crashes, which is why this runs in a child process).
#[test]
fn immediate_policy_draws_the_layers_vuid() {
    if std::env::var_os(CHILD_ENV).is_some() {
        immediate_child();
        return;
    }
    let Some(gpu) = probe("immediate_policy_draws_the_layers_vuid") else {
        return;
    };
    if !gpu.validation_enabled() {
        eprintln!("immediate_policy_draws_the_layers_vuid: skipped: no validation layer");
        return;
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
