//! The shared conformance suite on Metal, on macOS only: under MLX's
//! settings (unretained command-buffer references), again with retained
//! references, and without a residency set. Elsewhere the file holds one
//! test that says why the suite cannot run here.
//!
//! `deferred_is_clean_under_the_validation_layer` re-runs this test binary
//! with Metal's validation layer on and checks that the incident's workload
//! draws nothing under `Deferred`. `immediate_draws_the_incident` (ignored:
//! run it with `--ignored`) does the same under `Immediate` and expects
//! the layer's assertion or the incident's error. docs/METAL.md has the
//! commands.
#![cfg(feature = "metal")]

/// Off macOS the suite cannot run: say why, and check that opening the
/// backend is an error, not a panic.
#[cfg(not(target_os = "macos"))]
#[test]
fn metal_conformance_needs_macos() {
    let e = inflight::backend::metal::probe().expect_err("Metal is not here");
    assert!(
        matches!(e, inflight::backend::DeviceError::Unsupported(_)),
        "{e:?}"
    );
    eprintln!("metal conformance: skipped: {e}");
}

#[cfg(target_os = "macos")]
mod on_macos {
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use inflight::backend::metal::errors::{INCIDENT_ERROR, INCIDENT_VALIDATION_MESSAGE};
    use inflight::backend::metal::{probe, MetalConfig, MetalGpu};
    use inflight::conformance as c;
    use inflight::{Allocator, Backend, Config, Policy};

    /// Set in the child process of the validation-layer runs: the policy.
    const CHILD_ENV: &str = "INFLIGHT_METAL_CHILD";

    fn in_ci() -> bool {
        std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
    }

    /// A factory of devices with `config`, or `None` (after a one-line
    /// reason) where no Metal device opens outside CI.
    fn gpu(test: &str, config: MetalConfig) -> Option<impl Fn() -> MetalGpu> {
        match probe() {
            Ok(()) => Some(move || MetalGpu::new(config.clone()).expect("a Metal device")),
            Err(e) if in_ci() => panic!("{test}: Metal is required in CI on macOS: {e}"),
            Err(e) => {
                eprintln!("{test}: skipped: {e}");
                None
            }
        }
    }

