//! `repro --record` and `replay` end to end: a recorded trace, a hand-written
//! one with every event kind, bad traces, and a multi-GiB accounting-only one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{inflight, ok, temp};

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn write_trace(name: &str, text: &str) -> PathBuf {
    let path = temp(name);
    std::fs::write(&path, text).expect("write the trace");
    path
}

fn replay_json(path: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let p = path.to_str().unwrap();
    let mut args = vec!["replay", p, "--json"];
    args.extend_from_slice(extra);
    let out = inflight(&args);
    ok(&out);
    json_lines(&out)
}

/// Counts of each event kind in a trace file.
fn count(path: &Path) -> [u64; 4] {
    let text = std::fs::read_to_string(path).unwrap();
    let mut n = [0u64; 4];
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        match v["ev"].as_str().unwrap() {
            "alloc" => n[0] += 1,
            "free" => n[1] += 1,
            "use" => n[2] += 1,
            "commit" => n[3] += 1,
            _ => {}
        }
    }
    n
}

const FIELDS: [&str; 16] = [
    "policy",
    "backend",
    "events",
    "seconds",
    "peak_requested_bytes",
    "peak_live_bytes",
    "peak_reserved_bytes",
    "reserved_to_live",
    "peak_segments",
    "splits",
    "merges",
    "pages_mapped",
    "pages_unmapped",
    "device_allocations",
    "cache_hits",
    "cache_misses",
];

