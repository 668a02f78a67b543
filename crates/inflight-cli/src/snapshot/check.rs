//! `inflight snapshot-check`: [`check_snapshot_structure`] checks a
//! snapshot (ours or PyTorch's) the way PyTorch's viewer and `_memory_viz`
//! will use it: fields, sizes, and the history walked back against the
//! segments. docs/SNAPSHOTS.md lists what is checked.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::pyvalue::PyValue;

use super::read_snapshot;

/// `inflight snapshot-check FILE`.
#[derive(clap::Args)]
pub struct CheckArgs {
    /// The snapshot: a pickle (protocols 2 to 5) or JSON, gzip-compressed
    /// or not.
    file: PathBuf,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Checks a snapshot file: exit status 0 if sound, 1 with the problems
/// listed if not, 2 if it cannot be read.
pub fn command(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let v = read_snapshot(&a.file)?;
    let result = check_snapshot_structure(&v);
    if a.json {
        let out = match &result {
            Ok(c) => serde_json::json!({"ok": true, "check": c}),
            Err(p) => serde_json::json!({"ok": false, "problems": p.problems, "count": p.count}),
        };
        println!("{out}");
    } else {
        match &result {
            Ok(c) => println!(
                "{}: sound: {} segments, {} blocks, {} trace entries on device(s) {:?}; \
                 {} frees of blocks allocated before the recording",
                a.file.display(),
                c.segments,
                c.blocks,
                c.events,
                c.devices,
                c.frees_before_recording
            ),
            Err(p) => println!("{}: {p}", a.file.display()),
        }
    }
    Ok(if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// What [`check_snapshot_structure`] found in a sound snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotCheck {
    pub segments: usize,
    pub blocks: usize,
    /// Trace entries, over all devices.
    pub events: usize,
    /// Devices with segments or trace entries.
    pub devices: Vec<usize>,
    /// Frees of blocks allocated before the recording began, or before
    /// the oldest event a full history kept (their alloc is not in the
    /// trace): allowed, counted.
    pub frees_before_recording: usize,
    /// Entries whose `time_us` is below the one before.
    pub time_reversals: usize,
}

/// The problems [`check_snapshot_structure`] found (the first
/// [`SnapshotProblems::MAX`] of them), each with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotProblems {
    pub problems: Vec<String>,
    /// How many there were in all.
    pub count: usize,
}

impl SnapshotProblems {
    pub const MAX: usize = 20;
}

impl fmt::Display for SnapshotProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} problem(s) in the snapshot:", self.count)?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        if self.count > self.problems.len() {
            write!(f, "\n  … and {} more", self.count - self.problems.len())?;
        }
        Ok(())
    }
}

impl std::error::Error for SnapshotProblems {}

struct Problems {
    list: Vec<String>,
    count: usize,
}

impl Problems {
    fn add(&mut self, p: String) {
        self.count += 1;
        if self.list.len() < SnapshotProblems::MAX {
            self.list.push(p);
        }
    }
}

/// The block states PyTorch writes.
const STATES: [&str; 3] = ["active_allocated", "active_pending_free", "inactive"];

/// The trace actions PyTorch writes.
const ACTIONS: [&str; 10] = [
    "alloc",
    "free_requested",
    "free_completed",
    "segment_alloc",
    "segment_free",
    "segment_map",
    "segment_unmap",
    "snapshot",
    "oom",
    "annotate",
];

