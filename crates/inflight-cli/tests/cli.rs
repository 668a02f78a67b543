//! The `inflight` binary end to end: `repro`'s JSON, exit codes, and bad
//! arguments.

use std::process::Command;

fn inflight(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_inflight"))
        .args(args)
        .output()
        .expect("the binary runs")
}

/// Exit status 0, or the test fails showing stderr.
fn assert_succeeded(out: &std::process::Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn repro_all_policies_reports_each_with_the_documented_fields() {
    let out = inflight(&[
        "repro",
        "--policy",
        "all",
        "--allocations",
        "20000",
        "--json",
        "--seed",
        "3",
    ]);
    assert_succeeded(&out);
    let reports = json_lines(&out);
    let names: Vec<&str> = reports
        .iter()
        .map(|r| r["policy"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["deferred", "retained", "immediate"]);
    for r in &reports {
        for field in [
            "policy",
            "backend",
            "allocations",
            "submissions",
            "violations",
            "corruptions",
            "seconds",
            "peak_active_bytes",
            "peak_reserved_bytes",
            "cache_hits",
            "cache_misses",
        ] {
            assert!(!r[field].is_null(), "{field} missing in {r}");
        }
        assert_eq!(r["backend"], "sim");
        assert!(r["allocations"].as_u64().unwrap() >= 20000);
        assert!(r["stats_balanced"].as_bool().unwrap(), "{r}");
    }
    for safe in &reports[..2] {
        assert_eq!(safe["violations"], 0, "{safe}");
        assert_eq!(safe["corruptions"], 0, "{safe}");
    }
    let immediate = &reports[2];
    assert!(
        immediate["violations"].as_u64().unwrap() > 0,
        "the defect did not show: {immediate}"
    );
}

#[test]
fn repro_table_prints_the_policies_side_by_side() {
    let out = inflight(&[
        "repro",
        "--policy",
        "all",
        "--allocations",
        "5000",
        "--quiet",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let header = text.lines().nth(1).unwrap_or_default();
    for p in ["deferred", "retained", "immediate"] {
        assert!(header.contains(p), "{text}");
    }
    assert!(
        text.contains("violations") && text.contains("corrupted checksums"),
        "{text}"
    );
}

#[test]
fn bad_arguments_are_refused_with_a_message_and_exit_code_2() {
    for args in [
        &["repro", "--cache-limit", "12 parsecs"][..],
        &["repro", "--min-size", "1MiB", "--max-size", "4KiB"],
        &["repro", "--threads", "0"],
        &["repro", "--duration", "soon"],
        &["repro", "--policy", "sometimes"],
    ] {
        let out = inflight(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?} printed no reason");
    }
}

#[test]
fn memory_limit_above_the_device_is_a_clear_error() {
    let out = inflight(&["repro", "--memory-limit", "1TiB", "--allocations", "10"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("memory limit"), "{err}");
}

#[test]
fn bench_on_the_simulated_gpu_reports_every_inflight_row() {
    let out = inflight(&[
        "bench",
        "--backend",
        "sim",
        "--pairs",
        "2000",
        "--steps",
        "256",
        "--batches",
        "3",
        "--json",
    ]);
    assert_succeeded(&out);
    let rows = json_lines(&out);
    let mut seen = Vec::new();
    for r in &rows {
        assert_eq!(r["backend"], "sim", "{r}");
        for field in [
            "ns_per_pair",
            "ns_min",
            "ns_max",
            "device_allocations",
            "peak_reserved_bytes",
            "peak_live_bytes",
            "peak_requested_bytes",
            "ops_per_batch",
        ] {
            let v = r[field]
                .as_f64()
                .unwrap_or_else(|| panic!("{field} in {r}"));
            assert!(v > 0.0, "{field} not positive in {r}");
        }
        assert_eq!(r["ns_batches"].as_array().unwrap().len(), 3, "{r}");
        seen.push((
            r["allocator"].as_str().unwrap().to_string(),
            r["sequence"].as_str().unwrap().to_string(),
        ));
    }
    for policy in ["deferred", "retained", "immediate"] {
        for seq in ["pair-1KiB", "pair-1MiB", "pair-64MiB", "mixed"] {
            let want = (format!("inflight/{policy}"), seq.to_string());
            assert!(seen.contains(&want), "{want:?} missing from {seen:?}");
        }
    }
    assert_eq!(rows.len(), 12);
    // A cache-hit sequence allocates from the device once.
    let hit = rows.iter().find(|r| r["sequence"] == "pair-1MiB").unwrap();
    assert_eq!(hit["device_allocations"], 1, "{hit}");
}

#[test]
fn bench_writes_json_to_a_file_and_prints_the_table() {
    let dir = std::env::temp_dir().join(format!("inflight-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bench.json");
    let out = inflight(&[
        "bench",
        "--backend",
        "sim",
        "--pairs",
        "500",
        "--steps",
        "64",
        "--batches",
        "1",
        "--sizes",
        "4KiB",
        "--json",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("inflight/deferred"), "{table}");
    assert!(table.contains("ratios"), "{table}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 6, "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--backend cuda` without a driver is a clear error, not a crash; with a
/// driver this test has nothing to check (the device runs cover it).
#[cfg(feature = "cuda")]
#[test]
fn bench_on_cuda_without_a_driver_fails_cleanly() {
    if inflight::backend::cuda::probe_driver().is_ok() {
        eprintln!("skipped: a CUDA driver is present");
        return;
    }
    let out = inflight(&["bench", "--backend", "cuda", "--pairs", "10"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CUDA"), "{err}");
}

#[test]
fn repro_under_faults_reports_every_injected_fault_and_loses_nothing() {
    let out = inflight(&[
        "repro",
        "--faults",
        "0.02",
        "--allocations",
        "20000",
        "--json",
        "--seed",
        "5",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    let r = &json_lines(&out)[0];
    let f = &r["faults"];
    assert!(f["injected"]["alloc_failures"].as_u64().unwrap() > 0, "{r}");
    assert!(
        f["injected"]["submission_failures"].as_u64().unwrap() > 0,
        "{r}"
    );
    assert_eq!(
        f["injected"]["submission_failures"], f["submission_failures_observed"],
        "{r}"
    );
    assert_eq!(
        f["injected"]["alloc_failures"], f["alloc_failures_observed"],
        "{r}"
    );
    assert_eq!(f["all_reported"], true, "{r}");
    assert_eq!(r["violations"], 0, "{r}");
    assert_eq!(r["corruptions"], 0, "{r}");
    assert_eq!(r["stats_balanced"], true, "{r}");
}

#[test]
fn repro_survives_a_lost_device_and_says_so() {
    let out = inflight(&[
        "repro",
        "--lose-device-after",
        "200",
        "--allocations",
        "100000",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    let r = &json_lines(&out)[0];
    assert_eq!(r["faults"]["injected"]["device_lost"], true, "{r}");
    assert_eq!(r["faults"]["device_lost_observed"], true, "{r}");
    assert_eq!(r["violations"], 0, "{r}");
    assert_eq!(r["stats_balanced"], true, "{r}");
}

#[test]
fn timed_runs_print_the_memory_trend() {
    let out = inflight(&["repro", "--duration", "2s", "--quiet"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("memory trend"), "{text}");
    assert!(text.contains("first vs last interval"), "{text}");
}

#[test]
fn bench_threads_reports_one_scaling_row_per_thread_count() {
    let out = inflight(&[
        "bench",
        "--backend",
        "sim",
        "--pairs",
        "2000",
        "--steps",
        "64",
        "--batches",
        "1",
        "--sizes",
        "4KiB",
        "--threads",
        "1,2",
        "--json",
    ]);
    assert_succeeded(&out);
    let scaling: Vec<serde_json::Value> = json_lines(&out)
        .into_iter()
        .filter(|r| !r["threads"].is_null())
        .collect();
    let threads: Vec<u64> = scaling
        .iter()
        .map(|r| r["threads"].as_u64().unwrap())
        .collect();
    assert_eq!(threads, [1, 2]);
    for r in &scaling {
        assert!(
            r["aggregate_pairs_per_second"].as_f64().unwrap() > 0.0,
            "{r}"
        );
    }
    assert_eq!(scaling[0]["speedup_vs_one_thread"].as_f64(), Some(1.0));
}

#[test]
fn bench_repeat_merges_each_policys_rounds_into_one_row() {
    let out = inflight(&[
        "bench",
        "--backend",
        "sim",
        "--pairs",
        "1000",
        "--steps",
        "128",
        "--batches",
        "2",
        "--sizes",
        "4KiB",
        "--repeat",
        "3",
        "--json",
    ]);
    assert_succeeded(&out);
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 6, "one row per policy and sequence");
    for r in &rows {
        assert_eq!(r["batches"], 6, "{r}");
        assert_eq!(r["ns_batches"].as_array().unwrap().len(), 6, "{r}");
    }
}

#[test]
fn repro_repeat_takes_turns_and_summarises_medians_and_paired_ratios() {
    let run = |last: &str| {
        let args = [
            "repro",
            "--policy",
            "all",
            "--allocations",
            "8000",
            "--repeat",
            "2",
        ];
        let out = inflight(&[&args[..], &[last]].concat());
        assert_succeeded(&out);
        out
    };
    let out = run("--quiet");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("repetition ").count(), 2, "{text}");
    assert!(
        text.contains("over 2 repetitions: median (min..max)"),
        "{text}"
    );
    for line in [
        "deferred / immediate rate",
        "deferred / retained  rate",
        "µs/round: malloc",
    ] {
        assert!(text.contains(line), "{line:?} missing from {text}");
    }
    // JSON: every run, with its repetition.
    let reports = json_lines(&run("--json"));
    assert_eq!(reports.len(), 6);
    let reps: Vec<u64> = reports
        .iter()
        .map(|r| r["repetition"].as_u64().unwrap())
        .collect();
    assert_eq!(reps, [0, 0, 0, 1, 1, 1]);
    // The second repetition starts one policy later.
    assert_eq!(reports[3]["policy"], "retained");
    assert!(reports
        .iter()
        .all(|r| r["phases"]["malloc_us"].as_f64().unwrap() > 0.0));
}
