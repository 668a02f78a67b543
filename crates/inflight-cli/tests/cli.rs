//! The `inflight` binary end to end: `repro`'s JSON, exit codes, and bad
//! arguments.

use std::process::Command;

fn inflight(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_inflight"))
        .args(args)
        .output()
        .expect("the binary runs")
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
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