/// Checks a snapshot the way PyTorch's viewer and `_memory_viz` use it:
///
/// - fields: the top-level `segments` and `device_traces`; each segment's
///   `device`, `address`, `total_size`, `allocated_size`, `active_size`,
///   `requested_size`, `stream`, `segment_type`, `segment_pool_id`,
///   `is_expandable`, `frames` and `blocks`; each block's `address`,
///   `size`, `requested_size`, `state` and `frames`; each trace entry's
///   `action`, `addr` (`device_free` for `oom`), `size`, `stream` and
///   `time_us` (and `frames` where present: PyTorch leaves it out of
///   entries recorded without context), with their types and known values;
/// - sizes: blocks cover their segment in address order and add up to its
///   `total_size`; `allocated_size`, `active_size` and `requested_size`
///   are the sums PyTorch makes; a block's `requested_size` is at most its
///   size; segments of a device do not overlap;
/// - history, per address: an `alloc` only of a free address, a
///   `free_requested` only of an allocated one (or of one allocated before
///   the recording began), every `free_completed` after a
///   `free_requested` of that address, with the same size (or of one freed
///   before the recording, or before the oldest event a full history
///   kept);
/// - the history against the final state, walking back from the end as
///   the viewer does to draw each moment: blocks live at the end are the
///   allocated (or pending) blocks of the segments, `segment_alloc` and
///   `segment_free` (`segment_map`/`segment_unmap` for growable segments)
///   match the segments, and every block live at any moment lies in a
///   segment then (else the viewer fails to draw it).
pub fn check_snapshot_structure(v: &PyValue) -> Result<SnapshotCheck, SnapshotProblems> {
    let mut p = Problems {
        list: Vec::new(),
        count: 0,
    };
    let mut c = SnapshotCheck::default();
    check(v, &mut p, &mut c);
    if p.count == 0 {
        Ok(c)
    } else {
        Err(SnapshotProblems {
            problems: p.list,
            count: p.count,
        })
    }
}

/// Reads a snapshot file and checks it.
#[cfg_attr(not(test), allow(dead_code))] // API for `--snapshot` tests; the tests use it
pub fn check_snapshot_file(path: &Path) -> anyhow::Result<SnapshotCheck> {
    let v = read_snapshot(path)?;
    check_snapshot_structure(&v).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// A segment's range and stream, as the viewer keeps it.
#[derive(Clone, Copy, Debug)]
struct Range {
    size: u64,
    stream: i128,
}

/// A block live at some moment.
#[derive(Clone, Copy, Debug)]
struct Live {
    size: u64,
    /// Freed by the program, not yet completed.
    pending: bool,
}

fn check(v: &PyValue, p: &mut Problems, c: &mut SnapshotCheck) {
    if v.as_dict().is_none() {
        p.add(format!("the snapshot is a {}, not a dict", v.type_name()));
        return;
    }
    let segments = match v.get("segments").map(|s| (s, s.as_seq())) {
        Some((PyValue::List(_), Some(s))) => s,
        Some((other, _)) => {
            p.add(format!(
                "\"segments\" is a {}, not a list",
                other.type_name()
            ));
            &[]
        }
        None => {
            p.add("no \"segments\"".into());
            &[]
        }
    };
    let traces = match v.get("device_traces") {
        Some(PyValue::List(t)) => &t[..],
        Some(other) => {
            p.add(format!(
                "\"device_traces\" is a {}, not a list",
                other.type_name()
            ));
            &[]
        }
        None => {
            p.add("no \"device_traces\"".into());
            &[]
        }
    };
    // Final state per device: segments by address, live blocks by address.
    let mut seg_maps: BTreeMap<usize, BTreeMap<u64, Range>> = BTreeMap::new();
    let mut live_maps: BTreeMap<usize, BTreeMap<u64, Live>> = BTreeMap::new();
    for (i, s) in segments.iter().enumerate() {
        let at = format!("segments[{i}]");
        let Some(seg) = check_segment(s, &at, p, c) else {
            continue;
        };
        let segs = seg_maps.entry(seg.device).or_default();
        if let Some((&a, r)) = segs.range(..seg.address + seg.total_size).next_back() {
            if a + r.size > seg.address {
                p.add(format!(
                    "{at}: overlaps the segment at 0x{a:x} (device {})",
                    seg.device
                ));
            }
        }
        if let Some((&a, _)) = segs.range(seg.address..).next() {
            if a < seg.address + seg.total_size {
                p.add(format!("{at}: overlaps the segment at 0x{a:x}"));
            }
        }
        segs.insert(
            seg.address,
            Range {
                size: seg.total_size,
                stream: seg.stream,
            },
        );
        let live = live_maps.entry(seg.device).or_default();
        for (addr, size, state) in seg.blocks {
            if state != "inactive" {
                live.insert(
                    addr,
                    Live {
                        size,
                        pending: state == "active_pending_free",
                    },
                );
            }
        }
    }
    for (d, t) in traces.iter().enumerate() {
        let Some(entries) = t.as_seq() else {
            p.add(format!(
                "device_traces[{d}] is a {}, not a list",
                t.type_name()
            ));
            continue;
        };
        c.events += entries.len();
        let segs = seg_maps.remove(&d).unwrap_or_default();
        let live = live_maps.remove(&d).unwrap_or_default();
        if !entries.is_empty() || !segs.is_empty() {
            c.devices.push(d);
        }
        check_trace(d, entries, segs, live, p, c);
    }
    for d in seg_maps.keys() {
        if !c.devices.contains(d) {
            c.devices.push(*d);
        }
        if *d >= traces.len() {
            p.add(format!(
                "segments on device {d}, but device_traces has {} device(s) (the viewer indexes device_traces[{d}])",
                traces.len()
            ));
        }
    }
    c.devices.sort_unstable();
}

struct Seg {
    device: usize,
    address: u64,
    total_size: u64,
    stream: i128,
    blocks: Vec<(u64, u64, String)>,
}

fn field<'a>(d: &'a PyValue, key: &str, at: &str, p: &mut Problems) -> Option<&'a PyValue> {
    let v = d.get(key);
    if v.is_none() {
        p.add(format!("{at}: no \"{key}\""));
    }
    v
}

