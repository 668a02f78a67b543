//! `import-torch`, `plot`, `snapshot-check` and gzip input end to end: a
//! PyTorch snapshot built here (JSON, a hand-assembled protocol 2 pickle,
//! and, where python3 is installed, Python's own pickles of protocols 2 to
//! 5) imported into a trace that `replay` and `plot` take; hostile pickles
//! refused.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

mod common;
use common::{inflight, ok, s, temp, text};

const S1: u64 = 0x5581_2c40_0a10;
const S2: u64 = 0x5581_2c40_0b20;
const A: u64 = 0x7f3a_0000_0000;

fn frames() -> Value {
    json!([{"filename": "model.py", "line": 12, "name": "forward"}])
}

fn entry(action: &str, addr: u64, size: u64, stream: u64, t: u64) -> Value {
    json!({"action": action, "addr": addr, "size": size, "stream": stream,
           "time_us": 1_700_000_000_000_000u64 + t, "frames": frames()})
}

/// Three devices: device 0 empty, device 1 the trace below, device 2 two
/// entries.
fn snapshot() -> Value {
    let d1 = vec![
        // Allocated before recording began, freed during it: skipped.
        entry("free_requested", A + 0x10_0000, 4096, S1, 0),
        entry("free_completed", A + 0x10_0000, 4096, S1, 1),
        entry("segment_alloc", A, 20 << 20, S1, 2),
        entry("alloc", A, 1 << 20, S1, 3),
        entry("alloc", A + (1 << 20), 2 << 20, S2, 4),
        entry("alloc", A + (3 << 20), 512, S1, 5),
        entry("free_requested", A, 1 << 20, S1, 6),
        entry("free_completed", A, 1 << 20, S1, 7),
        // Reused after its free: a new buffer.
        entry("alloc", A, 1 << 20, S2, 8),
        json!({"action": "oom", "device_free": 1024, "size": 1u64 << 40,
               "stream": S1, "time_us": 1_700_000_000_000_009u64}),
        json!({"action": "snapshot", "addr": 0, "size": 0, "stream": 0,
               "time_us": 1_700_000_000_000_010u64}),
        // A free_completed alone.
        entry("free_completed", A + (1 << 20), 2 << 20, S2, 11),
        entry("segment_free", A + (40 << 20), 2 << 20, S1, 12),
        entry("free_requested", A + (3 << 20), 512, S1, 13),
        entry("free_completed", A + (3 << 20), 512, S1, 14),
    ];
    json!({
        "segments": [],
        "device_traces": [[], d1, [entry("alloc", A, 64, 0, 0), entry("free_requested", A, 64, 0, 1)]],
        "allocator_settings": {"PYTORCH_CUDA_ALLOC_CONF": ""},
    })
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn check_trace(out: &Path) {
    let ev = lines(out);
    assert_eq!(ev[0]["ev"], "meta");
    assert_eq!(ev[0]["device"], 1);
    assert_eq!(ev[0]["skipped_frees"], 1);
    assert_eq!(ev[0]["skipped_entries"]["oom"], 1);
    assert_eq!(ev[0]["skipped_entries"]["snapshot"], 1);
    assert_eq!(ev[0]["skipped_entries"]["segment_alloc"], 1);
    assert_eq!(ev[0]["streams"], json!([S1, S2]));
    let evs: Vec<_> = ev[1..]
        .iter()
        .map(|e| {
            (
                e["ev"].as_str().unwrap().to_string(),
                e["id"].as_u64().unwrap(),
                e.get("stream").and_then(Value::as_u64),
                e["t"].as_u64().unwrap(),
            )
        })
        .collect();
    let a = |id, stream, t| ("alloc".to_string(), id, Some(stream), t);
    let f = |id, t| ("free".to_string(), id, None, t);
    assert_eq!(
        evs,
        [
            a(1, 0, 3),
            a(2, 1, 4),
            a(3, 0, 5),
            f(1, 6),
            a(4, 1, 8),
            f(2, 11),
            f(3, 13)
        ]
    );
}

#[test]
fn import_a_json_snapshot_then_replay_and_plot() {
    let snap = temp("snap.json");
    std::fs::write(&snap, serde_json::to_vec(&snapshot()).unwrap()).unwrap();
    let out = temp("trace.jsonl");
    let r = inflight(&["import-torch", s(&snap), "-o", s(&out)]);
    ok(&r);
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        stdout.contains("wrote 7 events") && stdout.contains("2 streams"),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("importing device 1"),
        "{}",
        text(&r)
    );
    check_trace(&out);
    // Another device, and a gzip-compressed output.
    let out2 = temp("trace2.jsonl.gz");
    let r = inflight(&[
        "import-torch",
        s(&snap),
        "-o",
        s(&out2),
        "--device",
        "2",
        "--json",
    ]);
    ok(&r);
    let summary: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(summary["device"], 2);
    assert_eq!(summary["events"], 2);
    assert_eq!(std::fs::read(&out2).unwrap()[..2], [0x1f, 0x8b]);
    // Replay takes both, the gzip one too.
    for t in [&out, &out2] {
        let r = inflight(&["replay", s(t), "--json"]);
        ok(&r);
        let reports: Vec<Value> = String::from_utf8_lossy(&r.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(reports.len(), 3);
    }
    let r = inflight(&["replay", s(&out), "--json", "--policy", "deferred"]);
    let rep: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(rep["allocations"], 4);
    assert_eq!(rep["frees"], 3);
    assert_eq!(rep["peak_requested_bytes"], (1u64 << 20) + (2 << 20) + 512);
    // Errors name the device.
    let r = inflight(&["import-torch", s(&snap), "-o", s(&out2), "--device", "0"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(text(&r).contains("no entries"), "{}", text(&r));
    // Plot it, as SVG and PNG, by events and by time.
    let svg = temp("plot.svg");
    ok(&inflight(&["plot", s(&out), "-o", s(&svg), "--quiet"]));
    check_svg(
        &svg,
        &["deferred", "retained", "immediate"],
        "events replayed",
    );
    let svg_t = temp("plot-t.svg");
    ok(&inflight(&[
        "plot",
        s(&out),
        "-o",
        s(&svg_t),
        "--x",
        "time",
        "--policy",
        "deferred",
    ]));
    check_svg(&svg_t, &["deferred"], "time since the first event (µs)");
    let png = temp("plot.png");
    ok(&inflight(&[
        "plot",
        s(&out),
        "-o",
        s(&png),
        "--width",
        "800",
        "--height",
        "500",
    ]));
    let data = std::fs::read(&png).unwrap();
    assert_eq!(
        data[..8],
        [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n']
    );
    assert_eq!(&data[12..16], b"IHDR");
    let w = u32::from_be_bytes(data[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(data[20..24].try_into().unwrap());
    assert_eq!((w, h), (800, 500));
    let r = inflight(&["plot", s(&out), "-o", s(&temp("plot.gif"))]);
    assert_eq!(r.status.code(), Some(2));
    assert!(text(&r).contains(".svg or .png"), "{}", text(&r));
}

fn check_svg(path: &Path, policies: &[&str], x_label: &str) {
    let svg = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    let polylines: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .collect();
    let of = |class: &str| {
        polylines
            .iter()
            .filter(|n| n.attribute("class") == Some(class))
            .map(|n| n.attribute("data-policy").unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(of("live").len(), 1);
    let mut reserved = of("reserved");
    let mut pending = of("pending");
    reserved.sort();
    pending.sort();
    let mut want: Vec<String> = policies.iter().map(|p| p.to_string()).collect();
    want.sort();
    assert_eq!(reserved, want);
    assert_eq!(pending, want);
    for p in &polylines {
        let pts = p.attribute("points").unwrap();
        assert!(pts.split(' ').count() >= 2, "{pts}");
    }
    let texts: Vec<String> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| n.text().unwrap_or("").to_string())
        .collect();
    let has = |s: &str| texts.iter().any(|t| t.contains(s));
    assert!(has("memory over the replay"), "{texts:?}");
    assert!(has(x_label), "{texts:?}");
    assert!(has("memory (MiB)"), "{texts:?}");
    for p in policies {
        assert!(has(&format!("{p} reserved, peak")), "{texts:?}");
    }
    assert!(has("live (requested), peak 3.0 MiB"), "{texts:?}");
}

/// A protocol 2 pickle of {'device_traces': [[alloc A 512, free_requested
/// A 512]]}, as Python 3's pickle.dumps(..., protocol=2) lays it out
/// (BINPUT memo, LONG1 for the 64-bit address).
fn protocol_2() -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'q', 0];
    let key = |p: &mut Vec<u8>, k: &str| {
        p.push(b'X');
        p.extend((k.len() as u32).to_le_bytes());
        p.extend(k.as_bytes());
    };
    key(&mut p, "device_traces");
    p.extend([b']', b'q', 1, b']', b'q', 2, b'(']);
    for action in ["alloc", "free_requested"] {
        p.extend([b'}', b'(']);
        key(&mut p, "action");
        key(&mut p, action);
        key(&mut p, "addr");
        p.extend([0x8a, 6]);
        p.extend(&A.to_le_bytes()[..6]);
        key(&mut p, "size");
        p.extend([b'M', 0x00, 0x02]); // 512
        key(&mut p, "stream");
        p.extend([b'K', 0]);
        key(&mut p, "time_us");
        p.extend([b'J', 10, 0, 0, 0]);
        p.push(b'u');
    }
    p.extend([b'e', b'a', b's', b'.']);
    p
}

#[test]
fn import_a_hand_made_protocol_2_pickle() {
    let snap = temp("p2.pickle");
    std::fs::write(&snap, protocol_2()).unwrap();
    let out = temp("p2.jsonl");
    ok(&inflight(&["import-torch", s(&snap), "-o", s(&out), "-q"]));
    let ev = lines(&out);
    assert_eq!(ev.len(), 3);
    assert_eq!(
        ev[1],
        json!({"ev": "alloc", "id": 1, "bytes": 512, "stream": 0, "t": 0})
    );
    assert_eq!(ev[2], json!({"ev": "free", "id": 1, "t": 0}));
    ok(&inflight(&["replay", s(&out)]));
}

#[test]
fn pythons_own_pickles_are_read() {
    let Ok(py) = Command::new("python3").arg("--version").output() else {
        eprintln!("no python3: skipped");
        return;
    };
    if !py.status.success() {
        eprintln!("no python3: skipped");
        return;
    }
    let snap = temp("py.json");
    std::fs::write(&snap, serde_json::to_vec(&snapshot()).unwrap()).unwrap();
    for proto in 2..=5 {
        let pickle = temp(&format!("py{proto}.pickle"));
        // Tuples as PyTorch writes them, to exercise TUPLE2.
        let script = format!(
            "import json, pickle\n\
             d = json.load(open({snap:?}))\n\
             d['segments'] = [{{'segment_pool_id': (0, 0)}}]\n\
             pickle.dump(d, open({pickle:?}, 'wb'), protocol={proto})\n",
            snap = s(&snap),
            pickle = s(&pickle)
        );
        let r = Command::new("python3")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        ok(&r);
        let out = temp(&format!("py{proto}.jsonl"));
        ok(&inflight(&["import-torch", s(&pickle), "-o", s(&out)]));
        check_trace(&out);
    }
}

#[test]
fn hostile_and_broken_snapshots_are_refused() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // GLOBAL os.system at byte 2.
        (
            "global",
            b"\x80\x02cos\nsystem\nq\x00.".to_vec(),
            "byte 2: opcode GLOBAL",
        ),
        ("reduce", b"\x80\x04N)R.".to_vec(), "byte 4: opcode REDUCE"),
        ("truncated", protocol_2()[..40].to_vec(), "truncated"),
        ("cut", protocol_2()[..60].to_vec(), "truncated"),
        (
            "huge",
            b"\x80\x04X\x00\x00\x00\xf0abc.".to_vec(),
            "4026531840 bytes",
        ),
        (
            "json",
            b"{\"device_traces\": [[}".to_vec(),
            "at line 1 column",
        ),
        ("neither", b"hello".to_vec(), "neither a pickle"),
    ];
    for (name, data, want) in cases {
        let path = temp(&format!("bad-{name}.pickle"));
        std::fs::write(&path, &data).unwrap();
        let out = temp(&format!("bad-{name}.jsonl"));
        let r = inflight(&["import-torch", s(&path), "-o", s(&out)]);
        assert_eq!(r.status.code(), Some(2), "{name}: {}", text(&r));
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(stderr.contains(want), "{name}: {stderr}");
        assert!(!out.exists(), "{name}: an output was written");
    }
}

#[test]
fn snapshot_check_reports_problems() {
    let good = json!({
        "segments": [{
            "device": 0, "address": A, "total_size": 2048, "allocated_size": 512,
            "active_size": 512, "requested_size": 500, "stream": 0,
            "segment_type": "small", "segment_pool_id": [0, 0], "is_expandable": false,
            "frames": [],
            "blocks": [
                {"address": A, "size": 512, "requested_size": 500, "state": "active_allocated", "frames": []},
                {"address": A + 512, "size": 1536, "requested_size": 0, "state": "inactive", "frames": []}
            ]
        }],
        "device_traces": [[
            {"action": "segment_alloc", "addr": A, "size": 2048, "stream": 0, "time_us": 1, "frames": []},
            {"action": "alloc", "addr": A, "size": 512, "stream": 0, "time_us": 2, "frames": []}
        ]]
    });
    let path = temp("check-good.json");
    std::fs::write(&path, serde_json::to_vec(&good).unwrap()).unwrap();
    let r = inflight(&["snapshot-check", s(&path)]);
    ok(&r);
    assert!(text(&r).contains("sound"), "{}", text(&r));
    let mut bad = good.clone();
    bad["segments"][0]["total_size"] = json!(4096);
    // A free_completed of an allocated block, without its free_requested.
    bad["device_traces"][0].as_array_mut().unwrap().push(json!(
        {"action": "free_completed", "addr": A, "size": 512, "stream": 0, "time_us": 3, "frames": []}
    ));
    let path = temp("check-bad.json");
    std::fs::write(&path, serde_json::to_vec(&bad).unwrap()).unwrap();
    let r = inflight(&["snapshot-check", s(&path), "--json"]);
    assert_eq!(r.status.code(), Some(1), "{}", text(&r));
    let v: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let problems = v["problems"].to_string();
    assert!(problems.contains("add up to"), "{problems}");
    assert!(problems.contains("without a free_requested"), "{problems}");
}

#[test]
fn replay_reads_gzip() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/every_event.jsonl");
    let gz = temp("every_event.jsonl.gz");
    // A gzip stream with stored (uncompressed) blocks, made by hand so
    // the test needs no compressor: header, one final stored block, CRC32
    // and length.
    let data = std::fs::read(&src).unwrap();
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    out.push(1);
    let len = data.len() as u16;
    out.extend(len.to_le_bytes());
    out.extend((!len).to_le_bytes());
    out.extend(&data);
    out.extend(crc32(&data).to_le_bytes());
    out.extend((data.len() as u32).to_le_bytes());
    std::fs::File::create(&gz).unwrap().write_all(&out).unwrap();
    let plain = inflight(&["replay", s(&src), "--json", "--policy", "deferred"]);
    let zipped = inflight(&["replay", s(&gz), "--json", "--policy", "deferred"]);
    ok(&plain);
    ok(&zipped);
    let a: Value = serde_json::from_slice(&plain.stdout).unwrap();
    let b: Value = serde_json::from_slice(&zipped.stdout).unwrap();
    assert_eq!(a["events"], b["events"]);
    assert_eq!(a["peak_requested_bytes"], b["peak_requested_bytes"]);
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xedb8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A real snapshot, recorded on the H200 with PyTorch's default allocator
/// (`scripts/torch/record_snapshot.py --steps 3 --stacks python`: ResNet-18
/// training at batches 16, 48 and 32, a tensor used on a side stream with
/// `record_stream`; PyTorch reserved 1,275,068,416 bytes at its peak),
/// gzip-compressed: checked, imported, and replayed under every policy.
#[test]
fn a_real_snapshot_checks_imports_and_replays() {
    let snap = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/real_resnet18.pickle.gz");
    let r = inflight(&["snapshot-check", s(&snap), "--json"]);
    ok(&r);
    let v: Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        (&v["check"]["segments"], &v["check"]["events"]),
        (&json!(46), &json!(2534))
    );
    let out = temp("real_resnet18.jsonl");
    ok(&inflight(&["import-torch", s(&snap), "-o", s(&out)]));
    let ev = lines(&out);
    assert_eq!(ev[0]["ev"], "meta");
    assert_eq!(ev[0]["streams"].as_array().unwrap().len(), 2, "{}", ev[0]);
    let allocs = ev.iter().filter(|e| e["ev"] == "alloc").count();
    let frees = ev.iter().filter(|e| e["ev"] == "free").count();
    assert_eq!((allocs, frees), (997, 746));
    let r = inflight(&["replay", s(&out), "--json"]);
    ok(&r);
    let runs: Vec<Value> = String::from_utf8_lossy(&r.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(runs.len(), 3);
    for run in &runs {
        assert_eq!(run["violations"], 0, "{run}");
        assert_eq!(run["stats_balanced"], true, "{run}");
        assert_eq!(run["oom_errors"], 0, "{run}");
    }
    let deferred = runs.iter().find(|r| r["policy"] == "deferred").unwrap();
    assert!(
        deferred["peak_reserved_bytes"].as_u64().unwrap() < 1_275_068_416,
        "deferred reserved more than PyTorch did: {deferred}"
    );
    let _ = std::fs::remove_file(&out);
}
