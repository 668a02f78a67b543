//! The shared conformance suite on Metal, on macOS only: under MLX's
//! settings (unretained command-buffer references), again with retained
//! references, and without a residency set.
//!
//! The file has its own harness (libtest-mimic, `harness = false` in
//! Cargo.toml), which probes for a Metal device once. Where there is none
//! (off macOS, always) every Metal test is reported as ignored and the
//! reason is printed once on stderr; under `CI=true` on macOS they fail
//! instead. Off macOS one test runs: `metal_conformance_needs_macos`, which
//! checks that opening the backend is an error there, not a panic.
//!
//! `deferred_is_clean_under_the_validation_layer` re-runs this test binary
//! with Metal's validation layer on and checks that the incident's workload
//! draws nothing under `Deferred`. `immediate_draws_the_incident` (ignored:
//! run it with `--ignored`) does the same under `Immediate` and expects
//! the layer's assertion or the incident's error. docs/METAL.md has the
//! commands.

use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// `(name, ignored unless --ignored, body)` of the Metal test `f`: on a
/// Mac its body is `on_macos::f`; elsewhere a body that never runs (the
/// probe fails there).
macro_rules! metal_test {
    ($f:ident) => {
        (stringify!($f), false, metal_body!($f))
    };
    ($f:ident, ignored) => {
        (stringify!($f), true, metal_body!($f))
    };
}
#[cfg(target_os = "macos")]
macro_rules! metal_body {
    ($f:ident) => {
        on_macos::$f as Body
    };
}
#[cfg(not(target_os = "macos"))]
macro_rules! metal_body {
    ($f:ident) => {
        off_macos as Body
    };
}

/// A Metal test's body.
type Body = fn() -> Completion;

/// Every Metal test.
const TESTS: [(&str, bool, Body); 17] = [
    metal_test!(ops_compute),
    metal_test!(timeline_advances_in_order),
    metal_test!(wait_times_out_on_unsubmitted_value),
    metal_test!(freed_buffers_become_reusable_after_completion),
    metal_test!(reuse_on_another_queue_is_ordered),
    metal_test!(in_order_reuse_bound_on_another_queue_is_ordered),
    metal_test!(an_unseen_buffer_rebound_sees_only_its_own_writes),
    metal_test!(cross_queue_use_is_stamped),
    metal_test!(clear_cache_releases_everything),
    metal_test!(retained_policy_keeps_bindings_alive),
    metal_test!(bad_input_is_refused),
    metal_test!(memory_limit_gives_out_of_memory),
    metal_test!(whole_suite_with_retained_references),
    metal_test!(whole_suite_without_residency_and_over_budget),
    metal_test!(residency_follows_buffers),
    metal_test!(deferred_is_clean_under_the_validation_layer),
    // Demonstrates the defect in a child process; run on a Mac with --ignored.
    metal_test!(immediate_draws_the_incident, ignored),
];

/// Set in the child process of the validation-layer runs: the policy.
const CHILD_ENV: &str = "INFLIGHT_METAL_CHILD";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn main() {
    let args = Arguments::from_args();
    // The validation-layer runs' child runs one test, on a device its
    // parent found.
    let child = cfg!(target_os = "macos") && std::env::var_os(CHILD_ENV).is_some();
    let probed = if child {
        Ok(())
    } else {
        inflight::backend::metal::probe()
    };
    // Off macOS a missing device is never a failure, CI or not.
    let required = in_ci() && cfg!(target_os = "macos");
    let mut trials = Vec::new();
    for (name, ignored, body) in TESTS {
        trials.push(match &probed {
            Ok(()) => Trial::ignorable_test(name, move || Ok(body())).with_ignored_flag(ignored),
            Err(e) if required => {
                let reason = format!("Metal is required in CI on macOS: {e}");
                Trial::test(name, move || Err(Failed::from(reason)))
            }
            Err(e) => {
                let reason = e.to_string();
                Trial::ignorable_test(name, move || Ok(Completion::ignored_with(reason)))
                    .with_ignored_flag(true)
            }
        });
    }
    if let Err(e) = &probed {
        let outcome = if required { "fail" } else { "ignored" };
        eprintln!("metal_conformance: {} tests {outcome}: {e}", TESTS.len());
    }
    #[cfg(not(target_os = "macos"))]
    trials.push(Trial::test("metal_conformance_needs_macos", || {
        metal_conformance_needs_macos();
        Ok(())
    }));
    libtest_mimic::run(&args, trials).exit();
}

/// The body of every Metal test off macOS, where none runs.
#[cfg(not(target_os = "macos"))]
fn off_macos() -> Completion {
    panic!("Metal tests run on macOS only")
}

/// Off macOS the suite cannot run: say why, and check that opening the
/// backend is an error, not a panic.
#[cfg(not(target_os = "macos"))]
fn metal_conformance_needs_macos() {
    let e = inflight::backend::metal::probe().expect_err("Metal is not here");
    assert!(
        matches!(e, inflight::backend::DeviceError::Unsupported(_)),
        "{e:?}"
    );
}