    fn run(test: &str, check: fn(c::Factory<'_, MetalGpu>)) {
        if let Some(make) = gpu(test, MetalConfig::default()) {
            check(&make);
        }
    }

    #[test]
    fn ops_compute() {
        run("ops_compute", c::ops_compute);
    }
    #[test]
    fn timeline_advances_in_order() {
        run("timeline_advances_in_order", c::timeline_advances_in_order);
    }
    #[test]
    fn wait_times_out_on_unsubmitted_value() {
        run(
            "wait_times_out_on_unsubmitted_value",
            c::wait_times_out_on_unsubmitted_value,
        );
    }
    #[test]
    fn freed_buffers_become_reusable_after_completion() {
        run(
            "freed_buffers_become_reusable_after_completion",
            c::freed_buffers_become_reusable_after_completion,
        );
    }
    #[test]
    fn reuse_on_another_queue_is_ordered() {
        run(
            "reuse_on_another_queue_is_ordered",
            c::reuse_on_another_queue_is_ordered,
        );
    }
    #[test]
    fn in_order_reuse_bound_on_another_queue_is_ordered() {
        run(
            "in_order_reuse_bound_on_another_queue_is_ordered",
            c::in_order_reuse_bound_on_another_queue_is_ordered,
        );
    }
    #[test]
    fn an_unseen_buffer_rebound_sees_only_its_own_writes() {
        // Metal queues with untracked buffers do not order memory: nothing
        // is reused in order, so nothing is rebound.
        run(
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
        run("cross_queue_use_is_stamped", c::cross_queue_use_is_stamped);
    }
    #[test]
    fn clear_cache_releases_everything() {
        run(
            "clear_cache_releases_everything",
            c::clear_cache_releases_everything,
        );
    }
    #[test]
    fn retained_policy_keeps_bindings_alive() {
        run(
            "retained_policy_keeps_bindings_alive",
            c::retained_policy_keeps_bindings_alive,
        );
    }
    #[test]
    fn bad_input_is_refused() {
        run("bad_input_is_refused", c::bad_input_is_refused);
    }
    #[test]
    fn memory_limit_gives_out_of_memory() {
        run(
            "memory_limit_gives_out_of_memory",
            c::memory_limit_gives_out_of_memory,
        );
    }

    /// The whole suite with retained command-buffer references (the
    /// `Retained` policy's setting).
    #[test]
    fn whole_suite_with_retained_references() {
        let config = MetalConfig::default().with_retained_references(true);
        if let Some(make) = gpu("whole_suite_with_retained_references", config) {
            c::run_all(&make);
        }
    }

    /// The whole suite without a residency set (as on macOS before 15), and
    /// with a wired budget so small that most buffers stay unwired.
    #[test]
    fn whole_suite_without_residency_and_over_budget() {
        let test = "whole_suite_without_residency_and_over_budget";
        if let Some(make) = gpu(test, MetalConfig::default().with_residency_sets(false)) {
            c::run_all(&make);
        }
        let tiny = MetalConfig::default().with_wired_limit(Some(64 << 10));
        if let Some(make) = gpu(test, tiny) {
            c::run_all(&make);
        }
    }

    /// The residency set follows allocations and releases, within budget.
    #[test]
    fn residency_follows_buffers() {
        let Some(make) = gpu("residency_follows_buffers", MetalConfig::default()) else {
            return;
        };
        let g = make();
        let Some((wired, _)) = g.wired_bytes() else {
            eprintln!("residency_follows_buffers: skipped: no residency sets (macOS 15+)");
            return;
        };
        assert_eq!(wired, 0);
        let a = g.allocate(1 << 20).unwrap();
        assert_eq!(g.wired_bytes(), Some((1 << 20, 0)));
        g.set_wired_limit(1 << 10).unwrap();
        assert_eq!(g.wired_bytes(), Some((0, 1 << 20)));
        g.set_wired_limit(1 << 30).unwrap();
        assert_eq!(g.wired_bytes(), Some((1 << 20, 0)));
        // SAFETY: no submission ever used `a`.
        unsafe { g.release(a) };
        assert_eq!(g.wired_bytes(), Some((0, 0)));
    }

    /// Commits 64 fills of a 64 MiB buffer, drops it, and clears the cache
    /// at once: under `Immediate` the buffer is released while the command
    /// buffer (made with unretained references) still writes it.
    fn incident_child(policy: &str) {
        let policy = match policy {
            "deferred" => Policy::DEFERRED,
            // SAFETY: this is the child process whose crash is an expected
            // outcome of the demonstration.
            "immediate" => unsafe { Policy::immediate() },
            other => panic!("unknown policy {other}"),
        };
        let gpu = MetalGpu::new(MetalConfig::for_policy(policy.kind())).expect("a Metal device");
        let alloc = Allocator::new(gpu, Config::default().with_policy(policy)).unwrap();
        let q = alloc.create_queue().unwrap();
        let mut tickets = Vec::new();
        for round in 0..8 {
            let buf = alloc.malloc(64 << 20, &q).unwrap();
            let mut cb = q.command_buffer().unwrap();
            for i in 0..64 {
                cb.fill(&buf, round * 100 + i).unwrap();
            }
            tickets.push(cb.commit().unwrap());
            drop(buf);
            alloc.clear_cache();
        }
        for t in &tickets {
            match t.wait(Duration::from_secs(60)) {
                Ok(done) => println!("child: submission {} done: {done}", t.value()),
                Err(e) => println!("child: submission {} error: {e}", t.value()),
            }
        }
        println!("child: finished");
        std::process::exit(0);
    }

    /// Re-runs `test` in a child with the validation layer on, for `policy`;
    /// returns its exit status and output.
    fn validated_child(test: &str, policy: &str) -> (std::process::ExitStatus, String) {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .args(if policy == "immediate" {
                &["--ignored"][..]
            } else {
                &[][..]
            })
            .env(CHILD_ENV, policy)
            .env("MTL_DEBUG_LAYER", "1")
            .env("MTL_DEBUG_LAYER_ERROR_MODE", "assert")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("re-run this test binary");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status, text)
    }

    #[test]
    fn deferred_is_clean_under_the_validation_layer() {
        const TEST: &str = "on_macos::deferred_is_clean_under_the_validation_layer";
        if let Ok(p) = std::env::var(CHILD_ENV) {
            incident_child(&p);
            return;
        }
        if gpu(TEST, MetalConfig::default()).is_none() {
            return;
        }
        let (status, text) = validated_child(TEST, "deferred");
        assert!(
            status.success() && text.contains("child: finished"),
            "deferred under the validation layer: exit {status:?}\n{text}"
        );
        assert!(!text.contains(INCIDENT_VALIDATION_MESSAGE), "{text}");
        assert!(!text.contains(INCIDENT_ERROR), "{text}");
    }

    #[test]
    #[ignore = "demonstrates the defect in a child process; run on a Mac with --ignored"]
    fn immediate_draws_the_incident() {
        const TEST: &str = "on_macos::immediate_draws_the_incident";
        if let Ok(p) = std::env::var(CHILD_ENV) {
            incident_child(&p);
            return;
        }
        if gpu(TEST, MetalConfig::default()).is_none() {
            return;
        }
        let (status, text) = validated_child(TEST, "immediate");
        assert!(
            text.contains(INCIDENT_VALIDATION_MESSAGE)
                || text.contains(INCIDENT_ERROR)
                || !status.success(),
            "immediate drew nothing (exit {status:?}):\n{text}"
        );
        eprintln!("immediate: exit {status:?}; the child said:\n{text}");
    }
}
