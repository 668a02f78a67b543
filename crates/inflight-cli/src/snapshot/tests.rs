//! The snapshot writer and checker on a hand-made snapshot: the sample
//! is sound, round-trips through both formats, and each kind of damage is
//! caught.

use super::check::{check_snapshot_file, check_snapshot_structure};
use super::*;
use inflight::history::{BlockInfo, BlockState, MemoryEvent, PoolKind, SegmentInfo};

const SEG: u64 = 0x7f00_0000_0000;
const MIB: u64 = 1 << 20;

fn ev(action: MemoryAction, addr: u64, size: u64, queue: u32, time_us: u64) -> MemoryEvent {
    MemoryEvent {
        action,
        addr,
        size,
        queue,
        time_us,
    }
}

/// Two segments on device 1: a 2 MiB small one split into three
/// blocks (allocated, pending, free) and a 20 MiB large one with one
/// free block; a history that ends in that state, with a pending
/// span, an address reused, a segment freed, and an oom.
pub(crate) fn sample() -> MemorySnapshot {
    use MemoryAction::*;
    let big = SEG + 0x1000_0000;
    let gone = SEG + 0x2000_0000;
    MemorySnapshot {
        device: 1,
        segments: vec![
            SegmentInfo {
                address: SEG,
                total_size: 2 * MIB,
                queue: 0,
                pool: PoolKind::Small,
                expandable: false,
                blocks: vec![
                    BlockInfo {
                        address: SEG,
                        size: 512,
                        requested_size: 500,
                        state: BlockState::Allocated,
                    },
                    BlockInfo {
                        address: SEG + 512,
                        size: 1024,
                        requested_size: 1000,
                        state: BlockState::PendingFree,
                    },
                    BlockInfo {
                        address: SEG + 1536,
                        size: 2 * MIB - 1536,
                        requested_size: 0,
                        state: BlockState::Inactive,
                    },
                ],
            },
            SegmentInfo {
                address: big,
                total_size: 20 * MIB,
                queue: 1,
                pool: PoolKind::Large,
                expandable: false,
                blocks: vec![BlockInfo {
                    address: big,
                    size: 20 * MIB,
                    requested_size: 0,
                    state: BlockState::Inactive,
                }],
            },
        ],
        events: vec![
            ev(SegmentAlloc, SEG, 2 * MIB, 0, 10),
            ev(Alloc, SEG, 512, 0, 11),
            ev(FreeRequested, SEG, 512, 0, 12),
            ev(FreeCompleted, SEG, 512, 0, 13),
            ev(Alloc, SEG, 512, 0, 14),
            ev(Alloc, SEG + 512, 1024, 0, 15),
            ev(FreeRequested, SEG + 512, 1024, 0, 16),
            ev(SegmentAlloc, big, 20 * MIB, 1, 17),
            ev(Alloc, big, 4 * MIB, 1, 18),
            ev(FreeRequested, big, 4 * MIB, 1, 19),
            ev(FreeCompleted, big, 4 * MIB, 1, 30),
            ev(SegmentAlloc, gone, 20 * MIB, 1, 31),
            ev(SegmentFree, gone, 20 * MIB, 1, 32),
            ev(Oom, 0, 64 * MIB, 1, 33),
        ],
    }
}

#[test]
fn the_sample_is_sound() {
    let v = snapshot_value(&sample());
    let c = check_snapshot_structure(&v).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.segments, 2);
    assert_eq!(c.blocks, 4);
    assert_eq!(c.events, 14);
    assert_eq!(c.devices, [1]);
    let traces = v.get("device_traces").unwrap().as_seq().unwrap();
    assert_eq!(traces.len(), 2);
    assert!(traces[0].as_seq().unwrap().is_empty());
    let seg = &v.get("segments").unwrap().as_seq().unwrap()[0];
    assert_eq!(seg.get("allocated_size"), Some(&PyValue::int(512)));
    assert_eq!(seg.get("active_size"), Some(&PyValue::int(1536)));
    assert_eq!(seg.get("requested_size"), Some(&PyValue::int(1500)));
    assert_eq!(seg.get("segment_type").unwrap().as_str(), Some("small"));
    assert_eq!(
        seg.get("segment_pool_id"),
        Some(&PyValue::tuple(vec![PyValue::int(0), PyValue::int(0)]))
    );
}