#[cfg(target_os = "macos")]
mod on_macos {
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use inflight::backend::metal::errors::{INCIDENT_ERROR, INCIDENT_VALIDATION_MESSAGE};
    use inflight::backend::metal::{MetalConfig, MetalGpu};
    use inflight::conformance as c;
    use inflight::{Allocator, Backend, Config, Policy};
    use libtest_mimic::Completion;

    use super::CHILD_ENV;

    /// Runs the shared `check` on devices with the default settings.
    fn run(check: fn(c::Factory<'_, MetalGpu>)) -> Completion {
        check(&gpu(MetalConfig::default()));
        Completion::Completed
    }

    pub(crate) fn ops_compute() -> Completion {
        run(c::ops_compute)
    }
    pub(crate) fn timeline_advances_in_order() -> Completion {
        run(c::timeline_advances_in_order)
    }
    pub(crate) fn wait_times_out_on_unsubmitted_value() -> Completion {
        run(c::wait_times_out_on_unsubmitted_value)
    }
    pub(crate) fn freed_buffers_become_reusable_after_completion() -> Completion {
        run(c::freed_buffers_become_reusable_after_completion)
    }
    pub(crate) fn reuse_on_another_queue_is_ordered() -> Completion {
        run(c::reuse_on_another_queue_is_ordered)
    }
    pub(crate) fn in_order_reuse_bound_on_another_queue_is_ordered() -> Completion {
        run(c::in_order_reuse_bound_on_another_queue_is_ordered)
    }
    pub(crate) fn an_unseen_buffer_rebound_sees_only_its_own_writes() -> Completion {
        // Metal queues with untracked buffers do not order memory: nothing
        // is reused in order, so nothing is rebound.
        run(|make| {
            assert_eq!(
                c::an_unseen_buffer_rebound_sees_only_its_own_writes(make),
                0
            )
        })
    }
    pub(crate) fn cross_queue_use_is_stamped() -> Completion {
        run(c::cross_queue_use_is_stamped)
    }
    pub(crate) fn clear_cache_releases_everything() -> Completion {
        run(c::clear_cache_releases_everything)
    }
    pub(crate) fn retained_policy_keeps_bindings_alive() -> Completion {
        run(c::retained_policy_keeps_bindings_alive)
    }
    pub(crate) fn bad_input_is_refused() -> Completion {
        run(c::bad_input_is_refused)
    }
    pub(crate) fn memory_limit_gives_out_of_memory() -> Completion {
        run(c::memory_limit_gives_out_of_memory)
    }

    /// A factory of devices with `config` (the probe found one).
    fn gpu(config: MetalConfig) -> impl Fn() -> MetalGpu {
        move || MetalGpu::new(config.clone()).expect("a Metal device")
    }

    /// The whole suite with retained command-buffer references (the
    /// `Retained` policy's setting).
    pub(crate) fn whole_suite_with_retained_references() -> Completion {
        let config = MetalConfig::default().with_retained_references(true);
        c::run_all(&gpu(config));
        Completion::Completed
    }

    /// The whole suite without a residency set (as on macOS before 15), and
    /// with a wired budget so small that most buffers stay unwired.
    pub(crate) fn whole_suite_without_residency_and_over_budget() -> Completion {
        c::run_all(&gpu(MetalConfig::default().with_residency_sets(false)));
        let tiny = MetalConfig::default().with_wired_limit(Some(64 << 10));
        c::run_all(&gpu(tiny));
        Completion::Completed
    }

    /// The residency set follows allocations and releases, within budget.
    pub(crate) fn residency_follows_buffers() -> Completion {
        let g = gpu(MetalConfig::default())();
        let Some((wired, _)) = g.wired_bytes() else {
            return Completion::ignored_with("no residency sets (macOS 15+)");
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
        Completion::Completed
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

    pub(crate) fn deferred_is_clean_under_the_validation_layer() -> Completion {
        const TEST: &str = "deferred_is_clean_under_the_validation_layer";
        if let Ok(p) = std::env::var(CHILD_ENV) {
            incident_child(&p);
            return Completion::Completed;
        }
        let (status, text) = validated_child(TEST, "deferred");
        assert!(
            status.success() && text.contains("child: finished"),
            "deferred under the validation layer: exit {status:?}\n{text}"
        );
        assert!(!text.contains(INCIDENT_VALIDATION_MESSAGE), "{text}");
        assert!(!text.contains(INCIDENT_ERROR), "{text}");
        Completion::Completed
    }

    /// Ignored unless `--ignored`: demonstrates the defect in a child
    /// process.
    pub(crate) fn immediate_draws_the_incident() -> Completion {
        const TEST: &str = "immediate_draws_the_incident";
        if let Ok(p) = std::env::var(CHILD_ENV) {
            incident_child(&p);
            return Completion::Completed;
        }
        let (status, text) = validated_child(TEST, "immediate");
        assert!(
            text.contains(INCIDENT_VALIDATION_MESSAGE)
                || text.contains(INCIDENT_ERROR)
                || !status.success(),
            "immediate drew nothing (exit {status:?}):\n{text}"
        );
        eprintln!("immediate: exit {status:?}; the child said:\n{text}");
        Completion::Completed
    }
}
