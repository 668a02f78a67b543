//! `replay --snapshot` end to end: a small hand-written trace on three
//! streams, with buffers freed while their work is in flight, replayed
//! under `deferred`; the snapshot written as JSON and as a pickle, checked
//! by `snapshot-check` and, for the JSON, read here too.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;
use common::{inflight, ok, s, temp};

/// Three streams; each commit keeps its work in flight for 20 ms (on the
/// simulated GPU), and the buffers it uses are freed right after it, so
/// their frees are requested in flight and completed later. Stream 1 also
/// uses a buffer allocated for stream 2, and one large buffer is never
/// used.
const TRACE: &str = r#"{"ev":"meta","source":"hand-written","note":"frees in flight on three streams"}
{"ev":"alloc","id":1,"bytes":65536,"stream":0}
{"ev":"alloc","id":2,"bytes":3145728,"stream":1}
{"ev":"alloc","id":3,"bytes":300,"stream":2}
{"ev":"use","id":1,"stream":0}
{"ev":"use","id":2,"stream":1}
{"ev":"use","id":3,"stream":2}
{"ev":"commit","stream":0,"gpu_us":20000}
{"ev":"commit","stream":1,"gpu_us":20000}
{"ev":"commit","stream":2,"gpu_us":20000}
{"ev":"free","id":1}
{"ev":"free","id":2}
{"ev":"free","id":3}
{"ev":"alloc","id":4,"bytes":65536,"stream":0}
{"ev":"alloc","id":5,"bytes":3145728,"stream":2}
{"ev":"use","id":4,"stream":0}
{"ev":"use","id":5,"stream":1}
{"ev":"commit","stream":0,"gpu_us":20000}
{"ev":"commit","stream":1,"gpu_us":20000}
{"ev":"free","id":4}
{"ev":"free","id":5}
{"ev":"alloc","id":6,"bytes":20971520,"stream":1}
{"ev":"alloc","id":7,"bytes":1000,"stream":2}
{"ev":"use","id":7,"stream":2}
{"ev":"commit","stream":2,"gpu_us":1000}
{"ev":"free","id":6}
{"ev":"free","id":7}
"#;

/// The trace, in a file of its own for test `name` (tests run at once).
fn trace(name: &str) -> PathBuf {
    let path = temp(&format!("{name}.jsonl"));
    std::fs::write(&path, TRACE).unwrap();
    path
}

/// `snapshot-check --json FILE`: the checker's figures, or the test fails
/// with its problems.
fn check(path: &Path) -> Value {
    let out = inflight(&["snapshot-check", "--json", s(path)]);
    ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    v["check"].clone()
}

