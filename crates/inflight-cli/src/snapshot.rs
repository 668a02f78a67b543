//! Memory snapshots in PyTorch's format: an
//! [`inflight::history::MemorySnapshot`] written as the dict that
//! `torch.cuda.memory._snapshot()` returns, as JSON or as a pickle that
//! PyTorch's viewer (`MemoryViz.js`, pytorch.org/memory_viz) and
//! `python -m torch.cuda._memory_viz` open; reading such files back; and
//! [`check_snapshot_structure`], which checks a snapshot (ours or
//! PyTorch's) the way the viewer will use it. docs/SNAPSHOTS.md says what
//! the viewer shows.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use inflight::history::{MemoryAction, MemorySnapshot};

use crate::pyvalue::PyValue;

/// Writes `snap` to `path` as a PyTorch memory snapshot: a pickle
/// (protocol 4) if the name ends in `.pickle`, JSON if it ends in `.json`;
/// any other name is an error, before anything is written.
#[allow(dead_code)] // called by `replay --snapshot` and `repro --snapshot`, to come
pub fn write_snapshot(snap: &MemorySnapshot, path: &Path) -> anyhow::Result<()> {
    let format = SnapshotFormat::of(path)?;
    write_value(&snapshot_value(snap), format, path)
}

/// The two formats a snapshot is written in.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SnapshotFormat {
    Pickle,
    Json,
}

impl SnapshotFormat {
    /// The format `path`'s extension names.
    pub fn of(path: &Path) -> anyhow::Result<SnapshotFormat> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("pickle") => Ok(SnapshotFormat::Pickle),
            Some("json") => Ok(SnapshotFormat::Json),
            _ => anyhow::bail!(
                "{}: a snapshot file's name must end in .pickle (for PyTorch's viewer) or .json",
                path.display()
            ),
        }
    }
}

/// Writes a snapshot value to `path` in `format`.
pub fn write_value(v: &PyValue, format: SnapshotFormat, path: &Path) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    match format {
        SnapshotFormat::Pickle => crate::pickle::write(v, &mut w),
        SnapshotFormat::Json => serde_json::to_writer(&mut w, v)
            .map_err(std::io::Error::other)
            .and_then(|()| w.flush()),
    }
    .with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a snapshot file: a pickle (any protocol 2 to 5) or JSON, told
/// apart by the first byte, gzip-compressed or not.
pub fn read_snapshot(path: &Path) -> anyhow::Result<PyValue> {
    read_snapshot_with_progress(path, &mut |_, _| {})
}

/// As [`read_snapshot`]; `progress(done, total)` is called now and then
/// with the bytes parsed.
pub fn read_snapshot_with_progress(
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<PyValue> {
    let data = crate::input::read_all(path)?;
    parse_snapshot(&data, progress).with_context(|| format!("{}", path.display()))
}

/// Parses a snapshot held in memory (see [`read_snapshot`]).
pub fn parse_snapshot(data: &[u8], progress: &mut dyn FnMut(u64, u64)) -> anyhow::Result<PyValue> {
    let total = data.len() as u64;
    match data.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(0x80) => crate::pickle::read_with_progress(data, &mut |at| progress(at as u64, total))
            .map_err(|e| anyhow::anyhow!("not a readable pickle: {e}")),
        Some(b'{') | Some(b'[') => {
            serde_json::from_slice(data).map_err(|e| anyhow::anyhow!("not readable JSON: {e}"))
        }
        Some(b) => anyhow::bail!(
            "neither a pickle (first byte 0x80) nor JSON: the file starts with byte 0x{b:02x}"
        ),
        None => anyhow::bail!("the file is empty"),
    }
}

/// `snap` as PyTorch's snapshot dict (see the module doc).
pub fn snapshot_value(snap: &MemorySnapshot) -> PyValue {
    let device = PyValue::int(snap.device);
    let no_frames = || PyValue::list(Vec::new());
    let segments = snap
        .segments
        .iter()
        .map(|s| {
            let mut allocated = 0u64;
            let mut active = 0u64;
            let mut requested = 0u64;
            let mut addr = s.address;
            let blocks = s
                .blocks
                .iter()
                .map(|b| {
                    use inflight::history::BlockState;
                    let is_active = !matches!(b.state, BlockState::Inactive);
                    if matches!(b.state, BlockState::Allocated) {
                        allocated += b.size;
                    }
                    if is_active {
                        active += b.size;
                        requested += b.requested_size;
                    }
                    debug_assert_eq!(b.address, addr, "blocks cover their segment in order");
                    addr = b.address + b.size;
                    PyValue::dict([
                        ("address", PyValue::int(b.address)),
                        ("size", PyValue::int(b.size)),
                        ("requested_size", PyValue::int(b.requested_size)),
                        ("state", PyValue::str(b.state.name())),
                        ("frames", no_frames()),
                    ])
                })
                .collect();
            PyValue::dict([
                ("device", device.clone()),
                ("address", PyValue::int(s.address)),
                ("total_size", PyValue::int(s.total_size)),
                ("allocated_size", PyValue::int(allocated)),
                ("active_size", PyValue::int(active)),
                ("requested_size", PyValue::int(requested)),
                ("stream", PyValue::int(s.queue)),
                ("segment_type", PyValue::str(s.pool.name())),
                (
                    "segment_pool_id",
                    PyValue::tuple(vec![PyValue::int(0), PyValue::int(0)]),
                ),
                ("is_expandable", PyValue::Bool(s.expandable)),
                ("frames", no_frames()),
                ("blocks", PyValue::list(blocks)),
            ])
        })
        .collect();
    let events = snap
        .events
        .iter()
        .map(|e| {
            let mut entry = vec![
                ("action", PyValue::str(e.action.name())),
                ("addr", PyValue::int(e.addr)),
                ("size", PyValue::int(e.size)),
                ("stream", PyValue::int(e.queue)),
                ("time_us", PyValue::int(e.time_us)),
                ("frames", no_frames()),
            ];
            if e.action == MemoryAction::Oom {
                // PyTorch's oom entries say how much the device had free;
                // the allocator does not know it.
                entry.push(("device_free", PyValue::int(0)));
            }
            PyValue::dict(entry)
        })
        .collect();
    let mut traces: Vec<PyValue> = (0..snap.device)
        .map(|_| PyValue::list(Vec::new()))
        .collect();
    traces.push(PyValue::list(events));
    let expandable = snap.segments.iter().any(|s| s.expandable);
    PyValue::dict([
        ("segments", PyValue::list(segments)),
        ("device_traces", PyValue::list(traces)),
        (
            "allocator_settings",
            PyValue::dict([
                ("allocator", PyValue::str("inflight")),
                ("expandable_segments", PyValue::Bool(expandable)),
            ]),
        ),
        ("external_annotations", PyValue::list(Vec::new())),
    ])
}

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
pub fn check_command(a: CheckArgs) -> anyhow::Result<ExitCode> {
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
    /// Frees of blocks allocated before the recording began (their alloc
    /// is not in the trace): allowed, counted.
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
///   `free_requested` of that address, with the same size;
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

#[cfg(test)]
mod tests {
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
}