fn uint(d: &PyValue, key: &str, at: &str, p: &mut Problems) -> Option<u64> {
    let v = field(d, key, at, p)?;
    let u = v.as_u64();
    if u.is_none() {
        p.add(format!(
            "{at}: \"{key}\" is {v}, not an int from 0 to 2^64 - 1"
        ));
    }
    u
}

fn int(d: &PyValue, key: &str, at: &str, p: &mut Problems) -> Option<i128> {
    let v = field(d, key, at, p)?;
    let i = v.as_int();
    if i.is_none() {
        p.add(format!("{at}: \"{key}\" is {v}, not an int"));
    }
    i
}

fn frames(d: &PyValue, at: &str, p: &mut Problems) {
    if let Some(f) = field(d, "frames", at, p) {
        if !matches!(f, PyValue::List(_)) {
            p.add(format!("{at}: \"frames\" is {f}, not a list"));
        }
    }
}

fn check_segment(s: &PyValue, at: &str, p: &mut Problems, c: &mut SnapshotCheck) -> Option<Seg> {
    if s.as_dict().is_none() {
        p.add(format!("{at} is {s}, not a dict"));
        return None;
    }
    c.segments += 1;
    let device = uint(s, "device", at, p);
    let address = uint(s, "address", at, p);
    let total = uint(s, "total_size", at, p);
    let allocated = uint(s, "allocated_size", at, p);
    let active = uint(s, "active_size", at, p);
    let requested = uint(s, "requested_size", at, p);
    let stream = int(s, "stream", at, p);
    if let Some(t) = field(s, "segment_type", at, p) {
        if !matches!(t.as_str(), Some("small" | "large")) {
            p.add(format!(
                "{at}: \"segment_type\" is {t}, not 'small' or 'large'"
            ));
        }
    }
    if let Some(t) = field(s, "segment_pool_id", at, p) {
        let ok = matches!(t, PyValue::Tuple(_) | PyValue::List(_))
            && t.as_seq()
                .is_some_and(|x| x.len() == 2 && x.iter().all(|i| i.as_int().is_some()));
        if !ok {
            p.add(format!(
                "{at}: \"segment_pool_id\" is {t}, not a pair of ints"
            ));
        }
    }
    if let Some(t) = field(s, "is_expandable", at, p) {
        if t.as_bool().is_none() {
            p.add(format!("{at}: \"is_expandable\" is {t}, not a bool"));
        }
    }
    frames(s, at, p);
    let blocks = match field(s, "blocks", at, p) {
        Some(PyValue::List(b)) => &b[..],
        Some(other) => {
            p.add(format!("{at}: \"blocks\" is {other}, not a list"));
            return None;
        }
        None => return None,
    };
    let (device, address, total, stream) = (device?, address?, total?, stream?);
    if total == 0 {
        p.add(format!("{at}: \"total_size\" is 0"));
    }
    if blocks.is_empty() {
        p.add(format!("{at}: no blocks (they should cover the segment)"));
    }
    let mut out = Vec::with_capacity(blocks.len());
    let (mut sum, mut sum_alloc, mut sum_active, mut sum_req) = (0u64, 0u64, 0u64, 0u64);
    for (j, b) in blocks.iter().enumerate() {
        let bat = format!("{at}.blocks[{j}]");
        if b.as_dict().is_none() {
            p.add(format!("{bat} is {b}, not a dict"));
            continue;
        }
        c.blocks += 1;
        let baddr = uint(b, "address", &bat, p);
        let size = uint(b, "size", &bat, p);
        let req = uint(b, "requested_size", &bat, p);
        frames(b, &bat, p);
        let state = match field(b, "state", &bat, p) {
            Some(PyValue::Str(s)) if STATES.contains(&&**s) => s.to_string(),
            Some(other) => {
                p.add(format!(
                    "{bat}: \"state\" is {other}, not one of {}",
                    STATES.join(", ")
                ));
                continue;
            }
            None => continue,
        };
        let (Some(baddr), Some(size), Some(req)) = (baddr, size, req) else {
            continue;
        };
        let expected = address.saturating_add(sum);
        if baddr != expected {
            p.add(format!(
                "{bat}: address 0x{baddr:x}, but the blocks before it end at 0x{expected:x}"
            ));
        }
        if size == 0 {
            p.add(format!("{bat}: size 0"));
        }
        if state != "inactive" && req > size {
            p.add(format!("{bat}: requested_size {req} above its size {size}"));
        }
        sum = sum.saturating_add(size);
        if state == "active_allocated" {
            sum_alloc += size;
        }
        if state != "inactive" {
            sum_active += size;
            sum_req += req;
        }
        out.push((baddr, size, state));
    }
    if sum != total {
        p.add(format!(
            "{at}: its blocks add up to {sum} bytes, its total_size is {total}"
        ));
    }
    for (name, got, want) in [
        ("allocated_size", allocated, sum_alloc),
        ("active_size", active, sum_active),
        ("requested_size", requested, sum_req),
    ] {
        if let Some(g) = got {
            if g != want {
                p.add(format!("{at}: \"{name}\" is {g}, its blocks' make {want}"));
            }
        }
    }
    Some(Seg {
        device: device as usize,
        address,
        total_size: total,
        stream,
        blocks: out,
    })
}