#[test]
fn replay_writes_a_sound_snapshot_as_json_and_as_a_pickle() {
    let trace = trace("sound");
    let json = temp("snap.json");
    let out = inflight(&[
        "replay",
        s(&trace),
        "--policy",
        "deferred",
        "--json",
        "--snapshot",
        s(&json),
    ]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("front caches"), "no note: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["violations"], 0, "{report}");

    let c = check(&json);
    assert!(c["segments"].as_u64().unwrap() > 0, "{c}");

    // Read here too: the fields, the blocks against their segment, and the
    // history.
    let v: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let segments = v["segments"].as_array().unwrap();
    assert!(!segments.is_empty());
    for seg in segments {
        for f in [
            "device",
            "address",
            "total_size",
            "allocated_size",
            "active_size",
            "requested_size",
            "stream",
            "segment_type",
            "segment_pool_id",
            "is_expandable",
            "frames",
            "blocks",
        ] {
            assert!(!seg[f].is_null(), "{f} missing in {seg}");
        }
        let blocks = seg["blocks"].as_array().unwrap();
        let mut at = seg["address"].as_u64().unwrap();
        for b in blocks {
            for f in ["address", "size", "requested_size", "state", "frames"] {
                assert!(!b[f].is_null(), "{f} missing in {b}");
            }
            assert_eq!(b["address"].as_u64().unwrap(), at, "{seg}");
            at += b["size"].as_u64().unwrap();
        }
        let sum: u64 = blocks.iter().map(|b| b["size"].as_u64().unwrap()).sum();
        assert_eq!(sum, seg["total_size"].as_u64().unwrap(), "{seg}");
    }
    let traces = v["device_traces"].as_array().unwrap();
    let events = traces.last().unwrap().as_array().unwrap();
    let count = |action: &str| events.iter().filter(|e| e["action"] == action).count();
    assert!(
        count("segment_map") + count("segment_alloc") > 0,
        "no segment entries"
    );
    assert_eq!(count("alloc"), 7);
    assert_eq!(count("free_requested"), 7);
    assert_eq!(count("free_completed"), 7);
    // Every free_completed follows a free_requested of its address, and
    // some were requested while work was in flight: something else
    // happened between the two.
    let mut requested = HashSet::new();
    let mut in_flight = 0;
    for (i, e) in events.iter().enumerate() {
        for f in ["action", "addr", "size", "stream", "time_us"] {
            assert!(!e[f].is_null(), "{f} missing in {e}");
        }
        let addr = e["addr"].as_u64().unwrap();
        match e["action"].as_str().unwrap() {
            "free_requested" => {
                requested.insert(addr);
                if events
                    .get(i + 1)
                    .is_some_and(|n| n["action"] != "free_completed")
                {
                    in_flight += 1;
                }
            }
            "free_completed" => assert!(
                requested.remove(&addr),
                "free_completed of 0x{addr:x} without a free_requested before it"
            ),
            _ => {}
        }
    }
    assert!(in_flight > 0, "no free was requested in flight");

    let pickle = temp("snap.pickle");
    ok(&inflight(&[
        "replay",
        s(&trace),
        "--policy",
        "deferred",
        "--quiet",
        "--snapshot",
        s(&pickle),
    ]));
    assert_eq!(std::fs::read(&pickle).unwrap()[0], 0x80, "not a pickle");
    let p = check(&pickle);
    assert!(p["segments"].as_u64().unwrap() > 0, "{p}");
    assert!(p["events"].as_u64().unwrap() >= 21, "{p}");
    for f in [&trace, &json, &pickle] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn several_policies_write_one_snapshot_each() {
    let trace = trace("each");
    let base = temp("each.json");
    let out = inflight(&["replay", s(&trace), "--quiet", "--snapshot", s(&base)]);
    ok(&out);
    assert!(!base.exists(), "the name without a policy was written");
    for policy in ["deferred", "retained", "immediate"] {
        let path = base.with_file_name(format!(
            "{}.{policy}.json",
            base.file_stem().unwrap().to_str().unwrap()
        ));
        assert!(path.exists(), "{} missing", path.display());
        if policy != "immediate" {
            check(&path);
        }
        let _ = std::fs::remove_file(&path);
    }
    let _ = std::fs::remove_file(&trace);
}

#[test]
fn a_snapshot_name_without_a_known_extension_is_refused_before_the_run() {
    let trace = trace("refused");
    let bad = temp("snap.txt");
    let out = inflight(&["replay", s(&trace), "--snapshot", s(&bad)]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(".pickle"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "it ran: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!bad.exists());
    let out = inflight(&[
        "repro",
        "--allocations",
        "100",
        "--repeat",
        "2",
        "--snapshot",
        s(&temp("r.json")),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_file(&trace);
}

/// Two threads on three queues: buffers reused in order on one queue and
/// bound on another are rebound (rule S2), and the history shows each move.
#[test]
fn repro_writes_a_sound_snapshot() {
    let path = temp("repro.pickle");
    let out = inflight(&[
        "repro",
        "--allocations",
        "2000",
        "--threads",
        "2",
        "--queues",
        "3",
        "--quiet",
        "--snapshot",
        s(&path),
    ]);
    ok(&out);
    let c = check(&path);
    assert!(c["events"].as_u64().unwrap() >= 3 * 2000, "{c}");
    let _ = std::fs::remove_file(&path);
}