#[test]
fn round_trips_through_pickle_and_json() {
    let v = snapshot_value(&sample());
    let bytes = crate::pickle::to_vec(&v);
    let back = parse_snapshot(&bytes, &mut |_, _| {}).unwrap();
    assert_eq!(back, v);
    check_snapshot_structure(&back).unwrap();
    let text = serde_json::to_vec(&v).unwrap();
    let back = parse_snapshot(&text, &mut |_, _| {}).unwrap();
    // JSON has no tuples: the pool id comes back as a list.
    let seg = &back.get("segments").unwrap().as_seq().unwrap()[0];
    assert_eq!(
        seg.get("segment_pool_id"),
        Some(&PyValue::list(vec![PyValue::int(0), PyValue::int(0)]))
    );
    check_snapshot_structure(&back).unwrap();
    let j: serde_json::Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(j["device_traces"][1][13]["action"], "oom");
    assert_eq!(j["device_traces"][1][13]["device_free"], 0);
    assert_eq!(
        j["segments"][0]["blocks"][1]["state"],
        "active_pending_free"
    );
}

#[test]
fn write_snapshot_picks_the_format_by_name() {
    let dir = std::env::temp_dir().join(format!("inflight-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let snap = sample();
    for name in ["s.pickle", "s.json"] {
        let path = dir.join(name);
        write_snapshot(&snap, &path).unwrap();
        let c = check_snapshot_file(&path).unwrap();
        assert_eq!(c.events, 14);
    }
    assert_eq!(std::fs::read(dir.join("s.pickle")).unwrap()[0], 0x80);
    assert_eq!(std::fs::read(dir.join("s.json")).unwrap()[0], b'{');
    let e = write_snapshot(&snap, &dir.join("s.txt")).unwrap_err();
    assert!(e.to_string().contains(".pickle"), "{e}");
    assert!(!dir.join("s.txt").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn problems(snap: &MemorySnapshot) -> String {
    check_snapshot_structure(&snapshot_value(snap))
        .expect_err("a problem")
        .to_string()
}

#[test]
fn broken_snapshots_are_caught() {
    // Blocks that do not add up.
    let mut s = sample();
    s.segments[0].total_size += 512;
    assert!(problems(&s).contains("add up to"), "{}", problems(&s));
    // A free_completed with no free_requested before it.
    let mut s = sample();
    s.events.remove(2);
    let p = problems(&s);
    assert!(p.contains("without a free_requested"), "{p}");
    // A free_requested missing: the trace ends with the block
    // allocated, the segments say it is pending.
    let mut s = sample();
    s.events.remove(6);
    let p = problems(&s);
    assert!(p.contains("no active_allocated block"), "{p}");
    // An alloc in a segment that does not exist yet.
    let mut s = sample();
    s.events.swap(7, 8);
    let p = problems(&s);
    assert!(p.contains("live before it"), "{p}");
    // Overlapping segments.
    let mut s = sample();
    s.segments[1].address = SEG + MIB;
    s.segments[1].blocks[0].address = SEG + MIB;
    let p = problems(&s);
    assert!(p.contains("overlaps"), "{p}");
}

#[test]
fn missing_fields_are_named() {
    let v = PyValue::dict([
        (
            "segments",
            PyValue::list(vec![PyValue::dict([("device", PyValue::int(0))])]),
        ),
        (
            "device_traces",
            PyValue::list(vec![PyValue::list(vec![PyValue::dict([(
                "action",
                PyValue::str("alloc"),
            )])])]),
        ),
    ]);
    let e = check_snapshot_structure(&v).unwrap_err();
    let text = e.to_string();
    assert!(text.contains("segments[0]: no \"total_size\""), "{text}");
    assert!(
        text.contains("device_traces[0][0] (alloc): no \"addr\""),
        "{text}"
    );
    assert!(e.count > e.problems.len() || e.count == e.problems.len());
    assert!(check_snapshot_structure(&PyValue::list(vec![])).is_err());
}