#[test]
fn a_recorded_repro_trace_replays_under_every_policy() {
    let path = temp("recorded.jsonl");
    let p = path.to_str().unwrap();
    let out = inflight(&[
        "repro",
        "--allocations",
        "4000",
        "--record",
        p,
        "--json",
        "--seed",
        "5",
    ]);
    ok(&out);
    let repro = &json_lines(&out)[0];
    let [allocs, frees, uses, commits] = count(&path);
    assert_eq!(allocs, repro["allocations"].as_u64().unwrap());
    assert_eq!(commits, repro["submissions"].as_u64().unwrap());
    assert_eq!(
        (frees, uses),
        (allocs, allocs),
        "each buffer used once, freed once"
    );

    let reports = replay_json(&path, &["--cache-limit", "256MiB"]);
    let names: Vec<&str> = reports
        .iter()
        .map(|r| r["policy"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["deferred", "retained", "immediate"]);
    for r in &reports {
        for f in FIELDS {
            assert!(!r[f].is_null(), "{f} missing in {r}");
        }
        assert_eq!(r["backend"], "sim");
        assert_eq!(r["events"], allocs + frees + uses + commits);
        assert_eq!(r["allocations"], allocs);
        assert_eq!(r["submissions"], commits);
        assert_eq!(
            r["cache_hits"].as_u64().unwrap() + r["cache_misses"].as_u64().unwrap(),
            allocs
        );
        // Requested, rounded up to blocks, and held from the device.
        let requested = r["peak_requested_bytes"].as_u64().unwrap();
        let live = r["peak_live_bytes"].as_u64().unwrap();
        let reserved = r["peak_reserved_bytes"].as_u64().unwrap();
        assert!(
            requested > 0 && requested <= live && live <= reserved,
            "{r}"
        );
        assert!(r["peak_segments"].as_u64().unwrap() > 0, "{r}");
        assert!(r["stats_balanced"].as_bool().unwrap(), "{r}");
    }
    for safe in &reports[..2] {
        assert_eq!(safe["violations"], 0, "{safe}");
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn the_hand_written_trace_with_every_event_kind_replays() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/every_event.jsonl");
    let reports = replay_json(&path, &[]);
    assert_eq!(reports.len(), 3);
    for r in &reports {
        assert_eq!(r["events"], 18, "{r}");
        assert_eq!(r["allocations"], 5);
        assert_eq!(r["frees"], 5);
        assert_eq!(r["uses"], 5);
        // Three commits, and the open submission of stream 1 at the end.
        assert_eq!(r["submissions"], 4);
        assert_eq!(r["implicit_submissions"], false);
        assert!(
            r["padding_ops"].as_u64().unwrap() > 0,
            "gpu_us ignored: {r}"
        );
        assert_eq!(r["peak_requested_bytes"], 4096 + 1048576 + 3);
        assert!(r["peak_live_bytes"].as_u64().unwrap() > 4096 + 1048576 + 3);
        assert_eq!(
            r["cache_hits"].as_u64().unwrap() + r["cache_misses"].as_u64().unwrap(),
            5
        );
    }
    for safe in &reports[..2] {
        assert_eq!(safe["violations"], 0, "{safe}");
    }
}

#[test]
fn gpu_us_paces_the_simulated_submission() {
    let path = write_trace(
        "gpu_us.jsonl",
        concat!(
            "{\"ev\":\"alloc\",\"id\":1,\"bytes\":1048576,\"stream\":0}\n",
            "{\"ev\":\"use\",\"id\":1,\"stream\":0}\n",
            "{\"ev\":\"commit\",\"stream\":0,\"gpu_us\":300000}\n",
            "{\"ev\":\"free\",\"id\":1}\n",
        ),
    );
    let r = &replay_json(&path, &["--policy", "deferred"])[0];
    let secs = r["seconds"].as_f64().unwrap();
    assert!(secs >= 0.29, "a 300 ms submission took {secs} s: {r}");
    assert_eq!(r["deferred_frees"], 1, "{r}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_malformed_line_is_refused_with_its_number() {
    let path = write_trace(
        "malformed.jsonl",
        "{\"ev\":\"alloc\",\"id\":1,\"bytes\":64,\"stream\":0}\n\n{\"ev\":\"free\",\"id\":1\n",
    );
    let out = inflight(&["replay", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3") && err.contains("malformed"), "{err}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_free_of_an_unknown_id_is_refused_with_its_line() {
    let path = write_trace(
        "unknown.jsonl",
        "{\"ev\":\"alloc\",\"id\":1,\"bytes\":64,\"stream\":0}\n{\"ev\":\"free\",\"id\":2}\n",
    );
    let out = inflight(&["replay", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 2") && err.contains("free of unknown id 2"),
        "{err}"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn bad_replay_arguments_are_refused() {
    let every = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/every_event.jsonl");
    let every = every.to_str().unwrap();
    for args in [
        &["replay", "/nonexistent/trace.jsonl"][..],
        &["replay", every, "--commit-every", "0"],
        &[
            "replay",
            every,
            "--memory-limit",
            "1GiB",
            "--cache-limit",
            "2GiB",
        ],
        &["repro", "--policy", "all", "--record", "/dev/null"],
    ] {
        let out = inflight(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?} printed no reason");
    }
}

/// A trace peaking at 12 GiB of live buffers, without use/commit events,
/// replays on the accounting-only simulated GPU without host memory.
#[test]
fn a_multi_gib_trace_replays_without_backing_its_bytes() {
    let path = temp("large.jsonl");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let mut id = 0u64;
        let mut live: Vec<u64> = Vec::new();
        // 96 long-lived 128 MiB buffers (12 GiB) on two streams...
        for i in 0..96u64 {
            id += 1;
            writeln!(
                w,
                "{{\"ev\":\"alloc\",\"id\":{id},\"bytes\":{},\"stream\":{}}}",
                128u64 << 20,
                i % 2
            )
            .unwrap();
            live.push(id);
        }
        // ...and churn of smaller ones beside them.
        for i in 0..20_000u64 {
            id += 1;
            let bytes = 4096 + (i * 7919 % 64) * 65536;
            writeln!(
                w,
                "{{\"ev\":\"alloc\",\"id\":{id},\"bytes\":{bytes},\"stream\":{}}}",
                i % 2
            )
            .unwrap();
            writeln!(w, "{{\"ev\":\"free\",\"id\":{id}}}").unwrap();
        }
        for id in live {
            writeln!(w, "{{\"ev\":\"free\",\"id\":{id}}}").unwrap();
        }
    }
    let reports = replay_json(&path, &["--policy", "all", "--commit-every", "32"]);
    for r in &reports {
        assert_eq!(r["implicit_submissions"], true);
        assert!(r["submissions"].as_u64().unwrap() > 0);
        let live = r["peak_requested_bytes"].as_u64().unwrap();
        assert!(live >= 12 << 30, "{r}");
        assert!(r["peak_reserved_bytes"].as_u64().unwrap() >= live, "{r}");
        if let Some(rss) = r["host_peak_rss_bytes"].as_u64() {
            assert!(
                rss < 1 << 30,
                "the replay backed its bytes: {rss} B resident"
            );
        }
    }
    for safe in &reports[..2] {
        assert_eq!(safe["violations"], 0, "{safe}");
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn allocator_settings_reach_the_allocator() {
    let every = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/every_event.jsonl");
    // Growable segments map pages; without them, fixed segments only.
    let growable = &replay_json(&every, &["--policy", "deferred"])[0];
    assert!(growable["pages_mapped"].as_u64().unwrap() > 0, "{growable}");
    let fixed = &replay_json(&every, &["--policy", "deferred", "--no-growable"])[0];
    assert_eq!(fixed["pages_mapped"], 0, "{fixed}");
    assert!(fixed["device_allocations"].as_u64().unwrap() > 0, "{fixed}");
    let scrubbed = &replay_json(
        &every,
        &[
            "--policy",
            "deferred",
            "--scrub",
            "--pressure-timeout",
            "1s",
        ],
    )[0];
    assert_eq!(scrubbed["violations"], 0, "{scrubbed}");
    // Limits that contradict each other are refused, by flag.
    let out = inflight(&[
        "replay",
        every.to_str().unwrap(),
        "--memory-limit",
        "1GiB",
        "--gc-limit",
        "2GiB",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--gc-limit"), "{err}");
}

/// The experiment switches exist only with the `experimental` feature.
#[cfg(not(feature = "experimental"))]
#[test]
fn experiment_switches_need_the_feature() {
    let every = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/every_event.jsonl");
    for flag in ["--no-front-cache", "--no-rebind", "--no-in-order-reuse"] {
        let out = inflight(&["replay", every.to_str().unwrap(), flag]);
        assert_eq!(out.status.code(), Some(2), "{flag}");
    }
}

/// The experiment switches reach the allocator: no in-order reuse, no
/// rebinding, whole pages.
#[cfg(feature = "experimental")]
#[test]
fn experiment_switches_reach_the_allocator() {
    let out = inflight(&[
        "repro",
        "--allocations",
        "4000",
        "--json",
        "--no-front-cache",
        "--no-in-order-reuse",
        "--no-rebind",
        "--reuse-wait",
        "host",
        "--size-classes",
        "0",
    ]);
    ok(&out);
    let r = &json_lines(&out)[0];
    assert_eq!(r["stats"]["in_order_hits"], 0, "{r}");
    assert_eq!(r["stats"]["reuse_rebinds"], 0, "{r}");
    assert_eq!(r["violations"], 0, "{r}");
    let bad = inflight(&["repro", "--size-classes", "3"]);
    assert_eq!(bad.status.code(), Some(2));
}