/// One entry, checked and decoded.
struct Entry<'a> {
    action: &'a str,
    addr: u64,
    size: u64,
    stream: i128,
}

fn check_trace(
    d: usize,
    entries: &[PyValue],
    mut segs: BTreeMap<u64, Range>,
    mut live: BTreeMap<u64, Live>,
    p: &mut Problems,
    c: &mut SnapshotCheck,
) {
    // Forward: fields, and each address's story.
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Allocated(u64),
        Requested(u64),
        Free,
    }
    let mut state: HashMap<u64, State> = HashMap::new();
    let mut decoded: Vec<Option<Entry>> = Vec::with_capacity(entries.len());
    let mut last_time: Option<i128> = None;
    for (i, e) in entries.iter().enumerate() {
        let at = format!("device_traces[{d}][{i}]");
        if e.as_dict().is_none() {
            p.add(format!("{at} is {e}, not a dict"));
            decoded.push(None);
            continue;
        }
        let action = match field(e, "action", &at, p) {
            Some(PyValue::Str(s)) if ACTIONS.contains(&&**s) => &**s,
            Some(other) => {
                p.add(format!("{at}: unknown \"action\" {other}"));
                decoded.push(None);
                continue;
            }
            None => {
                decoded.push(None);
                continue;
            }
        };
        let at = format!("{at} ({action})");
        let addr = if action == "oom" {
            uint(e, "device_free", &at, p);
            Some(0)
        } else if action == "snapshot" || action == "annotate" {
            e.get("addr").and_then(PyValue::as_u64).or(Some(0))
        } else {
            uint(e, "addr", &at, p)
        };
        let size = uint(e, "size", &at, p);
        let stream = int(e, "stream", &at, p);
        if let Some(t) = int(e, "time_us", &at, p) {
            if last_time.is_some_and(|l| t < l) {
                c.time_reversals += 1;
            }
            last_time = Some(t);
        }
        // PyTorch leaves "frames" out of entries recorded without context.
        if let Some(f) = e.get("frames") {
            if !matches!(f, PyValue::List(_)) {
                p.add(format!("{at}: \"frames\" is {f}, not a list"));
            }
        }
        let (Some(addr), Some(size), Some(stream)) = (addr, size, stream) else {
            decoded.push(None);
            continue;
        };
        let st = state.get(&addr).copied();
        match action {
            "alloc" => {
                if let Some(State::Allocated(_) | State::Requested(_)) = st {
                    p.add(format!(
                        "{at}: alloc of 0x{addr:x}, which is live (allocated and not freed since)"
                    ));
                }
                state.insert(addr, State::Allocated(size));
            }
            "free_requested" => {
                match st {
                    Some(State::Allocated(s)) if s != size => p.add(format!(
                        "{at}: free_requested of 0x{addr:x} of {size} bytes, allocated with {s}"
                    )),
                    Some(State::Allocated(_)) => {}
                    Some(State::Requested(_)) => p.add(format!(
                        "{at}: free_requested of 0x{addr:x} twice, without a free_completed between"
                    )),
                    Some(State::Free) => p.add(format!(
                        "{at}: free_requested of 0x{addr:x}, which is free (freed and not allocated since)"
                    )),
                    None => c.frees_before_recording += 1,
                }
                state.insert(addr, State::Requested(size));
            }
            "free_completed" => {
                match st {
                    Some(State::Requested(s)) if s != size => p.add(format!(
                        "{at}: free_completed of 0x{addr:x} of {size} bytes, free_requested with {s}"
                    )),
                    Some(State::Requested(_)) => {}
                    // Freed before the recording, or before the oldest
                    // event a full history kept.
                    None => c.frees_before_recording += 1,
                    _ => p.add(format!(
                        "{at}: free_completed of 0x{addr:x} without a free_requested of it before"
                    )),
                }
                state.insert(addr, State::Free);
            }
            _ => {}
        }
        decoded.push(Some(Entry {
            action,
            addr,
            size,
            stream,
        }));
    }
    // The end of the story against the final segments.
    for (&addr, st) in &state {
        let found = live.get(&addr);
        match (st, found) {
            (State::Allocated(_), Some(l)) if !l.pending => {}
            (State::Requested(_), Some(l)) if l.pending => {}
            (State::Free, None) => {}
            (State::Allocated(_), _) => p.add(format!(
                "device {d}: 0x{addr:x} is allocated at the end of the trace, but no active_allocated block is there"
            )),
            (State::Requested(_), _) => p.add(format!(
                "device {d}: 0x{addr:x} was free_requested and never free_completed, but no active_pending_free block is there"
            )),
            (State::Free, Some(_)) => p.add(format!(
                "device {d}: 0x{addr:x} is free at the end of the trace, but an active block is there"
            )),
        }
    }
    // Backward, as the viewer draws each moment: undo each entry and keep
    // every live block inside a segment.
    let in_segment = |segs: &BTreeMap<u64, Range>, addr: u64, size: u64| {
        segs.range(..=addr)
            .next_back()
            .is_some_and(|(&a, r)| addr + size <= a + r.size)
    };
    for (&addr, l) in &live {
        if !in_segment(&segs, addr, l.size) {
            p.add(format!(
                "device {d}: the block at 0x{addr:x} lies in no segment"
            ));
        }
    }
    let mut reported = 0usize;
    let mut report = |p: &mut Problems, msg: String| {
        // The backward walk repeats an earlier problem at every step; keep
        // the first few.
        if reported < 5 {
            p.add(msg);
        }
        reported += 1;
    };
    for (i, e) in decoded.iter().enumerate().rev() {
        let Some(e) = e else { continue };
        let at = format!("device_traces[{d}][{i}] ({})", e.action);
        match e.action {
            "alloc" => match live.get(&e.addr) {
                Some(l) if !l.pending => {
                    live.remove(&e.addr);
                }
                _ => report(
                    p,
                    format!("{at}: 0x{:x} is not allocated just after its alloc", e.addr),
                ),
            },
            "free_requested" => match live.get_mut(&e.addr) {
                Some(l) if l.pending => l.pending = false,
                _ => report(
                    p,
                    format!(
                        "{at}: 0x{:x} is not pending just after its free_requested",
                        e.addr
                    ),
                ),
            },
            "free_completed" => {
                if live.contains_key(&e.addr) {
                    report(
                        p,
                        format!("{at}: 0x{:x} is live just after its free_completed", e.addr),
                    );
                }
                if !in_segment(&segs, e.addr, e.size) {
                    report(
                        p,
                        format!(
                            "{at}: before it, the block 0x{:x} ({} bytes) lies in no segment",
                            e.addr, e.size
                        ),
                    );
                }
                live.insert(
                    e.addr,
                    Live {
                        size: e.size,
                        pending: true,
                    },
                );
            }
            "segment_free" => {
                if segs.contains_key(&e.addr) {
                    report(
                        p,
                        format!(
                            "{at}: a segment at 0x{:x} just after its segment_free",
                            e.addr
                        ),
                    );
                }
                segs.insert(
                    e.addr,
                    Range {
                        size: e.size,
                        stream: e.stream,
                    },
                );
            }
            "segment_unmap" => map_back(&mut segs, e),
            "segment_alloc" | "segment_map" => {
                let ok = if e.action == "segment_alloc" {
                    segs.get(&e.addr).is_some_and(|r| r.size == e.size)
                } else {
                    in_segment(&segs, e.addr, e.size)
                };
                if !ok {
                    report(
                        p,
                        format!(
                            "{at}: no segment of {} bytes at 0x{:x} just after it",
                            e.size, e.addr
                        ),
                    );
                    continue;
                }
                if e.action == "segment_alloc" {
                    segs.remove(&e.addr);
                } else {
                    unmap_back(&mut segs, e);
                }
                let end = e.addr + e.size;
                if let Some((&b, _)) = live.range(e.addr..end).next() {
                    report(
                        p,
                        format!("{at}: the block at 0x{b:x} is live before it, in memory it maps"),
                    );
                }
            }
            _ => {}
        }
    }
}

