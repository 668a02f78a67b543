//! Memory snapshots in PyTorch's format: an
//! [`inflight::history::MemorySnapshot`] written as the dict that
//! `torch.cuda.memory._snapshot()` returns, as JSON or as a pickle that
//! PyTorch's viewer (`MemoryViz.js`, pytorch.org/memory_viz) and
//! `python -m torch.cuda._memory_viz` open ([`write_snapshot`]); what
//! `--snapshot` asks of a run ([`SnapshotRequest`]); reading such files
//! back ([`read_snapshot`]); and [`check`], which checks a snapshot (ours
//! or PyTorch's) the way the viewer will use it. docs/SNAPSHOTS.md says
//! what the viewer shows.

pub mod check;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use inflight::history::{MemoryAction, MemorySnapshot};
use inflight::{Allocator, Harness, PolicyKind};

use crate::pyvalue::PyValue;

/// Writes `snap` to `path` as a PyTorch memory snapshot: a pickle
/// (protocol 4) if the name ends in `.pickle`, JSON if it ends in `.json`;
/// any other name is an error, before anything is written.
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
    let k = Interned::default();
    let frames = PyValue::list(Vec::new());
    let no_frames = || frames.clone();
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
                    k.dict([
                        ("address", PyValue::int(b.address)),
                        ("size", PyValue::int(b.size)),
                        ("requested_size", PyValue::int(b.requested_size)),
                        ("state", k.str(b.state.name())),
                        ("frames", no_frames()),
                    ])
                })
                .collect();
            k.dict([
                ("device", device.clone()),
                ("address", PyValue::int(s.address)),
                ("total_size", PyValue::int(s.total_size)),
                ("allocated_size", PyValue::int(allocated)),
                ("active_size", PyValue::int(active)),
                ("requested_size", PyValue::int(requested)),
                ("stream", PyValue::int(s.queue)),
                ("segment_type", k.str(s.pool.name())),
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
                ("action", k.str(e.action.name())),
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
            k.dict(entry)
        })
        .collect();
    let mut traces: Vec<PyValue> = (0..snap.device)
        .map(|_| PyValue::list(Vec::new()))
        .collect();
    traces.push(PyValue::list(events));
    let expandable = snap.segments.iter().any(|s| s.expandable);
    k.dict([
        ("segments", PyValue::list(segments)),
        ("device_traces", PyValue::list(traces)),
        (
            "allocator_settings",
            k.dict([
                ("allocator", PyValue::str("inflight")),
                ("expandable_segments", PyValue::Bool(expandable)),
            ]),
        ),
        ("external_annotations", PyValue::list(Vec::new())),
    ])
}

/// Shared strings: each key and action name is one `str` however many
/// entries use it (a million events would otherwise hold six million
/// copies of six keys).
#[derive(Default)]
struct Interned(RefCell<HashMap<&'static str, PyValue>>);

impl Interned {
    fn str(&self, s: &'static str) -> PyValue {
        let mut map = self.0.borrow_mut();
        map.entry(s).or_insert_with(|| PyValue::str(s)).clone()
    }

    /// A dict with `str` keys, shared.
    fn dict(&self, pairs: impl IntoIterator<Item = (&'static str, PyValue)>) -> PyValue {
        let pairs: Vec<(PyValue, PyValue)> = pairs
            .into_iter()
            .map(|(key, v)| (self.str(key), v))
            .collect();
        PyValue::Dict(pairs.into())
    }
}

/// What `--snapshot` asks of one run: record the allocator's history from
/// its start ([`SnapshotRequest::start`]), and write the snapshot at its
/// end ([`SnapshotRequest::finish`]).
#[derive(Clone, Debug)]
pub struct SnapshotRequest {
    /// The file, its format checked ([`SnapshotFormat::of`]).
    pub path: PathBuf,
    /// The most history events kept (`--snapshot-events`).
    pub max_events: usize,
}

impl SnapshotRequest {
    /// Switches history recording on, before the run's first allocation.
    pub fn start<B: Harness>(&self, alloc: &Allocator<B>) {
        alloc.record_history(Some(self.max_events));
    }

    /// Writes the allocator's snapshot at the end of the run, and says so
    /// on stderr (with a warning if the history may have been cut short).
    pub fn finish<B: Harness>(&self, alloc: &Allocator<B>) -> anyhow::Result<()> {
        let snap = alloc.memory_snapshot();
        write_snapshot(&snap, &self.path)?;
        eprintln!(
            "inflight: wrote the memory snapshot {} ({} segments, {} history events)",
            self.path.display(),
            snap.segments.len(),
            snap.events.len()
        );
        if snap.events.len() >= self.max_events {
            eprintln!(
                "inflight: warning: the history kept only its last {} events (raise --snapshot-events to keep the start)",
                self.max_events
            );
        }
        Ok(())
    }
}

/// `x.pickle` for `policy` when several policies run: `x.deferred.pickle`.
pub fn path_for_policy(path: &Path, policy: PolicyKind) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let name = match path.extension() {
        Some(ext) => format!("{stem}.{policy}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{policy}"),
    };
    path.with_file_name(name)
}