/// Undoes a `segment_unmap`: the range comes back, merged with the
/// ranges of its stream it touches (as the viewer merges them).
fn map_back(segs: &mut BTreeMap<u64, Range>, e: &Entry) {
    let (mut addr, mut size) = (e.addr, e.size);
    if let Some((&a, r)) = segs.range(..addr).next_back() {
        if a + r.size == addr && r.stream == e.stream {
            segs.remove(&a);
            size += addr - a;
            addr = a;
        }
    }
    if let Some(r) = segs.get(&(e.addr + e.size)).copied() {
        if r.stream == e.stream {
            segs.remove(&(e.addr + e.size));
            size += r.size;
        }
    }
    segs.insert(
        addr,
        Range {
            size,
            stream: e.stream,
        },
    );
}

/// Undoes a `segment_map`: the range leaves the segment that holds it.
fn unmap_back(segs: &mut BTreeMap<u64, Range>, e: &Entry) {
    let Some((&a, &r)) = segs.range(..=e.addr).next_back() else {
        return;
    };
    segs.remove(&a);
    if e.addr > a {
        segs.insert(
            a,
            Range {
                size: e.addr - a,
                stream: r.stream,
            },
        );
    }
    let end = e.addr + e.size;
    if a + r.size > end {
        segs.insert(
            end,
            Range {
                size: a + r.size - end,
                stream: r.stream,
            },
        );
    }
}
